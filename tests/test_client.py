"""The client SDK: one core behind MoEClient and AsyncMoEClient, typed by `return_routing`,
and errors that say what went wrong when TLS is mismatched. Real gRPC servers in-process on
127.0.0.1; each client runs in a thread of its own beside them."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import typing
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import grpc
import pytest
import torch

from moe_serve.client import AsyncMoEClient, ClientTLS, MoEClient, MoEServeError, RoutingInfo
from moe_serve.config import TLSConfig
from moe_serve.errors import InvalidRequestError, MoEError
from moe_serve.master.service import MasterService
from moe_serve.transport.server import error_boundary, serve_service
from moe_serve.transport.shm import (
    MIN_SHARED_BYTES,
    MappedRegion,
    RegionNotAttachedError,
    RegionTable,
    SharedMemoryError,
)
from moe_serve.transport.tls import server_credentials
from moe_serve.v1 import moe_pb2 as pb
from tests.support.cluster import serve_world, world

CERTS_SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "gen_test_certs.sh"

H = 64  # hidden size of tests.support.cluster.world
SHARED_TOKENS = MIN_SHARED_BYTES // (H * 4)  # float32 rows enough for the shared path
Routed = tuple[torch.Tensor, RoutingInfo]


@dataclass
class Run:
    """What one client saw: its results in order and its shared-memory state after them."""

    results: list[Routed]
    shared_state: str


def sync_run(address: str, xs: list[torch.Tensor]) -> Run:
    """`xs` one after another through one MoEClient, routing asked for."""
    with MoEClient(address, timeout=30) as client:
        results = [client.infer(x, return_routing=True) for x in xs]
        return Run(results, client._shared.state)


def async_run(address: str, xs: list[torch.Tensor]) -> Run:
    """`xs` one after another through one AsyncMoEClient on an event loop of its own,
    routing asked for."""

    async def go() -> Run:
        async with AsyncMoEClient(address, timeout=30) as client:
            results = [await client.infer(x, return_routing=True) for x in xs]
            return Run(results, client._shared.state)

    return asyncio.run(go())


CLIENTS = {"sync": sync_run, "async": async_run}


def _x(tokens: int, seed: int) -> torch.Tensor:
    return torch.randn(tokens, H, generator=torch.Generator().manual_seed(seed))


def transport(master: MasterService) -> dict[str, float]:
    """The master's Infer calls by transport, as its metric counts them."""
    registry = master.metrics.registry
    name = "moe_serve_master_infer_transport_total"
    return {
        t: registry.get_sample_value(name, {"transport": t}) or 0.0 for t in ("shared", "bytes")
    }


def each_client(
    xs: list[torch.Tensor], table: Callable[[], RegionTable] | None = None
) -> dict[str, tuple[Run, dict[str, float], RegionTable]]:
    """Run `xs` through a sync and then an async client, each against a master of its own
    (its client-region table made by `table`); per client: what it saw, the master's calls
    by transport and the table."""
    # One worker with every expert; bytes between master and worker (the client's path is
    # what these tests look at).
    config = world(workers=[{"experts": list(range(8))}], master={"shared_memory_bytes": 0})

    async def one(run: Callable[[str, list[torch.Tensor]], Run]) -> tuple[Any, ...]:
        async with serve_world(config) as w:
            master = w.master.service
            if table is not None:
                master.client_regions = table()
            got = await asyncio.to_thread(run, w.master.address, xs)
            return got, transport(master), master.client_regions

    return {kind: asyncio.run(one(run)) for kind, run in CLIENTS.items()}


def assert_identical(a: Routed, b: Routed) -> None:
    (ya, ra), (yb, rb) = a, b
    assert torch.equal(ya, yb)
    assert torch.equal(ra.expert_ids, rb.expert_ids)
    assert torch.equal(ra.weights, rb.weights)
    assert torch.equal(ra.scores, rb.scores)
    assert (ra.dropped_pairs, ra.load_balance_loss, ra.importance_loss) == (
        rb.dropped_pairs,
        rb.load_balance_loss,
        rb.importance_loss,
    )


# ------------------------------------------------------------ one core, two clients ---


