"""Data-parallel LoRA training on the real base: 1 rank against 2 local ranks, side by side in one run.

    python bench/distributed.py [--steps 8] [--lengths 97,161]

Each configuration trains the default base's LoRA (the real-base recipe: rank 16 on the top 16 blocks) on the
same global batch of 4 sequences, through the product's launcher (``python -m solverx.trainer.launch``, i.e.
``mlx.launch`` with the ring backend) for 2 ranks. It prints seconds per step and tokens per second for both,
their ratio, and the all-reduce time per step for this adapter's gradient (measured alone, on the ring), and from
it the step cost over a 10 GbE and a Thunderbolt link for N Macs.

On one CPU machine two ranks are not two machines: they share its cores. They still win here because MLX's CPU
elementwise kernels run on one thread, so one process leaves a core idle between BLAS calls.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchkit import REPO, real_base

LORA = {"rank": 16, "scale": 2.0, "dropout": 0.0}
LORA_LAYERS = 16
GLOBAL_BATCH = 4
LINKS = {"10 GbE": 1.25e9, "Thunderbolt 4 (40 Gb/s)": 5e9}  # bytes per second, before protocol overhead


def rank_job(model_dir: str, steps: int, length: int, out: str) -> None:
    """Runs on every rank: timed LoRA steps on this rank's share of the global batch, then timed all-reduces."""
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    from mlx.nn.utils import average_gradients
    from mlx.utils import tree_flatten
    from mlx_lm import load
    from mlx_lm.tuner.trainer import default_loss
    from mlx_lm.tuner.utils import linear_to_lora_layers

    group = mx.distributed.init()
    model, _ = load(model_dir)
    model.freeze()
    linear_to_lora_layers(model, LORA_LAYERS, LORA)
    optimizer = optim.Adam(learning_rate=1e-5)
    value_and_grad = nn.value_and_grad(model, default_loss)
    state = [model.state, optimizer.state, mx.random.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step(batch, lengths):
        (loss, tokens), grads = value_and_grad(model, batch, lengths)
        optimizer.update(model, average_gradients(grads))
        return loss, tokens

    mx.random.seed(group.rank())
    rows = GLOBAL_BATCH // group.size()
    batch = mx.random.randint(0, 49_000, (rows, length))
    lengths = mx.array([[0, length]] * rows)
    for _ in range(2):  # compile and warm up
        mx.eval(state, *step(batch, lengths))
    started = time.perf_counter()
    for _ in range(steps):
        mx.eval(state, *step(batch, lengths))
    per_step = (time.perf_counter() - started) / steps

    grads = [mx.zeros_like(p) for _, p in tree_flatten(model.trainable_parameters())]
    grad_bytes = sum(g.nbytes for g in grads)
    reduce_s = 0.0
    if group.size() > 1:
        mx.eval(mx.distributed.all_sum(grads[0]))
        started = time.perf_counter()
        for _ in range(10):
            mx.eval([mx.distributed.all_sum(g) for g in grads])
        reduce_s = (time.perf_counter() - started) / 10
    if group.rank() == 0:
        Path(out).write_text(json.dumps({"per_step": per_step, "grad_bytes": grad_bytes, "reduce_s": reduce_s}))


def measure(model_dir: Path, ranks: int, steps: int, length: int) -> dict:
    from solverx.trainer.child import LOCAL_HOST, TrainHosts

    out = REPO / ".state" / "bench" / f"distributed-{ranks}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    args = ["--rank-job", str(model_dir), str(steps), str(length), str(out)]
    hosts = TrainHosts((LOCAL_HOST,) * ranks if ranks > 1 else ())
    command = [*hosts.launcher(), sys.executable, str(Path(__file__).resolve()), *args]  # the product's launcher
    env = dict(hosts.env(), HF_HUB_OFFLINE="1")
    subprocess.run(command, env=env, check=True, cwd=REPO, stdin=subprocess.DEVNULL)
    return json.loads(out.read_text())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--lengths", default="97,161", help="sequence lengths to time (padded widths)")
    parser.add_argument("--rank-job", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank_job:
        model_dir, steps, length, out = args.rank_job
        rank_job(model_dir, int(steps), int(length), out)
        return 0

    from solverx.blas import ensure_openblas

    ensure_openblas()
    model_dir, base_id = real_base()
    print(f"{base_id}: LoRA rank {LORA['rank']} on {LORA_LAYERS} blocks, global batch {GLOBAL_BATCH}, "
          f"{os.cpu_count()} cores")  # fmt: skip
    reduce = None
    for length in (int(x) for x in args.lengths.split(",")):
        one = measure(model_dir, 1, args.steps, length)
        two = measure(model_dir, 2, args.steps, length)
        tokens = GLOBAL_BATCH * length
        print(f"length {length}: 1 rank {one['per_step']:.3f} s/step ({tokens / one['per_step']:.0f} tok/s), "
              f"2 local ranks {two['per_step']:.3f} s/step ({tokens / two['per_step']:.0f} tok/s): "
              f"ratio {one['per_step'] / two['per_step']:.2f}x")  # fmt: skip
        reduce = two
    grad_mib = reduce["grad_bytes"] / 2**20
    print(f"all-reduce of the adapter's gradient ({grad_mib:.1f} MiB fp32) on 2 local ranks: "
          f"{reduce['reduce_s'] * 1000:.1f} ms per step")  # fmt: skip
    for link, bandwidth in LINKS.items():
        # A ring all-reduce sends 2 (N-1)/N of the gradient per rank: at most twice its size, whatever N.
        for n in (2, 4):
            seconds = 2 * (n - 1) / n * reduce["grad_bytes"] / bandwidth
            print(f"  {link}, {n} Macs: {seconds * 1000:.1f} ms per step for the gradient (bandwidth bound)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
