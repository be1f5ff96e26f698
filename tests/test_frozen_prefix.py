"""Steps that never recompute what is frozen: at a Transformer's last-layer site a step runs the head on
the edited positions only (cached natural latent at the site + the pairs' constant head verdicts). It
must give the full patched run's losses, gradients and records (`skip_frozen=False` is that full run)."""

from __future__ import annotations

import pytest
import torch

from llm_mas.alignments import make_alignment
from llm_mas.errors import ConfigError
from llm_mas.models.task_models import build_task_model
from llm_mas.problems.task import TaskModelEntry, TaskModelProblem
from llm_mas.sites import resolve_site
from llm_mas.tasks import get_task

TASK = get_task("multiobject")


def _problem(archs, skip_frozen, site="hidden", variables=("count", "phase"), layers=None, **kw):
    entries = []
    for i, arch in enumerate(archs):
        extra = {"n_layers": layers} if layers and arch == "transformer" else {}
        m = build_task_model(arch, "multiobject", len(TASK.vocab), seed=i, **extra).eval().requires_grad_(False)
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


# ---------------------------------------------------------------------------------------- lower layers
def _records_agree(fast, full, maps):
    for with_ci in (False, True):  # teacher forced (shared shortcut); + rollout (always the full model)
        for a, b in zip(fast.evaluate(maps, with_ci=with_ci), full.evaluate(maps, with_ci=with_ci)):
            assert (a.source, a.target, a.variable) == (b.source, b.target, b.variable)
            assert a.trial_iia == pytest.approx(b.trial_iia, abs=1e-12)
            assert a.token_iia == pytest.approx(b.token_iia, abs=1e-12)
            assert a.loss == pytest.approx(b.loss, rel=1e-5)


@pytest.mark.parametrize("archs, site, layers, layer", [
    (("gru", "transformer"), "layer0", None, 0),                     # 2 blocks: block 0 from p + cached prefix
    (("transformer", "transformer", "lstm"), "layer0", None, 0),
    (("transformer", "gru"), "layer0", 3, 0),                        # 3 blocks: natural blocks 0..1, then 1..2
    (("transformer", "transformer"), "layer1", 3, 1),
])
def test_resumed_step_equals_full_patched_run(archs, site, layers, layer, monkeypatch):
    fast, full = _problem(archs, True, site=site, layers=layers), _problem(archs, False, site=site, layers=layers)
    targets = [t for t, m in enumerate(fast.models) if m.model.arch == "transformer"]
    assert all(fast._resume_layer(t) == layer for t in targets)
    assert not any(full._resume_layer(t) is not None or fast._head_only(t) for t in targets)
    assert all(c.prefix_is_base and c.scored_after_pos for split in fast.splits.values() for c in split)
    ran = []  # targets the fast problem still runs in full: never a Transformer's
    real_run = fast._run
    monkeypatch.setattr(fast, "_run", lambda maps, chunks, *a, **k: ran.append(chunks[0].target) or real_run(
        maps, chunks, *a, **k))
    alignments = _alignments(len(archs))
    for rows in (torch.arange(0, 48), torch.arange(24, 90)):
        l_fast, g_fast = _loss_and_grads(fast, alignments, rows)
        l_full, g_full = _loss_and_grads(full, alignments, rows)
        torch.testing.assert_close(l_fast, l_full, atol=1e-6, rtol=1e-6)
        for a, b in zip(g_fast, g_full):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
        assert any(float(g.abs().max()) > 0 for g in g_fast)
    assert not set(ran) & set(targets) and not fast._frozen_rest
    with torch.no_grad():
        maps = [a.materialize() for a in alignments]
        ran.clear()
        _records_agree(fast, full, maps)
    assert set(ran) & set(targets)  # the rollout runs the full model


def test_the_resumed_step_reads_the_edit():
    """A guard against a shortcut that ignores the edit: two sources into one target (variable full) give
    different per-row losses, and the records still equal the full run's."""
    fast, full = (_problem(("transformer", "transformer"), skip, site="layer0", variables=("full",))
                  for skip in (True, False))
    alignments = _alignments(2)
    with torch.no_grad():
        maps = [a.materialize() for a in alignments]
        ce_a, _, _ = fast._resume_rows(maps, fast.splits["valid"][1:2], torch.arange(32))   # 0 -> 1
        ce_b, _, _ = fast._resume_rows(maps, fast.splits["valid"][3:4], torch.arange(32))   # 1 -> 1
    assert not torch.allclose(ce_a, ce_b)
    _records_agree(fast, full, maps)


