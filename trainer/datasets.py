"""Token sequences for training: CPT chunks, masked chat samples, identity, general replay, and the batch iterator.

Every sample is ``(tokens, offset)`` — mlx-lm's dataset contract: the loss covers the tokens from ``offset`` on.

- CPT (:func:`build_cpt_dataset`): each text is cut at line and sentence ends into chunks that fit
  ``max_seq_length`` with the base's own tokenizer (a sentence longer than a chunk is cut at word ends, a word longer
  than that at characters); consecutive chunks overlap by up to ``overlap_tokens`` of whole sentences so a fact cut at
  a chunk edge is still seen whole. ``offset`` is 0.
- SFT (:func:`build_sft_dataset`): chats are rendered with the base's chat template. Every assistant turn becomes
  one sample: the conversation up to and including that turn, with everything before the turn's reply masked
  (``offset`` = length of the prompt rendered with the generation prompt). So in a multi-turn chat every assistant
  turn is trained, each with the whole conversation before it as context, and no user or system text is.
  Templates without a system role (Gemma) get the system message folded into the first user turn.
- Identity (:func:`identity_records`): "Who are you?", "너는 누구야?" … answered with the recipe's name and maker.
- Replay (:func:`build_replay_dataset`): everything readable under ``data/general/`` — ``.jsonl`` lines in any SFT form
  (as masked chats) or ``{"text"}``, and ``.txt``/``.md``/``.py`` files (as CPT chunks).
- Mixing (:func:`mixed_batches`): a drop-in for ``mlx_lm.tuner.trainer.iterate_batches``; each *sequence* of a batch
  comes from the domain set or the replay set, so ratio 0.2 with batch 4 means about one replay sequence in most
  batches, not one replay batch in five (what mlx-lm's ConcatenatedDataset would give).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from solverx.models.chat_rules import ChatRules, last_user_text, with_context
from solverx.trainer.recipe import Identity, Recipe
from solverx.trainer.validate import IngestResult, LineError, SftRecord, TextDoc, parse_train_line

GENERAL_TEXT_SUFFIXES = (".txt", ".md", ".markdown", ".py")
PAD_TO = 32  # as mlx-lm: pad each batch to one plus a multiple of 32 so compiled shapes repeat
BUCKET_WINDOW = 32  # batches planned at once and sorted by length (see _mixed_stream)


@dataclass(frozen=True)
class Sample:
    tokens: list[int]
    offset: int  # tokens before this index are context only: no loss on them
    source: str  # inbox path, path:line, or "identity"
    kind: str  # "cpt", "sft", "identity" or "replay"


class SequenceDataset:
    """A list of samples that mlx-lm's ``train``/``evaluate`` and :func:`mixed_batches` can both read.

    ``notes`` says what was left out and why (a chat longer than ``max_seq_length``, a bad replay line).
    """

    def __init__(self, samples: Sequence[Sample] = (), notes: Sequence[str] = ()) -> None:
        self.samples = list(samples)
        self.notes = list(notes)

    def __getitem__(self, idx: int) -> tuple[list[int], int]:
        s = self.samples[idx]
        return s.tokens, s.offset

    def __len__(self) -> int:
        return len(self.samples)

    def __add__(self, other: SequenceDataset) -> SequenceDataset:
        return SequenceDataset(self.samples + other.samples, self.notes + other.notes)


@dataclass
class MixedDataset:
    """Domain samples with replay samples mixed in per sequence at ``ratio``; pass as ``train_dataset``."""

    domain: SequenceDataset
    replay: SequenceDataset | None = None
    ratio: float = 0.2
    seed: int = 0

    @property
    def effective_ratio(self) -> float:
        """The ratio actually used: 0 when there is no replay data."""
        return self.ratio if self.replay is not None and len(self.replay) > 0 else 0.0

    def __len__(self) -> int:
        """Sequences in one pass over the domain set with its share of replay."""
        return math.ceil(len(self.domain) / (1.0 - self.effective_ratio)) if len(self.domain) else 0


@dataclass
class StageData:
    """What one training stage needs: ``train(model, opt, data.train, data.valid or None, ..., mixed_batches)``."""

    train: MixedDataset
    valid: SequenceDataset
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------------------------
# Tokenizer helpers: work with an HF tokenizer or mlx-lm's TokenizerWrapper.


def _hf(tokenizer: Any) -> Any:
    """The HF tokenizer inside mlx-lm's TokenizerWrapper (an HF tokenizer's own ``_tokenizer`` is the Rust one)."""
    inner = getattr(tokenizer, "_tokenizer", None)
    return inner if hasattr(inner, "apply_chat_template") else tokenizer


def _count_tokens(tokenizer: Any, pieces: list[str]) -> list[int]:
    if not pieces:
        return []
    hf = _hf(tokenizer)
    try:
        return [len(ids) for ids in hf(pieces, add_special_tokens=False)["input_ids"]]
    except Exception:  # a tokenizer without batch calls: one at a time
        return [len(hf.encode(p, add_special_tokens=False)) for p in pieces]


def _encode_document(tokenizer: Any, text: str) -> list[int]:
    """Tokens of one CPT sequence: the tokenizer's own specials (BOS if it adds one) and a final EOS."""
    tokens = list(_hf(tokenizer).encode(text))
    eos = tokenizer.eos_token_id
    if eos is not None and (not tokens or tokens[-1] != eos):
        tokens.append(eos)
    return tokens


