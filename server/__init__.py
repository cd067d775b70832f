"""The daemon's HTTP side: an OpenAI-compatible Starlette app in front of the generation engine.

Where things live: ``app`` (factory, lifespan, /health) · ``routes_openai`` (/v1/chat/completions,
/v1/completions, /v1/models) · ``schemas`` (request validation, response bodies) · ``streaming`` (SSE and client
disconnects) · ``models`` (model name → engine + adapter) · ``errors`` (OpenAI error bodies) · ``engine``
(batched generation) · ``serve`` (``solverx serve``).

The names below are imported lazily, so ``import server.sampling`` does not pull in Starlette or uvicorn.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from server.app import ServerState, create_app
    from server.models import ModelCatalog
    from server.serve import run

__all__ = ["ModelCatalog", "ServerState", "create_app", "run"]

_EXPORTS = {
    "ServerState": "server.app",
    "create_app": "server.app",
    "ModelCatalog": "server.models",
    "run": "server.serve",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'server' has no attribute {name!r}")
