"""Aggregation of the ablation grid into tables and figures (what notebooks/aggregate.ipynb shows).

    runs = load_runs(runs_root, params_file, profile)       # one row per expected run, with status
    report = build_report(runs, references=("sa", "hybrid"))
    write_report(report, "outputs/reports")                   # CSV + JSON next to the notebook

Missing, failed and stale runs stay in every table as rows with NaN metrics and a count of the seeds
present / expected; a comparison that lacks paired seeds is NaN with the reason spelled out.
Statistics come from gbla.stats; see its docstring for what the seed-level and user-level tests ask.
Benchmark results (outputs/bench) are reported by gbla.bench.latency.

This module is longer than 500 lines: every table, finding and figure of the report is computed from
the one runs table and its pairing, and the notebooks (train.ipynb's curves too) address them as one
namespace, gbla.report.*.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from gbla import runs as runs_io
from gbla import stats
from gbla.common import METRIC_NAMES, REPO_ROOT, atomic_path, atomic_write_json, git_commit, repo_path, shown_path
from gbla.datasets import load_processed_dataset
DEFAULT_PUBLISHED = REPO_ROOT / "params" / "published.yaml"




# ============================================================================= runs table

def load_runs(runs_root, params_file=None, profile: str | None = None, *, expected=None) -> pd.DataFrame:
    """One row per run: dataset, variant, seed, status (ok | failed | stale | missing), metrics, run_dir.

    With params_file, the expected grid of `profile` comes from it (gbla.runs.collect_runs), so runs
    that never ran are rows with status "missing". Without it, the grid is inferred from the folder:
    per dataset, every variant found x every seed found; absent combinations are "missing" too.
    `expected` (an iterable of RunConfigs) gives the grid directly. Column `expected_by` says which
    ("params" or "folder").
    """
    runs_root = repo_path(runs_root)
    params_file = repo_path(params_file)
    if expected is not None:
        table = runs_io.collect_runs(runs_root, list(expected))
        table["expected_by"] = "params"
    elif params_file is not None:
        if not params_file.is_file():
            raise FileNotFoundError(f"params_file {params_file} does not exist")
        try:
            table = runs_io.collect_runs(runs_root, params_file=params_file, profile=profile)
            table["expected_by"] = "params"
        except ImportError as e:  # gbla.grid unavailable: still show what is on disk
            warnings.warn(f"cannot expand {params_file} ({e}); inferring the grid from {runs_root}")
            params_file = None
    if params_file is None and expected is None:
        table = runs_io.collect_runs(runs_root)
        table["expected_by"] = "folder"
        table = _complete_grid(table, runs_root)
    table["seed"] = table["seed"].astype(int)
    return table.reset_index(drop=True)


def _complete_grid(table: pd.DataFrame, runs_root: Path) -> pd.DataFrame:
    """Add status-"missing" rows for (dataset, variant, seed) combinations absent from the folder."""
    if table.empty:
        return table
    extra = []
    for dataset, group in table.groupby("dataset", sort=False):
        present = set(zip(group["variant"], group["seed"]))
        for variant in group["variant"].unique():
            for seed in sorted(group["seed"].unique()):
                if (variant, seed) not in present:
                    extra.append({"dataset": dataset, "variant": variant, "seed": int(seed),
                                  "status": "missing", "expected_by": "folder",
                                  "run_dir": str(runs_io.run_dir_for(runs_root, dataset, variant, seed))})
    if extra:
        table = pd.concat([table, pd.DataFrame(extra)], ignore_index=True)
    order = {v: i for i, v in enumerate(pd.unique(table["variant"]))}
    return table.sort_values(["dataset", "variant", "seed"], key=lambda s: s.map(order) if s.name == "variant" else s)


def status_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Per dataset and variant: counts of ok / failed / stale / missing seeds, and which seeds are not ok."""
    columns = ["dataset", "variant", "expected", "ok", "failed", "stale", "missing", "seeds_not_ok"]
    if runs.empty:
        return pd.DataFrame(columns=columns)
    rows = []
    for (dataset, variant), g in runs.groupby(["dataset", "variant"], sort=False):
        counts = g["status"].value_counts()
        not_ok = g[g["status"] != "ok"].sort_values("seed")
        rows.append({"dataset": dataset, "variant": variant, "expected": len(g),
                     **{s: int(counts.get(s, 0)) for s in ("ok", "failed", "stale", "missing")},
                     "seeds_not_ok": ", ".join(f"{r.seed} ({r.status})" for r in not_ok.itertuples())})
    return pd.DataFrame(rows, columns=columns)


def problem_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """The runs that are not ok, with the error of failed ones and why stale ones are stale; run folders
    as results show paths (relative to the repository root when inside it: the same on every checkout)."""
    cols = [c for c in ("dataset", "variant", "seed", "status", "error", "stale_reason", "stale_data_fingerprint",
                        "stale_expected_data_fingerprint", "run_dir") if c in runs.columns]
    if runs.empty:
        return pd.DataFrame(columns=cols)
    problems = runs.loc[runs["status"] != "ok", cols].reset_index(drop=True)
    if "run_dir" in problems.columns:
        problems["run_dir"] = [shown_path(d) for d in problems["run_dir"]]
    return problems


def stale_data_notes(runs: pd.DataFrame) -> list[str]:
    """One sentence per dataset whose finished runs were trained on other processed data than there is
    now: those runs are left out of every statistic, which a reader must not mistake for runs never made
    (the usual cause: semantic IDs recomputed on another CPU; see README, "What is bit-reproducible")."""
    needed = {"stale_reason", "stale_data_fingerprint", "stale_expected_data_fingerprint"}
    if runs.empty or not needed <= set(runs.columns):
        return []
    stale = runs[(runs["status"] == "stale") & runs["stale_reason"].astype(str).str.contains("data")]
    notes = []
    for dataset, group in stale.groupby("dataset", sort=True):
        trained_on = ", ".join(sorted(group["stale_data_fingerprint"].dropna().astype(str).unique())) or "unknown"
        here = ", ".join(sorted(group["stale_expected_data_fingerprint"].dropna().astype(str).unique()))
        notes.append(f"{dataset}: {len(group)} finished runs were trained on data {trained_on}, not on the "
                     f"processed data here ({here}); they are left out of every statistic. Build the data "
                     f"they were trained on (`python -m gbla.data.build --dataset {dataset} --semantic-ids "
                     f"outputs/data/semantic_ids` where a code file exists) and render again to include them.")
    return notes


# ============================================================================= mean +- CI over seeds

def summarize(runs: pd.DataFrame, metrics=METRIC_NAMES, *, split: str = "test",
              confidence: float = 0.95) -> pd.DataFrame:
    """Per dataset, variant and metric: mean and t-CI over the ok seeds, n_ok of n_expected."""
    columns = ["dataset", "variant", "metric", "n_ok", "n_expected", "mean", "std", "ci_low", "ci_high",
               "seeds_not_ok"]
    if runs.empty:
        return pd.DataFrame(columns=columns)
    rows = []
    for (dataset, variant), g in runs.groupby(["dataset", "variant"], sort=False):
        ok = g[g["status"] == "ok"]
        not_ok = ", ".join(f"{r.seed} ({r.status})" for r in g[g["status"] != "ok"].sort_values("seed").itertuples())
        for metric in metrics:
            ci = stats.mean_ci(ok[f"{split}_{metric}"].to_numpy(dtype=float), confidence)
            rows.append({"dataset": dataset, "variant": variant, "metric": metric, "n_ok": ci["n"],
                         "n_expected": len(g), "mean": ci["mean"], "std": ci["std"],
                         "ci_low": ci["ci_low"], "ci_high": ci["ci_high"], "seeds_not_ok": not_ok})
    return pd.DataFrame(rows, columns=columns)


def summary_wide(summary: pd.DataFrame, digits: int = 4) -> pd.DataFrame:
    """One row per dataset/variant, one 'mean [low, high] (n/N)' cell per metric: the table to read."""
    if summary.empty:
        return pd.DataFrame()

    def cell(r):
        if r.n_ok == 0:
            return f"missing (0/{r.n_expected})"
        ci = "" if math.isnan(r.ci_low) else f" [{r.ci_low:.{digits}f}, {r.ci_high:.{digits}f}]"
        return f"{r.mean:.{digits}f}{ci} ({r.n_ok}/{r.n_expected})"

    s = summary.assign(cell=[cell(r) for r in summary.itertuples()])
    wide = s.pivot(index=["dataset", "variant"], columns="metric", values="cell")
    wide = wide.reindex(index=pd.unique(pd.MultiIndex.from_frame(s[["dataset", "variant"]])),
                        columns=list(pd.unique(s["metric"])))
    wide.columns.name = None
    return wide


# ============================================================================= paired comparisons

class PerUserRanks:
    """Per-user test ranks of finished runs, read once per run directory."""

    def __init__(self, loader=runs_io.load_per_user):
        self._loader = loader
        self._cache: dict[str, pd.DataFrame] = {}

    def __call__(self, run_dir) -> pd.DataFrame:
        key = str(run_dir)
        if key not in self._cache:
            frame = self._loader(run_dir)
            missing = {"user", "target", "rank"} - set(frame.columns)
            if missing:
                raise ValueError(f"{Path(run_dir) / runs_io.PER_USER_FILE}: lacks columns {sorted(missing)}")
            if frame["user"].duplicated().any():
                raise ValueError(f"{Path(run_dir) / runs_io.PER_USER_FILE}: a user appears twice")
            self._cache[key] = frame[["user", "target", "rank"]]
        return self._cache[key]


def _paired_user_ranks(ranks: PerUserRanks, variant_dirs: dict, reference_dirs: dict, seeds) -> list:
    """[(seed, users, rank_variant, rank_reference)] for users present in both runs of each seed."""
    out = []
    for seed in seeds:
        v = ranks(variant_dirs[seed])
        r = ranks(reference_dirs[seed])
        both = v.merge(r, on="user", suffixes=("_v", "_r"), validate="one_to_one")
        if (both["target_v"] != both["target_r"]).any():
            raise ValueError(f"seed {seed}: {variant_dirs[seed]} and {reference_dirs[seed]} have different "
                             f"test targets for the same users (different data?); they cannot be paired")
        out.append((seed, both["user"].to_numpy(), both["rank_v"].to_numpy(), both["rank_r"].to_numpy()))
    return out


