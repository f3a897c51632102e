"""A master's live world change (SIGHUP or MoEMaster.Reload): re-read the world config, dial
the workers it adds, drain the ones it removes, and move each expert's traffic to its new
holders only once they report serving it.

What a master may change live: the `workers` list (workers added, removed, experts moved or
replicated). Anything else (`model`, `routing`, `master`, `batching`, `security`,
`tracing`; a kept worker's address or ports) needs a restart: the reload is refused with
FAILED_PRECONDITION naming the field, as a file that does not validate is with
INVALID_ARGUMENT; the old world keeps serving either way.

Who serves an expert after a reload (placement.Placement.serving): the workers that the new
config lists for it and that say they serve it (GetInfo, asked at every health probe); while
none says so yet, whoever still serves it (a worker keeps the experts a reload took from it
for `master.reload_grace_s`); a removed worker is closed once it serves nothing needed and
has no call in flight, or when that grace has passed.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from pathlib import Path

from moe_serve.config import WorkerConfig, WorldConfig, config_difference, load_config
from moe_serve.errors import ConfigError, InvalidConfigError, MoEError, RestartNeededError
from moe_serve.layer.placement import Placement, holdings
from moe_serve.master.engine import MasterEngine
from moe_serve.master.workers import WorkerPool

log = logging.getLogger(__name__)

# Sections a running master cannot change (everything but `workers`).
FIXED_SECTIONS = ("model", "routing", "master", "batching", "security", "tracing")


@dataclass(frozen=True)
class WorldChange:
    """What a new config changes in the workers of the old one."""

    added: tuple[str, ...]
    removed: tuple[str, ...]
    moved: tuple[str, ...]  # "layer L expert E: [old holders] -> [new holders]"

    def summary(self) -> str:
        parts = []
        if self.added:
            parts.append(f"workers added: {list(self.added)}")
        if self.removed:
            parts.append(f"workers removed (drained): {list(self.removed)}")
        parts += self.moved
        return "; ".join(parts) or "no change"


def compare(old: WorldConfig, new: WorldConfig) -> WorldChange:
    """The change from `old` to `new`; RestartNeededError naming the first field a master
    cannot change live."""
    restart = "; a running master applies only changes to `workers` live: restart it"
    for section in FIXED_SECTIONS:
        change = config_difference(getattr(old, section), getattr(new, section), section)
        if change is not None:
            raise RestartNeededError(change + restart)
    before = {w.id: w for w in old.workers}
    for i, w in enumerate(new.workers):
        kept = before.get(w.id)
        if kept is not None and kept.address != w.address:
            raise RestartNeededError(
                f"workers[{i}].address: {kept.address!r} -> {w.address!r}; a worker keeps its "
                "address across a reload: give the new one another id"
            )
    after = {w.id for w in new.workers}
    moved = []
    for layer in new.model.moe_layers:
        for e in range(new.model.num_experts):
            was = [w.id for w in old.workers if e in w.experts_on(layer)]
            now = [w.id for w in new.workers if e in w.experts_on(layer)]
            if was != now:
                moved.append(f"layer {layer} expert {e}: {was} -> {now}")
    return WorldChange(
        added=tuple(w.id for w in new.workers if w.id not in before),
        removed=tuple(w.id for w in old.workers if w.id not in after),
        moved=tuple(moved),
    )


def serving_placement(cfg: WorldConfig, pool: WorkerPool) -> Placement:
    """Who serves each expert now, over the pool's worker indices: `cfg`'s holders that say
    they serve it, else whoever still does (Placement.serving)."""
    wanted = {w.id: w for w in cfg.workers}
    configured = []
    for i, w in enumerate(pool.workers):
        entry: WorkerConfig | None = wanted.get(w.id)
        live = not pool.closed[i] and pool.index(w.id) == i
        configured.append(holdings(entry, cfg.model.moe_layers) if entry and live else {})
    ids = tuple(w.id for w in pool.workers)
    return Placement.serving(ids, configured, pool.serves, cfg.model.num_experts)


@dataclass
class Reloader:
    """Applies new world configs to a running master, one at a time, and closes removed
    workers once they are drained."""

    engine: MasterEngine
    pool: WorkerPool
    config_path: Path | None
    # Removed workers not closed yet: pool index -> loop time by which to close it anyway.
    leaving: dict[int, float] = field(default_factory=dict)
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _seen: int = -1  # the pool's serves_changed the placement was last computed at

    async def reload(self) -> str:
        """Re-read the config file and apply it; the summary of what changed ("no change").

        InvalidConfigError (INVALID_ARGUMENT) for a file that does not validate,
        RestartNeededError (FAILED_PRECONDITION) for a change a master cannot apply live or
        without a config file; logged (naming the field) either way, the old world serving."""
        outcomes = self.engine.metrics.config_reloads
        try:
            async with self._lock:
                summary = await self._reload()
        except MoEError as exc:
            outcomes.labels("refused").inc()
            log.error("master: reload refused, the old world keeps serving: %s", exc)
            raise
        outcomes.labels("applied").inc()
        log.info("master: reload: %s", summary)
        return summary

    async def on_signal(self) -> None:
        """`reload` for SIGHUP: a refusal is logged (by `reload`), nothing else happens."""
        try:
            await self.reload()
        except MoEError:
            pass  # logged, naming the field
        except Exception:
            log.exception("master: reload failed; the old world keeps serving")

    async def _reload(self) -> str:
        if self.config_path is None:
            raise RestartNeededError(
                "this master was started without a config file; nothing to reload"
            )
        try:
            # Off the loop: a checkpoint's config.json is read too.
            new = await asyncio.to_thread(load_config, self.config_path)
        except ConfigError as exc:
            raise InvalidConfigError(str(exc)) from None
        old = self.engine.cfg
        change = compare(old, new)
        pool, loop = self.pool, asyncio.get_running_loop()
        for w in new.workers:
            if w.id in change.added:
                pool.add(w)
        grace = new.master.reload_grace_s
        for worker_id in change.removed:
            index = pool.index(worker_id)
            if index is not None:
                self.leaving[index] = loop.time() + grace
        self.engine.use(new, serving_placement(new, pool))
        self._seen = pool.serves_changed
        if change.added or change.moved:
            # Health and what each serves, now rather than at the next probe: an expert's
            # new holder (reloaded before this master, as `moe-serve reload` does) takes its
            # traffic at once, not up to a probe interval later.
            await pool.probe()
            self.refresh()
        return change.summary()

    def refresh(self) -> None:
        """After a probe: route by what the workers now say they serve (recomputed only
        when one of them says something new: a probe a second must stay cheap)."""
        if self._seen == self.pool.serves_changed:
            return
        self._seen = self.pool.serves_changed
        placement = serving_placement(self.engine.cfg, self.pool)
        if placement.holders != self.engine.placement.holders:
            self.engine.use(self.engine.cfg, placement)

    async def close_drained(self) -> None:
        """Close the removed workers that serve nothing needed and have no call in flight
        (or whose grace has passed)."""
        now = asyncio.get_running_loop().time()
        needed = {w for hs in self.engine.placement.holders.values() for h in hs for w in h}
        for index, until in list(self.leaving.items()):
            idle = index not in needed and self.pool.outstanding[index] == 0
            if idle or now >= until:
                del self.leaving[index]
                await self.pool.close_worker(index)
