"""A master's live world change (ARCHITECTURE, CLI: "SIGHUP makes moe-serve master re-read
its world config and apply the difference ... with no failed request; a new config that does
not validate is refused, logged with the field named, and the old world keeps serving").

Real processes (tests/support/cluster.py ProcessCluster): the master and workers read the
world file the test rewrites; `moe-serve reload` (tools/reload.py) and SIGHUP apply it.
"""

from __future__ import annotations

import asyncio
import copy
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
import yaml

from moe_serve.client import AsyncMoEClient, MoEClient, MoEServeError
from moe_serve.tools.demo import free_ports
from moe_serve.tools.reload import reload_servers
from moe_serve.v1 import moe_pb2 as pb
from moe_serve.v1 import moe_pb2_grpc as pb_grpc
from moe_serve.worker.service import WorkerService
from tests.conftest import world
from tests.support.cluster import ProcessCluster, serve_world
from tests.test_metrics import scrape, total

pytestmark = pytest.mark.e2e

H = 64
WAIT_S = 30.0
CALL_TIMEOUT_S = 20.0


def base(**workers: list[int]) -> dict[str, Any]:
    """A world of the given workers (id -> experts), grace 1 s for retiring experts."""
    config = world(
        model={"hidden_size": H, "moe_layers": [0]},
        master={"reload_grace_s": 1.0},
        workers=[{"experts": experts} for experts in workers.values()],
    )
    for w, worker_id in zip(config["workers"], workers, strict=True):
        w["id"] = worker_id
    return config


@pytest.fixture
def started(tmp_path: Path) -> Iterator[Callable[[dict[str, Any]], ProcessCluster]]:
    clusters: list[ProcessCluster] = []

    def start(config: dict[str, Any]) -> ProcessCluster:
        clusters.append(ProcessCluster(config, tmp_path))
        return clusters[-1]

    yield start
    for c in clusters:
        c.stop()


def rewrite(cluster: ProcessCluster, config: dict[str, Any]) -> None:
    cluster.config_path.write_text(yaml.safe_dump(config))


def pairs_of(cluster: ProcessCluster, worker: str, expert: int) -> float:
    """(token, expert) pairs worker `worker` computed for `expert` (its own counter)."""
    samples = scrape(cluster.metrics_url(worker))
    return total(samples, "moe_serve_worker_expert_tokens_total", expert=str(expert))


