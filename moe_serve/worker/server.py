"""The worker process: pin experts, serve ExpertWorker + health + reflection + metrics.

`create_worker` starts a worker on the running event loop and returns its handle (bound port,
metrics port, `reload`, `stop`); `serve` (what `moe-serve worker` runs) is `create_worker`,
then reloads on SIGHUP (moe_serve.worker.reload) until SIGTERM/SIGINT, then a drain. Tests
start workers with the same factory on port 0.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from moe_serve.config import WorkerConfig, WorldConfig, check_devices_exist, parse_address
from moe_serve.metrics import Exporter, WorkerMetrics, start_exporter
from moe_serve.tracing import TracerProvider, Tracing, from_config, from_provider
from moe_serve.tracing import check as check_tracing
from moe_serve.transport.auth import load_worker_token
from moe_serve.transport.server import (
    Served,
    keep_large_allocations,
    run,
    serve_service,
    wait_for_signal,
)
from moe_serve.transport.tls import check as check_tls
from moe_serve.transport.tls import server_credentials
from moe_serve.weights import open_weights
from moe_serve.worker.batcher import DynamicBatcher
from moe_serve.worker.engine import WorkerEngine
from moe_serve.worker.reload import Reloader
from moe_serve.worker.service import WorkerService

log = logging.getLogger("moe_serve.worker")

# Builds the servicer of a worker from its engine and batcher (tests pass subclasses).
ServiceFactory = Callable[[WorkerEngine, DynamicBatcher], WorkerService]


def build_engine(cfg: WorldConfig, worker_id: str) -> WorkerEngine:
    """Check this worker's devices exist here, then load and pin its experts."""
    worker = cfg.worker(worker_id)
    index = cfg.workers.index(worker)
    check_devices_exist(worker.devices, f"workers[{index}].devices")
    source = open_weights(cfg.model, cfg.routing)
    return WorkerEngine(cfg.model, worker, source, cuda_graphs=cfg.batching.cuda_graphs)


