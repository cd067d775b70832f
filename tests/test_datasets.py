"""Training data: CPT chunks, masked chat samples, identity, replay, per-sequence mixing and mlx-lm compatibility."""

from __future__ import annotations

import itertools
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from solverx.trainer.datasets import (
    MixedDataset,
    Sample,
    SequenceDataset,
    build_cpt_dataset,
    build_replay_dataset,
    build_sft_dataset,
    chunk_text,
    identity_records,
    load_general_data,
    mixed_batches,
    split_dataset,
    stage_datasets,
)
from solverx.trainer.recipe import Identity, Recipe, TrainSettings
from solverx.trainer.validate import IngestResult, SftRecord, TextDoc

GENERAL = Path(__file__).resolve().parent.parent / "data" / "general"

# --- mixing: tokenizer-free, with marker tokens (domain sequences hold 1s, replay sequences 2s) ---------------


def marked(n: int, token: int, kind: str) -> SequenceDataset:
    return SequenceDataset([Sample([token] * (3 + i % 5) + [100 + i], 1, f"{kind}{i}", kind) for i in range(n)])


def kinds_of(batch) -> list[str]:
    return ["replay" if row[0] == 2 else "domain" for row in np.array(batch).tolist()]


def test_replay_ratio_holds_over_many_sequences_and_within_batches() -> None:
    data = MixedDataset(marked(50, 1, "domain"), marked(30, 2, "replay"), ratio=0.2, seed=1)
    counts: Counter[str] = Counter()
    for _, (batch, _lengths) in zip(range(500), mixed_batches(data, 4, 64, loop=True), strict=False):
        counts.update(kinds_of(batch))
    share = counts["replay"] / (counts["replay"] + counts["domain"])
    assert abs(share - 0.2) < 0.01

    half = MixedDataset(marked(50, 1, "domain"), marked(30, 2, "replay"), ratio=0.5, seed=1)
    for _, (batch, _lengths) in zip(range(50), mixed_batches(half, 4, 64, loop=True), strict=False):
        assert sorted(kinds_of(batch)) == ["domain", "domain", "replay", "replay"]  # mixed per sequence


def test_replay_slots_move_around_within_batches() -> None:
    data = MixedDataset(marked(40, 1, "domain"), marked(40, 2, "replay"), ratio=0.25, seed=0)
    positions = Counter()
    for _, (batch, _lengths) in zip(range(200), mixed_batches(data, 4, 64, loop=True), strict=False):
        positions.update(i for i, kind in enumerate(kinds_of(batch)) if kind == "replay")
    assert set(positions) == {0, 1, 2, 3}


def test_batches_are_deterministic_for_a_seed() -> None:
    def run(seed: int | None, data_seed: int = 7) -> list[list[list[int]]]:
        data = MixedDataset(marked(20, 1, "domain"), marked(20, 2, "replay"), ratio=0.3, seed=data_seed)
        batches = zip(range(20), mixed_batches(data, 4, 64, loop=True, seed=seed), strict=False)
        return [np.array(b).tolist() for _, (b, _) in batches]

    assert run(None) == run(None) == run(7, data_seed=0)
    assert run(None) != run(8)


def test_one_pass_covers_each_domain_sample_once_and_keeps_offsets() -> None:
    domain = marked(10, 1, "domain")
    data = MixedDataset(domain, marked(5, 2, "replay"), ratio=0.5, seed=3)
    seen = []
    for batch, lengths in mixed_batches(data, 4, 64):
        for row, (offset, length) in zip(np.array(batch).tolist(), np.array(lengths).tolist(), strict=True):
            assert offset == 1 and row[length:] == [0] * (len(row) - length)
            if row[0] == 1:
                seen.append(row[length - 1])
    assert sorted(seen) == list(range(100, 110))

    # A plain dataset smaller than the batch still gives one (short) batch: mlx-lm's evaluate needs that.
    ((batch, lengths),) = list(mixed_batches(marked(3, 1, "domain"), 4, 64))
    assert batch.shape[0] == 3 and sorted(np.array(lengths)[:, 1].tolist()) == [4, 5, 6]


