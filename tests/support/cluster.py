"""The one cluster harness of the tests: a world config's master and workers, either served
in this process on port 0 (`serve_world`, `InProcessCluster`: what most tests need) or run as
child processes stopped by pid (`ProcessCluster`, built on the `moe-serve up` launcher: for
kills, signals, drains, per-process memory and attacks from another user).

Both are built from the same factories as `moe-serve master` / `moe-serve worker`
(`create_master`, `create_worker`), so a test exercises the code path the CLI runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import os
import signal
import threading
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol, TypeVar

import torch
import yaml

from moe_serve.config import WorldConfig, parse_address, parse_config
from moe_serve.master.server import MasterServer, create_master
from moe_serve.metrics import local_url
from moe_serve.tools.demo import free_ports
from moe_serve.tools.launcher import LocalCluster, dial_address, is_serving
from moe_serve.transport.tls import ClientTLS
from moe_serve.worker.server import ServiceFactory, WorkerServer, create_worker
from moe_serve.worker.service import WorkerService

START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 30.0
T = TypeVar("T")


def world(
    model: dict[str, Any] | None = None,
    routing: dict[str, Any] | None = None,
    workers: list[dict[str, Any]] | None = None,
    **sections: Any,
) -> dict[str, Any]:
    """A world config dict on free loopback ports; workers default to 8 experts split in two.

    In-process clusters bind port 0 whatever the ports say (and report the bound ones)."""
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


def alive(pid: int) -> bool:
    """Whether a process with this pid exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


class Cluster(Protocol):
    """What tests reach a running cluster through, in-process or as processes."""

    cfg: WorldConfig  # with the ports it is really bound to

    @property
    def address(self) -> str:
        """Where clients reach the master."""

    def metrics_url(self, worker: str | None = None) -> str:
        """The master's (or worker `worker`'s) /metrics URL."""

    def log(self) -> str:
        """What the cluster logged so far."""

    def running(self) -> bool:
        """Whether every part of it is still up."""


def _with_port(address: str, port: int) -> str:
    return f"{parse_address(address)[0]}:{port}"


# ------------------------------------------------------------------------ in-process ---


@dataclass
class World:
    """A master and its workers served by the running event loop, on the ports in `cfg`."""

    cfg: WorldConfig
    master: MasterServer
    workers: dict[str, WorkerServer]
    config: dict[str, Any]  # `cfg` as a config dict (what a world.yaml of it would hold)


@contextlib.asynccontextmanager
async def serve_world(
    config: dict[str, Any],
    service: ServiceFactory = WorkerService,
    ready_timeout_s: float = START_TIMEOUT_S,
    tracer_provider: Any = None,
) -> AsyncIterator[World]:
    """Start every worker of `config` (servicers built by `service`), then the master, on
    port 0 (and metrics port 0 where the config exports), on the running loop; yield once
    the master is ready; stop them all (no grace) on exit. `tracer_provider`: an
    OpenTelemetry TracerProvider every process records its spans in."""
    first = parse_config(config)
    workers: dict[str, WorkerServer] = {}
    master: MasterServer | None = None
    try:
        bound = {**config, "workers": [dict(w) for w in config["workers"]]}
        for w, entry in zip(first.workers, bound["workers"], strict=True):
            server = await create_worker(
                first,
                w.id,
                port=0,
                metrics_port=None if w.metrics_port is None else 0,
                service=service,
                tracer_provider=tracer_provider,
            )
            workers[w.id] = server
            entry["address"] = _with_port(w.address, server.port)
            if w.listen is not None:
                entry["listen"] = _with_port(w.listen, server.port)
            if server.metrics_port is not None:
                entry["metrics_port"] = server.metrics_port
        cfg = parse_config(bound)
        master = await create_master(
            cfg,
            port=0,
            metrics_port=None if cfg.master.metrics_port is None else 0,
            tracer_provider=tracer_provider,
        )
        bound["master"] = {**bound["master"], "listen": _with_port(cfg.master.listen, master.port)}
        if master.metrics_port is not None:
            bound["master"]["metrics_port"] = master.metrics_port
        await asyncio.wait_for(master.ready.wait(), ready_timeout_s)
        yield World(parse_config(bound), master, workers, bound)
    finally:
        if master is not None:
            await master.stop(0)
        for server in workers.values():
            await server.stop(0)


