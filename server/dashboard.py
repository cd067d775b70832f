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

from pathlib import Path

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from solverx.server.errors import ModelNotFound, ServiceUnavailable
from solverx.server.state import server_state
from solverx.server.training import TrainingService

__all__ = ["PUBLIC_PATHS", "routes"]

STATIC_DIR = Path(__file__).with_name("static")

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


def _training(request: Request) -> TrainingService:
    training = server_state(request).training
    if training is None:
        raise ServiceUnavailable("Training is not enabled on this server, so there is no inbox to show.")
    return training


async def inbox(request: Request) -> Response:
    return JSONResponse(await run_in_threadpool(_training(request).inbox_listing))


async def loss_chart(request: Request) -> Response:
    """``GET /v1/training/{run_id}/loss.png``: the chart a finished run drew of its training loss."""
    run_id = request.path_params["run_id"]
    chart = await run_in_threadpool(_training(request).loss_chart, run_id)
    if chart is None:
        raise ModelNotFound(f"No loss chart for training run `{run_id}`.", param="run_id", code="run_not_found")
    return FileResponse(chart, media_type="image/png", headers={"Cache-Control": "no-cache"})


routes = [
    *(Route(path, asset, methods=["GET"]) for path in _ASSETS),
    Route("/v1/inbox", inbox, methods=["GET"]),
    Route("/v1/training/{run_id}/loss.png", loss_chart, methods=["GET"]),
]
