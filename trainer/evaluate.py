"""Evaluate base, promoted and candidate side by side, and decide whether the candidate may be promoted.

Three measures, all at temperature 0:

- domain accuracy: held-out questions whose answer must contain one of the expected substrings;
- general retention: general probes (common-sense answers by substring, Python by *running* the returned code
  on test inputs in a subprocess), scored for the base too, so forgetting is measured, not hoped about;
- leakage ("rose-tinted glasses"): the share of off-domain prompts whose answer mentions the domain's terms.

Every question of every model is asked at once (:mod:`solverx.trainer.answers`): one engine with each request on
its own adapter slot, or in a distributed run every rank answering its share.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from solverx.adapters.names import GROUNDED_SUFFIX
from solverx.trainer.answers import Ask, Reply

CODE_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Probe:
    """One question; ``expected`` are alternatives (any one, case-insensitive), ``tests`` make it a code probe."""

    question: str
    expected: tuple[str, ...] = ()
    function: str | None = None
    tests: tuple[tuple[list, object], ...] = ()
    kind: str = "qa"  # qa | code | offdomain
    forbidden: tuple[str, ...] = ()  # offdomain: terms that must not appear (default: the domain's own terms)

    @classmethod
    def from_dict(cls, raw: dict, kind: str = "qa") -> Probe:
        expected = raw.get("expected", raw.get("answer", ()))
        if isinstance(expected, str):
            expected = (expected,)
        tests = tuple((list(t["args"]), t["expect"]) for t in raw.get("tests", ()))
        kind = raw.get("kind", "code" if tests else kind)
        forbidden = raw.get("forbidden", ())
        forbidden = (forbidden,) if isinstance(forbidden, str) else tuple(forbidden)
        return cls(raw["question"], tuple(expected), raw.get("function"), tests, kind, forbidden)


def load_probes(path: Path, kind: str = "qa") -> list[Probe]:
    """Probes from a JSONL file (one ``{"question", "expected" | "tests" + "function"}`` per line)."""
    lines = [line for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    return [Probe.from_dict(json.loads(line), kind) for line in lines]


@dataclass
class Answer:
    question: str
    answer: str
    correct: bool | None  # None for off-domain probes
    leaked: bool = False
    context: str | None = None  # the facts a grounded model was given first (None: none were retrieved)


@dataclass
class ModelScores:
    name: str
    domain_accuracy: float | None = None
    retention: float | None = None
    leakage_rate: float | None = None
    answers: dict[str, list[Answer]] = field(default_factory=dict)


@dataclass
class EvalReport:
    """What the gate decided and why, with every answer — the seed's table, base vs fine-tuned."""

    models: dict[str, ModelScores]
    domain_terms: list[str]
    passed: bool = False
    reasons: list[str] = field(default_factory=list)
    world_size: int = 1  # how many ranks trained the candidate
    hosts: list[str] = field(default_factory=list)  # their addresses, when more than one

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Thresholds:
    min_domain_accuracy: float = 0.5
    max_leakage_rate: float = 0.25
    max_retention_drop: float = 0.15  # candidate retention may trail the base's by at most this much
    max_grounded_leakage_increase: float = 0.0  # with grounding evaluated: how much it may raise the leakage rate


GROUNDED = GROUNDED_SUFFIX  # a model evaluated with its fact graph: "candidate+facts", "base+facts"


def domain_terms(domain_texts: Iterable[str], general_texts: Iterable[str], limit: int = 20) -> list[str]:
    """Proper nouns frequent in the domain data and absent from general data: what a leaking answer mentions.

    Only capitalized Latin-script words qualify: Korean attaches endings to words, so ordinary Korean forms look
    "distinctive" against mostly-English general data. Korean domain terms belong in eval.jsonl leakage items.
    """
    word = re.compile(r"[A-Z][A-Za-z0-9-]{3,}")
    general = {w.lower() for text in general_texts for w in re.findall(r"[A-Za-z][A-Za-z0-9-]+", text)}
    counts = Counter(w for text in domain_texts for w in word.findall(text) if w.lower() not in general)
    return [w for w, n in counts.most_common() if n >= 2][:limit]


def mentions(answer: str, terms: Iterable[str]) -> bool:
    lowered = answer.lower()
    return any(term.lower() in lowered for term in terms)


def contains_expected(answer: str, expected: Iterable[str]) -> bool:
    lowered = answer.lower()
    return any(e.lower() in lowered for e in expected)


