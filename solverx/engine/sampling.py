"""Turn one decode step's logits into one token per sequence, each with its own sampling settings.

Greedy rows (temperature 0) take the argmax of the whole batch at once. Sampled rows draw with their own
random key, split each step, so a seeded request gives the same tokens whatever else shares its batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx


@dataclass(frozen=True)
class SamplingParams:
    """What a request asks of the sampler and of the stopping rule."""

    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 256
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False  # keep going past end-of-sequence (benchmarks; vLLM accepts the same field)

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


def top_p_filter(logits: mx.array, top_p: float) -> mx.array:
    """Keep the smallest set of tokens whose probability mass reaches ``top_p``; mask the rest."""
    probs = mx.softmax(logits, axis=-1)
    order = mx.argsort(-probs, axis=-1)
    sorted_probs = mx.take_along_axis(probs, order, axis=-1)
    mass_before = mx.cumsum(sorted_probs, axis=-1) - sorted_probs
    keep_sorted = mass_before < top_p
    keep = mx.zeros_like(keep_sorted)
    keep = mx.put_along_axis(keep, order, keep_sorted, axis=-1)
    return mx.where(keep, logits, -mx.inf)


def sample_rows(logits: mx.array, rows: list[tuple[SamplingParams, mx.array | None]]) -> tuple[mx.array, list]:
    """One token per row of ``logits`` (B, V). ``rows[i]`` is (params, random key or None for greedy).

    Returns the tokens (B,) and the next key of every row.
    """
    greedy = mx.argmax(logits, axis=-1)
    if all(params.greedy for params, _ in rows):
        return greedy, [key for _, key in rows]
    tokens = []
    next_keys = []
    for i, (params, key) in enumerate(rows):
        if params.greedy or key is None:
            tokens.append(greedy[i])
            next_keys.append(key)
            continue
        key, subkey = mx.random.split(key)
        row = logits[i].astype(mx.float32) / params.temperature
        if params.top_p < 1.0:
            row = top_p_filter(row, params.top_p)
        tokens.append(mx.random.categorical(row, key=subkey))
        next_keys.append(key)
    return mx.stack(tokens).astype(greedy.dtype), next_keys
