"""Dynamic batching: Forward calls arriving within a short window become one forward pass.

The shared loop (`moe_serve.batching`): the first waiting call opens a window of
`max_delay_us`; calls that arrive before it closes join the batch until `max_batch_tokens`
is reached. Calls of different layers in one window run as one pass per layer.

The forward runs on the event loop's own thread. On a worker thread, every torch op
releases and retakes the GIL, and each retake can wait for the interpreter's switch
interval (5 ms) while the loop thread holds it: a 4096-token Mixtral forward took 7-9 ms
that way against 1.2 ms inline (2x H200, benchmarks/results). Calls that arrive during
a forward wait in gRPC's queue and join the next batch.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from moe_serve.batching import Batcher, TokenBudget
from moe_serve.config import BatchingConfig
from moe_serve.errors import InvalidRequestError, MoEError
from moe_serve.layer.rowwise import ordered_sum
from moe_serve.metrics import Children, WorkerMetrics
from moe_serve.tracing import NO_TRACING, WORKER_PASS, Tracing
from moe_serve.worker.engine import WorkerEngine

MEMORY_GAUGE_INTERVAL_S = 1.0
# A pass with at most this many pairs counts them per expert on the host from a list (one
# small copy) rather than with bincount and a read-back: ~1 µs against ~10 µs at P=2.
HOST_COUNT_PAIRS = 64


@dataclass
class _Call:
    hidden: torch.Tensor  # [N, H]
    pair_token: torch.Tensor  # [P] int32
    pair_expert: torch.Tensor  # [P] int32
    pair_weight: torch.Tensor  # [P] float32
    pairs: bool  # reply with each pair's expert output [P, H], not per-token sums [N, H]
    removals: int  # WorkerEngine.removals when the call was validated

    @property
    def tokens(self) -> int:
        return self.hidden.shape[0]


class DynamicBatcher:
    """Merges concurrent calls into batched `WorkerEngine.forward` passes."""

    def __init__(
        self,
        engine: WorkerEngine,
        cfg: BatchingConfig,
        metrics: WorkerMetrics,
        tracing: Tracing = NO_TRACING,
    ) -> None:
        self.engine, self.cfg, self.metrics, self.tracing = engine, cfg, metrics, tracing
        self._memory_read = 0.0  # monotonic time the memory gauge was last set
        self._expert_tokens = Children(metrics.expert_tokens)  # per (layer, expert)
        # A call holds max(tokens, pairs): its [P, H] gathers, not its [N, H] rows, are what
        # grows with a call (a master sends up to top_k pairs per token).
        self.budget = TokenBudget(
            cfg.max_queue_tokens, "batching.max_queue_tokens", "worker", unit="tokens or pairs"
        )
        # max_in_flight None: each batch runs on the loop's own task, inline (see above).
        self._batcher = Batcher[_Call, torch.Tensor](
            self._run,
            self.budget,
            cfg.max_delay_us / 1e6,
            cfg.max_batch_tokens,
            on_queue=metrics.queue_depth.set,
            tracing=tracing,
            pass_name=WORKER_PASS,
        )

    def start(self) -> None:
        """Start the batching loop on the running event loop."""
        self._batcher.start()

    async def stop(self) -> None:
        """Stop the loop; a batch already running finishes, and calls still queued fail with
        DrainingError (UNAVAILABLE)."""
        await self._batcher.stop()

    async def submit(
        self,
        layer: int,
        hidden: torch.Tensor,
        pair_token: torch.Tensor,
        pair_expert: torch.Tensor,
        pair_weight: torch.Tensor,
        pairs: bool = False,
    ) -> torch.Tensor:
        """Queue one validated call; resolve to its partial sums [N, H] (with `pairs`: its
        pairs' expert outputs [P, H]).

        RequestTooLargeError (RESOURCE_EXHAUSTED) when what is held would exceed
        batching.max_queue_tokens, each call counting max(tokens, (token, expert) pairs)
        (a lone call always runs; `WorkerEngine.validate` bounds its pairs)."""
        # Validated just before, with no await in between: the engine's tables then.
        call = _Call(hidden, pair_token, pair_expert, pair_weight, pairs, self.engine.removals)
        held = max(call.tokens, pair_token.shape[0])
        return await self._batcher.submit(call, layer, call.tokens, held)

    async def _run(self, layer: int, calls: list[_Call]) -> Sequence[torch.Tensor | MoEError]:
        """Concatenate calls, one engine forward, split the output rows back per call.

        Awaits nothing: the batching loop runs it through without a task switch."""
        removals = self.engine.removals
        if any(c.removals != removals for c in calls):
            return await self._recheck(layer, calls)
        sizes = [c.tokens for c in calls]
        if len(calls) == 1:
            # A batch of one (every call at T=1 from one master): its tensors as they came,
            # without the offsets and concatenations below (seven small ops, ~50 µs on CPU).
            c = calls[0]
            hidden, token, expert, weight = c.hidden, c.pair_token, c.pair_expert, c.pair_weight
        else:
            offsets = torch.tensor([0, *sizes[:-1]], dtype=torch.int64).cumsum(0)
            pair_counts = torch.tensor([c.pair_token.shape[0] for c in calls])
            # Shared-memory calls may hold their rows on the master's GPU, the rest on host.
            device = self.engine.devices[0]
            hidden = torch.cat([c.hidden.to(device) for c in calls])
            token = torch.cat([c.pair_token for c in calls]).long()
            token += offsets.repeat_interleave(pair_counts)  # rows of the merged batch
            expert = torch.cat([c.pair_expert for c in calls])
            weight = torch.cat([c.pair_weight for c in calls])
        start = time.perf_counter()
        # Outputs stay on the engine's device: the reply's encoder stages them through pinned
        # memory, and a shared-memory target on a GPU takes them device to device.
        device = self.engine.devices[0]
        wanted = {c.pairs for c in calls}
        with self.tracing.span("expert_forward"):
            out = self.engine.forward(
                layer, hidden, token, expert, weight, out_device=device, pairs=True in wanted
            )
        self._observe(layer, expert, sum(sizes), len(calls), time.perf_counter() - start)
        if len(calls) == 1:
            return [out]
        if wanted == {False}:
            return list(out.split(sizes))
        # Pair outputs for every call; a call that wants per-token sums (a batch with calls
        # of masters of both settings) gets its own summed here, in its pairs' order.
        counts = [c.pair_token.shape[0] for c in calls]
        results = []
        for c, y in zip(calls, out.split(counts), strict=True):
            if not c.pairs:
                t = c.pair_token.to(device).long()
                w = c.pair_weight.to(device).unsqueeze(1)
                y = ordered_sum(c.tokens, t, y.float() * w, self.engine.model.batch_invariant)
                y = y.to(self.engine.dtype)
            results.append(y)
        return results

    async def _recheck(self, layer: int, calls: list[_Call]) -> list[torch.Tensor | MoEError]:
        """Run `calls` after checking again those validated before a reload's grace window
        ended (they queued while the engine stopped serving some experts): a call naming a
        freed expert fails alone with INVALID_ARGUMENT, its batch mates run."""
        errors: list[MoEError | None] = []
        for c in calls:
            try:
                if c.removals != self.engine.removals:
                    self.engine.validate(
                        layer, c.tokens, c.pair_token, c.pair_expert, c.pair_weight
                    )
                    c.removals = self.engine.removals
                errors.append(None)
            except InvalidRequestError as exc:
                errors.append(exc)
        fine = [c for c, err in zip(calls, errors, strict=True) if err is None]
        results = iter(await self._run(layer, fine) if fine else [])
        return [next(results) if err is None else err for err in errors]

    def _observe(
        self, layer: int, expert: torch.Tensor, tokens: int, calls: int, seconds: float
    ) -> None:
        m = self.metrics
        m.batch_tokens.observe(tokens)
        m.batch_requests.observe(calls)
        m.forward_seconds.observe(seconds)
        # Host sync: the per-expert counts feed the expert_tokens counters (one read a pass).
        if expert.shape[0] <= HOST_COUNT_PAIRS:
            counts: dict[int, int] = {}
            for e in expert.tolist():
                counts[e] = counts.get(e, 0) + 1
            per_expert = sorted(counts.items())
        else:
            totals = torch.bincount(expert.long(), minlength=self.engine.model.num_experts)
            per_expert = [(e, n) for e, n in enumerate(totals.tolist()) if n]
        label = str(layer)
        for e, n in per_expert:
            self._expert_tokens(label, str(e)).inc(n)
        now = time.monotonic()
        if now - self._memory_read >= MEMORY_GAUGE_INTERVAL_S:
            # torch.cuda.memory_stats walks the allocator's whole table: not per batch.
            self._memory_read = now
            for device, nbytes in self.engine.memory_bytes().items():
                m.gpu_memory_bytes.labels(device).set(nbytes)
