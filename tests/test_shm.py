"""Shared memory between the master and same-host workers: same results as bytes, no
cross-talk between concurrent calls, and bytes whenever the region cannot be used."""

from __future__ import annotations

import asyncio
import ctypes
import fcntl
import gc
import itertools
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch

from moe_serve.client import AsyncMoEClient, MoEClient
from moe_serve.errors import InvalidRequestError
from moe_serve.layer.reference import ReferenceMoE
from moe_serve.transport.shm import (
    ALIGN,
    MappedRegion,
    RegionNotAttachedError,
    RegionTable,
    SharedMemoryError,
    SharedRegion,
    _Blocks,
    _wrap,
)
from moe_serve.v1 import moe_pb2 as pb
from tests.conftest import Cluster, world
from tests.test_metrics import scrape, total

FP32_TOL = 1e-5
CPU = torch.device("cpu")
F32 = frozenset({torch.float32})
BIG = 4096  # 4096 x 64 float32 = 1 MiB, and ~3000 rows per worker: over MIN_SHARED_BYTES
A, B = "ipv4:127.0.0.1:40001", "ipv4:127.0.0.1:40002"  # two connections, as context.peer()

# --------------------------------------------------------------------- allocator ---


def test_blocks_are_aligned_and_never_overlap() -> None:
    blocks = _Blocks(64 * ALIGN)
    got = [(blocks.alloc(n), n) for n in (1, ALIGN, ALIGN + 1, 3 * ALIGN - 5, 17)]
    spans = sorted((start, start + -(-n // ALIGN) * ALIGN) for start, n in got)
    assert all(start % ALIGN == 0 for start, _ in spans)
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in itertools.pairwise(spans))
    assert spans[0][0] == ALIGN  # the first block holds the nonce and is never handed out


def test_full_region_returns_none_and_freed_blocks_merge_back() -> None:
    blocks = _Blocks(5 * ALIGN)  # 4 allocatable blocks
    a, b, c, d = (blocks.alloc(ALIGN) for _ in range(4))
    assert blocks.alloc(1) is None
    for start in (b, d, c, a):  # free out of order: neighbours must coalesce
        blocks.free(start, ALIGN)
    assert blocks.used == 0
    assert blocks.alloc(4 * ALIGN) == ALIGN


# ------------------------------------------------------------------ host regions ---


@pytest.fixture
def region() -> Iterator[SharedRegion]:
    r = SharedRegion(16 * ALIGN, CPU)
    yield r
    r.close()


def _offer(region: SharedRegion, **changes: Any) -> pb.AttachRegionRequest:
    request = pb.AttachRegionRequest()
    request.CopyFrom(region.description())
    for key, value in changes.items():
        setattr(request, key, value)
    return request


def _memfd(size: int, mode: int = 0o600, seals: int = 0, nonce: bytes = b"") -> int:
    fd = os.memfd_create("test", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.fchmod(fd, mode)
    os.ftruncate(fd, size)
    os.pwrite(fd, nonce, 0)
    if seals:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    return fd


def _file_offer(fd: int, size: int, nonce: bytes) -> pb.AttachRegionRequest:
    return pb.AttachRegionRequest(
        id="f" * 32, size=size, nonce=nonce, host=pb.HostRegion(pid=os.getpid(), fd=fd)
    )


def test_peer_maps_the_owners_host_region_and_sees_its_writes(region: SharedRegion) -> None:
    mapped = MappedRegion(region.description(), near=None)
    offset = region.alloc(4 * 8 * 4)
    region.view(offset, torch.float32, (4, 8)).copy_(torch.arange(32.0).view(4, 8))
    shared = region.shared(offset, torch.float32, (4, 8))
    assert torch.equal(mapped.view(shared, "hidden_shared", F32, 2), torch.arange(32.0).view(4, 8))


def test_host_region_is_a_sealed_owner_only_memfd_with_no_name_in_dev_shm(
    region: SharedRegion,
) -> None:
    fd = region.description().host.fd
    st = os.fstat(fd)
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_uid == os.geteuid()
    seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    assert (
        seals & (fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW) == fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
    )
    assert os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:moe_serve-region")
    assert not [p for p in Path("/dev/shm").iterdir() if region.id in p.name]
    assert len(region.id) == 32  # 128 random bits


def test_sealed_region_cannot_be_shrunk_by_its_owner(region: SharedRegion) -> None:
    with pytest.raises(PermissionError):
        os.ftruncate(region.description().host.fd, 0)


def test_closed_region_can_no_longer_be_mapped(region: SharedRegion) -> None:
    offer = region.description()
    region.close()
    with pytest.raises(SharedMemoryError):
        MappedRegion(offer, near=None)


def test_region_of_no_process_here_says_another_host_or_namespace() -> None:
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    request = pb.AttachRegionRequest(
        id="0" * 32, size=4096, nonce=bytes(16), host=pb.HostRegion(pid=int(dead.stdout), fd=3)
    )
    with pytest.raises(SharedMemoryError, match="another host or PID namespace"):
        MappedRegion(request, near=None)


@pytest.mark.parametrize("nonce", [b"", bytes(15)])
def test_offer_without_a_long_enough_nonce_is_refused(region: SharedRegion, nonce: bytes) -> None:
    with pytest.raises(SharedMemoryError, match=r"nonce: .* expected 16"):
        MappedRegion(_offer(region, nonce=nonce), near=None)


def test_offer_with_a_wrong_nonce_is_refused(region: SharedRegion) -> None:
    with pytest.raises(SharedMemoryError, match="nonce"):
        MappedRegion(_offer(region, nonce=bytes(32)), near=None)


def test_offer_larger_than_the_file_is_refused(region: SharedRegion) -> None:
    with pytest.raises(SharedMemoryError, match=f"has {16 * ALIGN} bytes"):
        MappedRegion(_offer(region, size=17 * ALIGN), near=None)


def test_unsealed_memfd_is_refused() -> None:
    nonce = os.urandom(16)
    fd = _memfd(1 << 20, nonce=nonce)
    try:
        with pytest.raises(SharedMemoryError, match="not sealed"):
            MappedRegion(_file_offer(fd, 1 << 20, nonce), near=None)
    finally:
        os.close(fd)


def test_file_in_dev_shm_is_refused(tmp_path: Path) -> None:
    path = Path("/dev/shm") / f"moe_serve-test-{os.getpid()}"
    nonce = os.urandom(16)
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    try:
        os.ftruncate(fd, 1 << 20)
        os.pwrite(fd, nonce, 0)
        with pytest.raises(SharedMemoryError, match="not sealed"):
            MappedRegion(_file_offer(fd, 1 << 20, nonce), near=None)
    finally:
        os.close(fd)
        path.unlink()


def test_memfd_open_to_other_users_is_refused() -> None:
    nonce = os.urandom(16)
    fd = _memfd(1 << 20, 0o666, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW, nonce)
    try:
        with pytest.raises(SharedMemoryError, match="mode 0666"):
            MappedRegion(_file_offer(fd, 1 << 20, nonce), near=None)
    finally:
        os.close(fd)


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another uid needs root")
def test_memfd_of_another_user_is_refused() -> None:
    nonce = os.urandom(16)
    fd = _memfd(1 << 20, 0o600, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW, nonce)
    os.fchown(fd, 65534, 65534)
    try:
        with pytest.raises(SharedMemoryError, match="owned by uid 65534"):
            MappedRegion(_file_offer(fd, 1 << 20, nonce), near=None)
    finally:
        os.close(fd)


def test_descriptor_that_is_no_regular_file_is_refused_unopened() -> None:
    r, w = os.pipe()
    try:
        with pytest.raises(SharedMemoryError, match="not a regular file"):
            MappedRegion(_file_offer(r, 1 << 20, os.urandom(16)), near=None)
    finally:
        os.close(r)
        os.close(w)


def test_cuda_region_is_refused_by_a_worker_without_cuda() -> None:
    request = pb.AttachRegionRequest(
        id="1" * 32, size=4096, nonce=bytes(16), cuda=pb.CudaRegion(device_uuid="x")
    )
    with pytest.raises(SharedMemoryError, match="no CUDA device"):
        MappedRegion(request, near=None)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"offset": ALIGN + 1}, "hidden_shared.offset"),
        ({"offset": 0}, "hidden_shared.offset"),  # the first block holds the nonce
        ({"offset": 8 * ALIGN}, "hidden_shared.offset"),  # runs past the region's end
        ({"shape": [4]}, "hidden_shared.shape"),
        ({"dtype": pb.DTYPE_BFLOAT16}, "hidden_shared.dtype"),
    ],
)
def test_bad_shared_tensor_names_the_field(change: dict[str, Any], field: str) -> None:
    region = SharedRegion(8 * ALIGN, CPU)
    try:
        mapped = MappedRegion(region.description(), near=None)
        shared = region.shared(ALIGN, torch.float32, (4, 8))
        for key, value in change.items():
            if key == "shape":
                del shared.shape[:]
                shared.shape.extend(value)
            else:
                setattr(shared, key, value)
        with pytest.raises(InvalidRequestError) as err:
            mapped.view(shared, "hidden_shared", F32, 2)
        assert err.value.field == field
    finally:
        region.close()


