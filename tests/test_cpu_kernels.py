"""The fast CPU kernel (solverx.engine.cpu_kernels): MLX's own numbers, only ever on exact weights, same answers."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import pytest

from solverx.engine import cpu_kernels
from solverx.engine.core import AdapterRef, Engine, EngineConfig
from solverx.engine.sampling import SamplingParams


@pytest.fixture(scope="module")
def kernel():
    available = cpu_kernels.load()
    if available.module is None:
        pytest.skip(f"no fast CPU kernel here: {available.reason}")
    return available.module


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group", [32, 64])
@pytest.mark.parametrize("rows", [1, 5, 8, 9, 16])
def test_kernel_matches_mlx_quantized_matmul(kernel, bits, group, rows):
    w = mx.random.normal((200, 384), key=mx.random.key(bits + group)) * 0.05
    x = mx.random.normal((rows, 384), key=mx.random.key(rows))
    packed, scales, biases = mx.quantize(w, group_size=group, bits=bits)
    want = mx.quantized_matmul(x, packed, scales, biases, transpose=True, group_size=group, bits=bits)
    got = kernel.quantized_matmul(x, packed, scales, biases, group, bits)
    assert got.shape == want.shape == (rows, 200)
    assert mx.allclose(got, want, rtol=1e-5, atol=1e-5).item()


def test_kernel_reads_float16_scales(kernel):
    w = mx.random.normal((64, 128), key=mx.random.key(0))
    packed, scales, biases = mx.quantize(w, group_size=32, bits=4)
    scales, biases = scales.astype(mx.float16), biases.astype(mx.float16)
    x = mx.random.normal((2, 128), key=mx.random.key(1))
    want = x @ mx.dequantize(packed, scales.astype(mx.float32), biases.astype(mx.float32), group_size=32, bits=4).T
    assert mx.allclose(kernel.quantized_matmul(x, packed, scales, biases, 32, 4), want, rtol=1e-5, atol=1e-5).item()


def test_kernel_takes_batched_and_strided_inputs(kernel):
    w = mx.random.normal((64, 96), key=mx.random.key(0))
    packed, scales, biases = mx.quantize(w, group_size=32, bits=8)
    x = mx.random.normal((96, 6), key=mx.random.key(1)).T.reshape(2, 3, 96)  # a transposed (strided) view
    got = kernel.quantized_matmul(x, packed, scales, biases, 32, 8)
    want = mx.quantized_matmul(x, packed, scales, biases, transpose=True, group_size=32, bits=8)
    assert got.shape == (2, 3, 64)
    assert mx.allclose(got, want, rtol=1e-5, atol=1e-5).item()


@pytest.mark.parametrize("tokens", [1, 2])
def test_kernel_adds_each_sequences_lora_delta(kernel, tokens):
    """Three sequences on slots 2, 0 (no adapter) and 1: each row gets its own slot's delta, slot 0 none."""
    w = mx.random.normal((96, 128), key=mx.random.key(0)) * 0.05
    packed, scales, biases = mx.quantize(w, group_size=32, bits=4)
    a = mx.random.normal((3, 128, 4), key=mx.random.key(1))
    b = mx.random.normal((3, 4, 96), key=mx.random.key(2))
    a[0], b[0] = 0.0, 0.0
    lora_scales = mx.array([0.0, 2.0, 0.5])
    ids = mx.array([2, 0, 1], dtype=mx.uint32)
    x = mx.random.normal((3, tokens, 128), key=mx.random.key(3))
    got = kernel.quantized_matmul(x, packed, scales, biases, 32, 4, a, b, lora_scales, ids)
    base = mx.quantized_matmul(x, packed, scales, biases, transpose=True, group_size=32, bits=4)
    delta = lora_scales[ids].reshape(3, 1, 1) * ((x @ a[ids]) @ b[ids])
    assert mx.allclose(got, base + delta, rtol=1e-4, atol=1e-4).item()
    assert mx.allclose(got[1], base[1], rtol=1e-5, atol=1e-5).item()


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group", [32, 64])
@pytest.mark.parametrize("rows", [1, 3, 8, 11])
def test_int8_activations_compute_the_rounded_x_exactly(kernel, bits, group, rows):
    """With quantize_x the product is the float product of x rounded per 32 values (no other error: the bias
    term uses the rounded sum too), with float16 scales as GGUF's, and with a LoRA delta on the unrounded x."""
    if not kernel.INT8_X:
        pytest.skip("this CPU has no AVX-512 VNNI")
    w = mx.random.normal((72, 384), key=mx.random.key(bits + group)) * 0.05
    packed, scales, biases = mx.quantize(w, group_size=group, bits=bits)
    scales, biases = scales.astype(mx.float16), biases.astype(mx.float16)
    x = mx.random.normal((rows, 384), key=mx.random.key(rows)) * 3
    x[0, :32] = 0.0  # an all-zero chunk
    want = kernel.quantized_matmul(cpu_kernels.rounded_per_32(x), packed, scales, biases, group, bits)
    got = kernel.quantized_matmul(x, packed, scales, biases, group, bits, quantize_x=True)
    assert mx.allclose(got, want, rtol=1e-5, atol=1e-4).item()
    exact = kernel.quantized_matmul(x, packed, scales, biases, group, bits)
    assert not mx.allclose(got, exact, rtol=1e-5, atol=1e-4).item()  # it did round
    assert (mx.abs(got - exact).max() / mx.abs(exact).max()).item() < 0.02  # by a little

    a = mx.random.normal((2, 384, 4), key=mx.random.key(5))
    b = mx.random.normal((2, 4, 72), key=mx.random.key(6))
    ids = mx.zeros((rows,), dtype=mx.uint32) + 1
    lora = (a, b, mx.array([0.0, 0.5]), ids)
    with_lora = kernel.quantized_matmul(x, packed, scales, biases, group, bits, *lora, quantize_x=True)
    delta = 0.5 * (x @ a[1]) @ b[1]
    assert mx.allclose(with_lora, got + delta, rtol=1e-4, atol=1e-3).item()


