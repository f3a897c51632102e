"""What tracing costs: the same world with tracing off and on, one run, in one process.

Serves two clusters of the same synthetic model in this process (tests/support/cluster.py:
a master and two CPU workers each), one with tracing off (the default) and one recording
every span through an OpenTelemetry SDK BatchSpanProcessor into an exporter that drops them
(what a process pays before the network: spans made, ended and queued). Times Infer calls
through the master and through the embedded client, rounds of off and on interleaved, and
reports each p50 against tracing off in the same round. Also times the no-op stage span
that every stage pays when tracing is off.

    python benchmarks/tracing_overhead.py --json benchmarks/results/tracing-overhead.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import timeit
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from moe_serve.client import MoEClient  # noqa: E402
from moe_serve.tracing import NO_TRACING, from_provider  # noqa: E402
from tests.support.cluster import InProcessCluster, world  # noqa: E402

MODEL = {"hidden_size": 1024, "expert_ffn_size": 2048}


class Drop(SpanExporter):
    """Counts the spans and drops them."""

    def __init__(self) -> None:
        self.spans = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.spans += len(spans)
        return SpanExportResult.SUCCESS


def p50_ms(client: MoEClient, x: torch.Tensor, iters: int) -> float:
    for _ in range(iters // 10):  # warm-up
        client.infer(x)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        client.infer(x)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--iters", type=int, default=300, help="timed calls per point")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    dropped = Drop()
    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(dropped))
    off = InProcessCluster(world(model=MODEL))
    on = InProcessCluster(world(model=MODEL), tracer_provider=provider)
    points: dict[str, list[float]] = {}
    try:
        for _ in range(args.rounds):
            for t in args.tokens:
                x = torch.randn(t, MODEL["hidden_size"])
                with MoEClient(off.address) as c:
                    points.setdefault(f"t{t}_master_off_ms", []).append(p50_ms(c, x, args.iters))
                with MoEClient(on.address, tracer_provider=provider) as c:
                    points.setdefault(f"t{t}_master_on_ms", []).append(p50_ms(c, x, args.iters))
                with MoEClient.embedded(off.cfg) as c:
                    points.setdefault(f"t{t}_embedded_off_ms", []).append(p50_ms(c, x, args.iters))
                with MoEClient.embedded(on.cfg, tracer_provider=provider) as c:
                    points.setdefault(f"t{t}_embedded_on_ms", []).append(p50_ms(c, x, args.iters))
    finally:
        off.stop()
        on.stop()
    summary: dict[str, Any] = {k: round(statistics.median(v), 3) for k, v in points.items()}
    for t in args.tokens:
        for path in ("master", "embedded"):
            ratio = summary[f"t{t}_{path}_on_ms"] / summary[f"t{t}_{path}_off_ms"]
            summary[f"t{t}_{path}_on_vs_off"] = round(ratio, 3)
    n = 1_000_000
    empty = timeit.timeit("with span('stage'): pass", globals={"span": NO_TRACING.span}, number=n)
    summary["off_stage_span_ns"] = round(empty / n * 1e9)
    # What one span costs when on (made, ended, queued for export), and how many a call has:
    # their product is what tracing adds to a call, less noisy than the p50s on a busy host.
    calls = args.rounds * len(args.tokens) * 2 * (args.iters + args.iters // 10)
    summary["spans_per_call"] = round(dropped.spans / calls, 1)
    n = 100_000
    traced = from_provider(provider)
    spent = timeit.timeit("with span('stage'): pass", globals={"span": traced.span}, number=n)
    summary["on_span_us"] = round(spent / n * 1e6, 1)
    summary["on_added_per_call_us"] = round(summary["spans_per_call"] * spent / n * 1e6)
    result = {
        "what": "tracing off vs on (BatchSpanProcessor, dropping exporter), in-process cluster",
        "model": MODEL,
        "iters": args.iters,
        "rounds": {k: [round(v, 3) for v in vs] for k, vs in points.items()},
        "summary": summary,
    }
    provider.shutdown()
    print(json.dumps(summary, indent=2))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
