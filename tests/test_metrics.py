"""Observability: request ids, JSON access-log lines and ``GET /metrics``, mostly against the real daemon."""

from __future__ import annotations

import io
import json
import logging
import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient

from solverx.server.app import ServerState, create_app
from solverx.server.logs import ACCESS_LOGGER, JSONFormatter
from solverx.server.models import AdapterMatch, ModelCatalog
from solverx.trainer.runlog import RunLog

MODEL = "solverx-tiny"
CHAT = "/v1/chat/completions"
QUESTION = [{"role": "user", "content": "What is Python?"}]
HEX_ID = re.compile(r"[0-9a-f]{32}")
ACCESS_KEYS = {"ts", "level", "request_id", "method", "path", "status", "ms"}

Samples = dict[tuple[str, frozenset], float]


@pytest.fixture(scope="module")
def daemon(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    """A daemon of our own (its counters start at zero) with two finished training runs in its history."""
    from serving import serve_daemon

    home = tmp_path_factory.mktemp("metrics-home")
    for run_id, state in (("20250101T000000000000Z-alpha", "succeeded"), ("20250102T000000000000Z-alpha", "rejected")):
        log = RunLog(home / "runs" / run_id)
        log.write("started", adapter="alpha", run_id=run_id)
        log.write("finished", state=state, version=1 if state == "succeeded" else None, reasons=[])
    with serve_daemon(home, tiny_model_dir, ("--train-debounce-seconds", "3600")) as server:
        yield server


def scrape(daemon) -> Samples:
    response = httpx.get(daemon.base_url + "/metrics", timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def access_lines(daemon, *, waiting_for: tuple[str, ...] = ()) -> list[dict]:
    """The server log's JSON lines (uvicorn's and our other loggers' lines are plain text).

    A request is logged once its response is complete, which may be a moment after the client has it: with
    ``waiting_for`` request ids, read again (up to 10 s) until a line of each is there.
    """
    deadline = time.monotonic() + 10
    while True:
        lines = [json.loads(line) for line in daemon.log().splitlines() if line.startswith("{")]
        seen = {line.get("request_id") for line in lines}
        if all(rid in seen for rid in waiting_for) or time.monotonic() > deadline:
            return lines
        time.sleep(0.05)


# -- request ids ---------------------------------------------------------------------------------------------


def test_request_id_is_assigned_echoed_or_replaced(daemon):
    fresh = httpx.get(daemon.base_url + "/health")
    assert HEX_ID.fullmatch(fresh.headers["x-request-id"])
    again = httpx.get(daemon.base_url + "/health")
    assert again.headers["x-request-id"] != fresh.headers["x-request-id"]

    echoed = httpx.get(daemon.base_url + "/health", headers={"X-Request-ID": "client-req.42:a_b"})
    assert echoed.headers["x-request-id"] == "client-req.42:a_b"

    for insane in ("has spaces", "x" * 129, "semi;colon", "<script>"):
        replaced = httpx.get(daemon.base_url + "/health", headers={"X-Request-ID": insane})
        assert HEX_ID.fullmatch(replaced.headers["x-request-id"]), insane

    unknown = httpx.get(daemon.base_url + "/v1/nowhere", headers={"X-Request-ID": "lost-1"})
    assert unknown.status_code == 404 and unknown.headers["x-request-id"] == "lost-1"


# -- metrics after real traffic ------------------------------------------------------------------------------


def test_metrics_count_requests_tokens_and_latency(daemon):
    before = scrape(daemon)
    usages = []
    for i in range(2):
        body = {"model": MODEL, "messages": QUESTION, "max_tokens": 16, "temperature": 0}
        response = httpx.post(daemon.api_url + "/chat/completions", json=body, timeout=60,
                              headers={"X-Request-ID": f"metrics-chat-{i}"})  # fmt: skip
        assert response.status_code == 200, response.text
        assert response.headers["x-request-id"] == f"metrics-chat-{i}"
        usages.append(response.json()["usage"])
    stream_body = {"model": MODEL, "messages": QUESTION, "max_tokens": 16, "temperature": 0, "stream": True}
    stream_body["stream_options"] = {"include_usage": True}
    with httpx.stream("POST", daemon.api_url + "/chat/completions", json=stream_body, timeout=60) as response:
        assert response.status_code == 200
        events = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: {")]
    usages.append(json.loads(events[-1])["usage"])
    missing = httpx.post(daemon.api_url + "/chat/completions", json={"model": "no-such-model", "messages": QUESTION})
    assert missing.status_code == 404
    after = scrape(daemon)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("solverx_requests_total", route=CHAT, model=MODEL, status="200") == 3
    assert delta("solverx_requests_total", route=CHAT, model="", status="404") == 1
    assert value(after, "solverx_requests_total", route="/metrics", model="", status="200") >= 1
    assert delta("solverx_request_duration_seconds_count", route=CHAT) == 4
    assert delta("solverx_prompt_tokens_total", model=MODEL) == sum(u["prompt_tokens"] for u in usages)
    assert delta("solverx_completion_tokens_total", model=MODEL) == sum(u["completion_tokens"] for u in usages)

    assert delta("solverx_time_to_first_token_seconds_count", model=MODEL) == 3
    assert delta("solverx_time_to_first_token_seconds_bucket", model=MODEL, le="+Inf") == 3
    assert 0 < delta("solverx_time_to_first_token_seconds_sum", model=MODEL) < 60
    assert all(u["completion_tokens"] > 1 for u in usages)  # greedy, so the same every run: each has a speed
    assert delta("solverx_decode_tokens_per_second_count", model=MODEL) == 3
    assert delta("solverx_decode_tokens_per_second_sum", model=MODEL) > 0

    # read at scrape time: an idle engine, no adapter loaded, the two runs seeded in the state directory
    base = {"base": MODEL}
    assert value(after, "solverx_engine_up", **base) == 1
    assert value(after, "solverx_sequences_running", **base) == 0
    assert value(after, "solverx_sequences_waiting", **base) == 0
    assert value(after, "solverx_engine_decode_steps_total", **base) > 0
    assert value(after, "solverx_resident_adapters", **base) == 0
    assert ("solverx_resident_adapter_bytes", frozenset(base.items())) in after
    assert value(after, "solverx_training_runs", state="succeeded") == 1
    assert value(after, "solverx_training_runs", state="rejected") == 1
    assert ("solverx_training_runs", frozenset({("state", "running")})) in after
    assert value(after, "solverx_training_queued") == 0

    logged = {
        line["request_id"]: line for line in access_lines(daemon, waiting_for=("metrics-chat-0", "metrics-chat-1"))
    }
    for i in range(2):
        line = logged[f"metrics-chat-{i}"]
        assert ACCESS_KEYS | {"model"} == set(line)
        assert (line["method"], line["path"], line["status"], line["model"]) == ("POST", CHAT, 200, MODEL)
        assert line["level"] == "info" and line["ms"] > 0
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line["ts"])


def test_every_request_is_logged_once_as_json(daemon):
    httpx.get(daemon.base_url + "/health", headers={"X-Request-ID": "log-once-1"})
    httpx.get(daemon.base_url + "/v1/nowhere", headers={"X-Request-ID": "log-once-2"})
    lines = access_lines(daemon, waiting_for=("log-once-1", "log-once-2"))
    health = [line for line in lines if line.get("request_id") == "log-once-1"]
    assert len(health) == 1 and set(health[0]) == ACCESS_KEYS  # no model: /health serves none
    assert health[0]["status"] == 200 and health[0]["path"] == "/health"
    unknown = [line for line in lines if line.get("request_id") == "log-once-2"]
    assert len(unknown) == 1 and unknown[0]["status"] == 404


# -- in process: failures, the API key -----------------------------------------------------------------------


class _BrokenAdapters:
    def lookup(self, model: str) -> AdapterMatch | None:
        raise RuntimeError("registry index corrupt at /private/path")

    def cards(self):
        return []


@pytest.fixture
def access_log() -> Iterator[io.StringIO]:
    """What ``solverx.access`` writes during the test, as JSON lines."""
    logger = logging.getLogger(ACCESS_LOGGER)
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JSONFormatter())
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield stream
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def test_unexpected_error_is_logged_with_its_request_id(access_log):
    app = create_app(ServerState(ModelCatalog({}, adapters=_BrokenAdapters())))
    with TestClient(app, raise_server_exceptions=False) as client:
        body = {"model": "some-adapter", "messages": QUESTION}
        response = client.post(CHAT, json=body, headers={"X-Request-ID": "boom-1"})
        assert response.status_code == 500 and response.headers["x-request-id"] == "boom-1"
        assert response.json()["error"]["code"] == "internal_error"
        assert "private" not in response.text
        metrics = client.get("/metrics").text
    lines = [json.loads(line) for line in access_log.getvalue().splitlines()]
    failed = [line for line in lines if line["request_id"] == "boom-1"]
    assert len(failed) == 1
    assert failed[0]["level"] == "error" and failed[0]["status"] == 500
    assert "RuntimeError: registry index corrupt" in failed[0]["error"]
    assert "Traceback" in failed[0]["traceback"]
    assert 'solverx_requests_total{model="",route="/v1/chat/completions",status="500"} 1.0' in metrics


def test_metrics_need_the_api_key_when_one_is_set():
    app = create_app(ServerState(ModelCatalog({}), api_key="s3cret"))
    with TestClient(app) as client:
        refused = client.get("/metrics")
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
        assert refused.headers["x-request-id"]
        allowed = client.get("/metrics", headers={"Authorization": "Bearer s3cret"})
        assert allowed.status_code == 200 and "solverx_requests_total" in allowed.text
        assert client.get("/", headers={}).status_code == 200  # the page shell holds no data
