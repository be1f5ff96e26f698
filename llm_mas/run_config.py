"""Run MAS on task models from a config: `run_mas(config)` and the `MASConfig` preset format.

    llm-mas mas recipes/configs/gru_gru_hidden.yaml train.lr=2e-3 data.n_train=2000

A run writes ``runs/<name>/``: the resolved ``config.yaml``, ``alignments.safetensors``, ``results.json``
(one record per source, target, variable), ``history.csv`` and ``iia_matrix.png``; ``checkpoint.pt`` makes
a killed run resumable (run the same command again). Creating ``runs/<name>/STOP`` ends training early: the best
checkpoint is evaluated and every output written (the stop reason in ``summary.json``).
"""

from __future__ import annotations

import csv
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .config import from_dict, save_config, to_dict
from .errors import ConfigError
from .trainer import TrainerConfig

SITE_ALIASES = ("embeddings", "hidden")


@dataclass
class ModelConfig:
    name: str                           # task model: shipped name (llm-mas list-models) or checkpoint directory;
                                        # hf: hub id or local directory
    site: str = "hidden"                # "embeddings", "hidden", "layer{l}" or a module/hook path
    alignment: str = "orthogonal"       # orthogonal | low_rank | gram_schmidt | linear | identity
    # kind-specific options: orthogonal_map (matrix_exp | cayley | householder; cayley's materialize +
    # backward is ~12x cheaper at d = 1024, bench/alignment_cost.py), method (gram_schmidt: qr | cgs2),
    # bias (linear)
    alignment_options: dict[str, Any] = field(default_factory=dict)
    standardize: bool = False           # z-score latents (per feature) inside the alignment
    variable_map: dict[str, str] = field(default_factory=dict)  # shared variable -> this model's variable
    kind: Literal["task", "hf"] = "task"  # numeric task model, or a Hugging Face causal LM
    recording: str | None = None        # hf: directory written by `llm-mas record` for this model
    adapter: str | None = None          # hf: optional PEFT adapter directory
    dtype: str = "float32"              # hf: float32 | bfloat16 | float16
    device: str | None = None           # per-model device (default: the run's device)
    backend: str = "torch"              # hf: torch | nnsight | tlens
    untrained: bool = False             # control: a freshly initialised copy of this architecture (chance level)


@dataclass
class DataConfig:
    n_train: int = 10_000               # intervention pairs per direction and variable
    n_valid: int = 1_000
    stepwise: bool = False              # stepwise (positions 0..i) instead of indywise (one position)
    # [lo, hi]: swap only where the swapped variable's value lies in lo..hi in both the source and the
    # target (named variables only; e.g. Arithmetic cumulative_value restricted to 1..10)
    value_range: list[int] | None = None

    def validate(self) -> list[str]:
        p = []
        if self.n_train < 1:
            p.append(f"data.n_train must be >= 1, got {self.n_train}")
        if self.n_valid < 1:
            p.append(f"data.n_valid must be >= 1, got {self.n_valid}")
        if self.value_range is not None:
            vr = self.value_range
            if not isinstance(vr, (list, tuple)) or len(vr) != 2 or not all(
                    isinstance(v, int) and not isinstance(v, bool) for v in vr):
                p.append(f"data.value_range must be two integers [lo, hi], got {vr!r}")
            elif vr[0] > vr[1]:
                p.append(f"data.value_range {list(vr)} is empty: need lo <= hi, e.g. [{vr[1]}, {vr[0]}]")
        return p


@dataclass
class CLConfig:
    """CLMAS: models whose behaviour under intervention may not be used (causally inaccessible).

    Directions *into* them are trained only by the counterfactual-latent loss, the others by behaviour;
    total = (1 − epsilon)·L_behaviour + epsilon·L_CL. Every direction is still evaluated behaviourally.
    match_on: the target-task state variables a counterfactual latent is matched on (default: every state
    variable of the intended state, e.g. obj_count, phase and count for MultiObject). Matching on fewer (e.g.
    [phase, count], what the rest of the sequence depends on) finds a natural latent for intended states
    that never occur naturally (a count above the target's own obj_count) at the price of noise in the
    variables left out.
    """

    inaccessible: list[int] = field(default_factory=list)
    epsilon: float = 0.0
    match_on: list[str] | None = None

    def validate(self) -> list[str]:
        p = [] if 0.0 <= self.epsilon <= 1.0 else [f"cl.epsilon must be in [0, 1], got {self.epsilon}"]
        if self.match_on is not None and not self.match_on:
            p.append("cl.match_on: list at least one state variable, or leave it unset (null) to match on all")
        return p


