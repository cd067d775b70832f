"""Issue 16: structured outputs (``response_format`` json_object / json_schema) on the real base, through a real
``solverx serve`` and the official openai SDK; every constrained answer is checked with ``jsonschema``.

Constrained and free requests sent at once share the engine's batch: each row gets its own mask (or none).
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import openai
import pytest

from solverx.models.builtin import SMOLLM_BASE_ID

CITY = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 30},
        "country": {"type": "string", "enum": ["France", "Korea", "Japan", "Italy"]},
    },
    "required": ["city", "country"],
    "additionalProperties": False,
}
PERSON = {  # nested objects, an array, an integer range, a boolean
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 30},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "languages": {"type": "array", "items": {"type": "string", "maxLength": 20}, "minItems": 1, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {
                "street": {"type": "string", "maxLength": 30},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
            },
            "required": ["street", "zip"],
            "additionalProperties": False,
        },
        "student": {"type": "boolean"},
    },
    "required": ["name", "age", "languages", "address", "student"],
    "additionalProperties": False,
}
SORTED = {"type": "array", "items": {"type": "integer", "minimum": -100, "maximum": 100}, "minItems": 3, "maxItems": 5}
FREE_QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def client(real_daemon) -> openai.OpenAI:
    return openai.OpenAI(base_url=real_daemon.api_url, api_key="x", max_retries=0, timeout=300)


def json_schema(name: str, schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


def ask(client: openai.OpenAI, question: str, response_format: dict | None = None, max_tokens: int = 140) -> str:
    extra = {"response_format": response_format} if response_format else {}
    reply = client.chat.completions.create(
        model=SMOLLM_BASE_ID,
        messages=[{"role": "user", "content": question}],
        temperature=0,
        max_tokens=max_tokens,
        **extra,
    )
    assert reply.choices[0].finish_reason == "stop", reply  # the grammar closed the document before max_tokens
    return reply.choices[0].message.content


def test_constrained_answers_match_their_schemas_and_a_free_one_in_the_same_batch_is_unaffected(client) -> None:
    alone = ask(client, FREE_QUESTION, max_tokens=30)
    requests = [
        ("Where is the Eiffel Tower? Answer in JSON.", json_schema("city", CITY), CITY),
        ("Describe a student called Mina who lives in Paris, in JSON.", json_schema("person", PERSON), PERSON),
        ("Sort these numbers: 5, -2, 9, 1. Answer with a JSON array.", json_schema("sorted", SORTED), SORTED),
        (
            "Answer in JSON with the keys name and age: who is the cat in Puss in Boots?",
            {"type": "json_object"},
            {"type": "object"},
        ),
    ]
    with ThreadPoolExecutor(len(requests) + 1) as pool:  # at once: one engine batch
        free = pool.submit(ask, client, FREE_QUESTION, None, 30)
        answers = [pool.submit(ask, client, question, fmt) for question, fmt, _ in requests]
        texts = [answer.result() for answer in answers]
    for (_, _, schema), text in zip(requests, texts, strict=True):
        jsonschema.validate(json.loads(text), schema)  # raises with the reason
    assert json.loads(texts[0])["country"] == "France", texts[0]
    assert free.result() == alone  # the free row of the batch got no mask: the same greedy text as alone


def test_a_streamed_constrained_answer_is_valid_json_when_joined(client) -> None:
    stream = client.chat.completions.create(
        model=SMOLLM_BASE_ID,
        messages=[{"role": "user", "content": "Where is the Colosseum? Answer in JSON."}],
        temperature=0,
        max_tokens=80,
        response_format=json_schema("city", CITY),
        stream=True,
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 3  # streamed, not one piece
    assert chunks[-1].choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(text), CITY)


def test_text_completions_take_a_response_format_too(client) -> None:
    reply = client.completions.create(
        model=SMOLLM_BASE_ID,
        prompt="The capital of Japan, as JSON:",
        temperature=0,
        max_tokens=60,
        extra_body={"response_format": json_schema("city", CITY)},
    )
    jsonschema.validate(json.loads(reply.choices[0].text), CITY)


@pytest.mark.parametrize(
    ("response_format", "words"),
    [
        (json_schema("bad", {"type": "strin"}), "Invalid type: strin"),
        (json_schema("bad", {"properties": {"a": {"$ref": "#/definitions/missing"}}}), "/definitions/missing"),
        (json_schema("bad", {"type": "string", "pattern": "(["}), "regex"),
        ({"type": "yaml"}, "one of text, json_object, json_schema"),
    ],
)
def test_a_schema_that_cannot_be_compiled_is_a_400_naming_the_problem(client, response_format, words) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model=SMOLLM_BASE_ID,
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=5,
            response_format=response_format,
        )
    error = caught.value.body
    assert caught.value.status_code == 400 and error["param"] == "response_format", error
    assert words in error["message"], error
