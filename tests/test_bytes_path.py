"""The bytes path (shared memory off): a large slice goes as chunks of rows over several
connections per worker, with the same bits as one call, and a failing chunk fails over; its
benchmark runs across two hosts joined only by TCP."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

from moe_serve.client import AsyncMoEClient
from moe_serve.config import WorldConfig
from moe_serve.layer.dispatch import WorkerSlice
from moe_serve.master.workers import WorkerPool
from moe_serve.metrics import MasterMetrics
from moe_serve.worker.batcher import DynamicBatcher
from moe_serve.worker.engine import WorkerEngine
from moe_serve.worker.service import WorkerService
from tests.support.cluster import serve_world, world
from tests.support.netns import namespaces

H = 64
ROW_BYTES = H * 4  # float32
CHUNK_ROWS = 16
ALL = list(range(8))
FP32_TOL = 1e-5  # as tests/test_failover.py
FROZEN_S, WORKER_TIMEOUT_S = 10.0, 0.5


def config(channels: int = 3, chunk_rows: int = CHUNK_ROWS, **master: Any) -> dict[str, Any]:
    return world(
        workers=[{"experts": ALL}, {"experts": ALL}],
        master={
            "shared_memory_bytes": 0,
            "worker_channels": channels,
            "worker_chunk_bytes": chunk_rows * ROW_BYTES,
            **master,
        },
    )


class CountingWorker(WorkerService):
    """A real worker that records each Forward's rows and the connection it came on."""

    def __init__(self, engine: WorkerEngine, batcher: DynamicBatcher) -> None:
        super().__init__(engine, batcher)
        self.rows: list[int] = []
        self.peers: set[str] = set()
        self.fail_next = 0  # Forward calls still to answer UNAVAILABLE
        self.freeze_next = 0  # Forward calls still to hold far beyond worker_timeout_s

    async def Forward(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        self.peers.add(context.peer())
        self.rows.append(request.hidden.shape[0])
        if self.fail_next:
            self.fail_next -= 1
            await context.abort(grpc.StatusCode.UNAVAILABLE, "chunk refused")
        if self.freeze_next:
            self.freeze_next -= 1
            await asyncio.sleep(FROZEN_S)
        return await super().Forward(request, context)


def routed(tokens: int, seed: int = 3) -> tuple[torch.Tensor, WorkerSlice]:
    """x [tokens, H] and a slice of every row for worker 0, two experts a row (pairs
    token-major, as dispatch makes them)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, H, generator=g)
    rows = torch.arange(tokens).repeat_interleave(2)
    experts = torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(tokens)]).flatten()
    return x, WorkerSlice(
        worker=0,
        token_index=torch.arange(tokens),
        pair_token=rows.to(torch.int32),
        pair_expert=experts.to(torch.int32),
        pair_weight=torch.rand(2 * tokens, generator=g),
        pair_index=torch.arange(2 * tokens),
    )


@contextlib.asynccontextmanager
async def pool_of(cfg: WorldConfig) -> AsyncIterator[WorkerPool]:
    pool = WorkerPool(cfg, MasterMetrics())
    try:
        await pool.probe()
        yield pool
    finally:
        await pool.close()


def run_slices(
    master: dict[str, Any], slices: list[tuple[torch.Tensor, WorkerSlice]], fail: int = 0
) -> tuple[list[torch.Tensor], CountingWorker]:
    """Forward each (x, slice) through a pool of `master`'s settings; the outputs and w0."""

    async def main() -> tuple[list[torch.Tensor], CountingWorker]:
        async with serve_world(config(**master), CountingWorker) as w:
            service = w.workers["w0"].service
            assert isinstance(service, CountingWorker)
            async with pool_of(w.cfg) as pool:
                service.fail_next = fail
                outs = [await pool.forward(0, x, sl, 10.0) for x, sl in slices]
            return outs, service

    return asyncio.run(main())


def test_chunked_calls_give_the_bits_of_one_call() -> None:
    x, sl = routed(100)
    # A slice of some rows only (the master gathers them), and one of every row.
    odd = WorkerSlice(
        worker=0,
        token_index=torch.arange(1, 100, 2),
        pair_token=torch.arange(50).repeat_interleave(2).to(torch.int32),
        pair_expert=sl.pair_expert[:100],
        pair_weight=sl.pair_weight[:100],
        pair_index=sl.pair_index[:100],
    )
    cases = [(x, sl), (x, odd)]
    whole, _ = run_slices({"channels": 1, "chunk_rows": 0}, cases)
    chunked, worker = run_slices({"channels": 3, "chunk_rows": CHUNK_ROWS}, cases)
    assert worker.rows.count(CHUNK_ROWS) == 6 + 3  # 100 rows: 6 x 16 + 4; 50: 3 x 16 + 2
    # The worker batches whichever chunks are queued together; its batch-invariant GEMMs
    # give a row the same bits in a batch of any size (model.batch_invariant, the default).
    for one, many in zip(whole, chunked, strict=True):
        assert one.shape == many.shape == (200 if one is whole[0] else 100, H)
        assert torch.equal(one, many)


def test_a_slice_larger_than_the_chunk_reaches_the_worker_as_calls_over_connections() -> None:
    x, sl = routed(100)
    _, worker = run_slices({"channels": 3}, [(x, sl)])
    # ceil(100 / 16) = 7 calls of whole rows, spread over the 3 connections.
    assert sorted(worker.rows) == [4] + [16] * 6
    assert len(worker.peers) == 3


def test_a_slice_within_the_chunk_is_one_call() -> None:
    x, sl = routed(CHUNK_ROWS)
    _, worker = run_slices({"channels": 3}, [(x, sl)])
    assert worker.rows == [CHUNK_ROWS]


def failover(fail: int = 0, freeze: int = 0) -> tuple[float, float, float, int]:
    """A 96-row request through a real master whose w0 refuses (`fail`) or holds (`freeze`)
    its next chunk calls: (largest difference to the answer before, seconds the request
    took, failovers, rows w1 computed)."""
    x = torch.randn(96, H, generator=torch.Generator().manual_seed(9))

    async def main() -> tuple[float, float, float, int]:
        cfg = config(worker_timeout_s=WORKER_TIMEOUT_S)
        async with serve_world(cfg, CountingWorker) as w:
            w0, w1 = (w.workers[i].service for i in ("w0", "w1"))
            assert isinstance(w0, CountingWorker) and isinstance(w1, CountingWorker)
            async with AsyncMoEClient(w.cfg.master.listen, timeout=20) as client:
                want = await client.infer(x)
                w0.fail_next, w0.freeze_next, w0.rows, w1.rows = fail, freeze, [], []
                start = time.perf_counter()
                got = await client.infer(x)
                took = time.perf_counter() - start
            registry = w.master.service.metrics.registry
            failovers = registry.get_sample_value("moe_serve_master_failovers_total") or 0.0
            return (want - got).abs().max().item(), took, failovers, sum(w1.rows)

    return asyncio.run(main())


def test_a_failing_chunk_fails_the_slice_over_to_a_replica() -> None:
    # w0's next chunk call answers UNAVAILABLE; its slice goes to the replica w1 (both hold
    # every expert) and the client gets the same result.
    diff, _, failovers, w1_rows = failover(fail=1)
    assert diff <= FP32_TOL
    assert failovers >= 1
    assert w1_rows > 96 // 2  # w1 computed its own share and w0's resent slice


def test_a_frozen_chunk_is_given_up_after_the_worker_timeout_and_resent() -> None:
    # w0 holds one chunk for 10 s; master.worker_timeout_s = 0.5 bounds each chunk call.
    diff, took, failovers, w1_rows = failover(freeze=1)
    assert diff <= FP32_TOL
    assert failovers >= 1 and w1_rows > 96 // 2
    assert took < FROZEN_S / 2


@pytest.mark.e2e
def test_the_benchmark_measures_the_bytes_path_and_the_raw_socket_across_two_hosts(
    tmp_path: Path,
) -> None:
    out = tmp_path / "two-hosts.json"
    before = set(namespaces())
    bench = Path(__file__).parent.parent / "benchmarks" / "bytes_path.py"
    small = ["--dtype", "float32", "--tokens", "64", "--hidden", "256", "--iters", "2"]
    run = subprocess.run(
        [sys.executable, str(bench), "--two-hosts", *small, "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if run.returncode != 0 and "two hosts cannot be made here" in run.stderr:
        pytest.skip(run.stderr.strip().splitlines()[-1])
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["setup"]["two_hosts"]["link"]["rate"] == "10gbit"
    [row] = result["rows"]
    assert row["tokens"] == 64 and row["payload_bytes"] == 2 * 64 * 256 * 4
    # Both sides of the ratio were measured, on the same link, in the same run.
    assert row["raw_socket"]["gb_s"] > 0 and row["one_call"]["gb_s"] > 0
    summary = result["summary"]
    assert summary["bytes_path_vs_raw_tcp"] == row["chunked"]["vs_raw_tcp"]
    assert summary["chunked_equal"] is True
    assert set(namespaces()) <= before  # the hosts are gone with the run
