"""Matmuls and sums whose result for a row does not depend on the rows beside it.

A GEMM library picks its kernel by shape, and kernels sum in different orders. Measured
(benchmarks/results/2026-12-03-goals/invariance-probe*.json):
- CPU (torch 2.13, MKL/oneDNN, AMD EPYC): a call of 1, 2 or 3 rows takes GEMV-like paths
  whose sums run in other orders; every call of 4 rows or more gives a row the same bits,
  wherever it sits (float32, bfloat16, float16, with and without bias, up to 4,100 rows).
  torch._grouped_mm on CPU is one GEMM per group, so a group of 1-3 rows differs too.
- H200 (torch 2.11, cuBLAS): float32 GEMMs change kernel (split-K, tiles) with M: row 0 of
  a [T, 4096] x [4096, 8] gate differed for every T < 4096 tried, padded to a multiple of
  64 rows or batched in 64-row blocks too. bfloat16 kept row 0 for every T but not every
  row (T=511: rows of the last partial tile differ). Calls of one fixed shape do.
- CUDA index_add_ adds with atomics: a row that receives three or more terms gets them in
  any order, run to run (two are safe: 0 + a + b == 0 + b + a exactly).

So: on CPU every GEMM runs on at least ROW_FLOOR rows (zero rows padded on; at a decode
step's size the weights' read dominates either way); on CUDA every GEMM runs as calls of
exactly ROW_BLOCK rows (the same kernel for every block, one launch a block). `ordered_sum`
adds each row's terms one after the other, in the order given.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# 4 is enough on the CPUs measured; 16 leaves room for libraries whose small-M paths reach
# further, at a cost that does not show (a 16-row GEMM reads the same weights as a 1-row).
ROW_FLOOR = 16
# 256 rows: 16 launches for a 4,096-token gate; at T=1 a [256, 4096] x [4096, 8] GEMM costs
# what a [1, 4096] one does (the launch).
ROW_BLOCK = 256


def linear(
    x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, invariant: bool = True
) -> torch.Tensor:
    """F.linear(x, w, bias) for x [T, K] whose row t depends on x[t] alone, not on T
    (`invariant=False`: plain F.linear, the library's kernel for this shape)."""
    T = x.shape[0]
    if T == 0 or not invariant:
        return F.linear(x, w, bias)
    if x.device.type == "cpu":
        if T >= ROW_FLOOR:
            return F.linear(x, w, bias)
        padded = x.new_zeros(ROW_FLOOR, x.shape[1])
        padded[:T] = x
        return F.linear(padded, w, bias)[:T]
    blocks = -(-T // ROW_BLOCK)
    padded = x.new_zeros(blocks * ROW_BLOCK, x.shape[1])
    padded[:T] = x
    if blocks == 1:  # a decode step: one call, and no concatenation copy after it
        return F.linear(padded, w, bias)[:T]
    return torch.cat([F.linear(b, w, bias) for b in padded.split(ROW_BLOCK)])[:T]


def ordered_sum(
    rows: int, token: torch.Tensor, values: torch.Tensor, invariant: bool = True
) -> torch.Tensor:
    """out [rows, H] float32, out[t] = the sum of values[p] over the pairs p of token t,
    added one after the other in the order the pairs are given: the same bits whoever else
    is in the batch, on every device (index_add_ would use atomics on CUDA).
    `invariant=False`: one index_add_.

    token [P] int64 in [0, rows) (checked by the caller); values [P, H] float32. No host
    sync (lengths come from a scatter, the segment sum is told they are valid), so it runs
    inside a CUDA graph.
    """
    if not invariant:
        out = torch.zeros((rows, values.shape[1]), dtype=torch.float32, device=values.device)
        return out.index_add_(0, token, values)
    order = torch.argsort(token, stable=True)  # stable: a token's pairs keep their order
    lengths = torch.zeros(rows, dtype=torch.int64, device=token.device)
    lengths.scatter_add_(0, token, torch.ones_like(token))
    return torch.segment_reduce(
        values[order], "sum", lengths=lengths, axis=0, unsafe=True, initial=0.0
    )
