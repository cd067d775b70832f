"""The tokenizer of a GGUF file, rebuilt with ``tokenizers``: byte-level BPE or SentencePiece, with chat template."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from solverx.models.gguf_import.metadata import GGUFImportError, Metadata

# --- tokenizer ----------------------------------------------------------------------------------------------

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# ``tokenizer.ggml.pre`` names as llama.cpp's llama-vocab.cpp groups them, with the split each group uses.
_GPT2_PRE = {"gpt-2", "gpt2", "phi-2", "mpt", "olmo", "jais", "exaone4", "trillion", "granite-docling"}
_DIGITS_PRE = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"}  # + every digit alone
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_PRE = ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2", "jina-v5-nano")
_QWEN2_PRE = ("qwen2", "deepseek-r1-qwen", "kormo", "megrez", "stablelm2", "hunyuan", "grok-2")
SPLIT_REGEXES = {
    **dict.fromkeys((*_LLAMA3_PRE, "dbrx", "smaug-bpe"), _LLAMA3_SPLIT),
    **dict.fromkeys(_QWEN2_PRE, _QWEN2_SPLIT),
    "tekken": _TEKKEN_SPLIT,
    **dict.fromkeys(("gpt-4o", "llama4", "minimax-m2"), _GPT4O_SPLIT),
}
# Qwen2's tokenizer.json normalizes to NFC (llama.cpp does not; the model was trained with it).
_NFC_PRE = set(_QWEN2_PRE[:4])
# A pre-token that is itself in the vocabulary is taken whole (Llama 3's ``ignore_merges``); these also add BOS
# when the file does not say.
_IGNORE_MERGES_PRE = {*_LLAMA3_PRE, "tekken"}


@dataclass(frozen=True)
class Vocab:
    """The tokenizer metadata of a GGUF."""

    model: str
    pre: str | None
    tokens: list[str]
    types: list[int]
    scores: list[float]
    merges: list[str]
    special_ids: dict[str, int]  # bos/eos/unk/pad/eot/eom → id
    add_bos: bool
    add_eos: bool
    add_space_prefix: bool
    chat_template: str | None
    hf_json: str | None

    @classmethod
    def read(cls, meta: Metadata) -> Vocab:
        model = meta.get("tokenizer.ggml.model")
        tokens = meta.strings("tokenizer.ggml.tokens")
        if model is None or not tokens:
            raise GGUFImportError("the file has no tokenizer (tokenizer.ggml.model / tokenizer.ggml.tokens)")
        special_ids = {}
        for name, key in (
            ("bos", "bos_token_id"),
            ("eos", "eos_token_id"),
            ("unk", "unknown_token_id"),
            ("pad", "padding_token_id"),
            ("eot", "eot_token_id"),
            ("eom", "eom_token_id"),
        ):
            value = meta.get(f"tokenizer.ggml.{key}")
            if value is not None and 0 <= int(value) < len(tokens):
                special_ids[name] = int(value)
        return cls(
            model=str(model),
            pre=meta.get("tokenizer.ggml.pre"),
            tokens=tokens,
            types=[int(t) for t in meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)],
            scores=[float(s) for s in meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)],
            merges=meta.strings("tokenizer.ggml.merges"),
            special_ids=special_ids,
            # llama.cpp's defaults when a file does not say: SentencePiece and Llama-3-style BPE add BOS.
            add_bos=bool(
                meta.get(
                    "tokenizer.ggml.add_bos_token",
                    model == "llama" or meta.get("tokenizer.ggml.pre") in _IGNORE_MERGES_PRE,
                )
            ),
            add_eos=bool(meta.get("tokenizer.ggml.add_eos_token", False)),
            add_space_prefix=bool(meta.get("tokenizer.ggml.add_space_prefix", True)),
            chat_template=meta.get("tokenizer.chat_template"),
            hf_json=meta.get("tokenizer.huggingface.json"),
        )

    def token(self, name: str) -> str | None:
        token_id = self.special_ids.get(name)
        return self.tokens[token_id] if token_id is not None else None


def _unique_vocab(tokens: list[str]) -> dict[str, int]:
    vocab: dict[str, int] = {}
    for i, token in enumerate(tokens):
        vocab.setdefault(token, i)
    return vocab


def _added_tokens(vocab: Vocab):
    """Control tokens (``<|im_start|>``) as special tokens, user-defined ones (``<think>``) as plain added tokens.

    llama.cpp matches both whole in the text; without them a tokenizer would cut them into pieces.
    """
    from tokenizers import AddedToken

    tokens = vocab.tokens
    special = [AddedToken(tokens[i], special=True, normalized=False) for i, t in enumerate(vocab.types) if t == CONTROL]
    unk = vocab.special_ids.get("unk")
    if unk is not None and vocab.types[unk] != CONTROL:
        special.append(AddedToken(tokens[unk], special=True, normalized=False))
    plain = [
        AddedToken(tokens[i], special=False, normalized=False) for i, t in enumerate(vocab.types) if t == USER_DEFINED
    ]
    return special, plain


def _byte_level_tokenizer(vocab: Vocab):
    """GPT-2-style byte-level BPE: the file's tokens are already in the byte alphabet, its merges are ranked."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    pre = vocab.pre or "default"
    merges = [tuple(m.split(" ", 1)) for m in vocab.merges if " " in m]
    try:
        bpe = models.BPE(vocab=_unique_vocab(vocab.tokens), merges=merges, ignore_merges=pre in _IGNORE_MERGES_PRE)
    except Exception as e:  # tokenizers raises a bare Exception for a merge of unknown tokens
        raise GGUFImportError(f"the file's BPE vocabulary and merges disagree: {e}") from e
    tokenizer = Tokenizer(bpe)
    if pre in SPLIT_REGEXES:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(SPLIT_REGEXES[pre]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    elif pre in _DIGITS_PRE:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )
    else:
        if pre not in _GPT2_PRE:
            print(
                f"solverx prepare: warning: unknown pre-tokenizer {pre!r}; using GPT-2's split, "
                "so some texts may tokenize differently than in llama.cpp",
                file=sys.stderr,
            )
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if pre in _NFC_PRE:
        tokenizer.normalizer = normalizers.NFC()
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def sentencepiece_merges(vocab: dict[str, int], ranks: dict[str, float]) -> list[tuple[str, str]]:
    """BPE merges a SentencePiece BPE vocabulary implies: every split of a piece into two pieces, best piece first.

    SentencePiece merges the adjacent pair whose union scores highest; a BPE model applies the lowest-ranked
    merge first, so ranking merges by the union's score (ties: longer left part) gives the same segmentation.
    This is what transformers' ``generate_merges`` computes for its SentencePiece converters.
    """
    merges: list[tuple[float, int, int, int, int, str, str]] = []
    for piece, score in ranks.items():
        for i in range(1, len(piece)):
            left, right = piece[:i], piece[i:]
            if left in vocab and right in vocab:
                merges.append((-score, -len(left), -len(right), vocab[left], vocab[right], left, right))
    merges.sort()
    return [(m[5], m[6]) for m in merges]


