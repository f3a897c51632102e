"""Reading Hugging Face checkpoints: each process loads only its own tensors, errors are clear."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from moe_serve.config import parse_config
from moe_serve.errors import ConfigError
from moe_serve.weights.checkpoint import CheckpointWeights, weight_map
from tests.conftest import ProcessCluster, world

H, F, E = 256, 4096, 8
EXPERT_BYTES = 3 * H * F * 4  # gate, up, down in float32: 12 MiB


def write_mixtral(directory: Path, *, hidden: int = H, ffn: int = F, shards: int = 1) -> Path:
    """A one-layer Mixtral-layout checkpoint (zeros: only sizes matter here)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(
        json.dumps(
            {
                "model_type": "mixtral",
                "hidden_size": hidden,
                "intermediate_size": ffn,
                "num_local_experts": E,
                "num_experts_per_tok": 2,
                "num_hidden_layers": 1,
                "hidden_act": "silu",
                "dtype": "float32",
            }
        )
    )
    p = "model.layers.0.block_sparse_moe."
    tensors = {f"{p}gate.weight": torch.randn(E, hidden)}
    for e in range(E):
        tensors[f"{p}experts.{e}.w1.weight"] = torch.zeros(ffn, hidden)
        tensors[f"{p}experts.{e}.w3.weight"] = torch.zeros(ffn, hidden)
        tensors[f"{p}experts.{e}.w2.weight"] = torch.zeros(hidden, ffn)
    keys = sorted(tensors)
    files = [f"model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)]
    owner = {k: files[i % shards] for i, k in enumerate(keys)}
    for f in files:
        save_file({k: v for k, v in tensors.items() if owner[k] == f}, directory / f)
    if shards > 1:
        (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": owner}))
    return directory


def _world(path: Path, workers: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    config = world(workers=workers)
    config["model"] = {"checkpoint": str(path)}
    return config


def test_config_dims_come_from_config_json(tmp_path: Path) -> None:
    cfg = parse_config(_world(write_mixtral(tmp_path / "m")))
    m = cfg.model
    assert (m.hidden_size, m.expert_ffn_size, m.num_experts, m.top_k) == (H, F, E, 2)
    assert (m.expert_kind, m.activation, m.moe_layers) == ("glu", "silu", (0,))
    assert cfg.routing.normalize_topk and cfg.routing.router_dtype == "model"


def test_relative_checkpoint_path_is_relative_to_the_config_file(tmp_path: Path) -> None:
    write_mixtral(tmp_path / "ckpt")
    import yaml

    from moe_serve.config import load_config

    config = _world(Path("ckpt"))
    (tmp_path / "world.yaml").write_text(yaml.safe_dump(config))
    assert load_config(tmp_path / "world.yaml").model.checkpoint == str(tmp_path / "ckpt")


def test_sharded_checkpoint_is_read_through_its_index(tmp_path: Path) -> None:
    path = write_mixtral(tmp_path / "m", hidden=8, ffn=16, shards=3)
    assert len(set(weight_map(path).values())) == 3
    cfg = parse_config(_world(path))
    experts = CheckpointWeights(cfg.model, cfg.routing).experts(0, [5, 6])
    assert [tuple(w["down"].shape) for w in experts] == [(8, 16), (8, 16)]


def test_missing_tensor_names_the_key(tmp_path: Path) -> None:
    path = write_mixtral(tmp_path / "m", hidden=8, ffn=16)
    cfg = parse_config(_world(path))
    with pytest.raises(ConfigError, match=r"experts\.9\.w1\.weight' is missing"):
        CheckpointWeights(cfg.model, cfg.routing).experts(0, [9])  # expert 9 of 8


def test_mismatched_shape_names_key_and_both_shapes(tmp_path: Path) -> None:
    path = write_mixtral(tmp_path / "m", hidden=8, ffn=16)
    cfg_json = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg_json, "intermediate_size": 32}))
    cfg = parse_config(_world(path))
    with pytest.raises(
        ConfigError, match=r"w1\.weight' in .* has shape \[16, 8\]; expected \[32, 8\]"
    ):
        CheckpointWeights(cfg.model, cfg.routing).experts(0, [0])


