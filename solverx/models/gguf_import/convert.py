"""``import_gguf``: a GGUF file to an MLX model directory, tensor by tensor, written atomically."""

from __future__ import annotations

import shutil
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.utils import _get_classes, save_config

from solverx.adapters.fingerprint import base_fingerprint
from solverx.models.checkpoints import ShardWriter
from solverx.models.gguf_import.metadata import (
    FAMILIES,
    MAX_SHARD_BYTES,
    SOURCE_RECORD,
    GGUFImportError,
    GGUFSource,
    Metadata,
    _dequantizable,
    _open,
    llama3_rope_scaling,
    model_config,
)  # fmt: skip
from solverx.models.gguf_import.tensors import (
    _convert,
    _expected_shapes,
    _Item,
    _keep_entry,
    _keep_plan,
    _mlx_name,
    _predicted_shape,
    _shards,
    dequantize_tensor,
)  # fmt: skip
from solverx.models.gguf_import.tokenizer import Vocab, build_tokenizer, eos_token_ids, write_tokenizer
from solverx.models.prepare import PreparedModel, QuantPlan, context_limit, quantization_plan

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
        source = GGUFSource(src.resolve(), meta.arch, src.stat().st_size)
        (partial / SOURCE_RECORD).write_text(source.to_json() + "\n", encoding="utf-8")
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
