"""GPU end to end: the shipped GPU examples served on CUDA devices (run with `pytest -m gpu`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from moe_serve.client import MoEClient
from moe_serve.demo import free_ports
from moe_serve.reference import ReferenceMoE
from tests.conftest import Cluster

pytestmark = [pytest.mark.gpu, pytest.mark.e2e]

EXAMPLES = Path(__file__).resolve().parent.parent / "deploy" / "examples"


def on_free_ports(name: str) -> dict[str, Any]:
    """An example config with its ports swapped for free loopback ones."""
    config = yaml.safe_load((EXAMPLES / name).read_text())
    ports = iter(free_ports(2 + 2 * len(config["workers"])))
    config["master"]["listen"] = f"127.0.0.1:{next(ports)}"
    config["master"]["metrics_port"] = next(ports)
    for w in config["workers"]:
        w["address"] = f"127.0.0.1:{next(ports)}"
        w["metrics_port"] = next(ports)
        w.pop("listen", None)
    return config


def needs_gpus(n: int) -> None:
    if torch.cuda.device_count() < n:
        pytest.fail(f"this test needs {n} CUDA devices, found {torch.cuda.device_count()}")


def parity(cluster: Cluster, tokens: int, layer: int) -> float:
    ref = ReferenceMoE(cluster.cfg.model, cluster.cfg.routing, device="cuda:0")
    x = torch.randn(tokens, cluster.cfg.model.hidden_size, device="cuda:0")
    with MoEClient(cluster.address) as client:
        y = client.infer(x, layer=layer)
    expected, _ = ref.forward(x, layer)
    assert y.device == x.device
    return ((y.float() - expected.float()).abs().max() / expected.float().abs().max()).item()


@pytest.mark.parametrize("tokens", [1, 64, 4096])
def test_seed_000_on_two_gpus_matches_reference(cluster_factory: Any, tokens: int) -> None:
    needs_gpus(2)
    cluster = cluster_factory(on_free_ports("seed-000.yaml"))
    assert parity(cluster, tokens, 0) <= 1e-5  # float32, relative to the output's max


@pytest.mark.parametrize("tokens", [1, 512])
def test_two_gpus_bfloat16_example_matches_reference(cluster_factory: Any, tokens: int) -> None:
    needs_gpus(2)
    cluster = cluster_factory(on_free_ports("two-gpus.yaml"))
    for layer in cluster.cfg.model.moe_layers:
        # bfloat16 has 8 mantissa bits; partial sums are rounded once more on the wire.
        assert parity(cluster, tokens, layer) <= 2e-2
