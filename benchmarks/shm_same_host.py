"""Same-host latency through the SDK: p50/p99 per request size, and which transport carried it.

Starts the config's master and workers (as `moe-serve up` does), sends requests from a
client on master.device, and reads the master's transport counters, so a run shows the
shared-memory path was taken. Run it once per source tree (PYTHONPATH=<tree>) and
alternate the trees on one machine to compare them (A/B/A/B): no other number is fair.

    python benchmarks/shm_same_host.py --config deploy/examples/bench-mixtral-1gpu.yaml \
        --tokens 1 4096 --iters 200 --label new --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch

from moe_serve.client import MoEClient
from moe_serve.config import load_config
from moe_serve.dtypes import DTYPE_NAMES
from moe_serve.tools.launcher import LocalCluster


def transports(port: int) -> dict[str, float]:
    """moe_serve_master_infer_transport_total and worker call counts by transport."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(
            ("moe_serve_master_infer_transport_total", "moe_serve_worker_calls_total")
        ):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 4096])
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--label", default="run")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    cfg = load_config(args.config)
    device = torch.device(cfg.master.device)
    dtype = DTYPE_NAMES[cfg.model.dtype]
    torch.manual_seed(0)
    xs = {T: torch.randn(T, cfg.model.hidden_size).to(device, dtype) for T in args.tokens}
    rows = []
    with tempfile.NamedTemporaryFile("w", suffix=".log", delete=False) as log:
        cluster = LocalCluster(args.config, cfg, log=log, verbose=False)
        try:
            cluster.start()
            with MoEClient(cluster.master_address) as client:
                for T, x in xs.items():
                    for _ in range(10):
                        client.infer(x)
                    before = transports(cfg.master.metrics_port)
                    samples = []
                    for _ in range(args.iters):
                        t0 = time.perf_counter()
                        client.infer(x)  # returns on x's device: synchronised
                        samples.append((time.perf_counter() - t0) * 1e3)
                    after = transports(cfg.master.metrics_port)
                    q = statistics.quantiles(samples, n=100, method="inclusive")
                    row = {
                        "label": args.label,
                        "tokens": T,
                        "p50_ms": statistics.median(samples),
                        "p99_ms": q[-1],
                        "mean_ms": statistics.fmean(samples),
                        "transport": {
                            k: after[k] - before.get(k, 0.0)
                            for k in after
                            if after[k] != before.get(k, 0.0)
                        },
                    }
                    rows.append(row)
                    print(json.dumps(row), flush=True)
        finally:
            cluster.stop()
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    sys.exit(main())
