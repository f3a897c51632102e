"""The ExpertWorker gRPC servicer: decode -> validate -> batch -> encode."""

from __future__ import annotations

import logging

import grpc
import torch

from moe_serve.errors import InvalidRequestError, MoEError, RestartNeededError
from moe_serve.metrics import Children
from moe_serve.tracing import FORWARD
from moe_serve.transport import fp8
from moe_serve.transport.server import error_boundary
from moe_serve.transport.shm import RegionTable, SharedMemoryError
from moe_serve.transport.wire import dtype_name, serialize, tensor_from_pb
from moe_serve.v1 import moe_pb2 as pb
from moe_serve.v1 import moe_pb2_grpc as pb_grpc
from moe_serve.worker.batcher import DynamicBatcher
from moe_serve.worker.engine import WorkerEngine
from moe_serve.worker.reload import Reloader

log = logging.getLogger(__name__)

_INT32 = frozenset({torch.int32})
_FLOAT32 = frozenset({torch.float32})


class WorkerService(pb_grpc.ExpertWorkerServicer):
    """Serves Forward through the dynamic batcher, AttachRegion, GetInfo and Reload (through
    `reloader`, which create_worker sets). With the batcher's tracing on, each Forward is a
    SERVER span (the master's call its parent) with decode, queue and encode spans."""

    def __init__(self, engine: WorkerEngine, batcher: DynamicBatcher) -> None:
        self.engine, self.batcher = engine, batcher
        self.metrics = batcher.metrics
        self.tracing = batcher.tracing
        self._requests = Children(self.metrics.forward_requests)  # one child per status code
        # Masters' regions, each bound to the connection that attached it: another caller's
        # AttachRegion makes its own binding and never replaces a master's.
        self.regions = RegionTable()
        self.reloader: Reloader | None = None

    @error_boundary
    async def Forward(
        self, request: pb.ForwardRequest, context: grpc.aio.ServicerContext
    ) -> bytes | pb.ForwardResponse:
        if not self.tracing.on:
            return await self._forward(request, context)
        metadata = context.invocation_metadata()
        with self.tracing.server(FORWARD, metadata, {"moe_serve.layer": request.layer}):
            return await self._forward(request, context)

    async def _forward(
        self, request: pb.ForwardRequest, context: grpc.aio.ServicerContext
    ) -> bytes | pb.ForwardResponse:
        try:
            with self.tracing.span("decode"):
                peer = context.peer()
                inputs = self._decode(request, peer)
                target = self._output_view(request, peer)
                hidden, token, expert, weight = inputs
                if request.pair_outputs:
                    rows, what = token.shape[0], "one row per pair"
                else:
                    rows, what = hidden.shape[0], "as hidden"
                expected = [rows, hidden.shape[1]]
                if target is not None and list(target.shape) != expected:
                    raise InvalidRequestError(
                        "output_shared.shape", f"{list(target.shape)}; expected {expected} ({what})"
                    )
            if self.tracing.on:
                self.tracing.set("moe_serve.tokens", hidden.shape[0])
                self.tracing.set("moe_serve.pairs", token.shape[0])
                self.tracing.set("moe_serve.transport", "bytes" if target is None else "shared")
            out = await self.batcher.submit(
                request.layer, hidden, token, expert, weight, pairs=request.pair_outputs
            )
        except MoEError as exc:
            self._requests(exc.code.name).inc()
            raise
        self._requests("OK").inc()
        with self.tracing.span("encode"):
            return self._encode(request, out, target)

    def _encode(
        self, request: pb.ForwardRequest, out: torch.Tensor, target: torch.Tensor | None
    ) -> bytes | pb.ForwardResponse:
        """The reply: the partial sums (or pair outputs) as bytes, or written into the
        master's shared block."""
        if target is None:
            # The reply comes in the format the request came in (FP8 dispatch).
            fp8_reply = request.hidden.dtype == pb.DTYPE_FLOAT8_E4M3
            tensors = fp8.encode(out, "output") if fp8_reply else {"output": out}
            return serialize(pb.ForwardResponse(), tensors)
        target.copy_(out)
        if target.is_cuda:
            # The master reads these bytes as soon as it has the reply, from another process.
            torch.cuda.synchronize(target.device)
        return pb.ForwardResponse()

    def _output_view(self, request: pb.ForwardRequest, peer: str) -> torch.Tensor | None:
        if not request.HasField("output_shared"):
            return None
        return self.regions.view(
            peer, request.output_shared, "output_shared", frozenset({self.engine.dtype}), 2
        )

    @error_boundary
    async def AttachRegion(
        self, request: pb.AttachRegionRequest, context: grpc.aio.ServicerContext
    ) -> pb.AttachRegionReply:
        near = next((d for d in self.engine.devices if d.type == "cuda"), None)
        try:
            region = self.regions.attach(context.peer(), request, near)
        except SharedMemoryError as exc:
            return pb.AttachRegionReply(attached=False, reason=str(exc))
        log.info(
            "worker %s: mapped the master's %d-byte region", self.engine.worker.id, region.size
        )
        return pb.AttachRegionReply(attached=True)

    def _decode(
        self, request: pb.ForwardRequest, peer: str
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        e = self.engine
        if request.layer not in e.stacks:
            raise InvalidRequestError(
                "layer", f"{request.layer} is not a MoE layer; served: {sorted(e.stacks)}"
            )
        if request.HasField("hidden_shared"):
            hidden = self.regions.view(
                peer, request.hidden_shared, "hidden_shared", frozenset({e.dtype}), 2
            )
        else:
            dtypes = frozenset({e.dtype, fp8.FP8})  # FP8 dispatch: FP8 rows plus their scales
            hidden = tensor_from_pb(request.hidden, "hidden", dtypes=dtypes, rank=2)
        quantized = hidden.dtype == fp8.FP8
        if not quantized and _present(request.hidden_scale):
            raise InvalidRequestError(
                "hidden_scale", "set without an FP8 hidden; expected only with DTYPE_FLOAT8_E4M3"
            )
        if quantized and request.HasField("output_shared"):
            raise InvalidRequestError(
                "output_shared", "set with an FP8 hidden; expected an FP8 request to get bytes"
            )
        if hidden.shape[1] != e.model.hidden_size:
            raise InvalidRequestError(
                "hidden.shape[1]", f"{hidden.shape[1]} != hidden_size={e.model.hidden_size}"
            )
        token = tensor_from_pb(request.pair_token, "pair_token", dtypes=_INT32, rank=1)
        expert = tensor_from_pb(request.pair_expert, "pair_expert", dtypes=_INT32, rank=1)
        weight = tensor_from_pb(request.pair_weight, "pair_weight", dtypes=_FLOAT32, rank=1)
        e.validate(request.layer, hidden.shape[0], token, expert, weight)
        if quantized:  # checked and widened alone, before it can join a batch
            scale = tensor_from_pb(request.hidden_scale, "hidden_scale", dtypes=_FLOAT32, rank=2)
            hidden = fp8.decode_request(hidden, scale, e.dtype, e.devices[0], "hidden")
        return hidden, token, expert, weight

    @error_boundary
    async def GetInfo(
        self, request: pb.GetInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.WorkerInfo:
        e = self.engine
        layers = sorted(e.stacks)
        return pb.WorkerInfo(
            id=e.worker.id,
            devices=list(e.worker.devices),
            placement=[pb.LayerExperts(layer=la, experts=e.placement(la)) for la in layers],
            hidden_size=e.model.hidden_size,
            dtype=dtype_name(e.dtype),
            retiring=[
                pb.LayerExperts(layer=la, experts=sorted(e.retiring[la]))
                for la in layers
                if e.retiring[la]
            ],
        )

    @error_boundary
    async def Reload(
        self, request: pb.ReloadRequest, context: grpc.aio.ServicerContext
    ) -> pb.ReloadReply:
        if self.reloader is None:
            raise RestartNeededError(
                "this worker was started without a config file; nothing to reload"
            )
        return pb.ReloadReply(summary=await self.reloader.reload())


def _present(t: pb.Tensor) -> bool:
    """Whether a request set this Tensor field (a parsed one, or protobuf's empty default)."""
    return bool(t.dtype or len(t.shape) or len(t.data))
