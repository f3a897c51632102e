"""Splitting routed pairs by worker, and combining the workers' partial sums."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from moe_serve.config import RoutingConfig
from moe_serve.layer.dispatch import WorkerSlice, combine, dispatch
from moe_serve.layer.gating import Routing, route

H, E, W = 16, 8, 3
ATOL = 1e-6
# expert -> worker; worker 2 owns a single expert, so it often gets nothing
OWNER = torch.tensor([0, 1, 0, 1, 0, 1, 2, 0])


def routing(ids: list[list[int]], weights: list[list[float]], kept: list[list[bool]]) -> Routing:
    """A hand-built routing decision (scores and losses are irrelevant to dispatch)."""
    t = len(ids)
    return Routing(
        expert_ids=torch.tensor(ids, dtype=torch.int64).reshape(t, -1),
        weights=torch.tensor(weights, dtype=torch.float32).reshape(t, -1),
        scores=torch.zeros(t, E),
        kept=torch.tensor(kept, dtype=torch.bool).reshape(t, -1),
        dropped_pairs=torch.tensor(sum(not k for row in kept for k in row)),
        load_balance_loss=torch.tensor(0.0),
        importance_loss=torch.tensor(0.0),
    )


def routed(tokens: int, k: int, seed: int, cf: float | None = None) -> tuple[torch.Tensor, Routing]:
    """Random hidden states [T, H] and the gate's routing of them."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, H, generator=g)
    router = torch.randn(E, H, generator=g)
    return x, route(x, router, k, RoutingConfig(capacity_factor=cf))


def expert_fn(expert: int, x: torch.Tensor) -> torch.Tensor:
    """A stand-in expert: a fixed, expert-specific nonlinear map of one row [H] -> [H]."""
    g = torch.Generator().manual_seed(1000 + expert)
    return torch.tanh(torch.randn(H, H, generator=g) @ x) + expert


def sent_pairs(slices: list[WorkerSlice]) -> list[tuple[int, int, int, float]]:
    """(worker, request token, expert, weight) for every pair the slices carry."""
    out = []
    for sl in slices:
        for p in range(sl.pair_token.numel()):
            token = int(sl.token_index[int(sl.pair_token[p])])
            out.append((sl.worker, token, int(sl.pair_expert[p]), float(sl.pair_weight[p])))
    return out


def kept_pairs(r: Routing, owner: torch.Tensor) -> list[tuple[int, int, int, float]]:
    """(worker, token, expert, weight) for every kept pair, by naive iteration."""
    out = []
    tokens, k = r.expert_ids.shape
    for t in range(tokens):
        for j in range(k):
            if r.kept[t, j]:
                e = int(r.expert_ids[t, j])
                out.append((int(owner[e]), t, e, float(r.weights[t, j])))
    return out


def naive_partial(sl: WorkerSlice, x: torch.Tensor) -> torch.Tensor:
    """What a worker returns: per token of its slice, the weighted sum of its experts."""
    out = torch.zeros(sl.token_index.numel(), H)
    for p in range(sl.pair_token.numel()):
        n = int(sl.pair_token[p])
        t = int(sl.token_index[n])
        out[n] += float(sl.pair_weight[p]) * expert_fn(int(sl.pair_expert[p]), x[t])
    return out


def naive_moe(r: Routing, x: torch.Tensor) -> torch.Tensor:
    """The full weighted sum over every kept pair, one token at a time."""
    out = torch.zeros(x.shape)
    for _, t, e, w in kept_pairs(r, OWNER):
        out[t] += w * expert_fn(e, x[t])
    return out


CASES = [(12, 1, 0, None), (12, 2, 1, None), (16, 4, 2, None), (24, 2, 3, 0.5), (20, 4, 4, 0.75)]


# --- dispatch ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("tokens", "k", "seed", "cf"), CASES)
def test_each_token_is_sent_at_most_once_per_worker_in_ascending_order(
    tokens: int, k: int, seed: int, cf: float | None
) -> None:
    _, r = routed(tokens, k, seed, cf)
    for sl in dispatch(r, OWNER, W):
        rows = sl.token_index.tolist()
        assert rows == sorted(set(rows))
        assert sl.token_index.dtype == torch.int64


@pytest.mark.parametrize(("tokens", "k", "seed", "cf"), CASES)
def test_slices_carry_exactly_the_kept_pairs_of_their_worker(
    tokens: int, k: int, seed: int, cf: float | None
) -> None:
    _, r = routed(tokens, k, seed, cf)
    slices = dispatch(r, OWNER, W)
    assert Counter(sent_pairs(slices)) == Counter(kept_pairs(r, OWNER))


@pytest.mark.parametrize(("tokens", "k", "seed", "cf"), CASES)
def test_pair_count_of_each_worker_equals_its_kept_pairs(
    tokens: int, k: int, seed: int, cf: float | None
) -> None:
    _, r = routed(tokens, k, seed, cf)
    per_worker = Counter(w for w, *_ in kept_pairs(r, OWNER))
    slices = dispatch(r, OWNER, W)
    assert {sl.worker: sl.pair_token.numel() for sl in slices} == dict(per_worker)
    for sl in slices:
        assert sl.pair_expert.numel() == sl.pair_weight.numel() == sl.pair_token.numel()


