"""Seeded synthetic weights: a pure function of (seed, layer, expert).

Any process rebuilds the same tensors from the config alone, so a world without a
checkpoint needs no files: master, workers and the reference agree bit for bit.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import torch

from moe_serve.config import ModelConfig, RoutingConfig
from moe_serve.weights.source import ExpertWeights


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
