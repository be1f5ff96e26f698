"""Run MAS from a config: ``run(config)`` builds the problem of the config's model kind (``PROBLEMS``), trains
the alignments with ``MASTrainer``, evaluates them with CIs and writes the run directory (`RunDir`).

    llm-mas mas gru_gru_hidden train.lr=2e-3 data.n_train=2000

A run writes ``runs/<name>/``: the resolved ``config.yaml``, ``alignments.safetensors`` (``alignments.json``:
how to rebuild them, `llm_mas.artifacts`), ``results.json``
(one record per source, target, variable), ``history.csv``, ``summary.json`` and ``iia_matrix.png``;
``checkpoint.pt`` makes a killed run resumable (run the same command again). ``fingerprint.json`` records
everything that determines the result (the config up to its cosmetic keys and step budget, a digest of
every model's weights, recording and adapter): a rerun continues only a run of the same fingerprint
(a larger ``train.max_steps`` / ``max_epochs`` continues it), anything else is refused with the keys that
differ; ``resume=false`` starts over in place. Every file is written atomically, one process at a time
(``.lock``); nothing in a run directory is read as code (``checkpoint.pt`` loads with
``weights_only=True``). Creating ``runs/<name>/STOP``
ends training early: the best checkpoint is evaluated and every output written (the stop reason in
``summary.json``). The data-parallel launcher (``llm_mas.distributed``) calls the same ``run`` with this
process's ``Shard``; only rank 0 writes.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .alignments import ALIGNMENTS, make_alignment
from .config import config_text, to_dict
from .errors import ConfigError
from .files import (
    DirectoryLock,
    atomic_save_tensors,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    load_torch_state,
)
from .interventions import Intervention
from .problems import PROBLEMS, InterventionProblem, Record, Shard
from .problems.kinds import model_fingerprint
from .problems.manifest import alignment_init_digest, load_alignment_init, write_alignment_manifest
from .results import MASResult
from .run_config import MASConfig, preflight
from .trainer import FitResult, MASTrainer, ProgressLog, ReleaseMemory, StopFile, TrainerConfig

# top-level keys that do not change a run's result (``name`` and ``out_dir`` only say where it goes), and
# the step budget, which a rerun may raise to continue a run
COSMETIC_KEYS = ("name", "out_dir", "progress", "resume")
BUDGET_KEYS = ("train.max_steps", "train.max_epochs")
# permissions that change no result: a run that could start at all reads the same tokens either way
PERMISSION_KEYS = ("data.allow_unknown_tokens",)
# settings of how a step is computed, not of what it computes: per model (models.{i}.KEY) and for the run
MODEL_SPEED_KEYS = ("skip_below_site",)
SPEED_KEYS = ("site_cache.memory_mib", "site_cache.disk_mib", "site_cache.dir")


def build_problem(config: MASConfig, *, shard: Shard | None = None,
                  log: Callable[[str], None] | None = None) -> InterventionProblem:
    """The problem of the config's model kind (``PROBLEMS[config.kind]``), pairs built and latents cached."""
    if config.kind not in PROBLEMS:
        raise ConfigError(f"models: no problem is registered for model kind {config.kind!r}; registered: "
                          f"{', '.join(PROBLEMS)}")
    return PROBLEMS[config.kind](config, shard=shard, log=log)


def build_alignments(config: MASConfig, problem: InterventionProblem, init: bool = True) -> nn.ModuleList:
    """The trained modules: the intervention's own maps when it has them (linear stitch: one per direction),
    else one alignment per model (kind, options and standardisation from its model entry; started from
    ``alignment_init``'s run unless `init` is False, as when trained tensors are loaded over them)."""
    widths = [e.width for e in problem.models]
    own = problem.intervention.own_maps(widths, problem.k, config.seed)
    if own is not None:
        return own.to(config.device)
    alignments = []
    for i, (m, width) in enumerate(zip(config.models, widths)):
        std = problem.latent_stats[i] if m.standardize else None
        k = problem.k * len(problem.all_variables) if ALIGNMENTS[m.alignment].rank_k else problem.k
        alignments.append(make_alignment(m.alignment, width, k=k, seed=config.seed * 101 + i, standardize=std,
                                         **m.alignment_options))
        if init and m.alignment_init is not None:
            load_alignment_init(alignments[-1], m.alignment_init, m.name)
    return nn.ModuleList(alignments).to(config.device)