def until(check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not check():
        assert time.monotonic() < deadline, f"not within {WAIT_S} s: {what}"
        time.sleep(0.1)


class Load:
    """4 client threads in a closed loop through the master, recording every outcome."""

    def __init__(self, address: str) -> None:
        self.x = torch.randn(8, H, generator=torch.Generator().manual_seed(1))
        with MoEClient(address) as client:
            self.want = client.infer(self.x)
        self.address, self.outcomes, self.stop = address, [], threading.Event()
        self.threads = [threading.Thread(target=self._run) for _ in range(4)]

    def _run(self) -> None:
        with MoEClient(self.address) as client:
            while not self.stop.is_set():
                try:
                    y = client.infer(self.x, timeout=CALL_TIMEOUT_S)
                    self.outcomes.append("ok" if torch.equal(y, self.want) else "other bits")
                except MoEServeError as exc:
                    self.outcomes.append(str(exc))

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join()


def test_a_reload_that_moves_an_expert_fails_no_request_and_moves_its_traffic(
    started: Callable[[dict[str, Any]], ProcessCluster],
) -> None:
    """Expert 3 moves from w0 to w1 under load (`moe-serve reload`: workers first, then
    the master): every call OK with the same bits; then w1 computes expert 3, w0 no more."""
    old = base(w0=[0, 1, 2, 3], w1=[4, 5, 6, 7])
    cluster = started(old)
    new = copy.deepcopy(old)
    new["workers"][0]["experts"], new["workers"][1]["experts"] = [0, 1, 2], [3, 4, 5, 6, 7]
    with Load(cluster.address) as load:
        time.sleep(0.5)
        rewrite(cluster, new)
        assert reload_servers(cluster.config_path, None, WAIT_S) == 0
        time.sleep(2.0)  # past w0's grace of 1 s
        w0, w1 = pairs_of(cluster, "w0", 3), pairs_of(cluster, "w1", 3)
        time.sleep(1.0)
        moved = pairs_of(cluster, "w1", 3) - w1
        assert pairs_of(cluster, "w0", 3) == w0 and moved > 0, (w0, moved)
    bad = [o for o in load.outcomes if o != "ok"]
    assert bad == [] and len(load.outcomes) > 20, (bad[:3], len(load.outcomes))
    applied = {"outcome": "applied"}
    for process in (None, "w0", "w1"):
        samples = scrape(cluster.metrics_url(process))
        assert total(samples, "moe_serve_config_reloads_total", **applied) == 1, process
    assert total(scrape(cluster.metrics_url("w0")), "moe_serve_worker_retiring_experts") == 0


def test_sighup_adds_a_worker_that_takes_traffic_once_healthy(
    started: Callable[[dict[str, Any]], ProcessCluster],
) -> None:
    old = base(w0=list(range(8)))
    cluster = started(old)
    port, metrics = free_ports(2)
    new = copy.deepcopy(old)
    added = copy.deepcopy(old["workers"][0])
    added.update(id="w2", address=f"127.0.0.1:{port}", metrics_port=metrics, experts=[5, 6])
    new["workers"].append(added)
    rewrite(cluster, new)
    cluster.cfg = cluster.cfg.model_validate(new)  # the launcher starts w2 from the new file
    cluster.start_worker("w2")
    cluster.wait_serving(["worker w2"], WAIT_S)
    with Load(cluster.address) as load:
        cluster.kill("master", signal.SIGHUP)
        until(lambda: pairs_of(cluster, "w2", 5) > 0, "w2 computes expert 5")
        with MoEClient(cluster.address) as client:
            ids = [w.id for w in client.info().workers]
        assert ids == ["w0", "w2"]
    assert [o for o in load.outcomes if o != "ok"] == []


def test_a_reload_that_removes_a_worker_drains_it_first(
    started: Callable[[dict[str, Any]], ProcessCluster],
) -> None:
    """w1 (a replica of everything) leaves the config: the master stops sending it calls,
    then w1 is stopped, with no failed request."""
    old = base(w0=list(range(8)), w1=list(range(8)))
    cluster = started(old)
    new = copy.deepcopy(old)
    del new["workers"][1]
    with Load(cluster.address) as load:
        time.sleep(0.5)
        rewrite(cluster, new)
        assert reload_servers(cluster.config_path, None, WAIT_S) == 0
        time.sleep(0.5)
        cluster.kill("worker w1", signal.SIGKILL)
        time.sleep(1.0)
    assert [o for o in load.outcomes if o != "ok"] == []
    with MoEClient(cluster.address) as client:
        assert [w.id for w in client.info().workers] == ["w0"]


def _reload_rpc(address: str) -> grpc.RpcError:
    with grpc.insecure_channel(address) as ch, pytest.raises(grpc.RpcError) as caught:
        pb_grpc.MoEMasterStub(ch).Reload(pb.ReloadRequest(), timeout=WAIT_S)
    return caught.value


def test_a_config_that_does_not_validate_is_refused_naming_the_field_and_the_world_serves(
    started: Callable[[dict[str, Any]], ProcessCluster],
) -> None:
    old = base(w0=[0, 1, 2, 3], w1=[4, 5, 6, 7])
    cluster = started(old)
    new = copy.deepcopy(old)
    new["model"]["top_k"] = 0
    rewrite(cluster, new)
    exc = _reload_rpc(cluster.address)
    assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT and "model.top_k" in exc.details()
    cluster.kill("master", signal.SIGHUP)

    def refused() -> float:
        samples = scrape(cluster.metrics_url())
        return total(samples, "moe_serve_config_reloads_total", outcome="refused")

    until(lambda: refused() == 2, "the call, then SIGHUP, refused")
    log = cluster.log()
    assert log.count("reload refused, the old world keeps serving") == 2
    assert log.count("model.top_k: Input should be greater than 0") == 2
    with MoEClient(cluster.address) as client:
        assert client.infer(torch.randn(2, H)).shape == (2, H)


def test_a_change_only_a_restart_can_apply_is_refused_naming_the_field(
    started: Callable[[dict[str, Any]], ProcessCluster],
) -> None:
    old = base(w0=[0, 1, 2, 3], w1=[4, 5, 6, 7])
    cluster = started(old)
    new = copy.deepcopy(old)
    new["model"]["top_k"] = 3
    rewrite(cluster, new)
    exc = _reload_rpc(cluster.address)
    assert exc.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert exc.details().startswith("model.top_k: 2 -> 3; a running master applies only")
    with MoEClient(cluster.address) as client:
        assert client.info().top_k == 2


def test_the_reload_command_exits_2_naming_the_field_before_asking_anyone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from moe_serve.cli import main

    bad = base(w0=list(range(8)))
    bad["model"]["top_k"] = 0
    path = tmp_path / "world.yaml"
    path.write_text(yaml.safe_dump(bad))
    assert main(["reload", "--config", str(path)]) == 2
    assert "model.top_k" in capsys.readouterr().err


def test_a_worker_removed_and_added_back_before_it_closed_is_found_at_its_new_index() -> None:
    from moe_serve.config import parse_config
    from moe_serve.master.reload import serving_placement
    from moe_serve.master.workers import WorkerPool
    from moe_serve.metrics import MasterMetrics

    cfg = parse_config(base(w0=list(range(8)), w1=list(range(8))))

    async def main() -> tuple[int | None, tuple[tuple[int, ...], ...]]:
        pool = WorkerPool(cfg, MasterMetrics())
        try:
            pool.add(cfg.workers[1])  # the old index 1 not closed yet
            return pool.index("w1"), serving_placement(cfg, pool).holders[0]
        finally:
            await pool.close()

    index, holders = asyncio.run(main())
    assert index == 2
    # Index 1 (leaving) is not configured any more; index 2 serves once it says so.
    assert all(1 not in h for h in holders)


class LyingWorker(WorkerService):
    """A worker whose GetInfo claims layers and experts the model does not have, besides
    its own."""

    async def GetInfo(self, request: Any, context: grpc.aio.ServicerContext) -> pb.WorkerInfo:
        info = await super().GetInfo(request, context)
        info.placement.add(layer=99, experts=[0, 1])
        info.retiring.add(layer=0, experts=[8, 2**31, 2**32 - 1])
        return info


def test_what_a_worker_says_it_serves_is_bounded_to_the_model() -> None:
    """The master routes by what workers report (GetInfo): a report naming unknown layers
    or experts beyond num_experts changes nothing, and the master keeps serving."""
    config = base(w0=[0, 1, 2, 3], w1=[4, 5, 6, 7])

    async def main() -> tuple[list[dict[int, frozenset[int]]], torch.Size]:
        async with serve_world(config, LyingWorker) as w:
            pool = w.master.service.pool
            await pool.probe()
            async with AsyncMoEClient(w.cfg.master.listen) as client:
                y = await client.infer(torch.randn(4, H))
            return list(pool.serves), y.shape

    serves, shape = asyncio.run(main())
    assert serves == [{0: frozenset({0, 1, 2, 3})}, {0: frozenset({4, 5, 6, 7})}]
    assert shape == (4, H)
