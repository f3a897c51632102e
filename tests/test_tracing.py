"""Tracing (moe_serve.tracing): OpenTelemetry spans from the client through the master to the
workers, with the stages of each hop; nothing at all when off.

Masters and workers are served in this process on port 0 (tests/support/cluster.py), all
recording into one OpenTelemetry SDK provider with an in-memory exporter, so a test sees the
whole trace of a call: the client's span, the master's, its calls to the workers and theirs.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from moe_serve.client import AsyncMoEClient, MoEClient, MoEServeError
from moe_serve.config import TracingConfig
from moe_serve.errors import ConfigError
from moe_serve.tracing import (
    EMBEDDED_INFER,
    FORWARD,
    INFER,
    MASTER_PASS,
    WORKER_PASS,
    check,
)
from moe_serve.transport.calls import unary_call
from moe_serve.transport.wire import serialize
from moe_serve.v1 import moe_pb2 as pb
from moe_serve.worker.service import WorkerService
from tests.support.cluster import InProcessCluster, world

ROOT = Path(__file__).resolve().parent.parent
H = 64
MASTER_STAGES = {"decode", "queue", "encode", MASTER_PASS}
PASS_STAGES = {"gate", "dispatch", "fan_out", "combine"}
WORKER_STAGES = {"decode", "queue", "encode", WORKER_PASS}
# Long enough that calls sent together always share the master's batch, even on a slow CI.
MERGE_WINDOW_US = 1_000_000


@pytest.fixture(scope="module")
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture(scope="module")
def provider(exporter: InMemorySpanExporter) -> Iterator[TracerProvider]:
    p = TracerProvider()
    p.add_span_processor(SimpleSpanProcessor(exporter))  # spans exported as they end
    yield p
    p.shutdown()


@pytest.fixture(autouse=True)
def fresh(exporter: InMemorySpanExporter) -> None:
    exporter.clear()


@pytest.fixture(scope="module")
def traced(provider: TracerProvider) -> Iterator[InProcessCluster]:
    """A master and two workers recording spans into `provider`."""
    c = InProcessCluster(world(), tracer_provider=provider)
    yield c
    c.stop()


@pytest.fixture(scope="module")
def merging(provider: TracerProvider) -> Iterator[InProcessCluster]:
    """The same, with a batching window: calls sent together leave as one pass."""
    c = InProcessCluster(
        world(master={"batch_delay_us": MERGE_WINDOW_US}), tracer_provider=provider
    )
    yield c
    c.stop()


SEEN: list[dict[str, Any]] = []  # metadata of each Forward the recording workers got


class RecordingWorker(WorkerService):
    """A worker that notes the metadata of each Forward call it gets."""

    async def Forward(self, request: pb.ForwardRequest, context: Any) -> Any:
        SEEN.append(dict(context.invocation_metadata() or ()))
        return await super().Forward(request, context)


@pytest.fixture(scope="module")
def untraced() -> Iterator[InProcessCluster]:
    """A master and workers with tracing off (the default), the workers recording metadata."""
    c = InProcessCluster(world(), service=RecordingWorker)
    yield c
    c.stop()


def _x(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0))


def _one(spans: list[ReadableSpan], name: str, kind: SpanKind | None = None) -> ReadableSpan:
    found = [s for s in spans if s.name == name and (kind is None or s.kind == kind)]
    assert len(found) == 1, [s.name for s in spans]
    return found[0]


def _children(spans: list[ReadableSpan], parent: ReadableSpan) -> list[ReadableSpan]:
    assert parent.context is not None
    return [s for s in spans if s.parent is not None and s.parent.span_id == parent.context.span_id]


def _names(spans: list[ReadableSpan]) -> set[str]:
    return {s.name for s in spans}


# --- one call, one trace -------------------------------------------------------------------


def test_one_trace_id_from_the_client_span_to_the_worker_spans(
    traced: InProcessCluster, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    with MoEClient(traced.address, tracer_provider=provider) as client:
        client.infer(_x(8, H))
    spans = list(exporter.get_finished_spans())
    call = _one(spans, INFER, SpanKind.CLIENT)
    assert call.context is not None and call.parent is None  # the application had no span
    assert {s.context.trace_id for s in spans if s.context} == {call.context.trace_id}
    served = _one(spans, INFER, SpanKind.SERVER)
    assert served.parent is not None and served.parent.span_id == call.context.span_id
    # 8 tokens, top-2 of 8 experts split over two workers: both are called, once each.
    calls = [s for s in spans if s.name == FORWARD and s.kind == SpanKind.CLIENT]
    serves = [s for s in spans if s.name == FORWARD and s.kind == SpanKind.SERVER]
    assert len(calls) == len(serves) == 2
    assert {s.parent.span_id for s in serves if s.parent} == {
        s.context.span_id for s in calls if s.context
    }
    assert {s.attributes["moe_serve.worker.id"] for s in calls if s.attributes} == {"w0", "w1"}
    for s in (call, served, *calls, *serves):
        assert s.status.status_code != StatusCode.ERROR
        assert s.attributes is not None and s.attributes["rpc.grpc.status_code"] == 0


def test_every_stage_of_each_hop_is_a_span_that_took_time(
    traced: InProcessCluster, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    with MoEClient(traced.address, tracer_provider=provider) as client:
        client.infer(_x(8, H))
    spans = list(exporter.get_finished_spans())
    served = _one(spans, INFER, SpanKind.SERVER)
    assert _names(_children(spans, served)) == MASTER_STAGES
    master_pass = _one(spans, MASTER_PASS)
    assert _names(_children(spans, master_pass)) == PASS_STAGES
    fan_out = _one(spans, "fan_out")
    assert {s.name for s in _children(spans, fan_out)} == {FORWARD}
    for worker in (s for s in spans if s.name == FORWARD and s.kind == SpanKind.SERVER):
        assert _names(_children(spans, worker)) == WORKER_STAGES
        assert worker.attributes is not None and worker.attributes["moe_serve.tokens"] > 0
    for worker_pass in (s for s in spans if s.name == WORKER_PASS):
        assert _names(_children(spans, worker_pass)) == {"expert_forward"}
    # A batch of one call: its span carries the batch's size.
    assert served.attributes is not None
    assert (served.attributes["moe_serve.batch.calls"], served.attributes["moe_serve.tokens"]) == (
        1,
        8,
    )
    for s in spans:
        assert s.start_time is not None and s.end_time is not None
        assert s.end_time > s.start_time, s.name


def test_calls_merged_into_one_pass_are_linked_to_it_not_parented(
    merging: InProcessCluster, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    async def three() -> None:
        async with AsyncMoEClient(merging.address, tracer_provider=provider) as client:
            await asyncio.gather(*(client.infer(_x(2 + i, H)) for i in range(3)))

    asyncio.run(three())
    spans = list(exporter.get_finished_spans())
    requests = [s for s in spans if s.name == INFER and s.kind == SpanKind.SERVER]
    assert len(requests) == 3
    assert len({s.context.trace_id for s in requests if s.context}) == 3  # three traces
    batch = _one(spans, MASTER_PASS)
    assert batch.parent is None and batch.context is not None  # a trace of its own
    assert sorted(link.context.span_id for link in batch.links) == sorted(
        s.context.span_id for s in requests if s.context
    )
    for s in requests:
        assert s.attributes is not None
        assert (s.attributes["moe_serve.batch.calls"], s.attributes["moe_serve.batch.tokens"]) == (
            3,
            2 + 3 + 4,
        )
        assert [link.context.span_id for link in s.links] == [batch.context.span_id]
        assert _names(_children(spans, s)) == {"decode", "queue", "encode"}
    # The pass's own work, its calls to the workers included, is in the pass's trace.
    calls = [s for s in spans if s.name == FORWARD and s.kind == SpanKind.CLIENT]
    assert calls and {s.context.trace_id for s in calls if s.context} == {batch.context.trace_id}


def test_the_embedded_client_has_the_same_spans_without_the_master_hop(
    traced: InProcessCluster, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    with MoEClient.embedded(traced.cfg, tracer_provider=provider) as client:
        client.infer(_x(8, H))
    spans = list(exporter.get_finished_spans())
    assert INFER not in _names(spans)
    call = _one(spans, EMBEDDED_INFER)
    assert call.context is not None and call.kind == SpanKind.INTERNAL
    assert {s.context.trace_id for s in spans if s.context} == {call.context.trace_id}
    assert _names(_children(spans, call)) == {"decode", "queue", MASTER_PASS}
    assert _names(_children(spans, _one(spans, MASTER_PASS))) == PASS_STAGES
    calls = [s for s in spans if s.name == FORWARD and s.kind == SpanKind.CLIENT]
    serves = [s for s in spans if s.name == FORWARD and s.kind == SpanKind.SERVER]
    assert len(calls) == len(serves) == 2
    assert {s.parent.span_id for s in serves if s.parent} == {
        s.context.span_id for s in calls if s.context
    }


# --- failures ------------------------------------------------------------------------------


def test_a_call_failing_invalid_argument_records_the_status_on_its_spans(
    traced: InProcessCluster, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    client = MoEClient(traced.address, tracer_provider=provider)
    with client, pytest.raises(MoEServeError) as err:
        client.infer(_x(4, 7))  # hidden size 7, not 64
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    spans = list(exporter.get_finished_spans())
    for kind in (SpanKind.CLIENT, SpanKind.SERVER):
        span = _one(spans, INFER, kind)
        assert span.attributes is not None
        assert span.attributes["rpc.grpc.status_code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert span.status.status_code == StatusCode.ERROR
        assert span.status.description is not None
        assert span.status.description.startswith("INVALID_ARGUMENT: hidden.shape[1]: 7")
    assert _one(spans, "decode").status.status_code == StatusCode.ERROR  # where it failed
    assert MASTER_PASS not in _names(spans) and FORWARD not in _names(spans)


def test_a_malformed_traceparent_starts_a_new_trace(
    traced: InProcessCluster, exporter: InMemorySpanExporter
) -> None:
    request = serialize(pb.InferRequest(layer=0), {"hidden": _x(2, H)})
    with grpc.insecure_channel(traced.address) as channel:
        infer = unary_call(channel, "MoEMaster", "Infer", pb.InferResponse)
        infer(request, timeout=30, metadata=(("traceparent", "00-not-a-trace-01"),))
    served = _one(list(exporter.get_finished_spans()), INFER, SpanKind.SERVER)
    assert served.parent is None


# --- off: free -----------------------------------------------------------------------------


def test_off_there_is_no_span_and_no_traceparent_to_the_workers(
    untraced: InProcessCluster, exporter: InMemorySpanExporter
) -> None:
    SEEN.clear()
    with MoEClient(untraced.address) as client:
        client.infer(_x(8, H))
    with MoEClient.embedded(untraced.cfg) as client:
        client.infer(_x(8, H))
    assert exporter.get_finished_spans() == ()
    assert len(SEEN) == 4  # two workers, through the master then embedded
    assert [m for m in SEEN if "traceparent" in m or "tracestate" in m] == []


def test_a_client_without_a_tracer_provider_sends_no_traceparent(
    provider: TracerProvider,
) -> None:
    seen: list[dict[str, Any]] = []

    def infer(request: bytes, context: grpc.ServicerContext) -> bytes:
        seen.append(dict(context.invocation_metadata()))
        context.abort(grpc.StatusCode.UNAVAILABLE, "recording only")
        return b""

    server = grpc.server(futures.ThreadPoolExecutor(2))
    handler = grpc.unary_unary_rpc_method_handler(infer)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("moe_serve.v1.MoEMaster", {"Infer": handler}),)
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        for tracer_provider in (None, provider):
            client = MoEClient(f"127.0.0.1:{port}", tracer_provider=tracer_provider)
            with client, pytest.raises(MoEServeError):
                client.infer(_x(1, H))
    finally:
        server.stop(0)
    off, on = seen
    assert "traceparent" not in off
    assert on["traceparent"].startswith("00-")  # W3C: version 00, trace id, span id, flags


def test_off_no_opentelemetry_module_is_imported() -> None:
    code = textwrap.dedent(
        """
        import sys
        import torch
        from moe_serve.client import MoEClient
        from tests.support.cluster import InProcessCluster, world

        cluster = InProcessCluster(world())
        try:
            with MoEClient(cluster.address) as client:
                client.infer(torch.randn(4, 64))
            with MoEClient.embedded(cluster.cfg) as client:
                client.infer(torch.randn(4, 64))
        finally:
            cluster.stop()
        print(sorted(m for m in sys.modules if m.startswith("opentelemetry")))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"


# --- the config --------------------------------------------------------------------------


def test_the_console_exporter_of_the_config_prints_each_span_with_its_service() -> None:
    code = textwrap.dedent(
        """
        from moe_serve.config import TracingConfig
        from moe_serve.tracing import from_config

        t = from_config(TracingConfig(enabled=True, exporter="console", service_name="svc-x"), "x")
        with t.span("probe"):
            pass
        t.shutdown()
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert '"name": "probe"' in done.stdout and '"service.name": "svc-x"' in done.stdout


def test_tracing_on_without_opentelemetry_is_a_config_error_naming_the_key(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "opentelemetry.sdk.trace", None)  # as if not installed
    with pytest.raises(ConfigError, match=r"^tracing\.enabled: .*moe-serve\[otel\]"):
        check(TracingConfig(enabled=True))
    check(TracingConfig(enabled=False))  # off: nothing to import, nothing to check