def _user_means(paired: list, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-user metric of variant and reference, each averaged over the paired seeds (users = clusters)."""
    users = np.concatenate([p[1] for p in paired])
    v = np.concatenate([stats.per_user_metric(p[2], metric) for p in paired])
    r = np.concatenate([stats.per_user_metric(p[3], metric) for p in paired])
    _, inverse, counts = np.unique(users, return_inverse=True, return_counts=True)
    return np.bincount(inverse, v) / counts, np.bincount(inverse, r) / counts


@dataclass
class _Pair:
    """A variant and a reference on one dataset: their finished runs, the seeds both finished, and
    (test split) each paired seed's per-user ranks, or why there are none. compare() and
    equivalence() both test over this pairing."""
    variant: str
    reference: str
    v_rows: pd.DataFrame          # the variant's ok runs, indexed by seed
    r_rows: pd.DataFrame          # the reference's
    seeds: list
    paired: list | None = None    # _paired_user_ranks, when the per-user results are there
    user_reason: str = ""         # why `paired` is None

    @classmethod
    def of(cls, ok: pd.DataFrame, dataset: str, variant: str, reference: str, *, split: str,
           ranks: PerUserRanks, reference_in_grid: bool = True, per_user: bool = True) -> "_Pair":
        """`ok`: the finished runs (status ok) of every dataset. per_user=False: the seeds only (no
        per-user file read)."""
        ok = ok[ok["dataset"] == dataset]
        v_rows = ok[ok["variant"] == variant].set_index("seed")
        r_rows = ok[ok["variant"] == reference].set_index("seed")
        pair = cls(variant, reference, v_rows, r_rows, sorted(set(v_rows.index) & set(r_rows.index)))
        if not reference_in_grid:
            pair.user_reason = f"reference {reference!r} is not in the grid for {dataset}"
        elif split != "test":
            pair.user_reason = "per-user results exist for the test split only"
        elif not per_user:
            pair.user_reason = "per-user results not read"
        elif pair.seeds:
            try:
                pair.paired = _paired_user_ranks(ranks, v_rows["run_dir"].to_dict(), r_rows["run_dir"].to_dict(),
                                                 pair.seeds)
            except FileNotFoundError as e:
                pair.user_reason = f"per-user results missing: {e}"
        return pair

    def values(self, column: str) -> tuple[np.ndarray, np.ndarray, float]:
        """(variant values, reference values) of `column` over the paired seeds, and the reference's mean."""
        if not self.seeds:
            return np.array([]), np.array([]), math.nan
        r_vals = self.r_rows.loc[self.seeds, column].to_numpy(dtype=float)
        return self.v_rows.loc[self.seeds, column].to_numpy(dtype=float), r_vals, float(r_vals.mean())

    @property
    def no_seeds_reason(self) -> str:
        return f"no paired seeds ({self.variant}: {len(self.v_rows)} ok, {self.reference}: {len(self.r_rows)} ok)"


COMPARISON_COLUMNS = [
    "dataset", "metric", "reference", "variant", "n_paired_seeds", "paired_seeds", "reference_mean",
    "variant_mean", "diff", "diff_ci_low", "diff_ci_high", "pct", "pct_ci_low", "pct_ci_high", "t",
    "p_ttest", "p_ttest_holm", "mde", "mde_pct", "n_users", "user_diff", "user_ci_low", "user_ci_high",
    "user_pct", "user_pct_ci_low", "user_pct_ci_high", "p_perm", "p_perm_holm", "reason"]


def compare(runs: pd.DataFrame, references=("sa", "hybrid"), metrics=METRIC_NAMES, *, split: str = "test",
            confidence: float = 0.95, n_bootstrap: int = 10_000, seed: int = 0,
            ranks: PerUserRanks | None = None, progress: bool = False) -> pd.DataFrame:
    """Every variant against every reference, per dataset and metric.

    Seed level: paired t-test of the per-seed metrics over the seeds both finished, t-CI of the mean
    difference, and that CI in % of the reference's mean over those seeds. User level (test split
    only, from per_user_test.parquet): users matched within each seed, each user's difference
    averaged over the paired seeds, then a paired bootstrap CI and a sign-flip permutation test.
    Holm-Bonferroni within each (dataset, metric, reference) family, separately for the two p-values.
    mde / mde_pct: the minimum detectable effect of the seed-level t-test (80% power, alpha 0.05 before
    Holm; stats.paired_mde from the paired differences' SD), absolute and in % of the reference mean;
    NaN below 3 paired seeds.
    """
    ranks = ranks or PerUserRanks()
    rows = []
    ok = runs[runs["status"] == "ok"] if not runs.empty else runs
    tasks = []
    for dataset, g in (runs.groupby("dataset", sort=False) if not runs.empty else []):
        variants = list(pd.unique(g["variant"]))
        for reference in references:
            for variant in variants:
                if variant != reference:
                    tasks.append((dataset, reference, variant))
    if progress:
        from tqdm import tqdm  # plain text bar: no ipywidgets needed in notebooks
        tasks = tqdm(tasks, desc="comparisons")
    for dataset, reference, variant in tasks:
        pair = _Pair.of(ok, dataset, variant, reference, split=split, ranks=ranks,
                        reference_in_grid=reference in set(runs.loc[runs["dataset"] == dataset, "variant"]))
        seeds, paired = pair.seeds, pair.paired
        for metric in metrics:
            v_vals, r_vals, ref_mean = pair.values(f"{split}_{metric}")
            tt = stats.paired_ttest(v_vals, r_vals, confidence)
            row = {"dataset": dataset, "metric": metric, "reference": reference, "variant": variant,
                   "n_paired_seeds": len(seeds), "paired_seeds": ",".join(map(str, seeds)),
                   "reference_mean": ref_mean, "variant_mean": float(v_vals.mean()) if seeds else math.nan,
                   "diff": tt["diff"], "diff_ci_low": tt["ci_low"], "diff_ci_high": tt["ci_high"],
                   "pct": stats.percent_of(tt["diff"], ref_mean),
                   "pct_ci_low": stats.percent_of(tt["ci_low"], ref_mean),
                   "pct_ci_high": stats.percent_of(tt["ci_high"], ref_mean),
                   "t": tt["t"], "p_ttest": tt["p"]}
            # the smallest true change this many seeds find 4 times in 5 (paired t, alpha 0.05, before
            # Holm), from the spread of the paired differences: what a non-significant result can hide.
            # From 3 seeds on: the spread of 2 differences is a single number, too loose to plan with
            sd_diff = float(np.std(v_vals - r_vals, ddof=1)) if len(seeds) >= 3 else math.nan
            row["mde"] = stats.paired_mde(sd_diff, len(seeds))
            row["mde_pct"] = stats.percent_of(row["mde"], ref_mean)
            reasons = []
            if not seeds:
                reasons.append(pair.no_seeds_reason)
            elif tt["reason"]:
                reasons.append(f"t-test: {tt['reason']}")
            if paired is not None:
                uv, ur = _user_means(paired, metric)
                boot = stats.paired_bootstrap(uv, ur, n_resamples=n_bootstrap, confidence=confidence, seed=seed)
                perm = stats.sign_flip_test(uv - ur, n_resamples=n_bootstrap, seed=seed)
                row.update(n_users=boot["n"], user_diff=boot["diff"], user_ci_low=boot["ci_low"],
                           user_ci_high=boot["ci_high"], user_pct=boot["pct"], user_pct_ci_low=boot["pct_ci_low"],
                           user_pct_ci_high=boot["pct_ci_high"], p_perm=perm["p"])
                if boot["reason"] or perm["reason"]:
                    reasons.append(f"per-user: {boot['reason'] or perm['reason']}")
            elif pair.user_reason and seeds:
                reasons.append(pair.user_reason)
            row["reason"] = "; ".join(reasons)
            rows.append(row)
    table = pd.DataFrame(rows, columns=COMPARISON_COLUMNS)
    if table.empty:
        return table
    for col in ("n_users",):
        table[col] = table[col].astype("Int64")
    for p_col in ("p_ttest", "p_perm"):
        table[f"{p_col}_holm"] = (table.groupby(["dataset", "metric", "reference"], sort=False)[p_col]
                                  .transform(lambda p: pd.Series(stats.holm(p.to_numpy(dtype=float)), index=p.index)))
    return table


# ============================================================================= equivalence (TOST)

EQUIVALENCE_COLUMNS = ["dataset", "metric", "variant", "reference", "level", "n", "reference_mean", "margin",
                       "margin_pct", "diff", "ci90_low", "ci90_high", "p_lower", "p_upper", "p_tost",
                       "equivalent", "reason"]


def equivalence(runs: pd.DataFrame, pairs=(("hybrid", "sa"),), metrics=METRIC_NAMES, *, margin: float = 0.05,
                split: str = "test", alpha: float = 0.05, ranks: PerUserRanks | None = None) -> pd.DataFrame:
    """TOST of "variant matches reference" within +-margin x (reference mean over the paired seeds).

    Two rows per dataset/metric/pair: level "seeds" (the per-seed differences, n = paired seeds) and
    level "users" (per-user differences averaged over the paired seeds, n = users; test split only).
    """
    ranks = ranks or PerUserRanks()
    rows = []
    ok = runs[runs["status"] == "ok"] if not runs.empty else runs
    for dataset in (pd.unique(runs["dataset"]) if not runs.empty else []):
        for variant, reference in pairs:
            pair = _Pair.of(ok, dataset, variant, reference, split=split, ranks=ranks)
            seeds, paired = pair.seeds, pair.paired
            for metric in metrics:
                v_vals, r_vals, ref_mean = pair.values(f"{split}_{metric}")
                abs_margin = margin * ref_mean if seeds else math.nan
                base = {"dataset": dataset, "metric": metric, "variant": variant, "reference": reference,
                        "reference_mean": ref_mean, "margin": abs_margin, "margin_pct": 100 * margin}
                levels = {"seeds": v_vals - r_vals}
                if paired is not None:
                    uv, ur = _user_means(paired, metric)
                    levels["users"] = uv - ur
                for level in ("seeds", "users"):
                    if level not in levels:
                        reason = pair.no_seeds_reason if not seeds else pair.user_reason
                        rows.append({**base, "level": level, "n": 0, "diff": math.nan, "reason": reason})
                        continue
                    if not seeds:
                        res = {"n": 0, "diff": math.nan, "reason": pair.no_seeds_reason}
                    elif not (abs_margin > 0):
                        res = {"n": len(levels[level]), "reason": f"reference mean {ref_mean} gives no positive margin"}
                    else:
                        res = stats.tost(levels[level], abs_margin, alpha=alpha)
                    rows.append({**base, "level": level, "n": res.get("n"), "diff": res.get("diff", math.nan),
                                 "ci90_low": res.get("ci_low", math.nan), "ci90_high": res.get("ci_high", math.nan),
                                 "p_lower": res.get("p_lower", math.nan), "p_upper": res.get("p_upper", math.nan),
                                 "p_tost": res.get("p", math.nan), "equivalent": res.get("equivalent"),
                                 "reason": res.get("reason", "")})
    table = pd.DataFrame(rows, columns=EQUIVALENCE_COLUMNS)
    if alpha != 0.05 and not table.empty:
        table = table.rename(columns={"ci90_low": f"ci{100 - 200 * alpha:g}_low",
                                      "ci90_high": f"ci{100 - 200 * alpha:g}_high"})
    return table


# ============================================================================= across datasets

POOLED_COLUMNS = ["metric", "reference", "variant", "n_datasets", "datasets", "n_pairs", "per_dataset_pct", "pct",
                  "pct_ci_low", "pct_ci_high", "t", "df", "p", "p_holm", "f_heterogeneity", "p_heterogeneity",
                  "margin_pct", "p_tost", "equivalent", "reason"]


def pooled(runs: pd.DataFrame, references=("sa", "hybrid"), metrics=METRIC_NAMES, *, pairs=(),
           split: str = "test", confidence: float = 0.95, margin: float = 0.05) -> pd.DataFrame:
    """Each variant against each reference (and each (variant, reference) of `pairs`) across the
    datasets where both have 2+ paired seeds, if there are two or more: the change in % of the
    reference's mean averaged over those datasets, its t-CI and t-test, and the test of whether it
    differs between them (stats.pooled_relative_difference). Holm within each (metric, reference)
    family. With it, TOST of "the average change lies within +-100 x margin %" (p_tost, equivalent).
    Only comparisons that have two such datasets get a row."""
    rows = []
    ok = runs[runs["status"] == "ok"] if not runs.empty else runs
    variants = list(pd.unique(runs["variant"])) if not runs.empty else []
    todo = [(v, r) for r in references for v in variants if v != r] + [tuple(p) for p in pairs]
    for variant, reference in todo:
        per_dataset = {}
        for dataset in pd.unique(ok["dataset"]) if not ok.empty else []:
            pair = _Pair.of(ok, dataset, variant, reference, split=split, ranks=PerUserRanks(), per_user=False)
            if len(pair.seeds) >= 2:
                per_dataset[dataset] = pair
        if len(per_dataset) < 2:
            continue
        for metric in metrics:
            res = stats.pooled_relative_difference(
                {d: pair.values(f"{split}_{metric}")[:2] for d, pair in per_dataset.items()}, confidence,
                margin_pct=100 * margin)
            rows.append({"metric": metric, "reference": reference, "variant": variant, "margin_pct": 100 * margin,
                         **{k: res[k] for k in POOLED_COLUMNS if k in res and k != "per_dataset_pct"},
                         "per_dataset_pct": "; ".join(f"{d} {_pct(v)}" for d, v in res["per_dataset_pct"].items())})
    table = pd.DataFrame(rows, columns=POOLED_COLUMNS)
    if not table.empty:
        table["p_holm"] = (table.groupby(["metric", "reference"], sort=False)["p"]
                           .transform(lambda p: pd.Series(stats.holm(p.to_numpy(dtype=float)), index=p.index)))
    return table


# ============================================================================= by history length

# lower edges of the history-length buckets, in items: <= 4 | 5 | 6-8 | 9+ (about the quartiles of the
# test users of Beauty, Toys and Sports alike, whose histories hold 4 to 20 items)
HISTORY_EDGES = (4, 5, 6, 9)
BY_LENGTH_COLUMNS = ["dataset", "metric", "variant", "reference", "history", "n_users", "reference_mean",
                     "variant_mean", "pct", "pct_ci_low", "pct_ci_high", "p_perm", "p_perm_holm",
                     "p_between_buckets", "reason"]


def _from_processed(datasets, extract, what: str, *, processed_root=None,
                    synthetic: dict | None = None) -> tuple[dict, list]:
    """{dataset: (extract(its ProcessedDataset), the data's fingerprint)} for each dataset whose
    processed data loads, and a note "<dataset>: no <what>, <why>" for each that does not."""
    found, notes = {}, []
    for dataset in datasets:
        try:
            data = load_processed_dataset(dataset, processed_root, synthetic=synthetic)
        except FileNotFoundError as e:
            notes.append(f"{dataset}: no {what}, {e}")
            continue
        found[dataset] = (extract(data), data.provenance.get("fingerprint", "unknown"))
    return found, notes


def _report_datasets(rep: "Report", params_file, profile) -> tuple[list, dict | None]:
    """The datasets of the report's runs, and the synthetic dataset's settings from the params file."""
    synthetic = None
    if params_file:
        from gbla.params import load_grid

        synthetic = load_grid(repo_path(params_file), profile).synthetic
    return (list(pd.unique(rep.runs["dataset"])) if not rep.runs.empty else []), synthetic


def history_lengths_of_test_users(datasets, *, processed_root=None,
                                  synthetic: dict | None = None) -> tuple[dict, list]:
    """{dataset: (Series user -> items in that user's test history, the data's fingerprint)} for each
    dataset whose processed data loads, and a note for each that does not."""
    return _from_processed(datasets, lambda data: pd.Series(data.test.history_len, index=data.test.user),
                           "history lengths", processed_root=processed_root, synthetic=synthetic)


def history_bucket_labels(edges=HISTORY_EDGES) -> list[str]:
    """'<=4', '5', '6-8', '9+' for the default edges: the first bucket takes every shorter history too."""
    labels = [f"<={edges[1] - 1}" if len(edges) > 1 else f"{edges[0]}+"]
    labels += [f"{lo}" if hi - lo == 1 else f"{lo}-{hi - 1}" for lo, hi in zip(edges[1:], edges[2:])]
    return labels + ([f"{edges[-1]}+"] if len(edges) > 1 else [])


# the pairs split by history length: the hybrid and all-GBLA against all-SA, and the recency gate (a
# cumulative forget gate, the one change that helps the hybrid) against the hybrid
HISTORY_PAIRS = (("hybrid", "sa"), ("all-gbla", "sa"), ("hybrid-recency-gate", "hybrid"))


def by_history_length(runs: pd.DataFrame, lengths: dict, pairs=HISTORY_PAIRS, metrics=("recall@10",), *,
                      edges=HISTORY_EDGES, n_bootstrap: int = 10_000, seed: int = 0, confidence: float = 0.95,
                      ranks: PerUserRanks | None = None) -> pd.DataFrame:
    """Each (variant, reference) pair's difference within buckets of the test user's history length,
    at the user level of compare(): each user's metric averaged over the paired seeds, a paired
    bootstrap CI of the difference in % of the reference's mean within the bucket, and a sign-flip
    test (Holm over the buckets of each dataset, metric and pair); p_between_buckets, the same for
    every bucket of a pair, is the one-way ANOVA F-test of whether the per-user differences (absolute,
    not in %) differ between the buckets. Blind to seed-to-seed variation, as every user-level number
    is. `lengths`: history_lengths_of_test_users(); the runs must have trained on the data the lengths
    come from (same fingerprint), else the pair's rows say so. Pairs without paired seeds on a dataset
    get no rows."""
    from scipy import stats as sps

    ranks = ranks or PerUserRanks()
    labels = history_bucket_labels(edges)
    ok = runs[runs["status"] == "ok"] if not runs.empty else runs
    rows = []
    for dataset, (hist, fingerprint) in lengths.items():
        for variant, reference in pairs:
            pair = _Pair.of(ok, dataset, variant, reference, split="test", ranks=ranks)
            if not pair.seeds:
                continue
            base = {"dataset": dataset, "variant": variant, "reference": reference}
            trained_on = set(pair.v_rows.loc[pair.seeds, "data_fingerprint"]) | \
                set(pair.r_rows.loc[pair.seeds, "data_fingerprint"])
            reason = pair.user_reason if pair.paired is None else ""
            if not reason and trained_on != {fingerprint}:
                reason = (f"runs trained on data {', '.join(sorted(map(str, trained_on)))}; the history lengths "
                          f"come from {fingerprint}")
            if not reason:
                users = np.unique(np.concatenate([p[1] for p in pair.paired]))
                h = hist.reindex(users).to_numpy(dtype=float)
                if np.isnan(h).any():
                    reason = f"{int(np.isnan(h).sum())} tested users are not in the processed test split"
            if reason:
                rows += [{**base, "metric": m, "reason": reason} for m in metrics]
                continue
            bucket = np.clip(np.searchsorted(edges, h, side="right") - 1, 0, len(labels) - 1)
            for metric in metrics:
                uv, ur = _user_means(pair.paired, metric)
                groups = [(uv - ur)[bucket == k] for k in range(len(labels)) if (bucket == k).sum() >= 2]
                between = float(sps.f_oneway(*groups).pvalue) if len(groups) >= 2 else math.nan
                for k, label in enumerate(labels):
                    sel = bucket == k
                    boot = stats.paired_bootstrap(uv[sel], ur[sel], n_resamples=n_bootstrap, confidence=confidence,
                                                  seed=seed) if sel.sum() >= 2 else {"reason": f"{int(sel.sum())} users"}
                    perm = stats.sign_flip_test(uv[sel] - ur[sel], n_resamples=n_bootstrap, seed=seed) \
                        if sel.sum() >= 2 else {}
                    rows.append({**base, "metric": metric, "history": label, "n_users": int(sel.sum()),
                                 "reference_mean": float(ur[sel].mean()) if sel.any() else math.nan,
                                 "variant_mean": float(uv[sel].mean()) if sel.any() else math.nan,
                                 "pct": boot.get("pct", math.nan), "pct_ci_low": boot.get("pct_ci_low", math.nan),
                                 "pct_ci_high": boot.get("pct_ci_high", math.nan), "p_perm": perm.get("p", math.nan),
                                 "p_between_buckets": between, "reason": boot.get("reason", "") or perm.get("reason", "")})
    table = pd.DataFrame(rows, columns=BY_LENGTH_COLUMNS)
    if not table.empty:
        table["p_perm_holm"] = (table.groupby(["dataset", "metric", "variant", "reference"], sort=False)["p_perm"]
                                .transform(lambda p: pd.Series(stats.holm(p.to_numpy(dtype=float)), index=p.index)))
    return table


def by_history_length_of_report(rep: "Report", *, params_file=None, profile: str | None = None, processed_root=None,
                                pairs=HISTORY_PAIRS, metrics=("recall@10",),
                                n_bootstrap: int = 10_000, seed: int = 0) -> tuple[pd.DataFrame, list]:
    """by_history_length() over the datasets of the report's runs, their processed data read from
    processed_root (default outputs/processed or $GBLA_PROCESSED_DIR; the synthetic dataset from the
    params file's settings); notes name the datasets without it."""
    datasets, synthetic = _report_datasets(rep, params_file, profile)
    lengths, notes = history_lengths_of_test_users(datasets, processed_root=processed_root, synthetic=synthetic)
    metrics = [m for m in metrics if m in rep.parameters.get("metrics", metrics)]
    return by_history_length(rep.runs, lengths, pairs, metrics, n_bootstrap=n_bootstrap, seed=seed), notes


# ============================================================================= model size and convergence

MODEL_SIZE_COLUMNS = ["dataset", "variant", "encoder_layout", "encoder_params", "mixing_params",
                      "encoder_params_vs_sa_pct", "n_ok", "epochs_trained_mean", "best_epoch_mean", "best_epoch_sd"]


def encoder_parameters(model_config) -> tuple[int, int]:
    """(encoder blocks, their SA / GBLA layers alone): parameters of one seed's encoder under
    `model_config` (a gbla.config.ModelConfig). Counted on modules built on the meta device (no
    memory, no init). The rest of the model (embeddings, decoder, head) does not depend on the layout."""
    import torch

    from gbla.model import EncoderBlock

    with torch.device("meta"):
        blocks = [EncoderBlock(t, model_config, "torch", 1) for t in model_config.encoder_layout]
    encoder = sum(p.numel() for b in blocks for p in b.parameters())
    mixing = sum(p.numel() for b in blocks for p in b.mix.parameters())
    return int(encoder), int(mixing)


def model_size(runs: pd.DataFrame) -> pd.DataFrame:
    """Per (dataset, variant) with a finished run: the encoder's size (from the config its runs
    recorded in metrics.json) and how long its seeds trained (epochs until early stopping, best epoch).
    encoder_params_vs_sa_pct compares with the dataset's `sa` where that has a finished run."""
    from gbla.config import RunConfig

    ok = runs[runs["status"] == "ok"] if not runs.empty else runs
    if ok.empty:
        return pd.DataFrame(columns=MODEL_SIZE_COLUMNS)
    counted: dict[str, tuple[int, int]] = {}
    rows = []
    for (dataset, variant), group in ok.groupby(["dataset", "variant"], sort=False):
        configs = {}
        for run_dir in group["run_dir"]:
            try:
                model_cfg = RunConfig.from_dict(runs_io.load_run_metrics(run_dir)["config"]).model
            except (KeyError, TypeError, ValueError) as e:
                raise ValueError(f"{Path(run_dir) / runs_io.METRICS_FILE}: no readable 'config' ({e})") from e
            configs[repr(model_cfg)] = model_cfg
        if len(configs) > 1:  # the seeds of one variant share their model config (only the seed differs)
            raise ValueError(f"{dataset}/{variant}: its finished runs recorded {len(configs)} different model configs")
        key, model_cfg = next(iter(configs.items()))
        if key not in counted:
            counted[key] = encoder_parameters(model_cfg)
        encoder, mixing = counted[key]
        best = group["best_epoch"].astype(float)
        rows.append({"dataset": dataset, "variant": variant, "encoder_layout": " ".join(model_cfg.encoder_layout),
                     "encoder_params": encoder, "mixing_params": mixing, "n_ok": len(group),
                     "epochs_trained_mean": float(group["epochs_trained"].astype(float).mean()),
                     "best_epoch_mean": float(best.mean()),
                     "best_epoch_sd": float(best.std(ddof=1)) if len(best) > 1 else float("nan")})
    table = pd.DataFrame(rows)
    sa = table[table["variant"] == "sa"].set_index("dataset")["encoder_params"]
    table["encoder_params_vs_sa_pct"] = 100 * (table["encoder_params"] / table["dataset"].map(sa) - 1)
    return table[MODEL_SIZE_COLUMNS]


def model_size_table(table: pd.DataFrame) -> pd.DataFrame:
    """The model_size table as shown: one row per variant (its encoder is the same on every dataset),
    parameters in thousands, and per dataset the epoch whose weights were kept (mean ± SD over seeds;
    training went on `patience` epochs past it)."""
    if table.empty:
        return pd.DataFrame()
    first = table.drop_duplicates("variant")
    out = pd.DataFrame({
        "variant": first["variant"].to_numpy(), "encoder layout": first["encoder_layout"].to_numpy(),
        "encoder params (k)": [f"{n / 1000:,.1f}" for n in first["encoder_params"]],
        "SA/GBLA layers (k)": [f"{n / 1000:,.1f}" for n in first["mixing_params"]],
        "vs sa": [("" if math.isnan(x) else f"{x:+.1f}%") for x in first["encoder_params_vs_sa_pct"]],
    })
    for dataset in table["dataset"].unique():
        of = table[table["dataset"] == dataset].set_index("variant")
        cells = []
        for v in out["variant"]:
            if v not in of.index:
                cells.append("")
                continue
            r = of.loc[v]
            sd = "" if math.isnan(r["best_epoch_sd"]) else f" ± {r['best_epoch_sd']:.0f}"
            cells.append(f"{r['best_epoch_mean']:.0f}{sd} ({r['n_ok']})")
        out[f"{dataset}: best epoch (seeds)"] = cells
    return out


# ============================================================================= early stopping
# Variants with GBLA layers keep earlier epochs (model_size). If seeds that stop earlier also score
# lower within a variant, part of a variant's gap could come from the stopping rule (patience) rather
# than from its architecture. The runs can say how strongly the two go together; not why (a seed that
# learns worse may also stop earlier), and not what a longer patience would give (that needs new runs).

STOPPING_COLUMNS = ["dataset", "metric", "n_runs", "n_groups", "df", "pct_per_10_epochs", "ci_low", "ci_high",
                    "r", "p", "reason"]
ALL_DATASETS = "all datasets"


def stopping_dependence(runs: pd.DataFrame, metrics=("recall@10", "ndcg@10"), *, split: str = "test",
                        confidence: float = 0.95) -> pd.DataFrame:
    """How a seed's metric moves with the epoch whose weights it kept, within its (dataset, variant):
    per dataset and over all datasets, the within-group slope (gbla.stats.within_group_slope) of the
    metric in % of its variant's mean on the best epoch, given per 10 epochs, with its CI, p and the
    partial correlation r. A variant with one finished seed adds nothing."""
    ok = runs[runs["status"] == "ok"] if not runs.empty else runs
    rows = []
    scopes = ([(d, ok[ok["dataset"] == d]) for d in pd.unique(ok["dataset"])] + [(ALL_DATASETS, ok)]) if not ok.empty else []
    for metric in metrics:
        column = f"{split}_{metric}"
        for scope, table in scopes:
            if scope == ALL_DATASETS and table["dataset"].nunique() < 2:
                continue
            groups = (table["dataset"] + "/" + table["variant"]).to_numpy()
            values = table[column].astype(float)
            mean = values.groupby(groups).transform("mean")
            fit = stats.within_group_slope(table["best_epoch"].astype(float).to_numpy(),
                                           (100.0 * (values / mean - 1.0)).to_numpy(), groups, confidence)
            rows.append({"dataset": scope, "metric": metric, "n_runs": fit["n"], "n_groups": fit["n_groups"],
                         "df": fit["df"], "pct_per_10_epochs": 10 * fit["slope"], "ci_low": 10 * fit["ci_low"],
                         "ci_high": 10 * fit["ci_high"], "r": fit["r"], "p": fit["p"], "reason": fit["reason"]})
    return pd.DataFrame(rows, columns=STOPPING_COLUMNS)


def stopping_table(table: pd.DataFrame) -> pd.DataFrame:
    """The stopping_dependence table as shown: % per 10 epochs with its CI, r, p to 3 digits."""
    if table.empty:
        return pd.DataFrame()
    return pd.DataFrame({
        "dataset": table["dataset"], "metric": [_label(m) for m in table["metric"]],
        "runs (variants)": [f"{n} ({g})" for n, g in zip(table["n_runs"], table["n_groups"])],
        "Δ% per 10 epochs later [95% CI]": [
            (f"{_pct(r['pct_per_10_epochs'])} [{_pct(r['ci_low'])}, {_pct(r['ci_high'])}]"
             if np.isfinite(r["pct_per_10_epochs"]) else f"– ({r['reason']})") for _, r in table.iterrows()],
        "r": [("" if not np.isfinite(x) else f"{x:+.2f}") for x in table["r"]],
        "p": [_p(x) for x in table["p"]],
    })


def _stopping_finding(rep: "Report", metric: str, alpha: float) -> str | None:
    """The across-datasets sentence on early stopping: the within-variant slope over all datasets, and
    what it would make of the hybrid's earlier best epoch on each dataset (the gap in epochs times the
    slope: what the stopping rule would explain of the gap if the slope were all its doing)."""
    table = rep.stopping
    rows = table[(table["dataset"] == ALL_DATASETS) & (table["metric"] == metric)] if not table.empty else table
    if rows.empty or not np.isfinite(rows["pct_per_10_epochs"].iloc[0]):
        return None
    r = rows.iloc[0]
    verdict = "a significant" if r["p"] <= alpha else "no significant"
    text = (f"Early stopping, within a variant: a seed that keeps an epoch 10 later scores "
            f"{_pct(r['pct_per_10_epochs'])} [{_pct(r['ci_low'])}, {_pct(r['ci_high'])}] {_label(metric)} "
            f"(% of its variant's mean; r = {r['r']:+.2f}, p = {_p(r['p'])}, {int(r['n_runs'])} runs of "
            f"{int(r['n_groups'])} variants x datasets): {verdict} dependence")
    size = rep.model_size
    gaps = []
    if not size.empty:
        for d in pd.unique(size["dataset"]):
            of = size[size["dataset"] == d].set_index("variant")["best_epoch_mean"]
            if {"hybrid", "sa"} <= set(of.index):
                gap = float(of["hybrid"] - of["sa"])
                epochs = f"{gap:+.0f}".replace("-", "−")
                gaps.append(f"{d} {epochs} epochs, {_pct(gap / 10 * r['pct_per_10_epochs'])}")
    if gaps:
        text += ("; at that slope the hybrid's best epoch beside sa's would be worth " + "; ".join(gaps) +
                 " (correlational: a seed that learns worse may also stop earlier)")
    return text + "."


# ============================================================================= top-5 diagnostics
# Two candidate causes of a shortfall in the top 5 (hits landing at ranks 6-10), each checked from what
# the runs recorded: the validation metric early stopping watches, and items that share a semantic-ID
# prefix (their last, de-duplicating digit says nothing about the item, so a model can only guess
# among them).

RESELECTION_COLUMNS = ["dataset", "variant", "monitor", "n_ok", "kept_epoch_mean", "reselected_epoch_mean",
                       "kept_mean", "reselected_mean", "reselected_pct", "best_recorded_mean",
                       "best_recorded_pct", "n_censored", "reason"]


def replay_early_stopping(history: pd.DataFrame, monitor: str, patience: int) -> tuple[int, bool]:
    """(epoch, censored): the epoch whose weights gbla.train would keep had early stopping watched
    `monitor` (a history column, e.g. "valid_recall@5"), replayed over the recorded evaluations with
    the same rule (a strictly better value resets the count; `patience` evaluations without one
    stop). censored: the record ended before this rule would have stopped, so a longer run might have
    kept a later epoch."""
    if monitor not in history.columns:
        raise ValueError(f"the history has no column {monitor!r} (it has {sorted(history.columns)})")
    evaluations = history.dropna(subset=[monitor]).sort_values("epoch")
    if evaluations.empty:
        raise ValueError(f"the history holds no evaluation of {monitor!r}")
    best, best_epoch, without_gain = -math.inf, None, 0
    for epoch, value in zip(evaluations["epoch"], evaluations[monitor]):
        if value > best:
            best, best_epoch, without_gain = value, int(epoch), 0
        else:
            without_gain += 1
            if without_gain >= patience:
                return best_epoch, False
    return best_epoch, True


def reselect_epochs(runs: pd.DataFrame, monitor: str = "recall@5", *, variants=("sa", "hybrid"),
                    own_monitor: str = "recall@10") -> pd.DataFrame:
    """Per (dataset, variant): what early stopping on validation `monitor` instead of the runs' own
    `own_monitor` would have kept, from each finished run's recorded history. kept_*: the epoch the run
    kept and validation `monitor` there; reselected_*: the replayed choice; best_recorded_*: the best
    validation `monitor` anywhere in the record (in-sample, so an upper bound on what any choice of
    epoch gains on validation; test metrics exist only for the kept epoch). Percentages compare the
    seed means with kept_mean. Each run's own early stopping is replayed first: a run whose replay
    does not give its recorded best epoch is not counted, and `reason` says so."""
    from gbla.config import RunConfig

    ok = runs[(runs["status"] == "ok") & runs["variant"].isin(variants)] if not runs.empty else runs
    rows = []
    column, own_column = f"valid_{monitor}", f"valid_{own_monitor}"
    for (dataset, variant), group in (ok.groupby(["dataset", "variant"], sort=False) if not ok.empty else []):
        kept, reselected, kept_value, reselected_value, best_value, censored, problems = [], [], [], [], [], 0, []
        for row in group.itertuples():
            recorded = runs_io.load_run_metrics(row.run_dir)
            patience = RunConfig.from_dict(recorded["config"]).train.patience
            history = pd.DataFrame(recorded.get("history", []))   # runs_io.load_history, without a second read
            try:
                own_epoch, _ = replay_early_stopping(history, own_column, patience)
                epoch, cut = replay_early_stopping(history, column, patience)
            except ValueError as e:   # a history without that metric (recorded by another version)
                problems.append(f"seed {row.seed}: {e}")
                continue
            if own_epoch != int(row.best_epoch):
                problems.append(f"seed {row.seed}: replaying its own early stopping gives epoch {own_epoch}, "
                                f"not its recorded {int(row.best_epoch)}")
                continue
            at = history.set_index("epoch")[column]
            kept.append(own_epoch)
            reselected.append(epoch)
            kept_value.append(float(at.loc[own_epoch]))
            reselected_value.append(float(at.loc[epoch]))
            best_value.append(float(at.max()))
            censored += cut
        base = {"dataset": dataset, "variant": variant, "monitor": monitor, "n_ok": len(kept),
                "n_censored": censored, "reason": "; ".join(problems)}
        if not kept:
            rows.append(base)
            continue
        mean = float(np.mean(kept_value))
        rows.append({**base, "kept_epoch_mean": float(np.mean(kept)),
                     "reselected_epoch_mean": float(np.mean(reselected)), "kept_mean": mean,
                     "reselected_mean": float(np.mean(reselected_value)),
                     "reselected_pct": 100 * (np.mean(reselected_value) / mean - 1),
                     "best_recorded_mean": float(np.mean(best_value)),
                     "best_recorded_pct": 100 * (np.mean(best_value) / mean - 1)})
    return pd.DataFrame(rows, columns=RESELECTION_COLUMNS)


PREFIX_SHARING_COLUMNS = ["dataset", "variant", "target", "n_users", "share_of_users", "n_seeds", "recall@5",
                          "recall@10", "recall@5_over_recall@10", "reason"]


def sid_prefix_sharing(datasets, *, processed_root=None, synthetic: dict | None = None) -> tuple[dict, list]:
    """{dataset: (array item -> how many items share its semantic ID's digits but the last, the data's
    fingerprint)} for each dataset whose processed data loads, and a note for each that does not."""
    def sizes(data):
        _, inverse, counts = np.unique(np.asarray(data.sids)[:, :-1], axis=0, return_inverse=True,
                                       return_counts=True)
        return counts[inverse.reshape(-1)]

    return _from_processed(datasets, sizes, "semantic IDs", processed_root=processed_root, synthetic=synthetic)


def hits_by_prefix_sharing(runs: pd.DataFrame, sharing: dict, *, variants=("sa", "hybrid"),
                           ranks: PerUserRanks | None = None) -> pd.DataFrame:
    """Test Recall@5 / @10 of the users whose target shares its semantic-ID prefix (all digits but the
    de-duplicating last) with other items, beside those whose target's prefix is its own; per seed,
    then averaged over the finished seeds. If the shared prefixes caused a top-5 shortfall, the shared
    group's Recall@5 / Recall@10 would sit below the unique group's. `sharing`: sid_prefix_sharing();
    runs trained on other data give a reason instead of numbers."""
    ranks = ranks or PerUserRanks()
    ok = runs[(runs["status"] == "ok") & runs["variant"].isin(variants)] if not runs.empty else runs
    rows = []
    for (dataset, variant), group in (ok.groupby(["dataset", "variant"], sort=False) if not ok.empty else []):
        if dataset not in sharing:
            continue
        sizes, fingerprint = sharing[dataset]
        trained_on = set(group["data_fingerprint"])
        if trained_on != {fingerprint}:
            rows.append({"dataset": dataset, "variant": variant, "reason": (
                f"runs trained on data {', '.join(sorted(map(str, trained_on)))}; the semantic IDs come from "
                f"{fingerprint}")})
            continue
        per_seed, reason = [], ""
        for run_dir in group["run_dir"]:
            frame = ranks(run_dir)
            targets = frame["target"].to_numpy()
            if targets.size and (targets.min() < 0 or targets.max() >= len(sizes)):
                reason = (f"{Path(run_dir) / runs_io.PER_USER_FILE}: test targets outside the {len(sizes)} items "
                          f"of the processed data")
                break
            shared = sizes[targets] > 1
            rank = frame["rank"].to_numpy()
            groups = (("shared prefix", shared), ("own prefix", ~shared), ("all", np.ones_like(shared)))
            per_seed.append({name: (int(sel.sum()), float(stats.per_user_metric(rank[sel], "recall@5").mean()),
                                    float(stats.per_user_metric(rank[sel], "recall@10").mean()))
                             for name, sel in groups if sel.any()})
        if reason or not per_seed or "all" not in per_seed[0]:
            rows.append({"dataset": dataset, "variant": variant, "reason": reason or "no tested users"})
            continue
        n_all = per_seed[0]["all"][0]
        for name in ("shared prefix", "own prefix", "all"):
            cells = [s[name] for s in per_seed if name in s]
            if not cells:
                continue
            r5, r10 = float(np.mean([c[1] for c in cells])), float(np.mean([c[2] for c in cells]))
            rows.append({"dataset": dataset, "variant": variant, "target": name, "n_users": cells[0][0],
                         "share_of_users": cells[0][0] / n_all, "n_seeds": len(cells), "recall@5": r5,
                         "recall@10": r10, "recall@5_over_recall@10": r5 / r10 if r10 > 0 else math.nan,
                         "reason": ""})
    return pd.DataFrame(rows, columns=PREFIX_SHARING_COLUMNS)


def reselection_table(table: pd.DataFrame) -> pd.DataFrame:
    """reselect_epochs() as shown: epochs to one decimal, validation values to 4, changes to 0.1%."""
    if table.empty:
        return pd.DataFrame()
    kept = [f"{r.kept_epoch_mean:.1f}" if r.n_ok else "" for r in table.itertuples()]
    return pd.DataFrame({
        "dataset": table["dataset"], "variant": table["variant"], "seeds": table["n_ok"],
        "kept epoch (R@10)": kept,
        "epoch on " + table["monitor"].iloc[0]: [f"{x:.1f}" if x == x else "" for x in table["reselected_epoch_mean"]],
        "valid " + table["monitor"].iloc[0] + " kept": [_num(x) for x in table["kept_mean"]],
        "re-selected": [f"{_num(x)} ({_pct(p)})" if x == x else "" for x, p in
                        zip(table["reselected_mean"], table["reselected_pct"])],
        "best recorded": [f"{_num(x)} ({_pct(p)})" if x == x else "" for x, p in
                          zip(table["best_recorded_mean"], table["best_recorded_pct"])],
        "censored": table["n_censored"], "note": table["reason"].fillna(""),
    }).reset_index(drop=True)


def prefix_sharing_table(table: pd.DataFrame) -> pd.DataFrame:
    """hits_by_prefix_sharing() as shown: one row per dataset, variant and group of users."""
    if table.empty:
        return pd.DataFrame()
    return pd.DataFrame({
        "dataset": table["dataset"], "variant": table["variant"], "target's prefix": table["target"].fillna(""),
        "users": [f"{int(n):,} ({100 * s:.1f}%)" if n == n else "" for n, s in
                  zip(table["n_users"], table["share_of_users"])],
        "seeds": table["n_seeds"].fillna(0).astype(int),
        "Recall@5": [_num(x) for x in table["recall@5"]], "Recall@10": [_num(x) for x in table["recall@10"]],
        "R@5 / R@10": [f"{x:.3f}" if x == x else "" for x in table["recall@5_over_recall@10"]],
        "note": table["reason"].fillna(""),
    }).reset_index(drop=True)


def prefix_sharing_of_report(rep: "Report", *, params_file=None, profile: str | None = None, processed_root=None,
                             variants=("sa", "hybrid")) -> tuple[pd.DataFrame, list]:
    """hits_by_prefix_sharing() over the datasets of the report's runs, the semantic IDs read from
    processed_root as by_history_length_of_report() reads the history lengths; notes name the datasets
    without processed data."""
    datasets, synthetic = _report_datasets(rep, params_file, profile)
    sharing, notes = sid_prefix_sharing(datasets, processed_root=processed_root, synthetic=synthetic)
    return hits_by_prefix_sharing(rep.runs, sharing, variants=variants), notes


# ============================================================================= published numbers

def load_published(path=DEFAULT_PUBLISHED) -> pd.DataFrame:
    """params/published.yaml as a long table: source, paper, citation, compare_with, dataset, metric,
    published. `paper` (optional in the file; default: the source's name) groups the rows of one
    publication, e.g. its SA baseline and its hybrid.

    null entries (numbers we do not have) stay as NaN rows so the table shows they are unknown.
    """
    import yaml

    path = repo_path(path)
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML ({e})") from e
    rows = []
    for name, source in (doc.get("sources") or {}).items():
        for field_name in ("citation", "compare_with", "metrics"):
            if field_name not in source:
                raise ValueError(f"{path}: sources.{name} lacks the field {field_name!r}")
        for dataset, values in (source["metrics"] or {}).items():
            for metric, value in (values or {}).items():
                stats.parse_metric(metric)
                if value is not None and not isinstance(value, (int, float)):
                    raise ValueError(f"{path}: sources.{name}.metrics.{dataset}.{metric} must be a number or null, "
                                     f"got {value!r}")
                rows.append({"source": name, "paper": source.get("paper") or name, "citation": source["citation"],
                             "compare_with": source["compare_with"], "dataset": dataset, "metric": metric,
                             "published": math.nan if value is None else float(value)})
    return pd.DataFrame(rows, columns=["source", "paper", "citation", "compare_with", "dataset", "metric", "published"])


def published_comparison(summary: pd.DataFrame, published: pd.DataFrame) -> pd.DataFrame:
    """Published numbers next to ours (the variant each source is compared with), with ours/published."""
    ours = summary.rename(columns={"variant": "compare_with", "mean": "ours_mean", "ci_low": "ours_ci_low",
                                   "ci_high": "ours_ci_high"})
    ours = ours[["dataset", "compare_with", "metric", "ours_mean", "ours_ci_low", "ours_ci_high", "n_ok", "n_expected"]]
    table = published.merge(ours, on=["dataset", "compare_with", "metric"], how="left")
    table["ours_over_published"] = table["ours_mean"] / table["published"]
    return table


# ============================================================================= the whole report

@dataclass
class Report:
    parameters: dict
    runs: pd.DataFrame
    status: pd.DataFrame
    summary: pd.DataFrame
    comparisons: pd.DataFrame
    equivalence: pd.DataFrame
    published: pd.DataFrame
    histories: pd.DataFrame
    notes: list = field(default_factory=list)
    pooled: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=POOLED_COLUMNS))
    # filled by by_history_length_of_report (it needs the processed data, which the runs do not hold)
    by_history_length: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=BY_LENGTH_COLUMNS))
    model_size: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=MODEL_SIZE_COLUMNS))
    reselection: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=RESELECTION_COLUMNS))
    stopping: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=STOPPING_COLUMNS))
    # filled by prefix_sharing_of_report (the semantic IDs are in the processed data)
    prefix_sharing: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=PREFIX_SHARING_COLUMNS))


