"""Where the daemon keeps its state, and where the repository's data lives.

One state directory holds everything a user would back up: models, adapters, inbox, runs, quarantine, logs.
It defaults to the platform's data directory and is overridden by ``--home`` or ``SOLVERX_HOME``.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import platformdirs

APP_NAME = "solverx"
HOME_ENV = "SOLVERX_HOME"


def resolve_home(override: str | os.PathLike[str] | None = None) -> Path:
    """The state directory: the explicit override, else ``$SOLVERX_HOME``, else the platform default."""
    if override:
        return Path(override).expanduser().resolve()
    if os.environ.get(HOME_ENV):
        return Path(os.environ[HOME_ENV]).expanduser().resolve()
    return Path(platformdirs.user_data_dir(APP_NAME, appauthor=False))


@dataclass(frozen=True)
class StateDirs:
    """The fixed layout inside the state directory."""

    root: Path

    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def adapters(self) -> Path:
        return self.root / "adapters"

    @property
    def inbox(self) -> Path:
        return self.root / "inbox"

    @property
    def runs(self) -> Path:
        return self.root / "runs"

    @property
    def quarantine(self) -> Path:
        return self.root / "quarantine"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def replay_cache(self) -> Path:
        """Each base's own answers for self replay (trainer/self_replay.py)."""
        return self.root / "replay"

    @property
    def eval_cache(self) -> Path:
        """Each base's answers to the evaluation probes (trainer/evaluate.py)."""
        return self.root / "eval-cache"

    def model(self, base_id: str) -> Path:
        return self.models / base_id

    def sweep_partial_writes(self) -> list[Path]:
        """Delete what a process killed mid-write left in the caches (``.<name>.<pid>.partial``, renamed into place
        only when whole); returns what it deleted."""
        swept = []
        for cache in (self.replay_cache, self.eval_cache):
            for path in cache.rglob(".*.partial") if cache.is_dir() else ():
                if path.is_file() and not path.is_symlink():
                    path.unlink(missing_ok=True)
                    swept.append(path)
        return swept

    def create(self) -> StateDirs:
        for path in (self.models, self.adapters, self.inbox, self.runs, self.quarantine, self.logs):
            path.mkdir(parents=True, exist_ok=True)
        return self


def state_dirs(home: str | os.PathLike[str] | None = None) -> StateDirs:
    """The state layout rooted at :func:`resolve_home`, created if missing."""
    return StateDirs(resolve_home(home)).create()


@contextmanager
def exclusive(lock_path: Path) -> Iterator[None]:
    """Serialise the making of one model between processes (the daemon, a training child, tests, the CLI)."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def swap_into_place(staging: Path, target: Path) -> None:
    """Rename ``staging`` to ``target``; an old ``target`` is moved aside first and deleted after (a link to a
    model elsewhere is only unlinked)."""
    if target.is_symlink() or target.is_file():
        target.unlink()
    if not target.exists():
        staging.rename(target)
        return
    retired = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
    target.rename(retired)
    staging.rename(target)
    shutil.rmtree(retired, ignore_errors=True)