def test_int8_activations_leave_widths_that_are_no_multiple_of_64_exact(kernel):
    w = mx.random.normal((40, 96), key=mx.random.key(0))
    packed, scales, biases = mx.quantize(w, group_size=32, bits=4)
    x = mx.random.normal((2, 96), key=mx.random.key(1))
    exact = kernel.quantized_matmul(x, packed, scales, biases, 32, 4)
    assert mx.array_equal(kernel.quantized_matmul(x, packed, scales, biases, 32, 4, quantize_x=True), exact).item()


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("masked", [False, True])
def test_decode_attention_matches_mlx_on_a_cache_view(kernel, batch, masked):
    """One query token per sequence against the strided views a KV cache hands out, GQA (6 query heads on 2 KV
    heads), with a batch cache's left-padding mask."""
    keys = mx.random.normal((batch, 2, 64, 32), key=mx.random.key(0))[..., :37, :]  # a longer buffer's view
    values = mx.random.normal((batch, 2, 64, 32), key=mx.random.key(1))[..., :37, :]
    q = mx.random.normal((batch, 6, 1, 32), key=mx.random.key(2))
    mask = None
    if masked:
        mask = mx.arange(37)[None, None, None, :] >= mx.array([0, 5, 30][:batch]).reshape(batch, 1, 1, 1)
    want = mx.fast.scaled_dot_product_attention(q, keys, values, scale=0.17, mask=mask)
    got = kernel.decode_attention(q, keys, values, 0.17, mask)
    assert mx.allclose(got, want, rtol=1e-5, atol=1e-6).item()


def test_decode_attention_is_used_only_inside_the_engines_block(kernel, monkeypatch):
    calls = []
    real = kernel.decode_attention
    monkeypatch.setattr(kernel, "decode_attention", lambda *args: calls.append(args[0].shape) or real(*args))
    q, k = mx.random.normal((1, 4, 1, 16), key=mx.random.key(0)), mx.random.normal((1, 4, 9, 16), key=mx.random.key(1))
    with cpu_kernels.decode_attention(cpu_kernels.SpeedUp(fast=1, kept=0)):
        inside = mx.fast.scaled_dot_product_attention(q, k, k, scale=0.25)
        mx.fast.scaled_dot_product_attention(mx.repeat(q, 3, axis=2), k, k, scale=0.25)  # a prompt: MLX's own
    with cpu_kernels.decode_attention(cpu_kernels.SpeedUp(fast=0, kept=3)):  # a float32 model: MLX's own
        mx.fast.scaled_dot_product_attention(q, k, k, scale=0.25)
    outside = mx.fast.scaled_dot_product_attention(q, k, k, scale=0.25)
    assert calls == [(1, 4, 1, 16)]
    assert mx.allclose(inside, outside, rtol=1e-5, atol=1e-6).item()


