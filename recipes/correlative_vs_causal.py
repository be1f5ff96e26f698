"""Correlative vs causal similarity: RSA and CKA against MAS trial IIA on the same pairs of models.

    python -m recipes.correlative_vs_causal recipes/configs/correlative_vs_causal.yaml
    python -m recipes.correlative_vs_causal recipes/configs/correlative_vs_causal.yaml --smoke   # seconds
    python -m recipes.correlative_vs_causal recipes/configs/correlative_vs_causal.yaml --only gru_gru_hidden

For every comparison (two models at one site: GRU–GRU seeds, GRU–LSTM, GRU–Transformer, each at the input
embeddings and at the hidden state) the recipe
1. computes RSA (cosine / euclidean RDMs × Spearman / Pearson) and linear CKA (biased / unbiased) on the
   rows of the same 300 MultiObject sequences (``llm_mas.correlative.run_similarity``);
2. trains MAS between the same two models at the same site from the comparison's MAS preset (stepwise at
   the embeddings, indywise at the hidden state; ``llm_mas.run.run``), and takes trial IIA in each
   cross direction and their mean;
3. writes ``runs/<name>/comparison.csv``, ``comparison.png`` (a heat-table: rows = comparisons,
   columns = measures) and ``summary.md``.

Restartable: a finished MAS run (``results.json`` present, same resolved config) is reused, in the
recipe's own ``mas/`` folder or any run directory under ``reuse_dirs`` (e.g. ``runs/gru_gru_hidden`` from
``llm-mas mas gru_gru_hidden``); an unfinished one resumes from its checkpoint.
The table and figure are rewritten after every MAS run, so a partial run already has them (pending rows
show NaN). ``--only a,b`` trains only those comparisons and still tabulates every finished one;
``--skip-missing`` leaves out (as blocked) the comparisons whose models are not shipped yet.

``--smoke`` shrinks everything (2 MAS steps, a few dozen pairs, 2 subsamples of 64 rows) into
``runs/<name>-smoke``; ``--models-from-scratch`` (tests) replaces every model by a randomly initialised
checkpoint of the same architecture, written into the run directory.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib
import numpy as np
import torch
from matplotlib.figure import Figure

from llm_mas.config import to_dict
from llm_mas.correlative import flatten_metrics, mas_direction_summary, run_similarity, similarity_config
from llm_mas.errors import ConfigError
from recipes.common.claims import Claim, all_known
from recipes.common.cli import RecipeInvocation, recipe_front_door
from recipes.common.models import missing_models, resolve_models
from recipes.common.plans import (
    SMOKE_MAS_OVERRIDES,
    PlannedRun,
    direction_row,
    execute_plan,
    mas_config_from_preset,
    preset_path,
    same_config,
)
from recipes.common.report import SMOKE_NOTE, early_stop_note, fmt, markdown_table, write_csv, write_summary

REPO = Path(__file__).resolve().parent.parent
SIMILARITY_IGNORED_KEYS = ("name", "out_dir", "device", "batch_size")  # do not change the numbers
SMOKE_SIMILARITY = {"n_rows": 64, "n_repeats": 2, "per_quantity": 2}
# What "low" and "high" mean in the claim verdicts (stated in every summary).
LOW_SIMILARITY, HIGH_SIMILARITY = 0.5, 0.7
LOW_IIA, HIGH_IIA = 0.5, 0.9
CORRELATIVE = ("rsa_cosine_spearman", "rsa_cosine_pearson", "rsa_euclidean_spearman", "rsa_euclidean_pearson",
               "cka_biased", "cka_unbiased")
CAUSAL = ("mas_trial_iia_cross_mean", "mas_trial_iia_a_to_b", "mas_trial_iia_b_to_a")
LABELS = {
    "rsa_cosine_spearman": "RSA cos\nSpearman", "rsa_cosine_pearson": "RSA cos\nPearson",
    "rsa_euclidean_spearman": "RSA L2\nSpearman", "rsa_euclidean_pearson": "RSA L2\nPearson",
    "cka_biased": "CKA\nbiased", "cka_unbiased": "CKA\nunbiased",
    "mas_trial_iia_cross_mean": "MAS IIA\nmean", "mas_trial_iia_a_to_b": "MAS IIA\nA→B",
    "mas_trial_iia_b_to_a": "MAS IIA\nB→A",
}


@dataclass
class Comparison:
    name: str                         # row label and run-directory name
    models: list[str]                 # [A, B]: shipped task-model names or checkpoint directories
    site: str                         # embeddings | hidden (the same site in both models)
    mas_preset: str                   # MAS preset YAML: its settings; models, sites and name come from here
    mas_overrides: list[str] = field(default_factory=list)   # extra key=value for the MAS config

    def validate(self) -> list[str]:
        p = []
        if len(self.models) != 2:
            p.append(f"comparison {self.name!r}: models must list two models, got {self.models}")
        if not preset_path(self.mas_preset).exists():
            p.append(f"comparison {self.name!r}: mas_preset {self.mas_preset!r} does not exist "
                     f"(relative paths are tried from the working directory and from {REPO})")
        return p


@dataclass
class SimilaritySettings:
    n_rows: int = 1000                # rows per subsample
    n_repeats: int = 10               # subsamples
    per_quantity: int = 15            # sequences per quantity N = 1..20


@dataclass
class RecipeConfig:
    comparisons: list[Comparison]
    name: str = "correlative_vs_causal"
    out_dir: str = "runs"
    seed: int = 0
    device: str = "cpu"
    similarity: SimilaritySettings = field(default_factory=SimilaritySettings)
    reuse_dirs: list[str] = field(default_factory=lambda: ["runs"])  # finished MAS runs under these are reused

    def validate(self) -> list[str]:
        p = [] if self.comparisons else ["comparisons: list at least one comparison"]
        names = [c.name for c in self.comparisons]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            p.append(f"comparison names must be unique; repeated: {', '.join(dupes)}")
        return p


# ================================================================================== the two halves
def similarity_for(comparison: Comparison, config: RecipeConfig, run_dir: Path, smoke: bool, log) -> dict:
    """RSA/CKA of the comparison's two models (reused from run_dir/similarity/<name> when identical)."""
    settings = SMOKE_SIMILARITY if smoke else vars(config.similarity)
    cfg = similarity_config(
        name=comparison.name, out_dir=str(run_dir / "similarity"), seed=config.seed, device=config.device,
        models=[{"name": m, "site": comparison.site} for m in comparison.models],
        n_rows=settings["n_rows"], n_repeats=settings["n_repeats"],
        sequences={"per_quantity": settings["per_quantity"]})
    done = Path(cfg.out_dir) / cfg.name
    if (done / "similarity.json").exists() and same_config(done, cfg, SIMILARITY_IGNORED_KEYS):
        log(f"  similarity: reusing {done}")
        return json.loads((done / "similarity.json").read_text())
    return run_similarity(cfg, log=lambda msg: log("  " + msg))


