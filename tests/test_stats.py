"""Known-answer and property tests of llm_mas.stats (bootstrap CIs, permutation tests, group means)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats

from llm_mas.errors import ConfigError, DataError
from llm_mas.stats import bootstrap_ci, group_means, mean_ci, paired_comparison, permutation_test


# ------------------------------------------------------------------------------------ bootstrap
def test_bootstrap_ci_of_constant_is_degenerate():
    lo, hi = bootstrap_ci([0.1] * 50)
    assert lo == hi == pytest.approx(0.1)
    summary = mean_ci([0.1] * 50)
    assert summary["lo"] == summary["mean"] == summary["hi"]
    assert mean_ci(np.ones(7)) == {"mean": 1.0, "lo": 1.0, "hi": 1.0, "n": 7}


def test_bootstrap_ci_is_deterministic_under_seed_and_changes_with_it():
    values = np.random.default_rng(1).normal(size=40)
    assert bootstrap_ci(values, seed=3) == bootstrap_ci(values, seed=3)
    assert bootstrap_ci(values, seed=3) != bootstrap_ci(values, seed=4)


def test_bootstrap_ci_contains_mean_and_narrows_with_level():
    values = np.random.default_rng(2).normal(loc=5.0, size=200)
    lo95, hi95 = bootstrap_ci(values, level=0.95)
    lo50, hi50 = bootstrap_ci(values, level=0.50)
    assert lo95 < lo50 < values.mean() < hi50 < hi95


def test_bootstrap_ci_matches_normal_theory_width():
    # For the mean of n Gaussian values the 95 % CI half-width is ≈ 1.96 σ / √n.
    values = np.random.default_rng(3).normal(scale=2.0, size=400)
    lo, hi = bootstrap_ci(values, n_boot=4000)
    expected = 1.96 * values.std(ddof=1) / math.sqrt(values.size)
    assert (hi - lo) / 2 == pytest.approx(expected, rel=0.1)


def test_bootstrap_ci_per_trial_bool_outcomes():
    trials = np.array([True] * 90 + [False] * 10)
    summary = mean_ci(trials, n_boot=2000)
    assert summary["mean"] == pytest.approx(0.9) and summary["n"] == 100
    assert 0.8 < summary["lo"] < 0.9 < summary["hi"] <= 1.0


def test_bootstrap_coverage_on_gaussian_data():
    # 95 % percentile intervals of the mean of n=50 N(0,1) draws cover 0 in roughly 95 % of datasets.
    rng = np.random.default_rng(4)
    covered = 0
    n_datasets = 200
    for k in range(n_datasets):
        lo, hi = bootstrap_ci(rng.normal(size=50), n_boot=1000, seed=k)
        covered += lo <= 0.0 <= hi
    assert 0.88 <= covered / n_datasets <= 0.99


def test_bootstrap_non_vectorised_statistic_matches_vectorised():
    values = np.random.default_rng(5).normal(size=30)
    vectorised = bootstrap_ci(values, stat=np.median, n_boot=300, seed=1)
    looped = bootstrap_ci(values, stat=lambda x: np.median(x), n_boot=300, seed=1)
    # Same seed, same resample order → identical intervals whether or not the statistic vectorises.
    assert vectorised == pytest.approx(looped)


@pytest.mark.parametrize("bad", [[], np.array([]), [1.0, np.nan], [[1, 2], [3, 4]]])
def test_bootstrap_rejects_bad_input(bad):
    with pytest.raises(DataError):
        bootstrap_ci(bad)


def test_bootstrap_rejects_bad_settings():
    with pytest.raises(ConfigError, match="level"):
        bootstrap_ci([1, 2], level=95)
    with pytest.raises(ConfigError, match="n_boot"):
        bootstrap_ci([1, 2], n_boot=0)
    with pytest.raises(ConfigError, match="stat"):
        mean_ci([1, 2], stat=np.median)


# ------------------------------------------------------------------------------ permutation test
def test_permutation_exact_known_answer():
    # 20 splits of 6 values into 3 + 3; only the observed one has mean difference -3.
    result = permutation_test([1, 2, 3], [4, 5, 6], alternative="less")
    assert result["exact"] and result["n_perm"] == 20
    assert result["statistic"] == pytest.approx(-3.0)
    assert result["p_value"] == pytest.approx(1 / 20)
    assert permutation_test([4, 5, 6], [1, 2, 3], alternative="greater")["p_value"] == pytest.approx(1 / 20)
    assert permutation_test([1, 2, 3], [4, 5, 6], alternative="two-sided")["p_value"] == pytest.approx(2 / 20)
    assert permutation_test([1, 2, 3], [4, 5, 6], alternative="greater")["p_value"] == pytest.approx(1.0)


def test_permutation_exact_hand_computed_with_ties():
    # a=[1, 3], b=[2, 4]: 6 splits; mean(a)-mean(b) over the a-pairs
    # {1,3}:-1 {1,2}:-2 {1,4}:0 {3,2}:0 {3,4}:2 {2,4}:1 ; observed -1 → P(T >= -1) = 5/6, P(T <= -1) = 2/6.
    assert permutation_test([1, 3], [2, 4], alternative="greater")["p_value"] == pytest.approx(5 / 6)
    assert permutation_test([1, 3], [2, 4], alternative="less")["p_value"] == pytest.approx(2 / 6)
    # Ties in values: a=[0, 1], b=[1, 1]: T = -0.5 for the 3 splits putting 0 in a, else +0.5; observed -0.5.
    assert permutation_test([0, 1], [1, 1], alternative="less")["p_value"] == pytest.approx(3 / 6)


@pytest.mark.parametrize("alternative", ["greater", "less", "two-sided"])
def test_permutation_exact_matches_scipy(alternative):
    rng = np.random.default_rng(6)
    a, b = rng.normal(size=5), rng.normal(loc=0.5, size=6)
    ours = permutation_test(a, b, alternative=alternative)
    theirs = scipy.stats.permutation_test(
        (a, b), lambda x, y, axis: np.mean(x, axis=axis) - np.mean(y, axis=axis),
        permutation_type="independent", alternative=alternative, n_resamples=10_000, vectorized=True)
    assert ours["exact"] and ours["n_perm"] == math.comb(11, 5)
    assert ours["p_value"] == pytest.approx(theirs.pvalue, abs=1e-12)


def test_permutation_monte_carlo_close_to_exact_and_never_zero():
    rng = np.random.default_rng(7)
    a, b = rng.normal(size=7), rng.normal(loc=0.8, size=7)  # 3432 distinct splits
    exact = permutation_test(a, b, alternative="less", n_perm=10_000)
    sampled = permutation_test(a, b, alternative="less", n_perm=2_000, seed=1)
    assert exact["exact"] and not sampled["exact"] and sampled["n_perm"] == 2_000
    assert sampled["p_value"] == pytest.approx(exact["p_value"], abs=0.02)
    # Perfect separation with many splits: Monte Carlo p is (0 + 1) / (n_perm + 1), never 0.
    far = permutation_test(np.arange(20) + 100.0, np.arange(20), n_perm=999, alternative="greater")
    assert far["p_value"] == pytest.approx(1 / 1000)


def test_permutation_deterministic_under_seed():
    rng = np.random.default_rng(8)
    a, b = rng.normal(size=30), rng.normal(size=30)
    assert permutation_test(a, b, n_perm=500, seed=2) == permutation_test(a, b, n_perm=500, seed=2)
    assert permutation_test(a, b, n_perm=500, seed=2)["p_value"] != permutation_test(a, b, n_perm=500, seed=3)[
        "p_value"]


def test_permutation_null_p_values_roughly_uniform():
    # Under H0 P(p <= 0.1) ≈ 0.1 (a size check on 200 seeded datasets).
    rng = np.random.default_rng(9)
    p_values = [permutation_test(rng.normal(size=15), rng.normal(size=15), n_perm=300, seed=k)["p_value"]
                for k in range(200)]
    assert 0.04 <= np.mean(np.array(p_values) <= 0.1) <= 0.17


def test_permutation_median_and_callable_statistics():
    median = permutation_test([1, 2, 30], [4, 5, 6], stat="median_diff", alternative="less")
    assert median["statistic"] == pytest.approx(-3.0)
    custom = permutation_test([1, 2, 3], [4, 5, 6], alternative="less",
                              stat=lambda x, y: float(np.mean(x) - np.mean(y)))
    assert custom["p_value"] == pytest.approx(1 / 20)


def test_permutation_rejects_bad_input():
    with pytest.raises(DataError, match="a is empty"):
        permutation_test([], [1, 2])
    with pytest.raises(DataError, match="b"):
        permutation_test([1, 2], [np.nan])
    with pytest.raises(ConfigError, match="two-sided"):
        permutation_test([1], [2], alternative="both")
    with pytest.raises(ConfigError, match="mean_diff"):
        permutation_test([1], [2], stat="mean")


# ---------------------------------------------------------------------------------- group means
def test_group_means_pools_cells_by_group_pair():
    groups = ["toxic", "toxic", "nontoxic"]
    matrix = np.array([[0.9, 0.8, 0.3],
                       [0.7, 0.95, 0.2],
                       [0.4, 0.5, 0.99]])
    result = group_means(matrix, groups, n_boot=200)
    assert list(result) == [("toxic", "toxic"), ("toxic", "nontoxic"), ("nontoxic", "toxic"),
                            ("nontoxic", "nontoxic")]
    assert result[("toxic", "toxic")]["cells"] == [(0, 1), (1, 0)]
    assert result[("toxic", "toxic")]["mean"] == pytest.approx(0.75)
    assert result[("toxic", "nontoxic")]["mean"] == pytest.approx(0.25)
    assert result[("nontoxic", "toxic")]["n"] == 2
    assert result[("nontoxic", "nontoxic")]["n"] == 0 and math.isnan(result[("nontoxic", "nontoxic")]["mean"])

    with_diagonal = group_means(matrix, groups, include_diagonal=True, n_boot=200)
    assert with_diagonal[("toxic", "toxic")]["mean"] == pytest.approx((0.9 + 0.8 + 0.7 + 0.95) / 4)
    assert with_diagonal[("nontoxic", "nontoxic")]["mean"] == pytest.approx(0.99)

    unordered = group_means(matrix, groups, ordered=False, n_boot=200)
    assert set(unordered) == {("toxic", "toxic"), ("nontoxic", "toxic"), ("nontoxic", "nontoxic")}
    assert unordered[("nontoxic", "toxic")]["mean"] == pytest.approx((0.3 + 0.2 + 0.4 + 0.5) / 4)


def test_group_means_pools_per_seed_values():
    matrix = np.arange(2 * 2 * 3, dtype=float).reshape(2, 2, 3)  # (n, n, seeds)
    result = group_means(matrix, ["a", "b"], n_boot=100)
    np.testing.assert_array_equal(result[("a", "b")]["values"], [3.0, 4.0, 5.0])
    assert result[("a", "b")]["n"] == 3


def test_group_means_rejects_shape_mismatch_and_nan():
    with pytest.raises(DataError, match="groups"):
        group_means(np.zeros((3, 3)), ["a", "b"])
    with pytest.raises(DataError, match="NaN"):
        group_means(np.array([[1.0, np.nan], [0.5, 1.0]]), ["a", "b"])


# ------------------------------------------------------------------------------------------ t interval
@pytest.mark.parametrize("values,level", [([0.2, 0.5, 0.4], 0.95), ([1.0, 2.0, 4.0, 8.0, 3.5], 0.9),
                                          ([0.7, 0.71], 0.99)])
def test_t_interval_matches_scipy(values, level):
    from llm_mas.stats import t_interval

    mean, lo, hi = t_interval(values, level=level)
    a = np.asarray(values)
    ref = scipy.stats.t.interval(level, a.size - 1, loc=a.mean(), scale=scipy.stats.sem(a))
    assert mean == pytest.approx(a.mean())
    assert (lo, hi) == pytest.approx(ref, rel=1e-12)


def test_t_interval_edge_cases_and_bad_input():
    from llm_mas.stats import t_interval

    assert all(math.isnan(v) for v in t_interval([]))
    mean, lo, hi = t_interval([0.3])
    assert mean == 0.3 and math.isnan(lo) and math.isnan(hi)
    assert t_interval([0.5, 0.5, 0.5]) == (0.5, 0.5, 0.5)          # no spread: a point interval
    with pytest.raises(DataError, match="non-finite"):
        t_interval([0.1, float("nan")])
    with pytest.raises(ConfigError):
        t_interval([0.1, 0.2], level=1.5)


# ------------------------------------------------------------------------------------------ label permutation
def _brute_force(matrix, groups, statistic):
    """Every distinct relabelling by enumerating all n! orders of the labels (duplicates removed)."""
    import itertools

    seen, values = set(), []
    for order in itertools.permutations(range(len(groups))):
        labels = tuple(groups[i] for i in order)
        if labels in seen:
            continue
        seen.add(labels)
        values.append(statistic(matrix, labels))
    return np.array(values), statistic(matrix, tuple(groups))


def _mean_cells(m, labels, a, b):
    cells = [m[i, j] for i in range(len(labels)) for j in range(len(labels))
             if i != j and labels[i] == a and labels[j] == b]
    return float(np.mean(cells))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_label_permutation_with_versus_is_exact_enumeration_over_the_two_groups(seed):
    from llm_mas.stats import label_permutation_test

    rng = np.random.default_rng(seed)
    groups = ["trait"] * 3 + ["clean"] * 3 + ["shift"] * 3
    m = rng.uniform(0, 1, (9, 9))
    keep = [0, 1, 2, 3, 4, 5]          # trait and clean models only: shift is set aside
    sub, sub_groups = m[np.ix_(keep, keep)], groups[:6]
    null, observed = _brute_force(sub, sub_groups, lambda x, lab: _mean_cells(x, lab, "trait", "trait")
                                  - _mean_cells(x, lab, "trait", "clean"))
    result = label_permutation_test(m, groups, "trait", versus="clean", alternative="greater")
    assert result["n_labelings"] == 20 and result["exact"] and result["models"] == keep
    assert result["statistic"] == pytest.approx(observed)
    assert result["p_value"] == pytest.approx(np.mean(null >= observed - 1e-12))
    assert sorted(result["null"]) == pytest.approx(sorted(null))
    assert result["name"] == "trait→trait vs trait→clean"


@pytest.mark.parametrize("seed", [3, 4])
def test_within_contrast_is_exact_enumeration_and_antisymmetric(seed):
    from llm_mas.stats import label_permutation_test

    rng = np.random.default_rng(seed)
    groups = ["trait"] * 3 + ["clean"] * 3 + ["shift"] * 3
    m = rng.uniform(0, 1, (9, 9))
    keep = [0, 1, 2, 6, 7, 8]
    sub, sub_groups = m[np.ix_(keep, keep)], [groups[i] for i in keep]
    null, observed = _brute_force(sub, sub_groups, lambda x, lab: _mean_cells(x, lab, "trait", "trait")
                                  - _mean_cells(x, lab, "shift", "shift"))
    result = label_permutation_test(m, groups, "trait", versus="shift", contrast_kind="within",
                                    alternative="two-sided")
    p_greater, p_less = np.mean(null >= observed - 1e-12), np.mean(null <= observed + 1e-12)
    assert result["statistic"] == pytest.approx(observed)
    assert result["p_value"] == pytest.approx(min(1.0, 2 * min(p_greater, p_less)))
    assert result["min_p"] == pytest.approx(2 / 20)   # no labelling ties structurally: 1/20 per side
    swapped = label_permutation_test(m, groups, "shift", versus="trait", contrast_kind="within",
                                     alternative="two-sided")
    assert swapped["statistic"] == pytest.approx(-observed) and swapped["p_value"] == pytest.approx(result["p_value"])


def test_within_block_matrix_known_p():
    """trait→trait 1, shift→shift 0, everything else 0.5: only the observed labelling puts all three
    high-IIA models under 'trait', so the one-sided p is the floor 1/20."""
    from llm_mas.stats import label_permutation_test

    groups = ["trait"] * 3 + ["shift"] * 3
    m = np.full((6, 6), 0.5)
    m[:3, :3], m[3:, 3:] = 1.0, 0.0
    result = label_permutation_test(m, groups, "trait", versus="shift", contrast_kind="within")
    assert result["statistic"] == pytest.approx(1.0) and result["p_value"] == pytest.approx(1 / 20)


def test_label_permutation_bad_versus():
    from llm_mas.stats import label_permutation_test

    groups = ["a"] * 2 + ["b"] * 2 + ["c"] * 2
    m = np.zeros((6, 6))
    with pytest.raises(ConfigError, match="pass versus"):
        label_permutation_test(m, groups, "a", contrast_kind="within")
    with pytest.raises(ConfigError, match="versus='a' equals group"):
        label_permutation_test(m, groups, "a", versus="a")
    with pytest.raises(ConfigError, match="'d'"):
        label_permutation_test(m, groups, "a", versus="d")


def test_paired_comparison_by_hand():
    """a = [1, 1, 0, 1, 0], b = [1, 0, 0, 0, 1]: means 0.6 and 0.4, diff 0.2; a alone right on pairs 1 and 3,
    b alone on pair 4: McNemar's exact p = 2 · P(Bin(3, ½) ≤ 1) = 2 · 4/8 = 1 (capped)."""
    out = paired_comparison([1, 1, 0, 1, 0], [1, 0, 0, 0, 1])
    assert out["n"] == 5 and out["a_only"] == 2 and out["b_only"] == 1 and out["p"] == 1.0
    assert math.isclose(out["a"], 0.6) and math.isclose(out["b"], 0.4) and math.isclose(out["diff"], 0.2)
    assert (out["diff_lo"], out["diff_hi"]) == bootstrap_ci(np.array([0, 1, 0, 1, -1.0]), seed=0)
    same = paired_comparison([1, 0, 1], [1, 0, 1])            # no discordant pair
    assert same["p"] == 1.0 and same["diff"] == same["diff_lo"] == same["diff_hi"] == 0.0


@pytest.mark.parametrize("a_only, b_only", [(0, 3), (7, 1), (40, 25), (600, 700), (1100, 1000)])
def test_paired_comparison_p_matches_scipy_binomtest(a_only, b_only):
    """Exact integer arithmetic: also past 1 024 discordant pairs, where 2.0 ** n overflows."""
    both = 5
    a = np.r_[np.ones(a_only), np.zeros(b_only), np.ones(both), np.zeros(4)]
    b = np.r_[np.zeros(a_only), np.ones(b_only), np.ones(both), np.zeros(4)]
    out = paired_comparison(a, b, n_boot=200)
    expected = scipy.stats.binomtest(a_only, a_only + b_only, 0.5).pvalue
    assert math.isclose(out["p"], expected, rel_tol=1e-9, abs_tol=1e-300)
    assert out["diff_lo"] <= out["diff"] <= out["diff_hi"]


def test_paired_comparison_rejects_unpaired_or_non_binary_outcomes():
    with pytest.raises(DataError, match="same pairs, got 3 and 2"):
        paired_comparison([1, 0, 1], [1, 0])
    with pytest.raises(DataError, match=r"0/1 outcomes .*got \[0.5\]"):
        paired_comparison([1, 0.5], [1, 0])
