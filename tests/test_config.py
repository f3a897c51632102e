"""World config validation: each error is a ConfigError naming the field path and expected value."""

from __future__ import annotations

import copy
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
import yaml
from pydantic import BaseModel, ValidationError

from moe_serve.config import (
    GRPC_MAX_MESSAGE_BYTES,
    MESSAGE_SLACK_BYTES,
    WorldConfig,
    check_devices_exist,
    load_config,
    parse_address,
    parse_config,
)
from moe_serve.errors import ConfigError

BASE: dict[str, Any] = {
    "model": {"hidden_size": 16, "expert_ffn_size": 32, "num_experts": 4, "top_k": 2},
    "workers": [
        {"id": "w0", "address": "localhost:50061", "experts": [0, 1]},
        {"id": "w1", "address": "localhost:50062", "experts": [2, 3]},
    ],
}


def world(**sections: Any) -> dict[str, Any]:
    """A valid config dict (4 experts on 2 workers) with whole sections replaced."""
    data = copy.deepcopy(BASE)
    data.update(copy.deepcopy(sections))
    return data


def model(**fields: Any) -> dict[str, Any]:
    """The base `model` section with some fields replaced."""
    return {**BASE["model"], **fields}


def worker(**fields: Any) -> dict[str, Any]:
    """A single worker holding all 4 experts, with some fields replaced."""
    return {"id": "w0", "address": "localhost:50061", "experts": [0, 1, 2, 3], **fields}


def config_error(data: Any) -> str:
    """The message of the ConfigError that parse_config raises for `data`."""
    with pytest.raises(ConfigError) as info:
        parse_config(data, source="world.yaml")
    message = str(info.value)
    assert message.startswith("world.yaml: ")
    return message


# --- valid configs -----------------------------------------------------------------------------


def test_valid_config_parses_into_frozen_models() -> None:
    cfg = parse_config(world())
    assert cfg.model.num_experts == 4
    assert [w.id for w in cfg.workers] == ["w0", "w1"]
    assert cfg.workers[1].experts_on(0) == (2, 3)


def test_per_layer_placement_is_read_per_layer() -> None:
    cfg = parse_config(
        world(
            model=model(moe_layers=[0, 1]),
            workers=[
                worker(id="w0", address="h:1", experts={0: [0, 1, 2, 3], 1: [0, 1]}),
                worker(id="w1", address="h:2", experts={1: [2, 3]}),
            ],
        )
    )
    assert cfg.workers[0].experts_on(1) == (0, 1)
    assert cfg.workers[1].experts_on(0) == ()
    assert cfg.workers[1].experts_on(1) == (2, 3)


def test_swish_is_accepted_as_an_alias_of_silu() -> None:
    cfg = parse_config(world(model=model(activation="swish")))
    assert cfg.model.activation == "silu"


def test_config_is_frozen() -> None:
    cfg = parse_config(world())
    with pytest.raises(ValidationError, match="frozen"):
        cfg.model = cfg.model  # type: ignore[misc]
    with pytest.raises(ValidationError, match="frozen"):
        cfg.model.top_k = 1  # type: ignore[misc]
    with pytest.raises(ValidationError, match="frozen"):
        cfg.workers[0].address = "localhost:1"  # type: ignore[misc]
    with pytest.raises(TypeError):
        cfg.workers[0].experts[0] = 3  # type: ignore[index]


def test_per_layer_experts_mapping_is_frozen() -> None:
    cfg = parse_config(world(workers=[worker(experts={0: [0, 1, 2, 3]})]))
    with pytest.raises(TypeError):
        cfg.workers[0].experts[0] = (9,)  # type: ignore[index]


def test_ipv6_address_with_brackets_parses() -> None:
    assert parse_address("[::1]:50051") == ("[::1]", 50051)
    assert parse_address("host-1.example:1") == ("host-1.example", 1)
    assert parse_address("h:65535") == ("h", 65535)


def test_config_error_maps_to_failed_precondition() -> None:
    assert ConfigError.code == grpc.StatusCode.FAILED_PRECONDITION


