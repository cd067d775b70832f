"""The adapter registry: versions, promotion, rollback, removal, crash safety, cross-process change tokens."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models.llama import Model, ModelArgs

from solverx.adapters.errors import (
    AdapterConflict,
    AdapterNotFound,
    BaseMismatch,
    InvalidAdapter,
    InvalidAdapterName,
    VersionNotFound,
)
from solverx.adapters.fingerprint import base_fingerprint
from solverx.adapters.names import parse_model_name, validate_name
from solverx.adapters.registry import Registry
from solverx.adapters.validate import base_linear_shapes

REPO_ROOT = Path(__file__).resolve().parent.parent
BASE_CONFIG = {
    "model_type": "llama",
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "intermediate_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-5,
    "vocab_size": 64,
    "tie_word_embeddings": True,
}


def write_adapter(path: Path, base_dir: Path, *, seed: int = 0, rank: int = 4) -> Path:
    """An adapter on every Linear of the base, written the way mlx-lm writes one."""
    mx.random.seed(seed)
    tensors = {}
    for module, (in_dims, out_dims) in base_linear_shapes(base_dir).items():
        tensors[f"{module}.lora_a"] = mx.random.normal((in_dims, rank))
        tensors[f"{module}.lora_b"] = mx.random.normal((rank, out_dims))
    path.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(path / "adapters.safetensors"), tensors)
    config = {
        "fine_tune_type": "lora",
        "num_layers": 2,
        "lora_parameters": {"rank": rank, "scale": 8.0, "dropout": 0},
    }
    (path / "adapter_config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("bases") / "tiny"
    path.mkdir()
    mx.random.seed(0)
    model = Model(ModelArgs(**BASE_CONFIG))
    mx.save_safetensors(str(path / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (path / "config.json").write_text(json.dumps(BASE_CONFIG))
    return path


@pytest.fixture(scope="module")
def sources(base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three different valid adapters to register."""
    root = tmp_path_factory.mktemp("sources")
    return [write_adapter(root / f"a{i}", base_dir, seed=i) for i in range(3)]


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    return Registry(tmp_path / "adapters")


def register(registry: Registry, source: Path, base_dir: Path, name: str = "solverx", **kwargs: object):
    return registry.register(source, name, base_id="tiny", base_dir=base_dir, **kwargs)


# A second process sharing the registry: ``<mode> <root> <source> <base> [count]``. It imports only the registry
# (not mlx), so it starts fast; the ``stall-*`` modes hang mid-write so the test can SIGKILL them there.
CHILD = """
import sys, time
from pathlib import Path
from solverx.adapters import registry as module

mode, root, source, base = sys.argv[1:5]

def stall(*_):
    print("stalled", flush=True)
    time.sleep(120)

if mode == "stall-copy":
    copy = module._copy_file
    module._copy_file = lambda src, dst: (copy(src, dst), stall())[0]
elif mode == "stall-commit":
    module.Registry._commit = stall
reg = module.Registry(Path(root))
for _ in range(int(sys.argv[5]) if len(sys.argv) > 5 else 1):
    reg.register(Path(source), "solverx", base_id="tiny", base_dir=Path(base), promote=mode == "promote")
"""


def run_child(*args: str, wait: bool = True) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    child = subprocess.Popen([sys.executable, "-c", CHILD, *args], stdout=subprocess.PIPE, text=True, env=env)
    if wait:
        assert child.wait(timeout=60) == 0
    return child


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- lifecycle -----------------------------------------------------------------------------------


def test_register_records_provenance_and_copies_files(registry: Registry, sources, base_dir) -> None:
    info = register(
        registry,
        sources[0],
        base_dir,
        stage="sft",
        data_hash="sha256:data",
        recipe={"iters": 10},
        eval_report={"qa": 0.9},
    )
    assert (info.name, info.version, info.model_name, info.status) == ("solverx", 1, "solverx@1", "candidate")
    assert (info.base_id, info.base_fingerprint) == ("tiny", base_fingerprint(base_dir))
    assert (info.stage, info.parent, info.data_hash) == ("sft", None, "sha256:data")
    assert (info.recipe, info.eval_report, info.rank, info.scale) == ({"iters": 10}, {"qa": 0.9}, 4, 8.0)
    assert info.weights_path.read_bytes() == (sources[0] / "adapters.safetensors").read_bytes()
    assert info.config_path.read_bytes() == (sources[0] / "adapter_config.json").read_bytes()
    assert info.weights_sha256 == sha256(info.weights_path)
    assert info.size_bytes == info.weights_path.stat().st_size
    assert json.loads((info.path / "manifest.json").read_text())["base_fingerprint"] == info.base_fingerprint
    assert registry.names() == ["solverx"]
    assert registry.promoted("solverx") is None
    with pytest.raises(VersionNotFound, match="no promoted version"):
        registry.resolve("solverx")
    assert registry.resolve("solverx", 1) == info


