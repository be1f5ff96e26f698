"""Shipped presets (llm_mas/presets/*.yaml): lookup by name or path, listing, and that each one loads."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from llm_mas.cli import app
from llm_mas.correlative import load_similarity_config
from llm_mas.errors import ConfigError
from llm_mas.models.registry import models_dir, shipped_models_dir, update_manifest
from llm_mas.presets import list_presets, preset_command, presets_dir, resolve_preset
from llm_mas.run_config import load_mas_config
from llm_mas.toxicity.data import SAMPLE_PATH
from recipes.common.plans import preset_path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "llm_mas"
MAS_PRESETS = {"das_gru", "gru_gru_embeddings_stepwise", "gru_gru_hidden", "gru_lstm_hidden",
               "gru_transformer_embeddings", "gru_transformer_hidden", "three_grus"}
LLM_PRESETS = {"llm_deepseek", "llm_tiny"}  # their models are fine-tunes / tiny builds made by the user first
SIMILARITY_PRESETS = {"similarity_architectures", "similarity_gru_gru"}


def test_the_shipped_presets_are_package_files():
    assert presets_dir() == PACKAGE / "presets"
    assert set(list_presets()) == MAS_PRESETS | LLM_PRESETS | SIMILARITY_PRESETS


def test_shipped_data_lives_in_the_package():
    assert shipped_models_dir() == PACKAGE / "data" / "models"
    assert (shipped_models_dir() / "manifest.json").is_file()
    assert SAMPLE_PATH == PACKAGE / "data" / "toxicity" / "sample.jsonl" and SAMPLE_PATH.is_file()
    if "LLM_MAS_MODELS_DIR" not in os.environ:
        assert models_dir() == shipped_models_dir()


def test_models_dir_follows_the_environment_variable(monkeypatch, tmp_path):
    monkeypatch.setenv("LLM_MAS_MODELS_DIR", str(tmp_path))
    assert models_dir() == tmp_path and shipped_models_dir() == PACKAGE / "data" / "models"


def test_the_manifest_writer_writes_only_where_it_is_told(monkeypatch, tmp_path):
    monkeypatch.setenv("LLM_MAS_MODELS_DIR", str(tmp_path / "mine"))
    with pytest.raises(ConfigError, match="does not exist"):      # never falls back to the package's directory
        update_manifest()
    (tmp_path / "mine").mkdir()
    assert update_manifest()["models"] == {} and (tmp_path / "mine" / "manifest.json").is_file()
    other = tmp_path / "other"
    other.mkdir()
    update_manifest(other)
    assert (other / "manifest.json").is_file()


@pytest.mark.parametrize("given", ["gru_gru_hidden", "gru_gru_hidden.yaml", "gru_gru_hidden.yml"])
def test_a_preset_resolves_by_name_with_or_without_suffix(given, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_preset(given) == PACKAGE / "presets" / "gru_gru_hidden.yaml"


def test_an_existing_file_wins_over_a_preset_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "gru_gru_hidden.yaml").write_text("name: mine\n")
    assert resolve_preset("gru_gru_hidden.yaml") == Path("gru_gru_hidden.yaml")
    assert resolve_preset(tmp_path / "gru_gru_hidden.yaml") == tmp_path / "gru_gru_hidden.yaml"
    assert resolve_preset("gru_gru_hidden") == PACKAGE / "presets" / "gru_gru_hidden.yaml"  # no such file here


def test_unknown_preset_names_the_close_ones_and_the_list_command(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as info:
        resolve_preset("gru_gru_hiden")
    text = str(info.value)
    assert "'gru_gru_hiden'" in text and "gru_gru_hidden" in text and "llm-mas list-presets" in text
    # an old checkout path is not silently mapped to the preset of the same name, but suggested
    with pytest.raises(ConfigError, match="did you mean gru_gru_hidden"):
        resolve_preset("recipes/configs/gru_gru_hidden.yaml")
    with pytest.raises(ConfigError, match="is a directory"):
        resolve_preset(tmp_path)


def test_every_preset_names_its_own_command_on_the_first_line():
    for name in list_presets():
        first = resolve_preset(name).read_text().splitlines()[0]
        command = "llm-mas similarity" if name in SIMILARITY_PRESETS else "llm-mas mas"
        assert preset_command(name) == command
        assert first.startswith(f"# {command} {name}") or f"{command} {name}" in first, first
        assert "recipes/configs" not in resolve_preset(name).read_text()


@pytest.mark.parametrize("name", sorted(MAS_PRESETS))
def test_every_task_model_preset_loads(name):
    cfg = load_mas_config(resolve_preset(name), [])   # validates keys, values and the shipped model names
    assert cfg.name == ("das_gru_k4" if name == "das_gru" else name)


@pytest.mark.parametrize("name", sorted(SIMILARITY_PRESETS))
def test_every_similarity_preset_loads(name):
    assert load_similarity_config(resolve_preset(name)).name == name


def test_recipe_configs_point_at_existing_presets():
    for path in sorted((REPO / "recipes" / "configs").glob("*.yaml")):
        data = yaml.safe_load(path.read_text())
        presets = [data.get("mas_preset")] + [c.get("mas_preset") for c in data.get("comparisons", [])]
        for preset in filter(None, presets):
            assert preset_path(preset).is_file(), (path.name, preset)


def test_cli_lists_presets_and_takes_one_by_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    listed = runner.invoke(app, ["list-presets"])
    assert listed.exit_code == 0
    for name in list_presets():
        assert name in listed.output
    # resolved by name: the error is about the override, not about a missing file
    bad = runner.invoke(app, ["mas", "gru_gru_hidden", "nosuchkey=1", f"out_dir={tmp_path}"])
    assert bad.exit_code == 2 and "nosuchkey" in bad.output and "does not exist" not in bad.output
    unknown = runner.invoke(app, ["mas", "gru_gru_hiden"])
    assert unknown.exit_code == 2 and "did you mean gru_gru_hidden" in unknown.output
    similarity = runner.invoke(app, ["similarity", "similarity_gru_gru", "n_rowz=3"])
    assert similarity.exit_code == 2 and "n_rowz" in similarity.output
