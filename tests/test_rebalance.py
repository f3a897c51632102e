"""`moe-serve rebalance`: re-place experts by the load a master observed, scraped for real.

Skewed load comes from real Infer calls on in-process clusters (port 0, exporters on port 0):
a synthetic model of 16 experts on 2 MoE layers, where 60% of each layer's tokens are pushed
towards one hot expert's router row (expert 1 on layer 0, expert 2 on layer 1, both held by
w0), so each hot expert gets ~30% of its layer's pairs and w0 most of the load.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from prometheus_client.parser import text_string_to_metric_families

from moe_serve.cli import main as cli_main
from moe_serve.client import MoEClient
from moe_serve.config import WorldConfig, load_config, parse_config
from moe_serve.errors import ConfigError
from moe_serve.layer.placement import Placement
from moe_serve.metrics import MasterMetrics, local_url, start_exporter
from moe_serve.tools.demo import free_ports
from moe_serve.tools.rebalance import (
    balancedness,
    expert_sizes,
    holdings_of,
    metrics_urls,
    parse_expert_tokens,
    read_counts,
    rebalance_plan,
    scrape,
    worker_pairs,
)
from moe_serve.weights.synthetic import SyntheticWeights
from tests.conftest import InProcessCluster, ProcessCluster, world

E = 16
LAYERS = [0, 1]
HOT = {0: 1, 1: 2}  # layer -> the expert most tokens are pushed towards
TOKENS = 512
FOUR = [list(range(4 * i, 4 * i + 4)) for i in range(4)]  # 4 workers, 4 experts each
TWO = [list(range(14)), [14, 15]]  # 2 workers, w0 holding 14 of 16
GRAB = re.compile(r"^balancedness: before (\d\.\d\d) -> after (\d\.\d\d)$", re.M)


def skewed_world(workers: list[list[int]]) -> dict[str, Any]:
    return world(
        model={"num_experts": E, "moe_layers": LAYERS},
        workers=[{"experts": ids} for ids in workers],
    )


def skewed_inputs(cfg: WorldConfig, layer: int) -> torch.Tensor:
    """[TOKENS, H] hidden states, the first 60% pushed 4 units along HOT[layer]'s router row:
    the hot expert wins their first choice, their second stays spread."""
    row = SyntheticWeights(cfg.model, cfg.routing).router(layer)[HOT[layer]]
    g = torch.Generator().manual_seed(layer)
    x = torch.randn(TOKENS, cfg.model.hidden_size, generator=g)
    x[: TOKENS * 6 // 10] += 4.0 * row / row.norm()
    return x


def send_skewed_load(address: str, cfg: WorldConfig) -> None:
    with MoEClient(address) as client:
        for layer in LAYERS:
            client.infer(skewed_inputs(cfg, layer), layer=layer)


@pytest.fixture(scope="module")
def skewed(in_process_factory: Callable[..., InProcessCluster]) -> InProcessCluster:
    """4 workers after the skewed load."""
    cluster = in_process_factory(skewed_world(FOUR))
    send_skewed_load(cluster.address, cluster.cfg)
    return cluster


@pytest.fixture
def config_file(skewed: InProcessCluster, tmp_path: Path) -> Path:
    return skewed.write_config(tmp_path / "world.yaml")


def rebalance(*args: str) -> int:
    return cli_main(["rebalance", *args])


def grabbed(out: str) -> tuple[float, float]:
    m = GRAB.search(out)
    assert m is not None, out
    return float(m[1]), float(m[2])


def files_in(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def worker_pairs_total(url: str) -> dict[str, float]:
    """moe_serve_worker_pairs_total per worker: the pairs the master sent each one."""
    return {
        s.labels["worker"]: s.value
        for f in text_string_to_metric_families(scrape(url))
        for s in f.samples
        if s.name == "moe_serve_worker_pairs_total"
    }


# --- balancedness --------------------------------------------------------------------------


def test_balancedness_is_mean_over_max_pairs_per_worker() -> None:
    assert balancedness([30.0, 10.0, 20.0]) == pytest.approx(20 / 30)
    assert balancedness([12.0, 0.0, 0.0, 0.0]) == pytest.approx(0.25)  # all on one of four
    assert balancedness([5.0, 5.0]) == 1.0
    assert balancedness([0.0, 0.0]) == 1.0  # no load is no imbalance


def test_balancedness_needs_a_worker() -> None:
    with pytest.raises(ValueError, match="at least one worker"):
        balancedness([])


def test_replicated_expert_load_is_split_evenly_over_its_holders() -> None:
    holdings = {"w0": {0: [0, 1]}, "w1": {0: [1, 2]}}
    assert worker_pairs(holdings, {0: [10.0, 40.0, 6.0]}) == {"w0": 30.0, "w1": 26.0}


def test_worker_pairs_sum_over_the_observed_layers() -> None:
    holdings = {"w0": {0: [0], 1: [0, 1], 2: [0]}, "w1": {0: [1], 1: [], 2: [1]}}
    counts = {0: [3.0, 5.0], 1: [7.0, 1.0]}  # layer 2 unobserved: counts nothing
    assert worker_pairs(holdings, counts) == {"w0": 11.0, "w1": 5.0}


# --- reading the load ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "url"),
    [
        ("http://10.0.0.10:9400", "http://10.0.0.10:9400/metrics"),
        ("http://10.0.0.10:9400/", "http://10.0.0.10:9400/metrics"),
        ("http://10.0.0.10:9400/metrics", "http://10.0.0.10:9400/metrics"),
        ("10.0.0.10:9400", "http://10.0.0.10:9400/metrics"),
        ("https://[::1]:9400/x/metrics", "https://[::1]:9400/x/metrics"),
    ],
)
def test_metrics_url_with_or_without_the_path(given: str, url: str) -> None:
    assert metrics_urls(given) == [url]


def test_several_masters_are_comma_separated() -> None:
    assert metrics_urls("http://a:9400, http://b:9400/metrics") == [
        "http://a:9400/metrics",
        "http://b:9400/metrics",
    ]


@pytest.mark.parametrize("bad", ["ftp://a:9400", "http://", "http://a:9400/?q=1", ""])
def test_malformed_metrics_url_names_metrics(bad: str) -> None:
    with pytest.raises(ConfigError, match=r"^--metrics: expected http://HOST:PORT"):
        metrics_urls(bad)


def test_scraped_counts_are_the_masters_counters(skewed: InProcessCluster) -> None:
    counts, skipped = read_counts(skewed.metrics_url(), skewed.cfg)
    assert list(counts) == LAYERS and skipped == []
    assert [sum(c) for c in counts.values()] == [2 * TOKENS, 2 * TOKENS]  # top-2, none dropped
    for layer, c in counts.items():
        assert 0.28 < c[HOT[layer]] / sum(c) < 0.36  # the skew the module docstring claims


def test_counts_of_several_masters_are_summed() -> None:
    cfg = parse_config(skewed_world(FOUR))
    registries = [MasterMetrics(), MasterMetrics()]
    registries[0].expert_tokens.labels("0", "3").inc(5)
    registries[1].expert_tokens.labels("0", "3").inc(7)
    registries[1].expert_tokens.labels("1", "15").inc(2)
    exporters = [start_exporter(0, m.registry, "f", "127.0.0.1", "h") for m in registries]
    try:
        urls = ",".join(local_url("127.0.0.1", x.port) for x in exporters if x is not None)
        counts, _ = read_counts(urls, cfg)
    finally:
        for x in exporters:
            assert x is not None
            x.stop()
    assert counts[0][3] == 12.0 and counts[1][15] == 2.0
    assert sum(counts[0]) == 12.0 and sum(counts[1]) == 2.0


def sample(layer: str, expert: str, value: str) -> str:
    return (
        "# TYPE moe_serve_expert_tokens counter\n"
        f'moe_serve_expert_tokens_total{{layer="{layer}",expert="{expert}"}} {value}\n'
    )


@pytest.mark.parametrize(
    ("layer", "expert", "value", "error"),
    [
        ("0", "16", "5", "expert 16 of layer 0; the config's model has 16 experts"),
        ("0", "x", "5", "expected integer `layer` and `expert` labels"),
        ("0", "3", "NaN", "layer 0 expert 3: nan"),
        ("0", "3", "-1", "layer 0 expert 3: -1"),
        ("0", "3", "+Inf", "layer 0 expert 3: inf"),
    ],
)
def test_hostile_samples_are_refused(layer: str, expert: str, value: str, error: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(error)):
        parse_expert_tokens(sample(layer, expert, value), E, LAYERS, "--metrics")


def test_layers_the_config_does_not_serve_are_skipped() -> None:
    text = sample("0", "3", "5") + 'moe_serve_expert_tokens_total{layer="7",expert="1"} 9\n'
    counts, skipped = parse_expert_tokens(text, E, LAYERS)
    assert counts == {0: [0.0] * 3 + [5.0] + [0.0] * 12} and skipped == [7]


def test_unreachable_metrics_exits_2_naming_metrics(
    config_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (port,) = free_ports(1)  # released: nothing listens there
    code = rebalance("--config", str(config_file), "--metrics", f"http://127.0.0.1:{port}")
    assert code == 2
    err = capsys.readouterr().err
    assert f"--metrics: cannot read http://127.0.0.1:{port}/metrics" in err
    assert "expected the master's Prometheus exporter" in err


def test_metrics_without_the_series_exits_2_naming_metrics(
    config_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    exporter = start_exporter(0, MasterMetrics().registry, "f", "127.0.0.1", "h")  # no traffic
    assert exporter is not None
    try:
        url = f"http://127.0.0.1:{exporter.port}"
        assert rebalance("--config", str(config_file), "--metrics", url) == 2
    finally:
        exporter.stop()
    err = capsys.readouterr().err
    assert "--metrics:" in err and "no moe_serve_expert_tokens_total{layer,expert} samples" in err


# --- the plan ------------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [TWO, FOUR], ids=["2 workers", "4 workers"])
def test_rebalance_lifts_balancedness_of_a_skewed_load(
    workers: list[list[int]],
    in_process_factory: Callable[..., InProcessCluster],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    cluster = in_process_factory(skewed_world(workers))
    send_skewed_load(cluster.address, cluster.cfg)
    config = cluster.write_config(tmp_path / "world.yaml")
    capsys.readouterr()
    code = rebalance("--config", str(config), "--metrics", cluster.metrics_url(), "--dry-run")
    assert code == 0
    before, after = grabbed(capsys.readouterr().out)
    assert before < 0.6 and after >= 0.9, (before, after)


def test_report_lists_every_worker_and_the_replicas(
    config_file: Path, skewed: InProcessCluster, capsys: pytest.CaptureFixture[str]
) -> None:
    capsys.readouterr()
    assert (
        rebalance("--config", str(config_file), "--metrics", skewed.metrics_url(), "--dry-run") == 0
    )
    out = capsys.readouterr().out
    assert f"rebalance: {4 * TOKENS} token-expert pairs observed" in out
    rows = [line.split() for line in out.splitlines() if re.match(r"^w\d ", line)]
    assert [r[0] for r in rows] == ["w0", "w1", "w2", "w3"]
    assert sum(int(r[2]) for r in rows) == 4 * TOKENS
    assert sum(int(r[4]) for r in rows) == pytest.approx(4 * TOKENS, abs=2)  # halves, rounded
    # One extra copy per layer, of the hot expert, on two workers.
    for layer, hot in HOT.items():
        assert re.search(rf"^replica: layer {layer} expert {hot} on w\d, w\d$", out, re.M), out


def test_written_config_achieves_the_reported_balancedness(
    config_file: Path, skewed: InProcessCluster, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "new.yaml"
    capsys.readouterr()
    args = ("--config", str(config_file), "--metrics", skewed.metrics_url(), "--out", str(out))
    assert rebalance(*args) == 0
    _, after = grabbed(capsys.readouterr().out)
    counts, _ = read_counts(skewed.metrics_url(), skewed.cfg)
    new = load_config(out)
    pairs = worker_pairs(holdings_of(new), counts)
    assert balancedness(list(pairs.values())) == pytest.approx(after, abs=0.005)


def test_master_spreads_the_load_as_the_report_predicts(
    config_file: Path,
    skewed: InProcessCluster,
    in_process_factory: Callable[..., InProcessCluster],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The same load sent to a world of the written config: the pairs the master hands each
    worker (`moe_serve_worker_pairs_total`, replicas' shares included) are as balanced as the
    report said."""
    out = tmp_path / "new.yaml"
    capsys.readouterr()
    args = ("--config", str(config_file), "--metrics", skewed.metrics_url(), "--out", str(out))
    assert rebalance(*args) == 0
    _, after = grabbed(capsys.readouterr().out)
    cluster = in_process_factory(yaml.safe_load(out.read_text()))
    send_skewed_load(cluster.address, cluster.cfg)
    pairs = worker_pairs_total(cluster.metrics_url())
    assert sorted(pairs) == ["w0", "w1", "w2", "w3"] and sum(pairs.values()) == 4 * TOKENS
    assert balancedness(list(pairs.values())) == pytest.approx(after, abs=0.02)


