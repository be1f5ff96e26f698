"""`MASTrainer`: optimises one alignment per model over chosen directions.

It is handed an *intervention problem* (``llm_mas.problems``: data, loss, evaluation — task models or LLMs) and knows nothing
of YAML, tasks or toxicity. Per step the alignment parametrizations are evaluated once
(``Alignment.materialize``) and handed to the problem. Models are frozen; only alignment parameters reach
the optimiser. Validation every ``eval_every`` steps keeps the best checkpoint (by mean validation trial
IIA over trained directions), stops early, and writes a resumable checkpoint: a killed run resumed from
its checkpoint ends exactly where an uninterrupted run ends.

The pieces, for use from Python:

    trainer = MASTrainer(alignments, problem, TrainerConfig(max_steps=200), callbacks=[ReleaseMemory()])
    out = trainer.train_step()        # one optimiser step -> StepOutput(step, loss, info, directions, seconds)
    result = trainer.fit(callbacks=[StopAfter(50, interrupt=False)])   # validation, checkpoints, stops

``fit`` runs ``train_step`` in a loop with validation, the best checkpoint and the stop rules; everything
else around the steps is a `Callback` (on_fit_start / on_step_end / on_validation / on_fit_end, each may
ask to stop): `ReleaseMemory` (hand freed heap back to the OS), `StopFile` (stop when a file appears),
`ProgressLog` (progress bar or log lines) and `StopAfter` (end a call after n steps; tests simulate a kill
with it). Without ``callbacks=`` the trainer runs ``default_callbacks()``: the first three, built from
``progress``, ``log`` and ``stop_file``.
"""

from __future__ import annotations

import copy
import ctypes
import ctypes.util
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import ConfigError, NumericalError
from .files import atomic_torch_save, load_torch_state
from .problems.base import InterventionProblem, Record
from .resources import resident_mib
from .schedules import warmup_cosine

# Every step allocates tensors whose sizes change with the batch (run widths, scored-token counts), and glibc's
# allocator keeps the freed blocks: the resident memory of a 2-model run at full size grew ~11 MB per step
# (1.2 GB after 20 steps, 2.1 GB after 100) while the live tensors stayed under 0.8 GB. Handing freed heap
# pages back to the OS every 10 steps keeps it at 1.1-1.2 GB (peak 1.2 GB after 100 steps); CPU per step
# was within the noise of a loaded machine (0.560 vs 0.546 s in separate runs; gru_gru_hidden preset,
# batch 512, 1 thread; BENCHMARKS.md). No allocator setting changes.
RELEASE_MEMORY_EVERY = 10
# ... and sooner when the resident set has grown this much over a step's working level: over a 200-step run
# the freed blocks scatter, each step touches other pages, and ten steps grew it by up to 0.8 GB (peak
# 1.53 GB); releasing every 3 or 5 steps did not bound that (BENCHMARKS.md), a release on growth does by
# construction. Every page a release hands back is faulted in again when next used, so the growth is counted
# from the end of the first step after a release, not from the trimmed heap (see ReleaseMemory).
RELEASE_MEMORY_GROWTH_MIB = 256
_LIBC = None


def release_freed_memory() -> None:
    """Return freed heap memory to the OS (glibc ``malloc_trim``); a no-op where that is not available."""
    global _LIBC
    if _LIBC is None:
        name = ctypes.util.find_library("c") if sys.platform.startswith("linux") else None
        try:
            _LIBC = ctypes.CDLL(name) if name else False
            _LIBC = _LIBC if _LIBC and hasattr(_LIBC, "malloc_trim") else False
        except OSError:
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


DIRECTION_SAMPLING = ("uniform", "balanced", "by_target")
BUDGET_GRADIENTS = ("memory", "sampled")
LR_SCHEDULES = ("constant", "cosine")