@pytest.mark.parametrize("tokens", [3, SHARED_TOKENS], ids=["bytes", "shared"])
def test_sync_and_async_clients_give_bit_identical_outputs_and_routing(tokens: int) -> None:
    x = _x(tokens, seed=5).reshape(1, tokens, H)  # a leading batch dim, as a model passes
    runs = each_client([x])
    (sync, sync_counts, _), (asyn, async_counts, _) = runs["sync"], runs["async"]
    path = "bytes" if tokens == 3 else "shared"
    assert sync_counts[path] == async_counts[path] == 1  # the path the size calls for
    assert_identical(sync.results[0], asyn.results[0])
    y, routing = sync.results[0]
    assert y.shape == x.shape and y.dtype == x.dtype and y.device == x.device
    assert routing.expert_ids.shape == (tokens, 2) and routing.scores.shape == (tokens, 8)
    assert routing.weights.dtype == routing.scores.dtype == torch.float32
    assert not routing.expert_ids.is_floating_point()


# Says nothing of regions: only the reason can tell a client to attach again.
NEUTRAL = "hidden_shared: not mapped for this connection"


class ForgetOnce(RegionTable):
    """The master's real region table, which forgets every region once, on the second call
    that names one, and refuses that call with a message that does not say "region": only
    the reason tells the client to attach again. `log` records what it saw."""

    def __init__(self) -> None:
        super().__init__()
        self.log: list[str] = []

    def attach(self, peer: str, request: pb.AttachRegionRequest, *args: Any) -> MappedRegion:
        self.log.append("attach")
        return super().attach(peer, request, *args)

    def view(self, peer: str, t: pb.SharedTensor, field: str, *args: Any) -> torch.Tensor:
        if field == "hidden_shared":
            if self.log.count("shared") == 1 and "refused" not in self.log:
                self.log.append("refused")
                self._regions.clear()  # as after a master restart
                raise RegionNotAttachedError(NEUTRAL)
            self.log.append("shared")
        return super().view(peer, t, field, *args)


def test_both_clients_send_a_call_whose_region_was_refused_as_bytes_then_attach_again() -> None:
    xs = [_x(SHARED_TOKENS, seed) for seed in (1, 2, 3)]
    runs = each_client(xs, ForgetOnce)
    for run, counts, table in runs.values():
        assert isinstance(table, ForgetOnce)
        # The second call: refused, sent again as bytes; the third attaches again.
        assert table.log == ["attach", "shared", "refused", "attach", "shared"]
        assert counts == {"shared": 2, "bytes": 1}
        assert run.shared_state == "attached"
    for a, b in zip(runs["sync"][0].results, runs["async"][0].results, strict=True):
        assert_identical(a, b)


class Declining(RegionTable):
    """A master that cannot map any client's region (another host, say)."""

    def __init__(self) -> None:
        super().__init__()
        self.offers = 0

    def attach(self, peer: str, request: pb.AttachRegionRequest, *args: Any) -> MappedRegion:
        self.offers += 1
        raise SharedMemoryError("region of no process here: another host or namespace")


def test_both_clients_send_bytes_for_good_when_the_master_declines_the_region() -> None:
    xs = [_x(SHARED_TOKENS, seed) for seed in (1, 2)]
    runs = each_client(xs, Declining)
    for run, counts, table in runs.values():
        assert isinstance(table, Declining)
        assert table.offers == 1  # offered once, never again
        assert counts == {"shared": 0, "bytes": 2}
        assert run.shared_state == "off"
    for a, b in zip(runs["sync"][0].results, runs["async"][0].results, strict=True):
        assert_identical(a, b)


# --------------------------------------------------------------------------- types ---


@pytest.mark.parametrize("cls", [MoEClient, AsyncMoEClient])
def test_infer_is_typed_by_return_routing(cls: type) -> None:
    overloads = typing.get_overloads(cls.infer)
    returns = {}
    for fn in overloads:
        hints = typing.get_type_hints(fn)
        returns[hints["return_routing"]] = hints["return"]
    assert returns == {
        Literal[False]: torch.Tensor,  # infer(x), infer(x, return_routing=False)
        Literal[True]: Routed,  # infer(x, return_routing=True)
        bool: torch.Tensor | Routed,  # a flag known only at run time
    }


@pytest.mark.parametrize("cls", [MoEClient, AsyncMoEClient])
def test_no_public_client_signature_says_any(cls: type) -> None:
    methods = [cls.__init__, *(getattr(cls, n) for n in vars(cls) if not n.startswith("_"))]
    methods += typing.get_overloads(cls.infer)
    for fn in methods:
        for name, hint in typing.get_type_hints(fn).items():
            assert "Any" not in repr(hint), (fn.__qualname__, name, hint)


