"""Tensors to protobuf `Tensor` messages and back: the only place raw bytes are built.

Two levels:
- `tensor_to_pb` / `tensor_from_pb`: one `Tensor` message (small tensors, routing data).
- `serialize` / `parse`: a whole message whose top-level `Tensor` fields carry the bulk
  bytes. `serialize` writes each tensor's bytes once, straight into the serialized message
  (CUDA tensors go through a reused pinned buffer first); `parse` returns views of the
  received bytes, no copy. The protobuf encoding stays standard: any protobuf library
  reads what `serialize` writes, and `parse` reads what any library writes.

Decoded tensors are read-only views of the message and must not be written to.
"""

from __future__ import annotations

import ctypes
import math
import sys
import threading
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import torch
from google.protobuf.message import DecodeError, Message

from moe_serve.errors import WireError
from moe_serve.v1 import moe_pb2 as pb

if sys.byteorder != "little":  # the wire format is little-endian and we copy raw memory
    raise ImportError("moe_serve.wire needs a little-endian host")

_TO_PB: dict[torch.dtype, int] = {
    torch.float32: pb.DTYPE_FLOAT32,
    torch.bfloat16: pb.DTYPE_BFLOAT16,
    torch.float16: pb.DTYPE_FLOAT16,
    torch.int32: pb.DTYPE_INT32,
    torch.int64: pb.DTYPE_INT64,
}
if hasattr(torch, "float8_e4m3fn"):
    _TO_PB[torch.float8_e4m3fn] = pb.DTYPE_FLOAT8_E4M3
_FROM_PB: dict[int, torch.dtype] = {v: k for k, v in _TO_PB.items()}

# protobuf bytes are immutable and decoded views are only ever read (see the docstring).
# One targeted filter at import: warnings.catch_warnings per call costs more than the
# decode of a small tensor, and is not thread-safe.
warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)
_ITEMSIZE = {d: torch.empty((), dtype=d).element_size() for d in _FROM_PB.values()}
FLOAT_DTYPES = frozenset({torch.float32, torch.bfloat16, torch.float16})
MAX_RANK = 8

DTYPE_NAMES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def pb_dtype(dtype: torch.dtype) -> int:
    """The DType enum of a wire dtype; WireError for others."""
    if dtype not in _TO_PB:
        raise WireError(
            "tensor.dtype",
            f"{dtype_name(dtype)} cannot travel; expected one of "
            f"{sorted(dtype_name(d) for d in _TO_PB)}",
        )
    return _TO_PB[dtype]


def torch_dtype(enum: int) -> torch.dtype | None:
    """The torch dtype of a DType enum value, None if unknown."""
    return _FROM_PB.get(enum)


def itemsize(dtype: torch.dtype) -> int:
    """Bytes per element of a wire dtype."""
    return _ITEMSIZE[dtype]


def dtype_name(dtype: torch.dtype) -> str:
    """'float32' for torch.float32 and so on."""
    return str(dtype).removeprefix("torch.")


# Largest tensor staged through the per-thread pinned buffer; larger ones (rare: gRPC caps
# a message at 2 GiB) take a plain device -> host copy instead of holding more pinned memory.
MAX_STAGING_BYTES = 1 << 30
_staging = threading.local()


def _pinned(nbytes: int) -> torch.Tensor:
    """This thread's pinned host buffer, grown to hold nbytes. Each thread copies into and
    out of its own buffer within one call, so concurrent encodes never share bytes."""
    buf = getattr(_staging, "buf", None)
    if buf is None or buf.numel() < nbytes:
        buf = torch.empty(1 << max(nbytes - 1, 1).bit_length(), dtype=torch.uint8, pin_memory=True)
        _staging.buf = buf
    return buf[:nbytes]


def _memoryview(host: torch.Tensor, nbytes: int) -> memoryview:
    if nbytes == 0:
        return memoryview(b"")
    array = (ctypes.c_char * nbytes).from_address(host.data_ptr())
    array.owner = host  # the view keeps the array alive, the array the (maybe fresh) tensor
    return memoryview(array).cast("B")


def host_views(tensors: Sequence[torch.Tensor]) -> list[memoryview]:
    """The bytes of each tensor in host memory. CPU tensors: no copy when contiguous, valid
    while the tensor lives. CUDA tensors: copied into disjoint slices of this thread's
    pinned buffer, valid until the next call on this thread."""
    tensors = [t.detach() for t in tensors]
    sizes = [t.numel() * t.element_size() for t in tensors]
    staged = [t.device.type == "cuda" for t in tensors]
    total = sum(n for n, s in zip(sizes, staged, strict=True) if s)
    buffer = _pinned(total) if 0 < total <= MAX_STAGING_BYTES else None
    views, start = [], 0
    for t, nbytes, stage in zip(tensors, sizes, staged, strict=True):
        if stage and buffer is not None:
            host = buffer[start : start + nbytes]
            start += nbytes
            # Pageable destinations run at a fraction of pinned bandwidth and fault in
            # fresh pages on every call; all copies queue, then one sync below.
            host.copy_(t.contiguous().view(-1).view(torch.uint8), non_blocking=True)
        else:
            host = t.to("cpu").contiguous()
        views.append(_memoryview(host, nbytes))
    if buffer is not None:
        for device in {t.device for t, stage in zip(tensors, staged, strict=True) if stage}:
            torch.cuda.synchronize(device)  # the staged bytes must be in host memory now
    return views


