"""A hostile client against every route of a real daemon: no 5xx, OpenAI's error schema on every 4xx, no file
written outside the state directory, and the daemon still answers a valid chat afterwards.

Hypothesis generates the bodies (any JSON, and valid requests with one field mutated) and the path parameters,
derandomized and bounded so the suite stays fast; ``bench/fuzz.py`` runs the same properties longer.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from serving import serve_daemon

EXAMPLES = int(os.environ.get("SOLVERX_FUZZ_EXAMPLES", "60"))  # per property; bench/fuzz.py runs thousands

POST_ROUTES = (
    "/v1/chat/completions", "/v1/completions", "/v1/adapters", "/v1/adapters/solverx/promote",
    "/v1/adapters/solverx/rollback", "/v1/load_lora_adapter", "/v1/unload_lora_adapter", "/v1/training",
)  # fmt: skip
GET_ROUTES = ("/health", "/v1/models", "/v1/adapters", "/v1/training", "/v1/inbox", "/metrics", "/")
PATH_ROUTES = ("GET /v1/models/{}", "GET /v1/adapters/{}", "DELETE /v1/adapters/{}", "DELETE /v1/training/{}",
               "GET /v1/training/{}/loss.png")  # fmt: skip

text = st.text(
    st.characters(codec="utf-8") | st.sampled_from(["\ud800", "\udfff", "\x00", "/", "."])
) | st.sampled_from(["../../etc/passwd", "%2e%2e/", "solverx@0", "solverx@99999999999999999999", "/tmp", ""])
scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | text
json_values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4), max_leaves=12
)
VALID_CHAT = {"model": "solverx-tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
FIELDS = (
    "model", "messages", "max_tokens", "temperature", "top_p", "stop", "seed", "stream", "n", "tools",
    "response_format", "stream_options", "logit_bias", "prompt", "path", "adapter", "version", "lora_name",
)  # fmt: skip


@pytest.fixture(scope="module")
def daemon(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("fuzz")
    args = ("--max-tokens-cap", "8", "--train-debounce-seconds", "3600")
    with serve_daemon(root / "home", tiny_model_dir, args) as running:
        yield running, root


def _check(response: httpx.Response, what: str) -> None:
    assert response.status_code < 500, f"{what}: {response.status_code} {response.text[:300]}"
    if response.status_code >= 400:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and isinstance(error["message"], str), what


def _encode(value: object) -> bytes:
    return json.dumps(value, ensure_ascii=True, allow_nan=True).encode()  # \\ud800 escapes survive as JSON


FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))


@FUZZ
@given(body=json_values | st.binary(max_size=64), route=st.sampled_from(POST_ROUTES))
def test_any_body_on_any_post_route_is_a_success_or_a_4xx(daemon, body, route) -> None:
    running, _ = daemon
    content = body if isinstance(body, bytes) else _encode(body)
    response = httpx.post(running.base_url + route, content=content, headers={"content-type": "application/json"},
                          timeout=60)  # fmt: skip
    _check(response, f"POST {route} {content[:120]!r}")


@FUZZ
@given(field=st.sampled_from(FIELDS), value=json_values, route=st.sampled_from(POST_ROUTES[:2]))
def test_a_valid_request_with_one_field_gone_wrong_is_a_success_or_a_4xx(daemon, field, value, route) -> None:
    running, _ = daemon
    body = {**VALID_CHAT, "prompt": "hi", field: value}
    response = httpx.post(running.base_url + route, content=_encode(body), timeout=60)
    _check(response, f"POST {route} {field}={value!r}")


@FUZZ
@given(route=st.sampled_from(PATH_ROUTES), param=text, get=st.sampled_from(GET_ROUTES))
def test_path_parameters_and_reads_are_a_success_or_a_4xx(daemon, route, param, get) -> None:
    running, _ = daemon
    method, template = route.split(" ")
    quoted = quote(param.encode("utf-8", "surrogatepass"), safe="") or "x"  # any bytes, as a client may send them
    _check(httpx.request(method, running.base_url + template.format(quoted), timeout=60), f"{method} {template}")
    _check(httpx.get(running.base_url + get, timeout=60), f"GET {get}")


def test_afterwards_nothing_was_written_outside_the_state_directory_and_chat_still_works(daemon) -> None:
    running, root = daemon
    outside = sorted(p.relative_to(root) for p in root.rglob("*") if not p.is_relative_to(running.home))
    assert outside == [], outside
    reply = httpx.post(running.base_url + "/v1/chat/completions", json=VALID_CHAT, timeout=60)
    assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["role"] == "assistant"
    assert httpx.get(running.base_url + "/health").json()["status"] == "ok"
