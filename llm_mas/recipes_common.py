"""Orchestration shared by the comparison recipes (``recipes/*.py``): MAS runs that are reused, resumed or
trained; record selection; CSV / markdown tables; claim verdicts; plots; random-weight stand-in checkpoints.

Recipes orchestrate and the library computes: every number written by a recipe (trial IIA, its bootstrap CI,
token IIA, CL match counts) comes from ``llm_mas.mas.run_mas`` / ``MASResult`` records. This module only
decides *which* run to execute, picks records out of finished runs and formats them.

    from llm_mas.recipes_common import MASRun, run_or_reuse, direction_row, write_csv
    cfg = mas_config_from_preset("recipes/configs/gru_gru_hidden.yaml", [], name="mas_k4", k=4,
                                 out_dir="runs/x/mas")
    outcome = run_or_reuse(cfg, search_dirs=["runs"], log=print)     # reuse / resume / train
    row = direction_row(outcome.result, 0, 1)                       # trial IIA 0 -> 1 with its CI
"""

from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError, DataError
from .models.registry import below_bar, below_bar_text

REPO = Path(__file__).resolve().parent.parent

# Keys of a MAS config that do not change its numbers: a finished run differing only in these is reused.
MAS_IGNORED_KEYS = ("name", "out_dir", "progress", "resume", "device")

# --smoke: 2 training steps on a few dozen pairs (seconds per MAS run).
SMOKE_MAS_OVERRIDES = ("data.n_train=32", "data.n_valid=16", "train.max_steps=2", "train.eval_every=2",
                       "train.batch_size=16", "eval.batch_size=64")
SMOKE_NOTE = ("**Smoke run** (2 training steps on a few dozen pairs, possibly random-weight models): the "
              "numbers check the plumbing only; the verdicts below mean nothing.")

# "near-perfect" and "comparable" as the recipes test them (stated in every summary that uses them)
NEAR_PERFECT = 0.95
COMPARABLE = 0.05


def preset_path(path: str | Path) -> Path:
    """A preset path as given, else relative to the repository root (recipes run from any directory)."""
    p = Path(path)
    return p if p.is_absolute() or p.exists() else REPO / p


# ================================================================================== MAS configs
def mas_config_from_preset(preset: str | Path, overrides: Sequence[str] = (), **fields: Any):
    """A `MASConfig`: the preset's settings (data sizes, trainer), `overrides` (``key.sub=value``) applied,
    then the top-level `fields` (models, k, directions, intervention, cl, name, out_dir, ...) replaced.

    The preset's own model names are replaced, so they are not resolved; the final models are checked by
    ``run_mas`` before anything loads (a recipe may plan runs for models that are not trained yet)."""
    import dataclasses

    from .config import apply_overrides, from_dict, load_yaml, to_dict
    from .run_config import MASConfig

    data = apply_overrides(load_yaml(preset_path(preset)), list(overrides))
    valid = [f.name for f in dataclasses.fields(MASConfig)]
    for key, value in fields.items():
        if key not in valid:
            raise ConfigError(f"MASConfig has no field {key!r}; valid: {', '.join(valid)}")
        data[key] = to_dict(value)
    return from_dict(MASConfig, data)


def _comparable(data: dict, ignored: Iterable[str]) -> dict:
    return {k: v for k, v in data.items() if k not in set(ignored)}


def same_config(run_dir: str | Path, config, ignored: Iterable[str] = MAS_IGNORED_KEYS) -> bool:
    """True when ``run_dir/config.yaml`` resolves to `config` up to the `ignored` top-level keys."""
    from .config import from_dict, load_yaml, to_dict

    path = Path(run_dir) / "config.yaml"
    if not path.exists():
        return False
    try:
        saved = from_dict(type(config), load_yaml(path))
    except ConfigError:  # written by another version of the config: not the same run
        return False
    return _comparable(to_dict(saved), ignored) == _comparable(to_dict(config), ignored)


def find_finished_run(config, search_dirs: Sequence[str | Path] = ()) -> Path | None:
    """A finished MAS run (``results.json``) of exactly this config: ``<out_dir>/<name>`` first, then every
    immediate sub-directory of each of `search_dirs` (e.g. ``runs/`` holding ``llm-mas mas`` runs)."""
    candidates = [Path(config.out_dir) / config.name]
    for d in search_dirs:
        d = Path(d)
        if d.is_dir():
            candidates.extend(sorted(p for p in d.iterdir() if p.is_dir()))
    for run in candidates:
        if (run / "results.json").exists() and same_config(run, config) \
                and not models_newer_than(config, run / "results.json"):
            return run
    return None


