"""Training and free-running evaluation of the task models.

    llm-mas train-model --task multiobject --arch gru --seed 0 --out runs/multiobject-gru-s0
    llm-mas eval-model runs/multiobject-gru-s0

Training is teacher forced (the fused kernels make it fast) on fresh sequences every step, with N drawn
from 1..20 minus the hold-outs {4, 9, 14, 17} (Arithmetic: every number of operations 1..20 by default; it
is given as a token, so a held-out value would be a symbol the model never saw in that role). The loss is the
cross-entropy on the task tokens only by default: the given tokens are either random (demo tokens,
Arithmetic operands) or unpredictable from the prefix (the trigger comes after an unseen N), so their loss
has an irreducible floor and only adds gradient noise (``given_token_loss`` weights it in if wanted).

Every ``eval_every`` steps the model is rolled out *free running* (task tokens from its own argmax, the
rest given) on a freshly drawn evaluation set covering every N in 1..20, hold-outs included; training
stops once ``confirm_evals`` consecutive evaluations reach ``target_accuracy`` on every N (one pass at
0.995 on 200 sequences per N is too lucky a stop: the true accuracy can still be below 0.99), and the
best evaluated weights are kept (also on Ctrl-C, which ends training early). The final metrics come from a
separate set drawn from ``eval_seed``.

A run directory holds ``config.yaml`` (first line: the exact command), ``model.safetensors`` and
``metrics.json``.

Held-out values that a smooth interpolation of the trained ones gets wrong need regularisation: on Modulo
the default GRU answers N=4 with two responses (between 3 -> 3 and 5 -> 1) and never reaches N=4; with
``--lr 1e-3 --set weight_decay=1.0`` it learns the periodic answer for every N (llm_mas/data/models/manifest.json
holds every shipped model's exact command).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import random
import sys
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from ..config import from_dict, to_dict
from ..errors import DataError
from ..schedules import warmup_cosine
from ..tasks import get_task
from .task_models import ARCHS, TaskModel, build_task_model

COUNTS = tuple(range(1, 21))
BAR = 0.99  # a task model is used (and shipped as passing) only at >= BAR trial accuracy on every N
# Peak learning rates (measured on MultiObject: the RNNs reach every N in ~1 000 steps at 3e-3; the
# Transformer is unstable there and converges in ~750 steps at 1e-3).
DEFAULT_LR = {"gru": 3e-3, "lstm": 3e-3, "transformer": 1e-3}
HOLD_OUTS = (4, 9, 14, 17)
# Arithmetic: initial values 0..20 reported in these ranges (inclusive bounds).
VALUE_RANGES = ((0, 4), (5, 9), (10, 14), (15, 20))


@dataclass
class TrainConfig:
    """Every setting of a task-model training run (defaults tuned on 2 CPU cores; see the README table)."""

    task: str = "multiobject"
    arch: str = "gru"
    seed: int = 0
    steps: int = 10000                 # budget of optimizer steps (training usually stops far earlier)
    batch_size: int = 64
    lr: float | None = None            # peak learning rate; None: DEFAULT_LR[arch]
    warmup_steps: int = 200
    min_lr_ratio: float = 0.1          # cosine decay from lr to lr * min_lr_ratio over `steps`
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    dropout: float | None = None       # None: the architecture default (task_models.DEFAULTS)
    given_token_loss: float = 0.0      # weight of the loss on given (non-task) tokens
    # None: the task's default — HOLD_OUTS for the counting tasks, none for Arithmetic, whose number of
    # operations is given as a token (a held-out value is a symbol never seen in that role: no model can
    # know its meaning, so holding it out tests nothing about counting; the first Arithmetic GRU, trained
    # with HOLD_OUTS, was right on every trained n_ops and never on 4, 9 or 17)
    hold_outs: list[int] | None = None
    eval_every: int = 250
    eval_per_count: int = 200          # periodic free-running evaluation: sequences per N (fresh each time)
    confirm_evals: int = 2             # stop after this many consecutive periodic evaluations reach the target
    patience_evals: int = 16           # ... or after this many evaluations without a better (min, overall)
    final_per_count: int = 200         # final evaluation: sequences per N
    eval_seed: int = 12345
    target_accuracy: float = 0.995     # stop once every N reaches this trial accuracy
    threads: int = 0                   # torch threads (0: leave torch's default)
    device: str = "cpu"
    # Where the initial weights come from. "derived": a seed derived from (task, arch, seed), so models of
    # different architectures (or tasks) with the same seed never share initial weights (e.g. the same
    # embedding matrix, drawn first). "seed": the plain seed (how the first shipped models were made; their
    # config.yaml says so).
    init_seed: Literal["derived", "seed"] = "derived"

    def __post_init__(self) -> None:
        if self.hold_outs is None:  # written out explicitly into the run's config.yaml
            self.hold_outs = [] if self.task == "arithmetic" else list(HOLD_OUTS)

    def validate(self) -> list[str]:
        """Every problem of this config (empty when valid)."""
        from ..tasks import task_names  # noqa: PLC0415

        problems = []
        if self.task not in task_names():
            problems.append(f"unknown task {self.task!r}; valid choices: {', '.join(task_names())}")
        if self.arch not in ARCHS:
            problems.append(f"unknown arch {self.arch!r}; valid choices: {', '.join(ARCHS)}")
        for name in ("steps", "batch_size", "eval_every", "eval_per_count", "final_per_count", "confirm_evals",
                     "patience_evals"):
            if getattr(self, name) < 1:
                problems.append(f"{name} {getattr(self, name)} must be at least 1")
        for name in ("warmup_steps", "threads"):
            if getattr(self, name) < 0:
                problems.append(f"{name} {getattr(self, name)} must be >= 0")
        if self.lr is not None and not self.lr > 0:
            problems.append(f"lr {self.lr} must be > 0")
        if not 0 <= self.min_lr_ratio <= 1:
            problems.append(f"min_lr_ratio {self.min_lr_ratio} must be in [0, 1]")
        if self.weight_decay < 0 or self.grad_clip < 0 or self.given_token_loss < 0:
            problems.append("weight_decay, grad_clip and given_token_loss must be >= 0 (grad_clip 0 = off)")
        if self.dropout is not None and not 0 <= self.dropout < 1:
            problems.append(f"dropout {self.dropout} must be in [0, 1)")
        if not 0 < self.target_accuracy <= 1:
            problems.append(f"target_accuracy {self.target_accuracy} must be in (0, 1]")
        bad = [h for h in self.hold_outs if h not in COUNTS]
        if bad:
            problems.append(f"hold_outs {bad} outside 1..20")
        if self.device != "cpu" and not self.device.startswith("cuda"):
            problems.append(f"device {self.device!r} must be 'cpu' or 'cuda[:i]'")
        return problems


def initial_weight_seed(cfg: TrainConfig) -> int:
    """The seed the initial weights are drawn from (see ``TrainConfig.init_seed``)."""
    if cfg.init_seed == "seed":
        return int(cfg.seed)
    names = [zlib.crc32(name.encode()) for name in (cfg.task, cfg.arch)]
    return int(np.random.SeedSequence([int(cfg.seed), *names]).generate_state(1)[0])


def make_config(**values: Any) -> TrainConfig:
    """A validated TrainConfig (every problem reported at once as one ConfigError)."""
    from ..config import from_dict

    return from_dict(TrainConfig, values)


# ====================================================================== evaluation
@dataclass
class EvalResult:
    """Free-running trial accuracy (every task token right), overall and per group value."""

    overall: float
    n: int
    token_accuracy: float
    groups: dict[str, dict[int | str, float]]  # group name -> value -> trial accuracy

    @property
    def per_count(self) -> dict[int | str, float]:
        return self.groups["count"]

    @property
    def min_accuracy(self) -> float:
        """The smallest accuracy over every value of every group (the shipping bar)."""
        return min(min(values.values()) for values in self.groups.values())

    def to_dict(self) -> dict[str, Any]:
        return {"overall": self.overall, "min": self.min_accuracy, "token_accuracy": self.token_accuracy,
                "n": self.n, **{k: {str(v): a for v, a in vals.items()} for k, vals in self.groups.items()}}


@dataclass
class EvalSet:
    """A fixed evaluation set: `per_count` sequences for every N in 1..20 (no hold-outs)."""

    ids: torch.Tensor        # (n, L)
    task_mask: torch.Tensor  # (n, L) bool
    groups: dict[str, np.ndarray]  # group name -> (n,) value of each row


def make_eval_set(task, per_count: int, rng: np.random.Generator) -> EvalSet:
    """`per_count` sequences for each N in 1..20 (Arithmetic: each number of operations)."""
    batches = [task.sample(per_count, rng, quantities=[count]) for count in COUNTS]
    width = max(b.width for b in batches)
    batches = [b.pad_to(width) for b in batches]
    ids = np.concatenate([b.ids for b in batches])
    task_mask = np.concatenate([b.task_mask for b in batches])
    groups = {"count": np.repeat(np.array(COUNTS), per_count)}
    if task.name == "arithmetic":
        groups["initial_value"] = _initial_value_ranges(task, ids)
    return EvalSet(torch.from_numpy(ids), torch.from_numpy(task_mask), groups)


def _initial_value_ranges(task, ids: np.ndarray) -> np.ndarray:
    """(n,) label 'lo-hi' of the range holding each Arithmetic sequence's initial value (token 2)."""
    values = np.array([int(tok) for tok in task.vocab.decode(ids[:, 2])])
    labels = np.empty(len(values), dtype=object)
    for lo, hi in VALUE_RANGES:
        labels[(values >= lo) & (values <= hi)] = f"{lo}-{hi}"
    if any(label is None for label in labels):
        raise DataError(f"Arithmetic initial values outside 0..20: {sorted(set(values.tolist()))}")
    return labels


