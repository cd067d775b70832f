"""Issue 18: one training run over several ranks with MLX's own engine, started through ``mlx.launch`` as the product
starts it — here two ranks on 127.0.0.1 (ring backend), the one-machine stand-in for two Macs.

The runs are real (the tiny base, the trainer's child, the launcher, the ring all-reduce); nothing is mocked.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest
from adapter_fixtures import random_adapter
from serving import REPO_ROOT, TINY_BASE_ID, link_model, serve_daemon
from training_fixtures import QUICK_RECIPE, Runs, company_files, drop_files, with_changes

from solverx.adapters.registry import Registry
from solverx.paths import state_dirs
from solverx.trainer.child import EXIT_LOST_PEER, LOCAL_HOST, TrainHosts
from solverx.trainer.foreground import start_child
from solverx.trainer.launch import EXIT_RANK_FAILED, exit_code
from solverx.trainer.runlog import read_events

TWO_LOCAL = (LOCAL_HOST, LOCAL_HOST)
# Batch 4 splits 2 + 2; enough steps for the losses to move, few enough for ~15 s a run on the tiny base.
SPLIT_RECIPE = with_changes(QUICK_RECIPE, train={"cpt_iters": 2, "sft_iters": 10, "batch_size": 4})
TIMEOUT_S = 240


def run_foreground(home: Path, hosts: TrainHosts) -> tuple[str, list[dict]]:
    """One run of ``zorvik`` through the trainer's child (and the launcher), to its end: its id and events."""
    run = start_child(state_dirs(home), "zorvik", default_base="solverx-tiny", hosts=hosts)
    deadline = time.monotonic() + TIMEOUT_S
    events = []
    for event in run.events(poll_seconds=0.2):
        events.append(event)
        assert time.monotonic() < deadline, f"run {run.run_id} took over {TIMEOUT_S} s"
    return run.run_id, events


def stage_losses(events: list[dict]) -> list[tuple[str, int, float]]:
    return [(e["stage"], e["step"], e["loss"]) for e in events if e["event"] == "progress"]


def rank_pids(launcher_pid: int) -> dict[int, int]:
    """The launcher's ranks: MLX_RANK -> pid, read from /proc."""
    ranks = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
            env = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        ppid = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("PPid:"))
        rank = next((int(v.split(b"=")[1]) for v in env if v.startswith(b"MLX_RANK=")), None)
        if ppid == launcher_pid and rank is not None:
            ranks[rank] = int(entry.name)
    return ranks


def test_the_launcher_exits_with_the_first_failing_rank_and_says_which() -> None:
    assert exit_code({0: (0, False, 5.0), 1: (0, False, 5.1)}, 2) == (0, None)
    assert exit_code({0: (3, False, 1.0), 1: (-15, False, 1.2)}, 2) == (3, None)  # refused: the run log says why
    code, reason = exit_code({0: (-15, False, 2.0), 1: (-9, False, 1.0)}, 2)  # rank 1 killed, then rank 0 stopped
    assert code == EXIT_RANK_FAILED and reason == "rank 1 was killed by signal 9"
    code, reason = exit_code({0: (EXIT_LOST_PEER, False, 1.0), 1: (-9, False, 1.5)}, 2)  # rank 0 noticed first
    assert code == EXIT_RANK_FAILED and reason == "rank 1 was killed by signal 9"
    code, reason = exit_code({0: (0, False, 1.0)}, 2)
    assert code == EXIT_RANK_FAILED and "never reported" in reason


