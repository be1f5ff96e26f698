"""RSA and CKA against closed forms, naive n×n implementations, scipy, and invariance properties."""

from __future__ import annotations

import itertools
import tracemalloc

import numpy as np
import pytest
import rsatoolbox
import scipy.stats
import torch
from scipy.spatial.distance import cdist, pdist

from llm_mas import similarity
from llm_mas.errors import ConfigError, DataError
from llm_mas.similarity import cka, compare_representations, condensed_rdm, rdm, rsa, subsampled


def _data(n=60, d=8, seed=0, offset=0.0):
    return np.random.default_rng(seed).normal(size=(n, d)) + offset


def _orthogonal(d, seed=0):
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(d, d)))
    return q


# ----------------------------------------------------------------------- naive references (n×n)
def _naive_cka_biased(x, y):
    n = x.shape[0]
    k, l_ = x @ x.T, y @ y.T
    h = np.eye(n) - np.ones((n, n)) / n

    def hsic(a, b):
        return np.trace(a @ h @ b @ h) / (n - 1) ** 2

    return hsic(k, l_) / np.sqrt(hsic(k, k) * hsic(l_, l_))


def _naive_hsic_unbiased(k, l_):
    n = k.shape[0]
    k, l_ = k - np.diag(np.diag(k)), l_ - np.diag(np.diag(l_))
    one = np.ones(n)
    return (np.trace(k @ l_) + (one @ k @ one) * (one @ l_ @ one) / ((n - 1) * (n - 2))
            - 2.0 / (n - 2) * (one @ k @ l_ @ one)) / (n * (n - 3))


def _naive_cka_unbiased(x, y):
    k, l_ = x @ x.T, y @ y.T
    return _naive_hsic_unbiased(k, l_) / np.sqrt(_naive_hsic_unbiased(k, k) * _naive_hsic_unbiased(l_, l_))


def _u_statistic_hsic(k, l_):
    """HSIC = E[k_ij l_ij] + E[k_ij] E[l_qr] − 2 E[k_ij l_iq], each a mean over distinct indices."""
    n = k.shape[0]
    pairs = list(itertools.permutations(range(n), 2))
    triples = list(itertools.permutations(range(n), 3))
    quads = list(itertools.permutations(range(n), 4))
    term_pairs = np.mean([k[i, j] * l_[i, j] for i, j in pairs])
    term_quads = np.mean([k[i, j] * l_[q, r] for i, j, q, r in quads])
    term_triples = np.mean([k[i, j] * l_[i, q] for i, j, q in triples])
    return term_pairs + term_quads - 2 * term_triples


# ------------------------------------------------------------------------------------------ RDMs
@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_rdm_symmetric_zero_diagonal_nonnegative(metric):
    distances = rdm(_data(offset=3.0), metric)
    assert distances.shape == (60, 60)
    np.testing.assert_array_equal(distances, distances.T)
    np.testing.assert_array_equal(np.diag(distances), 0.0)
    assert distances.min() >= 0.0


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_rdm_matches_scipy_cdist_and_pdist(metric):
    x = _data(n=50, d=7, offset=2.0)
    np.testing.assert_allclose(rdm(x, metric), cdist(x, x, metric), atol=1e-10, rtol=0)
    np.testing.assert_allclose(condensed_rdm(x, metric), pdist(x, metric), atol=1e-10, rtol=0)


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_rdm_row_blocks_give_the_same_result(monkeypatch, metric):
    x = _data(n=53, d=5, seed=1)
    whole, whole_condensed = rdm(x, metric), condensed_rdm(x, metric)
    monkeypatch.setattr(similarity, "_BLOCK_ELEMENTS", 53 * 7)  # blocks of 7 rows, last one ragged
    blocked = rdm(x, metric)
    np.testing.assert_allclose(blocked, whole, atol=1e-12, rtol=0)
    np.testing.assert_array_equal(blocked, blocked.T)
    np.testing.assert_array_equal(np.diag(blocked), 0.0)
    np.testing.assert_allclose(condensed_rdm(x, metric), whole_condensed, atol=1e-12, rtol=0)
    np.testing.assert_allclose(condensed_rdm(x, metric), pdist(x, metric), atol=1e-10, rtol=0)


