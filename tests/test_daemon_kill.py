"""kill -9 of the daemon at seeded points of training runs and of registrations: after every restart the registry
is consistent, the promoted version serves, no training child outlives its daemon and no temporary file is left.

One daemon's restart is the next point's daemon, so six points cost seven starts. The points are drawn from a
fixed seed over the span a training run (ingest → replay → CPT → SFT → evaluation → registration) and a
registration were measured to take here, so they land in every stage on any machine.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import signal
import threading
import time
from contextlib import ExitStack
from pathlib import Path

import httpx
from serving import Daemon, serve_daemon
from training_fixtures import QUICK_RECIPE, Runs, child_pids, company_files, drop_files, with_changes

from solverx.adapters.registry import Registry

SEED = 20261201
TRAINING_POINTS = 4
REGISTRATION_POINTS = 2  # 6 points, 7 daemon starts of ~5 s each: the suite's time is the budget
CHILD_EXIT_S = 10.0
ARGS = ("--train-debounce-seconds", "0.3")


def inbox_files(point: int) -> dict[str, bytes]:
    """The company's files with a recipe that differs per point, so every point's drop is new content."""
    return company_files(with_changes(QUICK_RECIPE, train={"sft_iters": 8 + point}))


def kill(daemon: Daemon) -> None:
    os.kill(daemon.process.pid, signal.SIGKILL)  # no handler, no cleanup: the parent is just gone
    daemon.process.wait(timeout=10)


def no_orphans(home: Path) -> list[int]:
    deadline = time.monotonic() + CHILD_EXIT_S
    runs = [run.name for run in (home / "runs").iterdir()] if (home / "runs").exists() else []
    while (alive := [pid for run in runs for pid in child_pids(run)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    return alive


def temporary_files(home: Path) -> list[Path]:
    """Leftovers of an interrupted write: the registry's .tmp entries and any ``*.partial`` file or folder."""
    leftovers = list((home / "adapters" / ".tmp").iterdir()) if (home / "adapters" / ".tmp").exists() else []
    return leftovers + [path for path in home.rglob("*") if ".partial" in path.name]


def check_registry(home: Path) -> dict[str, int]:
    """Every version's files are there and match their manifest; every adapter serves a version. Returns the
    promoted version of each adapter."""
    registry = Registry(home / "adapters")
    promoted = {}
    for name in registry.names():
        for info in registry.versions(name):
            digest = hashlib.sha256(info.weights_path.read_bytes()).hexdigest()
            assert digest == info.weights_sha256, f"{name}@{info.version}: weights differ from manifest"
            assert info.config_path.is_file()
        served = registry.promoted(name)
        assert served is not None, f"{name} has no promoted version"
        promoted[name] = served.version
    return promoted


def post_quietly(url: str, body: dict) -> None:
    """A registration whose daemon is about to be killed: whether and how it answers is not the point."""
    with contextlib.suppress(httpx.HTTPError):
        httpx.post(url, json=body, timeout=60)


