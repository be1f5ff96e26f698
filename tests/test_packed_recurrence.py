"""The packed continuation of a MAS training step (`continue_packed`, `TaskModelProblem._packed_run`; GRU and LSTM)
and the GRU's hand-written backward (`_GRUContinuation`) give the numbers of the per-bucket run through torch's
kernel.

References: torch's own GRU under autograd (gradcheck in float64; `torch.gru` on packed sequences), and the
per-bucket direct run (``packed_recurrent = False``, ``hand_backward = False``), itself tested against the
hooked run in test_recurrent_path.py. Float32 tolerances are measured ones with a margin (rounding differs:
the hand-written loop sums the gradient in another order, the packed run edits all rows at once); evaluation,
which runs without a gradient, keeps the per-bucket run and its records bit for bit.
"""

from __future__ import annotations

import pytest
import torch
from task_fixtures import TASK, task_problem
from task_fixtures import frozen_model as _model

from llm_mas.alignments import make_alignment
from llm_mas.errors import ConfigError, DataError
from llm_mas.llm.record import IGNORE_INDEX
from llm_mas.models.task_models import GRUTaskModel, _GRUContinuation
from llm_mas.problems.task import TaskModelProblem


@pytest.fixture
def paths(monkeypatch):
    """use(new): the packed run with the hand-written backward (True) or the per-bucket autograd run (False)."""
    def use(new: bool, tanh_by_sigmoid: bool = True) -> None:
        monkeypatch.setattr(TaskModelProblem, "packed_recurrent", new)
        monkeypatch.setattr(GRUTaskModel, "hand_backward", new)
        monkeypatch.setattr(GRUTaskModel, "tanh_by_sigmoid", tanh_by_sigmoid)

    return use


def _sorted_rows(n_rows: int, width: int, seed: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, len(TASK.vocab), (n_rows, width), generator=g)
    lengths = torch.randint(0, width + 1, (n_rows,), generator=g).sort(descending=True).values
    lengths[0] = width
    state = (torch.randn(n_rows, 128, generator=g) * 0.5).to(dtype)
    return ids, lengths, state


def _row_by_row(model, state, ids, lengths):
    """The reference: `continue_from` (torch's kernel) on each row alone, packed time-major."""
    outs = [model.continue_from(state[i:i + 1], ids[i:i + 1, :int(n)])[0] for i, n in enumerate(lengths) if n]
    return torch.cat([torch.stack([o[t] for o in outs if len(o) > t]) for t in range(int(lengths[0]))])


@pytest.mark.parametrize("tanh_by_sigmoid", [False, True])
def test_hand_backward_passes_gradcheck(tanh_by_sigmoid):
    """float64: the hand-written backward is the gradient of its forward (finite differences), for rows of
    different lengths (rows past the first step's batch get a zero gradient) and either candidate."""
    d, vocab = 5, 4
    g = torch.Generator().manual_seed(0)
    gates, gate_n = torch.randn(vocab, 3 * d, generator=g, dtype=torch.float64), torch.randn(
        vocab, d, generator=g, dtype=torch.float64)
    w_hh = torch.randn(3 * d, d, generator=g, dtype=torch.float64) * 0.5
    batch_sizes = [3, 3, 2, 1]
    tokens = torch.randint(0, vocab, (sum(batch_sizes),), generator=g)
    h0 = torch.randn(4, d, generator=g, dtype=torch.float64, requires_grad=True)

    def run(h):
        return _GRUContinuation.apply(h, tokens, batch_sizes, gates, gate_n, w_hh, tanh_by_sigmoid)

    assert torch.autograd.gradcheck(run, (h0,))
    run(h0).sum().backward()
    assert torch.equal(h0.grad[3], torch.zeros(d, dtype=torch.float64)) and h0.grad[:3].abs().min() > 0


