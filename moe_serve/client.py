"""The client SDK: send hidden states to the master, get the MoE layer's output back.

    with MoEClient("127.0.0.1:50051") as client:
        y = client.infer(x, layer=0)                      # same shape, dtype, device as x
        y, routing = client.infer(x, layer=0, return_routing=True)

Every failure raises `MoEServeError` with the gRPC status `code`, the server's message and,
where the server gave one, its `reason` (moe_serve.errors.Reason).
A master with TLS on is dialled with `MoEClient(address, tls=ClientTLS(ca="ca.pem"))`
(plus `cert=`/`key=` under mutual TLS) and, with a bearer token, `token=...`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

import grpc
import torch

from moe_serve.dtypes import DTYPE_NAMES
from moe_serve.errors import MoEError, Reason, reason_of
from moe_serve.transport.auth import metadata
from moe_serve.transport.calls import message_options, unary_call
from moe_serve.transport.shm import MIN_SHARED_BYTES, SharedMemoryError, SharedRegion
from moe_serve.transport.tls import ClientTLS, aio_channel, channel
from moe_serve.transport.wire import Parsed, itemsize, serialize, tensor_from_pb
from moe_serve.v1 import moe_pb2 as pb
from moe_serve.v1 import moe_pb2_grpc as pb_grpc

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

DEFAULT_MAX_MESSAGE_BYTES = (1 << 31) - 1  # gRPC's maximum, as the master's default
# Region offered to a master on the same host; made on the first request of at least
# shm.MIN_SHARED_BYTES (smaller ones gain little, and should not make a client reserve it).
DEFAULT_SHARED_MEMORY_BYTES = 128 << 20
# Each client its own TCP connection: the master binds a client's shared region to the
# connection that attached it, and gRPC would otherwise share one connection among all the
# clients of a process dialling the same address (their regions then compete for one
# connection's cap, shm.PER_PEER_REGIONS).
_OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]


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


def _error(exc: grpc.RpcError) -> MoEServeError:
    return MoEServeError(exc.code(), exc.details() or "", reason_of(exc))


class MoEClient:
    """Blocking client of a moe_serve master; use as a context manager or call close()."""

    def __init__(
        self,
        address: str,
        timeout: float | None = 30.0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        shared_memory_bytes: int = DEFAULT_SHARED_MEMORY_BYTES,
        token: str | None = None,
        tls: ClientTLS | None = None,
    ) -> None:
        self.timeout = timeout
        self._md = metadata(token)
        self._channel = channel(address, tls, message_options(max_message_bytes) + _OWN_CONNECTION)
        self._stub = pb_grpc.MoEMasterStub(self._channel)
        self._infer = unary_call(self._channel, "MoEMaster", "Infer", pb.InferResponse)
        self._shared = _SharedPath(shared_memory_bytes)
        self._attaching = threading.Lock()  # one offer, however many threads are waiting

    def infer(
        self,
        x: torch.Tensor,
        layer: int = 0,
        return_routing: bool = False,
        timeout: float | None = None,
    ) -> Any:
        """Run MoE layer `layer` on x [..., H]; returns y (and RoutingInfo if asked)."""
        flat, timeout = _flat(x), timeout or self.timeout
        if self._shared.wants(flat):
            with self._attaching:
                if self._shared.state == "new":
                    self._attach(flat, timeout)
            lease = self._shared.begin(flat, layer, return_routing)
            if lease is not None:
                clean = False
                try:
                    reply = self._infer(lease.request, timeout=timeout, metadata=self._md)
                    clean = True
                    return _result(reply, x, return_routing, lease.output)
                except grpc.RpcError as exc:
                    if not _region_lost(exc):
                        raise _error(exc) from None
                    clean = True  # refused before the master touched the blocks
                    self._shared.lost()
                finally:
                    self._shared.end(lease, clean)
        try:
            reply = self._infer(
                _request(flat, layer, return_routing), timeout=timeout, metadata=self._md
            )
        except grpc.RpcError as exc:
            raise _error(exc) from None
        return _result(reply, x, return_routing)

    def _attach(self, flat: torch.Tensor, timeout: float | None) -> None:
        offer = self._shared.offer(flat, self.info(timeout).dtype)
        if offer is not None:
            try:
                self._shared.attached(
                    self._stub.AttachRegion(offer, timeout=timeout, metadata=self._md)
                )
            except grpc.RpcError as exc:
                raise _error(exc) from None

    def info(self, timeout: float | None = None) -> ServiceInfo:
        """Model dims, layers, placement and worker health."""
        try:
            return _info(
                self._stub.GetInfo(
                    pb.GetInfoRequest(), timeout=timeout or self.timeout, metadata=self._md
                )
            )
        except grpc.RpcError as exc:
            raise _error(exc) from None

    def close(self) -> None:
        """Close the channel and the shared region."""
        self._channel.close()
        self._shared.close()

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
        address: str,
        timeout: float | None = 30.0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        shared_memory_bytes: int = DEFAULT_SHARED_MEMORY_BYTES,
        token: str | None = None,
        tls: ClientTLS | None = None,
    ) -> None:
        self.timeout = timeout
        self._md = metadata(token)
        self._channel = aio_channel(
            address, tls, message_options(max_message_bytes) + _OWN_CONNECTION
        )
        self._stub = pb_grpc.MoEMasterStub(self._channel)
        self._infer = unary_call(self._channel, "MoEMaster", "Infer", pb.InferResponse)
        self._shared = _SharedPath(shared_memory_bytes)
        self._attaching = asyncio.Lock()

    async def infer(
        self,
        x: torch.Tensor,
        layer: int = 0,
        return_routing: bool = False,
        timeout: float | None = None,
    ) -> Any:
        """Run MoE layer `layer` on x [..., H]; returns y (and RoutingInfo if asked)."""
        flat, timeout = _flat(x), timeout or self.timeout
        if self._shared.wants(flat):
            async with self._attaching:  # one offer, however many calls are waiting
                if self._shared.state == "new":
                    await self._attach(flat, timeout)
            lease = self._shared.begin(flat, layer, return_routing)
            if lease is not None:
                clean = False
                try:
                    reply = await self._infer(lease.request, timeout=timeout, metadata=self._md)
                    clean = True
                    return _result(reply, x, return_routing, lease.output)
                except grpc.aio.AioRpcError as exc:
                    if not _region_lost(exc):
                        raise _error(exc) from None
                    clean = True  # refused before the master touched the blocks
                    self._shared.lost()
                finally:
                    self._shared.end(lease, clean)
        try:
            reply = await self._infer(
                _request(flat, layer, return_routing), timeout=timeout, metadata=self._md
            )
        except grpc.aio.AioRpcError as exc:
            raise _error(exc) from None
        return _result(reply, x, return_routing)

    async def _attach(self, flat: torch.Tensor, timeout: float | None) -> None:
        offer = self._shared.offer(flat, (await self.info(timeout)).dtype)
        if offer is not None:
            try:
                self._shared.attached(
                    await self._stub.AttachRegion(offer, timeout=timeout, metadata=self._md)
                )
            except grpc.aio.AioRpcError as exc:
                raise _error(exc) from None

    async def info(self, timeout: float | None = None) -> ServiceInfo:
        """Model dims, layers, placement and worker health."""
        try:
            reply = await self._stub.GetInfo(
                pb.GetInfoRequest(), timeout=timeout or self.timeout, metadata=self._md
            )
        except grpc.aio.AioRpcError as exc:
            raise _error(exc) from None
        return _info(reply)

    async def close(self) -> None:
        """Close the channel and the shared region."""
        await self._channel.close()
        self._shared.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()
