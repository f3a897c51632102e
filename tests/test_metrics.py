"""The Prometheus endpoints of master and workers, scraped for real after traffic."""

from __future__ import annotations

import urllib.request
from typing import Any

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from moe_serve.client import MoEClient, MoEServeError
from tests.conftest import Cluster, world

pytestmark = pytest.mark.e2e

MASTER_NAMES = {
    "moe_serve_requests_total",
    "moe_serve_request_seconds",
    "moe_serve_tokens_total",
    "moe_serve_expert_tokens_total",
    "moe_serve_worker_rpc_seconds",
    "moe_serve_worker_up",
}
WORKER_NAMES = {
    "moe_serve_worker_batch_tokens",
    "moe_serve_worker_queue_depth",
    "moe_serve_worker_forward_seconds",
    "moe_serve_worker_expert_tokens_total",
    "moe_serve_gpu_memory_bytes",
}


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample at `url`, keyed by (name, sorted labels)."""
    with urllib.request.urlopen(url, timeout=10) as reply:
        text = reply.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def total(samples: dict, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= set(ls))


@pytest.fixture(scope="module")
def cluster(cluster_factory: Any) -> Cluster:
    return cluster_factory(world(model={"top_k": 2}))


def test_contract_metric_names_are_exported(cluster: Cluster) -> None:
    with MoEClient(cluster.address) as client:
        client.infer(torch.randn(4, 64))
    master = {n for n, _ in scrape(cluster.metrics_url())}
    worker = {n for n, _ in scrape(cluster.metrics_url("w0"))}
    assert {n.removesuffix("_count") for n in master} >= MASTER_NAMES
    assert {n.removesuffix("_count") for n in worker} >= WORKER_NAMES


def test_both_processes_export_their_resident_memory(cluster: Cluster) -> None:
    for url in (cluster.metrics_url(), cluster.metrics_url("w0")):
        rss = total(scrape(url), "process_resident_memory_bytes")
        assert 50e6 < rss < 10e9  # a Python process with torch loaded: tens of MB at least


def test_token_counters_equal_tokens_sent(cluster: Cluster) -> None:
    before = [scrape(cluster.metrics_url(w)) for w in (None, "w0", "w1")]
    sizes = [1, 17, 100, 256]
    with MoEClient(cluster.address) as client:
        for T in sizes:
            client.infer(torch.randn(T, 64), layer=0)
    after = [scrape(cluster.metrics_url(w)) for w in (None, "w0", "w1")]

    def delta(i: int, name: str, **labels: str) -> float:
        return total(after[i], name, **labels) - total(before[i], name, **labels)

    sent = sum(sizes)
    assert delta(0, "moe_serve_tokens_total", layer="0") == sent
    assert delta(0, "moe_serve_requests_total", layer="0", code="OK") == len(sizes)
    # top-2, no capacity limit: every token makes two pairs, each computed by one worker.
    assert delta(0, "moe_serve_expert_tokens_total", layer="0") == 2 * sent
    workers = delta(1, "moe_serve_worker_expert_tokens_total") + delta(
        2, "moe_serve_worker_expert_tokens_total"
    )
    assert workers == 2 * sent


def test_worker_up_is_one_for_every_live_worker(cluster: Cluster) -> None:
    samples = scrape(cluster.metrics_url())
    assert total(samples, "moe_serve_worker_up", worker="w0") == 1
    assert total(samples, "moe_serve_worker_up", worker="w1") == 1


def test_failed_requests_are_counted_by_code(cluster: Cluster) -> None:
    before = scrape(cluster.metrics_url())
    with MoEClient(cluster.address) as client, pytest.raises(MoEServeError):
        client.infer(torch.randn(2, 63))
    after = scrape(cluster.metrics_url())
    code = {"layer": "0", "code": "INVALID_ARGUMENT"}
    assert (
        total(after, "moe_serve_requests_total", **code)
        - total(before, "moe_serve_requests_total", **code)
        == 1
    )
