"""The Starlette application: routes, error handlers, and a lifespan that owns the engines.

The lifespan loads every engine before the server accepts connections (uvicorn binds its socket only after
startup completes) and stops them at shutdown, so a request never meets a half-loaded model and a stopped
server leaves no engine thread behind.
"""

from __future__ import annotations

import contextlib
import hmac
import time
from collections.abc import AsyncIterator

import anyio.to_thread
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from solverx.adapters.errors import AdapterError
from solverx.engine.core import Engine, EngineError
from solverx.server import dashboard, routes_admin, routes_ollama, routes_openai, routes_training
from solverx.server.dashboard import PUBLIC_PATHS
from solverx.server.errors import APIError, AuthenticationError, handle_disconnect, handle_error, handle_unexpected
from solverx.server.logs import RequestContext, install_access_log
from solverx.server.metrics import Metrics
from solverx.server.metrics import routes as metrics_routes
from solverx.server.state import ServerState, server_state

__all__ = ["ServerState", "create_app"]


def create_app(state: ServerState) -> Starlette:
    """The ASGI app serving ``state``; running its lifespan starts and stops the engines."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        started: list[Engine] = []
        try:
            for engine in state.engines:
                await anyio.to_thread.run_sync(engine.start)
                started.append(engine)
            if state.training is not None:
                await state.training.start()
            yield
        finally:
            if state.training is not None:
                await state.training.stop()
            for engine in started:
                await anyio.to_thread.run_sync(engine.stop)

    metrics = Metrics(state)
    install_access_log()
    app = Starlette(
        routes=[
            Route("/health", health, methods=["GET"]),
            *routes_openai.routes,
            *routes_ollama.routes,
            *routes_admin.routes,
            *routes_training.routes,
            *dashboard.routes,
            *metrics_routes,
        ],
        exception_handlers={
            HTTPException: handle_error,
            APIError: handle_error,
            EngineError: handle_error,
            AdapterError: handle_error,
            ClientDisconnect: handle_disconnect,
            Exception: handle_unexpected,
        },
        middleware=[
            Middleware(RequestContext, observers=[metrics.observe_request]),  # outermost: every request gets an id
            Middleware(RequireAPIKey, state=state),
        ],
        lifespan=lifespan,
    )
    app.state.solverx = state
    state.metrics = metrics
    return app


class RequireAPIKey:
    """Refuse every request without the configured bearer key, before any body is read.

    Only the dashboard's static shell (``dashboard.PUBLIC_PATHS``: HTML, JS, CSS, no data) is served without it,
    so a browser can load the page that then asks for the key.
    """

    def __init__(self, app: ASGIApp, state: ServerState):
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        key = self.state.api_key
        if key and scope["type"] == "http" and scope["path"] not in PUBLIC_PATHS:
            scheme, _, token = Headers(scope=scope).get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
                error = AuthenticationError("Incorrect or missing API key: send 'Authorization: Bearer <key>'.")
                await error.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def health(request: Request) -> Response:
    """Liveness plus the load the engines carry (``running`` drops to 0 as soon as clients are gone)."""
    state = server_state(request)
    engines = state.engines
    healthy = all(e.alive or e.paused for e in engines)
    return JSONResponse(
        {
            "status": "ok" if healthy else "degraded",
            "models": list(state.catalog.engines),
            "paused": [e.base_id for e in engines if e.paused],  # unloaded while an exclusive training run runs
            "running": sum(e.stats.running for e in engines),
            "waiting": sum(e.stats.waiting for e in engines),
            "uptime_s": round(time.time() - state.started_at, 1),
        },
        status_code=200 if healthy else 503,
    )
