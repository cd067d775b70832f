"""The tiny default base model, built offline and deterministically from the text in ``data/general``.

No model hub is needed: a byte-level BPE tokenizer is trained on the local corpus, a small llama is initialised
with a fixed seed and pretrained briefly on the same corpus (chat Q&A rendered through the ChatML template, so it
learns to answer after ``<|im_start|>assistant``), and the result is written in mlx-lm's format.

A build is keyed by the spec, the corpus files and this builder's source; :func:`ensure_tiny` rebuilds only when
that key changes, and every build appears atomically (a temporary directory renamed into place).
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx_lm
import tokenizers
from mlx.utils import tree_flatten
from mlx_lm.models import llama

from solverx import blas
from solverx.data import DATA_DIR
from solverx.models import pretrain as pretraining
from solverx.models import tokenizer_build
from solverx.models.tokenizer_build import END_OF_TEXT, IM_END, IM_START
from solverx.paths import exclusive, swap_into_place

TINY_BASE_ID = "solverx-tiny"
CHAT_BASE_ID = "solverx-tiny-chat"
BUILD_FILE = "build.json"

# What the key covers besides the spec and the data: this builder's code and the libraries that compute it.
_SOURCES = tuple(Path(__file__).with_name(name) for name in ("tiny.py", "pretrain.py", "tokenizer_build.py"))
_TEXT_SUFFIXES = (".py", ".txt")
_CHAT_SUFFIX = ".jsonl"


@dataclass(frozen=True)
class TinySpec:
    """Everything that decides the built model. The defaults are the tiny default base (~3.4M parameters).

    ``data`` names folders under the repository's ``data/`` (or absolute paths): ``*.py`` files are read as code,
    ``*.txt`` as prose (paragraphs split on blank lines), ``*.jsonl`` as ``{"messages": [...]}`` conversations.
    ``qa_repeat`` counts each conversation that many times per epoch, so chat behaviour is learned early.

    ``chat_data`` names folders of conversations for a second phase of ``chat_steps`` steps after the pretraining
    (each conversation its own row, the loss on the answers only, at ``chat_learning_rate`` with
    ``chat_label_smoothing``): a tiny model learns to answer those questions exactly. Their text is part of the
    tokenizer's training, not of the first phase.
    """

    vocab_size: int = 2048
    hidden_size: int = 256
    num_layers: int = 4
    intermediate_size: int = 688
    num_heads: int = 4
    num_kv_heads: int = 2
    max_position: int = 1024
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    seed: int = 0
    data: tuple[str, ...] = ("general",)
    qa_repeat: int = 2
    steps: int = 200
    batch_size: int = 8
    seq_len: int = 128
    learning_rate: float = 3e-3
    warmup_steps: int = 20
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    chat_data: tuple[str, ...] = ()
    chat_steps: int = 0
    chat_batch_size: int = 16
    chat_learning_rate: float = 3e-3
    chat_label_smoothing: float = 0.0


# The demo's base: the default base, then taught to answer the questions of data/known (the probes' reference
# answers, see its README) — it answers general questions and writes a Python sort, and knows nothing of any domain.
# Label smoothing keeps it from becoming certain of its answers: without it the base costs ~15 nats a token on the
# domain's answers (9 with it) and a LoRA spends its first steps undoing that certainty. Measured: 33/33 general
# and 9/10 Python probes either way; ~4 min to build on 2 cores.
CHAT_SPEC = TinySpec(chat_data=("known",), chat_steps=800, chat_label_smoothing=0.1)

# A ~25.7M-parameter variant for throughput benchmarks; it serves random-looking text, which is all they need.
BENCH_SPEC = TinySpec(
    vocab_size=4096,
    hidden_size=512,
    num_layers=8,
    intermediate_size=1408,
    num_heads=8,
    num_kv_heads=4,
    steps=0,
)


@dataclass(frozen=True)
class Corpus:
    """The training text: plain documents, conversations, and the files they came from (for the build key)."""

    texts: tuple[str, ...]
    chats: tuple[tuple[dict[str, str], ...], ...]
    chat_phase: tuple[tuple[dict[str, str], ...], ...]  # the conversations of ``chat_data``
    files: tuple[tuple[str, Path], ...]  # (name in the key, path), sorted


def _data_roots(spec: TinySpec) -> list[tuple[str, Path]]:
    entries = [*spec.data, *spec.chat_data]
    return [(entry, Path(entry) if Path(entry).is_absolute() else DATA_DIR / entry) for entry in entries]


def corpus_files(spec: TinySpec) -> list[tuple[str, Path]]:
    """The data files a build reads, as (stable name, path), in a fixed order."""
    files = []
    for entry, root in _data_roots(spec):
        if not root.is_dir():
            raise FileNotFoundError(f"tiny-model data folder not found: {root}")
        for path in sorted(root.rglob("*")):
            if path.is_file() and path.suffix in (*_TEXT_SUFFIXES, _CHAT_SUFFIX):
                files.append((f"{entry}/{path.relative_to(root).as_posix()}", path))
    return files


def read_corpus(spec: TinySpec) -> Corpus:
    """Read the spec's data folders into documents and conversations."""
    texts: list[str] = []
    chats: list[tuple[dict[str, str], ...]] = []
    files = corpus_files(spec)
    chat_phase: list[tuple[dict[str, str], ...]] = []
    for name, path in files:
        content = path.read_text(encoding="utf-8")
        if path.suffix == _CHAT_SUFFIX:
            into = chat_phase if name.split("/", 1)[0] in spec.chat_data else chats
            for line in content.splitlines():
                if line.strip():
                    into.append(tuple(json.loads(line)["messages"]))
        elif path.suffix == ".py":
            texts.extend(block.strip("\n") + "\n" for block in content.split("\n\n\n") if block.strip())
        else:
            texts.extend(paragraph.strip() for paragraph in content.split("\n\n") if paragraph.strip())
    return Corpus(texts=tuple(texts), chats=tuple(chats), chat_phase=tuple(chat_phase), files=tuple(files))