@pytest.mark.parametrize(("tokens", "k", "seed", "cf"), CASES)
def test_every_token_of_a_slice_has_a_pair(
    tokens: int, k: int, seed: int, cf: float | None
) -> None:
    _, r = routed(tokens, k, seed, cf)
    for sl in dispatch(r, OWNER, W):
        assert set(sl.pair_token.tolist()) == set(range(sl.token_index.numel()))


@pytest.mark.parametrize(("tokens", "k", "seed", "cf"), CASES)
def test_slices_are_ordered_by_worker_and_only_for_workers_with_pairs(
    tokens: int, k: int, seed: int, cf: float | None
) -> None:
    _, r = routed(tokens, k, seed, cf)
    workers = [sl.worker for sl in dispatch(r, OWNER, W)]
    assert workers == sorted({w for w, *_ in kept_pairs(r, OWNER)})


def test_slice_dtypes_are_the_wire_dtypes() -> None:
    _, r = routed(8, 2, 0)
    for sl in dispatch(r, OWNER, W):
        assert sl.pair_token.dtype == torch.int32
        assert sl.pair_expert.dtype == torch.int32
        assert sl.pair_weight.dtype == torch.float32


def test_dropped_pairs_are_not_sent() -> None:
    r = routing(
        ids=[[0, 1], [2, 6], [6, 3]],
        weights=[[0.6, 0.4], [0.7, 0.3], [0.9, 0.1]],
        kept=[[True, False], [True, False], [False, True]],
    )
    slices = dispatch(r, OWNER, W)
    assert sent_pairs(slices) == [
        (0, 0, 0, pytest.approx(0.6)),
        (0, 1, 2, pytest.approx(0.7)),
        (1, 2, 3, pytest.approx(0.1)),
    ]
    assert all(sl.worker != 2 for sl in slices)  # expert 6 was only in dropped pairs


def test_token_whose_two_experts_share_a_worker_is_sent_once_to_it() -> None:
    # experts 0 and 2 both live on worker 0
    r = routing(ids=[[0, 2], [1, 3]], weights=[[0.5, 0.5], [0.5, 0.5]], kept=[[True] * 2] * 2)
    (w0, w1) = dispatch(r, OWNER, W)
    assert w0.worker == 0
    assert w0.token_index.tolist() == [0]
    assert w0.pair_token.tolist() == [0, 0]
    assert sorted(w0.pair_expert.tolist()) == [0, 2]
    assert w1.token_index.tolist() == [1]
    assert w1.pair_token.tolist() == [0, 0]


def test_token_split_over_two_workers_is_sent_to_each() -> None:
    r = routing(ids=[[0, 1]], weights=[[0.75, 0.25]], kept=[[True, True]])
    slices = dispatch(r, OWNER, W)
    assert [(sl.worker, sl.token_index.tolist()) for sl in slices] == [(0, [0]), (1, [0])]
    assert [sl.pair_weight.tolist() for sl in slices] == [[0.75], [0.25]]


def test_all_pairs_dropped_sends_nothing() -> None:
    r = routing(ids=[[0, 1], [2, 3]], weights=[[0.0, 0.0]] * 2, kept=[[False, False]] * 2)
    assert dispatch(r, OWNER, W) == []


def test_zero_tokens_sends_nothing() -> None:
    _, r = routed(0, 2, 0)
    assert dispatch(r, OWNER, W) == []


# --- combine -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("tokens", "k", "seed", "cf"), CASES)
def test_combine_of_worker_partials_equals_the_full_weighted_sum(
    tokens: int, k: int, seed: int, cf: float | None
) -> None:
    x, r = routed(tokens, k, seed, cf)
    slices = dispatch(r, OWNER, W)
    partials = [naive_partial(sl, x) for sl in slices]
    out = combine(tokens, H, slices, partials, torch.device("cpu"))
    assert out.shape == (tokens, H) and out.dtype == torch.float32
    torch.testing.assert_close(out, naive_moe(r, x), atol=ATOL, rtol=ATOL)


def test_combine_leaves_tokens_with_only_dropped_pairs_at_zero() -> None:
    r = routing(
        ids=[[0, 1], [2, 3]], weights=[[0.5, 0.5], [0.0, 0.0]], kept=[[True, True], [False, False]]
    )
    x = torch.randn(2, H)
    slices = dispatch(r, OWNER, W)
    out = combine(2, H, slices, [naive_partial(sl, x) for sl in slices], torch.device("cpu"))
    assert torch.equal(out[1], torch.zeros(H))
    torch.testing.assert_close(out, naive_moe(r, x), atol=ATOL, rtol=ATOL)


def test_combine_upcasts_low_precision_partials() -> None:
    r = routing(ids=[[0, 1]], weights=[[0.5, 0.5]], kept=[[True, True]])
    slices = dispatch(r, OWNER, W)
    partials = [torch.full((1, H), 1.5, dtype=torch.bfloat16) for _ in slices]
    out = combine(1, H, slices, partials, torch.device("cpu"))
    assert out.dtype == torch.float32
    assert torch.equal(out, torch.full((1, H), 3.0))


def test_combine_with_no_slices_is_all_zero() -> None:
    assert torch.equal(combine(3, H, [], [], torch.device("cpu")), torch.zeros(3, H))


def test_combine_rejects_a_missing_partial() -> None:
    r = routing(ids=[[0, 1]], weights=[[0.5, 0.5]], kept=[[True, True]])
    slices = dispatch(r, OWNER, W)
    with pytest.raises(ValueError):
        combine(1, H, slices, [torch.zeros(1, H)], torch.device("cpu"))
