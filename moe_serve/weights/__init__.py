"""Where weights come from: a checkpoint directory, or seeded synthetic weights.

- `source.py`: the `WeightSource` protocol every reader implements.
- `synthetic.py`: seeded random weights, identical in every process.
- `checkpoint.py`: a Hugging Face safetensors directory, read lazily, each process only
  its own tensors (`moe_serve.families` says where each family keeps them).
"""

from __future__ import annotations

from moe_serve.config import ModelConfig, RoutingConfig
from moe_serve.weights.checkpoint import CheckpointWeights
from moe_serve.weights.source import GLU_KEYS, MLP_KEYS, ExpertWeights, WeightSource
from moe_serve.weights.synthetic import SyntheticWeights

__all__ = [
    "GLU_KEYS",
    "MLP_KEYS",
    "CheckpointWeights",
    "ExpertWeights",
    "SyntheticWeights",
    "WeightSource",
    "open_weights",
]


def open_weights(model: ModelConfig, routing: RoutingConfig) -> WeightSource:
    """The checkpoint's weights if `model.checkpoint` is set, else synthetic ones."""
    if model.checkpoint is not None:
        return CheckpointWeights(model, routing)
    return SyntheticWeights(model, routing)