SCALE_RATIO_NOTICE = 2.0   # latent scales further apart than this get the standardisation notice


def latent_scale_notice(config: MASConfig, problem: InterventionProblem) -> str | None:
    """A line for the run's log when the models' latents differ in scale by more than ``SCALE_RATIO_NOTICE``×
    among the models whose alignment keeps lengths (orthogonal, low_rank, gram_schmidt, identity) and is not
    standardised, else None. Such a map can rotate but not rescale or shift, so a direction between models
    of very different scale cannot be aligned whatever the training: the shipped GRU (0.6) and LSTM (3.6,
    its cell state included) are such a pair. Scale: the root mean square of the site's training values,
    sqrt(mean over features of mean² + std²); a standardised model counts 1 (its aligned space is z-scored);
    models whose alignment can rescale (``linear``) and interventions with their own maps are left out."""
    stats = problem.latent_stats
    own_maps = type(problem.intervention).own_maps is not Intervention.own_maps   # stitches: maps per direction
    if len(config.models) < 2 or len(stats) != len(config.models) or own_maps:
        return None
    scales = {}
    for i, (m, (mean, std)) in enumerate(zip(config.models, stats)):
        if not ALIGNMENTS[m.alignment].isometric:
            continue
        scales[i] = 1.0 if m.standardize else float((mean.double().square() + std.double().square()).mean().sqrt())
    plain = [i for i in scales if not config.models[i].standardize]
    if len(scales) < 2 or not plain or min(scales.values()) <= 0:
        return None
    ratio = max(scales.values()) / min(scales.values())
    if ratio <= SCALE_RATIO_NOTICE:
        return None
    listed = ", ".join(f"{config.models[i].name} {scales[i]:.2g}" for i in scales)
    return (f"[{config.name}] note: the models' latents differ {ratio:.1f}x in scale (root mean square of the "
            f"site's values: {listed}); a length-keeping alignment cannot rescale, so directions between "
            f"models of different scale are capped. Set models.<i>.standardize: true (models "
            f"{', '.join(str(i) for i in plain)}) to z-score each model's latents inside its alignment.")


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """{"a.b.0.c": value} of nested dicts and lists."""
    if isinstance(data, dict):
        items = list(data.items())
    elif isinstance(data, list):
        items = [(str(i), v) for i, v in enumerate(data)]
    else:
        return {prefix: data}
    out: dict[str, Any] = {}
    for key, value in items:
        out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    if not items and prefix:
        out[prefix] = data  # an empty list or mapping
    return out


def model_fingerprints(config: MASConfig) -> list[dict[str, str]]:
    """Per model, digests of what its result depends on beyond the config, from its kind
    (``ModelKind.fingerprint``): task models: its directory's model.safetensors and config.yaml; HF models:
    the weight files and config.json, the adapter, the recording; module models: the weights file (or the
    object's state_dict). A model listed twice (a model and its copy) is read once."""
    seen: dict[tuple, dict[str, str]] = {}
    out = []
    for m in config.models:
        key = (m.kind, m.name, getattr(m, "adapter", None), getattr(m, "recording", None),
               getattr(m, "weights", None), id(getattr(m, "module", None)))
        if key not in seen:
            seen[key] = model_fingerprint(m)
        out.append(dict(seen[key]))
    return out


def data_fingerprint(config: MASConfig) -> dict[str, str]:
    """A digest of the run's counterfactual tensors (in Python or in data.dataset), when it has them."""
    if config.kind != "tensors":
        return {}
    from .problems.kinds import tensor_dataset

    return {"data.tensors": tensor_dataset(config).digest()}