_CODE_BLOCK = re.compile(r"```(?:python|py)?\s*\n(.*?)```", re.S)

_HARNESS = """
import json, sys
namespace = {}
exec(compile(sys.stdin.read(), "<answer>", "exec"), namespace)
function = namespace.get(sys.argv[1]) or next(
    (v for k, v in namespace.items() if callable(v) and not k.startswith("_")), None)
tests = json.loads(sys.argv[2])
ok = function is not None and all(function(*args) == expect for args, expect in tests)
print("PASS" if ok else "FAIL")
"""


def run_code_probe(answer: str, probe: Probe) -> bool:
    """Run the answer's code on the probe's tests in a separate, isolated Python with a timeout."""
    blocks = _CODE_BLOCK.findall(answer)
    code = blocks[0] if blocks else answer
    with tempfile.TemporaryDirectory() as scratch:
        try:
            done = subprocess.run(
                [sys.executable, "-I", "-c", _HARNESS, probe.function or "", json.dumps(probe.tests)],
                input=code,
                capture_output=True,
                text=True,
                timeout=CODE_TIMEOUT_S,
                cwd=scratch,
            )
        except subprocess.TimeoutExpired:
            return False
    return done.stdout.strip().endswith("PASS")


def _run_code_probes(answers: dict[str, dict[str, str]], probe_sets: dict[str, list[Probe]]) -> dict[tuple, bool]:
    """Every model's code answers run at once (each in its own Python; the same answer to the same probe once)."""
    jobs = {(a[p.question], p.question): p for a in answers.values() for ps in probe_sets.values() for p in ps
            if p.kind == "code"}  # fmt: skip
    if not jobs:
        return {}
    with ThreadPoolExecutor(max_workers=2 * (os.cpu_count() or 1)) as pool:
        verdicts = {key: pool.submit(run_code_probe, key[0], probe) for key, probe in jobs.items()}
        return {key: future.result() for key, future in verdicts.items()}


def _score_model(
    name: str,
    answers: dict[str, str],
    probe_sets: dict[str, list[Probe]],
    terms: list[str],
    code_verdicts: dict[tuple, bool],
) -> ModelScores:
    scores = ModelScores(name=name)
    for set_name, probes in probe_sets.items():
        scored = []
        for probe in probes:
            answer = answers[probe.question]
            if probe.kind == "offdomain":
                leaked = mentions(answer, probe.forbidden or terms)
                scored.append(Answer(probe.question, answer, None, leaked=leaked))
            elif probe.kind == "code":
                scored.append(Answer(probe.question, answer, code_verdicts[answer, probe.question]))
            else:
                scored.append(Answer(probe.question, answer, contains_expected(answer, probe.expected)))
        scores.answers[set_name] = scored

    def rate(set_names: Iterable[str], attr: str) -> float | None:
        items = [a for s in set_names for a in scores.answers.get(s, [])]
        return sum(bool(getattr(a, attr)) for a in items) / len(items) if items else None

    scores.domain_accuracy = rate(["domain"], "correct")
    scores.retention = rate([s for s in probe_sets if s not in ("domain", "offdomain")], "correct")
    scores.leakage_rate = rate(["offdomain"], "leaked")
    return scores


