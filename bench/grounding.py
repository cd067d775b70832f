"""Grounding's cost at request time, side by side in one run on the real default base.

The sample inbox's fact graph (built by the trainer's own code, as a run on the default base builds it) goes with an
adapter registered on a daemon serving SmolLM2-135M-Instruct. For every held-out domain question of the sample
inbox's eval.jsonl, streamed with ``max_tokens`` 1:

- retrieval alone: the daemon's own ``Server-Timing: facts;dur=`` (median, 95th percentile, max) — the issue's
  goal is <= 20 ms added to the time to first token;
- time to first token without grounding (``grounding: false``) and with it (``+facts``): the difference is
  retrieval plus prefilling the facts' tokens, which the prompt then holds.

Run with ``.venv/bin/python bench/grounding.py`` (about a minute on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchkit import real_base, serve  # noqa: E402

from solverx.blas import ensure_openblas  # noqa: E402

INBOX = REPO / "data" / "solverx" / "inbox"


def ttft(url: str, model: str, question: str, grounding: bool) -> tuple[float, float | None, int]:
    """(seconds to the first token, retrieval ms from Server-Timing, prompt tokens) of one streamed question."""
    import httpx

    body = {"model": model, "messages": [{"role": "user", "content": question}], "max_tokens": 1, "stream": True,
            "temperature": 0, "grounding": grounding, "stream_options": {"include_usage": True}}  # fmt: skip
    started, first, prompt_tokens = time.perf_counter(), None, 0
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as response:
        timing = response.headers.get("server-timing", "")
        for line in response.iter_lines():
            if line.startswith("data: {"):
                first = first or time.perf_counter() - started
                prompt_tokens = (json.loads(line[6:]).get("usage") or {}).get("prompt_tokens", prompt_tokens)
    retrieval = float(timing.split("dur=")[1]) if "dur=" in timing else None
    return first or float("nan"), retrieval, prompt_tokens


def sample_version(base_dir: Path, root: Path) -> Path:
    """An adapter directory (a zero LoRA: timing only) with the sample inbox's fact graph."""
    import shutil

    import mlx.core as mx

    from solverx.adapters.facts import FACTS_FILE, write_graph
    from solverx.adapters.validate import base_linear_shapes
    from solverx.data import DATA_DIR
    from solverx.engine.lora import DEFAULT_KEYS
    from solverx.trainer.facts import base_ordinary_words, build_graph
    from solverx.trainer.inbox import snapshot
    from solverx.trainer.validate import ingest

    inbox = root / "inbox"
    shutil.copytree(INBOX, inbox)
    graph = build_graph(ingest(snapshot(inbox), inbox, root / "q"), base_ordinary_words(base_dir, DATA_DIR / "general"))
    out = root / "adapter"
    out.mkdir()
    tensors = {}
    for module, (fan_in, fan_out) in base_linear_shapes(base_dir).items():
        if module.split(".", 3)[-1] in DEFAULT_KEYS:
            tensors[f"{module}.lora_a"], tensors[f"{module}.lora_b"] = mx.zeros((fan_in, 8)), mx.zeros((8, fan_out))
    mx.save_safetensors(str(out / "adapters.safetensors"), tensors)
    layers = json.loads((base_dir / "config.json").read_text())["num_hidden_layers"]
    lora = {"rank": 8, "scale": 1.0, "dropout": 0.0, "keys": list(DEFAULT_KEYS)}
    (out / "adapter_config.json").write_text(json.dumps({"num_layers": layers, "lora_parameters": lora}))
    write_graph(graph, out / FACTS_FILE)
    return out


def main() -> None:
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()
    ensure_openblas()
    import httpx

    model_dir, base_id = real_base()
    lines = (INBOX / "eval.jsonl").read_text(encoding="utf-8").splitlines()
    items = [json.loads(line) for line in lines if line.strip()]
    questions = [item["question"] for item in items if item.get("kind", "domain") == "domain"]
    with tempfile.TemporaryDirectory() as scratch, serve(model_dir, base_id) as daemon:
        adapter = sample_version(model_dir, Path(scratch))
        registered = httpx.post(daemon.url + "/v1/adapters", json={"name": "facts", "path": str(adapter)}, timeout=120)
        registered.raise_for_status()
        ttft(daemon.url, "facts", questions[0], False)  # warm-up: the adapter's first use
        plain, grounded = [], []
        for question in questions:  # alternating, so drift in the machine's speed hits both alike
            plain.append(ttft(daemon.url, "facts", question, False))
            grounded.append(ttft(daemon.url, "facts", question, True))
        retrieval = [r for _, r, _ in grounded if r is not None]
        tokens = [g[2] - p[2] for p, g in zip(plain, grounded, strict=True)]

    def ms(values: list[float]) -> str:
        ordered = sorted(values)
        p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
        return f"median {statistics.median(ordered):.2f} ms, p95 {p95:.2f} ms, max {ordered[-1]:.2f} ms"

    print(f"{len(questions)} held-out questions of the sample inbox, SmolLM2-135M-Instruct, 2 threads")
    print(f"  retrieval (Server-Timing): {ms(retrieval)}  (goal: <= 20 ms)")
    print(f"  facts added to the prompt: median {statistics.median(tokens):.0f} tokens")
    plain_s = [t for t, _, _ in plain]
    grounded_s = [t for t, _, _ in grounded]
    print(f"  TTFT without grounding: {ms([t * 1000 for t in plain_s])}")
    print(f"  TTFT with grounding:    {ms([t * 1000 for t in grounded_s])}")
    ratio = statistics.median(grounded_s) / statistics.median(plain_s)
    print(f"  with / without (median): {ratio:.2f}x; the difference is retrieval plus prefilling the facts")


if __name__ == "__main__":
    main()
