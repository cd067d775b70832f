"""One LoRA training stage (CPT or SFT) on a base model, through mlx-lm's own trainer.

The stage converts the base's projections to LoRA layers, optionally resumes from an earlier stage's adapter
weights (SFT resumed from CPT: the seed's "incremental learning"), trains with ``mlx_lm.tuner.trainer.train``
and writes an adapter directory that ``mlx_lm.load(..., adapter_path=)`` and our registry both accept. mlx-lm
does not write ``adapter_config.json`` when ``train()`` is called directly (its own ``lora`` command writes it), so
we do.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.optimizers as optim
from mlx.utils import tree_flatten
from mlx_lm.tuner.callbacks import TrainingCallback
from mlx_lm.tuner.trainer import TrainingArgs, iterate_batches
from mlx_lm.tuner.trainer import train as mlx_train
from mlx_lm.tuner.utils import linear_to_lora_layers

from solverx.adapters.validate import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from solverx.trainer.loss import loss_for
from solverx.trainer.recipe import LoraSettings


@dataclass(frozen=True)
class StageSettings:
    iters: int = 100
    batch_size: int = 4
    learning_rate: float = 1e-3
    lr_schedule: str = "constant"  # or "cosine": a linear warm-up over WARMUP_SHARE of the steps, then cosine to 0
    max_seq_length: int = 512
    steps_per_report: int = 10
    seed: int = 0


@dataclass(frozen=True)
class Progress:
    """One training report: what the run log, the CLI's progress bar and the API show."""

    stage: str
    step: int
    total: int
    loss: float
    tokens_per_second: float
    eta_seconds: float


@dataclass
class StageResult:
    stage: str
    adapter_dir: Path
    steps: int
    losses: list[tuple[int, float]] = field(default_factory=list)
    val_losses: list[tuple[int, float]] = field(default_factory=list)
    trained_tokens: int = 0
    tokens_per_second: float = 0.0
    seconds: float = 0.0

    @property
    def final_loss(self) -> float:
        return self.losses[-1][1] if self.losses else math.nan


class _Reporter(TrainingCallback):
    def __init__(
        self,
        stage: str,
        total: int,
        result: StageResult,
        on_progress: Callable[[Progress], None] | None,
        on_warning: Callable[[str], None] | None = None,
        vocab_size: int = 0,
        on_validation: Callable[[int, float], None] | None = None,
    ):
        self.stage, self.total, self.result, self.on_progress = stage, total, result, on_progress
        self.on_warning, self.vocab_size, self.on_validation = on_warning, vocab_size, on_validation
        self.started = time.perf_counter()

    def on_train_loss_report(self, info: dict) -> None:
        step, loss = int(info["iteration"]), float(info["train_loss"])
        self.result.losses.append((step, loss))
        self.result.trained_tokens = int(info["trained_tokens"])
        elapsed = time.perf_counter() - self.started
        eta = elapsed / step * (self.total - step) if step else 0.0
        if self.on_progress:
            self.on_progress(Progress(self.stage, step, self.total, loss, float(info["tokens_per_second"]), eta))

    def on_val_loss_report(self, info: dict) -> None:
        self.result.val_losses.append((int(info["iteration"]), float(info["val_loss"])))
        if self.on_validation:
            self.on_validation(*self.result.val_losses[-1])
        # mlx-lm measures the first validation loss before the first step: warn while the user can still act
        first = len(self.result.val_losses) == 1
        if first and self.on_warning and (warning := unfamiliar_replay(self.result, self.vocab_size)):
            self.on_warning(warning)


def write_adapter_config(adapter_dir: Path, lora: LoraSettings, num_layers: int, extra: dict | None = None) -> None:
    """The ``adapter_config.json`` mlx-lm's loader and fuser expect."""
    config = {
        "fine_tune_type": "lora",
        "num_layers": num_layers,
        "lora_parameters": lora.as_mlx_config(),
        **(extra or {}),
    }
    (adapter_dir / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))


