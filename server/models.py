"""Model names: which engine and adapter a request's ``model`` selects, and what ``/v1/models`` lists.

A name is a base id (that base, no adapter) or, once an adapter source is plugged in, an adapter name
(``<adapter>`` or ``<adapter>@<N>``). The catalog is the only place that knows the mapping, so
routes never see the registry; :class:`AdapterSource` is the seam where the adapter registry plugs in.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from solverx.server.errors import ModelNotFound

if TYPE_CHECKING:
    from solverx.engine.core import AdapterRef, Engine
    from solverx.server.grounding import GroundingPlan

__all__ = ["AdapterMatch", "AdapterSource", "ModelCard", "ModelCatalog", "Resolved"]

OWNER = "solverx"


@dataclass(frozen=True)
class ModelCard:
    """One entry of ``/v1/models``; ``parent``/``root`` are vLLM's fields (base: root = id, parent None)."""

    id: str
    created: int
    owned_by: str = OWNER
    parent: str | None = None
    root: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "model",
            "created": self.created,
            "owned_by": self.owned_by,
            "parent": self.parent,
            "root": self.root if self.root is not None else self.id,
        }


class Resolved(NamedTuple):
    """What a model name selects: the engine to run on, the adapter (None = the base) and the name to echo."""

    engine: Engine
    adapter: AdapterRef | None
    display_name: str
    grounding: GroundingPlan | None = None  # an adapter version's fact graph, and whether to use it


@dataclass(frozen=True)
class AdapterMatch:
    base_id: str
    adapter: AdapterRef
    display_name: str
    grounding: GroundingPlan | None = None


class AdapterSource(Protocol):
    """What the catalog needs from the adapter registry.

    ``lookup`` returns None for a name it does not know, including one that is not a valid adapter name (the
    client then gets 404 ``model_not_found``); it may raise ``solverx.adapters.errors.AdapterError``, which
    ``solverx.server.errors`` maps to OpenAI errors by code. ``cards`` lists every adapter and pinned version.
    """

    def lookup(self, model: str) -> AdapterMatch | None: ...

    def cards(self) -> Iterable[ModelCard]: ...


class ModelCatalog:
    """Resolves model names to engines; bases are served as-is, anything else is asked of the adapter source."""

    def __init__(self, engines: Mapping[str, Engine], adapters: AdapterSource | None = None):
        self.engines = dict(engines)
        self.adapters = adapters

    def resolve(self, model: str) -> Resolved:
        """The engine and adapter for ``model``; raises :class:`~solverx.server.errors.ModelNotFound`."""
        engine = self.engines.get(model)
        if engine is not None:
            return Resolved(engine, None, model)
        match = self.adapters.lookup(model) if self.adapters is not None else None
        if match is None or match.base_id not in self.engines:
            raise ModelNotFound.for_model(model)
        return Resolved(self.engines[match.base_id], match.adapter, match.display_name, match.grounding)

    def cards(self) -> list[ModelCard]:
        bases = [ModelCard(id=base_id, created=_created(engine)) for base_id, engine in self.engines.items()]
        adapters = list(self.adapters.cards()) if self.adapters is not None else []
        # only adapters this daemon can serve: on one of its bases, and never shadowing a base's own id
        servable = [c for c in adapters if c.parent in self.engines and c.id not in self.engines]
        return bases + servable


def _created(engine: Engine) -> int:
    """When the base's files were written: stable across restarts, unlike the server's start time."""
    try:
        return int((engine.model_dir / "config.json").stat().st_mtime)
    except OSError:
        return 0
