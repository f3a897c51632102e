"""A worker the master cannot reach because of TLS is named as such, within seconds.

A real worker serves TLS in this process on port 0 with the test certificate (from
scripts/gen_test_certs.sh: it names localhost, 127.0.0.1 and ::1); the master's side of the
workers (`WorkerPool`) dials it, and its health checks and calls fail at the handshake.
Without the diagnosis, a probe that waits for the channel ends in a bare "Deadline Exceeded"
and the worker stays down with nothing in any log.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import torch

from moe_serve.config import parse_config
from moe_serve.errors import WorkerUnavailableError
from moe_serve.layer.dispatch import WorkerSlice
from moe_serve.master.engine import MasterEngine
from moe_serve.master.workers import WorkerPool
from moe_serve.metrics import MasterMetrics
from moe_serve.worker.server import create_worker
from tests.support.cluster import world

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "gen_test_certs.sh"
OTHER_NAME = "w0.example.internal"  # a name the test certificate does not carry
SAID_WITHIN_S = 5.0  # the first probe round (1 s health deadline + one fail-fast call)
LOGGER = "moe_serve.master.workers"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("certs")
    subprocess.run(["bash", str(SCRIPT), str(out)], check=True, capture_output=True, timeout=60)
    return out


def tls(certs: Path, **extra: Any) -> dict[str, Any]:
    return {
        "cert": str(certs / "server.pem"),
        "key": str(certs / "server.key"),
        "ca": str(certs / "ca.pem"),
        **extra,
    }


def one_worker(security: dict[str, Any]) -> dict[str, Any]:
    """One worker holding every expert; no shared region (not what is tested)."""
    return world(
        workers=[{"experts": list(range(8))}],
        master={"shared_memory_bytes": 0},
        security=security,
    )


@asynccontextmanager
async def pool_to_worker(
    worker_security: dict[str, Any], master_security: dict[str, Any]
) -> AsyncIterator[WorkerPool]:
    """A worker served with `worker_security` and a master's pool that dials it with
    `master_security`, probing every second."""
    config = one_worker(worker_security)
    server = await create_worker(parse_config(config), "w0", port=0, metrics_port=0)
    try:
        dialled = one_worker(master_security)
        dialled["workers"][0]["address"] = f"127.0.0.1:{server.port}"
        pool = WorkerPool(parse_config(dialled), MasterMetrics())

        async def on_probe(up: list[bool]) -> None:
            pass

        pool.start_watch(on_probe)
        try:
            yield pool
        finally:
            await pool.close()
    finally:
        await server.stop(0)


async def tls_lines(caplog: pytest.LogCaptureFixture, within_s: float) -> list[str]:
    """The pool's WARNING lines that start with "TLS:", once one shows (or after within_s)."""
    deadline = time.monotonic() + within_s
    while True:
        lines = [
            r.getMessage()
            for r in caplog.records
            if r.name == LOGGER and r.levelno == logging.WARNING
        ]
        found = [line for line in lines if line.startswith("TLS:")]
        if found or time.monotonic() > deadline:
            return found
        await asyncio.sleep(0.05)


def slice_of_one_token() -> WorkerSlice:
    return WorkerSlice(
        worker=0,
        token_index=torch.tensor([0]),
        pair_token=torch.tensor([0], dtype=torch.int32),
        pair_expert=torch.tensor([3], dtype=torch.int32),
        pair_weight=torch.tensor([1.0]),
        pair_index=torch.tensor([0]),
    )


def test_a_certificate_name_mismatch_is_logged_with_the_worker_and_the_name(
    certs: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)

    async def go() -> tuple[list[str], float, bool]:
        start = time.monotonic()
        async with pool_to_worker(
            {"tls": tls(certs)}, {"tls": tls(certs, server_name=OTHER_NAME)}
        ) as pool:
            found = await tls_lines(caplog, SAID_WITHIN_S)
            return found, time.monotonic() - start, pool.healthy[0]

    found, took, healthy = asyncio.run(go())
    assert not healthy
    assert len(found) == 1, found
    assert took < SAID_WITHIN_S
    line = found[0]
    assert line.startswith("TLS: worker w0 at 127.0.0.1:"), line
    assert "failed the handshake" in line
    assert f"does not match the name {OTHER_NAME!r}" in line
    assert "security.tls.server_name" in line


def test_the_tls_cause_is_logged_once_not_on_every_probe(
    certs: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)

    async def go() -> list[str]:
        async with pool_to_worker({"tls": tls(certs)}, {"tls": tls(certs, server_name=OTHER_NAME)}):
            await tls_lines(caplog, SAID_WITHIN_S)
            await asyncio.sleep(3.5)  # three more probe rounds, all failing the same way
            return await tls_lines(caplog, 0)

    assert len(asyncio.run(go())) == 1


def test_a_call_to_that_worker_fails_unavailable_naming_tls_and_the_name(
    certs: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)

    async def go() -> str:
        async with pool_to_worker(
            {"tls": tls(certs)}, {"tls": tls(certs, server_name=OTHER_NAME)}
        ) as pool:
            with pytest.raises(WorkerUnavailableError) as err:
                await pool.forward(0, torch.ones(1, 64), slice_of_one_token(), timeout_s=5)
            return str(err.value)

    message = asyncio.run(go())
    assert "worker 'w0' is unavailable: TLS: its certificate does not match" in message
    assert repr(OTHER_NAME) in message


def test_a_request_needing_that_worker_fails_unavailable_naming_tls_and_the_name(
    certs: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)

    async def go() -> str:
        async with pool_to_worker(
            {"tls": tls(certs)}, {"tls": tls(certs, server_name=OTHER_NAME)}
        ) as pool:
            await tls_lines(caplog, SAID_WITHIN_S)  # the probe has found the cause
            config = one_worker({"tls": tls(certs, server_name=OTHER_NAME)})
            config["workers"][0]["address"] = pool.workers[0].address
            engine = MasterEngine(parse_config(config), pool, MasterMetrics())
            with pytest.raises(WorkerUnavailableError) as err:
                await engine.forward(0, [torch.ones(2, 64)], timeout_s=5)
            return str(err.value)

    message = asyncio.run(go())
    assert message.startswith("no live replica for layer 0 experts"), message
    assert "['w0'] unavailable (w0: TLS: its certificate does not match" in message
    assert repr(OTHER_NAME) in message


def test_a_worker_without_tls_is_named_as_not_speaking_tls(
    certs: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)

    async def go() -> list[str]:
        async with pool_to_worker({}, {"tls": tls(certs)}):
            return await tls_lines(caplog, SAID_WITHIN_S)

    found = asyncio.run(go())
    assert len(found) == 1, found
    assert "worker w0" in found[0]
    assert "does not speak TLS" in found[0]


def test_a_matching_name_logs_nothing_about_tls_and_the_worker_comes_up(
    certs: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)

    async def go() -> tuple[bool, list[str]]:
        async with pool_to_worker(
            {"tls": tls(certs)}, {"tls": tls(certs, server_name="localhost")}
        ) as pool:
            deadline = time.monotonic() + SAID_WITHIN_S
            while not pool.healthy[0] and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            return pool.healthy[0], await tls_lines(caplog, 0)

    healthy, found = asyncio.run(go())
    assert healthy
    assert found == []
