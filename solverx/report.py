"""The demo's report: the seed's table, the rates of every run, the ablations and what did or did not reproduce.

Input is a :class:`DemoReport` (filled by :mod:`solverx.demo` from the runs' own ``report.json`` and loss charts);
output is Markdown (with the charts as files beside it) and one self-contained HTML page (charts embedded as
``data:`` URIs, no external assets). Every number comes from the runs; the verdicts in :func:`findings` are plain
comparisons of those numbers, so a claim that does not hold at this scale is reported as not reproduced.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

BASE = "base"
CANDIDATE = "candidate"
RATE_NAMES = {"domain_accuracy": "domain QA accuracy", "retention": "general retention", "leakage_rate": "leakage"}


@dataclass
class Variant:
    """One training run of the demo, as the pipeline recorded it."""

    key: str  # the adapter name the run trained (its inbox folder)
    title: str
    replay: bool
    stages: tuple[str, ...]
    run_id: str = ""
    state: str = "failed"  # succeeded | rejected | skipped | failed
    version: int | None = None
    passed: bool | None = None
    reasons: list[str] = field(default_factory=list)
    error: str | None = None
    seconds: float = 0.0
    # model ("base", "candidate") -> set name -> [{"question", "answer", "correct", "leaked"}]
    answers: dict[str, dict[str, list[dict]]] = field(default_factory=dict)
    # model -> {"domain_accuracy", "retention", "leakage_rate"}
    rates: dict[str, dict[str, float | None]] = field(default_factory=dict)
    stage_summaries: list[dict] = field(default_factory=list)  # {"stage", "iters", "final_loss"[, "warning"]}
    loss_png: Path | None = None

    @property
    def ok(self) -> bool:
        return self.state in ("succeeded", "rejected") and CANDIDATE in self.rates

    @property
    def warnings(self) -> list[str]:
        """The trainer's warnings about this run's stages (e.g. replay data the base does not know)."""
        return [s["warning"] for s in self.stage_summaries if s.get("warning")]

    def rate(self, model: str, name: str) -> float | None:
        return self.rates.get(model, {}).get(name)

    def set_accuracy(self, model: str, set_name: str) -> float | None:
        items = self.answers.get(model, {}).get(set_name, [])
        return sum(bool(a.get("correct")) for a in items) / len(items) if items else None

    def share(self, model: str, set_name: str, key: str, keep: Callable[[str], bool] = lambda q: True) -> float | None:
        """The share of ``set_name``'s answers (those whose question ``keep`` accepts) with ``key`` true."""
        items = [a for a in self.answers.get(model, {}).get(set_name, []) if keep(a["question"])]
        return sum(bool(a.get(key)) for a in items) / len(items) if items else None

    def answer(self, model: str, set_name: str, match: Callable[[str], bool]) -> dict | None:
        return next((a for a in self.answers.get(model, {}).get(set_name, []) if match(a["question"])), None)


@dataclass
class DemoReport:
    base_id: str
    base_build: dict  # how the base was made: a tiny base's build.json, an imported one's solverx-import.json
    variants: list[Variant]
    recipe_toml: str
    quick: bool = False
    seconds: float = 0.0
    created: str = ""
    home: str = ""
    languages: tuple[str, ...] = ("en", "ko")  # the corpus's languages trained on; the probes ask in all

    def variant(self, key: str) -> Variant | None:
        return next((v for v in self.variants if v.key == key), None)

    @property
    def main(self) -> Variant | None:
        return self.variants[0] if self.variants else None


def languages_note(report: DemoReport) -> str:
    """What part of the bilingual corpus was trained on, when not all of it ("" when all)."""
    names = {"en": "English", "ko": "Korean"}
    if set(report.languages) >= set(names):
        return ""
    kept = " and ".join(names.get(code, code) for code in report.languages)
    return (
        f"{kept} files and lines only (the base was pretrained on {kept}; `--languages en,ko` trains on all): "
        "the held-out probes are still asked in both languages"
    )


def _is_korean(text: str) -> bool:
    return any("\uac00" <= ch <= "\ud7a3" for ch in text)


