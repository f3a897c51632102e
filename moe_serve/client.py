"""The client SDK: send hidden states to the master, get the MoE layer's output back.

    with MoEClient("127.0.0.1:50051") as client:
        y = client.infer(x, layer=0)                      # same shape, dtype, device as x
        y, routing = client.infer(x, layer=0, return_routing=True)

Every failure raises `MoEServeError` with the gRPC status `code` and the server's message.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

import grpc
import torch

from moe_serve.errors import MoEError
from moe_serve.rpc import message_options, unary_call
from moe_serve.v1 import moe_pb2 as pb
from moe_serve.v1 import moe_pb2_grpc as pb_grpc
from moe_serve.wire import Parsed, serialize, tensor_from_pb

DEFAULT_MAX_MESSAGE_BYTES = (1 << 31) - 1  # gRPC's maximum, as the master's default


class MoEServeError(Exception):
    """A failed call: `code` is the grpc.StatusCode, `message` the server's explanation."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code, self.message = code, message


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


def _request(x: torch.Tensor, layer: int, return_routing: bool) -> bytes:
    if x.dim() == 0:
        raise MoEServeError(
            grpc.StatusCode.INVALID_ARGUMENT, "x: expected shape [..., hidden_size]"
        )
    flat = x.detach().reshape(-1, x.shape[-1])
    if flat.dtype == torch.float64:  # float64 does not travel; the model computes in <= 32 bits
        flat = flat.float()
    request = pb.InferRequest(layer=layer, return_routing=return_routing)
    try:
        return serialize(request, {"hidden": flat})
    except MoEError as exc:
        raise MoEServeError(grpc.StatusCode.INVALID_ARGUMENT, f"x: {exc}") from None


def _result(
    reply: Parsed[pb.InferResponse], x: torch.Tensor, return_routing: bool
) -> torch.Tensor | tuple[torch.Tensor, RoutingInfo]:
    # copy=True: the decoded tensor is a read-only view of the reply bytes.
    y = tensor_from_pb(reply.output, "output").to(x.device, x.dtype, copy=True).reshape(x.shape)
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
    return MoEServeError(exc.code(), exc.details() or "")


class MoEClient:
    """Blocking client of a moe_serve master; use as a context manager or call close()."""

    def __init__(
        self,
        address: str,
        timeout: float | None = 30.0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        self.timeout = timeout
        self._channel = grpc.insecure_channel(address, options=message_options(max_message_bytes))
        self._stub = pb_grpc.MoEMasterStub(self._channel)
        self._infer = unary_call(self._channel, "MoEMaster", "Infer", pb.InferResponse)

    def infer(
        self,
        x: torch.Tensor,
        layer: int = 0,
        return_routing: bool = False,
        timeout: float | None = None,
    ) -> Any:
        """Run MoE layer `layer` on x [..., H]; returns y (and RoutingInfo if asked)."""
        request = _request(x, layer, return_routing)
        try:
            reply = self._infer(request, timeout=timeout or self.timeout)
        except grpc.RpcError as exc:
            raise _error(exc) from None
        return _result(reply, x, return_routing)

    def info(self, timeout: float | None = None) -> ServiceInfo:
        """Model dims, layers, placement and worker health."""
        try:
            return _info(self._stub.GetInfo(pb.GetInfoRequest(), timeout=timeout or self.timeout))
        except grpc.RpcError as exc:
            raise _error(exc) from None

    def close(self) -> None:
        """Close the channel."""
        self._channel.close()

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
    ) -> None:
        self.timeout = timeout
        self._channel = grpc.aio.insecure_channel(
            address, options=message_options(max_message_bytes)
        )
        self._stub = pb_grpc.MoEMasterStub(self._channel)
        self._infer = unary_call(self._channel, "MoEMaster", "Infer", pb.InferResponse)

    async def infer(
        self,
        x: torch.Tensor,
        layer: int = 0,
        return_routing: bool = False,
        timeout: float | None = None,
    ) -> Any:
        """Run MoE layer `layer` on x [..., H]; returns y (and RoutingInfo if asked)."""
        request = _request(x, layer, return_routing)
        try:
            reply = await self._infer(request, timeout=timeout or self.timeout)
        except grpc.aio.AioRpcError as exc:
            raise _error(exc) from None
        return _result(reply, x, return_routing)

    async def info(self, timeout: float | None = None) -> ServiceInfo:
        """Model dims, layers, placement and worker health."""
        try:
            reply = await self._stub.GetInfo(pb.GetInfoRequest(), timeout=timeout or self.timeout)
        except grpc.aio.AioRpcError as exc:
            raise _error(exc) from None
        return _info(reply)

    async def close(self) -> None:
        """Close the channel."""
        await self._channel.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()
