"""FP8 dispatch against the model dtype: bytes per token of real Forward messages and the
accuracy gate (moe_serve.tools.fp8_report), for a few layer shapes, as JSON.

    python benchmarks/fp8_dispatch.py [--tokens 4096] [--device cpu] [--out results.json]

Shapes: a synthetic MLP/GELU layer and GLU/SiLU layers (Mixtral's kind), in bfloat16 and
float32; `--mixtral` adds Mixtral-8x7B's width (hidden 4096, FFN 14336: 2.8 GB of bfloat16
experts per layer).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from moe_serve.config import parse_config  # noqa: E402
from moe_serve.tools.fp8_report import fp8_report  # noqa: E402

SHAPES: dict[str, dict[str, Any]] = {
    "mlp-gelu-256": {"hidden_size": 256, "expert_ffn_size": 512, "expert_kind": "mlp"},
    "glu-silu-1024": {
        "hidden_size": 1024,
        "expert_ffn_size": 2048,
        "expert_kind": "glu",
        "activation": "silu",
    },
}
MIXTRAL = {
    "hidden_size": 4096,
    "expert_ffn_size": 14336,
    "expert_kind": "glu",
    "activation": "silu",
}


def config(model: dict[str, Any], dtype: str, device: str) -> Any:
    """A world of 8 experts, top-2, split over two workers on `device`."""
    return parse_config(
        {
            "model": {**model, "num_experts": 8, "top_k": 2, "moe_layers": [0], "dtype": dtype},
            "master": {"listen": "127.0.0.1:1", "device": device, "metrics_port": None},
            "workers": [
                {
                    "id": f"w{i}",
                    "address": f"127.0.0.1:{2 + i}",
                    "devices": [device],
                    "experts": list(range(4 * i, 4 * i + 4)),
                }
                for i in range(2)
            ],
        }
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--mixtral", action="store_true")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    shapes = {**SHAPES, **({"mixtral-8x7b": MIXTRAL} if args.mixtral else {})}
    rows = []
    for name, model in shapes.items():
        for dtype in ("bfloat16", "float32"):
            r = fp8_report(config(model, dtype, args.device), 0, args.tokens)
            rows.append({"shape": name, **r})
            print(
                f"{name:>14} {dtype:>8}: bytes ratio {r['fp8_bytes_ratio']:.3f}, rel error "
                f"{r['fp8_rel_error']:.4f}, top-k agreement {r['fp8_topk_agreement']:.3f}, "
                f"gate {'passed' if r['fp8_gate_passed'] else 'FAILED'}"
            )
    result = {
        "torch": torch.__version__,
        "machine": platform.machine(),
        "device": args.device,
        "tokens": args.tokens,
        "rows": rows,
        "summary": {
            "fp8_bytes_ratio_bfloat16": max(
                r["fp8_bytes_ratio"] for r in rows if r["dtype"] == "bfloat16"
            ),
            "fp8_rel_error_max": max(r["fp8_rel_error"] for r in rows),
            "fp8_gate_passed": all(r["fp8_gate_passed"] for r in rows),
        },
    }
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(json.dumps(result["summary"]))
    return 0 if result["summary"]["fp8_gate_passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
