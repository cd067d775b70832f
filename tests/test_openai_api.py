"""The OpenAI-compatible API end to end: a real ``solverx serve`` subprocess, the official ``openai`` SDK as the
client (raw httpx where the SDK would refuse to send the mistake), every body checked against OpenAI's spec."""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time

import httpx
import openai
import pytest

MODEL = "solverx-tiny"
QUESTION = [{"role": "user", "content": "What is Python?"}]


@pytest.fixture(scope="module")
def server(solverx_server):
    return solverx_server


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.api_url, api_key="not-needed", max_retries=0, timeout=60)


def raw_json(response) -> dict:
    """The body exactly as the server sent it (the SDK's parsed objects fill in and drop fields)."""
    return json.loads(response.text)


def sse_chunks(server, path: str, body: dict) -> list[dict]:
    """POST a streaming request with plain httpx; return its events, checking the SSE framing and [DONE]."""
    with httpx.stream("POST", server.api_url + path, json={**body, "stream": True}, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        text = response.read().decode()
    assert text.endswith("data: [DONE]\n\n")
    events = text.split("\n\n")[:-1]
    assert all(event.startswith("data: ") for event in events)
    return [json.loads(event.removeprefix("data: ")) for event in events[:-1]]


def running(server) -> int:
    return httpx.get(server.base_url + "/health", timeout=5).json()["running"]


def wait_idle(server, within_s: float = 1.0) -> float:
    """Seconds until the engine has no running sequence; fails after ``within_s``."""
    start = time.monotonic()
    while running(server) != 0:
        assert time.monotonic() - start < within_s, "the batch slot was not freed"
        time.sleep(0.02)
    return time.monotonic() - start


# -- startup, health, models -------------------------------------------------------------------------------


def test_ready_line_and_health(server):
    port = server.base_url.rsplit(":", 1)[1]
    assert f"solverx: serving {MODEL} on http://127.0.0.1:{port}" in server.log()
    health = httpx.get(server.base_url + "/health").json()
    assert health["status"] == "ok" and health["models"] == [MODEL]
    assert health["running"] == 0


def test_model_list(server, client, openapi):
    raw = client.models.with_raw_response.list()
    body = raw_json(raw)
    openapi("ListModelsResponse", body)
    assert body["data"] == [
        {"id": MODEL, "object": "model", "created": body["data"][0]["created"], "owned_by": "solverx"}
        | {"parent": None, "root": MODEL}
    ]
    assert [m.id for m in raw.parse()] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


# -- generation ------------------------------------------------------------------------------------------


def test_chat_completion(client, openapi):
    raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=QUESTION, max_tokens=12, temperature=0)
    body = raw_json(raw)
    openapi("CreateChatCompletionResponse", body)
    assert re.fullmatch(r"chatcmpl-\w+", body["id"]) and body["model"] == MODEL
    completion = raw.parse()
    choice = completion.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.message.refusal is None and choice.finish_reason in ("stop", "length")
    usage = completion.usage
    assert usage.prompt_tokens > 5 and 1 <= usage.completion_tokens <= 12
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_text_completion(client, openapi):
    raw = client.completions.with_raw_response.create(model=MODEL, prompt="def sort(", max_tokens=10, temperature=0)
    body = raw_json(raw)
    openapi("CreateCompletionResponse", body)
    assert body["id"].startswith("cmpl-") and body["object"] == "text_completion"
    text = raw.parse().choices[0].text
    assert text
    same = client.completions.create(model=MODEL, prompt=["def sort("], max_tokens=10, temperature=0)
    assert same.choices[0].text == text


def test_temperature_zero_is_deterministic(client):
    texts = {
        client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=16, temperature=0)
        .choices[0]
        .message.content
        for _ in range(2)
    }
    assert len(texts) == 1


def test_seed_makes_sampling_reproducible(client):
    def sample(seed: int) -> str:
        completion = client.completions.create(model=MODEL, prompt="The", max_tokens=16, temperature=1.0, seed=seed)
        return completion.choices[0].text

    assert sample(1234) == sample(1234)
    assert len({sample(1), sample(2), sample(3)}) > 1


