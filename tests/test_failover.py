"""Replicas and failover: load spreads over replicas, a killed worker costs no request, a
restarted one gets traffic back, and an expert with no live replica fails promptly.

Where a process is killed, frozen or signalled, master and workers run as separate child
processes (tests/support ProcessCluster: the launcher of `moe-serve up`, without its stop-all
on a child's exit), each stopped by pid, and the test is marked e2e; everywhere else (load
spreading, flapping replicas, the accounting of resend rounds, error messages) real servers
run in-process on port 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

from moe_serve.client import AsyncMoEClient, MoEClient, MoEServeError
from moe_serve.config import WorldConfig, parse_config
from moe_serve.errors import DeadlineError, WorkerUnavailableError
from moe_serve.layer.dispatch import combine_pairs, dispatch
from moe_serve.layer.reference import ReferenceMoE
from moe_serve.master import workers as master_workers
from moe_serve.master.engine import MasterEngine
from moe_serve.master.service import MasterService
from moe_serve.master.workers import WorkerPool
from moe_serve.metrics import MasterMetrics
from moe_serve.tools.launcher import is_serving
from moe_serve.worker.batcher import DynamicBatcher
from moe_serve.worker.engine import WorkerEngine
from moe_serve.worker.server import build_engine
from moe_serve.worker.service import WorkerService
from tests.support.cluster import (
    Cluster,
    InProcessCluster,
    ProcessCluster,
    serve_world,
    world,
)
from tests.test_metrics import scrape, total

FP32_TOL = 1e-5
ALL = list(range(8))


REPLICATED = {"workers": [{"experts": ALL}, {"experts": ALL}]}


@pytest.fixture
def replicated(tmp_path: Path) -> Iterator[ProcessCluster]:
    parts = ProcessCluster(world(**REPLICATED), tmp_path)
    yield parts
    parts.stop()


@pytest.fixture
def replicated_here() -> Iterator[InProcessCluster]:
    cluster = InProcessCluster(world(**REPLICATED))
    yield cluster
    cluster.stop()


def _calls(parts: Cluster, worker: str) -> float:
    return total(scrape(parts.metrics_url()), "moe_serve_worker_calls_total", worker=worker)


def test_replicated_experts_spread_calls_over_both_workers(
    replicated_here: InProcessCluster,
) -> None:
    replicated = replicated_here
    with MoEClient(replicated.cfg.master.listen) as client:
        for i in range(20):
            client.infer(torch.randn(16, 64, generator=torch.Generator().manual_seed(i)))
    assert _calls(replicated, "w0") >= 5
    assert _calls(replicated, "w1") >= 5


def test_one_request_is_split_token_by_token_over_idle_replicas(
    replicated_here: InProcessCluster,
) -> None:
    replicated = replicated_here
    with MoEClient(replicated.cfg.master.listen) as client:
        client.infer(torch.randn(64, 64))  # 64 tokens x top-2 = 128 pairs, nothing in flight
    pairs = {
        w: total(scrape(replicated.metrics_url()), "moe_serve_worker_pairs_total", worker=w)
        for w in ("w0", "w1")
    }
    assert pairs == {"w0": 64.0, "w1": 64.0}  # 32 tokens each, both of a token's pairs together


@pytest.mark.e2e
@pytest.mark.parametrize("round_", [1, 2, 3])
def test_killing_one_replica_under_load_fails_no_request(
    replicated: ProcessCluster, round_: int
) -> None:
    ref = ReferenceMoE(replicated.cfg.model, replicated.cfg.routing)
    xs = [torch.randn(8, 64, generator=torch.Generator().manual_seed(50 + i)) for i in range(8)]
    expected = [ref.forward(x, 0)[0] for x in xs]
    outcomes: list[str] = []

    async def client_loop(x: torch.Tensor, want: torch.Tensor, until: float) -> None:
        async with AsyncMoEClient(replicated.cfg.master.listen, timeout=20) as client:
            while time.monotonic() < until:
                try:
                    y = await client.infer(x)
                except MoEServeError as exc:
                    outcomes.append(f"{exc.code.name}: {exc.message}")
                    continue
                ok = (y - want).abs().max().item() <= FP32_TOL
                outcomes.append("ok" if ok else "wrong output")

    async def main() -> None:
        until = time.monotonic() + 4.0
        load = asyncio.gather(
            *(client_loop(x, e, until) for x, e in zip(xs, expected, strict=True))
        )
        await asyncio.sleep(1.0)
        replicated.kill(f"worker w{round_ % 2}")  # SIGKILL while 8 clients are mid-flight
        await load

    asyncio.run(main())
    failed = [o for o in outcomes if o != "ok"]
    assert len(outcomes) >= 40 and failed == [], failed[:3]


@pytest.mark.e2e
def test_restarted_worker_gets_traffic_again_within_5_s(replicated: ProcessCluster) -> None:
    address = replicated.cfg.master.listen
    with MoEClient(address) as client:
        replicated.kill("worker w1")
        client.infer(torch.randn(4, 64))  # served by w0 alone
        replicated.start_worker("w1")
        replicated.wait_serving(["worker w1"])
        back_at, before = time.monotonic(), _calls(replicated, "w1")
        while _calls(replicated, "w1") == before:
            assert time.monotonic() - back_at < 5.0, "w1 got no traffic 5 s after it served"
            client.infer(torch.randn(16, 64))
            time.sleep(0.05)


@pytest.mark.e2e
def test_expert_without_a_live_replica_fails_promptly_naming_it(tmp_path: Path) -> None:
    parts = ProcessCluster(world(), tmp_path)  # experts 0-3 on w0 only, 4-7 on w1 only
    try:
        parts.kill("worker w1")
        with MoEClient(parts.cfg.master.listen) as client:
            start = time.monotonic()
            with pytest.raises(MoEServeError) as err:
                client.infer(torch.randn(64, 64), timeout=20)
            assert time.monotonic() - start < 5.0
        assert err.value.code == grpc.StatusCode.UNAVAILABLE
        assert "no live replica for layer 0 experts [" in err.value.message
        assert "w1" in err.value.message
        address = parts.cfg.worker("w1").address
        assert address.rsplit(":", 1)[1] not in err.value.message  # its port: logs only
    finally:
        parts.stop()


@pytest.mark.e2e
def test_frozen_replica_is_bypassed_within_the_deadline_and_comes_back(tmp_path: Path) -> None:
    config = world(workers=[{"experts": ALL}, {"experts": ALL}], master={"worker_timeout_s": 1.0})
    parts = ProcessCluster(config, tmp_path)
    pid = parts.pid("worker w1")
    try:
        with MoEClient(parts.cfg.master.listen, timeout=20) as client:
            os.kill(pid, signal.SIGSTOP)  # frozen: connection open, no answers
            start = time.monotonic()
            for i in range(6):
                client.infer(torch.randn(16, 64, generator=torch.Generator().manual_seed(i)))
            assert time.monotonic() - start < 10.0  # at most one worker_timeout_s per stall
            os.kill(pid, signal.SIGCONT)
            back_at, before = time.monotonic(), _calls(parts, "w1")
            while _calls(parts, "w1") == before:
                assert time.monotonic() - back_at < 5.0, "w1 got no traffic 5 s after SIGCONT"
                client.infer(torch.randn(16, 64))
                time.sleep(0.05)
    finally:
        os.kill(pid, signal.SIGCONT)
        parts.stop()


@pytest.mark.e2e
def test_a_last_replica_marked_down_for_one_slow_call_is_asked_again_before_failing(
    tmp_path: Path,
) -> None:
    """w0 dead, w1 the last holder of every expert, frozen 0.6 s: its calls miss
    worker_timeout_s (0.3 s) and mark it down. Once it answers again, no call fails: a batch
    about to fail for want of a live replica asks the holders again first, instead of
    waiting for the next health probe (up to 1 s; before, ~100 calls failed meanwhile)."""
    config = world(workers=[{"experts": ALL}, {"experts": ALL}], master={"worker_timeout_s": 0.3})
    parts = ProcessCluster(config, tmp_path)
    pid = parts.pid("worker w1")
    outcomes: list[tuple[float, str]] = []
    stop = False

    def loop() -> None:
        with MoEClient(parts.cfg.master.listen, timeout=10) as client:
            while not stop:
                start = time.monotonic()
                try:
                    client.infer(torch.randn(4, 64))
                    outcomes.append((start, "ok"))
                except MoEServeError as exc:
                    outcomes.append((start, str(exc)))

    try:
        with ThreadPoolExecutor(4) as pool:
            loops = [pool.submit(loop) for _ in range(4)]
            parts.kill("worker w0")
            time.sleep(2.0)  # the master's probes have found w0 gone: w1 serves alone
            os.kill(pid, signal.SIGSTOP)
            time.sleep(0.6)
            os.kill(pid, signal.SIGCONT)
            resumed = time.monotonic()
            time.sleep(2.0)
            stop = True
            for f in loops:
                f.result()
    finally:
        os.kill(pid, signal.SIGCONT)
        parts.stop()
    after = [o for t, o in outcomes if t >= resumed + 0.05]
    assert len(after) > 20 and [o for o in after if o != "ok"] == [], after[:3]


@pytest.mark.e2e
def test_sigterm_drains_a_worker_under_load_without_failing_a_request(
    replicated: ProcessCluster,
) -> None:
    outcomes: list[str] = []

    async def client_loop(until: float) -> None:
        async with AsyncMoEClient(replicated.cfg.master.listen, timeout=20) as client:
            while time.monotonic() < until:
                try:
                    await client.infer(torch.randn(8, 64))
                    outcomes.append("ok")
                except MoEServeError as exc:
                    outcomes.append(f"{exc.code.name}: {exc.message}")

    async def main() -> None:
        until = time.monotonic() + 4.0
        load = asyncio.gather(*(client_loop(until) for _ in range(8)))
        await asyncio.sleep(1.0)
        replicated.procs["worker w1"].send_signal(signal.SIGTERM)
        await load

    asyncio.run(main())
    assert replicated.procs["worker w1"].wait(timeout=30) == 0  # drained and exited cleanly
    failed = [o for o in outcomes if o != "ok"]
    assert len(outcomes) >= 40 and failed == [], failed[:3]


@pytest.mark.e2e
def test_sigterm_on_the_master_refuses_new_calls_as_draining_and_finishes_in_flight_ones(
    tmp_path: Path,
) -> None:
    config = world(workers=[{"experts": ALL}], master={"worker_timeout_s": 20.0})
    parts = ProcessCluster(config, tmp_path)
    worker, master = parts.pid("worker w0"), parts.procs["master"]
    address = parts.cfg.master.listen
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(9))
    want = ReferenceMoE(parts.cfg.model, parts.cfg.routing).forward(x, 0)[0]
    try:
        with MoEClient(address, timeout=30) as client:
            client.infer(x)  # connected and warm
            os.kill(worker, signal.SIGSTOP)  # the next call stays in flight on the master
            with ThreadPoolExecutor(1) as pool:
                in_flight = pool.submit(client.infer, x)
                time.sleep(1.0)
                master.send_signal(signal.SIGTERM)
                time.sleep(0.5)
                with MoEClient(address, timeout=5) as late, pytest.raises(MoEServeError) as err:
                    late.infer(x)
                assert err.value.code == grpc.StatusCode.UNAVAILABLE
                assert "master is draining" in err.value.message
                assert not is_serving(address)
                os.kill(worker, signal.SIGCONT)
                y = in_flight.result(timeout=20)  # the in-flight call was not cancelled
        assert (y - want).abs().max().item() <= FP32_TOL
        assert master.wait(timeout=15) == 0
    finally:
        os.kill(worker, signal.SIGCONT)
        parts.stop()


@pytest.mark.e2e
def test_the_ready_gauge_follows_the_masters_health(tmp_path: Path) -> None:
    parts = ProcessCluster(world(), tmp_path)  # experts 4-7 on w1 only
    try:
        assert total(scrape(parts.metrics_url()), "moe_serve_master_ready") == 1.0
        parts.kill("worker w1")
        deadline = time.monotonic() + 5.0
        while total(scrape(parts.metrics_url()), "moe_serve_master_ready") != 0.0:
            assert time.monotonic() < deadline, "moe_serve_master_ready still 1 after 5 s"
            time.sleep(0.1)
        assert not is_serving(parts.cfg.master.listen)
    finally:
        parts.stop()


# --- In-process servers: flapping replicas, resend accounting, client-facing messages ---


# No shared region (bytes on loopback are what these tests need); an explicit message limit.
IN_PROCESS_MASTER = {"shared_memory_bytes": 0, "max_message_bytes": 64 << 20}


@dataclass
class InProcess:
    """Workers and a master served on loopback by this test's event loop."""

    cfg: WorldConfig
    master: MasterService
    workers: dict[str, WorkerService]

    def failovers(self) -> float:
        registry = self.master.metrics.registry
        return registry.get_sample_value("moe_serve_master_failovers_total") or 0.0


