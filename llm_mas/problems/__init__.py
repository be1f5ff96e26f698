"""Intervention problems: the data, loss and evaluation that ``MASTrainer`` optimises alignments on.

- ``base``: directions, variable blocks, grouping, scoring into typed `Record`s; the `InterventionProblem`
  protocol (everything the trainer and the runner use of a problem).
- ``task``: task models (GRU / LSTM / Transformer on counting tasks), indywise or stepwise.
- ``llm``: Hugging Face causal LMs on their recorded generations, stepwise.

``PROBLEMS`` maps a model kind (``models.i.kind`` of a run config) to the builder of its problem,
``builder(config, *, shard=None, log=None) -> InterventionProblem``; the runner looks kinds up here and
names no concrete problem.
"""

from __future__ import annotations

from collections.abc import Callable

from ..errors import ConfigError
from .base import InterventionProblem, ModelEntry, PairScores, ProblemBase, Record, Shard
from .counterfactual import CounterfactualProblem, build_counterfactual_problem
from .llm import LLMModelEntry, LLMProblem, build_llm_problem
from .task import TaskModelEntry, TaskModelProblem, build_task_problem

ProblemBuilder = Callable[..., InterventionProblem]
PROBLEMS: dict[str, ProblemBuilder] = {}


def register_problem(kind: str, builder: ProblemBuilder) -> None:
    """Register the problem builder of a model kind (a name can be registered once)."""
    if kind in PROBLEMS:
        raise ConfigError(f"problem kind {kind!r} is already registered ({PROBLEMS[kind].__qualname__})")
    PROBLEMS[kind] = builder


register_problem("task", build_task_problem)
register_problem("hf", build_llm_problem)
register_problem("counterfactual", build_counterfactual_problem)   # data.dataset or data.task set

__all__ = ["PROBLEMS", "CounterfactualProblem", "InterventionProblem", "LLMModelEntry", "LLMProblem", "ModelEntry", "PairScores",
           "ProblemBase", "Record", "Shard", "TaskModelEntry", "TaskModelProblem", "build_llm_problem",
           "build_task_problem", "register_problem"]
