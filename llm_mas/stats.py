"""Statistics helpers for reporting IIA and similarity results: bootstrap CIs, permutation tests,
group means over an n×n results matrix.

Everything is seeded (``seed=`` on every random function) and vectorised over resamples.

    >>> from llm_mas.stats import mean_ci, permutation_test
    >>> mean_ci([1, 0, 1, 1], n_boot=1000)                           # per-trial 0/1 outcomes
    >>> permutation_test([1, 2, 3], [4, 5, 6], alternative="less")   # exact: p = 1/20

Why not ``scipy.stats.bootstrap`` / ``scipy.stats.permutation_test``: they are good (the tests
cross-check our p-values against ``scipy.stats.permutation_test``), but we want a percentile CI by
default, a degenerate CI for constant data without warnings, the exact-versus-Monte-Carlo switch on the
number of distinct splits, and a vectorised path for the difference in means that scipy does not
specialise; the code is short enough to own.
"""

from __future__ import annotations

import inspect
import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from llm_mas.errors import ConfigError, DataError, choice_error

ALTERNATIVES = ("greater", "less", "two-sided")
# Two-sample statistics known by name; a callable (a, b) -> float is also accepted.
TWO_SAMPLE_STATS = ("mean_diff", "median_diff")
# Resamples are generated in chunks of at most this many elements (keeps memory flat for long inputs).
_CHUNK_ELEMENTS = 2_000_000


# ----------------------------------------------------------------------------------------- inputs
def _as_1d(values: Any, name: str = "values") -> np.ndarray:
    """Float64 1-D copy of `values` (list, numpy array, bool 0/1 trials or torch tensor); errors on bad data."""
    if hasattr(values, "detach"):  # torch tensor without importing torch
        values = values.detach().cpu().double().numpy()
    array = np.asarray(values, dtype=np.float64)
    if array.ndim == 2 and 1 in array.shape:  # a column or row vector
        array = array.reshape(-1)
    if array.ndim != 1:
        raise DataError(f"{name} must be one-dimensional, got shape {tuple(array.shape)}; "
                        f"flatten it (np.ravel) or pass one row at a time")
    if array.size == 0:
        raise DataError(f"{name} is empty; pass at least one value (did a filter drop every trial?)")
    if not np.all(np.isfinite(array)):
        bad = np.flatnonzero(~np.isfinite(array))[:5].tolist()
        raise DataError(f"{name} contains NaN or inf at positions {bad}; drop or impute them first")
    return array


def _check_level(level: float) -> None:
    if not 0.0 < level < 1.0:
        raise ConfigError(f"level={level!r} is not a confidence level; use a number in (0, 1), e.g. 0.95")


def _check_positive_int(value: int, name: str) -> None:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{name}={value!r} must be a positive integer, e.g. {name}=2000")


def _accepts_axis(function: Callable) -> bool:
    """True when `function(x, axis=...)` is supported (np.mean, np.median, ...), so resamples vectorise."""
    try:
        return "axis" in inspect.signature(function).parameters
    except (TypeError, ValueError):  # builtins / ufuncs without a signature
        return False


