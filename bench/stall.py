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
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchkit import real_base, serve  # noqa: E402

from solverx.blas import ensure_openblas  # noqa: E402

STREAMS = 4
LONG_PROMPT_TOKENS = 2000


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
    model_dir, base_id = real_base()
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    words = "The lighthouse keeper counted ships, waves and gulls every night of the long winter."
    long_text = words
    while len(tokenizer.encode(long_text).ids) < LONG_PROMPT_TOKENS:
        long_text += " " + words
    report = {}
    for label, chunk in (("interleaved (256)", 256), ("one-shot (0)", 0)):
        with serve(model_dir, base_id, "--prefill-chunk-while-decoding", str(chunk), "--prompt-cache-bytes", "0") as d:
            report[label] = asyncio.run(measure(d.url, base_id, long_text))
        print(label, json.dumps(report[label]), flush=True)
    ours, before = report["interleaved (256)"], report["one-shot (0)"]
    print(
        f"stall ratio (max gap / median gap): {ours['stall_ratio']} interleaved vs {before['stall_ratio']} one-shot "
        f"(goal <= 3); long prompt TTFT {ours['long_prompt_ttft_s']} s vs {before['long_prompt_ttft_s']} s"
    )


if __name__ == "__main__":
    main()
