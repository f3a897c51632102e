"""Which worker serves each expert, and on which of its devices each expert lives.

An expert listed on several workers has replicas; until replica load-spreading
lands, the master sends to the first worker that lists it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moe_serve.config import WorkerConfig, WorldConfig


@dataclass(frozen=True)
class Placement:
    """Expert -> worker index, per MoE layer."""

    worker_ids: tuple[str, ...]
    owner: dict[int, torch.Tensor]  # layer -> [E] int64 index into worker_ids

    @classmethod
    def from_config(cls, cfg: WorldConfig) -> Placement:
        owner: dict[int, torch.Tensor] = {}
        for layer in cfg.model.moe_layers:
            table = torch.full((cfg.model.num_experts,), -1, dtype=torch.int64)
            for w in reversed(range(len(cfg.workers))):  # reversed: the first listing wins
                experts = list(cfg.workers[w].experts_on(layer))
                table[experts] = w
            owner[layer] = table
        return cls(worker_ids=tuple(w.id for w in cfg.workers), owner=owner)


def device_assignment(worker: WorkerConfig, layer: int) -> list[list[int]]:
    """Experts of `worker` on `layer`, split over its devices round-robin in listed order."""
    groups: list[list[int]] = [[] for _ in worker.devices]
    for i, expert in enumerate(worker.experts_on(layer)):
        groups[i % len(worker.devices)].append(expert)
    return groups
