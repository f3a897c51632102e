"""Two hosts joined only by TCP (tests/support/netns.py): the client and the master in host A,
the workers in host B, on a veth link shaped to 10 Gbit/s, each host with its own PID
namespace and /dev/shm. What a deployment on two machines gets: the same outputs as the
in-process reference, gRPC bytes (never shared memory) between the hosts, failover when a
worker of B dies.

Clients run in host A as functions of this module (`hosts.call(hosts.a, fn, ...)`): this
process is on neither host. Skipped where namespaces are refused (not root, no iproute2).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from moe_serve.client import MoEClient, MoEServeError
from moe_serve.layer.reference import ReferenceMoE
from tests.support.cluster import world
from tests.support.hosts import TwoHostCluster
from tests.support.netns import TwoHosts, links, namespaces, remove_leftovers
from tests.test_metrics import total

pytestmark = pytest.mark.e2e

FP32_TOL = 1e-5  # as tests/test_e2e.py
H = 64
ALL = list(range(8))
TOKENS = (1, 7, 300)
# A request whose tensors are above shm.MIN_SHARED_BYTES (256 KiB): it would take the
# shared-memory path wherever a region is mapped (2048 x 64 float32 = 512 KiB).
BIG = 2048
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture(scope="module")
def cluster(
    two_hosts: TwoHosts, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TwoHostCluster]:
    """Master in A; w0 and w1 in B, both holding every expert (replicas)."""
    c = TwoHostCluster(
        two_hosts,
        world(workers=[{"experts": ALL}, {"experts": ALL}]),
        tmp_path_factory.mktemp("2h"),
    )
    yield c
    c.stop()


@pytest.fixture
def hosts_possible(two_hosts: TwoHosts) -> None:
    """Skips a test that makes its own hosts where the module's could not be made."""


