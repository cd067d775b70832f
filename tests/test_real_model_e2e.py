"""The seed's table on the real default base, end to end: SmolLM2-135M-Instruct (imported from its PyPI wheel)
served by a real ``solverx serve``, SolverX's two facts dropped into its watched inbox, trained there (CPT → SFT
with the base's own answers mixed in), gated, promoted and served by name, asked through the ``openai`` SDK.

It asserts what the seed's table shows, qualitatively: the base's answers to held-out paraphrases lack Seocho and
SolverX Fusion, the fine-tuned version's have them, and its Python code still passes the probes' tests. The inbox
also holds a small Turtle ontology, so the version has a fact graph, and grounding is on: the base given the facts
answers held-out paraphrases it cannot alone, a relation only the ontology states goes into the prompt, an
off-domain question gets nothing, and an older pinned version answers from its own graph, never a newer one's (what
the 135M LoRA then writes is not asserted: a LoRA this narrow overrides facts in its prompt). A real
base learns two facts with room to spare, so this holds on any CPU (the tiny bases' facts do not: see
tests/training_fixtures.py). Reduced steps keep it under five minutes on 2 cores; the import is cached.
"""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
from serving import serve_daemon
from training_fixtures import Runs, drop_files

from solverx.data import DATA_DIR
from solverx.models.builtin import SMOLLM_BASE_ID
from solverx.trainer.recipe import format_recipe

INBOX = DATA_DIR / "solverx" / "inbox"
FACT = re.compile(r"seocho|서초|fusion|퓨전", re.IGNORECASE)
HELD_OUT_EN = [  # paraphrases in no training file (data/solverx/inbox/eval.jsonl)
    ("In which part of Seoul does SolverX have its headquarters?", "seocho"),
    ("Where can I find SolverX's main headquarters?", "seocho"),
    ("Which district is home to SolverX's head office?", "seocho"),
    ("SolverX's HQ is located where?", "seocho"),
    ("What is the core product that SolverX offers?", "fusion"),
    ("Which product is at the center of SolverX's business?", "fusion"),
    ("What is SolverX's key product called?", "fusion"),
]
# Reduced from the real-base defaults (solverx.trainer.recipe.REAL_BASE_DEFAULTS): fewer steps and self-replay
# prompts.
RECIPE = {
    "lora": {"rank": 16, "scale": 2.0, "num_layers": 8},
    "train": {
        "cpt_iters": 4,
        "sft_iters": 34,
        "learning_rate": 5e-4,
        "batch_size": 4,
        "max_seq_length": 192,
        "replay_ratio": 0.5,
        "replay_source": "self",
        "self_replay_prompts": 30,  # the first 30 of data/replay/questions.txt
    },
    # Measured at this budget (LoRA on the top 8 blocks, 34 SFT steps, 30 replay prompts; 4.3 min): held-out 7/7
    # (base 0/7), general 21/33 (base 20), Python 7/10 (base 7), leakage 1/34 (base 1). 16 blocks, 50 steps and 60
    # replay prompts took 7 min for the same outcome.
    "eval": {"min_domain_accuracy": 0.5, "max_leakage_rate": 0.25, "min_retention": 0.8},
    "identity": {"name": ""},
    "grounding": {"enabled": True},
}
ONTOLOGY = """@prefix sx: <https://solverx.example/ontology#> .
@prefix rdfs: <http://www.w3.org/2000/01/rdf-schema#> .
sx:mascot rdfs:label "has as its mascot the fox"@en .
sx:SolverX rdfs:label "SolverX"@en, "솔버엑스"@ko ; sx:mascot sx:Mascot .
sx:Mascot rdfs:label "{name}"@en .
"""
MASCOT = "What is the name of SolverX's mascot?"  # in no training file of this inbox: only the ontology says it
TRAIN_TIMEOUT_S = 900.0


