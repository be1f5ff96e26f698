"""The counterfactual problem: an oracle (identity alignment, full swap at every step = running the source),
an LM next to the shipped GRU on the same task, config checks, and a short MAS run between two shipped LMs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import llm_mas
from llm_mas.alignments import AlignmentMap
from llm_mas.errors import ConfigError
from llm_mas.problems import PROBLEMS
from llm_mas.problems.counterfactual import build_counterfactual_problem
from llm_mas.run import build_alignments, run
from llm_mas.run_config import load_mas_config

LMS = Path(llm_mas.__file__).parent / "data" / "lms"
LM0, LM1 = str(LMS / "multiobject-w128-s0"), str(LMS / "multiobject-w128-s1")


def config(models, tmp_path=None, variables=("full",), **data):
    return load_mas_config(None, base={
        "name": "cf", "out_dir": str(tmp_path or "runs"), "progress": False, "models": models,
        "variables": list(variables),
        "data": {"task": "multiobject", "n_train": 40, "n_valid": 40, **data}, "k": 16,
        "train": {"max_steps": 4, "batch_size": 16, "eval_every": 2}})


def test_registered():
    assert PROBLEMS["counterfactual"] is build_counterfactual_problem


def test_oracle_identity_full_swap_runs_the_source():
    """Stepwise 'full' with k = d and identity maps puts the source's embeddings at every position 0..i: the
    LM then reads the source's prefix and the causal model's continuation, which it predicts perfectly.
    (At a block's output the later positions have already read the target's own prefix below it.)"""
    cfg = config([{"kind": "hf", "name": LM0, "site": "embeddings"}] * 2, stepwise=True)
    cfg.k = 128
    problem = build_counterfactual_problem(cfg)
    records = problem.evaluate([AlignmentMap("identity", 128, 128)] * 2)
    assert len(records) == 4
    assert all(r.trial_iia == 1.0 and r.token_iia == 1.0 and r.n_pairs == 40 for r in records)


def test_lm_and_gru_on_the_same_task():
    """A task model reads task ids, the LM the rendered text; the same pairs, the same trainer."""
    cfg = config([{"kind": "hf", "name": LM0, "site": "layer0"},
                  {"kind": "task", "name": "multiobject-gru-s0", "site": "hidden"}], variables=["count"])
    problem = build_counterfactual_problem(cfg)
    assert [m.kind for m in problem.models] == ["hf", "task"]
    maps = [a.materialize() for a in build_alignments(cfg, problem)]
    loss, _ = problem.loss(maps, torch.arange(8))
    assert torch.isfinite(loss)
    records = problem.evaluate(maps, with_ci=True)
    assert {(r.source_index, r.target_index) for r in records} == {(0, 0), (0, 1), (1, 0), (1, 1)}
    assert all(0 <= r.trial_iia <= 1 and len(r.trial_iia_ci) == 2 for r in records)
    # the same scored continuation in both token spaces (the LM's tokens are the task ids)
    lm_items = [d for d in problem.splits["valid"] if d.target == 0]
    gru_items = [d for d in problem.splits["valid"] if d.target == 1]
    assert torch.equal(lm_items[0].labels, gru_items[0].labels)


def test_config_checks(tmp_path):
    hf = {"kind": "hf", "name": LM0}
    with pytest.raises(ConfigError, match="data.task: unknown task 'nope'"):
        config([hf], task="nope")
    with pytest.raises(ConfigError, match="not both"):
        config([hf], dataset=str(tmp_path / "x.jsonl"))
    with pytest.raises(ConfigError, match="a counterfactual run reads data.dataset / data.task, not a recording"):
        config([{**hf, "recording": "rec"}])
    (tmp_path / "d.jsonl").write_text("")
    with pytest.raises(ConfigError, match="a dataset run takes HF models only"):
        config([hf, {"kind": "task", "name": "multiobject-gru-s0"}], task=None, dataset=str(tmp_path / "d.jsonl"))
    with pytest.raises(ConfigError, match="mixing kinds 'hf' and 'task' in one run is supported only by "
                                          "counterfactual runs"):
        load_mas_config(None, base={"models": [{**hf, "recording": "r"}, {"kind": "task", "name": "multiobject-gru-s0"}]})
    cfg = config([hf, {"kind": "task", "name": "modulo-gru-s0"}])
    with pytest.raises(ConfigError, match="trained on task 'modulo', not data.task 'multiobject'"):
        build_counterfactual_problem(cfg)


def test_bad_dataset_row_before_models_load(tmp_path, monkeypatch):
    path = tmp_path / "cf.jsonl"
    path.write_text(json.dumps({"base": "<bos> D0 T", "source": "<bos> D1 T", "continuation": "R <eos>"}) + "\n"
                    + json.dumps({"base": "<bos> D0 T", "source": "<bos> D1 T", "continuation": ""}) + "\n")
    cfg = config([{"kind": "hf", "name": LM0}], task=None, dataset=str(path))
    cfg.variables = ["full"]
    import llm_mas.llm.loading as loading

    monkeypatch.setattr(loading, "load_causal_lm", lambda *a, **k: pytest.fail("a model loaded"))
    with pytest.raises(Exception, match="row 2: empty continuation"):
        build_counterfactual_problem(cfg)


def test_short_mas_run_between_shipped_lms(tmp_path):
    cfg = config([{"kind": "hf", "name": LM0, "site": "layer0"}, {"kind": "hf", "name": LM1, "site": "layer0"}],
                 tmp_path, stepwise=True)
    result = run(cfg, log=lambda s: None)
    saved = json.loads((tmp_path / "cf" / "results.json").read_text())
    records = saved["records"] if isinstance(saved, dict) else saved
    assert len(records) == 4 and len(result.records) == 4
    assert all("trial_iia_ci" in r and "token_iia_ci" in r and r["n_pairs"] == 40 for r in records)
    assert (tmp_path / "cf" / "alignments.safetensors").is_file()
