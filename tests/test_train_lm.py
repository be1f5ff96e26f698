"""`llm-mas train-lm` and the LMs trained with it (llm_mas/data/lms, package data): HF directories load_causal_lm reads, whose
word-level tokenizer reproduces the task ids, and whose free-running accuracy holds up on fresh samples."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from llm_fixtures import tiny_qwen2_dir  # noqa: F401  (sets the offline environment variables)

from llm_mas.errors import ConfigError
from llm_mas.llm.loading import load_causal_lm
from llm_mas.llm.train_lm import ACCURACY_BAR, free_running_accuracy, train_lm
from llm_mas.resources import package_path
from llm_mas.sites import site_aliases
from llm_mas.tasks.binding import get_text_task
from llm_mas.tasks.text import render_texts, resolve_positions

SHIPPED = package_path("data", "lms")
MANIFEST = SHIPPED / "manifest.json"


def test_train_lm_command_writes_a_loadable_directory(tmp_path):
    from typer.testing import CliRunner

    from llm_mas.cli import app

    out = tmp_path / "lms" / "tiny"
    result = CliRunner().invoke(app, ["train-lm", "--task", "multiobject", "--out", str(out), "--width", "32",
                                      "--layers", "1", "--heads", "2", "--steps", "3", "--eval-per-n", "2",
                                      "--seed", "7", "--manifest"])
    assert result.exit_code == 0, result.output
    assert "below the 0.99 bar" in result.output  # 3 steps do not learn the task, and the command says so
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 3 and metrics["seed"] == 7 and metrics["width"] == 32
    assert set(metrics["accuracy_per_n"]) == {str(n) for n in range(1, 21)}
    manifest = json.loads((out.parent / "manifest.json").read_text())
    assert [e["name"] for e in manifest["lms"]] == ["tiny"] and manifest["lms"][0]["params"] == metrics["params"]

    model, tokenizer = load_causal_lm(out)
    assert sum(p.numel() for p in model.parameters()) == metrics["params"]
    assert "embeddings" in site_aliases(model) and "layer0" in site_aliases(model)
    task = get_text_task("multiobject")
    batch = task.sample(4, np.random.default_rng(0))
    encoded = resolve_positions(tokenizer, render_texts(task, batch))
    assert (encoded.input_ids == batch.ids[:, : encoded.input_ids.shape[1]]).all()  # LM ids == task ids

    # the same seed gives the same weights
    again = train_lm("multiobject", tmp_path / "again", width=32, layers=1, heads=2, steps=3, eval_per_n=2, seed=7)
    twin, _ = load_causal_lm(tmp_path / "again")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), twin.state_dict().values()))
    assert again["final_loss"] == metrics["final_loss"]
    with pytest.raises(ConfigError, match="not empty"):
        train_lm("multiobject", out, width=32, layers=1, heads=2, steps=1)
    with pytest.raises(ConfigError, match="not divisible"):
        train_lm("multiobject", tmp_path / "bad", width=30, heads=4, steps=1)


def shipped_lms():
    if not MANIFEST.exists():
        return []
    return json.loads(MANIFEST.read_text())["lms"]


def test_manifest_lists_the_promised_lms():
    lms = shipped_lms()
    multi = [e for e in lms if e["task"] == "multiobject"]
    widths = sorted(e["width"] for e in multi)
    assert len(multi) >= 3 and len(set(widths)) >= 2 and max(widths.count(w) for w in widths) >= 2
    assert all(e["passes_bar"] for e in multi)
    bind = [e for e in lms if e["task"] == "binding"]  # the template task: same promise
    bind_widths = sorted(e["width"] for e in bind)
    assert len(bind) >= 3 and len(set(bind_widths)) >= 2 and max(bind_widths.count(w) for w in bind_widths) >= 2
    assert all(e["passes_bar"] for e in bind)
    for entry in lms:
        assert entry["passes_bar"] == (entry["min_accuracy"] >= ACCURACY_BAR)
        assert entry["min_accuracy"] == min(entry["accuracy_per_n"].values())
        assert entry["weights_bytes"] < 3 * 2**20
        assert len({e["seed"] for e in lms if e["task"] == entry["task"]}) == len(
            [e for e in lms if e["task"] == entry["task"]])  # independently seeded


@pytest.mark.parametrize("entry", shipped_lms(), ids=lambda e: e["name"])
def test_shipped_lm_accuracy(entry):
    model, tokenizer = load_causal_lm(SHIPPED / entry["name"])
    task = get_text_task(entry["task"])
    # a fresh sample (a seed the training and its evaluation never used), 25 sequences per N
    accuracy = free_running_accuracy(model, task, per_n=25, seed=2024)
    if entry["passes_bar"]:
        assert min(accuracy.values()) >= ACCURACY_BAR, accuracy
    else:  # it fails on a fresh sample too
        assert min(accuracy.values()) < ACCURACY_BAR, accuracy
    batch = task.sample(8, np.random.default_rng(5))
    encoded = resolve_positions(tokenizer, render_texts(task, batch))
    assert (encoded.input_ids == batch.ids[:, : encoded.input_ids.shape[1]]).all()


def test_train_lm_llama_keeps_the_word_tokenizer(tmp_path):
    metrics = train_lm("binding", tmp_path / "llama", arch="llama", width=32, layers=1, heads=2, steps=2,
                       eval_per_n=2, loss_on="all")
    model, tokenizer = load_causal_lm(tmp_path / "llama")
    assert type(model).__name__ == "LlamaForCausalLM" and metrics["loss_on"] == "all"
    task = get_text_task("binding")
    batch = task.sample(4, np.random.default_rng(0))
    encoded = resolve_positions(tokenizer, render_texts(task, batch))
    assert (encoded.input_ids == batch.ids[:, : encoded.input_ids.shape[1]]).all()
    with pytest.raises(ConfigError, match="valid choices: gpt2, llama"):
        train_lm("binding", tmp_path / "x", arch="qwen2", steps=1)
    with pytest.raises(ConfigError, match="valid choices: task, all"):
        train_lm("binding", tmp_path / "y", loss_on="everything", steps=1)


def test_train_lm_curriculum_and_extra_queries(tmp_path, monkeypatch):
    """The curriculum starts at N = 2, adds the next N once the quick evaluation clears the bar on every N so far,
    and trains on the full range once N = 6 is in; extra questions lengthen the training rows (positions)."""
    import llm_mas.llm.train_lm as train_module
    from llm_mas.tasks.binding import binding

    seen = []
    original_sample = type(binding()).sample

    def recording_sample(self, n, rng, quantities=None, hold_outs=()):
        seen.append(None if quantities is None else tuple(quantities))
        return original_sample(self, n, rng, quantities, hold_outs)

    monkeypatch.setattr(type(binding()), "sample", recording_sample)
    # every quick evaluation reports perfect accuracy: the curriculum moves on at every evaluation
    monkeypatch.setattr(train_module, "free_running_accuracy",
                        lambda model, task, per_n=200, seed=0, **kw: {n: 1.0 for n in range(1, 7)})
    metrics = train_lm("binding", tmp_path / "c", arch="llama", width=32, layers=1, heads=2, steps=12,
                       eval_every=2, curriculum=True, extra_queries=3, extra_query_fraction=0.5)
    trained = seen[:10]  # the training batches (evaluations are patched out)
    assert trained[:2] == [(2,), (2,)] and trained[2:4] == [(2, 3), (2, 3)] and trained[4:6] == [(2, 3, 4)] * 2
    assert trained[8] is None  # N = 6 added at step 8: the full range 1..6 (the sampler's default)
    assert metrics["curriculum_steps"] == {"2": 0, "3": 2, "4": 4, "5": 6, "6": 8}
    assert metrics["steps"] == 12 and metrics["extra_queries"] == 3 and metrics["extra_query_fraction"] == 0.5
    model, _ = load_causal_lm(tmp_path / "c")
    assert model.config.max_position_embeddings >= binding().max_len + 8
    with pytest.raises(ConfigError, match="only the binding task"):
        train_lm("multiobject", tmp_path / "m", steps=1, extra_queries=2)
    with pytest.raises(ConfigError, match=r"extra_query_fraction must be in \[0, 1\], got 1.5"):
        train_lm("binding", tmp_path / "f", steps=1, extra_queries=2, extra_query_fraction=1.5)
