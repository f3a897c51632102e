"""The `moe-serve` command: exit codes, `up` lifecycle, `demo`. Every test runs the command
as a process (e2e)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from moe_serve.tools.launcher import is_serving
from tests.conftest import alive as _alive
from tests.conftest import world

pytestmark = pytest.mark.e2e

START_TIMEOUT_S, STOP_TIMEOUT_S = 120.0, 30.0


class Up:
    """A `moe-serve up` process on a config, its output in a log file; stopped by pid."""

    def __init__(self, config: dict, tmp: Path) -> None:
        self.log_path = tmp / "up.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "moe_serve", "up", "--config", str(write(tmp, config))],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        address = config["master"]["listen"]
        deadline = time.monotonic() + START_TIMEOUT_S
        while not is_serving(address, timeout=0.5):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"up did not start:\n{self.log_path.read_text()}")
            time.sleep(0.2)

    def child_pids(self) -> list[int]:
        """Pids `up` reported for its children ("started ... pid=N")."""
        return [
            int(line.rsplit("pid=", 1)[1])
            for line in self.log_path.read_text().splitlines()
            if line.startswith("moe-serve: started ")
        ]

    def stop(self) -> int:
        """SIGTERM `up` by pid; SIGKILL its whole session if it hangs. Returns its code."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
        try:
            return self.proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            raise


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "moe_serve", *args], capture_output=True, text=True, timeout=timeout
    )


def write(tmp_path: Path, config: dict) -> Path:
    path = tmp_path / "world.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize("command", [["master"], ["up"], ["worker", "--worker-id", "w0"]])
def test_bad_config_exits_2_naming_the_field(tmp_path: Path, command: list[str]) -> None:
    config = world()
    config["model"]["top_k"] = 9
    result = run_cli(*command, "--config", str(write(tmp_path, config)))
    assert result.returncode == 2
    assert "model.top_k" in result.stderr and "num_experts=8" in result.stderr


def test_unknown_worker_id_exits_2(tmp_path: Path) -> None:
    result = run_cli("worker", "--config", str(write(tmp_path, world())), "--worker-id", "w9")
    assert result.returncode == 2 and "--worker-id" in result.stderr and "w0, w1" in result.stderr


def test_missing_config_file_exits_2(tmp_path: Path) -> None:
    result = run_cli("master", "--config", str(tmp_path / "nope.yaml"))
    assert result.returncode == 2 and "--config" in result.stderr


def test_missing_argument_exits_2() -> None:
    assert run_cli("worker", "--config", "x.yaml").returncode == 2


def test_worker_on_a_device_that_does_not_exist_exits_2(tmp_path: Path) -> None:
    import torch

    missing = f"cuda:{torch.cuda.device_count()}"
    config = world(workers=[{"experts": list(range(8)), "devices": [missing]}])
    result = run_cli("worker", "--config", str(write(tmp_path, config)), "--worker-id", "w0")
    assert result.returncode == 2
    assert "workers[0].devices[0]" in result.stderr and missing in result.stderr


def test_up_sigterm_stops_every_child_and_exits_0(tmp_path: Path) -> None:
    cluster = Up(world(), tmp_path)
    pids = cluster.child_pids()
    assert len(pids) == 3  # two workers and the master
    assert cluster.stop() == 0
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(p) for p in pids)


def test_up_exits_1_when_a_child_dies(tmp_path: Path) -> None:
    cluster = Up(world(), tmp_path)
    os.kill(cluster.child_pids()[0], signal.SIGKILL)
    assert cluster.proc.wait(timeout=30) == 1


def test_demo_reports_parity_and_exits_0() -> None:
    result = run_cli("demo", "--requests", "50", timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "parity: OK" in result.stdout
    assert "latency T=1: p50" in result.stdout and "tokens/s" in result.stdout


@pytest.mark.parametrize("port_key", ["address", "metrics_port"])
def test_worker_on_a_taken_port_exits_2_naming_the_field(tmp_path: Path, port_key: str) -> None:
    import socket

    config = world()
    taken = socket.socket()
    taken.bind(("0.0.0.0", 0))
    taken.listen()
    port = taken.getsockname()[1]
    w0 = config["workers"][0]
    w0[port_key] = f"127.0.0.1:{port}" if port_key == "address" else port
    try:
        result = run_cli("worker", "--config", str(write(tmp_path, config)), "--worker-id", "w0")
    finally:
        taken.close()
    assert result.returncode == 2, result.stderr
    assert f"workers[0].{port_key}: cannot" in result.stderr


def test_master_on_a_taken_port_exits_2_and_leaves_no_region_file(tmp_path: Path) -> None:
    import socket

    config = world()
    before = set(os.listdir("/dev/shm"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        config["master"]["listen"] = f"127.0.0.1:{taken.getsockname()[1]}"
        cmd = [
            sys.executable,
            "-m",
            "moe_serve",
            "master",
            "--config",
            str(write(tmp_path, config)),
        ]
        proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
        _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 2, stderr
    assert "master.listen: cannot bind" in stderr
    # Its 256 MiB region went with it: nothing new in /dev/shm names the master's pid.
    assert [name for name in set(os.listdir("/dev/shm")) - before if str(proc.pid) in name] == []
