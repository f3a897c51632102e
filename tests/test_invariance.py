"""Batch-invariant results (ARCHITECTURE "Results"): a token's output is the same bits
whatever its batch mates, whatever the placement, shared memory or bytes. Every check here
is torch.equal, never allclose: one flipped last bit fails it.

Kernels first (rowwise.linear, ordered_sum, the worker's grouped forward, the gate), then
the served layer through real gRPC servers: a token alone and inside a request, concurrent
clients whose calls the master and workers merge, placements, shared memory off.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moe_serve.client import MoEClient
from moe_serve.config import parse_config
from moe_serve.layer.experts import ExpertStack, expert_forward, grouped_forward
from moe_serve.layer.gating import Gate
from moe_serve.layer.rowwise import ROW_FLOOR, linear, ordered_sum
from moe_serve.tools.bench import InProcessMoE
from moe_serve.transport.wire import serialize, tensor_from_pb
from moe_serve.v1 import moe_pb2 as pb
from moe_serve.v1 import moe_pb2_grpc as pb_grpc
from moe_serve.weights import open_weights
from tests.conftest import world
from tests.support.cluster import InProcessCluster

H = 64
DTYPES = [torch.float32, torch.bfloat16]
FEW = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SERVED = settings(
    max_examples=8,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


def rows(n: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(n, H, generator=torch.Generator().manual_seed(seed)).to(dtype)


# ------------------------------------------------------------------ kernels ---


@FEW
@given(T=st.integers(1, 300), at=st.integers(0, 299), dtype=st.sampled_from(DTYPES))
def test_linear_gives_a_row_the_bits_it_gets_alone(T: int, at: int, dtype: torch.dtype) -> None:
    at %= T
    x, w = rows(T, 1, dtype), rows(96, 2, dtype)
    b = rows(1, 3, dtype)[0].repeat(2)[:96]
    assert torch.equal(linear(x, w, b)[at], linear(x[at : at + 1], w, b)[0])


def test_linear_pads_small_calls_on_cpu_up_to_the_row_floor() -> None:
    """Without the floor a 1-row float32 call takes MKL's GEMV path: different bits."""
    x, w = rows(40, 4), rows(96, 5)
    alone = torch.nn.functional.linear(x[:1], w)
    inside = torch.nn.functional.linear(x, w)[:1]
    assert not torch.equal(alone, inside), "this CPU's GEMM no longer special-cases 1 row"
    assert torch.equal(linear(x[:1], w), inside) and ROW_FLOOR >= 4


def test_ordered_sum_adds_a_tokens_terms_in_the_order_given() -> None:
    # 1e8 + 1 rounds back to 1e8 in float32: the order decides the sum.
    values = torch.tensor([[1e8], [-1e8], [1.0], [1e8], [1.0], [-1e8]])
    token = torch.tensor([0, 0, 0, 1, 1, 1])
    assert ordered_sum(2, token, values).flatten().tolist() == [1.0, 0.0]


