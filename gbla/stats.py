"""Statistics for the ablation reports: CIs over seeds, paired tests, Holm, TOST, per-user metrics,
and a variant's change pooled across datasets.

Two kinds of evidence are computed for every comparison of a variant against a reference:

* over seeds (n = number of seeds both variants finished, usually 5): a paired t-test and a t-CI of
  the mean difference. It asks "is the difference larger than what retraining with another seed does?"
* over test users (n = number of users, ~10^4): a paired bootstrap CI and a sign-flip permutation test
  on the per-user metric difference, averaged over the paired seeds. It asks "given these trained
  models, is the difference larger than what drawing another set of test users does?"

scipy.stats does the t-based work (t intervals, ttest_rel, ttest_1samp with one-sided alternatives).
The per-user bootstrap and sign-flip test are vectorised by hand because their samples are large
(~10^4-10^5 values, a few hundred comparisons per report): scipy.stats.bootstrap's default BCa needs a
jackknife that is quadratic in n, and both scipy routines draw one index per value per resample.
Here resampling works on the *distinct* values (a per-user metric takes few distinct values), which
is the same distribution at a fraction of the cost; tests compare both against scipy. Holm is
written out because scipy only has Benjamini-Hochberg (false_discovery_control).
"""
from __future__ import annotations

import functools
import math
import re

import numpy as np
from scipy import stats as sps

from gbla.common import METRIC_NAMES, hits_at, ndcg_at
_METRIC_RE = re.compile(r"^(recall|ndcg)@(\d+)$")


# --------------------------------------------------------------------------- per-user metrics

def _no_spread(x: np.ndarray) -> bool:
    """All values equal up to float rounding (e.g. 0.3 - 0.2 vs 0.2 - 0.1): no t statistic exists."""
    return bool(np.ptp(x) <= 1e-9 * max(float(np.abs(x).max()), 1e-300))


def parse_metric(name: str) -> tuple[str, int]:
    """'ndcg@10' -> ('ndcg', 10). Raises ValueError naming the bad metric."""
    m = _METRIC_RE.match(name)
    if not m:
        raise ValueError(f"unknown metric {name!r}; expected 'recall@K' or 'ndcg@K' (e.g. {METRIC_NAMES})")
    return m.group(1), int(m.group(2))


def per_user_metric(rank, metric: str) -> np.ndarray:
    """Per-user metric from the rank of the target in the top-10 list (1..10; 0 = not retrieved).

    recall@K = 1 if 0 < rank <= K;  ndcg@K = 1 / log2(rank + 1) if 0 < rank <= K; else 0.
    The mean over users is the reported Recall@K / NDCG@K.
    """
    kind, k = parse_metric(metric)
    rank = np.asarray(rank)
    if rank.ndim != 1:
        raise ValueError(f"rank must be 1-D, got shape {rank.shape}")
    if rank.size and (rank.min() < 0):
        raise ValueError(f"rank must be >= 0 (0 = miss), got min {rank.min()}")
    if kind == "recall":
        return hits_at(rank, k).astype(np.float64)
    return ndcg_at(rank, k)


# --------------------------------------------------------------------------- over seeds

def mean_ci(values, confidence: float = 0.95) -> dict:
    """Mean with a two-sided Student-t CI. NaNs (missing runs) are left out and n says how many remain.

    n = 0 gives NaN everywhere; n = 1 gives the value with a NaN CI (one seed has no spread).
    """
    x = np.asarray(values, dtype=np.float64)
    x = x[~np.isnan(x)]
    n = int(x.size)
    out = {"n": n, "mean": math.nan, "std": math.nan, "ci_low": math.nan, "ci_high": math.nan}
    if n == 0:
        return out
    out["mean"] = float(x.mean())
    if n == 1:
        return out
    out["std"] = float(x.std(ddof=1))
    if _no_spread(x):  # identical values: scipy returns NaN for scale 0, the interval is the point
        out["ci_low"] = out["ci_high"] = out["mean"]
    else:
        lo, hi = sps.t.interval(confidence, df=n - 1, loc=out["mean"], scale=float(sps.sem(x)))
        out["ci_low"], out["ci_high"] = float(lo), float(hi)
    return out


def _matched(variant, reference, name: str = "") -> tuple[np.ndarray, np.ndarray]:
    """The pairs (variant, reference) where neither side is NaN; unequal shapes raise (naming `name`)."""
    a = np.asarray(variant, dtype=np.float64)
    b = np.asarray(reference, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"{name}{': ' if name else ''}paired samples need the same shape, got {a.shape} and {b.shape}")
    keep = ~(np.isnan(a) | np.isnan(b))
    return a[keep], b[keep]