def model_rates(variant: Variant, model: str) -> dict[str, float | None]:
    """The report's rates (fractions 0-1): held-out domain questions in English and Korean apart, the general
    questions, the Python probes (code executed) and off-domain answers that mention the domain."""
    return {
        "domain_en": variant.share(model, "domain", "correct", lambda q: not _is_korean(q)),
        "domain_ko": variant.share(model, "domain", "correct", _is_korean),
        "general": variant.share(model, "general_qa", "correct"),
        "python": variant.share(model, "python", "correct"),
        "leakage": variant.share(model, "offdomain", "leaked"),
    }


def report_json(report: DemoReport) -> dict:
    """``report.json``: the seed's three rows (tuned = the product's default run) and every model's rates."""
    main = report.main
    rows = seed_table(main) if main is not None and main.ok else []
    rates = {BASE: model_rates(main, BASE)} if main is not None and main.ok else {}
    rates.update({v.key: model_rates(v, CANDIDATE) for v in report.variants if v.ok})
    return {
        "seed_table": [
            {"question": r.question, "base_answer": r.base_answer, "tuned_answer": r.tuned_answer} for r in rows
        ],
        "rates": rates,
    }


# -- the seed's table ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SeedQuestion:
    label: str
    set_name: str
    match: Callable[[str], bool]
    expect: str  # what a correct answer contains, for the reader


SEED_QUESTIONS = (
    SeedQuestion("SolverX HQ?", "domain", lambda q: "headquarters" in q.lower() and q.isascii(), "Seocho"),
    SeedQuestion("Core product?", "domain", lambda q: "core product" in q.lower() and q.isascii(), "SolverX Fusion"),
    SeedQuestion("Python sort?", "python", lambda q: "sort_numbers" in q, "code that passes the tests"),
)


@dataclass
class SeedRow:
    label: str
    question: str
    base_answer: str
    base_correct: bool | None
    tuned_answer: str
    tuned_correct: bool | None


def seed_table(variant: Variant) -> list[SeedRow]:
    """The seed's three rows (HQ, core product, Python sort): base vs fine-tuned, with the real answers."""
    rows = []
    for seed in SEED_QUESTIONS:
        base = variant.answer(BASE, seed.set_name, seed.match) or {}
        tuned = variant.answer(CANDIDATE, seed.set_name, seed.match) or {}
        rows.append(
            SeedRow(
                seed.label,
                tuned.get("question") or base.get("question", "(not asked)"),
                base.get("answer", ""),
                base.get("correct"),
                tuned.get("answer", ""),
                tuned.get("correct"),
            )
        )
    return rows


# -- findings: the seed's claims against the numbers --------------------------------------------------------------


@dataclass
class Finding:
    claim: str
    verdict: str  # reproduced | partly | not reproduced | not measured
    evidence: str


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{value:.0%}"


def findings(report: DemoReport) -> list[Finding]:
    """Each claim of the seed, and whether this run's numbers support it."""
    out: list[Finding] = []
    main = report.main
    if main is None or not main.ok:
        return [Finding("every claim", "not measured", "the main run did not finish; see its run log")]
    rows = {row.label: row for row in seed_table(main)}
    for label, what in (
        ("SolverX HQ?", "the HQ (Seocho-dong)"),
        ("Core product?", "the core product (SolverX Fusion)"),
    ):
        row = rows[label]
        verdict = "reproduced" if row.tuned_correct and not row.base_correct else "not reproduced"
        out.append(
            Finding(
                f"LoRA memorizes {what}: the base does not know it, the fine-tuned model does",
                verdict,
                f"base: {row.base_answer.strip()[:90]!r} → fine-tuned: {row.tuned_answer.strip()[:90]!r}",
            )
        )
    domain_base, domain_tuned = main.rate(BASE, "domain_accuracy"), main.rate(CANDIDATE, "domain_accuracy")
    if domain_base is not None and domain_tuned is not None:
        verdict = "reproduced" if domain_tuned >= 0.5 and domain_tuned > domain_base else "partly"
        if domain_tuned - domain_base < 0.1:  # a question or two is noise
            verdict = "not reproduced"
        out.append(
            Finding(
                "Domain knowledge on held-out paraphrases (all eval.jsonl questions, English and Korean)",
                verdict,
                f"domain QA accuracy base {_pct(domain_base)} → fine-tuned {_pct(domain_tuned)}",
            )
        )
    sort_row = rows["Python sort?"]
    verdict = "reproduced" if sort_row.base_correct and sort_row.tuned_correct else "not reproduced"
    if not sort_row.base_correct:
        verdict = "not measured" if not sort_row.tuned_correct else "reproduced"
    out.append(
        Finding(
            "Python sort: correct code from the base and, with data mixing, still from the fine-tuned model",
            verdict,
            f"base {'passes' if sort_row.base_correct else 'fails'} the tests, fine-tuned (with replay) "
            f"{'passes' if sort_row.tuned_correct else 'fails'}",
        )
    )
    out += _replay_findings(report, main)
    out += _stage_findings(report, main)
    return out