@FEW
@given(mates=st.integers(0, 40), seed=st.integers(0, 1000))
def test_ordered_sum_of_a_token_does_not_depend_on_other_tokens(mates: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    mine = torch.randn(3, 8, generator=g) * 1e4
    token = torch.randint(0, 5, (mates,), generator=g) + 1
    values = torch.cat([torch.randn(mates, 8, generator=g) * 1e4, mine])
    token = torch.cat([token, torch.zeros(3, dtype=torch.int64)])
    perm = torch.randperm(mates + 3, generator=g)
    keep = perm[perm < mates]  # shuffle the mates, keep token 0's three terms in order
    order = torch.cat([keep, torch.arange(mates, mates + 3)])
    alone = ordered_sum(1, torch.zeros(3, dtype=torch.int64), mine)
    assert torch.equal(ordered_sum(6, token[order], values[order])[0], alone[0])


def stack(dtype: torch.dtype, kind: str = "glu") -> ExpertStack:
    cfg = parse_config(world(model={"expert_kind": kind}))
    weights = open_weights(cfg.model, cfg.routing).experts(0, list(range(8)))
    return ExpertStack(kind, "silu", weights, torch.device("cpu"), dtype)


@FEW
@given(
    T=st.integers(1, 200),
    at=st.integers(0, 199),
    k=st.integers(1, 4),
    seed=st.integers(0, 1000),
    dtype=st.sampled_from(DTYPES),
    kind=st.sampled_from(["glu", "mlp"]),
)
def test_grouped_forward_gives_a_token_the_bits_it_gets_alone(
    T: int, at: int, k: int, seed: int, dtype: torch.dtype, kind: str
) -> None:
    at %= T
    g = torch.Generator().manual_seed(seed)
    s = stack(dtype, kind)
    hidden = rows(T, seed, dtype)
    slot = torch.stack([torch.randperm(8, generator=g)[:k] for _ in range(T)]).flatten()
    token = torch.arange(T).repeat_interleave(k)
    weight = torch.rand(T * k, generator=g)
    everyone = grouped_forward(s, hidden, token, slot, weight)
    mine = slice(at * k, at * k + k)
    alone = grouped_forward(
        s, hidden[at : at + 1], torch.zeros(k, dtype=torch.int64), slot[mine], weight[mine]
    )
    assert torch.equal(everyone[at], alone[0])


@FEW
@given(T=st.integers(1, 300), at=st.integers(0, 299), router=st.sampled_from(["float32", "model"]))
def test_the_gate_gives_a_token_the_routing_it_gets_alone(T: int, at: int, router: str) -> None:
    at %= T
    cfg = parse_config(world(model={"dtype": "bfloat16"}, routing={"router_dtype": router}))
    gate = Gate.load(
        open_weights(cfg.model, cfg.routing), 0, 2, cfg.routing, torch.device("cpu"),
        torch.bfloat16,
    )  # fmt: skip
    x = rows(T, 7, torch.bfloat16)
    full, alone = gate(x, losses=False), gate(x[at : at + 1], losses=False)
    assert torch.equal(full.scores[at], alone.scores[0])
    assert torch.equal(full.weights[at], alone.weights[0])
    assert torch.equal(full.expert_ids[at], alone.expert_ids[0])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("extra", [{}, {"shared_expert_ffn_size": 32}, {"top_k": 3}])
def test_the_in_process_layer_gives_every_prefix_the_rows_of_the_whole(
    dtype: str, extra: dict[str, Any]
) -> None:
    layer = InProcessMoE(parse_config(world(model={"dtype": dtype, **extra})))
    x = rows(300, 11)
    full = layer.forward(x, 0)
    for k in (1, 2, 3, 4, 5, 8, 16, 17, 64, 299):
        assert torch.equal(layer.forward(x[:k], 0), full[:k]), f"first {k} rows"


# ------------------------------------------------------------ served layer ---


@pytest.fixture(scope="module")
def served(in_process_factory: Callable[..., InProcessCluster]) -> Iterator[InProcessCluster]:
    yield in_process_factory(world(model={"moe_layers": [0, 1]}))


@SERVED
@given(T=st.integers(1, 200), at=st.integers(0, 199), layer=st.sampled_from([0, 1]))
def test_a_token_gets_the_same_bits_alone_and_inside_a_request(
    served: InProcessCluster, T: int, at: int, layer: int
) -> None:
    at %= T
    x = rows(T, T)
    with MoEClient(served.address) as client:
        assert torch.equal(
            client.infer(x, layer=layer)[at], client.infer(x[at : at + 1], layer=layer)[0]
        )


def test_concurrent_clients_get_the_bits_each_gets_alone(served: InProcessCluster) -> None:
    """8 clients x 30 calls at once: the master merges Infer calls and the workers merge
    Forward calls; every reply equals the same input sent alone."""
    inputs = [rows(1 + 3 * i, 100 + i) for i in range(8)]
    with MoEClient(served.address) as client:
        alone = [client.infer(x) for x in inputs]
    differ: list[int] = []

    def run(i: int) -> None:
        with MoEClient(served.address) as client:
            for _ in range(30):
                if not torch.equal(client.infer(inputs[i]), alone[i]):
                    differ.append(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert differ == []


PLACEMENTS: dict[str, dict[str, Any]] = {
    "split": {},
    "one worker": {"workers": [{"experts": list(range(8))}]},
    "replicated": {"workers": [{"experts": list(range(8))}, {"experts": [0, 1, 2, 3]}]},
    "per layer": {
        "workers": [
            {"experts": {0: [0, 1, 2, 3, 4], 1: [5, 6, 7]}},
            {"experts": {0: [5, 6, 7], 1: [0, 1, 2, 3, 4]}},
        ]
    },
    "shared memory off": {"master": {"shared_memory_bytes": 0}},
    # Bytes calls cut into chunks of 8 rows, in flight on 3 connections at once.
    "chunked": {"master": {"shared_memory_bytes": 0, "worker_chunk_bytes": 8 * H * 4}},
}


def served_outputs(
    factory: Callable[..., InProcessCluster],
    model: dict[str, Any],
    x: torch.Tensor,
    **sections: Any,
) -> list[torch.Tensor]:
    """Layers 0 and 1 of x through a world of `model` placed as `sections`."""
    c = factory(world(model={"moe_layers": [0, 1], **model}, **sections))
    try:
        with MoEClient(c.address) as client:
            return [client.infer(x, layer=layer) for layer in (0, 1)]
    finally:
        c.stop()


@pytest.mark.parametrize(
    ("dtype", "top_k"), [("float32", 2), ("bfloat16", 2), ("float32", 3), ("bfloat16", 3)]
)
def test_placement_and_transport_do_not_change_the_bits(
    in_process_factory: Callable[..., InProcessCluster], dtype: str, top_k: int
) -> None:
    """Workers answer each pair's expert output and the master adds a token's pairs in its
    top-k order: one worker or several, replicas or not, bytes or shared memory, chunked or
    not, the sum is the same sum."""
    x = rows(64, 5)
    model = {"dtype": dtype, "top_k": top_k}
    got = {
        name: served_outputs(in_process_factory, model, x, **sections)
        for name, sections in PLACEMENTS.items()
    }
    for name, outs in got.items():
        for layer in (0, 1):
            assert torch.equal(outs[layer], got["split"][layer]), f"{name}, layer {layer}"


# Each expert of each layer on a random non-empty set of 3 workers (replicas included).
holders = st.lists(st.integers(1, 7), min_size=8, max_size=8)


@SERVED
@given(layer0=holders, layer1=holders, shm=st.booleans(), top_k=st.integers(1, 4))
def test_any_placement_gives_the_bits_of_one_worker(
    in_process_factory: Callable[..., InProcessCluster],
    layer0: list[int],
    layer1: list[int],
    shm: bool,
    top_k: int,
) -> None:
    """Bit masks over 3 workers per expert: a worker holds expert e of a layer when its bit
    is set in the draw. bfloat16, with shared memory on or off."""
    x = rows(48, 9)
    model = {"dtype": "bfloat16", "top_k": top_k}
    one = served_outputs(in_process_factory, model, x, workers=[{"experts": list(range(8))}])
    workers = [
        {
            "experts": {
                la: [e for e, m in enumerate(draw) if m >> w & 1]
                for la, draw in enumerate((layer0, layer1))
            }
        }
        for w in range(3)
    ]
    workers = [w for w in workers if any(w["experts"].values())]
    master = {"shared_memory_bytes": 0} if not shm else {}
    placed = served_outputs(in_process_factory, model, x, workers=workers, master=master)
    for layer in (0, 1):
        assert torch.equal(placed[layer], one[layer]), f"layer {layer}: {workers}"


def test_a_worker_answers_each_pairs_expert_output_when_asked(served: InProcessCluster) -> None:
    """Forward with pair_outputs: row p is expert pair_expert[p] of its token, unweighted
    (the weights are the master's to apply); the same call without it sums per token."""
    w0 = served.cfg.workers[0]
    held = w0.experts_on(0)[:2]
    hidden = rows(3, 21)
    token = torch.tensor([0, 0, 2], dtype=torch.int32)
    expert = torch.tensor([held[0], held[1], held[1]], dtype=torch.int32)
    weight = torch.tensor([0.25, 0.75, 0.5])
    tensors = {"hidden": hidden, "pair_token": token, "pair_expert": expert, "pair_weight": weight}
    with grpc.insecure_channel(w0.address) as channel:
        stub = pb_grpc.ExpertWorkerStub(channel)
        ask = pb.ForwardRequest(layer=0, pair_outputs=True)
        pairs = tensor_from_pb(
            stub.Forward(pb.ForwardRequest.FromString(serialize(ask, tensors))).output, "output"
        )
        sums = tensor_from_pb(
            stub.Forward(
                pb.ForwardRequest.FromString(serialize(pb.ForwardRequest(layer=0), tensors))
            ).output,
            "output",
        )
    source = open_weights(served.cfg.model, served.cfg.routing)
    m = served.cfg.model
    experts = dict(zip(held, source.experts(0, held), strict=True))
    expected = torch.stack(
        [
            expert_forward(m.expert_kind, m.activation, experts[e], hidden[t : t + 1])[0]
            for t, e in zip(token.tolist(), expert.tolist(), strict=True)
        ]
    )
    assert pairs.shape == (3, H) and sums.shape == (3, H)
    assert torch.equal(pairs, expected)
    assert torch.equal(sums[1], torch.zeros(H))  # token 1 has no pair here
    assert torch.allclose(sums[0], 0.25 * expected[0] + 0.75 * expected[1], atol=1e-6)


def test_batch_invariant_false_takes_the_librarys_kernels_and_says_so() -> None:
    """The switch is real: off, a 1-row float32 gate takes MKL's GEMV path (other bits)."""
    on = InProcessMoE(parse_config(world()))
    off = InProcessMoE(parse_config(world(model={"batch_invariant": False})))
    x = rows(40, 12)
    assert torch.equal(on.forward(x[:1], 0), on.forward(x, 0)[:1])
    assert not torch.equal(off.forward(x[:1], 0), off.forward(x, 0)[:1])
