"""The training loss computed on the positions that count, not on every position of the batch.

mlx-lm's ``default_loss`` turns every position of a batch into vocabulary logits and then masks most of them away:
a chat's prompt (system turn and question) and the padding of the shorter rows. On a real base the head is big
(SmolLM2: 576 x 49,152, a fifth of the model) and its cross-entropy's ``exp`` runs over every logit, so on a
LoRA step the head and the loss cost ~25 % (measured: 5.2 s a step of 4 x 161 tokens, 3.9 s without them). This
loss runs the decoder on the whole batch, as before, and the head only on the target positions inside each row's
``lengths`` window: the same value and gradient as mlx-lm's loss (up to rounding), for less work.

Batches get the positions from :func:`with_positions` (padded to a multiple of :data:`POSITION_BUCKET` with weight
0, so the compiled step sees few distinct shapes). A model whose head this module cannot reproduce exactly — the
logits of ``head(model.model(x))`` must equal ``model(x)`` on a probe — trains with mlx-lm's own loss.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.tuner.trainer import default_loss

from solverx.trainer.prefix import FrozenStates, find_split, same_on_a_probe, with_frozen_states

POSITION_BUCKET = 64

Head = Callable[[mx.array], mx.array]  # hidden states (..., hidden) -> logits (..., vocab)


def _softcap(model: Any) -> float | None:
    for owner in (model, getattr(model, "args", None)):
        value = getattr(owner, "final_logit_softcapping", None)
        if value:
            return float(value)
    return None


def find_head(model: Any) -> Head | None:
    """The function from ``model.model``'s hidden states to ``model``'s logits, or None when it is not the usual
    mlx-lm layout (a ``model.model`` decoder, then ``lm_head`` or the tied embedding, optionally soft-capped) or
    does not give the model's own logits on a probe."""
    decoder = getattr(model, "model", None)
    if decoder is None or not callable(decoder):
        return None
    lm_head = getattr(model, "lm_head", None)
    embed = getattr(decoder, "embed_tokens", None)
    if lm_head is None and not hasattr(embed, "as_linear"):
        return None
    cap = _softcap(model)

    def head(hidden: mx.array) -> mx.array:
        logits = lm_head(hidden) if lm_head is not None else embed.as_linear(hidden)
        return mx.tanh(logits / cap) * cap if cap else logits

    return head if same_on_a_probe(lambda probe: head(decoder(probe)), model) else None


def target_positions(lengths: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Flat indices into a ``(rows, width)`` target grid of the positions mlx-lm's loss counts (target step
    ``s`` = index + 1 with ``start <= s <= end`` for a row's ``[start, end]``), padded with weight-0 entries."""
    steps = np.arange(1, width + 1)
    mask = (steps[None, :] >= lengths[:, :1]) & (steps[None, :] <= lengths[:, 1:2])
    flat = np.flatnonzero(mask).astype(np.int32)
    padded = max(POSITION_BUCKET, -(-flat.size // POSITION_BUCKET) * POSITION_BUCKET)
    positions = np.zeros(padded, dtype=np.int32)
    positions[: flat.size] = flat
    weights = np.zeros(padded, dtype=np.float32)
    weights[: flat.size] = 1.0
    return positions, weights


def with_positions(batches: Callable[..., Iterator]) -> Callable[..., Iterator]:
    """``batches`` (mlx-lm's ``iterate_batches`` contract) with each batch's target positions and weights added."""

    def iterate(*args: Any, **kwargs: Any) -> Iterator:
        for batch, lengths in batches(*args, **kwargs):
            positions, weights = target_positions(np.array(lengths), batch.shape[1] - 1)
            yield batch, lengths, mx.array(positions), mx.array(weights)

    return iterate


def _counted_loss(head: Head, hidden: mx.array, batch: mx.array, positions: mx.array, weights: mx.array):
    picked = hidden.reshape(-1, hidden.shape[-1])[positions]
    targets = batch[:, 1:].reshape(-1)[positions]
    ce = nn.losses.cross_entropy(head(picked), targets) * weights
    count = weights.sum()
    return ce.astype(mx.float32).sum() / count, count.astype(mx.int32)


def selective_loss(head: Head) -> Callable:
    """mlx-lm's loss (mean cross-entropy over the counted targets, and their number), with the head applied to the
    counted positions only."""

    def loss(model: Any, batch: mx.array, lengths: mx.array, positions: mx.array, weights: mx.array):
        return _counted_loss(head, model.model(batch[:, :-1]), batch, positions, weights)

    return loss


def selective_loss_from_states(head: Head, top: Callable[[mx.array], mx.array]) -> Callable:
    """:func:`selective_loss` on batches that bring their hidden states after the frozen blocks
    (:mod:`solverx.trainer.prefix`): only ``top`` (the trained blocks and the norm) runs in the step."""

    def loss(model: Any, hidden: mx.array, batch: mx.array, lengths: mx.array, positions: mx.array, weights: mx.array):
        return _counted_loss(head, top(hidden), batch, positions, weights)

    return loss


def loss_for(model: Any, batches: Callable[..., Iterator]) -> tuple[Callable, Callable[..., Iterator]]:
    """The loss and batch iterator to train ``model`` with (call it once its LoRA layers are in place): the
    selective pair when its head is known, from kept hidden states when the blocks below the LoRA are frozen, else
    mlx-lm's default loss and ``batches`` as they are."""
    head = find_head(model)
    if head is None:
        return default_loss, batches
    split = find_split(model)
    if split is None:
        return selective_loss(head), with_positions(batches)
    states = FrozenStates(split.bottom)
    return selective_loss_from_states(head, split.top), with_frozen_states(with_positions(batches), states)