def test_kernel_refuses_what_it_cannot_compute(kernel):
    w = mx.random.normal((8, 64), key=mx.random.key(0))
    packed, scales, biases = mx.quantize(w, group_size=32, bits=4)
    with pytest.raises(ValueError, match="last axis"):
        kernel.quantized_matmul(mx.zeros((1, 32)), packed, scales, biases, 32, 4)
    with pytest.raises(ValueError, match="bits"):
        kernel.quantized_matmul(mx.zeros((1, 64)), packed, scales, biases, 32, 2)


def _q4_1_values(rows: int, cols: int) -> mx.array:
    """What a float32 import of GGUF Q4_1 blocks holds: d * q + m per 32, q in 0..15 with both ends present."""
    q = mx.random.randint(0, 16, (rows, cols // 32, 32), key=mx.random.key(3))
    q[..., 0], q[..., 1] = 0, 15
    d = mx.random.uniform(0.001, 0.02, (rows, cols // 32, 1), key=mx.random.key(4)).astype(mx.float16)
    m = mx.random.uniform(-0.2, 0.0, (rows, cols // 32, 1), key=mx.random.key(5)).astype(mx.float16)
    return (d.astype(mx.float32) * q + m.astype(mx.float32)).reshape(rows, cols)


def _q8_0_values(rows: int, cols: int) -> mx.array:
    q = mx.random.randint(-127, 128, (rows, cols // 32, 32), key=mx.random.key(6))
    q[..., 0] = 127
    d = mx.random.uniform(0.001, 0.02, (rows, cols // 32, 1), key=mx.random.key(7)).astype(mx.float16)
    return (d.astype(mx.float32) * q).reshape(rows, cols)


@pytest.mark.parametrize(("values", "bits"), [(_q4_1_values, 4), (_q8_0_values, 8)])
def test_exact_quantization_recovers_gguf_grids_exactly(values, bits):
    w = values(48, 128)
    quantized = cpu_kernels.exact_quantization(w)
    assert quantized is not None and quantized.bits == bits
    assert quantized.scales.dtype == mx.float16  # GGUF's d and m are float16, and round-trip
    scales, biases = quantized.scales.astype(mx.float32), quantized.biases.astype(mx.float32)
    back = mx.dequantize(quantized.packed, scales, biases, group_size=32, bits=bits)
    assert mx.abs(back - w).max().item() <= 1e-6 * mx.abs(w).max().item()


def test_exact_quantization_leaves_other_weights_float32():
    assert cpu_kernels.exact_quantization(mx.random.normal((16, 64), key=mx.random.key(0))) is None
    assert cpu_kernels.exact_quantization(mx.zeros((16, 40))) is None  # not a whole number of groups
    nearly = _q4_1_values(16, 64)
    nearly[3, 7] += 1e-4  # one value off the grid: the whole weight stays as it is
    assert cpu_kernels.exact_quantization(nearly) is None


def test_speed_up_moves_exact_projections_only(kernel):
    model = nn.Sequential(nn.Linear(64, 48, bias=True), nn.Linear(48, 32, bias=False))
    model.layers[0].weight = _q4_1_values(48, 64)
    x = mx.random.normal((2, 64), key=mx.random.key(9))
    before = model(x)
    report = cpu_kernels.speed_up(model)
    assert (report.fast, report.kept) == (1, 1)
    assert isinstance(model.layers[0], cpu_kernels.FastLinear) and type(model.layers[1]) is nn.Linear
    assert mx.allclose(model(x), before, rtol=1e-5, atol=1e-5).item()
    long_input = mx.random.normal((cpu_kernels.KERNEL_ROWS + 1, 64), key=mx.random.key(10))  # a prompt: BLAS
    assert mx.allclose(model.layers[0](long_input), long_input @ model.layers[0].weight.T + model.layers[0].bias)


def _greedy(engine: Engine, prompt: list[int], tokens: int, adapter: AdapterRef | None = None) -> str:
    import asyncio

    async def run() -> str:
        params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
        return "".join([delta.text async for delta in engine.generate(prompt, params, adapter)])

    return asyncio.run(run())


def _random_adapter(model_dir, out):
    """A rank-8 adapter with random weights on every projection of the last 4 blocks (mlx-lm's layout)."""
    import json

    import numpy as np

    from solverx.adapters.validate import base_linear_shapes
    from solverx.engine.lora import DEFAULT_KEYS

    layers = json.loads((model_dir / "config.json").read_text())["num_hidden_layers"]
    rng = np.random.default_rng(0)
    tensors = {}
    for module, (fan_in, fan_out) in base_linear_shapes(model_dir).items():
        block = int(module.split(".")[2])
        if module.split(".", 3)[-1] in DEFAULT_KEYS and block >= layers - 4:
            tensors[f"{module}.lora_a"] = mx.array((rng.standard_normal((fan_in, 8)) / fan_in**0.5).astype("f4"))
            tensors[f"{module}.lora_b"] = mx.array((rng.standard_normal((8, fan_out)) * 0.05).astype("f4"))
    out.mkdir()
    mx.save_safetensors(str(out / "adapters.safetensors"), tensors)
    lora = {"rank": 8, "scale": 4.0, "dropout": 0.0, "keys": list(DEFAULT_KEYS)}
    config = {"fine_tune_type": "lora", "num_layers": 4, "lora_parameters": lora}
    (out / "adapter_config.json").write_text(json.dumps(config))
    return AdapterRef("random@1", out)


def test_real_base_serves_the_same_answers_on_the_kernel(kernel, smollm_dir, tmp_path):
    """The default base (a float32 import of Q4_1/Q8_0 blocks) runs every projection on the kernel and answers
    token for token as it does on float32 BLAS, with and without an adapter: a user sees only the speed."""
    adapter = _random_adapter(smollm_dir, tmp_path / "adapter")
    answers = {}
    for kernels in (True, False):
        engine = Engine(smollm_dir, "smollm", EngineConfig(cpu_kernels=kernels)).start()
        try:
            assert (engine.speed_up.fast, engine.speed_up.kept) == ((211, 0) if kernels else (0, 0))
            prompt = engine.encode_chat([{"role": "user", "content": "Write a short story about a river."}])
            answers[kernels] = (_greedy(engine, prompt, 40), _greedy(engine, prompt, 40, adapter))
        finally:
            engine.stop()
    assert len(answers[True][0]) > 80 and answers[True][0] != answers[True][1]  # the adapter changes the answer
    assert answers[True] == answers[False]


def test_switched_off_the_engine_serves_float32_and_says_why(tmp_path):
    """SOLVERX_CPU_KERNELS=0 (or a machine where the kernel cannot be built): no kernel, one line saying why."""
    import os
    import subprocess
    import sys

    script = (
        "import logging, mlx.nn as nn\n"
        "logging.basicConfig(level=logging.WARNING)\n"
        "from solverx.engine import cpu_kernels\n"
        "model = nn.Sequential(nn.Linear(64, 32))\n"
        "print(cpu_kernels.speed_up(model).describe())\n"
    )
    env = dict(os.environ, SOLVERX_CPU_KERNELS="0", SOLVERX_KERNEL_CACHE=str(tmp_path / "kernels"))
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "float32 everywhere (SOLVERX_CPU_KERNELS=0)"
    assert "fast CPU kernels unavailable (SOLVERX_CPU_KERNELS=0): serving float32 weights" in done.stderr
    assert not (tmp_path / "kernels").exists()  # nothing was built


def test_real_base_with_int8_activations_still_answers(kernel, smollm_dir):
    """cpu_activations = int8: every projection rounds x to int8 (on a CPU with VNNI) and the base still answers
    a plain question right; the engine's log line says how many projections do."""
    if not kernel.INT8_X:
        pytest.skip("this CPU has no AVX-512 VNNI")
    engine = Engine(smollm_dir, "smollm", EngineConfig(int8_activations=True)).start()
    try:
        assert (engine.speed_up.fast, engine.speed_up.int8) == (211, 211)
        assert "211 of them with int8 activations" in engine.speed_up.describe()
        prompt = engine.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
        assert "Paris" in _greedy(engine, prompt, 24)
    finally:
        engine.stop()
