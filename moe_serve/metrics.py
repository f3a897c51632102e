"""Every Prometheus metric of moe_serve, and the exporter that serves them.

Each process owns one registry (no global state), so several servers can live
in one test process.
"""

from __future__ import annotations

import threading
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    start_http_server,
)

from moe_serve.errors import ConfigError

_LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.002,
    0.005,
    0.01,
    0.02,
    0.05,
    0.1,
    0.2,
    0.5,
    1.0,
    2.0,
    5.0,
    10.0,
)
_TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 65536)

M = TypeVar("M", Counter, Gauge, Histogram)


class Children(Generic[M]):
    """`metric.labels(*values)`, looked up once per label values and kept.

    prometheus_client's labels() checks and joins the values and takes a lock on every call
    (2-3 µs on a 2-core VM); a call path that touches five metrics paid that five times per
    call. The cache holds one child per label values seen; callers pass bounded values only
    (served layers or "invalid", status codes, expert ids).
    """

    def __init__(self, metric: M) -> None:
        self.metric: M = metric
        self._children: dict[tuple[Hashable, ...], M] = {}

    def __call__(self, *values: str) -> M:
        """The child of these label values."""
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self.metric.labels(*values)
        return child


class MasterMetrics:
    """Metrics of the master process."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        ProcessCollector(registry=r)  # process_resident_memory_bytes etc., for leak alerts
        self.requests = Counter(
            "moe_serve_requests",
            "Infer requests by layer and status code",
            ["layer", "code"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "moe_serve_request_seconds",
            "Infer latency on the master, by layer",
            ["layer"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.request_tokens = Histogram(
            "moe_serve_request_tokens",
            "Tokens per Infer request",
            buckets=_TOKEN_BUCKETS,
            registry=r,
        )
        self.tokens = Counter("moe_serve_tokens", "Tokens served by layer", ["layer"], registry=r)
        self.expert_tokens = Counter(
            "moe_serve_expert_tokens",
            "Token-expert pairs routed, by layer and expert",
            ["layer", "expert"],
            registry=r,
        )
        self.dropped_pairs = Counter(
            "moe_serve_dropped_pairs",
            "Token-expert pairs dropped by the capacity limit",
            ["layer"],
            registry=r,
        )
        self.batch_requests = Histogram(
            "moe_serve_master_batch_requests",
            "Infer calls per master pass (calls queued together share one gate and fan-out)",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=r,
        )
        self.infer_transport = Counter(
            "moe_serve_master_infer_transport",
            "Infer requests by how the hidden states came: 'shared' (client region) or 'bytes'",
            ["transport"],
            registry=r,
        )
        self.worker_calls = Counter(
            "moe_serve_worker_calls",
            "Forward calls by worker and transport: 'shared' (memory region) or 'bytes' (gRPC)",
            ["worker", "transport"],
            registry=r,
        )
        self.worker_pairs = Counter(
            "moe_serve_worker_pairs",
            "Token-expert pairs computed by each worker for the master (each replica's share)",
            ["worker"],
            registry=r,
        )
        self.failovers = Counter(
            "moe_serve_master_failovers",
            "Worker slices resent to other replicas after their worker was unavailable",
            registry=r,
        )
        self.shared_fallbacks = Counter(
            "moe_serve_master_shared_fallbacks",
            "Worker calls sent as gRPC bytes because the shared region was full",
            registry=r,
        )
        self.worker_rpc_seconds = Histogram(
            "moe_serve_worker_rpc_seconds",
            "Forward call latency seen by the master",
            ["worker"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.ready = Gauge(
            "moe_serve_master_ready",
            "1 while the master's health is SERVING: every expert has a live replica, not draining",
            registry=r,
        )
        self.worker_up = Gauge(
            "moe_serve_worker_up",
            "1 if the worker answered its last health check or call",
            ["worker"],
            registry=r,
        )
        self.config_reloads = Counter(
            "moe_serve_config_reloads",
            "World config reloads (SIGHUP or Reload), by outcome: applied or refused",
            ["outcome"],
            registry=r,
        )


class WorkerMetrics:
    """Metrics of an expert worker process."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        ProcessCollector(registry=r)  # process_resident_memory_bytes etc., for leak alerts
        self.batch_tokens = Histogram(
            "moe_serve_worker_batch_tokens",
            "Tokens per merged forward batch",
            buckets=_TOKEN_BUCKETS,
            registry=r,
        )
        self.batch_requests = Histogram(
            "moe_serve_worker_batch_requests",
            "Forward calls merged into one batch",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
            registry=r,
        )
        self.queue_depth = Gauge(
            "moe_serve_worker_queue_depth", "Forward calls waiting for the batcher", registry=r
        )
        self.forward_seconds = Histogram(
            "moe_serve_worker_forward_seconds",
            "Time of one batched expert forward",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.expert_tokens = Counter(
            "moe_serve_worker_expert_tokens",
            "Token-expert pairs computed, by layer and expert",
            ["layer", "expert"],
            registry=r,
        )
        self.forward_requests = Counter(
            "moe_serve_worker_requests", "Forward calls by status code", ["code"], registry=r
        )
        self.gpu_memory_bytes = Gauge(
            "moe_serve_gpu_memory_bytes",
            "Memory allocated by torch on each device (CUDA); expert weight bytes on cpu",
            ["device"],
            registry=r,
        )
        self.config_reloads = Counter(
            "moe_serve_config_reloads",
            "World config reloads (SIGHUP or Reload), by outcome: applied or refused",
            ["outcome"],
            registry=r,
        )
        self.retiring_experts = Gauge(
            "moe_serve_worker_retiring_experts",
            "Experts a reload took from this worker that it still serves (grace window)",
            registry=r,
        )


@dataclass(frozen=True)
class Exporter:
    """A running /metrics endpoint (a WSGI server on a daemon thread)."""

    server: WSGIServer
    thread: threading.Thread

    @property
    def port(self) -> int:
        """The port it is bound to (the one chosen when asked for port 0)."""
        return int(self.server.server_port)

    def stop(self) -> None:
        """Stop serving; returns at once. Its thread notices within its 0.5 s poll interval
        (prometheus_client's serve_forever), then closes the socket."""

        def shut() -> None:
            self.server.shutdown()
            self.server.server_close()

        threading.Thread(target=shut, name="metrics exporter stop", daemon=True).start()


def start_exporter(
    port: int | None, registry: CollectorRegistry, field: str, host: str, host_field: str
) -> Exporter | None:
    """Serve /metrics on `host`:`port` in a background thread; None disables it (and is
    returned), 0 binds any free port.

    `host` is the process's gRPC listen host unless the config widens it: the metrics show
    per-expert traffic and error codes, so a master on 127.0.0.1 exports on 127.0.0.1 only.
    `field` and `host_field` name the config keys of the port and the host for the error
    when they cannot be bound.
    """
    if port is None:
        return None
    try:
        server, thread = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        why = exc.strerror or str(exc)  # getaddrinfo's errors (an unknown host) lack strerror
        raise ConfigError(
            f"{field}: cannot serve metrics on {host!r} port {port} (host: {host_field}): {why}"
        ) from None
    return Exporter(server, thread)


def local_url(host: str, port: int) -> str:
    """URL of an exporter bound on `host`:`port`, from this machine (wildcards: loopback)."""
    dial = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host)
    return f"http://{f'[{dial}]' if ':' in dial else dial}:{port}/metrics"