@dataclass
class EvalConfig:
    batch_size: int = 1000


@dataclass
class MASConfig:
    models: list[ModelConfig]
    name: str = "mas"
    seed: int = 0
    variables: list[str] = field(default_factory=lambda: ["full"])
    k: int | None = None                # coordinates per variable (default: half the smallest width)
    null_subspace: bool = False         # train the remaining coordinates to change nothing (s == t only)
    directions: str | list[list[int]] = "all"   # all | cross | self | [[s, t], ...] (trained; all are evaluated)
    intervention: Literal["interchange", "stitch", "linear_stitch"] = "interchange"
    # interchange: MAS/DAS; stitch: rank-k partial isometry h_s Q_s P_k Q_tᵀ (target latent discarded);
    # linear_stitch: one unconstrained affine map of rank <= k per trained direction
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    cl: CLConfig = field(default_factory=CLConfig)
    out_dir: str = "runs"
    device: str = "cpu"
    progress: bool = True
    resume: bool = True

    def validate(self) -> list[str]:
        from .alignments import ALIGNMENTS

        p = []
        if not self.models:
            p.append("models: list at least one model (shipped names: see `llm-mas list-models`)")
        for i, m in enumerate(self.models):
            if m.alignment not in ALIGNMENTS:
                p.append(f"models.{i}.alignment: unknown kind {m.alignment!r}; valid: {', '.join(sorted(ALIGNMENTS))}")
            elif m.alignment_options:
                from .alignments import make_alignment
                from .errors import MASError

                try:  # a tiny instance checks option names and values before any model loads
                    make_alignment(m.alignment, 8, k=4, seed=0, **m.alignment_options)
                except (MASError, TypeError, ValueError) as e:
                    p.append(f"models.{i}.alignment_options: {e}")
        if isinstance(self.directions, str):
            if self.directions not in ("all", "cross", "self"):
                p.append(f"directions: {self.directions!r} must be all, cross, self or a list of [source, target]")
        else:
            for d in self.directions:
                if len(d) != 2 or not all(0 <= x < len(self.models) for x in d):
                    p.append(f"directions: {d} must be [source, target] with indices in 0..{len(self.models) - 1}")
        for i in self.cl.inaccessible:
            if not 0 <= i < len(self.models):
                p.append(f"cl.inaccessible: model index {i} is outside 0..{len(self.models) - 1}")
        if self.k is not None and self.k < 1:
            p.append(f"k must be >= 1, got {self.k}")
        if not self.variables:
            p.append("variables: list at least one variable (e.g. full, count, phase)")
        if self.data.value_range is not None:
            whole = [v for v in self.variables if v in ("full", "null")] + (["null"] if self.null_subspace else [])
            if whole:
                p.append(f"data.value_range restricts one named variable's values; it cannot apply to "
                         f"{sorted(set(whole))}: list named variables only (e.g. variables: [count]) and set "
                         "null_subspace: false")
        if self.device != "cpu" and not self.device.startswith("cuda"):
            p.append(f"device {self.device!r} must be cpu or cuda[:i]")
        return p

    def _directions(self) -> list[tuple[int, int]]:
        n = len(self.models)
        if self.directions == "all":
            return [(s, t) for s in range(n) for t in range(n)]
        if self.directions == "cross":
            return [(s, t) for s in range(n) for t in range(n) if s != t]
        if self.directions == "self":
            return [(i, i) for i in range(n)]
        return [tuple(d) for d in self.directions]

    def train_directions(self) -> list[tuple[int, int]]:
        """Directions trained by behaviour (those into an inaccessible model are CL-trained instead)."""
        return [d for d in self._directions() if d[1] not in self.cl.inaccessible]

    def cl_directions(self) -> list[tuple[int, int]]:
        return [d for d in self._directions() if d[1] in self.cl.inaccessible]