# --- metrics hosts -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("listen", "host"),
    [("127.0.0.1:50051", "127.0.0.1"), ("[::1]:50051", "::1"), ("0.0.0.0:1", "0.0.0.0")],
)
def test_master_metrics_bind_the_host_of_master_listen(listen: str, host: str) -> None:
    assert parse_config(world(master={"listen": listen})).master.metrics_bind_host == host


@pytest.mark.parametrize(
    ("fields", "host"),
    [
        ({}, "0.0.0.0"),  # no listen: the worker binds every interface, its exporter too
        ({"listen": "127.0.0.1:50061"}, "127.0.0.1"),
        ({"listen": "[::1]:50061"}, "::1"),
        ({"listen": "127.0.0.1:50061", "metrics_host": "0.0.0.0"}, "0.0.0.0"),
        ({"metrics_host": "[::1]"}, "::1"),
    ],
)
def test_worker_metrics_bind_the_host_of_its_listen_address(
    fields: dict[str, str], host: str
) -> None:
    cfg = parse_config(world(workers=[worker(**fields)]))
    assert cfg.workers[0].metrics_bind_host == host


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "[::]", "10.0.0.11", "metrics.example"])
def test_master_metrics_host_opens_the_exporter_wider(host: str) -> None:
    cfg = parse_config(world(master={"listen": "127.0.0.1:50051", "metrics_host": host}))
    assert cfg.master.metrics_bind_host == host.strip("[]")


@pytest.mark.parametrize("host", ["", "a b", "[10.0.0.1]", "host:9400", "-x"])
def test_a_bad_metrics_host_names_the_key(host: str) -> None:
    msg = config_error(world(master={"metrics_host": host}, workers=[worker(metrics_host=host)]))
    assert "master.metrics_host: expected a host name or an IP address" in msg
    assert "workers[0].metrics_host: expected a host name or an IP address" in msg


# --- security ----------------------------------------------------------------------------------


@pytest.mark.parametrize("client", [{"token_env": "T"}, {"token_file": "/etc/moe-serve/token"}])
def test_a_client_token_without_a_worker_token_names_worker_token_env(
    client: dict[str, str],
) -> None:
    msg = config_error(world(security=client))
    assert "security.worker_token_env: a client token is set" in msg
    assert "cannot call the workers directly" in msg


@pytest.mark.parametrize(
    ("security", "expected"),
    [
        (
            {"worker_token_env": "W", "worker_token_file": "/w"},
            "security.worker_token_env: set worker_token_env or worker_token_file, not both",
        ),
        (
            {"token_env": "T", "worker_token_env": "T"},
            "security.worker_token_env: names the client token's source",
        ),
        (
            {"token_file": "/t", "worker_token_file": "/t"},
            "security.worker_token_file: names the client token's source",
        ),
    ],
)
def test_bad_token_sources_name_the_key(security: dict[str, str], expected: str) -> None:
    assert expected in config_error(world(security=security))


@pytest.mark.parametrize(
    "security",
    [
        {"token_env": "T", "worker_token_env": "W"},
        {"token_file": "/t", "worker_token_file": "/w"},
        {"worker_token_env": "W"},  # workers guarded, the master open (e.g. behind a proxy)
        {},
    ],
)
def test_valid_token_combinations(security: dict[str, str]) -> None:
    parse_config(world(security=security))


# --- placement ---------------------------------------------------------------------------------


def test_expert_placed_on_no_worker_names_expert_and_layer() -> None:
    msg = config_error(world(workers=[worker(experts=[0, 1])]))
    assert "workers[*].experts: expert 2 of layer 0 is placed on no worker" in msg
    assert "unplaced on layer 0: [2, 3]" in msg


def test_expert_placed_on_no_worker_in_one_layer_of_a_per_layer_placement() -> None:
    msg = config_error(
        world(
            model=model(moe_layers=[0, 1]),
            workers=[worker(experts={0: [0, 1, 2, 3], 1: [0, 1]})],
        )
    )
    assert "workers[*].experts: expert 2 of layer 1 is placed on no worker" in msg
    assert "unplaced on layer 1: [2, 3]" in msg
    assert "layer 0" not in msg


