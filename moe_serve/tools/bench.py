"""`moe-serve bench`: moe_serve against the same layer in-process and over torch.distributed.rpc.

One process tree, one run, the world config's weights and devices for all:
(a) two in-process layers, no network: `in-process-grouped`, the fastest single-process layer
    we can write (gate, then every expert on master.device in one grouped GEMM per
    projection, CUDA graphs for small batches: what a user would run instead of a service),
    and `in-process`, the master's engine (MasterEngine) over the workers' engines called
    directly, gate and experts where the config puts them. Ratios are taken against the
    faster of the two at each T,
(b) moe_serve through the SDK (master + workers started like `moe-serve up`), then the
    embedded master (`MoEClient.embedded`: the gate in the bench's process, one hop to the
    workers) against the same workers,
(c) a torch.distributed.rpc baseline in the style of seed 004 (moe_serve/tools/rpc_baseline.py).
Then the per-hop overhead at T=1 (each hop's time less an empty unary call's against the
same server: `hop_overhead`), a concurrency sweep at T=1 and the wire codec's GB/s. Prints a
table as it goes, writes JSON (and a PNG plot when matplotlib is installed).
Legend: T tokens per request, H hidden, F expert FFN, K top_k.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import urllib.request
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from moe_serve.client import AsyncMoEClient, MoEClient
from moe_serve.config import WorkerConfig, WorldConfig
from moe_serve.dtypes import DTYPE_NAMES
from moe_serve.errors import MoEError
from moe_serve.layer.dispatch import WorkerSlice, combine, combine_pairs, dispatch
from moe_serve.layer.experts import load_shared, shared_forward
from moe_serve.layer.gating import Gate
from moe_serve.master.engine import MasterEngine
from moe_serve.metrics import MasterMetrics, local_url
from moe_serve.tools.launcher import LocalCluster
from moe_serve.transport.auth import load_token, load_worker_token, metadata
from moe_serve.transport.calls import message_options, unary_call
from moe_serve.transport.server import keep_large_allocations
from moe_serve.transport.tls import ClientTLS, channel
from moe_serve.transport.wire import parse, serialize, tensor_from_pb
from moe_serve.v1 import moe_pb2 as pb
from moe_serve.weights import open_weights
from moe_serve.worker.engine import WorkerEngine

TOKENS = (1, 8, 64, 512, 4096)
# The in-process baselines; a ratio is taken against the fastest of them at each T. The
# "-variant" one is the grouped layer with model.batch_invariant off: the library's fastest
# kernel per shape, whose bits follow the batch (docs/models.md#batch-invariant-results).
IN_PROCESS = ("in-process-grouped", "in-process-grouped-variant", "in-process")
CLIENTS = (1, 2, 4, 8, 16, 32, 64)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()  # time whole forwards, not kernel launches


def time_calls(fn: Callable[[], object], iters: int, warmup: int) -> dict[str, float]:
    """Wall time of `fn` over `iters` calls after `warmup`: p50/p99/mean in ms."""
    for _ in range(warmup):
        fn()
    _sync()
    samples = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        _sync()
        samples.append((time.perf_counter() - t0) * 1e3)
    q = statistics.quantiles(samples, n=100, method="inclusive") if len(samples) > 1 else samples
    return {
        "p50_ms": statistics.median(samples),
        "p99_ms": q[-1],
        "mean_ms": statistics.fmean(samples),
    }


class LocalWorkers:
    """The workers as an ExpertPool in this process: each worker's WorkerEngine called
    directly, its tokens moved to its first device with .to() (no validation, no wire)."""

    def __init__(self, engines: list[WorkerEngine], pair_outputs: bool) -> None:
        self.engines, self.pair_outputs = engines, pair_outputs
        self.healthy = [True] * len(engines)
        self.outstanding = [0] * len(engines)  # calls finish before the next one starts
        self.tls_failures: list[str | None] = [None] * len(engines)  # no TLS in-process

    async def recheck(self, workers: list[int], timeout_s: float) -> None:
        """In-process workers are never marked down: nothing to ask again."""

    async def forward(
        self, layer: int, x: torch.Tensor, sl: WorkerSlice, timeout_s: float
    ) -> torch.Tensor:
        """x [T, H] -> worker `sl.worker`'s answer (pair outputs [P_w, H] when
        `pair_outputs`, else partial sums [N_w, H]), left on its device (the engine's
        combine moves them). For a worker on one device nothing here waits for the
        GPU (kernels are only queued), so the workers' GPUs compute their slices at the same
        time, as the served workers do."""
        engine = self.engines[sl.worker]
        dev = engine.devices[0]
        hidden = x[sl.token_index.to(x.device)].to(dev)
        token, expert, weight = (t.to(dev) for t in (sl.pair_token, sl.pair_expert, sl.pair_weight))
        return engine.forward(
            layer, hidden, token, expert, weight, out_device=dev, pairs=self.pair_outputs
        )


class InProcessMoE:
    """The served layer in this process: the master's engine (gate and shared experts on
    master.device, the same gate -> dispatch -> fan out -> combine as `moe-serve master`)
    over LocalWorkers (each worker's experts on its devices); what moe_serve adds is the
    network."""

    def __init__(self, cfg: WorldConfig) -> None:
        self.cfg = cfg
        source = open_weights(cfg.model, cfg.routing)
        engines = [WorkerEngine(cfg.model, w, source) for w in cfg.workers]
        self.workers = LocalWorkers(engines, cfg.model.batch_invariant)
        self.engine = MasterEngine(cfg, self.workers, MasterMetrics(), source)
        # One event loop for every forward (asyncio.run would build one per call).
        self._loop = asyncio.new_event_loop()
        self._close = weakref.finalize(self, self._loop.close)

    @torch.inference_mode()
    def forward(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        """x [T, H] -> [T, H] in the model dtype, on master.device."""
        x = x.to(self.engine.device, self.engine.dtype)
        (outcome,) = self._loop.run_until_complete(self.engine.forward(layer, [x]))
        if isinstance(outcome, MoEError):
            raise outcome
        return outcome[0]

    def close(self) -> None:
        """Close the event loop (also done when the object is collected)."""
        self._close()


class GroupedMoE:
    """The fastest single-process layer: the gate, then every routed expert stacked on
    master.device and run as one grouped GEMM per projection (torch._grouped_mm where it
    runs; CUDA graphs per size bucket for small batches, as the workers capture them), the
    shared experts, one weighted sum. No dispatch, no second device, no event loop."""

    def __init__(self, cfg: WorldConfig) -> None:
        m, self.device = cfg.model, torch.device(cfg.master.device)
        self.dtype, self.top_k = DTYPE_NAMES[m.dtype], m.top_k
        source = open_weights(m, cfg.routing)
        self.gates = {
            la: Gate.load(
                source, la, m.top_k, cfg.routing, self.device, self.dtype, m.batch_invariant
            )
            for la in m.moe_layers
        }
        self.shared = load_shared(source, m.moe_layers, self.device, self.dtype)
        everything = WorkerConfig(
            id="all",
            address="127.0.0.1:1",
            devices=(cfg.master.device,),
            experts=tuple(range(m.num_experts)),
        )
        self.experts = WorkerEngine(m, everything, source)

    @torch.inference_mode()
    def forward(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        """x [T, H] -> [T, H] in the model dtype, on master.device."""
        x = x.to(self.device, self.dtype)
        r = self.gates[layer](x, losses=False)
        token = torch.arange(x.shape[0], device=self.device).repeat_interleave(self.top_k)
        out = self.experts.forward(
            layer, x, token, r.expert_ids.flatten(), r.weights.flatten(), out_device=self.device
        )
        if layer in self.shared:
            m = self.experts.model
            out = out + shared_forward(m.activation, self.shared[layer], x, m.batch_invariant)
        return out


def _in_process(
    cfg: WorldConfig, xs: dict[int, torch.Tensor], layer: int, iters: int, flops: float
) -> tuple[list[dict[str, Any]], dict[str, dict[str, float]]]:
    rows = []
    for name, invariant in (("in-process-grouped", True), ("in-process-grouped-variant", False)):
        model = cfg.model.model_copy(update={"batch_invariant": invariant})
        grouped = GroupedMoE(cfg.model_copy(update={"model": model}))
        rows += [
            _row(name, T, time_calls(functools.partial(grouped.forward, x, layer), iters, 3), flops)
            for T, x in xs.items()
        ]
        del grouped  # its experts' memory goes back before the next layer loads them
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    ref = InProcessMoE(cfg)  # freed on return, before the workers load their experts
    try:
        rows += [
            _row(
                "in-process",
                T,
                time_calls(functools.partial(ref.forward, x, layer), iters, 3),
                flops,
            )
            for T, x in xs.items()
        ]
        stages = {}
        for T in (min(xs), max(xs)):
            stages[str(T)] = stage_breakdown(ref, xs[T], layer, iters)
            print(
                f"  stages T={T}: "
                + ", ".join(f"{k} {v:.3f}" for k, v in stages[str(T)].items())
                + " (ms, p50)",
                flush=True,
            )
    finally:
        ref.close()
    return rows, stages


def stage_breakdown(ref: InProcessMoE, x: torch.Tensor, layer: int, iters: int) -> dict[str, float]:
    """p50 ms of each step one request takes through moe_serve, each timed on its own on the
    config's devices, for the worker with the largest slice of `x`.

    gate, dispatch: on master.device. encode/decode: the bytes path's Forward request
    (wire.serialize with its device -> host copy; wire.parse). h2d: the decoded tokens to
    the worker's device. experts: the worker's batched forward there. d2h_encode: its reply
    (device -> host, serialized). shared_write: the shared-memory path's stand-in for
    encode + decode + h2d (gather into a device block, synchronised). combine: the workers'
    answers (pair outputs or partial sums) into the output. What an end-to-end time adds
    beyond these is gRPC, scheduling and Python.
    """
    gate, engines = ref.engine.gates[layer], ref.workers.engines
    r = gate(x)
    W = len(engines)
    slices = dispatch(r, ref.engine.owners(layer, x.device), W)
    sl = max(slices, key=lambda s: s.token_index.numel())
    engine = engines[sl.worker]
    device = engine.devices[0]
    pairs = {"pair_token": sl.pair_token, "pair_expert": sl.pair_expert}
    pairs["pair_weight"] = sl.pair_weight
    rows = x[sl.token_index]
    per_pair = ref.workers.pair_outputs
    request = serialize(pb.ForwardRequest(layer=layer), {"hidden": rows, **pairs})
    hidden = tensor_from_pb(parse(pb.ForwardRequest, request).hidden, "hidden")
    on_device = hidden.to(device)
    token, expert, weight = (t.cpu() for t in (sl.pair_token, sl.pair_expert, sl.pair_weight))

    def experts() -> torch.Tensor:
        return engine.forward(
            layer, on_device, token, expert, weight, out_device=device, pairs=per_pair
        )

    out = experts()
    answers = [  # each worker's answer: pair outputs or partial sums
        torch.zeros(
            (s.pair_expert if per_pair else s.token_index).numel(),
            x.shape[1],
            dtype=x.dtype,
            device=x.device,
        )
        for s in slices
    ]

    def combined() -> torch.Tensor:
        if per_pair:
            return combine_pairs(r.weights, x.shape[1], slices, answers, x.device)
        return combine(x.shape[0], x.shape[1], slices, answers, x.device)

    block = torch.empty_like(rows)
    index = sl.token_index.to(x.device)

    def shared_write() -> None:
        torch.index_select(x, 0, index, out=block)
        _sync()

    steps: dict[str, Callable[[], object]] = {
        "gate": lambda: gate(x),
        "dispatch": lambda: dispatch(r, ref.engine.owners(layer, x.device), W),
        "encode": lambda: serialize(pb.ForwardRequest(layer=layer), {"hidden": rows, **pairs}),
        "decode": lambda: tensor_from_pb(parse(pb.ForwardRequest, request).hidden, "hidden"),
        "h2d": lambda: hidden.to(device),
        "experts": experts,
        "d2h_encode": lambda: serialize(pb.ForwardResponse(), {"output": out}),
        "shared_write": shared_write,
        "combine": combined,
    }
    return {name: time_calls(fn, iters, 2)["p50_ms"] for name, fn in steps.items()}


# (metric, process) whose _sum/_count the bench reads around each T: the master's time per
# request, its time per worker call, and each worker's time per batched forward.
_SERVER_METRICS = (
    ("moe_serve_request_seconds", "master"),
    ("moe_serve_worker_rpc_seconds", "master"),
    ("moe_serve_worker_forward_seconds", "worker"),
    ("moe_serve_master_batch_requests", "master"),
    ("moe_serve_worker_batch_tokens", "worker"),
)


def server_seconds(cfg: WorldConfig) -> dict[str, tuple[float, float]]:
    """(sum, count) of the servers' latency histograms, scraped from their exporters."""
    from prometheus_client.parser import text_string_to_metric_families

    # Each exporter binds its process's listen host (or metrics_host): dial that one.
    targets = [("master", cfg.master.metrics_port, cfg.master.metrics_bind_host)]
    targets += [(w.id, w.metrics_port, w.metrics_bind_host) for w in cfg.workers]
    out: dict[str, list[float]] = {}
    for process, port, host in targets:
        if port is None:
            continue
        with urllib.request.urlopen(local_url(host, port), timeout=10) as reply:
            text = reply.read().decode()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                for name, where in _SERVER_METRICS:
                    if (where == "master") != (process == "master"):
                        continue
                    for suffix, i in (("_sum", 0), ("_count", 1)):
                        if sample.name == name + suffix:
                            label = sample.labels.get(
                                "worker", "" if where == "master" else process
                            )
                            key = f"{name.removeprefix('moe_serve_')}[{label}]".replace("[]", "")
                            out.setdefault(key, [0.0, 0.0])[i] += sample.value
    return {k: (v[0], v[1]) for k, v in out.items()}


def _server_means(
    before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]]
) -> dict[str, float]:
    means = {}
    for key, (total, count) in after.items():
        total0, count0 = before.get(key, (0.0, 0.0))
        if count > count0:
            scale = 1e3 if "seconds" in key else 1.0  # latencies in ms, sizes as they are
            means[key] = (total - total0) / (count - count0) * scale
    return means


