"""Tensors to protobuf `Tensor` messages and back: the only place raw bytes are built.

Two levels:
- `tensor_to_pb` / `tensor_from_pb`: one `Tensor` message (small tensors, routing data).
- `serialize` / `parse`: a whole message whose top-level `Tensor` fields carry the bulk
  bytes. `serialize` writes each tensor's bytes once, straight into the serialized message
  (CUDA tensors go through a reused pinned buffer first); `parse` returns views of the
  received bytes, no copy, at a cost that does not grow with the message (MAX_FIELDS), and
  refuses requests larger than their tensors (REQUEST_SLACK_BYTES). The protobuf encoding
  stays standard: any protobuf library reads what `serialize` writes, and `parse` reads
  what any library writes.

Decoded tensors are read-only views of the message and must not be written to.
"""

from __future__ import annotations

import ctypes
import functools
import math
import sys
import threading
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import torch
from google.protobuf.descriptor import Descriptor
from google.protobuf.message import DecodeError, Message

from moe_serve.errors import WireError
from moe_serve.v1 import moe_pb2 as pb

if sys.byteorder != "little":  # the wire format is little-endian and we copy raw memory
    raise ImportError("moe_serve.transport.wire needs a little-endian host")

_TO_PB: dict[torch.dtype, pb.DType] = {
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
MAX_RANK = 8


def pb_dtype(dtype: torch.dtype) -> pb.DType:
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
        size = 1 << max(nbytes - 1, 1).bit_length()
        # A buffer made under torch.inference_mode would be an inference tensor, which
        # copy_ refuses outside that mode: the next call from normal code would fail.
        with torch.inference_mode(False):
            buf = torch.empty(size, dtype=torch.uint8, pin_memory=True)
        _staging.buf = buf
    return buf[:nbytes]


def _memoryview(host: torch.Tensor, nbytes: int) -> memoryview:
    if nbytes == 0:
        return memoryview(b"")
    array = (ctypes.c_char * nbytes).from_address(host.data_ptr())
    # The view keeps the array alive, the array the (maybe fresh) tensor. ctypes instances take
    # any attribute; typeshed's Array declares none.
    array.owner = host  # type: ignore[attr-defined]
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


def _known_dtype(enum: int, field: str) -> torch.dtype:
    dtype = _FROM_PB.get(enum)
    if dtype is None:
        raise WireError(
            f"{field}.dtype",
            f"unknown dtype enum {enum}; expected one of "
            f"{sorted(pb.DType.Name(v) for v in _FROM_PB)}",
        )
    return dtype


def _check_dims(shape: tuple[int, ...], field: str) -> None:
    if any(d < 0 for d in shape):
        raise WireError(f"{field}.shape", f"{list(shape)} has a negative dimension")


def tensor_from_pb(
    msg: pb.Tensor,
    field: str,
    *,
    dtypes: frozenset[torch.dtype] | None = None,
    rank: int | None = None,
) -> torch.Tensor:
    """Decode and validate; raise WireError naming `field` and what was expected."""
    dtype = _known_dtype(msg.dtype, field)
    if dtypes is not None and dtype not in dtypes:
        raise WireError(
            f"{field}.dtype",
            f"{dtype_name(dtype)} is not accepted; expected one of "
            f"{sorted(dtype_name(d) for d in dtypes)}",
        )
    # The rank first: a protobuf Tensor (parsed by upb) may hold a million dims, and listing
    # them (tuple, error message) would cost what the rank check exists to avoid.
    if len(msg.shape) > MAX_RANK:
        raise WireError(f"{field}.shape", f"rank {len(msg.shape)} exceeds the maximum {MAX_RANK}")
    shape = tuple(msg.shape)
    if rank is not None and len(shape) != rank:
        raise WireError(f"{field}.shape", f"rank {len(shape)} {list(shape)}; expected rank {rank}")
    _check_dims(shape, field)
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

# What one parse may cost, whatever the message's size. grpc.aio runs request deserializers
# on the event loop thread, and the walk below is Python: when it visited every field, 8 MB
# of `08 00` (4 Mi one-byte fields) held a master's loop for 11.5 s and took 1 GB, and a
# packed shape of a million dims took 0.7 s. Now a parse reads at most MAX_FIELDS field keys
# per message level, MAX_TENSOR_FIELDS per Tensor and MAX_RANK dims per shape, then slices
# memoryviews: a few hundred varint reads at most (tens of microseconds).
# Valid messages use far fewer: an InferRequest has 5 fields, a ForwardRequest 7, a Tensor 4
# (dtype, packed shape, data, padding), or 4 + rank from an encoder that does not pack.
MAX_FIELDS = 32
MAX_TENSOR_FIELDS = 16
# Bytes a request may carry beyond its top-level tensors' declared data (shape x itemsize):
# field keys and lengths, dtype and shape (< 100 bytes a tensor), serialize's alignment
# padding (< 2 x ALIGN a tensor), small scalars and SharedTensor references (< 200 bytes).
# Whatever is not top-level tensor data goes to protobuf's parser (upb, C), which therefore
# never sees more than this from a request; a request larger than its tensors plus this is
# refused before any byte is copied (a 1-token request padded to 50 MiB used to return OK).
REQUEST_SLACK_BYTES = 8192


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
    raise WireError(field, f"truncated or overlong varint at byte {pos}")


def _fields(buf: memoryview, field: str, limit: int) -> Iterator[tuple[int, int, Any, int, int]]:
    """Walk one message level, at most `limit` fields: (number, wire type, value, start, end)
    where value is the int for varints, (begin, end) for bytes. The walk stops at the first
    field over the limit, so its cost never depends on how many fields the bytes hold."""
    pos, end, count = 0, len(buf), 0
    while pos < end:
        count += 1
        if count > limit:
            raise WireError(
                field, f"more than {limit} fields in one message; expected at most {limit}"
            )
        start = pos
        key, pos = _read_varint(buf, pos, field)
        number, wire_type = key >> 3, key & 7
        value: int | tuple[int, int] | None
        if wire_type == _VARINT:
            value, pos = _read_varint(buf, pos, field)
        elif wire_type == _LEN:
            n, pos = _read_varint(buf, pos, field)
            value, pos = (pos, pos + n), pos + n
        elif wire_type in (_I64, _I32):
            value, pos = None, pos + (8 if wire_type == _I64 else 4)
        else:
            raise WireError(field, f"unsupported protobuf wire type {wire_type} at byte {start}")
        if pos > end or number == 0:
            raise WireError(field, f"truncated or malformed protobuf bytes at byte {start}")
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


_TENSOR_FIELDS = "dtype (1), shape (2), data (3), padding (15)"
_PAD_FIELD = _TENSOR.fields_by_name["padding"].number


def _raw_tensor(buf: memoryview, field: str, prior: RawTensor | None, strict: bool) -> RawTensor:
    # A message field given twice merges (protobuf rule): scalars last-wins, repeated appends.
    dtype, shape = (prior.dtype, list(prior.shape)) if prior else (0, [])
    data = prior.data if prior else memoryview(b"")
    for number, wire_type, value, _, _ in _fields(buf, field, MAX_TENSOR_FIELDS):
        if number == 1 and wire_type == _VARINT:
            dtype = _signed64(value)
        elif number == 2 and wire_type == _LEN:  # packed repeated int64
            packed, pos = buf[value[0] : value[1]], 0
            while pos < len(packed):
                _check_rank(shape, field)
                dim, pos = _read_varint(packed, pos, f"{field}.shape")
                shape.append(_signed64(dim))
        elif number == 2 and wire_type == _VARINT:
            _check_rank(shape, field)
            shape.append(_signed64(value))
        elif number == 3 and wire_type == _LEN:
            data = buf[value[0] : value[1]]
        elif number == _PAD_FIELD and wire_type == _LEN:
            pass  # serialize's alignment padding; the size bound in parse covers its bytes
        elif strict:
            raise WireError(
                field,
                f"unexpected field number {number} (wire type {wire_type}); "
                f"a Tensor has {_TENSOR_FIELDS}",
            )
        # else: a peer newer than this code; its fields are skipped
    return RawTensor(dtype, tuple(shape), data)


def _check_rank(shape: list[int], field: str) -> None:
    """Called before each dim is added, so a shape list never holds more than MAX_RANK dims."""
    if len(shape) >= MAX_RANK:
        raise WireError(
            f"{field}.shape", f"more than {MAX_RANK} dimensions; the maximum rank is {MAX_RANK}"
        )


@functools.cache
def _layout(message: Descriptor) -> tuple[dict[int, str], frozenset[int]]:
    """The top-level Tensor fields of a message type by number, and all its field numbers.
    Cached by the type's Descriptor (one per message type)."""
    bulk = {
        f.number: f.name
        for f in message.fields
        if f.message_type is _TENSOR and not getattr(f, "is_repeated", False)
    }
    return bulk, frozenset(f.number for f in message.fields)


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


def parse(cls: type[M], data: bytes, *, trusted: bool = False) -> Parsed[M]:
    """Parse `data` as a `cls` message; top-level Tensor fields become zero-copy RawTensors.

    Its cost does not grow with the message (see MAX_FIELDS): at most MAX_FIELDS fields a
    level, MAX_TENSOR_FIELDS a Tensor and MAX_RANK dims a shape are read before a WireError.

    A request (`trusted=False`, what a server receives) must also be no larger than its
    tensors: unknown field numbers, at the top level or in a top-level Tensor, are refused;
    an unknown dtype or a negative dim of a top-level tensor is refused here; and the message
    may exceed its top-level tensors' declared data (shape x itemsize) by at most
    REQUEST_SLACK_BYTES, which bounds what protobuf's own parser gets. Nested messages
    (SharedTensor, CudaRegion, ...) are parsed by protobuf within that budget.

    A reply (`trusted=True`: what this process reads back from a peer it dialled, a worker's
    ForwardResponse or a master's InferResponse) keeps the walk's bounds but skips unknown
    fields (a newer peer may add some), and hands its non-tensor fields to protobuf whatever
    their size: an InferResponse's routing tensors are nested, parsed by upb in C, and the
    channel's message limit caps them.

    Raises WireError naming the field ("request"/"reply" for the message as a whole).
    """
    what = "reply" if trusted else "request"
    name = cls.DESCRIPTOR.full_name
    bulk, known = _layout(cls.DESCRIPTOR)
    buf = memoryview(data).cast("B")
    rest: list[memoryview] = []
    rest_bytes = 0
    tensors: dict[str, RawTensor] = {}
    for number, wire_type, value, start, end in _fields(buf, what, MAX_FIELDS):
        field = bulk.get(number)
        if field is not None and wire_type == _LEN:
            view = buf[value[0] : value[1]]
            tensors[field] = _raw_tensor(view, field, tensors.get(field), strict=not trusted)
        elif number in known:
            rest.append(buf[start:end])
            rest_bytes += end - start
        elif not trusted:
            raise WireError(
                what,
                f"unknown field number {number} (wire type {wire_type}); a {name} has fields "
                f"{sorted(known)}",
            )
    if not trusted:
        declared = 0
        for field, t in tensors.items():
            _check_dims(t.shape, field)
            declared += math.prod(t.shape) * _ITEMSIZE[_known_dtype(t.dtype, field)]
        if len(buf) > declared + REQUEST_SLACK_BYTES or rest_bytes > REQUEST_SLACK_BYTES:
            raise WireError(
                what,
                f"{len(buf)} bytes, of which {rest_bytes} outside the tensors' data, for "
                f"tensors declaring {declared} bytes of data; expected at most "
                f"{REQUEST_SLACK_BYTES} bytes beyond the tensors' data",
            )
    try:
        # Only the small fields are copied; the tensors' bytes were skipped above.
        message = cls.FromString(b"".join(rest))
    except DecodeError as exc:
        raise WireError(what, f"bytes are not a valid {name} ({exc})") from None
    return Parsed(message, tensors)


# Tensor data starts at a multiple of this offset in a serialized message: with the bytes
# object's own 16-byte alignment, decoded views are aligned as a fresh tensor would be.
ALIGN = 64


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
