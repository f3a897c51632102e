"""Replica choice: live holders only, least loaded first, ties rotating; coverage."""

from __future__ import annotations

import torch

from moe_serve.config import parse_config
from moe_serve.dispatch import WorkerSlice, regroup
from moe_serve.placement import Placement, choose_owners
from tests.conftest import world

# Expert 0 on w0 only, expert 1 on w0 and w1, expert 2 on w1 and w2.
HOLDERS = ((0,), (0, 1), (1, 2))


def test_each_expert_goes_to_its_least_loaded_live_holder() -> None:
    assert choose_owners(HOLDERS, [True] * 3, load=[5, 0, 9], turn=0) == [0, 1, 1]
    assert choose_owners(HOLDERS, [True] * 3, load=[0, 9, 3], turn=0) == [0, 0, 2]


def test_dead_holders_are_skipped_and_an_expert_without_one_gets_minus_one() -> None:
    assert choose_owners(HOLDERS, [False, True, True], load=[0, 0, 0], turn=0) == [-1, 1, 1]


def test_equally_loaded_replicas_alternate_with_the_turn() -> None:
    picks = {choose_owners(HOLDERS, [True] * 3, load=[0, 0, 0], turn=t)[1] for t in range(4)}
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
    )
    owner = torch.tensor([0, 0, 2])  # expert 1 now on w0, expert 2 on w2
    a, b = regroup(failed, owner, num_workers=3)
    assert (a.worker, a.token_index.tolist(), a.pair_weight.tolist()) == (0, [2, 5], [0.5, 0.25])
    assert (b.worker, b.token_index.tolist(), b.pair_weight.tolist()) == (2, [5, 9], [0.75, 1.0])
    assert b.pair_token.tolist() == [0, 1] and b.pair_expert.tolist() == [2, 2]
