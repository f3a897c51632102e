"""The client SDK: send hidden states to the master, get the MoE layer's output back.

    with MoEClient("127.0.0.1:50051") as client:
        y = client.infer(x, layer=0)                      # same shape, dtype, device as x
        y, routing = client.infer(x, layer=0, return_routing=True)

Every failure raises `MoEServeError` with the gRPC status `code`, the server's message and,
where the server gave one, its `reason` (moe_serve.errors.Reason). A connection refused
during its set-up in a way that suggests mismatched TLS (a plaintext client on a TLS port,
or the reverse) stays UNAVAILABLE, with a message naming the address and how this client
dialled.
A master with TLS on is dialled with `MoEClient(address, tls=ClientTLS(ca="ca.pem"))`
(plus `cert=`/`key=` under mutual TLS) and, with a bearer token, `token=...`.

Both clients share one core without I/O (`_Core`, `_InferCall`, as httpx's clients share
theirs): validation, the shared-memory lease or the serialized bytes, the fall-back to bytes
when the master refuses the region, decoding the reply and the errors. `MoEClient` and
`AsyncMoEClient` differ only in how they wait for a call.

`MoEClient.embedded("world.yaml")` (and `AsyncMoEClient.embedded`) is the same client over
another transport: an `EmbeddedMaster` (moe_serve.master.embedded) in this process runs the
gates and shared experts and calls the workers itself, one hop per layer instead of two.
The core checks and decodes its calls as it does a master's (same RoutingInfo, same
MoEServeError codes and messages).

`tracer_provider=` (an OpenTelemetry TracerProvider) turns on spans (moe_serve.tracing): each
`infer` is a CLIENT span whose W3C traceparent travels in the call's metadata, so the
master's and the workers' spans join its trace (embedded: an INTERNAL span holding the
in-process master's stages). Without it, no span and no header.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Literal, Self, TypeVar, overload

import grpc
import torch

from moe_serve.config import WorldConfig
from moe_serve.dtypes import DTYPE_NAMES
from moe_serve.errors import MoEError, Reason, reason_of
from moe_serve.layer.gating import Routing
from moe_serve.tracing import (
    EMBEDDED_INFER,
    INFER,
    NO_TRACING,
    TracerProvider,
    Tracing,
    from_provider,
)
from moe_serve.transport.auth import metadata
from moe_serve.transport.calls import message_options, unary_call
from moe_serve.transport.shm import MIN_SHARED_BYTES, SharedMemoryError, SharedRegion
from moe_serve.transport.tls import ClientTLS, aio_channel, channel
from moe_serve.transport.wire import Parsed, itemsize, serialize, tensor_from_pb
from moe_serve.v1 import moe_pb2 as pb
from moe_serve.v1 import moe_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from moe_serve.master.embedded import EmbeddedMaster

__all__ = [
    "AsyncMoEClient",
    "ClientTLS",
    "MoEClient",
    "MoEServeError",
    "RoutingInfo",
    "ServiceInfo",
    "WorkerHealth",
]

log = logging.getLogger(__name__)
C = TypeVar("C")  # a channel, blocking or asyncio

DEFAULT_MAX_MESSAGE_BYTES = (1 << 31) - 1  # gRPC's maximum, as the master's default
# Region offered to a master on the same host; made on the first request of at least
# shm.MIN_SHARED_BYTES (smaller ones gain little, and should not make a client reserve it).
DEFAULT_SHARED_MEMORY_BYTES = 128 << 20
# Each client its own TCP connection: the master binds a client's shared region to the
# connection that attached it, and gRPC would otherwise share one connection among all the
# clients of a process dialling the same address (their regions then compete for one
# connection's cap, shm.PER_PEER_REGIONS).
_OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]
# Reconnect to a (re)started master within a second: gRPC's default backoff (1 s, x1.6 each
# try, up to 120 s) kept a master that had been down 40 s out of rotation for 23 s more
# (benchmarks/chaos.py). As the master's channels to its workers do.
_RECONNECT = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


def _balanced(target: str) -> list[tuple[str, int | str]]:
    """A name that resolves to several masters (`dns:///masters.example:50051`) is balanced
    over all of them by gRPC itself; its default policy would pin every call to the first."""
    return [("grpc.lb_policy_name", "round_robin")] if target.startswith("dns:") else []


# With several masters: one that failed a call is tried last for this long (it is still
# tried when no other is up), so that calls do not keep knocking on a dead master first.
MASTER_DOWN_S = 1.0
# With several masters and every one of them failing a call: the pause before the next
# round, doubled each round up to RETRY_PAUSE_MAX_S, within the call's deadline. A call
# without a deadline gives up after MAX_ROUNDS_WITHOUT_DEADLINE rounds.
RETRY_PAUSE_S = 0.05
RETRY_PAUSE_MAX_S = 1.0
MAX_ROUNDS_WITHOUT_DEADLINE = 3


def master_targets(address: str | Sequence[str]) -> list[str]:
    """The masters a client dials: `address` as a list, or one string with commas
    ("h1:50051,h2:50051"); each a "host:port" or a gRPC target such as
    "dns:///masters.example:50051" (every address the name resolves to).

    ValueError naming `address` when no master is given."""
    parts = address.split(",") if isinstance(address, str) else list(address)
    if not all(isinstance(t, str) for t in parts):
        raise ValueError(f"address: expected host:port strings, got {address!r}")
    targets = [t.strip() for t in parts if t.strip()]
    if not targets:
        raise ValueError(f"address: expected at least one master host:port, got {address!r}")
    return targets


class MoEServeError(Exception):
    """A failed call: `code` is the grpc.StatusCode, `message` the server's explanation,
    `reason` the server's stable moe_serve.errors.Reason value (a str) for the failures a
    caller may act on, e.g. "DRAINING", else None. Match on `reason`, not on `message`."""

    def __init__(self, code: grpc.StatusCode, message: str, reason: str | None = None) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code, self.message, self.reason = code, message, reason


@dataclass(frozen=True)
class RoutingInfo:
    """The gate's decisions for one request."""

    expert_ids: torch.Tensor  # [T, K] int64
    weights: torch.Tensor  # [T, K] float32, 0 for dropped pairs
    scores: torch.Tensor  # [T, E] float32
    dropped_pairs: int
    load_balance_loss: float
    importance_loss: float


