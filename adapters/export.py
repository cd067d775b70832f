"""Take an adapter elsewhere: ``solverx adapters export NAME[@N] --format gguf|peft|fused --out PATH``.

Our versions are mlx-lm LoRA adapters (``adapters.safetensors``: ``<module>.lora_a`` of shape (in, r) and
``<module>.lora_b`` of shape (r, out); ``y = W·x + scale·(x·A)·B``). Three ways out, each in its consumer's own
layout:

- ``gguf``: a llama.cpp LoRA adapter (what ``llama-server --lora`` and Ollama's ``ADAPTER`` read), written with
  gguf-py: ``general.type = adapter``, ``adapter.type = lora``, ``adapter.lora.alpha = scale·r`` (llama.cpp scales
  by alpha / r), tensors ``blk.N.<tensor>.weight.lora_a`` (r, in) and ``.lora_b`` (out, r). Only for a base
  imported from GGUF, whose tensors are the ones llama.cpp will load: their rows are in llama.cpp's order already
  (the importer keeps its q/k permutation), so the adapter's are too.
- ``peft``: Hugging Face PEFT's ``adapter_model.safetensors`` + ``adapter_config.json`` (``lora_A`` (r, in),
  ``lora_B`` (out, r), ``lora_alpha = scale·r``) for the transformers checkpoint of the same base. A llama-family
  base imported from GGUF has llama.cpp's permuted q/k rows; the export undoes the permutation on ``lora_B``, so
  the adapter fits the Hugging Face layout.
- ``fused``: the base with the adapter merged in (mlx-lm's own ``fuse``), as an MLX model directory; where the
  base came from GGUF also as ``fused.gguf`` beside it: the source file's metadata and tensors, with each adapted
  weight replaced by its merged values in F32 (the others keep their block format).

Every output appears whole or not at all (written beside it, then renamed), and an existing path is never replaced.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from solverx.adapters.errors import AdapterError
from solverx.adapters.validate import ADAPTER_CONFIG, ADAPTER_WEIGHTS

FORMATS = ("gguf", "peft", "fused")
FUSED_GGUF = "fused.gguf"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"
_MODULE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


class ExportError(AdapterError):
    """The adapter cannot be exported in the format asked for; the message says why and what would do."""

    code = "export_error"


@dataclass(frozen=True)
class Lora:
    """One adapter's low-rank pairs, by module path (``model.layers.3.self_attn.q_proj``), as float32 numpy."""

    pairs: dict[str, tuple[np.ndarray, np.ndarray]]  # module → (A (in, r), B (r, out)), mlx-lm's orientation
    rank: int
    scale: float
    dropout: float

    @property
    def alpha(self) -> float:
        """PEFT's and llama.cpp's ``lora_alpha``: they scale by alpha / r, mlx-lm by ``scale``."""
        return self.scale * self.rank

    def delta(self, module: str) -> np.ndarray:
        """What the adapter adds to ``module``'s weight, in the weight's (out, in) layout."""
        a, b = self.pairs[module]
        return (self.scale * (a @ b)).T.astype(np.float32)


def read_lora(adapter_dir: Path) -> Lora:
    """The pairs and scale of an mlx-lm LoRA adapter directory (one the registry has validated)."""
    import mlx.core as mx

    config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    if config.get("fine_tune_type", "lora") != "lora":
        raise ExportError(f"{adapter_dir} is a {config['fine_tune_type']} adapter; only LoRA can be exported")
    params = config.get("lora_parameters", {})
    tensors = {k: np.array(v.astype(mx.float32)) for k, v in mx.load(str(adapter_dir / ADAPTER_WEIGHTS)).items()}
    pairs = {}
    for key in sorted(tensors):
        if key.endswith(".lora_a"):
            module = key.removesuffix(".lora_a")
            pairs[module] = (tensors[key], tensors[f"{module}.lora_b"])
    unknown = sorted(k for k in tensors if not k.endswith((".lora_a", ".lora_b")))
    if unknown or not pairs:
        raise ExportError(f"{adapter_dir} holds tensors that are not LoRA pairs: {unknown[:3]}")
    rank = next(iter(pairs.values()))[0].shape[1]
    return Lora(pairs, int(rank), float(params.get("scale", 20.0)), float(params.get("dropout", 0.0)))


