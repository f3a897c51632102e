"""Gate maths: scores, top-k, renormalisation, per-expert capacity, auxiliary losses.

Pure tensor code on whatever device the router lives on; no per-token Python.
Legend: T tokens, H hidden size, E experts, K experts per token (top_k).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

import torch

from moe_serve.config import RoutingConfig
from moe_serve.layer.rowwise import linear
from moe_serve.weights import WeightSource


@dataclass(frozen=True)
class Routing:
    """What the gate decided for a batch of tokens."""

    expert_ids: torch.Tensor  # [T, K] int64, best first
    weights: torch.Tensor  # [T, K] float32, 0 for dropped pairs
    scores: torch.Tensor  # [T, E] float32, after softmax/sigmoid
    kept: torch.Tensor  # [T, K] bool, False for pairs over capacity
    dropped_pairs: torch.Tensor  # [] int64
    load_balance_loss: torch.Tensor | None  # [] float32; None unless asked for
    importance_loss: torch.Tensor | None  # [] float32; None unless asked for


def gate_scores(
    x: torch.Tensor,
    router: torch.Tensor,
    scoring: str,
    router_dtype: str = "float32",
    invariant: bool = True,
) -> torch.Tensor:
    """Router scores [T, E] in float32: softmax or sigmoid of x @ router.T.

    router_dtype "model" computes the logits in x's dtype first, as Mixtral/Qwen do. Row t
    depends on x[t] alone, whatever T (rowwise.linear).
    """
    if router_dtype == "model":
        logits = linear(x, router.to(x.dtype), None, invariant).float()  # [T, E]
    else:
        logits = linear(x.float(), router.float(), None, invariant)  # [T, E]
    return torch.softmax(logits, dim=-1) if scoring == "softmax" else torch.sigmoid(logits)


def group_mask(
    choice: torch.Tensor, n_group: int, topk_group: int, group_scoring: str
) -> torch.Tensor:
    """[T, E] bool: experts in each token's topk_group best groups (DeepSeek group-limited)."""
    T, E = choice.shape
    grouped = choice.view(T, n_group, E // n_group)  # [T, G, E/G]
    if group_scoring == "max":
        group_score = grouped.max(dim=-1).values  # [T, G]
    else:  # "top2_sum"
        group_score = grouped.topk(2, dim=-1).values.sum(dim=-1)
    best = torch.topk(group_score, topk_group, dim=-1).indices  # [T, topk_group]
    keep = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, best, True)
    return keep.unsqueeze(-1).expand(T, n_group, E // n_group).reshape(T, E)


def select_top_k(
    scores: torch.Tensor,
    k: int,
    normalize: bool,
    *,
    bias: torch.Tensor | None = None,
    groups: tuple[int, int, str] | None = None,
    scaling: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k expert ids [T, K] and their weights [T, K].

    bias [E] shifts the scores for selection only; groups = (n_group, topk_group,
    group_scoring) limits the choice to the best groups; weights are the unbiased
    scores of the chosen experts, optionally renormalised to sum 1, times `scaling`.
    """
    choice = scores if bias is None else scores + bias.float()
    if groups is not None:
        choice = choice.masked_fill(~group_mask(choice, *groups), float("-inf"))
    ids = torch.topk(choice, k, dim=-1).indices  # [T, K]
    weights = scores.gather(1, ids)
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return ids, weights * scaling if scaling != 1.0 else weights


def expert_capacity(capacity_factor: float, tokens: int, k: int, num_experts: int) -> int:
    """Per-expert capacity for one request: ceil(cf * T * K / E)."""
    # round(): 1.1 * 25 * 2 / 5 is 11.000000000000002 in binary floating point, capacity 11.
    return math.ceil(round(capacity_factor * tokens * k / num_experts, 9))


def capacity_mask(ids: torch.Tensor, num_experts: int, capacity: int) -> torch.Tensor:
    """Keep mask [T, K]: each expert keeps its first `capacity` pairs.

    Priority is choice-major, as in Switch/GShard: every token's first choice
    is placed before any second choice; within a choice, earlier tokens first.
    """
    T, K = ids.shape
    flat = ids.t().reshape(-1)  # [K*T], choice-major
    order = torch.sort(flat, stable=True).indices  # pairs grouped by expert, priority kept
    counts = torch.bincount(flat, minlength=num_experts)
    starts = torch.cumsum(counts, 0) - counts  # [E] first slot of each expert's group
    rank_sorted = torch.arange(flat.numel(), device=ids.device) - starts[flat[order]]
    rank = torch.empty_like(rank_sorted)
    rank[order] = rank_sorted  # position of each pair within its expert's queue
    return (rank < capacity).view(K, T).t()


def load_balance_loss(scores: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Switch-style loss E * sum_i f_i * P_i; 1.0 when routing is perfectly uniform.

    f_i: fraction of the T*K selected pairs that go to expert i (before capacity).
    P_i: mean score of expert i over the T tokens.
    """
    E = scores.shape[1]
    f = torch.bincount(ids.reshape(-1), minlength=E).float() / ids.numel()
    p = scores.mean(dim=0)
    return E * torch.sum(f * p)


def importance_loss(scores: torch.Tensor) -> torch.Tensor:
    """Squared coefficient of variation of per-expert importance (sum of scores over tokens)."""
    importance = scores.sum(dim=0)  # [E]
    return importance.var(unbiased=False) / importance.mean().square()


@dataclass(frozen=True)
class Gate:
    """One MoE layer's gate: router weight [E, H], optional selection bias [E], settings."""

    router: torch.Tensor
    bias: torch.Tensor | None
    top_k: int
    cfg: RoutingConfig
    invariant: bool = True  # row-wise logits (moe_serve.layer.rowwise); False: F.linear

    @classmethod
    def load(
        cls,
        source: WeightSource,
        layer: int,
        top_k: int,
        cfg: RoutingConfig,
        device: torch.device,
        dtype: torch.dtype,
        invariant: bool = True,
    ) -> Gate:
        """Read a layer's router and bias, rounded to the model dtype like every weight.

        With router_dtype "float32" they are then held in float32, so each request does not
        convert them again.
        """
        held = dtype if cfg.router_dtype == "model" else torch.float32
        bias = source.correction_bias(layer)
        return cls(
            router=source.router(layer).to(dtype).to(device, held),
            bias=None if bias is None else bias.to(dtype).to(device, torch.float32),
            top_k=top_k,
            cfg=cfg,
            invariant=invariant,
        )

    def __call__(self, x: torch.Tensor, losses: bool = True) -> Routing:
        return route(x, self.router, self.top_k, self.cfg, self.bias, losses, self.invariant)


def route(
    x: torch.Tensor,
    router: torch.Tensor,
    k: int,
    cfg: RoutingConfig,
    bias: torch.Tensor | None = None,
    losses: bool = True,
    invariant: bool = True,
) -> Routing:
    """Gate a batch: x [T, H], router [E, H], optional correction bias [E] -> Routing.

    losses=False skips the auxiliary losses (left None): serving needs them only when a
    client asks for the routing.
    """
    E = router.shape[0]
    scores = gate_scores(x, router, cfg.scoring, cfg.router_dtype, invariant)  # [T, E]
    groups = None  # RoutingConfig sets n_group and topk_group both or neither
    if cfg.n_group is not None and cfg.topk_group is not None:
        groups = (cfg.n_group, cfg.topk_group, cfg.group_scoring)
    ids, weights = select_top_k(  # [T, K]
        scores,
        k,
        cfg.normalize_topk,
        bias=bias,
        groups=groups,
        scaling=cfg.routed_scaling_factor,
    )
    if cfg.router_dtype == "model":
        weights = weights.to(x.dtype).float()  # transformers rounds them to the model dtype
    if cfg.capacity_factor is None:
        kept = torch.ones_like(ids, dtype=torch.bool)
    else:
        kept = capacity_mask(ids, E, expert_capacity(cfg.capacity_factor, x.shape[0], k, E))
        weights = weights * kept  # dropped pairs contribute zero; the residual carries the token
    zero = scores.new_zeros(())
    empty = x.shape[0] == 0
    return Routing(
        expert_ids=ids,
        weights=weights,
        scores=scores,
        kept=kept,
        dropped_pairs=(~kept).sum(),
        load_balance_loss=None if not losses else zero if empty else load_balance_loss(scores, ids),
        importance_loss=None if not losses else zero if empty else importance_loss(scores),
    )


def split_routing(r: Routing, sizes: list[int], losses: list[bool]) -> list[Routing]:
    """The routing of each call of a batch gated as one: rows split by `sizes`; each call's
    losses (when asked for) over its own rows, as if it had been gated alone."""
    parts = zip(
        r.expert_ids.split(sizes),
        r.weights.split(sizes),
        r.scores.split(sizes),
        r.kept.split(sizes),
        strict=True,
    )
    out = []
    for (ids, weights, scores, kept), want in zip(parts, losses, strict=True):
        zero = None if not want else scores.new_zeros(())
        empty = ids.shape[0] == 0
        out.append(
            Routing(
                expert_ids=ids,
                weights=weights,
                scores=scores,
                kept=kept,
                dropped_pairs=(~kept).sum(),
                load_balance_loss=zero if not want or empty else load_balance_loss(scores, ids),
                importance_loss=zero if not want or empty else importance_loss(scores),
            )
        )
    return out


def merge_routings(routings: list[Routing]) -> Routing:
    """Calls gated one by one, as one batch for dispatch (rows concatenated in order)."""
    return Routing(
        expert_ids=torch.cat([r.expert_ids for r in routings]),
        weights=torch.cat([r.weights for r in routings]),
        scores=torch.cat([r.scores for r in routings]),
        kept=torch.cat([r.kept for r in routings]),
        dropped_pairs=torch.stack([r.dropped_pairs for r in routings]).sum(),
        load_balance_loss=None,
        importance_loss=None,
    )


def routing_to(r: Routing, device: torch.device) -> Routing:
    """`r` with every tensor on `device`."""
    moved = {
        f.name: getattr(r, f.name).to(device)
        for f in fields(r)
        if isinstance(getattr(r, f.name), torch.Tensor)
    }
    return replace(r, **moved)
