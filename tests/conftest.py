"""Shared fixtures: real `moe-serve up` clusters on free loopback ports, stopped by pid."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from moe_serve.config import WorldConfig, parse_config
from moe_serve.tools.demo import free_ports
from moe_serve.tools.launcher import is_serving
from moe_serve.transport.tls import ClientTLS

START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 30.0


@dataclass
class Cluster:
    """A running `moe-serve up` process and what the tests need to reach it."""

    proc: subprocess.Popen[bytes]
    cfg: WorldConfig
    address: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text()

    def child_pids(self) -> list[int]:
        """Pids `up` reported for its children ("started ... pid=N")."""
        return [
            int(line.rsplit("pid=", 1)[1])
            for line in self.log().splitlines()
            if line.startswith("moe-serve: started ")
        ]

    def metrics_url(self, worker: str | None = None) -> str:
        port = (
            self.cfg.master.metrics_port if worker is None else self.cfg.worker(worker).metrics_port
        )
        return f"http://127.0.0.1:{port}/metrics"


def alive(pid: int) -> bool:
    """Whether a process with this pid exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def world(
    model: dict[str, Any] | None = None,
    routing: dict[str, Any] | None = None,
    workers: list[dict[str, Any]] | None = None,
    **sections: Any,
) -> dict[str, Any]:
    """A world config dict on free loopback ports; workers default to 8 experts split in two."""
    master, mm, *rest = free_ports(2 + 2 * max(2, len(workers or [])))
    workers = workers or [{"experts": [0, 1, 2, 3]}, {"experts": [4, 5, 6, 7]}]
    full = []
    for i, w in enumerate(workers):
        full.append(
            {
                "id": f"w{i}",
                "address": f"127.0.0.1:{rest[2 * i]}",
                "metrics_port": rest[2 * i + 1],
                **w,
            }
        )
    base_model = {
        "hidden_size": 64,
        "expert_ffn_size": 128,
        "num_experts": 8,
        "top_k": 2,
        "moe_layers": [0],
        "seed": 7,
    }
    return {
        "model": {**base_model, **(model or {})},
        "routing": routing or {},
        "master": {
            "listen": f"127.0.0.1:{master}",
            "metrics_port": mm,
            **sections.pop("master", {}),
        },
        "workers": full,
        **sections,
    }


def start_up(config: dict[str, Any], tmp: Path) -> Cluster:
    """Write `config`, run `moe-serve up` on it, wait until the master is SERVING."""
    cfg = parse_config(config)
    path = tmp / "world.yaml"
    path.write_text(yaml.safe_dump(config))
    log_path = tmp / "up.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moe_serve", "up", "--config", str(path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    cluster = Cluster(proc, cfg, cfg.master.listen, log_path)
    deadline = time.monotonic() + START_TIMEOUT_S
    tls = ClientTLS.from_config(cfg.security.tls)
    while not is_serving(cluster.address, timeout=0.5, tls=tls):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_up(cluster)
            raise RuntimeError(f"cluster did not start:\n{cluster.log()}")
        time.sleep(0.2)
    return cluster


def stop_up(cluster: Cluster) -> int:
    """SIGTERM the `up` process by pid; SIGKILL its whole session if it hangs. Returns its code."""
    if cluster.proc.poll() is None:
        os.kill(cluster.proc.pid, signal.SIGTERM)
    try:
        return cluster.proc.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(cluster.proc.pid, signal.SIGKILL)
        cluster.proc.wait()
        raise


@pytest.fixture(scope="module")
def cluster_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """Start clusters for a test module; stop each one by pid at module end."""
    started: list[Cluster] = []

    def make(config: dict[str, Any]) -> Cluster:
        c = start_up(config, tmp_path_factory.mktemp("cluster"))
        started.append(c)
        return c

    yield make
    for c in started:
        stop_up(c)
