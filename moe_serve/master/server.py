"""The master process: gates on master.device, serves MoEMaster + health + reflection + metrics.

`create_master` starts a master on the running event loop and returns its handle (bound port,
metrics port, `stop`); `serve` (what `moe-serve master` runs) is `create_master`, then
SIGTERM/SIGINT, then a drain. Tests start masters with the same factory on port 0.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import torch

from moe_serve.config import WorldConfig, check_devices_exist, parse_address
from moe_serve.master.reload import Reloader
from moe_serve.master.service import MasterService
from moe_serve.master.workers import WorkerPool
from moe_serve.metrics import Exporter, MasterMetrics, start_exporter
from moe_serve.tracing import TracerProvider, Tracing, from_config, from_provider
from moe_serve.tracing import check as check_tracing
from moe_serve.transport.auth import load_tokens
from moe_serve.transport.server import (
    Served,
    keep_large_allocations,
    run,
    serve_service,
    set_serving,
    wait_for_signal,
)
from moe_serve.transport.tls import check as check_tls
from moe_serve.transport.tls import server_credentials

log = logging.getLogger("moe_serve.master")


@dataclass
class MasterServer:
    """A master serving on the running event loop; `stop` (or leaving `async with`) drains
    it and frees what it holds (its shared region, its channels, its exporter)."""

    cfg: WorldConfig
    service: MasterService
    served: Served
    exporter: Exporter | None
    # Set while every expert has a replica on a worker that answers its health checks.
    ready: asyncio.Event = field(default_factory=asyncio.Event, init=False)
    _stopped: bool = field(default=False, init=False)

    @property
    def port(self) -> int:
        """The gRPC port it is bound to (the one chosen when asked for port 0)."""
        return self.served.port

    @property
    def address(self) -> str:
        """host:port it is bound to: the host of `master.listen`, the bound port."""
        host, _ = parse_address(self.cfg.master.listen)
        return f"{host}:{self.port}"

    @property
    def metrics_port(self) -> int | None:
        """The port of its /metrics exporter, or None without one."""
        return None if self.exporter is None else self.exporter.port

    @property
    def pool(self) -> WorkerPool:
        return self.service.pool

    @property
    def metrics(self) -> MasterMetrics:
        return self.service.metrics

    async def stop(self, grace_s: float | None = None) -> None:
        """NOT_SERVING, refuse new calls, let in-flight ones finish for up to `grace_s`
        (default `master.shutdown_grace_s`), then stop and free everything. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        grace = self.cfg.master.shutdown_grace_s if grace_s is None else grace_s
        self.metrics.ready.set(0)
        try:
            await self.served.shutdown(grace)
        finally:
            await _release(self.pool, self.service, self.exporter)

    async def __aenter__(self) -> MasterServer:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()


async def _release(
    pool: WorkerPool, service: MasterService | None, exporter: Exporter | None
) -> None:
    """Stop the batcher, close the worker channels and the shared region, stop the exporter,
    flush the spans."""
    try:
        if service is not None:
            await service.batcher.stop()
    finally:
        await pool.close()  # closes the shared region too
        if exporter is not None:
            exporter.stop()
        pool.tracing.shutdown()  # the provider of the config's tracing section, if any