def check_models(config: MASConfig) -> list:
    """Manifest entries of the task models (names, tasks and variables were checked by validate())."""
    if any(m.kind == "hf" for m in config.models):
        return [None] * len(config.models)
    problems, infos = _model_infos(config)
    if problems:
        raise ConfigError(problems)
    return infos


def model_problems(config: MASConfig) -> list[str]:
    """Unknown task-model names and variables the models' tasks do not have (no weights are loaded)."""
    return _model_infos(config)[0]


def _model_infos(config: MASConfig) -> tuple[list[str], list]:
    from .models.registry import resolve_model_dir
    from .models.training import read_run_config
    from .tasks import get_task

    problems, infos = [], []
    for i, m in enumerate(config.models):
        try:
            run_dir, entry = resolve_model_dir(m.name)
            info = entry or {"task": read_run_config(run_dir)["train"]["task"]}
        except ConfigError as e:
            problems.append(f"models.{i}.name: {e}")
            infos.append(None)
            continue
        infos.append(info)
        task = get_task(info["task"])
        for v in config.variables:
            own = m.variable_map.get(v, v)
            if own not in ("full", "null", *task.variables):
                problems.append(f"variables: {own!r} is not a variable of task {task.name!r} (models.{i}); valid: "
                                f"full, {', '.join(task.variables)}")
    return problems, infos


def build_problem(config: MASConfig, log=None):
    kinds = {m.kind for m in config.models}
    if kinds == {"hf"}:
        from .llm.mas import build_llm_problem

        return build_llm_problem(config, log=log)
    if len(kinds) > 1:
        raise ConfigError("models: mixing kind 'task' and kind 'hf' in one run is not supported")
    from .models.registry import load_task_model
    from .numeric import ModelEntry, NumericProblem
    from .sites import resolve_site
    from .tasks import get_task

    check_models(config)
    entries = []
    for i, m in enumerate(config.models):
        model = load_task_model(m.name).to(config.device)
        if m.untrained:  # control: same architecture, fresh random weights
            from .models.task_models import build_task_model

            cfg = dict(model.config)
            arch, task_name, vocab = cfg.pop("arch"), cfg.pop("task_name"), cfg.pop("vocab_size")
            cfg.pop("seed", None)
            model = build_task_model(arch, task_name, vocab, seed=10_000 + config.seed * 7 + i, **cfg)
            model.eval().requires_grad_(False).to(config.device)
        site = resolve_site(model, m.site)
        from .backends.torch_hooks import get_module

        get_module(model, site)  # wrong path -> SiteError listing close names
        entries.append(ModelEntry(name=Path(m.name).name + ("-untrained" if m.untrained else ""), model=model, task=get_task(model.task_name), site=site,
                                  width=model.d_model, variable_map=dict(m.variable_map)))
    widths = [e.width for e in entries]
    k = config.k if config.k is not None else min(widths) // 2
    names = [e.name for e in entries]
    if len(set(names)) != len(names):  # the same model twice (e.g. a model and itself): keep names distinct
        for i, e in enumerate(entries):
            e.name = f"{e.name}#{i}"
    problem = NumericProblem(entries, config.variables, k, null_subspace=config.null_subspace,
                             stepwise=config.data.stepwise, train_directions=config.train_directions(),
                             n_train=config.data.n_train, n_valid=config.data.n_valid, seed=config.seed,
                             intervention=config.intervention, eval_batch_size=config.eval.batch_size,
                             device=config.device, progress=config.progress,
                             cl_directions=config.cl_directions(), cl_epsilon=config.cl.epsilon,
                             cl_match_on=config.cl.match_on, value_range=config.data.value_range)
    return problem


def build_alignments(config: MASConfig, problem):
    import torch

    from .alignments import make_alignment

    if config.intervention == "linear_stitch":
        from .baselines import LinearStitch

        widths = [e.width for e in problem.models]
        return torch.nn.ModuleList([
            LinearStitch(widths[s], widths[t], problem.k, seed=config.seed * 101 + 7 * s + t)
            for s, t in problem.map_directions]).to(config.device)
    alignments = []
    for i, (m, e) in enumerate(zip(config.models, problem.models)):
        std = problem.latent_stats[i] if m.standardize else None
        alignments.append(make_alignment(m.alignment, e.width, k=problem.k * len(problem.all_variables)
                                         if m.alignment in ("low_rank", "gram_schmidt") else problem.k,
                                         seed=config.seed * 101 + i, standardize=std, **m.alignment_options))
    return torch.nn.ModuleList(alignments).to(config.device)


