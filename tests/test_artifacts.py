"""Alignments as artifacts: a finished run's alignments scored on new counterfactual data without training
(`llm_mas.evaluate`, `llm-mas evaluate`), refused for other weights, and a run directory that never imports
code (a planted factory path / plugin in its config.yaml is never imported)."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from open_fixtures import GRUNet, decision_data, train_decision

import llm_mas
from llm_mas.errors import ConfigError
from llm_mas.models.modules import state_digest
from llm_mas.problems.tensors import split_rows

ROOT = Path(__file__).resolve().parents[1]
FIT = {"train": {"max_steps": 120, "batch_size": 128, "eval_every": 40, "lr": 1e-2}, "progress": False}


@pytest.fixture(scope="module")
def grus():
    nets = [GRUNet(16, seed) for seed in (0, 1)]
    accuracy = [train_decision(net, 200, seed) for seed, net in enumerate(nets)]
    assert min(accuracy) > 0.85, accuracy
    return [net.eval() for net in nets]


@pytest.fixture(scope="module")
def trained_run(grus, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    data = decision_data(300, seed=5)
    result = llm_mas.compare(models=grus, data=data, site="rnn", k=1, names=["gru-a", "gru-b"], out_dir=str(out),
                             name="choice", **FIT)
    return out / "choice", data, result


def test_the_run_records_its_alignment_specs_and_the_module_digests(trained_run, grus):
    run_dir, _, _ = trained_run
    manifest = json.loads((run_dir / "alignments.json").read_text())
    assert manifest["k"] == 1 and manifest["variables"] == ["full"] and manifest["blocks"] == {"full": [0, 1]}
    assert manifest["intervention"] == "interchange"
    for i, m in enumerate(manifest["models"]):
        assert m["alignment"]["kind"] == "orthogonal" and m["alignment"]["d"] == 16 and m["width"] == 16
        assert m["state_digest"] == state_digest(grus[i])
    from safetensors.torch import load_file

    stored = load_file(str(run_dir / "alignments.safetensors"))
    assert manifest["tensors"] == {k: list(v.shape) for k, v in stored.items()}
    assert {k.split(".")[0] for k in stored} == {"model0", "model1"}


def test_evaluate_reproduces_the_run_on_its_valid_rows_and_scores_new_data(trained_run, grus):
    run_dir, data, result = trained_run
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    valid = split_rows(len(data), cfg["data"]["n_train"], cfg["data"]["n_valid"], cfg["seed"])["valid"]
    again = llm_mas.evaluate(run_dir, models=grus, data=data.subset(valid), log=lambda s: None)
    assert again.models == ["gru-a", "gru-b"]
    for old, new in zip(result.records, again.records):
        assert (old.source_index, old.target_index, old.n_pairs) == (new.source_index, new.target_index, new.n_pairs)
        assert new.trial_iia == pytest.approx(old.trial_iia, abs=1e-9)
        assert new.loss == pytest.approx(old.loss, rel=1e-4)
    fresh = llm_mas.evaluate(run_dir, models=grus, data=decision_data(400, seed=11), log=lambda s: None)
    m = fresh.matrix()
    assert fresh.records[1].n_pairs == 400              # every row of new data is scored
    assert m[0, 1] > 0.85 and m[1, 0] > 0.85, m           # the trained alignments transfer to new trials
    # a random alignment of the same rank does not (the 1-d swap then leaves the base's own choice)
    random = llm_mas.compare(models=grus, data=data, site="rnn", k=1, out_dir=str(run_dir.parent), name="random",
                             train={"max_steps": 0}, progress=False)
    assert (llm_mas.evaluate(run_dir.parent / "random", models=grus, data=decision_data(400, seed=11),
                             log=lambda s: None).matrix() < 0.3).all()
    assert random.records


def test_evaluate_refuses_other_weights_naming_the_model(trained_run, grus):
    run_dir, data, _ = trained_run
    other = copy.deepcopy(grus[1])
    with torch.no_grad():
        other.head.bias.add_(1e-3)
    with pytest.raises(ConfigError, match=r"models\[1\] \(gru-b\): its weights differ") as e:
        llm_mas.evaluate(run_dir, models=[grus[0], other], data=data, log=lambda s: None)
    assert "models[0]" not in str(e.value)
    with pytest.raises(ConfigError, match=r"(?s)models\[0\].*models\[1\]"):         # swapped: both named
        llm_mas.evaluate(run_dir, models=grus[::-1], data=data, log=lambda s: None)
    with pytest.raises(ConfigError, match="the run has 2 models; got 1"):
        llm_mas.evaluate(run_dir, models=grus[:1], data=data, log=lambda s: None)
    with pytest.raises(ConfigError, match="tensors given in Python .* pass data="):
        llm_mas.evaluate(run_dir, models=grus, log=lambda s: None)


EVIL = """
from pathlib import Path
Path({sentinel!r}).write_text("imported")
def make():
    raise SystemExit("the planted factory ran")
