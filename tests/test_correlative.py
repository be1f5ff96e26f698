"""Correlative similarity: aligned row collection, SimilarityConfig, run_similarity, the CLI and the recipe."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
import yaml
from typer.testing import CliRunner

from llm_mas.correlative import (
    MEASURES,
    collect_rows,
    default_sequences,
    format_similarity_table,
    load_similarity_config,
    mas_direction_summary,
    run_similarity,
    similarity_config,
)
from llm_mas.errors import ConfigError, DataError, SiteError
from llm_mas.models import build_task_model
from llm_mas.presets import resolve_preset
from llm_mas.similarity import compare_representations
from llm_mas.tasks import PAD, get_task

REPO = Path(__file__).resolve().parent.parent
VOCAB = len(get_task("multiobject").vocab)


@pytest.fixture(scope="module")
def models():
    """Random-weight MultiObject GRU (two seeds), LSTM and Transformer, in train mode as built."""
    return {"gru0": build_task_model("gru", "multiobject", VOCAB, seed=0),
            "gru1": build_task_model("gru", "multiobject", VOCAB, seed=1),
            "lstm": build_task_model("lstm", "multiobject", VOCAB, seed=2),
            "transformer": build_task_model("transformer", "multiobject", VOCAB, seed=3)}


@pytest.fixture(scope="module")
def sequences():
    return default_sequences("multiobject", per_quantity=2, seed=0)  # 40 sequences


def _checkpoint(directory: Path, arch: str, seed: int, task: str = "multiobject") -> str:
    """A run directory `load_task_model` accepts: config.yaml (model section) + model.safetensors."""
    from safetensors.torch import save_file

    model = build_task_model(arch, task, len(get_task(task).vocab), seed=seed)
    directory.mkdir(parents=True)
    (directory / "config.yaml").write_text(yaml.safe_dump({"model": dict(model.config)}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(directory / "model.safetensors"))
    return str(directory)


# ----------------------------------------------------------------------------------- sequences
def test_default_sequences_are_15_per_quantity_in_order_and_seeded():
    task = get_task("multiobject")
    batch = default_sequences()
    assert len(batch) == 300
    np.testing.assert_array_equal(task.quantities(batch), np.repeat(np.arange(1, 21), 15))
    assert (batch.ids[:, 0] == 1).all()
    np.testing.assert_array_equal(batch.ids, default_sequences().ids)  # same seed, same sequences
    assert not np.array_equal(batch.ids, default_sequences(seed=1).ids)
    with pytest.raises(ConfigError, match="per_quantity"):
        default_sequences(per_quantity=0)
    with pytest.raises(ConfigError, match="out of range"):
        default_sequences(quantities=[0, 21])


# ----------------------------------------------------------------------------------- rows
@pytest.mark.parametrize("site", ["embeddings", "hidden"])
def test_rows_are_the_same_non_pad_positions_in_every_model(models, sequences, site):
    names = ["gru0", "gru1", "lstm", "transformer"]
    rows = collect_rows([models[n] for n in names], site, sequences)
    n_non_pad = int((sequences.ids != PAD).sum())
    assert len(rows) == n_non_pad
    assert [x.shape for x in rows.latents] == [(n_non_pad, models[n].d_model) for n in names]  # LSTM: [h; c]
    np.testing.assert_array_equal(rows.token_id, sequences.ids[rows.sequence_index, rows.position])
    assert (rows.token_id != PAD).all()
    # Row-major order: sequence by sequence, positions 0..length-1.
    expected = [(s, p) for s in range(len(sequences)) for p in range(int(sequences.lengths[s]))]
    assert list(zip(rows.sequence_index.tolist(), rows.position.tolist())) == expected
    if site == "embeddings":  # the embedding row of a token is that token's embedding, in every model
        for name, latents in zip(names, rows.latents):
            weight = models[name].embed.weight.detach().numpy()
            np.testing.assert_allclose(latents, weight[rows.token_id], atol=1e-6)
    assert all(m.training for m in models.values())  # eval during collection, mode restored afterwards


def test_rows_do_not_depend_on_padding_or_batching(models, sequences):
    """A sequence run alone and unpadded gives the rows it gets inside the padded, batched run."""
    rows = collect_rows([models["gru0"], models["transformer"]], "hidden", sequences, batch_size=7)
    row = 23
    length = int(sequences.lengths[row])
    alone = {"input_ids": torch.as_tensor(sequences.ids[row:row + 1, :length])}
    single = collect_rows([models["gru0"], models["transformer"]], "hidden", alone)
    assert len(single) == length
    for full, part in zip(rows.latents, single.latents):
        np.testing.assert_allclose(full[rows.sequence_index == row], part, atol=1e-5)


def test_a_model_against_itself_gives_cka_and_rsa_of_one(models, sequences):
    rows = collect_rows([models["lstm"], models["lstm"]], ["hidden", "hook_layers.0"], sequences)
    np.testing.assert_array_equal(rows.latents[0], rows.latents[1])
    result = compare_representations(rows.latents[0], rows.latents[1], n_rows=200, n_repeats=2, seed=0)
    for key in MEASURES:
        assert result[key]["mean"] == pytest.approx(1.0, abs=1e-9), key
    other = compare_representations(rows.latents[0], collect_rows([models["gru1"]], "hidden", sequences).latents[0],
                                    n_rows=200, n_repeats=2, seed=0)
    assert other["cka_unbiased"]["mean"] < 0.999  # a different model is not identical


def test_collect_rows_errors(models, sequences):
    sameobject = build_task_model("gru", "sameobject", len(get_task("sameobject").vocab), seed=0)
    with pytest.raises(ConfigError, match="different tasks"):
        collect_rows([models["gru0"], sameobject], "hidden")
    with pytest.raises(ConfigError, match="2 sites for 1 models"):
        collect_rows([models["gru0"]], ["hidden", "hidden"], sequences)
    with pytest.raises(SiteError, match="closest valid names"):
        collect_rows([models["gru0"]], "hook_layerz.0", sequences)
    with pytest.raises(DataError, match="input_ids"):
        collect_rows([models["gru0"]], "hidden", {"ids": torch.zeros(2, 3, dtype=torch.long)})
    with pytest.raises(ConfigError, match="batch_size"):
        collect_rows([models["gru0"]], "hidden", sequences, batch_size=0)
    with pytest.raises(ConfigError, match="unknown backend"):
        collect_rows([models["gru0"]], "hidden", sequences, backend="jax")


def test_collect_rows_through_a_hugging_face_model():
    """LLMs go through the same interface: rows = positions where the attention mask is 1."""
    sys.path.insert(0, str(Path(__file__).parent))
    from llm_fixtures import load_tiny

    model, tokenizer = load_tiny()
    batch = tokenizer(["the cat sees a red ball", "a dog"], return_tensors="pt", padding=True)
    rows = collect_rows([model, model], ["embeddings", "layer1"], dict(batch))
    assert len(rows) == int(batch["attention_mask"].sum())
    assert rows.latents[0].shape[1] == model.config.hidden_size
    weight = model.get_input_embeddings().weight.detach().numpy()
    np.testing.assert_allclose(rows.latents[0], weight[rows.token_id], atol=1e-6)


# ----------------------------------------------------------------------------------- config
def test_similarity_config_reports_every_problem_at_once():
    with pytest.raises(ConfigError) as info:
        similarity_config(models=[{"name": "a", "backend": "jax"}], n_rows=2, n_repeats=0, pairs=[[0, 0]],
                          sequences={"per_quantity": 0, "task": "countingg"}, colour="red")
    text = str(info.value)
    for needle in ("at least two", "n_rows", "n_repeats", "pairs", "per_quantity", "countingg", "jax",
                   "unknown key 'colour'"):
        assert needle in text, needle
    assert len(info.value.problems) >= 8


def test_similarity_config_pairs_and_preset(tmp_path):
    cfg = load_similarity_config(resolve_preset("similarity_architectures"))
    assert cfg.model_pairs() == [(0, 1), (0, 2), (0, 3)]
    cfg = load_similarity_config(resolve_preset("similarity_gru_gru"), ["models.1.site=embeddings"])
    assert [m.site for m in cfg.models] == ["hidden", "embeddings"] and cfg.model_pairs() == [(0, 1)]
    assert (cfg.n_rows, cfg.n_repeats, cfg.sequences.per_quantity) == (1000, 10, 15)
    three = similarity_config(models=[{"name": "a"}, {"name": "b"}, {"name": "c"}])
    assert three.model_pairs() == [(0, 1), (0, 2), (1, 2)]
    first = resolve_preset("similarity_gru_gru").read_text().splitlines()[0]
    assert first == "# llm-mas similarity similarity_gru_gru"


def test_unknown_model_name_is_a_config_error(tmp_path):
    cfg = similarity_config(models=[{"name": "multiobject-gru-s99"}, {"name": str(tmp_path / "nowhere")}],
                            out_dir=str(tmp_path))
    with pytest.raises(ConfigError) as info:
        run_similarity(cfg, log=lambda _: None)
    assert len(info.value.problems) == 2 and "models.0.name" in str(info.value)


# ----------------------------------------------------------------------------------- run + CLI
def test_run_similarity_writes_config_and_json_and_cli_prints_table(tmp_path):
    gru = _checkpoint(tmp_path / "gru", "gru", 0)
    transformer = _checkpoint(tmp_path / "transformer", "transformer", 1)
    cfg = similarity_config(name="sim", out_dir=str(tmp_path / "runs"), n_rows=100, n_repeats=3,
                            models=[{"name": gru, "site": "hidden"}, {"name": transformer, "site": "hidden"},
                                    {"name": gru, "site": "hidden"}],
                            sequences={"per_quantity": 2})
    result = run_similarity(cfg, log=lambda _: None)
    run = tmp_path / "runs" / "sim"
    assert (run / "config.yaml").read_text().startswith(f"# llm-mas similarity {run / 'config.yaml'}")
    saved = json.loads((run / "similarity.json").read_text())
    assert saved["n_sequences"] == 40 and saved["n_rows_total"] == result["n_rows_total"]
    assert [(p["a"], p["b"]) for p in saved["pairs"]] == [(0, 1), (0, 2), (1, 2)]
    self_pair = saved["pairs"][1]["metrics"]  # the GRU against itself
    assert all(self_pair[k]["mean"] == pytest.approx(1.0) for k in MEASURES)
    assert len(saved["pairs"][0]["metrics"]["cka_biased"]["values"]) == 3
    table = format_similarity_table(result)
    assert "rsa_euclidean_pearson" in table and "±" in table

    from llm_mas.commands.similarity import similarity

    app = typer.Typer()
    app.command()(similarity)
    app.command("other")(lambda: None)  # two commands: typer then expects the command name
    preset = tmp_path / "preset.yaml"
    preset.write_text(yaml.safe_dump({"name": "cli", "out_dir": str(tmp_path / "runs"), "n_rows": 50,
                                      "n_repeats": 2, "sequences": {"per_quantity": 1},
                                      "models": [{"name": gru}, {"name": transformer}]}))
    out = CliRunner().invoke(app, ["similarity", str(preset), "models.1.site=embeddings"])
    assert out.exit_code == 0, out.output
    assert "cka_unbiased" in out.output and "@ embeddings" in out.output and "wrote" in out.output
    bad = CliRunner().invoke(app, ["similarity", str(preset), "n_rows=1", "n_repeats=0"])
    assert bad.exit_code == 2 and "n_rows" in bad.output and "n_repeats" in bad.output


def test_cli_table_registers_similarity():
    from llm_mas.cli import COMMANDS

    assert COMMANDS["similarity"] == "similarity:similarity"


def test_mas_direction_summary():
    records = [{"source_index": s, "target_index": t, "variable": "full", "trial_iia": v, "token_iia": v}
               for (s, t), v in {(0, 0): 1.0, (0, 1): 0.8, (1, 0): 0.6, (1, 1): 0.9}.items()]
    summary = mas_direction_summary(records)
    assert summary == pytest.approx({"a_to_b": 0.8, "b_to_a": 0.6, "cross_mean": 0.7, "a_to_a": 1.0, "b_to_b": 0.9})
    with pytest.raises(DataError, match="variable"):
        mas_direction_summary(records, variable="count")
    with pytest.raises(DataError, match="no MAS records"):
        mas_direction_summary([])


# ----------------------------------------------------------------------------------- recipe
SMOKE_COMPARISONS = ("gru_gru_embeddings", "gru_lstm_s1_hidden", "gru_transformer_embeddings",
                     "gru_transformer_hidden")


def recipe_env() -> dict[str, str]:
    """The environment of a ``python -m recipes.<name>`` subprocess started outside the repository root."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_recipe_smoke_runs_end_to_end_and_reuses_finished_runs(tmp_path):
    """--smoke on random-weight stand-ins, a subset of the preset's comparisons (every architecture, both
    sites, stepwise and indywise MAS); a second call reuses every finished run."""
    preset = yaml.safe_load((REPO / "recipes/configs/correlative_vs_causal.yaml").read_text())
    preset["comparisons"] = [c for c in preset["comparisons"] if c["name"] in SMOKE_COMPARISONS]
    preset.update(out_dir=str(tmp_path), reuse_dirs=[])
    config = tmp_path / "recipe.yaml"
    config.write_text(yaml.safe_dump(preset))
    command = [sys.executable, "-m", "recipes.correlative_vs_causal", str(config), "--smoke",
               "--models-from-scratch"]
    env = {**recipe_env(), "MPLBACKEND": "Agg"}
    first = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    run = tmp_path / "correlative_vs_causal-smoke"
    with open(run / "comparison.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["comparison"] for r in rows] == list(SMOKE_COMPARISONS)
    for r in rows:
        for key in (*MEASURES, "mas_trial_iia_cross_mean", "mas_trial_iia_a_to_b", "mas_trial_iia_b_to_a"):
            assert np.isfinite(float(r[key])), (r["comparison"], key)
        assert float(r["mas_trial_iia_cross_mean"]) == pytest.approx(
            (float(r["mas_trial_iia_a_to_b"]) + float(r["mas_trial_iia_b_to_a"])) / 2)
    stepwise = yaml.safe_load((run / "mas/gru_transformer_embeddings/config.yaml").read_text())
    assert stepwise["data"]["stepwise"] and [m["site"] for m in stepwise["models"]] == ["embeddings"] * 2
    assert stepwise["models"][1]["name"].endswith("multiobject-transformer-s0")
    indywise = yaml.safe_load((run / "mas/gru_lstm_s1_hidden/config.yaml").read_text())
    assert not indywise["data"]["stepwise"] and indywise["models"][1]["name"].endswith("multiobject-lstm-s1")
    assert (run / "comparison.png").stat().st_size > 1000
    summary = (run / "summary.md").read_text()
    assert "| gru_transformer_hidden |" in summary and "Smoke run" in summary
    assert summary.count("RSA is low although MAS IIA is high") == 1 and summary.count("CKA/RSA look high") == 1
    second = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    assert second.stdout.count("reusing finished run") == len(SMOKE_COMPARISONS)
    assert second.stdout.count("similarity: reusing") == len(SMOKE_COMPARISONS)


def test_recipe_config_errors_are_reported_at_once(tmp_path):
    command = [sys.executable, "-m", "recipes.correlative_vs_causal",
               str(REPO / "recipes/configs/correlative_vs_causal.yaml"), f"out_dir={tmp_path}",
               "comparisons.0.mas_preset=nope.yaml", "comparisons.1.models=[a]", "similarity.n_rowz=3"]
    out = subprocess.run(command, capture_output=True, text=True, timeout=120,
                         env=recipe_env(), cwd=tmp_path)
    assert out.returncode == 2
    for needle in ("nope.yaml", "two models", "n_rowz"):
        assert needle in out.stderr, out.stderr
    first = (REPO / "recipes/configs/correlative_vs_causal.yaml").read_text().splitlines()[0]
    assert first == "# python -m recipes.correlative_vs_causal recipes/configs/correlative_vs_causal.yaml"
