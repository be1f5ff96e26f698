"""What every intervention problem shares: directions, variable blocks, grouping by target, scoring into
typed `Record`s, and the `InterventionProblem` protocol (the whole interface the trainer and runner use).

A problem owns its data (pairs, cached source latents) and computes, for evaluated alignment maps, the
training loss and the evaluation records. The concrete problems (``task.py``: task models, ``llm.py``: HF
causal LMs) implement only what differs: building the splits and running one batch of a target. The
intervention itself (interchange, rank-k stitch, linear stitch) is one `llm_mas.interventions.Intervention`
called the same way for every kind (docs/method.md).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from ..errors import ConfigError
from ..interventions import Intervention, make_intervention, variable_blocks
from ..sites import Site
from ..stats import bootstrap_ci, ratio_ci

Direction = tuple[int, int]  # (source model index, target model index)


# ------------------------------------------------------------------------------------ results
@dataclass
class Record:
    """The evaluation of one (source, target, variable): one row of ``results.json``.

    A plain dataclass: read fields as attributes (``record.n_tokens``). Optional fields are None where a
    problem does not report them (and are then left out of ``to_dict``, the ``results.json`` form):
    n_tokens (LLMs), trained_by / cl_unmatched / cl_loss (task models; CL-trained directions), the CIs and
    per-quantity IIA (final evaluation only), best_step (set by the runner).
    """

    source: str
    target: str
    source_index: int
    target_index: int
    variable: str
    trained: bool
    trial_iia: float          # fraction of pairs with every scored token right
    token_iia: float          # micro-averaged fraction of scored tokens right
    loss: float               # cross-entropy per scored token
    n_pairs: int
    n_tokens: int | None = None
    trained_by: str | None = None          # behaviour | cl | none
    cl_unmatched: int | None = None        # pairs without a matching counterfactual latent
    cl_loss: float | None = None
    trial_iia_ci: list[float] | None = None
    token_iia_ci: list[float] | None = None
    trial_iia_by_quantity: dict[int, float] | None = None
    best_step: int | None = None

    @property
    def key(self) -> tuple[int, int, str]:
        return self.source_index, self.target_index, self.variable

    def to_dict(self) -> dict[str, Any]:
        """The ``results.json`` form: every field that is set."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not None}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Record:
        """From a ``results.json`` entry (JSON turns the per-quantity keys into strings; they come back as ints)."""
        data = dict(data)
        if data.get("trial_iia_by_quantity") is not None:
            data["trial_iia_by_quantity"] = {int(q): v for q, v in data["trial_iia_by_quantity"].items()}
        return cls(**data)


@dataclass
class PairScores:
    """Per-pair outcomes of one (source, target, variable) on a split, in pair order (numpy, (n,) each)."""

    trial: np.ndarray      # 1.0 where every scored token was right
    correct: np.ndarray    # correctly predicted scored tokens
    scored: np.ndarray     # scored tokens
    loss_sum: float        # summed cross-entropy over every scored token


# ------------------------------------------------------------------------------------ entries
@dataclass
class ModelEntry:
    """One resolved model taking part in a run (``problem.models[i]``); problems extend it."""

    name: str
    model: Any               # what the problem runs (a task model, an HF model or a HookedTransformer)
    site: Site
    width: int               # latent width at the site


@dataclass
class DirectionPairs:
    """The pairs of one (source, target, variable) on one split, as tensors (problems extend it)."""

    source: int
    target: int
    variable: str
    block: slice             # the variable's aligned coordinates
    trained: bool

    def __len__(self) -> int:
        raise NotImplementedError


