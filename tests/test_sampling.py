"""The sampler's logits processors follow OpenAI's definition of the penalties and of ``logit_bias``:
``logit[j] -= c[j] * frequency_penalty + (c[j] > 0) * presence_penalty``, ``c[j]`` counting the generated tokens."""

from __future__ import annotations

import mlx.core as mx

from solverx.engine.sampling import SamplingParams, process_logits


def test_penalties_count_generated_tokens_and_bias_adds():
    params = SamplingParams(presence_penalty=1.0, frequency_penalty=0.5, logit_bias=((4, 3.0),), max_tokens=16)
    plain = SamplingParams()
    logits = mx.zeros((2, 6))
    out = process_logits(logits, [(params.logits_processors(), [3, 3, 5]), (plain.logits_processors(), [3])])
    assert out[0].tolist() == [0.0, 0.0, 0.0, -2.0, 3.0, -1.5]  # 3 twice: 2*0.5 + 1; 5 once: 0.5 + 1
    assert out[1].tolist() == [0.0] * 6  # a row without settings is untouched, whatever its neighbours ask


def test_no_processor_leaves_the_batch_as_it_is():
    logits = mx.arange(6, dtype=mx.float32).reshape(2, 3)
    assert process_logits(logits, [([], [1]), ([], [])]) is logits
