"""Chaos: closed-loop load through two masters while workers and masters are killed, frozen
and reloaded. Per case: failed requests, the worst latency around the event, throughput while
degraded against the capacity left, and the time back to full service.

The world: a synthetic model (hidden 256, 8 experts, top-2, float32) on loopback, 4 workers
as two mirrored pairs (w0 and w1 hold experts 0-3, w2 and w3 experts 4-7), so any one worker,
or w0 and w2 together, can die and every expert keeps a holder; masters A and B, two
processes on the same world. `--clients` threads, each its own MoEClient over both masters,
send a fixed input in a closed loop and check every reply's bits against the healthy world's
(a reply with other bits counts as failed, WRONG_BITS).

Cases, each from a healthy world (every worker up on both masters):
  1 kill_worker     SIGKILL w0; restart it
  2 kill_25pct      SIGKILL w2 (1 of 4 workers: case 1 on the other pair); restart it
  3 kill_50pct      SIGKILL w0 and w2 (every expert keeps one holder); restart them
  4 kill_master     SIGKILL master A; restart it
  5 freeze_worker   SIGSTOP w1 for --phase-s, then SIGCONT
  6 reload_move     move expert 0's replica from w0 to w3, applied with `moe-serve reload`
                    (tools.reload.reload_servers) on the workers and both masters
  7 reload_add      start a 5th worker w4 (experts 0 and 4), then reload: it takes traffic

What each number means (times from time.monotonic() in this process):
- failed_requests: calls that ended in the case's span with an error or other bits.
- worst_latency_around_event_s: the longest call among those in flight at the event or
  started within AROUND_S after it (the same around the restart).
- degraded_vs_capacity_left: completed calls/s between the event and the restart, over the
  case's own healthy baseline x the share of the serving processes left (workers alive /
  4; masters: x 1, every worker still serves; a reload: x 1).
- back: restart (or SIGCONT) -> the process serves its health check, -> both masters report
  it up (moe_serve_worker_up), -> it computes its first pair again (its
  moe_serve_worker_expert_tokens_total moves; a master: its moe_serve_requests_total{code=OK});
  and throughput_back_s: restart -> the start of the first WINDOW_S window, once it serves
  again, with at least BACK_SHARE of the baseline's calls/s.
- reload: the new holder answers its Reload (it serves the expert) or, for an added worker,
  its health check -> its first pair of that expert, polled every POLL_S.

    python benchmarks/chaos.py --out benchmarks/results/chaos.json | tee chaos.log
    python benchmarks/chaos.py --quick --out /tmp/chaos.json     # smoke run (tests/test_chaos.py)

Not part of CI itself: tests/test_chaos.py runs --quick and checks only that no call failed.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import functools
import io
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import torch
import yaml
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from moe_serve.client import MoEClient, MoEServeError  # noqa: E402
from moe_serve.tools.demo import free_ports  # noqa: E402
from moe_serve.tools.launcher import is_serving  # noqa: E402
from moe_serve.tools.reload import reload_servers  # noqa: E402

HIDDEN, FFN, EXPERTS, TOP_K = 256, 512, 8, 2
# master.worker_timeout_s (--worker-timeout-s): small, so that a frozen worker is given up
# on quickly; it must stay above the slowest healthy worker call on this machine, or a slow
# but healthy worker is marked down (and, as the last live holder of an expert, its
# requests fail UNAVAILABLE until the next health probe).
WORKER_TIMEOUT_S = 0.3
RELOAD_GRACE_S = 3.0
CALL_TIMEOUT_S = 10.0
AROUND_S = 1.0  # calls started this long after an event count as around it
WINDOW_S = 1.0  # throughput window for "back to full service"
BACK_SHARE = 0.9  # "back" = within 10% of the baseline
POLL_S = 0.02  # how often metrics and health are polled while timing a recovery
BACK_TIMEOUT_S = 120.0
START_TIMEOUT_S = 180.0
MASTERS = ("master-a", "master-b")

CASES = {
    1: "kill_worker",
    2: "kill_25pct",
    3: "kill_50pct",
    4: "kill_master",
    5: "freeze_worker",
    6: "reload_move",
    7: "reload_add",
}
QUICK_CASES = (1, 4, 6)
GOAL_WORST_KILL_S = 0.5
GOAL_RELOAD_S = 2.0
GOAL_DEGRADED = 0.9


# --- metrics ------------------------------------------------------------------------------


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample at `url`, keyed by (name, sorted labels)."""
    with urllib.request.urlopen(url, timeout=2) as reply:
        text = reply.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def total(url: str, name: str, **labels: str) -> float | None:
    """Sum of `name`'s samples at `url` whose labels include `labels`; None when the exporter
    does not answer (the process is down or not started yet)."""
    try:
        samples = scrape(url)
    except OSError:
        return None
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= set(ls))


