"""bench/budget_worth.py's ``--modes scaled`` hook: each alignment's gradient becomes the per-matrix estimate
of the every-direction gradient, counted by hand on a 3-model budget step."""

import sys
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from budget_worth import _per_matrix_scaling  # noqa: E402


def test_scaled_gradient_is_the_every_direction_estimate():
    every = [(s, t) for s in range(3) for t in range(3)]            # D = 9, each model in f_m = 5
    step = [(0, 0), (0, 1), (1, 0), (2, 2)]                          # b = 4: c = 3, 2, 1 for models 0, 1, 2
    trainer = SimpleNamespace(trained_directions=every, step=7, step_directions=lambda i: step if i == 7 else None)
    alignments = nn.ModuleList(nn.Linear(2, 2, bias=False) for _ in range(3))
    for a in alignments:
        a.weight.grad = torch.ones(2, 2)
    _per_matrix_scaling(trainer)(alignments)
    for a, c in zip(alignments, (3, 2, 1)):
        torch.testing.assert_close(a.weight.grad, torch.full((2, 2), 4 / 9 * 5 / c))
    trainer.step = 8                                                  # an every-direction step: untouched
    for a in alignments:
        a.weight.grad = torch.ones(2, 2)
    _per_matrix_scaling(trainer)(alignments)
    assert all(bool((a.weight.grad == 1).all()) for a in alignments)