def run_fingerprint(config: MASConfig) -> dict[str, Any]:
    """What determines a run's result: the resolved config (flattened; without its cosmetic keys, step
    budget, permissions and speed settings; the data seed is its ``seed``), a digest of every model's weights and of
    counterfactual tensors
    (``fingerprint.json``)."""
    flat = _flatten({k: v for k, v in to_dict(config).items() if k not in COSMETIC_KEYS})
    for key in BUDGET_KEYS + PERMISSION_KEYS + SPEED_KEYS:
        flat.pop(key, None)
    if config.train.directions_per_step is None or config.train.budget_gradients == "sampled":
        # what a budgeted step's gradient is changes nothing without a budget, and `sampled` is what every
        # run did before the key existed: those runs stay resumable
        flat.pop("train.budget_gradients", None)
    if config.train.own_weight == 1:
        flat.pop("train.own_weight", None)   # equal weights: what every run did before the key existed
    if config.train.own_keep is None:
        # fixed own weights: what every run did before the keys existed
        for key in ("train.own_keep", "train.own_boost", "train.own_boost_max", "train.own_relax"):
            flat.pop(key, None)
    elif not config.train.own_relax:
        flat.pop("train.own_relax", None)   # a ratchet: what own_keep did before own_relax existed
    if config.train.lr_schedule == "constant":
        # a constant rate is what every run did before the schedule keys existed (lr_warmup must then be 0)
        for key in ("train.lr_schedule", "train.lr_warmup", "train.lr_min_ratio"):
            flat.pop(key, None)
    for i, m in enumerate(config.models):
        for key in MODEL_SPEED_KEYS:
            flat.pop(f"models.{i}.{key}", None)
        # where a start came from is not the result's; what was copied is (None: a random start, as every run
        # before the key existed)
        flat.pop(f"models.{i}.alignment_init", None)
        if getattr(m, "alignment_init", None) is not None:
            flat[f"models.{i}.alignment_init"] = alignment_init_digest(m.alignment_init, m.name)
    flat.update({f"models.{i}.{key}": value for i, digests in enumerate(model_fingerprints(config))
                 for key, value in digests.items()})
    flat.update(data_fingerprint(config))
    return {"version": 1, "values": flat}


def fingerprint_hash(config: MASConfig, n: int = 8) -> str:
    """A short hash of ``run_fingerprint(config)`` (e.g. for default run names)."""
    text = json.dumps(run_fingerprint(config)["values"], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:n]


