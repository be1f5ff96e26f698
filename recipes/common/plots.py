"""IIA charts of the comparison recipes. Figures are built with matplotlib's object API (``Figure``, saved
through its Agg canvas): no pyplot state and no backend switch, so importing or calling these changes
nothing global."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure


def _iia_with_ci(rows: Sequence[dict]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(trial IIA, CI low, CI high), each (len(rows),), NaN where a row has no value yet."""
    return tuple(np.array([r.get(key, np.nan) for r in rows], dtype=float)
                 for key in ("trial_iia", "trial_iia_lo", "trial_iia_hi"))


def plot_lines(series: dict[str, tuple[Sequence[float], Sequence[dict]]], path: str | Path, title: str,
               xlabel: str, log2_x: bool = True) -> None:
    """IIA against a numeric x (e.g. k): one line per series ``{label: (xs, rows)}`` with CI bands."""
    fig = Figure(figsize=(7.5, 4.5))
    ax = fig.subplots()
    for label, (xs, rows) in series.items():
        y, lo, hi = _iia_with_ci(rows)
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


def plot_grouped_bars(groups: Sequence[str], bars: dict[str, Sequence[dict]], path: str | Path,
                      title: str) -> None:
    """Grouped bars of trial IIA with CI whiskers: x = `groups`, one bar per ``{label: rows}`` in a group."""
    n = max(len(bars), 1)
    width = 0.8 / n
    fig = Figure(figsize=(max(6.0, 1.1 * len(groups) * max(1, n / 2) + 2), 4.5))
    ax = fig.subplots()
    x = np.arange(len(groups))
    for i, (label, rows) in enumerate(bars.items()):
        y, lo, hi = _iia_with_ci(rows)
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
