"""The daemon's HTTP side: an OpenAI-compatible Starlette app in front of the generation engine.

Where things live: ``app`` (factory, lifespan, /health) · ``routes_openai`` (/v1/chat/completions,
/v1/completions, /v1/models) · ``schemas`` (request validation, response bodies) · ``streaming`` (SSE and client
disconnects) · ``models`` (model name → engine + adapter) · ``errors`` (OpenAI error bodies) · ``training`` (what
the routes need of the trainer, as a protocol). The engine is :mod:`solverx.engine`; ``solverx serve`` is wired in
:mod:`solverx.daemon.serve`. See docs/architecture.md.

The names below are imported lazily, so importing a submodule does not pull in Starlette or uvicorn.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from solverx.server.app import create_app
    from solverx.server.models import ModelCatalog
    from solverx.server.state import ServerState

__all__ = ["ModelCatalog", "ServerState", "create_app"]

_EXPORTS = {
    "ServerState": "solverx.server.state",
    "create_app": "solverx.server.app",
    "ModelCatalog": "solverx.server.models",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'server' has no attribute {name!r}")