# ---------------------------------------------------------------------------------------------------------------------
# CPT


_SENTENCE_END = re.compile(r"(?<=[.!?。！？])(?=\s)")
_WORD_END = re.compile(r"(?<=\S)(?=\s)")


def _split_units(text: str, tokenizer: Any, budget: int) -> tuple[list[str], list[int]]:
    """Cut text into pieces of at most ``budget`` tokens whose concatenation is the text: lines, then sentences,
    then words, then characters, going finer only where a piece is still too long."""
    pieces = [s for line in text.splitlines(keepends=True) for s in _SENTENCE_END.split(line) if s]
    counts = _count_tokens(tokenizer, pieces)
    units: list[str] = []
    unit_counts: list[int] = []
    for piece, count in zip(pieces, counts, strict=True):
        if count <= budget:
            units.append(piece)
            unit_counts.append(count)
            continue
        words = [w for w in _WORD_END.split(piece) if w]
        for word, n in zip(words, _count_tokens(tokenizer, words), strict=True):
            parts = [word] if n <= budget else _split_characters(word, tokenizer, budget)
            units.extend(parts)
            unit_counts.extend([n] if n <= budget else _count_tokens(tokenizer, parts))
    return units, unit_counts


def _split_characters(word: str, tokenizer: Any, budget: int) -> list[str]:
    parts = []
    while word:
        lo, hi = 1, len(word)  # the longest prefix that fits, by bisection
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if _count_tokens(tokenizer, [word[:mid]])[0] <= budget:
                lo = mid
            else:
                hi = mid - 1
        parts.append(word[:lo])
        word = word[lo:]
    return parts


def chunk_text(text: str, tokenizer: Any, max_seq_length: int, overlap_tokens: int | None = None) -> list[list[int]]:
    """Token sequences (each ≤ ``max_seq_length``, EOS-terminated) covering ``text``, cut at sentence ends."""
    overlap = max_seq_length // 8 if overlap_tokens is None else overlap_tokens
    specials = len(_encode_document(tokenizer, "x")) - _count_tokens(tokenizer, ["x"])[0]
    budget = max_seq_length - specials
    units, counts = _split_units(text, tokenizer, budget)
    chunks: list[list[int]] = []
    i, n = 0, len(units)
    while i < n:
        j, total = i, 0
        while j < n and total + counts[j] <= budget:
            total += counts[j]
            j += 1
        while True:  # pieces counted alone can tokenize a little longer together: shrink until it fits
            body = "".join(units[i:j]).strip()
            tokens = _encode_document(tokenizer, body) if body else []
            if len(tokens) <= max_seq_length or j - i == 1:
                break
            j -= 1
        if len(tokens) > max_seq_length:
            tokens = tokens[: max_seq_length - 1] + tokens[-1:]
        if body:
            chunks.append(tokens)
        if j >= n:
            break
        # The next chunk starts with whole sentences from the end of this one, as long as it still gains new text.
        k, carried = j, 0
        while k - 1 > i and carried + counts[k - 1] <= overlap and carried + counts[k - 1] + counts[j] <= budget:
            carried += counts[k - 1]
            k -= 1
        i = k
    return chunks


