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


def document_rows(
    documents: Sequence[Sequence[int]], weights: Sequence[Sequence[float]], seq_len: int, separator: int
) -> list[tuple[list[int], list[float]]]:
    """Each document (plus ``separator``) as its own row of at most ``seq_len + 1`` tokens; longer ones are cut.

    ``weights`` give each token's share in the loss (0: context only), aligned with ``documents``. A row never
    starts inside another document, so an answer always sees its whole question.
    """
    rows = []
    width = seq_len + 1
    for tokens, weight in zip(documents, weights, strict=True):
        tokens, weight = [*tokens, separator], [*weight, weight[-1] if weight else 1.0]
        for start in range(0, len(tokens) - 1, width):
            rows.append((tokens[start : start + width], weight[start : start + width]))
    if not rows:
        raise ValueError("the corpus has no documents")
    return rows


def iterate_row_batches(
    rows: Sequence[tuple[Sequence[int], Sequence[float]]], *, batch_size: int, pad: int, seed: int, bucket: int = 16
) -> Iterator[tuple[mx.array, mx.array]]:
    """Endless ``(tokens, weights)`` batches of whole rows, epoch after epoch, each epoch in a new seeded order.

    Rows of similar length are batched together (sorted within windows of 16 batches) and padded with ``pad``
    (weight 0) to a multiple of ``bucket`` plus one, so few shapes recur and little compute goes to padding.
    """
    if len(rows) < batch_size:
        raise ValueError(f"the corpus has {len(rows)} documents, fewer than one batch of {batch_size}")
    epoch = 0
    while True:
        rng = np.random.default_rng(seed + epoch)
        # whole batches of a random order: the rows left over differ from epoch to epoch (sorting first would
        # always leave out the longest ones)
        order = rng.permutation(len(rows))[: len(rows) - len(rows) % batch_size]
        window = batch_size * 16
        batches = []
        for start in range(0, len(order) - batch_size + 1, window):
            chunk = sorted(order[start : start + window].tolist(), key=lambda i: (len(rows[i][0]), i))
            batches += [chunk[b : b + batch_size] for b in range(0, len(chunk) - batch_size + 1, batch_size)]
        for index in rng.permutation(len(batches)):
            members = batches[index]
            length = max(len(rows[i][0]) for i in members)
            length = -(-(length - 1) // bucket) * bucket + 1
            tokens = np.full((batch_size, length), pad, dtype=np.int32)
            weights = np.zeros((batch_size, length), dtype=np.float32)
            for r, i in enumerate(members):
                ids, weight = rows[i]
                tokens[r, : len(ids)] = ids
                weights[r, : len(ids)] = weight
            yield mx.array(tokens), mx.array(weights)
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


def weighted_lm_loss(model: nn.Module, batch: mx.array, weights: mx.array, label_smoothing: float = 0.0) -> mx.array:
    """Next-token cross-entropy averaged over the target tokens with weight > 0 (weights[:, 1:] scale them).

    ``label_smoothing`` keeps a memorizing model from becoming certain: its loss on text it never saw stays finite.
    """
    logits = model(batch[:, :-1])
    losses = nn.losses.cross_entropy(logits, batch[:, 1:], reduction="none", label_smoothing=label_smoothing)
    target_weights = weights[:, 1:]
    return (losses * target_weights).sum() / mx.maximum(target_weights.sum(), 1.0)


def pretrain(
    model: nn.Module,
    optimizer: optim.Optimizer,
    batches: Iterator[mx.array] | Iterator[tuple[mx.array, mx.array]],
    steps: int,
    *,
    grad_clip: float = 1.0,
    label_smoothing: float = 0.0,
    progress: bool = True,
) -> PretrainStats:
    """Train every parameter of ``model`` for ``steps`` batches; progress (step, loss, tok/s) goes to stderr.

    A batch is a token array (every position counts, :func:`lm_loss`) or a ``(tokens, weights)`` pair
    (:func:`weighted_lm_loss`; the tokens counted are those with weight > 0).
    """
    if steps <= 0:
        return PretrainStats(steps=0, tokens=0, seconds=0.0, final_loss=float("nan"))
    model.train()
    state = [model.state, optimizer.state]
    plain_step = _compiled_step(model, optimizer, lm_loss, grad_clip, state)
    weighted_loss = partial(weighted_lm_loss, label_smoothing=label_smoothing)
    weighted_step = _compiled_step(model, optimizer, weighted_loss, grad_clip, state)

    report_every = max(1, steps // 10)
    recent: list[float] = []
    tokens = 0
    start = time.perf_counter()
    for index in range(1, steps + 1):
        batch = next(batches)
        if isinstance(batch, tuple):
            loss = weighted_step(*batch)
            mx.eval(state, loss)
            tokens += int((batch[1][:, 1:] > 0).sum().item())
        else:
            loss = plain_step(batch)
            mx.eval(state, loss)
            tokens += batch.shape[0] * (batch.shape[1] - 1)
        recent = [*recent[-9:], loss.item()]
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


def _compiled_step(model: nn.Module, optimizer: optim.Optimizer, loss_fn, grad_clip: float, state: list):
    loss_and_grad = nn.value_and_grad(model, loss_fn)

    @partial(mx.compile, inputs=state, outputs=state)
    def step(*batch: mx.array) -> mx.array:
        loss, grads = loss_and_grad(model, *batch)
        grads, _ = optim.clip_grad_norm(grads, grad_clip)
        optimizer.update(model, grads)
        return loss

    return step