@dataclass
class TrainerConfig:
    lr: float = 1e-3
    batch_size: int = 512
    max_epochs: int = 1000
    max_steps: int | None = None      # overrides max_epochs when set
    eval_every: int | None = None     # steps between validations (default: once per epoch)
    patience: int = 10                # validations without improvement before stopping
    min_delta: float = 1e-4           # improvement of the mean validation trial IIA that counts
    target_iia: float = 0.995         # stop once every trained direction reaches this validation trial IIA
    grad_accum: int = 1               # micro-batches per optimiser step
    # trained directions per step (None: every trained direction every step); all are still evaluated
    directions_per_step: int | None = None
    direction_sampling: str = "uniform"   # uniform | balanced | by_target (see MASTrainer.step_directions)
    # with a budget, what a step's gradient is: sampled (the sampled directions' loss only) | memory (each
    # direction's last gradient, SAG: every direction counts every step; see MASTrainer._memory_gradients).
    # sampled is the default: memory trained worse per step and per CPU second (BENCHMARKS.md)
    budget_gradients: str = "sampled"
    # weight of each model's own direction (s = t, DAS) in the loss, each cross direction weighing 1 (1: the
    # paper's equal weights). > 1 keeps a model's own alignment from being pulled away by cross directions
    # no rotation can satisfy (BENCHMARKS.md, "Joint MAS across architectures"); the loss is the weighted mean
    own_weight: float = 1.0
    # keep each model's own direction where it started: with own_keep = δ, every validation that finds a
    # model's own direction (mean validation trial IIA over its variables) below its step-0 value − δ
    # multiplies that model's own-direction weight by own_boost, up to own_boost_max × own_weight; a raised
    # weight stays raised, or with own_relax is divided by own_boost (down to own_weight) at each validation
    # that finds the model back at or above that floor. None (default): off. Meant for runs started from each
    # model's alignment alone (models.i.alignment_init), whose step-0 value is what the model reaches alone.
    # The weights are a function of the validation history, so a resumed run continues with them
    # (MASTrainer.own_weights)
    own_keep: float | None = None
    own_boost: float = 2.0
    own_boost_max: float = 8.0
    own_relax: bool = False
    # the learning rate over the run's steps: constant (the default) | cosine (linear warm-up over
    # lr_warmup steps, then a half cosine from lr down to lr_min_ratio * lr at the last step,
    # llm_mas.schedules.warmup_cosine). A pure function of the step, so a resumed run continues on it
    lr_schedule: str = "constant"
    lr_warmup: int = 0
    lr_min_ratio: float = 0.0
    seed: int = 0

    def validate(self) -> list[str]:
        p = []
        if not self.lr > 0:
            p.append(f"train.lr must be > 0, got {self.lr}")
        if self.batch_size < 1:
            p.append(f"train.batch_size must be >= 1, got {self.batch_size}")
        if self.max_epochs < 1:
            p.append(f"train.max_epochs must be >= 1, got {self.max_epochs}")
        if self.max_steps is not None and self.max_steps < 0:
            p.append(f"train.max_steps must be >= 0, got {self.max_steps}")
        if self.eval_every is not None and self.eval_every < 1:
            p.append(f"train.eval_every must be >= 1, got {self.eval_every}")
        if self.grad_accum < 1:
            p.append(f"train.grad_accum must be >= 1, got {self.grad_accum}")
        if self.directions_per_step is not None and self.directions_per_step < 1:
            p.append(f"train.directions_per_step must be >= 1 or null (every direction), got "
                     f"{self.directions_per_step}")
        if self.direction_sampling not in DIRECTION_SAMPLING:
            p.append(f"train.direction_sampling {self.direction_sampling!r} must be "
                     f"{', '.join(DIRECTION_SAMPLING[:-1])} or {DIRECTION_SAMPLING[-1]}")
        if self.budget_gradients not in BUDGET_GRADIENTS:
            p.append(f"train.budget_gradients {self.budget_gradients!r} must be "
                     f"{', '.join(BUDGET_GRADIENTS[:-1])} or {BUDGET_GRADIENTS[-1]}")
        if self.lr_schedule not in LR_SCHEDULES:
            p.append(f"train.lr_schedule must be constant or cosine, got {self.lr_schedule!r}")
        if not (isinstance(self.lr_warmup, int) and self.lr_warmup >= 0):
            p.append(f"train.lr_warmup must be an integer >= 0 (steps of linear warm-up), got {self.lr_warmup!r}")
        elif self.lr_schedule == "constant" and self.lr_warmup:
            p.append(f"train.lr_warmup={self.lr_warmup} needs train.lr_schedule: cosine (the constant schedule "
                     "has no warm-up)")
        elif (self.lr_schedule == "cosine" and isinstance(self.max_steps, int) and self.max_steps > 0
              and self.lr_warmup >= self.max_steps):
            p.append(f"train.lr_warmup={self.lr_warmup} must be below the run's {self.max_steps} steps")
        if not (isinstance(self.lr_min_ratio, (int, float)) and 0 <= self.lr_min_ratio <= 1):
            p.append(f"train.lr_min_ratio must be in [0, 1] (the cosine's floor as a fraction of lr), got "
                     f"{self.lr_min_ratio!r}")
        if not 0 < self.target_iia <= 1.0 + 1e-9:
            p.append(f"train.target_iia must be in (0, 1], got {self.target_iia}")
        weight_ok = isinstance(self.own_weight, (int, float)) and math.isfinite(self.own_weight) and self.own_weight > 0
        if not weight_ok:
            p.append(f"train.own_weight must be a finite number > 0 (1: every direction weighs the same), got "
                     f"{self.own_weight!r}")
        weighted = [k for k, on in (("own_weight != 1", weight_ok and self.own_weight != 1),
                                    ("own_keep", self.own_keep is not None)) if on]
        if weighted and self.directions_per_step is not None and self.budget_gradients == "memory":
            p.append(f"train.{' and train.'.join(weighted)} {'does' if len(weighted) == 1 else 'do'} not combine "
                     "with budget_gradients: memory (its stored gradients are each direction's own); use "
                     "budget_gradients: sampled, or own_weight: 1 and own_keep: null")
        if self.own_keep is not None:
            if not (isinstance(self.own_keep, (int, float)) and not isinstance(self.own_keep, bool)
                    and 0 <= self.own_keep <= 1):
                p.append(f"train.own_keep must be null (off) or a number in [0, 1] (how far a model's own direction "
                         f"may fall below its step-0 validation trial IIA), got {self.own_keep!r}")
            if not (isinstance(self.own_boost, (int, float)) and math.isfinite(self.own_boost) and self.own_boost > 1):
                p.append(f"train.own_boost must be a finite number > 1 (the factor a fallen model's own weight is "
                         f"multiplied by), got {self.own_boost!r}")
            if not (isinstance(self.own_boost_max, (int, float)) and math.isfinite(self.own_boost_max)
                    and self.own_boost_max >= 1):
                p.append(f"train.own_boost_max must be a finite number >= 1 (the largest own weight, in units of "
                         f"own_weight), got {self.own_boost_max!r}")
            if not isinstance(self.own_relax, bool):
                p.append(f"train.own_relax must be true or false (lower a raised own weight again once the model "
                         f"is back), got {self.own_relax!r}")
        return p


@dataclass
class FitResult:
    best_step: int
    best_score: float
    steps: int
    stopped: str
    history: list[dict] = field(default_factory=list)
    best_records: list[Record] = field(default_factory=list)


@dataclass
class StepOutput:
    """What one training step (``MASTrainer.train_step``) did."""

    step: int                                   # the trainer's step count after it (the first step is 1)
    loss: float                                 # its training loss (mean over its micro-batches; under
    #                                             budget_gradients: memory, over its sampled directions too)
    info: dict[str, float]                      # the problem's loss terms (e.g. loss_behaviour), averaged alike
    directions: list[tuple[int, int]] | None    # the directions it trained (None: every trained direction)
    seconds: float                              # its wall time