# -------------------------------------------------------------------------------------- bootstrap
def bootstrap_ci(
    values: Any,
    *,
    stat: Callable[..., Any] = np.mean,
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of ``stat(values)``.

    Args:
        values: (n,) numbers, e.g. per-trial 0/1 IIA outcomes or per-seed scores.
        stat: statistic of a 1-D sample. If it takes ``axis=`` (np.mean, np.median, np.std, ...) all
            resamples are evaluated at once; otherwise it is called once per resample.
        n_boot: number of bootstrap resamples.
        level: confidence level, e.g. 0.95 → the 2.5 % and 97.5 % percentiles.
        seed: seed of the resampling (same seed, same interval).

    Returns:
        ``(lo, hi)``. Constant data give the degenerate interval ``(stat(values), stat(values))``.
    """
    array = _as_1d(values)
    _check_level(level)
    _check_positive_int(n_boot, "n_boot")
    if np.all(array == array[0]):  # every resample is the sample itself
        point = float(stat(array))
        return point, point

    n = array.size
    rng = np.random.default_rng(seed)
    boot = np.empty(n_boot)  # (n_boot,)
    if _accepts_axis(stat):
        chunk = max(1, _CHUNK_ELEMENTS // n)
        for start in range(0, n_boot, chunk):
            stop = min(start + chunk, n_boot)
            indices = rng.integers(0, n, size=(stop - start, n))  # (chunk, n)
            boot[start:stop] = stat(array[indices], axis=1)
    else:
        for i in range(n_boot):
            boot[i] = stat(array[rng.integers(0, n, size=n)])
    alpha = 1.0 - level
    lo, hi = np.quantile(boot, [alpha / 2, 1.0 - alpha / 2])
    return float(lo), float(hi)


def ratio_ci(correct: np.ndarray, counts: np.ndarray, *, seed: int = 0, n_boot: int = 2000,
             level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap CI (over pairs) of a micro-averaged ratio ``sum(correct) / sum(counts)``.

    correct, counts: (n,) per pair, e.g. correctly predicted and scored tokens (token IIA). Resampling pairs
    keeps each pair's tokens together. The arrays keep their dtype (sums are taken in it).
    """
    rng = np.random.default_rng(seed)
    indices = rng.integers(0, len(correct), size=(n_boot, len(correct)))          # (n_boot, n)
    ratios = correct[indices].sum(1) / np.maximum(counts[indices].sum(1), 1)     # (n_boot,)
    lo, hi = np.quantile(ratios, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def mean_ci(values: Any, **kwargs: Any) -> dict[str, float | int]:
    """Mean with a percentile-bootstrap CI: ``{"mean", "lo", "hi", "n"}``.

    ``kwargs`` go to :func:`bootstrap_ci` (``n_boot``, ``level``, ``seed``; ``stat`` is fixed to the mean).
    """
    if "stat" in kwargs:
        raise ConfigError("mean_ci fixes stat=np.mean; call bootstrap_ci(values, stat=...) for another statistic")
    array = _as_1d(values)
    lo, hi = bootstrap_ci(array, stat=np.mean, **kwargs)
    return {"mean": float(array.mean()), "lo": lo, "hi": hi, "n": int(array.size)}


# ------------------------------------------------------------------------------- permutation test
def _split_statistics(pooled: np.ndarray, a_indices: np.ndarray, n_a: int, stat: str | Callable) -> np.ndarray:
    """Statistic of every split; row r of `a_indices` (R, n_a) names the pooled values that form group a."""
    n_total = pooled.size
    if stat == "mean_diff":
        sum_a = pooled[a_indices].sum(axis=1)  # (R,)
        return sum_a / n_a - (pooled.sum() - sum_a) / (n_total - n_a)
    in_a = np.zeros((a_indices.shape[0], n_total), dtype=bool)  # (R, N)
    np.put_along_axis(in_a, a_indices, True, axis=1)
    if stat == "median_diff":
        group_a = pooled[a_indices]  # (R, n_a)
        group_b = np.broadcast_to(pooled, in_a.shape)[~in_a].reshape(len(in_a), n_total - n_a)  # (R, n_b)
        return np.median(group_a, axis=1) - np.median(group_b, axis=1)
    return np.array([float(stat(pooled[mask], pooled[~mask])) for mask in in_a])


def permutation_test(
    a: Any,
    b: Any,
    *,
    n_perm: int = 10_000,
    alternative: str = "greater",
    seed: int = 0,
    stat: str | Callable[[np.ndarray, np.ndarray], float] = "mean_diff",
) -> dict[str, Any]:
    """Two-sample permutation test of ``stat(a, b)`` (default ``mean(a) - mean(b)``).

    The labels a/b are exchangeable under the null. When the number of distinct splits
    ``C(n_a + n_b, n_a)`` is at most ``n_perm`` every split is enumerated and the p-value is exact
    (the observed split is one of them). Otherwise ``n_perm`` random splits are drawn and
    ``p = (1 + #{T_perm ⪰ T_obs}) / (n_perm + 1)``, which is never 0 and is a valid p-value.

    Args:
        a, b: (n_a,), (n_b,) samples (e.g. per-direction IIA of two groups of model pairs).
        n_perm: most permutations to evaluate (also the threshold for exact enumeration).
        alternative: ``"greater"`` (H1: stat > 0, i.e. a above b), ``"less"``, or ``"two-sided"``
            (``2·min(p_less, p_greater)``, capped at 1, as in scipy).
        seed: seed of the Monte Carlo permutations.
        stat: ``"mean_diff"``, ``"median_diff"`` or a callable ``(a, b) -> float``.

    Returns:
        ``{"statistic", "p_value", "n_perm" (permutations evaluated), "exact", "alternative"}``.
    """
    a_values, b_values = _as_1d(a, "a"), _as_1d(b, "b")
    _check_positive_int(n_perm, "n_perm")
    if alternative not in ALTERNATIVES:
        raise choice_error("alternative", alternative, ALTERNATIVES)
    if isinstance(stat, str) and stat not in TWO_SAMPLE_STATS:
        raise choice_error("permutation statistic", stat, TWO_SAMPLE_STATS)

    pooled = np.concatenate([a_values, b_values])  # (N,)
    n_a, n_total = a_values.size, pooled.size
    observed = float(_split_statistics(pooled, np.arange(n_a)[None, :], n_a, stat)[0])

    n_splits = math.comb(n_total, n_a)
    exact = n_splits <= n_perm
    if exact:
        combos = np.array(list(itertools.combinations(range(n_total), n_a)), dtype=np.intp)  # (n_splits, n_a)
        null = _split_statistics(pooled, combos, n_a, stat)
    else:
        rng = np.random.default_rng(seed)
        null = np.empty(n_perm)  # (n_perm,)
        chunk = max(1, _CHUNK_ELEMENTS // n_total)
        for start in range(0, n_perm, chunk):
            stop = min(start + chunk, n_perm)
            order = np.argsort(rng.random((stop - start, n_total)), axis=1)  # (chunk, N) random permutations
            null[start:stop] = _split_statistics(pooled, order[:, :n_a], n_a, stat)

    # Splits whose statistic equals the observed one up to round-off count as "at least as extreme".
    tolerance = 1e-9 * max(abs(observed), float(np.abs(pooled).max()), 1e-300)
    count_greater = int(np.count_nonzero(null >= observed - tolerance))
    count_less = int(np.count_nonzero(null <= observed + tolerance))
    if exact:
        p_greater, p_less = count_greater / n_splits, count_less / n_splits
    else:
        p_greater, p_less = (count_greater + 1) / (n_perm + 1), (count_less + 1) / (n_perm + 1)
    p_value = {"greater": p_greater, "less": p_less,
               "two-sided": min(1.0, 2.0 * min(p_greater, p_less))}[alternative]
    return {"statistic": observed, "p_value": float(p_value), "n_perm": int(null.size),
            "exact": exact, "alternative": alternative}


# ------------------------------------------------------------------------------------ group means
def group_means(
    matrix: Any,
    groups: Sequence[str],
    *,
    include_diagonal: bool = False,
    ordered: bool = True,
    **ci_kwargs: Any,
) -> dict[tuple[str, str], dict[str, Any]]:
    """Pool the cells of an n×n results matrix (e.g. IIA of direction source i → target j) by group pair.

    Args:
        matrix: (n, n) or (n, n, r) — r values per cell (e.g. seeds) are pooled too.
        groups: group label of each of the n models, e.g. ``["toxic", "toxic", "nontoxic", ...]``.
        include_diagonal: keep the cells i == j (a model with itself, i.e. DAS). Off by default.
        ordered: keys are ordered pairs (g1 = source group, g2 = target group). With ``ordered=False``
            the cells of (g1, g2) and (g2, g1) are pooled under the key ``tuple(sorted((g1, g2)))``.
        ci_kwargs: passed to :func:`mean_ci` (``n_boot``, ``level``, ``seed``).

    Returns:
        ``{(g1, g2): {"values": (m,) array, "cells": [(i, j), ...], "mean", "lo", "hi", "n"}}`` with groups
        in order of first appearance. A pair with no cells (a one-model group without its diagonal)
        is present with ``n = 0`` and NaN mean/lo/hi.
    """
    if hasattr(matrix, "detach"):
        matrix = matrix.detach().cpu().double().numpy()
    array = np.asarray(matrix, dtype=np.float64)
    n = len(groups)
    if array.ndim < 2 or array.shape[:2] != (n, n):
        raise DataError(f"matrix has shape {tuple(array.shape)} but groups names {n} models; "
                        f"pass an ({n}, {n}) matrix (rows = source, columns = target) or fix groups")
    cells_by_pair: dict[tuple[str, str], list[tuple[int, int]]] = {}
    labels = list(dict.fromkeys(groups))  # first-appearance order
    for g1 in labels:
        for g2 in labels:
            key = (g1, g2) if ordered else tuple(sorted((g1, g2)))
            cells_by_pair.setdefault(key, [])
    for i in range(n):
        for j in range(n):
            if i == j and not include_diagonal:
                continue
            key = (groups[i], groups[j]) if ordered else tuple(sorted((groups[i], groups[j])))
            cells_by_pair[key].append((i, j))

    result: dict[tuple[str, str], dict[str, Any]] = {}
    for key, cells in cells_by_pair.items():
        values = np.concatenate([array[i, j].reshape(-1) for i, j in cells]) if cells else np.empty(0)
        if values.size == 0:
            summary = {"mean": math.nan, "lo": math.nan, "hi": math.nan, "n": 0}
        else:
            if not np.all(np.isfinite(values)):
                raise DataError(f"group pair {key} has NaN/inf cells among {cells}; evaluate those directions "
                                f"or drop them from the matrix")
            summary = mean_ci(values, **ci_kwargs)
        result[key] = {"values": values, "cells": cells, **summary}
    return result


def t_interval(values: Any, *, level: float = 0.95) -> tuple[float, float, float]:
    """(mean, lo, hi): the Student-t confidence interval of the mean of a few values (e.g. one per seed).

    ``mean ± t_{(1+level)/2, n−1} · s / √n`` with the sample standard deviation s (ddof 1), as
    ``scipy.stats.t.interval(level, n − 1, loc=mean, scale=s / √n)``. No values: all NaN; one value: the
    mean and NaN bounds (no spread to estimate). Non-finite values are an error.
    """
    _check_level(level)
    array = np.asarray(values, dtype=np.float64).reshape(-1)
    if array.size == 0:
        return math.nan, math.nan, math.nan
    if not np.all(np.isfinite(array)):
        raise DataError(f"t_interval got non-finite values {array[~np.isfinite(array)][:5].tolist()}; drop them "
                        f"first")
    mean = float(array.mean())
    if array.size < 2:
        return mean, math.nan, math.nan
    from scipy.stats import t

    half = float(t.ppf((1 + level) / 2, array.size - 1) * array.std(ddof=1) / math.sqrt(array.size))
    return mean, mean - half, mean + half


def paired_comparison(a: Any, b: Any, *, n_boot: int = 2000, level: float = 0.95, seed: int = 0
                      ) -> dict[str, float | int]:
    """Two 0/1 outcomes on the same pairs (e.g. per-pair trial IIA of two alignments scored on one set of
    pairs): ``a``, ``b`` (n,) each.

    Returns ``n``; ``a`` and ``b`` (their means); ``diff`` = mean(a) − mean(b) with the percentile bootstrap
    interval ``diff_lo``, ``diff_hi`` (pairs resampled together, `bootstrap_ci` of the per-pair differences);
    the discordant pairs ``a_only`` (a right, b wrong) and ``b_only``; and ``p``, McNemar's exact two-sided
    test of a and b being right equally often: the binomial test of ``a_only`` out of the discordant pairs
    at 1/2, as ``scipy.stats.binomtest(a_only, a_only + b_only).pvalue`` (1 when no pair is discordant).
    """
    x, y = _as_1d(a, "a"), _as_1d(b, "b")
    if x.shape != y.shape:
        raise DataError(f"paired_comparison: a and b must score the same pairs, got {x.size} and {y.size} values")
    values = np.unique(np.concatenate([x, y]))
    bad = values[(values != 0) & (values != 1)]
    if bad.size:
        raise DataError(f"paired_comparison takes 0/1 outcomes (right / wrong per pair), got {bad[:5].tolist()}")
    a_only, b_only = int(((x == 1) & (y == 0)).sum()), int(((x == 0) & (y == 1)).sum())
    lo, hi = bootstrap_ci(x - y, n_boot=n_boot, level=level, seed=seed)
    discordant = a_only + b_only
    tail = sum(math.comb(discordant, i) for i in range(min(a_only, b_only) + 1)) / (1 << discordant)  # exact ints
    return {"n": int(x.size), "a": float(x.mean()), "b": float(y.mean()), "diff": float((x - y).mean()),
            "diff_lo": float(lo), "diff_hi": float(hi), "a_only": a_only, "b_only": b_only,
            "p": min(1.0, 2.0 * tail)}


# ------------------------------------------------------------------------------- label permutation tests
# Tests over an n×n matrix between models that carry group labels (rows = source, columns = target; the
# diagonal is ignored). The n(n−1) directions of one run are not independent observations: a direction s→t
# shares its source and target with 2(n−2) other directions. What is exchangeable under the null "the labels
# say nothing about the matrix" is the assignment of labels to *models*: the matrix stays fixed (its
# dependence structure included) and the contrast is recomputed under every relabelling that keeps the group
# sizes. With 3 + 3 models there are C(6, 3) = 20 labellings: a one-sided p can never go below 0.05; the
# result reports that floor (``min_p``) next to every p-value.
CONTRASTS = ("source_fixed", "interaction", "within")


# ------------------------------------------------------------------------------------------ inputs
def _square(matrix: Any, n: int, name: str = "matrix") -> np.ndarray:
    """(n, n) float64 copy; errors on a wrong shape or missing off-diagonal cells."""
    if hasattr(matrix, "detach"):
        matrix = matrix.detach().cpu().double().numpy()
    array = np.asarray(matrix, dtype=np.float64)
    if array.shape != (n, n):
        raise DataError(f"{name} has shape {tuple(array.shape)} but groups name {n} models; pass an ({n}, {n}) "
                        f"matrix (rows = source, columns = target) or fix groups")
    off = ~np.eye(n, dtype=bool)
    if not np.all(np.isfinite(array[off])):
        bad = [(int(i), int(j)) for i, j in zip(*np.nonzero(~np.isfinite(array) & off), strict=True)][:5]
        raise DataError(f"{name} has NaN/inf off-diagonal cells {bad}; evaluate every direction of the run "
                        f"(directions: all) before testing")
    return array


def _codes(groups: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """(labels in first-appearance order, (n,) label index per model); needs two groups of >= 2 models."""
    labels = list(dict.fromkeys(groups))
    if len(labels) < 2:
        raise DataError(f"groups {list(groups)} hold a single label; a label permutation test needs two or more")
    small = [g for g in labels if list(groups).count(g) < 2]
    if small:
        raise DataError(f"group(s) {small} have one model; within-group directions need at least 2 models per "
                        f"group")
    return labels, np.array([labels.index(g) for g in groups], dtype=np.intp)


def count_labelings(groups: Sequence[str]) -> int:
    """Distinct assignments of the labels to the models that keep every group's size (a multinomial)."""
    count = math.factorial(len(groups))
    for label in dict.fromkeys(groups):
        count //= math.factorial(list(groups).count(label))
    return count


def labelings(groups: Sequence[str]) -> np.ndarray:
    """Every distinct labelling as label indices (first-appearance order), (R, n) with
    R = ``count_labelings(groups)``; row 0 is the observed labelling."""
    labels = list(dict.fromkeys(groups))
    sizes = [list(groups).count(label) for label in labels]
    rows: list[list[int]] = []

    def fill(row: list[int], free: tuple[int, ...], label: int) -> None:
        if label == len(labels) - 1:  # the last label takes every free position
            for position in free:
                row[position] = label
            rows.append(list(row))
            return
        for chosen in itertools.combinations(free, sizes[label]):
            for position in chosen:
                row[position] = label
            fill(row, tuple(p for p in free if p not in chosen), label + 1)

    fill([0] * len(groups), tuple(range(len(groups))), 0)
    table = np.array(rows, dtype=np.intp)  # (R, n)
    observed = np.array([labels.index(g) for g in groups], dtype=np.intp)
    first = int(np.flatnonzero((table == observed).all(axis=1))[0])
    table[[0, first]] = table[[first, 0]]
    return table


# ------------------------------------------------------------------------------------------ contrasts
def _pair_means(matrix: np.ndarray, codes: np.ndarray, n_labels: int) -> np.ndarray:
    """(R, G, G) mean IIA of the off-diagonal directions from group g to group h under each labelling.

    matrix (n, n); codes (R, n) label index of every model per labelling.
    """
    n = matrix.shape[0]
    off = ~np.eye(n, dtype=bool)
    member = codes[:, None, :] == np.arange(n_labels)[None, :, None]                  # (R, G, n)
    cells = member[:, :, None, :, None] & member[:, None, :, None, :] & off           # (R, G, G, n, n)
    counts = cells.sum(axis=(3, 4))                                                    # (R, G, G)
    return (cells * matrix).sum(axis=(3, 4)) / np.maximum(counts, 1)


def contrast(matrix: np.ndarray, codes: np.ndarray, n_labels: int, kind: str, group: int | None,
             versus: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(statistic, plus side, minus side), each (R,), of a contrast under every labelling in `codes` (R, n).

    source_fixed: plus = mean(g→g), minus = mean over the directions g→(any other group).
    interaction:  plus = mean of the G within-group means, minus = mean of the G(G−1) between-group means.
    within:       plus = mean(g→g), minus = mean(h→h) with h = `versus` (off-diagonal cells).
    """
    if kind == "within":
        n = matrix.shape[0]
        off = ~np.eye(n, dtype=bool)
        sides = []
        for label in (group, versus):
            inside = codes == label                                                        # (R, n)
            cells = inside[:, :, None] & inside[:, None, :] & off                          # (R, n, n)
            sides.append((cells * matrix).sum(axis=(1, 2)) / cells.sum(axis=(1, 2)))
        plus, minus = sides
    elif kind == "source_fixed":
        n = matrix.shape[0]
        off = ~np.eye(n, dtype=bool)
        inside = codes == group                                                            # (R, n)
        plus_cells = inside[:, :, None] & inside[:, None, :] & off                         # (R, n, n)
        minus_cells = inside[:, :, None] & ~inside[:, None, :]
        plus = (plus_cells * matrix).sum(axis=(1, 2)) / plus_cells.sum(axis=(1, 2))
        minus = (minus_cells * matrix).sum(axis=(1, 2)) / minus_cells.sum(axis=(1, 2))
    elif kind == "interaction":
        means = _pair_means(matrix, codes, n_labels)                                       # (R, G, G)
        diagonal = np.eye(n_labels, dtype=bool)
        plus = means[:, diagonal].mean(axis=1)
        minus = means[:, ~diagonal].mean(axis=1)
    else:
        raise choice_error("contrast", kind, CONTRASTS)
    return plus - minus, plus, minus


def _contrast_name(kind: str, group: str | None, labels: Sequence[str], versus: str | None = None) -> str:
    if kind == "within":
        return f"{group}→{group} vs {versus}→{versus}"
    if kind == "interaction":
        return "within-group vs between-group (" + " + ".join(f"{g}→{g}" for g in labels) + " vs the rest)"
    others = "/".join(g for g in labels if g != group)
    return f"{group}→{group} vs {group}→{others}"


# ------------------------------------------------------------------------------- the label test
def label_permutation_test(matrix: Any, groups: Sequence[str], group: str | None = None, *,
                           versus: str | None = None, contrast_kind: str = "source_fixed",
                           alternative: str = "greater", n_perm: int = 10_000, seed: int = 0) -> dict[str, Any]:
    """Permutation test of a contrast (module docstring) with the *model labels* as the unit.

    H0: the labels are exchangeable among the models, i.e. the matrix is as likely under every relabelling
    that keeps the group sizes. The matrix is held fixed and the contrast recomputed under every distinct
    relabelling (exact when there are at most `n_perm`, the observed one included: p = #{T* ⪰ T} / R) or
    under `n_perm` random ones (then ``p = (1 + #{T* ⪰ T}) / (n_perm + 1)``).

    Args:
        matrix: (n, n) IIA, rows = source, columns = target; the diagonal is ignored.
        groups: (n,) label of each model, e.g. ``["toxic"] * 3 + ["nontoxic"] * 3``.
        group: the group of a ``source_fixed`` or ``within`` contrast (unused by ``interaction``).
        versus: the second group: the test then uses only the models of `group` and `versus` (the submatrix
            of their directions) and relabels them among themselves, every other model set aside. Required
            by ``within``; with ``source_fixed`` the minus side becomes ``group→versus``.
        contrast_kind: ``"source_fixed"``, ``"interaction"`` or ``"within"`` (``group→group`` vs
            ``versus→versus``).
        alternative: ``"greater"`` (H1: T > 0), ``"less"`` or ``"two-sided"`` (``2·min(p_less, p_greater)``,
            capped at 1, as ``llm_mas.stats.permutation_test``).

    Returns:
        ``{"contrast", "group", "versus", "models", "name", "statistic", "plus_mean", "minus_mean", "p_value", "p_greater",
        "p_less", "alternative", "exact", "n_labelings", "min_p", "null"}``. ``min_p`` is the smallest
        p-value the design can produce: labellings that give the observed statistic for *any* matrix (e.g. a
        labelling and its mirror image for ``interaction``) always tie with it. ``null``: the statistic under
        every evaluated labelling (exact: the observed one first). ``models``: the indices (into `groups`)
        of the models the test used.
    """
    if alternative not in ALTERNATIVES:
        raise choice_error("alternative", alternative, ALTERNATIVES)
    if contrast_kind not in CONTRASTS:
        raise choice_error("contrast", contrast_kind, CONTRASTS)
    if not isinstance(n_perm, (int, np.integer)) or isinstance(n_perm, bool) or n_perm < 1:
        raise ConfigError(f"n_perm={n_perm!r} must be a positive integer, e.g. n_perm=10000")
    all_labels = list(dict.fromkeys(groups))
    array = _square(matrix, len(groups))
    used = list(range(len(groups)))
    if contrast_kind == "within" and versus is None:
        raise ConfigError("contrast 'within' compares group→group with versus→versus; pass versus=<group>")
    if versus is not None:
        for name, value in (("group", group), ("versus", versus)):
            if value not in all_labels:
                raise choice_error(name, value, all_labels)
        if versus == group:
            raise ConfigError(f"versus={versus!r} equals group; pick another group of {all_labels}")
        used = [i for i, g in enumerate(groups) if g in (group, versus)]
        array = array[np.ix_(used, used)]
        groups = [groups[i] for i in used]
    labels, observed_codes = _codes(groups)
    versus_index = labels.index(versus) if versus is not None else None
    if contrast_kind in ("source_fixed", "within"):
        if group not in labels:
            raise choice_error("group", group, labels)
        index: int | None = labels.index(group)
    else:
        group, index = None, None
    total = count_labelings(groups)
    exact = total <= n_perm
    if exact:
        table = labelings(groups)                                                     # (R, n)
    else:
        table = np.random.default_rng(seed).permuted(np.tile(observed_codes, (n_perm, 1)), axis=1)
    observed, plus, minus = (float(x[0]) for x in contrast(array, observed_codes[None, :], len(labels),
                                                           contrast_kind, index, versus_index))
    null = contrast(array, table, len(labels), contrast_kind, index, versus_index)[0]  # (R,)
    tolerance = 1e-9 * max(abs(observed), float(np.abs(array).max()), 1e-300)
    count_greater = int(np.count_nonzero(null >= observed - tolerance))
    count_less = int(np.count_nonzero(null <= observed + tolerance))
    if exact:
        p_greater, p_less = count_greater / total, count_less / total
        # structural ties: labellings equal to the observed statistic on a generic (random) matrix
        generic = np.random.default_rng(12345).standard_normal(array.shape)
        generic_null = contrast(generic, table, len(labels), contrast_kind, index, versus_index)[0]
        ties = int(np.count_nonzero(np.isclose(generic_null, generic_null[0], rtol=0, atol=1e-12)))
        one_sided_min = ties / total
    else:
        p_greater, p_less = (count_greater + 1) / (n_perm + 1), (count_less + 1) / (n_perm + 1)
        one_sided_min = 1 / (n_perm + 1)
    p_value = {"greater": p_greater, "less": p_less, "two-sided": min(1.0, 2.0 * min(p_greater, p_less))}
    return {"contrast": contrast_kind, "group": group, "versus": versus, "models": used,
            "name": _contrast_name(contrast_kind, group, labels, versus),
            "statistic": observed, "plus_mean": plus, "minus_mean": minus,
            "p_value": float(p_value[alternative]), "p_greater": float(p_greater), "p_less": float(p_less),
            "alternative": alternative, "exact": exact, "n_labelings": int(null.size),
            "min_p": float(min(1.0, one_sided_min * (2 if alternative == "two-sided" else 1))),
            "null": [float(v) for v in null]}

