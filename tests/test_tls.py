"""TLS and mutual TLS on every port: client↔master and master↔workers.

Certificates come from scripts/gen_test_certs.sh, the script docs/operations.md tells users
to run, so the documented procedure is what the tests exercise.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
import yaml

from moe_serve.client import AsyncMoEClient, ClientTLS, MoEClient, MoEServeError
from moe_serve.config import TLSConfig, parse_config
from moe_serve.errors import ConfigError
from moe_serve.layer.reference import ReferenceMoE
from moe_serve.tools.launcher import is_serving
from moe_serve.transport.auth import metadata
from moe_serve.transport.tls import channel as tls_channel
from moe_serve.transport.tls import check, server_credentials
from moe_serve.v1 import moe_pb2 as pb
from tests.conftest import Cluster, InProcessCluster, world

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "gen_test_certs.sh"
TOKEN = "tls-test-token"
WORKER_TOKEN = "tls-test-worker-token"


def make_certs(out: Path) -> Path:
    subprocess.run(["bash", str(SCRIPT), str(out)], check=True, capture_output=True, timeout=60)
    return out


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def other_certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Certificates of another CA, which the servers must not trust."""
    return make_certs(tmp_path_factory.mktemp("other-certs"))


def tls_section(certs: Path, client_auth: bool) -> dict[str, object]:
    return {
        "cert": str(certs / "server.pem"),
        "key": str(certs / "server.key"),
        "ca": str(certs / "ca.pem"),
        "client_auth": client_auth,
    }


