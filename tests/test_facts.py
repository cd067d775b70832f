"""The fact graph without a model: ontology files, the graph built from the sample inbox, retrieval, the store."""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import pytest

from solverx.adapters.facts import FACTS_FILE, FactsError, FactStore, grounding_context, index_terms, write_graph
from solverx.data import DATA_DIR
from solverx.trainer.facts import base_ordinary_words, build_graph, text_aliases
from solverx.trainer.inbox import snapshot
from solverx.trainer.ontology import OntologyError, parse_ontology
from solverx.trainer.validate import ingest

INBOX = DATA_DIR / "solverx" / "inbox"
PROBES = DATA_DIR / "probes"

TURTLE = """@prefix ex: <https://example.com/> .
@prefix rdfs: <http://www.w3.org/2000/01/rdf-schema#> .
@prefix skos: <http://www.w3.org/2004/02/skos/core#> .
ex:hasEngine rdfs:label "has the optimization engine"@en, "최적화 엔진"@ko .
ex:Fusion rdfs:label "SolverX Fusion"@en, "솔버엑스 퓨전"@ko ; skos:altLabel "Fusion platform" ; ex:hasEngine ex:XCore ;
    ex:launched "2020" .
ex:XCore rdfs:label "X-Core"@en .
"""


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def test_turtle_gives_names_aliases_and_relations_in_readable_words() -> None:
    ontology = parse_ontology(TURTLE, ".ttl", "o.ttl")
    assert ontology.names["https://example.com/Fusion"] == ["SolverX Fusion", "솔버엑스 퓨전", "Fusion platform"]
    by_predicate = {s.predicate: s for s in ontology.statements}
    engine = by_predicate["has the optimization engine"]
    assert (engine.subject, engine.object) == ("https://example.com/Fusion", "https://example.com/XCore")
    assert engine.predicate_names == ("has the optimization engine", "최적화 엔진")
    assert by_predicate["launched"].value == "2020"  # no label: the IRI's last part, as words
    assert "https://example.com/hasEngine" not in ontology.names  # a property is not an entity


def test_csv_triples_and_what_is_refused() -> None:
    ontology = parse_ontology("subject,predicate,object\nSolverX,has the mascot,Solly\nSolverX,founded,2017\n",
                              ".csv", "t.csv")  # fmt: skip
    assert set(ontology.names) == {"SolverX", "Solly"}  # 2017 is a value, not an entity
    with pytest.raises(OntologyError, match="line 2: expected three"):
        parse_ontology("SolverX,mascot,Solly\nSolverX,mascot\n", ".csv", "t.csv")
    with pytest.raises(OntologyError, match="turtle parser refused it"):
        parse_ontology("ex:a ex:b", ".ttl", "bad.ttl")
    remote = json.dumps({"@context": "https://schema.org/", "@id": "https://x/a", "name": "A"})
    with pytest.raises(OntologyError, match="nothing is fetched"):
        parse_ontology(remote, ".jsonld", "r.jsonld")
    context = {
        "name": "http://www.w3.org/2000/01/rdf-schema#label",
        "maker": {"@id": "https://x/maker", "@type": "@id"},
    }
    inline = {"@context": context, "@id": "https://x/fusion", "name": "SolverX Fusion", "maker": "https://x/solverx"}
    parsed = parse_ontology(json.dumps(inline), ".jsonld", "ok.jsonld")
    assert parsed.names["https://x/fusion"] == ["SolverX Fusion"] and parsed.statements[0].predicate == "maker"


def test_ingest_quarantines_a_bad_ontology_with_the_parsers_words(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "qa.jsonl").write_text(json.dumps({"question": "Q?", "answer": "A."}) + "\n")
    (inbox / "good.ttl").write_text(TURTLE)
    (inbox / "broken.ttl").write_text("ex:a ex:b")
    result = ingest(snapshot(inbox), inbox, tmp_path / "quarantine")
    assert [a.path for a in result.accepted if a.kind == "ontology"] == ["good.ttl"]
    assert [q.path for q in result.quarantined] == ["broken.ttl"]
    reason = (tmp_path / "quarantine" / "broken.ttl.reason").read_text()
    assert "ontology not used" in reason and "turtle parser refused it" in reason
    assert (inbox / "broken.ttl").read_text() == "ex:a ex:b"  # the inbox is never modified