# --- the world ----------------------------------------------------------------------------


class World:
    """The config files and the processes: workers w0-w3 (w4 spare, for reload_add) and
    masters A and B. Workers and master A read `a.yaml`, master B `b.yaml` (the same world,
    another master section). Children are stopped by pid."""

    def __init__(self, tmp: Path, log: IO[bytes], worker_timeout_s: float) -> None:
        ports = free_ports(4 + 2 * 5)
        self.tmp, self.log = tmp, log
        self.worker_timeout_s = worker_timeout_s
        self.master_ports = {"master-a": ports[0:2], "master-b": ports[2:4]}
        mirrors = ([0, 1, 2, 3], [0, 1, 2, 3], [4, 5, 6, 7], [4, 5, 6, 7])
        self.all_workers: dict[str, dict[str, Any]] = {
            f"w{i}": {
                "id": f"w{i}",
                "address": f"127.0.0.1:{ports[4 + 2 * i]}",
                "metrics_port": ports[5 + 2 * i],
                "experts": list(experts),
            }
            for i, experts in enumerate((*mirrors, [0, 4]))
        }
        self.workers = ["w0", "w1", "w2", "w3"]  # in the config now
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.write()

    def config(self, master: str) -> dict[str, Any]:
        listen, metrics = self.master_ports[master]
        return {
            "model": {
                "hidden_size": HIDDEN,
                "expert_ffn_size": FFN,
                "num_experts": EXPERTS,
                "top_k": TOP_K,
                "dtype": "float32",
                "seed": 0,
            },
            "master": {
                "listen": f"127.0.0.1:{listen}",
                "metrics_port": metrics,
                "worker_timeout_s": self.worker_timeout_s,
                "reload_grace_s": RELOAD_GRACE_S,
            },
            "workers": [copy.deepcopy(self.all_workers[w]) for w in self.workers],
        }

    def path(self, master: str) -> Path:
        return self.tmp / f"{master[-1]}.yaml"

    def write(self) -> None:
        """Write both masters' files from `workers` (each file replaced in one rename)."""
        for m in MASTERS:
            part = self.path(m).with_suffix(".tmp")
            part.write_text(yaml.safe_dump(self.config(m)))
            part.replace(self.path(m))

    def address(self, name: str) -> str:
        if name in MASTERS:
            return f"127.0.0.1:{self.master_ports[name][0]}"
        return str(self.all_workers[name]["address"])

    def metrics_url(self, name: str) -> str:
        port = (
            self.master_ports[name][1]
            if name in MASTERS
            else self.all_workers[name]["metrics_port"]
        )
        return f"http://127.0.0.1:{port}/metrics"

    @property
    def master_addresses(self) -> list[str]:
        return [self.address(m) for m in MASTERS]

    def spawn(self, name: str) -> None:
        """Start (or start again) `name`: "w<i>" or "master-a" / "master-b"."""
        if name in MASTERS:
            args = ["master", "--config", str(self.path(name))]
        else:
            args = ["worker", "--config", str(self.path("master-a")), "--worker-id", name]
        # The children share two cores: one OpenMP thread each, or they slow each other.
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, "-m", "moe_serve", *args]
        self.procs[name] = subprocess.Popen(
            cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=ROOT
        )

    def signal(self, name: str, sig: signal.Signals) -> None:
        os.kill(self.procs[name].pid, sig)
        if sig == signal.SIGKILL:
            self.procs[name].wait()

    def start(self) -> None:
        for w in self.workers:
            self.spawn(w)
        for m in MASTERS:
            self.spawn(m)
        self.wait_serving([*self.workers, *MASTERS], START_TIMEOUT_S)

    def wait_serving(self, names: list[str], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        pending = set(names)
        while pending:
            for name in list(pending):
                if self.procs[name].poll() is not None:
                    raise RuntimeError(f"{name} exited with {self.procs[name].returncode}")
                if is_serving(self.address(name), timeout=0.5):
                    pending.discard(name)
            if pending and time.monotonic() > deadline:
                raise RuntimeError(f"not serving after {timeout_s:.0f} s: {sorted(pending)}")
            time.sleep(0.1)

    def up_on_masters(self, worker: str) -> bool:
        """Both masters report `worker` up."""
        return all(
            total(self.metrics_url(m), "moe_serve_worker_up", worker=worker) == 1 for m in MASTERS
        )

    def healthy(self) -> bool:
        alive = all(p.poll() is None for p in self.procs.values())
        return alive and all(self.up_on_masters(w) for w in self.workers)

    def wait_healthy(self, timeout_s: float = BACK_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.healthy():
            if time.monotonic() > deadline:
                raise RuntimeError(f"the world is not healthy after {timeout_s:.0f} s")
            time.sleep(0.1)

    def pairs(self, worker: str, **labels: str) -> float | None:
        """Pairs `worker` has computed (per `labels`, e.g. expert="0"); None: no answer."""
        return total(self.metrics_url(worker), "moe_serve_worker_expert_tokens_total", **labels)

    def has_computed(self, worker: str) -> bool:
        """Whether `worker` (a fresh process) has computed a pair."""
        return (self.pairs(worker) or 0) > 0

    def stop(self) -> None:
        for name in reversed(list(self.procs)):
            proc = self.procs[name]
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGCONT)  # a frozen child cannot handle SIGTERM
                os.kill(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


# --- load ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Call:
    start: float
    end: float
    code: str  # "OK", a gRPC status code name, or "WRONG_BITS"


class Load:
    """`clients` threads, each its own MoEClient over both masters, a fixed input each, in a
    closed loop; every call recorded."""

    def __init__(self, masters: list[str], clients: int, tokens: int) -> None:
        self.masters = masters
        self.inputs = [
            torch.randn(tokens, HIDDEN, generator=torch.Generator().manual_seed(i))
            for i in range(clients)
        ]
        # The healthy world's answers, from each master alone: the same bits (a test says so).
        with MoEClient(masters[0]) as a, MoEClient(masters[1]) as b:
            self.wants = [a.infer(x) for x in self.inputs]
            if not all(
                torch.equal(b.infer(x), y) for x, y in zip(self.inputs, self.wants, strict=True)
            ):
                raise RuntimeError("masters A and B answer different bits")
        self.calls: list[Call] = []  # list.append is atomic: threads append, no lock
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(clients)
        ]

    def _run(self, i: int) -> None:
        x, want = self.inputs[i], self.wants[i]
        with MoEClient(self.masters, timeout=CALL_TIMEOUT_S) as client:
            while not self._stop.is_set():
                start = time.monotonic()
                try:
                    code = "OK" if torch.equal(client.infer(x), want) else "WRONG_BITS"
                except MoEServeError as exc:
                    code = exc.code.name
                self.calls.append(Call(start, time.monotonic(), code))

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=CALL_TIMEOUT_S + 5)