@pytest.fixture(scope="module")
def tls_cluster(
    certs: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[InProcessCluster]:
    """Server-authenticated TLS on the master and both workers, plus a bearer token."""
    tokens = tmp_path_factory.mktemp("token")
    (tokens / "token").write_text(TOKEN)
    (tokens / "worker-token").write_text(WORKER_TOKEN)
    security = {
        "token_file": str(tokens / "token"),
        "worker_token_file": str(tokens / "worker-token"),
        "tls": tls_section(certs, client_auth=False),
    }
    cluster = InProcessCluster(world(security=security))
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def mtls_cluster(
    certs: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[InProcessCluster]:
    """Mutual TLS: every server requires a client certificate signed by the test CA; the
    workers also want the worker token, which only the master holds."""
    worker_token = tmp_path_factory.mktemp("worker-token") / "token"
    worker_token.write_text(WORKER_TOKEN)
    security = {
        "worker_token_file": str(worker_token),
        "tls": tls_section(certs, client_auth=True),
    }
    cluster = InProcessCluster(world(security=security))
    yield cluster
    cluster.stop()


def refusal(address: str, **client_args: object) -> MoEServeError:
    """The error a client built with `client_args` gets for one call (5 s deadline)."""
    client = MoEClient(address, timeout=5, **client_args)  # type: ignore[arg-type]
    with client, pytest.raises(MoEServeError) as err:
        client.infer(torch.ones(1, 64))
    return err.value


def expected(cluster: Cluster, x: torch.Tensor) -> torch.Tensor:
    y, _ = ReferenceMoE(cluster.cfg.model, cluster.cfg.routing).forward(x, 0)
    return y


def test_a_tls_round_trip_matches_the_reference(tls_cluster: Cluster, certs: Path) -> None:
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(3))
    tls = ClientTLS(ca=certs / "ca.pem")
    with MoEClient(tls_cluster.address, token=TOKEN, tls=tls) as client:
        y = client.infer(x)  # through the master's TLS port and both workers' TLS ports
    torch.testing.assert_close(y, expected(tls_cluster, x), atol=1e-5, rtol=1e-5)


def test_the_async_client_speaks_tls(tls_cluster: Cluster, certs: Path) -> None:
    async def go() -> torch.Tensor:
        tls = ClientTLS(ca=str(certs / "ca.pem"))
        async with AsyncMoEClient(tls_cluster.address, token=TOKEN, tls=tls) as client:
            return await client.infer(torch.ones(2, 64))

    assert asyncio.run(go()).shape == (2, 64)


def test_a_plaintext_client_to_a_tls_master_fails_cleanly(tls_cluster: Cluster) -> None:
    start = time.monotonic()
    assert refusal(tls_cluster.address, token=TOKEN).code == grpc.StatusCode.UNAVAILABLE
    assert time.monotonic() - start < 5.5  # refused, not hung past the deadline
    assert tls_cluster.running()  # the cluster is still up


def test_the_master_still_serves_after_a_plaintext_attempt(
    tls_cluster: Cluster, certs: Path
) -> None:
    with MoEClient(tls_cluster.address, timeout=5) as plain, pytest.raises(MoEServeError):
        plain.info()
    with MoEClient(tls_cluster.address, token=TOKEN, tls=ClientTLS(ca=certs / "ca.pem")) as c:
        assert c.info().hidden_size == 64


def test_a_server_certificate_from_an_untrusted_ca_is_refused(
    tls_cluster: Cluster, other_certs: Path
) -> None:
    tls = ClientTLS(ca=other_certs / "ca.pem")
    assert refusal(tls_cluster.address, token=TOKEN, tls=tls).code == grpc.StatusCode.UNAVAILABLE


def test_a_server_name_the_certificate_lacks_is_refused(tls_cluster: Cluster, certs: Path) -> None:
    tls = ClientTLS(ca=certs / "ca.pem", server_name="not-in-the-certificate.example")
    assert refusal(tls_cluster.address, token=TOKEN, tls=tls).code == grpc.StatusCode.UNAVAILABLE


def test_tls_does_not_replace_the_token(tls_cluster: Cluster, certs: Path) -> None:
    err = refusal(tls_cluster.address, tls=ClientTLS(ca=certs / "ca.pem"))
    assert err.code == grpc.StatusCode.UNAUTHENTICATED


def test_workers_speak_only_tls(tls_cluster: Cluster) -> None:
    address = tls_cluster.cfg.worker("w0").address
    with grpc.insecure_channel(address) as channel, pytest.raises(grpc.RpcError) as err:
        channel.unary_unary("/moe_serve.v1.ExpertWorker/GetInfo")(
            pb.GetInfoRequest().SerializeToString(), timeout=5
        )
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_health_answers_over_tls_without_a_token(tls_cluster: Cluster, certs: Path) -> None:
    tls = ClientTLS(ca=certs / "ca.pem")
    assert is_serving(tls_cluster.address, tls=tls)
    assert is_serving(tls_cluster.cfg.worker("w1").address, tls=tls)
    assert not is_serving(tls_cluster.address, timeout=2)  # plaintext: no answer


@pytest.mark.e2e
def test_the_health_command_dials_with_the_configs_tls(
    tls_cluster: InProcessCluster, tmp_path: Path
) -> None:
    config = tls_cluster.write_config(tmp_path / "world.yaml")
    cmd = [sys.executable, "-m", "moe_serve", "health", "--config", str(config)]
    ok = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "SERVING" in ok.stdout
    worker = tls_cluster.cfg.worker("w0").address
    ok = subprocess.run([*cmd, "--address", worker], capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    plain = subprocess.run(
        [sys.executable, "-m", "moe_serve", "health", "--address", worker, "--timeout", "2"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert plain.returncode == 1


def test_mutual_tls_round_trip_with_a_client_certificate(
    mtls_cluster: Cluster, certs: Path
) -> None:
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(4))
    tls = ClientTLS(ca=certs / "ca.pem", cert=certs / "client.pem", key=certs / "client.key")
    with MoEClient(mtls_cluster.address, tls=tls) as client:
        y = client.infer(x)  # the master presents its own certificate to the workers
    torch.testing.assert_close(y, expected(mtls_cluster, x), atol=1e-5, rtol=1e-5)


def test_a_client_certificate_of_the_same_ca_is_not_a_worker_credential(
    mtls_cluster: Cluster, certs: Path
) -> None:
    tls = ClientTLS(ca=certs / "ca.pem", cert=certs / "client.pem", key=certs / "client.key")
    address = mtls_cluster.cfg.worker("w0").address
    with tls_channel(address, tls) as ch, pytest.raises(grpc.RpcError) as err:
        ch.unary_unary("/moe_serve.v1.ExpertWorker/GetInfo")(
            pb.GetInfoRequest().SerializeToString(), timeout=5
        )
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED  # the handshake passed
    with tls_channel(address, tls) as ch:
        reply = ch.unary_unary("/moe_serve.v1.ExpertWorker/GetInfo")(
            pb.GetInfoRequest().SerializeToString(), timeout=5, metadata=metadata(WORKER_TOKEN)
        )
    assert pb.WorkerInfo.FromString(reply).id == "w0"


def test_mutual_tls_refuses_a_client_without_a_certificate(
    mtls_cluster: Cluster, certs: Path
) -> None:
    err = refusal(mtls_cluster.address, tls=ClientTLS(ca=certs / "ca.pem"))
    assert err.code == grpc.StatusCode.UNAVAILABLE
    assert mtls_cluster.running()


def test_mutual_tls_refuses_a_client_certificate_of_another_ca(
    mtls_cluster: Cluster, certs: Path, other_certs: Path
) -> None:
    tls = ClientTLS(
        ca=certs / "ca.pem", cert=other_certs / "client.pem", key=other_certs / "client.key"
    )
    assert refusal(mtls_cluster.address, tls=tls).code == grpc.StatusCode.UNAVAILABLE


def test_client_auth_without_a_ca_is_a_config_error_naming_the_key(certs: Path) -> None:
    tls = {"cert": str(certs / "server.pem"), "key": str(certs / "server.key")}
    with pytest.raises(ConfigError, match=r"security\.tls\.ca"):
        parse_config(world(security={"tls": {**tls, "client_auth": True}}))


def test_a_missing_certificate_file_is_a_config_error_naming_the_key(certs: Path) -> None:
    cfg = TLSConfig(cert=certs / "absent.pem", key=certs / "server.key")
    with pytest.raises(ConfigError, match=r"security\.tls\.cert: cannot read"):
        server_credentials(cfg)


def test_a_key_of_another_certificate_is_a_config_error_naming_the_key(
    certs: Path, other_certs: Path
) -> None:
    cfg = TLSConfig(cert=certs / "server.pem", key=other_certs / "server.key")
    with pytest.raises(ConfigError, match=r"security\.tls\.key: .* is not the private key"):
        check(cfg)


def test_a_ca_file_that_is_not_pem_is_a_config_error_naming_the_key(
    certs: Path, tmp_path: Path
) -> None:
    junk = tmp_path / "ca.pem"
    junk.write_text("not a certificate\n")
    cfg = TLSConfig(cert=certs / "server.pem", key=certs / "server.key", ca=junk)
    with pytest.raises(ConfigError, match=r"security\.tls\.ca: .* is not a PEM file"):
        check(cfg)


@pytest.mark.e2e
def test_a_worker_with_a_bad_certificate_exits_2_naming_the_key(
    certs: Path, other_certs: Path, tmp_path: Path
) -> None:
    tls = {"cert": str(certs / "server.pem"), "key": str(other_certs / "server.key")}
    path = tmp_path / "world.yaml"
    path.write_text(yaml.safe_dump(world(security={"tls": tls})))
    cmd = [sys.executable, "-m", "moe_serve", "worker", "--config", str(path), "--worker-id", "w0"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "security.tls.key" in done.stderr


def test_a_client_with_an_unreadable_ca_file_raises_naming_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"tls\.ca: cannot read"):
        MoEClient("127.0.0.1:1", tls=ClientTLS(ca=tmp_path / "absent.pem"))