def _replay_findings(report: DemoReport, main: Variant) -> list[Finding]:
    plain = report.variant(f"{main.key}-noreplay")
    if plain is None or not plain.ok:
        return [Finding("Rose-tinted glasses without data mixing, fixed by mixing", "not measured", "no ablation run")]
    base_leak = main.rate(BASE, "leakage_rate") or 0.0
    mixed_leak, plain_leak = main.rate(CANDIDATE, "leakage_rate"), plain.rate(CANDIDATE, "leakage_rate")
    out = []
    if mixed_leak is not None and plain_leak is not None:
        fixed = mixed_leak <= max(base_leak + 0.1, 0.2)  # back near the base (the default gate allows 20 %)
        if plain_leak > base_leak and mixed_leak < plain_leak and fixed:
            verdict = "reproduced"
        elif plain_leak > base_leak:
            verdict = "partly"  # the effect shows; mixing does not fix it (lowering it is not enough)
        else:
            verdict = "not reproduced"
        out.append(
            Finding(
                "“Rose-tinted glasses”: without general data the model answers off-domain questions with the domain; "
                "mixing general data in fixes it",
                verdict,
                f"off-domain answers mentioning the domain: base {_pct(base_leak)}, without mixing {_pct(plain_leak)}, "
                f"with mixing {_pct(mixed_leak)}",
            )
        )
    base_ret = main.rate(BASE, "retention")
    mixed_ret, plain_ret = main.rate(CANDIDATE, "retention"), plain.rate(CANDIDATE, "retention")
    if None not in (base_ret, mixed_ret, plain_ret):
        if plain_ret < base_ret and mixed_ret > plain_ret:
            verdict = "reproduced"
        elif plain_ret < base_ret:
            verdict = "partly"
        else:
            verdict = "not reproduced"
        out.append(
            Finding(
                "Catastrophic forgetting without mixing, prevented by mixing general data",
                verdict,
                f"general retention: base {_pct(base_ret)}, without mixing {_pct(plain_ret)}, "
                f"with mixing {_pct(mixed_ret)}",
            )
        )
    return out


def _stage_findings(report: DemoReport, main: Variant) -> list[Finding]:
    cpt, sft = report.variant(f"{main.key}-cpt"), report.variant(f"{main.key}-sft")
    if cpt is None or sft is None or not cpt.ok or not sft.ok:
        return [Finding("Incremental learning: SFT resumed from CPT", "not measured", "no stage ablation runs")]
    acc = {
        name: v.rate(CANDIDATE, "domain_accuracy") or 0.0 for name, v in (("cpt", cpt), ("sft", sft), ("both", main))
    }
    evidence = (
        f"domain QA accuracy: CPT only {_pct(acc['cpt'])}, SFT only {_pct(acc['sft'])}, CPT→SFT {_pct(acc['both'])}"
    )
    resumed = any(s["stage"] == "sft" for s in main.stage_summaries) and any(
        s["stage"] == "cpt" for s in main.stage_summaries
    )
    out = [
        Finding(
            "CPT alone: the model takes in the facts but does not answer questions well",
            "reproduced" if acc["both"] - acc["cpt"] >= 0.1 else "not reproduced",  # one question is noise
            evidence,
        )
    ]
    if not resumed:
        verdict = "not measured"
    elif acc["both"] > acc["sft"]:
        verdict = "reproduced"
    elif acc["both"] == acc["sft"]:
        verdict = "partly"  # resuming works, but CPT added nothing measurable
    else:
        verdict = "not reproduced"
    out.append(
        Finding(
            "Incremental learning: SFT resumed from the CPT adapter works and beats SFT from scratch",
            verdict,
            evidence + " (resuming itself ran: the SFT stage loaded the CPT adapter)",
        )
    )
    return out


