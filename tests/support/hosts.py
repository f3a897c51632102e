"""A world across two hosts (tests/support/netns.py): the workers of a config in host B, its
master in host A, so master and workers are joined by nothing but TCP on a 10 Gbit/s link.

`TwoHostCluster` is the tests' ProcessCluster (the launcher of `moe-serve up`: children
stopped, killed and restarted by pid, one log file) with each child started in its host,
and with the waits and scrapes it makes run from host A (this process is on neither host).
Clients run in A through `hosts.call(hosts.a, fn, ...)`.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

from moe_serve.config import load_config, parse_address
from moe_serve.tools.launcher import ClusterError, is_serving
from moe_serve.transport.tls import ClientTLS
from tests.support.cluster import START_TIMEOUT_S, ProcessCluster
from tests.support.netns import HostCall, TwoHosts
from tests.test_metrics import scrape


def on_hosts(config: dict[str, Any], hosts: TwoHosts) -> dict[str, Any]:
    """`config` (as tests.support.cluster.world makes it) with the master on A's address and
    every worker on B's, ports kept."""

    def moved(address: str, ip: str) -> str:
        return f"{ip}:{parse_address(address)[1]}"

    master = {**config["master"], "listen": moved(config["master"]["listen"], hosts.a.ip)}
    workers = [
        {**w, "address": moved(w["address"], hosts.b.ip)}
        | ({"listen": moved(w["listen"], hosts.b.ip)} if "listen" in w else {})
        for w in config["workers"]
    ]
    return {**config, "master": master, "workers": workers}


def pending_after(config_path: str, addresses: list[str], timeout_s: float) -> list[str]:
    """(Runs in a host.) Wait until every address answers health checks SERVING, at most
    `timeout_s`; the ones that did not."""
    tls = ClientTLS.from_config(load_config(config_path).security.tls)
    deadline = time.monotonic() + timeout_s
    pending = list(addresses)
    while pending:
        pending = [a for a in pending if not is_serving(a, timeout=0.5, tls=tls)]
        if not pending or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    return pending


class TwoHostCluster(ProcessCluster):
    """The master of `config` in host A, each of its workers in host B (child processes of
    this one, stopped by pid), configured by `on_hosts(config, hosts)`."""

    def __init__(self, hosts: TwoHosts, config: dict[str, Any], tmp: Path) -> None:
        self.hosts = hosts
        super().__init__(on_hosts(config, hosts), tmp)

    def _spawn(self, name: str, threads: int, *args: str) -> None:
        # LocalCluster._spawn's command and environment, started in the child's host.
        host = self.hosts.a if name == "master" else self.hosts.b
        cmd = [sys.executable, "-m", "moe_serve", *args, "--config", str(self.config_path)]
        env = {"OMP_NUM_THREADS": str(threads), **os.environ}
        self.procs[name] = self.hosts.popen(
            host, cmd, stdout=self.output, stderr=self.output, env=env
        )
        self._say(f"started {name} pid={self.procs[name].pid} in host {host.name}")

    def wait_serving(self, names: list[str], timeout_s: float = START_TIMEOUT_S) -> None:
        """LocalCluster.wait_serving, probed from host A (neither host is reachable from
        here): ClusterError if a child exits meanwhile or they are not serving in time."""
        addresses = {self.child_address(name): name for name in names}
        probe: HostCall = self.hosts.start_call(
            self.hosts.a, pending_after, str(self.config_path), list(addresses), timeout_s
        )
        while not probe.done():
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    probe.cancel()
                    raise ClusterError(f"{name} exited with code {proc.returncode} while starting")
            time.sleep(0.1)
        pending = probe.result()
        if pending:
            raise ClusterError(
                f"not healthy after {timeout_s:.0f}s: {sorted(addresses[a] for a in pending)}"
            )

    def scrape(
        self, worker: str | None = None
    ) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """Every metric sample of the master (or of worker `worker`), read from host A (the
        exporters bind their host's address: `metrics_url` is reachable from A only)."""
        samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = self.hosts.call(
            self.hosts.a, scrape, self.metrics_url(worker)
        )
        return samples