# comparisons beyond "every variant against each reference": (variant, reference) pairs of equal depth
DEPTH_PAIRS = (("hybrid-1to2-6L", "sa-6L"),)


def build_report(runs: pd.DataFrame, *, references=("sa", "hybrid"), metrics=METRIC_NAMES,
                 equivalence_pairs=(("hybrid", "sa"),) + DEPTH_PAIRS, pairs=DEPTH_PAIRS,
                 tost_margin: float = 0.05, n_bootstrap: int = 10_000,
                 seed: int = 0, confidence: float = 0.95, published_file=DEFAULT_PUBLISHED,
                 progress: bool = True) -> Report:
    """Every table of the report. `pairs` adds (variant, reference) comparisons to the
    every-variant-against-each-reference ones (each its own Holm family); pairs and equivalence pairs
    whose variants are both absent from `runs` (not in this grid) are left out."""
    metrics = tuple(metrics)
    for m in metrics:
        stats.parse_metric(m)
    ranks = PerUserRanks()
    summary = summarize(runs, metrics, confidence=confidence)
    notes = stale_data_notes(runs)
    published_file = repo_path(published_file)
    if published_file is not None and published_file.is_file():
        published = published_comparison(summary, load_published(published_file))
    else:
        published = pd.DataFrame()
        notes.append(f"no published numbers: {published_file} not found")
    histories = runs_io.load_histories(runs) if not runs.empty else pd.DataFrame()
    in_grid = set(runs["variant"]) if not runs.empty else set()
    equivalence_pairs = [tuple(p) for p in equivalence_pairs if set(p) & in_grid]
    pairs = [tuple(p) for p in pairs if set(p) & in_grid and p[1] not in references]
    parameters = {"references": list(references), "metrics": list(metrics), "pairs": [list(p) for p in pairs],
                  "equivalence_pairs": [list(p) for p in equivalence_pairs], "tost_margin": tost_margin,
                  "n_bootstrap": n_bootstrap, "seed": seed, "confidence": confidence}
    kw = dict(confidence=confidence, n_bootstrap=n_bootstrap, seed=seed, ranks=ranks)
    comparisons = [compare(runs, references, metrics, progress=progress, **kw)]
    comparisons += [compare(runs[runs["variant"].isin(p)], (p[1],), metrics, **kw) for p in pairs]
    comparisons = [c for c in comparisons if not c.empty]
    return Report(
        parameters=parameters, runs=runs, status=status_table(runs), summary=summary,
        comparisons=pd.concat(comparisons, ignore_index=True) if comparisons else compare(runs.iloc[:0]),
        equivalence=equivalence(runs, equivalence_pairs, metrics, margin=tost_margin, ranks=ranks),
        published=published, histories=histories, notes=notes,
        pooled=pooled(runs, references, metrics, pairs=pairs, confidence=confidence, margin=tost_margin),
        model_size=model_size(runs), reselection=reselect_epochs(runs),
        stopping=stopping_dependence(runs, [m for m in ("recall@10", "ndcg@10") if m in metrics] or metrics[:1],
                                     confidence=confidence))


