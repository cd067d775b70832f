"""Turn one decode step's logits into one token per sequence, each with its own sampling settings.

Greedy rows (temperature 0) take the argmax of the whole batch at once. Sampled rows draw with their own
random key, split each step, so a seeded request gives the same tokens whatever else shares its batch. A row that
asks for ``logit_bias`` or OpenAI's presence/frequency penalties first goes through mlx-lm's logits processors,
over the tokens that row has generated so far (OpenAI's ``c[j]``: how often token j was sampled before).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import mlx.core as mx
from mlx_lm.sample_utils import make_logits_processors

LogitsProcessor = Callable[[mx.array, mx.array], mx.array]


@dataclass(frozen=True)
class SamplingParams:
    """What a request asks of the sampler and of the stopping rule."""

    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 256
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False  # keep going past end-of-sequence (benchmarks; vLLM accepts the same field)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit)
    grammar: str | None = None  # structured output: an llguidance grammar (solverx.engine.grammar) the text must match

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    def logits_processors(self) -> list[LogitsProcessor]:
        """mlx-lm's processors for this request's bias and penalties (none when it asks for neither)."""
        if not (self.logit_bias or self.presence_penalty or self.frequency_penalty):
            return []
        window = self.max_tokens  # every generated token counts, as in OpenAI's definition
        return make_logits_processors(
            logit_bias=dict(self.logit_bias) or None,
            presence_penalty=self.presence_penalty or None,
            presence_context_size=window,
            frequency_penalty=self.frequency_penalty or None,
            frequency_context_size=window,
        )


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


def process_logits(logits: mx.array, rows: Sequence[tuple[Sequence[LogitsProcessor], Sequence[int]]]) -> mx.array:
    """``logits`` (B, V) with each row's processors applied over the tokens that row generated so far:
    ``rows[i]`` is (processors, generated tokens). Unchanged when no row has a processor."""
    if not any(processors for processors, _ in rows):
        return logits
    processed = []
    for i, (processors, generated) in enumerate(rows):
        line = logits[i : i + 1]
        history = mx.array(list(generated), dtype=mx.int32)
        for processor in processors:
            line = processor(history, line)
        processed.append(line)
    return mx.concatenate(processed, axis=0)


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
