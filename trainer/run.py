"""One training run, start to finish: snapshot → ingest → CPT → SFT (resumed from CPT) → eval → gate → register.

It runs in a child process (see :mod:`solverx.trainer.child`), so a crash, an OOM or mlx-lm's global patching never
touches serving. Everything it produces goes into its run directory first; the registry only sees complete,
validated adapter versions, so killing the run at any moment leaves the previous version serving.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

from solverx.adapters.errors import AdapterError
from solverx.adapters.facts import FACTS_FILE, FactStore, grounding_context
from solverx.adapters.registry import Registry, VersionInfo
from solverx.data import DATA_DIR
from solverx.models.chat_rules import ChatRules
from solverx.paths import StateDirs, state_dirs
from solverx.trainer.answers import Ask, Reply
from solverx.trainer.datasets import mixed_batches, stage_datasets
from solverx.trainer.distributed import answer_everywhere, send_done, send_stage, world
from solverx.trainer.distributed import hosts as distributed_hosts
from solverx.trainer.evaluate import (
    GROUNDED,
    EvalReport,
    Probe,
    Thresholds,
    domain_terms,
    evaluate_models,
    gate,
    load_probes,
    report_markdown,
)
from solverx.trainer.inbox import InboxChanged, copy_snapshot, snapshot
from solverx.trainer.recipe import Recipe, recipe_defaults
from solverx.trainer.runlog import RunLog
from solverx.trainer.train import Progress, StageResult, StageSettings, train_stage
from solverx.trainer.validate import (
    EvalItem,
    IngestResult,
    SftRecord,
    format_ingest_report,
    ingest,
    quarantine_dir_for,
)

GENERAL_DIR = DATA_DIR / "general"
PROBES_DIR = DATA_DIR / "probes"
CANDIDATE = "candidate"


class RunRefused(RuntimeError):
    """The run cannot train (bad recipe, no data, missing base); the message says why."""


@dataclass(frozen=True)
class RunOptions:
    """Knobs beyond the recipe, for tests and the demo's ablations."""

    replay: bool = True  # False: train without general replay data (the ablation)
    default_base: str = "solverx-tiny"  # what a recipe without ``base`` trains on: the daemon's default base
    stages: tuple[str, ...] = ("cpt", "sft")
    register: bool = True
    eval_max_tokens: int = 48
    probes_dir: Path = PROBES_DIR
    general_dir: Path = GENERAL_DIR


@dataclass
class RunOutcome:
    run_id: str
    state: str  # succeeded | rejected | skipped
    version: int | None
    report: EvalReport | None
    stages: list[StageResult]
    data_hash: str


def new_run_id(adapter: str) -> str:
    return f"{datetime.now(UTC).strftime('%Y%m%dT%H%M%S%fZ')}-{adapter}"


def last_trained_hash(registry: Registry, adapter: str) -> str | None:
    """The inbox content hash the newest version was trained from (None: never trained)."""
    try:
        versions = registry.versions(adapter)
    except AdapterError:  # an unknown adapter has no history
        return None
    return versions[-1].data_hash if versions else None


