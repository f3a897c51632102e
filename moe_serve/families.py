"""Model families: what a checkpoint's config.json says, and where its MoE tensors live.

Read from `model_type` and the on-disk key layout of Hugging Face checkpoints (one
tensor per expert projection), not from transformers' in-memory modules, which fuse
the experts. Only config.json is read here; tensors are read by moe_serve.weights.checkpoint.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moe_serve.errors import ConfigError

# Our GLU names -> the checkpoint's names for the three projections of an expert.
GLU_HF_NAMES = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
MIXTRAL_NAMES = {"gate": "w1", "up": "w3", "down": "w2"}
_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "relu": "relu", "tanh": "tanh"}
_DTYPES = {"float32", "bfloat16", "float16"}


class CheckpointError(ConfigError):
    """A checkpoint is missing, of an unsupported family, or lacks or mis-shapes a tensor."""


@dataclass(frozen=True)
class Layout:
    """One family's tensor keys and what its config.json implies for the world config."""

    family: str
    model: dict[str, Any]  # world-config `model` fields derived from config.json
    routing: dict[str, Any]  # world-config `routing` defaults derived from config.json
    block: Callable[[int], str]  # layer -> key prefix of the MoE block, ending in "."
    expert_names: Mapping[str, str] = field(default_factory=lambda: GLU_HF_NAMES)
    shared_name: str = "shared_experts"

    def router_key(self, layer: int) -> str:
        return f"{self.block(layer)}gate.weight"

    def correction_bias_key(self, layer: int) -> str:
        return f"{self.block(layer)}gate.e_score_correction_bias"

    def expert_keys(self, layer: int, expert: int) -> dict[str, str]:
        """Our weight name -> checkpoint key for one routed expert."""
        base = f"{self.block(layer)}experts.{expert}."
        return {ours: f"{base}{theirs}.weight" for ours, theirs in self.expert_names.items()}

    def shared_keys(self, layer: int) -> dict[str, str]:
        base = f"{self.block(layer)}{self.shared_name}."
        return {ours: f"{base}{theirs}.weight" for ours, theirs in GLU_HF_NAMES.items()}

    def shared_gate_key(self, layer: int) -> str:
        return f"{self.block(layer)}shared_expert_gate.weight"


def _mlp(layer: int) -> str:
    return f"model.layers.{layer}.mlp."


def _get(cfg: Mapping[str, Any], key: str, default: Any = ...) -> Any:
    if key in cfg and cfg[key] is not None:
        return cfg[key]
    if default is ...:
        raise CheckpointError(f"config.json: missing field {key!r}")
    return default


def _first(cfg: Mapping[str, Any], keys: str | tuple[str, ...]) -> Any:
    """The first of `keys` present in config.json (families renamed fields over time)."""
    keys = (keys,) if isinstance(keys, str) else keys
    for key in keys:
        if cfg.get(key) is not None:
            return cfg[key]
    raise CheckpointError(f"config.json: missing field {keys[0]!r}")


def _common(
    cfg: Mapping[str, Any], ffn_key: str, experts_key: str | tuple[str, ...], layers: list[int]
) -> dict:
    act = _get(cfg, "hidden_act", "silu")
    if act not in _ACTIVATIONS:
        raise CheckpointError(
            f"config.json: hidden_act {act!r} is not supported; expected one of "
            f"{sorted(_ACTIVATIONS)}"
        )
    dtype = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
    return {
        "hidden_size": _get(cfg, "hidden_size"),
        "expert_ffn_size": _get(cfg, ffn_key),
        "num_experts": _first(cfg, experts_key),
        "top_k": _get(cfg, "num_experts_per_tok"),
        "expert_kind": "glu",
        "activation": _ACTIVATIONS[act],
        "moe_layers": layers,
        "dtype": dtype if dtype in _DTYPES else "float32",
    }


def _mixtral(cfg: Mapping[str, Any]) -> Layout:
    layers = list(range(_get(cfg, "num_hidden_layers")))
    return Layout(
        family="mixtral",
        model=_common(cfg, "intermediate_size", "num_local_experts", layers),
        routing={"scoring": "softmax", "normalize_topk": True, "router_dtype": "model"},
        block=lambda i: f"model.layers.{i}.block_sparse_moe.",
        expert_names=MIXTRAL_NAMES,
    )