# ------------------------------------------------------------------------------------ data parallelism
class Shard:
    """This process's part of a data-parallel run: rows ``rank::world`` of every batch.

    ``gather(obj)`` returns the list of every process's ``obj`` (rank order); single process: ``[obj]``.
    The launcher (``llm_mas.distributed``) also hands over its collectives: ``barrier()``,
    ``broadcast(module)`` (rank 0's parameters to every process) and ``average_gradients(module)``.
    """

    def __init__(self, rank: int = 0, world: int = 1, gather: Callable[[Any], list] | None = None, *,
                 barrier: Callable[[], None] | None = None, broadcast: Callable[[Any], None] | None = None,
                 average_gradients: Callable[[Any], None] | None = None):
        if not 0 <= rank < world:
            raise ConfigError(f"shard rank {rank} must lie in 0..{world - 1} (world size {world})")
        if world > 1 and gather is None:
            raise ConfigError("a shard of a multi-process run needs a gather function (see llm_mas.distributed)")
        self.rank, self.world = rank, world
        self._gather = gather
        self.barrier = barrier or (lambda: None)
        self.broadcast = broadcast or (lambda module: None)
        self.average_gradients = average_gradients

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def rows(self, rows: torch.Tensor) -> torch.Tensor:
        return rows[self.rank::self.world]

    def gather(self, obj: Any) -> list:
        return [obj] if self.world == 1 else self._gather(obj)


# ------------------------------------------------------------------------------------ protocol
class InterventionProblem(Protocol):
    """Everything the trainer and the runner use of a problem."""

    models: Sequence[ModelEntry]              # name, width of each model
    k: int                                    # aligned coordinates per variable
    all_variables: list[str]                  # the variables evaluated (``null`` included when trained)
    stepwise: bool
    latent_stats: list[tuple[torch.Tensor, torch.Tensor]]  # per model: (mean, std) of its training latents
    intervention: Intervention
    n_train: int                              # training pairs per (direction, variable): rows of a batch

    trained_directions: list[Direction]       # every direction a loss trains (behaviour or CL), sorted

    def loss(self, maps: Sequence[Any], batch_index: torch.Tensor, directions: Sequence[Direction] | None = None
             ) -> tuple[torch.Tensor, dict[str, float]]:
        """Mean loss over the trained (source, target, variable) pairs for these training rows; `directions`:
        only those trained directions (a step's sampled budget; None: all of them)."""

    def evaluate(self, maps: Sequence[Any], split: str = "valid", with_ci: bool = False) -> list[Record]:
        """One record per evaluated (source, target, variable)."""