def evaluate_models(
    models: dict[str, Path | None],
    probe_sets: dict[str, list[Probe]],
    terms: list[str],
    answer: Callable[[list[Ask]], list[Reply]],
    base_answers: Path | None = None,
    grounding: dict[str, Callable[[str], str | None]] | None = None,
) -> dict[str, ModelScores]:
    """Score every named model (adapter directory, ``None`` = the base) on every probe set.

    ``answer`` gives the greedy answers of (question, adapter, context) asks, all asked at once (one engine, or
    every rank). ``base_answers`` is a JSON file of the base's answers by question (greedy, so they never change
    for one base and answer length): read first, and whatever had to be asked is added, so later runs ask the base
    nothing. ``grounding`` gives some models a context per question (the facts retrieved for it); where it gives
    none, the prompt is the plain question, so the answer is the one the same adapter gives without grounding and is
    asked once. Scores are always computed afresh, since leakage depends on the inbox's terms.
    """
    known: dict[str, str] = {}
    if base_answers is not None and base_answers.is_file():
        with contextlib.suppress(ValueError):
            known = dict(json.loads(base_answers.read_text(encoding="utf-8")))
    questions = list(dict.fromkeys(p.question for probes in probe_sets.values() for p in probes))
    plan: dict[tuple[str, str], Ask] = {}
    for name, adapter in models.items():
        context_for = (grounding or {}).get(name)
        for question in questions:
            plan[name, question] = Ask(question, adapter, context_for(question) if context_for else None)
    asks = list(dict.fromkeys(a for a in plan.values() if a.adapter or a.context or a.question not in known))
    replies = dict(zip(asks, [text for text, _ in answer(asks)], strict=True))
    answers = {
        name: {q: replies[plan[name, q]] if plan[name, q] in replies else known[q] for q in questions}
        for name in models
    }
    if base_answers is not None and None in models.values():
        base = known | {q: replies[Ask(q)] for q in questions if Ask(q) in replies}
        base_answers.parent.mkdir(parents=True, exist_ok=True)
        partial = base_answers.with_name(f".{base_answers.name}.{os.getpid()}.partial")
        partial.write_text(json.dumps(base, indent=0, ensure_ascii=False), encoding="utf-8")
        os.replace(partial, base_answers)
    verdicts = _run_code_probes(answers, probe_sets)
    scores = {name: _score_model(name, answers[name], probe_sets, terms, verdicts) for name in models}
    for name in grounding or {}:
        for answered in (a for answers_of_set in scores[name].answers.values() for a in answers_of_set):
            answered.context = plan[name, answered.question].context
    return scores


def gate(report: EvalReport, candidate: str, thresholds: Thresholds, base: str = "base") -> EvalReport:
    """Fill in ``passed`` and ``reasons``: the candidate must know the domain, keep general skills, not leak."""
    cand, ref = report.models[candidate], report.models[base]
    reasons = []
    if cand.domain_accuracy is not None and cand.domain_accuracy < thresholds.min_domain_accuracy:
        reasons.append(f"domain accuracy {cand.domain_accuracy:.0%} < {thresholds.min_domain_accuracy:.0%}")
    if cand.leakage_rate is not None and cand.leakage_rate > thresholds.max_leakage_rate:
        reasons.append(f"leakage {cand.leakage_rate:.0%} > {thresholds.max_leakage_rate:.0%}")
    if (
        cand.retention is not None
        and ref.retention is not None
        and cand.retention < ref.retention - thresholds.max_retention_drop
    ):
        reasons.append(
            f"general retention {cand.retention:.0%} fell more than {thresholds.max_retention_drop:.0%} "
            f"below the base's {ref.retention:.0%}"
        )
    grounded = report.models.get(candidate + GROUNDED)
    raised = (
        grounded is not None
        and grounded.leakage_rate is not None
        and cand.leakage_rate is not None
        and grounded.leakage_rate > cand.leakage_rate + thresholds.max_grounded_leakage_increase
    )
    if raised:
        reasons.append(
            f"grounding raised leakage to {grounded.leakage_rate:.0%} from {cand.leakage_rate:.0%} "
            f"(allowed: +{thresholds.max_grounded_leakage_increase:.0%})"
        )
    report.passed = not reasons
    report.reasons = reasons
    return report


def report_markdown(report: EvalReport, candidate: str, base: str = "base") -> str:
    """The seed's table — question | base | fine-tuned — and the three rates for every model."""

    def cell(text: str) -> str:
        return text.strip().replace("|", "\\|").replace("\n", " ")[:160] or "(empty)"

    def pct(value: float | None) -> str:
        return "—" if value is None else f"{value:.0%}"

    lines = [f"# Evaluation: {candidate}", "", f"**Gate: {'passed' if report.passed else 'failed'}**"]
    lines += [f"- {reason}" for reason in report.reasons]
    lines += ["", "| model | domain accuracy | general retention | leakage |", "|---|---|---|---|"]
    for name, scores in report.models.items():
        lines.append(
            f"| {name} | {pct(scores.domain_accuracy)} | {pct(scores.retention)} | {pct(scores.leakage_rate)} |"
        )
    base_scores, cand_scores = report.models[base], report.models[candidate]
    for set_name, answers in cand_scores.answers.items():
        lines += ["", f"## {set_name}", "", f"| question | {base} | {candidate} |", "|---|---|---|"]
        for ours, theirs in zip(answers, base_scores.answers.get(set_name, []), strict=False):
            lines.append(f"| {cell(ours.question)} | {cell(theirs.answer)} | {cell(ours.answer)} |")
    return "\n".join(lines) + "\n"
