"""Turn a downloaded checkpoint into a base model the daemon can serve and train on: ``solverx prepare``.

Two kinds of input go through the same path:

- a HyperCLOVA X SEED VLM (``model_type: vlm``, ``HCXVisionV2ForCausalLM``): the text model is extracted
  (``model.language_model.model.*`` → ``model.*``, ``model.language_model.lm_head.*`` → ``lm_head.*``, vision
  tower and projector dropped) and its nested ``hyperclovax`` config becomes a text config mlx-lm loads
  (``granite`` when the architecture matches, else our registered ``hyperclovax`` class);
- a plain text checkpoint (gemma2, llama, qwen, …): copied.

Both are quantized with mlx-lm's affine quantization (what ``mlx_lm.convert`` does), one shard at a time: a
shard is mapped lazily, its tensors renamed, quantized and written, then released before the next shard is
opened, so peak memory stays near one shard — a 64 GB checkpoint can be prepared on a 48 GB Mac. Quantizing
per shard gives the same bits as quantizing the loaded model: affine quantization treats each matrix alone.

The module also holds the context limit the server must know (:func:`context_limit`: mlx-lm's Gemma 2 has no
sliding-window attention); chat rules per family live in :mod:`solverx.models.chat_rules`.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.utils import _get_classes, save_config

from solverx.adapters.fingerprint import base_fingerprint
from solverx.models import hyperclovax
from solverx.models.checkpoints import ShardWriter, shard_layout, shard_sizes
from solverx.models.memory_plan import text_config

VLM_ARCHITECTURES = frozenset({"HCXVisionV2ForCausalLM"})
VLM_MODEL_TYPES = frozenset({"vlm", "hyperclovax_vision_v2"})
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "generation_config.json",
)
DEFAULT_CONTEXT = 4096
# mlx-lm's gemma2 attends globally in every layer; Gemma 2 was trained with a 4096-token sliding window.
FAMILY_CONTEXT_CAP = {"gemma2": 4096}
_FLOAT_DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}


@dataclass(frozen=True)
class PreparedModel:
    """What ``prepare_checkpoint`` wrote, for the CLI to print and ``--register`` to record."""

    path: Path
    model_type: str
    extracted_from_vlm: bool
    q_bits: int | None
    group_size: int
    num_parameters: int
    weight_bytes: int
    dropped_tensors: int
    context_limit: int
    fingerprint: str


# --- configs -----------------------------------------------------------------------------------------------


def is_hcx_vlm(config: dict) -> bool:
    """Whether ``config`` is a HyperCLOVA X SEED vision-language checkpoint with a nested text model."""
    architectures = set(config.get("architectures") or ())
    nested = "text_config" in config or "language_config" in config
    return nested and (config.get("model_type") in VLM_MODEL_TYPES or bool(architectures & VLM_ARCHITECTURES))


def text_config_of(config: dict) -> dict:
    """The text model's config: the nested one for a VLM, else ``config`` itself."""
    return dict(text_config(config) if is_hcx_vlm(config) else config)


def _rope(config: dict) -> tuple[float, dict | None]:
    """``(rope_theta, rope_scaling)`` from either the old keys or transformers 5's ``rope_parameters``."""
    params = dict(config.get("rope_parameters") or {})
    theta = float(config.get("rope_theta", params.pop("rope_theta", 10000.0)))
    scaling = config.get("rope_scaling")
    if scaling is None and params.get("rope_type", "default") != "default":
        scaling = params
    return theta, scaling


def hyperclovax_text_config(text: dict, *, has_lm_head: bool) -> dict:
    """An mlx-lm config for HyperCLOVA X's text model.

    Without post-norms and with the usual head size, it *is* Granite (with the logits scale inverted: Granite
    divides, HyperCLOVA X multiplies), so it maps to mlx-lm's ``granite``; otherwise to our ``hyperclovax``.
    The checkpoint's lm_head decides tying: a separate head in the weights is the one it was trained with.
    """
    hidden, heads = text["hidden_size"], text["num_attention_heads"]
    head_dim = text.get("head_dim") or hidden // heads
    theta, scaling = _rope(text)
    config = {k: v for k, v in text.items() if k not in ("rope_parameters", "architectures", "auto_map")}
    config.update(
        num_key_value_heads=text.get("num_key_value_heads") or heads,
        head_dim=head_dim,
        rope_theta=theta,
        rope_scaling=scaling,
        tie_word_embeddings=not has_lm_head,
        attention_multiplier=text.get("attention_multiplier") or head_dim**-0.5,
        embedding_multiplier=text.get("embedding_multiplier", 1.0),
        residual_multiplier=text.get("residual_multiplier", 1.0),
        logits_scaling=text.get("logits_scaling", 1.0),
        use_post_norm=text.get("use_post_norm", True),
        attention_bias=text.get("attention_bias", False),
        mlp_bias=text.get("mlp_bias", False),
        max_position_embeddings=text.get("max_position_embeddings", 131072),
    )
    if not config["use_post_norm"] and head_dim == hidden // heads:
        config.pop("use_post_norm")
        config.update(
            model_type="granite",
            architectures=["GraniteForCausalLM"],
            logits_scaling=1.0 / config["logits_scaling"],
        )
    else:
        config.update(model_type=hyperclovax.MODEL_TYPE, architectures=["HyperCLOVAXForCausalLM"])
    return config