class RunDir:
    """The files of one run directory; ``writes=False`` (a data-parallel rank other than 0) writes nothing.
    Every file is written atomically (a temporary file renamed over the old one)."""

    def __init__(self, path: str | Path, writes: bool = True):
        self.path = Path(path)
        self.writes = writes
        self.config = self.path / "config.yaml"
        self.fingerprint = self.path / "fingerprint.json"
        self.results = self.path / "results.json"
        self.alignments = self.path / "alignments.safetensors"
        self.manifest = self.path / "alignments.json"
        self.history = self.path / "history.csv"
        self.summary = self.path / "summary.json"
        self.plot = self.path / "iia_matrix.png"
        self.checkpoint = self.path / "checkpoint.pt"
        self.stop = self.path / "STOP"   # creating it ends training early

    @property
    def outputs(self) -> list[Path]:
        return [self.config, self.fingerprint, self.results, self.alignments, self.manifest, self.history,
                self.summary, self.plot, self.checkpoint]

    def existing_outputs(self) -> list[Path]:
        return [p for p in self.outputs if p.exists()]

    def check_resume(self, config: MASConfig, fingerprint: dict) -> bool:
        """Whether this run continues what the directory holds (True) or starts afresh (False: nothing there,
        or ``resume=false``, whose old outputs are removed once the new run has loaded its models). Raises one
        ConfigError when ``resume`` is on and the directory holds another run, naming every key that
        differs (old -> new) and the ways out."""
        existing = self.existing_outputs()
        if not existing or not config.resume:
            return False
        ways_out = (f"choose a new name (name=...) to keep both runs, or set resume=false to start over in "
                    f"{str(self.path)!r} (its outputs are replaced)")
        if not self.fingerprint.exists():
            raise ConfigError(f"run directory {str(self.path)!r} holds outputs "
                              f"({', '.join(p.name for p in existing)}) but no fingerprint.json (written by an older "
                              "llm_mas, or not by a run): it cannot be checked that they belong to this config; "
                              f"{ways_out}")
        try:
            old = json.loads(self.fingerprint.read_text())["values"]
        except (ValueError, KeyError, TypeError):
            raise ConfigError(f"{str(self.fingerprint)!r} is not a valid fingerprint; {ways_out}") from None
        new = json.loads(json.dumps(fingerprint["values"]))  # as it reads back from the file
        unset = "(unset)"
        diffs = [f"{key}: {old.get(key, unset)!r} -> {new.get(key, unset)!r}" for key in sorted(set(old) | set(new))
                 if old.get(key, unset) != new.get(key, unset)]
        if diffs:
            raise ConfigError(f"run directory {str(self.path)!r} holds a run of another configuration; {ways_out}. "
                              "What differs (old -> new):\n" + "\n".join(f"  - {d}" for d in diffs))
        return True

    def clear(self) -> None:
        """Remove the outputs of an earlier run (``resume=false``: start over in place)."""
        if self.writes:
            for p in self.outputs:
                p.unlink(missing_ok=True)

    def write_config(self, config: MASConfig, command: str, fingerprint: dict | None = None) -> None:
        """The resolved config, headed by the command that reruns (resumes) the run, and its fingerprint."""
        if self.writes:
            if fingerprint is not None:
                atomic_write_json(self.fingerprint, fingerprint, indent=1, sort_keys=True)
            atomic_write_text(self.config, config_text(config, header=command))

    def write_outputs(self, result: MASResult, alignments: nn.ModuleList, fit: FitResult, summary: dict) -> None:
        if not self.writes:
            return
        atomic_write_json(self.results, [r.to_dict() for r in result.records], indent=1, sort_keys=True)
        atomic_save_tensors(self.alignments, {f"model{i}.{k}": v for i, a in enumerate(alignments)
                                              for k, v in a.state_dict().items()})
        write_history(fit.history, self.history)
        atomic_write_json(self.summary, summary, indent=1)
        buffer = io.BytesIO()
        result.plot().savefig(buffer, format="png", dpi=120, bbox_inches="tight")
        atomic_write_bytes(self.plot, buffer.getvalue())


def write_history(history: Sequence[dict], path: Path) -> None:
    """One CSV row per validation (columns: the union of every row's keys, in first-seen order)."""
    keys = list(dict.fromkeys(k for row in history for k in row))
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=keys)
    writer.writeheader()
    writer.writerows(history)
    atomic_write_text(path, text.getvalue())


def run(config: MASConfig, *, shard: Shard | None = None, log: Callable[[str], None] = print,
        command: str | None = None) -> MASResult | None:
    """Train and evaluate; write the run directory; return a `MASResult` (None on ranks other than 0).

    shard:   this process's part of a data-parallel run (``llm_mas.distributed``, which also sets
             ``config.device`` to the process's device); None: one process.
    command: the first line of the written config.yaml (default: ``llm-mas mas RUN/config.yaml``).

    Every problem findable without loading weights is reported (one error) before the run directory is
    touched; the directory is locked for the run (rank 0 under a shard); a directory holding a run of
    another fingerprint is refused unless ``resume=false`` (module docstring).
    """
    if shard is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("run was started in several processes (WORLD_SIZE > 1); every copy would write the "
                          "same run directory. For data-parallel LLM MAS launch "
                          "`accelerate launch ... -m llm_mas.distributed CONFIG.yaml` instead")
    preflight(config)
    main = shard is None or shard.is_main
    run_dir = RunDir(Path(config.out_dir) / config.name, writes=main)
    existed = run_dir.path.exists()
    lock = DirectoryLock(run_dir.path) if main else contextlib.nullcontext()
    try:
        with lock:
            return _run_locked(config, run_dir, shard, log, command)
    finally:
        if main and not existed and run_dir.path.is_dir() and not any(run_dir.path.iterdir()):
            run_dir.path.rmdir()  # a run that failed before writing anything leaves nothing behind


