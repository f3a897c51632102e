"""Batching, shared by master and worker: calls that queue up while a server is busy share one
pass over their layer, and a token budget bounds what the server holds under overload.

A call is admitted by a `TokenBudget`, then queued. The loop takes the first waiting call,
then whatever else is queued or arrives within the window, while the batch stays within
`max_batch_tokens` (the call that does not fit opens the next batch; one call larger than
that runs alone). Calls whose caller gave up are dropped. A batch runs as one pass per layer
in it, in layer order. An idle server adds no latency: with no window, a lone call is a
batch of one at once.

A pass answers each of its calls: with its result, or with that call's own error (its
mates keep their results). An error raised by the pass as a whole goes to each of its calls.

Each side gives only its pass: the master's gates, fans out to the workers and combines
(`master/batcher.py`); the worker's runs its experts (`worker/batcher.py`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from moe_serve.errors import DrainingError, MoEError, RequestTooLargeError
from moe_serve.tracing import NO_TRACING, NULL, Queued, Tracing

C = TypeVar("C")  # what one side queues for one call (its tensors and options)
R = TypeVar("R")  # what one call resolves to

# One pass over a layer: (layer, its calls) -> for each call, its result or its own error.
Run = Callable[[int, list[C]], Awaitable[Sequence[R | MoEError]]]


class TokenBudget:
    """Units (tokens on the master; max(tokens, pairs) per call on a worker) admitted and not
    yet answered, at most `limit` (the config key `key`).

    A call that would go beyond it is refused with RESOURCE_EXHAUSTED at once, so memory
    stays bounded; a call that finds nothing held always gets in, however large (the
    request-size limits bound that one).
    """

    def __init__(self, limit: int, key: str, holder: str, unit: str = "tokens") -> None:
        self.limit, self.key, self.holder, self.unit = limit, key, holder, unit
        self.held = 0

    @contextmanager
    def admit(self, tokens: int) -> Iterator[None]:
        """Hold `tokens` units for the duration of the block; RequestTooLargeError if over."""
        if self.held > 0 and self.held + tokens > self.limit:
            raise RequestTooLargeError(
                f"{self.holder} is over {self.key}={self.limit}: {self.held} {self.unit} "
                f"held, {tokens} more asked; retry later"
            )
        self.held += tokens
        try:
            yield
        finally:
            self.held -= tokens


@dataclass
class _Queued(Generic[C, R]):
    call: C
    layer: int
    tokens: int  # counted against max_batch_tokens
    future: asyncio.Future[R] = field(repr=False)
    trace: Queued | None = field(default=None, repr=False)  # when tracing is on


class Batcher(Generic[C, R]):
    """Queues calls and runs them in merged passes of `run`, one per layer of a batch.

    `window_s`: how long the first call of a batch waits for more. `max_in_flight`: None runs
    each batch on the loop's own task, before the next is gathered (a pass with no await in
    it then runs without a task switch); n runs up to n batches as tasks beside the loop,
    which gathers the next meanwhile. `on_queue` is told the number of calls queued after
    each submit and each batch taken. With `tracing` on, each call's wait is a `queue` span
    and each pass a `pass_name` span (moe_serve.tracing.Tracing.batch).
    """

    def __init__(
        self,
        run: Run[C, R],
        budget: TokenBudget,
        window_s: float,
        max_batch_tokens: int,
        max_in_flight: int | None = None,
        on_queue: Callable[[int], None] | None = None,
        tracing: Tracing = NO_TRACING,
        pass_name: str = "pass",
    ) -> None:
        self.run, self.budget = run, budget
        self.tracing, self.pass_name = tracing, pass_name
        self.window_s, self.max_batch_tokens = window_s, max_batch_tokens
        self.on_queue = on_queue
        self._queue: asyncio.Queue[_Queued[C, R]] = asyncio.Queue()
        self._carry: _Queued[C, R] | None = None  # the call that did not fit the last batch
        self._gathering: list[_Queued[C, R]] = []  # the batch being gathered
        self._slots = None if max_in_flight is None else asyncio.Semaphore(max_in_flight)
        self._passes: set[asyncio.Task[None]] = set()
        self._task: asyncio.Task[None] | None = None
        self._running = False  # a batch runs on the loop's own task (max_in_flight None)
        self._stopping = False

    def start(self) -> None:
        """Start the batching loop on the running event loop."""
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        """Stop taking calls. A batch already running finishes; each call not yet in one
        (queued, or submitted from now on) fails with DrainingError (UNAVAILABLE)."""
        self._stopping = True
        if self._task is not None:
            if not self._running:  # waiting for calls: nothing of its own to finish
                self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await asyncio.gather(*self._passes, return_exceptions=True)
        waiting = [*self._gathering, *([self._carry] if self._carry else [])]
        while not self._queue.empty():
            waiting.append(self._queue.get_nowait())
        self._gathering, self._carry = [], None
        for q in waiting:
            if not q.future.done():
                q.future.set_exception(self._draining())

    async def submit(self, call: C, layer: int, tokens: int, held: int | None = None) -> R:
        """Queue `call` of `layer`, counting `tokens` against max_batch_tokens and `held`
        (default: `tokens`) against the budget; resolve to its result, or raise its own
        error or that of its whole pass.

        RequestTooLargeError (RESOURCE_EXHAUSTED) when the budget would be exceeded;
        DrainingError (UNAVAILABLE) once stopping."""
        if self._stopping:
            raise self._draining()
        with self.budget.admit(tokens if held is None else held):
            future = asyncio.get_running_loop().create_future()
            trace = self.tracing.queued()  # None when tracing is off
            self._queue.put_nowait(_Queued(call, layer, tokens, future, trace))
            self._queued()
            if trace is None:
                return await future
            try:
                return await future
            finally:
                trace.dequeued()  # a caller that gave up: its wait ends here

    def _draining(self) -> DrainingError:
        return DrainingError(
            f"{self.budget.holder} is draining (shutting down) and did not run the call: "
            "retry on another replica"
        )

    def _queued(self) -> None:
        if self.on_queue is not None:
            self.on_queue(self._queue.qsize())

    async def _collect(self) -> list[_Queued[C, R]]:
        """The next batch: the first waiting call, then whatever else is queued (and arrives
        within the window), while the total stays within max_batch_tokens."""
        first = self._carry or await self._queue.get()
        self._carry = None
        batch = self._gathering = [first]  # stop() fails these if it cancels the gathering
        tokens = first.tokens
        deadline = time.monotonic() + self.window_s
        while tokens < self.max_batch_tokens:
            remaining = deadline - time.monotonic()
            try:
                if remaining <= 0 or not self._queue.empty():
                    q = self._queue.get_nowait()
                else:
                    q = await asyncio.wait_for(self._queue.get(), remaining)
            except (asyncio.QueueEmpty, TimeoutError):
                break
            if tokens + q.tokens > self.max_batch_tokens:
                self._carry = q
                break
            batch.append(q)
            tokens += q.tokens
        self._gathering = []
        self._queued()
        return [q for q in batch if not q.future.done()]  # drop calls whose caller gave up

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._stopping:
            if self._slots is not None:
                await self._slots.acquire()
            try:
                batch = await self._collect()
            except BaseException:
                self._release()
                raise
            layers = sorted({q.layer for q in batch})
            if not layers:
                self._release()
                continue
            passes = [(layer, [q for q in batch if q.layer == layer]) for layer in layers]
            if self._slots is None:
                self._running = True  # stop() lets this batch finish rather than cancel it
                for layer, calls in passes:
                    await self._pass(layer, calls, last=False)
                self._running = False
                continue
            for i, (layer, calls) in enumerate(passes):
                # The batch holds one slot, released when its last pass ends.
                task = loop.create_task(self._pass(layer, calls, last=i == len(passes) - 1))
                self._passes.add(task)
                task.add_done_callback(self._passes.discard)

    def _release(self) -> None:
        if self._slots is not None:
            self._slots.release()

    def _traced(self, layer: int, batch: list[_Queued[C, R]]) -> AbstractContextManager[Any]:
        """The pass's span (the current one while it runs), or NULL when tracing is off."""
        if not self.tracing.on:
            return NULL
        tokens = sum(q.tokens for q in batch)
        return self.tracing.batch(self.pass_name, layer, [q.trace for q in batch], tokens)

    async def _pass(self, layer: int, batch: list[_Queued[C, R]], last: bool) -> None:
        try:
            with self._traced(layer, batch):
                results = await self.run(layer, [q.call for q in batch])
        except Exception as exc:  # an error of the pass as a whole: each of its calls gets it
            for q in batch:
                if not q.future.done():
                    q.future.set_exception(exc)
            return
        finally:
            if last:
                self._release()
        for q, result in zip(batch, results, strict=True):
            if q.future.done():
                continue
            if isinstance(result, MoEError):  # this call's own error; its mates are served
                q.future.set_exception(result)
            else:
                q.future.set_result(result)
