"""Bearer-token authentication: every call but health needs the configured token."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch

from moe_serve.auth import load_token
from moe_serve.client import MoEClient, MoEServeError
from moe_serve.config import SecurityConfig
from moe_serve.errors import ConfigError
from moe_serve.launcher import is_serving
from moe_serve.v1 import moe_pb2 as pb
from tests.conftest import Cluster, start_up, stop_up, world

TOKEN = "s3cret-token-for-tests"


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MOE_TEST_TOKEN", TOKEN)  # the children inherit it; the config names it
        cluster = start_up(
            world(security={"token_env": "MOE_TEST_TOKEN"}), tmp_path_factory.mktemp("auth")
        )
    yield cluster
    stop_up(cluster)


def test_calls_with_the_token_are_served(secured: Cluster) -> None:
    with MoEClient(secured.address, token=TOKEN) as client:
        assert client.infer(torch.randn(3, 64)).shape == (3, 64)
        assert client.info().hidden_size == 64


@pytest.mark.parametrize("token", [None, "wrong", TOKEN + "x"])
def test_a_missing_or_wrong_token_is_unauthenticated(secured: Cluster, token: str | None) -> None:
    with MoEClient(secured.address, token=token) as client, pytest.raises(MoEServeError) as err:
        client.infer(torch.randn(3, 64))
    assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
    assert "bearer token" in err.value.message and TOKEN not in err.value.message


def test_workers_refuse_calls_without_the_token(secured: Cluster) -> None:
    address = secured.cfg.worker("w0").address
    with grpc.insecure_channel(address) as channel, pytest.raises(grpc.RpcError) as err:
        channel.unary_unary("/moe_serve.v1.ExpertWorker/GetInfo")(
            pb.GetInfoRequest().SerializeToString(), timeout=5
        )
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_health_stays_open_for_probes(secured: Cluster) -> None:
    assert is_serving(secured.address)  # no token
    assert is_serving(secured.cfg.worker("w1").address)


def test_the_token_never_appears_in_the_logs(secured: Cluster) -> None:
    with MoEClient(secured.address, token="wrong") as client, pytest.raises(MoEServeError):
        client.infer(torch.randn(1, 64))
    assert TOKEN not in secured.log()


def test_token_is_read_from_a_file_and_stripped(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text(f"  {TOKEN}\n")
    assert load_token(SecurityConfig(token_file=path)) == TOKEN


@pytest.mark.parametrize(
    ("cfg", "field"),
    [
        (SecurityConfig(token_env="MOE_TEST_SURELY_UNSET"), "security.token_env"),
        (SecurityConfig(token_file=Path("/nonexistent/token")), "security.token_file"),
    ],
)
def test_an_unreadable_token_source_is_a_config_error_naming_the_key(
    cfg: SecurityConfig, field: str
) -> None:
    with pytest.raises(ConfigError, match=field):
        load_token(cfg)