def test_euclidean_rdm_clamps_round_off_for_duplicates():
    x = np.repeat(_data(n=5, d=4, offset=1e3), 2, axis=0)  # duplicate rows, large offset
    distances = rdm(x, "euclidean")
    assert np.all(np.isfinite(distances)) and distances.min() >= 0.0
    np.testing.assert_allclose(distances, cdist(x, x), atol=1e-6)


def test_rdm_never_builds_an_n_by_n_by_d_tensor():
    n, d = 2000, 512  # an (n, n, d) float64 tensor would be 16 GB
    x = _data(n=n, d=d)
    tracemalloc.start()
    try:
        rdm(x, "euclidean")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1.6 * n * n * 8  # the (n, n) result plus block-sized temporaries


def test_rdm_rejects_zero_rows_for_cosine_and_unknown_metric():
    x = _data(n=5, d=3)
    x[2] = 0.0
    with pytest.raises(DataError, match=r"rows \[2\]"):
        rdm(x, "cosine")
    assert rdm(x, "euclidean").shape == (5, 5)
    with pytest.raises(ConfigError, match="euclidean"):
        rdm(x, "manhattan")


# ------------------------------------------------------------------------------------------- RSA
@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_rsa_equals_scipy_on_off_diagonal_upper_triangle(metric):
    x, y = _data(n=40, d=6, seed=2), _data(n=40, d=9, seed=3)
    y[:, :3] += 0.5 * x[:, :3]  # some shared structure
    upper = np.triu_indices(40, k=1)
    rdm_x, rdm_y = cdist(x, x, metric)[upper], cdist(y, y, metric)[upper]
    expected_spearman = scipy.stats.spearmanr(rdm_x, rdm_y).statistic
    expected_pearson = scipy.stats.pearsonr(rdm_x, rdm_y).statistic
    assert rsa(x, y, metric, "spearman") == pytest.approx(expected_spearman, abs=1e-12)
    assert rsa(x, y, metric, "pearson") == pytest.approx(expected_pearson, abs=1e-12)
    # The reference implementation's triangle keeps the n zero diagonal entries; that inflates RSA.
    with_diagonal = np.tril_indices(40)
    inflated = scipy.stats.spearmanr(cdist(x, x, metric)[with_diagonal], cdist(y, y, metric)[with_diagonal])
    assert inflated.statistic > expected_spearman + 0.01


def test_spearman_ranks_handle_ties_like_scipy():
    # Repeated rows (the same token's embedding at many positions) give many tied distances.
    x = np.repeat(_data(n=12, d=4, seed=20), 5, axis=0)
    y = np.repeat(_data(n=12, d=3, seed=21), 5, axis=0) + 0.3 * x[:, :3]
    for metric in ("cosine", "euclidean"):
        triangle = condensed_rdm(x, metric)
        assert np.unique(triangle).size < triangle.size / 2
        np.testing.assert_array_equal(similarity._average_ranks(triangle), scipy.stats.rankdata(triangle))
        expected = scipy.stats.spearmanr(triangle, condensed_rdm(y, metric)).statistic
        assert rsa(x, y, metric) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_rsa_is_one_for_rotated_scaled_copies(metric):
    x = _data(n=30, d=6, seed=4)
    assert rsa(x, 2.5 * x @ _orthogonal(6), metric) == pytest.approx(1.0, abs=1e-12)
    assert rsa(x, 2.5 * x @ _orthogonal(6), metric, "pearson") == pytest.approx(1.0, abs=1e-12)


def test_rsa_errors():
    x = _data(n=10, d=3)
    with pytest.raises(DataError, match="rows"):
        rsa(x, x[:9])
    with pytest.raises(ConfigError, match="spearman"):
        rsa(x, x, method="kendall")
    with pytest.raises(DataError, match="equal"):
        rsa(x, np.ones((10, 2)), metric="euclidean")
    with pytest.raises(DataError, match="reshaped"):
        rsa(x[None], x[None])


# ------------------------------------------------------------------------------------------- CKA
@pytest.mark.parametrize("estimator", ["biased", "unbiased"])
def test_cka_of_a_representation_with_itself_is_one(estimator):
    x = _data(n=50, d=10, offset=1.0)
    assert cka(x, x, estimator) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("estimator", ["biased", "unbiased"])
