"""Training benchmark, side by side in one run on the tiny base and the SolverX sample knowledge:

- our training stage (``solverx.trainer.train.train_stage`` with the replay-mixing batch iterator) vs mlx-lm's own
  LoRA path (``mlx_lm.tuner.datasets`` + ``iterate_batches`` + ``train``, what ``mlx_lm.lora`` runs) on the
  same text, model and settings: tokens/s ratio, goal >= 0.95;
- on Linux, our stage with OpenBLAS preloaded vs without (MLX's bundled reference BLAS): goal >= 10x.

Each measurement runs in its own process (the preload must be set at process start); each worker times only its
training loop and prints one JSON line. Run with ``.venv/bin/python bench/train.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from solverx.blas import DISABLE_ENV, ensure_openblas, preload_env  # noqa: E402

KNOWLEDGE = REPO / "data" / "solverx" / "inbox"
RANK, SCALE, LR, BATCH, MAX_LEN = 8, 20.0, 1e-4, 4, 256


def _texts() -> list[str]:
    return [p.read_text(encoding="utf-8") for p in sorted(KNOWLEDGE.glob("*.md"))]


def _chunks(tokenizer) -> list[list[int]]:
    from solverx.trainer.datasets import chunk_text

    return [chunk for text in _texts() for chunk in chunk_text(text, tokenizer, MAX_LEN)]


def _token_counter():
    """A TrainingCallback that keeps mlx-lm's own count of trained tokens (in ``.trained``)."""
    from mlx_lm.tuner.callbacks import TrainingCallback

    class Count(TrainingCallback):
        trained = 0

        def on_train_loss_report(self, info: dict) -> None:
            self.trained = int(info["trained_tokens"])

    return Count()


def worker_ours(model_dir: Path, iters: int) -> dict:
    from mlx_lm import load

    from solverx.trainer.datasets import MixedDataset, Sample, SequenceDataset, mixed_batches
    from solverx.trainer.recipe import LoraSettings
    from solverx.trainer.train import StageSettings, train_stage

    model, tokenizer = load(str(model_dir))
    samples = [Sample(tokens, 0, "bench", "cpt") for tokens in _chunks(tokenizer)]
    train_set = MixedDataset(SequenceDataset(samples), SequenceDataset(), 0.0, 0)
    settings = StageSettings(
        iters=iters, batch_size=BATCH, learning_rate=LR, max_seq_length=MAX_LEN, steps_per_report=iters
    )
    with tempfile.TemporaryDirectory() as out:
        lora = LoraSettings(rank=RANK, scale=SCALE)
        result = train_stage(model, "cpt", Path(out), train_set, None, lora, settings, batches=mixed_batches)
    return {"tokens": result.trained_tokens, "seconds": result.seconds}


def worker_mlx_lm(model_dir: Path, iters: int) -> dict:
    """What ``mlx_lm.lora --train`` does after loading: its datasets, its batches, its trainer."""
    import mlx.optimizers as optim
    from mlx_lm import load
    from mlx_lm.tuner.datasets import CacheDataset, TextDataset
    from mlx_lm.tuner.trainer import TrainingArgs, train
    from mlx_lm.tuner.utils import linear_to_lora_layers

    from solverx.engine.lora import DEFAULT_KEYS

    model, tokenizer = load(str(model_dir))
    texts = [{"text": tokenizer.decode(chunk)} for chunk in _chunks(tokenizer)]
    dataset = CacheDataset(TextDataset(texts, tokenizer))
    model.freeze()
    linear_to_lora_layers(
        model, len(model.layers), {"rank": RANK, "scale": SCALE, "dropout": 0.0, "keys": list(DEFAULT_KEYS)}
    )
    counter = _token_counter()
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArgs(
            batch_size=BATCH, iters=iters, steps_per_report=iters, steps_per_eval=iters + 1,
            steps_per_save=iters + 1, max_seq_length=MAX_LEN, adapter_file=str(Path(out) / "adapters.safetensors"),
        )  # fmt: skip
        start = time.perf_counter()
        train(model, optim.Adam(learning_rate=LR), dataset, None, args=args, training_callback=counter)
        seconds = time.perf_counter() - start
    return {"tokens": counter.trained, "seconds": seconds}


def _run_worker(kind: str, model_dir: Path, iters: int, openblas: bool) -> dict:
    env = preload_env() if openblas else {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    if not openblas:
        env[DISABLE_ENV] = "1"
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    command = [sys.executable, __file__, "--worker", kind, "--model", str(model_dir), "--iters", str(iters)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=REPO)
    if done.returncode != 0:
        raise SystemExit(f"{kind} worker failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["tok_s"] = result["tokens"] / result["seconds"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=60)
    parser.add_argument("--slow-iters", type=int, default=30, help="iterations for the run without OpenBLAS")
    parser.add_argument("--worker", choices=["ours", "mlx_lm"], help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        work = worker_ours if args.worker == "ours" else worker_mlx_lm
        print(json.dumps(work(Path(args.model), args.iters)))
        return

    from solverx.models.tiny import ensure_tiny

    model_dir = ensure_tiny(REPO / ".state" / "bench" / "models")
    ours = _run_worker("ours", model_dir, args.iters, openblas=True)
    theirs = _run_worker("mlx_lm", model_dir, args.iters, openblas=True)
    print(f"model: {model_dir.name}, LoRA rank {RANK} on every projection, batch {BATCH}, {args.iters} iterations")
    print(f"ours (train_stage + replay batches)   {ours['tok_s']:8.0f} tok/s")
    print(f"mlx-lm (datasets + iterate_batches)   {theirs['tok_s']:8.0f} tok/s")
    print(f"ratio ours / mlx-lm                   {ours['tok_s'] / theirs['tok_s']:8.2f}  (goal >= 0.95)")
    if sys.platform == "linux":
        slow = _run_worker("ours", model_dir, args.slow_iters, openblas=False)
        fast = _run_worker("ours", model_dir, args.slow_iters, openblas=True)
        print(f"ours with OpenBLAS ({args.slow_iters} iterations)       {fast['tok_s']:8.0f} tok/s")
        print(f"ours without (reference BLAS)         {slow['tok_s']:8.0f} tok/s")
        print(f"ratio with / without                  {fast['tok_s'] / slow['tok_s']:8.1f}x (goal >= 10x)")


if __name__ == "__main__":
    if "--worker" not in sys.argv:
        ensure_openblas()
    main()