def models_newer_than(config, path: str | Path) -> list[str]:
    """Task models of `config` whose weights were written after `path` (a result or checkpoint): a run on
    an older checkpoint of the same name must not be reused or resumed (the config only names the model)."""
    from .models.registry import resolve_model_dir

    when = Path(path).stat().st_mtime
    newer = []
    for m in config.models:
        if getattr(m, "kind", "task") != "task":
            continue
        try:
            weights = resolve_model_dir(m.name)[0] / "model.safetensors"
        except ConfigError:
            continue
        if weights.exists() and weights.stat().st_mtime > when:
            newer.append(m.name)
    return newer


@dataclass
class RunOutcome:
    """What `run_or_reuse` did for one MAS config."""

    name: str
    status: str                       # reused | trained | pending | failed
    result: Any = None                # MASResult (None when pending/failed)
    run_dir: Path | None = None
    info: dict | None = None          # summary.json of the run (best_step, steps, stopped, seconds)
    message: str = ""


def run_or_reuse(config, search_dirs: Sequence[str | Path] = (), log: Callable[[str], None] = print,
                 train: bool = True) -> RunOutcome:
    """Reuse a finished run of this config, else resume its own unfinished run, else train it.

    A checkpoint in ``<out_dir>/<name>`` written for another config is not resumed (that run starts afresh).
    With ``train=False`` an unfinished run is reported as pending instead of trained.
    """
    from .results import MASResult
    from .run import run as run_mas

    found = find_finished_run(config, search_dirs)
    if found is not None:
        log(f"  reusing finished run {found}")
        return RunOutcome(config.name, "reused", MASResult.load(found), found, _read_info(found))
    if not train:
        return RunOutcome(config.name, "pending", message="not finished and not selected")
    own = Path(config.out_dir) / config.name
    if (own / "checkpoint.pt").exists():
        newer = models_newer_than(config, own / "checkpoint.pt")
        if newer:
            log(f"  {own} holds a checkpoint made before {', '.join(newer)} was retrained; starting afresh")
            config.resume = False
        elif same_config(own, config):
            log(f"  resuming {own} from its checkpoint")
        else:
            log(f"  {own} holds a checkpoint of another config; starting afresh")
            config.resume = False
    t0 = time.perf_counter()
    result = run_mas(config, log=lambda msg: log("  " + msg))
    log(f"  finished {config.name} in {time.perf_counter() - t0:.0f}s")
    return RunOutcome(config.name, "trained", result, Path(result.run_dir), _read_info(Path(result.run_dir)))


def _read_info(run_dir: Path) -> dict:
    path = run_dir / "summary.json"
    return json.loads(path.read_text()) if path.exists() else {}


# ================================================================================== plans
@dataclass
class PlannedRun:
    """One MAS run of a recipe and the table rows it feeds.

    rows: ``(labels, source_index, target_index)``: each gives one table row, `labels` (e.g. method, k,
    direction) merged with that direction's numbers. blocked: why this core cannot run it (row status
    ``blocked``, the reason in the summary) — e.g. a config field the core does not have yet.
    """

    config: Any                                     # MASConfig
    rows: list[tuple[dict, int, int]]
    variable: str | None = None
    blocked: str = ""

    @property
    def name(self) -> str:
        return self.config.name