def test_cka_invariances(estimator):
    x, y = _data(n=80, d=12, seed=5), _data(n=80, d=7, seed=6)
    y[:, :4] += x[:, :4]
    base = cka(x, y, estimator)
    assert cka(x @ _orthogonal(12, seed=1), y, estimator) == pytest.approx(base, abs=1e-12)
    assert cka(x, y @ _orthogonal(7, seed=2), estimator) == pytest.approx(base, abs=1e-12)
    assert cka(7.0 * x, 0.01 * y, estimator) == pytest.approx(base, abs=1e-12)
    assert cka(x + 5.0, y - 3.0, estimator) == pytest.approx(base, abs=1e-10)
    assert cka(x, y, estimator) == pytest.approx(cka(y, x, estimator), abs=1e-12)
    # …but not to a non-isotropic rescaling of the features.
    assert abs(cka(x * np.linspace(0.1, 3, 12), y, estimator) - base) > 1e-3


@pytest.mark.parametrize("offset", [0.0, 4.0])
def test_cka_equals_naive_gram_implementation(offset):
    x, y = _data(n=45, d=9, seed=7, offset=offset), _data(n=45, d=5, seed=8, offset=-offset)
    y[:, :2] += 0.7 * x[:, :2]
    assert cka(x, y, "biased") == pytest.approx(_naive_cka_biased(x, y), abs=1e-10)
    # The unbiased estimator is translation invariant, so the uncentred naive Gram form must agree too.
    assert cka(x, y, "unbiased") == pytest.approx(_naive_cka_unbiased(x, y), abs=1e-10)


def test_unbiased_hsic_formula_equals_its_u_statistic_definition():
    x, y = _data(n=7, d=3, seed=9), _data(n=7, d=2, seed=10)
    k, l_ = x @ x.T, y @ y.T
    assert _naive_hsic_unbiased(k, l_) == pytest.approx(_u_statistic_hsic(k, l_), abs=1e-10)
    assert similarity._hsic_unbiased_pair(x, y) == pytest.approx(_u_statistic_hsic(k, l_), abs=1e-10)


def test_unbiased_cka_near_zero_for_independent_data_biased_is_not():
    rng = np.random.default_rng(11)
    x, y = rng.normal(size=(1000, 64)), rng.normal(size=(1000, 64))
    unbiased, biased = cka(x, y, "unbiased"), cka(x, y, "biased")
    assert abs(unbiased) < 0.02
    # Biased CKA of independent isotropic data is ≈ d/(n+d) ≈ 0.06 here.
    assert biased > 0.04 and biased > unbiased + 0.03


def test_cka_is_memory_safe_at_ten_thousand_rows():
    x = _data(n=10_000, d=128, seed=12)
    y = x[:, :64] + _data(n=10_000, d=64, seed=13)
    tracemalloc.start()
    try:
        cka(x, y, "biased")
        cka(x, y, "unbiased")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 60e6  # an n×n float64 Gram matrix alone would be 800 MB


def test_cka_errors_and_torch_input():
    x = _data(n=20, d=4)
    with pytest.raises(ConfigError, match="unbiased"):
        cka(x, x, "debiased")
    with pytest.raises(DataError, match="at least 4"):
        cka(x[:3], x[:3], "unbiased")
    with pytest.raises(DataError, match="constant"):
        cka(x, np.ones((20, 3)))
    with pytest.raises(DataError, match="constant"):
        cka(np.full((20, 3), 0.1), x, "unbiased")  # mean(0.1, …) ≠ 0.1 exactly: round-off residuals
    with pytest.raises(DataError, match="NaN"):
        cka(np.full((20, 2), np.nan), x)
    assert cka(torch.tensor(x, dtype=torch.float32), x) == pytest.approx(1.0, abs=1e-6)