@dataclass
class WorkerServer:
    """A worker serving on the running event loop; `reload` applies its config file's new
    entry; `stop` (or leaving `async with`) drains it and stops its batcher and exporter.
    `cfg` and `worker` are what it started with (`reloader.cfg`: the config now applied)."""

    cfg: WorldConfig
    worker: WorkerConfig
    service: WorkerService
    batcher: DynamicBatcher
    metrics: WorkerMetrics
    served: Served
    exporter: Exporter | None
    reloader: Reloader
    _stopped: bool = field(default=False, init=False)

    @property
    def port(self) -> int:
        """The gRPC port it is bound to (the one chosen when asked for port 0)."""
        return self.served.port

    @property
    def address(self) -> str:
        """host:port it is bound to: the host it listens on, the bound port."""
        host, _ = parse_address(self.worker.listen_address)
        return f"{host}:{self.port}"

    @property
    def metrics_port(self) -> int | None:
        """The port of its /metrics exporter, or None without one."""
        return None if self.exporter is None else self.exporter.port

    async def reload(self) -> str:
        """Re-read the config file and apply this worker's new entry, as SIGHUP and
        ExpertWorker.Reload do; the summary of what changed (Reloader.reload)."""
        return await self.reloader.reload()

    async def stop(self, grace_s: float | None = None) -> None:
        """NOT_SERVING, refuse new calls, let in-flight ones finish for up to `grace_s`
        (default `batching.shutdown_grace_s`), then stop. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        grace = self.cfg.batching.shutdown_grace_s if grace_s is None else grace_s
        try:
            await self.served.shutdown(grace)
        finally:
            await self.reloader.close()
            await self.batcher.stop()
            if self.exporter is not None:
                self.exporter.stop()
            self.batcher.tracing.shutdown()  # flush the spans

    async def __aenter__(self) -> WorkerServer:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()


async def create_worker(
    cfg: WorldConfig,
    worker_id: str,
    port: int | None = None,
    metrics_port: int | None = None,
    service: ServiceFactory = WorkerService,
    tracer_provider: TracerProvider | None = None,
    config_path: Path | None = None,
) -> WorkerServer:
    """Load and pin worker `worker_id`'s experts, start serving ExpertWorker on the running
    loop, return its handle.

    `port`: the gRPC port to bind on the host it listens on; None: the configured port;
    0: any free port (`WorkerServer.port` says which). `metrics_port` likewise replaces the
    worker's `metrics_port` (None keeps it; 0: any free port). `service` builds the servicer.
    `tracer_provider`: an OpenTelemetry TracerProvider to record the worker's spans in,
    tracing on whatever the config's `tracing` section says (None: as that section says).
    `config_path`: the file `cfg` came from, re-read by `reload` (None: reloads are refused).
    """
    worker = cfg.worker(worker_id)
    token = load_worker_token(cfg.security)  # never the client token
    engine = build_engine(cfg, worker_id)
    keep_large_allocations()  # after loading: its temporaries go back to the OS
    metrics = WorkerMetrics()
    for device, nbytes in engine.memory_bytes().items():
        metrics.gpu_memory_bytes.labels(device).set(nbytes)
    tracing: Tracing = (
        from_config(cfg.tracing, "moe-serve-worker", worker.id)
        if tracer_provider is None
        else from_provider(tracer_provider)
    )
    batcher = DynamicBatcher(engine, cfg.batching, metrics, tracing)
    batcher.start()
    field_ = f"workers[{cfg.workers.index(worker)}]"
    listen = worker.listen_address
    if port is not None:
        listen = f"{parse_address(listen)[0]}:{port}"
    servicer = service(engine, batcher)
    reloader = servicer.reloader = Reloader(cfg, worker_id, config_path, engine, metrics)
    served: Served | None = None
    try:
        served = await serve_service(
            "ExpertWorker",
            servicer,
            listen,
            cfg.message_limit("worker"),
            field=f"{field_}.{'listen' if worker.listen else 'address'}",
            token=token,
            credentials=None if cfg.security.tls is None else server_credentials(cfg.security.tls),
            who=f"worker {worker.id}",
        )
        exporter = start_exporter(
            worker.metrics_port if metrics_port is None else metrics_port,
            metrics.registry,
            f"{field_}.metrics_port",
            worker.metrics_bind_host,
            f"{field_}.metrics_host",
        )
    except BaseException:
        if served is not None:
            await served.server.stop(0)
        await batcher.stop()
        tracing.shutdown()
        raise
    return WorkerServer(cfg, worker, servicer, batcher, metrics, served, exporter, reloader)


async def serve(cfg: WorldConfig, worker_id: str, config_path: Path | None = None) -> None:
    """Run the worker until SIGTERM/SIGINT, then drain in-flight calls and stop; on each
    SIGHUP re-read `config_path` and apply this worker's new entry."""
    server = await create_worker(cfg, worker_id, config_path=config_path)
    worker = server.worker
    log.info(
        "worker %s: serving on port %d (metrics: %s port %s)",
        worker.id,
        server.port,
        worker.metrics_bind_host,
        server.metrics_port,
    )
    await wait_for_signal(on_reload=server.reloader.on_signal)
    grace = cfg.batching.shutdown_grace_s
    log.info("worker %s: draining (up to %.1f s), then stopping", worker.id, grace)
    await server.stop(grace)


def main(cfg: WorldConfig, worker_id: str, config_path: Path | None = None) -> None:
    """Entry point of `moe-serve worker`. `config_path`: the file `cfg` came from, re-read on
    SIGHUP and ExpertWorker.Reload."""
    cfg.worker(worker_id)  # an unknown id is a ConfigError before anything starts
    load_worker_token(cfg.security)  # an unset token variable too
    check_tls(cfg.security.tls)  # and an unreadable or mismatched certificate file
    check_tracing(cfg.tracing)  # and tracing on without OpenTelemetry installed
    run(serve(cfg, worker_id, config_path))