def flops_per_token(cfg: WorldConfig) -> float:
    """Multiply-adds x 2 of one token through the gate, its K experts and shared experts."""
    m = cfg.model
    per_expert = (3 if m.expert_kind == "glu" else 2) * 2 * m.hidden_size * m.expert_ffn_size
    shared = 3 * 2 * m.hidden_size * m.shared_expert_ffn_size
    return 2 * m.hidden_size * m.num_experts + m.top_k * per_expert + shared


def _row(name: str, T: int, t: dict[str, float], flops: float) -> dict[str, Any]:
    t = dict(t)
    t["tokens_per_s"] = T / (t["mean_ms"] / 1e3)
    t["tflops"] = flops * T / (t["mean_ms"] / 1e3) / 1e12
    print(
        f"  {name:26} T={T:<5} p50 {t['p50_ms']:8.3f} ms  p99 {t['p99_ms']:8.3f} ms  "
        f"{t['tokens_per_s']:12,.0f} tok/s  {t['tflops']:7.3f} TFLOP/s",
        flush=True,
    )
    return {"system": name, "tokens": T, **t}


def concurrency_sweep(
    address: str,
    hidden: int,
    device: str,
    clients: Sequence[int],
    seconds: float,
    cfg: WorldConfig | None = None,
) -> tuple[dict[int, float], dict[int, dict[str, float]]]:
    """Aggregate tokens/s of n concurrent clients each sending T=1 for `seconds`, and with
    `cfg`, the mean batch sizes the servers' metrics saw meanwhile: Infer calls per master
    batch (`master_batch_requests`), tokens per worker batch (`worker_batch_tokens[w]`)."""

    async def run(n: int) -> float:
        x = torch.randn(1, hidden).to(device)  # host RNG, as for the T sweep's inputs
        token = load_token(cfg.security) if cfg is not None else None
        tls = ClientTLS.from_config(cfg.security.tls) if cfg is not None else None
        conns = [AsyncMoEClient(address, token=token, tls=tls) for _ in range(n)]
        done = 0

        async def one(c: AsyncMoEClient) -> None:
            nonlocal done
            end = time.perf_counter() + seconds
            while time.perf_counter() < end:
                await c.infer(x)
                done += 1

        try:
            await asyncio.gather(*(c.infer(x) for c in conns))  # connect and warm up
            t0 = time.perf_counter()
            await asyncio.gather(*(one(c) for c in conns))
            return done / (time.perf_counter() - t0)
        finally:
            await asyncio.gather(*(c.close() for c in conns))

    out, batches = {}, {}
    for n in clients:
        before = server_seconds(cfg) if cfg is not None else {}
        out[n] = asyncio.run(run(n))
        line = f"  clients={n:<3} {out[n]:10,.0f} tok/s"
        if cfg is not None:
            means = _server_means(before, server_seconds(cfg))
            batches[n] = {k: v for k, v in means.items() if "batch" in k}
            line += "   mean batch: " + ", ".join(f"{k} {v:.1f}" for k, v in batches[n].items())
        print(line, flush=True)
    return out, batches


