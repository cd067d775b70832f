"""GGUF tensors: llama.cpp names to mlx-lm names, block formats kept as MLX quantized layers or dequantized."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from solverx.models.gguf_import.metadata import (
    _BLOCK_RE,
    _GLOBAL_RE,
    _GLOBALS,
    NATIVE_BITS,
    NATIVE_GROUP,
    Family,
    GGUFImportError,
)  # fmt: skip
from solverx.models.prepare import QuantPlan

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
