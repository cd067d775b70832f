"""A training run's event log: one JSON object per line in ``<runs>/<run-id>/events.jsonl``.

The child process appends; the daemon, the CLI's progress bar and ``GET /v1/training`` read. Appending whole
lines with one ``write`` keeps readers from ever seeing half an event, and the log survives a crash of either side.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

EVENTS_FILE = "events.jsonl"
CHILD_OUTPUT = "child.log"  # the training child's (and its launcher's) stdout and stderr, beside the events


class RunLog:
    """Append-only writer of one run's events."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / EVENTS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, event: str, **fields: Any) -> None:
        line = json.dumps({"event": event, "time": time.time(), **fields}, ensure_ascii=False, default=str)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(line + "\n")


def read_events(run_dir: Path, start: int = 0) -> Iterator[dict]:
    """Events from line ``start`` on; an unfinished last line (still being written) is skipped."""
    path = Path(run_dir) / EVENTS_FILE
    try:
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    except FileNotFoundError:
        return
    for line in lines[start:]:
        if line.endswith("\n"):
            yield json.loads(line)


@dataclass
class RunSummary:
    """What a reader needs to show a run: its state, latest progress and outcome."""

    run_id: str
    adapter: str = ""
    state: str = "queued"  # queued | running | succeeded | rejected | failed | cancelled | skipped
    stage: str | None = None
    progress: dict | None = None
    version: int | None = None
    reasons: list[str] = field(default_factory=list)
    error: str | None = None
    started: float | None = None
    finished: float | None = None
    quarantined: list[dict] = field(default_factory=list)


def summarize(run_dir: Path) -> RunSummary:
    """Fold a run's events into its current state."""
    summary = RunSummary(run_id=Path(run_dir).name)
    for event in read_events(run_dir):
        kind = event["event"]
        if kind == "queued":
            summary.adapter = event.get("adapter", "")
        elif kind == "started":
            summary.state, summary.adapter, summary.started = "running", event["adapter"], event["time"]
        elif kind == "ingested":
            summary.quarantined = event.get("quarantined", [])
        elif kind == "stage":
            summary.stage = event["stage"]
        elif kind == "progress":
            summary.progress = {k: v for k, v in event.items() if k not in ("event", "time")}
        elif kind == "finished":
            summary.state = event["state"]
            summary.version = event.get("version")
            summary.reasons = event.get("reasons", [])
            summary.error = event.get("error")
            summary.finished = event["time"]
    return summary


SAYS_PREFIX = "solverx: "  # a line the child or its launcher writes for the user (see trainer/launch.py)


def record_silent_exit(run_dir: Path, returncode: int, output: Path) -> dict | None:
    """A child that exited with an error and no ``finished`` event (killed, crashed, a rank of a distributed run
    lost): write the event that says so, with the process's last words, and return it. None when there was none
    to write (a clean exit, a refusal, or a child that said how it finished)."""
    if returncode in (0, 3) or summarize(run_dir).finished is not None:
        return None
    try:
        tail = output.read_text(errors="replace")[-2000:]
    except OSError:
        tail = ""
    said = [line.removeprefix(SAYS_PREFIX) for line in tail.splitlines() if line.startswith(SAYS_PREFIX)]
    error = f"training process exited with {returncode}" + (f": {said[-1]}" if said else "")
    RunLog(run_dir).write("finished", state="failed", error=error, trace=tail)
    return list(read_events(run_dir))[-1]