def _atomic_csv(frame: pd.DataFrame, path: Path) -> None:
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)


def write_report(report: Report, output_dir, *, runs_root=None, params_file=None, profile=None) -> dict:
    """CSV tables + report.json (parameters, provenance, counts, what is missing) into output_dir.

    Returns {name: path}. Each file is written to a temporary name and renamed.
    """
    output_dir = repo_path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name in ("status", "summary", "comparisons", "equivalence", "published", "pooled", "by_history_length",
                 "model_size", "stopping", "reselection", "prefix_sharing"):
        path = output_dir / f"{name}.csv"
        _atomic_csv(getattr(report, name), path)
        paths[name] = path
    runs_cols = [c for c in report.runs.columns if c not in ("run_dir",)]
    _atomic_csv(report.runs[runs_cols] if not report.runs.empty else report.runs, output_dir / "runs.csv")
    paths["runs"] = output_dir / "runs.csv"
    counts = report.runs["status"].value_counts().to_dict() if not report.runs.empty else {}
    not_ok = problem_runs(report.runs)
    summary = {
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "runs_root": shown_path(runs_root),
        "params_file": shown_path(params_file),
        "profile": profile,
        "parameters": report.parameters,
        "runs": {"expected": int(len(report.runs)), **{k: int(v) for k, v in counts.items()}},
        "not_ok": not_ok.drop(columns=["run_dir"], errors="ignore").to_dict(orient="records"),
        "equivalence": report.equivalence.to_dict(orient="records"),
        "notes": report.notes,
        "files": {k: p.name for k, p in paths.items()},
    }
    paths["report"] = atomic_write_json(output_dir / "report.json", _jsonable(summary))
    return paths


