"""GGUF metadata: the architectures we import, the hyperparameters, and the model config they become."""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

NATIVE_BITS = {"Q4_0": 4, "Q4_1": 4, "Q8_0": 8}
NATIVE_GROUP = 32
MAX_SHARD_BYTES = 2 * 2**30

_BLOCK_RE = re.compile(r"^blk\.(\d+)\.(.+)\.(weight|bias)$")
_GLOBAL_RE = re.compile(r"^([a-z_]+)\.(weight|bias)$")


class GGUFImportError(ValueError):
    """The GGUF uses something this importer cannot translate; the message names it."""


# --- where an imported model came from ----------------------------------------------------------------------

SOURCE_RECORD = "gguf-source.json"  # in the imported model directory; written by import_gguf


@dataclass(frozen=True)
class GGUFSource:
    """The GGUF file a model directory was imported from: what an export back to GGUF builds on."""

    path: Path
    architecture: str
    size: int

    def to_json(self) -> str:
        return json.dumps({"path": str(self.path), "architecture": self.architecture, "size": self.size}, indent=2)

    @classmethod
    def of(cls, model_dir: Path) -> GGUFSource | None:
        """The record in ``model_dir``; None when it was not imported from GGUF (or before records were kept)."""
        try:
            raw = json.loads((Path(model_dir) / SOURCE_RECORD).read_text(encoding="utf-8"))
            return cls(Path(raw["path"]), str(raw["architecture"]), int(raw["size"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def check(self) -> Path:
        """The source file, if it is still there and the same size; GGUFImportError saying what changed if not."""
        if not self.path.is_file():
            raise GGUFImportError(f"the GGUF this base was imported from, {self.path}, is gone")
        if self.path.stat().st_size != self.size:
            raise GGUFImportError(f"{self.path} changed since this base was imported from it (size differs)")
        return self.path


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


def _query_pre_attn_scalar(meta: Metadata, *, hidden: int, heads: int, head_dim: int, layers: int) -> float | int:
    """Gemma 2/3's attention scale, which llama.cpp keeps out of the metadata for most files.

    llama.cpp scales queries by 1/sqrt(head_dim), except for the 27B models (Gemma 2 with 46 layers, Gemma 3
    with 62), whose ``query_pre_attn_scalar`` is hidden/heads; ``{arch}.attention.scale`` wins when present.
    An integer stays an int: transformers 5 types the field so, and refuses the whole config (tokenizer included)
    over ``16.0``.
    """
    scale = meta.get("{arch}.attention.scale")
    if scale:
        value = round(float(scale) ** -2, 3)
        return int(value) if value.is_integer() else value
    if (meta.arch, layers) in (("gemma2", 46), ("gemma3", 62)):
        return hidden // heads
    return head_dim


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
