"""The master's MoE layer: gate -> dispatch -> fan out (+ shared experts) -> fail over -> combine.

`MasterEngine.forward` computes one MoE layer for a batch of calls. It holds the gates and
shared experts (on master.device), the placement of the routed experts on the workers,
and a pool that reaches the workers (`ExpertPool`: the master's gRPC `WorkerPool`, or an
in-process stand-in, as in `moe-serve bench`). It knows nothing of a gRPC servicer: the
master's `MasterService` decodes a request, queues it in its batcher, whose passes call
`forward`, and encodes the reply.

Legend: T rows of the batch (T_i of call i), H hidden size, E experts, K top_k, W workers,
P kept (token, expert) pairs, N_w tokens and P_w pairs sent to worker w.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

import torch

from moe_serve.config import WorldConfig
from moe_serve.dtypes import DTYPE_NAMES, FLOAT_DTYPES
from moe_serve.errors import (
    InvalidRequestError,
    MoEError,
    RequestTooLargeError,
    WorkerUnavailableError,
)
from moe_serve.layer.dispatch import WorkerSlice, combine, combine_pairs, dispatch, regroup
from moe_serve.layer.experts import load_shared, shared_forward
from moe_serve.layer.gating import Gate, Routing, merge_routings, routing_to, split_routing
from moe_serve.layer.placement import Owners, Placement, plan_owners
from moe_serve.master.batcher import Outcome
from moe_serve.metrics import MasterMetrics
from moe_serve.tracing import NO_TRACING, Tracing
from moe_serve.v1 import moe_pb2 as pb
from moe_serve.weights import WeightSource, open_weights

log = logging.getLogger(__name__)

# Requests up to this size that come in host memory stay there until their batch moves to
# master.device in one copy (the engine's _stack), instead of one copy and sync per call.
HOST_BATCH_BYTES = 1 << 20
# How long a batch about to fail for want of a live replica waits for its holders to answer
# a health check once more: a live worker answers in milliseconds.
RECHECK_S = 0.25


class ExpertPool(Protocol):
    """The workers as the engine sees them, indexed in config order: `WorkerPool` over gRPC
    (moe_serve.master.workers), or an in-process stand-in."""

    healthy: list[bool]  # answered its last health check or call
    outstanding: list[int]  # tokens in calls not yet answered (replicas are balanced on it)
    tls_failures: list[str | None]  # why a worker's TLS handshake fails, if that is why it is down

    async def recheck(self, workers: list[int], timeout_s: float) -> None:
        """Check `workers` once more now and update `healthy` (before a batch fails for
        want of a live replica)."""
        ...

    async def forward(
        self, layer: int, x: torch.Tensor, sl: WorkerSlice, timeout_s: float
    ) -> torch.Tensor:
        """x [T, H] -> worker `sl.worker`'s answer for the rows and pairs of `sl`: each
        pair's expert output [P_w, H] in the slice's pair order when the config's
        model.batch_invariant is on, else its partial sums [N_w, H];
        WorkerUnavailableError when that worker cannot answer (the engine then resends the
        slice to replicas)."""
        ...


@dataclass(frozen=True)
class _Gated:
    """A batch after step 1: the calls still in the pass, stacked and routed."""

    live: list[int]  # index of each call still in the pass, among the pass's calls
    sizes: list[int]  # [T_i] of each
    on_host: list[bool]  # whether each came in host memory (its reply is built there)
    x: torch.Tensor  # [T, H] the rows on master.device, model dtype
    host: torch.Tensor | None  # [T, H] the same rows in host memory when every call is there
    routing: Routing  # the batch's, for dispatch: expert_ids/weights/kept [T, K]
    routings: list[Routing]  # each call's own ([T_i, K]; its losses when asked for)
    counts: list[int]  # [E + 1] kept pairs per expert, then the dropped ones (read back)

    @property
    def work(self) -> torch.Tensor:
        """[T, H] where dispatch, the worker messages and the combine run: host memory for
        a batch of host calls (no device syncs there), else master.device."""
        return self.x if self.host is None else self.host


class MasterEngine:
    """Every MoE layer of the model as the master computes it: gates and shared experts on
    `master.device`, routed experts on the workers of `pool`, placed as the config says.

    `forward` runs one layer over a batch of calls. The engine keeps no per-call state
    between passes: only the static owner tables (cached per device) and the turn that
    rotates ties between equally loaded replicas.
    """

    def __init__(
        self,
        cfg: WorldConfig,
        pool: ExpertPool,
        metrics: MasterMetrics,
        source: WeightSource | None = None,
        tracing: Tracing = NO_TRACING,
    ) -> None:
        """`source`: the model's weights, when the caller has them open already (default:
        opened from cfg.model). `tracing`: spans of `forward`'s steps (gate, dispatch,
        fan_out, combine), children of the batch's pass span."""
        self.cfg, self.pool, self.metrics = cfg, pool, metrics
        self.tracing = tracing
        self.device = torch.device(cfg.master.device)
        self.dtype = DTYPE_NAMES[cfg.model.dtype]
        m = cfg.model
        if source is None:
            source = open_weights(cfg.model, cfg.routing)
        self.gates = {
            la: Gate.load(
                source, la, m.top_k, cfg.routing, self.device, self.dtype, m.batch_invariant
            )
            for la in m.moe_layers
        }
        self.shared = load_shared(source, m.moe_layers, self.device, self.dtype)
        self._owner_cache: dict[tuple[int, torch.device], torch.Tensor] = {}
        self._addresses: dict[str, str] = {}  # worker id -> address, every config seen
        self.placement = Placement.from_config(cfg)
        self.use(cfg, self.placement)
        self._turn = 0  # rotates ties between equally loaded replicas
        # The dtype gate logits are computed in (gating.gate_scores), named by errors.
        self._router_dtype = m.dtype if cfg.routing.router_dtype == "model" else "float32"
        # Each layer's drop counter is exported from the start, at 0 (labels() creates the
        # series): an alert on its rate has data before the first drop.
        for la in m.moe_layers:
            metrics.dropped_pairs.labels(str(la))

    def use(self, cfg: WorldConfig, placement: Placement) -> None:
        """Serve the next batches with `cfg` (a reload's: only its workers differ) and
        `placement` (over the pool's worker indices). A batch in flight keeps the worker
        indices it dispatched to: they name the same workers (WorkerPool.add)."""
        old, self.cfg, self.placement = self.placement, cfg, placement
        self._addresses.update({w.id: w.address for w in cfg.workers})
        # Layers whose experts each have one holder: the owner table does not change.
        self._single = {la: all(len(h) == 1 for h in hs) for la, hs in placement.holders.items()}
        self._owner_cache.clear()
        ids = placement.worker_ids
        for layer, holders in placement.holders.items():
            before = old.holders.get(layer, ())
            for e, h in enumerate(holders):
                was = before[e] if e < len(before) else ()
                if tuple(old.worker_ids[w] for w in was) != tuple(ids[w] for w in h):
                    log.info(
                        "layer %d expert %d: served by %s (was %s)",
                        layer,
                        e,
                        [ids[w] for w in h],
                        [old.worker_ids[w] for w in was],
                    )

    def check_layer(self, layer: int) -> None:
        """InvalidRequestError naming `layer` when it is not a MoE layer of this model."""
        if layer not in self.gates:
            raise InvalidRequestError(
                "layer", f"{layer} is not a MoE layer; served: {list(self.cfg.model.moe_layers)}"
            )

    def check_hidden(self, x: torch.Tensor, copy: bool = False) -> torch.Tensor:
        """A request's hidden states [T, H] as `forward` takes them, checked at the edge (the
        master's Infer and the embedded client share it): x in the model dtype, in host
        memory when it came there and is small (HOST_BATCH_BYTES), else on master.device.

        InvalidRequestError naming the field for a dtype that is not a float one, a rank
        other than 2, a hidden size other than the model's, NaN or Inf;
        RequestTooLargeError beyond master.max_request_tokens. `copy`: copy even where no
        cast or move does (memory its owner can still write to: what is computed must be
        what was checked).
        """
        if x.dtype not in FLOAT_DTYPES:
            accepted = sorted(str(d).removeprefix("torch.") for d in FLOAT_DTYPES)
            raise InvalidRequestError(
                "hidden.dtype",
                f"{str(x.dtype).removeprefix('torch.')} is not accepted; expected one of "
                f"{accepted}",
            )
        if x.dim() != 2:
            raise InvalidRequestError(
                "hidden.shape", f"rank {x.dim()} {list(x.shape)}; expected rank 2"
            )
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
        small = x.device.type == "cpu" and x.numel() * x.element_size() <= HOST_BATCH_BYTES
        target = x.device if small else self.device
        # (A cast or a move to the device copies anyway; copy=True adds a copy only where
        # neither happens: one memcpy of the input.)
        if copy or x.dtype != self.dtype or x.device != target:  # else .to() is a no-op
            x = x.to(target, self.dtype, copy=copy)
        # Host sync: one check at the edge, before any fan-out.
        if not bool(torch.isfinite(x).all()):
            raise InvalidRequestError("hidden", "contains NaN or Inf")
        return x

    def info(self) -> pb.MasterInfo:
        """Model dims, layers, routing settings, placement and each worker's last known
        health: what GetInfo answers (the embedded client's info() too)."""
        m, routing = self.cfg.model, self.cfg.routing
        ids = self.placement.worker_ids
        # The pool index of each configured worker: its last (a re-added id gets a new one).
        index = {worker_id: i for i, worker_id in enumerate(ids)}
        workers = [
            pb.WorkerStatus(
                id=w.id,
                address=w.address,
                healthy=w.id in index and self.pool.healthy[index[w.id]],
                devices=list(w.devices),
                placement=[
                    pb.LayerExperts(layer=la, experts=w.experts_on(la)) for la in m.moe_layers
                ],
            )
            for w in self.cfg.workers
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

    async def forward(
        self,
        layer: int,
        xs: list[torch.Tensor],
        losses: list[bool] | None = None,
        timeout_s: float = math.inf,
    ) -> list[Outcome]:
        """One forward of `layer` over the calls' rows together.

        xs: each call's hidden states [T_i, H] in the model dtype, on master.device or in
        host memory. losses: per call, whether its routing carries the auxiliary losses
        (default: none). timeout_s: bound of the whole pass, resends included; each worker
        call is also bounded by the pool (master.worker_timeout_s).

        Returns per call its (output [T_i, H] in the model dtype, on the device its input
        came on; its routing), equal to what the call alone would get, or the
        InvalidRequestError of a call whose result would not be finite: such a call fails
        alone, and its mates are computed as if it had never come. An error of the pass as a
        whole is raised: WorkerUnavailableError (an expert with no live replica),
        DeadlineError, or what the pool raised.
        """
        wanted = [False] * len(xs) if losses is None else losses
        outcomes: list[Outcome | None] = [None] * len(xs)
        # 1. Gate: [T, H] -> routing [T, K]; a call with a row the gate overflows leaves.
        with self.tracing.span("gate"):
            b = self._gate(layer, xs, wanted, outcomes)
        if b is None:
            return _answered(outcomes)
        work, W = b.work, len(self.placement.worker_ids)
        try:
            # 2. Dispatch: the P kept pairs -> one slice per worker hit ([N_w] rows, [P_w]
            # pairs), replicated experts' tokens divided among live replicas.
            with self.tracing.span("dispatch"):
                slices = dispatch(b.routing, self.owners(layer, work.device), W)
            # 3. Fan out: one call per slice, all in flight; meanwhile the shared experts
            # [T, H] run here.
            deadline = asyncio.get_running_loop().time() + timeout_s
            with self.tracing.span("fan_out"):
                results, shared = await self._fan_out(layer, b, slices, timeout_s)
            # 4. Fail over: the slices of unavailable workers, resent to live replicas ->
            # answers ([P_w, H] pair outputs or [N_w, H] partial sums) covering every
            # dispatched pair once.
            slices, partials = await self._fail_over(layer, work, slices, results, deadline)
        except MoEError as exc:
            if len(b.live) == len(xs):
                raise  # the pass failed as a whole
            for i in b.live:  # its error; the calls that left it keep their own
                outcomes[i] = exc
            return _answered(outcomes)
        # 5. Combine: weighted pair outputs in top-k order (or partial sums) + shared ->
        # [T, H] model dtype -> each call's [T_i, H].
        with self.tracing.span("combine"):
            outs, firsts = self._combine(b, slices, partials, shared)
        self._observe(layer, b.counts)
        for i, out, r, row in zip(b.live, outs, b.routings, firsts, strict=True):
            if row >= 0:
                outcomes[i] = InvalidRequestError(
                    "hidden",
                    f"row {row}: output not finite (an expert overflows {self.cfg.model.dtype} "
                    "on this row); values must be small enough for the experts",
                )
            else:
                outcomes[i] = (out, r)
        return _answered(outcomes)

    def _gate(
        self,
        layer: int,
        xs: list[torch.Tensor],
        losses: list[bool],
        outcomes: list[Outcome | None],
    ) -> _Gated | None:
        """Step 1: the calls' rows stacked [T, H] and gated. A call with a row whose gate
        scores are not finite gets its InvalidRequestError in `outcomes` and leaves; the
        others are gated again without it. None when no call is left."""
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
                return _Gated(live, sizes, on_host, x, host, r, routings, counts)
            for j in poisoned:
                outcomes[live[j]] = InvalidRequestError(
                    "hidden",
                    f"row {firsts[j]}: gate scores not finite (the row overflows layer "
                    f"{layer}'s router in {self._router_dtype}); values must be small enough "
                    "for the gate",
                )
            live = [i for j, i in enumerate(live) if j not in poisoned]
            if not live:
                return None

    async def _fan_out(
        self, layer: int, b: _Gated, slices: list[WorkerSlice], timeout_s: float
    ) -> tuple[list[torch.Tensor | BaseException], torch.Tensor | None]:
        """Step 3: every slice's pool call in flight at once, and the layer's shared experts
        computed meanwhile -> (per slice its partial sums [N_w, H] or its exception; the
        shared experts' output [T, H] on master.device, or None for a layer without)."""
        loop = asyncio.get_running_loop()
        calls = [loop.create_task(self.pool.forward(layer, b.work, sl, timeout_s)) for sl in slices]
        shared = None
        if layer in self.shared:
            # Shared experts run here, on the loop's thread, once the worker calls are on
            # their way (a thread pool would pay GIL handoffs on every op; see the worker's
            # batcher): they overlap with the workers' compute.
            try:
                await asyncio.sleep(0)
                m = self.cfg.model
                shared = shared_forward(m.activation, self.shared[layer], b.x, m.batch_invariant)
            except BaseException:
                for task in calls:
                    task.cancel()
                raise
        results = await asyncio.gather(*calls, return_exceptions=True)
        return results, shared

    def _combine(
        self,
        b: _Gated,
        slices: list[WorkerSlice],
        partials: list[torch.Tensor],
        shared: torch.Tensor | None,
    ) -> tuple[list[torch.Tensor], list[int]]:
        """Step 5: the workers' answers into their rows, plus the shared experts -> (each
        call's output [T_i, H] in the model dtype, where its reply is built; each call's
        first non-finite output row, -1 for none).

        With model.batch_invariant a token's pair outputs are weighted and added here in
        its top-k order (dispatch.combine_pairs): the same bits whichever workers computed
        them, one or several, replicas or not. Otherwise workers' partial sums are added."""
        work = b.work
        if self.cfg.model.batch_invariant:
            out = combine_pairs(b.routing.weights, b.x.shape[1], slices, partials, work.device)
        else:
            out = combine(b.x.shape[0], b.x.shape[1], slices, partials, work.device)
        if shared is not None:
            out += shared.float().to(work.device)
        # Checked as it will be sent: partial sums finite in float32 can still overflow
        # float16 (65504) when rounded for the reply.
        out = out.to(self.dtype)
        outs, checked = list(out.split(b.sizes)), out
        if b.host is None and any(b.on_host):  # replies built in host memory: one copy for all
            checked = out.to("cpu")
            back = checked.split(b.sizes)
            outs = [h if on else o for h, o, on in zip(back, outs, b.on_host, strict=True)]
        # Host sync (none when `checked` is in host memory): each call's first non-finite
        # output row (an expert overflowing on a finite input); rows are independent, so
        # only that call fails.
        _, firsts = _read_back(None, ~torch.isfinite(checked).all(dim=1), b.sizes)
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

    def owners(self, layer: int, device: torch.device, strict: bool = False) -> Owners:
        """Who computes a batch's pairs of `layer` (tables on `device`): replicated experts'
        tokens are divided among their live replicas by outstanding tokens
        (placement.plan_owners). An expert with no live replica goes to its first holder
        (the call then fails or finds it back), or with `strict` gets -1."""
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
        """Step 4: resend the slices of workers that turned out unavailable to live replicas
        of their experts, round by round, until every slice has its partial sums.

        Every round's results are examined, the last one's too. At most W resend rounds
        (each loses a worker, unless their health flaps back in between); a slice still
        failing after them, or an expert with no live replica left, is UNAVAILABLE naming
        the experts and the workers by id (the log has their addresses). Other errors are
        raised as they are. The slices returned hold exactly the pairs dispatched
        (counted), so no partial sum is lost."""
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
            gone = sorted({sl.worker for sl in failed})
            if round_ == W:
                log.warning(
                    "layer %d experts %s: worker(s) %s still unavailable after %d resend "
                    "round(s); the batch fails UNAVAILABLE",
                    layer,
                    experts,
                    self._located(gone),
                    W,
                )
                raise WorkerUnavailableError(
                    f"no live replica for layer {layer} experts {experts}: "
                    + self._down(gone, f"still unavailable after {W} resend round(s)")
                )
            owner = self.owners(layer, x.device, strict=True)
            held = owner.expert.tolist()  # one read back, not one sync per expert
            lost = [e for e in experts if held[e] < 0]
            if lost:
                # Every holder is marked down, maybe for one slow call: ask them again
                # before failing the batch (a dead one refuses at once).
                holders = sorted({w for e in lost for w in self.placement.holders[layer][e]})
                left = deadline - loop.time()
                if left > 0:
                    await self.pool.recheck(holders, min(left, RECHECK_S))
                    owner = self.owners(layer, x.device, strict=True)
                    held = owner.expert.tolist()
                    lost = [e for e in experts if held[e] < 0]
            if lost:
                # Every holder of a lost expert is down: they are the workers to bring back.
                holders = sorted({w for e in lost for w in self.placement.holders[layer][e]})
                log.warning(
                    "layer %d experts %s: no live replica; holder(s) %s unavailable; the "
                    "batch fails UNAVAILABLE",
                    layer,
                    lost,
                    self._located(holders),
                )
                raise WorkerUnavailableError(
                    f"no live replica for layer {layer} experts {lost}: " + self._down(holders)
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

    def _down(self, workers: Iterable[int], state: str = "unavailable") -> str:
        """'worker(s) [ids] <state>', as a client's message names workers, then each
        one's TLS cause when a failed handshake is why it is down (the fix is then in the
        certificates, not the worker)."""
        ids = list(workers)
        names = [self.placement.worker_ids[w] for w in ids]
        causes = [
            f"{name}: TLS: {cause}"
            for name, cause in zip(names, (self.pool.tls_failures[w] for w in ids), strict=True)
            if cause
        ]
        return f"worker(s) {names} {state}" + (f" ({'; '.join(causes)})" if causes else "")

    def _located(self, workers: Iterable[int]) -> str:
        """'id (address)' of each worker, for the master's log only: a client's message
        names workers by id (docs/reference.md, status codes)."""
        ids = self.placement.worker_ids
        return ", ".join(f"{ids[i]} ({self._addresses.get(ids[i], '?')})" for i in workers)

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