def paired_ttest(variant, reference, confidence: float = 0.95) -> dict:
    """Paired t-test (scipy.stats.ttest_rel) of variant - reference over matched seeds.

    Pairs where either side is NaN are dropped; fewer than 2 pairs gives NaN and a reason.
    """
    a, b = _matched(variant, reference)
    n = int(a.size)
    out = {"n": n, "diff": math.nan, "ci_low": math.nan, "ci_high": math.nan,
           "t": math.nan, "p": math.nan, "reason": ""}
    if n:
        out["diff"] = float((a - b).mean())
    if n < 2:
        out["reason"] = f"{n} paired seed(s); a paired t-test needs at least 2"
        return out
    d = a - b
    if _no_spread(d):  # no spread: t is 0/0 or +-inf, p meaningless
        out["ci_low"] = out["ci_high"] = out["diff"]
        out["reason"] = "the paired differences are all equal; the t-test is undefined"
        return out
    res = sps.ttest_rel(a, b)
    ci = res.confidence_interval(confidence)
    out.update(t=float(res.statistic), p=float(res.pvalue), ci_low=float(ci.low), ci_high=float(ci.high))
    return out


# --------------------------------------------------------------------------- over users

def _as_pairs(variant, reference) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(variant, dtype=np.float64)
    b = np.asarray(reference, dtype=np.float64)
    if a.ndim != 1 or a.shape != b.shape:
        raise ValueError(f"paired samples must be 1-D of equal length, got {a.shape} and {b.shape}")
    if np.isnan(a).any() or np.isnan(b).any():
        raise ValueError("paired per-user samples contain NaN; match users before testing")
    return a, b


def paired_bootstrap(variant, reference, *, n_resamples: int = 10_000, confidence: float = 0.95,
                     seed: int = 0, batch: int = 2_000) -> dict:
    """Percentile bootstrap CI of mean(variant - reference) over matched units (users), and of the
    difference in % of mean(reference) (a ratio estimate: both means come from the same resample).

    Resampling n units with replacement is done as a multinomial draw of how often each *distinct*
    (variant, reference) pair is picked: the same distribution as drawing indices, but the cost is
    n_resamples x (number of distinct pairs) instead of n_resamples x n.
    """
    a, b = _as_pairs(variant, reference)
    n = int(a.size)
    out = {"n": n, "diff": math.nan, "ci_low": math.nan, "ci_high": math.nan,
           "pct": math.nan, "pct_ci_low": math.nan, "pct_ci_high": math.nan, "reason": ""}
    if n < 2:
        out["reason"] = f"{n} paired user(s); a bootstrap needs at least 2"
        return out
    ref_mean = float(b.mean())
    out["diff"] = float(a.mean() - ref_mean)
    out["pct"] = 100.0 * out["diff"] / ref_mean if ref_mean != 0 else math.nan
    pairs, counts = np.unique(np.stack([a, b], axis=1), axis=0, return_counts=True)
    probs = counts / n
    rng = np.random.default_rng(seed)
    diffs, ratios = [], []
    for start in range(0, n_resamples, batch):
        size = min(batch, n_resamples - start)
        picks = rng.multinomial(n, probs, size=size).astype(np.float64)  # (size, distinct pairs)
        sums = picks @ pairs                                               # (size, 2)
        diffs.append((sums[:, 0] - sums[:, 1]) / n)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratios.append(100.0 * (sums[:, 0] - sums[:, 1]) / sums[:, 1])
    diffs, ratios = np.concatenate(diffs), np.concatenate(ratios)
    alpha = 1.0 - confidence
    q = [alpha / 2, 1 - alpha / 2]
    out["ci_low"], out["ci_high"] = (float(v) for v in np.quantile(diffs, q))
    if ref_mean != 0 and np.isfinite(ratios).all():
        out["pct_ci_low"], out["pct_ci_high"] = (float(v) for v in np.quantile(ratios, q))
    elif ref_mean != 0:
        out["reason"] = "some resamples have a zero reference mean; no % CI"
    return out


