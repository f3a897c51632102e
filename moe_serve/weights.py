"""Where weights come from: a checkpoint directory, or seeded synthetic weights.

`open_weights` picks the source; master, workers and the in-process reference all
read through it, so each process loads only what it serves. Synthetic weights are
a pure function of (seed, layer, expert): any process rebuilds the same tensors
from the config alone. Tensors come back on the CPU in the source's dtype.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from typing import Protocol

import torch

from moe_serve.config import ModelConfig, RoutingConfig

ExpertWeights = dict[str, torch.Tensor]

MLP_KEYS = ("fc1", "fc1_bias", "fc2", "fc2_bias")
GLU_KEYS = ("gate", "up", "down")


class WeightSource(Protocol):
    """Read access to one model's MoE weights."""

    def router(self, layer: int) -> torch.Tensor:
        """Router weight [E, H]."""
        ...

    def correction_bias(self, layer: int) -> torch.Tensor | None:
        """Selection-only score bias [E], or None."""
        ...

    def experts(self, layer: int, ids: Sequence[int]) -> list[ExpertWeights]:
        """Weights of routed experts `ids` of `layer` (mlp or glu keys)."""
        ...

    def shared_expert(self, layer: int) -> ExpertWeights | None:
        """GLU weights of the layer's shared experts (+ "shared_gate" [1, H]), or None."""
        ...


def open_weights(model: ModelConfig, routing: RoutingConfig) -> WeightSource:
    """The checkpoint's weights if `model.checkpoint` is set, else synthetic ones."""
    if model.checkpoint is not None:
        from moe_serve.checkpoint import CheckpointWeights

        return CheckpointWeights(model, routing)
    return SyntheticWeights(model, routing)


def _generator(*key: object) -> torch.Generator:
    digest = hashlib.sha256(repr(key).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def _uniform(g: torch.Generator, shape: tuple[int, ...], fan_in: int) -> torch.Tensor:
    bound = 1.0 / math.sqrt(fan_in)  # nn.Linear's default init range
    return torch.rand(shape, generator=g).mul_(2 * bound).sub_(bound)


class SyntheticWeights:
    """Seeded random weights in float32, rebuilt identically in every process."""

    def __init__(self, model: ModelConfig, routing: RoutingConfig) -> None:
        self.model, self.routing = model, routing

    def router(self, layer: int) -> torch.Tensor:
        m = self.model
        return _uniform(
            _generator("router", m.seed, layer), (m.num_experts, m.hidden_size), m.hidden_size
        )

    def correction_bias(self, layer: int) -> torch.Tensor | None:
        if not self.routing.correction_bias:
            return None
        g = _generator("bias", self.model.seed, layer)
        return torch.rand(self.model.num_experts, generator=g).mul_(0.1)

    def experts(self, layer: int, ids: Sequence[int]) -> list[ExpertWeights]:
        return [self._expert(layer, e) for e in ids]

    def _expert(self, layer: int, expert: int) -> ExpertWeights:
        g = _generator("expert", self.model.seed, layer, expert)
        H, F = self.model.hidden_size, self.model.expert_ffn_size
        if self.model.expert_kind == "mlp":
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

    def shared_expert(self, layer: int) -> ExpertWeights | None:
        H, F = self.model.hidden_size, self.model.shared_expert_ffn_size
        if not F:
            return None
        g = _generator("shared", self.model.seed, layer)
        w = {
            "gate": _uniform(g, (F, H), H),
            "up": _uniform(g, (F, H), H),
            "down": _uniform(g, (H, F), F),
        }
        if self.model.shared_expert_gate:
            w["shared_gate"] = _uniform(g, (1, H), H)
        return w
