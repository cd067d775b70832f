"""Adapter names and the model strings that select them (``<adapter>`` or ``<adapter>@<version>``, either with
``+facts`` to answer with the version's fact graph).

A name becomes a directory under the registry root, so it is checked against a strict pattern rather than
sanitised: anything with a slash, ``..``, uppercase or an empty string is refused, never rewritten.
"""

from __future__ import annotations

import re

from solverx.adapters.errors import InvalidAdapterName

NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
_VERSION_PATTERN = re.compile(r"[1-9][0-9]{0,8}")


def validate_name(name: str) -> str:
    """Return ``name`` unchanged if it is a valid adapter name, else raise :class:`InvalidAdapterName`."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise InvalidAdapterName(
            f"invalid adapter name {name!r}: use 1-64 characters from a-z, 0-9, '.', '_', '-', "
            "starting with a letter or digit"
        )
    return name


def parse_model_name(model: str) -> tuple[str, int | None]:
    """Split ``"solverx@3"`` into ``("solverx", 3)`` and ``"solverx"`` into ``("solverx", None)``."""
    if not isinstance(model, str):
        raise InvalidAdapterName(f"invalid model name {model!r}")
    name, sep, version = model.partition("@")
    validate_name(name)
    if not sep:
        return name, None
    if not _VERSION_PATTERN.fullmatch(version):
        raise InvalidAdapterName(f"invalid version in model name {model!r}: expected <adapter>@<N> with N >= 1")
    return name, int(version)


GROUNDED_SUFFIX = "+facts"


def split_grounded(model: str) -> tuple[str, bool]:
    """``"solverx@3+facts"`` -> ``("solverx@3", True)``; a name without the suffix comes back as it is."""
    if isinstance(model, str) and model.endswith(GROUNDED_SUFFIX):
        return model[: -len(GROUNDED_SUFFIX)], True
    return model, False


def format_model_name(name: str, version: int | None = None) -> str:
    """The inverse of :func:`parse_model_name`."""
    return name if version is None else f"{name}@{version}"
