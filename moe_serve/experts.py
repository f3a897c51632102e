"""Expert forward passes: one expert, and a worker's grouped local forward.

The worker knows nothing about gating: it receives tokens with (expert,
weight) pairs and returns, per token, the weighted sum of its experts.
Legend: N distinct tokens, P (token, expert) pairs, H hidden, F expert FFN size.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F

from moe_serve.weights import ExpertWeights, WeightSource

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "relu": F.relu,
    "silu": F.silu,
    "tanh": torch.tanh,
}


def expert_forward(
    kind: str, activation: str, w: Mapping[str, torch.Tensor], x: torch.Tensor
) -> torch.Tensor:
    """One expert on x [N, H] -> [N, H].

    mlp: fc2(act(fc1 x + b1)) + b2;  glu: down(act(gate x) * up x).
    """
    act = ACTIVATIONS[activation]
    if kind == "mlp":
        return F.linear(act(F.linear(x, w["fc1"], w["fc1_bias"])), w["fc2"], w["fc2_bias"])
    return F.linear(act(F.linear(x, w["gate"])) * F.linear(x, w["up"]), w["down"])


def shared_forward(activation: str, w: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Shared experts on x [T, H] -> [T, H]: a GLU, times sigmoid(x @ shared_gate.T) if gated."""
    y = expert_forward("glu", activation, w, x)
    if "shared_gate" in w:
        y = torch.sigmoid(F.linear(x, w["shared_gate"])) * y
    return y


def load_shared(
    source: WeightSource, layers: Sequence[int], device: torch.device, dtype: torch.dtype
) -> dict[int, ExpertWeights]:
    """The shared experts of the layers that have them, on `device` in `dtype`, loaded once."""
    out = {}
    for layer in layers:
        w = source.shared_expert(layer)
        if w is not None:
            out[layer] = {k: v.to(device, dtype) for k, v in w.items()}
    return out


class ExpertStack:
    """The experts of one layer on one device, weights stacked along a leading expert dim."""

    def __init__(
        self,
        kind: str,
        activation: str,
        experts: Sequence[ExpertWeights],
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.kind, self.activation = kind, activation
        self.num_experts = len(experts)
        self.device = device
        keys = experts[0].keys()
        self.weights = {
            k: torch.stack([e[k] for e in experts]).to(device=device, dtype=dtype) for k in keys
        }

    def expert(self, slot: int) -> dict[str, torch.Tensor]:
        """Views of one expert's weights."""
        return {k: v[slot] for k, v in self.weights.items()}

    def forward_sorted(self, x: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
        """x [P, H] sorted by slot, counts[s] rows for slot s -> [P, H], each run by its expert."""
        out = torch.empty_like(x)
        start = 0
        for slot, n in enumerate(counts):
            if n:
                end = start + n
                out[start:end] = expert_forward(
                    self.kind, self.activation, self.expert(slot), x[start:end]
                )
                start = end
        return out

    def nbytes(self) -> int:
        """Bytes held by the stacked weights."""
        return sum(t.numel() * t.element_size() for t in self.weights.values())


def grouped_forward(
    stack: ExpertStack,
    hidden: torch.Tensor,  # [N, H] on stack.device
    token: torch.Tensor,  # [P] int64 rows of hidden, on stack.device
    slot: torch.Tensor,  # [P] int64 expert slots within the stack
    weight: torch.Tensor,  # [P] float32
) -> torch.Tensor:
    """Weighted per-token sum of the stack's experts -> [N, H] float32.

    Sorts the pairs by expert once, runs each expert on its contiguous slice,
    and combines per token with index_add_.
    """
    order = torch.argsort(slot, stable=True)
    token, weight = token[order], weight[order]
    # Host sync: the per-expert slice sizes decide how the batch is cut.
    counts = torch.bincount(slot, minlength=stack.num_experts).tolist()
    y = stack.forward_sorted(hidden[token], counts)  # [P, H]
    out = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
    return out.index_add_(0, token, y.float() * weight.unsqueeze(1))
