"""Exclusive training: unload a base while a run trains on it, when serving and training would not both fit.

Our choice (issue 8 asked us to pick): requests for a paused base, and its adapters, get **503 with Retry-After**
rather than being queued — a client library retries on its own, and a queue would hold connections open for
minutes. ``training_exclusive`` decides: ``always``, ``never``, or ``auto`` = the memory planner
(:mod:`solverx.models.memory_plan`) says serving and training this recipe do not fit at once on this machine.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import AsyncIterator, Callable

import anyio.to_thread

from solverx.engine.core import Engine
from solverx.trainer.recipe import Recipe

log = logging.getLogger("solverx.trainer")

RETRY_AFTER_S = 120


def must_pause(engine: Engine, mode: str, recipe: Recipe, max_adapters: int, machine_bytes: int | None = None) -> bool:
    """Whether training ``recipe`` on ``engine``'s base must run with that base unloaded."""
    if mode in ("always", "never"):
        return mode == "always"
    from solverx.models.memory_plan import TrainPlanArgs, load_model_config, plan, q_bits_of

    config = load_model_config(engine.model_dir)
    layers = recipe.lora.num_layers if recipe.lora.num_layers > 0 else int(config.get("num_hidden_layers", 32))
    machine = machine_bytes or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    estimate = plan(
        config,
        q_bits=q_bits_of(config),
        context=engine.context_length,
        resident_adapters=max_adapters,
        lora_rank=recipe.lora.rank,
        lora_layers=layers,
        train=TrainPlanArgs(batch_size=recipe.train.batch_size, seq_len=recipe.train.max_seq_length),
        machine_bytes=machine,
    )
    return estimate.recommendation != "concurrent"


def exclusive_training(
    engines: dict[str, Engine], mode: str, max_adapters: int
) -> Callable[[str, Recipe], contextlib.AbstractAsyncContextManager]:
    """The context a training run of ``adapter`` with ``recipe`` executes in (see ``TrainingManager.exclusive``)."""

    @contextlib.asynccontextmanager
    async def run_exclusively(adapter: str, recipe: Recipe) -> AsyncIterator[None]:
        engine = engines.get(recipe.base)
        if engine is None or not must_pause(engine, mode, recipe, max_adapters):
            yield
            return
        log.info("pausing %s while %s trains (serving and training do not fit together)", engine.base_id, adapter)
        await anyio.to_thread.run_sync(engine.pause, f"training {adapter} needs its memory", RETRY_AFTER_S)
        try:
            yield
        finally:
            await anyio.to_thread.run_sync(engine.resume)
            log.info("resumed %s", engine.base_id)

    return run_exclusively
