"""Many models at once: a 15-model joint MAS clustered next to CKA and GPA, and pairs aligned alone vs jointly.

    python -m recipes.many_models recipes/configs/many_models.yaml
    python -m recipes.many_models --smoke                         # 3 shipped models, tiny sizes: seconds
    python -m recipes.many_models --only joint_all_s0             # just the all-model run
    python -m recipes.many_models --report                        # rewrite the outputs from finished runs

    python -m recipes.many_models recipes/configs/many_models_converged.yaml   # every direction, 3 seeds
    python -m recipes.many_models recipes/configs/many_models_standardized.yaml  # the same, latents z-scored

(1) ``joint_all_s{seed}``: one MAS over every model of ``models`` at ``site`` (``arch_sites`` overrides it per
    architecture, e.g. ``{transformer: layer0}``; ``standardize: true`` z-scores every model's latents inside its
    alignment, which models of different latent scale need; all n² directions; with more than ``directions_per_step``
    directions the run passes ``train.directions_per_step`` and ``train.direction_sampling`` to the core,
    which samples that many trained directions per step). Its n×n validation trial-IIA matrix (95% bootstrap
    CIs in ``matrix.csv``; with several seeds their mean, 95% t intervals over seeds) is clustered (average linkage on
    1 − (IIA + IIAᵀ)/2, ``recipes.common.clustering``) and drawn with its dendrogram next to the n×n
    linear CKA and generalized-Procrustes similarity (``llm_mas.similarity.cka_matrix``,
    ``llm_mas.hyperalignment``) computed on the same rows: every non-pad position of the same MultiObject
    sequences in every model (``llm_mas.correlative.collect_rows``). Claim checked: the recurrent
    architectures (GRU, LSTM; a Markovian count state) form one cluster that the Transformers do not join.
    With ``alone: true`` each model is also aligned by itself (``alone_<model>_s<seed>``: DAS, its own
    direction only), and ``own_directions.csv`` sets each model's own direction in the all-model runs against it;
    with ``start_from_alone: true`` too, the all-model run of each seed starts every model's alignment from
    its run alone at that seed (``models.i.alignment_init``) instead of a random rotation, and runs after them.
    With ``own_check_pairs: N`` too, after the runs each model's own direction from every all-model run and
    from its run alone at that seed are scored on the same N fresh validation pairs and compared pair by pair
    (``own_check.csv``: both trial IIAs, their difference with a bootstrap interval, McNemar's exact p, and
    the seeds' pairs pooled): the 256 validation pairs of a run resolve differences of one pair (0.004) but
    cannot tell them from chance. ``fresh_cross_archs: [gru]`` rescores the all-model runs' cross directions
    among those models on the same fresh pairs (``fresh_cross.csv``).
(2) For each reference pair (a, b): MAS of the pair alone (``pair_<name>_s<seed>``) and inside joint runs
    of n models: ``<name>_like_n<n>_s<seed>`` adds n − 2 models of other architectures than
    ``unlike_arch`` (GRUs, LSTMs), ``<name>_unlike_n<n>_s<seed>`` adds ``unlike_arch`` models
    (Transformers) first and fills up with the others when they run out (the row says how many were
    unlike); n = len(models) is the all-model run. The added models are a seeded permutation of each pool
    (nested: the models of n = 5 include those of n = 3). Per run and reference pair: trial IIA of a → b and
    b → a with CIs, steps to ``steps_target`` (first validation at which both cross directions reach it),
    wall time, peak memory (resident set size sampled during the run, above the level before it), number
    of alignment matrices and directions; and the cost of the n(n − 1)/2 pairwise runs the same
    comparisons would need, estimated from the measured pairwise runs. For n in ``every_direction_ns``
    ``<name>_<kind>_n<n>_every_s<seed>`` repeats the joint run on the same models without the direction
    budget: every direction every step, so each direction gets as many updates as in the pairwise run
    (kind ``like_every`` / ``unlike_every``): it separates fewer updates from conflicting models.

Outputs in ``runs/<name>[-smoke]/``: ``matrix.csv``, ``similarity.json``, ``clustered.png``, ``pairs.csv``,
``iia_vs_n.png``, ``own_directions.csv``, ``own_check.csv``, ``fresh_cross.csv``, ``summary.md`` (rewritten after
every run); with ``publish`` (not under --smoke) also ``docs/results/<name>.{md,csv}``,
``docs/results/<name>_{matrix,own_directions,own_check,fresh_cross}.csv`` and
``docs/figures/<name>_{clustered,iia_vs_n}.png``.
Restartable like the other recipes (``recipes.common.plans``): finished runs with the same resolved config
are reused, unfinished ones resume, a ``STOP`` file in a run directory ends it at its best checkpoint.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import shutil
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure

from llm_mas.config import from_dict, to_dict
from llm_mas.errors import ConfigError
from llm_mas.resources import resident_mib
from llm_mas.run_config import MASConfig
from llm_mas.stats import t_interval
from recipes.common.claims import Claim
from recipes.common.cli import RecipeInvocation, recipe_front_door
from recipes.common.clustering import cluster_order, plot_clustered_matrices
from recipes.common.models import resolve_models
from recipes.common.plans import (
    REPO,
    SMOKE_MAS_OVERRIDES,
    PlannedRun,
    RunOutcome,
    direction_row,
    execute_plan,
    mas_config_from_preset,
    preset_path,
)
from recipes.common.report import (
    SMOKE_NOTE,
    fmt,
    fmt_ci,
    markdown_table,
    run_status_sections,
    write_csv,
    write_summary,
)

SAMPLINGS = ("uniform", "balanced", "by_target")
KINDS = ("pairwise", "like", "unlike", "all", "like_every", "unlike_every")
EVERY = "_every"  # kind / run-name suffix: the same models, every direction trained every step (no budget)
SMOKE_SIMILARITY = {"per_quantity": 2}
OWN_CHECK_SEED = 90_000  # own_check_pairs: fresh pairs drawn with data seed OWN_CHECK_SEED + the run's seed
SMOKE_OWN_CHECK_PAIRS = 16
OWN_CHECK_LEVEL = 0.05   # own_check's verdict: above / below alone where McNemar's exact p is below this


@dataclass
class ReferencePair:
    name: str
    models: list[str]

    def validate(self) -> list[str]:
        return [] if len(self.models) == 2 and self.models[0] != self.models[1] else [
            f"reference pair {self.name!r}: models must be two different models, got {self.models}"]


@dataclass
class SimilaritySettings:
    per_quantity: int = 15            # sequences per quantity N = 1..20 (rows: all their non-pad positions)
    gpa_max_iter: int = 200


@dataclass
class RecipeConfig:
    models: list[str]
    reference_pairs: list[ReferencePair] = field(default_factory=list)
    site: str = "hidden"
    arch_sites: dict[str, str] = field(default_factory=dict)  # architecture -> site, overriding `site` for it
    standardize: bool = False         # z-score every model's latents inside its alignment (models.i.standardize)
    k: int = 32
    mas_preset: str = "llm_mas/presets/three_grus.yaml"
    mas_overrides: list[str] = field(default_factory=list)
    all_model_overrides: list[str] = field(default_factory=list)  # applied after mas_overrides to the all-model runs
    directions_per_step: int = 0      # 0: every direction every step; else passed to runs with more directions
    direction_sampling: str = "balanced"
    ns: list[int] = field(default_factory=lambda: [3, 5, 9, 15])
    alone: bool = False               # also each model alone (DAS: its own direction only), per seed: the bar
                                      # each model's own direction in the all-model run is held to
    start_from_alone: bool = False    # the all-model runs start each model's alignment from its run alone at
                                      # the same seed (models.i.alignment_init; needs alone: true)
    every_direction_ns: list[int] = field(default_factory=list)  # joint sizes also run without the budget:
                                      # the same models, every direction every step (updates matched to pairwise)
    seeds: list[int] = field(default_factory=lambda: [0])
    steps_target: float = 0.9
    unlike_arch: str = "transformer"
    similarity: SimilaritySettings = field(default_factory=SimilaritySettings)
    smoke_models: list[str] = field(default_factory=list)
    publish: bool = False
    minutes_per_run: float = 0.0      # > 0: a STOP file ends a training run after this many minutes (best
                                      # checkpoint kept, summary names it); 0: no time budget
    name: str = "many_models"
    out_dir: str = "runs"
    device: str = "cpu"
    # torch CPU threads of this recipe's process: 1 (the default) on a shared machine, where extra threads
    # spin while other jobs hold the cores; 2 on two quiet cores made a 15-model step 1.45x faster in wall
    # time (BENCHMARKS.md, "The cost of a direction versus n")
    threads: int = 1
    reuse_dirs: list[str] = field(default_factory=lambda: ["runs"])
    # > 0 (with alone: true): after the runs, score each model's own direction from every all-model run and
    # from its run alone on this many fresh validation pairs, pair by pair (own_check.csv); 0: off
    own_check_pairs: int = 0
    # architectures (e.g. [gru]) whose cross directions in the all-model runs are also rescored on those
    # fresh pairs (fresh_cross.csv; needs own_check_pairs)
    fresh_cross_archs: list[str] = field(default_factory=list)

    def validate(self) -> list[str]:
        p = []
        if self.own_check_pairs < 0:
            p.append(f"own_check_pairs must be >= 0 (0: off), got {self.own_check_pairs}")
        elif self.own_check_pairs and not self.alone:
            p.append("own_check_pairs needs alone: true (each model's run alone is what its own direction is "
                     "checked against)")
        if self.fresh_cross_archs:
            archs = {architecture(m) for m in self.models}
            missing = [a for a in self.fresh_cross_archs if a not in archs]
            if missing:
                p.append(f"fresh_cross_archs: no model of architecture {missing} (models have {sorted(archs)})")
            if not self.own_check_pairs:
                p.append("fresh_cross_archs needs own_check_pairs > 0 (how many fresh pairs to score on)")
        if len(self.models) < 2:
            p.append(f"models: list at least two models, got {self.models}")
        dupes = sorted({m for m in self.models if self.models.count(m) > 1})
        if dupes:
            p.append(f"models: repeated {dupes}")
        for pair in self.reference_pairs:
            p.extend(pair.validate())
            missing = [m for m in pair.models if m not in self.models]
            if missing:
                p.append(f"reference pair {pair.name!r}: {missing} not in models; list them there")
        names = [r.name for r in self.reference_pairs]
        if len(set(names)) != len(names):
            p.append(f"reference_pairs: names must be unique, got {names}")
        archs = {architecture(m) for m in self.models}
        unknown = sorted(a for a in self.arch_sites if a not in archs)
        if unknown:
            p.append(f"arch_sites: no model of architecture {unknown} (models have {sorted(archs)}); "
                     "key arch_sites by the architecture part of a model name, e.g. transformer")
        if self.k < 1:
            p.append(f"k must be >= 1, got {self.k}")
        if self.directions_per_step < 0:
            p.append(f"directions_per_step must be >= 0 (0: no sampling), got {self.directions_per_step}")
        if self.direction_sampling not in SAMPLINGS:
            p.append(f"direction_sampling {self.direction_sampling!r} is not one of {', '.join(SAMPLINGS)}")
        bad = [n for n in self.ns if n < 3]
        if bad or not self.ns:
            p.append(f"ns: list joint-run sizes >= 3 (n = 2 is the pairwise run), got {self.ns}")
        bad = [n for n in self.every_direction_ns if n not in self.ns]
        if bad:
            p.append(f"every_direction_ns: {bad} not in ns {self.ns}; list joint-run sizes that are also in ns")
        if not (isinstance(self.threads, int) and self.threads >= 1):
            p.append(f"threads must be an integer >= 1 (torch CPU threads; 1 on a shared machine), got "
                     f"{self.threads!r}")
        if self.start_from_alone and not self.alone:
            p.append("start_from_alone: the all-model runs start from each model's run alone; set alone: true")
        if self.minutes_per_run < 0:
            p.append(f"minutes_per_run must be >= 0 (0: no budget), got {self.minutes_per_run}")
        if not self.seeds:
            p.append("seeds: list at least one seed")
        if not 0 < self.steps_target <= 1:
            p.append(f"steps_target must be in (0, 1], got {self.steps_target}")
        if self.smoke_models and len(self.smoke_models) < 2:
            p.append(f"smoke_models: list at least two models, got {self.smoke_models}")
        if not preset_path(self.mas_preset).exists():
            p.append(f"mas_preset {self.mas_preset!r} does not exist (tried the working directory and {REPO})")
        return p


# ================================================================================== plan
def architecture(model: str) -> str:
    """``multiobject-gru-s0`` -> ``gru`` (the second part of a shipped or stand-in name)."""
    parts = Path(model).name.split("-")
    return parts[1] if len(parts) > 1 else parts[0]


def site_of(config: RecipeConfig, model: str) -> str:
    """The site `model` is aligned at: ``arch_sites`` of its architecture, else ``site``."""
    return config.arch_sites.get(architecture(model), config.site)


def site_label(config: RecipeConfig) -> str:
    """``hidden`` or ``hidden (transformer: layer0)`` for titles and summaries."""
    extra = ", ".join(f"{arch}: {site}" for arch, site in config.arch_sites.items() if site != config.site)
    return config.site + (f" ({extra})" if extra else "")


def short(model: str) -> str:
    """``multiobject-gru-s0`` -> ``gru-s0``."""
    return Path(model).name.split("-", 1)[-1]


def budget_overrides(n_models: int, directions_per_step: int, sampling: str) -> list[str]:
    """The per-step direction budget as plain ``train.*`` overrides, only for runs with more directions
    (n²) than the budget; smaller runs train every direction every step and need no such key."""
    if directions_per_step and n_models * n_models > directions_per_step:
        return [f"train.directions_per_step={directions_per_step}", f"train.direction_sampling={sampling}"]
    return []


def added_models(config: RecipeConfig, pair: list[str], pool: list[str], kind: str, n: int,
                 seed: int) -> list[str] | None:
    """The n − 2 models joining `pair`: a seeded permutation of the like / unlike pool (unlike: filled up
    with like models when it runs out); None when there are not enough models."""
    others = [m for m in pool if m not in pair]
    like = [m for m in others if architecture(m) != config.unlike_arch]
    unlike = [m for m in others if architecture(m) == config.unlike_arch]
    kind = kind.removesuffix(EVERY)  # an every-direction run adds the same models as its budgeted twin
    rng = np.random.default_rng([seed, 1 + KINDS.index(kind)])
    like = [like[i] for i in rng.permutation(len(like))]
    unlike = [unlike[i] for i in rng.permutation(len(unlike))]
    order = like if kind == "like" else unlike + like
    return order[:n - 2] if len(order) >= n - 2 else None


def plan(config: RecipeConfig, names: list[str], mapping: dict[str, str], overrides: list[str], ns: list[int],
         seeds: list[int], mas_dir: Path, progress: bool, all_model_overrides: list[str] = ()) -> list[PlannedRun]:
    """Every MAS run: the all-model runs first (one per seed), then per seed the pairwise runs and the joint
    runs of each reference pair by n. Each plan's rows are the reference pairs' cross directions it holds."""
    pairs = [p for p in config.reference_pairs if all(m in names for m in p.models)]

    def cfg(run_name: str, models: list[str], seed: int, extra: list[str] = (), budget: bool = True):
        sampled = budget_overrides(len(models), config.directions_per_step, config.direction_sampling) if budget else []
        return mas_config_from_preset(
            config.mas_preset, [*overrides, *extra, *sampled],
            name=run_name, out_dir=str(mas_dir), seed=seed, device=config.device, progress=progress,
            models=[{"name": mapping[m], "site": site_of(config, m), "standardize": config.standardize} for m in models],
            k=config.k, directions="all",
            variables=["full"])

    def rows(models: list[str], kind: str, n_unlike: int, only: str | None = None):
        out = []
        for p in pairs:
            if (only is None or p.name == only) and all(m in models for m in p.models):
                a, b = models.index(p.models[0]), models.index(p.models[1])
                labels = {"pair": p.name, "kind": kind, "n": len(models), "n_unlike_added": n_unlike,
                          "models": " ".join(short(m) for m in models)}
                out += [({**labels, "direction": "a→b"}, a, b), ({**labels, "direction": "b→a"}, b, a)]
        return out

    runs: dict[str, PlannedRun] = {}
    joint = {f"joint_all_s{seed}": PlannedRun(cfg(f"joint_all_s{seed}", names, seed, all_model_overrides),
                                              rows(names, "all", -1)) for seed in seeds}
    if not config.start_from_alone:
        runs.update(joint)   # first: the headline runs
    for seed in seeds:
        for m in names if config.alone else ():
            runs[f"alone_{short(m)}_s{seed}"] = PlannedRun(cfg(f"alone_{short(m)}_s{seed}", [m], seed), [])
    runs.update(joint)       # (after the runs alone they start from)
    for seed in seeds:
        for p in pairs:
            runs[f"pair_{p.name}_s{seed}"] = PlannedRun(cfg(f"pair_{p.name}_s{seed}", p.models, seed),
                                                        rows(p.models, "pairwise", 0))
            for n in sorted(set(ns)):
                if n >= len(names):
                    continue  # the all-model run
                for kind in ("like", "unlike"):
                    extra = added_models(config, p.models, names, kind, n, seed)
                    if extra is None:
                        continue
                    models = [*p.models, *extra]
                    n_unlike = sum(architecture(m) == config.unlike_arch for m in extra)
                    run_name = f"{p.name}_{kind}_n{n}_s{seed}"
                    runs[run_name] = PlannedRun(cfg(run_name, models, seed), rows(models, kind, n_unlike, p.name))
                    if n in config.every_direction_ns:
                        run_name = f"{p.name}_{kind}_n{n}{EVERY}_s{seed}"
                        runs[run_name] = PlannedRun(cfg(run_name, models, seed, budget=False),
                                                    rows(models, kind + EVERY, n_unlike, p.name))
    return list(runs.values())


def start_from_alone(plan_: PlannedRun, outcomes: dict, names: list[str]) -> None:
    """Before an all-model run of a ``start_from_alone`` recipe: set each model's ``alignment_init`` to its
    finished run alone at the same seed, or block the run naming the runs alone that have not finished."""
    if not plan_.name.startswith("joint_all_s"):
        return
    seed = plan_.config.seed
    alone = {m: outcomes.get(f"alone_{short(m)}_s{seed}") for m in names}
    missing = [f"alone_{short(m)}_s{seed}" for m, o in alone.items() if o is None or o.run_dir is None
               or o.status not in ("trained", "reused")]
    if missing:
        plan_.blocked = (f"start_from_alone: {', '.join(missing)} not finished (run them first: without --only, "
                         "or list them in --only)")
        return
    data = to_dict(plan_.config)
    for entry, m in zip(data["models"], names):
        entry["alignment_init"] = str(alone[m].run_dir)
    plan_.config = from_dict(MASConfig, data)


# ================================================================================== memory and cost
def resident_bytes() -> int | None:
    """This process's resident set size now (bytes; None where it cannot be read)."""
    mib = resident_mib()
    return None if mib is None else int(mib * 2**20)


