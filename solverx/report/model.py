"""What the demo report is made of: each run (:class:`Variant`), the whole demo (:class:`DemoReport`) and the rates
scripts read from ``report.json``."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from solverx.adapters.names import GROUNDED_SUFFIX

BASE = "base"
CANDIDATE = "candidate"
GROUNDED = GROUNDED_SUFFIX  # the same model answering with the version's fact graph in its prompt
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


def percent(value: float | None) -> str:
    """A rate as the report prints it: ``42%``, or ``—`` when it was not measured."""
    return "—" if value is None else f"{value:.0%}"


_HANGUL = re.compile("[\uac00-\ud7a3]")
_LETTER = re.compile(r"[^\W\d_]")


def language_of(text: str) -> str:
    """``"ko"`` when most letters of ``text`` are Hangul, else ``"en"`` (an English line may name 솔버엑스): how the
    demo splits the corpus and the report splits the domain questions."""
    letters = _LETTER.findall(text)
    return "ko" if letters and 2 * len(_HANGUL.findall(text)) > len(letters) else "en"


def model_rates(variant: Variant, model: str) -> dict[str, float | None]:
    """The report's rates (fractions 0-1): held-out domain questions in English and Korean apart, the general
    questions, the Python probes (code executed) and off-domain answers that mention the domain."""
    return {
        "domain_en": variant.share(model, "domain", "correct", lambda q: language_of(q) == "en"),
        "domain_ko": variant.share(model, "domain", "correct", lambda q: language_of(q) == "ko"),
        "general": variant.share(model, "general_qa", "correct"),
        "python": variant.share(model, "python", "correct"),
        "leakage": variant.share(model, "offdomain", "leaked"),
    }
