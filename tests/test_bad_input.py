"""Bad requests get INVALID_ARGUMENT (or RESOURCE_EXHAUSTED) naming the field; nothing crashes."""

from __future__ import annotations

import math
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import pytest
import torch

from moe_serve.client import MoEClient, MoEServeError
from moe_serve.layer.reference import ReferenceMoE
from moe_serve.transport.wire import tensor_to_pb
from moe_serve.v1 import moe_pb2 as pb
from moe_serve.v1 import moe_pb2_grpc as pb_grpc
from tests.conftest import Cluster, world

H = 64
MAX_TOKENS = 512
INVALID = grpc.StatusCode.INVALID_ARGUMENT


@pytest.fixture(scope="module")
def cluster(in_process_factory: Any) -> Cluster:
    return in_process_factory(world(master={"max_request_tokens": MAX_TOKENS}))


def _infer_raw(address: str, request: pb.InferRequest | bytes) -> grpc.RpcError:
    with grpc.insecure_channel(address) as channel:
        if isinstance(request, bytes):
            call = channel.unary_unary("/moe_serve.v1.MoEMaster/Infer")  # raw bytes, no parsing
        else:
            call = pb_grpc.MoEMasterStub(channel).Infer
        with pytest.raises(grpc.RpcError) as info:
            call(request, timeout=10)
    return info.value


def _tensor(
    shape: list[int], dtype: int = pb.DTYPE_FLOAT32, data: bytes | None = None
) -> pb.Tensor:
    n = math.prod(shape) * 4
    return pb.Tensor(dtype=dtype, shape=shape, data=b"\0" * n if data is None else data)