class PeakResident:
    """Samples the resident set size every `interval` seconds in a thread while the block runs."""

    def __init__(self, interval: float = 0.05):
        self.interval = interval
        self.before = self.peak = resident_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            now = resident_bytes()
            if now is not None and (self.peak is None or now > self.peak):
                self.peak = now

    def __enter__(self) -> PeakResident:
        self.before = self.peak = resident_bytes()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        now = resident_bytes()
        if now is not None and (self.peak is None or now > self.peak):
            self.peak = now


def execute_with_cost(plans: list[PlannedRun], search_dirs, selected, after_each, log=print,
                      minutes_per_run: float = 0.0, prepare=None) -> dict:
    """`execute_plan` one plan at a time, measuring the peak resident memory of every run that trains
    (written to ``cost.json`` in its run directory, so reused runs keep it). With `minutes_per_run` > 0 a
    timer creates the run's ``STOP`` file after that long (the trainer then ends at its best checkpoint).
    ``after_each(outcomes)`` (the outputs' rewrite, figures included: seconds) follows every run that trained
    or failed, and ends the call once if the last plan was only reused or skipped. ``prepare(plan, outcomes)``
    may complete a plan's config from the runs before it (or block it) just before it runs."""
    outcomes: dict[str, RunOutcome] = {p.name: RunOutcome(p.name, "pending") for p in plans}
    fresh = True   # outcomes changed since the last after_each
    for i, plan_ in enumerate(plans, 1):
        if prepare is not None:
            prepare(plan_, outcomes)
        log(f"[{i}/{len(plans)}] {plan_.name} ({len(plan_.config.models)} models)")
        stop_file = Path(plan_.config.out_dir) / plan_.config.name / "STOP"
        timer = threading.Timer(60.0 * minutes_per_run, lambda f=stop_file: f.parent.is_dir() and f.touch())
        if minutes_per_run > 0:
            timer.start()
        try:
            with PeakResident() as memory:
                outcome = execute_plan([plan_], search_dirs, log=log, selected=selected)[plan_.name]
        finally:
            timer.cancel()
            stop_file.unlink(missing_ok=True)  # a STOP made after training ended must not stop the next call
        if outcome.status == "trained" and outcome.run_dir is not None and memory.peak is not None:
            (outcome.run_dir / "cost.json").write_text(json.dumps(
                {"peak_rss_mb": round(memory.peak / 2**20, 1),
                 "peak_rss_above_start_mb": round((memory.peak - memory.before) / 2**20, 1)}))
        outcomes[plan_.name] = outcome
        fresh = True
        if outcome.status in ("trained", "failed"):
            after_each(outcomes)
            fresh = False
    if fresh:
        after_each(outcomes)
    return outcomes


