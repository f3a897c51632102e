"""`moe-serve placement`: expert placement from checkpoint sizes and routing traces.

A tiny Mixtral (hidden 64, 2 layers, 8 experts, top-2, vocab 128) saved with transformers'
`save_pretrained`; three devices on two workers (w0: cuda:0, cuda:1; w1: cuda:0), so 16 experts
split 6/5/5 at best.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import yaml

from moe_serve.cli import main as cli_main
from moe_serve.config import load_config
from moe_serve.errors import ConfigError
from moe_serve.layer.placement import Placement, device_assignment
from moe_serve.tools.planner import (
    ExpertSizes,
    Plan,
    WorkerSpec,
    check_round_robin,
    load_trace,
    parse_workers,
    plan_placement,
    read_expert_sizes,
    record_trace,
)

WORKERS = ["w0=10.0.0.11:50061@cuda:0,cuda:1", "w1=10.0.0.12:50061@cuda:0"]
HOT = 3  # the expert the synthetic trace sends half of all pairs to
EXPERT_BYTES = 3 * 64 * 32 * 4  # w1, w2, w3 of [32, 64] / [64, 32], float32


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("mixtral")
    MixtralForCausalLM(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def sizes(checkpoint: Path) -> ExpertSizes:
    return read_expert_sizes(checkpoint)


def hot_trace_ids(tokens: int = 1000, seed: int = 0) -> torch.Tensor:
    """Expert ids [T, 2]: every token picks HOT first (50% of pairs), then one other at random."""
    g = torch.Generator().manual_seed(seed)
    others = torch.tensor([e for e in range(8) if e != HOT])
    second = others[torch.randint(0, len(others), (tokens,), generator=g)]
    return torch.stack([torch.full((tokens,), HOT), second], dim=1)


@pytest.fixture(scope="module")
def trace_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("trace") / "trace.pt"
    torch.save({0: hot_trace_ids(), 1: hot_trace_ids(seed=1)}, path)
    return path


def placement(checkpoint: Path, tmp_path: Path, *extra: str) -> tuple[int, Path]:
    out = tmp_path / "world.yaml"
    args = ["placement", "--checkpoint", str(checkpoint), "--out", str(out)]
    for w in WORKERS:
        args += ["--worker", w]
    return cli_main([*args, *extra]), out


def others_with_hot(plan: Plan) -> int:
    """Experts sharing a device with HOT, summed over layers (and over HOT's copies)."""
    return sum(len(ids) - 1 for d in plan.devices for ids in d.experts.values() if HOT in ids)


# --- Sizes ---------------------------------------------------------------------------------


def test_sizes_come_from_headers(sizes: ExpertSizes) -> None:
    assert sizes.family == "mixtral" and sizes.layers == (0, 1) and sizes.num_experts == 8
    assert all(b == (EXPERT_BYTES,) * 8 for b in sizes.nbytes.values())


def test_sizes_read_no_tensor_data(checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import safetensors

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("tensor data was read")

    monkeypatch.setattr(safetensors.safe_open, "get_tensor", refuse, raising=False)
    assert read_expert_sizes(checkpoint).total_bytes == 16 * EXPERT_BYTES


# --- Byte plans ----------------------------------------------------------------------------


def test_every_expert_placed_exactly_once(sizes: ExpertSizes) -> None:
    plan = plan_placement(sizes, parse_workers(WORKERS))
    for layer in sizes.layers:
        on_workers = Counter(e for w in plan.experts.values() for e in w[layer])
        on_devices = Counter(e for d in plan.devices for e in d.experts[layer])
        assert on_workers == on_devices == Counter(range(8))
    assert not plan.replicas


def test_bytes_balanced_within_one_expert(sizes: ExpertSizes) -> None:
    plan = plan_placement(sizes, parse_workers(WORKERS))
    nbytes = sorted(d.nbytes for d in plan.devices)
    assert nbytes == [5 * EXPERT_BYTES, 5 * EXPERT_BYTES, 6 * EXPERT_BYTES]
    assert max(nbytes) - min(nbytes) <= EXPERT_BYTES


@pytest.mark.parametrize(
    "devices",
    [[1, 1], [2, 2], [2, 1], [1, 1, 1], [4, 2, 1], [2, 2, 1], [3, 1]],
    ids=str,
)
@pytest.mark.parametrize("layers", [2, 3, 5])
def test_bytes_balanced_on_other_topologies(devices: list[int], layers: int) -> None:
    """Several workers: the busiest device is within one expert of the least busy."""
    sizes = ExpertSizes(
        Path("/nonexistent"),
        "mixtral",
        tuple(range(layers)),
        8,
        2,
        {la: (100,) * 8 for la in range(layers)},
    )
    workers = [
        WorkerSpec(f"w{i}", f"10.0.0.{i}:50061", tuple(f"cuda:{k}" for k in range(n)))
        for i, n in enumerate(devices)
    ]
    plan = plan_placement(sizes, workers)
    nbytes = [d.nbytes for d in plan.devices]
    assert max(nbytes) - min(nbytes) <= 100, nbytes
    assert sum(nbytes) == 100 * 8 * layers


def test_lone_worker_is_bound_by_round_robin() -> None:
    """One worker, 3 devices, 8 experts a layer: round-robin gives 3/3/2 on every layer, and the
    plan says so rather than claiming a balance device_assignment would not produce."""
    sizes = ExpertSizes(Path("/x"), "mixtral", (0, 1), 8, 2, {0: (100,) * 8, 1: (100,) * 8})
    worker = WorkerSpec("w0", "10.0.0.1:50061", ("cuda:0", "cuda:1", "cuda:2"))
    plan = plan_placement(sizes, [worker])
    assert [d.num_experts for d in plan.devices] == [6, 6, 4]
    assert plan.worker_experts("w0") == list(range(8))  # same on every layer: a flat list


def test_plan_is_deterministic(sizes: ExpertSizes, trace_file: Path) -> None:
    workers = parse_workers(WORKERS)
    trace = load_trace(trace_file, sizes)
    assert plan_placement(sizes, workers).experts == plan_placement(sizes, workers).experts
    a = plan_placement(sizes, workers, trace, replicas=1)
    assert a.experts == plan_placement(sizes, workers, trace, replicas=1).experts


# --- The world config ----------------------------------------------------------------------


def test_output_loads_and_serves_the_checkpoint(checkpoint: Path, tmp_path: Path) -> None:
    from moe_serve.weights.checkpoint import CheckpointWeights

    code, out = placement(checkpoint, tmp_path)
    assert code == 0
    text = out.read_text()
    assert text.startswith("# World config written by `moe-serve placement`")
    cfg = load_config(out)
    assert cfg.model.checkpoint == str(checkpoint.resolve())
    assert cfg.model.num_experts == 8 and cfg.model.moe_layers == (0, 1)
    assert cfg.master.listen == "0.0.0.0:50051"
    assert [w.id for w in cfg.workers] == ["w0", "w1"]
    assert cfg.workers[0].devices == ("cuda:0", "cuda:1")
    owner = Placement.from_config(cfg).owner
    assert all((owner[la] >= 0).all() for la in (0, 1))
    weights = CheckpointWeights(cfg.model, cfg.routing)
    for w in cfg.workers:
        for la in cfg.model.moe_layers:
            loaded = weights.experts(la, w.experts_on(la))
            assert all(x["gate"].shape == (32, 64) for x in loaded)


def test_round_robin_lands_where_the_planner_reports(checkpoint: Path, tmp_path: Path) -> None:
    code, out = placement(checkpoint, tmp_path)
    assert code == 0
    cfg = load_config(out)
    plan = plan_placement(read_expert_sizes(checkpoint), parse_workers(WORKERS))
    reported = {(d.worker, d.device): d for d in plan.devices}
    for w in cfg.workers:
        for la in cfg.model.moe_layers:
            for device, got in zip(w.devices, device_assignment(w, la), strict=True):
                assert got == list(reported[(w.id, device)].experts[la])


def test_table_and_header(checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, out = placement(checkpoint, tmp_path)
    assert code == 0
    printed = capsys.readouterr().out
    for row in ("w0      cuda:0", "w0      cuda:1", "w1      cuda:0"):
        assert row in printed
    assert "GB" in printed and "token share" in printed and f"wrote {out}" in printed
    header = [line for line in out.read_text().splitlines() if line.startswith("#")]
    assert any("expert bytes balanced per device" in line for line in header)
    assert any("--worker w0=10.0.0.11:50061@cuda:0,cuda:1" in line for line in header)


def test_without_out_yaml_goes_to_stdout(
    checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["placement", "--checkpoint", str(checkpoint), "--master-listen", "127.0.0.1:6000"]
    for w in WORKERS:
        args += ["--worker", w]
    assert cli_main(args) == 0
    captured = capsys.readouterr()
    data = yaml.safe_load(captured.out)
    assert data["master"] == {"listen": "127.0.0.1:6000"}
    assert "token share" in captured.err


# --- Trace plans ---------------------------------------------------------------------------


def test_trace_formats_agree(sizes: ExpertSizes, trace_file: Path, tmp_path: Path) -> None:
    counts = load_trace(trace_file, sizes)
    assert counts[0][HOT] == 1000 and sum(counts[0]) == 2000
    as_json = tmp_path / "trace.json"
    as_json.write_text(json.dumps({str(la): c for la, c in counts.items()}))
    assert load_trace(as_json, sizes) == counts
    as_dict = tmp_path / "dict.json"
    as_dict.write_text(json.dumps({"0": {str(e): c for e, c in enumerate(counts[0])}}))
    assert load_trace(as_dict, sizes) == {0: counts[0]}


def busiest_under(plan: Plan, counts: dict[int, list[float]], layer: int) -> float:
    """The busiest device's share of `layer`'s traced pairs, under `plan` (no replicas)."""
    pairs = [sum(counts[layer][e] for e in d.experts[layer]) for d in plan.devices]
    return max(pairs) / sum(counts[layer])


def test_hot_expert_gets_fewer_neighbours(sizes: ExpertSizes, trace_file: Path) -> None:
    workers = parse_workers(WORKERS)
    counts = load_trace(trace_file, sizes)
    by_bytes = plan_placement(sizes, workers)
    by_tokens = plan_placement(sizes, workers, counts)
    assert others_with_hot(by_tokens) < others_with_hot(by_bytes)
    # The greedy gives HOT at most one neighbour per layer (HOT alone on both layers exists, but
    # only by taking 4 experts onto one device in one layer; the greedy spends memory evenly).
    assert others_with_hot(by_tokens) <= len(sizes.layers)
    for la in sizes.layers:
        assert by_tokens.busiest_share[la] == pytest.approx(busiest_under(by_tokens, counts, la))
        assert 0.5 <= by_tokens.busiest_share[la] < busiest_under(by_bytes, counts, la)
    # Memory stays within the tolerance of the byte-balanced plan's busiest device.
    assert by_tokens.memory_cap == int(6 * EXPERT_BYTES * 1.1)
    assert max(d.nbytes for d in by_tokens.devices) <= by_tokens.memory_cap
    for la in sizes.layers:
        assert sorted(e for d in by_tokens.devices for e in d.experts[la]) == list(range(8))


def test_one_replica_puts_the_hot_expert_on_two_workers(
    checkpoint: Path, trace_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out = placement(checkpoint, tmp_path, "--trace", str(trace_file), "--replicas", "1")
    assert code == 0
    cfg = load_config(out)
    for la in cfg.model.moe_layers:
        holders = [w.id for w in cfg.workers if HOT in w.experts_on(la)]
        assert holders == ["w0", "w1"]
        placed = Counter(e for w in cfg.workers for e in w.experts_on(la))
        assert placed == Counter({**dict.fromkeys(range(8), 1), HOT: 2})
    printed = capsys.readouterr().out
    assert f"replica: layer 0 expert {HOT} on w0, w1" in printed
    assert "replica: layer 0 expert 3 on w0, w1" in out.read_text()
    plan = plan_placement(
        read_expert_sizes(checkpoint),
        parse_workers(WORKERS),
        load_trace(trace_file, read_expert_sizes(checkpoint)),
        replicas=1,
    )
    assert plan.replicas == {0: {HOT: ("w0", "w1")}, 1: {HOT: ("w0", "w1")}}
    check_round_robin(plan, plan.world())
    # Half of HOT's pairs each: the busiest device carries less than HOT's 50% alone.
    assert max(plan.busiest_share.values()) < 0.5


def test_record_trace_writes_the_trace_format(sizes: ExpertSizes, tmp_path: Path) -> None:
    ids = hot_trace_ids(tokens=64)
    calls = []

    class FakeClient:
        def infer(self, x: torch.Tensor, layer: int = 0, return_routing: bool = False) -> Any:
            calls.append((tuple(x.shape), layer, return_routing))
            rows = ids[: x.reshape(-1, 64).shape[0]]
            return x, SimpleNamespace(expert_ids=rows, scores=torch.zeros(len(rows), 8))

    path = tmp_path / "recorded.pt"
    counts = record_trace(FakeClient(), [torch.zeros(2, 16, 64), torch.zeros(32, 64)], [0, 1], path)
    assert calls == [
        ((2, 16, 64), 0, True),
        ((32, 64), 0, True),
        ((2, 16, 64), 1, True),
        ((32, 64), 1, True),
    ]
    saved = torch.load(path, weights_only=True)
    assert set(saved) == {0, 1} and saved[0].shape == (64, 2)
    assert counts[0][HOT] == 64 and int(counts[0].sum()) == 128
    assert load_trace(path, sizes)[1] == counts[1].double().tolist()


# --- Errors --------------------------------------------------------------------------------


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "moe_serve", "placement", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_malformed_worker_exits_2_naming_worker(checkpoint: Path) -> None:
    result = run_cli("--checkpoint", str(checkpoint), "--worker", "w0-10.0.0.11:50061@cuda:0")
    assert result.returncode == 2
    assert "--worker" in result.stderr and "ID=HOST:PORT@DEVICE" in result.stderr


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--worker", "w0=10.0.0.11:50061@gpu0"], "--worker"),
        (["--worker", "w0=10.0.0.11@cuda:0"], "--worker"),
        (["--worker", "w0=10.0.0.11:50061@cuda:0,cuda:0"], "--worker"),
        (["--worker", "w0=a:1@cpu", "--worker", "w0=b:1@cpu"], "--worker"),
        (["--worker", "w0=a:1@cpu", "--master-listen", "nowhere"], "--master-listen"),
        (["--worker", "w0=a:1@cpu", "--worker", "w1=b:1@cpu", "--replicas", "1"], "--replicas"),
        (["--worker", "w0=a:1@cpu", "--trace", "/nonexistent/trace.pt"], "--trace"),
    ],
)
def test_bad_arguments_exit_2_naming_them(
    checkpoint: Path, capsys: pytest.CaptureFixture[str], args: list[str], named: str
) -> None:
    assert cli_main(["placement", "--checkpoint", str(checkpoint), *args]) == 2
    assert named in capsys.readouterr().err


def test_missing_checkpoint_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = cli_main(["placement", "--checkpoint", str(tmp_path / "nope"), "--worker", "w0=a:1@cpu"])
    assert code == 2
    assert "--checkpoint" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert (
        cli_main(["placement", "--checkpoint", str(tmp_path / "empty"), "--worker", "w0=a:1@cpu"])
        == 2
    )
    assert "--checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({9: [1] * 8}, "layer 9 is not a MoE layer"),
        ({0: torch.tensor([[0, 8]])}, "expert id 8 is out of range"),
        ({0: [1, 2]}, "expected expert ids [T, K] or 8 counts"),
        ({0: [0] * 8}, "no token-expert pairs"),
    ],
)
def test_bad_traces_name_the_trace(
    sizes: ExpertSizes, tmp_path: Path, content: dict, message: str
) -> None:
    path = tmp_path / "trace.pt"
    torch.save(content, path)
    with pytest.raises(ConfigError, match=r"--trace") as info:
        load_trace(path, sizes)
    assert message in str(info.value)
