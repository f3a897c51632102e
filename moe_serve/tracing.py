"""Optional OpenTelemetry tracing: spans from the client through the master to the workers.

Off by default and free when off: `NO_TRACING` is a module-level no-op whose methods return
one shared do-nothing context manager (or None), so a traced code path costs an attribute
test or an empty `with` when tracing is off; no span, no `traceparent` header, no
allocation per call, and opentelemetry is never imported (it is imported only by
`from_config` and `from_provider`, when tracing is turned on: the `otel` extra).

A call's spans, in request order (docs/operations.md#tracing):

    client  moe_serve.v1.MoEMaster/Infer          CLIENT; W3C traceparent in the call metadata
    master  moe_serve.v1.MoEMaster/Infer          SERVER, the client's span as parent
              decode, queue, encode
              moe_serve.master/pass               the batch: gate, dispatch, fan_out, combine
                moe_serve.v1.ExpertWorker/Forward CLIENT, one per worker call; traceparent
    worker  moe_serve.v1.ExpertWorker/Forward     SERVER, the master's call as parent
              decode, queue, encode
              moe_serve.worker/pass               the batch: expert_forward

The embedded client (MoEClient.embedded) has the same spans without the master hop: its
`moe_serve.client/infer` span holds decode, queue and the pass.

Batchers merge calls. A pass of one call is that call's child; a pass of several calls is
the root of a trace of its own, linked to each call's span (and each call's span linked to
it): no call is made the parent of the others' work. Each call's span carries the size of
the batch it went in (`moe_serve.batch.calls`, `moe_serve.batch.tokens`), and its `queue`
span the time it waited for that batch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from moe_serve.config import TracingConfig
from moe_serve.errors import ConfigError

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
    from opentelemetry.trace import Span, SpanKind, Tracer

__all__ = [
    "NO_TRACING",
    "NULL",
    "Queued",
    "TracerProvider",
    "Tracing",
    "check",
    "from_config",
    "from_provider",
]

# Span names of the two RPCs (OpenTelemetry's RPC convention: package.Service/Method).
INFER = "moe_serve.v1.MoEMaster/Infer"
FORWARD = "moe_serve.v1.ExpertWorker/Forward"
EMBEDDED_INFER = "moe_serve.client/infer"
MASTER_PASS = "moe_serve.master/pass"
WORKER_PASS = "moe_serve.worker/pass"
# The W3C trace-context headers, the only metadata read from a caller.
_HEADERS = ("traceparent", "tracestate")
SCOPE = "moe_serve"  # the instrumentation scope of every span

# The one do-nothing context manager every method returns when tracing is off (nullcontext
# keeps no state: shared by every caller, at once).
NULL: contextlib.AbstractContextManager[None] = contextlib.nullcontext()


class TracerProvider(Protocol):
    """What moe_serve needs of an OpenTelemetry TracerProvider (the SDK's, the API's proxy,
    an application's own): a tracer by name. Declared here so that annotating a parameter
    with it imports no OpenTelemetry."""

    def get_tracer(self, instrumenting_module_name: str) -> Any:
        """The tracer of an instrumentation scope."""
        ...


@dataclass
class Queued:
    """A call waiting in a batcher: the span of the call (its parent's context) and its
    `queue` span, ended when its batch starts (or when its caller gives up)."""

    span: Span
    queue: Span
    waiting: bool = True

    def dequeued(self) -> None:
        """End the queue span (once)."""
        if self.waiting:
            self.waiting = False
            self.queue.end()


class Tracing:
    """The spans of one process or client, or none (`NO_TRACING`). `on` says which.

    Built by `from_config` (a master, a worker, an embedded client: the world config's
    `tracing` section) or `from_provider` (an SDK client, or a caller with its own
    OpenTelemetry TracerProvider). `shutdown` flushes and stops a provider this object made.
    """

    def __init__(self, tracer: Tracer | None = None, owned: SdkTracerProvider | None = None):
        self.on = tracer is not None
        self._tracer = tracer
        self._owned = owned
        self._propagator: Any = None
        if tracer is not None:
            from opentelemetry.trace.propagation.tracecontext import (
                TraceContextTextMapPropagator,
            )

            # W3C trace context, explicitly: OpenTelemetry's global propagator is process
            # state an application may have set otherwise.
            self._propagator = TraceContextTextMapPropagator()

    # --- spans of this process -----------------------------------------------------------

    def span(
        self, name: str, attributes: Mapping[str, Any] | None = None
    ) -> contextlib.AbstractContextManager[Span | None]:
        """A child of the current span, current within the block; NULL when off. An
        exception leaving the block sets the span's status (its gRPC code, see `_failed`)."""
        if self._tracer is None:
            return NULL
        return self._span(name, attributes=attributes)

    def server(
        self,
        name: str,
        metadata: Iterable[tuple[str, Any]] | None,
        attributes: Mapping[str, Any] | None = None,
    ) -> contextlib.AbstractContextManager[Span | None]:
        """The SERVER span of a call received with `metadata`: the caller's span (its W3C
        traceparent) as parent, or a new trace without one; NULL when off."""
        if self._tracer is None:
            return NULL
        from opentelemetry.trace import SpanKind

        # Only the two W3C headers are read; the propagator checks their format and drops a
        # malformed one (the call then starts a trace of its own).
        carrier = {k: v for k, v in metadata or () if k in _HEADERS and isinstance(v, str)}
        parent = self._propagator.extract(carrier)
        return self._span(name, SpanKind.SERVER, parent, _rpc(name, attributes), rpc=True)

    @contextlib.contextmanager
    def client(
        self,
        name: str,
        metadata: Sequence[tuple[str, str]] | None,
        attributes: Mapping[str, Any] | None = None,
    ) -> Iterator[tuple[tuple[str, str], ...]]:
        """The CLIENT span of an outgoing call, current within the block, which gets the
        call's metadata: `metadata` plus the span's traceparent. Only when on (callers
        send `metadata` as it is when off)."""
        if self._tracer is None:
            raise RuntimeError("Tracing.client: tracing is off")
        from opentelemetry.trace import SpanKind

        with self._span(name, SpanKind.CLIENT, None, _rpc(name, attributes), rpc=True):
            carrier: dict[str, str] = {}
            self._propagator.inject(carrier)
            yield (*(metadata or ()), *carrier.items())

    def set(self, key: str, value: Any) -> None:
        """Set an attribute on the current span; nothing when off."""
        if self._tracer is None:
            return
        from opentelemetry.trace import get_current_span

        get_current_span().set_attribute(key, value)

    # --- crossing a thread or a batcher ---------------------------------------------------

    def capture(self) -> Context | None:
        """The current context, to be `attached` in another thread; None when off."""
        if self._tracer is None:
            return None
        from opentelemetry.context import get_current

        return get_current()

    @contextlib.contextmanager
    def _attach(self, ctx: Context) -> Iterator[None]:
        from opentelemetry.context import attach, detach

        token = attach(ctx)
        try:
            yield
        finally:
            detach(token)

    def attached(self, ctx: Context | None) -> contextlib.AbstractContextManager[None]:
        """`ctx` (from `capture`) current within the block; NULL for None."""
        if ctx is None:
            return NULL
        return self._attach(ctx)

    def queued(self) -> Queued | None:
        """A call entering a batcher's queue: its current span and a `queue` span started
        now; None when off."""
        if self._tracer is None:
            return None
        from opentelemetry.trace import get_current_span

        return Queued(get_current_span(), self._tracer.start_span("queue"))

    def batch(
        self, name: str, layer: int, calls: Sequence[Queued | None], tokens: int
    ) -> contextlib.AbstractContextManager[Span | None]:
        """The span of a batcher's pass over `calls`, current within the block (the pass's
        stages and worker calls are its children); NULL when off.

        Each call's queue span ends now. A pass of one call is that call's child; a pass of
        several is a new trace, linked to each call's span and each call's span to it. Each
        call's span gets the batch's size."""
        if self._tracer is None:
            return NULL
        return self._batch(name, layer, [c for c in calls if c is not None], tokens)

    @contextlib.contextmanager
    def _batch(
        self, name: str, layer: int, calls: list[Queued], tokens: int
    ) -> Iterator[Span | None]:
        from opentelemetry.context import Context
        from opentelemetry.trace import Link, set_span_in_context

        for c in calls:
            c.dequeued()
        size = {"moe_serve.batch.calls": len(calls), "moe_serve.batch.tokens": tokens}
        contexts = [c.span.get_span_context() for c in calls]
        links = [Link(sc) for sc in contexts if sc.is_valid]
        # One call: its own work, under it. Several: nobody's child (an empty context makes
        # a root), each call reached through the links.
        parent = set_span_in_context(calls[0].span) if len(calls) == 1 else Context()
        attributes = {"moe_serve.layer": layer, **size}
        with self._span(name, parent=parent, attributes=attributes, links=links) as span:
            mine = span.get_span_context()
            for c in calls:
                c.span.set_attributes(size)
                if len(calls) > 1:
                    c.span.add_link(mine)
            yield span

    def shutdown(self) -> None:
        """Export what is buffered and stop the provider, if this object made it."""
        if self._owned is not None:
            owned, self._owned = self._owned, None
            owned.shutdown()

    # --- one span ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def _span(
        self,
        name: str,
        kind: SpanKind | None = None,
        parent: Context | None = None,
        attributes: Mapping[str, Any] | None = None,
        links: Sequence[Any] | None = None,
        rpc: bool = False,
    ) -> Iterator[Span]:
        from opentelemetry.trace import SpanKind

        if self._tracer is None:  # callers check; for the type checker
            raise RuntimeError("tracing is off")
        with self._tracer.start_as_current_span(
            name,
            context=parent,
            kind=SpanKind.INTERNAL if kind is None else kind,
            attributes=attributes,
            links=links,
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            try:
                yield span
            except BaseException as exc:
                _failed(span, exc)
                raise
            if rpc:
                span.set_attribute("rpc.grpc.status_code", 0)  # OK


def _failed(span: Span, exc: BaseException) -> None:
    """Status ERROR with the gRPC status the exception stands for, as the caller sees it:
    a moe_serve MoEError's or MoEServeError's `code`, a grpc.RpcError's `code()`, CANCELLED
    for a cancelled task, INTERNAL for anything else."""
    import asyncio

    import grpc
    from opentelemetry.trace import Status, StatusCode

    code = getattr(exc, "code", None)
    if callable(code):  # grpc.RpcError
        code = code()
    if not isinstance(code, grpc.StatusCode):
        cancelled = isinstance(exc, asyncio.CancelledError)
        code = grpc.StatusCode.CANCELLED if cancelled else grpc.StatusCode.INTERNAL
    message = getattr(exc, "message", None) or str(exc) or type(exc).__name__
    span.set_attribute("rpc.grpc.status_code", code.value[0])
    span.set_status(Status(StatusCode.ERROR, f"{code.name}: {message}"))


def _rpc(name: str, attributes: Mapping[str, Any] | None) -> dict[str, Any]:
    """OpenTelemetry's RPC attributes of `name` ("package.Service/Method"), then ours."""
    service, _, method = name.partition("/")
    return {
        "rpc.system": "grpc",
        "rpc.service": service,
        "rpc.method": method,
        **(attributes or {}),
    }


NO_TRACING = Tracing()


def from_provider(provider: TracerProvider) -> Tracing:
    """Spans recorded through `provider` (an application's own OpenTelemetry
    TracerProvider); the caller keeps it (shutdown does not stop it)."""
    return Tracing(provider.get_tracer(SCOPE))


def check(cfg: TracingConfig) -> None:
    """ConfigError naming `tracing.enabled` when tracing is on and the OpenTelemetry SDK (or
    the OTLP exporter `tracing.exporter` names) is not installed."""
    if not cfg.enabled:
        return
    try:
        import opentelemetry.sdk.trace

        if cfg.exporter == "otlp":
            import opentelemetry.exporter.otlp.proto.grpc.trace_exporter  # noqa: F401
    except ImportError as exc:
        raise ConfigError(
            f"tracing.enabled: true needs OpenTelemetry ({exc.name} is not installed); "
            "install the extra: pip install 'moe-serve[otel]'"
        ) from None


def from_config(cfg: TracingConfig, service: str, instance: str | None = None) -> Tracing:
    """The spans of a process as its world config's `tracing` section says: NO_TRACING when
    off; else a provider of its own (service.name `cfg.service_name` or `service`,
    service.instance.id `instance`), its sampler and its exporter, stopped by `shutdown`.
    ConfigError naming `tracing.enabled` when OpenTelemetry is not installed."""
    if not cfg.enabled:
        return NO_TRACING
    check(cfg)
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider as SdkProvider
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        ConsoleSpanExporter,
        SpanExporter,
    )
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    attributes = {"service.name": cfg.service_name or service}
    if instance is not None:
        attributes["service.instance.id"] = instance
    provider = SdkProvider(
        resource=Resource(attributes),  # as configured: no environment detectors
        sampler=ParentBased(TraceIdRatioBased(cfg.sample_ratio)),
    )
    exporter: SpanExporter
    if cfg.exporter == "console":
        exporter = ConsoleSpanExporter()
    else:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter(
            endpoint=cfg.endpoint, insecure=not cfg.endpoint.startswith("https://")
        )
    # Spans leave in batches from a thread of the processor's own, off the serving loop.
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return Tracing(provider.get_tracer(SCOPE), owned=provider)