@torch.no_grad()
def evaluate(model: TaskModel, eval_set: EvalSet, batch_size: int = 2000) -> EvalResult:
    """Free-running rollout (task tokens from the model's argmax, the rest given) on `eval_set`."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct_rows, right_tokens, n_tokens = [], 0, 0
    try:
        for start in range(0, len(eval_set.ids), batch_size):
            ids = eval_set.ids[start:start + batch_size].to(device)  # (b, L)
            mask = eval_set.task_mask[start:start + batch_size].to(device)  # (b, L)
            width = int(mask.any(0).nonzero().max()) + 1 if mask.any() else ids.shape[1]
            ids, mask = ids[:, :width], mask[:, :width]  # nothing after the last task token matters
            tokens, _ = model.rollout(ids, mask)  # (b, L)
            right = (tokens == ids) | ~mask
            correct_rows.append(right.all(1).cpu())
            right_tokens += int(((tokens == ids) & mask).sum())
            n_tokens += int(mask.sum())
    finally:
        model.train(was_training)
    correct = torch.cat(correct_rows).numpy()  # (n,)
    groups = {}
    for name, values in eval_set.groups.items():
        keys = sorted(set(values.tolist()), key=lambda v: (isinstance(v, str), v if not isinstance(v, str)
                                                            else int(v.split("-")[0])))
        groups[name] = {key: float(correct[values == key].mean()) for key in keys}
    return EvalResult(overall=float(correct.mean()), n=len(correct),
                      token_accuracy=right_tokens / max(n_tokens, 1), groups=groups)


# ====================================================================== training
def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to ``min_lr_ratio`` at ``cfg.steps`` (``llm_mas.schedules``)."""
    return warmup_cosine(step, cfg.steps, cfg.warmup_steps, cfg.min_lr_ratio)


