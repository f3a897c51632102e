"""The server factories `moe-serve master` and `moe-serve worker` run: `create_master` and
`create_worker` bind (port 0: any free port), report the bound ports, serve, and stop; a
master that cannot bind frees everything it had made, its shared region first."""

from __future__ import annotations

import asyncio
import gc
import os
import socket
from pathlib import Path

import pytest
import torch

from moe_serve.client import AsyncMoEClient
from moe_serve.config import parse_config
from moe_serve.errors import ConfigError
from moe_serve.layer.reference import ReferenceMoE
from moe_serve.master.server import create_master
from moe_serve.tools.launcher import is_serving
from moe_serve.transport.shm import MEMFD_NAME
from moe_serve.worker.server import create_worker
from tests.support.cluster import serve_world, world

ALL = list(range(8))


def regions_open() -> int:
    """Shared regions (memfds named MEMFD_NAME) this process holds a descriptor of."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # the listing's own descriptor, closed meanwhile
            continue
        count += target.startswith(f"/memfd:{MEMFD_NAME}")
    return count


def test_port_0_binds_free_ports_that_the_handles_report_and_serve_on() -> None:
    config = world(workers=[{"experts": ALL}])
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(1))

    async def main() -> tuple[list[int], torch.Tensor, list[bool]]:
        async with serve_world(config) as w:
            worker, master = w.workers["w0"], w.master
            ports = [master.port, worker.port, master.metrics_port or 0, worker.metrics_port or 0]
            async with AsyncMoEClient(f"127.0.0.1:{master.port}", timeout=30) as client:
                y = await client.infer(x)
            up = await asyncio.to_thread(
                lambda: [is_serving(f"127.0.0.1:{p}") for p in (master.port, worker.port)]
            )
        return ports, y, up

    ports, y, up = asyncio.run(main())
    assert all(p > 0 for p in ports) and len(set(ports)) == 4
    assert up == [True, True]
    cfg = parse_config(config)
    assert (y - ReferenceMoE(cfg.model, cfg.routing).forward(x, 0)[0]).abs().max() <= 1e-5


def test_stopped_servers_free_their_ports() -> None:
    cfg = parse_config(world(workers=[{"experts": ALL}]))

    async def main() -> tuple[int, bool, bool]:
        async with await create_worker(cfg, "w0", port=0, metrics_port=0) as worker:
            port = worker.port
            serving = await asyncio.to_thread(is_serving, f"127.0.0.1:{port}")
        after = await asyncio.to_thread(is_serving, f"127.0.0.1:{port}", 1.0)
        return port, serving, after

    port, serving, after = asyncio.run(main())
    assert serving and not after
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))  # free again


def test_a_master_that_cannot_bind_fails_naming_the_key_and_keeps_no_region(
    tmp_path: Path,
) -> None:
    cfg = parse_config(world(workers=[{"experts": ALL}]))
    assert cfg.master.shared_memory_bytes == 256 << 20  # the default: a region is made
    gc.collect()  # regions of earlier tests that only a collection frees
    before = regions_open()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()

        async def main() -> None:
            await create_master(cfg, port=taken.getsockname()[1])

        with pytest.raises(ConfigError, match=r"master\.listen: cannot bind"):
            asyncio.run(main())
    assert regions_open() == before


def test_a_master_whose_metrics_port_is_taken_stops_its_server_and_keeps_no_region() -> None:
    cfg = parse_config(world(workers=[{"experts": ALL}]))
    gc.collect()  # regions of earlier tests that only a collection frees
    before = regions_open()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()

        async def main() -> None:
            await create_master(cfg, port=0, metrics_port=taken.getsockname()[1])

        with pytest.raises(ConfigError, match=r"master\.metrics_port: cannot serve metrics"):
            asyncio.run(main())
    assert regions_open() == before
