"""Tiny random Hugging Face MoE checkpoints and their reference outputs, for tests.

Test support only: this module holds no tests. It builds tiny models with transformers' own
config and model classes (nothing is downloaded), saves them the way real checkpoints are saved
(``save_pretrained``, float32, safetensors), and computes reference outputs by calling the
transformers MoE block itself, so a loader or a server can be checked against the library that
defines each family.

transformers 5.x keeps experts fused in memory (``experts.gate_up_proj`` [E, 2I, H] and
``experts.down_proj`` [E, H, I]) but ``save_pretrained`` reverts that: the files hold one tensor
per expert and projection, as the published checkpoints do:

* Mixtral: ``model.layers.{i}.block_sparse_moe.gate.weight`` and
  ``model.layers.{i}.block_sparse_moe.experts.{e}.{w1,w2,w3}.weight`` (w1 gate, w3 up, w2 down).
* Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V2/V3: ``model.layers.{i}.mlp.gate.weight`` and
  ``model.layers.{i}.mlp.experts.{e}.{gate_proj,up_proj,down_proj}.weight``; Qwen2-MoE adds
  ``mlp.shared_expert.{gate_proj,up_proj,down_proj}.weight`` and ``mlp.shared_expert_gate.weight``;
  DeepSeek adds ``mlp.shared_experts.{gate_proj,up_proj,down_proj}.weight``; DeepSeek-V3 adds
  ``mlp.gate.e_score_correction_bias``.

DeepSeek-MoE-16B (``model_type`` "deepseek") has no transformers class, so
:func:`write_deepseek_moe_16b_layout` writes its on-disk layout directly and
:func:`deepseek_moe_16b_reference` spells its MoE formula out.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors.torch import save_file

FAMILIES: tuple[str, ...] = (
    "mixtral",
    "qwen2_moe",
    "qwen3_moe",
    "olmoe",
    "deepseek_v2",
    "deepseek_v3",
)

# Standard deviation of the seeded normal that replaces every weight (routers included: some
# transformers routers start at zeros, which would make every routing decision a tie).
WEIGHT_STD = 0.2
# RMSNorm weights are drawn as 1 + NORM_STD * N(0, 1) so that norms stay near identity.
NORM_STD = 0.1
# DeepSeek-V3's e_score_correction_bias is added to sigmoid scores in (0, 1): keep it small.
CORRECTION_BIAS_STD = 0.05

_CLASSES: dict[str, tuple[str, str]] = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM"),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM"),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM"),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM"),
    "deepseek_v2": ("DeepseekV2Config", "DeepseekV2ForCausalLM"),
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM"),
}

_COMMON: dict[str, Any] = {
    "vocab_size": 128,
    "hidden_size": 64,
    "num_attention_heads": 4,
    "max_position_embeddings": 128,
    "tie_word_embeddings": False,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "pad_token_id": None,
}

_DEEPSEEK_COMMON: dict[str, Any] = {
    "num_hidden_layers": 3,
    "num_key_value_heads": 4,
    "intermediate_size": 96,
    "moe_intermediate_size": 32,
    "n_routed_experts": 8,
    "num_experts_per_tok": 2,
    "n_shared_experts": 1,
    "first_k_dense_replace": 1,
    "n_group": 4,
    "topk_group": 2,
    "kv_lora_rank": 16,
    "qk_nope_head_dim": 16,
    "qk_rope_head_dim": 8,
    "v_head_dim": 16,
}

_DEFAULTS: dict[str, dict[str, Any]] = {
    # Every layer is MoE.
    "mixtral": {
        "num_hidden_layers": 2,
        "num_key_value_heads": 2,
        "intermediate_size": 32,
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
    },
    # Layers 0 and 2 are MoE, layer 1 is dense (mlp_only_layers).
    "qwen2_moe": {
        "num_hidden_layers": 3,
        "num_key_value_heads": 2,
        "intermediate_size": 96,
        "moe_intermediate_size": 32,
        "shared_expert_intermediate_size": 64,
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "norm_topk_prob": False,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [1],
    },
    "qwen3_moe": {
        "num_hidden_layers": 3,
        "num_key_value_heads": 2,
        "intermediate_size": 96,
        "moe_intermediate_size": 32,
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "norm_topk_prob": True,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [1],
    },
    # Every layer is MoE.
    "olmoe": {
        "num_hidden_layers": 2,
        "num_key_value_heads": 4,
        "intermediate_size": 32,
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "norm_topk_prob": False,
    },
    # Layer 0 is dense (first_k_dense_replace), layers 1 and 2 are MoE.
    "deepseek_v2": {
        **_DEEPSEEK_COMMON,
        "q_lora_rank": None,
        "topk_method": "group_limited_greedy",
        "routed_scaling_factor": 2.0,
        "norm_topk_prob": False,
    },
    "deepseek_v3": {
        **_DEEPSEEK_COMMON,
        "q_lora_rank": 32,
        "routed_scaling_factor": 2.5,
        "norm_topk_prob": True,
    },
}


def _check_family(family: str) -> None:
    if family not in _CLASSES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")


def family_config(family: str, **overrides: Any) -> transformers.PreTrainedConfig:
    """The tiny transformers config :func:`build_model` uses for ``family``, with ``overrides``."""
    _check_family(family)
    config_cls = getattr(transformers, _CLASSES[family][0])
    kwargs = {**_COMMON, **_DEFAULTS[family], **overrides}
    return config_cls(**kwargs)


def _randomize_(model: torch.nn.Module, seed: int) -> None:
    """Overwrite every parameter (and V3's correction bias) from a generator seeded by ``seed``.

    Tensors are drawn in sorted-name order, so the result depends on the names and shapes only.
    """
    gen = torch.Generator().manual_seed(seed)
    tensors: list[tuple[str, torch.Tensor]] = list(model.named_parameters())
    tensors += [
        (name, buf)
        for name, buf in model.named_buffers()
        if name.endswith("e_score_correction_bias")
    ]
    with torch.no_grad():
        for name, tensor in sorted(tensors, key=lambda item: item[0]):
            noise = torch.randn(tensor.shape, generator=gen, dtype=torch.float32)
            if name.endswith("e_score_correction_bias"):
                value = CORRECTION_BIAS_STD * noise
            elif "norm" in name.rsplit(".", 2)[-2]:
                value = 1.0 + NORM_STD * noise
            else:
                value = WEIGHT_STD * noise
            tensor.copy_(value.to(tensor.dtype))


def build_model(family: str, seed: int = 0, **overrides: Any) -> transformers.PreTrainedModel:
    """A tiny random ``*ForCausalLM`` of ``family`` (one of :data:`FAMILIES`), float32, eval mode.

    hidden_size 64, 8 routed experts, top-k 2, vocab 128, 2-3 layers. Qwen2/3-MoE have a dense
    layer 1 (``mlp_only_layers=[1]``); DeepSeek-V2/V3 have a dense layer 0
    (``first_k_dense_replace=1``) and one shared expert; DeepSeek-V2 routes with
    ``group_limited_greedy`` (4 groups, 2 kept, ``routed_scaling_factor`` 2.0); DeepSeek-V3 with 4
    groups, 2 kept, scaling 2.5. ``overrides`` are config arguments that replace these defaults.

    Every weight (routers included) and DeepSeek-V3's ``e_score_correction_bias`` is redrawn from a
    normal seeded by ``seed`` (std :data:`WEIGHT_STD`; norms 1 + :data:`NORM_STD` noise; the bias
    std :data:`CORRECTION_BIAS_STD`), so routing is non-trivial and the model is a function of
    ``(family, seed, overrides)`` alone.
    """
    config = family_config(family, **overrides)
    model_cls = getattr(transformers, _CLASSES[family][1])
    model = model_cls(config).to(torch.float32)
    # Mix the family in, so that two families with like-named tensors get different weights.
    _randomize_(model, seed * len(FAMILIES) + FAMILIES.index(family))
    return model.eval()


def save_model(model: transformers.PreTrainedModel, directory: Path) -> Path:
    """``save_pretrained`` ``model`` into ``directory`` (safetensors, per-expert keys).

    transformers 5.x always writes safetensors (its ``safe_serialization`` argument is gone) and,
    with ``save_original_format=True`` (the default, passed explicitly here), unfuses the experts
    back to one tensor per expert and projection. The checkpoint is one ``model.safetensors``
    (the default 50GB shard limit is never reached) plus ``config.json`` and
    ``generation_config.json``. Returns ``directory``.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, save_original_format=True)
    return directory


