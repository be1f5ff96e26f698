"""Many-model similarity matrices: an order from hierarchical clustering, and heat maps in that order with the
dendrogram (matplotlib's object API; no backend or pyplot state is touched).

    order, linkage = cluster_order(iia)                 # average linkage on 1 − (S + Sᵀ)/2
    plot_clustered_matrices({"MAS trial IIA": iia, "linear CKA": cka, "GPA": gpa}, names, "fig.png")
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from scipy.cluster.hierarchy import dendrogram, linkage, optimal_leaf_ordering
from scipy.spatial.distance import squareform

from llm_mas.errors import DataError


def similarity_distance(matrix: np.ndarray) -> np.ndarray:
    """(n, n) distances 1 − (S + Sᵀ)/2 with a zero diagonal (S: a similarity, e.g. an IIA matrix whose
    entry [s, t] is the IIA of direction s → t; the two directions of a pair are averaged)."""
    s = np.asarray(matrix, dtype=float)
    if s.ndim != 2 or s.shape[0] != s.shape[1]:
        raise DataError(f"a similarity matrix must be square, got shape {s.shape}")
    symmetric = (s + s.T) / 2.0
    off = ~np.eye(s.shape[0], dtype=bool)
    if np.isnan(symmetric[off]).any():
        i, j = np.argwhere(np.isnan(symmetric) & off)[0]
        raise DataError(f"similarity [{i}, {j}] is NaN (a direction not evaluated?); cluster finished matrices only")
    distance = 1.0 - symmetric
    np.fill_diagonal(distance, 0.0)
    return np.clip(distance, 0.0, None)


def cluster_order(matrix: np.ndarray) -> tuple[list[int], np.ndarray]:
    """Leaf order and scipy linkage of average-linkage (UPGMA) clustering on 1 − symmetrized similarity.

    Leaves are put in the optimal order (neighbouring leaves most similar; scipy's
    ``optimal_leaf_ordering``), so the order depends only on the matrix. n = 1: ``[0]`` and an empty linkage.
    """
    distance = similarity_distance(matrix)
    n = distance.shape[0]
    if n < 2:
        return list(range(n)), np.zeros((0, 4))
    condensed = squareform(distance, checks=False)  # (n(n-1)/2,)
    tree = linkage(condensed, method="average")
    if n > 2:
        tree = optimal_leaf_ordering(tree, condensed)
    return [int(i) for i in dendrogram(tree, no_plot=True)["leaves"]], tree


def plot_clustered_matrices(panels: dict[str, np.ndarray], labels: Sequence[str], path: str | Path,
                            title: str = "", order_by: str | None = None, cis: dict[str, np.ndarray] | None = None,
                            vmin: float = 0.0) -> list[int]:
    """Heat maps of n×n matrices side by side, rows and columns in the clustering order of one of them.

    panels: ``{title: (n, n) matrix}``; the first (or `order_by`) sets the order and its dendrogram is drawn
    on the left. cis: optional ``{title: (n, n, 2) [lo, hi]}`` written under the values (small n only).
    Returns the order used.
    """
    if not panels:
        raise DataError("no matrices to plot")
    key = order_by or next(iter(panels))
    order, tree = cluster_order(panels[key])
    n = len(labels)
    ordered_labels = [labels[i] for i in order]
    cell = 0.42 if n > 6 else 0.9
    side = max(3.0, cell * n + 1.5)
    fig = Figure(figsize=(0.5 + 1.25 * side * len(panels), side + 0.8))
    widths = [0.22 * side] + [side] * len(panels)
    axes = fig.subplots(1, 1 + len(panels), gridspec_kw={"width_ratios": widths, "wspace": 0.08})
    _draw_dendrogram(axes[0], tree, n)
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="0.88")  # NaN (not evaluated): light grey
    for ax, (name, matrix) in zip(axes[1:], panels.items()):
        m = np.asarray(matrix, dtype=float)[np.ix_(order, order)]  # (n, n) in cluster order
        image = ax.imshow(np.ma.masked_invalid(m), vmin=vmin, vmax=1.0, cmap=cmap, aspect="auto")  # rows line up
        ax.set_xticks(range(n), ordered_labels, rotation=90, fontsize=7)
        ax.set_yticks(range(n), ordered_labels if ax is axes[1] else [""] * n, fontsize=7)
        ax.set_title(name + (" (order)" if name == key else ""), fontsize=9)
        interval = None if cis is None or name not in cis else np.asarray(cis[name])[np.ix_(order, order)]
        for (i, j), v in np.ndenumerate(m):
            if np.isnan(v):
                continue
            text = f"{v:.2f}" if n <= 16 else ""
            if interval is not None and n <= 6 and not np.isnan(interval[i, j]).any():
                text += f"\n[{interval[i, j, 0]:.2f},{interval[i, j, 1]:.2f}]"
            if text:
                ax.text(j, i, text, ha="center", va="center", fontsize=5 if n > 6 else 7,
                        color="w" if v < vmin + 0.6 * (1 - vmin) else "k")
        fig.colorbar(image, ax=ax, shrink=0.6, pad=0.02)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=130, bbox_inches="tight")
    return order


def _draw_dendrogram(ax, tree: np.ndarray, n: int) -> None:
    """The dendrogram of `tree` drawn leftwards, leaf i at heat-map row i (scipy's layout, our own lines)."""
    ax.set_ylim(n - 0.5, -0.5)
    ax.axis("off")
    if n < 2:
        return
    layout = dendrogram(tree, no_plot=True)
    for xs, ys in zip(layout["icoord"], layout["dcoord"]):
        # scipy places leaf i at 5 + 10i along the leaf axis; heat-map row i is at i
        rows = (np.asarray(xs) - 5.0) / 10.0
        ax.plot(-np.asarray(ys), rows, color="0.3", linewidth=0.8)
    ax.set_title("1 − sim.", fontsize=7)