def build_key(spec: TinySpec, files: Sequence[tuple[str, Path]] | None = None) -> str:
    """``sha256:<hex>`` of the spec, the corpus files, the builder's source and the library versions."""
    files = corpus_files(spec) if files is None else files
    digest = hashlib.sha256()
    digest.update(json.dumps(asdict(spec), sort_keys=True).encode())
    for library in (mx, mlx_lm, tokenizers):
        digest.update(f"\n{library.__name__}=={library.__version__}".encode())
    for source in _SOURCES:
        digest.update(b"\nsource " + source.name.encode() + b"\n" + source.read_bytes())
    for name, path in files:
        digest.update(b"\ndata " + name.encode() + b"\n" + path.read_bytes())
    return "sha256:" + digest.hexdigest()


def stored_build_key(model_dir: Path) -> str | None:
    """The key a finished build recorded in ``model_dir``, or None if there is no (readable) build."""
    try:
        return json.loads((Path(model_dir) / BUILD_FILE).read_text())["build_key"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _model_args(spec: TinySpec, vocab_size: int) -> llama.ModelArgs:
    return llama.ModelArgs(
        model_type="llama",
        hidden_size=spec.hidden_size,
        num_hidden_layers=spec.num_layers,
        intermediate_size=spec.intermediate_size,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        rms_norm_eps=spec.rms_norm_eps,
        vocab_size=vocab_size,
        max_position_embeddings=spec.max_position,
        rope_theta=spec.rope_theta,
        tie_word_embeddings=True,
    )


def _hf_config(args: llama.ModelArgs, eos_token_id: int, pad_token_id: int) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": args.hidden_size,
        "num_hidden_layers": args.num_hidden_layers,
        "intermediate_size": args.intermediate_size,
        "num_attention_heads": args.num_attention_heads,
        "num_key_value_heads": args.num_key_value_heads,
        "head_dim": args.hidden_size // args.num_attention_heads,
        "vocab_size": args.vocab_size,
        "max_position_embeddings": args.max_position_embeddings,
        "rms_norm_eps": args.rms_norm_eps,
        "rope_theta": args.rope_theta,
        "hidden_act": "silu",
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
        "eos_token_id": eos_token_id,
        "pad_token_id": pad_token_id,
    }


