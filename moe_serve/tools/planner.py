"""Plan an expert placement: which worker, and which of its devices, holds each routed expert.

`moe-serve placement` reads config.json and the safetensors headers (no tensor data), then
balances expert bytes per device or, with a routing trace, token-expert pairs per device and
layer under a memory cap, optionally with replicas of the hottest experts. A worker puts the
i-th listed expert of a layer on `devices[i % len(devices)]`, filling its devices a round at a
time, and the planner hands experts out the same way (`_place_layer`, docs/placement.md).
Heavy modules (torch, yaml, pydantic) are imported where used: `cli` imports this module.
"""

from __future__ import annotations

import json
import math
import re
import shlex
import struct
import sys
import textwrap
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moe_serve.errors import ConfigError

if TYPE_CHECKING:
    import argparse

    import torch

DEFAULT_MEMORY_TOLERANCE = 0.10
DEFAULT_MASTER_LISTEN = "0.0.0.0:50051"
WORKER_SYNTAX = "ID=HOST:PORT@DEVICE[,DEVICE...] (e.g. w0=10.0.0.11:50061@cuda:0,cuda:1)"
_WORKER = re.compile(r"^(?P<id>[A-Za-z0-9_.-]+)=(?P<address>[^@=\s]+)@(?P<devices>\S+)$")
_DEVICE = re.compile(r"^(cpu|cuda(:\d+)?)$")
_PerLayer = dict[int, list[Any]]  # layer -> one value per expert, or per worker


@dataclass(frozen=True)
class WorkerSpec:
    """One `--worker ID=HOST:PORT@DEVICE,...`: its devices are its placement slots."""

    id: str
    address: str
    devices: tuple[str, ...]


def parse_worker(spec: str) -> WorkerSpec:
    """Parse one `--worker` value; ConfigError naming `--worker` if malformed."""
    from moe_serve.config import parse_address

    m = _WORKER.match(spec.strip())
    if m is None:
        raise ConfigError(f"--worker: {spec!r} is not {WORKER_SYNTAX}")
    try:
        parse_address(m["address"])
    except ValueError as exc:
        raise ConfigError(f"--worker {spec!r}: address: {exc}") from None
    devices = tuple(m["devices"].split(","))
    for d in devices:
        if not _DEVICE.match(d):
            raise ConfigError(f"--worker {spec!r}: device {d!r} is not cpu, cuda or cuda:N")
    if len({"cuda:0" if d == "cuda" else d for d in devices}) != len(devices):
        raise ConfigError(f"--worker {spec!r}: a device is listed twice")
    return WorkerSpec(m["id"], m["address"], devices)


def parse_workers(specs: Sequence[str] | None) -> tuple[WorkerSpec, ...]:
    """Parse every `--worker`; ids and addresses must be distinct."""
    if not specs:
        raise ConfigError(f"--worker: give at least one, as {WORKER_SYNTAX}")
    workers = tuple(parse_worker(s) for s in specs)
    for attr in ("id", "address"):
        if len({getattr(w, attr) for w in workers}) != len(workers):
            raise ConfigError(f"--worker: two workers have the same {attr}")
    return workers


@dataclass(frozen=True)
class ExpertSizes:
    """What the planner knows of a checkpoint: its MoE layers and each routed expert's bytes."""

    checkpoint: Path
    family: str
    layers: tuple[int, ...]
    num_experts: int
    top_k: int
    nbytes: Mapping[int, tuple[int, ...]]  # layer -> bytes of each routed expert (on disk)

    @property
    def total_bytes(self) -> int:
        return sum(sum(v) for v in self.nbytes.values())


def _header(path: Path) -> dict[str, Any]:
    """A safetensors file's JSON header: key -> {dtype, shape, data_offsets}."""
    try:
        with path.open("rb") as f:
            return json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
    except (OSError, struct.error, ValueError) as exc:
        raise ConfigError(f"--checkpoint: cannot read the header of {str(path)!r}: {exc}") from None


