"""Correlative representational similarity (RSA, linear CKA) — to contrast with MAS (docs/method.md §13).

Pure array functions: inputs are (n, d) arrays (numpy, torch, lists), one row per token position;
row i of X and row i of Y must come from the same token of the same sequence (rows = all non-pad
positions of the same sequences run through both models). Everything is computed in float64.

    >>> from llm_mas.similarity import compare_representations, cka, rsa
    >>> cka(X, Y, estimator="unbiased")
    >>> rsa(X[:1000], Y[:1000], metric="cosine", method="spearman")
    >>> compare_representations(X, Y, n_rows=1000, n_repeats=10, seed=0)   # every variant, mean ± std

Memory: nothing here builds an (n, n, d) tensor. RDMs are computed once per pair of *distinct* rows
(duplicated rows are collapsed first), in blocks: Euclidean distances from the differences x_i − x_j, as
``scipy.spatial.distance.pdist`` computes them (not ``‖x‖² + ‖y‖² − 2x·y``, whose cancellation left
duplicated rows ~1e-7 apart and broke exact ties before ranking), cosine distances from products of unit
rows. So a row and its copy are exactly 0 apart and every copy of a pair of rows has the same distance bit
for bit: embedding-layer latents (a few distinct token vectors, each repeated) rank as they should. RSA
only ever holds the upper triangles (n(n−1)/2 values per model). CKA never builds an n×n matrix: both
estimators are written with d×e feature products and row norms, O(n·(d² + e² + de)) time and
O(d² + e² + de) extra memory, so n = 10 000, d = 128 takes milliseconds.

Definitions (K = XXᵀ, L = YYᵀ, linear kernels; H the centring matrix):
- Biased linear CKA (Kornblith et al. 2019): HSIC_b(K, L) = tr(KHLH)/(n−1)², which for centred
  features X̄, Ȳ is ‖ȲᵀX̄‖²_F/(n−1)², so CKA_b = ‖ȲᵀX̄‖²_F / (‖X̄ᵀX̄‖_F ‖ȲᵀȲ‖_F).
- Unbiased linear CKA: the debiased HSIC U-statistic of Song et al. (2012), as used by Nguyen et al.
  (2021): with K̃, L̃ = K, L with zeroed diagonals,
  HSIC_u = [tr(K̃L̃) + 1ᵀK̃1·1ᵀL̃1/((n−1)(n−2)) − 2/(n−2)·1ᵀK̃L̃1] / (n(n−3)).
  In feature form, with k_i = ‖x_i‖², s_X = Xᵀ1:  tr(K̃L̃) = ‖XᵀY‖²_F − Σ k_i l_i,
  1ᵀK̃1 = ‖s_X‖² − Σ k_i, and K̃1 = X s_X − k (so 1ᵀK̃L̃1 = (X s_X − k)·(Y s_Y − l)).
  The features are centred first (the estimator is invariant to it; it helps round-off).
- RSA: correlation (Spearman by default, or Pearson) between the off-diagonal upper triangles of the
  two RDMs. The paper's reference code keeps the zero diagonal in the triangle, which inflates the
  correlation by n perfectly matched zeros; we do not.

Libraries: scipy and rsatoolbox are the tests' reference implementations here: the tests check RDMs and
RSA against ``pdist`` + ``scipy.stats.spearmanr``/``pearsonr`` and rsatoolbox's RDMs (duplicated rows,
constant features, float32/float64), and CKA against naive n×n implementations and a brute-force
U-statistic. The correlations are computed here rather than by ``scipy.stats.spearmanr`` / ``pearsonr``, to which
the tests compare them to 1e-12: ranking is the cost of RSA (a 1 000-row subsample has 499 500
distances) and scipy's ``rankdata`` uses a stable merge sort, slower than the quicksort-plus-tie-averaging
used here (measured on a 1 000-row triangle: ranks 1.2× faster, Spearman 1.5× and Pearson ~14× faster
than ``spearmanr`` / ``pearsonr``, identical values); ``compare_representations`` also ranks each triangle
once for all its correlations. This module therefore uses no scipy.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from llm_mas.errors import ConfigError, DataError, choice_error

METRICS = ("cosine", "euclidean")
CORRELATIONS = ("spearman", "pearson")
ESTIMATORS = ("biased", "unbiased")
# Distance blocks hold at most this many float64 values (8 MB) besides the output.
_BLOCK_ELEMENTS = 1_000_000


# ----------------------------------------------------------------------------------------- inputs
def _as_rows(X: Any, name: str = "X") -> np.ndarray:
    """Float64 (n, d) array from numpy / torch / nested lists; errors name the bad shape or value."""
    if hasattr(X, "detach"):  # torch tensor, without importing torch
        X = X.detach().cpu().double().numpy()
    array = np.asarray(X, dtype=np.float64)
    if array.ndim != 2:
        raise DataError(f"{name} has shape {tuple(array.shape)}; pass (rows, features), e.g. latents of "
                        f"shape (batch, seq, d) reshaped to (-1, d) after dropping pad positions")
    if not np.all(np.isfinite(array)):
        row = int(np.flatnonzero(~np.isfinite(array).all(axis=1))[0])
        raise DataError(f"{name} contains NaN or inf (first in row {row}); drop those rows first")
    return array


def _paired_rows(X: Any, Y: Any, minimum: int) -> tuple[np.ndarray, np.ndarray]:
    """Both inputs as float64 (n, d) / (n, e) with the same n ≥ `minimum`."""
    x, y = _as_rows(X, "X"), _as_rows(Y, "Y")
    if x.shape[0] != y.shape[0]:
        raise DataError(f"X has {x.shape[0]} rows but Y has {y.shape[0]}; rows must be the same token "
                        f"positions of the same sequences in both models")
    if x.shape[0] < minimum:
        raise DataError(f"{x.shape[0]} rows is too few for this measure; pass at least {minimum}")
    return x, y


# ------------------------------------------------------------------------------------------- RDMs
def _check_metric(X: np.ndarray, metric: str) -> None:
    """Metric name and, for cosine, no all-zero rows (their cosine distance is undefined)."""
    if metric not in METRICS:
        raise choice_error("RDM metric", metric, METRICS)
    if metric == "cosine":
        zero = np.flatnonzero(~X.any(axis=1))
        if zero.size:
            raise DataError(f"rows {zero[:5].tolist()} are all-zero, so their cosine distance is undefined; "
                            f"drop them (pad positions?) or use metric='euclidean'")


def _row_pairs(rows: np.ndarray, metric: str) -> Iterator[tuple[int, int, np.ndarray]]:
    """Distances of every pair i < j of `rows` (k, d), each pair computed exactly once, in pdist order.

    Yields ``(i, j0, values)``: the distances of row i to rows j0, j0 + 1, … (j0 > i). Euclidean distances
    come from the differences x_i − x_j themselves (as ``pdist`` computes them), not from
    ‖x‖² + ‖y‖² − 2x·y, whose cancellation leaves close rows up to ~1e-8·‖x‖ apart and reorders small
    distances. Cosine distances are 1 − (x_i/‖x_i‖)·(x_j/‖x_j‖) from Gram blocks, clipped to [0, 2].
    Temporaries hold at most ``_BLOCK_ELEMENTS`` values.
    """
    k, width = rows.shape
    if metric == "cosine":
        unit = rows / np.linalg.norm(rows, axis=1, keepdims=True)  # (k, d)
        block = max(1, _BLOCK_ELEMENTS // max(k, 1))
        for start in range(0, k - 1, block):
            stop = min(start + block, k - 1)
            gram = unit[start:stop] @ unit[start + 1:].T  # (b, k - start - 1): column c is row start + 1 + c
            np.subtract(1.0, gram, out=gram)
            np.clip(gram, 0.0, 2.0, out=gram)
            for r in range(stop - start):  # row start + r pairs with rows start + r + 1, …: columns ≥ r
                yield start + r, start + r + 1, gram[r, r:]
        return
    chunk = max(1, _BLOCK_ELEMENTS // max(width, 1))  # rows j per difference block
    for i in range(k - 1):
        for start in range(i + 1, k, chunk):
            difference = rows[start:start + chunk] - rows[i]  # (c, d)
            yield i, start, np.sqrt(np.einsum("ij,ij->i", difference, difference))


class _Distances:
    """Pairwise distances of X's rows, computed once per pair of *distinct* rows.

    Duplicated rows are collapsed first (``np.unique``), so a row and its copy are exactly 0 apart and
    every copy of a pair of rows gets bit for bit the same distance: exact ties stay ties for the ranking
    of RSA-Spearman (embedding layers have a handful of distinct vectors repeated many times).
    """

    def __init__(self, X: np.ndarray, metric: str):
        _check_metric(X, metric)
        self.n = X.shape[0]
        unique, inverse = np.unique(X, axis=0, return_inverse=True)  # (k, d), (n,)
        self.duplicates = unique.shape[0] < self.n
        self.rows = unique if self.duplicates else X  # without duplicates keep X's order (pdist's triangle)
        self.inverse = inverse.reshape(-1).astype(np.int64) if self.duplicates else None
        self.k = self.rows.shape[0]
        self.metric = metric

    def condensed(self) -> np.ndarray:
        """Distances of the k distinct rows in pdist order, (k(k−1)/2,)."""
        out = np.empty(self.k * (self.k - 1) // 2 + 1)  # one spare slot: 0, the distance of a row to itself
        out[-1] = 0.0
        for i, start, values in _row_pairs(self.rows, self.metric):
            offset = i * self.k - i * (i + 1) // 2 + start - i - 1  # position of pair (i, start)
            out[offset:offset + values.size] = values
        return out

    @staticmethod
    def gather(pairs: np.ndarray, k: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        """Distances of distinct-row indices u, v (broadcast) from `pairs` = :meth:`condensed`."""
        low, high = np.minimum(u, v), np.maximum(u, v)
        position = low * k - low * (low + 1) // 2 + high - low - 1  # pair (low, high) in pdist order
        position[low == high] = pairs.size - 1  # the spare 0
        return pairs[position]


def rdm(X: Any, metric: str = "cosine") -> np.ndarray:
    """Representational dissimilarity matrix: (n, d) → (n, n), exactly symmetric with a zero diagonal.

    ``metric="cosine"``: 1 − cos(x_i, x_j) (all-zero rows are an error); ``"euclidean"``: ‖x_i − x_j‖,
    from the differences (as ``scipy.spatial.distance.pdist``). Each pair of distinct rows is computed
    once: duplicated rows are exactly 0 apart and every copy of a pair gets the same distance. Memory:
    the result (8·n² bytes: 800 MB at n = 10 000 — subsample rows for RSA, see :func:`subsampled`), plus
    the k(k−1)/2 distances of the k distinct rows when some rows are duplicated.
    """
    x = _as_rows(X)
    distances = _Distances(x, metric)
    n = x.shape[0]
    out = np.zeros((n, n))  # (n, n)
    if not distances.duplicates:
        for i, start, values in _row_pairs(x, metric):
            out[i, start:start + values.size] = values
            out[start:start + values.size, i] = values
        return out
    pairs = distances.condensed()
    block = max(1, _BLOCK_ELEMENTS // max(n, 1))
    for start in range(0, n, block):
        stop = min(start + block, n)
        out[start:stop] = distances.gather(pairs, distances.k, distances.inverse[start:stop, None],
                                           distances.inverse[None, :])
    return out


def condensed_rdm(X: Any, metric: str = "cosine") -> np.ndarray:
    """Off-diagonal upper triangle of :func:`rdm`, (n(n−1)/2,), in ``scipy.spatial.distance.pdist`` order.

    Never allocates the n×n matrix. Duplicated rows are exactly 0 apart and every copy of a pair gets the
    same distance bit for bit (see :func:`rdm`).
    """
    x = _as_rows(X)
    distances = _Distances(x, metric)
    n = x.shape[0]
    if not distances.duplicates:
        return distances.condensed()[:-1]
    pairs = distances.condensed()
    out = np.empty(n * (n - 1) // 2)  # (n(n-1)/2,)
    offset = 0
    for i in range(n - 1):  # row i against rows i+1 … n−1, in pdist order
        values = distances.gather(pairs, distances.k, distances.inverse[i], distances.inverse[i + 1:])
        out[offset:offset + values.size] = values
        offset += values.size
    return out


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks with ties averaged, as ``scipy.stats.rankdata(values)`` but faster (see the module docstring).

    scipy sorts stably (merge sort); tie groups are averaged anyway, so an unstable sort suffices.
    """
    order = np.argsort(values, kind="quicksort")  # (m,)
    ordered = values[order]
    starts_group = np.empty(ordered.size, dtype=bool)  # (m,) True where a new tie group starts
    starts_group[0] = True
    np.not_equal(ordered[1:], ordered[:-1], out=starts_group[1:])
    starts = np.flatnonzero(starts_group)  # sorted position of each group's first element
    stops = np.append(starts[1:], ordered.size)
    ranks = np.empty(ordered.size)  # (m,)
    ranks[order] = np.repeat((starts + stops + 1) / 2.0, stops - starts)  # mean of ranks starts+1..stops
    return ranks


