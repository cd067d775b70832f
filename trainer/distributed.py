"""Data-parallel training over several processes or Macs, with MLX's own engine (``mx.distributed``).

Rank 0 is the run: it ingests, tokenizes, evaluates and writes every file and event. The other ranks are
workers that hold nothing of the run: for each stage rank 0 sends them, over the distributed group itself, the
stage's settings, the base model's fingerprint, the tokenized datasets and the weights to resume from. Then every
rank trains in lockstep through mlx-lm's ``train``, which averages the gradients (``mx.distributed``), while
:func:`solverx.trainer.datasets.mixed_batches` gives each rank its rows of the same global batch. Workers leave
when rank 0 says the stages are done. Greedy answers (self replay, evaluation) are shared out the same way: each
rank answers its share on its own engine (:func:`answer_everywhere`); rank 0 scores and registers alone.

A broadcast is an ``all_sum`` to which only rank 0 contributes: MLX's collectives are the only transport.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from solverx.adapters.fingerprint import base_fingerprint
from solverx.adapters.validate import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from solverx.trainer.answers import Ask, Reply, greedy_answers
from solverx.trainer.datasets import MixedDataset, Sample, SequenceDataset, mixed_batches
from solverx.trainer.recipe import LoraSettings
from solverx.trainer.train import StageSettings, train_stage

SLOT_BYTES = 1024  # each rank's slot in gather_text: a line saying what is wrong, or a host's facts as JSON


class RankDisagrees(RuntimeError):
    """A worker cannot take part in the stage (another base model, a missing path); the message names it."""


def world() -> Any:
    """The distributed group this process belongs to (size 1 when it was not started by a launcher)."""
    return mx.distributed.init()


def hosts() -> list[str]:
    """The ranks' addresses, from the ring backend's hostfile (``MLX_HOSTFILE``), else this host only."""
    path = os.environ.get("MLX_HOSTFILE")
    try:
        entries = json.loads(Path(path).read_text()) if path else []
    except (OSError, ValueError):
        entries = []
    return [",".join(e) if isinstance(e, list) else str(e) for e in entries] or ["127.0.0.1"]


# -- broadcasts ----------------------------------------------------------------------------------------------------


def _all_sum(array: np.ndarray) -> np.ndarray:
    summed = mx.distributed.all_sum(mx.array(array), stream=mx.cpu)
    mx.eval(summed)
    return np.array(summed)


def broadcast_bytes(group: Any, data: bytes | None) -> bytes:
    """``data`` from rank 0 on every rank (the others pass None)."""
    root = group.rank() == 0
    size = int(_all_sum(np.array([len(data) if root and data else 0], np.int32))[0])
    if size == 0:
        return b""
    payload = np.frombuffer(data, np.uint8).astype(np.int32) if root else np.zeros(size, np.int32)
    return _all_sum(payload).astype(np.uint8).tobytes()


def broadcast_json(group: Any, value: Any = None) -> Any:
    raw = broadcast_bytes(group, json.dumps(value).encode() if group.rank() == 0 else None)
    return json.loads(raw)


def broadcast_samples(group: Any, dataset: SequenceDataset | None) -> SequenceDataset:
    """A dataset's token sequences and prompt offsets (what training reads), from rank 0."""
    header = None
    if group.rank() == 0:
        samples = dataset.samples if dataset is not None else []
        header = {"lengths": [len(s.tokens) for s in samples], "offsets": [s.offset for s in samples]}
        header["kinds"] = [s.kind for s in samples]
    header = broadcast_json(group, header)
    total = sum(header["lengths"])
    tokens = np.zeros(total, np.int32)
    if group.rank() == 0 and total:
        tokens = np.concatenate([np.asarray(s.tokens, np.int32) for s in dataset.samples])
    if total:
        tokens = _all_sum(tokens)
    samples, start = [], 0
    for length, offset, kind in zip(header["lengths"], header["offsets"], header["kinds"], strict=True):
        samples.append(Sample(tokens[start : start + length].tolist(), offset, "rank 0", kind))
        start += length
    return SequenceDataset(samples)


def gather_text(group: Any, text: str) -> list[str]:
    """Every rank's ``text`` (at most :data:`SLOT_BYTES` of UTF-8), known to all ranks, in rank order."""
    slots = np.zeros((group.size(), SLOT_BYTES), np.int32)
    mine = text.encode()[:SLOT_BYTES]
    slots[group.rank(), : len(mine)] = np.frombuffer(mine, np.uint8)
    summed = _all_sum(slots).astype(np.uint8)
    return [bytes(row).rstrip(b"\0").decode(errors="replace") for row in summed]


def gather_bytes(group: Any, data: bytes) -> list[bytes]:
    """Every rank's ``data`` (any size), known to all ranks, in rank order."""
    sizes = np.zeros(group.size(), np.int32)
    sizes[group.rank()] = len(data)
    sizes = _all_sum(sizes)
    if not sizes.any():
        return [b""] * group.size()
    buffer = np.zeros(int(sizes.sum()), np.int32)
    start = int(sizes[: group.rank()].sum())
    buffer[start : start + len(data)] = np.frombuffer(data, np.uint8)
    summed = _all_sum(buffer).astype(np.uint8).tobytes()
    ends = np.cumsum(sizes).tolist()
    return [summed[end - int(size) : end] for end, size in zip(ends, sizes, strict=True)]


def check_agreement(group: Any, problem: str | None = None) -> None:
    """Raise :class:`RankDisagrees` on every rank when any rank has a problem."""
    problems = [f"rank {rank}: {p}" for rank, p in enumerate(gather_text(group, problem or "")) if p]
    if problems:
        raise RankDisagrees("; ".join(problems))


# -- rank 0 --------------------------------------------------------------------------------------------------------


