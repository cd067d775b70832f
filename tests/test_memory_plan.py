"""The memory planner: arithmetic on the seed's real configs, and estimates checked against measured peaks."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from solverx.models.checkpoints import safetensors_header, tensor_nbytes
from solverx.models.lookalikes import build_llama, llama_config
from solverx.models.memory_plan import (
    KEPT_STATES_BYTES,
    GiB,
    ModelShape,
    TrainPlanArgs,
    format_plan,
    kv_cache_bytes,
    load_model_config,
    plan,
    q_bits_of,
    weight_bytes,
)
from solverx.models.prepare import prepare_checkpoint

GB = 10**9
MAC_48GB = 48 * GiB

# Published configs (HF config.json fields).
GEMMA2_9B = {
    "model_type": "gemma2",
    "hidden_size": 3584,
    "num_hidden_layers": 42,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 256,
    "intermediate_size": 14336,
    "vocab_size": 256000,
    "max_position_embeddings": 8192,
    "torch_dtype": "bfloat16",
}
HCX_32B_TEXT = {
    "model_type": "hyperclovax",
    "hidden_size": 5120,
    "num_hidden_layers": 72,
    "num_attention_heads": 40,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "intermediate_size": 24192,
    "vocab_size": 128256,
    "tie_word_embeddings": False,
    "use_post_norm": True,
    "torch_dtype": "bfloat16",
}
HCX_32B_VLM = {"model_type": "vlm", "architectures": ["HCXVisionV2ForCausalLM"], "text_config": HCX_32B_TEXT}


def test_parameter_counts_match_the_published_sizes() -> None:
    assert ModelShape.from_config(GEMMA2_9B).num_parameters == pytest.approx(9.24e9, rel=0.01)
    assert ModelShape.from_config(HCX_32B_VLM).num_parameters == pytest.approx(32.6e9, rel=0.01)
    assert ModelShape.from_config(HCX_32B_VLM) == ModelShape.from_config(HCX_32B_TEXT)


def test_weights_16_bit_vs_8_bit() -> None:
    gemma, hcx = ModelShape.from_config(GEMMA2_9B), ModelShape.from_config(HCX_32B_TEXT)
    assert weight_bytes(hcx, None) == pytest.approx(65 * GB, rel=0.01)  # "16-bit ≈ 64 GB"
    # 8-bit: one byte per weight plus a 16-bit scale and bias per 64 weights → 1.0625 bytes
    assert weight_bytes(hcx, 8) == pytest.approx(hcx.num_parameters * 1.0625, rel=0.001)
    assert weight_bytes(gemma, 8) == pytest.approx(gemma.num_parameters * 1.0625, rel=0.001)
    assert weight_bytes(gemma, 4) < weight_bytes(gemma, 8) < weight_bytes(gemma, None)


def test_kv_cache_is_the_textbook_formula() -> None:
    gemma = ModelShape.from_config(GEMMA2_9B)
    assert kv_cache_bytes(gemma, 4096, 1) == 2 * 42 * 8 * 256 * 4096 * 2
    assert kv_cache_bytes(gemma, 4096, 4) == 4 * kv_cache_bytes(gemma, 4096, 1)
    assert kv_cache_bytes(gemma, 4000, 1) == kv_cache_bytes(gemma, 4096, 1)  # mlx-lm allocates 256 at a time


def test_hcx_32b_8bit_must_train_exclusively_on_a_48gb_mac() -> None:
    common = dict(context=4096, lora_layers=16, train=TrainPlanArgs(1, 2048), machine_bytes=MAC_48GB)
    # with the GPU wired limit raised to ~85 % of RAM (sysctl iogpu.wired_limit_mb)
    p = plan(HCX_32B_VLM, q_bits=8, grad_checkpoint=True, os_reserve=0.15, fused_attention=True, **common)
    assert p.serve_fits and p.train_fits and not p.both_fit
    assert p.recommendation == "exclusive"
    assert plan(HCX_32B_VLM, q_bits=None, **common).recommendation == "does-not-fit"  # 16-bit: ~61 GiB


def test_gemma2_9b_8bit_serves_and_trains_concurrently_with_small_batches() -> None:
    p = plan(
        GEMMA2_9B,
        q_bits=8,
        context=4096,
        resident_adapters=4,
        train=TrainPlanArgs(batch_size=1, seq_len=2048),
        grad_checkpoint=True,
        machine_bytes=MAC_48GB,
    )
    assert p.recommendation == "concurrent"
    big = plan(GEMMA2_9B, q_bits=8, context=4096, train=TrainPlanArgs(4, 2048), machine_bytes=MAC_48GB)
    assert big.activations > 20 * GiB  # 256k-entry vocab: the logits of 4 × 2048 tokens dominate
    assert big.recommendation == "serve-only"
    assert any("checkpointing would save" in note for note in big.notes)


def test_training_counts_the_states_it_keeps_below_the_lora() -> None:
    common = dict(q_bits=8, context=4096, train=TrainPlanArgs(1, 2048), grad_checkpoint=True, machine_bytes=MAC_48GB)
    below = plan(HCX_32B_VLM, lora_layers=16, **common)
    every = plan(HCX_32B_VLM, lora_layers=72, **common)  # all of its blocks
    assert below.kept_states == KEPT_STATES_BYTES and every.kept_states == 0
    assert below.train_total == below.weights + below.lora_state + below.activations + KEPT_STATES_BYTES
    assert "kept states" in format_plan(below) and "kept states" not in format_plan(every)
    assert plan(GEMMA2_9B, lora_layers=16, **common).kept_states == 0  # its scaled embedding: the whole model runs


def test_os_reserve_is_configurable_and_moves_the_verdict() -> None:
    common = dict(q_bits=8, context=4096, train=TrainPlanArgs(1, 2048), grad_checkpoint=True)
    tight = plan(GEMMA2_9B, machine_bytes=32 * GiB, **common)
    loose = plan(GEMMA2_9B, machine_bytes=32 * GiB, os_reserve=0.0, **common)
    assert tight.budget == 24 * GiB and loose.budget == 32 * GiB
    assert tight.recommendation == "exclusive" and loose.recommendation == "concurrent"


def test_training_in_process_shares_the_base_weights() -> None:
    common = dict(q_bits=8, context=4096, train=TrainPlanArgs(1, 2048), machine_bytes=MAC_48GB)
    child = plan(GEMMA2_9B, **common)
    shared = plan(GEMMA2_9B, shared_weights=True, **common)
    assert child.both_total - shared.both_total == child.weights


def test_format_plan_reads_like_the_cli_output() -> None:
    p = plan(
        HCX_32B_VLM,
        q_bits=8,
        context=4096,
        train=TrainPlanArgs(1, 2048),
        grad_checkpoint=True,
        machine_bytes=MAC_48GB,
        os_reserve=0.15,
    )
    text = format_plan(p)
    for fragment in ("hyperclovax, 32.60B", "8-bit", "KV cache", "adapter + Adam", "recommendation: exclusive"):
        assert fragment in text, fragment
    assert "serving + training" in text and "15% of 48 GiB" in text


# --- against measurements ---------------------------------------------------------------------------------


def _bench():
    path = Path(__file__).resolve().parent.parent / "bench" / "memory_plan.py"
    spec = importlib.util.spec_from_file_location("bench_memory_plan", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_llamas(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A ~3M-parameter llama (hidden 256, 4 layers) in fp32, and its 8-bit copy."""
    root = tmp_path_factory.mktemp("llamas")
    fp32 = build_llama(root / "tiny", llama_config(hidden=256, layers=4, heads=4, kv_heads=2, intermediate=688))
    return {"fp32": fp32, "8bit": prepare_checkpoint(fp32, root / "tiny-8bit", progress=False).path}


