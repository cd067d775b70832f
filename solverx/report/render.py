"""The demo report as Markdown (charts as files beside it) and as one self-contained HTML page.

The page is the same Markdown rendered by markdown-it (CommonMark with tables), charts embedded as ``data:`` URIs and
no other asset, so both formats always say the same thing.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

from markdown_it import MarkdownIt

from solverx.report.charts import rates_chart_png
from solverx.report.model import (
    BASE,
    CANDIDATE,
    GROUNDED,
    DemoReport,
    Variant,
    languages_note,
    model_rates,
    percent,
)
from solverx.report.verdicts import findings, seed_table


def _stages_text(v: Variant) -> str:
    """``cpt 30 steps (final loss 2.100), sft 120 steps …`` for a run's summary line."""
    return ", ".join(
        f"{s['stage']} {s['iters']} steps"
        + (f" (final loss {s['final_loss']:.3f})" if s.get("final_loss") is not None else "")
        for s in v.stage_summaries
    )


def _gate_text(v: Variant) -> str:
    return "; ".join(v.reasons) if v.reasons else ("passed" if v.passed else v.error or v.state)


def _cell(text: str | None, limit: int = 200) -> str:
    text = (text or "").strip().replace("|", "\\|").replace("\n", " ⏎ ")
    return (text[:limit] + "…" if len(text) > limit else text) or "(empty)"


def _mark(correct: bool | None) -> str:
    return {True: "✅", False: "❌"}.get(correct, "")


def _variant_rows(report: DemoReport) -> list[tuple[str, str, Variant | None, str]]:
    """(label, model inside the variant, variant, description) for the base and every run."""
    main = report.main
    rows = [("base", BASE, main, f"{report.base_id}, no adapter")]
    if main is not None and BASE + GROUNDED in main.rates:
        rows.append((BASE + GROUNDED, BASE + GROUNDED, main, "grounding only: the base with the default run's facts"))
    for v in report.variants:
        rows.append((v.key, CANDIDATE, v, v.title))
        if CANDIDATE + GROUNDED in v.rates:
            rows.append((v.key + GROUNDED, CANDIDATE + GROUNDED, v, "LoRA + grounding: the same, with its fact graph"))
    return rows