@contextlib.asynccontextmanager
async def in_process(
    config: dict[str, Any],
    worker: Callable[[WorkerEngine, DynamicBatcher], WorkerService] = WorkerService,
) -> AsyncIterator[InProcess]:
    """Real worker servers (servicer built by `worker`) and a real master, all on the running
    loop on port 0 (tests/support serve_world: the factories the CLI runs)."""
    async with serve_world(config, worker) as w:
        services = {name: server.service for name, server in w.workers.items()}
        yield InProcess(w.cfg, w.master.service, services)


PROBE_S = 0.02  # the master's health probe interval in the flapping test
FLAP_OKS, FLAP_ATTEMPTS = 8, 40  # each client of the flapping test: OK replies, calls at most


class FlappingWorker(WorkerService):
    """A real worker whose Forward answers UNAVAILABLE on every other call, after a little
    longer than a probe interval: by the next resend round the master sees it up again."""

    def __init__(self, engine: WorkerEngine, batcher: DynamicBatcher) -> None:
        super().__init__(engine, batcher)
        self.calls = 0

    async def Forward(self, request: Any, context: grpc.aio.ServicerContext) -> bytes:
        self.calls += 1
        if self.calls % 2 == 0:
            await asyncio.sleep(2 * PROBE_S)
            await context.abort(grpc.StatusCode.UNAVAILABLE, "flapping")
        return await super().Forward(request, context)


