"""Statistics and the written report of the toxicity case study (docs/method.md).

Input: an n×n IIA matrix per metric (rows = source model, columns = target model) between fine-tunes that
carry a group label (``toxic`` / ``nontoxic``). Output: per-group means with bootstrap CIs, permutation
tests over *model labels*, a markdown report, plots::

    from recipes.toxicity.report import analyze_iia, label_permutation_test, report_markdown, plot_report
    groups = ["toxic"] * 3 + ["nontoxic"] * 3
    analysis = analyze_iia({"token_iia": token, "trial_iia": trial}, names, groups)   # JSON-ready dict
    Path("report.md").write_text(report_markdown(analysis, command="python -m recipes.toxicity.run"))
    plot_report(analysis, "run_dir/")

Contrasts (what is compared)
----------------------------
- ``source_fixed`` for group g: mean IIA of g→g directions − mean IIA of g→(other groups). Both sides have
  a source from g. The source model defines the behaviour to reproduce (its greedy predictions are the
  labels), so rows of an IIA matrix differ a lot; pooling both orders ("g↔g vs g↔others") would let a
  source main effect ("toxic models are easy sources") pass for similarity. What remains is the target
  effect plus the group interaction.
- ``interaction``: mean of the within-group means (g→g) − mean of the between-group means (g→h, g ≠ h). For
  additive source and target effects (IIA[s, t] = a_s + b_t) it is exactly 0, so it measures "models of the
  same group align better than models of different groups" beyond "some models are easier sources or
  targets".

Why the model label is the unit of permutation
----------------------------------------------
The n(n−1) off-diagonal directions of one MAS run are not independent observations: every direction s→t
shares the source's and the target's fine-tune (and, in a joint run, their alignments) with 2(n−2) other
directions. A permutation test that shuffles single directions assumes they are exchangeable one by one and
understates the p-value. What *is* exchangeable under the null "the toxic/nontoxic label says nothing about
how well models align" is the assignment of labels to models: ``label_permutation_test`` keeps the whole
matrix fixed (its dependence structure included), relabels the models in every way that keeps the group
sizes, and recomputes the contrast. With 3 + 3 models there are C(6, 3) = 20 labellings: a one-sided
p-value can never go below 1/20 = 0.05, a two-sided one never below 0.1, and the interaction contrast,
which is the same for a labelling and its mirror image, never below 0.1 one-sided. The design, not the
analysis, limits the evidence; the report gives that floor (``min_p``) next to every p-value.

Group means use ``llm_mas.stats.group_means`` (off-diagonal cells only); their bootstrap CIs resample
directions, so they describe the spread of the matrix's cells, not the uncertainty over fine-tunes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from llm_mas.errors import ConfigError, DataError, choice_error
from llm_mas.stats import (
    CONTRASTS,
    _codes,
    _square,
    contrast,
    count_labelings,
    group_means,
    label_permutation_test,
    labelings,
    permutation_test,
)

METRICS = ("token_iia", "trial_iia")
METRIC_TITLES = {"token_iia": "token IIA", "trial_iia": "trial IIA"}
# (contrast, group, alternative). The paper's claims: toxic→toxic IIA > toxic→nontoxic IIA; nontoxic→nontoxic
# shows no difference from nontoxic→toxic (tested two-sided); and, beyond main effects, same-group similarity.
DEFAULT_TESTS = (("source_fixed", "toxic", "greater"), ("source_fixed", "nontoxic", "two-sided"),
                 ("interaction", None, "greater"))



def direction_level_test(matrix: Any, groups: Sequence[str], group: str | None = None, *,
                         versus: str | None = None, contrast_kind: str = "source_fixed",
                         alternative: str = "greater", n_perm: int = 10_000, seed: int = 0) -> dict[str, Any]:
    """The same comparison with single *directions* as the unit (``llm_mas.stats.permutation_test`` on the
    plus-side cells against the minus-side cells; for ``interaction`` all within- against all between-group
    cells). Invalid as evidence — directions that share a model are not exchangeable one by one — and
    reported only to show how much smaller its p-value comes out."""
    array = _square(matrix, len(groups))
    if versus is not None:  # the models of the two groups only, as label_permutation_test
        used = [i for i, g in enumerate(groups) if g in (group, versus)]
        array, groups = array[np.ix_(used, used)], [groups[i] for i in used]
    labels, codes = _codes(groups)
    n = len(groups)
    off = ~np.eye(n, dtype=bool)
    if contrast_kind == "within":
        for name, value in (("group", group), ("versus", versus)):
            if value not in labels:
                raise choice_error(name, value, labels)
        g_in, h_in = codes == labels.index(group), codes == labels.index(versus)
        plus, minus = g_in[:, None] & g_in[None, :] & off, h_in[:, None] & h_in[None, :] & off
    elif contrast_kind == "source_fixed":
        if group not in labels:
            raise choice_error("group", group, labels)
        inside = codes == labels.index(group)
        plus, minus = inside[:, None] & inside[None, :] & off, inside[:, None] & ~inside[None, :]
    elif contrast_kind == "interaction":
        same = codes[:, None] == codes[None, :]
        plus, minus = same & off, ~same
    else:
        raise choice_error("contrast", contrast_kind, CONTRASTS)
    result = permutation_test(array[plus], array[minus], n_perm=n_perm, alternative=alternative, seed=seed)
    return {**result, "n_plus": int(plus.sum()), "n_minus": int(minus.sum())}


# ------------------------------------------------------------------------------------ analysis
def analyze_iia(matrices: Mapping[str, Any], names: Sequence[str], groups: Sequence[str], *,
                tests: Sequence[tuple[str, str | None, str]] = DEFAULT_TESTS, n_boot: int = 2000,
                level: float = 0.95, seed: int = 0, n_perm: int = 10_000, alpha: float = 0.05) -> dict[str, Any]:
    """Group means (off-diagonal, ordered source→target, bootstrap CIs over directions) and label permutation
    tests for every metric; a JSON-ready dict that ``report_markdown`` and ``plot_report`` read.

    matrices: ``{metric: (n, n)}``, e.g. ``{"token_iia": ..., "trial_iia": ...}``.
    tests:    ``(contrast, group, alternative)`` or ``(contrast, group, versus, alternative)`` tuples
              (``DEFAULT_TESTS``: the paper's two claims and the interaction; ``label_permutation_test``
              says what ``versus`` does).
    """
    names, groups = list(names), list(groups)
    if len(names) != len(groups):
        raise DataError(f"{len(names)} model names but {len(groups)} group labels; give one label per model")
    if not matrices:
        raise DataError("no matrices to analyse; pass e.g. {'token_iia': matrix}")
    if not 0 < alpha < 1:
        raise ConfigError(f"alpha={alpha!r} must lie in (0, 1), e.g. 0.05")
    labels = list(dict.fromkeys(groups))
    pair_order = [(g, h) for g in labels for h in [g, *[x for x in labels if x != g]]]
    out: dict[str, Any] = {"models": names, "groups": groups, "alpha": alpha, "level": level, "n_boot": n_boot,
                           "seed": seed, "metrics": {}}
    for metric, matrix in matrices.items():
        array = _square(matrix, len(names), metric)
        means = group_means(array, groups, include_diagonal=False, ordered=True, n_boot=n_boot, level=level,
                            seed=seed)
        off = array[~np.eye(len(names), dtype=bool)]
        diagonal = np.diag(array)
        entry: dict[str, Any] = {
            "matrix": [[float(v) if np.isfinite(v) else None for v in row] for row in array],
            "diagonal_mean": float(np.nanmean(diagonal)) if np.isfinite(diagonal).any() else None,
            "off_diagonal_range": [float(off.min()), float(off.max())],
            "group_means": [{"source_group": g, "target_group": h, "label": f"{g}→{h}",
                             "mean": means[(g, h)]["mean"], "lo": means[(g, h)]["lo"], "hi": means[(g, h)]["hi"],
                             "n": means[(g, h)]["n"], "cells": [list(c) for c in means[(g, h)]["cells"]]}
                            for g, h in pair_order],
            "tests": [],
        }
        for spec in tests:
            kind, group, versus, alternative = spec if len(spec) == 4 else (spec[0], spec[1], None, spec[2])
            test = label_permutation_test(array, groups, group, versus=versus, contrast_kind=kind,
                                          alternative=alternative, n_perm=n_perm, seed=seed)
            test["direction_level"] = direction_level_test(array, groups, group, versus=versus,
                                                           contrast_kind=kind, alternative=alternative,
                                                           n_perm=n_perm, seed=seed)
            entry["tests"].append(test)
        out["metrics"][metric] = entry
    return out


# ------------------------------------------------------------------------------------ wording
def _p(value: float) -> str:
    return f"{value:.3g}"


def null_hypothesis(test: Mapping[str, Any], groups: Sequence[str]) -> str:
    """The exact null, the unit of permutation and the statistic of one label test, in words."""
    used = [groups[i] for i in test.get("models", range(len(groups)))]
    sizes = ", ".join(f"{used.count(g)} {g}" for g in dict.fromkeys(used))
    how = (f"all {test['n_labelings']} relabellings" if test["exact"]
           else f"{test['n_labelings']} random relabellings")
    aside = (f" (only the {test['group']} and {test['versus']} models: the others are set aside)"
             if test.get("versus") else "")
    if test["contrast"] == "within":
        g, h = test["group"], test["versus"]
        statistic = f"mean IIA of the directions {g}→{g} − mean IIA of the directions {h}→{h}"
    elif test["contrast"] == "source_fixed":
        g = test["group"]
        into = f"into the {test['versus']} models" if test.get("versus") else "into the other models"
        statistic = (f"mean IIA of the directions {g}→{g} − mean IIA of the directions from {g} {into} (the "
                     f"source group is the same on both sides)")
    else:
        statistic = ("mean of the within-group means (g→g) − mean of the between-group means (g→h); exactly 0 "
                     "when IIA is a source effect plus a target effect")
    return (f"H0: the labels are exchangeable among the {len(used)} models ({sizes}){aside}: the IIA matrix is as "
            f"likely under any relabelling that keeps the group sizes. Unit of permutation: the model label (the "
            f"matrix, with the dependence between directions that share a model, stays fixed). Statistic: "
            f"{statistic}; null distribution over {how}.")


def conclusions(analysis: Mapping[str, Any], metric: str = "token_iia") -> list[str]:
    """Plain-language reading of the tests of one metric; every sentence says what the data can and cannot
    show (the smallest attainable p, one run, these fine-tunes only)."""
    entry = analysis["metrics"][metric]
    alpha = analysis["alpha"]
    title = METRIC_TITLES.get(metric, metric)
    lines = []
    low, high = entry["off_diagonal_range"]
    if high - low < 1e-3:
        lines.append(f"Every direction has the same {title} ({low:.3f}): there is no spread to compare, so the "
                     f"tests below cannot say anything.")
    for test in entry["tests"]:
        name, p = test["name"], test["p_value"]
        diff = f"{test['plus_mean']:.3f} vs {test['minus_mean']:.3f} (difference {test['statistic']:+.3f})"
        limit = f"the smallest p-value this design can give is {_p(test['min_p'])}"
        if test["min_p"] > alpha:
            lines.append(f"{name} ({test['alternative']}): {diff}, p = {_p(p)}. This test cannot reject at "
                         f"α = {alpha} whatever the data ({limit}); a non-significant result is no evidence of "
                         f"'no difference' — more fine-tunes per group are needed for that.")
        elif p <= alpha:
            where = "higher" if test["statistic"] > 0 else "lower"
            floor = (" No other labelling of the models gives a more extreme contrast, so p sits at the design's "
                     "floor: modest evidence on its own." if math.isclose(p, test["min_p"]) else "")
            lines.append(f"{name}: the first is {where} in {title}, {diff}, p = {_p(p)} ({test['alternative']}; "
                         f"{limit}).{floor} This holds for these fine-tunes, this base model and this one MAS run, "
                         f"not for fine-tunes in general.")
        else:
            lines.append(f"{name}: no evidence of a difference in the direction tested ({test['alternative']}): "
                         f"{diff}, p = {_p(p)} > α = {alpha} ({limit}). Not rejecting is not showing equality.")
    kinds = {t["contrast"] for t in entry["tests"]}
    if "source_fixed" in kinds:
        g, h = analysis["groups"][0], next(x for x in analysis["groups"] if x != analysis["groups"][0])
        lines.append(f"Reading the source-fixed tests together: '{g} targets are easier to steer from any source' "
                     f"(a target effect) also makes {g}→{g} exceed {g}→{h}, but then {h}→{g} exceeds {h}→{h} "
                     f"too; the within/between interaction removes such additive source and target effects.")
    return lines


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{value:.{digits}f}"


def _matrix_table(entry: Mapping[str, Any], names: Sequence[str]) -> str:
    lines = ["| source \\ target | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 1)]
    for name, row in zip(names, entry["matrix"], strict=True):
        lines.append(f"| **{name}** | " + " | ".join(_fmt(v) for v in row) + " |")
    return "\n".join(lines)


def report_markdown(analysis: Mapping[str, Any], *, title: str = "Toxicity case study: MAS between fine-tunes",
                    command: str = "", notes: Sequence[str] = (), setup: str = "", primary: str = "token_iia",
                    plots: Mapping[str, str] | None = None) -> str:
    """The report: banner notes (e.g. smoke), setup, matrices, group means, label permutation tests (null,
    unit, p-values, the smallest attainable p), direction-level tests for contrast, conclusions, caveats.

    plots: ``{caption: relative path}`` images to link (from ``plot_report``).
    """
    names, groups = analysis["models"], analysis["groups"]
    metrics = list(analysis["metrics"])
    if primary not in analysis["metrics"]:
        raise choice_error("primary metric", primary, metrics)
    level = int(round(100 * analysis["level"]))
    title_of = METRIC_TITLES.get
    out = [f"# {title}", ""]
    if command:
        out += [f"`{command}`", ""]
    out += [f"> {note}" for note in notes] + ([""] if notes else [])
    if setup:
        out += [setup, ""]
    out += ["## IIA matrices", "",
            "Rows = source model, columns = target model; validation pairs. **Token IIA** (the paper's measure): "
            "fraction of scored tokens where the intervened target's argmax equals the source model's greedy "
            "prediction (teacher forced, positions ≥ i). **Trial IIA**: fraction of pairs with every scored "
            "token right. The diagonal (a model with itself) is not used in the group means or tests.", ""]
    for metric in metrics:
        out += [f"### {title_of(metric, metric)}" + (" (primary)" if metric == primary else ""), "",
                _matrix_table(analysis["metrics"][metric], names), ""]
    for caption, path in (plots or {}).items():
        out += [f"![{caption}]({path})", ""]

    out += ["## Group means (off-diagonal directions)", "",
            f"Mean over the directions of each (source group → target group) with a {level}% percentile "
            "bootstrap CI over those directions. The CI treats directions as independent draws; they share "
            "models (and alignments), so read it as the spread of the matrix, not as uncertainty about other "
            "fine-tunes.", "",
            "| source → target | directions | " + " | ".join(f"{title_of(m, m)} [{level}% CI]" for m in metrics)
            + " |", "|---|---|" + "---|" * len(metrics)]
    for i, row in enumerate(analysis["metrics"][metrics[0]]["group_means"]):
        cells = []
        for metric in metrics:
            g = analysis["metrics"][metric]["group_means"][i]
            cells.append(f"{_fmt(g['mean'])} [{_fmt(g['lo'])}, {_fmt(g['hi'])}]")
        out.append(f"| {row['label']} | {row['n']} | " + " | ".join(cells) + " |")
    diagonal = ", ".join(f"{title_of(m, m)} {_fmt(analysis['metrics'][m]['diagonal_mean'])}" for m in metrics)
    out += ["", f"Within-model directions (the diagonal, each model with itself): mean {diagonal}.", ""]

    out += ["## Permutation tests over model labels", ""]
    for test in analysis["metrics"][primary]["tests"]:
        out.append(f"- **{test['name']}** ({test['alternative']}). {null_hypothesis(test, groups)}")
    out += ["",
            "| test | metric | first | second | statistic | p | smallest attainable p | labellings |",
            "|---|---|---|---|---|---|---|---|"]
    for metric in metrics:
        for test in analysis["metrics"][metric]["tests"]:
            out.append(f"| {test['name']} ({test['alternative']}) | {title_of(metric, metric)} | "
                       f"{_fmt(test['plus_mean'])} | {_fmt(test['minus_mean'])} | {test['statistic']:+.3f} | "
                       f"{_p(test['p_value'])} | {_p(test['min_p'])} | {test['n_labelings']}"
                       f"{'' if test['exact'] else ' (random)'} |")
    out += ["", "Token IIA is the primary measure (the paper's); trial IIA is secondary. The tests are not "
            "corrected for multiplicity; read the secondary rows as descriptive.", "",
            "For contrast only — the same comparisons with single *directions* as the unit (invalid: directions "
            "that share a model are not exchangeable, so these p-values come out too small):", ""]
    for metric in metrics:
        for test in analysis["metrics"][metric]["tests"]:
            d = test["direction_level"]
            out.append(f"- {test['name']}, {title_of(metric, metric)}: p = {_p(d['p_value'])} ({d['n_plus']} vs "
                       f"{d['n_minus']} directions, {'exact' if d['exact'] else str(d['n_perm']) + ' random splits'})")
    out += ["", "## Conclusions", ""]
    out += [f"- {line}" for line in conclusions(analysis, primary)]
    for metric in metrics:
        if metric != primary:
            out += [f"- Secondary ({title_of(metric, metric)}): " + " ".join(conclusions(analysis, metric)[:-1])]
    out += ["", "## What this does not show", "",
            "- One fine-tune per (group, split) and one MAS run: the variation between fine-tuning seeds and MAS "
            "seeds is not measured; the label test treats the models as given.",
            "- IIA says whether one model's behaviour can be transferred into another through a shared "
            "k-dimensional aligned subspace at one site; a difference between groups says the fine-tunes differ "
            "in that respect, not *how* they represent toxicity.",
            "- The result is specific to this base model, these data and these MAS settings (site, k, steps)."]
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------------------------ plots
def plot_report(analysis: Mapping[str, Any], out_dir: str | Path) -> dict[str, str]:
    """Write ``iia_matrices.png`` (heat maps with group borders), ``group_means.png`` (bars with CIs) and
    ``label_permutation.png`` (each test's null distribution with the observed statistic) into `out_dir`.
    Returns ``{caption: file name}``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names, groups = analysis["models"], analysis["groups"]
    metrics = list(analysis["metrics"])
    n = len(names)
    boundaries = [i - 0.5 for i in range(1, n) if groups[i] != groups[i - 1]]

    fig = Figure(figsize=(1.0 + 5.0 * len(metrics), 4.2))  # object API: no pyplot state, no backend switch
    axes = fig.subplots(1, len(metrics), squeeze=False)
    fig.subplots_adjust(wspace=0.45)
    for ax, metric in zip(axes[0], metrics, strict=True):
        m = np.array([[np.nan if v is None else v for v in row] for row in analysis["metrics"][metric]["matrix"]])
        image = ax.imshow(m, vmin=0, vmax=1, cmap="viridis")
        for (i, j), v in np.ndenumerate(m):
            if np.isfinite(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="w" if v < 0.6 else "k")
        for b in boundaries:
            ax.axhline(b, color="r", lw=1.5)
            ax.axvline(b, color="r", lw=1.5)
        ax.set_xticks(range(n), names, rotation=35, ha="right", fontsize=7)
        ax.set_yticks(range(n), names, fontsize=7)
        ax.set_xlabel("target")
        ax.set_ylabel("source")
        ax.set_title(METRIC_TITLES.get(metric, metric), fontsize=9)
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8)
    fig.savefig(out / "iia_matrices.png", dpi=130, bbox_inches="tight")

    fig = Figure(figsize=(6.5, 3.8))
    ax = fig.subplots()
    labels = [g["label"] for g in analysis["metrics"][metrics[0]]["group_means"]]
    x = np.arange(len(labels))
    width = 0.8 / len(metrics)
    for k, metric in enumerate(metrics):
        rows = analysis["metrics"][metric]["group_means"]
        y = np.array([r["mean"] for r in rows], dtype=float)
        err = np.array([[r["mean"] - r["lo"] for r in rows], [r["hi"] - r["mean"] for r in rows]], dtype=float)
        ax.bar(x - 0.4 + width * (k + 0.5), np.nan_to_num(y), width, yerr=np.nan_to_num(err), capsize=3,
               label=METRIC_TITLES.get(metric, metric))
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel(f"mean IIA ({int(round(100 * analysis['level']))}% CI over directions)")
    ax.set_title("group means, off-diagonal directions (source group → target group)", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.savefig(out / "group_means.png", dpi=130, bbox_inches="tight")

    tests = [(metric, t) for metric in metrics for t in analysis["metrics"][metric]["tests"]]
    columns = max(1, len(analysis["metrics"][metrics[0]]["tests"]))
    rows_n = math.ceil(len(tests) / columns)
    fig = Figure(figsize=(3.6 * columns, 2.9 * rows_n))
    axes = fig.subplots(rows_n, columns, squeeze=False)
    for ax, (metric, test) in zip(axes.flat, tests, strict=False):
        null = np.array(test["null"])
        ax.hist(null, bins=min(30, max(5, len(null) // 2)), color="0.6")
        ax.axvline(test["statistic"], color="r", lw=2, label=f"observed, p = {_p(test['p_value'])}")
        ax.set_title(f"{test['name']}\n{METRIC_TITLES.get(metric, metric)}, {test['alternative']}", fontsize=7)
        ax.set_xlabel("contrast under each labelling", fontsize=7)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(tests):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out / "label_permutation.png", dpi=130, bbox_inches="tight")
    return {"IIA matrices": "iia_matrices.png", "group means": "group_means.png",
            "label permutation null distributions": "label_permutation.png"}


__all__ = ["CONTRASTS", "DEFAULT_TESTS", "METRICS", "analyze_iia", "conclusions", "contrast", "count_labelings",
           "direction_level_test", "label_permutation_test", "labelings", "null_hypothesis", "plot_report",
           "report_markdown"]