def execute_plan(plans: Sequence[PlannedRun], search_dirs: Sequence[str | Path] = (),
                 log: Callable[[str], None] = print, after_each: Callable[[dict], None] | None = None,
                 selected: Callable[[PlannedRun], bool] | None = None) -> dict[str, RunOutcome]:
    """Run (or reuse, or resume) every plan in order; `after_each(outcomes)` rewrites the recipe's outputs
    after every run, so a partial run already has its table. A run that raises a `MASError` is recorded as
    failed (its message kept) and the others go on. Plans not `selected` are only reused when finished."""
    from .errors import MASError

    names = [p.name for p in plans]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"run names must be unique within a recipe; repeated: {', '.join(dupes)}")
    from .models.registry import read_manifest

    manifest = read_manifest()["models"]
    for p in plans:  # results on a model that fails the accuracy bar are not comparable (method.md §5)
        failing = [m.name for m in p.config.models if getattr(m, "kind", "task") == "task"
                   and not manifest.get(str(m.name), {}).get("passes_bar", True)]
        if failing and not p.blocked:
            p.blocked = "; ".join(f"{name} {below_bar_text(manifest[name])}: retrain it or pass a checkpoint "
                                  "directory" for name in failing)
    outcomes = {p.name: RunOutcome(p.name, "blocked" if p.blocked else "pending", message=p.blocked)
                for p in plans}
    t0 = time.perf_counter()
    for i, plan in enumerate(plans, 1):
        if plan.blocked:
            log(f"[{i}/{len(plans)}] {plan.name}: blocked — {plan.blocked}")
            continue
        log(f"[{i}/{len(plans)}] {plan.name} ({time.perf_counter() - t0:.0f}s)")
        train = selected is None or selected(plan)
        try:
            outcomes[plan.name] = run_or_reuse(plan.config, search_dirs, log=log, train=train)
        except MASError as e:
            log(f"  FAILED: {e}")
            outcomes[plan.name] = RunOutcome(plan.name, "failed", message=f"failed: {e}")
        if after_each is not None:
            after_each(outcomes)
    return outcomes


EARLY_STOP = "stopped early"  # the trainer's stop reason when a STOP file ended a run (llm_mas.trainer)


def early_stop_note(rows: Sequence[dict], run_key: str = "run", stopped_key: str = "stopped",
                    best_key: str = "best_step", steps_key: str = "steps") -> str | None:
    """A summary line naming the runs ended early by a STOP file (e.g. a time budget), or None.

    Their numbers come from the best checkpoint so far; a longer run could still improve them."""
    runs = dict.fromkeys(f"{r[run_key]} (best step {r.get(best_key)} of {r.get(steps_key)})" for r in rows
                         if str(r.get(stopped_key) or "").startswith(EARLY_STOP))
    if not runs:
        return None
    return ("Stopped early by a STOP file (time budget); the best checkpoint so far is reported and a longer "
            "run could still improve it: " + ", ".join(runs) + ".")


def run_status_sections(rows: Sequence[dict]) -> list[str]:
    """Summary lines for runs that are not finished (in run order) and runs ended early by a STOP file."""
    not_done = list(dict.fromkeys(f"{r['run']} ({r['status']})" for r in rows
                                  if r["status"] not in ("reused", "trained")))
    out = [f"Not finished ({len(not_done)}, in run order): " + ", ".join(not_done)] if not_done else []
    early = early_stop_note(rows)
    return out + ([early] if early else [])


def plan_rows(plans: Sequence[PlannedRun], outcomes: dict[str, RunOutcome]) -> list[dict]:
    """Every plan's table rows (labels + `direction_row`), in plan order; NaN for runs not finished."""
    rows = []
    for plan in plans:
        outcome = outcomes.get(plan.name) or RunOutcome(plan.name, "pending")
        for labels, s, t in plan.rows:
            rows.append({**labels, "run": plan.name, **direction_row(outcome, s, t, plan.variable)})
    return rows


# ================================================================================== records -> rows
def find_record(result, source_index: int, target_index: int, variable: str | None = None) -> dict:
    """The record of direction source -> target (and `variable`, default the run's first) of a MASResult."""
    variable = variable or result.variables[0]
    for r in result.records:
        if (r["source_index"], r["target_index"], r["variable"]) == (source_index, target_index, variable):
            return r
    have = sorted({(r["source_index"], r["target_index"], r["variable"]) for r in result.records})
    raise DataError(f"no record for direction {source_index} -> {target_index}, variable {variable!r} in "
                    f"{result.run_dir}; the run has {have}")


def direction_row(outcome: RunOutcome, source_index: int, target_index: int,
                  variable: str | None = None) -> dict:
    """Flat row of one direction: trial IIA and its 95% bootstrap CI, token IIA, how it was trained, the run.

    A pending/failed outcome gives NaN values (so partial tables can be written)."""
    row: dict[str, Any] = {"source_index": source_index, "target_index": target_index}
    if outcome.result is None:
        row.update(trial_iia=math.nan, trial_iia_lo=math.nan, trial_iia_hi=math.nan, token_iia=math.nan,
                   status=outcome.status, run_dir=outcome.message or "pending")
        return row
    r = find_record(outcome.result, source_index, target_index, variable)
    lo, hi = r.get("trial_iia_ci", [math.nan, math.nan])
    info = outcome.info or {}
    row.update(source=r["source"], target=r["target"], variable=r["variable"],
               trained_by=r.get("trained_by", ""), trial_iia=r["trial_iia"], trial_iia_lo=lo, trial_iia_hi=hi,
               token_iia=r["token_iia"], n_pairs=r["n_pairs"],
               best_step=info.get("best_step", r.get("best_step")), steps=info.get("steps"),
               stopped=info.get("stopped"), status=outcome.status,
               run_dir=str(outcome.run_dir))
    if "cl_unmatched" in r:
        row["cl_unmatched"] = r["cl_unmatched"]
    return row


