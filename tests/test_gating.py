"""Gate maths against naive per-token Python: scores, top-k, capacity, auxiliary losses."""

from __future__ import annotations

import math

import pytest
import torch

from moe_serve.config import RoutingConfig
from moe_serve.layer.gating import (
    capacity_mask,
    expert_capacity,
    gate_scores,
    importance_loss,
    load_balance_loss,
    route,
    select_top_k,
)

H, E = 16, 8
ATOL = 1e-6
Matrix = list[list[float]]


def close(actual: torch.Tensor, expected: object) -> None:
    """float32 result equals a float64 Python reference to 1e-6."""
    exp = torch.as_tensor(expected, dtype=torch.float64)
    torch.testing.assert_close(actual.double(), exp, atol=ATOL, rtol=ATOL)


def inputs(tokens: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random hidden states [T, H] and router [E, H] in float32."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, H, generator=g)
    router = (torch.rand(E, H, generator=g) * 2 - 1) * 0.5
    return x, router


# --- naive reference ---------------------------------------------------------------------------


def naive_scores(x: torch.Tensor, router: torch.Tensor, scoring: str) -> Matrix:
    rows = []
    for xt in x.tolist():
        logits = [sum(a * b for a, b in zip(xt, we, strict=True)) for we in router.tolist()]
        if scoring == "softmax":
            m = max(logits)
            exps = [math.exp(v - m) for v in logits]
            rows.append([v / sum(exps) for v in exps])
        else:
            rows.append([1.0 / (1.0 + math.exp(-v)) for v in logits])
    return rows


def naive_top_k(scores: Matrix, k: int, normalize: bool) -> tuple[list[list[int]], Matrix]:
    ids, weights = [], []
    for row in scores:
        best = sorted(range(len(row)), key=lambda e: -row[e])[:k]
        w = [row[e] for e in best]
        if normalize:
            total = sum(w)
            w = [v / total for v in w]
        ids.append(best)
        weights.append(w)
    return ids, weights


def naive_capacity_mask(ids: list[list[int]], num_experts: int, capacity: int) -> list[list[bool]]:
    """All first choices (earlier tokens first), then all second choices, and so on."""
    tokens = len(ids)
    k = len(ids[0]) if ids else 0
    used = [0] * num_experts
    kept = [[False] * k for _ in range(tokens)]
    for choice in range(k):
        for t in range(tokens):
            e = ids[t][choice]
            if used[e] < capacity:
                used[e] += 1
                kept[t][choice] = True
    return kept


def naive_load_balance_loss(scores: Matrix, ids: list[list[int]]) -> float:
    num_experts, tokens = len(scores[0]), len(scores)
    pairs = [e for row in ids for e in row]
    f = [pairs.count(e) / len(pairs) for e in range(num_experts)]
    p = [sum(row[e] for row in scores) / tokens for e in range(num_experts)]
    return num_experts * sum(fi * pi for fi, pi in zip(f, p, strict=True))


def naive_importance_loss(scores: Matrix) -> float:
    importance = [sum(row[e] for row in scores) for e in range(len(scores[0]))]
    mean = sum(importance) / len(importance)
    var = sum((v - mean) ** 2 for v in importance) / len(importance)
    return var / mean**2


# --- gate_scores and select_top_k --------------------------------------------------------------


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_gate_scores_match_naive(scoring: str) -> None:
    x, router = inputs(12)
    scores = gate_scores(x, router, scoring)
    assert scores.shape == (12, E) and scores.dtype == torch.float32
    close(scores, naive_scores(x, router, scoring))


def test_softmax_scores_sum_to_one_per_token() -> None:
    x, router = inputs(12)
    close(gate_scores(x, router, "softmax").sum(dim=-1), [1.0] * 12)


def test_gate_scores_are_float32_for_bfloat16_inputs() -> None:
    x, router = inputs(4)
    scores = gate_scores(x.bfloat16(), router.bfloat16(), "softmax")
    assert scores.dtype == torch.float32
    close(scores, naive_scores(x.bfloat16().float(), router.bfloat16().float(), "softmax"))


@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_select_top_k_matches_naive(k: int, normalize: bool, scoring: str) -> None:
    x, router = inputs(16, seed=k)
    scores = gate_scores(x, router, scoring)
    ids, weights = select_top_k(scores, k, normalize)
    want_ids, want_weights = naive_top_k(scores.tolist(), k, normalize)
    assert ids.dtype == torch.int64
    assert ids.tolist() == want_ids
    close(weights, want_weights)


def test_normalized_top_k_weights_sum_to_one() -> None:
    x, router = inputs(10)
    _, weights = select_top_k(gate_scores(x, router, "sigmoid"), 4, normalize=True)
    close(weights.sum(dim=-1), [1.0] * 10)


# --- capacity ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cf", "tokens", "k", "experts", "expected"),
    [
        (1.0, 8, 2, 4, 4),
        (1.25, 10, 2, 4, 7),  # 6.25 -> 7
        (0.5, 3, 1, 4, 1),  # 0.375 -> 1
        (2.0, 5, 1, 8, 2),  # 1.25 -> 2
        (1.0, 1, 1, 8, 1),
        (1.5, 0, 2, 4, 0),
    ],
)
def test_expert_capacity_is_ceil_of_cf_t_k_over_e(
    cf: float, tokens: int, k: int, experts: int, expected: int
) -> None:
    assert expert_capacity(cf, tokens, k, experts) == expected
    assert expected == math.ceil(cf * tokens * k / experts)