def test_resume_needs_a_lower_layer_an_indywise_run_and_the_base_prefix():
    assert _problem(("transformer", "gru"), True, site="layer0", variables=("full",))._resume_layer(0) == 0
    assert _problem(("transformer", "gru"), True, site="hidden", variables=("full",))._resume_layer(0) is None
    assert _problem(("transformer", "gru"), True, site="layer0", variables=("full",),
                    stepwise=True)._resume_layer(0) is None
    assert _problem(("transformer", "gru"), False, site="layer0", variables=("full",))._resume_layer(0) is None
    fast, full = (_problem(("gru", "transformer"), skip, site="layer0") for skip in (True, False))
    group = [c for c in fast.splits["train"] if c.target == 1]
    assert fast._resume_group(group)
    for problem in (fast, full):
        for c in problem.splits["train"]:
            if c.target == 1:  # another first token: the cached prefix latents are not this sequence's
                c.ids[:, 0] = 3
                c.prefix_is_base = False
    assert not fast._resume_group(group)
    group[0].prefix_is_base = True
    group[0].scored_after_pos = False  # a label before the edit would need the natural run's verdict there
    assert not fast._resume_group(group[:1])
    group[0].prefix_is_base = False
    alignments = _alignments(2)
    l_fast, _ = _loss_and_grads(fast, alignments, torch.arange(32))
    l_full, _ = _loss_and_grads(full, alignments, torch.arange(32))
    torch.testing.assert_close(l_fast, l_full, atol=1e-6, rtol=1e-6)


def test_blocks_from_equals_the_full_forward_at_the_suffix():
    model = build_task_model("transformer", "multiobject", len(TASK.vocab), seed=3, n_layers=3).eval()
    ids = torch.randint(1, len(TASK.vocab), (5, 17), generator=torch.Generator().manual_seed(0))
    outputs = model.block_outputs(ids, 2)                                  # (B, T, d) per block
    inputs = [model.embed(ids)] + outputs[:2]
    start = torch.tensor([0, 3, 7, 16, 10])
    absolute = start[:, None] + torch.arange(17)[None, :]
    valid = absolute < 17
    at = absolute.clamp(max=16)[..., None].expand(-1, -1, model.d_model)
    with torch.no_grad():
        for first in (0, 1, 2):
            got = model.blocks_from(first, inputs[first].gather(1, at), start, inputs[first:])
            torch.testing.assert_close(got[valid], outputs[2].gather(1, at)[valid], atol=1e-5, rtol=1e-5)
            # the contexts are read before start only: changing them from position 5 on changes exactly the
            # rows that start after 5
            moved = [c.clone() for c in inputs[first:]]
            for c in moved:  # not a constant shift: the LayerNorm would remove it
                c[:, 5:] += torch.randn(c[:, 5:].shape, generator=torch.Generator().manual_seed(1))
            again = model.blocks_from(first, inputs[first].gather(1, at), start, moved)
            reads = start > 5
            torch.testing.assert_close(again[~reads], got[~reads], atol=0, rtol=0)
            assert all(not torch.allclose(again[r], got[r]) for r in reads.nonzero()[:, 0])
        torch.testing.assert_close(model.readout(outputs[2]), model(ids), atol=1e-6, rtol=1e-6)
    with pytest.raises(ConfigError, match="one context per block"):
        model.blocks_from(1, inputs[1], torch.zeros(5, dtype=torch.long), inputs)


def test_layer0_transformers_in_a_multi_model_mas_config_run(tmp_path):
    """`llm-mas mas` on shipped models, the Transformers at site layer0 and a GRU at hidden: the run
    finishes with a record per direction, and its problem takes the resumed step for the Transformers."""
    import json
    import subprocess
    import sys

    from llm_mas.run import build_problem
    from llm_mas.run_config import load_mas_config

    config = tmp_path / "layer0.yaml"
    config.write_text(
        "name: layer0\nk: 16\nvariables: [full]\nprogress: false\n"
        "models:\n  - {name: multiobject-gru-s0}\n  - {name: multiobject-transformer-s0, site: layer0}\n"
        "  - {name: multiobject-transformer-s1, site: layer0}\n"
        "data: {n_train: 64, n_valid: 32}\ntrain: {batch_size: 32, max_steps: 2}\n")
    done = subprocess.run([sys.executable, "-m", "llm_mas.cli", "mas", str(config), f"out_dir={tmp_path}"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    records = json.loads((tmp_path / "layer0" / "results.json").read_text())
    assert len(records) == 9 and all(0.0 <= r["trial_iia"] <= 1.0 for r in records)
    problem = build_problem(load_mas_config(config, [f"out_dir={tmp_path}"]))
    assert [problem._resume_layer(t) for t in range(3)] == [None, 0, 0]
    assert all(problem._resume_group([c]) for c in problem.splits["train"] if c.target > 0)
