"""`moe-serve bench`: one run measures every system and writes the summary keys."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml

from moe_serve.config import parse_config
from moe_serve.layer.reference import ReferenceMoE
from moe_serve.tools.bench import GroupedMoE, InProcessMoE, flops_per_token, hop_overhead
from moe_serve.tools.launcher import dial_address
from tests.conftest import world
from tests.support.cluster import InProcessCluster

SUMMARY_KEYS = {
    "t4096_vs_inprocess",
    "t4096_speedup_vs_torch_rpc",
    "t1_p50_ms",
    "t1_p99_ms",
    "batching_gain_64",
    "wire_gbps",
    "empty_call_p50_ms",
    "master_hop_overhead_ms",
    "worker_hop_overhead_ms",
    "invariance_cost",
    "t1_embedded_p50_ms",
    "t1_embedded_p99_ms",
    "t1_inprocess_p50_ms",
    "t4096_inprocess_p50_ms",
    "t4096_embedded_vs_inprocess",
}
SYSTEMS = (
    "in-process-grouped",
    "in-process-grouped-variant",
    "in-process",
    "moe_serve",
    "moe_serve_embedded",
    "torch_rpc",
)
HOP_KEYS = {
    "empty_call",
    "master_empty_p50_ms",
    "worker_empty_p50_ms",
    "worker_forward_p50_ms",
    "master_infer_p50_ms",
    "worker_hop_overhead_ms",
    "master_hop_ms",
    "master_hop_overhead_ms",
}


def test_in_process_path_equals_the_reference() -> None:
    cfg = parse_config(
        world(
            model={"moe_layers": [0, 3], "shared_expert_ffn_size": 32},
            workers=[
                {"experts": [0, 1, 2, 3]},
                {"experts": [4, 5, 6, 7], "devices": ["cpu", "cpu"]},
            ],
        )
    )
    x = torch.randn(50, 64, generator=torch.Generator().manual_seed(0))
    for layer in (0, 3):
        expected, _ = ReferenceMoE(cfg.model, cfg.routing).forward(x, layer)
        assert (InProcessMoE(cfg).forward(x, layer) - expected).abs().max().item() <= 1e-6


def test_grouped_baseline_equals_the_reference() -> None:
    """The fastest in-process layer computes the same layer (shared experts included)."""
    cfg = parse_config(world(model={"moe_layers": [0, 3], "shared_expert_ffn_size": 32}))
    x = torch.randn(50, 64, generator=torch.Generator().manual_seed(0))
    grouped = GroupedMoE(cfg)
    for layer in (0, 3):
        expected, _ = ReferenceMoE(cfg.model, cfg.routing).forward(x, layer)
        assert (grouped.forward(x, layer) - expected).abs().max().item() <= 1e-6


def test_flops_per_token_counts_gate_k_experts_and_shared() -> None:
    cfg = parse_config(world(model={"expert_kind": "glu", "shared_expert_ffn_size": 32}))
    H, F, E, K = 64, 128, 8, 2
    assert flops_per_token(cfg) == 2 * H * E + K * 3 * 2 * H * F + 3 * 2 * H * 32


def test_hop_overhead_is_each_hop_less_the_empty_call_on_the_same_server(
    in_process_factory: Callable[..., InProcessCluster],
) -> None:
    c = in_process_factory(world())
    w0 = c.cfg.workers[0]

    def count(url: str, name: str, label: str) -> float:
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        return sum(
            float(x.split()[-1])
            for x in text.splitlines()
            if x.startswith(name + "{") and label in x
        )

    def direct_forwards() -> float:
        """Forward calls w0 served OK less those the master sent it (for the Infer calls)."""
        served = count(c.metrics_url("w0"), "moe_serve_worker_requests_total", 'code="OK"')
        return served - count(c.metrics_url(), "moe_serve_worker_calls_total", 'worker="w0"')

    before = direct_forwards()
    h = hop_overhead(c.cfg, c.address, dial_address(w0.address), "w0", 0, iters=5, warmup=1)
    assert set(h) == HOP_KEYS and h["empty_call"] == "grpc.health.v1.Health/Check"
    # Six Forward calls (1 warm-up + 5) went straight to w0 and each was served.
    assert direct_forwards() - before == 6
    assert h["worker_hop_overhead_ms"] == h["worker_forward_p50_ms"] - h["worker_empty_p50_ms"]
    assert h["master_hop_ms"] == h["master_infer_p50_ms"] - h["worker_forward_p50_ms"]
    assert h["master_hop_overhead_ms"] == h["master_hop_ms"] - h["master_empty_p50_ms"]
    assert min(h[k] for k in HOP_KEYS if k.endswith("p50_ms")) > 0


@pytest.mark.e2e
def test_bench_writes_every_system_and_exactly_the_summary_keys(tmp_path: Path) -> None:
    path = tmp_path / "world.yaml"
    path.write_text(yaml.safe_dump(world()))
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "moe_serve",
            "bench",
            "--config",
            str(path),
            "--json",
            str(out),
            "--tokens",
            "1",
            "8",
            "--clients",
            "1",
            "2",
            "--iters",
            "3",
            "--seconds",
            "0.3",
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    doc = json.loads(out.read_text())
    assert set(doc["summary"]) == SUMMARY_KEYS
    assert set(doc["hop_overhead"]) == HOP_KEYS
    assert doc["summary"]["empty_call_p50_ms"] == doc["hop_overhead"]["master_empty_p50_ms"]
    assert "per-hop at T=1" in result.stdout
    assert doc["summary"]["t1_p50_ms"] > 0 and doc["summary"]["wire_gbps"] > 0
    systems = {(r["system"], r["tokens"]) for r in doc["rows"]}
    assert systems == {(s, t) for s in SYSTEMS for t in (1, 8)}
    assert set(doc["concurrency"]) == {"1", "2"}
    assert {"gpus", "gpu_count", "torch", "cuda"} <= set(doc["device"])
    assert set(doc["stages_ms"]) == {"1", "8"}
    assert set(doc["summary"]["invariance_cost"]) == {"1", "8"}
    assert all(v > 0 for v in doc["summary"]["invariance_cost"].values())
    assert {"gate", "dispatch", "experts", "combine"} <= set(doc["stages_ms"]["8"])
    served = next(r for r in doc["rows"] if r["system"] == "moe_serve" and r["tokens"] == 8)
    # The servers' own view of those calls, scraped from the exporters the config names.
    assert {"request_seconds", "worker_forward_seconds[w0]"} <= set(served["server_mean_ms"])
    assert served["server_mean_ms"]["request_seconds"] < served["mean_ms"]
    # The sweep reports the batch sizes the master's and workers' histograms saw.
    assert doc["concurrency_batches"]["2"]["master_batch_requests"] >= 1
    # T=1 tokens may all land on one worker in so short a sweep: either one counts.
    assert any(k.startswith("worker_batch_tokens[") for k in doc["concurrency_batches"]["2"])


def test_goals_reads_every_key_from_the_runs_it_finds(tmp_path: Path) -> None:
    """benchmarks/goals.py with every step skipped summarises the JSON already in --out:
    here the committed one-H200 decode results (e2e decode and bytes path)."""
    results = Path(__file__).resolve().parent.parent / "benchmarks/results/2026-12-02-decode"
    (tmp_path / "e2e.json").write_text((results / "e2e-decode.json").read_text())
    (tmp_path / "bytes.json").write_text((results / "bytes.json").read_text())
    skip = ["--skip", "bench", "e2e", "bytes", "fp8"]
    run = subprocess.run(
        [sys.executable, "benchmarks/goals.py", "--out", str(tmp_path), *skip],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=results.parent.parent.parent,
    )
    goals = json.loads((tmp_path / "summary.json").read_text())["goals"]
    assert run.returncode == 1, run.stdout + run.stderr  # bench and fp8 have no JSON: not all met
    assert goals["e2e_decode_ratio_b1"]["value"] == pytest.approx(0.1526, abs=1e-4)
    assert goals["e2e_decode_ratio_b1"]["met"] is False
    assert goals["e2e_decode_ratio_b32"]["value"] == pytest.approx(1.1157, abs=1e-4)
    assert goals["bytes_path_vs_raw_tcp"]["value"] == pytest.approx(0.1915, abs=1e-4)
    assert goals["t1_p50_ms"]["value"] is None and goals["t1_p50_ms"]["met"] is None
