"""The decode-speed goals in one run: every summary key of issue 14 against its goal.

    python benchmarks/goals.py --config deploy/examples/bench-mixtral-1gpu.yaml \\
        --out benchmarks/results/<date>-goals

Runs, one after the other on this machine (each step's output in <out>/<step>.log, its JSON
in <out>/<step>.json):

1. `moe-serve bench` on --config: the per-layer latencies (through a master and through the
   embedded master) against the fastest in-process layer, the per-hop overhead against an
   empty call, the concurrency sweep.
2. benchmarks/e2e_decode.py: greedy decoding of a transformers model at full width, tokens/s
   in-process (transformers' fastest expert implementation) against both served paths.
3. benchmarks/bytes_path.py: T=4096 payload GB/s with shared memory off against a raw TCP
   socket moving the same bytes on the same path.
4. benchmarks/fp8_dispatch.py: bytes per token on the activation hops with FP8 dispatch
   against the model dtype, with its accuracy gate.

Then <out>/summary.json: each goal key, its value, its goal and whether it is met, and where
each value came from. A step that fails is recorded (its error and log) and the others run.
"""

from __future__ import annotations

import argparse
import json
import operator
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

# key -> (comparison, goal): the table of issue 14.
GOALS: dict[str, tuple[str, float]] = {
    "t1_embedded_p50_ms": ("<=", 1.0),
    "t1_embedded_p99_ms": ("<=", 2.0),
    "t1_p50_ms": ("<=", 1.5),
    "t1_p99_ms": ("<=", 3.0),
    "e2e_decode_ratio_b1": (">=", 0.6),
    "e2e_decode_ratio_b32": (">=", 1.25),
    "bytes_path_vs_raw_tcp": (">=", 0.5),
    "t4096_vs_inprocess": ("<=", 1.25),
    "batching_gain_64": (">=", 20.0),
    "fp8_bytes_ratio": ("<=", 0.55),
}
_OPS: dict[str, Callable[[float, float], bool]] = {"<=": operator.le, ">=": operator.ge}


def step(name: str, argv: list[str], out: Path, timeout_s: float) -> dict[str, Any] | None:
    """Run one benchmark, its output teed to <out>/<name>.log; its JSON, or None on failure."""
    log_path = out / f"{name}.log"
    print(f"[{name}] {' '.join(argv)}", flush=True)
    t0 = time.monotonic()
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        assert proc.stdout is not None
        for line in proc.stdout:  # progress as it comes: these steps take minutes
            print(f"  {line}", end="", flush=True)
            log.write(line)
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = -9
    print(f"[{name}] exit {rc} after {time.monotonic() - t0:.0f} s", flush=True)
    path = out / f"{name}.json"
    if rc != 0 or not path.exists():
        return None
    doc: dict[str, Any] = json.loads(path.read_text())
    return doc


def collect(docs: dict[str, dict[str, Any] | None]) -> dict[str, tuple[float | None, str]]:
    """Each goal key's value and the document (and field) it came from."""
    got: dict[str, tuple[float | None, str]] = {}
    bench = (docs.get("bench") or {}).get("summary", {})
    for key in ("t1_embedded_p50_ms", "t1_embedded_p99_ms", "t1_p50_ms", "t1_p99_ms"):
        got[key] = (bench.get(key), f"bench.json summary.{key}")
    for key in ("t4096_vs_inprocess", "batching_gain_64"):
        got[key] = (bench.get(key), f"bench.json summary.{key}")
    speed = (docs.get("e2e") or {}).get("speed", {})
    for batch in ("1", "32"):
        ratio = speed.get(batch, {}).get("served_speed_vs_fastest_in_process", {}).get("embedded")
        got[f"e2e_decode_ratio_b{batch}"] = (
            ratio,
            f"e2e.json speed.{batch}.served_speed_vs_fastest_in_process.embedded",
        )
    b = (docs.get("bytes") or {}).get("summary", {})
    got["bytes_path_vs_raw_tcp"] = (b.get("bytes_path_vs_raw_tcp"), "bytes.json summary")
    fp8 = (docs.get("fp8") or {}).get("summary", {})
    ratio = fp8.get("fp8_bytes_ratio_bfloat16") if fp8.get("fp8_gate_passed") else None
    got["fp8_bytes_ratio"] = (ratio, "fp8.json summary (None unless the accuracy gate passed)")
    return got


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", type=Path, default=ROOT / "deploy/examples/bench-mixtral-1gpu.yaml")
    p.add_argument("--out", type=Path, required=True, help="directory for every JSON and log")
    p.add_argument("--e2e-layers", type=int, default=8)
    p.add_argument("--device", default="cuda", help="cuda or cpu (bytes path and FP8 steps)")
    p.add_argument(
        "--skip",
        nargs="*",
        default=[],
        choices=("bench", "e2e", "bytes", "fp8"),
        help="steps not to run; their JSON from an earlier run into --out is used if there",
    )
    p.add_argument("--step-timeout", type=float, default=1800.0, help="seconds per step")
    args = p.parse_args()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    fp8_device = "cuda:0" if args.device == "cuda" else args.device
    steps = {
        "bench": [py, "-m", "moe_serve", "bench", "--config", str(args.config),
                  "--json", str(out / "bench.json"), "--plot", str(out / "bench.png")],
        "e2e": [py, "benchmarks/e2e_decode.py", "--layers", str(args.e2e_layers),
                "--batch", "1", "32", "--new-tokens", "64", "--out", str(out / "e2e.json")],
        "bytes": [py, "benchmarks/bytes_path.py", "--device", args.device, "--tokens", "4096",
                  "--json", str(out / "bytes.json")],
        "fp8": [py, "benchmarks/fp8_dispatch.py", "--device", fp8_device, "--mixtral",
                "--out", str(out / "fp8.json")],
    }  # fmt: skip
    # A skipped step's JSON from an earlier run into the same --out is used as it is: the
    # steps of one run can be split over several calls (a device call lasts 10 minutes).
    docs = {
        name: step(name, argv, out, args.step_timeout)
        if name not in args.skip
        else (
            json.loads((out / f"{name}.json").read_text())
            if (out / f"{name}.json").exists()
            else None
        )
        for name, argv in steps.items()
    }
    rows = {}
    print(f"\n{'key':28} {'value':>10} {'goal':>10}  met", flush=True)
    for key, (value, source) in collect(docs).items():
        op, goal = GOALS[key]
        met = None if value is None else _OPS[op](value, goal)
        rows[key] = {"value": value, "goal": f"{op} {goal}", "met": met, "source": source}
        shown = "-" if value is None else f"{value:.3f}"
        print(f"{key:28} {shown:>10} {op + ' ' + str(goal):>10}  {met}", flush=True)
    summary = {
        "config": str(args.config),
        "goals": rows,
        "steps": {name: doc is not None for name, doc in docs.items()},
        "command": " ".join(sys.argv),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"wrote {out / 'summary.json'}", flush=True)
    return 0 if all(docs.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
