"""Safe on café Wi-Fi: loopback by default, no open bind without a key, and the key guards every route."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest
from serving import REPO_ROOT, serve_daemon

KEY = "s3cret-key"


@pytest.fixture(scope="module")
def locked(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    home = tmp_path_factory.mktemp("locked")
    with serve_daemon(home, tiny_model_dir, ("--api-key", KEY, "--train-debounce-seconds", "3600")) as daemon:
        yield daemon


@pytest.mark.parametrize("path", ["/health", "/metrics", "/v1/models", "/v1/adapters", "/v1/training", "/v1/inbox"])
def test_every_route_needs_the_key(locked, path: str):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"}):
        refused = httpx.get(locked.base_url + path, headers=headers, timeout=10)
        assert refused.status_code == 401, (path, headers)
        assert refused.json()["error"]["code"] == "invalid_api_key"
    allowed = httpx.get(locked.base_url + path, headers={"Authorization": f"Bearer {KEY}"}, timeout=10)
    assert allowed.status_code == 200, (path, allowed.text)


def test_posts_are_refused_before_the_body_is_read(locked):
    refused = httpx.post(locked.api_url + "/chat/completions", content=b"x" * 4096, timeout=10)
    assert refused.status_code == 401


def test_the_openai_sdk_sends_the_key_as_bearer(locked):
    client = openai.OpenAI(base_url=locked.api_url, api_key=KEY, max_retries=0, timeout=60)
    reply = client.chat.completions.create(
        model="solverx-tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0
    )
    assert reply.choices[0].finish_reason in ("stop", "length")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=locked.api_url, api_key="nope", max_retries=0).models.list()


def test_only_the_dashboard_shell_is_public(locked):
    page = httpx.get(locked.base_url + "/", timeout=10)
    assert page.status_code == 200 and "<html" in page.text.lower()
    assert "solverx-tiny" not in page.text  # the shell carries no data


def test_refuses_a_non_loopback_bind_without_a_key(tmp_path: Path):
    done = subprocess.run(
        [sys.executable, "-m", "solverx", "serve", "--host", "0.0.0.0", "--port", "0", "--home", str(tmp_path)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode != 0
    assert "refusing to listen on 0.0.0.0" in done.stderr and "API key" in done.stderr
    assert "Traceback" not in done.stderr
