"""Tensor <-> protobuf encoding: bit-exact round trips, and decoding that names the bad field."""

from __future__ import annotations

import math

import grpc
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_serve.errors import InvalidRequestError, WireError
from moe_serve.transport.wire import (
    ALIGN,
    MAX_FIELDS,
    MAX_RANK,
    MAX_TENSOR_FIELDS,
    REQUEST_SLACK_BYTES,
    RawTensor,
    parse,
    serialize,
    tensor_from_pb,
    tensor_to_pb,
)
from moe_serve.v1 import moe_pb2 as pb

WIRE_DTYPES: list[torch.dtype] = [
    torch.float32,
    torch.bfloat16,
    torch.float16,
    torch.int32,
    torch.int64,
    torch.float8_e4m3fn,
]
ENUM: dict[torch.dtype, int] = {
    torch.float32: pb.DTYPE_FLOAT32,
    torch.bfloat16: pb.DTYPE_BFLOAT16,
    torch.float16: pb.DTYPE_FLOAT16,
    torch.int32: pb.DTYPE_INT32,
    torch.int64: pb.DTYPE_INT64,
    torch.float8_e4m3fn: pb.DTYPE_FLOAT8_E4M3,
}
ITEMSIZE: dict[torch.dtype, int] = {d: torch.empty((), dtype=d).element_size() for d in ENUM}

shapes = st.lists(st.integers(0, 5), min_size=0, max_size=4).map(tuple)
dtypes = st.sampled_from(WIRE_DTYPES)
SETTINGS = settings(max_examples=200, deadline=None)


def raw(t: torch.Tensor) -> bytes:
    """The tensor's bytes in row-major order."""
    return bytes(t.contiguous().reshape(-1).view(torch.uint8).tolist())  # no numpy needed


