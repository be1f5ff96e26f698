"""The recurrent MAS step without hooks (`TaskModelProblem._run_recurrent`) and the folded input table of a
frozen RNN (`_RecurrentTaskModel._folded_inputs`) give the hooked run's numbers.

The hooked run (``direct_recurrent = False``, ``fold_inputs = False``) is the reference: the direct run keeps
its buckets, edits and entry order, so on one machine losses and gradients come out bit for bit; the checks
use tolerances far below any training effect, as float kernels differ between CPUs.
"""

from __future__ import annotations

import pytest
import torch
from task_fixtures import TASK, task_problem
from task_fixtures import frozen_model as _model

from llm_mas.alignments import make_alignment
from llm_mas.errors import ConfigError
from llm_mas.llm.record import IGNORE_INDEX
from llm_mas.problems.task import TaskModelProblem


def _problem(archs):
    return task_problem(archs, eval_batch_size=40)


@pytest.fixture
def reference_paths(monkeypatch):
    """Switch between the direct path (True) and the hooked reference (False)."""
    from llm_mas.models.task_models import _RecurrentTaskModel

    def use(direct: bool) -> None:
        monkeypatch.setattr(TaskModelProblem, "direct_recurrent", direct)
        monkeypatch.setattr(_RecurrentTaskModel, "fold_inputs", direct)

    return use


@pytest.mark.parametrize("archs", [("gru", "gru"), ("gru", "lstm")])
def test_direct_recurrent_step_equals_the_hooked_run(archs, reference_paths):
    prob = _problem(archs)
    assert all(c.fast for c in prob.splits["train"])
    modules = [make_alignment("orthogonal", 128, seed=s) for s in (3, 4)]
    rows = torch.randperm(96, generator=torch.Generator().manual_seed(0))[:80]
    out = {}
    for direct in (False, True):
        reference_paths(direct)
        for m in modules:
            m.zero_grad(set_to_none=True)
        loss, _ = prob.loss([m.materialize() for m in modules], rows)
        loss.backward()
        out[direct] = (loss.detach(), [p.grad.clone() for m in modules for p in m.parameters()])
    (l_ref, g_ref), (l_new, g_new) = out[False], out[True]
    torch.testing.assert_close(l_new, l_ref, rtol=1e-6, atol=0)
    for a, b in zip(g_new, g_ref):
        assert b.abs().max() > 0
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    # per direction, entry for entry: logits at the same scored positions, in the same order
    maps = [m.materialize() for m in modules]
    with torch.no_grad():
        for group in prob._groups(prob.splits["train"]):
            runs = {}
            for direct in (False, True):
                reference_paths(direct)
                runs[direct] = prob._run(maps, group, [rows] * len(group), rollout=False)
            (lo_a, la_a, r_a), (lo_b, la_b, r_b) = runs[False], runs[True]
            assert torch.equal(la_a, la_b) and torch.equal(r_a, r_b) and (la_a != IGNORE_INDEX).all()
            torch.testing.assert_close(lo_b, lo_a, rtol=1e-5, atol=1e-6)


def test_direct_recurrent_evaluation_gives_the_hooked_records(reference_paths):
    prob = _problem(("gru", "lstm"))
    maps = [make_alignment("orthogonal", 128, seed=s).materialize() for s in (1, 2)]
    records = {}
    for direct in (False, True):
        reference_paths(direct)
        records[direct] = prob.evaluate(maps, with_ci=True)
        prob.eval_rows_per_pass = 30      # slices of a bucket: the head then runs per slice
        records[(direct, "sliced")] = prob.evaluate(maps, with_ci=True)
        prob.eval_rows_per_pass = 1024
    for key in (True, (True, "sliced"), (False, "sliced")):
        for a, b in zip(records[False], records[key]):
            assert (a.source_index, a.target_index, a.variable) == (b.source_index, b.target_index, b.variable)
            assert a.trial_iia == b.trial_iia and a.token_iia == pytest.approx(b.token_iia, abs=1e-12)
            assert a.loss == pytest.approx(b.loss, rel=1e-5)


@pytest.mark.parametrize("arch", ["gru", "lstm"])
def test_folded_input_table_equals_the_plain_products(arch):
    model = _model(arch, 0)
    ids = torch.randint(1, len(TASK.vocab), (24, 17), generator=torch.Generator().manual_seed(1))
    state = torch.randn(24, model.d_model, generator=torch.Generator().manual_seed(2)) * 0.5
    with torch.no_grad():
        assert model._folded_inputs()
        folded = model.features(ids, state)
        model.fold_inputs = False
        plain = model.features(ids, state)
    torch.testing.assert_close(folded, plain, rtol=1e-5, atol=1e-6)
    # training a model keeps the plain products (its embedding and input weights need their gradients)
    model.fold_inputs = True
    model.requires_grad_(True)
    assert not model._folded_inputs()
    with torch.no_grad():
        assert model._folded_inputs()


@pytest.mark.parametrize("arch", ["gru", "lstm"])
def test_step_and_continue_from_equal_features_from_a_state(arch):
    model = _model(arch, 1)
    ids = torch.randint(1, len(TASK.vocab), (10, 9), generator=torch.Generator().manual_seed(3))
    state = torch.randn(10, model.d_model, generator=torch.Generator().manual_seed(4)) * 0.5
    with torch.no_grad():
        whole = model.features(ids, state)                                    # (10, 9, out)
        first = model.step(ids[:, 0], state)                                  # (10, d)
        torch.testing.assert_close(model.latent_features(first), whole[:, 0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(model.continue_from(first, ids[:, 1:]), whole[:, 1:], rtol=1e-5, atol=1e-6)
    deep = _model(arch, 0, n_layers=2)
    with pytest.raises(ConfigError, match="one-layer"):
        deep.continue_from(torch.zeros(2, deep.d_model), ids[:2])