def _pearson(first: np.ndarray, second: np.ndarray) -> float:
    """Pearson correlation in float64 (inputs already checked to be non-constant)."""
    first, second = first - first.mean(), second - second.mean()
    value = float(first @ second) / (np.linalg.norm(first) * np.linalg.norm(second))
    return float(np.clip(value, -1.0, 1.0))


def _check_not_constant(vector: np.ndarray, name: str) -> None:
    if np.all(vector == vector[0]):
        raise DataError(f"all pairwise distances of {name} are equal, so the RSA correlation is undefined; "
                        f"check that its rows differ (identical latents at every position?)")


def _correlate(first: np.ndarray, second: np.ndarray, method: str) -> float:
    """Spearman (Pearson of average ranks) or Pearson correlation of two equal-length vectors."""
    if method not in CORRELATIONS:
        raise choice_error("RSA correlation method", method, CORRELATIONS)
    _check_not_constant(first, "X")
    _check_not_constant(second, "Y")
    if method == "spearman":
        return _pearson(_average_ranks(first), _average_ranks(second))
    return _pearson(first, second)


def rsa(X: Any, Y: Any, metric: str = "cosine", method: str = "spearman") -> float:
    """Representational similarity: correlation of the off-diagonal upper triangles of the two RDMs.

    Args:
        X, Y: (n, d), (n, e) latents, same rows (token positions) in both; n ≥ 3.
        metric: RDM distance, ``"cosine"`` or ``"euclidean"``.
        method: ``"spearman"`` (default, as in the paper) or ``"pearson"``.

    Memory is two vectors of n(n−1)/2 floats (0.4 GB each at n = 10 000): use :func:`subsampled`
    (1 000 rows, 10 repeats, as in the paper) for large n.
    """
    x, y = _paired_rows(X, Y, minimum=3)
    if metric not in METRICS:
        raise choice_error("RDM metric", metric, METRICS)
    if method not in CORRELATIONS:
        raise choice_error("RSA correlation method", method, CORRELATIONS)
    return _correlate(condensed_rdm(x, metric), condensed_rdm(y, metric), method)


