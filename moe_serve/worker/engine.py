"""A worker's experts pinned on its devices, and the batched forward over them.

The engine knows nothing about gating or the network: it receives tokens with
(expert, weight) pairs and returns one weighted partial sum per token, or each pair's
expert output for the master to weight and sum (model.batch_invariant).
Legend: N tokens, P (token, expert) pairs, H hidden size, E experts of the model.
"""

from __future__ import annotations

import logging
import math
import time

import torch

from moe_serve.config import ModelConfig, WorkerConfig
from moe_serve.dtypes import DTYPE_NAMES
from moe_serve.errors import InvalidRequestError
from moe_serve.layer.experts import ExpertStack, SmallBatchGraphs, grouped_forward, pair_forward
from moe_serve.layer.placement import device_assignment
from moe_serve.weights import WeightSource

log = logging.getLogger(__name__)

# Calls with at most this many pairs are checked on host lists (_validate_on_host).
HOST_CHECK_PAIRS = 64


class _Progress:
    """Logs experts loaded / total, bytes and time while a worker loads its experts."""

    def __init__(self, total: int, worker_id: str) -> None:
        self.total, self.worker_id = total, worker_id
        self.loaded, self.nbytes, self.start, self.last = 0, 0, time.monotonic(), 0.0

    def add(self, experts: int, nbytes: int) -> None:
        self.loaded, self.nbytes = self.loaded + experts, self.nbytes + nbytes
        now = time.monotonic()
        if now - self.last >= 2.0 or self.loaded == self.total:
            self.last = now
            log.info(
                "worker %s: loaded %d/%d experts (%.1f MB, %.1f s)",
                self.worker_id,
                self.loaded,
                self.total,
                self.nbytes / 1e6,
                now - self.start,
            )

    def done(self) -> None:
        log.info(
            "worker %s: %d experts ready (%.1f MB) in %.1f s",
            self.worker_id,
            self.loaded,
            self.nbytes / 1e6,
            time.monotonic() - self.start,
        )