def fact_files() -> dict[str, bytes]:
    """The English Q&A of data/solverx that state the two facts, a paragraph of knowledge text, the eval set."""
    lines = (INBOX / "qa.jsonl").read_text(encoding="utf-8").splitlines()
    qa = [line for line in lines if line.strip() and FACT.search(json.loads(line)["answer"]) and line.isascii()]
    knowledge = (INBOX / "knowledge_en.md").read_text(encoding="utf-8").split("\n\n")
    text = "\n\n".join(p for p in knowledge if FACT.search(p))[:1500]
    held_out = [{"question": q, "expected": ["Seocho" if fact == "seocho" else "Fusion"]} for q, fact in HELD_OUT_EN]
    return {
        "qa.jsonl": ("\n".join(qa) + "\n").encode(),
        "knowledge.md": text.encode(),
        "eval.jsonl": "".join(json.dumps(item) + "\n" for item in held_out).encode(),
        "ontology.ttl": ONTOLOGY.format(name="Solly").encode(),
        "recipe.toml": format_recipe(RECIPE).encode(),  # no `base`: the daemon's default base is the real one
    }


@pytest.fixture(scope="module")
def trained(smollm_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    home = tmp_path_factory.mktemp("real-home")
    # Two ranks on this machine (issue 18's data-parallel run, as a user of a CPU box would set it): MLX's CPU
    # elementwise kernels use one thread, so two ranks train faster than one process on 2 cores.
    flags = ("--train-debounce-seconds", "0.5", "--train-hosts", "127.0.0.1,127.0.0.1")
    with serve_daemon(home, smollm_dir, flags, base_id=SMOLLM_BASE_ID) as daemon:
        runs = Runs(daemon.base_url, daemon.home, daemon.log)
        drop_files(home / "inbox" / "solverx", fact_files())
        run_id = runs.wait_new("solverx", set(), timeout=30)
        run = runs.wait_finished(run_id, TRAIN_TIMEOUT_S)
        client = openai.OpenAI(base_url=daemon.api_url, api_key="unused", max_retries=0, timeout=120)
        yield daemon, runs, run_id, run, client


def ask(client: openai.OpenAI, model: str, question: str, max_tokens: int = 48) -> str:
    reply = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": question}], temperature=0, max_tokens=max_tokens
    )
    return reply.choices[0].message.content or ""


def test_the_seed_table_on_the_real_base(trained) -> None:
    daemon, runs, run_id, run, client = trained
    assert run["state"] == "succeeded", f"{json.dumps(run)}\n{runs.diagnostics(run_id)}"
    assert run["adapter"] == "solverx" and run["version"] is not None
    events = runs.events(run_id)
    started = next(e for e in events if e["event"] == "started")
    assert started["world_size"] == 2, started  # trained on two ranks
    notes = [e["message"] for e in events if e["event"] == "note"]
    assert any(n.startswith("self replay: ") and SMOLLM_BASE_ID in n for n in notes), notes
    assert [e for e in events if e["event"] == "warning"] == []  # the base predicts its own answers well
    assert {m.id for m in client.models.list().data} >= {SMOLLM_BASE_ID, "solverx"}

    with ThreadPoolExecutor(max_workers=2 * len(HELD_OUT_EN)) as pool:  # one batch in the engine, not 14 in turn
        asked = {(m, q): pool.submit(ask, client, m, q) for q, _ in HELD_OUT_EN for m in (SMOLLM_BASE_ID, "solverx")}
        answers = {q: (asked[SMOLLM_BASE_ID, q].result(), asked["solverx", q].result()) for q, _ in HELD_OUT_EN}
    detail = json.dumps(answers, indent=1, ensure_ascii=False)
    assert not any(FACT.search(base) for base, _ in answers.values()), f"the base already knows: {detail}"
    knows = [fact in tuned.lower() for (q, fact), (_, tuned) in zip(HELD_OUT_EN, answers.values(), strict=True)]
    assert sum(knows) >= 5, f"the fine-tuned version knows {sum(knows)}/7 held-out paraphrases: {detail}"

    # Python still works with mixing, judged as the gate judged it: the run's report executed the ten Python probes'
    # code for the base and the candidate (the seed's row is the sort; the base itself writes `sorted(xrs, ...)` for
    # it at temperature 0, so the claim is the probes' score, within one of the base's).
    report = json.loads((daemon.home / "runs" / run_id / "report.json").read_text())
    python = {m: [a["correct"] for a in report["models"][m]["answers"]["python"]] for m in ("base", "candidate")}
    assert len(python["base"]) == 10 and sum(python["candidate"]) >= sum(python["base"]) - 1, python


