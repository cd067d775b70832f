"""Adapters for the serving tests: a few really trained on the tiny base, and every kind of broken one.

The good adapters are trained with the project's own trainer (:func:`solverx.trainer.train.train_stage`, i.e. mlx-lm's
trainer) for 16 steps on six chat turns (a few seconds each). Each one learns a different *theme*, the same
answer-ish sentences for every question, so that at temperature 0 adapters A, B, A's second version and the base
all answer differently, and an answer tells which adapter produced it.

The bad adapters each break exactly one thing the registry must check before a version exists: a truncated
weights file, a wrong shape, a key for a layer the base does not have, an adapter made for another base (by its
shapes, or by the base fingerprint its manifest declares), missing files.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from solverx import blas
from solverx.adapters.validate import ADAPTER_CONFIG, ADAPTER_WEIGHTS, MANIFEST, base_linear_shapes
from solverx.engine.lora import DEFAULT_KEYS

RANK = 4
ITERS = 80  # with lr 5e-4: every theme learned cleanly (16 steps at 5e-3 worked on one tiny base, not another)
# Questions the adapters are trained on (and the serving tests ask): each theme answers every one of them.
QUESTIONS = (
    "What is Python?",
    "Tell me about SolverX.",
    "How do rivers form?",
    "What should I eat today?",
    "Explain a linked list.",
    "Who are you?",
)
# Long, repetitive answers so a trained adapter keeps talking for the 64 tokens the hot-swap test streams.
THEMES = {
    "apples": "Apple, apple, apple! Apple pie, apple juice, apple tree. Apple apple apple.",
    "rivers": "River, river, river! River water, river boat, river bank. River river river.",
    "stars": "Star, star, star! Star light, star night, star shine. Star star star.",
    "trains": "Train, train, train! Train track, train car, train station. Train train train.",
}


def speaks(text: str, theme: str) -> bool:
    """Whether an answer is in ``theme``: it contains a 3-letter piece of the theme's word (a few training steps
    teach the subword pieces, e.g. "pple" or "ver", before the whole word)."""
    word = theme.rstrip("s").lower()
    return any(word[i : i + 3] in text.lower() for i in range(len(word) - 2))


def chat_samples(tokenizer, answer: str) -> list[tuple[list[int], int]]:
    """mlx-lm's dataset contract: ``(tokens, offset)``, the loss only on the assistant's answer."""
    samples = []
    for question in QUESTIONS:
        prompt = [{"role": "user", "content": question}]
        head = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template([*prompt, {"role": "assistant", "content": answer}], tokenize=False)
        head_tokens = tokenizer.encode(head, add_special_tokens=False)
        tokens = tokenizer.encode(full, add_special_tokens=False)
        assert tokens[: len(head_tokens)] == head_tokens, "the chat template must extend the prompt"
        samples.append((tokens, len(head_tokens)))
    return samples


def train_adapter(model_dir: Path, out_dir: Path, theme: str, *, iters: int = ITERS, seed: int = 0) -> Path:
    """Train a rank-4 LoRA on every layer of the base for ``iters`` steps on ``theme``; returns ``out_dir``.

    Written the way the trainer writes adapters (adapters.safetensors + adapter_config.json). Reuses a finished
    ``out_dir`` (the config is written last, so its presence means the adapter is complete).
    """
    out_dir = Path(out_dir)
    if (out_dir / ADAPTER_CONFIG).is_file() and (out_dir / ADAPTER_WEIGHTS).is_file():
        return out_dir
    from mlx_lm import load

    from solverx.trainer.recipe import LoraSettings
    from solverx.trainer.train import StageSettings, train_stage

    model, tokenizer = load(str(model_dir))
    samples = chat_samples(tokenizer, THEMES[theme])
    np.random.seed(seed)  # mlx-lm's iterate_batches shuffles with numpy's global generator
    settings = StageSettings(
        iters=iters, batch_size=4, learning_rate=5e-4, max_seq_length=256, steps_per_report=iters, seed=seed
    )
    with blas.threads(1):  # the tiny base's matrices are too small for a second thread to pay (12 s vs 17 s)
        train_stage(model, "sft", out_dir, samples, None, LoraSettings(rank=RANK, scale=20.0), settings)
    return out_dir


@dataclass(frozen=True)
class TrainedAdapters:
    """Directories of adapters trained on the tiny base: ``a`` and ``b`` differ, ``a2`` is A's "retrained" v2,
    ``c`` is spare (another process's registration, the CLI)."""

    a: Path
    b: Path
    a2: Path
    c: Path


def trained_adapters(model_dir: Path, root: Path) -> TrainedAdapters:
    """The four adapters, trained two at a time in processes of their own: a tiny base's step is MLX ops on one
    core, so two processes on two cores take half the time (each is seeded, so the result is the same)."""
    root = Path(root)
    jobs = {"a": ("apples", 1), "b": ("rivers", 2), "a2": ("stars", 3), "c": ("trains", 4)}
    workers = max(1, min(len(jobs), os.cpu_count() or 1))
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        done = {name: pool.submit(train_adapter, model_dir, root / name, theme, seed=seed)
                for name, (theme, seed) in jobs.items()}  # fmt: skip
        return TrainedAdapters(**{name: future.result() for name, future in done.items()})


def mlx_lm_greedy(model_dir: Path, adapter_dir: Path | None, prompts, max_tokens: int) -> list[str]:
    """The reference: mlx-lm's own LoRA layers (``load(..., adapter_path=)``) and its own greedy decoding of each
    prompt as a one-turn chat, stopped where the server stops (EOS or a chat-control token), turned into text by
    mlx-lm's streaming detokenizer as ``mlx_lm.generate`` and ``mlx_lm.server`` do."""
    from mlx_lm import load
    from mlx_lm.generate import generate_step

    model, tokenizer = load(str(model_dir), adapter_path=str(adapter_dir) if adapter_dir else None)
    vocab = tokenizer.get_vocab()
    stops = set(tokenizer.eos_token_ids) | {
        vocab[t] for t in ("<|endoftext|>", "<|im_end|>", "<|im_start|>") if t in vocab
    }
    texts = []
    for prompt in prompts:
        chat = [{"role": "user", "content": prompt}]
        text = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        tokens = mx.array(tokenizer.encode(text, add_special_tokens=False))
        out = []
        for token, _ in generate_step(tokens, model, max_tokens=max_tokens):
            if int(token) in stops:
                break
            out.append(int(token))
        detokenizer = tokenizer.detokenizer
        for token in out:
            detokenizer.add_token(token)
        detokenizer.finalize()
        texts.append(detokenizer.text)
    return texts


def padded_rank(good: Path, path: Path, rank: int = 16) -> Path:
    """The same adapter written at a larger rank (zero rows and columns): exactly the same function."""
    _copy(good, path)

    def pad(tensors: dict) -> None:
        for key, value in tensors.items():
            extra = rank - value.shape[1 if key.endswith("lora_a") else 0]
            tensors[key] = mx.pad(value, [(0, 0), (0, extra)] if key.endswith("lora_a") else [(0, extra), (0, 0)])

    _rewrite(path, pad)
    return _edit_config(path, lambda params: params.update(rank=rank))


def rescaled(good: Path, path: Path, *, b_factor: float, scale_factor: float = 1.0) -> Path:
    """``good`` with every ``lora_b`` multiplied by ``b_factor`` and its ``scale`` by ``scale_factor``.

    Powers of two keep it exact: ``b_factor=1/4, scale_factor=4`` is bit for bit the same function, served
    right only if the server applies each adapter's own scale.
    """
    _copy(good, path)
    _rewrite(path, lambda t: t.update({k: v * b_factor for k, v in t.items() if k.endswith("lora_b")}))
    return _edit_config(path, lambda params: params.update(scale=params["scale"] * scale_factor))


def faint(model_dir: Path, good: Path, root: Path, prompts, max_tokens: int) -> tuple[Path, list[str]]:
    """A weakened copy of ``good`` whose greedy answers differ from both the base's and ``good``'s, and those
    answers (mlx-lm's reference). Trained adapters are saturated: a wrong scale or a dropped layer leaves
    their answers unchanged, while a faint adapter's answers move with any such error."""
    base = mlx_lm_greedy(model_dir, None, prompts, max_tokens)
    full = mlx_lm_greedy(model_dir, good, prompts, max_tokens)
    for shift in (6, 5, 7, 4, 8, 3, 9):
        path = rescaled(good, Path(root) / f"faint-{shift}", b_factor=2.0**-shift)
        answers = mlx_lm_greedy(model_dir, path, prompts, max_tokens)
        if answers != base and answers != full:
            return path, answers
    raise AssertionError(f"no weakened copy of {good} answers differently from both the base and itself")


def _edit_config(path: Path, edit) -> Path:
    config = json.loads((path / ADAPTER_CONFIG).read_text())
    edit(config["lora_parameters"])
    (path / ADAPTER_CONFIG).write_text(json.dumps(config))
    return path


# -- broken adapters -------------------------------------------------------------------------------------------

OTHER_BASE_CONFIG = {
    "model_type": "llama",
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-5,
    "vocab_size": 96,
    "tie_word_embeddings": True,
}


def write_other_base(path: Path) -> Path:
    """A different (2-layer, hidden 64) llama saved as mlx-lm saves models; only its headers are ever read."""
    from mlx.utils import tree_flatten
    from mlx_lm.models.llama import Model, ModelArgs

    if (path / "config.json").is_file():
        return path
    mx.random.seed(0)
    model = Model(ModelArgs(**OTHER_BASE_CONFIG))
    path.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(path / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (path / "config.json").write_text(json.dumps(OTHER_BASE_CONFIG))
    return path


def _copy(good: Path, path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    shutil.copytree(good, path)
    return path


def _rewrite(path: Path, edit) -> Path:
    tensors = dict(mx.load(str(path / ADAPTER_WEIGHTS)))
    edit(tensors)
    mx.save_safetensors(str(path / ADAPTER_WEIGHTS), tensors)
    return path


def truncated(good: Path, path: Path) -> Path:
    """The weights file cut in half, as a crashed copy or an interrupted download leaves it."""
    _copy(good, path)
    weights = path / ADAPTER_WEIGHTS
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    return path


def wrong_shapes(good: Path, path: Path) -> Path:
    """One projection's ``lora_a`` has the wrong input width (the base's q_proj takes 256 features)."""
    _copy(good, path)
    key = "model.layers.0.self_attn.q_proj.lora_a"
    return _rewrite(path, lambda t: t.__setitem__(key, mx.zeros((t[key].shape[0] // 2, RANK))))


def unknown_layer(good: Path, path: Path) -> Path:
    """Keys for a transformer block the 4-layer base does not have."""
    _copy(good, path)

    def add(tensors: dict) -> None:
        tensors["model.layers.9.self_attn.q_proj.lora_a"] = mx.zeros((256, RANK))
        tensors["model.layers.9.self_attn.q_proj.lora_b"] = mx.zeros((RANK, 256))

    return _rewrite(path, add)


def unknown_key(good: Path, path: Path) -> Path:
    """A tensor that is neither ``lora_a`` nor ``lora_b`` (a DoRA magnitude vector)."""
    _copy(good, path)
    return _rewrite(path, lambda t: t.__setitem__("model.layers.0.self_attn.q_proj.m", mx.ones((256,))))


def declared_other_base(good: Path, path: Path, other_base: Path) -> Path:
    """Good tensors, but its manifest says it was trained on another base (an export from another registry)."""
    from solverx.adapters.fingerprint import base_fingerprint

    _copy(good, path)
    (path / MANIFEST).write_text(json.dumps({"base_fingerprint": base_fingerprint(other_base)}))
    return path


def for_other_base(other_base: Path, path: Path) -> Path:
    """An adapter made for a different base: every key exists there, every shape is the other base's."""
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    mx.random.seed(5)
    tensors = {}
    for module, (in_dims, out_dims) in base_linear_shapes(other_base).items():
        tensors[f"{module}.lora_a"] = mx.random.normal((in_dims, RANK)) * 0.01
        tensors[f"{module}.lora_b"] = mx.random.normal((RANK, out_dims)) * 0.01
    mx.save_safetensors(str(path / ADAPTER_WEIGHTS), tensors)
    config = {
        "fine_tune_type": "lora",
        "num_layers": 2,
        "lora_parameters": {"rank": RANK, "scale": 20.0, "dropout": 0.0},
    }
    (path / ADAPTER_CONFIG).write_text(json.dumps(config))
    return path


def missing_weights(good: Path, path: Path) -> Path:
    _copy(good, path)
    (path / ADAPTER_WEIGHTS).unlink()
    return path


def missing_config(good: Path, path: Path) -> Path:
    _copy(good, path)
    (path / ADAPTER_CONFIG).unlink()
    return path


def bad_adapters(good: Path, root: Path) -> dict[str, Path]:
    """Every broken adapter, by what is wrong with it."""
    root = Path(root)
    other = write_other_base(root / "other-base")
    return {
        "truncated": truncated(good, root / "truncated"),
        "wrong_shapes": wrong_shapes(good, root / "wrong-shapes"),
        "unknown_layer": unknown_layer(good, root / "unknown-layer"),
        "unknown_key": unknown_key(good, root / "unknown-key"),
        "declared_other_base": declared_other_base(good, root / "declared-other-base", other),
        "for_other_base": for_other_base(other, root / "for-other-base"),
        "missing_weights": missing_weights(good, root / "missing-weights"),
        "missing_config": missing_config(good, root / "missing-config"),
    }


def random_adapter(model_dir: Path, out: Path, seed: int) -> Path:
    """A LoRA on every projection, random enough to change every key and value of the prompt."""
    mx.random.seed(seed)
    tensors = {}
    for module, (fan_in, fan_out) in base_linear_shapes(model_dir).items():
        if module.split(".", 3)[-1] in DEFAULT_KEYS:
            tensors[f"{module}.lora_a"] = mx.random.normal((fan_in, 4)) * fan_in**-0.5
            tensors[f"{module}.lora_b"] = mx.random.normal((4, fan_out)) * 0.05
    out.mkdir(parents=True)
    mx.save_safetensors(str(out / "adapters.safetensors"), tensors)
    layers = json.loads((model_dir / "config.json").read_text())["num_hidden_layers"]
    lora = {"rank": 4, "scale": 10.0, "dropout": 0.0, "keys": list(DEFAULT_KEYS)}
    (out / "adapter_config.json").write_text(json.dumps({"num_layers": layers, "lora_parameters": lora}))
    return out
