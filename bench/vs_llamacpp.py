"""Our daemon vs llama.cpp's llama-server, side by side in one run, on the default base from the same GGUF file.

Run with ``.venv/bin/python bench/vs_llamacpp.py`` (the first run builds llama-server: :mod:`llamacpp`).

Ours serves the real default base as :func:`benchkit.real_base` imports it (SmolLM2-135M-Instruct, Q4_1 dequantized
to float32 MLX, whose decode-sized products run on our CPU kernel over the exact 4-/8-bit values:
solverx.engine.cpu_kernels); llama-server serves the Q4_1 GGUF file itself. Both on ``THREADS`` (2) threads, through
``/v1/chat/completions``, temperature 0, ``ignore_eos`` so every request generates exactly ``MAX_TOKENS`` (128), no
prompt cache on either side (ours ``--prompt-cache-bytes 0``, llama.cpp ``cache_prompt: false``) and a different
prompt on every request. Measured, on both sides:

- single-stream decode tok/s: (completion tokens − 1) / (last chunk − first content chunk), streamed; median of 3;
- TTFT of a ~1,000-token prompt: request sent → first content chunk; median of 3;
- 8 concurrent streams: aggregate tok/s (all completion tokens / wall time; llama-server ``-np 8 --cont-batching``);
- 8 clients on 8 different LoRA adapters (rank 8 on all seven projections of every layer, the same random weights on
  both sides): aggregate tok/s; ours registers them, llama-server loads them with ``--lora`` and each request picks
  its own with ``"lora": [{"id": i, "scale": 1}]`` (the others at 0).
  llama-server batches only the requests whose LoRA set is the same, so the 8 clients on 1 adapter are measured too.

Also a greedy-agreement check (32 tokens, base and adapter 0, ours vs llama.cpp): a sanity check of the GGUF LoRA
writer, not a performance figure (llama.cpp's Q4_1 kernels quantize activations to 8 bits, so texts may part).
Prints absolute figures and ratios ours ÷ llama.cpp, one line each, and writes them to bench/out/vs_llamacpp.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchkit import real_base, serve  # noqa: E402
from llamacpp import LLAMA_CPP_PYTHON_VERSION, ensure_llama_server, llama_server  # noqa: E402

from solverx.blas import ensure_openblas  # noqa: E402

THREADS = 2
MAX_TOKENS = 128
CLIENTS = 8
TTFT_PROMPT_TOKENS = 1000
RANK = 8
LORA_SCALE = 4.0  # mlx-lm's scale s (y += s·x·A·B); llama.cpp's alpha = s·rank
OUT = REPO / "bench" / "out" / "vs_llamacpp.json"
TOPICS = ["a lighthouse", "a river", "a dragon", "a train", "the moon", "a garden", "a robot", "the sea"]


# ---- the machine: is anything else using its cores? ----------------------------------------------------------


def _busy_cpu_s() -> float:
    """CPU seconds the whole machine has been busy since boot (/proc/stat: all but idle and iowait)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def _own_cpu_s() -> float:
    """CPU seconds of this process and of its reaped children (the servers, once stopped)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class Foreign:
    """CPU seconds used by processes outside this benchmark while a phase runs (read when its servers are stopped
    and reaped): more than a few means the figures of that phase shared the cores with someone else's job."""

    def __enter__(self) -> Foreign:
        self.busy, self.own = _busy_cpu_s(), _own_cpu_s()
        return self

    def __exit__(self, *exc) -> None:
        self.cpu_s = round((_busy_cpu_s() - self.busy) - (_own_cpu_s() - self.own), 1)


def wait_until_idle(limit_s: float) -> float:
    """Wait (up to ``limit_s``) until the cores are nearly idle for 5 s; returns the last busy fraction seen."""
    deadline = time.monotonic() + limit_s
    while True:
        before = _busy_cpu_s()
        time.sleep(5)
        busy = (_busy_cpu_s() - before) / 5 / (os.cpu_count() or 1)
        if busy < 0.1 or time.monotonic() > deadline:
            return busy
        print(f"waiting for the machine to be idle ({busy:.0%} busy)", file=sys.stderr, flush=True)


# ---- adapters: the same random LoRA written for both servers --------------------------------------------------