def test_batches_group_sequences_of_like_length_so_short_ones_skip_long_padding() -> None:
    # Short Q&A and long chats, as in a real inbox: a batch is padded to its longest row.
    domain = SequenceDataset([Sample([1] * (32 if i % 2 else 224), 1, f"d{i}", "sft") for i in range(256)])
    replay = SequenceDataset([Sample([2] * (32 if i % 2 else 224), 1, f"r{i}", "replay") for i in range(64)])
    data = MixedDataset(domain, replay, ratio=0.25, seed=0)
    padded = real = mixed = 0
    batches = list(mixed_batches(data, 4, 512))
    for batch, lengths in batches:
        widths = np.array(lengths)[:, 1]
        padded, real = padded + batch.size, real + int(widths.sum())
        mixed += int(widths.min() < 100 < widths.max())
    assert mixed <= 12, f"{mixed} of {len(batches)} batches mix short and long sequences"  # at random: ~70
    assert padded < 1.3 * real, padded / real  # drawn at random, about two in three batches would pay for a long row
    counts = Counter(kinds_of(batch).count("replay") for batch, _ in batches)
    assert counts[1] >= len(batches) - 1  # and still one replay sequence in every batch of four


def test_batch_shape_follows_mlx_lm_padding_and_truncation() -> None:
    long = SequenceDataset([Sample(list(range(1, 41)), 0, "long", "cpt"), Sample([5, 6], 0, "short", "cpt")])
    (batch, lengths), *_ = mixed_batches(long, 2, 1000)
    assert batch.shape == (2, 65)  # one plus a multiple of 32, as mlx-lm pads
    (batch, lengths), *_ = mixed_batches(long, 2, 16)
    assert batch.shape == (2, 16) and sorted(np.array(lengths)[:, 1].tolist()) == [2, 16]


def test_no_replay_data_means_domain_only() -> None:
    data = MixedDataset(marked(8, 1, "domain"), SequenceDataset(), ratio=0.2)
    assert data.effective_ratio == 0.0
    rows = [kinds_of(b) for b, _ in mixed_batches(data, 4, 64)]
    assert rows == [["domain"] * 4] * 2


def test_split_is_deterministic_disjoint_and_keeps_training_data() -> None:
    data = marked(40, 1, "domain")
    train, valid = split_dataset(data, 0.1, seed=0)
    assert (len(train), len(valid)) == (36, 4)
    assert split_dataset(data, 0.1, seed=0)[1].samples == valid.samples
    assert split_dataset(data, 0.1, seed=1)[1].samples != valid.samples
    assert not {s.source for s in train.samples} & {s.source for s in valid.samples}
    assert len(split_dataset(marked(1, 1, "d"), 0.5)[0]) == 1


# --- with the tiny base's tokenizer -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path):
    from mlx_lm.utils import load_tokenizer

    return load_tokenizer(tiny_model_dir)


KNOWLEDGE = (
    "SolverX is a simulation software company. It is headquartered in Seocho-dong, Seoul. "
    "Its core product is SolverX Fusion, which couples physics solvers with machine learning. "
    "솔버엑스의 본사는 서울 서초동에 있습니다. 핵심 제품은 SolverX Fusion입니다.\n\n"
    "The company was founded by engineers who wanted faster design loops! Does it sell licences? Yes.\n"
)


def sentences(text: str) -> list[str]:
    import re

    return [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if s.strip()]


def test_cpt_chunks_fit_the_length_end_at_sentences_and_cover_the_text(tokenizer) -> None:
    text = KNOWLEDGE * 3
    chunks = chunk_text(text, tokenizer, 64, overlap_tokens=24)
    assert len(chunks) > 3
    decoded = [tokenizer.decode(c[:-1]) for c in chunks]
    for tokens, body in zip(chunks, decoded, strict=True):
        assert len(tokens) <= 64 and tokens[-1] == tokenizer.eos_token_id
        assert body.rstrip()[-1] in ".!?다", body  # cut at a sentence end
    for sentence in sentences(text):
        assert any(sentence in body for body in decoded), sentence
    # Neighbouring chunks overlap by whole sentences.
    assert any(sentences(a)[-1] == sentences(b)[0] for a, b in itertools.pairwise(decoded))

    dataset = build_cpt_dataset([TextDoc("knowledge.md", text)], tokenizer, 64)
    assert {(s.offset, s.kind, s.source) for s in dataset.samples} == {(0, "cpt", "knowledge.md")}


