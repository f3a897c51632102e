"""The embedded master: `MoEClient.embedded(cfg)` runs the gates (and shared experts) in the
client's process and calls the workers itself, one hop per layer.

Workers (and, for comparison, a standalone master) are served in this process on port 0
(tests/support/cluster.py); the embedded client dials the workers as the master does.
Same world and input, fp32 CPU: the same bits as through the master, the same status codes
and messages, failover, auth, and nothing left running after close().
"""

from __future__ import annotations

import asyncio
import gc
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

from moe_serve.client import AsyncMoEClient, MoEClient, MoEServeError, RoutingInfo
from moe_serve.config import parse_config
from tests import hf_models
from tests.support.cluster import InProcessCluster, world

H = 64
# Shared experts too: they run in the client's process as they run on the master.
MODEL = {"shared_expert_ffn_size": 32, "moe_layers": [0, 3]}


@pytest.fixture(scope="module")
def cluster() -> Iterator[InProcessCluster]:
    c = InProcessCluster(world(model=MODEL, master={"max_request_tokens": 2048}))
    yield c
    c.stop()


@pytest.fixture(scope="module")
def remote(cluster: InProcessCluster) -> Iterator[MoEClient]:
    with MoEClient(cluster.address) as client:
        yield client


@pytest.fixture(scope="module")
def embedded(cluster: InProcessCluster) -> Iterator[MoEClient]:
    with MoEClient.embedded(cluster.cfg) as client:
        yield client


