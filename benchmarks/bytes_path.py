"""The bytes path (what a worker on another host gets): master -> worker Forward payload
GB/s with shared memory off, against a raw TCP socket moving the same bytes, same run.

A Forward's payload is the hidden rows sent plus the partial sums returned (2 x T x H x
itemsize); its GB/s is that over the call's time, as the master's WorkerPool makes it
(serialize, gRPC, the worker's decode, expert forward and reply, the master's parse). The
baseline moves the same bytes the same way (send T x H x itemsize, receive as many back)
with socket.sendall / recv_into on one TCP connection to a peer process: what a plain
Python program gets from that path. Each point runs with one connection and no chunks
(`master.worker_channels: 1`, `master.worker_chunk_bytes: 0`: the defaults, and the tree
before chunking) and with --channels / --chunk-bytes (default 4 connections, 4 MiB chunks).

On loopback with --device cpu the worker runs with one torch thread (OMP_NUM_THREADS=1):
master, worker and gRPC's threads share the cores, and a two-thread GEMM whose second thread
waits for a core took 0.3-7 s instead of 0.15 s on a 2-core VM. glibc keeps freed memory
for reuse (M_MMAP_THRESHOLD / M_TRIM_THRESHOLD, here and in the worker): on a VM whose page
faults are slow, each fresh 64 MiB buffer cost ~90 ms of faults. Both are in `setup`.

The experts are made small (--ffn, default 16) so that the worker's compute is a small part
of a call: what is measured is the path, not the GEMMs.

Loopback (the worker and the socket peer are child processes of this one):

    python benchmarks/bytes_path.py --dtype float32 --json out.json          # CPU
    python benchmarks/bytes_path.py --device cuda --json out.json            # GPU, bf16

Two hosts: on the worker's host, start the worker of the config this script writes and the
socket peer; then point this script at both:

    python benchmarks/bytes_path.py --write-config bp.yaml --worker-address 0.0.0.0:50061
    moe-serve worker --config bp.yaml --worker-id w0 &          # worker host
    python benchmarks/bytes_path.py --serve-sink 50070 &        # worker host
    python benchmarks/bytes_path.py --worker HOST:50061 --sink HOST:50070 --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's moe_serve, and the tests' two hosts

from moe_serve.config import WorldConfig, parse_config  # noqa: E402
from moe_serve.dtypes import DTYPE_NAMES  # noqa: E402
from moe_serve.layer.dispatch import WorkerSlice  # noqa: E402
from moe_serve.master.workers import WorkerPool  # noqa: E402
from moe_serve.metrics import MasterMetrics  # noqa: E402
from moe_serve.tools.demo import free_ports  # noqa: E402
from moe_serve.tools.launcher import is_serving  # noqa: E402
from tests.support.netns import HostsUnavailableError, TwoHosts  # noqa: E402

CHUNK = 1 << 20  # socket read/write granularity of the baseline
# glibc: serve big allocations from the heap and keep freed memory (see the docstring).
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 32), "MALLOC_TRIM_THRESHOLD_": str(1 << 36)}


def keep_freed_memory() -> bool:
    """This process's glibc keeps freed memory for reuse, as MALLOC_ENV does for children."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    # mallopt's int argument caps the mmap threshold at 32 MiB (HEAP_MAX / 2 on 64-bit).
    return bool(
        libc.mallopt(m_mmap_threshold, 32 << 20) and libc.mallopt(m_trim_threshold, 1 << 30)
    )


