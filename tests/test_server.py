"""The servers' connection limits: streams per connection, keepalive pings, idle and age."""

from __future__ import annotations

import asyncio

import grpc

from moe_serve.master.workers import _CHANNEL_OPTIONS
from moe_serve.transport import server as transport_server
from moe_serve.transport.server import serve_service
from moe_serve.v1 import moe_pb2 as pb
from moe_serve.v1 import moe_pb2_grpc as pb_grpc


class Held:
    """A MoEMaster servicer whose GetInfo calls wait until released; counts them running."""

    def __init__(self) -> None:
        self.running = self.most = 0
        self.release = asyncio.Event()

    async def GetInfo(self, request: object, context: grpc.aio.ServicerContext) -> pb.MasterInfo:
        self.running += 1
        self.most = max(self.most, self.running)
        await self.release.wait()
        self.running -= 1
        return pb.MasterInfo(hidden_size=7)

    async def Infer(self, request: object, context: grpc.aio.ServicerContext) -> None:
        raise NotImplementedError

    async def AttachRegion(self, request: object, context: grpc.aio.ServicerContext) -> None:
        raise NotImplementedError

    Reload = AttachRegion


def _options() -> dict[str, int]:
    return dict(transport_server.server_options(1 << 20))


def test_one_connection_runs_at_most_max_concurrent_streams_calls_and_queues_the_rest() -> None:
    extra = 44

    async def main() -> tuple[int, list[int]]:
        held = Held()
        served = await serve_service("MoEMaster", held, "127.0.0.1:0", 1 << 20, "listen")
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{served.port}") as channel:
                stub = pb_grpc.MoEMasterStub(channel)
                calls = [
                    asyncio.ensure_future(stub.GetInfo(pb.GetInfoRequest(), timeout=60))
                    for _ in range(transport_server.MAX_CONCURRENT_STREAMS + extra)
                ]
                for _ in range(500):  # until the server holds as many calls as it will
                    if held.running >= transport_server.MAX_CONCURRENT_STREAMS:
                        break
                    await asyncio.sleep(0.01)
                await asyncio.sleep(0.3)  # room for any call beyond the limit to show up
                most = held.most
                held.release.set()
                replies = await asyncio.gather(*calls)
        finally:
            await served.shutdown(0)
        return most, [r.hidden_size for r in replies]

    most, replies = asyncio.run(main())
    assert most == transport_server.MAX_CONCURRENT_STREAMS
    assert replies == [7] * (transport_server.MAX_CONCURRENT_STREAMS + extra)  # queued, not refused


def test_servers_accept_the_masters_keepalive_pings_on_idle_connections() -> None:
    # The master pings each worker every keepalive_time_ms, with or without calls. A server
    # that counted those as early pings would close the channel with GOAWAY "too_many_pings"
    # (measured with gRPC's defaults: after 130 s on an idle channel).
    master = dict(_CHANNEL_OPTIONS)
    options = _options()
    assert master["grpc.keepalive_permit_without_calls"] == 1
    assert options["grpc.keepalive_permit_without_calls"] == 1  # else: one ping per 2 h
    interval = options["grpc.http2.min_ping_interval_without_data_ms"]
    assert interval * 2 <= master["grpc.keepalive_time_ms"]  # room for timer jitter
    assert (
        options["grpc.http2.max_ping_strikes"] == transport_server.MAX_PING_STRIKES > 0
    )  # floods cut off


def test_connections_are_renewed_after_hours_not_seconds() -> None:
    # A shared-memory region is bound to its connection: each renewal costs one re-attach.
    options = _options()
    assert options["grpc.max_connection_age_ms"] >= 3600 * 1000
    assert options["grpc.max_connection_idle_ms"] >= 60 * 1000
    # In-flight calls outlive the 30 s default worker and client timeouts.
    assert options["grpc.max_connection_age_grace_ms"] >= 4 * 30 * 1000


def test_server_options_carry_the_message_limit_both_ways() -> None:
    options = dict(transport_server.server_options(12345))
    assert options["grpc.max_receive_message_length"] == 12345
    assert options["grpc.max_send_message_length"] == 12345
    assert options["grpc.so_reuseport"] == 0