def sign_flip_test(differences, *, n_resamples: int = 10_000, seed: int = 0,
                   batch: int = 2_000) -> dict:
    """Two-sided sign-flip permutation test of mean(differences) = 0 for paired differences.

    Under H0 (variant and reference exchangeable within a user) each difference's sign is a fair
    coin. The flipped sum is drawn per distinct |difference| as a binomial count of positive signs,
    the same distribution as flipping every value. p = (1 + #{|T*| >= |T|}) / (n_resamples + 1)
    (the +1 counts the observed labelling, so p is never 0).
    """
    d = np.asarray(differences, dtype=np.float64)
    if d.ndim != 1 or np.isnan(d).any():
        raise ValueError("differences must be a 1-D array without NaN")
    n = int(d.size)
    out = {"n": n, "diff": math.nan, "p": math.nan, "n_resamples": int(n_resamples), "reason": ""}
    if n < 1:
        out["reason"] = "no paired users"
        return out
    observed = float(d.mean())
    out["diff"] = observed
    mags, counts = np.unique(np.abs(d[d != 0]), return_counts=True)
    if mags.size == 0:
        out["p"] = 1.0
        out["reason"] = "all differences are zero"
        return out
    rng = np.random.default_rng(seed)
    # relative tolerance so that a resample equal to the observed statistic up to rounding counts
    threshold = abs(observed) * (1 - 1e-12)
    extreme = 0
    for start in range(0, n_resamples, batch):
        size = min(batch, n_resamples - start)
        positives = rng.binomial(counts, 0.5, size=(size, counts.size)).astype(np.float64)
        flipped_mean = ((2 * positives - counts) @ mags) / n
        extreme += int(np.count_nonzero(np.abs(flipped_mean) >= threshold))
    out["p"] = (1 + extreme) / (n_resamples + 1)
    return out


# --------------------------------------------------------------------------- multiplicity

