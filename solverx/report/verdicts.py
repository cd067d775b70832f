"""The verdicts: the seed's three-row table and each claim of the seed against the runs' numbers.

Every verdict is a plain comparison of measured numbers, so a claim that does not hold at this scale is reported
as not reproduced.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from solverx.report.model import BASE, CANDIDATE, DemoReport, Variant, percent


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
                f"domain QA accuracy base {percent(domain_base)} → fine-tuned {percent(domain_tuned)}",
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
                f"off-domain answers mentioning the domain: base {percent(base_leak)}, "
                f"without mixing {percent(plain_leak)}, with mixing {percent(mixed_leak)}",
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
                f"general retention: base {percent(base_ret)}, without mixing {percent(plain_ret)}, "
                f"with mixing {percent(mixed_ret)}",
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
        f"domain QA accuracy: CPT only {percent(acc['cpt'])}, SFT only {percent(acc['sft'])}, "
        f"CPT→SFT {percent(acc['both'])}"
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