def test_promote_rollback_and_status(registry: Registry, sources, base_dir) -> None:
    v1 = register(registry, sources[0], base_dir, promote=True)
    v2 = register(registry, sources[1], base_dir, parent=1, stage="cpt")
    v3 = register(registry, sources[2], base_dir, parent=2, stage="sft")
    assert (v1.status, v2.status, v3.parent) == ("promoted", "candidate", 2)
    assert registry.resolve("solverx").version == 1

    registry.promote("solverx", 2)
    registry.promote("solverx", 3)
    assert registry.resolve("solverx").version == 3
    assert [v.status for v in registry.versions("solverx")] == ["retired", "retired", "promoted"]

    assert registry.rollback("solverx").version == 2  # the previously promoted one
    assert registry.rollback("solverx").version == 1
    with pytest.raises(AdapterConflict, match="no earlier promoted version"):
        registry.rollback("solverx")
    assert registry.rollback("solverx", to=3).version == 3  # any version, explicitly
    assert registry.rollback("solverx").version == 1

    rejected = registry.set_status("solverx", 2, "rejected", eval_report={"qa": 0.1})
    assert (rejected.status, rejected.eval_report) == ("rejected", {"qa": 0.1})
    with pytest.raises(AdapterConflict, match="is promoted"):
        registry.set_status("solverx", 1, "retired")
    assert registry.set_status("solverx", 2, "promoted").status == "promoted"
    assert registry.resolve("solverx").version == 2
    with pytest.raises(ValueError, match="status must be one of"):
        registry.set_status("solverx", 2, "great")


def test_registering_rejected_and_missing_things(registry: Registry, sources, base_dir) -> None:
    assert register(registry, sources[0], base_dir, status="rejected").status == "rejected"
    with pytest.raises(VersionNotFound):
        registry.promote("solverx", 9)
    with pytest.raises(AdapterNotFound):
        registry.resolve("other")
    with pytest.raises(AdapterNotFound):
        registry.versions("other")
    with pytest.raises(VersionNotFound):
        register(registry, sources[0], base_dir, parent=5)
    with pytest.raises(ValueError, match="stage"):
        register(registry, sources[0], base_dir, stage="pretrain")


def test_remove_never_reuses_version_numbers(registry: Registry, sources, base_dir) -> None:
    register(registry, sources[0], base_dir, promote=True)
    register(registry, sources[1], base_dir)
    with pytest.raises(AdapterConflict, match="is promoted"):
        registry.remove("solverx", 1)
    registry.remove("solverx", 2)
    with pytest.raises(VersionNotFound):
        registry.resolve("solverx", 2)
    assert register(registry, sources[1], base_dir).version == 3

    registry.remove("solverx")
    assert registry.names() == []
    with pytest.raises(AdapterNotFound):
        registry.resolve("solverx")
    with pytest.raises(AdapterNotFound):
        registry.remove("solverx")
    again = register(registry, sources[0], base_dir)
    assert again.version == 4  # a client pinned to solverx@1 can never get a different adapter
    assert [v.version for v in registry.versions("solverx")] == [4]
    assert registry.promoted("solverx") is None


def test_versions_are_immutable(registry: Registry, sources, base_dir) -> None:
    v1 = register(registry, sources[0], base_dir)
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in v1.path.iterdir()}
    again = register(registry, sources[0], base_dir)  # the same files again: a new number, never an overwrite
    assert (again.version, again.weights_sha256) == (2, v1.weights_sha256)
    registry.promote("solverx", 1)
    registry.set_status("solverx", 2, "rejected", eval_report={"qa": 0})
    registry.promote("solverx", 2)
    registry.rollback("solverx")
    registry.remove("solverx", 2)
    after = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in v1.path.iterdir()}
    assert after == before
    assert set(before) == {"adapters.safetensors", "adapter_config.json", "manifest.json"}