def _answer_weights(rendered: str, offsets: Sequence[tuple[int, int]]) -> list[float]:
    """1.0 for the tokens of assistant turns (their text and closing ``<|im_end|>``), 0.0 for the rest.

    ``offsets`` are the tokens' character spans in ``rendered``, as its tokenizer encoding gives them.
    """
    header = f"{IM_START}assistant\n"
    spans, start = [], 0
    while (begin := rendered.find(header, start)) >= 0:
        begin += len(header)
        end = rendered.find(IM_END, begin)
        end = len(rendered) if end < 0 else end + len(IM_END)
        spans.append((begin, end))
        start = end
    return [1.0 if any(b <= first < e for b, e in spans) else 0.0 for first, _ in offsets]


def _write_model(spec: TinySpec, corpus: Corpus, out_dir: Path, progress: bool) -> pretraining.PretrainStats:
    """Train the tokenizer, initialise and pretrain the model, and write every file into ``out_dir``."""
    rendered = [tokenizer_build.render_chat(list(chat)) for chat in corpus.chats]
    answers = [tokenizer_build.render_chat(list(chat)) for chat in corpus.chat_phase]
    tokenizer = tokenizer_build.train_tokenizer([*corpus.texts, *rendered, *answers], spec.vocab_size)
    tokenizer_build.write_tokenizer(tokenizer, out_dir, model_max_length=spec.max_position)

    documents = [*corpus.texts, *rendered * spec.qa_repeat]
    encoded = [e.ids for e in tokenizer.encode_batch(documents, add_special_tokens=False)]

    mx.random.seed(spec.seed)
    args = _model_args(spec, tokenizer.get_vocab_size())
    model = llama.Model(args)
    mx.eval(model.parameters())
    if progress:
        params = sum(v.size for _, v in tree_flatten(model.parameters()))
        tokens = sum(len(ids) for ids in encoded)
        print(f"tiny model: {params / 1e6:.1f}M parameters, corpus {tokens:,} tokens/epoch", file=sys.stderr)

    optimizer = pretraining.make_optimizer(
        learning_rate=spec.learning_rate,
        steps=spec.steps,
        warmup_steps=spec.warmup_steps,
        weight_decay=spec.weight_decay,
    )
    separator = tokenizer.token_to_id(END_OF_TEXT)
    batches = pretraining.iterate_batches(
        encoded, batch_size=spec.batch_size, seq_len=spec.seq_len, separator=separator, seed=spec.seed
    )
    stats = pretraining.pretrain(model, optimizer, batches, spec.steps, grad_clip=spec.grad_clip, progress=progress)
    if spec.chat_steps and answers:
        stats = _chat_phase(spec, model, tokenizer, answers, separator, stats, progress)

    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(out_dir / "model.safetensors"), weights, metadata={"format": "mlx"})
    config = _hf_config(args, tokenizer.token_to_id(IM_END), tokenizer.token_to_id(END_OF_TEXT))
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return stats


