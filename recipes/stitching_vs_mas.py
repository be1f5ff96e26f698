"""Model stitching vs MAS vs DAS across the subspace size k (two MultiObject GRU seeds, hidden state).

    python -m recipes.stitching_vs_mas recipes/configs/stitching_vs_mas.yaml
    python -m recipes.stitching_vs_mas recipes/configs/stitching_vs_mas.yaml --smoke          # seconds
    python -m recipes.stitching_vs_mas recipes/configs/stitching_vs_mas.yaml ks=[2,4] methods=[mas,das]

For every k the recipe trains (``llm_mas.run.run``; settings from ``mas_preset``):
- ``mas_k{k}``: MAS, both models, every direction (0→0, 0→1, 1→0, 1→1) trained jointly;
- ``das_m{i}_k{k}``: DAS, each model alone;
- ``stitch_{s}to{t}_k{k}``: rank-k isometric stitching h_s Q_s P_k Q_tᵀ (target latent discarded), trained on
  s→t only, one run per direction;
- ``linear_{s}to{t}_k{k}``: an unconstrained affine stitch of rank ≤ k, trained on s→t only;
- ``unimas_{s}to{t}_k{k}`` (k in ``unimas_ks``): UniMAS, one cross direction s→t plus the target's own t→t
  trained (every direction evaluated) — MAS without the constraint from the other direction.
The runs the paper's claims need go first (stitching and MAS at k = 2, MAS and DAS at k = 4; the cheaper
one-direction runs before MAS), then the rest of k = 2 and 4, then the other ks. Outputs in ``runs/<name>/``:
``results.csv`` (one row per method, k and direction: trial IIA with its 95% bootstrap CI, token IIA, the
run), ``iia_vs_k.png`` and ``summary.md`` (the table and which paper claims hold), rewritten after every run.

Restartable: a finished MAS run with the same resolved config is reused (in ``runs/<name>/mas/`` or any
directory under ``reuse_dirs``), an unfinished one resumes from its checkpoint. ``--smoke``: 2 training
steps on a few dozen pairs, ks from ``smoke_ks``, into ``runs/<name>-smoke``; ``--models-from-scratch``
replaces the models by random-weight checkpoints of the same architecture (tests).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from recipes.common.claims import COMPARABLE, NEAR_PERFECT, Claim, all_known, format_ci_comparison
from recipes.common.cli import recipe_main
from recipes.common.models import resolve_models
from recipes.common.plans import (
    SMOKE_MAS_OVERRIDES,
    PlannedRun,
    mas_config_from_preset,
    plan_rows,
    preset_path,
)
from recipes.common.plots import plot_lines
from recipes.common.report import (
    SMOKE_NOTE,
    fmt_ci,
    markdown_table,
    run_status_sections,
    write_csv,
    write_summary,
)

REPO = Path(__file__).resolve().parent.parent
METHODS = ("mas", "das", "stitch", "linear_stitch", "unimas")
CLAIM_KS = (2, 4)


@dataclass
class RecipeConfig:
    models: list[str] = field(default_factory=lambda: ["multiobject-gru-s0", "multiobject-gru-s1"])
    site: str = "hidden"
    ks: list[int] = field(default_factory=lambda: [1, 2, 4, 16, 32, 128])
    smoke_ks: list[int] = field(default_factory=lambda: [2, 4])
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    unimas_ks: list[int] = field(default_factory=lambda: [2, 4, 16])  # UniMAS only at these (those in ks)
    mas_preset: str = "llm_mas/presets/gru_gru_hidden.yaml"   # data sizes and trainer settings
    mas_overrides: list[str] = field(default_factory=list)    # key=value applied to the preset
    name: str = "stitching_vs_mas"
    out_dir: str = "runs"
    seed: int = 0
    device: str = "cpu"
    reuse_dirs: list[str] = field(default_factory=lambda: ["runs"])

    def validate(self) -> list[str]:
        p = []
        if len(self.models) != 2:
            p.append(f"models: list exactly two models, got {self.models}")
        if any(k < 1 for k in self.unimas_ks):
            p.append(f"unimas_ks: list subspace sizes >= 1, got {self.unimas_ks}")
        for key in ("ks", "smoke_ks"):
            bad = [k for k in getattr(self, key) if k < 1]
            if bad or not getattr(self, key):
                p.append(f"{key}: list subspace sizes >= 1, got {getattr(self, key)}")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            p.append(f"methods: unknown {unknown}; valid: {', '.join(METHODS)}")
        if not preset_path(self.mas_preset).exists():
            p.append(f"mas_preset {self.mas_preset!r} does not exist (tried the working directory and "
                     f"{REPO})")
        return p


def plan(config: RecipeConfig, models: list[str], ks: list[int], overrides: list[str], mas_dir: Path,
         progress: bool = True) -> list[PlannedRun]:
    """The MAS runs, claim ks first; each with the (method, k, direction) rows it feeds."""
    def cfg(name, names, **fields):
        return mas_config_from_preset(
            config.mas_preset, overrides, name=name, out_dir=str(mas_dir), seed=config.seed,
            device=config.device, progress=progress, models=[{"name": n, "site": config.site} for n in names],
            variables=["full"], **fields)

    runs = []
    for k in ks:
        if "mas" in config.methods:
            runs.append(PlannedRun(cfg(f"mas_k{k}", models, k=k, directions="all"),
                                   [({"method": "mas", "k": k, "direction": f"{s}→{t}"}, s, t)
                                    for s, t in ((0, 1), (1, 0), (0, 0), (1, 1))]))
        if "das" in config.methods:
            for i, m in enumerate(models):
                runs.append(PlannedRun(cfg(f"das_m{i}_k{k}", [m], k=k, directions="all"),
                                       [({"method": "das", "k": k, "direction": f"{i}→{i}"}, 0, 0)]))
        for method, intervention, prefix in (("stitch", "stitch", "stitch"),
                                             ("linear_stitch", "linear_stitch", "linear")):
            if method in config.methods:
                for s, t in ((0, 1), (1, 0)):
                    runs.append(PlannedRun(
                        cfg(f"{prefix}_{s}to{t}_k{k}", models, k=k, directions=[[s, t]],
                            intervention=intervention),
                        [({"method": method, "k": k, "direction": f"{s}→{t}"}, s, t)]))
        if "unimas" in config.methods and k in config.unimas_ks:
            for s, t in ((0, 1), (1, 0)):
                runs.append(PlannedRun(cfg(f"unimas_{s}to{t}_k{k}", models, k=k, directions=[[s, t], [t, t]]),
                                       [({"method": "unimas", "k": k, "direction": f"{s}→{t}"}, s, t)]))
    return sorted(runs, key=_priority)  # stable: config order within a priority


def _priority(run: PlannedRun) -> tuple[int, bool]:
    """Group 0: runs the paper's claims need (stitch and MAS at k = 2, MAS and DAS at k = 4); 1: the rest of
    k = 2 and 4; 2: other ks. Within a group the one-direction runs (stitching, DAS) go before MAS (four)."""
    method, k = run.rows[0][0]["method"], run.rows[0][0]["k"]
    if (k == 2 and method in ("mas", "stitch")) or (k == 4 and method in ("mas", "das")):
        group = 0
    else:
        group = 1 if k in CLAIM_KS else 2
    return group, method == "mas"


# ================================================================================== table and claims
COLUMNS = [("mas", "0→1"), ("mas", "1→0"), ("mas", "0→0"), ("mas", "1→1"), ("das", "0→0"), ("das", "1→1"),
           ("stitch", "0→1"), ("stitch", "1→0"), ("linear_stitch", "0→1"), ("linear_stitch", "1→0"),
           ("unimas", "0→1"), ("unimas", "1→0")]
HEADERS = {"mas": "MAS", "das": "DAS", "stitch": "isometric stitch", "linear_stitch": "linear stitch",
           "unimas": "UniMAS"}


def pivot(rows: list[dict]) -> list[dict]:
    """One line per k: trial IIA of every (method, direction)."""
    out = []
    for k in sorted({r["k"] for r in rows}):
        line = {"k": k}
        for r in rows:
            if r["k"] == k:
                line[f"{r['method']} {r['direction']}"] = r["trial_iia"]
        out.append(line)
    return out


def _cell(rows: list[dict], method: str, k: int, direction: str) -> dict:
    for r in rows:
        if r["method"] == method and r["k"] == k and r["direction"] == direction:
            return r
    return {}


def claims(rows: list[dict]) -> list[Claim]:
    out = []
    stitch2 = [_cell(rows, "stitch", 2, d) for d in ("0→1", "1→0")]
    linear2 = [_cell(rows, "linear_stitch", 2, d) for d in ("0→1", "1→0")]
    values = [c.get("trial_iia") for c in stitch2]
    holds = min(values) >= NEAR_PERFECT if all_known(*values) else None
    out.append(Claim(
        f"Stitching is near-perfect even at rank 2 (isometric stitch, both directions, trial IIA ≥ "
        f"{NEAR_PERFECT})",
        holds, f"isometric 0→1 {fmt_ci(stitch2[0])}, 1→0 {fmt_ci(stitch2[1])}; linear (affine, rank ≤ 2) "
               f"0→1 {fmt_ci(linear2[0])}, 1→0 {fmt_ci(linear2[1])}."))
    mas2 = [_cell(rows, "mas", 2, d) for d in ("0→1", "1→0")]
    pairs = list(zip(mas2, stitch2, strict=True))
    known = all(all_known(m.get("trial_iia"), s.get("trial_iia")) for m, s in pairs)
    out.append(Claim(
        "MAS at k = 2 is lower than stitching at rank 2 (each cross direction)",
        all(m["trial_iia"] < s["trial_iia"] for m, s in pairs) if known else None,
        "; ".join(f"{d}: MAS vs stitch {format_ci_comparison(m, s)}"
                  for d, (m, s) in zip(("0→1", "1→0"), pairs, strict=True)) + "."))
    mas4 = [_cell(rows, "mas", 4, d) for d in ("0→1", "1→0")]
    das4 = [_cell(rows, "das", 4, d) for d in ("0→0", "1→1")]
    values = [c.get("trial_iia") for c in mas4 + das4]
    gap = abs((values[0] + values[1]) / 2 - (values[2] + values[3]) / 2) if all_known(*values) else None
    out.append(Claim(
        f"MAS at k = 4 is comparable to DAS at k = 4 (|mean cross-direction MAS − mean DAS| ≤ {COMPARABLE})",
        gap <= COMPARABLE if gap is not None else None,
        f"MAS 0→1 {fmt_ci(mas4[0])}, 1→0 {fmt_ci(mas4[1])}; DAS model 0 {fmt_ci(das4[0])}, model 1 "
        f"{fmt_ci(das4[1])}" + (f"; gap of the means {gap:.3f}." if gap is not None else ".")))
    return out


def write_outputs(rows: list[dict], run_dir: Path, command: str, models: list[str], seconds: float,
                  smoke: bool = False) -> None:
    write_csv(rows, run_dir / "results.csv")
    series = {}
    for method, direction in COLUMNS:
        cells = sorted((r for r in rows if (r["method"], r["direction"]) == (method, direction)),
                       key=lambda r: r["k"])
        if cells:
            series[f"{HEADERS[method]} {direction}"] = ([r["k"] for r in cells], cells)
    plot_lines(series, run_dir / "iia_vs_k.png", f"Stitching vs MAS vs DAS — {Path(models[0]).name} (0) and "
               f"{Path(models[1]).name} (1)", "k (subspace size / stitch rank)")
    table = pivot(rows)
    present = [(m, d) for m, d in COLUMNS if any(f"{m} {d}" in line for line in table)]
    sections = [
        f"Models: 0 = `{models[0]}`, 1 = `{models[1]}` (hidden state). Validation trial IIA of the best "
        f"checkpoint; DAS i→i is model i alone; stitching rows are trained on that direction only, UniMAS "
        f"s→t rows on s→t and t→t "
        f"({seconds:.0f} s this call; full rows with 95% bootstrap CIs in results.csv).",
        *([SMOKE_NOTE] if smoke else []),
        markdown_table(table, ["k", *[f"{m} {d}" for m, d in present]],
                       ["k", *[f"{HEADERS[m]} {d}" for m, d in present]]),
    ]
    sections.extend(run_status_sections(rows))
    write_summary(run_dir / "summary.md", "Model stitching vs MAS vs DAS across k", command, sections,
                  claims(rows))


def build(config: RecipeConfig, run_dir: Path, smoke: bool, scratch_dir: Path | None) -> list[PlannedRun]:
    mapping = resolve_models(config.models, scratch_dir)
    overrides = [*config.mas_overrides, *(SMOKE_MAS_OVERRIDES if smoke else [])]
    ks = config.smoke_ks if smoke else config.ks
    return plan(config, [mapping[m] for m in config.models], ks, overrides, run_dir / "mas",
                progress=not smoke and sys.stdout.isatty())


def write(config: RecipeConfig, plans: list[PlannedRun], outcomes: dict, run_dir: Path, command: str,
          seconds: float, smoke: bool) -> None:
    pair = next((p.config.models for p in plans if len(p.config.models) == 2), None)
    models = [m.name for m in pair] if pair else list(config.models)
    write_outputs(plan_rows(plans, outcomes), run_dir, command, models, seconds, smoke)


def main(argv: list[str] | None = None) -> int:
    torch.set_num_threads(1)  # small task models: more threads only add overhead
    return recipe_main(argv, name="stitching_vs_mas", doc=__doc__, config_cls=RecipeConfig, build=build,
                       write=write, outputs="results.csv, iia_vs_k.png, summary.md")


if __name__ == "__main__":
    sys.exit(main())