class Callback:
    """What ``MASTrainer.fit`` calls around the steps; subclass and override the hooks you need (or pass any
    object with some of these methods). A hook returning a string asks training to stop before the next
    step, with that string as the reason (``FitResult.stopped``); None goes on. A stop asked this way is
    not recorded in the checkpoint, so running again continues the run. Raising stops at once (e.g.
    KeyboardInterrupt: as a kill, nothing after the last checkpoint is kept).

    - ``on_fit_start(trainer)``: after resuming and the step-0 baseline validation, before the first step;
    - ``on_validation(trainer, output, records)``: after a validation during training (its history row
      appended, the checkpoint written); ``records`` are the validation's, ``output`` the step's;
    - ``on_step_end(trainer, output)``: after every step (and its validation, when it had one);
    - ``on_fit_end(trainer, result)``: once, with the ``FitResult`` (the best alignments loaded), or None
      when training ended by an exception; its return value is ignored.

    ``trainer.running`` says whether the run would go on (steps left, no target or patience stop).
    """

    def on_fit_start(self, trainer: MASTrainer) -> str | None:
        return None

    def on_step_end(self, trainer: MASTrainer, output: StepOutput) -> str | None:
        return None

    def on_validation(self, trainer: MASTrainer, output: StepOutput, records: list[Record]) -> str | None:
        return None

    def on_fit_end(self, trainer: MASTrainer, result: FitResult | None) -> None:
        return None


def _score(records: Sequence[Record]) -> float:
    """Mean validation trial IIA over the trained directions (the model-selection score)."""
    trained = [r.trial_iia for r in records if r.trained]
    return float(sum(trained) / len(trained)) if trained else 0.0


