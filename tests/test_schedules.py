"""The learning-rate schedules (llm_mas.schedules) and their users: task-model and tiny-LM training, LoRA
fine-tuning (the MAS trainer's `train.lr_schedule`: tests/test_lr_schedule.py)."""

from __future__ import annotations

import math

import pytest

from llm_mas.llm.train_lm import _lr_at
from llm_mas.models.training import TrainConfig, lr_factor
from llm_mas.schedules import warmup_cosine, warmup_linear


def test_warmup_cosine_by_hand():
    assert warmup_cosine(0, 100, 10, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(9, 100, 10, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(10, 100, 10, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(55, 100, 10, 0.1) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 2)))
    assert warmup_cosine(100, 100, 10, 0.2) == pytest.approx(0.2)
    assert warmup_cosine(10_000, 100, 10, 0.2) == pytest.approx(0.2)
    assert all(warmup_cosine(s, 100, 10, 0.1) >= warmup_cosine(s + 1, 100, 10, 0.1) for s in range(10, 200))


def test_both_trainers_use_it():
    cfg = TrainConfig(steps=300, warmup_steps=20, min_lr_ratio=0.1)
    for step in (0, 5, 19, 20, 150, 299, 400):
        assert lr_factor(step, cfg) == warmup_cosine(step, 300, 20, 0.1)
        assert _lr_at(step, 300, 2e-3, 20) == pytest.approx(2e-3 * warmup_cosine(step, 300, 20, 0.1), rel=1e-15)


def test_warmup_linear_by_hand():
    f = warmup_linear(0, 4)
    assert [f(s) for s in range(5)] == [1.0, 0.75, 0.5, 0.25, 0.0]
    g = warmup_linear(2, 6)
    assert [round(g(s), 3) for s in range(6)] == [0.333, 0.667, 1.0, 0.75, 0.5, 0.25]