def world(
    args: argparse.Namespace, address: str, metrics_port: int | None = None
) -> dict[str, Any]:
    """One worker holding every expert; the master's shared memory off."""
    tokens = max(args.tokens)
    return {
        "model": {
            "hidden_size": args.hidden,
            "expert_ffn_size": args.ffn,
            "num_experts": 8,
            "top_k": 1,
            "moe_layers": [0],
            "dtype": args.dtype,
            "seed": 1,
        },
        "master": {
            "listen": "127.0.0.1:50051",  # never bound: the pool is made here
            "metrics_port": None,
            "device": args.device,
            "shared_memory_bytes": 0,
            "max_request_tokens": tokens,
        },
        "batching": {"max_batch_tokens": max(tokens, 16384)},
        "workers": [
            {
                "id": "w0",
                "address": address,
                "metrics_port": metrics_port,
                "devices": [args.worker_device or args.device],
                "experts": list(range(8)),
            }
        ],
    }


# ------------------------------------------------------------------ raw socket ---


def serve_sink(port: int, host: str = "0.0.0.0") -> None:
    """The baseline's peer: per request, read an 8-byte header (bytes in, bytes out), read
    that many bytes, send as many back as asked. Runs until killed."""
    srv = socket.create_server((host, port), reuse_port=False)
    while True:
        conn, _ = srv.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buf = bytearray(CHUNK)
        view, reply = memoryview(buf), b""
        try:
            while True:
                head = conn.recv(8, socket.MSG_WAITALL)
                if len(head) < 8:
                    break
                n_in, n_out = int.from_bytes(head[:4], "little"), int.from_bytes(head[4:], "little")
                left = n_in
                while left:
                    got = conn.recv_into(view[: min(left, CHUNK)])
                    if not got:
                        raise ConnectionError("peer closed")
                    left -= got
                if len(reply) != n_out:
                    reply = bytes(n_out)
                conn.sendall(reply)
        except ConnectionError:
            pass
        finally:
            conn.close()


def raw_socket(address: str, nbytes: int, iters: int) -> list[float]:
    """Seconds per round trip of `nbytes` out and `nbytes` back on one TCP connection."""
    host, port = address.rsplit(":", 1)
    payload = bytes(nbytes)
    back = bytearray(nbytes)
    view = memoryview(back)
    out = []
    with socket.create_connection((host, int(port))) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        head = nbytes.to_bytes(4, "little") * 2
        for i in range(iters + 2):
            t0 = time.perf_counter()
            s.sendall(head)
            s.sendall(payload)
            got = 0
            while got < nbytes:
                n = s.recv_into(view[got:])
                if not n:
                    raise ConnectionError("sink closed")
                got += n
            if i >= 2:  # two warm-up round trips
                out.append(time.perf_counter() - t0)
    return out


# ------------------------------------------------------------------ Forward ---


def the_slice(tokens: int, device: torch.device) -> WorkerSlice:
    """Every row to the one worker, one expert each, spread over the 8 experts."""
    rows = torch.arange(tokens, device=device)
    return WorkerSlice(
        worker=0,
        token_index=rows,
        pair_token=rows.to(torch.int32),
        pair_expert=(rows % 8).to(torch.int32),
        pair_weight=torch.ones(tokens, device=device),
        pair_index=rows.long(),
    )


def worker_forward_s(metrics: str | None) -> float:
    """The worker's moe_serve_worker_forward_seconds_sum (its expert forwards), or NaN."""
    if metrics is None:
        return float("nan")
    text = urllib.request.urlopen(f"http://{metrics}/metrics", timeout=5).read().decode()
    for line in text.splitlines():
        if line.startswith("moe_serve_worker_forward_seconds_sum"):
            return float(line.rsplit(" ", 1)[1])
    return float("nan")


