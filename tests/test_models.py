"""Real model families served from Hugging Face checkpoints through `moe-serve up`.

Tiny random models are built with transformers' own classes and saved with
`save_pretrained`; the service's output must match the transformers MoE block.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from moe_serve.client import MoEClient
from tests import hf_models
from tests.conftest import Cluster, world

pytestmark = pytest.mark.e2e

MAX_ABS = 1e-4
MAX_REL_FROB = 1e-5
TOKENS = 48


def _checkpoint_world(path: Path, workers: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    config = world(workers=workers)
    config["model"] = {"checkpoint": str(path)}
    return config


def _errors(y: torch.Tensor, expected: torch.Tensor) -> tuple[float, float]:
    diff = (y - expected).float()
    return diff.abs().max().item(), (diff.norm() / expected.float().norm()).item()


def _check_layers(cluster: Cluster, model: Any, layers: list[int], seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with MoEClient(cluster.address) as client:
        assert client.info().layers == tuple(layers)
        for layer in layers:
            x = torch.randn(TOKENS, model.config.hidden_size, generator=g)
            y, routing = client.infer(x, layer=layer, return_routing=True)
            max_abs, rel = _errors(y, hf_models.block_output(model, layer, x))
            assert max_abs <= MAX_ABS and rel <= MAX_REL_FROB, (layer, max_abs, rel)
            expected_ids = hf_models.router_topk(model, layer, x)
            assert torch.equal(routing.expert_ids.sort(-1).values, expected_ids.sort(-1).values)


@pytest.mark.parametrize("family", hf_models.FAMILIES)
def test_family_served_over_two_workers_matches_transformers(
    cluster_factory: Any, tmp_path: Path, family: str
) -> None:
    model = hf_models.build_model(family, seed=1)
    path = hf_models.save_model(model, tmp_path / family)
    cluster = cluster_factory(_checkpoint_world(path))
    _check_layers(cluster, model, hf_models.moe_layers(model))


def test_per_layer_placement_with_a_replicated_expert_matches_transformers(
    cluster_factory: Any, tmp_path: Path
) -> None:
    model = hf_models.build_model("deepseek_v3", seed=2)
    path = hf_models.save_model(model, tmp_path / "v3")
    # Layer 1: expert 4 on both workers (a replica); layer 2: a 2/6 split.
    workers = [
        {"experts": {1: [0, 1, 2, 3, 4], 2: [0, 1]}},
        {"experts": {1: [4, 5, 6, 7], 2: [2, 3, 4, 5, 6, 7]}, "devices": ["cpu", "cpu"]},
    ]
    cluster = cluster_factory(_checkpoint_world(path, workers))
    _check_layers(cluster, model, [1, 2], seed=3)


def test_deepseek_moe_16b_layout_matches_its_formula(cluster_factory: Any, tmp_path: Path) -> None:
    tensors = hf_models.write_deepseek_moe_16b_layout(tmp_path / "dsmoe", seed=4)
    config = json.loads((tmp_path / "dsmoe" / "config.json").read_text())
    workers = [{"experts": list(range(8))}, {"experts": list(range(8, 16))}]
    cluster = cluster_factory(_checkpoint_world(tmp_path / "dsmoe", workers))
    g = torch.Generator().manual_seed(5)
    with MoEClient(cluster.address) as client:
        layers = client.info().layers
        assert layers == (1, 2)  # first_k_dense_replace=1: layer 0 is dense
        for layer in layers:
            x = torch.randn(TOKENS, config["hidden_size"], generator=g)
            y, routing = client.infer(x, layer=layer, return_routing=True)
            expected, ids = hf_models.deepseek_moe_16b_reference(tensors, config, layer, x)
            max_abs, rel = _errors(y, expected)
            assert max_abs <= MAX_ABS and rel <= MAX_REL_FROB, (layer, max_abs, rel)
            assert torch.equal(routing.expert_ids.sort(-1).values, ids.sort(-1).values)
