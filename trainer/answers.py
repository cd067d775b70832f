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

from solverx.models.chat_rules import with_context


class Ask(NamedTuple):
    """A question, the adapter directory that answers it (None: the base), and facts to give it first."""

    question: str
    adapter: Path | None = None
    context: str | None = None  # a system turn before the question (grounding); None: the question alone


Reply = tuple[str, str | None]  # the answer's text, and why it ended ("stop", "length")


def messages_for(ask: Ask) -> list[dict[str, str]]:
    """The chat an ask is: its context as a system turn (folded by the model's chat rules where it has none)."""
    return with_context([{"role": "user", "content": ask.question}], ask.context or None)


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


def answer_in_processes(
    base_dir: Path,
    base_id: str,
    asks: Sequence[Ask],
    max_tokens: int,
    processes: int,
    on_progress: Callable[[int, int], None] | None = None,
) -> list[Reply]:
    """:func:`greedy_answers` with every ``processes``-th question answered by its own spawned Python, each with
    OpenBLAS on its share of the cores. MLX's CPU backend computes on one core per process, so on a CPU box with no
    training to share the cores with (the demo's warm-up), two processes answer ~1.5x as fast as one."""
    import multiprocessing
    import queue as queues

    from solverx.blas import threads_each

    asks = [Ask(*ask) for ask in asks]
    processes = max(1, min(processes, len(asks)))
    if processes == 1:
        return greedy_answers(base_dir, base_id, asks, max_tokens, on_progress)
    context = multiprocessing.get_context("spawn")
    messages = context.Queue()
    workers = [
        context.Process(
            target=_answer_share,
            args=(messages, rank, str(base_dir), base_id, asks[rank::processes], max_tokens, threads_each(processes)),
            daemon=True,
        )
        for rank in range(processes)
    ]
    for worker in workers:
        worker.start()
    done, shares = [0] * processes, {}
    try:
        while len(shares) < processes:
            try:
                kind, rank, payload = messages.get(timeout=1.0)
            except queues.Empty:
                failed = next((w for w in workers if w.exitcode not in (None, 0)), None)
                if failed is not None:
                    raise RuntimeError(f"an answering process exited with {failed.exitcode}") from None
                continue
            if kind == "error":
                raise RuntimeError(f"answering process {rank} failed: {payload}")
            if kind == "progress":
                done[rank] = payload
                if on_progress is not None:
                    on_progress(sum(done), len(asks))
            else:
                shares[rank] = payload
    finally:
        for worker in workers:
            worker.join(timeout=5)
            if worker.is_alive():
                worker.kill()
    replies: list[Reply] = [("", None)] * len(asks)
    for rank, share in shares.items():
        replies[rank::processes] = [(text, finish) for text, finish in share]
    return replies


def _answer_share(messages, rank: int, base_dir: str, base_id: str, asks: list, max_tokens: int, threads: int) -> None:
    from solverx import blas
    from solverx.engine import cpu_kernels
    from solverx.trainer.child import die_with_parent

    die_with_parent()
    cpu_kernels.set_threads(threads)  # each answering process on its share of the cores, as OpenBLAS
    try:
        with blas.threads(threads):
            replies = greedy_answers(
                Path(base_dir), base_id, asks, max_tokens, lambda done, total: messages.put(("progress", rank, done))
            )
        messages.put(("done", rank, replies))
    except BaseException as exc:  # reported, so the parent names the failure instead of waiting
        messages.put(("error", rank, f"{type(exc).__name__}: {exc}"))
