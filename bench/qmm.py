"""The fast CPU kernel (solverx.engine.cpu_kernels) against MLX's own CPU paths, side by side in one run.

Per matrix of the default base (SmolLM2-135M: a 576→1536 MLP projection and the 49,152-row tied head) and per
number of rows (1 = one decode stream, 8 = eight streams, 16-256 = prompt chunks), the milliseconds of one product:
our kernel on MLX's 4- and 8-bit layout, ``mx.quantized_matmul`` on the same arrays, and float32 BLAS on the
dequantized weight. Then the whole decode step of the default base (batch 1 and 8, greedy, a 64-token context)
with every projection on float32 BLAS and on the kernel (decode attention too, as in the engine), and whether both
give the same tokens.

The kernel's row limit (``KERNEL_ROWS``) is where its column passes float32 BLAS. Run with
``.venv/bin/python bench/qmm.py`` (re-executes itself with OpenBLAS preloaded on Linux).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchkit import real_base  # noqa: E402

from solverx.blas import ensure_openblas  # noqa: E402

SHAPES = {"mlp 576→1536": (1536, 576), "head 576→49152": (49152, 576)}
ROWS = (1, 8, 16, 32, 256)


def _ms(run, repeats: int) -> float:
    import mlx.core as mx

    for _ in range(2):
        mx.eval(run())
    started = time.perf_counter()
    for _ in range(repeats):
        mx.eval(run())
    return (time.perf_counter() - started) / repeats * 1e3


def products(kernel, repeats: int) -> None:
    import mlx.core as mx

    int8 = kernel.INT8_X
    print(
        f"{'matrix':16} {'rows':>4} {'bits':>4} {'ours ms':>8} {'int8 x':>7} {'mlx q ms':>9} {'f32 ms':>7}  "
        "ours vs mlx q, vs f32; int8 x vs ours (error vs float32 BLAS: ours, int8 x)"
    )
    for label, (out_dim, in_dim) in SHAPES.items():
        w = mx.random.normal((out_dim, in_dim), key=mx.random.key(0)) * 0.02
        for bits in (4, 8):
            packed, scales, biases = mx.quantize(w, group_size=32, bits=bits)
            dense = mx.dequantize(packed, scales, biases, group_size=32, bits=bits)
            mx.eval(packed, scales, biases, dense)
            for rows in ROWS:
                x = mx.random.normal((rows, in_dim), key=mx.random.key(rows))
                n = max(3, repeats // rows)
                arrays = (x, packed, scales, biases, dense, bits)
                ours = _ms(lambda a=arrays: kernel.quantized_matmul(*a[:4], 32, a[5]), n)
                with_int8 = _ms(lambda a=arrays: kernel.quantized_matmul(*a[:4], 32, a[5], quantize_x=True), n)
                want = x @ dense.T
                scale = mx.abs(want).max().item()
                error = [
                    mx.abs(kernel.quantized_matmul(x, packed, scales, biases, 32, bits, quantize_x=q) - want)
                    .max()
                    .item()
                    / scale
                    for q in (False, True)
                ]
                theirs = _ms(
                    lambda a=arrays: mx.quantized_matmul(*a[:4], transpose=True, group_size=32, bits=a[5]),
                    max(2, n // 8),
                )
                blas = _ms(lambda a=arrays: a[0] @ a[4].T, n)
                print(
                    f"{label:16} {rows:4} {bits:4} {ours:8.3f} {with_int8:7.3f} {theirs:9.3f} {blas:7.3f}  "
                    f"{theirs / ours:5.1f}x {blas / ours:5.2f}x; {ours / with_int8:5.2f}x "
                    f"({error[0]:.1e}, {error[1]:.1e})" + ("" if int8 else " (no VNNI: int8 x is ours)")
                )


def decode_steps(steps: int) -> None:
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.models.cache import make_prompt_cache

    from solverx.engine.cpu_kernels import SpeedUp, decode_attention, speed_up

    model_dir, _ = real_base()
    model, tokenizer = load(str(model_dir))
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Write a short story about a river that learns to sing."}],
        add_generation_prompt=True,
    )

    speed = SpeedUp(0, 0, "float32 first")

    def run(batch: int) -> tuple[float, list[int]]:
        cache = make_prompt_cache(model)
        logits = model(mx.array([prompt] * batch), cache=cache)
        token = mx.argmax(logits[:, -1, :], axis=-1)[:, None]
        out = []
        started = None
        for step in range(steps + 2):
            if step == 2:
                started = time.perf_counter()
            with decode_attention(speed):  # as the engine's decode step: attention on the kernel too
                token = mx.argmax(model(token, cache=cache)[:, -1, :], axis=-1)[:, None]
            mx.eval(token)
            out.append(int(token[0, 0].item()))
        return (time.perf_counter() - started) / steps * 1e3, out

    figures = {}
    for label in ("float32", "kernel", "int8 x"):
        if label == "int8 x":
            model, _ = load(str(model_dir))  # a fresh float32 model to move
        if label != "float32":
            speed = speed_up(model, int8_activations=label == "int8 x")
            print("speed_up:", speed.describe())
        figures[label] = {batch: run(batch) for batch in (1, 8)}
    for batch in (1, 8):
        f32 = figures["float32"][batch][0]
        for label in ("kernel", "int8 x"):
            ours = figures[label][batch][0]
            tokens, want = figures[label][batch][1], figures["float32"][batch][1]
            agree = next((i for i, (a, b) in enumerate(zip(tokens, want, strict=True)) if a != b), len(want))
            print(
                f"decode step, batch {batch}: float32 {f32:.2f} ms ({batch * 1e3 / f32:.1f} tok/s), {label} "
                f"{ours:.2f} ms ({batch * 1e3 / ours:.1f} tok/s): {f32 / ours:.2f}x; "
                f"first {agree} of {len(want)} greedy tokens as float32's"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=200, help="products timed per single-row figure")
    parser.add_argument("--steps", type=int, default=64, help="decode steps timed per model figure")
    args = parser.parse_args()
    ensure_openblas()
    from solverx.engine.cpu_kernels import load

    available = load()
    if available.module is None:
        raise SystemExit(f"no fast CPU kernel here: {available.reason}")
    products(available.module, args.repeats)
    decode_steps(args.steps)


if __name__ == "__main__":
    main()