def mas_plan(comparison: Comparison, run_dir: Path, smoke: bool, device: str) -> PlannedRun:
    """MAS between the comparison's models at its site, with its preset's settings (both cross directions)."""
    base = mas_config_from_preset(comparison.mas_preset, [*comparison.mas_overrides,
                                                          *(SMOKE_MAS_OVERRIDES if smoke else ())])
    models = to_dict(base.models)
    if len(models) != 2:
        raise ConfigError(f"MAS preset {comparison.mas_preset} has {len(models)} models; comparisons need "
                          f"two-model presets")
    for entry, name in zip(models, comparison.models):
        entry.update(name=name, site=comparison.site)
    cfg = mas_config_from_preset(comparison.mas_preset, [*comparison.mas_overrides,
                                                         *(SMOKE_MAS_OVERRIDES if smoke else ())],
                                 models=models, name=comparison.name, out_dir=str(run_dir / "mas"),
                                 device=device, progress=not smoke and sys.stdout.isatty())
    return PlannedRun(cfg, rows=[({"direction": "a_to_b"}, 0, 1), ({"direction": "b_to_a"}, 1, 0)])


# ================================================================================== outputs
def table_rows(config: RecipeConfig, similarities: dict, outcomes: dict) -> list[dict]:
    """One row per comparison: the six correlative measures (mean, std) and MAS trial IIA per direction."""
    rows = []
    for comp in config.comparisons:
        row = {"comparison": comp.name, "site": comp.site, "model_a": comp.models[0], "model_b": comp.models[1]}
        sim = similarities.get(comp.name)
        if sim is not None:
            row.update(flatten_metrics(sim["pairs"][0]["metrics"]), n_rows_total=sim["n_rows_total"])
        outcome = outcomes.get(comp.name)
        if outcome is not None and outcome.result is not None:
            for key, value in mas_direction_summary(outcome.result.records).items():
                row[f"mas_trial_iia_{key}"] = value
            for key, s, t in (("a_to_b", 0, 1), ("b_to_a", 1, 0)):
                d = direction_row(outcome, s, t)
                row[f"mas_trial_iia_{key}_lo"], row[f"mas_trial_iia_{key}_hi"] = d["trial_iia_lo"], d["trial_iia_hi"]
                row[f"mas_token_iia_{key}"] = d["token_iia"]
            info = outcome.info or {}
            row.update(mas_best_step=info.get("best_step"), mas_steps=info.get("steps"),
                       mas_stopped=info.get("stopped"), mas_seconds=info.get("seconds"))
        else:
            row.update({key: math.nan for key in CAUSAL})
        row.update(mas_status=outcome.status if outcome else "pending",
                   mas_run_dir=str(outcome.run_dir) if outcome and outcome.run_dir else
                   (outcome.message if outcome and outcome.message else "pending"))
        rows.append(row)
    return rows