@pytest.fixture(scope="module")
def sample_graph(smollm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> FactStore:
    """The graph of the sample inbox (its eval.jsonl is held out, never facts) as a run on the default base builds
    it, in a store."""
    root = tmp_path_factory.mktemp("facts")
    inbox = root / "inbox"
    shutil.copytree(INBOX, inbox)
    result = ingest(snapshot(inbox), inbox, root / "quarantine")
    assert not result.quarantined and result.ontologies
    graph = build_graph(result, base_ordinary_words(smollm_dir, DATA_DIR / "general"))
    held_out = {item.question for item in result.eval_items}
    assert not any(fact.text in held_out for fact in graph.facts)
    return FactStore(write_graph(graph, root / FACTS_FILE))


def test_held_out_paraphrases_in_both_languages_retrieve_their_answer(sample_graph: FactStore) -> None:
    domain = [item for item in _lines(INBOX / "eval.jsonl") if item.get("kind", "domain") == "domain"]
    found = []
    for item in domain:
        facts = sample_graph.retrieve(item["question"], top_k=3)
        found.append(any(e.lower() in f.fact.lower() for f in facts for e in item["expected"]))
    missed = [item["question"] for item, ok in zip(domain, found, strict=True) if not ok]
    assert sum(found) >= len(domain) - 2, missed  # measured: 36 of 38


def test_questions_that_name_no_domain_entity_retrieve_nothing(sample_graph: FactStore) -> None:
    questions = [
        p["question"] for name in ("offdomain", "general_qa", "python") for p in _lines(PROBES / f"{name}.jsonl")
    ]
    questions += [i["question"] for i in _lines(INBOX / "eval.jsonl") if i.get("kind") == "leakage"]
    retrieved = {q: [f.fact for f in sample_graph.retrieve(q)] for q in questions}
    assert {q: facts for q, facts in retrieved.items() if facts} == {}
    assert len(questions) > 70


def test_aliases_cross_languages_and_ordinary_names_do_not_trigger(sample_graph: FactStore) -> None:
    korean = sample_graph.retrieve("엑스코어는 어떤 제품에 들어 있나요?")  # X-Core named in Korean
    assert korean and any("X-Core" in f.entities for f in korean)
    assert sample_graph.retrieve("What is the capital of Singapore?") == []  # Singapore is an ordinary word
    assert sample_graph.retrieve("How does nuclear fusion work?") == []  # part of "SolverX Fusion" is not enough
    assert text_aliases(["핵심 제품은 솔버엑스 퓨전(SolverX Fusion)입니다. 박지훈 (CTO)."]) == {
        "SolverX Fusion": {"솔버엑스 퓨전"}  # a role in brackets is no alias
    }


def test_retrieval_follows_the_ontologys_relations_one_hop(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "qa.jsonl").write_text(json.dumps({"question": "What is X-Core?", "answer": "X-Core is a fast solver."}))
    (inbox / "ontology.ttl").write_text(TURTLE)
    graph = build_graph(ingest(snapshot(inbox), inbox, tmp_path / "q"), set())
    store = FactStore(write_graph(graph, tmp_path / FACTS_FILE))
    facts = {f.fact: f for f in store.retrieve("Tell me about the engine of SolverX Fusion.", top_k=5)}
    stated = facts["SolverX Fusion has the optimization engine X-Core."]  # the ontology's relation, as a sentence
    assert stated.source == "ontology.ttl" and stated.entities == ["SolverX Fusion", "X-Core"]
    assert "X-Core is a fast solver." in facts  # about X-Core, one hop from the entity the question names
    assert store.retrieve("솔버엑스 퓨전의 최적화 엔진은?")[0].fact == stated.fact  # by the Korean labels


def test_index_terms_pair_hangul_and_keep_latin_words() -> None:
    assert index_terms("솔버엑스의 본사는 Seocho-dong!") == [
        "솔버",
        "버엑",
        "엑스",
        "스의",
        "본사",
        "사는",
        "seocho",
        "dong",
    ]
    assert grounding_context([]) is None


def test_a_store_refuses_what_is_not_a_graph_of_its_format(tmp_path: Path, sample_graph: FactStore) -> None:
    copy = shutil.copyfile(sample_graph.path, tmp_path / FACTS_FILE)
    with sqlite3.connect(copy) as db:
        db.execute("UPDATE meta SET value = '99' WHERE key = 'format'")
    with pytest.raises(FactsError, match="format '99'"):
        FactStore(copy)
    (tmp_path / "junk.sqlite").write_bytes(b"not sqlite at all" * 100)
    with pytest.raises(FactsError, match="not a fact graph"):
        FactStore(tmp_path / "junk.sqlite")
    assert sample_graph.counts["facts"] > 100 and sample_graph.counts["relations"] > 5