def test_logit_bias_steers_and_forbids_tokens(server, client, openapi):
    settings = {"model": MODEL, "messages": QUESTION, "max_tokens": 6, "temperature": 0}
    plain = client.chat.completions.create(**settings)
    forced = client.chat.completions.create(**settings, logit_bias={"50": 100})
    assert forced.usage.completion_tokens == 6
    first = forced.choices[0].message.content
    assert first and first != plain.choices[0].message.content
    # every token is id 50: the text is one piece repeated, whatever it decodes to
    piece = first[: len(first) // 6]
    assert piece and first == piece * 6, first
    forbidden = client.chat.completions.create(**settings, logit_bias={"50": -100})
    assert piece not in forbidden.choices[0].message.content
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(**settings, logit_bias={"999999": 5})
    check_error(openapi, caught.value, 400, "invalid_value", "logit_bias")


def test_penalties_are_honoured(client):
    settings = {
        "model": MODEL,
        "prompt": "Python is",
        "max_tokens": 24,
        "temperature": 0,
        "extra_body": {"ignore_eos": True},
    }
    plain = client.completions.create(**settings).choices[0].text
    penalties = {"frequency_penalty": 2.0, "presence_penalty": 2.0}
    penalised = client.completions.create(**settings, **penalties).choices[0].text
    assert penalised != plain, plain

    def repeats(text: str) -> int:  # words said again (the tiny base's greedy text repeats more or less per CPU)
        words = text.split()
        return len(words) - len(set(words))

    assert repeats(penalised) < repeats(plain), (plain, penalised)
    assert client.completions.create(**settings, **penalties).choices[0].text == penalised


def test_streamed_chat_equals_the_non_streamed_answer(server, client, openapi):
    settings = {"model": MODEL, "messages": QUESTION, "max_tokens": 16, "temperature": 0, "seed": 7}
    whole = client.chat.completions.create(**settings)
    chunks = list(client.chat.completions.create(**settings, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks][-1] == whole.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1

    raw = sse_chunks(server, "/chat/completions", settings)
    for chunk in raw:
        openapi("CreateChatCompletionStreamResponse", chunk)
        assert "usage" not in chunk
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in raw) == whole.choices[0].message.content


def test_stream_usage_chunk(server, client, openapi):
    settings = {"model": MODEL, "messages": QUESTION, "max_tokens": 8, "temperature": 0}
    whole = client.chat.completions.create(**settings)
    chunks = list(client.chat.completions.create(**settings, stream=True, stream_options={"include_usage": True}))
    *content, last = chunks
    assert last.choices == [] and last.usage is not None
    assert last.usage.model_dump() == whole.usage.model_dump()
    assert all(c.usage is None and len(c.choices) == 1 for c in content)

    raw = sse_chunks(server, "/chat/completions", {**settings, "stream_options": {"include_usage": True}})
    for chunk in raw:
        openapi("CreateChatCompletionStreamResponse", chunk)
        assert "usage" in chunk
    assert raw[-1]["usage"]["total_tokens"] == whole.usage.total_tokens


def test_streamed_text_completion(server, client, openapi):
    settings = {"model": MODEL, "prompt": "import os\n", "max_tokens": 12, "temperature": 0}
    whole = client.completions.create(**settings)
    chunks = list(client.completions.create(**settings, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == whole.usage.total_tokens

    # OpenAI sends ``finish_reason: null`` until the last chunk although CreateCompletionResponse (which the spec
    # says streamed chunks share) declares it a non-null string; check the chunks with exactly that relaxed.
    for chunk in sse_chunks(server, "/completions", settings):
        if chunk["choices"] and chunk["choices"][0]["finish_reason"] is None:
            chunk = {**chunk, "choices": [{**chunk["choices"][0], "finish_reason": "stop"}]}
        openapi("CreateCompletionResponse", chunk)


def test_stop_strings(client):
    # ignore_eos (vLLM's extension) makes the text long enough to cut, whatever the tiny model prefers to say
    settings = {"model": MODEL, "prompt": "def main():\n", "max_tokens": 24, "temperature": 0}
    settings["extra_body"] = {"ignore_eos": True}
    text = client.completions.create(**settings).choices[0].text
    stop = next(text[i : i + 3] for i in range(4, len(text) - 3) if text[i : i + 3].strip())
    expected = text[: text.find(stop)]
    stopped = client.completions.create(**settings, stop=[stop, "never-appears"]).choices[0]
    assert (stopped.text, stopped.finish_reason) == (expected, "stop")
    streamed = client.completions.create(**settings, stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == expected


def test_eight_concurrent_requests(server):
    async def main() -> list:
        client = openai.AsyncOpenAI(base_url=server.api_url, api_key="not-needed", max_retries=0, timeout=60)
        async with client:
            return await asyncio.gather(
                *(
                    client.chat.completions.create(
                        model=MODEL,
                        messages=[{"role": "user", "content": f"Question number {i}: what is a list?"}],
                        max_tokens=16,
                        temperature=0,
                    )
                    for i in range(8)
                )
            )

    results = asyncio.run(main())
    assert len({r.id for r in results}) == 8
    for result in results:
        assert result.choices[0].finish_reason in ("stop", "length")
        assert 1 <= result.usage.completion_tokens <= 16
    assert running(server) == 0


# -- errors ----------------------------------------------------------------------------------------------


def check_error(openapi, error: openai.APIStatusError, status: int, code: str, param: str | None = None) -> dict:
    body = error.response.json()
    openapi("ErrorResponse", body)
    assert error.status_code == status
    assert (body["error"]["code"], body["error"]["param"]) == (code, param)
    assert "Traceback" not in error.response.text
    return body["error"]


def test_unknown_model_is_404(client, openapi):
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="no-such-model", messages=QUESTION, max_tokens=4)
    error = check_error(openapi, caught.value, 404, "model_not_found", "model")
    assert "no-such-model" in error["message"]
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="x", max_tokens=4, stream=True)


@pytest.mark.parametrize(
    ("fields", "param", "code"),
    [
        ({"temperature": 3}, "temperature", "decimal_above_max_value"),
        ({"top_p": 0}, "top_p", "decimal_below_min_value"),
        ({"max_tokens": 0}, "max_tokens", "integer_below_min_value"),
        ({"max_tokens": 10**6}, "max_tokens", "integer_above_max_value"),
        ({"n": 2}, "n", "unsupported_value"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "array_above_max_length"),
        ({"messages": []}, "messages", "empty_array"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role", "invalid_value"),
        ({"stream": True, "seed": "x"}, "seed", "invalid_type"),
    ],
)
def test_invalid_fields_are_400(client, openapi, fields, param, code):
    settings = {"model": MODEL, "messages": QUESTION, "max_tokens": 4, **fields}
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(**settings)
    error = check_error(openapi, caught.value, 400, code, param)
    assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("content", "code", "param"),
    [
        (b'{"model": "solverx-tiny", "messages": [', "invalid_json", None),
        (b"\xff\xfe not json", "invalid_json", None),
        (b'[{"model": "solverx-tiny"}]', "invalid_type", None),
        (b'{"model": 5, "messages": [{"role": "user", "content": "hi"}]}', "invalid_type", "model"),
    ],
)
def test_malformed_bodies_are_400(server, openapi, content, code, param):
    response = httpx.post(
        server.api_url + "/chat/completions", content=content, headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    openapi("ErrorResponse", response.json())
    assert (response.json()["error"]["code"], response.json()["error"]["param"]) == (code, param)


HOSTILE_ROUTES = ("/chat/completions", "/completions", "/adapters", "/adapters/solverx/promote", "/training")
CHAT = '{"model": "solverx-tiny", "messages": [{"role": "user", "content": "%s"}], "max_tokens": 2}'


@pytest.mark.parametrize(
    ("content", "code", "param"),
    [
        (b"[" * 1000 + b"]" * 1000, "invalid_json", None),  # RecursionError inside json before this guard
        (b"[" * 65 + b"]" * 65, "invalid_json", None),  # deep, yet parsed: still refused before any route
        (b'{"model": "solverx-tiny", "temperature": 1' + b"0" * 400 + b"}", "invalid_value", None),  # OverflowError
        ((CHAT % "\\ud800").encode(), "invalid_value", "messages[0].content"),  # a lone surrogate, as JSON escapes it
        (b'{"model": "solverx-\\udfff", "messages": []}', "invalid_value", "model"),
        (b'{"\\ud800": 1}', "invalid_value", "\\ud800"),
    ],
)
def test_hostile_json_is_a_400_on_every_route_never_a_500(server, openapi, content, code, param):
    for route in HOSTILE_ROUTES:
        response = httpx.post(server.api_url + route, content=content, headers={"content-type": "application/json"})
        assert response.status_code == 400, (route, response.status_code, response.text[:300])
        openapi("ErrorResponse", response.json())
        assert (response.json()["error"]["code"], response.json()["error"]["param"]) == (code, param), route
    assert httpx.get(server.base_url + "/health").json()["status"] == "ok"  # and the daemon is fine


def test_a_request_without_model_gets_the_default_model(server):
    response = httpx.post(
        server.api_url + "/chat/completions", json={"messages": QUESTION, "max_tokens": 2}, timeout=30
    )
    assert response.status_code == 200 and response.json()["model"] == MODEL


def test_prompt_longer_than_the_context_is_400(client, openapi):
    long_prompt = "word " * 5000
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=MODEL, prompt=long_prompt, max_tokens=4)
    check_error(openapi, caught.value, 400, "context_length_exceeded", "prompt")
    with pytest.raises(openai.BadRequestError) as caught:  # a stream too: refused before it starts
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": long_prompt}], max_tokens=4, stream=True
        )
    check_error(openapi, caught.value, 400, "context_length_exceeded", "messages")


def test_wrong_method_unknown_route_and_huge_body(server, openapi):
    wrong_method = httpx.get(server.api_url + "/chat/completions")
    assert wrong_method.status_code == 405 and "POST" in wrong_method.headers["allow"]
    openapi("ErrorResponse", wrong_method.json())
    assert wrong_method.json()["error"]["code"] == "method_not_allowed"

    unknown = httpx.post(server.api_url + "/no/such/route", json={})
    assert unknown.status_code == 404
    openapi("ErrorResponse", unknown.json())
    assert unknown.json()["error"]["code"] == "unknown_url"

    huge = {"model": MODEL, "messages": [{"role": "user", "content": "x" * (2 * 1024 * 1024)}]}
    too_large = httpx.post(server.api_url + "/chat/completions", json=huge, timeout=30)
    assert too_large.status_code == 413
    openapi("ErrorResponse", too_large.json())
    assert too_large.json()["error"]["code"] == "request_too_large"
    assert httpx.get(server.base_url + "/health").status_code == 200


# -- clients that go away ----------------------------------------------------------------------------------


# At temperature 2 the tiny model rarely ends early: these 900 tokens take seconds, so a slot freed within a
# second of the client leaving was freed because it left.
LONG = {"model": MODEL, "prompt": "# ", "max_tokens": 900, "temperature": 2.0, "seed": 9}


def wait_running(server, within_s: float = 2.0) -> None:
    deadline = time.monotonic() + within_s
    while running(server) != 1:  # the engine counts a sequence once it has joined the batch
        assert time.monotonic() < deadline, "the request never started generating"
        time.sleep(0.01)


def test_closed_stream_frees_its_slot(server):
    request = {**LONG, "stream": True}
    with (
        httpx.Client(timeout=30) as http,
        http.stream("POST", server.api_url + "/completions", json=request) as response,
    ):
        assert response.status_code == 200
        lines = response.iter_lines()  # keep it referenced: closing it would close the connection already
        assert next(lines).startswith("data: ")
        wait_running(server)
    wait_idle(server, within_s=1.0)


def test_abandoned_request_frees_its_slot(server):
    def give_up_after_a_while() -> None:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(server.api_url + "/completions", json=LONG, timeout=httpx.Timeout(30, read=1.0))

    thread = threading.Thread(target=give_up_after_a_while)
    thread.start()
    wait_running(server)
    thread.join()
    wait_idle(server, within_s=1.0)
