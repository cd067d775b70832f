"""Decode-sized matrix products against quantized weights on the CPU, fast: our kernel, built here on first use.

A decode step on MLX's CPU backend reads every weight of the model once per token, and MLX's CPU quantized
kernels are scalar loops (3.5× slower than float32 BLAS on this project's machines, so the default base is served
in float32, 540 MB of reads a token). ``kernels/qmm.cpp`` is one MLX primitive that multiplies 1–16 rows against
MLX's own affine 4-/8-bit layout with AVX2/AVX-512 on every core: 4–6× faster than float32 for one row here.

Nothing about the served numbers changes (unless ``cpu_activations = "int8"`` asks for llama.cpp's trade, see
:func:`speed_up`). :func:`exact_quantization` only quantizes a weight whose values already
lie exactly on a 4- or 8-bit grid, which is what a float32 import of a GGUF file's Q4_1/Q8_0 blocks (the default
base) is: the kernel then computes with the very values training saw. Any other weight stays float32. The float32
weights stay too, for prompts (more than ``KERNEL_ROWS`` rows), where BLAS is faster.

The extension is compiled with cmake against the installed mlx and nanobind (the nanobind ABI mlx is built with)
into a cache keyed by its sources and their versions. Where it cannot be built or loaded (no compiler, macOS, an
mlx built with another nanobind), :func:`load` says why once and the engine serves float32 as before; on a Mac MLX's
Metal kernels already serve quantized weights fast.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.metadata
import importlib.util
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path
from types import ModuleType

import mlx.core as mx
import mlx.nn as nn
import platformdirs
from mlx.utils import tree_unflatten

from solverx.paths import APP_NAME, exclusive, swap_into_place

log = logging.getLogger("solverx.engine")

SOURCES = Path(__file__).with_name("kernels")
MODULE = "_solverx_qmm"
CACHE_ENV = "SOLVERX_KERNEL_CACHE"
SWITCH_ENV = "SOLVERX_CPU_KERNELS"  # "0" turns the kernels off
# Rows up to which the kernel is at least as fast as float32 BLAS here (bench/qmm.py, 576->1536 4-bit: 16 rows 0.220
# vs 0.222 ms, 32 rows 0.436 vs 0.355; the tied head: 16 rows 6.97 vs 9.75 ms, 32 rows 13.3 vs 12.4).
KERNEL_ROWS = 16
GROUP = 32
# A value counts as on the grid within this share of a quantization step (float32 rounding of d*q + m).
GRID_TOLERANCE = 1e-3


def _cache_root() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(platformdirs.user_cache_dir(APP_NAME, appauthor=False)) / "kernels"


def _build_key() -> str:
    """Changes with anything that changes the binary: our sources, mlx, nanobind, Python, the machine."""
    digest = hashlib.sha256()
    for path in sorted(SOURCES.iterdir()):
        if path.suffix in {".cpp", ".txt"}:
            digest.update(path.name.encode() + path.read_bytes())
    for dist in ("mlx", "nanobind"):
        digest.update(f"{dist}={importlib.metadata.version(dist)}".encode())
    digest.update(f"{sys.version}|{platform.machine()}|{_arch_flags()}".encode())
    return digest.hexdigest()[:16]


@cache
def _cpu_flags() -> frozenset[str]:
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    line = next((line for line in cpuinfo.splitlines() if line.startswith("flags")), "")
    return frozenset(line.partition(":")[2].split())


def _arch_flags() -> str:
    """AVX2, FMA and F16C (the kernel's floor: :func:`_unavailable_here` checks them), AVX-512 where this CPU has it."""
    flags = "-mavx2 -mfma -mf16c"
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= _cpu_flags():
        flags += " -mavx512f -mavx512bw -mavx512vl -mavx512dq"
        if "avx512_vnni" in _cpu_flags():
            flags += " -mavx512vnni"  # the int8-activation products (speed_up's int8_activations)
    return flags


def _build(target: Path) -> None:
    """cmake configure + build into a staging directory beside ``target``, then rename it into place."""
    staging = Path(tempfile.mkdtemp(prefix=".build-", dir=target.parent))
    try:
        configure = [
            "cmake", "-S", str(SOURCES), "-B", str(staging), "-DCMAKE_BUILD_TYPE=Release",
            f"-DPython_EXECUTABLE={sys.executable}", f"-DSOLVERX_ARCH_FLAGS={_arch_flags()}",
        ]  # fmt: skip
        for command in (configure, ["cmake", "--build", str(staging), "-j", str(os.cpu_count() or 1)]):
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                lines = (done.stdout + done.stderr).strip().splitlines()
                first_error = next((line for line in lines if "error" in line.lower()), lines[-1] if lines else "")
                raise RuntimeError(f"`{' '.join(command[:2])}` failed: {first_error.strip()}")
        built = next(staging.glob(f"{MODULE}*.so"), None)
        if built is None:
            raise RuntimeError("cmake built no extension module")
        kept = staging / "out"
        kept.mkdir()
        shutil.copy2(built, kept / built.name)
        swap_into_place(kept, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _import(directory: Path) -> ModuleType:
    path = next(directory.glob(f"{MODULE}*.so"))
    loader = importlib.machinery.ExtensionFileLoader(MODULE, str(path))
    spec = importlib.util.spec_from_file_location(MODULE, path, loader=loader)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _self_test(module: ModuleType) -> None:
    """One product against MLX's own, so an ABI or codegen problem turns the kernels off instead of serving it."""
    w = mx.random.normal((64, 64), key=mx.random.key(0))
    x = mx.random.normal((3, 64), key=mx.random.key(1))
    for bits in (4, 8):
        packed, scales, biases = mx.quantize(w, group_size=GROUP, bits=bits)
        want = mx.quantized_matmul(x, packed, scales, biases, transpose=True, group_size=GROUP, bits=bits)
        got = module.quantized_matmul(x, packed, scales, biases, GROUP, bits)
        if not mx.allclose(got, want, rtol=1e-4, atol=1e-4).item():
            raise RuntimeError(f"self-test failed for {bits}-bit weights")
        if module.INT8_X:  # the VNNI path computes x rounded per 32 values, exactly
            want = module.quantized_matmul(rounded_per_32(x), packed, scales, biases, GROUP, bits)
            got = module.quantized_matmul(x, packed, scales, biases, GROUP, bits, quantize_x=True)
            if not mx.allclose(got, want, rtol=1e-4, atol=1e-4).item():
                raise RuntimeError(f"self-test failed for {bits}-bit weights with int8 activations")


def rounded_per_32(x: mx.array) -> mx.array:
    """x as the int8-activation products see it: rounded to int8 per 32 values, d = max|x| / 127 (GGUF's Q8_0)."""
    chunks = x.reshape(*x.shape[:-1], -1, 32)
    step = mx.abs(chunks).max(axis=-1, keepdims=True) / 127
    return (mx.round(chunks / mx.where(step > 0, step, 1)) * step).reshape(x.shape)


_threads: int | None = None  # set_threads' count, applied when the module loads


def set_threads(count: int | None) -> None:
    """The threads each product may use in this process (None: the share OpenBLAS was given, else every core).
    Processes that share the machine (answering processes, local training ranks) each take their share."""
    global _threads
    _threads = count
    available = load() if load.cache_info().currsize else None
    if available is not None and available.module is not None:
        available.module.set_threads(_own_threads())


def _own_threads() -> int:
    if _threads:
        return _threads
    try:
        return max(0, int(os.environ.get("OPENBLAS_NUM_THREADS", "0")))
    except ValueError:
        return 0


@dataclass(frozen=True)
class Availability:
    module: ModuleType | None
    reason: str  # why not, when module is None


@cache
def load() -> Availability:
    """The kernel module, built on first use; or None with the reason (said once in the log)."""
    reason = _unavailable_here()
    if reason is None:
        try:
            target = _cache_root() / _build_key()
            with exclusive(_cache_root() / f".{target.name}.lock"):
                if not target.is_dir():
                    log.info("building the fast CPU kernels into %s (once, ~15 s)", target)
                    _build(target)
            module = _import(target)
            module.set_threads(_own_threads())
            _self_test(module)
            return Availability(module, "")
        except Exception as exc:  # any failure means: serve float32, and say why
            reason = f"{type(exc).__name__}: {exc}"
    log.warning("fast CPU kernels unavailable (%s): serving float32 weights", reason)
    return Availability(None, reason)


def _unavailable_here() -> str | None:
    if os.environ.get(SWITCH_ENV, "1") == "0":
        return f"{SWITCH_ENV}=0"
    if mx.default_device() != mx.cpu:
        return "MLX runs on a GPU here"
    if platform.machine() not in {"x86_64", "AMD64"}:
        return f"the kernel is written for x86-64, this is {platform.machine()}"
    missing = {"avx2", "fma", "f16c"} - _cpu_flags()
    if missing:
        return f"this CPU lacks {', '.join(sorted(missing))}"
    for tool in ("cmake", "c++"):
        if shutil.which(tool) is None:
            return f"no {tool} on PATH"
    try:
        importlib.metadata.version("nanobind")
    except importlib.metadata.PackageNotFoundError:
        return "nanobind is not installed"
    return None


@dataclass(frozen=True)
class Quantized:
    """A weight as MLX's affine quantization stores it: ``w = scales * q + biases`` per group of 32."""

    packed: mx.array  # uint32 [out, in * bits / 32]
    scales: mx.array  # float16 (as GGUF stores them) or float32 [out, in / 32]
    biases: mx.array
    bits: int
    int8_x: bool = False  # x rounded to int8 per 32 values for the product (see speed_up)

    def times(self, module: ModuleType, x: mx.array, *lora: mx.array) -> mx.array:
        """``x @ w.T`` on the kernel (plus the LoRA deltas when the stacks and slot ids are given), in x's dtype."""
        stacks = lora or (None, None, None, None)
        y = module.quantized_matmul(x, self.packed, self.scales, self.biases, GROUP, self.bits, *stacks, self.int8_x)
        return y.astype(x.dtype)


def exact_quantization(weight: mx.array) -> Quantized | None:
    """``weight`` on a 4-bit (min–max, as GGUF's Q4_1) or 8-bit (symmetric, as Q8_0) grid per group of 32, if
    every value already lies on it; else None (the weight stays float32: no rounding is ever added)."""
    if weight.ndim != 2 or weight.shape[1] % GROUP or weight.dtype != mx.float32:
        return None
    rows, cols = weight.shape
    groups = weight.reshape(rows, cols // GROUP, GROUP)
    low, high = groups.min(axis=-1, keepdims=True), groups.max(axis=-1, keepdims=True)
    candidates = (
        (4, (high - low) / 15, low),  # Q4_1: d = (max - min) / 15, m = min
        (8, mx.maximum(high, -low) / 127, None),  # Q8_0: d = amax / 127, q in [-127, 127]
    )
    for bits, step, offset in candidates:
        safe = mx.where(step > 0, step, 1.0)
        biases = offset if offset is not None else -128 * step
        q = mx.clip(mx.round((groups - biases) / safe), 0, 2**bits - 1)

        def on_grid(step: mx.array, biases: mx.array, q=q, safe=safe) -> bool:
            return mx.all(mx.abs(q * step + biases - groups) <= GRID_TOLERANCE * safe).item()

        if not on_grid(step, biases):
            continue
        # GGUF keeps d and m in float16: where they round-trip, so do we (a sixth fewer bytes read per token).
        half_step, half_biases = step.astype(mx.float16), biases.astype(mx.float16)
        if on_grid(half_step.astype(mx.float32), half_biases.astype(mx.float32)):
            step, biases = half_step, half_biases
        return Quantized(_pack(q.reshape(rows, cols), bits), step.squeeze(-1), biases.squeeze(-1), bits)
    return None


def _pack(q: mx.array, bits: int) -> mx.array:
    """Integers in [0, 2**bits) into uint32 words, element j of a word in bits j*bits.. (mx.quantize's layout)."""
    rows, cols = q.shape
    per_word = 32 // bits
    q = q.astype(mx.uint32).reshape(rows, cols // per_word, per_word)
    shifts = mx.arange(per_word, dtype=mx.uint32) * bits
    return mx.sum(mx.left_shift(q, shifts), axis=-1).astype(mx.uint32)


class FastLinear(nn.Linear):
    """An ``nn.Linear`` whose decode-sized products run the kernel on the exact quantized copy of its weight."""

    def __init__(self, linear: nn.Linear, quantized: Quantized, module: ModuleType):
        nn.Module.__init__(self)
        self.weight = linear.weight
        if "bias" in linear:
            self.bias = linear.bias
        self._quantized = quantized  # not a parameter: the weights' tree and their bytes on disk stay as they were
        self._module = module

    def __call__(self, x: mx.array) -> mx.array:
        if x.size // x.shape[-1] > KERNEL_ROWS:
            return super().__call__(x)
        y = self._quantized.times(self._module, x)
        return y + self.bias if "bias" in self else y

    def with_lora(
        self, x: mx.array, lora_a: mx.array, lora_b: mx.array, scales: mx.array, slot_ids: mx.array
    ) -> mx.array | None:
        """This projection plus each sequence's LoRA delta (``scales[id] * x @ lora_a[id] @ lora_b[id]``, one slot
        id per sequence of ``x``'s first axis) in one kernel call; None for inputs the kernel does not take."""
        if x.size // x.shape[-1] > KERNEL_ROWS or x.ndim < 2 or slot_ids.size != x.shape[0]:
            return None
        y = self._quantized.times(self._module, x, lora_a, lora_b, scales, slot_ids)
        return y + self.bias if "bias" in self else y


class FastEmbedding(nn.Embedding):
    """A tied embedding whose output projection (``as_linear``) runs the kernel for decode-sized inputs."""

    def __init__(self, embedding: nn.Embedding, quantized: Quantized, module: ModuleType):
        nn.Module.__init__(self)
        self.weight = embedding.weight
        self._quantized = quantized
        self._module = module

    def as_linear(self, x: mx.array) -> mx.array:
        if x.size // x.shape[-1] > KERNEL_ROWS:
            return super().as_linear(x)
        return self._quantized.times(self._module, x)


@dataclass(frozen=True)
class SpeedUp:
    """What :func:`speed_up` did to a model: projections moved to the kernel, those left float32, and why not."""

    fast: int
    kept: int
    reason: str = ""
    int8: int = 0  # of the fast ones, those with int8 activations

    def describe(self) -> str:
        if self.reason:
            return f"float32 everywhere ({self.reason})"
        x = f", {self.int8} of them with int8 activations" if self.int8 else ""
        return f"{self.fast} projections on the fast CPU kernel (exact 4/8-bit){x}, {self.kept} kept float32"


_attention = threading.local()  # .module while an engine builds a decode step on the kernel (this thread only)
_mlx_attention = mx.fast.scaled_dot_product_attention


def _scaled_dot_product_attention(q, k, v, *, scale, mask=None, sinks=None, **rest):
    """``mx.fast.scaled_dot_product_attention``, on the kernel for one query token per sequence while this thread
    is inside :func:`decode_attention` (MLX's CPU path for that shape is 4-6 graph nodes and a BLAS call per
    sequence and head: 0.44 ms a layer at 8 sequences, the kernel 0.10-0.15); MLX's own otherwise."""
    module = getattr(_attention, "module", None)
    if module is not None and sinks is None and not rest and _decode_shaped(q, k, v, mask):
        return module.decode_attention(q, k, v, scale, mask)
    return _mlx_attention(q, k, v, scale=scale, mask=mask, sinks=sinks, **rest)


def _decode_shaped(q, k, v, mask) -> bool:
    if q.ndim != 4 or q.shape[2] != 1 or k.ndim != 4 or not q.dtype == k.dtype == v.dtype == mx.float32:
        return False
    if mask is None:
        return True
    return (
        isinstance(mask, mx.array)
        and mask.dtype == mx.bool_
        and mask.ndim == 4
        and mask.shape[1:] == (1, 1, k.shape[2])
        and mask.shape[0] in (1, q.shape[0])
    )


@contextmanager
def decode_attention(speed: SpeedUp) -> Iterator[None]:
    """Attention of the decode step built inside this block runs on the kernel, for a model :func:`speed_up`
    moved to it (so a float32 model's numbers never change). mlx-lm's models call
    ``mx.fast.scaled_dot_product_attention`` by name: it is wrapped once, and the wrapper defers to MLX's own
    outside such a block, in any other thread, and for any other shape."""
    available = load() if speed.fast else None
    if available is None or available.module is None:
        yield
        return
    if mx.fast.scaled_dot_product_attention is not _scaled_dot_product_attention:
        mx.fast.scaled_dot_product_attention = _scaled_dot_product_attention
    _attention.module = available.module
    try:
        yield
    finally:
        _attention.module = None


def speed_up(model: nn.Module, int8_activations: bool = False) -> SpeedUp:
    """Give every linear projection (and a tied embedding's output projection) whose weight is exactly 4- or
    8-bit the kernel, in place. Call before the LoRA wrapping, which wraps whatever projection it finds.

    ``int8_activations``: where the CPU has AVX-512 VNNI, the products also round x to int8 per 32 values, as
    llama.cpp does (its Q8_0 activations): several times fewer instructions per weight, at the cost of answers
    that are no longer bit for bit the float32 model's."""
    available = load()
    if available.module is None:
        return SpeedUp(0, 0, available.reason)
    int8_x = int8_activations and available.module.INT8_X
    if int8_activations and not int8_x:
        log.warning("int8 activations asked for, but this CPU has no AVX-512 VNNI: the kernel keeps float32 x")
    candidates = [
        (name, module, FastLinear)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and not isinstance(module, FastLinear)
    ]
    embedding = getattr(getattr(model, "model", None), "embed_tokens", None)
    if getattr(getattr(model, "args", None), "tie_word_embeddings", False) and type(embedding) is nn.Embedding:
        candidates.append(("model.embed_tokens", embedding, FastEmbedding))
    replacements = []
    for name, module, fast_kind in candidates:
        quantized = exact_quantization(module.weight)
        if quantized is not None:
            quantized = replace(quantized, int8_x=int8_x and module.weight.shape[1] % 64 == 0)
            mx.eval(quantized.packed, quantized.scales, quantized.biases)
            replacements.append((name, fast_kind(module, quantized, available.module)))
    model.update_modules(tree_unflatten(replacements))
    int8 = sum(fast._quantized.int8_x for _, fast in replacements)
    return SpeedUp(len(replacements), len(candidates) - len(replacements), int8=int8)
