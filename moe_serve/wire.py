"""Tensors to protobuf `Tensor` messages and back: the only place raw bytes are built.

Encoding copies a tensor's bytes once (device -> host where needed, then into the
message). Decoding wraps the message's bytes with `torch.frombuffer`, no copy:
the decoded tensor is a read-only view of the message and must not be written to.
"""

from __future__ import annotations

import ctypes
import math
import sys
import warnings

import torch

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


def dtype_name(dtype: torch.dtype) -> str:
    """'float32' for torch.float32 and so on."""
    return str(dtype).removeprefix("torch.")


def tensor_to_pb(t: torch.Tensor) -> pb.Tensor:
    """Encode a tensor of a wire dtype; moves it to host memory if needed."""
    if t.dtype not in _TO_PB:
        raise WireError(
            "tensor.dtype",
            f"{dtype_name(t.dtype)} cannot travel; expected one of "
            f"{sorted(dtype_name(d) for d in _TO_PB)}",
        )
    host = t.detach().to("cpu").contiguous()
    nbytes = host.numel() * host.element_size()
    # One copy, straight from the tensor's memory into the bytes object.
    data = ctypes.string_at(host.data_ptr(), nbytes) if nbytes else b""
    return pb.Tensor(dtype=_TO_PB[host.dtype], shape=list(host.shape), data=data)


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
    return torch.frombuffer(data, dtype=dtype).view(shape)
