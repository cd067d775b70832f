"""Every error the HTTP layer reports, as OpenAI's error body ``{"error": {message, type, param, code}}``.

Clients written for OpenAI branch on the status code (the official SDK maps 400/404/413/500… to exception
classes) and on ``code``, so each failure gets both right. Domain errors from the engine and the adapter store
are translated here by their ``code``/``status`` attributes, so this module does not import either of them.

    APIError
    ├── InvalidRequest            400 invalid_request_error (param names the field; code says what, e.g.
    │                                 context_length_exceeded from the engine's ContextLengthExceeded)
    ├── AuthenticationError       401 invalid_api_key
    ├── ModelNotFound             404 model_not_found
    ├── UnknownURL                404 unknown_url
    ├── MethodNotAllowed          405 method_not_allowed
    ├── Conflict                  409
    ├── RequestTooLarge           413 request_too_large
    ├── ServiceUnavailable        503 server_error
    └── InternalError             500 server_error
"""

from __future__ import annotations

import logging
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from solverx.safejson import encodable

log = logging.getLogger("solverx.server")

__all__ = [
    "APIError",
    "AuthenticationError",
    "Conflict",
    "InternalError",
    "InvalidRequest",
    "MethodNotAllowed",
    "ModelNotFound",
    "RequestTooLarge",
    "ServiceUnavailable",
    "UnknownURL",
    "error_body",
    "handle_disconnect",
    "handle_error",
    "handle_unexpected",
    "to_api_error",
]


class APIError(Exception):
    """An error reported to the client; the class fixes status and type, the instance message/param/code."""

    status = 500
    type = "server_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        message, param = encodable(message), encodable(param) if param is not None else None
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


class InvalidRequest(APIError):
    """The request is malformed or asks for something this server does not do."""

    status = 400
    type = "invalid_request_error"
    code = "invalid_value"


class AuthenticationError(APIError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class ModelNotFound(APIError):
    status = 404
    type = "invalid_request_error"
    code = "model_not_found"

    @classmethod
    def for_model(cls, model: str) -> ModelNotFound:
        return cls(f"The model `{model}` does not exist.", param="model")


class UnknownURL(APIError):
    status = 404
    type = "invalid_request_error"
    code = "unknown_url"


class MethodNotAllowed(APIError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class Conflict(APIError):
    status = 409
    type = "invalid_request_error"
    code = "conflict"


class RequestTooLarge(APIError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class ServiceUnavailable(APIError):
    status = 503
    type = "server_error"
    code = "service_unavailable"


class InternalError(APIError):
    status = 500
    type = "server_error"
    code = "internal_error"


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# Domain errors (solverx.engine.core.EngineError, solverx.adapters.errors.AdapterError) carry a stable ``code``;
# engine errors also carry ``status``. Adapter codes map to statuses here; a code-less error is a bug in this
# server (500).
_CLASS_BY_STATUS: dict[int, type[APIError]] = {
    400: InvalidRequest,
    404: ModelNotFound,
    405: MethodNotAllowed,
    409: Conflict,
    413: RequestTooLarge,
    503: ServiceUnavailable,
}
_STATUS_BY_CODE = {
    "model_not_found": 404,
    "invalid_name": 400,
    "invalid_adapter": 400,
    "base_mismatch": 409,
    "adapter_conflict": 409,
    "context_length_exceeded": 400,
}
_PARAM_BY_CODE = {"model_not_found": "model", "invalid_name": "model", "invalid_adapter": "model"}


def to_api_error(exc: BaseException, param: str | None = None) -> APIError:
    """The client-facing form of any exception; unknown exceptions become a bare 500 (no details leak)."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, HTTPException):
        return _from_http_exception(exc)
    code = getattr(exc, "code", None)
    status = getattr(exc, "status", None) or _STATUS_BY_CODE.get(code or "")
    if not isinstance(code, str) or not isinstance(status, int) or (status >= 500 and status != 503):
        return InternalError("The server had an error while processing your request.")
    cls = _CLASS_BY_STATUS.get(status, InvalidRequest)
    retry_after = getattr(exc, "retry_after", None)
    headers = {"Retry-After": str(retry_after)} if retry_after else None
    param = getattr(exc, "param", None) or param or _PARAM_BY_CODE.get(code)  # the error's own field comes first
    return cls(str(exc), param=param, code=code, headers=headers)


def _from_http_exception(exc: HTTPException) -> APIError:
    """Routing errors (404/405) and any HTTPException raised by Starlette itself."""
    if exc.status_code == 404:
        return UnknownURL(exc.detail)
    if exc.status_code == 405:
        return MethodNotAllowed(exc.detail, headers=exc.headers)
    error = (InternalError if exc.status_code >= 500 else InvalidRequest)(exc.detail, headers=exc.headers)
    error.status = exc.status_code
    return error


async def handle_error(request: Request, exc: Exception) -> Response:
    """Starlette exception handler for every error a client can cause: answer in OpenAI's schema."""
    error = to_api_error(exc)
    if isinstance(exc, HTTPException) and exc.status_code in (404, 405):
        problem = "Invalid URL" if exc.status_code == 404 else "Method not allowed"
        error.message = f"{problem} ({request.method} {request.url.path})"
    if error.status >= 500:
        log.error("%s %s failed: %s: %s", request.method, request.url.path, type(exc).__name__, exc)
    return error.response()


async def handle_disconnect(request: Request, exc: Exception) -> Response:
    """The client left while its body was being read; nobody will read an answer."""
    return Response(status_code=400)


async def handle_unexpected(request: Request, exc: Exception) -> Response:
    """The 500 handler: the traceback goes to the server log (Starlette re-raises to uvicorn), never the body."""
    return InternalError("The server had an error while processing your request.").response()
