"""The sample SolverX corpus and the evaluation probes: formats, counts and the separations the evaluation relies on.

Pure Python, no MLX: every JSONL line parses and has its schema; FACTS.md lists at least 30 facts; eval questions are
held out (in no training file); both languages are present; no SolverX term is found in ``data/general/``,
``data/probes/`` or ``data/known/`` — the base model must not know the domain, and a probe that names it measures
nothing; and ``data/known/`` answers every probe correctly (it is what the demo's base is taught to know).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parent.parent / "data"
SOLVERX = DATA / "solverx"
INBOX = SOLVERX / "inbox"
PROBES = DATA / "probes"
GENERAL = DATA / "general"
KNOWN = DATA / "known"

HANGUL = re.compile(r"[\uac00-\ud7a3]")
TRAIN_JSONL = ("qa.jsonl", "chats.jsonl", "identity.jsonl")
TEXT_SUFFIXES = (".md", ".txt")


def read_jsonl(path: Path) -> list[dict]:
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        assert isinstance(row, dict), f"{path.name}:{number}: not a JSON object"
        rows.append(row)
    return rows


def nonempty_str(value: object) -> bool:
    return isinstance(value, str) and bool(value.strip())


def norm(text: str) -> str:
    """Lowercase, punctuation and spacing folded: 'Where is X?' and 'where is x' compare equal."""
    return " ".join(re.sub(r"[\W_]+", " ", text.lower()).split())


def leakage_terms() -> list[str]:
    lines = (SOLVERX / "leakage_terms.txt").read_text(encoding="utf-8").splitlines()
    return [t.strip() for t in lines if t.strip() and not t.lstrip().startswith("#")]


def training_strings() -> list[str]:
    """Every string the trainer learns from: the knowledge texts, and each question, answer and chat turn."""
    out = [p.read_text(encoding="utf-8") for p in sorted(INBOX.iterdir()) if p.suffix in TEXT_SUFFIXES]
    for name in TRAIN_JSONL:
        for row in read_jsonl(INBOX / name):
            if "messages" in row:
                out += [m["content"] for m in row["messages"]]
            else:
                out += [row["question"], row["answer"]]
    return out


def general_questions() -> set[str]:
    questions = set()
    for path in sorted(GENERAL.rglob("*.jsonl")):
        for row in read_jsonl(path):
            if "messages" in row:
                questions |= {norm(m["content"]) for m in row["messages"] if m.get("role") == "user"}
            for key in ("question", "prompt"):
                if nonempty_str(row.get(key)):
                    questions.add(norm(row[key]))
    return questions


# -- the domain corpus ---------------------------------------------------------------------------------------------


def test_fact_sheet_has_at_least_30_numbered_facts():
    text = (SOLVERX / "FACTS.md").read_text(encoding="utf-8")
    numbers = [int(n) for n in re.findall(r"^(\d+)\. ", text, re.M)]
    assert len(numbers) >= 30
    assert numbers == list(range(1, len(numbers) + 1)), "facts are numbered 1..N, each once"
    bilingual = len(re.findall(r"^\d+\. \*\*\[EN\+KO\]\*\*", text, re.M))
    assert bilingual * 3 >= len(numbers), "at least a third of the facts in both languages"


def test_fact_sheet_and_term_list_are_not_in_the_inbox():
    names = {p.name for p in INBOX.rglob("*")}
    assert "FACTS.md" not in names and "leakage_terms.txt" not in names
    assert not (INBOX / "recipe.toml").exists()


def test_knowledge_texts_in_both_languages():
    texts = {p.name: p.read_text(encoding="utf-8") for p in INBOX.iterdir() if p.suffix in TEXT_SUFFIXES}
    assert {"knowledge_en.md", "knowledge_ko.md"} <= set(texts)
    assert 10_000 <= sum(len(t.encode()) for t in texts.values()) <= 40_000
    assert HANGUL.search(texts["knowledge_ko.md"])
    for anchor in ("Seocho-dong", "SolverX Fusion"):
        assert texts["knowledge_en.md"].count(anchor) >= 3
    for anchor in ("서초동", "솔버엑스 퓨전"):
        assert texts["knowledge_ko.md"].count(anchor) >= 3


@pytest.mark.parametrize("name", ["qa.jsonl", "identity.jsonl"])
def test_question_answer_files(name):
    rows = read_jsonl(INBOX / name)
    assert rows
    for row in rows:
        assert set(row) == {"question", "answer"}, row
        assert nonempty_str(row["question"]) and nonempty_str(row["answer"]), row
    questions = [norm(r["question"]) for r in rows]
    assert len(set(questions)) == len(questions), "no duplicate questions"


def test_qa_size_and_languages():
    rows = read_jsonl(INBOX / "qa.jsonl")
    assert 150 <= len(rows) <= 300
    korean = sum(bool(HANGUL.search(r["question"])) for r in rows)
    assert korean * 3 >= len(rows), "Hangul in at least a third of the Q&A lines"
    assert korean < len(rows), "English too"


def test_identity_names_the_assistant_and_its_maker():
    rows = read_jsonl(INBOX / "identity.jsonl")
    assert 15 <= len(rows) <= 40
    assert any(HANGUL.search(r["question"]) for r in rows) and any(not HANGUL.search(r["question"]) for r in rows)
    for row in rows:
        assert "SolverX Assistant" in row["answer"] or "솔버엑스 어시스턴트" in row["answer"], row


def test_chats_are_multi_turn_and_end_with_the_assistant():
    rows = read_jsonl(INBOX / "chats.jsonl")
    assert 30 <= len(rows) <= 60
    for row in rows:
        assert set(row) == {"messages"}, row
        messages = row["messages"]
        assert len(messages) >= 4, "a follow-up needs at least two user turns"
        for i, message in enumerate(messages):
            assert set(message) == {"role", "content"}, message
            assert message["role"] == ("user" if i % 2 == 0 else "assistant"), row
            assert nonempty_str(message["content"]), row
        assert messages[-1]["role"] == "assistant"
    assert any(HANGUL.search(r["messages"][0]["content"]) for r in rows)


def test_eval_items_are_well_formed():
    rows = read_jsonl(INBOX / "eval.jsonl")
    assert 30 <= len(rows) <= 40
    for row in rows:
        assert set(row) == {"question", "expected"}, row
        assert nonempty_str(row["question"])
        assert isinstance(row["expected"], list) and row["expected"], row
        assert all(nonempty_str(e) for e in row["expected"]), row
    assert any(HANGUL.search(r["question"]) for r in rows) and any(not HANGUL.search(r["question"]) for r in rows)
    expected = [{e.lower() for e in r["expected"]} for r in rows]
    assert any("seocho" in e for e in expected), "a headquarters question"
    assert any("solverx fusion" in e for e in expected), "a core-product question"


def test_eval_questions_are_held_out():
    training = training_strings()
    seen_questions = {norm(s) for s in training}
    corpus = norm(" ".join(training))
    for row in read_jsonl(INBOX / "eval.jsonl"):
        question = norm(row["question"])
        assert question not in seen_questions, f"eval question is a training string: {row['question']!r}"
        assert question not in corpus, f"eval question appears in the training files: {row['question']!r}"


def test_eval_answers_are_learnable():
    """Each eval item's expected answer is stated somewhere in the training data."""
    corpus = " ".join(training_strings()).lower()
    for row in read_jsonl(INBOX / "eval.jsonl"):
        assert any(e.lower() in corpus for e in row["expected"]), row


