"""Expert forward passes: one expert, and a worker's grouped local forward.

The worker knows nothing about gating: it receives tokens with (expert,
weight) pairs and returns, per token, the weighted sum of its experts.
Legend: N distinct tokens, P (token, expert) pairs, H hidden, F expert FFN size.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F

from moe_serve.layer.rowwise import linear, ordered_sum
from moe_serve.weights import ExpertWeights, WeightSource

log = logging.getLogger(__name__)

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "relu": F.relu,
    "silu": F.silu,
    "tanh": torch.tanh,
}


def expert_forward(
    kind: str,
    activation: str,
    w: Mapping[str, torch.Tensor],
    x: torch.Tensor,
    invariant: bool = True,
) -> torch.Tensor:
    """One expert on x [N, H] -> [N, H]; row n depends on x[n] alone (rowwise.linear).

    mlp: fc2(act(fc1 x + b1)) + b2;  glu: down(act(gate x) * up x).
    """
    act, inv = ACTIVATIONS[activation], invariant
    if kind == "mlp":
        h = act(linear(x, w["fc1"], w["fc1_bias"], inv))
        return linear(h, w["fc2"], w["fc2_bias"], inv)
    return linear(
        act(linear(x, w["gate"], None, inv)) * linear(x, w["up"], None, inv), w["down"], None, inv
    )


def shared_forward(
    activation: str, w: Mapping[str, torch.Tensor], x: torch.Tensor, invariant: bool = True
) -> torch.Tensor:
    """Shared experts on x [T, H] -> [T, H]: a GLU, times sigmoid(x @ shared_gate.T) if gated."""
    y = expert_forward("glu", activation, w, x, invariant)
    if "shared_gate" in w:
        y = torch.sigmoid(linear(x, w["shared_gate"], None, invariant)) * y
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


def grouped_mm_supported(device: torch.device, dtype: torch.dtype, dims: Sequence[int]) -> bool:
    """Whether the grouped GEMM path is taken by default: on CUDA for bfloat16 on compute
    capability 9.0+ with every GEMM dim a multiple of 16 bytes
    (aten/src/ATen/native/cuda/Blas.cpp, mirrored in torch/_meta_registrations.py).

    Not on CPU: there torch._grouped_mm is one GEMM per group, and a group of 1-3 rows
    takes a kernel that sums in another order (moe_serve.layer.rowwise), so a token's bits
    would follow how many others chose its expert. The per-expert loop pads each group to
    rowwise.ROW_FLOOR rows instead, at the same cost."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if device.type != "cuda" or dtype != torch.bfloat16:
        return False
    align = 16 // torch.empty((), dtype=dtype).element_size()
    return torch.cuda.get_device_capability(device) >= (9, 0) and all(d % align == 0 for d in dims)