def steps_to_target(run_dir: Path | None, source: str, target: str, variable: str, threshold: float) -> float:
    """First validated step at which both s → t and t → s reach `threshold` trial IIA (history.csv); NaN
    when never reached or the history is missing."""
    path = None if run_dir is None else Path(run_dir) / "history.csv"
    if path is None or not path.exists():
        return math.nan
    keys = [f"{source}->{target}:{variable}:trial_iia", f"{target}->{source}:{variable}:trial_iia"]
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            values = [row.get(k) for k in keys]
            if all(v not in (None, "") for v in values) and min(float(v) for v in values) >= threshold:
                return float(row["step"])
    return math.nan


def pair_rows(plans: list[PlannedRun], outcomes: dict, threshold: float) -> list[dict]:
    """One row per (run, reference pair, direction): labels, trial IIA with CI, steps to target, cost."""
    rows = []
    for p in plans:
        outcome = outcomes.get(p.name) or RunOutcome(p.name, "pending")
        cost = {}
        if outcome.run_dir is not None and (Path(outcome.run_dir) / "cost.json").exists():
            cost = json.loads((Path(outcome.run_dir) / "cost.json").read_text())
        info = outcome.info or {}
        n = len(p.config.models)
        for labels, s, t in p.rows:
            row = {**labels, "run": p.name, "seed": p.config.seed, **direction_row(outcome, s, t, p.variable)}
            if outcome.result is not None:
                a, b = p.config.models[s].name, p.config.models[t].name
                row["steps_to_target"] = steps_to_target(outcome.run_dir, a, b, row["variable"], threshold)
            row.update(seconds=info.get("seconds", math.nan), peak_rss_mb=cost.get("peak_rss_mb", math.nan),
                       peak_rss_above_start_mb=cost.get("peak_rss_above_start_mb", math.nan),
                       n_matrices=n, n_directions=n * n)
            rows.append(row)
    return rows