# ================================================================================== comparisons and claims
def is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and not math.isnan(x)


def compare(a: dict, b: dict, key: str = "trial_iia") -> str:
    """``0.93 [0.91, 0.95] > 0.71 [0.68, 0.74] (CIs disjoint)`` — point estimates with their CIs."""
    if not (is_number(a.get(key)) and is_number(b.get(key))):
        return "pending"
    va, vb = a[key], b[key]
    sign = ">" if va > vb else "<" if va < vb else "="
    disjoint = (is_number(a.get(f"{key}_lo")) and is_number(b.get(f"{key}_hi"))
                and (a[f"{key}_lo"] > b[f"{key}_hi"] or b[f"{key}_lo"] > a[f"{key}_hi"]))
    return f"{fmt_ci(a, key)} {sign} {fmt_ci(b, key)} ({'CIs disjoint' if disjoint else 'CIs overlap'})"


def fmt_ci(row: dict, key: str = "trial_iia") -> str:
    if not is_number(row.get(key)):
        return "–"
    lo, hi = row.get(f"{key}_lo"), row.get(f"{key}_hi")
    if is_number(lo) and is_number(hi):
        return f"{row[key]:.3f} [{lo:.3f}, {hi:.3f}]"
    return f"{row[key]:.3f}"


@dataclass
class Claim:
    """A paper claim and what the measured table says about it (holds: True, False or None = pending)."""

    text: str
    holds: bool | None
    evidence: str

    def markdown(self) -> str:
        verdict = {True: "**holds**", False: "**does not hold**", None: "**pending**"}[self.holds]
        return f"- {self.text} — {verdict}. {self.evidence}"


def all_known(*values: Any) -> bool:
    return all(is_number(v) for v in values)


# ================================================================================== output files
def write_csv(rows: Sequence[dict], path: str | Path) -> None:
    """Rows (dicts) as CSV; the header is the union of keys in first-seen order."""
    keys = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys, restval="")
        writer.writeheader()
        writer.writerows(rows)


def fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown_table(rows: Sequence[dict], columns: Sequence[str], headers: Sequence[str] | None = None) -> str:
    """A GitHub markdown table of `columns` of `rows` (NaN / missing as –)."""
    headers = list(headers or columns)
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(c)) for c in columns) + " |")
    return "\n".join(lines)


def write_summary(path: str | Path, title: str, command: str, sections: Sequence[str],
                  claims: Sequence[Claim]) -> None:
    """``summary.md``: title, the exact command, free sections (tables, notes) and the claims' verdicts."""
    lines = [f"# {title}", "", f"`{command}`", "", *[s + "\n" for s in sections], "## Paper claims", ""]
    lines += [c.markdown() for c in claims] or ["- (none evaluated)"]
    Path(path).write_text("\n".join(lines) + "\n")