# -- refusals ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../x", "a/b", "A", "", ".", "..", ".hidden", "-x", "x" * 65, "a b", "é"])
def test_bad_names_are_refused_everywhere(registry: Registry, sources, base_dir, name: str) -> None:
    with pytest.raises(InvalidAdapterName) as info:
        register(registry, sources[0], base_dir, name=name)
    assert info.value.code == "invalid_name"
    for call in (registry.resolve, registry.versions, registry.promoted, registry.remove):
        with pytest.raises(InvalidAdapterName):
            call(name)
    assert list(registry.root.parent.iterdir()) == [registry.root]
    assert registry.names() == []


def test_names_and_model_names() -> None:
    assert validate_name("solverx-v2.1_beta") == "solverx-v2.1_beta"
    assert validate_name("x" * 64) == "x" * 64
    assert parse_model_name("solverx@3") == ("solverx", 3)
    assert parse_model_name("solverx") == ("solverx", None)
    for bad in (
        "solverx@",
        "solverx@0",
        "solverx@03",
        "solverx@x",
        "solverx@1@2",
        "@3",
        "Solverx@1",
        "a/b@1",
    ):
        with pytest.raises(InvalidAdapterName):
            parse_model_name(bad)


def test_invalid_adapter_leaves_no_trace(registry: Registry, sources, base_dir, tmp_path) -> None:
    register(registry, sources[0], base_dir)
    generation = registry.generation()
    broken = write_adapter(tmp_path / "broken", base_dir)
    weights = broken / "adapters.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(InvalidAdapter, match="truncated") as info:
        register(registry, broken, base_dir)
    assert info.value.code == "invalid_adapter"
    with pytest.raises(BaseMismatch) as info:
        register(registry, sources[1], base_dir, expected_fingerprint="sha256:other")
    assert info.value.code == "base_mismatch"
    with pytest.raises(InvalidAdapter, match=r"nothing-here: adapters\.safetensors is missing"):
        register(registry, tmp_path / "nothing-here", base_dir)
    assert registry.generation() == generation
    assert [v.version for v in registry.versions("solverx")] == [1]
    assert list((registry.root / ".tmp").iterdir()) == []


def test_an_oversized_adapter_is_refused_by_its_size_before_anything_is_copied(base_dir, sources, tmp_path) -> None:
    registry = Registry(tmp_path / "adapters", max_adapter_bytes=2**20)
    huge = tmp_path / "huge"
    huge.mkdir()
    for name in ("adapters.safetensors", "adapter_config.json"):
        (huge / name).write_bytes((sources[0] / name).read_bytes())
    os.truncate(huge / "adapters.safetensors", 2**30)  # a 1 GiB sparse file: seconds to copy, no disk to read
    with pytest.raises(InvalidAdapter, match=r"adapters\.safetensors is 1,073,741,824 bytes; the limit is 1,048,576"):
        register(registry, huge, base_dir)
    assert not (registry.root / ".tmp").exists() or list((registry.root / ".tmp").iterdir()) == []
    link = tmp_path / "linked"
    link.mkdir()
    (link / "adapters.safetensors").symlink_to(sources[0] / "adapters.safetensors")
    (link / "adapter_config.json").write_bytes((sources[0] / "adapter_config.json").read_bytes())
    with pytest.raises(InvalidAdapter, match="not a regular file"):
        register(registry, link, base_dir)
    bad_config = tmp_path / "bad-config"
    bad_config.mkdir()
    (bad_config / "adapters.safetensors").write_bytes((sources[0] / "adapters.safetensors").read_bytes())
    (bad_config / "adapter_config.json").write_text('{"lora_parameters": {"rank": "four"}}')
    with pytest.raises(InvalidAdapter):  # the config is judged before the weights are copied
        register(registry, bad_config, base_dir)
    assert registry.names() == []


# -- processes -----------------------------------------------------------------------------------


def test_generation_changes_across_processes(registry: Registry, sources, base_dir) -> None:
    seen = [registry.generation()]
    run_child("promote", str(registry.root), str(sources[0]), str(base_dir))
    seen.append(registry.generation())
    assert registry.resolve("solverx").version == 1  # what the other process promoted
    register(registry, sources[1], base_dir)
    seen.append(registry.generation())
    registry.promote("solverx", 2)
    seen.append(registry.generation())
    registry.rollback("solverx")
    seen.append(registry.generation())
    registry.remove("solverx", 2)
    seen.append(registry.generation())
    assert seen == sorted(set(seen))  # strictly increasing: every change is visible
    registry.promote("solverx", 1)  # already promoted: nothing changes
    assert registry.generation() == seen[-1]
    assert Registry(registry.root).generation() == seen[-1]