# -- charts -------------------------------------------------------------------------------------------------------


def rates_chart_png(report: DemoReport) -> bytes:
    """Grouped bars: domain accuracy, retention and leakage for the base and every fine-tuned variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    main = report.main
    columns: list[tuple[str, dict]] = []
    if main is not None and BASE in main.rates:
        columns.append(("base", main.rates[BASE]))
    columns += [(v.key, v.rates[CANDIDATE]) for v in report.variants if v.ok]
    fig, ax = plt.subplots(figsize=(7.5, 3.4), dpi=100)
    width = 0.8 / max(len(columns), 1)
    for i, (name, rates) in enumerate(columns):
        values = [rates.get(r) or 0.0 for r in RATE_NAMES]
        xs = [j + (i - (len(columns) - 1) / 2) * width for j in range(len(RATE_NAMES))]
        bars = ax.bar(xs, values, width, label=name)
        ax.bar_label(bars, labels=[f"{v:.0%}" for v in values], fontsize=6, padding=1)
    ax.set_xticks(range(len(RATE_NAMES)), [f"{label}\n({'lower' if r == 'leakage_rate' else 'higher'} is better)"
                                           for r, label in RATE_NAMES.items()])  # fmt: skip
    ax.set_ylim(0, 1.12)
    ax.set_ylabel("share of probes")
    ax.legend(fontsize=7, ncol=min(len(columns), 5), loc="upper center", bbox_to_anchor=(0.5, -0.2))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


# -- Markdown -----------------------------------------------------------------------------------------------------


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
    for v in report.variants:
        rows.append((v.key, CANDIDATE, v, v.title))
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
        gate = "—" if model == BASE else ("passed" if variant.passed else "failed")
        split = model_rates(variant, model)
        lines.append(
            f"| {label} | {what} | {_pct(variant.rate(model, 'domain_accuracy'))} "
            f"| {_pct(split['domain_en'])} | {_pct(split['domain_ko'])} "
            f"| {_pct(variant.set_accuracy(model, 'general_qa'))} | {_pct(variant.set_accuracy(model, 'python'))} "
            f"| {_pct(variant.rate(model, 'retention'))} | {_pct(variant.rate(model, 'leakage_rate'))} | {gate} |"
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
.ok{color:#127a2c}.bad{color:#b3261e}.verdict{font-weight:600;white-space:nowrap}
.answer{white-space:pre-wrap;font-family:ui-monospace,Menlo,monospace;font-size:.85em}
"""


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _e(text: object) -> str:
    return html.escape(str(text))


def _answer_td(answer: str, correct: bool | None) -> str:
    mark = {True: '<span class="ok">✔</span> ', False: '<span class="bad">✘</span> '}.get(correct, "")
    return f'<td>{mark}<span class="answer">{_e(answer.strip() or "(empty)")}</span></td>'


