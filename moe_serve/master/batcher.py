"""Master-side batching: Infer calls that queue up while the master is busy share one pass.

Each call is decoded and checked by its own handler, then queued here (admitted by
`master.max_pending_tokens`). The shared loop (`moe_serve.batching`) takes what is queued
(waiting `batch_delay_us` more if set), up to `max_batch_tokens`, and starts one pass per
layer for those calls: gate, dispatch, one Forward per worker, combine. Up to
MAX_BATCHES_IN_FLIGHT batches run at once; while they wait on the workers, new calls queue
up and leave together as the next batch. An idle master adds no latency: a lone call is a
batch of one at once.

A pass answers each call on its own: a call whose rows cannot be served (a row that
overflows the gate or the experts) gets its own error, and its batch mates their results,
computed as if it had never come. Only an error of the pass as a whole (a worker that
failed, a deadline) is handed to every call of the batch.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import torch

from moe_serve.batching import Batcher, TokenBudget
from moe_serve.config import MasterConfig
from moe_serve.errors import MoEError
from moe_serve.layer.gating import Routing
from moe_serve.metrics import MasterMetrics
from moe_serve.tracing import MASTER_PASS, NO_TRACING, Tracing

# What one call of a pass gets: its (output, routing), or the error of that call alone.
Outcome = tuple[torch.Tensor, Routing] | MoEError
# One pass over a layer: (layer, inputs, losses wanted, timeout) -> an Outcome per call.
Pass = Callable[[int, list[torch.Tensor], list[bool], float], Awaitable[list[Outcome]]]

# Batches in flight at once. While they wait on the workers, new calls queue up and form the
# next batch; with no bound every call would leave alone at once.
MAX_BATCHES_IN_FLIGHT = 1


@dataclass
class _Call:
    x: torch.Tensor  # [T, H] model dtype, master device
    losses: bool
    timeout_s: float


class InferBatcher:
    """Queues Infer calls and runs them in merged passes of `run_pass`."""

    def __init__(
        self,
        run_pass: Pass,
        cfg: MasterConfig,
        metrics: MasterMetrics,
        tracing: Tracing = NO_TRACING,
    ) -> None:
        self.run_pass, self.cfg, self.metrics = run_pass, cfg, metrics
        self.budget = TokenBudget(cfg.max_pending_tokens, "master.max_pending_tokens", "master")
        self._batcher = Batcher[_Call, tuple[torch.Tensor, Routing]](
            self._pass,
            self.budget,
            cfg.batch_delay_us / 1e6,
            cfg.max_batch_tokens,
            max_in_flight=MAX_BATCHES_IN_FLIGHT,
            tracing=tracing,
            pass_name=MASTER_PASS,
        )

    def start(self) -> None:
        """Start the batching loop on the running event loop."""
        self._batcher.start()

    async def stop(self) -> None:
        """Stop taking calls; passes already started finish, and calls still queued fail
        with DrainingError (UNAVAILABLE)."""
        await self._batcher.stop()

    async def submit(
        self, layer: int, x: torch.Tensor, losses: bool, timeout_s: float
    ) -> tuple[torch.Tensor, Routing]:
        """Queue one checked call; resolve to its output [T, H] in the model dtype and its
        routing, or raise the error of this call (or of its whole pass).

        RequestTooLargeError (RESOURCE_EXHAUSTED) when the tokens accepted and not yet
        answered would exceed master.max_pending_tokens."""
        return await self._batcher.submit(_Call(x, losses, timeout_s), layer, x.shape[0])

    async def _pass(self, layer: int, calls: list[_Call]) -> list[Outcome]:
        self.metrics.batch_requests.observe(len(calls))
        return await self.run_pass(
            layer,
            [c.x for c in calls],
            [c.losses for c in calls],
            max(c.timeout_s for c in calls),
        )