def _short(model: str) -> str:
    """``multiobject-gru-s0`` -> ``gru-s0`` (directory paths: their last part)."""
    return Path(model).name.split("-", 1)[-1]


def plot_heat_table(rows: list[dict], path: Path, title: str) -> None:
    """Rows = comparisons, columns = correlative measures | MAS trial IIA; colour 0..1, values written in."""
    columns = [*CORRELATIVE, *CAUSAL]
    values = np.array([[float(r[c]) if isinstance(r.get(c), (int, float)) else math.nan for c in columns]
                       for r in rows])  # (n_comparisons, n_columns)
    fig = Figure(figsize=(1.0 * len(columns) + 2.6, 0.55 * len(rows) + 1.8))  # object API: no pyplot state
    ax = fig.subplots()
    cmap = matplotlib.colormaps["viridis"].copy()
    cmap.set_bad("0.88")  # not computed yet (pending / blocked): light grey
    ax.imshow(np.ma.masked_invalid(np.clip(values, 0, 1)), vmin=0, vmax=1, cmap=cmap, aspect="auto")
    ax.set_xticks(range(len(columns)), [LABELS[c] for c in columns], fontsize=8)
    status = {"pending": " (MAS pending)", "blocked": " (blocked)", "failed": " (MAS failed)"}
    labels = [f"{r['comparison']}: {_short(r['model_a'])} vs {_short(r['model_b'])}"
              + status.get(r.get("mas_status"), "") for r in rows]
    ax.set_yticks(range(len(rows)), labels, fontsize=9)
    ax.xaxis.tick_top()
    for (i, j), v in np.ndenumerate(values):
        ax.text(j, i, "–" if np.isnan(v) else f"{v:.2f}", ha="center", va="center", fontsize=8,
                color="w" if not np.isnan(v) and v <= 0.6 else "k")
    ax.axvline(len(CORRELATIVE) - 0.5, color="w", linewidth=3)  # correlative | causal
    ax.set_title(title, fontsize=10, pad=34)
    ax.set_xlabel("RSA/CKA: mean over row subsamples. MAS: validation trial IIA, A = first model, B = second",
                  fontsize=8)
    fig.savefig(path, dpi=130, bbox_inches="tight")


def claims(rows: list[dict]) -> list[Claim]:
    """The paper's two contrasts between correlative and causal similarity, judged on every matching row:
    GRU–GRU at the embeddings (RSA low, MAS high) and GRU–Transformer at the hidden state (CKA/RSA high,
    MAS low)."""
    out = []
    for row in rows:
        pair = f"{row['comparison']} ({_short(row['model_a'])} vs {_short(row['model_b'])})"
        iia = row.get("mas_trial_iia_cross_mean")
        if row["comparison"].startswith("gru_gru") and row["site"] == "embeddings":
            rsa = [row.get("rsa_cosine_spearman"), row.get("rsa_euclidean_spearman")]
            holds = (max(rsa) < LOW_SIMILARITY and iia >= HIGH_IIA) if all_known(*rsa, iia) else None
            out.append(Claim(f"{pair}: RSA is low although MAS IIA is high", holds,
                             f"RSA Spearman cos {fmt(rsa[0])}, L2 {fmt(rsa[1])} (Pearson cos "
                             f"{fmt(row.get('rsa_cosine_pearson'))}, L2 {fmt(row.get('rsa_euclidean_pearson'))}); "
                             f"MAS cross IIA {fmt(iia)}."))
        if row["comparison"].startswith("gru_transformer") and row["site"] == "hidden":
            corr = [row.get("cka_biased"), row.get("cka_unbiased"), row.get("rsa_cosine_spearman"),
                    row.get("rsa_euclidean_spearman")]
            holds = (min(corr) >= HIGH_SIMILARITY and iia < LOW_IIA) if all_known(*corr, iia) else None
            out.append(Claim(f"{pair}: CKA/RSA look high while MAS IIA is low", holds,
                             f"CKA biased {fmt(corr[0])}, unbiased {fmt(corr[1])}; RSA Spearman cos "
                             f"{fmt(corr[2])}, L2 {fmt(corr[3])}; MAS cross IIA {fmt(iia)}."))
    return out