def test_flapping_replicas_never_answer_ok_with_a_lost_partial_sum(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Frequent probes: a replica marked down by a failed call is up again by the next
    # round, so passes resend round after round over replicas whose health flaps.
    monkeypatch.setattr(master_workers, "HEALTH_INTERVAL_S", PROBE_S)
    config = world(
        workers=[{"experts": ALL}, {"experts": ALL}, {"experts": ALL}], master=IN_PROCESS_MASTER
    )
    xs = [torch.randn(8 + i, 64, generator=torch.Generator().manual_seed(70 + i)) for i in range(6)]
    outcomes: list[str] = []

    async def main() -> float:
        async with in_process(config, FlappingWorker) as world_:
            ref = ReferenceMoE(world_.cfg.model, world_.cfg.routing)
            expected = [ref.forward(x, 0)[0] for x in xs]
            async with AsyncMoEClient(world_.cfg.master.listen, timeout=20) as client:

                async def client_loop(x: torch.Tensor, want: torch.Tensor) -> None:
                    oks = 0
                    for _ in range(FLAP_ATTEMPTS):  # until FLAP_OKS replies, within bounds
                        try:
                            y = await client.infer(x)
                        except MoEServeError as exc:
                            outcomes.append(f"{exc.code.name}: {exc.message}")
                            continue
                        err = (y - want).abs().max().item()
                        outcomes.append("ok" if err <= FP32_TOL else f"OK but off by {err}")
                        oks += 1
                        if oks == FLAP_OKS:
                            return

                await asyncio.gather(
                    *(client_loop(x, e) for x, e in zip(xs, expected, strict=True))
                )
            return world_.failovers()

    failovers = asyncio.run(main())
    wrong = [o for o in outcomes if o.startswith("OK but")]
    errors = [o for o in outcomes if o != "ok" and not o.startswith("OK but")]
    assert wrong == [], wrong[:3]  # an OK reply always holds every partial sum
    assert all(e.startswith("UNAVAILABLE: no live replica for layer 0 experts") for e in errors)
    assert outcomes.count("ok") == len(xs) * FLAP_OKS  # failures are transient
    assert failovers >= 10  # resends did happen: 6 clients x 8 calls, half the worker calls fail


class FlakyLocalPool(WorkerPool):
    """The master's pool with each worker call run by a real engine in this process, the
    calls numbered `fails` answering UNAVAILABLE, and every worker's health flapping back up
    before the next round (as a probe between rounds would)."""

    def __init__(
        self, cfg: WorldConfig, engine: WorkerEngine, fails: Callable[[int], bool]
    ) -> None:
        super().__init__(cfg, MasterMetrics())
        self.engine, self.fails, self.calls = engine, fails, 0
        self.healthy = [True] * len(cfg.workers)

    async def forward(self, layer: int, x: torch.Tensor, sl: Any, timeout_s: float) -> torch.Tensor:
        self.calls += 1
        self.healthy = [True] * len(self.healthy)
        if self.fails(self.calls):
            raise WorkerUnavailableError(f"worker {sl.worker}: call {self.calls} failed")
        hidden = x[sl.token_index]
        return self.engine.forward(
            layer, hidden, sl.pair_token, sl.pair_expert, sl.pair_weight, pairs=self.pair_outputs
        )


def _resend(
    fails: Callable[[int], bool],
) -> tuple[Any, torch.Tensor | None, torch.Tensor, int, int]:
    """Dispatch 16 tokens over 2 replicas and fail over with a FlakyLocalPool: (the outcome,
    the combined output or None, the reference output, pairs dispatched, calls made)."""
    config = world(workers=[{"experts": ALL}, {"experts": ALL}], master=IN_PROCESS_MASTER)
    cfg = parse_config(config)
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(5))

    async def main() -> tuple[Any, torch.Tensor | None, int, int]:
        pool = FlakyLocalPool(cfg, build_engine(cfg, "w0"), fails)
        engine = MasterEngine(cfg, pool, pool.metrics)
        routing = engine.gates[0](x, losses=False)
        slices = dispatch(routing, engine.owners(0, x.device), 2)
        results = await asyncio.gather(
            *(pool.forward(0, x, sl, 5.0) for sl in slices), return_exceptions=True
        )
        deadline = asyncio.get_running_loop().time() + 5.0
        try:
            done, parts = await engine._fail_over(0, x, slices, results, deadline)
            outcome: Any = done
            out = combine_pairs(routing.weights, 64, done, parts, x.device)
        except WorkerUnavailableError as exc:
            outcome, out = exc, None
        finally:
            await pool.close()
        return outcome, out, sum(sl.pair_expert.shape[0] for sl in slices), pool.calls

    outcome, out, dispatched, calls = asyncio.run(main())
    ref = ReferenceMoE(cfg.model, cfg.routing).forward(x, 0)[0]
    return outcome, out, ref, dispatched, calls


