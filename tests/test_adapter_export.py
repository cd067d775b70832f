"""``solverx adapters export``: an adapter in llama.cpp's, PEFT's and a fused model's layout, each checked against
an independent reference rather than against our own reader.

- PEFT: the exported pairs, applied the way PEFT applies them (W + lora_alpha / r · B·A) to the *Hugging Face
  layout* of a tiny GGUF model's weights (llama.cpp's q/k permutation undone, see tests/test_gguf_import.py), run
  in mlx-lm's model class, give the logits our base + adapter give.
- GGUF: the file has the keys and tensor names llama.cpp's loader looks up, the shapes its checks demand against
  the source model's tensors, and the fused GGUF (W + alpha / r · B·A per tensor, in llama.cpp's own layout)
  imports back to the logits of base + adapter. A real llama.cpp reading the exported LoRA is in bench/.
- fused: mlx-lm's model from the fused directory gives base + adapter's logits; on the real base, through the CLI,
  our engine's greedy answer from the fused model is the daemon's answer from the adapter.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import gguf
import httpx
import mlx.core as mx
import numpy as np
import openai
import pytest
from adapter_fixtures import random_adapter
from mlx_lm import load
from serving import REPO_ROOT
from test_gguf_import import (
    ARCHITECTURES,
    TOKENS,
    assert_close,
    gguf_name,
    hf_weights,
    reference_config,
    reference_logits,
    write_gguf,
)

from solverx.adapters.export import ExportError, export_fused, export_gguf, export_peft
from solverx.models.gguf_import import import_gguf
from solverx.models.gguf_import.tensors import dequantize_tensor
from solverx.models.tiny import TINY_BASE_ID


def imported_base(case: str, tmp_path: Path) -> tuple[Path, dict, dict]:
    """A tiny GGUF of ``case`` imported as float32; its HF-layout weights and reference config."""
    spec, metadata, reference_extra = ARCHITECTURES[case]
    back = write_gguf(tmp_path / "m.gguf", spec, hf_weights(spec), metadata=metadata)
    import_gguf(tmp_path / "m.gguf", tmp_path / "base", q_bits=None, progress=False)
    return tmp_path / "base", back, reference_config(spec, **reference_extra)


def served_logits(base: Path, adapter: Path | None = None) -> np.ndarray:
    """Logits of mlx-lm's model as we load it: the imported base, with the adapter's LoRA layers when given."""
    model, _ = load(str(base), adapter_path=str(adapter) if adapter else None)
    return np.array(model(mx.array([TOKENS]))[0])


@pytest.mark.parametrize("case", ["llama", "qwen2", "gemma2"])
def test_peft_export_fits_the_hugging_face_layout_of_the_base(case: str, tmp_path: Path) -> None:
    base, hf, config = imported_base(case, tmp_path)
    adapter = random_adapter(base, tmp_path / "adapter", seed=3)
    out = export_peft(adapter, base, tmp_path / "peft", base_model="org/tiny")

    peft_config = json.loads((out / "adapter_config.json").read_text())
    assert peft_config["peft_type"] == "LORA" and peft_config["base_model_name_or_path"] == "org/tiny"
    assert (peft_config["r"], peft_config["lora_alpha"]) == (4, 40.0)  # mlx-lm scale 10 = alpha / r
    assert set(peft_config["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                  "down_proj"}  # fmt: skip
    pairs = mx.load(str(out / "adapter_model.safetensors"))
    merged = dict(hf)
    for key in pairs:
        if key.endswith(".lora_A.weight"):
            module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            a, b = np.array(pairs[key]), np.array(pairs[key.replace("lora_A", "lora_B")])
            merged[f"{module}.weight"] = hf[f"{module}.weight"] + peft_config["lora_alpha"] / peft_config["r"] * b @ a
    assert len(merged) == len(hf) and any(k.endswith("lora_A.weight") for k in pairs)
    want = reference_logits(config, merged)
    assert_close(served_logits(base, adapter), want, 1e-4)
    assert float(np.abs(want - reference_logits(config, hf)).max()) > 0.1  # the adapter does change the logits


def test_gguf_export_is_what_llama_cpp_loads_and_fuses_back_to_the_same_model(tmp_path: Path) -> None:
    base, _, _ = imported_base("llama", tmp_path)
    adapter = random_adapter(base, tmp_path / "adapter", seed=5)
    lora_file = export_gguf(adapter, base, tmp_path / "lora.gguf")

    reader = gguf.GGUFReader(str(lora_file))
    fields = {name: field.contents() for name, field in reader.fields.items()}
    assert fields["general.architecture"] == "llama"  # llama.cpp refuses an adapter of another architecture
    assert (fields["general.type"], fields["adapter.type"]) == ("adapter", "lora")
    assert fields["adapter.lora.alpha"] == pytest.approx(40.0)
    source = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "m.gguf")).tensors}
    lora = {t.name: t for t in reader.tensors}
    weights = {name.removesuffix(".lora_a") for name in lora if name.endswith(".lora_a")}
    assert weights == {gguf_name("llama", k) for k in hf_weights(ARCHITECTURES["llama"][0]) if "_proj." in k}
    merged = {}
    for name in weights:  # llama-adapter.cpp: a.ne[0] == W.ne[0], b.ne[1] == W.ne[1], a.ne[1] == b.ne[0]
        w, a, b = source[name], lora[f"{name}.lora_a"], lora[f"{name}.lora_b"]
        assert (a.shape[0], b.shape[1], a.shape[1]) == (w.shape[0], w.shape[1], b.shape[0]) and b.shape[0] == 4
        a_rows, b_rows = dequantize_tensor(a), dequantize_tensor(b)  # numpy layout: (r, in), (out, r)
        merged[name] = dequantize_tensor(w) + fields["adapter.lora.alpha"] / 4 * b_rows @ a_rows

    fused = export_fused(adapter, base, tmp_path / "fused")
    fused_tensors = {t.name: t for t in gguf.GGUFReader(str(fused / "fused.gguf")).tensors}
    assert fused_tensors.keys() == source.keys()
    for name, want in merged.items():  # llama.cpp's sum, in llama.cpp's layout
        np.testing.assert_allclose(dequantize_tensor(fused_tensors[name]), want, rtol=1e-5, atol=1e-6)
    import_gguf(fused / "fused.gguf", tmp_path / "fused-imported", q_bits=None, progress=False)
    want = served_logits(base, adapter)
    assert_close(served_logits(tmp_path / "fused-imported"), want, 1e-4)
    assert_close(served_logits(fused), want, 1e-4)  # the fused MLX directory


def test_exports_refuse_what_they_cannot_write_and_never_overwrite(tiny_model_dir: Path, tmp_path: Path) -> None:
    adapter = random_adapter(tiny_model_dir, tmp_path / "adapter", seed=1)
    with pytest.raises(ExportError, match="not imported from a GGUF file"):
        export_gguf(adapter, tiny_model_dir, tmp_path / "x.gguf")  # the tiny base has no llama.cpp counterpart
    assert not (tmp_path / "x.gguf").exists()
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="already exists"):
        export_peft(adapter, tiny_model_dir, tmp_path / "taken", base_model=TINY_BASE_ID)
    assert [p.name for p in (tmp_path / "taken").iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "taken"]  # no partial output left behind


# -- the CLI on the real base ------------------------------------------------------------------------------


def solverx(home: Path, *args: str) -> subprocess.CompletedProcess:
    installed = Path(sys.executable).with_name("solverx")
    command = [str(installed)] if installed.exists() else [sys.executable, "-m", "solverx"]
    command += [*args, "--home", str(home), "--config", str(home / "config.toml")]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SOLVERX_")}
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=REPO_ROOT)


def test_cli_exports_a_served_adapter_and_the_fused_model_answers_as_it_does(
    real_daemon, smollm_dir: Path, tmp_path: Path
) -> None:
    from solverx.engine.core import Engine
    from solverx.engine.sampling import SamplingParams
    from solverx.models.builtin import SMOLLM_BASE_ID

    adapter = random_adapter(smollm_dir, tmp_path / "adapter", seed=7)
    registered = httpx.post(f"{real_daemon.api_url}/adapters", json={"name": "exported", "path": str(adapter)},
                            timeout=60)  # fmt: skip
    assert registered.status_code == 201, registered.text
    question = [{"role": "user", "content": "Name three colours."}]
    client = openai.OpenAI(base_url=real_daemon.api_url, api_key="unused", max_retries=0, timeout=120)
    reply = client.chat.completions.create(model="exported", messages=question, temperature=0, max_tokens=24)
    served = reply.choices[0].message.content

    done = solverx(real_daemon.home, "adapters", "export", "exported@1", "--format", "fused", "--out",
                   str(tmp_path / "fused"))  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "fused" / "fused.gguf").is_file() and "fused.gguf" in done.stdout
    done = solverx(real_daemon.home, "adapters", "export", "exported", "--format", "gguf", "--out",
                   str(tmp_path / "exported.gguf"))  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "--lora" in done.stdout and "ADAPTER" in done.stdout  # how to use it in llama.cpp and Ollama

    engine = Engine(tmp_path / "fused", SMOLLM_BASE_ID).start()
    try:

        async def greedy() -> str:
            tokens = engine.encode_chat(question)
            params = SamplingParams(temperature=0.0, max_tokens=24)
            return "".join([d.text async for d in engine.generate(tokens, params, None)])

        assert asyncio.run(greedy()) == served, "the fused model answers otherwise than base + adapter"
    finally:
        engine.stop()
    base_reply = client.chat.completions.create(model=SMOLLM_BASE_ID, messages=question, temperature=0, max_tokens=24)
    assert base_reply.choices[0].message.content != served  # the adapter (and so the fusion) changes the answer