def tensor_from_bytes(data: bytes, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """A tensor whose memory is exactly `data` (any bit pattern: NaN payloads, -0.0, ...)."""
    return torch.tensor(list(data), dtype=torch.uint8).view(dtype).reshape(shape)


@st.composite
def tensors(draw: st.DrawFn) -> torch.Tensor:
    """Any wire dtype, rank 0..4 with 0-size dims allowed, arbitrary bit patterns."""
    dtype, shape = draw(dtypes), draw(shapes)
    nbytes = math.prod(shape) * ITEMSIZE[dtype]
    return tensor_from_bytes(draw(st.binary(min_size=nbytes, max_size=nbytes)), dtype, shape)


def message(dtype: int, shape: list[int], data: bytes) -> pb.Tensor:
    """A raw Tensor message, possibly malformed."""
    return pb.Tensor(dtype=dtype, shape=shape, data=data)


def wire_error(msg: pb.Tensor, **kwargs: object) -> WireError:
    """The WireError tensor_from_pb raises for `msg`, decoded as field 'hidden'."""
    with pytest.raises(WireError) as info:
        tensor_from_pb(msg, "hidden", **kwargs)  # type: ignore[arg-type]
    return info.value


# --- round trips -------------------------------------------------------------------------------


@SETTINGS
@given(tensors())
def test_round_trip_is_bit_exact(t: torch.Tensor) -> None:
    out = tensor_from_pb(tensor_to_pb(t), "x")
    assert out.dtype == t.dtype
    assert out.shape == t.shape
    assert raw(out) == raw(t)


@SETTINGS
@given(tensors())
def test_encoding_writes_dtype_shape_and_raw_bytes(t: torch.Tensor) -> None:
    msg = tensor_to_pb(t)
    assert msg.dtype == ENUM[t.dtype]
    assert list(msg.shape) == list(t.shape)
    assert msg.data == raw(t)


@pytest.mark.parametrize("dtype", WIRE_DTYPES, ids=str)
def test_round_trip_preserves_special_values(dtype: torch.dtype) -> None:
    if dtype.is_floating_point:
        f = torch.finfo(dtype)
        values = [0.0, -0.0, 1.0, -1.0, f.max, f.min, f.tiny, float("nan")]
        if dtype != torch.float8_e4m3fn:  # e4m3fn has no infinities
            values += [float("inf"), float("-inf")]
        t = torch.tensor(values, dtype=torch.float64).to(dtype)
    else:
        i = torch.iinfo(dtype)
        t = torch.tensor([0, 1, -1, i.max, i.min], dtype=dtype)
    assert raw(tensor_from_pb(tensor_to_pb(t), "x")) == raw(t)


def test_rank_0_tensor_round_trips() -> None:
    t = torch.tensor(3.5)
    msg = tensor_to_pb(t)
    assert list(msg.shape) == []
    out = tensor_from_pb(msg, "x")
    assert out.shape == () and out.item() == 3.5


def test_zero_size_tensor_round_trips_with_empty_data() -> None:
    t = torch.empty((3, 0, 2), dtype=torch.bfloat16)
    msg = tensor_to_pb(t)
    assert msg.data == b""
    out = tensor_from_pb(msg, "x")
    assert out.shape == (3, 0, 2) and out.dtype == torch.bfloat16


def non_contiguous_views() -> list[torch.Tensor]:
    base = torch.arange(4 * 6 * 5, dtype=torch.float32).reshape(4, 6, 5)
    return [
        base.transpose(0, 2),
        base[:, ::2, 1:],
        base[..., 3],
        base.permute(1, 2, 0)[1:],
        torch.arange(5, dtype=torch.int64).expand(3, 5),  # stride 0
        base.to(torch.bfloat16).mT,
        base[1:3, 2:4],  # contiguous rows, non-zero storage offset
    ]


@pytest.mark.parametrize("t", non_contiguous_views())
def test_non_contiguous_input_encodes_in_logical_order(t: torch.Tensor) -> None:
    msg = tensor_to_pb(t)
    assert msg.data == raw(t.contiguous())
    out = tensor_from_pb(msg, "x")
    assert out.is_contiguous()
    assert torch.equal(out, t)


@SETTINGS
@given(tensors(), st.data())
def test_non_contiguous_random_views_round_trip(t: torch.Tensor, data: st.DataObject) -> None:
    t = t.reshape(-1, 1) if t.dim() == 1 else t
    t = t.permute(tuple(data.draw(st.permutations(range(t.dim())))))
    out = tensor_from_pb(tensor_to_pb(t), "x")
    assert out.shape == t.shape
    assert raw(out) == raw(t)


def test_encoding_detaches_tensors_that_require_grad() -> None:
    t = torch.ones(2, 3, requires_grad=True)
    assert torch.equal(tensor_from_pb(tensor_to_pb(t), "x"), t.detach())


@pytest.mark.parametrize("dtype", [torch.float64, torch.bool, torch.uint8, torch.int8])
def test_encoding_a_dtype_that_cannot_travel_raises(dtype: torch.dtype) -> None:
    with pytest.raises(WireError) as info:
        tensor_to_pb(torch.zeros(2, dtype=dtype))
    assert info.value.field == "tensor.dtype"
    assert "cannot travel" in str(info.value)
    assert "float32" in str(info.value)


# --- decoding errors ---------------------------------------------------------------------------


def test_wire_error_is_an_invalid_argument_request_error() -> None:
    err = wire_error(message(pb.DTYPE_FLOAT32, [2], b"\0" * 4))
    assert isinstance(err, InvalidRequestError)
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT


def test_truncated_data_names_the_data_field() -> None:
    err = wire_error(message(pb.DTYPE_FLOAT32, [2, 3], b"\0" * 23))
    assert err.field == "hidden.data"
    assert str(err).startswith("hidden.data: 23 bytes; expected 24")
    assert "[2, 3]" in str(err) and "float32" in str(err)


def test_extra_data_names_the_data_field() -> None:
    err = wire_error(message(pb.DTYPE_INT64, [2], b"\0" * 17))
    assert err.field == "hidden.data"
    assert "17 bytes; expected 16" in str(err)


def test_data_for_a_zero_size_shape_must_be_empty() -> None:
    err = wire_error(message(pb.DTYPE_FLOAT16, [4, 0], b"\0\0"))
    assert err.field == "hidden.data"
    assert "expected 0" in str(err)


@SETTINGS
@given(dtypes, shapes, st.integers(0, 64))
def test_any_data_length_mismatch_is_rejected(
    dtype: torch.dtype, shape: tuple[int, ...], length: int
) -> None:
    expected = math.prod(shape) * ITEMSIZE[dtype]
    if length == expected:
        length += 1
    err = wire_error(message(ENUM[dtype], list(shape), b"\x7f" * length))
    assert err.field == "hidden.data"
    assert f"{length} bytes; expected {expected}" in str(err)


@pytest.mark.parametrize("shape", [[-1], [2, -3], [0, -1], [-2, -2]])
def test_negative_dimension_names_the_shape_field(shape: list[int]) -> None:
    err = wire_error(message(pb.DTYPE_FLOAT32, shape, b""))
    assert err.field == "hidden.shape"
    assert f"{shape} has a negative dimension" in str(err)


@pytest.mark.parametrize(
    "shape", [[2**40, 2**40], [2**62, 2**62], [2**63 - 1, 2**63 - 1, 2**63 - 1]]
)
def test_huge_shape_is_rejected_by_length_without_allocating(shape: list[int]) -> None:
    # A multi-exabyte tensor cannot be allocated: reaching WireError proves nothing was tried.
    err = wire_error(message(pb.DTYPE_FLOAT32, shape, b"\0" * 16))
    assert err.field == "hidden.data"
    assert f"expected {math.prod(shape) * 4}" in str(err)


def test_zero_size_shape_whose_other_dims_overflow_is_rejected() -> None:
    err = wire_error(message(pb.DTYPE_FLOAT32, [2**40, 2**40, 0], b""))
    assert err.field == "hidden.shape"


@pytest.mark.parametrize("enum", [pb.DTYPE_UNSPECIFIED, 7, 99, 2**31 - 1])
def test_unknown_dtype_enum_names_the_dtype_field(enum: int) -> None:
    err = wire_error(message(enum, [1], b"\0" * 4))
    assert err.field == "hidden.dtype"
    assert f"unknown dtype enum {enum}" in str(err)
    assert "DTYPE_FLOAT32" in str(err)


def test_dtype_outside_the_accepted_set_names_the_dtype_field() -> None:
    msg = message(pb.DTYPE_INT64, [2], b"\0" * 16)
    err = wire_error(msg, dtypes=frozenset({torch.float32, torch.bfloat16}))
    assert err.field == "hidden.dtype"
    assert "int64 is not accepted; expected one of ['bfloat16', 'float32']" in str(err)


def test_dtype_in_the_accepted_set_decodes() -> None:
    msg = tensor_to_pb(torch.arange(3, dtype=torch.int32))
    out = tensor_from_pb(msg, "x", dtypes=frozenset({torch.int32}), rank=1)
    assert out.tolist() == [0, 1, 2]


@pytest.mark.parametrize(("shape", "rank"), [([6], 2), ([2, 3], 1), ([], 1), ([1, 2, 3], 2)])
def test_wrong_rank_names_the_shape_field(shape: list[int], rank: int) -> None:
    err = wire_error(message(pb.DTYPE_FLOAT32, shape, b"\0" * 4 * math.prod(shape)), rank=rank)
    assert err.field == "hidden.shape"
    assert f"rank {len(shape)} {shape}; expected rank {rank}" in str(err)


def test_rank_above_the_maximum_names_the_shape_field() -> None:
    shape = [1] * (MAX_RANK + 1)
    err = wire_error(message(pb.DTYPE_FLOAT32, shape, b"\0" * 4))
    assert err.field == "hidden.shape"
    assert f"rank {MAX_RANK + 1} exceeds the maximum {MAX_RANK}" in str(err)


def test_rank_at_the_maximum_decodes() -> None:
    t = torch.arange(2**MAX_RANK, dtype=torch.int32).reshape([2] * MAX_RANK)
    assert torch.equal(tensor_from_pb(tensor_to_pb(t), "x"), t)


# ------------------------------------------------ whole messages: serialize / parse ---


def forward_request(hidden: torch.Tensor, pairs: int) -> tuple[pb.ForwardRequest, dict]:
    tensors = {
        "hidden": hidden,
        "pair_token": torch.arange(pairs, dtype=torch.int32),
        "pair_expert": torch.full((pairs,), 3, dtype=torch.int32),
        "pair_weight": torch.linspace(0, 1, pairs),
    }
    return pb.ForwardRequest(layer=7), tensors


@given(shape=shapes, dtype=dtypes)
@SETTINGS
def test_serialized_message_parses_with_stock_protobuf_bit_exact(
    shape: tuple[int, ...], dtype: torch.dtype
) -> None:
    t = torch.randint(0, 255, (math.prod(shape) * ITEMSIZE[dtype],), dtype=torch.uint8)
    t = t.view(dtype).reshape(shape)
    msg = pb.InferResponse.FromString(serialize(pb.InferResponse(), {"output": t}))
    assert msg.output.dtype == ENUM[dtype]
    assert list(msg.output.shape) == list(shape)
    assert msg.output.data == raw(t)


def test_parse_reads_a_stock_protobuf_message_bit_exact() -> None:
    x = torch.randn(5, 6).to(torch.bfloat16)
    data = pb.InferRequest(layer=3, hidden=tensor_to_pb(x), return_routing=True)
    parsed = parse(pb.InferRequest, data.SerializeToString())
    assert (parsed.layer, parsed.return_routing) == (3, True)
    assert raw(tensor_from_pb(parsed.hidden, "hidden")) == raw(x)


def test_serialize_then_parse_round_trips_every_field() -> None:
    message, tensors = forward_request(torch.randn(9, 4), pairs=11)
    parsed = parse(pb.ForwardRequest, serialize(message, tensors))
    assert parsed.layer == 7
    for name, t in tensors.items():
        assert raw(tensor_from_pb(getattr(parsed, name), name)) == raw(t), name


def test_parsed_tensor_is_a_view_of_the_received_bytes() -> None:
    message, tensors = forward_request(torch.randn(64, 32), pairs=3)
    data = serialize(message, tensors)
    hidden = tensor_from_pb(parse(pb.ForwardRequest, data).hidden, "hidden")
    start = id(data) + bytes.__basicsize__ - 1  # CPython: a bytes object's payload address
    assert start <= hidden.data_ptr() < start + len(data)


@pytest.mark.parametrize("rows", [0, 1, 3, 100])
def test_serialized_tensor_data_starts_at_an_aligned_offset(rows: int) -> None:
    message, tensors = forward_request(torch.randn(rows, 5), pairs=rows % 4)
    data = serialize(message, tensors)
    parsed = parse(pb.ForwardRequest, data)
    start = id(data) + bytes.__basicsize__ - 1  # CPython: a bytes object's payload address
    for name in tensors:
        t = tensor_from_pb(getattr(parsed, name), name)
        if t.numel():
            assert (t.data_ptr() - start) % ALIGN == 0, name


def test_non_contiguous_tensor_serializes_in_logical_order() -> None:
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4).t()
    parsed = parse(pb.InferResponse, serialize(pb.InferResponse(), {"output": t}))
    assert torch.equal(tensor_from_pb(parsed.output, "output"), t)