def test_per_layer_placement_missing_a_whole_layer_names_that_layer() -> None:
    msg = config_error(
        world(model=model(moe_layers=[0, 3]), workers=[worker(experts={0: [0, 1, 2, 3]})])
    )
    assert "expert 0 of layer 3 is placed on no worker" in msg
    assert "[0, 1, 2, 3]" in msg


def test_per_layer_experts_naming_a_layer_not_in_moe_layers() -> None:
    msg = config_error(world(workers=[worker(experts={0: [0, 1, 2, 3], 5: [0]})]))
    assert "workers[0].experts: layer 5 is not in model.moe_layers [0]" in msg


def test_expert_id_out_of_range() -> None:
    msg = config_error(world(workers=[worker(experts=[0, 1, 2, 3, 4])]))
    assert "workers[0].experts: expert 4 on layer 0 is out of range" in msg
    assert "expected 0..3 (model.num_experts=4)" in msg


def test_expert_id_out_of_range_in_a_per_layer_placement() -> None:
    msg = config_error(
        world(
            model=model(moe_layers=[0, 2]),
            workers=[
                worker(id="w0", address="h:1", experts={0: [0, 1, 2, 3], 2: [0, 1, 2, 3]}),
                worker(id="w1", address="h:2", experts={2: [7]}),
            ],
        )
    )
    assert "workers[1].experts: expert 7 on layer 2 is out of range; expected 0..3" in msg


def test_negative_expert_id_is_rejected() -> None:
    msg = config_error(world(workers=[worker(experts=[0, 1, 2, 3, -1])]))
    assert "workers[0].experts[4]" in msg
    assert "expected an expert id >= 0, got -1" in msg


def test_empty_workers() -> None:
    msg = config_error(world(workers=[]))
    assert "workers: " in msg
    assert "at least 1 item" in msg


def test_missing_workers() -> None:
    data = world()
    del data["workers"]
    msg = config_error(data)
    assert "workers: Field required" in msg


# --- unknown keys ------------------------------------------------------------------------------


def test_unknown_top_level_key() -> None:
    msg = config_error(world(servers=[]))
    assert "servers: unknown key" in msg


@pytest.mark.parametrize(
    ("sections", "path"),
    [
        ({"model": model(hiden_size=16)}, "model.hiden_size"),
        ({"routing": {"top_k": 2}}, "routing.top_k"),
        ({"master": {"port": 1}}, "master.port"),
        ({"batching": {"max_delay_ms": 1}}, "batching.max_delay_ms"),
        ({"workers": [worker(device="cpu")]}, "workers[0].device"),
    ],
)
def test_unknown_nested_key(sections: dict[str, Any], path: str) -> None:
    msg = config_error(world(**sections))
    assert f"{path}: unknown key" in msg


# --- workers -----------------------------------------------------------------------------------


def test_duplicate_worker_ids() -> None:
    msg = config_error(
        world(
            workers=[
                worker(id="a", address="h:1", experts=[0, 1]),
                worker(id="a", address="h:2", experts=[2, 3]),
            ]
        )
    )
    assert "workers[1].id: duplicate 'a' (also workers[0].id)" in msg
    assert "distinct id" in msg


def test_duplicate_worker_addresses() -> None:
    msg = config_error(
        world(
            workers=[
                worker(id="a", address="h:1", experts=[0, 1]),
                worker(id="b", address="h:2", experts=[2]),
                worker(id="c", address="h:1", experts=[3]),
            ]
        )
    )
    assert "workers[2].address: duplicate 'h:1' (also workers[0].address)" in msg
    assert "distinct address" in msg