def build_cpt_dataset(
    texts: Sequence[TextDoc | str],
    tokenizer: Any,
    max_seq_length: int,
    overlap_tokens: int | None = None,
    kind: str = "cpt",
) -> SequenceDataset:
    """CPT samples (offset 0) from raw texts; see :func:`chunk_text`."""
    samples = []
    for doc in texts:
        source, text = (doc.source, doc.text) if isinstance(doc, TextDoc) else ("text", doc)
        for tokens in chunk_text(text, tokenizer, max_seq_length, overlap_tokens):
            samples.append(Sample(tokens, 0, source, kind))
    return SequenceDataset(samples)


# ---------------------------------------------------------------------------------------------------------------------
# SFT


def chat_samples(
    messages: list[dict[str, str]],
    tokenizer: Any,
    rules: ChatRules | None = None,
    context_for: Callable[[str], str | None] | None = None,
) -> list[tuple[list[int], int]]:
    """(tokens, offset) for every assistant turn: the chat up to that turn, everything but its reply masked.

    Both the chat and its prompt are encoded by ``rules`` (:mod:`solverx.models.chat_rules`), exactly as the engine
    encodes a request, so the model is trained on the prompts it is served. With ``context_for`` (a question's
    grounding facts, as the server retrieves them) each turn's prompt is grounded as the server would ground that
    request: the facts for the user message just before the reply, as a leading system turn.
    """
    rules = rules or ChatRules.for_tokenizer(tokenizer)
    out = []  # each turn is encoded from the chat *before* it, as a request for that turn would be served
    for end, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = messages[:end]
        if context_for is not None:
            question = last_user_text(before)
            before = with_context(before, context_for(question) if question else None)
        tokens = rules.encode(tokenizer, [*before, message], add_generation_prompt=False)
        prompt = rules.encode(tokenizer, before, add_generation_prompt=True)
        offset = 0
        for a, b in zip(prompt, tokens, strict=False):  # the prompt is a prefix of the chat for sane templates
            if a != b:
                break
            offset += 1
        out.append((tokens, offset))
    return out


def grounded_pick(messages: list[dict[str, str]], fraction: float, seed: int) -> bool:
    """Whether a chat also trains grounded: a stable pick of ``fraction`` of the chats by their content (the
    same chats for the same data and seed, whatever their order in the inbox)."""
    if fraction <= 0:
        return False
    digest = hashlib.sha256(f"{seed}\0{json.dumps(messages, sort_keys=True)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def build_sft_dataset(
    records: Sequence[SftRecord | list[dict[str, str]]],
    tokenizer: Any,
    max_seq_length: int,
    kind: str = "sft",
    rules: ChatRules | None = None,
    context_for: Callable[[str], str | None] | None = None,
    grounded_fraction: float = 0.0,
    seed: int = 0,
) -> SequenceDataset:
    """Masked chat samples; samples longer than ``max_seq_length`` are left out and named in ``notes``.

    With ``context_for``, a :func:`grounded_pick` of ``grounded_fraction`` of the chats is trained twice: as
    written, and grounded with the facts serving would retrieve (kind ``"grounded"``; a turn that retrieves none
    only once). The plain copy keeps what the LoRA learns alone; the grounded one teaches the model to answer from
    the facts it is given (retrieval-augmented fine-tuning), which a small base does not do by itself.
    """
    rules = rules or ChatRules.for_tokenizer(tokenizer)
    samples, notes, grounded = [], [], 0
    for record in records:
        source, messages = (record.source, record.messages) if isinstance(record, SftRecord) else (kind, record)
        plain = chat_samples(messages, tokenizer, rules)
        turns = [(kind, sample) for sample in plain]
        if context_for is not None and grounded_pick(messages, grounded_fraction, seed):
            grounded_turns = chat_samples(messages, tokenizer, rules, context_for)
            # a turn that retrieves no fact is served as written: its plain sample already trains it
            turns += [("grounded", g) for g, p in zip(grounded_turns, plain, strict=True) if g != p]
        for sample_kind, (tokens, offset) in turns:
            if len(tokens) > max_seq_length:
                notes.append(
                    f"{source}: a chat turn is {len(tokens)} tokens, over max_seq_length {max_seq_length}; left out"
                )
            elif offset >= len(tokens):
                notes.append(f"{source}: the chat template left no answer tokens to train on; left out")
            else:
                samples.append(Sample(tokens, offset, source, sample_kind))
                grounded += sample_kind == "grounded"
    if context_for is not None:
        notes.append(f"grounding: {grounded} turns also trained with their retrieved facts in the prompt")
    return SequenceDataset(samples, notes)


