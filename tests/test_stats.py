"""gbla.stats against scipy, textbook values and hand computations."""
import itertools
import math

import numpy as np
import pytest
from scipy import stats as sps

from gbla import stats


def test_per_user_metric_from_ranks():
    rank = np.array([0, 1, 2, 5, 6, 10], dtype=np.int8)
    np.testing.assert_array_equal(stats.per_user_metric(rank, "recall@5"), [0, 1, 1, 1, 0, 0])
    np.testing.assert_array_equal(stats.per_user_metric(rank, "recall@10"), [0, 1, 1, 1, 1, 1])
    expected = [0, 1.0, 1 / math.log2(3), 1 / math.log2(6), 1 / math.log2(7), 1 / math.log2(11)]
    np.testing.assert_allclose(stats.per_user_metric(rank, "ndcg@10"), expected)
    np.testing.assert_allclose(stats.per_user_metric(rank, "ndcg@5"), expected[:4] + [0, 0])
    with pytest.raises(ValueError, match="unknown metric 'hits@3'"):
        stats.per_user_metric(rank, "hits@3")
    with pytest.raises(ValueError, match=">= 0"):
        stats.per_user_metric(np.array([-1, 2]), "recall@5")


def test_mean_ci_matches_textbook_t_interval():
    x = np.array([0.050, 0.052, 0.049, 0.051, 0.055])
    out = stats.mean_ci(x)
    half = 2.7764451051977987 * x.std(ddof=1) / math.sqrt(5)   # t_{0.975, 4} from a t table
    assert out["n"] == 5
    assert out["mean"] == pytest.approx(0.0514)
    assert out["ci_low"] == pytest.approx(0.0514 - half, rel=1e-12)
    assert out["ci_high"] == pytest.approx(0.0514 + half, rel=1e-12)


def test_mean_ci_leaves_out_missing_and_degenerate_cases():
    out = stats.mean_ci([0.1, np.nan, 0.3])
    assert out["n"] == 2 and out["mean"] == pytest.approx(0.2)
    assert out["ci_low"] < 0.2 < out["ci_high"]
    one = stats.mean_ci([0.1, np.nan])
    assert one["n"] == 1 and one["mean"] == 0.1 and math.isnan(one["ci_low"])
    none = stats.mean_ci([])
    assert none["n"] == 0 and math.isnan(none["mean"])
    same = stats.mean_ci([0.2, 0.2, 0.2])
    assert same["ci_low"] == same["ci_high"] == pytest.approx(0.2)


def test_paired_ttest_matches_scipy_and_hand_formula():
    a = np.array([0.061, 0.064, 0.059, 0.066, 0.062])
    b = np.array([0.060, 0.061, 0.060, 0.062, 0.060])
    out = stats.paired_ttest(a, b)
    d = a - b
    t_hand = d.mean() / (d.std(ddof=1) / math.sqrt(5))
    assert out["t"] == pytest.approx(t_hand, rel=1e-12)
    assert out["p"] == pytest.approx(2 * sps.t.sf(abs(t_hand), 4), rel=1e-12)
    assert out["p"] == pytest.approx(sps.ttest_rel(a, b).pvalue, rel=1e-12)
    assert out["ci_low"] < d.mean() < out["ci_high"]
    # a missing seed on one side drops that pair
    a2 = a.copy(); a2[2] = np.nan
    assert stats.paired_ttest(a2, b)["n"] == 4
    assert stats.paired_ttest(a2, b)["p"] == pytest.approx(sps.ttest_rel(np.delete(a, 2), np.delete(b, 2)).pvalue)


def test_paired_ttest_with_too_few_pairs_gives_nan_and_reason():
    out = stats.paired_ttest([0.1, np.nan], [0.2, 0.3])
    assert out["n"] == 1 and math.isnan(out["p"]) and "at least 2" in out["reason"]
    out = stats.paired_ttest([0.2, 0.3, 0.4], [0.1, 0.2, 0.3])
    assert math.isnan(out["p"]) and "all equal" in out["reason"]
    assert out["diff"] == pytest.approx(0.1)


