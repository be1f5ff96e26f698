"""MAS runs of a recipe: configs from presets, reuse of finished runs, resumption, training, table rows.

Recipes orchestrate and the library computes: every number in a row (trial IIA, its bootstrap CI, token IIA,
CL match counts) comes from ``llm_mas.run.run`` / ``MASResult`` records. This module only decides *which*
run to execute and picks records out of finished runs::

    from recipes.common.plans import PlannedRun, execute_plan, mas_config_from_preset, plan_rows
    cfg = mas_config_from_preset("gru_gru_hidden", [], name="mas_k4", k=4,
                                 out_dir="runs/x/mas")
    plans = [PlannedRun(cfg, rows=[({"method": "mas"}, 0, 1)])]   # one row: direction 0 -> 1
    outcomes = execute_plan(plans, search_dirs=["runs"])           # reuse / resume / train
    rows = plan_rows(plans, outcomes)                              # trial IIA 0 -> 1 with its CI
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llm_mas.config import apply_overrides, from_dict, load_yaml, to_dict
from llm_mas.errors import ConfigError, DataError, MASError
from llm_mas.models.registry import below_bar_text, read_manifest, resolve_model_dir
from llm_mas.presets import resolve_preset
from llm_mas.problems import Record
from llm_mas.results import MASResult
from llm_mas.run import run as run_mas
from llm_mas.run_config import MASConfig

REPO = Path(__file__).resolve().parents[2]

# Keys of a MAS config that do not change its numbers: a finished run differing only in these is reused.
MAS_IGNORED_KEYS = ("name", "out_dir", "progress", "resume", "device")

# --smoke: 2 training steps on a few dozen pairs (seconds per MAS run).
SMOKE_MAS_OVERRIDES = ("data.n_train=32", "data.n_valid=16", "train.max_steps=2", "train.eval_every=2",
                       "train.batch_size=16", "eval.batch_size=64")


def preset_path(path: str | Path) -> Path:
    """A preset by name (``gru_gru_hidden``, see ``llm-mas list-presets``) or a file: as given, else relative
    to the repository root."""
    p = Path(path)
    if p.is_absolute() or p.exists():
        return p
    if (REPO / p).exists():
        return REPO / p
    try:
        return resolve_preset(str(path))
    except ConfigError:
        return REPO / p  # callers report the missing file


# ================================================================================== MAS configs
def mas_config_from_preset(preset: str | Path, overrides: Sequence[str] = (), **fields: Any) -> MASConfig:
    """A `MASConfig`: the preset's settings (data sizes, trainer), `overrides` (``key.sub=value``) applied,
    then the top-level `fields` (models, k, directions, intervention, cl, name, out_dir, ...) replaced.

    The preset's own model names are replaced, so they are not resolved; the final models are checked by
    ``run_mas`` before anything loads (a recipe may plan runs for models that are not trained yet)."""
    data = apply_overrides(load_yaml(preset_path(preset)), list(overrides))
    valid = [f.name for f in dataclasses.fields(MASConfig)]
    for key, value in fields.items():
        if key not in valid:
            raise ConfigError(f"MASConfig has no field {key!r}; valid: {', '.join(valid)}")
        data[key] = to_dict(value)
    return from_dict(MASConfig, data)


def _comparable(data: dict, ignored: Iterable[str]) -> dict:
    return {k: v for k, v in data.items() if k not in set(ignored)}


def _without_starts(data: dict) -> dict:
    """A MAS config's dict with its models' ``alignment_init`` paths removed (compared by content instead)."""
    if not isinstance(data.get("models"), list):
        return data
    return {**data, "models": [{k: v for k, v in m.items() if k != "alignment_init"} if isinstance(m, dict) else m
                               for m in data["models"]]}


def _same_starts(run_dir: Path, config) -> bool:
    """Whether the run at `run_dir` started its models' alignments from the same tensors as `config` would
    (``alignment_init``: digests in its fingerprint.json against the runs `config` names now)."""
    from llm_mas.problems.manifest import alignment_init_digest

    models = getattr(config, "models", [])
    starts = {i: m.alignment_init for i, m in enumerate(models) if getattr(m, "alignment_init", None) is not None}
    path = run_dir / "fingerprint.json"
    try:
        saved = json.loads(path.read_text()).get("values", {}) if path.exists() else {}
    except ValueError:
        return False
    recorded = {int(k.split(".")[1]): v for k, v in saved.items()
                if k.startswith("models.") and k.endswith(".alignment_init")}
    if set(recorded) != set(starts):
        return False
    try:
        return all(recorded[i] == alignment_init_digest(ref, models[i].name) for i, ref in starts.items())
    except ConfigError:   # the start named now is gone or changed
        return False


def same_config(run_dir: str | Path, config, ignored: Iterable[str] = MAS_IGNORED_KEYS) -> bool:
    """True when ``run_dir/config.yaml`` resolves to `config` up to the `ignored` top-level keys (models
    started from a finished run: the same tensors, wherever that run now lies)."""
    path = Path(run_dir) / "config.yaml"
    if not path.exists():
        return False
    try:
        # (the start is read without its path: the run it names may have moved since)
        saved = from_dict(type(config), _without_starts(load_yaml(path)))
    except ConfigError:  # written by another version of the config: not the same run
        return False
    if _comparable(_without_starts(to_dict(saved)), ignored) != _comparable(_without_starts(to_dict(config)),
                                                                            ignored):
        return False
    return _same_starts(Path(run_dir), config)


def find_finished_run(config: MASConfig, search_dirs: Sequence[str | Path] = ()) -> Path | None:
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


def models_newer_than(config: MASConfig, path: str | Path) -> list[str]:
    """Task models of `config` whose weights were written after `path` (a result or checkpoint): a run on
    an older checkpoint of the same name must not be reused or resumed (the config only names the model)."""
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


# ================================================================================== one run
@dataclass
class RunOutcome:
    """What `run_or_reuse` did for one MAS config."""

    name: str
    status: str                       # reused | trained | pending | blocked | failed
    result: MASResult | None = None   # None when pending / blocked / failed
    run_dir: Path | None = None
    info: dict | None = None          # summary.json of the run (best_step, steps, stopped, seconds)
    message: str = ""


def run_or_reuse(config: MASConfig, search_dirs: Sequence[str | Path] = (), log: Callable[[str], None] = print,
                 train: bool = True) -> RunOutcome:
    """Reuse a finished run of this config, else resume its own unfinished run, else train it.

    A checkpoint in ``<out_dir>/<name>`` written for another config is not resumed (that run starts afresh).
    With ``train=False`` an unfinished run is reported as pending instead of trained.
    """
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
    direction) merged with that direction's numbers. blocked: why the run cannot go ahead (row status
    ``blocked``, the reason in the summary), e.g. a model below the accuracy bar.
    """

    config: MASConfig
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
    names = [p.name for p in plans]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"run names must be unique within a recipe; repeated: {', '.join(dupes)}")
    manifest = read_manifest()["models"]
    for p in plans:  # results on a model that fails the accuracy bar are not comparable (docs/method.md)
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