def test_written_config_loads_and_places_every_expert(
    config_file: Path, skewed: InProcessCluster, tmp_path: Path
) -> None:
    out = tmp_path / "new.yaml"
    args = ("--config", str(config_file), "--metrics", skewed.metrics_url(), "--out", str(out))
    assert rebalance(*args) == 0
    assert out.read_text().startswith("# World config written by `moe-serve rebalance`")
    cfg = load_config(out)
    for layer in LAYERS:
        held = [e for w in cfg.workers for e in w.experts_on(layer)]
        assert sorted(set(held)) == list(range(E))
        assert len(held) == E + 1  # one replica per layer (--replicas default 1)
    assert len(Placement.from_config(cfg).holders[0][HOT[0]]) == 2  # the hot expert, twice


def test_written_config_changes_only_the_workers_experts(
    skewed: InProcessCluster, tmp_path: Path
) -> None:
    """Every other key of the file is kept as written (keys that load_config would fill in
    are not added)."""
    original = dict(skewed.world.config)
    original["master"] = {**original["master"], "reload_grace_s": 5.0, "device": "cpu"}
    original["batching"] = {"max_delay_us": 100, "max_batch_tokens": 4096}
    original["routing"] = {"capacity_factor": 2.0}
    original["security"] = {"token_env": "MOE_TOKEN", "worker_token_env": "MOE_WORKER_TOKEN"}
    original["tracing"] = {"enabled": False, "sample_ratio": 0.25}
    original["workers"] = [
        {**w, "listen": f"127.0.0.1:{w['address'].rsplit(':', 1)[1]}", "devices": ["cpu"]}
        for w in original["workers"]
    ]
    config, out = tmp_path / "world.yaml", tmp_path / "new.yaml"
    config.write_text(yaml.safe_dump(original))
    args = ("--config", str(config), "--metrics", skewed.metrics_url(), "--out", str(out))
    assert rebalance(*args) == 0
    new = yaml.safe_load(out.read_text())
    assert [w.pop("experts") for w in new["workers"]] != [w["experts"] for w in original["workers"]]
    assert new == {
        **original,
        "workers": [{k: v for k, v in w.items() if k != "experts"} for w in original["workers"]],
    }