def test_cpt_splits_sentences_and_words_longer_than_a_chunk(tokenizer) -> None:
    words = [f"word{i}" for i in range(120)]
    text = "Short start. " + " ".join(words) + " " + "x" * 400 + " end."
    chunks = chunk_text(text, tokenizer, 48, overlap_tokens=0)
    assert all(len(c) <= 48 for c in chunks)
    joined = "".join(tokenizer.decode(c[:-1]) for c in chunks)
    assert all(w in joined for w in words) and "x" * 400 in joined.replace(" ", "")
    assert joined.replace(" ", "") == text.replace(" ", "")  # nothing lost or repeated without overlap


def test_sft_masks_everything_but_the_answer(tokenizer) -> None:
    record = SftRecord(
        "qa.jsonl:1",
        [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "Where is SolverX headquartered?"},
            {"role": "assistant", "content": "In Seocho-dong, Seoul."},
            {"role": "user", "content": "And its core product?"},
            {"role": "assistant", "content": "SolverX Fusion."},
        ],
    )
    dataset = build_sft_dataset([record], tokenizer, 256)
    first, second = dataset.samples
    for end, sample, answer in ((2, first, "In Seocho-dong, Seoul."), (4, second, "SolverX Fusion.")):
        assert tokenizer.decode(sample.tokens[sample.offset :]).strip() == f"{answer}<|im_end|>"
        assert tokenizer.decode(sample.tokens[: sample.offset]).endswith("<|im_start|>assistant\n")
        # The masked part is exactly the prompt as it is rendered for generation.
        prompt = tokenizer.apply_chat_template(record.messages[:end], add_generation_prompt=True)
        assert sample.tokens[: sample.offset] == list(prompt)
        assert sample.kind == "sft" and sample.source == "qa.jsonl:1"
    context = tokenizer.decode(second.tokens[: second.offset])
    assert "Answer briefly." in context and "In Seocho-dong, Seoul." in context  # earlier turns as context


def test_sft_drops_what_does_not_fit_and_says_so(tokenizer) -> None:
    long = [{"role": "user", "content": "Tell me everything. " * 40}, {"role": "assistant", "content": "No."}]
    dataset = build_sft_dataset([SftRecord("qa.jsonl:9", long)], tokenizer, 64)
    assert len(dataset) == 0 and "qa.jsonl:9" in dataset.notes[0] and "max_seq_length 64" in dataset.notes[0]


def test_template_without_system_role_gets_it_folded_into_the_first_turn(tokenizer) -> None:
    import copy

    hf = copy.deepcopy(tokenizer._tokenizer)
    hf.chat_template = (
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
        + hf.chat_template
    )
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
    ]
    (sample,) = build_sft_dataset([messages], hf, 128).samples
    assert "Be brief.\n\nHi" in hf.decode(sample.tokens[: sample.offset])
    assert hf.decode(sample.tokens[sample.offset :]).strip() == "Hello.<|im_end|>"


def test_identity_set_in_english_and_korean(tokenizer) -> None:
    records = identity_records(Identity(name="Solvy", maker="SolverX Inc."))
    questions = [r.messages[0]["content"] for r in records]
    assert "Who are you?" in questions and "너는 누구야?" in questions and "Who made you?" in questions
    answers = {r.messages[0]["content"]: r.messages[1]["content"] for r in records}
    assert "Solvy" in answers["Who are you?"] and "SolverX Inc." in answers["Who made you?"]
    assert "Solvy" in answers["너는 누구야?"] and "SolverX Inc." in answers["누가 너를 만들었어?"]
    assert identity_records(Identity(name="", maker="x")) == []
    assert all("made by" not in r.messages[1]["content"] for r in identity_records(Identity("Solvy", "")))
    dataset = build_sft_dataset(records, tokenizer, 128, kind="identity")
    assert len(dataset) == len(records) and {s.kind for s in dataset.samples} == {"identity"}


