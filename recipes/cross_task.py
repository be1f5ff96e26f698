"""Cross-task numeric alignment: the `count` subspace of GRUs trained on different counting tasks, and
MultiObject `count` against the Arithmetic GRU's `remaining_ops` and `cumulative_value`.

    python -m recipes.cross_task recipes/configs/cross_task.yaml
    python -m recipes.cross_task recipes/configs/cross_task.yaml --smoke                  # seconds
    python -m recipes.cross_task recipes/configs/cross_task.yaml k=8

Runs (``llm_mas.run.run``, variable ``count``, hidden state, k coordinates; data and trainer settings
from ``mas_preset``; every MAS run trains all four directions):
- ``within_{task}``: MAS between the first two seeds of a task (MultiObject s0 vs s1);
- ``das_{task}``: DAS on each task's first model — the within-task reference for tasks with one seed
  (Rounding, Modulo): a model against itself, not two models, so it is an upper bound for within-task MAS;
- ``cross_{a}_{b}``: MAS between the first models of two tasks, `count` against `count`;
- ``count_vs_remops`` / ``count_vs_cumuval``: MultiObject `count` against the Arithmetic GRU's
  ``remaining_ops`` / ``cumulative_value`` (``variable_map`` of the Arithmetic model);
- ``count_vs_cumuval_{lo}to{hi}``: the same, with the swapped values restricted to lo..hi (both the source's
  value and the target's current value; ``data.value_range`` of the MAS config).
Outputs in ``runs/<name>/``: ``results.csv`` (one row per run and direction, trial IIA with 95% bootstrap
CI), ``iia_by_comparison.png``, ``summary.md`` (table + paper claims); rewritten after every run.
Restartable (finished runs with the same resolved config are reused, unfinished ones resume).
``--smoke``: 2 steps, tiny data, ``runs/<name>-smoke``; ``--models-from-scratch``: random-weight stand-ins.
"""

from __future__ import annotations

import itertools
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from recipes.common.claims import Claim, all_known
from recipes.common.cli import recipe_main
from recipes.common.models import resolve_models
from recipes.common.plans import (
    SMOKE_MAS_OVERRIDES,
    PlannedRun,
    mas_config_from_preset,
    plan_rows,
    preset_path,
)
from recipes.common.plots import plot_grouped_bars
from recipes.common.report import (
    SMOKE_NOTE,
    early_stop_note,
    fmt_ci,
    markdown_table,
    write_csv,
    write_summary,
)

REPO = Path(__file__).resolve().parent.parent
ARITHMETIC_VARIABLES = {"remops": "remaining_ops", "cumuval": "cumulative_value"}


@dataclass
class RecipeConfig:
    task_models: dict[str, list[str]] = field(default_factory=lambda: {
        "multiobject": ["multiobject-gru-s0", "multiobject-gru-s1"],
        "rounding": ["rounding-gru-s0"], "modulo": ["modulo-gru-s0"]})
    arithmetic_model: str = "arithmetic-gru-s0"
    count_model: str = "multiobject-gru-s0"       # the `count` side of the Arithmetic comparisons
    restricted_range: list[int] = field(default_factory=lambda: [1, 10])
    site: str = "hidden"
    k: int = 16
    mas_preset: str = "llm_mas/presets/gru_gru_hidden.yaml"
    mas_overrides: list[str] = field(default_factory=list)
    name: str = "cross_task"
    out_dir: str = "runs"
    seed: int = 0
    device: str = "cpu"
    reuse_dirs: list[str] = field(default_factory=lambda: ["runs"])

    def validate(self) -> list[str]:
        p = []
        if len(self.task_models) < 2:
            p.append(f"task_models: list models of at least two tasks, got {list(self.task_models)}")
        for task, names in self.task_models.items():
            if not names:
                p.append(f"task_models.{task}: list at least one model")
        if len(self.restricted_range) != 2 or self.restricted_range[0] > self.restricted_range[1]:
            p.append(f"restricted_range must be [lo, hi] with lo <= hi, got {self.restricted_range}")
        if self.k < 1:
            p.append(f"k must be >= 1, got {self.k}")
        if not preset_path(self.mas_preset).exists():
            p.append(f"mas_preset {self.mas_preset!r} does not exist (tried the working directory and "
                     f"{REPO})")
        return p

    def all_models(self) -> list[str]:
        return [*(m for ms in self.task_models.values() for m in ms), self.count_model, self.arithmetic_model]


