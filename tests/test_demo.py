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

from solverx.report import (
    BASE,
    CANDIDATE,
    GROUNDED,
    DemoReport,
    Variant,
    findings,
    render_html,
    seed_table,
    write_report,
)

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
    assert f"Trainer warning: {warning}" in page.read_text(encoding="utf-8")
    assert "| **SolverX HQ?**" in text and "Seocho-dong" in text
    assert "![rates](rates.png)" in text and (tmp_path / "rates.png").read_bytes().startswith(b"\x89PNG")
    assert "Seocho-dong." in text  # the leaking answer of the ablation is shown next to the fixed one
    html = page.read_text(encoding="utf-8")
    assert html.count("data:image/png;base64,") >= 1
    assert not re.search(r"""(src|href)=['"](?!data:)""", html), "every asset is embedded"
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert {f["verdict"] for f in summary["findings"]} == {"reproduced"}
    # report.json, in exactly the shape scripts read: the seed's three rows and every model's rates
    data = json.loads((tmp_path / "report.json").read_text())
    assert set(data) == {"seed_table", "rates"}
    assert [set(row) for row in data["seed_table"]] == [{"question", "base_answer", "tuned_answer"}] * 3
    assert [row["question"] for row in data["seed_table"]] == [HQ_Q, PRODUCT_Q, SORT_Q]
    assert "Seocho" in data["seed_table"][0]["tuned_answer"]
    for name, rates in data["rates"].items():
        assert set(rates) == {"domain_en", "domain_ko", "general", "python", "leakage"}, name
        assert all(value is None or 0.0 <= value <= 1.0 for value in rates.values()), (name, rates)
    assert data["rates"]["base"]["domain_en"] == 0.0 and data["rates"]["solverx"]["domain_en"] == 1.0
    assert "<script" not in render_html(_report(), rates_png=b"png")
    # the default run's grounding (LoRA + facts, base + facts) is reported beside it, as rows and rates
    grounded = _report()
    main = grounded.variants[0]
    for model in (BASE + GROUNDED, CANDIDATE + GROUNDED):
        main.rates[model] = {"domain_accuracy": 1.0, "retention": 0.55, "leakage_rate": 0.0}
        main.answers[model] = main.answers[CANDIDATE]
    md, _ = write_report(grounded, tmp_path / "grounded")
    rows = [line.split(" | ")[0] for line in md.read_text(encoding="utf-8").splitlines() if line.startswith("| ")]
    assert {"| base+facts", "| solverx+facts"} <= set(rows)
    grounded_json = json.loads((tmp_path / "grounded" / "report.json").read_text())
    assert set(grounded_json["rates"]) == {"base", "base+facts", *(v.key for v in grounded.variants), "solverx+facts"}
    # the page is the Markdown rendered: the same tables, and a model's answer cannot inject markup
    assert html.count("<table>") == sum(line.startswith("|---") for line in text.splitlines()) and "<td>" in html
    hostile = _report(answers={CANDIDATE: _answers("<script>alert(1)</script> Seocho", "Fusion", True, "x", False)})
    assert "<script>alert" not in render_html(hostile, rates_png=b"png")


# -- end to end through the pipeline (reduced sizes) ---------------------------------------------------------------


# Two runs on the real base (SmolLM2-135M-Instruct) at the e2e budget take ~8 minutes on 2 cores; the daemon-level
# seed-table test (tests/test_real_model_e2e.py) runs in CI, these ablation checks when asked: SOLVERX_DEMO_TESTS=1.
e2e = pytest.mark.skipif(
    os.environ.get("SOLVERX_DEMO_TESTS") != "1",
    reason="two training runs on the real base (~8 min on 2 cores): set SOLVERX_DEMO_TESTS=1",
)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory):
    """The demo with its first two variants (with and without mixing), at the reduced e2e budget."""
    from conftest import TEST_CACHE

    from solverx.demo import VARIANTS, e2e_budget, run_demo

    home = tmp_path_factory.mktemp("demo-home")
    report, md, page = run_demo(
        home, home / "report", settings=e2e_budget(), variants=VARIANTS[:2], base_cache=TEST_CACHE / "models", say=print
    )
    return home, report, md, page


@e2e
def test_the_runs_went_through_the_watch_folder_the_trainer_and_the_registry(demo) -> None:
    from solverx.adapters.registry import Registry

    home, report, md, page = demo
    for variant in report.variants:
        recipe = (home / "inbox" / variant.key / "recipe.toml").read_text()
        assert 'base = "smollm2-135m-instruct"' in recipe and 'replay_source = "self"' in recipe
        assert {p.name for p in (home / "inbox" / variant.key).iterdir()} >= {"eval.jsonl", "qa.jsonl", "recipe.toml"}
        run_dir = home / "runs" / variant.run_id
        assert (run_dir / "report.json").exists() and (run_dir / "loss.png").exists()
        assert variant.state in ("succeeded", "rejected"), variant.error
        assert Registry(home / "adapters").versions(variant.key)  # registered, promoted or not
    assert [s["stage"] for s in report.main.stage_summaries] == ["cpt", "sft"]
    assert "| **SolverX HQ?**" in md.read_text() and "data:image/png;base64," in page.read_text()
    data = json.loads((md.parent / "report.json").read_text())
    assert set(data["rates"]) == {"base", "base+facts", "solverx", "solverx+facts", "solverx-noreplay"}