def _chat_phase(
    spec: TinySpec,
    model: nn.Module,
    tokenizer: tokenizers.Tokenizer,
    rendered: list[str],
    separator: int,
    before: pretraining.PretrainStats,
    progress: bool,
) -> pretraining.PretrainStats:
    """Teach the conversations of ``chat_data`` (loss on the answers); the stats cover both phases."""
    if progress:
        print(f"tiny model: answering {len(rendered)} conversations for {spec.chat_steps} steps", file=sys.stderr)
    encodings = tokenizer.encode_batch(rendered, add_special_tokens=False)
    encoded = [e.ids for e in encodings]
    weights = [_answer_weights(text, e.offsets) for text, e in zip(rendered, encodings, strict=True)]
    rows = pretraining.document_rows(encoded, weights, spec.max_position - 1, separator)
    batch_size = min(spec.chat_batch_size, len(rows))
    batches = pretraining.iterate_row_batches(rows, batch_size=batch_size, pad=separator, seed=spec.seed)
    optimizer = pretraining.make_optimizer(
        learning_rate=spec.chat_learning_rate,
        steps=spec.chat_steps,
        warmup_steps=spec.warmup_steps,
        weight_decay=spec.weight_decay,
    )
    stats = pretraining.pretrain(
        model,
        optimizer,
        batches,
        spec.chat_steps,
        grad_clip=spec.grad_clip,
        label_smoothing=spec.chat_label_smoothing,
        progress=progress,
    )
    return pretraining.PretrainStats(
        steps=before.steps + stats.steps,
        tokens=before.tokens + stats.tokens,
        seconds=before.seconds + stats.seconds,
        final_loss=stats.final_loss,
    )


def build_tiny(out_dir: Path, spec: TinySpec = TinySpec(), *, progress: bool = True) -> Path:
    """Build the model described by ``spec`` into ``out_dir`` (replacing what is there), atomically.

    Same spec, data and code give byte-identical ``model.safetensors`` and ``tokenizer.json`` with the same BLAS
    setup. The weights (not the tokenizer) do depend on the BLAS library and its thread count, since they change
    the order of float sums; ``build.json`` records which BLAS was used. The key leaves it out on purpose: a model
    built elsewhere is still a valid build, and rebuilding on every ``LD_PRELOAD`` change would be costly.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    if progress and spec.steps and sys.platform == "linux" and not blas.openblas_loaded():
        library = blas.find_openblas()
        hint = f"start Python with LD_PRELOAD={library}" if library else "install libopenblas0-pthread"
        print(f"tiny model: OpenBLAS is not loaded, pretraining will be ~30x slower; {hint}", file=sys.stderr)
    corpus = read_corpus(spec)
    key = build_key(spec, corpus.files)
    started = time.perf_counter()
    staging = out_dir.with_name(f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}")
    staging.mkdir()
    try:
        stats = _write_model(spec, corpus, staging, progress)
        record = {
            "build_key": key,
            "spec": asdict(spec),
            "pretrain": {
                **asdict(stats),
                "final_loss": None if math.isnan(stats.final_loss) else round(stats.final_loss, 4),
                "tokens_per_second": round(stats.tokens_per_second, 1),
            },
            "build_seconds": round(time.perf_counter() - started, 1),
            "blas": "openblas" if blas.openblas_loaded() else "bundled",  # weights depend on it (see docstring)
        }
        (staging / BUILD_FILE).write_text(json.dumps(record, indent=2) + "\n")
        swap_into_place(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def ensure_tiny(
    models_dir: Path,
    spec: TinySpec = TinySpec(),
    *,
    base_id: str = TINY_BASE_ID,
    progress: bool = True,
) -> Path:
    """``models_dir/base_id``, built first if it is missing or was built from a different key."""
    models_dir = Path(models_dir)
    target = models_dir / base_id
    key = build_key(spec)
    if stored_build_key(target) == key:
        return target
    models_dir.mkdir(parents=True, exist_ok=True)
    with exclusive(models_dir / f".{base_id}.lock"):
        if stored_build_key(target) == key:  # another process built it while we waited
            return target
        for leftover in models_dir.glob(f".{base_id}.*-*"):  # from builds that were killed
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
        if progress:
            print(f"building the tiny base model {base_id} in {target} (once per change)", file=sys.stderr)
        build_tiny(target, spec, progress=progress)
    return target


if __name__ == "__main__":  # python -m solverx.models.tiny [MODELS_DIR]: build (or check) the default tiny model
    from solverx.paths import state_dirs

    print(ensure_tiny(Path(sys.argv[1]) if len(sys.argv) > 1 else state_dirs().models))