@pytest.mark.parametrize("variant", ["fp32", "8bit"])
def test_weight_estimate_equals_the_bytes_on_disk(tiny_llamas: dict[str, Path], variant: str) -> None:
    model = tiny_llamas[variant]
    config = load_model_config(model)
    on_disk = sum(
        tensor_nbytes(entry) for shard in model.glob("*.safetensors") for entry in safetensors_header(shard).values()
    )
    assert weight_bytes(ModelShape.from_config(config), q_bits_of(config)) == on_disk
    assert json.loads((model / "config.json").read_text()).get("quantization", {}).get("bits") == (
        8 if variant == "8bit" else None
    )


MEASURED = [  # ~25 s in all; bench/memory_plan.py adds the 25M llama, 8-bit checkpointing and Gemma 2
    ("fp32", "serve", False),
    ("fp32", "train", False),
    ("fp32", "train", True),
    ("8bit", "serve", False),
    ("8bit", "train", False),
]


@pytest.mark.parametrize(("variant", "kind", "grad_checkpoint"), MEASURED)
def test_estimate_is_within_10_percent_of_the_measured_peak(
    tiny_llamas: dict[str, Path], variant: str, kind: str, grad_checkpoint: bool
) -> None:
    bench = _bench()
    cases = bench.cases({variant: tiny_llamas[variant]}, prompt=256, batch=2, seq=128)
    case = next(c for c in cases if c["kind"] == kind and c.get("grad_checkpoint", False) == grad_checkpoint)
    estimate, measured = bench.estimate(case), bench.measure_in_subprocess(case)
    assert 0.9 <= estimate / measured <= 1.1, (bench.describe(case), estimate, measured)
