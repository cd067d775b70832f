"""Grounding at request time: the facts of the served version's own graph, put in the prompt before the question.

Which version's graph: the one the request resolved (``solverx`` is the promoted version, ``solverx@3`` is version 3
and only ever its own graph). Whether: the version's recipe (``[grounding] enabled``), overridden per request by
the model name (``solverx+facts``: on) or the body's ``"grounding": true|false``. What: the facts
:meth:`~solverx.adapters.facts.FactStore.retrieve` returns for the last user message, as one system turn
(:func:`~solverx.adapters.facts.grounding_context`, the very text evaluation used), merged into the request's own
system message if it has one; the model family's chat rules fold it into the first user turn where the template
has no system role. No fact retrieved: the prompt is untouched.

The response says what was used: ``X-SolverX-Facts`` (how many) and ``X-SolverX-Fact-Sources`` (their inbox files,
percent-encoded) headers on every answer, a ``Server-Timing: facts;dur=<ms>`` header with what retrieval took, and a
``grounding`` field in a non-streamed body.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from solverx.adapters.facts import (
    FACTS_FILE,
    FactsError,
    RetrievalSettings,
    Retrieved,
    grounding_context,
    open_store,
)
from solverx.models.chat_rules import last_user_text, with_context
from solverx.server.errors import InvalidRequest

FACTS_HEADER = "X-SolverX-Facts"
SOURCES_HEADER = "X-SolverX-Fact-Sources"


@dataclass(frozen=True)
class GroundingPlan:
    """How one resolved version grounds: its graph, whether it is on, and how many facts at what score."""

    facts_path: Path
    enabled: bool
    top_k: int
    min_score: float

    @classmethod
    def for_version(cls, version_dir: Path, recipe: dict[str, Any], forced: bool) -> GroundingPlan:
        settings = RetrievalSettings.from_recipe(recipe)
        return cls(Path(version_dir) / FACTS_FILE, forced or settings.enabled, settings.top_k, settings.min_score)


@dataclass(frozen=True)
class Grounded:
    """The messages to encode and the facts they carry (empty: none were added)."""

    messages: list[dict[str, Any]]
    facts: list[Retrieved]
    seconds: float | None = None  # what retrieval took (None: none was done)

    def headers(self) -> dict[str, str]:
        sources = ",".join(dict.fromkeys(quote(f.source, safe="/:._-") for f in self.facts))
        headers = {FACTS_HEADER: str(len(self.facts)), **({SOURCES_HEADER: sources} if sources else {})}
        if self.seconds is not None:
            headers["Server-Timing"] = f"facts;dur={self.seconds * 1000:.2f}"
        return headers

    def body_field(self) -> dict[str, Any]:
        return {"grounding": {"facts": [f.to_dict() for f in self.facts]}}


def ground(plan: GroundingPlan | None, messages: list[dict[str, Any]], requested: bool | None) -> Grounded:
    """``messages`` with the facts for their last user turn (see the module docstring)."""
    enabled = plan is not None and (plan.enabled if requested is None else requested)
    if not enabled:
        if requested and plan is None:
            raise InvalidRequest("'grounding' needs an adapter version with a fact graph.", param="grounding")
        return Grounded(messages, [])
    try:
        store = open_store(plan.facts_path)
    except FactsError as exc:
        if requested:  # asked for by name: say why it cannot be done
            raise InvalidRequest(f"This model has no fact graph to ground with ({exc}).", param="grounding") from None
        return Grounded(messages, [])
    question = last_user_text(messages)
    started = time.perf_counter()
    facts = store.retrieve(question, plan.top_k, plan.min_score) if question else []
    seconds = time.perf_counter() - started
    context = grounding_context(facts)
    if context is None:
        return Grounded(messages, [], seconds)
    return Grounded(with_context(messages, context), facts, seconds)