def _run_locked(config: MASConfig, run_dir: RunDir, shard: Shard | None, log: Callable[[str], None],
                command: str | None) -> MASResult | None:
    main = run_dir.writes
    say = log if main else (lambda s: None)
    if main:  # temporary files of a write killed before its rename (we hold the lock: nobody else writes)
        for debris in run_dir.path.glob(".*.tmp"):
            debris.unlink(missing_ok=True)
    fingerprint = run_fingerprint(config)
    resuming = run_dir.check_resume(config, fingerprint)
    # read (weights_only: nothing in the file runs) before anything is built or written
    state = load_torch_state(run_dir.checkpoint, map_location=config.device) \
        if resuming and run_dir.checkpoint.exists() else None
    torch.manual_seed(config.seed)
    t0 = time.perf_counter()
    # a line for a build that takes a while (loading models, building pairs, caching latents)
    notice = threading.Timer(2.0, say, args=[f"[{config.name}] loading {len(config.models)} models, building "
                                             "pairs and caching latents ..."])
    notice.daemon = True
    notice.start()
    try:
        problem = build_problem(config, shard=shard, log=say)
    finally:
        notice.cancel()
    if not resuming and run_dir.existing_outputs():
        say(f"[{config.name}] resume=false: starting over in {run_dir.path} (its earlier outputs removed)")
        run_dir.clear()  # only now that the new run's models have loaded
    if command is None and (config.data.tensors is not None or any(getattr(m, "module", None) is not None
                                                                   for m in config.models)):
        # Python objects (modules, tensors) are not in config.yaml (their digests are in fingerprint.json)
        command = ("run from Python objects (modules / counterfactual tensors), which config.yaml leaves out; "
                   "rerun through the Python API (llm_mas.compare)")
    run_dir.write_config(config, command or f"llm-mas mas {run_dir.config}", fingerprint)
    processes = f"{shard.world} process(es); " if shard is not None else ""
    say(f"[{config.name}] {processes}pairs built and latents cached in {time.perf_counter() - t0:.1f}s "
        f"({len(problem.models)} models, k={problem.k}, variables {problem.all_variables}, "
        f"{'stepwise' if problem.stepwise else 'indywise'}, device {config.device})")
    notice_line = latent_scale_notice(config, problem)
    if notice_line is not None:
        say(notice_line)
    alignments = build_alignments(config, problem)
    if shard is not None:
        shard.broadcast(alignments)
    train_config = TrainerConfig(**{**to_dict(config.train), "seed": config.seed})
    progress = config.progress and main
    trainer = MASTrainer(alignments, problem, train_config, checkpoint_path=run_dir.checkpoint if main else None,
                         progress=progress, log=say,
                         sync_gradients=shard.average_gradients if shard is not None else None,
                         # the STOP file is single-process only (ranks could see it at different steps)
                         callbacks=[ReleaseMemory(), *([StopFile(run_dir.stop)] if shard is None else []),
                                    ProgressLog(progress and sys.stderr.isatty(), say)])
    # every process resumes from rank 0's checkpoint; the barrier keeps rank 0 from writing a new one before
    # every process has read (or not found) the old one
    if state is not None:
        trainer.load_state_dict(state)
        say(f"resumed from {run_dir.checkpoint} at step {trainer.step}")
    if shard is not None:
        shard.barrier()
    fit = trainer.fit(resume=False)
    t_eval = time.perf_counter()
    with torch.no_grad():  # collective under a shard: every process evaluates its rows
        records: list[Record] = problem.evaluate(trainer.materialize(), split="valid", with_ci=True)
    if time.perf_counter() - t_eval > 2.0:
        say(f"[{config.name}] final evaluation (rollouts and bootstrap CIs) took {time.perf_counter() - t_eval:.1f}s")
    if not main:
        return None
    for r in records:
        r.best_step = fit.best_step
    info = {"stopped": fit.stopped, "best_step": fit.best_step, "steps": fit.steps}
    if shard is not None:
        info["processes"] = shard.world
    result = MASResult(models=[e.name for e in problem.models], variables=problem.all_variables, records=records,
                       run_dir=run_dir.path, info=info)
    run_dir.write_outputs(result, alignments, fit, {**info, "best_mean_valid_trial_iia": fit.best_score,
                                                    "seconds": round(time.perf_counter() - t0, 1)})
    write_alignment_manifest(run_dir.path, config, problem, alignments)   # how to rebuild them (llm_mas.artifacts)
    return result
