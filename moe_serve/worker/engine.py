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
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from moe_serve.config import ModelConfig, WorkerConfig
from moe_serve.dtypes import DTYPE_NAMES
from moe_serve.errors import InvalidRequestError
from moe_serve.layer.experts import ExpertStack, SmallBatchGraphs, grouped_forward, pair_forward
from moe_serve.layer.placement import spread
from moe_serve.weights import ExpertWeights, WeightSource

log = logging.getLogger(__name__)

# Calls with at most this many pairs are checked on host lists (_validate_on_host).
HOST_CHECK_PAIRS = 64


class Progress:
    """Logs experts loaded / total, bytes and time while a worker loads its experts (at
    start, or in a reload: `what` then says so)."""

    def __init__(self, total: int, worker_id: str, what: str = "") -> None:
        self.total, self.worker_id, self.what = total, worker_id, what
        self.loaded, self.nbytes, self.start, self.last = 0, 0, time.monotonic(), 0.0

    def add(self, experts: int, nbytes: int) -> None:
        self.loaded, self.nbytes = self.loaded + experts, self.nbytes + nbytes
        now = time.monotonic()
        if now - self.last >= 2.0 or self.loaded == self.total:
            self.last = now
            log.info(
                "worker %s: %sloaded %d/%d experts (%.1f MB, %.1f s)",
                self.worker_id,
                self.what,
                self.loaded,
                self.total,
                self.nbytes / 1e6,
                now - self.start,
            )

    def done(self) -> None:
        log.info(
            "worker %s: %s%d experts ready (%.1f MB) in %.1f s",
            self.worker_id,
            self.what,
            self.loaded,
            self.nbytes / 1e6,
            time.monotonic() - self.start,
        )


@dataclass(frozen=True)
class LayerTables:
    """The experts one layer serves, as `WorkerEngine.build` made them for `install`."""

    served: tuple[int, ...]  # expert ids, in the order they were spread over the devices
    stacks: list[ExpertStack | None]  # per device; None: no expert there
    device_of: torch.Tensor  # [E] device index, -1: not served
    slot_of: torch.Tensor  # [E] slot in that device's stack


class WorkerEngine:
    """Experts of one worker for every MoE layer, stacked per device.

    A reload (moe_serve.worker.reload) changes what a layer serves while it serves: `build`
    makes the layer's new stacks off the event loop, `install` swaps them in on the loop
    between passes. What a layer serves is the experts of `worker` (the config entry) plus
    `retiring`: experts a reload took away that it still serves for a grace window.
    """

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
        self.held_count: dict[int, int] = {}  # layer -> experts served (bounds pairs per token)
        self.held_set: dict[int, frozenset[int]] = {}  # layer -> expert ids served
        self.retiring: dict[int, frozenset[int]] = {la: frozenset() for la in model.moe_layers}
        # Bumped by each `install` that stops serving an expert: a call validated before
        # then is checked again before it runs (worker.batcher).
        self.removals = 0
        self._building = 0  # `build`s under way (see `building`)
        self._on_device: dict[tuple[int, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}
        progress = Progress(sum(len(worker.experts_on(la)) for la in model.moe_layers), worker.id)
        for layer in model.moe_layers:
            self.install(layer, self.build(layer, worker.experts_on(layer), source, progress))
        progress.done()

    def build(
        self,
        layer: int,
        served: Sequence[int],
        source: WeightSource | None,
        progress: Progress | None = None,
    ) -> LayerTables:
        """Stacks that serve `served` on `layer`, spread over the devices round-robin in that
        order. An expert the layer serves already is copied from its stack (device to device,
        no file read); the others come from `source`.

        Reads the engine's tables and changes none of them, so it runs off the event loop
        (asyncio.to_thread, inside `building`) while passes run on it: torch's copies
        release the GIL."""
        m = self.model
        current = self.stacks.get(layer)
        now_device: list[int] = []
        now_slot: list[int] = []
        if current is not None:
            # Host copies of two [E] tables, once per build.
            now_device = self.device_of[layer].tolist()
            now_slot = self.slot_of[layer].tolist()
        device_of = torch.full((m.num_experts,), -1, dtype=torch.int64)
        slot_of = torch.zeros(m.num_experts, dtype=torch.int64)
        stacks: list[ExpertStack | None] = []
        for d, experts in enumerate(spread(served, len(self.devices))):
            device_of[experts] = d
            slot_of[experts] = torch.arange(len(experts))
            if not experts:
                stacks.append(None)
                continue
            weights: dict[int, ExpertWeights] = {}
            if current is not None:
                for e in experts:
                    if now_device[e] >= 0:
                        stack = current[now_device[e]]
                        assert stack is not None  # a device index names a stack
                        weights[e] = stack.expert(now_slot[e])
            missing = [e for e in experts if e not in weights]
            if missing:
                if source is None:
                    raise ValueError(f"layer {layer}: experts {missing} are not loaded yet")
                weights.update(zip(missing, source.experts(layer, missing), strict=True))
            stack = ExpertStack(
                m.expert_kind,
                m.activation,
                [weights[e] for e in experts],
                self.devices[d],
                self.dtype,
                invariant=m.batch_invariant,
            )
            if stack.device.type == "cuda":
                # Host sync, off the loop: the copies are done before the stack serves.
                torch.cuda.synchronize(stack.device)
            stacks.append(stack)
            if progress is not None:
                progress.add(len(experts), stack.nbytes())
        return LayerTables(tuple(served), stacks, device_of, slot_of)

    @contextmanager
    def building(self) -> Iterator[None]:
        """Marks `build`s under way (entered on the loop thread). Meanwhile passes capture
        no new CUDA graph: a capture forbids allocations from other threads (the build's)
        on the device, and either side would fail."""
        self._building += 1
        try:
            yield
        finally:
            self._building -= 1

    def install(self, layer: int, tables: LayerTables) -> None:
        """Serve `tables` on `layer` from now on.

        Call it on the event loop's thread: passes run there without an await
        (worker.batcher), so this one synchronous block swaps every table a pass reads
        between two passes. The old stacks are freed once nothing holds them."""
        served = frozenset(tables.served)
        if self.held_set.get(layer, served) - served:
            self.removals += 1
        self.stacks[layer] = tables.stacks
        self.device_of[layer], self.slot_of[layer] = tables.device_of, tables.slot_of
        self.held_set[layer], self.held_count[layer] = served, len(served)
        self.graphs[layer] = [
            SmallBatchGraphs(s) if s is not None and self.cuda_graphs else None
            for s in tables.stacks
        ]
        for key in [k for k in self._on_device if k[0] == layer]:
            del self._on_device[key]

    def held(self, layer: int) -> tuple[int, ...]:
        """Expert ids served on `layer` (its placement and any retiring), ascending."""
        return tuple(sorted(self.held_set[layer]))

    def placement(self, layer: int) -> tuple[int, ...]:
        """Expert ids the config gives this worker on `layer`, ascending."""
        return tuple(sorted(self.worker.experts_on(layer)))

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
            graphs = None if self._building else self.graphs[layer][d]  # see `building`
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
