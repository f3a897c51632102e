"""`moe-serve demo`: a synthetic model, master + 2 workers on this machine, checked and timed.

Writes a world config to a temp dir, starts the cluster on free loopback ports,
sends requests through the SDK, compares every output with the in-process
reference, prints latency and throughput, and stops everything.
"""

from __future__ import annotations

import socket
import statistics
import tempfile
import time
from pathlib import Path

import torch
import yaml

from moe_serve.client import MoEClient
from moe_serve.config import WorldConfig, load_config
from moe_serve.layer.reference import ReferenceMoE
from moe_serve.tools.launcher import LocalCluster
from moe_serve.transport.auth import load_token

TOLERANCE = {"cpu": 1e-5, "cuda": 1e-4}  # fp32; GPU kernels sum in a different order
PARITY_TOKENS = (1, 7, 64, 256)


def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on 127.0.0.1 (bound, read, released)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def demo_config(devices: str) -> dict:
    """The demo's world config: 8 experts split over two workers, two MoE layers."""
    master, master_metrics, p0, m0, p1, m1 = free_ports(6)
    if devices == "cuda":
        n = torch.cuda.device_count()
        dev0, dev1 = "cuda:0", f"cuda:{1 % max(n, 1)}"
    else:
        dev0 = dev1 = "cpu"
    return {
        "model": {
            "hidden_size": 256,
            "expert_ffn_size": 1024,
            "num_experts": 8,
            "top_k": 2,
            "expert_kind": "mlp",
            "activation": "gelu",
            "moe_layers": [0, 1],
            "dtype": "float32",
            "seed": 0,
        },
        "master": {"listen": f"127.0.0.1:{master}", "metrics_port": master_metrics, "device": dev0},
        "workers": [
            {
                "id": "w0",
                "address": f"127.0.0.1:{p0}",
                "metrics_port": m0,
                "devices": [dev0],
                "experts": [0, 1, 2, 3],
            },
            {
                "id": "w1",
                "address": f"127.0.0.1:{p1}",
                "metrics_port": m1,
                "devices": [dev1],
                "experts": [4, 5, 6, 7],
            },
        ],
    }


def _percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def run(devices: str = "cpu", requests: int = 200) -> int:
    """Run the demo; return the process exit code (0: parity held)."""
    if devices == "cuda" and not torch.cuda.is_available():
        print("moe-serve demo: --devices cuda asked for, but no CUDA device is visible")
        return 2
    with tempfile.TemporaryDirectory(prefix="moe-serve-demo-") as tmp:
        path = Path(tmp) / "world.yaml"
        path.write_text(yaml.safe_dump(demo_config(devices), sort_keys=False))
        cfg = load_config(path)
        print(f"moe-serve demo: world config at {path}")
        with open(Path(tmp) / "cluster.log", "w") as log:
            cluster = LocalCluster(path, cfg, log=log)
            try:
                cluster.start()
                return _exercise(cluster.master_address, cfg, devices, requests)
            finally:
                cluster.stop()


def _exercise(address: str, cfg: WorldConfig, devices: str, requests: int) -> int:
    m = cfg.model
    reference = ReferenceMoE(m, cfg.routing, device=cfg.master.device)
    g = torch.Generator().manual_seed(1234)
    with MoEClient(address, token=load_token(cfg.security)) as client:
        # 1) Parity with the in-process reference, every layer, several batch sizes.
        worst = 0.0
        for layer in m.moe_layers:
            for T in PARITY_TOKENS:
                x = torch.randn(T, m.hidden_size, generator=g)
                y = client.infer(x, layer=layer)
                expected, _ = reference.forward(x, layer)
                worst = max(worst, (y - expected.cpu()).abs().max().item())
        tol = TOLERANCE[devices]
        ok = worst <= tol
        print(
            f"parity: {'OK' if ok else 'FAILED'}: max abs error {worst:.3e} vs the in-process "
            f"reference over {len(m.moe_layers) * len(PARITY_TOKENS)} requests "
            f"(tolerance {tol:.0e})"
        )
        # 2) Decode-style latency: one token per request.
        x1 = torch.randn(1, m.hidden_size, generator=g)
        for _ in range(10):
            client.infer(x1)
        lat = []
        for _ in range(requests):
            t0 = time.perf_counter()
            client.infer(x1)
            lat.append((time.perf_counter() - t0) * 1e3)
        print(
            f"latency T=1: p50 {_percentile(lat, 50):.2f} ms, p99 {_percentile(lat, 99):.2f} ms "
            f"over {requests} requests"
        )
        # 3) Prefill-style throughput.
        xb = torch.randn(512, m.hidden_size, generator=g)
        client.infer(xb)
        n, t0 = 20, time.perf_counter()
        for _ in range(n):
            client.infer(xb)
        dt = time.perf_counter() - t0
        print(f"throughput T=512: {n * 512 / dt:,.0f} tokens/s ({dt / n * 1e3:.1f} ms per request)")
    return 0 if ok else 1
