"""Grounding at request time on a real daemon (tiny base): the served version's own fact graph, in the prompt and in
the response, per model name and per request, and the facts API and CLI. What grounding does to a real model's
answers is tested on the real base (tests/test_real_model_e2e.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest
from adapter_fixtures import random_adapter
from serving import REPO_ROOT, serve_daemon

from solverx.adapters.facts import FACTS_FILE, write_graph
from solverx.models.tiny import TINY_BASE_ID
from solverx.trainer.facts import build_graph
from solverx.trainer.inbox import snapshot
from solverx.trainer.validate import ingest

HQ = "Where is Acme's headquarters?"
OFF_DOMAIN = "What is the capital of France?"


def version_with_facts(base_dir: Path, root: Path, city: str, seed: int) -> Path:
    """An adapter directory with a fact graph built by the trainer's own code from a two-file inbox."""
    inbox = root / "inbox"
    inbox.mkdir(parents=True)
    pairs = [(HQ, f"Acme's headquarters is in {city}."), ("When was Acme founded?", "Acme was founded in 2011."),
             ("Who runs Acme?", "Acme is run by Kim Min-ji."), ("What does Acme sell?", "Acme sells robot arms."),
             ("How many people work at Acme?", "About 90 people work at Acme.")]  # fmt: skip
    lines = [json.dumps({"question": q, "answer": a}) for q, a in pairs]
    (inbox / "qa.jsonl").write_text("\n".join(lines) + "\n")
    (inbox / "triples.csv").write_text(f"Acme,has the mascot,{city} Owl\n")
    graph = build_graph(ingest(snapshot(inbox), inbox, root / "quarantine"), set())
    adapter = random_adapter(base_dir, root / "adapter", seed=seed)
    write_graph(graph, adapter / FACTS_FILE)
    return adapter


@pytest.fixture(scope="module")
def daemon(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """A daemon serving ``acme`` version 1 (facts: Gangnam), version 2 (Pangyo, promoted) and 3 (no graph)."""
    root = tmp_path_factory.mktemp("grounding")
    with serve_daemon(root / "home", tiny_model_dir) as served:
        for version, path in enumerate(
            (
                version_with_facts(tiny_model_dir, root / "v1", "Gangnam", seed=1),
                version_with_facts(tiny_model_dir, root / "v2", "Pangyo", seed=2),
            ),
            start=1,
        ):
            done = httpx.post(f"{served.api_url}/adapters", json={"name": "acme", "path": str(path)}, timeout=60)
            assert done.status_code == 201 and done.json()["version"] == version, done.text
        bare = random_adapter(tiny_model_dir, root / "v3", seed=3)
        done = httpx.post(f"{served.api_url}/adapters", json={"name": "bare", "path": str(bare)}, timeout=60)
        assert done.status_code == 201, done.text
        yield served


def client(daemon) -> openai.OpenAI:
    return openai.OpenAI(base_url=daemon.api_url, api_key="unused", max_retries=0, timeout=60)


def ask(daemon, model: str, question: str, **extra):
    raw = client(daemon).chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": question}], temperature=0, max_tokens=4, extra_body=extra
    )
    return raw.headers, raw.parse()


def test_a_grounded_answer_says_which_facts_went_into_its_prompt(daemon) -> None:
    headers, reply = ask(daemon, "acme+facts", HQ)
    facts = reply.model_extra["grounding"]["facts"]
    assert facts[0]["fact"] == "Acme's headquarters is in Pangyo." and facts[0]["source"] == "qa.jsonl:1"
    assert facts[0]["entities"] == ["Acme"] and facts[0]["score"] > 0
    assert headers["x-solverx-facts"] == str(len(facts)) and "qa.jsonl" in headers["x-solverx-fact-sources"]
    _, plain = ask(daemon, "acme", HQ)  # registered without a recipe: grounding is off unless asked for
    assert "grounding" not in (plain.model_extra or {})
    assert reply.usage.prompt_tokens > plain.usage.prompt_tokens + 5  # the facts are in the prompt
    _, by_field = ask(daemon, "acme", HQ, grounding=True)
    assert by_field.model_extra["grounding"] == reply.model_extra["grounding"]
    assert by_field.usage.prompt_tokens == reply.usage.prompt_tokens
    _, turned_off = ask(daemon, "acme+facts", HQ, grounding=False)
    assert turned_off.usage.prompt_tokens == plain.usage.prompt_tokens


