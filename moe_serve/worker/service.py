"""The ExpertWorker gRPC servicer: decode -> validate -> batch -> encode."""

from __future__ import annotations

import grpc
import torch

from moe_serve.errors import InvalidRequestError, MoEError
from moe_serve.rpc import error_boundary
from moe_serve.v1 import moe_pb2 as pb
from moe_serve.v1 import moe_pb2_grpc as pb_grpc
from moe_serve.wire import dtype_name, serialize, tensor_from_pb
from moe_serve.worker.batcher import DynamicBatcher
from moe_serve.worker.engine import WorkerEngine

_INT32 = frozenset({torch.int32})
_FLOAT32 = frozenset({torch.float32})


class WorkerService(pb_grpc.ExpertWorkerServicer):
    """Serves Forward through the dynamic batcher, and GetInfo."""

    def __init__(self, engine: WorkerEngine, batcher: DynamicBatcher) -> None:
        self.engine, self.batcher = engine, batcher
        self.metrics = batcher.metrics

    @error_boundary
    async def Forward(self, request: pb.ForwardRequest, context: grpc.aio.ServicerContext) -> bytes:
        try:
            out = await self.batcher.submit(request.layer, *self._decode(request))
        except MoEError as exc:
            self.metrics.forward_requests.labels(exc.code.name).inc()
            raise
        self.metrics.forward_requests.labels("OK").inc()
        return serialize(pb.ForwardResponse(), {"output": out})

    def _decode(self, request: pb.ForwardRequest) -> tuple[torch.Tensor, ...]:
        e = self.engine
        if request.layer not in e.stacks:
            raise InvalidRequestError(
                "layer", f"{request.layer} is not a MoE layer; served: {sorted(e.stacks)}"
            )
        hidden = tensor_from_pb(request.hidden, "hidden", dtypes=frozenset({e.dtype}), rank=2)
        if hidden.shape[1] != e.model.hidden_size:
            raise InvalidRequestError(
                "hidden.shape[1]", f"{hidden.shape[1]} != hidden_size={e.model.hidden_size}"
            )
        token = tensor_from_pb(request.pair_token, "pair_token", dtypes=_INT32, rank=1)
        expert = tensor_from_pb(request.pair_expert, "pair_expert", dtypes=_INT32, rank=1)
        weight = tensor_from_pb(request.pair_weight, "pair_weight", dtypes=_FLOAT32, rank=1)
        e.validate(request.layer, hidden.shape[0], token, expert, weight)
        return hidden, token, expert, weight

    @error_boundary
    async def GetInfo(
        self, request: pb.GetInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.WorkerInfo:
        e = self.engine
        return pb.WorkerInfo(
            id=e.worker.id,
            devices=list(e.worker.devices),
            placement=[pb.LayerExperts(layer=la, experts=e.held(la)) for la in sorted(e.stacks)],
            hidden_size=e.model.hidden_size,
            dtype=dtype_name(e.dtype),
        )
