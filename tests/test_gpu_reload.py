"""A worker's live reload on a GPU (run with `pytest -m gpu`): its new stacks are built on a
thread while CUDA-graph-sized Forward calls keep coming, in bfloat16 with the grouped GEMM;
no call fails, each keeps its bits, and an added expert gives the bits of a worker started
with it."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
import torch

from moe_serve.transport.wire import tensor_from_pb, tensor_to_pb
from moe_serve.v1 import moe_pb2 as pb
from moe_serve.v1 import moe_pb2_grpc as pb_grpc
from tests.test_worker_reload import WAIT_S, H, config, info, with_experts, worker, write

pytestmark = [pytest.mark.gpu, pytest.mark.e2e]  # as tests/test_gpu.py

MODEL = {
    "moe_layers": [0, 1, 2, 3],
    "expert_ffn_size": 512,
    "dtype": "bfloat16",
    "expert_kind": "glu",
    "activation": "silu",
}


@pytest.fixture(autouse=True)
def _cuda() -> None:
    if not torch.cuda.is_available():
        pytest.fail("this test needs a CUDA device")


async def forward(
    stub: pb_grpc.ExpertWorkerStub, experts: list[int], layer: int, tokens: int
) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 * layer + tokens)
    hidden = torch.randn(tokens, H, generator=g).to(torch.bfloat16)
    token = torch.arange(tokens, dtype=torch.int32).repeat_interleave(len(experts))
    request = pb.ForwardRequest(
        layer=layer,
        hidden=tensor_to_pb(hidden),
        pair_token=tensor_to_pb(token),
        pair_expert=tensor_to_pb(torch.tensor(experts, dtype=torch.int32).repeat(tokens)),
        pair_weight=tensor_to_pb(torch.full((token.shape[0],), 1 / len(experts))),
        pair_outputs=True,
    )
    reply = await stub.Forward(request, timeout=WAIT_S)
    return tensor_from_pb(reply.output, "output")


def test_a_reload_on_cuda_fails_no_forward_and_keeps_every_bit(tmp_path: Path) -> None:
    start = config([0, 1, 2, 3], [3, 4, 5, 6, 7], ("cuda:0",), **MODEL)
    path = write(tmp_path / "world.yaml", start)
    sizes = (1, 2, 3, 17)  # CUDA-graph buckets, and one past them

    async def main() -> tuple[int, int, int, list[torch.Tensor], list[torch.Tensor]]:
        async with worker(path) as (_, stub):
            want = {
                (la, t): await forward(stub, [0, 1, 2], la, t) for la in range(4) for t in sizes
            }
            done, reloading = asyncio.Event(), False
            ok, failed, during = 0, 0, 0

            async def loop(layer: int) -> None:
                nonlocal ok, failed, during
                while not done.is_set():
                    for t in sizes:
                        try:
                            got = await forward(stub, [0, 1, 2], layer, t)
                        except grpc.aio.AioRpcError:
                            failed += 1
                            continue
                        assert torch.equal(got, want[layer, t]), (layer, t)
                        ok, during = ok + 1, during + reloading

            loops = [asyncio.create_task(loop(la)) for la in range(4)]
            await asyncio.sleep(0.2)
            write(path, with_experts(start, [0, 1, 2, 4, 5], [3, 4, 5, 6, 7]))
            reloading = True
            await stub.Reload(pb.ReloadRequest(), timeout=WAIT_S)
            reloading = False
            while (await info(stub))[1]:  # until the grace window ends
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.3)
            done.set()
            await asyncio.gather(*loops)
            added = [await forward(stub, [4, 5], la, 3) for la in range(4)]
        fresh = with_experts(start, [0, 1, 2, 4, 5], [3, 4, 5, 6, 7])
        async with worker(write(tmp_path / "fresh.yaml", fresh)) as (_, stub):
            started = [await forward(stub, [4, 5], la, 3) for la in range(4)]
        return ok, failed, during, added, started

    ok, failed, during, added, started = asyncio.run(main())
    assert failed == 0 and ok > during
    for a, b in zip(added, started, strict=True):
        assert torch.equal(a, b)