# ================================================================================== aggregates and verdict
def aggregate(rows: list[dict]) -> list[dict]:
    """Per (pair, kind, n): mean trial IIA over seeds and both cross directions with a 95% t interval over
    the seeds (each seed's value = the mean of its two directions; clipped to [0, 1]), mean steps to target,
    mean cost."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["pair"], r["kind"], r["n"]), []).append(r)
    out = []
    for (pair, kind, n), members in groups.items():
        per_seed: dict[int, list[float]] = {}
        for r in members:
            if isinstance(r.get("trial_iia"), float) and not math.isnan(r["trial_iia"]):
                per_seed.setdefault(r["seed"], []).append(r["trial_iia"])
        values = np.array([np.mean(v) for v in per_seed.values()])
        mean, lo, hi = _clipped(t_interval(values))
        steps = [r["steps_to_target"] for r in members if _num(r.get("steps_to_target"))]
        out.append({"pair": pair, "kind": kind, "n": n, "seeds": len(values), "trial_iia": mean,
                    "trial_iia_lo": lo, "trial_iia_hi": hi,
                    "steps_to_target": float(np.mean(steps)) if steps else math.nan,
                    "reached_target": f"{len({r['seed'] for r in members if _num(r.get('steps_to_target'))})}"
                                      f"/{len({r['seed'] for r in members})}",
                    "seconds": _mean(members, "seconds"), "peak_rss_mb": _mean(members, "peak_rss_mb"),
                    "peak_rss_above_start_mb": _mean(members, "peak_rss_above_start_mb"),
                    "n_matrices": n, "n_directions": n * n})
    return sorted(out, key=lambda r: (r["pair"], KINDS.index(r["kind"]), r["n"]))


def _num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and not math.isnan(x)


def _mean(rows: list[dict], key: str) -> float:
    values = [r[key] for r in rows if _num(r.get(key))]
    return float(np.mean(values)) if values else math.nan


def verdict(table: list[dict]) -> list[str]:
    """Per reference pair and kind: joint vs pairwise trial IIA at every n, 'helps' / 'hurts' when the seed
    intervals are disjoint, 'no difference' when they overlap, 'undecided' without intervals."""
    lines = []
    for pair in dict.fromkeys(r["pair"] for r in table):
        base = next((r for r in table if r["pair"] == pair and r["kind"] == "pairwise"), None)
        if base is None or not _num(base["trial_iia"]):
            lines.append(f"- **{pair}**: the pairwise run is not finished; no verdict.")
            continue
        parts = []
        for r in table:
            if r["pair"] != pair or r["kind"] == "pairwise" or not _num(r["trial_iia"]):
                continue
            if _num(r["trial_iia_lo"]) and _num(base["trial_iia_lo"]):
                word = ("helps" if r["trial_iia_lo"] > base["trial_iia_hi"] else
                        "hurts" if r["trial_iia_hi"] < base["trial_iia_lo"] else "no difference")
            else:
                word = "undecided (one seed)"
            parts.append(f"n = {r['n']} {r['kind']}: {fmt_ci(r)} vs pairwise {fmt_ci(base)} → {word}")
        lines.append(f"- **{pair}**: " + ("; ".join(parts) if parts else "no joint run finished yet") + ".")
    for kind in ("like", "unlike", "all", "like_every", "unlike_every"):
        words = [line.rsplit("→ ", 1)[-1] for line in "; ".join(lines).split("; ") if f" {kind}: " in line]
        if words:
            counts = {w: sum(x.startswith(w) for x in words) for w in ("helps", "hurts", "no difference", "undecided")}
            lines.append(f"- Overall, {kind} models added: " + ", ".join(f"{w} {c}" for w, c in counts.items() if c)
                         + f" (of {len(words)} comparisons).")
    return lines


def cluster_claim(matrix: np.ndarray, names: list[str], unlike_arch: str) -> Claim:
    """The recurrent models form one cluster the `unlike_arch` models do not join: the average-linkage tree
    on 1 − symmetrized trial IIA has a split with exactly the non-`unlike_arch` models on one side."""
    finished = not np.isnan(matrix[~np.eye(len(names), dtype=bool)]).any()
    recurrent = {i for i, m in enumerate(names) if architecture(m) != unlike_arch}
    text = (f"Architectures that share a Markovian solution (GRU, LSTM) cluster together in the joint MAS trial-"
            f"IIA matrix; the {unlike_arch.capitalize()}s do not join them")
    if not finished or len(recurrent) in (0, len(names)):
        return Claim(text, None, "the all-model run is not finished (or has no models of one of the groups).")
    _, tree = cluster_order(matrix)
    n = len(names)
    members = {i: {i} for i in range(n)}
    found = False
    for step, (left, right, _, _) in enumerate(tree):
        members[n + step] = members[int(left)] | members[int(right)]
        found = found or members[n + step] == recurrent
    found = found or len(recurrent) == 1
    sym = (matrix + matrix.T) / 2
    inside = [sym[i, j] for i in recurrent for j in recurrent if i < j]
    across = [sym[i, j] for i in recurrent for j in range(n) if j not in recurrent]
    holds = found and bool(inside) and bool(across) and float(np.mean(inside)) > float(np.mean(across))
    return Claim(text, holds, f"a cluster holding exactly the {len(recurrent)} recurrent models "
                              f"{'exists' if found else 'does not exist'} in the average-linkage tree; mean "
                              f"symmetrized IIA within them {np.mean(inside) if inside else math.nan:.3f}, "
                              f"recurrent↔{unlike_arch} {np.mean(across) if across else math.nan:.3f}.")


# ================================================================================== similarity
def similarities(names: list[str], mapping: dict[str, str], config: RecipeConfig, run_dir: Path, smoke: bool,
                 log=print) -> dict:
    """n×n linear CKA and GPA similarity on the rows of the same sequences (reused when the settings match)."""
    from llm_mas.correlative import collect_rows, default_sequences
    from llm_mas.hyperalignment import generalized_procrustes
    from llm_mas.models import load_task_model
    from llm_mas.similarity import cka_matrix

    per_quantity = SMOKE_SIMILARITY["per_quantity"] if smoke else config.similarity.per_quantity
    sites = [site_of(config, m) for m in names]
    key = {"models": [mapping[m] for m in names], "site": sites[0] if len(set(sites)) == 1 else sites,
           "per_quantity": per_quantity,
           "gpa_max_iter": config.similarity.gpa_max_iter}
    path = run_dir / "similarity.json"
    if path.exists():
        saved = json.loads(path.read_text())
        if saved.get("key") == key:
            log(f"similarity: reusing {path}")
            return saved
    t0 = time.perf_counter()
    models = [load_task_model(mapping[m], device=config.device) for m in names]
    rows = collect_rows(models, sites, default_sequences(models[0].task_name, per_quantity))
    cka = cka_matrix(rows.latents)
    fit = generalized_procrustes(rows.latents, max_iter=config.similarity.gpa_max_iter)
    result = {"key": key, "names": names, "n_rows": len(rows), "cka_biased": cka.tolist(),
              "gpa": fit.similarity.tolist(), "gpa_iterations": fit.iterations, "gpa_converged": fit.converged,
              "seconds": round(time.perf_counter() - t0, 1)}
    path.write_text(json.dumps(result, indent=1))
    log(f"similarity: CKA and GPA of {len(names)} models on {len(rows)} rows ({result['seconds']}s, GPA "
        f"{fit.iterations} rounds, converged {fit.converged})")
    return result


# ================================================================================== outputs
def all_model_matrices(plans: list[PlannedRun], outcomes: dict, names: list[str]
                       ) -> tuple[list[tuple[int, np.ndarray, np.ndarray]], list[dict]]:
    """Every finished all-model run as (seed, (n, n) trial IIA, (n, n, 2) bootstrap CIs), and its cells as
    CSV rows."""
    n = len(names)
    out, rows = [], []
    for p in plans:
        outcome = outcomes.get(p.name)
        if not p.name.startswith("joint_all") or outcome is None or outcome.result is None:
            continue
        matrix, cis = np.full((n, n), np.nan), np.full((n, n, 2), np.nan)
        for r in outcome.result.records:
            matrix[r.source_index, r.target_index] = r.trial_iia
            if r.trial_iia_ci is not None:
                cis[r.source_index, r.target_index] = r.trial_iia_ci
            rows.append({"run": p.name, "seed": p.config.seed, "source": short(names[r.source_index]),
                         "target": short(names[r.target_index]), "trial_iia": r.trial_iia,
                         "trial_iia_lo": (r.trial_iia_ci or [math.nan])[0],
                         "trial_iia_hi": (r.trial_iia_ci or [math.nan, math.nan])[1], "token_iia": r.token_iia})
        out.append((p.config.seed, matrix, cis))
    return out, rows


def mean_matrix(runs: list[tuple[int, np.ndarray, np.ndarray]], n: int) -> tuple[np.ndarray, np.ndarray]:
    """The mean trial-IIA matrix over the finished seeds and its (n, n, 2) CIs: a 95% t interval over seeds
    (clipped to [0, 1]) with two or more seeds, the run's bootstrap CIs with one; NaN without a run."""
    if not runs:
        return np.full((n, n), np.nan), np.full((n, n, 2), np.nan)
    if len(runs) == 1:
        return runs[0][1], runs[0][2]
    stack = np.stack([m for _, m, _ in runs])                                   # (seeds, n, n)
    mean, cis = stack.mean(0), np.full((n, n, 2), np.nan)
    for i in range(n):
        for j in range(n):
            cis[i, j] = _clipped(t_interval(stack[:, i, j]))[1:]
    return mean, cis


