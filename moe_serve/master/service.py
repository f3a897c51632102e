"""The MoEMaster gRPC servicer: decode -> gate -> dispatch -> workers -> combine -> encode.

Legend: T tokens, H hidden size, E experts, K top_k.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import math
import time

import grpc
import torch

from moe_serve.config import WorldConfig
from moe_serve.dtypes import DTYPE_NAMES, FLOAT_DTYPES
from moe_serve.errors import (
    InvalidRequestError,
    MoEError,
    RequestTooLargeError,
    WorkerUnavailableError,
)
from moe_serve.layer.dispatch import WorkerSlice, combine, dispatch, regroup
from moe_serve.layer.experts import load_shared, shared_forward
from moe_serve.layer.gating import Gate, Routing, merge_routings, routing_to, split_routing
from moe_serve.layer.placement import Owners, Placement, plan_owners
from moe_serve.master.batcher import InferBatcher, Outcome
from moe_serve.master.workers import WorkerPool
from moe_serve.metrics import MasterMetrics
from moe_serve.transport.server import error_boundary
from moe_serve.transport.shm import RegionTable, SharedMemoryError
from moe_serve.transport.wire import serialize, tensor_from_pb, tensor_to_pb
from moe_serve.v1 import moe_pb2 as pb
from moe_serve.v1 import moe_pb2_grpc as pb_grpc
from moe_serve.weights import open_weights

log = logging.getLogger(__name__)

# Requests up to this size that arrive as bytes stay in host memory until their batch moves
# to master.device in one copy.
HOST_BATCH_BYTES = 1 << 20


class MasterService(pb_grpc.MoEMasterServicer):
    """Holds every MoE layer's gate and shared experts on `master.device`; serves Infer, GetInfo."""

    def __init__(self, cfg: WorldConfig, pool: WorkerPool, metrics: MasterMetrics) -> None:
        self.cfg, self.pool, self.metrics = cfg, pool, metrics
        self.device = torch.device(cfg.master.device)
        self.dtype = DTYPE_NAMES[cfg.model.dtype]
        m, source = cfg.model, open_weights(cfg.model, cfg.routing)
        self.gates = {
            la: Gate.load(source, la, m.top_k, cfg.routing, self.device, self.dtype)
            for la in m.moe_layers
        }
        self.shared = load_shared(source, m.moe_layers, self.device, self.dtype)
        self.placement = Placement.from_config(cfg)
        # Layers whose experts each have one holder: the owner table never changes.
        self._single = {
            la: all(len(h) == 1 for h in hs) for la, hs in self.placement.holders.items()
        }
        self._owner_cache: dict[tuple[int, torch.device], torch.Tensor] = {}
        self._turn = 0  # rotates ties between equally loaded replicas
        # Regions of clients on this host, each bound to the connection that attached it.
        self.client_regions = RegionTable()
        self.batcher = InferBatcher(self._pass, cfg.master, metrics)
        # The dtype gate logits are computed in (gating.gate_scores), named by errors.
        self._router_dtype = m.dtype if cfg.routing.router_dtype == "model" else "float32"

    @error_boundary
    async def Infer(self, request: pb.InferRequest, context: grpc.aio.ServicerContext) -> bytes:
        start, code = time.perf_counter(), "INTERNAL"
        try:
            reply = await self._infer(request, context.time_remaining(), context.peer())
            code = "OK"
            return reply
        except MoEError as exc:
            code = exc.code.name
            raise
        finally:
            # Unknown layer ids share one label value, so clients cannot mint series.
            layer = str(request.layer) if request.layer in self.gates else "invalid"
            self.metrics.requests.labels(layer, code).inc()
            self.metrics.request_seconds.labels(layer).observe(time.perf_counter() - start)

    async def _infer(self, request: pb.InferRequest, remaining_s: float | None, peer: str) -> bytes:
        """`peer`: the calling connection; its SharedTensors resolve only among the regions
        that connection attached."""
        layer, x = request.layer, self._decode(request, peer)  # [T, H] model dtype, master dev.
        target = self._output_view(request, x.shape, peer)
        # No client deadline: no overall bound; each worker call is still bounded by
        # master.worker_timeout_s (WorkerPool).
        timeout = math.inf if remaining_s is None else remaining_s
        out, r = await self.batcher.submit(layer, x, request.return_routing, timeout)
        self.metrics.tokens.labels(str(layer)).inc(x.shape[0])
        self.metrics.request_tokens.observe(x.shape[0])
        reply = pb.InferResponse()
        if request.return_routing:
            reply.routing.CopyFrom(_routing_pb(r))
        if target is None:
            return serialize(reply, {"output": out})  # already the model dtype (_compute)
        target.copy_(out)
        if target.is_cuda:
            # The client reads these bytes as soon as it has the reply, from another process.
            torch.cuda.synchronize(target.device)
        return reply.SerializeToString()

    async def _pass(
        self, layer: int, xs: list[torch.Tensor], losses: list[bool], timeout_s: float
    ) -> list[Outcome]:
        """One forward of `layer` over the calls' rows together -> per call its (output
        [T_i, H] in the model dtype, routing), equal to what the call alone would get, or
        the InvalidRequestError of a call whose result would not be finite: such a call
        fails alone, and its mates are computed as if it had never come."""
        outcomes: list[Outcome | None] = [None] * len(xs)
        live = list(range(len(xs)))  # calls still in the pass
        while True:
            sizes = [xs[i].shape[0] for i in live]
            on_host = [xs[i].device != self.device for i in live]
            host, x = self._stack([xs[i] for i in live], on_host)
            r, routings = self._route(layer, x, sizes, [losses[i] for i in live])
            if host is not None:
                # A batch of small byte requests (a GPU master's decode steps) is only gated
                # on the device: one copy brings the routing back, and the checks, dispatch,
                # the worker messages and the combine run in host memory, with none of the
                # device syncs they cost there.
                r = routing_to(r, host.device)
                routings = [routing_to(q, host.device) for q in routings]
            # A row whose gate overflows (a finite float32 row of +-1e38 makes a logit inf,
            # and softmax NaN) would send NaN weights to the workers and fail the whole
            # Forward for everyone. Such calls leave the pass; the others are gated again
            # without them (capacity is per call, gating otherwise row-wise: same routing).
            finite = torch.isfinite(r.scores).all(dim=1) & torch.isfinite(r.weights).all(dim=1)
            # Host sync (none for a batch routed in host memory): one read-back serves the
            # metrics' per-expert counts and each call's first row with non-finite gate
            # scores (which calls go on decides the dispatch).
            counts, firsts = _read_back(self._expert_counts(r), ~finite, sizes)
            poisoned = {j for j, row in enumerate(firsts) if row >= 0}
            if not poisoned:
                break
            for j in poisoned:
                outcomes[live[j]] = InvalidRequestError(
                    "hidden",
                    f"row {firsts[j]}: gate scores not finite (the row overflows layer "
                    f"{layer}'s router in {self._router_dtype}); values must be small enough "
                    "for the gate",
                )
            live = [i for j, i in enumerate(live) if j not in poisoned]
            if not live:
                return _answered(outcomes)
        try:
            outs, firsts = await self._compute(layer, x, host, on_host, sizes, r, timeout_s)
        except MoEError as exc:
            if len(live) == len(xs):
                raise  # the pass failed as a whole
            for i in live:  # the calls that left the pass keep their own error
                outcomes[i] = exc
            return _answered(outcomes)
        self._observe(layer, counts)
        for i, o, q, row in zip(live, outs, routings, firsts, strict=True):
            if row >= 0:
                outcomes[i] = InvalidRequestError(
                    "hidden",
                    f"row {row}: output not finite (an expert overflows {self.cfg.model.dtype} "
                    "on this row); values must be small enough for the experts",
                )
            else:
                outcomes[i] = (o, q)
        return _answered(outcomes)

    async def _compute(
        self,
        layer: int,
        x: torch.Tensor,
        host: torch.Tensor | None,
        on_host: list[bool],
        sizes: list[int],
        r: Routing,
        timeout_s: float,
    ) -> tuple[list[torch.Tensor], list[int]]:
        """Dispatch a gated batch, gather the workers' partial sums (failing over), add the
        shared experts -> (each call's output rows in the model dtype, where its reply is
        built; each call's first non-finite output row, -1 for none)."""
        work = x if host is None else host
        slices = dispatch(r, self._owners(layer, work.device), len(self.placement.worker_ids))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        calls = [loop.create_task(self.pool.forward(layer, work, sl, timeout_s)) for sl in slices]
        shared = None
        if layer in self.shared:
            # Shared experts run here, on the loop's thread, once the worker calls are on
            # their way (a thread pool would pay GIL handoffs on every op; see the worker's
            # batcher): they overlap with the workers' compute.
            try:
                await asyncio.sleep(0)
                shared = shared_forward(self.cfg.model.activation, self.shared[layer], x)
            except BaseException:
                for task in calls:
                    task.cancel()
                raise
        results = await asyncio.gather(*calls, return_exceptions=True)
        slices, results = await self._fail_over(layer, work, slices, results, deadline)
        out = combine(x.shape[0], x.shape[1], slices, results, work.device)  # [T, H] float32
        if shared is not None:
            out += shared.float().to(work.device)
        # Checked as it will be sent: partial sums finite in float32 can still overflow
        # float16 (65504) when rounded for the reply.
        out = out.to(self.dtype)
        outs, checked = list(out.split(sizes)), out
        if host is None and any(on_host):  # replies built in host memory: one copy for all
            checked = out.to("cpu")
            back = checked.split(sizes)
            outs = [b if h else o for b, o, h in zip(back, outs, on_host, strict=True)]
        # Host sync (none when `checked` is in host memory): each call's first non-finite
        # output row (an expert overflowing on a finite input); rows are independent, so
        # only that call fails.
        _, firsts = _read_back(None, ~torch.isfinite(checked).all(dim=1), sizes)
        return outs, firsts

    def _stack(
        self, xs: list[torch.Tensor], on_host: list[bool]
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """The calls' rows as one batch: (the batch in host memory when every call is
        there, else None; the batch on master.device)."""
        if all(on_host):
            host = xs[0] if len(xs) == 1 else torch.cat(xs)
            return host, host.to(self.device)
        return None, torch.cat([t.to(self.device) for t in xs]) if len(xs) > 1 else xs[0]

    def _owners(self, layer: int, device: torch.device, strict: bool = False) -> Owners:
        """Who computes this batch's pairs: replicated experts' tokens are divided among
        their live replicas by outstanding tokens (placement.plan_owners). An expert with no
        live replica goes to its first holder (the call then fails or finds it back), or
        with `strict` gets -1."""
        if not strict and self._single[layer] and all(self.pool.healthy):
            return Owners(self._static_owner(layer, device))  # nothing to choose
        self._turn += 1
        return plan_owners(
            self.placement.holders[layer],
            self.pool.healthy,
            self.pool.outstanding,
            self._turn,
            device,
            strict,
        )

    def _static_owner(self, layer: int, device: torch.device) -> torch.Tensor:
        key = (layer, device)
        if key not in self._owner_cache:
            self._owner_cache[key] = self.placement.owner[layer].to(device)
        return self._owner_cache[key]

    async def _fail_over(
        self,
        layer: int,
        x: torch.Tensor,
        slices: list[WorkerSlice],
        results: list[torch.Tensor | BaseException],
        deadline: float,
    ) -> tuple[list[WorkerSlice], list[torch.Tensor]]:
        """Resend the slices of workers that turned out unavailable to live replicas of
        their experts, round by round, until every slice has its partial sums.

        Every round's results are examined, the last one's too. At most W resend rounds
        (each loses a worker, unless their health flaps back in between); a slice still
        failing after them, or an expert with no live replica left, is UNAVAILABLE naming
        the experts and workers. Other errors are raised as they are. The slices returned
        hold exactly the pairs dispatched (counted), so no partial sum is lost."""
        dispatched = sum(sl.pair_expert.shape[0] for sl in slices)
        done: list[tuple[WorkerSlice, torch.Tensor]] = []
        loop, W = asyncio.get_running_loop(), len(self.placement.worker_ids)
        for round_ in range(W + 1):  # round 0: the first sends; rounds 1..W: resends
            failed = []
            for sl, res in zip(slices, results, strict=True):
                if isinstance(res, WorkerUnavailableError):
                    failed.append(sl)
                elif isinstance(res, BaseException):
                    raise res
                else:
                    done.append((sl, res))
            if not failed:
                break
            experts = sorted({e for sl in failed for e in sl.pair_expert.tolist()})
            gone = sorted({self.placement.worker_ids[sl.worker] for sl in failed})
            if round_ == W:
                raise WorkerUnavailableError(
                    f"no live replica for layer {layer} experts {experts}: worker(s) {gone} "
                    f"still unavailable after {W} resend round(s)"
                )
            owner = self._owners(layer, x.device, strict=True)
            held = owner.expert.tolist()  # one read back, not one sync per expert
            lost = [e for e in experts if held[e] < 0]
            if lost:
                raise WorkerUnavailableError(
                    f"no live replica for layer {layer} experts {lost}: worker(s) {gone} "
                    "unavailable"
                )
            self.metrics.failovers.inc(len(failed))
            slices = [s for sl in failed for s in regroup(sl, owner, W)]
            timeout = max(deadline - loop.time(), 0.001)
            results = await asyncio.gather(
                *(self.pool.forward(layer, x, sl, timeout) for sl in slices),
                return_exceptions=True,
            )
        computed = sum(sl.pair_expert.shape[0] for sl, _ in done)
        if computed != dispatched:  # a partial sum short or doubled: never answer it
            raise MoEError(
                f"layer {layer}: {computed} (token, expert) pairs computed after failover, "
                f"{dispatched} dispatched"
            )
        return [sl for sl, _ in done], [res for _, res in done]

    def _route(
        self, layer: int, x: torch.Tensor, sizes: list[int], losses: list[bool]
    ) -> tuple[Routing, list[Routing]]:
        """The batch's routing for dispatch, and each call's own."""
        gate = self.gates[layer]
        if len(sizes) == 1:
            r = gate(x, losses=losses[0])
            return r, [r]
        if self.cfg.routing.capacity_factor is None:
            # Gating is row-wise without a capacity: gate the batch once, split per call.
            r = gate(x, losses=False)
            return r, split_routing(r, sizes, losses)
        # Capacity is per request: each call is gated on its own rows.
        routings = [gate(t, losses=w) for t, w in zip(x.split(sizes), losses, strict=True)]
        return merge_routings(routings), routings

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
        layers = self.cfg.model.moe_layers
        if request.layer not in self.gates:
            raise InvalidRequestError(
                "layer", f"{request.layer} is not a MoE layer; served: {list(layers)}"
            )
        shared = request.HasField("hidden_shared")
        if shared:
            x = self.client_regions.view(
                peer, request.hidden_shared, "hidden_shared", FLOAT_DTYPES, 2
            )
            self.metrics.infer_transport.labels("shared").inc()
        else:
            x = tensor_from_pb(request.hidden, "hidden", dtypes=FLOAT_DTYPES, rank=2)
            self.metrics.infer_transport.labels("bytes").inc()
        T, H = x.shape
        if self.cfg.model.hidden_size != H:
            raise InvalidRequestError(
                "hidden.shape[1]", f"{H} != hidden_size={self.cfg.model.hidden_size}"
            )
        limit = self.cfg.master.max_request_tokens
        if limit < T:
            raise RequestTooLargeError(
                f"hidden.shape[0]: {T} tokens exceed master.max_request_tokens={limit}"
            )
        # A small request that came as bytes is converted and checked in host memory: its
        # batch then moves to the device in one copy (_pass), not one copy and sync per call.
        small = x.device.type == "cpu" and x.numel() * x.element_size() <= HOST_BATCH_BYTES
        # Shared memory is copied before it is checked: its owner can still write to it, and
        # what is computed must be what was checked. (A cast or a move to the device copies
        # anyway; copy=True adds a copy only where neither happens: one memcpy of the input.)
        x = x.to(x.device if small else self.device, self.dtype, copy=shared)
        if not bool(torch.isfinite(x).all()):  # one check at the edge, before any fan-out
            raise InvalidRequestError("hidden", "contains NaN or Inf")
        return x

    def _expert_counts(self, r: Routing) -> torch.Tensor:
        """[E + 1] int64 on r's device: kept pairs per expert, then the dropped ones; built
        on the device to be read back with other values in one sync (masked indexing and
        bincount would each add one)."""
        E = self.cfg.model.num_experts
        counts = torch.zeros(E + 1, dtype=torch.int64, device=r.expert_ids.device)
        return counts.scatter_add_(
            0,
            r.expert_ids.masked_fill(~r.kept, E).flatten(),
            torch.ones_like(r.expert_ids).flatten(),
        )

    def _observe(self, layer: int, counts: list[int]) -> None:
        """Count a served batch's kept pairs per expert and its dropped pairs
        (`_expert_counts`, read back)."""
        m, label = self.metrics, str(layer)
        *per_expert, dropped = counts
        for e, n in enumerate(per_expert):
            if n:
                m.expert_tokens.labels(label, str(e)).inc(n)
        if dropped:
            m.dropped_pairs.labels(label).inc(dropped)

    @error_boundary
    async def GetInfo(
        self, request: pb.GetInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.MasterInfo:
        m, routing = self.cfg.model, self.cfg.routing
        workers = [
            pb.WorkerStatus(
                id=w.id,
                address=w.address,
                healthy=self.pool.healthy[i],
                devices=list(w.devices),
                placement=[
                    pb.LayerExperts(layer=la, experts=w.experts_on(la)) for la in m.moe_layers
                ],
            )
            for i, w in enumerate(self.cfg.workers)
        ]
        return pb.MasterInfo(
            hidden_size=m.hidden_size,
            expert_ffn_size=m.expert_ffn_size,
            num_experts=m.num_experts,
            top_k=m.top_k,
            expert_kind=m.expert_kind,
            activation=m.activation,
            dtype=m.dtype,
            layers=m.moe_layers,
            workers=workers,
            scoring=routing.scoring,
            normalize_topk=routing.normalize_topk,
            capacity_factor=routing.capacity_factor or 0.0,
            max_request_tokens=self.cfg.master.max_request_tokens,
        )


def _read_back(
    head: torch.Tensor | None, bad: torch.Tensor, sizes: list[int]
) -> tuple[list[int], list[int]]:
    """(`head`, an int64 vector, or [] for None; each call's first row flagged in `bad` [T],
    counted within the call, -1 for none).

    One read-back when no row is flagged (every batch but a poisoned one): `head` and one
    "any flagged" bit travel together. Only a batch with a flagged row pays a second one,
    for the rows; per-call indexing on every batch cost ~0.1 ms of small host ops a call.
    """
    flag = bad.any().view(1).long()
    values = (flag if head is None else torch.cat([head, flag])).tolist()
    head_values, any_bad = values[:-1], values[-1]
    if not any_bad:
        return head_values, [-1] * len(sizes)
    # Host sync (a poisoned batch only): which rows, to fail just their calls.
    rows = bad.nonzero().flatten().tolist()
    firsts, start = [], 0
    for size in sizes:  # one entry per call, not per token
        i = bisect.bisect_left(rows, start)
        firsts.append(rows[i] - start if i < len(rows) and rows[i] < start + size else -1)
        start += size
    return head_values, firsts


def _answered(outcomes: list[Outcome | None]) -> list[Outcome]:
    """The outcomes of a pass, each call answered."""
    answered = [o for o in outcomes if o is not None]
    if len(answered) != len(outcomes):
        raise MoEError("a call of the pass was left unanswered")
    return answered


def _routing_pb(r: Routing) -> pb.Routing:
    return pb.Routing(
        expert_ids=tensor_to_pb(r.expert_ids),
        weights=tensor_to_pb(r.weights.float()),
        scores=tensor_to_pb(r.scores),
        dropped_pairs=int(r.dropped_pairs),
        load_balance_loss=float(r.load_balance_loss),
        importance_loss=float(r.importance_loss),
    )
