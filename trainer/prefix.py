"""The frozen blocks below the LoRA, run once per training row instead of once per step.

A real base's recipe adapts only its last blocks (SmolLM2: 16 of 30), so the blocks below them are frozen base
weights with nothing to learn: a row's hidden states after them are the same at every step and every epoch. The
stage runs them once per distinct row (batched, on a row's first appearance), keeps the result, and each step runs
only the adapted blocks, the norm and the head (measured on SmolLM2, LoRA on 16 blocks: 4 x 161 random tokens
5.5 s a step with the whole model and mlx-lm's loss, 4.0 s from the kept states; the default run's 220 SFT steps on
data/solverx 682 s -> 479 s with the selective loss; ``bench/loss.py`` compares them). The gradient is the same:
nothing below the first adapted block has a parameter to train.

A decoder this module cannot split exactly — ``top(bottom(x))`` must equal the decoder's own output on a probe,
which rules out embedding scales (Gemma) and sliding-window layers (whose mask depends on the length) — trains
through the whole model, as before.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.models.base import create_attention_mask

from solverx.models.memory_plan import KEPT_STATES_BYTES

_PROBE_TOKENS = 8
_BLOCK = re.compile(r"^model\.layers\.(\d+)\.")


@dataclass(frozen=True)
class Split:
    """The decoder cut below its first trained block: ``bottom`` (tokens -> hidden states after the frozen blocks)
    and ``top`` (those states -> the decoder's output: the trained blocks and the final norm)."""

    bottom: Callable[[mx.array], mx.array]
    top: Callable[[mx.array], mx.array]


def first_trained_block(model: Any) -> int | None:
    """The index of the lowest block with a trainable parameter, or None when something outside the blocks (an
    embedding, the final norm) trains too."""
    names = [name for name, _ in tree_flatten(model.trainable_parameters())]
    blocks = [_BLOCK.match(name) for name in names]
    if not names or not all(blocks):
        return None
    return min(int(match.group(1)) for match in blocks if match)


def find_split(model: Any) -> Split | None:
    """The exact split of ``model.model`` below its first trained block, or None (nothing frozen below the LoRA,
    or a decoder that is not the plain ``embed_tokens``, causal ``layers``, ``norm`` layout)."""
    decoder = getattr(model, "model", None)
    layers = getattr(decoder, "layers", None)
    if decoder is None or not isinstance(layers, list) or not hasattr(decoder, "embed_tokens"):
        return None
    if any(getattr(layer, "use_sliding", False) for layer in layers) or not hasattr(decoder, "norm"):
        return None
    first = first_trained_block(model)
    if not first:
        return None
    lower, upper = layers[:first], layers[first:]

    def run(blocks: list, hidden: mx.array) -> mx.array:
        mask = create_attention_mask(hidden, None)
        for block in blocks:
            hidden = block(hidden, mask, cache=None)
        return hidden

    def bottom(tokens: mx.array) -> mx.array:
        return run(lower, decoder.embed_tokens(tokens))

    def top(hidden: mx.array) -> mx.array:
        return decoder.norm(run(upper, hidden))

    return Split(bottom, top) if same_on_a_probe(lambda probe: top(bottom(probe)), decoder) else None


def same_on_a_probe(ours: Callable[[mx.array], mx.array], theirs: Callable[[mx.array], mx.array]) -> bool:
    """Whether a function rebuilt from a model's parts gives the model's own output on a few tokens (a part that
    is not what it seems fails, or raises)."""
    try:
        probe = mx.arange(1, _PROBE_TOKENS + 1)[None]
        mine, real = ours(probe), theirs(probe)
        return mine.shape == real.shape and mx.allclose(mine, real, rtol=1e-4, atol=1e-4).item()
    except (TypeError, ValueError, AttributeError):
        return False


class FrozenStates:
    """Each distinct row's hidden states after the frozen blocks, computed on its first appearance and kept (up to
    ``budget`` bytes, which ``solverx plan`` counts; rows past it are computed again each time: SmolLM2 keeps
    ~0.37 MB for a 161-token row)."""

    def __init__(self, bottom: Callable[[mx.array], mx.array], budget: int = KEPT_STATES_BYTES) -> None:
        self.bottom, self.budget = bottom, budget
        self.rows: dict[bytes, mx.array] = {}
        self.kept_bytes = 0
        self.computed = 0

    def batch(self, tokens: mx.array, lengths: mx.array) -> mx.array:
        """The states of a batch's inputs (``tokens[:, :-1]``): rows kept or computed now, zero past each row's end
        (padding, which the causal mask keeps from every counted position)."""
        grid, ends = np.array(tokens), np.array(lengths)[:, 1]
        rows = [grid[r, : int(end)] for r, end in enumerate(ends)]
        keys = [row.tobytes() for row in rows]
        missing = list(dict.fromkeys(k for k in keys if k not in self.rows))
        fresh = self._compute([rows[keys.index(k)] for k in missing])
        found = dict(zip(missing, fresh, strict=True))
        width = grid.shape[1] - 1
        states = []
        for key in keys:
            state = found[key] if key in found else self.rows[key]
            state = state[:width]
            states.append(mx.pad(state, [(0, width - state.shape[0]), (0, 0)]) if state.shape[0] < width else state)
        for key, state in found.items():
            if self.kept_bytes + state.nbytes <= self.budget:
                self.rows[key] = state
                self.kept_bytes += state.nbytes
        return mx.stack(states)

    def _compute(self, rows: list[np.ndarray]) -> list[mx.array]:
        if not rows:
            return []
        longest = max(len(row) for row in rows)
        padded = np.zeros((len(rows), longest), np.int32)  # right padding: causal, so no row's states change
        for r, row in enumerate(rows):
            padded[r, : len(row)] = row
        states = self.bottom(mx.array(padded))
        kept = [mx.contiguous(states[r, : len(row)]) for r, row in enumerate(rows)]  # not views of the batch
        mx.eval(kept)
        self.computed += len(rows)
        return kept


def with_frozen_states(batches: Callable[..., Iterator], states: FrozenStates) -> Callable[..., Iterator]:
    """``batches`` (tokens, lengths, ...) with each batch's kept hidden states put first."""

    def iterate(*args: Any, **kwargs: Any) -> Iterator:
        for batch in batches(*args, **kwargs):
            hidden = states.batch(batch[0], batch[1])
            mx.eval(hidden)
            yield (hidden, *batch)

    return iterate