def convergence_rows(runs: list[tuple[int, np.ndarray, np.ndarray]], names: list[str], plans: list[PlannedRun],
                     outcomes: dict) -> list[dict]:
    """Per model: its own direction in the all-model runs against the same model aligned alone (mean over
    seeds with a t interval), and the mean of its cross directions as source and as target."""
    alone: dict[str, list[float]] = {}
    for p in plans:
        outcome = outcomes.get(p.name)
        if p.name.startswith("alone_") and outcome is not None and outcome.result is not None:
            alone.setdefault(p.name.rsplit("_s", 1)[0].removeprefix("alone_"), []).extend(
                r.trial_iia for r in outcome.result.records)
    rows = []
    for i, m in enumerate(names):
        own = [mat[i, i] for _, mat, _ in runs]
        cross_out = [np.mean([mat[i, j] for j in range(len(names)) if j != i]) for _, mat, _ in runs]
        cross_in = [np.mean([mat[j, i] for j in range(len(names)) if j != i]) for _, mat, _ in runs]
        joint, lo, hi = _clipped(t_interval(own) if own else (math.nan,) * 3)
        a, alo, ahi = _clipped(t_interval(alone.get(short(m), [])))
        rows.append({"model": short(m), "seeds": len(own), "own_joint": joint, "own_joint_lo": lo,
                     "own_joint_hi": hi, "alone_seeds": len(alone.get(short(m), [])), "own_alone": a,
                     "own_alone_lo": alo, "own_alone_hi": ahi,
                     "joint_minus_alone": joint - a if _num(joint) and _num(a) else math.nan,
                     "cross_as_source": float(np.mean(cross_out)) if cross_out else math.nan,
                     "cross_as_target": float(np.mean(cross_in)) if cross_in else math.nan})
    return rows


class _CheckCache:
    """``own_check.json`` in the recipe's run directory: fresh-pair scores by key (the runs' alignment digests
    among them), written through after each new entry."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / "own_check.json"
        self.entries = json.loads(self.path.read_text()) if self.path.exists() else {}

    def put(self, key: str, value) -> None:
        from llm_mas.files import atomic_write_json

        self.entries[key] = value
        atomic_write_json(self.path, self.entries)


def _finished(outcome: RunOutcome | None) -> bool:
    return outcome is not None and outcome.result is not None and outcome.run_dir is not None


def _finished_joint_runs(plans: list[PlannedRun], outcomes: dict):
    """(seed, plan, outcome) of every all-model run that finished, by name."""
    for plan_ in sorted((p for p in plans if p.name.startswith("joint_all_s")), key=lambda p: p.name):
        if _finished(outcomes.get(plan_.name)):
            yield plan_.config.seed, plan_, outcomes[plan_.name]


def _fresh_config(run_config: MASConfig, models: list[dict], seed: int, n_pairs: int, name: str) -> MASConfig:
    """`run_config` with these model entries (each naming its trained alignment in ``alignment_init``),
    scoring `n_pairs` fresh validation pairs: data seed ``OWN_CHECK_SEED + seed``, n_train as the run's."""
    data = to_dict(run_config)
    data.update(models=models, seed=OWN_CHECK_SEED + seed, progress=False, name=name)
    data["data"]["n_valid"] = n_pairs
    return from_dict(MASConfig, data)


