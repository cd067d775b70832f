"""LoRA step time on the real default base: mlx-lm's ``default_loss`` against ours, side by side in one process.

Ours is ``trainer.loss``: the head and its cross-entropy on the counted positions only, and, with the LoRA on the
last 16 of 30 blocks as the real base's recipe has it, the 14 frozen blocks below run once per distinct row
(``trainer.prefix``) instead of at every step. The rows are the Q&A of ``data/solverx`` rendered as the trainer
renders them (the prompt masked), batched by ``mixed_batches`` as in a run; every loss sees the same batches in the
same order, alternating, after a warm-up (the compiled step is traced once per shape). The kept states are made
before the timed steps (a run makes them on a row's first appearance: that one-time cost is printed apart). Prints
seconds a step, the ratios, and how much of each batch the loss counts. Run with ``.venv/bin/python bench/loss.py``
(about three minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from functools import partial
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchkit import real_base  # noqa: E402

from solverx.blas import ensure_openblas  # noqa: E402

QA = REPO / "data" / "solverx" / "inbox" / "qa.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=6, help="timed steps per loss (after 2 warm-up rounds)")
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args()
    ensure_openblas()

    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    import numpy as np
    from mlx_lm import load
    from mlx_lm.tuner.trainer import default_loss
    from mlx_lm.tuner.utils import linear_to_lora_layers

    from solverx.trainer.datasets import build_sft_dataset, mixed_batches
    from solverx.trainer.loss import find_head, selective_loss, selective_loss_from_states, target_positions
    from solverx.trainer.prefix import FrozenStates, find_split

    model, tokenizer = load(str(real_base()[0]))
    model.freeze()
    linear_to_lora_layers(model, 16, {"rank": 16, "scale": 2.0, "dropout": 0.0})
    head = find_head(model)
    split = find_split(model)
    assert head is not None and split is not None, "the real base: a tied head, 14 frozen blocks below the LoRA"
    pairs = [json.loads(line) for line in QA.read_text(encoding="utf-8").splitlines() if line.strip()]
    chats = [[{"role": "user", "content": p["question"]}, {"role": "assistant", "content": p["answer"]}] for p in pairs]
    dataset = build_sft_dataset(chats, tokenizer, 384)
    batches = list(zip(range(2 + args.steps), mixed_batches(dataset, args.batch_size, 384, loop=True), strict=False))
    batches = [batch for _, batch in batches]
    counted = [target_positions(np.array(lengths), tokens.shape[1] - 1)[1].sum() for tokens, lengths in batches]
    total = sum(tokens.shape[0] * (tokens.shape[1] - 1) for tokens, _ in batches)

    def stepper(loss):
        value_and_grad = nn.value_and_grad(model, loss)
        optimizer = optim.Adam(learning_rate=1e-5)
        state = [model.state, optimizer.state]

        @partial(mx.compile, inputs=state, outputs=state)
        def step(*batch):
            (value, _), grad = value_and_grad(model, *batch)
            optimizer.update(model, grad)
            return value

        return step, state

    def with_positions(batch):
        tokens, lengths = batch
        positions, weights = target_positions(np.array(lengths), tokens.shape[1] - 1)
        return tokens, lengths, mx.array(positions), mx.array(weights)

    states = FrozenStates(split.bottom)
    started = time.perf_counter()
    for tokens, lengths in batches:
        states.batch(tokens, lengths)
    kept_seconds = time.perf_counter() - started

    def with_states(batch):
        return states.batch(*batch[:2]), *with_positions(batch)

    runs = {
        "mlx-lm default_loss": (stepper(default_loss), lambda batch: batch),
        "ours, whole model": (stepper(selective_loss(head)), with_positions),
        "ours, kept states": (stepper(selective_loss_from_states(head, split.top)), with_states),
    }
    seconds = {name: 0.0 for name in runs}
    for i, batch in enumerate(batches):
        for name, ((step, state), prepare) in runs.items():
            started = time.perf_counter()
            mx.eval(step(*prepare(batch)), state)
            if i >= 2:
                seconds[name] += time.perf_counter() - started
    per_step = {name: s / args.steps for name, s in seconds.items()}
    print(f"SmolLM2-135M-Instruct, LoRA r16 on 16 blocks, batch {args.batch_size}, {args.steps} timed steps each")
    print(f"the loss counts {sum(counted) / total:.0%} of the batches' positions (the rest: prompts and padding)")
    for name, value in per_step.items():
        print(f"  {name:>20}: {value:.3f} s a step")
    print(f"  the kept states: {kept_seconds:.2f} s once for {states.computed} distinct rows")
    theirs = per_step["mlx-lm default_loss"]
    for name in ("ours, whole model", "ours, kept states"):
        print(f"  {name} / mlx-lm: {per_step[name] / theirs:.2f}x the time")


if __name__ == "__main__":
    main()