def _qwen(cfg: Mapping[str, Any], family: str) -> Layout:
    step, dense = _get(cfg, "decoder_sparse_step", 1), set(_get(cfg, "mlp_only_layers", []))
    layers = [
        i for i in range(_get(cfg, "num_hidden_layers")) if i not in dense and (i + 1) % step == 0
    ]
    # transformers 5.x writes Qwen3-MoE's expert count as num_local_experts.
    model = _common(cfg, "moe_intermediate_size", ("num_experts", "num_local_experts"), layers)
    shared = _get(cfg, "shared_expert_intermediate_size", 0) if family == "qwen2_moe" else 0
    if shared:
        model |= {"shared_expert_ffn_size": shared, "shared_expert_gate": True}
    return Layout(
        family=family,
        model=model,
        routing={
            "scoring": "softmax",
            "normalize_topk": bool(_get(cfg, "norm_topk_prob", False)),
            "router_dtype": "model",
        },
        block=_mlp,
        shared_name="shared_expert",
    )


def _olmoe(cfg: Mapping[str, Any]) -> Layout:
    layers = list(range(_get(cfg, "num_hidden_layers")))
    return Layout(
        family="olmoe",
        model=_common(cfg, "intermediate_size", "num_experts", layers),
        routing={
            "scoring": "softmax",
            "normalize_topk": bool(_get(cfg, "norm_topk_prob", False)),
            "router_dtype": "model",
        },
        block=_mlp,
    )


def _deepseek(cfg: Mapping[str, Any], family: str) -> Layout:
    first, freq = _get(cfg, "first_k_dense_replace", 0), _get(cfg, "moe_layer_freq", 1)
    layers = [i for i in range(_get(cfg, "num_hidden_layers")) if i >= first and i % freq == 0]
    model = _common(cfg, "moe_intermediate_size", "n_routed_experts", layers)
    shared = _get(cfg, "n_shared_experts", 0)
    if shared:
        model["shared_expert_ffn_size"] = shared * model["expert_ffn_size"]
    v3 = family == "deepseek_v3"
    routing: dict[str, Any] = {
        "scoring": _get(cfg, "scoring_func", "sigmoid" if v3 else "softmax"),
        "normalize_topk": bool(_get(cfg, "norm_topk_prob", v3)),
        "routed_scaling_factor": float(_get(cfg, "routed_scaling_factor", 1.0)),
        "router_dtype": "float32",
    }
    method = _get(cfg, "topk_method", "noaux_tc" if v3 else "greedy")
    if method in ("group_limited_greedy", "noaux_tc") and _get(cfg, "n_group", 1) > 1:
        routing |= {
            "n_group": _get(cfg, "n_group"),
            "topk_group": _get(cfg, "topk_group"),
            "group_scoring": "top2_sum" if method == "noaux_tc" else "max",
        }
    if method == "noaux_tc":
        routing["correction_bias"] = True
    return Layout(family=family, model=model, routing=routing, block=_mlp)


FAMILIES: dict[str, Callable[[Mapping[str, Any]], Layout]] = {
    "mixtral": _mixtral,
    "qwen2_moe": lambda c: _qwen(c, "qwen2_moe"),
    "qwen3_moe": lambda c: _qwen(c, "qwen3_moe"),
    "olmoe": _olmoe,
    "deepseek": lambda c: _deepseek(c, "deepseek"),
    "deepseek_v2": lambda c: _deepseek(c, "deepseek_v2"),
    "deepseek_v3": lambda c: _deepseek(c, "deepseek_v3"),
}


def read_layout(checkpoint: str | Path) -> Layout:
    """Read `checkpoint`/config.json and return its family's layout."""
    path = Path(checkpoint) / "config.json"
    try:
        cfg = json.loads(path.read_text())
    except OSError as exc:
        raise CheckpointError(
            f"model.checkpoint: cannot read {str(path)!r}: {exc.strerror}"
        ) from None
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"model.checkpoint: {path} is not valid JSON: {exc}") from None
    model_type = cfg.get("model_type")
    if model_type not in FAMILIES:
        raise CheckpointError(
            f"model.checkpoint: model_type {model_type!r} in {path} is not supported; "
            f"supported: {sorted(FAMILIES)}"
        )
    return FAMILIES[model_type](cfg)