def read_expert_sizes(checkpoint: str | Path) -> ExpertSizes:
    """Bytes of every routed expert of every MoE layer, from config.json and the file headers."""
    from moe_serve.families import read_layout
    from moe_serve.weights.checkpoint import weight_map

    path = Path(checkpoint).expanduser().resolve()
    if not path.is_dir():
        raise ConfigError(f"--checkpoint: {str(path)!r} is not a directory")
    try:
        layout, files = read_layout(path), weight_map(path)
    except ConfigError as exc:
        raise ConfigError(f"--checkpoint: {str(exc).removeprefix('model.checkpoint: ')}") from None
    headers: dict[str, dict[str, Any]] = {}  # file -> its header, read once

    def expert_bytes(layer: int, expert: int) -> int:
        total = 0
        for key in layout.expert_keys(layer, expert).values():
            if key not in files:
                raise ConfigError(f"--checkpoint: tensor {key!r} is missing from {str(path)!r}")
            if files[key] not in headers:
                headers[files[key]] = _header(path / files[key])
            start, end = headers[files[key]][key]["data_offsets"]
            total += end - start
        return total

    n, layers = int(layout.model["num_experts"]), tuple(layout.model["moe_layers"])
    sizes = {la: tuple(expert_bytes(la, e) for e in range(n)) for la in layers}
    return ExpertSizes(path, layout.family, layers, n, int(layout.model["top_k"]), sizes)


def _int(v: Any, what: str) -> int:
    try:
        return int(v)
    except (TypeError, ValueError):
        raise ConfigError(f"{what} {v!r} is not an integer") from None


def _counts(value: Any, num_experts: int, where: str) -> list[float]:
    """Pairs per expert from expert ids [T, K] (integer tensor) or counts (tensor, list, dict)."""
    import torch

    if isinstance(value, torch.Tensor) and value.dim() >= 2:
        if value.dtype.is_floating_point or value.dtype == torch.bool:
            raise ConfigError(f"{where}: expected integer expert ids [T, K], got {value.dtype}")
        ids = value[value >= 0].long()  # negative ids mark no expert
        if ids.numel() and int(ids.max()) >= num_experts:
            raise ConfigError(f"{where}: expert id {int(ids.max())} is out of range")
        return torch.bincount(ids, minlength=num_experts).double().tolist()
    if isinstance(value, torch.Tensor):
        value = value.double().tolist()
    if isinstance(value, Mapping):
        by_id = {_int(k, f"{where}: expert"): v for k, v in value.items()}
        if not all(0 <= e < num_experts for e in by_id):
            raise ConfigError(f"{where}: expert ids must be in 0..{num_experts - 1}")
        value = [by_id.get(e, 0) for e in range(num_experts)]
    if not isinstance(value, list | tuple) or len(value) != num_experts:
        raise ConfigError(f"{where}: expected expert ids [T, K] or {num_experts} counts")
    try:
        counts = [float(v) for v in value]
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: counts must be numbers, got {value!r:.60}") from None
    if not all(math.isfinite(c) and c >= 0 for c in counts):
        raise ConfigError(f"{where}: counts must be finite and >= 0")
    return counts


