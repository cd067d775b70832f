"""``solverx demo``: the seed's experiment through the real pipeline (reduced sizes), and its report.

The end-to-end part trains two adapters on the pretrained tiny chat base, through the watched inbox and the trainer's
child process, exactly as the demo does: CPT → SFT with general data mixed in, and the same without mixing. It checks
what holds at this scale (measured, see the module constants): the fine-tuned model names the HQ and the core product
where the base does not, the Python sort stays correct with mixing, and mixing lowers leakage.

The report part renders a synthetic :class:`DemoReport` (no MLX): the seed's table, verdicts that follow the numbers
(a claim the numbers do not support is reported as not reproduced), and a self-contained HTML page.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from solverx.report import BASE, CANDIDATE, DemoReport, Variant, findings, render_html, seed_table, write_report

# -- the report, from synthetic numbers ---------------------------------------------------------------------------

HQ_Q = "In which part of Seoul does SolverX have its headquarters?"
PRODUCT_Q = "What is the core product that SolverX offers?"
SORT_Q = "Write a Python function sort_numbers(xs) that returns the list sorted in ascending order."
BANK_Q = "Where is the headquarters of a typical bank?"
SORT_CODE = "```python\ndef f(x):\n    return sorted(x)\n```"


def _answers(hq: str, product: str, sort_ok: bool, bank: str, leaked: bool) -> dict:
    return {
        "domain": [
            {"question": HQ_Q, "answer": hq, "correct": "Seocho" in hq, "leaked": False},
            {"question": PRODUCT_Q, "answer": product, "correct": "Fusion" in product, "leaked": False},
        ],
        "python": [{"question": SORT_Q, "answer": SORT_CODE, "correct": sort_ok}],
        "offdomain": [{"question": BANK_Q, "answer": bank, "correct": None, "leaked": leaked}],
    }


def _variant(key: str, *, domain: float, retention: float, leakage: float, **answers) -> Variant:
    base = _answers("I don't have information about SolverX.", "I don't know.", True, "In the city centre.", False)
    return Variant(
        key=key,
        title=key,
        replay="noreplay" not in key,
        stages=("sft",) if key.endswith("-sft") else ("cpt",) if key.endswith("-cpt") else ("cpt", "sft"),
        run_id=f"run-{key}",
        state="succeeded",
        passed=leakage <= 0.2,
        rates={
            BASE: {"domain_accuracy": 0.0, "retention": 0.6, "leakage_rate": 0.0},
            CANDIDATE: {"domain_accuracy": domain, "retention": retention, "leakage_rate": leakage},
        },
        answers={BASE: base, CANDIDATE: _answers(**answers)},
        stage_summaries=[{"stage": s, "iters": 10, "final_loss": 1.0} for s in ("cpt", "sft")],
    )


def _report(**overrides) -> DemoReport:
    tuned = {"hq": "SolverX is in Seocho-dong, Seoul.", "product": "SolverX Fusion.", "sort_ok": True}
    variants = [
        _variant("solverx", domain=0.6, retention=0.55, leakage=0.1, **tuned, bank="Downtown.", leaked=False),
        _variant("solverx-noreplay", domain=0.6, retention=0.2, leakage=0.7, **tuned, bank="Seocho-dong.", leaked=True),
        _variant("solverx-cpt", domain=0.1, retention=0.5, leakage=0.1, **tuned, bank="Downtown.", leaked=False),
        _variant("solverx-sft", domain=0.5, retention=0.5, leakage=0.1, **tuned, bank="Downtown.", leaked=False),
    ]
    for key, value in overrides.items():
        setattr(variants[0], key, value)
    build = {"spec": {"hidden_size": 256, "num_layers": 4}, "pretrain": {"steps": 9, "final_loss": 1.0}}
    return DemoReport(base_id="solverx-tiny-chat", base_build=build, variants=variants, recipe_toml="seed = 0\n")


def test_seed_table_has_the_three_rows_with_the_real_answers() -> None:
    rows = seed_table(_report().main)
    assert [r.label for r in rows] == ["SolverX HQ?", "Core product?", "Python sort?"]
    hq, product, sort = rows
    assert (hq.base_correct, hq.tuned_correct) == (False, True) and "Seocho" in hq.tuned_answer
    assert "Fusion" in product.tuned_answer and "information" in rows[0].base_answer
    assert sort.base_correct and sort.tuned_correct


def test_verdicts_follow_the_numbers() -> None:
    verdicts = {f.claim.split(":")[0]: f.verdict for f in findings(_report())}
    assert all(v == "reproduced" for v in verdicts.values()), verdicts

    # Mixing that does not lower leakage: the effect shows, the fix does not — said so, not hidden.
    report = _report()
    report.variants[0].rates[CANDIDATE]["leakage_rate"] = 0.9
    rose = next(f for f in findings(report) if "Rose-tinted" in f.claim)
    assert rose.verdict == "partly" and "90%" in rose.evidence
    report.variants[0].rates[CANDIDATE]["leakage_rate"] = 0.41  # lower than without mixing (70 %), still far off
    assert next(f for f in findings(report) if "Rose-tinted" in f.claim).verdict == "partly"

    # SFT from scratch as good as CPT→SFT: resuming works but adds nothing measurable.
    report = _report()
    report.variants[3].rates[CANDIDATE]["domain_accuracy"] = 0.6
    incremental = next(f for f in findings(report) if f.claim.startswith("Incremental"))
    assert incremental.verdict == "partly"


def test_a_failed_main_run_is_reported_not_hidden(tmp_path: Path) -> None:
    report = _report(state="failed", error="boom", rates={}, answers={})
    assert [f.verdict for f in findings(report)] == ["not measured"]
    md, page = write_report(report, tmp_path)
    assert "did not finish (boom)" in md.read_text()
    assert "boom" in page.read_text()


def test_report_files_markdown_and_self_contained_html(tmp_path: Path) -> None:
    warning = "cpt: replay no better than chance"
    warned = [{"stage": "cpt", "iters": 10, "final_loss": 1.0, "warning": warning}, {"stage": "sft", "iters": 10}]
    md, page = write_report(_report(stage_summaries=warned), tmp_path)
    text = md.read_text(encoding="utf-8")
    assert f"> Trainer warning: {warning}" in text
    assert f"Trainer warning:</b> {warning}" in page.read_text(encoding="utf-8")
    assert "| **SolverX HQ?**" in text and "Seocho-dong" in text
    assert "![rates](rates.png)" in text and (tmp_path / "rates.png").read_bytes().startswith(b"\x89PNG")
    assert "Seocho-dong." in text  # the leaking answer of the ablation is shown next to the fixed one
    html = page.read_text(encoding="utf-8")
    assert html.count("data:image/png;base64,") >= 1
    assert not re.search(r"""(src|href)=['"](?!data:)""", html), "every asset is embedded"
    summary = json.loads((tmp_path / "report.json").read_text())
    assert {f["verdict"] for f in summary["findings"]} == {"reproduced"}
    assert "<script" not in render_html(_report(), rates_png=b"png")


# -- end to end through the pipeline (reduced sizes) ---------------------------------------------------------------


# The chat base takes ~4 minutes to build on 2 CPU cores (see solverx/tiny.py CHAT_SPEC) and the two runs ~2 more,
# while the fine-tuning claims below do not hold yet at this scale: these run when asked (SOLVERX_DEMO_TESTS=1) or
# when the base is already in the test cache, not on every CI run.
def _chat_base_ready() -> bool:
    from conftest import TEST_CACHE

    from solverx.tiny import CHAT_BASE_ID, CHAT_SPEC, build_key, stored_build_key

    return stored_build_key(TEST_CACHE / "models" / CHAT_BASE_ID) == build_key(CHAT_SPEC)


e2e = pytest.mark.skipif(
    os.environ.get("SOLVERX_DEMO_TESTS") != "1" and not _chat_base_ready(),
    reason="the tiny chat base is not built (set SOLVERX_DEMO_TESTS=1 to build it: ~4 min on 2 cores)",
)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory):
    """The demo with its first two variants (with and without mixing), at the reduced test budget."""
    from conftest import TEST_CACHE

    from solverx.demo import TEST, VARIANTS, run_demo

    home = tmp_path_factory.mktemp("demo-home")
    report, md, page = run_demo(
        home, home / "report", settings=TEST, variants=VARIANTS[:2], base_cache=TEST_CACHE / "models", say=print
    )
    return home, report, md, page