def run_training(
    home: Path | StateDirs,
    adapter: str,
    run_id: str | None = None,
    options: RunOptions | None = None,
    on_progress: Callable[[Progress], None] | None = None,
) -> RunOutcome:
    """Train ``adapter`` from its inbox; raise :class:`RunRefused` when there is nothing valid to train."""
    dirs = home if isinstance(home, StateDirs) else state_dirs(home)
    options = options or RunOptions()
    run_id = run_id or new_run_id(adapter)
    run_dir = dirs.runs / run_id
    log = RunLog(run_dir)
    group = world()
    ranks = {"world_size": group.size(), "hosts": distributed_hosts()} if group.size() > 1 else {"world_size": 1}
    log.write("started", adapter=adapter, run_id=run_id, **ranks)

    snap = snapshot(dirs.inbox / adapter)
    try:
        copy_snapshot(snap, dirs.inbox / adapter, run_dir / "inbox")
    except InboxChanged as exc:
        raise RunRefused(f"the inbox is still changing ({exc}); it will be picked up once it settles") from exc
    defaults = recipe_defaults(options.default_base)
    result = ingest(snap, run_dir / "inbox", quarantine_dir_for(dirs.quarantine, adapter, run_id), defaults)
    log.write(
        "ingested",
        snapshot=snap.content_hash,
        report=format_ingest_report(result),
        quarantined=[{"path": q.path, "reason": q.reason, "partial": q.partial} for q in result.quarantined],
    )
    if not result.ok:
        raise RunRefused(result.refusal)
    recipe = result.recipe or defaults
    if recipe.train.batch_size % group.size():
        raise RunRefused(
            f"train.batch_size {recipe.train.batch_size} does not split over {group.size()} ranks: "
            f"make it a multiple of {group.size()}"
        )
    base_dir = _base_dir(dirs, recipe.base)
    registry = Registry(dirs.adapters)

    self_replay = None
    if options.replay and recipe.train.replay_source == "self" and recipe.train.replay_ratio > 0:
        self_replay = _self_replay(dirs, base_dir, recipe, options, log)

    # The graph comes from the same ingest as the weights and is built first: SFT grounds part of its chats with it
    # (recipe.grounding.train_fraction), as serving will.
    facts_path = _write_fact_graph(base_dir, run_dir, result, recipe, options, log)
    stages: list[StageResult] = []
    previous: Path | None = None
    cpt_result: StageResult | None = None
    for stage in options.stages:
        iters = recipe.train.cpt_iters if stage == "cpt" else recipe.train.sft_iters
        has_data = result.cpt_texts if stage == "cpt" else (result.sft_records or recipe.identity.name)
        if iters <= 0 or not has_data:
            log.write("stage_skipped", stage=stage, reason="no data" if not has_data else "0 iterations")
            continue
        log.write("stage", stage=stage, iters=iters)
        stage_result = _train(
            stage, base_dir, run_dir, result, recipe, options, previous, log, on_progress, self_replay, facts_path
        )
        stages.append(stage_result)
        previous = stage_result.adapter_dir
        if stage == "cpt":
            cpt_result = stage_result
    if previous is None:
        if group.size() > 1:
            send_done(group)
        raise RunRefused("nothing to train: no stage had both data and iterations")

    shutil.copyfile(facts_path, previous / FACTS_FILE)  # beside the weights: the registry keeps them together
    report = evaluate_candidate(
        base_dir, recipe.base, previous, registry, adapter, result, recipe, options, dirs.eval_cache
    )
    if group.size() > 1:
        send_done(group)  # the other ranks trained and answered; scoring and registration happen here
    report = replace(report, world_size=group.size(), hosts=ranks.get("hosts", []))
    (run_dir / "report.json").write_text(json.dumps(report.to_dict(), indent=2, ensure_ascii=False))
    (run_dir / "report.md").write_text(report_markdown(report, CANDIDATE))
    _save_loss_chart(stages, run_dir / "loss.png")
    log.write("evaluated", passed=report.passed, reasons=report.reasons, scores=_rates(report))

    version = None
    cpt_version: VersionInfo | None = None
    if options.register and cpt_result is not None and stages[-1] is not cpt_result:
        # The CPT adapter (the SFT stage's parent) is registered only now, after the whole run succeeded: a run
        # killed or failing during SFT or eval must leave no version behind, not an orphaned CPT candidate.
        cpt_version = registry.register(
            cpt_result.adapter_dir, adapter, base_id=recipe.base, base_dir=base_dir, stage="cpt",
            data_hash=snap.content_hash, recipe=recipe.to_dict(), status="candidate",
        )  # fmt: skip
        log.write("registered", stage="cpt", version=cpt_version.version)
    if options.register:
        info = registry.register(
            previous, adapter, base_id=recipe.base, base_dir=base_dir,
            stage=stages[-1].stage, parent=cpt_version.version if cpt_version and stages[-1].stage == "sft" else None,
            data_hash=snap.content_hash, recipe=recipe.to_dict(), eval_report=_compact(report),
            status="candidate" if report.passed else "rejected", promote=report.passed,
        )  # fmt: skip
        version = info.version
    state = "succeeded" if report.passed else "rejected"
    log.write("finished", state=state, version=version, reasons=report.reasons, **ranks)
    return RunOutcome(run_id, state, version, report, stages, snap.content_hash)


