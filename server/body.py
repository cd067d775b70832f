"""The one JSON reader of every route: size, depth, number and text guards before any field is looked at.

Python's ``json`` accepts what later code cannot handle: nesting deep enough to raise ``RecursionError``, integers
of thousands of digits (``OverflowError`` as soon as one meets a float), and ``"\\ud800"`` escapes that decode to
lone surrogates, which no tokenizer or UTF-8 encoder takes. Each is refused here with a 400 that says what and
where, so no route meets one.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request

from solverx.server.errors import InvalidRequest, RequestTooLarge

MAX_DEPTH = 64  # arrays and objects inside each other; OpenAI's own bodies nest a handful deep
MAX_INT_DIGITS = 32  # an int longer than this is no count, seed or token id this server can use


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
    """``body`` as JSON that every route can use: see the module docstring for what is refused."""
    try:
        value = json.loads(body, parse_int=_bounded_int)
    except RecursionError:
        raise _too_deep() from None
    except _HugeInteger as exc:
        raise InvalidRequest(
            f"A number in the JSON body has {exc.digits} digits; integers of more than {MAX_INT_DIGITS} digits are "
            "not accepted.",
            code="invalid_value",
        ) from None
    except ValueError as exc:  # includes UnicodeDecodeError
        raise InvalidRequest(
            "We could not parse the JSON body of your request. Send a JSON object with Content-Type: "
            f"application/json ({exc}).",
            code="invalid_json",
        ) from exc
    _check_structure(value)
    return value


def too_large(limit: int) -> RequestTooLarge:
    return RequestTooLarge(f"The request body is larger than this server accepts ({limit} bytes).")


class _HugeInteger(ValueError):
    def __init__(self, digits: int) -> None:
        super().__init__(digits)
        self.digits = digits


def _bounded_int(text: str) -> int:
    digits = len(text.lstrip("-"))
    if digits > MAX_INT_DIGITS:
        raise _HugeInteger(digits)
    return int(text)


def _too_deep() -> InvalidRequest:
    return InvalidRequest(f"The JSON body is nested more than {MAX_DEPTH} levels deep.", code="invalid_json")


def _check_structure(value: Any) -> None:
    """Depth at most :data:`MAX_DEPTH`, and every string (keys too) encodable as UTF-8; iterative, no recursion."""
    stack: list[tuple[Any, int, str]] = [(value, 1, "")]
    while stack:
        node, depth, where = stack.pop()
        if isinstance(node, dict | list):
            if depth > MAX_DEPTH:
                raise _too_deep()
            items = node.items() if isinstance(node, dict) else enumerate(node)
            for key, child in items:
                path = f"{where}.{key}" if isinstance(node, dict) else f"{where}[{key}]"
                if isinstance(key, str):
                    _check_text(key, path)
                stack.append((child, depth + 1, path))
        elif isinstance(node, str):
            _check_text(node, where)


def _check_text(text: str, where: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        field = where.lstrip(".") or "the body"
        field = field.encode("ascii", "backslashreplace").decode("ascii")  # the name itself may hold the surrogate
        raise InvalidRequest(
            f"Invalid text in '{field}': {exc.reason} at position {exc.start} (a lone UTF-16 surrogate such as "
            "\\ud800 is not a character). Send valid Unicode.",
            param=field,
            code="invalid_value",
        ) from None
