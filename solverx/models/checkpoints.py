"""Read and write safetensors checkpoints one shard at a time.

A 32B checkpoint is ~64 GB in 16-bit, more than the Mac that prepares it. ``mx.load`` maps a shard lazily,
so a tensor we drop is never read, and a shard we have written is released before the next one is opened:
peak memory stays near one shard instead of the whole model.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path

import mlx.core as mx

INDEX_FILE = "model.safetensors.index.json"

_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "U32": 4, "I16": 2, "U16": 2}


def safetensors_header(path: Path) -> dict[str, dict]:
    """Tensor name → ``{"dtype", "shape", "data_offsets"}``, read from the header only (no tensor data)."""
    with Path(path).open("rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    header.pop("__metadata__", None)
    return header


def tensor_nbytes(entry: dict) -> int:
    """Bytes of one header entry."""
    start, end = entry["data_offsets"]
    return end - start


def shard_layout(model_dir: Path) -> dict[str, list[str]]:
    """Shard file name → its tensor names, in shard order.

    Uses ``model.safetensors.index.json`` when present, else every ``model*.safetensors`` (falling back to any
    ``*.safetensors``) read from the headers.
    """
    model_dir = Path(model_dir)
    index = model_dir / INDEX_FILE
    if index.exists():
        layout: dict[str, list[str]] = {}
        for name, shard in json.loads(index.read_text())["weight_map"].items():
            layout.setdefault(shard, []).append(name)
        return dict(sorted(layout.items()))
    files = sorted(model_dir.glob("model*.safetensors")) or sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no safetensors weights in {model_dir}")
    return {f.name: list(safetensors_header(f)) for f in files}


def shard_sizes(model_dir: Path) -> dict[str, int]:
    """Shard file name → bytes on disk."""
    return {name: (Path(model_dir) / name).stat().st_size for name in shard_layout(model_dir)}


def iter_shards(model_dir: Path) -> Iterator[tuple[str, dict[str, mx.array]]]:
    """Each shard's tensors, lazily mapped: nothing is read until a tensor is evaluated."""
    for name in shard_layout(model_dir):
        yield name, mx.load(str(Path(model_dir) / name))


def output_shard_name(i: int, total: int) -> str:
    """mlx-lm's naming: ``model.safetensors`` alone, else ``model-0000i-of-0000n.safetensors``."""
    return "model.safetensors" if total == 1 else f"model-{i:05d}-of-{total:05d}.safetensors"


class ShardWriter:
    """Writes output shards one at a time and the index that maps every tensor to its shard."""

    def __init__(self, out_dir: Path, total_shards: int) -> None:
        self.out_dir = Path(out_dir)
        self.total_shards = total_shards
        self.weight_map: dict[str, str] = {}
        self.total_bytes = 0
        self._written = 0

    def write(self, tensors: dict[str, mx.array]) -> Path:
        """Save one shard; the caller drops its references afterwards so the memory can go back."""
        self._written += 1
        if self._written > self.total_shards:
            raise ValueError(f"more than the {self.total_shards} announced shards")
        name = output_shard_name(self._written, self.total_shards)
        path = self.out_dir / name
        mx.save_safetensors(str(path), tensors, metadata={"format": "mlx"})
        self.weight_map.update(dict.fromkeys(tensors, name))
        self.total_bytes += sum(v.nbytes for v in tensors.values())
        return path

    def finish(self, total_parameters: int | None = None) -> None:
        """Write ``model.safetensors.index.json`` (mlx-lm writes one even for a single shard)."""
        if self._written != self.total_shards:
            raise ValueError(f"wrote {self._written} of {self.total_shards} shards")
        metadata: dict[str, int] = {"total_size": self.total_bytes}
        if total_parameters is not None:
            metadata["total_parameters"] = total_parameters
        index = {"metadata": metadata, "weight_map": dict(sorted(self.weight_map.items()))}
        (self.out_dir / INDEX_FILE).write_text(json.dumps(index, indent=4))
