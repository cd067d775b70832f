"""kill -9 of the daemon mid-training: the training child dies with it, and the restarted daemon reports the run
failed, cleans the registry's leftovers and serves the version it served before."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx
from serving import serve_daemon
from training_fixtures import QUICK_RECIPE, Runs, child_pids, company_files, drop_files, with_changes

CHILD_EXIT_S = 10.0


def test_a_killed_daemon_takes_its_training_child_along(tiny_model_dir: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    args = ("--train-debounce-seconds", "0.3")
    with serve_daemon(home, tiny_model_dir, args) as daemon:
        runs = Runs(daemon.base_url, daemon.home, daemon.log)
        drop_files(home / "inbox" / "zorvik", company_files(QUICK_RECIPE))
        first = runs.wait_finished(runs.wait_new("zorvik", set(), timeout=30), 300)
        assert first["state"] == "succeeded", runs.diagnostics(first["run_id"])

        long = with_changes(QUICK_RECIPE, train={"sft_iters": 5000})
        drop_files(home / "inbox" / "zorvik", company_files(long))
        run_id = runs.wait_new("zorvik", {first["run_id"]}, timeout=30)
        runs.wait(run_id, lambda r: (r.get("progress") or {}).get("stage") == "sft", 300, "reached SFT")
        (child,) = child_pids(run_id)
        os.kill(daemon.process.pid, signal.SIGKILL)  # no handler, no cleanup: the parent is just gone
        daemon.process.wait(timeout=10)
        deadline = time.monotonic() + CHILD_EXIT_S
        while child_pids(run_id) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert child_pids(run_id) == [], f"training child {child} outlived its daemon"

    leftover = home / "adapters" / ".tmp" / "half-written"  # what a registration killed mid-copy leaves
    leftover.mkdir(parents=True)
    (leftover / "adapters.safetensors").write_bytes(b"\0" * 64)
    with serve_daemon(home, tiny_model_dir, ("--train-debounce-seconds", "3600")) as daemon:
        runs = Runs(daemon.base_url, daemon.home, daemon.log)
        run = runs.get(run_id)
        assert run["state"] == "failed" and run["error"], run
        assert not leftover.exists() and list((home / "adapters" / ".tmp").iterdir()) == []
        models = {m["id"] for m in httpx.get(daemon.base_url + "/v1/models").json()["data"]}
        assert "zorvik" in models and "zorvik@1" in models
