"""Batch invariance on a GPU (run with `pytest -m gpu`): a token's bits on CUDA do not depend
on how many tokens share its call, for T in 1 ... 4096 and the CUDA-graph sizes."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from moe_serve.config import parse_config
from moe_serve.layer.experts import SmallBatchGraphs
from moe_serve.layer.rowwise import linear, ordered_sum
from moe_serve.tools.bench import GroupedMoE, InProcessMoE
from tests.support.cluster import world

pytestmark = [pytest.mark.gpu, pytest.mark.e2e]  # as tests/test_gpu.py: out of -m "not e2e" too

# Every CUDA-graph bucket (1 ... SmallBatchGraphs.MAX_TOKENS), just past each, and large T.
PREFIXES = sorted(
    {1, 2, 3, 4, 5, 7, 8, 9, 16, 17, 31, 33, 63, 65, 100, 128, 511, 1024, 2048, 4095}
    | {SmallBatchGraphs.MAX_TOKENS, SmallBatchGraphs.MAX_TOKENS + 1}
)


def gpu_world(workers: list[dict[str, Any]] | None = None, **model: Any) -> dict[str, Any]:
    return world(
        model={"hidden_size": 1024, "expert_ffn_size": 2048, "expert_kind": "glu",
               "activation": "silu", "dtype": "bfloat16", **model},
        master={"device": "cuda:0"},
        workers=workers or [{"experts": [0, 1, 2, 3], "devices": ["cuda:0"]},
                            {"experts": [4, 5, 6, 7], "devices": ["cuda:0"]}],
    )  # fmt: skip


@pytest.fixture(autouse=True)
def _cuda() -> None:
    if not torch.cuda.is_available():
        pytest.fail("this test needs a CUDA device")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_on_cuda_gives_a_row_the_bits_it_gets_alone(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 4096, generator=g).to("cuda", dtype)
    w = (torch.randn(8, 4096, generator=g) / 64).to("cuda", dtype)
    full = linear(x, w)
    for T in PREFIXES:
        assert torch.equal(linear(x[:T], w), full[:T]), f"T={T}"


def test_ordered_sum_on_cuda_is_the_same_every_run_and_whoever_is_beside() -> None:
    g = torch.Generator().manual_seed(1)
    token = torch.arange(4096).repeat_interleave(6).to("cuda")
    values = (torch.randn(token.shape[0], 1024, generator=g) * 1e3).to("cuda")
    first = ordered_sum(4096, token, values)
    for _ in range(5):
        assert torch.equal(ordered_sum(4096, token, values), first)
    assert torch.equal(ordered_sum(1, token[:6], values[:6])[0], first[0])


@pytest.mark.parametrize("layer_cls", [GroupedMoE, InProcessMoE])
@pytest.mark.parametrize(
    "model", [{}, {"top_k": 3}, {"shared_expert_ffn_size": 512}], ids=["top2", "top3", "shared"]
)
@pytest.mark.parametrize("router", ["float32", "model"])
def test_every_prefix_of_a_4096_token_request_gets_the_rows_of_the_whole(
    layer_cls: type, model: dict[str, Any], router: str
) -> None:
    cfg = parse_config({**gpu_world(**model), "routing": {"router_dtype": router}})
    layer = layer_cls(cfg)
    x = torch.randn(4096, 1024, generator=torch.Generator().manual_seed(2)).to("cuda:0")
    full = layer.forward(x, 0)
    differ = [T for T in PREFIXES if not torch.equal(layer.forward(x[:T], 0), full[:T])]
    assert differ == []


GPU_PLACEMENTS: dict[str, list[dict[str, Any]]] = {
    "one worker": [{"experts": list(range(8)), "devices": ["cuda:0"]}],
    "replicated": [
        {"experts": list(range(8)), "devices": ["cuda:0"]},
        {"experts": [0, 1, 2, 3], "devices": ["cuda:0"]},
    ],
    "per expert": [{"experts": [e], "devices": ["cuda:0"]} for e in range(8)],
}


@pytest.mark.parametrize("model", [{}, {"top_k": 3}], ids=["top2", "top3"])
def test_placement_does_not_change_the_bits_on_cuda(model: dict[str, Any]) -> None:
    """bfloat16 pair outputs summed on the master in top-k order: split (4 + 4 experts), one
    worker, replicas and one expert per worker agree bit for bit, for CUDA-graph sizes and a
    4,096-token request."""
    x = torch.randn(4096, 1024, generator=torch.Generator().manual_seed(3)).to("cuda:0")
    sizes = (1, 5, 64, 4096)
    split = InProcessMoE(parse_config(gpu_world(**model)))
    want = {T: split.forward(x[:T], 0) for T in sizes}
    del split
    for name, workers in GPU_PLACEMENTS.items():
        layer = InProcessMoE(parse_config(gpu_world(workers, **model)))
        differ = [T for T in sizes if not torch.equal(layer.forward(x[:T], 0), want[T])]
        assert differ == [], name