def train_stage(
    model,
    stage: str,
    out_dir: Path,
    train_set: Iterable,
    valid_set: Iterable | None,
    lora: LoraSettings,
    settings: StageSettings,
    *,
    resume_from: Path | None = None,
    batches: Callable = iterate_batches,
    on_progress: Callable[[Progress], None] | None = None,
    on_warning: Callable[[str], None] | None = None,
    on_validation: Callable[[int, float], None] | None = None,
) -> StageResult:
    """Train one stage on ``model`` (a freshly loaded base) and write its adapter to ``out_dir``.

    ``batches`` follows mlx-lm's ``iterate_batches`` contract; pass a mixing iterator for replay data.
    ``on_warning`` hears, before the first step, when the model cannot predict ``valid_set`` (see
    :func:`unfamiliar_replay`); ``on_validation`` hears each ``(step, loss)`` on ``valid_set`` (rising: forgetting).
    """
    mx.random.seed(settings.seed)
    num_layers = len(model.layers) if lora.num_layers < 0 else lora.num_layers
    model.freeze()
    linear_to_lora_layers(model, num_layers, lora.as_mlx_config())
    if resume_from is not None:
        model.load_weights(str(Path(resume_from) / ADAPTER_WEIGHTS), strict=False)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = StageResult(stage=stage, adapter_dir=out_dir, steps=settings.iters)
    args = TrainingArgs(
        batch_size=settings.batch_size,
        iters=settings.iters,
        val_batches=2,
        steps_per_report=max(1, min(settings.steps_per_report, settings.iters)),
        steps_per_eval=max(settings.iters, 1),
        steps_per_save=settings.iters + 1,
        max_seq_length=settings.max_seq_length,
        adapter_file=str(out_dir / ADAPTER_WEIGHTS),
    )
    vocab_size = getattr(getattr(model, "args", None), "vocab_size", 0)
    loss, batches = loss_for(model, batches)
    started = time.perf_counter()
    mlx_train(
        model,
        optim.Adam(learning_rate=learning_rate_schedule(settings)),
        train_set,
        valid_set if valid_set else None,
        args=args,
        loss=loss,
        iterate_batches=batches,
        training_callback=_Reporter(stage, settings.iters, result, on_progress, on_warning, vocab_size, on_validation),
    )
    result.seconds = time.perf_counter() - started
    result.tokens_per_second = result.trained_tokens / result.seconds if result.seconds else 0.0
    write_adapter_config(out_dir, lora, num_layers, {"stage": stage, "training": asdict(settings)})
    return result


WARMUP_SHARE = 0.05


def learning_rate_schedule(settings: StageSettings) -> float | Callable[[mx.array], mx.array]:
    """The stage's learning rate: constant, or warmed up linearly and then decayed along a cosine to 0."""
    if settings.lr_schedule == "constant" or settings.iters < 2:
        return settings.learning_rate
    warmup = max(1, round(WARMUP_SHARE * settings.iters))
    return optim.join_schedules(
        [
            optim.linear_schedule(settings.learning_rate / warmup, settings.learning_rate, warmup),
            optim.cosine_decay(settings.learning_rate, settings.iters - warmup),
        ],
        [warmup],
    )


def unfamiliar_replay(result: StageResult, vocab_size: int) -> str | None:
    """A warning when the model met the held-out replay data no better than chance before the stage's first step.

    Mixing rehearses what a model knows only if it knows the mixed-in data: replay it cannot predict is new text to
    learn, and it protects nothing (measured on the demo's chat base, which predicts ``data/general`` at ~9
    nats/token, worse than chance: with it mixed in, the general answers were lost all the same).
    """
    if not result.val_losses or vocab_size < 2:
        return None
    first, chance = result.val_losses[0][1], math.log(vocab_size)
    if not first >= chance:
        return None
    return (
        f"{result.stage}: at the first step the model predicts the held-out general replay data no better than "
        f"chance ({first:.2f} vs {chance:.2f} nats/token): mixing it in teaches new text instead of rehearsing "
        "what the model knows; use general data the base model was trained on"
    )


def trainable_tensors(model) -> dict[str, mx.array]:
    return dict(tree_flatten(model.trainable_parameters()))