def test_a_failing_last_resend_round_is_unavailable_never_ok() -> None:
    outcome, _, _, _, calls = _resend(fails=lambda n: True)
    assert isinstance(outcome, WorkerUnavailableError)
    assert "still unavailable after 2 resend round(s)" in str(outcome)
    assert "no live replica for layer 0 experts [" in str(outcome)
    # The 2 first sends, then 2 resend rounds (each failed slice split over <= 2 replicas:
    # 2-4 calls, then 2-8), and no third round.
    assert 6 <= calls <= 14


def test_resend_rounds_account_for_every_pair_exactly_once() -> None:
    # The first 3 calls fail: both first sends, then one call of the first resend round.
    outcome, out, ref, dispatched, calls = _resend(fails=lambda n: n <= 3)
    assert not isinstance(outcome, BaseException), outcome
    assert sum(sl.pair_expert.shape[0] for sl in outcome) == dispatched == 32  # 16 tokens x 2
    assert out is not None and (out - ref).abs().max().item() <= FP32_TOL
    assert calls >= 5


ADDRESS_IN_DETAILS = "ipv4:10.1.2.3:50061"  # what gRPC writes about a peer


class FailingWorker(WorkerService):
    """A real worker whose Forward fails with a code no worker should answer, naming a peer
    address in its details, as gRPC's transport errors do."""

    async def Forward(self, request: Any, context: grpc.aio.ServicerContext) -> bytes:
        await context.abort(grpc.StatusCode.DATA_LOSS, f"stream from {ADDRESS_IN_DETAILS} cut")
        raise AssertionError("unreachable: abort raises")


