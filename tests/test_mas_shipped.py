"""Golden checks on the shipped MultiObject GRU (the trained checkpoint in llm_mas/data/models)."""

from __future__ import annotations

import pytest
import torch

from llm_mas.alignments import make_alignment
from llm_mas.config import from_dict
from llm_mas.models.registry import read_manifest
from llm_mas.run import build_problem
from llm_mas.run_config import MASConfig
from llm_mas.trainer import MASTrainer, TrainerConfig

GRU = "multiobject-gru-s0"


def _config(**kw) -> MASConfig:
    base = {"models": [{"name": GRU, "site": "hidden"}, {"name": GRU, "site": "hidden"}],
            "variables": ["full"], "k": 32, "data": {"n_train": 1024, "n_valid": 400}, "progress": False}
    base.update(kw)
    return from_dict(MASConfig, base)


@pytest.mark.slow
def test_mas_with_an_exact_copy_reaches_the_models_own_accuracy(tmp_path):
    accuracy = read_manifest()["models"][GRU]["overall_accuracy"]
    cfg = _config()
    problem = build_problem(cfg)
    aligns = torch.nn.ModuleList([make_alignment("orthogonal", 128, seed=s) for s in (0, 1)])
    trainer = MASTrainer(aligns, problem, TrainerConfig(lr=3e-3, batch_size=256, max_steps=320, eval_every=40,
                                                        target_iia=accuracy - 0.01), progress=False)
    trainer.fit(resume=False)
    records = problem.evaluate(trainer.materialize(), with_ci=True)   # real autoregressive rollouts
    for r in records:
        assert r.trial_iia >= accuracy - 0.02, r


@pytest.mark.slow
def test_rollout_trial_iia_equals_the_teacher_forced_all_correct_event():
    """A half-trained alignment gives a mix of right and wrong interventions; the rollout (own predictions
    fed back) and the teacher-forced pass must agree on which trials are fully right."""
    cfg = _config(models=[{"name": GRU, "site": "hidden"}, {"name": "multiobject-gru-s1", "site": "hidden"}])
    problem = build_problem(cfg)
    aligns = torch.nn.ModuleList([make_alignment("orthogonal", 128, seed=s) for s in (0, 1)])
    MASTrainer(aligns, problem, TrainerConfig(lr=3e-3, batch_size=256, max_steps=12, eval_every=12),
               progress=False).fit(resume=False)
    maps = [a.materialize() for a in aligns]
    with torch.no_grad():
        rollout = problem.evaluate(maps, rollout=True)
        teacher = problem.evaluate(maps, rollout=False)
    assert any(0.05 < r.trial_iia < 0.95 for r in rollout)   # a discriminating mix
    for a, b in zip(rollout, teacher):
        assert a.trial_iia == b.trial_iia