def test_holm_textbook_example():
    # p sorted: 0.005*4=0.02, 0.01*3=0.03, 0.03*2=0.06, 0.04*1=0.04 -> running max 0.06
    adjusted = stats.holm([0.01, 0.04, 0.03, 0.005])
    np.testing.assert_allclose(adjusted, [0.03, 0.06, 0.06, 0.02])
    np.testing.assert_allclose(stats.holm([0.5, 0.9]), [1.0, 1.0])


def test_holm_equals_closed_testing_with_bonferroni():
    """Holm = closed testing of all intersection hypotheses with Bonferroni local tests."""
    rng = np.random.default_rng(1)
    for _ in range(20):
        p = rng.uniform(0, 0.2, size=5)
        closed = [max(min(1.0, len(J) * min(p[list(J)]))
                      for r in range(1, 6) for J in itertools.combinations(range(5), r) if i in J)
                  for i in range(5)]
        np.testing.assert_allclose(stats.holm(p), closed, rtol=1e-12)


def test_holm_keeps_nan_out_of_the_family():
    adjusted = stats.holm([0.01, np.nan, 0.04])
    assert math.isnan(adjusted[1])
    np.testing.assert_allclose(adjusted[[0, 2]], [0.02, 0.04])
    assert np.isnan(stats.holm([np.nan, np.nan])).all()


def test_tost_against_hand_computation():
    d = np.array([0.0010, -0.0020, 0.0005, 0.0015, -0.0005])
    margin = 0.003
    out = stats.tost(d, margin)
    se = d.std(ddof=1) / math.sqrt(5)
    p_lower = sps.t.sf((d.mean() + margin) / se, 4)     # H0: mean <= -margin
    p_upper = sps.t.cdf((d.mean() - margin) / se, 4)    # H0: mean >= +margin
    assert out["p_lower"] == pytest.approx(p_lower, rel=1e-10)
    assert out["p_upper"] == pytest.approx(p_upper, rel=1e-10)
    assert out["p"] == pytest.approx(max(p_lower, p_upper), rel=1e-10)
    assert out["equivalent"] is True
    # the decision is the same as "the 90% CI lies inside the margins"
    half = sps.t.ppf(0.95, 4) * se
    assert out["ci_low"] == pytest.approx(d.mean() - half) and out["ci_high"] == pytest.approx(d.mean() + half)
    narrow = stats.tost(d, 0.001)
    assert narrow["equivalent"] is False and narrow["p"] > 0.05
    assert (narrow["ci_low"] < -0.001) or (narrow["ci_high"] > 0.001)


def test_tost_degenerate_inputs():
    assert "at least 2" in stats.tost([0.1], 0.5)["reason"]
    assert stats.tost([0.1, 0.2], 0.0)["equivalent"] is None
    assert "all equal" in stats.tost([0.1, 0.1, 0.1], 0.5)["reason"]


def test_sign_flip_matches_scipy_exact_permutation_test():
    rng = np.random.default_rng(2)
    x = rng.normal(0.3, 1.0, 12)
    y = rng.normal(0.0, 1.0, 12)
    exact = sps.permutation_test((x, y), lambda a, b, axis: np.mean(a - b, axis=axis),
                                 permutation_type="samples", n_resamples=np.inf, vectorized=True)
    ours = stats.sign_flip_test(x - y, n_resamples=20_000, seed=0)
    assert ours["p"] == pytest.approx(exact.pvalue, abs=0.01)
    assert ours["diff"] == pytest.approx(np.mean(x - y))


def test_sign_flip_close_to_t_test_on_large_normal_sample():
    rng = np.random.default_rng(3)
    d = rng.normal(0.03, 1.0, 4000)
    ours = stats.sign_flip_test(d, n_resamples=20_000, seed=0)
    t_p = sps.ttest_1samp(d, 0.0).pvalue
    assert 0.001 < t_p < 0.2
    assert ours["p"] == pytest.approx(t_p, rel=0.15, abs=0.003)


