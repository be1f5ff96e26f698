"""``models.<i>.alignment_init``: a model's alignment starts from a finished run's trained one instead of a random
rotation. A run started from another's tensors and trained for zero steps scores exactly what that run scored;
the copied tensors (not the path) enter the fingerprint; a standardised alignment keeps its own mean and std;
every bad start is reported before any model loads, and a width mismatch when the alignments are built."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import llm_mas
from llm_mas.config import from_dict
from llm_mas.errors import ConfigError
from llm_mas.run import build_alignments, build_problem, run, run_fingerprint
from llm_mas.run_config import MASConfig, preflight

GRU0, GRU1, LSTM0 = "multiobject-gru-s0", "multiobject-gru-s1", "multiobject-lstm-s0"


def _cfg(tmp_path, name, models, **kw) -> MASConfig:
    data = {"name": name, "out_dir": str(tmp_path), "progress": False, "k": 8, "variables": ["full"],
            "models": models, "data": {"n_train": 128, "n_valid": 64},
            "train": {"batch_size": 64, "max_steps": 6, "eval_every": 3, "lr": 1e-2}}
    data.update(kw)
    return from_dict(MASConfig, data)


@pytest.fixture(scope="module")
def source_run(tmp_path_factory):
    """A trained two-GRU run (GRU s1 standardised) to start from."""
    out = tmp_path_factory.mktemp("runs")
    config = _cfg(out, "source", [{"name": GRU0}, {"name": GRU1, "standardize": True}])
    return out / "source", run(config, log=lambda s: None)


def _started(tmp_path, source, name="started", steps=0, **entries):
    models = [{"name": GRU0, "alignment_init": str(source), **entries.get("m0", {})},
              {"name": GRU1, "standardize": True, "alignment_init": str(source), **entries.get("m1", {})}]
    return _cfg(tmp_path, name, models, train={"batch_size": 64, "max_steps": steps, "eval_every": 3, "lr": 1e-2})


def test_a_start_from_a_run_scores_what_that_run_scored(tmp_path, source_run):
    source, result = source_run
    started = run(_started(tmp_path, source), log=lambda s: None)   # zero steps: the start is what is scored
    assert [(r.source_index, r.target_index) for r in started.records] == \
        [(r.source_index, r.target_index) for r in result.records]
    for old, new in zip(result.records, started.records):
        assert new.trial_iia == old.trial_iia and new.n_pairs == old.n_pairs
        assert new.loss == pytest.approx(old.loss, rel=1e-6, abs=1e-9)
    theirs, mine = load_file(str(source / "alignments.safetensors")), load_file(
        str(tmp_path / "started" / "alignments.safetensors"))
    assert set(theirs) == set(mine)
    for key in theirs:   # the rotation copied; the standardised model's mean/std are this run's (same data here)
        assert torch.equal(theirs[key], mine[key]), key


def test_the_start_differs_from_a_random_one_and_training_goes_on_from_it(tmp_path, source_run):
    source, result = source_run
    config = _started(tmp_path, source, steps=3)
    problem = build_problem(config)
    started, random = build_alignments(config, problem), build_alignments(config, problem, init=False)
    theirs = load_file(str(source / "alignments.safetensors"))
    for i, (a, b) in enumerate(zip(started, random)):
        for key, value in a.state_dict().items():
            if key in ("mean", "std"):
                assert torch.equal(value, b.state_dict()[key])   # this run's own statistics, never copied
            else:
                assert torch.equal(value, theirs[f"model{i}.{key}"])
        # the same seed gives the same base rotation; the trained parameter and so the map differ
        assert not torch.equal(a.materialize().forward(torch.eye(a.d)), b.materialize().forward(torch.eye(b.d)))
    trained = run(config, log=lambda s: None)
    assert len(trained.records) == len(result.records) and trained.info["steps"] == 3
    # the last step's parameters (the saved alignments are the best validation's, which may be the start)
    last = torch.load(tmp_path / "started" / "checkpoint.pt", weights_only=False)["alignments"]
    for i, key in enumerate(("linear.parametrizations.weight.original",
                             "inner.linear.parametrizations.weight.original")):   # model 1 is standardised
        assert not torch.equal(last[f"{i}.{key}"], theirs[f"model{i}.{key}"])


def _planted_statistics(tmp_path, source):
    """A copy of the source run whose GRU s1 mean and std are shifted and scaled (values no problem computes);
    returns its directory and tensors."""
    planted = tmp_path / "planted"
    shutil.copytree(source, planted)
    state = load_file(str(planted / "alignments.safetensors"))
    state["model1.mean"] = state["model1.mean"] + 5.0
    state["model1.std"] = state["model1.std"] * 3.0
    save_file(state, str(planted / "alignments.safetensors"))
    return planted, state


def test_the_standardised_alignment_keeps_its_own_mean_and_std(tmp_path, source_run):
    source, _ = source_run
    # the source's GRU s1 statistics replaced by other values: a start copies only the rotation
    planted, _ = _planted_statistics(tmp_path, source)
    config = _started(tmp_path, planted)
    problem = build_problem(config)
    a = build_alignments(config, problem)[1]
    mean, std = problem.latent_stats[1]
    assert torch.equal(a.mean, mean.to(a.mean.dtype)) and torch.equal(a.std, std.to(a.std.dtype))
    # ... and so the fingerprint does not see them either
    assert run_fingerprint(config) == run_fingerprint(_started(tmp_path, source))


def test_with_statistics_the_runs_mean_and_std_are_loaded_too(tmp_path, source_run):
    """load_alignment_init(statistics=True): the whole trained map, the source run's mean and std included
    (planted values, so they cannot be this problem's own)."""
    from llm_mas.problems.manifest import load_alignment_init

    source, _ = source_run
    planted, state = _planted_statistics(tmp_path, source)
    config = _started(tmp_path, planted)
    problem = build_problem(config)
    alignments = build_alignments(config, problem, init=False)
    for alignment, entry in zip(alignments, config.models):
        load_alignment_init(alignment, entry.alignment_init, entry.name, statistics=True)
    for i, alignment in enumerate(alignments):
        for key, value in alignment.state_dict().items():
            assert torch.equal(value, state[f"model{i}.{key}"]), key
    mean, _ = problem.latent_stats[1]
    assert not torch.equal(alignments[1].mean, mean.to(alignments[1].mean.dtype))


def test_the_fingerprint_holds_the_copied_tensors_not_the_path(tmp_path, source_run):
    source, _ = source_run
    plain = _cfg(tmp_path, "plain", [{"name": GRU0}, {"name": GRU1, "standardize": True}])
    assert not any("alignment_init" in k for k in run_fingerprint(plain)["values"])   # earlier runs unchanged
    moved = tmp_path / "elsewhere"
    shutil.copytree(source, moved)
    a, b = run_fingerprint(_started(tmp_path, source))["values"], run_fingerprint(_started(tmp_path, moved))["values"]
    assert a == b and len(a["models.0.alignment_init"]) == 16
    state = load_file(str(moved / "alignments.safetensors"))
    state["model0.linear.parametrizations.weight.original"][0, 1] += 1e-3
    save_file(state, str(moved / "alignments.safetensors"))
    c = run_fingerprint(_started(tmp_path, moved))["values"]
    assert c["models.0.alignment_init"] != a["models.0.alignment_init"]
    assert c["models.1.alignment_init"] == a["models.1.alignment_init"]


def test_a_start_by_index(tmp_path, source_run):
    source, _ = source_run
    # GRU s1 started from the source's GRU s0 by index: the tensors of model 0
    config = _cfg(tmp_path, "byindex", [{"name": GRU1, "alignment_init": f"{source}#0"}], train={"max_steps": 0})
    problem = build_problem(config)
    a = build_alignments(config, problem)[0]
    theirs = load_file(str(source / "alignments.safetensors"))
    assert all(torch.equal(v, theirs[f"model0.{k}"]) for k, v in a.state_dict().items())


def test_every_bad_start_is_reported_at_once_before_loading(tmp_path, source_run, monkeypatch):
    source, _ = source_run
    import llm_mas.run as run_module

    monkeypatch.setattr(run_module, "build_problem", lambda *a, **k: pytest.fail("loaded before the errors"))
    models = [{"name": GRU0, "alignment_init": str(tmp_path / "nowhere")},                 # no such run
              {"name": LSTM0, "alignment_init": str(source)},                              # no model of that name
              {"name": GRU1, "alignment_init": f"{source}#7"},                             # index out of range
              {"name": GRU0, "alignment_init": f"{source}#1"},                             # standardize differs
              {"name": GRU0, "alignment_init": str(source), "alignment": "cayley_x"},      # kind differs
              {"name": GRU0, "alignment_init": str(source),
               "alignment_options": {"orthogonal_map": "cayley"}},                         # option differs
              {"name": GRU1, "standardize": True, "alignment_init": str(source)}]          # k differs
    with pytest.raises(ConfigError) as e:
        preflight(_cfg(tmp_path, "bad", models, k=4))
    text = str(e.value)
    for needle in ("models.0.alignment_init", "has no alignments.json", "models.1.alignment_init",
                   f"has no model named {LSTM0!r}", "0=multiobject-gru-s0, 1=multiobject-gru-s1",
                   "models 0..1; got index 7", "models.3.alignment_init", "standardize True",
                   "models.4.alignment_init", "kind 'orthogonal'", "models.5.alignment_init",
                   "orthogonal_map", "models.6.alignment_init", "k=8, this run has k=4"):
        assert needle in text, needle
    with pytest.raises(ConfigError, match="linear_stitch"):
        preflight(_cfg(tmp_path, "stitch", [{"name": GRU0, "alignment_init": str(source)}, {"name": GRU1}],
                       intervention="linear_stitch"))


def test_a_width_that_differs_is_refused_when_the_alignments_are_built(tmp_path, source_run):
    source, _ = source_run
    # a run of a 64-wide model (its manifest and tensors) as the start of the 128-wide GRU's alignment
    narrow = tmp_path / "narrow"
    shutil.copytree(source, narrow)
    manifest = json.loads((narrow / "alignments.json").read_text())
    manifest["models"][0]["alignment"]["d"] = manifest["models"][0]["width"] = 64
    (narrow / "alignments.json").write_text(json.dumps(manifest))
    state = load_file(str(narrow / "alignments.safetensors"))
    save_file({k: v[:64, :64].contiguous() if k.startswith("model0.") else v for k, v in state.items()},
              str(narrow / "alignments.safetensors"))
    config = _cfg(tmp_path, "width", [{"name": GRU0, "alignment_init": str(narrow)}], train={"max_steps": 0})
    preflight(config)   # the width is only known once the model loads
    with pytest.raises(ConfigError, match=r"d 64 \(this run: 128\)"):
        build_alignments(config, build_problem(config))


def test_evaluate_does_not_need_the_start_any_more(tmp_path, source_run):
    source, _ = source_run
    moved = tmp_path / "source_copy"
    shutil.copytree(source, moved)
    trained = run(_started(tmp_path, moved, name="later", steps=3), log=lambda s: None)
    shutil.rmtree(moved)
    saved = json.loads((tmp_path / "later" / "fingerprint.json").read_text())["values"]
    assert "models.0.alignment_init" in saved
    again = llm_mas.evaluate(tmp_path / "later", log=lambda s: None, with_ci=False)
    for old, new in zip(trained.records, again.records):
        assert new.trial_iia == pytest.approx(old.trial_iia, abs=1e-9)


def test_a_recipe_reuses_a_started_run_by_the_tensors_it_started_from(tmp_path, source_run):
    from recipes.common.plans import same_config

    source, _ = source_run
    copy = tmp_path / "copy"
    shutil.copytree(source, copy)
    run(_started(tmp_path, copy, name="done"), log=lambda s: None)
    done = tmp_path / "done"
    assert same_config(done, _started(tmp_path, copy, name="done"))
    assert same_config(done, _started(tmp_path, source, name="done"))     # another path, the same tensors
    plain = _cfg(tmp_path, "done", [{"name": GRU0}, {"name": GRU1, "standardize": True}],
                 train={"batch_size": 64, "max_steps": 0, "eval_every": 3, "lr": 1e-2})
    assert not same_config(done, plain)                                    # a random start is another run
    state = load_file(str(copy / "alignments.safetensors"))
    state["model1.inner.linear.parametrizations.weight.original"][2, 0] += 1e-3
    save_file(state, str(copy / "alignments.safetensors"))
    assert not same_config(done, _started(tmp_path, copy, name="done"))   # the start was retrained since
    shutil.rmtree(copy)
    assert same_config(done, _started(tmp_path, source, name="done"))     # the config.yaml's start is gone


def test_compare_starts_module_models_from_an_earlier_compare(tmp_path):
    from open_fixtures import GRUNet, decision_data

    nets = [GRUNet(16, seed).eval() for seed in (0, 1)]
    data = decision_data(200, seed=5)
    fit = {"train": {"max_steps": 20, "batch_size": 64, "eval_every": 10, "lr": 1e-2}, "progress": False}
    first = llm_mas.compare(models=nets, data=data, site="rnn", k=2, names=["gru-a", "gru-b"],
                            out_dir=str(tmp_path), name="first", **fit)
    again = llm_mas.compare(models=nets, data=data, site="rnn", k=2, names=["gru-a", "gru-b"],
                            out_dir=str(tmp_path), name="again", alignment_init=tmp_path / "first",
                            train={"max_steps": 0}, progress=False)
    assert [r.trial_iia for r in again.records] == [r.trial_iia for r in first.records]
    # one entry per model: gru-b from the first run's model 0, gru-a from a random rotation
    mixed = llm_mas.compare(models=nets, data=data, site="rnn", k=2, names=["gru-a", "gru-b"],
                            out_dir=str(tmp_path), name="mixed", alignment_init=[None, f"{tmp_path / 'first'}#0"],
                            train={"max_steps": 0}, progress=False)
    models = yaml.safe_load((tmp_path / "mixed" / "config.yaml").read_text())["models"]
    assert models[0].get("alignment_init") is None and models[1]["alignment_init"].endswith("first#0")
    assert len(mixed.records) == 4
    with pytest.raises(ConfigError, match="got 1 entries for 2 models"):
        llm_mas.compare(models=nets, data=data, site="rnn", k=2, alignment_init=[None], out_dir=str(tmp_path))
