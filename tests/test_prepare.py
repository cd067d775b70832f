"""``solverx prepare`` on look-alikes of the seed's models: a HyperCLOVA X SEED VLM and a Gemma 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import mlx_lm
import numpy as np
import pytest
from mlx_lm.tuner.utils import linear_to_lora_layers
from mlx_lm.utils import quantize_model
from safetensors.numpy import load_file

from solverx.adapters.fingerprint import base_fingerprint
from solverx.models.chat_rules import NO_SYSTEM_ROLE, ChatRules, fold_system_message
from solverx.models.checkpoints import safetensors_header, shard_sizes
from solverx.models.lookalikes import build_gemma2, build_hcx_vlm
from solverx.models.prepare import context_limit, prepare_checkpoint, text_config_of

TOKENS = [5, 17, 300, 42, 7, 99, 511, 3, 64, 128, 250, 1]


def hf_hyperclovax_logits(vlm_dir: Path, tokens: list[int]) -> np.ndarray:
    """The VLM's language model, run in float64 numpy straight from the original shards and config.

    Written from transformers' ``HyperCLOVAXForCausalLM``: μP multipliers, Peri-LN post-norms, rotate-half
    RoPE, and logits *multiplied* by ``logits_scaling``. Independent of mlx and of the code under test.
    """
    text = json.loads((vlm_dir / "config.json").read_text())["text_config"]
    weights: dict[str, np.ndarray] = {}
    for shard in sorted(vlm_dir.glob("model-*.safetensors")):
        weights |= {k: v.astype(np.float64) for k, v in load_file(shard).items()}

    def w(name: str) -> np.ndarray:
        return weights[f"model.language_model.model.{name}"]

    def rms(x: np.ndarray, weight: np.ndarray) -> np.ndarray:
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + text["rms_norm_eps"]) * weight

    heads, kv_heads, head_dim = text["num_attention_heads"], text["num_key_value_heads"], text["head_dim"]
    length = len(tokens)
    inv_freq = 1.0 / text["rope_theta"] ** (np.arange(0, head_dim, 2) / head_dim)
    angles = np.arange(length)[:, None] * inv_freq[None]
    cos, sin = np.cos(np.concatenate([angles] * 2, -1)), np.sin(np.concatenate([angles] * 2, -1))

    def rope(x: np.ndarray) -> np.ndarray:  # (heads, length, head_dim)
        half = head_dim // 2
        rotated = np.concatenate([-x[..., half:], x[..., :half]], -1)
        return x * cos + rotated * sin

    causal = np.triu(np.full((length, length), -np.inf), 1)
    h = w("embed_tokens.weight")[tokens] * text["embedding_multiplier"]
    for i in range(text["num_hidden_layers"]):
        p = f"layers.{i}."
        x = rms(h, w(p + "input_layernorm.weight"))
        q = (x @ w(p + "self_attn.q_proj.weight").T).reshape(length, heads, head_dim).transpose(1, 0, 2)
        k = (x @ w(p + "self_attn.k_proj.weight").T).reshape(length, kv_heads, head_dim).transpose(1, 0, 2)
        v = (x @ w(p + "self_attn.v_proj.weight").T).reshape(length, kv_heads, head_dim).transpose(1, 0, 2)
        q, k = rope(q), rope(k)
        k, v = np.repeat(k, heads // kv_heads, 0), np.repeat(v, heads // kv_heads, 0)
        scores = q @ k.transpose(0, 2, 1) * text["attention_multiplier"] + causal
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        attn = (probs @ v).transpose(1, 0, 2).reshape(length, -1) @ w(p + "self_attn.o_proj.weight").T
        if text["use_post_norm"]:
            attn = rms(attn, w(p + "post_norm1.weight"))
        h = h + attn * text["residual_multiplier"]
        x = rms(h, w(p + "post_attention_layernorm.weight"))
        gate = x @ w(p + "mlp.gate_proj.weight").T
        mlp = (gate / (1 + np.exp(-gate)) * (x @ w(p + "mlp.up_proj.weight").T)) @ w(p + "mlp.down_proj.weight").T
        if text["use_post_norm"]:
            mlp = rms(mlp, w(p + "post_norm2.weight"))
        h = h + mlp * text["residual_multiplier"]
    h = rms(h, w("norm.weight"))
    return h @ weights["model.language_model.lm_head.weight"].T * text["logits_scaling"]


def logits_of(model_dir: Path, tokens: list[int]) -> np.ndarray:
    model, _ = mlx_lm.load(str(model_dir))
    return np.array(model(mx.array([tokens]))[0])


@pytest.fixture(scope="module")
def vlm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_hcx_vlm(tmp_path_factory.mktemp("hcx") / "HyperCLOVAX-SEED-Think-tiny")


@pytest.fixture(scope="module")
def prepared_8bit(vlm: Path, tmp_path_factory: pytest.TempPathFactory):
    return prepare_checkpoint(vlm, tmp_path_factory.mktemp("out") / "hcx-8bit", q_bits=8, progress=False)


def test_vlm_checkpoint_looks_like_the_real_one(vlm: Path) -> None:
    config = json.loads((vlm / "config.json").read_text())
    assert config["model_type"] == "vlm" and config["architectures"] == ["HCXVisionV2ForCausalLM"]
    index = json.loads((vlm / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(index.values())) >= 3
    prefixes = {".".join(name.split(".")[:2]) for name in index}
    assert prefixes == {"model.language_model", "model.vision_model", "model.mm_projector"}
    # every shard carries language-model tensors, so streaming has to handle mixed shards
    for shard in set(index.values()):
        assert any(n.startswith("model.language_model") for n in safetensors_header(vlm / shard))


def test_extracted_text_model_matches_the_vlm_language_model(vlm: Path, tmp_path: Path) -> None:
    prepared = prepare_checkpoint(vlm, tmp_path / "hcx-fp32", q_bits=None, progress=False)

    assert prepared.extracted_from_vlm and prepared.model_type == "hyperclovax" and prepared.dropped_tensors == 7
    written = set(json.loads((prepared.path / "model.safetensors.index.json").read_text())["weight_map"])
    assert "lm_head.weight" in written and "model.layers.1.post_norm2.weight" in written
    assert not any("vision" in n or "projector" in n or "language_model" in n for n in written)
    config = json.loads((prepared.path / "config.json").read_text())
    assert "vision_config" not in config and "text_config" not in config and "quantization" not in config
    assert config["logits_scaling"] == 0.25 and config["use_post_norm"] is True

    np.testing.assert_allclose(logits_of(prepared.path, TOKENS), hf_hyperclovax_logits(vlm, TOKENS), atol=1e-5)


def test_without_post_norm_it_is_granite(tmp_path: Path) -> None:
    vlm = build_hcx_vlm(tmp_path / "vlm", use_post_norm=False, seed=1)
    prepared = prepare_checkpoint(vlm, tmp_path / "out", q_bits=None, progress=False)

    config = json.loads((prepared.path / "config.json").read_text())
    assert prepared.model_type == "granite" and config["logits_scaling"] == 4.0  # granite divides
    # 4-bit keeps Granite's own choice: o_proj, down_proj and lm_head stay at 8 bits
    four = prepare_checkpoint(vlm, tmp_path / "out-4bit", q_bits=4, progress=False)
    quantization = json.loads((four.path / "config.json").read_text())["quantization"]
    assert quantization["bits"] == 4 and quantization["model.layers.0.mlp.down_proj"]["bits"] == 8
    model, _ = mlx_lm.load(str(four.path))
    assert model.layers[0].mlp.down_proj.bits == 8 and model.layers[0].mlp.up_proj.bits == 4
    np.testing.assert_allclose(logits_of(prepared.path, TOKENS), hf_hyperclovax_logits(vlm, TOKENS), atol=1e-5)


def test_tokenizer_and_chat_template_come_along(vlm: Path, prepared_8bit) -> None:
    out = prepared_8bit.path
    assert not (out / "preprocessor_config.json").exists()
    assert "processor_class" not in json.loads((out / "tokenizer_config.json").read_text())
    _, tokenizer = mlx_lm.load(str(out))
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert tokenizer.decode(prompt).endswith("<|im_start|>assistant\n")
    assert set(tokenizer.eos_token_ids) >= {1, 3, 4}  # from generation_config.json


def test_8bit_model_loads_generates_and_trains_lora(vlm: Path, prepared_8bit) -> None:
    assert prepared_8bit.q_bits == 8 and prepared_8bit.fingerprint == base_fingerprint(prepared_8bit.path)
    config = json.loads((prepared_8bit.path / "config.json").read_text())
    assert config["quantization"] == {"group_size": 64, "bits": 8, "mode": "affine"}

    model, tokenizer = mlx_lm.load(str(prepared_8bit.path))
    assert isinstance(model.layers[0].self_attn.q_proj, nn.QuantizedLinear)
    reference = hf_hyperclovax_logits(vlm, TOKENS)
    np.testing.assert_allclose(np.array(model(mx.array([TOKENS]))[0]), reference, atol=0.05)
    text = mlx_lm.generate(model, tokenizer, "SolverX solves", max_tokens=8)
    assert isinstance(text, str) and len(tokenizer.encode(text)) > 0

    model.freeze()
    linear_to_lora_layers(model, 2, {"rank": 4, "scale": 10.0, "dropout": 0.0})
    batch = mx.array([TOKENS, TOKENS[::-1]])

    def loss_fn(model: nn.Module, batch: mx.array) -> mx.array:
        return nn.losses.cross_entropy(model(batch[:, :-1]), batch[:, 1:]).mean()

    step = nn.value_and_grad(model, loss_fn)
    optimizer = optim.Adam(learning_rate=1e-2)
    losses = []
    for _ in range(8):
        loss, grads = step(model, batch)
        optimizer.update(model, grads)
        mx.eval(model.parameters(), optimizer.state)
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1


def test_peak_memory_stays_near_one_shard(tmp_path: Path) -> None:
    vlm = build_hcx_vlm(tmp_path / "vlm", hidden=256, intermediate=512, layers=4, vocab=2048, shards=6, seed=2)
    largest = max(shard_sizes(vlm).values())
    total = sum(shard_sizes(vlm).values())
    assert total > 5 * largest

    for q_bits in (None, 8):
        mx.clear_cache()
        mx.reset_peak_memory()
        prepare_checkpoint(vlm, tmp_path / f"out-{q_bits}", q_bits=q_bits, progress=False)
        assert mx.get_peak_memory() < 2 * largest, (q_bits, mx.get_peak_memory(), largest)


def test_loading_needs_the_hyperclovax_registration(prepared_8bit) -> None:
    """A fresh process (the server, the trainer child) must import ``solverx.models.hyperclovax`` before loading."""
    load = f"import mlx_lm; mlx_lm.load({str(prepared_8bit.path)!r}); print('loaded')"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    plain = subprocess.run([sys.executable, "-c", load], capture_output=True, text=True, env=env)
    assert plain.returncode != 0 and "hyperclovax not supported" in plain.stderr
    registered = subprocess.run(
        [sys.executable, "-c", "import solverx.models.hyperclovax; " + load], capture_output=True, text=True, env=env
    )
    assert registered.returncode == 0 and "loaded" in registered.stdout, registered.stderr


def test_output_must_not_exist(vlm: Path, tmp_path: Path) -> None:
    (tmp_path / "taken").mkdir()
    with pytest.raises(FileExistsError):
        prepare_checkpoint(vlm, tmp_path / "taken", progress=False)


# --- Gemma 2 -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gemma2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_gemma2(tmp_path_factory.mktemp("gemma") / "gemma-2-tiny")


def test_gemma2_prepares_loads_and_generates(gemma2: Path, tmp_path: Path) -> None:
    prepared = prepare_checkpoint(gemma2, tmp_path / "gemma-8bit", q_bits=8, progress=False)
    assert prepared.model_type == "gemma2" and not prepared.extracted_from_vlm and prepared.dropped_tensors == 0
    assert prepared.context_limit == 4096

    model, tokenizer = mlx_lm.load(str(prepared.path))
    assert isinstance(model.model.embed_tokens, nn.QuantizedEmbedding)
    # shard-by-shard quantization gives exactly what mlx-lm's whole-model quantization gives
    reference, _, config = mlx_lm.load(str(gemma2), return_config=True)
    quantize_model(reference, config, group_size=64, bits=8)
    tokens = mx.array([TOKENS])
    np.testing.assert_array_equal(np.array(model(tokens)), np.array(reference(tokens)))
    assert isinstance(mlx_lm.generate(model, tokenizer, "SolverX", max_tokens=8), str)


def test_gemma2_system_message_is_folded_into_the_first_user_turn(gemma2: Path) -> None:
    config = json.loads((gemma2 / "config.json").read_text())
    _, tokenizer = mlx_lm.load(str(gemma2))
    rules = ChatRules.for_model(config, tokenizer)
    assert rules.fold_system
    messages = [
        {"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris"},
        {"role": "user", "content": "And Italy?"},
    ]
    with pytest.raises(Exception, match="System role not supported"):
        tokenizer.apply_chat_template(messages, tokenize=False)

    prompt = rules.render(tokenizer, messages, add_generation_prompt=True)
    assert "<start_of_turn>user\nAnswer in one word.\n\nCapital of France?<end_of_turn>" in prompt
    assert prompt.count("Answer in one word.") == 1 and prompt.endswith("<start_of_turn>model\n")
    assert messages[0]["role"] == "system"  # the caller's list is untouched


def test_fold_system_message_edge_cases() -> None:
    assert fold_system_message([{"role": "user", "content": "hi"}]) == [{"role": "user", "content": "hi"}]
    assert fold_system_message([{"role": "system", "content": "Be brief."}]) == [
        {"role": "user", "content": "Be brief."}
    ]
    parts = fold_system_message(
        [{"role": "system", "content": "A"}, {"role": "user", "content": [{"type": "text", "text": "B"}]}]
    )
    assert parts == [{"role": "user", "content": [{"type": "text", "text": "A\n\n"}, {"type": "text", "text": "B"}]}]


def test_context_limit() -> None:
    assert context_limit({"model_type": "gemma2", "max_position_embeddings": 8192}) == 4096
    assert context_limit({"model_type": "llama", "max_position_embeddings": 32768}) == 32768
    vlm = {
        "model_type": "vlm",
        "architectures": ["HCXVisionV2ForCausalLM"],
        "text_config": {"model_type": "hyperclovax", "max_position_embeddings": 131072},
    }
    assert context_limit(vlm) == 131072 and text_config_of(vlm)["model_type"] not in NO_SYSTEM_ROLE