# --- measures over the recorded calls -----------------------------------------------------


def ok_rate(calls: list[Call], t0: float, t1: float) -> float:
    """Calls answered OK per second, counted by when they ended, in [t0, t1)."""
    if t1 <= t0:
        return 0.0
    return sum(1 for c in calls if c.code == "OK" and t0 <= c.end < t1) / (t1 - t0)


def failures(calls: list[Call], t0: float, t1: float) -> Counter[str]:
    return Counter(c.code for c in calls if c.code != "OK" and t0 <= c.end < t1)


def worst_around(calls: list[Call], t: float, after: float = AROUND_S) -> float:
    """The longest call in flight at `t` or started within `after` seconds of it."""
    around = [c.end - c.start for c in calls if c.start <= t + after and c.end >= t]
    return max(around, default=0.0)


def latencies(calls: list[Call], t0: float, t1: float) -> dict[str, float]:
    """p50/p99/max of the calls answered OK that started in [t0, t1) (a call still in flight
    at t1, e.g. at the event, included)."""
    got = sorted(c.end - c.start for c in calls if c.code == "OK" and t0 <= c.start < t1)
    if not got:
        return {}
    return {
        "p50": round(statistics.median(got), 4),
        "p99": round(got[min(len(got) - 1, int(0.99 * len(got)))], 4),
        "max": round(got[-1], 4),
    }