def own_check(config: RecipeConfig, names: list[str], plans: list[PlannedRun], outcomes: dict, run_dir: Path,
              n_pairs: int, log=print) -> list[dict]:
    """Each model's own direction from every finished all-model run against the same model's run alone at
    that seed, each whole (a standardised one with the statistics it was trained with), both scored on the
    same `n_pairs` fresh validation pairs (drawn with data seed ``OWN_CHECK_SEED + seed``: no run trained or
    validated on them) and compared pair by pair (``llm_mas.stats.paired_comparison``): one row per model and
    seed, then one per model over the seeds' pairs pooled. Scores are kept in ``own_check.json`` by the runs'
    alignment digests, so a report rescoring nothing new costs nothing."""
    from llm_mas.files import file_digest
    from llm_mas.run import build_problem
    from llm_mas.stats import paired_comparison

    by_name = {p.name: p for p in plans}
    cache = _CheckCache(run_dir)
    rows, pooled = [], {}
    for seed, _, joint in _finished_joint_runs(plans, outcomes):
        joint_digest = file_digest(Path(joint.run_dir) / "alignments.safetensors")
        for m in names:
            alone = outcomes.get(f"alone_{short(m)}_s{seed}")
            if not _finished(alone):
                continue
            key = "|".join(["own", m, str(seed), str(n_pairs), joint_digest,
                            file_digest(Path(alone.run_dir) / "alignments.safetensors")])
            if key not in cache.entries:
                alone_config = by_name[f"alone_{short(m)}_s{seed}"].config
                (entry,) = to_dict(alone_config)["models"]
                outcomes_by_init = {}
                problem = None
                for label, ref in (("joint", joint.run_dir), ("alone", alone.run_dir)):
                    check = _fresh_config(alone_config, [dict(entry, alignment_init=str(ref))], seed, n_pairs,
                                          f"own_check_{short(m)}_s{seed}")
                    problem = problem or build_problem(check, log=lambda s_: None)
                    maps = [a.materialize() for a in _trained_alignments(check, problem)]
                    outcomes_by_init[label] = np.concatenate([sc.trial for _, sc in problem.pair_scores(maps)])
                cache.put(key, {k: v.astype(int).tolist() for k, v in outcomes_by_init.items()})
                log(f"  own check: {short(m)} seed {seed} scored on {n_pairs} fresh pairs")
            a, b = (np.asarray(cache.entries[key][k], dtype=float) for k in ("joint", "alone"))
            pooled.setdefault(m, []).append((a, b))
            rows.append({"model": short(m), "seed": seed, **_joint_alone(paired_comparison(a, b, seed=seed))})
    for m, runs in pooled.items():
        a, b = (np.concatenate([r[i] for r in runs]) for i in (0, 1))
        rows.append({"model": short(m), "seed": "pooled", **_joint_alone(paired_comparison(a, b))})
    for row in rows:   # the exact test, not the bootstrap interval: a handful of discordant pairs is common
        row["verdict"] = ("level with alone" if row["p"] >= OWN_CHECK_LEVEL else
                          "below alone" if row["diff"] < 0 else "above alone")
    return rows


def _trained_alignments(check: MASConfig, problem) -> list:
    """The alignments ``check``'s models name in ``alignment_init``, whole: a standardised one with the mean
    and std its run trained with (statistics re-estimated on the check's own sample would change the map:
    measured, a GRU → GRU direction at 0.99 on the run's statistics fell to 0.81 on another sample's)."""
    from llm_mas.problems.manifest import load_alignment_init
    from llm_mas.run import build_alignments

    alignments = build_alignments(check, problem, init=False)
    for alignment, entry in zip(alignments, check.models):
        load_alignment_init(alignment, entry.alignment_init, entry.name, statistics=True)
    return list(alignments)


def fresh_cross(config: RecipeConfig, names: list[str], plans: list[PlannedRun], outcomes: dict, run_dir: Path,
                n_pairs: int, log=print) -> list[dict]:
    """The cross directions among the models of ``config.fresh_cross_archs`` in every finished all-model run,
    rescored with that run's alignments on `n_pairs` fresh validation pairs (data seed ``OWN_CHECK_SEED +
    seed``, as `own_check`): one row per direction and seed, trial IIA with a 95% bootstrap interval over
    pairs. Kept in ``own_check.json`` by the run's alignment digest."""
    from llm_mas.files import file_digest
    from llm_mas.run import build_problem
    from llm_mas.stats import bootstrap_ci

    cache = _CheckCache(run_dir)
    keep = [i for i, m in enumerate(names) if architecture(m) in config.fresh_cross_archs]
    rows = []
    for seed, plan_, joint in _finished_joint_runs(plans, outcomes):
        key = "|".join(["cross", ",".join(names[i] for i in keep), str(seed), str(n_pairs),
                        file_digest(Path(joint.run_dir) / "alignments.safetensors")])
        if key not in cache.entries:
            entries = to_dict(plan_.config)["models"]
            check = _fresh_config(plan_.config, [dict(entries[i], alignment_init=str(joint.run_dir)) for i in keep],
                                  seed, n_pairs, f"fresh_cross_s{seed}")
            problem = build_problem(check, log=lambda s_: None)
            maps = [a.materialize() for a in _trained_alignments(check, problem)]
            cache.put(key, [[short(names[keep[item.source]]), short(names[keep[item.target]]),
                             scores.trial.astype(int).tolist()]
                            for item, scores in problem.pair_scores(maps) if item.source != item.target])
            log(f"  fresh cross check: {len(cache.entries[key])} directions of seed {seed} scored on {n_pairs} "
                "fresh pairs")
        for source, target, trial in cache.entries[key]:
            lo, hi = bootstrap_ci(np.asarray(trial, dtype=float), seed=seed)
            rows.append({"seed": seed, "source": source, "target": target, "n": len(trial),
                         "trial_iia": float(np.mean(trial)), "trial_iia_lo": lo, "trial_iia_hi": hi})
    return rows


def fresh_cross_sections(rows: list[dict], config: RecipeConfig) -> list[str]:
    """The summary's lines on `fresh_cross` rows: per seed, how many directions reach ``steps_target`` on
    the fresh pairs, the lowest (with its interval) and the mean."""
    lines = []
    for seed in sorted({r["seed"] for r in rows}):
        mine = [r for r in rows if r["seed"] == seed]
        low = min(mine, key=lambda r: r["trial_iia"])
        lines.append(f"- seed {seed}: {sum(r['trial_iia'] >= config.steps_target for r in mine)}/{len(mine)} ≥ "
                     f"{config.steps_target}; lowest {low['source']} → {low['target']} {fmt_ci(low)}; mean "
                     f"{np.mean([r['trial_iia'] for r in mine]):.3f}")
    return [f"### Cross directions among {', '.join(config.fresh_cross_archs)} models on fresh pairs",
            f"Each all-model run's alignments (with the statistics they were trained with) rescored on "
            f"{rows[0]['n']} fresh validation pairs per direction (the own check's pairs); every direction with "
            "its 95% bootstrap interval in `fresh_cross.csv`.", "\n".join(lines)]


def _joint_alone(comparison: dict) -> dict:
    """`paired_comparison`'s a and b named: a = the all-model run's alignment, b = the run alone's."""
    names = {"a": "joint", "b": "alone", "a_only": "joint_only", "b_only": "alone_only"}
    return {names.get(k, k): v for k, v in comparison.items()}


def own_check_sections(rows: list[dict], config: RecipeConfig, smoke: bool) -> list[str]:
    """The summary's table of `own_check` rows: the pooled row of each model, then the per-seed ones."""
    n = rows[0]["n"]
    pooled = [r for r in rows if r["seed"] == "pooled"]
    below = [r["model"] for r in pooled if r["verdict"] == "below alone"]
    columns = ["model", "seed", "n", "joint", "alone", "diff", "diff_lo", "diff_hi", "joint_only", "alone_only", "p",
               "verdict"]
    return [
        "### Each model's own direction on fresh pairs: jointly vs alone, pair by pair",
        f"Both alignments of each model (from the all-model run: joint; from its run alone at the same seed: alone) scored "
        f"on the same {n} fresh validation pairs per seed (data seed {OWN_CHECK_SEED} + seed"
        + (f", {SMOKE_OWN_CHECK_PAIRS} under --smoke" if smoke else "") + "): trial IIA, their difference with "
        "a 95% bootstrap interval over pairs (lo, hi), the pairs only one of them gets right, McNemar's exact p; "
        f"verdict: above or below alone where p < {OWN_CHECK_LEVEL} (the exact test, not the interval, which "
        "a handful of discordant pairs can mislead). `pooled` joins every seed's pairs. "
        + (f"Pooled, below alone: {', '.join(below)}." if below else
           "Pooled, no model's own direction is below its run alone."),
        markdown_table([{**r, "p": f"{r['p']:.2g}"} for r in pooled + [r for r in rows if r["seed"] != "pooled"]],
                       columns, ["model", "seed", "pairs", "joint", "alone", "joint − alone", "lo", "hi",
                                 "joint only", "alone only", "p", "verdict"]),
    ]


