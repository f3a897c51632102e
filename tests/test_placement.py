"""Replica choice: live holders only, tokens split by outstanding work, ties rotating."""

from __future__ import annotations

from collections import Counter

import torch

from moe_serve.config import parse_config
from moe_serve.layer.dispatch import WorkerSlice, regroup
from moe_serve.layer.placement import Placement, plan_owners, water_fill
from tests.conftest import world

# Expert 0 on w0 only, expert 1 on w0 and w1, expert 2 on w1 and w2.
HOLDERS = ((0,), (0, 1), (1, 2))
CPU = torch.device("cpu")


def test_water_fill_evens_out_the_loads() -> None:
    assert water_fill(10, (0, 0), turn=0) == [5, 5]
    assert water_fill(10, (4, 0), turn=0) == [3, 7]  # both end at 7
    assert water_fill(30, (10, 0, 5), turn=0) == [5, 15, 10]  # all end at 15
    assert water_fill(3, (20, 0, 0), turn=0) == [0, 2, 1]  # the busy one gets none


def test_water_fill_rotates_leftover_units_with_the_turn() -> None:
    assert {tuple(water_fill(1, (0, 0), turn=t)) for t in range(4)} == {(1, 0), (0, 1)}


def test_an_expert_with_one_live_holder_goes_to_it_and_dead_holders_are_skipped() -> None:
    owners = plan_owners(HOLDERS, [False, True, True], [0, 0, 0], 0, CPU, strict=True)
    assert owners.expert.tolist() == [-1, 1, 1]  # expert 0 has no live holder
    assert [s.workers for s in owners.splits] == [(1, 2)]  # only expert 2 has two live


def test_without_strict_an_expert_without_a_live_holder_goes_to_its_first() -> None:
    owners = plan_owners(HOLDERS, [False, True, True], [0, 0, 0], 0, CPU)
    assert owners.expert.tolist()[0] == 0


def test_experts_with_the_same_replicas_share_one_split() -> None:
    holders = ((0, 1), (0, 1), (2,), (1, 2))
    owners = plan_owners(holders, [True] * 3, [0, 0, 0], 0, CPU)
    assert sorted((s.workers, s.experts.nonzero().flatten().tolist()) for s in owners.splits) == [
        ((0, 1), [0, 1]),
        ((1, 2), [3]),
    ]


def test_idle_replicas_take_the_tokens_of_a_busy_one() -> None:
    # 12 tokens, each routed to experts 0 and 1, both replicated on w0 and w1; w0 has 8
    # tokens outstanding, so w1 takes 10 and w0 2 (both end at 10).
    row = torch.arange(12).repeat_interleave(2)
    expert = torch.tensor([0, 1]).repeat(12)
    owners = plan_owners(((0, 1), (0, 1)), [True, True], [8, 0], 0, CPU)
    worker = owners.of_pairs(row, expert)
    tokens_of = {w: row[worker == w].unique().numel() for w in (0, 1)}
    assert tokens_of == {0: 2, 1: 10}


def test_a_tokens_pairs_in_one_split_go_to_one_replica() -> None:
    row = torch.arange(9).repeat_interleave(2)
    expert = torch.tensor([0, 1]).repeat(9)
    worker = plan_owners(((0, 1), (0, 1)), [True, True], [0, 0], 0, CPU).of_pairs(row, expert)
    per_token = worker.reshape(9, 2)
    assert bool((per_token[:, 0] == per_token[:, 1]).all())  # each token crosses once
    assert sorted(Counter(per_token[:, 0].tolist()).values()) == [4, 5]


def test_single_tokens_alternate_between_idle_replicas() -> None:
    row, expert = torch.tensor([0]), torch.tensor([1])
    picks = {
        int(plan_owners(HOLDERS, [True] * 3, [0, 0, 0], t, CPU).of_pairs(row, expert)[0])
        for t in range(4)
    }
    assert picks == {0, 1}


def test_placement_lists_every_holder_and_checks_coverage() -> None:
    cfg = parse_config(world(workers=[{"experts": list(range(8))}, {"experts": [4, 5, 6, 7]}]))
    p = Placement.from_config(cfg)
    assert p.holders[0][0] == (0,) and p.holders[0][5] == (0, 1)
    assert p.owner[0].tolist() == [0] * 8  # the first listing, as before
    assert p.covered([True, False]) and not p.covered([False, True])


def test_regroup_moves_a_failed_slice_to_new_owners_keeping_rows_and_weights() -> None:
    failed = WorkerSlice(
        worker=1,
        token_index=torch.tensor([2, 5, 9]),
        pair_token=torch.tensor([0, 1, 1, 2], dtype=torch.int32),
        pair_expert=torch.tensor([1, 1, 2, 2], dtype=torch.int32),
        pair_weight=torch.tensor([0.5, 0.25, 0.75, 1.0]),
        pair_index=torch.tensor([4, 10, 11, 18]),
    )
    owner = torch.tensor([0, 0, 2])  # expert 1 now on w0, expert 2 on w2
    a, b = regroup(failed, owner, num_workers=3)
    assert (a.worker, a.token_index.tolist(), a.pair_weight.tolist()) == (0, [2, 5], [0.5, 0.25])
    assert (b.worker, b.token_index.tolist(), b.pair_weight.tolist()) == (2, [5, 9], [0.75, 1.0])
    assert b.pair_token.tolist() == [0, 1] and b.pair_expert.tolist() == [2, 2]
    # Each pair keeps its place in the routing, where the combine puts its output.
    assert a.pair_index.tolist() == [4, 10] and b.pair_index.tolist() == [11, 18]


def test_regroup_splits_a_failed_slice_among_the_live_replicas() -> None:
    failed = WorkerSlice(
        worker=2,
        token_index=torch.arange(6),
        pair_token=torch.arange(6, dtype=torch.int32),
        pair_expert=torch.ones(6, dtype=torch.int32),
        pair_weight=torch.full((6,), 0.5),
        pair_index=torch.arange(6) * 2,
    )
    owners = plan_owners(((0,), (0, 1, 2)), [True, True, False], [0, 0, 0], 0, CPU, strict=True)
    a, b = regroup(failed, owners, num_workers=3)
    assert (a.worker, a.token_index.tolist()) == (0, [0, 1, 2])
    assert (b.worker, b.token_index.tolist()) == (1, [3, 4, 5])