def write_outputs(config: RecipeConfig, run_dir: Path, similarities: dict, outcomes: dict, command: str,
                  smoke: bool, seconds: float) -> list[dict]:
    rows = table_rows(config, similarities, outcomes)
    write_csv(rows, run_dir / "comparison.csv")
    plot_heat_table(rows, run_dir / "comparison.png", f"Correlative (RSA, CKA) vs causal (MAS) — {run_dir.name}")
    columns = ["comparison", *CORRELATIVE, *CAUSAL, "mas_status"]
    sections = ([SMOKE_NOTE] if smoke else []) + [
        f"{seconds:.0f} s this call. RSA/CKA: mean over row subsamples of the same 300 sequences' non-pad "
        "positions in both models; MAS: validation trial IIA of the best checkpoint, A = first model, "
        "B = second, mean = mean of the two cross directions.",
        markdown_table(rows, columns),
        *([early] if (early := early_stop_note(rows, run_key="comparison", stopped_key="mas_stopped",
                                               best_key="mas_best_step", steps_key="mas_steps")) else []),
        f"Verdict thresholds: similarity low < {LOW_SIMILARITY}, high ≥ {HIGH_SIMILARITY}; "
        f"IIA low < {LOW_IIA}, high ≥ {HIGH_IIA}.",
    ]
    write_summary(run_dir / "summary.md", "Correlative vs causal similarity", command, sections, claims(rows))
    return rows


# ================================================================================== main
def main(argv: list[str] | None = None) -> int:
    """Command line (module docstring) through ``recipes.common.cli.recipe_front_door``. Exit 0: tables
    written; 2: configuration error."""
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--skip-missing", action="store_true",
                            help="skip comparisons whose models are not available yet (default: an error)")
        parser.add_argument("--models-from-scratch", action="store_true",
                            help="(tests) random-weight checkpoints instead of the named models")

    torch.set_num_threads(1)  # small task models: more threads only add overhead
    return recipe_front_door(argv, name="correlative_vs_causal", doc=__doc__, config_cls=RecipeConfig, run=_run,
                             add_arguments=add_arguments, smoke_help="tiny settings (seconds), run dir <name>-smoke")


def _run(call: RecipeInvocation) -> int:
    config, run_dir, smoke, only = call.config, call.run_dir, call.smoke, call.only
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    unknown = [s for s in only if s not in {c.name for c in config.comparisons}]
    if unknown:
        raise ConfigError(f"--only: unknown comparisons {unknown}; valid: "
                          f"{', '.join(c.name for c in config.comparisons)}")
    names = [m for c in config.comparisons for m in c.models]
    missing = [] if call.args.models_from_scratch or not call.args.skip_missing else missing_models(names)
    mapping = resolve_models([n for n in names if n not in missing],
                             run_dir / "scratch_models" if call.args.models_from_scratch else None)
    plans, similarities = [], {}
    for i, comp in enumerate(config.comparisons, 1):
        absent = [m for m in comp.models if m in missing]
        comp.models = [mapping.get(m, m) for m in comp.models]
        plans.append(mas_plan(comp, run_dir, smoke, config.device))
        if absent:
            plans[-1].blocked = f"task models not available yet: {', '.join(absent)}"
            log(f"[{i}/{len(config.comparisons)}] {comp.name}: skipped — {plans[-1].blocked}")
            continue
        log(f"[{i}/{len(config.comparisons)}] {comp.name}: {' vs '.join(Path(m).name for m in comp.models)} "
            f"at {comp.site} — RSA/CKA ({time.perf_counter() - call.started:.0f}s)")
        similarities[comp.name] = similarity_for(comp, config, run_dir, smoke, log)

    def after_each(outcomes):  # partial results on disk after every MAS run
        write_outputs(config, run_dir, similarities, outcomes, call.command, smoke,
                      time.perf_counter() - call.started)

    log(f"MAS runs ({time.perf_counter() - call.started:.0f}s)")
    outcomes = execute_plan(plans, config.reuse_dirs, log=log, after_each=after_each,
                            selected=lambda plan: not call.report and (not only or plan.name in only))
    rows = write_outputs(config, run_dir, similarities, outcomes, call.command, smoke,
                         time.perf_counter() - call.started)
    for row in rows:
        log(f"{row['comparison']:<28} " + " ".join(f"{k.replace('mas_trial_iia_', 'iia_')}={fmt(row.get(k), 2)}"
                                                     for k in (*CORRELATIVE, *CAUSAL)))
    log(f"wrote {run_dir}/comparison.csv, comparison.png, summary.md ({time.perf_counter() - call.started:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
