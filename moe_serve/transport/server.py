"""The gRPC server every moe_serve process runs, and the process around it.

- `error_boundary`: domain exceptions -> status codes whose message names the field.
- `serve_service`: a grpc.aio server with the service, health and reflection, the
  connection limits of `server_options`, and a request decoder (zero-copy for tensors, its
  cost bounded whatever the message's size) that answers unparsable or oversized-for-its-
  tensors bytes with INVALID_ARGUMENT (grpcio's default answer would be INTERNAL);
  `Served.shutdown` drains it.
- `keep_large_allocations`: glibc tuning so that message-sized buffers are reused.
- `run`: the event loop (uvloop where available) with SIGTERM/SIGINT handling.

The client side of a call is `moe_serve.transport.calls`.
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import logging
import signal
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import grpc
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from moe_serve.errors import ConfigError, MoEError, Reason, WireError, reason_metadata
from moe_serve.transport.auth import OPEN_PREFIXES, TokenCheck
from moe_serve.transport.calls import message_options
from moe_serve.transport.wire import parse
from moe_serve.v1 import moe_pb2 as pb

log = logging.getLogger(__name__)

T = TypeVar("T")
# grpc.aio.ServerInterceptor.intercept_service is generic over the handler's message types.
Req = TypeVar("Req")
Resp = TypeVar("Resp")


@dataclass(frozen=True)
class MalformedMessage:
    """Stands in for a request whose bytes did not parse; `error` is the status message,
    naming the field ("request" for the message as a whole)."""

    error: str


def error_boundary(
    method: Callable[[Any, Any, grpc.aio.ServicerContext], Awaitable[T]],
) -> Callable[[Any, Any, grpc.aio.ServicerContext], Coroutine[Any, Any, T]]:
    """Wrap a servicer method: MoEError -> its status (and its reason as trailing metadata,
    errors.Reason); anything else -> logged INTERNAL."""

    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> T:
        if isinstance(request, MalformedMessage):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.error)
        try:
            return await method(self, request, context)
        except MoEError as exc:
            code, message, reason = exc.code, str(exc), exc.reason
        except Exception:
            log.exception("unexpected error in %s", method.__qualname__)
            code, message = grpc.StatusCode.INTERNAL, "internal error; see the server log"
            reason = None
        # grpc.aio sends abort's trailing metadata with the status (tests/test_errors.py).
        await context.abort(code, message, trailing_metadata=reason_metadata(reason))
        raise AssertionError("unreachable: abort raises")

    return wrapper


def _lenient(message_type: type[Message]) -> Callable[[bytes], Any]:
    name = message_type.DESCRIPTOR.full_name

    # grpc.aio calls this on the event loop thread (checked with grpcio 1.85), before the
    # handler: wire.parse's cost is bounded by construction (wire.MAX_FIELDS), whatever the
    # message's size, so a hostile message cannot hold the loop that health checks need.
    def decode(data: bytes) -> Any:
        try:
            # Tensor fields come out as views of `data`, not copies (wire.parse).
            return parse(message_type, data)
        except WireError as exc:  # names the field and the bound
            return MalformedMessage(str(exc))
        except Exception as exc:  # any parse failure is the caller's fault, not ours
            return MalformedMessage(f"request: bytes are not a valid {name} ({type(exc).__name__})")

    return decode


def _encode(reply: Message | bytes) -> bytes:
    # Handlers with bulk tensors return wire.serialize's bytes, the rest protobuf messages.
    return reply if isinstance(reply, bytes) else reply.SerializeToString()


def _generic_handler(service_name: str, servicer: object) -> grpc.GenericRpcHandler:
    service = pb.DESCRIPTOR.services_by_name[service_name]
    handlers = {}
    for m in service.methods:
        request_type = getattr(pb, m.input_type.name)
        handlers[m.name] = grpc.unary_unary_rpc_method_handler(
            getattr(servicer, m.name),
            request_deserializer=_lenient(request_type),
            response_serializer=_encode,
        )
    return grpc.method_handlers_generic_handler(service.full_name, handlers)


def keep_large_allocations() -> None:
    """Let glibc reuse freed message-sized blocks instead of returning them to the OS.

    By default every allocation over 32 MiB is a fresh mmap, and filling it costs a page
    fault per 4 KiB: building a 32 MiB message ran at ~2 GB/s on a 2-core VM, 12 GB/s
    with reused memory. The cost: the process keeps its peak heap. Called once at process
    start by the master, the workers and `moe-serve bench`; a no-op off glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's mallopt parameter numbers
    libc.mallopt(m_mmap_threshold, 1 << 30)
    libc.mallopt(m_trim_threshold, (1 << 31) - 1)