class MASTrainer:
    def __init__(self, alignments: nn.ModuleList, problem: InterventionProblem, config: TrainerConfig,
                 checkpoint_path: str | Path | None = None, progress: bool = True,
                 log: Callable[[str], None] | None = None, sync_gradients: Callable[[nn.Module], None] | None = None,
                 stop_file: str | Path | None = None, callbacks: Sequence[Callback] | None = None):
        self.alignments = alignments
        # what fit runs around the steps (None: default_callbacks(), built from progress, log and stop_file;
        # given, it replaces them: `progress` then shows nothing and a stop file must be a StopFile in it)
        if callbacks is not None and stop_file:
            raise ConfigError(f"MASTrainer got both callbacks and stop_file={str(stop_file)!r}: the callbacks "
                              "replace the default ones, so add StopFile(path) to them instead")
        self.callbacks = list(callbacks) if callbacks is not None else None
        # creating this file ends training early (checked before every step): the best checkpoint is kept and
        # evaluated as after any other stop; the file is removed and the stop is not recorded in the checkpoint,
        # so running again continues the run. Single-process only (ranks could see it at different steps).
        self.stop_file = Path(stop_file) if stop_file else None
        self.problem = problem
        self.config = config
        self.checkpoint_path = Path(checkpoint_path) if checkpoint_path else None
        self.progress = progress
        # a progress bar on a terminal only; elsewhere (a log file, a notebook's captured stderr) one plain
        # log line per validation instead of tqdm's carriage-return fragments
        self.bar = progress and sys.stderr.isatty()
        self.log = log or (lambda s: None)
        self.sync_gradients = sync_gradients  # e.g. all-reduce under data parallelism
        params = [p for p in alignments.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(params, lr=config.lr) if params else None
        n = problem.n_train
        if n < 1:
            raise ConfigError("the training split is empty: set data.n_train >= 1")
        self.batches_per_epoch = max(1, math.ceil(n / config.batch_size))
        self.total_steps = config.max_steps if config.max_steps is not None else (
            config.max_epochs * self.batches_per_epoch)
        self.eval_every = config.eval_every or self.batches_per_epoch
        problems = config.validate()
        if config.max_steps is None and config.lr_schedule == "cosine" and config.lr_warmup >= self.total_steps:
            # an epoch budget's steps are known only now (validate checks lr_warmup against max_steps)
            problems.append(f"train.lr_warmup={config.lr_warmup} must be below the run's {self.total_steps} steps")
        if problems:
            raise ConfigError(problems)
        # every direction a loss trains (behaviour or CL), in a fixed order: what step_directions samples from
        self.trained_directions: list[tuple[int, int]] = sorted(getattr(problem, "trained_directions", ()))
        # mutable state (checkpointed)
        self.step = 0
        self.best_score = -1.0
        self.best_step = 0
        self.best_state: dict | None = None
        self.best_records: list[Record] = []
        self.evals_since_best = 0
        self.history: list[dict] = []
        self.stopped: str | None = None   # why training ended (kept in the checkpoint: a finished run stays finished)
        # budget_gradients: memory: each trained direction's last gradient on the trainable parameters of the
        # alignments it uses ({direction: {alignment index: [grad or None per parameter]}}; checkpointed)
        self.grad_memory: dict[tuple[int, int], dict[int, list[torch.Tensor | None]]] = {}
        self._loss_sum = 0.0
        self._loss_n = 0
        self._signature: dict | None = None
        self._own_cache: tuple | None = None   # own_weights' last replay: ((id, length) of the history, weights)
        self._fit_t0: float | None = None

    # ------------------------------------------------------------ data order
    def _batch(self, step: int) -> torch.Tensor:
        """Rows of training step `step`: a permutation per epoch seeded by (seed, epoch) => resumable."""
        epoch, pos = divmod(step, self.batches_per_epoch)
        g = torch.Generator().manual_seed(self.config.seed * 1_000_003 + epoch)
        perm = torch.randperm(self.problem.n_train, generator=g)
        bs = self.config.batch_size
        return perm[pos * bs:(pos + 1) * bs]

    def step_directions(self, step: int) -> list[tuple[int, int]] | None:
        """The directions training step `step` trains (None: every trained direction, the default).

        With ``directions_per_step = b`` below the number D of trained directions (in sorted order):
        - uniform: b distinct directions drawn uniformly without replacement, independently every step;
        - balanced: steps are grouped into cycles of ceil(D / b) steps; cycle c takes a permutation of the D
          directions and step j of the cycle trains its elements j·b .. j·b + b − 1 (the last step of a
          cycle trains the remaining D − (ceil(D / b) − 1)·b). Every direction is trained exactly once per
          cycle, so with directions all, cross or self every model is a source and a target equally often;
        - by_target: cycles as in balanced, but the cycle's order lists the directions target by target (a
          seeded permutation of the targets, and of each target's directions within it), so a step's b
          directions share as few targets as possible. The problem runs one patched forward pass per target,
          so a step costs about the same whatever the number of models (uniform or balanced sampling spread
          b directions over up to b targets: b small passes). Coverage per cycle is that of balanced.
        All are seeded by (seed, step) (balanced, by_target: by (seed, cycle)) alone, so a resumed run trains
        the same directions as an uninterrupted one. Returned sorted.
        """
        budget, every = self.config.directions_per_step, self.trained_directions
        if budget is None or budget >= len(every):
            return None
        if self.config.direction_sampling in ("balanced", "by_target"):
            per_cycle = math.ceil(len(every) / budget)
            cycle, pos = divmod(step, per_cycle)
            g = torch.Generator().manual_seed(self.config.seed * 1_000_003 + 500_009 + cycle)
            if self.config.direction_sampling == "balanced":
                order = torch.randperm(len(every), generator=g).tolist()
            else:
                targets = sorted({t for _, t in every})
                order = []
                for ti in torch.randperm(len(targets), generator=g).tolist():
                    mine = [i for i, (_, t) in enumerate(every) if t == targets[ti]]
                    order += [mine[j] for j in torch.randperm(len(mine), generator=g).tolist()]
            picked = torch.tensor(order[pos * budget:(pos + 1) * budget], dtype=torch.long)
        else:
            g = torch.Generator().manual_seed(self.config.seed * 1_000_003 + 700_001 + step)
            picked = torch.randperm(len(every), generator=g)[:budget]
        return [every[i] for i in sorted(picked.tolist())]

    # ------------------------------------------------------------ checkpoints
    def signature(self) -> dict:
        """What a checkpoint's numbers belong to: k, the variable blocks, the evaluated and trained directions,
        the models (name, width), the alignments (kind, shape), the intervention and a digest of the problem's
        data (its integer tensors: ids, positions, labels, indices; `problem.data_digest` when it has one).
        A checkpoint of another signature is refused on resume: an orthogonal alignment's parameters fit any
        k, so a k = 1 checkpoint would otherwise load silently under k = 8."""
        if self._signature is None:
            p = self.problem
            self._signature = {
                "k": int(p.k), "variables": list(p.all_variables),
                "blocks": {v: [b.start, b.stop] for v, b in getattr(p, "blocks", {}).items()},
                "directions": [list(d) for d in getattr(p, "directions", [])],
                "trained_directions": [list(d) for d in self.trained_directions],
                "models": [[str(m.name), int(m.width)] for m in p.models],
                "alignments": [[type(a).__name__, getattr(a, "kind", None),
                                {k: list(v.shape) for k, v in a.state_dict().items()}] for a in self.alignments],
                "intervention": getattr(p.intervention, "name", type(p.intervention).__name__),
                "n_train": int(p.n_train),
                "data": getattr(p, "data_digest", None) or splits_digest(p),
            }
        return self._signature

    def state_dict(self) -> dict:
        """Plain data only (tensors, numbers, strings, lists, dicts): it loads with ``weights_only=True``."""
        return {"signature": self.signature(), "alignments": self.alignments.state_dict(),
                "optimizer": self.optimizer.state_dict() if self.optimizer else None,
                "step": self.step, "best_score": self.best_score, "best_step": self.best_step,
                "best_state": self.best_state, "best_records": [r.to_dict() for r in self.best_records],
                "evals_since_best": self.evals_since_best, "history": [dict(row) for row in self.history],
                "stopped": self.stopped,
                **({"grad_memory": [{"direction": list(d), "grads": [[i, grads] for i, grads in per.items()]}
                                    for d, per in sorted(self.grad_memory.items())]} if self.grad_memory else {})}

    def check_signature(self, state: dict, where: str = "the checkpoint") -> None:
        """ConfigError naming every key in which the checkpoint's signature differs from this trainer's."""
        old = state.get("signature")
        if old is None:
            raise ConfigError(f"{where} records no signature (k, blocks, directions, data; written by an older "
                              "llm_mas): it cannot be checked that it belongs to this problem; delete it to start over")
        new = json.loads(json.dumps(self.signature()))
        old = json.loads(json.dumps(old))
        diffs = [f"{key}: {old.get(key)!r} -> {new.get(key)!r}" for key in sorted(set(old) | set(new))
                 if old.get(key) != new.get(key)]
        if diffs:
            raise ConfigError(f"{where} belongs to another problem (k, blocks, directions, models or data differ); "
                              "delete it (or use another checkpoint_path) to start over. What differs (checkpoint "
                              "-> now):\n" + "\n".join(f"  - {d[:300]}" for d in diffs))

    def load_state_dict(self, state: dict) -> None:
        """Restore a checkpoint: refused (ConfigError) when its signature is another problem's; one without a
        signature loads only through the runner, whose run fingerprint has already checked it."""
        if "signature" in state:
            self.check_signature(state)
        self.alignments.load_state_dict(state["alignments"])
        if self.optimizer and state["optimizer"]:
            self.optimizer.load_state_dict(state["optimizer"])
        for key in ("step", "best_score", "best_step", "best_state", "evals_since_best", "history"):
            setattr(self, key, state[key])
        self.best_records = [r if isinstance(r, Record) else Record.from_dict(r) for r in state["best_records"]]
        self.stopped = state.get("stopped")
        self.grad_memory = {(int(e["direction"][0]), int(e["direction"][1])): {int(i): list(g) for i, g in e["grads"]}
                            for e in state.get("grad_memory", [])}

    def save_checkpoint(self) -> None:
        if self.checkpoint_path is None:
            return
        atomic_torch_save(self.checkpoint_path, self.state_dict())  # a kill never leaves a half-written one

    def try_resume(self) -> bool:
        if self.checkpoint_path is None or not self.checkpoint_path.exists():
            return False
        state = load_torch_state(self.checkpoint_path)
        self.check_signature(state if isinstance(state, dict) else {}, f"checkpoint {str(self.checkpoint_path)!r}")
        self.load_state_dict(state)
        self.log(f"resumed from {self.checkpoint_path} at step {self.step}")
        return True

    def _non_finite(self, what: str, total: float, rows: torch.Tensor) -> NumericalError:
        """The error for a non-finite loss or gradient at this step, naming the directions whose own loss is
        non-finite (asked of the problem only now: the normal path pays nothing)."""
        where = ""
        per_direction = getattr(self.problem, "direction_losses", None)
        if per_direction is not None:
            with torch.no_grad():
                losses = per_direction(self.materialize(), rows)
            bad = [f"{s}→{t}:{v} ({value})" for (s, t, v), value in losses.items() if not math.isfinite(value)]
            where = (f" in direction(s) {', '.join(bad)}" if bad else
                     f" (every direction's own loss is finite: {', '.join(f'{s}→{t}:{v} {x:.4g}' for (s, t, v), x in losses.items())})")
        return NumericalError(
            f"training step {self.step + 1}: the {what} is not finite (total loss {total}){where}; nothing of this "
            f"step was applied and the last checkpoint (step {self.step}) is intact. Lower train.lr, check the "
            "models' weights and latents for NaN/inf, or set models.i.standardize: true")

    # ------------------------------------------------------------ loop
    def _last_loss(self) -> float | None:
        return self.history[-1]["train_loss"] if self.history else None

    def materialize(self) -> list[Any]:
        return [a.materialize() for a in self.alignments]

    def _step_maps(self, directions: list[tuple[int, int]] | None) -> Sequence[Any]:
        """The maps of one training step: all of them, or (a direction budget) each materialized when the
        problem first reads it, so a step pays for the alignments of its sampled directions only."""
        return self.materialize() if directions is None else _LazyMaps(self.alignments)

    def evaluate(self) -> list[Record]:
        with torch.no_grad():
            return self.problem.evaluate(self.materialize(), split="valid")

    def _after_eval(self, records: list[Record], elapsed: float) -> str | None:
        score = _score(records)
        row = {"step": self.step, "epoch": self.step / self.batches_per_epoch,
               "train_loss": self._loss_sum / max(self._loss_n, 1), "valid_score": score, "seconds": elapsed}
        for r in records:
            key = f"{r.source}->{r.target}:{r.variable}"
            row[f"{key}:trial_iia"] = r.trial_iia
            row[f"{key}:token_iia"] = r.token_iia
        before = self.own_weights() if self.config.own_keep is not None and self.history else None
        self.history.append(row)
        self._loss_sum, self._loss_n = 0.0, 0
        if before is not None:
            for i, weight in self.own_weights().items():
                if weight != before[i]:
                    self.log(f"  own_keep: {self.problem.models[i].name}'s own direction at "
                             f"{self._own_iia(row, i):.3f} {'<' if weight > before[i] else '>='} step 0's "
                             f"{self._own_iia(self.history[0], i):.3f} − {self.config.own_keep}: its weight "
                             f"{before[i]:g} -> {weight:g}")
        if score > self.best_score + self.config.min_delta or self.best_state is None:
            self.best_score, self.best_step = score, self.step
            self.best_state = copy.deepcopy(self.alignments.state_dict())
            self.best_records = records
            self.evals_since_best = 0
        else:
            self.evals_since_best += 1
        trained = [r.trial_iia for r in records if r.trained]
        if trained and min(trained) >= self.config.target_iia:
            return f"every trained direction reached validation trial IIA >= {self.config.target_iia}"
        if self.evals_since_best >= self.config.patience:
            return f"no improvement in {self.config.patience} validations"
        return None

    # ------------------------------------------------------------ the step
    def train_step(self) -> StepOutput:
        """One optimiser step on the rows and directions of step ``self.step``, then ``self.step += 1``.

        The gradient is the mean loss's over ``grad_accum`` micro-batches (each materializes the alignments
        anew); with a direction budget and ``budget_gradients: memory`` it is the gradient memory's
        (``_memory_gradients``). Raises NumericalError, before anything is applied, when the loss or a
        gradient is not finite. Validation, checkpoints and stops belong to ``fit``.
        """
        t0 = time.perf_counter()
        rows = self._batch(self.step)
        directions = self.step_directions(self.step)
        info: dict[str, float] = {}
        if self.optimizer is not None:
            for group in self.optimizer.param_groups:
                group["lr"] = self.lr_at(self.step)
        if self.optimizer is not None and directions is not None and self.config.budget_gradients == "memory":
            total, info = self._memory_gradients(rows, directions)
            self.optimizer.step()
        elif self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)
            total = 0.0
            for micro in rows.chunk(self.config.grad_accum):
                loss, terms = self._loss(self._step_maps(directions), micro, directions)
                (loss / self.config.grad_accum).backward()
                total += float(loss.detach()) / self.config.grad_accum
                _add_terms(info, terms, 1 / self.config.grad_accum)
            if not math.isfinite(total):
                raise self._non_finite("loss", total, rows)
            if self.sync_gradients is not None:
                self.sync_gradients(self.alignments)
            grads = [p.grad for p in self.alignments.parameters() if p.grad is not None]
            if grads and not bool(torch.stack([g.isfinite().all() for g in grads]).all()):
                raise self._non_finite("gradient", total, rows)
            self.optimizer.step()
        else:
            with torch.no_grad():
                loss, info = self._loss(self._step_maps(directions), rows, directions)
                total = float(loss)
            if not math.isfinite(total):
                raise self._non_finite("loss", total, rows)
        self._loss_sum += total
        self._loss_n += 1
        self.step += 1
        return StepOutput(step=self.step, loss=total, info=dict(info), directions=directions,
                          seconds=time.perf_counter() - t0)

    def own_weights(self) -> dict[int, float]:
        """Each model's own-direction weight now: ``own_weight``, raised under ``own_keep`` by replaying the
        validation history (step 0 is the reference; each later validation multiplies the weight of every
        model below its step-0 value − own_keep by own_boost, up to own_boost_max × own_weight, and with
        own_relax divides that of every model at or above it by own_boost, down to own_weight). Models
        without a trained own direction are left out."""
        c = self.config
        models = sorted({s for s, t in self.trained_directions if s == t})
        weights = {i: float(c.own_weight) for i in models}
        if c.own_keep is None or not self.history or self.history[0]["step"] != 0:
            return weights
        key = (id(self.history), len(self.history))   # the history only grows: replay once per validation
        if self._own_cache is not None and self._own_cache[0] == key:
            return dict(self._own_cache[1])
        start = {i: self._own_iia(self.history[0], i) for i in models}
        cap = c.own_weight * c.own_boost_max
        for row in self.history[1:]:
            for i in models:
                now = self._own_iia(row, i)
                if now is None or start[i] is None:
                    continue
                if now < start[i] - c.own_keep:
                    weights[i] = min(weights[i] * c.own_boost, cap)
                elif c.own_relax:
                    weights[i] = max(weights[i] / c.own_boost, float(c.own_weight))
        self._own_cache = (key, dict(weights))
        return weights

    def _own_iia(self, row: dict, i: int) -> float | None:
        """Model i's own direction in a history row: the mean validation trial IIA over its variables."""
        name = self.problem.models[i].name
        values = [row[key] for v in self.problem.all_variables
                  if (key := f"{name}->{name}:{v}:trial_iia") in row]
        return float(sum(values) / len(values)) if values else None

    def _loss(self, maps, rows: torch.Tensor, directions: list[tuple[int, int]] | None):
        """The step's loss and terms: ``problem.loss`` over the step's directions (None: every trained one),
        or with ``own_weight`` != 1 the weighted mean (w·n_own·L_own + n_cross·L_cross) / (w·n_own + n_cross)
        of the own directions' mean loss and the cross directions' (two calls on the same maps and rows).
        Under ``own_keep`` the own directions are grouped by their model's weight (``own_weights``): one
        call per group, Σ_g w_g·n_g·L_g + n_cross·L_cross over Σ_g w_g·n_g + n_cross."""
        weights = self.own_weights() if self.config.own_keep is not None else None
        w = self.config.own_weight
        plain = {} if directions is None else {"directions": directions}   # the loss as before the key existed
        if w == 1 and (weights is None or all(x == 1 for x in weights.values())):
            return self.problem.loss(maps, rows, **plain)
        pool = self.trained_directions if directions is None else [tuple(d) for d in directions]
        own = [d for d in pool if d[0] == d[1]]
        cross = [d for d in pool if d[0] != d[1]]
        if not own or not cross:
            return self.problem.loss(maps, rows, **plain)
        groups: dict[float, list[tuple[int, int]]] = {}
        for d in own:
            groups.setdefault(weights[d[0]] if weights is not None else w, []).append(d)
        parts = [(gw * len(ds), *self.problem.loss(maps, rows, directions=ds)) for gw, ds in sorted(groups.items())]
        parts.append((len(cross), *self.problem.loss(maps, rows, directions=cross)))
        norm = sum(a for a, _, _ in parts)
        terms = {key: sum(a * t.get(key, 0.0) for a, _, t in parts) / norm for key in set().union(*(t for *_, t in parts))}
        return sum(a * loss for a, loss, _ in parts) / norm, terms

    def _memory_gradients(self, rows: torch.Tensor, directions: list[tuple[int, int]]
                          ) -> tuple[float, dict[str, float]]:
        """Set the parameters' gradients from the gradient memory (SAG) and return the step's loss and terms.

        Each sampled direction's gradient is computed alone (its own loss over the step's rows, on freshly
        materialized maps; ``grad_accum`` micro-batches; averaged over processes by ``sync_gradients``) and
        replaces that direction's stored one, which covers only its source and target alignments. The step
        then uses (1 / D) × the sum of every stored gradient (D trained directions; a direction not trained
        yet adds nothing), which is the every-direction loss's gradient once every direction has been
        trained at the current parameters and rows, as ``loss`` averages the directions' losses. The loss
        returned is the mean of the sampled directions' losses (what ``sampled`` reports for the same step).
        Nothing is stored before every fresh gradient is checked finite.
        """
        accum = self.config.grad_accum
        total, info = 0.0, {}
        fresh: dict[tuple[int, int], dict[int, list[torch.Tensor | None]]] = {}
        for d in directions:
            self.optimizer.zero_grad(set_to_none=True)
            for micro in rows.chunk(accum):
                loss, terms = self.problem.loss(_LazyMaps(self.alignments), micro, directions=[d])
                (loss / accum).backward()
                total += float(loss.detach()) / accum / len(directions)
                _add_terms(info, terms, 1 / accum / len(directions))
            if not math.isfinite(total):
                raise self._non_finite("loss", total, rows)
            if self.sync_gradients is not None:
                self.sync_gradients(self.alignments)
            fresh[d] = {i: [None if p.grad is None else p.grad.detach().clone() for p in self._trainable(i)]
                        for i in sorted(set(d))}
            grads = [g for per in fresh[d].values() for g in per if g is not None]
            if grads and not bool(torch.stack([g.isfinite().all() for g in grads]).all()):
                raise self._non_finite("gradient", total, rows)
        self.grad_memory.update(fresh)
        self.optimizer.zero_grad(set_to_none=True)
        scale = 1.0 / len(self.trained_directions)
        for d in sorted(self.grad_memory):   # a fixed order: the sum does not depend on when d was stored
            for i, per in self.grad_memory[d].items():
                for p, g in zip(self._trainable(i), per):
                    if g is not None:
                        p.grad = g * scale if p.grad is None else p.grad.add_(g, alpha=scale)
        return total, info

    def lr_at(self, step: int) -> float:
        """The learning rate of (0-based) step `step` under ``lr_schedule``."""
        if self.config.lr_schedule == "constant":
            return self.config.lr
        return self.config.lr * warmup_cosine(step, self.total_steps, self.config.lr_warmup,
                                              self.config.lr_min_ratio)

    def _trainable(self, i: int) -> list[nn.Parameter]:
        return [p for p in self.alignments[i].parameters() if p.requires_grad]

    # ------------------------------------------------------------ fit
    @property
    def running(self) -> bool:
        """Whether training goes on: steps are left and no stop rule (target, patience) has fired."""
        return self.stopped is None and self.step < self.total_steps

    def elapsed(self) -> float:
        """Seconds since this ``fit`` call started (0 outside one)."""
        return time.perf_counter() - self._fit_t0 if self._fit_t0 is not None else 0.0

    def default_callbacks(self) -> list[Callback]:
        """What ``fit`` runs when the trainer was given no ``callbacks``: memory release, the stop file (when
        one was given) and the progress bar / log lines."""
        return [ReleaseMemory(), *([StopFile(self.stop_file)] if self.stop_file is not None else []),
                ProgressLog(self.bar, self.log)]

    def _notify(self, callbacks: Sequence[Callback], hook: str, *args: Any) -> str | None:
        """Call ``hook`` on every callback (in order); the first stop reason returned, if any."""
        reason = None
        for cb in callbacks:
            method = getattr(cb, hook, None)
            said = method(self, *args) if method is not None else None
            reason = reason or said
        return reason

    def fit(self, resume: bool = True, callbacks: Sequence[Callback] = ()) -> FitResult:
        """Train until a stop rule fires (target, patience, step budget) or a callback asks to stop.

        ``callbacks`` run before the trainer's own (``self.callbacks``, by default ``default_callbacks()``)
        for this call only, e.g. ``StopAfter(n)``. A stop asked by a callback is not recorded in the
        checkpoint (running again continues the run); one by the target or patience is.
        """
        if resume:
            self.try_resume()
        self._fit_t0 = time.perf_counter()
        callbacks = [*callbacks, *(self.callbacks if self.callbacks is not None else self.default_callbacks())]
        stopped = self.stopped
        if self.step == 0 and self.best_state is None:
            stopped = self.stopped = self._after_eval(self.evaluate(), 0.0)  # step-0 baseline: the random init
            self.save_checkpoint()
        try:
            reason = self._notify(callbacks, "on_fit_start")
            stopped = stopped or reason
            while stopped is None and self.step < self.total_steps:
                out = self.train_step()
                if self.step % self.eval_every == 0 or self.step == self.total_steps:
                    records = self.evaluate()
                    # target / patience stops are kept in the checkpoint; a step-budget stop is not (a larger
                    # budget on resume continues the run), nor is one a callback asks for
                    stopped = self.stopped = self._after_eval(records, self.elapsed())
                    self.save_checkpoint()
                    reason = self._notify(callbacks, "on_validation", out, records)
                    stopped = stopped or reason
                reason = self._notify(callbacks, "on_step_end", out)
                stopped = stopped or reason
            if stopped is None:
                stopped = f"step budget reached ({self.total_steps} steps)"
        except BaseException:
            self._notify(callbacks, "on_fit_end", None)
            self._fit_t0 = None
            raise
        if self.best_state is not None:
            self.alignments.load_state_dict(self.best_state)
        result = FitResult(best_step=self.best_step, best_score=self.best_score, steps=self.step, stopped=stopped,
                           history=self.history, best_records=self.best_records)
        self._notify(callbacks, "on_fit_end", result)
        self._fit_t0 = None
        return result


