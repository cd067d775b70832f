"""Greedy one-turn answers from a base and its adapters: what evaluation and self replay ask of a model.

One engine answers them all, as many at a time as it batches (a question starts as soon as another finishes, so
the batch never empties around a long answer). In a distributed run every rank answers its share of the questions
on its own engine (:func:`solverx.trainer.distributed.answer_everywhere`): MLX's CPU backend computes on one core
per process, so on a CPU box two ranks answer twice as fast as one, and on several Macs each adds its own.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from pathlib import Path

Ask = tuple[str, Path | None]  # a question, and the adapter directory that answers it (None: the base)
Reply = tuple[str, str | None]  # the answer's text, and why it ended ("stop", "length")


def greedy_answers(
    base_dir: Path,
    base_id: str,
    asks: Sequence[Ask],
    max_tokens: int,
    on_progress: Callable[[int, int], None] | None = None,
) -> list[Reply]:
    """Each question answered at temperature 0 by its adapter (or the base), in the order asked."""
    from solverx.engine.core import AdapterRef, Engine, EngineConfig
    from solverx.engine.sampling import SamplingParams

    if not asks:
        return []
    adapters = sorted({adapter for _, adapter in asks if adapter is not None}, key=str)
    refs = {adapter: AdapterRef(f"answers:{adapter}", adapter) for adapter in adapters}
    engine = Engine(base_dir, base_id, EngineConfig(max_resident_adapters=max(1, len(adapters)))).start()
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    done = 0

    async def answer(question: str, adapter: Path | None, room: asyncio.Semaphore) -> Reply:
        nonlocal done
        async with room:
            tokens = engine.encode_chat([{"role": "user", "content": question}])
            text, finish = [], None
            async for delta in engine.generate(tokens, params, refs.get(adapter)):
                text.append(delta.text)
                finish = delta.finish_reason or finish
        done += 1
        if on_progress is not None:
            on_progress(done, len(asks))
        return "".join(text), finish

    async def answer_all() -> list[Reply]:
        room = asyncio.Semaphore(engine.config.max_batch)
        return list(await asyncio.gather(*[answer(q, a, room) for q, a in asks]))

    try:
        return asyncio.run(answer_all())
    finally:
        engine.stop()