# ----------------------------------------------------------------------------------- subsampling
def test_subsampled_same_rows_for_both_models_and_deterministic():
    x = _data(n=300, d=5, seed=14)
    seen = []

    def probe(x_rows, y_rows):
        np.testing.assert_array_equal(2.0 * x_rows, y_rows)  # rows paired across the two models
        seen.append(x_rows[:, 0].copy())
        return float(x_rows[:, 0].mean())

    first = subsampled(probe, x, 2.0 * x, n_rows=50, n_repeats=4, seed=3)
    assert first == subsampled(probe, x, 2.0 * x, n_rows=50, n_repeats=4, seed=3)
    assert first["n_rows"] == 50 and first["n_repeats"] == 4 and len(first["values"]) == 4
    assert first["mean"] == pytest.approx(np.mean(first["values"]))
    assert first["std"] == pytest.approx(np.std(first["values"], ddof=1))
    assert len({tuple(v) for v in seen[:4]}) == 4  # different subsets per repeat
    assert subsampled(probe, x, 2.0 * x, n_rows=50, n_repeats=4, seed=4)["values"] != first["values"]


def test_subsampled_uses_all_rows_once_when_asked_for_more():
    x = _data(n=30, d=3)
    result = subsampled(lambda a, b: cka(a, b), x, x, n_rows=1000, n_repeats=10)
    assert result["n_rows"] == 30 and result["n_repeats"] == 1 and result["std"] == 0.0
    with pytest.raises(ConfigError, match="n_repeats"):
        subsampled(lambda a, b: 0.0, x, x, n_repeats=0)


def test_compare_representations_on_rotated_copy_and_independent_data():
    x = _data(n=400, d=16, seed=15)
    same = compare_representations(x, 3.0 * x @ _orthogonal(16), n_rows=100, n_repeats=3, seed=0)
    names = [f"rsa_{m}_{c}" for m in ("cosine", "euclidean") for c in ("spearman", "pearson")]
    names += ["cka_biased", "cka_unbiased"]
    for name in names:
        assert same[name]["mean"] == pytest.approx(1.0, abs=1e-10), name
        assert len(same[name]["values"]) == 3
    assert same["cka_unbiased_all_rows"] == pytest.approx(1.0, abs=1e-12)
    assert (same["n_rows"], same["n_repeats"], same["n_total"]) == (100, 3, 400)

    other = compare_representations(x, _data(n=400, d=16, seed=16), n_rows=100, n_repeats=3, seed=0)
    assert abs(other["rsa_cosine_spearman"]["mean"]) < 0.1
    assert other["cka_biased"]["mean"] > other["cka_unbiased"]["mean"]
    # Same seed → same subsets as subsampled() uses.
    direct = subsampled(lambda a, b: rsa(a, b, "euclidean", "pearson"), x, _data(n=400, d=16, seed=16),
                        n_rows=100, n_repeats=3, seed=0)
    assert direct["values"] == pytest.approx(other["rsa_euclidean_pearson"]["values"], abs=1e-12)


# ------------------------------------------------- exact ties; scipy and rsatoolbox as oracles (issue 21)
def _oracle_cases():
    """(name, X, Y) pairs: duplicated rows, constant features, n = 5 and n = 2000; float64 as drawn."""
    rng = np.random.default_rng(21)
    distinct = rng.normal(size=(5, 64))  # 5 distinct 64-d rows, each repeated 100 times, shuffled
    order = rng.permutation(500)
    x_dup = np.repeat(distinct, 100, axis=0)[order]
    # A noisy rotation of the 5 rows, repeated the same way, so Y's copies are exact copies as well.
    y_dup = np.repeat(distinct @ _orthogonal(64, seed=5) + 0.3 * rng.normal(size=(5, 64)), 100, axis=0)[order]
    x_const = rng.normal(size=(300, 12))
    x_const[:, [2, 7]] = 3.0  # constant features: every distance ignores them
    y_const = np.concatenate([x_const @ _orthogonal(12, seed=6), np.full((300, 3), -1.5)], axis=1)
    y_const += 0.5 * rng.normal(size=y_const.shape) * (y_const != -1.5)
    x_small, y_small = rng.normal(size=(5, 7)), rng.normal(size=(5, 4))
    x_big = rng.normal(size=(2000, 16))
    y_big = np.tanh(x_big @ rng.normal(size=(16, 10)))
    return [("duplicated", x_dup, y_dup), ("constant_features", x_const, y_const), ("n5", x_small, y_small),
            ("n2000", x_big, y_big)]


