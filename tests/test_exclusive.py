"""Exclusive training: while a run needs the base's memory, its requests get 503 + Retry-After, then it serves again."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
from serving import serve_daemon
from training_fixtures import QUICK_RECIPE, Runs, company_files, drop_files, with_changes

from solverx.daemon.exclusive import must_pause
from solverx.trainer.recipe import Recipe

CHAT = {"model": "solverx-tiny", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4}


def test_base_is_paused_with_retry_after_while_it_trains_then_serves_again(tiny_model_dir: Path, tmp_path: Path):
    extra = ("--train-debounce-seconds", "0.3", "--training-exclusive", "always")
    with serve_daemon(tmp_path / "home", tiny_model_dir, extra) as daemon:
        assert httpx.post(daemon.api_url + "/chat/completions", json=CHAT, timeout=60).status_code == 200
        runs = Runs(daemon.base_url, daemon.home, daemon.log)
        recipe = with_changes(QUICK_RECIPE, train={"sft_iters": 40})
        drop_files(daemon.home / "inbox" / "zorvik", company_files(recipe))
        run_id = runs.wait_new("zorvik", set(), timeout=60)

        refused = None
        deadline = time.monotonic() + 120
        while refused is None and time.monotonic() < deadline:
            response = httpx.post(daemon.api_url + "/chat/completions", json=CHAT, timeout=60)
            if response.status_code == 503:
                refused = response
            elif runs.get(run_id)["state"] not in ("queued", "running"):
                break
            time.sleep(0.1)
        assert refused is not None, "the base was never paused during the run\n" + runs.diagnostics(run_id)
        assert int(refused.headers["Retry-After"]) > 0
        assert refused.json()["error"]["code"] == "model_paused"
        assert "training zorvik" in refused.json()["error"]["message"]
        assert "solverx-tiny" in httpx.get(daemon.base_url + "/health", timeout=10).json()["paused"]

        finished = runs.wait_finished(run_id)
        assert finished["state"] == "succeeded", runs.diagnostics(run_id)
        # The run's log says "finished" as the child exits; the base is loaded again right after (a second or so,
        # longer on a busy machine), and until then requests keep getting 503 + Retry-After.
        deadline = time.monotonic() + 60
        while httpx.get(daemon.base_url + "/health", timeout=10).json()["paused"] and time.monotonic() < deadline:
            time.sleep(0.1)
        after = httpx.post(daemon.api_url + "/chat/completions", json=CHAT, timeout=60)
        assert after.status_code == 200, after.text
        assert httpx.get(daemon.base_url + "/health", timeout=10).json()["paused"] == []


class _Engine:
    """Just what must_pause reads of an engine: where the base lives and its context."""

    def __init__(self, model_dir: Path, context_length: int = 1024):
        self.model_dir, self.context_length = model_dir, context_length


@pytest.mark.parametrize(("machine_gib", "expected"), [(48, False), (0.05, True)])
def test_auto_mode_asks_the_memory_planner(tiny_model_dir: Path, machine_gib: float, expected: bool):
    engine = _Engine(tiny_model_dir)
    assert must_pause(engine, "auto", Recipe(), max_adapters=8, machine_bytes=int(machine_gib * 2**30)) is expected
    assert must_pause(engine, "always", Recipe(), max_adapters=8) is True
    assert must_pause(engine, "never", Recipe(), max_adapters=8) is False
