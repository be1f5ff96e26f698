"""recipes.many_models: the --smoke run end to end on 3 shipped models, the plan (like / unlike additions,
direction-budget overrides), steps to target, the clustering order on a hand-made block matrix."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest

from llm_mas.errors import DataError
from recipes import many_models
from recipes.common.clustering import cluster_order, similarity_distance
from recipes.many_models import RecipeConfig, ReferencePair, added_models, budget_overrides, steps_to_target

SHIPPED = ["multiobject-gru-s0", "multiobject-gru-s1", "multiobject-transformer-s0"]


def test_smoke_run_end_to_end(tmp_path):
    code = many_models.main(["--smoke", f"out_dir={tmp_path}", "mas_overrides=[data.n_valid=16]",
                             f"smoke_models={SHIPPED}".replace("'", "")])
    assert code == 0
    out = tmp_path / "many_models-smoke"
    for name in ("summary.md", "pairs.csv", "aggregate.csv", "matrix.csv", "clustered.png", "iia_vs_n.png",
                 "similarity.json"):
        assert (out / name).exists(), name
    with open(out / "pairs.csv") as f:
        rows = list(csv.DictReader(f))
    # the all-model run holds both reference pairs of these models; each is also trained alone
    assert sorted({(r["pair"], r["kind"]) for r in rows}) == [("gru_gru", "all"), ("gru_gru", "pairwise"),
                                                               ("gru_transformer", "all"),
                                                               ("gru_transformer", "pairwise")]
    assert all(r["status"] == "trained" and 0 <= float(r["trial_iia"]) <= 1 for r in rows)
    assert all(float(r["peak_rss_mb"]) > 0 for r in rows)
    with open(out / "matrix.csv") as f:
        assert len(list(csv.DictReader(f))) == 9
    summary = (out / "summary.md").read_text()
    assert "Smoke run" in summary and "Verdict" in summary
    # a second call reuses every finished run and trains nothing
    assert many_models.main(["--smoke", f"out_dir={tmp_path}", "mas_overrides=[data.n_valid=16]",
                             f"smoke_models={SHIPPED}".replace("'", ""), "--report"]) == 0
    with open(out / "pairs.csv") as f:
        assert {r["status"] for r in csv.DictReader(f)} == {"reused"}


def _config(**fields) -> RecipeConfig:
    models = [f"multiobject-{a}-s{s}" for a in ("gru", "lstm", "transformer") for s in range(5)]
    return RecipeConfig(models=models, reference_pairs=[
        ReferencePair("gru_gru", models[:2]), ReferencePair("gru_transformer", [models[0], models[10]])], **fields)


def test_added_models_are_nested_seeded_and_of_the_right_kind():
    config = _config()
    pair = ["multiobject-gru-s0", "multiobject-gru-s1"]
    like5 = added_models(config, pair, config.models, "like", 5, seed=0)
    like9 = added_models(config, pair, config.models, "like", 9, seed=0)
    assert like9[:3] == like5 and len(like9) == 7
    assert not any("transformer" in m or m in pair for m in like9)
    assert added_models(config, pair, config.models, "like", 11, seed=0) is None  # only 8 recurrent left
    unlike9 = added_models(config, pair, config.models, "unlike", 9, seed=0)
    assert sum("transformer" in m for m in unlike9) == 5 and len(unlike9) == 7  # 5 Transformers, then filled
    assert added_models(config, pair, config.models, "like", 5, seed=1) != like5


def test_direction_budget_is_passed_only_to_runs_that_exceed_it():
    assert budget_overrides(3, 32, "balanced") == []  # 9 directions
    assert budget_overrides(15, 32, "balanced") == ["train.directions_per_step=32",
                                                    "train.direction_sampling=balanced"]
    assert budget_overrides(15, 0, "uniform") == []


def test_plan_names_sizes_and_rows(tmp_path):
    config = _config(ns=[3, 5], seeds=[0], directions_per_step=0)
    mapping = {m: m for m in config.models}
    plans = many_models.plan(config, config.models, mapping, [], config.ns, config.seeds, tmp_path, False)
    names = [p.name for p in plans]
    assert names[0] == "joint_all_s0" and len(plans[0].config.models) == 15
    assert {"pair_gru_gru_s0", "gru_gru_like_n3_s0", "gru_gru_unlike_n5_s0",
            "gru_transformer_like_n5_s0"} <= set(names)
    run = plans[names.index("gru_gru_unlike_n5_s0")]
    assert len(run.config.models) == 5 and run.config.k == 32
    assert [(labels["direction"], s, t) for labels, s, t in run.rows] == [("a→b", 0, 1), ("b→a", 1, 0)]
    assert len(plans[0].rows) == 4  # both reference pairs, both directions


def test_plan_with_direction_budget_builds(tmp_path):
    config = _config(ns=[3], seeds=[0], directions_per_step=32)
    plans = many_models.plan(config, config.models, {m: m for m in config.models}, [], [3], [0], tmp_path, False)
    assert plans[0].config.train.directions_per_step == 32


def test_every_direction_runs_repeat_the_joint_run_without_the_budget(tmp_path):
    config = _config(ns=[3, 5], seeds=[0], directions_per_step=16, every_direction_ns=[5])
    plans = {p.name: p for p in many_models.plan(config, config.models, {m: m for m in config.models}, [],
                                                   config.ns, config.seeds, tmp_path, False)}
    budgeted, every = plans["gru_gru_like_n5_s0"], plans["gru_gru_like_n5_every_s0"]
    assert [m.name for m in every.config.models] == [m.name for m in budgeted.config.models]
    assert budgeted.config.train.directions_per_step == 16
    assert every.config.train.directions_per_step is None  # all 25 directions every step
    assert {labels["kind"] for labels, _, _ in every.rows} == {"like_every"}
    assert "gru_gru_like_n3_every_s0" not in plans
    pair = config.reference_pairs[0].models
    for kind in ("like", "unlike"):
        assert added_models(config, pair, config.models, kind + "_every", 5, seed=0) == \
            added_models(config, pair, config.models, kind, 5, seed=0)
    assert any("every_direction_ns" in problem for problem in _config(ns=[3], every_direction_ns=[5]).validate())


def test_steps_to_target_reads_the_history(tmp_path):
    key = "a->b:full:trial_iia", "b->a:full:trial_iia"
    with open(tmp_path / "history.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["step", *key])
        writer.writeheader()
        for step, ab, ba in ((0, 0.1, 0.1), (25, 0.95, 0.5), (50, 0.92, 0.91), (75, 0.99, 0.99)):
            writer.writerow({"step": step, key[0]: ab, key[1]: ba})
    assert steps_to_target(tmp_path, "a", "b", "full", 0.9) == 50
    assert math.isnan(steps_to_target(tmp_path, "a", "b", "full", 0.999))
    assert math.isnan(steps_to_target(Path(tmp_path) / "missing", "a", "b", "full", 0.9))


def test_clustering_order_on_a_block_matrix():
    # three blocks {0, 3, 6}, {1, 4}, {2, 5}, interleaved; within-block similarity high, across low;
    # the matrix is not symmetric (IIA s→t ≠ t→s) and clustering uses its symmetrized form
    groups = [0, 1, 2, 0, 1, 2, 0]
    s = np.array([[0.95 if a == b else 0.1 + 0.05 * (a + b) for b in groups] for a in groups])
    s[0, 3], s[3, 0] = 1.0, 0.8
    order, tree = cluster_order(s)
    assert sorted(order) == list(range(7))
    blocks = [groups[i] for i in order]
    assert blocks in ([0, 0, 0, 1, 1, 2, 2], [0, 0, 0, 2, 2, 1, 1], [1, 1, 2, 2, 0, 0, 0],
                      [2, 2, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 2, 2], [2, 2, 0, 0, 0, 1, 1])
    # merges: the three blocks form first (at distance 1 − 0.9 for {0, 3}, 0.05 for the others)
    assert tree.shape == (6, 4) and np.all(tree[:4, 2] <= 0.1 + 1e-12)
    distance = similarity_distance(s)
    assert distance[0, 3] == pytest.approx(0.1) and np.allclose(distance, distance.T)
    s[1, 2] = np.nan
    with pytest.raises(DataError, match="NaN"):
        cluster_order(s)


def test_arch_sites_and_alone_runs(tmp_path):
    config = _config(ns=[3], seeds=[0, 1], arch_sites={"transformer": "layer0"}, alone=True)
    plans = {p.name: p for p in many_models.plan(config, config.models, {m: m for m in config.models}, [],
                                                   config.ns, config.seeds, tmp_path, False)}
    sites = {m.name: m.site for m in plans["joint_all_s0"].config.models}
    assert sites["multiobject-transformer-s3"] == "layer0" and sites["multiobject-lstm-s2"] == "hidden"
    assert {m.site for m in plans["gru_transformer_like_n3_s0"].config.models} == {"hidden", "layer0"}
    alone = plans["alone_lstm-s4_s1"]
    assert [m.name for m in alone.config.models] == ["multiobject-lstm-s4"] and alone.config.seed == 1
    assert sum(name.startswith("alone_") for name in plans) == 30
    assert many_models.site_label(config) == "hidden (transformer: layer0)"
    assert any("arch_sites" in p and "'rnn'" in p for p in _config(arch_sites={"rnn": "layer0"}).validate())


def test_mean_matrix_over_seeds_and_own_directions():
    n = 3
    names = ["multiobject-gru-s0", "multiobject-gru-s1", "multiobject-transformer-s0"]
    a, b = np.full((n, n), 0.5), np.full((n, n), 0.7)
    a[0, 1], b[0, 1] = 0.9, 1.0
    runs = [(0, a, np.full((n, n, 2), np.nan)), (1, b, np.full((n, n, 2), np.nan))]
    mean, cis = many_models.mean_matrix(runs, n)
    assert mean[0, 1] == pytest.approx(0.95) and mean[2, 2] == pytest.approx(0.6)
    # two seeds: mean ± t_{0.975, 1} · s / √2 = 0.6 ± 12.706 · 0.1414 / 1.414, clipped to [0, 1]
    assert cis[2, 2, 0] == 0.0 and cis[2, 2, 1] == 1.0
    assert cis[0, 1, 0] == pytest.approx(0.95 - 12.7062 * 0.05, abs=1e-3)
    one, one_cis = many_models.mean_matrix(runs[:1], n)
    assert one is a and np.isnan(one_cis).all()
    rows = many_models.convergence_rows(runs, names, [], {})
    assert rows[0]["own_joint"] == pytest.approx(0.6) and math.isnan(rows[0]["own_alone"])
    assert rows[0]["cross_as_source"] == pytest.approx((0.95 + 0.6) / 2)
    lines = many_models.block_lines(runs, names)
    assert lines[2].startswith("| 0 | 0.700 |") and lines[2].endswith("| 0.500 | 1/2 |")


def test_outputs_are_rewritten_after_runs_that_trained_and_once_at_the_end(monkeypatch, tmp_path):
    """--report reuses every run: one rewrite (figures take seconds each), not one per run."""
    from types import SimpleNamespace

    from recipes.common.plans import RunOutcome

    statuses = iter(["reused", "trained", "reused", "failed", "reused", "reused"])

    def fake_execute(plans, search_dirs, log, selected):
        return {plans[0].name: RunOutcome(plans[0].name, next(statuses))}

    monkeypatch.setattr(many_models, "execute_plan", fake_execute)
    plans = [SimpleNamespace(name=f"run{i}", config=SimpleNamespace(models=[0], out_dir=str(tmp_path),
                                                                    name=f"run{i}")) for i in range(6)]
    seen = []
    many_models.execute_with_cost(plans, [], None, lambda o: seen.append([o[p.name].status for p in plans]),
                                  log=lambda s: None)
    # after run1 (trained), after run3 (failed), and once at the end for the reused tail
    assert [s.count("pending") for s in seen] == [4, 2, 0]
    assert seen[-1] == ["reused", "trained", "reused", "failed", "reused", "reused"]
    # every run reused (--report): exactly one rewrite
    statuses = iter(["reused"] * 6)
    seen.clear()
    many_models.execute_with_cost(plans, [], None, lambda o: seen.append(1), log=lambda s: None)
    assert seen == [1]


CONFIGS = Path(__file__).resolve().parents[1] / "recipes" / "configs"


def _planned(name: str, out: Path):
    """A shipped recipe config (validated) and its planned MAS configs by run name."""
    from llm_mas.config import from_dict, load_yaml

    config = from_dict(RecipeConfig, load_yaml(CONFIGS / f"{name}.yaml"))
    assert config.validate() == []
    plans = many_models.plan(config, config.models, {m: m for m in config.models}, config.mas_overrides,
                             config.ns, config.seeds, out / name, False,
                             all_model_overrides=config.all_model_overrides)
    return config, {p.name: p.config for p in plans}


def test_the_tuned_config_changes_only_its_all_model_runs(tmp_path):
    """many_models_tuned.yaml reuses many_models_standardized.yaml's alone and pair runs (found by config in
    its reuse_dirs): those runs must resolve to identical MAS configs, and only the all-model runs train
    longer, with own directions weighted and a cosine-decayed rate."""
    from llm_mas.config import to_dict
    from recipes.common.plans import MAS_IGNORED_KEYS, _comparable

    tuned_config, tuned = _planned("many_models_tuned", tmp_path)
    _, standardized = _planned("many_models_standardized", tmp_path)
    assert "runs/many_models_standardized/mas" in tuned_config.reuse_dirs
    shared = [n for n in tuned if not n.startswith("joint_all_")]
    assert len(shared) == 15 * 3 + 3 * 3 and set(shared) <= set(standardized)
    for name in shared:
        assert _comparable(to_dict(tuned[name]), MAS_IGNORED_KEYS) == \
            _comparable(to_dict(standardized[name]), MAS_IGNORED_KEYS), name
    for seed in (0, 1, 2):
        joint, before = tuned[f"joint_all_s{seed}"].train, standardized[f"joint_all_s{seed}"].train
        assert (joint.max_steps, joint.own_weight, joint.lr_schedule, joint.lr_min_ratio) == (600, 10, "cosine", 0.05)
        assert (before.max_steps, before.own_weight, before.lr_schedule) == (300, 1, "constant")


def test_threads_are_checked_and_set(tmp_path, monkeypatch):
    assert any("threads must be an integer >= 1" in p for p in _config(threads=0).validate())
    assert _config().threads == 1 and not any("threads" in p for p in _config(threads=2).validate())
    import torch

    seen = []
    monkeypatch.setattr(torch, "set_num_threads", seen.append)

    class Stop(Exception):
        pass

    def stop(*args, **kwargs):
        raise Stop

    monkeypatch.setattr(many_models, "resolve_models", stop)
    from types import SimpleNamespace

    call = SimpleNamespace(config=_config(threads=2), run_dir=tmp_path, smoke=False,
                           args=SimpleNamespace(models_from_scratch=False))
    with pytest.raises(Stop):
        many_models._run(call)
    assert seen == [2]


def test_start_from_alone_orders_the_runs_and_is_checked(tmp_path):
    config = _config(ns=[3], seeds=[0], alone=True, start_from_alone=True)
    names = [p.name for p in many_models.plan(config, config.models, {m: m for m in config.models}, [],
                                              config.ns, config.seeds, tmp_path, False)]
    assert names.index("joint_all_s0") > max(i for i, n in enumerate(names) if n.startswith("alone_"))
    plain = _config(ns=[3], seeds=[0], alone=True)
    assert [p.name for p in many_models.plan(plain, plain.models, {m: m for m in plain.models}, [], plain.ns,
                                             plain.seeds, tmp_path, False)][0] == "joint_all_s0"
    assert any("start_from_alone" in p and "alone: true" in p for p in _config(start_from_alone=True).validate())


def test_start_from_alone_end_to_end(tmp_path):
    """Smoke size: the all-model run starts each model from its run alone (config.yaml names them, the
    fingerprint holds their tensors' digests); asked for alone, it is blocked until those runs have run."""
    import json

    import yaml

    from llm_mas.problems.manifest import alignment_init_digest

    args = [f"out_dir={tmp_path}", "mas_overrides=[data.n_valid=16]", "alone=true", "start_from_alone=true",
            f"smoke_models={SHIPPED}".replace("'", "")]
    assert many_models.main(["--smoke", "--only", "joint_all_s0", *args]) == 0
    out = tmp_path / "many_models-smoke"
    assert not (out / "mas" / "joint_all_s0" / "results.json").exists()
    with open(out / "pairs.csv") as f:
        joint_rows = [r for r in csv.DictReader(f) if r["kind"] == "all"]
    assert joint_rows and all(r["status"] == "blocked" and "start_from_alone: alone_gru-s0_s0, alone_gru-s1_s0, "
                              "alone_transformer-s0_s0 not finished" in r["run_dir"] for r in joint_rows)
    assert many_models.main(["--smoke", *args]) == 0
    joint = out / "mas" / "joint_all_s0"
    models = yaml.safe_load((joint / "config.yaml").read_text())["models"]
    starts = [m["alignment_init"] for m in models]
    assert starts == [str(out / "mas" / f"alone_{many_models.short(m)}_s0") for m in SHIPPED]
    values = json.loads((joint / "fingerprint.json").read_text())["values"]
    assert [values[f"models.{i}.alignment_init"] for i in range(3)] == \
        [alignment_init_digest(s, m) for s, m in zip(starts, SHIPPED)]


def test_own_check_scores_both_alignments_on_the_same_fresh_pairs(tmp_path, capsys):
    """Smoke size, alone: true, own_check_pairs: each model's alignment from the all-model run and from its
    run alone, scored on 16 fresh pairs (data seed 90 000): the rows equal a by-hand evaluation of each
    alignment on that problem; a --report rescoring nothing new reads them back from own_check.json."""
    from safetensors.torch import load_file

    from llm_mas.config import from_dict, to_dict
    from llm_mas.run import build_alignments, build_problem
    from llm_mas.run_config import MASConfig

    args = ["--smoke", f"out_dir={tmp_path}", "mas_overrides=[data.n_valid=16]", "alone=true", "own_check_pairs=4096",
            f"smoke_models={SHIPPED}".replace("'", "")]
    assert many_models.main(args) == 0
    out = tmp_path / "many_models-smoke"
    assert capsys.readouterr().out.count("own check:") == 3
    with open(out / "own_check.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["model"], r["seed"]) for r in rows] == [(many_models.short(m), "0") for m in SHIPPED] + \
        [(many_models.short(m), "pooled") for m in SHIPPED]
    assert all(int(r["n"]) == many_models.SMOKE_OWN_CHECK_PAIRS for r in rows)
    for row in rows[:3]:
        alone_dir = out / "mas" / f"alone_{row['model']}_s0"
        data = to_dict(from_dict(MASConfig, __import__("yaml").safe_load((alone_dir / "config.yaml").read_text())))
        data.update(seed=many_models.OWN_CHECK_SEED, progress=False)
        data["data"]["n_valid"] = many_models.SMOKE_OWN_CHECK_PAIRS
        means = {}
        for label, ref, index in (("joint", out / "mas" / "joint_all_s0", SHIPPED.index(f"multiobject-{row['model']}")),
                                  ("alone", alone_dir, 0)):
            config = from_dict(MASConfig, data)
            problem = build_problem(config, log=lambda s: None)
            (alignment,) = build_alignments(config, problem, init=False)
            saved = load_file(str(ref / "alignments.safetensors"))     # the whole trained map, statistics too
            alignment.load_state_dict({k: saved[f"model{index}.{k}"] for k in alignment.state_dict()})
            (record,) = problem.evaluate([alignment.materialize()])
            means[label] = record.trial_iia
        assert float(row["joint"]) == pytest.approx(means["joint"], abs=1e-12)
        assert float(row["alone"]) == pytest.approx(means["alone"], abs=1e-12)
        assert float(row["diff"]) == pytest.approx(means["joint"] - means["alone"], abs=1e-12)
        assert int(row["joint_only"]) - int(row["alone_only"]) == round(16 * (means["joint"] - means["alone"]))
    for row in rows:
        p, diff = float(row["p"]), float(row["diff"])
        assert row["verdict"] == ("level with alone" if p >= 0.05 else "below alone" if diff < 0 else "above alone")
    summary = (out / "summary.md").read_text()
    assert "own direction on fresh pairs" in summary and "under --smoke" in summary
    before = (out / "own_check.csv").read_text()
    assert many_models.main([*args, "--report"]) == 0
    assert "own check:" not in capsys.readouterr().out and (out / "own_check.csv").read_text() == before


def test_fresh_cross_on_the_runs_own_pairs_reproduces_its_validation(tmp_path, monkeypatch):
    """fresh_cross_archs naming every architecture, with the fresh pairs' seed moved onto the run's own
    (OWN_CHECK_SEED = 0) and as many pairs as it validated on: the rescored problem is the run's validation
    problem, so every cross direction scores exactly what the run reported."""
    import json

    monkeypatch.setattr(many_models, "OWN_CHECK_SEED", 0)
    args = ["--smoke", f"out_dir={tmp_path}", "mas_overrides=[data.n_valid=16]", "alone=true", "own_check_pairs=64",
            "fresh_cross_archs=[gru,transformer]", f"smoke_models={SHIPPED}".replace("'", "")]
    assert many_models.main(args) == 0
    out = tmp_path / "many_models-smoke"
    with open(out / "fresh_cross.csv") as f:
        rows = list(csv.DictReader(f))
    reported = {(many_models.short(r["source"]), many_models.short(r["target"])): r["trial_iia"]
                for r in json.loads((out / "mas" / "joint_all_s0" / "results.json").read_text())
                if r["source"] != r["target"]}
    assert len(rows) == 6 and {(r["source"], r["target"]) for r in rows} == set(reported)
    for r in rows:
        assert int(r["n"]) == 16 and float(r["trial_iia"]) == reported[(r["source"], r["target"])]
        assert float(r["trial_iia_lo"]) <= float(r["trial_iia"]) <= float(r["trial_iia_hi"])
    assert "Cross directions among gru, transformer models on fresh pairs" in (out / "summary.md").read_text()


def test_own_check_needs_the_runs_alone():
    assert "own_check_pairs needs alone: true" in " ".join(_config(own_check_pairs=64).validate())
    assert "own_check_pairs must be >= 0" in " ".join(_config(own_check_pairs=-1, alone=True).validate())
    assert _config(own_check_pairs=64, alone=True).validate() == []
    problems = " ".join(_config(fresh_cross_archs=["rnn"], alone=True).validate())
    assert "fresh_cross_archs: no model of architecture ['rnn']" in problems and "needs own_check_pairs" in problems


def test_the_from_alone_config_is_the_tuned_one_started_from_the_runs_alone(tmp_path):
    from llm_mas.config import load_yaml

    tuned, alone = (load_yaml(CONFIGS / f"many_models_{n}.yaml") for n in ("tuned", "from_alone"))
    assert alone.pop("start_from_alone") is True and alone.pop("name") == "many_models_from_alone"
    tuned.pop("name")
    assert alone == tuned
    config = RecipeConfig(**{k: v for k, v in load_yaml(CONFIGS / "many_models_from_alone.yaml").items()
                             if k not in ("reference_pairs", "similarity")})
    assert config.validate() == [] and config.alone and config.start_from_alone


@pytest.mark.parametrize("before, after, added, changed", [
    ("from_alone", "from_alone_warmup", "train.lr_warmup=60", {"lr_warmup": (0, 60)}),
    ("from_alone_warmup", "from_alone_keep", "train.own_keep=0.02", {"own_keep": (None, 0.02)}),
    ("from_alone_keep", "from_alone_relax", "train.own_relax=true", {"own_relax": (False, True)})])
def test_a_config_built_on_another_changes_its_all_model_runs_by_one_key(tmp_path, before, after, added, changed):
    """many_models_from_alone_warmup.yaml is many_models_from_alone.yaml with a 60-step warm-up in its
    all-model runs, and many_models_from_alone_keep.yaml is the warm-up one with own_keep: the alone and pair
    runs resolve to the same MAS configs (so they are reused), and the all-model runs' trainer differs in
    that one key."""
    import dataclasses

    from llm_mas.config import load_yaml

    old, new = (load_yaml(CONFIGS / f"many_models_{n}.yaml") for n in (before, after))
    assert new.pop("name") == f"many_models_{after}" and old.pop("name") == f"many_models_{before}"
    assert new.pop("all_model_overrides") == [*old.pop("all_model_overrides"), added]
    assert new == old

    (_, plans_before), (_, plans_after) = (_planned(f"many_models_{n}", tmp_path) for n in (before, after))
    assert plans_before.keys() == plans_after.keys()
    (key, (was, now)), = changed.items()
    for name, config in plans_before.items():
        if name.startswith("joint_all_"):
            assert getattr(config.train, key) == was and getattr(plans_after[name].train, key) == now
            assert dataclasses.replace(plans_after[name].train, **{key: was}) == config.train
        else:
            assert plans_after[name].train == config.train and plans_after[name].models == config.models, name


def test_aggregate_intervals_are_clipped_to_proportions():
    """Three seeds at 0.98, 0.99 and 1.00 (each the mean of two directions): the t interval's upper bound
    is 1.0238 unclipped (mean 0.99, sd 0.01, t(0.975, 2) = 4.303), so it is clipped to 1; the lower bound
    0.9652 is kept."""
    rows = [{"pair": "p", "kind": "pairwise", "n": 2, "seed": s, "trial_iia": v, "steps_to_target": math.nan,
             "seconds": 1.0, "peak_rss_mb": 1.0, "peak_rss_above_start_mb": 1.0}
            for s, pair in enumerate([(0.97, 0.99), (0.99, 0.99), (1.0, 1.0)]) for v in pair]
    (row,) = many_models.aggregate(rows)
    assert row["trial_iia"] == pytest.approx(0.99)
    assert row["trial_iia_lo"] == pytest.approx(0.99 - 4.302652729911275 * 0.01 / math.sqrt(3))
    assert row["trial_iia_hi"] == 1.0 and row["reached_target"] == "0/3"
