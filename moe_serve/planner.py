"""Plan an expert placement: which worker, and which of its devices, holds each routed expert.

`moe-serve placement` reads a checkpoint's config.json and its safetensors headers (never tensor
data), takes every routed expert's bytes per MoE layer, and gives each (layer, expert) to one
device of the workers named on the command line:

* without a trace it balances expert **bytes** per device;
* with a routing trace it balances expected **token-expert pairs** per device within each layer
  (a layer's call waits for its busiest device), keeping every device's bytes within
  `memory_tolerance` of the byte-balanced maximum, and can add replicas of the hottest experts.

Round-robin, exactly. A worker spreads each layer's experts over its devices in listed order
(`moe_serve.placement.device_assignment`: the i-th expert on `devices[i % len(devices)]`), so
the planner works on each worker's *ordered list* per layer, position i being device
i % len(devices). It only ever appends to a list (the expert lands on the worker's next
round-robin device), swaps two entries, or removes one by moving the list's last entry into its
place, so every device it reports is the device `device_assignment` gives from the written
config; `main` re-checks that on the config it writes. The balance is therefore per device,
under one constraint of round-robin itself: within a worker and a layer, device counts differ by
at most one and the extra experts sit on the first-listed devices. Where that binds (a lone
worker with 3 devices and 8 experts per layer: 3/3/2 on every layer) the first devices carry up
to one expert per layer more than an unconstrained plan would, and the table shows it.

Method (deterministic): a greedy longest-processing-time pass (largest item first, to the
worker whose next round-robin device is least loaded; with a trace, only devices that stay
under the memory bound), then a descent that applies swaps and moves between devices while
they lower the sum of squared loads without raising the busiest device. Byte plans also try
block moves, block exchanges across two layers and chains of moves across layers, which a
worker with several devices needs to even out its first and last devices. With a trace, if
the greedy pass cannot meet the memory bound, the descent starts from the byte plan instead.

Heavy modules (torch, yaml, pydantic) are imported inside the functions that need them: `cli`
imports this module to build its parser for every command.
"""

from __future__ import annotations

import copy
import json
import math
import re
import shlex
import struct
import sys
import textwrap
from bisect import bisect_left, bisect_right
from collections import deque
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
_MAX_MOVES = 100_000  # per descent scope; the descent stops far earlier in practice
_Entries = tuple[list[float], list[tuple[int, int]]]  # a device's entry weights, sorted; owners
_EXCHANGE_BUDGET = 2_000_000  # block exchanges are tried only on plans smaller than this
_Chain = tuple[tuple[int, int, int], ...]  # transfers (layer, from worker, to worker)


# --- Command-line inputs -------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerSpec:
    """One `--worker ID=HOST:PORT@DEVICE,...`: its devices are its placement slots."""

    id: str
    address: str
    devices: tuple[str, ...]

    @property
    def spec(self) -> str:
        return f"{self.id}={self.address}@{','.join(self.devices)}"


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
            raise ConfigError(
                f"--worker {spec!r}: device {d!r} is not 'cpu', 'cuda' or 'cuda:N'; "
                f"expected {WORKER_SYNTAX}"
            )
    canonical = ["cuda:0" if d == "cuda" else d for d in devices]
    if len(set(canonical)) != len(canonical):
        raise ConfigError(f"--worker {spec!r}: a device is listed twice in {list(devices)}")
    return WorkerSpec(m["id"], m["address"], devices)


def parse_workers(specs: Sequence[str] | None) -> tuple[WorkerSpec, ...]:
    """Parse every `--worker`; ids and addresses must be distinct."""
    if not specs:
        raise ConfigError(f"--worker: give at least one, as {WORKER_SYNTAX}")
    workers = tuple(parse_worker(s) for s in specs)
    for attr in ("id", "address"):
        seen: set[str] = set()
        for w in workers:
            value = getattr(w, attr)
            if value in seen:
                raise ConfigError(f"--worker: {attr} {value!r} is given twice; expected distinct")
            seen.add(value)
    return workers


# --- Checkpoint sizes (headers only) -------------------------------------------------------


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