def test_replay_reads_whatever_general_data_is_there(tmp_path: Path, tokenizer) -> None:
    general = tmp_path / "general"
    (general / "qa").mkdir(parents=True)
    (general / "qa" / "mixed.jsonl").write_text(
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": "Why is the sky blue?"},
                    {"role": "assistant", "content": "Scattering."},
                ]
            }
        )
        + "\n"
        + json.dumps({"prompt": "2+2?", "completion": "4"})
        + "\n"
        + json.dumps({"question": "Capital of France?", "answer": "Paris."})
        + "\n"
        + json.dumps({"text": "Water boils at 100 degrees Celsius at sea level."})
        + "\n"
        + "not json\n",
        encoding="utf-8",
    )
    (general / "code.py").write_text("def add(a, b):\n    return a + b\n", encoding="utf-8")
    (general / "prose.txt").write_text("The fox ran home. It was late.", encoding="utf-8")
    (general / "image.png").write_bytes(b"\x89PNG")
    texts, records, notes = load_general_data(general)
    assert len(records) == 3 and len(texts) == 3 and "line 5" in notes[0]
    replay = build_replay_dataset(general, tokenizer, 128)
    assert len(replay) == 6 and {s.kind for s in replay.samples} == {"replay"}
    chat_offsets = [s.offset for s in replay.samples if s.offset > 0]
    assert len(chat_offsets) == 3  # chats masked, texts not
    assert load_general_data(tmp_path / "missing")[2] == [f"no general replay data at {tmp_path / 'missing'}"]


def test_stage_datasets_from_an_ingest(tokenizer) -> None:
    ingest = IngestResult(
        cpt_texts=[TextDoc("k.md", KNOWLEDGE)],
        sft_records=[
            SftRecord("qa.jsonl:1", [{"role": "user", "content": "HQ?"}, {"role": "assistant", "content": "Seoul."}])
        ],
    )
    recipe = Recipe(train=TrainSettings(max_seq_length=128, replay_ratio=0.25, valid_fraction=0.1))
    cpt = stage_datasets("cpt", ingest, tokenizer, recipe, GENERAL)
    assert {s.kind for s in cpt.train.domain.samples} == {"cpt"} and cpt.train.ratio == 0.25
    assert len(cpt.valid) > 0 and {s.kind for s in cpt.valid.samples} == {"replay"}
    assert not {tuple(s.tokens) for s in cpt.valid.samples} & {tuple(s.tokens) for s in cpt.train.replay.samples}
    sft = stage_datasets("sft", ingest, tokenizer, recipe, None)
    assert Counter(s.kind for s in sft.train.domain.samples) == {"sft": 1, "identity": 8}
    assert sft.train.effective_ratio == 0.0 and len(sft.valid) == 0
    assert any("no replay data" in n for n in sft.notes)


def test_mlx_lm_trains_and_evaluates_with_mixed_batches(tiny_model_dir: Path, tokenizer, tmp_path: Path) -> None:
    import mlx.optimizers as optim
    from mlx_lm import load
    from mlx_lm.tuner.trainer import TrainingArgs, evaluate, train
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model, _ = load(str(tiny_model_dir))
    model.freeze()
    linear_to_lora_layers(model, 2, {"rank": 4, "scale": 10.0, "dropout": 0.0})
    records = identity_records(Identity())
    domain = build_sft_dataset(records, tokenizer, 128)
    replay = build_cpt_dataset([TextDoc("t", KNOWLEDGE)], tokenizer, 64, kind="replay")
    data = MixedDataset(domain, replay, ratio=0.5, seed=0)
    valid = SequenceDataset(domain.samples[:3])
    args = TrainingArgs(
        batch_size=4,
        iters=3,
        val_batches=-1,
        steps_per_report=1,
        steps_per_eval=100,
        max_seq_length=128,
        adapter_file=str(tmp_path / "adapters.safetensors"),
    )
    train(model, optim.Adam(learning_rate=1e-3), data, valid, args=args, iterate_batches=mixed_batches)
    loss = evaluate(model, valid, batch_size=4, num_batches=-1, max_seq_length=128, iterate_batches=mixed_batches)
    assert np.isfinite(loss) and loss > 0