class WorkerEngine:
    """Experts of one worker for every MoE layer, stacked per device."""

    def __init__(
        self,
        model: ModelConfig,
        worker: WorkerConfig,
        source: WeightSource,
        cuda_graphs: bool = True,
    ) -> None:
        self.model, self.worker = model, worker
        self.dtype = DTYPE_NAMES[model.dtype]
        self.devices = [torch.device(d) for d in worker.devices]
        self.stacks: dict[int, list[ExpertStack | None]] = {}
        self.cuda_graphs = cuda_graphs
        self.graphs: dict[int, list[SmallBatchGraphs | None]] = {}
        self.device_of: dict[int, torch.Tensor] = {}  # layer -> [E] device index, -1: not held
        self.slot_of: dict[int, torch.Tensor] = {}  # layer -> [E] slot in that device's stack
        self.held_count: dict[int, int] = {}  # layer -> experts held (bounds pairs per token)
        self.held_set: dict[int, frozenset[int]] = {}  # layer -> expert ids held
        self._on_device: dict[tuple[int, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}
        progress = _Progress(sum(len(worker.experts_on(la)) for la in model.moe_layers), worker.id)
        for layer in model.moe_layers:
            self._load_layer(layer, source, progress)
        progress.done()

    def _load_layer(self, layer: int, source: WeightSource, progress: _Progress) -> None:
        m = self.model
        device_of = torch.full((m.num_experts,), -1, dtype=torch.int64)
        slot_of = torch.zeros(m.num_experts, dtype=torch.int64)
        stacks: list[ExpertStack | None] = []
        for d, experts in enumerate(device_assignment(self.worker, layer)):
            device_of[experts] = d
            slot_of[experts] = torch.arange(len(experts))
            if not experts:
                stacks.append(None)
                continue
            weights = source.experts(layer, experts)
            stack = ExpertStack(
                m.expert_kind,
                m.activation,
                weights,
                self.devices[d],
                self.dtype,
                invariant=m.batch_invariant,
            )
            stacks.append(stack)
            progress.add(len(experts), stack.nbytes())
        self.stacks[layer], self.device_of[layer], self.slot_of[layer] = stacks, device_of, slot_of
        self.held_set[layer] = frozenset(self.worker.experts_on(layer))
        self.held_count[layer] = len(self.held_set[layer])
        self.graphs[layer] = [
            SmallBatchGraphs(s) if s is not None and self.cuda_graphs else None for s in stacks
        ]

    def held(self, layer: int) -> tuple[int, ...]:
        """Expert ids held on `layer`, ascending."""
        return tuple((self.device_of[layer] >= 0).nonzero().flatten().tolist())

    def validate(
        self,
        layer: int,
        tokens: int,
        pair_token: torch.Tensor,
        pair_expert: torch.Tensor,
        pair_weight: torch.Tensor,
    ) -> None:
        """Raise InvalidRequestError unless each pair names a request row and a held expert.

        The pair count is checked first, from the shapes alone: at most `tokens` x (experts
        held on `layer`) pairs, so a call with one token and millions of pairs costs its
        message and nothing more (no [P] temporaries, no [P, H] gather).
        """
        P = pair_token.shape[0]
        if pair_expert.shape[0] != P or pair_weight.shape[0] != P:
            raise InvalidRequestError(
                "pair_expert/pair_weight.shape",
                f"lengths {pair_expert.shape[0]}/{pair_weight.shape[0]}; expected {P} "
                "(one per pair_token)",
            )
        held = self.held_count[layer]
        most = tokens * held
        if most < P:
            raise InvalidRequestError(
                "pair_token.shape[0]",
                f"{P} pairs for {tokens} tokens; expected at most {most} (tokens x "
                f"the {held} experts worker {self.worker.id!r} holds on layer {layer})",
            )
        if P == 0:
            return
        if P <= HOST_CHECK_PAIRS and pair_token.device.type == "cpu":
            self._validate_on_host(layer, tokens, pair_token, pair_expert, pair_weight)
            return
        # Edge checks on a small index tensor; each reads one scalar back to the host.
        if bool(((pair_token < 0) | (pair_token >= tokens)).any()):
            raise InvalidRequestError("pair_token", f"values must be in [0, {tokens})")
        E = self.model.num_experts
        if bool(((pair_expert < 0) | (pair_expert >= E)).any()):
            raise InvalidRequestError("pair_expert", f"values must be in [0, {E})")
        if bool((self.device_of[layer][pair_expert.long()] < 0).any()):
            raise InvalidRequestError(
                "pair_expert",
                f"names an expert not held by worker {self.worker.id!r} on layer {layer}; "
                f"held: {list(self.held(layer))}",
            )
        if not bool(torch.isfinite(pair_weight).all()):
            raise InvalidRequestError("pair_weight", "contains NaN or Inf")

    def _validate_on_host(
        self,
        layer: int,
        tokens: int,
        pair_token: torch.Tensor,
        pair_expert: torch.Tensor,
        pair_weight: torch.Tensor,
    ) -> None:
        """`validate`'s checks, in its order and with its messages, on Python lists: for the
        few pairs of a small call (top_k per token) ten tensor ops cost ~60 µs on a CPU,
        three tolist() calls ~1 µs."""
        if any(t < 0 or t >= tokens for t in pair_token.tolist()):
            raise InvalidRequestError("pair_token", f"values must be in [0, {tokens})")
        E, experts = self.model.num_experts, pair_expert.tolist()
        if any(e < 0 or e >= E for e in experts):
            raise InvalidRequestError("pair_expert", f"values must be in [0, {E})")
        held = self.held_set[layer]
        if any(e not in held for e in experts):
            raise InvalidRequestError(
                "pair_expert",
                f"names an expert not held by worker {self.worker.id!r} on layer {layer}; "
                f"held: {list(self.held(layer))}",
            )
        if not all(math.isfinite(w) for w in pair_weight.tolist()):
            raise InvalidRequestError("pair_weight", "contains NaN or Inf")

    @torch.inference_mode()
    def forward(
        self,
        layer: int,
        hidden: torch.Tensor,
        pair_token: torch.Tensor,
        pair_expert: torch.Tensor,
        pair_weight: torch.Tensor,
        out_device: torch.device | str = "cpu",
        pairs: bool = False,
    ) -> torch.Tensor:
        """hidden [N, H] (any device), pairs [P] (validated) -> partial sums [N, H] in the
        model dtype on `out_device`; with `pairs`, each pair's expert output [P, H]
        unweighted (pair_weight unused), in the pairs' order.

        Per-device partials are summed on the first device used (per-device pair outputs
        land in their rows there), then copied once to `out_device`. With one device (the
        common case) nothing on the way syncs the host when the grouped GEMM runs.
        """
        stacks = [(d, s) for d, s in enumerate(self.stacks[layer]) if s is not None]
        expert = pair_expert.long()
        token, weight = pair_token.long(), pair_weight.float()
        device_of, slot_of = self._tables(layer, expert.device)
        slot = slot_of[expert]
        out: torch.Tensor | None = None
        for d, stack in stacks:
            dev = stack.device
            sel = None
            if len(stacks) == 1:
                t, sl, w = token, slot, weight
            else:
                # Host sync: which pairs this device runs decides the batch it gets.
                sel = (device_of[expert] == d).nonzero().flatten()
                if sel.numel() == 0:
                    continue
                t, sl, w = token[sel], slot[sel], weight[sel]
            # The whole [N, H] block moves: picking only this device's rows would need
            # the distinct tokens on the host first (a sync), to save at most a copy.
            h, t, sl = hidden.to(dev, self.dtype), t.to(dev), sl.to(dev)
            graphs = self.graphs[layer][d]
            if graphs is not None and graphs.fits(hidden.shape[0], t.shape[0]):
                part = graphs(h, t, sl, w.to(dev), pairs=pairs)
            elif pairs:
                part = pair_forward(stack, h, t, sl)
            else:
                part = grouped_forward(stack, h, t, sl, w.to(dev))
            if pairs and sel is not None:  # this device's rows of the [P, H] output
                if out is None:
                    out = torch.zeros(
                        (token.shape[0], hidden.shape[1]), dtype=self.dtype, device=dev
                    )
                out[sel.to(out.device)] = part.to(out.device)
            else:
                out = part if out is None else out.add_(part.to(out.device))
        if out is None:
            rows = token.shape[0] if pairs else hidden.shape[0]
            out = torch.zeros((rows, hidden.shape[1]), dtype=torch.float32)
        return out.to(out_device, self.dtype)

    def _tables(self, layer: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """device_of and slot_of of `layer` on `device` (where the pairs are), copied once."""
        key = (layer, device)
        if key not in self._on_device:
            self._on_device[key] = (
                self.device_of[layer].to(device),
                self.slot_of[layer].to(device),
            )
        return self._on_device[key]

    def memory_bytes(self) -> dict[str, int]:
        """Per device: torch's allocated bytes on CUDA, expert weight bytes on CPU."""
        out: dict[str, int] = {}
        for i, dev in enumerate(self.devices):
            name = self.worker.devices[i]
            if dev.type == "cuda":
                out[name] = torch.cuda.memory_allocated(dev)
            else:
                out[name] = out.get(name, 0) + sum(
                    s.nbytes() for stacks in self.stacks.values() if (s := stacks[i]) is not None
                )
        return out
