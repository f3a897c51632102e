"""Several masters (ARCHITECTURE, Client SDK): a client given several addresses spreads its
calls over them and sends a call that finds one gone to another, within its deadline.

Real processes: workers and master A from tests/support/cluster.py's ProcessCluster, master B
a second `moe-serve master` process on the same world (other ports), each stopped by pid.
"""

from __future__ import annotations

import asyncio
import copy
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
import yaml

from moe_serve.client import AsyncMoEClient, MoEClient, MoEServeError, master_targets
from moe_serve.tools.demo import free_ports
from moe_serve.tools.launcher import is_serving
from tests.conftest import world
from tests.support.cluster import ProcessCluster
from tests.test_metrics import scrape, total

H = 64
START_S = 60.0
CALL_TIMEOUT_S = 20.0


def test_master_targets_takes_a_list_a_comma_string_or_a_dns_name() -> None:
    assert master_targets(["a:1", "b:2"]) == ["a:1", "b:2"]
    assert master_targets(" a:1, b:2 ,") == ["a:1", "b:2"]
    assert master_targets("dns:///masters.example:50051") == ["dns:///masters.example:50051"]


@pytest.mark.parametrize("address", ["", " , ", []])
def test_no_master_address_is_a_value_error_naming_address(address: Any) -> None:
    with pytest.raises(ValueError, match=r"^address: expected at least one master"):
        MoEClient(address)


class TwoMasters:
    """Workers and master A (ProcessCluster), and master B: another process, same world."""

    def __init__(self, tmp: Path) -> None:
        config = world(model={"hidden_size": H, "moe_layers": [0]})
        (tmp / "a").mkdir()
        self.a = ProcessCluster(config, tmp / "a")
        second = copy.deepcopy(config)
        port, metrics = free_ports(2)
        second["master"].update(listen=f"127.0.0.1:{port}", metrics_port=metrics)
        path = tmp / "b" / "world.yaml"
        path.parent.mkdir(exist_ok=True)
        path.write_text(yaml.safe_dump(second))
        self.b_address, self.b_metrics = f"127.0.0.1:{port}", f"http://127.0.0.1:{metrics}"
        self.b_path, self.b_log_path = path, tmp / "b" / "master.log"
        self.b_log = open(self.b_log_path, "a")  # noqa: SIM115 - closed in stop()
        self.start_b()

    def start_b(self) -> None:
        """Start (or start again) master B; return once it is SERVING."""
        self.b = subprocess.Popen(
            [sys.executable, "-m", "moe_serve", "master", "--config", str(self.b_path)],
            stdout=self.b_log,
            stderr=self.b_log,
            env={"OMP_NUM_THREADS": "1", **os.environ},
        )
        deadline = time.monotonic() + START_S
        while not is_serving(self.b_address):
            assert self.b.poll() is None, self.b_log_path.read_text()
            assert time.monotonic() < deadline, "master B did not become SERVING"
            time.sleep(0.2)

    @property
    def addresses(self) -> list[str]:
        return [self.a.address, self.b_address]

    def requests(self) -> tuple[float, float]:
        """Infer calls each master counted, every code."""
        a = total(scrape(self.a.metrics_url()), "moe_serve_requests_total")
        return a, total(scrape(self.b_metrics), "moe_serve_requests_total")

    def stop(self) -> None:
        if self.b.poll() is None:
            self.b.kill()
        self.b.wait()
        self.b_log.close()
        self.a.stop()


@pytest.fixture
def masters(tmp_path: Path) -> Iterator[TwoMasters]:
    """Two masters for a test that stops one of them."""
    m = TwoMasters(tmp_path)
    try:
        yield m
    finally:
        m.stop()


@pytest.fixture(scope="module")
def serving(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TwoMasters]:
    """Two masters for the tests that leave both running."""
    m = TwoMasters(tmp_path_factory.mktemp("masters"))
    try:
        yield m
    finally:
        m.stop()


def rows(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, H, generator=torch.Generator().manual_seed(seed))


def test_calls_are_spread_over_every_master(serving: TwoMasters) -> None:
    before = serving.requests()
    with MoEClient(",".join(serving.addresses)) as client:
        for i in range(20):
            client.infer(rows(2, i))
    after = serving.requests()
    served = [b - a for a, b in zip(before, after, strict=True)]
    assert sum(served) == 20 and min(served) >= 5, served


def test_both_masters_give_the_same_bits(serving: TwoMasters) -> None:
    x = rows(16, 3)
    with MoEClient(serving.a.address) as a, MoEClient(serving.b_address) as b:
        assert torch.equal(a.infer(x), b.infer(x))