def host_view(t: torch.Tensor) -> memoryview:
    """host_views of one tensor."""
    return host_views([t])[0]


def tensor_to_pb(t: torch.Tensor) -> pb.Tensor:
    """Encode a tensor of a wire dtype; moves it to host memory if needed."""
    dtype = pb_dtype(t.dtype)
    data = host_view(t).tobytes()  # the one copy: into the bytes object protobuf keeps
    return pb.Tensor(dtype=dtype, shape=list(t.shape), data=data)


def tensor_from_pb(
    msg: pb.Tensor,
    field: str,
    *,
    dtypes: frozenset[torch.dtype] | None = None,
    rank: int | None = None,
) -> torch.Tensor:
    """Decode and validate; raise WireError naming `field` and what was expected."""
    dtype = _FROM_PB.get(msg.dtype)
    if dtype is None:
        raise WireError(
            f"{field}.dtype",
            f"unknown dtype enum {msg.dtype}; expected one of "
            f"{sorted(pb.DType.Name(v) for v in _FROM_PB)}",
        )
    if dtypes is not None and dtype not in dtypes:
        raise WireError(
            f"{field}.dtype",
            f"{dtype_name(dtype)} is not accepted; expected one of "
            f"{sorted(dtype_name(d) for d in dtypes)}",
        )
    shape = tuple(msg.shape)
    if rank is not None and len(shape) != rank:
        raise WireError(f"{field}.shape", f"rank {len(shape)} {list(shape)}; expected rank {rank}")
    if len(shape) > MAX_RANK:
        raise WireError(f"{field}.shape", f"rank {len(shape)} exceeds the maximum {MAX_RANK}")
    if any(d < 0 for d in shape):
        raise WireError(f"{field}.shape", f"{list(shape)} has a negative dimension")
    itemsize = _ITEMSIZE[dtype]
    expected = math.prod(shape) * itemsize  # Python ints: huge shapes cannot overflow
    data = msg.data  # read once: each access of a bytes field may build a new object
    if len(data) != expected:
        raise WireError(
            f"{field}.data",
            f"{len(data)} bytes; expected {expected} "
            f"(shape {list(shape)} x {itemsize} bytes per {dtype_name(dtype)})",
        )
    if expected == 0:
        try:
            return torch.empty(shape, dtype=dtype)
        except RuntimeError:  # zero-size, but the other dims overflow torch's size arithmetic
            raise WireError(f"{field}.shape", f"{list(shape)} is too large") from None
    t = torch.frombuffer(data, dtype=dtype)
    if t.data_ptr() % 16:
        # Bytes from an encoder that does not align (serialize does): kernels take other
        # code paths on unaligned memory, and results could differ in the last bit.
        t = t.clone()
    return t.view(shape)


# ------------------------------------------------------------------ whole messages ---
# Protobuf encoding, as much as needed here: a field key is varint(number << 3 | wire type).
_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5
_TENSOR = pb.Tensor.DESCRIPTOR
M = TypeVar("M", bound=Message)


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _read_varint(buf: memoryview, pos: int, field: str) -> tuple[int, int]:
    result, shift = 0, 0
    for i in range(pos, min(pos + 10, len(buf))):
        b = buf[i]
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, i + 1
        shift += 7
    raise WireError(field, "truncated or overlong varint")


def _fields(buf: memoryview, field: str):  # -> Iterator[(number, wire type, value, start, end)]
    """Walk one message level: value is the int for varints, (begin, end) for bytes."""
    pos, end = 0, len(buf)
    while pos < end:
        start = pos
        key, pos = _read_varint(buf, pos, field)
        number, wire_type = key >> 3, key & 7
        if wire_type == _VARINT:
            value, pos = _read_varint(buf, pos, field)
        elif wire_type == _LEN:
            n, pos = _read_varint(buf, pos, field)
            value, pos = (pos, pos + n), pos + n
        elif wire_type in (_I64, _I32):
            value, pos = None, pos + (8 if wire_type == _I64 else 4)
        else:
            raise WireError(field, f"unsupported protobuf wire type {wire_type}")
        if pos > end or number == 0:
            raise WireError(field, "truncated or malformed protobuf bytes")
        yield number, wire_type, value, start, pos


