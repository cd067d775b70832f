"""The tiny default base: it loads with mlx-lm, chats, round-trips any text, and builds reproducibly and atomically."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from mlx_lm import generate, load

from solverx.models.tiny import BUILD_FILE, CHAT_SPEC, TINY_BASE_ID, TinySpec, build_key, build_tiny, ensure_tiny
from solverx.models.tokenizer_build import IM_END, render_chat

# The default architecture and data with almost no training: the same code path in a second or two.
QUICK = replace(TinySpec(), steps=3, batch_size=2, seq_len=64, warmup_steps=1)
MODEL_FILES = ("model.safetensors", "tokenizer.json", "tokenizer_config.json", "config.json")


@pytest.fixture(scope="module")
def loaded(tiny_model_dir: Path):
    return load(str(tiny_model_dir))


def test_default_model_is_where_the_fixture_says(tiny_model_dir: Path) -> None:
    assert tiny_model_dir.name == TINY_BASE_ID
    record = json.loads((tiny_model_dir / BUILD_FILE).read_text())
    assert record["build_key"] == build_key(TinySpec())
    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert config["tie_word_embeddings"] is True
    assert config["torch_dtype"] == "float32"
    assert config["max_position_embeddings"] == TinySpec().max_position


def test_loads_with_mlx_lm_and_answers_a_chat_prompt(loaded) -> None:
    model, tokenizer = loaded
    assert tokenizer.eos_token_ids == {tokenizer.convert_tokens_to_ids(IM_END)}
    messages = [{"role": "user", "content": "How do I sort a list in Python?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    text = generate(model, tokenizer, prompt=prompt, max_tokens=24)
    assert text.strip()
    assert "<|im_start|>" not in text


def test_chat_template_is_chatml_and_matches_what_pretraining_saw(loaded) -> None:
    _, tokenizer = loaded
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "What is 2 plus 2?"},
    ]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == render_chat(messages, add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")
    assert text.endswith("<|im_start|>user\nWhat is 2 plus 2?<|im_end|>\n<|im_start|>assistant\n")
    without = tokenizer.apply_chat_template(messages, add_generation_prompt=False, tokenize=False)
    assert not without.endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize(
    "text",
    ["안녕하세요, 서울의 날씨는 어떤가요?", "two  spaces,\ttabs and\nnew lines ", "def f(x):\n    return x  # ok"],
)
def test_text_round_trips_through_the_tokenizer_and_the_streaming_detokenizer(loaded, text: str) -> None:
    _, tokenizer = loaded
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text
    detokenizer = tokenizer.detokenizer
    detokenizer.reset()
    for token in ids:
        detokenizer.add_token(token)
    detokenizer.finalize()
    # mlx-lm's BPE streaming detokenizer drops one leading space; our texts have none.
    assert detokenizer.text == text


def test_two_builds_of_the_same_inputs_are_byte_identical(tmp_path: Path) -> None:
    first = build_tiny(tmp_path / "a", QUICK, progress=False)
    second = build_tiny(tmp_path / "b", QUICK, progress=False)
    for name in MODEL_FILES:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    other_seed = build_tiny(tmp_path / "c", replace(QUICK, seed=1), progress=False)
    assert (other_seed / "model.safetensors").read_bytes() != (first / "model.safetensors").read_bytes()


def test_ensure_tiny_rebuilds_only_when_the_build_key_changes(tmp_path: Path) -> None:
    models = tmp_path / "models"
    path = ensure_tiny(models, QUICK, base_id="t", progress=False)
    weights = path / "model.safetensors"
    built = weights.stat()

    assert ensure_tiny(models, QUICK, base_id="t", progress=False) == path
    assert weights.stat().st_mtime_ns == built.st_mtime_ns and weights.stat().st_ino == built.st_ino

    changed = replace(QUICK, steps=QUICK.steps + 1)
    ensure_tiny(models, changed, base_id="t", progress=False)
    assert weights.stat().st_ino != built.st_ino
    assert json.loads((path / BUILD_FILE).read_text())["build_key"] == build_key(changed)

    # A key recorded by other data or code (simulated) is stale too.
    record = json.loads((path / BUILD_FILE).read_text())
    (path / BUILD_FILE).write_text(json.dumps({**record, "build_key": "sha256:older"}))
    rebuilt_from = weights.stat().st_ino
    ensure_tiny(models, changed, base_id="t", progress=False)
    assert weights.stat().st_ino != rebuilt_from
    assert sorted(p.name for p in models.iterdir() if p.is_dir()) == ["t"]  # nothing half-built left behind


def test_a_failed_rebuild_leaves_the_previous_model_untouched(tmp_path: Path) -> None:
    target = build_tiny(tmp_path / "m", QUICK, progress=False)
    before = {name: (target / name).read_bytes() for name in MODEL_FILES}
    with pytest.raises(ValueError, match="fewer than one window"):
        build_tiny(target, replace(QUICK, seq_len=10_000_000), progress=False)
    assert {name: (target / name).read_bytes() for name in MODEL_FILES} == before
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


# -- the chat base's second phase: one conversation per row, loss on the answers ------------------------------------

QUICK_CHAT = replace(CHAT_SPEC, steps=3, chat_steps=3, warmup_steps=1)


def test_answer_weights_cover_the_assistant_turns_only(tmp_path: Path) -> None:
    from solverx.models.tiny import _answer_weights
    from solverx.models.tokenizer_build import train_tokenizer

    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello there"},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Goodbye"},
    ]
    text = render_chat(messages)
    tokenizer = train_tokenizer([text] * 4, 300)
    encoding = tokenizer.encode(text, add_special_tokens=False)
    weights = _answer_weights(text, encoding.offsets)
    weighted = "".join(text[start:end] for (start, end), w in zip(encoding.offsets, weights, strict=True) if w)
    assert weighted == f"Hello there{IM_END}Goodbye{IM_END}"


def test_row_batches_keep_documents_whole_and_pad_to_buckets() -> None:
    from solverx.models.pretrain import document_rows, iterate_row_batches

    documents = [[5] * n for n in (3, 10, 40, 7)]
    rows = document_rows(documents, [[1.0] * len(d) for d in documents], seq_len=16, separator=0)
    assert [len(tokens) for tokens, _ in rows] == [4, 11, 17, 17, 7, 8]  # the 40-token document is cut at 17
    batches = iterate_row_batches(rows, batch_size=3, pad=0, seed=0, bucket=8)
    epoch = [next(batches), next(batches)]  # 6 rows in batches of 3: one epoch
    for tokens, weights in epoch:
        assert tokens.shape == weights.shape and tokens.shape[0] == 3 and (tokens.shape[1] - 1) % 8 == 0
    assert sum(float(w.sum()) for _, w in epoch) == sum(len(t) for t, _ in rows)  # every row once, padding weighs 0


def test_chat_spec_builds_deterministically(tmp_path: Path) -> None:
    first = build_tiny(tmp_path / "a", QUICK_CHAT, progress=False)
    second = build_tiny(tmp_path / "b", QUICK_CHAT, progress=False)
    for name in MODEL_FILES:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    record = json.loads((first / BUILD_FILE).read_text())
    assert record["spec"]["chat_data"] == ["known"] and record["pretrain"]["steps"] == 6  # both phases ran
    assert build_key(QUICK_CHAT) != build_key(replace(QUICK_CHAT, chat_data=()))


def test_a_row_left_over_is_not_always_the_longest() -> None:
    """Whole batches only: the rows dropped at an epoch's end change, so long (code) answers are trained too."""
    from solverx.models.pretrain import iterate_row_batches

    rows = [([1] * n, [1.0] * n) for n in range(2, 9)]  # 7 rows, batches of 2: one row left over per epoch
    batches = iterate_row_batches(rows, batch_size=2, pad=0, seed=0, bucket=1)
    seen = set()
    for _ in range(3 * 8):  # eight epochs
        _, weights = next(batches)
        seen.update(int(row.sum()) for row in weights)
    assert seen == set(range(2, 9))  # the longest row (8) too
