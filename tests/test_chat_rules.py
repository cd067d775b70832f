"""A model is trained on exactly the prompts it is served: the engine and the SFT datasets encode one conversation
through the same chat rules (solverx.models.chat_rules), for a ChatML base and for a Gemma 2 that has no system role."""

from __future__ import annotations

from pathlib import Path

import pytest

from solverx.engine.core import Engine
from solverx.models.lookalikes import build_gemma2
from solverx.trainer.datasets import build_sft_dataset

CONVERSATION = [
    {"role": "system", "content": "Answer in one short sentence."},
    {"role": "user", "content": "Where is the head office?"},
    {"role": "assistant", "content": "It is in Seocho-dong, Seoul."},
    {"role": "system", "content": "Be polite."},  # a second system turn: folded too, where the family folds
    {"role": "user", "content": "And the core product?"},
    {"role": "assistant", "content": "SolverX Fusion."},
]


def served_and_trained(model_dir: Path) -> tuple[list[list[int]], list[list[int]], Engine]:
    """For each assistant turn: the prompt the engine serves for the chat before it, and the trainer's masked prefix."""
    engine = Engine(model_dir, model_dir.name).start()
    try:
        turns = [i for i, m in enumerate(CONVERSATION) if m["role"] == "assistant"]
        served = [engine.encode_chat(CONVERSATION[:i]) for i in turns]
        samples = build_sft_dataset([CONVERSATION], engine.tokenizer, 512).samples
        trained = [s.tokens[: s.offset] for s in samples]
        return served, trained, engine
    finally:
        engine.stop()


@pytest.fixture(scope="module")
def gemma2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_gemma2(tmp_path_factory.mktemp("gemma") / "gemma-2-tiny")


def test_chatml_base_is_trained_on_the_prompts_it_serves(tiny_model_dir: Path) -> None:
    served, trained, engine = served_and_trained(tiny_model_dir)
    assert not engine.chat_rules.fold_system
    assert len(trained) == 2 and served == trained
    text = engine.tokenizer.decode(served[1])
    assert "<|im_start|>system\nBe polite.<|im_end|>" in text  # ChatML keeps every system turn where it is


def test_gemma_base_folds_system_turns_alike_when_serving_and_training(gemma2: Path) -> None:
    served, trained, engine = served_and_trained(gemma2)
    assert engine.chat_rules.fold_system
    assert len(trained) == 2 and served == trained
    text = engine.tokenizer.decode(served[1])
    assert "Answer in one short sentence.\n\nBe polite.\n\nWhere is the head office?" in text
    assert "system" not in text