# ------------------------------------------------------------ built-in callbacks
class ReleaseMemory(Callback):
    """Hand freed heap memory back to the OS: at the start, every ``every`` steps, after each validation, and
    whenever the resident set at a step's end has grown by ``growth_mib`` over its level at the end of the
    first step after the last release (RELEASE_MEMORY_EVERY).

    The level is taken after a step, not right after the release: a step's own working set (freed at its
    end, reused by the next step) is part of it, so only creep beyond it (freed blocks scattering over new
    pages) triggers a release. Measured against the trimmed heap instead, a step whose working set exceeds
    ``growth_mib`` (15 models: ~2 GB) released at every step's end, and the next step faulted all of it in
    again (23 % of a 15-model run's CPU time and a third of the 2-model preset's spent in the kernel)."""

    def __init__(self, every: int = RELEASE_MEMORY_EVERY, growth_mib: float = RELEASE_MEMORY_GROWTH_MIB):
        self.every, self.growth_mib = every, growth_mib
        self.level: float | None = None   # resident MiB at the end of the first step after the last release

    def _release(self) -> None:
        release_freed_memory()
        self.level = None

    def on_fit_start(self, trainer):
        self._release()  # start from a trimmed heap (the build leaves freed blocks behind)

    def on_validation(self, trainer, output, records):
        self._release()  # what the validation passes freed

    def on_step_end(self, trainer, output):
        resident = resident_mib()
        if self.level is None:
            self.level = resident
        if trainer.step % self.every == 0 or (resident is not None and resident > self.level + self.growth_mib):
            self._release()