"""


def _plant(run_dir: Path, tmp_path: Path) -> Path:
    """A module whose import writes a file, named as the factory of model 0 and as a plugin in config.yaml."""
    sentinel = tmp_path / "imported.txt"
    (tmp_path / "planted_factory.py").write_text(EVIL.format(sentinel=str(sentinel)))
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    cfg["plugins"] = ["planted_factory"]
    cfg["models"][0].update(factory="planted_factory:make", weights=str(tmp_path / "none.safetensors"))
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg))
    return sentinel


def test_a_factory_planted_in_the_run_is_never_imported(trained_run, grus, tmp_path, monkeypatch):
    import shutil

    run_dir = tmp_path / "planted"
    shutil.copytree(trained_run[0], run_dir)
    sentinel = _plant(run_dir, tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))        # importable, were anything to import it
    with pytest.raises(ConfigError, match=r"models\[0\].*kind 'module'.*never imported"):
        llm_mas.evaluate(run_dir, data=trained_run[1], log=lambda s: None)
    res = llm_mas.evaluate(run_dir, models=grus, data=decision_data(200, seed=3), log=lambda s: None)
    assert res.matrix()[0, 1] > 0.85
    assert not sentinel.exists() and "planted_factory" not in sys.modules


def test_cli_evaluate_takes_factories_named_on_the_command_line(trained_run, grus, tmp_path):
    import shutil

    from safetensors.torch import save_file

    run_dir = tmp_path / "planted"
    shutil.copytree(trained_run[0], run_dir)
    sentinel = _plant(run_dir, tmp_path)
    data = decision_data(200, seed=3)
    data.save(tmp_path / "new")
    for i, net in enumerate(grus):
        save_file(net.state_dict(), str(tmp_path / f"gru{i}.safetensors"))
    (tmp_path / "user_nets.py").write_text("from open_fixtures import GRUNet\n\ndef gru16():\n    return GRUNet(16)\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests"), str(tmp_path)])}
    cmd = [sys.executable, "-m", "llm_mas.cli", "evaluate", str(run_dir), "--data", str(tmp_path / "new"),
           "--out", str(tmp_path / "records.json")]
    for i in range(2):
        cmd += ["--factory", f"{i}=user_nets:gru16", "--weights", f"{i}={tmp_path / f'gru{i}.safetensors'}"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    records = json.loads((tmp_path / "records.json").read_text())
    expected = llm_mas.evaluate(trained_run[0], models=grus, data=data, log=lambda s: None)
    assert [r["trial_iia"] for r in records] == pytest.approx([r.trial_iia for r in expected.records], abs=1e-9)
    assert not sentinel.exists()
    # weights of another model: refused, exit status 2, one line naming the model
    cmd_bad = cmd[:-4] + ["--factory", "1=user_nets:gru16"]          # model 1 left at its initialisation
    done = subprocess.run(cmd_bad, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "models[1]" in done.stderr and "weights differ" in done.stderr, done.stderr
    assert not sentinel.exists()


def test_a_task_model_run_is_reloaded_from_its_config_and_rescored(tmp_path):
    """Task models are data (checkpoint files): evaluate reloads them by name; the same seed reproduces the
    run's records exactly, another seed scores new pairs; another checkpoint is refused."""
    from llm_mas.config import from_dict
    from llm_mas.run import run
    from llm_mas.run_config import MASConfig

    cfg = from_dict(MASConfig, {
        "name": "task", "out_dir": str(tmp_path), "progress": False, "k": 8, "variables": ["count"],
        "models": [{"name": "multiobject-gru-s0"}, {"name": "multiobject-gru-s1"}],
        "data": {"n_train": 128, "n_valid": 64}, "train": {"batch_size": 64, "max_steps": 4, "eval_every": 2}})
    result = run(cfg, log=lambda s: None)
    again = llm_mas.evaluate(tmp_path / "task", log=lambda s: None)
    assert [(r.trial_iia, r.token_iia, r.n_pairs) for r in again.records] == \
        [(r.trial_iia, r.token_iia, r.n_pairs) for r in result.records]
    other = llm_mas.evaluate(tmp_path / "task", seed=5, log=lambda s: None)
    assert [r.n_pairs for r in other.records] == [r.n_pairs for r in result.records]
    assert [r.trial_iia for r in other.records] != [r.trial_iia for r in result.records]
    with pytest.raises(ConfigError, match=r"models\[1\] \(multiobject-gru-s2\): its model.safetensors differ"):
        llm_mas.evaluate(tmp_path / "task", models=[None, "multiobject-gru-s2"], log=lambda s: None)
