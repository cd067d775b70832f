"""Adapter validation: what mlx-lm writes is accepted as-is; every broken adapter is refused with a reason."""

from __future__ import annotations

import json
import math
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models.llama import Model, ModelArgs

from solverx.adapters.errors import AdapterError, BaseMismatch, InvalidAdapter
from solverx.adapters.fingerprint import base_fingerprint
from solverx.adapters.validate import base_linear_shapes, read_safetensors_header, validate_adapter

BASE_CONFIG = {
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
RANK = 4


def write_base(path: Path, *, quantize: bool = False) -> Path:
    """A 2-layer llama (hidden 64, 2 kv heads) saved as mlx-lm saves models; optionally 4-bit quantized."""
    mx.random.seed(0)
    model = Model(ModelArgs(**BASE_CONFIG))
    config = dict(BASE_CONFIG)
    if quantize:
        nn.quantize(model, group_size=32, bits=4)
        config["quantization"] = {"group_size": 32, "bits": 4, "mode": "affine"}
    path.mkdir(parents=True)
    mx.save_safetensors(str(path / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (path / "config.json").write_text(json.dumps(config))
    return path


def write_adapter(
    path: Path,
    base_dir: Path,
    *,
    config: dict | None = None,
    tensors: dict[str, mx.array] | None = None,
    dtype: mx.Dtype = mx.float32,
) -> Path:
    """A LoRA adapter on every Linear of the base's layers, unless ``tensors`` replaces (or extends) them."""
    if tensors is None:
        tensors = {}
        for module, (in_dims, out_dims) in base_linear_shapes(base_dir).items():
            tensors[f"{module}.lora_a"] = mx.random.normal((in_dims, RANK)).astype(dtype)
            tensors[f"{module}.lora_b"] = mx.random.normal((RANK, out_dims)).astype(dtype)
    path.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(path / "adapters.safetensors"), tensors)
    config = config or {
        "fine_tune_type": "lora",
        "num_layers": BASE_CONFIG["num_hidden_layers"],
        "lora_parameters": {"rank": RANK, "scale": 20.0, "dropout": 0.0},
    }
    (path / "adapter_config.json").write_text(json.dumps(config))
    return path


def good_tensors(base_dir: Path) -> dict[str, mx.array]:
    return {
        f"{module}.lora_{half}": mx.zeros((in_dims, RANK) if half == "a" else (RANK, out_dims))
        for module, (in_dims, out_dims) in base_linear_shapes(base_dir).items()
        for half in "ab"
    }


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_base(tmp_path_factory.mktemp("bases") / "tiny")


def test_base_linear_shapes_lists_every_projection_as_in_out(base_dir: Path) -> None:
    shapes = base_linear_shapes(base_dir)
    assert shapes["model.layers.0.self_attn.q_proj"] == (64, 64)
    assert shapes["model.layers.1.self_attn.k_proj"] == (64, 32)  # 2 kv heads x head_dim 16
    assert shapes["model.layers.0.mlp.gate_proj"] == (64, 128)
    assert shapes["model.layers.0.mlp.down_proj"] == (128, 64)
    assert len(shapes) == 2 * 7
    assert not any("embed" in path or "norm" in path for path in shapes)


def test_quantized_base_has_the_same_linear_shapes(base_dir: Path, tmp_path: Path) -> None:
    quantized = write_base(tmp_path / "q4", quantize=True)
    header = read_safetensors_header(quantized / "model.safetensors")
    assert header["model.layers.0.mlp.down_proj.weight"].shape == (64, 16)  # packed: 128 inputs x 4 bits / 32
    assert base_linear_shapes(quantized) == base_linear_shapes(base_dir)
    adapter = write_adapter(tmp_path / "adapter", base_dir)
    assert validate_adapter(adapter, quantized).rank == RANK


def test_valid_adapter_summary(base_dir: Path, tmp_path: Path) -> None:
    adapter = write_adapter(tmp_path / "ok", base_dir)
    summary = validate_adapter(adapter, base_dir, expected_fingerprint=base_fingerprint(base_dir))
    assert (summary.rank, summary.scale, summary.num_layers) == (RANK, 20.0, 2)
    assert summary.modules[0] == "model.layers.0.mlp.down_proj"
    assert len(summary.modules) == 14
    assert summary.dtypes == ("F32",)
    assert summary.base_fingerprint == base_fingerprint(base_dir)
    assert summary.size_bytes == (adapter / "adapters.safetensors").stat().st_size


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
def test_half_precision_adapters_are_accepted(base_dir: Path, tmp_path: Path, dtype: mx.Dtype) -> None:
    adapter = write_adapter(tmp_path / "half", base_dir, dtype=dtype)
    assert validate_adapter(adapter, base_dir).dtypes == ({mx.float16: "F16", mx.bfloat16: "BF16"}[dtype],)


def test_extra_mlx_lm_config_keys_and_explicit_keys_are_fine(base_dir: Path, tmp_path: Path) -> None:
    tensors = {k: v for k, v in good_tensors(base_dir).items() if ".layers.1." in k and "self_attn.v_proj" in k}
    config = {
        "model": "whatever",
        "data": "data/",
        "iters": 10,
        "fine_tune_type": "lora",
        "num_layers": 1,
        "lora_parameters": {"rank": RANK, "scale": 10, "dropout": 0.05, "keys": ["self_attn.v_proj"]},
    }
    adapter = write_adapter(tmp_path / "one", base_dir, config=config, tensors=tensors)
    assert validate_adapter(adapter, base_dir).modules == ("model.layers.1.self_attn.v_proj",)


# -- refusals ------------------------------------------------------------------------------------

Q = "model.layers.0.self_attn.q_proj"


def _config(**lora: object) -> dict:
    params = {"rank": RANK, "scale": 20.0, "dropout": 0.0} | lora
    return {"fine_tune_type": "lora", "num_layers": 2, "lora_parameters": params}


def _refused(adapter: Path, base_dir: Path, error: type[AdapterError] = InvalidAdapter, **kwargs: object) -> str:
    with pytest.raises(error) as info:
        validate_adapter(adapter, base_dir, **kwargs)
    return str(info.value)


def test_truncated_safetensors_is_refused_not_a_crash(base_dir: Path, tmp_path: Path) -> None:
    adapter = write_adapter(tmp_path / "cut", base_dir)
    weights = adapter / "adapters.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    assert "truncated" in _refused(adapter, base_dir)
    weights.write_bytes(data[:5])
    assert "truncated" in _refused(adapter, base_dir)
    weights.write_bytes(b"\xff" * 64)
    assert "truncated or corrupt" in _refused(adapter, base_dir)
    weights.write_bytes((20).to_bytes(8, "little") + b"{not json at all!!!}")
    assert "corrupt safetensors header" in _refused(adapter, base_dir)


def test_wrong_shape_names_key_and_both_shapes(base_dir: Path, tmp_path: Path) -> None:
    tensors = good_tensors(base_dir)
    tensors[f"{Q}.lora_a"] = mx.zeros((RANK, 64))  # transposed
    message = _refused(write_adapter(tmp_path / "t", base_dir, tensors=tensors), base_dir)
    assert f"{Q}.lora_a" in message
    assert "expected shape (in, rank) = (64, 4), got (4, 64)" in message


def test_rank_disagreeing_with_config_is_refused(base_dir: Path, tmp_path: Path) -> None:
    adapter = write_adapter(tmp_path / "r", base_dir, config=_config(rank=8))
    assert "expected shape (in, rank) = (64, 8), got (64, 4)" in _refused(adapter, base_dir)


@pytest.mark.parametrize(
    ("key", "shape", "expected"),
    [
        ("model.layers.0.self_attn.q_proj.weight", (64, 64), "unknown key"),
        ("model.layers.0.self_attn.q_proj.m", (64,), "DoRA"),
        ("model.layers.0.self_attn.nope_proj.lora_a", (64, RANK), "the base has no Linear layer"),
        ("model.embed_tokens.lora_a", (96, RANK), "the base has no Linear layer 'model.embed_tokens'"),
        ("model.layers.7.mlp.up_proj.lora_a", (64, RANK), "the base has no Linear layer"),
    ],
)
def test_unknown_keys_are_refused(
    base_dir: Path, tmp_path: Path, key: str, shape: tuple[int, ...], expected: str
) -> None:
    tensors = good_tensors(base_dir) | {key: mx.zeros(shape)}
    message = _refused(write_adapter(tmp_path / "k", base_dir, tensors=tensors), base_dir)
    assert key in message
    assert expected in message


def test_half_a_pair_is_refused(base_dir: Path, tmp_path: Path) -> None:
    tensors = good_tensors(base_dir)
    del tensors[f"{Q}.lora_b"]
    assert f"{Q}.lora_b is missing" in _refused(write_adapter(tmp_path / "p", base_dir, tensors=tensors), base_dir)


def test_empty_adapter_is_refused(base_dir: Path, tmp_path: Path) -> None:
    adapter = tmp_path / "empty"
    write_adapter(adapter, base_dir, tensors={"x.lora_a": mx.zeros((1, 1))})
    (adapter / "adapters.safetensors").write_bytes((2).to_bytes(8, "little") + b"{}")
    assert "holds no tensors" in _refused(adapter, base_dir)


def test_layers_outside_num_layers_or_keys_are_refused(base_dir: Path, tmp_path: Path) -> None:
    adapter = write_adapter(tmp_path / "n", base_dir, config={**_config(), "num_layers": 1})
    assert "layer 0 is outside the last num_layers=1 layers" in _refused(adapter, base_dir)
    adapter = write_adapter(tmp_path / "keys", base_dir, config=_config(keys=["self_attn.q_proj"]))
    assert "'mlp.down_proj' is not in lora_parameters.keys" in _refused(adapter, base_dir)


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({**_config(), "fine_tune_type": "dora"}, "DoRA adapters are not supported"),
        ({**_config(), "fine_tune_type": "full"}, "full fine-tunes are not adapters"),
        ({**_config(), "fine_tune_type": "prefix"}, "unknown fine_tune_type 'prefix'"),
        (_config(rank=0), "rank must be an integer in 1..256, got 0"),
        (_config(rank=512), "rank must be an integer in 1..256, got 512"),
        (_config(rank=4.0), "rank must be an integer"),
        (_config(scale=math.nan), "scale must be a finite number, got nan"),
        (_config(scale=math.inf), "scale must be a finite number"),
        ({**_config(), "lora_parameters": {"rank": RANK, "alpha": 16, "dropout": 0.0}}, "not 'alpha'"),
        (_config(dropout=1.5), "dropout must be in [0, 1)"),
        ({"fine_tune_type": "lora", "lora_parameters": _config()["lora_parameters"]}, "num_layers must be"),
        ({"fine_tune_type": "lora", "num_layers": 2}, "lora_parameters {rank, scale, dropout} is missing"),
    ],
)
def test_bad_configs_are_refused(base_dir: Path, tmp_path: Path, config: dict, expected: str) -> None:
    adapter = write_adapter(tmp_path / "c", base_dir, tensors=good_tensors(base_dir), config=config)
    assert expected in _refused(adapter, base_dir)