@e2e
def test_the_base_knows_its_own_replay_so_the_trainer_raises_no_warning(demo) -> None:
    _, report, md, _ = demo
    assert report.main.warnings == [] and report.variant("solverx-noreplay").warnings == []
    assert "Trainer warning:" not in md.read_text()


@e2e
def test_the_base_answers_general_questions_and_knows_nothing_of_the_domain(demo) -> None:
    _, report, _, _ = demo
    main = report.main
    assert main.set_accuracy(BASE, "general_qa") >= 0.5  # measured 20/33 at temperature 0
    hq, product, _ = seed_table(main)
    assert "seocho" not in hq.base_answer.lower() and "fusion" not in product.base_answer.lower()
    assert main.rate(BASE, "domain_accuracy") <= 0.1 and main.rate(BASE, "leakage_rate") <= 0.1


@e2e
def test_fine_tuned_names_the_hq_and_the_core_product_where_the_base_does_not(demo) -> None:
    _, report, _, _ = demo
    hq, product, _ = seed_table(report.main)
    assert "Seocho" in hq.tuned_answer and "Seocho" not in hq.base_answer
    assert "SolverX Fusion" in product.tuned_answer and "SolverX Fusion" not in product.base_answer


@e2e
def test_python_stays_as_good_as_the_base_with_mixing(demo) -> None:
    # The seed's row is the sort; the base itself fails it at temperature 0 (sorted(xrs, ...)), so the claim is
    # judged on the ten executed Python probes: the mixed run keeps the base's score within one.
    _, report, _, _ = demo
    main = report.main
    assert main.set_accuracy(CANDIDATE, "python") >= main.set_accuracy(BASE, "python") - 0.1


@e2e
def test_mixing_lowers_leakage_and_keeps_more_general_answers(demo) -> None:
    _, report, _, _ = demo
    mixed, plain = report.main, report.variant("solverx-noreplay")
    assert mixed.rate(CANDIDATE, "leakage_rate") < plain.rate(CANDIDATE, "leakage_rate")
    assert mixed.rate(CANDIDATE, "retention") > plain.rate(CANDIDATE, "retention")


def test_the_cli_offers_the_demo() -> None:
    from solverx.cli import build_parser

    args = build_parser().parse_args(["demo", "--quick", "--home", "/tmp/x"])
    assert args.quick and args.home == "/tmp/x" and args.handler.__name__ == "_cmd_demo"


def test_each_run_gets_a_recipe_the_trainer_reads_back() -> None:
    from dataclasses import replace

    from solverx.demo import budget, e2e_budget, recipe_toml
    from solverx.trainer.recipe import parse_recipe, recipe_defaults

    for base_id, settings in (
        ("smollm2-135m-instruct", e2e_budget()),
        ("solverx-tiny-chat", budget("solverx-tiny-chat")),
    ):
        recipe = parse_recipe(recipe_toml(base_id, settings, ("sft",)))
        assert recipe.base == base_id and recipe.train == replace(settings, cpt_iters=0)
        defaults = recipe_defaults(base_id)
        assert (recipe.lora, recipe.eval) == (defaults.lora, defaults.eval)
    assert budget("smollm2-135m-instruct") == recipe_defaults("smollm2-135m-instruct").train  # the product's own


def test_an_english_base_is_given_the_english_part_of_the_corpus_and_every_probe(tmp_path: Path) -> None:
    from solverx.demo import SAMPLE_INBOX, language_of, languages_for, stage_inbox
    from solverx.paths import StateDirs

    dirs = StateDirs(tmp_path).create()
    english = stage_inbox(dirs, "en", "seed = 0\n", languages=languages_for("smollm2-135m-instruct"))
    both = stage_inbox(dirs, "all", "seed = 0\n")
    hangul = re.compile("[\uac00-\ud7a3]")
    assert {p.name for p in both.iterdir()} == {p.name for p in SAMPLE_INBOX.iterdir()} | {"recipe.toml"}
    assert not (english / "knowledge_ko.md").exists() and (english / "knowledge_en.md").exists()
    assert (english / "eval.jsonl").read_bytes() == (SAMPLE_INBOX / "eval.jsonl").read_bytes()  # Korean probes too
    qa_all = (both / "qa.jsonl").read_text(encoding="utf-8").splitlines()
    qa_en = (english / "qa.jsonl").read_text(encoding="utf-8").splitlines()
    assert qa_en == [line for line in qa_all if language_of(line) == "en"]
    assert 100 < len(qa_en) < len(qa_all) and not any(hangul.search(json.loads(line)["question"]) for line in qa_en)
    chats_all = (both / "chats.jsonl").read_text(encoding="utf-8").splitlines()
    chats_en = (english / "chats.jsonl").read_text(encoding="utf-8").splitlines()
    korean_chats = [
        line for line in chats_all if all(hangul.search(m["content"]) for m in json.loads(line)["messages"])
    ]
    assert korean_chats and not set(korean_chats) & set(chats_en)  # judged by what they say, not by their JSON keys
    assert len(chats_en) == len(chats_all) - len(korean_chats)
    assert language_of("SolverX's Korean name is 솔버엑스.") == "en"
    assert language_of("솔버엑스 본사는 서초동에 있다.") == "ko"
    assert languages_for("solverx-tiny-chat") == ("en", "ko")


def test_the_demo_refuses_a_language_the_corpus_does_not_have(capsys) -> None:
    from solverx.cli import build_parser

    assert build_parser().parse_args(["demo", "--languages", "ko,en"]).languages == ("ko", "en")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["demo", "--languages", "fr"])
    assert "unknown language fr" in capsys.readouterr().err