@pytest.mark.parametrize(
    "address",
    ["localhost", "localhost:0", "localhost:70000", "not an address!", ":50051", "h:port", ""],
    ids=["no-port", "port-0", "port-70000", "garbage", "no-host", "port-not-a-number", "empty"],
)
def test_bad_worker_address(address: str) -> None:
    msg = config_error(world(workers=[worker(address=address)]))
    assert f"workers[0].address: expected 'host:port' with port 1..65535, got {address!r}" in msg


def test_bad_worker_listen_address() -> None:
    msg = config_error(world(workers=[worker(listen="0.0.0.0")]))
    assert "workers[0].listen: expected 'host:port' with port 1..65535, got '0.0.0.0'" in msg


def test_bad_master_listen_address() -> None:
    msg = config_error(world(master={"listen": "localhost:0"}))
    assert "master.listen: expected 'host:port' with port 1..65535, got 'localhost:0'" in msg


@pytest.mark.parametrize("address", ["localhost", "localhost:0", "h:70000", "x y:1"])
def test_parse_address_rejects_bad_addresses(address: str) -> None:
    with pytest.raises(ValueError, match=r"expected 'host:port' with port 1\.\.65535"):
        parse_address(address)


def test_bad_worker_id() -> None:
    msg = config_error(world(workers=[worker(id="has space")]))
    assert "workers[0].id: " in msg


@pytest.mark.parametrize(
    ("devices", "expected"),
    [
        (["gpu"], "workers[0].devices: expected 'cpu', 'cuda' or 'cuda:N', got 'gpu'"),
        ([], "workers[0].devices: expected at least one device"),
        (["cuda:0", "cuda:0"], "workers[0].devices: expected distinct CUDA devices"),
    ],
)
def test_bad_worker_devices(devices: list[str], expected: str) -> None:
    msg = config_error(world(workers=[worker(devices=devices)]))
    assert expected in msg


def test_repeated_cpu_device_is_allowed() -> None:
    cfg = parse_config(world(workers=[worker(devices=["cpu", "cpu"])]))
    assert cfg.workers[0].devices == ("cpu", "cpu")


# --- model, routing, master, batching ----------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("dtype", "float64", "model.dtype: Input should be 'float32', 'bfloat16' or 'float16'"),
        ("activation", "mish", "model.activation: Input should be 'gelu', 'relu', 'silu' or"),
        ("expert_kind", "moe", "model.expert_kind: Input should be 'mlp' or 'glu'"),
    ],
)
def test_bad_model_enum(field: str, value: str, expected: str) -> None:
    msg = config_error(world(model=model(**{field: value})))
    assert expected in msg


def test_top_k_greater_than_num_experts() -> None:
    msg = config_error(world(model=model(top_k=5)))
    assert "model.top_k: 5 exceeds num_experts=4" in msg


def test_top_k_equal_to_num_experts_is_allowed() -> None:
    assert parse_config(world(model=model(top_k=4))).model.top_k == 4


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"hidden_size": 0}, "model.hidden_size: Input should be greater than 0"),
        ({"expert_ffn_size": -1}, "model.expert_ffn_size: Input should be greater than 0"),
        ({"num_experts": 0}, "model.num_experts: Input should be greater than 0"),
        ({"top_k": 0}, "model.top_k: Input should be greater than 0"),
        ({"moe_layers": []}, "model.moe_layers: expected at least one MoE layer index"),
        ({"moe_layers": [1, 1]}, "model.moe_layers: expected distinct layer indices, got [1, 1]"),
        ({"moe_layers": [-1]}, "model.moe_layers[0]: Input should be greater than or equal to 0"),
        (
            {"checkpoint": "/nonexistent/dir"},
            "model.checkpoint: cannot read '/nonexistent/dir/config.json'",
        ),
    ],
)
def test_bad_model_field(fields: dict[str, Any], expected: str) -> None:
    msg = config_error(world(model=model(**fields)))
    assert expected in msg


def test_moe_layers_are_sorted() -> None:
    cfg = parse_config(
        world(model=model(moe_layers=[3, 1]), workers=[worker()])  # flat list: every layer
    )
    assert cfg.model.moe_layers == (1, 3)


