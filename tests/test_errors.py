"""Typed error reasons: a domain error's Reason travels with its status as trailing metadata
(`moe-serve-reason`), reaches the SDK as MoEServeError.reason, and is what clients and the
master match on, never the message's words. Real gRPC servers in-process on 127.0.0.1."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import grpc
import pytest
import torch

from moe_serve.client import AsyncMoEClient, MoEClient, MoEServeError, _region_lost
from moe_serve.errors import (
    REASON_KEY,
    ConfigError,
    InvalidRequestError,
    MoEError,
    Reason,
    WorkerUnavailableError,
)
from moe_serve.layer.dispatch import dispatch
from moe_serve.master.workers import RegionLostError
from moe_serve.transport.server import error_boundary, serve_service
from moe_serve.transport.shm import MIN_SHARED_BYTES, RegionNotAttachedError, RegionTable
from moe_serve.v1 import moe_pb2 as pb
from moe_serve.v1 import moe_pb2_grpc as pb_grpc
from moe_serve.worker.service import WorkerService
from tests.conftest import world
from tests.test_failover import ALL, IN_PROCESS_MASTER, in_process

# Says nothing of regions: only the reason can tell a caller to attach again.
NEUTRAL = "hidden_shared: not mapped for this connection"


class Failing:
    """A MoEMaster servicer whose every call raises `error` inside the error boundary."""

    def __init__(self, error: MoEError) -> None:
        self.error = error

    @error_boundary
    async def GetInfo(self, request: object, context: grpc.aio.ServicerContext) -> None:
        raise self.error

    Infer = AttachRegion = Reload = GetInfo


def _serve(error: MoEError, call: Callable[[str], Any], draining: bool = False) -> Any:
    """Serve Failing(error) on loopback and return what `call(address)` returns or raises
    (run in a thread, so that it may block)."""

    async def main() -> Any:
        served = await serve_service("MoEMaster", Failing(error), "127.0.0.1:0", 1 << 20, "l")
        served.drain.draining = draining
        try:
            return await asyncio.to_thread(_outcome, call, f"127.0.0.1:{served.port}")
        finally:
            await served.server.stop(0)

    return asyncio.run(main())


def _outcome(call: Callable[[str], Any], address: str) -> Any:
    try:
        return call(address)
    except (MoEServeError, grpc.RpcError) as exc:
        return exc


def _info(address: str) -> None:
    with MoEClient(address, timeout=5) as client:
        client.info()


def _async_info(address: str) -> None:
    async def go() -> None:
        async with AsyncMoEClient(address, timeout=5) as client:
            await client.info()

    asyncio.run(go())


def _raw_rpc_error(address: str) -> grpc.RpcError:
    """The grpc.RpcError of a plain sync GetInfo call."""
    with grpc.insecure_channel(address) as channel, pytest.raises(grpc.RpcError) as err:
        pb_grpc.MoEMasterStub(channel).GetInfo(pb.GetInfoRequest(), timeout=5)
    return err.value


def _raw_aio_rpc_error(address: str) -> grpc.RpcError:
    async def go() -> grpc.RpcError:
        async with grpc.aio.insecure_channel(address) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await pb_grpc.MoEMasterStub(channel).GetInfo(pb.GetInfoRequest(), timeout=5)
        return err.value

    return asyncio.run(go())


def test_reason_values_are_the_stable_wire_strings() -> None:
    assert REASON_KEY == "moe-serve-reason"
    assert {r.name: r.value for r in Reason} == {
        "REGION_NOT_ATTACHED": "REGION_NOT_ATTACHED",
        "DRAINING": "DRAINING",
        "WORKER_UNAVAILABLE": "WORKER_UNAVAILABLE",
    }
    assert RegionNotAttachedError.reason is Reason.REGION_NOT_ATTACHED
    assert WorkerUnavailableError.reason is Reason.WORKER_UNAVAILABLE
    assert MoEError.reason is None and InvalidRequestError.reason is None


@pytest.mark.parametrize("call", [_info, _async_info], ids=["sync", "async"])
def test_a_domain_errors_reason_reaches_the_client_with_code_and_message_unchanged(
    call: Callable[[str], None],
) -> None:
    message = "no live replica for layer 0 experts [3]: worker 'w1' is unavailable"
    err = _serve(WorkerUnavailableError(message), call)
    assert isinstance(err, MoEServeError)
    assert err.code == grpc.StatusCode.UNAVAILABLE
    assert err.message == message and str(err) == f"UNAVAILABLE: {message}"
    assert err.reason == "WORKER_UNAVAILABLE"


@pytest.mark.parametrize("call", [_info, _async_info], ids=["sync", "async"])
def test_an_error_without_a_reason_reaches_the_client_with_reason_none(
    call: Callable[[str], None],
) -> None:
    err = _serve(InvalidRequestError("layer", "3 is not a MoE layer (layers: [0])"), call)
    assert isinstance(err, MoEServeError)
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert err.message == "layer: 3 is not a MoE layer (layers: [0])"
    assert err.reason is None


@pytest.mark.parametrize("call", [_info, _async_info], ids=["sync", "async"])
def test_a_draining_server_refuses_new_calls_with_reason_draining(
    call: Callable[[str], None],
) -> None:
    err = _serve(InvalidRequestError("never", "reached"), call, draining=True)
    assert isinstance(err, MoEServeError)
    assert err.code == grpc.StatusCode.UNAVAILABLE
    assert "is draining" in err.message
    assert err.reason == "DRAINING"


@pytest.mark.parametrize("call", [_raw_rpc_error, _raw_aio_rpc_error], ids=["sync", "async"])
def test_region_lost_follows_the_reason_not_the_message(call: Callable[[str], Any]) -> None:
    # The reason with a message that never says "region": the client attaches again.
    lost = _serve(RegionNotAttachedError(NEUTRAL), call)
    assert lost.code() == grpc.StatusCode.FAILED_PRECONDITION and "region" not in lost.details()
    assert _region_lost(lost)
    # The same code with "region" in the message but no reason: an error, not a re-attach.
    other = _serve(ConfigError("hidden_shared.region: region ids are 32 hex digits"), call)
    assert other.code() == grpc.StatusCode.FAILED_PRECONDITION and "region" in other.details()
    assert not _region_lost(other)


class ForgetfulTable(RegionTable):
    """The master's real client-region table, but with nothing attached and a message that
    does not say "region": as after a master restart, worded otherwise."""

    def view(self, peer: str, t: pb.SharedTensor, field: str, *args: Any) -> torch.Tensor:
        if (peer, t.region) not in self._regions:
            raise RegionNotAttachedError(NEUTRAL)
        return super().view(peer, t, field, *args)


def test_a_client_whose_region_the_master_forgot_attaches_again_on_the_reason() -> None:
    config = world(workers=[{"experts": ALL}], master=IN_PROCESS_MASTER)
    tokens = MIN_SHARED_BYTES // (64 * 4)  # float32 rows of hidden 64: the shared path
    x = torch.randn(tokens, 64, generator=torch.Generator().manual_seed(3))

    async def main() -> tuple[list[torch.Tensor], float, int]:
        async with in_process(config) as world_:
            master = world_.master
            async with AsyncMoEClient(world_.cfg.master.listen, timeout=30) as client:
                first = await client.infer(x)
                master.client_regions = ForgetfulTable()  # the master forgets the region
                lost = await client.infer(x)  # refused, then sent as bytes
                again = await client.infer(x)  # attached again: shared memory
            registry = master.metrics.registry
            shared = registry.get_sample_value(
                "moe_serve_master_infer_transport_total", {"transport": "shared"}
            )
            return [first, lost, again], shared or 0.0, len(master.client_regions)

    (first, lost, again), shared, attached = asyncio.run(main())
    assert torch.equal(lost, first) and torch.equal(again, first)
    assert shared == 2  # the first and the third call; the second was refused
    assert attached == 1


class RegionlessWorker(WorkerService):
    """A real worker whose Forward refuses with `error`, inside the error boundary."""

    error: MoEError = RegionNotAttachedError(NEUTRAL)

    @error_boundary
    async def Forward(self, request: Any, context: grpc.aio.ServicerContext) -> bytes:
        raise self.error


class MisnamedWorker(RegionlessWorker):
    error = ConfigError("hidden_shared.region: region ids are 32 hex digits")


@pytest.mark.parametrize(
    ("worker", "expected"),
    [(RegionlessWorker, RegionLostError), (MisnamedWorker, MoEError)],
    ids=["reason", "words"],
)
def test_the_master_takes_a_worker_answer_for_region_lost_on_the_reason_alone(
    worker: type[WorkerService], expected: type[MoEError]
) -> None:
    config = world(workers=[{"experts": ALL}], master=IN_PROCESS_MASTER)
    x = torch.randn(2, 64)

    async def main() -> BaseException:
        async with in_process(config, worker) as world_:
            pool, gate = world_.master.pool, world_.master.engine.gates[0]
            (sl,) = dispatch(gate(x, losses=False), world_.master.engine.owners(0, x.device), 1)
            with pytest.raises(MoEError) as err:
                await pool.forward(0, x, sl, 5.0)
        return err.value

    err = asyncio.run(main())
    assert type(err) is expected
    if expected is MoEError:
        assert str(err).startswith("worker 'w0' failed: FAILED_PRECONDITION: hidden_shared")
