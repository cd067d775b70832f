"""The stage's learning rate: constant by default, or a short warm-up and a cosine decay to 0 ("cosine")."""

from __future__ import annotations

import mlx.core as mx
import pytest

from solverx.trainer.train import StageSettings, learning_rate_schedule


def test_constant_is_the_rate_itself() -> None:
    assert learning_rate_schedule(StageSettings(iters=220, learning_rate=4e-4)) == 4e-4


def test_cosine_warms_up_then_decays_to_zero_by_the_last_step() -> None:
    schedule = learning_rate_schedule(StageSettings(iters=200, learning_rate=6e-4, lr_schedule="cosine"))
    rate = [float(schedule(mx.array(step))) for step in range(200)]
    assert rate[0] == pytest.approx(6e-5) and rate[:10] == sorted(rate[:10])  # 10 steps (5 %) of warm-up
    assert max(rate) == pytest.approx(6e-4) and rate.index(max(rate)) == 10
    assert rate[10:] == sorted(rate[10:], reverse=True) and rate[-1] < 1e-7
    assert rate[105] == pytest.approx(3e-4, rel=0.02)  # half-way through the decay: half the rate
