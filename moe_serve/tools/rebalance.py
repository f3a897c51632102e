"""Re-place experts by the load a running master observed: `moe-serve rebalance`.

1. Scrape `moe_serve_expert_tokens_total{layer,expert}` from the master's exporter: the
   token-expert pairs it kept per expert since it started. The gate decides them before any
   placement, so counts observed under one placement are the load of every other.
2. Plan with the offline planner (`plan_placement`): the config's workers and devices, expert
   sizes from the checkpoint's headers (or the synthetic model's dims), the counts as the
   trace, `--replicas` extra copies of each layer's hottest experts.
3. Report pairs per worker and balancedness (mean / max pairs per worker) before and after.
4. Write the config with only `workers[].experts` changed, and apply it as `moe-serve reload`
   does (or only write it: `--out`; or neither: `--dry-run`).

`balancedness`, `worker_pairs` and `rebalance_plan` are the pieces the chaos benchmark and
the tests call without a command line.
"""

from __future__ import annotations

import copy
import http.client
import math
import os
import shutil
import sys
import textwrap
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moe_serve.errors import ConfigError
from moe_serve.tools.planner import (
    ExpertSizes,
    Plan,
    WorkerSpec,
    check_round_robin,
    plan_placement,
    read_expert_sizes,
)

if TYPE_CHECKING:
    import argparse

    from moe_serve.config import WorldConfig

SERIES = "moe_serve_expert_tokens_total"  # the sample name; its family drops "_total"
SCRAPE_TIMEOUT_S = 10.0
# A scrape larger than this is refused unread: the series of 64 layers x 256 experts take
# ~1.5 MB, and a whole master's page a few more.
MAX_SCRAPE_BYTES = 32 << 20
# How long `reload_servers` waits for each server (cli.py's rebalance has no --timeout; this
# is `moe-serve reload`'s default).
RELOAD_TIMEOUT_S = 120.0

Counts = dict[int, list[float]]  # layer -> token-expert pairs per expert
Holdings = Mapping[str, Mapping[int, Sequence[int]]]  # worker -> layer -> expert ids


# ----------------------------------------------------------------------- observed load ---


def metrics_urls(value: str) -> list[str]:
    """The /metrics URL of each master in `--metrics`: comma-separated `http(s)://HOST:PORT`,
    with or without the `/metrics` path (a bare `HOST:PORT` is taken as http)."""
    urls = []
    for part in (p.strip() for p in value.split(",")):
        url = part if "://" in part else f"http://{part}"
        u = urllib.parse.urlsplit(url)
        if u.scheme not in ("http", "https") or not u.netloc or u.query or u.fragment:
            raise ConfigError(
                f"--metrics: expected http://HOST:PORT[/metrics] (comma-separated for several "
                f"masters), got {part!r}"
            )
        path = u.path.rstrip("/")
        path = path if path.endswith("/metrics") else f"{path}/metrics"
        urls.append(urllib.parse.urlunsplit((u.scheme, u.netloc, path, "", "")))
    return urls