def serves(daemon: Daemon, model: str) -> str:
    body = {"model": model, "messages": [{"role": "user", "content": "Who is Zorvik?"}], "max_tokens": 4}
    response = httpx.post(daemon.api_url + "/chat/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()["model"]


def test_kill_9_at_six_seeded_points_of_training_and_registration(tiny_model_dir: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    rng = random.Random(SEED)
    with ExitStack() as stack:
        daemon = stack.enter_context(serve_daemon(home, tiny_model_dir, ARGS))
        runs = Runs(daemon.base_url, daemon.home, daemon.log)
        drop_files(home / "inbox" / "zorvik", inbox_files(0))
        started = time.monotonic()
        first = runs.wait_finished(runs.wait_new("zorvik", set(), timeout=30), 300)
        training_span = time.monotonic() - started
        assert first["state"] == "succeeded", runs.diagnostics(first["run_id"])
        source = home / "runs" / first["run_id"] / "sft"  # a real adapter to register again and again
        started = time.monotonic()
        register = {"name": "zorvik", "path": str(source), "promote": True}
        assert httpx.post(daemon.api_url + "/adapters", json=register, timeout=60).status_code == 201
        registration_span = time.monotonic() - started

        points = [("training", rng.uniform(0.0, training_span)) for _ in range(TRAINING_POINTS)]
        points += [("registration", rng.uniform(0.0, registration_span)) for _ in range(REGISTRATION_POINTS)]
        rng.shuffle(points)
        known = {first["run_id"]}
        for point, (kind, delay) in enumerate(points, 1):
            before = check_registry(home)
            where = f"point {point}: kill -9 {delay:.2f} s into a {kind}"
            if kind == "training":
                drop_files(home / "inbox" / "zorvik", inbox_files(point))
                run_id = runs.wait_new("zorvik", known, timeout=30)
                known.add(run_id)
                time.sleep(delay)
            else:
                url = daemon.api_url + "/adapters"
                threading.Thread(target=post_quietly, args=(url, register), daemon=True).start()
                time.sleep(delay)
            kill(daemon)
            assert no_orphans(home) == [], f"{where}: a training child outlived its daemon"
            left_behind = {run.name for run in (home / "runs").iterdir()}  # the killed daemon's runs

            if point == 1:  # what a registration killed mid-copy leaves, whether or not a point made one
                leftover = home / "adapters" / ".tmp" / "half-written"
                leftover.mkdir(parents=True, exist_ok=True)
                (leftover / "adapters.safetensors").write_bytes(b"\0" * 64)
                half_cached = home / "eval-cache" / "solverx-tiny" / ".answers.json.4242.partial"
                half_cached.parent.mkdir(parents=True, exist_ok=True)
                half_cached.write_text('{"What is')  # a cache write killed before its rename
            stack.close()  # the killed daemon's context; the restarted one is the next point's daemon
            daemon = stack.enter_context(serve_daemon(home, tiny_model_dir, ARGS))
            runs = Runs(daemon.base_url, daemon.home, daemon.log)
            after = check_registry(home)
            assert temporary_files(home) == [], f"{where}: left {temporary_files(home)}"
            # the version served before, or the one the interrupted work had finished registering and promoting
            assert after["zorvik"] >= before["zorvik"], f"{where}: {before} -> {after}"
            assert serves(daemon, "zorvik") == "zorvik"
            assert serves(daemon, f"zorvik@{before['zorvik']}") == f"zorvik@{before['zorvik']}"
            # (the restarted daemon may queue a run of its own at once: the inbox changed since the last attempt)
            unfinished = [r for r in runs.list() if r["run_id"] in left_behind and r["state"] in ("queued", "running")]
            assert unfinished == [], f"{where}: the killed daemon's runs still read as unfinished: {unfinished}"
            interrupted = [r for r in runs.list() if r["run_id"] in known and r["state"] == "failed"]
            assert all(r["error"] for r in interrupted), interrupted


def test_a_child_whose_daemon_died_while_it_started_exits_at_once(tmp_path: Path) -> None:
    """The race the seeded points found: the daemon dies between spawning the child and the child arming its
    parent-death signal. The child is told its daemon's pid; already reparented, it exits before doing anything."""
    import subprocess
    import sys

    from solverx.trainer.child import EXIT_ORPHANED, PARENT_PID_ENV

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a pid that was the daemon's and is no longer anyone's parent
    env = {**os.environ, PARENT_PID_ENV: str(gone.pid)}
    args = ["--home", str(tmp_path), "--adapter", "zorvik", "--run-id", "20260101T000000000000Z-zorvik"]
    child = subprocess.run([sys.executable, "-m", "solverx.trainer.child", *args], env=env, timeout=60)
    assert child.returncode == EXIT_ORPHANED
    assert not (tmp_path / "runs").exists()  # it trained nothing and wrote nothing
