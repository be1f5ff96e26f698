"""`train.own_weight`: each model's own direction (s = t) weighs w in the loss, each cross direction 1. Checked
against the directions' losses one by one (a weighted mean computed by hand, and its gradient); w = 1 is the
unweighted loss exactly and leaves run fingerprints as they were."""

from __future__ import annotations

import dataclasses
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


# ------------------------------------------------------------ own_keep: weights that rise when a model falls
def _row(problem, step, own):
    """A history row with model i's own direction at own[i]."""
    return {"step": step, **{f"{m.name}->{m.name}:full:trial_iia": v for m, v in zip(problem.models, own)}}


def test_own_keep_raises_the_weight_of_a_fallen_model_only(problem):
    trainer = _trainer(problem, own_weight=10.0, own_keep=0.02, own_boost=2.0, own_boost_max=8.0)
    assert trainer.own_weights() == {0: 10.0, 1: 10.0, 2: 10.0}
    trainer.history = [_row(problem, 0, [1.0, 0.9, 0.99])]
    assert trainer.own_weights() == {0: 10.0, 1: 10.0, 2: 10.0}
    # model 0 falls by 0.015 (kept), model 2 by 0.30 (raised); model 1 rises
    trainer.history.append(_row(problem, 50, [0.985, 0.95, 0.69]))
    assert trainer.own_weights() == {0: 10.0, 1: 10.0, 2: 20.0}
    trainer.history.append(_row(problem, 100, [0.97, 0.95, 0.80]))   # model 0 now 0.03 below: raised too
    assert trainer.own_weights() == {0: 20.0, 1: 10.0, 2: 40.0}
    for step in (150, 200, 250):
        trainer.history.append(_row(problem, step, [1.0, 0.95, 0.80]))
    assert trainer.own_weights() == {0: 20.0, 1: 10.0, 2: 80.0}  # capped at 8 × 10; a recovered weight stays
    # off: the configured weight whatever the history
    off = _trainer(problem, own_weight=10.0)
    off.history = trainer.history
    assert off.own_weights() == {0: 10.0, 1: 10.0, 2: 10.0}


def test_own_relax_lowers_a_recovered_weight_step_by_step(problem):
    trainer = _trainer(problem, own_weight=10.0, own_keep=0.02, own_boost=2.0, own_boost_max=8.0, own_relax=True)
    trainer.history = [_row(problem, 0, [1.0, 0.9, 0.99])]
    own = [[0.985, 0.95, 0.69], [0.97, 0.95, 0.80], [1.0, 0.95, 0.80], [1.0, 0.95, 0.97], [1.0, 0.95, 0.99],
           [1.0, 0.95, 0.99], [1.0, 0.95, 0.99], [1.0, 0.95, 0.5]]
    expected = [{0: 10.0, 1: 10.0, 2: 20.0}, {0: 20.0, 1: 10.0, 2: 40.0}, {0: 10.0, 1: 10.0, 2: 80.0},
                # 0.97 = 0.99 − 0.02: back at the floor, so lowered; then down to own_weight and no further
                {0: 10.0, 1: 10.0, 2: 40.0}, {0: 10.0, 1: 10.0, 2: 20.0}, {0: 10.0, 1: 10.0, 2: 10.0},
                {0: 10.0, 1: 10.0, 2: 10.0}, {0: 10.0, 1: 10.0, 2: 20.0}]
    for step, (values, weights) in enumerate(zip(own, expected), start=1):
        trainer.history.append(_row(problem, 50 * step, values))
        assert trainer.own_weights() == weights, step


def test_own_keep_loss_is_the_weighted_mean_by_model(problem):
    trainer = _trainer(problem, own_weight=2.0, own_keep=0.0, own_boost=3.0)
    trainer.history = [_row(problem, 0, [1.0, 1.0, 1.0]), _row(problem, 50, [1.0, 0.5, 1.0])]
    assert trainer.own_weights() == {0: 2.0, 1: 6.0, 2: 2.0}
    rows = trainer._batch(0)
    every = trainer.trained_directions
    loss, _ = trainer._loss(trainer.materialize(), rows, None)
    grads = torch.autograd.grad(loss, list(trainer.alignments.parameters()))
    maps = trainer.materialize()
    losses = {d: problem.loss(maps, rows, directions=[d])[0] for d in every}
    weights = {d: ({0: 2.0, 1: 6.0, 2: 2.0}[d[0]] if d[0] == d[1] else 1.0) for d in every}
    expected = sum(weights[d] * losses[d] for d in every) / sum(weights.values())
    expected_grads = torch.autograd.grad(expected, list(trainer.alignments.parameters()))
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-6)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-8)