def scrape(url: str, timeout_s: float = SCRAPE_TIMEOUT_S) -> str:
    """GET `url` (no HTTP proxy: exporters sit beside the servers); ConfigError naming
    `--metrics` when it cannot be read or is larger than MAX_SCRAPE_BYTES."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout_s) as reply:
            body = reply.read(MAX_SCRAPE_BYTES + 1)
    except (OSError, ValueError, http.client.HTTPException) as exc:
        why = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        raise ConfigError(
            f"--metrics: cannot read {url}: {why}; expected the master's Prometheus exporter "
            f"(master.metrics_port, e.g. http://10.0.0.10:9400)"
        ) from None
    if len(body) > MAX_SCRAPE_BYTES:
        raise ConfigError(f"--metrics: {url} sent more than {MAX_SCRAPE_BYTES} bytes")
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"--metrics: {url} did not send UTF-8 text") from None


def parse_expert_tokens(
    text: str, num_experts: int, layers: Sequence[int], where: str = "--metrics"
) -> tuple[Counts, list[int]]:
    """Pairs per expert of each layer in `layers` that has samples of SERIES in `text` (the
    Prometheus text format), and the other layers that had samples (skipped).

    Every value is checked: labels `layer` and `expert` decimal integers, experts below
    `num_experts`, counts finite and >= 0; anything else is a ConfigError naming `where`.
    """
    from prometheus_client.parser import text_string_to_metric_families

    counts: Counts = {}
    skipped: set[int] = set()
    try:
        samples = [s for f in text_string_to_metric_families(text) for s in f.samples]
    except (ValueError, TypeError, IndexError) as exc:
        raise ConfigError(f"{where}: not the Prometheus text format: {exc}") from None
    for s in samples:
        if s.name != SERIES:
            continue
        try:
            layer, expert = int(s.labels["layer"]), int(s.labels["expert"])
        except (KeyError, ValueError):
            raise ConfigError(
                f"{where}: {SERIES} sample with labels {dict(s.labels)!r:.120}; expected "
                f"integer `layer` and `expert` labels"
            ) from None
        if not 0 <= expert < num_experts:
            raise ConfigError(
                f"{where}: {SERIES} names expert {expert} of layer {layer}; the config's model "
                f"has {num_experts} experts (is --config the world this master serves?)"
            )
        if not (math.isfinite(s.value) and s.value >= 0):
            raise ConfigError(f"{where}: {SERIES} of layer {layer} expert {expert}: {s.value}")
        if layer not in layers:
            skipped.add(layer)
            continue
        counts.setdefault(layer, [0.0] * num_experts)[expert] += s.value
    return dict(sorted(counts.items())), sorted(skipped)


def read_counts(metrics: str, cfg: WorldConfig) -> tuple[Counts, list[int]]:
    """Scrape every master of `metrics` (`metrics_urls`) and sum their pairs per expert;
    also the layers observed that `cfg` does not serve. ConfigError naming `--metrics` when
    a master cannot be read or none has a sample of SERIES for a layer of `cfg`."""
    m = cfg.model
    total: Counts = {}
    skipped: set[int] = set()
    urls = metrics_urls(metrics)
    for url in urls:
        counts, other = parse_expert_tokens(scrape(url), m.num_experts, m.moe_layers, url)
        skipped.update(other)
        for layer, c in counts.items():
            total[layer] = [a + b for a, b in zip(total.get(layer, [0.0] * len(c)), c, strict=True)]
    if not any(map(sum, total.values())):
        raise ConfigError(
            f"--metrics: {', '.join(urls)} has no {SERIES}{{layer,expert}} samples for layers "
            f"{list(m.moe_layers)}; expected a master of this world that has served requests"
        )
    return dict(sorted(total.items())), sorted(skipped)


# ------------------------------------------------------------------------ balancedness ---


def balancedness(pairs: Sequence[float]) -> float:
    """Mean / max of the pairs per worker: 1.0 is an even split; 1/len(pairs) is all the load
    on one worker. No load at all counts as even (1.0)."""
    if not pairs:
        raise ValueError("balancedness: expected the pairs of at least one worker")
    peak = max(pairs)
    return 1.0 if peak <= 0 else sum(pairs) / len(pairs) / peak


def worker_pairs(holdings: Holdings, counts: Mapping[int, Sequence[float]]) -> dict[str, float]:
    """Pairs each worker computes, summed over the layers of `counts`: an expert held by n
    workers gives each 1/n of its pairs, as the master's spreading by tokens in flight does on
    average. Layers a worker does not list hold nothing there."""
    holders: dict[tuple[int, int], int] = {}
    for layers in holdings.values():
        for layer, ids in layers.items():
            for e in ids:
                holders[(layer, e)] = holders.get((layer, e), 0) + 1
    return {
        w: sum(
            counts[layer][e] / holders[(layer, e)]
            for layer, ids in layers.items()
            if layer in counts
            for e in ids
        )
        for w, layers in holdings.items()
    }


def holdings_of(cfg: WorldConfig) -> dict[str, dict[int, tuple[int, ...]]]:
    """Each worker's experts per MoE layer in `cfg`."""
    return {w.id: {la: w.experts_on(la) for la in cfg.model.moe_layers} for w in cfg.workers}


# -------------------------------------------------------------------------------- plan ---


def expert_sizes(cfg: WorldConfig) -> ExpertSizes:
    """Bytes of every routed expert on the layers `cfg` serves: from the checkpoint's
    safetensors headers with `model.checkpoint`, else from the synthetic model's dims."""
    m = cfg.model
    if m.checkpoint is not None:
        try:
            full = read_expert_sizes(m.checkpoint)
        except ConfigError as exc:
            why = str(exc).removeprefix("--checkpoint: ")
            raise ConfigError(f"model.checkpoint: {why}") from None
        nbytes = {la: full.nbytes[la] for la in m.moe_layers}
        return ExpertSizes(
            full.checkpoint, full.family, m.moe_layers, m.num_experts, m.top_k, nbytes
        )
    from moe_serve.dtypes import DTYPE_NAMES

    H, F, item = m.hidden_size, m.expert_ffn_size, DTYPE_NAMES[m.dtype].itemsize
    # The shapes SyntheticWeights builds: mlp fc1 [F,H] + b1 [F], fc2 [H,F] + b2 [H]; glu
    # gate, up [F,H] and down [H,F].
    params = 2 * F * H + F + H if m.expert_kind == "mlp" else 3 * F * H
    nbytes = {la: (params * item,) * m.num_experts for la in m.moe_layers}
    return ExpertSizes(
        Path("<synthetic>"), "synthetic", m.moe_layers, m.num_experts, m.top_k, nbytes
    )


