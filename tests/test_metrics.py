"""The Prometheus endpoints of master and workers, scraped for real after traffic (servers
in-process on port 0, their exporters on port 0 too)."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path
from shutil import which
from typing import Any

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from moe_serve.client import MoEClient, MoEServeError
from moe_serve.tools.demo import free_ports
from tests.conftest import Cluster, world

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
def cluster(in_process_factory: Any) -> Cluster:
    """Master and workers listening on 127.0.0.1: every exporter stays on 127.0.0.1."""
    config = world(model={"top_k": 2})
    for w in config["workers"]:
        w["listen"] = w["address"]
    return in_process_factory(config)


@pytest.fixture(scope="module")
def opened(in_process_factory: Any) -> Cluster:
    """metrics_host 0.0.0.0 on the master and w1; w0 listens on [::1] (its exporter too)."""
    config = world()
    config["master"]["metrics_host"] = "0.0.0.0"
    w0, w1 = config["workers"]
    w0["address"] = w0["listen"] = w0["address"].replace("127.0.0.1", "[::1]")
    w1["listen"], w1["metrics_host"] = w1["address"], "0.0.0.0"
    return in_process_factory(config)


def other_local_address() -> str:
    """An address of this machine other than loopback; skip the test without one."""
    candidates = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s, contextlib.suppress(OSError):
        s.connect(("192.0.2.1", 9))  # UDP connect: picks a route, sends nothing
        candidates.append(s.getsockname()[0])
    with contextlib.suppress(OSError):
        candidates += socket.gethostbyname_ex(socket.gethostname())[2]
    for address in candidates:
        if not ipaddress.ip_address(address).is_loopback:
            return address
    pytest.skip("this machine has no non-loopback IPv4 address to connect to")


def connects(host: str, port: int) -> bool:
    """Whether a TCP connection to host:port is accepted (refused: False)."""
    try:
        socket.create_connection((host, port), timeout=5).close()
    except ConnectionRefusedError:
        return False
    return True


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


# --- where the exporters listen -------------------------------------------------------------


def test_exporters_of_processes_on_loopback_refuse_other_addresses(cluster: Cluster) -> None:
    other = other_local_address()
    ports = [cluster.cfg.master.metrics_port] + [w.metrics_port for w in cluster.cfg.workers]
    for port in ports:
        assert connects("127.0.0.1", port)
        assert not connects(other, port), f"port {port} answers on {other}"


def test_metrics_host_0_0_0_0_opens_the_exporter_to_other_addresses(opened: Cluster) -> None:
    other = other_local_address()
    for port in (opened.cfg.master.metrics_port, opened.cfg.worker("w1").metrics_port):
        samples = scrape(f"http://{other}:{port}/metrics")
        assert total(samples, "process_resident_memory_bytes") > 0


def test_an_ipv6_listen_address_exports_on_that_ipv6_host(opened: Cluster) -> None:
    port = opened.cfg.worker("w0").metrics_port
    assert total(scrape(f"http://[::1]:{port}/metrics"), "process_resident_memory_bytes") > 0
    assert not connects("127.0.0.1", port)


def prometheus_query(url: str, query: str) -> list[dict[str, Any]]:
    with urllib.request.urlopen(
        f"{url}/api/v1/query?{urllib.parse.urlencode({'query': query})}", timeout=5
    ) as reply:
        return json.loads(reply.read())["data"]["result"]


@pytest.mark.e2e  # starts a prometheus server process
@pytest.mark.skipif(which("prometheus") is None, reason="needs the prometheus server binary")
def test_a_prometheus_server_scrapes_master_and_workers_on_loopback(
    cluster: Cluster, tmp_path: Path
) -> None:
    with MoEClient(cluster.address) as client:
        client.infer(torch.randn(4, 64))
    targets = [f"127.0.0.1:{cluster.cfg.master.metrics_port}"]
    targets += [f"127.0.0.1:{w.metrics_port}" for w in cluster.cfg.workers]
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
        "scrape_configs": [{"job_name": "moe_serve", "static_configs": [{"targets": targets}]}],
    }
    (tmp_path / "prometheus.yml").write_text(json.dumps(config))  # JSON is YAML
    (port,) = free_ports(1)
    cmd = [
        "prometheus",
        f"--config.file={tmp_path / 'prometheus.yml'}",
        f"--storage.tsdb.path={tmp_path / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
    ]
    with open(tmp_path / "prometheus.log", "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline, up, tokens = time.monotonic() + 60, [], []
        while time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "prometheus.log").read_text()
            try:
                up = prometheus_query(url, 'up{job="moe_serve"} == 1')
                tokens = prometheus_query(url, "moe_serve_tokens_total")
            except OSError:  # not listening yet
                pass
            if len(up) == len(targets) and tokens:
                break
            time.sleep(0.5)
        assert sorted(r["metric"]["instance"] for r in up) == sorted(targets)
        assert float(tokens[0]["value"][1]) >= 4
    finally:
        proc.terminate()  # by pid: this test's own child
        proc.wait(timeout=30)