def plot_lines(series: dict[str, tuple[Sequence[float], Sequence[dict]]], path: str | Path, title: str,
               xlabel: str, log2_x: bool = True) -> None:
    """IIA against a numeric x (e.g. k): one line per series ``{label: (xs, rows)}`` with CI bands."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for label, (xs, rows) in series.items():
        y = np.array([r.get("trial_iia", np.nan) for r in rows], dtype=float)
        lo = np.array([r.get("trial_iia_lo", np.nan) for r in rows], dtype=float)
        hi = np.array([r.get("trial_iia_hi", np.nan) for r in rows], dtype=float)
        (line,) = ax.plot(xs, y, marker="o", label=label)
        ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.15, linewidth=0)
    if log2_x:
        ax.set_xscale("log", base=2)
    all_x = sorted({x for xs, _ in series.values() for x in xs})
    ax.set_xticks(all_x, [str(x) for x in all_x])
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("trial IIA (validation, 95% CI)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.savefig(path, dpi=130, bbox_inches="tight")
    plt.close(fig)


def plot_grouped_bars(groups: Sequence[str], bars: dict[str, Sequence[dict]], path: str | Path,
                      title: str) -> None:
    """Grouped bars of trial IIA with CI whiskers: x = `groups`, one bar per ``{label: rows}`` in a group."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    n = max(len(bars), 1)
    width = 0.8 / n
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(groups) * max(1, n / 2) + 2), 4.5))
    x = np.arange(len(groups))
    for i, (label, rows) in enumerate(bars.items()):
        y = np.array([r.get("trial_iia", np.nan) for r in rows], dtype=float)
        lo = np.array([r.get("trial_iia_lo", np.nan) for r in rows], dtype=float)
        hi = np.array([r.get("trial_iia_hi", np.nan) for r in rows], dtype=float)
        err = np.stack([np.nan_to_num(y - lo), np.nan_to_num(hi - y)])  # (2, groups)
        pos = x - 0.4 + width * (i + 0.5)
        ax.bar(pos, np.nan_to_num(y), width, yerr=err, capsize=3, label=label)
        for px, py in zip(pos, y, strict=True):
            ax.text(px, (0 if np.isnan(py) else py) + 0.02, "–" if np.isnan(py) else f"{py:.2f}", ha="center",
                    fontsize=7)
    ax.set_xticks(x, groups, rotation=20, ha="right", fontsize=8)
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("trial IIA (validation, 95% CI)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.savefig(path, dpi=130, bbox_inches="tight")
    plt.close(fig)


# ================================================================================== stand-in checkpoints
def scratch_checkpoints(names: Iterable[str], directory: str | Path) -> dict[str, str]:
    """Randomly initialised checkpoints standing in for shipped task models (tests, or before models exist).

    A name ``<task>-<arch>-s<seed>`` (e.g. ``rounding-gru-s0``) gives that architecture for that task with
    weights drawn from a seed derived from the whole name; returns ``{name: checkpoint directory}``.
    """
    import zlib

    import yaml
    from safetensors.torch import save_file

    from .models import build_task_model
    from .tasks import get_task

    mapping = {}
    for name in dict.fromkeys(names):
        parts = Path(name).name.split("-")
        if len(parts) < 2:
            raise ConfigError(f"stand-in checkpoints need names like multiobject-gru-s0 (task-arch-seed), "
                              f"got {name!r}")
        task, arch = parts[0], parts[1]
        out = Path(directory) / Path(name).name
        if not (out / "model.safetensors").exists():
            seed = zlib.crc32(name.encode()) % 10_000
            model = build_task_model(arch, task, len(get_task(task).vocab), seed=seed)
            out.mkdir(parents=True, exist_ok=True)
            # the sections of a `llm-mas train-model` run directory that loading and task lookup read
            sections = {"train": {"task": task, "arch": arch, "seed": int(model.config["seed"]), "steps": 0},
                        "model": dict(model.config)}
            (out / "config.yaml").write_text("# random initialisation (stand-in for a shipped model)\n"
                                             + yaml.safe_dump(sections, sort_keys=False))
            weights = {k: v.contiguous() for k, v in model.state_dict().items()}
            save_file(weights, str(out / "model.safetensors"))
        mapping[name] = str(out)
    return mapping


def missing_models(names: Iterable[str]) -> list[str]:
    """Names that are neither shipped (``data/models/manifest.json``) nor checkpoint directories."""
    from .models.registry import resolve_model_dir

    missing = []
    for name in dict.fromkeys(names):
        try:
            resolve_model_dir(name)
        except ConfigError:
            missing.append(name)
    return missing


def resolve_models(names: Iterable[str], scratch_dir: str | Path | None = None) -> dict[str, str]:
    """``{name: what to load}`` for a recipe's models: random-weight stand-ins written into `scratch_dir` when
    it is given (tests, ``--models-from-scratch``), else the names themselves after checking that every one
    is shipped or a checkpoint directory (ConfigError naming the missing ones and the way out)."""
    names = list(dict.fromkeys(names))
    if scratch_dir is not None:
        return scratch_checkpoints(names, scratch_dir)
    missing = missing_models(names)
    if missing:
        raise ConfigError(f"task models not available yet: {', '.join(missing)}. Train them with "
                          "`llm-mas train-model` (see data/models/manifest.json for the shipped ones), pass "
                          "checkpoint directories instead, or add --models-from-scratch for random-weight "
                          "stand-ins")
    return {n: n for n in names}


# ================================================================================== the recipe command line
def recipe_main(argv: Sequence[str] | None, *, script: str, doc: str, config_cls: type,
                build: Callable[[Any, Path, bool, Path | None], list[PlannedRun]],
                write: Callable[[Any, list[PlannedRun], dict, Path, str, float, bool], None],
                outputs: str) -> int:
    """The command line every comparison recipe shares.

    ``python recipes/<script> CONFIG [key=value ...] [--smoke] [--models-from-scratch] [--only a,b] [--report]``:
    loads the recipe config (`config_cls`, every problem at once), makes ``<out_dir>/<name>[-smoke]``, asks
    ``build(config, run_dir, smoke, scratch_dir)`` for the runs, executes them (reusing / resuming) and calls
    ``write(config, plans, outcomes, run_dir, command, seconds, smoke)`` after every run. Exit 0 when every
    selected run finished, 1 when one failed, 2 on a configuration error.
    """
    import argparse
    import sys

    from .config import load_config, save_config
    from .errors import MASError

    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    default_config = str(REPO / "recipes/configs" / Path(script).with_suffix(".yaml"))
    parser.add_argument("config", nargs="?", default=default_config)
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the recipe config")
    parser.add_argument("--smoke", action="store_true",
                        help="2 training steps, tiny data, run dir <name>-smoke")
    parser.add_argument("--models-from-scratch", action="store_true",
                        help="random-weight checkpoints of the same architectures instead of the models")
    parser.add_argument("--only", default="", help="comma list of run names to train (others are only reused "
                                                   "when finished)")
    parser.add_argument("--report", action="store_true",
                        help="train nothing: rewrite the table, plot and summary from the finished runs")
    args = parser.parse_intermixed_args(argv)
    if args.report and args.only:
        parser.error("--report trains nothing; drop --only")
    if args.config and "=" in args.config and not Path(args.config).exists():  # an override, default config
        args.overrides.insert(0, args.config)
        args.config = default_config

    import torch

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    command = f"python recipes/{script} " + " ".join(sys.argv[1:] if argv is None else argv)
    try:
        config = load_config(config_cls, args.config, args.overrides)
        run_dir = Path(config.out_dir) / (config.name + ("-smoke" if args.smoke else ""))
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, run_dir / "config.yaml", header=command)
        scratch = run_dir / "scratch_models" if args.models_from_scratch else None
        plans = build(config, run_dir, args.smoke, scratch)
        only = [s for s in args.only.split(",") if s]
        unknown = [s for s in only if s not in {p.name for p in plans}]
        if unknown:
            raise ConfigError(f"--only: unknown runs {unknown}; valid: {', '.join(p.name for p in plans)}")
        print(f"{len(plans)} MAS runs into {run_dir}/mas", flush=True)

        def refresh(outcomes):
            write(config, plans, outcomes, run_dir, command, time.perf_counter() - t0, args.smoke)

        selected = (lambda p: False) if args.report else (lambda p: p.name in only) if only else None
        outcomes = execute_plan(plans, config.reuse_dirs, after_each=refresh, selected=selected)
        refresh(outcomes)
    except MASError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    failed = [o.name for o in outcomes.values() if o.status == "failed"]
    print(f"wrote {run_dir}/{outputs} ({time.perf_counter() - t0:.0f}s)"
          + (f"; FAILED runs: {', '.join(failed)}" if failed else ""), flush=True)
    return 1 if failed else 0


__all__ = ["COMPARABLE", "MAS_IGNORED_KEYS", "NEAR_PERFECT", "SMOKE_MAS_OVERRIDES", "SMOKE_NOTE", "Claim",
           "PlannedRun", "RunOutcome", "all_known", "below_bar", "compare", "direction_row", "early_stop_note",
           "execute_plan",
           "find_finished_run", "find_record", "fmt", "fmt_ci", "is_number", "markdown_table",
           "mas_config_from_preset", "missing_models", "models_newer_than", "plan_rows",
           "plot_grouped_bars", "plot_lines", "preset_path", "recipe_main", "resolve_models", "run_or_reuse",
           "run_status_sections",
           "same_config", "scratch_checkpoints", "write_csv", "write_summary"]