def make_adapters(model_dir: Path, out: Path, count: int) -> tuple[list[Path], list[Path]]:
    """``count`` random adapters: (mlx-lm adapter dirs for ours, the same exported as GGUF LoRA files for llama.cpp,
    by ``solverx adapters export``'s own code)."""
    import mlx.core as mx
    import numpy as np

    from solverx.adapters.export import export_gguf
    from solverx.adapters.validate import base_linear_shapes
    from solverx.engine.lora import DEFAULT_KEYS

    shapes = {m: s for m, s in base_linear_shapes(model_dir).items() if m.split(".", 3)[-1] in DEFAULT_KEYS}
    layers = json.loads((model_dir / "config.json").read_text())["num_hidden_layers"]
    dirs, files = [], []
    for i in range(count):
        rng = np.random.default_rng(1000 + i)
        tensors = {}
        for module, (fan_in, fan_out) in shapes.items():
            tensors[f"{module}.lora_a"] = (rng.standard_normal((fan_in, RANK)) / fan_in**0.5).astype(np.float32)
            tensors[f"{module}.lora_b"] = (rng.standard_normal((RANK, fan_out)) * 0.02).astype(np.float32)
        path = out / f"lora{i}"
        path.mkdir(parents=True)
        mx.save_safetensors(str(path / "adapters.safetensors"), {k: mx.array(v) for k, v in tensors.items()})
        lora = {"rank": RANK, "scale": LORA_SCALE, "dropout": 0.0, "keys": list(DEFAULT_KEYS)}
        (path / "adapter_config.json").write_text(
            json.dumps({"fine_tune_type": "lora", "num_layers": layers, "lora_parameters": lora})
        )
        dirs.append(path)
        files.append(out / f"lora{i}.gguf")
        export_gguf(path, model_dir, files[-1])
    return dirs, files


# ---- requests --------------------------------------------------------------------------------------------------


def _client(url: str):
    """A client that opens a connection per request: llama-server may close a kept-alive connection between two
    requests, which httpx then reports as 'Server disconnected' (two runs in five here); the same for both sides."""
    import httpx

    return httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_keepalive_connections=0))


async def _stream(client, body: dict) -> dict:
    """One streamed chat completion: completion tokens (from usage), seconds to the first content chunk and to the
    last chunk, prompt tokens, and the text."""
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first = last = None
    chunks, usage, text = 0, None, []
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            raise SystemExit(f"{response.status_code}: {(await response.aread()).decode()[:500]}")
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            usage = chunk.get("usage") or usage
            for choice in chunk.get("choices") or []:
                if content := (choice.get("delta") or {}).get("content"):
                    now = time.perf_counter()
                    first = first or now
                    last = now
                    chunks += 1
                    text.append(content)
    return {
        "tokens": usage["completion_tokens"] if usage else chunks,
        "prompt_tokens": usage["prompt_tokens"] if usage else None,
        "ttft": (first or start) - start,
        "decode_s": (last or start) - (first or start),
        "text": "".join(text),
    }


def _body(prompt: str, max_tokens: int = MAX_TOKENS, **fields) -> dict:
    messages = [{"role": "user", "content": prompt}]
    return {"messages": messages, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, **fields}


def _story(i: int) -> str:
    return f"Story {i}: tell me a long, detailed story about {TOPICS[i % len(TOPICS)]}."


async def single_decode(url: str, fields: dict, repeats: int) -> float:
    """Median over ``repeats`` streams of (completion tokens − 1) / (last chunk − first content chunk)."""

    async with _client(url) as client:
        await _stream(client, _body(_story(99), 4, **fields))  # warm-up
        rates = []
        for i in range(repeats):
            r = await _stream(client, _body(_story(100 + i), **fields))
            rates.append((r["tokens"] - 1) / r["decode_s"])
    return statistics.median(rates)


async def ttft(url: str, long_text: str, fields: dict, repeats: int) -> tuple[float, int]:
    """Median seconds to the first content chunk of a ~1,000-token prompt (each one different), and its tokens."""

    async with _client(url) as client:
        await _stream(client, _body("Warm-up. " + long_text, 2, **fields))
        results = [await _stream(client, _body(f"Request {i}. {long_text}", 2, **fields)) for i in range(repeats)]
    return statistics.median(r["ttft"] for r in results), results[0]["prompt_tokens"]


