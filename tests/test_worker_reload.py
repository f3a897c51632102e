"""A worker's live reload (SIGHUP, ExpertWorker.Reload): it re-reads its config file, loads
the experts its entry newly gives it, serves the ones it lost through master.reload_grace_s,
then frees them; it refuses what it cannot apply, and no call fails meanwhile.

Workers are real gRPC servers on 127.0.0.1 (create_worker, port 0) started with a real
config file that each test rewrites; the SIGHUP tests run `moe-serve worker` processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
import yaml

from moe_serve.config import load_config, parse_config
from moe_serve.errors import InvalidRequestError
from moe_serve.metrics import WorkerMetrics
from moe_serve.tools.launcher import is_serving
from moe_serve.transport.auth import metadata
from moe_serve.transport.wire import tensor_from_pb, tensor_to_pb
from moe_serve.v1 import moe_pb2 as pb
from moe_serve.v1 import moe_pb2_grpc as pb_grpc
from moe_serve.weights import open_weights
from moe_serve.worker.batcher import DynamicBatcher
from moe_serve.worker.engine import WorkerEngine
from moe_serve.worker.server import WorkerServer, create_worker
from tests.support.cluster import world

H = 64
GRACE_S = 1.0  # master.reload_grace_s of these worlds
WAIT_S = 30.0  # bound on polls for something that takes well under a second
INVALID, PRECONDITION = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION


def config(
    w0: list[int], w1: list[int], devices: tuple[str, ...] = ("cpu",), **model: Any
) -> dict[str, Any]:
    """Two workers over 8 experts, w0 holding `w0` on `devices`, w1 `w1`."""
    return world(
        model=model or None,
        workers=[{"experts": w0, "devices": list(devices)}, {"experts": w1}],
        master={"reload_grace_s": GRACE_S},
    )


def write(path: Path, cfg: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def with_experts(cfg: dict[str, Any], w0: list[int], w1: list[int]) -> dict[str, Any]:
    """`cfg` (same ports) with new placements."""
    workers = [{**cfg["workers"][0], "experts": w0}, {**cfg["workers"][1], "experts": w1}]
    return {**cfg, "workers": workers}


@contextlib.asynccontextmanager
async def worker(
    path: Path | None, cfg: dict[str, Any] | None = None
) -> AsyncIterator[tuple[WorkerServer, pb_grpc.ExpertWorkerStub]]:
    """Worker w0 of the config file at `path` (or of `cfg`, started without a file) on port
    0, and a stub dialling it."""
    world_cfg = load_config(path) if path is not None else parse_config(cfg)
    server = await create_worker(world_cfg, "w0", port=0, metrics_port=0, config_path=path)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            yield server, pb_grpc.ExpertWorkerStub(channel)
    finally:
        await server.stop(0)


def forward_request(
    experts: list[int], tokens: int = 3, seed: int = 0, layer: int = 0
) -> pb.ForwardRequest:
    """`tokens` tokens of `layer`, each sent to every expert of `experts` with weight 1/len."""
    hidden = torch.randn(tokens, H, generator=torch.Generator().manual_seed(seed))
    token = torch.arange(tokens, dtype=torch.int32).repeat_interleave(len(experts))
    expert = torch.tensor(experts, dtype=torch.int32).repeat(tokens)
    return pb.ForwardRequest(
        layer=layer,
        hidden=tensor_to_pb(hidden),
        pair_token=tensor_to_pb(token),
        pair_expert=tensor_to_pb(expert),
        pair_weight=tensor_to_pb(torch.full((token.shape[0],), 1 / len(experts))),
    )


async def forward(
    stub: pb_grpc.ExpertWorkerStub, experts: list[int], seed: int = 0, layer: int = 0
) -> torch.Tensor:
    request = forward_request(experts, seed=seed, layer=layer)
    reply = await stub.Forward(request, timeout=WAIT_S)
    return tensor_from_pb(reply.output, "output")


async def serves(stub: pb_grpc.ExpertWorkerStub, experts: list[int]) -> bool:
    """Whether a Forward naming `experts` is served."""
    try:
        await forward(stub, experts)
    except grpc.aio.AioRpcError:
        return False
    return True


async def refused(stub: pb_grpc.ExpertWorkerStub, experts: list[int]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await forward(stub, experts)
    return err.value


async def info(stub: pb_grpc.ExpertWorkerStub) -> tuple[list[int], list[int]]:
    """(placement, retiring) of layer 0 as GetInfo reports them."""
    reply = await stub.GetInfo(pb.GetInfoRequest(), timeout=WAIT_S)
    placed = [list(le.experts) for le in reply.placement if le.layer == 0]
    retiring = [list(le.experts) for le in reply.retiring if le.layer == 0]
    return placed[0], retiring[0] if retiring else []


async def reload_error(stub: pb_grpc.ExpertWorkerStub) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Reload(pb.ReloadRequest(), timeout=WAIT_S)
    return err.value


# --- loading and freeing --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("devices", "model"),
    [(("cpu",), {}), (("cpu", "cpu"), {"expert_kind": "glu", "activation": "silu"})],
    ids=["mlp-one-device", "glu-two-devices"],
)
def test_a_reload_that_adds_an_expert_serves_it_as_a_worker_started_with_it(
    tmp_path: Path, devices: tuple[str, ...], model: dict[str, Any]
) -> None:
    """On two devices the new expert comes first: the others change device (copied from the
    stacks that served them), as a worker started with that list spreads them."""
    start = config([0, 1, 2, 3], [4, 5, 6, 7], devices, **model)
    after = with_experts(start, [5, 0, 1, 2, 3], [4, 5, 6, 7])
    path = write(tmp_path / "world.yaml", start)

    async def main() -> tuple[str, tuple[list[int], list[int]], torch.Tensor, torch.Tensor]:
        async with worker(path) as (_, stub):
            write(path, after)
            reply = await stub.Reload(pb.ReloadRequest(), timeout=WAIT_S)
            got = await forward(stub, [5, 1, 0])
            placement = await info(stub)
        async with worker(write(tmp_path / "fresh.yaml", after)) as (_, fresh):
            want = await forward(fresh, [5, 1, 0])
        return reply.summary, placement, got, want

    summary, placement, got, want = asyncio.run(main())
    assert summary == "layer 0: +[5]"
    assert placement == ([0, 1, 2, 3, 5], [])
    assert torch.equal(got, want)


def test_a_reload_that_removes_an_expert_serves_it_through_the_grace_window_only(
    tmp_path: Path,
) -> None:
    start = config([0, 1, 2, 3], [4, 5, 6, 7])
    path = write(tmp_path / "world.yaml", start)

    async def main() -> None:
        async with worker(path) as (_, stub):
            before = await forward(stub, [3, 0])
            write(path, with_experts(start, [0, 1, 2], [3, 4, 5, 6, 7]))
            reply = await stub.Reload(pb.ReloadRequest(), timeout=WAIT_S)
            assert reply.summary == "layer 0: -[3] (expert 3 served until 1 s from now)"
            assert await info(stub) == ([0, 1, 2], [3])
            assert torch.equal(await forward(stub, [3, 0]), before)  # within the window
            deadline = time.monotonic() + WAIT_S
            while await serves(stub, [3, 0]):  # the window ends GRACE_S after the reply
                assert time.monotonic() < deadline, "expert 3 still served"
                await asyncio.sleep(0.05)
            err = await refused(stub, [3, 0])
            assert err.code() == INVALID and err.details().startswith("pair_expert:")
            assert "held: [0, 1, 2]" in err.details()
            assert await info(stub) == ([0, 1, 2], [])
            assert torch.equal(await forward(stub, [0, 1]), await forward(stub, [0, 1]))

    asyncio.run(main())


def test_an_expert_given_back_during_its_grace_window_stops_retiring(tmp_path: Path) -> None:
    start = config([0, 1, 2, 3], [4, 5, 6, 7])
    start["master"]["reload_grace_s"] = 600.0  # no window ends in this test
    path = write(tmp_path / "world.yaml", start)

    async def main() -> None:
        async with worker(path) as (_, stub):
            write(path, with_experts(start, [0, 1, 2], [3, 4, 5, 6, 7]))
            await stub.Reload(pb.ReloadRequest(), timeout=WAIT_S)
            assert await info(stub) == ([0, 1, 2], [3])
            write(path, start)
            reply = await stub.Reload(pb.ReloadRequest(), timeout=WAIT_S)
            assert reply.summary == "layer 0: +[3]"
            assert await info(stub) == ([0, 1, 2, 3], [])

    asyncio.run(main())


def test_a_reload_of_the_same_file_answers_no_change(tmp_path: Path) -> None:
    path = write(tmp_path / "world.yaml", config([0, 1, 2, 3], [4, 5, 6, 7]))

    async def main() -> str:
        async with worker(path) as (_, stub):
            return (await stub.Reload(pb.ReloadRequest(), timeout=WAIT_S)).summary

    assert asyncio.run(main()) == "no change"


def test_no_forward_fails_while_a_reload_adds_and_removes_experts(tmp_path: Path) -> None:
    """Four concurrent Forward loops (one per layer) over experts that stay; a reload adds 4
    and 5 and drops 3 on each of the four layers, and its grace window ends, while they run.
    Every call answers OK, with the bits it had before, some while the reload loads."""
    start = config([0, 1, 2, 3], [3, 4, 5, 6, 7], moe_layers=[0, 1, 2, 3], expert_ffn_size=512)
    path = write(tmp_path / "world.yaml", start)

    async def main() -> tuple[int, int, int]:
        async with worker(path) as (_, stub):
            want = [await forward(stub, [0, 1, 2], seed=la, layer=la) for la in range(4)]
            done, reloading = asyncio.Event(), False
            ok, failed, during = 0, 0, 0

            async def loop(layer: int) -> None:
                nonlocal ok, failed, during
                while not done.is_set():
                    try:
                        got = await forward(stub, [0, 1, 2], seed=layer, layer=layer)
                    except grpc.aio.AioRpcError:
                        failed += 1
                        continue
                    assert torch.equal(got, want[layer])
                    ok, during = ok + 1, during + reloading

            loops = [asyncio.create_task(loop(la)) for la in range(4)]
            await asyncio.sleep(0.1)
            write(path, with_experts(start, [0, 1, 2, 4, 5], [3, 4, 5, 6, 7]))
            reloading = True
            reply = await stub.Reload(pb.ReloadRequest(), timeout=WAIT_S)
            reloading = False
            assert reply.summary.startswith("layer 0: +[4, 5] -[3]")
            deadline = time.monotonic() + WAIT_S
            while (await info(stub))[1]:  # until the window ends
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.2)  # and the stacks without expert 3 serve
            done.set()
            await asyncio.gather(*loops)
            assert await info(stub) == ([0, 1, 2, 4, 5], [])
            return ok, failed, during

    ok, failed, during = asyncio.run(main())
    assert failed == 0 and during >= 1 and ok > during


def test_a_call_queued_when_its_expert_is_freed_fails_alone() -> None:
    """A call validated while expert 3 served, still queued when the grace window ends: it
    gets INVALID_ARGUMENT naming pair_expert, its batch mate its result."""
    cfg = parse_config(config([0, 1, 2, 3], [4, 5, 6, 7]))
    engine = WorkerEngine(cfg.model, cfg.workers[0], open_weights(cfg.model, cfg.routing))
    # Calls wait up to a second for mates: the grace window ends while both are queued.
    batching = cfg.batching.model_copy(update={"max_delay_us": 1_000_000})

    def tensors(experts: list[int]) -> tuple[torch.Tensor, ...]:
        request = forward_request(experts)
        keys = ("hidden", "pair_token", "pair_expert", "pair_weight")
        return tuple(tensor_from_pb(getattr(request, k), k) for k in keys)

    async def main() -> list[Any]:
        batcher = DynamicBatcher(engine, batching, WorkerMetrics())
        batcher.start()
        calls = []
        for experts in ([3], [0]):
            hidden, token, expert, weight = tensors(experts)
            engine.validate(0, 3, token, expert, weight)
            calls.append(asyncio.create_task(batcher.submit(0, hidden, token, expert, weight)))
        await asyncio.sleep(0.01)  # both queued
        engine.install(0, engine.build(0, [0, 1, 2], None))  # what a window's end does
        results = await asyncio.gather(*calls, return_exceptions=True)
        await batcher.stop()
        return results

    stale, mate = asyncio.run(main())
    assert isinstance(stale, InvalidRequestError)
    assert str(stale).startswith("pair_expert: names an expert not held by worker 'w0'")
    assert isinstance(mate, torch.Tensor)
    assert torch.equal(mate, engine.forward(0, *tensors([0])))


# --- refusals -------------------------------------------------------------------------------


def test_a_config_that_does_not_validate_is_refused_naming_the_field(tmp_path: Path) -> None:
    start = config([0, 1, 2, 3], [4, 5, 6, 7])
    path = write(tmp_path / "world.yaml", start)

    async def main() -> None:
        async with worker(path) as (_, stub):
            write(path, with_experts(start, [0, 1, 2, 3, 99], [4, 5, 6, 7]))
            err = await reload_error(stub)
            assert err.code() == INVALID
            assert "workers[0].experts: expert 99 on layer 0 is out of range" in err.details()
            assert await info(stub) == ([0, 1, 2, 3], [])
            await forward(stub, [3])  # still serving

    asyncio.run(main())


RESTARTS = {
    "model": (
        lambda c: {**c, "model": {**c["model"], "hidden_size": 128}},
        "model.hidden_size: 64 -> 128",
    ),
    "devices": (
        lambda c: {
            **c,
            "workers": [{**c["workers"][0], "devices": ["cpu", "cpu"]}, c["workers"][1]],
        },
        "workers[0].devices: ('cpu',) -> ('cpu', 'cpu')",
    ),
    "batching": (
        lambda c: {**c, "batching": {"max_batch_tokens": 4}},
        "batching.max_batch_tokens: 16384 -> 4",
    ),
    "removed": (
        lambda c: {**c, "workers": [{**c["workers"][1], "experts": list(range(8))}]},
        "workers: no worker 'w0' in the new config; the master drains it: stop this worker",
    ),
}


@pytest.mark.parametrize("change", sorted(RESTARTS))
def test_a_change_a_running_worker_cannot_apply_is_refused_naming_the_field(
    tmp_path: Path, change: str
) -> None:
    start = config([0, 1, 2, 3], [4, 5, 6, 7])
    path = write(tmp_path / "world.yaml", start)
    edit, message = RESTARTS[change]

    async def main() -> None:
        async with worker(path) as (_, stub):
            write(path, edit(start))
            err = await reload_error(stub)
            assert err.code() == PRECONDITION
            assert err.details().startswith(message), err.details()
            if change != "removed":
                assert "restart" in err.details()
            assert await info(stub) == ([0, 1, 2, 3], [])
            await forward(stub, [3])

    asyncio.run(main())


def test_a_worker_started_without_a_config_file_refuses_reload() -> None:
    async def main() -> grpc.aio.AioRpcError:
        async with worker(None, config([0, 1, 2, 3], [4, 5, 6, 7])) as (_, stub):
            return await reload_error(stub)

    err = asyncio.run(main())
    assert err.code() == PRECONDITION
    assert "this worker was started without a config file" in err.details()


def test_reload_without_the_worker_token_is_unauthenticated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MOE_TEST_WORKER_TOKEN", "w0rker-token-for-reload")
    start = config([0, 1, 2, 3], [4, 5, 6, 7])
    start["security"] = {"worker_token_env": "MOE_TEST_WORKER_TOKEN"}
    path = write(tmp_path / "world.yaml", start)

    async def main() -> tuple[grpc.aio.AioRpcError, str]:
        async with worker(path) as (_, stub):
            err = await reload_error(stub)
            token = metadata("w0rker-token-for-reload")
            reply = await stub.Reload(pb.ReloadRequest(), timeout=WAIT_S, metadata=token)
            return err, reply.summary

    err, summary = asyncio.run(main())
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED and "worker token" in err.details()
    assert summary == "no change"


# --- SIGHUP on a `moe-serve worker` process ---------------------------------------------------


def start_process(tmp_path: Path, cfg: dict[str, Any]) -> tuple[subprocess.Popen[bytes], Path]:
    path = write(tmp_path / "world.yaml", cfg)
    log = tmp_path / "worker.log"
    cmd = [sys.executable, "-m", "moe_serve", "worker", "--config", str(path), "--worker-id", "w0"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while not is_serving(cfg["workers"][0]["address"], timeout=0.5):
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, "worker did not start"
        time.sleep(0.2)
    return proc, log


def placement_of(address: str) -> tuple[list[int], list[int]]:
    with grpc.insecure_channel(address) as channel:
        reply = pb_grpc.ExpertWorkerStub(channel).GetInfo(pb.GetInfoRequest(), timeout=10)
    retiring = [list(le.experts) for le in reply.retiring if le.layer == 0]
    return list(reply.placement[0].experts), retiring[0] if retiring else []


@pytest.mark.e2e
def test_sighup_makes_a_worker_process_load_its_new_experts(tmp_path: Path) -> None:
    start = config([0, 1, 2, 3], [4, 5, 6, 7])
    proc, log = start_process(tmp_path, start)
    address = start["workers"][0]["address"]
    try:
        write(tmp_path / "world.yaml", with_experts(start, [0, 1, 2, 3, 5], [4, 5, 6, 7]))
        os.kill(proc.pid, signal.SIGHUP)
        deadline = time.monotonic() + WAIT_S
        while placement_of(address)[0] != [0, 1, 2, 3, 5]:
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        assert "w0: reload: layer 0: +[5]" in log.read_text()
    finally:
        proc.terminate()  # by pid: this test's own child
        proc.wait(timeout=30)


@pytest.mark.e2e
def test_sighup_with_a_bad_config_logs_the_field_and_keeps_serving(tmp_path: Path) -> None:
    start = config([0, 1, 2, 3], [4, 5, 6, 7])
    proc, log = start_process(tmp_path, start)
    address = start["workers"][0]["address"]
    try:
        write(tmp_path / "world.yaml", with_experts(start, [0, 1, 2, 3, 99], [4, 5, 6, 7]))
        os.kill(proc.pid, signal.SIGHUP)
        deadline = time.monotonic() + WAIT_S
        while "reload refused" not in log.read_text():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        line = next(ln for ln in log.read_text().splitlines() if "reload refused" in ln)
        assert " ERROR " in line
        assert "workers[0].experts: expert 99" in log.read_text()
        assert placement_of(address) == ([0, 1, 2, 3], [])
    finally:
        proc.terminate()
        proc.wait(timeout=30)
