"""Hostile messages at a live master and a live worker: every one gets a clear status, none
crashes a process, and good traffic sent meanwhile is served unchanged.

5,000 generated messages per target (10,000 in all): random bytes, and protobuf messages
with hostile fields (huge or negative dimensions, unknown dtypes, truncated or surplus data,
NaN/Inf, enormous layer ids, bogus shared-memory references).
"""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any

import grpc
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moe_serve.client import MoEClient
from moe_serve.reference import ReferenceMoE
from moe_serve.v1 import moe_pb2 as pb
from tests.conftest import Cluster, alive, world

pytestmark = pytest.mark.e2e

EXAMPLES = 5000
# What a hostile message may get: never INTERNAL or UNKNOWN (a server bug), never a crash.
CLEAR = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.FAILED_PRECONDITION,
}
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
)

dims = st.one_of(
    st.integers(0, 8), st.integers(-(2**63), -1), st.integers(2**31, 2**63 - 1), st.just(64)
)
dtypes = st.one_of(st.integers(0, 7), st.integers(-(2**31), 2**31 - 1))


@st.composite
def tensors(draw: Any, width: int = 64) -> pb.Tensor:
    shape = draw(st.lists(dims, max_size=10))
    dtype = draw(dtypes)
    if draw(st.booleans()) and all(0 <= d <= 64 for d in shape) and len(shape) <= 3:
        n = 1
        for d in shape:
            n *= d
        data = torch.randn(n).numpy().tobytes()[: n * draw(st.sampled_from([1, 2, 4]))]
        if draw(st.booleans()):
            data = data[: draw(st.integers(0, max(len(data), 0)))]  # truncated
    else:
        data = draw(st.binary(max_size=512))
    if draw(st.booleans()):  # NaN / Inf in float32
        data = torch.tensor([float("nan"), float("inf")] * 32).numpy().tobytes()
    return pb.Tensor(dtype=dtype, shape=shape, data=data)


@st.composite
def shared(draw: Any) -> pb.SharedTensor:
    return pb.SharedTensor(
        region=draw(st.text(max_size=20)),
        offset=draw(st.integers(0, 2**64 - 1)),
        dtype=draw(dtypes),
        shape=draw(st.lists(dims, max_size=4)),
    )


layers = st.one_of(st.integers(0, 3), st.integers(0, 2**32 - 1))


@st.composite
def infer_requests(draw: Any) -> bytes:
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(max_size=256))  # not protobuf at all
    msg = pb.InferRequest(layer=draw(layers), return_routing=draw(st.booleans()))
    if draw(st.booleans()):
        msg.hidden.CopyFrom(draw(tensors()))
    if draw(st.integers(0, 4)) == 0:
        msg.hidden_shared.CopyFrom(draw(shared()))
    if draw(st.integers(0, 4)) == 0:
        msg.output_shared.CopyFrom(draw(shared()))
    data = msg.SerializeToString()
    if draw(st.integers(0, 4)) == 0:
        data = data[: draw(st.integers(0, len(data)))]  # cut anywhere
    return data


@st.composite
def forward_requests(draw: Any) -> bytes:
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(max_size=256))
    msg = pb.ForwardRequest(layer=draw(layers))
    for field in ("hidden", "pair_token", "pair_expert", "pair_weight"):
        if draw(st.booleans()):
            getattr(msg, field).CopyFrom(draw(tensors()))
    if draw(st.integers(0, 4)) == 0:
        msg.hidden_shared.CopyFrom(draw(shared()))
    if draw(st.integers(0, 4)) == 0:
        msg.output_shared.CopyFrom(draw(shared()))
    data = msg.SerializeToString()
    if draw(st.integers(0, 4)) == 0:
        data = data[: draw(st.integers(0, len(data)))]
    return data


@pytest.fixture(scope="module")
def cluster(cluster_factory: Any) -> Cluster:
    return cluster_factory(world())


class GoodTraffic:
    """Valid requests in a background thread; records any that failed or came back wrong."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster, self.errors, self.served = cluster, [], 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        ref = ReferenceMoE(self.cluster.cfg.model, self.cluster.cfg.routing)
        x = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
        expected, _ = ref.forward(x, 0)
        with MoEClient(self.cluster.address) as client:
            while not self._stop.is_set():
                try:
                    if (client.infer(x) - expected).abs().max().item() > 1e-5:
                        self.errors.append("wrong output")
                    self.served += 1
                except Exception as exc:  # recorded, asserted on below
                    self.errors.append(repr(exc))

    def __enter__(self) -> GoodTraffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _fuzz(address: str, method: str, messages: Any) -> tuple[list[str], Counter[str]]:
    unclear: list[str] = []
    codes: Counter[str] = Counter()
    with grpc.insecure_channel(address) as channel:
        call = channel.unary_unary(method)  # raw bytes in, raw bytes out

        @FUZZ
        @given(data=messages)
        def send(data: bytes) -> None:
            try:
                call(data, timeout=10)
                codes["OK"] += 1
            except grpc.RpcError as exc:
                codes[exc.code().name] += 1
                if exc.code() not in CLEAR:
                    unclear.append(f"{exc.code().name}: {exc.details()} <- {data[:80]!r}")

        send()
    return unclear, codes


def test_master_answers_every_hostile_message_clearly_and_keeps_serving(
    cluster: Cluster,
) -> None:
    with GoodTraffic(cluster) as good:
        unclear, codes = _fuzz(cluster.address, "/moe_serve.v1.MoEMaster/Infer", infer_requests())
    assert unclear == [], unclear[:5]
    assert sum(codes.values()) == EXAMPLES and codes["INVALID_ARGUMENT"] >= EXAMPLES // 2, codes
    assert good.errors == [] and good.served > 0
    assert all(alive(pid) for pid in cluster.child_pids())


def test_worker_answers_every_hostile_message_clearly_and_keeps_serving(
    cluster: Cluster,
) -> None:
    address = cluster.cfg.worker("w0").address
    with GoodTraffic(cluster) as good:
        unclear, codes = _fuzz(address, "/moe_serve.v1.ExpertWorker/Forward", forward_requests())
    assert unclear == [], unclear[:5]
    assert sum(codes.values()) == EXAMPLES and codes["INVALID_ARGUMENT"] >= EXAMPLES // 2, codes
    assert good.errors == [] and good.served > 0
    assert all(alive(pid) for pid in cluster.child_pids())
