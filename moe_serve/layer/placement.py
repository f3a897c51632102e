"""Which workers hold each expert, which one serves each (token, expert) pair, and where.

An expert listed on several workers has replicas. For each batch the master divides the
tokens routed to replicated experts among their live replicas so that the outstanding work
of each replica ends up as even as possible (`plan_owners`, `Owners.of_pairs`): an idle
replica takes more, a busy one less, and a dead worker's experts move to the others.
Tokens are divided in contiguous runs, so a token whose experts share a replica set still
crosses the network once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate

import torch

from moe_serve.config import WorkerConfig, WorldConfig

# layer -> the experts a worker holds (or is to hold) on it
Holdings = dict[int, frozenset[int]]


def holdings(worker: WorkerConfig, layers: Sequence[int]) -> Holdings:
    """What the config gives `worker`, per layer."""
    return {la: frozenset(worker.experts_on(la)) for la in layers}


@dataclass(frozen=True)
class Placement:
    """Expert -> worker indices holding it, per MoE layer."""

    worker_ids: tuple[str, ...]
    owner: dict[int, torch.Tensor]  # layer -> [E] int64: the first worker listing each expert
    holders: dict[int, tuple[tuple[int, ...], ...]]  # layer -> per expert, in config order

    @classmethod
    def from_config(cls, cfg: WorldConfig) -> Placement:
        """Each expert on the workers the config lists it on, indexed in config order."""
        listed = [holdings(w, cfg.model.moe_layers) for w in cfg.workers]
        return cls.serving(tuple(w.id for w in cfg.workers), listed, listed, cfg.model.num_experts)

    @classmethod
    def serving(
        cls,
        worker_ids: tuple[str, ...],
        configured: list[Holdings],
        reported: list[Holdings],
        num_experts: int,
    ) -> Placement:
        """Who serves each expert while a world changes (a reload): per worker index, what
        the config gives it (`configured`; nothing for a worker the config dropped) and what
        it last said it serves (`reported`: held plus retiring). An expert goes to the
        workers that both are configured for it and report it; while none of those reports
        it yet (loading), to whoever still reports it (the workers it moves from, in their
        grace window); failing both, to its configured holders (calls then find them
        back, or fail UNAVAILABLE naming them)."""
        layers = sorted({la for h in configured for la in h})
        owner: dict[int, torch.Tensor] = {}
        holders: dict[int, tuple[tuple[int, ...], ...]] = {}
        empty: frozenset[int] = frozenset()
        for layer in layers:
            per_expert = []
            for e in range(num_experts):
                listed = [w for w, h in enumerate(configured) if e in h.get(layer, empty)]
                says = [w for w, h in enumerate(reported) if e in h.get(layer, empty)]
                ready = [w for w in listed if w in says]
                per_expert.append(tuple(ready or says or listed))
            holders[layer] = tuple(per_expert)
            owner[layer] = torch.tensor([h[0] if h else -1 for h in per_expert], dtype=torch.int64)
        return cls(worker_ids=worker_ids, owner=owner, holders=holders)

    def covered(self, live: list[bool]) -> bool:
        """Whether every expert of every layer has a live holder."""
        return all(any(live[w] for w in h) for layer in self.holders.values() for h in layer)


def water_fill(n: int, loads: tuple[int, ...], turn: int) -> list[int]:
    """Shares of `n` new units among replicas with `loads` units outstanding, so that the
    loads afterwards are as even as integers allow: the least loaded are topped up first;
    units left over after an even split go to equally loaded replicas in an order rotated
    by `turn` (so single tokens alternate)."""
    m = len(loads)
    order = sorted(range(m), key=lambda i: (loads[i], (i - turn) % m))
    k, total = 1, loads[order[0]]
    while k < m and (n + total) > loads[order[k]] * k:  # the level still rises above order[k]
        total += loads[order[k]]
        k += 1
    level, extra = divmod(n + total, k)
    shares = [0] * m
    for j in range(k):
        shares[order[j]] = level - loads[order[j]] + (1 if j < extra else 0)
    return shares


@dataclass(frozen=True)
class ReplicaSplit:
    """Replicated experts with the same live replicas: their tokens are divided among them."""

    experts: torch.Tensor  # [E] bool: the experts of this split
    workers: tuple[int, ...]  # the live replicas
    loads: tuple[int, ...]  # their outstanding tokens when the batch was planned
    turn: int


@dataclass(frozen=True)
class Owners:
    """Who computes the pairs of one batch.

    `expert`: [E] worker per expert (for a split expert, its first live replica); -1 for
    an expert without a live replica. `splits`: experts whose tokens are divided among
    replicas instead.
    """

    expert: torch.Tensor
    splits: tuple[ReplicaSplit, ...] = ()

    def of_pairs(self, row: torch.Tensor, expert: torch.Tensor) -> torch.Tensor:
        """[P] worker of each pair; `row` [P] must hold equal rows next to each other
        (token-major pairs), so that a token's pairs in one split go to one replica."""
        worker = self.expert[expert]
        if not self.splits:
            return worker
        # No boolean indexing here: on a GPU each masked select or assignment would be a
        # device sync; the only one is the read of the token counts below.
        first = torch.ones_like(row, dtype=torch.bool)
        first[1:] = row[1:] != row[:-1]  # a new token starts where the row changes
        token = first.cumsum(0) - 1  # [P] token of each pair, 0..T'-1
        masks, ranks, counts = [], [], []
        for s in self.splits:
            mask = s.experts.to(expert.device)[expert]  # [P] pair is in this split
            in_split = torch.zeros_like(token).scatter_reduce(0, token, mask.long(), "amax")
            masks.append(mask)
            ranks.append((in_split.cumsum(0) - 1)[token])  # token rank within the split
            counts.append(in_split.sum())
        # Host sync: the token counts decide the shares (one read for every split).
        tokens = torch.stack(counts).tolist()
        for s, mask, rank, n in zip(self.splits, masks, ranks, tokens, strict=True):
            if n == 0:
                continue
            bounds = torch.tensor(
                list(accumulate(water_fill(n, s.loads, s.turn))), device=rank.device
            )
            workers = torch.tensor(s.workers, dtype=worker.dtype, device=worker.device)
            # Pairs outside the split get some valid index too; `where` keeps their worker.
            picked = workers[torch.searchsorted(bounds, rank.clamp(min=0), right=True)]
            worker = torch.where(mask, picked, worker)
        return worker