def back_at(calls: list[Call], since: float, until: float, target_rps: float) -> float | None:
    """Start of the first WINDOW_S window at or after `since` (ending by `until`) with at
    least `target_rps` calls/s answered OK; None when none."""
    ends = sorted(c.end for c in calls if c.code == "OK" and since <= c.end < until)
    need = target_rps * WINDOW_S
    t = since
    while t + WINDOW_S <= until:
        if sum(1 for e in ends if t <= e < t + WINDOW_S) >= need:
            return t
        t += 0.05
    return None


def timeline(calls: list[Call], t0: float, t1: float, step: float = 0.5) -> list[float]:
    """Calls/s answered OK per `step` from t0 to t1."""
    n = max(1, int((t1 - t0) / step))
    counts = [0] * n
    for c in calls:
        if c.code == "OK" and t0 <= c.end < t0 + n * step:
            counts[int((c.end - t0) / step)] += 1
    return [round(k / step, 1) for k in counts]


def first_times(conditions: dict[str, Callable[[], bool]], timeout_s: float) -> dict[str, float]:
    """Poll every POLL_S; the time at which each condition first held (checked in the given
    order each round; a condition is checked only once those before it held)."""
    got: dict[str, float] = {}
    deadline = time.monotonic() + timeout_s
    names = list(conditions)
    while len(got) < len(names):
        for name in names:
            if name in got:
                continue
            if not conditions[name]():
                break
            got[name] = time.monotonic()
        if len(got) < len(names):
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"not back after {timeout_s:.0f} s: {sorted(set(names) - set(got))}"
                )
            time.sleep(POLL_S)
    return got


def r(x: float | None, digits: int = 3) -> float | None:
    return None if x is None else round(x, digits)


# --- cases --------------------------------------------------------------------------------


@dataclass
class Run:
    world: World
    load: Load
    phase_s: float
    t0: float  # the run's time zero (for the timelines in the JSON)
    loadavg: list[float] = field(default_factory=list)

    def sleep(self) -> None:
        time.sleep(self.phase_s)

    def baseline(self) -> tuple[float, float]:
        """(case start, event time): a healthy world, then one phase of healthy load."""
        start = time.monotonic()
        # The host's 1-minute load average: other work on the machine moves every number.
        self.loadavg.append(os.getloadavg()[0])
        self.world.wait_healthy()
        time.sleep(0.5)
        base = time.monotonic()
        self.sleep()
        return start, base

    def summary(
        self,
        name: str,
        start: float,
        base: float,
        event: float,
        degraded_end: float,
        end: float,
        alive: float,
        basis: str,
    ) -> dict[str, Any]:
        calls = self.load.calls
        baseline_rps = ok_rate(calls, base, event)
        degraded_rps = ok_rate(calls, event, degraded_end)
        capacity = baseline_rps * alive
        failed = failures(calls, start, end)
        return {
            "case": name,
            "loadavg_1m_at_start": round(self.loadavg[-1], 2) if self.loadavg else None,
            "failed_requests": sum(failed.values()),
            "failed_codes": dict(failed),
            "calls_ok": sum(1 for c in calls if c.code == "OK" and start <= c.end < end),
            "baseline_rps": r(baseline_rps, 1),
            "baseline_latency_s": latencies(calls, base, event),
            "worst_latency_around_event_s": r(worst_around(calls, event)),
            "degraded_s": r(degraded_end - event, 2),
            "degraded_rps": r(degraded_rps, 1),
            "capacity_left_share": alive,
            "capacity_left_basis": basis,
            "degraded_vs_capacity_left": r(degraded_rps / capacity if capacity else None),
            "at_s": {"start": r(start - self.t0, 2), "event": r(event - self.t0, 2)},
            "rps_timeline_0.5s_from_baseline": timeline(calls, base, end),
        }


