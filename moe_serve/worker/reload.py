"""A worker's live config change (SIGHUP or ExpertWorker.Reload): it re-reads its config file,
loads the experts its entry newly gives it, and serves the ones it lost for
`master.reload_grace_s` more before freeing them, without a failed call.

What it refuses, the old experts serving on:
- a file that does not validate: INVALID_ARGUMENT with load_config's message (it names the
  field);
- a change it cannot apply live (any of `model`, `routing`, `batching`, `security`,
  `tracing`; its own entry's `address`, `listen`, `devices`, `metrics_port`,
  `metrics_host`; its id gone from the file): FAILED_PRECONDITION naming the field and
  saying "restart".
Other workers' entries and the `master` section are the master's business.

How it serves throughout: each changed layer's new stacks are built off the event loop
(WorkerEngine.build, on a thread), then swapped in on the loop between two passes
(WorkerEngine.install). Through the grace window a layer serves its new experts plus the
retiring ones; when a window ends the layer is rebuilt without them the same way.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from pathlib import Path

from moe_serve.config import WorkerConfig, WorldConfig, config_difference, load_config
from moe_serve.errors import ConfigError, InvalidConfigError, MoEError, RestartNeededError
from moe_serve.metrics import WorkerMetrics
from moe_serve.weights import WeightSource, open_weights
from moe_serve.worker.engine import Progress, WorkerEngine

log = logging.getLogger(__name__)

# Sections a running worker cannot change: its batcher, its server and its loaded weights
# were built from them.
FIXED_SECTIONS = ("model", "routing", "batching", "security", "tracing")
# Its own entry's keys bound at start (its ports, its devices); only `experts` may change.
FIXED_WORKER_KEYS = ("address", "listen", "devices", "metrics_port", "metrics_host")

# Opens the new config's weights, if any expert has to be read from them.
WeightSourceFactory = Callable[[], WeightSource]


class Reloader:
    """Applies a worker's new config entry to its engine, one reload at a time, and frees
    retiring experts when their grace window ends."""

    def __init__(
        self,
        cfg: WorldConfig,
        worker_id: str,
        config_path: Path | None,
        engine: WorkerEngine,
        metrics: WorkerMetrics,
    ) -> None:
        self.cfg = cfg  # the config applied now
        self.metrics = metrics
        self.worker_id, self.config_path, self.engine = worker_id, config_path, engine
        # Loop time at which each retiring (layer, expert) stops being served.
        self.deadlines: dict[tuple[int, int], float] = {}
        self._lock = asyncio.Lock()  # one reload or retirement at a time
        self._retire_task: asyncio.Task[None] | None = None

    async def reload(self) -> str:
        """Re-read the config file and apply this worker's entry; return the summary (what
        changed, in an operator's words; "no change"). Returns once the new experts serve;
        the lost ones are freed later, in the background.

        InvalidConfigError (INVALID_ARGUMENT) for a file that does not validate;
        RestartNeededError (FAILED_PRECONDITION) for a change that needs a restart, and
        without a config file. Logged either way; the old experts keep serving."""
        try:
            async with self._lock:
                new = await self._read()
                worker = self._check(new)
                summary = await self._apply(new, worker)
        except MoEError as exc:
            self.metrics.config_reloads.labels("refused").inc()
            log.error("worker %s: reload refused: %s", self.worker_id, exc)
            raise
        self.metrics.config_reloads.labels("applied").inc()
        log.info("worker %s: reload: %s", self.worker_id, summary)
        return summary

    async def on_signal(self) -> None:
        """`reload` for SIGHUP: a refusal is logged (by `reload`), nothing else happens."""
        try:
            await self.reload()
        except MoEError:
            pass  # logged, naming the field; the old experts keep serving
        except Exception:
            log.exception("worker %s: reload failed; the old experts keep serving", self.worker_id)

    async def close(self) -> None:
        """Stop the background retirement (the worker is stopping)."""
        if self._retire_task is not None:
            self._retire_task.cancel()
            await asyncio.gather(self._retire_task, return_exceptions=True)
            self._retire_task = None

    async def _read(self) -> WorldConfig:
        if self.config_path is None:
            raise RestartNeededError(
                "this worker was started without a config file; nothing to reload (start it "
                "with `moe-serve worker --config FILE` to reload it)"
            )
        try:
            # Off the loop: a checkpoint's config.json is read too.
            return await asyncio.to_thread(load_config, self.config_path)
        except ConfigError as exc:
            raise InvalidConfigError(str(exc)) from None

    def _check(self, new: WorldConfig) -> WorkerConfig:
        """This worker's new entry, or RestartNeededError naming what it cannot apply."""
        restart = "; a running worker applies only its own `experts` live: restart it"
        for section in FIXED_SECTIONS:
            change = config_difference(getattr(self.cfg, section), getattr(new, section), section)
            if change is not None:
                raise RestartNeededError(change + restart)
        index = next((i for i, w in enumerate(new.workers) if w.id == self.worker_id), None)
        if index is None:
            raise RestartNeededError(
                f"workers: no worker {self.worker_id!r} in the new config; the master drains "
                "it: stop this worker"
            )
        old, worker = self.engine.worker, new.workers[index]
        for key in FIXED_WORKER_KEYS:
            if getattr(old, key) != getattr(worker, key):
                raise RestartNeededError(
                    f"workers[{index}].{key}: {getattr(old, key)!r} -> "
                    f"{getattr(worker, key)!r}{restart}"
                )
        return worker

    async def _apply(self, new: WorldConfig, worker: WorkerConfig) -> str:
        e, loop = self.engine, asyncio.get_running_loop()
        grace = new.master.reload_grace_s
        deadlines = dict(self.deadlines)
        lines: list[str] = []
        lost: list[tuple[int, int]] = []
        served: dict[int, tuple[int, ...]] = {}
        for layer in self.cfg.model.moe_layers:
            before, after = set(e.worker.experts_on(layer)), worker.experts_on(layer)
            gained, gone = sorted(set(after) - before), sorted(before - set(after))
            for x in after:  # a retiring expert given back stops retiring
                deadlines.pop((layer, x), None)
            lost += [(layer, x) for x in gone]
            served[layer] = (*after, *sorted({*_experts(deadlines, layer), *gone}))
            if gained or gone:
                lines.append(_line(layer, gained, gone, grace))
        if not lines:
            self.cfg = new  # the master section, other workers: not ours, but now current
            return "no change"
        try:
            await self._serve(served, lambda: open_weights(new.model, new.routing), "reload: ")
        except Exception:
            # Layers rebuilt already serve experts no one is told of: back to the old state.
            try:
                await self._serve(self._current(), None, None)
            except Exception:
                log.exception("worker %s: undoing a failed reload failed too", self.worker_id)
            raise
        # Every layer serves its new experts: from now on the worker reports them, and the
        # grace window of the ones it lost starts.
        until = loop.time() + grace
        self.deadlines = {**deadlines, **dict.fromkeys(lost, until)}
        e.worker = worker
        self._set_retiring()
        self.cfg = new
        self._schedule()
        return "; ".join(lines)

    async def _serve(
        self,
        served: dict[int, tuple[int, ...]],
        source: WeightSourceFactory | None,
        what: str | None,
    ) -> None:
        """Make each layer serve `served[layer]`: layers whose set of experts changes are
        rebuilt off the loop and installed on it, one layer at a time (so a reload holds at
        most one layer twice in memory). `source`: where experts not served yet come from;
        `what`: the progress log's prefix (None: no progress log)."""
        e = self.engine
        changed = [la for la, ids in served.items() if set(ids) != e.held_set[la]]
        if not changed:
            return
        progress = None
        if what is not None:
            progress = Progress(sum(len(served[la]) for la in changed), self.worker_id, what)
        opened: WeightSource | None = None
        with e.building():
            if source is not None and any(set(served[la]) - e.held_set[la] for la in changed):
                opened = await asyncio.to_thread(source)
            for layer in changed:
                tables = await asyncio.to_thread(e.build, layer, served[layer], opened, progress)
                e.install(layer, tables)  # on the loop, between two passes
        if progress is not None:
            progress.done()

    def _current(self) -> dict[int, tuple[int, ...]]:
        """What each layer is to serve now: its config entry's experts, then the retiring."""
        e = self.engine
        return {la: (*e.worker.experts_on(la), *_experts(self.deadlines, la)) for la in e.retiring}

    def _set_retiring(self) -> None:
        e = self.engine
        for layer in e.retiring:
            e.retiring[layer] = frozenset(_experts(self.deadlines, layer))
        self.metrics.retiring_experts.set(len(self.deadlines))

    def _schedule(self) -> None:
        """(Re)start the retirement: a new reload's window may end before the one it was
        sleeping for (a shorter reload_grace_s). Called holding the lock, so the task it
        replaces is asleep or waiting for the lock, never freeing."""
        if self._retire_task is not None:
            self._retire_task.cancel()
        self._retire_task = asyncio.get_running_loop().create_task(self._retire())

    async def _retire(self) -> None:
        """Free retiring experts as their grace windows end, until none is left."""
        loop = asyncio.get_running_loop()
        while self.deadlines:
            wait = min(self.deadlines.values()) - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
                continue  # a reload meanwhile may have given some back, or added others
            try:
                async with self._lock:
                    await self._free(loop.time())
            except Exception:
                log.exception(
                    "worker %s: freeing retiring experts failed; they keep serving",
                    self.worker_id,
                )
                return

    async def _free(self, now: float) -> None:
        expired = sorted(k for k, t in self.deadlines.items() if t <= now)
        if not expired:
            return
        self.deadlines = {k: t for k, t in self.deadlines.items() if t > now}
        self._set_retiring()  # GetInfo stops listing them now, before the stacks shrink
        await self._serve(self._current(), None, None)
        layers = sorted({la for (la, _) in expired})
        log.info(
            "worker %s: grace window over, freed: %s",
            self.worker_id,
            "; ".join(f"layer {la}: {_experts(expired, la)}" for la in layers),
        )


def _line(layer: int, gained: list[int], lost: list[int], grace: float) -> str:
    parts = [f"layer {layer}:"]
    if gained:
        parts.append(f"+{gained}")
    if lost:
        parts.append(f"-{lost}")
        experts = "expert" if len(lost) == 1 else "experts"
        ids = ", ".join(str(x) for x in lost)
        parts.append(f"({experts} {ids} served until {grace:g} s from now)")
    return " ".join(parts)


def _experts(keys: Iterable[tuple[int, int]], layer: int) -> list[int]:
    """The experts of `layer` among (layer, expert) keys, ascending."""
    return sorted(x for (la, x) in keys if la == layer)