def _rows(group: str, comparison: str, names: list[str], two: bool) -> list[tuple[dict, int, int]]:
    label = {"group": group, "comparison": comparison, "model_a": Path(names[0]).name,
             "model_b": Path(names[-1]).name}
    if not two:
        return [({**label, "direction": "A→A"}, 0, 0)]
    return [({**label, "direction": d}, s, t) for d, s, t in
            (("A→B", 0, 1), ("B→A", 1, 0), ("A→A", 0, 0), ("B→B", 1, 1))]


def plan(config: RecipeConfig, mapping: dict[str, str], overrides: list[str], mas_dir: Path,
         progress: bool = True) -> list[PlannedRun]:
    """Within-task, DAS, cross-task, then the Arithmetic runs."""
    def cfg(name, entries, extra=(), **fields):
        return mas_config_from_preset(
            config.mas_preset, [*overrides, *extra], name=name, out_dir=str(mas_dir), seed=config.seed,
            device=config.device, progress=progress, k=config.k, variables=["count"], directions="all",
            models=[{"site": config.site, **e} for e in entries], **fields)

    runs = []
    for task, names in config.task_models.items():
        if len(names) >= 2:
            pair = [mapping[n] for n in names[:2]]
            runs.append(PlannedRun(cfg(f"within_{task}", [{"name": n} for n in pair]),
                                   _rows("within", f"within {task}", pair, True)))
        first = mapping[names[0]]
        runs.append(PlannedRun(cfg(f"das_{task}", [{"name": first}]),
                               _rows("das", f"DAS {task}", [first], False)))
    for (ta, na), (tb, nb) in itertools.combinations(config.task_models.items(), 2):
        pair = [mapping[na[0]], mapping[nb[0]]]
        runs.append(PlannedRun(cfg(f"cross_{ta}_{tb}", [{"name": n} for n in pair]),
                               _rows("cross", f"{ta} vs {tb}", pair, True)))
    count, arith = mapping[config.count_model], mapping[config.arithmetic_model]
    lo, hi = config.restricted_range
    for short, variable, value_range in (("remops", "remaining_ops", None),
                                         ("cumuval", "cumulative_value", None),
                                         ("cumuval", "cumulative_value", (lo, hi))):
        entries = [{"name": count}, {"name": arith, "variable_map": {"count": variable}}]
        suffix = f"_{lo}to{hi}" if value_range else ""
        label = f"count vs {variable}" + (f" ({lo}..{hi})" if value_range else "")
        extra = [f"data.value_range=[{lo}, {hi}]"] if value_range else []
        runs.append(PlannedRun(cfg(f"count_vs_{short}{suffix}", entries, extra),
                               _rows("arithmetic", label, [count, arith], True)))
    return runs


# ================================================================================== table and claims
def summarise(rows: list[dict]) -> list[dict]:
    """One line per comparison: trial IIA per direction and the mean of the two cross directions."""
    out: dict[str, dict] = {}
    for r in rows:
        line = out.setdefault(r["comparison"], {"comparison": r["comparison"], "group": r["group"],
                                                "A": r["model_a"], "B": r["model_b"], "status": r["status"]})
        line[r["direction"]] = r["trial_iia"]
        line[r["direction"] + " CI"] = fmt_ci(r)
    for line in out.values():
        if line["group"] == "das":
            line["B"] = "(itself)"
            line["cross mean"] = math.nan
        else:
            ab, ba = line.get("A→B"), line.get("B→A")
            line["cross mean"] = (ab + ba) / 2 if all_known(ab, ba) else math.nan
    return list(out.values())


def _within(lines: list[dict], task: str) -> tuple[float, str]:
    """The within-task reference of a task: MAS between two seeds when run, else DAS on its model."""
    for line in lines:
        if line["comparison"] == f"within {task}":
            return line["cross mean"], "MAS between seeds"
    for line in lines:
        if line["comparison"] == f"DAS {task}":
            return line.get("A→A", math.nan), "DAS on its one model"
    return math.nan, "not run"


