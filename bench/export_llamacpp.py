"""Exported adapters read by a real llama.cpp: ``solverx adapters export`` checked by its consumer.

Run with ``.venv/bin/python bench/export_llamacpp.py`` (re-executes itself with OpenBLAS preloaded on Linux).

1. Trains ``solverx`` on the real default base from SolverX's English facts (the real-base e2e test's files and
   recipe, ~4 min on 2 cores, once: the home is kept in ``.state/bench/export-home``), through ``solverx train --now``.
2. Exports it with the CLI as a GGUF LoRA and as a fused model (``fused.gguf``).
3. Starts llama.cpp's ``llama-server`` (built by ``bench/llamacpp.py``) on the very GGUF the base was imported from
   with ``--lora`` the exported file, and asks held-out paraphrases with the adapter at scale 1 and at scale 0 (the
   base), temperature 0; then on ``fused.gguf`` alone. It prints every answer and how many name the trained fact.

The check passes when llama.cpp with the exported LoRA (and the fused GGUF) answers with the fact where the base
does not, and the GGUF's answers match ours.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO / "tests"))

from benchkit import real_base, serve  # noqa: E402
from llamacpp import llama_server  # noqa: E402
from test_real_model_e2e import HELD_OUT_EN as HELD_OUT  # noqa: E402  the e2e test's paraphrases and recipe
from test_real_model_e2e import fact_files  # noqa: E402

from solverx.blas import ensure_openblas, preload_env  # noqa: E402

HOME = REPO / ".state" / "bench" / "export-home"


def solverx(*args: str) -> str:
    command = [sys.executable, "-m", "solverx", *args, "--home", str(HOME), "--config", str(HOME / "config.toml")]
    done = subprocess.run(command, cwd=REPO, env=preload_env(), capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return done.stdout


def train_once(model_dir: Path, base_id: str) -> None:
    """A promoted ``solverx`` in HOME, trained here the first time."""
    if (HOME / "adapters" / "solverx" / "state.json").is_file():
        return
    shutil.rmtree(HOME, ignore_errors=True)
    (HOME / "models").mkdir(parents=True)
    (HOME / "config.toml").write_text("")  # defaults only, whatever this machine's own config says
    (HOME / "models" / base_id).symlink_to(model_dir)
    inbox = HOME / "inbox" / "solverx"
    inbox.mkdir(parents=True)
    for name, data in fact_files().items():  # the facts' Q&A and text, the held-out questions, the recipe
        (inbox / name).write_bytes(data)
    print("training solverx on the real base (once, ~4 min) …", flush=True)
    solverx("train", "solverx", "--now", "--base-models", base_id)


def ask(url: str, question: str, lora: list[dict] | None = None) -> str:
    import httpx

    body = {"messages": [{"role": "user", "content": question}], "temperature": 0, "max_tokens": 48}
    if lora is not None:
        body["lora"] = lora
    response = httpx.post(url + "/v1/chat/completions", json=body | {"model": "m"}, timeout=300)
    response.raise_for_status()
    return response.json()["choices"][0]["message"]["content"] or ""


def score(label: str, answers: list[str]) -> int:
    hits = sum(fact in answer.lower() for (_, fact), answer in zip(HELD_OUT, answers, strict=True))
    print(f"\n{label}: {hits}/{len(HELD_OUT)} name the fact")
    for (question, _), answer in zip(HELD_OUT, answers, strict=True):
        print(f"  {question}\n    → {answer.strip()[:160]!r}")
    return hits


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    ensure_openblas()
    model_dir, base_id = real_base()
    train_once(model_dir, base_id)
    out = HOME / "export"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    print(solverx("adapters", "export", "solverx", "--format", "gguf", "--out", str(out / "solverx.gguf")))
    print(solverx("adapters", "export", "solverx", "--format", "fused", "--out", str(out / "fused")))
    source = json.loads((model_dir / "gguf-source.json").read_text())["path"]

    results = {}
    with serve(model_dir, base_id) as ours:
        home_adapter = HOME / "adapters" / "solverx"
        version = json.loads((home_adapter / "state.json").read_text())["promoted"]
        import httpx

        httpx.post(ours.url + "/v1/adapters", json={"name": "solverx", "path": str(home_adapter / str(version))},
                   timeout=120).raise_for_status()  # fmt: skip
        results["ours, base + adapter"] = [
            httpx.post(ours.url + "/v1/chat/completions", timeout=300, json={
                "model": "solverx", "messages": [{"role": "user", "content": q}], "temperature": 0, "max_tokens": 48,
            }).json()["choices"][0]["message"]["content"]
            for q, _ in HELD_OUT
        ]  # fmt: skip
    with llama_server(Path(source), lora=[out / "solverx.gguf"]) as url:
        results["llama.cpp, base GGUF + exported LoRA"] = [ask(url, q, [{"id": 0, "scale": 1.0}]) for q, _ in HELD_OUT]
        results["llama.cpp, base GGUF, LoRA at scale 0"] = [ask(url, q, [{"id": 0, "scale": 0.0}]) for q, _ in HELD_OUT]
    with llama_server(out / "fused" / "fused.gguf") as url:
        results["llama.cpp, fused.gguf"] = [ask(url, q) for q, _ in HELD_OUT]

    hits = {label: score(label, answers) for label, answers in results.items()}
    same = sum(
        a.strip() == b.strip()
        for a, b in zip(results["ours, base + adapter"], results["llama.cpp, base GGUF + exported LoRA"], strict=True)
    )
    print(f"\nllama.cpp's answers with the exported LoRA equal ours on {same}/{len(HELD_OUT)} questions")
    passed = (
        hits["llama.cpp, base GGUF + exported LoRA"] > hits["llama.cpp, base GGUF, LoRA at scale 0"]
        and hits["llama.cpp, fused.gguf"] > hits["llama.cpp, base GGUF, LoRA at scale 0"]
    )
    (REPO / "bench" / "out").mkdir(exist_ok=True)
    (REPO / "bench" / "out" / "export_llamacpp.json").write_text(
        json.dumps({"hits": hits, "equal_to_ours": same, "answers": results}, indent=2, ensure_ascii=False)
    )
    print("PASS" if passed else "FAIL: llama.cpp with the export does not know the fact better than the base")
    sys.exit(0 if passed else 1)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
