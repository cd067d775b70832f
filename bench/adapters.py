"""Adapter serving benchmark: our daemon vs mlx_lm.server, side by side in one run, on the same ~25M model.

Run with ``.venv/bin/python bench/adapters.py`` (re-executes itself with OpenBLAS preloaded on Linux); ``--real``
serves the real default base (SmolLM2-135M-Instruct, as bench/vs_llamacpp.py) on both sides instead.

Workloads (the same prompts and max_tokens everywhere, temperature 0):

(a) 8 concurrent clients, each on its own adapter — ours vs mlx_lm.server (which takes a per-request
    ``adapters`` path and reloads the base on every switch); goal >= 4x. And ours with 8 adapters vs ours with
    all 8 clients on one adapter; goal >= 0.95 (several adapters in one forward pass cost nothing extra).
(b) single-stream decode tok/s on an adapter / on the base; goal >= 0.90.
(c) registration call -> first token from the new version; goal < 100 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from solverx.blas import ensure_openblas, preload_env  # noqa: E402

PROMPTS = [f"Tell me something interesting about the number {i}." for i in range(8)]
BASE_ID = "solverx-bench"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(url: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{url}: server exited with {proc.returncode}")
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.HTTPError:
            time.sleep(0.3)
    raise SystemExit(f"{url}: server did not come up")


def make_adapters(model_dir: Path, out: Path, count: int, rank: int = 8) -> list[Path]:
    """Random LoRA adapters on every projection of every layer, in mlx-lm's format."""
    import mlx.core as mx

    from solverx.adapters.validate import base_linear_shapes
    from solverx.engine.lora import DEFAULT_KEYS

    shapes = base_linear_shapes(model_dir)
    layers = json.loads((model_dir / "config.json").read_text())["num_hidden_layers"]
    paths = []
    for i in range(count):
        mx.random.seed(100 + i)
        tensors = {}
        for module, (fan_in, fan_out) in shapes.items():
            if module.split(".", 3)[-1] in DEFAULT_KEYS:
                tensors[f"{module}.lora_a"] = mx.random.normal((fan_in, rank)) * (1 / fan_in**0.5)
                tensors[f"{module}.lora_b"] = mx.random.normal((rank, fan_out)) * 0.02
        path = out / f"adapter{i}"
        path.mkdir(parents=True)
        mx.save_safetensors(str(path / "adapters.safetensors"), tensors)
        config = {
            "fine_tune_type": "lora",
            "num_layers": layers,
            "lora_parameters": {"rank": rank, "scale": 20.0, "dropout": 0.0, "keys": list(DEFAULT_KEYS)},
        }
        (path / "adapter_config.json").write_text(json.dumps(config))
        paths.append(path)
    return paths


async def _chat(client, body: dict) -> tuple[int, float]:
    """(completion tokens, seconds to first content) of one streamed request."""
    start = time.perf_counter()
    first = None
    tokens = 0
    usage = None
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            usage = chunk.get("usage") or usage
            for choice in chunk.get("choices", []):
                if choice.get("delta", {}).get("content"):
                    tokens += 1
                    first = first or time.perf_counter() - start
    return (usage["completion_tokens"] if usage else tokens), first or 0.0


def _body(prompt: str, max_tokens: int, **extra) -> dict:
    return {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "temperature": 0, **extra}


async def _load(url: str, bodies: list[dict], rounds: int) -> float:
    """Aggregate tok/s of len(bodies) concurrent clients, each sending ``rounds`` requests in a row."""
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        await asyncio.gather(*[_chat(client, {**b, "max_tokens": 2}) for b in bodies])  # warm-up

        async def client_loop(body: dict) -> int:
            return sum([(await _chat(client, body))[0] for _ in range(rounds)])

        start = time.perf_counter()
        tokens = await asyncio.gather(*[client_loop(b) for b in bodies])
        return sum(tokens) / (time.perf_counter() - start)


async def _single(url: str, body: dict, repeats: int) -> float:
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        await _chat(client, {**body, "max_tokens": 2})
        start = time.perf_counter()
        tokens = sum([(await _chat(client, body))[0] for _ in range(repeats)])
        return tokens / (time.perf_counter() - start)