def test_capacity_priority_is_choice_major() -> None:
    # Choice-major order: (t0,c0)->0 (t1,c0)->0 (t2,c0)->1 (t0,c1)->1 (t1,c1)->2 (t2,c1)->0.
    # Token-major order would keep (t0,c1) on expert 1 instead of (t2,c0).
    ids = torch.tensor([[0, 1], [0, 2], [1, 0]])
    kept = capacity_mask(ids, num_experts=3, capacity=1)
    assert kept.tolist() == [[True, False], [False, True], [True, False]]


def test_capacity_keeps_earlier_tokens_first_within_a_choice() -> None:
    ids = torch.tensor([[2], [2], [2], [1], [2]])
    kept = capacity_mask(ids, num_experts=3, capacity=2)
    assert kept.tolist() == [[True], [True], [False], [True], [False]]


@pytest.mark.parametrize("capacity", [0, 1, 2, 3, 5, 100])
@pytest.mark.parametrize("k", [1, 2, 4])
def test_capacity_mask_matches_naive(capacity: int, k: int) -> None:
    g = torch.Generator().manual_seed(capacity * 10 + k)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(20)])
    kept = capacity_mask(ids, E, capacity)
    assert kept.dtype == torch.bool and kept.shape == ids.shape
    assert kept.tolist() == naive_capacity_mask(ids.tolist(), E, capacity)


# --- route -------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_route_without_capacity_matches_naive(k: int, normalize: bool, scoring: str) -> None:
    x, router = inputs(24, seed=100 + k)
    cfg = RoutingConfig(scoring=scoring, normalize_topk=normalize)
    r = route(x, router, k, cfg)
    scores = naive_scores(x, router, scoring)
    ids, weights = naive_top_k(scores, k, normalize)
    close(r.scores, scores)
    assert r.expert_ids.tolist() == ids
    close(r.weights, weights)
    assert r.kept.all()
    assert r.dropped_pairs.item() == 0
    close(r.load_balance_loss, naive_load_balance_loss(scores, ids))
    close(r.importance_loss, naive_importance_loss(scores))


@pytest.mark.parametrize("cf", [0.5, 1.0, 1.25])
@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_route_with_capacity_matches_naive(cf: float, k: int, scoring: str) -> None:
    tokens = 24
    x, router = inputs(tokens, seed=200 + k)
    x[:12] += router[0] * 4  # half the tokens crowd expert 0, so every cf drops pairs
    r = route(x, router, k, RoutingConfig(scoring=scoring, capacity_factor=cf))
    scores = naive_scores(x, router, scoring)
    ids, weights = naive_top_k(scores, k, normalize=True)
    kept = naive_capacity_mask(ids, E, math.ceil(cf * tokens * k / E))
    dropped = sum(not kp for row in kept for kp in row)
    assert dropped > 0
    assert r.expert_ids.tolist() == ids
    assert r.kept.tolist() == kept
    assert r.dropped_pairs.item() == dropped
    masked = [
        [w if keep else 0.0 for w, keep in zip(w_row, k_row, strict=True)]
        for w_row, k_row in zip(weights, kept, strict=True)
    ]
    close(r.weights, masked)  # renormalised over the top k first, then dropped pairs zeroed
    # the auxiliary losses see the choices before capacity is applied
    close(r.load_balance_loss, naive_load_balance_loss(scores, ids))
    close(r.importance_loss, naive_importance_loss(scores))