# ----------------------------------------------------------------- TLS mismatches ---


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a server certificate for 127.0.0.1 and a client one, by the script that
    docs/operations.md gives users."""
    out = tmp_path_factory.mktemp("certs")
    subprocess.run(["bash", str(CERTS_SCRIPT), str(out)], check=True, capture_output=True)
    return out


def credentials(certs: Path, port: str) -> grpc.ServerCredentials | None:
    if port == "plaintext":
        return None
    client_auth = port == "mutual TLS"
    cfg = TLSConfig(
        cert=certs / "server.pem",
        key=certs / "server.key",
        ca=certs / "ca.pem" if client_auth else None,
        client_auth=client_auth,
    )
    return server_credentials(cfg)


@contextlib.asynccontextmanager
async def served(servicer: object, creds: grpc.ServerCredentials | None) -> AsyncIterator[str]:
    """`servicer` as a MoEMaster on 127.0.0.1, port 0; yields its address."""
    s = await serve_service("MoEMaster", servicer, "127.0.0.1:0", 1 << 20, "l", credentials=creds)
    try:
        yield f"127.0.0.1:{s.port}"
    finally:
        await s.server.stop(0)


def refusal(kind: str, address: str, tls: ClientTLS | None) -> MoEServeError:
    """The MoEServeError of one infer by a client of `kind` (blocking: run in a thread)."""

    async def go() -> None:
        async with AsyncMoEClient(address, timeout=5, tls=tls) as client:
            await client.infer(torch.ones(1, H))

    with pytest.raises(MoEServeError) as err:
        if kind == "async":
            asyncio.run(go())
        else:
            with MoEClient(address, timeout=5, tls=tls) as client:
                client.infer(torch.ones(1, H))
    return err.value


def refusal_from(
    servicer: object, creds: grpc.ServerCredentials | None, kind: str, tls: ClientTLS | None
) -> tuple[MoEServeError, str]:
    async def main() -> tuple[MoEServeError, str]:
        async with served(servicer, creds) as address:
            return await asyncio.to_thread(refusal, kind, address, tls), address

    return asyncio.run(main())


class Failing:
    """A MoEMaster servicer whose every call raises `error` inside the error boundary."""

    def __init__(self, error: MoEError) -> None:
        self.error = error

    @error_boundary
    async def GetInfo(self, request: object, context: grpc.aio.ServicerContext) -> None:
        raise self.error

    Infer = AttachRegion = Reload = GetInfo


ANY_ERROR = Failing(InvalidRequestError("never", "reached"))


@pytest.mark.parametrize("kind", CLIENTS)
@pytest.mark.parametrize(
    ("port", "client_tls", "says"),
    [
        (
            "TLS",
            False,
            "{address} closed the connection: the server may require TLS "
            "(this client dialed plaintext; pass tls=ClientTLS(ca=...))",
        ),
        (
            "plaintext",
            True,
            "TLS handshake with {address} failed: the server may not use TLS "
            "(this client dialed TLS; leave tls unset for a plaintext port)",
        ),
        (
            "mutual TLS",
            True,
            "{address} closed the connection during the TLS handshake: the server may require "
            "a client certificate signed by its CA (this client dialed TLS without a client "
            "certificate; pass ClientTLS(cert=..., key=...))",
        ),
    ],
    ids=["plaintext-client-on-tls-port", "tls-client-on-plaintext-port", "no-client-cert"],
)
def test_a_tls_mismatch_says_tls_the_address_and_how_this_client_dialed(
    certs: Path, port: str, client_tls: bool, says: str, kind: str
) -> None:
    tls = ClientTLS(ca=certs / "ca.pem") if client_tls else None
    err, address = refusal_from(ANY_ERROR, credentials(certs, port), kind, tls)
    assert err.code == grpc.StatusCode.UNAVAILABLE and err.reason is None
    hint, _, grpc_said = err.message.partition(". gRPC: ")
    assert hint == says.format(address=address)
    assert grpc_said.startswith("failed to connect to all addresses")  # gRPC's words kept
    assert str(err).startswith(f"UNAVAILABLE: {hint}")


@pytest.mark.parametrize("kind", CLIENTS)
def test_a_port_nobody_listens_on_gets_no_tls_hint(kind: str) -> None:
    with socket.socket() as s:  # bound, never listening: connections are refused
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
        err = refusal(kind, address, None)
    assert err.code == grpc.StatusCode.UNAVAILABLE
    assert "TLS" not in err.message and "Connection refused" in err.message


class SocketClosed(MoEError):
    """A server's own UNAVAILABLE without a reason, worded like a closed connection."""

    code = grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("kind", CLIENTS)
def test_a_servers_own_unavailable_reaches_the_client_word_for_word(kind: str) -> None:
    message = "upstream: Socket closed"
    err, _ = refusal_from(Failing(SocketClosed(message)), None, kind, None)
    assert err.code == grpc.StatusCode.UNAVAILABLE and err.message == message