# -------------------------------------------------------------------------------------------- CKA
def _hsic_biased_pair(x: np.ndarray, y: np.ndarray) -> float:
    """‖ȲᵀX̄‖²_F = tr(K H L H) for centred X̄, Ȳ (the (n−1)² normaliser cancels in CKA)."""
    cross = y.T @ x  # (e, d)
    return float(np.sum(cross * cross))


def _hsic_unbiased_pair(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased HSIC (Song et al. 2012) of linear kernels K = XXᵀ, L = YYᵀ from feature products."""
    n = x.shape[0]
    sq_x = np.einsum("ij,ij->i", x, x)  # (n,) diag(K)
    sq_y = np.einsum("ij,ij->i", y, y)  # (n,) diag(L)
    sum_x, sum_y = x.sum(axis=0), y.sum(axis=0)  # (d,), (e,) ≈ 0 after centring, kept for exactness
    cross = y.T @ x  # (e, d)
    trace_kl = float(np.sum(cross * cross)) - float(sq_x @ sq_y)  # tr(K̃L̃)
    total_k = float(sum_x @ sum_x) - float(sq_x.sum())  # 1ᵀK̃1
    total_l = float(sum_y @ sum_y) - float(sq_y.sum())  # 1ᵀL̃1
    rows_k = x @ sum_x - sq_x  # (n,) K̃1
    rows_l = y @ sum_y - sq_y  # (n,) L̃1
    return (trace_kl + total_k * total_l / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * float(rows_k @ rows_l)) / (
        n * (n - 3))


def cka(X: Any, Y: Any, estimator: str = "biased") -> float:
    """Linear centred kernel alignment between (n, d) and (n, e) latents (same rows in both).

    Args:
        estimator: ``"biased"`` (Kornblith et al. 2019; positive even for independent data, by about
            d/(n+d) for isotropic noise) or ``"unbiased"`` (debiased HSIC, Song et al. 2012 /
            Nguyen et al. 2021; ≈ 0 for independent data, can be slightly negative; needs n ≥ 4).

    Returns:
        CKA in [0, 1] for the biased estimator; the unbiased one lies in [−1, 1] (it is a cosine
        between U-centred Gram matrices) and may dip below 0.
        Invariant to orthogonal transforms and isotropic scaling of either input, and to translations.
    """
    if estimator not in ESTIMATORS:
        raise choice_error("CKA estimator", estimator, ESTIMATORS)
    x_raw, y_raw = _paired_rows(X, Y, minimum=4 if estimator == "unbiased" else 2)
    x = x_raw - x_raw.mean(axis=0)  # (n, d)
    y = y_raw - y_raw.mean(axis=0)  # (n, e)
    for name, raw, centred in (("X", x_raw, x), ("Y", y_raw, y)):
        # Constant features leave only round-off after centring (relative size ~1e-16): not a representation.
        if np.sum(centred * centred) <= 1e-24 * np.sum(raw * raw):
            raise DataError(f"{name} is constant over these rows, so CKA is undefined; pass rows that differ "
                            f"(identical latents at every position?)")
    hsic = _hsic_biased_pair if estimator == "biased" else _hsic_unbiased_pair
    self_x, self_y = hsic(x, x), hsic(y, y)
    for name, value in (("X", self_x), ("Y", self_y)):
        if not value > 0.0:
            raise DataError(f"{estimator} HSIC({name}, {name}) = {value:.3g} ≤ 0, so CKA is undefined: {name} has "
                            f"(near-)constant features over these rows or too few rows; pass more, varied rows")
    return float(hsic(x, y) / np.sqrt(self_x * self_y))


# ----------------------------------------------------------------------------------- subsampling
def _subsample_indices(n_total: int, n_rows: int, n_repeats: int, seed: int) -> list[np.ndarray]:
    """Row subsets, one per repeat (sorted, without replacement); all rows once when n_rows ≥ n_total."""
    for name, value in (("n_rows", n_rows), ("n_repeats", n_repeats)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{name}={value!r} must be a positive integer, e.g. {name}=10")
    if n_rows >= n_total:  # every subsample would be the full set: compute once, not n_repeats times
        return [np.arange(n_total)]
    rng = np.random.default_rng(seed)
    return [np.sort(rng.choice(n_total, size=n_rows, replace=False)) for _ in range(n_repeats)]


def _summary(values: list[float]) -> dict[str, Any]:
    """Mean and sample standard deviation (ddof=1; 0 for a single value) of per-subsample values."""
    array = np.asarray(values, dtype=np.float64)
    std = float(array.std(ddof=1)) if array.size > 1 else 0.0
    return {"mean": float(array.mean()), "std": std, "values": array.tolist()}


def subsampled(metric_fn: Callable[[np.ndarray, np.ndarray], float], X: Any, Y: Any, n_rows: int = 1000,
               n_repeats: int = 10, seed: int = 0) -> dict[str, Any]:
    """Average ``metric_fn(X[rows], Y[rows])`` over `n_repeats` random row subsets of size `n_rows`.

    The same rows are used for both models in each repeat. With ``n_rows ≥ n`` all rows are used once
    (``values`` then has one entry and ``n_repeats`` is reported as 1).

    Returns:
        ``{"mean", "std" (ddof=1), "values": [...], "n_rows", "n_repeats"}``.
    """
    x, y = _paired_rows(X, Y, minimum=1)
    subsets = _subsample_indices(x.shape[0], n_rows, n_repeats, seed)
    values = [float(metric_fn(x[rows], y[rows])) for rows in subsets]  # rows: (n_rows,)
    return {**_summary(values), "n_rows": int(subsets[0].size), "n_repeats": len(subsets)}


def compare_representations(X: Any, Y: Any, *, n_rows: int = 1000, n_repeats: int = 10,
                            seed: int = 0) -> dict[str, Any]:
    """Every correlative similarity of docs/method.md §13 on the same row subsets (seeded).

    Returns a dict with, for each of ``rsa_{cosine,euclidean}_{spearman,pearson}`` and
    ``cka_{biased,unbiased}``, ``{"mean", "std", "values"}`` over the subsets; ``cka_biased_all_rows``
    and ``cka_unbiased_all_rows`` (CKA is cheap on every row, and the biased value depends on n);
    and ``n_rows``, ``n_repeats``, ``n_total``. Each subset's RDMs are computed once per metric.
    """
    x, y = _paired_rows(X, Y, minimum=4)
    subsets = _subsample_indices(x.shape[0], n_rows, n_repeats, seed)
    per_subset: dict[str, list[float]] = {}
    for rows in subsets:
        x_rows, y_rows = x[rows], y[rows]  # (n_rows, d), (n_rows, e)
        for metric in METRICS:
            x_rdm, y_rdm = condensed_rdm(x_rows, metric), condensed_rdm(y_rows, metric)  # (m,) each
            _check_not_constant(x_rdm, "X")
            _check_not_constant(y_rdm, "Y")
            per_subset.setdefault(f"rsa_{metric}_pearson", []).append(_pearson(x_rdm, y_rdm))
            spearman = _pearson(_average_ranks(x_rdm), _average_ranks(y_rdm))  # each triangle ranked once
            per_subset.setdefault(f"rsa_{metric}_spearman", []).append(spearman)
        for estimator in ESTIMATORS:
            per_subset.setdefault(f"cka_{estimator}", []).append(cka(x_rows, y_rows, estimator))
    result: dict[str, Any] = {name: _summary(values) for name, values in per_subset.items()}
    for estimator in ESTIMATORS:
        result[f"cka_{estimator}_all_rows"] = cka(x, y, estimator)
    result.update(n_rows=int(subsets[0].size), n_repeats=len(subsets), n_total=int(x.shape[0]))
    return result


def cka_matrix(latents: Any, estimator: str = "biased") -> np.ndarray:
    """Linear CKA of every pair of models: (n, n) symmetric with ones on the diagonal.

    latents: n arrays (n_rows, d_i), the same rows in every model (``Rows.latents``); each pair is
    :func:`cka` on all rows.
    """
    latents = list(latents)
    if len(latents) < 2:
        raise ConfigError(f"got {len(latents)} model(s); a CKA matrix compares at least two")
    n = len(latents)
    out = np.eye(n)  # (n, n)
    for i in range(n):
        for j in range(i + 1, n):
            out[i, j] = out[j, i] = cka(latents[i], latents[j], estimator)
    return out