# Connection limits of every moe_serve server (master and workers); docs/operations.md lists
# them. gRPC's own defaults: unlimited streams, idle and age; pings on a connection without
# calls accepted once per 2 h.
#
# Calls one connection may have open at once. The master's channel to a worker carries a
# Forward per batch in flight plus a health check a second; a client's, its concurrent Infer
# calls (the bench sweeps up to 64). Calls beyond it wait in the caller's transport, they do
# not fail: it caps the handler state one connection can make a server hold.
MAX_CONCURRENT_STREAMS = 256
# Keepalive pings a server accepts. The master pings each worker every 10 s, with or without
# calls (master/workers.py _CHANNEL_OPTIONS, so that a dead worker is noticed within 15 s);
# under gRPC's defaults a server allows one ping per 5 min, or per 2 h on a connection
# without calls, and answers the third early one with GOAWAY "too_many_pings". Half the
# master's interval leaves room for timer jitter; a peer pinging faster than that gets
# GOAWAY at its third early ping (MAX_PING_STRIKES, gRPC's default), so pings cannot flood.
MIN_PING_INTERVAL_MS = 5_000
MAX_PING_STRIKES = 2
# A connection with no call for this long is closed (GOAWAY; the client reconnects on its
# next call), freeing what an idle or vanished client holds. The master's channels to its
# workers never idle: they carry a health check every second.
MAX_CONNECTION_IDLE_MS = 30 * 60 * 1000
# Every connection is closed after about this long (gRPC adds up to 10 % jitter), so that
# long-lived clients reconnect and re-resolve and their per-connection state is renewed.
# Hours, not seconds: a shared-memory region is bound to the connection that attached it,
# and a peer reconnecting re-attaches it once (FAILED_PRECONDITION "region ... not mapped",
# then a re-offer: the existing path), a few milliseconds every few hours.
MAX_CONNECTION_AGE_MS = 6 * 60 * 60 * 1000
# Calls in flight on a connection closed by age get this long to finish: 4x the 30 s
# default of master.worker_timeout_s and of the SDK's timeout.
MAX_CONNECTION_AGE_GRACE_MS = 2 * 60 * 1000


def server_options(max_message_bytes: int) -> list[tuple[str, int]]:
    """Options of every moe_serve server: message limits and the connection limits above."""
    return [
        *message_options(max_message_bytes),
        # A second process on a taken port must fail, not share the port.
        ("grpc.so_reuseport", 0),
        ("grpc.max_concurrent_streams", MAX_CONCURRENT_STREAMS),
        # gRPC's default counts a finished call against the limit until its server objects
        # are freed and refuses calls meanwhile (REFUSED_STREAM: UNAVAILABLE at the caller):
        # 300 concurrent calls on one channel lost some that way. Off, the limit counts the
        # calls open on the connection, and the caller queues the rest as intended.
        ("grpc.http.overload_protection", 0),
        # Without it, a connection with no call in flight counts as idle and any ping more
        # often than every 2 h is a strike, whatever MIN_PING_INTERVAL_MS says.
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", MIN_PING_INTERVAL_MS),
        ("grpc.http2.max_ping_strikes", MAX_PING_STRIKES),
        ("grpc.max_connection_idle_ms", MAX_CONNECTION_IDLE_MS),
        ("grpc.max_connection_age_ms", MAX_CONNECTION_AGE_MS),
        ("grpc.max_connection_age_grace_ms", MAX_CONNECTION_AGE_GRACE_MS),
    ]


