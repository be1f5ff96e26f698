"""Golden tests of the MAS core on small random task models (no shipped checkpoints needed)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llm_mas.alignments import make_alignment
from llm_mas.backends import Edit, TorchHookBackend
from llm_mas.errors import ConfigError
from llm_mas.interventions import intervene
from llm_mas.models.task_models import build_task_model
from llm_mas.problems.task import TaskModelEntry, TaskModelProblem
from llm_mas.sites import Site
from llm_mas.tasks import get_task
from llm_mas.trainer import MASTrainer, StopAfter, TrainerConfig

TASK = get_task("multiobject")


def _model(arch: str, seed: int):
    m = build_task_model(arch, "multiobject", len(TASK.vocab), seed=seed).eval()
    m.requires_grad_(False)
    return m


def _entry(arch: str, seed: int, site: str = "hidden") -> TaskModelEntry:
    from llm_mas.sites import resolve_site

    m = _model(arch, seed)
    return TaskModelEntry(name=f"{arch}{seed}", model=m, task=TASK, site=resolve_site(m, site), width=m.d_model,
                      variable_map={})


def _identity_maps(n: int, d: int = 128):
    return [make_alignment("identity", d).materialize() for _ in range(n)]


@pytest.mark.parametrize("arch,site,stepwise", [
    ("gru", "hook_layers.0", False), ("lstm", "hook_layers.0", False),      # the state carries everything
    ("gru", "hook_embed", True), ("lstm", "hook_embed", True),
    # Transformer: only at the embeddings does a stepwise swap replace everything later positions attend to
    # (at a layer-l site, positions > p still read the target's own lower-layer keys and values).
    ("transformer", "hook_embed", True)])
def test_identity_full_swap_equals_running_the_source(arch, site, stepwise):
    """Splice source and target so they agree after p: a full identity swap at p (stepwise: at 0..p) must
    make the target's outputs from p on exactly the source's."""
    model = _model(arch, 0)
    rng = np.random.default_rng(0)
    src = torch.as_tensor(TASK.sample(6, rng, quantities=[15]).ids)
    tgt = torch.as_tensor(TASK.sample(6, rng, quantities=[15]).ids)
    p = 8  # a demo position in every row (N = 15)
    tgt[:, p + 1:] = src[:, p + 1:]
    backend = TorchHookBackend()
    site = Site.parse(site)
    h_src = backend.collect(model, {"input_ids": src}, [site])[str(site)]  # (B, T, d)
    maps = _identity_maps(2)
    mask = torch.zeros_like(tgt, dtype=torch.bool)
    if stepwise:
        mask[:, : p + 1] = True
    else:
        mask[:, p] = True
    source_entries = h_src[mask]  # (entries, d) in the row-major order the edit's `which` indexes
    edit = Edit(site, mask, lambda h, which: intervene(maps[1], maps[0], h, source_entries[which], slice(0, 128)))
    patched = backend.patch(model, {"input_ids": tgt}, [edit])
    expected = model(src)
    torch.testing.assert_close(patched[:, p:], expected[:, p:], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(model(tgt)[:, p:], expected[:, p:], atol=1e-3)  # the swap did something


@pytest.mark.parametrize("arch", ["gru", "transformer"])
def test_empty_subspace_equals_base_run(arch):
    model = _model(arch, 1)
    ids = torch.as_tensor(TASK.sample(5, np.random.default_rng(1)).ids)
    other = torch.randn(5, 128)
    maps = [make_alignment("orthogonal", 128, seed=s).materialize() for s in (0, 1)]
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[:, 3] = True
    edit = Edit(Site.parse("hook_layers.0"), mask,
                lambda h, which: intervene(maps[0], maps[1], h, other[which], slice(0, 0)))
    out = TorchHookBackend().patch(model, {"input_ids": ids}, [edit])
    torch.testing.assert_close(out, model(ids), atol=1e-5, rtol=1e-5)


def _problem(archs=("gru", "gru"), fast_path=True, stepwise=False, site="hidden", n_train=64, n_valid=48,
             variables=("full",), k=16, **kw):
    entries = [_entry(a, i, site) for i, a in enumerate(archs)]
    return TaskModelProblem(entries, list(variables), k, stepwise=stepwise, n_train=n_train, n_valid=n_valid,
                          seed=3, fast_path=fast_path, eval_batch_size=32, progress=False, **kw)


@pytest.mark.parametrize("arch", ["gru", "lstm"])
def test_fast_path_equals_full_sequence_run(arch):
    """Starting at the intervened token from the cached natural state == re-running the whole sequence."""
    fast = _problem((arch, arch), fast_path=True, variables=("count", "phase"))
    slow = _problem((arch, arch), fast_path=False, variables=("count", "phase"))
    assert all(c.fast for c in fast.splits["train"]) and not any(c.fast for c in slow.splits["train"])
    maps = [make_alignment("orthogonal", 128, seed=s).materialize() for s in (5, 6)]
    rows = torch.arange(40)
    l_fast, _ = fast.loss(maps, rows)
    l_slow, _ = slow.loss(maps, rows)
    torch.testing.assert_close(l_fast, l_slow, atol=1e-5, rtol=1e-5)
    r_fast = fast.evaluate(maps)
    r_slow = slow.evaluate(maps)
    for a, b in zip(r_fast, r_slow):
        assert a.trial_iia == pytest.approx(b.trial_iia) and a.token_iia == pytest.approx(b.token_iia)


def test_problem_directions_and_null_variable():
    prob = _problem(("gru", "gru", "transformer"), variables=("count",), null_subspace=True,
                    train_directions=[(0, 1), (1, 0)], n_train=16, n_valid=16)
    keys = [(c.source, c.target, c.variable) for c in prob.splits["valid"]]
    assert len([k for k in keys if k[2] == "count"]) == 9               # all n² directions evaluated
    assert sorted(k for k in keys if k[2] == "null") == [(0, 0, "null"), (1, 1, "null"), (2, 2, "null")]
    trained = {(c.source, c.target) for c in prob.splits["train"] if c.trained}
    assert trained == {(0, 1), (1, 0)}
    assert prob.blocks["count"] == slice(0, 16) and prob.blocks["null"] == slice(16, 128)


def test_stepwise_embeddings_runs_and_gradients_reach_only_alignments():
    prob = _problem(("gru", "transformer"), stepwise=True, site="embeddings", n_train=32, n_valid=16)
    aligns = torch.nn.ModuleList([make_alignment("orthogonal", 128, seed=s) for s in (0, 1)])
    loss, _ = prob.loss([a.materialize() for a in aligns], torch.arange(32))
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in aligns.parameters())
    assert all(p.grad is None for e in prob.models for p in e.model.parameters())
    recs = prob.evaluate([a.materialize() for a in aligns])
    assert len(recs) == 4 and all(0 <= r.trial_iia <= 1 for r in recs)


def test_trainer_keeps_rotations_orthogonal_and_is_deterministic_and_resumable(tmp_path):
    def fit(path, stop_after=None, resume=True):
        prob = _problem(n_train=96, n_valid=32, k=8)
        aligns = torch.nn.ModuleList([make_alignment("orthogonal", 128, seed=s) for s in (0, 1)])
        cfg = TrainerConfig(lr=1e-2, batch_size=32, max_steps=9, eval_every=3, patience=100, seed=4)
        trainer = MASTrainer(aligns, prob, cfg, checkpoint_path=path, progress=False)
        if stop_after is not None:
            with pytest.raises(KeyboardInterrupt):
                trainer.fit(callbacks=[StopAfter(stop_after)])
            return None
        res = trainer.fit(resume=resume)
        return aligns, res

    aligns, res = fit(tmp_path / "a.pt")
    for a in aligns:
        q = a.materialize()
        z = q.forward(torch.eye(128))
        torch.testing.assert_close(z @ z.T, torch.eye(128), atol=1e-5, rtol=0)
    aligns2, res2 = fit(tmp_path / "b.pt")
    assert [h["valid_score"] for h in res.history] == [h["valid_score"] for h in res2.history]
    fit(tmp_path / "c.pt", stop_after=5)  # killed after step 5: last checkpoint at step 3
    aligns3, res3 = fit(tmp_path / "c.pt")
    assert res3.steps == res.steps
    for a, b in zip(aligns.state_dict().values(), aligns3.state_dict().values()):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert [h["valid_score"] for h in res3.history] == [h["valid_score"] for h in res.history]


def test_stop_file_ends_training_early_keeps_the_best_and_a_rerun_continues(tmp_path):
    def trainer():
        prob = _problem(n_train=96, n_valid=32, k=8)
        aligns = torch.nn.ModuleList([make_alignment("orthogonal", 128, seed=s) for s in (0, 1)])
        cfg = TrainerConfig(lr=1e-2, batch_size=32, max_steps=9, eval_every=3, patience=100, seed=4)
        return MASTrainer(aligns, prob, cfg, checkpoint_path=tmp_path / "c.pt", progress=False,
                          stop_file=tmp_path / "STOP"), aligns

    first, _ = trainer()
    with pytest.raises(KeyboardInterrupt):
        first.fit(callbacks=[StopAfter(4)])            # killed after step 4: checkpoint at step 3
    (tmp_path / "STOP").touch()
    stopped, aligns = trainer()
    res = stopped.fit()                     # resumes at step 3 and stops before training further
    assert res.steps == 3 and "STOP was created" in res.stopped and not (tmp_path / "STOP").exists()
    best = {k: v.clone() for k, v in stopped.best_state.items()}
    for k, v in aligns.state_dict().items():  # the best weights are loaded after the stop
        torch.testing.assert_close(v, best[k], atol=0, rtol=0)
    again, _ = trainer()
    res2 = again.fit()                      # the stop was not recorded: the run continues to its budget
    assert res2.steps == 9 and "step budget" in res2.stopped


def test_clmas_matches_intended_states_masks_unmatched_and_mixes_losses():
    prob = _problem(("gru", "gru"), variables=("count",), n_train=64, n_valid=32,
                    train_directions=[(1, 0), (0, 0)], cl_directions=[(0, 1), (1, 1)], cl_epsilon=0.5)
    cl_chunks = [c for c in prob.splits["train"] if c.cl]
    assert {(c.source, c.target) for c in cl_chunks} == {(0, 1), (1, 1)}
    # the natural latent chosen for every matched pair has exactly the intended causal state
    rng = np.random.default_rng([3, 0])
    bases = [TASK.sample(64, rng) for _ in range(2)]  # the same draws the problem made for the train split
    states = TASK.states(bases[1])
    natural = TorchHookBackend().collect(prob.models[1].model, {"input_ids": torch.as_tensor(bases[1].ids)},
                                         [prob.models[1].site])[str(prob.models[1].site)]   # (N, L, d)
    for c in cl_chunks:
        rows, cols = c.cl_where
        matched = c.cl_matched.numpy()
        assert 0.5 < matched.mean() <= 1.0
        for var in ("obj_count", "phase", "count"):
            np.testing.assert_array_equal(states[var][rows, cols][matched], c.intended[var][matched])
        torch.testing.assert_close(c.cl_latents, natural[torch.as_tensor(rows), torch.as_tensor(cols)])
    maps = [make_alignment("orthogonal", 128, seed=s).materialize() for s in (0, 1)]
    loss, info = prob.loss(maps, torch.arange(32))
    assert set(info) == {"loss_behaviour", "loss_cl"}
    expected = 0.5 * info["loss_behaviour"] + 0.5 * info["loss_cl"]
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-5)
    # masking: an unmatched pair never contributes, whatever its latent
    c = cl_chunks[0]
    c.cl_matched[:] = False
    c.cl_matched[0] = True
    before = float(prob.cl_loss(maps, c, torch.arange(8)).detach())
    c.cl_latents[1:] = 1e6
    assert float(prob.cl_loss(maps, c, torch.arange(8)).detach()) == pytest.approx(before)
    # a perfect prediction of the matched latent gives zero loss
    c.cl_latents[0] = prob.intervened_latents(maps, c, torch.arange(1))[0].detach()
    assert float(prob.cl_loss(maps, c, torch.arange(1)).detach()) == pytest.approx(0.0, abs=1e-6)
    recs = prob.evaluate(maps)
    cl_recs = [r for r in recs if r.trained_by == "cl"]
    assert len(cl_recs) == 2 and all(r.cl_unmatched is not None for r in cl_recs)
    assert all(r.trained_by == "behaviour" for r in recs if (r.source_index, r.target_index) in
               [(1, 0), (0, 0)])


def test_clmas_match_on_fewer_variables_matches_more_and_only_on_those():
    full = _problem(("gru", "gru"), variables=("full",), n_train=96, n_valid=32,
                    train_directions=[(1, 0), (0, 0)], cl_directions=[(0, 1)], cl_epsilon=0.5)
    loose = _problem(("gru", "gru"), variables=("full",), n_train=96, n_valid=32,
                     train_directions=[(1, 0), (0, 0)], cl_directions=[(0, 1)], cl_epsilon=0.5,
                     cl_match_on=["phase", "count"])
    rng = np.random.default_rng([3, 0])
    bases = [TASK.sample(96, rng) for _ in range(2)]  # the train split's draws
    states = TASK.states(bases[1])
    (cf,), (cl,) = ([c for c in p.splits["train"] if c.cl] for p in (full, loose))
    assert cf.cl_matched.float().mean() < 1.0  # a full swap can intend a count above the target's obj_count
    assert bool(cl.cl_matched.all())           # (phase, count) always occurs naturally for some N in 1..20
    rows, cols = cl.cl_where
    for var in ("phase", "count"):
        np.testing.assert_array_equal(states[var][rows, cols], cl.intended[var])
    assert set(cl.intended) == {"phase", "count"}
    with pytest.raises(ConfigError, match=r"\['stage'\] not state variables of task 'multiobject'"):
        _problem(("gru", "gru"), variables=("full",), cl_directions=[(0, 1)], cl_match_on=["stage"])


@pytest.mark.parametrize("intervention", ["stitch", "linear_stitch"])
def test_stitching_baselines_train_and_evaluate_only_their_directions(intervention):
    from llm_mas.baselines import LinearStitch

    prob = _problem(("gru", "gru"), n_train=32, n_valid=16, intervention=intervention,
                    train_directions=[(0, 1)], k=2)
    if intervention == "linear_stitch":
        modules = torch.nn.ModuleList([LinearStitch(128, 128, 2, seed=0)])
        assert [(c.source, c.target) for c in prob.splits["valid"]] == [(0, 1)]
    else:
        modules = torch.nn.ModuleList([make_alignment("orthogonal", 128, seed=s) for s in (0, 1)])
        assert len(prob.splits["valid"]) == 4          # all directions evaluated, (0, 1) trained
    loss, _ = prob.loss([m.materialize() for m in modules], torch.arange(16))
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in modules.parameters() if p.requires_grad)
    recs = prob.evaluate([m.materialize() for m in modules])
    assert [r.trained for r in recs if (r.source_index, r.target_index) == (0, 1)] == [True]


@pytest.mark.parametrize("archs,stepwise,site", [(("gru", "lstm"), False, "hidden"),
                                                 (("gru", "transformer"), True, "embeddings")])
def test_length_buckets_change_no_number(monkeypatch, archs, stepwise, site):
    prob = _problem(archs, stepwise=stepwise, site=site, n_train=256, n_valid=256, variables=("count", "phase"))
    maps = [make_alignment("orthogonal", 128, seed=s).materialize() for s in (1, 2)]
    rows = torch.arange(200)
    bucketed = float(prob.loss(maps, rows)[0])
    recs = prob.evaluate(maps, rollout=True)
    monkeypatch.setattr(TaskModelProblem, "_buckets", staticmethod(lambda needed: [torch.arange(len(needed))]))
    assert float(prob.loss(maps, rows)[0]) == pytest.approx(bucketed, rel=1e-5)
    for a, b in zip(recs, prob.evaluate(maps, rollout=True)):
        assert a.trial_iia == b.trial_iia and a.token_iia == pytest.approx(b.token_iia)


def test_value_range_restricts_every_split_and_is_validated(monkeypatch):
    """data.value_range reaches make_pairs for every direction and split: each swapped value lies in lo..hi."""
    import llm_mas.problems.task as task_problem

    seen = []
    real = task_problem.make_pairs

    def spy(target_task, target_base, source_task, source_base, variable, n, rng, **kw):
        pairs = real(target_task, target_base, source_task, source_base, variable, n, rng, **kw)
        seen.append((target_task.states(target_base), source_task.states(source_base), pairs, kw))
        return pairs

    monkeypatch.setattr(task_problem, "make_pairs", spy)
    problem = _problem(variables=("count",), value_range=[3, 5])
    assert len(seen) == 2 * 4  # train + valid, four directions
    for t_states, s_states, p, kw in seen:
        assert kw["value_range"] == (3, 5)
        src = s_states["count"][p.source_index, p.source_pos]
        tgt = t_states["count"][p.target_index, p.target_pos]
        assert ((src >= 3) & (src <= 5)).all() and ((tgt >= 3) & (tgt <= 5)).all()
        assert set(src.tolist()) == {3, 4, 5}
    assert problem.value_range == (3, 5)
    with pytest.raises(ConfigError, match="cannot apply to full or null"):
        _problem(variables=("full",), value_range=[1, 10])
    with pytest.raises(ConfigError, match="lo <= hi"):
        _problem(variables=("count",), value_range=[5, 3])


def test_mas_config_value_range_validation():
    from llm_mas.presets import resolve_preset
    from recipes.common.plans import mas_config_from_preset

    ok = mas_config_from_preset(resolve_preset("gru_gru_hidden"), ["data.value_range=[1, 10]",
                                                                   "variables=[count]"])
    assert ok.data.value_range == [1, 10] and ok.validate() == []
    with pytest.raises(ConfigError, match=r"empty: need lo <= hi"):
        mas_config_from_preset(resolve_preset("gru_gru_hidden"), ["data.value_range=[10, 1]",
                                                                 "variables=[count]"])
    with pytest.raises(ConfigError, match=r"cannot apply to \['full'\]"):
        mas_config_from_preset(resolve_preset("gru_gru_hidden"), ["data.value_range=[1, 10]"])
    with pytest.raises(ConfigError, match=r"two integers \[lo, hi\], got \[1\]"):
        mas_config_from_preset(resolve_preset("gru_gru_hidden"), ["data.value_range=[1]",
                                                                 "variables=[count]"])


@pytest.mark.parametrize("archs,stepwise,site", [(("gru", "lstm"), False, "hidden"),
                                                 (("gru", "transformer"), False, "hidden"),
                                                 (("gru", "transformer"), True, "embeddings")])
def test_rows_per_evaluation_pass_change_no_record(archs, stepwise, site):
    """Capping the rows of one patched evaluation pass (each length bucket then runs in slices) gives the same
    records, bit for bit, teacher-forced and rollout."""
    prob = _problem(archs, stepwise=stepwise, site=site, n_train=64, n_valid=80, variables=("count", "phase"))
    prob.eval_batch_size = 80                 # 80 rows x 4 directions per target: one pass of 320 rows, 3 buckets
    maps = [make_alignment("orthogonal", 128, seed=s).materialize() for s in (1, 2)]
    assert prob.eval_rows_per_pass >= 320
    whole = prob.evaluate(maps, with_ci=True)
    for cap in (24, 64, 100):                 # 5, 2 and 2 slices per bucket
        prob.eval_rows_per_pass = cap
        assert prob.evaluate(maps, with_ci=True) == whole, cap
    with pytest.raises(ConfigError, match="eval_rows_per_pass"):
        _problem(archs, eval_rows_per_pass=0)