def _load(client: MoEClient, x: torch.Tensor, want: torch.Tensor, stop: threading.Event,
          outcomes: list[str]) -> None:  # fmt: skip
    while not stop.is_set():
        try:
            y = client.infer(x, timeout=CALL_TIMEOUT_S)
            outcomes.append("ok" if torch.equal(y, want) else "wrong bits")
        except MoEServeError as exc:
            outcomes.append(f"{exc.code.name}: {exc}")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["kill", "drain"])
def test_a_master_killed_or_draining_under_load_fails_no_request(
    masters: TwoMasters, sig: signal.Signals
) -> None:
    """4 threads x closed loop through both masters; master A gets `sig` mid-run: every call
    is answered, with the bits it gets from a live master."""
    x = rows(8, 5)
    with MoEClient(masters.b_address) as alone:
        want = alone.infer(x)
    outcomes: list[str] = []
    stop = threading.Event()
    with MoEClient(masters.addresses) as client:
        threads = [
            threading.Thread(target=_load, args=(client, x, want, stop, outcomes)) for _ in range(4)
        ]
        for t in threads:
            t.start()
        time.sleep(1.0)
        served_before = len(outcomes)
        masters.a.kill("master", sig)
        time.sleep(2.0)
        stop.set()
        for t in threads:
            t.join()
    failed = [o for o in outcomes if o != "ok"]
    assert failed == [] and served_before > 0 and len(outcomes) > served_before + 8, (
        failed[:3],
        len(outcomes),
    )


def test_the_async_client_moves_to_another_master_when_one_is_killed(
    masters: TwoMasters,
) -> None:
    x = rows(4, 6)

    async def main() -> list[str]:
        async with AsyncMoEClient(masters.addresses) as client:
            want = await client.infer(x)
            outcomes: list[str] = []

            async def loop() -> None:
                for _ in range(40):
                    try:
                        y = await client.infer(x, timeout=CALL_TIMEOUT_S)
                        outcomes.append("ok" if torch.equal(y, want) else "wrong bits")
                    except MoEServeError as exc:
                        outcomes.append(f"{exc.code.name}: {exc}")

            tasks = [asyncio.ensure_future(loop()) for _ in range(4)]
            await asyncio.sleep(0.3)
            masters.a.kill("master", signal.SIGKILL)
            await asyncio.gather(*tasks)
            return outcomes

    outcomes = asyncio.run(main())
    assert outcomes == ["ok"] * 160, [o for o in outcomes if o != "ok"][:3]


def test_a_master_that_refuses_the_call_itself_is_not_asked_again_elsewhere(
    serving: TwoMasters,
) -> None:
    before = serving.requests()
    with MoEClient(serving.addresses) as client, pytest.raises(MoEServeError) as caught:
        client.infer(torch.randn(2, H + 1))
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    after = serving.requests()
    assert sum(b - a for a, b in zip(before, after, strict=True)) == 1


def test_an_unreachable_master_in_the_list_costs_no_failed_call(serving: TwoMasters) -> None:
    (dead,) = free_ports(1)
    with MoEClient([f"127.0.0.1:{dead}", serving.b_address]) as client:
        for i in range(6):
            client.infer(rows(1, i), timeout=CALL_TIMEOUT_S)


def test_a_dns_name_reaches_the_masters_it_resolves_to(serving: TwoMasters) -> None:
    port = serving.b_address.rsplit(":", 1)[1]
    with MoEClient(f"dns:///localhost:{port}") as client:
        assert client.infer(rows(3, 1)).shape == (3, H)
        assert client.info().hidden_size == H


def test_every_master_down_is_unavailable_within_the_deadline() -> None:
    dead = [f"127.0.0.1:{p}" for p in free_ports(2)]
    start = time.monotonic()
    with MoEClient(dead, timeout=1.5) as client, pytest.raises(MoEServeError) as caught:
        client.infer(rows(1, 0))
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    assert str(caught.value).startswith(
        "UNAVAILABLE: no master answered (2 tried; last, 127.0.0.1:"
    )
    assert time.monotonic() - start < 1.5 + 1.0


def test_a_restarted_master_gets_calls_again_within_seconds(masters: TwoMasters) -> None:
    """Master B down 8 s, then back: a client that kept calling (through A) sends B calls
    again within 3 s of it serving. The clients reconnect at least once a second; gRPC's
    default backoff (1 s, x1.6 a try, up to 120 s) had kept B out for ~6 s here, 23 s after
    a 40 s outage."""
    with MoEClient(masters.addresses, timeout=CALL_TIMEOUT_S) as client:
        client.infer(rows(1, 0))
        masters.b.kill()
        masters.b.wait()
        down = time.monotonic()
        while time.monotonic() - down < 8.0:
            client.infer(rows(1, 1))
            time.sleep(0.05)
        masters.start_b()
        back = time.monotonic()
        served = 0.0
        while served == 0:
            assert time.monotonic() - back < 3.0, "no call reached the restarted master"
            client.infer(rows(1, 2))
            served = total(scrape(masters.b_metrics), "moe_serve_requests_total")