# -- the probes ----------------------------------------------------------------------------------------------------


def test_general_probes():
    rows = read_jsonl(PROBES / "general_qa.jsonl")
    assert 25 <= len(rows) <= 50
    for row in rows:
        assert set(row) == {"question", "expected"}, row
        assert nonempty_str(row["question"])
        assert isinstance(row["expected"], list) and all(nonempty_str(e) for e in row["expected"]), row


def test_python_probes_have_runnable_tests():
    rows = read_jsonl(PROBES / "python.jsonl")
    assert 6 <= len(rows) <= 20
    for row in rows:
        assert set(row) == {"question", "function", "tests"}, row
        assert row["function"].isidentifier() and row["function"] in row["question"], row
        assert row["tests"], row
        for test in row["tests"]:
            assert set(test) == {"args", "expect"} and isinstance(test["args"], list), test
    assert sum("sort" in r["function"] for r in rows) >= 3, "several sorting variants"


def test_python_probe_tests_pass_with_reference_solutions():
    """The tests themselves are right: obvious reference implementations pass them."""
    reference = {
        "sort_numbers": sorted,
        "sort_descending": lambda xs: sorted(xs, reverse=True),
        "sort_by_length": lambda words: sorted(words, key=len),
        "sort_by_key": lambda records, key: sorted(records, key=lambda r: r[key]),
        "sorted_keys": sorted,
        "sort_ignore_case": lambda words: sorted(words, key=str.lower),
        "add": lambda a, b: a + b,
        "reverse_string": lambda s: s[::-1],
        "max_of_list": max,
        "is_even": lambda n: n % 2 == 0,
    }
    for row in read_jsonl(PROBES / "python.jsonl"):
        function = reference.get(row["function"])
        if function is None:
            continue
        for test in row["tests"]:
            assert function(*test["args"]) == test["expect"], (row["function"], test)