@dataclass(frozen=True)
class WorkerHealth:
    """A worker as the master sees it."""

    id: str
    address: str
    healthy: bool
    devices: tuple[str, ...]
    placement: dict[int, tuple[int, ...]]  # layer -> expert ids


@dataclass(frozen=True)
class ServiceInfo:
    """Model dimensions, served layers, routing settings and worker health."""

    hidden_size: int
    expert_ffn_size: int
    num_experts: int
    top_k: int
    expert_kind: str
    activation: str
    dtype: str
    layers: tuple[int, ...]
    scoring: str
    normalize_topk: bool
    capacity_factor: float | None
    max_request_tokens: int
    workers: tuple[WorkerHealth, ...]


def _flat(x: torch.Tensor) -> torch.Tensor:
    if x.dim() == 0:
        raise MoEServeError(
            grpc.StatusCode.INVALID_ARGUMENT, "x: expected shape [..., hidden_size]"
        )
    flat = x.detach().reshape(-1, x.shape[-1])
    if flat.dtype == torch.float64:  # float64 does not travel; the model computes in <= 32 bits
        flat = flat.float()
    return flat


def _request(flat: torch.Tensor, layer: int, return_routing: bool) -> bytes:
    request = pb.InferRequest(layer=layer, return_routing=return_routing)
    try:
        return serialize(request, {"hidden": flat})
    except MoEError as exc:
        raise MoEServeError(grpc.StatusCode.INVALID_ARGUMENT, f"x: {exc}") from None


def _moe_error(exc: MoEError) -> MoEServeError:
    """A domain error of the embedded master as the master's edge would have sent it."""
    return MoEServeError(exc.code, str(exc), None if exc.reason is None else exc.reason.value)


def _local_result(
    x: torch.Tensor, out: torch.Tensor, r: Routing, return_routing: bool
) -> torch.Tensor | tuple[torch.Tensor, RoutingInfo]:
    """y (and its RoutingInfo) of an embedded call, as `_result` builds them from a reply:
    y of x's shape, dtype and device; the routing in host memory, weights in float32."""
    # A batch's outputs are views of one tensor: the caller gets its own copy, as from a
    # reply (and may write into it).
    y = out.to(x.device, x.dtype, copy=True).reshape(x.shape)
    if not return_routing:
        return y
    lb, imp = r.load_balance_loss, r.importance_loss
    return y, RoutingInfo(
        expert_ids=r.expert_ids.to("cpu", torch.int64, copy=True),
        weights=r.weights.to("cpu", torch.float32, copy=True),
        scores=r.scores.to("cpu", torch.float32, copy=True),
        dropped_pairs=int(r.dropped_pairs),
        load_balance_loss=0.0 if lb is None else float(lb),
        importance_loss=0.0 if imp is None else float(imp),
    )


def _result(
    reply: Parsed[pb.InferResponse],
    x: torch.Tensor,
    return_routing: bool,
    shared_output: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, RoutingInfo]:
    out = tensor_from_pb(reply.output, "output") if shared_output is None else shared_output
    # copy=True: the output is a read-only view of the reply bytes or of a block reused later.
    y = out.to(x.device, x.dtype, copy=True).reshape(x.shape)
    if not return_routing:
        return y
    r = reply.routing
    return y, RoutingInfo(
        expert_ids=tensor_from_pb(r.expert_ids, "routing.expert_ids").clone(),
        weights=tensor_from_pb(r.weights, "routing.weights").clone(),
        scores=tensor_from_pb(r.scores, "routing.scores").clone(),
        dropped_pairs=r.dropped_pairs,
        load_balance_loss=r.load_balance_loss,
        importance_loss=r.importance_loss,
    )


def _region_lost(exc: grpc.RpcError) -> bool:
    # The reason, never the message's words. A master older than reasons sends none: its
    # "region not mapped" then surfaces as the error instead of a re-attach.
    return reason_of(exc) == Reason.REGION_NOT_ATTACHED