def test_concurrent_writers_get_distinct_versions(registry: Registry, sources, base_dir) -> None:
    children = [
        run_child("register", str(registry.root), str(source), str(base_dir), "4", wait=False) for source in sources[:2]
    ]
    assert [child.wait(timeout=60) for child in children] == [0, 0]
    versions = registry.versions("solverx")
    assert [v.version for v in versions] == list(range(1, 9))
    assert all(v.weights_sha256 == sha256(v.weights_path) for v in versions)


def test_readers_never_see_half_written_versions(registry: Registry, sources, base_dir) -> None:
    writer = run_child("register", str(registry.root), str(sources[0]), str(base_dir), "6", wait=False)
    seen = set()
    while writer.poll() is None:
        if "solverx" in registry.names():
            for info in registry.versions("solverx"):
                assert sha256(info.weights_path) == info.weights_sha256
                assert json.loads(info.config_path.read_text())["fine_tune_type"] == "lora"
                seen.add(info.version)
        time.sleep(0.01)
    assert writer.returncode == 0
    assert seen  # the reader ran while versions were being written
    assert len(registry.versions("solverx")) == 6


@pytest.mark.parametrize("stage", ["stall-copy", "stall-commit"])
def test_killed_writer_leaves_a_consistent_registry(registry: Registry, sources, base_dir, stage: str) -> None:
    register(registry, sources[0], base_dir, promote=True)
    generation = registry.generation()
    child = run_child(stage, str(registry.root), str(sources[1]), str(base_dir), wait=False)
    assert child.stdout.readline().strip() == "stalled"
    os.kill(child.pid, signal.SIGKILL)
    child.wait(timeout=30)

    assert registry.resolve("solverx").version == 1  # the promotion never happened
    assert registry.generation() == generation
    if stage == "stall-copy":  # died before publishing: only debris in .tmp, which readers ignore
        assert [v.version for v in registry.versions("solverx")] == [1]
        assert len(list((registry.root / ".tmp").iterdir())) == 1
    else:  # died after publishing a complete version: it is there, as a candidate
        crashed = registry.resolve("solverx", 2)
        assert crashed.status == "candidate"
        assert crashed.weights_sha256 == sha256(crashed.weights_path)

    after = register(registry, sources[2], base_dir)  # the lock was released and the debris is cleaned
    assert after.version == (2 if stage == "stall-copy" else 3)
    assert list((registry.root / ".tmp").iterdir()) == []


# -- mlx-lm interoperability ------------------------------------------------------------------------------------


def test_adapter_written_by_mlx_lm_imports_as_is_and_loads_back(registry: Registry, base_dir, tmp_path) -> None:
    from mlx_lm.lora import CONFIG_DEFAULTS
    from mlx_lm.tuner.utils import linear_to_lora_layers, load_adapters
    from mlx_lm.utils import load_model, save_config

    # What mlx_lm.lora.train_model does: freeze, convert the last num_layers, save config and trainable weights.
    args = types.SimpleNamespace(**{**CONFIG_DEFAULTS, "num_layers": 1, "adapter_path": str(tmp_path / "out")})
    model, _ = load_model(base_dir)
    model.freeze()
    linear_to_lora_layers(model, args.num_layers, args.lora_parameters)
    mx.random.seed(1)
    trained = {k: mx.random.normal(v.shape) * 0.01 for k, v in tree_flatten(model.trainable_parameters())}
    model.load_weights(list(trained.items()), strict=False)
    out = tmp_path / "out"
    out.mkdir()
    save_config(vars(args), out / "adapter_config.json")
    mx.save_safetensors(str(out / "adapters.safetensors"), dict(tree_flatten(model.trainable_parameters())))

    info = register(registry, out, base_dir, name="from-mlx-lm", promote=True)
    assert (info.rank, info.scale) == (8, 20.0)

    fresh, _ = load_model(base_dir)
    load_adapters(fresh, str(registry.resolve("from-mlx-lm").path))
    tokens = mx.array([[1, 2, 3, 4]])
    assert mx.allclose(fresh(tokens), model(tokens)).item()
