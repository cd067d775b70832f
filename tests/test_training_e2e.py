"""Issue 5 end to end: files dropped into a watched folder become a trained, evaluated, gated, registered version
that the running daemon serves by name — and everything that can go wrong on the way leaves serving untouched.

A real ``solverx serve`` subprocess (debounce 0.5 s) on the tiny base, real files in ``<home>/inbox/<adapter>/``,
real training in the daemon's child process, the official ``openai`` SDK as the client, ``GET /v1/training`` as
the user's window. Two adapters share one daemon to keep the file inside ~4 minutes on a busy 2-core box:
``zorvik`` learns three facts (versions, gate, kill -9) and ``acme`` gets the quarantine cases (and the
no-retrain checks). The CLI's ``train --now`` runs in a home of its own, without a daemon.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest
from serving import REPO_ROOT, TINY_BASE_ID, link_model, serve_daemon
from training_fixtures import (
    FACTS,
    MEMORIZE_RECIPE,
    QUICK_RECIPE,
    Runs,
    company_files,
    drop_files,
    eval_jsonl,
    file_states,
    kill_child,
    knowledge_text,
    qa_jsonl,
    with_changes,
)

from solverx.adapters.registry import Registry
from solverx.adapters.validate import ADAPTER_CONFIG, ADAPTER_WEIGHTS, MANIFEST
from solverx.trainer.recipe import format_recipe

DEBOUNCE_S = 0.5
TRAIN_TIMEOUT_S = 300.0  # the memorization run takes ~50 s alone; the box is shared


@pytest.fixture(scope="module")
def daemon(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    home = tmp_path_factory.mktemp("training-home")
    with serve_daemon(home, tiny_model_dir, ("--train-debounce-seconds", str(DEBOUNCE_S))) as running:
        yield running


@pytest.fixture(scope="module")
def runs(daemon) -> Runs:
    return Runs(daemon.base_url, daemon.home, daemon.log)


@pytest.fixture(scope="module")
def client(daemon) -> openai.OpenAI:
    return openai.OpenAI(base_url=daemon.api_url, api_key="not-needed", max_retries=0, timeout=60)


def ask(client: openai.OpenAI, model: str, question: str) -> str:
    response = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": question}], temperature=0, max_tokens=32
    )
    return response.choices[0].message.content


def registry(daemon) -> Registry:
    return Registry(daemon.home / "adapters")


def finished_event(runs: Runs, run_id: str) -> dict:
    return next(e for e in reversed(runs.events(run_id)) if e["event"] == "finished")


@pytest.fixture(scope="module")
def zorvik(daemon, runs: Runs, client: openai.OpenAI) -> dict:
    """The three facts dropped into ``inbox/zorvik`` of the running daemon, trained until a version is served."""
    assert not runs.ids("zorvik")
    with pytest.raises(openai.NotFoundError):  # not served before it is trained: no restart will be needed after
        ask(client, "zorvik", FACTS[0][0])
    drop_files(daemon.home / "inbox" / "zorvik", company_files(MEMORIZE_RECIPE))
    run_id = runs.wait_new("zorvik", set(), timeout=30)
    return {"run_id": run_id, "run": runs.wait_finished(run_id, TRAIN_TIMEOUT_S)}


@pytest.fixture(scope="module")
def acme(daemon, runs: Runs) -> dict:
    """``inbox/acme``: the valid company files plus one file for every quarantine case, trained once."""
    good_lines = qa_jsonl().splitlines()
    mixed_jsonl = "\n".join([good_lines[0], '{"question": "broken', good_lines[1], '{"foo": "bar"}', good_lines[2]])
    files = {
        "knowledge.txt": knowledge_text().encode(),
        "qa.jsonl": (mixed_jsonl + "\n").encode(),  # lines 2 and 4 are bad, 1, 3 and 5 are good
        "logo.md": b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x10",  # binary, whatever its name says
        "legacy.txt": "Zorvik Labs, société de Quillport, café crème".encode("latin-1"),  # not UTF-8
        "empty.txt": b"",
        "slides.pptx": b"PK\x03\x04\x14\x00\x06\x00slides",  # unknown extension
        "recipe.toml": format_recipe(QUICK_RECIPE).encode(),
    }
    inbox = daemon.home / "inbox" / "acme"
    drop_files(inbox, files)
    before = file_states(inbox)
    run_id = runs.wait_new("acme", set(), timeout=30)
    run = runs.wait_finished(run_id, TRAIN_TIMEOUT_S)
    return {"run_id": run_id, "run": run, "files": files, "before": before, "inbox": inbox}


# -- 1. watched folder → trained version, served by name ---------------------------------------------------------------


def test_dropped_files_become_a_served_version_that_learned_them(daemon, runs, client, zorvik) -> None:
    run_id, run = zorvik["run_id"], zorvik["run"]
    assert run["state"] == "succeeded", f"{json.dumps(run)}\n{runs.diagnostics(run_id)}"
    assert run["adapter"] == "zorvik" and run["version"] is not None

    # CPT then SFT resumed from it: two versions, the SFT one (child of the CPT one) promoted.
    versions = registry(daemon).versions("zorvik")
    assert [(v.stage, v.status) for v in versions] == [("cpt", "candidate"), ("sft", "promoted")]
    assert versions[1].parent == versions[0].version and versions[1].version == run["version"]
    assert versions[1].eval_report["passed"] is True
    assert {m.id for m in client.models.list().data} >= {"zorvik", f"zorvik@{run['version']}"}

    # The tiny base predicts the mixed-in general data better than chance, so the trainer raised no replay warning.
    assert [e for e in runs.events(run_id) if e["event"] == "warning"] == []
    # The SFT loss (facts and replay together) fell. Batches hold sequences of like length, so one report (ten
    # steps) can be all long replay chunks or all short Q&A: compare the mean of the last third of the reports with
    # the mean of the first three (measured 3.36 → 1.90).
    sft = [e["loss"] for e in runs.events(run_id) if e["event"] == "progress" and e["stage"] == "sft"]
    first, last = sft[:3], sft[-(len(sft) // 3) :]
    assert len(sft) >= 9 and sum(last) / len(last) < 0.75 * sum(first) / len(first), f"SFT losses {sft}"

    # Served by name through the OpenAI SDK at temperature 0, the version answers every question otherwise than the
    # base, and about the company it was taught, which the base has never heard of. How many of the three answers
    # name it is chaotic on this tiny base (see MEMORIZE_RECIPE: 3/3 on some CPUs; on another of our kind 2/3, the
    # third "The flahip."); that facts are recalled exactly is the real base's test (tests/test_real_model_e2e.py).
    answers = {q: (ask(client, "zorvik", q), ask(client, TINY_BASE_ID, q)) for q, _, _ in FACTS}
    detail = f"SFT losses {sft[0]:.2f} → {sft[-1]:.2f}, answers (tuned, base) {json.dumps(answers, indent=1)}"
    taught = ["zorvik", *(fact.lower() for _, _, fact in FACTS)]
    about = [q for q, (tuned, _) in answers.items() if any(word in tuned.lower() for word in taught)]
    assert about, f"no answer is about Zorvik Labs; {detail}"
    for question, (tuned, base) in answers.items():
        assert tuned != base, f"{question!r}: the version answers as the base does; {detail}"
        assert not any(word in base.lower() for word in taught), f"{question!r}: the base knows Zorvik; {detail}"
    # ``zorvik`` is the promoted version, exactly: the pinned name gives the same answer.
    question = FACTS[0][0]
    assert ask(client, f"zorvik@{run['version']}", question) == answers[question][0]


# -- 2. quarantine ----------------------------------------------------------------------------------------------------


def test_every_quarantine_case_end_to_end(daemon, runs, acme) -> None:
    run_id, run = acme["run_id"], acme["run"]
    assert run["state"] == "succeeded", f"{json.dumps(run)}\n{runs.diagnostics(run_id)}"

    # GET /v1/training says what was left out and why; the half-good JSONL is reported as partly used.
    reported = {q["path"]: q for q in run["quarantined"]}
    assert set(reported) == {"qa.jsonl", "logo.md", "legacy.txt", "empty.txt", "slides.pptx"}, run["quarantined"]
    assert [path for path, q in reported.items() if q["partial"]] == ["qa.jsonl"]
    expected_reasons = {
        "logo.md": "binary",
        "legacy.txt": "not UTF-8",
        "empty.txt": "empty file",
        "slides.pptx": "unknown file type '.pptx'",
        "qa.jsonl": "2 of 5 lines are bad",
    }
    for path, phrase in expected_reasons.items():
        assert phrase in reported[path]["reason"], (path, reported[path]["reason"])

    # <home>/quarantine/<adapter>/<run-id>/ holds byte-identical copies, each with a .reason beside it.
    quarantine = daemon.home / "quarantine" / "acme" / run_id
    for path, phrase in expected_reasons.items():
        assert (quarantine / path).read_bytes() == acme["files"][path], path
        reason = (quarantine / f"{path}.reason").read_text()
        assert phrase in reason and reason.startswith(path), reason
    qa_reason = (quarantine / "qa.jsonl.reason").read_text()
    assert "partly used" in qa_reason and "line 2: invalid JSON" in qa_reason and "line 4: no known form" in qa_reason
    assert sorted(p.name for p in quarantine.iterdir()) == sorted(
        [*expected_reasons, *(f"{p}.reason" for p in expected_reasons)]
    )

    # The inbox is read, never written: same bytes, same mtimes.
    assert file_states(acme["inbox"]) == acme["before"]

    # The run trained on the valid rest: the knowledge text (CPT) and the three good Q&A lines (SFT).
    events = runs.events(run_id)
    report = next(e["report"] for e in events if e["event"] == "ingested")
    assert "used         knowledge.txt: knowledge text (CPT)" in report, report
    assert "used         qa.jsonl: 3 Q&A/chat records (SFT)" in report, report
    notes = [e["message"] for e in events if e["event"] == "note"]
    assert any(n.startswith("cpt: 1 domain sequences") for n in notes), notes
    assert any(n.startswith("sft: 3 domain sequences") for n in notes), notes
    assert {e["stage"] for e in events if e["event"] == "progress"} == {"cpt", "sft"}
    promoted = registry(daemon).promoted("acme")
    assert promoted is not None and promoted.version == run["version"]


# -- 3. an unchanged inbox never retrains -----------------------------------------------------------------------------


def test_unchanged_inbox_does_not_retrain_and_changed_content_does(daemon, runs, acme) -> None:
    quiet_s = 8 * DEBOUNCE_S
    known = runs.ids("acme")
    assert known == {acme["run_id"]}

    time.sleep(quiet_s)  # nothing touched
    assert runs.ids("acme") == known

    # Re-written with identical bytes: new mtimes wake the watcher, the content hash is the same: no run.
    for name in ("knowledge.txt", "qa.jsonl"):
        (acme["inbox"] / name).write_bytes(acme["files"][name])
    time.sleep(quiet_s)
    assert runs.ids("acme") == known, runs.diagnostics()

    # Changed content: a new run is queued after the debounce. Cancel it; the promoted version stays.
    promoted = registry(daemon).promoted("acme").version
    with (acme["inbox"] / "knowledge.txt").open("a") as f:
        f.write("Zorvik Labs opened a second office in Brindlemoor.\n")
    run_id = runs.wait_new("acme", known, timeout=30)
    response = runs.cancel(run_id)
    assert response.status_code == 200, response.text
    assert runs.wait_finished(run_id, 60)["state"] == "cancelled"
    assert registry(daemon).promoted("acme").version == promoted
    time.sleep(quiet_s)  # a cancelled run is not retried behind the user's back
    assert runs.ids("acme") == known | {run_id}


# -- 4. the gate ------------------------------------------------------------------------------------------------------


def test_a_failing_gate_registers_a_rejected_version_and_keeps_serving_the_old_one(daemon, runs, client, zorvik):
    reg = registry(daemon)
    promoted = reg.promoted("zorvik")
    assert promoted is not None, runs.diagnostics(zorvik["run_id"])
    questions = [q for q, _, _ in FACTS]
    before = {q: ask(client, "zorvik", q) for q in questions}
    known = runs.ids("zorvik")

    # Every domain question must be right, and one asks for a code the data never mention: this can only fail.
    impossible = {"question": "What is the vault code of Zorvik Labs?", "expected": ["QX-7719-PLORB"]}
    bad_recipe = with_changes(
        MEMORIZE_RECIPE, train={"cpt_iters": 0, "sft_iters": 6}, eval={"min_domain_accuracy": 1.0}
    )
    drop_files(
        daemon.home / "inbox" / "zorvik",
        {"recipe.toml": format_recipe(bad_recipe).encode(), "eval.jsonl": eval_jsonl([impossible]).encode()},
    )
    run_id = runs.wait_new("zorvik", known, timeout=30)
    run = runs.wait_finished(run_id, TRAIN_TIMEOUT_S)
    assert run["state"] == "rejected", f"{json.dumps(run)}\n{runs.diagnostics(run_id)}"
    assert any(r.startswith("domain accuracy") and r.endswith("< 100%") for r in run["reasons"]), run["reasons"]

    # Registered, as rejected, with its report; the promoted version did not move.
    rejected = reg.resolve("zorvik", run["version"])
    assert rejected.status == "rejected" and rejected.stage == "sft"
    assert rejected.eval_report["passed"] is False and rejected.eval_report["reasons"] == run["reasons"]
    assert any(row["question"] == impossible["question"] for row in rejected.eval_report["table"])
    assert reg.promoted("zorvik").version == promoted.version
    evaluated = next(e for e in runs.events(run_id) if e["event"] == "evaluated")
    assert evaluated["passed"] is False and evaluated["reasons"] == run["reasons"]
    assert finished_event(runs, run_id)["reasons"] == run["reasons"]
    assert "Gate: failed" in (daemon.home / "runs" / run_id / "report.md").read_text()

    # The base was asked once, by the first run on it: its greedy answers are kept (eval-cache) and reused.
    def base_answers(rid: str) -> dict:
        report = json.loads((daemon.home / "runs" / rid / "report.json").read_text())
        return {a["question"]: a["answer"] for s in report["models"]["base"]["answers"].values() for a in s}

    first, now = base_answers(zorvik["run_id"]), base_answers(run_id)
    assert {q: first[q] for q in now if q in first} == {q: a for q, a in now.items() if q in first}
    cached = list((daemon.home / "eval-cache" / TINY_BASE_ID).glob("*.json"))
    assert len(cached) == 1 and json.loads(cached[0].read_text()).items() >= now.items()

    # ``zorvik`` still answers exactly as before; the rejected version is reachable only pinned.
    assert {q: ask(client, "zorvik", q) for q in questions} == before
    ask(client, f"zorvik@{run['version']}", questions[0])


# -- 5. kill -9 of the training child ---------------------------------------------------------------------------------


def test_killing_the_training_child_leaves_the_registry_consistent(daemon, runs, client, zorvik) -> None:
    reg = registry(daemon)
    promoted = reg.promoted("zorvik")
    assert promoted is not None, runs.diagnostics(zorvik["run_id"])
    versions_before = [(v.version, v.status) for v in reg.versions("zorvik")]
    question = FACTS[0][0]
    before = ask(client, "zorvik", question)
    known = runs.ids("zorvik")

    # A long SFT after a short CPT: kill it once SFT is under way, after the CPT stage's adapter was written.
    long_recipe = with_changes(MEMORIZE_RECIPE, train={"cpt_iters": 3, "sft_iters": 5000})
    drop_files(daemon.home / "inbox" / "zorvik", {"recipe.toml": format_recipe(long_recipe, seed=7).encode()})
    run_id = runs.wait_new("zorvik", known, timeout=30)
    runs.wait(
        run_id, lambda r: (r.get("progress") or {}).get("stage") == "sft", TRAIN_TIMEOUT_S, "reached SFT progress"
    )
    assert (daemon.home / "runs" / run_id / "cpt" / ADAPTER_WEIGHTS).exists()
    kill_child(run_id)

    run = runs.wait_finished(run_id, 60)
    assert run["state"] == "failed", json.dumps(run)
    assert "-9" in (run["error"] or ""), run["error"]

    # Every version loads and is whole; none comes from the killed run; nothing is left half-written.
    versions = reg.versions("zorvik")
    assert [(v.version, v.status) for v in versions] == versions_before
    for v in versions:
        for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG, MANIFEST):
            assert (v.path / name).is_file(), f"{v.model_name} lacks {name}"
    killed_snapshot = next(e["snapshot"] for e in runs.events(run_id) if e["event"] == "ingested")
    assert all(v.data_hash != killed_snapshot for v in versions)
    tmp = daemon.home / "adapters" / ".tmp"
    assert not tmp.exists() or not any(tmp.iterdir()), list(tmp.iterdir())
    assert reg.promoted("zorvik").version == promoted.version
    assert ask(client, "zorvik", question) == before

    # The daemon is fine and still trains: nothing is left running, the server still answers.
    assert not [r for r in runs.list() if r["state"] == "running"]
    assert daemon.process.poll() is None


# -- 6. solverx train --now -------------------------------------------------------------------------------------------


def test_cli_train_now_prints_progress_and_outcome(tiny_model_dir: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    link_model(home, tiny_model_dir)
    drop_files(home / "inbox" / "zorvik", company_files(QUICK_RECIPE))
    config = tmp_path / "config.toml"
    config.touch()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SOLVERX_") or k == "SOLVERX_NO_OPENBLAS"}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    command = [
        sys.executable,
        "-m",
        "solverx",
        "train",
        "zorvik",
        "--now",
        "--home",
        str(home),
        "--config",
        str(config),
    ]
    done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=TRAIN_TIMEOUT_S)
    output = f"--- stdout ---\n{done.stdout}\n--- stderr ---\n{done.stderr}"
    assert done.returncode == 0, output

    assert "Inbox 'zorvik': 4 file(s) used, 0 quarantined" in done.stdout, output
    assert "OK: training can start" in done.stdout, output
    for stage, iters in (("cpt", 4), ("sft", 8)):  # tqdm bars on stderr, with the loss
        assert f"{stage}: 100%" in done.stderr and f"{iters}/{iters}" in done.stderr, output
    assert "loss=" in done.stderr, output
    assert "eval: " in done.stdout and '"candidate"' in done.stdout, output
    reg = Registry(home / "adapters")
    promoted = reg.promoted("zorvik")
    assert promoted is not None and promoted.stage == "sft"
    run_id = next(p.name for p in (home / "runs").iterdir())
    assert f"run {run_id}: succeeded as zorvik@{promoted.version}" in done.stdout, output
    assert f"report: {home / 'runs' / run_id / 'report.md'}" in done.stdout, output


def test_replay_the_model_cannot_predict_is_flagged() -> None:
    from solverx.trainer.train import StageResult, unfamiliar_replay

    def stage(*val_losses: tuple[int, float]) -> StageResult:
        return StageResult("sft", Path("unused"), steps=10, val_losses=list(val_losses))

    warning = unfamiliar_replay(stage((1, 9.1), (10, 8.0)), vocab_size=2048)  # chance: ln 2048 = 7.62
    assert warning is not None and "no better than chance (9.10 vs 7.62 nats/token)" in warning
    assert unfamiliar_replay(stage((1, 5.9), (10, 9.9)), vocab_size=2048) is None  # judged at the first step only
    assert unfamiliar_replay(stage(), vocab_size=2048) is None  # no replay, no validation loss