def _jsonable(x):
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (float, np.floating)) and not np.isfinite(x):
        return None
    if x is pd.NA or x is None:
        return None
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.floating):
        return float(x)
    if isinstance(x, np.bool_):
        return bool(x)
    return x


def provenance(runs: pd.DataFrame, *, command: str | None = None) -> str:
    """One line naming what the numbers come from: devices, commits of the runs, the report's
    commit, the command and the date (UTC)."""
    ok = runs[runs["status"] == "ok"] if not runs.empty else runs
    def listing(col):
        if ok.empty or col not in ok.columns:
            return "n/a"
        values = ok[col].dropna().astype(str)
        return ", ".join(f"{v} ({n})" for v, n in values.value_counts().items()) or "n/a"
    dates = ok["created_at"].dropna().astype(str) if not ok.empty and "created_at" in ok.columns else pd.Series([], dtype=str)
    span = "n/a" if not len(dates) else dates.min()[:10] if dates.min()[:10] == dates.max()[:10] else \
        f"{dates.min()[:10]} to {dates.max()[:10]}"
    return (f"Runs: {len(ok)} finished; device {listing('device')}; commit {listing('commit')}; trained {span}. "
            f"Report: commit {git_commit()}, {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}"
            + (f", `{command}`" if command else "") + ".")


# ============================================================================= findings (the results section)

# the questions the grid asks, by variant name (params/ablations.yaml); absent variants are reported as not run
COMPONENT_VARIANTS = ("hybrid-no-conv", "hybrid-no-gate", "hybrid-rmsnorm", "hybrid-denominator", "hybrid-plain-la",
                      "hybrid-recency-gate")
# SA:GBLA ratio of the four-layer encoders, most SA first
RATIO_VARIANTS = {"sa": (4, 0), "hybrid": (2, 2), "ratio-1to1": (2, 2), "ratio-1to3": (1, 3), "all-gbla": (0, 4)}
METRIC_LABELS = {"recall@5": "Recall@5", "recall@10": "Recall@10", "ndcg@5": "NDCG@5", "ndcg@10": "NDCG@10"}


def _label(metric: str) -> str:
    return METRIC_LABELS.get(metric, metric)


def _num(x, digits: int = 4) -> str:
    return "n/a" if x is None or not np.isfinite(x) else f"{x:.{digits}f}"


def _pct(x) -> str:
    return "n/a" if x is None or not np.isfinite(x) else f"{x:+.1f}%".replace("-", "−")


def _p(x) -> str:
    """p-values to 3 significant digits."""
    if x is None or not np.isfinite(x):
        return "n/a"
    return f"{x:.3g}" if x >= 0.001 else f"{x:.2e}"


def _pct_ci(row) -> str:
    """'−2.7% [−5.1, −0.3]' of a comparisons row (seed level)."""
    if not np.isfinite(row["pct"]):
        return "n/a"
    if not (np.isfinite(row["pct_ci_low"]) and np.isfinite(row["pct_ci_high"])):
        if "n_paired_seeds" not in row:
            return f"{_pct(row['pct'])} (no CI)"
        return f"{_pct(row['pct'])} (no CI: {int(row['n_paired_seeds'])} paired seed)"
    return f"{_pct(row['pct'])} [{_pct(row['pct_ci_low'])[:-1]}, {_pct(row['pct_ci_high'])[:-1]}]"


def _seeds_of(summary: pd.DataFrame, dataset: str, variant: str) -> tuple[int, int]:
    row = summary[(summary["dataset"] == dataset) & (summary["variant"] == variant)]
    return (0, 0) if row.empty else (int(row["n_ok"].iloc[0]), int(row["n_expected"].iloc[0]))


def _comparison(comparisons: pd.DataFrame, dataset, variant, reference, metric):
    c = comparisons
    if c.empty:
        return None
    row = c[(c["dataset"] == dataset) & (c["variant"] == variant) & (c["reference"] == reference) & (c["metric"] == metric)]
    return None if row.empty else row.iloc[0]


def _verdict(row, alpha: float) -> str:
    """'−8.1% [−12.0, −4.2], p_Holm = 0.003' with whether it is significant."""
    if row is None:
        return "not compared"
    if not np.isfinite(row["pct"]):
        return f"not compared ({row['reason'] or 'no paired seeds'})"
    text = f"{_pct_ci(row)}, p_Holm = {_p(row['p_ttest_holm'])}"
    if np.isfinite(row["p_ttest_holm"]):
        return text + (" (significant)" if row["p_ttest_holm"] <= alpha else " (not significant)")
    return text + f" (no test: {row['reason']})" if row["reason"] else text


def _availability(summary, dataset, variants) -> tuple[list, list]:
    """([variants with no finished seed], [variants with some seeds missing, as 'name (k/n)'])."""
    none, partial = [], []
    for v in variants:
        k, n = _seeds_of(summary, dataset, v)
        if k == 0:
            none.append(v)
        elif k < n:
            partial.append(f"{v} ({k}/{n} seeds)")
    return none, partial


def _published_finding(rep: "Report", comparisons: pd.DataFrame, d: str, metrics) -> str | None:
    """The published hybrid-vs-Tiger gap of dataset `d` beside ours, as a sentence (None: no paper row)."""
    gaps = published_gaps(rep.published, comparisons)
    g = gaps[gaps["dataset"] == d] if not gaps.empty else gaps
    if g.empty:
        return None
    parts = []
    for m in metrics:
        r = g[g["metric"] == m]
        if r.empty:
            continue
        r = r.iloc[0]
        ours = "not yet measured" if not np.isfinite(r["ours_pct"]) else (
            f"{_pct(r['ours_pct'])}" + (f" [{_pct(r['ours_pct_ci_low'])[:-1]}, {_pct(r['ours_pct_ci_high'])[:-1]}]"
                                        if np.isfinite(r["ours_pct_ci_low"]) else ""))
        parts.append(f"{_label(m)} {_pct(r['published_pct'])} ({_num(r['published_variant'])} vs "
                     f"{_num(r['published_reference'])}), ours {ours}")
    return f"The {g['paper'].iloc[0]} paper's hybrid vs its all-SA Tiger (mean of its runs): " + "; ".join(parts) + "."


def _top5_finding(rep: "Report", d: str) -> str | None:
    """`sa`'s top-5 diagnostics on dataset `d` as a sentence (None: neither was computed)."""
    parts = []
    r = rep.reselection[(rep.reselection["dataset"] == d) & (rep.reselection["variant"] == "sa")] \
        if not rep.reselection.empty else rep.reselection
    if not r.empty and r["n_ok"].iloc[0] > 0:
        r = r.iloc[0]
        parts.append(f"early stopping on validation {_label(r['monitor'])} instead of Recall@10 would change its "
                     f"validation {_label(r['monitor'])} by {_pct(r['reselected_pct'])} (the best recorded epoch: "
                     f"{_pct(r['best_recorded_pct'])}; {int(r['n_censored'])} of {int(r['n_ok'])} records end "
                     f"before that replay would stop)")
    p = rep.prefix_sharing[(rep.prefix_sharing["dataset"] == d) & (rep.prefix_sharing["variant"] == "sa")] \
        if not rep.prefix_sharing.empty else rep.prefix_sharing
    p = p[p["target"].notna()].set_index("target") if not p.empty else p
    if {"shared prefix", "own prefix"} <= set(p.index):
        ratio, share = p["recall@5_over_recall@10"], 100 * p.loc["shared prefix", "share_of_users"]
        parts.append(f"users whose target shares its semantic-ID prefix ({share:.1f}%) "
                     f"have Recall@5 / Recall@10 {ratio['shared prefix']:.3f} against {ratio['own prefix']:.3f} for "
                     f"targets with a prefix of their own")
    if not parts:
        return None
    return "Top five, sa (the report's top-5 diagnostics): " + "; ".join(parts) + "."


