"""Chunked prefill, interleaved with decoding: the engine on the tiny base, in process.

A prompt goes through the model a chunk at a time, between the decode steps of the sequences already running, so
a long prompt no longer holds every running stream until its whole prefill is done; and chunking changes nothing
in what the model answers. (How long the streams wait is measured in ``bench/serve.py``, not here.)
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from solverx.engine.core import Engine, EngineConfig
from solverx.engine.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


def long_prompt(engine: Engine, words: int) -> list[int]:
    text = " ".join(f"river{i % 17} stone{i % 5}" for i in range(words))
    return engine.encode_chat([{"role": "user", "content": f"Summarize: {text}"}])


async def answer(engine: Engine, prompt: list[int], params: SamplingParams = GREEDY) -> str:
    return "".join([delta.text async for delta in engine.generate(prompt, params)])


def test_chunked_prefill_answers_like_one_shot_prefill(tiny_model_dir: Path) -> None:
    answers = {}
    for chunk in (1024, 7):
        engine = Engine(tiny_model_dir, "tiny", EngineConfig(prefill_chunk=chunk)).start()
        try:
            prompt = long_prompt(engine, 60)
            assert len(prompt) > 5 * 7
            answers[chunk] = asyncio.run(answer(engine, prompt))
        finally:
            engine.stop()
    assert answers[7] == answers[1024] and answers[7]


def test_a_long_prompt_does_not_hold_up_running_streams(tiny_model_dir: Path) -> None:
    engine = Engine(tiny_model_dir, "tiny", EngineConfig(prefill_chunk=512, prefill_chunk_while_decoding=32)).start()
    try:
        short = engine.encode_chat([{"role": "user", "content": "What is Python?"}])
        long = long_prompt(engine, 110)
        assert len(long) > 20 * 32, len(long)

        async def scenario() -> tuple[int, str]:
            running_tokens: list[int] = []
            long_started = asyncio.Event()
            tokens_before_long_answer: list[int] = []

            async def running() -> None:
                params = SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True)
                async for delta in engine.generate(short, params):
                    running_tokens.append(delta.completion_tokens)
                    if delta.completion_tokens == 2:
                        long_started.set()

            async def arriving() -> str:
                await long_started.wait()
                at_arrival = running_tokens[-1]
                text = []
                async for delta in engine.generate(long, GREEDY):
                    if not text:
                        tokens_before_long_answer.append(running_tokens[-1] - at_arrival)
                    text.append(delta.text)
                return "".join(text)

            _, text = await asyncio.gather(running(), arriving())
            return tokens_before_long_answer[0], text

        decoded_meanwhile, text = asyncio.run(scenario())
        # the long prompt needs 20+ chunks; the running stream got a token between (almost) every two of them
        assert decoded_meanwhile >= 10, decoded_meanwhile
        assert text
    finally:
        engine.stop()
