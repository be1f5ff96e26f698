"""The comparison recipes (stitching_vs_mas, clmas, cross_task) and their shared orchestration
(recipes.common): smoke runs end to end on random-weight stand-in checkpoints, restart/reuse,
claim verdicts on hand-made rows, config errors."""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

import pytest

from llm_mas.errors import ConfigError, DataError
from llm_mas.models.registry import below_bar
from llm_mas.presets import resolve_preset
from llm_mas.problems import Record
from recipes import clmas, cross_task, stitching_vs_mas
from recipes.common.claims import format_ci_comparison
from recipes.common.models import resolve_models, scratch_checkpoints
from recipes.common.plans import (
    PlannedRun,
    RunOutcome,
    direction_row,
    execute_plan,
    find_finished_run,
    mas_config_from_preset,
    plan_rows,
    same_config,
)
from recipes.common.report import early_stop_note, markdown_table

REPO = Path(__file__).resolve().parent.parent
RECIPES = {"stitching_vs_mas": stitching_vs_mas, "clmas": clmas, "cross_task": cross_task}


def read_csv(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def smoke(name: str, tmp_path: Path, *extra: str) -> Path:
    recipe = RECIPES[name]
    code = recipe.main([str(REPO / f"recipes/configs/{name}.yaml"), "--smoke", "--models-from-scratch",
                        f"out_dir={tmp_path}", "reuse_dirs=[]", *extra])
    assert code == 0
    return tmp_path / f"{name}-smoke"


# ----------------------------------------------------------------------------------- presets
@pytest.mark.parametrize("name", ["stitching_vs_mas", "clmas", "cross_task"])
def test_preset_first_line_is_the_command_and_it_loads(name):
    from llm_mas.config import load_config

    path = REPO / f"recipes/configs/{name}.yaml"
    assert path.read_text().splitlines()[0] == f"# python -m recipes.{name} recipes/configs/{name}.yaml"
    load_config(RECIPES[name].RecipeConfig, path)


def test_recipe_config_errors_are_reported_at_once(tmp_path, capsys):
    recipe = stitching_vs_mas
    code = recipe.main([str(REPO / "recipes/configs/stitching_vs_mas.yaml"), f"out_dir={tmp_path}",
                        "methods=[mas,stiching]", "ks=[0]", "models=[a]", "mas_preset=nope.yaml"])
    assert code == 2
    err = capsys.readouterr().err
    for needle in ("stiching", "ks", "exactly two models", "nope.yaml"):
        assert needle in err, err
    code = clmas.main([str(REPO / "recipes/configs/clmas.yaml"), f"out_dir={tmp_path}",
                                      "epsilons=[1.5]"])
    assert code == 2 and "1.5" in capsys.readouterr().err
    code = clmas.main([f"out_dir={tmp_path}", "--models-from-scratch",
                                      "--only", "mas_k64,nope"])
    err = capsys.readouterr().err
    assert code == 2 and "nope" in err and "clmas_eps0.89_k64" in err   # default config; valid names listed


def test_missing_models_name_the_way_out(tmp_path):
    with pytest.raises(ConfigError, match="no-such-gru-s0.*--models-from-scratch"):
        resolve_models(["no-such-gru-s0"])
    mapping = resolve_models(["rounding-gru-s3"], tmp_path)
    assert (Path(mapping["rounding-gru-s3"]) / "model.safetensors").exists()
    with pytest.raises(ConfigError, match="task-arch-seed"):
        scratch_checkpoints(["gru"], tmp_path)


# ----------------------------------------------------------------------------------- plans
def test_stitching_plan_covers_every_method_and_k_with_claim_runs_first(tmp_path):
    recipe = stitching_vs_mas
    cfg = recipe.RecipeConfig(ks=[1, 2, 4, 16])
    plans = recipe.plan(cfg, ["a-dir", "b-dir"], cfg.ks, [], tmp_path)
    names = [p.name for p in plans]
    assert names[:6] == ["stitch_0to1_k2", "stitch_1to0_k2", "das_m0_k4", "das_m1_k4", "mas_k2", "mas_k4"]
    assert len(names) == len(set(names)) == 4 * 7 + 2 * 3  # UniMAS at unimas_ks = 2, 4, 16
    by = {p.name: p.config for p in plans}
    assert by["mas_k16"].directions == "all" and by["mas_k16"].k == 16 and len(by["mas_k16"].models) == 2
    assert [m.name for m in by["das_m1_k1"].models] == ["b-dir"]
    assert by["stitch_1to0_k4"].intervention == "stitch" and by["stitch_1to0_k4"].directions == [[1, 0]]
    assert by["linear_0to1_k2"].intervention == "linear_stitch"
    assert by["linear_0to1_k2"].directions == [[0, 1]]
    assert by["mas_k2"].data.n_train == 10_000  # from the preset
    uni = by["unimas_1to0_k16"]
    assert uni.intervention == "interchange" and uni.directions == [[1, 0], [0, 0]] and uni.k == 16
    assert uni.train_directions() == [(1, 0), (0, 0)] and "unimas_0to1_k1" not in by


def test_clmas_plan_marks_model_1_inaccessible(tmp_path):
    recipe = clmas
    cfg = recipe.RecipeConfig()
    by = {p.name: p.config for p in recipe.plan(cfg, ["a", "b"], [], tmp_path)}
    assert sorted(by) == sorted(["mas_k64", "clmas_eps0.5_k64", "clmas_eps0.89_k64", "clmas_eps0.94_k64",
                                 "latent_stitch_k128", "behavioural_stitch_k128",
                                 "reverse_behavioural_stitch_k128", "random_alignment_k64",
                                 "untrained_model_k64", "clmas_eps0.5_k64_match-phase-count",
                                 "clmas_eps0.89_k64_match-phase-count", "clmas_eps0.94_k64_match-phase-count",
                                 "latent_stitch_k128_match-phase-count"])
    partial = by["clmas_eps0.89_k64_match-phase-count"]
    assert partial.cl.match_on == ["phase", "count"] and partial.cl.inaccessible == [1]
    assert partial.cl.epsilon == 0.89 and by["clmas_eps0.89_k64"].cl.match_on is None
    cl = by["clmas_eps0.89_k64"]
    assert cl.cl.inaccessible == [1] and cl.cl.epsilon == 0.89 and cl.directions == "all"
    assert cl.train_directions() == [(0, 0), (1, 0)] and cl.cl_directions() == [(0, 1), (1, 1)]
    latent = by["latent_stitch_k128"]
    assert latent.intervention == "stitch"
    assert latent.train_directions() == [] and latent.cl_directions() == [(0, 1)]
    behav = by["behavioural_stitch_k128"]
    assert behav.train_directions() == [(0, 1)] and behav.cl_directions() == []
    reverse = by["reverse_behavioural_stitch_k128"]
    assert reverse.intervention == "stitch" and reverse.train_directions() == [(1, 0)]
    assert by["random_alignment_k64"].train.max_steps == 0
    assert [m.untrained for m in by["untrained_model_k64"].models] == [False, True]
    assert [m.untrained for m in by["mas_k64"].models] == [False, False]


def test_cross_task_plan_maps_count_onto_arithmetic_variables(tmp_path):
    recipe = cross_task
    cfg = recipe.RecipeConfig()
    mapping = {m: m for m in cfg.all_models()}
    plans = {p.name: p for p in recipe.plan(cfg, mapping, [], tmp_path)}
    assert list(plans) == ["within_multiobject", "das_multiobject", "das_rounding", "das_modulo",
                           "cross_multiobject_rounding", "cross_multiobject_modulo", "cross_rounding_modulo",
                           "count_vs_remops", "count_vs_cumuval", "count_vs_cumuval_1to10"]
    remops = plans["count_vs_remops"].config
    assert remops.variables == ["count"] and remops.models[1].variable_map == {"count": "remaining_ops"}
    assert plans["count_vs_cumuval"].config.models[1].variable_map == {"count": "cumulative_value"}
    restricted = plans["count_vs_cumuval_1to10"]
    assert not restricted.blocked and list(restricted.config.data.value_range) == [1, 10]
    assert restricted.config.models[1].variable_map == {"count": "cumulative_value"}
    assert plans["count_vs_cumuval"].config.data.value_range is None


# ----------------------------------------------------------------------------------- claims on hand-made rows
def _row(method, k, direction, iia, half=0.01, **extra):
    return {"method": method, "k": k, "direction": direction, "trial_iia": iia, "trial_iia_lo": iia - half,
            "trial_iia_hi": iia + half, **extra}


def test_stitching_claims_follow_the_numbers():
    recipe = stitching_vs_mas
    rows = [_row("stitch", 2, "0→1", 0.99), _row("stitch", 2, "1→0", 0.97), _row("mas", 2, "0→1", 0.6),
            _row("mas", 2, "1→0", 0.5), _row("mas", 4, "0→1", 0.95), _row("mas", 4, "1→0", 0.93),
            _row("das", 4, "0→0", 0.97), _row("das", 4, "1→1", 0.95)]
    assert [c.holds for c in recipe.claims(rows)] == [True, True, True]
    rows[1]["trial_iia"] = 0.90          # one stitch direction not near-perfect
    rows[3]["trial_iia"] = 0.99          # MAS above stitching in 1→0
    rows[6]["trial_iia"] = 0.5           # DAS far from MAS
    assert [c.holds for c in recipe.claims(rows)] == [False, False, False]
    assert [c.holds for c in recipe.claims(rows[:1])] == [None, None, None]
    assert recipe.pivot(rows)[0]["stitch 0→1"] == 0.99


def test_clmas_claims_follow_the_numbers():
    recipe = clmas

    def cell(method, direction, iia, eps=None):
        return _row(method, 0, direction, iia, epsilon=eps, trained_0to1_by="x")

    rows = [cell("mas", "accessible 1→0", 0.9), cell("latent_stitch", "inaccessible 0→1", 0.3),
            cell("behavioural_stitch", "inaccessible 0→1", 0.5),
            cell("reverse_behavioural_stitch", "inaccessible 0→1", 0.2)]
    for eps, inacc, acc in ((0.5, 0.6, 0.88), (0.89, 0.7, 0.93)):
        rows += [cell("clmas", "inaccessible 0→1", inacc, eps), cell("clmas", "accessible 1→0", acc, eps)]
    assert [c.holds for c in recipe.claims(rows, [0.5, 0.89])] == [True, True, True]
    rows[4]["trial_iia"] = 0.4  # ε = 0.5: above the stitches without access, below the one with access
    rows[5]["trial_iia"] = 0.7  # ε = 0.5 far from MAS in the accessible direction
    no_access, with_access, accessible = recipe.claims(rows, [0.5, 0.89])
    assert (no_access.holds, with_access.holds, accessible.holds) == (True, False, False)
    assert "ε=0.89" in with_access.evidence and "CIs disjoint" in with_access.evidence
    rows[4]["trial_iia"] = 0.25  # now below latent stitching too
    assert recipe.claims(rows, [0.5, 0.89])[0].holds is False
    assert [c.holds for c in recipe.claims(rows, [0.94])] == [None, None, None]
    # CLMAS with partially matched CL targets gets its own three verdicts, judged on its own rows
    rows.append(cell("latent_stitch_partial_match", "inaccessible 0→1", 0.33))
    for eps, inacc, acc in ((0.5, 0.45, 0.9), (0.89, 0.35, 0.9)):
        rows += [cell("clmas_partial_match", "inaccessible 0→1", inacc, eps),
                 cell("clmas_partial_match", "accessible 1→0", acc, eps)]
    for r in rows:
        r["cl_match_on"] = "phase,count" if r["method"].endswith("_partial_match") else ""
    verdicts = recipe.claims(rows, [0.5, 0.89])
    assert len(verdicts) == 6 and "matched on phase,count" in verdicts[3].text
    assert [c.holds for c in verdicts[3:]] == [True, False, True]
    assert [c.holds for c in recipe.claims([r for r in rows if r["method"] != "clmas"], [0.5, 0.89])] == \
        [True, False, True]
    assert "same CL targets" in verdicts[3].evidence and "0.35" in verdicts[3].evidence
    rows[-4]["trial_iia"] = 0.32  # ε = 0.5 now below the latent stitch with the same targets (0.33)
    assert recipe.claims(rows, [0.5, 0.89])[3].holds is False


def test_cross_task_claims_follow_the_numbers():
    recipe = cross_task
    cfg = recipe.RecipeConfig()

    def rows_of(comparison, group, **iia):
        return [{"comparison": comparison, "group": group, "model_a": "a", "model_b": "b",
                 "status": "trained", "direction": d.replace("_", "→"), "trial_iia": v, "trial_iia_lo": v,
                 "trial_iia_hi": v}
                for d, v in iia.items()]

    rows = (rows_of("within multiobject", "within", A_B=0.9, B_A=0.8)
            + rows_of("DAS rounding", "das", A_A=0.95) + rows_of("DAS modulo", "das", A_A=0.9)
            + rows_of("multiobject vs rounding", "cross", A_B=0.5, B_A=0.6)
            + rows_of("multiobject vs modulo", "cross", A_B=0.4, B_A=0.4)
            + rows_of("rounding vs modulo", "cross", A_B=0.3, B_A=0.5)
            + rows_of("count vs remaining_ops", "arithmetic", A_B=0.7, B_A=0.6)
            + rows_of("count vs cumulative_value", "arithmetic", A_B=0.2, B_A=0.3)
            + rows_of("count vs cumulative_value (1..10)", "arithmetic", A_B=0.4, B_A=0.5))
    lines = recipe.summarise(rows)
    assert {li["comparison"]: li["cross mean"] for li in lines}["within multiobject"] == pytest.approx(0.85)
    assert [c.holds for c in recipe.claims(lines, cfg)] == [True, True]
    rows[-1]["trial_iia"] = rows[-2]["trial_iia"] = 0.9        # restricted above RemOps
    rows[8]["trial_iia"] = rows[9]["trial_iia"] = 0.99         # rounding vs modulo above DAS modulo
    assert [c.holds for c in recipe.claims(recipe.summarise(rows), cfg)] == [False, False]
    assert [c.holds for c in recipe.claims(recipe.summarise(rows[:10]), cfg)] == [False, None]


# ----------------------------------------------------------------------------------- common helpers
def test_ci_comparison_and_table_formatting():
    a, b = {"trial_iia": 0.9, "trial_iia_lo": 0.85, "trial_iia_hi": 0.95}, {"trial_iia": 0.5}
    assert format_ci_comparison(a, {**b, "trial_iia_lo": 0.4, "trial_iia_hi": 0.6}).endswith("(CIs disjoint)")
    assert format_ci_comparison(a, {**b, "trial_iia_lo": 0.4, "trial_iia_hi": 0.88}).endswith("(CIs overlap)")
    assert format_ci_comparison(a, {"trial_iia": math.nan}) == "pending"
    table = markdown_table([{"x": 0.12345, "y": math.nan}], ["x", "y"])
    assert table.splitlines()[-1] == "| 0.123 | – |"


def test_direction_row_of_pending_and_unknown_directions():
    pending = direction_row(RunOutcome("r", "pending"), 0, 1)
    assert math.isnan(pending["trial_iia"]) and pending["status"] == "pending"

    class Result:
        variables = ["full"]
        run_dir = "somewhere"
        records = [Record.from_dict({"source_index": 0, "target_index": 0, "variable": "full", "source": "a",
                                     "target": "a", "trained": True, "trial_iia": 0.5, "trial_iia_ci": [0.4, 0.6],
                                     "token_iia": 0.7, "loss": 0.9, "n_pairs": 10})]

    row = direction_row(RunOutcome("r", "trained", Result(), Path("somewhere"), {"best_step": 3}), 0, 0)
    assert (row["trial_iia"], row["trial_iia_lo"], row["best_step"]) == (0.5, 0.4, 3)
    with pytest.raises(DataError, match="0 -> 1"):
        direction_row(RunOutcome("r", "trained", Result(), Path("somewhere")), 0, 1)


def test_runs_on_models_below_the_accuracy_bar_are_blocked(tmp_path, monkeypatch):
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    (shipped / "manifest.json").write_text(json.dumps({"models": {
        "weak-gru-s0": {"path": "weak", "passes_bar": False, "below_bar": {"count": ["4", "9"]}},
        "good-gru-s0": {"path": "good", "passes_bar": True}}}))
    monkeypatch.setenv("LLM_MAS_MODELS_DIR", str(shipped))
    assert below_bar("weak-gru-s0") == "count 4, 9"
    assert below_bar("good-gru-s0") == "" and below_bar("some/directory") == ""
    cfg = mas_config_from_preset(resolve_preset("das_gru"), [], name="weak", out_dir=str(tmp_path),
                                 models=[{"name": "weak-gru-s0"}])
    logged = []
    outcome = execute_plan([PlannedRun(cfg, [({}, 0, 0)])], log=logged.append)["weak"]
    assert outcome.status == "blocked"
    assert "weak-gru-s0 is below the 0.99 accuracy bar on count 4, 9" in outcome.message
    assert not (tmp_path / "weak").exists()      # nothing was run


@pytest.mark.slow
def test_runs_are_reused_by_config_and_failures_do_not_stop_the_plan(tmp_path):
    models = scratch_checkpoints(["multiobject-gru-s0"], tmp_path / "models")
    tiny = ["data.n_train=16", "data.n_valid=8", "train.max_steps=1", "train.batch_size=8",
            "eval.batch_size=32"]

    def cfg(name, out, site="hidden", **fields):
        return mas_config_from_preset(resolve_preset("das_gru"), tiny, name=name, out_dir=str(out),
                                      progress=False, **fields,
                                      models=[{"name": models["multiobject-gru-s0"], "site": site}])

    first = PlannedRun(cfg("das_k2", tmp_path / "elsewhere", k=2), [({"m": "das"}, 0, 0)])
    broken = PlannedRun(cfg("broken", tmp_path / "own", site="no.such.module", k=2), [({"m": "x"}, 0, 0)])
    blocked = PlannedRun(cfg("blocked", tmp_path / "own", k=3), [({"m": "y"}, 0, 0)], blocked="core lacks it")
    logged = []
    outcomes = execute_plan([first, broken, blocked], log=logged.append)
    assert [o.status for o in outcomes.values()] == ["trained", "failed", "blocked"]
    assert "no.such.module" in outcomes["broken"].message
    rows = plan_rows([first, broken, blocked], outcomes)
    assert rows[0]["status"] == "trained" and 0 <= rows[0]["trial_iia"] <= 1
    assert math.isnan(rows[1]["trial_iia"]) and rows[2]["status"] == "blocked"
    # the same config under another name and directory is found in a search directory and reused
    again = cfg("renamed", tmp_path / "own", k=2)
    assert find_finished_run(again, [tmp_path / "elsewhere"]) == tmp_path / "elsewhere" / "das_k2"
    assert same_config(tmp_path / "elsewhere" / "das_k2", again)
    assert not same_config(tmp_path / "elsewhere" / "das_k2", cfg("das_k2", tmp_path, k=3))
    outcomes = execute_plan([PlannedRun(again, first.rows)], [tmp_path / "elsewhere"], log=logged.append)
    assert outcomes["renamed"].status == "reused"
    # a model retrained after the run finished makes the run stale: not reused
    weights = Path(models["multiobject-gru-s0"]) / "model.safetensors"
    later = (tmp_path / "elsewhere" / "das_k2" / "results.json").stat().st_mtime + 10
    os.utime(weights, (later, later))
    assert find_finished_run(again, [tmp_path / "elsewhere"]) is None
    with pytest.raises(ConfigError, match="unique"):
        execute_plan([first, first], log=logged.append)


# ----------------------------------------------------------------------------------- smoke runs end to end
@pytest.mark.slow
def test_stitching_vs_mas_smoke_end_to_end_and_restart(tmp_path, capsys):
    run = smoke("stitching_vs_mas", tmp_path, "smoke_ks=[2]")   # k = 4 is planned like k = 2 (see plan test)
    rows = read_csv(run / "results.csv")
    got = {(r["method"], r["k"], r["direction"]) for r in rows}
    want = {(m, k, d) for k in ("2",) for m, d in
            [("mas", "0→1"), ("mas", "1→0"), ("mas", "0→0"), ("mas", "1→1"), ("das", "0→0"), ("das", "1→1"),
             ("stitch", "0→1"), ("stitch", "1→0"), ("linear_stitch", "0→1"), ("linear_stitch", "1→0"),
             ("unimas", "0→1"), ("unimas", "1→0")]}
    assert got == want and len(rows) == len(want)
    for r in rows:
        assert 0.0 <= float(r["trial_iia_lo"]) <= float(r["trial_iia"]) <= float(r["trial_iia_hi"]) <= 1.0
        assert r["status"] == "trained" and int(r["n_pairs"]) == 16
    trained_by = {(r["method"], r["direction"]): r["trained_by"] for r in rows}
    assert trained_by[("stitch", "0→1")] == "behaviour"
    summary = (run / "summary.md").read_text()
    assert "| 2 |" in summary and "Smoke run" in summary
    assert summary.count("— **") == 3 and "rank 2" in summary and "**pending**" in summary  # k = 4 not run
    assert (run / "iia_vs_k.png").stat().st_size > 1000
    capsys.readouterr()
    smoke("stitching_vs_mas", tmp_path, "smoke_ks=[2]")     # restart: every run reused, nothing retrained
    out = capsys.readouterr().out
    assert out.count("reusing finished run") == 9 and "finished mas_k2" not in out
    # --report trains nothing, even with a k never run: its runs stay pending in the rewritten summary
    smoke("stitching_vs_mas", tmp_path, "smoke_ks=[2, 4]", "--report")
    out = capsys.readouterr().out
    assert out.count("reusing finished run") == 9 and "finished " not in out.replace("finished run", "")
    summary = (run / "summary.md").read_text()
    assert "mas_k4 (pending)" in summary and "| 4 |" in summary
    assert not (run / "mas" / "mas_k4").exists()


@pytest.mark.slow
def test_clmas_smoke_end_to_end(tmp_path):
    run = smoke("clmas", tmp_path, "epsilons=[0.89]", "methods=[mas,clmas,latent_stitch,behavioural_stitch,"
                                                        "reverse_behavioural_stitch,random_alignment]")
    rows = read_csv(run / "results.csv")
    cells = {(r["method"], r["epsilon"], r["direction"]): r for r in rows}
    assert {m for m, _, _ in cells} == {"mas", "clmas", "latent_stitch", "behavioural_stitch",
                                        "reverse_behavioural_stitch", "random_alignment"}
    assert cells[("clmas", "0.89", "inaccessible 0→1")]["trained_by"] == "cl"
    assert cells[("clmas", "0.89", "accessible 1→0")]["trained_by"] == "behaviour"
    assert cells[("latent_stitch", "", "inaccessible 0→1")]["trained_by"] == "cl"
    assert cells[("latent_stitch", "", "inaccessible 0→1")]["cl_unmatched"] != ""
    assert cells[("behavioural_stitch", "", "inaccessible 0→1")]["trained_by"] == "behaviour"
    assert cells[("reverse_behavioural_stitch", "", "inaccessible 0→1")]["trained_by"] == "none"
    assert cells[("reverse_behavioural_stitch", "", "accessible 1→0")]["trained_by"] == "behaviour"
    assert cells[("random_alignment", "", "accessible 1→0")]["steps"] == "0"
    summary = (run / "summary.md").read_text()
    for needle in ("| clmas ε=0.89 |", "| latent_stitch |", "needs access", "Controls (chance level)",
                   "inaccessible direction 0→1"):
        assert needle in summary, needle
    assert (run / "iia_by_method.png").stat().st_size > 1000


@pytest.mark.slow
def test_cross_task_smoke_end_to_end(tmp_path):
    run = smoke("cross_task", tmp_path, "task_models={multiobject: [multiobject-gru-s0, multiobject-gru-s1], "
                                        "modulo: [modulo-gru-s0]}")
    rows = read_csv(run / "results.csv")
    comparisons = list(dict.fromkeys(r["comparison"] for r in rows))
    assert comparisons == ["within multiobject", "DAS multiobject", "DAS modulo", "multiobject vs modulo",
                           "count vs remaining_ops", "count vs cumulative_value",
                           "count vs cumulative_value (1..10)"]
    status = {r["comparison"]: r["status"] for r in rows}
    assert all(s == "trained" for s in status.values()), status
    variables = {r["comparison"]: r["variable"] for r in rows if r["status"] == "trained"}
    assert set(variables.values()) == {"count"}
    summary = (run / "summary.md").read_text()
    assert "| count vs remaining_ops |" in summary and "DAS on the model itself" in summary
    assert (run / "iia_by_comparison.png").stat().st_size > 1000


def test_early_stop_note_names_each_run_stopped_by_a_stop_file_once():
    early = "stopped early at step 40: runs/x/a/STOP was created"
    rows = [{"run": "a", "stopped": early, "best_step": 20, "steps": 40},
            {"run": "a", "stopped": early, "best_step": 20, "steps": 40},       # a second direction of run a
            {"run": "b", "stopped": "no improvement in 10 validations", "best_step": 3, "steps": 5},
            {"run": "c", "stopped": None}]
    note = early_stop_note(rows)
    assert note.count("a (best step 20 of 40)") == 1 and "b (" not in note and "c (" not in note
    assert early_stop_note(rows[2:]) is None
    assert "x (best step 1 of 2)" in early_stop_note([{"comparison": "x", "mas_stopped": early, "mas_best_step": 1,
                                                        "mas_steps": 2}], run_key="comparison",
                                                       stopped_key="mas_stopped", best_key="mas_best_step",
                                                       steps_key="mas_steps")