# The empty unary call each hop is measured against: the standard health Check (service
# ""), served on every moe_serve server by grpcio's own HealthServicer. Of the calls every
# server answers it does the least: a dict lookup and a 2-byte reply, and it skips the token
# check and the drain counter (auth.OPEN_PREFIXES); GetInfo builds a message per worker and
# layer. What a hop costs above it is moe_serve's own handling.
EMPTY_CALL = "grpc.health.v1.Health/Check"


def hop_overhead(
    cfg: WorldConfig,
    master_address: str,
    worker_address: str,
    worker_id: str,
    layer: int,
    iters: int = 200,
    warmup: int = 20,
) -> dict[str, Any]:
    """p50 ms at T=1 of each hop and of the empty unary call (EMPTY_CALL) against the same
    server processes, one blocking channel per server as the SDK uses, timed interleaved.

    `worker_forward_p50_ms`: a Forward of one token with min(top_k, held) pairs sent straight
    to worker `worker_id` (bytes, no shared memory, as the master sends a T=1 slice).
    `master_infer_p50_ms`: an Infer of one token through the SDK (client -> master ->
    workers -> back). The master's own hop is the Infer less one worker hop (the master
    calls its workers concurrently: one hop's time is what they add);
    `*_hop_overhead_ms` = hop time - empty call on that server.
    """
    m = cfg.model
    dtype = DTYPE_NAMES[m.dtype]
    opts = message_options(1 << 24)
    tls = ClientTLS.from_config(cfg.security.tls)
    held = cfg.worker(worker_id).experts_on(layer)[: m.top_k]
    x = torch.randn(1, m.hidden_size).to(cfg.master.device, dtype)  # host RNG (see run)
    forward_request = serialize(
        pb.ForwardRequest(layer=layer),
        {
            "hidden": x.cpu(),
            "pair_token": torch.zeros(len(held), dtype=torch.int32),
            "pair_expert": torch.tensor(held, dtype=torch.int32),
            "pair_weight": torch.full((len(held),), 1.0 / len(held)),
        },
    )
    worker_md = metadata(load_worker_token(cfg.security))
    empty = health_pb2.HealthCheckRequest()
    with (
        channel(master_address, tls, opts) as to_master,
        channel(worker_address, tls, opts) as to_worker,
        MoEClient(master_address, token=load_token(cfg.security), tls=tls) as client,
    ):
        master_check = health_pb2_grpc.HealthStub(to_master).Check
        worker_check = health_pb2_grpc.HealthStub(to_worker).Check
        forward = unary_call(to_worker, "ExpertWorker", "Forward", pb.ForwardResponse)
        calls: dict[str, Callable[[], object]] = {
            "master_empty": lambda: master_check(empty, timeout=30),
            "worker_empty": lambda: worker_check(empty, timeout=30),
            "worker_forward": lambda: forward(forward_request, timeout=30, metadata=worker_md),
            "master_infer": lambda: client.infer(x, layer),
        }
        samples: dict[str, list[float]] = {name: [] for name in calls}
        for i in range(warmup + iters):
            # Interleaved, one call of each per round: drifts in load hit all four alike.
            for name, fn in calls.items():
                t0 = time.perf_counter()
                fn()
                if i >= warmup:
                    samples[name].append((time.perf_counter() - t0) * 1e3)
    p50 = {name: statistics.median(v) for name, v in samples.items()}
    master_hop = p50["master_infer"] - p50["worker_forward"]
    return {
        "empty_call": EMPTY_CALL,
        "master_empty_p50_ms": p50["master_empty"],
        "worker_empty_p50_ms": p50["worker_empty"],
        "worker_forward_p50_ms": p50["worker_forward"],
        "master_infer_p50_ms": p50["master_infer"],
        "worker_hop_overhead_ms": p50["worker_forward"] - p50["worker_empty"],
        "master_hop_ms": master_hop,
        "master_hop_overhead_ms": master_hop - p50["master_empty"],
    }


