"""What the dashboard shows of training's files: the inbox folders, the quarantine with its reasons, a run's chart.

The trainer owns these folders, so it lists them (through :class:`~solverx.trainer.schedule.TrainingManager`);
the server only serves the result. Links are never followed and a request never becomes a path.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from solverx.paths import StateDirs
from solverx.trainer.inbox import is_ignored, is_valid_adapter_name, iter_inbox_files

LOSS_CHART = "loss.png"
REASON_SUFFIX = ".reason"
MAX_FILES_PER_FOLDER = 200
MAX_QUARANTINED = 200
MAX_REASON_CHARS = 8000


def inbox_listing(dirs: StateDirs) -> dict[str, Any]:
    """The inbox folders with their files, and the quarantined files (newest first) with their reasons."""
    folders = []
    for entry in _subdirs(dirs.inbox):
        files = []
        for rel, path in iter_inbox_files(entry):
            try:
                stat = path.stat()
            except OSError:  # removed while we looked
                continue
            files.append({"path": rel, "size": stat.st_size, "mtime": stat.st_mtime})
        folders.append(
            {
                "adapter": entry.name,
                "valid": is_valid_adapter_name(entry.name),
                "files": files[:MAX_FILES_PER_FOLDER],
                "more": max(0, len(files) - MAX_FILES_PER_FOLDER),
            }
        )
    quarantined = sorted(_quarantined(dirs.quarantine), key=lambda q: q["mtime"], reverse=True)
    return {
        "object": "inbox",
        "root": str(dirs.inbox),
        "inbox": folders,
        "quarantine": quarantined[:MAX_QUARANTINED],
        "quarantine_more": max(0, len(quarantined) - MAX_QUARANTINED),
    }


def _subdirs(root: Path) -> list[Path]:
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except OSError:
        return []
    return [Path(e.path) for e in entries if e.is_dir(follow_symlinks=False) and not is_ignored(e.name)]


def _quarantined(root: Path) -> list[dict[str, Any]]:
    """Every ``<adapter>/<run>/<path>.reason`` under ``root`` (links are not followed)."""
    items = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            reason_file = Path(dirpath) / name
            if not name.endswith(REASON_SUFFIX) or reason_file.is_symlink():
                continue
            parts = reason_file.relative_to(root).parts
            if len(parts) < 3:
                continue
            item = reason_file.with_name(name.removesuffix(REASON_SUFFIX))
            try:
                with reason_file.open(encoding="utf-8", errors="replace") as handle:
                    reason = handle.read(MAX_REASON_CHARS + 1)
                mtime = reason_file.stat().st_mtime
            except OSError:
                continue
            if len(reason) > MAX_REASON_CHARS:
                reason = reason[:MAX_REASON_CHARS] + "\n…"
            copied = item.is_file() and not item.is_symlink()
            try:
                size = item.stat().st_size if copied else None
            except OSError:
                copied, size = False, None
            items.append(
                {
                    "adapter": parts[0],
                    "run": parts[1],
                    "path": "/".join((*parts[2:-1], item.name)),
                    "reason": reason.rstrip("\n"),
                    "copied": copied,
                    "size": size,
                    "mtime": mtime,
                }
            )
    return items


def find_chart(runs: Path, run_id: str) -> Path | None:
    """The chart of the run directory named exactly ``run_id``, found by listing ``runs`` (never by joining)."""
    try:
        entries = list(os.scandir(runs))
    except OSError:
        return None
    for entry in entries:
        if entry.name == run_id and entry.is_dir(follow_symlinks=False):
            chart = Path(entry.path) / LOSS_CHART
            if chart.is_file() and not chart.is_symlink():
                return chart
    return None