def test_a_question_naming_no_entity_is_answered_as_without_grounding(daemon) -> None:
    headers, reply = ask(daemon, "acme+facts", OFF_DOMAIN)
    _, plain = ask(daemon, "acme", OFF_DOMAIN)
    assert headers["x-solverx-facts"] == "0" and "grounding" not in (reply.model_extra or {})
    assert reply.usage.prompt_tokens == plain.usage.prompt_tokens
    assert reply.choices[0].message.content == plain.choices[0].message.content
    listed = httpx.get(f"{daemon.api_url}/adapters/acme/facts", params={"query": OFF_DOMAIN}).json()
    assert listed == {"object": "list", "model": "acme@2", "data": []}


def test_a_pinned_version_retrieves_from_its_own_graph_only(daemon) -> None:
    _, old = ask(daemon, "acme@1+facts", HQ)
    _, new = ask(daemon, "acme+facts", HQ)
    old_facts = " ".join(f["fact"] for f in old.model_extra["grounding"]["facts"])
    new_facts = " ".join(f["fact"] for f in new.model_extra["grounding"]["facts"])
    assert "Gangnam" in old_facts and "Pangyo" not in old_facts
    assert "Pangyo" in new_facts and "Gangnam" not in new_facts
    listed = httpx.get(f"{daemon.api_url}/adapters/acme@1/facts", params={"query": "What is Acme's mascot?"}).json()
    assert listed["model"] == "acme@1" and listed["data"][0]["fact"] == "Acme has the mascot Gangnam Owl."
    assert listed["data"][0]["source"] == "triples.csv" and listed["data"][0]["entities"] == ["Acme", "Gangnam Owl"]


def test_streams_and_ollamas_api_carry_the_facts_header(daemon) -> None:
    with httpx.stream("POST", f"{daemon.api_url}/chat/completions", timeout=60, json={
        "model": "acme+facts", "messages": [{"role": "user", "content": HQ}], "max_tokens": 2, "stream": True,
    }) as streamed:  # fmt: skip
        assert streamed.status_code == 200 and streamed.headers["x-solverx-facts"] != "0"
        assert "data: [DONE]" in streamed.read().decode()
    ollama = httpx.post(f"{daemon.base_url}/api/chat", timeout=60, json={
        "model": "acme+facts", "messages": [{"role": "user", "content": HQ}], "stream": False,
        "options": {"num_predict": 2},
    })  # fmt: skip
    assert ollama.status_code == 200 and ollama.headers["x-solverx-facts"] != "0", ollama.text


def test_grounding_that_cannot_be_done_is_refused_by_name(daemon) -> None:
    for model, body, status, param in (
        (TINY_BASE_ID, {"grounding": True}, 400, "grounding"),  # a base has no fact graph
        ("bare", {"grounding": True}, 400, "grounding"),  # nor has a version registered without one
        ("acme", {"grounding": "yes"}, 400, "grounding"),
        ("acme+facts+facts", {}, 404, "model"),
    ):
        with pytest.raises(openai.APIStatusError) as refused:
            ask(daemon, model, HQ, **body)
        assert refused.value.status_code == status, (model, body)
        assert refused.value.body["param"] == param, refused.value.body
    text = httpx.post(f"{daemon.api_url}/completions", json={"model": "acme", "prompt": HQ, "grounding": True})
    assert text.status_code == 400 and text.json()["error"]["param"] == "grounding"  # a completion has no question
    missing = httpx.get(f"{daemon.api_url}/adapters/acme/facts")
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "query"
    no_graph = httpx.get(f"{daemon.api_url}/adapters/bare/facts", params={"query": HQ})
    assert no_graph.status_code == 404 and "no fact graph" in no_graph.json()["error"]["message"]


def test_the_cli_shows_what_the_api_shows(daemon) -> None:
    command = [sys.executable, "-m", "solverx", "facts", "acme@1", HQ, "--json", "--home", str(daemon.home),
               "--config", str(daemon.home / "config.toml")]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("SOLVERX_")}
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env, cwd=REPO_ROOT)
    assert done.returncode == 0, done.stderr
    api = httpx.get(f"{daemon.api_url}/adapters/acme@1/facts", params={"query": HQ}).json()
    assert json.loads(done.stdout) == api and api["data"]