class StopFile(Callback):
    """Stop before the next step once ``path`` exists; the file is removed (single process only: ranks could
    see it at different steps). The stop is not recorded in the checkpoint, so running again continues."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def _check(self, trainer: MASTrainer) -> str | None:
        if trainer.running and self.path.exists():
            self.path.unlink(missing_ok=True)
            return f"stopped early at step {trainer.step}: {self.path} was created"
        return None

    def on_fit_start(self, trainer):
        return self._check(trainer)

    def on_step_end(self, trainer, output):
        return self._check(trainer)


class StopAfter(Callback):
    """End a ``fit`` call after ``steps`` steps of it (not counting resumed ones) if the run would go on.
    ``interrupt=True`` (default) raises KeyboardInterrupt, as a kill would (tests of resume: the last
    checkpoint is all that is kept); ``interrupt=False`` asks for an ordinary stop (the best alignments are
    loaded and a FitResult returned)."""

    def __init__(self, steps: int, interrupt: bool = True):
        if steps < 0:
            raise ConfigError(f"StopAfter needs steps >= 0, got {steps}")
        self.steps, self.interrupt = steps, interrupt
        self.done = 0

    def _check(self, trainer: MASTrainer) -> str | None:
        if self.done >= self.steps and trainer.running:
            if self.interrupt:
                raise KeyboardInterrupt(f"StopAfter({self.steps}) reached")
            return f"stopped after {self.steps} steps of this call (StopAfter)"
        return None

    def on_fit_start(self, trainer):
        self.done = 0
        return self._check(trainer)

    def on_step_end(self, trainer, output):
        self.done += 1
        return self._check(trainer)


class ProgressLog(Callback):
    """The legend line, then a progress bar (``bar=True``: on a terminal) or one log line per validation
    (elsewhere: a log file, a notebook's captured stderr), and the closing line."""

    def __init__(self, bar: bool, log: Callable[[str], None]):
        self.show_bar, self.log = bar, log
        self.bar = None

    def on_fit_start(self, trainer):
        from tqdm.auto import tqdm

        names = [getattr(m, "name", str(i)) for i, m in enumerate(getattr(trainer.problem, "models", []))]
        if names:
            self.log("directions are shown as source→target:variable; " +
                     ", ".join(f"{i} = {name}" for i, name in enumerate(names)))
        self.bar = tqdm(total=trainer.total_steps, initial=trainer.step, disable=not self.show_bar, desc="MAS",
                        leave=False, ncols=100)

    def on_step_end(self, trainer, output):
        self.bar.update(1)

    def on_validation(self, trainer, output, records):
        if self.show_bar:
            self.bar.set_postfix_str(_short_postfix(output.loss, records), refresh=False)
        else:
            self.log(f"step {trainer.step}/{trainer.total_steps} ({trainer.elapsed():.0f}s) "
                     f"{_postfix(trainer._last_loss(), records)}")

    def on_fit_end(self, trainer, result):
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if result is not None:
            self.log(f"stopped at step {result.steps}: {result.stopped}; best step {result.best_step} "
                     f"(mean valid trial IIA {result.best_score:.4f})")


def _add_terms(into: dict[str, float], terms: dict[str, float] | None, weight: float) -> None:
    for key, value in (terms or {}).items():
        into[key] = into.get(key, 0.0) + weight * float(value)


def splits_digest(problem: Any) -> str:
    """A hash of the integer and boolean tensors / arrays of every item of a problem's splits (ids, positions,
    labels, masks, indices: the data; float latents are left out, float noise must not refuse a resume)."""
    import hashlib

    import numpy as np

    h = hashlib.sha256()
    for split, items in sorted(getattr(problem, "splits", {}).items()):
        for item in items:
            h.update(f"{split}:{item.source}:{item.target}:{item.variable}:{item.trained}".encode())
            values = vars(item).items() if hasattr(item, "__dict__") else []
            for key, value in values:
                if isinstance(value, torch.Tensor) and not value.is_floating_point():
                    value = value.detach().cpu().contiguous().numpy()
                if isinstance(value, np.ndarray) and value.dtype.kind in "biu":
                    h.update(f"{key}:{value.dtype}:{value.shape}".encode())
                    h.update(np.ascontiguousarray(value).tobytes())
    return h.hexdigest()[:16]


class _LazyMaps(Sequence):
    """``maps[i]`` materializes alignment i on first access (then reuses it)."""

    def __init__(self, alignments: nn.ModuleList):
        self._alignments = alignments
        self._done: dict[int, Any] = {}

    def __len__(self) -> int:
        return len(self._alignments)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        i = range(len(self))[i]
        if i not in self._done:
            self._done[i] = self._alignments[i].materialize()
        return self._done[i]


def _label(r: Record) -> str:
    """``0→1:full``: source and target by index (the legend logged at the start names them)."""
    return f"{r.source_index}→{r.target_index}:{r.variable}"


def _postfix(loss: float | None, records: Sequence[Record]) -> str:
    """Every direction's validation trial IIA (a log line)."""
    parts = [] if loss is None else [f"loss {loss:.3f}"]
    parts.extend(f"{_label(r)} {r.trial_iia:.2f}" for r in records)
    return " ".join(parts)


def _short_postfix(loss: float | None, records: Sequence[Record]) -> str:
    """What fits beside a 100-column bar: loss, mean and the weakest trained direction."""
    trained = [r for r in records if r.trained] or list(records)
    parts = [] if loss is None else [f"loss {loss:.3f}"]
    if trained:
        worst = min(trained, key=lambda r: r.trial_iia)
        parts.append(f"IIA {_score(records):.2f} (min {_label(worst)} {worst.trial_iia:.2f})")
    return " ".join(parts)[:48]