def mlx_config(source_config: dict, *, has_lm_head: bool) -> dict:
    """The config the prepared model is written with (before quantization fields)."""
    text = text_config_of(source_config)
    if text.get("model_type") == hyperclovax.MODEL_TYPE:
        return hyperclovax_text_config(text, has_lm_head=has_lm_head)
    if is_hcx_vlm(source_config):
        text.setdefault("tie_word_embeddings", not has_lm_head)
    return text


def source_dtype(config: dict) -> str | None:
    """The dtype the checkpoint declares (``torch_dtype`` or transformers 5's ``dtype``), text part first."""
    for cfg in (text_config_of(config), config):
        for key in ("torch_dtype", "dtype"):
            if cfg.get(key) in _FLOAT_DTYPES:
                return cfg[key]
    return None


def context_limit(config: dict) -> int:
    """The longest context the server should accept for this model.

    Gemma 2 is capped at 4096: mlx-lm's gemma2 has no sliding-window attention, so longer prompts would attend
    in a way the model never saw in training. Others get their ``max_position_embeddings``.
    """
    text = text_config_of(config)
    limit = int(text.get("max_position_embeddings") or DEFAULT_CONTEXT)
    cap = FAMILY_CONTEXT_CAP.get(text.get("model_type", ""))
    return min(limit, cap) if cap else limit


# --- weights -----------------------------------------------------------------------------------------------


def hcx_text_key(name: str) -> str | None:
    """A VLM tensor's name in the text model, or None when it belongs to the vision side.

    Hub layout: ``model.language_model.model.*`` and ``model.language_model.lm_head.*``; transformers 5's
    ``save_pretrained`` layout (``model.language_model.*`` + top-level ``lm_head.*``) is accepted too.
    """
    for old, new in (
        ("model.language_model.model.", "model."),
        ("model.language_model.lm_head.", "lm_head."),
        ("model.language_model.", "model."),
        ("lm_head.", "lm_head."),
    ):
        if name.startswith(old):
            return new + name[len(old) :]
    return None


def _keep(name: str, rename: Callable[[str], str | None]) -> bool:
    # RoPE frequency buffers some exporters save are recomputed by every mlx-lm model.
    return rename(name) is not None and not name.endswith("rotary_emb.inv_freq")


QuantPlan = dict[str, dict[str, Any]]


def quantization_plan(model: nn.Module, q_bits: int, group_size: int) -> tuple[QuantPlan, dict]:
    """Which modules to quantize and how, exactly as ``mlx_lm.utils.quantize_model`` decides.

    Returns the per-module parameters and the ``quantization`` config entry: defaults plus per-layer
    overrides from the model's ``quant_predicate`` (Granite keeps ``o_proj``/``down_proj``/``lm_head`` at 8).
    """
    defaults = {"group_size": group_size, "bits": q_bits, "mode": "affine"}
    predicate = getattr(model, "quant_predicate", None)
    plan: QuantPlan = {}
    entry: dict[str, Any] = dict(defaults)
    for path, module in model.named_modules():
        if not hasattr(module, "to_quantized") or module.weight.shape[-1] % group_size:
            continue
        decision = predicate(path, module) if predicate else True
        if not decision:
            continue
        if isinstance(decision, dict):
            entry[path] = decision
            plan[path] = {"mode": "affine"} | decision
        else:
            plan[path] = defaults
    return plan, entry


def _expected_keys(model: nn.Module, plan: QuantPlan) -> set[str]:
    """The tensor names a strict ``load_weights`` asks for once ``plan`` is applied (nothing is computed)."""
    nn.quantize(model, class_predicate=lambda path, _: plan.get(path, False))
    return {name for name, _ in tree_flatten(model.parameters())}


def _convert_shard(
    tensors: dict[str, mx.array],
    plan: QuantPlan,
    dtype: mx.Dtype | None,
    cast: Callable[[str], bool],
) -> dict[str, mx.array]:
    """Cast and quantize one shard, one tensor at a time, so each source tensor is freed as soon as used."""
    out: dict[str, mx.array] = {}
    for name in list(tensors):
        value = tensors.pop(name)
        if dtype is not None and mx.issubdtype(value.dtype, mx.floating) and cast(name):
            value = value.astype(dtype)
        module = name.removesuffix(".weight")
        if name.endswith(".weight") and module in plan:
            params = plan[module]
            weight, scales, biases = mx.quantize(
                value, group_size=params["group_size"], bits=params["bits"], mode=params["mode"]
            )
            produced = {name: weight, f"{module}.scales": scales, f"{module}.biases": biases}
        else:
            produced = {name: value}
        del value
        mx.eval(list(produced.values()))
        out.update(produced)
    return out