def test_unsupported_model_type_lists_the_supported_ones(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ConfigError, match=r"model_type 'llama'.*supported: .*mixtral"):
        parse_config(_world(tmp_path))


def test_model_key_contradicting_the_checkpoint_is_rejected(tmp_path: Path) -> None:
    config = _world(write_mixtral(tmp_path / "m", hidden=8, ffn=16))
    config["model"]["num_experts"] = 16
    with pytest.raises(ConfigError, match=r"model\.num_experts: 16 contradicts the checkpoint"):
        parse_config(config)


# --- index file names are hostile until checked -----------------------------------------------

GATE = "model.layers.0.block_sparse_moe.gate.weight"


def _point_gate_at(path: Path, name: object) -> Path:
    """Rewrite the index so that the gate's tensor lives in file `name`."""
    index = path / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"][GATE] = name
    index.write_text(json.dumps(data))
    return index


@pytest.mark.parametrize(
    "name",
    [
        "../outside.safetensors",
        "../../etc/x",
        "/etc/passwd",
        "sub/model-00001-of-00002.safetensors",
        "..\\outside.safetensors",
        "..",
        ".",
        "",
        "model.safetensors\x00.txt",
        7,
    ],
)
def test_an_index_file_name_outside_the_checkpoint_is_refused_naming_index_and_key(
    tmp_path: Path, name: object
) -> None:
    path = write_mixtral(tmp_path / "m", hidden=8, ffn=16, shards=2)
    # A real safetensors file with the very tensor, where "../" would find it.
    save_file({GATE: torch.full((E, 8), 7.0)}, tmp_path / "outside.safetensors")
    index = _point_gate_at(path, name)
    cfg = parse_config(_world(path))
    with pytest.raises(ConfigError) as err:
        CheckpointWeights(cfg.model, cfg.routing).router(0)
    message = str(err.value)
    assert str(index) in message and f"weight_map[{GATE!r}]" in message
    assert "expected a plain file name inside" in message


def test_an_index_without_a_weight_map_mapping_names_the_index(tmp_path: Path) -> None:
    path = write_mixtral(tmp_path / "m", hidden=8, ffn=16, shards=2)
    index = path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": ["model-00001-of-00002.safetensors"]}))
    with pytest.raises(ConfigError, match=r"'weight_map' of .*index\.json' is a list"):
        weight_map(path)


def test_shards_linked_from_elsewhere_still_load(tmp_path: Path) -> None:
    """Hugging Face's cache makes every file of a snapshot a link to a blob outside it."""
    path = write_mixtral(tmp_path / "m", hidden=8, ffn=16, shards=2)
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    for shard in path.glob("*.safetensors"):
        shard.rename(blobs / shard.name)
        shard.symlink_to(blobs / shard.name)
    cfg = parse_config(_world(path))
    assert tuple(CheckpointWeights(cfg.model, cfg.routing).router(0).shape) == (E, 8)


def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _cpu_bytes(url: str) -> float:
    with urllib.request.urlopen(url, timeout=10) as reply:
        for line in reply.read().decode().splitlines():
            if line.startswith('moe_serve_gpu_memory_bytes{device="cpu"}'):
                return float(line.split()[-1])
    raise AssertionError("no moe_serve_gpu_memory_bytes{device=cpu}")


@pytest.mark.e2e
def test_worker_memory_holds_only_its_experts(tmp_path: Path) -> None:
    path = write_mixtral(tmp_path / "m")  # 8 experts x 12 MiB
    workers = [{"experts": [0]}, {"experts": list(range(1, E))}]
    cluster = ProcessCluster(_world(path, workers), tmp_path)
    try:
        assert _cpu_bytes(cluster.metrics_url("w0")) == EXPERT_BYTES
        assert _cpu_bytes(cluster.metrics_url("w1")) == (E - 1) * EXPERT_BYTES
        w0, w1 = cluster.pid("worker w0"), cluster.pid("worker w1")
        grown = _rss_bytes(w1) - _rss_bytes(w0)  # the same process but for 6 more experts
        assert 0.8 * 6 * EXPERT_BYTES <= grown <= 1.25 * 6 * EXPERT_BYTES, grown
        log = cluster.log()
    finally:
        cluster.stop()
    assert "loaded 7/7 experts" in log  # progress while loading