@pytest.mark.parametrize(
    ("sections", "expected"),
    [
        ({"routing": {"scoring": "relu"}}, "routing.scoring: Input should be 'softmax' or"),
        ({"routing": {"capacity_factor": 0}}, "routing.capacity_factor: Input should be greater"),
        ({"master": {"device": "tpu"}}, "master.device: expected 'cpu', 'cuda' or 'cuda:N'"),
        ({"master": {"metrics_port": 65536}}, "master.metrics_port: Input should be less than"),
        ({"master": {"max_request_tokens": 0}}, "master.max_request_tokens: Input should be"),
        ({"master": {"max_message_bytes": 1 << 31}}, "master.max_message_bytes: Input should be"),
        ({"master": {"worker_timeout_s": 0}}, "master.worker_timeout_s: Input should be greater"),
        ({"batching": {"max_delay_us": -1}}, "batching.max_delay_us: Input should be greater"),
        ({"batching": {"max_batch_tokens": 0}}, "batching.max_batch_tokens: Input should be"),
    ],
)
def test_bad_section_field(sections: dict[str, Any], expected: str) -> None:
    msg = config_error(world(**sections))
    assert expected in msg


def test_top_level_must_be_a_mapping() -> None:
    msg = config_error([1, 2])
    assert "expected a mapping at the top level, got list" in msg


def test_every_error_is_listed() -> None:
    msg = config_error(world(model=model(dtype="int8", activation="mish"), extra=1))
    assert "model.dtype: " in msg
    assert "model.activation: " in msg
    assert "extra: unknown key" in msg


# --- files, devices, worker lookup -------------------------------------------------------------


def test_load_config_reads_yaml(tmp_path: Path) -> None:
    path = tmp_path / "world.yaml"
    path.write_text(
        "model: {hidden_size: 16, expert_ffn_size: 32, num_experts: 2, top_k: 1,"
        " moe_layers: [0, 1]}\n"
        "workers:\n"
        "  - {id: a, address: 'localhost:1', experts: {0: [0, 1], 1: [0]}}\n"
        "  - {id: b, address: 'localhost:2', experts: {1: [1]}}\n"
    )
    cfg = load_config(path)
    assert cfg.workers[0].experts_on(1) == (0,)
    assert cfg.workers[1].experts_on(1) == (1,)