def print_hops(h: dict[str, Any]) -> None:
    """The per-hop table: each hop, the empty call against the same server, the difference."""
    print(f"  per-hop at T=1 (p50 ms; empty call: {h['empty_call']})", flush=True)
    print(f"    {'hop':8} {'hop time':>9} {'empty call':>11} {'overhead':>9}", flush=True)
    for hop, time_key in (("worker", "worker_forward_p50_ms"), ("master", "master_hop_ms")):
        print(
            f"    {hop:8} {h[time_key]:9.3f} {h[f'{hop}_empty_p50_ms']:11.3f} "
            f"{h[f'{hop}_hop_overhead_ms']:9.3f}",
            flush=True,
        )
    print(f"    (Infer through the SDK: {h['master_infer_p50_ms']:.3f})", flush=True)


def wire_gbps(device: str, iters: int = 10) -> dict[str, float]:
    """A 4096 x 4096 bfloat16 tensor on `device` through wire.py, in GB/s of tensor bytes.

    `encode_decode`: serialize into message bytes (device -> host included) and parse
    them back into a tensor, as master and worker do per call; `to_device`: the same plus
    the decoded tensor's copy back to `device`.
    """
    t = torch.randn(4096, 4096).to(device, torch.bfloat16)  # host RNG, as for the T sweep's inputs
    nbytes = t.numel() * t.element_size()

    def round_trip() -> torch.Tensor:
        data = serialize(pb.ForwardResponse(), {"output": t})
        return tensor_from_pb(parse(pb.ForwardResponse, data).output, "output")

    out = {}
    for name, fn in (("encode_decode", round_trip), ("to_device", lambda: round_trip().to(device))):
        timing = time_calls(fn, iters, 2)
        out[name] = nbytes / (timing["p50_ms"] / 1e3) / 1e9
    return out