def test_memory_wrapped_for_torch_is_released_with_its_last_view() -> None:
    buffer = bytearray(4096)
    address = ctypes.addressof((ctypes.c_char * 4096).from_buffer(buffer))
    released: list[int] = []
    t = _wrap(address, 4096, CPU, lambda: released.append(1))
    view = t[ALIGN:]
    t[:3] = 7
    del t
    gc.collect()
    assert released == []  # `view` still holds the memory
    assert buffer[:4] == b"\x07\x07\x07\x00"
    del view
    gc.collect()
    assert released == [1]


# ---------------------------------------------------------------- region table ---


def _table_view(table: RegionTable, peer: str, region: SharedRegion) -> torch.Tensor:
    return table.view(peer, region.shared(ALIGN, torch.float32, (4, 8)), "hidden_shared", F32, 2)


def test_region_resolves_only_on_the_connection_that_attached_it(region: SharedRegion) -> None:
    table = RegionTable()
    table.attach(A, region.description(), near=None)
    assert _table_view(table, A, region).shape == (4, 8)
    with pytest.raises(RegionNotAttachedError, match="not mapped for this connection"):
        _table_view(table, B, region)


def test_attach_on_another_connection_keeps_the_first_binding(region: SharedRegion) -> None:
    other = SharedRegion(16 * ALIGN, CPU)
    try:
        table = RegionTable()
        table.attach(A, region.description(), near=None)
        impostor = other.description()
        impostor.id = region.id  # same id, other memory, other connection
        table.attach(B, impostor, near=None)
        region.view(ALIGN, torch.float32, (4, 8)).fill_(1.0)
        other.view(ALIGN, torch.float32, (4, 8)).fill_(2.0)
        assert _table_view(table, A, region).sum().item() == 32.0
        assert _table_view(table, B, region).sum().item() == 64.0
    finally:
        other.close()