def _x(tokens: int, seed: int) -> torch.Tensor:
    return torch.randn(tokens, H, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------- run in host A ---


def sdk_infer(address: str, xs: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(In A.) Each x through a MoEClient of the master: (output, expert ids)."""
    with MoEClient(address) as client:
        outs = [client.infer(x, return_routing=True) for x in xs]
    return [(y, r.expert_ids) for y, r in outs]


def embedded_infer(
    config_path: str, xs: list[torch.Tensor]
) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], Samples]:
    """(In A.) Each x through an embedded client of the world: (output, expert ids), and its
    master's metric samples after the calls."""
    with MoEClient.embedded(config_path) as client:
        outs = [client.infer(x, return_routing=True) for x in xs]
        core = client._core.embedded
        assert core is not None
        text = generate_latest(core.engine.metrics.registry).decode()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    return [(y, r.expert_ids) for y, r in outs], samples


def load_until(
    address: str, xs: list[torch.Tensor], wants: list[torch.Tensor], started: str, seconds: float
) -> list[str]:
    """(In A.) One client thread per x, calling in a loop for `seconds` after all made a first
    call (then `started` is created); each call's outcome: "ok", "wrong output" or the error."""
    outcomes: list[str] = []
    first = threading.Barrier(len(xs) + 1)
    until: list[float] = []

    def loop(x: torch.Tensor, want: torch.Tensor) -> None:
        with MoEClient(address, timeout=20) as client:
            client.infer(x)
            first.wait()
            while time.monotonic() < until[0]:
                try:
                    y = client.infer(x)
                except MoEServeError as exc:
                    outcomes.append(f"{exc.code.name}: {exc.message}")
                    continue
                ok = (y - want).abs().max().item() <= FP32_TOL
                outcomes.append("ok" if ok else "wrong output")

    threads = [threading.Thread(target=loop, args=xw) for xw in zip(xs, wants, strict=True)]
    for t in threads:
        t.start()
    until.append(time.monotonic() + seconds)
    first.wait()
    Path(started).touch()
    for t in threads:
        t.join()
    return outcomes


# ------------------------------------------------------------------ tests ---


def test_sdk_in_a_through_a_master_in_a_to_workers_in_b_matches_the_reference(
    cluster: TwoHostCluster,
) -> None:
    ref = ReferenceMoE(cluster.cfg.model, cluster.cfg.routing)
    xs = [_x(t, seed=t) for t in TOKENS]
    got = cluster.hosts.call(cluster.hosts.a, sdk_infer, cluster.address, xs)
    for x, (y, expert_ids) in zip(xs, got, strict=True):
        want, routing = ref.forward(x, 0)
        assert (y - want).abs().max().item() <= FP32_TOL, x.shape
        assert torch.equal(expert_ids, routing.expert_ids)


def test_workers_in_b_get_bytes_while_the_client_in_a_shares_memory_with_its_master(
    cluster: TwoHostCluster,
) -> None:
    before = cluster.scrape()
    x = _x(BIG, seed=1)
    [(y, _)] = cluster.hosts.call(cluster.hosts.a, sdk_infer, cluster.address, [x])
    after = cluster.scrape()

    def calls(name: str, **labels: str) -> float:
        return total(after, name, **labels) - total(before, name, **labels)

    want, _ = ReferenceMoE(cluster.cfg.model, cluster.cfg.routing).forward(x, 0)
    assert (y - want).abs().max().item() <= FP32_TOL
    # Client and master share host A: the request came through the client's region (so
    # shared memory works on a host, and its absence below is the hosts' doing) ...
    assert calls("moe_serve_master_infer_transport_total", transport="shared") == 1
    # ... while the workers in B could not map the master's region: every call was bytes
    # (the two replicas split the 2048 rows: one call each).
    assert calls("moe_serve_worker_calls_total", transport="shared") == 0
    assert calls("moe_serve_worker_calls_total", transport="bytes") == 2


def test_an_embedded_client_in_a_calls_the_workers_in_b_with_bytes(
    cluster: TwoHostCluster,
) -> None:
    ref = ReferenceMoE(cluster.cfg.model, cluster.cfg.routing)
    xs = [_x(t, seed=10 + t) for t in (*TOKENS, BIG)]
    got, samples = cluster.hosts.call(cluster.hosts.a, embedded_infer, str(cluster.config_path), xs)
    for x, (y, expert_ids) in zip(xs, got, strict=True):
        want, routing = ref.forward(x, 0)
        assert (y - want).abs().max().item() <= FP32_TOL, x.shape
        assert torch.equal(expert_ids, routing.expert_ids)
    assert total(samples, "moe_serve_worker_calls_total", transport="shared") == 0
    assert total(samples, "moe_serve_worker_calls_total", transport="bytes") >= len(xs)


def test_killing_a_worker_in_b_with_a_replica_fails_no_request(
    cluster: TwoHostCluster, tmp_path: Path
) -> None:
    ref = ReferenceMoE(cluster.cfg.model, cluster.cfg.routing)
    xs = [_x(8, seed=50 + i) for i in range(4)]
    wants = [ref.forward(x, 0)[0] for x in xs]
    started = tmp_path / "started"
    load = cluster.hosts.start_call(
        cluster.hosts.a, load_until, cluster.address, xs, wants, str(started), 3.0
    )
    try:
        deadline = time.monotonic() + 60
        while not started.exists():
            assert not load.done() and time.monotonic() < deadline, "the load did not start"
            time.sleep(0.05)
        time.sleep(0.5)
        cluster.kill("worker w0")  # SIGKILL while 4 clients in A are mid-flight
        outcomes = load.result(60)
    finally:
        if not load.done():
            load.cancel()
        cluster.start_worker("w0")  # the module's cluster stays whole
        cluster.wait_serving(["worker w0"])
    failed = [o for o in outcomes if o != "ok"]
    assert len(outcomes) >= 20 and failed == [], failed[:3]


def test_hosts_their_processes_and_link_are_gone_after_close(hosts_possible: None) -> None:
    with TwoHosts() as hosts:
        sleeper = hosts.popen(
            hosts.b, ["sh", "-c", "echo up; exec sleep 60"], stdout=subprocess.PIPE, text=True
        )
        assert sleeper.stdout is not None and sleeper.stdout.readline() == "up\n"
        names = {hosts.a.netns, hosts.b.netns}  # the namespaces, and the veth ends' names
        assert names <= set(namespaces())
        inits = [h.init_pid for h in hosts.hosts]
    assert not hosts.exists()
    assert not names & set(namespaces()) and not names & set(links())
    assert sleeper.wait(10) == -signal.SIGKILL
    sleeper.stdout.close()
    assert not any(os.path.exists(f"/proc/{pid}") for pid in inits)


def test_the_leftovers_of_a_killed_run_are_removed(hosts_possible: None) -> None:
    owner = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time; from tests.support.netns import TwoHosts; h = TwoHosts(); h.open();"
            " print(h.a.netns, h.b.netns, flush=True); time.sleep(120)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert owner.stdout is not None
    names = set(owner.stdout.readline().split())
    owner.kill()  # no finalizer, no atexit: its namespaces stay
    owner.wait()
    owner.stdout.close()
    assert len(names) == 2 and names <= set(namespaces())
    assert names <= set(remove_leftovers())  # what a TwoHosts of the next run does first
    assert not names & set(namespaces())
