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
from typing import NamedTuple


class Ask(NamedTuple):
    """A question, the adapter directory that answers it (None: the base), and facts to give it first."""

    question: str
    adapter: Path | None = None
    context: str | None = None  # a system turn before the question (grounding); None: the question alone


Reply = tuple[str, str | None]  # the answer's text, and why it ended ("stop", "length")


def messages_for(ask: Ask) -> list[dict[str, str]]:
    """The chat an ask is: its context as a system turn (folded by the model's chat rules where it has none)."""
    system = [{"role": "system", "content": ask.context}] if ask.context else []
    return [*system, {"role": "user", "content": ask.question}]


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
    asks = [Ask(*ask) for ask in asks]
    adapters = sorted({ask.adapter for ask in asks if ask.adapter is not None}, key=str)
    refs = {adapter: AdapterRef(f"answers:{adapter}", adapter) for adapter in adapters}
    engine = Engine(base_dir, base_id, EngineConfig(max_resident_adapters=max(1, len(adapters)))).start()
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    done = 0

    async def answer(ask: Ask, room: asyncio.Semaphore) -> Reply:
        nonlocal done
        async with room:
            tokens = engine.encode_chat(messages_for(ask))
            text, finish = [], None
            async for delta in engine.generate(tokens, params, refs.get(ask.adapter)):
                text.append(delta.text)
                finish = delta.finish_reason or finish
        done += 1
        if on_progress is not None:
            on_progress(done, len(asks))
        return "".join(text), finish

    async def answer_all() -> list[Reply]:
        room = asyncio.Semaphore(engine.config.max_batch)
        return list(await asyncio.gather(*[answer(ask, room) for ask in asks]))

    try:
        return asyncio.run(answer_all())
    finally:
        engine.stop()
