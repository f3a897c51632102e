"""The master process: gates on master.device, serves MoEMaster + health + reflection + metrics."""

from __future__ import annotations

import logging

import torch

from moe_serve.config import WorldConfig, check_devices_exist
from moe_serve.master.service import MasterService
from moe_serve.master.workers import WorkerPool
from moe_serve.metrics import MasterMetrics, start_exporter
from moe_serve.transport.auth import load_tokens
from moe_serve.transport.server import (
    keep_large_allocations,
    run,
    serve_service,
    set_serving,
    wait_for_signal,
)
from moe_serve.transport.tls import check as check_tls
from moe_serve.transport.tls import server_credentials

log = logging.getLogger("moe_serve.master")


async def serve(cfg: WorldConfig) -> None:
    """Run the master until SIGTERM/SIGINT, then drain in-flight requests and stop."""
    torch.set_grad_enabled(False)
    token, worker_token = load_tokens(cfg.security)
    metrics = MasterMetrics()
    pool = WorkerPool(cfg, metrics, worker_token)  # workers check the worker token, not ours
    service = MasterService(cfg, pool, metrics)
    keep_large_allocations()  # after loading: its temporaries go back to the OS
    service.batcher.start()
    served = await serve_service(
        "MoEMaster",
        service,
        cfg.master.listen,
        cfg.message_limit("client"),
        field="master.listen",
        serving=False,
        token=token,
        credentials=None if cfg.security.tls is None else server_credentials(cfg.security.tls),
        who="master",
    )

    # Ready (SERVING) while every expert has a replica on a worker that answers its checks
    # (once draining, health ignores this and stays NOT_SERVING).
    async def on_probe(up: list[bool]) -> None:
        ready = service.placement.covered(up) and not served.drain.draining
        metrics.ready.set(int(ready))
        await set_serving(served.health, served.full_name, ready)

    pool.start_watch(on_probe)
    host = cfg.master.metrics_bind_host
    start_exporter(
        cfg.master.metrics_port,
        metrics.registry,
        "master.metrics_port",
        host,
        "master.metrics_host",
    )
    log.info(
        "master: serving layers %s on port %d (metrics: %s port %s)",
        list(cfg.model.moe_layers),
        served.port,
        host,
        cfg.master.metrics_port,
    )
    await wait_for_signal()
    metrics.ready.set(0)
    log.info("master: draining (up to %.1f s), then stopping", cfg.master.shutdown_grace_s)
    await served.shutdown(cfg.master.shutdown_grace_s)
    await service.batcher.stop()
    await pool.close()


def main(cfg: WorldConfig) -> None:
    """Entry point of `moe-serve master`."""
    check_devices_exist((cfg.master.device,), "master.device")
    load_tokens(cfg.security)  # an unset token variable is a ConfigError before anything starts
    check_tls(cfg.security.tls)  # so is an unreadable or mismatched certificate file
    run(serve(cfg))
