"""Steps that never recompute what is frozen: at a Transformer's last-layer site a step runs the head on
the edited positions only (cached natural latent at the site + the pairs' constant head verdicts). It
must give the full patched run's losses, gradients and records (`skip_frozen=False` is that full run)."""

from __future__ import annotations

import pytest
import torch

from llm_mas.alignments import make_alignment
from llm_mas.models.task_models import build_task_model
from llm_mas.problems.task import TaskModelEntry, TaskModelProblem
from llm_mas.sites import resolve_site
from llm_mas.tasks import get_task

TASK = get_task("multiobject")


def _problem(archs, skip_frozen, site="hidden", variables=("count", "phase"), **kw):
    entries = []
    for i, arch in enumerate(archs):
        m = build_task_model(arch, "multiobject", len(TASK.vocab), seed=i).eval().requires_grad_(False)
        entries.append(TaskModelEntry(name=f"{arch}{i}", model=m, task=TASK, site=resolve_site(m, site),
                                      width=m.d_model, variable_map={}))
    return TaskModelProblem(entries, list(variables), 16, n_train=96, n_valid=64, seed=5, eval_batch_size=32,
                            progress=False, skip_frozen=skip_frozen, **kw)


def _alignments(n):
    return [make_alignment("orthogonal", 128, k=16, seed=10 + s) for s in range(n)]


def _loss_and_grads(problem, alignments, rows):
    for a in alignments:
        a.zero_grad(set_to_none=True)
    loss, _ = problem.loss([a.materialize() for a in alignments], rows)
    loss.backward()
    grads = [p.grad.clone() for a in alignments for p in a.parameters() if p.requires_grad]
    return loss.detach(), grads


@pytest.mark.parametrize("archs", [("gru", "transformer"), ("transformer", "transformer", "lstm")])
def test_head_only_step_equals_full_patched_run(archs):
    fast, full = _problem(archs, True), _problem(archs, False)
    targets = [t for t, m in enumerate(fast.models) if m.model.arch == "transformer"]
    assert all(fast._head_only(t) for t in targets) and not any(full._head_only(t) for t in targets)
    alignments = _alignments(len(archs))
    # two overlapping batches: the second reads some pairs' cached verdicts and fills others
    for rows in (torch.arange(0, 48), torch.arange(24, 90)):
        l_fast, g_fast = _loss_and_grads(fast, alignments, rows)
        l_full, g_full = _loss_and_grads(full, alignments, rows)
        torch.testing.assert_close(l_fast, l_full, atol=1e-6, rtol=1e-5)
        for a, b in zip(g_fast, g_full):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
        assert any(float(g.abs().max()) > 0 for g in g_fast)
    assert all(c.prefix_is_base for split in fast.splits.values() for c in split)
    filled = [fast._frozen_rest[id(c)].known for c in fast.splits["train"] if fast._head_only(c.target)]
    assert filled and all(int(k.sum()) == 90 for k in filled)  # only the rows read, each once
    with torch.no_grad():
        maps = [a.materialize() for a in alignments]
        for with_ci in (False, True):  # teacher forced; + rollout (which always runs the full model)
            for a, b in zip(fast.evaluate(maps, with_ci=with_ci), full.evaluate(maps, with_ci=with_ci)):
                assert (a.source, a.target, a.variable) == (b.source, b.target, b.variable)
                assert a.trial_iia == pytest.approx(b.trial_iia, abs=1e-12)
                assert a.token_iia == pytest.approx(b.token_iia, abs=1e-12)
                assert a.loss == pytest.approx(b.loss, rel=1e-5)


def test_head_only_needs_the_last_layer_and_an_indywise_run():
    assert not _problem(("transformer", "gru"), True, site="layer0", variables=("full",))._head_only(0)
    assert not _problem(("transformer", "gru"), True, site="embeddings", variables=("full",),
                        stepwise=True)._head_only(0)
    stepwise_hidden = _problem(("transformer", "gru"), True, variables=("full",), stepwise=True)
    assert not stepwise_hidden._head_only(0)
    assert _problem(("transformer", "gru"), True, variables=("full",))._head_only(0)


def test_a_counterfactual_prefix_unlike_its_base_runs_the_full_model():
    """The head-only step reads the cached latent at the intervened token; a pair whose tokens up to it
    differ from its base sequence's must not use it (the full patched run is taken instead)."""
    fast, full = _problem(("gru", "transformer"), True), _problem(("gru", "transformer"), False)
    group = [c for c in fast.splits["train"] if c.target == 1]
    assert fast._head_only_group(group)
    for problem in (fast, full):
        for c in problem.splits["train"]:
            if c.target == 1:  # change every pair's first token (BOS -> another id): the prefix is no longer the base's
                c.ids[:, 0] = 3
                c.prefix_is_base = False
    assert not fast._head_only_group(group)
    alignments = _alignments(2)
    rows = torch.arange(32)
    l_fast, _ = _loss_and_grads(fast, alignments, rows)
    l_full, _ = _loss_and_grads(full, alignments, rows)
    torch.testing.assert_close(l_fast, l_full, atol=1e-6, rtol=1e-5)
    assert not fast._frozen_rest  # nothing was cached for them