def test_dry_run_writes_nothing(
    config_file: Path, skewed: InProcessCluster, capsys: pytest.CaptureFixture[str]
) -> None:
    before = files_in(config_file.parent)
    url = skewed.metrics_url()
    assert rebalance("--config", str(config_file), "--metrics", url, "--dry-run") == 0
    assert files_in(config_file.parent) == before
    assert "dry run: nothing written, nothing reloaded" in capsys.readouterr().out


def test_out_writes_only_there_and_prints_the_reload_command(
    config_file: Path,
    skewed: InProcessCluster,
    tmp_path_factory: pytest.TempPathFactory,
    capsys: pytest.CaptureFixture[str],
) -> None:
    elsewhere = tmp_path_factory.mktemp("plans")
    before = files_in(config_file.parent)
    out = elsewhere / "new.yaml"
    args = ("--config", str(config_file), "--metrics", skewed.metrics_url(), "--out", str(out))
    assert rebalance(*args, "--master", "127.0.0.1:1") == 0
    assert files_in(config_file.parent) == before
    assert list(files_in(elsewhere)) == ["new.yaml"]
    printed = capsys.readouterr().out
    assert f"moe-serve reload --config {config_file} --master 127.0.0.1:1" in printed


def test_single_layer_lists_are_flat() -> None:
    config = skewed_world(FOUR)
    config["model"] = {**config["model"], "moe_layers": [0]}
    cfg = parse_config(config)
    counts = {0: [3.0 if e == HOT[0] else 1.0 for e in range(E)]}
    new, before, after, _ = rebalance_plan(cfg, counts, 1, raw=config)
    assert all(isinstance(w["experts"], list) for w in new["workers"])
    assert before == pytest.approx(18 / 4 / 6)  # w0 holds 3 + 1 + 1 + 1 of the 18 pairs
    assert after == pytest.approx(18 / 4 / 5)  # the hot expert's halves beside 3 others