def test_a_connection_keeps_its_four_newest_regions() -> None:
    regions = [SharedRegion(4 * ALIGN, CPU) for _ in range(6)]
    try:
        table = RegionTable()
        for r in regions:
            table.attach(A, r.description(), near=None)
        assert len(table) == 4
        for r in regions[:2]:
            with pytest.raises(RegionNotAttachedError):
                _table_view(table, A, r)
        for r in regions[2:]:
            assert _table_view(table, A, r).shape == (4, 8)
    finally:
        for r in regions:
            r.close()


def test_a_full_table_refuses_a_newcomer_rather_than_evict_a_busy_region() -> None:
    regions = [SharedRegion(4 * ALIGN, CPU) for _ in range(3)]
    try:
        table = RegionTable(capacity=2, idle_s=300.0)
        table.attach(A, regions[0].description(), near=None)
        table.attach(B, regions[1].description(), near=None)
        with pytest.raises(SharedMemoryError, match="holds 2 regions of other connections"):
            table.attach("ipv4:127.0.0.1:40003", regions[2].description(), near=None)
        assert _table_view(table, A, regions[0]).shape == (4, 8)
        assert _table_view(table, B, regions[1]).shape == (4, 8)
    finally:
        for r in regions:
            r.close()


def test_a_full_table_evicts_the_region_idle_longest() -> None:
    regions = [SharedRegion(4 * ALIGN, CPU) for _ in range(3)]
    try:
        table = RegionTable(capacity=2, idle_s=0.0)
        table.attach(A, regions[0].description(), near=None)
        table.attach(B, regions[1].description(), near=None)
        _table_view(table, A, regions[0])  # A used last: B's region is the idlest
        table.attach("ipv4:127.0.0.1:40003", regions[2].description(), near=None)
        assert _table_view(table, A, regions[0]).shape == (4, 8)
        with pytest.raises(RegionNotAttachedError):
            _table_view(table, B, regions[1])
    finally:
        for r in regions:
            r.close()


