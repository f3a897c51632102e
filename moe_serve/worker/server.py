"""The worker process: pin experts, serve ExpertWorker + health + reflection + metrics."""

from __future__ import annotations

import logging

from moe_serve.config import WorldConfig, check_devices_exist
from moe_serve.metrics import WorkerMetrics, start_exporter
from moe_serve.transport.auth import load_worker_token
from moe_serve.transport.server import keep_large_allocations, run, serve_service, wait_for_signal
from moe_serve.transport.tls import check as check_tls
from moe_serve.transport.tls import server_credentials
from moe_serve.weights import open_weights
from moe_serve.worker.batcher import DynamicBatcher
from moe_serve.worker.engine import WorkerEngine
from moe_serve.worker.service import WorkerService

log = logging.getLogger("moe_serve.worker")


def build_engine(cfg: WorldConfig, worker_id: str) -> WorkerEngine:
    """Check this worker's devices exist here, then load and pin its experts."""
    worker = cfg.worker(worker_id)
    index = cfg.workers.index(worker)
    check_devices_exist(worker.devices, f"workers[{index}].devices")
    source = open_weights(cfg.model, cfg.routing)
    return WorkerEngine(cfg.model, worker, source, cuda_graphs=cfg.batching.cuda_graphs)


async def serve(cfg: WorldConfig, worker_id: str) -> None:
    """Run the worker until SIGTERM/SIGINT, then drain in-flight calls and stop."""
    engine = build_engine(cfg, worker_id)
    keep_large_allocations()  # after loading: its temporaries go back to the OS
    metrics = WorkerMetrics()
    for device, nbytes in engine.memory_bytes().items():
        metrics.gpu_memory_bytes.labels(device).set(nbytes)
    batcher = DynamicBatcher(engine, cfg.batching, metrics)
    batcher.start()
    worker = engine.worker
    field = f"workers[{cfg.workers.index(worker)}]"
    served = await serve_service(
        "ExpertWorker",
        WorkerService(engine, batcher),
        worker.listen_address,
        cfg.message_limit("worker"),
        field=f"{field}.{'listen' if worker.listen else 'address'}",
        token=load_worker_token(cfg.security),  # never the client token
        credentials=None if cfg.security.tls is None else server_credentials(cfg.security.tls),
        who=f"worker {worker.id}",
    )
    host = worker.metrics_bind_host
    start_exporter(
        worker.metrics_port,
        metrics.registry,
        f"{field}.metrics_port",
        host,
        f"{field}.metrics_host",
    )
    log.info(
        "worker %s: serving on port %d (metrics: %s port %s)",
        worker.id,
        served.port,
        host,
        worker.metrics_port,
    )
    await wait_for_signal()
    grace = cfg.batching.shutdown_grace_s
    log.info("worker %s: draining (up to %.1f s), then stopping", worker.id, grace)
    await served.shutdown(grace)
    await batcher.stop()


def main(cfg: WorldConfig, worker_id: str) -> None:
    """Entry point of `moe-serve worker`."""
    cfg.worker(worker_id)  # an unknown id is a ConfigError before anything starts
    load_worker_token(cfg.security)  # an unset token variable too
    check_tls(cfg.security.tls)  # and an unreadable or mismatched certificate file
    run(serve(cfg, worker_id))