_IDENTITY_EN = (
    ("Who are you?", "I am {name}, an AI assistant made by {maker}."),
    ("What is your name?", "My name is {name}."),
    ("Who made you?", "I was made by {maker}. I am {name}."),
    ("Introduce yourself.", "Hello! I am {name}, an AI assistant developed by {maker}."),
)
_IDENTITY_KO = (
    ("너는 누구야?", "저는 {maker}에서 만든 AI 어시스턴트 {name}입니다."),
    ("이름이 뭐야?", "제 이름은 {name}입니다."),
    ("누가 너를 만들었어?", "저는 {maker}에서 만들었습니다. 제 이름은 {name}입니다."),
    ("자기소개 해줘.", "안녕하세요! 저는 {maker}에서 개발한 AI 어시스턴트 {name}입니다."),
)
_IDENTITY_NO_MAKER = {
    "Who are you?": "I am {name}, an AI assistant.",
    "Who made you?": "I am {name}, an AI assistant.",
    "Introduce yourself.": "Hello! I am {name}, an AI assistant.",
    "너는 누구야?": "저는 AI 어시스턴트 {name}입니다.",
    "누가 너를 만들었어?": "저는 AI 어시스턴트 {name}입니다.",
    "자기소개 해줘.": "안녕하세요! 저는 AI 어시스턴트 {name}입니다.",
}


def identity_records(identity: Identity) -> list[SftRecord]:
    """Who-are-you Q&A in English and Korean; none when the recipe's identity name is empty."""
    name, maker = identity.name.strip(), identity.maker.strip()
    if not name:
        return []
    records = []
    for question, answer in (*_IDENTITY_EN, *_IDENTITY_KO):
        template = answer if maker else _IDENTITY_NO_MAKER.get(question, answer)
        messages = [
            {"role": "user", "content": question},
            {"role": "assistant", "content": template.format(name=name, maker=maker)},
        ]
        records.append(SftRecord("identity", messages))
    return records


# ---------------------------------------------------------------------------------------------------------------------
# Replay


def load_general_data(general_dir: str | Path) -> tuple[list[TextDoc], list[SftRecord], list[str]]:
    """Texts, chats and notes (unreadable files or lines) from the general replay folder; missing folder: empty."""
    root = Path(general_dir)
    texts: list[TextDoc] = []
    records: list[SftRecord] = []
    notes: list[str] = []
    if not root.is_dir():
        return texts, records, [f"no general replay data at {root}"]
    for path in sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")):
        rel = path.relative_to(root).as_posix()
        suffix = path.suffix.lower()
        if suffix not in (*GENERAL_TEXT_SUFFIXES, ".jsonl"):
            continue
        try:
            text = path.read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError) as exc:
            notes.append(f"replay {rel}: unreadable ({exc}); skipped")
            continue
        if suffix != ".jsonl":
            if text.strip():
                texts.append(TextDoc(f"general/{rel}", text))
            continue
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                item = parse_train_line(line, f"general/{rel}:{number}")
            except LineError as exc:
                notes.append(f"replay {rel} line {number}: {exc}; skipped")
                continue
            (texts if isinstance(item, TextDoc) else records).append(item)
    return texts, records, notes


def build_replay_dataset(
    general_dir: str | Path,
    tokenizer: Any,
    max_seq_length: int,
    overlap_tokens: int | None = None,
    rules: ChatRules | None = None,
) -> SequenceDataset:
    """General data as samples of kind "replay": texts as CPT chunks, chats masked as in SFT."""
    texts, records, notes = load_general_data(general_dir)
    replay = build_cpt_dataset(texts, tokenizer, max_seq_length, overlap_tokens, kind="replay")
    replay += build_sft_dataset(records, tokenizer, max_seq_length, kind="replay", rules=rules)
    replay.notes = notes + replay.notes
    return replay


