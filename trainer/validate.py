"""Ingest: read a run's inbox files, keep what is valid, quarantine the rest with a reason the user can act on.

Accepted files (suffixes are case-insensitive):

- ``*.txt``, ``*.md``, ``*.markdown`` — raw knowledge, UTF-8 text, trained by continual pre-training (CPT).
- ``*.jsonl`` — one JSON object per line (blank lines are skipped), each in one of these forms:

  - ``{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}`` — a chat: an optional system
    message first, then user and assistant turns alternating, starting with user and ending with assistant;
  - ``{"prompt": "...", "completion": "..."}`` or ``{"question": "...", "answer": "..."}`` — one Q&A pair,
    optionally with ``"system": "..."``;
  - ``{"text": "..."}`` — raw knowledge, like a .txt file.

  Chats and pairs are trained by supervised fine-tuning (SFT) and normalized to the messages form. Other keys on a
  line (ids, metadata) are ignored.
- ``eval.jsonl`` (in any folder) — held-out evaluation questions, never trained on. Each line:

  - ``{"question": "Where is SolverX's HQ?", "expected": ["Seocho", "서초"]}`` — a domain question; an answer passes
    if it contains any expected string (case-insensitive). ``"kind": "domain"`` is the default.
  - ``{"question": "...", "kind": "retention", "expected": [...]}`` — general knowledge the base already has.
  - ``{"question": "How do I sort a list in Python?", "kind": "leakage", "forbidden": ["SolverX"]}`` — an
    off-domain question; an answer passes if it contains none of the forbidden strings.

  ``expected``/``forbidden`` may be one string or a list of strings; ``"id"`` is allowed; other keys are errors.
- ``recipe.toml`` at the top of the adapter folder — training settings, see :mod:`solverx.trainer.recipe`.
- ``*.ttl`` (RDF Turtle), ``*.jsonld`` (JSON-LD) and ``*.csv`` (``subject,predicate,object`` triples) — an
  ontology: not trained on, it adds entities, aliases and relations to the version's fact graph
  (:mod:`solverx.trainer.ontology`). One that does not parse is quarantined with the parser's words.

Rejected (copied to ``<quarantine_dir>/<path>`` with ``<path>.reason`` beside it; the inbox is never touched):
unknown file types, empty files, binary files, text that is not UTF-8, files over :data:`MAX_FILE_BYTES` (not
copied, only the reason is written), and a bad ``recipe.toml``.

A JSONL file with bad lines (invalid JSON, wrong schema, a line over :data:`MAX_LINE_BYTES`): only the bad lines are
left out, and the file still trains on its good lines — one typo should not drop a thousand examples. The file is
copied to quarantine all the same, and its ``.reason`` lists every bad line by number and says how many lines were
used; the ingest report says so too. A file with no good line is rejected whole.

A bad recipe refuses the whole run (:attr:`IngestResult.refusal`): training with defaults the user did not ask for
would be worse than not training. So does an inbox with nothing left to train on.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from solverx.trainer.inbox import MAX_FILE_BYTES, InboxSnapshot
from solverx.trainer.ontology import ONTOLOGY_SUFFIXES, Ontology, OntologyError, parse_ontology
from solverx.trainer.recipe import RECIPE_FILE, Recipe, RecipeError, load_recipe

MAX_LINE_BYTES = 64 * 1024
TEXT_SUFFIXES = (".txt", ".md", ".markdown")
JSONL_SUFFIX = ".jsonl"
EVAL_FILE = "eval.jsonl"
EVAL_KINDS = ("domain", "retention", "leakage")
ROLES = ("system", "user", "assistant")
ACCEPTED_HINT = "accepted: .txt, .md, .jsonl, eval.jsonl, recipe.toml, and ontologies: .ttl, .jsonld, .csv"


@dataclass(frozen=True)
class TextDoc:
    """Raw knowledge for CPT; ``source`` is the inbox path (``path:line`` for a JSONL ``text`` line)."""

    source: str
    text: str


@dataclass(frozen=True)
class SftRecord:
    """One chat for SFT in messages form: optional system, then user/assistant alternating, ending with assistant."""

    source: str
    messages: list[dict[str, str]]


@dataclass(frozen=True)
class EvalItem:
    question: str
    kind: str = "domain"
    expected: list[str] = field(default_factory=list)
    forbidden: list[str] = field(default_factory=list)
    id: str | None = None
    source: str = ""


@dataclass(frozen=True)
class AcceptedFile:
    path: str
    kind: str  # "cpt", "sft", "eval", "ontology" or "recipe"
    items: int  # documents, records, eval items (1 for a recipe); characters are in ``chars``
    chars: int = 0


@dataclass(frozen=True)
class QuarantinedFile:
    path: str  # relative to the adapter folder
    reason: str
    kept_lines: int = 0  # > 0: only some lines were bad and the good ones are still used
    copy: Path | None = None  # the quarantined copy (None when the file was too large to copy)

    @property
    def partial(self) -> bool:
        return self.kept_lines > 0


@dataclass
class IngestResult:
    cpt_texts: list[TextDoc] = field(default_factory=list)
    sft_records: list[SftRecord] = field(default_factory=list)
    eval_items: list[EvalItem] = field(default_factory=list)
    ontologies: list[Ontology] = field(default_factory=list)
    recipe: Recipe | None = None
    quarantined: list[QuarantinedFile] = field(default_factory=list)
    accepted: list[AcceptedFile] = field(default_factory=list)
    refusal: str | None = None  # set: the run must not train, and this says why
    adapter: str = ""
    quarantine_dir: Path | None = None

    @property
    def ok(self) -> bool:
        return self.refusal is None

    def data_hash(self) -> str:
        """A hash of what would be trained and evaluated: equal hashes mean a retrain would learn nothing new."""
        payload = {
            "cpt": sorted(d.text for d in self.cpt_texts),
            "sft": sorted(json.dumps(r.messages, ensure_ascii=False) for r in self.sft_records),
            "eval": sorted(json.dumps(asdict(e) | {"source": ""}, ensure_ascii=False) for e in self.eval_items),
            "recipe": self.recipe.to_dict() if self.recipe else None,
        }
        if self.ontologies:  # only then, so an inbox without one keeps the hash it had before ontologies existed
            payload["ontology"] = sorted(
                json.dumps([o.names, [asdict(s) for s in o.statements]], sort_keys=True, ensure_ascii=False)
                for o in self.ontologies
            )
        return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


class LineError(ValueError):
    """One bad JSONL line; the message is shown to the user after ``line N:``."""


def quarantine_dir_for(quarantine_root: str | Path, adapter: str, run_id: str | None = None) -> Path:
    """``<quarantine>/<adapter>/<run-id>``, or a UTC timestamp when there is no run."""
    stamp = run_id or datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    return Path(quarantine_root) / adapter / stamp


def ingest(
    snap: InboxSnapshot,
    files_dir: str | Path,
    quarantine_dir: str | Path,
    defaults: Recipe | None = None,
    max_file_bytes: int = MAX_FILE_BYTES,
    max_line_bytes: int = MAX_LINE_BYTES,
) -> IngestResult:
    """Validate every file of ``snap``, read from ``files_dir`` (the run's copy, or the inbox folder itself).

    Files over ``max_file_bytes`` are judged by the size in the snapshot and never read. Quarantined copies and
    their reasons go under ``quarantine_dir``. The recipe is ``recipe.toml`` over ``defaults``.
    """
    files_dir, quarantine_dir = Path(files_dir), Path(quarantine_dir)
    result = IngestResult(adapter=snap.adapter, quarantine_dir=quarantine_dir)
    recipe: Recipe | None = defaults or Recipe()
    recipe_problem: str | None = None

    def reject(rel: str, reason: str, kept: int = 0, copy: bool = True) -> None:
        copied = _quarantine(files_dir / rel if copy else None, quarantine_dir, rel, reason, kept)
        result.quarantined.append(QuarantinedFile(rel, reason, kept, copied))

    for rel, reason in snap.refused:  # links and special files: recorded, never read or copied
        reject(rel, reason, copy=False)
    for f in snap.files:
        rel, name = f.path, f.path.rsplit("/", 1)[-1]
        suffix = ("." + name.rsplit(".", 1)[-1].lower()) if "." in name else ""
        if f.size > max_file_bytes:
            reject(rel, f"file is {f.size:,} bytes; the limit is {max_file_bytes:,} bytes (not copied)", copy=False)
            continue
        if name.lower() == RECIPE_FILE:
            if "/" in rel:
                reject(rel, "recipe.toml is only read at the top of the adapter folder")
                continue
            try:
                recipe = load_recipe(files_dir / rel, defaults)
                result.accepted.append(AcceptedFile(rel, "recipe", 1))
            except RecipeError as exc:
                recipe, recipe_problem = None, str(exc)
                reject(rel, f"invalid recipe, so the run was refused (defaults are not used instead):\n{exc}")
            continue
        if suffix not in (*TEXT_SUFFIXES, JSONL_SUFFIX, *ONTOLOGY_SUFFIXES):
            reject(rel, f"unknown file type {suffix or '(no extension)'!r} ({ACCEPTED_HINT})")
            continue

        data = (files_dir / rel).read_bytes()
        text, problem = _decode(data)
        if problem:
            reject(rel, problem)
            continue
        if suffix in TEXT_SUFFIXES:
            result.cpt_texts.append(TextDoc(rel, text))
            result.accepted.append(AcceptedFile(rel, "cpt", 1, len(text)))
            continue
        if suffix in ONTOLOGY_SUFFIXES:
            try:
                ontology = parse_ontology(text, suffix, rel)
            except OntologyError as exc:
                reject(rel, f"ontology not used: {exc}")
                continue
            result.ontologies.append(ontology)
            result.accepted.append(AcceptedFile(rel, "ontology", len(ontology.statements)))
            continue

        is_eval = name.lower() == EVAL_FILE
        parse = parse_eval_line if is_eval else parse_train_line
        items, bad, n_lines = [], [], 0
        for number, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            n_lines += 1
            try:
                if len(line.encode()) > max_line_bytes:
                    raise LineError(f"line is {len(line.encode()):,} bytes; the limit is {max_line_bytes:,} bytes")
                items.append(parse(line, f"{rel}:{number}"))
            except LineError as exc:
                bad.append(f"line {number}: {exc}")
        if not items:
            reject(rel, "no usable line:\n" + "\n".join(bad[:50]) + _more(bad, 50))
            continue
        if bad:
            reject(
                rel,
                f"{len(bad)} of {n_lines} lines are bad and were left out; the other {len(items)} are used:\n"
                + "\n".join(bad[:200])
                + _more(bad, 200),
                kept=len(items),
            )
        if is_eval:
            result.eval_items.extend(items)
            result.accepted.append(AcceptedFile(rel, "eval", len(items)))
        else:
            docs = [i for i in items if isinstance(i, TextDoc)]
            records = [i for i in items if isinstance(i, SftRecord)]
            result.cpt_texts.extend(docs)
            result.sft_records.extend(records)
            result.accepted.append(
                AcceptedFile(rel, "sft" if records else "cpt", len(items), sum(len(d.text) for d in docs))
            )

    result.recipe = recipe
    if recipe_problem is not None:
        result.refusal = (
            "recipe.toml is invalid, so this run did not start (the defaults are not used in its place):\n"
            + recipe_problem
        )
    elif not result.cpt_texts and not result.sft_records:
        result.refusal = "nothing to train: no usable knowledge text (.txt, .md) or Q&A/chat (.jsonl) in the inbox"
    return result


def format_ingest_report(result: IngestResult) -> str:
    """What was used, what was left out and why, and whether the run goes ahead — for the CLI and the run log."""
    lines = [
        f"Inbox {result.adapter!r}: {len(result.accepted)} file(s) used, "
        f"{sum(not q.partial for q in result.quarantined)} quarantined, "
        f"{sum(q.partial for q in result.quarantined)} used in part"
    ]
    partial = {q.path: q for q in result.quarantined if q.partial}
    for a in result.accepted:
        what = {
            "cpt": f"knowledge text (CPT), {a.chars:,} characters" if a.items == 1 else f"{a.items} texts (CPT)",
            "sft": f"{a.items} Q&A/chat records (SFT)",
            "eval": f"{a.items} eval questions (held out)",
            "ontology": f"ontology, {a.items} statements (fact graph)",
            "recipe": "training recipe",
        }[a.kind]
        if a.path in partial:
            q = partial[a.path]
            what += f" — {q.reason.splitlines()[0].split(';')[0]}, see {q.copy}.reason"
        lines.append(f"  used         {a.path}: {what}")
    for q in result.quarantined:
        if q.partial:
            continue
        first, *rest = q.reason.splitlines()
        lines.append(f"  quarantined  {q.path}: {first}")
        lines.extend(f"                 {r}" for r in rest[:10])
        if len(rest) > 10:
            lines.append(f"                 … see {q.copy or q.path}.reason")
    lines.append(
        f"  totals: {len(result.cpt_texts)} knowledge texts, {len(result.sft_records)} SFT records, "
        f"{len(result.eval_items)} eval questions"
    )
    if result.quarantine_dir is not None and result.quarantined:
        lines.append(f"  quarantine: {result.quarantine_dir}")
    lines.append(f"REFUSED: {result.refusal}" if result.refusal else "OK: training can start")
    return "\n".join(lines)


def _decode(data: bytes) -> tuple[str, str | None]:
    """UTF-8 text, or the reason it is not usable text."""
    if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
        return "", "UTF-16 text; save the file as UTF-8"
    if b"\0" in data:
        return "", "binary file (contains NUL bytes), not text"
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        return "", (
            f"not UTF-8 text (byte 0x{data[exc.start]:02x} at line {line}); "
            "save the file as UTF-8 (e.g. not CP949/EUC-KR or Latin-1)"
        )
    if not text.strip():
        return "", "empty file" if not data else "file holds only whitespace"
    return text.replace("\r\n", "\n"), None


def _load_object(line: str) -> dict[str, Any]:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise LineError(f"invalid JSON: {exc.msg} (column {exc.colno})") from None
    if not isinstance(obj, dict):
        raise LineError(f"expected a JSON object, got {type(obj).__name__}")
    return obj


def _nonempty_str(obj: dict[str, Any], key: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str):
        raise LineError(f"{key!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise LineError(f"{key!r} is empty")
    return value


def parse_train_line(line: str, source: str) -> TextDoc | SftRecord:
    """One training JSONL line as a chat or a text; :class:`LineError` says what is wrong with it."""
    obj = _load_object(line)
    forms = [k for k in ("messages", "prompt", "question", "text") if k in obj]
    if len(forms) > 1:
        raise LineError(f"ambiguous line: it has keys for more than one form ({', '.join(forms)})")
    system = [{"role": "system", "content": _nonempty_str(obj, "system")}] if "system" in obj else []
    if forms == ["messages"]:
        if system:
            raise LineError("'system' goes inside 'messages' as the first message")
        return SftRecord(source, _check_messages(obj["messages"]))
    if forms == ["prompt"] or forms == ["question"]:
        q_key, a_key = ("prompt", "completion") if forms == ["prompt"] else ("question", "answer")
        if a_key not in obj:
            raise LineError(f"has {q_key!r} but no {a_key!r}")
        user, assistant = _nonempty_str(obj, q_key), _nonempty_str(obj, a_key)
        return SftRecord(
            source, [*system, {"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
        )
    if forms == ["text"]:
        return TextDoc(source, _nonempty_str(obj, "text"))
    raise LineError(
        'no known form: expected {"messages": [...]}, {"prompt", "completion"}, {"question", "answer"} '
        f"or {{'text'}}; got keys {sorted(obj)}"
    )


def _check_messages(messages: Any) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise LineError("'messages' must be a non-empty list")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise LineError(f"messages[{i}] must be an object with 'role' and 'content'")
        role = message.get("role")
        if role not in ROLES:
            raise LineError(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {role!r}")
        content = message.get("content")
        if not isinstance(content, str) or not content.strip():
            raise LineError(f"messages[{i}].content must be a non-empty string")
        out.append({"role": role, "content": content})
    turns = out[1:] if out[0]["role"] == "system" else out
    for i, message in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if message["role"] != expected:
            index = i + len(out) - len(turns)
            raise LineError(
                f"messages[{index}] is {message['role']!r} but {expected!r} was expected "
                "(after an optional system message, user and assistant alternate, starting with user)"
            )
    if not turns or turns[-1]["role"] != "assistant":
        raise LineError("the last message must be from the assistant")
    return out


def _strings(obj: dict[str, Any], key: str) -> list[str]:
    value = obj.get(key, [])
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise LineError(f"{key!r} must be a string or a list of non-empty strings")
    return value


def parse_eval_line(line: str, source: str) -> EvalItem:
    """One eval.jsonl line; :class:`LineError` says what is wrong with it."""
    obj = _load_object(line)
    unknown = sorted(set(obj) - {"question", "kind", "expected", "forbidden", "id"})
    if unknown:
        raise LineError(f"unknown keys {unknown} (allowed: question, kind, expected, forbidden, id)")
    question = _nonempty_str(obj, "question")
    kind = obj.get("kind", "domain")
    if kind not in EVAL_KINDS:
        raise LineError(f"'kind' must be one of {', '.join(EVAL_KINDS)}, got {kind!r}")
    expected, forbidden = _strings(obj, "expected"), _strings(obj, "forbidden")
    if kind == "leakage" and not forbidden:
        raise LineError("a leakage question needs 'forbidden': strings the answer must not contain")
    if kind != "leakage" and not expected:
        raise LineError(f"a {kind} question needs 'expected': strings of which the answer must contain one")
    item_id = obj.get("id")
    if item_id is not None and not isinstance(item_id, str | int):
        raise LineError("'id' must be a string or a number")
    return EvalItem(question, kind, expected, forbidden, None if item_id is None else str(item_id), source)


def _quarantine(src: Path | None, quarantine_dir: Path, rel: str, reason: str, kept: int) -> Path | None:
    """Copy ``src`` to ``quarantine_dir/rel`` and write ``rel.reason`` beside it; returns the copy's path."""
    target = quarantine_dir / rel
    target.parent.mkdir(parents=True, exist_ok=True)
    copied = None
    if src is not None:
        shutil.copyfile(src, target)
        copied = target
    header = "partly used" if kept else "not used"
    target.with_name(target.name + ".reason").write_text(f"{rel}: {header}\n{reason}\n", encoding="utf-8")
    return copied


def _more(items: list[str], shown: int) -> str:
    return f"\n… and {len(items) - shown} more" if len(items) > shown else ""
