"""Replicas and failover: load spreads over replicas, a killed worker costs no request, a
restarted one gets traffic back, and an expert with no live replica fails promptly.

Master and workers run as separate processes here (not under `moe-serve up`, which stops
the whole cluster when one child exits), each stopped by pid.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
import yaml

from moe_serve.client import AsyncMoEClient, MoEClient, MoEServeError
from moe_serve.config import WorldConfig, parse_config
from moe_serve.launcher import is_serving
from moe_serve.reference import ReferenceMoE
from tests.conftest import world
from tests.test_metrics import scrape, total

pytestmark = pytest.mark.e2e

FP32_TOL = 1e-5
START_TIMEOUT_S = 120.0
ALL = list(range(8))


class Parts:
    """A master and its workers as separate processes."""

    def __init__(self, config: dict[str, Any], tmp: Path) -> None:
        self.cfg: WorldConfig = parse_config(config)
        self.path = tmp / "world.yaml"
        self.path.write_text(yaml.safe_dump(config))
        self.tmp = tmp
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        for w in self.cfg.workers:
            self.start_worker(w.id)
        self.procs["master"] = self._spawn("master", "master")
        self.wait(self.cfg.master.listen)

    def _spawn(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        log = open(self.tmp / f"{name}.log", "ab")  # noqa: SIM115 - the child owns it
        return subprocess.Popen(
            [sys.executable, "-m", "moe_serve", *args, "--config", str(self.path)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    def start_worker(self, worker_id: str) -> None:
        self.procs[worker_id] = self._spawn(worker_id, "worker", "--worker-id", worker_id)

    def wait(self, address: str) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not is_serving(address, timeout=0.5):
            assert time.monotonic() < deadline, f"{address} did not serve"
            time.sleep(0.1)

    def kill(self, name: str) -> None:
        os.kill(self.procs[name].pid, signal.SIGKILL)
        self.procs[name].wait()

    def metrics(self) -> dict:
        return scrape(f"http://127.0.0.1:{self.cfg.master.metrics_port}/metrics")

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture
def replicated(tmp_path: Path) -> Iterator[Parts]:
    parts = Parts(world(workers=[{"experts": ALL}, {"experts": ALL}]), tmp_path)
    yield parts
    parts.stop()


def _calls(parts: Parts, worker: str) -> float:
    return total(parts.metrics(), "moe_serve_worker_calls_total", worker=worker)


def test_replicated_experts_spread_calls_over_both_workers(replicated: Parts) -> None:
    with MoEClient(replicated.cfg.master.listen) as client:
        for i in range(20):
            client.infer(torch.randn(16, 64, generator=torch.Generator().manual_seed(i)))
    assert _calls(replicated, "w0") >= 5
    assert _calls(replicated, "w1") >= 5


def test_one_request_is_split_token_by_token_over_idle_replicas(replicated: Parts) -> None:
    with MoEClient(replicated.cfg.master.listen) as client:
        client.infer(torch.randn(64, 64))  # 64 tokens x top-2 = 128 pairs, nothing in flight
    pairs = {
        w: total(replicated.metrics(), "moe_serve_worker_pairs_total", worker=w)
        for w in ("w0", "w1")
    }
    assert pairs == {"w0": 64.0, "w1": 64.0}  # 32 tokens each, both of a token's pairs together


@pytest.mark.parametrize("round_", [1, 2, 3])
def test_killing_one_replica_under_load_fails_no_request(replicated: Parts, round_: int) -> None:
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
        replicated.kill(f"w{round_ % 2}")  # SIGKILL while 8 clients are mid-flight
        await load

    asyncio.run(main())
    failed = [o for o in outcomes if o != "ok"]
    assert len(outcomes) >= 40 and failed == [], failed[:3]


def test_restarted_worker_gets_traffic_again_within_5_s(replicated: Parts) -> None:
    address = replicated.cfg.master.listen
    with MoEClient(address) as client:
        replicated.kill("w1")
        client.infer(torch.randn(4, 64))  # served by w0 alone
        replicated.start_worker("w1")
        replicated.wait(replicated.cfg.worker("w1").address)
        back_at, before = time.monotonic(), _calls(replicated, "w1")
        while _calls(replicated, "w1") == before:
            assert time.monotonic() - back_at < 5.0, "w1 got no traffic 5 s after it served"
            client.infer(torch.randn(16, 64))
            time.sleep(0.05)


def test_expert_without_a_live_replica_fails_promptly_naming_it(tmp_path: Path) -> None:
    parts = Parts(world(), tmp_path)  # experts 0-3 on w0 only, 4-7 on w1 only
    try:
        parts.kill("w1")
        with MoEClient(parts.cfg.master.listen) as client:
            start = time.monotonic()
            with pytest.raises(MoEServeError) as err:
                client.infer(torch.randn(64, 64), timeout=20)
            assert time.monotonic() - start < 5.0
        assert err.value.code == grpc.StatusCode.UNAVAILABLE
        assert "no live replica for layer 0 experts [" in err.value.message
        assert "w1" in err.value.message
    finally:
        parts.stop()


def test_frozen_replica_is_bypassed_within_the_deadline_and_comes_back(tmp_path: Path) -> None:
    config = world(workers=[{"experts": ALL}, {"experts": ALL}], master={"worker_timeout_s": 1.0})
    parts = Parts(config, tmp_path)
    pid = parts.procs["w1"].pid
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


def test_sigterm_drains_a_worker_under_load_without_failing_a_request(
    replicated: Parts,
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
        replicated.procs["w1"].send_signal(signal.SIGTERM)
        await load

    asyncio.run(main())
    assert replicated.procs["w1"].wait(timeout=30) == 0  # drained and exited cleanly
    failed = [o for o in outcomes if o != "ok"]
    assert len(outcomes) >= 40 and failed == [], failed[:3]


def test_sigterm_on_the_master_refuses_new_calls_as_draining_and_finishes_in_flight_ones(
    tmp_path: Path,
) -> None:
    parts = Parts(world(workers=[{"experts": ALL}], master={"worker_timeout_s": 20.0}), tmp_path)
    worker, master = parts.procs["w0"].pid, parts.procs["master"]
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


def test_the_ready_gauge_follows_the_masters_health(tmp_path: Path) -> None:
    parts = Parts(world(), tmp_path)  # experts 4-7 on w1 only
    try:
        assert total(parts.metrics(), "moe_serve_master_ready") == 1.0
        parts.kill("w1")
        deadline = time.monotonic() + 5.0
        while total(parts.metrics(), "moe_serve_master_ready") != 0.0:
            assert time.monotonic() < deadline, "moe_serve_master_ready still 1 after 5 s"
            time.sleep(0.1)
        assert not is_serving(parts.cfg.master.listen)
    finally:
        parts.stop()