def test_missing_or_broken_files_are_refused(base_dir: Path, tmp_path: Path) -> None:
    adapter = write_adapter(tmp_path / "f", base_dir, tensors=good_tensors(base_dir))
    (adapter / "adapter_config.json").write_text("{oops")
    assert "adapter_config.json is not valid JSON" in _refused(adapter, base_dir)
    (adapter / "adapter_config.json").unlink()
    assert "adapter_config.json is missing" in _refused(adapter, base_dir)
    (adapter / "adapters.safetensors").unlink()
    assert "adapters.safetensors is missing" in _refused(adapter, base_dir)


HOSTILE_JSON = {
    "deep": "[" * 5000 + "]" * 5000,  # RecursionError inside json
    "deep but parsed": '{"a": ' + "[" * 100 + "]" * 100 + "}",
    "huge integer": '{"fine_tune_type": "lora", "num_layers": 2, "lora_parameters": {"rank": 4, "scale": 1'
    + "0" * 400
    + ', "dropout": 0.0}}',  # OverflowError in math.isfinite
    "out of range": '{"fine_tune_type": "lora", "num_layers": 1e400}',
    "lone surrogate": '{"fine_tune_type": "lora\\ud800"}',
}


@pytest.mark.parametrize("hostile", HOSTILE_JSON, ids=list(HOSTILE_JSON))
def test_every_json_file_of_an_adapter_is_hostile_input(base_dir: Path, tmp_path: Path, hostile: str) -> None:
    text = HOSTILE_JSON[hostile]
    adapter = write_adapter(tmp_path / "a", base_dir, tensors=good_tensors(base_dir))
    (adapter / "adapter_config.json").write_text(text)
    assert "adapter_config.json is not valid JSON" in _refused(adapter, base_dir)

    adapter = write_adapter(tmp_path / "m", base_dir, tensors=good_tensors(base_dir))
    (adapter / "manifest.json").write_text(text)
    assert "manifest.json is not valid JSON" in _refused(adapter, base_dir)

    adapter = write_adapter(tmp_path / "h", base_dir, tensors=good_tensors(base_dir))
    header = text.encode()
    (adapter / "adapters.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
    assert "corrupt safetensors header" in _refused(adapter, base_dir)


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nan_and_inf_are_refused(base_dir: Path, tmp_path: Path, dtype: mx.Dtype, bad: float) -> None:
    tensors = {k: v.astype(dtype) for k, v in good_tensors(base_dir).items()}
    tensors[f"{Q}.lora_b"] = mx.array([[0.0] * 63 + [bad]] * RANK).astype(dtype)
    message = _refused(write_adapter(tmp_path / "nan", base_dir, tensors=tensors), base_dir)
    kind = "4 NaN and 0 Inf" if math.isnan(bad) else "0 NaN and 4 Inf"
    assert f"{Q}.lora_b' contains {kind} values" in message


def test_integer_tensors_are_refused(base_dir: Path, tmp_path: Path) -> None:
    tensors = good_tensors(base_dir) | {f"{Q}.lora_a": mx.zeros((64, RANK), dtype=mx.int32)}
    message = _refused(write_adapter(tmp_path / "int", base_dir, tensors=tensors), base_dir)
    assert "dtype I32 is not float32, float16 or bfloat16" in message


def test_wrong_base_fingerprint_is_a_base_mismatch(base_dir: Path, tmp_path: Path) -> None:
    adapter = write_adapter(tmp_path / "fp", base_dir, tensors=good_tensors(base_dir))
    message = _refused(adapter, base_dir, BaseMismatch, expected_fingerprint="sha256:0000")
    assert "trained on base sha256:0000" in message and base_fingerprint(base_dir) in message
    (adapter / "manifest.json").write_text(json.dumps({"base_fingerprint": "sha256:1111"}))
    assert "sha256:1111" in _refused(adapter, base_dir, BaseMismatch)


def test_adapter_for_another_architecture_is_refused(base_dir: Path, tmp_path: Path) -> None:
    wider = tmp_path / "wider"
    config = dict(BASE_CONFIG, hidden_size=128)
    mx.random.seed(0)
    model = Model(ModelArgs(**config))
    wider.mkdir()
    mx.save_safetensors(str(wider / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (wider / "config.json").write_text(json.dumps(config))
    adapter = write_adapter(tmp_path / "a", base_dir)
    message = _refused(adapter, wider)
    assert "expected shape (in, rank) = (128, 4), got (64, 4)" in message
    assert "more" in message  # 28 problems, the first ten listed


def test_a_broken_base_is_reported_as_such(base_dir: Path, tmp_path: Path) -> None:
    adapter = write_adapter(tmp_path / "a", base_dir)
    assert "base model" in _refused(adapter, tmp_path / "nowhere", AdapterError)