def _safetensors_header(path: Path) -> dict[str, Any]:
    """A safetensors file's JSON header: key -> {dtype, shape, data_offsets}."""
    try:
        with path.open("rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            return json.loads(f.read(n))
    except (OSError, struct.error, ValueError) as exc:
        raise ConfigError(f"--checkpoint: cannot read the header of {str(path)!r}: {exc}") from None


def read_expert_sizes(checkpoint: str | Path) -> ExpertSizes:
    """Bytes of every routed expert of every MoE layer, from config.json and the file headers."""
    from moe_serve.checkpoint import weight_map
    from moe_serve.families import read_layout

    path = Path(checkpoint).expanduser().resolve()
    if not path.is_dir():
        raise ConfigError(f"--checkpoint: {str(path)!r} is not a directory")
    try:
        layout = read_layout(path)
        files = weight_map(path)
    except ConfigError as exc:
        raise ConfigError(f"--checkpoint: {str(exc).removeprefix('model.checkpoint: ')}") from None
    model = layout.model
    layers, num = tuple(model["moe_layers"]), int(model["num_experts"])
    headers: dict[str, dict[str, Any]] = {}
    nbytes: dict[int, tuple[int, ...]] = {}
    for layer in layers:
        sizes = []
        for e in range(num):
            total = 0
            for key in layout.expert_keys(layer, e).values():
                if key not in files:
                    raise ConfigError(
                        f"--checkpoint: tensor {key!r} (layer {layer}, expert {e}) is missing "
                        f"from {str(path)!r}"
                    )
                file = files[key]
                if file not in headers:
                    headers[file] = _safetensors_header(path / file)
                start, end = headers[file][key]["data_offsets"]
                total += end - start
            sizes.append(total)
        nbytes[layer] = tuple(sizes)
    return ExpertSizes(path, layout.family, layers, num, int(model["top_k"]), nbytes)


# --- Routing traces ------------------------------------------------------------------------


def _counts(value: Any, num_experts: int, where: str) -> list[float]:
    """Pairs per expert from ids [T, K] (2-D integer tensor) or counts [E] (1-D / list / dict)."""
    import torch

    if isinstance(value, torch.Tensor):
        if value.dim() >= 2:
            if value.dtype.is_floating_point or value.dtype == torch.bool:
                raise ConfigError(f"{where}: expected integer expert ids [T, K], got {value.dtype}")
            ids = value.reshape(-1).long()
            ids = ids[ids >= 0]  # negative ids mark no expert
            if ids.numel() and int(ids.max()) >= num_experts:
                raise ConfigError(
                    f"{where}: expert id {int(ids.max())} is out of range; the checkpoint has "
                    f"{num_experts} experts"
                )
            return torch.bincount(ids, minlength=num_experts).double().tolist()
        if value.dim() != 1:
            raise ConfigError(
                f"{where}: expected expert ids [T, K] or counts [{num_experts}], "
                f"got shape {list(value.shape)}"
            )
        value = value.double().tolist()
    if isinstance(value, Mapping):
        out = [0.0] * num_experts
        for k, v in value.items():
            e = _int(k, f"{where}: expert")
            if not 0 <= e < num_experts:
                raise ConfigError(f"{where}: expert {e} is out of range 0..{num_experts - 1}")
            out[e] = float(v)
        value = out
    if not isinstance(value, list | tuple) or len(value) != num_experts:
        raise ConfigError(
            f"{where}: expected expert ids [T, K] or {num_experts} counts, got {_brief(value)}"
        )
    try:
        counts = [float(v) for v in value]
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: counts must be numbers, got {_brief(value)}") from None
    if any(c < 0 or not math.isfinite(c) for c in counts):
        raise ConfigError(f"{where}: counts must be finite and >= 0")
    return counts


def _int(v: Any, what: str) -> int:
    try:
        return int(v)
    except (TypeError, ValueError):
        raise ConfigError(f"{what} {v!r} is not an integer") from None


def _brief(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def load_trace(path: str | Path, sizes: ExpertSizes) -> dict[int, list[float]]:
    """Read a routing trace: layer -> token-expert pairs per expert (only the traced layers).

    Formats: a `torch.save` file of {layer: expert_ids [T, K] integer tensor} (what
    `record_trace` writes; a 1-D tensor [E] is read as counts), or a JSON file of
    {"layer": [count per expert]} (or {"layer": {"expert": count}}).
    """
    import torch

    p = Path(path)
    where = f"--trace {str(p)!r}"
    if not p.is_file():
        raise ConfigError(f"{where}: no such file")
    raw: Any = None
    if p.suffix.lower() != ".json":
        try:
            raw = torch.load(p, map_location="cpu", weights_only=True)
        except Exception:
            raw = None
    if raw is None:
        try:
            raw = json.loads(p.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(
                f"{where}: neither a torch.save file of {{layer: expert_ids [T, K]}} nor JSON of "
                f"{{layer: counts per expert}}: {exc}"
            ) from None
    if not isinstance(raw, Mapping) or not raw:
        raise ConfigError(
            f"{where}: expected a non-empty mapping {{layer: ...}}, got {_brief(raw)}"
        )
    out: dict[int, list[float]] = {}
    for key, value in raw.items():
        layer = _int(key, f"{where}: layer")
        if layer not in sizes.layers:
            raise ConfigError(
                f"{where}: layer {layer} is not a MoE layer of the checkpoint; its MoE layers: "
                f"{list(sizes.layers)}"
            )
        out[layer] = _counts(value, sizes.num_experts, f"{where}: layer {layer}")
    if sum(sum(c) for c in out.values()) <= 0:
        raise ConfigError(f"{where}: the trace holds no token-expert pairs")
    return dict(sorted(out.items()))


def record_trace(
    client: Any,
    inputs: Iterable[torch.Tensor] | Mapping[int, Iterable[torch.Tensor]],
    layers: Iterable[int],
    path: str | Path | None = None,
) -> dict[int, torch.Tensor]:
    """Record a routing trace from a running service; return pairs per expert per layer.

    Runs `client.infer(x, layer=l, return_routing=True)` for every input x [..., H] on every
    layer l (`inputs` may instead map each layer to its own inputs, e.g. hidden states captured
    at that layer), accumulates the routed pairs, and, if `path` is given, `torch.save`s
    {layer: expert_ids [T, K] int64} there: the trace format `moe-serve placement --trace` reads.
    """
    import torch

    per_layer = inputs if isinstance(inputs, Mapping) else None
    shared = None if per_layer is not None else list(inputs)
    ids: dict[int, torch.Tensor] = {}
    counts: dict[int, torch.Tensor] = {}
    for layer in layers:
        chunks: list[torch.Tensor] = []
        batches = per_layer[layer] if per_layer is not None else shared
        for x in batches or ():
            _, routing = client.infer(x, layer=layer, return_routing=True)
            e = routing.expert_ids.reshape(-1, routing.expert_ids.shape[-1]).to(torch.int64)
            chunks.append(e)
            num = routing.scores.shape[-1]
            got = torch.bincount(e[e >= 0], minlength=num)
            counts[layer] = counts[layer] + got if layer in counts else got
        if chunks:
            ids[layer] = torch.cat(chunks)
    if path is not None:
        torch.save(ids, Path(path))
    return counts


# --- The plan ------------------------------------------------------------------------------


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
    memory_cap: int | None  # trace plans: the bound every device's bytes stays under
    busiest_share: Mapping[int, float]  # layer -> busiest device's share of the layer's pairs

    def worker_experts(self, worker: str) -> list[int] | dict[int, list[int]]:
        """The `experts` value of the world config: a list if the same on every layer."""
        per_layer = self.experts[worker]
        lists = [list(per_layer[la]) for la in self.sizes.layers]
        if all(x == lists[0] for x in lists):
            return lists[0]
        return {la: list(per_layer[la]) for la in self.sizes.layers}

    def world(self, master_listen: str = DEFAULT_MASTER_LISTEN) -> dict[str, Any]:
        """The world config as a mapping (what `parse_config` takes)."""
        return {
            "model": {"checkpoint": str(self.sizes.checkpoint)},
            "master": {"listen": master_listen},
            "workers": [
                {
                    "id": w.id,
                    "address": w.address,
                    "devices": list(w.devices),
                    "experts": self.worker_experts(w.id),
                }
                for w in self.workers
            ],
        }

    def table(self) -> str:
        """Per device: experts, GB, expected token share; then the balance and the replicas."""
        basis = "trace" if self.traced_layers else "uniform routing"
        rows = [("worker", "device", "experts", "GB", f"token share ({basis})", "ids (layer:ids)")]
        for d in self.devices:
            ids = " ".join(f"{la}:{','.join(map(str, v))}" for la, v in d.experts.items() if v)
            rows.append(
                (
                    d.worker,
                    d.device,
                    str(d.num_experts),
                    f"{d.nbytes / 1e9:.4g}",
                    f"{100 * d.share:.1f}%",
                    ids if len(ids) <= 48 else ids[:45] + "...",
                )
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = [
            "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
        ]
        lines.extend(self.summary())
        return "\n".join(lines)

    def summary(self) -> list[str]:
        nb = [d.nbytes for d in self.devices]
        one = max(max(v) for v in self.sizes.nbytes.values())
        out = [
            f"bytes per device: max {max(nb) / 1e9:.4g} GB, min {min(nb) / 1e9:.4g} GB, "
            f"max-min {(max(nb) - min(nb)) / one:.2f} experts (one expert: {one / 1e9:.4g} GB)"
        ]
        if self.memory_cap is not None:
            out.append(
                f"memory cap: {self.memory_cap / 1e9:.4g} GB per device (byte-balanced max "
                f"{self.byte_balanced_max / 1e9:.4g} GB + tolerance)"
            )
        even = 100 / len(self.devices)
        shares = ", ".join(f"{la}: {100 * s:.1f}%" for la, s in self.busiest_share.items())
        out.append(f"busiest device per layer ({even:.1f}% is an even split): {shares}")
        if self.traced_layers and len(self.traced_layers) < len(self.sizes.layers):
            rest = [la for la in self.sizes.layers if la not in self.traced_layers]
            out.append(f"layers without trace (uniform routing assumed): {rest}")
        for la, reps in self.replicas.items():
            for e, ws in reps.items():
                out.append(f"replica: layer {la} expert {e} on {', '.join(ws)}")
        return out


# --- Search state --------------------------------------------------------------------------


class _State:
    """Each worker's ordered expert list per layer and the loads it implies.

    Position i of worker w's list is device `wdev[w][i % len(wdev[w])]`, as in
    `device_assignment`. B: bytes per device (all layers); T[layer]: pairs per device.
    """

    def __init__(
        self,
        workers: Sequence[WorkerSpec],
        sizes: ExpertSizes,
        tokens: Mapping[int, Sequence[float]],
        copies: Mapping[int, Sequence[int]],
    ) -> None:
        self.layers = sizes.layers
        self.wdev: list[list[int]] = []
        self.dev_worker: list[int] = []
        self.dev_slot: list[int] = []
        for w, spec in enumerate(workers):
            self.wdev.append(
                list(range(len(self.dev_worker), len(self.dev_worker) + len(spec.devices)))
            )
            self.dev_worker += [w] * len(spec.devices)
            self.dev_slot += list(range(len(spec.devices)))
        self.n_dev, self.n_workers = len(self.dev_worker), len(workers)
        self.copies = {la: list(copies[la]) for la in self.layers}
        self.nb = {la: [float(b) for b in sizes.nbytes[la]] for la in self.layers}
        self.tok = {
            la: [t / c for t, c in zip(tokens[la], copies[la], strict=True)] for la in self.layers
        }
        self.lists: dict[int, list[list[int]]] = {la: [[] for _ in workers] for la in self.layers}
        self.held: dict[int, list[set[int]]] = {la: [set() for _ in workers] for la in self.layers}
        self.B = [0.0] * self.n_dev
        self.T = {la: [0.0] * self.n_dev for la in self.layers}

    def device(self, w: int, i: int) -> int:
        return self.wdev[w][i % len(self.wdev[w])]

    def append(self, layer: int, w: int, e: int) -> None:
        d = self.device(w, len(self.lists[layer][w]))
        self.lists[layer][w].append(e)
        self.held[layer][w].add(e)
        self.B[d] += self.nb[layer][e]
        self.T[layer][d] += self.tok[layer][e]

    def clone(self) -> _State:
        new = copy.copy(self)
        new.lists = {la: [list(x) for x in v] for la, v in self.lists.items()}
        new.held = {la: [set(x) for x in v] for la, v in self.held.items()}
        new.B = list(self.B)
        new.T = {la: list(v) for la, v in self.T.items()}
        return new

    def adopt(self, other: _State) -> None:
        """Take `other`'s lists and loads, in place (callers may hold the load lists)."""
        self.B[:] = other.B
        for la in self.layers:
            self.T[la][:] = other.T[la]
            for w in range(self.n_workers):
                self.lists[la][w][:] = other.lists[la][w]
                self.held[la][w].clear()
                self.held[la][w].update(other.held[la][w])

    def load_lists(self, lists: Mapping[int, Sequence[Sequence[int]]]) -> None:
        for la in self.layers:
            for w, lst in enumerate(lists[la]):
                for e in lst:
                    self.append(la, w, e)


def _greedy(st: _State, by_bytes: bool, cap: float) -> bool:
    """Largest item first, to the worker whose next round-robin device is least loaded.

    by_bytes: least bytes (then fewest pairs of that layer); else: fewest pairs of that layer
    (then least bytes), among devices that stay within `cap` bytes. False if an item fits nowhere.
    """
    items = [
        (la, e) for la in st.layers for e in range(len(st.nb[la])) for _ in range(st.copies[la][e])
    ]
    if by_bytes:
        items.sort(key=lambda it: (-st.nb[it[0]][it[1]], it[0], it[1]))
    else:
        items.sort(key=lambda it: (-st.tok[it[0]][it[1]], -st.nb[it[0]][it[1]], it[0], it[1]))
    for la, e in items:
        b, t = st.nb[la][e], st.tok[la][e]
        best: tuple[tuple[float, float, int], int] | None = None
        for w in range(st.n_workers):
            if e in st.held[la][w]:
                continue
            d = st.device(w, len(st.lists[la][w]))
            if st.B[d] + b > cap:
                continue
            key = (
                (st.B[d] + b, st.T[la][d] + t, d) if by_bytes else (st.T[la][d] + t, st.B[d] + b, d)
            )
            if best is None or key < best[0]:
                best = (key, w)
        if best is None:
            return False
        st.append(la, best[1], e)
    return True


def _descend(st: _State, by_bytes: bool, cap: float) -> None:
    """Apply improving swaps and relocations until none is left.

    by_bytes: the loads are bytes per device over all layers; else: pairs per device, layer by
    layer, with bytes held under `cap`. A move is taken if it lowers the sum of squared loads
    and leaves no device it touches above the device it relieves.
    """
    scopes = [(st.layers, st.B)] if by_bytes else [((la,), st.T[la]) for la in st.layers]
    for layers, load in scopes:
        for _ in range(_MAX_MOVES):
            if not _improve_once(st, layers, load, by_bytes, cap):
                break


def _block_transfers(st: _State) -> bool:
    """Bytes plans: move the last m >= 2 entries of a layer's list to another worker.

    Within a worker of D devices, the first device's count minus the last's is the number of
    layers whose count is not a multiple of D; moving m entries at once (m up to the largest D)
    changes a count by a whole block where single moves would each unbalance the worker. Same
    acceptance rule as `_descend`. True if any was applied.
    """
    applied = False
    W, M = st.n_workers, max(len(d) for d in st.wdev)
    for la in st.layers:
        for a in range(W):
            for b in range(W):
                for m in range(2, M + 1):
                    if a != b and _accept(st.B, _transfer(st, la, a, b, m, st.nb[la])):
                        _apply_transfer(st, la, a, b, m)
                        applied = True
    if applied or W * W * len(st.layers) ** 2 * M * M > _EXCHANGE_BUDGET:
        return applied
    # Block exchanges: m1 entries a -> b on one layer, m2 entries b -> a on another.
    peak = max(st.B)
    hot = {st.dev_worker[d] for d in range(st.n_dev) if st.B[d] >= peak}
    for a in sorted(hot):
        for b in range(W):
            for l1 in st.layers:
                for l2 in st.layers:
                    if a == b or l1 == l2:
                        continue
                    for m1 in range(1, M + 1):
                        for m2 in range(1, M + 1):
                            t1 = _transfer(st, l1, a, b, m1, st.nb[l1])
                            t2 = _transfer(st, l2, b, a, m2, st.nb[l2])
                            if t1 and t2 and _accept(st.B, [*t1, *t2]):
                                _apply_transfer(st, l1, a, b, m1)
                                _apply_transfer(st, l2, b, a, m2)
                                return True
    return False


def _augment(st: _State, tries: int = 8) -> bool:
    """Bytes plans: relieve a busiest device through a chain of single-entry transfers.

    Edge X -> Y: the last entry of worker a's list on some layer sits on X and would land on Y
    as worker b's next entry. A chain of such transfers on different layers moves an entry's
    bytes from its first device to its last, leaving the devices in between as they were: what
    a single move cannot do when the busiest device's worker has no layer ending on it. Search
    breadth-first from the busiest devices; keep the first chain that, tried on a copy, lowers
    the sum of squares without raising the busiest device.
    """
    edges: dict[int, list[tuple[int, int, int, int]]] = {}
    for la in st.layers:
        for a in range(st.n_workers):
            lst = st.lists[la][a]
            if not lst:
                continue
            x = st.device(a, len(lst) - 1)
            for b in range(st.n_workers):
                if b != a and lst[-1] not in st.held[la][b]:
                    y = st.device(b, len(st.lists[la][b]))
                    edges.setdefault(x, []).append((la, a, b, y))
    peak = max(st.B)
    # Breadth-first over (device, path): a path never touches a worker's list on a layer twice,
    # so the edges computed above stay exact along it. Nodes: (device, layer arrived by).
    queue: deque[tuple[int, _Chain]] = deque((d, ()) for d in range(st.n_dev) if st.B[d] >= peak)
    seen: set[tuple[int, int]] = set()
    ends: list[_Chain] = []
    while queue and len(ends) < tries:
        x, path = queue.popleft()
        used = {(la, w) for la, a, b in path for w in (a, b)}
        for la, a, b, y in edges.get(x, ()):
            if (y, la) in seen or (la, a) in used or (la, b) in used or len(path) >= 6:
                continue
            seen.add((y, la))
            longer = (*path, (la, a, b))
            queue.append((y, longer))
            if st.B[y] + st.nb[la][st.lists[la][a][-1]] < peak:
                ends.append(longer)
    for path in ends:
        trial = st.clone()
        for la, a, b in path:
            if _transfer(trial, la, a, b, 1, trial.nb[la]) is None:
                break
            _apply_transfer(trial, la, a, b, 1)
        else:
            if max(trial.B) <= peak and _ssq(trial.B) < _ssq(st.B) - 1e-9 * (1.0 + peak) ** 2:
                st.adopt(trial)
                return True
    return False


def _ssq(values: Iterable[float]) -> float:
    return sum(x * x for x in values)


def _transfer(
    st: _State, la: int, a: int, b: int, m: int, weight: Sequence[float]
) -> list[tuple[int, float]] | None:
    """Load changes of moving the last m entries of worker a's list to the end of b's."""
    src, dst = st.lists[la][a], st.lists[la][b]
    if m > len(src) or any(e in st.held[la][b] for e in src[len(src) - m :]):
        return None
    out = []
    for j, e in enumerate(src[len(src) - m :]):
        out.append((st.device(a, len(src) - m + j), -weight[e]))
        out.append((st.device(b, len(dst) + j), weight[e]))
    return out


def _apply_transfer(st: _State, la: int, a: int, b: int, m: int) -> None:
    src = st.lists[la][a]
    moved = src[len(src) - m :]
    for vec, wt in ((st.B, st.nb[la]), (st.T[la], st.tok[la])):
        for d, x in _merge(_transfer(st, la, a, b, m, wt) or ()).items():
            vec[d] += x
    del src[len(src) - m :]
    st.lists[la][b].extend(moved)
    st.held[la][a].difference_update(moved)
    st.held[la][b].update(moved)


def _accept(load: Sequence[float], moves: Sequence[tuple[int, float]] | None) -> bool:
    """A move lowers the sum of squared loads and lifts no device above the busiest one."""
    if not moves:
        return False
    delta = _merge(moves)
    peak = max(load)
    if any(load[d] + x > peak for d, x in delta.items() if x > 0):
        return False
    gain = sum((load[d] + x) ** 2 - load[d] ** 2 for d, x in delta.items())
    return gain < -1e-9 * (1.0 + peak) ** 2


def _improve_once(
    st: _State, layers: Sequence[int], load: list[float], by_bytes: bool, cap: float
) -> bool:
    """Apply the best move that relieves the busiest device that can be relieved."""
    order = sorted(range(st.n_dev), key=lambda d: (-load[d], d))
    eps = 1e-9 * (1.0 + load[order[0]]) ** 2
    index: dict[int, list[_Entries]] = {}
    for d1 in order:
        top = load[d1]
        w, k = st.dev_worker[d1], st.dev_slot[d1]
        lighter = [d for d in reversed(order) if load[d] < top]
        best: tuple[float, Any] | None = None
        for la in layers:
            weight = st.nb[la] if by_bytes else st.tok[la]
            if la not in index:
                index[la] = _device_index(st, la, weight)
            for i in range(k, len(st.lists[la][w]), len(st.wdev[w])):
                for found in (
                    _best_relocation(st, la, w, i, load, weight, by_bytes, cap, top, eps),
                    _best_swap(st, la, w, i, lighter, index[la], load, weight, by_bytes, cap, eps),
                ):
                    if found is not None and (best is None or found[0] < best[0]):
                        best = found
        if best is not None:
            best[1]()
            return True
    return False


def _device_index(st: _State, la: int, weight: Sequence[float]) -> list[_Entries]:
    """Per device: its entries on layer la as (weights sorted, (worker, position) in that order)."""
    rows: list[list[tuple[float, int, int]]] = [[] for _ in range(st.n_dev)]
    for w, lst in enumerate(st.lists[la]):
        for j, e in enumerate(lst):
            rows[st.device(w, j)].append((weight[e], w, j))
    out = []
    for row in rows:
        row.sort()
        out.append(([x[0] for x in row], [(x[1], x[2]) for x in row]))
    return out


def _best_relocation(
    st: _State,
    la: int,
    w: int,
    i: int,
    load: list[float],
    weight: list[float],
    by_bytes: bool,
    cap: float,
    top: float,
    eps: float,
) -> tuple[float, Any] | None:
    """Best move of the entry at position i of worker w to another worker's next device.

    The list's last entry takes position i, so the worker's round-robin shape is kept.
    """
    e = st.lists[la][w][i]
    removal = _removal(st, la, w, i, weight)
    removal_bytes = _removal(st, la, w, i, st.nb[la])
    best: tuple[float, int] | None = None
    for b in range(st.n_workers):
        if b == w or e in st.held[la][b]:
            continue
        db = st.device(b, len(st.lists[la][b]))
        delta = _merge([*removal, (db, weight[e])])
        if any(load[d] + x > top for d, x in delta.items() if x > 0):
            continue
        gain = sum((load[d] + x) ** 2 - load[d] ** 2 for d, x in delta.items())
        if gain >= -eps or (best is not None and gain >= best[0]):
            continue
        if not by_bytes:
            mem = _merge([*removal_bytes, (db, st.nb[la][e])])
            if any(st.B[d] + x > cap for d, x in mem.items() if x > 0):
                continue
        best = (gain, b)
    if best is None:
        return None
    b = best[1]

    def apply() -> None:
        lst = st.lists[la][w]
        for vec, wt in ((st.B, st.nb[la]), (st.T[la], st.tok[la])):
            for d, x in _merge(_removal(st, la, w, i, wt)).items():
                vec[d] += x
        lst[i] = lst[-1]
        lst.pop()
        st.held[la][w].discard(e)
        st.append(la, b, e)

    return best[0], apply


def _removal(
    st: _State, la: int, w: int, i: int, weight: Sequence[float]
) -> list[tuple[int, float]]:
    """Load changes of taking position i out of worker w's list (its last entry fills the gap)."""
    lst = st.lists[la][w]
    last = len(lst) - 1
    out = [(st.device(w, i), -weight[lst[i]])]
    if i != last:
        el = lst[last]
        out += [(st.device(w, i), weight[el]), (st.device(w, last), -weight[el])]
    return out


def _best_swap(
    st: _State,
    la: int,
    w: int,
    i: int,
    lighter: Sequence[int],
    index: Sequence[_Entries],
    load: list[float],
    weight: list[float],
    by_bytes: bool,
    cap: float,
    eps: float,
) -> tuple[float, Any] | None:
    """Best swap of the entry at position i of worker w with one on a lighter device.

    Moving weight x from the lighter device d2 to d1 (x < 0) lowers the sum of squares by
    -2x(gap + x), gap = load[d1] - load[d2], best at x = -gap/2: found by bisection in d2's
    sorted entries, then outwards past entries that the copies or memory rule excludes.
    """
    lst = st.lists[la][w]
    e, d1 = lst[i], st.device(w, i)
    te, nb = weight[e], st.nb[la]
    best: tuple[float, int, int] | None = None
    for d2 in lighter:
        keys, entries = index[d2]
        if not keys or keys[0] >= te:
            continue
        gap = load[d1] - load[d2]
        lo, hi = bisect_right(keys, te - gap), bisect_left(keys, te)
        mid = min(max(bisect_left(keys, te - gap / 2), lo), hi)
        left, right = mid - 1, mid
        while left >= lo or right < hi:
            # Take the nearer of the two frontier entries to the optimum te - gap/2.
            if right < hi and (
                left < lo or keys[right] - (te - gap / 2) <= (te - gap / 2) - keys[left]
            ):
                pick, right = right, right + 1
            else:
                pick, left = left, left - 1
            w2, j = entries[pick]
            f = st.lists[la][w2][j]
            x = weight[f] - te
            gain = 2 * x * (gap + x)
            if gain >= -eps or (best is not None and gain >= best[0]):
                break  # farther entries only gain less
            if w2 != w and (f in st.held[la][w] or e in st.held[la][w2]):
                continue
            if not by_bytes:
                xb = nb[f] - nb[e]
                if st.B[d1] + xb > cap or st.B[d2] - xb > cap:
                    continue
            best = (gain, w2, j)
            break
    if best is None:
        return None
    _, w2, j = best

    def apply() -> None:
        lst2 = st.lists[la][w2]
        f, d2 = lst2[j], st.device(w2, j)
        st.B[d1] += nb[f] - nb[e]
        st.B[d2] += nb[e] - nb[f]
        tok = st.tok[la]
        st.T[la][d1] += tok[f] - tok[e]
        st.T[la][d2] += tok[e] - tok[f]
        lst[i], lst2[j] = f, e
        if w2 != w:
            st.held[la][w].discard(e)
            st.held[la][w].add(f)
            st.held[la][w2].discard(f)
            st.held[la][w2].add(e)

    return best[0], apply


def _merge(moves: Iterable[tuple[int, float]]) -> dict[int, float]:
    out: dict[int, float] = {}
    for d, x in moves:
        out[d] = out.get(d, 0.0) + x
    return out


def _replica_copies(
    tokens: Mapping[int, Sequence[float]], traced: Sequence[int], extra: int, n_workers: int
) -> dict[int, list[int]]:
    """Copies per expert: 1, plus `extra` per traced layer, each to the expert whose copies
    would carry the most pairs (so a very hot expert can get several), at most one per worker."""
    copies = {la: [1] * len(t) for la, t in tokens.items()}
    for la in traced:
        c, t = copies[la], tokens[la]
        room = len(c) * (n_workers - 1)
        if extra > room:
            raise ConfigError(
                f"--replicas: {extra} extra copies per layer do not fit; {n_workers} workers hold "
                f"at most {room} extra copies of {len(c)} experts"
            )
        for _ in range(extra):
            e = max((e for e in range(len(c)) if c[e] < n_workers), key=lambda e: t[e] / c[e])
            c[e] += 1
    return copies


def plan_placement(
    sizes: ExpertSizes,
    workers: Sequence[WorkerSpec],
    trace: Mapping[int, Sequence[float]] | None = None,
    replicas: int = 0,
    memory_tolerance: float = DEFAULT_MEMORY_TOLERANCE,
) -> Plan:
    """Plan a placement of every routed expert of `sizes` on the devices of `workers`.

    Without `trace`: balance bytes per device. With `trace` (layer -> pairs per expert, from
    `load_trace`): balance pairs per device within each layer, with every device's bytes at most
    (1 + memory_tolerance) x the byte-balanced plan's busiest device, and `replicas` extra copies
    per traced layer of the hottest experts (the master is assumed to split an expert's pairs
    evenly over its copies).
    """
    workers = tuple(workers)
    if not workers:
        raise ConfigError(f"--worker: give at least one, as {WORKER_SYNTAX}")
    if replicas < 0:
        raise ConfigError(f"--replicas: expected an integer >= 0, got {replicas}")
    if replicas and trace is None:
        raise ConfigError("--replicas: needs --trace to know which experts are hottest")
    if replicas and len(workers) < 2:
        raise ConfigError("--replicas: needs at least two workers (a replica is on another one)")
    if not memory_tolerance >= 0:
        raise ConfigError(f"--memory-tolerance: expected a fraction >= 0, got {memory_tolerance}")
    E = sizes.num_experts
    uniform = {la: [1.0] * E for la in sizes.layers}
    traced = tuple(la for la in sizes.layers if trace and la in trace)
    tokens: dict[int, list[float]] = dict(uniform)
    if traced:
        assert trace is not None
        mean = sum(sum(trace[la]) for la in traced) / len(traced)
        for la in sizes.layers:
            tokens[la] = [float(x) for x in trace[la]] if la in traced else [mean / E] * E
    copies = _replica_copies(tokens, traced, replicas, len(workers))

    by_bytes = _State(workers, sizes, uniform, copies)
    _greedy(by_bytes, by_bytes=True, cap=math.inf)
    _descend(by_bytes, by_bytes=True, cap=math.inf)
    while _block_transfers(by_bytes) or _augment(by_bytes):
        _descend(by_bytes, by_bytes=True, cap=math.inf)
    byte_max = int(max(by_bytes.B))
    if not traced:
        return _finish(by_bytes, sizes, workers, (), byte_max, None)

    cap = int(byte_max * (1 + memory_tolerance))
    st = _State(workers, sizes, tokens, copies)
    if not _greedy(st, by_bytes=False, cap=cap):
        # The token greedy ran out of memory somewhere: start from the byte plan (which fits).
        st = _State(workers, sizes, tokens, copies)
        st.load_lists(by_bytes.lists)
    _descend(st, by_bytes=False, cap=cap)
    return _finish(st, sizes, workers, traced, byte_max, cap)


def _finish(
    st: _State,
    sizes: ExpertSizes,
    workers: Sequence[WorkerSpec],
    traced: tuple[int, ...],
    byte_max: int,
    cap: int | None,
) -> Plan:
    layers = sizes.layers
    total = sum(sum(t) for t in st.T.values()) or 1.0
    devices = []
    for d in range(st.n_dev):
        w, k = st.dev_worker[d], st.dev_slot[d]
        step = len(st.wdev[w])
        tokens = sum(st.T[la][d] for la in layers)
        devices.append(
            DevicePlan(
                worker=workers[w].id,
                device=workers[w].devices[k],
                experts={la: tuple(st.lists[la][w][k::step]) for la in layers},
                nbytes=int(st.B[d]),
                tokens=tokens,
                share=tokens / total,
            )
        )
    replicas: dict[int, dict[int, tuple[str, ...]]] = {}
    for la in layers:
        for e in range(sizes.num_experts):
            holders = tuple(workers[w].id for w in range(len(workers)) if e in st.held[la][w])
            if len(holders) > 1:
                replicas.setdefault(la, {})[e] = holders
    busiest = {la: max(st.T[la]) / (sum(st.T[la]) or 1.0) for la in layers}
    return Plan(
        sizes=sizes,
        workers=tuple(workers),
        experts={
            workers[w].id: {la: tuple(st.lists[la][w]) for la in layers}
            for w in range(len(workers))
        },
        devices=tuple(devices),
        replicas=replicas,
        traced_layers=traced,
        byte_balanced_max=byte_max,
        memory_cap=cap,
        busiest_share=busiest,
    )


# --- Output --------------------------------------------------------------------------------


def render_yaml(plan: Plan, master_listen: str = DEFAULT_MASTER_LISTEN, command: str = "") -> str:
    """The world config YAML, headed by comments saying how it was made."""
    import yaml

    s = plan.sizes
    one = max(max(v) for v in s.nbytes.values())
    if plan.traced_layers:
        how = (
            f"expected token-expert pairs per device, balanced within each layer, from a "
            f"routing trace (layers {list(plan.traced_layers)}); every device's bytes <= "
            f"{plan.memory_cap / 1e9:.4g} GB (the byte-balanced plan's busiest device, "
            f"{plan.byte_balanced_max / 1e9:.4g} GB, plus the memory tolerance)."
        )
    else:
        how = "expert bytes balanced per device (no routing trace)."
    wrap = textwrap.TextWrapper(width=98, initial_indent="# ", subsequent_indent="#   ")
    header = [
        "# World config written by `moe-serve placement` (moe_serve.planner):",
        *([f"#   {command}"] if command else []),
        *wrap.wrap(
            f"Checkpoint: {s.family}, MoE layers {list(s.layers)}, {s.num_experts} experts each, "
            f"{one / 1e6:.4g} MB per expert (from the safetensors headers)."
        ),
        *wrap.wrap(f"Objective: {how}"),
        "# Each worker's experts are listed so that its round-robin device assignment (the i-th",
        "# expert of a layer on devices[i % len(devices)]) puts every expert on the device",
        "# planned; reordering a list moves experts between devices. An expert on two workers",
        "# is a replica.",
        "#",
        *[f"# {line}".rstrip() for line in plan.table().splitlines()],
    ]

    class _Dumper(yaml.SafeDumper):  # block mappings, one-line lists of ids
        pass

    def ids_inline(dumper: yaml.SafeDumper, v: list[Any]) -> yaml.Node:
        flat = not any(isinstance(x, list | dict) for x in v)
        return dumper.represent_sequence("tag:yaml.org,2002:seq", v, flow_style=flat)

    _Dumper.add_representer(list, ids_inline)
    body = yaml.dump(plan.world(master_listen), Dumper=_Dumper, sort_keys=False)
    return "\n".join(header) + "\n" + body


def check_round_robin(plan: Plan, world: Mapping[str, Any], base: Path | None = None) -> None:
    """Validate `world` with parse_config and check device_assignment lands as `plan` says."""
    from moe_serve.config import parse_config
    from moe_serve.placement import device_assignment

    cfg = parse_config(world, "<placement>", base=base)
    by_slot = {(d.worker, d.device): d for d in plan.devices}
    for w in cfg.workers:
        for la in cfg.model.moe_layers:
            for device, got in zip(w.devices, device_assignment(w, la), strict=True):
                want = list(by_slot[(w.id, device)].experts.get(la, ()))
                if got != want:
                    raise AssertionError(
                        f"round-robin puts {got} on {w.id} {device} layer {la}; planned {want}"
                    )


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The `moe-serve placement` arguments."""
    p.add_argument("--checkpoint", required=True, help="Hugging Face checkpoint directory")
    p.add_argument(
        "--worker",
        action="append",
        required=True,
        metavar="ID=HOST:PORT@DEVICES",
        help="a worker and its devices, e.g. w0=10.0.0.11:50061@cuda:0,cuda:1 (repeat per worker)",
    )
    p.add_argument(
        "--trace",
        help="routing trace: torch.save {layer: expert_ids [T,K]} or JSON {layer: counts}",
    )
    p.add_argument(
        "--replicas",
        type=int,
        default=0,
        help="extra copies of the hottest experts per traced layer (needs --trace; default 0)",
    )
    p.add_argument(
        "--memory-tolerance",
        type=float,
        default=DEFAULT_MEMORY_TOLERANCE,
        help="with --trace: bytes per device may exceed the byte-balanced maximum by this "
        f"fraction (default {DEFAULT_MEMORY_TOLERANCE})",
    )
    p.add_argument(
        "--master-listen",
        default=DEFAULT_MASTER_LISTEN,
        help=f"master.listen of the world config (default {DEFAULT_MASTER_LISTEN})",
    )
    p.add_argument("--out", help="write the world config here (default: stdout, table on stderr)")


def _command(args: argparse.Namespace) -> str:
    parts = ["moe-serve", "placement", "--checkpoint", str(args.checkpoint)]
    for w in args.worker:
        parts += ["--worker", w]
    if args.trace:
        parts += ["--trace", str(args.trace)]
    if args.replicas:
        parts += ["--replicas", str(args.replicas)]
    if args.trace and args.memory_tolerance != DEFAULT_MEMORY_TOLERANCE:
        parts += ["--memory-tolerance", str(args.memory_tolerance)]
    if args.master_listen != DEFAULT_MASTER_LISTEN:
        parts += ["--master-listen", args.master_listen]
    if args.out:
        parts += ["--out", str(args.out)]
    return shlex.join(parts)


def main(args: argparse.Namespace) -> int:
    """`moe-serve placement`: plan, print the table, write the world config."""
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
    if args.out:
        out = Path(args.out)
        try:
            out.write_text(text)
        except OSError as exc:
            raise ConfigError(f"--out: cannot write {str(out)!r}: {exc.strerror}") from None
        print(plan.table())
        print(f"wrote {out}")
    else:
        sys.stdout.write(text)
        print(plan.table(), file=sys.stderr)
    return 0