@dataclass(frozen=True)
class _Lease:
    request: bytes
    blocks: tuple[int, ...]
    sizes: tuple[int, ...]
    output: torch.Tensor  # view of the output block


class _SharedPath:
    """The client's side of shared memory with a master on its host (moe_serve.transport.shm).

    The region is made on the first request large enough to gain from it, on that
    request's device (a sealed memfd, or CUDA IPC memory of a GPU), and offered to the
    master once; a master elsewhere declines and every call carries bytes.

    A sync MoEClient may be shared by threads: the lock guards the region's allocator and
    the state (copies into a leased block run outside it, the block being the call's own).
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.region: SharedRegion | None = None
        self.state = "new" if size > 0 else "off"  # "new" | "attached" | "off"
        self.model_dtype: torch.dtype | None = None
        self._lock = threading.Lock()

    def wants(self, flat: torch.Tensor) -> bool:
        return self.state != "off" and flat.numel() * flat.element_size() >= MIN_SHARED_BYTES

    def offer(self, flat: torch.Tensor, model_dtype: str) -> pb.AttachRegionRequest | None:
        """The region to offer (made now if needed), or None when this host cannot make one."""
        with self._lock:
            self.model_dtype = DTYPE_NAMES[model_dtype]
            if self.region is None:
                try:
                    self.region = SharedRegion(self.size, flat.device)
                except SharedMemoryError as exc:
                    log.info("moe_serve client: no shared memory (%s); sending bytes", exc)
                    self.state = "off"
                    return None
            return self.region.description()

    def attached(self, reply: pb.AttachRegionReply) -> None:
        with self._lock:
            self.state = "attached" if reply.attached else "off"
        if not reply.attached:
            log.info("moe_serve client: master did not map the region (%s)", reply.reason)
            self.close()

    def begin(self, flat: torch.Tensor, layer: int, return_routing: bool) -> _Lease | None:
        """Write `flat` into a block and build the request; None when the region is full."""
        r, dtype = self.region, self.model_dtype
        if self.state != "attached" or r is None or dtype is None:
            return None
        shape = (flat.shape[0], flat.shape[1])
        sizes = (flat.numel() * flat.element_size(), flat.numel() * itemsize(dtype))
        with self._lock:
            blocks = r.lease(*sizes)
        if blocks is None:
            return None
        r.view(blocks[0], flat.dtype, shape).copy_(flat)
        if r.device.type == "cuda":
            # The master reads these bytes from another process once it has the request.
            torch.cuda.current_stream(r.device).synchronize()
        request = pb.InferRequest(
            layer=layer,
            return_routing=return_routing,
            hidden_shared=r.shared(blocks[0], flat.dtype, shape),
            output_shared=r.shared(blocks[1], dtype, shape),
        )
        output = r.view(blocks[1], dtype, shape)
        return _Lease(request.SerializeToString(), blocks, sizes, output)

    def end(self, lease: _Lease, clean: bool) -> None:
        with self._lock:
            if self.region is not None:
                self.region.release(lease.blocks, lease.sizes, clean)

    def lost(self) -> None:
        """The master no longer has the region mapped for this connection (it restarted, or
        the connection is new): offer it again."""
        with self._lock:
            if self.state == "attached":
                self.state = "new"

    def close(self) -> None:
        with self._lock:
            if self.region is not None:
                self.region.close()
                self.region = None


def _info(msg: pb.MasterInfo) -> ServiceInfo:
    return ServiceInfo(
        hidden_size=msg.hidden_size,
        expert_ffn_size=msg.expert_ffn_size,
        num_experts=msg.num_experts,
        top_k=msg.top_k,
        expert_kind=msg.expert_kind,
        activation=msg.activation,
        dtype=msg.dtype,
        layers=tuple(msg.layers),
        scoring=msg.scoring,
        normalize_topk=msg.normalize_topk,
        capacity_factor=msg.capacity_factor or None,
        max_request_tokens=msg.max_request_tokens,
        workers=tuple(
            WorkerHealth(
                id=w.id,
                address=w.address,
                healthy=w.healthy,
                devices=tuple(w.devices),
                placement={p.layer: tuple(p.experts) for p in w.placement},
            )
            for w in msg.workers
        ),
    )


# Phrases of a connection that failed before any call reached a server, as gRPC words them
# (grpcio 1.84/1.85; matched lower-case). Only the hint depends on them: the code and the
# original details are kept whatever gRPC says.
_CONNECT_FAILED = ("failed to connect to all addresses", "connections to all backends failing")
_CLOSED = "socket closed"
_PLAINTEXT_PEER = "wrong_version_number"  # a TLS client's hello answered in plaintext
_HANDSHAKE = ("handshake", "verification check failed", "ssl_error")


def _tls_hint(details: str, address: str, tls: ClientTLS | None) -> str | None:
    """A plain-words cause for a connection that failed during set-up, or None.

    A plaintext client dialling a TLS port hears only "Socket closed", and a TLS client
    dialling a plaintext port a BoringSSL error code: say that TLS may be mismatched, where,
    and which side this client took.
    """
    low = details.lower()
    if not any(words in low for words in _CONNECT_FAILED):
        return None  # a call that reached the server: not a set-up failure
    if tls is None:
        if _CLOSED in low or any(word in low for word in _HANDSHAKE):
            return (
                f"{address} closed the connection: the server may require TLS (this client "
                "dialed plaintext; pass tls=ClientTLS(ca=...))"
            )
        return None
    if _PLAINTEXT_PEER in low:
        return (
            f"TLS handshake with {address} failed: the server may not use TLS (this client "
            "dialed TLS; leave tls unset for a plaintext port)"
        )
    if _CLOSED in low:
        # A server under mutual TLS closes the connection on a client certificate it does
        # not trust, or on none.
        given = "with a" if tls.cert is not None else "without a"
        return (
            f"{address} closed the connection during the TLS handshake: the server may "
            f"require a client certificate signed by its CA (this client dialed TLS {given} "
            "client certificate; pass ClientTLS(cert=..., key=...))"
        )
    if any(word in low for word in _HANDSHAKE):
        return (
            f"TLS handshake with {address} failed (this client dialed TLS): the server's "
            "certificate may not be signed by ClientTLS.ca or may not carry the name dialled "
            "(ClientTLS.server_name)"
        )
    return None


def _retryable(exc: grpc.RpcError) -> bool:
    """Whether another master may answer a call that failed with `exc`: the master was
    unreachable or dropped the call (UNAVAILABLE or CANCELLED from gRPC itself, no reason),
    or it is draining. Not a master's own verdict on the call (INVALID_ARGUMENT,
    RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED, UNAVAILABLE for lack of a live worker: every
    master sees the same workers)."""
    code, reason = exc.code(), reason_of(exc)
    if reason == Reason.DRAINING:
        return True
    return reason is None and code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)


class _Masters:
    """The masters of a client and which one a call tries next: round robin, a master that
    failed a call within MASTER_DOWN_S put last. No I/O; the clients send."""

    def __init__(self, targets: list[str]) -> None:
        self.targets = targets
        # Retry on another master: with several targets, or a name that may resolve to
        # several (gRPC then picks another of its addresses for the retry).
        self.failover = len(targets) > 1 or any(t.startswith("dns:") for t in targets)
        # Read and written from any thread of a sync client without a lock: a lost update
        # only changes which master a call tries first.
        self._next = 0
        self._down_until = [0.0] * len(targets)

    def order(self) -> list[int]:
        """The masters one round of a call tries, in order."""
        n = len(self.targets)
        start, self._next = self._next, (self._next + 1) % n
        rotated = [(start + j) % n for j in range(n)]
        now = time.monotonic()
        return sorted(rotated, key=lambda i: self._down_until[i] > now)  # stable: up first

    def failed(self, index: int) -> None:
        self._down_until[index] = time.monotonic() + MASTER_DOWN_S


class _Attempts:
    """The tries of one call (no I/O): `next()` names the master and the time left for it,
    `failed()` says whether to go on; rounds over every master until the deadline, with a
    growing pause between rounds."""

    def __init__(self, masters: _Masters, timeout: float | None) -> None:
        self._masters, self._timeout = masters, timeout
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self._queue: list[int] = []
        self._rounds = 0
        self._pause = 0.0
        self.last: tuple[int, grpc.RpcError] | None = None

    def next(self) -> tuple[int, float | None, float]:
        """(master index, timeout for its call, seconds to wait before it). Raises the last
        failure (`LookupError` carrying it) when no try is left."""
        if not self._queue:
            if self._rounds and (
                not self._masters.failover
                or (self._deadline is None and self._rounds >= MAX_ROUNDS_WITHOUT_DEADLINE)
            ):
                raise LookupError(self.last)
            self._pause = (
                0.0
                if not self._rounds
                else min(RETRY_PAUSE_S * 2 ** (self._rounds - 1), RETRY_PAUSE_MAX_S)
            )
            self._rounds += 1
            self._queue = self._masters.order()
        pause, self._pause = self._pause, 0.0
        left = None
        if self._deadline is not None:
            left = self._deadline - time.monotonic() - pause
            if left <= 0 and self.last is not None:
                raise LookupError(self.last)
            left = max(left, 0.001)
        return self._queue.pop(0), left, pause

    def again(self, index: int) -> None:
        """Try master `index` once more, next (its shared region was refused: bytes now)."""
        self._queue.insert(0, index)

    def failed(self, index: int, exc: grpc.RpcError) -> bool:
        """Note a failed try; True when another master should get the call."""
        self.last = (index, exc)
        if not (self._masters.failover and _retryable(exc)):
            return False
        self._masters.failed(index)
        log.info(
            "master %s failed a call (%s: %s); trying another",
            self._masters.targets[index],
            exc.code().name,
            exc.details(),
        )
        return True


def _tries(core: _Core, attempts: _Attempts) -> Iterator[tuple[int, float | None]]:
    """Each try of a blocking call: (master index, the timeout of its call), sleeping between
    rounds; MoEServeError of the last failure when no try is left."""
    while True:
        try:
            index, left, pause = attempts.next()
        except LookupError as exc:
            raise core.gave_up(exc) from None
        if pause:
            time.sleep(pause)
        yield index, left


async def _async_tries(core: _Core, attempts: _Attempts) -> AsyncIterator[tuple[int, float | None]]:
    """`_tries` for the asyncio client."""
    while True:
        try:
            index, left, pause = attempts.next()
        except LookupError as exc:
            raise core.gave_up(exc) from None
        if pause:
            await asyncio.sleep(pause)
        yield index, left


class _Core:
    """What both clients share, without I/O: the masters and credentials they dial, the
    shared-memory path and the translation of a failed call into MoEServeError."""

    def __init__(
        self,
        targets: list[str],
        shared_memory_bytes: int,
        token: str | None,
        tls: ClientTLS | None,
        embedded: EmbeddedMaster | None = None,
        tracing: Tracing = NO_TRACING,
    ) -> None:
        self.masters, self.tls = _Masters(targets), tls
        self.address = ",".join(targets)
        self.metadata = metadata(token)
        # A master maps a client's region for the connection that attached it: with calls
        # spread over several masters, tensors go as bytes.
        self.shared = _SharedPath(0 if self.masters.failover else shared_memory_bytes)
        # The embedded transport: calls go to this in-process master instead of a channel.
        self.embedded = embedded
        self.tracing = tracing

    @classmethod
    def dial(
        cls,
        address: str | Sequence[str],
        shared_memory_bytes: int,
        token: str | None,
        tls: ClientTLS | None,
        tracer_provider: TracerProvider | None,
    ) -> _Core:
        """The core of a client of the masters at `address` (master_targets)."""
        tracing = NO_TRACING if tracer_provider is None else from_provider(tracer_provider)
        targets = master_targets(address)
        return cls(targets, shared_memory_bytes, token, tls, tracing=tracing)

    def channels(self, make: Callable[..., C], max_message_bytes: int) -> list[C]:
        """One channel per master, made by `make` (transport.tls.channel or aio_channel)."""
        options: list[tuple[str, int | str]] = [
            *message_options(max_message_bytes),
            *_OWN_CONNECTION,
            *_RECONNECT,
        ]
        return [make(t, self.tls, options + _balanced(t)) for t in self.masters.targets]

    @contextlib.contextmanager
    def traced(self, x: torch.Tensor, layer: int) -> Iterator[tuple[tuple[str, str], ...] | None]:
        """The span of one infer (tracing on only), current within the block, which gets
        the call's metadata: the token's, plus the span's traceparent to a master."""
        tokens = x.numel() // x.shape[-1] if x.dim() > 0 and x.shape[-1] else 0
        attributes: dict[str, str | int] = {"moe_serve.layer": layer, "moe_serve.tokens": tokens}
        if self.embedded is not None:
            with self.tracing.span(EMBEDDED_INFER, attributes):
                yield self.metadata
            return
        attributes["server.address"] = self.address
        with self.tracing.client(INFER, self.metadata, attributes) as md:
            yield md

    @classmethod
    def start_embedded(
        cls,
        config: WorldConfig | str | Path,
        start_timeout: float,
        tracer_provider: TracerProvider | None = None,
    ) -> _Core:
        """The core of an embedded client: its master started, ready (MoEServeError else)."""
        # Imported here: a thin client of a remote master loads none of the master's code.
        from moe_serve.master.embedded import EmbeddedMaster

        try:
            master = EmbeddedMaster(
                config, ready_timeout_s=start_timeout, tracer_provider=tracer_provider
            )
        except MoEError as exc:
            raise _moe_error(exc) from None
        return cls(["embedded"], 0, None, None, embedded=master, tracing=master.tracing)

    def submit(
        self, x: torch.Tensor, layer: int, return_routing: bool, timeout: float | None
    ) -> concurrent.futures.Future[tuple[torch.Tensor, Routing]]:
        """Check x and queue it on the embedded master (MoEServeError for a bad call)."""
        if self.embedded is None:
            raise RuntimeError("not an embedded client")
        try:
            return self.embedded.submit(_flat(x), layer, return_routing, timeout)
        except MoEError as exc:
            raise _moe_error(exc) from None

    @staticmethod
    def local_error(exc: BaseException) -> MoEServeError:
        """The MoEServeError of a failed embedded call: its MoEError's code and message, or
        CANCELLED when the client was closed during the call."""
        if isinstance(exc, MoEError):
            return _moe_error(exc)
        return MoEServeError(
            grpc.StatusCode.CANCELLED, "the embedded master was closed during the call"
        )

    @staticmethod
    def local_result(
        x: torch.Tensor, outcome: tuple[torch.Tensor, Routing], return_routing: bool
    ) -> torch.Tensor | tuple[torch.Tensor, RoutingInfo]:
        """y (and its RoutingInfo) of a finished embedded call."""
        return _local_result(x, *outcome, return_routing)

    def local_info(self) -> ServiceInfo:
        if self.embedded is None:
            raise RuntimeError("not an embedded client")
        return _info(self.embedded.info())

    def call(self, x: torch.Tensor, layer: int, return_routing: bool) -> _InferCall:
        """One Infer call's requests and result (checks x now)."""
        return _InferCall(self, x, layer, return_routing)

    def attempts(self, timeout: float | None) -> _Attempts:
        """The tries of one call over the masters, within `timeout`."""
        return _Attempts(self.masters, timeout)

    def error(self, exc: grpc.RpcError, index: int = 0) -> MoEServeError:
        """The MoEServeError of a call that failed at master `index`: its code, its message
        (with the TLS hint for a connection refused during set-up; with several masters,
        which one answered last) and its reason."""
        code, details, reason = exc.code(), exc.details() or "", reason_of(exc)
        target = self.masters.targets[index]
        if code == grpc.StatusCode.UNAVAILABLE and reason is None:
            hint = _tls_hint(details, target, self.tls)
            if hint is not None:
                details = f"{hint}. gRPC: {details}"
        if self.masters.failover and _retryable(exc):
            n = len(self.masters.targets)
            details = f"no master answered ({n} tried; last, {target}: {details})"
        return MoEServeError(code, details, reason)

    def gave_up(self, exc: LookupError) -> MoEServeError:
        """The MoEServeError of a call whose tries ran out (`_Attempts.next`)."""
        index, last = exc.args[0]
        return self.error(last, index)