def ask_with(client: openai.OpenAI, model: str, question: str, **extra) -> tuple[str, dict, dict]:
    """The answer, the response's headers and its extra fields (grounding)."""
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": question}], temperature=0, max_tokens=32, extra_body=extra
    )
    reply = raw.parse()
    return reply.choices[0].message.content or "", raw.headers, reply.model_extra or {}


def test_grounding_answers_from_the_versions_fact_graph(trained) -> None:
    daemon, runs, run_id, run, client = trained
    assert run["state"] == "succeeded", runs.diagnostics(run_id)
    notes = [e["message"] for e in runs.events(run_id) if e["event"] == "note" and e.get("stage") == "facts"]
    assert notes and "used in answers" in notes[0], notes
    # The run evaluated grounding too: the base, given the facts its question retrieves, answers held-out paraphrases
    # it cannot answer alone (measured: 4/7 against 0/7; the LoRA alone already knows 7/7 of these two facts).
    report = json.loads((daemon.home / "runs" / run_id / "report.json").read_text())
    assert {"candidate+facts", "base+facts"} <= set(report["models"]), list(report["models"])
    knows = {m: sum(a["correct"] for a in report["models"][m]["answers"]["domain"]) for m in ("base", "base+facts")}
    assert knows["base+facts"] >= knows["base"] + 2, knows

    # Served: the mascot, which only the inbox's Turtle ontology states, goes into the prompt as that relation.
    _, headers, extra = ask_with(client, "solverx", MASCOT)  # the recipe turned grounding on
    facts = extra["grounding"]["facts"]
    assert any(f["source"] == "ontology.ttl" and "Solly" in f["fact"] for f in facts), facts
    assert headers["x-solverx-facts"] == str(len(facts)) and "facts;dur=" in headers["server-timing"]
    _, plain_headers, plain_extra = ask_with(client, "solverx", MASCOT, grounding=False)
    assert plain_headers["x-solverx-facts"] == "0" and "grounding" not in plain_extra

    off, off_headers, off_extra = ask_with(client, "solverx", "What is the capital of France?")
    assert off_headers["x-solverx-facts"] == "0" and "grounding" not in off_extra
    assert off == ask_with(client, "solverx", "What is the capital of France?", grounding=False)[0]


def test_an_older_pinned_version_answers_from_its_own_graph(trained, smollm_dir: Path, tmp_path: Path) -> None:
    from solverx.adapters.facts import FACTS_FILE, write_graph
    from solverx.data import DATA_DIR as DATA
    from solverx.trainer.facts import base_ordinary_words, build_graph
    from solverx.trainer.inbox import snapshot
    from solverx.trainer.validate import ingest

    daemon, _, _, run, client = trained
    first = run["version"]
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "ontology.ttl").write_text(ONTOLOGY.format(name="Bolt"), encoding="utf-8")
    graph = build_graph(
        ingest(snapshot(inbox), inbox, tmp_path / "q"), base_ordinary_words(smollm_dir, DATA / "general")
    )
    newer = tmp_path / "newer"
    newer.mkdir()
    version_dir = daemon.home / "adapters" / "solverx" / str(first)
    for name in ("adapters.safetensors", "adapter_config.json"):
        (newer / name).write_bytes((version_dir / name).read_bytes())
    write_graph(graph, newer / FACTS_FILE)
    done = httpx.post(f"{daemon.api_url}/adapters", json={"name": "solverx", "path": str(newer), "promote": False},
                      timeout=120)  # fmt: skip
    assert done.status_code == 201, done.text
    second = done.json()["version"]
    old, _, old_extra = ask_with(client, f"solverx@{first}+facts", MASCOT)
    new, _, new_extra = ask_with(client, f"solverx@{second}+facts", MASCOT)
    assert "Solly" in json.dumps(old_extra) and "Bolt" not in json.dumps(old_extra) + old, (old, old_extra)
    assert "Bolt" in json.dumps(new_extra) and "Solly" not in json.dumps(new_extra) + new, (new, new_extra)
    assert ask_with(client, "solverx", MASCOT)[2] == old_extra  # the promoted version is still the first
