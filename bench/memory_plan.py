"""Check the memory planner against measured peaks: estimate vs ``mx.get_peak_memory`` for serving and training.

    python bench/memory_plan.py            # ~3M and ~25M llamas, fp32 and 8-bit, and a tiny Gemma 2
    python bench/memory_plan.py --quick    # the ~3M llama only

Each measurement runs in its own process: the peak counter then covers exactly one load + workload, and
mlx-lm's gradient checkpointing (which patches the layer class) cannot leak into the next case. Run it with
OpenBLAS preloaded on Linux (``LD_PRELOAD=.../libopenblas.so.0``), or it takes ~30× longer.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

MODELS = REPO / ".state" / "bench-models"
SIZES = {
    "tiny-3M": dict(hidden=256, layers=4, heads=4, kv_heads=2, intermediate=688),
    "small-25M": dict(hidden=512, layers=8, heads=8, kv_heads=4, intermediate=1408),
}


def ensure_models(names: list[str], gemma2: bool = False) -> dict[str, Path]:
    """Build (once) the fp32 llamas, an 8-bit copy of each through ``prepare_checkpoint``, and a Gemma 2."""
    from solverx.models.lookalikes import build_gemma2, build_llama, llama_config
    from solverx.models.prepare import prepare_checkpoint

    paths = {}
    for name in names:
        fp32 = MODELS / name
        if not (fp32 / "config.json").exists():
            build_llama(fp32, llama_config(**SIZES[name]))
        q8 = MODELS / f"{name}-8bit"
        if not q8.exists():
            prepare_checkpoint(fp32, q8, q_bits=8, progress=False)
        paths[name], paths[f"{name}-8bit"] = fp32, q8
    if gemma2:
        path = MODELS / "gemma2-tiny"
        if not (path / "config.json").exists():
            build_gemma2(path, hidden=256, layers=4, heads=4, kv_heads=2, vocab=2048)
        paths["gemma2-tiny"] = path
    return paths


def measure(case: dict) -> int:
    """Peak bytes of one serving or training workload, measured in this process from before the load."""
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    import mlx_lm
    from mlx_lm.generate import generate_step
    from mlx_lm.tuner.trainer import default_loss, grad_checkpoint
    from mlx_lm.tuner.utils import linear_to_lora_layers

    mx.random.seed(0)
    mx.reset_peak_memory()
    model, _ = mlx_lm.load(case["model"])
    vocab = model.args.vocab_size
    if case["kind"] == "serve":
        prompt = mx.random.randint(3, vocab, (case["prompt"],))
        for n, _ in enumerate(generate_step(prompt, model, max_tokens=case["new"])):
            if n + 1 >= case["new"]:
                break
        return mx.get_peak_memory()

    model.freeze()
    linear_to_lora_layers(model, case["lora_layers"], {"rank": case["rank"], "scale": 10.0, "dropout": 0.0})
    if case["grad_checkpoint"]:
        grad_checkpoint(model.layers[0])
    optimizer = optim.Adam(learning_rate=1e-4)
    loss_and_grad = nn.value_and_grad(model, default_loss)
    state = [model.state, optimizer.state]
    batch = mx.random.randint(3, vocab, (case["batch"], case["seq"] + 1))
    lengths = mx.array([[0, case["seq"]]] * case["batch"])

    def step(batch: mx.array, lengths: mx.array) -> mx.array:
        (loss, _), grad = loss_and_grad(model, batch, lengths)
        optimizer.update(model, grad)
        return loss

    step = mx.compile(step, inputs=state, outputs=state)  # as mlx_lm.tuner.trainer.train compiles its step
    model.train()
    for _ in range(case.get("steps", 3)):
        mx.eval(state, step(batch, lengths))
    return mx.get_peak_memory()


def measure_in_subprocess(case: dict) -> int:
    out = subprocess.run(
        [sys.executable, __file__, "measure", json.dumps(case)], capture_output=True, text=True, check=True
    )
    return int(out.stdout.strip().splitlines()[-1])


def estimate(case: dict) -> int:
    from solverx.models.memory_plan import TrainPlanArgs, load_model_config, plan, q_bits_of

    config = load_model_config(Path(case["model"]))
    common = dict(q_bits=q_bits_of(config), machine_bytes=64 * 2**30, resident_adapters=0)
    if case["kind"] == "serve":
        p = plan(config, context=case["prompt"] + case["new"], batch=1, **common)
        return p.serve_total - p.adapters
    p = plan(
        config,
        context=case["seq"],
        lora_rank=case["rank"],
        lora_layers=case["lora_layers"],
        train=TrainPlanArgs(batch_size=case["batch"], seq_len=case["seq"]),
        grad_checkpoint=case["grad_checkpoint"],
        **common,
    )
    return p.train_total


def cases(paths: dict[str, Path], *, prompt: int = 512, batch: int = 4, seq: int = 256) -> list[dict]:
    """Serving (one prompt + 64 new tokens) and LoRA training (3 steps, with and without checkpointing)."""
    out = []
    for path in paths.values():
        out.append({"kind": "serve", "model": str(path), "prompt": prompt, "new": 64})
        for ckpt in (False, True):
            train = {"batch": batch, "seq": seq, "rank": 8, "lora_layers": 4, "grad_checkpoint": ckpt}
            out.append({"kind": "train", "model": str(path), **train})
    return out


def describe(case: dict) -> str:
    name = Path(case["model"]).name
    if case["kind"] == "serve":
        return f"{name:16s} serve  prompt {case['prompt']} + {case['new']} new"
    ckpt = " ckpt" if case["grad_checkpoint"] else ""
    return f"{name:16s} train  {case['batch']}×{case['seq']} r{case['rank']} L{case['lora_layers']}{ckpt}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="only the ~3M model")
    sub = parser.add_subparsers(dest="cmd")
    one = sub.add_parser("measure")
    one.add_argument("case")
    args = parser.parse_args()
    if args.cmd == "measure":
        print(measure(json.loads(args.case)))
        return
    paths = ensure_models(["tiny-3M"] if args.quick else list(SIZES), gemma2=not args.quick)
    print(f"{'case':52s} {'estimate':>10s} {'measured':>10s} {'ratio':>6s}")
    for case in cases(paths):
        est, got = estimate(case), measure_in_subprocess(case)
        print(f"{describe(case):52s} {est / 2**20:8.1f}MB {got / 2**20:8.1f}MB {est / got:6.3f}", flush=True)


if __name__ == "__main__":
    main()