def _sentencepiece_tokenizer(vocab: Vocab, *, file_order: bool):
    """SentencePiece BPE (llama, Gemma) as a ``tokenizers`` BPE with byte fallback, as transformers converts it.

    ``file_order``: Gemma's scores do not follow its merge order, the order of the pieces in the file does
    (transformers ranks Gemma's merges the same way). Gemma's runs of spaces are user-defined tokens spelled
    with real spaces; like llama.cpp, they are matched in the raw text as added tokens.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers

    ids = _unique_vocab(vocab.tokens)
    mergeable = {
        token: (-float(i) if file_order else vocab.scores[i])
        for i, token in enumerate(vocab.tokens)
        if vocab.types[i] == NORMAL and ids[token] == i and len(token) > 1
    }
    unk = vocab.token("unk")
    bpe = models.BPE(
        vocab=ids,
        merges=sentencepiece_merges(ids, mergeable),
        unk_token=unk,
        fuse_unk=True,
        byte_fallback=True,
    )
    tokenizer = Tokenizer(bpe)
    replace = normalizers.Replace(" ", "▁")
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if vocab.add_space_prefix:
        tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), replace])
        steps.append(decoders.Strip(" ", 1, 0))
    else:
        tokenizer.normalizer = replace
    tokenizer.decoder = decoders.Sequence(steps)
    return tokenizer


def build_tokenizer(vocab: Vocab, arch: str):
    """A ``tokenizers.Tokenizer`` that encodes like llama.cpp does with this vocabulary."""
    from tokenizers import Tokenizer, processors

    if vocab.hf_json:  # the converter embedded the original tokenizer.json
        return Tokenizer.from_str(vocab.hf_json)
    if vocab.model == "gpt2":
        tokenizer = _byte_level_tokenizer(vocab)
    elif vocab.model == "llama":
        tokenizer = _sentencepiece_tokenizer(vocab, file_order=arch.startswith("gemma"))
    else:
        raise GGUFImportError(f"tokenizer model {vocab.model!r} is not supported (supported: gpt2, llama)")
    special, plain = _added_tokens(vocab)
    tokenizer.add_special_tokens(special)
    tokenizer.add_tokens(plain)

    steps = [processors.ByteLevel(trim_offsets=False)] if vocab.model == "gpt2" else []
    # llama.cpp adds BOS (and, rarely, EOS) to every encoded text when the file says so; transformers 5 ignores
    # ``add_bos_token`` for a plain tokenizer.json, so the template goes into the tokenizer itself.
    wrapping = [
        (vocab.token(name), vocab.special_ids[name], position)
        for name, position, wanted in (("bos", 0, vocab.add_bos), ("eos", 1, vocab.add_eos))
        if wanted and name in vocab.special_ids
    ]
    if wrapping:

        def sequence(piece: str, type_id: int) -> list[str]:
            before = [f"{token}:{type_id}" for token, _, position in wrapping if position == 0]
            after = [f"{token}:{type_id}" for token, _, position in wrapping if position == 1]
            return [*before, f"{piece}:{type_id}", *after]

        steps.append(
            processors.TemplateProcessing(
                single=sequence("$A", 0),
                pair=sequence("$A", 0) + sequence("$B", 1),
                special_tokens=list(dict.fromkeys((token, token_id) for token, token_id, _ in wrapping)),
            )
        )
    if steps:
        tokenizer.post_processor = steps[0] if len(steps) == 1 else processors.Sequence(steps)
    return tokenizer


def write_tokenizer(tokenizer, vocab: Vocab, out: Path, *, model_max_length: int) -> None:
    """``tokenizer.json`` + ``tokenizer_config.json`` for ``PreTrainedTokenizerFast`` (what ``mlx_lm.load`` reads)."""
    (out / "tokenizer.json").write_text(tokenizer.to_str(pretty=True) + "\n", encoding="utf-8")
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": model_max_length,
        "bos_token": vocab.token("bos"),
        "eos_token": vocab.token("eos"),
        "unk_token": vocab.token("unk"),
        "pad_token": vocab.token("pad"),
        "add_bos_token": vocab.add_bos,
        "add_eos_token": vocab.add_eos,
        "clean_up_tokenization_spaces": False,
    }
    if vocab.chat_template:
        config["chat_template"] = vocab.chat_template
    text = json.dumps(config, indent=2, ensure_ascii=False) + "\n"
    (out / "tokenizer_config.json").write_text(text, encoding="utf-8")


def eos_token_ids(vocab: Vocab) -> list[int]:
    """Every id that ends a turn: llama.cpp's eos, plus end-of-turn/-message where the file names them."""
    return list(dict.fromkeys(vocab.special_ids[k] for k in ("eos", "eot", "eom") if k in vocab.special_ids))
