"""Why a bfloat16 parity check at T=1 can fail: measure the served error against two scales.

Serves deploy/examples/two-gpus.yaml (both workers on cuda:0 when one GPU is visible) and,
for many seeded single-token requests, compares the output with the in-process reference
relative to (a) max |y|, the output's own scale, and (b) max over elements of
sum_k |w_k * expert_k(x)|, the scale of the terms the workers sum and round. Partial sums
travel in bfloat16, one rounding per worker, so where the experts' contributions cancel,
(a) can be large while (b) stays a few units of roundoff.

    python benchmarks/bf16_parity_probe.py --seeds 300 --json out.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
import yaml

from moe_serve.client import MoEClient
from moe_serve.config import load_config
from moe_serve.layer.experts import expert_forward
from moe_serve.layer.reference import ReferenceMoE
from moe_serve.tools.demo import free_ports
from moe_serve.tools.launcher import LocalCluster

ROOT = Path(__file__).resolve().parent.parent
U = 2.0**-8  # bfloat16 unit roundoff


def config(tmp: Path, device: str) -> Path:
    cfg = yaml.safe_load((ROOT / "deploy/examples/two-gpus.yaml").read_text())
    ports = iter(free_ports(6))
    cfg["master"].update(listen=f"127.0.0.1:{next(ports)}", metrics_port=next(ports), device=device)
    for w in cfg["workers"]:
        w.update(address=f"127.0.0.1:{next(ports)}", metrics_port=next(ports))
        if device == "cpu" or torch.cuda.device_count() < 2:
            w["devices"] = [device]  # both workers on one device; partials still travel
    path = tmp / "world.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def term_scale(ref: ReferenceMoE, x: torch.Tensor, layer: int) -> torch.Tensor:
    """[T] max over elements of sum_k |w_k * expert_k(x)| (float32)."""
    m = ref.model
    r = ref.gates[layer](x)
    total = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e, w in enumerate(ref.experts[layer]):
        t, k = ((r.expert_ids == e) & r.kept).nonzero(as_tuple=True)
        y = expert_forward(m.expert_kind, m.activation, w, x[t]).float()
        total.index_add_(0, t, (y * r.weights[t, k].unsqueeze(1)).abs())
    return total.amax(dim=1)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seeds", type=int, default=300)
    p.add_argument("--json", type=Path)
    p.add_argument("--device", default="cuda:0", help="cuda:0, or cpu for a dry run")
    args = p.parse_args()
    dev = args.device
    with tempfile.TemporaryDirectory() as tmp:
        path = config(Path(tmp), dev)
        cfg = load_config(path)
        ref = ReferenceMoE(cfg.model, cfg.routing, device=dev)
        rows = []
        with open(Path(tmp) / "cluster.log", "w") as log:
            cluster = LocalCluster(path, cfg, log=log, verbose=False)
            cluster.start()
            try:
                with MoEClient(cluster.master_address) as client:
                    for layer in cfg.model.moe_layers:
                        for seed in range(args.seeds):
                            g = torch.Generator().manual_seed(1000 * layer + seed)
                            x = torch.randn(1, cfg.model.hidden_size, generator=g).to(dev)
                            y, routing = client.infer(x, layer=layer, return_routing=True)
                            want, r = ref.forward(x, layer)
                            xb = x.to(torch.bfloat16)
                            err = (y.float() - want.float()).abs().max().item()
                            rows.append(
                                {
                                    "layer": layer,
                                    "seed": seed,
                                    "err": err,
                                    "rel_to_max_y": err / want.float().abs().max().item(),
                                    "rel_to_terms": err / term_scale(ref, xb, layer).item(),
                                    "same_experts": sorted(routing.expert_ids[0].tolist())
                                    == sorted(r.expert_ids[0].cpu().tolist()),
                                }
                            )
            finally:
                cluster.stop()
    worst_y = max(rows, key=lambda r: r["rel_to_max_y"])
    worst_t = max(rows, key=lambda r: r["rel_to_terms"])
    summary = {
        "requests": len(rows),
        "over_2e-2_of_max_y": sum(r["rel_to_max_y"] > 2e-2 for r in rows),
        "worst_rel_to_max_y": worst_y,
        "worst_rel_to_terms": worst_t,
        "worst_rel_to_terms_in_u": worst_t["rel_to_terms"] / U,
        "routing_differs": sum(not r["same_experts"] for r in rows),
        "gpus": torch.cuda.device_count(),
        "device": torch.cuda.get_device_name(0) if dev.startswith("cuda") else "cpu",
    }
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.write_text(json.dumps({"summary": summary, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
