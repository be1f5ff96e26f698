"""The LM alignment recipe end to end at smoke size (every run trains 2 steps), and its untrained copy."""

from __future__ import annotations

import csv

import torch

from recipes import lm_alignment


def test_smoke_end_to_end(tmp_path):
    assert lm_alignment.main(["--smoke", f"out_dir={tmp_path}"]) == 0
    out = tmp_path / "lm_alignment-smoke"
    rows = list(csv.DictReader(open(out / "results.csv")))
    runs = {r["run"] for r in rows}
    assert runs == {"mas_s0_s1", "mas_s0_untrained", "mas_s0_w96", "mas_s0_gru", "das_s0", "das_s1", "das_w96",
                    "das_s0_embeddings", "das_s0_layer0", "das_s0_layer1"}
    assert all(r["status"] in ("trained", "reused", "resumed") and 0 <= float(r["trial_iia"]) <= 1 for r in rows)
    assert (out / "lm_alignment.png").stat().st_size > 0
    assert "two seeds" in (out / "summary.md").read_text()
    # --report rewrites the outputs from the finished runs without training
    assert lm_alignment.main(["--smoke", f"out_dir={tmp_path}", "--report"]) == 0


def test_untrained_copy_has_fresh_weights(tmp_path):
    from transformers import AutoModelForCausalLM

    state = torch.random.get_rng_state()
    copy = lm_alignment.untrained_copy("multiobject-w128-s0", tmp_path / "u", seed=0)
    assert torch.equal(state, torch.random.get_rng_state())      # the global generator is left as it was
    trained = AutoModelForCausalLM.from_pretrained(lm_alignment.lm_dir("multiobject-w128-s0"))
    fresh = AutoModelForCausalLM.from_pretrained(copy)
    assert trained.config.n_embd == fresh.config.n_embd
    assert not torch.equal(trained.transformer.wte.weight, fresh.transformer.wte.weight)
    assert (copy / "tokenizer.json").is_file()


BINDING_CONFIG = "recipes/configs/lm_alignment_binding.yaml"


def test_binding_smoke_reads_its_counterfactual_dataset(tmp_path):
    from recipes.lm_alignment import REPO

    config = str(REPO / BINDING_CONFIG)
    assert lm_alignment.main([config, "--smoke", f"out_dir={tmp_path}"]) == 0
    out = tmp_path / "lm_alignment_binding-smoke"
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert {r["run"] for r in rows} == {"mas_s0_s1", "mas_s0_untrained", "mas_s0_w96", "das_s0", "das_s1",
                                        "das_w96", "das_s0_embeddings", "das_s0_layer0", "das_s0_layer1"}
    (dataset,) = out.glob("binding_answer_*.jsonl")  # n_train + n_valid rows of the smoke size
    lines = dataset.read_text().splitlines()
    assert len(lines) == 32 + 16 and all(line.startswith('{"base": "<bos> ') for line in lines)
    summary = (out / "summary.md").read_text()
    assert "variable binding" in summary and "queried name (after '?')" in summary


def test_binding_config_errors(tmp_path, capsys):
    from recipes.lm_alignment import REPO

    config = str(REPO / BINDING_CONFIG)
    assert lm_alignment.main([config, "--smoke", f"out_dir={tmp_path}", "binding_counterfactual=value"]) != 0
    assert "binding_counterfactual must be one of answer, query" in capsys.readouterr().err
