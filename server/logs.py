"""Request ids and the access log: one JSON line per request on the ``solverx.access`` logger.

:class:`RequestContext` is the outermost of our middlewares. It gives every HTTP request an id (a sane incoming
``X-Request-ID`` is kept, anything else is replaced by a fresh uuid4 hex), returns it as the ``X-Request-ID``
response header, and when the response is done logs::

    {"ts": "2025-01-01T12:00:00.123Z", "level": "info", "request_id": "…", "method": "POST",
     "path": "/v1/chat/completions", "status": 200, "ms": 41.7, "model": "solverx-tiny"}

``model`` appears once a route has resolved one (:func:`set_model`). A request that fails with an unexpected
exception is answered here with the app's 500 body (so it still carries its id) and logged at level ``error``
with the traceback. Observers (the metrics) get a :class:`RequestRecord` for every finished request.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
import time
import traceback
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TextIO

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from solverx.server.errors import handle_unexpected

__all__ = [
    "ACCESS_LOGGER",
    "REQUEST_ID_HEADER",
    "JSONFormatter",
    "RequestContext",
    "RequestRecord",
    "current_request_id",
    "install_access_log",
    "request_started",
    "set_model",
]

ACCESS_LOGGER = "solverx.access"
REQUEST_ID_HEADER = "X-Request-ID"
_SANE_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_STATE_ID, _STATE_STARTED, _STATE_MODEL = "request_id", "started", "model"

access_log = logging.getLogger(ACCESS_LOGGER)
_request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("solverx_request_id", default=None)


@dataclass(frozen=True)
class RequestRecord:
    """A finished request as the observers see it; ``route`` is the matched route's path template."""

    request_id: str
    method: str
    path: str
    route: str
    status: int
    seconds: float
    model: str | None


Observer = Callable[[RequestRecord], None]


def current_request_id() -> str | None:
    """The id of the request being handled in this task (None outside a request)."""
    return _request_id.get()


def set_model(request: Request, model: str) -> None:
    """Record the model a request was served by, for the access log and the request counter."""
    request.scope.setdefault("state", {})[_STATE_MODEL] = model


def request_started(request: Request) -> float | None:
    """``time.perf_counter()`` when the request arrived, if :class:`RequestContext` saw it."""
    return request.scope.get("state", {}).get(_STATE_STARTED)


class RequestContext:
    """Pure ASGI middleware: request id in, request id out, one access-log line and one record per request."""

    def __init__(self, app: ASGIApp, observers: Iterable[Observer] = ()):
        self.app = app
        self.observers = tuple(observers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = _incoming_id(scope) or uuid.uuid4().hex
        started = time.perf_counter()
        state = scope.setdefault("state", {})
        state[_STATE_ID], state[_STATE_STARTED] = request_id, started
        token = _request_id.set(request_id)
        status = 500
        response_started = False
        id_header = (REQUEST_ID_HEADER.lower().encode(), request_id.encode())

        async def send_with_id(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                response_started = True
                status = message["status"]
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != id_header[0]]
                message = {**message, "headers": [*headers, id_header]}
            await send(message)

        failure: BaseException | None = None
        try:
            await self.app(scope, receive, send_with_id)
        except Exception as exc:
            failure = exc
            if response_started:
                raise  # too late to answer; the server closes the connection
            response = await handle_unexpected(Request(scope, receive), exc)
            await response(scope, receive, send_with_id)
        finally:
            _request_id.reset(token)
            seconds = time.perf_counter() - started
            record = RequestRecord(
                request_id=request_id,
                method=scope.get("method", ""),
                path=scope.get("path", ""),
                route=_route_template(scope),
                status=status,
                seconds=seconds,
                model=state.get(_STATE_MODEL),
            )
            _log(record, failure)
            for observe in self.observers:
                try:
                    observe(record)
                except Exception:
                    fields = {"request_id": request_id, "message": "request observer failed"}
                    access_log.exception("request observer failed", extra={"fields": fields})


def _incoming_id(scope: Scope) -> str | None:
    for key, value in scope.get("headers", []):
        if key.lower() == b"x-request-id":
            text = value.decode("latin-1").strip()
            return text if _SANE_ID.fullmatch(text) else None
    return None


def _route_template(scope: Scope) -> str:
    """The matched route's path (``/v1/models/{model:path}``), never the raw path: metrics labels stay bounded."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else "unmatched"


def _log(record: RequestRecord, failure: BaseException | None) -> None:
    fields: dict[str, Any] = {
        "request_id": record.request_id,
        "method": record.method,
        "path": record.path,
        "status": record.status,
        "ms": round(record.seconds * 1000, 1),
    }
    if record.model is not None:
        fields["model"] = record.model
    level = logging.ERROR if record.status >= 500 or failure is not None else logging.INFO
    if not access_log.isEnabledFor(level):
        return
    exc_info = (type(failure), failure, failure.__traceback__) if failure is not None else None
    message = f"{record.method} {record.path} {record.status}"
    access_log.log(level, message, exc_info=exc_info, extra={"fields": fields})


class JSONFormatter(logging.Formatter):
    """One JSON object per line: ``ts``, ``level``, the record's ``fields`` (or its message), ``error`` and
    ``traceback`` for an exception."""

    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        line: dict[str, Any] = {"ts": ts, "level": record.levelname.lower()}
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            line.update(fields)
        else:
            line["message"] = record.getMessage()
            request_id = current_request_id()
            if request_id is not None:
                line["request_id"] = request_id
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            line["error"] = f"{type(exc).__name__}: {exc}"
            line["traceback"] = "".join(traceback.format_exception(*record.exc_info)).rstrip()
        return json.dumps(line, ensure_ascii=False, default=str)


_HANDLER_MARK = "_solverx_access_handler"


def install_access_log(stream: TextIO | None = None) -> logging.Handler:
    """Give ``solverx.access`` its own JSON-lines handler (stderr by default) once per process.

    The logger does not propagate, so its lines are never reformatted by the ``solverx`` handler; its level
    follows the ``solverx`` logger (``--log-level warning`` keeps only the errors).
    """
    for handler in access_log.handlers:
        if getattr(handler, _HANDLER_MARK, False):
            return handler
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JSONFormatter())
    setattr(handler, _HANDLER_MARK, True)
    access_log.addHandler(handler)
    access_log.propagate = False
    return handler
