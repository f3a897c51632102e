"""Bearer-token authentication: a client token for the master, a worker token for the workers.

Every call but health needs the token of the service it calls; a client token never opens
ExpertWorker, so the workers are reachable only through the master and its limits.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
import yaml

from moe_serve.client import MoEClient, MoEServeError
from moe_serve.config import SecurityConfig
from moe_serve.errors import ConfigError
from moe_serve.tools.launcher import is_serving
from moe_serve.transport.auth import load_token, load_tokens, load_worker_token, metadata
from moe_serve.transport.wire import tensor_to_pb
from moe_serve.v1 import moe_pb2 as pb
from moe_serve.v1 import moe_pb2_grpc as pb_grpc
from tests.conftest import Cluster, InProcessCluster, world

TOKEN = "s3cret-token-for-tests"
WORKER_TOKEN = "w0rker-token-for-tests"
SECURITY = {"token_env": "MOE_TEST_TOKEN", "worker_token_env": "MOE_TEST_WORKER_TOKEN"}
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED


@pytest.fixture(scope="module")
def secured() -> Iterator[Cluster]:
    with pytest.MonkeyPatch.context() as mp:
        # Read when the servers start; the config names the variables.
        mp.setenv("MOE_TEST_TOKEN", TOKEN)
        mp.setenv("MOE_TEST_WORKER_TOKEN", WORKER_TOKEN)
        cluster = InProcessCluster(world(security=SECURITY))
    yield cluster
    cluster.stop()


def forward_request() -> pb.ForwardRequest:
    """One token for expert 0 of w0: a valid Forward."""
    return pb.ForwardRequest(
        layer=0,
        hidden=tensor_to_pb(torch.ones(1, 64)),
        pair_token=tensor_to_pb(torch.zeros(1, dtype=torch.int32)),
        pair_expert=tensor_to_pb(torch.zeros(1, dtype=torch.int32)),
        pair_weight=tensor_to_pb(torch.ones(1)),
    )


def call_worker(address: str, method: str, token: str | None) -> pb.WorkerInfo | bytes:
    """Call ExpertWorker/`method` with `token`; raw bytes for AttachRegion (its request's
    fields are not what is tested: authentication comes before parsing)."""
    md = metadata(token)
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.ExpertWorkerStub(channel)
        if method == "Forward":
            return stub.Forward(forward_request(), timeout=10, metadata=md)
        if method == "GetInfo":
            return stub.GetInfo(pb.GetInfoRequest(), timeout=10, metadata=md)
        raw = channel.unary_unary(f"/moe_serve.v1.ExpertWorker/{method}")
        return raw(b"", timeout=10, metadata=md)


def test_calls_with_the_token_are_served(secured: Cluster) -> None:
    with MoEClient(secured.address, token=TOKEN) as client:
        assert client.infer(torch.randn(3, 64)).shape == (3, 64)
        assert client.info().hidden_size == 64


@pytest.mark.parametrize("token", [None, "wrong", TOKEN + "x", WORKER_TOKEN])
def test_a_missing_or_wrong_token_is_unauthenticated(secured: Cluster, token: str | None) -> None:
    with MoEClient(secured.address, token=token) as client, pytest.raises(MoEServeError) as err:
        client.infer(torch.randn(3, 64))
    assert err.value.code == UNAUTHENTICATED
    assert "bearer token" in err.value.message and TOKEN not in err.value.message


@pytest.mark.parametrize("method", ["Forward", "AttachRegion", "GetInfo", "Reload"])
@pytest.mark.parametrize("token", [None, TOKEN])
def test_a_client_token_cannot_call_a_worker(
    secured: Cluster, method: str, token: str | None
) -> None:
    with pytest.raises(grpc.RpcError) as err:
        call_worker(secured.cfg.worker("w0").address, method, token)
    assert err.value.code() == UNAUTHENTICATED
    assert "worker token" in err.value.details() and WORKER_TOKEN not in err.value.details()


@pytest.mark.parametrize("token", [None, "wrong", WORKER_TOKEN])
def test_a_reload_of_the_master_without_the_client_token_is_unauthenticated(
    secured: Cluster, token: str | None
) -> None:
    """Reload re-reads only the master's own file, and is guarded like Infer; the master
    goes on serving."""
    with grpc.insecure_channel(secured.address) as channel, pytest.raises(grpc.RpcError) as err:
        pb_grpc.MoEMasterStub(channel).Reload(
            pb.ReloadRequest(), timeout=10, metadata=metadata(token)
        )
    assert err.value.code() == UNAUTHENTICATED
    with MoEClient(secured.address, token=TOKEN) as client:
        assert client.infer(torch.randn(2, 64)).shape == (2, 64)


def test_the_worker_token_opens_the_workers(secured: Cluster) -> None:
    address = secured.cfg.worker("w0").address
    info = call_worker(address, "GetInfo", WORKER_TOKEN)
    assert isinstance(info, pb.WorkerInfo) and info.id == "w0"
    reply = call_worker(address, "Forward", WORKER_TOKEN)
    assert list(reply.output.shape) == [1, 64]


def test_the_master_serves_while_clients_are_refused_by_the_workers(secured: Cluster) -> None:
    with pytest.raises(grpc.RpcError):
        call_worker(secured.cfg.worker("w1").address, "Forward", TOKEN)
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(3))
    with MoEClient(secured.address, token=TOKEN) as client:
        y = client.infer(x)  # every expert is reached: the master holds the worker token
    assert y.shape == (5, 64) and bool(torch.isfinite(y).all()) and y.abs().sum() > 0


def test_health_stays_open_for_probes(secured: Cluster) -> None:
    assert is_serving(secured.address)  # no token
    assert is_serving(secured.cfg.worker("w1").address)


def test_neither_token_appears_in_the_logs(secured: Cluster) -> None:
    with MoEClient(secured.address, token="wrong") as client, pytest.raises(MoEServeError):
        client.infer(torch.randn(1, 64))
    with pytest.raises(grpc.RpcError):
        call_worker(secured.cfg.worker("w0").address, "Forward", TOKEN)
    assert TOKEN not in secured.log() and WORKER_TOKEN not in secured.log()


@pytest.mark.e2e
def test_a_worker_needs_only_the_worker_token(tmp_path: Path) -> None:
    """A worker machine never holds the client token: its variable may be unset there."""
    config = world(security=SECURITY)
    path = tmp_path / "world.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if k != "MOE_TEST_TOKEN"}
    env["MOE_TEST_WORKER_TOKEN"] = WORKER_TOKEN
    cmd = [sys.executable, "-m", "moe_serve", "worker", "--config", str(path), "--worker-id", "w0"]
    address = config["workers"][0]["address"]
    with open(tmp_path / "worker.log", "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 60
        while not is_serving(address, timeout=0.5):
            assert proc.poll() is None, (tmp_path / "worker.log").read_text()
            assert time.monotonic() < deadline, "worker did not start"
            time.sleep(0.2)
        info = call_worker(address, "GetInfo", WORKER_TOKEN)
        assert isinstance(info, pb.WorkerInfo) and info.id == "w0"
    finally:
        proc.terminate()  # by pid: this test's own child
        proc.wait(timeout=30)


def run_cli(tmp_path: Path, security: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    path = tmp_path / "world.yaml"
    path.write_text(yaml.safe_dump(world(security=security)))
    env = {**os.environ, "MOE_TEST_TOKEN": TOKEN, "MOE_TEST_OTHER": TOKEN}
    cmd = [sys.executable, "-m", "moe_serve", *args, "--config", str(path)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)


@pytest.mark.e2e
@pytest.mark.parametrize(
    "args", [("master",), ("up",), ("worker", "--worker-id", "w0")], ids=lambda a: a[0]
)
def test_a_client_token_without_a_worker_token_exits_2_naming_the_key(
    tmp_path: Path, args: tuple[str, ...]
) -> None:
    done = run_cli(tmp_path, {"token_env": "MOE_TEST_TOKEN"}, *args)
    assert done.returncode == 2, done.stderr
    assert "security.worker_token_env: a client token is set" in done.stderr
    assert "cannot call the workers directly" in done.stderr  # the reason, not only the key


@pytest.mark.e2e
def test_the_same_secret_for_both_tokens_exits_2_naming_the_key(tmp_path: Path) -> None:
    security = {"token_env": "MOE_TEST_TOKEN", "worker_token_env": "MOE_TEST_OTHER"}
    done = run_cli(tmp_path, security, "master")
    assert done.returncode == 2, done.stderr
    assert "security.worker_token_env: the worker token equals the client token" in done.stderr
    assert TOKEN not in done.stderr


def test_the_same_token_source_for_both_is_a_config_error() -> None:
    with pytest.raises(ValueError, match="worker_token_env: names the client token's source"):
        SecurityConfig(token_env="T", worker_token_env="T")


def test_a_worker_token_alone_guards_only_the_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOE_TEST_WORKER_TOKEN", WORKER_TOKEN)
    assert load_tokens(SecurityConfig(worker_token_env="MOE_TEST_WORKER_TOKEN")) == (
        None,
        WORKER_TOKEN,
    )


def test_token_is_read_from_a_file_and_stripped(tmp_path: Path) -> None:
    path, worker = tmp_path / "token", tmp_path / "worker-token"
    path.write_text(f"  {TOKEN}\n")
    worker.write_text(f"{WORKER_TOKEN}\n")
    cfg = SecurityConfig(token_file=path, worker_token_file=worker)
    assert (load_token(cfg), load_worker_token(cfg)) == (TOKEN, WORKER_TOKEN)


@pytest.mark.parametrize(
    ("cfg", "field"),
    [
        (
            SecurityConfig(token_env="MOE_TEST_SURELY_UNSET", worker_token_env="MOE_TEST_W"),
            "security.token_env",
        ),
        (
            SecurityConfig(token_file=Path("/nonexistent/token"), worker_token_env="MOE_TEST_W"),
            "security.token_file",
        ),
        (SecurityConfig(worker_token_env="MOE_TEST_SURELY_UNSET"), "security.worker_token_env"),
        (SecurityConfig(worker_token_file=Path("/nonexistent/t")), "security.worker_token_file"),
    ],
)
def test_an_unreadable_token_source_is_a_config_error_naming_the_key(
    cfg: SecurityConfig, field: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MOE_TEST_W", WORKER_TOKEN)
    with pytest.raises(ConfigError, match=field):
        load_tokens(cfg)
