"""How much memory serving and LoRA training will take, and whether they fit together: ``solverx plan``.

The scheduler needs to know before it starts a training run whether serving can keep going next to it
("concurrent") or must pause ("exclusive"), and the user needs to know before a 30-minute download whether a
model fits at all. Everything here is arithmetic on the model's config — no model is loaded, no MLX is imported —
with the terms checked against measured peaks (``bench/memory_plan.py``):

- weights: parameters × bytes; quantized matrices cost ``bits/8`` per weight plus a scale and a bias (in the
  16/32-bit compute dtype) per group, as mlx-lm's affine quantization stores them;
- KV cache: 2 × layers × kv_heads × head_dim × context × batch × bytes, with context rounded up to mlx-lm's
  256-token allocation step;
- serving workspace: one block's activations for a prefill chunk (mlx-lm prefills 2048 tokens at a time),
  without the attention scores where Metal's fused attention kernel runs;
- resident adapters: LoRA A/B matrices in fp32;
- training: a second copy of the base (training runs in a child process), LoRA parameters, their gradients and
  two Adam moments (fp32, adapter parameters only), and activations — every tensor a LoRA layer keeps for the
  backward pass, or with gradient checkpointing only each layer's input plus one layer recomputed — and the
  logits with their cross-entropy gradient; with blocks below the LoRA, the hidden states kept after them
  (``trainer/prefix.py``: at most :data:`KEPT_STATES_BYTES`).
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

GiB = 1024**3
# The most a training run keeps of its rows' hidden states below the first LoRA block (trainer/prefix.py); rows past
# it are computed again at each step. SmolLM2 on data/solverx needs ~0.1 GiB of it.
KEPT_STATES_BYTES = GiB // 2
KV_STEP = 256  # mlx-lm's KVCache grows in steps of 256 tokens
PREFILL_STEP = 2048  # mlx-lm's default prefill_step_size
DEFAULT_OS_RESERVE = 0.25  # left to macOS and other apps; Metal's default working-set limit is about 75 % of RAM
LORA_KEYS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
_TIED_FAMILIES = frozenset({"gemma", "gemma2", "gemma3_text"})
# Gemma also scales its embedding inside the decoder, so training keeps no states below the LoRA (trainer/prefix.py)
_SCALED_EMBEDDINGS = _TIED_FAMILIES
_EXTRA_NORMS = {"gemma2": 2, "gemma3_text": 2}  # pre/post feed-forward norms
# Activation coefficients, measured against mx.get_peak_memory (bench/memory_plan.py, mlx 0.32 CPU, fp32).
# Least-squares fit over 25 runs (3M and 25M llamas, fp32 and 8-bit, 1–8 LoRA layers, vocab 512–8192): all
# within ±6.5 %.
TRANSIENT_BLOCKS = 1.5  # cotangents of the block being differentiated, in blocks' worth of saved tensors
QUANTIZED_TRANSIENT_BLOCKS = 1.75  # the same over a quantized base (measured; the compiled step keeps more)
RECOMPUTE_BLOCKS = 2.4  # with checkpointing: the block recomputed for its backward, plus its cotangents
LOGIT_COPIES = 3.5  # logits, softmax and the logits' gradient, in copies of batch × seq × vocab
# Families whose blocks keep more (fit on tiny models of that family): Gemma 2's tanh-approximated GELU keeps
# ~7 MLP-sized tensors instead of 4, its soft-capped attention two copies of the scores, and its soft-capped
# logits ~8.5 copies at the head, whose backward then dominates the peak over the block's cotangents.
_FAMILY_ACTIVATIONS: dict[str, dict[str, float]] = {
    "gemma2": {
        "extra_intermediate": 3.4,
        "score_copies": 2,
        "logit_copies": 8.5,
        "transient_blocks": 0.0,
        "recompute_blocks": 0.9,
    },
}

Recommendation = Literal["concurrent", "exclusive", "serve-only", "does-not-fit"]


def text_config(config: dict) -> dict:
    """The language model's config, also for a VLM that nests it (``text_config`` / ``language_config``)."""
    return config.get("text_config") or config.get("language_config") or config


def load_model_config(path: Path) -> dict:
    """A config from a model directory or a ``config.json`` path."""
    path = Path(path)
    return json.loads((path / "config.json" if path.is_dir() else path).read_text())


def q_bits_of(config: dict) -> int | None:
    """The bits a prepared model was quantized to, or None for unquantized weights."""
    quantization = config.get("quantization") or {}
    return quantization.get("bits")


