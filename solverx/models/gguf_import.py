"""Import a llama.cpp GGUF file as a base model the daemon can serve and train on: ``solverx prepare FILE.gguf``.

A GGUF holds everything a model directory does, in llama.cpp's spelling: hyperparameters and the tokenizer as
metadata (``llama.block_count``, ``tokenizer.ggml.tokens``…), tensors under llama.cpp's names (``blk.0.attn_q``)
in one of ggml's block formats. This module translates all three into what ``mlx_lm.load`` reads:

- **weights**, read through a memory map one tensor at a time (peak memory stays near one output shard).
  ``q_bits="keep"`` keeps the block formats MLX's affine quantization can represent exactly — Q4_0, Q4_1 and
  Q8_0 are affine with group 32 (``w = scale·q + bias``) — repacked bit for bit into MLX layers, the bits per
  layer written as per-module ``quantization`` overrides; every other format (K-quants, Q5_x, IQ…, F16, BF16) is
  dequantized with gguf-py to float32, the format MLX's CPU backend computes fastest. ``q_bits=None``
  dequantizes everything; ``q_bits=4|8`` dequantizes, then quantizes the way ``mlx_lm.convert`` does.
- **layout quirks of llama.cpp's converter**, undone or absorbed: for the ``llama`` architecture it permutes
  the q/k rows so that interleaved ("GPT-J") RoPE works — mlx-lm's ``rope_traditional`` is that RoPE, so the
  rows are kept and the flag set (the permutation cancels in q·k); for Gemma it stores RMSNorm weights as
  ``1 + w`` — mlx-lm's Gemma norms add the 1 themselves, so 1 is subtracted back.
- **the tokenizer**, rebuilt with ``tokenizers`` from the vocabulary: byte-level BPE (``gpt2``) from the tokens
  and merges, with the pre-tokenizer named by ``tokenizer.ggml.pre``; SentencePiece BPE (``llama``, also Gemma)
  with byte fallback, merges recovered from the scores as transformers' converters do.

The output is written to a ``.partial`` sibling and renamed into place, as
:func:`solverx.models.prepare.prepare_checkpoint` does; the result is the same
:class:`~solverx.models.prepare.PreparedModel`.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Literal

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.utils import _get_classes, save_config

from solverx.adapters.fingerprint import base_fingerprint
from solverx.models.checkpoints import ShardWriter
from solverx.models.prepare import PreparedModel, QuantPlan, context_limit, quantization_plan

# Q4_0, Q4_1 and Q8_0 are affine quantization with 32-wide groups: MLX represents them exactly.
NATIVE_BITS = {"Q4_0": 4, "Q4_1": 4, "Q8_0": 8}
NATIVE_GROUP = 32
MAX_SHARD_BYTES = 2 * 2**30

_BLOCK_RE = re.compile(r"^blk\.(\d+)\.(.+)\.(weight|bias)$")
_GLOBAL_RE = re.compile(r"^([a-z_]+)\.(weight|bias)$")


class GGUFImportError(ValueError):
    """The GGUF uses something this importer cannot translate; the message names it."""


# --- architectures ------------------------------------------------------------------------------------------

_ATTENTION = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
}
_LLAMA_BLOCK = _ATTENTION | {"ffn_norm": "post_attention_layernorm"}
_QK_NORM = {"attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}
# Gemma 2/3 have four norms per block; llama.cpp calls the pre-FFN one ``ffn_norm``.
_GEMMA2_BLOCK = _ATTENTION | {
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_GLOBALS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


@dataclass(frozen=True)
class Family:
    """How one GGUF architecture maps onto an mlx-lm model class."""

    model_type: str
    architecture: str
    block: dict[str, str]
    has_lm_head: bool = True  # whether a separate ``output`` tensor may exist (Gemma 1/2 always tie)
    norm_shift: float = 0.0  # llama.cpp stores Gemma's RMSNorm weight as 1 + w
    interleaved_rope: bool = False  # llama.cpp permuted q/k for GPT-J-style RoPE
    skip: frozenset[str] = field(default_factory=frozenset)  # tensors mlx-lm recomputes


FAMILIES = {
    "llama": Family(
        "llama",
        "LlamaForCausalLM",
        _LLAMA_BLOCK,
        interleaved_rope=True,
        skip=frozenset({"rope_freqs", "attn_rot_embd"}),
    ),
    "qwen2": Family("qwen2", "Qwen2ForCausalLM", _LLAMA_BLOCK),
    "qwen3": Family("qwen3", "Qwen3ForCausalLM", _LLAMA_BLOCK | _QK_NORM),
    "gemma": Family("gemma", "GemmaForCausalLM", _LLAMA_BLOCK, has_lm_head=False, norm_shift=1.0),
    "gemma2": Family("gemma2", "Gemma2ForCausalLM", _GEMMA2_BLOCK, has_lm_head=False, norm_shift=1.0),
    "gemma3": Family("gemma3_text", "Gemma3ForCausalLM", _GEMMA2_BLOCK | _QK_NORM, norm_shift=1.0),
}


# --- metadata -----------------------------------------------------------------------------------------------


def _open(src: Path):
    """A memory-mapped reader; gguf is imported here so that importing this module stays cheap."""
    from gguf import GGUFReader

    src = Path(src)
    if not src.is_file():
        raise FileNotFoundError(f"no GGUF file at {src}")
    try:
        reader = GGUFReader(src, "r")
    except ValueError as e:
        raise GGUFImportError(f"{src} is not a GGUF file gguf-py can read: {e}") from e
    if reader.byte_order != "I":
        raise GGUFImportError(f"{src} is a big-endian GGUF; only little-endian files are supported")
    return reader


class Metadata:
    """The GGUF key/value pairs, read on demand (``{arch}`` in a key is the file's architecture)."""

    def __init__(self, reader) -> None:
        self._fields = reader.fields
        self.arch = ""
        self.arch = str(self.get("general.architecture", ""))

    def __contains__(self, key: str) -> bool:
        return key.format(arch=self.arch) in self._fields

    def get(self, key: str, default: Any = None) -> Any:
        field_ = self._fields.get(key.format(arch=self.arch))
        if field_ is None:
            return default
        return field_.contents()

    def strings(self, key: str) -> list[str]:
        """A string array, decoded leniently: a vocabulary may hold byte sequences that are not valid UTF-8."""
        field_ = self._fields.get(key.format(arch=self.arch))
        if field_ is None:
            return []
        return [bytes(field_.parts[i]).decode("utf-8", errors="replace") for i in field_.data]

    def scalar(self, key: str, default: Any = None) -> Any:
        """A per-model value; llama.cpp writes some (head counts, FFN sizes) as per-layer arrays."""
        value = self.get(key, default)
        if isinstance(value, list):
            if len(set(value)) != 1:
                raise GGUFImportError(f"{key.format(arch=self.arch)} varies per layer ({value[:4]}…); not supported")
            value = value[0]
        return value


def read_gguf_summary(src: Path) -> dict:
    """What a GGUF file holds, from its header alone (nothing is dequantized): for the CLI and a quick check."""
    reader = _open(src)
    meta = Metadata(reader)
    types = Counter(t.tensor_type.name for t in reader.tensors)
    vocab = len(meta.get("tokenizer.ggml.token_type") or ()) or len(meta.strings("tokenizer.ggml.tokens"))
    unsupported = sorted(name for name in types if not _dequantizable(name))
    return {
        "path": str(src),
        "architecture": meta.arch,
        "name": meta.get("general.name"),
        "supported_architecture": meta.arch in FAMILIES,
        "tensor_count": len(reader.tensors),
        "parameters": int(sum(int(t.n_elements) for t in reader.tensors)),
        "quant_types": dict(types.most_common()),
        "unsupported_quant_types": unsupported,
        "block_count": meta.get("{arch}.block_count"),
        "embedding_length": meta.get("{arch}.embedding_length"),
        "context_length": meta.get("{arch}.context_length"),
        "vocab_size": vocab,
        "tokenizer": meta.get("tokenizer.ggml.model"),
        "file_bytes": Path(src).stat().st_size,
    }


def _rope_scaling(meta: Metadata) -> dict | None:
    """mlx-lm's ``rope_scaling`` from ``{arch}.rope.scaling.*`` (llama3's per-frequency factors: see below)."""
    kind = meta.get("{arch}.rope.scaling.type")
    factor = meta.get("{arch}.rope.scaling.factor")
    if kind in (None, "none") or (kind == "linear" and factor in (None, 1.0)):
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": _f32(factor)}
    if kind == "yarn":
        scaling: dict[str, Any] = {"rope_type": "yarn", "factor": _f32(factor)}
        original = meta.get("{arch}.rope.scaling.original_context_length")
        if original:
            scaling["original_max_position_embeddings"] = int(original)
        for key, name in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow")):
            if (value := meta.get(f"{{arch}}.rope.scaling.{key}")) is not None:
                scaling[name] = _f32(value)
        return scaling
    raise GGUFImportError(f"RoPE scaling {kind!r} ({meta.arch}.rope.scaling.type) is not supported")


def llama3_rope_scaling(factors: np.ndarray, base: float, dims: int) -> dict | None:
    """Recover Llama 3's ``rope_scaling`` from the ``rope_freqs`` tensor llama.cpp writes instead of the config.

    The converter evaluates the llama3 formula per frequency and stores the divisors; the parameters that
    produced them are not in the metadata. The published Llama 3.x values are tried until one reproduces the
    tensor (``factor`` is its maximum); a tensor no candidate reproduces is refused rather than approximated.
    """
    factors = np.asarray(factors, dtype=np.float64).reshape(-1)
    if np.allclose(factors, 1.0):
        return None
    factor = float(factors.max())
    wavelen = 2 * math.pi * base ** (np.arange(0, dims, 2, dtype=np.float64) / dims)
    for original in (8192, 4096, 2048, 16384, 32768, 65536, 131072):
        for low, high in ((1.0, 4.0), (1.0, 2.0), (1.0, 8.0), (2.0, 4.0), (2.0, 8.0)):
            smooth = (original / wavelen - low) / (high - low)
            expected = np.where(
                wavelen < original / high,
                1.0,
                np.where(wavelen > original / low, factor, 1.0 / ((1 - smooth) / factor + smooth)),
            )
            if expected.shape == factors.shape and np.allclose(expected, factors, rtol=1e-4):
                return {
                    "rope_type": "llama3",
                    "factor": factor,
                    "low_freq_factor": low,
                    "high_freq_factor": high,
                    "original_max_position_embeddings": original,
                }
    raise GGUFImportError("rope_freqs.weight holds RoPE factors that are not Llama 3's scaling; not supported")


def _query_pre_attn_scalar(meta: Metadata, *, hidden: int, heads: int, head_dim: int, layers: int) -> float:
    """Gemma 2/3's attention scale, which llama.cpp keeps out of the metadata for most files.

    llama.cpp scales queries by 1/sqrt(head_dim), except for the 27B models (Gemma 2 with 46 layers, Gemma 3
    with 62), whose ``query_pre_attn_scalar`` is hidden/heads; ``{arch}.attention.scale`` wins when present.
    """
    scale = meta.get("{arch}.attention.scale")
    if scale:
        return round(float(scale) ** -2, 3)
    if (meta.arch, layers) in (("gemma2", 46), ("gemma3", 62)):
        return float(hidden // heads)
    return float(head_dim)


def _sliding_window_pattern(meta: Metadata, layers: int) -> int:
    """Gemma 3's every-Nth-layer-is-global period (llama.cpp's default is 6)."""
    pattern = meta.get("{arch}.attention.sliding_window_pattern")
    if pattern is None:
        return 6
    if isinstance(pattern, int):
        return pattern
    # Per-layer flags, true where the layer uses the sliding window: mlx-lm only knows a fixed period.
    flags = [bool(x) for x in pattern]
    for period in range(1, layers + 1):
        if flags == [(i + 1) % period != 0 for i in range(len(flags))]:
            return period
    raise GGUFImportError(f"{meta.arch}.attention.sliding_window_pattern {flags[:12]}… is not periodic")


def _f32(value: float) -> float:
    """A float32 metadata value as the decimal it was written from (1e-05, not 9.999999747378752e-06)."""
    return float(f"{float(value):.7g}")


def model_config(meta: Metadata, names: set[str], vocab_size: int) -> dict:
    """The mlx-lm config for the file's architecture, from its metadata and which tensors it has."""
    family = FAMILIES.get(meta.arch)
    if family is None:
        supported = ", ".join(sorted(FAMILIES))
        raise GGUFImportError(f"GGUF architecture {meta.arch!r} is not supported (supported: {supported})")
    hidden = int(meta.scalar("{arch}.embedding_length"))
    layers = int(meta.scalar("{arch}.block_count"))
    heads = int(meta.scalar("{arch}.attention.head_count"))
    kv_heads = int(meta.scalar("{arch}.attention.head_count_kv", heads))
    head_dim = int(meta.scalar("{arch}.attention.key_length", hidden // heads))
    value_dim = int(meta.scalar("{arch}.attention.value_length", head_dim))
    rope_dims = int(meta.scalar("{arch}.rope.dimension_count", head_dim))
    if value_dim != head_dim:
        raise GGUFImportError(f"key length {head_dim} ≠ value length {value_dim}: not supported for {meta.arch}")
    if rope_dims != head_dim:
        raise GGUFImportError(f"partial RoPE ({rope_dims} of {head_dim} dims) is not supported for {meta.arch}")
    tied = "output.weight" not in names
    if not tied and not family.has_lm_head:
        raise GGUFImportError(f"{meta.arch} files have no separate output tensor, but this one has output.weight")
    config: dict[str, Any] = {
        "model_type": family.model_type,
        "architectures": [family.architecture],
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "intermediate_size": int(meta.scalar("{arch}.feed_forward_length")),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "rms_norm_eps": _f32(meta.get("{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": _f32(meta.get("{arch}.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(meta.get("{arch}.context_length", 4096)),
        "vocab_size": vocab_size,
        "tie_word_embeddings": tied,
        "torch_dtype": "float32",
    }
    if (scaling := _rope_scaling(meta)) is not None:
        config["rope_scaling"] = scaling
    if family.interleaved_rope:  # keep llama.cpp's permuted q/k rows: they are what GPT-J-style RoPE wants
        config.update(
            rope_traditional=True,
            attention_bias="blk.0.attn_q.bias" in names,
            mlp_bias="blk.0.ffn_up.bias" in names,
        )
    elif meta.arch == "qwen2" and head_dim != hidden // heads:
        raise GGUFImportError(f"qwen2 with head_dim {head_dim} ≠ hidden/heads is not supported by mlx-lm's qwen2")
    if meta.arch in ("gemma2", "gemma3"):
        config["query_pre_attn_scalar"] = _query_pre_attn_scalar(
            meta, hidden=hidden, heads=heads, head_dim=head_dim, layers=layers
        )
    if meta.arch == "gemma2":
        config["attn_logit_softcapping"] = _f32(meta.get("{arch}.attn_logit_softcapping", 50.0))
        config["final_logit_softcapping"] = _f32(meta.get("{arch}.final_logit_softcapping", 30.0))
    if meta.arch == "gemma3":
        config.update(
            sliding_window=int(meta.get("{arch}.attention.sliding_window", 512)),
            sliding_window_pattern=_sliding_window_pattern(meta, layers),
            rope_local_base_freq=_f32(meta.get("{arch}.rope.freq_base_swa", 10000.0)),
        )
    return config


# --- tensors ------------------------------------------------------------------------------------------------


def _mlx_name(family: Family, name: str) -> str | None:
    """The mlx-lm name of a GGUF tensor; None for one mlx-lm recomputes; GGUFImportError for an unknown one."""
    if match := _BLOCK_RE.match(name):
        layer, part, kind = match.groups()
        if part in family.skip:
            return None
        if part in family.block:
            return f"model.layers.{layer}.{family.block[part]}.{kind}"
    elif match := _GLOBAL_RE.match(name):
        part, kind = match.groups()
        if part in family.skip:
            return None
        if part in _GLOBALS and (part != "output" or family.has_lm_head):
            return f"{_GLOBALS[part]}.{kind}"
    raise GGUFImportError(f"tensor {name!r} has no counterpart in mlx-lm's {family.model_type}; not supported")


@cache
def _dequantizable(type_name: str) -> bool:
    """Whether gguf-py can turn this ggml type into floats (probed on one block of zeros)."""
    from gguf import GGMLQuantizationType
    from gguf.constants import GGML_QUANT_SIZES
    from gguf.quants import dequantize

    qtype = GGMLQuantizationType[type_name]
    try:
        dequantize(np.zeros(GGML_QUANT_SIZES[qtype][1], dtype=np.uint8), qtype)
    except (NotImplementedError, ValueError, TypeError):
        return False
    return True


def dequantize_tensor(tensor) -> np.ndarray:
    """One GGUF tensor as float32, in numpy (row-major, outermost dimension first) order."""
    from gguf.quants import dequantize

    shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
    values = dequantize(tensor.data, tensor.tensor_type)
    return np.ascontiguousarray(values, dtype=np.float32).reshape(shape)


def native_affine(tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Repack a Q4_0/Q4_1/Q8_0 tensor into MLX's affine layout (packed uint32 weight, float32 scales and biases).

    ggml blocks are 32 values with a float16 scale ``d`` (Q4_1 also a float16 offset ``m``): Q8_0 is
    ``d·q`` for int8 q, Q4_0 is ``d·(q−8)``, Q4_1 is ``d·q + m`` for 4-bit q. MLX stores unsigned q with
    ``w = scale·q + bias``, so Q8_0 shifts q by 128 (bias −128·d) and Q4_0 takes bias −8·d; every product is
    exact in float32, so the dequantized values are the ones gguf-py computes. ggml puts a block's first 16
    values in the low nibbles and the next 16 in the high ones; MLX packs consecutive values from bit 0 up.
    """
    kind = tensor.tensor_type.name
    rows, cols = (int(d) for d in reversed(tensor.shape.tolist()))
    raw = np.asarray(tensor.data, dtype=np.uint8).reshape(rows, cols // NATIVE_GROUP, -1)
    d = raw[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    if kind == "Q8_0":
        q = (raw[..., 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
        return q.reshape(rows, -1).view(np.uint32), d, -128.0 * d
    start = 2 if kind == "Q4_0" else 4
    nibbles = raw[..., start : start + 16]
    values = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=-1)
    packed = (values[..., 0::2] | (values[..., 1::2] << 4)).astype(np.uint8)
    weight = np.ascontiguousarray(packed.reshape(rows, -1)).view(np.uint32)
    if kind == "Q4_0":
        return weight, d, -8.0 * d
    m = raw[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    return weight, d, m


@dataclass
class _Item:
    """One GGUF tensor and what it becomes."""

    tensor: Any
    name: str  # mlx-lm name
    native: bool = False  # repacked as-is (q_bits="keep")
    quantize: dict | None = None  # mx.quantize parameters (q_bits=4|8)

    @property
    def module(self) -> str:
        return self.name.rsplit(".", 1)[0]

    def out_bytes(self) -> int:
        n = int(self.tensor.n_elements)
        if self.native:
            return n * NATIVE_BITS[self.tensor.tensor_type.name] // 8 + 2 * 4 * (n // NATIVE_GROUP)
        if self.quantize:
            return n * self.quantize["bits"] // 8 + 2 * 4 * (n // self.quantize["group_size"])
        return 4 * n


def _shards(items: list[_Item], max_bytes: int) -> list[list[_Item]]:
    """Consecutive items grouped into shards of at most ``max_bytes`` (a bigger tensor gets a shard alone)."""
    shards: list[list[_Item]] = [[]]
    size = 0
    for item in items:
        nbytes = item.out_bytes()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += nbytes
    return [s for s in shards if s]


def _convert(item: _Item, shift: float) -> dict[str, mx.array]:
    """One tensor in its output form, evaluated (so the source pages and numpy copies can go)."""
    module = item.module
    if item.native:
        weight, scales, biases = native_affine(item.tensor)
        out = {item.name: mx.array(weight), f"{module}.scales": mx.array(scales), f"{module}.biases": mx.array(biases)}
    else:
        values = dequantize_tensor(item.tensor)
        if shift and item.name.endswith("norm.weight"):
            values = values - np.float32(shift)
        value = mx.array(values)
        del values
        if item.quantize:
            w, scales, biases = mx.quantize(value, **item.quantize)
            out = {item.name: w, f"{module}.scales": scales, f"{module}.biases": biases}
        else:
            out = {item.name: value}
    mx.eval(list(out.values()))
    return out


def _keep_plan(items: list[_Item], quantizable: set[str]) -> QuantPlan:
    """Mark the Q4_0/Q4_1/Q8_0 weights of quantizable modules as kept; their per-module MLX parameters."""
    plan: QuantPlan = {}
    for item in items:
        bits = NATIVE_BITS.get(item.tensor.tensor_type.name)
        if bits and item.name.endswith(".weight") and item.module in quantizable:
            item.native = True
            plan[item.module] = {"group_size": NATIVE_GROUP, "bits": bits, "mode": "affine"}
    return plan


def _keep_entry(plan: QuantPlan, quantizable: set[str]) -> dict[str, Any]:
    """The config's ``quantization``: the most common bits as default, overrides for the others.

    mlx-lm applies ``quantization[path]`` to a module before the default; a quantizable layer the file keeps in
    another format gets ``False``, so it loads as the float layer it is whatever the reader's default.
    """
    common = Counter(p["bits"] for p in plan.values()).most_common(1)[0][0]
    entry: dict[str, Any] = {"group_size": NATIVE_GROUP, "bits": common, "mode": "affine"}
    entry.update({m: {"group_size": NATIVE_GROUP, "bits": p["bits"]} for m, p in plan.items() if p["bits"] != common})
    entry.update(dict.fromkeys(sorted(quantizable - plan.keys()), False))
    return entry


def _expected_shapes(skeleton: nn.Module, plan: QuantPlan, tied: bool) -> dict[str, tuple[int, ...]]:
    """Tensor name → shape a strict ``load_weights`` asks for once ``plan`` is applied (nothing is computed)."""
    nn.quantize(skeleton, class_predicate=lambda path, _: plan.get(path, False))
    shapes = {name: tuple(v.shape) for name, v in tree_flatten(skeleton.parameters())}
    return {k: v for k, v in shapes.items() if not (tied and k.startswith("lm_head."))}


def _predicted_shape(item: _Item) -> dict[str, tuple[int, ...]]:
    shape = tuple(int(d) for d in reversed(item.tensor.shape.tolist()))
    if not (item.native or item.quantize):
        return {item.name: shape}
    bits = NATIVE_BITS[item.tensor.tensor_type.name] if item.native else item.quantize["bits"]
    group = NATIVE_GROUP if item.native else item.quantize["group_size"]
    rows, cols = shape
    groups = (rows, cols // group)
    return {item.name: (rows, cols * bits // 32), f"{item.module}.scales": groups, f"{item.module}.biases": groups}


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


# --- import -------------------------------------------------------------------------------------------------


def _iter_shards(shards: list[list[_Item]], shift: float, progress: bool) -> Iterator[dict[str, mx.array]]:
    """Each output shard's tensors, converted one source tensor at a time, with a progress bar on stderr."""
    from tqdm import tqdm

    total = sum(int(item.tensor.n_bytes) for shard in shards for item in shard)
    with tqdm(total=total, unit="B", unit_scale=True, desc="gguf → mlx", file=sys.stderr, disable=not progress) as bar:
        for shard in shards:
            tensors: dict[str, mx.array] = {}
            for item in shard:
                tensors.update(_convert(item, shift))
                bar.update(int(item.tensor.n_bytes))
            yield tensors


def import_gguf(
    src: Path,
    out: Path,
    *,
    q_bits: int | Literal["keep"] | None = "keep",
    group_size: int = 64,
    progress: bool = True,
) -> PreparedModel:
    """Translate the GGUF ``src`` into an mlx-lm model directory ``out`` (weights, config, tokenizer).

    ``q_bits="keep"``: Q4_0/Q4_1/Q8_0 tensors stay quantized (MLX affine, group 32, bit-exact), everything else
    becomes float32. ``None``: everything float32. ``4``/``8``: everything re-quantized from the dequantized
    values with ``group_size``, as ``mlx_lm.convert`` would. ``out`` must not exist; the result appears there
    atomically. Raises :class:`GGUFImportError` for an architecture, tensor type or tokenizer it cannot translate.
    """
    src, out = Path(src), Path(out)
    if out.exists():
        raise FileExistsError(f"{out} already exists; choose a new --out or remove it")
    if q_bits not in ("keep", None, 2, 3, 4, 5, 6, 8):
        raise ValueError(f"q_bits must be 'keep', None or one of 2, 3, 4, 5, 6, 8, not {q_bits!r}")
    log = (lambda msg: print(f"solverx prepare: {msg}", file=sys.stderr)) if progress else (lambda _msg: None)

    reader = _open(src)
    meta = Metadata(reader)
    tensors = {t.name: t for t in reader.tensors}
    for t in reader.tensors:
        if not _dequantizable(t.tensor_type.name):
            raise GGUFImportError(f"tensor {t.name!r} has ggml type {t.tensor_type.name}, which is not supported")
    if "token_embd.weight" not in tensors:
        raise GGUFImportError("the file has no token_embd.weight")
    vocab_size = int(tensors["token_embd.weight"].shape[1])
    config = model_config(meta, set(tensors), vocab_size)  # refuses an unknown architecture
    family = FAMILIES[meta.arch]
    vocab = Vocab.read(meta)
    if len(vocab.tokens) > vocab_size:
        raise GGUFImportError(f"{len(vocab.tokens)} tokens but an embedding for {vocab_size}")
    tokenizer = build_tokenizer(vocab, meta.arch)  # before any weight is converted: an unsupported one fails fast
    if ids := eos_token_ids(vocab):
        config["eos_token_id"] = ids[0] if len(ids) == 1 else ids
    if "bos" in vocab.special_ids:
        config["bos_token_id"] = vocab.special_ids["bos"]

    items: list[_Item] = []
    dropped = 0
    for t in reader.tensors:
        name = _mlx_name(family, t.name)
        if name is None:
            dropped += 1
        else:
            items.append(_Item(t, name))
    if meta.arch == "llama" and "rope_freqs.weight" in tensors:
        scaling = llama3_rope_scaling(dequantize_tensor(tensors["rope_freqs.weight"]), config["rope_theta"],
                                      config["head_dim"])  # fmt: skip
        if scaling is not None:
            config["rope_scaling"] = scaling

    # A skeleton of the target model, never evaluated: it says which modules are quantizable and which tensor
    # names and shapes a strict load expects, so a mismatch is refused before anything is written.
    model_class, args_class = _get_classes(config)
    skeleton = model_class(args_class.from_dict(config))
    num_parameters = sum(v.size for k, v in tree_flatten(skeleton.parameters()) if not k.startswith("lm_head."))
    if not config["tie_word_embeddings"]:
        num_parameters += skeleton.lm_head.weight.size
    quantizable = {path for path, m in skeleton.named_modules() if hasattr(m, "to_quantized")}
    plan: QuantPlan = {}
    if q_bits == "keep":
        plan = _keep_plan(items, quantizable)
        if plan:
            tied = {"lm_head"} if config["tie_word_embeddings"] else set()
            config["quantization"] = _keep_entry(plan, quantizable - tied)
    elif q_bits is not None:
        plan, config["quantization"] = quantization_plan(skeleton, q_bits, group_size)
        for item in items:
            if item.name.endswith(".weight") and item.module in plan:
                item.quantize = {k: plan[item.module][k] for k in ("group_size", "bits", "mode")}
    expected = _expected_shapes(skeleton, plan, config["tie_word_embeddings"])
    predicted: dict[str, tuple[int, ...]] = {}
    for item in items:
        predicted.update(_predicted_shape(item))
    missing, unexpected = expected.keys() - predicted.keys(), predicted.keys() - expected.keys()
    wrong = sorted(k for k in expected.keys() & predicted.keys() if expected[k] != predicted[k])
    if missing or unexpected or wrong:
        raise GGUFImportError(
            f"the tensors do not match mlx-lm's {config['model_type']}: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}, wrong shape {[(k, predicted[k], expected[k]) for k in wrong[:3]]}"
        )
    del skeleton

    types = Counter(t.tensor_type.name for t in reader.tensors)
    native = sum(i.native for i in items)
    log(
        f"GGUF {meta.arch} → mlx-lm {config['model_type']}: {len(items)} tensors "
        f"({', '.join(f'{k} {v}' for k, v in types.most_common())}), {num_parameters / 1e6:,.1f}M parameters"
    )
    if q_bits == "keep":
        log(f"keeping {native} Q4_0/Q4_1/Q8_0 tensors quantized; dequantizing {len(items) - native} to float32")
        if native < len(items) // 2:
            log("most tensors are in formats MLX cannot read as they are: --q-bits 4 or 8 gives a smaller model")
    elif q_bits is not None and any(name not in ("F32", "F16", "BF16") for name in types):
        log(f"re-quantizing already quantized weights to {q_bits} bits adds a second rounding; keep is exact")

    partial = out.with_name(f".{out.name}.partial")
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    try:
        shards = _shards(items, MAX_SHARD_BYTES)
        writer = ShardWriter(partial, total_shards=len(shards))
        for converted in _iter_shards(shards, family.norm_shift, progress):
            writer.write(converted)
            del converted
            mx.clear_cache()
        writer.finish(total_parameters=num_parameters)
        save_config(config, partial / "config.json")
        write_tokenizer(tokenizer, vocab, partial, model_max_length=config["max_position_embeddings"])
        partial.rename(out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise

    quantization = config.get("quantization") or {}
    result = PreparedModel(
        path=out,
        model_type=config["model_type"],
        extracted_from_vlm=False,
        q_bits=quantization.get("bits"),
        group_size=quantization.get("group_size", group_size),
        num_parameters=num_parameters,
        weight_bytes=writer.total_bytes,
        dropped_tensors=dropped,
        context_limit=context_limit(config),
        fingerprint=base_fingerprint(out),
    )
    log(f"wrote {out} ({writer.total_bytes / 2**30:.2f} GiB, {result.fingerprint})")
    return result