def test_train_hosts_start_ranks_through_mlx_launch() -> None:
    assert TrainHosts().command(["--x"]) == [sys.executable, "-m", "solverx.trainer.child", "--x"]
    assert TrainHosts((LOCAL_HOST,)).world_size == 1
    hosts = TrainHosts(TWO_LOCAL)
    command = hosts.command(["--x"])
    assert command[:3] == [sys.executable, "-m", "solverx.trainer.launch"]
    assert command[command.index("--hosts") + 1] == "127.0.0.1,127.0.0.1"
    assert command[command.index("--backend") + 1] == "ring"
    assert int(command[command.index("--starting-port") + 1]) > 1024
    assert command[-4:] == [sys.executable, "-m", "solverx.trainer.child", "--x"]
    env = hosts.env()
    if "OPENBLAS_NUM_THREADS" not in os.environ:  # two ranks share this machine's cores
        assert env["OPENBLAS_NUM_THREADS"] == str(max(1, (os.cpu_count() or 1) // 2))
    with pytest.raises(ValueError, match="IP address"):
        TrainHosts(("127.0.0.1", "mac-studio.local"))


def test_two_ranks_train_like_one_with_the_same_global_batch(tiny_model_dir: Path, tmp_path: Path) -> None:
    runs = {}
    for name, hosts in (("one", TrainHosts()), ("two", TrainHosts(TWO_LOCAL))):
        home = tmp_path / name
        link_model(home, tiny_model_dir)
        drop_files(home / "inbox" / "zorvik", company_files(SPLIT_RECIPE))
        runs[name] = (home, *run_foreground(home, hosts))

    (_, _, events1), (home2, id2, events2) = runs["one"], runs["two"]
    assert events2[0]["world_size"] == 2 and len(events2[0]["hosts"]) == 2, events2[0]
    assert events1[0]["world_size"] == 1
    assert events2[-1]["state"] == events1[-1]["state"] == "succeeded", (events1[-1], events2[-1])
    assert events2[-1]["world_size"] == 2
    assert json.loads((home2 / "runs" / id2 / "report.json").read_text())["world_size"] == 2

    # Each rank averages the loss over its own tokens, and the ranks' means are averaged: with the rows split
    # 2 + 2 that differs from one mean over all four only by how unevenly the tokens fall (measured: <1 %).
    one, two = stage_losses(events1), stage_losses(events2)
    assert [(s, n) for s, n, _ in one] == [(s, n) for s, n, _ in two]
    for (stage, step, a), (_, _, b) in zip(one, two, strict=True):
        assert abs(a - b) <= 0.03 * abs(a), f"{stage} step {step}: one rank {a:.4f}, two ranks {b:.4f}"

    # Validation sums the loss over every rank's tokens before dividing (mlx-lm's evaluate): before the first
    # update both runs hold the same weights and the same data, so the first validation loss is one number.
    first = [next(e["loss"] for e in events if e["event"] == "validation") for events in (events1, events2)]
    assert abs(first[0] - first[1]) <= 1e-4 * first[0], first

    rates = [json.loads((h / "runs" / i / "report.json").read_text()) for h, i, _ in runs.values()]
    same = [{k: r["models"]["candidate"][k] for k in ("domain_accuracy", "leakage_rate")} for r in rates]
    assert same[0] == same[1], same


def test_check_hosts_passes_on_two_local_ranks_and_names_an_unreachable_one(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    link_model(home, tiny_model_dir)
    config = tmp_path / "config.toml"
    config.touch()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SOLVERX_")}
    base = ["--home", str(home), "--config", str(config), "--base-models", "solverx-tiny"]

    def check(hosts: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "solverx", "train", "--check-hosts", "--train-hosts", hosts, *base]
        return subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=200)

    done = check("127.0.0.1,127.0.0.1")
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert "rank 0:" in out and "rank 1:" in out and "2 ranks ready" in out, out
    assert out.count("base sha256:") == 2, out

    done = check("127.0.0.1,127.0.0.2")  # no sshd answers there
    out = done.stdout + done.stderr
    assert done.returncode == 1, out
    assert "rank 1" in out and "ssh" in out, out


def test_killing_a_rank_fails_the_run_and_the_previous_version_keeps_serving(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    args = ("--train-debounce-seconds", "0.5", "--train-hosts", "127.0.0.1,127.0.0.1")
    # The version that must keep serving: an adapter registered before the run (a run of its own would cost ~8 s).
    previous = random_adapter(tiny_model_dir, tmp_path / "previous", seed=5)
    registry = Registry(home / "adapters")
    registry.register(previous, "zorvik", base_id=TINY_BASE_ID, base_dir=tiny_model_dir, promote=True)
    promoted = registry.promoted("zorvik")
    with serve_daemon(home, tiny_model_dir, args) as daemon:
        runs = Runs(daemon.base_url, home, daemon.log)
        drop_files(home / "inbox" / "zorvik", company_files(with_changes(SPLIT_RECIPE, train={"sft_iters": 400})))
        run_id = runs.wait_new("zorvik", set())
        runs.wait(run_id, lambda run: (run.get("progress") or {}).get("stage") == "sft", TIMEOUT_S, "reached SFT")
        launcher = next(
            int(p.name) for p in Path("/proc").iterdir()
            if p.name.isdigit() and b"solverx.trainer.launch" in _cmdline(p) and run_id.encode() in _cmdline(p)
        )  # fmt: skip
        ranks = rank_pids(launcher)
        assert sorted(ranks) == [0, 1], ranks
        os.kill(ranks[1], signal.SIGKILL)

        failed = runs.wait_finished(run_id, timeout=60)
        assert failed["state"] == "failed", failed
        assert "rank 1 was killed by signal 9" in failed["error"], failed
        assert not any(_alive(pid) for pid in (launcher, *ranks.values())), "a rank or the launcher outlived the run"
        assert Registry(home / "adapters").promoted("zorvik") == promoted
        assert not [e for e in read_events(home / "runs" / run_id) if e["event"] == "registered"]

        client = openai.OpenAI(base_url=daemon.api_url, api_key="x", max_retries=0, timeout=60)
        reply = client.chat.completions.create(
            model="zorvik",
            messages=[{"role": "user", "content": "Where is Zorvik Labs?"}],
            max_tokens=4,
            extra_body={"ignore_eos": True},  # a random adapter sampled at temperature 1 may end on its first token
        )
        assert reply.choices[0].message.content, reply  # the promoted version still answers
        assert Registry(home / "adapters").promoted("zorvik") == promoted


def _cmdline(proc: Path) -> bytes:
    try:
        return (proc / "cmdline").read_bytes()
    except OSError:
        return b""


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in status


def test_killing_the_launcher_takes_every_rank_with_it(tiny_model_dir: Path, tmp_path: Path) -> None:
    """What happens to the ranks when the daemon dies: its child, the launcher, goes, and they must follow."""
    home = tmp_path / "home"
    link_model(home, tiny_model_dir)
    drop_files(home / "inbox" / "zorvik", company_files(with_changes(SPLIT_RECIPE, train={"sft_iters": 400})))
    run = start_child(state_dirs(home), "zorvik", default_base="solverx-tiny", hosts=TrainHosts(TWO_LOCAL))
    deadline = time.monotonic() + TIMEOUT_S
    while not any(e["event"] == "progress" for e in read_events(run.run_dir)):
        assert run.process.poll() is None and time.monotonic() < deadline, "the run ended before training"
        time.sleep(0.2)
    ranks = rank_pids(run.process.pid)
    assert sorted(ranks) == [0, 1], ranks
    run.process.kill()  # kill -9: the launcher cannot stop them itself
    run.process.wait()
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in ranks.values()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(pid) for pid in ranks.values()), "a rank outlived its launcher"
