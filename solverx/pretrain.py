"""Brief full-parameter pretraining of a freshly initialised model on a packed token stream.

Plain functions in the shape of ``mlx_lm.tuner.trainer``: batches come from an iterator, the optimizer is
passed in, and the loop reports progress. Everything that decides the result (document order, initial weights,
schedule) is seeded, so the same inputs give bit-identical weights on the same machine.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import partial

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np


@dataclass(frozen=True)
class PretrainStats:
    """What a pretraining run did; ``final_loss`` is the mean over the last few steps (less noisy than one)."""

    steps: int
    tokens: int
    seconds: float
    final_loss: float

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def pack_epoch(documents: Sequence[Sequence[int]], seq_len: int, separator: int, seed: int) -> np.ndarray:
    """One epoch as windows of ``seq_len + 1`` tokens: documents shuffled by ``seed``, joined by ``separator``.

    Packing wastes no compute on padding; a document may span two windows, which is fine for pretraining.
    """
    order = np.random.default_rng(seed).permutation(len(documents))
    stream: list[int] = []
    for index in order:
        stream.extend(documents[index])
        stream.append(separator)
    width = seq_len + 1
    count = len(stream) // width
    if count == 0:
        raise ValueError(f"the corpus has {len(stream)} tokens, fewer than one window of {width}")
    return np.asarray(stream[: count * width], dtype=np.int32).reshape(count, width)


def iterate_batches(
    documents: Sequence[Sequence[int]], *, batch_size: int, seq_len: int, separator: int, seed: int
) -> Iterator[mx.array]:
    """Endless ``(batch_size, seq_len + 1)`` batches, epoch after epoch, each epoch in a new seeded order."""
    epoch = 0
    while True:
        windows = pack_epoch(documents, seq_len, separator, seed + epoch)
        for start in range(0, len(windows) - batch_size + 1, batch_size):
            yield mx.array(windows[start : start + batch_size])
        epoch += 1


def make_optimizer(*, learning_rate: float, steps: int, warmup_steps: int, weight_decay: float) -> optim.AdamW:
    """AdamW with a linear warmup and a cosine decay to a tenth of the peak rate."""
    warmup = min(warmup_steps, max(steps - 1, 0))
    decay = optim.cosine_decay(learning_rate, max(steps - warmup, 1), learning_rate * 0.1)
    schedule = (
        optim.join_schedules([optim.linear_schedule(0.0, learning_rate, warmup), decay], [warmup])
        if warmup > 0
        else decay
    )
    return optim.AdamW(learning_rate=schedule, weight_decay=weight_decay)


def lm_loss(model: nn.Module, batch: mx.array) -> mx.array:
    """Mean next-token cross-entropy over every position of the batch."""
    logits = model(batch[:, :-1])
    return nn.losses.cross_entropy(logits, batch[:, 1:], reduction="mean")


def pretrain(
    model: nn.Module,
    optimizer: optim.Optimizer,
    batches: Iterator[mx.array],
    steps: int,
    *,
    grad_clip: float = 1.0,
    progress: bool = True,
) -> PretrainStats:
    """Train every parameter of ``model`` for ``steps`` batches; progress (step, loss, tok/s) goes to stderr."""
    if steps <= 0:
        return PretrainStats(steps=0, tokens=0, seconds=0.0, final_loss=float("nan"))
    model.train()
    loss_and_grad = nn.value_and_grad(model, lm_loss)
    state = [model.state, optimizer.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step(batch: mx.array) -> mx.array:
        loss, grads = loss_and_grad(model, batch)
        grads, _ = optim.clip_grad_norm(grads, grad_clip)
        optimizer.update(model, grads)
        return loss

    report_every = max(1, steps // 10)
    recent: list[float] = []
    tokens = 0
    start = time.perf_counter()
    for index in range(1, steps + 1):
        batch = next(batches)
        loss = step(batch)
        mx.eval(state, loss)
        recent = [*recent[-9:], loss.item()]
        tokens += batch.shape[0] * (batch.shape[1] - 1)
        if progress and (index % report_every == 0 or index == steps):
            elapsed = time.perf_counter() - start
            print(
                f"pretrain step {index}/{steps}  loss {recent[-1]:.3f}  {tokens / elapsed:,.0f} tok/s",
                file=sys.stderr,
                flush=True,
            )
    model.eval()
    seconds = time.perf_counter() - start
    return PretrainStats(steps=steps, tokens=tokens, seconds=seconds, final_loss=sum(recent) / len(recent))
