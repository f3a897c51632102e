"""Shared memory between the master and same-host workers: same results as bytes, no
cross-talk between concurrent calls, and bytes whenever the region cannot be used."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import pytest
import torch

from moe_serve.client import AsyncMoEClient, MoEClient
from moe_serve.errors import InvalidRequestError
from moe_serve.reference import ReferenceMoE
from moe_serve.shm import (
    ALIGN,
    SHM_DIR,
    MappedRegion,
    RegionNotAttachedError,
    SharedMemoryError,
    SharedRegion,
    _Blocks,
)
from moe_serve.v1 import moe_pb2 as pb
from tests.conftest import Cluster, world
from tests.test_metrics import scrape, total

FP32_TOL = 1e-5
CPU = torch.device("cpu")
F32 = frozenset({torch.float32})
BIG = 4096  # 4096 x 64 float32 = 1 MiB, and ~3000 rows per worker: over MIN_SHARED_BYTES

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


def test_worker_maps_the_masters_host_region_and_sees_its_writes() -> None:
    region = SharedRegion(16 * ALIGN, CPU)
    try:
        mapped = MappedRegion(region.description(), near=None)
        offset = region.alloc(4 * 8 * 4)
        region.view(offset, torch.float32, (4, 8)).copy_(torch.arange(32.0).view(4, 8))
        shared = region.shared(offset, torch.float32, (4, 8))
        assert torch.equal(
            mapped.view(shared, "hidden_shared", F32, 2), torch.arange(32.0).view(4, 8)
        )
    finally:
        region.close()
    assert not (SHM_DIR / region.description().host.name).exists()


def test_mapping_a_name_that_is_not_here_says_another_host() -> None:
    request = pb.AttachRegionRequest(
        id="0" * 16, size=4096, host=pb.HostRegion(name="moe_serve-1-" + "0" * 16)
    )
    with pytest.raises(SharedMemoryError, match="another host"):
        MappedRegion(request, near=None)


def test_mapping_with_a_wrong_nonce_is_refused() -> None:
    region = SharedRegion(4 * ALIGN, CPU)
    try:
        request = pb.AttachRegionRequest()
        request.CopyFrom(region.description())
        request.nonce = bytes(16)
        with pytest.raises(SharedMemoryError, match="nonce"):
            MappedRegion(request, near=None)
    finally:
        region.close()


def test_cuda_region_is_refused_by_a_worker_without_cuda() -> None:
    request = pb.AttachRegionRequest(id="1" * 16, size=4096, cuda=pb.CudaRegion(device_uuid="x"))
    with pytest.raises(SharedMemoryError, match="no CUDA device"):
        MappedRegion(request, near=None)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"offset": ALIGN + 1}, "hidden_shared.offset"),
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


def test_unknown_region_id_is_not_attached() -> None:
    region = SharedRegion(8 * ALIGN, CPU)
    try:
        mapped = MappedRegion(region.description(), near=None)
        with pytest.raises(RegionNotAttachedError):
            mapped.view(pb.SharedTensor(region="f" * 16), "hidden_shared", F32, 2)
    finally:
        region.close()


# --------------------------------------------------------------- end to end ---


@pytest.fixture(scope="module")
def shared(cluster_factory: Any) -> Cluster:
    return cluster_factory(world())


@pytest.fixture(scope="module")
def plain(cluster_factory: Any) -> Cluster:
    return cluster_factory(world(master={"shared_memory_bytes": 0}))


@pytest.fixture(scope="module")
def tiny(cluster_factory: Any) -> Cluster:
    # Room for 32 x 64 float32 rows in and out: every slice worth sharing falls back to bytes.
    return cluster_factory(world(master={"shared_memory_bytes": ALIGN + 2 * 32 * 64 * 4}))


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


def test_client_with_shared_memory_off_sends_bytes(plain: Cluster) -> None:
    before = scrape(plain.metrics_url())
    with MoEClient(plain.address, shared_memory_bytes=0) as client:
        client.infer(_x(BIG, 4))
    after = scrape(plain.metrics_url())
    name = "moe_serve_master_infer_transport_total"
    assert total(after, name, transport="bytes") - total(before, name, transport="bytes") == 1
    assert total(after, name, transport="shared") == total(before, name, transport="shared")