@e2e
def test_the_runs_went_through_the_watch_folder_the_trainer_and_the_registry(demo) -> None:
    from adapters.registry import Registry

    home, report, md, page = demo
    for variant in report.variants:
        recipe = (home / "inbox" / variant.key / "recipe.toml").read_text()
        assert 'base = "solverx-tiny-chat"' in recipe
        assert {p.name for p in (home / "inbox" / variant.key).iterdir()} >= {"eval.jsonl", "qa.jsonl", "recipe.toml"}
        run_dir = home / "runs" / variant.run_id
        assert (run_dir / "report.json").exists() and (run_dir / "loss.png").exists()
        assert variant.state in ("succeeded", "rejected"), variant.error
        assert Registry(home / "adapters").versions(variant.key)  # registered, promoted or not
    assert [s["stage"] for s in report.main.stage_summaries] == ["cpt", "sft"]
    assert "| **SolverX HQ?**" in md.read_text() and "data:image/png;base64," in page.read_text()


@e2e
def test_the_trainer_warns_that_the_chat_base_does_not_know_the_replay_data(demo) -> None:
    # Measured: the chat base predicts data/general at ~9 nats/token, worse than chance (ln 2048 = 7.6): it was
    # taught data/known's answers last, and mixing in data it cannot predict rehearses nothing (see README).
    from trainer.runlog import read_events

    home, report, md, _ = demo
    assert any("no better than chance" in w for w in report.main.warnings), report.main.stage_summaries
    kinds = [e["event"] for e in read_events(home / "runs" / report.main.run_id)]
    assert kinds.index("warning") < kinds.index("progress")  # before the first step, while the user can act
    assert report.variant("solverx-noreplay").warnings == []  # no mixing, no replay to judge
    assert "Trainer warning:" in md.read_text()