def test_sign_flip_on_discrete_differences_and_edge_cases():
    rng = np.random.default_rng(4)
    # recall-like differences in {-1, 0, 1}: the binomial draw per distinct magnitude must behave
    d = rng.choice([-1.0, 0.0, 1.0], p=[0.05, 0.88, 0.07], size=6000)
    ours = stats.sign_flip_test(d, n_resamples=20_000, seed=0)
    # exact null: #(+1) among nonzero ~ Binomial(m, 1/2); two-sided p from that distribution
    m, k = int((d != 0).sum()), int((d > 0).sum())
    exact = sps.binomtest(k, m, 0.5).pvalue
    assert ours["p"] == pytest.approx(exact, rel=0.1, abs=0.003)
    assert stats.sign_flip_test(np.zeros(5))["p"] == 1.0
    tiny = stats.sign_flip_test(np.full(50, 1.0), n_resamples=999)
    assert tiny["p"] == pytest.approx(1 / 1000)  # +1 correction: never 0


def test_bootstrap_matches_scipy_percentile_bootstrap():
    rng = np.random.default_rng(5)
    b = rng.gamma(2.0, 0.05, 60)
    a = b + rng.normal(0.01, 0.03, 60)
    ours = stats.paired_bootstrap(a, b, n_resamples=20_000, seed=0)
    ref = sps.bootstrap((a, b), lambda x, y, axis: np.mean(x - y, axis=axis), paired=True,
                        vectorized=True, method="percentile", n_resamples=20_000, rng=1)
    width = ref.confidence_interval.high - ref.confidence_interval.low
    assert ours["ci_low"] == pytest.approx(ref.confidence_interval.low, abs=0.03 * width)
    assert ours["ci_high"] == pytest.approx(ref.confidence_interval.high, abs=0.03 * width)
    ref_pct = sps.bootstrap((a, b), lambda x, y, axis: 100 * (np.mean(x, axis=axis) / np.mean(y, axis=axis) - 1),
                            paired=True, vectorized=True, method="percentile", n_resamples=20_000, rng=1)
    pwidth = ref_pct.confidence_interval.high - ref_pct.confidence_interval.low
    assert ours["pct"] == pytest.approx(100 * (a.mean() / b.mean() - 1))
    assert ours["pct_ci_low"] == pytest.approx(ref_pct.confidence_interval.low, abs=0.03 * pwidth)
    assert ours["pct_ci_high"] == pytest.approx(ref_pct.confidence_interval.high, abs=0.03 * pwidth)


def test_bootstrap_ci_covers_the_true_difference():
    """95% CIs from repeated samples of correlated Bernoulli 'hits' cover the true difference ~95%."""
    rng = np.random.default_rng(6)
    true_diff = 0.12 - 0.10
    covered = 0
    reps = 200
    for r in range(reps):
        base = rng.random(800)
        ref = (base < 0.10).astype(float)
        var = (base < 0.10) & (rng.random(800) > 0.05)           # keeps most reference hits ...
        var = var | ((base >= 0.10) & (rng.random(800) < (0.12 - 0.095) / 0.90))  # ... and adds new ones
        out = stats.paired_bootstrap(var.astype(float), ref, n_resamples=1000, seed=r)
        covered += out["ci_low"] <= true_diff <= out["ci_high"]
    assert 0.89 <= covered / reps <= 0.99