def holm(pvalues) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values (step-down; controls the family-wise error rate).

    NaN p-values (comparisons that could not be made) stay NaN and do not count in the family size.
    Reject H_i at level alpha iff adjusted p_i <= alpha.
    """
    p = np.asarray(pvalues, dtype=np.float64)
    adjusted = np.full(p.shape, np.nan)
    valid = np.flatnonzero(~np.isnan(p))
    m = valid.size
    if m == 0:
        return adjusted
    if ((p[valid] < 0) | (p[valid] > 1)).any():
        raise ValueError(f"p-values must lie in [0, 1], got {p[valid]}")
    order = valid[np.argsort(p[valid], kind="stable")]
    scaled = (m - np.arange(m)) * p[order]           # (m - i) * p_(i), i = 0..m-1
    adjusted[order] = np.minimum(1.0, np.maximum.accumulate(scaled))
    return adjusted


# --------------------------------------------------------------------------- equivalence

def tost(differences, margin: float, *, alpha: float = 0.05) -> dict:
    """Two one-sided t-tests (TOST) for equivalence of paired differences within (-margin, +margin).

    H0: mean <= -margin or mean >= +margin; H1: -margin < mean < +margin.
    p_lower from ttest_1samp(d, -margin, alternative="greater"), p_upper from
    ttest_1samp(d, +margin, alternative="less"); p = max of the two; equivalent iff p < alpha, which is
    the same as the (1 - 2 alpha) CI of the mean lying inside the margins.
    """
    d = np.asarray(differences, dtype=np.float64)
    d = d[~np.isnan(d)]
    n = int(d.size)
    out = {"n": n, "diff": math.nan, "margin": float(margin), "ci_low": math.nan, "ci_high": math.nan,
           "p_lower": math.nan, "p_upper": math.nan, "p": math.nan, "equivalent": None, "reason": ""}
    if not (margin > 0):
        out["reason"] = f"equivalence margin must be > 0, got {margin}"
        return out
    if n:
        out["diff"] = float(d.mean())
    if n < 2:
        out["reason"] = f"{n} paired value(s); TOST needs at least 2"
        return out
    if _no_spread(d):
        out["reason"] = "the paired differences are all equal; the t-tests are undefined"
        return out
    lower = sps.ttest_1samp(d, -margin, alternative="greater")
    upper = sps.ttest_1samp(d, margin, alternative="less")
    ci = sps.ttest_1samp(d, 0.0).confidence_interval(1 - 2 * alpha)
    p = max(float(lower.pvalue), float(upper.pvalue))
    out.update(p_lower=float(lower.pvalue), p_upper=float(upper.pvalue), p=p, equivalent=bool(p < alpha),
               ci_low=float(ci.low), ci_high=float(ci.high))
    return out


# --------------------------------------------------------------------------- across datasets

def pooled_relative_difference(pairs, confidence: float = 0.95, *, margin_pct: float | None = None,
                               alpha: float = 0.05) -> dict:
    """One variant against one reference on several datasets: the change in % of the reference's
    mean, averaged over the datasets, with a t-CI and t-test, and whether the change differs between
    datasets.

    `pairs`: {dataset: (variant values, reference values)}, each paired over seeds. On dataset d each
    seed's relative difference is r = 100 (v - ref) / mean(ref_d), the unit the per-dataset
    comparisons report. The estimate is the unweighted mean over datasets of their mean r (each
    dataset one replication of the question, whatever its seed count); its standard error uses the
    within-dataset spread pooled over datasets, s_p^2 = sum_d sum_i (r - mean_d)^2 / sum_d (n_d - 1),
    as SE = sqrt(s_p^2 sum_d 1 / n_d) / D, with t on sum_d (n_d - 1) degrees of freedom: the dataset
    contrast of the linear model r ~ dataset (fixed datasets, one spread). Heterogeneity: the one-way
    ANOVA F-test (scipy.stats.f_oneway) of r across datasets; a small p says the change is not the
    same everywhere, and the average is then a summary of unlike effects.

    With margin_pct: TOST of "the average change lies within +-margin_pct" on the same t (p_tost, the
    larger one-sided p; equivalent iff p_tost < alpha).

    Needs 2+ datasets with 2+ paired seeds each (datasets with fewer are left out and named);
    per_dataset_pct has each dataset's mean r (the per-dataset comparisons' pct)."""
    out = {"n_datasets": 0, "datasets": "", "n_pairs": 0, "pct": math.nan, "pct_ci_low": math.nan,
           "pct_ci_high": math.nan, "t": math.nan, "df": math.nan, "p": math.nan, "f_heterogeneity": math.nan,
           "p_heterogeneity": math.nan, "p_tost": math.nan, "equivalent": None, "per_dataset_pct": {}, "reason": ""}
    rel, left_out = {}, []
    for dataset, (variant, reference) in pairs.items():
        a, b = _matched(variant, reference, str(dataset))
        if a.size < 2 or not b.mean():
            left_out.append(f"{dataset} ({a.size} paired)")
            continue
        rel[dataset] = 100.0 * (a - b) / b.mean()
    reasons = [f"left out: {', '.join(left_out)}"] if left_out else []
    out.update(n_datasets=len(rel), datasets=",".join(map(str, rel)), n_pairs=int(sum(r.size for r in rel.values())),
               per_dataset_pct={d: float(r.mean()) for d, r in rel.items()})
    if len(rel) < 2:
        out["reason"] = "; ".join(reasons + [f"{len(rel)} dataset(s) with 2+ paired seeds; pooling needs 2"])
        return out
    means = np.array([r.mean() for r in rel.values()])
    sizes = np.array([r.size for r in rel.values()])
    df = int((sizes - 1).sum())
    pooled_var = sum(float(((r - r.mean()) ** 2).sum()) for r in rel.values()) / df
    out.update(pct=float(means.mean()), df=df)
    if _no_spread(np.concatenate([r - r.mean() for r in rel.values()])):
        out["pct_ci_low"] = out["pct_ci_high"] = out["pct"]
        out["reason"] = "; ".join(reasons + ["no spread within datasets; the t-test is undefined"])
        return out
    se = math.sqrt(pooled_var * float((1.0 / sizes).sum())) / len(rel)
    t_crit = float(sps.t.ppf(0.5 + confidence / 2, df))
    t = out["pct"] / se
    het = sps.f_oneway(*rel.values())
    out.update(pct_ci_low=out["pct"] - t_crit * se, pct_ci_high=out["pct"] + t_crit * se, t=t,
               p=float(2 * sps.t.sf(abs(t), df)), f_heterogeneity=float(het.statistic),
               p_heterogeneity=float(het.pvalue), reason="; ".join(reasons))
    if margin_pct is not None and margin_pct > 0:
        p_lower = float(sps.t.sf((out["pct"] + margin_pct) / se, df))   # H0: change <= -margin
        p_upper = float(sps.t.cdf((out["pct"] - margin_pct) / se, df))  # H0: change >= +margin
        out["p_tost"] = max(p_lower, p_upper)
        out["equivalent"] = bool(out["p_tost"] < alpha)
    return out


# --------------------------------------------------------------------------- within-group regression

def within_group_slope(x, y, groups, confidence: float = 0.95) -> dict:
    """The slope of y on x within groups: the least-squares fit y = a_g + b x with one intercept per
    group (the fixed-effects, or "within", estimator), so that only how y moves with x inside a group
    counts, not how the groups' means differ. Used for "do the seeds of one variant that kept a later
    epoch score higher?", with a group per (dataset, variant).

    Both are centred on their group means; b = sum(x y) / sum(x^2), its standard error from the
    residuals on n - G - 1 degrees of freedom (G groups with 2+ members; a group of one holds no
    within-group information and is left out), a t-CI and t-test of b = 0, and r, the correlation of the
    centred values (the partial correlation given the group). NaN with a reason when the groups leave
    under one degree of freedom or x does not vary within them."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    groups = np.asarray(groups, dtype=object)
    if not (x.shape == y.shape == groups.shape) or x.ndim != 1:
        raise ValueError(f"x, y and groups must be 1-d and of one length (got {x.shape}, {y.shape}, {groups.shape})")
    keep = np.isfinite(x) & np.isfinite(y)
    x, y, groups = x[keep], y[keep], groups[keep]
    _, index, counts = np.unique(groups.astype(str), return_inverse=True, return_counts=True)
    members = counts[index] >= 2
    x, y = x[members], y[members]
    index = np.unique(index[members], return_inverse=True)[1]   # groups of one gone: number the rest 0..G-1
    n, n_groups = int(x.size), int(np.unique(index).size)
    out = {"n": n, "n_groups": n_groups, "df": n - n_groups - 1, "slope": math.nan, "ci_low": math.nan,
           "ci_high": math.nan, "r": math.nan, "t": math.nan, "p": math.nan, "reason": ""}
    if out["df"] < 1:
        out["df"] = max(out["df"], 0)
        out["reason"] = f"{n} values in {n_groups} groups of 2+: no degree of freedom left for the slope's error"
        return out
    sizes = np.bincount(index)
    xc = x - (np.bincount(index, weights=x) / sizes)[index]
    yc = y - (np.bincount(index, weights=y) / sizes)[index]
    sxx, syy, sxy = float(xc @ xc), float(yc @ yc), float(xc @ yc)
    if _no_spread(xc):
        out["reason"] = "x does not vary within any group"
        return out
    slope = sxy / sxx
    residual_var = float(((yc - slope * xc) ** 2).sum()) / out["df"]
    se = math.sqrt(residual_var / sxx)
    half = float(sps.t.ppf(0.5 + confidence / 2, out["df"])) * se
    out.update(slope=slope, ci_low=slope - half, ci_high=slope + half,
               r=sxy / math.sqrt(sxx * syy) if syy > 0 else math.nan)
    if se > 0:
        out["t"] = slope / se
        out["p"] = float(2 * sps.t.sf(abs(out["t"]), out["df"]))
    else:
        out["reason"] = "y lies exactly on the fitted lines: no residual spread"
    return out


