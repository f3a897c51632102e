"""FP8 dispatch against the model dtype, in one process: bytes per token and accuracy.

`fp8_report` runs one MoE layer twice over the same tokens, through the master's engine
(gate -> dispatch -> combine) and every worker's engine, with each worker call going
through real Forward messages both ways: once in the model dtype, once with FP8 dispatch
(`master.wire_dtype: float8_e4m3fn`, moe_serve.transport.fp8). It counts the messages'
bytes and compares the two outputs. `moe-serve bench` and benchmarks/fp8_dispatch.py call it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import torch

from moe_serve.config import WorldConfig
from moe_serve.errors import MoEError
from moe_serve.layer.dispatch import WorkerSlice
from moe_serve.layer.gating import Routing
from moe_serve.master.engine import MasterEngine
from moe_serve.metrics import MasterMetrics
from moe_serve.transport import fp8
from moe_serve.transport.wire import parse, serialize, tensor_from_pb
from moe_serve.v1 import moe_pb2 as pb
from moe_serve.weights import open_weights
from moe_serve.worker.engine import WorkerEngine

# The accuracy gate: relative Frobenius error of the layer output with FP8 dispatch against
# the model dtype (measured 0.038 for MLP/GELU and 0.046-0.047 for GLU/SiLU experts, in
# bfloat16 and float32: docs/models.md, FP8 dispatch; E4M3 itself errs 2.7% per rounding, and
# a row is rounded on the way out and its partial sums on the way back), and routing
# unchanged (the gate runs before any rounding).
REL_ERROR_BOUND = 0.06
TOPK_AGREEMENT_BOUND = 1.0


class WireWorkers:
    """The workers as an ExpertPool (moe_serve.master.engine) in this process, each call
    through real Forward messages: the master's encoding of its rows (the model dtype, or
    FP8 with `quantized`), wire.serialize and wire.parse, the worker's decode and engine,
    its reply encoded as the worker service encodes it, and the master's decode. `nbytes`
    counts every request and reply serialized. `pair_outputs`: workers answer each pair's
    expert output (model.batch_invariant), else per-token partial sums."""

    def __init__(
        self, engines: Sequence[WorkerEngine], quantized: bool, pair_outputs: bool
    ) -> None:
        self.engines, self.quantized, self.pair_outputs = list(engines), quantized, pair_outputs
        self.healthy = [True] * len(self.engines)
        self.outstanding = [0] * len(self.engines)
        self.tls_failures: list[str | None] = [None] * len(self.engines)
        self.nbytes = 0

    async def recheck(self, workers: list[int], timeout_s: float) -> None:
        """In-process workers are never marked down: nothing to ask again."""

    async def forward(
        self, layer: int, x: torch.Tensor, sl: WorkerSlice, timeout_s: float
    ) -> torch.Tensor:
        """x [T, H] -> worker `sl.worker`'s answer ([P_w, H] pair outputs or [N_w, H] partial
        sums) in x's dtype and device."""
        engine = self.engines[sl.worker]
        dev = engine.devices[0]
        rows = x[sl.token_index.to(x.device)]
        tensors = {"pair_token": sl.pair_token, "pair_expert": sl.pair_expert}
        tensors["pair_weight"] = sl.pair_weight
        tensors.update(fp8.encode(rows, "hidden") if self.quantized else {"hidden": rows})
        request = serialize(pb.ForwardRequest(layer=layer, pair_outputs=self.pair_outputs), tensors)
        got = parse(pb.ForwardRequest, request)
        hidden = tensor_from_pb(got.hidden, "hidden", rank=2)
        if self.quantized:
            scale = tensor_from_pb(got.hidden_scale, "hidden_scale", rank=2)
            hidden = fp8.decode_request(hidden, scale, engine.dtype, dev, "hidden")
        token, expert, weight = (
            tensor_from_pb(getattr(got, f), f, rank=1).to(dev)
            for f in ("pair_token", "pair_expert", "pair_weight")
        )
        out = engine.forward(
            layer, hidden.to(dev), token, expert, weight, out_device=dev, pairs=got.pair_outputs
        )
        answer = fp8.encode(out, "output") if self.quantized else {"output": out}
        reply = serialize(pb.ForwardResponse(), answer)
        self.nbytes += len(request) + len(reply)
        back = parse(pb.ForwardResponse, reply, trusted=True)
        q = tensor_from_pb(back.output, "output", rank=2)
        if not self.quantized:
            return q.to(x.device)
        scale = tensor_from_pb(back.output_scale, "output_scale", rank=2)
        return fp8.decode_reply(q, scale, x.dtype, x.device, repr(engine.worker.id))


def _run(engine: MasterEngine, layer: int, x: torch.Tensor) -> tuple[torch.Tensor, Routing]:
    loop = asyncio.new_event_loop()
    try:
        (outcome,) = loop.run_until_complete(engine.forward(layer, [x]))
    finally:
        loop.close()
    if isinstance(outcome, MoEError):
        raise outcome
    return outcome


@torch.inference_mode()
def fp8_report(
    cfg: WorldConfig,
    layer: int,
    tokens: int = 4096,
    *,
    engines: Sequence[WorkerEngine] | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """FP8 dispatch against the model dtype on `tokens` seeded N(0, 1) rows of `layer`.

    `engines`: the workers' engines when the caller has them loaded (default: loaded here
    from cfg, each on its devices). Returns `fp8_bytes_ratio` (bytes of the Forward
    requests and replies with FP8 ÷ in the model dtype, from the serialized messages),
    `fp8_rel_error` (relative Frobenius error of the layer output), `fp8_topk_agreement`
    (fraction of tokens routed to the same experts), `fp8_gate_passed` (error <=
    REL_ERROR_BOUND and agreement 1.0), and the bytes per token of each.
    """
    source = open_weights(cfg.model, cfg.routing)
    if engines is None:
        engines = [WorkerEngine(cfg.model, w, source) for w in cfg.workers]
    pairs = cfg.model.batch_invariant
    plain, quantized = WireWorkers(engines, False, pairs), WireWorkers(engines, True, pairs)
    engine = MasterEngine(cfg, plain, MasterMetrics(), source)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, cfg.model.hidden_size, generator=g)
    x = x.to(engine.device, engine.dtype)
    want, want_r = _run(engine, layer, x)
    engine.pool = quantized
    got, got_r = _run(engine, layer, x)
    diff = torch.linalg.vector_norm((got.float() - want.float()).flatten())
    rel = float(diff / torch.linalg.vector_norm(want.float().flatten()).clamp_min(1e-30))
    same = (got_r.expert_ids.sort(dim=1).values == want_r.expert_ids.sort(dim=1).values).all(1)
    agreement = float(same.float().mean())
    return {
        "fp8_bytes_ratio": quantized.nbytes / plain.nbytes,
        "fp8_rel_error": rel,
        "fp8_topk_agreement": agreement,
        "fp8_gate_passed": rel <= REL_ERROR_BOUND and agreement >= TOPK_AGREEMENT_BOUND,
        "fp8_bytes_per_token": quantized.nbytes / tokens,
        "model_dtype_bytes_per_token": plain.nbytes / tokens,
        "fp8_rel_error_bound": REL_ERROR_BOUND,
        "tokens": tokens,
        "layer": layer,
        "dtype": cfg.model.dtype,
        "hidden_size": cfg.model.hidden_size,
    }
