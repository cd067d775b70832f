"""Build a version's fact graph from its inbox snapshot: the same files the LoRA is trained on, plus ontologies.

- **Entities**: every named thing of the ontology files (labels and aliases); names in the knowledge text and the
  Q&A (runs of capitalized words, at least twice in the inbox, leading function words dropped); and the aliases
  the text itself pairs, as in ``솔버엑스 퓨전(SolverX Fusion)`` (the Hangul words just before a Latin name in
  brackets, as many words as it has, or the other way round), or the recipe's ``[grounding] aliases``. A name made
  only of ordinary words — words of the general data, or whole words of the base's own vocabulary (a BPE vocabulary
  of 49k tokens holds ``Singapore`` and ``Trust`` as one token each, never ``SolverX`` or ``Seocho``) — or a short
  all-capital one (``CEO``) is not *distinctive*: it never triggers retrieval alone.
- **Facts**: the first assistant answer of every Q&A and chat (matched together with its question), every sentence of
  the knowledge text, and every ontology statement (``SolverX Fusion has the optimization engine X-Core.``); each
  linked to the entities it names. Held-out eval questions are never facts.
- **Relations**: the ontology's statements between two entities, which retrieval follows one hop.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from solverx.adapters.facts import Entity, Fact, FactGraph, Relation, name_match
from solverx.trainer.ontology import Ontology
from solverx.trainer.validate import IngestResult

_NAME = re.compile(r"[A-Z][A-Za-z0-9&-]*(?: [A-Z][A-Za-z0-9&-]*)*")
_LEADING = frozenset(  # words that start a sentence, not a name ("The Pangyo R&D Center" -> "Pangyo R&D Center")
    ("a", "an", "and", "as", "at", "but", "by", "for", "from", "how", "in", "its", "it", "of", "on", "or", "so",
     "still", "that", "the", "their", "there", "these", "this", "those", "to", "was", "what", "when", "where",
     "which", "while", "who", "why", "with", "besides", "if", "after", "before", "during", "does", "do", "did",
     "is", "are", "were", "can", "could", "will", "would", "should", "tell", "name", "give", "list", "describe",
     "please", "yes", "no")
)  # fmt: skip
_SENTENCE_END = re.compile(r"(?<=[.!?。])\s+|\n+")
_HANGUL_WORDS = r"[\uac00-\ud7a3]+(?: [\uac00-\ud7a3]+)*"
_KO_THEN_LATIN = re.compile(rf"({_HANGUL_WORDS}) ?\(([A-Z][A-Za-z0-9&. -]*)\)")  # a proper noun in brackets
_LATIN_THEN_KO = re.compile(rf"([A-Z][A-Za-z0-9&-]*(?: [A-Z][A-Za-z0-9&-]*)*) ?\(({_HANGUL_WORDS})\)")
_WORDS = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*")  # X-Core and Seocho-dong are one word each
_ACRONYM = re.compile(r"[A-Z&]{1,4}")
_TOKEN_PREFIXES = ("Ġ", "▁", " ")  # how GPT-2 BPE, SentencePiece and plain vocabularies mark a word's start
MIN_MENTIONS = 2


def ordinary_words(texts: Iterable[str], tokenizer: Any = None) -> set[str]:
    """Lowercased words of ``texts``, and the whole words (3+ letters, starting a word) of ``tokenizer``'s
    vocabulary."""
    words = {w for text in texts for w in _WORDS.findall(text.lower())}
    vocabulary = tokenizer.get_vocab() if tokenizer is not None and hasattr(tokenizer, "get_vocab") else {}
    for token in vocabulary:
        if token.startswith(_TOKEN_PREFIXES) and len(token) > 3 and token[1:].isalpha() and token[1:].isascii():
            words.add(token[1:].lower())
    return words


def base_ordinary_words(base_dir: Path, general_dir: Path) -> set[str]:
    """:func:`ordinary_words` of the general data and of ``base_dir``'s own tokenizer (when it has a
    ``tokenizer.json``)."""
    import tokenizers

    path = Path(base_dir) / "tokenizer.json"
    tokenizer = tokenizers.Tokenizer.from_file(str(path)) if path.is_file() else None
    return ordinary_words(general_texts(general_dir), tokenizer)


def _is_distinctive(name: str, ordinary: set[str]) -> bool:
    if _ACRONYM.fullmatch(name):
        return False  # CEO, CTO, AI, R&D: roles and fields more often than names
    words = _WORDS.findall(name.lower())
    return not words or not all(w in ordinary for w in words)  # a Hangul name: the general data is English


def _trim(phrase: str) -> str:
    words = phrase.split(" ")
    while words and (words[0].lower() in _LEADING or (len(words) > 1 and _ACRONYM.fullmatch(words[0]))):
        words.pop(0)  # "The Pangyo R&D Center", "CTO Park Ji-hoon"
    return " ".join(words)


def _name_phrases(texts: Iterable[str]) -> Counter[str]:
    counts: Counter[str] = Counter()
    for text in texts:
        for phrase in _NAME.findall(text):
            trimmed = _trim(phrase)
            if trimmed:
                counts[trimmed] += 1
    return counts


def text_aliases(texts: Iterable[str]) -> dict[str, set[str]]:
    """Latin name -> the Hangul names the text puts beside it in brackets."""
    pairs: dict[str, set[str]] = {}
    for text in texts:
        for korean, latin in _KO_THEN_LATIN.findall(text):
            latin = latin.strip().rstrip(".")
            if _ACRONYM.fullmatch(latin):
                continue  # 최고기술책임자(CTO) translates a role; 박지훈 (CTO) labels a person: neither is an alias
            words = len(latin.split())
            pairs.setdefault(latin, set()).add(" ".join(korean.split(" ")[-words:]))
        for latin, korean in _LATIN_THEN_KO.findall(text):
            pairs.setdefault(_trim(latin), set()).add(korean)
    return {latin: names for latin, names in pairs.items() if latin}


def _sentences(text: str) -> list[str]:
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    return [s.strip() for s in _SENTENCE_END.split("\n".join(lines)) if len(s.strip()) > 3]


def build_graph(
    result: IngestResult, ordinary: set[str], aliases: Mapping[str, Sequence[str]] | None = None
) -> FactGraph:
    """The fact graph of one ingest (see the module's docstring); ``ordinary`` from :func:`ordinary_words`."""
    texts = [doc.text for doc in result.cpt_texts]
    turns = [m["content"] for r in result.sft_records for m in r.messages if m["role"] in ("user", "assistant")]
    graph = FactGraph()
    by_name: dict[str, int] = {}

    def add_entity(names: Sequence[str]) -> int:
        names = [n.strip() for n in names if n.strip()]
        known = next((by_name[n.lower()] for n in names if n.lower() in by_name), None)
        if known is None:
            known = len(graph.entities)
            graph.entities.append(Entity(names[0], (), _is_distinctive(names[0], ordinary)))
        entity = graph.entities[known]
        extra = tuple(n for n in names if n.lower() not in {x.lower() for x in entity.names})
        graph.entities[known] = Entity(entity.name, entity.aliases + extra, entity.distinctive)
        for name in names:
            by_name.setdefault(name.lower(), known)
        return known

    ontology_keys: dict[tuple[str, str], int] = {}
    for ontology in result.ontologies:
        for key, names in ontology.names.items():
            ontology_keys[ontology.source, key] = add_entity(names)
    for name, count in sorted(_name_phrases([*texts, *turns]).items()):
        if name.lower() in by_name or (count >= MIN_MENTIONS and len(name) > 1 and _is_distinctive(name, ordinary)):
            add_entity([name])
    for latin, korean in sorted(text_aliases([*texts, *turns]).items()):
        add_entity([latin, *sorted(korean)])
    for name, more in sorted((aliases or {}).items()):
        add_entity([name, *more])

    def mentioned(*parts: str) -> tuple[int, ...]:
        text = " ".join(parts)
        return tuple(i for i, e in enumerate(graph.entities) if any(name_match(n, text) == 1.0 for n in e.names))

    seen: set[str] = set()

    def add_fact(text: str, source: str, index_text: str = "", entities: tuple[int, ...] | None = None) -> None:
        key = " ".join(text.lower().split())
        if key in seen:
            return
        seen.add(key)
        about = mentioned(index_text, text) if entities is None else entities
        if about:
            graph.facts.append(Fact(text, source, about, index_text))

    for record in result.sft_records:
        # A chat's later answers lean on its earlier turns ("It is called X-Core."): only its first answer stands
        # alone as a fact.
        question = next((m["content"] for m in record.messages if m["role"] == "user"), "")
        answer = next((m["content"] for m in record.messages if m["role"] == "assistant"), "")
        if answer.strip():
            add_fact(answer.strip(), record.source, question)
    for doc in result.cpt_texts:
        for sentence in _sentences(doc.text):
            add_fact(sentence, doc.source)
    for ontology in result.ontologies:
        _add_statements(graph, ontology, ontology_keys, add_fact)
    return graph


def _add_statements(graph: FactGraph, ontology: Ontology, keys: Mapping[tuple[str, str], int], add_fact) -> None:
    """Each statement as a sentence in its main names, matched also by every name and label it has (so a Korean
    question finds an English statement through the Korean labels)."""
    for statement in ontology.statements:
        subject = keys[ontology.source, statement.subject]
        names = [*ontology.names.get(statement.subject, []), *statement.predicate_names]
        if statement.object:
            obj = keys[ontology.source, statement.object]
            graph.relations.append(Relation(subject, statement.predicate, obj))
            text = f"{ontology.name_of(statement.subject)} {statement.predicate} {ontology.name_of(statement.object)}."
            names += ontology.names.get(statement.object, [])
            add_fact(text, ontology.source, " ".join(names), entities=(subject, obj))
        else:
            text = f"{ontology.name_of(statement.subject)} {statement.predicate} {statement.value}."
            add_fact(text, ontology.source, " ".join(names), entities=(subject,))


def general_texts(general_dir: Path) -> list[str]:
    """The text that decides which words are ordinary: the general data and the self-replay questions, as the
    trainer reads them (not their READMEs or comments; never the evaluation probes, which must stay unseen)."""
    from solverx.trainer.self_replay import replay_questions

    paths = sorted(p for p in Path(general_dir).rglob("*.*") if p.is_file() and not p.name.lower().startswith("readme"))
    return [p.read_text(encoding="utf-8", errors="replace") for p in paths] + ["\n".join(replay_questions())]