# --------------------------------------------------------------------------- power

def paired_mde(sd_diff: float, n: int, *, alpha: float = 0.05, power: float = 0.8) -> float:
    """Minimum detectable effect of a two-sided paired t-test: the smallest true mean difference that
    the test at level `alpha` rejects with probability `power`, given n pairs whose differences have
    standard deviation `sd_diff` (under normality; from the noncentral t distribution).

    What a non-significant comparison can still hide: with 5 seeds the t-test needs a change of about
    1.7 x sd_diff before it finds it 4 times in 5. NaN for n < 2 or an unknown spread."""
    if n < 2 or sd_diff is None or not np.isfinite(sd_diff) or sd_diff < 0:
        return math.nan
    if sd_diff == 0:
        return 0.0
    return float(sd_diff) * _paired_mde_in_sds(int(n), float(alpha), float(power))


@functools.lru_cache(maxsize=256)
def _paired_mde_in_sds(n: int, alpha: float, power: float) -> float:
    """paired_mde for sd_diff = 1. The rejection rate depends on the effect only through effect / sd_diff,
    so the MDE is sd_diff times this root: one numerical integration + root search per (n, alpha,
    power) instead of one per comparison (a report has hundreds, nearly all with n = 5)."""
    df = n - 1
    t_crit = sps.t.ppf(1 - alpha / 2, df)

    def rejection_rate(delta: float) -> float:
        # P(|T| > t_crit) for T = (Z + nc) / sqrt(V / df), V ~ chi2(df), as an expectation over
        # sqrt(V) ~ chi(df): scipy's nct returns NaN for the large nc that df = 1 needs
        nc = delta * math.sqrt(n)
        scale = t_crit / math.sqrt(df)
        return float(sps.chi(df).expect(lambda x: sps.norm.cdf(nc - scale * x) + sps.norm.cdf(-nc - scale * x)))

    high = 1.0
    while rejection_rate(high) < power:
        high *= 2
    from scipy.optimize import brentq

    return float(brentq(lambda d: rejection_rate(d) - power, 0.0, high, xtol=1e-12, rtol=1e-10))


def percent_of(value: float, reference_mean: float) -> float:
    """100 * value / reference_mean (NaN when the reference mean is 0 or NaN)."""
    if reference_mean is None or not np.isfinite(reference_mean) or reference_mean == 0:
        return math.nan
    return 100.0 * value / reference_mean
