"""What the HTTP side needs of training, as a protocol: the daemon hands the server a trainer that has these verbs.

The server never imports the trainer (``solverx.trainer``); :class:`~solverx.trainer.schedule.TrainingManager` is
the implementation the daemon wires in (:mod:`solverx.daemon.serve`), and a test may wire in another.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol


class RunView(Protocol):
    """One run as ``/v1/training`` and ``/metrics`` show it (``RunSummary`` in the trainer)."""

    run_id: str
    adapter: str
    state: str
    stage: str | None
    progress: dict[str, Any] | None


class QueuedView(Protocol):
    run_id: str
    adapter: str


class TrainingService(Protocol):
    """Queue, list and cancel training runs, and list the files the trainer owns."""

    async def start(self) -> Any: ...
    async def stop(self) -> None: ...
    def request(self, adapter: str, reason: str = "manual", no_replay: bool = False) -> QueuedView: ...
    async def cancel(self, run_id: str) -> bool: ...
    @property
    def queued(self) -> Sequence[QueuedView]: ...
    def runs(self, limit: int = 20) -> Sequence[RunView]: ...
    def inbox_path(self, adapter: str) -> Path | None:
        """``adapter``'s inbox folder when it exists, else None."""
        ...

    def inbox_listing(self) -> dict[str, Any]: ...
    def loss_chart(self, run_id: str) -> Path | None: ...