def _check_counts(cfg: WorldConfig, counts: Mapping[int, Sequence[float]]) -> Counts:
    m = cfg.model
    out: Counts = {}
    for layer, c in counts.items():
        if layer not in m.moe_layers or len(c) != m.num_experts:
            raise ConfigError(
                f"counts: layer {layer} with {len(c)} counts; expected a layer of "
                f"{list(m.moe_layers)} with {m.num_experts}"
            )
        if not all(math.isfinite(v) and v >= 0 for v in c):
            raise ConfigError(f"counts: layer {layer}: expected finite counts >= 0")
        out[layer] = [float(v) for v in c]
    if not any(map(sum, out.values())):
        raise ConfigError("counts: no token-expert pairs observed")
    return dict(sorted(out.items()))


def _table(
    cfg: WorldConfig,
    plan: Plan,
    before: Mapping[str, float],
    after: Mapping[str, float],
    old: Holdings,
) -> str:
    """Per worker: pairs and share before and after, experts held, added and dropped."""
    total_b, total_a = sum(before.values()) or 1.0, sum(after.values()) or 1.0
    rows = [
        (
            "worker",
            "devices",
            "pairs before",
            "share",
            "pairs after",
            "share",
            "experts",
            "added",
            "dropped",
        )
    ]
    for w in cfg.workers:
        new = {(la, e) for la, ids in plan.experts[w.id].items() for e in ids}
        was = {(la, e) for la, ids in old[w.id].items() for e in ids}
        rows.append(
            (
                w.id,
                str(len(w.devices)),
                f"{before[w.id]:.0f}",
                f"{100 * before[w.id] / total_b:.1f}%",
                f"{after[w.id]:.0f}",
                f"{100 * after[w.id] / total_a:.1f}%",
                str(len(new)),
                str(len(new - was)),
                str(len(was - new)),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(n) for c, n in zip(r, widths, strict=True)).rstrip() for r in rows]
    for la, reps in plan.replicas.items():
        lines += [f"replica: layer {la} expert {e} on {', '.join(ws)}" for e, ws in reps.items()]
    untraced = [la for la in cfg.model.moe_layers if la not in plan.traced_layers]
    if untraced:
        lines.append(f"layers without samples (planned from the others' mean): {untraced}")
    return "\n".join(lines)


def rebalance_plan(
    cfg: WorldConfig,
    counts: Mapping[int, Sequence[float]],
    replicas: int = 1,
    raw: Mapping[str, Any] | None = None,
    base: Path | None = None,
) -> tuple[dict[str, Any], float, float, str]:
    """Plan `cfg`'s experts afresh from the observed `counts` (layer -> pairs per expert).

    Returns (the new world config as a mapping, balancedness before, after, the report
    table). The mapping is `raw` (the YAML file as read; `base` its directory, against
    which its relative paths resolve), or `cfg` dumped, with only `workers[].experts`
    replaced: a flat list where a worker's experts are the same on every layer, else
    {layer: [experts]}. It validates as a world config and puts every expert on the device
    the plan chose (`check_round_robin`, where a worker's devices are distinct).
    `replicas`: extra copies of each observed layer's hottest experts (needs 2+ workers).
    """
    trace = _check_counts(cfg, counts)
    if replicas < 0:
        raise ConfigError(f"--replicas: expected an integer >= 0, got {replicas}")
    if replicas and len(cfg.workers) < 2:
        raise ConfigError(
            f"--replicas: {replicas} extra copies need a second worker; this world has one "
            "(use --replicas 0)"
        )
    workers = [WorkerSpec(w.id, w.address, w.devices) for w in cfg.workers]
    plan = plan_placement(expert_sizes(cfg), workers, trace, replicas)
    if raw is None:
        experts = {"workers": {"__all__": {"experts"}}}  # replaced below
        world: dict[str, Any] = cfg.model_dump(mode="json", exclude_unset=True, exclude=experts)
    else:
        world = copy.deepcopy(dict(raw))
        world["workers"] = [dict(w) for w in world["workers"]]
    for entry, w in zip(world["workers"], cfg.workers, strict=True):
        entry["experts"] = plan.worker_experts(w.id)
    if all(len(set(w.devices)) == len(w.devices) for w in cfg.workers):
        check_round_robin(plan, world, base)  # validates, and checks each expert's device
    else:  # a worker's slots named alike ("cpu" twice) cannot be told apart by name
        from moe_serve.config import parse_config

        parse_config(world, "<rebalance>", base)
    old = holdings_of(cfg)
    before, after = worker_pairs(old, trace), worker_pairs(plan.experts, trace)
    b, a = balancedness(list(before.values())), balancedness(list(after.values()))
    return world, b, a, _table(cfg, plan, before, after, old)