class SlowWorker(WorkerService):
    """A real worker that answers Forward after 2 s."""

    async def Forward(self, request: Any, context: grpc.aio.ServicerContext) -> bytes:
        await asyncio.sleep(2.0)
        return await super().Forward(request, context)


def _one_call(worker: Callable[..., WorkerService]) -> tuple[MoEServeError, str]:
    """The error of one Infer through a master whose one worker is built by `worker`, and
    that worker's address."""
    config = world(workers=[{"experts": ALL}], master=IN_PROCESS_MASTER)

    async def main() -> MoEServeError:
        async with (
            in_process(config, worker) as world_,
            AsyncMoEClient(world_.cfg.master.listen, timeout=10) as client,
        ):
            with pytest.raises(MoEServeError) as err:
                await client.infer(torch.randn(4, 64))
            return err.value

    return asyncio.run(main()), parse_config(config).worker("w0").address


def _no_address(message: str, cfg_address: str) -> None:
    assert cfg_address not in message and cfg_address.rsplit(":", 1)[1] not in message
    assert "10.1.2.3" not in message and "127.0.0.1" not in message


def test_a_worker_failure_reaches_the_client_without_worker_addresses() -> None:
    err, address = _one_call(FailingWorker)
    assert err.code == grpc.StatusCode.INTERNAL
    assert err.message.startswith("worker 'w0' failed: DATA_LOSS: stream from <address> cut")
    _no_address(err.message, address)


