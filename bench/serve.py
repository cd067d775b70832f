"""Serving benchmark: single-stream vs 8-stream decode throughput, and what HTTP adds to time-to-first-token.

Run with ``.venv/bin/python bench/serve.py`` (the OpenBLAS preload is arranged by re-executing through the
``solverx`` launcher). Everything is measured side by side in one run on the same model:

- decode tok/s of one stream, and aggregate tok/s of 8 concurrent streams, both through HTTP; their ratio
  (goal >= 4x: continuous batching);
- time-to-first-token through HTTP (streaming, openai wire format) minus time-to-first-token of the engine
  called in-process on the same prompt (goal < 5 ms: the server adds almost nothing).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from solverx.blas import ensure_openblas  # noqa: E402

PROMPT = [{"role": "user", "content": "Write a short story about a river that learns to sing."}]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(home: Path, port: int) -> subprocess.Popen:
    import httpx

    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "solverx",
            "serve",
            "--home",
            str(home),
            "--port",
            str(port),
            "--log-level",
            "warning",
        ],
        cwd=REPO,
    )
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("server did not come up")


async def _http_stream(client, model: str, max_tokens: int) -> tuple[float, int, float]:
    """(ttft seconds, completion tokens, total seconds) of one streamed chat completion."""
    body = {
        "model": model,
        "messages": PROMPT,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    ttft = None
    tokens = 0
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            if ttft is None and '"content"' in line:
                ttft = time.perf_counter() - start
            if '"usage":{' in line.replace(" ", ""):
                import json

                tokens = json.loads(line[6:])["usage"]["completion_tokens"]
    return ttft or 0.0, tokens, time.perf_counter() - start


async def _http_bench(port: int, model: str, max_tokens: int, repeats: int) -> dict:
    import httpx

    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=300) as client:
        await _http_stream(client, model, 8)  # warm-up
        ttfts = [(await _http_stream(client, model, 1))[0] for _ in range(repeats)]
        _, tokens, seconds = await _http_stream(client, model, max_tokens)
        single = tokens / seconds
        start = time.perf_counter()
        results = await asyncio.gather(*[_http_stream(client, model, max_tokens) for _ in range(8)])
        aggregate = sum(r[1] for r in results) / (time.perf_counter() - start)
    return {"ttft": statistics.median(ttfts), "single": single, "aggregate": aggregate}


async def _engine_ttft(model_dir: Path, base_id: str, repeats: int) -> float:
    from solverx.engine.core import Engine, SamplingParams

    engine = Engine(model_dir, base_id).start()
    try:
        tokens = engine.encode_chat(PROMPT)
        params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)

        async def once() -> float:
            start = time.perf_counter()
            async for _ in engine.generate(tokens, params):
                return time.perf_counter() - start
            return 0.0

        await once()
        return statistics.median([await once() for _ in range(repeats)])
    finally:
        engine.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()

    from solverx.models.tiny import TINY_BASE_ID, ensure_tiny

    with tempfile.TemporaryDirectory(prefix="solverx-bench-") as tmp:
        home = Path(tmp)
        model_dir = ensure_tiny(home / "models")
        in_process = asyncio.run(_engine_ttft(model_dir, TINY_BASE_ID, args.repeats))
        port = _free_port()
        server = _start_server(home, port)
        try:
            http = asyncio.run(_http_bench(port, TINY_BASE_ID, args.max_tokens, args.repeats))
        finally:
            server.terminate()
            server.wait(timeout=30)

    ratio = http["aggregate"] / http["single"]
    overhead_ms = (http["ttft"] - in_process) * 1000
    print(f"model                         {TINY_BASE_ID} ({args.max_tokens} new tokens per request)")
    print(f"single-stream decode          {http['single']:8.1f} tok/s")
    print(f"8-stream aggregate decode     {http['aggregate']:8.1f} tok/s")
    print(f"ratio 8-stream / single       {ratio:8.2f}x   (goal >= 4x)")
    print(f"TTFT in-process (median)      {in_process * 1000:8.2f} ms")
    print(f"TTFT through HTTP (median)    {http['ttft'] * 1000:8.2f} ms")
    print(f"HTTP overhead on TTFT         {overhead_ms:8.2f} ms   (goal < 5 ms)")


if __name__ == "__main__":
    ensure_openblas()
    main()