# ------------------------------------------------------------------------------ output ---


def render_yaml(world: Mapping[str, Any], header: Sequence[str]) -> str:
    """`world` as YAML (block mappings, one-line lists), after `header` as comment lines."""
    import yaml

    class Dumper(yaml.SafeDumper):
        pass

    def ids_inline(dumper: yaml.SafeDumper, v: list[Any]) -> yaml.Node:
        flat = not any(isinstance(x, list | dict) for x in v)
        return dumper.represent_sequence("tag:yaml.org,2002:seq", v, flow_style=flat)

    Dumper.add_representer(list, ids_inline)
    body = yaml.dump(dict(world), Dumper=Dumper, sort_keys=False)
    return "".join(f"# {line}".rstrip() + "\n" for line in header) + body


def _header(args: argparse.Namespace, pairs: float, before: float, after: float) -> list[str]:
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    wrap = textwrap.TextWrapper(width=96, subsequent_indent="  ").wrap
    return [
        f"World config written by `moe-serve rebalance` (moe_serve.tools.rebalance), {when}:",
        *wrap(
            f"{args.config} with workers[].experts re-planned from the {pairs:.0f} token-expert "
            f"pairs observed at {args.metrics} (moe_serve_expert_tokens_total), with "
            f"--replicas {args.replicas}; every other key is as it was."
        ),
        f"balancedness (mean / max pairs per worker): before {before:.2f} -> after {after:.2f}",
    ]


def _write(path: Path, text: str, field: str) -> None:
    """Write `text` to `path` through a file beside it, renamed over it: a server reloading
    meanwhile reads the old file or the new one, never half of one."""
    target = path.resolve()
    tmp = target.with_name(f".{target.name}.rebalance-{os.getpid()}")
    try:
        tmp.write_text(text)
        if target.exists():
            shutil.copymode(target, tmp)
        os.replace(tmp, target)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise ConfigError(f"{field}: cannot write {str(path)!r}: {exc.strerror}") from None


def _reload_command(args: argparse.Namespace) -> str:
    import shlex

    parts = ["moe-serve", "reload", "--config", str(args.config)]
    parts += [x for m in args.master or () for x in ("--master", m)]
    return shlex.join(parts)


def main(args: argparse.Namespace) -> int:
    """`moe-serve rebalance`: scrape, plan, report; then write and reload, write only
    (`--out`), or nothing (`--dry-run`)."""
    import yaml

    from moe_serve.config import load_config

    config = Path(args.config)
    cfg = load_config(config)
    raw = yaml.safe_load(config.read_text())  # what load_config just validated
    counts, skipped = read_counts(args.metrics, cfg)
    base = Path(os.path.abspath(config)).parent
    world, before, after, table = rebalance_plan(cfg, counts, args.replicas, raw, base)
    pairs = sum(map(sum, counts.values()))
    print(
        f"rebalance: {pairs:.0f} token-expert pairs observed at {args.metrics} on layers "
        f"{list(counts)}; --replicas {args.replicas}"
    )
    if skipped:
        print(f"observed layers the config does not serve (ignored): {skipped}")
    print(table)
    print(f"balancedness: before {before:.2f} -> after {after:.2f}", flush=True)
    if args.dry_run:
        print("dry run: nothing written, nothing reloaded")
        return 0
    text = render_yaml(world, _header(args, pairs, before, after))
    if args.out is not None:
        _write(Path(args.out), text, "--out")
        print(f"wrote {args.out}; nothing applied. To apply it, copy it over {config}, then:")
        print(f"  {_reload_command(args)}", flush=True)
        return 0
    from moe_serve.tools.reload import reload_servers

    backup = config.with_name(config.name + ".bak")
    try:
        shutil.copy2(config, backup)
    except OSError as exc:
        raise ConfigError(
            f"--config: cannot keep a copy at {str(backup)!r}: {exc.strerror}"
        ) from None
    _write(config, text, "--config")
    print(f"wrote {config} (the old one is {backup}); reloading", flush=True)
    code = reload_servers(config, args.master, RELOAD_TIMEOUT_S)
    if code != 0:
        print(
            f"rebalance: the reload failed (exit {code}); to go back: cp {backup} {config} && "
            f"{_reload_command(args)}",
            file=sys.stderr,
        )
    return code