class _Captured(logging.Handler):
    """Every log record of the process at INFO and above, as `moe-serve up` would print it."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.text = io.StringIO()
        self.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        self._lock = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        with self._lock:
            self.text.write(self.format(record) + "\n")


class InProcessCluster:
    """`serve_world` on an event loop of its own thread, for tests written in sync code
    (their own clients, threads and `asyncio.run` loops call it as they would processes)."""

    def __init__(
        self,
        config: dict[str, Any],
        service: ServiceFactory = WorkerService,
        tracer_provider: Any = None,
    ) -> None:
        self._captured = _Captured()
        self._moe_logger = logging.getLogger("moe_serve")
        self._old_level = self._moe_logger.level
        self._moe_logger.setLevel(logging.INFO)  # what the CLI logs
        logging.getLogger().addHandler(self._captured)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="in-process cluster", daemon=True)
        self._thread.start()
        self._serving = serve_world(config, service, tracer_provider=tracer_provider)
        try:
            self.world = self.call(self._serving.__aenter__(), START_TIMEOUT_S)
        except BaseException:
            self._close()
            raise
        self.cfg = self.world.cfg
        self.tls = ClientTLS.from_config(self.cfg.security.tls)
        self._stopped = False

    def _run(self) -> None:
        torch.set_grad_enabled(False)  # as `moe-serve master` does (grad mode is per thread)
        self._loop.run_forever()

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = STOP_TIMEOUT_S) -> T:
        """Run `coro` on the cluster's loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    @property
    def address(self) -> str:
        return dial_address(self.cfg.master.listen)

    @property
    def master(self) -> MasterServer:
        return self.world.master

    @property
    def workers(self) -> dict[str, WorkerServer]:
        return self.world.workers

    def metrics_url(self, worker: str | None = None) -> str:
        server = self.master if worker is None else self.workers[worker]
        host = (
            self.cfg.master.metrics_bind_host
            if worker is None
            else self.cfg.worker(worker).metrics_bind_host
        )
        assert server.metrics_port is not None, "this config exports no metrics there"
        return local_url(host, server.metrics_port)

    def log(self) -> str:
        return self._captured.text.getvalue()

    def running(self) -> bool:
        """Whether the master and every worker still answer health checks SERVING."""
        addresses = [self.address] + [dial_address(w.address) for w in self.cfg.workers]
        return all(is_serving(a, timeout=5, tls=self.tls) for a in addresses)

    def write_config(self, path: Path) -> Path:
        """Write the config with its bound ports to `path` (for CLI commands that read it)."""
        path.write_text(yaml.safe_dump(self.world.config))
        return path

    def stop(self) -> None:
        """Stop every server (no grace) and the loop."""
        if self._stopped:
            return
        self._stopped = True
        try:
            self.call(self._serving.__aexit__(None, None, None))
        finally:
            self._close()

    def _close(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(STOP_TIMEOUT_S)
        self._loop.close()
        logging.getLogger().removeHandler(self._captured)
        self._moe_logger.setLevel(self._old_level)


# ------------------------------------------------------------------------- processes ---


class ProcessCluster(LocalCluster):
    """The master and every worker of `config` as child processes of the test (the launcher
    `moe-serve up` runs), logging to one file; children are stopped by pid."""

    def __init__(self, config: dict[str, Any], tmp: Path) -> None:
        self.config_path = tmp / "world.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.log_path = tmp / "cluster.log"
        self._log_file: IO[str] = open(self.log_path, "a")  # noqa: SIM115 - closed in stop()
        super().__init__(self.config_path, parse_config(config), log=self._log_file)
        self.verbose = False
        try:
            self.start(START_TIMEOUT_S)
        except BaseException:
            self.stop()
            raise

    @property
    def address(self) -> str:
        return self.master_address

    def metrics_url(self, worker: str | None = None) -> str:
        if worker is None:
            host, port = self.cfg.master.metrics_bind_host, self.cfg.master.metrics_port
        else:
            w = self.cfg.worker(worker)
            host, port = w.metrics_bind_host, w.metrics_port
        assert port is not None, "this config exports no metrics there"
        return local_url(host, port)

    def log(self) -> str:
        if not self._log_file.closed:
            self._log_file.flush()
        return self.log_path.read_text()

    def child_pids(self) -> list[int]:
        """Pids of the children, workers first, then the master."""
        return [proc.pid for proc in self.procs.values()]

    def kill(self, name: str, sig: signal.Signals = signal.SIGKILL) -> None:
        """Send child `name` ("master" or "worker <id>") `sig`; after SIGKILL, reap it."""
        os.kill(self.procs[name].pid, sig)
        if sig == signal.SIGKILL:
            self.procs[name].wait()

    def running(self) -> bool:
        """Whether every child is still alive."""
        return all(proc.poll() is None for proc in self.procs.values())

    def stop(self, grace_s: float = STOP_TIMEOUT_S) -> None:
        try:
            super().stop(grace_s)
        finally:
            self._log_file.close()
