"""JSON from untrusted bytes (a request body, an adapter someone dropped in), parsed so nothing downstream breaks.

Python's ``json`` accepts what later code cannot handle: nesting deep enough to raise ``RecursionError``, integers
of thousands of digits (``OverflowError`` as soon as one meets a float), ``1e400`` (infinity), and ``"\\ud800"``
escapes that decode to lone surrogates, which no tokenizer or UTF-8 encoder takes. :func:`loads` refuses each with
an :class:`UnsafeJSON` that says what and where; the caller turns it into its own error (a 400, an invalid adapter).
"""

from __future__ import annotations

import json
import math
from typing import Any

MAX_DEPTH = 64  # arrays and objects inside each other; OpenAI's bodies and adapter configs nest a handful deep
MAX_INT_DIGITS = 32  # longer than any count, seed, size or token id


class UnsafeJSON(ValueError):
    """Valid JSON we refuse; ``where`` is the path of the offending value (``messages[0].content``), or ""."""

    def __init__(self, message: str, where: str = "", kind: str = "invalid_value") -> None:
        super().__init__(message)
        self.where, self.kind = where, kind


def loads(data: str | bytes, *, max_depth: int = MAX_DEPTH) -> Any:
    """``json.loads`` that raises :class:`UnsafeJSON` for the cases above (and ``ValueError`` for bad JSON)."""
    try:
        value = json.loads(data, parse_int=_bounded_int, parse_float=_finite_float)
    except RecursionError:
        raise UnsafeJSON(f"nested more than {max_depth} levels deep", kind="too_deep") from None
    check_structure(value, max_depth)
    return value


def check_structure(value: Any, max_depth: int = MAX_DEPTH) -> None:
    """Depth at most ``max_depth``, and every string (keys too) encodable as UTF-8; iterative, no recursion."""
    stack: list[tuple[Any, int, str]] = [(value, 1, "")]
    while stack:
        node, depth, where = stack.pop()
        if isinstance(node, dict | list):
            if depth > max_depth:
                raise UnsafeJSON(f"nested more than {max_depth} levels deep", kind="too_deep")
            items = node.items() if isinstance(node, dict) else enumerate(node)
            for key, child in items:
                path = f"{where}.{key}" if isinstance(node, dict) else f"{where}[{key}]"
                if isinstance(key, str):
                    _check_text(key, encodable(path.lstrip(".")))
                stack.append((child, depth + 1, path))
        elif isinstance(node, str):
            _check_text(node, encodable(where.lstrip(".")))


def encodable(text: str) -> str:
    """``text`` with what UTF-8 cannot encode (a lone surrogate) written as an escape, so it can always be sent or
    printed: a path whose key holds a surrogate, an error message quoting one."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _bounded_int(text: str) -> int:
    digits = len(text.lstrip("-"))
    if digits > MAX_INT_DIGITS:
        raise UnsafeJSON(f"a number has {digits} digits; integers of more than {MAX_INT_DIGITS} digits are refused")
    return int(text)


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise UnsafeJSON(f"the number {text[:40]} is out of range")
    return value


def _check_text(text: str, where: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise UnsafeJSON(
            f"invalid text in '{where or 'the body'}': {exc.reason} at position {exc.start} (a lone UTF-16 surrogate "
            "such as \\ud800 is not a character)",
            where=where,
        ) from None
