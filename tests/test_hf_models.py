"""Self-checks of tests/hf_models.py, the tiny Hugging Face MoE checkpoint factory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open

from tests import hf_models

H = 64
K = 2
E = 8
T = 32

# Which decoder layers are sparse-MoE, by family (the others are dense MLPs).
EXPECTED_MOE_LAYERS = {
    "mixtral": [0, 1],
    "qwen2_moe": [0, 2],
    "qwen3_moe": [0, 2],
    "olmoe": [0, 1],
    "deepseek_v2": [1, 2],
    "deepseek_v3": [1, 2],
}


def _x(seed: int = 1, tokens: int = T, hidden: int = H) -> torch.Tensor:
    return torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(seed))


def _keys(path: Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_slice(k).get_dtype() for k in f.keys()}  # noqa: SIM118


def _expected_moe_keys(family: str, layer: int) -> set[str]:
    if family == "mixtral":
        p = f"model.layers.{layer}.block_sparse_moe"
        projs = ("w1", "w2", "w3")
    else:
        p = f"model.layers.{layer}.mlp"
        projs = ("gate_proj", "up_proj", "down_proj")
    keys = {f"{p}.gate.weight"}
    keys |= {f"{p}.experts.{e}.{w}.weight" for e in range(E) for w in projs}
    if family == "qwen2_moe":
        keys |= {f"{p}.shared_expert.{w}.weight" for w in projs}
        keys.add(f"{p}.shared_expert_gate.weight")
    if family.startswith("deepseek"):
        keys |= {f"{p}.shared_experts.{w}.weight" for w in projs}
    if family == "deepseek_v3":
        keys.add(f"{p}.gate.e_score_correction_bias")
    return keys


@pytest.mark.parametrize("family", hf_models.FAMILIES)
def test_save_writes_config_and_per_expert_safetensors(family: str, tmp_path: Path) -> None:
    model = hf_models.build_model(family)
    out = hf_models.save_model(model, tmp_path / family)
    assert out == tmp_path / family
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == family
    assert config["dtype"] == "float32"
    keys = _keys(out / "model.safetensors")
    assert set(keys.values()) == {"F32"}
    assert not [k for k in keys if "gate_up_proj" in k], "fused expert tensors on disk"
    assert hf_models.moe_layers(model) == EXPECTED_MOE_LAYERS[family]
    for layer in range(config["num_hidden_layers"]):
        moe_keys = {k for k in keys if k.startswith(f"model.layers.{layer}.")}
        moe_keys = {k for k in moe_keys if ".experts." in k or ".gate." in k or "shared" in k}
        if layer in EXPECTED_MOE_LAYERS[family]:
            assert moe_keys == _expected_moe_keys(family, layer)
        else:
            assert moe_keys == set()
            assert f"model.layers.{layer}.mlp.gate_proj.weight" in keys


@pytest.mark.parametrize("family", hf_models.FAMILIES)
def test_reference_shapes_and_non_trivial_routing(family: str) -> None:
    model = hf_models.build_model(family)
    for layer in hf_models.moe_layers(model):
        y = hf_models.block_output(model, layer, _x())
        assert y.shape == (T, H) and y.dtype == torch.float32
        assert torch.isfinite(y).all() and y.abs().mean() > 1e-3
        ids, weights = hf_models.router_topk_weights(model, layer, _x())
        assert ids.shape == weights.shape == (T, K) and ids.dtype == torch.int64
        assert torch.equal(ids, hf_models.router_topk(model, layer, _x()))
        assert ((ids >= 0) & (ids < E)).all()
        assert (ids[:, 0] != ids[:, 1]).all()
        assert (weights[:, 0] > weights[:, 1]).all(), "ties or unsorted weights"
        assert ids.unique().numel() >= E // 2, "routing concentrates on few experts"


@pytest.mark.parametrize("family", hf_models.FAMILIES)
def test_deterministic_given_seed(family: str) -> None:
    a, b = hf_models.build_model(family, seed=3), hf_models.build_model(family, seed=3)
    c = hf_models.build_model(family, seed=4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    layer = hf_models.moe_layers(a)[0]
    gate = f"model.layers.{layer}.mlp.gate.weight"
    assert not torch.equal(sa[gate], sc[gate])
    assert torch.equal(
        hf_models.block_output(a, layer, _x()), hf_models.block_output(b, layer, _x())
    )


def test_families_get_different_weights() -> None:
    a, b = hf_models.build_model("mixtral"), hf_models.build_model("qwen3_moe")
    key = "model.layers.0.mlp.gate.weight"
    assert not torch.equal(a.state_dict()[key], b.state_dict()[key])


def test_overrides_reach_the_config() -> None:
    model = hf_models.build_model("qwen3_moe", num_experts=4, mlp_only_layers=[])
    assert model.config.num_experts == 4
    assert hf_models.moe_layers(model) == [0, 1, 2]
    with pytest.raises(ValueError):
        hf_models.build_model("llama")


def test_dense_layer_is_rejected() -> None:
    model = hf_models.build_model("deepseek_v3")
    with pytest.raises(ValueError):
        hf_models.moe_block(model, 0)


@pytest.mark.parametrize("family", hf_models.FAMILIES)
def test_saved_checkpoint_reloads_to_the_same_block(
    family: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = hf_models.build_model(family)
    directory = hf_models.save_model(model, tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
    assert loaded.dtype == torch.float32
    for layer in hf_models.moe_layers(model):
        torch.testing.assert_close(
            hf_models.block_output(loaded, layer, _x()),
            hf_models.block_output(model, layer, _x()),
            rtol=0,
            atol=0,
        )


# --- DeepSeek-MoE-16B layout -----------------------------------------------------------------


def test_deepseek_moe_16b_layout(tmp_path: Path) -> None:
    tensors = hf_models.write_deepseek_moe_16b_layout(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "deepseek"
    assert config["architectures"] == ["DeepseekForCausalLM"]
    assert config["torch_dtype"] == "float32"
    assert config["scoring_func"] == "softmax"
    assert (config["n_routed_experts"], config["num_experts_per_tok"]) == (16, 6)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    weight_map = index["weight_map"]
    assert set(weight_map) == set(tensors)
    assert sorted(set(weight_map.values())) == list(hf_models.DEEPSEEK_MOE_SHARDS)
    total = 0
    for shard in hf_models.DEEPSEEK_MOE_SHARDS:
        with safe_open(str(tmp_path / shard), "pt") as f:
            for key in f.keys():  # noqa: SIM118
                assert weight_map[key] == shard
                assert torch.equal(f.get_tensor(key), tensors[key])
                total += tensors[key].numel() * 4
    assert index["metadata"]["total_size"] == total
    # Layer 0 is dense, layers 1 and 2 are MoE with 2 shared experts' worth of shared GLU.
    assert tensors["model.layers.0.mlp.gate_proj.weight"].shape == (96, H)
    assert "model.layers.0.mlp.gate.weight" not in tensors
    assert tensors["model.layers.1.mlp.gate.weight"].shape == (16, H)
    assert tensors["model.layers.2.mlp.experts.15.down_proj.weight"].shape == (H, 32)
    assert tensors["model.layers.2.mlp.shared_experts.up_proj.weight"].shape == (64, H)
    assert {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"} <= set(tensors)


def test_deepseek_moe_16b_layer_freq(tmp_path: Path) -> None:
    tensors = hf_models.write_deepseek_moe_16b_layout(tmp_path, num_layers=5, moe_layer_freq=2)
    moe = sorted({int(k.split(".")[2]) for k in tensors if ".mlp.gate.weight" in k})
    assert moe == [2, 4]


def test_deepseek_moe_16b_reference(tmp_path: Path) -> None:
    tensors = hf_models.write_deepseek_moe_16b_layout(tmp_path, seed=5)
    config = json.loads((tmp_path / "config.json").read_text())
    y, ids = hf_models.deepseek_moe_16b_reference(tensors, config, 1, _x())
    assert y.shape == (T, H) and ids.shape == (T, 6)
    assert torch.isfinite(y).all()
    assert all(row.unique().numel() == 6 for row in ids)
    again = hf_models.write_deepseek_moe_16b_layout(tmp_path / "again", seed=5)
    assert torch.equal(hf_models.deepseek_moe_16b_reference(again, config, 1, _x())[0], y)
    renorm = {**config, "norm_topk_prob": True}
    y2, ids2 = hf_models.deepseek_moe_16b_reference(tensors, renorm, 1, _x())
    assert torch.equal(ids2, ids) and not torch.allclose(y2, y)
    with pytest.raises(ValueError):
        hf_models.deepseek_moe_16b_reference(tensors, config, 0, _x())


def test_deepseek_moe_16b_reference_matches_transformers_greedy_softmax_moe(
    tmp_path: Path,
) -> None:
    """DeepSeek-V2's MoE with greedy top-k, scale 1 and no renormalisation is DeepSeek-MoE's."""
    tensors = hf_models.write_deepseek_moe_16b_layout(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    model = hf_models.build_model(
        "deepseek_v2",
        n_routed_experts=16,
        num_experts_per_tok=6,
        n_shared_experts=2,
        topk_method="greedy",
        routed_scaling_factor=1.0,
        num_hidden_layers=2,
    )
    block = hf_models.moe_block(model, 1)
    p = "model.layers.1.mlp"
    with torch.no_grad():
        block.gate.weight.copy_(tensors[f"{p}.gate.weight"])
        for e in range(16):
            gate_up = [tensors[f"{p}.experts.{e}.{w}.weight"] for w in ("gate_proj", "up_proj")]
            block.experts.gate_up_proj[e].copy_(torch.cat(gate_up))
            block.experts.down_proj[e].copy_(tensors[f"{p}.experts.{e}.down_proj.weight"])
        for w in ("gate_proj", "up_proj", "down_proj"):
            getattr(block.shared_experts, w).weight.copy_(tensors[f"{p}.shared_experts.{w}.weight"])
    y, ids = hf_models.deepseek_moe_16b_reference(tensors, config, 1, _x())
    assert torch.equal(ids, hf_models.router_topk(model, 1, _x()))
    torch.testing.assert_close(hf_models.block_output(model, 1, _x()), y, rtol=1e-5, atol=1e-5)