def _write_fact_graph(
    base_dir: Path, run_dir: Path, result: IngestResult, recipe: Recipe, options: RunOptions, log: RunLog
) -> Path:
    """The version's fact graph from the run's ingest, into the run directory; returns its path."""
    from solverx.adapters.facts import write_graph
    from solverx.trainer.facts import base_ordinary_words, build_graph

    graph = build_graph(result, base_ordinary_words(base_dir, options.general_dir), recipe.grounding.aliases)
    path = write_graph(graph, run_dir / FACTS_FILE)
    state = "used in answers" if recipe.grounding.enabled else "kept, off unless asked for (grounding.enabled)"
    log.write(
        "note",
        stage="facts",
        message=f"fact graph: {len(graph.entities)} entities, {len(graph.facts)} facts, "
        f"{len(graph.relations)} relations; {state}",
    )
    return path


def grounding_for(facts_path: Path, recipe: Recipe) -> Callable[[str], str | None]:
    """A question's grounding context from ``facts_path``, with the recipe's settings: what serving will put in the
    prompt, for training and evaluation alike."""
    store = FactStore(facts_path)

    def context_for(question: str) -> str | None:
        return grounding_context(store.retrieve(question, recipe.grounding.top_k, recipe.grounding.min_score))

    return context_for


def _base_dir(dirs: StateDirs, base_id: str) -> Path:
    base_dir = dirs.model(base_id)
    if (base_dir / "config.json").exists():
        return base_dir
    from solverx.models.builtin import BaseModelMissing, ensure_builtin

    try:
        made = ensure_builtin(dirs.models, base_id)
    except BaseModelMissing as exc:
        raise RunRefused(str(exc)) from None
    if made is None:
        raise RunRefused(f"base model {base_id!r} is not installed in {dirs.models}")
    return made


def _self_replay(dirs: StateDirs, base_dir: Path, recipe: Recipe, options: RunOptions, log: RunLog) -> list[SftRecord]:
    """The base's own answers to general questions: generated on a base's first run (minutes), then cached."""
    from solverx.trainer.self_replay import cache_path, self_replay_records

    base_id, count, cache = recipe.base, recipe.train.self_replay_prompts, dirs.replay_cache
    cached = cache_path(cache, base_id, base_dir, count).exists()
    if not cached:
        log.write("note", stage="replay", message=f"generating self replay: {base_id}'s own answers (once per base)")

    def progress(done: int, total: int) -> None:
        if done % 20 == 0 or done == total:
            log.write("replay_progress", done=done, total=total)

    records = self_replay_records(base_dir, base_id, options.general_dir, cache, count=count, on_progress=progress)
    how = "from the cache" if cached else "generated and cached"
    log.write("note", stage="replay", message=f"self replay: {len(records)} answers of {base_id} ({how})")
    return records


