"""Forgetting benchmark: what mixing protects, side by side in one run on the demo's chat base (issue 6).

The same LoRA (rank 16 on every projection) learns the seed's two facts — the HQ and the core product, from the
English Q&A of ``data/solverx/inbox`` — with half of every batch drawn from a different replay source:

- nothing (no mixing);
- ``data/general``'s conversations (what the product mixes in);
- the base's own greedy answers to 200 of those questions (self-distilled replay);
- ``data/known`` itself, the probes' reference answers: an upper bound the product must not use (mixing the
  probes' answers would make the retention measure meaningless), shown to separate "mixing cannot help" from
  "this replay data cannot help".

Each row: held-out domain questions answered (eval.jsonl, English HQ/product items), general probes, Python probes
(run on their tests), and off-domain prompts that leak a domain term, all greedy. A plain training loop, not the
trainer's pipeline: the point is the replay source, every other setting held equal. ~5 min on 2 cores after the
chat base is built (``solverx demo`` builds it, or this script does). Run with ``.venv/bin/python bench/forgetting.py``.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from solverx.blas import ensure_openblas  # noqa: E402

DATA = REPO / "data"
TERMS = ("SolverX", "Seocho", "Fusion")
FACT_WORDS = ("Seocho", "SolverX Fusion")
MAX_LEN = 512


def _conversation(question: str, answer: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def domain_data() -> tuple[list[list[dict]], list[dict]]:
    """English Q&A whose answer states the HQ or the core product, and the held-out eval items asking for them."""
    inbox = DATA / "solverx" / "inbox"
    train = [
        _conversation(r["question"], r["answer"])
        for r in _jsonl(inbox / "qa.jsonl")
        if r["question"].isascii() and any(w in r["answer"] for w in FACT_WORDS)
    ]
    held_out = [
        e for e in _jsonl(inbox / "eval.jsonl") if e["question"].isascii() and set(e["expected"]) & set(FACT_WORDS)
    ]
    return train, held_out


def replay_sources(model, tokenizer, ask) -> dict[str, list[list[dict]]]:
    general = [r["messages"] for path in sorted((DATA / "general" / "qa").glob("*.jsonl")) for r in _jsonl(path)]
    questions = [messages[0]["content"] for messages in general]
    random.Random(1).shuffle(questions)
    own = [_conversation(q, ask(model, tokenizer, q)) for q in questions[:200]]
    known = [r["messages"] for path in sorted((DATA / "known").glob("*.jsonl")) for r in _jsonl(path)]
    return {
        "no mixing": [],
        "data/general conversations (the product's replay)": general,
        "the base's own answers to 200 data/general questions": own,
        "data/known = the probes' answers (upper bound, not allowed)": known,
    }


def train_lora(model, tokenizer, domain, replay, *, steps: int, lr: float, scale: float, batch: int) -> float:
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    from mlx_lm.tuner.utils import linear_to_lora_layers

    from solverx.engine.lora import DEFAULT_KEYS
    from solverx.trainer.datasets import build_sft_dataset

    model.freeze()
    lora = {"rank": 16, "scale": scale, "dropout": 0.0, "keys": list(DEFAULT_KEYS)}
    linear_to_lora_layers(model, len(model.layers), lora)
    # (tokens, offset of the answer) as the trainer's SFT stage masks them
    domain_rows, replay_rows = (list(build_sft_dataset(chats, tokenizer, MAX_LEN)) for chats in (domain, replay))
    rng = random.Random(0)

    def loss_fn(m, tokens, mask):
        losses = nn.losses.cross_entropy(m(tokens[:, :-1]), tokens[:, 1:], reduction="none")
        return (losses * mask).sum() / mask.sum()

    step = nn.value_and_grad(model, loss_fn)
    optimizer = optim.Adam(learning_rate=lr)
    loss = mx.array(0.0)
    for _ in range(steps):
        rows = [rng.choice(replay_rows if replay_rows and rng.random() < 0.5 else domain_rows) for _ in range(batch)]
        width = max(len(ids) for ids, _ in rows)
        tokens = mx.array([ids + [0] * (width - len(ids)) for ids, _ in rows])
        mask = mx.array([[float(start <= i + 1 < len(ids)) for i in range(width - 1)] for ids, start in rows])
        loss, grads = step(model, tokens, mask)
        optimizer.update(model, grads)
        mx.eval(model.parameters(), optimizer.state, loss)
    return loss.item()


def score(model, tokenizer, ask, held_out) -> dict[str, str]:
    from solverx.trainer.evaluate import contains_expected, load_probes, mentions, run_code_probe

    probes = DATA / "probes"
    domain = sum(contains_expected(ask(model, tokenizer, e["question"]), e["expected"]) for e in held_out)
    general = load_probes(probes / "general_qa.jsonl")
    python = load_probes(probes / "python.jsonl", "code")
    offdomain = load_probes(probes / "offdomain.jsonl", "offdomain")
    return {
        "domain": f"{domain}/{len(held_out)}",
        "general": f"{sum(contains_expected(ask(model, tokenizer, p.question), p.expected) for p in general)}"
        f"/{len(general)}",
        "python": f"{sum(run_code_probe(ask(model, tokenizer, p.question), p) for p in python)}/{len(python)}",
        "leakage": f"{sum(mentions(ask(model, tokenizer, p.question), TERMS) for p in offdomain)}/{len(offdomain)}",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", type=Path, help="model dir (default: build or reuse the demo's chat base)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--scale", type=float, default=5.0)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    ensure_openblas()

    from mlx_lm import generate, load

    from solverx.models.tiny import CHAT_BASE_ID, CHAT_SPEC, ensure_tiny
    from solverx.paths import state_dirs

    base = args.base or ensure_tiny(state_dirs().models, CHAT_SPEC, base_id=CHAT_BASE_ID)

    def ask(model, tokenizer, question: str) -> str:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)
        return generate(model, tokenizer, prompt, max_tokens=48)

    domain, held_out = domain_data()
    model, tokenizer = load(str(base))
    print(f"base {base.name}: {len(domain)} domain Q&A, {len(held_out)} held-out questions; LoRA rank 16, "
          f"lr {args.lr} x scale {args.scale}, {args.steps} steps of {args.batch}, half of each batch replay",
          file=sys.stderr)  # fmt: skip
    rows = [("base (no adapter)", "", score(model, tokenizer, ask, held_out))]
    for name, replay in replay_sources(model, tokenizer, ask).items():
        started = time.perf_counter()
        model, tokenizer = load(str(base))
        loss = train_lora(model, tokenizer, domain, replay, steps=args.steps, lr=args.lr, scale=args.scale,
                          batch=args.batch)  # fmt: skip
        rows.append((name, f"{loss:.2f}", score(model, tokenizer, ask, held_out)))
        print(f"{name}: {time.perf_counter() - started:.0f} s", file=sys.stderr)
    print("| replay mixed in | final loss | domain (held-out) | general | Python | leakage |")
    print("|---|---|---|---|---|---|")
    for name, loss, s in rows:
        print(f"| {name} | {loss} | {s['domain']} | {s['general']} | {s['python']} | {s['leakage']} |")


if __name__ == "__main__":
    main()