def test_a_region_its_owner_closed_is_dropped_to_make_room(region: SharedRegion) -> None:
    closed = SharedRegion(4 * ALIGN, CPU)
    table = RegionTable(capacity=1, idle_s=300.0)
    table.attach(A, closed.description(), near=None)
    with pytest.raises(SharedMemoryError, match="holds 1 regions"):
        table.attach(B, region.description(), near=None)
    closed.close()  # the owner withdraws it (as on exit): its descriptor is gone
    table.attach(B, region.description(), near=None)
    assert len(table) == 1
    assert _table_view(table, B, region).shape == (4, 8)


# --------------------------------------------------------------- end to end ---


@pytest.fixture(scope="module")
def shared(in_process_factory: Any) -> Cluster:
    return in_process_factory(world())


@pytest.fixture(scope="module")
def plain(in_process_factory: Any) -> Cluster:
    return in_process_factory(world(master={"shared_memory_bytes": 0}))


@pytest.fixture(scope="module")
def tiny(in_process_factory: Any) -> Cluster:
    # Room for 32 x 64 float32 rows in and out: every slice worth sharing falls back to bytes.
    return in_process_factory(world(master={"shared_memory_bytes": ALIGN + 2 * 32 * 64 * 4}))


def _x(tokens: int, seed: int) -> torch.Tensor:
    return torch.randn(tokens, 64, generator=torch.Generator().manual_seed(seed))


def test_calls_go_through_shared_memory_on_one_host(shared: Cluster) -> None:
    with MoEClient(shared.address) as client:
        client.infer(_x(BIG, 0))  # each worker's slice is well over MIN_SHARED_BYTES
    samples = scrape(shared.metrics_url())
    assert total(samples, "moe_serve_worker_calls_total", transport="shared") >= 2
    assert total(samples, "moe_serve_worker_calls_total", transport="bytes") == 0


@pytest.mark.parametrize("tokens", [1, 37, 4096])
def test_shared_memory_and_bytes_give_bit_identical_outputs(
    shared: Cluster, plain: Cluster, tokens: int
) -> None:
    x = _x(tokens, tokens)
    with MoEClient(shared.address) as a, MoEClient(plain.address) as b:
        assert torch.equal(a.infer(x), b.infer(x))


