"""The master's MoE layer as an engine (moe_serve.master.engine), and what the master counts
and says around it: requests by status code, dropped pairs from the start, the UNAVAILABLE
message of an expert with no live replica.

Workers (and the master, where a client's deadline is tested) are real gRPC servers on
loopback port 0, served by the test's own event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import pytest
import torch
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from moe_serve.client import AsyncMoEClient, MoEServeError
from moe_serve.config import WorldConfig, parse_config
from moe_serve.errors import WorkerUnavailableError
from moe_serve.layer.reference import ReferenceMoE
from moe_serve.master.engine import MasterEngine
from moe_serve.master.service import MasterService
from moe_serve.master.workers import WorkerPool
from moe_serve.metrics import MasterMetrics, WorkerMetrics
from moe_serve.transport.server import Served, serve_service
from moe_serve.worker.batcher import DynamicBatcher
from moe_serve.worker.engine import WorkerEngine
from moe_serve.worker.server import build_engine
from moe_serve.worker.service import WorkerService
from tests.conftest import world

FP32_TOL = 1e-5  # as tests/test_failover.py for the served path against the reference
NO_REGION = {"shared_memory_bytes": 0}  # bytes on loopback; no /dev/shm region per test
WorkerFactory = Callable[[WorkerEngine, DynamicBatcher], WorkerService]


@contextlib.asynccontextmanager
async def workers(
    config: dict[str, Any], service: WorkerFactory = WorkerService, down: tuple[str, ...] = ()
) -> AsyncIterator[WorldConfig]:
    """The workers of `config` (but those in `down`) served on 127.0.0.1 port 0 by the
    running loop; yields the config with their bound addresses (a worker in `down` keeps its
    configured address, where nothing listens)."""
    cfg = parse_config(config)
    bound, servers, batchers = copy.deepcopy(config), list[Served](), list[DynamicBatcher]()
    try:
        for w, entry in zip(cfg.workers, bound["workers"], strict=True):
            if w.id in down:
                continue
            engine = build_engine(cfg, w.id)
            batcher = DynamicBatcher(engine, cfg.batching, WorkerMetrics())
            batcher.start()
            batchers.append(batcher)
            limit = cfg.message_limit("worker")
            served = await serve_service(
                "ExpertWorker", service(engine, batcher), "127.0.0.1:0", limit, "address"
            )
            servers.append(served)
            entry["address"] = f"127.0.0.1:{served.port}"
        yield parse_config(bound)
    finally:
        for served in servers:
            await served.server.stop(0)
        for batcher in batchers:
            await batcher.stop()


@contextlib.asynccontextmanager
async def master(cfg: WorldConfig) -> AsyncIterator[tuple[MasterService, str]]:
    """A master for `cfg`'s workers served on 127.0.0.1 port 0: (its servicer, address)."""
    metrics = MasterMetrics()
    pool = WorkerPool(cfg, metrics)
    service = MasterService(cfg, pool, metrics)
    service.batcher.start()
    served = None
    try:
        served = await serve_service(
            "MoEMaster", service, "127.0.0.1:0", cfg.message_limit("client"), "master.listen"
        )
        await pool.probe()
        yield service, f"127.0.0.1:{served.port}"
    finally:
        if served is not None:
            await served.server.stop(0)
        await service.batcher.stop()
        await pool.close()


class SlowWorker(WorkerService):
    """A real worker that answers Forward after 2 s."""

    async def Forward(self, request: Any, context: grpc.aio.ServicerContext) -> bytes:
        await asyncio.sleep(2.0)
        return await super().Forward(request, context)


class FailingWorker(WorkerService):
    """A real worker answering Forward with a code no worker should answer."""

    async def Forward(self, request: Any, context: grpc.aio.ServicerContext) -> bytes:
        await context.abort(grpc.StatusCode.DATA_LOSS, "stream cut")
        raise AssertionError("unreachable: abort raises")


def _requests(service: MasterService, code: str) -> float:
    value = service.metrics.registry.get_sample_value(
        "moe_serve_requests_total", {"layer": "0", "code": code}
    )
    return value or 0.0


async def _counted(service: MasterService, code: str) -> float:
    """The requests counted with `code`, once the handler has counted one (it finishes a
    moment after the client has its answer), or 0 after 2 s."""
    for _ in range(200):
        if _requests(service, code):
            break
        await asyncio.sleep(0.01)
    return _requests(service, code)


def test_engine_forward_of_a_batch_equals_the_reference_call_by_call() -> None:
    # Experts 3 and 4 on both workers: their tokens are split between the replicas.
    config = world(
        model={"shared_expert_ffn_size": 32},
        workers=[{"experts": [0, 1, 2, 3, 4]}, {"experts": [3, 4, 5, 6, 7]}],
        master=NO_REGION,
    )
    gen = torch.Generator().manual_seed(3)
    xs = [torch.randn(T, 64, generator=gen) for T in (5, 1, 12)]

    async def main() -> tuple[WorldConfig, list[Any], float]:
        async with workers(config) as cfg:
            metrics = MasterMetrics()
            pool = WorkerPool(cfg, metrics)
            try:
                await pool.probe()
                engine = MasterEngine(cfg, pool, metrics)
                outcomes = await engine.forward(0, xs, [True, False, False], timeout_s=10.0)
            finally:
                await pool.close()
        registry = metrics.registry
        pairs = sum(
            registry.get_sample_value("moe_serve_worker_pairs_total", {"worker": w.id}) or 0.0
            for w in cfg.workers
        )
        return cfg, outcomes, pairs

    cfg, outcomes, pairs = asyncio.run(main())
    reference = ReferenceMoE(cfg.model, cfg.routing)
    assert len(outcomes) == 3
    for x, outcome in zip(xs, outcomes, strict=True):
        assert not isinstance(outcome, BaseException), outcome
        out, routing = outcome
        want, want_routing = reference.forward(x, 0)
        assert out.shape == (x.shape[0], 64)
        assert (out - want).abs().max().item() <= FP32_TOL
        assert torch.equal(routing.expert_ids, want_routing.expert_ids)
    assert outcomes[0][1].load_balance_loss is not None  # asked for: call 0 only
    assert outcomes[1][1].load_balance_loss is None
    assert pairs == 18 * 2  # every row's top-2 pairs computed once, none twice


