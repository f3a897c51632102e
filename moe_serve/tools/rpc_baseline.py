"""The torch.distributed.rpc baseline, in the style of seed 004.

Rank 0 is the master: it holds the gate, and one RRef per routed expert, each living on
the rank of the worker that holds it in the world config (on that worker's first device).
A forward gates on the master, then calls every expert that has tokens with rpc_async,
sending that expert's token slice: a token picked by k experts travels k times, as in the
seed. Tensors travel on the CPU and move to the expert's device inside the remote call,
as the seed does (TensorPipe device maps would need every rank's devices declared up front).

    python -m moe_serve.tools.rpc_baseline --config deploy/examples/quickstart.yaml \
        --tokens 1 8 64 --iters 20
"""

from __future__ import annotations

import argparse
import socket
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed.rpc as rpc
import torch.multiprocessing as mp

from moe_serve.config import ModelConfig, RoutingConfig, WorldConfig
from moe_serve.dtypes import DTYPE_NAMES
from moe_serve.layer.experts import expert_forward
from moe_serve.layer.gating import Gate
from moe_serve.layer.reference import ReferenceMoE
from moe_serve.weights import open_weights

JOIN_TIMEOUT_S = 300.0


class RemoteExpert:
    """One routed expert, built on the rank that owns it."""

    def __init__(self, model: dict, routing: dict, layer: int, expert: int, device: str) -> None:
        m = ModelConfig.model_validate(model)
        w = open_weights(m, RoutingConfig.model_validate(routing)).experts(layer, [expert])[0]
        self.device, self.kind, self.activation = torch.device(device), m.expert_kind, m.activation
        self.weights = {k: v.to(self.device, DTYPE_NAMES[m.dtype]) for k, v in w.items()}

    @torch.inference_mode()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = expert_forward(self.kind, self.activation, self.weights, x.to(self.device))
        return y.cpu()


def _options(port: int) -> rpc.TensorPipeRpcBackendOptions:
    return rpc.TensorPipeRpcBackendOptions(
        init_method=f"tcp://127.0.0.1:{port}", num_worker_threads=32, rpc_timeout=120
    )


def _rank(rank: int, world: int, port: int, job: dict, results: Any) -> None:
    if rank > 0:  # a worker: serve RRef calls until the master shuts down
        rpc.init_rpc(
            f"worker{rank}", rank=rank, world_size=world, rpc_backend_options=_options(port)
        )
        rpc.shutdown()
        return
    rpc.init_rpc("master", rank=0, world_size=world, rpc_backend_options=_options(port))
    try:
        results.put(_master(job))
    except Exception as exc:  # reported to the parent, which raises it
        results.put({"error": repr(exc)})
    finally:
        rpc.shutdown()


class _SeedStyleMoE:
    """Master side: the gate and an RRef per expert."""

    def __init__(self, job: dict) -> None:
        m, r = (
            ModelConfig.model_validate(job["model"]),
            RoutingConfig.model_validate(job["routing"]),
        )
        self.device, self.dtype = torch.device(job["master_device"]), DTYPE_NAMES[m.dtype]
        self.gate = Gate.load(open_weights(m, r), job["layer"], m.top_k, r, self.device, self.dtype)
        self.experts = {
            e: rpc.remote(
                f"worker{rank}",
                RemoteExpert,
                args=(job["model"], job["routing"], job["layer"], e, device),
            )
            for e, (rank, device) in job["owners"].items()
        }

    @torch.inference_mode()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.gate(x)
        out = torch.zeros(x.shape, dtype=torch.float32, device=self.device)
        calls = []
        for e, rref in self.experts.items():  # the seed's loop over experts
            t, k = ((r.expert_ids == e) & r.kept).nonzero(as_tuple=True)
            if t.numel():
                calls.append((t, k, rref.rpc_async().forward(x[t].cpu())))
        for t, k, fut in calls:
            y = fut.wait().to(self.device)
            out.index_add_(0, t, y.float() * r.weights[t, k].unsqueeze(1))
        return out.to(self.dtype)


def _master(job: dict) -> dict:
    moe = _SeedStyleMoE(job)
    m, sync = ModelConfig.model_validate(job["model"]), torch.cuda.is_available()
    ref = ReferenceMoE(m, RoutingConfig.model_validate(job["routing"]), job["master_device"])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, m.hidden_size, generator=g).to(job["master_device"], moe.dtype)
    expected, _ = ref.forward(x, job["layer"])
    err = ((moe.forward(x).float() - expected.float()).norm() / expected.float().norm()).item()
    if err > (1e-4 if m.dtype == "float32" else 2e-2):
        raise AssertionError(f"torch.rpc baseline differs from the reference: rel error {err:.2e}")
    del ref
    out = {}
    for T in job["tokens"]:
        xt = torch.randn(T, m.hidden_size, generator=g).to(job["master_device"], moe.dtype)
        for _ in range(job["warmup"]):
            moe.forward(xt)
        samples = []
        for _ in range(job["iters"]):
            t0 = time.perf_counter()
            moe.forward(xt)
            if sync:
                torch.cuda.synchronize()
            samples.append((time.perf_counter() - t0) * 1e3)
        q = statistics.quantiles(samples, n=100, method="inclusive")
        mean = statistics.fmean(samples)
        out[T] = {
            "p50_ms": statistics.median(samples),
            "p99_ms": q[-1],
            "mean_ms": mean,
            "tokens_per_s": T / (mean / 1e3),
        }
    return out


def measure_torch_rpc(
    cfg: WorldConfig,
    layer: int,
    tokens: Sequence[int],
    iters: int,
    warmup: int = 3,
    master_port: int | None = None,
) -> dict[int, dict[str, float]]:
    """Time the seed-004-style forward of `layer` for each T; {T: p50/p99/mean ms, tokens/s}.

    Checks once that its output equals ReferenceMoE (relative Frobenius error 1e-4 in
    float32, 2e-2 otherwise) and raises if not. Every rank is stopped before returning.
    """
    if iters < 2:
        raise ValueError(f"iters: expected >= 2, got {iters}")
    owners: dict[int, tuple[int, str]] = {}  # expert -> (rank, device)
    for rank, w in enumerate(cfg.workers, start=1):
        for e in w.experts_on(layer):
            owners.setdefault(e, (rank, w.devices[0]))  # the first listing, as the master does
    job = {
        "model": cfg.model.model_dump(mode="json"),
        "routing": cfg.routing.model_dump(mode="json"),
        "layer": layer,
        "owners": owners,
        "master_device": cfg.master.device,
        "tokens": list(tokens),
        "iters": iters,
        "warmup": warmup,
    }
    port = master_port or _free_port()
    world = 1 + len(cfg.workers)
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, world, port, job, results)) for r in range(world)]
    for p in procs:
        p.start()
    try:
        result = results.get(timeout=JOIN_TIMEOUT_S)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
                p.join()
    if "error" in result:
        raise RuntimeError(f"torch.rpc baseline failed: {result['error']}")
    return result


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    from moe_serve.config import load_config

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, type=Path)
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 64, 512])
    p.add_argument("--iters", type=int, default=20)
    args = p.parse_args()
    cfg = load_config(args.config)
    for T, t in measure_torch_rpc(cfg, cfg.model.moe_layers[0], args.tokens, args.iters).items():
        print(
            f"T={T:<5} p50 {t['p50_ms']:8.3f} ms  p99 {t['p99_ms']:8.3f} ms  "
            f"{t['tokens_per_s']:12,.0f} tok/s"
        )


if __name__ == "__main__":
    main()
