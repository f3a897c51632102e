"""Token budgets: what is admitted, what is refused, and that refusals free nothing; a
worker's admission counts (token, expert) pairs, and a call's pairs are bounded by its tokens."""

from __future__ import annotations

import asyncio
import time
import urllib.request
from typing import Any

import grpc
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from moe_serve.batching import TokenBudget
from moe_serve.client import MoEClient
from moe_serve.config import BatchingConfig, ModelConfig, RoutingConfig, WorkerConfig
from moe_serve.errors import InvalidRequestError, RequestTooLargeError
from moe_serve.metrics import WorkerMetrics
from moe_serve.transport.calls import message_options
from moe_serve.transport.wire import tensor_to_pb
from moe_serve.v1 import moe_pb2 as pb
from moe_serve.v1 import moe_pb2_grpc as pb_grpc
from moe_serve.weights import SyntheticWeights
from moe_serve.worker.batcher import DynamicBatcher
from moe_serve.worker.engine import WorkerEngine
from tests.conftest import Cluster, world


def test_calls_within_the_limit_are_admitted_and_released() -> None:
    budget = TokenBudget(10, "master.max_pending_tokens", "master")
    with budget.admit(4), budget.admit(6):
        assert budget.held == 10
    assert budget.held == 0


def test_a_call_beyond_the_limit_is_refused_naming_the_key_and_holds_nothing() -> None:
    budget = TokenBudget(10, "batching.max_queue_tokens", "worker")
    with budget.admit(8):
        with pytest.raises(RequestTooLargeError) as err, budget.admit(3):
            pass
        assert budget.held == 8
    assert "worker is over batching.max_queue_tokens=10: 8 tokens held, 3 more asked" in str(
        err.value
    )
    assert budget.held == 0


def test_a_lone_call_larger_than_the_limit_still_runs() -> None:
    budget = TokenBudget(10, "master.max_pending_tokens", "master")
    with budget.admit(50):
        assert budget.held == 50


# --- a worker's admission counts (token, expert) pairs --------------------------------------

H = 64


def tiny_engine() -> WorkerEngine:
    model = ModelConfig(hidden_size=8, expert_ffn_size=16, num_experts=4, top_k=2)
    worker = WorkerConfig(id="w0", address="127.0.0.1:1", experts=[0, 1, 2, 3])
    return WorkerEngine(model, worker, SyntheticWeights(model, RoutingConfig()), cuda_graphs=False)


def pairs(n: int, tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`n` pairs over `tokens` rows and 4 experts: (pair_token, pair_expert, pair_weight)."""
    i = torch.arange(n, dtype=torch.int32)
    return i % tokens, i % 4, torch.ones(n)


async def held_then_refused() -> tuple[int, str]:
    # The batching loop is not started: the first call stays held while the second asks.
    batcher = DynamicBatcher(tiny_engine(), BatchingConfig(max_queue_tokens=10), WorkerMetrics())
    first = asyncio.create_task(batcher.submit(0, torch.zeros(2, 8), *pairs(8, 2)))
    await asyncio.sleep(0)
    held = batcher.budget.held
    with pytest.raises(RequestTooLargeError) as err:
        await batcher.submit(0, torch.zeros(1, 8), *pairs(3, 1))
    first.cancel()
    return held, str(err.value)


def test_a_worker_call_holds_max_of_its_tokens_and_pairs() -> None:
    held, message = asyncio.run(held_then_refused())
    assert held == 8  # 2 tokens, 8 pairs: tokens alone (2 + 1 <= 10) would admit the second
    assert "worker is over batching.max_queue_tokens=10: 8 tokens or pairs held, 3 more" in message


def test_more_pairs_than_tokens_times_held_experts_names_pair_token() -> None:
    engine = tiny_engine()
    engine.validate(0, 2, *pairs(8, 2))  # 2 tokens x 4 experts: the most there can be
    with pytest.raises(InvalidRequestError, match=r"pair_token\.shape\[0\]: 9 pairs for 2 tokens"):
        engine.validate(0, 2, *pairs(9, 2))


@pytest.fixture(scope="module")
def cluster(cluster_factory: Any) -> Cluster:
    return cluster_factory(world())


def forward(address: str, tokens: int, n_pairs: int, timeout: float = 30) -> pb.ForwardResponse:
    request = pb.ForwardRequest(
        layer=0,
        hidden=tensor_to_pb(torch.ones(tokens, H)),
        pair_token=tensor_to_pb(torch.zeros(n_pairs, dtype=torch.int32)),
        pair_expert=tensor_to_pb(torch.arange(n_pairs, dtype=torch.int32) % 4),
        pair_weight=tensor_to_pb(torch.full((n_pairs,), 0.5)),
    )
    with grpc.insecure_channel(address, options=message_options(1 << 30)) as channel:
        return pb_grpc.ExpertWorkerStub(channel).Forward(request, timeout=timeout)


def worker_rss(cluster: Cluster) -> float:
    with urllib.request.urlopen(cluster.metrics_url("w0"), timeout=10) as reply:
        text = reply.read().decode()
    return next(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "process_resident_memory_bytes"
    )


INVALID, EXHAUSTED = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED


@pytest.mark.parametrize(
    ("n_pairs", "codes"),
    [
        (1_000_000, {INVALID}),  # a 12 MB message, within this world's message limit
        (2_000_000, {INVALID, EXHAUSTED}),  # 24 MB: the message limit may refuse it first
    ],
)
def test_one_token_with_millions_of_pairs_is_refused_at_once_and_costs_little(
    cluster: Cluster, n_pairs: int, codes: set[grpc.StatusCode]
) -> None:
    address = cluster.cfg.worker("w0").address
    forward(address, 1, 4)  # warm: first-call allocations are not the attack's
    before = worker_rss(cluster)
    start = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        forward(address, 1, n_pairs)  # before: a [P, H] gather of 256 MB or more, then OK
    seconds = time.monotonic() - start
    growth = worker_rss(cluster) - before
    assert err.value.code() in codes, err.value.details()
    if err.value.code() == INVALID:
        assert f"pair_token.shape[0]: {n_pairs} pairs for 1 tokens; expected at most 4" in (
            err.value.details()
        )
    assert seconds < 5.0, seconds  # generous: the message itself crosses loopback
    assert growth < 100e6, growth  # the message's own copies, not the gather it asks for
    assert list(forward(address, 2, 8).output.shape) == [2, H]  # good calls are still served
    with MoEClient(cluster.address) as client:
        assert client.infer(torch.randn(3, H)).shape == (3, H)
