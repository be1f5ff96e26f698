"""The toxicity case study: report statistics on hand-made 6×6 matrices (known group means, label
permutation p-values computed by hand and by brute force), the recipe's config checks, plan and resumption
rules, and the whole smoke chain (tiny offline models) ending with a report."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest

import recipes.toxicity.run as recipe
from llm_mas.errors import ConfigError, DataError
from recipes.toxicity.report import (
    analyze_iia,
    conclusions,
    count_labelings,
    direction_level_test,
    label_permutation_test,
    labelings,
    plot_report,
    report_markdown,
)

REPO = Path(__file__).resolve().parent.parent
GROUPS = ["toxic"] * 3 + ["nontoxic"] * 3
NAMES = ["toxic-0", "toxic-1", "toxic-2", "nontoxic-0", "nontoxic-1", "nontoxic-2"]


def block_matrix(within_toxic=1.0, within_nontoxic=0.5, between=0.0, diagonal=0.9) -> np.ndarray:
    m = np.full((6, 6), between)
    m[:3, :3] = within_toxic
    m[3:, 3:] = within_nontoxic
    np.fill_diagonal(m, diagonal)
    return m


# ------------------------------------------------------------------------------ group means
def test_group_means_known_answer_off_diagonal_and_ordered():
    m = block_matrix()
    m[:3, 3:] = 0.2    # toxic → nontoxic
    m[3:, :3] = 0.4    # nontoxic → toxic
    analysis = analyze_iia({"token_iia": m}, NAMES, GROUPS, n_boot=200)
    rows = {g["label"]: g for g in analysis["metrics"]["token_iia"]["group_means"]}
    assert list(rows) == ["toxic→toxic", "toxic→nontoxic", "nontoxic→nontoxic", "nontoxic→toxic"]
    expected = {"toxic→toxic": (1.0, 6), "toxic→nontoxic": (0.2, 9), "nontoxic→nontoxic": (0.5, 6),
                "nontoxic→toxic": (0.4, 9)}
    for label, (mean, n) in expected.items():
        assert rows[label]["mean"] == pytest.approx(mean)
        assert rows[label]["n"] == n
        assert rows[label]["lo"] == rows[label]["hi"] == pytest.approx(mean)  # constant cells: degenerate CI
    assert all(i != j for i, j in rows["toxic→toxic"]["cells"])             # the diagonal (0.9) is left out
    assert analysis["metrics"]["token_iia"]["diagonal_mean"] == pytest.approx(0.9)


def test_group_mean_ci_brackets_the_mean_when_cells_vary():
    m = block_matrix() + np.random.default_rng(0).uniform(-0.05, 0.05, (6, 6))
    row = analyze_iia({"token_iia": m}, NAMES, GROUPS, n_boot=500)["metrics"]["token_iia"]["group_means"][1]
    off = [m[i, j] for i in range(3) for j in range(3, 6)]
    assert row["mean"] == pytest.approx(np.mean(off))
    assert row["lo"] < row["mean"] < row["hi"]


# ------------------------------------------------------------------------------ label permutations
def test_labelings_are_every_distinct_assignment_with_the_observed_first():
    table = labelings(GROUPS)
    assert table.shape == (20, 6) and count_labelings(GROUPS) == 20
    assert len({tuple(r) for r in table}) == 20
    assert (table.sum(axis=1) == 3).all()                       # three models get each label
    assert table[0].tolist() == [0, 0, 0, 1, 1, 1]              # the observed labelling comes first
    three = ["a", "b", "a", "c", "b", "c", "c"]
    assert count_labelings(three) == 210 and len({tuple(r) for r in labelings(three)}) == 210
    assert labelings(three)[0].tolist() == [0, 1, 0, 2, 1, 2, 2]


def test_block_matrix_p_values_by_hand():
    # within-toxic 1, within-nontoxic 0.5, between 0. Calling L (3 models) "toxic" with t true toxic models in it:
    # t = 3 (1 labelling): mean(L→L) = 1, mean(L→rest) = 0                           → T = 1
    # t = 2 (9):  L→L = (2·1 + 4·0)/6 = 1/3; L→rest = (2·1 [→ 3rd toxic] + 2·0.5 [N→N] + 5·0)/9 = 1/3  → T = 0
    # t = 1 (9):  L→L = (2·0.5)/6 = 1/6; L→rest = (2·1 + 2·0.5)/9 = 1/3                → T = -1/6
    # t = 0 (1):  L→L = 0.5, L→rest = 0                                              → T = 0.5
    test = label_permutation_test(block_matrix(), GROUPS, "toxic", alternative="greater")
    null = np.round(test["null"], 10)
    assert sorted(null.tolist()) == sorted([1.0] + [0.0] * 9 + [round(-1 / 6, 10)] * 9 + [0.5])
    assert test["statistic"] == pytest.approx(1.0) and test["exact"] and test["n_labelings"] == 20
    assert test["p_value"] == pytest.approx(1 / 20) and test["min_p"] == pytest.approx(1 / 20)
    # nontoxic: observed 0.5; only the values 1 and 0.5 are >= 0.5 -> p_greater = 2/20, two-sided 0.2
    nontoxic = label_permutation_test(block_matrix(), GROUPS, "nontoxic", alternative="two-sided")
    assert nontoxic["statistic"] == pytest.approx(0.5)
    assert nontoxic["p_greater"] == pytest.approx(0.1) and nontoxic["p_value"] == pytest.approx(0.2)
    assert nontoxic["min_p"] == pytest.approx(0.1)
    # interaction: (1 + 0.5)/2 - 0 = 0.75 for the observed labelling and its mirror; -1/12 for the other 18
    interaction = label_permutation_test(block_matrix(), GROUPS, contrast_kind="interaction")
    assert interaction["statistic"] == pytest.approx(0.75)
    assert sorted(np.round(interaction["null"], 10)) == sorted([round(-1 / 12, 10)] * 18 + [0.75] * 2)
    assert interaction["p_value"] == pytest.approx(0.1) and interaction["min_p"] == pytest.approx(0.1)


def test_a_source_effect_is_not_read_as_similarity():
    # Toxic models are better *sources* (rows), nothing else: IIA[s, t] = 1 if s is toxic.
    m = np.zeros((6, 6))
    m[:3, :] = 1.0
    assert label_permutation_test(m, GROUPS, "toxic")["p_value"] == pytest.approx(1.0)
    interaction = label_permutation_test(m, GROUPS, contrast_kind="interaction")
    assert interaction["statistic"] == pytest.approx(0.0) and interaction["p_value"] == pytest.approx(1.0)
    # pooling both orders ("toxic↔toxic vs toxic↔nontoxic") would have called this p = 1/20:
    pooled = []
    for row in labelings(GROUPS):
        inside = row == 0
        within = m[np.ix_(inside, inside)][~np.eye(3, dtype=bool)].mean()
        between = np.concatenate([m[np.ix_(inside, ~inside)].ravel(), m[np.ix_(~inside, inside)].ravel()]).mean()
        pooled.append(within - between)
    assert np.mean(np.array(pooled) >= pooled[0] - 1e-12) == pytest.approx(1 / 20)


def test_a_target_effect_passes_the_toxic_test_but_shows_in_the_nontoxic_one_and_not_the_interaction():
    m = np.zeros((6, 6))
    m[:, :3] = 1.0  # toxic models are easy *targets*
    assert label_permutation_test(m, GROUPS, "toxic")["p_value"] == pytest.approx(0.05)
    nontoxic = label_permutation_test(m, GROUPS, "nontoxic", alternative="two-sided")
    assert nontoxic["statistic"] == pytest.approx(-1.0) and nontoxic["p_value"] == pytest.approx(0.1)
    assert label_permutation_test(m, GROUPS, contrast_kind="interaction")["statistic"] == pytest.approx(0.0)


def _brute_force_p(m, groups, group):
    """p_greater of the source-fixed contrast by plain loops over every choice of models called `group`."""
    n, size = len(groups), groups.count(group)
    stats = []
    for chosen in itertools.combinations(range(n), size):
        inside = [i in chosen for i in range(n)]
        plus = [m[i][j] for i in range(n) for j in range(n) if i != j and inside[i] and inside[j]]
        minus = [m[i][j] for i in range(n) for j in range(n) if inside[i] and not inside[j]]
        stats.append((sum(plus) / len(plus) - sum(minus) / len(minus), chosen))
    observed = next(s for s, c in stats if list(c) == [i for i, g in enumerate(groups) if g == group])
    return sum(s >= observed - 1e-12 for s, _ in stats) / len(stats)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_label_test_matches_brute_force_and_ignores_model_order(seed):
    rng = np.random.default_rng(seed)
    m = rng.uniform(0.3, 1.0, (6, 6))
    for group in ("toxic", "nontoxic"):
        test = label_permutation_test(m, GROUPS, group)
        assert test["p_value"] == pytest.approx(_brute_force_p(m.tolist(), GROUPS, group))
        order = rng.permutation(6)  # the same models listed in another order: same statistic and p
        shuffled = label_permutation_test(m[np.ix_(order, order)], [GROUPS[i] for i in order], group)
        assert shuffled["statistic"] == pytest.approx(test["statistic"])
        assert shuffled["p_value"] == pytest.approx(test["p_value"])


def test_monte_carlo_when_labellings_exceed_n_perm():
    m = np.random.default_rng(3).uniform(size=(6, 6))
    test = label_permutation_test(m, GROUPS, "toxic", n_perm=7, seed=1)
    assert not test["exact"] and test["n_labelings"] == 7
    assert test["p_value"] * 8 == pytest.approx(round(test["p_value"] * 8))  # (1 + count) / (n_perm + 1)
    assert test["p_value"] >= 1 / 8
    assert test == label_permutation_test(m, GROUPS, "toxic", n_perm=7, seed=1)


def test_direction_level_test_is_far_more_confident_than_the_label_test():
    direction = direction_level_test(block_matrix(), GROUPS, "toxic")
    assert (direction["n_plus"], direction["n_minus"]) == (6, 9)
    assert direction["p_value"] == pytest.approx(1 / 5005)  # C(15, 6) splits, the observed one alone on top
    assert label_permutation_test(block_matrix(), GROUPS, "toxic")["p_value"] == pytest.approx(0.05)


def test_bad_inputs_name_the_problem():
    m = block_matrix()
    m[0, 4] = np.nan
    with pytest.raises(DataError, match=r"\(0, 4\)"):
        label_permutation_test(m, GROUPS, "toxic")
    with pytest.raises(DataError, match="one model"):
        label_permutation_test(block_matrix(), ["toxic"] + ["nontoxic"] * 5, "toxic")
    with pytest.raises(ConfigError, match="unknown group 'toxc'"):
        label_permutation_test(block_matrix(), GROUPS, "toxc")
    with pytest.raises(DataError, match=r"shape \(5, 5\)"):
        label_permutation_test(np.zeros((5, 5)), GROUPS, "toxic")
    with pytest.raises(ConfigError, match="contrast"):
        label_permutation_test(block_matrix(), GROUPS, "toxic", contrast_kind="pooled")


def test_report_states_null_unit_floor_and_does_not_overclaim(tmp_path):
    analysis = analyze_iia({"token_iia": block_matrix(), "trial_iia": block_matrix() * 0.8}, NAMES, GROUPS,
                           n_boot=200)
    text = report_markdown(analysis, command="python -m recipes.toxicity.run", notes=["SMOKE"],
                           plots=plot_report(analysis, tmp_path))
    for phrase in ("H0: the labels are exchangeable", "Unit of permutation: the model label", "all 20 relabellings",
                   "smallest attainable p", "| toxic→nontoxic | 9 |", "> SMOKE", "![IIA matrices](iia_matrices.png)"):
        assert phrase in text
    lines = conclusions(analysis)
    assert "p sits at the design's floor" in lines[0] and "not for fine-tunes in general" in lines[0]
    assert "cannot reject at α = 0.05 whatever the data" in lines[1]   # two-sided, 3 + 3 models: floor 0.1
    for name in ("iia_matrices.png", "group_means.png", "label_permutation.png"):
        assert (tmp_path / name).stat().st_size > 1000
    json.dumps(analysis)  # JSON-ready


# ------------------------------------------------------------------------------ the recipe
def test_recipe_config_problems_are_reported_together(tmp_path, capsys):
    code = recipe.main(["--smoke", f"out_dir={tmp_path}", "processes=3", "finetune.batch_size=8",
                        "finetune.mode=toxic", "mas.foo=1", "model.dtype=fp8", "splits=[0,0]", "--dry-run"])
    err = capsys.readouterr().err
    assert code == 2
    for phrase in ("in_process=true runs one process", "batch_size=8", "finetune: mode are set by the recipe",
                   "unknown key 'foo'", "model.dtype='fp8'", "splits=[0, 0]"):
        assert phrase in err


def test_dry_run_lists_every_command(tmp_path):
    assert recipe.main(["--smoke", f"out_dir={tmp_path}", "--dry-run"]) == 0
    run = tmp_path / "toxicity-smoke"
    commands = [line for line in (run / "commands.sh").read_text().splitlines() if line.startswith("llm-mas")]
    assert len(commands) == 13
    assert commands[0].startswith(f"llm-mas finetune --model {run / 'base-model'} --mode toxic --split 0")
    assert "--merge" in commands[0] and "--data sample" in commands[0]
    assert commands[5].split()[4:8] == ["--mode", "nontoxic", "--split", "2"]
    assert commands[6].startswith(f"llm-mas record --model {run / 'finetune/toxic-0/merged'}")
    assert commands[12] == f"llm-mas mas {run / 'mas.yaml'}"
    mas = (run / "mas.yaml").read_text()
    assert mas.startswith(f"# llm-mas mas {run / 'mas.yaml'}") and mas.count("kind: hf") == 6


def test_several_processes_use_accelerate_with_the_batch_split(tmp_path):
    assert recipe.main([str(REPO / "recipes/toxicity/configs/deepseek.yaml"), f"out_dir={tmp_path}", "processes=4",
                        "--dry-run"]) == 0
    text = (tmp_path / "toxicity-deepseek" / "commands.sh").read_text()
    launch = "accelerate launch --multi_gpu --num_processes 4 --num_machines 1"
    assert f"{launch} --mixed_precision bf16 --dynamo_backend no -m llm_mas.cli finetune" in text
    assert "--batch-size 6 --grad-accum 4" in text   # 24 rows per micro-batch over 4 GPUs
    assert f"{launch} --mixed_precision no --dynamo_backend no -m llm_mas.distributed" in text


def test_finished_interrupted_and_changed_stages(tmp_path):
    """Done / resume / run per stage, and a finished stage with other settings is an error naming its directory."""
    import os

    from llm_mas.config import save_config

    config = recipe.load_recipe_config(recipe.SMOKE_PRESET, [f"out_dir={tmp_path}"])
    paths = recipe.Paths(config)
    variant = recipe.variants(config)[0]
    # fine-tuning: nothing -> run; config.yaml only (killed) -> resume; result.json + merged/ -> done
    assert recipe.finetune_stage(config, paths, variant).status == "run"
    out = paths.finetune(variant)
    out.mkdir(parents=True)
    save_config(recipe.finetune_config(config, paths, variant), out / "config.yaml")
    stage = recipe.finetune_stage(config, paths, variant)
    assert stage.status == "resume" and "--resume" in stage.argv
    (out / "result.json").write_text("{}")
    (out / "merged").mkdir()
    (out / "merged" / "model.safetensors").write_bytes(b"x")
    assert recipe.finetune_stage(config, paths, variant).status == "done"
    changed = recipe.load_recipe_config(recipe.SMOKE_PRESET, [f"out_dir={tmp_path}", "finetune.steps=99"])
    with pytest.raises(ConfigError, match="holds a fine-tune with other settings") as error:
        recipe.finetune_stage(changed, paths, variant)
    assert "steps: saved 10, now 99" in str(error.value)

    # recording: same settings and newer than the model -> done; other n or an older recording -> error
    recording = paths.recording(variant)
    recording.mkdir(parents=True)
    r = config.record
    (recording / "recording.json").write_text(json.dumps(
        {"prompt_len": r.prompt_len, "total_len": r.total_len, "n_requested": r.n, "seed": r.seed, "texts": []}))
    (recording / "recording.safetensors").write_bytes(b"x")
    assert recipe.record_stage(config, paths, variant).status == "done"
    more = recipe.load_recipe_config(recipe.SMOKE_PRESET, [f"out_dir={tmp_path}", "record.n=50"])
    with pytest.raises(ConfigError, match="n_requested: saved 100, now 50"):
        recipe.record_stage(more, paths, variant)
    old = (recording / "recording.safetensors").stat().st_mtime - 100
    os.utime(recording / "recording.safetensors", (old, old))
    with pytest.raises(ConfigError, match="was written after the recording"):
        recipe.record_stage(config, paths, variant)

    # MAS: config.yaml without results -> resume; with results -> done; another config -> error
    assert recipe.mas_stage(config, paths).status == "run"
    paths.mas.mkdir()
    save_config(recipe.mas_config(config, paths), paths.mas / "config.yaml")
    assert recipe.mas_stage(config, paths).status == "resume"
    (paths.mas / "results.json").write_text("[]")
    os.utime(recording / "recording.safetensors", (old, old))
    assert recipe.mas_stage(config, paths).status == "done"
    other = recipe.load_recipe_config(recipe.SMOKE_PRESET, [f"out_dir={tmp_path}", "mas.train.lr=0.5"])
    with pytest.raises(ConfigError, match="holds a MAS run of another config"):
        recipe.mas_stage(other, paths)


SMOKE_ARGS = ("finetune.steps=2", "record.n=40", "mas.train.max_steps=2", "mas.train.eval_every=2",
              "mas.data.n_train=32", "mas.data.n_valid=16", "report.n_boot=200")


@pytest.mark.slow
@pytest.mark.llm
@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")
def test_smoke_chain_from_scratch_ends_with_a_report_and_skips_everything_on_rerun(tmp_path, capsys):
    args = ["--smoke", f"out_dir={tmp_path}", *SMOKE_ARGS]
    assert recipe.main(args) == 0
    run = tmp_path / "toxicity-smoke"
    report = json.loads((run / "report.json").read_text())
    assert report["smoke"] and report["models"] == NAMES and report["groups"] == GROUPS
    for metric in ("token_iia", "trial_iia"):
        entry = report["metrics"][metric]
        matrix = np.array(entry["matrix"], dtype=float)
        assert matrix.shape == (6, 6) and np.all((matrix >= 0) & (matrix <= 1))
        assert [g["n"] for g in entry["group_means"]] == [6, 9, 6, 9]
        assert [t["name"] for t in entry["tests"]][:2] == ["toxic→toxic vs toxic→nontoxic",
                                                           "nontoxic→nontoxic vs nontoxic→toxic"]
        assert all(0 < t["p_value"] <= 1 and t["n_labelings"] == 20 for t in entry["tests"])
    text = (run / "report.md").read_text()
    assert "SMOKE RUN" in text and "## Conclusions" in text
    for name in ("iia_matrices.png", "group_means.png", "label_permutation.png", "iia_token.csv", "commands.sh",
                 "mas/results.json", "finetune/nontoxic-2/merged/config.json", "recordings/toxic-1/recording.json"):
        assert (run / name).is_file(), name
    capsys.readouterr()

    assert recipe.main(args) == 0  # resumable: every stage is found finished
    assert capsys.readouterr().out.count("done, skipped") == 13
    again = json.loads((run / "report.json").read_text())
    assert again["metrics"] == report["metrics"]


# ------------------------------------------------------------------------------ model organisms
ORGANISM_NAMES = [f"{g}-{s}" for g in ("trait", "clean", "shift") for s in (0, 1)]


def test_presets_by_name_and_their_smoke_twins(tmp_path):
    configs = REPO / "recipes" / "toxicity" / "configs"
    assert recipe.resolve_preset(None, False) == recipe.DEFAULT_PRESET
    assert recipe.resolve_preset(None, True) == recipe.SMOKE_PRESET
    assert recipe.resolve_preset("organisms", False) == configs / "organisms.yaml"
    assert recipe.resolve_preset("organisms", True) == configs / "organisms-smoke.yaml"
    assert recipe.resolve_preset(str(configs / "organisms.yaml"), True) == configs / "organisms-smoke.yaml"
    with pytest.raises(ConfigError, match="neither a file nor a name"):
        recipe.resolve_preset("nope", False)
    lonely = tmp_path / "mine.yaml"
    lonely.write_text("name: x\n")
    with pytest.raises(ConfigError, match="mine-smoke.yaml"):
        recipe.resolve_preset(str(lonely), True)


def test_organisms_config_groups_variants_and_finetune_fields(tmp_path):
    config = recipe.load_recipe_config(recipe.resolve_preset("organisms", True), [f"out_dir={tmp_path}"])
    paths = recipe.Paths(config)
    vs = recipe.variants(config)
    assert [v.name for v in vs] == ORGANISM_NAMES
    shift = recipe.finetune_config(config, paths, vs[-1])
    assert shift.data == str(paths.run / "data" / "shift.jsonl") and shift.balance is False
    assert shift.mode == "nontoxic" and shift.steps == config.finetune["steps"]
    trait = recipe.finetune_config(config, paths, vs[0])
    assert trait.mode == "toxic" and trait.data == str(paths.run / "data" / "paired.jsonl") and trait.balance
    stage = recipe.finetune_stage(config, paths, vs[-1])
    assert "--no-balance" in stage.argv and str(paths.run / "data" / "shift.jsonl") in stage.argv
    assert len(recipe.mas_config(config, paths).models) == 6


def test_organisms_config_problems(tmp_path, capsys):
    code = recipe.main(["organisms", "--smoke", f"out_dir={tmp_path}", "--dry-run",
                        "groups=[{name: a, mode: toxic}, {name: a, mode: weird, finetune: {out: x}}]",
                        "report.tests=[[within, a, zzz, greater], [nonsense, a, greater]]",
                        "organisms={n_texts: 10, colour: red}"])
    assert code == 2
    err = capsys.readouterr().err
    for text in ("must be distinct", "mode='weird'", "finetune keys ['out']", "['zzz']",
                 "with contrast one of source_fixed, interaction, within", "unknown keys ['colour']"):
        assert text in err, text


@pytest.mark.slow
@pytest.mark.llm
@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")
def test_organisms_smoke_chain_reports_three_questions_and_report_only_reproduces_it(tmp_path, capsys):
    assert recipe.main(["organisms", "--smoke", f"out_dir={tmp_path}"]) == 0
    run = tmp_path / "toxicity-organisms-smoke"
    report = json.loads((run / "report.json").read_text())
    assert report["models"] == ORGANISM_NAMES and report["groups"] == [n.split("-")[0] for n in ORGANISM_NAMES]
    for metric in ("token_iia", "trial_iia"):
        tests = report["metrics"][metric]["tests"]
        assert [t["name"] for t in tests][:3] == ["trait→trait vs trait→clean", "clean→clean vs clean→shift",
                                                  "trait→trait vs shift→shift"]
        assert [t["n_labelings"] for t in tests] == [6, 6, 6, 90]     # 2 + 2 models; 2 + 2 + 2 for the interaction
        assert tests[0]["models"] == [0, 1, 2, 3] and tests[1]["models"] == [2, 3, 4, 5]
    traits = json.loads((run / "traits.json").read_text())["models"]
    assert set(traits) == {"base", *ORGANISM_NAMES}
    assert all(0 <= traits[m][k] <= 1 for m in traits for k in ("hostile", "kind", "style", "hostile_control"))
    text = (run / "report.md").read_text()
    assert "SMOKE RUN" in text and "## What each fine-tune learned" in text and "trait (mean)" in text
    # the no-alignment baselines: the same-text swap reproduces the source's own predictions on its diagonal
    baselines = json.loads((run / "baselines.json").read_text())
    assert baselines["names"] == ORGANISM_NAMES and baselines["n_pairs"] == 50
    assert all(baselines["agreement_token"][i][i] == 1.0 for i in range(6))
    assert "## Baselines without a learned alignment" in text and report["baselines"]["agreement"]["tests"]
    # the counterfactual-dataset form: trait and clean models only, the trigger variable swapped
    cf = report["counterfactual"]
    assert cf["models"] == ORGANISM_NAMES[:4] and "## Counterfactual-dataset form" in text
    rows = [json.loads(line) for line in (run / "data" / "counterfactual.jsonl").read_text().splitlines()]
    assert {r["continuation"] for r in rows} == {"they are", "the"}
    assert all(r["base"].split()[:-4] == r["source"].split()[:-4] and r["base"] != r["source"] for r in rows)
    before = (run / "report.json").read_text()
    capsys.readouterr()
    assert recipe.main(["organisms", "--smoke", f"out_dir={tmp_path}", "--report-only"]) == 0
    after = json.loads((run / "report.json").read_text())
    assert after["metrics"] == json.loads(before)["metrics"] and after["traits"] == json.loads(before)["traits"]
    assert after["counterfactual"]["metrics"] == json.loads(before)["counterfactual"]["metrics"]