def test_route_dropped_pairs_have_zero_weight_and_are_not_kept() -> None:
    x, router = inputs(32, seed=7)
    r = route(x, router, 2, RoutingConfig(capacity_factor=0.5))
    assert r.dropped_pairs.item() == int((~r.kept).sum()) > 0
    assert (r.weights[~r.kept] == 0).all()
    assert (r.weights[r.kept] > 0).all()


def test_route_with_ample_capacity_drops_nothing() -> None:
    x, router = inputs(16, seed=3)
    plain = route(x, router, 2, RoutingConfig())
    capped = route(x, router, 2, RoutingConfig(capacity_factor=float(E)))
    assert capped.dropped_pairs.item() == 0
    assert torch.equal(capped.weights, plain.weights)


@pytest.mark.parametrize("cf", [None, 1.0])
def test_route_on_zero_tokens_gives_empty_outputs_and_zero_losses(cf: float | None) -> None:
    _, router = inputs(0)
    r = route(torch.zeros(0, H), router, 2, RoutingConfig(capacity_factor=cf))
    assert r.expert_ids.shape == (0, 2)
    assert r.weights.shape == (0, 2)
    assert r.kept.shape == (0, 2)
    assert r.scores.shape == (0, E)
    assert r.dropped_pairs.item() == 0
    assert r.load_balance_loss.item() == 0.0
    assert r.importance_loss.item() == 0.0


# --- auxiliary losses --------------------------------------------------------------------------


def uniform_one_hot_routing() -> tuple[torch.Tensor, torch.Tensor]:
    """E tokens; token t is a one-hot along expert t's router row, so each expert wins once."""
    router = torch.zeros(E, H)
    router[torch.arange(E), torch.arange(E)] = 1.0
    x = torch.zeros(E, H)
    x[torch.arange(E), torch.arange(E)] = 3.0
    return x, router


def test_load_balance_loss_is_one_for_perfectly_uniform_routing() -> None:
    x, router = uniform_one_hot_routing()
    r = route(x, router, 1, RoutingConfig())
    assert sorted(r.expert_ids.flatten().tolist()) == list(range(E))
    close(r.load_balance_loss, 1.0)


def test_load_balance_loss_is_one_when_every_expert_gets_the_same_number_of_pairs() -> None:
    # f_i = 1/E for all i; softmax scores sum to 1 per token, so E * sum f_i P_i = 1
    x, router = inputs(E, seed=5)
    scores = gate_scores(x, router, "softmax")
    ids = torch.tensor([[t, (t + 1) % E] for t in range(E)])
    close(load_balance_loss(scores, ids), 1.0)


def test_load_balance_loss_matches_naive_for_skewed_routing() -> None:
    x, router = inputs(10, seed=9)
    scores = gate_scores(x, router, "softmax")
    ids = torch.tensor([[0, 1]] * 7 + [[2, 3]] * 3)
    loss = load_balance_loss(scores, ids)
    close(loss, naive_load_balance_loss(scores.tolist(), ids.tolist()))


def test_importance_loss_is_zero_for_equal_importance() -> None:
    x, router = uniform_one_hot_routing()
    close(importance_loss(gate_scores(x, router, "softmax")), 0.0)
    close(importance_loss(torch.full((5, E), 0.3)), 0.0)


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_importance_loss_matches_naive(scoring: str) -> None:
    x, router = inputs(12, seed=11)
    scores = gate_scores(x, router, scoring)
    close(importance_loss(scores), naive_importance_loss(scores.tolist()))
