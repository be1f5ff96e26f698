"""`MASTrainer`: optimises one alignment per model over chosen directions.

It is handed an *intervention problem* (``llm_mas.problems``: data, loss, evaluation — task models or LLMs) and knows nothing
of YAML, tasks or toxicity. Per step the alignment parametrizations are evaluated once
(``Alignment.materialize``) and handed to the problem. Models are frozen; only alignment parameters reach
the optimiser. Validation every ``eval_every`` steps keeps the best checkpoint (by mean validation trial
IIA over trained directions), stops early, and writes a resumable checkpoint: a killed run resumed from
its checkpoint ends exactly where an uninterrupted run ends.
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

# Every step allocates tensors whose sizes change with the batch (run widths, scored-token counts), and glibc's
# allocator keeps the freed blocks: the resident memory of a 2-model run at full size grew ~11 MB per step
# (1.2 GB after 20 steps, 2.1 GB after 100) while the live tensors stayed under 0.8 GB. Handing freed heap
# pages back to the OS every 10 steps keeps it at 1.1-1.2 GB (peak 1.2 GB after 100 steps); CPU per step
# was within the noise of a loaded machine (0.560 vs 0.546 s in separate runs; gru_gru_hidden preset,
# batch 512, 1 thread; BENCHMARKS.md). No allocator setting changes.
RELEASE_MEMORY_EVERY = 10
# ... and sooner when the resident set has grown this much since the last release: over a 200-step run the
# freed blocks scatter, each step touches other pages, and ten steps grew it by up to 0.8 GB (peak 1.53 GB);
# releasing every 3 or 5 steps did not bound that (BENCHMARKS.md), a release on growth does by construction.
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
        if not 0 < self.target_iia <= 1.0 + 1e-9:
            p.append(f"train.target_iia must be in (0, 1], got {self.target_iia}")
        return p


@dataclass
class FitResult:
    best_step: int
    best_score: float
    steps: int
    stopped: str
    history: list[dict] = field(default_factory=list)
    best_records: list[Record] = field(default_factory=list)


def _score(records: Sequence[Record]) -> float:
    """Mean validation trial IIA over the trained directions (the model-selection score)."""
    trained = [r.trial_iia for r in records if r.trained]
    return float(sum(trained) / len(trained)) if trained else 0.0


class MASTrainer:
    def __init__(self, alignments: nn.ModuleList, problem: InterventionProblem, config: TrainerConfig,
                 checkpoint_path: str | Path | None = None, progress: bool = True,
                 log: Callable[[str], None] | None = None, sync_gradients: Callable[[nn.Module], None] | None = None,
                 stop_file: str | Path | None = None):
        self.alignments = alignments
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
        self._loss_sum = 0.0
        self._loss_n = 0
        self._signature: dict | None = None

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
                "stopped": self.stopped}

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
        self.history.append(row)
        self._loss_sum, self._loss_n = 0.0, 0
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

    def fit(self, resume: bool = True, stop_after: int | None = None) -> FitResult:
        """Train until a stop rule fires. `stop_after` aborts after that many steps (simulates a kill in tests)."""
        from tqdm.auto import tqdm

        if resume:
            self.try_resume()
        t0 = time.perf_counter()
        stopped = self.stopped
        if self.step == 0 and self.best_state is None:
            stopped = self.stopped = self._after_eval(self.evaluate(), 0.0)  # step-0 baseline: the random init
            self.save_checkpoint()
        names = [getattr(m, "name", str(i)) for i, m in enumerate(getattr(self.problem, "models", []))]
        if names:
            self.log("directions are shown as source→target:variable; " +
                     ", ".join(f"{i} = {name}" for i, name in enumerate(names)))
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not self.bar, desc="MAS", leave=False,
                   ncols=100)
        release_freed_memory()  # start from a trimmed heap (the build leaves freed blocks behind)
        released_at = resident_mib() or 0.0
        steps_this_call = 0
        try:
            while stopped is None and self.step < self.total_steps:
                if stop_after is not None and steps_this_call >= stop_after:
                    raise KeyboardInterrupt("stop_after reached")
                if self.stop_file is not None and self.stop_file.exists():
                    stopped = f"stopped early at step {self.step}: {self.stop_file} was created"
                    self.stop_file.unlink(missing_ok=True)
                    break
                rows = self._batch(self.step)
                directions = self.step_directions(self.step)
                # the default (every direction) calls loss exactly as before a budget existed
                budget = {} if directions is None else {"directions": directions}
                if self.optimizer is not None:
                    self.optimizer.zero_grad(set_to_none=True)
                    total = 0.0
                    for micro in rows.chunk(self.config.grad_accum):
                        loss, _ = self.problem.loss(self._step_maps(directions), micro, **budget)
                        (loss / self.config.grad_accum).backward()
                        total += float(loss.detach()) / self.config.grad_accum
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
                        total = float(self.problem.loss(self._step_maps(directions), rows, **budget)[0])
                    if not math.isfinite(total):
                        raise self._non_finite("loss", total, rows)
                self._loss_sum += total
                self._loss_n += 1
                self.step += 1
                steps_this_call += 1
                resident = resident_mib()
                if self.step % RELEASE_MEMORY_EVERY == 0 or (
                        resident is not None and resident > released_at + RELEASE_MEMORY_GROWTH_MIB):
                    release_freed_memory()
                    released_at = resident_mib() or 0.0
                bar.update(1)
                if self.step % self.eval_every == 0 or self.step == self.total_steps:
                    records = self.evaluate()
                    release_freed_memory()  # what the validation passes freed
                    released_at = resident_mib() or 0.0
                    # target / patience stops are kept in the checkpoint; a step-budget stop is not (a larger
                    # budget on resume continues the run)
                    stopped = self.stopped = self._after_eval(records, time.perf_counter() - t0)
                    self.save_checkpoint()
                    if self.bar:
                        bar.set_postfix_str(_short_postfix(total, records), refresh=False)
                    else:
                        self.log(f"step {self.step}/{self.total_steps} ({time.perf_counter() - t0:.0f}s) "
                                 f"{_postfix(self._last_loss(), records)}")
            if stopped is None:
                stopped = f"step budget reached ({self.total_steps} steps)"
        finally:
            bar.close()
        if self.best_state is not None:
            self.alignments.load_state_dict(self.best_state)
        self.log(f"stopped at step {self.step}: {stopped}; best step {self.best_step} "
                 f"(mean valid trial IIA {self.best_score:.4f})")
        return FitResult(best_step=self.best_step, best_score=self.best_score, steps=self.step, stopped=stopped,
                         history=self.history, best_records=self.best_records)


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
