"""Serve tiny random models of every family through moe_serve and compare with transformers.

    python benchmarks/family_parity.py [--dtype float32|bfloat16] [--devices cpu|cuda]
                                       [--families mixtral deepseek_v3 ...] [--json PATH]

For each family: build a tiny model with transformers' classes (tests/hf_models.py),
save it, serve it with master + 2 workers (`LocalCluster`, the machinery of `moe-serve
up`), send every MoE layer random hidden states through the SDK, and compare with the
transformers block run in-process in the same dtype (on cuda:0 with --devices cuda).
Prints one row per (family, layer) and writes them as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from moe_serve.client import MoEClient  # noqa: E402
from moe_serve.config import load_config  # noqa: E402
from moe_serve.tools.demo import free_ports  # noqa: E402
from moe_serve.tools.launcher import LocalCluster  # noqa: E402
from tests import hf_models  # noqa: E402


def world(path: Path, dtype: str, devices: str) -> dict:
    ports = free_ports(4)
    dev = (
        ["cuda:0", f"cuda:{1 % max(torch.cuda.device_count(), 1)}"]
        if devices == "cuda"
        else ["cpu", "cpu"]
    )
    return {
        "model": {"checkpoint": str(path), "dtype": dtype},
        "master": {"listen": f"127.0.0.1:{ports[0]}", "metrics_port": ports[1], "device": dev[0]},
        "workers": [
            {
                "id": "w0",
                "address": f"127.0.0.1:{ports[2]}",
                "devices": [dev[0]],
                "experts": [0, 1, 2, 3],
            },
            {
                "id": "w1",
                "address": f"127.0.0.1:{ports[3]}",
                "devices": [dev[1]],
                "experts": [4, 5, 6, 7],
            },
        ],
    }


def measure(family: str, dtype: str, devices: str, tokens: int, tmp: Path) -> list[dict]:
    torch_dtype = getattr(torch, dtype)
    device = "cuda:0" if devices == "cuda" else "cpu"
    model = hf_models.build_model(family, seed=1)
    path = hf_models.save_model(model, tmp / family)
    model = model.to(device=device, dtype=torch_dtype)
    (tmp / f"{family}.yaml").write_text(yaml.safe_dump(world(path, dtype, devices)))
    cfg = load_config(tmp / f"{family}.yaml")
    rows = []
    with open(tmp / f"{family}.log", "w") as log:
        cluster = LocalCluster(tmp / f"{family}.yaml", cfg, log=log, verbose=False)
        try:
            cluster.start()
            g = torch.Generator().manual_seed(0)
            with MoEClient(cluster.master_address) as client:
                for layer in cfg.model.moe_layers:
                    x = torch.randn(tokens, cfg.model.hidden_size, generator=g)
                    x = x.to(device=device, dtype=torch_dtype)
                    y, routing = client.infer(x, layer=layer, return_routing=True)
                    expected = hf_models.block_output(model, layer, x)
                    ids = hf_models.router_topk(model, layer, x).cpu()
                    diff = y.float() - expected.float()
                    same = (routing.expert_ids.sort(-1).values == ids.sort(-1).values).all(-1)
                    rows.append(
                        {
                            "family": family,
                            "layer": layer,
                            "dtype": dtype,
                            "devices": devices,
                            "tokens": tokens,
                            "max_abs_error": diff.abs().max().item(),
                            "rel_frobenius_error": (diff.norm() / expected.float().norm()).item(),
                            "max_abs_output": expected.float().abs().max().item(),
                            "same_topk_fraction": same.float().mean().item(),
                        }
                    )
        finally:
            cluster.stop()
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--families", nargs="+", default=list(hf_models.FAMILIES))
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--devices", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    rows = []
    print(
        f"{'family':12} {'layer':>5} {'max abs err':>12} {'rel frob':>10} {'max |y|':>8} "
        f"{'same top-k':>10}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        for family in args.families:
            t0 = time.perf_counter()
            for r in measure(family, args.dtype, args.devices, args.tokens, Path(tmp)):
                rows.append(r)
                print(
                    f"{r['family']:12} {r['layer']:>5} {r['max_abs_error']:>12.3e} "
                    f"{r['rel_frobenius_error']:>10.3e} {r['max_abs_output']:>8.3f} "
                    f"{r['same_topk_fraction']:>10.4f}",
                    flush=True,
                )
            print(f"  ({family}: {time.perf_counter() - t0:.1f} s)", flush=True)
    device = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
    }
    if args.json:
        args.json.write_text(json.dumps({"device": device, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