def kill_workers(run: Run, name: str, victims: list[str]) -> dict[str, Any]:
    w = run.world
    start, base = run.baseline()
    event = time.monotonic()
    for v in victims:
        w.signal(v, signal.SIGKILL)
    run.sleep()
    restart = time.monotonic()
    for v in victims:
        w.spawn(v)
    conditions: dict[str, Callable[[], bool]] = {}
    for v in victims:
        conditions[f"{v} serving"] = functools.partial(is_serving, w.address(v), 0.3)
    for v in victims:
        conditions[f"{v} up on masters"] = functools.partial(w.up_on_masters, v)
    for v in victims:
        conditions[f"{v} first pair"] = functools.partial(w.has_computed, v)
    got = first_times(conditions, BACK_TIMEOUT_S)
    served = max(got[f"{v} first pair"] for v in victims)
    time.sleep(run.phase_s + WINDOW_S)
    end = time.monotonic()
    alive = (len(w.workers) - len(victims)) / len(w.workers)
    out = run.summary(
        name, start, base, event, restart, end, alive, f"workers alive / workers = {alive:g}"
    )
    out["event"] = f"SIGKILL {', '.join(victims)}; restart after {run.phase_s:g} s"
    out["worst_latency_around_restart_s"] = r(worst_around(run.load.calls, restart))
    baseline_rps = out["baseline_rps"] or 0.0
    back = back_at(run.load.calls, served, end, BACK_SHARE * baseline_rps)
    out["back"] = {
        "restart_to_serving_s": r(max(got[f"{v} serving"] for v in victims) - restart),
        "restart_to_up_on_masters_s": r(max(got[f"{v} up on masters"] for v in victims) - restart),
        "restart_to_first_pair_s": r(served - restart),
        "throughput_back_s": r(None if back is None else back - restart),
    }
    return out


def kill_master(run: Run) -> dict[str, Any]:
    w, victim = run.world, "master-a"
    start, base = run.baseline()
    event = time.monotonic()
    w.signal(victim, signal.SIGKILL)
    run.sleep()
    restart = time.monotonic()
    w.spawn(victim)
    url = w.metrics_url(victim)
    got = first_times(
        {
            "serving": lambda: is_serving(w.address(victim), timeout=0.3),
            "first request": lambda: (total(url, "moe_serve_requests_total", code="OK") or 0) > 0,
        },
        BACK_TIMEOUT_S,
    )
    time.sleep(run.phase_s + WINDOW_S)
    end = time.monotonic()
    out = run.summary(
        "kill_master",
        start,
        base,
        event,
        restart,
        end,
        1.0,
        "x 1: master B alone still reaches every worker (masters are not what limits "
        "throughput here)",
    )
    out["event"] = f"SIGKILL master A; restart after {run.phase_s:g} s"
    out["worst_latency_around_restart_s"] = r(worst_around(run.load.calls, restart))
    back = back_at(run.load.calls, got["first request"], end, BACK_SHARE * out["baseline_rps"])
    out["back"] = {
        "restart_to_serving_s": r(got["serving"] - restart),
        "restart_to_first_request_s": r(got["first request"] - restart),
        "throughput_back_s": r(None if back is None else back - restart),
    }
    return out


def freeze_worker(run: Run) -> dict[str, Any]:
    w, victim = run.world, "w1"
    start, base = run.baseline()
    event = time.monotonic()
    w.signal(victim, signal.SIGSTOP)
    run.sleep()
    resume = time.monotonic()
    w.signal(victim, signal.SIGCONT)
    got = first_times({"up on masters": lambda: w.up_on_masters(victim)}, BACK_TIMEOUT_S)
    # Pairs from calls the masters sent before it froze may land after SIGCONT: count from
    # the moment both masters route to it again.
    at_up = w.pairs(victim) or 0.0
    got |= first_times({"first pair": lambda: (w.pairs(victim) or 0) > at_up}, BACK_TIMEOUT_S)
    time.sleep(run.phase_s + WINDOW_S)
    end = time.monotonic()
    alive = (len(w.workers) - 1) / len(w.workers)
    out = run.summary(
        "freeze_worker",
        start,
        base,
        event,
        resume,
        end,
        alive,
        f"workers answering / workers = {alive:g}",
    )
    out["event"] = f"SIGSTOP {victim}; SIGCONT after {run.phase_s:g} s"
    out["worst_latency_around_sigcont_s"] = r(worst_around(run.load.calls, resume))
    back = back_at(run.load.calls, got["first pair"], end, BACK_SHARE * out["baseline_rps"])
    out["back"] = {
        "sigcont_to_up_on_masters_s": r(got["up on masters"] - resume),
        "sigcont_to_first_pair_s": r(got["first pair"] - resume),
        "throughput_back_s": r(None if back is None else back - resume),
    }
    return out


class _TimedLines(io.TextIOBase):
    """stdout that notes when each line was written."""

    def __init__(self) -> None:
        self.lines: list[tuple[float, str]] = []
        self._part = ""

    def write(self, s: str) -> int:
        self._part += s
        while "\n" in self._part:
            line, self._part = self._part.split("\n", 1)
            self.lines.append((time.monotonic(), line))
        return len(s)


