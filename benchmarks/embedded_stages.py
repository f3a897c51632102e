"""Where one embedded-master layer call of one token spends its time, stage by stage.

    python benchmarks/embedded_stages.py --config deploy/examples/bench-mixtral-1gpu.yaml \\
        --out benchmarks/results/<dir>

Starts the config's workers (and master) like `moe-serve up`, builds an EmbeddedMaster in
this process and times 300 T=1 calls with the input on the GPU and in host memory. Each
engine stage is wrapped in a wall-clock timer (gate, dispatch, the worker call, fan-out,
combine; p50 in ms), and 20 calls run under torch.profiler (kernel launches, copies and
stream syncs per call: the tables land in <out>). The fastest in-process layer
(bench.GroupedMoE) at T=1 is timed first, as the baseline. Wrapping methods adds ~1 µs a
stage; the timers measure host time, which is what a T=1 call is made of.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from moe_serve.config import load_config  # noqa: E402
from moe_serve.master import engine as engine_module  # noqa: E402
from moe_serve.master.embedded import EmbeddedMaster  # noqa: E402
from moe_serve.tools.bench import GroupedMoE, time_calls  # noqa: E402
from moe_serve.tools.launcher import LocalCluster  # noqa: E402

STAGES: dict[str, list[float]] = {}


def timed(name: str, fn: Callable[..., Any], is_async: bool = False) -> Callable[..., Any]:
    """fn, recording each call's wall time (ms) under STAGES[name]."""
    if is_async:

        async def wrapped_async(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return await fn(*args, **kwargs)
            finally:
                STAGES.setdefault(name, []).append((time.perf_counter() - t0) * 1e3)

        return wrapped_async

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            STAGES.setdefault(name, []).append((time.perf_counter() - t0) * 1e3)

    return wrapped


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", type=Path, default=ROOT / "deploy/examples/bench-mixtral-1gpu.yaml")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--iters", type=int, default=300)
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    cfg = load_config(args.config)
    layer, H = cfg.model.moe_layers[0], cfg.model.hidden_size
    dtype = getattr(torch, cfg.model.dtype)
    result: dict[str, Any] = {"config": str(args.config)}
    grouped = GroupedMoE(cfg)
    x = torch.randn(1, H).to(cfg.master.device, dtype)
    result["grouped_t1"] = time_calls(functools.partial(grouped.forward, x, layer), args.iters, 20)
    del grouped
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    engine_cls = engine_module.MasterEngine
    engine_cls._gate = timed("gate", engine_cls._gate)  # type: ignore[method-assign]
    engine_cls._fan_out = timed("fan_out", engine_cls._fan_out, True)  # type: ignore[method-assign]
    engine_cls._combine = timed("combine", engine_cls._combine)  # type: ignore[method-assign]
    engine_module.dispatch = timed("dispatch", engine_module.dispatch)  # type: ignore[assignment]
    with (args.out / "embedded-stages-cluster.log").open("w") as log:
        cluster = LocalCluster(args.config, cfg, log=log, verbose=False)
        cluster.start()
        try:
            master = EmbeddedMaster(cfg)
            pool_cls = type(master.engine.pool)
            pool_cls.forward = timed("worker_call", pool_cls.forward, True)  # type: ignore[method-assign]
            for where in ("cuda", "cpu") if torch.cuda.is_available() else ("cpu",):
                x = torch.randn(1, H).to(where, dtype)

                def call(x: torch.Tensor = x) -> object:
                    return master.submit(x, layer).result()

                for _ in range(30):
                    call()
                STAGES.clear()
                result[f"embedded_{where}_t1"] = time_calls(call, args.iters, 0)
                result[f"stages_{where}"] = {k: statistics.median(v) for k, v in STAGES.items()}
                print(where, result[f"embedded_{where}_t1"], result[f"stages_{where}"], flush=True)
                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    for _ in range(20):
                        call()
                table = prof.key_averages().table(sort_by="count", row_limit=45)
                (args.out / f"embedded-t1-profile-{where}-input.txt").write_text(table)
            master.close()
        finally:
            cluster.stop()
    (args.out / "embedded-t1-stages.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