def test_bootstrap_rejects_unmatched_input():
    with pytest.raises(ValueError, match="equal length"):
        stats.paired_bootstrap([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="NaN"):
        stats.paired_bootstrap([1.0, np.nan], [1.0, 2.0])
    assert "at least 2" in stats.paired_bootstrap([1.0], [0.5])["reason"]


def test_paired_mde_has_the_power_it_claims():
    """At the MDE, simulated paired t-tests (normal differences) reject in 80% of draws; the value
    matches the normal approximation for many pairs and the noncentral t where scipy's nct works."""
    from gbla.stats import paired_mde

    rng = np.random.default_rng(0)
    n, sd = 5, 0.002
    mde = paired_mde(sd, n)
    d = rng.normal(mde, sd, size=(40_000, n))
    p = sps.ttest_1samp(d, 0.0, axis=1).pvalue
    assert np.mean(p < 0.05) == pytest.approx(0.80, abs=0.01)
    assert mde / sd == pytest.approx(1.682, abs=0.001)   # the paired t-test's effect size for n = 5
    df, t_crit = n - 1, sps.t.ppf(0.975, n - 1)
    nc = mde * np.sqrt(n) / sd
    assert sps.nct.sf(t_crit, df, nc) + sps.nct.cdf(-t_crit, df, nc) == pytest.approx(0.8, abs=1e-6)
    z = sps.norm.ppf(0.975) + sps.norm.ppf(0.8)
    assert paired_mde(1.0, 2000) == pytest.approx(z / np.sqrt(2000), rel=2e-3)
    # two pairs (df = 1, where scipy's nct gives NaN) still has an answer, and fewer pairs need more
    assert paired_mde(1.0, 2) > paired_mde(1.0, 3) > paired_mde(1.0, 5) > paired_mde(1.0, 10)
    assert paired_mde(1.0, 5, power=0.9) > mde / sd
    assert math.isnan(paired_mde(1.0, 1)) and math.isnan(paired_mde(math.nan, 5)) and paired_mde(0.0, 5) == 0.0
    # the MDE scales with the spread (one root per number of pairs serves every comparison)
    for spread in (1e-4, 0.37, 12.0):
        assert paired_mde(spread, 5) == pytest.approx(spread * paired_mde(1.0, 5), rel=1e-12)
        assert paired_mde(spread, 3, alpha=0.01) == pytest.approx(spread * paired_mde(1.0, 3, alpha=0.01), rel=1e-12)
    assert paired_mde(1.0, 3, alpha=0.01) > paired_mde(1.0, 3)


def test_pooled_relative_difference_is_the_dataset_contrast_of_a_linear_model():
    """Against the linear model r ~ dataset fitted by least squares: the estimate is the mean of the
    dataset coefficients, its SE from the residual variance and (X'X)^-1, t on N - D df; the
    heterogeneity test is scipy's one-way ANOVA."""
    rng = np.random.default_rng(4)
    ref = {"a": rng.normal(0.06, 0.002, 5), "b": rng.normal(0.05, 0.002, 4), "c": rng.normal(0.03, 0.001, 5)}
    var = {d: r * (1 + rng.normal(-0.03, 0.02, r.size)) for d, r in ref.items()}
    out = stats.pooled_relative_difference({d: (var[d], ref[d]) for d in ref})
    r = [100 * (var[d] - ref[d]) / ref[d].mean() for d in ref]
    y = np.concatenate(r)
    X = np.zeros((y.size, 3))
    X[np.arange(y.size), np.repeat(np.arange(3), [x.size for x in r])] = 1
    coef, rss, *_ = np.linalg.lstsq(X, y, rcond=None)
    df = y.size - 3
    contrast = np.full(3, 1 / 3)
    se = np.sqrt(rss[0] / df * contrast @ np.linalg.inv(X.T @ X) @ contrast)
    assert out["df"] == df and out["n_datasets"] == 3 and out["n_pairs"] == 14 and out["datasets"] == "a,b,c"
    assert out["pct"] == pytest.approx(coef.mean())
    assert out["t"] == pytest.approx(coef.mean() / se)
    assert out["p"] == pytest.approx(2 * sps.t.sf(abs(coef.mean() / se), df))
    half = sps.t.ppf(0.975, df) * se
    assert (out["pct_ci_low"], out["pct_ci_high"]) == pytest.approx((coef.mean() - half, coef.mean() + half))
    het = sps.f_oneway(*r)
    assert out["f_heterogeneity"] == pytest.approx(het.statistic) and out["p_heterogeneity"] == pytest.approx(het.pvalue)
    assert out["per_dataset_pct"] == pytest.approx(dict(zip("abc", coef)))
    assert out["reason"] == "" and math.isnan(out["p_tost"]) and out["equivalent"] is None
    # TOST within +-m: equivalent exactly when the (1 - 2 alpha) CI lies inside the margins
    at90 = stats.pooled_relative_difference({d: (var[d], ref[d]) for d in ref}, 0.90)
    ci90 = np.array([at90["pct_ci_low"], at90["pct_ci_high"]])
    for m in (0.5, max(abs(ci90)) - 1e-6, max(abs(ci90)) + 1e-6, 10.0):
        tost = stats.pooled_relative_difference({d: (var[d], ref[d]) for d in ref}, margin_pct=m)
        assert tost["equivalent"] == bool(max(abs(ci90)) < m), m
        p_lower = sps.t.sf((coef.mean() + m) / se, df)
        p_upper = sps.t.cdf((coef.mean() - m) / se, df)
        assert tost["p_tost"] == pytest.approx(max(p_lower, p_upper))


def test_pooled_relative_difference_covers_the_true_change():
    """Simulated grids (3 datasets x 5 seeds, a true change of -3% everywhere): the 95% CI covers it in
    ~95% of them, and the heterogeneity test rejects ~5% of the time; with the change differing
    between datasets (-1, -3, -9%) the heterogeneity test rejects most of the time."""
    rng = np.random.default_rng(0)
    means = np.array([0.06, 0.055, 0.03])

    def grid(changes):
        ref = means[:, None] * (1 + rng.normal(0, 0.03, (3, 5)))
        var = ref * (1 + changes[:, None] / 100 + rng.normal(0, 0.03, (3, 5)))
        return stats.pooled_relative_difference({d: (var[d], ref[d]) for d in range(3)})

    same = [grid(np.full(3, -3.0)) for _ in range(2000)]
    covered = np.mean([o["pct_ci_low"] <= -3.0 <= o["pct_ci_high"] for o in same])
    assert 0.93 <= covered <= 0.97, covered
    assert 0.03 <= np.mean([o["p_heterogeneity"] < 0.05 for o in same]) <= 0.07
    differing = [grid(np.array([-1.0, -3.0, -9.0])) for _ in range(300)]
    assert np.mean([o["p_heterogeneity"] < 0.05 for o in differing]) > 0.8


def test_pooled_relative_difference_needs_two_datasets():
    """A dataset with fewer than 2 paired seeds is left out and named; fewer than two datasets left
    gives NaN and says why; NaN seeds are unpaired; unequal shapes raise naming the dataset."""
    x, y = np.array([0.05, 0.06, 0.055]), np.array([0.052, 0.061, 0.057])
    out = stats.pooled_relative_difference({"beauty": (x, y), "toys": (x[:1], y[:1])})
    assert math.isnan(out["pct"]) and out["n_datasets"] == 1
    assert "left out: toys (1 paired)" in out["reason"] and "pooling needs 2" in out["reason"]
    nan_seed = stats.pooled_relative_difference({"beauty": (x, y), "toys": (np.r_[x, np.nan], np.r_[y, 0.05])})
    both = stats.pooled_relative_difference({"beauty": (x, y), "toys": (x, y)})
    assert nan_seed["pct"] == pytest.approx(both["pct"]) and nan_seed["n_pairs"] == 6
    with pytest.raises(ValueError, match="toys"):
        stats.pooled_relative_difference({"beauty": (x, y), "toys": (x, y[:2])})


def _least_squares_with_group_intercepts(x, y, groups):
    """y ~ one intercept per group + b x, by np.linalg.lstsq: (b, its SE, df, residuals of x and y on
    the group dummies)."""
    labels, index = np.unique(groups, return_inverse=True)
    dummies = np.zeros((x.size, labels.size))
    dummies[np.arange(x.size), index] = 1
    X = np.column_stack([dummies, x])
    coef, rss, *_ = np.linalg.lstsq(X, y, rcond=None)
    df = x.size - X.shape[1]
    se = np.sqrt(rss[0] / df * np.linalg.inv(X.T @ X)[-1, -1])
    on_dummies = lambda v: v - dummies @ np.linalg.lstsq(dummies, v, rcond=None)[0]  # noqa: E731
    return coef[-1], se, df, on_dummies(x), on_dummies(y)


def test_within_group_slope_is_the_fixed_effects_least_squares_fit():
    """Against y ~ group + x fitted by least squares: slope, t-CI, p on n - G - 1 df, and r = the
    correlation of x and y after removing the group means; groups far apart in level do not move the
    slope; a group of one is left out (adds nothing to the fit, costs no degree of freedom)."""
    rng = np.random.default_rng(3)
    groups = np.repeat(["beauty/sa", "beauty/hybrid", "toys/sa", "toys/hybrid"], [5, 5, 4, 5])
    level = {"beauty/sa": 30.0, "beauty/hybrid": -40.0, "toys/sa": 5.0, "toys/hybrid": 80.0}
    x = rng.integers(20, 90, groups.size).astype(float)
    y = np.array([level[g] for g in groups]) + 0.07 * x + rng.normal(0, 1.0, groups.size)
    out = stats.within_group_slope(x, y, groups)
    b, se, df, xr, yr = _least_squares_with_group_intercepts(x, y, groups)
    assert out["n"] == 19 and out["n_groups"] == 4 and out["df"] == df == 14 and out["reason"] == ""
    assert out["slope"] == pytest.approx(b)
    half = sps.t.ppf(0.975, df) * se
    assert (out["ci_low"], out["ci_high"]) == pytest.approx((b - half, b + half))
    assert out["t"] == pytest.approx(b / se) and out["p"] == pytest.approx(2 * sps.t.sf(abs(b / se), df))
    assert out["r"] == pytest.approx(np.corrcoef(xr, yr)[0, 1])
    # the pooled fit without group intercepts would be dominated by the levels; this one is not
    assert abs(out["slope"] - 0.07) < 3 * se
    lone = stats.within_group_slope(np.append(x, 50.0), np.append(y, 1e3), np.append(groups, "sports/sa"))
    assert {k: lone[k] for k in ("n", "n_groups", "df", "slope", "p")} == pytest.approx(
        {k: out[k] for k in ("n", "n_groups", "df", "slope", "p")})
    assert stats.within_group_slope(x, y, groups, 0.9)["ci_high"] < out["ci_high"]


def test_within_group_slope_covers_the_true_slope():
    """Simulated grids (12 groups of 5 seeds, levels spread 100x the slope's effect): the 95% CI
    covers the true slope in ~95% of them, and with a slope of 0 the test rejects ~5% of the time."""
    rng = np.random.default_rng(1)
    groups = np.repeat(np.arange(12), 5).astype(str)

    def fit(slope):
        x = rng.normal(60, 12, groups.size)
        y = np.repeat(rng.normal(0, 50, 12), 5) + slope * x + rng.normal(0, 2, groups.size)
        return stats.within_group_slope(x, y, groups)

    fits = [fit(0.05) for _ in range(1500)]
    assert 0.93 <= np.mean([f["ci_low"] <= 0.05 <= f["ci_high"] for f in fits]) <= 0.97
    assert 0.03 <= np.mean([fit(0.0)["p"] < 0.05 for _ in range(1500)]) <= 0.07


def test_within_group_slope_degenerate_inputs():
    """No degree of freedom left, x constant within every group, NaN values, unequal lengths."""
    few = stats.within_group_slope([1.0, 2.0, 5.0], [1.0, 2.0, 3.0], ["a", "a", "b"])
    assert few["n"] == 2 and few["df"] == 0 and math.isnan(few["slope"]) and "no degree of freedom" in few["reason"]
    flat = stats.within_group_slope([1.0, 1.0, 2.0, 2.0, 2.0], [1.0, 2.0, 3.0, 4.0, 5.0], ["a", "a", "b", "b", "b"])
    assert math.isnan(flat["slope"]) and "does not vary" in flat["reason"]
    with_nan = stats.within_group_slope([1.0, 2.0, 3.0, np.nan, 1.0, 3.0], [1.0, 2.5, 3.0, 9.0, 0.0, 2.2],
                                        ["a", "a", "a", "a", "b", "b"])
    without = stats.within_group_slope([1.0, 2.0, 3.0, 1.0, 3.0], [1.0, 2.5, 3.0, 0.0, 2.2], ["a", "a", "a", "b", "b"])
    assert with_nan["n"] == 5 and with_nan["slope"] == pytest.approx(without["slope"])
    with pytest.raises(ValueError, match="one length"):
        stats.within_group_slope([1.0, 2.0], [1.0], ["a", "a"])
