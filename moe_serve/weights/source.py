"""What every weight source offers: the `WeightSource` protocol and one expert's tensors.

Master, workers and the in-process reference read weights only through this protocol
(`moe_serve.weights.open_weights` picks the source), so each process loads only what it
serves. Tensors come back on the CPU in the source's dtype.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

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