# --- paths ---------------------------------------------------------------------------------------------------


def _fresh(out: Path) -> Path:
    if out.exists() or out.is_symlink():
        raise ExportError(f"{out} already exists; choose another --out or remove it")
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.{os.getpid()}.partial")
    if partial.is_dir():
        shutil.rmtree(partial)
    partial.unlink(missing_ok=True)
    return partial


def _publish(partial: Path, out: Path) -> Path:
    os.replace(partial, out)
    return out


def _split(module: str) -> tuple[int, str]:
    match = _MODULE.match(module)
    if match is None:
        raise ExportError(f"adapter module {module!r} is not in a transformer layer; it has no GGUF name")
    return int(match.group(1)), match.group(2)


# --- gguf ----------------------------------------------------------------------------------------------------


def _gguf_source(base_dir: Path):
    from solverx.models.gguf_import import GGUFSource

    source = GGUFSource.of(base_dir)
    if source is None:
        raise ExportError(
            f"the base at {base_dir} was not imported from a GGUF file, so llama.cpp has no base this adapter fits; "
            "import the base with `solverx prepare FILE.gguf`, train on it, then export (or use --format peft|fused)"
        )
    return source


def _gguf_names(architecture: str) -> dict[str, str]:
    """mlx-lm module path within a layer → llama.cpp tensor name (``self_attn.q_proj`` → ``attn_q``)."""
    from solverx.models.gguf_import import FAMILIES

    return {mlx: gguf for gguf, mlx in FAMILIES[architecture].block.items()}


def _gguf_weight_name(names: dict[str, str], module: str) -> str:
    layer, part = _split(module)
    if part not in names:
        raise ExportError(f"adapter module {module!r} has no llama.cpp counterpart")
    return f"blk.{layer}.{names[part]}.weight"


def export_gguf(adapter_dir: Path, base_dir: Path, out: Path) -> Path:
    """A llama.cpp LoRA adapter file at ``out`` for the GGUF the base was imported from."""
    import gguf

    lora, source = read_lora(adapter_dir), _gguf_source(base_dir)
    names = _gguf_names(source.architecture)
    partial = _fresh(out)
    writer = gguf.GGUFWriter(str(partial), source.architecture)
    writer.add_string(gguf.Keys.General.TYPE, gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, lora.alpha)
    for module, (a, b) in lora.pairs.items():
        name = _gguf_weight_name(names, module)
        writer.add_tensor(f"{name}.lora_a", np.ascontiguousarray(a.T))  # (r, in): ggml's ne = [in, r]
        writer.add_tensor(f"{name}.lora_b", np.ascontiguousarray(b.T))  # (out, r)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    return _publish(partial, out)


# --- peft ----------------------------------------------------------------------------------------------------