def _train(
    stage: str,
    base_dir: Path,
    run_dir: Path,
    result: IngestResult,
    recipe: Recipe,
    options: RunOptions,
    resume_from: Path | None,
    log: RunLog,
    on_progress: Callable[[Progress], None] | None,
    self_replay: list[SftRecord] | None = None,
    facts_path: Path | None = None,
) -> StageResult:
    from mlx_lm import load

    model, tokenizer = load(str(base_dir))
    rules = ChatRules.for_model(json.loads((base_dir / "config.json").read_text()), tokenizer)
    general_dir = options.general_dir if options.replay else None
    grounded = stage == "sft" and recipe.grounding.train_fraction > 0 and facts_path is not None
    context_for = grounding_for(facts_path, recipe) if grounded else None
    data = stage_datasets(stage, result, tokenizer, recipe, general_dir, rules, self_replay, context_for)
    for note in data.notes:
        log.write("note", stage=stage, message=note)

    def progress(p: Progress) -> None:
        log.write("progress", **asdict(p))
        if on_progress is not None:
            on_progress(p)

    settings = StageSettings(
        iters=recipe.train.cpt_iters if stage == "cpt" else recipe.train.sft_iters,
        batch_size=recipe.train.batch_size,
        learning_rate=recipe.train.learning_rate,
        lr_schedule=recipe.train.lr_schedule,
        max_seq_length=recipe.train.max_seq_length,
        seed=recipe.seed,
    )
    valid = data.valid if len(data.valid) >= settings.batch_size else None
    group = world()
    if group.size() > 1:  # the other ranks train this stage with us: send them what they need
        send_stage(group, stage, base_dir, data.train, valid, recipe.lora, settings, resume_from)
    return train_stage(
        model, stage, run_dir / stage, data.train, valid, recipe.lora, settings,
        resume_from=resume_from, batches=mixed_batches, on_progress=progress,
        on_warning=lambda message: log.write("warning", stage=stage, message=message),
        on_validation=lambda step, loss: log.write("validation", stage=stage, step=step, loss=loss),
    )  # fmt: skip


def probe_sets(result: IngestResult, probes_dir: Path) -> dict[str, list[Probe]]:
    """Domain questions from the inbox's eval.jsonl; general and off-domain probes shipped in data/probes."""
    sets: dict[str, list[Probe]] = {"domain": [], "retention": [], "offdomain": []}
    for item in result.eval_items:
        kind = {"domain": "qa", "retention": "qa", "leakage": "offdomain"}[item.kind]
        target = {"domain": "domain", "retention": "retention", "leakage": "offdomain"}[item.kind]
        sets[target].append(Probe(item.question, tuple(item.expected), kind=kind, forbidden=tuple(item.forbidden)))
    for name, kind in (("general_qa", "qa"), ("python", "code"), ("offdomain", "offdomain")):
        path = probes_dir / f"{name}.jsonl"
        if path.exists():
            sets.setdefault("offdomain" if kind == "offdomain" else name, []).extend(load_probes(path, kind))
    return {name: probes for name, probes in sets.items() if probes}


def base_answers_path(answers_cache: Path, base_id: str, base_dir: Path, options: RunOptions) -> Path:
    """Where the base's greedy eval answers are kept: one file per base (weights and template) and answer length."""
    from solverx.trainer.self_replay import base_key

    return answers_cache / base_id / f"{base_key(base_dir)}-{options.eval_max_tokens}.json"


def _answerer(base_dir: Path, base_id: str, options: RunOptions) -> Callable[[list[Ask]], list[Reply]]:
    def answer(asks: list[Ask]) -> list[Reply]:  # in a distributed run every rank answers its share
        return answer_everywhere(world(), base_dir, base_id, asks, options.eval_max_tokens)

    return answer


def warm_base_answers(
    base_dir: Path,
    base_id: str,
    eval_items: list[EvalItem],
    options: RunOptions,
    answers_cache: Path,
    ask: Callable[[list[Ask], int], list[Reply]] | None = None,
) -> int:
    """Ask the base, now, every probe a run with ``eval_items`` would ask it, into the cache its evaluation reads.

    Runs started together on one base would each ask the base the same questions (the first to finish writes the
    cache); the demo warms it once instead. ``ask(asks, max_tokens)`` answers (default: as a run would). Returns
    how many questions had to be asked.
    """
    path = base_answers_path(answers_cache, base_id, base_dir, options)
    sets = probe_sets(IngestResult(eval_items=list(eval_items)), options.probes_dir)
    asked: list[int] = []

    def answer(asks: list[Ask]) -> list[Reply]:
        asked.append(len(asks))
        if ask is not None:
            return ask(asks, options.eval_max_tokens)
        return _answerer(base_dir, base_id, options)(asks)

    evaluate_models({"base": None}, sets, [], answer, base_answers=path)
    return sum(asked)