async def forward_times(
    cfg: WorldConfig, x: torch.Tensor, iters: int, metrics_at: str | None
) -> tuple[list[float], torch.Tensor, int, float]:
    """Seconds per WorkerPool.forward of all of x, its last output, calls made per forward,
    and seconds of the worker's expert forward per forward (NaN without its metrics)."""
    metrics = MasterMetrics()
    pool = WorkerPool(cfg, metrics)
    try:
        await pool.probe()
        if not pool.healthy[0]:
            raise SystemExit(f"worker at {cfg.workers[0].address} is not serving")
        sl = the_slice(x.shape[0], x.device)
        out = await pool.forward(0, x, sl, 60.0)  # warm-up: connections, allocations
        await pool.forward(0, x, sl, 60.0)
        before = metrics.worker_calls.labels("w0", "bytes")._value.get()
        computed = worker_forward_s(metrics_at)
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            out = await pool.forward(0, x, sl, 60.0)
            if out.is_cuda:
                torch.cuda.synchronize(out.device)
            times.append(time.perf_counter() - t0)
        calls = metrics.worker_calls.labels("w0", "bytes")._value.get() - before
        computed = (worker_forward_s(metrics_at) - computed) / iters
        return times, out.clone(), int(calls / iters), computed
    finally:
        await pool.close()


def summary(times: list[float], nbytes: int) -> dict[str, Any]:
    med = statistics.median(times)
    return {
        "median_ms": med * 1e3,
        "min_ms": min(times) * 1e3,
        "gb_s": nbytes / med / 1e9,
        "times_ms": [round(t * 1e3, 2) for t in times],
    }


def with_master(cfg: WorldConfig, **keys: Any) -> WorldConfig:
    return cfg.model_copy(update={"master": cfg.master.model_copy(update=keys)})


def worker_command(config: Path) -> list[str]:
    """`moe-serve worker` of the one worker of `config` (this interpreter, no console script)."""
    return [
        sys.executable,
        "-c",
        "import sys; from moe_serve.cli import main; sys.exit(main())",
        "worker",
        "--config",
        str(config),
        "--worker-id",
        "w0",
    ]


def worker_env(args: argparse.Namespace) -> dict[str, str]:
    """The worker's environment: glibc keeps freed memory; one torch thread on CPU."""
    env = {**os.environ, **MALLOC_ENV}
    if args.device == "cpu" and (args.worker_device or "cpu") == "cpu":
        env["OMP_NUM_THREADS"] = "1"
    return env


# Ports in host B: a fresh network namespace has every port free.
B_WORKER_PORT, B_METRICS_PORT, B_SINK_PORT = 50061, 9401, 50070