def _clipped(interval: tuple[float, float, float]) -> tuple[float, float, float]:
    """(mean, lo, hi) with the bounds clipped to [0, 1] (IIA is a proportion; NaN stays NaN)."""
    mean, lo, hi = interval
    return mean, (max(lo, 0.0) if _num(lo) else lo), (min(hi, 1.0) if _num(hi) else hi)


def block_lines(runs: list[tuple[int, np.ndarray, np.ndarray]], names: list[str]) -> list[str]:
    """Per seed and over seeds: mean cross-direction trial IIA between and within the architectures, and the
    GRU–GRU convergence check (every cross direction ≥ 0.9)."""
    archs = list(dict.fromkeys(architecture(m) for m in names))
    of = {a: [i for i, m in enumerate(names) if architecture(m) == a] for a in archs}
    lines = []
    header = "| seed | " + " | ".join(f"{a}→{b}" for a in archs for b in archs) + " | GRU–GRU cross min | ≥ 0.9 |"
    lines += [header, "|" + "---|" * (len(archs) ** 2 + 3)]
    for seed, mat, _ in runs:
        cells = []
        for a in archs:
            for b in archs:
                vals = [mat[i, j] for i in of[a] for j in of[b] if i != j]
                cells.append(f"{np.mean(vals):.3f}" if vals else "–")
        gg = [mat[i, j] for i in of.get("gru", []) for j in of.get("gru", []) if i != j]
        lines.append(f"| {seed} | " + " | ".join(cells) + (f" | {min(gg):.3f} | {sum(v >= 0.9 for v in gg)}/{len(gg)} |"
                                                             if gg else " | – | – |"))
    return lines


def plot_iia_vs_n(table: list[dict], path: Path, title: str) -> None:
    """Trial IIA of each reference pair against n: pairwise at n = 2, like and unlike lines, the all run."""
    pairs = list(dict.fromkeys(r["pair"] for r in table))
    fig = Figure(figsize=(4.2 * max(len(pairs), 1), 3.8))
    axes = np.atleast_1d(fig.subplots(1, max(len(pairs), 1), sharey=True))
    styles = {"like": ("C0", "o", "like added", "-"), "unlike": ("C3", "s", "unlike added", "-"),
              "like_every": ("C0", "^", "like added, every direction every step", ":"),
              "unlike_every": ("C3", "v", "unlike added, every direction every step", ":")}
    for ax, pair in zip(axes, pairs):
        rows = [r for r in table if r["pair"] == pair]
        base = [r for r in rows if r["kind"] == "pairwise"]
        full = [r for r in rows if r["kind"] == "all"]
        for kind, (color, marker, label, style) in styles.items():
            extra = [r for r in rows if r["kind"] == kind]
            if not extra and kind.endswith(EVERY):
                continue
            line = sorted(base + extra + ([] if kind.endswith(EVERY) else full), key=lambda r: r["n"])
            xs = [r["n"] for r in line]
            y = np.array([r["trial_iia"] for r in line], dtype=float)
            lo = np.array([r["trial_iia_lo"] for r in line], dtype=float)
            hi = np.array([r["trial_iia_hi"] for r in line], dtype=float)
            err = np.stack([np.nan_to_num(y - lo), np.nan_to_num(hi - y)])  # (2, points)
            ax.errorbar(xs, y, yerr=err, color=color, marker=marker, capsize=3, label=label, linestyle=style)
        ax.set_xscale("log", base=2)
        ticks = sorted({r["n"] for r in rows})
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.set_title(pair, fontsize=9)
        ax.set_xlabel("models in the run (n; 2 = pairwise)")
        ax.grid(alpha=0.3)
        ax.set_ylim(-0.02, 1.02)
    axes[0].set_ylabel("trial IIA, mean of a→b, b→a\n(mean over seeds, 95% t interval)")
    axes[0].legend(fontsize=7, loc="lower left")
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=130, bbox_inches="tight")


def cost_lines(table: list[dict], names: list[str]) -> list[str]:
    """What the all-model run cost against the n(n − 1)/2 pairwise runs the same matrix would need."""
    pairwise = [r for r in table if r["kind"] == "pairwise"]
    full = [r for r in table if r["kind"] == "all"]
    n = len(names)
    per_pair = _mean(pairwise, "seconds")
    lines = []
    if _num(per_pair):
        lines.append(f"A pairwise run took {per_pair:.0f} s on average (peak RSS {fmt(_mean(pairwise, 'peak_rss_mb'), 0)}"
                     f" MB); the {n} × {n} matrix from pairwise runs needs {n * (n - 1) // 2} of them ≈ "
                     f"{n * (n - 1) // 2 * per_pair / 60:.1f} min.")
    if full and _num(full[0]["seconds"]):
        lines.append(f"The all-model run ({n} matrices, {n * n} directions) took {full[0]['seconds'] / 60:.1f} min "
                     f"(peak RSS {fmt(full[0]['peak_rss_mb'], 0)} MB).")
    return lines


