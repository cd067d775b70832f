"""What every route shares, as one typed object: :class:`ServerState`, reached with :func:`server_state`."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from starlette.requests import Request

from solverx.adapters.registry import Registry
from solverx.engine.core import Engine
from solverx.server.models import ModelCatalog
from solverx.server.training import TrainingService

if TYPE_CHECKING:
    from solverx.server.metrics import Metrics

MiB = 1024 * 1024


@dataclass
class ServerState:
    """Everything the routes share: the model catalog and the limits applied to every request."""

    catalog: ModelCatalog
    max_body_bytes: int = 1 * MiB
    max_tokens_cap: int = 4096
    default_model: str | None = None
    """The model used when a request names none; None makes ``model`` required, as OpenAI does."""
    api_key: str | None = None
    """When set, every route but the dashboard's static shell requires ``Authorization: Bearer <api_key>``."""
    registry: Registry | None = None
    """The adapter store; None serves bases only."""
    training: TrainingService | None = None
    """Started after the engines and stopped before them; None disables training."""
    started_at: float = field(default_factory=time.time)
    metrics: Metrics | None = None
    """Set by :func:`~solverx.server.app.create_app`."""

    @property
    def engines(self) -> list[Engine]:
        return list(self.catalog.engines.values())


def server_state(request: Request) -> ServerState:
    """The state of the app serving ``request`` (set by :func:`~solverx.server.app.create_app`)."""
    return request.app.state.solverx
