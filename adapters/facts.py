"""The fact graph stored with an adapter version, and retrieval from it. This module owns ``facts.sqlite``.

A version's graph holds what its inbox stated: entities (names, products, places, people) with their aliases in
any language, the facts that mention them (a Q&A answer, a sentence of knowledge text, an ontology statement),
and the ontology's relations between entities. It is written once by the trainer, copied into the version
directory by the registry, and never modified, like the adapter's weights: a pinned version always retrieves
from its own graph.

Why SQLite: it is in Python's standard library, one file is written whole and renamed into place, its FTS5 index
ranks by BM25 in the same query that filters by entity, and readers need no server. Korean words carry their
particles (솔버엑스의, 본사는), so the index stores Hangul as overlapping character pairs (as Lucene's CJK
analyzer does) and Latin text as words: a question matches a fact by the pairs and words they share.

Retrieval (:meth:`FactStore.retrieve`): find the entities the question names (a whole name or alias scores 1, part
of a several-word name the part's share), and only if a *distinctive* one (a name the general data does not use)
scores at least ``min_score``: take the facts about those entities and, one hop away, about the entities the
ontology relates them to; rank them by BM25 and entity matches; return the top ``top_k``. A question that names
no domain entity retrieves nothing, so it is answered exactly as without grounding.
"""

from __future__ import annotations

import functools
import json
import os
import re
import sqlite3
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

FACTS_FILE = "facts.sqlite"
FORMAT = 1
ENTITY_WEIGHT = 1.0  # per matched entity a fact mentions, beside BM25 normalized to [0, 1]
HOP_WEIGHT = 0.05  # per entity one hop away that a fact mentions: a tie-breaker; the hop adds candidates
NEAR_DUPLICATE = 0.7  # share of index terms two facts have in common (Jaccard) above which one repeats the other
_HANGUL = re.compile(r"[\uac00-\ud7a3]+")
_LATIN = re.compile(r"[a-z0-9]+")
_WORD_OR_HANGUL = re.compile(r"[a-z0-9]+|[\uac00-\ud7a3]+")
_POSSESSIVE = re.compile(r"['’]s\b")
# Function words carry no match in a small graph: BM25's IDF cannot tell them from content in a few dozen facts.
STOPWORDS = frozenset(
    ("a", "an", "and", "are", "as", "at", "be", "by", "can", "do", "does", "did", "for", "from", "has", "have",
     "how", "i", "in", "is", "it", "its", "me", "of", "on", "or", "s", "tell", "that", "the", "their", "this", "to",
     "was", "were", "what", "when", "where", "which", "who", "whom", "why", "with", "you", "your")
)  # fmt: skip

