"""GPU end to end: the shipped GPU examples served on CUDA devices (run with `pytest -m gpu`)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from moe_serve.client import MoEClient
from moe_serve.layer.reference import ReferenceMoE
from moe_serve.tools.demo import free_ports
from tests.conftest import Cluster

pytestmark = [pytest.mark.gpu, pytest.mark.e2e]

EXAMPLES = Path(__file__).resolve().parent.parent / "deploy" / "examples"


def on_free_ports(name: str) -> dict[str, Any]:
    """An example config with its ports swapped for free loopback ones."""
    config = yaml.safe_load((EXAMPLES / name).read_text())
    ports = iter(free_ports(2 + 2 * len(config["workers"])))
    config["master"]["listen"] = f"127.0.0.1:{next(ports)}"
    config["master"]["metrics_port"] = next(ports)
    for w in config["workers"]:
        w["address"] = f"127.0.0.1:{next(ports)}"
        w["metrics_port"] = next(ports)
        w.pop("listen", None)
    return config


def needs_gpus(n: int) -> None:
    if torch.cuda.device_count() < n:
        pytest.fail(f"this test needs {n} CUDA devices, found {torch.cuda.device_count()}")


def parity(cluster: Cluster, tokens: int, layer: int) -> float:
    ref = ReferenceMoE(cluster.cfg.model, cluster.cfg.routing, device="cuda:0")
    # Seeded, so that a failing case can be replayed.
    g = torch.Generator().manual_seed(1000 * layer + tokens)
    x = torch.randn(tokens, cluster.cfg.model.hidden_size, generator=g).to("cuda:0")
    with MoEClient(cluster.address) as client:
        y = client.infer(x, layer=layer)
    expected, _ = ref.forward(x, layer)
    assert y.device == x.device
    return ((y.float() - expected.float()).abs().max() / expected.float().abs().max()).item()


@pytest.mark.parametrize("tokens", [1, 64, 4096])
def test_seed_000_on_two_gpus_matches_reference(cluster_factory: Any, tokens: int) -> None:
    needs_gpus(2)
    cluster = cluster_factory(on_free_ports("seed-000.yaml"))
    assert parity(cluster, tokens, 0) <= 1e-5  # float32, relative to the output's max


@pytest.mark.parametrize("tokens", [1, 512])
def test_two_gpus_bfloat16_example_matches_reference(cluster_factory: Any, tokens: int) -> None:
    needs_gpus(2)
    cluster = cluster_factory(on_free_ports("two-gpus.yaml"))
    for layer in cluster.cfg.model.moe_layers:
        # bfloat16 has 8 mantissa bits; partial sums are rounded once more on the wire.
        assert parity(cluster, tokens, layer) <= 2e-2


# bfloat16 keeps 8 significant bits: unit roundoff u = 2**-8. Both sides round each GEMM's
# output to bfloat16 (transformers also sums the experts in bfloat16, moe_serve in float32
# with one rounding per worker partial), so elementwise errors of a few u of the output's
# scale are expected. Bounds: relative Frobenius error <= 2u, max abs error <= 8u * max|y|.
BF16_U = 2.0**-8


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_tiny_family_in_bfloat16_on_two_gpus_matches_transformers_on_one(
    cluster_factory: Any, tmp_path: Path, family: str
) -> None:
    from tests import hf_models

    needs_gpus(2)
    model = hf_models.build_model(family, seed=1)
    path = hf_models.save_model(model, tmp_path / family)
    model = model.to("cuda:0", torch.bfloat16)
    config = on_free_ports("seed-000.yaml")
    config["model"] = {"checkpoint": str(path), "dtype": "bfloat16"}
    del config["routing"]  # the checkpoint's routing, not seed-000's
    config["workers"][0]["experts"], config["workers"][1]["experts"] = [0, 1, 2, 3], [4, 5, 6, 7]
    cluster = cluster_factory(config)
    g = torch.Generator(device="cuda:0").manual_seed(0)
    with MoEClient(cluster.address) as client:
        for layer in hf_models.moe_layers(model):
            x = torch.randn(512, model.config.hidden_size, device="cuda:0", generator=g)
            x = x.to(torch.bfloat16)
            y = client.infer(x, layer=layer)
            expected = hf_models.block_output(model, layer, x).float()
            diff = y.float() - expected
            assert (diff.norm() / expected.norm()).item() <= 2 * BF16_U
            assert diff.abs().max().item() <= 8 * BF16_U * expected.abs().max().item()


def test_cuda_master_workers_and_client_share_device_memory(cluster_factory: Any) -> None:
    from tests.test_metrics import scrape, total

    needs_gpus(2)
    cluster = cluster_factory(on_free_ports("seed-000.yaml"))
    assert parity(cluster, 4096, 0) <= 1e-5  # 4096 x 512 float32 on cuda:0: 8 MiB
    samples = scrape(cluster.metrics_url())
    assert total(samples, "moe_serve_master_infer_transport_total", transport="shared") == 1
    assert total(samples, "moe_serve_worker_calls_total", transport="shared") == 2
    assert total(samples, "moe_serve_worker_calls_total", transport="bytes") == 0


def test_wire_pinned_staging_has_no_cross_talk_between_threads() -> None:
    from concurrent.futures import ThreadPoolExecutor

    from moe_serve.transport.wire import parse, serialize, tensor_from_pb
    from moe_serve.v1 import moe_pb2 as pb

    def round_trip(i: int) -> bool:
        ok = True
        for n in range(20):
            t = torch.full((256 + 64 * i, 512), float(i * 100 + n), device="cuda:0")
            data = serialize(pb.ForwardResponse(), {"output": t})
            out = tensor_from_pb(parse(pb.ForwardResponse, data).output, "output")
            ok &= bool(torch.equal(out, t.cpu()))
        return ok

    with ThreadPoolExecutor(8) as pool:
        assert all(pool.map(round_trip, range(8)))


def test_wire_staging_made_under_inference_mode_serves_calls_outside_it() -> None:
    import threading

    from moe_serve.transport.wire import parse, serialize, tensor_from_pb
    from moe_serve.v1 import moe_pb2 as pb

    def round_trip(rows: int) -> bool:
        t = torch.randn(rows, 512, device="cuda:0")
        data = serialize(pb.ForwardResponse(), {"output": t})
        return bool(
            torch.equal(tensor_from_pb(parse(pb.ForwardResponse, data).output, "output"), t.cpu())
        )

    results: list[bool] = []

    def thread() -> None:  # a fresh thread: its staging buffer is made by the first call
        with torch.inference_mode():
            results.append(round_trip(8))
        results.append(round_trip(8))  # raised "Inplace update to inference tensor" before

    worker = threading.Thread(target=thread)
    worker.start()
    worker.join()
    assert results == [True, True]


def test_wire_stages_every_cuda_tensor_of_a_message_in_its_own_bytes() -> None:
    from moe_serve.transport.wire import parse, serialize, tensor_from_pb
    from moe_serve.v1 import moe_pb2 as pb

    tensors = {
        "hidden": torch.randn(33, 512, device="cuda:0").to(torch.bfloat16),
        "pair_token": torch.arange(40, dtype=torch.int32, device="cuda:0") % 33,
        "pair_expert": torch.full((40,), 3, dtype=torch.int32, device="cuda:0"),
        "pair_weight": torch.rand(40, device="cuda:0"),
    }
    parsed = parse(pb.ForwardRequest, serialize(pb.ForwardRequest(layer=1), tensors))
    for name, t in tensors.items():
        assert torch.equal(tensor_from_pb(getattr(parsed, name), name), t.cpu()), name


@pytest.mark.parametrize("kind", ["glu", "mlp"])
def test_grouped_gemm_on_cuda_matches_the_per_expert_loop_in_bfloat16(kind: str) -> None:
    from moe_serve.config import ModelConfig, RoutingConfig
    from moe_serve.layer.experts import ExpertStack, grouped_forward
    from moe_serve.weights import SyntheticWeights

    m = ModelConfig(hidden_size=512, expert_ffn_size=1024, num_experts=8, expert_kind=kind)
    weights = SyntheticWeights(m, RoutingConfig()).experts(0, list(range(8)))
    dev = torch.device("cuda:0")
    fast = ExpertStack(kind, "silu", weights, dev, torch.bfloat16)
    loop = ExpertStack(kind, "silu", weights, dev, torch.bfloat16, grouped_mm=False)
    assert fast.grouped_mm, "torch._grouped_mm should run on this GPU"
    g = torch.Generator(device=dev).manual_seed(0)
    hidden = torch.randn(300, 512, device=dev, generator=g).to(torch.bfloat16)
    token = torch.randint(0, 300, (600,), device=dev, generator=g)
    slot = torch.randint(0, 6, (600,), device=dev, generator=g)  # slots 6 and 7 idle
    weight = torch.rand(600, device=dev, generator=g)
    a = grouped_forward(fast, hidden, token, slot, weight)
    b = grouped_forward(loop, hidden, token, slot, weight)
    # Both round each GEMM's output to bfloat16 (u = 2**-8); accumulation orders differ.
    assert ((a - b).norm() / b.norm()).item() <= 2 * 2.0**-8


def test_small_batch_cuda_graphs_match_the_eager_forward() -> None:
    from moe_serve.config import ModelConfig, RoutingConfig
    from moe_serve.layer.experts import ExpertStack, SmallBatchGraphs, grouped_forward
    from moe_serve.weights import SyntheticWeights

    m = ModelConfig(hidden_size=512, expert_ffn_size=1024, num_experts=4, expert_kind="glu")
    dev = torch.device("cuda:0")
    stack = ExpertStack(
        "glu",
        "silu",
        SyntheticWeights(m, RoutingConfig()).experts(0, [0, 1, 2, 3]),
        dev,
        torch.bfloat16,
    )
    graphs = SmallBatchGraphs(stack)
    g = torch.Generator(device=dev).manual_seed(0)
    # Sizes in the same bucket one after another: stale rows of a larger batch must not leak.
    for n, p in [(5, 9), (3, 4), (8, 16), (1, 2), (64, 256)]:
        assert graphs.fits(n, p)
        hidden = torch.randn(n, 512, device=dev, generator=g).to(torch.bfloat16)
        token = torch.randint(0, n, (p,), device=dev, generator=g)
        slot = torch.randint(0, 4, (p,), device=dev, generator=g)
        weight = torch.rand(p, device=dev, generator=g)
        expected = grouped_forward(stack, hidden, token, slot, weight)
        # float32 sums of bf16 products; index_add_'s atomics may add a token's 3+ pairs in
        # another order, so allow float32 rounding, nothing more.
        torch.testing.assert_close(
            graphs(hidden, token, slot, weight), expected, rtol=1e-6, atol=1e-6
        )
    assert graphs.enabled and graphs.captured == 4  # (8,16) twice; the others one each


@pytest.mark.parametrize("tokens", [1, 4096])
def test_replicas_on_a_cuda_master_share_a_batch_and_match_the_reference(
    cluster_factory: Any, tokens: int
) -> None:
    from tests.test_metrics import scrape, total

    needs_gpus(1)
    config = on_free_ports("seed-000.yaml")
    for w in config["workers"]:
        w["devices"], w["experts"] = ["cuda:0"], [0, 1]  # every expert on both workers
    cluster = cluster_factory(config)
    # SERVING needs one live replica per expert: wait for the second worker too, so both
    # replicas are idle and live when the batch is split.
    with MoEClient(cluster.address) as client:
        deadline = time.monotonic() + 30
        while not all(w.healthy for w in client.info().workers):
            assert time.monotonic() < deadline, "both workers did not come up in 30 s"
            time.sleep(0.1)
    assert parity(cluster, tokens, 0) <= 1e-5  # the split is planned on cuda:0
    pairs = {
        w: total(scrape(cluster.metrics_url()), "moe_serve_worker_pairs_total", worker=w)
        for w in ("w0", "w1")
    }
    # top-1, nothing else in flight: the tokens split evenly (one token: to one worker).
    assert sorted(pairs.values()) == ([0.0, 1.0] if tokens == 1 else [2048.0, 2048.0])


# A CUDA region's owner in its own process (CUDA IPC handles do not open in the process
# that made them): 1024 floats 0..1023 at ALIGN; once the peer has written, the sum of its
# 1024 floats at OUT goes to stderr.
CUDA_OWNER = """
import os, sys, torch
from moe_serve.transport.shm import ALIGN, SharedRegion
OUT = ALIGN + 4096
r = SharedRegion(4 << 20, torch.device("cuda:0"))
r.view(ALIGN, torch.float32, (1024,)).copy_(torch.arange(1024.0, device="cuda:0"))
torch.cuda.synchronize()
sys.stdout.buffer.write(r.description().SerializeToString())
sys.stdout.flush()
os.close(1)
sys.stdin.buffer.read(1)
print(float(r.view(OUT, torch.float32, (1024,)).sum()), file=sys.stderr, flush=True)
"""


def _cuda_owner() -> tuple[Any, Any]:
    import subprocess
    import sys

    from moe_serve.v1 import moe_pb2 as pb

    owner = subprocess.Popen(
        [sys.executable, "-c", CUDA_OWNER],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    offer = pb.AttachRegionRequest.FromString(owner.stdout.read())  # type: ignore[union-attr]
    return owner, offer


def test_cuda_region_round_trip_between_processes() -> None:
    from moe_serve.transport.shm import ALIGN, MappedRegion
    from moe_serve.v1 import moe_pb2 as pb

    needs_gpus(1)
    owner, offer = _cuda_owner()
    try:
        mapped = MappedRegion(offer, near=torch.device("cuda:0"))
        seen = pb.SharedTensor(
            region=offer.id, offset=ALIGN, dtype=pb.DTYPE_FLOAT32, shape=[1, 1024]
        )
        got = mapped.view(seen, "hidden_shared", frozenset({torch.float32}), 2)
        assert got.device == torch.device("cuda:0")
        assert torch.equal(got.flatten(), torch.arange(1024.0, device="cuda:0"))
        out = pb.SharedTensor(
            region=offer.id, offset=ALIGN + 4096, dtype=pb.DTYPE_FLOAT32, shape=[1, 1024]
        )
        mapped.view(out, "output_shared", frozenset({torch.float32}), 2).fill_(2.0)
        torch.cuda.synchronize()
        _, err = owner.communicate(b"x", timeout=60)
    finally:
        if owner.poll() is None:
            owner.kill()
    assert err.decode().strip().splitlines()[-1] == "2048.0"


@pytest.mark.parametrize(
    "change", [{"offset": 4 << 20}, {"size": 64 << 20}, {"offset": 2 << 20, "size": 3 << 20}]
)
def test_cuda_descriptor_past_its_allocation_is_refused(change: dict[str, int]) -> None:
    from moe_serve.transport.shm import MappedRegion, RegionTable, SharedMemoryError

    needs_gpus(1)
    owner, offer = _cuda_owner()
    try:
        bad = type(offer)()
        bad.CopyFrom(offer)
        if "offset" in change:
            bad.cuda.offset = change["offset"]
        if "size" in change:
            bad.size = change["size"]
        table = RegionTable()
        with pytest.raises(SharedMemoryError, match=r"runs past the \d+-byte allocation"):
            table.attach("ipv4:127.0.0.1:1", bad, near=torch.device("cuda:0"))
        assert len(table) == 0
        # This process is alive and the genuine offer still maps.
        assert MappedRegion(offer, near=torch.device("cuda:0")).size == 4 << 20
    finally:
        owner.communicate(b"x", timeout=60)


def test_cuda_master_and_workers_on_one_gpu_share_device_memory(cluster_factory: Any) -> None:
    from tests.test_metrics import scrape, total

    needs_gpus(1)
    config = on_free_ports("seed-000.yaml")
    for w in config["workers"]:
        w["devices"] = ["cuda:0"]
    cluster = cluster_factory(config)
    assert parity(cluster, 4096, 0) <= 1e-5  # 4096 x 512 float32 on cuda:0: 8 MiB
    samples = scrape(cluster.metrics_url())
    assert total(samples, "moe_serve_master_infer_transport_total", transport="shared") == 1
    assert total(samples, "moe_serve_worker_calls_total", transport="shared") == 2
    assert total(samples, "moe_serve_worker_calls_total", transport="bytes") == 0