def plan_rows(plans: Sequence[PlannedRun], outcomes: dict[str, RunOutcome]) -> list[dict]:
    """Every plan's table rows (labels + `direction_row`), in plan order; NaN for runs not finished."""
    rows = []
    for plan in plans:
        outcome = outcomes.get(plan.name) or RunOutcome(plan.name, "pending")
        for labels, s, t in plan.rows:
            rows.append({**labels, "run": plan.name, **direction_row(outcome, s, t, plan.variable)})
    return rows


# ================================================================================== records -> rows
def find_record(result: MASResult, source_index: int, target_index: int, variable: str | None = None) -> Record:
    """The record of direction source -> target (and `variable`, default the run's first) of a MASResult."""
    variable = variable or result.variables[0]
    for r in result.records:
        if (r.source_index, r.target_index, r.variable) == (source_index, target_index, variable):
            return r
    have = sorted({(r.source_index, r.target_index, r.variable) for r in result.records})
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
    lo, hi = r.trial_iia_ci if r.trial_iia_ci is not None else [math.nan, math.nan]
    info = outcome.info or {}
    row.update(source=r.source, target=r.target, variable=r.variable,
               trained_by=r.trained_by or "", trial_iia=r.trial_iia, trial_iia_lo=lo, trial_iia_hi=hi,
               token_iia=r.token_iia, n_pairs=r.n_pairs,
               best_step=info.get("best_step", r.best_step), steps=info.get("steps"),
               stopped=info.get("stopped"), status=outcome.status,
               run_dir=str(outcome.run_dir))
    if r.cl_unmatched is not None:
        row["cl_unmatched"] = r.cl_unmatched
    return row
