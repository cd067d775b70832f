"""Issue 16: Ollama's protocol beside OpenAI's, through a real ``solverx serve`` (the tiny base, an adapter on it) and
the official ``ollama`` Python client, plus a raw NDJSON stream read with httpx."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import ollama
import pytest
from adapter_fixtures import random_adapter
from serving import TINY_BASE_ID, serve_daemon

from solverx.adapters.registry import Registry

YES_NO = {
    "type": "object",
    "properties": {"answer": {"enum": ["yes", "no"]}},
    "required": ["answer"],
    "additionalProperties": False,  # else the tiny base, free to add keys, writes one until it runs out of tokens
}


@pytest.fixture(scope="module")
def daemon(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    home = tmp_path_factory.mktemp("ollama-home")
    adapter = random_adapter(tiny_model_dir, tmp_path_factory.mktemp("adapter") / "helper", seed=3)
    Registry(home / "adapters").register(adapter, "helper", base_id=TINY_BASE_ID, base_dir=tiny_model_dir, promote=True)
    with serve_daemon(home, tiny_model_dir) as running:
        yield running


@pytest.fixture(scope="module")
def client(daemon) -> ollama.Client:
    return ollama.Client(host=daemon.base_url, timeout=120)


def test_tags_list_bases_adapters_and_pinned_versions_by_ollama_name(client) -> None:
    names = {m.model for m in client.list().models}
    assert {f"{TINY_BASE_ID}:latest", "helper:latest", "helper:1"} <= names, names
    shown = client.show("helper:1")
    assert shown.details.parent_model == f"{TINY_BASE_ID}:latest"
    with pytest.raises(ollama.ResponseError) as caught:
        client.show("nothing-here")
    assert caught.value.status_code == 404 and "nothing-here" in caught.value.error


def test_chat_answers_streamed_and_not_with_counts(client) -> None:
    messages = [{"role": "user", "content": "Hello"}]
    whole = client.chat(model=TINY_BASE_ID, messages=messages, options={"temperature": 0, "num_predict": 12})
    assert whole.done and whole.done_reason in ("stop", "length") and whole.message.role == "assistant"
    assert whole.eval_count and whole.prompt_eval_count and whole.message.content
    parts = list(client.chat(model="helper", messages=messages, stream=True, options={"num_predict": 12, "seed": 1}))
    assert parts[-1].done and not any(p.done for p in parts[:-1]) and len(parts) > 2
    again = client.chat(model="helper:latest", messages=messages, options={"num_predict": 12, "seed": 1})
    assert "".join(p.message.content for p in parts) == again.message.content  # same seed, same text


def test_generate_and_format_as_a_schema(client) -> None:
    reply = client.generate(model=TINY_BASE_ID, prompt="Is water wet?", format=YES_NO, options={"temperature": 0})
    assert json.loads(reply.response)["answer"] in ("yes", "no"), reply.response
    loaded = client.generate(model=TINY_BASE_ID, prompt="")
    assert loaded.done and loaded.done_reason == "load"


def test_unhonoured_options_and_bad_formats_are_refused_by_name(client) -> None:
    for options, named in (({"top_k": 5}, "options.top_k"), ({"num_predict": "many"}, "options.num_predict")):
        with pytest.raises(ollama.ResponseError) as caught:
            client.generate(model=TINY_BASE_ID, prompt="hi", options=options)
        assert caught.value.status_code == 400 and named in caught.value.error, caught.value.error
    with pytest.raises(ollama.ResponseError) as caught:
        client.generate(model=TINY_BASE_ID, prompt="hi", format={"type": "strin"})
    assert caught.value.status_code == 400 and "format" in caught.value.error
    client.generate(model=TINY_BASE_ID, prompt="hi", options={"num_ctx": 4096, "num_predict": 2})  # resources: fine


def test_a_raw_ndjson_stream_is_one_json_object_per_line(daemon) -> None:
    body = {"model": TINY_BASE_ID, "prompt": "Once upon a time", "options": {"num_predict": 8}}
    with httpx.stream("POST", daemon.base_url + "/api/generate", json=body, timeout=60) as response:
        assert response.status_code == 200 and response.headers["content-type"] == "application/x-ndjson"
        lines = [json.loads(line) for line in response.iter_lines() if line]
    assert all(not line["done"] and isinstance(line["response"], str) for line in lines[:-1])
    assert lines[-1]["done"] and lines[-1]["done_reason"] in ("stop", "length") and 0 < lines[-1]["eval_count"] <= 8
    assert httpx.get(daemon.base_url + "/api/version").json()["version"]