def claims(lines: list[dict], config: RecipeConfig) -> list[Claim]:
    out = []
    verdicts, evidence = [], []
    for ta, tb in itertools.combinations(config.task_models, 2):
        cross = next((li["cross mean"] for li in lines if li["comparison"] == f"{ta} vs {tb}"), math.nan)
        (wa, how_a), (wb, how_b) = _within(lines, ta), _within(lines, tb)
        if not all_known(cross, wa, wb):
            verdicts.append(None)
            evidence.append(f"{ta} vs {tb}: pending")
            continue
        verdicts.append(cross < wa and cross < wb)
        evidence.append(f"{ta} vs {tb}: cross {cross:.3f} vs within {ta} {wa:.3f} ({how_a}), within {tb} "
                        f"{wb:.3f} ({how_b})")
    holds = None if None in verdicts or not verdicts else all(verdicts)
    out.append(Claim("Cross-task `count` IIA (mean of both cross directions) is below the within-task IIA of "
                     "both tasks, for every task pair", holds, "; ".join(evidence) + "."))
    lo, hi = config.restricted_range
    get = {li["comparison"]: li["cross mean"] for li in lines}
    remops = get.get("count vs remaining_ops", math.nan)
    full = get.get("count vs cumulative_value", math.nan)
    restricted = get.get(f"count vs cumulative_value ({lo}..{hi})", math.nan)
    known = all_known(remops, full, restricted)
    blocked = next((li["status"] for li in lines if li["comparison"].endswith(f"({lo}..{hi})")), "")
    evidence = (f"count vs CumuVal {lo}..{hi}: {restricted:.3f}; vs full CumuVal: {full:.3f}; vs RemOps: "
                f"{remops:.3f}" if known else
                f"vs RemOps {remops:.3f}, vs full CumuVal {full:.3f}, vs CumuVal {lo}..{hi}: "
                f"{blocked or 'pending'}")
    out.append(Claim(f"Count vs CumuVal restricted to {lo}..{hi} is higher than vs full CumuVal but below "
                     "Count vs RemOps (cross-direction means)",
                     (full < restricted < remops) if known else None,
                     evidence + "."))
    return out


def write_outputs(rows: list[dict], run_dir: Path, command: str, config: RecipeConfig, seconds: float,
                  plans: list[PlannedRun], smoke: bool = False) -> None:
    write_csv(rows, run_dir / "results.csv")
    lines = summarise(rows)
    groups = [li["comparison"] for li in lines]
    bars = {d: [next((r for r in rows if r["comparison"] == g and r["direction"] == d), {}) for g in groups]
            for d in ("A→B", "B→A", "A→A")}
    plot_grouped_bars(groups, bars, run_dir / "iia_by_comparison.png",
                      f"`count` alignment within and across tasks (k = {config.k})")
    columns = ["comparison", "A", "B", "A→B CI", "B→A CI", "cross mean", "A→A", "B→B", "status"]
    headers = ["comparison", "A", "B", "A→B", "B→A", "cross mean", "A→A", "B→B", "status"]
    blocked = [f"- {p.name}: blocked — {p.blocked}." for p in plans if p.blocked]
    sections = [
        f"Variable `count` (Arithmetic model: `variable_map`), hidden state, k = {config.k}; validation "
        f"trial IIA of the best checkpoint with 95% bootstrap CIs ({seconds:.0f} s this call; all rows in "
        "results.csv). A→B: source A, B intervened upon. Within-task references: MAS between seeds where a "
        "task has two (MultiObject); DAS on the model itself where it has one (Rounding, Modulo) — a model "
        "against itself, an upper bound for a within-task MAS, which makes 'cross below within' easier to "
        "satisfy for those.",
        *([SMOKE_NOTE] if smoke else []),
        markdown_table(lines, columns, headers),
        *(["Blocked runs:\n" + "\n".join(blocked)] if blocked else []),
        *([early] if (early := early_stop_note(rows)) else []),
    ]
    write_summary(run_dir / "summary.md", "Cross-task numeric alignment", command, sections,
                  claims(lines, config))


def build(config: RecipeConfig, run_dir: Path, smoke: bool, scratch_dir: Path | None) -> list[PlannedRun]:
    mapping = resolve_models(config.all_models(), scratch_dir)
    overrides = [*config.mas_overrides, *(SMOKE_MAS_OVERRIDES if smoke else [])]
    return plan(config, mapping, overrides, run_dir / "mas", progress=not smoke and sys.stdout.isatty())


def write(config: RecipeConfig, plans: list[PlannedRun], outcomes: dict, run_dir: Path, command: str,
          seconds: float, smoke: bool) -> None:
    write_outputs(plan_rows(plans, outcomes), run_dir, command, config, seconds, plans, smoke)


def main(argv: list[str] | None = None) -> int:
    torch.set_num_threads(1)  # small task models: more threads only add overhead
    return recipe_main(argv, name="cross_task", doc=__doc__, config_cls=RecipeConfig, build=build,
                       write=write, outputs="results.csv, iia_by_comparison.png, summary.md")


if __name__ == "__main__":
    sys.exit(main())
