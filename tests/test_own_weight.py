"""`train.own_weight`: each model's own direction (s = t) weighs w in the loss, each cross direction 1. Checked
against the directions' losses one by one (a weighted mean computed by hand, and its gradient); w = 1 is the
unweighted loss exactly and leaves run fingerprints as they were."""

from __future__ import annotations

import math

import pytest
import torch
from task_fixtures import task_problem

from llm_mas.alignments import make_alignment
from llm_mas.config import from_dict
from llm_mas.errors import ConfigError
from llm_mas.problems.task import TaskModelProblem
from llm_mas.run import run_fingerprint
from llm_mas.run_config import MASConfig
from llm_mas.trainer import MASTrainer, TrainerConfig


@pytest.fixture(scope="module")
def problem() -> TaskModelProblem:
    return task_problem(("gru", "gru", "lstm"), variables=["full"], k=8, n_train=48, n_valid=16, seed=3)


def _trainer(problem, **train) -> MASTrainer:
    aligns = torch.nn.ModuleList([make_alignment("orthogonal", e.width, k=8, seed=i)
                                  for i, e in enumerate(problem.models)])
    cfg = TrainerConfig(**{"lr": 1e-2, "batch_size": 16, "max_steps": 4, "seed": 5, **train})
    return MASTrainer(aligns, problem, cfg, progress=False, callbacks=[])


def _by_hand(trainer, rows, directions, w):
    """Σ_d w_d L_d / Σ_d w_d from each direction's own loss, and its gradient."""
    maps = trainer.materialize()
    losses = {d: trainer.problem.loss(maps, rows, directions=[d])[0] for d in directions}
    weights = {d: (w if d[0] == d[1] else 1.0) for d in directions}
    total = sum(weights[d] * losses[d] for d in directions) / sum(weights.values())
    grads = torch.autograd.grad(total, list(trainer.alignments.parameters()))
    return float(total.detach()), grads


@pytest.mark.parametrize("w", [1.0, 4.0, 0.25])
def test_the_loss_is_the_weighted_mean_of_the_directions_losses(problem, w):
    trainer = _trainer(problem, own_weight=w)
    rows = trainer._batch(0)
    every = trainer.trained_directions
    assert len(every) == 9
    loss, _ = trainer._loss(trainer.materialize(), rows, None)
    grads = torch.autograd.grad(loss, list(trainer.alignments.parameters()))
    expected, expected_grads = _by_hand(trainer, rows, every, w)
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-6)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-8)
    if w != 1:   # the weight moves the loss: own and cross directions differ at random alignments
        plain = float(trainer.problem.loss(trainer.materialize(), rows)[0].detach())
        assert abs(float(loss.detach()) - plain) > 1e-4 * plain


def test_weight_one_is_the_unweighted_loss_exactly(problem):
    trainer = _trainer(problem)
    rows = trainer._batch(0)
    maps = trainer.materialize()
    assert torch.equal(trainer._loss(maps, rows, None)[0], problem.loss(maps, rows)[0])
    budget = [(0, 1), (2, 2)]
    assert torch.equal(trainer._loss(maps, rows, budget)[0], problem.loss(maps, rows, directions=budget)[0])


def test_with_a_budget_the_weights_apply_within_the_steps_directions(problem):
    trainer = _trainer(problem, own_weight=3.0, directions_per_step=4, direction_sampling="balanced")
    directions = trainer.step_directions(0)
    kinds = {d[0] == d[1] for d in directions}
    assert kinds == {True, False}, directions         # the step mixes own and cross directions
    rows = trainer._batch(0)
    loss, _ = trainer._loss(trainer.materialize(), rows, directions)
    expected, _ = _by_hand(trainer, rows, [tuple(d) for d in directions], 3.0)
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-6)
    out = trainer.train_step()                      # and a real step trains on it
    assert math.isfinite(out.loss)


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf")])
def test_bad_weights_are_named(bad):
    problems = TrainerConfig(own_weight=bad).validate()
    assert len(problems) == 1 and "train.own_weight" in problems[0] and "> 0" in problems[0]


def test_the_gradient_memory_does_not_take_a_weight():
    problems = TrainerConfig(own_weight=2.0, directions_per_step=3, budget_gradients="memory").validate()
    assert len(problems) == 1 and "budget_gradients: memory" in problems[0]
    assert TrainerConfig(own_weight=2.0, directions_per_step=3).validate() == []


def test_fingerprints_change_only_when_the_weight_does():
    def cfg(**train):
        return from_dict(MASConfig, {"models": [{"name": "multiobject-gru-s0"}, {"name": "multiobject-gru-s1"}],
                                     "variables": ["full"], "k": 32, "train": train})

    plain = run_fingerprint(cfg())["values"]
    assert "train.own_weight" not in plain                              # runs from before the key are reused
    assert run_fingerprint(cfg(own_weight=1.0))["values"] == plain
    weighted = run_fingerprint(cfg(own_weight=10.0))["values"]
    assert weighted["train.own_weight"] == 10.0
    with pytest.raises(ConfigError, match="own_weight"):
        from llm_mas.run_config import preflight

        preflight(cfg(own_weight=-2.0))
