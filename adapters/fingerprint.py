"""A base model's fingerprint: what an adapter must have been trained on to be served on it.

It hashes the config and every tensor's name, dtype and shape (read from the safetensors headers, so it costs
milliseconds even for a 33 GB model) — enough to tell two architectures or quantizations apart without hashing
gigabytes of weights.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path


def _safetensors_header(path: Path) -> dict:
    with path.open("rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(length))


def base_fingerprint(model_dir: Path) -> str:
    """``sha256:<hex>`` over the model's config and tensor layout."""
    model_dir = Path(model_dir)
    digest = hashlib.sha256()
    config = json.loads((model_dir / "config.json").read_text())
    digest.update(json.dumps(config, sort_keys=True).encode())
    for shard in sorted(model_dir.glob("*.safetensors")):
        header = _safetensors_header(shard)
        header.pop("__metadata__", None)
        for name in sorted(header):
            digest.update(f"{name}:{header[name]['dtype']}:{header[name]['shape']}\n".encode())
    return "sha256:" + digest.hexdigest()[:32]
