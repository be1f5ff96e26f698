"""The NeuroGym worked example: the task generator (NeuroGym's own, and the numpy reimplementation of its
trial structure), the recipe's smoke run end to end, and the executed notebook."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import pytest

from recipes import neurogym_example as ex

ROOT = Path(__file__).resolve().parents[1]


def test_the_numpy_task_has_neurogyms_trial_structure():
    """Same periods, fixation input, targets and stimulus statistics per (choice, coherence) as
    neurogym.envs.PerceptualDecisionMaking with the recipe's timing (different random streams)."""
    ours, ng = ex.trials(6000, seed=0, use_neurogym=False), ex.trials(6000, seed=0, use_neurogym=True)
    for x, gt, _ in (ours, ng):
        x = x.numpy()
        assert x.shape == (6000, ex.T, 3) and ex.T == 17
        assert (x[:, :ex.FIX + ex.STIM + ex.DELAY, 0] == 1).all() and (x[:, -ex.DECIDE:, 0] == 0).all()
        assert (x[:, :ex.FIX, 1:] == 0).all() and (x[:, ex.FIX + ex.STIM:, 1:] == 0).all()
        assert (gt[:, :-ex.DECIDE] == 0).all() and set(np.unique(gt[:, -1])) == {1, 2}
        assert (gt[:, -1] == gt[:, -2]).all()
    stats = []
    for x, gt, evidence in (ours, ng):
        mean_ev = evidence.mean(1)
        choice1 = gt[:, -1] == 2
        noise = x[:, ex.FIX:ex.FIX + ex.STIM, 1].numpy() - x[:, ex.FIX:ex.FIX + ex.STIM, 1].numpy().mean(1,
                                                                                                        keepdims=True)
        stats.append((mean_ev[choice1].mean(), mean_ev[~choice1].mean(), noise.std() * np.sqrt(ex.STIM / (ex.STIM - 1)),
                      choice1.mean(), ((evidence.sum(1) > 0) == choice1).mean()))
    for a, b, what in zip(*stats, ("evidence | choice 1", "evidence | choice 0", "noise std", "P(choice 1)",
                                   "ideal observer accuracy")):
        assert a == pytest.approx(b, abs=0.02), (what, a, b)
    assert stats[0][2] == pytest.approx(0.1, abs=0.005)                   # sigma / sqrt(dt)


def test_the_recipe_smoke_run_writes_its_table(tmp_path):
    assert ex.main(["--smoke", "--runs", str(tmp_path / "runs")]) == 0
    rows = list(csv.DictReader(open(tmp_path / "runs" / "neurogym.csv")))
    assert "| choice MAS k=1 cross |" in (tmp_path / "runs" / "neurogym.md").read_text()
    iia = {(r["analysis"], r["rows"], r["direction"]): float(r["trial_iia"]) for r in rows}
    assert len(rows) == 22 and all(float(r["ci_lo"]) <= float(r["trial_iia"]) <= float(r["ci_hi"]) for r in rows)
    das = [v for (a, _, _), v in iia.items() if a.startswith("choice DAS")]
    rand8 = [v for (a, _, _), v in iia.items() if a == "choice random alignments k=8 cross"]
    real = iia[("choice CLMAS k=1 vs simulated recording", "all", "recording→gru-s0")]
    shuffled = [iia[("choice CLMAS k=1 vs trial-shuffled simulated recording", "all", d)]
                for d in ("gru-s0→shuffled-recording", "shuffled-recording→gru-s0")]
    assert min(das) > 0.8 and max(rand8) < 0.4, (das, rand8)          # a trained 1-d subspace vs random 8-d
    assert real > 0.8 and max(shuffled) < 0.75, (real, shuffled)      # on every row: no flip shortcut


@pytest.mark.slow
def test_neurogym_notebook_executes(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    notebook = nbformat.read(ROOT / "notebooks" / "neurogym.ipynb", as_version=4)
    nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    text = "\n".join(o.get("text", "") for c in notebook.cells if c.cell_type == "code" for o in c.outputs)
    assert "choice accuracy" in text and "evaluated on new rows" in text, text
    lines = [line for line in text.splitlines() if line.startswith("CLMAS")]
    assert len(lines) == 4 and "(cl)" in text and "(behaviour)" in text, lines
    recording_to_gru = float(next(x for x in lines if "recording -> gru-s0" in x).split("IIA ")[1].split()[0])
    assert recording_to_gru > 0.8, lines
    assert (tmp_path / "runs").is_dir()