def test_worker_call_errors_name_the_worker_by_id_and_never_its_address() -> None:
    config = world(workers=[{"experts": ALL}], master=IN_PROCESS_MASTER)
    x = torch.randn(2, 64)

    async def main() -> tuple[BaseException, BaseException, str]:
        async with in_process(config, SlowWorker) as world_:
            pool, gate = world_.master.pool, world_.master.engine.gates[0]
            (sl,) = dispatch(gate(x, losses=False), world_.master.engine.owners(0, x.device), 1)
            with pytest.raises(DeadlineError) as late:  # the caller's deadline passes first
                await pool.forward(0, x, sl, 0.3)
            address = world_.cfg.worker("w0").address
        # Nothing listens there any more: connection refused, and gRPC names the peer.
        pool = WorkerPool(parse_config(config), MasterMetrics())
        with pytest.raises(WorkerUnavailableError) as refused:
            await pool.forward(0, x, sl, 5.0)
        await pool.close()
        return late.value, refused.value, address

    late, refused, address = asyncio.run(main())
    assert str(late).startswith("deadline exceeded waiting for worker 'w0', layer 0 experts [")
    assert "worker 'w0' is unavailable: UNAVAILABLE:" in str(refused)
    for exc in (late, refused):
        _no_address(str(exc), address)
