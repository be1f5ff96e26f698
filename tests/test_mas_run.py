"""End-to-end `run` / `llm-mas mas`: outputs, reproducibility, resume, config errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from llm_mas.config import from_dict
from llm_mas.errors import ConfigError
from llm_mas.run import run
from llm_mas.run_config import MASConfig, load_mas_config
from llm_mas.trainer import MASTrainer, StopAfter


def _cfg(tmp_path, name="run", **kw) -> MASConfig:
    data = {"name": name, "out_dir": str(tmp_path), "progress": False, "k": 16, "variables": ["count", "phase"],
            "models": [{"name": "multiobject-gru-s0"}, {"name": "multiobject-gru-s1"}],
            "data": {"n_train": 192, "n_valid": 96}, "train": {"batch_size": 64, "max_steps": 8, "eval_every": 2}}
    data.update(kw)
    return from_dict(MASConfig, data)


@pytest.mark.slow
def test_run_writes_outputs_and_is_reproducible_and_resumable(tmp_path, monkeypatch):
    res = run(_cfg(tmp_path, "a"), log=lambda s: None)
    run_dir = tmp_path / "a"
    for f in ("config.yaml", "alignments.safetensors", "results.json", "history.csv", "iia_matrix.png"):
        assert (run_dir / f).exists(), f
    records = json.loads((run_dir / "results.json").read_text())
    assert len(records) == 8  # 4 directions × 2 variables
    for r in records:
        for key in ("source", "target", "variable", "trial_iia", "trial_iia_ci", "token_iia", "n_pairs"):
            assert key in r
        assert r["trial_iia_ci"][0] <= r["trial_iia"] <= r["trial_iia_ci"][1]
    assert res.matrix("count").shape == (2, 2) and len(res.to_dataframe()) == 8
    # the saved config reproduces the run exactly
    again = load_mas_config(run_dir / "config.yaml", ["name=b", f"out_dir={tmp_path}"])
    run(again, log=lambda s: None)
    assert (tmp_path / "b" / "results.json").read_text() == (run_dir / "results.json").read_text()

    # killed after 5 steps (last checkpoint at step 4), then the same command again
    real_fit = MASTrainer.fit
    calls = {"n": 0}

    def dying_fit(self, resume=True, callbacks=()):
        calls["n"] += 1
        return real_fit(self, resume=resume, callbacks=[StopAfter(5)] if calls["n"] == 1 else callbacks)

    monkeypatch.setattr(MASTrainer, "fit", dying_fit)
    with pytest.raises(KeyboardInterrupt):
        run(_cfg(tmp_path, "c"), log=lambda s: None)
    assert not (tmp_path / "c" / "results.json").exists()
    run(_cfg(tmp_path, "c"), log=lambda s: None)
    assert (tmp_path / "c" / "results.json").read_text() == (run_dir / "results.json").read_text()


def test_config_problems_are_reported_together_before_loading(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("models:\n  - {name: no-such-model, alignment: rotation}\nk: 0\nvariabels: [count]\n"
                   "train: {lr: -1}\n")
    with pytest.raises(ConfigError) as e:
        cfg = load_mas_config(bad)
        run(cfg)
    msg = str(e.value)
    for part in ("variabels", "rotation", "k must be >= 1", "train.lr must be > 0", "no-such-model"):
        assert part in msg, msg


def test_unknown_model_name_lists_the_shipped_ones(tmp_path):
    cfg = _cfg(tmp_path, models=[{"name": "multiobject-gru-s9"}])   # configs may name models not made yet
    with pytest.raises(ConfigError) as e:                             # running one does not
        run(cfg)
    assert "multiobject-gru-s0" in str(e.value) and "multiobject-gru-s9" in str(e.value)


def test_cli_reports_a_bad_override_with_one_line_and_exit_2(tmp_path):
    out = subprocess.run([sys.executable, "-m", "llm_mas.cli", "mas", "gru_gru_hidden",
                          "train.lr=abc", "nosuchkey=1", f"out_dir={tmp_path}"], capture_output=True, text=True)
    assert out.returncode == 2
    assert "train.lr" in out.stderr and "nosuchkey" in out.stderr and "Traceback" not in out.stderr


def test_alignment_options_reach_the_alignments_and_bad_ones_are_reported_before_loading():
    from types import SimpleNamespace

    from llm_mas.interventions import make_intervention
    from llm_mas.run import build_alignments

    models = [{"name": "multiobject-gru-s0", "alignment_options": {"orthogonal_map": "cayley"}},
              {"name": "multiobject-gru-s1"}]
    config = from_dict(MASConfig, {"models": models, "k": 4})
    problem = SimpleNamespace(models=[SimpleNamespace(width=8)] * 2, k=4, all_variables=["full"],
                              latent_stats=[None, None], intervention=make_intervention("interchange"))
    maps = [{str(m.orthogonal_map).split(".")[-1] for m in a.modules() if hasattr(m, "orthogonal_map")}
            for a in build_alignments(config, problem)]
    assert "cayley" in maps[0] and "cayley" not in maps[1] and "matrix_exp" in maps[1]
    bad = [{"name": "multiobject-gru-s0", "alignment_options": {"orthogonal_map": "expm"}},
           {"name": "multiobject-gru-s1", "alignment": "gram_schmidt", "alignment_options": {"bias": True}}]
    with pytest.raises(ConfigError) as err:
        from_dict(MASConfig, {"models": bad})
    assert "models.0.alignment_options: unknown orthogonal_map 'expm'" in str(err.value)
    assert "models.1.alignment_options: unknown option(s) 'bias'" in str(err.value)