def _torch_rpc(cfg: WorldConfig, layer: int, tokens: Sequence[int], iters: int) -> Any:
    # Imported here: torch.distributed.rpc costs ~1 s to import and only this baseline uses it.
    from moe_serve.tools.rpc_baseline import measure_torch_rpc

    return measure_torch_rpc(cfg, layer, list(tokens), iters)


def device_info() -> dict[str, Any]:
    """GPU names and count, torch/CUDA versions, host."""
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return {
        "gpus": [torch.cuda.get_device_name(i) for i in range(n)],
        "gpu_count": n,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "host_cpus": os.cpu_count(),
    }


def run(
    config_path: Path,
    cfg: WorldConfig,
    json_path: Path | None,
    plot_path: Path | None,
    tokens: Sequence[int] = TOKENS,
    clients: Sequence[int] = CLIENTS,
    iters: int = 20,
    seconds: float = 2.0,
) -> dict[str, Any]:
    """The whole benchmark; returns (and writes) the result document."""
    keep_large_allocations()  # as master and workers do: the SDK side builds big messages too
    layer, dtype = cfg.model.moe_layers[0], DTYPE_NAMES[cfg.model.dtype]
    flops, H = flops_per_token(cfg), cfg.model.hidden_size
    rows: list[dict[str, Any]] = []
    print(
        f"moe-serve bench: layer {layer}, H={H}, F={cfg.model.expert_ffn_size}, "
        f"E={cfg.model.num_experts}, K={cfg.model.top_k}, {cfg.model.dtype}",
        flush=True,
    )
    # Inputs come from the host RNG: once the in-process engines have captured CUDA graphs,
    # torch 2.11's CUDA generator refuses to advance outside a capture in this process.
    xs = {T: torch.randn(T, H).to(cfg.master.device, dtype) for T in tokens}
    print("(a) in-process", flush=True)
    in_process, stages = _in_process(cfg, xs, layer, iters, flops)
    rows += in_process
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # hand the in-process experts' memory back to the workers
    print("(b) moe_serve", flush=True)
    with tempfile.NamedTemporaryFile(
        "w", prefix="moe-serve-bench-", suffix=".log", delete=False
    ) as log:
        print(f"    (master and worker logs: {log.name})", flush=True)
        cluster = LocalCluster(config_path, cfg, log=log, verbose=False)
        try:
            cluster.start()
            with MoEClient(
                cluster.master_address,
                token=load_token(cfg.security),
                tls=ClientTLS.from_config(cfg.security.tls),
            ) as client:
                for T, x in xs.items():
                    client.infer(x, layer=layer)  # warm up before the metrics snapshot
                    before = server_seconds(cfg)
                    timing = time_calls(functools.partial(client.infer, x, layer), iters, 0)
                    row = _row("moe_serve", T, timing, flops)
                    means = _server_means(before, server_seconds(cfg))
                    row["server_mean_ms"] = {k: v for k, v in means.items() if "seconds" in k}
                    print(
                        "    in the servers (mean ms): "
                        + ", ".join(f"{k} {v:.3f}" for k, v in row["server_mean_ms"].items()),
                        flush=True,
                    )
                    rows.append(row)
            print("    embedded master (gate here, one hop to the workers)", flush=True)
            with MoEClient.embedded(cfg) as client:
                for T, x in xs.items():
                    client.infer(x, layer=layer)
                    timing = time_calls(functools.partial(client.infer, x, layer), iters, 0)
                    rows.append(_row("moe_serve_embedded", T, timing, flops))
            w0 = cfg.workers[0]
            hops = hop_overhead(
                cfg, cluster.master_address, cluster.child_address(f"worker {w0.id}"), w0.id, layer
            )
            print_hops(hops)
            print("    concurrency sweep at T=1", flush=True)
            sweep, batches = concurrency_sweep(
                cluster.master_address, H, cfg.master.device, clients, seconds, cfg
            )
        finally:
            cluster.stop()
    print("(c) torch.distributed.rpc", flush=True)
    rpc = _torch_rpc(cfg, layer, tokens, iters)
    for T, t in (rpc or {}).items():
        rows.append(
            _row("torch_rpc", int(T), {k: t[k] for k in ("p50_ms", "p99_ms", "mean_ms")}, flops)
        )
    wire = wire_gbps(cfg.master.device)
    gbps = wire["encode_decode"]
    print(
        f"wire: 4096x4096 bfloat16 on {cfg.master.device}: encode+decode {gbps:.2f} GB/s, "
        f"with the copy back to the device {wire['to_device']:.2f} GB/s",
        flush=True,
    )
    result = {
        "device": device_info(),
        "config": cfg.model_dump(mode="json", warnings=False),
        "rows": rows,
        "concurrency": {str(n): v for n, v in sweep.items()},
        "concurrency_batches": {str(n): v for n, v in batches.items()},
        "wire_gbps": wire,
        "stages_ms": stages,
        "hop_overhead": hops,
        "summary": _summary(rows, sweep, gbps, hops),
        "command": " ".join(sys.argv),
    }
    print(json.dumps(result["summary"], indent=1), flush=True)
    if json_path:
        json_path.write_text(json.dumps(result, indent=1))
    if plot_path:
        _plot(rows, sweep, plot_path)
    return result


