"""Master-side batching: Infer calls that queue up while the master is busy share one pass.

Each call is decoded and checked by its own handler, then queued here. The loop takes
what is queued (waiting `batch_delay_us` more if set), up to `max_batch_tokens`, and
starts one pass per layer for those calls: gate, dispatch, one Forward per worker,
combine. Up to MAX_BATCHES_IN_FLIGHT batches run at once; while they wait on the workers, new
calls queue up and leave together as the next batch. An idle master adds no latency: a
lone call is a batch of one at once.

A pass answers each call on its own: a call whose rows cannot be served (a row that
overflows the gate or the experts) gets its own error, and its batch mates their results,
computed as if it had never come. Only an error of the pass as a whole (a worker that
failed, a deadline) is handed to every call of the batch.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import torch

from moe_serve.budget import TokenBudget
from moe_serve.config import MasterConfig
from moe_serve.errors import MoEError
from moe_serve.layer.gating import Routing
from moe_serve.metrics import MasterMetrics

# What one call of a pass gets: its (output, routing), or the error of that call alone.
Outcome = tuple[torch.Tensor, Routing] | MoEError
# One pass over a layer: (layer, inputs, losses wanted, timeout) -> an Outcome per call.
Pass = Callable[[int, list[torch.Tensor], list[bool], float], Awaitable[list[Outcome]]]


MAX_BATCHES_IN_FLIGHT = 1


@dataclass
class _Call:
    layer: int
    x: torch.Tensor  # [T, H] model dtype, master device
    losses: bool
    timeout_s: float
    future: asyncio.Future[tuple[torch.Tensor, Routing]] = field(repr=False)


class InferBatcher:
    """Queues Infer calls and runs them in merged passes of `run_pass`."""

    def __init__(self, run_pass: Pass, cfg: MasterConfig, metrics: MasterMetrics) -> None:
        self.run_pass, self.cfg, self.metrics = run_pass, cfg, metrics
        self._queue: asyncio.Queue[_Call] = asyncio.Queue()
        self._carry: _Call | None = None  # the call that did not fit in the previous batch
        self._task: asyncio.Task[None] | None = None
        self._passes: set[asyncio.Task[None]] = set()
        self.budget = TokenBudget(cfg.max_pending_tokens, "master.max_pending_tokens", "master")
        # Batches in flight at once. While they wait on the workers, new calls queue up and
        # form the next batch; with no bound every call would leave alone at once.
        self._slots = asyncio.Semaphore(MAX_BATCHES_IN_FLIGHT)

    def start(self) -> None:
        """Start the batching loop on the running event loop."""
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        """Stop taking calls; passes already started finish."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await asyncio.gather(*self._passes, return_exceptions=True)

    async def submit(
        self, layer: int, x: torch.Tensor, losses: bool, timeout_s: float
    ) -> tuple[torch.Tensor, Routing]:
        """Queue one checked call; resolve to its output [T, H] in the model dtype and its
        routing, or raise the error of this call (or of its whole pass).

        RequestTooLargeError (RESOURCE_EXHAUSTED) when the tokens accepted and not yet
        answered would exceed master.max_pending_tokens."""
        with self.budget.admit(x.shape[0]):
            future = asyncio.get_running_loop().create_future()
            self._queue.put_nowait(_Call(layer, x, losses, timeout_s, future))
            return await future

    async def collect(self) -> list[_Call]:
        """The next batch: the first waiting call, then whatever else is queued (and arrives
        within batch_delay_us), while the total stays within max_batch_tokens."""
        first = self._carry or await self._queue.get()
        self._carry = None
        batch, tokens = [first], first.x.shape[0]
        deadline = time.monotonic() + self.cfg.batch_delay_us / 1e6
        while True:
            try:
                if not self._queue.empty():
                    call = self._queue.get_nowait()
                else:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    call = await asyncio.wait_for(self._queue.get(), remaining)
            except TimeoutError:
                break
            if tokens + call.x.shape[0] > self.cfg.max_batch_tokens:
                self._carry = call
                break
            batch.append(call)
            tokens += call.x.shape[0]
        return [c for c in batch if not c.future.done()]  # drop calls whose client gave up

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._slots.acquire()
            try:
                batch = await self.collect()
            except BaseException:
                self._slots.release()
                raise
            layers = sorted({c.layer for c in batch})
            if not layers:
                self._slots.release()
                continue
            for i, layer in enumerate(layers):
                calls = [c for c in batch if c.layer == layer]
                # The batch holds one slot, released when its last pass ends.
                task = loop.create_task(self._pass(layer, calls, last=i == len(layers) - 1))
                self._passes.add(task)
                task.add_done_callback(self._passes.discard)

    async def _pass(self, layer: int, calls: list[_Call], last: bool) -> None:
        self.metrics.batch_requests.observe(len(calls))
        try:
            results = await self.run_pass(
                layer,
                [c.x for c in calls],
                [c.losses for c in calls],
                max(c.timeout_s for c in calls),
            )
        except Exception as exc:  # handed to every caller of the pass
            for c in calls:
                if not c.future.done():
                    c.future.set_exception(exc)
            return
        finally:
            if last:
                self._slots.release()
        for c, result in zip(calls, results, strict=True):
            if c.future.done():
                continue
            if isinstance(result, MoEError):  # this call's own error; its mates are served
                c.future.set_exception(result)
            else:
                c.future.set_result(result)