class _InferCall:
    """One Infer call without I/O. The client sends `request()`; on a reply it returns
    `result(reply)`; on a failure it calls `refused(exc)`, which raises MoEServeError unless
    the master refused the shared region, in which case the next `request()` is bytes.
    At most two requests: shared memory once, then bytes. `close()` gives back a block still
    leased (the call was cancelled or interrupted).
    """

    def __init__(self, core: _Core, x: torch.Tensor, layer: int, return_routing: bool) -> None:
        self._core, self._x, self._layer, self._routing = core, x, layer, return_routing
        self.flat = _flat(x)
        # Whether this call goes through the region (attaching it first when new); it is
        # tried once, the bytes request being the fall-back.
        self.offers_region = core.shared.wants(self.flat)
        self._tried_region = False
        self._lease: _Lease | None = None

    def request(self) -> bytes:
        """The serialized InferRequest: x in a leased block of the region on the first try
        when the region is attached and has room; else x's bytes (wire.serialize, one copy)."""
        if self.offers_region and not self._tried_region:
            self._tried_region = True
            self._lease = self._core.shared.begin(self.flat, self._layer, self._routing)
            if self._lease is not None:
                return self._lease.request
        return _request(self.flat, self._layer, self._routing)

    def result(
        self, reply: Parsed[pb.InferResponse]
    ) -> torch.Tensor | tuple[torch.Tensor, RoutingInfo]:
        """y (and its RoutingInfo when asked for) from the master's reply."""
        lease, self._lease = self._lease, None
        try:
            output = None if lease is None else lease.output
            return _result(reply, self._x, self._routing, output)
        finally:
            if lease is not None:
                self._core.shared.end(lease, clean=True)

    def refused(self, exc: grpc.RpcError, index: int = 0) -> None:
        """Raise `exc` (from master `index`) as MoEServeError, unless it refused this call's
        shared region (Reason.REGION_NOT_ATTACHED): then the region is offered again on a
        later call and this one goes on as bytes."""
        lease, self._lease = self._lease, None
        if lease is None:
            raise self._core.error(exc, index) from None
        lost = _region_lost(exc)
        if lost:
            self._core.shared.lost()
        # A refusal comes before the master touches the blocks; any other failure may leave
        # it writing into them (they are quarantined).
        self._core.shared.end(lease, clean=lost)
        if not lost:
            raise self._core.error(exc, index) from None

    def close(self) -> None:
        """Give back a block still leased: the call ended without a reply or a status."""
        lease, self._lease = self._lease, None
        if lease is not None:
            self._core.shared.end(lease, clean=False)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class MoEClient:
    """Blocking client of a moe_serve master; use as a context manager or call close()."""

    def __init__(
        self,
        address: str | Sequence[str],
        timeout: float | None = 30.0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        shared_memory_bytes: int = DEFAULT_SHARED_MEMORY_BYTES,
        token: str | None = None,
        tls: ClientTLS | None = None,
        tracer_provider: TracerProvider | None = None,
    ) -> None:
        """`address`: one master "host:port", or several (a list, or "h1:50051,h2:50051",
        or a "dns:///name:port" target resolving to several): calls are spread over them,
        and a call that finds one unavailable (or draining, or dropped mid-call) is sent to
        another within `timeout`. Shared memory is used with one master only."""
        self.timeout = timeout
        self._core = _Core.dial(address, shared_memory_bytes, token, tls, tracer_provider)
        self._channels = self._core.channels(channel, max_message_bytes)
        self._stubs = [pb_grpc.MoEMasterStub(c) for c in self._channels]
        self._infers = [
            unary_call(c, "MoEMaster", "Infer", pb.InferResponse) for c in self._channels
        ]
        self._attaching = threading.Lock()  # one offer, however many threads are waiting

    @classmethod
    def embedded(
        cls,
        config: WorldConfig | str | Path,
        *,
        timeout: float | None = 30.0,
        start_timeout: float = 30.0,
        tracer_provider: TracerProvider | None = None,
    ) -> MoEClient:
        """A client whose master runs in this process (moe_serve.master.embedded): the gates
        and shared experts here, tokens straight to the workers of `config` (a world YAML
        path or a WorldConfig), one hop per layer. Same infer / info / close.

        Returns once every expert has a live replica: MoEServeError UNAVAILABLE naming the
        experts and workers down after `start_timeout` s. A bad config, an unset worker
        token variable or an unreadable TLS file raise moe_serve.errors.ConfigError.
        Spans go to `tracer_provider` when given, else as the config's `tracing` says."""
        self = cls.__new__(cls)
        self.timeout = timeout
        self._core = _Core.start_embedded(config, start_timeout, tracer_provider)
        return self

    @property
    def _shared(self) -> _SharedPath:  # for tests that look at the region
        return self._core.shared

    @overload
    def infer(
        self,
        x: torch.Tensor,
        layer: int = 0,
        return_routing: Literal[False] = False,
        timeout: float | None = None,
    ) -> torch.Tensor: ...

    @overload
    def infer(
        self,
        x: torch.Tensor,
        layer: int = 0,
        *,
        return_routing: Literal[True],
        timeout: float | None = None,
    ) -> tuple[torch.Tensor, RoutingInfo]: ...

    @overload
    def infer(
        self,
        x: torch.Tensor,
        layer: int = 0,
        return_routing: bool = False,
        timeout: float | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, RoutingInfo]: ...

    def infer(
        self,
        x: torch.Tensor,
        layer: int = 0,
        return_routing: bool = False,
        timeout: float | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, RoutingInfo]:
        """Run MoE layer `layer` on x [..., H]: y of x's shape, dtype and device, and with
        `return_routing=True` the gate's RoutingInfo too."""
        timeout = timeout or self.timeout
        if not self._core.tracing.on:
            return self._run(x, layer, return_routing, timeout, self._core.metadata)
        with self._core.traced(x, layer) as md:
            return self._run(x, layer, return_routing, timeout, md)

    def _run(
        self,
        x: torch.Tensor,
        layer: int,
        return_routing: bool,
        timeout: float | None,
        md: tuple[tuple[str, str], ...] | None,
    ) -> torch.Tensor | tuple[torch.Tensor, RoutingInfo]:
        """One infer, its call sent with metadata `md`."""
        if self._core.embedded is not None:
            done = self._core.submit(x, layer, return_routing, timeout)
            try:
                outcome = done.result()
            except (MoEError, concurrent.futures.CancelledError) as exc:
                raise self._core.local_error(exc) from None
            return self._core.local_result(x, outcome, return_routing)
        with self._core.call(x, layer, return_routing) as call:
            if call.offers_region:
                self._attach(call.flat, timeout)
            attempts = self._core.attempts(timeout)
            for i, left in _tries(self._core, attempts):
                try:
                    reply = self._infers[i](call.request(), timeout=left, metadata=md)
                except grpc.RpcError as exc:
                    if attempts.failed(i, exc):
                        continue  # another master
                    call.refused(exc, i)  # raises, unless the region was refused:
                    attempts.again(i)  # then the same master, as bytes
                else:
                    return call.result(reply)
        raise AssertionError("unreachable: _tries ends by raising")

    def _attach(self, flat: torch.Tensor, timeout: float | None) -> None:
        with self._attaching:
            if self._core.shared.state != "new":
                return
            offer = self._core.shared.offer(flat, self.info(timeout).dtype)
            if offer is None:
                return
            try:
                reply = self._stubs[0].AttachRegion(
                    offer, timeout=timeout, metadata=self._core.metadata
                )
            except grpc.RpcError as exc:
                raise self._core.error(exc) from None
            self._core.shared.attached(reply)

    def info(self, timeout: float | None = None) -> ServiceInfo:
        """Model dims, layers, placement and worker health (from the first master that
        answers)."""
        if self._core.embedded is not None:
            return self._core.local_info()
        attempts = self._core.attempts(timeout or self.timeout)
        for i, left in _tries(self._core, attempts):
            try:
                reply = self._stubs[i].GetInfo(
                    pb.GetInfoRequest(), timeout=left, metadata=self._core.metadata
                )
            except grpc.RpcError as exc:
                if attempts.failed(i, exc):
                    continue
                raise self._core.error(exc, i) from None
            return _info(reply)
        raise AssertionError("unreachable: _tries ends by raising")

    def close(self) -> None:
        """Close the channels and the shared region (embedded: stop the in-process master,
        its channels to the workers and its thread). Idempotent."""
        if self._core.embedded is not None:
            self._core.embedded.close()
            return
        for c in self._channels:
            c.close()
        self._core.shared.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class AsyncMoEClient:
    """asyncio client of a moe_serve master; use with `async with`."""

    def __init__(
        self,
        address: str | Sequence[str],
        timeout: float | None = 30.0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        shared_memory_bytes: int = DEFAULT_SHARED_MEMORY_BYTES,
        token: str | None = None,
        tls: ClientTLS | None = None,
        tracer_provider: TracerProvider | None = None,
    ) -> None:
        """As MoEClient's: one master or several, a call retried on another within
        `timeout` when one is unavailable."""
        self.timeout = timeout
        self._core = _Core.dial(address, shared_memory_bytes, token, tls, tracer_provider)
        self._channels = self._core.channels(aio_channel, max_message_bytes)
        self._stubs = [pb_grpc.MoEMasterStub(c) for c in self._channels]
        self._infers = [
            unary_call(c, "MoEMaster", "Infer", pb.InferResponse) for c in self._channels
        ]
        self._attaching = asyncio.Lock()  # one offer, however many calls are waiting

    @classmethod
    async def embedded(
        cls,
        config: WorldConfig | str | Path,
        *,
        timeout: float | None = 30.0,
        start_timeout: float = 30.0,
        tracer_provider: TracerProvider | None = None,
    ) -> AsyncMoEClient:
        """MoEClient.embedded for asyncio: `client = await AsyncMoEClient.embedded(cfg)`.
        The in-process master runs on a loop of its own thread; this loop only awaits it."""
        self = cls.__new__(cls)
        self.timeout = timeout
        # Loading the gates blocks: off this loop.
        self._core = await asyncio.to_thread(
            _Core.start_embedded, config, start_timeout, tracer_provider
        )
        return self

    @property
    def _shared(self) -> _SharedPath:  # for tests that look at the region
        return self._core.shared

    @overload
    async def infer(
        self,
        x: torch.Tensor,
        layer: int = 0,
        return_routing: Literal[False] = False,
        timeout: float | None = None,
    ) -> torch.Tensor: ...

    @overload
    async def infer(
        self,
        x: torch.Tensor,
        layer: int = 0,
        *,
        return_routing: Literal[True],
        timeout: float | None = None,
    ) -> tuple[torch.Tensor, RoutingInfo]: ...

    @overload
    async def infer(
        self,
        x: torch.Tensor,
        layer: int = 0,
        return_routing: bool = False,
        timeout: float | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, RoutingInfo]: ...

    async def infer(
        self,
        x: torch.Tensor,
        layer: int = 0,
        return_routing: bool = False,
        timeout: float | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, RoutingInfo]:
        """Run MoE layer `layer` on x [..., H]: y of x's shape, dtype and device, and with
        `return_routing=True` the gate's RoutingInfo too."""
        timeout = timeout or self.timeout
        if not self._core.tracing.on:
            return await self._run(x, layer, return_routing, timeout, self._core.metadata)
        with self._core.traced(x, layer) as md:
            return await self._run(x, layer, return_routing, timeout, md)

    async def _run(
        self,
        x: torch.Tensor,
        layer: int,
        return_routing: bool,
        timeout: float | None,
        md: tuple[tuple[str, str], ...] | None,
    ) -> torch.Tensor | tuple[torch.Tensor, RoutingInfo]:
        """One infer, its call sent with metadata `md`."""
        if self._core.embedded is not None:
            done = self._core.submit(x, layer, return_routing, timeout)
            try:
                outcome = await asyncio.wrap_future(done)  # cancelling this cancels the call
            except MoEError as exc:
                raise self._core.local_error(exc) from None
            except asyncio.CancelledError as exc:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise  # this task was cancelled, not the call
                raise self._core.local_error(exc) from None
            return self._core.local_result(x, outcome, return_routing)
        with self._core.call(x, layer, return_routing) as call:
            if call.offers_region:
                await self._attach(call.flat, timeout)
            attempts = self._core.attempts(timeout)
            async for i, left in _async_tries(self._core, attempts):
                try:
                    reply = await self._infers[i](call.request(), timeout=left, metadata=md)
                except grpc.RpcError as exc:
                    if attempts.failed(i, exc):
                        continue  # another master
                    call.refused(exc, i)  # raises, unless the region was refused:
                    attempts.again(i)  # then the same master, as bytes
                else:
                    return call.result(reply)
        raise AssertionError("unreachable: _async_tries ends by raising")

    async def _attach(self, flat: torch.Tensor, timeout: float | None) -> None:
        async with self._attaching:
            if self._core.shared.state != "new":
                return
            offer = self._core.shared.offer(flat, (await self.info(timeout)).dtype)
            if offer is None:
                return
            try:
                reply = await self._stubs[0].AttachRegion(
                    offer, timeout=timeout, metadata=self._core.metadata
                )
            except grpc.RpcError as exc:
                raise self._core.error(exc) from None
            self._core.shared.attached(reply)

    async def info(self, timeout: float | None = None) -> ServiceInfo:
        """Model dims, layers, placement and worker health (from the first master that
        answers)."""
        if self._core.embedded is not None:
            return self._core.local_info()
        attempts = self._core.attempts(timeout or self.timeout)
        async for i, left in _async_tries(self._core, attempts):
            try:
                reply = await self._stubs[i].GetInfo(
                    pb.GetInfoRequest(), timeout=left, metadata=self._core.metadata
                )
            except grpc.RpcError as exc:
                if attempts.failed(i, exc):
                    continue
                raise self._core.error(exc, i) from None
            return _info(reply)
        raise AssertionError("unreachable: _async_tries ends by raising")

    async def close(self) -> None:
        """Close the channels and the shared region (embedded: stop the in-process master,
        its channels to the workers and its thread). Idempotent."""
        if self._core.embedded is not None:
            await asyncio.to_thread(self._core.embedded.close)
            return
        for c in self._channels:
            await c.close()
        self._core.shared.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()
