"""Master-side batching: concurrent Infer calls share one gate and fan-out, and each call
still gets exactly its own rows, routing, capacity drops and errors."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest
import torch

from moe_serve.client import AsyncMoEClient, MoEClient, MoEServeError
from moe_serve.layer.reference import ReferenceMoE
from tests.conftest import Cluster, world
from tests.test_metrics import scrape, total

FP32_TOL = 1e-5
WINDOW_US = 50_000  # long enough that calls sent together always meet in one batch


def _x(tokens: int, seed: int) -> torch.Tensor:
    return torch.randn(tokens, 64, generator=torch.Generator().manual_seed(seed))


async def _together(address: str, xs: list[torch.Tensor], routing: bool = False) -> list[Any]:
    async with AsyncMoEClient(address) as client:
        return await asyncio.gather(
            *(client.infer(x, return_routing=routing) for x in xs), return_exceptions=True
        )


@pytest.fixture(scope="module")
def windowed(in_process_factory: Any) -> Cluster:
    return in_process_factory(world(master={"batch_delay_us": WINDOW_US}))


@pytest.fixture(scope="module")
def capped(in_process_factory: Any) -> Cluster:
    return in_process_factory(
        world(routing={"capacity_factor": 0.5}, master={"batch_delay_us": WINDOW_US})
    )


def test_concurrent_calls_are_merged_into_shared_passes(windowed: Cluster) -> None:
    before = scrape(windowed.metrics_url())
    asyncio.run(_together(windowed.address, [_x(3, i) for i in range(16)]))
    after = scrape(windowed.metrics_url())
    name = "moe_serve_master_batch_requests"
    calls = total(after, f"{name}_sum") - total(before, f"{name}_sum")
    passes = total(after, f"{name}_count") - total(before, f"{name}_count")
    assert calls == 16
    assert passes <= 4  # 16 calls sent together: a few passes, not one each


def test_each_batched_call_gets_its_own_output_and_routing(windowed: Cluster) -> None:
    ref = ReferenceMoE(windowed.cfg.model, windowed.cfg.routing)
    xs = [_x(1 + 5 * i, 100 + i) for i in range(16)]
    for x, (y, routing) in zip(xs, asyncio.run(_together(windowed.address, xs, True)), strict=True):
        expected, ref_routing = ref.forward(x, 0)
        assert (y - expected).abs().max().item() <= FP32_TOL
        assert torch.equal(routing.expert_ids, ref_routing.expert_ids)
        assert routing.scores.shape == (x.shape[0], 8)
        assert abs(routing.load_balance_loss - float(ref_routing.load_balance_loss)) <= 1e-5


def test_capacity_drops_of_a_batched_call_equal_those_it_gets_alone(capped: Cluster) -> None:
    xs = [_x(40, 300 + i) for i in range(6)]
    with MoEClient(capped.address) as client:
        alone = [client.infer(x, return_routing=True) for x in xs]
    batched = asyncio.run(_together(capped.address, xs, True))
    assert sum(r.dropped_pairs for _, r in alone) > 0  # the limit does bite here
    for (y_alone, r_alone), (y, r) in zip(alone, batched, strict=True):
        assert r.dropped_pairs == r_alone.dropped_pairs
        assert torch.equal(r.weights, r_alone.weights)
        assert (y - y_alone).abs().max().item() <= FP32_TOL


def test_an_invalid_call_fails_alone_in_its_batch(windowed: Cluster) -> None:
    xs = [_x(4, 1), torch.randn(4, 63), _x(4, 2), _x(4, 3)]
    results = asyncio.run(_together(windowed.address, xs))
    assert isinstance(results[1], MoEServeError)
    assert results[1].code == grpc.StatusCode.INVALID_ARGUMENT
    assert "hidden.shape[1]" in results[1].message
    assert all(isinstance(r, torch.Tensor) for i, r in enumerate(results) if i != 1)


def test_batches_stay_within_max_batch_tokens(in_process_factory: Any) -> None:
    cluster = in_process_factory(
        world(master={"batch_delay_us": WINDOW_US, "max_batch_tokens": 64})
    )
    asyncio.run(_together(cluster.address, [_x(32, i) for i in range(8)]))
    samples = scrape(cluster.metrics_url())
    name = "moe_serve_master_batch_requests"
    assert total(samples, f"{name}_sum") == 8
    # 32-token calls under a 64-token budget: every pass holds at most two of them.
    assert total(samples, f"{name}_bucket", le="2.0") == total(samples, f"{name}_count")


def test_overload_beyond_max_pending_tokens_is_refused_then_service_recovers(
    in_process_factory: Any,
) -> None:
    cluster = in_process_factory(
        world(master={"batch_delay_us": WINDOW_US, "max_pending_tokens": 64})
    )
    results = asyncio.run(_together(cluster.address, [_x(32, i) for i in range(8)]))
    refused = [r for r in results if isinstance(r, MoEServeError)]
    served = [r for r in results if isinstance(r, torch.Tensor)]
    assert len(served) >= 2 and len(refused) >= 1  # 64 tokens admitted at a time: 2 calls
    assert all(r.code == grpc.StatusCode.RESOURCE_EXHAUSTED for r in refused)
    assert "master.max_pending_tokens=64" in refused[0].message
    with MoEClient(cluster.address) as client:  # nothing pending any more: served again
        assert client.infer(_x(32, 99)).shape == (32, 64)