def findings(rep: "Report", metrics=("recall@10", "ndcg@10"), *, alpha: float = 0.05) -> pd.DataFrame:
    """The results in sentences, one row per (dataset, topic), each sentence carrying its numbers.

    Topics: `equivalence` (does hybrid match sa within the TOST margin), `components` (which
    component's removal or replacement changes the metric vs hybrid: seed-level paired t, Holm),
    `ratio` (sa, hybrid, ratio-1to1, ratio-1to3, all-gbla: means, differences vs sa, and Spearman's rho
    of the number of GBLA layers with the per-seed metric), `depth` (hybrid-1to2-6L vs sa-6L),
    `bidirectional` (sa-causal vs sa), `published` (the GBLA paper's Tiger+GBLA-vs-Tiger gap beside
    ours), `top5` (sa's top-5 diagnostics: rep.reselection, rep.prefix_sharing), `not_run` (variants
    without finished seeds or with missing seeds); and, once two datasets
    pair seeds, `pooled` under "across datasets" (rep.pooled: each change averaged over the datasets)
    and `stopping` (rep.stopping: does a seed's metric move with the epoch it kept, within its variant);
    `history` when rep.by_history_length holds the dataset's split by history length.
    A topic whose variants are not in the grid at all says so; a dataset with no finished run at all
    gets only `published` and `not_run`. Statistics are the seed-level ones (what retraining varies).
    """
    from scipy import stats as sps

    rows = []
    summary, comparisons, eq, runs = rep.summary, rep.comparisons, rep.equivalence, rep.runs
    margin_pct = 100 * rep.parameters.get("tost_margin", 0.05)
    datasets = list(pd.unique(summary["dataset"])) if not summary.empty else []
    grid_variants = {d: list(pd.unique(summary.loc[summary["dataset"] == d, "variant"])) for d in datasets}

    def mean_of(d, v, m):
        r = summary[(summary["dataset"] == d) & (summary["variant"] == v) & (summary["metric"] == m)]
        return (math.nan, math.nan, math.nan) if r.empty else (r["mean"].iloc[0], r["ci_low"].iloc[0], r["ci_high"].iloc[0])

    def add(d, topic, text):
        rows.append({"dataset": d, "topic": topic, "text": text})

    for d in datasets:
        present = grid_variants[d]
        none, partial = _availability(summary, d, present)
        if present and len(none) == len(present):   # nothing to compare: say so once, not per topic
            published_text = _published_finding(rep, comparisons, d, metrics)
            if published_text:
                add(d, "published", published_text)
            add(d, "not_run", f"Not yet run — no finished run of any of its {len(present)} variants.")
            continue
        def unrun(*variants):   # a topic's variants without a finished run: one short sentence, no n/a list
            missing = [v for v in variants if v in none]
            return f"not yet compared (no finished run of {', '.join(missing)})" if missing else ""

        # --- hybrid vs sa: equivalence
        if {"hybrid", "sa"} <= set(present) and unrun("hybrid", "sa"):
            add(d, "equivalence", f"Hybrid vs all-SA: {unrun('hybrid', 'sa')}.")
        elif {"hybrid", "sa"} <= set(present):
            parts = []
            for m in metrics:
                c = _comparison(comparisons, d, "hybrid", "sa", m)
                e = eq[(eq["dataset"] == d) & (eq["variant"] == "hybrid") & (eq["reference"] == "sa") &
                       (eq["metric"] == m) & (eq["level"] == "seeds")] if not eq.empty else eq
                hy, sa = mean_of(d, "hybrid", m)[0], mean_of(d, "sa", m)[0]
                head = f"{_label(m)} {_num(hy)} vs {_num(sa)}"
                if c is None or not np.isfinite(c["pct"]):
                    parts.append(f"{head} (not compared: {c['reason'] if c is not None else 'no runs'})")
                    continue
                if e.empty or e["equivalent"].iloc[0] is None or pd.isna(e["equivalent"].iloc[0]):
                    why = e["reason"].iloc[0] if not e.empty else "no TOST"
                    parts.append(f"{head}, {_pct_ci(c)}: equivalence not tested ({why})")
                    continue
                r = e.iloc[0]
                ci90 = f"90% CI {_pct(stats.percent_of(r['ci90_low'], r['reference_mean']))[:-1]} to " \
                       f"{_pct(stats.percent_of(r['ci90_high'], r['reference_mean']))}"
                verdict = "equivalent" if bool(r["equivalent"]) else "equivalence not shown"
                parts.append(f"{head}, {_pct_ci(c)}: {verdict} within ±{margin_pct:g}% "
                             f"(TOST p = {_p(r['p_tost'])}, {ci90}, {int(r['n'])} seeds)")
            add(d, "equivalence", "Hybrid (SA, GBLA, GBLA, SA) vs all-SA: " + "; ".join(parts) + ".")
        else:
            add(d, "equivalence", "Hybrid vs all-SA: not in this grid.")

        # --- components vs hybrid
        comps = [v for v in COMPONENT_VARIANTS if v in present]
        if comps and "hybrid" in present and (unrun("hybrid") or not set(comps) - set(none)):
            add(d, "components", f"Components, each variant vs hybrid: {unrun('hybrid') or unrun(*comps)}.")
        elif comps and "hybrid" in present:
            sig, nonsig, untested = [], [], {}
            for v in comps:
                for m in metrics:
                    c = _comparison(comparisons, d, v, "hybrid", m)
                    if c is None or not np.isfinite(c["p_ttest_holm"]):
                        untested.setdefault(v, []).append(_label(m))
                        continue
                    item = f"{v} {_label(m)} {_pct_ci(c)} (p_Holm = {_p(c['p_ttest_holm'])}"
                    if c["p_ttest_holm"] <= alpha:
                        sig.append(item + ")")
                    else:  # what the test could have found: a null result is only as strong as this
                        mde = c.get("mde_pct", math.nan)
                        nonsig.append(item + (f"; detectable: ±{abs(mde):.1f}%)" if np.isfinite(mde) else ")"))
            text = "Components, each variant vs hybrid (paired t over seeds, Holm): "
            if sig or nonsig:
                text += "significant: " + "; ".join(sig) if sig else "no change is significant"
            else:  # say nothing about significance before anything could be tested
                text += "none testable yet"
            if nonsig:
                text += (". Not significant (detectable: the change a paired t-test over these seeds finds with "
                         "80% power at α = 0.05 before Holm): " + "; ".join(nonsig))
            unrun_comps = [v for v in untested if v in none]
            if unrun_comps:
                text += ". Not yet run: " + ", ".join(unrun_comps)
            if few := [f"{v} ({', '.join(ms)})" for v, ms in untested.items() if v not in none]:
                text += ". Not tested (too few paired seeds): " + ", ".join(few)
            add(d, "components", text + ".")
        else:
            add(d, "components", "Component ablations (hybrid-no-conv, ..., hybrid-recency-gate): not in this grid.")

        # --- SA:GBLA ratio
        ratio = [v for v in RATIO_VARIANTS if v in present]
        if len(ratio) >= 2:
            parts = []
            for m in metrics[:1]:
                for v in ratio:
                    mean, lo, hi = mean_of(d, v, m)
                    sa_, gb = RATIO_VARIANTS[v]
                    if v in none:
                        parts.append(f"{v} ({sa_}:{gb}) not yet run")
                        continue
                    ci = f" ± {_num((hi - lo) / 2)}" if np.isfinite(lo) else ""
                    vs = "" if v == "sa" else f", {_pct_ci(c)} vs sa" if (c := _comparison(comparisons, d, v, "sa", m)) is not None \
                        and np.isfinite(c["pct"]) else ""
                    sig = ""
                    if v != "sa" and c is not None and np.isfinite(c.get("p_ttest_holm", math.nan)):
                        sig = ", significant" if c["p_ttest_holm"] <= alpha else ""
                    parts.append(f"{v} ({sa_}:{gb}) {_num(mean)}{ci}{vs}{sig}")
                ok = runs[(runs["dataset"] == d) & (runs["status"] == "ok") & runs["variant"].isin(ratio)]
                trend = ""
                if ok["variant"].nunique() >= 2 and len(ok) >= 3:
                    x = ok["variant"].map(lambda v: RATIO_VARIANTS[v][1]).to_numpy(float)
                    y = ok[f"test_{m}"].to_numpy(float)
                    rho, p = sps.spearmanr(x, y)
                    if np.isfinite(rho):
                        trend = (f" Spearman's rho between the number of GBLA layers and per-seed {_label(m)}: "
                                 f"{rho:+.2f} (p = {_p(p)}, {len(ok)} runs).")
                add(d, "ratio", f"SA:GBLA ratio, {_label(m)} mean ± 95% CI half-width: " + "; ".join(parts) + "." + trend)
        else:
            add(d, "ratio", "SA:GBLA ratio series (sa, hybrid, ratio-1to1, ratio-1to3, all-gbla): not in this grid.")

        # --- six layers
        if {"hybrid-1to2-6L", "sa-6L"} <= set(present) and unrun("sa-6L", "hybrid-1to2-6L"):
            add(d, "depth", f"Six layers, the paper's 1:2 pattern (hybrid-1to2-6L) vs SA x 6: {unrun('sa-6L', 'hybrid-1to2-6L')}.")
        elif {"hybrid-1to2-6L", "sa-6L"} & set(present):
            parts = [f"{_label(m)} {_verdict(_comparison(comparisons, d, 'hybrid-1to2-6L', 'sa-6L', m), alpha)}"
                     for m in metrics]
            add(d, "depth", "Six layers, the paper's 1:2 pattern (hybrid-1to2-6L) vs SA x 6: " + "; ".join(parts) + ".")
        else:
            add(d, "depth", "Six layers (hybrid-1to2-6L vs sa-6L): not in this grid.")

        # --- bidirectional vs causal
        if {"sa", "sa-causal"} <= set(present) and unrun("sa-causal", "sa"):
            add(d, "bidirectional", f"Causal vs bidirectional self-attention (sa-causal vs sa): {unrun('sa-causal', 'sa')}.")
        elif {"sa", "sa-causal"} <= set(present):
            parts = [f"{_label(m)} {_verdict(_comparison(comparisons, d, 'sa-causal', 'sa', m), alpha)}" for m in metrics]
            add(d, "bidirectional", "Causal vs bidirectional self-attention (sa-causal vs sa): " + "; ".join(parts) + ".")
        else:
            add(d, "bidirectional", "Causal vs bidirectional self-attention (sa-causal vs sa): not in this grid.")

        published_text = _published_finding(rep, comparisons, d, metrics)
        if published_text:
            add(d, "published", published_text)
        top5_text = _top5_finding(rep, d)
        if top5_text:
            add(d, "top5", top5_text)

        # --- what is not run yet
        wanted = [v for v in ("sa", "sa-causal", "hybrid", *COMPONENT_VARIANTS, *RATIO_VARIANTS, "sa-6L", "hybrid-1to2-6L")
                  if v not in present]
        bits = []
        if none:
            bits.append("no finished run: " + ", ".join(none))
        if partial:
            bits.append("incomplete: " + ", ".join(partial))
        if wanted:
            bits.append("not in this grid: " + ", ".join(dict.fromkeys(wanted)))
        add(d, "not_run", ("Not yet run — " + "; ".join(bits) + ".") if bits else "Every variant of the grid has all its seeds.")
        history_text = _history_finding(rep.by_history_length, d, alpha)
        if history_text:
            rows.insert(len(rows) - 1, {"dataset": d, "topic": "history", "text": history_text})  # before not_run
    if not rep.pooled.empty:
        add("across datasets", "pooled", _pooled_finding(rep.pooled, metrics, alpha))
    stopping_text = _stopping_finding(rep, metrics[0], alpha)
    if stopping_text:
        add("across datasets", "stopping", stopping_text)
    return pd.DataFrame(rows, columns=["dataset", "topic", "text"])


def _history_finding(table: pd.DataFrame, dataset: str, alpha: float) -> str | None:
    """One sentence per dataset from by_history_length: each pair's change per bucket, the buckets
    whose change is significant (Holm), and whether the buckets differ."""
    rows = table[(table["dataset"] == dataset) & table["pct"].notna()] if not table.empty else table
    if rows.empty:
        return None
    parts = []
    for (variant, reference, metric), g in rows.groupby(["variant", "reference", "metric"], sort=False):
        per = ", ".join(f"{h} {_pct(p)}{'*' if q <= alpha else ''}" for h, p, q in
                        zip(g["history"], g["pct"], g["p_perm_holm"]))
        between = g["p_between_buckets"].iloc[0]
        differ = ("the buckets differ" if between <= alpha else "the buckets do not differ significantly") + \
            f" (ANOVA p = {_p(between)})" if np.isfinite(between) else "no test between buckets"
        parts.append(f"{variant} vs {reference}, {_label(metric)}: {per}; {differ}")
    return ("By the test user's history length in items (user level; * significant after Holm over the "
            "buckets): " + "; ".join(parts) + ".")


def _pooled_finding(pooled: pd.DataFrame, metrics, alpha: float) -> str:
    """The across-datasets sentence: hybrid vs sa at each metric (with the TOST), then every other
    pooled comparison at the first metric, significant ones first; a change that differs between
    the datasets (heterogeneity F-test p <= alpha) says so."""
    def item(r, name=""):
        text = f"{name}{_pct_ci(r)}, p_Holm = {_p(r['p_holm'])} ({r['per_dataset_pct']}"
        if np.isfinite(r["p_heterogeneity"]) and r["p_heterogeneity"] <= alpha:
            text += f"; differs between datasets, F-test p = {_p(r['p_heterogeneity'])}"
        return text + ")"

    sentences = []
    hs = pooled[(pooled["variant"] == "hybrid") & (pooled["reference"] == "sa") & pooled["metric"].isin(metrics)]
    if not hs.empty:
        bits = []
        for _, r in hs.iterrows():
            bit = item(r, f"{_label(r['metric'])} ")
            if not pd.isna(r["equivalent"]):
                bit += (", equivalent" if bool(r["equivalent"]) else ", equivalence not shown") + \
                       f" within ±{r['margin_pct']:g}% (TOST p = {_p(r['p_tost'])})"
            bits.append(bit)
        sentences.append(f"Hybrid vs all-SA, averaged over {hs['datasets'].iloc[0].replace(',', ', ')} "
                         f"(seed-level t on {int(hs['df'].iloc[0])} df): " + "; ".join(bits) + ".")
    # each pair once: a reference compared with the other (sa vs hybrid) mirrors the row before it
    seen, keep = {("hybrid", "sa")}, []
    for i, r in pooled[pooled["metric"] == metrics[0]].iterrows():
        if (r["variant"], r["reference"]) not in seen and (r["reference"], r["variant"]) not in seen:
            keep.append(i)
        seen.add((r["variant"], r["reference"]))
    rest = pooled.loc[keep]
    if not rest.empty:
        sig = rest[rest["p_holm"] <= alpha]
        items = [item(r, f"{r['variant']} vs {r['reference']} ") for _, r in sig.iterrows()]
        nonsig = rest[~(rest["p_holm"] <= alpha)]
        text = f"Other variants averaged over the datasets where both have 2+ seeds, {_label(metrics[0])}: "
        text += ("significant (Holm within each reference): " + "; ".join(items)) if items else "none significant"
        if not nonsig.empty:
            text += ". Not significant: " + "; ".join(f"{r['variant']} vs {r['reference']} {_pct_ci(r)}"
                                                     for _, r in nonsig.iterrows())
        sentences.append(text + ".")
    return " ".join(sentences)