class Drain(grpc.aio.ServerInterceptor):
    """Counts calls in flight and, once draining, refuses new ones with UNAVAILABLE.

    gRPC's own `server.stop` refuses new calls with a generic message; while in-flight calls
    finish, callers should learn why ("draining"), and a master should take the refusal
    for what it is: this worker is leaving, send the slice to a replica. Health and
    reflection stay open, so probes see NOT_SERVING instead of an error.
    """

    # Once idle, keep refusing until no call has arrived for this long before stopping: calls
    # already on the wire when the peers learned "draining" would otherwise reach a stopping
    # server, which cancels calls it accepted but had not started.
    QUIET_S = 0.2

    def __init__(self, who: str) -> None:
        self.who = who
        self.draining = False
        self.in_flight = 0
        self.last_arrival = 0.0  # loop time of the last call (health and reflection aside)
        self._idle = asyncio.Event()
        self._idle.set()

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Req, Resp] | None]
        ],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Req, Resp] | None:
        handler = await continuation(details)
        if details.method.startswith(OPEN_PREFIXES) or handler is None:
            return handler
        self.last_arrival = asyncio.get_running_loop().time()
        if self.draining:
            return grpc.unary_unary_rpc_method_handler(self._refuse)
        # Every moe_serve method is unary-unary with an async handler (_generic_handler).
        inner = cast(Callable[[Any, Any], Awaitable[Any]], handler.unary_unary)

        async def counted(request: Any, context: grpc.aio.ServicerContext) -> Any:
            self.in_flight += 1
            self._idle.clear()
            try:
                return await inner(request, context)
            finally:
                self.in_flight -= 1
                if self.in_flight == 0:
                    self._idle.set()

        return grpc.unary_unary_rpc_method_handler(
            counted,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    async def _refuse(self, request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(
            grpc.StatusCode.UNAVAILABLE,
            f"{self.who} is draining (shutting down): retry on another replica",
            trailing_metadata=reason_metadata(Reason.DRAINING),
        )

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no call is in flight and none has arrived for QUIET_S, at most
        `timeout_s`; True if that was reached."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            try:
                await asyncio.wait_for(self._idle.wait(), max(0.0, deadline - loop.time()))
            except TimeoutError:
                return False
            quiet_at = self.last_arrival + self.QUIET_S
            if loop.time() >= quiet_at and self.in_flight == 0:
                return True
            if quiet_at >= deadline:
                return self.in_flight == 0
            await asyncio.sleep(quiet_at - loop.time())


@dataclass(frozen=True)
class Served:
    """A running server and what its owner needs to stop it well."""

    server: grpc.aio.Server
    health: HealthServicer
    port: int
    drain: Drain
    full_name: str

    async def shutdown(self, grace_s: float) -> None:
        """NOT_SERVING, refuse new calls ("draining"), let in-flight ones finish for up to
        `grace_s`, then stop (cancelling what is left)."""
        start = asyncio.get_running_loop().time()
        self.drain.draining = True
        await self.health.enter_graceful_shutdown()
        idle = await self.drain.wait_idle(grace_s)
        if not idle:
            log.warning(
                "%s: %d call(s) still in flight after %.1f s; cancelling them",
                self.drain.who,
                self.drain.in_flight,
                grace_s,
            )
        left = max(0.0, grace_s - (asyncio.get_running_loop().time() - start))
        await self.server.stop(left)


async def serve_service(
    service_name: str,
    servicer: object,
    listen: str,
    max_message_bytes: int,
    field: str,
    serving: bool = True,
    token: str | None = None,
    credentials: grpc.ServerCredentials | None = None,
    who: str = "server",
) -> Served:
    """Serve `service_name` ("MoEMaster"/"ExpertWorker") on `listen`.

    `field` names the config key of the address for the error when it cannot be bound.
    Health reports SERVING at once if `serving`, else NOT_SERVING until the caller sets it.
    With `token`, every call but health and reflection must carry it (auth.TokenCheck).
    With `credentials` the port speaks TLS only (moe_serve.transport.tls); without, plaintext.
    """
    options = server_options(max_message_bytes)
    drain = Drain(who)
    # Authentication first: an unauthenticated caller learns nothing, not even "draining".
    interceptors = [drain] if token is None else [TokenCheck(token), drain]
    server = grpc.aio.server(options=options, interceptors=interceptors)
    server.add_generic_rpc_handlers((_generic_handler(service_name, servicer),))
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    full_name = pb.DESCRIPTOR.services_by_name[service_name].full_name
    reflection.enable_server_reflection(
        (
            full_name,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    error: ConfigError | None = None
    try:
        if credentials is None:
            port = server.add_insecure_port(listen)
        else:
            port = server.add_secure_port(listen, credentials)
    except RuntimeError as exc:  # grpcio raises when the address cannot be bound
        error = ConfigError(f"{field}: cannot bind {listen!r}: {exc}")
    if error is not None:
        # Raised outside the handler: grpcio's error (its frames hold the server, which holds
        # the servicer: a master's holds its shared region) is then no one's context.
        await server.stop(None)
        raise error
    await server.start()
    await set_serving(health, full_name, serving)
    return Served(server, health, port, drain, full_name)


async def set_serving(health: HealthServicer, full_name: str, serving: bool) -> None:
    """Set the overall and the per-service health status."""
    status = (
        health_pb2.HealthCheckResponse.SERVING
        if serving
        else (health_pb2.HealthCheckResponse.NOT_SERVING)
    )
    for name in ("", full_name):
        await health.set(name, status)


async def wait_for_signal(on_reload: Callable[[], Awaitable[object]] | None = None) -> None:
    """Return on SIGTERM or SIGINT. With `on_reload`, each SIGHUP runs it as a task on this
    loop (one at a time: a SIGHUP during a reload runs it once more after)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if on_reload is not None:
        lock = asyncio.Lock()

        async def reload() -> None:
            async with lock:
                await on_reload()

        tasks: set[asyncio.Task[None]] = set()

        def hup() -> None:
            task = loop.create_task(reload())
            tasks.add(task)  # a reference until done: the loop keeps only weak ones
            task.add_done_callback(tasks.discard)

        loop.add_signal_handler(signal.SIGHUP, hup)
    await stop.wait()


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run `main` on uvloop where it is installed, else on the default asyncio loop."""
    try:
        import uvloop
    except ImportError:  # uvloop does not exist on Windows
        return asyncio.run(main)
    return uvloop.run(main)
