"""Where the daemon keeps its state, and where the repository's data lives.

One state directory holds everything a user would back up: models, adapters, inbox, runs, quarantine, logs.
It defaults to the platform's data directory and is overridden by ``--home`` or ``SOLVERX_HOME``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import platformdirs

APP_NAME = "solverx"
HOME_ENV = "SOLVERX_HOME"

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = REPO_ROOT / "data"


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

    def model(self, base_id: str) -> Path:
        return self.models / base_id

    def create(self) -> StateDirs:
        for path in (self.models, self.adapters, self.inbox, self.runs, self.quarantine, self.logs):
            path.mkdir(parents=True, exist_ok=True)
        return self


def state_dirs(home: str | os.PathLike[str] | None = None) -> StateDirs:
    """The state layout rooted at :func:`resolve_home`, created if missing."""
    return StateDirs(resolve_home(home)).create()