def _signed64(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


@dataclass(frozen=True)
class RawTensor:
    """A `Tensor` field read straight from message bytes: pb.Tensor's attributes, with
    `data` a memoryview of the received message (no copy); decode it with tensor_from_pb."""

    dtype: int
    shape: tuple[int, ...]
    data: memoryview


def _raw_tensor(buf: memoryview, field: str, prior: RawTensor | None) -> RawTensor:
    # A message field given twice merges (protobuf rule): scalars last-wins, repeated appends.
    dtype, shape = (prior.dtype, list(prior.shape)) if prior else (0, [])
    data = prior.data if prior else memoryview(b"")
    for number, wire_type, value, _, _ in _fields(buf, field):
        if number == 1 and wire_type == _VARINT:
            dtype = _signed64(value)
        elif number == 2 and wire_type == _LEN:  # packed repeated int64
            packed, pos = buf[value[0] : value[1]], 0
            while pos < len(packed):
                dim, pos = _read_varint(packed, pos, f"{field}.shape")
                shape.append(_signed64(dim))
        elif number == 2 and wire_type == _VARINT:
            shape.append(_signed64(value))
        elif number == 3 and wire_type == _LEN:
            data = buf[value[0] : value[1]]
    return RawTensor(dtype, tuple(shape), data)


def _bulk_fields(cls: type[Message]) -> dict[int, str]:
    return {
        f.number: f.name
        for f in cls.DESCRIPTOR.fields
        if f.message_type is _TENSOR and not getattr(f, "is_repeated", False)
    }


class Parsed(Generic[M]):
    """A parsed message whose top-level `Tensor` fields are RawTensors viewing the received
    bytes; every other attribute reads through to the protobuf message."""

    __slots__ = ("message", "tensors")

    def __init__(self, message: M, tensors: dict[str, RawTensor]) -> None:
        self.message, self.tensors = message, tensors

    def __getattr__(self, name: str) -> Any:
        tensors = object.__getattribute__(self, "tensors")
        if name in tensors:
            return tensors[name]
        return getattr(object.__getattribute__(self, "message"), name)


def parse(cls: type[M], data: bytes) -> Parsed[M]:
    """Parse `data` as a `cls` message; top-level Tensor fields become zero-copy RawTensors.

    Raises WireError on bytes that are not a valid `cls`."""
    name = cls.DESCRIPTOR.name
    bulk = _bulk_fields(cls)
    buf = memoryview(data).cast("B")
    rest, tensors = [], {}
    for number, wire_type, value, start, end in _fields(buf, name):
        field = bulk.get(number)
        if field is not None and wire_type == _LEN:
            tensors[field] = _raw_tensor(buf[value[0] : value[1]], field, tensors.get(field))
        else:
            rest.append(buf[start:end])
    try:
        # Only the small fields are copied; the tensors' bytes were skipped above.
        message = cls.FromString(b"".join(rest))
    except DecodeError as exc:
        raise WireError(name, f"bytes are not a valid {name} ({exc})") from None
    return Parsed(message, tensors)


# Tensor data starts at a multiple of this offset in a serialized message: with the bytes
# object's own 16-byte alignment, decoded views are aligned as a fresh tensor would be.
ALIGN = 64
_PAD_FIELD = pb.Tensor.DESCRIPTOR.fields_by_name["padding"].number


def _tensor_prefix(number: int, header: bytes, nbytes: int, offset: int) -> bytes:
    """Bytes that open Tensor field `number` up to its data, padded so that the data starts
    at a multiple of ALIGN when this prefix starts at `offset` of the message."""
    pad = 0
    while True:
        padding = _varint(_PAD_FIELD << 3 | _LEN) + _varint(pad) + bytes(pad)
        body = header + padding + _varint(3 << 3 | _LEN) + _varint(nbytes)
        prefix = _varint(number << 3 | _LEN) + _varint(len(body) + nbytes) + body
        miss = (offset + len(prefix)) % ALIGN
        if miss == 0:
            return prefix
        pad += ALIGN - miss  # varint widths may grow with pad: go round until aligned


def serialize(message: Message, tensors: Mapping[str, torch.Tensor]) -> bytes:
    """`message` plus `tensors` in its top-level Tensor fields (which `message` leaves unset),
    serialized with each tensor's bytes copied exactly once, into the returned bytes."""
    head = message.SerializeToString()
    parts: list[bytes | memoryview] = [head]
    offset = len(head)
    fields = message.DESCRIPTOR.fields_by_name
    for (name, t), data in zip(tensors.items(), host_views(list(tensors.values())), strict=True):
        header = pb.Tensor(dtype=pb_dtype(t.dtype), shape=list(t.shape)).SerializeToString()
        prefix = _tensor_prefix(fields[name].number, header, len(data), offset)
        parts += [prefix, data]
        offset += len(prefix) + len(data)
    return b"".join(parts)