def test_dropped_pairs_read_zero_per_layer_in_a_scrape_before_any_request() -> None:
    config = world(model={"moe_layers": [0, 3]}, master=NO_REGION)
    cfg = parse_config(config)

    async def main() -> str:
        metrics = MasterMetrics()
        pool = WorkerPool(cfg, metrics)
        try:
            MasterEngine(cfg, pool, metrics)
        finally:
            await pool.close()
        return generate_latest(metrics.registry).decode()

    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(asyncio.run(main()))
        for s in family.samples
    }
    dropped = {k: v for k, v in samples.items() if k[0] == "moe_serve_dropped_pairs_total"}
    assert dropped == {
        ("moe_serve_dropped_pairs_total", (("layer", "0"),)): 0.0,
        ("moe_serve_dropped_pairs_total", (("layer", "3"),)): 0.0,
    }


def test_a_client_deadline_passing_on_a_slow_worker_counts_as_deadline_exceeded() -> None:
    config = world(workers=[{"experts": list(range(8))}], master=NO_REGION)

    async def main() -> tuple[MoEServeError, float, float]:
        async with workers(config, SlowWorker) as cfg, master(cfg) as (service, address):
            async with AsyncMoEClient(address, timeout=0.3) as client:
                with pytest.raises(MoEServeError) as err:
                    await client.infer(torch.randn(4, 64))
            counted = await _counted(service, "DEADLINE_EXCEEDED")
            return err.value, counted, _requests(service, "INTERNAL")

    err, deadline_exceeded, internal = asyncio.run(main())
    assert err.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert deadline_exceeded == 1
    assert internal == 0


def test_a_client_cancelling_its_call_counts_as_cancelled() -> None:
    config = world(workers=[{"experts": list(range(8))}], master=NO_REGION)

    async def main() -> tuple[float, float]:
        async with workers(config, SlowWorker) as cfg, master(cfg) as (service, address):
            async with AsyncMoEClient(address, timeout=30) as client:
                call = asyncio.ensure_future(client.infer(torch.randn(4, 64)))
                await asyncio.sleep(0.3)  # the master now waits on the slow worker
                call.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await call
            counted = await _counted(service, "CANCELLED")
            return counted, _requests(service, "INTERNAL")

    cancelled, internal = asyncio.run(main())
    assert cancelled == 1
    assert internal == 0


def test_an_internal_error_is_counted_and_logged_with_the_exception(
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = world(workers=[{"experts": list(range(8))}], master=NO_REGION)

    async def main() -> tuple[MoEServeError, float]:
        async with workers(config, FailingWorker) as cfg, master(cfg) as (service, address):
            async with AsyncMoEClient(address, timeout=10) as client:
                with pytest.raises(MoEServeError) as err:
                    await client.infer(torch.randn(4, 64))
            return err.value, await _counted(service, "INTERNAL")

    with caplog.at_level(logging.ERROR, logger="moe_serve.master.service"):
        err, internal = asyncio.run(main())
    assert err.code == grpc.StatusCode.INTERNAL
    assert internal == 1
    (record,) = [r for r in caplog.records if r.name == "moe_serve.master.service"]
    assert record.getMessage().startswith("Infer on layer 0 failed: INTERNAL: worker 'w0' failed")
    assert record.exc_info is not None  # the exception, with its traceback


def test_no_live_replica_names_the_experts_and_worker_and_logs_its_address(
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = world(master=NO_REGION)  # experts 0-3 on w0 only, 4-7 on w1 only; w1 is down
    x = torch.randn(64, 64, generator=torch.Generator().manual_seed(1))

    async def main() -> tuple[WorldConfig, BaseException]:
        async with workers(config, down=("w1",)) as cfg:
            metrics = MasterMetrics()
            pool = WorkerPool(cfg, metrics)
            try:
                await pool.probe()
                engine = MasterEngine(cfg, pool, metrics)
                with pytest.raises(WorkerUnavailableError) as err:
                    await engine.forward(0, [x], timeout_s=10.0)
            finally:
                await pool.close()
        return cfg, err.value

    with caplog.at_level(logging.WARNING, logger="moe_serve.master.engine"):
        cfg, err = asyncio.run(main())
    message, address = str(err), cfg.worker("w1").address
    assert (
        message == "no live replica for layer 0 experts [4, 5, 6, 7]: worker(s) ['w1'] unavailable"
    )
    assert address not in message  # a client's message names workers by id (docs/reference.md)
    (record,) = [r for r in caplog.records if r.name == "moe_serve.master.engine"]
    assert record.levelno == logging.WARNING
    assert "layer 0 experts [4, 5, 6, 7]" in record.getMessage()
    assert f"w1 ({address})" in record.getMessage()