async def aggregate(url: str, fields: list[dict], rounds: int) -> float:
    """Aggregate tok/s of len(fields) concurrent clients (client i's extra request fields: fields[i]), each sending
    ``rounds`` requests in a row: all completion tokens / wall time."""

    async with _client(url) as client:
        await asyncio.gather(*[_stream(client, _body(_story(i), 2, **f)) for i, f in enumerate(fields)])  # warm-up

        async def loop(i: int, f: dict) -> int:
            return sum([(await _stream(client, _body(_story(10 * r + i), **f)))["tokens"] for r in range(rounds)])

        start = time.perf_counter()
        tokens = await asyncio.gather(*[loop(i, f) for i, f in enumerate(fields)])
    return sum(tokens) / (time.perf_counter() - start)


async def greedy(url: str, fields: list[dict]) -> list[str]:

    prompt = "What is the capital of France? Answer in one paragraph."
    async with _client(url) as client:
        body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": 32, "temperature": 0}
        return [(await _stream(client, {**body, **f}))["text"] for f in fields]


def measure(url: str, long_text: str, base: dict, loras: list[dict], args, *, part: str) -> dict:
    """``part`` "single": decode, TTFT and greedy text on the base; "concurrent": 8 streams on the base; "lora": 8
    streams on 8 adapters, on 1 adapter, and adapter 0's greedy text."""
    if part == "single":
        prompt_ttft, prompt_tokens = asyncio.run(ttft(url, long_text, base, args.repeats))
        return {
            "single_decode_tok_s": asyncio.run(single_decode(url, base, args.repeats)),
            "ttft_1k_s": prompt_ttft,
            "ttft_prompt_tokens": prompt_tokens,
            "greedy_base": asyncio.run(greedy(url, [base]))[0],
        }
    if part == "concurrent":
        return {"concurrent_8_tok_s": asyncio.run(aggregate(url, [base] * CLIENTS, args.rounds))}
    return {
        "lora_8_adapters_tok_s": asyncio.run(aggregate(url, loras, args.rounds)),
        "lora_1_adapter_tok_s": asyncio.run(aggregate(url, [loras[0]] * CLIENTS, args.rounds)),
        "greedy_lora0": asyncio.run(greedy(url, [loras[0]]))[0],
    }