def test_layer_without_samples_is_planned_from_the_others_mean() -> None:
    cfg = parse_config(skewed_world(FOUR))
    counts = {0: [30.0 if e == HOT[0] else 10.0 for e in range(E)]}
    new, _, after, table = rebalance_plan(cfg, counts, 1)
    assert "layers without samples (planned from the others' mean): [1]" in table
    placed = parse_config(new)
    assert sorted({e for w in placed.workers for e in w.experts_on(1)}) == list(range(E))
    assert after >= 0.9


def test_worker_with_two_cpu_slots_is_planned() -> None:
    config = skewed_world(FOUR)
    config["workers"][0]["devices"] = ["cpu", "cpu"]
    new, _, after, _ = rebalance_plan(parse_config(config), {0: [1.0] * E, 1: [1.0] * E}, 0)
    placed = parse_config(new)
    assert len(placed.workers[0].experts_on(0)) > len(placed.workers[1].experts_on(0))
    assert after < 1.0  # balanced per device: w0's two slots take twice the others' pairs


def test_replicas_on_one_worker_name_replicas() -> None:
    cfg = parse_config(skewed_world([list(range(E))]))
    with pytest.raises(ConfigError, match=r"^--replicas: 1 extra copies need a second worker"):
        rebalance_plan(cfg, {0: [1.0] * E}, 1)