BAD_REQUESTS = {
    "wrong hidden size": (pb.InferRequest(hidden=_tensor([2, H + 1])), "hidden.shape[1]"),
    "rank 3": (pb.InferRequest(hidden=_tensor([1, 2, H])), "hidden.shape"),
    "rank 1": (pb.InferRequest(hidden=_tensor([H])), "hidden.shape"),
    "int32 dtype": (pb.InferRequest(hidden=_tensor([2, H], pb.DTYPE_INT32)), "hidden.dtype"),
    "unknown dtype": (pb.InferRequest(hidden=_tensor([2, H], 99)), "hidden.dtype"),
    "unset dtype": (pb.InferRequest(hidden=_tensor([2, H], 0)), "hidden.dtype"),
    "NaN": (pb.InferRequest(hidden=tensor_to_pb(torch.full((2, H), float("nan")))), "hidden"),
    "Inf": (pb.InferRequest(hidden=tensor_to_pb(torch.full((2, H), float("inf")))), "hidden"),
    "unknown layer": (pb.InferRequest(layer=7, hidden=_tensor([2, H])), "layer"),
    "huge layer id": (pb.InferRequest(layer=2**32 - 1, hidden=_tensor([2, H])), "layer"),
    "truncated data": (pb.InferRequest(hidden=_tensor([2, H], data=b"\0" * 100)), "hidden.data"),
    "negative dim": (pb.InferRequest(hidden=_tensor([-2, H], data=b"")), "hidden.shape"),
    "huge shape": (pb.InferRequest(hidden=_tensor([2**40, 2**40], data=b"")), "hidden.data"),
    "missing hidden": (pb.InferRequest(), "hidden"),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_request_is_invalid_argument_naming_the_field(cluster: Cluster, case: str) -> None:
    request, field = BAD_REQUESTS[case]
    err = _infer_raw(cluster.address, request)
    assert err.code() == INVALID
    assert err.details().startswith(field), err.details()


@pytest.mark.parametrize("garbage", [b"\xff\xff\xff\xff", b"\x12\x05\x08\x01", b"\x0a" * 7])
def test_garbage_bytes_are_invalid_argument(cluster: Cluster, garbage: bytes) -> None:
    err = _infer_raw(cluster.address, garbage)
    assert err.code() == INVALID


def test_request_over_token_limit_is_resource_exhausted_naming_the_limit(cluster: Cluster) -> None:
    with MoEClient(cluster.address) as client, pytest.raises(MoEServeError) as info:
        client.infer(torch.zeros(MAX_TOKENS + 1, H))
    assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"max_request_tokens={MAX_TOKENS}" in info.value.message


def test_sdk_rejects_non_float_input_with_invalid_argument(cluster: Cluster) -> None:
    with MoEClient(cluster.address) as client, pytest.raises(MoEServeError) as info:
        client.infer(torch.zeros(2, H, dtype=torch.int64))
    assert info.value.code == INVALID and "hidden.dtype" in info.value.message


def test_worker_rejects_expert_it_does_not_hold(cluster: Cluster) -> None:
    w0 = cluster.cfg.workers[0]
    request = pb.ForwardRequest(
        layer=0,
        hidden=tensor_to_pb(torch.zeros(1, H)),
        pair_token=tensor_to_pb(torch.zeros(1, dtype=torch.int32)),
        pair_expert=tensor_to_pb(torch.tensor([7], dtype=torch.int32)),
        pair_weight=tensor_to_pb(torch.ones(1)),
    )
    with grpc.insecure_channel(w0.address) as channel, pytest.raises(grpc.RpcError) as info:
        pb_grpc.ExpertWorkerStub(channel).Forward(request, timeout=10)
    assert info.value.code() == INVALID
    assert "pair_expert" in info.value.details() and "held: [0, 1, 2, 3]" in info.value.details()


def test_worker_answers_garbage_bytes_with_invalid_argument(cluster: Cluster) -> None:
    with grpc.insecure_channel(cluster.cfg.workers[1].address) as channel:
        call = channel.unary_unary("/moe_serve.v1.ExpertWorker/Forward")
        with pytest.raises(grpc.RpcError) as info:
            call(b"\xff\xff\xff\xff", timeout=10)
    assert info.value.code() == INVALID


def test_bad_requests_do_not_disturb_concurrent_good_ones(cluster: Cluster) -> None:
    ref = ReferenceMoE(cluster.cfg.model, cluster.cfg.routing)
    x = torch.randn(32, H, generator=torch.Generator().manual_seed(1))
    expected, _ = ref.forward(x, 0)
    errors: list[float] = []

    def good() -> None:
        with MoEClient(cluster.address) as client:
            for _ in range(20):
                errors.append((client.infer(x) - expected).abs().max().item())

    threads = [threading.Thread(target=good) for _ in range(2)]
    for t in threads:
        t.start()
    for _ in range(3):
        for request, _field in BAD_REQUESTS.values():
            assert _infer_raw(cluster.address, request).code() == INVALID
    for t in threads:
        t.join(timeout=60)
    assert len(errors) == 40 and max(errors) <= 1e-5
    assert cluster.running()


def test_worker_over_max_queue_tokens_answers_resource_exhausted(
    in_process_factory: Any,
) -> None:
    cluster = in_process_factory(world(batching={"max_delay_us": 50_000, "max_queue_tokens": 4}))
    address = cluster.cfg.worker("w0").address

    def forward(rows: int) -> grpc.StatusCode:
        request = pb.ForwardRequest(
            layer=0,
            hidden=tensor_to_pb(torch.zeros(rows, H)),
            pair_token=tensor_to_pb(torch.zeros(1, dtype=torch.int32)),
            pair_expert=tensor_to_pb(torch.zeros(1, dtype=torch.int32)),
            pair_weight=tensor_to_pb(torch.ones(1)),
        )
        with grpc.insecure_channel(address) as channel:
            try:
                pb_grpc.ExpertWorkerStub(channel).Forward(request, timeout=10)
            except grpc.RpcError as exc:
                return exc.code()
        return grpc.StatusCode.OK

    with ThreadPoolExecutor(4) as pool:  # held together by the 50 ms batching window
        codes = list(pool.map(forward, [3, 3, 3, 3]))
    assert grpc.StatusCode.OK in codes
    assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes
    assert forward(3) == grpc.StatusCode.OK  # recovered once the queue drained
