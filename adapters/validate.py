"""Check an adapter against its base before it is registered, so a bad file is refused once, with a clear
reason, instead of crashing the server or being silently ignored when loaded (mlx-lm #1248, vLLM PR #11727).

The base is never loaded: its Linear shapes come from ``config.json`` and the safetensors headers, so checking
an adapter for a 33 GB base costs milliseconds plus one read of the (small) adapter file.
"""

from __future__ import annotations

import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from solverx import safejson
from solverx.adapters.errors import AdapterError, BaseMismatch, InvalidAdapter
from solverx.adapters.fingerprint import base_fingerprint

ADAPTER_WEIGHTS = "adapters.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
MANIFEST = "manifest.json"
MAX_RANK = 256

_HEADER_LIMIT = 100 * 1024 * 1024
_DTYPE_SIZES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}  # fmt: skip
# dtype -> (unsigned view, exponent mask, mantissa mask): NaN/Inf have all their exponent bits set.
_FLOAT_BITS = {
    "F32": (np.dtype("<u4"), 0x7F800000, 0x007FFFFF),
    "F16": (np.dtype("<u2"), 0x7C00, 0x03FF),
    "BF16": (np.dtype("<u2"), 0x7F80, 0x007F),
}
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_EMBEDDING_LEAVES = {"wte", "wpe"}
_MAX_LISTED = 10


@dataclass(frozen=True)
class TensorInfo:
    """One entry of a safetensors header; ``begin``/``end`` are offsets into the file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class AdapterSummary:
    """What validation learned about an adapter; the registry copies it into the version's manifest."""

    rank: int
    scale: float
    dropout: float
    num_layers: int
    modules: tuple[str, ...]
    dtypes: tuple[str, ...]
    num_params: int
    size_bytes: int
    base_fingerprint: str
    config: dict[str, Any]