def test_concurrent_calls_see_only_their_own_rows(shared: Cluster) -> None:
    ref = ReferenceMoE(shared.cfg.model, shared.cfg.routing)
    xs = [_x(2048 + 7 * i, 100 + i) for i in range(8)]

    async def main() -> list[torch.Tensor]:
        async with AsyncMoEClient(shared.address) as client:
            return await asyncio.gather(*(client.infer(x) for x in xs))

    for x, y in zip(xs, asyncio.run(main()), strict=True):
        expected, _ = ref.forward(x, 0)
        assert (y - expected).abs().max().item() <= FP32_TOL


def test_full_region_falls_back_to_bytes_with_the_same_result(
    tiny: Cluster, plain: Cluster
) -> None:
    x = _x(BIG, 5)  # each worker's slice exceeds the region
    with MoEClient(tiny.address) as a, MoEClient(plain.address) as b:
        assert torch.equal(a.infer(x), b.infer(x))
    samples = scrape(tiny.metrics_url())
    assert total(samples, "moe_serve_master_shared_fallbacks_total") >= 1
    assert total(samples, "moe_serve_worker_calls_total", transport="bytes") >= 1


# ------------------------------------------------------------ client <-> master ---


def test_large_requests_from_a_same_host_client_use_shared_memory(shared: Cluster) -> None:
    name = "moe_serve_master_infer_transport_total"
    before = total(scrape(shared.metrics_url()), name, transport="shared")
    with MoEClient(shared.address) as client:
        client.infer(_x(BIG, 1))
        client.infer(_x(BIG, 2))
        client.infer(_x(16, 2))  # small: bytes
    assert total(scrape(shared.metrics_url()), name, transport="shared") - before == 2


def test_client_shared_memory_gives_the_bytes_result_bit_identical(
    shared: Cluster, plain: Cluster
) -> None:
    x = _x(BIG, 3)
    with MoEClient(shared.address) as a, MoEClient(plain.address, shared_memory_bytes=0) as b:
        y, routing = a.infer(x, return_routing=True)
        y_bytes, routing_bytes = b.infer(x, return_routing=True)
    assert torch.equal(y, y_bytes)
    assert torch.equal(routing.weights, routing_bytes.weights)


def test_concurrent_large_requests_from_one_client_do_not_mix(shared: Cluster) -> None:
    ref = ReferenceMoE(shared.cfg.model, shared.cfg.routing)
    xs = [_x(BIG + 64 * i, 200 + i) for i in range(6)]

    async def main() -> list[torch.Tensor]:
        async with AsyncMoEClient(shared.address) as client:
            return await asyncio.gather(*(client.infer(x) for x in xs))

    for x, y in zip(xs, asyncio.run(main()), strict=True):
        expected, _ = ref.forward(x, 0)
        assert (y - expected).abs().max().item() <= FP32_TOL


def test_one_sync_client_shared_by_threads_gives_each_call_its_own_rows(shared: Cluster) -> None:
    ref = ReferenceMoE(shared.cfg.model, shared.cfg.routing)
    xs = [_x(2048 + 64 * i, 300 + i) for i in range(8)]  # 512+ KiB each: shared memory
    name = "moe_serve_master_infer_transport_total"
    before = total(scrape(shared.metrics_url()), name, transport="shared")
    with MoEClient(shared.address) as client, ThreadPoolExecutor(len(xs)) as pool:
        ys = list(pool.map(client.infer, xs))
    for x, y in zip(xs, ys, strict=True):
        expected, _ = ref.forward(x, 0)
        assert (y - expected).abs().max().item() <= FP32_TOL
    assert total(scrape(shared.metrics_url()), name, transport="shared") - before == len(xs)


def test_client_with_shared_memory_off_sends_bytes(plain: Cluster) -> None:
    before = scrape(plain.metrics_url())
    with MoEClient(plain.address, shared_memory_bytes=0) as client:
        client.infer(_x(BIG, 4))
    after = scrape(plain.metrics_url())
    name = "moe_serve_master_infer_transport_total"
    assert total(after, name, transport="bytes") - total(before, name, transport="bytes") == 1
    assert total(after, name, transport="shared") == total(before, name, transport="shared")