def write_outputs(config: RecipeConfig, names: list[str], plans: list[PlannedRun], outcomes: dict,
                  similarity: dict, run_dir: Path, command: str, seconds: float, smoke: bool,
                  checks: tuple[list[dict], list[dict]] | None = None) -> None:
    rows = pair_rows(plans, outcomes, config.steps_target)
    write_csv(rows, run_dir / "pairs.csv")
    table = aggregate(rows)
    write_csv(table, run_dir / "aggregate.csv")
    runs, matrix_rows = all_model_matrices(plans, outcomes, names)
    matrix, cis = mean_matrix(runs, len(names))
    if matrix_rows:
        write_csv(matrix_rows, run_dir / "matrix.csv")
    convergence = convergence_rows(runs, names, plans, outcomes) if runs else []
    if convergence:
        write_csv(convergence, run_dir / "own_directions.csv")
    own_rows, cross_rows = checks or ([], [])
    if own_rows:
        write_csv(own_rows, run_dir / "own_check.csv")
    if cross_rows:
        write_csv(cross_rows, run_dir / "fresh_cross.csv")
    labels = [short(m) for m in names]
    figure = run_dir / "clustered.png"
    if not np.isnan(matrix[~np.eye(len(names), dtype=bool)]).any():
        mas_title = ("MAS trial IIA (source row → target column)" if len(runs) == 1 else
                     f"MAS trial IIA, mean of {len(runs)} seeds (source row → target column)")
        plot_clustered_matrices({mas_title: matrix,
                                 "linear CKA": np.array(similarity["cka_biased"]),
                                 "GPA similarity": np.array(similarity["gpa"])}, labels, figure,
                                title=f"{len(names)} models at {site_label(config)}: ordered by clustering the MAS matrix",
                                cis={mas_title: cis})
    if table:
        plot_iia_vs_n(table, run_dir / "iia_vs_n.png",
                      "Reference pairs: trial IIA trained pairwise vs inside joint runs")
    sections = [SMOKE_NOTE] if smoke else []
    sections += [
        f"{seconds:.0f} s this call. Models: {', '.join(labels)} at `{site_label(config)}`, k = {config.k}; MAS settings "
        f"from `{config.mas_preset}` with {', '.join(config.mas_overrides) or 'no overrides'}"
        + (f" (the all-model runs also {', '.join(config.all_model_overrides)})" if config.all_model_overrides else "")
        + (f"; runs with more than {config.directions_per_step} directions sample {config.directions_per_step} "
           f"trained directions per step ({config.direction_sampling})" if config.directions_per_step else "")
        + ". Trial IIA: validation, best checkpoint, 95% bootstrap CIs per direction in `pairs.csv`.",
        "## 1. All models in one run",
        f"CKA (biased, all rows) and GPA similarity on {similarity.get('n_rows', '–')} rows (GPA "
        f"{similarity.get('gpa_iterations', '–')} rounds, converged {similarity.get('gpa_converged', '–')}). "
        "Figure: `clustered.png` (average linkage on 1 − (IIA + IIAᵀ)/2; the CKA and GPA panels in the same "
        f"order). Finished all-model runs: {', '.join(f'seed {seed}' for seed, _, _ in runs) or 'none yet'}"
        + ("; the figure shows their mean, CIs = 95% t intervals over seeds; per-seed cells with bootstrap CIs "
           "in `matrix.csv`." if len(runs) > 1 else "."),
        "Mean cross-direction trial IIA by architecture (source → target; own directions excluded):",
        "\n".join(block_lines(runs, names)) if runs else "no all-model run finished yet.",
        "### Each model's own direction: jointly vs alone",
        "Own direction (DAS) in the all-model runs and in the model's run alone (mean over seeds, 95% t "
        "interval); cross = mean of the model's cross directions in the all-model runs.",
        markdown_table(convergence, ["model", "seeds", "own_joint", "own_joint_lo", "own_joint_hi", "alone_seeds",
                                     "own_alone", "own_alone_lo", "own_alone_hi", "joint_minus_alone",
                                     "cross_as_source", "cross_as_target"]) if convergence else "–",
        *(own_check_sections(own_rows, config, smoke) if own_rows else []),
        *(fresh_cross_sections(cross_rows, config) if cross_rows else []),
        "## 2. Reference pairs alone vs in joint runs",
        f"Per pair, kind and n: mean over seeds of the mean of the two cross directions, 95% t interval over "
        f"seeds; steps to target = first validation with both cross directions ≥ {config.steps_target} (mean "
        f"over the seeds that reached it). like = other architectures than {config.unlike_arch} added; "
        f"unlike = {config.unlike_arch} models added first.",
        markdown_table(table, ["pair", "kind", "n", "seeds", "trial_iia", "trial_iia_lo", "trial_iia_hi",
                               "steps_to_target", "reached_target", "seconds", "peak_rss_mb", "peak_rss_above_start_mb",
                               "n_directions"]),
        "### Verdict (joint vs pairwise; disjoint intervals = helps / hurts)",
        "\n".join(verdict(table)),
        "### Cost",
        " ".join(cost_lines(table, names)) or "no run finished yet.",
    ]
    sections += run_status_sections(rows)
    claims = [cluster_claim(matrix, names, config.unlike_arch)]
    if len(runs) > 1:
        per_seed = [cluster_claim(m, names, config.unlike_arch).holds for _, m, _ in runs]
        sections.append(f"Cluster claim per seed: {', '.join(f'seed {s_}: {h}' for (s_, _, _), h in zip(runs, per_seed))}.")
    write_summary(run_dir / "summary.md", "Many models: one joint MAS, clustered, and pairs alone vs jointly",
                  command, sections, claims)
    if config.publish and not smoke:
        docs = REPO / "docs"
        shutil.copyfile(run_dir / "summary.md", docs / "results" / f"{config.name}.md")
        shutil.copyfile(run_dir / "aggregate.csv", docs / "results" / f"{config.name}.csv")
        for name in ("matrix", "own_directions", "own_check", "fresh_cross"):
            if (run_dir / f"{name}.csv").exists():
                shutil.copyfile(run_dir / f"{name}.csv", docs / "results" / f"{config.name}_{name}.csv")
        for name in ("clustered", "iia_vs_n"):
            if (run_dir / f"{name}.png").exists():
                shutil.copyfile(run_dir / f"{name}.png", docs / "figures" / f"{config.name}_{name}.png")


# ================================================================================== main
def main(argv: list[str] | None = None) -> int:
    """Command line (module docstring) through ``recipes.common.cli.recipe_front_door``. Exit 0: every
    selected run finished; 1: one failed; 2: configuration error."""
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--models-from-scratch", action="store_true",
                            help="random-weight checkpoints of the same architectures instead of the models")

    torch.set_num_threads(1)  # until the config is read (its `threads`): small models, a shared machine
    return recipe_front_door(argv, name="many_models", doc=__doc__, config_cls=RecipeConfig, run=_run,
                             add_arguments=add_arguments,
                             smoke_help="smoke_models, one seed, n = all of them, 2 training steps on a few dozen "
                                        "pairs; run dir <name>-smoke")


def _run(call: RecipeInvocation) -> int:
    config, run_dir, smoke = call.config, call.run_dir, call.smoke
    torch.set_num_threads(config.threads)
    names = list(config.smoke_models or config.models[:3]) if smoke else list(config.models)
    mapping = resolve_models(names, run_dir / "scratch_models" if call.args.models_from_scratch else None)
    overrides = [*config.mas_overrides, *(SMOKE_MAS_OVERRIDES if smoke else ())]
    ns = [len(names)] if smoke else config.ns
    seeds = config.seeds[:1] if smoke else config.seeds
    plans = plan(config, names, mapping, overrides, ns, seeds, run_dir / "mas",
                 progress=not smoke and sys.stdout.isatty(),
                 all_model_overrides=[] if smoke else config.all_model_overrides)
    only = call.only
    unknown = [s for s in only if s not in {p.name for p in plans}]
    if unknown:
        raise ConfigError(f"--only: unknown runs {unknown}; valid: {', '.join(p.name for p in plans)}")
    print(f"{len(plans)} MAS runs into {run_dir}/mas", flush=True)
    similarity = similarities(names, mapping, config, run_dir, smoke)

    def refresh(outcomes, checks=None):
        write_outputs(config, names, plans, outcomes, similarity, run_dir, call.command,
                      time.perf_counter() - call.started, smoke, checks)

    selected = (lambda p: False) if call.report else (lambda p: p.name in only) if only else None
    outcomes = execute_with_cost(plans, config.reuse_dirs, selected, refresh,
                                 minutes_per_run=0.0 if smoke else config.minutes_per_run,
                                 prepare=(lambda p, o: start_from_alone(p, o, names)) if config.start_from_alone
                                 else None)
    if config.own_check_pairs:
        n_pairs = SMOKE_OWN_CHECK_PAIRS if smoke else config.own_check_pairs
        refresh(outcomes, (own_check(config, names, plans, outcomes, run_dir, n_pairs),
                           fresh_cross(config, names, plans, outcomes, run_dir, n_pairs)
                           if config.fresh_cross_archs else []))
    failed = [o.name for o in outcomes.values() if o.status == "failed"]
    print(f"wrote {run_dir}/summary.md, pairs.csv, aggregate.csv, matrix.csv, clustered.png, iia_vs_n.png "
          f"({time.perf_counter() - call.started:.0f}s)" + (f"; FAILED runs: {', '.join(failed)}" if failed else ""),
          flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
