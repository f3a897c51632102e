"""Shared fixtures: clusters from the one harness in tests/support/cluster.py.

- `in_process_factory`: master and workers served in this process on port 0 (most tests).
- `cluster_factory`: master and workers as child processes, stopped by pid; every test that
  uses it is marked `e2e` here, so `-m "not e2e"` never starts a server process.
- `two_hosts`: hosts A and B joined only by TCP (tests/support/netns.py; marked `e2e` too),
  skipped where namespaces are refused.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.support.cluster import (
    Cluster,
    InProcessCluster,
    ProcessCluster,
    alive,
    world,
)
from tests.support.netns import HostsUnavailableError, TwoHosts

__all__ = ["Cluster", "InProcessCluster", "ProcessCluster", "alive", "world"]

# Fixtures that start server processes: a test using one is an `e2e` test.
PROCESS_FIXTURES = frozenset({"cluster_factory", "two_hosts"})


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark `e2e` every test that starts server processes through a fixture (before `-m`
    selects: tryfirst)."""
    for item in items:
        if PROCESS_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="module")
def cluster_factory(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[[dict[str, Any]], ProcessCluster]]:
    """Start process clusters for a test module; stop each one by pid at module end."""
    started: list[ProcessCluster] = []

    def make(config: dict[str, Any]) -> ProcessCluster:
        c = ProcessCluster(config, tmp_path_factory.mktemp("cluster"))
        started.append(c)
        return c

    yield make
    for c in started:
        c.stop()


@pytest.fixture(scope="module")
def in_process_factory() -> Iterator[Callable[..., InProcessCluster]]:
    """Start in-process clusters (port 0) for a test module; stop them at module end."""
    started: list[InProcessCluster] = []

    def make(config: dict[str, Any], **kwargs: Any) -> InProcessCluster:
        c = InProcessCluster(config, **kwargs)
        started.append(c)
        return c

    yield make
    for c in started:
        c.stop()


@pytest.fixture(scope="module")
def two_hosts() -> Iterator[TwoHosts]:
    """Hosts A and B for a test module (network, PID and mount namespaces joined by a 10
    Gbit/s veth link); removed with every process in them at module end."""
    hosts = TwoHosts()
    try:
        hosts.open()
    except HostsUnavailableError as exc:
        pytest.skip(f"two hosts cannot be made here: {exc}")
    yield hosts
    hosts.close()