def findings_markdown(table: pd.DataFrame) -> str:
    """The findings as Markdown: a heading per dataset, a bullet per topic."""
    if table.empty:
        return "*No finished runs: nothing to report yet.*"
    out = []
    for d, g in table.groupby("dataset", sort=False):
        out.append(f"**{d}**\n")
        out += [f"- {t}" for t in g["text"]]
        out.append("")
    return "\n".join(out)


def published_gaps(published: pd.DataFrame, comparisons: pd.DataFrame, variant: str = "hybrid",
                   reference: str = "sa") -> pd.DataFrame:
    """Per paper with both a `reference` and a `variant` row: its gap in % of its reference, beside
    ours (the seed-level comparison of our variant vs our reference, with its 95% CI)."""
    cols = ["paper", "dataset", "metric", "published_variant", "published_reference", "published_pct",
            "ours_pct", "ours_pct_ci_low", "ours_pct_ci_high", "ours_p_ttest"]
    if published is None or published.empty or "paper" not in published.columns:
        return pd.DataFrame(columns=cols)
    rows = []
    for (paper, d, m), g in published.groupby(["paper", "dataset", "metric"], sort=False):
        v = g.loc[g["compare_with"] == variant, "published"]
        r = g.loc[g["compare_with"] == reference, "published"]
        if v.empty or r.empty:
            continue
        c = _comparison(comparisons, d, variant, reference, m)
        rows.append({"paper": paper, "dataset": d, "metric": m, "published_variant": v.iloc[0],
                     "published_reference": r.iloc[0], "published_pct": stats.percent_of(v.iloc[0] - r.iloc[0], r.iloc[0]),
                     "ours_pct": c["pct"] if c is not None else math.nan,
                     "ours_pct_ci_low": c["pct_ci_low"] if c is not None else math.nan,
                     "ours_pct_ci_high": c["pct_ci_high"] if c is not None else math.nan,
                     "ours_p_ttest": c["p_ttest"] if c is not None else math.nan})
    return pd.DataFrame(rows, columns=cols)


# ============================================================================= paper-style tables

def main_table(rep: "Report", metrics=None, *, reference: str = "sa", alpha: float = 0.05,
               digits: int = 4) -> pd.DataFrame:
    """Variants as rows, (dataset, metric) as columns, 'mean ± 95% CI half-width' cells with markers:
    ▲/▼ differs from `reference` (paired t over seeds, Holm p <= alpha; up = higher), ≈ equivalent to
    its TOST reference within the margin (seed level), (k/n) when seeds are missing, – when none finished."""
    summary = rep.summary
    if summary.empty:
        return pd.DataFrame()
    metrics = list(metrics or pd.unique(summary["metric"]))
    comps, eq = rep.comparisons, rep.equivalence
    variants = list(pd.unique(summary["variant"]))
    datasets = list(pd.unique(summary["dataset"]))
    cells = {}
    for d in datasets:
        for m in metrics:
            col = {}
            for v in variants:
                r = summary[(summary["dataset"] == d) & (summary["variant"] == v) & (summary["metric"] == m)]
                if r.empty:
                    col[v] = ""
                    continue
                r = r.iloc[0]
                if r["n_ok"] == 0:
                    col[v] = "–"
                    continue
                text = f"{r['mean']:.{digits}f}"
                if np.isfinite(r["ci_low"]):
                    text += f" ± {(r['ci_high'] - r['ci_low']) / 2:.{digits}f}"
                c = _comparison(comps, d, v, reference, m) if v != reference else None
                if c is not None and np.isfinite(c["p_ttest_holm"]) and c["p_ttest_holm"] <= alpha:
                    text += " ▲" if c["diff"] > 0 else " ▼"
                if not eq.empty:
                    e = eq[(eq["dataset"] == d) & (eq["variant"] == v) & (eq["metric"] == m) & (eq["level"] == "seeds")]
                    if len(e) and e["equivalent"].iloc[0] is not None and not pd.isna(e["equivalent"].iloc[0]) \
                            and bool(e["equivalent"].iloc[0]):
                        text += " ≈"
                if r["n_ok"] < r["n_expected"]:
                    text += f" ({int(r['n_ok'])}/{int(r['n_expected'])})"
                col[v] = text
            cells[(d, _label(m))] = col
    table = pd.DataFrame(cells, index=variants)
    table.columns = pd.MultiIndex.from_tuples(table.columns, names=["dataset", "metric"])
    table.index.name = "variant"
    return table


def pooled_table(pooled: pd.DataFrame, metrics=("recall@10", "ndcg@10")) -> pd.DataFrame:
    """rep.pooled for reading: one row per comparison and metric, the average change with its CI,
    Holm p, each dataset's change, the heterogeneity and equivalence p-values."""
    rows = pooled[pooled["metric"].isin(metrics)] if not pooled.empty else pooled
    return pd.DataFrame({
        "comparison": [f"{v} vs {r}" for v, r in zip(rows["variant"], rows["reference"])],
        "metric": [_label(m) for m in rows["metric"]],
        "Δ% [95% CI]": [_pct_ci(r) for _, r in rows.iterrows()],
        "p (Holm)": [_p(p) for p in rows["p_holm"]],
        "per dataset": list(rows["per_dataset_pct"]),
        "differs between datasets (F p)": [_p(p) for p in rows["p_heterogeneity"]],
        "TOST p (±margin)": [f"{_p(p)} (±{m:g}%)" for p, m in zip(rows["p_tost"], rows["margin_pct"])],
    })


def history_length_table(table: pd.DataFrame) -> pd.DataFrame:
    """by_history_length() for reading: a row per dataset, pair, metric and bucket."""
    return pd.DataFrame({
        "dataset": table["dataset"], "comparison": table["variant"] + " vs " + table["reference"],
        "metric": [_label(m) for m in table["metric"]], "history (items)": table["history"],
        "users": table["n_users"], "reference": [_num(x) for x in table["reference_mean"]],
        "variant": [_num(x) for x in table["variant_mean"]],
        "Δ% [95% CI]": [_pct_ci(r) if np.isfinite(r["pct"]) else f"n/a ({r['reason']})" for _, r in table.iterrows()],
        "p (Holm)": [_p(p) for p in table["p_perm_holm"]],
        "buckets differ (F p)": [_p(p) for p in table["p_between_buckets"]]})


def style_main_table(table: pd.DataFrame):
    """The main table for HTML: compact, no wrapping inside cells, a rule between datasets."""
    return (table.style
            .set_table_styles([{"selector": "th, td", "props": "font-size: 0.85em; padding: 2px 6px; white-space: nowrap"},
                               {"selector": "th.col_heading.level0", "props": "text-align: center; border-bottom: 1px solid #999"}])
            .set_properties(**{"text-align": "right"}))


def detail_table(comparisons: pd.DataFrame, reference: str, dataset: str | None = None) -> pd.DataFrame:
    """Comparisons against one reference, compact enough for a page: differences in % of the reference
    mean to one decimal with their 95% CI, p-values to 3 significant digits, Holm-adjusted beside, and
    the seed-level test's minimum detectable effect (MDE %, 80% power)."""
    t = comparisons[comparisons["reference"] == reference] if not comparisons.empty else comparisons
    if dataset is not None and not t.empty:
        t = t[t["dataset"] == dataset]
    if t.empty:
        return pd.DataFrame()

    def ci(r, prefix):
        if not np.isfinite(r[prefix]):
            return "n/a"
        lo, hi = r[f"{prefix}_ci_low"], r[f"{prefix}_ci_high"]
        return f"{r[prefix]:+.1f} [{lo:+.1f}, {hi:+.1f}]" if np.isfinite(lo) and np.isfinite(hi) else f"{r[prefix]:+.1f}"

    out = pd.DataFrame({
        "variant": t["variant"], "metric": t["metric"].map(_label),
        "seeds": t["n_paired_seeds"].astype(int),
        "Δ% [95% CI] (seeds)": [ci(r, "pct") for _, r in t.iterrows()],
        "p (t)": t["p_ttest"].map(_p), "p Holm (t)": t["p_ttest_holm"].map(_p),
        "MDE %": t["mde_pct"].map(lambda x: "n/a" if not np.isfinite(x) else f"{x:.1f}"),
        "users": t["n_users"].map(lambda n: "n/a" if pd.isna(n) else f"{int(n):,}"),
        "Δ% [95% CI] (users)": [ci(r, "user_pct") for _, r in t.iterrows()],
        "p (perm.)": t["p_perm"].map(_p), "p Holm (perm.)": t["p_perm_holm"].map(_p),
        "note": t["reason"].fillna(""),
    })
    if dataset is None:
        out.insert(0, "dataset", t["dataset"])
    return out.reset_index(drop=True)


def style_detail_table(table: pd.DataFrame, alpha: float = 0.05):
    def significant(v):
        try:
            return "background-color: #c7e9c0" if float(v) <= alpha else ""
        except ValueError:
            return ""
    holm = [c for c in table.columns if c.startswith("p Holm")]
    return (table.style.map(significant, subset=holm).hide(axis="index")
            .set_table_styles([{"selector": "th, td", "props": "font-size: 0.8em; padding: 1px 5px"},
                               {"selector": "td", "props": "white-space: nowrap"}]))


def equivalence_table(equivalence: pd.DataFrame) -> pd.DataFrame:
    """The TOST table, formatted: differences and margins in % of the reference mean (one decimal)."""
    if equivalence.empty:
        return pd.DataFrame()
    e = equivalence
    pct = lambda col: [_pct(stats.percent_of(x, m))[:-1] if np.isfinite(x) else "n/a"  # noqa: E731
                       for x, m in zip(e[col], e["reference_mean"])]
    return pd.DataFrame({
        "dataset": e["dataset"], "pair": e["variant"] + " vs " + e["reference"], "metric": e["metric"].map(_label),
        "level": e["level"], "n": e["n"], "margin ±%": e["margin_pct"].map(lambda x: f"{x:g}"),
        "Δ%": pct("diff"), "90% CI low %": pct("ci90_low"), "90% CI high %": pct("ci90_high"),
        "p (TOST)": e["p_tost"].map(_p),
        "equivalent": e["equivalent"].map(lambda x: "n/a" if x is None or pd.isna(x) else ("yes" if x else "no")),
        "note": e["reason"].fillna(""),
    }).reset_index(drop=True)


# ============================================================================= HTML