def run_mas(config: MASConfig, log=print):
    """Train and evaluate; write the run directory; return a `MASResult`."""
    import os

    import torch
    from safetensors.torch import save_file

    from .results import MASResult
    from .trainer import MASTrainer

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("run_mas was started in several processes (WORLD_SIZE > 1); every copy would write the "
                          "same run directory. For data-parallel LLM MAS launch "
                          "`accelerate launch ... -m llm_mas.llm.distributed CONFIG.yaml` instead")
    torch.manual_seed(config.seed)
    run_dir = Path(config.out_dir) / config.name
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, run_dir / "config.yaml", header=f"llm-mas mas {run_dir / 'config.yaml'}")
    t0 = time.perf_counter()
    problem = build_problem(config, log=log)
    log(f"[{config.name}] pairs built and latents cached in {time.perf_counter() - t0:.1f}s "
        f"({len(problem.models)} models, k={problem.k}, variables {problem.all_variables}, "
        f"{'stepwise' if problem.stepwise else 'indywise'})")
    alignments = build_alignments(config, problem)
    train_cfg = TrainerConfig(**{**to_dict(config.train), "seed": config.seed})
    trainer = MASTrainer(alignments, problem, train_cfg, checkpoint_path=run_dir / "checkpoint.pt",
                         progress=config.progress, log=log, stop_file=run_dir / "STOP")
    fit = trainer.fit(resume=config.resume)
    with torch.no_grad():
        records = problem.evaluate(trainer.materialize(), split="valid", with_ci=True)
    for r in records:
        r["best_step"] = fit.best_step
    result = MASResult(models=[e.name for e in problem.models], variables=problem.all_variables, records=records,
                       run_dir=run_dir, info={"stopped": fit.stopped, "best_step": fit.best_step, "steps": fit.steps})
    result.save(run_dir)
    save_file({f"model{i}.{k}": v.detach().cpu().contiguous() for i, a in enumerate(alignments)
               for k, v in a.state_dict().items()}, str(run_dir / "alignments.safetensors"))
    _write_history(fit.history, run_dir / "history.csv")
    (run_dir / "summary.json").write_text(json.dumps(
        {"stopped": fit.stopped, "best_step": fit.best_step, "steps": fit.steps,
         "best_mean_valid_trial_iia": fit.best_score, "seconds": round(time.perf_counter() - t0, 1)}, indent=1))
    result.plot(run_dir / "iia_matrix.png")
    return result


def _write_history(history: list[dict], path: Path) -> None:
    keys = list(dict.fromkeys(k for row in history for k in row))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(history)


def load_mas_config(path: str | Path | None, overrides=(), base: dict | None = None) -> MASConfig:
    """Preset + overrides -> MASConfig. Every problem — unknown keys, bad values, unknown model names,
    variables a model's task does not have — is reported in one ConfigError, before anything loads."""
    from .config import apply_overrides, load_yaml

    data = dict(base or {})
    if path is not None:
        data.update(load_yaml(path))
    data = apply_overrides(data, overrides)
    problems: list[str] = []
    try:
        cfg = from_dict(MASConfig, data)
    except ConfigError as e:
        problems.extend(e.problems)
        cfg = None
    if cfg is not None:
        if not any(m.kind == "hf" for m in cfg.models):
            problems.extend(model_problems(cfg))
    else:  # the config did not build: still check the task-model names it gives
        from .models.registry import resolve_model_dir

        for i, m in enumerate(data.get("models") or []):
            if isinstance(m, dict) and m.get("kind", "task") == "task" and isinstance(m.get("name"), str):
                try:
                    resolve_model_dir(m["name"])
                except ConfigError as e:
                    problems.append(f"models.{i}.name: {e}")
    if problems:
        raise ConfigError(problems)
    return cfg


def config_from_kwargs(**kwargs) -> MASConfig:
    return from_dict(MASConfig, kwargs)