def _common_prefix(a: str, b: str) -> int:
    """How many leading characters two texts share."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="requests per single-stream and TTFT figure")
    parser.add_argument("--rounds", type=int, default=1, help="requests per client in the concurrent loads")
    parser.add_argument("--wait-idle", type=float, default=600, help="seconds to wait for other jobs to finish")
    parser.add_argument(
        "--cpu-activations",
        choices=("float32", "int8"),
        default="float32",
        help="our daemon's setting of that name: int8 rounds x per 32 values as llama.cpp's Q4_1 products do",
    )
    args = parser.parse_args()
    ensure_openblas()
    binary = ensure_llama_server()
    from tokenizers import Tokenizer

    from solverx.models.builtin import smollm_gguf

    model_dir, base_id = real_base()
    gguf_file = smollm_gguf()
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    words = "The lighthouse keeper counted ships, waves and gulls every night of the long winter."
    long_text = words
    while len(tokenizer.encode(long_text).ids) < TTFT_PROMPT_TOKENS - 40:  # plus the chat template's ~40
        long_text += " " + words
    ours: dict = {}
    theirs: dict = {}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="solverx-vs-llamacpp-") as tmp:
        dirs, files = make_adapters(model_dir, Path(tmp), CLIENTS)

        flags = ("--prompt-cache-bytes", "0", "--max-resident-adapters", str(CLIENTS + 1))
        flags += ("--cpu-activations", args.cpu_activations)
        idle = {"busy_before_start": round(wait_until_idle(args.wait_idle), 3)}
        with Foreign() as foreign, serve(model_dir, base_id, *flags) as daemon:
            import httpx

            for i, path in enumerate(dirs):
                adapter = {"name": f"lora{i}", "path": str(path)}
                httpx.post(daemon.url + "/v1/adapters", json=adapter, timeout=120).raise_for_status()
            base = {"model": base_id}
            loras = [{"model": f"lora{i}"} for i in range(CLIENTS)]
            for part in ("single", "concurrent", "lora"):
                ours |= measure(daemon.url, long_text, base, loras, args, part=part)
        idle["foreign_cpu_s_ours"] = foreign.cpu_s
        print("ours", json.dumps(ours), flush=True)

        base = {"cache_prompt": False}
        loras = [{"cache_prompt": False, "lora": [{"id": i, "scale": 1.0}]} for i in range(CLIENTS)]
        with Foreign() as foreign:  # three servers: 1 slot; 8 slots; 8 slots with the adapters loaded
            with llama_server(gguf_file, threads=THREADS, parallel=1) as url:
                theirs |= measure(url, long_text, base, loras, args, part="single")
            with llama_server(gguf_file, threads=THREADS, parallel=CLIENTS, ctx_size=CLIENTS * 1024) as url:
                theirs |= measure(url, long_text, base, loras, args, part="concurrent")
            # (every request sends its "lora" list: one without gets every adapter at scale 1, even with
            # --lora-init-without-apply, which in this llama.cpp only skips applying them at start-up)
            with llama_server(gguf_file, lora=files, threads=THREADS, parallel=CLIENTS, ctx_size=CLIENTS * 1024) as url:
                theirs |= measure(url, long_text, base, loras, args, part="lora")
        idle["foreign_cpu_s_llama_cpp"] = foreign.cpu_s
        print("llama.cpp", json.dumps(theirs), flush=True)

    rows = [
        ("single-stream decode", "single_decode_tok_s", "tok/s"),
        (f"TTFT, {ours['ttft_prompt_tokens']}-token prompt (lower is better)", "ttft_1k_s", "s"),
        (f"{CLIENTS} concurrent streams, aggregate", "concurrent_8_tok_s", "tok/s"),
        (f"{CLIENTS} clients on {CLIENTS} LoRA adapters, aggregate", "lora_8_adapters_tok_s", "tok/s"),
        (f"{CLIENTS} clients on 1 LoRA adapter, aggregate", "lora_1_adapter_tok_s", "tok/s"),
    ]
    ratios = {key: ours[key] / theirs[key] for _, key, _ in rows}
    agreement = {
        "base_same_text": ours["greedy_base"] == theirs["greedy_base"],
        "lora0_same_text": ours["greedy_lora0"] == theirs["greedy_lora0"],
        "lora_changes_text_ours": ours["greedy_base"] != ours["greedy_lora0"],
        "lora_changes_text_llama_cpp": theirs["greedy_base"] != theirs["greedy_lora0"],
        "common_prefix_chars_base": _common_prefix(ours["greedy_base"], theirs["greedy_base"]),
        "common_prefix_chars_lora0": _common_prefix(ours["greedy_lora0"], theirs["greedy_lora0"]),
    }
    print(
        f"model: {base_id}; ours {model_dir} (float32 MLX + our CPU kernel), llama.cpp {gguf_file.name}; "
        f"{THREADS} threads; "
        f"{MAX_TOKENS} new tokens per request (ignore_eos); llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} ({binary})"
    )
    for label, key, unit in rows:
        print(
            f"{label:<52} ours {ours[key]:8.2f} {unit:<5}  llama.cpp {theirs[key]:8.2f} {unit:<5}  "
            f"ours/llama.cpp {ratios[key]:5.2f}"
        )
    print("greedy 32 tokens:", json.dumps(agreement))
    print("other jobs on the machine:", json.dumps(idle), "(CPU seconds not ours: a few at most for clean figures)")
    for side in ("ours", "llama_cpp"):
        if idle[f"foreign_cpu_s_{side}"] > 10:
            print(f"WARNING: {side}'s figures shared the cores with another job; rerun on an idle machine")
    if not agreement["base_same_text"] or not agreement["lora0_same_text"]:
        print("  ours:     ", json.dumps([ours["greedy_base"], ours["greedy_lora0"]]))
        print("  llama.cpp:", json.dumps([theirs["greedy_base"], theirs["greedy_lora0"]]))
    record = {
        "model": base_id,
        "ours_model": str(model_dir),
        "llama_cpp_model": gguf_file.name,
        "llama_cpp_python": LLAMA_CPP_PYTHON_VERSION,
        "llama_server": str(binary),
        "threads": THREADS,
        "cpu_activations": args.cpu_activations,
        "max_tokens": MAX_TOKENS,
        "clients": CLIENTS,
        "lora_rank": RANK,
        "repeats": args.repeats,
        "rounds": args.rounds,
        "ours": ours,
        "llama_cpp": theirs,
        "ratios_ours_over_llama_cpp": ratios,
        "greedy_agreement": agreement,
        "other_jobs": idle,
        "wall_s": round(time.perf_counter() - started, 1),
    }
    out = OUT if args.cpu_activations == "float32" else OUT.with_name(f"vs_llamacpp-{args.cpu_activations}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out.relative_to(REPO)} ({record['wall_s']} s)")


if __name__ == "__main__":
    main()
