"""Frozen random-weight MultiObject task models and a `TaskModelProblem` over them (the tests of the
recurrent, packed and weighted training paths import these by name)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from llm_mas.models.task_models import build_task_model
from llm_mas.problems.task import TaskModelEntry, TaskModelProblem
from llm_mas.sites import resolve_site
from llm_mas.tasks import get_task

TASK = get_task("multiobject")


def frozen_model(arch: str, seed: int, dtype: torch.dtype = torch.float32, **overrides):
    """A freshly initialised `arch` task model (gru, lstm, transformer), eval mode, no gradients."""
    m = build_task_model(arch, "multiobject", len(TASK.vocab), seed=seed, **overrides).eval().to(dtype)
    return m.requires_grad_(False)


def task_problem(archs: Sequence[str], variables: Sequence[str] = ("count", "phase"), k: int = 16,
                 n_train: int = 96, n_valid: int = 96, seed: int = 5, **kw) -> TaskModelProblem:
    """One frozen model per architecture in `archs` (model i seeded i) at `hidden`."""
    entries = []
    for i, arch in enumerate(archs):
        m = frozen_model(arch, i)
        entries.append(TaskModelEntry(name=f"{arch}{i}", model=m, task=TASK, site=resolve_site(m, "hidden"),
                                      width=m.d_model, variable_map={}))
    return TaskModelProblem(entries, list(variables), k, n_train=n_train, n_valid=n_valid, seed=seed,
                            progress=False, **kw)