def _layers(model: transformers.PreTrainedModel) -> torch.nn.ModuleList:
    return model.model.layers


def _is_sparse_moe(mlp: torch.nn.Module) -> bool:
    return hasattr(mlp, "gate") and hasattr(mlp, "experts")


def moe_layers(model: transformers.PreTrainedModel) -> list[int]:
    """Indices of the decoder layers whose ``mlp`` is a sparse-MoE block (not a dense MLP)."""
    return [i for i, layer in enumerate(_layers(model)) if _is_sparse_moe(layer.mlp)]


def moe_block(model: transformers.PreTrainedModel, layer: int) -> torch.nn.Module:
    """The sparse-MoE block of decoder layer ``layer`` (``model.model.layers[layer].mlp``)."""
    mlp = _layers(model)[layer].mlp
    if not _is_sparse_moe(mlp):
        raise ValueError(f"layer {layer} is dense; MoE layers are {moe_layers(model)}")
    return mlp


def _as_input(block: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    if x.dim() != 2:
        raise ValueError(f"x must be [T, H], got shape {tuple(x.shape)}")
    return x.to(next(block.parameters()).dtype)


def block_output(model: transformers.PreTrainedModel, layer: int, x: torch.Tensor) -> torch.Tensor:
    """The transformers MoE block's output [T, H] for ``x`` [T, H] (shared experts included)."""
    block = moe_block(model, layer)
    with torch.no_grad():
        out = block(_as_input(block, x).unsqueeze(0))
    if isinstance(out, tuple):  # older transformers returned (hidden_states, router_logits)
        out = out[0]
    return out.squeeze(0)


def router_topk_weights(
    model: transformers.PreTrainedModel, layer: int, x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The transformers router's chosen expert ids [T, K] (int64) and their weights [T, K].

    The weights are the ones the block multiplies expert outputs by (after ``norm_topk_prob`` and
    ``routed_scaling_factor``, as each family applies them). Columns are ordered by descending
    weight: DeepSeek routers pick with ``topk(sorted=False)``, whose order is unspecified.
    """
    block = moe_block(model, layer)
    with torch.no_grad():
        _logits, weights, ids = block.gate(_as_input(block, x))
    order = torch.argsort(weights, dim=-1, descending=True, stable=True)
    return ids.gather(-1, order).long(), weights.gather(-1, order)


def router_topk(model: transformers.PreTrainedModel, layer: int, x: torch.Tensor) -> torch.Tensor:
    """The transformers router's chosen expert ids [T, K] for ``x`` [T, H], by descending weight."""
    return router_topk_weights(model, layer, x)[0]


# --- DeepSeek-MoE-16B (model_type "deepseek"; remote code, no transformers class) -------------

DEEPSEEK_MOE_SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")


def deepseek_moe_16b_is_moe_layer(config: Mapping[str, Any], layer: int) -> bool:
    """Whether ``layer`` is MoE under DeepSeek-MoE's rule (``modeling_deepseek.py``)."""
    return (
        config.get("n_routed_experts") is not None
        and layer >= config["first_k_dense_replace"]
        and layer % config["moe_layer_freq"] == 0
    )


def write_deepseek_moe_16b_layout(
    directory: Path,
    seed: int = 0,
    *,
    hidden_size: int = 64,
    moe_intermediate_size: int = 32,
    intermediate_size: int = 96,
    num_layers: int = 3,
    n_routed_experts: int = 16,
    num_experts_per_tok: int = 6,
    n_shared_experts: int | None = 2,
    first_k_dense_replace: int = 1,
    moe_layer_freq: int = 1,
    norm_topk_prob: bool = False,
    vocab_size: int = 128,
    num_attention_heads: int = 4,
) -> dict[str, torch.Tensor]:
    """Write a tiny random checkpoint in deepseek-ai/deepseek-moe-16b-base's on-disk layout.

    ``directory`` gets ``config.json`` (the real config's fields, ``model_type`` "deepseek",
    ``torch_dtype`` "float32") and a two-shard float32 safetensors checkpoint with
    ``model.safetensors.index.json``. The shards split at half the bytes, so one layer's tensors
    may straddle the two files. Keys, for layer ``i``:

    * MoE layers: ``model.layers.{i}.mlp.gate.weight`` [E, H],
      ``model.layers.{i}.mlp.experts.{e}.{gate_proj,up_proj}.weight`` [I_moe, H],
      ``model.layers.{i}.mlp.experts.{e}.down_proj.weight`` [H, I_moe] and, when
      ``n_shared_experts``, ``model.layers.{i}.mlp.shared_experts.*`` with
      ``I_moe * n_shared_experts`` rows;
    * dense layers (``i < first_k_dense_replace`` or ``i % moe_layer_freq != 0``):
      ``model.layers.{i}.mlp.{gate_proj,up_proj,down_proj}.weight`` with ``intermediate_size``;
    * all layers: ``self_attn.{q,k,v,o}_proj.weight``, ``input_layernorm.weight``,
      ``post_attention_layernorm.weight``; plus ``model.embed_tokens.weight``,
      ``model.norm.weight`` and ``lm_head.weight``.

    Returns every tensor written, by key.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config: dict[str, Any] = {
        "architectures": ["DeepseekForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "auto_map": {
            "AutoConfig": "configuration_deepseek.DeepseekConfig",
            "AutoModel": "modeling_deepseek.DeepseekModel",
            "AutoModelForCausalLM": "modeling_deepseek.DeepseekForCausalLM",
        },
        "aux_loss_alpha": 0.001,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "first_k_dense_replace": first_k_dense_replace,
        "hidden_act": "silu",
        "hidden_size": hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": intermediate_size,
        "max_position_embeddings": 4096,
        "model_type": "deepseek",
        "moe_intermediate_size": moe_intermediate_size,
        "moe_layer_freq": moe_layer_freq,
        "n_routed_experts": n_routed_experts,
        "n_shared_experts": n_shared_experts,
        "norm_topk_prob": norm_topk_prob,
        "num_attention_heads": num_attention_heads,
        "num_experts_per_tok": num_experts_per_tok,
        "num_hidden_layers": num_layers,
        "num_key_value_heads": num_attention_heads,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "rope_theta": 10000,
        "scoring_func": "softmax",
        "seq_aux": True,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "transformers_version": "4.36.0",
        "use_cache": True,
        "vocab_size": vocab_size,
    }

    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}

    def weight(key: str, *shape: int) -> None:
        tensors[key] = WEIGHT_STD * torch.randn(shape, generator=gen, dtype=torch.float32)

    def norm(key: str) -> None:
        noise = torch.randn(hidden_size, generator=gen, dtype=torch.float32)
        tensors[key] = 1.0 + NORM_STD * noise

    def glu(prefix: str, inter: int) -> None:
        weight(f"{prefix}.gate_proj.weight", inter, hidden_size)
        weight(f"{prefix}.up_proj.weight", inter, hidden_size)
        weight(f"{prefix}.down_proj.weight", hidden_size, inter)

    weight("model.embed_tokens.weight", vocab_size, hidden_size)
    for i in range(num_layers):
        p = f"model.layers.{i}"
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            weight(f"{p}.self_attn.{proj}.weight", hidden_size, hidden_size)
        if deepseek_moe_16b_is_moe_layer(config, i):
            weight(f"{p}.mlp.gate.weight", n_routed_experts, hidden_size)
            for e in range(n_routed_experts):
                glu(f"{p}.mlp.experts.{e}", moe_intermediate_size)
            if n_shared_experts:
                glu(f"{p}.mlp.shared_experts", moe_intermediate_size * n_shared_experts)
        else:
            glu(f"{p}.mlp", intermediate_size)
        norm(f"{p}.input_layernorm.weight")
        norm(f"{p}.post_attention_layernorm.weight")
    norm("model.norm.weight")
    weight("lm_head.weight", vocab_size, hidden_size)

    total = sum(t.numel() * t.element_size() for t in tensors.values())
    shards: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]] = ({}, {})
    written = 0
    for key, tensor in tensors.items():
        shards[0 if written < total // 2 else 1][key] = tensor
        written += tensor.numel() * tensor.element_size()
    weight_map: dict[str, str] = {}
    for name, shard in zip(DEEPSEEK_MOE_SHARDS, shards, strict=True):
        save_file(shard, str(directory / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return tensors


def deepseek_moe_16b_reference(
    tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any], layer: int, x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-MoE's MoE layer written out plainly, in float32: ``(y [T, H], topk ids [T, K])``.

    ``scores = softmax(x @ gate.T)``; the ``num_experts_per_tok`` best experts (ids ordered by
    descending score); if ``norm_topk_prob`` and K > 1 their scores are renormalised to sum to 1
    (denominator + 1e-20, as ``modeling_deepseek.py``); ``y = sum_k w_k * E_k(x) + S(x)`` where
    ``E(x) = down(silu(gate_proj x) * up_proj x)`` and ``S`` is the same GLU with the
    ``shared_experts`` weights (absent when ``n_shared_experts`` is 0 or null).
    """
    if config.get("scoring_func", "softmax") != "softmax":
        raise ValueError(f"unsupported scoring_func {config['scoring_func']!r}")
    if not deepseek_moe_16b_is_moe_layer(config, layer):
        raise ValueError(f"layer {layer} is dense")
    p = f"model.layers.{layer}.mlp"
    x = x.to(torch.float32)

    def glu(prefix: str, rows: torch.Tensor) -> torch.Tensor:
        gate = tensors[f"{prefix}.gate_proj.weight"].float()
        up = tensors[f"{prefix}.up_proj.weight"].float()
        down = tensors[f"{prefix}.down_proj.weight"].float()
        return (torch.nn.functional.silu(rows @ gate.T) * (rows @ up.T)) @ down.T

    k = int(config["num_experts_per_tok"])
    scores = torch.softmax(x @ tensors[f"{p}.gate.weight"].float().T, dim=-1)
    weights, ids = torch.topk(scores, k, dim=-1)
    if config.get("norm_topk_prob") and k > 1:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)

    y = torch.zeros_like(x)
    for e in ids.unique().tolist():
        token, slot = (ids == e).nonzero(as_tuple=True)
        out = glu(f"{p}.experts.{e}", x[token]) * weights[token, slot, None]
        y.index_add_(0, token, out)
    if config.get("n_shared_experts"):
        y = y + glu(f"{p}.shared_experts", x)
    return y, ids