def _rates_table(report: DemoReport) -> list[str]:
    lines = [
        "| model | what | domain QA | domain EN | domain KO | general QA | Python | retention | leakage | gate |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, model, variant, what in _variant_rows(report):
        if variant is None or model not in variant.rates:
            state = variant.state if variant is not None else "missing"
            lines.append(f"| {label} | {what} | — | — | — | — | — | — | — | {state} |")
            continue
        gate = "—" if model.startswith(BASE) else ("passed" if variant.passed else "failed")  # a base passes no gate
        split = model_rates(variant, model)
        lines.append(
            f"| {label} | {what} | {percent(variant.rate(model, 'domain_accuracy'))} "
            f"| {percent(split['domain_en'])} | {percent(split['domain_ko'])} "
            f"| {percent(variant.set_accuracy(model, 'general_qa'))} "
            f"| {percent(variant.set_accuracy(model, 'python'))} "
            f"| {percent(variant.rate(model, 'retention'))} | {percent(variant.rate(model, 'leakage_rate'))} | {gate} |"
        )
    return lines


def _leaky_examples(report: DemoReport, limit: int = 6) -> list[tuple[str, str, str]]:
    """Off-domain prompts where the run without mixing leaked: (question, without mixing, with mixing)."""
    main = report.main
    plain = report.variant(f"{main.key}-noreplay") if main else None
    if main is None or plain is None or not plain.ok:
        return []
    mixed = {a["question"]: a for a in main.answers.get(CANDIDATE, {}).get("offdomain", [])}
    out = []
    for a in plain.answers.get(CANDIDATE, {}).get("offdomain", []):
        if a.get("leaked") and a["question"] in mixed:
            out.append((a["question"], a["answer"], mixed[a["question"]]["answer"]))
    return out[:limit]


def base_description(report: DemoReport) -> str:
    """One phrase on where the base came from: imported from a GGUF file, or built from scratch here."""
    made = report.base_build
    if "sha256" in made:
        return f"imported from `{made.get('source')}` (sha256 {str(made['sha256'])[:12]}…), a real instruct model"
    spec, pretrain = made.get("spec", {}), made.get("pretrain", {})
    return (
        f"a {spec.get('hidden_size')}-wide, {spec.get('num_layers')}-layer llama pretrained from scratch on "
        f"`data/general` ({pretrain.get('steps')} steps, final loss {pretrain.get('final_loss')}, built in "
        f"{made.get('build_seconds')} s)"
    )


def render_markdown(
    report: DemoReport, *, rates_png: str = "rates.png", loss_pngs: dict[str, str] | None = None
) -> str:
    """The report as Markdown; charts are referenced by the relative file names given."""
    loss_pngs = loss_pngs or {}
    main = report.main
    lines = [
        "# SolverX demo: the seed's experiment, reproduced offline",
        "",
        f"Base model **{report.base_id}** — {base_description(report)}. "
        "Every run below went through the product's pipeline: the sample corpus was copied into a watched inbox "
        "with a `recipe.toml`, the trainer's child process ran CPT/SFT, evaluated base vs candidate on held-out "
        "probes, applied the gate and registered the version.",
        "",
        *([f"Trained on the corpus's {languages_note(report)}.", ""] if languages_note(report) else []),
        f"{'**Quick mode** (fewer training steps): numbers are rougher than a full run. ' if report.quick else ''}"
        f"Total time {report.seconds / 60:.1f} min. Created {report.created}.",
        "",
        "## The seed's table",
        "",
    ]
    if main is not None and main.ok:
        lines += [
            f"Run `{main.run_id}` — {main.title}.",
            "",
            "| question | base model | fine-tuned model |",
            "|---|---|---|",
        ]
        for row in seed_table(main):
            lines.append(
                f"| **{row.label}** {_cell(row.question, 120)} | {_mark(row.base_correct)} {_cell(row.base_answer)} "
                f"| {_mark(row.tuned_correct)} {_cell(row.tuned_answer)} |"
            )
    else:
        lines.append(f"The main run did not finish ({main.error if main else 'not run'}).")
    lines += ["", "## What reproduced", "", "| claim of the seed | verdict | evidence |", "|---|---|---|"]
    for f in findings(report):
        lines.append(f"| {_cell(f.claim, 300)} | **{f.verdict}** | {_cell(f.evidence, 300)} |")
    lines += [
        "",
        "## Rates, base vs fine-tuned",
        "",
        "Domain QA: held-out paraphrases from `eval.jsonl` (answer must contain the expected words). General QA and "
        "Python (the code is run on tests) make up general retention. Leakage: share of off-domain prompts whose "
        "answer mentions the domain (the “rose-tinted glasses” rate).",
        "",
        *_rates_table(report),
        "",
        f"![rates]({rates_png})",
        "",
    ]
    examples = _leaky_examples(report)
    if examples:
        lines += [
            "## The rose-tinted glasses, and the fix",
            "",
            "Off-domain prompts the run without mixing answered with the domain, next to the run with mixing:",
            "",
            "| off-domain prompt | without mixing | with mixing |",
            "|---|---|---|",
        ]
        lines += [f"| {_cell(q, 100)} | {_cell(a)} | {_cell(b)} |" for q, a, b in examples]
        lines.append("")
    lines += ["## Runs", ""]
    for v in report.variants:
        stages, verdict = _stages_text(v), _gate_text(v)
        lines += [
            f"### {v.key} — {v.title}",
            "",
            f"Run `{v.run_id}`: {v.state}"
            f"{f' as version {v.version}' if v.version else ''}, {v.seconds:.0f} s. Stages: {stages or 'none'}. "
            f"Gate: {verdict}.",
            "",
            *(f"> Trainer warning: {_cell(w, 400)}\n" for w in v.warnings),
        ]
        if v.key in loss_pngs:
            lines += [f"![loss {v.key}]({loss_pngs[v.key]})", ""]
    if main is not None and main.ok:
        lines += ["## Every answer of the main run", ""]
        for set_name, answers in main.answers.get(CANDIDATE, {}).items():
            base_answers = main.answers.get(BASE, {}).get(set_name, [])
            lines += [f"### {set_name}", "", "| question | base | fine-tuned |", "|---|---|---|"]
            for ours, theirs in zip(answers, base_answers, strict=False):
                flag = (lambda a: "⚠️" if a.get("leaked") else "") if set_name == "offdomain" else None
                mark_b = flag(theirs) if flag else _mark(theirs.get("correct"))
                mark_t = flag(ours) if flag else _mark(ours.get("correct"))
                lines.append(
                    f"| {_cell(ours['question'], 120)} | {mark_b} {_cell(theirs['answer'])} "
                    f"| {mark_t} {_cell(ours['answer'])} |"
                )
            lines.append("")
    lines += ["## Recipe", "", "```toml", report.recipe_toml.strip(), "```", ""]
    return "\n".join(lines)


def report_json(report: DemoReport) -> dict:
    """``report.json``: the seed's three rows (tuned = the product's default run) and every model's rates."""
    main = report.main
    rows = seed_table(main) if main is not None and main.ok else []
    rates = {BASE: model_rates(main, BASE)} if main is not None and main.ok else {}
    if main is not None and main.ok and BASE + GROUNDED in main.rates:
        rates[BASE + GROUNDED] = model_rates(main, BASE + GROUNDED)
    for v in (v for v in report.variants if v.ok):
        rates[v.key] = model_rates(v, CANDIDATE)
        if CANDIDATE + GROUNDED in v.rates:
            rates[v.key + GROUNDED] = model_rates(v, CANDIDATE + GROUNDED)
    return {
        "seed_table": [
            {"question": r.question, "base_answer": r.base_answer, "tuned_answer": r.tuned_answer} for r in rows
        ],
        "rates": rates,
    }


# -- HTML ---------------------------------------------------------------------------------------------------------

_STYLE = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;
color:#1d1d1f;line-height:1.45}
table{border-collapse:collapse;margin:1em 0;width:100%;font-size:.9em}
th,td{border:1px solid #d0d0d5;padding:.35em .55em;text-align:left;vertical-align:top}
th{background:#f2f2f5}
code,pre{background:#f6f6f8;border-radius:4px;padding:.1em .3em;font-size:.88em}
pre{padding:.7em;overflow:auto}
img{max-width:100%}
blockquote{border-left:3px solid #b3261e;margin:1em 0;padding:.2em 1em;background:#fbf3f2}
"""


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def render_html(report: DemoReport, *, rates_png: bytes | None = None) -> str:
    """One self-contained page: the Markdown report rendered as HTML, its charts embedded as ``data:`` URIs.

    markdown-it's default preset escapes raw HTML in the text, so an answer a model wrote cannot inject markup.
    """
    rates_png = rates_png if rates_png is not None else rates_chart_png(report)
    loss = {
        v.key: _data_uri(Path(v.loss_png).read_bytes())
        for v in report.variants
        if v.loss_png is not None and Path(v.loss_png).exists()
    }
    text = render_markdown(report, rates_png=_data_uri(rates_png), loss_pngs=loss)
    body = MarkdownIt("commonmark", {"html": False}).enable("table").render(text)
    return (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'><title>SolverX demo report</title>"
        f"<style>{_STYLE}</style></head><body>\n{body}</body></html>\n"
    )


def write_report(report: DemoReport, out_dir: Path) -> tuple[Path, Path]:
    """Write ``report.md`` (+ its PNGs), ``report.html`` (self-contained) and ``report.json``; return md, html."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rates = rates_chart_png(report)
    (out_dir / "rates.png").write_bytes(rates)
    loss_pngs = {}
    for v in report.variants:
        if v.loss_png is not None and Path(v.loss_png).exists():
            name = f"loss-{v.key}.png"
            (out_dir / name).write_bytes(Path(v.loss_png).read_bytes())
            loss_pngs[v.key] = name
    md = out_dir / "report.md"
    md.write_text(render_markdown(report, loss_pngs=loss_pngs), encoding="utf-8")
    page = out_dir / "report.html"
    page.write_text(render_html(report, rates_png=rates), encoding="utf-8")
    (out_dir / "report.json").write_text(json.dumps(report_json(report), indent=2, ensure_ascii=False), "utf-8")
    summary = {  # everything else a script may want: the findings, each run's state and time
        "base_id": report.base_id,
        "quick": report.quick,
        "languages": list(report.languages),
        "seconds": round(report.seconds, 1),
        "seed_table": [vars(r) for r in seed_table(report.main)] if report.main and report.main.ok else [],
        "findings": [vars(f) for f in findings(report)],
        "runs": {
            v.key: {"run_id": v.run_id, "state": v.state, "passed": v.passed, "rates": v.rates, "seconds": v.seconds}
            for v in report.variants
        },
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False), encoding="utf-8")
    return md, page