@dataclass(frozen=True)
class ModelShape:
    """The dimensions that decide memory, read from an HF/mlx-lm config."""

    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    tied_embeddings: bool
    norms_per_layer: int
    dtype_bytes: int

    @classmethod
    def from_config(cls, config: dict) -> ModelShape:
        text = text_config(config)
        model_type = text.get("model_type", "")
        heads = text["num_attention_heads"]
        dtype = text.get("torch_dtype") or text.get("dtype") or config.get("torch_dtype") or "bfloat16"
        tied = text.get("tie_word_embeddings", model_type in _TIED_FAMILIES or model_type == "llama")
        post_norms = 2 if text.get("use_post_norm", model_type == "hyperclovax") else 0
        return cls(
            model_type=model_type,
            vocab_size=text["vocab_size"],
            hidden_size=text["hidden_size"],
            num_layers=text["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=text.get("num_key_value_heads") or heads,
            head_dim=text.get("head_dim") or text["hidden_size"] // heads,
            intermediate_size=text["intermediate_size"],
            tied_embeddings=bool(tied) or model_type in _TIED_FAMILIES,
            norms_per_layer=2 + post_norms + _EXTRA_NORMS.get(model_type, 0),
            dtype_bytes=_DTYPE_BYTES.get(dtype, 2),
        )

    def layer_linears(self) -> dict[str, tuple[int, int]]:
        """Each projection of one block as ``(in_features, out_features)``."""
        h, i = self.hidden_size, self.intermediate_size
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return {
            "q_proj": (h, q),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (q, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    def matrices(self) -> list[tuple[int, int]]:
        """Every weight matrix (quantizable) as ``(rows, cols)``: embeddings, head, all projections."""
        embed = [(self.vocab_size, self.hidden_size)] * (1 if self.tied_embeddings else 2)
        per_layer = [(o, i) for i, o in self.layer_linears().values()]
        return embed + per_layer * self.num_layers

    @property
    def num_parameters(self) -> int:
        norms = self.hidden_size * (self.norms_per_layer * self.num_layers + 1)
        return sum(r * c for r, c in self.matrices()) + norms


@dataclass(frozen=True)
class TrainPlanArgs:
    """The training run to plan for (mlx-lm's ``TrainingArgs`` that matter for memory)."""

    batch_size: int = 4
    seq_len: int = 2048
    optimizer_moments: int = 2  # Adam/AdamW keep m and v; SGD with momentum 1; plain SGD 0


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes per component, totals, and the verdicts the scheduler acts on."""

    model_type: str
    num_parameters: int
    q_bits: int | None
    context: int
    batch: int
    weights: int
    kv_cache: int
    serve_workspace: int
    adapters: int
    serve_total: int
    train: TrainPlanArgs | None
    grad_checkpoint: bool
    lora_parameters: int
    lora_state: int  # parameters + gradients + optimizer moments
    activations: int
    train_total: int
    machine_bytes: int
    os_reserve: float
    shared_weights: bool = False
    notes: list[str] = field(default_factory=list)
    kept_states: int = 0  # hidden states kept below the first LoRA block (part of train_total)

    @property
    def budget(self) -> int:
        """What serving and training may use: RAM minus the share left to the OS."""
        return int(self.machine_bytes * (1 - self.os_reserve))

    @property
    def both_total(self) -> int:
        """Serving and training at once; a training child process holds its own copy of the base."""
        return self.serve_total + self.train_total - (self.weights if self.shared_weights else 0)

    @property
    def serve_fits(self) -> bool:
        return self.serve_total <= self.budget

    @property
    def train_fits(self) -> bool:
        return self.train is not None and self.train_total <= self.budget

    @property
    def both_fit(self) -> bool:
        return self.train is not None and self.both_total <= self.budget

    @property
    def recommendation(self) -> Recommendation:
        """``concurrent``: train next to serving; ``exclusive``: serving must release the model while
        training runs; ``serve-only``: training does not fit even alone; ``does-not-fit``: serving alone
        does not fit."""
        if not self.serve_fits:
            return "does-not-fit"
        if self.train is None or not self.train_fits:
            return "serve-only" if self.train is not None else "concurrent"
        return "concurrent" if self.both_fit else "exclusive"


def weight_bytes(shape: ModelShape, q_bits: int | None, group_size: int = 64) -> int:
    """Resident weights: quantized matrices at ``q_bits`` plus per-group scale and bias, the rest unquantized."""
    norms = shape.hidden_size * (shape.norms_per_layer * shape.num_layers + 1) * shape.dtype_bytes
    total = norms
    for rows, cols in shape.matrices():
        if q_bits is None or cols % group_size:
            total += rows * cols * shape.dtype_bytes
        else:
            total += rows * cols * q_bits // 8 + 2 * rows * (cols // group_size) * shape.dtype_bytes
    return total


def kv_cache_bytes(shape: ModelShape, context: int, batch: int) -> int:
    """Keys and values for ``context`` tokens of ``batch`` sequences, in mlx-lm's 256-token allocation steps."""
    tokens = math.ceil(context / KV_STEP) * KV_STEP
    return 2 * shape.num_layers * shape.num_kv_heads * shape.head_dim * tokens * batch * shape.dtype_bytes


def lora_parameter_count(shape: ModelShape, rank: int, layers: int, keys: tuple[str, ...] = LORA_KEYS) -> int:
    """Parameters of one adapter: ``rank × (in + out)`` per adapted projection in the last ``layers`` blocks."""
    linears = shape.layer_linears()
    per_layer = sum(rank * (linears[k][0] + linears[k][1]) for k in keys if k in linears)
    return per_layer * min(layers, shape.num_layers)


def _block_saved(shape: ModelShape, tokens: int, kv_tokens: int, batch: int) -> int:
    """Elements one block keeps for its backward pass over ``batch × tokens`` (measured on mlx 0.32: seven
    hidden-sized tensors, q/k/v, four MLP-sized tensors, and the attention probabilities)."""
    h, i = shape.hidden_size, shape.intermediate_size
    q, kv = shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim
    family = _FAMILY_ACTIVATIONS.get(shape.model_type, {})
    per_token = 7 * h + (q + 2 * kv) + (4 + family.get("extra_intermediate", 0)) * i
    scores = family.get("score_copies", 1) * shape.num_heads * tokens * kv_tokens
    return batch * (tokens * per_token + scores)


def serve_workspace_bytes(shape: ModelShape, context: int, batch: int, fused_attention: bool = False) -> int:
    """Transient memory of a prefill chunk: the larger of one block's attention step (q/k/v before and after
    RoPE, scores and probabilities over the context so far) and its MLP step, plus the last token's logits.

    With ``fused_attention`` (Metal's fused SDPA kernel) the scores are never materialized — except for
    families that compute attention by hand (Gemma 2's soft-capping)."""
    chunk = min(context, PREFILL_STEP)
    h, i = shape.hidden_size, shape.intermediate_size
    qkv = (shape.num_heads + 2 * shape.num_kv_heads) * shape.head_dim
    hand_written = "score_copies" in _FAMILY_ACTIVATIONS.get(shape.model_type, {})
    copies = 0 if fused_attention and not hand_written else 2  # scores and probabilities (measured)
    attention = chunk * (2 * qkv + 2 * h) + copies * shape.num_heads * chunk * context
    mlp = chunk * (3 * i + 3 * h)
    return batch * (max(attention, mlp) * shape.dtype_bytes + shape.vocab_size * 4)


def activation_bytes(
    shape: ModelShape, train: TrainPlanArgs, lora_layers: int, grad_checkpoint: bool, quantized: bool = False
) -> int:
    """What a training step holds at its peak.

    Without checkpointing every LoRA block keeps its saved tensors, plus the cotangents of the block being
    differentiated; with checkpointing each LoRA block keeps only its input, plus one block recomputed and
    its cotangents. Blocks below the first LoRA layer have nothing to differentiate and keep nothing. The
    head adds the logits, their softmax and gradient (3.5 × batch × seq × vocab for llama-like models).
    """
    b, s = train.batch_size, train.seq_len
    family = _FAMILY_ACTIVATIONS.get(shape.model_type, {})
    layers = min(lora_layers, shape.num_layers)
    block = _block_saved(shape, s, s, b)
    if grad_checkpoint:
        blocks = layers * b * s * shape.hidden_size + family.get("recompute_blocks", RECOMPUTE_BLOCKS) * block
    else:
        transient = family.get("transient_blocks", TRANSIENT_BLOCKS)
        if quantized:
            transient += QUANTIZED_TRANSIENT_BLOCKS - TRANSIENT_BLOCKS
        blocks = (layers + transient) * block
    logits = family.get("logit_copies", LOGIT_COPIES) * b * s * shape.vocab_size
    return int((blocks + logits) * shape.dtype_bytes)


def plan(
    config: dict,
    *,
    q_bits: int | None,
    context: int,
    batch: int = 1,
    resident_adapters: int = 1,
    lora_rank: int = 8,
    lora_layers: int = 16,
    train: TrainPlanArgs | None = None,
    grad_checkpoint: bool = False,
    machine_bytes: int,
    os_reserve: float = DEFAULT_OS_RESERVE,
    group_size: int = 64,
    shared_weights: bool = False,
    fused_attention: bool | None = None,
) -> MemoryPlan:
    """Estimate serving and LoRA-training memory for a model described by ``config`` on a machine of
    ``machine_bytes``.

    ``context`` and ``batch`` are the serving side's longest context and concurrent sequences;
    ``resident_adapters`` how many adapters it keeps in memory. ``shared_weights`` says training reuses the
    server's base weights (in-process) instead of loading its own copy in a child process (the default).
    ``fused_attention`` defaults to True on macOS (Metal's fused attention kernel), False elsewhere.
    """
    if fused_attention is None:
        fused_attention = sys.platform == "darwin"
    shape = ModelShape.from_config(config)
    weights = weight_bytes(shape, q_bits, group_size)
    kv = kv_cache_bytes(shape, context, batch)
    workspace = serve_workspace_bytes(shape, context, batch, fused_attention)
    adapter_params = lora_parameter_count(shape, lora_rank, lora_layers)
    adapters = resident_adapters * adapter_params * 4
    serve_total = weights + kv + workspace + adapters

    notes: list[str] = []
    lora_state = activations = train_total = kept_states = 0
    if train is not None:
        lora_state = adapter_params * 4 * (2 + train.optimizer_moments)
        activations = activation_bytes(shape, train, lora_layers, grad_checkpoint, q_bits is not None)
        below = lora_layers < shape.num_layers and shape.model_type not in _SCALED_EMBEDDINGS
        kept_states = KEPT_STATES_BYTES if below else 0
        train_total = weights + lora_state + activations + kept_states
        if not grad_checkpoint:
            saved = activations - activation_bytes(shape, train, lora_layers, True, q_bits is not None)
            if saved > 0.2 * train_total:
                notes.append(f"gradient checkpointing would save {saved / GiB:.1f} GiB of activations")
    if shape.model_type == "gemma2" and context > 4096:
        notes.append("mlx-lm's gemma2 has no sliding-window attention: keep the context at 4096 or below")
    return MemoryPlan(
        model_type=shape.model_type,
        num_parameters=shape.num_parameters,
        q_bits=q_bits,
        context=context,
        batch=batch,
        weights=weights,
        kv_cache=kv,
        serve_workspace=workspace,
        adapters=adapters,
        serve_total=serve_total,
        train=train,
        grad_checkpoint=grad_checkpoint,
        lora_parameters=adapter_params,
        lora_state=lora_state,
        activations=activations,
        train_total=train_total,
        machine_bytes=machine_bytes,
        os_reserve=os_reserve,
        shared_weights=shared_weights,
        notes=notes,
        kept_states=kept_states,
    )


def _gib(n: int) -> str:
    return f"{n / GiB:7.2f} GiB"


def format_plan(p: MemoryPlan) -> str:
    """A human-readable table for ``solverx plan``."""
    bits = f"{p.q_bits}-bit" if p.q_bits else "unquantized"
    lines = [
        f"{p.model_type}, {p.num_parameters / 1e9:.2f}B parameters, {bits}",
        f"serving (context {p.context}, batch {p.batch}):",
        f"  weights            {_gib(p.weights)}",
        f"  KV cache           {_gib(p.kv_cache)}",
        f"  prefill workspace  {_gib(p.serve_workspace)}",
        f"  resident adapters  {_gib(p.adapters)}",
        f"  total              {_gib(p.serve_total)}",
    ]
    if p.train is not None:
        ckpt = "on" if p.grad_checkpoint else "off"
        lines += [
            f"LoRA training (batch {p.train.batch_size} × {p.train.seq_len} tokens, "
            f"{p.lora_parameters / 1e6:.1f}M adapter parameters, grad checkpointing {ckpt}):",
            f"  base weights       {_gib(p.weights)}",
            f"  adapter + Adam     {_gib(p.lora_state)}",
            f"  activations        {_gib(p.activations)}",
            *(
                [f"  kept states        {_gib(p.kept_states)}  (below the first LoRA block, at most)"]
                if p.kept_states
                else []
            ),
            f"  total              {_gib(p.train_total)}",
            f"serving + training   {_gib(p.both_total)}",
        ]
    reserve = f"{p.os_reserve:.0%} of {p.machine_bytes / GiB:.0f} GiB left to the OS"
    verdict = lambda ok: "fits" if ok else "does NOT fit"  # noqa: E731
    lines += [
        f"budget               {_gib(p.budget)}  ({reserve})",
        f"serve: {verdict(p.serve_fits)}"
        + (f"; train: {verdict(p.train_fits)}; both at once: {verdict(p.both_fit)}" if p.train else ""),
        f"recommendation: {p.recommendation}",
    ]
    lines += [f"note: {n}" for n in p.notes]
    return "\n".join(lines)
