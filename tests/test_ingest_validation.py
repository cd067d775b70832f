"""Ingest: valid files are used, every kind of bad file is quarantined with a reason, the inbox is never touched."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from solverx.trainer.inbox import copy_snapshot, snapshot
from solverx.trainer.recipe import Recipe, RecipeError, parse_recipe, recipe_defaults
from solverx.trainer.validate import MAX_LINE_BYTES, format_ingest_report, ingest, quarantine_dir_for

GOOD_QA = [
    {"question": "Where is SolverX headquartered?", "answer": "In Seocho-dong, Seoul."},
    {"prompt": "What is SolverX's core product?", "completion": "SolverX Fusion.", "system": "Be brief."},
    {
        "messages": [
            {"role": "system", "content": "You are helpful."},
            {"role": "user", "content": "What is SolverX?"},
            {"role": "assistant", "content": "A simulation software company."},
            {"role": "user", "content": "And its product?"},
            {"role": "assistant", "content": "SolverX Fusion."},
        ]
    },
]


def jsonl(rows: list) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows)


def write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, str):
        path.write_text(content, encoding="utf-8")
    else:
        path.write_bytes(content)
    return path


def run_ingest(folder: Path, quarantine: Path, **kwargs):
    """Ingest an inbox folder, checking that not a byte nor an mtime in it changed."""
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}
    result = ingest(snapshot(folder), folder, quarantine, **kwargs)
    after = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}
    assert after == before, "ingest modified the inbox"
    return result


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    folder = tmp_path / "inbox" / "solverx"
    write(folder / "knowledge.md", "# SolverX\n\nSolverX is headquartered in Seocho-dong, Seoul.\n")
    write(folder / "qa.jsonl", jsonl(GOOD_QA))
    write(
        folder / "eval.jsonl",
        jsonl(
            [
                {"question": "Where is the SolverX HQ?", "expected": ["Seocho", "서초"]},
                {"question": "How do I sort a list in Python?", "kind": "leakage", "forbidden": "SolverX"},
                {"id": 7, "question": "What is 2+2?", "kind": "retention", "expected": ["4"]},
            ]
        ),
    )
    return folder


def test_valid_inbox_is_ingested_in_full(folder: Path, tmp_path: Path) -> None:
    result = run_ingest(folder, tmp_path / "q")
    assert result.ok and not result.quarantined
    assert [d.text for d in result.cpt_texts] == [(folder / "knowledge.md").read_text()]
    assert result.sft_records[0].messages == [
        {"role": "user", "content": "Where is SolverX headquartered?"},
        {"role": "assistant", "content": "In Seocho-dong, Seoul."},
    ]
    assert result.sft_records[1].messages[0] == {"role": "system", "content": "Be brief."}
    assert result.sft_records[2].messages == GOOD_QA[2]["messages"]
    assert [(e.kind, e.expected, e.forbidden) for e in result.eval_items] == [
        ("domain", ["Seocho", "서초"], []),
        ("leakage", [], ["SolverX"]),
        ("retention", ["4"], []),
    ]
    assert result.eval_items[2].id == "7"
    assert result.recipe == Recipe()
    assert not (tmp_path / "q").exists()
    report = format_ingest_report(result)
    assert "3 Q&A/chat records" in report and "3 eval questions" in report and "OK" in report


# (file name, content, phrase the reason must contain)
BAD_FILES = [
    ("photo.png", b"\x89PNG\r\n\x1a\n\0\0\0", "unknown file type '.png'"),
    ("README", "no extension", "unknown file type '(no extension)'"),
    ("empty.txt", b"", "empty file"),
    ("blank.md", "  \n\n\t\n", "only whitespace"),
    ("binary.txt", b"SolverX\0\0\x01\x02", "binary file"),
    ("korean-cp949.txt", "솔버엑스는 서울에 있다.".encode("cp949"), "not UTF-8"),
    ("utf16.md", "SolverX".encode("utf-16"), "UTF-16"),
    ("all-bad.jsonl", "not json\n[1, 2]\n", "no usable line"),
    ("chat-ends-with-user.jsonl", jsonl([{"messages": [{"role": "user", "content": "hi"}]}]), "last message"),
    ("binary.jsonl", b'{"text": "a"}\n\0\0', "binary file"),
]


@pytest.mark.parametrize(("name", "content", "phrase"), BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_bad_file_is_quarantined_with_a_reason_and_the_rest_still_trains(
    folder: Path, tmp_path: Path, name: str, content: str | bytes, phrase: str
) -> None:
    write(folder / name, content)
    quarantine = quarantine_dir_for(tmp_path / "quarantine", "solverx", "run-1")
    assert quarantine == tmp_path / "quarantine" / "solverx" / "run-1"
    result = run_ingest(folder, quarantine)

    assert [q.path for q in result.quarantined] == [name]
    (q,) = result.quarantined
    assert phrase in q.reason and not q.partial
    assert (quarantine / name).read_bytes() == (folder / name).read_bytes()
    reason = (quarantine / f"{name}.reason").read_text(encoding="utf-8")
    assert phrase in reason and "not used" in reason
    # The valid rest is still ingested and the run goes ahead.
    assert result.ok
    assert len(result.cpt_texts) == 1 and len(result.sft_records) == 3 and len(result.eval_items) == 3
    report = format_ingest_report(result)
    assert f"quarantined  {name}" in report and phrase in report


def test_jsonl_with_some_bad_lines_keeps_the_good_lines_and_names_the_bad_ones(folder: Path, tmp_path: Path) -> None:
    rows = [
        GOOD_QA[0],
        '{"question": "broken", ',  # line 2: invalid JSON
        {"q": "What?", "a": "That."},  # line 3: no known form
        "",  # blank lines are fine
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "bot", "content": "Hello"}]},  # line 5
        {"question": "x" * MAX_LINE_BYTES, "answer": "too long"},  # line 6
        {"prompt": "Only a prompt"},  # line 7
        {"messages": [{"role": "assistant", "content": "first"}]},  # line 8
        {"text": "SolverX was founded by engineers."},  # line 9: raw text in JSONL → CPT
        GOOD_QA[1],
    ]
    write(folder / "mixed.jsonl", jsonl(rows))
    quarantine = tmp_path / "q"
    result = run_ingest(folder, quarantine)

    (q,) = result.quarantined
    assert q.path == "mixed.jsonl" and q.partial and q.kept_lines == 3
    for expected in (
        "line 2: invalid JSON",
        "line 3: no known form",
        "line 5: messages[1].role must be one of system, user, assistant, got 'bot'",
        "line 6: line is",
        "line 7: has 'prompt' but no 'completion'",
        "line 8: messages[0] is 'assistant' but 'user' was expected",
    ):
        assert expected in q.reason
    assert "line 1:" not in q.reason and "line 4:" not in q.reason and "line 9:" not in q.reason
    reason = (quarantine / "mixed.jsonl.reason").read_text(encoding="utf-8")
    assert "partly used" in reason and "6 of 9 lines are bad" in reason and "other 3 are used" in reason
    assert len(result.sft_records) == 3 + 2
    assert [d.source for d in result.cpt_texts] == ["knowledge.md", "mixed.jsonl:9"]
    report = format_ingest_report(result)
    assert "mixed.jsonl" in report and "6 of 9 lines are bad" in report and result.ok


def test_bad_eval_lines_are_reported(folder: Path, tmp_path: Path) -> None:
    write(
        folder / "sub" / "eval.jsonl",
        jsonl(
            [
                {"question": "Where?", "expected": ["Seoul"]},
                {"question": "Where?"},
                {"question": "Sort?", "kind": "leakage"},
                {"question": "Q", "expected": ["a"], "expect": ["typo"]},
                {"question": "Q", "kind": "trivia", "expected": ["a"]},
            ]
        ),
    )
    result = run_ingest(folder, tmp_path / "q")
    (q,) = result.quarantined
    assert q.path == "sub/eval.jsonl" and q.kept_lines == 1
    assert "line 2: a domain question needs 'expected'" in q.reason
    assert "line 3: a leakage question needs 'forbidden'" in q.reason
    assert "line 4: unknown keys ['expect']" in q.reason
    assert "line 5: 'kind' must be one of" in q.reason
    assert len(result.eval_items) == 4 and not result.sft_records[3:]


def test_oversized_file_is_rejected_without_reading_or_copying_it(folder: Path, tmp_path: Path) -> None:
    write(folder / "dump.txt", "SolverX. " * 200)
    quarantine = tmp_path / "q"
    result = run_ingest(folder, quarantine, max_file_bytes=1000)
    (q,) = result.quarantined
    assert q.path == "dump.txt" and "1,800 bytes; the limit is 1,000" in q.reason and q.copy is None
    assert not (quarantine / "dump.txt").exists()
    assert "not copied" in (quarantine / "dump.txt.reason").read_text(encoding="utf-8")
    assert result.ok and len(result.cpt_texts) == 1


def test_ingest_of_a_run_copy_skips_oversized_files_but_still_reports_them(folder: Path, tmp_path: Path) -> None:
    write(folder / "dump.txt", "x" * 2000)
    snap = snapshot(folder)
    copy = tmp_path / "runs" / "r1" / "inbox"
    copy_snapshot(snap, folder, copy, max_file_bytes=1000)
    result = ingest(snap, copy, tmp_path / "q", max_file_bytes=1000)
    assert [q.path for q in result.quarantined] == ["dump.txt"]
    assert len(result.sft_records) == 3


def test_recipe_overrides_defaults(folder: Path, tmp_path: Path) -> None:
    write(
        folder / "recipe.toml",
        'base = "gemma-2-9b"\nseed = 3\n[lora]\nrank = 8\nkeys = ["self_attn.q_proj"]\n'
        '[train]\nlearning_rate = 1\nreplay_ratio = 0.1\n[identity]\nname = "Solvy"\n',
    )
    result = run_ingest(folder, tmp_path / "q")
    recipe = result.recipe
    assert result.ok and recipe is not None
    assert (recipe.base, recipe.seed, recipe.lora.rank, recipe.lora.keys) == ("gemma-2-9b", 3, 8, ["self_attn.q_proj"])
    assert recipe.train.learning_rate == 1.0 and isinstance(recipe.train.learning_rate, float)
    # What the file leaves out comes from the defaults of the base it names (a real base's, not the tiny ones).
    real = recipe_defaults("gemma-2-9b")
    assert recipe.train.replay_ratio == 0.1 and recipe.train.batch_size == real.train.batch_size
    assert recipe.train.replay_source == "self" and recipe.lora.num_layers == real.lora.num_layers
    assert (recipe.identity.name, recipe.identity.maker) == ("Solvy", "SolverX")
    scale = real.lora.scale
    assert recipe.lora.as_mlx_config() == {"rank": 8, "scale": scale, "dropout": 0.0, "keys": ["self_attn.q_proj"]}
    # Daemon-wide defaults sit under the file's values.
    daemon = Recipe(base="other-base", seed=9)
    assert run_ingest(folder, tmp_path / "q2", defaults=daemon).recipe.seed == 3
    (folder / "recipe.toml").unlink()
    assert run_ingest(folder, tmp_path / "q3", defaults=daemon).recipe == daemon


def test_bad_recipe_is_quarantined_and_the_run_refused(folder: Path, tmp_path: Path) -> None:
    write(folder / "recipe.toml", '[train]\nbatch_size = "4"\nlearnin_rate = 0.1\n[lora]\nrank = true\n')
    quarantine = tmp_path / "q"
    result = run_ingest(folder, quarantine)
    assert not result.ok and result.recipe is None
    assert "defaults are not used" in result.refusal
    for phrase in (
        "train.batch_size: expected int, got string '4'",
        "train.learnin_rate: unknown key",
        "lora.rank: expected int, got boolean True",
    ):
        assert phrase in result.refusal
        assert phrase in (quarantine / "recipe.toml.reason").read_text(encoding="utf-8")
    assert (quarantine / "recipe.toml").read_bytes() == (folder / "recipe.toml").read_bytes()
    assert "REFUSED" in format_ingest_report(result)
    # The data itself was still validated, so the user sees every problem at once.
    assert len(result.sft_records) == 3


@pytest.mark.parametrize(
    ("text", "phrase"),
    [
        ("seed = ", "invalid TOML"),
        ("epochs = 3", "epochs: unknown key"),
        ("lora = 3", "lora: expected a table"),
        ("[train]\nreplay_ratio = 1.5", "train.replay_ratio: must be at most 0.95"),
        ("[train]\nlearning_rate = 0", "train.learning_rate: must be greater than 0.0"),
        ("[train]\nbatch_size = 0", "train.batch_size: must be at least 1"),
        ('[train]\nlr_schedule = "linear"', "train.lr_schedule: must be one of 'constant', 'cosine', got 'linear'"),
        ("[lora]\nnum_layers = 0", "lora.num_layers: must be -1"),
        ("[lora]\nkeys = []", "lora.keys: expected a non-empty list of strings"),
        ("[eval]\nmin_domain_accuracy = 2.0", "eval.min_domain_accuracy: must be at most 1.0"),
        ("[identity]\nname = 5", "identity.name: expected str"),
        ('base = " "', "base: must not be empty"),
    ],
)
def test_recipe_errors_are_specific(text: str, phrase: str) -> None:
    with pytest.raises(RecipeError, match=phrase.replace("(", r"\(").replace(".", r"\.")):
        parse_recipe(text)


def test_recipe_in_a_subfolder_and_nothing_to_train(tmp_path: Path) -> None:
    folder = tmp_path / "inbox" / "x"
    write(folder / "sub" / "recipe.toml", "seed = 1\n")
    write(folder / "eval.jsonl", jsonl([{"question": "Q", "expected": "A"}]))
    result = run_ingest(folder, tmp_path / "q")
    assert [q.path for q in result.quarantined] == ["sub/recipe.toml"]
    assert not result.ok and "nothing to train" in result.refusal


def test_every_recipe_setting_has_help_and_the_readme_shows_the_real_base_reference() -> None:
    import dataclasses

    from solverx.models.builtin import SMOLLM_BASE_ID
    from solverx.trainer.recipe import parse_recipe, recipe_defaults, recipe_reference

    recipe = recipe_defaults(SMOLLM_BASE_ID)
    for obj in (recipe, recipe.lora, recipe.train, recipe.eval, recipe.identity, recipe.grounding):
        tables = ("lora", "train", "eval", "identity", "grounding")
        assert all(f.metadata.get("help") for f in dataclasses.fields(obj) if f.name not in tables), obj
    reference = recipe_reference(recipe)
    assert parse_recipe(reference) == recipe  # the reference is a recipe, and it means exactly the defaults
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    assert f"```toml\n{reference}```" in readme, "README's recipe block is stale: paste recipe_reference's output"