async def _swap_latency(url: str, adapter_dir: Path, repeats: int) -> float:
    """Median ms from starting the registration call to the first token of a request on the new version."""
    import httpx

    times = []
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        for i in range(repeats):
            start = time.perf_counter()
            r = await client.post("/v1/adapters", json={"name": f"swap{i}", "path": str(adapter_dir), "promote": True})
            r.raise_for_status()
            await _chat(client, _body(PROMPTS[0], 1, model=f"swap{i}"))
            times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2, help="requests per client in the concurrent loads")
    parser.add_argument("--real", action="store_true", help="the real default base (SmolLM2-135M) instead of ~25M")
    args = parser.parse_args()

    from solverx.models.tiny import BENCH_SPEC, ensure_tiny

    if args.real:
        from benchkit import real_base

        model_dir, base_id = real_base()
    else:
        model_dir, base_id = ensure_tiny(REPO / ".state" / "bench" / "models", BENCH_SPEC, base_id=BASE_ID), BASE_ID
    env = dict(preload_env(), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    results: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="solverx-bench-") as tmp:
        home = Path(tmp) / "home"
        (home / "models").mkdir(parents=True)
        (home / "models" / base_id).symlink_to(model_dir)
        adapters = make_adapters(model_dir, Path(tmp) / "adapters", 8)
        max_tokens = args.max_tokens

        # ---- our daemon
        port = _free_port()
        ours = subprocess.Popen(
            [sys.executable, "-m", "solverx", "serve", "--home", str(home), "--port", str(port),
             "--base-models", base_id, "--log-level", "warning", "--max-resident-adapters", "9"],
            cwd=REPO, env=env,
        )  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        try:
            _wait(url + "/health", ours)
            import httpx

            for i, path in enumerate(adapters):
                registered = httpx.post(url + "/v1/adapters", json={"name": f"ad{i}", "path": str(path)}, timeout=60)
                registered.raise_for_status()
            mixed = [_body(p, max_tokens, model=f"ad{i}", ignore_eos=True) for i, p in enumerate(PROMPTS)]
            same = [_body(p, max_tokens, model="ad0", ignore_eos=True) for p in PROMPTS]
            results["ours_8_adapters"] = asyncio.run(_load(url, mixed, args.rounds))
            results["ours_1_adapter"] = asyncio.run(_load(url, same, args.rounds))
            results["ours_single_adapter"] = asyncio.run(_single(url, mixed[0], 3))
            base = _body(PROMPTS[0], max_tokens, model=base_id, ignore_eos=True)
            results["ours_single_base"] = asyncio.run(_single(url, base, 3))
            results["swap_ms"] = asyncio.run(_swap_latency(url, adapters[1], 5))
        finally:
            ours.terminate()
            ours.wait(timeout=30)

        # ---- mlx_lm.server, the incumbent
        port = _free_port()
        incumbent = subprocess.Popen(
            [sys.executable, "-m", "mlx_lm", "server", "--model", str(model_dir), "--port", str(port)],
            cwd=REPO, env=env, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        try:
            _wait(url + "/v1/models", incumbent)
            theirs = [
                _body(p, max_tokens, model=str(model_dir), adapters=str(a))
                for p, a in zip(PROMPTS, adapters, strict=True)
            ]
            results["mlx_lm_8_adapters"] = asyncio.run(_load(url, theirs, args.rounds))
        finally:
            incumbent.terminate()
            incumbent.wait(timeout=30)

    r = results
    print(f"model: {base_id} ({model_dir}), {max_tokens} new tokens per request, {args.rounds} requests per client")
    print(
        f"(a) 8 clients, 8 adapters: ours {r['ours_8_adapters']:.1f} tok/s, mlx_lm.server {r['mlx_lm_8_adapters']:.1f}"
    )
    print(f"    ratio ours / mlx_lm.server        {r['ours_8_adapters'] / r['mlx_lm_8_adapters']:6.2f}x (goal >= 4x)")
    print(f"    ours 8 adapters / ours 1 adapter  {r['ours_8_adapters'] / r['ours_1_adapter']:6.2f}  (goal >= 0.95)")
    print(f"(b) single stream: adapter {r['ours_single_adapter']:.1f} tok/s, base {r['ours_single_base']:.1f} tok/s")
    print(
        f"    ratio adapter / base              {r['ours_single_adapter'] / r['ours_single_base']:6.2f}  (goal >= 0.90)"
    )
    print(f"(c) registration -> first token of the new version: {r['swap_ms']:.1f} ms (median of 5; goal < 100 ms)")


if __name__ == "__main__":
    ensure_openblas()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