def _x(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _same_routing(a: RoutingInfo, b: RoutingInfo) -> None:
    for name in ("expert_ids", "weights", "scores"):
        got, want = getattr(a, name), getattr(b, name)
        assert got.dtype == want.dtype and got.device == want.device, name
        assert torch.equal(got, want), name
    assert (a.dropped_pairs, a.load_balance_loss, a.importance_loss) == (
        b.dropped_pairs,
        b.load_balance_loss,
        b.importance_loss,
    )


# --- parity with the standalone master ----------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "layer"),
    [((1, H), 0), ((2, 3, H), 3), ((1500, H), 0)],  # 1500 x 64 x 4 B: shared memory to workers
    ids=["T1", "batched-dims", "T1500-shm"],
)
def test_output_and_routing_are_the_masters_bits(
    remote: MoEClient, embedded: MoEClient, shape: tuple[int, ...], layer: int
) -> None:
    x = _x(*shape)
    want, want_r = remote.infer(x, layer=layer, return_routing=True)
    got, got_r = embedded.infer(x, layer=layer, return_routing=True)
    assert got.shape == x.shape and got.dtype == x.dtype
    assert torch.equal(got, want)
    assert got_r.expert_ids.shape == (got.numel() // H, 2)
    assert got_r.expert_ids.dtype == torch.int64 and got_r.weights.dtype == torch.float32
    assert got_r.scores.shape == (got.numel() // H, 8) and got_r.scores.dtype == torch.float32
    _same_routing(got_r, want_r)
    assert torch.equal(embedded.infer(x, layer=layer), want)


def test_dtype_of_the_input_is_kept(remote: MoEClient, embedded: MoEClient) -> None:
    x = _x(4, H, seed=1).to(torch.float64)
    got = embedded.infer(x)
    assert got.dtype == torch.float64
    assert torch.equal(got, remote.infer(x))


def test_info_is_the_masters(remote: MoEClient, embedded: MoEClient) -> None:
    info = embedded.info()
    assert info == remote.info()
    assert info.layers == (0, 3) and info.hidden_size == H
    assert [(w.id, w.healthy, w.placement[0]) for w in info.workers] == [
        ("w0", True, (0, 1, 2, 3)),
        ("w1", True, (4, 5, 6, 7)),
    ]


def test_calls_from_threads_are_each_answered_with_their_own_rows(embedded: MoEClient) -> None:
    xs = [_x(1 + i, H, seed=10 + i) for i in range(8)]
    alone = [embedded.infer(x, return_routing=True) for x in xs]
    out: list[tuple[torch.Tensor, RoutingInfo] | None] = [None] * len(xs)

    def call(i: int) -> None:
        out[i] = embedded.infer(xs[i], return_routing=True)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(xs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    for got, (y, r) in zip(out, alone, strict=True):
        assert got is not None
        assert torch.equal(got[1].expert_ids, r.expert_ids)
        # Within float32 rounding, not bit for bit: CPU GEMMs of merged batches round
        # differently, through a master too (tests/test_master_batching.py: FP32_TOL).
        assert (got[0] - y).abs().max().item() <= 1e-5


def test_async_client_gives_the_same_bits(cluster: InProcessCluster, remote: MoEClient) -> None:
    xs = [_x(3, H, seed=20 + i) for i in range(4)]
    want = [remote.infer(x, return_routing=True) for x in xs]

    async def main() -> tuple[list[Any], list[Any]]:
        async with await AsyncMoEClient.embedded(cluster.cfg) as client:
            assert (await client.info()).layers == (0, 3)
            one_by_one = [await client.infer(x, return_routing=True) for x in xs]
            together = await asyncio.gather(*(client.infer(x, return_routing=True) for x in xs))
            return one_by_one, list(together)

    one_by_one, together = asyncio.run(main())
    for (got, got_r), (y, r) in zip(one_by_one, want, strict=True):
        assert torch.equal(got, y)
        _same_routing(got_r, r)
    for (got, got_r), (y, r) in zip(together, want, strict=True):
        # Merged into shared passes: float32 rounding of CPU GEMMs over other batch sizes.
        assert torch.equal(got_r.expert_ids, r.expert_ids)
        assert (got - y).abs().max().item() <= 1e-5


# --- the master's status codes and messages ---------------------------------------------------


@pytest.mark.parametrize(
    ("x", "layer", "code", "field"),
    [
        (_x(3, 7), 0, grpc.StatusCode.INVALID_ARGUMENT, "hidden.shape[1]: 7 != hidden_size=64"),
        (_x(3, H), 1, grpc.StatusCode.INVALID_ARGUMENT, "layer: 1 is not a MoE layer"),
        (
            torch.tensor([[0.0] * (H - 1) + [float("nan")]]),
            0,
            grpc.StatusCode.INVALID_ARGUMENT,
            "hidden: contains NaN or Inf",
        ),
        (torch.ones(2, H, dtype=torch.int64), 0, grpc.StatusCode.INVALID_ARGUMENT, "hidden.dtype"),
        (
            _x(2049, H),
            0,
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "hidden.shape[0]: 2049 tokens exceed master.max_request_tokens=2048",
        ),
    ],
    ids=["hidden-size", "layer", "nan", "dtype", "too-many-tokens"],
)
def test_a_bad_request_gets_the_masters_code_and_message(
    remote: MoEClient,
    embedded: MoEClient,
    x: torch.Tensor,
    layer: int,
    code: grpc.StatusCode,
    field: str,
) -> None:
    with pytest.raises(MoEServeError) as through_master:
        remote.infer(x, layer=layer)
    with pytest.raises(MoEServeError) as here:
        embedded.infer(x, layer=layer)
    assert here.value.code == code
    assert here.value.message.startswith(field)
    assert (here.value.code, here.value.message) == (
        through_master.value.code,
        through_master.value.message,
    )


def test_a_passed_deadline_is_deadline_exceeded(embedded: MoEClient) -> None:
    with pytest.raises(MoEServeError) as err:
        embedded.infer(_x(1, H), timeout=1e-6)  # the hand-over to the loop alone takes more
    assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert embedded.infer(_x(1, H)).shape == (1, H)  # and the client goes on


# --- failover ------------------------------------------------------------------------------


def _stop(cluster: InProcessCluster, worker: str) -> None:
    cluster.call(cluster.workers[worker].stop(0))


def test_a_stopped_replica_fails_over() -> None:
    cluster = InProcessCluster(
        world(workers=[{"experts": list(range(8))}, {"experts": list(range(8))}])
    )
    try:
        with MoEClient.embedded(cluster.cfg) as client:
            x = _x(64, H, seed=3)
            want = client.infer(x)
            _stop(cluster, "w1")
            for _ in range(5):  # the first ones find w1 gone, later ones know it
                # w0 now computes every pair in one batch: float32 rounding of other GEMM
                # sizes on CPU (a master's failover gives the same).
                assert (client.infer(x) - want).abs().max().item() <= 1e-5
            assert [w.healthy for w in client.info().workers] == [True, False]
    finally:
        cluster.stop()


def test_every_holder_stopped_is_unavailable_naming_expert_and_worker() -> None:
    cluster = InProcessCluster(world())
    try:
        with MoEClient.embedded(cluster.cfg) as client:
            _stop(cluster, "w1")
            with pytest.raises(MoEServeError) as err:
                client.infer(_x(64, H, seed=4))  # 64 tokens, top-2 of 8: experts 4-7 needed
        assert err.value.code == grpc.StatusCode.UNAVAILABLE
        assert err.value.reason == "WORKER_UNAVAILABLE"
        assert "no live replica for layer 0 experts [" in err.value.message
        assert "'w1'" in err.value.message and "'w0'" not in err.value.message
        # A client started while they are down waits at most start_timeout, then names them.
        start = time.monotonic()
        with pytest.raises(MoEServeError) as err:
            MoEClient.embedded(cluster.cfg, start_timeout=1.5)
        assert time.monotonic() - start < 10
        assert err.value.code == grpc.StatusCode.UNAVAILABLE
        assert "layer 0 experts [4, 5, 6, 7]" in err.value.message
        assert "worker(s) ['w1'] unavailable" in err.value.message
    finally:
        cluster.stop()


# --- auth ------------------------------------------------------------------------------------


def test_the_worker_token_from_the_config_opens_the_workers(tmp_path: Path) -> None:
    (tmp_path / "client.token").write_text("client-secret\n")
    (tmp_path / "worker.token").write_text("worker-secret\n")
    (tmp_path / "wrong.token").write_text("not-the-worker-secret\n")
    security = {
        "token_file": str(tmp_path / "client.token"),
        "worker_token_file": str(tmp_path / "worker.token"),
    }
    cluster = InProcessCluster(world(security=security))
    try:
        x = _x(16, H, seed=5)
        with MoEClient(cluster.address, token="client-secret") as remote:
            want = remote.infer(x)
        with MoEClient.embedded(cluster.cfg) as client:
            assert torch.equal(client.infer(x), want)
        wrong = dict(cluster.world.config)
        wrong["security"] = {**security, "worker_token_file": str(tmp_path / "wrong.token")}
        # Health checks need no token, so it starts; the workers refuse its Forward calls.
        with MoEClient.embedded(parse_config(wrong)) as client, pytest.raises(MoEServeError) as err:
            client.infer(x)
        assert "UNAUTHENTICATED" in err.value.message
    finally:
        cluster.stop()


def test_mutual_tls_and_the_worker_token_as_the_master_uses_them(tmp_path: Path) -> None:
    from tests.test_tls import make_certs, tls_section

    certs = make_certs(tmp_path / "certs")
    (tmp_path / "worker.token").write_text("worker-secret\n")
    security = {
        "worker_token_file": str(tmp_path / "worker.token"),
        "tls": tls_section(certs, client_auth=True),  # workers want a client certificate
    }
    cluster = InProcessCluster(world(security=security))
    try:
        x = _x(16, H, seed=6)
        with MoEClient.embedded(cluster.cfg) as client:
            y = client.infer(x)
        # The same bits as the master, which dials the workers with the same credentials.
        with MoEClient(cluster.address, tls=cluster.tls) as remote:
            assert torch.equal(y, remote.infer(x))
        # Without TLS the workers' handshake fails: none is ever up, and the start says so.
        plain = dict(cluster.world.config)
        plain["security"] = {"worker_token_file": str(tmp_path / "worker.token")}
        with pytest.raises(MoEServeError) as err:
            MoEClient.embedded(parse_config(plain), start_timeout=1.5)
        assert err.value.code == grpc.StatusCode.UNAVAILABLE
        assert "worker(s) ['w0', 'w1'] unavailable" in err.value.message
    finally:
        cluster.stop()


# --- lifetime --------------------------------------------------------------------------------


def _threads() -> set[threading.Thread]:
    return set(threading.enumerate())


def test_close_leaves_no_thread_running(cluster: InProcessCluster) -> None:
    before = _threads()
    client = MoEClient.embedded(cluster.cfg)
    assert len(_threads() - before) == 1  # the loop's thread
    client.infer(_x(2, H))
    client.close()
    client.close()  # idempotent
    assert _threads() - before == set()
    with pytest.raises(MoEServeError) as err:
        client.infer(_x(2, H))
    assert err.value.code == grpc.StatusCode.UNAVAILABLE


def test_a_collected_client_stops_its_thread(cluster: InProcessCluster) -> None:
    before = _threads()
    client = MoEClient.embedded(cluster.cfg)
    client.infer(_x(2, H))
    del client
    gc.collect()
    assert _threads() - before == set()


# --- transformers -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "family", ["mixtral", "qwen2_moe"]
)  # qwen2_moe: shared experts, a dense layer
def test_offload_moe_with_an_embedded_client_matches_the_local_model(
    tmp_path: Path, family: str
) -> None:
    from tests.test_integrations_hf import EXPECTED_LAYERS, build, check_offload

    reference = build(family, seed=3)
    path = hf_models.save_model(reference, tmp_path / family)
    config: dict[str, Any] = world()
    config["model"] = {"checkpoint": str(path)}
    cluster = InProcessCluster(config)
    try:
        with MoEClient.embedded(cluster.cfg) as client:
            check_offload(reference, client, EXPECTED_LAYERS[family], free_local_experts=True)
    finally:
        cluster.stop()
