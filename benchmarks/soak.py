"""Soak: mixed traffic for a long time while a worker is killed and restarted periodically.

Starts a master and two workers that replicate every expert (separate processes on
loopback), then runs clients that send requests of mixed sizes, with and without routing,
for `--minutes`. Every `--kill-every` seconds it SIGKILLs one worker (alternating) and
restarts it. It records failed requests (and their status codes), requests served, and the
RSS of every process over time, and writes them as JSON.

    python benchmarks/soak.py --minutes 30 --json benchmarks/results/soak.json

Not part of CI: it runs for as long as it is told.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from moe_serve.client import AsyncMoEClient, MoEServeError  # noqa: E402
from moe_serve.tools.demo import free_ports  # noqa: E402
from moe_serve.tools.launcher import is_serving  # noqa: E402

SIZES = (1, 1, 1, 4, 16, 64, 300)  # mostly decode steps, some prefill chunks


def rss_mb(pid: int) -> float:
    """Resident set size of `pid` in MB (Linux /proc)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def config() -> dict[str, Any]:
    master, mm, *rest = free_ports(6)
    workers = [
        {
            "id": f"w{i}",
            "address": f"127.0.0.1:{rest[2 * i]}",
            "metrics_port": rest[2 * i + 1],
            "experts": list(range(8)),
        }
        for i in range(2)
    ]
    return {
        "model": {"hidden_size": 256, "expert_ffn_size": 512, "num_experts": 8, "top_k": 2},
        "master": {"listen": f"127.0.0.1:{master}", "metrics_port": mm, "worker_timeout_s": 2.0},
        "workers": workers,
    }


class Processes:
    def __init__(self, cfg: dict[str, Any], tmp: Path) -> None:
        self.path = tmp / "world.yaml"
        self.path.write_text(yaml.safe_dump(cfg))
        self.log = open(tmp / "soak.log", "ab")  # noqa: SIM115 - closed in stop()
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.cfg = cfg
        for w in cfg["workers"]:
            self.start_worker(w["id"])
        self.procs["master"] = self._spawn("master")
        self.wait(cfg["master"]["listen"])

    def _spawn(self, *args: str) -> subprocess.Popen[bytes]:
        cmd = [sys.executable, "-m", "moe_serve", *args, "--config", str(self.path)]
        return subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT)

    def start_worker(self, worker_id: str) -> None:
        self.procs[worker_id] = self._spawn("worker", "--worker-id", worker_id)

    def wait(self, address: str, timeout_s: float = 120.0) -> float:
        start = time.monotonic()
        while not is_serving(address, timeout=0.5):
            if time.monotonic() - start > timeout_s:
                raise RuntimeError(f"{address} did not serve")
            time.sleep(0.1)
        return time.monotonic() - start

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            proc.wait(timeout=30)
        self.log.close()


async def traffic(address: str, until: float, served: Counter[str], failed: Counter[str]) -> None:
    g = torch.Generator().manual_seed(os.getpid())
    async with AsyncMoEClient(address, timeout=30) as client:
        i = 0
        while time.monotonic() < until:
            T = SIZES[i % len(SIZES)]
            i += 1
            x = torch.randn(T, 256, generator=g)
            try:
                await client.infer(x, return_routing=i % 5 == 0)
                served["ok"] += 1
            except MoEServeError as exc:
                failed[exc.code.name] += 1


async def soak(procs: Processes, minutes: float, kill_every: float, clients: int) -> dict:
    address = procs.cfg["master"]["listen"]
    until = time.monotonic() + minutes * 60
    served: Counter[str] = Counter()
    failed: Counter[str] = Counter()
    samples, kills = [], []
    start = time.monotonic()
    load = asyncio.gather(*(traffic(address, until, served, failed) for _ in range(clients)))
    next_kill, victim = start + kill_every, 0
    while time.monotonic() < until:
        await asyncio.sleep(5)
        now = time.monotonic()
        samples.append(
            {
                "t_s": round(now - start, 1),
                "served": served["ok"],
                "failed": sum(failed.values()),
                "rss_mb": {n: round(rss_mb(p.pid), 1) for n, p in procs.procs.items()},
            }
        )
        print(json.dumps(samples[-1]), flush=True)
        if now >= next_kill and now + 30 < until:
            name = f"w{victim % 2}"
            victim += 1
            os.kill(procs.procs[name].pid, signal.SIGKILL)
            procs.procs[name].wait()
            procs.start_worker(name)
            worker = next(w for w in procs.cfg["workers"] if w["id"] == name)
            took = await asyncio.to_thread(procs.wait, worker["address"])
            kills.append(
                {"t_s": round(now - start, 1), "worker": name, "back_in_s": round(took, 2)}
            )
            print(json.dumps({"killed": kills[-1]}), flush=True)
            next_kill = now + kill_every
    await load
    return {
        "minutes": minutes,
        "clients": clients,
        "served": served["ok"],
        "failed": dict(failed),
        "kills": kills,
        "samples": samples,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--kill-every", type=float, default=180.0, help="seconds")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        procs = Processes(config(), Path(tmp))
        try:
            result = asyncio.run(soak(procs, args.minutes, args.kill_every, args.clients))
        finally:
            procs.stop()
    first, last = result["samples"][0], result["samples"][-1]
    print(
        f"served {result['served']}, failed {result['failed']}, kills {len(result['kills'])}; "
        f"RSS MB start {first['rss_mb']} end {last['rss_mb']}",
        flush=True,
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