def sequence_loss(model: TaskModel, ids: torch.Tensor, task_mask: torch.Tensor, given_weight: float = 0.0
                  ) -> tuple[torch.Tensor, float]:
    """Teacher-forced next-token loss on task tokens (+ weighted given tokens) and the task-token accuracy.

    ids (B, L) right padded, task_mask (B, L) True on task tokens.
    """
    inputs, targets = ids[:, :-1], ids[:, 1:]  # (B, L-1)
    task_targets = task_mask[:, 1:]
    scored = task_targets | ((targets != 0) & (given_weight > 0))  # (B, L-1) positions that need logits
    # the head is the costliest part of an RNN step: run it only where a loss is taken
    logits = model.readout(model.features(inputs)[scored])  # (n, V)
    ce = F.cross_entropy(logits, targets[scored], reduction="none")  # (n,)
    is_task = task_targets[scored]  # (n,)
    loss = ce[is_task].mean()
    if given_weight > 0:
        loss = loss + given_weight * ce[~is_task].mean()
    with torch.no_grad():
        accuracy = float((logits[is_task].argmax(-1) == targets[scored][is_task]).float().mean())
    return loss, accuracy


@dataclass
class TrainResult:
    model: TaskModel
    metrics: dict[str, Any]


def train_task_model(cfg: TrainConfig, out_dir: str | Path | None = None, command: str | None = None,
                     progress: bool = True, log: Callable[[str], None] | None = None) -> TrainResult:
    """Train one task model per `cfg`; write config.yaml, model.safetensors and metrics.json to `out_dir`.

    Returns the best model (eval mode) and its metrics (final free-running evaluation included).
    """
    cfg = from_dict(TrainConfig, to_dict(cfg))  # validate (all problems at once)
    if cfg.lr is None:
        cfg = dataclasses.replace(cfg, lr=DEFAULT_LR[cfg.arch])  # the resolved value goes into config.yaml
    log = log or (lambda msg: print(msg, file=sys.stderr))
    with _global_state(cfg.seed, cfg.threads):
        return _train(cfg, out_dir, command, progress, log)


