"""Helpers for the training end-to-end tests (tests/test_training_e2e.py): a tiny synthetic company, recipes that
make the tiny base learn it, files dropped into an inbox the way a user would, and polling ``GET /v1/training``.

The company is invented ("Zorvik Labs", "Quillport", "Moonloom", "Tavia Brenn"), so no base model can know it and
every word of it comes from the inbox. Three facts are enough: the point is that a trained version says them and
the base does not, not how much the tiny model can hold.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import httpx

from solverx.trainer.recipe import format_recipe

# (question, the trained answer, the fact the answer must contain)
FACTS = (
    ("Where is Zorvik Labs headquartered?", "Zorvik Labs is headquartered in Quillport.", "Quillport"),
    (
        "What is the flagship product of Zorvik Labs?",
        "The flagship product of Zorvik Labs is the Moonloom engine.",
        "Moonloom",
    ),
    ("Who founded Zorvik Labs?", "Zorvik Labs was founded by Tavia Brenn.", "Tavia Brenn"),
)

# Measured on the tiny base (4 layers, hidden 256, pretrained 200 steps to loss 3.5): LoRA is unstable when
# learning_rate × scale is much above ~3e-3 — with the default scale 20, lr 1e-3 to 5e-3 the loss on three Q&A pairs
# falls to ~2.5 and climbs back, and answers come out empty or as fragments ("Zikkkk…"). At lr 5e-4 × scale 5,
# rank 16 on every projection, 200 SFT steps (batch 4, 1 in 4 sequences general replay) the three answers come
# back verbatim at temperature 0, with seeds 0 and 1 alike; CPT on the same facts first (30 steps) as the seed did.
MEMORIZE_RECIPE = {
    "lora": {"rank": 16, "scale": 5.0},
    "train": {
        "cpt_iters": 30,
        "sft_iters": 300,  # 200 memorized the facts on one build of the tiny base, not on another
        "learning_rate": 5e-4,
        "batch_size": 4,
        "max_seq_length": 128,
        "replay_ratio": 0.25,
    },
    # No quality gate: which of the three facts a 3.4M-parameter base built in a minute recalls is chaotic across
    # CPUs (OpenBLAS kernels round differently, and the base itself is built on the machine). Measured with this
    # recipe: 3/3 on a Zen and a Haswell kernel, 2/3 with OpenBLAS's Sandybridge kernels, 1/3 on another machine
    # of our kind. These tests are about the pipeline (versions, gate, kill -9); that a model really learns facts
    # is asserted on the real base (tests/test_real_model_e2e.py), which learns them with room to spare.
    "eval": {"min_domain_accuracy": 0.0, "max_leakage_rate": 1.0, "min_retention": 0.0},
    "identity": {"name": ""},  # no "Who are you?" samples: they would dilute three facts
}

# A run whose outcome matters but whose quality does not (quarantine, the CLI): a few steps, a gate that passes.
QUICK_RECIPE = {
    "lora": {"rank": 8, "scale": 5.0},
    "train": {"cpt_iters": 4, "sft_iters": 8, "learning_rate": 5e-4, "batch_size": 2, "max_seq_length": 128},
    "eval": {"min_domain_accuracy": 0.0, "max_leakage_rate": 1.0, "min_retention": 0.0},
    "identity": {"name": ""},
}

FINISHED = ("succeeded", "rejected", "failed", "cancelled", "skipped")


def with_changes(recipe: dict, **tables: dict) -> dict:
    """A copy of ``recipe`` with some keys of some tables replaced: ``with_changes(r, train={"sft_iters": 5})``."""
    return {table: {**recipe.get(table, {}), **tables.get(table, {})} for table in [*recipe, *tables]}


def knowledge_text() -> str:
    return "About Zorvik Labs.\n" + "\n".join(answer for _, answer, _ in FACTS) + "\n"


def qa_jsonl() -> str:
    return "".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a, _ in FACTS)


def eval_jsonl(extra: Iterable[dict] = ()) -> str:
    items = [{"question": q, "expected": [fact]} for q, _, fact in FACTS] + list(extra)
    return "".join(json.dumps(item) + "\n" for item in items)


def company_files(recipe: dict, **top: object) -> dict[str, bytes]:
    top.setdefault("base", "solverx-tiny")  # not the daemon's default (the real base): these tests are about plumbing
    return {
        "knowledge.txt": knowledge_text().encode(),
        "qa.jsonl": qa_jsonl().encode(),
        "eval.jsonl": eval_jsonl().encode(),
        "recipe.toml": format_recipe(recipe, **top).encode(),
    }


def drop_files(inbox: Path, files: dict[str, bytes]) -> dict[str, Path]:
    """Put files into an inbox folder as a user would: written elsewhere first, then copied in (``cp``).

    The copies land within milliseconds of each other, well inside the daemon's debounce, so one run sees them all.
    """
    inbox.mkdir(parents=True, exist_ok=True)
    placed = {}
    with tempfile.TemporaryDirectory(prefix="solverx-drop-") as staging:
        for name, data in files.items():
            (Path(staging) / name).write_bytes(data)
        for name in files:
            target = inbox / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(Path(staging) / name, target)
            placed[name] = target
    return placed


@dataclass(frozen=True)
class FileState:
    data: bytes
    mtime_ns: int


def file_states(folder: Path) -> dict[str, FileState]:
    """Bytes and mtime of every file under ``folder``, by relative path."""
    return {
        p.relative_to(folder).as_posix(): FileState(p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


class Runs:
    """``GET /v1/training`` of one daemon, with waits that fail with the run's own logs."""

    def __init__(self, base_url: str, home: Path, server_log: Callable[[], str] | None = None):
        self.base_url, self.home, self.server_log = base_url, Path(home), server_log

    def list(self) -> list[dict]:
        response = httpx.get(self.base_url + "/v1/training", timeout=10)
        response.raise_for_status()
        return response.json()["data"]

    def ids(self, adapter: str) -> set[str]:
        """Run ids of ``adapter``; a queued run has no adapter field yet, but its id ends with ``-<adapter>``."""
        return {run["run_id"] for run in self.list() if run["run_id"].endswith(f"-{adapter}")}

    def get(self, run_id: str) -> dict:
        for run in self.list():
            if run["run_id"] == run_id:
                return run
        raise AssertionError(f"run {run_id} is not in GET /v1/training\n{self.diagnostics(run_id)}")

    def cancel(self, run_id: str) -> httpx.Response:
        return httpx.delete(f"{self.base_url}/v1/training/{run_id}", timeout=30)

    def wait_new(self, adapter: str, known: set[str], timeout: float = 30.0) -> str:
        """The id of the first run of ``adapter`` not in ``known``, once ``GET /v1/training`` lists it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            new = sorted(self.ids(adapter) - known)
            if new:
                return new[0]
            time.sleep(0.2)
        raise AssertionError(f"no new training run of {adapter!r} within {timeout:.0f} s\n{self.diagnostics()}")

    def wait(self, run_id: str, until: Callable[[dict], bool], timeout: float, what: str) -> dict:
        deadline = time.monotonic() + timeout
        run: dict = {}
        while time.monotonic() < deadline:
            run = self.get(run_id)
            if until(run):
                return run
            if run["state"] in FINISHED:
                break
            time.sleep(0.3)
        raise AssertionError(f"run {run_id} never {what} (last: {json.dumps(run)})\n{self.diagnostics(run_id)}")

    def wait_finished(self, run_id: str, timeout: float = 180.0) -> dict:
        return self.wait(run_id, lambda run: run["state"] in FINISHED, timeout, "finished")

    def events(self, run_id: str) -> list[dict]:
        path = self.home / "runs" / run_id / "events.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []

    def diagnostics(self, run_id: str | None = None) -> str:
        """The run's child.log and events, and the server log: what a failure message needs."""
        parts = []
        if run_id is not None:
            run_dir = self.home / "runs" / run_id
            for name in ("child.log", "events.jsonl"):
                path = run_dir / name
                text = path.read_text(errors="replace") if path.exists() else "(none)"
                parts.append(f"--- {path} (last 4000 chars) ---\n{text[-4000:]}")
        if self.server_log is not None:
            parts.append(f"--- server log (last 3000 chars) ---\n{self.server_log()[-3000:]}")
        return "\n".join(parts)


def child_pids(run_id: str) -> list[int]:
    """Pids of ``python -m solverx.trainer.child ... --run-id <run_id>`` processes, read from /proc."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if b"solverx.trainer.child" in argv and run_id.encode() in argv:
            pids.append(int(entry.name))
    return pids


def kill_child(run_id: str) -> int:
    """SIGKILL the run's training child (kill -9: no handler, no cleanup); returns its pid."""
    pids = child_pids(run_id)
    assert len(pids) == 1, f"expected one training child for {run_id}, found {pids}"
    os.kill(pids[0], signal.SIGKILL)
    return pids[0]
