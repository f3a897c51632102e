"""The master's side of the workers: channels to each, health tracking, Forward calls.

A worker on the master's host that has mapped the master's shared region (moe_serve.transport.shm)
gets its tokens and writes its outputs in place; every other call carries bytes. A worker
answers per-token partial sums [N_w, H], or with model.batch_invariant each pair's expert
output [P_w, H] (the engine then weights and adds them: dispatch.combine_pairs).

The bytes path (what a worker on another host gets) uses `master.worker_channels`
connections per worker: one HTTP/2 connection moves one large message at a time (its flow
control windows and a single socket), so a slice larger than `master.worker_chunk_bytes`
goes as chunks of whole rows, in flight together on different connections: the worker
computes one chunk while the next is still on the wire. Each chunk's outputs land in one
output tensor. Copies of a chunk's rows on the master: the row gather (skipped when a
slice holds every row of the batch, the common case for one worker), one into the message
bytes (wire.serialize), then gRPC's own into its slices and the kernel's; the reply is read
in place (wire.parse) and copied once into the output (none when it came in one call).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from moe_serve.config import WorkerConfig, WorldConfig
from moe_serve.errors import (
    DeadlineError,
    MoEError,
    Reason,
    RequestTooLargeError,
    WorkerUnavailableError,
    reason_of,
)
from moe_serve.layer.dispatch import WorkerSlice
from moe_serve.layer.placement import Holdings, holdings
from moe_serve.metrics import MasterMetrics
from moe_serve.tracing import FORWARD, NO_TRACING, Tracing
from moe_serve.transport import fp8
from moe_serve.transport.auth import metadata
from moe_serve.transport.calls import message_options, unary_call
from moe_serve.transport.shm import MIN_SHARED_BYTES, SharedMemoryError, SharedRegion
from moe_serve.transport.tls import ClientTLS, aio_channel, handshake_failure
from moe_serve.transport.wire import serialize, tensor_from_pb
from moe_serve.v1 import moe_pb2 as pb
from moe_serve.v1 import moe_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

HEALTH_INTERVAL_S = 1.0
_CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    # Reconnect to a (re)started worker within a second, not after gRPC's default 1-120 s backoff.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


class WorkerPool:
    """Channels to every worker of the config, created once, and their last known health."""

    def __init__(
        self,
        cfg: WorldConfig,
        metrics: MasterMetrics,
        token: str | None = None,
        tracing: Tracing = NO_TRACING,
    ) -> None:
        """`tracing`: a CLIENT span per Forward call, whose traceparent the worker gets.

        Workers are indexed in the config's order; a reload appends the workers it adds
        (`add`) and retires the ones it removes (`close_worker`), so an index names the same
        worker for the pool's whole life (a batch in flight across a reload stays valid)."""
        self.workers: list[WorkerConfig] = []
        self.metrics = metrics
        self.tracing = tracing
        self._options = message_options(cfg.message_limit("worker")) + _CHANNEL_OPTIONS
        self._tls = ClientTLS.from_config(cfg.security.tls)
        self._connections = cfg.master.worker_channels
        self._layers = tuple(cfg.model.moe_layers)
        self._experts = cfg.model.num_experts
        # channels[w][0] carries health, GetInfo, AttachRegion and shared-memory calls (a
        # worker binds the region to the connection that attached it); bytes calls rotate
        # over all.
        self._channels: list[list[grpc.aio.Channel]] = []
        self._forward: list[list[Callable[..., Awaitable[Any]]]] = []
        self._turn: list[int] = []  # the channel of each worker's next bytes call
        self._health: list[health_pb2_grpc.HealthStub] = []
        self._control: list[pb_grpc.ExpertWorkerStub] = []
        # Rows per bytes call: whole rows of at most worker_chunk_bytes, and no more than a
        # worker batches at once (batching.max_batch_tokens). 0: one call per slice.
        self._chunk_bytes = cfg.master.worker_chunk_bytes
        # FP8 dispatch (moe_serve.transport.fp8): rows and partial sums travel as FP8.
        self._fp8 = cfg.master.wire_dtype == "float8_e4m3fn"
        self._max_chunk_rows = cfg.batching.max_batch_tokens
        # Workers reply one row per pair, for the engine's batch-invariant combine.
        self.pair_outputs = cfg.model.batch_invariant
        self.healthy: list[bool] = []
        self.outstanding: list[int] = []  # tokens in calls not yet answered
        self.call_timeout_s = cfg.master.worker_timeout_s
        self._metadata = metadata(token)  # the bearer token, on every call but health
        self.region = _open_region(cfg)
        self.attached: list[bool] = []  # has mapped self.region
        # Why each worker's last TLS handshake failed, in an operator's words (None: it did
        # not, or TLS is off); a failed call's UNAVAILABLE message for the worker carries it.
        self.tls_failures: list[str | None] = []
        # What each worker last said it serves (GetInfo: held plus retiring), per layer;
        # taken from the config for the workers the master starts with, until they say.
        self.serves: list[Holdings] = []
        self.serves_changed = 0  # bumped whenever an entry of `serves` changes
        self.closed: list[bool] = []  # retired by a reload: no channel, never probed
        self._watch: asyncio.Task[None] | None = None
        for w in cfg.workers:
            self.add(w, serves=holdings(w, self._layers))

    def add(self, worker: WorkerConfig, serves: Holdings | None = None) -> int:
        """Dial `worker` and give it the next index (a reload's new worker: it serves
        nothing until it says otherwise, `serves`)."""
        chs = [
            aio_channel(
                worker.address, self._tls, self._options + _own_connection(j), "security.tls"
            )
            for j in range(self._connections)
        ]
        self.workers.append(worker)
        self._channels.append(chs)
        self._forward.append(
            [unary_call(c, "ExpertWorker", "Forward", pb.ForwardResponse) for c in chs]
        )
        self._turn.append(0)
        self._health.append(health_pb2_grpc.HealthStub(chs[0]))
        self._control.append(pb_grpc.ExpertWorkerStub(chs[0]))
        self.healthy.append(False)
        self.outstanding.append(0)
        self.attached.append(False)
        self.tls_failures.append(None)
        self.serves.append({} if serves is None else serves)
        self.serves_changed += 1
        self.closed.append(False)
        self.metrics.worker_up.labels(worker.id).set(0)
        return len(self.workers) - 1

    def index(self, worker_id: str) -> int | None:
        """The index of the live (not closed) worker `worker_id`, None when there is none
        (the newest: a worker removed and added back before it was closed has two)."""
        for i in reversed(range(len(self.workers))):
            if self.workers[i].id == worker_id and not self.closed[i]:
                return i
        return None

    async def close_worker(self, index: int) -> None:
        """Close the channels of a worker a reload removed (its calls have ended)."""
        if self.closed[index]:
            return
        self.closed[index] = True
        self.healthy[index] = False
        self.serves[index] = {}
        self.serves_changed += 1
        self.metrics.worker_up.remove(self.workers[index].id)
        await asyncio.gather(*(c.close() for c in self._channels[index]))
        log.info("worker %s: connections closed (removed by a reload)", self.workers[index].id)

    def _set_health(self, index: int, up: bool) -> None:
        if self.healthy[index] != up:
            log.info("worker %s is %s", self.workers[index].id, "up" if up else "down")
        self.healthy[index] = up
        if up:
            self.tls_failures[index] = None
        else:
            self.attached[index] = False  # a restarted worker has lost its mapping
        self.metrics.worker_up.labels(self.workers[index].id).set(int(up))

    async def forward(
        self, layer: int, x: torch.Tensor, sl: WorkerSlice, timeout_s: float
    ) -> torch.Tensor:
        """Send one worker its slice of a request; return its partial sums [N_w, H], or
        with `pair_outputs` its pairs' expert outputs [P_w, H] in the slice's pair order."""
        tokens = sl.token_index.shape[0]
        self.outstanding[sl.worker] += tokens
        try:
            out = await self._forward_either(layer, x, sl, timeout_s)
        finally:
            self.outstanding[sl.worker] -= tokens
        self.metrics.worker_pairs.labels(self.workers[sl.worker].id).inc(sl.pair_expert.shape[0])
        return out

    async def _forward_either(
        self, layer: int, x: torch.Tensor, sl: WorkerSlice, timeout_s: float
    ) -> torch.Tensor:
        big = sl.token_index.shape[0] * x.shape[1] * x.element_size() >= MIN_SHARED_BYTES
        if big and self.region is not None and self.attached[sl.worker]:
            out = await self._forward_shared(self.region, layer, x, sl, timeout_s)
            if out is not None:
                return out
        chunks = self._chunks(sl, x.shape[1] * x.element_size())
        if len(chunks) == 1:
            return await self._forward_bytes(layer, x, sl, timeout_s)
        n = sl.token_index.shape[0]
        # token_index holds distinct ascending rows of x: with n of them, all rows in order,
        # and chunk a:b is x[a:b], a view (no gather).
        whole = n == x.shape[0]
        out = torch.empty((self._rows(sl), x.shape[1]), dtype=x.dtype)
        calls = [
            asyncio.ensure_future(
                self._forward_bytes(
                    layer, x, part, timeout_s, (out, rows), x[a:b] if whole else None
                )
            )
            for a, b, part, rows in chunks
        ]
        try:
            # The first chunk to fail fails the slice (the engine resends all of it to
            # replicas, as for an unchunked slice); the others are not waited for.
            await asyncio.gather(*calls)
        finally:
            for call in calls:
                call.cancel()
            await asyncio.gather(*calls, return_exceptions=True)
        return out

    def _rows(self, sl: WorkerSlice) -> int:
        """Rows of a worker's answer to `sl`: one per pair or one per token."""
        return sl.pair_expert.shape[0] if self.pair_outputs else sl.token_index.shape[0]

    def _chunks(
        self, sl: WorkerSlice, row_bytes: int
    ) -> list[tuple[int, int, WorkerSlice, torch.Tensor | slice]]:
        """`sl` cut into chunks of whole rows for separate bytes calls: (first row, end row,
        the chunk as a slice of its own, the rows of the slice's output it answers). One
        chunk (`sl` itself) when it is small enough."""
        n = sl.token_index.shape[0]
        rows = n
        if self._chunk_bytes:
            rows = max(1, min(self._chunk_bytes // row_bytes, self._max_chunk_rows))
        if n <= rows:
            return [(0, n, sl, slice(0, self._rows(sl)))]
        # Pairs by row: dispatch's order is token-major already (then this order is the
        # identity); a stable sort keeps each row's pairs as they were, so every chunk's
        # worker sums a row's pairs exactly as it would in one call.
        order = torch.argsort(sl.pair_token, stable=True)
        token = sl.pair_token[order]
        edges = torch.arange(0, n, rows, dtype=token.dtype, device=token.device)
        # Host sync: how many pairs each chunk carries sets the messages' sizes.
        cuts = [*torch.searchsorted(token, edges).tolist(), token.shape[0]]
        out = []
        for i, a in enumerate(range(0, n, rows)):
            b, p, q = min(a + rows, n), cuts[i], cuts[i + 1]
            pick = order[p:q]
            part = WorkerSlice(
                worker=sl.worker,
                token_index=sl.token_index[a:b],
                pair_token=token[p:q] - a,
                pair_expert=sl.pair_expert[pick],
                pair_weight=sl.pair_weight[pick],
                pair_index=sl.pair_index[pick],
            )
            # The rows it answers, as the output's index (the output is in host memory).
            answers = pick.cpu() if self.pair_outputs else slice(a, b)
            out.append((a, b, part, answers))
        return out

    async def _forward_bytes(
        self,
        layer: int,
        x: torch.Tensor,
        sl: WorkerSlice,
        timeout_s: float,
        into: tuple[torch.Tensor, torch.Tensor | slice] | None = None,
        hidden: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One bytes call for `sl` (its rows `hidden` when the caller has them as a view);
        its output copied `into` (the slice's output, the rows this chunk answers), or
        returned as a view of the reply (no copy)."""
        pairs = _pairs(sl)
        rows = sl.token_index.shape[0]
        if hidden is None and rows == x.shape[0]:
            hidden = x  # distinct ascending rows of x, all of them: x itself, no gather
        if hidden is None:
            hidden = x[sl.token_index.to(x.device)]
        if self._fp8:  # quantized where the rows are: half the bytes of any copy after
            pairs.update(fp8.encode(hidden, "hidden"))
        else:
            pairs["hidden"] = hidden
        request = pb.ForwardRequest(layer=layer, pair_outputs=self.pair_outputs)
        reply = await self._call(sl, layer, serialize(request, pairs), timeout_s, "bytes")
        w = self.workers[sl.worker]
        out = self._output(reply, x, w.id)
        if tuple(out.shape) != (self._rows(sl), x.shape[1]):
            raise MoEError(f"worker {w.id} replied with shape {list(out.shape)}")
        if into is None:
            return out
        whole, at = into
        if isinstance(at, slice):
            return whole[at].copy_(out)
        return whole.index_copy_(0, at, out.to(whole.device))

    def _output(self, reply: Any, x: torch.Tensor, worker_id: str) -> torch.Tensor:
        """A Forward reply's partial sums in x's dtype: a view of the reply's bytes, or with
        FP8 dispatch its FP8 rows widened on x's device."""
        field = f"workers[{worker_id}].output"
        if not self._fp8:
            return tensor_from_pb(reply.output, field, dtypes=frozenset({x.dtype}))
        q = tensor_from_pb(reply.output, field, dtypes=_FP8, rank=2)
        scale = tensor_from_pb(reply.output_scale, f"{field}_scale", dtypes=_FLOAT32, rank=2)
        return fp8.decode_reply(q, scale, x.dtype, x.device, repr(worker_id))

    async def _forward_shared(
        self, region: SharedRegion, layer: int, x: torch.Tensor, sl: WorkerSlice, timeout_s: float
    ) -> torch.Tensor | None:
        """forward through the shared region; None when it is full or the worker lost it."""
        shape = (sl.token_index.shape[0], x.shape[1])
        out_shape = (self._rows(sl), x.shape[1])
        nbytes = shape[0] * shape[1] * x.element_size()
        sizes = (nbytes, out_shape[0] * out_shape[1] * x.element_size())
        blocks = region.lease(*sizes)
        if blocks is None:
            self.metrics.shared_fallbacks.inc()
            return None
        hidden, output = blocks
        clean = False
        try:
            rows = region.view(hidden, x.dtype, shape)
            torch.index_select(x, 0, sl.token_index.to(x.device), out=rows)
            if self._fp8:
                # The bytes path's rounding, applied here too: a token's output must not
                # depend on the transport (Results contract).
                rows.copy_(fp8.round_trip(rows))
            if x.device.type == "cuda":
                # Another process reads these bytes as soon as it has the request.
                torch.cuda.current_stream(x.device).synchronize()
            request = pb.ForwardRequest(
                layer=layer,
                hidden_shared=region.shared(hidden, x.dtype, shape),
                output_shared=region.shared(output, x.dtype, out_shape),
                pair_outputs=self.pair_outputs,
            )
            try:
                await self._call(sl, layer, serialize(request, _pairs(sl)), timeout_s, "shared")
            except RegionLostError:
                self.attached[sl.worker] = False
                asyncio.get_running_loop().create_task(self._attach(sl.worker))
                clean = True  # the worker refused before touching the blocks
                return None
            # The worker synchronised its writes before replying; copy out before reuse
            # (round_trip's result is a copy).
            written = region.view(output, x.dtype, out_shape)
            out = fp8.round_trip(written) if self._fp8 else written.clone()
            clean = True
            return out
        finally:
            region.release(blocks, sizes, clean)

    async def _call(
        self, sl: WorkerSlice, layer: int, request: bytes, timeout_s: float, transport: str
    ) -> Any:
        w = self.workers[sl.worker]
        self.metrics.worker_calls.labels(w.id, transport).inc()
        start = time.perf_counter()
        # Each call is bounded by worker_timeout_s even when the client allows more: a
        # frozen worker (stopped, connection open) must be given up in time to resend.
        bound = min(timeout_s, self.call_timeout_s)
        calls = self._forward[sl.worker]
        if transport == "shared":
            call = calls[0]  # the connection the worker bound the region to
        else:
            turn = self._turn[sl.worker]
            self._turn[sl.worker] = (turn + 1) % len(calls)
            call = calls[turn]
        try:
            if self.tracing.on:
                reply = await self._traced(call, request, bound, sl, layer, transport)
            else:
                reply = await call(request, timeout=bound, metadata=self._metadata)
        except grpc.aio.AioRpcError as exc:
            raise self._call_error(sl, layer, exc, own_bound=bound < timeout_s) from None
        finally:
            self.metrics.worker_rpc_seconds.labels(w.id).observe(time.perf_counter() - start)
        self._set_health(sl.worker, True)
        return reply

    async def _traced(
        self,
        call: Callable[..., Awaitable[Any]],
        request: bytes,
        timeout_s: float,
        sl: WorkerSlice,
        layer: int,
        transport: str,
    ) -> Any:
        """`call` inside its CLIENT span, the span's traceparent in its metadata."""
        w = self.workers[sl.worker]
        attributes = {
            "server.address": w.address,
            "moe_serve.worker.id": w.id,
            "moe_serve.layer": layer,
            "moe_serve.tokens": sl.token_index.shape[0],
            "moe_serve.pairs": sl.pair_expert.shape[0],
            "moe_serve.transport": transport,
            "moe_serve.request_bytes": len(request),
        }
        with self.tracing.client(FORWARD, self._metadata, attributes) as metadata:
            return await call(request, timeout=timeout_s, metadata=metadata)

    async def _attach(self, index: int) -> None:
        """Offer the shared region to worker `index`; it maps it if it is on this host."""
        if self.region is None:
            return
        w = self.workers[index]
        try:
            reply = await self._control[index].AttachRegion(
                self.region.description(), timeout=HEALTH_INTERVAL_S * 5, metadata=self._metadata
            )
        except grpc.aio.AioRpcError as exc:
            log.warning("worker %s: AttachRegion failed: %s", w.id, exc.details())
            return
        if reply.attached != self.attached[index]:
            log.info(
                "worker %s: %s",
                w.id,
                "tensors go through shared memory"
                if reply.attached
                else f"tensors go through gRPC ({reply.reason})",
            )
        self.attached[index] = reply.attached

    def _call_error(
        self, sl: WorkerSlice, layer: int, exc: grpc.aio.AioRpcError, own_bound: bool
    ) -> MoEError:
        w = self.workers[sl.worker]
        code, details, reason = exc.code(), exc.details() or "", reason_of(exc)
        if reason == Reason.REGION_NOT_ATTACHED:
            return RegionLostError(details)
        experts = sorted(set(sl.pair_expert.tolist()))
        # Where the worker runs is for the operator: the log has its address and gRPC's own
        # words; a client's message names the worker by id, and carries the details with
        # every address taken out (gRPC's often name the peer, e.g. "ipv4:10.0.0.12:50061").
        if code == grpc.StatusCode.DEADLINE_EXCEEDED and not own_bound:
            level = logging.INFO  # the client's own deadline passed: routine
        elif reason == Reason.DRAINING:
            level = logging.INFO  # a planned departure (rolling restart): routine; still down
        elif code in _WORKER_DOWN or code in _WORKER_LIMITS:
            level = logging.WARNING
        else:
            level = logging.ERROR  # a code no worker should answer
        log.log(
            level,
            "worker %s (%s), layer %d experts %s: %s: %s",
            w.id,
            w.address,
            layer,
            experts,
            code.name,
            details,
        )
        said = _without_addresses(details, w.address)
        if code == grpc.StatusCode.DEADLINE_EXCEEDED and own_bound:
            # The worker, not the client's deadline, ran out: treat it as down (frozen or
            # overloaded); its slice can still go to a replica.
            self._set_health(sl.worker, False)
            return WorkerUnavailableError(
                f"no live replica for layer {layer} experts {experts}: worker {w.id!r} "
                f"did not answer within master.worker_timeout_s={self.call_timeout_s:g}"
            )
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return DeadlineError(
                f"deadline exceeded waiting for worker {w.id!r}, layer {layer} experts {experts}"
            )
        # CANCELLED here comes from the worker, not from us (our own cancellations raise
        # CancelledError): a server cancels calls it accepted but had not started when it
        # stops. The worker is leaving, and the slice can go to a replica.
        if code in _WORKER_DOWN:
            self._set_health(sl.worker, False)
            tls = self._note_handshake(sl.worker, details) if code == _UNAVAILABLE else None
            why = f"{code.name}: {said}" if tls is None else f"TLS: {tls}"
            return WorkerUnavailableError(
                f"no live replica for layer {layer} experts {experts}: worker {w.id!r} "
                f"is unavailable: {_without_addresses(why, w.address)}"
            )
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            return RequestTooLargeError(f"worker {w.id!r} is over a limit: {said}")
        return MoEError(f"worker {w.id!r} failed: {code.name}: {said}")

    async def probe(self) -> None:
        """Health-check every worker once, concurrently."""

        async def check(i: int) -> None:
            try:
                # wait_for_ready: a probe also (re)connects a channel that is backing off.
                reply = await self._health[i].Check(
                    health_pb2.HealthCheckRequest(), timeout=HEALTH_INTERVAL_S, wait_for_ready=True
                )
                self._set_health(i, reply.status == health_pb2.HealthCheckResponse.SERVING)
            except grpc.aio.AioRpcError as exc:
                self._set_health(i, False)
                await self._diagnose(i, exc)
            if self.healthy[i]:
                await self._learn_serves(i)
            if self.healthy[i] and not self.attached[i]:
                await self._attach(i)

        live = [i for i in range(len(self.workers)) if not self.closed[i]]
        await asyncio.gather(*(check(i) for i in live))

    async def recheck(self, workers: list[int], timeout_s: float) -> None:
        """Health-check `workers` once more, now, without waiting for a connection: a batch
        about to fail for want of a live replica first asks its holders again (one marked
        down for a single slow call may answer at once; a dead one refuses at once)."""

        async def check(i: int) -> None:
            try:
                reply = await self._health[i].Check(
                    health_pb2.HealthCheckRequest(), timeout=timeout_s
                )
            except grpc.aio.AioRpcError:
                return  # still down: the probe loop and its diagnosis carry on
            self._set_health(i, reply.status == health_pb2.HealthCheckResponse.SERVING)

        await asyncio.gather(*(check(i) for i in workers if not self.closed[i]))

    async def _learn_serves(self, index: int) -> None:
        """Ask worker `index` what it serves now (GetInfo: held plus retiring, per layer):
        after a reload the master routes an expert to a new holder only once it says so.
        Kept as it was when the worker does not answer; what it names is bounded to the
        model's layers and experts."""
        try:
            info = await self._control[index].GetInfo(
                pb.GetInfoRequest(), timeout=HEALTH_INTERVAL_S, metadata=self._metadata
            )
        except grpc.aio.AioRpcError:
            return
        serves: dict[int, set[int]] = {la: set() for la in self._layers}
        for entry in (*info.placement, *info.retiring):
            if entry.layer in serves:
                serves[entry.layer].update(e for e in entry.experts if 0 <= e < self._experts)
        now = {la: frozenset(es) for la, es in serves.items()}
        if now != self.serves[index]:
            self.serves[index] = now
            self.serves_changed += 1

    async def _diagnose(self, index: int, exc: grpc.aio.AioRpcError) -> None:
        """Find out whether TLS is why worker `index` failed its health check (and say so,
        once: `_note_handshake`). A probe waits for the channel to be ready, so a handshake
        that keeps failing ends it with a bare "Deadline Exceeded"; one call that does not
        wait fails at once with gRPC's last connection error, which names the handshake."""
        if self._tls is None:
            return
        details = exc.details() or ""
        # A READY channel connected: the worker is slow or frozen, not refused at handshake
        # (and a second call would only wait as long again).
        state = self._channels[index][0].get_state(try_to_connect=False)
        if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED and state != _READY:
            try:
                # Fails at once on a channel in backoff; half a probe interval bounds one
                # that is mid-connect, so the probe round stays within 1.5 intervals.
                await self._health[index].Check(
                    health_pb2.HealthCheckRequest(), timeout=HEALTH_INTERVAL_S / 2
                )
                details = ""  # it connects now: the next probe finds it up
            except grpc.aio.AioRpcError as again:
                details = again.details() or ""
        self._note_handshake(index, details)

    def _note_handshake(self, index: int, details: str) -> str | None:
        """The TLS cause of worker `index`'s failure, from gRPC's `details` (None: the
        failure is not the handshake's). A new cause is logged at WARNING, with the worker's
        address, the name its certificate was checked against and gRPC's own words."""
        if self._tls is None:
            return None
        w = self.workers[index]
        cause = handshake_failure(details, self._tls.checked_name(w.address))
        if cause is not None and cause != self.tls_failures[index]:
            log.warning(
                "TLS: worker %s at %s failed the handshake: %s (gRPC: %s)",
                w.id,
                w.address,
                cause,
                details,
            )
        self.tls_failures[index] = cause
        return cause

    def start_watch(self, on_probe: Callable[[list[bool]], Awaitable[None]]) -> None:
        """Probe every HEALTH_INTERVAL_S in the background; hand `on_probe` who is up."""

        async def watch() -> None:
            while True:
                await self.probe()
                await on_probe(list(self.healthy))
                await asyncio.sleep(HEALTH_INTERVAL_S)

        self._watch = asyncio.get_running_loop().create_task(watch())

    async def close(self) -> None:
        """Stop probing and close every channel."""
        if self._watch is not None:
            self._watch.cancel()
            await asyncio.gather(self._watch, return_exceptions=True)
        await asyncio.gather(
            *(c.close() for i, chs in enumerate(self._channels) if not self.closed[i] for c in chs)
        )
        if self.region is not None:
            self.region.close()


_FP8 = frozenset({fp8.FP8})
_FLOAT32 = frozenset({torch.float32})


class RegionLostError(MoEError):
    """The worker no longer has the shared region mapped (it restarted between probes)."""


# Codes after which the worker counts as down and its slice goes to a replica.
_UNAVAILABLE = grpc.StatusCode.UNAVAILABLE  # the one a failed handshake ends a call with
_READY = grpc.ChannelConnectivity.READY
_WORKER_DOWN = (_UNAVAILABLE, grpc.StatusCode.CANCELLED)
# Codes of a worker that is up but over a bound (its queue, its worker_timeout_s).
_WORKER_LIMITS = (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED)

# Peer addresses as gRPC writes them ("ipv4:10.0.0.12:50061", "ipv6:[::1]:50061",
# "unix:/run/w0.sock"), and bare IPv4 / bracketed IPv6 literals with an optional port.
_ADDRESS = re.compile(
    r"\b(?:ipv4|ipv6|unix|unix-abstract|vsock|dns):[^\s,;'\"()]*[^\s,;'\"():]"
    r"|\[[0-9A-Za-z:.%]+\](?::\d+)?"
    r"|\b\d{1,3}(?:\.\d{1,3}){3}(?::\d+)?\b"
)


def _without_addresses(details: str, address: str) -> str:
    """A worker's error details fit for a client: its configured address (and host name)
    and any peer address gRPC wrote replaced by "<address>"."""
    host = address.rsplit(":", 1)[0].strip("[]")
    for known in (address, host):
        if known:
            details = details.replace(known, "<address>")
    return _ADDRESS.sub("<address>", details)


def _own_connection(index: int) -> list[tuple[str, int]]:
    """Channel options that give a channel a connection of its own: gRPC shares one
    subchannel (one connection) among channels of equal target and options, unless each
    keeps a local subchannel pool; the index makes the options differ as well."""
    return [("grpc.use_local_subchannel_pool", 1), ("moe_serve.channel_index", index)]


def _pairs(sl: WorkerSlice) -> dict[str, torch.Tensor]:
    return {
        "pair_token": sl.pair_token,
        "pair_expert": sl.pair_expert,
        "pair_weight": sl.pair_weight,
    }


def _open_region(cfg: WorldConfig) -> SharedRegion | None:
    """The master's shared region, or None when it is off or this host cannot make one."""
    size = cfg.master.shared_memory_bytes
    if size == 0:
        return None
    try:
        return SharedRegion(size, torch.device(cfg.master.device))
    except SharedMemoryError as exc:
        log.warning("master: no shared memory fast path: %s", exc)
        return None