def read_safetensors_header(path: Path, *, error: type[AdapterError] = InvalidAdapter) -> dict[str, TensorInfo]:
    """Parse and bounds-check a safetensors header; a truncated or corrupt file raises ``error``."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise error(f"{path.name}: truncated safetensors file ({size} bytes, no header)")
            (length,) = struct.unpack("<Q", prefix)
            if length > min(_HEADER_LIMIT, size - 8):
                raise error(
                    f"{path.name}: truncated or corrupt safetensors file (header of {length} bytes, file of {size})"
                )
            raw = f.read(length)
    except OSError as exc:
        raise error(f"{path.name}: cannot read: {exc}") from exc
    try:
        header = safejson.loads(raw)  # every byte of an adapter is hostile: no depth, number or text may break us
    except ValueError as exc:  # bad JSON, bad UTF-8, or safejson.UnsafeJSON
        raise error(f"{path.name}: corrupt safetensors header: {exc}") from None
    if not isinstance(header, dict):
        raise error(f"{path.name}: corrupt safetensors header: not a JSON object")
    header.pop("__metadata__", None)
    data_start, data_size = 8 + length, size - 8 - length
    tensors = {}
    for name, entry in header.items():
        tensors[name] = info = _tensor_info(path, name, entry, data_start, error)
        if info.end - data_start > data_size:
            raise error(
                f"{path.name}: truncated safetensors file: tensor {name!r} ends at byte {info.end}, "
                f"the file has {size} bytes"
            )
    return tensors


def _tensor_info(path: Path, name: str, entry: Any, data_start: int, error: type[AdapterError]) -> TensorInfo:
    try:
        dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        if not all(isinstance(d, int) and d >= 0 for d in shape) or not 0 <= begin <= end:
            raise ValueError
    except (KeyError, TypeError, ValueError) as exc:
        raise error(f"{path.name}: corrupt safetensors header entry for {name!r}") from exc
    if dtype in _DTYPE_SIZES and end - begin != math.prod(shape) * _DTYPE_SIZES[dtype]:
        raise error(f"{path.name}: corrupt safetensors header: {name!r} has {end - begin} bytes for shape {shape}")
    return TensorInfo(name, dtype, shape, data_start + begin, data_start + end)


def base_linear_shapes(model_dir: Path) -> dict[str, tuple[int, int]]:
    """Every Linear of the base as module path → ``(in, out)``, from headers only (quantized bases too)."""
    model_dir = Path(model_dir)
    config = _read_json(model_dir / "config.json", AdapterError, f"base model {model_dir}")
    shards = sorted(model_dir.glob("*.safetensors"))
    if not shards:
        raise AdapterError(f"base model {model_dir}: no *.safetensors weights")
    tensors: dict[str, TensorInfo] = {}
    for shard in shards:
        tensors.update(read_safetensors_header(shard, error=AdapterError))
    shapes = {}
    for key, weight in tensors.items():
        path, _, leaf = key.rpartition(".")
        if leaf != "weight" or len(weight.shape) != 2 or _is_embedding(path):
            continue
        out_dims, in_dims = weight.shape
        if f"{path}.scales" in tensors:
            in_dims = _quantized_in_dims(path, weight, tensors[f"{path}.scales"], config)
        shapes[path] = (in_dims, out_dims)
    return shapes


def _is_embedding(path: str) -> bool:
    leaf = path.rpartition(".")[2]
    return "embed" in leaf or leaf in _EMBEDDING_LEAVES


def _quantized_in_dims(path: str, weight: TensorInfo, scales: TensorInfo, config: dict) -> int:
    """Quantized weights pack ``32 / bits`` values per uint32; mlx-lm records bits globally or per layer."""
    quant = config.get("quantization") or config.get("quantization_config") or {}
    layer = quant.get(path)
    params = layer if isinstance(layer, dict) else quant
    bits, group_size = params.get("bits"), params.get("group_size", 64)
    if weight.dtype == "U32" and isinstance(bits, int) and bits > 0:
        return weight.shape[1] * 32 // bits
    return scales.shape[-1] * group_size


def validate_adapter(
    adapter_dir: Path,
    base_dir: Path,
    *,
    expected_fingerprint: str | None = None,
    base_shapes: dict[str, tuple[int, int]] | None = None,
    read_values: bool = True,
) -> AdapterSummary:
    """Refuse anything the server could not serve on ``base_dir``; return what the adapter is.

    ``expected_fingerprint`` (or a ``base_fingerprint`` in the adapter's own ``manifest.json``) must match
    the base.
    ``base_shapes`` skips re-reading the base headers when the caller already has them. ``read_values=False``
    checks only what the header and config say (the registry does that before it copies anything).
    """
    adapter_dir, base_dir = Path(adapter_dir), Path(base_dir)
    weights_path = adapter_dir / ADAPTER_WEIGHTS
    if not weights_path.is_file():
        raise InvalidAdapter(f"adapter: {ADAPTER_WEIGHTS} is missing")
    config = _read_json(adapter_dir / ADAPTER_CONFIG, InvalidAdapter, "adapter")
    rank, scale, dropout, num_layers, keys = _check_config(config)

    shapes = base_linear_shapes(base_dir) if base_shapes is None else base_shapes
    fingerprint = base_fingerprint(base_dir)
    if expected_fingerprint is None:
        expected_fingerprint = declared_fingerprint(adapter_dir)
    if expected_fingerprint is not None and expected_fingerprint != fingerprint:
        raise BaseMismatch(f"adapter was trained on base {expected_fingerprint}, but {base_dir.name} is {fingerprint}")

    tensors = read_safetensors_header(weights_path)
    modules = _check_tensors(tensors, shapes, rank, num_layers, keys)
    if read_values:
        _check_values(weights_path, tensors)
    return AdapterSummary(
        rank=rank,
        scale=scale,
        dropout=dropout,
        num_layers=num_layers,
        modules=tuple(sorted(modules)),
        dtypes=tuple(sorted({t.dtype for t in tensors.values()})),
        num_params=sum(math.prod(t.shape) for t in tensors.values()),
        size_bytes=weights_path.stat().st_size,
        base_fingerprint=fingerprint,
        config=config,
    )


def declared_fingerprint(adapter_dir: Path) -> str | None:
    """The base fingerprint claimed by the adapter's own ``manifest.json`` (an export of a registry), if any."""
    path = Path(adapter_dir) / MANIFEST
    if not path.is_file():
        return None
    value = _read_json(path, InvalidAdapter, "adapter").get("base_fingerprint")
    return value if isinstance(value, str) else None


def _read_json(path: Path, error: type[AdapterError], what: str) -> dict:
    try:
        value = safejson.loads(path.read_bytes())
    except FileNotFoundError as exc:
        raise error(f"{what}: {path.name} is missing") from exc
    except (OSError, ValueError) as exc:  # bad JSON, bad UTF-8, or safejson.UnsafeJSON
        raise error(f"{what}: {path.name} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise error(f"{what}: {path.name} is not a JSON object")
    return value


def _check_config(config: dict) -> tuple[int, float, float, int, frozenset[str] | None]:
    """The fields mlx-lm's ``load_adapters`` needs; extra keys (model, data, iters, ...) are fine."""
    kind = config.get("fine_tune_type", "lora")
    if kind == "dora":
        raise InvalidAdapter(
            "DoRA adapters are not supported (fine_tune_type 'dora'); train with fine_tune_type 'lora'"
        )
    if kind == "full":
        raise InvalidAdapter("full fine-tunes are not adapters (fine_tune_type 'full'); only LoRA can be registered")
    if kind != "lora":
        raise InvalidAdapter(f"adapter_config.json: unknown fine_tune_type {kind!r}; expected 'lora'")
    num_layers = config.get("num_layers")
    if not _is_int(num_layers):
        raise InvalidAdapter(f"adapter_config.json: num_layers must be an integer, got {num_layers!r}")
    params = config.get("lora_parameters")
    if not isinstance(params, dict):
        raise InvalidAdapter("adapter_config.json: lora_parameters {rank, scale, dropout} is missing")
    rank, scale, dropout = params.get("rank"), params.get("scale"), params.get("dropout", None)
    if not _is_int(rank) or not 1 <= rank <= MAX_RANK:
        raise InvalidAdapter(
            f"adapter_config.json: lora_parameters.rank must be an integer in 1..{MAX_RANK}, got {rank!r}"
        )
    if not _is_number(scale) or not math.isfinite(scale):
        hint = " (mlx-lm uses 'scale', not 'alpha')" if "alpha" in params else ""
        raise InvalidAdapter(f"adapter_config.json: lora_parameters.scale must be a finite number, got {scale!r}{hint}")
    if not _is_number(dropout) or not 0 <= dropout < 1:
        raise InvalidAdapter(f"adapter_config.json: lora_parameters.dropout must be in [0, 1), got {dropout!r}")
    keys = params.get("keys")
    if keys is not None and not (isinstance(keys, list) and all(isinstance(k, str) for k in keys)):
        raise InvalidAdapter(f"adapter_config.json: lora_parameters.keys must be a list of strings, got {keys!r}")
    return rank, float(scale), float(dropout), num_layers, None if keys is None else frozenset(keys)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_tensors(
    tensors: dict[str, TensorInfo],
    shapes: dict[str, tuple[int, int]],
    rank: int,
    num_layers: int,
    keys: frozenset[str] | None,
) -> set[str]:
    """Every key must be the ``lora_a``/``lora_b`` of a Linear that mlx-lm would convert for this config."""
    if not tensors:
        raise InvalidAdapter(f"{ADAPTER_WEIGHTS} holds no tensors")
    total_layers = 1 + max((int(m[1]) for p in shapes if (m := _LAYER.search(p))), default=-1)
    first_layer = total_layers - num_layers if 0 < num_layers < total_layers else 0
    problems: list[str] = []
    halves: dict[str, set[str]] = {}
    for name, info in sorted(tensors.items()):
        module, _, leaf = name.rpartition(".")
        if leaf not in ("lora_a", "lora_b"):
            hint = " (a DoRA magnitude vector)" if leaf == "m" else ""
            problems.append(f"unknown key {name!r}{hint}: expected '<module>.lora_a' or '<module>.lora_b'")
            continue
        if module not in shapes:
            problems.append(f"key {name!r}: the base has no Linear layer {module!r}")
            continue
        halves.setdefault(module, set()).add(leaf)
        problem = _check_placement(name, module, first_layer, num_layers, keys) or _check_layout(
            name, info, leaf, shapes[module], rank
        )
        if problem:
            problems.append(problem)
    for module, leaves in sorted(halves.items()):
        if len(leaves) == 1:
            missing = "lora_b" if "lora_a" in leaves else "lora_a"
            problems.append(f"key {module}.{missing} is missing (each module needs lora_a and lora_b)")
    if problems:
        listed = problems[:_MAX_LISTED]
        if len(problems) > _MAX_LISTED:
            listed.append(f"... and {len(problems) - _MAX_LISTED} more")
        raise InvalidAdapter(f"{ADAPTER_WEIGHTS} does not fit the base:\n  " + "\n  ".join(listed))
    return set(halves)


def _check_placement(
    name: str, module: str, first_layer: int, num_layers: int, keys: frozenset[str] | None
) -> str | None:
    """mlx-lm converts only the last ``num_layers`` blocks, and only ``keys`` when given; nothing else loads."""
    match = _LAYER.search(module)
    relative = module[match.end() :] if match else module
    if match and int(match[1]) < first_layer:
        return f"key {name!r}: layer {match[1]} is outside the last num_layers={num_layers} layers"
    if keys is not None and relative not in keys:
        return f"key {name!r}: {relative!r} is not in lora_parameters.keys {sorted(keys)}"
    if keys is None and not match:
        return f"key {name!r}: a module outside the layers needs lora_parameters.keys to name it"
    return None


def _check_layout(name: str, info: TensorInfo, leaf: str, in_out: tuple[int, int], rank: int) -> str | None:
    """``lora_a`` is ``(in, rank)`` and ``lora_b`` is ``(rank, out)``, in a float dtype."""
    if info.dtype not in _FLOAT_BITS:
        return f"key {name!r}: dtype {info.dtype} is not float32, float16 or bfloat16"
    expected = (in_out[0], rank) if leaf == "lora_a" else (rank, in_out[1])
    if info.shape != expected:
        layout = "(in, rank)" if leaf == "lora_a" else "(rank, out)"
        return f"key {name!r}: expected shape {layout} = {expected}, got {info.shape}"
    return None


def _check_values(path: Path, tensors: dict[str, TensorInfo]) -> None:
    """NaN/Inf anywhere make every answer garbage; find them by their exponent bits (no float conversion)."""
    with path.open("rb") as f:
        for name, info in sorted(tensors.items()):
            view, exponent, mantissa = _FLOAT_BITS[info.dtype]
            f.seek(info.begin)
            bits = np.frombuffer(f.read(info.end - info.begin), dtype=view)
            special = (bits & exponent) == exponent
            if special.any():
                nans = int(((bits & mantissa) != 0)[special].sum())
                infs = int(special.sum()) - nans
                raise InvalidAdapter(f"key {name!r} contains {nans} NaN and {infs} Inf values")