def plan_owners(
    holders: tuple[tuple[int, ...], ...],
    live: list[bool],
    load: list[int],
    turn: int,
    device: torch.device,
    strict: bool = False,
) -> Owners:
    """The owners of one batch: an expert with one live holder goes to it; experts with
    several are grouped by their live replica set and split (`Owners.of_pairs`). An expert
    without a live holder goes to its first holder (the call then fails or finds it back),
    or with `strict` gets -1."""
    expert: list[int] = []
    groups: dict[tuple[int, ...], list[int]] = {}
    for e, h in enumerate(holders):
        up = tuple(w for w in h if live[w])
        expert.append(up[0] if up else (-1 if strict else h[0]))
        if len(up) > 1:
            groups.setdefault(up, []).append(e)
    splits = []
    for workers, experts in groups.items():
        mask = torch.zeros(len(holders), dtype=torch.bool)
        mask[experts] = True
        loads = tuple(load[w] for w in workers)
        splits.append(ReplicaSplit(mask.to(device), workers, loads, turn))
    return Owners(torch.tensor(expert, dtype=torch.int64, device=device), tuple(splits))


def spread(experts: Sequence[int], devices: int) -> list[list[int]]:
    """`experts` over `devices` devices round-robin, in the given order."""
    groups: list[list[int]] = [[] for _ in range(devices)]
    for i, expert in enumerate(experts):
        groups[i % devices].append(expert)
    return groups


def device_assignment(worker: WorkerConfig, layer: int) -> list[list[int]]:
    """Experts of `worker` on `layer`, split over its devices round-robin in listed order."""
    return spread(worker.experts_on(layer), len(worker.devices))
