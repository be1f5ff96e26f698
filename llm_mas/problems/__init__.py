"""Intervention problems: the data, loss and evaluation that ``MASTrainer`` optimises alignments on.

- ``base``: directions, variable blocks, grouping, scoring into typed `Record`s; the `InterventionProblem`
  protocol (everything the trainer and the runner use of a problem).
- ``task``: task models (GRU / LSTM / Transformer on counting tasks), indywise or stepwise.
- ``llm``: Hugging Face causal LMs on their recorded generations, stepwise.
- ``counterfactual``: LMs and task models on a text dataset or a built-in task rendered per model.
- ``tensors``: any models (any kind with a loader) on `CounterfactualTensors`.
- ``kinds``: model kinds as registry entries (schema, checks, loader, digests; ``KINDS``).

``PROBLEMS`` maps a run's kind (``MASConfig.kind``: a model kind, or ``counterfactual`` / ``tensors``) to
the builder of its problem, ``builder(config, *, shard=None, log=None) -> InterventionProblem``; the runner
looks kinds up here and names no concrete problem.
"""

from __future__ import annotations

from collections.abc import Callable

from ..errors import ConfigError
from .base import InterventionProblem, ModelEntry, PairScores, ProblemBase, Record, Shard
from .counterfactual import CounterfactualProblem, build_counterfactual_problem
from .kinds import (
    KINDS,
    GenericModelConfig,
    LoadedModel,
    ModelConfigBase,
    ModelKind,
    ModuleModelConfig,
    _register_builtins,
    register_kind,
)
from .llm import LLMModelEntry, LLMProblem, build_llm_problem
from .task import TaskModelEntry, TaskModelProblem, build_task_problem
from .tensors import TensorProblem, build_tensor_problem

ProblemBuilder = Callable[..., InterventionProblem]
PROBLEMS: dict[str, ProblemBuilder] = {}


RUN_KINDS = ("counterfactual", "tensors")   # kinds of runs that mix model kinds (no model kind has these names)


def register_problem(kind: str, builder: ProblemBuilder, schema: type | None = None, **kind_options) -> None:
    """Register the problem builder of a model kind (a name can be registered once): the kind is then a
    registry entry (`ModelKind`) that configs accept (``models.i.kind: <kind>``), with ``schema`` (default
    `GenericModelConfig`: the common keys and ``options``) and any other `ModelKind` field (load, check,
    fingerprint)."""
    if kind in PROBLEMS:
        raise ConfigError(f"problem kind {kind!r} is already registered ({PROBLEMS[kind].__qualname__})")
    if kind not in RUN_KINDS:
        if kind in KINDS:
            raise ConfigError(f"model kind {kind!r} is already registered")
        register_kind(ModelKind(kind, schema or GenericModelConfig, build=builder, **kind_options))
    PROBLEMS[kind] = builder


_register_builtins()   # task, hf, module (their schemas, loaders and digests)
PROBLEMS.update({"task": build_task_problem, "hf": build_llm_problem})
register_problem("counterfactual", build_counterfactual_problem)   # data.dataset (text) or data.task set
register_problem("tensors", build_tensor_problem)                  # counterfactual tensors

__all__ = ["KINDS", "PROBLEMS", "CounterfactualProblem", "GenericModelConfig", "LoadedModel", "ModelConfigBase",
           "ModelKind", "ModuleModelConfig", "TensorProblem", "build_tensor_problem", "register_kind", "InterventionProblem", "LLMModelEntry", "LLMProblem", "ModelEntry", "PairScores",
           "ProblemBase", "Record", "Shard", "TaskModelEntry", "TaskModelProblem", "build_llm_problem",
           "build_task_problem", "register_problem"]
