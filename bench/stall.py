"""Long-prompt stall: 4 streams are decoding on the real default base when a 2,000-token prompt arrives.

Run with ``.venv/bin/python bench/stall.py``. Measured side by side in one run, the daemon started twice on the
same model: with chunked prefill interleaved with decoding (the default ``prefill_chunk_while_decoding``) and with
unbudgeted 512-token chunks (the setting at 0). For each it prints the running streams' largest
inter-token gap while the long prompt is prefilled, divided by their median gap (goal <= 3), and the long prompt's
time to first token.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from solverx.blas import ensure_openblas, preload_env  # noqa: E402

STREAMS = 4
LONG_PROMPT_TOKENS = 2000


def _bench_adapters():
    spec = importlib.util.spec_from_file_location("bench_adapters", Path(__file__).with_name("adapters.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def measure(url: str, model: str, long_text: str) -> dict:
    import httpx

    gaps: list[list[tuple[float, float]]] = [[] for _ in range(STREAMS)]  # (time, gap) per running stream
    warmed = asyncio.Event()
    counts = [0] * STREAMS

    async def running(i: int, client) -> None:
        body = {
            "model": model,
            "messages": [{"role": "user", "content": f"Tell me story number {i} about a lighthouse."}],
            "max_tokens": 160,
            "temperature": 0,
            "stream": True,
            "ignore_eos": True,
        }
        last = None
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            async for line in response.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[6:])
                if any(c.get("delta", {}).get("content") for c in chunk.get("choices", [])):
                    now = time.perf_counter()
                    if last is not None:
                        gaps[i].append((now, now - last))
                    last = now
                    counts[i] += 1
                    if all(c >= 10 for c in counts):
                        warmed.set()

    async def arriving(client) -> tuple[float, float, float]:
        await warmed.wait()
        body = {"model": model, "messages": [{"role": "user", "content": long_text}], "max_tokens": 4, "stream": True}
        sent = time.perf_counter()
        first = None
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            async for line in response.aiter_lines():
                if first is None and line.startswith("data: {"):
                    first = time.perf_counter()
        return sent, first, first - sent

    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        results = await asyncio.gather(*[running(i, client) for i in range(STREAMS)], arriving(client))
    sent, first, ttft = results[-1]
    during = [gap for stream in gaps for at, gap in stream if at > sent and at - gap < first]  # overlapping the prefill
    steady = [gap for stream in gaps for at, gap in stream if at - gap > first or at < sent]
    ends = [stream[-1][0] - sent for stream in gaps if stream]
    overall = max(gap for stream in gaps for _, gap in stream)
    return {
        "streams_end_after_arrival_s": [round(e, 1) for e in ends],
        "overall_max_gap_ms": round(overall * 1000, 1),
        "max_gap_ms": round(max(during) * 1000, 1),
        "median_gap_ms": round(statistics.median(steady) * 1000, 1),
        "stall_ratio": round(max(during) / statistics.median(steady), 2),
        "long_prompt_ttft_s": round(ttft, 2),
    }


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    ensure_openblas()
    from solverx.models.builtin import SMOLLM_BASE_ID, ensure_smollm

    bench = _bench_adapters()
    model_dir = ensure_smollm(REPO / ".state" / "bench" / "models")
    env = dict(preload_env(), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    words = "The lighthouse keeper counted ships, waves and gulls every night of the long winter."
    long_text = words
    while len(tokenizer.encode(long_text).ids) < LONG_PROMPT_TOKENS:
        long_text += " " + words
    report = {}
    for label, chunk in (("interleaved (256)", 256), ("one-shot (0)", 0)):
        with tempfile.TemporaryDirectory(prefix="solverx-stall-") as tmp:
            home = Path(tmp) / "home"
            (home / "models").mkdir(parents=True)
            (home / "models" / SMOLLM_BASE_ID).symlink_to(model_dir)
            port = bench._free_port()
            daemon = subprocess.Popen(
                [sys.executable, "-m", "solverx", "serve", "--home", str(home), "--port", str(port),
                 "--base-models", SMOLLM_BASE_ID, "--log-level", "warning",
                 "--prefill-chunk-while-decoding", str(chunk)],
                cwd=REPO, env=env,
            )  # fmt: skip
            try:
                bench._wait(f"http://127.0.0.1:{port}/health", daemon)
                report[label] = asyncio.run(measure(f"http://127.0.0.1:{port}", SMOLLM_BASE_ID, long_text))
            finally:
                daemon.terminate()
                daemon.wait(timeout=60)
        print(label, json.dumps(report[label]), flush=True)
    ours, before = report["interleaved (256)"], report["one-shot (0)"]
    print(
        f"stall ratio (max gap / median gap): {ours['stall_ratio']} interleaved vs {before['stall_ratio']} one-shot "
        f"(goal <= 3); long prompt TTFT {ours['long_prompt_ttft_s']} s vs {before['long_prompt_ttft_s']} s"
    )


if __name__ == "__main__":
    main()
