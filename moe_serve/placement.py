"""Which workers hold each expert, which one serves it now, and on which device it lives.

An expert listed on several workers has replicas. For each batch the master sends an
expert's pairs to its live replica with the least outstanding work (`choose_owners`), so
load spreads, and a dead worker's experts move to their other replicas.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moe_serve.config import WorkerConfig, WorldConfig


@dataclass(frozen=True)
class Placement:
    """Expert -> worker indices holding it, per MoE layer."""

    worker_ids: tuple[str, ...]
    owner: dict[int, torch.Tensor]  # layer -> [E] int64: the first worker listing each expert
    holders: dict[int, tuple[tuple[int, ...], ...]]  # layer -> per expert, in config order

    @classmethod
    def from_config(cls, cfg: WorldConfig) -> Placement:
        owner: dict[int, torch.Tensor] = {}
        holders: dict[int, tuple[tuple[int, ...], ...]] = {}
        for layer in cfg.model.moe_layers:
            held: list[list[int]] = [[] for _ in range(cfg.model.num_experts)]
            for w, worker in enumerate(cfg.workers):
                for e in worker.experts_on(layer):
                    held[e].append(w)
            holders[layer] = tuple(tuple(h) for h in held)
            owner[layer] = torch.tensor([h[0] if h else -1 for h in held], dtype=torch.int64)
        return cls(worker_ids=tuple(w.id for w in cfg.workers), owner=owner, holders=holders)

    def covered(self, live: list[bool]) -> bool:
        """Whether every expert of every layer has a live holder."""
        return all(any(live[w] for w in h) for layer in self.holders.values() for h in layer)


def choose_owners(
    holders: tuple[tuple[int, ...], ...], live: list[bool], load: list[int], turn: int
) -> list[int]:
    """Per expert, the live holder with the least load (ties: rotate with `turn`, so equal
    replicas alternate); -1 for an expert with no live holder."""
    out = []
    for h in holders:
        best, best_key = -1, None
        for i, w in enumerate(h):
            if live[w]:
                key = (load[w], (i - turn) % len(h))
                if best_key is None or key < best_key:
                    best, best_key = w, key
        out.append(best)
    return out


def device_assignment(worker: WorkerConfig, layer: int) -> list[list[int]]:
    """Experts of `worker` on `layer`, split over its devices round-robin in listed order."""
    groups: list[list[int]] = [[] for _ in worker.devices]
    for i, expert in enumerate(worker.experts_on(layer)):
        groups[i % len(worker.devices)].append(expert)
    return groups
