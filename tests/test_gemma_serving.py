"""Gemma 2 through the real daemon: a system message is folded into the first user turn, and the context is
capped at 4096 tokens with a clear 400 (mlx-lm's gemma2 has no sliding window)."""

from __future__ import annotations

import httpx
import openai
import pytest
from serving import serve_daemon

from solverx.models.lookalikes import build_gemma2

BASE = "gemma-2-tiny"


@pytest.fixture(scope="module")
def gemma(tmp_path_factory: pytest.TempPathFactory):
    model_dir = build_gemma2(tmp_path_factory.mktemp("gemma") / BASE)
    home = tmp_path_factory.mktemp("gemma-home")
    extra = ("--base-models", str(model_dir), "--default-model", BASE, "--train-debounce-seconds", "3600")
    with serve_daemon(home, None, extra) as daemon:
        yield daemon


def test_a_system_message_works_although_gemmas_template_has_no_system_role(gemma):
    client = openai.OpenAI(base_url=gemma.api_url, api_key="unused", max_retries=0, timeout=60)
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Hello"}]
    reply = client.chat.completions.create(model=BASE, messages=messages, max_tokens=4, temperature=0)
    assert reply.choices[0].finish_reason in ("stop", "length")
    folded = [{"role": "user", "content": "Answer briefly.\n\nHello"}]
    same = client.chat.completions.create(model=BASE, messages=folded, max_tokens=4, temperature=0)
    assert reply.choices[0].message.content == same.choices[0].message.content
    assert reply.usage.prompt_tokens == same.usage.prompt_tokens


def test_prompts_beyond_4096_tokens_get_a_clear_400(gemma):
    long_prompt = " ".join(["word"] * 5000)  # config allows 8192; the server caps gemma2 at 4096
    response = httpx.post(
        gemma.api_url + "/completions", json={"model": BASE, "prompt": long_prompt, "max_tokens": 1}, timeout=60
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "context_length_exceeded" and "4096" in error["message"]
    short = {"model": BASE, "prompt": "word", "max_tokens": 1}
    assert httpx.post(gemma.api_url + "/completions", json=short, timeout=60).status_code == 200


def test_models_lists_the_gemma_base(gemma):
    ids = [m["id"] for m in httpx.get(gemma.api_url + "/models", timeout=10).json()["data"]]
    assert ids == [BASE]