def send_stage(
    group: Any,
    stage: str,
    base_dir: Path,
    train: MixedDataset,
    valid: SequenceDataset | None,
    lora: LoraSettings,
    settings: StageSettings,
    resume_from: Path | None,
) -> None:
    """Tell the workers to train ``stage`` with rank 0: call right before rank 0's own ``train_stage``."""
    header = {
        "op": "stage", "stage": stage, "base_dir": str(base_dir), "base_fingerprint": base_fingerprint(base_dir),
        "lora": asdict(lora), "settings": asdict(settings), "ratio": train.ratio, "seed": train.seed,
        "resume": resume_from is not None, "valid": valid is not None,
    }  # fmt: skip
    broadcast_json(group, header)
    check_agreement(group)
    broadcast_samples(group, train.domain)
    broadcast_samples(group, train.replay)
    if valid is not None:
        broadcast_samples(group, valid)
    if resume_from is not None:
        broadcast_bytes(group, (Path(resume_from) / ADAPTER_WEIGHTS).read_bytes())


def answer_everywhere(
    group: Any,
    base_dir: Path,
    base_id: str,
    asks: list[Ask],
    max_tokens: int,
    on_progress: Callable[[int, int], None] | None = None,
) -> list[Reply]:
    """Rank 0: :func:`~solverx.trainer.answers.greedy_answers` with every rank answering every ``size``-th question;
    the adapters go to the workers over the group. ``on_progress`` sees rank 0's share, scaled to the whole. In a
    group of one, this process answers them all."""
    if group.size() == 1:
        return greedy_answers(base_dir, base_id, asks, max_tokens, on_progress)
    asks = [Ask(*ask) for ask in asks]
    adapters = sorted({ask.adapter for ask in asks if ask.adapter is not None}, key=str)
    index = {adapter: i for i, adapter in enumerate(adapters)}
    header = {
        "op": "answer", "base_dir": str(base_dir), "base_id": base_id, "base_fingerprint": base_fingerprint(base_dir),
        "asks": [[a.question, index.get(a.adapter, -1), a.context] for a in asks], "adapters": len(adapters),
        "max_tokens": max_tokens,
    }  # fmt: skip
    broadcast_json(group, header)
    check_agreement(group)
    for adapter in adapters:
        broadcast_bytes(group, (adapter / ADAPTER_WEIGHTS).read_bytes())
        broadcast_bytes(group, (adapter / ADAPTER_CONFIG).read_bytes())

    def progress(done: int, total: int) -> None:
        if on_progress is not None:
            on_progress(min(len(asks), done * group.size()) if done < total else len(asks), len(asks))

    return _answer_share(group, header, adapters, progress)


def _answer_share(
    group: Any, header: dict, adapters: list[Path], on_progress: Callable[[int, int], None] | None = None
) -> list[Reply]:
    asks = header["asks"]
    rank, size = group.rank(), group.size()
    mine = [Ask(q, adapters[a] if a >= 0 else None, context) for q, a, context in asks[rank::size]]
    replies = greedy_answers(Path(header["base_dir"]), header["base_id"], mine, header["max_tokens"], on_progress)
    everyone: list[Reply | None] = [None] * len(asks)
    for r, blob in enumerate(gather_bytes(group, json.dumps(replies).encode())):
        for i, (text, finish) in zip(range(r, len(asks), size), json.loads(blob) if blob else [], strict=True):
            everyone[i] = (text, finish)
    return everyone  # type: ignore[return-value]


def send_done(group: Any) -> None:
    """Release the workers: the stages are over."""
    broadcast_json(group, {"op": "done"})


# -- the other ranks -----------------------------------------------------------------------------------------------


def serve_stages(group: Any) -> int:
    """A worker's life: train every stage rank 0 sends, until it says done. Returns the number of stages."""
    from mlx_lm import load

    stages = 0
    while True:
        header = broadcast_json(group)
        if header["op"] == "done":
            return stages
        base_dir = Path(header["base_dir"])
        problem = None
        if not (base_dir / "config.json").exists():
            problem = f"no base model at {base_dir} on this host"
        elif (theirs := base_fingerprint(base_dir)) != header["base_fingerprint"]:
            ours = header["base_fingerprint"]
            problem = f"the base model at {base_dir} differs (fingerprint {theirs[:19]}, rank 0 has {ours[:19]})"
        check_agreement(group, problem)
        if header["op"] == "answer":
            with tempfile.TemporaryDirectory(prefix="solverx-rank-") as scratch:
                adapters = []
                for i in range(header["adapters"]):
                    adapter = Path(scratch) / str(i)
                    adapter.mkdir()
                    (adapter / ADAPTER_WEIGHTS).write_bytes(broadcast_bytes(group, None))
                    (adapter / ADAPTER_CONFIG).write_bytes(broadcast_bytes(group, None))
                    adapters.append(adapter)
                _answer_share(group, header, adapters)
            continue
        domain, replay = broadcast_samples(group, None), broadcast_samples(group, None)
        valid = broadcast_samples(group, None) if header["valid"] else None
        train = MixedDataset(domain, replay if len(replay) else None, header["ratio"], header["seed"])
        with tempfile.TemporaryDirectory(prefix="solverx-rank-") as scratch:
            resume = None
            if header["resume"]:
                resume = Path(scratch) / "resume"
                resume.mkdir()
                (resume / ADAPTER_WEIGHTS).write_bytes(broadcast_bytes(group, None))
            model, _ = load(str(base_dir))
            train_stage(
                model, header["stage"], Path(scratch) / "out", train, valid,
                LoraSettings(**header["lora"]), StageSettings(**header["settings"]),
                resume_from=resume, batches=mixed_batches,
            )  # fmt: skip
        stages += 1
