"""What TLS costs: the same cluster served plaintext, with TLS and with mutual TLS, one run.

Starts a master and two CPU workers three times (certificates from
scripts/gen_test_certs.sh), with shared memory off so that every tensor crosses gRPC (and so
TLS), and times Infer calls at several sizes. Reports p50 per mode and the ratio to the
plaintext run of the same process.

    python benchmarks/tls_overhead.py --json benchmarks/results/tls-overhead.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from moe_serve.client import ClientTLS, MoEClient  # noqa: E402
from moe_serve.config import load_config  # noqa: E402
from moe_serve.tools.demo import free_ports  # noqa: E402
from moe_serve.tools.launcher import LocalCluster  # noqa: E402


def world(certs: Path, mode: str) -> dict[str, Any]:
    master, mm, *rest = free_ports(6)
    tls = {
        "cert": str(certs / "server.pem"),
        "key": str(certs / "server.key"),
        "ca": str(certs / "ca.pem"),
        "client_auth": mode == "mtls",
    }
    return {
        "model": {"hidden_size": 1024, "expert_ffn_size": 2048, "num_experts": 8, "top_k": 2},
        "master": {"listen": f"127.0.0.1:{master}", "metrics_port": mm, "shared_memory_bytes": 0},
        "security": {} if mode == "plaintext" else {"tls": tls},
        "workers": [
            {
                "id": f"w{i}",
                "address": f"127.0.0.1:{rest[2 * i]}",
                "metrics_port": rest[2 * i + 1],
                "experts": [4 * i + e for e in range(4)],
            }
            for i in range(2)
        ],
    }


def measure(path: Path, certs: Path, mode: str, tokens: list[int], iters: int) -> dict:
    cfg = load_config(path)
    tls = None
    if mode != "plaintext":
        cert = {"cert": certs / "client.pem", "key": certs / "client.key"}
        tls = ClientTLS(ca=certs / "ca.pem", **(cert if mode == "mtls" else {}))
    with open(path.parent / f"{mode}.log", "w") as log:
        cluster = LocalCluster(path, cfg, log=log, verbose=False)
        cluster.start()
        try:
            out = {}
            with MoEClient(cluster.master_address, tls=tls, shared_memory_bytes=0) as client:
                for T in tokens:
                    x = torch.randn(T, cfg.model.hidden_size)
                    for _ in range(3):
                        client.infer(x)  # warm up: connection, handshake, allocations
                    times = []
                    for _ in range(iters):
                        start = time.perf_counter()
                        client.infer(x)
                        times.append((time.perf_counter() - start) * 1e3)
                    times.sort()
                    out[str(T)] = {"p50_ms": times[len(times) // 2], "min_ms": times[0]}
            return out
        finally:
            cluster.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 64, 1024])
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        certs = Path(tmp) / "certs"
        script = ROOT / "scripts" / "gen_test_certs.sh"
        subprocess.run(["bash", str(script), str(certs)], check=True, capture_output=True)
        results = {}
        for mode in ("plaintext", "tls", "mtls"):
            path = Path(tmp) / f"{mode}.yaml"
            path.write_text(yaml.safe_dump(world(certs, mode)))
            results[mode] = measure(path, certs, mode, args.tokens, args.iters)
            print(mode, json.dumps(results[mode]), flush=True)
    ratios = {
        mode: {T: results[mode][T]["p50_ms"] / results["plaintext"][T]["p50_ms"] for T in r}
        for mode, r in results.items()
        if mode != "plaintext"
    }
    summary = {"p50_ratio_vs_plaintext": ratios, "iters": args.iters, "results": results}
    print(json.dumps(ratios, indent=1))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
