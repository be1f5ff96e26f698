"""`train.lr_schedule`: constant (default, the rate every earlier run used; fingerprints unchanged) or cosine
(linear warm-up over `lr_warmup` steps, then a half cosine from `lr` to `lr_min_ratio * lr`). Checked against
the formula by hand, against the optimiser's rate at each step, across a resume, and for its errors."""

from __future__ import annotations

import math

import pytest
import torch
from task_fixtures import task_problem

from llm_mas.alignments import make_alignment
from llm_mas.config import from_dict
from llm_mas.errors import ConfigError
from llm_mas.run import run_fingerprint
from llm_mas.run_config import MASConfig
from llm_mas.trainer import MASTrainer, TrainerConfig


@pytest.fixture(scope="module")
def problem():
    return task_problem(("gru", "gru"), variables=["full"], k=8, n_train=48, n_valid=16, seed=3)


def _trainer(problem, **train) -> MASTrainer:
    aligns = torch.nn.ModuleList([make_alignment("orthogonal", e.width, k=8, seed=i)
                                  for i, e in enumerate(problem.models)])
    cfg = TrainerConfig(**{"lr": 1e-2, "batch_size": 16, "max_steps": 10, "seed": 5, **train})
    return MASTrainer(aligns, problem, cfg, progress=False, callbacks=[])


def _rates(trainer, steps):
    seen = []
    for _ in range(steps):
        trainer.train_step()
        seen.append(trainer.optimizer.param_groups[0]["lr"])
    return seen


def test_constant_is_the_default_and_never_moves(problem):
    trainer = _trainer(problem)
    assert trainer.config.lr_schedule == "constant"
    assert _rates(trainer, 4) == [1e-2] * 4


def test_cosine_rates_by_hand(problem):
    # 10 steps, 2 of warm-up, floor 0.1: steps 0, 1 rise to 1e-2; then progress (s - 2) / 8
    trainer = _trainer(problem, lr_schedule="cosine", lr_warmup=2, lr_min_ratio=0.1)
    expected = [1e-2 * 0.5, 1e-2 * 1.0] + [
        1e-2 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (s - 2) / 8))) for s in range(2, 10)]
    got = _rates(trainer, 10)
    assert got == pytest.approx(expected, rel=1e-12)
    assert got[2] == pytest.approx(1e-2) and got[-1] > 1e-3          # last step above the floor
    assert all(a > b for a, b in zip(got[2:], got[3:]))               # decreasing after the warm-up
    assert [trainer.lr_at(s) for s in range(10)] == pytest.approx(expected, rel=1e-12)


def test_the_schedule_moves_training(problem):
    plain, cosine = _trainer(problem), _trainer(problem, lr_schedule="cosine")
    for _ in range(6):
        plain.train_step()
        cosine.train_step()
    a = [p.detach().clone() for p in plain.alignments.parameters()]
    b = [p.detach().clone() for p in cosine.alignments.parameters()]
    assert max(float((x - y).abs().max()) for x, y in zip(a, b)) > 1e-6


def test_a_resumed_run_continues_on_the_schedule(problem):
    straight = _trainer(problem, lr_schedule="cosine", lr_warmup=1)
    for _ in range(6):
        straight.train_step()
    first = _trainer(problem, lr_schedule="cosine", lr_warmup=1)
    for _ in range(3):
        first.train_step()
    state = first.state_dict()
    resumed = _trainer(problem, lr_schedule="cosine", lr_warmup=1)
    resumed.load_state_dict(state)
    assert resumed.step == 3
    assert _rates(resumed, 3) == pytest.approx([straight.lr_at(s) for s in (3, 4, 5)], rel=1e-12)
    for x, y in zip(straight.alignments.parameters(), resumed.alignments.parameters()):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-7)


def test_every_bad_setting_is_named_at_once(problem):
    with pytest.raises(ConfigError) as err:
        _trainer(problem, lr_schedule="linear", lr_warmup=-1, lr_min_ratio=2.0)
    text = str(err.value)
    assert "lr_schedule must be constant or cosine, got 'linear'" in text
    assert "lr_warmup must be an integer >= 0" in text and "lr_min_ratio must be in [0, 1]" in text
    with pytest.raises(ConfigError, match="lr_warmup=3 needs train.lr_schedule: cosine"):
        _trainer(problem, lr_warmup=3)
    with pytest.raises(ConfigError, match="lr_warmup=10 must be below the run's 10 steps"):
        _trainer(problem, lr_schedule="cosine", lr_warmup=10)
    # with max_steps the config alone says so (preflight, before any model loads); with an epoch budget the
    # trainer does, once it knows the steps of an epoch (48 rows / batch 16 = 3)
    assert "train.lr_warmup=10 must be below the run's 10 steps" in TrainerConfig(
        lr_schedule="cosine", lr_warmup=10, max_steps=10).validate()
    with pytest.raises(ConfigError, match="lr_warmup=3 must be below the run's 3 steps"):
        _trainer(problem, lr_schedule="cosine", lr_warmup=3, max_steps=None, max_epochs=1)


def test_fingerprints_change_only_with_a_schedule():
    def cfg(**train):
        return from_dict(MASConfig, {"models": [{"name": "multiobject-gru-s0"}, {"name": "multiobject-gru-s1"}],
                                     "variables": ["full"], "k": 32, "train": train})

    plain = run_fingerprint(cfg())["values"]
    assert not any(k.startswith("train.lr_") for k in plain)          # runs from before the keys are reused
    assert run_fingerprint(cfg(lr_schedule="constant", lr_min_ratio=0.0))["values"] == plain
    cosine = run_fingerprint(cfg(lr_schedule="cosine", lr_min_ratio=0.1))["values"]
    assert cosine["train.lr_schedule"] == "cosine" and cosine["train.lr_min_ratio"] == 0.1
    with pytest.raises(ConfigError, match="lr_schedule"):
        from llm_mas.run_config import preflight

        preflight(cfg(lr_schedule="step"))
