"""The dashboard: a static page at ``/`` and the two read-only APIs only it needs.

The page (``server/static/dashboard.html`` + ``.js`` + ``.css``, no build step) contains no data: it reads
``/health``, ``/v1/models``, ``/v1/adapters``, ``/v1/training``, ``/v1/inbox`` and the loss charts with the
API key when one is configured, and chats through ``/v1/chat/completions``. Served with a strict
Content-Security-Policy: scripts and styles from this server only, no inline code, nothing from elsewhere.

- ``GET /v1/inbox``: what is waiting in ``<home>/inbox/<adapter>/`` (path, size, mtime) and what was quarantined
  under ``<home>/quarantine/<adapter>/<run>/`` with the text of its ``.reason`` file.
- ``GET /v1/training/{run_id}/loss.png``: a run's loss chart. The run is looked up among the entries of the runs
  directory by name, so no part of the request ever becomes a path.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from server.errors import ModelNotFound, ServiceUnavailable
from solverx.paths import StateDirs
from trainer.inbox import is_ignored, is_valid_adapter_name, iter_inbox_files

__all__ = ["inbox_listing", "routes"]

STATIC_DIR = Path(__file__).with_name("static")
LOSS_CHART = "loss.png"
REASON_SUFFIX = ".reason"
MAX_FILES_PER_FOLDER = 200
MAX_QUARANTINED = 200
MAX_REASON_CHARS = 8000

CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_PAGE_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
_ASSETS = {  # URL path → (file, media type): the only files served from STATIC_DIR, and served without a key
    "/": ("dashboard.html", "text/html; charset=utf-8"),
    "/dashboard.js": ("dashboard.js", "text/javascript; charset=utf-8"),
    "/dashboard.css": ("dashboard.css", "text/css; charset=utf-8"),
}


async def asset(request: Request) -> Response:
    name, media_type = _ASSETS[request.url.path]
    return FileResponse(STATIC_DIR / name, media_type=media_type, headers=_PAGE_HEADERS)


PUBLIC_PATHS = frozenset(_ASSETS)  # no data in them: the page asks for the API key, then calls the API with it


def _dirs(request: Request) -> StateDirs:
    manager = getattr(request.app.state.solverx, "training", None)
    if manager is None:
        raise ServiceUnavailable("Training is not enabled on this server, so there is no inbox to show.")
    return manager.dirs


async def inbox(request: Request) -> Response:
    return JSONResponse(await run_in_threadpool(inbox_listing, _dirs(request)))


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


async def loss_chart(request: Request) -> Response:
    """``GET /v1/training/{run_id}/loss.png``: the chart a finished run drew of its training loss."""
    run_id = request.path_params["run_id"]
    chart = await run_in_threadpool(_find_chart, _dirs(request).runs, run_id)
    if chart is None:
        raise ModelNotFound(f"No loss chart for training run `{run_id}`.", param="run_id", code="run_not_found")
    return FileResponse(chart, media_type="image/png", headers={"Cache-Control": "no-cache"})


def _find_chart(runs: Path, run_id: str) -> Path | None:
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


routes = [
    *(Route(path, asset, methods=["GET"]) for path in _ASSETS),
    Route("/v1/inbox", inbox, methods=["GET"]),
    Route("/v1/training/{run_id}/loss.png", loss_chart, methods=["GET"]),
]
