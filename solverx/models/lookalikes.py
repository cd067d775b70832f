"""Tiny synthetic checkpoints that look like the seed's real models, built offline in seconds.

Each builder writes what the hub would give us — ``config.json``, safetensors shards with the real key names
(and an index when sharded), tokenizer files, a chat template — only with small dimensions and random fp32
weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# The shape of Gemma's template: no system role, and it says so.
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)

_CORPUS = [
    "SolverX solves sparse linear systems with a preconditioned conjugate gradient method.",
    "The quick brown fox jumps over the lazy dog while the solver converges in twelve iterations.",
    "def sort(items): return sorted(items, key=lambda x: x.score)",
    "안녕하세요, 하이퍼클로바 엑스입니다. 무엇을 도와드릴까요?",
    "A system message sets the assistant's behaviour; a user message asks; the model answers.",
]


def write_tokenizer(path: Path, *, vocab_size: int, specials: list[str], config: dict) -> None:
    """A byte-level BPE trained on a few sentences, saved the way the hub ships a fast tokenizer."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 8,  # leave room so every id stays below the model's vocab
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS * 20, trainer=trainer)
    tokenizer.save(str(path / "tokenizer.json"))
    base = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": 8192,
        "clean_up_tokenization_spaces": False,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(base | config, indent=2))


def _random(rng: np.random.Generator, shape: tuple[int, ...], scale: float = 0.08) -> mx.array:
    return mx.array(rng.normal(0.0, scale, size=shape).astype(np.float32))


def _norm(rng: np.random.Generator, dim: int) -> mx.array:
    return mx.array((1.0 + rng.normal(0.0, 0.1, size=(dim,))).astype(np.float32))


def write_sharded(path: Path, weights: dict[str, mx.array], shards: int) -> list[Path]:
    """Split ``weights`` (in order) into ``shards`` files of similar size, plus the index file."""
    total = sum(v.nbytes for v in weights.values())
    target = total / shards
    groups: list[dict[str, mx.array]] = [{}]
    size = 0
    for name, value in weights.items():
        if groups[-1] and size + value.nbytes / 2 > target * len(groups) and len(groups) < shards:
            groups.append({})
        groups[-1][name] = value
        size += value.nbytes
    files, weight_map = [], {}
    for i, group in enumerate(groups, start=1):
        name = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        mx.save_safetensors(str(path / name), group, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(group, name))
        files.append(path / name)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return files


def hcx_text_config(
    *, hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int, vocab: int, use_post_norm: bool
) -> dict:
    """The text part of a HyperCLOVA X SEED config: HF ``hyperclovax`` fields, μP multipliers, Peri-LN."""
    return {
        "architectures": ["HyperCLOVAXForCausalLM"],
        "model_type": "hyperclovax",
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": hidden // heads,
        "vocab_size": vocab,
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "embedding_multiplier": 4.0,
        "attention_multiplier": 0.2,
        "residual_multiplier": 0.5,
        "logits_scaling": 0.25,  # multiplied into the logits (Granite divides)
        "use_post_norm": use_post_norm,
        "torch_dtype": "float32",
        "bos_token_id": 0,
        "eos_token_id": 1,
    }