def _copy_tokenizer(src: Path, out: Path, *, from_vlm: bool) -> None:
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copy2(src / name, out / name)
    if not (out / "chat_template.jinja").exists() and (src / "chat_template.json").exists():
        template = json.loads((src / "chat_template.json").read_text()).get("chat_template")
        if template:
            (out / "chat_template.jinja").write_text(template)
    config_path = out / "tokenizer_config.json"
    if from_vlm and config_path.exists():
        # The VLM's processor is not part of a text model; transformers would try to build it.
        config = json.loads(config_path.read_text())
        config.pop("processor_class", None)
        config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False))


def prepare_checkpoint(
    src: Path,
    out: Path,
    *,
    q_bits: int | None = 8,
    group_size: int = 64,
    progress: bool = True,
    dtype: str | None = None,
) -> PreparedModel:
    """Extract (for a HyperCLOVA X VLM), quantize and write ``src`` to ``out``, one shard at a time.

    ``q_bits=None`` keeps the weights unquantized (in ``dtype``, default the checkpoint's declared dtype).
    ``out`` must not exist; the result appears there atomically (written to a sibling ``.partial`` first).
    Returns what was written, with the base fingerprint adapters are tied to.
    """
    src, out = Path(src), Path(out)
    if out.exists():
        raise FileExistsError(f"{out} already exists; choose a new --out or remove it")
    if q_bits not in (None, 2, 3, 4, 5, 6, 8):
        raise ValueError(f"q_bits must be one of 2, 3, 4, 5, 6, 8 or None, not {q_bits!r}")
    log = (lambda msg: print(f"solverx prepare: {msg}", file=sys.stderr)) if progress else (lambda _msg: None)

    source_config = json.loads((src / "config.json").read_text())
    from_vlm = is_hcx_vlm(source_config)
    layout = shard_layout(src)
    rename = hcx_text_key if from_vlm else (lambda name: name)
    kept = {shard: [n for n in names if _keep(n, rename)] for shard, names in layout.items()}
    kept = {shard: names for shard, names in kept.items() if names}
    dropped = sum(len(names) for names in layout.values()) - sum(len(names) for names in kept.values())
    has_lm_head = any(rename(n) == "lm_head.weight" for names in kept.values() for n in names)

    config = mlx_config(source_config, has_lm_head=has_lm_head)
    dtype_name = dtype or source_dtype(source_config)
    target_dtype = _FLOAT_DTYPES[dtype_name] if dtype_name else None
    if dtype_name:
        config["torch_dtype"] = dtype_name

    # A skeleton of the target model, never evaluated: mlx arrays are lazy, so it costs no memory. It tells us
    # which modules mlx-lm would quantize and which tensor names a strict load expects.
    model_class, args_class = _get_classes(config)
    skeleton = model_class(args_class.from_dict(config))
    num_parameters = sum(v.size for _, v in tree_flatten(skeleton.parameters()))
    plan: QuantPlan = {}
    if q_bits is not None:
        plan, config["quantization"] = quantization_plan(skeleton, q_bits, group_size)
    expected = _expected_keys(skeleton, plan)
    sanitize = getattr(skeleton, "sanitize", None)
    cast = getattr(skeleton, "cast_predicate", lambda _name: True)

    kind = "HyperCLOVA X VLM → text model" if from_vlm else "text checkpoint"
    log(f"{kind} ({config['model_type']}), {len(layout)} shards, {num_parameters / 1e6:,.1f}M parameters")
    if dropped:
        log(f"dropping {dropped} tensors the text model does not use (vision tower, projector, buffers)")

    partial = out.with_name(f".{out.name}.partial")
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    writer = ShardWriter(partial, total_shards=len(kept))
    sizes = shard_sizes(src)
    try:
        for i, (shard, names) in enumerate(kept.items(), start=1):
            source = mx.load(str(src / shard))  # lazy: only the tensors we evaluate are read
            tensors = {rename(n): source[n] for n in names}
            del source
            if sanitize is not None:
                tensors = sanitize(tensors)
            converted = _convert_shard(tensors, plan, target_dtype, cast)
            written = writer.write(converted)
            del converted, tensors
            mx.clear_cache()
            log(f"[{i}/{len(kept)}] {shard} ({sizes[shard] / 2**20:.0f} MiB) → {written.name}")
        writer.finish(total_parameters=num_parameters)

        missing = expected - writer.weight_map.keys()
        unexpected = writer.weight_map.keys() - expected
        if missing or unexpected:
            raise ValueError(
                f"the checkpoint does not match {config['model_type']}: "
                f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
            )
        save_config(config, partial / "config.json")
        _copy_tokenizer(src, partial, from_vlm=from_vlm)
        partial.rename(out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise

    result = PreparedModel(
        path=out,
        model_type=config["model_type"],
        extracted_from_vlm=from_vlm,
        q_bits=q_bits,
        group_size=group_size,
        num_parameters=num_parameters,
        weight_bytes=writer.total_bytes,
        dropped_tensors=dropped,
        context_limit=context_limit(config),
        fingerprint=base_fingerprint(out),
    )
    log(f"wrote {out} ({writer.total_bytes / 2**30:.2f} GiB, {result.fingerprint})")
    return result