@pytest.mark.parametrize("tanh_by_sigmoid", [False, True])
def test_continue_packed_equals_torch_row_by_row_float64(monkeypatch, tanh_by_sigmoid):
    """A GRU in float64: the packed features and the latent's gradient of the hand-written run equal torch's
    GRU run on each row alone (`continue_from` through the fused kernel) to float64 rounding."""
    monkeypatch.setattr(GRUTaskModel, "tanh_by_sigmoid", tanh_by_sigmoid)
    model = _model("gru", 0, torch.float64)
    ids, lengths, state = _sorted_rows(9, 7, seed=1, dtype=torch.float64)
    weights = torch.randn(int(lengths.sum()), 128, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    out = {}
    for hand in (True, False):
        monkeypatch.setattr(GRUTaskModel, "hand_backward", hand)
        h = state.clone().requires_grad_(True)
        feats = model.continue_packed(h, ids, lengths) if hand else _row_by_row(model, h, ids, lengths)
        (feats * weights).sum().backward()
        out[hand] = feats.detach(), h.grad
    torch.testing.assert_close(out[True][0], out[False][0], rtol=0, atol=1e-12)
    torch.testing.assert_close(out[True][1], out[False][1], rtol=0, atol=1e-12)


@pytest.mark.parametrize("arch", ["gru", "lstm"])
def test_continue_packed_float32_paths_agree(monkeypatch, arch):
    """float32: the GRU's hand-written run, and torch's packed kernel under autograd (the GRU's fallback, the
    LSTM's path), give the row-by-row numbers within float32 rounding (measured: features 3e-7, gradients
    2e-7 of their largest entry)."""
    model = _model(arch, 1)
    ids, lengths, state = _sorted_rows(40, 12, seed=3)
    weights = torch.randn(int(lengths.sum()), model._output_width, generator=torch.Generator().manual_seed(4))
    out = {}
    names = (("hand", True), ("packed", False), ("rows", False)) if arch == "gru" else (("packed", False),
                                                                                         ("rows", False))
    for name, hand in names:
        monkeypatch.setattr(GRUTaskModel, "hand_backward", hand)
        h = state.clone().requires_grad_(True)
        feats = _row_by_row(model, h, ids, lengths) if name == "rows" else model.continue_packed(h, ids, lengths)
        (feats * weights).sum().backward()
        out[name] = feats.detach(), h.grad
    for name, _ in names[:-1]:
        torch.testing.assert_close(out[name][0], out["rows"][0], rtol=0, atol=2e-6)
        scale = float(out["rows"][1].abs().max())
        torch.testing.assert_close(out[name][1], out["rows"][1], rtol=0, atol=2e-6 * scale)


def test_continue_packed_checks_its_input(monkeypatch):
    model = _model("gru", 0)
    ids, lengths, state = _sorted_rows(4, 5, seed=5)
    with pytest.raises(DataError, match="sorted by length"):
        model.continue_packed(state, ids, lengths.flip(0))
    with pytest.raises(DataError, match="input columns"):
        model.continue_packed(state, ids[:, :3], lengths)
    monkeypatch.setattr(GRUTaskModel, "packed_continuation", False)
    with pytest.raises(ConfigError, match="GRU and LSTM models"):
        model.continue_packed(state, ids, lengths)
    monkeypatch.undo()
    assert model.continue_packed(state, ids, torch.zeros(4, dtype=torch.long)).shape == (0, 128)


def test_trained_weights_take_torch_kernel():
    """A GRU whose recurrent weights need a gradient (model training) never takes the hand-written backward."""
    model = _model("gru", 0).requires_grad_(True)
    ids, lengths, state = _sorted_rows(6, 5, seed=6)
    h = state.clone().requires_grad_(True)
    assert not model._hand_backward(h)
    model.continue_packed(h, ids, lengths).sum().backward()
    assert model.rnns[0].weight_hh_l0.grad is not None and h.grad is not None


def _problem(archs):
    return task_problem(archs, eval_batch_size=40)


@pytest.mark.parametrize("archs", [("gru", "gru"), ("gru", "lstm")])
@pytest.mark.parametrize("tanh_by_sigmoid", [False, True])
def test_packed_step_equals_the_bucket_run(archs, tanh_by_sigmoid, paths):
    """A training step's loss, alignment gradients and per-direction logits: the packed runs (a GRU target's
    with the hand-written backward, an LSTM target's through torch's packed kernel) against the per-bucket
    autograd run (measured here: loss 1.2e-7 relative, gradients 3.5e-7 of their largest entry, logits 1.2e-7
    absolute), the entries' labels and rows in the same order."""
    prob = _problem(archs)
    modules = [make_alignment("orthogonal", 128, seed=s) for s in (3, 4)]
    rows = torch.randperm(96, generator=torch.Generator().manual_seed(0))[:80]
    out = {}
    for new in (False, True):
        paths(new, tanh_by_sigmoid)
        for m in modules:
            m.zero_grad(set_to_none=True)
        loss, _ = prob.loss([m.materialize() for m in modules], rows)
        loss.backward()
        out[new] = (loss.detach(), [p.grad.clone() for m in modules for p in m.parameters()])
    (l_ref, g_ref), (l_new, g_new) = out[False], out[True]
    torch.testing.assert_close(l_new, l_ref, rtol=2e-6, atol=0)
    for a, b in zip(g_new, g_ref):
        scale = float(b.abs().max())
        assert scale > 0
        torch.testing.assert_close(a, b, rtol=0, atol=5e-6 * scale)
    maps = [m.materialize() for m in modules]
    for group in prob._groups(prob.splits["train"]):
        runs = {}
        for new in (False, True):
            paths(new, tanh_by_sigmoid)
            runs[new] = prob._run(maps, group, [rows] * len(group), rollout=False)
        (lo_a, la_a, r_a), (lo_b, la_b, r_b) = runs[False], runs[True]
        assert torch.equal(la_a, la_b) and torch.equal(r_a, r_b) and (la_a != IGNORE_INDEX).all()
        torch.testing.assert_close(lo_b.detach(), lo_a.detach(), rtol=0, atol=2e-6)


def test_evaluation_keeps_the_bucket_run(paths):
    """Evaluation runs without a gradient: the packed flag changes no record, bit for bit."""
    prob = _problem(("gru", "gru"))
    maps = [make_alignment("orthogonal", 128, seed=s).materialize() for s in (1, 2)]
    records = {}
    for new in (False, True):
        paths(new)
        records[new] = prob.evaluate(maps, with_ci=True)
    for a, b in zip(records[False], records[True]):
        assert (a.trial_iia, a.token_iia, a.loss) == (b.trial_iia, b.token_iia, b.loss)
