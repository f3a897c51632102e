"""The MoEMaster gRPC servicer: decode -> batcher -> MasterEngine.forward -> encode.

The MoE layer itself (gate, dispatch, fan-out, failover, combine) is the engine's
(moe_serve.master.engine); this module checks requests at the edge, resolves clients'
shared-memory tensors, queues calls in the batcher and builds the replies.
Legend: T tokens, H hidden size, E experts, K top_k.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time

import grpc
import torch

from moe_serve.config import WorldConfig
from moe_serve.dtypes import DTYPE_NAMES, FLOAT_DTYPES
from moe_serve.errors import InvalidRequestError, MoEError, RestartNeededError
from moe_serve.layer.gating import Routing
from moe_serve.master.batcher import InferBatcher
from moe_serve.master.engine import MasterEngine
from moe_serve.master.reload import Reloader
from moe_serve.master.workers import WorkerPool
from moe_serve.metrics import Children, MasterMetrics
from moe_serve.tracing import INFER, NO_TRACING, Tracing
from moe_serve.transport.server import error_boundary
from moe_serve.transport.shm import RegionTable, SharedMemoryError
from moe_serve.transport.wire import serialize, tensor_from_pb, tensor_to_pb
from moe_serve.v1 import moe_pb2 as pb
from moe_serve.v1 import moe_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)


class MasterService(pb_grpc.MoEMasterServicer):
    """Serves Infer, GetInfo and AttachRegion: each Infer is decoded and checked here, computed
    by `engine` (every MoE layer's gate and shared experts on `master.device`, the routed
    experts on the workers of `pool`) in a batch with the calls queued meanwhile, and encoded.
    With `tracing` on, each Infer is a SERVER span (the client's traceparent its parent) with
    decode, queue and encode spans, and its batch a pass span (moe_serve.tracing)."""

    def __init__(
        self,
        cfg: WorldConfig,
        pool: WorkerPool,
        metrics: MasterMetrics,
        tracing: Tracing = NO_TRACING,
    ) -> None:
        self.cfg, self.pool, self.metrics = cfg, pool, metrics
        self.tracing = tracing
        self.device = torch.device(cfg.master.device)
        self.dtype = DTYPE_NAMES[cfg.model.dtype]
        self.engine = MasterEngine(cfg, pool, metrics, tracing=tracing)
        # Applies a re-read world config (Reload, SIGHUP); None: this master has no file.
        self.reloader: Reloader | None = None
        # Regions of clients on this host, each bound to the connection that attached it.
        self.client_regions = RegionTable()
        self.batcher = InferBatcher(self.engine.forward, cfg.master, metrics, tracing)
        # Per-call metrics through cached children (metrics.Children): label values are the
        # served layers (or "invalid"), status codes and the two transports.
        self._requests = Children(metrics.requests)
        self._request_seconds = Children(metrics.request_seconds)
        self._tokens = Children(metrics.tokens)
        self._transport = Children(metrics.infer_transport)
        self._layer_label = {la: str(la) for la in self.engine.gates}

    @error_boundary
    async def Reload(
        self, request: pb.ReloadRequest, context: grpc.aio.ServicerContext
    ) -> pb.ReloadReply:
        if self.reloader is None:
            raise RestartNeededError("this master was started without a config file")
        return pb.ReloadReply(summary=await self.reloader.reload())

    @error_boundary
    async def Infer(self, request: pb.InferRequest, context: grpc.aio.ServicerContext) -> bytes:
        start, code = time.perf_counter(), "INTERNAL"
        try:
            if self.tracing.on:
                reply = await self._traced(request, context)
            else:
                reply = await self._infer(request, context.time_remaining(), context.peer())
            code = "OK"
            return reply
        except MoEError as exc:
            code = exc.code.name
            if code == "INTERNAL":  # anything else is error_boundary's to log, as INTERNAL
                log.error(
                    "Infer on layer %d failed: INTERNAL: %s", request.layer, exc, exc_info=exc
                )
            raise
        except asyncio.CancelledError:
            # gRPC cancels the handler when the client's deadline passes (time_remaining() is
            # then 0) or the client cancels the call: the client's doing, not an error here.
            remaining = context.time_remaining()
            code = "DEADLINE_EXCEEDED" if remaining is not None and remaining <= 0 else "CANCELLED"
            raise
        finally:
            # Unknown layer ids share one label value, so clients cannot mint series.
            layer = self._layer_label.get(request.layer, "invalid")
            self._requests(layer, code).inc()
            self._request_seconds(layer).observe(time.perf_counter() - start)

    async def _traced(self, request: pb.InferRequest, context: grpc.aio.ServicerContext) -> bytes:
        """`_infer` inside the call's SERVER span, whose parent is the client's traceparent."""
        metadata = context.invocation_metadata()
        with self.tracing.server(INFER, metadata, {"moe_serve.layer": request.layer}):
            return await self._infer(request, context.time_remaining(), context.peer())

    async def _infer(self, request: pb.InferRequest, remaining_s: float | None, peer: str) -> bytes:
        """`peer`: the calling connection; its SharedTensors resolve only among the regions
        that connection attached."""
        with self.tracing.span("decode"):
            layer, x = request.layer, self._decode(request, peer)  # [T, H] model dtype
            target = self._output_view(request, x.shape, peer)
        if self.tracing.on:
            self.tracing.set("moe_serve.tokens", x.shape[0])
        # No client deadline: no overall bound; each worker call is still bounded by
        # master.worker_timeout_s (WorkerPool).
        timeout = math.inf if remaining_s is None else remaining_s
        out, r = await self.batcher.submit(layer, x, request.return_routing, timeout)
        with self.tracing.span("encode"):
            return self._encode(request, out, r, target, x.shape[0])

    def _encode(
        self,
        request: pb.InferRequest,
        out: torch.Tensor,
        r: Routing,
        target: torch.Tensor | None,
        tokens: int,
    ) -> bytes:
        """The reply: the output as bytes, or written into the client's shared block."""
        layer = request.layer
        self._tokens(self._layer_label[layer]).inc(tokens)
        self.metrics.request_tokens.observe(tokens)
        reply = pb.InferResponse()
        if request.return_routing:
            reply.routing.CopyFrom(_routing_pb(r))
        if target is None:
            return serialize(reply, {"output": out})  # already the model dtype (engine)
        target.copy_(out)
        if target.is_cuda:
            # The client reads these bytes as soon as it has the reply, from another process.
            torch.cuda.synchronize(target.device)
        return reply.SerializeToString()

    def _output_view(
        self, request: pb.InferRequest, shape: torch.Size, peer: str
    ) -> torch.Tensor | None:
        if not request.HasField("output_shared"):
            return None
        view = self.client_regions.view(
            peer, request.output_shared, "output_shared", frozenset({self.dtype}), 2
        )
        if view.shape != shape:
            raise InvalidRequestError(
                "output_shared.shape", f"{list(view.shape)}; expected {list(shape)} (as hidden)"
            )
        return view

    @error_boundary
    async def AttachRegion(
        self, request: pb.AttachRegionRequest, context: grpc.aio.ServicerContext
    ) -> pb.AttachRegionReply:
        try:
            near = self.device if self.device.type == "cuda" else None
            region = self.client_regions.attach(context.peer(), request, near)
        except SharedMemoryError as exc:
            return pb.AttachRegionReply(attached=False, reason=str(exc))
        log.info("master: mapped a client's %d-byte region", region.size)
        return pb.AttachRegionReply(attached=True)

    def _decode(self, request: pb.InferRequest, peer: str) -> torch.Tensor:
        self.engine.check_layer(request.layer)
        shared = request.HasField("hidden_shared")
        if shared:
            x = self.client_regions.view(
                peer, request.hidden_shared, "hidden_shared", FLOAT_DTYPES, 2
            )
            self._transport("shared").inc()
        else:
            x = tensor_from_pb(request.hidden, "hidden", dtypes=FLOAT_DTYPES, rank=2)
            self._transport("bytes").inc()
        # Shared memory is copied before it is checked: its owner can still write to it, and
        # what is computed must be what was checked.
        return self.engine.check_hidden(x, copy=shared)

    @error_boundary
    async def GetInfo(
        self, request: pb.GetInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.MasterInfo:
        return self.engine.info()


def _routing_pb(r: Routing) -> pb.Routing:
    # A call that asks for its routing has its losses computed (return_routing is passed to
    # the batcher as `losses`): never None here.
    lb, imp = r.load_balance_loss, r.importance_loss
    return pb.Routing(
        expert_ids=tensor_to_pb(r.expert_ids),
        weights=tensor_to_pb(r.weights.float()),
        scores=tensor_to_pb(r.scores),
        dropped_pairs=int(r.dropped_pairs),
        load_balance_loss=0.0 if lb is None else float(lb),
        importance_loss=0.0 if imp is None else float(imp),
    )