def reload_timed(world: World) -> tuple[int, list[tuple[float, str]]]:
    """`moe-serve reload` on the workers of a.yaml and both masters; its lines, timed."""
    out = _TimedLines()
    with contextlib.redirect_stdout(out):
        rc = reload_servers(world.path("master-a"), world.master_addresses, 120.0)
    return rc, out.lines


def watch(pred: Callable[[], bool]) -> tuple[threading.Thread, list[float]]:
    """A thread polling `pred` every POLL_S until it holds (or BACK_TIMEOUT_S)."""
    seen: list[float] = []

    def poll() -> None:
        deadline = time.monotonic() + BACK_TIMEOUT_S
        while time.monotonic() < deadline:
            if pred():
                seen.append(time.monotonic())
                return
            time.sleep(POLL_S)

    t = threading.Thread(target=poll, daemon=True)
    t.start()
    return t, seen


def line_at(lines: list[tuple[float, str]], prefix: str) -> tuple[float, str]:
    """The first line starting with `prefix` that is not a "reloading" line."""
    for at, text in lines:
        if text.startswith(prefix) and not text.endswith(": reloading"):
            return at, text
    raise RuntimeError(f"reload printed no answer for {prefix!r}: {lines}")


def reload_move(run: Run) -> dict[str, Any]:
    """Move expert 0's replica from w0 to w3."""
    w = run.world
    start, base = run.baseline()
    w.all_workers["w0"]["experts"] = [1, 2, 3]
    w.all_workers["w3"]["experts"] = [0, 4, 5, 6, 7]
    w.write()
    before = w.pairs("w3", expert="0") or 0.0
    event = time.monotonic()
    poller, seen = watch(lambda: (w.pairs("w3", expert="0") or 0) > before)
    rc, lines = reload_timed(w)
    done = time.monotonic()
    poller.join()
    if rc != 0 or not seen:
        raise RuntimeError(f"reload failed (rc {rc}) or w3 never computed expert 0: {lines}")
    holder_at, holder_says = line_at(lines, "worker w3:")
    masters = [line_at(lines, f"master at {a}:") for a in w.master_addresses]
    run.sleep()
    end = time.monotonic()
    out = run.summary(
        "reload_move",
        start,
        base,
        event,
        event + run.phase_s,
        end,
        1.0,
        "x 1: the same workers serve (the first phase_s after the reload started)",
    )
    out["event"] = "reload: expert 0 moves from w0 to w3 (w1 keeps its replica)"
    out["reload"] = {
        "rc": rc,
        "new_holder_says": holder_says,
        "masters_say": [text for _, text in masters],
        "start_to_new_holder_serving_s": r(holder_at - event),
        "start_to_masters_applied_s": r(max(at for at, _ in masters) - event),
        "reload_call_s": r(done - event),
        "new_holder_serving_to_first_pair_s": r(seen[0] - holder_at),
        "masters_applied_to_first_pair_s": r(seen[0] - max(at for at, _ in masters)),
    }
    return out


def reload_add(run: Run) -> dict[str, Any]:
    """Start w4 (experts 0 and 4, a third replica) and reload: it takes traffic."""
    w = run.world
    start, base = run.baseline()
    w.workers.append("w4")
    w.write()
    event = time.monotonic()
    w.spawn("w4")
    w.wait_serving(["w4"], BACK_TIMEOUT_S)
    healthy = time.monotonic()
    poller, seen = watch(lambda: (w.pairs("w4") or 0) > 0)
    rc, lines = reload_timed(w)
    poller.join()
    if rc != 0 or not seen:
        raise RuntimeError(f"reload failed (rc {rc}) or w4 never computed a pair: {lines}")
    masters = [line_at(lines, f"master at {a}:") for a in w.master_addresses]
    run.sleep()
    end = time.monotonic()
    out = run.summary(
        "reload_add",
        start,
        base,
        event,
        event + run.phase_s,
        end,
        1.0,
        "x 1: the 4 workers of the baseline all still serve (the first phase_s after w4 was "
        "started; its start-up shares the 2 cores)",
    )
    out["event"] = "start w4 (experts 0, 4), then reload: w4 added on both masters"
    out["reload"] = {
        "rc": rc,
        "masters_say": [text for _, text in masters],
        "start_to_new_worker_healthy_s": r(healthy - event),
        "healthy_to_masters_applied_s": r(max(at for at, _ in masters) - healthy),
        "new_holder_serving_to_first_pair_s": r(seen[0] - healthy),
        "masters_applied_to_first_pair_s": r(seen[0] - min(at for at, _ in masters)),
    }
    return out