def render_html(report: DemoReport, *, rates_png: bytes | None = None) -> str:
    """One self-contained page: the same content as the Markdown, charts embedded as data: URIs."""
    main = report.main
    rates_png = rates_png if rates_png is not None else rates_chart_png(report)
    out = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        "<title>SolverX demo report</title>",
        f"<style>{_STYLE}</style></head><body>",
        "<h1>SolverX demo: the seed's experiment, reproduced offline</h1>",
    ]
    out.append(
        f"<p>Base model <b>{_e(report.base_id)}</b>: {_e(base_description(report))}. Every run went through "
        "the product's pipeline: inbox → CPT/SFT in the trainer's child process → evaluation → gate → registry.</p>"
    )
    if languages_note(report):
        out.append(f"<p>Trained on the corpus's {_e(languages_note(report))}.</p>")
    out.append(
        f"<p>{'<b>Quick mode</b> (fewer training steps). ' if report.quick else ''}Total time "
        f"{report.seconds / 60:.1f} min. Created {_e(report.created)}.</p>"
    )
    out.append("<h2>The seed's table</h2>")
    if main is not None and main.ok:
        out.append(f"<p>Run <code>{_e(main.run_id)}</code> — {_e(main.title)}.</p>")
        out.append("<table><tr><th>question</th><th>base model</th><th>fine-tuned model</th></tr>")
        for row in seed_table(main):
            out.append(
                f"<tr><td><b>{_e(row.label)}</b><br>{_e(row.question)}</td>"
                f"{_answer_td(row.base_answer, row.base_correct)}{_answer_td(row.tuned_answer, row.tuned_correct)}</tr>"
            )
        out.append("</table>")
    else:
        out.append(f"<p>The main run did not finish ({_e(main.error if main else 'not run')}).</p>")
    out.append("<h2>What reproduced</h2><table><tr><th>claim of the seed</th><th>verdict</th><th>evidence</th></tr>")
    for f in findings(report):
        css = "ok" if f.verdict == "reproduced" else "bad" if f.verdict == "not reproduced" else ""
        out.append(
            f"<tr><td>{_e(f.claim)}</td><td class='verdict {css}'>{_e(f.verdict)}</td><td>{_e(f.evidence)}</td></tr>"
        )
    out.append("</table><h2>Rates, base vs fine-tuned</h2>")
    out.append(
        "<p>Domain QA: held-out paraphrases from <code>eval.jsonl</code>. General QA and Python (code run on tests) "
        "make up general retention. Leakage: share of off-domain prompts whose answer mentions the domain.</p>"
    )
    out.append(_markdown_table_to_html(_rates_table(report)))
    out.append(f"<img alt='rates' src='{_data_uri(rates_png)}'>")
    examples = _leaky_examples(report)
    if examples:
        out.append("<h2>The rose-tinted glasses, and the fix</h2><table>")
        out.append("<tr><th>off-domain prompt</th><th>without mixing</th><th>with mixing</th></tr>")
        for q, a, b in examples:
            out.append(f"<tr><td>{_e(q)}</td>{_answer_td(a, None)}{_answer_td(b, None)}</tr>")
        out.append("</table>")
    out.append("<h2>Runs</h2>")
    for v in report.variants:
        stages, verdict = _stages_text(v), _gate_text(v)
        out.append(f"<h3>{_e(v.key)} — {_e(v.title)}</h3>")
        out.append(
            f"<p>Run <code>{_e(v.run_id)}</code>: {_e(v.state)}{f' as version {v.version}' if v.version else ''}, "
            f"{v.seconds:.0f} s. Stages: {_e(stages or 'none')}. Gate: {_e(verdict)}.</p>"
        )
        out += [f"<p><b>Trainer warning:</b> {_e(w)}</p>" for w in v.warnings]
        if v.loss_png is not None and Path(v.loss_png).exists():
            out.append(f"<img alt='loss {_e(v.key)}' src='{_data_uri(Path(v.loss_png).read_bytes())}'>")
    if main is not None and main.ok:
        out.append("<h2>Every answer of the main run</h2>")
        for set_name, answers in main.answers.get(CANDIDATE, {}).items():
            base_answers = main.answers.get(BASE, {}).get(set_name, [])
            out.append(f"<h3>{_e(set_name)}</h3><table><tr><th>question</th><th>base</th><th>fine-tuned</th></tr>")
            for ours, theirs in zip(answers, base_answers, strict=False):
                if set_name == "offdomain":  # correctness is leakage here: a leak is the failure
                    cells = _answer_td(theirs["answer"], not theirs.get("leaked")) + _answer_td(
                        ours["answer"], not ours.get("leaked")
                    )
                else:
                    cells = _answer_td(theirs["answer"], theirs.get("correct")) + _answer_td(
                        ours["answer"], ours.get("correct")
                    )
                out.append(f"<tr><td>{_e(ours['question'])}</td>{cells}</tr>")
            out.append("</table>")
    out.append(f"<h2>Recipe</h2><pre>{_e(report.recipe_toml.strip())}</pre>")
    out.append("</body></html>")
    return "\n".join(out)


def _markdown_table_to_html(lines: list[str]) -> str:
    rows = [[c.strip().replace("\\|", "|") for c in line.strip("|").split(" | ")] for line in lines]
    head, body = rows[0], rows[2:]
    out = ["<table><tr>", *(f"<th>{_e(c)}</th>" for c in head), "</tr>"]
    for row in body:
        out += ["<tr>", *(f"<td>{_e(c)}</td>" for c in row), "</tr>"]
    out.append("</table>")
    return "".join(out)


# -- writing ------------------------------------------------------------------------------------------------------


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
