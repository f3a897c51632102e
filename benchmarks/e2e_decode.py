"""End-to-end greedy decoding: a transformers MoE model in-process vs the same model served.

    python benchmarks/e2e_decode.py --layers 8 --batch 1 32 --new-tokens 64 \\
        --out benchmarks/results/e2e-decode-<date>-<device>.json
    python benchmarks/e2e_decode.py --tiny          # CPU float32 in seconds (the e2e test)

Builds a transformers model of a real family at full width (Mixtral-8x7B shapes by default,
Qwen3-30B-A3B with `--family qwen3_moe`) with only `--layers` decoder layers and seeded random
weights, saves it as a Hugging Face checkpoint (save_pretrained, safetensors) in a temporary
directory, starts a master and workers serving every MoE layer of it (`LocalCluster`, what
`moe-serve up` runs) and decodes greedily the same seeded prompt, at each `--batch`, on these
paths:

* `in_process`: the whole model in this process, its experts run by transformers'
  `experts_implementation` named first in `--experts-impl` (chosen, not taken: the choice
  decides the baseline's speed). Each further implementation is timed as
  `in_process_<impl>`.
* `standalone`: `offload_moe(model, MoEClient(master_address))`, every MoE block served by
  the master process and its workers.
* `embedded`: `offload_moe(model, MoEClient.embedded(world.yaml))`, the gates in this
  process and tokens straight to the workers ("not available in this build" when the SDK
  lacks it).

The decode loop is written out (prefill, then one forward per token with the KV cache):
`model.generate` would swap `grouped_mm` for `batched_mm` on GPUs behind the caller's back,
and the loop times each step. Each (path, batch) is warmed up first (the workers capture CUDA
graphs per size bucket). The JSON holds, per path and batch: tokens/s over the decode steps,
ms per step (p50 and mean; a step makes `batch` tokens), the prefill time, the generated ids
and, for served paths, the p50 of one bare `client.infer` of [batch, H] on one layer (what
each MoE layer of a step waits for). `speed`, per batch: the fastest in-process path and each
served path's tokens/s relative to it. `parity`, per batch: whether the served paths' tokens
are identical, and against `in_process` the fraction of identical tokens, the first-step
logits' error, and where each differing sequence first diverged with the top-1/top-2 logit
margins there. With random weights near-ties are common (bf16 logits of ~5 are 1/32 apart,
so exact ties occur), and bf16 paths diverge after a few tokens; that is reported, not hidden.
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from moe_serve.client import MoEClient  # noqa: E402
from moe_serve.config import load_config  # noqa: E402
from moe_serve.integrations.hf import offload_moe, restore_moe  # noqa: E402
from moe_serve.tools.demo import free_ports  # noqa: E402
from moe_serve.tools.launcher import ClusterError, LocalCluster  # noqa: E402

NOT_AVAILABLE = "not available in this build"
REFERENCE = "in_process"
# Norm weights are 1 + NORM_STD * N(0, 1); the embedding N(0, 1); every other matrix
# N(0, 1/fan_in), so activations stay O(1) at any width and routing is not a tie.
NORM_STD = 0.1
# What the GPU may hold at most: the in-process model plus the workers' copy of its experts.
GPU_MEMORY_FRACTION = 0.85


@dataclass(frozen=True)
class Family:
    """A transformers MoE family: its config class and the shapes of the model benchmarked."""

    label: str
    config_class: str
    full: dict[str, Any]
    tiny: dict[str, Any]
    default_layers: int  # ~24 GB of bf16 per copy: two copies fit one 141 GB H200 with room
    experts_key: str


_COMMON: dict[str, Any] = {
    "tie_word_embeddings": False,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "pad_token_id": None,
}
_TINY: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_experts_per_tok": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 128,
    "max_position_embeddings": 512,
}
FAMILIES: dict[str, Family] = {
    "mixtral": Family(
        label="Mixtral-8x7B",
        config_class="MixtralConfig",
        full={
            "hidden_size": 4096,
            "intermediate_size": 14336,
            "num_local_experts": 8,
            "num_experts_per_tok": 2,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "vocab_size": 32000,
            "max_position_embeddings": 32768,
            "rms_norm_eps": 1e-5,
        },
        tiny={**_TINY, "num_local_experts": 4},
        default_layers=8,
        experts_key="num_local_experts",
    ),
    "qwen3_moe": Family(
        label="Qwen3-30B-A3B",
        config_class="Qwen3MoeConfig",
        full={
            "hidden_size": 2048,
            "intermediate_size": 6144,
            "moe_intermediate_size": 768,
            "num_experts": 128,
            "num_experts_per_tok": 8,
            "num_attention_heads": 32,
            "num_key_value_heads": 4,
            "head_dim": 128,
            "vocab_size": 151936,
            "max_position_embeddings": 40960,
            "norm_topk_prob": True,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
            "rms_norm_eps": 1e-6,
        },
        tiny={
            **_TINY,
            "moe_intermediate_size": 32,
            "num_experts": 4,
            "head_dim": 16,
            "norm_topk_prob": True,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
        },
        default_layers=16,
        experts_key="num_experts",
    ),
}


@dataclass
class Decoded:
    """One greedy decode: ids and margins [B, N] and first-step logits [B, V], on the CPU."""

    tokens: torch.Tensor
    margins: torch.Tensor  # top-1 minus top-2 logit of each step
    first_logits: torch.Tensor
    prefill_s: float
    step_s: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        batch, steps = self.tokens.shape[0], len(self.step_s)
        decode_s = sum(self.step_s)
        return {
            "tokens_per_s": batch * steps / decode_s if decode_s else None,
            "ms_per_token_p50": 1e3 * statistics.median(self.step_s) if steps else None,
            "ms_per_token_mean": 1e3 * decode_s / steps if steps else None,
            "prefill_ms": 1e3 * self.prefill_s,
            "timed_steps": steps,
            "tokens": self.tokens.tolist(),
        }


def sync(device: torch.device) -> None:
    # Host sync: a step's time ends when its kernels have run, not when they were queued.
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cache_argument(model: torch.nn.Module) -> str:
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


@torch.inference_mode()
def decode(
    model: transformers.PreTrainedModel,
    prompt: torch.Tensor,
    new_tokens: int,
    impls: tuple[str, str] | None = None,
) -> Decoded:
    """Greedy decoding of `new_tokens` after `prompt` [B, P]: a prefill, then one forward per
    token on the KV cache. Step i's time covers forward, argmax and the sync.

    `impls`: transformers experts implementations of the prefill and of the steps, as
    `generate` switches them (None: leave the model's as it is).
    """
    device = prompt.device
    if impls:
        model.set_experts_implementation(impls[0])
    # Filled in place by every forward. transformers 5.24 renamed `past_key_values` `cache`.
    cache = {_cache_argument(model): transformers.DynamicCache(config=model.config)}
    sync(device)
    t0 = time.perf_counter()
    out = model(input_ids=prompt, use_cache=True, logits_to_keep=1, **cache)
    first_logits = out.logits[:, -1].float()
    next_ids = first_logits.argmax(-1)
    ids, margins = [next_ids], [first_logits.topk(2, dim=-1).values]
    sync(device)
    prefill_s = time.perf_counter() - t0
    if impls:
        model.set_experts_implementation(impls[1])
    step_s = []
    for _ in range(new_tokens - 1):
        t = time.perf_counter()
        out = model(input_ids=next_ids[:, None], use_cache=True, **cache)
        logits = out.logits[:, -1].float()
        next_ids = logits.argmax(-1)
        ids.append(next_ids)
        margins.append(logits.topk(2, dim=-1).values)
        sync(device)
        step_s.append(time.perf_counter() - t)
    top2 = torch.stack(margins, dim=1)
    return Decoded(
        tokens=torch.stack(ids, dim=1).cpu(),
        margins=(top2[..., 0] - top2[..., 1]).cpu(),
        first_logits=first_logits.cpu(),
        prefill_s=prefill_s,
        step_s=step_s,
    )


def run_path(
    model: transformers.PreTrainedModel,
    prompts: dict[int, torch.Tensor],
    new_tokens: int,
    warmup_tokens: int,
    impls: tuple[str, str] | None = None,
) -> dict[int, Decoded]:
    """Warm up, then decode, at each batch size."""
    runs = {}
    for batch, prompt in prompts.items():
        decode(model, prompt, warmup_tokens, impls)
        runs[batch] = decode(model, prompt, new_tokens, impls)
    return runs


# Under inference mode, as the decode: MoEClient stages CUDA tensors in a per-thread pinned
# buffer that, first allocated during a decode, is an inference tensor; writing it outside
# inference mode raises (seen on the H200 with this tree's transport/wire.py).
@torch.inference_mode()
def infer_round_trip(
    client: MoEClient,
    config: transformers.PreTrainedConfig,
    prompts: dict[int, torch.Tensor],
    dtype: torch.dtype,
    repeats: int = 20,
) -> dict[str, float]:
    """p50 ms of one `client.infer` of a decode step's hidden states [B, H] on layer 0, per
    batch B: what each MoE layer of a served decode step waits for."""
    out = {}
    for batch, prompt in prompts.items():
        gen = torch.Generator().manual_seed(batch)
        x = torch.randn(batch, config.hidden_size, generator=gen).to(prompt.device, dtype)
        times = []
        for _ in range(repeats + 2):
            sync(prompt.device)
            t0 = time.perf_counter()
            client.infer(x, layer=0)
            sync(prompt.device)
            times.append(time.perf_counter() - t0)
        out[str(batch)] = 1e3 * statistics.median(times[2:])  # the first two warm up
    return out


def speed_summary(paths: dict[str, Any], batch: str) -> dict[str, Any]:
    """The fastest in-process path at `batch`, and each served path's speed relative to it."""
    rate = {
        name: p["batches"][batch]["tokens_per_s"]
        for name, p in paths.items()
        if isinstance(p, dict) and p["batches"][batch]["tokens_per_s"]
    }
    local = max((n for n in rate if n.startswith(REFERENCE)), key=rate.__getitem__)
    return {
        "fastest_in_process": local,
        "fastest_in_process_tokens_per_s": rate[local],
        "served_speed_vs_fastest_in_process": {
            n: r / rate[local] for n, r in rate.items() if not n.startswith(REFERENCE)
        },
    }


def compare(ref: Decoded, got: Decoded) -> dict[str, Any]:
    """How `got` differs from the reference decode `ref` of the same prompt."""
    differ = ref.tokens != got.tokens
    diverged = differ.any(dim=1).nonzero().flatten()
    first = differ.int().argmax(dim=1)  # first differing step of each row (0 if none)
    diff = (got.first_logits - ref.first_logits).abs()
    rel = diff.amax(dim=-1) / ref.first_logits.abs().amax(dim=-1)
    return {
        "token_match_fraction": 1.0 - differ.float().mean().item(),
        "sequences_identical": int(differ.shape[0] - diverged.numel()),
        "first_step_logits_max_abs_error": diff.max().item(),
        "first_step_logits_max_rel_error": rel.max().item(),
        "first_step_argmax_identical": bool((ref.tokens[:, 0] == got.tokens[:, 0]).all()),
        "divergences": [
            {
                "row": row,
                "step": step,
                "in_process_margin": margin,
                "served_margin": served,
            }
            for row, step, margin, served in zip(
                diverged.tolist(),
                first[diverged].tolist(),
                ref.margins[diverged, first[diverged]].tolist(),
                got.margins[diverged, first[diverged]].tolist(),
                strict=True,
            )
        ],
    }


def build_config(family: Family, layers: int, tiny: bool) -> transformers.PreTrainedConfig:
    shapes = family.tiny if tiny else family.full
    config_cls = getattr(transformers, family.config_class)
    return config_cls(**_COMMON, **shapes, num_hidden_layers=layers)


def count_params(config: transformers.PreTrainedConfig) -> tuple[int, int]:
    """(all parameters, routed-expert parameters) of the model, built on the meta device."""
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    return total, experts


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Overwrite every parameter from one generator seeded by `seed`, in sorted-name order."""
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda item: item[0]):
            if p.dim() == 1:  # these families' only vectors are RMSNorm weights
                p.normal_(1.0, NORM_STD, generator=gen)
            elif name.endswith("embed_tokens.weight"):
                p.normal_(0.0, 1.0, generator=gen)
            else:  # [out, in] and fused experts [E, out, in]
                p.normal_(0.0, p.shape[-1] ** -0.5, generator=gen)


def world_config(
    checkpoint: Path, dtype: str, device: str, workers: int, num_experts: int, layers: int
) -> dict[str, Any]:
    """Master and `workers` workers on `device`, the experts split evenly among them."""
    master_port, *worker_ports = free_ports(1 + workers)
    per = -(-num_experts // workers)
    return {
        "model": {"checkpoint": str(checkpoint), "dtype": dtype, "moe_layers": list(range(layers))},
        "master": {"listen": f"127.0.0.1:{master_port}", "metrics_port": None, "device": device},
        "workers": [
            {
                "id": f"w{i}",
                "address": f"127.0.0.1:{port}",
                "devices": [device],
                "experts": list(range(i * per, min(num_experts, (i + 1) * per))),
            }
            for i, port in enumerate(worker_ports)
        ],
    }


def _si(n: float) -> str:
    """`n` with a decimal prefix: 11.9 G, 238 k."""
    for scale, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.3g} {prefix}"
    return f"{n:.3g} "


def device_info(device: torch.device) -> dict[str, Any]:
    return {
        "device": str(device),
        "name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
    }


def print_table(paths: dict[str, Any], parity: dict[str, Any]) -> None:
    print(
        f"\n{'path':24} {'batch':>5} {'tok/s':>9} {'ms/step p50':>11} {'prefill ms':>10} "
        f"{'infer ms p50':>12} {'same tokens':>11} {'logits rel err':>14}"
    )
    for name, runs in paths.items():
        if not isinstance(runs, dict):
            print(f"{name:24} {runs}")
            continue
        for batch, r in runs["batches"].items():
            cmp = parity[batch]["vs_in_process"].get(name)
            same = f"{cmp['token_match_fraction']:.4f}" if cmp else "ref"
            err = f"{cmp['first_step_logits_max_rel_error']:.2e}" if cmp else "ref"
            infer = runs.get("infer_ms_p50", {}).get(batch)
            rtt = f"{infer:.2f}" if infer is not None else "-"
            print(
                f"{name:24} {batch:>5} {r['tokens_per_s']:>9.1f} {r['ms_per_token_p50']:>11.2f} "
                f"{r['prefill_ms']:>10.1f} {rtt:>12} {same:>11} {err:>14}"
            )
    for batch, p in parity.items():
        print(
            f"batch {batch}: served paths {p['served_paths']} tokens identical: "
            f"{p['served_tokens_identical']}"
        )


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--family", choices=sorted(FAMILIES), default="mixtral")
    p.add_argument("--layers", type=int, help="decoder layers (default: the family's, or 2)")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--warmup-tokens", type=int, default=4)
    p.add_argument(
        "--experts-impl",
        nargs="+",
        default=["grouped_mm", "batched_mm"],
        help="transformers experts_implementation(s) in-process; the first is the reference",
    )
    p.add_argument("--workers", type=int, choices=(1, 2), default=1)
    p.add_argument("--device", help="cuda:0 or cpu (default: cuda:0 if available, cpu if --tiny)")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), help="default: by device")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true", help="hidden 64, 4 experts, vocab 128")
    p.add_argument("--start-timeout", type=float, default=900.0, help="seconds")
    p.add_argument("--out", type=Path)
    return p.parse_args()


def main() -> int:
    args = parse_args()
    family = FAMILIES[args.family]
    auto = "cuda:0" if torch.cuda.is_available() and not args.tiny else "cpu"
    device = torch.device(args.device or auto)
    dtype_name = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    dtype = getattr(torch, dtype_name)
    layers = args.layers or (2 if args.tiny else family.default_layers)
    if args.new_tokens < 2:
        sys.exit("--new-tokens: expected at least 2 (a prefill and one timed step)")
    if args.tiny:
        # Tiny matrices gain nothing from threads, and this process and the workers (which
        # inherit OMP_NUM_THREADS) take turns every layer: each one's idle OpenMP threads
        # spinning on every core made a 16-core machine 2x slower than one thread each.
        torch.set_num_threads(1)
        os.environ.setdefault("OMP_NUM_THREADS", "1")

    # 1. Shapes and the memory estimate: the GPU holds the model and the workers' experts.
    config = build_config(family, layers, args.tiny)
    total, experts = count_params(config)
    copy_gb = total * dtype.itemsize / 1e9
    need_gb = (total + experts) * dtype.itemsize / 1e9
    shapes = "tiny" if args.tiny else f"{family.label} shapes"
    print(
        f"model: {args.family} ({shapes}), {layers} layers, {_si(total)} parameters "
        f"({_si(experts)} in experts) = {_si(copy_gb * 1e9)}B in {dtype_name}; {device} holds "
        f"~{_si(need_gb * 1e9)}B (the model in-process + the workers' experts)",
        flush=True,
    )
    if device.type == "cuda":
        have_gb = torch.cuda.get_device_properties(device).total_memory / 1e9
        if need_gb > GPU_MEMORY_FRACTION * have_gb:
            sys.exit(f"--layers: {layers} needs ~{need_gb:.0f} GB of {have_gb:.0f} GB on {device}")

    with tempfile.TemporaryDirectory(prefix="e2e-decode-") as tmp_name:
        tmp = Path(tmp_name)
        free_gb = shutil.disk_usage(tmp).free / 1e9
        if copy_gb > 0.9 * free_gb:
            sys.exit(f"--layers: the checkpoint takes {copy_gb:.0f} GB, {tmp} has {free_gb:.0f}")

        # 2. Random weights, seeded, built on the device itself (no 2x copy through the host).
        t0 = time.perf_counter()
        with torch.device(device):
            model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
        randomize_(model, args.seed)
        model.eval()
        print(f"built in {time.perf_counter() - t0:.1f} s", flush=True)

        # 3. The checkpoint, as published ones are stored (one tensor per expert projection).
        checkpoint = tmp / "checkpoint"
        print(f"writing {_si(copy_gb * 1e9)}B to {checkpoint} ...", flush=True)
        t0 = time.perf_counter()
        model.save_pretrained(checkpoint, save_original_format=True)
        print(f"written in {time.perf_counter() - t0:.1f} s", flush=True)

        # 4. One seeded prompt; batch B decodes its first B rows.
        gen = torch.Generator().manual_seed(args.seed + 1)
        prompt = torch.randint(
            2, config.vocab_size, (max(args.batch), args.prompt_tokens), generator=gen
        ).to(device)
        prompts = {b: prompt[:b] for b in args.batch}

        # 5. In-process: transformers runs the experts, with each chosen implementation.
        decoded: dict[str, dict[int, Decoded]] = {}
        paths: dict[str, Any] = {}
        # The prefill always runs the first (batched_mm would copy every pair's weights).
        for i, impl in enumerate(args.experts_impl):
            name = REFERENCE if i == 0 else f"{REFERENCE}_{impl}"
            impls = (args.experts_impl[0], impl)
            t0 = time.perf_counter()
            decoded[name] = run_path(model, prompts, args.new_tokens, args.warmup_tokens, impls)
            paths[name] = {"experts_implementation": {"prefill": impls[0], "steps": impl}}
            print(f"{name} ({impl}) done in {time.perf_counter() - t0:.1f} s", flush=True)

        # 6. The served paths: the same model with its MoE blocks swapped for remote ones.
        world_path = tmp / "world.yaml"
        experts_per_layer = getattr(config, family.experts_key)
        world = world_config(
            checkpoint, dtype_name, str(device), args.workers, experts_per_layer, layers
        )
        world_path.write_text(yaml.safe_dump(world))
        cfg = load_config(world_path)
        log_path = tmp / "cluster.log"
        with open(log_path, "w") as log:
            cluster = LocalCluster(world_path, cfg, log=log)
            try:
                t0 = time.perf_counter()
                cluster.start(timeout_s=args.start_timeout)
                print(f"cluster healthy in {time.perf_counter() - t0:.1f} s", flush=True)
                clients = {"standalone": lambda: MoEClient(cluster.master_address)}
                if hasattr(MoEClient, "embedded"):
                    clients["embedded"] = lambda: MoEClient.embedded(str(world_path))
                else:
                    paths["embedded"] = NOT_AVAILABLE
                for name, connect in clients.items():
                    t0 = time.perf_counter()
                    client = connect()
                    try:
                        offload_moe(model, client)
                        decoded[name] = run_path(
                            model, prompts, args.new_tokens, args.warmup_tokens
                        )
                        paths[name] = {
                            "world": world,
                            "infer_ms_p50": infer_round_trip(client, config, prompts, dtype),
                        }
                    finally:
                        restore_moe(model)
                        client.close()
                    print(f"{name} done in {time.perf_counter() - t0:.1f} s", flush=True)
            except ClusterError:
                print(log_path.read_text()[-4000:], file=sys.stderr)
                raise
            finally:
                t0 = time.perf_counter()
                cluster.stop()
                print(f"cluster stopped in {time.perf_counter() - t0:.1f} s", flush=True)

    # 7. Results: speed per path and batch, parity against the in-process reference.
    for name, runs in decoded.items():
        paths[name]["batches"] = {str(b): runs[b].summary() for b in args.batch}
    served = [name for name in ("standalone", "embedded") if name in decoded]
    parity = {
        str(b): {
            "served_paths": served,
            "served_tokens_identical": all(
                torch.equal(decoded[name][b].tokens, decoded[served[0]][b].tokens)
                for name in served
            ),
            "vs_in_process": {
                name: compare(decoded[REFERENCE][b], runs[b])
                for name, runs in decoded.items()
                if name != REFERENCE
            },
        }
        for b in args.batch
    }
    result = {
        "command": " ".join(sys.argv),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": device_info(device),
        "model": {
            "family": args.family,
            "shapes": shapes,
            "config": {**(family.tiny if args.tiny else family.full), "num_hidden_layers": layers},
            "layers": layers,
            "dtype": dtype_name,
            "parameters": total,
            "expert_parameters": experts,
            "checkpoint_gb": round(copy_gb, 2),
            "seed": args.seed,
        },
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "warmup_tokens": args.warmup_tokens,
        "reference": REFERENCE,
        "paths": paths,
        "speed": {str(b): speed_summary(paths, str(b)) for b in args.batch},
        "parity": parity,
    }
    print_table(paths, parity)
    date = datetime.date.today().isoformat()
    slug = re.sub(r"[^a-z0-9]+", "-", result["device"]["name"].lower()).strip("-")
    slug += "-tiny" if args.tiny else ""
    out = args.out or ROOT / "benchmarks/results" / f"e2e-decode-{date}-{slug}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