_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE entity (id INTEGER PRIMARY KEY, name TEXT NOT NULL, distinctive INTEGER NOT NULL);
CREATE TABLE alias (entity INTEGER NOT NULL REFERENCES entity(id), name TEXT NOT NULL);
CREATE TABLE fact (id INTEGER PRIMARY KEY, text TEXT NOT NULL, source TEXT NOT NULL);
CREATE TABLE mention (fact INTEGER NOT NULL REFERENCES fact(id), entity INTEGER NOT NULL REFERENCES entity(id));
CREATE TABLE relation (subject INTEGER NOT NULL, predicate TEXT NOT NULL, object INTEGER NOT NULL);
CREATE VIRTUAL TABLE fact_terms USING fts5(terms, tokenize = 'unicode61');
CREATE INDEX mention_by_entity ON mention(entity);
"""


class FactsError(Exception):
    """A fact graph that cannot be read (missing, not ours, or of a newer format)."""


@dataclass(frozen=True)
class Entity:
    name: str
    aliases: tuple[str, ...] = ()
    distinctive: bool = True  # False: the general data uses this name too (Seoul), so it alone triggers nothing

    @property
    def names(self) -> tuple[str, ...]:
        return (self.name, *self.aliases)


@dataclass(frozen=True)
class Fact:
    text: str
    source: str  # inbox path and line, or the ontology file
    entities: tuple[int, ...]  # indices into FactGraph.entities
    index_text: str = ""  # what the index matches besides the fact itself (a Q&A's question)


@dataclass(frozen=True)
class Relation:
    subject: int
    predicate: str
    object: int


@dataclass
class FactGraph:
    entities: list[Entity] = field(default_factory=list)
    facts: list[Fact] = field(default_factory=list)
    relations: list[Relation] = field(default_factory=list)


@dataclass(frozen=True)
class Retrieved:
    """One fact retrieved for a question, as the API shows it."""

    fact: str
    score: float
    entities: list[str]
    source: str

    def to_dict(self) -> dict:
        return {"fact": self.fact, "score": self.score, "entities": self.entities, "source": self.source}


def index_terms(text: str) -> list[str]:
    """Latin words (lowercased, no possessive ``'s``, no :data:`STOPWORDS`) and overlapping pairs of Hangul
    syllables (a lone syllable as itself)."""
    terms: list[str] = []
    for run in _WORD_OR_HANGUL.findall(_POSSESSIVE.sub("", text.lower())):
        if _HANGUL.fullmatch(run):
            terms += [run] if len(run) == 1 else [run[i : i + 2] for i in range(len(run) - 1)]
        elif run not in STOPWORDS:
            terms.append(run)
    return terms


def name_match(name: str, text: str) -> float:
    """How much of ``name`` ``text`` contains: 1.0 for the whole name (Latin words on word boundaries, Hangul as
    a substring, since particles attach to it), else the share of its words found (0 for a one-word name)."""
    lowered, target = name.lower().strip(), text.lower()
    if not lowered:
        return 0.0
    if _whole(lowered, target):
        return 1.0
    words = _WORD_OR_HANGUL.findall(lowered)
    if len(words) < 2:
        return 0.0
    return sum(_whole(w, target) for w in words) / len(words)


def _whole_name(lowered: str) -> re.Pattern[str]:
    """How a lowercased name occurs as a whole: Hangul as a substring (particles attach to it), Latin on word
    boundaries."""
    if _HANGUL.search(lowered) and not _LATIN.search(lowered):
        return re.compile(re.escape(lowered))
    return re.compile(rf"(?<![a-z0-9]){re.escape(lowered)}(?![a-z0-9])")


def _spans(name: str, text: str) -> list[tuple[int, int]]:
    """Where ``name`` occurs in ``text`` as a whole name (case-insensitive)."""
    lowered = name.lower().strip()
    return [m.span() for m in _whole_name(lowered).finditer(text.lower())] if lowered else []


def _whole(name: str, text: str) -> bool:
    return _whole_name(name).search(text) is not None


@dataclass(frozen=True)
class RetrievalSettings:
    """A version's ``[grounding]`` settings as its manifest's recipe records them (the trainer's defaults where
    the recipe predates them)."""

    enabled: bool = False
    top_k: int = 3
    min_score: float = 0.6

    @classmethod
    def from_recipe(cls, recipe: dict) -> RetrievalSettings:
        table = (recipe or {}).get("grounding") or {}
        return cls(bool(table.get("enabled", False)), int(table.get("top_k", 3)), float(table.get("min_score", 0.6)))


def retrieve_for_version(version_dir: Path, recipe: dict, query: str, top_k: int | None = None) -> list[Retrieved]:
    """What grounding would give ``query`` on one version (its own graph and settings); raises :class:`FactsError`
    when the version has no graph."""
    settings = RetrievalSettings.from_recipe(recipe)
    return open_store(Path(version_dir) / FACTS_FILE).retrieve(query, top_k or settings.top_k, settings.min_score)


GROUNDING_HEADER = "Facts you know (answer from them when the question is about them):"


def grounding_context(facts: Sequence[Retrieved]) -> str | None:
    """The system turn that gives a model its retrieved facts, the same in serving and in evaluation (None: no
    facts, so the prompt is exactly the ungrounded one). The best fact comes last, next to the question: a small
    model leans on what it read last."""
    if not facts:
        return None
    return GROUNDING_HEADER + "\n" + "\n".join(f"- {f.fact}" for f in reversed(facts))  # the best one last


@functools.lru_cache(maxsize=64)
def open_store(path: Path) -> FactStore:
    """A version's store, opened once: versions never change, and their numbers are never reused."""
    return FactStore(path)


def _overlap(a: set[str], b: set[str]) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def write_graph(graph: FactGraph, path: Path) -> Path:
    """Write ``graph`` to ``path`` whole (a temporary file beside it, then renamed)."""
    path = Path(path)
    partial = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.partial")
    connection = sqlite3.connect(partial)
    try:
        with connection:
            connection.executescript(_SCHEMA)
            connection.executemany(
                "INSERT INTO meta VALUES (?, ?)",
                [("format", str(FORMAT)), ("counts", json.dumps(_counts(graph)))],
            )
            connection.executemany(
                "INSERT INTO entity VALUES (?, ?, ?)",
                [(i, e.name, int(e.distinctive)) for i, e in enumerate(graph.entities)],
            )
            connection.executemany(
                "INSERT INTO alias VALUES (?, ?)",
                [(i, name) for i, e in enumerate(graph.entities) for name in e.names],
            )
            connection.executemany(
                "INSERT INTO fact VALUES (?, ?, ?)", [(i, f.text, f.source) for i, f in enumerate(graph.facts)]
            )
            connection.executemany(
                "INSERT INTO fact_terms (rowid, terms) VALUES (?, ?)",
                [(i, " ".join(index_terms(f"{f.index_text} {f.text}"))) for i, f in enumerate(graph.facts)],
            )
            connection.executemany(
                "INSERT INTO mention VALUES (?, ?)",
                [(i, e) for i, f in enumerate(graph.facts) for e in sorted(set(f.entities))],
            )
            connection.executemany(
                "INSERT INTO relation VALUES (?, ?, ?)", [(r.subject, r.predicate, r.object) for r in graph.relations]
            )
    finally:
        connection.close()
    with open(partial, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(partial, path)
    return path


def _counts(graph: FactGraph) -> dict[str, int]:
    return {"entities": len(graph.entities), "facts": len(graph.facts), "relations": len(graph.relations)}


class FactStore:
    """One version's ``facts.sqlite``, opened read-only; its names are held in memory (a graph is small)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FactsError(f"{self.path}: no fact graph")
        try:
            self._db = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro&immutable=1", uri=True,
                                       check_same_thread=False)  # fmt: skip
            meta = dict(self._db.execute("SELECT key, value FROM meta"))
            names = self._db.execute(
                "SELECT entity.id, entity.name, distinctive, alias.name FROM entity "
                "JOIN alias ON alias.entity = entity.id ORDER BY entity.id"
            ).fetchall()
        except sqlite3.Error as exc:
            raise FactsError(f"{self.path}: not a fact graph ({exc})") from exc
        if meta.get("format") != str(FORMAT):
            raise FactsError(f"{self.path}: fact graph format {meta.get('format')!r}, this solverx reads {FORMAT}")
        self.counts: dict[str, int] = json.loads(meta.get("counts", "{}"))
        self._names: dict[int, tuple[str, bool, list[str]]] = {}
        for entity, name, distinctive, alias in names:
            self._names.setdefault(entity, (name, bool(distinctive), []))[2].append(alias)

    def close(self) -> None:
        self._db.close()

    def entities_in(self, query: str) -> dict[int, float]:
        """Entity id -> how well ``query`` names it (its best name or alias). A name found only inside a longer
        one that matched ("SolverX" in "SolverX Fusion") does not count: the question names the product."""
        found, spans = {}, {}
        for entity, (_, _, names) in self._names.items():
            score = max(name_match(name, query) for name in names)
            if score > 0:
                found[entity] = score
                spans[entity] = [s for name in names for s in _spans(name, query)] if score == 1.0 else []
        whole = [span for entity_spans in spans.values() for span in entity_spans]
        for entity, entity_spans in spans.items():
            inside = all(any(o[0] <= a and b <= o[1] and (a, b) != o for o in whole) for a, b in entity_spans)
            if entity_spans and inside:
                del found[entity]
        return found

    def retrieve(self, query: str, top_k: int = 3, min_score: float = 0.6) -> list[Retrieved]:
        """The ``top_k`` facts for ``query`` (best first); empty when it names no distinctive entity well enough."""
        matched = self.entities_in(query)
        if not any(score >= min_score and self._names[e][1] for e, score in matched.items()):
            return []
        strong = {e for e, score in matched.items() if score >= min_score}
        hops = self._neighbours(strong) - strong
        candidates = self._facts_about(strong | hops)
        if not candidates:
            return []
        lexical = self._bm25(query, candidates)
        best = max(1.0, *lexical.values())  # a graph of a few facts has near-zero BM25s: do not blow noise up
        mentions = self._mentions(candidates)
        ranked = []
        for fact in candidates:
            about = mentions.get(fact, set())
            score = lexical.get(fact, 0.0) / best
            score += ENTITY_WEIGHT * sum(matched[e] for e in about & strong) + HOP_WEIGHT * len(about & hops)
            ranked.append((score, fact))
        ranked.sort(key=lambda pair: (-pair[0], pair[1]))
        kept: list[tuple[float, int, set[str]]] = []
        for score, fact in ranked:  # a fact saying again what a better one says takes no place of its own
            terms = set(self._terms(fact))
            if all(_overlap(terms, other) < NEAR_DUPLICATE for _, _, other in kept):
                kept.append((score, fact, terms))
            if len(kept) == top_k:
                break
        return [self._retrieved(fact, score, mentions.get(fact, set())) for score, fact, _ in kept]

    def _terms(self, fact: int) -> list[str]:
        row = self._db.execute("SELECT terms FROM fact_terms WHERE rowid = ?", (fact,)).fetchone()
        return row[0].split() if row else []

    def _neighbours(self, entities: Iterable[int]) -> set[int]:
        ids = sorted(entities)
        if not ids:
            return set()
        marks = ",".join("?" * len(ids))
        rows = self._db.execute(
            f"SELECT object FROM relation WHERE subject IN ({marks}) UNION "
            f"SELECT subject FROM relation WHERE object IN ({marks})",
            [*ids, *ids],
        )
        return {row[0] for row in rows}

    def _facts_about(self, entities: Iterable[int]) -> list[int]:
        ids = sorted(entities)
        if not ids:
            return []
        marks = ",".join("?" * len(ids))
        return [row[0] for row in self._db.execute(f"SELECT DISTINCT fact FROM mention WHERE entity IN ({marks})", ids)]

    def _mentions(self, facts: Sequence[int]) -> dict[int, set[int]]:
        marks = ",".join("?" * len(facts))
        found: dict[int, set[int]] = {}
        for fact, entity in self._db.execute(f"SELECT fact, entity FROM mention WHERE fact IN ({marks})", facts):
            found.setdefault(fact, set()).add(entity)
        return found

    def _bm25(self, query: str, facts: Sequence[int]) -> dict[int, float]:
        """BM25 of ``query`` against the facts (Latin words of 4+ letters also match as prefixes: employ ->
        employees), kept for ``facts``. Ranked over the whole index: FTS5 is slower filtering by a rowid list."""
        terms = sorted(set(index_terms(query)))
        if not terms:
            return {}
        expression = " OR ".join(f'"{t}"*' if len(t) >= 4 and _LATIN.fullmatch(t) else f'"{t}"' for t in terms)
        wanted = set(facts)
        ranked = "SELECT rowid, -bm25(fact_terms) FROM fact_terms WHERE fact_terms MATCH ?"
        rows = self._db.execute(ranked, (expression,))
        return {rowid: max(0.0, score) for rowid, score in rows if rowid in wanted}

    def _retrieved(self, fact: int, score: float, about: set[int]) -> Retrieved:
        text, source = self._db.execute("SELECT text, source FROM fact WHERE id = ?", (fact,)).fetchone()
        names = sorted(self._names[e][0] for e in about)
        return Retrieved(text, round(score, 4), names, source)