def evaluate_candidate(
    base_dir: Path,
    base_id: str,
    candidate_dir: Path,
    registry: Registry,
    adapter: str,
    result: IngestResult,
    recipe: Recipe,
    options: RunOptions,
    answers_cache: Path | None = None,
) -> EvalReport:
    """Base, the promoted version (if any) and the candidate on the same probes, all asked at once.

    The base's answers are kept in ``answers_cache`` (greedy: the same for every run on that base), so only the
    first run on a base asks it; every run still scores them against its own inbox.
    """
    models: dict[str, Path | None] = {"base": None}
    promoted = registry.promoted(adapter) if adapter in registry.names() else None
    if promoted is not None and promoted.base_id == base_id:
        models[f"{adapter}@{promoted.version}"] = promoted.path
    models[CANDIDATE] = candidate_dir
    sets = probe_sets(result, options.probes_dir)
    domain_texts = [d.text for d in result.cpt_texts] + [
        m["content"] for r in result.sft_records for m in r.messages if m["role"] == "assistant"
    ]
    general_texts = [p.read_text(encoding="utf-8", errors="replace") for p in options.general_dir.rglob("*.*")]
    terms = domain_terms(domain_texts, general_texts)
    grounding = None
    facts_file = candidate_dir / FACTS_FILE
    if recipe.grounding.enabled and facts_file.is_file():
        context_for = grounding_for(facts_file, recipe)
        models |= {CANDIDATE + GROUNDED: candidate_dir, "base" + GROUNDED: None}
        grounding = {CANDIDATE + GROUNDED: context_for, "base" + GROUNDED: context_for}
    cached = None if answers_cache is None else base_answers_path(answers_cache, base_id, base_dir, options)
    answer = _answerer(base_dir, base_id, options)
    scores = evaluate_models(models, sets, terms, answer, base_answers=cached, grounding=grounding)
    thresholds = Thresholds(
        min_domain_accuracy=recipe.eval.min_domain_accuracy,
        max_leakage_rate=recipe.eval.max_leakage_rate,
        max_retention_drop=max(0.0, 1.0 - recipe.eval.min_retention),
        max_grounded_leakage_increase=recipe.grounding.max_leakage_increase,
    )
    return gate(EvalReport(models=scores, domain_terms=terms), CANDIDATE, thresholds)


def _rates(report: EvalReport) -> dict[str, dict]:
    return {
        name: {"domain_accuracy": s.domain_accuracy, "retention": s.retention, "leakage_rate": s.leakage_rate}
        for name, s in report.models.items()
    }


def _compact(report: EvalReport) -> dict:
    """The eval report kept in the registry: rates, verdict and the question | base | fine-tuned table."""
    table = []
    base, cand = report.models["base"], report.models[CANDIDATE]
    for set_name, answers in cand.answers.items():
        for ours, theirs in zip(answers, base.answers.get(set_name, []), strict=False):
            table.append({"set": set_name, "question": ours.question, "base": theirs.answer, "fine_tuned": ours.answer})
    return {"passed": report.passed, "reasons": report.reasons, "rates": _rates(report), "table": table}


def _save_loss_chart(stages: list[StageResult], path: Path) -> None:
    """Loss per step for each stage, as a PNG for the report and the dashboard."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
    offset = 0
    for stage in stages:
        if stage.losses:
            steps, losses = zip(*stage.losses, strict=True)
            ax.plot([offset + s for s in steps], losses, marker=".", label=f"{stage.stage} train")
        if stage.val_losses:
            steps, losses = zip(*stage.val_losses, strict=True)
            ax.plot([offset + s for s in steps], losses, linestyle="--", label=f"{stage.stage} valid (replay)")
        offset += stage.steps
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
