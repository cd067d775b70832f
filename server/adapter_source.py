"""The adapter registry as the model catalog sees it: names to immutable versions, and the cards to list.

Every lookup reads the registry's current state (its generation counter is one small file), so a version
promoted by any process — the admin API, the CLI, the trainer's child process — is what the next request gets.
Running requests keep the :class:`~solverx.engine.core.AdapterRef` they resolved, i.e. the version they started with.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

from solverx.adapters.errors import AdapterError, InvalidAdapterName
from solverx.adapters.names import format_model_name, parse_model_name, split_grounded
from solverx.adapters.registry import Registry, VersionInfo
from solverx.engine.core import AdapterRef
from solverx.server.grounding import GroundingPlan
from solverx.server.models import AdapterMatch, ModelCard


def adapter_ref(info: VersionInfo) -> AdapterRef:
    """The engine's handle for one version; ``name@N`` is unique forever, so it is a safe cache key."""
    return AdapterRef(key=info.model_name, path=info.path)


class RegistryAdapterSource:
    """Resolves ``<adapter>`` (its promoted version) and ``<adapter>@<N>`` (pinned) for the catalog."""

    def __init__(self, registry: Registry):
        self.registry = registry
        self._cards: tuple[int, list[ModelCard]] | None = None

    def lookup(self, model: str) -> AdapterMatch | None:
        try:
            plain, forced = split_grounded(model)
            name, version = parse_model_name(plain)
            info = self.registry.resolve(name, version)
        except InvalidAdapterName:
            return None  # not an adapter name at all: the catalog answers "model not found"
        except AdapterError as exc:
            if exc.code == "model_not_found":
                return None
            raise
        grounding = GroundingPlan.for_version(info.path, info.recipe, forced)
        return AdapterMatch(base_id=info.base_id, adapter=adapter_ref(info), display_name=model, grounding=grounding)

    def cards(self) -> Iterable[ModelCard]:
        generation = self.registry.generation()
        if self._cards is None or self._cards[0] != generation:
            self._cards = (generation, list(self._build_cards()))
        return self._cards[1]

    def _build_cards(self) -> Iterable[ModelCard]:
        for name in self.registry.names():
            versions = self.registry.versions(name)
            promoted = next((v for v in versions if v.status == "promoted"), None)
            if promoted is not None:
                yield ModelCard(
                    id=name,
                    created=_epoch(promoted.created),
                    parent=promoted.base_id,
                    root=format_model_name(name, promoted.version),
                )
            for info in versions:
                yield ModelCard(
                    id=info.model_name, created=_epoch(info.created), parent=info.base_id, root=info.model_name
                )


def _epoch(created: str) -> int:
    try:
        return int(datetime.fromisoformat(created).timestamp())
    except (TypeError, ValueError):
        return 0
