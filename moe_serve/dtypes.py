"""The model dtypes a world config may name, shared by the maths and the wire."""

from __future__ import annotations

import torch

# config.py's `model.dtype` literal, mapped to torch (config.py itself stays torch-free so
# that `moe-serve --help` and config errors come back without importing torch).
DTYPE_NAMES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
FLOAT_DTYPES = frozenset(DTYPE_NAMES.values())