def load_trace(path: str | Path, sizes: ExpertSizes) -> dict[int, list[float]]:
    """Read a routing trace: layer -> token-expert pairs per expert (only the traced layers).

    Formats: `torch.save` of {layer: expert_ids [T, K] integer tensor} (what `record_trace`
    writes; a 1-D tensor is read as counts), or JSON of {"layer": [count per expert]} or
    {"layer": {"expert": count}}.
    """
    import torch

    p, where = Path(path), f"--trace {str(path)!r}"
    if not p.is_file():
        raise ConfigError(f"{where}: no such file")
    try:
        raw = torch.load(p, map_location="cpu", weights_only=True)
    except Exception:  # not a torch.save file: JSON, then
        try:
            raw = json.loads(p.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{where}: neither a torch.save trace nor JSON: {exc}") from None
    if not isinstance(raw, Mapping) or not raw:
        raise ConfigError(f"{where}: expected a non-empty mapping {{layer: ...}}, got {raw!r:.60}")
    out: dict[int, list[float]] = {}
    for key, value in raw.items():
        layer = _int(key, f"{where}: layer")
        if layer not in sizes.layers:
            raise ConfigError(f"{where}: layer {layer} is not a MoE layer {list(sizes.layers)}")
        out[layer] = _counts(value, sizes.num_experts, f"{where}: layer {layer}")
    if sum(map(sum, out.values())) <= 0:
        raise ConfigError(f"{where}: the trace holds no token-expert pairs")
    return dict(sorted(out.items()))


def record_trace(
    client: Any,
    inputs: Iterable[torch.Tensor] | Mapping[int, Iterable[torch.Tensor]],
    layers: Iterable[int],
    path: str | Path | None = None,
) -> dict[int, torch.Tensor]:
    """Run `client.infer(x, layer=l, return_routing=True)` for every input on every layer, save
    {layer: expert_ids [T, K] int64} to `path` (the `--trace` format), return pairs per expert.

    `inputs`: hidden states [..., H] used on every layer, or {layer: [tensors]} per layer.
    """
    import torch

    shared = None if isinstance(inputs, Mapping) else list(inputs)
    ids, counts = {}, {}
    for layer in layers:
        chunks, num = [], 0
        for x in inputs[layer] if shared is None else shared:  # type: ignore[index]
            _, routing = client.infer(x, layer=layer, return_routing=True)
            chunks.append(routing.expert_ids.reshape(-1, routing.expert_ids.shape[-1]).long())
            num = routing.scores.shape[-1]
        if chunks:
            ids[layer] = torch.cat(chunks)
            counts[layer] = torch.bincount(ids[layer][ids[layer] >= 0], minlength=num)
    if path is not None:
        torch.save(ids, Path(path))
    return counts


@dataclass(frozen=True)
class DevicePlan:
    """One device slot of a worker and what the plan puts on it."""

    worker: str
    device: str
    experts: Mapping[int, tuple[int, ...]]  # layer -> expert ids, in round-robin order
    nbytes: int
    tokens: float  # expected token-expert pairs, summed over layers
    share: float  # tokens / all pairs of all layers

    @property
    def num_experts(self) -> int:
        return sum(len(v) for v in self.experts.values())


@dataclass(frozen=True)
class Plan:
    """A placement: each worker's expert list per layer (in listed order) and its outcome."""

    sizes: ExpertSizes
    workers: tuple[WorkerSpec, ...]
    experts: Mapping[str, Mapping[int, tuple[int, ...]]]  # worker -> layer -> listed expert ids
    devices: tuple[DevicePlan, ...]
    replicas: Mapping[int, Mapping[int, tuple[str, ...]]]  # layer -> expert -> workers (>1)
    traced_layers: tuple[int, ...]  # layers balanced from a trace (empty: bytes plan)
    byte_balanced_max: int  # busiest device's bytes in the byte-balanced plan
    memory_cap: int | None  # trace plans: the bytes every device should stay under
    busiest_share: Mapping[int, float]  # layer -> busiest device's share of the layer's pairs

    def worker_experts(self, worker: str) -> list[int] | dict[int, list[int]]:
        """The `experts` value of the world config: a flat list if the same on every layer."""
        lists = {la: list(ids) for la, ids in self.experts[worker].items()}
        first = lists[self.sizes.layers[0]]
        return first if all(v == first for v in lists.values()) else lists

    def world(self, master_listen: str = DEFAULT_MASTER_LISTEN) -> dict[str, Any]:
        """The world config as a mapping (what `parse_config` takes)."""
        workers = [
            {"id": w.id, "address": w.address, "devices": list(w.devices)}
            | {"experts": self.worker_experts(w.id)}
            for w in self.workers
        ]
        model = {"checkpoint": str(self.sizes.checkpoint)}
        return {"model": model, "master": {"listen": master_listen}, "workers": workers}

    def table(self) -> str:
        """Per device: experts, GB, expected token share, ids; then the summary lines."""
        basis = "trace" if self.traced_layers else "uniform routing"
        rows = [("worker", "device", "experts", "GB", f"token share ({basis})", "ids (layer:ids)")]
        for d in self.devices:
            ids = " ".join(f"{la}:{','.join(map(str, v))}" for la, v in d.experts.items() if v)
            ids = ids if len(ids) <= 48 else ids[:45] + "..."
            gb, share = f"{d.nbytes / 1e9:.4g}", f"{100 * d.share:.1f}%"
            rows.append((d.worker, d.device, str(d.num_experts), gb, share, ids))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
        return "\n".join([line.rstrip() for line in lines] + self.summary())

    def summary(self) -> list[str]:
        """Bytes spread, memory cap, busiest device per layer, untraced layers, replicas."""
        nb, one = [d.nbytes for d in self.devices], max(map(max, self.sizes.nbytes.values()))
        out = [
            f"bytes per device: max {max(nb) / 1e9:.4g} GB, min {min(nb) / 1e9:.4g} GB, "
            f"max-min {(max(nb) - min(nb)) / one:.2f} experts (one expert: {one / 1e9:.4g} GB)"
        ]
        if self.memory_cap is not None:
            over = "; EXCEEDED (see docs/placement.md)" if max(nb) > self.memory_cap else ""
            out.append(
                f"memory cap: {self.memory_cap / 1e9:.4g} GB per device (byte-balanced max "
                f"{self.byte_balanced_max / 1e9:.4g} GB + tolerance){over}"
            )
        shares = ", ".join(f"{la}: {100 * s:.1f}%" for la, s in self.busiest_share.items())
        out.append(f"busiest device per layer ({100 / len(nb):.1f}% is an even split): {shares}")
        untraced = [la for la in self.sizes.layers if la not in self.traced_layers]
        if self.traced_layers and untraced:
            out.append(f"layers without trace (uniform routing assumed): {untraced}")
        for la, reps in self.replicas.items():
            out += [f"replica: layer {la} expert {e} on {', '.join(ws)}" for e, ws in reps.items()]
        return out


# A proposed round's score, compared in order (`_place_layer` step 3): bytes over the budget,
# the busiest device's load, short round, -devices, -byte peak, worker.
_RoundScore = tuple[float, float, bool, int, float, int]


def _place_layer(
    workers: Sequence[WorkerSpec],
    dev_bytes: list[list[float]],
    nbytes: Sequence[int],
    weight: Sequence[float],
    copies: Sequence[int],
    budget: float | None,
) -> list[list[int]]:
    """One layer's list per worker, handed out a round at a time; adds to `dev_bytes`.

    1. Queue every copy of every expert, heaviest `weight` first (ties: lower id).
    2. Each worker proposes a round: the first len(devices) queued experts it does not hold, on
       the devices its list fills next. Byte plans (`budget` None) keep queue order; trace plans
       put the heaviest on the device with the fewest pairs (ties: fewer bytes, later device).
    3. The round with the lowest score wins, comparing in turn: bytes over the memory `budget`;
       the load of the busiest device it fills, afterwards (byte plans: bytes over all layers;
       trace plans: this layer's pairs); full rounds first; more devices first; more bytes
       first (trace plans; byte plans are decided by then); the earlier worker.
    4. Append the winning round to its worker's list, take it off the queue; repeat.
    """
    queue = sorted((e for e, c in enumerate(copies) for _ in range(c)), key=lambda e: -weight[e])
    lists: list[list[int]] = [[] for _ in workers]
    pairs = [[0.0] * len(w.devices) for w in workers]  # this layer's weight per device
    load = dev_bytes if budget is None else pairs

    def propose(w: int) -> tuple[_RoundScore, list[tuple[int, int]]] | None:
        n, held = len(workers[w].devices), set(lists[w])
        rnd = list(dict.fromkeys(e for e in queue if e not in held))[:n]
        slots = [(len(lists[w]) + i) % n for i in range(len(rnd))]
        if budget is not None:
            emptiest = sorted(slots, key=lambda k: (pairs[w][k], dev_bytes[w][k], -k))
            paired = dict(zip(emptiest, rnd, strict=True))  # device -> expert
            rnd = [paired[k] for k in slots]
        if not rnd:
            return None
        deal = list(zip(slots, rnd, strict=True))
        byte_peak = max(dev_bytes[w][k] + nbytes[e] for k, e in deal)
        over = 0.0 if budget is None else max(0.0, byte_peak - budget)
        peak, short = max(load[w][k] + weight[e] for k, e in deal), len(deal) < n
        return (over, peak, short, -n, -byte_peak, w), deal

    while queue:
        score, deal = min(filter(None, map(propose, range(len(workers)))))
        w = score[-1]
        for k, e in deal:
            pairs[w][k] += weight[e]
            dev_bytes[w][k] += nbytes[e]
            lists[w].append(e)
            queue.remove(e)
    return lists


def _place(
    sizes: ExpertSizes,
    workers: Sequence[WorkerSpec],
    weight: Mapping[int, Sequence[float]],
    copies: _PerLayer,
    cap: int | None = None,
) -> tuple[_PerLayer, float]:
    """Every layer's lists (`_place_layer`) and the busiest device's bytes. With `cap`, the cap is
    spent evenly over the layers: once a share s of all bytes is placed, the budget is s x cap."""
    dev_bytes = [[0.0] * len(w.devices) for w in workers]
    layer_bytes = [
        sum(map(math.prod, zip(sizes.nbytes[la], copies[la], strict=True))) for la in sizes.layers
    ]
    lists = {}
    for i, la in enumerate(sizes.layers):
        budget = None if cap is None else cap * sum(layer_bytes[: i + 1]) / sum(layer_bytes)
        args = (sizes.nbytes[la], weight[la], copies[la], budget)
        lists[la] = _place_layer(workers, dev_bytes, *args)
    return lists, max(map(max, dev_bytes))


def _copies(pairs: _PerLayer, traced: Sequence[int], replicas: int, workers: int) -> _PerLayer:
    """Copies per expert: 1, plus `replicas` per traced layer, each to the expert with the most
    pairs per copy that is not yet on every worker."""
    copies = {la: [1] * len(p) for la, p in pairs.items()}
    for la in traced:
        c, p = copies[la], pairs[la]
        for _ in range(replicas):
            room = [e for e in range(len(c)) if c[e] < workers]
            if not room:
                raise ConfigError(f"--replicas: {replicas} do not fit on {workers} workers")
            c[max(room, key=lambda e: p[e] / c[e])] += 1
    return copies


def _devices(
    sizes: ExpertSizes, workers: Sequence[WorkerSpec], lists: _PerLayer, per_copy: _PerLayer
) -> tuple[tuple[DevicePlan, ...], dict[int, float]]:
    """Each device's experts, bytes and expected pairs; each layer's busiest device's share."""
    layers = sizes.layers
    layer_pairs = {la: sum(per_copy[la][e] for ids in lists[la] for e in ids) for la in layers}
    total, busiest = sum(layer_pairs.values()) or 1.0, dict.fromkeys(layers, 0.0)
    devices = []
    for w, spec in enumerate(workers):
        for k, device in enumerate(spec.devices):
            ids = {la: tuple(lists[la][w][k :: len(spec.devices)]) for la in layers}
            tok = {la: sum(per_copy[la][e] for e in ids[la]) for la in layers}
            busiest = {la: max(busiest[la], tok[la] / (layer_pairs[la] or 1)) for la in layers}
            nb, t = sum(sizes.nbytes[la][e] for la in layers for e in ids[la]), sum(tok.values())
            devices.append(DevicePlan(spec.id, device, ids, nb, t, t / total))
    return tuple(devices), busiest


def plan_placement(
    sizes: ExpertSizes,
    workers: Sequence[WorkerSpec],
    trace: Mapping[int, Sequence[float]] | None = None,
    replicas: int = 0,
    memory_tolerance: float = DEFAULT_MEMORY_TOLERANCE,
) -> Plan:
    """Place every routed expert of `sizes` on the devices of `workers` (docs/placement.md).

    1. Pairs per expert: the trace's (untraced layers: the traced layers' mean, split evenly),
       or 1 each without a trace; `replicas` extra copies per traced layer for the hottest.
    2. Balance bytes (`_place`); its busiest device x (1 + memory_tolerance) is the memory cap.
    3. With a trace, balance pairs per copy within each layer under that cap instead.
    """
    workers, n = tuple(workers), sizes.num_experts
    if not workers:
        raise ConfigError(f"--worker: give at least one, as {WORKER_SYNTAX}")
    if replicas < 0 or (replicas and (trace is None or len(workers) < 2)):
        raise ConfigError(
            f"--replicas: expected 0, or N > 0 with --trace and 2+ workers: {replicas}"
        )
    if not memory_tolerance >= 0:
        raise ConfigError(f"--memory-tolerance: expected a fraction >= 0: {memory_tolerance}")
    counts = trace or {}  # layer -> pairs per expert
    traced = tuple(la for la in sizes.layers if la in counts)
    # Untraced layers get the traced layers' mean, split evenly; without a trace, 1 per expert.
    mean = sum(sum(counts[la]) for la in traced) / len(traced) if traced else n
    pairs = {la: list(counts[la]) if la in traced else [mean / n] * n for la in sizes.layers}
    copies = _copies(pairs, traced, replicas, len(workers))
    lists, byte_max = _place(sizes, workers, sizes.nbytes, copies)
    per_copy = {la: [p / c for p, c in zip(pairs[la], copies[la], strict=True)] for la in pairs}
    cap = int(byte_max * (1 + memory_tolerance)) if traced else None
    if cap is not None:
        lists, _ = _place(sizes, workers, per_copy, copies, cap)
    devices, busiest = _devices(sizes, workers, lists, per_copy)
    experts = {s.id: {la: tuple(lists[la][w]) for la in lists} for w, s in enumerate(workers)}
    copied = {la: [e for e, c in enumerate(copies[la]) if c > 1] for la in traced}
    holders = {
        la: {e: tuple(s.id for s in workers if e in experts[s.id][la]) for e in copied[la]}
        for la in traced
        if copied[la]
    }
    return Plan(sizes, workers, experts, devices, holders, traced, int(byte_max), cap, busiest)


def render_yaml(plan: Plan, master_listen: str = DEFAULT_MASTER_LISTEN, command: str = "") -> str:
    """The world config YAML, headed by comments saying how it was made."""
    import yaml

    s, how = plan.sizes, "expert bytes balanced per device (no routing trace)."
    if plan.traced_layers:
        how = (
            f"expected token-expert pairs per device, balanced within each layer, from a routing "
            f"trace (layers {list(plan.traced_layers)}), under the memory cap below."
        )
    wrap = textwrap.TextWrapper(width=98, initial_indent="# ", subsequent_indent="#   ").wrap
    header = [
        "# World config written by `moe-serve placement` (moe_serve.tools.planner):",
        *([f"#   {command}"] if command else []),
        *wrap(f"Checkpoint: {s.family}, MoE layers {list(s.layers)}, {s.num_experts} experts."),
        *wrap(f"Objective: {how}"),
        *wrap(
            "Round-robin puts the i-th listed expert of a layer on devices[i % len(devices)]: "
            "reordering a list moves experts between devices. An expert on two workers is a "
            "replica (docs/placement.md)."
        ),
        "#",
        *[f"# {line}".rstrip() for line in plan.table().splitlines()],
    ]

    class Dumper(yaml.SafeDumper):  # block mappings, one-line lists of ids
        pass

    def ids_inline(dumper: yaml.SafeDumper, v: list[Any]) -> yaml.Node:
        flat = not any(isinstance(x, list | dict) for x in v)
        return dumper.represent_sequence("tag:yaml.org,2002:seq", v, flow_style=flat)

    Dumper.add_representer(list, ids_inline)
    body = yaml.dump(plan.world(master_listen), Dumper=Dumper, sort_keys=False)
    return "\n".join(header) + "\n" + body


def check_round_robin(plan: Plan, world: Mapping[str, Any], base: Path | None = None) -> None:
    """Validate `world` with parse_config and check device_assignment lands as `plan` says."""
    from moe_serve.config import parse_config
    from moe_serve.layer.placement import device_assignment

    cfg = parse_config(world, "<placement>", base=base)
    by_slot = {(d.worker, d.device): d.experts for d in plan.devices}
    for w in cfg.workers:
        for la in cfg.model.moe_layers:
            for device, got in zip(w.devices, device_assignment(w, la), strict=True):
                if got != list(by_slot[(w.id, device)].get(la, ())):
                    raise AssertionError(f"round-robin puts {got} on {w.id} {device}, layer {la}")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The `moe-serve placement` arguments."""
    p.add_argument("--checkpoint", required=True, help="Hugging Face checkpoint directory")
    worker = f"a worker and its devices, {WORKER_SYNTAX}; repeat per worker"
    p.add_argument("--worker", action="append", required=True, help=worker)
    p.add_argument("--trace", help="routing trace: torch.save {layer: ids [T,K]} or JSON counts")
    p.add_argument("--replicas", type=int, default=0, help="with --trace: extra copies per layer")
    tolerance = "with --trace: how far bytes per device may exceed the byte plan's max (0.1)"
    p.add_argument(
        "--memory-tolerance", type=float, default=DEFAULT_MEMORY_TOLERANCE, help=tolerance
    )
    p.add_argument("--master-listen", default=DEFAULT_MASTER_LISTEN, help="master.listen")
    p.add_argument("--out", help="write the world config here (default: stdout, table on stderr)")


def _command(args: argparse.Namespace) -> str:
    """The command line that reproduces `args`, for the config's header."""
    parts = ["moe-serve", "placement", "--checkpoint", str(args.checkpoint)]
    parts += [x for w in args.worker for x in ("--worker", w)]
    optional = [
        ("--trace", args.trace, None),
        ("--replicas", args.replicas, 0),
        ("--memory-tolerance", args.memory_tolerance, DEFAULT_MEMORY_TOLERANCE),
        ("--master-listen", args.master_listen, DEFAULT_MASTER_LISTEN),
        ("--out", args.out, None),
    ]
    parts += [x for flag, v, default in optional if v != default for x in (flag, str(v))]
    return shlex.join(parts)


def main(args: argparse.Namespace) -> int:
    """`moe-serve placement`: plan, check, print the table, write the world config."""
    from moe_serve.config import parse_address

    workers = parse_workers(args.worker)
    try:
        parse_address(args.master_listen)
    except ValueError as exc:
        raise ConfigError(f"--master-listen: {exc}") from None
    sizes = read_expert_sizes(args.checkpoint)
    trace = load_trace(args.trace, sizes) if args.trace else None
    plan = plan_placement(sizes, workers, trace, args.replicas, args.memory_tolerance)
    check_round_robin(plan, plan.world(args.master_listen))
    text = render_yaml(plan, args.master_listen, _command(args))
    if not args.out:
        sys.stdout.write(text)
        print(plan.table(), file=sys.stderr)
        return 0
    try:
        Path(args.out).write_text(text)
    except OSError as exc:
        raise ConfigError(f"--out: cannot write {str(args.out)!r}: {exc.strerror}") from None
    print(plan.table())
    print(f"wrote {args.out}")
    return 0