def failovers(world: World) -> float:
    """Worker slices both masters resent to other replicas (moe_serve_master_failovers)."""
    return sum(
        total(world.metrics_url(m), "moe_serve_master_failovers_total") or 0.0 for m in MASTERS
    )


def run_case(run: Run, number: int) -> dict[str, Any]:
    name = CASES[number]
    before = failovers(run.world)
    if name == "kill_worker":
        out = kill_workers(run, name, ["w0"])
    elif name == "kill_25pct":
        out = kill_workers(run, name, ["w2"])
    elif name == "kill_50pct":
        out = kill_workers(run, name, ["w0", "w2"])
    elif name == "kill_master":
        out = kill_master(run)
    elif name == "freeze_worker":
        out = freeze_worker(run)
    elif name == "reload_move":
        out = reload_move(run)
    else:
        out = reload_add(run)
    # A restarted master counts from 0 again: no total for that case.
    resent = None if name == "kill_master" else failovers(run.world) - before
    return {"number": number, **out, "failovers": resent}


# --- report -------------------------------------------------------------------------------


def _met(measured: float | None, ok: bool) -> bool | None:
    return None if measured is None else ok


def goals(cases: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's goals against this run's cases ("met": None when no case measured it)."""
    kills = [c for c in cases if c["case"].startswith("kill")]
    reloads = [c for c in cases if "reload" in c]
    worst_kill = max((c["worst_latency_around_event_s"] for c in kills), default=None)
    worst_reload = max(
        (c["reload"]["new_holder_serving_to_first_pair_s"] for c in reloads), default=None
    )
    degraded = [c for c in cases if "reload" not in c and c["degraded_vs_capacity_left"]]
    lowest = min(degraded, key=lambda c: c["degraded_vs_capacity_left"], default=None)
    ratio = None if lowest is None else lowest["degraded_vs_capacity_left"]
    return {
        "zero_failed_requests": {
            "goal": 0,
            "measured": sum(c["failed_requests"] for c in cases),
            "met": all(c["failed_requests"] == 0 for c in cases),
        },
        "worst_latency_around_kill_s": {
            "goal": GOAL_WORST_KILL_S,
            "measured": worst_kill,
            "met": _met(worst_kill, (worst_kill or 0) <= GOAL_WORST_KILL_S),
        },
        "reload_new_holder_serving_to_first_pair_s": {
            "goal": GOAL_RELOAD_S,
            "measured": worst_reload,
            "met": _met(worst_reload, (worst_reload or 0) <= GOAL_RELOAD_S),
        },
        "degraded_vs_capacity_left": {
            "goal": GOAL_DEGRADED,
            "measured_min": ratio,
            "in_case": None if lowest is None else lowest["case"],
            "cases": "kills and the freeze (not the reloads)",
            "met": _met(ratio, (ratio or 0) >= GOAL_DEGRADED),
        },
    }


def back_text(c: dict[str, Any]) -> str:
    if "reload" in c:
        return f"holder serving -> 1st pair {c['reload']['new_holder_serving_to_first_pair_s']}"
    b = c["back"]
    first = b.get("restart_to_first_pair_s", b.get("restart_to_first_request_s"))
    if first is None:
        first = b["sigcont_to_first_pair_s"]
    return f"1st served {first}; rps back {b['throughput_back_s']}"


def table(cases: list[dict[str, Any]]) -> str:
    head = (
        f"{'case':<16} {'failed':>6} {'worst@event':>11} {'base rps':>8} {'degr rps':>8} "
        f"{'vs cap':>7} {'cap':>5}  back (s)"
    )
    rows = [head]
    for c in cases:
        rows.append(
            f"{c['number']} {c['case']:<14} {c['failed_requests']:>6} "
            f"{c['worst_latency_around_event_s']:>11.3f} {c['baseline_rps']:>8.1f} "
            f"{c['degraded_rps']:>8.1f} {c['degraded_vs_capacity_left'] or 0:>7.2f} "
            f"{c['capacity_left_share']:>5.2f}  {back_text(c)}"
        )
    return "\n".join(rows)


def host() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    return {
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)),
        "loadavg_1m_at_end": round(os.getloadavg()[0], 2),
        "cpu": model,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


@contextlib.contextmanager
def world_running(
    tmp: Path, keep_log: Path | None, worker_timeout_s: float = WORKER_TIMEOUT_S
) -> Iterator[World]:
    path = tmp / "children.log"
    with open(path, "ab") as log:
        w = World(tmp, log, worker_timeout_s)
        try:
            w.start()
            yield w
        except BaseException:
            log.flush()
            tail = path.read_text(errors="replace")[-4000:]
            print(f"children's log (tail):\n{tail}", file=sys.stderr, flush=True)
            raise
        finally:
            w.stop()
            if keep_log is not None:
                shutil.copyfile(path, keep_log)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON to write")
    parser.add_argument("--clients", type=int, default=None, help="client threads (16)")
    parser.add_argument("--phase-s", type=float, default=None, help="seconds per phase (4)")
    parser.add_argument(
        "--worker-timeout-s",
        type=float,
        default=WORKER_TIMEOUT_S,
        help=f"master.worker_timeout_s ({WORKER_TIMEOUT_S:g})",
    )
    parser.add_argument(
        "--calls-out", type=Path, help="write every call here (CSV: start_s, end_s, code)"
    )
    parser.add_argument("--children-log", type=Path, help="copy the processes' output here")
    parser.add_argument("--tokens", type=int, default=8, help="tokens per call (8)")
    parser.add_argument(
        "--cases",
        default=None,
        help="comma-separated case numbers (default all; --quick: 1,4,6): "
        + ", ".join(f"{k} {v}" for k, v in CASES.items()),
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: 4 clients, 1 s phases, cases 1,4,6"
    )
    args = parser.parse_args()
    clients = args.clients or (4 if args.quick else 16)
    phase_s = args.phase_s or (1.0 if args.quick else 4.0)
    numbers = (
        [int(n) for n in args.cases.split(",")]
        if args.cases
        else list(QUICK_CASES if args.quick else CASES)
    )
    unknown = [n for n in numbers if n not in CASES]
    if unknown:
        parser.error(f"--cases: unknown case(s) {unknown}; expected some of {list(CASES)}")
    torch.set_num_threads(1)  # this process only sends and compares
    t0, load_at_start = time.monotonic(), os.getloadavg()[0]
    print(f"chaos: {clients} clients, {phase_s:g} s phases, cases {numbers}", flush=True)
    with (
        tempfile.TemporaryDirectory() as d,
        world_running(Path(d), args.children_log, args.worker_timeout_s) as world,
    ):
        print(f"world serving after {time.monotonic() - t0:.1f} s", flush=True)
        config = {m: world.config(m) for m in MASTERS}
        load = Load(world.master_addresses, clients, args.tokens)
        load.start()
        run = Run(world, load, phase_s, t0)
        cases = []
        try:
            for n in numbers:
                cases.append(run_case(run, n))
                c = cases[-1]
                print(
                    f"case {n} {c['case']}: failed {c['failed_requests']} {c['failed_codes']}, "
                    f"worst around event {c['worst_latency_around_event_s']} s, "
                    f"{c['degraded_rps']} vs baseline {c['baseline_rps']} calls/s; "
                    f"{back_text(c)}",
                    flush=True,
                )
        finally:
            load.stop()
        calls = load.calls
    everything = failures(calls, 0.0, float("inf"))
    result = {
        "benchmark": "chaos",
        "date": datetime.date.today().isoformat(),
        "host": {**host(), "loadavg_1m_at_start": round(load_at_start, 2)},
        "args": {"clients": clients, "phase_s": phase_s, "tokens": args.tokens, "cases": numbers},
        "settings": {
            "call_timeout_s": CALL_TIMEOUT_S,
            "around_s": AROUND_S,
            "window_s": WINDOW_S,
            "back_share": BACK_SHARE,
            "poll_s": POLL_S,
        },
        "config": config,
        "cases": cases,
        "totals": {
            "calls": len(calls),
            "ok": sum(1 for c in calls if c.code == "OK"),
            "failed": dict(everything),
            "seconds": r(time.monotonic() - t0, 1),
        },
        "goals": goals(cases),
    }
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    if args.calls_out:
        rows = (f"{c.start - t0:.4f},{c.end - t0:.4f},{c.code}" for c in calls)
        args.calls_out.write_text("start_s,end_s,code\n" + "\n".join(rows) + "\n")
    print(table(cases), flush=True)
    print(json.dumps(result["goals"]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