@e2e
def test_the_base_answers_general_questions_and_knows_nothing_of_the_domain(demo) -> None:
    _, report, _, _ = demo
    main = report.main
    assert main.set_accuracy(BASE, "general_qa") >= 0.9  # measured 33/33 at temperature 0
    hq, product, sort = seed_table(main)
    assert sort.base_correct, sort.base_answer  # "def sort_numbers(numbers): return sorted(numbers)"
    assert "seocho" not in hq.base_answer.lower() and "fusion" not in product.base_answer.lower()
    assert main.rate(BASE, "domain_accuracy") == 0.0 and main.rate(BASE, "leakage_rate") == 0.0


# The seed's claims for the fine-tuned model do not hold yet on this base (measured with `solverx demo --quick`):
# the base answers 33/33 general and 9/10 Python probes, but every LoRA run through the pipeline (rank 16, lr 5e-4
# x scale 5, CPT 60 + SFT 240 steps) ends with domain accuracy 3 % and retention 0 %; mixing lowers leakage (65 % ->
# 41 %) without fixing it, and lr 1e-3 x scale 20 diverges. Why (README, "Where it stands"): the base memorized
# data/known and predicts data/general worse than chance, so mixing data/general rehearses nothing; replaying what
# it knows keeps retention, and its held-out domain paraphrases stay out of reach. Expected failures, to flip when
# a base holds.
NOT_AT_THIS_SCALE = pytest.mark.xfail(reason="does not reproduce on the 3.4M-parameter tiny base (measured)")


@e2e
@NOT_AT_THIS_SCALE
def test_fine_tuned_names_the_hq_and_the_core_product_where_the_base_does_not(demo) -> None:
    _, report, _, _ = demo
    hq, product, _ = seed_table(report.main)
    assert "Seocho" in hq.tuned_answer and "Seocho" not in hq.base_answer
    assert "SolverX Fusion" in product.tuned_answer and "SolverX Fusion" not in product.base_answer


@e2e
@NOT_AT_THIS_SCALE
def test_the_python_sort_stays_correct_with_mixing(demo) -> None:
    _, report, _, _ = demo
    sort = seed_table(report.main)[2]
    assert sort.base_correct and sort.tuned_correct, sort.tuned_answer


@e2e
# Measured: 74 % without mixing, 0 % with at this budget (65 % and 41 % with --quick). Read it with the retention of
# 0 % in both runs: the mixed model stops naming the domain mostly because it stops answering at all.
def test_mixing_lowers_leakage(demo) -> None:
    _, report, _, _ = demo
    mixed, plain = report.main, report.variant("solverx-noreplay")
    assert mixed.rate(CANDIDATE, "leakage_rate") < plain.rate(CANDIDATE, "leakage_rate")


def test_the_cli_offers_the_demo() -> None:
    from solverx.cli import build_parser

    args = build_parser().parse_args(["demo", "--quick", "--home", "/tmp/x"])
    assert args.quick and args.home == "/tmp/x" and args.handler.__name__ == "_cmd_demo"


def test_each_run_gets_a_recipe_the_trainer_reads_back() -> None:
    from dataclasses import replace

    from solverx.demo import TEST, recipe_toml
    from trainer.recipe import LoraSettings, parse_recipe

    recipe = parse_recipe(recipe_toml("solverx-tiny-chat", TEST, ("sft",)))
    assert recipe.base == "solverx-tiny-chat" and recipe.train == replace(TEST, cpt_iters=0)
    assert (recipe.lora.rank, recipe.lora.scale) == (LoraSettings().rank, LoraSettings().scale)