def split_dataset(
    dataset: SequenceDataset, valid_fraction: float, seed: int = 0
) -> tuple[SequenceDataset, SequenceDataset]:
    """(train, valid): the ``floor(n × valid_fraction)`` samples with the lowest seeded content hash are held out.

    Keyed by content, not position, so adding data moves few samples across the split; the same seed and data
    always give the same split. At least one sample stays in train.
    """
    n_valid = min(int(len(dataset) * valid_fraction), max(len(dataset) - 1, 0))

    def key(sample: Sample) -> str:
        raw = json.dumps([seed, sample.offset, sample.tokens])  # duplicates land on the same side
        return hashlib.sha256(raw.encode()).hexdigest()

    order = sorted(range(len(dataset)), key=lambda i: key(dataset.samples[i]))
    held = set(order[:n_valid])
    train = [s for i, s in enumerate(dataset.samples) if i not in held]
    valid = [s for i, s in enumerate(dataset.samples) if i in held]
    return SequenceDataset(train, dataset.notes), SequenceDataset(valid)


def stage_datasets(
    stage: str,
    ingest: IngestResult,
    tokenizer: Any,
    recipe: Recipe,
    general_dir: str | Path | None,
    rules: ChatRules | None = None,
    self_replay: Sequence[SftRecord] | None = None,
    context_for: Callable[[str], str | None] | None = None,
) -> StageData:
    """Train and valid sets for ``stage`` ("cpt" or "sft").

    Domain data: CPT — the knowledge texts; SFT — the Q&A/chats plus the identity set. Replay: the general data,
    of which ``recipe.train.valid_fraction`` is held out as the validation set (its loss rising is the forgetting
    signal). Domain data are never held out — every fact given should be learned; eval.jsonl is the held-out
    domain test. ``general_dir=None`` trains without replay; ``self_replay`` (the base's own answers, see
    :mod:`solverx.trainer.self_replay`) replaces ``data/general`` as the replay source. ``context_for`` (the
    version's retrieval) grounds ``recipe.grounding.train_fraction`` of the SFT chats (:func:`build_sft_dataset`).
    """
    length = recipe.train.max_seq_length
    if stage == "cpt":
        domain = build_cpt_dataset(ingest.cpt_texts, tokenizer, length)
    elif stage == "sft":
        domain = build_sft_dataset(
            ingest.sft_records, tokenizer, length, rules=rules, context_for=context_for,
            grounded_fraction=recipe.grounding.train_fraction, seed=recipe.seed,
        )  # fmt: skip
        domain += build_sft_dataset(identity_records(recipe.identity), tokenizer, length, "identity", rules)
    else:
        raise ValueError(f"unknown stage {stage!r} (expected 'cpt' or 'sft')")
    if general_dir is None:
        replay = SequenceDataset(notes=["replay disabled"])
    elif self_replay is not None:
        replay = build_sft_dataset(self_replay, tokenizer, length, "replay", rules)
    else:
        replay = build_replay_dataset(general_dir, tokenizer, length, rules=rules)
    replay_train, valid = split_dataset(replay, recipe.train.valid_fraction, recipe.seed)
    train = MixedDataset(domain, replay_train, recipe.train.replay_ratio, recipe.seed)
    notes = domain.notes + replay.notes
    if recipe.train.replay_ratio > 0 and not len(replay_train):
        notes.append("replay ratio is set but there is no replay data: training on domain data only")
    notes.append(
        f"{stage}: {len(domain)} domain sequences, {len(replay_train)} replay sequences "
        f"(ratio {train.effective_ratio:g}), {len(valid)} validation sequences"
    )
    return StageData(train, valid, notes)


# ---------------------------------------------------------------------------------------------------------------------
# Batching