def _summary(
    rows: list[dict[str, Any]], sweep: dict[int, float], gbps: float, hops: dict[str, Any]
) -> dict[str, Any]:
    def at(system: str, T: int, key: str = "p50_ms") -> float | None:
        return next((r[key] for r in rows if r["system"] == system and r["tokens"] == T), None)

    def fastest_in_process(T: int) -> float | None:
        times = [t for s in IN_PROCESS if (t := at(s, T)) is not None]
        return min(times) if times else None

    serve, inproc, rpc = at("moe_serve", 4096), fastest_in_process(4096), at("torch_rpc", 4096)
    t1_base = fastest_in_process(1)
    Ts = sorted({r["tokens"] for r in rows})
    return {
        # p50 of the batch-invariant grouped layer / the same layer without, per T.
        "invariance_cost": {
            str(T): (a / b)
            if (a := at("in-process-grouped", T)) and (b := at("in-process-grouped-variant", T))
            else None
            for T in Ts
        },
        "t4096_vs_inprocess": serve / inproc if serve and inproc else None,
        "t4096_speedup_vs_torch_rpc": rpc / serve if serve and rpc else None,
        "t1_p50_ms": at("moe_serve", 1),
        "t1_p99_ms": at("moe_serve", 1, "p99_ms"),
        "t1_embedded_p50_ms": at("moe_serve_embedded", 1),
        "t1_embedded_p99_ms": at("moe_serve_embedded", 1, "p99_ms"),
        "t1_inprocess_p50_ms": t1_base,
        "t4096_inprocess_p50_ms": inproc,
        "t4096_embedded_vs_inprocess": (
            e / inproc if (e := at("moe_serve_embedded", 4096)) and inproc else None
        ),
        "batching_gain_64": sweep[64] / sweep[1] if 64 in sweep and 1 in sweep else None,
        "wire_gbps": gbps,
        "empty_call_p50_ms": hops["master_empty_p50_ms"],
        "master_hop_overhead_ms": hops["master_hop_overhead_ms"],
        "worker_hop_overhead_ms": hops["worker_hop_overhead_ms"],
    }


def _plot(rows: list[dict[str, Any]], sweep: dict[int, float], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"(matplotlib is not installed: no plot at {path})")
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for system in (*IN_PROCESS, "moe_serve", "moe_serve_embedded", "torch_rpc"):
        pts = sorted((r["tokens"], r["p50_ms"]) for r in rows if r["system"] == system)
        if pts:
            a.plot(*zip(*pts, strict=True), marker="o", label=system)
    a.set(xscale="log", yscale="log", xlabel="tokens per request", ylabel="p50 latency (ms)")
    a.legend()
    b.plot(list(sweep), list(sweep.values()), marker="o")
    b.set(xscale="log", xlabel="concurrent clients (T=1)", ylabel="tokens/s")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
