"""Greedy answers shared out to processes: each process answers its every N-th question exactly as one engine
would, and the replies come back in the order asked (the demo's warm-up uses every core this way)."""

from __future__ import annotations

from pathlib import Path

import pytest

from solverx import blas
from solverx.models.tiny import TINY_BASE_ID
from solverx.trainer.answers import Ask, answer_in_processes, greedy_answers

QUESTIONS = ("What is Python?", "How do rivers form?", "Explain a linked list.", "Who are you?", "Name a colour.")


def test_two_processes_answer_as_one_engine_does_in_the_order_asked(tiny_model_dir: Path) -> None:
    asks = [Ask(q) for q in QUESTIONS] + [Ask(QUESTIONS[0], None, "Answer in one word.")]
    progress: list[tuple[int, int]] = []
    shared = answer_in_processes(tiny_model_dir, TINY_BASE_ID, asks, 12, 2, lambda d, t: progress.append((d, t)))
    with blas.threads(blas.threads_each(2)):  # what each process runs: its share, on its share of the cores
        alone = [greedy_answers(tiny_model_dir, TINY_BASE_ID, asks[rank::2], 12) for rank in (0, 1)]
    assert shared[0::2] == alone[0] and shared[1::2] == alone[1]
    assert all(finish in ("stop", "length") for _, finish in shared)
    assert progress[-1] == (len(asks), len(asks)) and all(t == len(asks) for _, t in progress)


def test_a_failing_process_is_named_not_waited_for(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match=r"answering process \d failed"):
        answer_in_processes(tmp_path / "no-model", TINY_BASE_ID, [Ask("a"), Ask("b")], 4, 2)