class ExpertStack:
    """The experts of one layer on one device, weights stacked along a leading expert dim.

    GLU experts keep gate and up fused as `gate_up [E, 2F, H]`, so one grouped GEMM
    computes both; `down [E, H, F]`. MLP experts: `fc1 [E, F, H]`, `fc1_bias [E, F]`,
    `fc2 [E, H, F]`, `fc2_bias [E, H]`. Layouts are nn.Linear's, whose transpose is the
    column-major [E, K, N] operand torch._grouped_mm takes without a copy.
    """

    def __init__(
        self,
        kind: str,
        activation: str,
        experts: Sequence[ExpertWeights],
        device: torch.device,
        dtype: torch.dtype,
        grouped_mm: bool | None = None,
        invariant: bool = True,
    ) -> None:
        """`invariant`: a token's bits do not depend on the other rows of a call
        (moe_serve.layer.rowwise); False takes the library's fastest kernels, the grouped
        GEMM on CPU too."""
        self.kind, self.activation, self.invariant = kind, activation, invariant
        self.num_experts = len(experts)
        self.device = device

        def stacked(*keys: str) -> torch.Tensor:
            # Filled expert by expert in place: no host-side stack of the whole layer, and
            # the peak is the final tensor plus one expert's weights.
            parts = [experts[0][k] for k in keys]
            rows = sum(p.shape[0] for p in parts)
            out = torch.empty((len(experts), rows, *parts[0].shape[1:]), dtype=dtype, device=device)
            for i, e in enumerate(experts):
                start = 0
                for k in keys:
                    n = e[k].shape[0]
                    out[i, start : start + n].copy_(e[k])
                    start += n
            return out

        if kind == "glu":
            self.ffn = experts[0]["gate"].shape[0]
            self.weights = {"gate_up": stacked("gate", "up"), "down": stacked("down")}
        else:
            self.ffn = experts[0]["fc1"].shape[0]
            self.weights = {k: stacked(k) for k in ("fc1", "fc1_bias", "fc2", "fc2_bias")}
        hidden = experts[0]["down" if kind == "glu" else "fc2"].shape[0]
        auto = grouped_mm_supported(device, dtype, (hidden, self.ffn))
        runs = auto or (device.type == "cpu" and hasattr(torch, "_grouped_mm"))
        if not invariant:
            auto = runs  # the CPU grouped GEMM's small groups only cost invariance
        # None: the default above. False forces the per-expert loop; True forces
        # torch._grouped_mm where it runs at all, CPU included (tests compare the two).
        self.grouped_mm = auto if grouped_mm is None else grouped_mm and runs

    def expert(self, slot: int) -> dict[str, torch.Tensor]:
        """Views of one expert's weights, under the keys of ExpertWeights."""
        w = {k: v[slot] for k, v in self.weights.items()}
        if self.kind == "glu":
            gate_up = w.pop("gate_up")
            w["gate"], w["up"] = gate_up[: self.ffn], gate_up[self.ffn :]
        return w

    def forward_sorted(self, x: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
        """x [P, H] sorted by slot ([P] int64, ascending) -> [P, H], each row by its expert."""
        if self.grouped_mm:
            # Group ends per slot, computed on the device: no host sync on this path
            # (bincount would read the largest slot back to size its output).
            per_slot = torch.zeros(self.num_experts, dtype=torch.int64, device=slot.device)
            per_slot.scatter_add_(0, slot, torch.ones_like(slot))
            return self._grouped(x, per_slot.cumsum(0).to(torch.int32), slot)
        # Host sync: the per-expert slice sizes decide how the loop cuts the batch.
        counts: list[int] = torch.bincount(slot, minlength=self.num_experts).tolist()
        out = torch.empty_like(x)
        start = 0
        for s, n in enumerate(counts):
            if n:
                end = start + n
                out[start:end] = expert_forward(
                    self.kind, self.activation, self.expert(s), x[start:end], self.invariant
                )
                start = end
        return out

    def _grouped(self, x: torch.Tensor, offs: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
        act, w = ACTIVATIONS[self.activation], self.weights
        if self.kind == "glu":
            h = torch._grouped_mm(x, w["gate_up"].transpose(1, 2), offs=offs)  # [P, 2F]
            h = act(h[:, : self.ffn]) * h[:, self.ffn :]
            return torch._grouped_mm(h, w["down"].transpose(1, 2), offs=offs)
        h = torch._grouped_mm(x, w["fc1"].transpose(1, 2), offs=offs) + w["fc1_bias"][slot]
        h = act(h).contiguous()
        return torch._grouped_mm(h, w["fc2"].transpose(1, 2), offs=offs) + w["fc2_bias"][slot]

    def nbytes(self) -> int:
        """Bytes held by the stacked weights."""
        return sum(t.numel() * t.element_size() for t in self.weights.values())


def pair_forward(
    stack: ExpertStack,
    hidden: torch.Tensor,  # [N, H] on stack.device
    token: torch.Tensor,  # [P] int64 rows of hidden, on stack.device
    slot: torch.Tensor,  # [P] int64 expert slots within the stack
) -> torch.Tensor:
    """Each pair's expert output, unweighted -> [P, H] in the stack's dtype, in the pairs'
    own order.

    Sorts the pairs by expert once and runs each expert on its contiguous run of rows (one
    grouped GEMM per projection where torch._grouped_mm runs, else one GEMM chain per
    expert); with `stack.invariant` a row's bits do not depend on the other pairs.
    """
    order = torch.argsort(slot, stable=True)
    y = stack.forward_sorted(hidden[token[order]], slot[order])  # [P, H], expert order
    back = torch.empty_like(order)
    back[order] = torch.arange(order.shape[0], device=order.device)  # y row of each pair
    return y[back]


def grouped_forward(
    stack: ExpertStack,
    hidden: torch.Tensor,  # [N, H] on stack.device
    token: torch.Tensor,  # [P] int64 rows of hidden, on stack.device
    slot: torch.Tensor,  # [P] int64 expert slots within the stack
    weight: torch.Tensor,  # [P] float32
) -> torch.Tensor:
    """Weighted per-token sum of the stack's experts -> [N, H] float32: `pair_forward`,
    then each token's weighted outputs summed in the order its pairs were given
    (rowwise.ordered_sum): a token's bits do not depend on the other pairs of the batch."""
    return _weighted_sum(
        hidden.shape[0], token, pair_forward(stack, hidden, token, slot), weight, stack.invariant
    )


def _weighted_sum(
    rows: int, token: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, invariant: bool
) -> torch.Tensor:
    return ordered_sum(rows, token, y.float() * weight.unsqueeze(1), invariant)


def _bucket(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


class _Captured:
    """One captured graph and its static buffers."""

    def __init__(self, stack: ExpertStack, tokens: int, pairs: int) -> None:
        dev, w = stack.device, stack.weights["down" if stack.kind == "glu" else "fc2"]
        # Row `tokens` stays zero: padding pairs point at it with weight 0.
        self.hidden = torch.zeros(tokens + 1, w.shape[1], dtype=w.dtype, device=dev)
        self.token = torch.full((pairs,), tokens, dtype=torch.int64, device=dev)
        self.slot = torch.zeros(pairs, dtype=torch.int64, device=dev)
        self.weight = torch.zeros(pairs, dtype=torch.float32, device=dev)
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):  # warm-up off the capture: allocator, kernel selection
            for _ in range(2):
                self._run(stack, tokens)
        torch.cuda.current_stream(dev).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.pairs, self.out = self._run(stack, tokens)

    def _run(self, stack: ExpertStack, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Both outputs a caller may want: the pairs' [P, H] and the tokens' sums [N, H]."""
        y = pair_forward(stack, self.hidden, self.token, self.slot)
        return y, _weighted_sum(tokens + 1, self.token, y, self.weight, stack.invariant)


class SmallBatchGraphs:
    """CUDA graphs of `grouped_forward` over one stack for small batches (decode steps).

    A small batch's forward is some fifteen kernel launches that each cost more than their
    work; one graph replay launches them all. Graphs are captured on first use per bucket
    (tokens and pairs rounded up to powers of two, at most MAX_TOKENS and MAX_PAIRS); a
    batch is padded up to its bucket with pairs of weight 0 on an all-zero row.
    """

    MAX_TOKENS, MAX_PAIRS = 64, 256

    def __init__(self, stack: ExpertStack) -> None:
        self.stack = stack
        self._graphs: dict[tuple[int, int], _Captured] = {}
        self.enabled = stack.device.type == "cuda" and stack.grouped_mm

    @property
    def captured(self) -> int:
        """Graphs captured so far."""
        return len(self._graphs)

    def fits(self, tokens: int, pairs: int) -> bool:
        """Whether a batch of this size is replayed from a graph."""
        return self.enabled and 0 < pairs <= self.MAX_PAIRS and tokens <= self.MAX_TOKENS

    def __call__(
        self,
        hidden: torch.Tensor,
        token: torch.Tensor,
        slot: torch.Tensor,
        weight: torch.Tensor,
        pairs: bool = False,
    ) -> torch.Tensor:
        """grouped_forward(stack, hidden, token, slot, weight) for a batch that fits, or with
        `pairs` pair_forward(stack, hidden, token, slot)."""
        n, p = hidden.shape[0], token.shape[0]
        key = (_bucket(n), _bucket(p))
        g = self._graphs.get(key)
        if g is None:
            try:
                g = self._graphs[key] = _Captured(self.stack, *key)
            except RuntimeError as exc:  # a kernel that cannot be captured on this build
                log.warning("CUDA graphs off for %s: capture failed: %s", self.stack.device, exc)
                self.enabled = False
                if pairs:
                    return pair_forward(self.stack, hidden, token, slot)
                return grouped_forward(self.stack, hidden, token, slot, weight)
        g.hidden[:n].copy_(hidden)
        g.token[:p].copy_(token)
        g.token[p:].fill_(key[0])
        g.slot[:p].copy_(slot)
        g.slot[p:].zero_()
        g.weight[:p].copy_(weight)
        g.weight[p:].zero_()
        g.graph.replay()
        # Copies: the static outputs are overwritten by the next replay.
        return (
            g.pairs[:p].clone() if pairs else g.out[:n].clone()
        )  # the static output is overwritten by the next replay