def test_own_keep_before_any_fall_is_the_fixed_weight_exactly(problem):
    kept = _trainer(problem, own_weight=10.0, own_keep=0.02)
    fixed = _trainer(problem, own_weight=10.0)
    kept.history = fixed.history = [_row(problem, 0, [1.0, 1.0, 1.0]), _row(problem, 50, [0.99, 1.0, 0.985])]
    rows = kept._batch(0)
    maps = kept.materialize()
    assert torch.equal(kept._loss(maps, rows, None)[0], fixed._loss(maps, rows, None)[0])


def test_own_keep_in_a_fit_raises_logs_and_resumes(problem, tmp_path, monkeypatch):
    """A fit whose validations (real records, own directions' trial IIA scripted by step: model 2 falls at
    steps 2 and 4, model 0 at step 4) raises those models' weights at those validations, logs each raise,
    trains the steps after a raise on the raised weights, and resumes from its checkpoint with them."""
    script = {0: [1.0, 1.0, 1.0], 2: [1.0, 1.0, 0.5], 4: [0.9, 1.0, 0.6], 6: [1.0, 1.0, 1.0]}
    real_evaluate = MASTrainer.evaluate

    def scripted(self):
        records = real_evaluate(self)
        own = script[self.step]
        return [dataclasses.replace(r, trial_iia=own[r.target_index]) if r.source_index == r.target_index else r
                for r in records]

    monkeypatch.setattr(MASTrainer, "evaluate", scripted)
    seen = []

    class Weights:
        def on_step_end(self, trainer, output):
            seen.append(trainer.own_weights())

    cfg = TrainerConfig(lr=1e-2, batch_size=16, max_steps=6, eval_every=2, seed=5, own_weight=3.0, own_keep=0.05,
                        own_boost=2.0, own_boost_max=4.0, target_iia=1.0, patience=100)

    def trainer(log=None):
        aligns = torch.nn.ModuleList([make_alignment("orthogonal", e.width, k=8, seed=i)
                                      for i, e in enumerate(problem.models)])
        return MASTrainer(aligns, problem, cfg, checkpoint_path=tmp_path / "ck.pt", progress=False,
                          log=log, callbacks=[Weights()])

    lines = []
    first = trainer(lines.append)
    first.fit()
    # weights after steps 1..6 (a validation at 2, 4, 6 comes before its step's on_step_end)
    assert seen == [{0: 3.0, 1: 3.0, 2: 3.0}, {0: 3.0, 1: 3.0, 2: 6.0}, {0: 3.0, 1: 3.0, 2: 6.0},
                    {0: 6.0, 1: 3.0, 2: 12.0}, {0: 6.0, 1: 3.0, 2: 12.0}, {0: 6.0, 1: 3.0, 2: 12.0}]
    raises = [line for line in lines if "own_keep:" in line]
    assert len(raises) == 3 and "lstm2's own direction at 0.500 < step 0's 1.000" in raises[0]
    assert "gru0's own direction at 0.900" in raises[1] and "weight 3 -> 6" in raises[1]
    assert "lstm2's own direction at 0.600" in raises[2] and "weight 6 -> 12" in raises[2]
    again = trainer()
    assert again.try_resume() and again.own_weights() == {0: 6.0, 1: 3.0, 2: 12.0}


@pytest.mark.parametrize("bad, key", [(dict(own_keep=-0.1), "train.own_keep"), (dict(own_keep=1.5), "train.own_keep"),
                                      (dict(own_keep=True), "train.own_keep"),
                                      (dict(own_keep=0.02, own_boost=1.0), "train.own_boost"),
                                      (dict(own_keep=0.02, own_boost_max=0.5), "train.own_boost_max"),
                                      (dict(own_keep=0.02, own_relax="yes"), "train.own_relax"),
                                      (dict(own_keep=0.02, directions_per_step=3, budget_gradients="memory"),
                                       "budget_gradients: memory")])
def test_bad_own_keep_settings_are_named(bad, key):
    problems = TrainerConfig(**bad).validate()
    assert len(problems) == 1 and key in problems[0], problems


def test_fingerprints_carry_own_keep_only_when_set():
    def cfg(**train):
        return from_dict(MASConfig, {"models": [{"name": "multiobject-gru-s0"}, {"name": "multiobject-gru-s1"}],
                                     "variables": ["full"], "k": 32, "train": train})

    plain = run_fingerprint(cfg())["values"]
    assert not any(k.startswith("train.own_") for k in plain)
    assert run_fingerprint(cfg(own_boost=3.0))["values"] == plain       # inert without own_keep
    kept = run_fingerprint(cfg(own_keep=0.02))["values"]
    assert (kept["train.own_keep"], kept["train.own_boost"], kept["train.own_boost_max"]) == (0.02, 2.0, 8.0)
    assert "train.own_relax" not in kept                                # runs from before own_relax are reused
    assert run_fingerprint(cfg(own_keep=0.02, own_relax=True))["values"] == {**kept, "train.own_relax": True}