# ------------------------------------------------------------------------------------ shared base
class ProblemBase:
    """Directions, variable blocks, grouping and scoring; subclasses build the splits and run batches.

    Subclasses set ``self.splits = {"train": [...], "valid": [...]}`` (lists of `DirectionPairs`) and
    implement ``loss`` and ``_pair_scores``; ``_extra_fields`` adds problem-specific record fields.
    """

    supported_interventions: tuple[str, ...] = ("interchange", "stitch", "linear_stitch")

    def __init__(self, models: Sequence[ModelEntry], variables: Sequence[str], k: int, *,
                 null_subspace: bool = False, stepwise: bool = False,
                 train_directions: Sequence[Direction] | None = None, cl_directions: Sequence[Direction] = (),
                 intervention: str | Intervention = "interchange", n_train: int = 10_000, n_valid: int = 1_000,
                 seed: int = 0, eval_batch_size: int = 1000):
        if eval_batch_size < 1:
            raise ConfigError(f"eval.batch_size must be >= 1, got {eval_batch_size}")
        name = intervention.name if isinstance(intervention, Intervention) else intervention
        if name not in self.supported_interventions:
            raise ConfigError(f"intervention {name!r} must be "
                              + " or ".join(", ".join(map(repr, self.supported_interventions)).rsplit(", ", 1)))
        self.models = list(models)
        n = len(self.models)
        self.variables = list(variables)
        self.k = k
        self.stepwise = stepwise
        self.n_train, self.n_valid = n_train, n_valid
        self.seed = seed
        self.eval_batch_size = eval_batch_size
        every = [(s, t) for s in range(n) for t in range(n)]
        self.train_directions = set(map(tuple, train_directions)) if train_directions is not None else set(every)
        self.intervention = (intervention if isinstance(intervention, Intervention)
                             else make_intervention(intervention, self.train_directions))
        self.directions = self.intervention.evaluated_directions(every)
        self.cl_directions = set(map(tuple, cl_directions))
        bad = [d for d in self.train_directions | self.cl_directions if d not in self.directions]
        if bad:
            raise ConfigError(f"directions {sorted(bad)} name models outside 0..{n - 1}")
        self.blocks = variable_blocks(self.variables, k, min(m.width for m in self.models), null=null_subspace)
        self.all_variables = self.variables + (["null"] if null_subspace else [])
        self.latent_stats: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.splits: dict[str, list[DirectionPairs]] = {}

    @property
    def trained_directions(self) -> list[Direction]:
        """Every evaluated direction some loss trains (by behaviour or by the CL loss), sorted."""
        return sorted(d for d in self.directions if d in self.train_directions or d in self.cl_directions)

    @staticmethod
    def _only(items: Sequence[DirectionPairs], directions: Sequence[Direction] | None) -> list[DirectionPairs]:
        """The items of these directions (None: all items)."""
        if directions is None:
            return list(items)
        wanted = set(map(tuple, directions))
        return [item for item in items if (item.source, item.target) in wanted]

    # ------------------------------------------------------------------ grouping
    def _group_key(self, pairs: DirectionPairs) -> Hashable:
        return pairs.target

    def _groups(self, items: Sequence[DirectionPairs]) -> list[list[DirectionPairs]]:
        """Items sharing a target (first-seen order): all of them run in one forward pass of that target."""
        groups: dict[Hashable, list[DirectionPairs]] = {}
        for item in items:
            groups.setdefault(self._group_key(item), []).append(item)
        return list(groups.values())

    # ------------------------------------------------------------------ scoring
    def evaluate(self, maps: Sequence[Any], split: str = "valid", with_ci: bool = False, **options) -> list[Record]:
        """One `Record` per (source, target, variable) of the split, in the split's order.

        with_ci: add bootstrap 95 % CIs over pairs (trial IIA: of the per-pair outcomes; token IIA: of the
        micro-averaged ratio); the subclass's options (e.g. the task models' rollout) pass through.
        """
        items = self.splits[split]
        scores = self._pair_scores(maps, split, with_ci, **options)
        return [self._record(maps, item, scores[id(item)], with_ci) for item in items]

    def pair_scores(self, maps: Sequence[Any], split: str = "valid", **options) -> list[tuple[DirectionPairs, PairScores]]:
        """Per (source, target, variable) of the split, in the split's order: the item and its per-pair
        outcomes, for comparing two sets of maps pair by pair on the same pairs
        (``llm_mas.stats.paired_comparison``)."""
        scores = self._pair_scores(maps, split, False, **options)
        return [(item, scores[id(item)]) for item in self.splits[split]]

    def _pair_scores(self, maps: Sequence[Any], split: str, with_ci: bool, **options) -> dict[int, PairScores]:
        """Per item of the split (keyed by ``id(item)``): its per-pair outcomes."""
        raise NotImplementedError

    def _extra_fields(self, maps: Sequence[Any], item: DirectionPairs, scores: PairScores,
                      with_ci: bool) -> dict[str, Any]:
        return {}

    def _record(self, maps: Sequence[Any], item: DirectionPairs, scores: PairScores, with_ci: bool) -> Record:
        trial, correct, scored = scores.trial, scores.correct, scores.scored
        fields = {}
        if with_ci:
            fields["trial_iia_ci"] = list(bootstrap_ci(trial, seed=self.seed))
            fields["token_iia_ci"] = list(ratio_ci(correct, scored, seed=self.seed))
        fields.update(self._extra_fields(maps, item, scores, with_ci))
        return Record(source=self.models[item.source].name, target=self.models[item.target].name,
                      source_index=item.source, target_index=item.target, variable=item.variable,
                      trained=item.trained, trial_iia=float(trial.mean()),
                      token_iia=float(correct.sum() / max(scored.sum(), 1)),
                      loss=float(scores.loss_sum / max(scored.sum(), 1)), n_pairs=int(len(trial)), **fields)