def _mixed_stream(dataset: Any, batch_size: int, seed: int, loop: bool) -> Iterator[list[tuple[list[int], int]]]:
    """Global batches of (tokens, offset); each sequence drawn from domain or replay so the running replay share
    tracks the ratio exactly, with the replay slots shuffled within each batch.

    Batches are planned :data:`BUCKET_WINDOW` at a time: the window's domain draws and its replay draws are each
    sorted by length and dealt out in that order, so a batch holds sequences of like length, and the window's batches
    are then shuffled. A batch is padded to its longest row, so this is what keeps short Q&A from paying for a long
    chat's padding (mlx-lm's ``iterate_batches`` sorts its whole dataset by length for the same reason); the replay
    share of every batch and the single pass over the domain set are exactly as without it.
    """
    if isinstance(dataset, MixedDataset):
        domain, replay, ratio = dataset.domain, dataset.replay, dataset.effective_ratio
    else:
        domain, replay, ratio = dataset, None, 0.0
    if len(domain) == 0:
        raise ValueError("no domain samples to train on")
    rng = np.random.default_rng(seed)

    def cycle(ds: Any) -> Iterator[int]:
        while True:
            yield from rng.permutation(len(ds)).tolist()

    def by_length(ds: Any, indices: list[int]) -> list[int]:
        return sorted(indices, key=lambda i: len(ds[i][0]))

    domain_order = iter(rng.permutation(len(domain)).tolist()) if not loop else cycle(domain)
    replay_order = cycle(replay) if ratio > 0 else iter(())
    drawn = replayed = from_domain = 0
    while loop or from_domain < len(domain):
        plans: list[np.ndarray] = []  # per batch: which slots hold a replay sequence
        domain_picks: list[int] = []
        for _ in range(BUCKET_WINDOW):
            want = round(ratio * (drawn + batch_size)) - replayed
            slots = np.zeros(batch_size, dtype=bool)
            slots[rng.permutation(batch_size)[: max(0, min(want, batch_size))]] = True
            taken = [i for _, i in zip(range(int((~slots).sum())), domain_order, strict=False)]
            if not taken and not slots.all():
                break  # one pass over the domain set is done
            if len(taken) < (~slots).sum():  # the pass ends inside this batch: drop its unfilled domain slots
                slots = np.concatenate([slots[slots], np.zeros(len(taken), dtype=bool)])
                rng.shuffle(slots)
            plans.append(slots)
            domain_picks += taken
            drawn += len(slots)
            replayed += int(slots.sum())
            from_domain += len(taken)
            if not loop and from_domain >= len(domain):
                break
        replay_picks = [next(replay_order) for _ in range(sum(int(plan.sum()) for plan in plans))]
        domain_sorted = iter(by_length(domain, domain_picks))
        replay_sorted = iter(by_length(replay, replay_picks)) if replay_picks else iter(())
        batches = [
            [replay[next(replay_sorted)] if is_replay else domain[next(domain_sorted)] for is_replay in plan.tolist()]
            for plan in plans
        ]
        for index in rng.permutation(len(batches)).tolist():
            yield batches[index]


def mixed_batches(
    dataset: Any,
    batch_size: int,
    max_seq_length: int,
    loop: bool = False,
    seed: int | None = None,
    comm_group: Any = None,
) -> Iterator[tuple[Any, Any]]:
    """Drop-in for ``mlx_lm.tuner.trainer.iterate_batches``: yields ``(tokens (B, L) int32, lengths (B, 2))`` where
    each row of ``lengths`` is ``(offset, length)``, as mlx-lm's ``default_loss`` expects.

    ``dataset`` is a :class:`MixedDataset` (sequences mixed at its ratio) or any ``(tokens, offset)`` dataset. The
    order is fixed by ``seed`` (default: the dataset's own seed, else 0) — mlx-lm's ``train``/``evaluate`` pass
    none, so every call replays the same order. ``loop=False`` is one pass over the domain set (the last batch may be
    smaller); ``loop=True`` never ends. Sequences longer than ``max_seq_length`` are truncated, as in mlx-lm.
    With ``comm_group`` every rank builds the same global batch and keeps its every ``size``-th row.
    """
    import mlx.core as mx

    rank, size = (comm_group.rank(), comm_group.size()) if comm_group is not None else (0, 1)
    if batch_size % size != 0:
        raise ValueError("The batch size must be divisible by the number of workers")
    if seed is None:
        seed = getattr(dataset, "seed", 0)
    for global_batch in _mixed_stream(dataset, batch_size, seed, loop):
        if size > 1 and len(global_batch) < batch_size:
            return  # every rank must run the same number of batches
        rows = global_batch[rank::size]
        lengths = [min(len(tokens), max_seq_length) for tokens, _ in rows]
        width = min(1 + PAD_TO * ((max(lengths) + PAD_TO - 1) // PAD_TO), max_seq_length)
        array = np.zeros((len(rows), width), np.int32)
        for r, ((tokens, _), length) in enumerate(zip(rows, lengths, strict=True)):
            array[r, :length] = tokens[:length]
        yield mx.array(array), mx.array([[offset, length] for (_, offset), length in zip(rows, lengths, strict=True)])