def two_hosts(args: argparse.Namespace) -> None:
    """This benchmark across two hosts joined only by TCP (tests/support/netns.py: network,
    PID and mount namespaces, a veth link with a 10 Gbit/s token bucket on both ends): the
    worker and the socket peer in host B, the measurement (the master's WorkerPool, the
    socket's client) in host A, so both cross the same link in the same run. Writes the
    result of the run in A, with the link described in `setup.two_hosts`."""
    tmp = Path(tempfile.mkdtemp(prefix="bytes-path-two-hosts-"))
    result_path = tmp / "result.json"
    procs: list[subprocess.Popen[bytes]] = []
    with TwoHosts() as hosts, open(tmp / "worker.log", "w") as log:
        worker = f"{hosts.b.ip}:{B_WORKER_PORT}"
        config = tmp / "world.yaml"
        config.write_text(yaml.safe_dump(world(args, worker, B_METRICS_PORT)))
        env = worker_env(args)
        procs.append(
            hosts.popen(
                hosts.b, worker_command(config), stdout=log, stderr=subprocess.STDOUT, env=env
            )
        )
        procs.append(
            hosts.popen(hosts.b, [sys.executable, __file__, "--serve-sink", str(B_SINK_PORT)])
        )
        measure = [
            sys.executable,
            __file__,
            *("--worker", worker, "--sink", f"{hosts.b.ip}:{B_SINK_PORT}"),
            *("--worker-metrics", f"{hosts.b.ip}:{B_METRICS_PORT}", "--json", str(result_path)),
            *("--tokens", *map(str, args.tokens), "--hidden", str(args.hidden)),
            *("--ffn", str(args.ffn), "--dtype", args.dtype, "--device", args.device),
            *("--iters", str(args.iters), "--channels", str(args.channels)),
            *("--chunk-bytes", str(args.chunk_bytes), "--label", args.label),
            *(("--worker-device", args.worker_device) if args.worker_device else ()),
        ]
        code = hosts.popen(hosts.a, measure).wait()
        if code != 0:
            raise SystemExit(f"the run in host A failed ({code}); worker log: {log.name}")
    for proc in procs:  # killed with their host
        proc.wait()
    result = json.loads(result_path.read_text())
    result["setup"]["worker"] = "host B (two hosts joined by a veth link)"
    result["setup"]["worker_env"] = {
        k: env[k] for k in (*MALLOC_ENV, "OMP_NUM_THREADS") if k in env
    }
    result["setup"]["two_hosts"] = {
        "master": "host A: the WorkerPool and the raw socket's client",
        "worker": "host B: the worker and the raw socket's peer",
        "isolation": "network, PID and mount namespaces per host; /dev/shm a tmpfs each",
        "link": {"kind": "veth pair, tc tbf on both ends", **hosts.link},
    }
    if args.json:  # the run in A printed its rows and summary
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[512, 4096])
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--ffn", type=int, default=16, help="expert_ffn_size (small: the path)")
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPE_NAMES))
    parser.add_argument("--device", default="cpu", help="the master's device")
    parser.add_argument("--worker-device", help="the worker's device (default: --device)")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--channels", type=int, default=4, help="master.worker_channels")
    parser.add_argument("--chunk-bytes", type=int, default=4 << 20, help="worker_chunk_bytes")
    parser.add_argument("--worker", help="host:port of a running worker (of --write-config's)")
    parser.add_argument("--sink", help="host:port of a running --serve-sink")
    parser.add_argument("--worker-metrics", help="host:port of --worker's metrics exporter")
    parser.add_argument("--serve-sink", type=int, metavar="PORT", help="run the socket peer")
    parser.add_argument("--write-config", type=Path, help="write the worker's config and exit")
    parser.add_argument("--worker-address", default="0.0.0.0:50061")
    parser.add_argument(
        "--two-hosts",
        action="store_true",
        help="worker and socket peer in host B, this measurement in host A (needs root)",
    )
    parser.add_argument("--label", default=platform.node())
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.serve_sink:
        serve_sink(args.serve_sink)
        return
    if args.write_config:
        args.write_config.write_text(yaml.safe_dump(world(args, args.worker_address)))
        return
    if args.two_hosts:
        try:
            two_hosts(args)
        except HostsUnavailableError as exc:
            raise SystemExit(f"two hosts cannot be made here: {exc}") from None
        return
    children: list[subprocess.Popen[bytes]] = []
    setup: dict[str, Any] = {"master_keeps_freed_memory": keep_freed_memory()}
    tmp = Path(tempfile.mkdtemp(prefix="bytes-path-"))
    try:
        worker, sink, worker_metrics = args.worker, args.sink, args.worker_metrics
        if worker is None:
            wport, mport = free_ports(2)
            worker, worker_metrics = f"127.0.0.1:{wport}", f"127.0.0.1:{mport}"
            path = tmp / "world.yaml"
            path.write_text(yaml.safe_dump(world(args, worker, mport)))
            env = worker_env(args)
            setup["worker_env"] = {k: env[k] for k in (*MALLOC_ENV, "OMP_NUM_THREADS") if k in env}
            log = open(tmp / "worker.log", "w")  # noqa: SIM115 - closed with the process
            children.append(
                subprocess.Popen(
                    worker_command(path), stdout=log, stderr=subprocess.STDOUT, env=env
                )
            )
        if sink is None:
            sport = free_ports(1)[0]
            sink = f"127.0.0.1:{sport}"
            children.append(
                subprocess.Popen([sys.executable, __file__, "--serve-sink", str(sport)])
            )
        deadline = time.monotonic() + 120
        while not is_serving(worker, timeout=2):
            if time.monotonic() > deadline or any(c.poll() is not None for c in children):
                raise SystemExit(f"worker did not start; see {tmp / 'worker.log'}")
            time.sleep(0.2)
        cfg = parse_config(world(args, worker))
        tuned = {"worker_channels": args.channels, "worker_chunk_bytes": args.chunk_bytes}
        variants = {
            "one_call": with_master(cfg, worker_channels=1, worker_chunk_bytes=0),
            "chunked": with_master(cfg, **tuned),
        }
        dtype = DTYPE_NAMES[args.dtype]
        rows = []
        for T in args.tokens:
            x = torch.randn(T, args.hidden, generator=torch.Generator().manual_seed(T))
            x = x.to(args.device, dtype)
            one_way = T * args.hidden * x.element_size()
            payload = 2 * one_way
            time.sleep(0.2)
            raw = raw_socket(sink, one_way, args.iters)
            row: dict[str, Any] = {
                "tokens": T,
                "payload_bytes": payload,
                "raw_socket": summary(raw, payload),
            }
            outs = {}
            for name, vcfg in variants.items():
                times, out, calls, computed = asyncio.run(
                    forward_times(vcfg, x, args.iters, worker_metrics)
                )
                outs[name] = out
                row[name] = {
                    **summary(times, payload),
                    "calls_per_forward": calls,
                    "worker_forward_ms": computed * 1e3,
                    "worker_channels": vcfg.master.worker_channels,
                    "worker_chunk_bytes": vcfg.master.worker_chunk_bytes,
                }
            # a second raw pass after the Forward runs: the baseline brackets them
            raw2 = raw_socket(sink, one_way, args.iters)
            row["raw_socket_after"] = summary(raw2, payload)
            base = max(row["raw_socket"]["gb_s"], row["raw_socket_after"]["gb_s"])
            row["chunked_equal"] = bool(torch.equal(outs["one_call"], outs["chunked"]))
            for name in variants:
                row[name]["vs_raw_tcp"] = row[name]["gb_s"] / base
            rows.append(row)
            print(
                f"T={T:5d} payload {payload / 1e6:7.1f} MB  raw socket {base:5.2f} GB/s  "
                + "  ".join(
                    f"{n} {row[n]['gb_s']:5.2f} GB/s ({row[n]['vs_raw_tcp']:.2f}x, "
                    f"{row[n]['calls_per_forward']} calls, {row[n]['median_ms']:.1f} ms, "
                    f"worker forward {row[n]['worker_forward_ms']:.1f} ms)"
                    for n in variants
                )
                + f"  equal={row['chunked_equal']}",
                flush=True,
            )
        top = next((r for r in rows if r["tokens"] == 4096), rows[-1])
        result = {
            "label": args.label,
            "setup": {
                "hidden": args.hidden,
                "ffn": args.ffn,
                "dtype": args.dtype,
                "device": args.device,
                "worker": "loopback child process" if args.worker is None else args.worker,
                "cpus": os.cpu_count(),
                "torch": torch.__version__,
                **setup,
            },
            "rows": rows,
            "summary": {
                "bytes_path_vs_raw_tcp": top["chunked"]["vs_raw_tcp"],
                "bytes_path_vs_raw_tcp_one_call": top["one_call"]["vs_raw_tcp"],
                "bytes_path_gb_s": top["chunked"]["gb_s"],
                "raw_tcp_gb_s": top["chunked"]["gb_s"] / top["chunked"]["vs_raw_tcp"],
                "chunked_equal": all(r["chunked_equal"] for r in rows),
            },
        }
        print(json.dumps(result["summary"]))
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(result, indent=2) + "\n")
    finally:
        for c in children:
            c.terminate()
        for c in children:
            try:
                c.wait(10)
            except subprocess.TimeoutExpired:
                c.kill()


if __name__ == "__main__":
    main()