async def create_master(
    cfg: WorldConfig,
    port: int | None = None,
    metrics_port: int | None = None,
    tracer_provider: TracerProvider | None = None,
    config_path: Path | None = None,
) -> MasterServer:
    """Load the gates, start serving MoEMaster on the running loop, return its handle.

    `port`: the gRPC port to bind on the host of `master.listen`; None: the port of
    `master.listen`; 0: any free port (`MasterServer.port` says which). `metrics_port`
    likewise replaces `master.metrics_port` (None keeps it; 0: any free port).
    `tracer_provider`: an OpenTelemetry TracerProvider to record the master's spans in,
    tracing on whatever the config's `tracing` section says (None: as that section says).
    A ConfigError (an address that cannot be bound, a bad token source) leaves nothing
    behind: no region, no channel, no exporter. `config_path`: the file `cfg` came from,
    re-read on SIGHUP and MoEMaster.Reload (moe_serve.master.reload; None: Reload is refused).
    """
    token, worker_token = load_tokens(cfg.security)
    tracing: Tracing = (
        from_config(cfg.tracing, "moe-serve-master")
        if tracer_provider is None
        else from_provider(tracer_provider)
    )
    metrics = MasterMetrics()
    try:
        # Workers check the worker token, not ours.
        pool = WorkerPool(cfg, metrics, worker_token, tracing)
    except BaseException:
        tracing.shutdown()
        raise
    service: MasterService | None = None
    served: Served | None = None
    exporter: Exporter | None = None
    try:
        service = MasterService(cfg, pool, metrics, tracing)
        service.reloader = Reloader(service.engine, pool, config_path)
        keep_large_allocations()  # after loading: its temporaries go back to the OS
        service.batcher.start()
        listen = cfg.master.listen
        if port is not None:
            listen = f"{parse_address(listen)[0]}:{port}"
        served = await serve_service(
            "MoEMaster",
            service,
            listen,
            cfg.message_limit("client"),
            field="master.listen",
            serving=False,
            token=token,
            credentials=None if cfg.security.tls is None else server_credentials(cfg.security.tls),
            who="master",
        )
        exporter = start_exporter(
            cfg.master.metrics_port if metrics_port is None else metrics_port,
            metrics.registry,
            "master.metrics_port",
            cfg.master.metrics_bind_host,
            "master.metrics_host",
        )
    except BaseException as exc:
        if served is not None:
            await served.server.stop(0)
        await _release(pool, service, exporter)
        # The region's memory goes with its last mapping, held through the pool: drop every
        # reference (the exception's frames too), so that a process that embeds the master
        # and goes on does not keep 256 MiB for nothing (a CLI master exits 2 anyway).
        traceback.clear_frames(exc.__traceback__)
        del pool, service, served
        gc.collect()  # gRPC's server objects, which held the servicer, sit in cycles
        raise
    master = MasterServer(cfg, service, served, exporter)

    # Ready (SERVING) while every expert has a replica on a worker that answers its checks
    # (once draining, health ignores this and stays NOT_SERVING).
    async def on_probe(up: list[bool]) -> None:
        reloader = service.reloader
        assert reloader is not None  # set above
        reloader.refresh()  # route by what the workers now say they serve
        await reloader.close_drained()
        ready = service.engine.placement.covered(up) and not served.drain.draining
        metrics.ready.set(int(ready))
        if ready:
            master.ready.set()
        else:
            master.ready.clear()
        await set_serving(served.health, served.full_name, ready)

    pool.start_watch(on_probe)
    return master


async def serve(cfg: WorldConfig, config_path: Path | None = None) -> None:
    """Run the master until SIGTERM/SIGINT, then drain in-flight requests and stop; on
    SIGHUP re-read `config_path` and apply the difference (moe_serve.master.reload)."""
    torch.set_grad_enabled(False)  # this thread serves only: no autograd anywhere
    master = await create_master(cfg, config_path=config_path)
    log.info(
        "master: serving layers %s on port %d (metrics: %s port %s)",
        list(cfg.model.moe_layers),
        master.port,
        cfg.master.metrics_bind_host,
        master.metrics_port,
    )
    reloader = master.service.reloader
    await wait_for_signal(None if reloader is None else reloader.on_signal)
    log.info("master: draining (up to %.1f s), then stopping", cfg.master.shutdown_grace_s)
    await master.stop()


def main(cfg: WorldConfig, config_path: Path | None = None) -> None:
    """Entry point of `moe-serve master`. `config_path`: the file `cfg` came from, re-read on
    SIGHUP and MoEMaster.Reload."""
    check_devices_exist((cfg.master.device,), "master.device")
    load_tokens(cfg.security)  # an unset token variable is a ConfigError before anything starts
    check_tls(cfg.security.tls)  # so is an unreadable or mismatched certificate file
    check_tracing(cfg.tracing)  # and tracing on without OpenTelemetry installed
    run(serve(cfg, config_path))
