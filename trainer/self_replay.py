"""Self-generated replay: the base model's own answers to general prompts, generated once per base and cached.

Replay protects what a model knows only if it *is* what the model knows. ``data/general`` is text a real base never
saw (it was written for the tiny bases), so rehearsing it teaches new text instead of guarding old skills. The
base's own greedy answers to general questions are, by construction, what it already does: mixing them into every
batch keeps a LoRA from moving those answers (``replay_source = "self"``, the default for real bases).

The prompts are every line of ``data/replay/questions.txt`` (questions close in form to a company inbox's — where is X
headquartered, what is X's main product — about other things, so the adapter learns where its facts do not apply),
then questions of ``data/general/qa`` up to the count; never the evaluation probes of ``data/probes``. The cache is
one JSONL file per base fingerprint under ``<home>/replay/<base_id>/``: a header line naming what it was made from,
then one ``{"messages": [...]}`` line per answer. This module owns that format.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

from solverx.adapters.fingerprint import base_fingerprint
from solverx.data import DATA_DIR
from solverx.trainer.validate import SftRecord

REPLAY_QUESTIONS = DATA_DIR / "replay" / "questions.txt"
# (asks, max_tokens, on_progress) -> replies, as trainer.answers gives them
Answerer = Callable[[list[Any], int, Callable[[int, int], None] | None], list[tuple[str, str | None]]]

FORMAT = "solverx-self-replay/1"
DEFAULT_PROMPTS = 200
MAX_ANSWER_TOKENS = 160


def general_questions(general_dir: Path) -> list[str]:
    """The first user turn of every conversation in ``general_dir/qa/*.jsonl``, in a stable order."""
    questions: list[str] = []
    for path in sorted((Path(general_dir) / "qa").glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            messages = json.loads(line).get("messages") or []
            first = next((m["content"] for m in messages if m.get("role") == "user"), None)
            if first and first not in questions:
                questions.append(first)
    return questions


def replay_questions(path: Path = REPLAY_QUESTIONS) -> list[str]:
    """The questions always asked (one a line; ``#`` starts a comment line)."""
    if not path.is_file():
        return []
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def pick_prompts(general_dir: Path, count: int = DEFAULT_PROMPTS, seed: int = 0) -> list[str]:
    """Every replay question (up to ``count``), then a seeded sample of the general questions to fill up."""
    fixed = replay_questions()[:count]
    rest = [q for q in general_questions(general_dir) if q not in fixed]
    sample = random.Random(seed).sample(rest, min(count - len(fixed), len(rest)))
    return fixed + sorted(sample, key=rest.index)


# What a base's maker records of how its weights came about (the fingerprint covers only the tensor layout), and
# the files that decide how it renders a chat.
_PROVENANCE = ("solverx-import.json", "build.json", "tokenizer_config.json", "chat_template.jinja")


def base_key(base_dir: Path) -> str:
    """What a base's greedy answers depend on: its layout fingerprint plus how its weights and template came about."""
    digest = hashlib.sha256(base_fingerprint(base_dir).encode())
    for name in _PROVENANCE:
        if (Path(base_dir) / name).is_file():
            digest.update((Path(base_dir) / name).read_bytes())
    return digest.hexdigest()[:16]


def _header(base_dir: Path, prompts: list[str], max_tokens: int) -> dict:
    digest = hashlib.sha256("\n".join(prompts).encode()).hexdigest()[:16]
    return {
        "format": FORMAT,
        "base": base_fingerprint(base_dir),
        "weights": base_key(base_dir),
        "prompts": digest,
        "max_tokens": max_tokens,
    }


def cache_path(cache_dir: Path, base_id: str, base_dir: Path, count: int = DEFAULT_PROMPTS) -> Path:
    return Path(cache_dir) / base_id / f"{base_key(base_dir)}-{count}.jsonl"


def _read(path: Path, header: dict) -> list[SftRecord] | None:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
        if not lines or json.loads(lines[0]) != header:
            return None
        return [SftRecord(f"self-replay:{i}", json.loads(line)["messages"]) for i, line in enumerate(lines[1:], 1)]
    except (OSError, ValueError, KeyError):
        return None


def generate_answers(
    base_dir: Path,
    base_id: str,
    prompts: list[str],
    max_tokens: int,
    on_progress: Callable[[int, int], None],
    answer: Answerer | None = None,
) -> list[tuple[str, str]]:
    """(question, answer) for each prompt the base answers to the end within ``max_tokens`` (greedy); ``answer``
    asks them (default: in a distributed run every rank answers its share)."""
    from solverx.trainer.answers import Ask
    from solverx.trainer.distributed import answer_everywhere, world

    asks = [Ask(question) for question in prompts]
    if answer is None:
        replies = answer_everywhere(world(), base_dir, base_id, asks, max_tokens, on_progress)
    else:
        replies = answer(asks, max_tokens, on_progress)
    # An answer cut off by the token limit would teach the model to stop mid-sentence: left out.
    return [
        (q, text.strip())
        for q, (text, finish) in zip(prompts, replies, strict=True)
        if text.strip() and finish == "stop"
    ]


def self_replay_records(
    base_dir: Path,
    base_id: str,
    general_dir: Path,
    cache_dir: Path,
    *,
    count: int = DEFAULT_PROMPTS,
    max_tokens: int = MAX_ANSWER_TOKENS,
    on_progress: Callable[[int, int], None] = lambda done, total: None,
    answer: Answerer | None = None,
) -> list[SftRecord]:
    """The base's answers as SFT records, from the cache or generated (then cached) when it has none; ``answer``
    as in :func:`generate_answers`."""
    prompts = pick_prompts(general_dir, count)
    header = _header(Path(base_dir), prompts, max_tokens)
    path = cache_path(cache_dir, base_id, Path(base_dir), count)
    cached = _read(path, header)
    if cached is not None:
        return cached
    pairs = generate_answers(Path(base_dir), base_id, prompts, max_tokens, on_progress, answer)
    lines = [json.dumps(header)]
    lines += [
        json.dumps(
            {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}, ensure_ascii=False
        )
        for q, a in pairs
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    partial.write_text("\n".join(lines) + "\n", encoding="utf-8")
    os.replace(partial, path)
    return [SftRecord(f"self-replay:{i}", json.loads(line)["messages"]) for i, line in enumerate(lines[1:], 1)]
