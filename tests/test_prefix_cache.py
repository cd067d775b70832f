"""The prompt (prefix) cache: the engine on the tiny base, in process.

A chat's next turn starts with the previous turn's prompt; its KV cache is kept (per base and adapter version,
bounded in bytes, LRU: mlx-lm's ``LRUPromptCache``), so the next turn prefills only what is new, and answers
exactly as it would without the cache. (The time it saves is measured in ``bench/stall.py``, not here.)
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from adapter_fixtures import random_adapter

from solverx.engine.core import AdapterRef, Engine, EngineConfig
from solverx.engine.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
FIRST = [{"role": "user", "content": "Tell me about rivers. " * 12}]


def ask(engine: Engine, messages: list[dict], adapter: AdapterRef | None = None) -> str:
    async def run() -> str:
        tokens = engine.encode_chat(messages)
        return "".join([delta.text async for delta in engine.generate(tokens, GREEDY, adapter)])

    return asyncio.run(run())


def test_the_next_turn_reuses_the_prompt_and_answers_the_same(tiny_model_dir: Path) -> None:
    answers = {}
    for cache_bytes in (0, 64 * 2**20):
        engine = Engine(tiny_model_dir, "tiny", EngineConfig(prompt_cache_bytes=cache_bytes)).start()
        try:
            first = ask(engine, FIRST)
            second = [*FIRST, {"role": "assistant", "content": first}, {"role": "user", "content": "And lakes?"}]
            before = engine.stats.cached_prompt_tokens
            answers[cache_bytes] = (first, ask(engine, second), ask(engine, second))
            reused = engine.stats.cached_prompt_tokens - before
        finally:
            engine.stop()
        if cache_bytes:
            first_prompt = len(engine.encode_chat(FIRST))
            # the second turn reuses the first turn's prompt; asked again, all of itself but the last token
            assert reused >= first_prompt + len(engine.encode_chat(second)) - 1, reused
        else:
            assert reused == 0
    assert answers[0] == answers[64 * 2**20]


def test_an_adapter_version_never_reuses_another_versions_cache(tiny_model_dir: Path, tmp_path: Path) -> None:
    v1 = AdapterRef("themes@1", random_adapter(tiny_model_dir, tmp_path / "v1", seed=1))
    v2 = AdapterRef("themes@2", random_adapter(tiny_model_dir, tmp_path / "v2", seed=2))
    engine = Engine(tiny_model_dir, "tiny", EngineConfig(max_resident_adapters=2)).start()
    try:
        hits = []
        for adapter in (v1, v2, None, v1):
            before = engine.stats.cached_prompt_tokens
            ask(engine, FIRST, adapter)
            hits.append(engine.stats.cached_prompt_tokens - before)
    finally:
        engine.stop()
    assert hits[:3] == [0, 0, 0] and hits[3] > 0, hits
