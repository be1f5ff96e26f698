"""Run MAS from a config: ``run(config)`` builds the problem of the config's model kind (``PROBLEMS``), trains
the alignments with ``MASTrainer``, evaluates them with CIs and writes the run directory (`RunDir`).

    llm-mas mas gru_gru_hidden train.lr=2e-3 data.n_train=2000

A run writes ``runs/<name>/``: the resolved ``config.yaml``, ``alignments.safetensors``, ``results.json``
(one record per source, target, variable), ``history.csv``, ``summary.json`` and ``iia_matrix.png``;
``checkpoint.pt`` makes a killed run resumable (run the same command again). Creating ``runs/<name>/STOP``
ends training early: the best checkpoint is evaluated and every output written (the stop reason in
``summary.json``). The data-parallel launcher (``llm_mas.distributed``) calls the same ``run`` with this
process's ``Shard``; only rank 0 writes.
"""

from __future__ import annotations

import csv
import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from .alignments import make_alignment
from .config import save_config, to_dict
from .errors import ConfigError
from .problems import PROBLEMS, InterventionProblem, Record, Shard
from .results import MASResult
from .run_config import MASConfig
from .trainer import FitResult, MASTrainer, TrainerConfig


def build_problem(config: MASConfig, *, shard: Shard | None = None,
                  log: Callable[[str], None] | None = None) -> InterventionProblem:
    """The problem of the config's model kind (``PROBLEMS[config.kind]``), pairs built and latents cached."""
    if config.kind not in PROBLEMS:
        raise ConfigError(f"models: no problem is registered for model kind {config.kind!r}; registered: "
                          f"{', '.join(PROBLEMS)}")
    return PROBLEMS[config.kind](config, shard=shard, log=log)


def build_alignments(config: MASConfig, problem: InterventionProblem) -> nn.ModuleList:
    """The trained modules: the intervention's own maps when it has them (linear stitch: one per direction),
    else one alignment per model (kind, options and standardisation from its model entry)."""
    widths = [e.width for e in problem.models]
    own = problem.intervention.own_maps(widths, problem.k, config.seed)
    if own is not None:
        return own.to(config.device)
    alignments = []
    for i, (m, width) in enumerate(zip(config.models, widths)):
        std = problem.latent_stats[i] if m.standardize else None
        k = problem.k * len(problem.all_variables) if m.alignment in ("low_rank", "gram_schmidt") else problem.k
        alignments.append(make_alignment(m.alignment, width, k=k, seed=config.seed * 101 + i, standardize=std,
                                         **m.alignment_options))
    return nn.ModuleList(alignments).to(config.device)


class RunDir:
    """The files of one run directory; ``writes=False`` (a data-parallel rank other than 0) writes nothing."""

    def __init__(self, path: str | Path, writes: bool = True):
        self.path = Path(path)
        self.writes = writes
        self.config = self.path / "config.yaml"
        self.results = self.path / "results.json"
        self.alignments = self.path / "alignments.safetensors"
        self.history = self.path / "history.csv"
        self.summary = self.path / "summary.json"
        self.plot = self.path / "iia_matrix.png"
        self.checkpoint = self.path / "checkpoint.pt"
        self.stop = self.path / "STOP"   # creating it ends training early

    def write_config(self, config: MASConfig, command: str) -> None:
        """The resolved config, headed by the command that reruns (resumes) the run."""
        if self.writes:
            self.path.mkdir(parents=True, exist_ok=True)
            save_config(config, self.config, header=command)

    def write_outputs(self, result: MASResult, alignments: nn.ModuleList, fit: FitResult, summary: dict) -> None:
        if not self.writes:
            return
        result.save(self.path)
        save_file({f"model{i}.{k}": v.detach().cpu().contiguous() for i, a in enumerate(alignments)
                   for k, v in a.state_dict().items()}, str(self.alignments))
        write_history(fit.history, self.history)
        self.summary.write_text(json.dumps(summary, indent=1))
        result.plot(self.plot)


def write_history(history: Sequence[dict], path: Path) -> None:
    """One CSV row per validation (columns: the union of every row's keys, in first-seen order)."""
    keys = list(dict.fromkeys(k for row in history for k in row))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(history)


def run(config: MASConfig, *, shard: Shard | None = None, log: Callable[[str], None] = print,
        command: str | None = None) -> MASResult | None:
    """Train and evaluate; write the run directory; return a `MASResult` (None on ranks other than 0).

    shard:   this process's part of a data-parallel run (``llm_mas.distributed``, which also sets
             ``config.device`` to the process's device); None: one process.
    command: the first line of the written config.yaml (default: ``llm-mas mas RUN/config.yaml``).
    """
    if shard is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("run was started in several processes (WORLD_SIZE > 1); every copy would write the "
                          "same run directory. For data-parallel LLM MAS launch "
                          "`accelerate launch ... -m llm_mas.distributed CONFIG.yaml` instead")
    main = shard is None or shard.is_main
    say = log if main else (lambda s: None)
    torch.manual_seed(config.seed)
    run_dir = RunDir(Path(config.out_dir) / config.name, writes=main)
    run_dir.write_config(config, command or f"llm-mas mas {run_dir.config}")
    t0 = time.perf_counter()
    problem = build_problem(config, shard=shard, log=say)
    processes = f"{shard.world} process(es); " if shard is not None else ""
    say(f"[{config.name}] {processes}pairs built and latents cached in {time.perf_counter() - t0:.1f}s "
        f"({len(problem.models)} models, k={problem.k}, variables {problem.all_variables}, "
        f"{'stepwise' if problem.stepwise else 'indywise'}, device {config.device})")
    alignments = build_alignments(config, problem)
    if shard is not None:
        shard.broadcast(alignments)
    train_config = TrainerConfig(**{**to_dict(config.train), "seed": config.seed})
    trainer = MASTrainer(alignments, problem, train_config, checkpoint_path=run_dir.checkpoint if main else None,
                         progress=config.progress and main, log=say,
                         sync_gradients=shard.average_gradients if shard is not None else None,
                         # the STOP file is single-process only (ranks could see it at different steps)
                         stop_file=run_dir.stop if shard is None else None)
    # every process resumes from rank 0's checkpoint; the barrier keeps rank 0 from writing a new one before
    # every process has read (or not found) the old one
    if config.resume and run_dir.checkpoint.exists():
        trainer.load_state_dict(torch.load(run_dir.checkpoint, weights_only=False, map_location=config.device))
        say(f"resumed from {run_dir.checkpoint} at step {trainer.step}")
    if shard is not None:
        shard.barrier()
    fit = trainer.fit(resume=False)
    with torch.no_grad():  # collective under a shard: every process evaluates its rows
        records: list[Record] = problem.evaluate(trainer.materialize(), split="valid", with_ci=True)
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
    return result