@contextlib.contextmanager
def _global_state(seed: int, threads: int):
    """Seed python, numpy and torch (and set torch's thread count) for one training run, then put all of it
    back: the caller's random streams and thread count are as they were before."""
    saved = random.getstate(), np.random.get_state(), torch.get_num_threads()
    with torch.random.fork_rng(devices=list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []):
        try:
            if threads:
                torch.set_num_threads(threads)
            seed_everything(seed)
            yield
        finally:
            random.setstate(saved[0])
            np.random.set_state(saved[1])
            torch.set_num_threads(saved[2])


def _train(cfg: TrainConfig, out_dir, command, progress, log) -> TrainResult:
    device = torch.device(cfg.device)
    task = get_task(cfg.task)
    overrides = {} if cfg.dropout is None else {"dropout": cfg.dropout}
    model = build_task_model(cfg.arch, cfg.task, len(task.vocab), seed=initial_weight_seed(cfg),
                             **overrides).to(device)
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        write_run_config(out, cfg, model, command)

    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    train_rng = np.random.default_rng(cfg.seed)
    eval_rng = np.random.default_rng([cfg.seed, 1])

    best: dict[str, Any] = {"score": (-1.0, -1.0), "state": None, "step": 0, "eval": None}
    history: list[dict[str, Any]] = []
    started = time.perf_counter()
    bar = _progress_bar(cfg.steps, progress, f"{cfg.task}-{cfg.arch}-s{cfg.seed}")
    step, loss_avg, acc_avg, passes, stale, interrupted = 0, None, None, 0, 0, False
    model.train()
    try:
        for step in range(1, cfg.steps + 1):
            batch = task.sample(cfg.batch_size, train_rng, hold_outs=cfg.hold_outs)
            ids = torch.from_numpy(batch.ids).to(device)  # (B, L)
            task_mask = torch.from_numpy(batch.task_mask).to(device)  # (B, L)
            loss, accuracy = sequence_loss(model, ids, task_mask, cfg.given_token_loss)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            loss_value = float(loss.detach())
            loss_avg = loss_value if loss_avg is None else 0.95 * loss_avg + 0.05 * loss_value
            acc_avg = accuracy if acc_avg is None else 0.95 * acc_avg + 0.05 * accuracy
            if bar is not None:
                bar.update(1)
                if step % 10 == 0:
                    bar.set_postfix(loss=f"{loss_avg:.4f}", acc=f"{acc_avg:.4f}",
                                    eval_min=f"{best['score'][0]:.3f}", refresh=False)
            if step % cfg.eval_every == 0 or step == cfg.steps:
                result = evaluate(model, make_eval_set(task, cfg.eval_per_count, eval_rng))
                score = (result.min_accuracy, result.overall)
                history.append({"step": step, "loss": round(loss_avg, 6), "train_token_acc": round(acc_avg, 6),
                                "eval_min": result.min_accuracy, "eval_overall": result.overall,
                                "seconds": round(time.perf_counter() - started, 1)})
                stale = stale + 1 if score <= best["score"] else 0
                if score >= best["score"]:  # ties: the later (longer trained) weights
                    best.update(score=score, state=copy.deepcopy(model.state_dict()), step=step, eval=result)
                    if out is not None:  # an interrupted run still leaves its best weights
                        save_weights(model, out / "model.safetensors")
                if bar is None:
                    log(f"step {step}: loss {loss_avg:.4f} eval min {result.min_accuracy:.4f} "
                        f"overall {result.overall:.4f}")
                passes = passes + 1 if result.min_accuracy >= cfg.target_accuracy else 0
                if passes >= cfg.confirm_evals or stale >= cfg.patience_evals:
                    break
    except KeyboardInterrupt:  # Ctrl-C: stop, but keep and evaluate the best weights found so far
        interrupted = True
        log(f"interrupted at step {step}; finishing with the best weights (step {best['step']})")
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - started
    if best["state"] is None:
        raise DataError(f"training stopped at step {step} before its first evaluation; nothing to keep "
                        f"(evaluations run every {cfg.eval_every} steps)")
    model.load_state_dict(best["state"])
    model.eval()
    final_set = make_eval_set(task, cfg.final_per_count, np.random.default_rng(cfg.eval_seed))
    final = evaluate(model, final_set)
    metrics = {
        "task": cfg.task, "arch": cfg.arch, "seed": cfg.seed,
        "accuracy": final.to_dict(),
        "held_out": list(cfg.hold_outs),
        "held_out_counts_name": task.quantity_name,
        "eval_seed": cfg.eval_seed, "n_per_count": cfg.final_per_count,
        "best_step": best["step"], "steps_run": step,
        "stopped_because": ("interrupted" if interrupted else
                            "target reached" if passes >= cfg.confirm_evals else
                            "no improvement" if stale >= cfg.patience_evals else "step budget"),
        "train_seconds": round(seconds, 1),
        "target_accuracy": cfg.target_accuracy, "passes_bar": final.min_accuracy >= BAR,
        "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "history": history,
    }
    if out is not None:
        save_weights(model, out / "model.safetensors")
        (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    log(f"{cfg.task}-{cfg.arch}-s{cfg.seed}: best step {best['step']} of {step}, {seconds:.0f} s; final "
        f"free-running trial accuracy min {final.min_accuracy:.4f} overall {final.overall:.4f}")
    for p in model.parameters():
        p.requires_grad_(False)
    return TrainResult(model=model, metrics=metrics)


def _progress_bar(total: int, enabled: bool, desc: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, dynamic_ncols=True, mininterval=1.0)


# ====================================================================== run directories
def write_run_config(out: Path, cfg: TrainConfig, model: TaskModel, command: str | None) -> None:
    """config.yaml: the resolved training config and the model config (first line: the command)."""
    import yaml

    from ..config import to_dict

    data = {"train": to_dict(cfg), "model": dict(model.config)}
    header = f"# {command}\n" if command else ""
    (out / "config.yaml").write_text(header + yaml.safe_dump(data, sort_keys=False))


def save_weights(model: TaskModel, path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(path))


def read_run_config(run_dir: Path) -> dict[str, Any]:
    """The parsed config.yaml of a run directory (``command`` added from its first line)."""
    import yaml

    path = run_dir / "config.yaml"
    if not path.exists():
        raise DataError(f"{str(run_dir)!r} has no config.yaml; is it a directory written by `llm-mas train-model`?")
    text = path.read_text()
    data = yaml.safe_load(text) or {}
    first = text.splitlines()[0] if text else ""
    data["command"] = first[2:] if first.startswith("# ") else None
    if "model" not in data:
        raise DataError(f"{str(path)!r} has no 'model' section; it was not written by `llm-mas train-model`")
    return data


def check_fits(weights: Path, model: TaskModel, shapes: dict[str, Any]) -> None:
    """DataError unless the tensors of ``weights`` (name -> tensor or shape) are exactly ``model``'s: a
    checkpoint of another architecture (LSTM weights beside a GRU config.yaml) is named, not half-loaded."""
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    given = {k: tuple(getattr(v, "shape", v)) for k, v in shapes.items()}
    wrong = [f"{k} {given[k]} (expected {own[k]})" for k in own if k in given and given[k] != own[k]]
    missing, unexpected = sorted(set(own) - set(given)), sorted(set(given) - set(own))
    if wrong or missing or unexpected:
        detail = "; ".join(part for part in (
            f"shapes differ: {', '.join(wrong[:3])}" if wrong else "",
            f"missing {', '.join(missing[:3])}" if missing else "",
            f"unexpected {', '.join(unexpected[:3])}" if unexpected else "") if part)
        raise DataError(f"{str(weights)!r} does not hold the weights of the {model.arch} model that "
                        f"{str(weights.parent / 'config.yaml')!r} describes ({detail}); the directory mixes two "
                        "checkpoints: restore it or retrain with `llm-mas train-model`")


def check_finite(weights: Path, state: dict[str, Any]) -> None:
    """DataError naming the first tensor of ``state`` that holds NaN or inf."""
    for key, tensor in state.items():
        if tensor.is_floating_point():
            bad = int((~torch.isfinite(tensor)).sum())
            if bad:
                raise DataError(f"{str(weights)!r}: tensor {key!r} has {bad} non-finite values; the checkpoint is "
                                "corrupted: retrain or restore it")


def load_run(run_dir: str | Path, device: str = "cpu") -> TaskModel:
    """Rebuild the model of a run directory and load its weights (eval mode, frozen)."""
    from safetensors.torch import load_file

    run_dir = Path(run_dir)
    model_cfg = dict(read_run_config(run_dir)["model"])
    weights = run_dir / "model.safetensors"
    if not weights.exists():
        raise DataError(f"{str(run_dir)!r} has no model.safetensors (training not finished?)")
    model = build_task_model(model_cfg.pop("arch"), model_cfg.pop("task_name"), model_cfg.pop("vocab_size"),
                             seed=model_cfg.pop("seed"), **model_cfg)
    try:
        state = load_file(str(weights), device="cpu")
    except Exception as e:  # safetensors raises its own error type for a truncated or overwritten file
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DataError(f"{str(weights)!r} is not a readable safetensors file ({first}); the checkpoint is "
                        "corrupted: retrain or restore it") from None
    check_fits(weights, model, state)
    check_finite(weights, state)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise DataError(f"{str(weights)!r} does not fit the model in config.yaml: missing {missing}, "
                        f"unexpected {unexpected}")
    model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain fixed-width text table."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


__all__ = ["COUNTS", "HOLD_OUTS", "EvalResult", "EvalSet", "TrainConfig", "TrainResult", "evaluate",
           "load_run", "make_config", "make_eval_set", "read_run_config", "train_task_model"]