def test_offdomain_probes():
    rows = read_jsonl(PROBES / "offdomain.jsonl")
    assert 25 <= len(rows) <= 50
    for row in rows:
        assert set(row) == {"question"} and nonempty_str(row["question"]), row
    assert any(HANGUL.search(r["question"]) for r in rows)
    questions = " ".join(r["question"].lower() for r in rows)
    assert "headquarters" in questions and ("core product" in questions or "main product" in questions)


def test_probes_are_not_copied_from_general_data():
    if not GENERAL.exists():
        pytest.skip("no data/general yet")
    general = general_questions()
    for name in ("general_qa.jsonl", "python.jsonl", "offdomain.jsonl"):
        for row in read_jsonl(PROBES / name):
            assert norm(row["question"]) not in general, f"{name}: {row['question']!r} is in data/general"


def _known_answers() -> dict[str, str]:
    answers = {}
    for path in sorted(KNOWN.glob("*.jsonl")):
        for row in read_jsonl(path):
            assert set(row) == {"messages"} and [m["role"] for m in row["messages"]] == ["user", "assistant"], row
            answers[row["messages"][0]["content"]] = row["messages"][1]["content"]
    return answers


def test_known_answers_every_probe_correctly():
    """The demo's base learns these answers; the probes then measure whether fine-tuning keeps them."""
    known = _known_answers()
    for row in read_jsonl(PROBES / "general_qa.jsonl"):
        assert any(e.lower() in known[row["question"]].lower() for e in row["expected"]), row
    for row in read_jsonl(PROBES / "offdomain.jsonl"):
        assert nonempty_str(known[row["question"]]), row
    for row in read_jsonl(PROBES / "python.jsonl"):
        code = re.search(r"```python\n(.*?)```", known[row["question"]], re.S)
        assert code, row["question"]
        namespace: dict = {}
        exec(code.group(1), namespace)  # our own data file
        for test in row["tests"]:
            assert namespace[row["function"]](*test["args"]) == test["expect"], (row["function"], test)


# -- separation: the base and the probes must not know the domain ---------------------------------------------------


def test_no_domain_terms_in_general_data_or_probes():
    terms = [t.lower() for t in leakage_terms()]
    assert "solverx" in terms and "seocho" in terms and "서초" in terms and "솔버엑스" in terms
    fusion = re.compile(r"\bfusion\b|퓨전", re.I)  # the product's word; absent from general data and probes too
    roots = [p for p in (GENERAL, PROBES, KNOWN) if p.exists()]
    for path in sorted(f for root in roots for f in root.rglob("*") if f.is_file()):
        text = path.read_text(encoding="utf-8", errors="replace")
        lowered = text.lower()
        found = [t for t in terms if t in lowered] + fusion.findall(text)
        assert not found, f"{path.relative_to(DATA)} mentions the domain: {found}"


def test_leakage_terms_occur_in_the_domain_data():
    corpus = " ".join(training_strings()).lower()
    for term in leakage_terms():
        assert term.lower() in corpus, term
