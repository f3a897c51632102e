"""Start a world config's master and workers as local child processes, and stop them.

Used by `moe-serve up`, `moe-serve demo` and the tests' process clusters
(tests/support/cluster.py). Children are stopped by pid:
SIGTERM first (they drain), SIGKILL after the grace period.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from moe_serve.config import WorldConfig, parse_address
from moe_serve.transport.tls import ClientTLS, channel


class ClusterError(RuntimeError):
    """A child process exited or did not become healthy in time."""


def dial_address(listen_or_address: str) -> str:
    """Where to connect to a server bound on `listen_or_address` from this machine."""
    host, port = parse_address(listen_or_address)
    return f"127.0.0.1:{port}" if host in ("0.0.0.0", "[::]") else listen_or_address


def is_serving(address: str, timeout: float = 1.0, tls: ClientTLS | None = None) -> bool:
    """True if the gRPC health service at `address` answers SERVING (over TLS with `tls`)."""
    with channel(address, tls) as ch:
        try:
            reply = health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(), timeout=timeout
            )
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


class LocalCluster:
    """The master and every worker of a config, as child processes of this one."""

    def __init__(
        self,
        config_path: Path,
        cfg: WorldConfig,
        log: IO[str] | None = None,
        verbose: bool = True,
    ) -> None:
        self.config_path, self.cfg = config_path, cfg
        self.output = log  # children's stdout/stderr; None: inherit this process's
        self.verbose = verbose
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.tls = ClientTLS.from_config(cfg.security.tls)  # how the health probes dial

    def _spawn(self, name: str, threads: int, *args: str) -> None:
        cmd = [sys.executable, "-m", "moe_serve", *args, "--config", str(self.config_path)]
        # The children share this machine's cores: without a cap each would start one
        # busy-waiting OpenMP thread per core, and they would slow each other down.
        env = {"OMP_NUM_THREADS": str(threads), **os.environ}
        self.procs[name] = subprocess.Popen(cmd, stdout=self.output, stderr=self.output, env=env)
        self._say(f"started {name} pid={self.procs[name].pid}")

    def _say(self, text: str) -> None:
        if self.verbose:
            print(f"moe-serve: {text}", flush=True)

    @property
    def master_address(self) -> str:
        """Where clients on this machine reach the master."""
        return dial_address(self.cfg.master.listen)

    def child_address(self, name: str) -> str:
        """Where this machine reaches child `name` ("master" or "worker <id>")."""
        if name == "master":
            return self.master_address
        return dial_address(self.cfg.worker(name.removeprefix("worker ")).address)

    def pid(self, name: str) -> int:
        """Pid of child `name` ("master" or "worker <id>")."""
        return self.procs[name].pid

    def start_worker(self, worker_id: str) -> None:
        """Start (or start again) worker `worker_id` as child "worker <id>"."""
        threads = max(1, (os.cpu_count() or 1) // len(self.cfg.workers))
        self._spawn(f"worker {worker_id}", threads, "worker", "--worker-id", worker_id)

    def start(self, timeout_s: float = 120.0) -> None:
        """Start every worker and the master; return once all answer health checks."""
        for w in self.cfg.workers:
            self.start_worker(w.id)
        self._spawn("master", 1, "master")
        self.wait_serving(list(self.procs), timeout_s)

    def wait_serving(self, names: list[str], timeout_s: float = 120.0) -> None:
        """Return once children `names` answer health checks SERVING; ClusterError if a
        child exits meanwhile or they do not within `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        pending = {name: self.child_address(name) for name in names}
        while pending:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise ClusterError(f"{name} exited with code {proc.returncode} while starting")
            for name, address in list(pending.items()):
                if is_serving(address, timeout=0.5, tls=self.tls):
                    self._say(f"{name} is serving at {address}")
                    del pending[name]
            if pending and time.monotonic() > deadline:
                raise ClusterError(f"not healthy after {timeout_s:.0f}s: {sorted(pending)}")
            if pending:
                time.sleep(0.1)

    def wait(self) -> str | None:
        """Block until a child exits; return its name."""
        while True:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    return name
            time.sleep(0.2)

    def stop(self, grace_s: float = 15.0) -> None:
        """SIGTERM every child (master first), SIGKILL what is left after `grace_s`."""
        for proc in reversed(list(self.procs.values())):
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for name, proc in self.procs.items():
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self._say(f"{name} pid={proc.pid} did not stop in {grace_s:.0f}s; killing it")
                proc.kill()
                proc.wait()
