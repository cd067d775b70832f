"""Self-generated replay (solverx.trainer.self_replay) and the per-base recipe defaults that choose it.

A real base rehearses what it knows only with its own answers; they are generated once per base and cached, and a
recipe without ``base`` trains on the daemon's default base with that base's defaults.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from solverx.data import DATA_DIR
from solverx.models.builtin import SMOLLM_BASE_ID
from solverx.trainer.recipe import RecipeError, format_recipe, parse_recipe, recipe_defaults
from solverx.trainer.self_replay import (
    FORMAT,
    cache_path,
    general_questions,
    pick_prompts,
    replay_questions,
    self_replay_records,
)

GENERAL = DATA_DIR / "general"
PROBES = DATA_DIR / "probes"


def test_prompts_are_general_questions_and_never_the_evaluation_probes() -> None:
    questions = general_questions(GENERAL)
    assert len(questions) > 300 and len(set(questions)) == len(questions)
    probes = {json.loads(line)["question"] for path in PROBES.glob("*.jsonl") for line in path.read_text().splitlines()}
    assert not probes & set(questions), sorted(probes & set(questions))[:3]
    fixed = replay_questions()
    assert len(fixed) >= 50 and not probes & set(fixed), sorted(probes & set(fixed))
    picked = pick_prompts(GENERAL, 80)
    assert len(picked) == 80 and picked == pick_prompts(GENERAL, 80)  # the same prompts every time
    assert picked[: len(fixed)] == fixed and set(picked[len(fixed) :]) <= set(questions)
    assert pick_prompts(GENERAL, 8) == fixed[:8]


def test_the_base_answers_once_and_the_cache_is_reused(tiny_model_dir: Path, tmp_path: Path) -> None:
    cache = tmp_path / "replay"
    progress: list[tuple[int, int]] = []
    records = self_replay_records(tiny_model_dir, "solverx-tiny", GENERAL, cache, count=8, max_tokens=24,
                                  on_progress=lambda done, total: progress.append((done, total)))  # fmt: skip
    path = cache_path(cache, "solverx-tiny", tiny_model_dir, 8)
    header = json.loads(path.read_text().splitlines()[0])
    assert header["format"] == FORMAT and header["max_tokens"] == 24 and progress[-1] == (8, 8)
    prompts = pick_prompts(GENERAL, 8)
    for record in records:  # only answers the base finished within the limit are kept
        user, assistant = record.messages
        assert user["role"] == "user" and user["content"] in prompts
        assert assistant["role"] == "assistant" and assistant["content"]
    stamp = path.stat().st_mtime_ns

    again = self_replay_records(tiny_model_dir, "solverx-tiny", GENERAL, cache, count=8, max_tokens=24,
                                on_progress=lambda done, total: progress.append((-1, -1)))  # fmt: skip
    assert [r.messages for r in again] == [r.messages for r in records]
    assert path.stat().st_mtime_ns == stamp and (-1, -1) not in progress  # read back, not generated again

    path.write_text(path.read_text().replace('"max_tokens": 24', '"max_tokens": 25'))  # a stale cache is redone
    self_replay_records(tiny_model_dir, "solverx-tiny", GENERAL, cache, count=8, max_tokens=24)
    assert json.loads(path.read_text().splitlines()[0])["max_tokens"] == 24


def test_real_bases_default_to_self_replay_and_tiny_bases_keep_their_defaults() -> None:
    real, tiny = recipe_defaults(SMOLLM_BASE_ID), recipe_defaults("solverx-tiny")
    assert real.base == SMOLLM_BASE_ID and real.train.replay_source == "self"
    assert tiny.base == "solverx-tiny" and tiny.train.replay_source == "general"
    assert real.eval.max_leakage_rate <= 0.1 and real.eval.min_retention >= 0.9


def test_a_recipe_without_base_trains_on_the_daemons_default_and_a_named_base_gets_its_own_defaults() -> None:
    daemon_default = recipe_defaults(SMOLLM_BASE_ID)
    unnamed = parse_recipe(format_recipe({"train": {"sft_iters": 7}}), daemon_default)
    assert unnamed.base == SMOLLM_BASE_ID and unnamed.train.replay_source == "self" and unnamed.train.sft_iters == 7
    named = parse_recipe(format_recipe({"train": {"sft_iters": 7}}, base="solverx-tiny"), daemon_default)
    assert named.base == "solverx-tiny" and named.train.replay_source == "general" and named.train.sft_iters == 7
    assert parse_recipe("").base == "solverx-tiny"  # no daemon: the class defaults


def test_replay_source_is_checked_by_name() -> None:
    assert parse_recipe(format_recipe({"train": {"replay_source": "self"}})).train.replay_source == "self"
    with pytest.raises(RecipeError, match=r"train.replay_source: must be one of 'general', 'self', got 'mine'"):
        parse_recipe(format_recipe({"train": {"replay_source": "mine"}}))