def test_unaligned_tensor_bytes_decode_to_an_aligned_copy() -> None:
    t = torch.arange(6, dtype=torch.float32)
    data = memoryview(b"\0" * 3 + raw(t))[3:]  # element bytes at an odd address
    out = tensor_from_pb(RawTensor(pb.DTYPE_FLOAT32, (6,), data), "x")
    assert out.data_ptr() % 16 == 0
    assert torch.equal(out, t)


@given(cut=st.integers(1, 400), junk=st.binary(max_size=8))
@SETTINGS
def test_truncated_or_garbled_message_raises_only_wire_error(cut: int, junk: bytes) -> None:
    message, tensors = forward_request(torch.randn(4, 8), pairs=5)
    data = serialize(message, tensors)
    bad = data[: len(data) - cut % len(data)] + junk
    try:
        parsed = parse(pb.ForwardRequest, bad)
        for name in tensors:
            tensor_from_pb(getattr(parsed, name), name)
    except WireError:
        pass  # named, typed: what the server turns into INVALID_ARGUMENT


# ------------------------------------------- parse bounds: cost independent of size ---


def varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field."""
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def one_token() -> bytes:
    """A Tensor holding one float32 token of width 64, as stock protobuf writes it."""
    return pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[1, 64], data=b"\0" * 256).SerializeToString()


def parse_error(data: bytes, cls: type = pb.InferRequest, **kwargs: bool) -> WireError:
    with pytest.raises(WireError) as info:
        parse(cls, data, **kwargs)
    return info.value


def test_repeated_scalar_fields_stop_the_walk_after_max_fields() -> None:
    err = parse_error(b"\x08\x00" * (4 << 20))  # 8 MiB of `layer = 0`: 4 Mi fields
    assert err.field == "request"
    assert f"more than {MAX_FIELDS} fields" in str(err)


def test_max_fields_at_one_level_still_parse() -> None:
    assert parse(pb.InferRequest, b"\x08\x05" * MAX_FIELDS).layer == 5  # last one wins
    assert parse_error(b"\x08\x05" * (MAX_FIELDS + 1)).field == "request"


def test_walk_bound_holds_for_replies_too() -> None:
    err = parse_error(b"\x12\x00" * (MAX_FIELDS + 1), pb.InferResponse, trusted=True)
    assert err.field == "reply"
    assert f"more than {MAX_FIELDS} fields" in str(err)


def test_repeated_fields_inside_a_tensor_stop_after_max_tensor_fields() -> None:
    tensor = b"\x08\x01" * (MAX_TENSOR_FIELDS + 1)
    err = parse_error(field(2, tensor))
    assert err.field == "hidden"
    assert f"more than {MAX_TENSOR_FIELDS} fields" in str(err)


def test_million_dim_packed_shape_is_refused_after_max_rank_dims() -> None:
    tensor = b"\x08\x01" + field(2, b"\x01" * 1_000_000) + field(3, b"")
    err = parse_error(field(2, tensor))
    assert err.field == "hidden.shape"
    assert f"more than {MAX_RANK} dimensions" in str(err)


def test_unpacked_shape_beyond_max_rank_is_refused() -> None:
    tensor = b"\x08\x01" + b"\x10\x01" * (MAX_RANK + 1)  # shape as repeated varints
    assert parse_error(field(2, tensor)).field == "hidden.shape"


def test_unpacked_shape_at_max_rank_parses() -> None:
    tensor = b"\x08\x01" + b"\x10\x01" * MAX_RANK + field(3, b"\0" * 4)
    assert parse(pb.InferRequest, field(2, tensor)).hidden.shape == (1,) * MAX_RANK


def test_protobuf_tensor_of_a_million_dims_is_refused_by_rank_before_listing_it() -> None:
    msg = pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[1] * 1_000_000, data=b"")
    err = wire_error(msg, rank=2)
    assert str(err) == f"hidden.shape: rank 1000000 exceeds the maximum {MAX_RANK}"


def test_unknown_top_level_field_in_a_request_is_refused() -> None:
    err = parse_error(field(2, one_token()) + field(9, b"\0" * 16))
    assert err.field == "request"
    assert "unknown field number 9" in str(err)


def test_unknown_field_inside_a_request_tensor_is_refused() -> None:
    err = parse_error(field(2, one_token() + field(4, b"\0")))
    assert err.field == "hidden"
    assert "unexpected field number 4" in str(err)


def test_unknown_fields_in_a_reply_are_skipped() -> None:
    output = tensor_to_pb(torch.ones(2, 3)).SerializeToString() + field(4, b"newer peer")
    data = field(1, output) + field(9, b"newer peer")
    parsed = parse(pb.InferResponse, data, trusted=True)
    assert torch.equal(tensor_from_pb(parsed.output, "output"), torch.ones(2, 3))


def test_padding_inside_a_tensor_beyond_the_slack_is_refused() -> None:
    token = one_token()
    fits = field(2, token + field(15, b"\0" * (REQUEST_SLACK_BYTES - 64)))
    assert parse(pb.InferRequest, fits).hidden.shape == (1, 64)
    err = parse_error(field(2, token + field(15, b"\0" * REQUEST_SLACK_BYTES)))
    assert err.field == "request"
    assert "declaring 256 bytes of data" in str(err)


def test_a_1_token_request_padded_to_50_mib_is_refused() -> None:
    err = parse_error(field(2, one_token() + field(15, bytes(50 << 20))))
    assert err.field == "request"
    assert f"{len(one_token()) + (50 << 20) + 10} bytes" in str(err)


def test_tensor_data_larger_than_its_shape_beyond_the_slack_is_refused() -> None:
    tensor = pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[1, 64], data=b"\0" * (1 << 20))
    err = parse_error(pb.InferRequest(hidden=tensor).SerializeToString())
    assert err.field == "request"


def test_small_fields_beyond_the_slack_are_refused_whatever_the_tensors_declare() -> None:
    # A huge declared shape must not buy room for non-tensor bytes, which protobuf parses.
    hidden = pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[2**40, 64], data=b"")
    shared = pb.SharedTensor(region="r" * (REQUEST_SLACK_BYTES + 1))
    request = pb.InferRequest(hidden=hidden, hidden_shared=shared)
    err = parse_error(request.SerializeToString())
    assert err.field == "request"
    assert "outside the tensors' data" in str(err)


def test_request_tensor_with_unknown_dtype_is_refused_naming_its_dtype() -> None:
    err = parse_error(pb.InferRequest(hidden=message(99, [1], b"")).SerializeToString())
    assert err.field == "hidden.dtype"
    assert "unknown dtype enum 99" in str(err)


def test_request_tensor_with_negative_dim_is_refused_naming_its_shape() -> None:
    err = parse_error(pb.InferRequest(hidden=message(1, [-1, 4], b"")).SerializeToString())
    assert err.field == "hidden.shape"
    assert "[-1, 4] has a negative dimension" in str(err)


def test_serialized_request_at_any_size_is_within_the_slack() -> None:
    for rows in (0, 1, 7, 1000):
        message_, tensors = forward_request(torch.randn(rows, 48).to(torch.bfloat16), rows)
        parsed = parse(pb.ForwardRequest, serialize(message_, tensors))
        assert tensor_from_pb(parsed.hidden, "hidden").shape == (rows, 48)


def test_reply_with_nested_routing_larger_than_the_slack_parses() -> None:
    t, e = 512, 64  # scores alone: 128 KiB, far beyond REQUEST_SLACK_BYTES
    routing = pb.Routing(
        expert_ids=tensor_to_pb(torch.zeros(t, 2, dtype=torch.int64)),
        weights=tensor_to_pb(torch.ones(t, 2)),
        scores=tensor_to_pb(torch.full((t, e), 0.5)),
    )
    data = serialize(pb.InferResponse(routing=routing), {"output": torch.ones(t, 8)})
    parsed = parse(pb.InferResponse, data, trusted=True)
    assert tensor_from_pb(parsed.routing.scores, "scores").shape == (t, e)
    assert torch.equal(tensor_from_pb(parsed.output, "output"), torch.ones(t, 8))


def test_fp8_rows_and_their_scales_parse_as_views_of_the_message() -> None:
    q = torch.randn(4, 256).to(torch.float8_e4m3fn)
    scale = torch.rand(4, 2) + 0.5
    data = serialize(pb.ForwardRequest(layer=0), {"hidden": q, "hidden_scale": scale})
    parsed = parse(pb.ForwardRequest, data)
    hidden = tensor_from_pb(parsed.hidden, "hidden", rank=2)
    got_scale = tensor_from_pb(parsed.hidden_scale, "hidden_scale", rank=2)
    assert torch.equal(hidden.view(torch.uint8), q.view(torch.uint8))
    assert torch.equal(got_scale, scale)
    assert all(t.data.obj is data for t in (parsed.hidden, parsed.hidden_scale))
