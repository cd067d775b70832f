"""When training runs: a queue drained by one APScheduler job, fed by the inbox watcher, a cron schedule and requests.

Lives in the serve process (started in the Starlette lifespan). Each run is a child process (``solverx.trainer.child``);
at most one runs at a time (the job has ``max_instances=1, coalesce=True``). The daemon only spawns, watches and
cancels; the run's own log says what happened, so the daemon can be restarted mid-run without losing history.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger

from solverx.adapters.names import validate_name
from solverx.adapters.registry import Registry
from solverx.paths import StateDirs
from solverx.trainer.child import TrainHosts
from solverx.trainer.inbox import InboxWatcher, is_valid_adapter_name, list_adapters, snapshot
from solverx.trainer.listing import find_chart, inbox_listing
from solverx.trainer.recipe import RECIPE_FILE, Recipe, RecipeError, load_recipe, recipe_defaults
from solverx.trainer.run import last_trained_hash, new_run_id
from solverx.trainer.runlog import CHILD_OUTPUT, RunLog, RunSummary, read_events, record_silent_exit, summarize

log = logging.getLogger("solverx.trainer")

QUEUE_JOB = "training-queue"
SCHEDULE_JOB = "training-schedule"


@dataclass
class Queued:
    adapter: str
    reason: str
    run_id: str
    no_replay: bool = False


@dataclass
class TrainingManager:
    """Queue, run (one at a time, in a child) and cancel training runs; report their state."""

    dirs: StateDirs
    registry: Registry
    debounce_s: float = 10.0
    rescan_s: float = 60.0
    schedule: str | None = None  # a 5-field crontab: train every changed inbox at those times
    watch: bool = True
    default_base: str = "solverx-tiny"  # what a recipe without ``base`` trains on (the daemon's first base)
    hosts: TrainHosts = field(default_factory=TrainHosts)  # where a run's ranks train (default: one, here)
    exclusive: Callable[[str, Recipe], contextlib.AbstractAsyncContextManager] | None = None
    """Per adapter: a context the run executes in; the daemon pauses the adapter's base in it when training
    and serving would not fit in memory together (see solverx.daemon.serve)."""
    _queue: deque[Queued] = field(default_factory=deque, init=False)
    _running: tuple[Queued, asyncio.subprocess.Process] | None = field(default=None, init=False)
    _current: Queued | None = field(default=None, init=False)  # off the queue, from then until its child has ended
    _starting: Queued | None = field(default=None, init=False)  # off the queue, its child not spawned yet
    _cancelled: set[str] = field(default_factory=set, init=False)
    _scheduler: AsyncIOScheduler | None = field(default=None, init=False)
    _watcher: InboxWatcher | None = field(default=None, init=False)
    _loop: asyncio.AbstractEventLoop | None = field(default=None, init=False)

    async def start(self) -> TrainingManager:
        self._loop = asyncio.get_running_loop()
        self._scheduler = AsyncIOScheduler()
        self._scheduler.add_job(self._drain, IntervalTrigger(seconds=5), id=QUEUE_JOB, max_instances=1, coalesce=True)
        if self.schedule:
            self._scheduler.add_job(
                self._scheduled,
                CronTrigger.from_crontab(self.schedule),
                id=SCHEDULE_JOB,
                max_instances=1,
                coalesce=True,
            )
        self._scheduler.start()
        if self.watch:
            self._watcher = InboxWatcher(
                self.dirs.inbox,
                on_ready=self._on_inbox_ready,
                last_hash=self.last_hash,
                debounce_s=self.debounce_s,
                rescan_s=self.rescan_s,
            ).start()
        return self

    async def stop(self) -> None:
        if self._watcher is not None:
            await asyncio.to_thread(self._watcher.stop)
        if self._running is not None:
            await self.cancel(self._running[0].run_id)
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=False)

    # -- requests ---------------------------------------------------------------------------------------------

    def request(self, adapter: str, reason: str = "manual", no_replay: bool = False) -> Queued:
        """Queue a run for ``adapter`` unless one is already queued; returns the queued (or existing) entry."""
        validate_name(adapter)
        for entry in self._queue:
            if entry.adapter == adapter:
                return entry
        entry = Queued(adapter, reason, new_run_id(adapter), no_replay)
        self._queue.append(entry)
        RunLog(self.dirs.runs / entry.run_id).write("queued", adapter=adapter, reason=reason)
        self._wake()
        return entry

    async def cancel(self, run_id: str) -> bool:
        """Stop a queued or running run; the previous version keeps serving."""
        for entry in list(self._queue):
            if entry.run_id == run_id:
                self._queue.remove(entry)
                RunLog(self.dirs.runs / run_id).write("finished", state="cancelled")
                return True
        if self._starting is not None and self._starting.run_id == run_id:
            # Between leaving the queue and its child existing (the spawn is awaited, so a DELETE can land here):
            # mark it, and _run_child stops the child as soon as it has one.
            self._cancelled.add(run_id)
            return True
        if self._running is not None and self._running[0].run_id == run_id:
            self._cancelled.add(run_id)
            process = self._running[1]
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), timeout=10)
            except TimeoutError:
                process.kill()
            return True
        return False

    @property
    def queued(self) -> list[Queued]:
        return list(self._queue)

    def runs(self, limit: int = 20) -> list[RunSummary]:
        """Newest first: queued, running and finished runs."""
        dirs = sorted((p for p in self.dirs.runs.glob("*") if p.is_dir() and not p.is_symlink()), reverse=True)[:limit]
        summaries = [summarize(d) for d in dirs]
        current = self._current.run_id if self._current else None
        queued = {entry.run_id for entry in self._queue}
        for s in summaries:  # what a daemon killed mid-run (or before the run began) left behind
            if s.state == "running" and s.run_id != current:
                s.state, s.error = "failed", s.error or "the training process ended without finishing"
            elif s.state == "queued" and s.run_id not in queued and s.run_id != current:
                s.state, s.error = "failed", "the daemon stopped before this run started"
        return summaries

    def inbox_path(self, adapter: str) -> Path | None:
        """``adapter``'s inbox folder when there is one (a link is not one)."""
        path = self.dirs.inbox / adapter
        return path if is_valid_adapter_name(adapter) and path.is_dir() and not path.is_symlink() else None

    def recipe_of(self, adapter: str) -> Recipe:
        """The recipe a run of ``adapter`` will read: its inbox's, else the defaults (a bad one: the run reports it)."""
        inbox = self.inbox_path(adapter)
        defaults = recipe_defaults(self.default_base)
        try:
            return load_recipe(inbox / RECIPE_FILE, defaults) if inbox and (inbox / RECIPE_FILE).is_file() else defaults
        except (OSError, RecipeError):
            return defaults

    def inbox_listing(self) -> dict[str, Any]:
        """The inbox folders and the quarantine, for the dashboard (see :mod:`solverx.trainer.listing`)."""
        return inbox_listing(self.dirs)

    def loss_chart(self, run_id: str) -> Path | None:
        """The loss chart of the run named exactly ``run_id``, if it drew one."""
        return find_chart(self.dirs.runs, run_id)

    def last_hash(self, adapter: str) -> str | None:
        """The inbox content hash of the last run attempted for ``adapter``: an unchanged inbox never retrains."""
        for run_dir in sorted(self.dirs.runs.glob(f"*-{adapter}"), reverse=True):
            for event in read_events(run_dir):
                if event["event"] == "ingested":
                    return event["snapshot"]
        return last_trained_hash(self.registry, adapter)

    # -- internals --------------------------------------------------------------------------------------------

    def _on_inbox_ready(self, adapter: str) -> None:
        """Called on the watcher's thread; hand over to the event loop."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self.request, adapter, "inbox changed")

    async def _scheduled(self) -> None:
        for adapter in list_adapters(self.dirs.inbox):
            if snapshot(self.dirs.inbox / adapter).content_hash != self.last_hash(adapter):
                self.request(adapter, "schedule")

    def _wake(self) -> None:
        if self._scheduler is not None and self._scheduler.running:
            job = self._scheduler.get_job(QUEUE_JOB)
            if job is not None:
                job.modify(next_run_time=datetime.now(job.next_run_time.tzinfo) + timedelta(milliseconds=10))

    async def _drain(self) -> None:
        while self._queue:
            entry = self._current = self._queue.popleft()
            try:
                await self._run_child(entry)
            finally:
                self._current = None

    async def _run_child(self, entry: Queued) -> None:
        args = ["--home", str(self.dirs.root), "--adapter", entry.adapter, "--run-id", entry.run_id]
        args += ["--default-base", self.default_base]
        if entry.no_replay:
            args.append("--no-replay")
        log.info("training %s (%s), run %s", entry.adapter, entry.reason, entry.run_id)
        output_path = self.dirs.runs / entry.run_id / CHILD_OUTPUT
        context = (
            self.exclusive(entry.adapter, self.recipe_of(entry.adapter)) if self.exclusive else contextlib.nullcontext()
        )
        async with context:  # pauses the base first when training and serving do not fit together
            self._starting = entry
            try:
                with output_path.open("ab") as output:
                    process = await asyncio.create_subprocess_exec(
                        *self.hosts.command(args),
                        cwd=self.dirs.root, env=self.hosts.env(), stdout=output, stderr=asyncio.subprocess.STDOUT,
                    )  # fmt: skip
            finally:
                self._starting = None
            self._running = (entry, process)
            if entry.run_id in self._cancelled:  # cancelled while the child was being spawned
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signal.SIGTERM)
            try:
                await process.wait()
            finally:
                self._running = None
        if entry.run_id in self._cancelled:
            self._cancelled.discard(entry.run_id)
            RunLog(self.dirs.runs / entry.run_id).write("finished", state="cancelled")
        else:
            record_silent_exit(self.dirs.runs / entry.run_id, process.returncode, output_path)
        log.info("run %s: %s", entry.run_id, summarize(self.dirs.runs / entry.run_id).state)