def test_synthetic_expert_bytes_are_the_tensors_bytes() -> None:
    for kind, dtype in [("mlp", "float32"), ("glu", "bfloat16")]:
        config = skewed_world(FOUR)
        config["model"] = {**config["model"], "expert_kind": kind, "dtype": dtype}
        cfg = parse_config(config)
        tensors = SyntheticWeights(cfg.model, cfg.routing).experts(0, [0])[0].values()
        item = torch.tensor([], dtype=getattr(torch, dtype)).element_size()
        nbytes = sum(t.numel() for t in tensors) * item
        assert expert_sizes(cfg).nbytes == {0: (nbytes,) * E, 1: (nbytes,) * E}


def test_checkpoint_expert_bytes_come_from_the_served_layers_headers(tmp_path: Path) -> None:
    from transformers import MixtralConfig, MixtralForCausalLM

    hf = MixtralConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=128,
    )
    torch.manual_seed(0)
    MixtralForCausalLM(hf).save_pretrained(tmp_path / "ckpt")
    config = {
        "model": {"checkpoint": "ckpt", "moe_layers": [1]},
        "workers": [{"id": "w0", "address": "127.0.0.1:50061", "experts": list(range(8))}],
    }
    cfg = parse_config(config, base=tmp_path)
    sizes = expert_sizes(cfg)
    assert sizes.layers == (1,) and sizes.nbytes == {1: (3 * 64 * 32 * 4,) * 8}
    # The written file keeps the relative path it was given.
    new, *_ = rebalance_plan(cfg, {1: [1.0] * 8}, 0, raw=config, base=tmp_path)
    assert new["model"] == {"checkpoint": "ckpt", "moe_layers": [1]}


# --- applying it ---------------------------------------------------------------------------


@pytest.fixture
def process_cluster(
    cluster_factory: Callable[[dict[str, Any]], ProcessCluster],
) -> ProcessCluster:
    """4 worker processes and a master, after the skewed load (stopped at module end)."""
    pytest.importorskip("moe_serve.tools.reload")
    cluster = cluster_factory(skewed_world(FOUR))
    send_skewed_load(cluster.address, cluster.cfg)
    return cluster


def test_default_keeps_a_backup_writes_the_config_and_reloads_the_servers(
    process_cluster: ProcessCluster, capsys: pytest.CaptureFixture[str]
) -> None:
    cluster, config = process_cluster, process_cluster.config_path
    old = config.read_bytes()
    capsys.readouterr()
    assert rebalance("--config", str(config), "--metrics", cluster.metrics_url()) == 0
    _, after = grabbed(capsys.readouterr().out)
    assert config.with_name("world.yaml.bak").read_bytes() == old
    new = load_config(config)
    want = {w.id: {la: set(w.experts_on(la)) for la in LAYERS} for w in new.workers}
    deadline = time.monotonic() + 60
    with MoEClient(cluster.address) as client:
        while True:  # the master reports the new placement once every holder has loaded
            info = client.info()
            got = {w.id: {la: set(w.placement.get(la, ())) for la in LAYERS} for w in info.workers}
            if got == want or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    assert got == want
    # The same load again: the master hands the workers the pairs the report predicted.
    was = worker_pairs_total(cluster.metrics_url())
    send_skewed_load(cluster.address, cluster.cfg)
    now = worker_pairs_total(cluster.metrics_url())
    delta = [now[w] - was.get(w, 0.0) for w in now]
    assert after >= 0.9 and balancedness(delta) == pytest.approx(after, abs=0.02)