def _pdist_oracle(x, metric):
    """scipy's pdist, with 0 for identical rows. scipy's cosine computes 1 − u·u/‖u‖² for a row and its
    copy, which is 0 or ±1e-16 depending on the row: its own round-off would break the ties we test."""
    expected = pdist(x, metric)
    if metric == "cosine":
        expected[pdist(x, "hamming") == 0] = 0.0
    return expected


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("case", range(4), ids=["duplicated", "constant_features", "n5", "n2000"])
def test_rdm_and_rsa_equal_scipy_with_exact_ties(case, dtype):
    name, x, y = _oracle_cases()[case]
    x, y = x.astype(dtype), y.astype(dtype)  # pdist and ours both read float32 rows as float64
    for metric in ("cosine", "euclidean"):
        expected_x, expected_y = _pdist_oracle(x, metric), _pdist_oracle(y, metric)
        ours_x, ours_y = condensed_rdm(x, metric), condensed_rdm(y, metric)
        np.testing.assert_allclose(ours_x, expected_x, atol=1e-10, rtol=0)
        np.testing.assert_allclose(ours_y, expected_y, atol=1e-10, rtol=0)
        # Exact ties: a row and its copy are exactly 0 apart; copies of one pair share one value.
        identical = pdist(x, "hamming") == 0
        assert np.all(ours_x[identical] == 0.0)
        if name == "duplicated":
            assert identical.sum() == 5 * 100 * 99 // 2
            assert np.unique(ours_x).size == np.unique(ours_y).size == 10 + 1  # 10 pairs of distinct rows, 0
        square = rdm(x, metric)
        np.testing.assert_array_equal(square, square.T)
        np.testing.assert_array_equal(square[np.triu_indices(x.shape[0], 1)], ours_x)
        spearman = scipy.stats.spearmanr(expected_x, expected_y).statistic
        pearson = scipy.stats.pearsonr(expected_x, expected_y).statistic
        assert abs(rsa(x, y, metric, "spearman") - spearman) <= 1e-10, (name, metric)
        assert abs(rsa(x, y, metric, "pearson") - pearson) <= 1e-10, (name, metric)


def test_duplicated_rows_rsa_of_the_issue():
    # Issue 21's case through the public entry point. The Gram identity left copies ~1e-7 apart, which
    # ranked them apart: here 0.946446 (Euclidean) and 0.958833 (cosine) for scipy's 0.949903 and 0.962427.
    _, x, y = _oracle_cases()[0]
    for metric in ("cosine", "euclidean"):
        expected = scipy.stats.spearmanr(_pdist_oracle(x, metric), _pdist_oracle(y, metric)).statistic
        result = compare_representations(x, y, n_rows=500, n_repeats=1)
        assert abs(result[f"rsa_{metric}_spearman"]["mean"] - expected) <= 1e-10


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("case", range(4), ids=["duplicated", "constant_features", "n5", "n2000"])
def test_rdms_equal_rsatoolbox(case, dtype):
    name, x, y = _oracle_cases()[case]
    for z in (x.astype(dtype).astype(np.float64), y.astype(dtype).astype(np.float64)):
        data = rsatoolbox.data.Dataset(z)
        # rsatoolbox's "euclidean" RDM is the squared distance over the number of features.
        squared = rsatoolbox.rdm.calc_rdm(data, method="euclidean").get_vectors()[0]
        np.testing.assert_allclose(condensed_rdm(z, "euclidean") ** 2 / z.shape[1], squared, atol=1e-10, rtol=0)
        # Its "correlation" RDM is the cosine distance of rows centred over their features.
        centred = z - z.mean(axis=1, keepdims=True)
        correlation = rsatoolbox.rdm.calc_rdm(data, method="correlation").get_vectors()[0]
        np.testing.assert_allclose(condensed_rdm(centred, "cosine"), correlation, atol=1e-10, rtol=0)
    if name == "n2000":  # no tied distances: rsatoolbox's Gram-identity RDMs rank as the exact ones
        rdms = [rsatoolbox.rdm.calc_rdm(rsatoolbox.data.Dataset(z.astype(dtype).astype(np.float64)),
                                        method="euclidean") for z in (x, y)]
        expected = rsatoolbox.rdm.compare(rdms[0], rdms[1], method="spearman")[0, 0]
        assert abs(rsa(x.astype(dtype), y.astype(dtype), "euclidean") - expected) <= 1e-10