def test_load_config_on_missing_file_names_config_flag_and_path(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    msg = str(info.value)
    assert msg.startswith("--config: ")
    assert repr(str(path)) in msg


def test_load_config_on_invalid_yaml_names_path(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}: not valid YAML")


def test_load_config_validation_error_names_path_and_field(tmp_path: Path) -> None:
    path = tmp_path / "world.yaml"
    path.write_text("workers: []\nbogus: 1\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}: invalid world config")
    assert "bogus: unknown key" in msg


def test_load_config_on_empty_file_says_a_mapping_is_expected(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("")
    with pytest.raises(ConfigError, match="expected a mapping at the top level, got NoneType"):
        load_config(path)


@pytest.fixture
def no_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make this machine look like it has no CUDA devices."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


@pytest.mark.usefixtures("no_cuda")
def test_check_devices_exist_names_the_missing_device() -> None:
    with pytest.raises(ConfigError) as info:
        check_devices_exist(("cuda:3",), "workers[0].devices")
    msg = str(info.value)
    assert msg.startswith("workers[0].devices[0]: device 'cuda:3' does not exist")
    assert "0 CUDA device(s) visible" in msg
    assert "expected one of ['cpu']" in msg


@pytest.mark.usefixtures("no_cuda")
def test_check_devices_exist_names_the_index_of_the_missing_device() -> None:
    with pytest.raises(ConfigError, match=r"^workers\[0\]\.devices\[1\]: device 'cuda'"):
        check_devices_exist(("cpu", "cuda"), "workers[0].devices")


@pytest.mark.usefixtures("no_cuda")
def test_check_devices_exist_accepts_cpu() -> None:
    check_devices_exist(("cpu", "cpu"), "workers[0].devices")


def test_worker_lookup_by_id() -> None:
    cfg = parse_config(world())
    assert cfg.worker("w1").address == "localhost:50062"


def test_unknown_worker_id_names_the_worker_id_flag() -> None:
    cfg: WorldConfig = parse_config(world())
    with pytest.raises(ConfigError) as info:
        cfg.worker("nope")
    msg = str(info.value)
    assert msg.startswith("--worker-id: 'nope' is not a worker of the config")
    assert "known: w0, w1" in msg


# --- message limit -------------------------------------------------------------------------------
# BASE: hidden 16, top_k 2, 4 experts: a row is 16 x 4 + 2 x (8 + 4) + 4 x 4 = 104 bytes.
ROW = 104


def test_message_limit_derives_from_the_token_limit_when_unset() -> None:
    cfg = parse_config(world(master={"max_request_tokens": 1000, "max_batch_tokens": 10}))
    assert cfg.master.max_message_bytes is None
    assert cfg.message_limit("client") == 1000 * ROW + MESSAGE_SLACK_BYTES


def test_worker_message_limit_holds_a_batch_larger_than_one_request() -> None:
    cfg = parse_config(world(master={"max_request_tokens": 16, "max_batch_tokens": 8192}))
    assert cfg.message_limit("client") == 16 * ROW + MESSAGE_SLACK_BYTES
    assert cfg.message_limit("worker") == 8192 * ROW + MESSAGE_SLACK_BYTES


def test_default_message_limit_is_far_below_grpcs_maximum() -> None:
    cfg = parse_config(world())  # 65536 tokens
    assert cfg.message_limit("client") == 65536 * ROW + MESSAGE_SLACK_BYTES  # 7.9 MiB
    assert cfg.message_limit("worker") < GRPC_MAX_MESSAGE_BYTES // 100


def test_derived_message_limit_is_capped_at_grpcs_maximum() -> None:
    # The float32 input fits 2 GiB - 1 (65535 x 32768 bytes); with the routing rows it would not.
    cfg = parse_config(world(model=model(hidden_size=8192), master={"max_request_tokens": 65535}))
    assert cfg.message_limit("client") == GRPC_MAX_MESSAGE_BYTES
    assert cfg.message_limit("worker") == GRPC_MAX_MESSAGE_BYTES


def test_explicit_max_message_bytes_is_the_limit_of_every_hop() -> None:
    cfg = parse_config(world(master={"max_message_bytes": 1 << 30}))
    assert cfg.message_limit("client") == cfg.message_limit("worker") == 1 << 30


def test_token_limit_beyond_grpcs_maximum_message_is_rejected() -> None:
    msg = config_error(world(model=model(hidden_size=16384), master={"max_request_tokens": 32768}))
    assert "master.max_request_tokens: 32768 tokens x hidden_size 16384 x 4 bytes" in msg
    assert "exceeds gRPC's largest message (2147483647 bytes)" in msg


def test_token_limit_beyond_explicit_max_message_bytes_is_rejected() -> None:
    msg = config_error(world(master={"max_request_tokens": 1000, "max_message_bytes": 63_999}))
    assert "16 x 4 bytes = 64000 bytes exceeds master.max_message_bytes=63999" in msg


# --- paths: one rule, relative to the YAML file -------------------------------------------------

DATA = Path(__file__).resolve().parent / "data"
# Every path key of the world config, as (section, ..., key).
PATH_KEYS = [
    ("model", "checkpoint"),
    ("security", "token_file"),
    ("security", "worker_token_file"),
    ("security", "tls", "cert"),
    ("security", "tls", "key"),
    ("security", "tls", "ca"),
]


def world_with_path(keys: tuple[str, ...], value: str, where: Path) -> dict[str, Any]:
    """A valid config whose path key `keys` is `value`, with what that key needs beside it
    (a checkpoint's config.json in `where`, a worker token beside a client token)."""
    data = world(workers=[worker()])
    if keys[0] == "model":  # Mixtral's config.json: 8 experts
        data["workers"] = [worker(experts=list(range(8)))]
        (where / value).mkdir(parents=True, exist_ok=True)
        (where / value / "config.json").write_text((DATA / "mixtral-8x7b-config.json").read_text())
        data["model"] = {"checkpoint": value}
        return data
    security: dict[str, Any] = {"worker_token_env": "W"}
    if keys[1] == "tls":
        security["tls"] = {"cert": "c.pem", "key": "c.key", "ca": "ca.pem", keys[2]: value}
    else:
        security = {"token_env": "T", "worker_token_env": "W"}
        security.pop(keys[1].replace("_file", "_env"))
        security[keys[1]] = value
    data["security"] = security
    return data


def path_value(cfg: WorldConfig, keys: tuple[str, ...]) -> Path:
    value: Any = cfg
    for key in keys:
        value = getattr(value, key)
    return Path(value)


@pytest.mark.parametrize("keys", PATH_KEYS, ids=".".join)
def test_a_relative_path_is_taken_from_the_yaml_files_directory(
    keys: tuple[str, ...], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conf = tmp_path / "etc"
    conf.mkdir()
    (conf / "world.yaml").write_text(yaml.safe_dump(world_with_path(keys, "files/x", conf)))
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # a process started in another directory (systemd, up)
    assert path_value(load_config(Path("..") / "etc" / "world.yaml"), keys) == conf / "files/x"


@pytest.mark.parametrize("keys", PATH_KEYS, ids=".".join)
def test_an_absolute_path_is_kept_as_written(keys: tuple[str, ...], tmp_path: Path) -> None:
    absolute = tmp_path / "abs" / "x"
    data = world_with_path(keys, str(absolute), tmp_path)
    (tmp_path / "world.yaml").write_text(yaml.safe_dump(data))
    assert path_value(load_config(tmp_path / "world.yaml"), keys) == absolute


def test_a_path_under_home_is_expanded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    data = world(security={"token_file": "~/client.token", "worker_token_env": "W"})
    (tmp_path / "world.yaml").write_text(yaml.safe_dump(data))
    cfg = load_config(tmp_path / "world.yaml")
    assert cfg.security.token_file == tmp_path / "home" / "client.token"


def test_without_a_file_relative_paths_stay_relative_to_the_working_directory() -> None:
    cfg = parse_config(world(security={"token_file": "client.token", "worker_token_env": "W"}))
    assert cfg.security.token_file == Path("client.token")


def test_every_path_key_of_the_config_follows_the_rule() -> None:
    """A new key typed as a path without ConfigPath would open files relative to the working
    directory again: every Path-typed field carries the rule, and PATH_KEYS lists them all."""

    def walk(model: type[BaseModel], prefix: tuple[str, ...]) -> Iterator[tuple[str, ...]]:
        for name, info in model.model_fields.items():
            key = (*prefix, name)
            typed = repr(info.annotation) + repr(info.metadata)
            if "_in_config_dir" in typed:  # ConfigPath, CheckpointPath
                yield key
            else:
                assert "Path" not in typed, f"{'.'.join(key)}: a path without ConfigPath"
            for arg in (info.annotation, *typing.get_args(info.annotation)):
                if isinstance(arg, type) and issubclass(arg, BaseModel):
                    yield from walk(arg, key)

    assert sorted(walk(WorldConfig, ())) == sorted(PATH_KEYS)


def test_a_token_file_next_to_the_yaml_is_read_from_any_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from moe_serve.transport.auth import load_tokens

    (tmp_path / "client.token").write_text("client-secret\n")
    (tmp_path / "worker.token").write_text("worker-secret\n")
    data = world(security={"token_file": "client.token", "worker_token_file": "worker.token"})
    (tmp_path / "world.yaml").write_text(yaml.safe_dump(data))
    monkeypatch.chdir("/")
    cfg = load_config(tmp_path / "world.yaml")
    assert load_tokens(cfg.security) == ("client-secret", "worker-secret")
