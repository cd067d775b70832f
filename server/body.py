"""The one JSON reader of every route: the size limit, then :mod:`solverx.safejson`'s depth, number and text
guards, before any field is looked at; what they refuse is a 400 that says what and where."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request

from solverx import safejson
from solverx.server.errors import InvalidRequest, RequestTooLarge


async def read_json(request: Request, limit: int) -> Any:
    """The request body parsed as JSON, refusing bodies over ``limit`` bytes before reading all of them."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large(limit)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large(limit)
    return parse_json(bytes(body))


def parse_json(body: bytes) -> Any:
    """``body`` as JSON that every route can use (see :mod:`solverx.safejson` for what is refused)."""
    try:
        return safejson.loads(body)
    except safejson.UnsafeJSON as exc:
        code = "invalid_json" if exc.kind == "too_deep" else "invalid_value"
        raise InvalidRequest(f"The JSON body is refused: {exc}. Send valid Unicode and plain values.",
                             param=exc.where or None, code=code) from None  # fmt: skip
    except ValueError as exc:  # includes UnicodeDecodeError
        raise InvalidRequest(
            "We could not parse the JSON body of your request. Send a JSON object with Content-Type: "
            f"application/json ({exc}).",
            code="invalid_json",
        ) from exc


def too_large(limit: int) -> RequestTooLarge:
    return RequestTooLarge(f"The request body is larger than this server accepts ({limit} bytes).")
