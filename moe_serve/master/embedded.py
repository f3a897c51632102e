"""The embedded master: the master's MoE layer run inside a client's process.

`MoEClient.embedded("world.yaml")` builds one: the gates and shared experts run in this
process, and tokens go straight to the workers, one gRPC hop per layer instead of two
(client -> master -> workers). It is the standalone master without its server: the same
`WorkerPool` (health watch, the worker token, TLS, the shared-memory region to workers on
this host), the same `MasterEngine` (gate -> dispatch -> fan out -> fail over -> combine)
and the same `InferBatcher`, so concurrent calls from several threads or tasks share passes
as they would on a master. The request checks are the engine's (`check_layer`,
`check_hidden`), the ones the master's Infer makes.

Everything asynchronous runs on an event loop of its own thread (uvloop where installed,
as `moe_serve.transport.server.run`): gRPC's aio channels belong to the loop that made
them, and callers may be plain threads or tasks of another loop. `submit` checks a call in
the caller's thread and hands it to that loop; `close` (or garbage collection, or the
interpreter's exit) stops the watch, drains the batcher, closes the channels and joins the
thread, each step bounded.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import threading
import weakref
from collections.abc import Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from moe_serve.config import WorldConfig, check_devices_exist, load_config
from moe_serve.errors import DeadlineError, DrainingError, WorkerUnavailableError
from moe_serve.layer.gating import Routing
from moe_serve.master.batcher import InferBatcher
from moe_serve.master.engine import MasterEngine
from moe_serve.master.workers import WorkerPool
from moe_serve.metrics import MasterMetrics
from moe_serve.tracing import TracerProvider, Tracing, from_config, from_provider
from moe_serve.transport.auth import load_worker_token
from moe_serve.v1 import moe_pb2 as pb

if TYPE_CHECKING:
    from opentelemetry.context import Context

log = logging.getLogger(__name__)

T = TypeVar("T")
# Each step of a close (drain, channels, thread) waits at most this long: a close at the
# interpreter's exit must never hang it.
CLOSE_TIMEOUT_S = 5.0


class _Runtime:
    """The loop, its thread and what runs on it; holds no reference to the EmbeddedMaster,
    so that the master can be garbage-collected (its finalizer closes this)."""

    def __init__(self, tracing: Tracing) -> None:
        self.tracing = tracing
        self.loop = _new_loop()
        self.thread = threading.Thread(
            target=self._run, name="moe_serve embedded master", daemon=True
        )
        self.pool: WorkerPool | None = None
        self.batcher: InferBatcher | None = None
        self.closed = False
        self._lock = threading.Lock()
        self.thread.start()

    def _run(self) -> None:
        torch.set_grad_enabled(False)  # this thread serves only (grad mode is per thread)
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def call(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run `coro` on the loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _release(self) -> None:
        try:
            if self.batcher is not None:
                await self.batcher.stop()  # passes under way finish; queued calls: DRAINING
        finally:
            if self.pool is not None:
                await self.pool.close()  # the health watch, the channels, the region
            me = asyncio.current_task()
            rest = [t for t in asyncio.all_tasks() if t is not me]
            for task in rest:
                task.cancel()
            await asyncio.gather(*rest, return_exceptions=True)

    def close(self) -> None:
        """Stop everything and join the thread; idempotent, bounded by CLOSE_TIMEOUT_S a step."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
        if threading.current_thread() is self.thread:
            # Collected on the loop's own thread: it cannot wait for itself. Release on the
            # loop, then stop it; the thread ends there.
            task = self.loop.create_task(self._release())
            task.add_done_callback(lambda _: self.loop.stop())
            return
        try:
            if self.loop.is_running():
                self.call(self._release(), CLOSE_TIMEOUT_S)
        except Exception as exc:  # closing must go on: the loop and the thread still stop
            log.warning("embedded master: release did not finish cleanly: %r", exc)
        finally:
            if not self.loop.is_closed():
                self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(CLOSE_TIMEOUT_S)
            if not self.thread.is_alive() and not self.loop.is_closed():
                self.loop.close()
            self.tracing.shutdown()  # flush the spans of a provider made from the config