def build_hcx_vlm(
    path: Path,
    *,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 128,
    vocab: int = 512,
    use_post_norm: bool = True,
    shards: int = 3,
    seed: int = 0,
) -> Path:
    """A HyperCLOVA-X-SEED-shaped VLM: ``model_type: vlm`` with a nested ``hyperclovax`` text config, a
    vision tower and a projector; weights under ``model.language_model.*``, ``model.vision_model.*`` and
    ``model.mm_projector.*``."""
    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    head_dim = hidden // heads
    vision_hidden = 32
    text = hcx_text_config(
        hidden=hidden,
        layers=layers,
        heads=heads,
        kv_heads=kv_heads,
        intermediate=intermediate,
        vocab=vocab,
        use_post_norm=use_post_norm,
    )
    config = {
        "architectures": ["HCXVisionV2ForCausalLM"],
        "model_type": "vlm",
        "text_config": text,
        "vision_config": {
            "model_type": "qwen2_5_vl",
            "hidden_size": vision_hidden,
            "out_hidden_size": hidden,
            "depth": 1,
            "num_heads": 2,
        },
        "image_token_id": vocab - 2,
        "video_token_id": vocab - 1,
        "torch_dtype": "float32",
    }
    (path / "config.json").write_text(json.dumps(config, indent=2))

    lm = "model.language_model.model"
    weights: dict[str, mx.array] = {f"{lm}.embed_tokens.weight": _random(rng, (vocab, hidden), 0.3)}
    # The vision tower sits between the embeddings and the decoder layers, so every shard mixes both sides.
    weights |= {
        "model.vision_model.patch_embed.proj.weight": _random(rng, (vision_hidden, 3, 2, 7, 7)),
        "model.vision_model.blocks.0.norm1.weight": _norm(rng, vision_hidden),
        "model.vision_model.blocks.0.attn.qkv.weight": _random(rng, (3 * vision_hidden, vision_hidden)),
        "model.vision_model.blocks.0.attn.proj.weight": _random(rng, (vision_hidden, vision_hidden)),
        "model.vision_model.merger.mlp.0.weight": _random(rng, (hidden, 4 * vision_hidden)),
    }
    for i in range(layers):
        p = f"{lm}.layers.{i}"
        weights[f"{p}.input_layernorm.weight"] = _norm(rng, hidden)
        weights[f"{p}.self_attn.q_proj.weight"] = _random(rng, (heads * head_dim, hidden))
        weights[f"{p}.self_attn.k_proj.weight"] = _random(rng, (kv_heads * head_dim, hidden))
        weights[f"{p}.self_attn.v_proj.weight"] = _random(rng, (kv_heads * head_dim, hidden))
        weights[f"{p}.self_attn.o_proj.weight"] = _random(rng, (hidden, heads * head_dim))
        weights[f"{p}.post_attention_layernorm.weight"] = _norm(rng, hidden)
        weights[f"{p}.mlp.gate_proj.weight"] = _random(rng, (intermediate, hidden))
        weights[f"{p}.mlp.up_proj.weight"] = _random(rng, (intermediate, hidden))
        weights[f"{p}.mlp.down_proj.weight"] = _random(rng, (hidden, intermediate))
        if use_post_norm:
            weights[f"{p}.post_norm1.weight"] = _norm(rng, hidden)
            weights[f"{p}.post_norm2.weight"] = _norm(rng, hidden)
    weights[f"{lm}.norm.weight"] = _norm(rng, hidden)
    weights["model.language_model.lm_head.weight"] = _random(rng, (vocab, hidden), 0.3)
    weights["model.mm_projector.proj.0.weight"] = _random(rng, (hidden, hidden))
    weights["model.mm_projector.proj.2.weight"] = _random(rng, (hidden, hidden))
    write_sharded(path, weights, shards)

    specials = ["<|endoftext|>", "<|im_end|>", "<|im_start|>", "<|endofturn|>", "<|stop|>", "<|IMAGE_PAD|>"]
    write_tokenizer(
        path,
        vocab_size=vocab,
        specials=specials,
        config={
            "bos_token": "<|endoftext|>",
            "eos_token": "<|im_end|>",
            "processor_class": "HCXVisionV2Processor",
        },
    )
    (path / "chat_template.jinja").write_text(CHATML_TEMPLATE)
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 3, 4]}))
    (path / "preprocessor_config.json").write_text(json.dumps({"image_processor_type": "Qwen2VLImageProcessor"}))
    return path


def build_mlx_lm_model(path: Path, config: dict, *, tokenizer: dict, seed: int = 0, shards: int = 1) -> Path:
    """Any mlx-lm architecture from its config: random init by the mlx-lm class, saved with HF names."""
    from mlx.utils import tree_flatten
    from mlx_lm.utils import _get_classes

    path.mkdir(parents=True, exist_ok=True)
    mx.random.seed(seed)
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    weights = dict(tree_flatten(model.parameters()))
    if shards == 1:
        mx.save_safetensors(str(path / "model.safetensors"), weights, metadata={"format": "pt"})
    else:
        write_sharded(path, weights, shards)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    write_tokenizer(path, vocab_size=config["vocab_size"], **tokenizer)
    return path


def gemma2_config(*, hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2, vocab: int = 512) -> dict:
    """A Gemma 2 config with the published field names (9B: hidden 3584, 42 layers, heads 16/8, hd 256)."""
    return {
        "architectures": ["Gemma2ForCausalLM"],
        "model_type": "gemma2",
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": hidden // heads,
        "vocab_size": vocab,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "attn_logit_softcapping": 50.0,
        "final_logit_softcapping": 30.0,
        "query_pre_attn_scalar": hidden // heads,
        "sliding_window": 4096,
        "max_position_embeddings": 8192,
        "hidden_activation": "gelu_pytorch_tanh",
        "torch_dtype": "float32",
        "bos_token_id": 2,
        "eos_token_id": [1, 4],  # <eos>, <end_of_turn> (107 in the real vocab)
    }


def build_gemma2(path: Path, **dims: int) -> Path:
    """A tiny Gemma 2 with a Gemma-style chat template that refuses the system role."""
    config = gemma2_config(**dims)
    return build_mlx_lm_model(
        path,
        config,
        tokenizer={
            "specials": ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"],
            "config": {
                "bos_token": "<bos>",
                "eos_token": "<eos>",
                "pad_token": "<pad>",
                "add_bos_token": True,
                "chat_template": GEMMA_TEMPLATE,
            },
        },
    )


def llama_config(*, hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int, vocab: int = 2048) -> dict:
    """A llama config in the layout ``solverx-tiny`` uses (fp32, tied embeddings)."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "vocab_size": vocab,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
    }


def build_llama(path: Path, config: dict, *, seed: int = 0) -> Path:
    """A random-init llama with a chatml tokenizer."""
    return build_mlx_lm_model(
        path,
        config,
        seed=seed,
        tokenizer={
            "specials": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
            "config": {"eos_token": "<|im_end|>", "chat_template": CHATML_TEMPLATE},
        },
    )