def _unpermute(rows: np.ndarray, heads: int) -> np.ndarray:
    """Undo convert_hf_to_gguf.py's q/k permutation (interleaved RoPE pairs back to rotate-half halves)."""
    return rows.reshape(heads, rows.shape[0] // heads // 2, 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def export_peft(adapter_dir: Path, base_dir: Path, out: Path, *, base_model: str) -> Path:
    """A PEFT LoRA directory at ``out`` for the Hugging Face checkpoint of the base (named ``base_model``)."""
    import mlx.core as mx

    lora = read_lora(adapter_dir)
    config = json.loads((base_dir / "config.json").read_text(encoding="utf-8"))
    permuted = config.get("model_type") == "llama" and bool(config.get("rope_traditional"))
    heads = {"self_attn.q_proj": config.get("num_attention_heads")}
    heads["self_attn.k_proj"] = config.get("num_key_value_heads") or heads["self_attn.q_proj"]
    tensors, targets, layers = {}, set(), set()
    for module, (a, b) in lora.pairs.items():
        layer, part = _split(module)
        lora_b = np.ascontiguousarray(b.T)  # (out, r): its rows are the weight's output rows
        if permuted and part in heads:
            lora_b = _unpermute(lora_b, int(heads[part]))
        tensors[f"base_model.model.{module}.lora_A.weight"] = mx.array(np.ascontiguousarray(a.T))
        tensors[f"base_model.model.{module}.lora_B.weight"] = mx.array(lora_b)
        targets.add(part.rsplit(".", 1)[-1])
        layers.add(layer)
    peft_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "target_modules": sorted(targets),
        "layers_to_transform": sorted(layers),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "inference_mode": True,
    }
    partial = _fresh(out)
    partial.mkdir()
    try:
        mx.save_safetensors(str(partial / PEFT_WEIGHTS), tensors, metadata={"format": "pt"})
        (partial / PEFT_CONFIG).write_text(json.dumps(peft_config, indent=2) + "\n", encoding="utf-8")
        return _publish(partial, out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


# --- fused ---------------------------------------------------------------------------------------------------


def export_fused(
    adapter_dir: Path, base_dir: Path, out: Path, *, progress: Callable[[str], None] = lambda _m: None
) -> Path:
    """The base with the adapter merged in, as an MLX model directory at ``out`` (plus ``fused.gguf`` inside it
    where the base came from GGUF)."""
    from mlx.utils import tree_unflatten
    from mlx_lm import load
    from mlx_lm.utils import save

    source = None
    from solverx.models.gguf_import import GGUFSource

    if (record := GGUFSource.of(base_dir)) is not None:
        source = record.check()
    partial = _fresh(out)
    try:
        model, tokenizer, config = load(str(base_dir), adapter_path=str(adapter_dir), return_config=True)
        fused = [(name, module.fuse()) for name, module in model.named_modules() if hasattr(module, "fuse")]
        model.update_modules(tree_unflatten(fused))
        save(partial, str(base_dir), model, tokenizer, config, donate_model=False)
        (partial / "fused-from.json").write_text(
            json.dumps({"base": str(base_dir), "adapter": str(adapter_dir)}, indent=2) + "\n", encoding="utf-8"
        )
        progress(f"wrote the fused MLX model ({len(fused)} layers merged)")
        if source is not None:
            _fused_gguf(source, record.architecture, read_lora(adapter_dir), partial / FUSED_GGUF)
            progress(f"wrote {FUSED_GGUF} from {source}")
        return _publish(partial, out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def _fused_gguf(source: Path, architecture: str, lora: Lora, out: Path) -> None:
    """``source`` with each adapted weight replaced by W + delta (F32); metadata and other tensors as they were."""
    import gguf

    from solverx.models.gguf_import.tensors import dequantize_tensor

    names = _gguf_names(architecture)
    deltas = {_gguf_weight_name(names, module): module for module in lora.pairs}
    reader = gguf.GGUFReader(str(source), "r")
    missing = sorted(set(deltas) - {t.name for t in reader.tensors})
    if missing:
        raise ExportError(f"{source} has no tensor {missing[0]}: it is not the file this base was imported from")
    writer = gguf.GGUFWriter(str(out), architecture, endianess=reader.endianess)
    for field in reader.fields.values():  # as gguf-py's gguf_new_metadata.py copies them
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), kind, sub_type=sub)
    for tensor in reader.tensors:
        if tensor.name in deltas:
            shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
            writer.add_tensor_info(tensor.name, shape, np.dtype(np.float32), 4 * int(np.prod(shape)),
                                   gguf.GGMLQuantizationType.F32)  # fmt: skip
        else:
            writer.add_tensor_info(tensor.name, tensor.data.shape, tensor.data.dtype, tensor.data.nbytes,
                                   tensor.tensor_type)  # fmt: skip
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for tensor in reader.tensors:  # one adapted weight in memory at a time
            if tensor.name in deltas:
                merged = dequantize_tensor(tensor) + lora.delta(deltas[tensor.name])
                writer.write_tensor_data(np.ascontiguousarray(merged, dtype=np.float32))
            else:
                writer.write_tensor_data(tensor.data, tensor_endianess=reader.endianess)
    finally:
        writer.close()