class EmbeddedMaster:
    """A master's MoE layer in this process: gates and shared experts here, routed experts
    on the workers of the world config, reached directly.

    `config`: a WorldConfig, or the path of a world YAML (load_config). Its `master` section
    is used for the device of the gates (`master.device`), the batching and the limits
    (`max_request_tokens`, `max_batch_tokens`, `max_pending_tokens`, `worker_timeout_s`,
    `shared_memory_bytes`); `master.listen` and the metrics port are not (nothing listens).
    The worker token (`security.worker_token_env`/`worker_token_file`) and `security.tls`
    are used as the master uses them; the client token is not needed.

    Spans (moe_serve.tracing): through `tracer_provider` when given, else as the config's
    `tracing` section says (service.name `moe-serve-client`).

    Returns once every expert has a replica on a worker that answers its health check:
    WorkerUnavailableError (UNAVAILABLE) naming the experts and workers down if that takes
    longer than `ready_timeout_s`; ConfigError for a bad config, token source or TLS file,
    or tracing on without OpenTelemetry installed.
    """

    def __init__(
        self,
        config: WorldConfig | str | Path,
        ready_timeout_s: float = 30.0,
        tracer_provider: TracerProvider | None = None,
    ) -> None:
        cfg = config if isinstance(config, WorldConfig) else load_config(config)
        check_devices_exist((cfg.master.device,), "master.device")
        worker_token = load_worker_token(cfg.security)  # an unset variable: ConfigError now
        self.cfg = cfg
        self.tracing = (
            from_config(cfg.tracing, "moe-serve-client")
            if tracer_provider is None
            else from_provider(tracer_provider)
        )
        runtime = self._runtime = _Runtime(self.tracing)
        # Closes the loop when this object is collected or at the interpreter's exit.
        self._finalizer = weakref.finalize(self, runtime.close)
        try:
            self.engine: MasterEngine = runtime.call(
                _start(runtime, cfg, worker_token, ready_timeout_s)
            )
        except BaseException:
            self.close()
            raise

    def submit(
        self,
        x: torch.Tensor,
        layer: int,
        return_routing: bool = False,
        timeout: float | None = None,
    ) -> concurrent.futures.Future[tuple[torch.Tensor, Routing]]:
        """Check x [T, H] (any float dtype, any device) now, in this thread, and queue it for
        `layer`; the future resolves to (output [T, H] in the model dtype, in host memory
        for a small host input, else on master.device; its Routing, with the losses when
        `return_routing`), or raises the call's MoEError.

        Raises at once the MoEError of a bad call (InvalidRequestError naming the field,
        RequestTooLargeError), or DrainingError once closed. `timeout`: the call's deadline
        in seconds (DeadlineError past it); None: none (each worker call is still bounded
        by master.worker_timeout_s)."""
        if self._runtime.closed:
            raise DrainingError("the embedded master is closed")
        with self.tracing.span("decode"):
            self.engine.check_layer(layer)
            x = self.engine.check_hidden(x)
        if self.tracing.on:
            # The caller's span (the client's infer) goes along to the loop's thread: the
            # call's queue span and its pass hang under it there.
            call = _traced(self._runtime, layer, x, return_routing, timeout, self.tracing.capture())
        else:
            call = _infer(self._runtime, layer, x, return_routing, timeout)
        return asyncio.run_coroutine_threadsafe(call, self._runtime.loop)

    async def submit_async(
        self,
        x: torch.Tensor,
        layer: int,
        return_routing: bool = False,
        timeout: float | None = None,
    ) -> tuple[torch.Tensor, Routing]:
        """`submit`, awaited from a task of any event loop (cancelling it cancels the call)."""
        return await asyncio.wrap_future(self.submit(x, layer, return_routing, timeout))

    def info(self) -> pb.MasterInfo:
        """Model dims, layers, routing, placement and each worker's last known health, as a
        master's GetInfo answers."""
        return self.engine.info()

    def close(self) -> None:
        """Drain the calls under way (queued ones fail UNAVAILABLE, DRAINING), stop the
        health watch, close the worker channels and the shared region, join the thread.
        Idempotent."""
        self._finalizer()


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # uvloop does not exist on Windows
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


async def _start(
    runtime: _Runtime, cfg: WorldConfig, worker_token: str | None, ready_timeout_s: float
) -> MasterEngine:
    """On the loop: the pool, the engine, the batcher and the watch; wait until ready."""
    metrics = MasterMetrics()  # its own registry; not exported (nothing listens here)
    tracing = runtime.tracing
    pool = runtime.pool = WorkerPool(cfg, metrics, worker_token, tracing)
    engine = MasterEngine(cfg, pool, metrics, tracing=tracing)
    runtime.batcher = InferBatcher(engine.forward, cfg.master, metrics, tracing)
    runtime.batcher.start()
    ready = asyncio.Event()

    async def on_probe(up: list[bool]) -> None:
        if engine.placement.covered(up):
            ready.set()
        else:
            ready.clear()

    pool.start_watch(on_probe)
    try:
        await asyncio.wait_for(ready.wait(), ready_timeout_s)
    except TimeoutError:
        raise _not_ready(engine, pool, ready_timeout_s) from None
    return engine


def _not_ready(engine: MasterEngine, pool: WorkerPool, waited_s: float) -> WorkerUnavailableError:
    """UNAVAILABLE naming the experts with no live replica and their workers."""
    lost = {
        layer: [e for e, h in enumerate(holders) if not any(pool.healthy[w] for w in h)]
        for layer, holders in engine.placement.holders.items()
    }
    lost = {layer: experts for layer, experts in lost.items() if experts}
    down = sorted(
        {
            w
            for layer, experts in lost.items()
            for e in experts
            for w in engine.placement.holders[layer][e]
        }
    )
    names = [engine.placement.worker_ids[w] for w in down]
    causes = [
        f"{engine.placement.worker_ids[w]}: TLS: {pool.tls_failures[w]}"
        for w in down
        if pool.tls_failures[w]
    ]
    where = "; ".join(f"layer {layer} experts {experts}" for layer, experts in lost.items())
    return WorkerUnavailableError(
        f"no live replica for {where} after {waited_s:g} s: worker(s) {names} unavailable"
        + (f" ({'; '.join(causes)})" if causes else "")
    )


async def _traced(
    runtime: _Runtime,
    layer: int,
    x: torch.Tensor,
    losses: bool,
    timeout: float | None,
    parent: Context | None,
) -> tuple[torch.Tensor, Routing]:
    """`_infer` with the caller's trace context `parent` current."""
    with runtime.tracing.attached(parent):
        return await _infer(runtime, layer, x, losses, timeout)


async def _infer(
    runtime: _Runtime, layer: int, x: torch.Tensor, losses: bool, timeout: float | None
) -> tuple[torch.Tensor, Routing]:
    batcher = runtime.batcher
    if batcher is None:  # never: _start sets it before the first submit can come
        raise DrainingError("the embedded master is not started")
    if timeout is None:
        return await batcher.submit(layer, x, losses, math.inf)
    try:
        # The engine bounds its pass by `timeout` too; this also bounds the wait in the queue.
        return await asyncio.wait_for(batcher.submit(layer, x, losses, timeout), timeout)
    except TimeoutError:
        raise DeadlineError(
            f"deadline of {timeout:g} s passed before layer {layer} was computed"
        ) from None