def render_html(ipynb_path, *, hide_code: bool = True) -> str:
    """An executed notebook as standalone HTML, the way a report is read: code cells' inputs and
    prompts hidden (hide_code; the .ipynb keeps them) and progress-bar output on stderr dropped."""
    import nbformat
    from nbconvert import HTMLExporter

    nb = nbformat.read(str(ipynb_path), as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = [o for o in cell.get("outputs", [])
                            if not (o.get("output_type") == "stream" and o.get("name") == "stderr"
                                    and _looks_like_progress(o.get("text", "")))]
    exporter = HTMLExporter(exclude_input=hide_code, exclude_input_prompt=hide_code, exclude_output_prompt=hide_code)
    body, _ = exporter.from_notebook_node(nb)
    return body


def _looks_like_progress(text: str) -> bool:
    """tqdm-style bars ('comparisons:  40%|####  | 4/10 [...]') and carriage-return redraws."""
    import re
    lines = [ln for ln in re.split(r"[\r\n]+", text) if ln.strip()]
    return bool(lines) and all(re.search(r"\d+%\|.*\|\s*\d+/\d+", ln) or re.search(r"\d+/\d+ \[", ln) for ln in lines)


# ============================================================================= display helpers

def style_comparisons(table: pd.DataFrame, alpha: float = 0.05):
    """Styled comparison table: differences in %, p-values, Holm-significant cells highlighted."""
    cols = ["dataset", "metric", "reference", "variant", "n_paired_seeds", "pct", "pct_ci_low", "pct_ci_high",
            "p_ttest", "p_ttest_holm", "mde_pct", "n_users", "user_pct", "user_pct_ci_low", "user_pct_ci_high",
            "p_perm", "p_perm_holm", "reason"]
    shown = table[[c for c in cols if c in table.columns]]

    def significant(v):
        return "background-color: #c7e9c0" if isinstance(v, float) and v <= alpha else ""

    return (shown.style.format({c: "{:+.2f}" for c in ("pct", "pct_ci_low", "pct_ci_high", "user_pct",
                                                      "user_pct_ci_low", "user_pct_ci_high")}, na_rep="NaN")
            .format({"mde_pct": "{:.1f}"}, na_rep="NaN")
            .format({c: "{:.4f}" for c in ("p_ttest", "p_ttest_holm", "p_perm", "p_perm_holm")}, na_rep="NaN")
            .map(significant, subset=[c for c in ("p_ttest_holm", "p_perm_holm") if c in shown.columns])
            .hide(axis="index"))


def style_status(table: pd.DataFrame):
    def flag(v):
        return "background-color: #fcbba1" if isinstance(v, (int, np.integer)) and v > 0 else ""
    return table.style.map(flag, subset=["failed", "stale", "missing"]).hide(axis="index")


# ============================================================================= figures (seaborn)

def _theme():
    import seaborn as sns
    sns.set_theme(style="whitegrid", context="notebook")


def _datasets_with(data: pd.DataFrame, has_value: pd.Series) -> tuple[pd.DataFrame, list[str]]:
    """(the rows of the datasets where some row has a value, the other datasets' names): a dataset with
    nothing to show would be a row of empty panels, so figures name it in the title instead."""
    keep = has_value.groupby(data["dataset"], sort=False).transform("any")
    return data[keep], [d for d in pd.unique(data["dataset"]) if d not in set(data.loc[keep, "dataset"])]


def _suptitle(grid, text: str, left_out: list[str], left_out_label: str) -> None:
    """The figure's title above its panels' own titles, one more line naming the left-out datasets."""
    if left_out:
        text += f"\n{left_out_label}: {', '.join(left_out)}"
    lines = text.count("\n") + 1   # the title's height in inches, above the panels' own titles
    grid.figure.suptitle(text, y=1 + (0.15 + 0.25 * lines) / grid.figure.get_figheight())


def plot_forest(comparisons: pd.DataFrame, reference: str = "sa", *, user_level: bool = False,
                margin_pct: float | None = 5.0):
    """Forest plot: each variant's difference vs `reference` in % of the reference mean, with its 95% CI.

    Rows of panels = datasets, columns = metrics; the shaded band is the +-margin_pct equivalence
    region. Seed-level t-CIs by default, per-user bootstrap CIs with user_level=True. Returns the
    seaborn FacetGrid, or None when there is nothing to plot.
    """
    import matplotlib.pyplot as plt
    import seaborn as sns

    prefix = "user_pct" if user_level else "pct"
    data = comparisons[(comparisons["reference"] == reference)]
    if data.empty or data[prefix].notna().sum() == 0:
        return None
    data, left_out = _datasets_with(data, data[prefix].notna())
    _theme()
    data = data.assign(lo=data[prefix] - data[f"{prefix}_ci_low"], hi=data[f"{prefix}_ci_high"] - data[prefix])
    order = list(pd.unique(data["variant"]))
    grid = sns.FacetGrid(data, row="dataset", col="metric", sharex=False, height=0.35 * len(order) + 1.2,
                         aspect=1.3, margin_titles=True)

    def draw(data, color, **_):
        ax = plt.gca()
        y = np.array([order.index(v) for v in data["variant"]])
        has_ci = data["lo"].notna().to_numpy()
        ax.errorbar(data[prefix][has_ci], y[has_ci], xerr=[data["lo"][has_ci], data["hi"][has_ci]], fmt="o",
                    color=color, capsize=3)
        # a point estimate without a CI (e.g. one paired seed) is drawn hollow, so it is not over-read
        ax.plot(data[prefix][~has_ci], y[~has_ci], "o", mfc="white", color=color)
        ax.axvline(0, color="black", lw=1)
        if margin_pct:
            ax.axvspan(-margin_pct, margin_pct, color="grey", alpha=0.15, lw=0)
        ax.set_yticks(range(len(order)), order)
        ax.set_ylim(len(order) - 0.5, -0.5)

    grid.map_dataframe(draw)
    grid.set_titles(row_template="{row_name}", col_template="{col_name}")
    grid.set_axis_labels(f"% of {reference} mean", "variant")
    level = "per-user bootstrap" if user_level else "seed-level t"
    band = f"; band: ±{margin_pct:g}%" if margin_pct else ""
    _suptitle(grid, f"Difference vs {reference} with 95% {level} CI (hollow: no CI{band})", left_out,
              "not compared yet")
    return grid


def plot_pooled(pooled: pd.DataFrame, comparisons: pd.DataFrame, reference: str = "sa",
                metrics=("recall@10", "ndcg@10"), *, margin_pct: float | None = 5.0):
    """Each change vs `reference` averaged across datasets (black, with its 95% t-CI) over each
    dataset's own seed-level change (a marker per dataset), one panel per metric; the shaded band is
    the +-margin_pct equivalence region. Returns the matplotlib Figure, or None with nothing to plot."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    data = pooled[(pooled["reference"] == reference) & pooled["metric"].isin(metrics)] if not pooled.empty else pooled
    if data.empty:
        return None
    _theme()
    metrics = [m for m in metrics if m in set(data["metric"])]
    order = list(pd.unique(data["variant"]))
    datasets = list(dict.fromkeys(d for ds in data["datasets"] for d in ds.split(",")))
    colors = dict(zip(datasets, sns.color_palette(n_colors=len(datasets))))
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 0.45 * len(order) + 1.6), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        rows = data[data["metric"] == metric]
        for i, (_, r) in enumerate(rows.iterrows()):   # the first row's markers name the legend entries
            y = order.index(r["variant"])
            per = comparisons[(comparisons["reference"] == reference) & (comparisons["variant"] == r["variant"])
                              & (comparisons["metric"] == metric) & comparisons["dataset"].isin(r["datasets"].split(","))]
            for k, (_, c) in enumerate(per.iterrows()):   # each dataset a little apart, above the average
                ax.plot(c["pct"], y - 0.12 - 0.1 * k, "D", ms=4, color=colors[c["dataset"]],
                        label=c["dataset"] if i == 0 else None)
            ax.errorbar(r["pct"], y + 0.1, xerr=[[r["pct"] - r["pct_ci_low"]], [r["pct_ci_high"] - r["pct"]]],
                        fmt="o", color="black", capsize=3, label="average (95% CI)" if i == 0 else None)
        ax.axvline(0, color="black", lw=1)
        if margin_pct:
            ax.axvspan(-margin_pct, margin_pct, color="grey", alpha=0.15, lw=0)
        ax.set_yticks(range(len(order)), order)
        ax.set_ylim(len(order) - 0.5, -0.5)
        ax.set_title(_label(metric))
        ax.set_xlabel(f"% of {reference} mean")
    axes[0][0].set_ylabel("variant")
    band = f"; band: ±{margin_pct:g}%" if margin_pct else ""
    fig.suptitle(f"Difference vs {reference} averaged across datasets, each dataset's beside it{band}")
    fig.tight_layout()
    handles, labels = axes[0][0].get_legend_handles_labels()   # below the panels: never over a point
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0), ncol=len(labels), frameon=False)
    return fig


def plot_by_history_length(table: pd.DataFrame, metric: str = "recall@10"):
    """by_history_length() as a figure: each pair's difference in % of the reference's mean per bucket
    of history length, with its 95% bootstrap CI (user level), a panel per dataset. Returns the
    seaborn FacetGrid, or None with nothing to plot."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    data = table[(table["metric"] == metric) & table["pct"].notna()] if not table.empty else table
    if data.empty:
        return None
    _theme()
    data = data.assign(pair=data["variant"] + " vs " + data["reference"])
    pairs = list(pd.unique(data["pair"]))
    colors = dict(zip(pairs, sns.color_palette(n_colors=len(pairs))))
    buckets = list(pd.unique(data["history"]))
    grid = sns.FacetGrid(data, col="dataset", height=3.2, aspect=1.2, sharey=True)

    def draw(data, **_):
        ax = plt.gca()
        for k, (pair, g) in enumerate(data.groupby("pair", sort=False)):
            x = np.array([buckets.index(b) for b in g["history"]]) + 0.08 * (k - (len(pairs) - 1) / 2)
            ax.errorbar(x, g["pct"], yerr=[g["pct"] - g["pct_ci_low"], g["pct_ci_high"] - g["pct"]], fmt="o-",
                        capsize=3, color=colors[pair], label=pair)
        ax.axhline(0, color="black", lw=1)
        ax.set_xticks(range(len(buckets)), buckets)

    grid.map_dataframe(draw)
    grid.set_titles(col_template="{col_name}")
    grid.set_axis_labels("items in the test user's history", f"{_label(metric)}: % of reference mean")
    grid.add_legend(title="")
    _suptitle(grid, f"{_label(metric)} difference by history length (users' means over the paired seeds, "
                    f"95% bootstrap CI)", [], "")
    return grid


def plot_metric_bars(runs: pd.DataFrame, summary: pd.DataFrame, metrics=("recall@10", "ndcg@10"), *,
                     split: str = "test"):
    """Bars = mean over ok seeds with the 95% t-CI; dots = the individual seeds; above a bar whose
    seeds are not all there, n/N (seeds present/expected) of that dataset; a variant with none has an
    empty slot. A dataset with no finished run at all is named in the title instead of drawn as a
    row of empty panels. Returns the seaborn FacetGrid, or None when nothing has finished."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    data = summary[summary["metric"].isin(metrics)]
    if data.empty or (data["n_ok"] > 0).sum() == 0:
        return None
    data, left_out = _datasets_with(data, data["n_ok"] > 0)
    _theme()
    order = list(pd.unique(data["variant"]))
    seeds = runs[runs["status"] == "ok"].melt(id_vars=["dataset", "variant", "seed"],
                                              value_vars=[f"{split}_{m}" for m in metrics],
                                              var_name="metric", value_name="value")
    seeds["metric"] = seeds["metric"].str.removeprefix(f"{split}_")
    grid = sns.FacetGrid(data, row="dataset", col="metric", sharey=False, height=3.2,
                         aspect=max(1.2, 0.32 * len(order)), margin_titles=True)

    def draw(data, color, **_):
        ax = plt.gca()
        x = np.array([order.index(v) for v in data["variant"]])
        ax.bar(x, data["mean"].fillna(0), color=color, alpha=0.6)
        err = np.array([data["mean"] - data["ci_low"], data["ci_high"] - data["mean"]])
        ax.errorbar(x, data["mean"], yerr=np.nan_to_num(err), fmt="none", ecolor="black", capsize=3)
        pts = seeds[(seeds["dataset"] == data["dataset"].iloc[0]) & (seeds["metric"] == data["metric"].iloc[0])]
        ax.scatter([order.index(v) for v in pts["variant"]], pts["value"], s=10, color="black", zorder=3)
        # the counts belong to this panel's dataset: written on the panel, not on the shared tick labels
        top = np.nanmax(np.r_[data["ci_high"].to_numpy(float), pts["value"].to_numpy(float), 0.0])
        for r in data.itertuples():
            if r.n_ok < r.n_expected:
                above = next((y for y in (r.ci_high, r.mean) if np.isfinite(y)), 0.0)   # the bar's top
                ax.text(order.index(r.variant), above + 0.02 * top, f"{r.n_ok}/{r.n_expected}",
                        ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(order)), order, rotation=60, ha="right")

    grid.map_dataframe(draw)
    grid.set_titles(row_template="{row_name}", col_template="{col_name}")
    grid.set_axis_labels("variant", f"{split} metric value")
    for ax in grid.axes.flat:
        ax.set_ylim(bottom=0)
    _suptitle(grid, "Test metrics per variant: mean over seeds with 95% t-CI; dots: seeds; "
              "n/N above a bar: seeds finished/expected, where some are missing", left_out, "not run yet")
    return grid


def plot_learning_curves(histories: pd.DataFrame, quantities=("train_loss", "valid_recall@10")):
    """Per-epoch curves averaged over seeds (band: +-1 sd), one column per dataset."""
    import seaborn as sns

    if histories.empty:
        return None
    present = [q for q in quantities if q in histories.columns]
    if not present:
        return None
    _theme()
    long = histories.melt(id_vars=["dataset", "variant", "seed", "epoch"], value_vars=present,
                          var_name="quantity", value_name="value").dropna(subset=["value"])
    if long.empty:
        return None
    from matplotlib.ticker import MaxNLocator

    grid = sns.relplot(data=long, x="epoch", y="value", hue="variant", row="quantity", col="dataset",
                       kind="line", errorbar="sd", facet_kws={"sharey": False, "margin_titles": True},
                       height=3, aspect=1.4)
    grid.set_titles(row_template="{row_name}", col_template="{col_name}")
    for (quantity, _), ax in grid.axes_dict.items():
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel(quantity.replace("_", " "))
        if quantity.startswith(("valid_", "test_")):   # metrics start at 0; the loss keeps its range
            ax.set_ylim(bottom=0)
    grid.figure.suptitle("Learning curves (mean over seeds, band = sd)", y=1.02)
    return grid


def plot_group_curves(histories: pd.DataFrame, runs: pd.DataFrame, *, title: str = ""):
    """One variant's seeds: training loss and validation Recall@10 per epoch, one line per seed, a
    dotted line at each seed's best epoch (what a group's train notebook shows)."""
    import matplotlib.pyplot as plt
    import seaborn as sns
    from matplotlib.ticker import MaxNLocator

    _theme()
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    quantities = (("train_loss", "training loss"), ("valid_recall@10", "validation Recall@10"))
    palette = dict(zip(sorted(runs["seed"]), sns.color_palette(n_colors=len(runs))))
    for ax, (column, label) in zip(axes, quantities):
        if column in histories:
            data = histories.dropna(subset=[column])
            sns.lineplot(data=data, x="epoch", y=column, hue="seed", palette=palette, ax=ax, legend=ax is axes[1])
        if column.startswith("valid"):
            for row in runs.itertuples():
                ax.axvline(row.best_epoch, color=palette[row.seed], linestyle=":", linewidth=1)
            ax.set_ylim(bottom=0)
        ax.set(title=label, xlabel="epoch", ylabel=label)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(f"{title}: {len(runs)} seeds (dotted: each seed's best epoch)")
    fig.tight_layout()
    return fig
