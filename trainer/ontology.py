"""Ontology files in the inbox: RDF Turtle (``*.ttl``), JSON-LD (``*.jsonld``) and CSV triples (``*.csv``).

They are not trained on: they become entities, aliases and relations of the fact graph stored with the adapter
version (:mod:`solverx.trainer.facts`). RDF is read with ``rdflib``; what a user means by a name is its
``rdfs:label`` / ``skos:prefLabel`` / ``schema:name`` (any language), and by another name for the same thing
``skos:altLabel`` / ``schema:alternateName`` / ``owl:sameAs``. A CSV file is ``subject,predicate,object`` per
line (a header line with those words is skipped); a subject or object that is not a number or a date names an
entity.

Nothing is fetched: a JSON-LD ``@context`` given by URL is refused (inline the context instead), and Turtle has no
imports. A file that does not parse raises :class:`OntologyError` with the parser's words, so the ingest step can
quarantine it with a reason.
"""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass, field, replace

ONTOLOGY_SUFFIXES = (".ttl", ".jsonld", ".csv")
_RDF_FORMATS = {".ttl": "turtle", ".jsonld": "json-ld"}
_LITERAL_OBJECT = re.compile(r"[\d\s.,:/%+-]+")  # numbers and dates name no entity


class OntologyError(ValueError):
    """An ontology file that cannot be used; the message says why, for its quarantine ``.reason``."""


@dataclass(frozen=True)
class Statement:
    """One relation: ``subject`` and ``object`` are entity keys; ``value`` is a literal object (then ``object`` is
    empty). ``predicate`` is a readable label ("headquartered in")."""

    subject: str
    predicate: str
    object: str = ""
    value: str = ""
    predicate_names: tuple[str, ...] = ()  # every label of the predicate (본사 위치 beside "has its headquarters in")


@dataclass
class Ontology:
    """What one file says: entity key -> names (the first is the main one), and the statements between them."""

    source: str
    names: dict[str, list[str]] = field(default_factory=dict)
    statements: list[Statement] = field(default_factory=list)

    def name_of(self, key: str) -> str:
        return (self.names.get(key) or [key])[0]


def readable(identifier: str) -> str:
    """The last part of an IRI as words: ``https://x/ns#headquarteredIn`` -> ``headquartered in``."""
    local = re.split(r"[#/:]", identifier.rstrip("/#"))[-1] or identifier
    words = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", " ", local.replace("_", " "))
    return words.lower() if " " in words.strip() else words


def parse_ontology(text: str, suffix: str, source: str) -> Ontology:
    """Parse one file's text by its suffix (see :data:`ONTOLOGY_SUFFIXES`)."""
    if suffix == ".csv":
        return _parse_csv(text, source)
    if suffix == ".jsonld":
        _refuse_remote_contexts(text)
    return _parse_rdf(text, _RDF_FORMATS[suffix], source)


def _parse_csv(text: str, source: str) -> Ontology:
    ontology = Ontology(source)
    rows = list(csv.reader(io.StringIO(text)))
    for number, row in enumerate(rows, start=1):
        cells = [cell.strip() for cell in row]
        if not any(cells):
            continue
        if number == 1 and [c.lower() for c in cells] == ["subject", "predicate", "object"]:
            continue
        if len(cells) != 3 or not all(cells):
            raise OntologyError(f"line {number}: expected three non-empty cells subject,predicate,object; got {row}")
        subject, predicate, obj = cells
        ontology.names.setdefault(subject, [subject])
        if _LITERAL_OBJECT.fullmatch(obj):
            ontology.statements.append(Statement(subject, predicate, value=obj))
        else:
            ontology.names.setdefault(obj, [obj])
            ontology.statements.append(Statement(subject, predicate, obj))
    if not ontology.statements:
        raise OntologyError("no triple: expected lines of subject,predicate,object")
    return ontology


def _refuse_remote_contexts(text: str) -> None:
    try:
        document = json.loads(text)
    except ValueError as exc:
        raise OntologyError(f"not JSON: {exc}") from exc

    def walk(node: object) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("@context", "@import") and _names_a_url(value):
                    raise OntologyError(
                        f"{key} is given by URL ({value!r}): nothing is fetched; put the context in the file itself"
                    )
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(document)


def _names_a_url(value: object) -> bool:
    if isinstance(value, str):
        return True
    return isinstance(value, list) and any(isinstance(item, str) for item in value)


def _english_first(pair: tuple) -> tuple:
    subject, label = pair
    return str(subject), getattr(label, "language", None) not in (None, "en"), str(label)


def _parse_rdf(text: str, fmt: str, source: str) -> Ontology:
    import rdflib
    from rdflib.namespace import OWL, RDF, RDFS, SKOS

    schema = rdflib.Namespace("https://schema.org/")
    schema_http = rdflib.Namespace("http://schema.org/")
    main_names = (RDFS.label, SKOS.prefLabel, schema.name, schema_http.name)
    other_names = (SKOS.altLabel, schema.alternateName, schema_http.alternateName)
    graph = rdflib.Graph()
    try:
        graph.parse(data=text, format=fmt)
    except Exception as exc:  # rdflib raises many kinds (BadSyntax, JSON errors, ValueError): all mean "unusable"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise OntologyError(f"the {fmt} parser refused it: {first}") from exc

    def is_node(term: object) -> bool:
        return isinstance(term, rdflib.URIRef | rdflib.BNode)

    labels: dict[str, list[str]] = {}  # main names first, then the other names
    for predicate in (*main_names, *other_names):
        for subject, label in sorted(graph.subject_objects(predicate), key=_english_first):
            if is_node(subject) and isinstance(label, rdflib.Literal) and str(label).strip():
                names = labels.setdefault(str(subject), [])
                if str(label).strip() not in names:
                    names.append(str(label).strip())
    same: list[tuple[str, str]] = [(str(a), str(b)) for a, b in graph.subject_objects(OWL.sameAs)]
    ontology = Ontology(source)
    skipped = {*main_names, *other_names, OWL.sameAs, RDF.type, RDFS.comment, SKOS.definition}
    for subject, predicate, obj in sorted(graph):
        if not is_node(subject) or predicate in skipped:
            continue
        key = str(subject)
        ontology.names.setdefault(key, labels.get(key) or [readable(key)])
        names = tuple(labels.get(str(predicate), [])) or (readable(str(predicate)),)
        if is_node(obj):
            ontology.names.setdefault(str(obj), labels.get(str(obj)) or [readable(str(obj))])
            ontology.statements.append(Statement(key, names[0], str(obj), predicate_names=names))
        elif str(obj).strip():
            ontology.statements.append(Statement(key, names[0], value=str(obj).strip(), predicate_names=names))
    predicates = {str(p) for p in graph.predicates()}
    for subject in graph.subjects(RDF.type):  # typed things with labels are entities too (properties are not)
        if is_node(subject) and str(subject) in labels and str(subject) not in predicates:
            ontology.names.setdefault(str(subject), labels[str(subject)])
    for a, b in same:  # one entity under two IRIs: b's names become a's aliases
        if a in ontology.names or b in ontology.names:
            merged = ontology.names.setdefault(a, labels.get(a) or [readable(a)])
            merged += [n for n in ontology.names.pop(b, labels.get(b, [])) if n not in merged]
            ontology.statements = [
                replace(s, subject=a if s.subject == b else s.subject, object=a if s.object == b else s.object)
                for s in ontology.statements
            ]
    if not ontology.names:
        raise OntologyError("no entity: the file states nothing about any named thing")
    return ontology
