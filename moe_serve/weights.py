"""Where weights come from: synthetic weights are a pure function of (seed, layer, expert).

Any process (master, worker, the in-process reference) rebuilds exactly the
same tensors from the model config alone, so nothing has to be shipped.
Weights are generated in float32 on the CPU and cast by the caller.
"""

from __future__ import annotations

import hashlib
import math

import torch

from moe_serve.config import ModelConfig

ExpertWeights = dict[str, torch.Tensor]

MLP_KEYS = ("fc1", "fc1_bias", "fc2", "fc2_bias")
GLU_KEYS = ("gate", "up", "down")


def _generator(*key: object) -> torch.Generator:
    digest = hashlib.sha256(repr(key).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def _uniform(g: torch.Generator, shape: tuple[int, ...], fan_in: int) -> torch.Tensor:
    bound = 1.0 / math.sqrt(fan_in)  # nn.Linear's default init range
    return torch.rand(shape, generator=g).mul_(2 * bound).sub_(bound)


def synthetic_router(model: ModelConfig, layer: int) -> torch.Tensor:
    """Router weight [E, H] of `layer`."""
    g = _generator("router", model.seed, layer)
    return _uniform(g, (model.num_experts, model.hidden_size), model.hidden_size)


def synthetic_expert(model: ModelConfig, layer: int, expert: int) -> ExpertWeights:
    """Weights of one expert: mlp -> fc1, fc1_bias, fc2, fc2_bias; glu -> gate, up, down."""
    g = _generator("expert", model.seed, layer, expert)
    H, F = model.hidden_size, model.expert_ffn_size
    if model.expert_kind == "mlp":
        return {
            "fc1": _uniform(g, (F, H), H),
            "fc1_bias": _uniform(g, (F,), H),
            "fc2": _uniform(g, (H, F), F),
            "fc2_bias": _uniform(g, (H,), F),
        }
    return {
        "gate": _uniform(g, (F, H), H),
        "up": _uniform(g, (F, H), H),
        "down": _uniform(g, (H, F), F),
    }
