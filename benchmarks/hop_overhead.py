"""Per-hop overhead at T=1: each hop's p50 less an empty unary call's against the same server.

Starts the quickstart world (deploy/examples/quickstart.yaml: H=512, F=2048, E=8, K=2,
float32, two CPU workers) on free loopback ports as real processes (LocalCluster, as
`moe-serve up` runs them) and times, interleaved: the health Check on the master and on a
worker (the empty call), a T=1 Forward sent straight to the worker, and a T=1 Infer through
the SDK. Then, in this process, what each hop computes: the worker's experts for that
Forward (WorkerEngine.forward) and the master's engine at T=1 with workers that answer at
once (gate, dispatch, combine): a hop's overhead less its compute is its handling.
Processes, not one process with in-process servers: in one process the client, the
master and both workers would share one GIL and one event loop, and each hop's time would
include the others' handling. About 15 s on a 2-core VM, most of it the three processes
importing torch.

    python benchmarks/hop_overhead.py [--config world.yaml] [--tiny] [--iters 300] [--json out.json]

`--tiny` shrinks the model to H=64, F=128 (the tests' size): at the quickstart's size a T=1
Forward reads 16 MB of float32 expert weights (~2 ms on a 2-core VM, and the two workers
contend for memory bandwidth), which buries the handling this measures.

On a GPU host, pass a config whose master and workers are on CUDA (the bench's own
`moe-serve bench` prints the same table, key `hop_overhead` in its JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from moe_serve.config import WorldConfig, load_config  # noqa: E402
from moe_serve.dtypes import DTYPE_NAMES  # noqa: E402
from moe_serve.layer.dispatch import WorkerSlice  # noqa: E402
from moe_serve.master.engine import MasterEngine  # noqa: E402
from moe_serve.metrics import MasterMetrics  # noqa: E402
from moe_serve.tools.bench import device_info, hop_overhead, print_hops, time_calls  # noqa: E402
from moe_serve.tools.demo import free_ports  # noqa: E402
from moe_serve.tools.launcher import LocalCluster  # noqa: E402
from moe_serve.weights import open_weights  # noqa: E402
from moe_serve.worker.engine import WorkerEngine  # noqa: E402

QUICKSTART = ROOT / "deploy" / "examples" / "quickstart.yaml"


def on_free_ports(doc: dict[str, Any]) -> dict[str, Any]:
    """`doc` with the master and every worker on free loopback ports, exporters off."""
    master, *rest = free_ports(1 + len(doc["workers"]))
    doc["master"].update(listen=f"127.0.0.1:{master}", metrics_port=None)
    for w, port in zip(doc["workers"], rest, strict=True):
        w.update(address=f"127.0.0.1:{port}", listen=f"127.0.0.1:{port}", metrics_port=None)
    return doc


class _Answered:
    """An ExpertPool whose workers answer at once with zeros: the master's engine alone."""

    def __init__(self, n: int, pair_outputs: bool) -> None:
        self.healthy, self.outstanding = [True] * n, [0] * n
        self.pair_outputs = pair_outputs  # answer one row per pair, as workers then do
        self.tls_failures: list[str | None] = [None] * n

    async def recheck(self, workers: list[int], timeout_s: float) -> None:
        """In-process workers are never marked down: nothing to ask again."""

    async def forward(
        self, layer: int, x: torch.Tensor, sl: WorkerSlice, timeout_s: float
    ) -> torch.Tensor:
        rows = (sl.pair_expert if self.pair_outputs else sl.token_index).shape[0]
        return torch.zeros(rows, x.shape[1], dtype=x.dtype, device=x.device)


def compute(cfg: WorldConfig, iters: int) -> dict[str, float]:
    """p50 ms at T=1 of the worker's experts (the Forward hop_overhead sends) and of the
    master's engine with workers that answer at once, in this process (one thread)."""
    import asyncio

    m, layer, w0 = cfg.model, cfg.model.moe_layers[0], cfg.workers[0]
    source = open_weights(m, cfg.routing)
    engine = WorkerEngine(m, w0, source)
    held = w0.experts_on(layer)[: m.top_k]
    x = torch.randn(1, m.hidden_size).to(DTYPE_NAMES[m.dtype])  # host RNG, as the bench
    token = torch.zeros(len(held), dtype=torch.int32)
    expert = torch.tensor(held, dtype=torch.int32)
    weight = torch.full((len(held),), 1.0 / len(held))
    experts = time_calls(lambda: engine.forward(layer, x, token, expert, weight), iters, 10)
    master = MasterEngine(
        cfg, _Answered(len(cfg.workers), m.batch_invariant), MasterMetrics(), source
    )
    loop = asyncio.new_event_loop()
    try:
        on_master = x.to(master.device)

        def gate_dispatch_combine() -> object:
            return loop.run_until_complete(master.forward(layer, [on_master]))

        gated = time_calls(gate_dispatch_combine, iters, 10)
    finally:
        loop.close()
    return {"worker_experts_p50_ms": experts["p50_ms"], "master_engine_p50_ms": gated["p50_ms"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=QUICKSTART)
    ap.add_argument("--tiny", action="store_true", help="H=64, F=128: handling, not experts")
    ap.add_argument("--iters", type=int, default=300)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    doc = on_free_ports(yaml.safe_load(args.config.read_text()))
    if args.tiny:
        doc["model"].update(hidden_size=64, expert_ffn_size=128)
    with tempfile.TemporaryDirectory(prefix="moe-serve-hops-") as tmp:
        path = Path(tmp) / "world.yaml"
        path.write_text(yaml.safe_dump(doc))
        cfg = load_config(path)
        layer, w0 = cfg.model.moe_layers[0], cfg.workers[0]
        start = time.perf_counter()
        with open(Path(tmp) / "servers.log", "w") as log:
            cluster = LocalCluster(path, cfg, log=log, verbose=False)
            cluster.start()
            try:
                hops = hop_overhead(
                    cfg,
                    cluster.master_address,
                    cluster.child_address(f"worker {w0.id}"),
                    w0.id,
                    layer,
                    iters=args.iters,
                )
            finally:
                cluster.stop()
    torch.set_num_threads(1)  # as the master runs (LocalCluster: one thread)
    work = compute(cfg, args.iters)
    print_hops(hops)
    print(
        f"  compute in-process (p50 ms): worker experts {work['worker_experts_p50_ms']:.3f}, "
        f"master engine {work['master_engine_p50_ms']:.3f}; handling above the empty call: "
        f"worker {hops['worker_hop_overhead_ms'] - work['worker_experts_p50_ms']:.3f}, "
        f"master {hops['master_hop_overhead_ms'] - work['master_engine_p50_ms']:.3f}"
    )
    result = {
        "hop_overhead": hops,
        "compute": work,
        "config": str(args.config),
        "tiny": args.tiny,
        "iters": args.iters,
        "load_avg_1m_at_end": os.getloadavg()[0],
        "seconds": time.perf_counter() - start,
        "device": device_info(),
        "command": " ".join(sys.argv),
    }
    print(json.dumps(result["hop_overhead"], indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
