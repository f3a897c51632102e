"""Group routed (token, expert) pairs by owning worker, and combine what comes back.

Each worker receives every token it needs exactly once, with the list of its
experts that token was routed to; request bytes per token scale with the number of
distinct workers hit, never with k. A worker answers either one weighted partial sum per
token (`combine`: the fewest bytes) or, for batch-invariant results, each pair's expert
output (`combine_pairs`: the master adds a token's pairs in its top-k order, whoever
computed them).
Legend: T tokens, K top_k, H hidden, W workers, P_w pairs and N_w tokens of worker w.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moe_serve.layer.gating import Routing
from moe_serve.layer.placement import Owners


@dataclass(frozen=True)
class WorkerSlice:
    """The part of a request one worker computes."""

    worker: int  # index into the placement's worker list
    token_index: torch.Tensor  # [N_w] int64 rows of the request, ascending
    pair_token: torch.Tensor  # [P_w] int32 rows of token_index
    pair_expert: torch.Tensor  # [P_w] int32 global expert ids
    pair_weight: torch.Tensor  # [P_w] float32
    pair_index: torch.Tensor  # [P_w] int64 t * K + k: the pair's place in the routing [T, K]


def _owners(owner: Owners | torch.Tensor) -> Owners:
    return owner if isinstance(owner, Owners) else Owners(owner)


def dispatch(routing: Routing, owner: Owners | torch.Tensor, num_workers: int) -> list[WorkerSlice]:
    """Split the kept pairs of `routing` by the worker that computes each.

    owner: the batch's Owners (placement.plan_owners), or an [E] worker index per expert;
    on the routing's device.
    """
    t, k = routing.kept.nonzero(as_tuple=True)  # [P] kept pairs, token-major
    expert = routing.expert_ids[t, k]
    worker = _owners(owner).of_pairs(t, expert)
    index = t * routing.expert_ids.shape[1] + k
    return group_pairs(t, expert, routing.weights[t, k], index, worker, num_workers)


def group_pairs(
    row: torch.Tensor,  # [P] int64 request rows, token-major
    expert: torch.Tensor,  # [P] int64 global expert ids
    weight: torch.Tensor,  # [P] float
    index: torch.Tensor,  # [P] int64 t * K + k
    worker: torch.Tensor,  # [P] worker index per pair; -1: no worker
    num_workers: int,
) -> list[WorkerSlice]:
    """One WorkerSlice per worker that computes some of the pairs (token order kept)."""
    order = torch.argsort(worker, stable=True)  # grouped by worker, token order kept
    row, expert, worker, weight = row[order], expert[order], worker[order], weight[order]
    index = index[order]
    # Host sync: the per-worker pair counts decide how many messages go out and their sizes.
    counts = torch.bincount(worker, minlength=num_workers).tolist()
    slices, start = [], 0
    for w, n in enumerate(counts):
        if n == 0:
            continue
        sl = slice(start, start + n)
        tokens, pair_token = torch.unique_consecutive(row[sl], return_inverse=True)
        slices.append(
            WorkerSlice(
                worker=w,
                token_index=tokens,
                pair_token=pair_token.to(torch.int32),
                pair_expert=expert[sl].to(torch.int32),
                pair_weight=weight[sl].float(),
                pair_index=index[sl],
            )
        )
        start += n
    return slices


def regroup(sl: WorkerSlice, owner: Owners | torch.Tensor, num_workers: int) -> list[WorkerSlice]:
    """The pairs of a failed slice, split again by new owners (failover)."""
    owners = _owners(owner)
    device = owners.expert.device
    row = sl.token_index.to(device)[sl.pair_token.to(device).long()]  # grouped by token
    expert = sl.pair_expert.to(device).long()
    worker = owners.of_pairs(row, expert)
    index = sl.pair_index.to(device)
    return group_pairs(row, expert, sl.pair_weight.to(device), index, worker, num_workers)


def combine(
    tokens: int,
    hidden: int,
    slices: list[WorkerSlice],
    partials: list[torch.Tensor],
    device: torch.device,
) -> torch.Tensor:
    """Sum each worker's partial sums [N_w, H] into the request's rows -> [T, H] float32."""
    out = torch.zeros((tokens, hidden), dtype=torch.float32, device=device)
    for sl, part in zip(slices, partials, strict=True):
        out.index_add_(0, sl.token_index.to(device), part.to(device, torch.float32))
    return out


def combine_pairs(
    weights: torch.Tensor,  # [T, K] float32 routing weights
    hidden: int,
    slices: list[WorkerSlice],
    outputs: list[torch.Tensor],  # per slice [P_w, H]: each pair's expert output
    device: torch.device,
) -> torch.Tensor:
    """Weight each pair's expert output and add a token's pairs in top-k order -> [T, H]
    float32: out[t] = w[t,0]*y[t,0] + w[t,1]*y[t,1] + ..., one elementwise op per k, so a
    row's bits depend on its own pairs alone, not on how the pairs were split among workers
    or batched with others. Dropped pairs add w * 0."""
    T, K = weights.shape
    dtype = outputs[0].dtype if outputs else torch.float32
    y = torch.zeros((T * K, hidden), dtype=dtype, device=device)
    for sl, part in zip(slices, outputs, strict=True):
        y.index_copy_(0, sl.pair_index.to(device), part.to(device))
    y = y.view(T, K, hidden)
    w = weights.to(device, torch.float32)
    out = w[:, :1] * y[:, 0].float()
    for k in range(1, K):
        out += w[:, k : k + 1] * y[:, k].float()
    return out
