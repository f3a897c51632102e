"""FP8 dispatch: the activations of a Forward as float8_e4m3fn with float32 block scales.

With `master.wire_dtype: float8_e4m3fn` the master (or the embedded client) sends a
worker its hidden rows as FP8 E4M3 plus one float32 scale per block of BLOCK elements of a
row (`hidden_scale`), and the worker answers its partial sums the same way (`output_scale`):
about half the bytes of bfloat16 on the two hops that carry activations.

Why the scales are powers of two: dividing by one and multiplying back are exact in
float32 on every device, so the only rounding is the cast to FP8 (round to nearest even),
and quantizing the same row gives the same bits on a CPU master and a GPU worker. That is
what lets the shared-memory path (which carries the model dtype) apply `round_trip` on the
master and match the bytes path bit for bit (the Results contract in
/work/shared/ARCHITECTURE.md). A block's scale puts its largest magnitude in (224, 448]
(448 is E4M3's largest finite value), so a finite input never needs clamping.

Scales are per row (blocks never cross rows), so a row's bits do not depend on its batch
mates. A block that holds NaN or Inf gets a NaN scale: it decodes to NaN, and the master's
per-row check fails that row's call alone, as for an unquantized reply.

Legend: N rows, H hidden size, B = ceil(H / BLOCK) blocks per row.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from moe_serve.errors import InvalidRequestError, MoEError

FP8 = torch.float8_e4m3fn
# Elements that share one scale. Measured on bfloat16 rows [512, 4096] with 2 outlier
# channels (docs/models.md, FP8 dispatch): per-row and per-128 scales both err 2.7% (relative
# Frobenius) up to outliers 1000x the rest; at 10000x the other channels err 3.2% per row and
# 2.7% per 128-block. 4 bytes of scale per 128 bytes of FP8 cost 3%.
BLOCK = 128
E4M3_MAX = 448.0
# E4M3FN has no infinities; 0x7F and 0xFF are its NaNs.
_NAN_BITS = 0x7F
# A float32's exponent bias and the smallest normal exponent: scales stay normal floats.
_BIAS, _MIN_EXP, _MAX_EXP = 127, -126, 127


def blocks(hidden: int) -> int:
    """Scales per row of width `hidden`."""
    return -(-hidden // BLOCK)


def _power_of_two(exponent: torch.Tensor) -> torch.Tensor:
    """2**exponent as float32, built from its bits (exact on every device)."""
    e = exponent.clamp(_MIN_EXP, _MAX_EXP).to(torch.int32)
    return ((e + _BIAS) << 23).view(torch.float32)


def _blocked(x: torch.Tensor) -> torch.Tensor:
    """x [N, H] as float32 [N, B, BLOCK], the last block zero-padded when H % BLOCK."""
    N, H = x.shape
    xf = x.float()
    pad = blocks(H) * BLOCK - H
    if pad:
        xf = F.pad(xf, (0, pad))
    return xf.view(N, -1, BLOCK)


def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [N, H] float -> (FP8 [N, H], float32 scales [N, B]) on x's device: element
    (n, h) is q[n, h] * scale[n, h // BLOCK]."""
    N, H = x.shape
    xb = _blocked(x)
    amax = xb.abs().amax(dim=2)  # [N, B]
    mantissa, exponent = torch.frexp(amax)  # amax = mantissa * 2**exponent, mantissa in [0.5, 1)
    # The scale that puts amax in (224, 448]: 2**(e-9) when mantissa * 512 <= 448, else 2**(e-8).
    scale = _power_of_two(exponent - torch.where(mantissa <= E4M3_MAX / 512, 9, 8))
    scale = torch.where(torch.isfinite(amax), scale, math.nan)
    q = (xb / scale.unsqueeze(2)).to(FP8).view(N, -1)
    if q.shape[1] != H:
        q = q[:, :H].contiguous()
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(FP8 [N, H], float32 scales [N, B]) -> [N, H] in `dtype`, on q's device. Magnitudes
    beyond `dtype`'s largest finite value saturate to it (a row near float16's 65504 can
    round up past it in FP8); NaN stays NaN."""
    N, H = q.shape
    qb = q.float()
    pad = blocks(H) * BLOCK - H
    if pad:
        qb = F.pad(qb, (0, pad))
    x = qb.view(N, -1, BLOCK) * scale.to(q.device).unsqueeze(2)
    big = torch.finfo(dtype).max
    return x.clamp_(-big, big).view(N, -1)[:, :H].to(dtype)


def round_trip(x: torch.Tensor) -> torch.Tensor:
    """dequantize(quantize(x)) in x's dtype: what the bytes path delivers, for the
    shared-memory path to apply the same numerical step."""
    return dequantize(*quantize(x), x.dtype)


def encode(x: torch.Tensor, field: str) -> dict[str, torch.Tensor]:
    """The Tensor fields of a message carrying x [N, H] in FP8: {field: FP8 data,
    field + "_scale": scales} (ForwardRequest.hidden / ForwardResponse.output)."""
    q, scale = quantize(x)
    return {field: q, f"{field}_scale": scale}


def check_scale(q: torch.Tensor, scale: torch.Tensor, field: str) -> None:
    """InvalidRequestError naming `field` unless scale is float32 [N, B] of q [N, H] with
    every value finite and > 0 (what a request from the network must hold)."""
    _check_shape(q, scale, field)
    # Host sync: one read of a [N, B] check before the rows are computed.
    if scale.numel() and not bool((torch.isfinite(scale) & (scale > 0)).all()):
        raise InvalidRequestError(field, "holds a NaN, Inf, zero or negative scale; expected > 0")


def _check_shape(q: torch.Tensor, scale: torch.Tensor, field: str) -> None:
    want = (q.shape[0], blocks(q.shape[1]))
    if scale.dtype != torch.float32 or tuple(scale.shape) != want:
        raise InvalidRequestError(
            f"{field}.shape",
            f"{str(scale.dtype).removeprefix('torch.')} {list(scale.shape)}; expected float32 "
            f"{list(want)} (one scale per {BLOCK} elements of each row)",
        )


def decode_request(
    q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, device: torch.device, field: str
) -> torch.Tensor:
    """A request's FP8 rows and scales (from the network: checked) -> [N, H] in `dtype` on
    `device`. InvalidRequestError naming `field + "_scale"` for bad scales, and `field` for
    FP8 bytes that are NaN encodings (0x7F, 0xFF)."""
    check_scale(q, scale, f"{field}_scale")
    # The FP8 bytes cross to the device (half the bytes of bfloat16), then widen there.
    x = dequantize(q.to(device), scale.to(device), dtype)
    # Host sync: with finite positive scales and saturation, only a NaN encoding is not
    # finite; checked once for the request, before it can join a batch.
    if not bool(torch.isfinite(x).all()):
        raise InvalidRequestError(
            field, f"FP8 data holds NaN encodings (0x{_NAN_BITS:02X}/0xFF); expected finite values"
        )
    return x


def decode_reply(
    q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, device: torch.device, who: str
) -> torch.Tensor:
    """A worker's FP8 partial sums -> [N, H] in `dtype` on `device`. Only the layout is
    checked (MoEError naming the worker): a NaN scale is how a worker marks a row that
    did not come out finite, which the master's per-row check then fails alone."""
    try:
        _check_shape(q, scale, "output_scale")
    except InvalidRequestError as exc:
        raise MoEError(f"worker {who} replied with a bad {exc}") from None
    return dequantize(q.to(device), scale, dtype)
