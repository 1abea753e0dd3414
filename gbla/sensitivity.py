"""One setting changed: a second profile's runs against the main profile's, seed by seed.

A profile such as `patience-20` reruns some variants of the full grid with one training setting
changed, into a runs folder of its own (gbla.params refuses two profiles that would share one). Each
of its runs has a twin in the main profile: the same dataset, variant, seed, data and everything else.
This module pairs them:

    changed = setting_sensitivity(runs, "params/ablations.yaml", "full", "patience-20", metrics=...)
    changed.comparisons   # "sa (patience 20)" against "sa", ... per dataset (gbla.report.compare's columns)
    changed.pooled        # the same, averaged over the datasets (gbla.report.pooled)
    changed.gaps          # hybrid against sa under each setting: does the change move the gap?
    changed.retrace       # per pair: how many epochs the rerun repeats its twin's training exactly

The variants of the second profile are relabelled "<variant> (<label>)", where the label names the
setting and its value in that profile ("patience 20", read from the configs), and stacked onto the
main runs table, so the pairing, tests and tables are the report's own (gbla.report): a seed pairs
with the same seed, a user with the same user.

Where training is deterministic (same device, software and kernels), a rerun that only trains longer
repeats its twin epoch for epoch until the first seed of the twin's group stopped: the seeds of a group
share one dropout stream (gbla.train), so once a seed leaves the group the others' masks can differ from
those of a group where it trains on. A seed that was the first of its group to stop is repeated to its last
epoch and keeps its test result unless a later epoch validates better. `retrace` says, per pair, how
far that held; beyond it the pair also differs by the noise of a second training, and the change is
measured over that noise (as every comparison of variants is).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from gbla import params, report
from gbla.runs import load_run_metrics

RETRACE_COLUMNS = ["dataset", "variant", "seed", "epochs_before", "best_epoch_before", "epochs", "best_epoch",
                   "epochs_retraced", "first_stop_before", "retraced_to_first_stop", "retraced_to_end", "same_test",
                   "device_before", "device", "commit_before", "commit"]
GAP_COLUMNS = ["dataset", "metric", "variant", "reference", "setting", "n_paired_seeds", "pct", "pct_ci_low",
               "pct_ci_high", "p_ttest", "reason"]


def setting_changes(params_file, base_profile: str, other_profile: str) -> dict[str, tuple]:
    """{"train.patience": (10, 20)}: what the other profile changes in its runs' twins of the base
    profile (gbla.params.setting_changes; ValueError where it is not one change of twins)."""
    return params.setting_changes(params.load_grid(params_file, base_profile),
                                  params.load_grid(params_file, other_profile))


def profiles_comparing_with(params_file, profile: str) -> list[str]:
    """The profiles of the params file whose compares_with names `profile`, in file order."""
    return [name for name, grid in params.load_profiles(params_file).items() if grid.compares_with == profile]


def setting_label(changes: dict[str, tuple]) -> str:
    """'patience 20' for {"train.patience": (10, 20)}; several settings joined by ', '."""
    return ", ".join(f"{key.rsplit('.', 1)[-1].replace('_', ' ')} {new}" for key, (_, new) in changes.items())


@dataclass
class Sensitivity:
    label: str                      # "patience 20"
    changes: dict                   # {"train.patience": (10, 20)}
    runs: pd.DataFrame              # the second profile's runs (status rows as gbla.report.load_runs)
    comparisons: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=report.COMPARISON_COLUMNS))
    pooled: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=report.POOLED_COLUMNS))
    gaps: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=GAP_COLUMNS))
    retrace: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=RETRACE_COLUMNS))

    @property
    def n_done(self) -> int:
        return int((self.runs["status"] == "ok").sum()) if not self.runs.empty else 0


def _history(run_dir) -> list[dict]:
    return (load_run_metrics(run_dir) or {}).get("history", [])


def epochs_retraced(before: list[dict], after: list[dict]) -> int:
    """How many leading epochs of two training histories agree exactly: the same training loss and
    validation metrics (every recorded key but the epoch's seconds), to the last bit."""
    n = 0
    for a, b in zip(before, after):
        keys = {k for k in a.keys() | b.keys() if k == "train_loss" or k.startswith("valid_")}
        if not keys or any(a.get(k) != b.get(k) for k in keys):
            break
        n += 1
    return n


def retrace_table(base: pd.DataFrame, changed: pd.DataFrame) -> pd.DataFrame:
    """One row per finished run of `changed` with a finished twin in `base` (same dataset, variant,
    seed): both runs' epochs and best epochs, how many leading epochs the rerun repeats exactly
    (epochs_retraced); first_stop_before, the earliest epoch at which a seed of that variant stopped in
    `base` (the first stop in the twin's group where the variant's seeds trained as one group; earlier
    otherwise), and whether the rerun repeats its twin up to it (retraced_to_first_stop) and up to the
    twin's last epoch (retraced_to_end); whether the test metrics are the same; both runs' device and
    commit (where they differ, exact repetition is not expected)."""
    ok_base = base[base["status"] == "ok"]
    first_stop = ok_base.groupby(["dataset", "variant"])["epochs_trained"].min()
    ok_base = ok_base.set_index(["dataset", "variant", "seed"])
    tests = [c for c in changed.columns if c.startswith("test_")]
    rows = []
    for _, r in changed[changed["status"] == "ok"].iterrows():
        key = (r["dataset"], r["variant"], r["seed"])
        if key not in ok_base.index:
            continue
        b = ok_base.loc[key]
        n = epochs_retraced(_history(b["run_dir"]), _history(r["run_dir"]))
        first = int(first_stop[key[:2]])
        rows.append({"dataset": key[0], "variant": key[1], "seed": int(key[2]),
                     "epochs_before": int(b["epochs_trained"]), "best_epoch_before": int(b["best_epoch"]),
                     "epochs": int(r["epochs_trained"]), "best_epoch": int(r["best_epoch"]),
                     "epochs_retraced": n, "first_stop_before": first, "retraced_to_first_stop": n >= first,
                     "retraced_to_end": n >= int(b["epochs_trained"]),
                     "same_test": bool(tests) and all(r[c] == b[c] for c in tests),
                     "device_before": b["device"], "device": r["device"],
                     "commit_before": b["commit"], "commit": r["commit"]})
    return pd.DataFrame(rows, columns=RETRACE_COLUMNS)


def retrace_summary(s: Sensitivity) -> pd.DataFrame:
    """Per dataset and variant: paired runs, how many repeat their twin up to the first stop in the main
    grid and up to the twin's own last epoch, how many keep its test result, how many found a later
    best epoch, and the median number of epochs trained more."""
    t = s.retrace
    if t.empty:
        return pd.DataFrame()
    rows = []
    for (dataset, variant), g in t.groupby(["dataset", "variant"], sort=False):
        rows.append({"dataset": dataset, "variant": variant, "paired runs": len(g),
                     "repeat the twin to the first stop": int(g["retraced_to_first_stop"].sum()),
                     "repeat the twin to its last epoch": int(g["retraced_to_end"].sum()),
                     "same test metrics": int(g["same_test"].sum()),
                     "best epoch later": int((g["best_epoch"] > g["best_epoch_before"]).sum()),
                     "epochs more (median)": float((g["epochs"] - g["epochs_before"]).median())})
    return pd.DataFrame(rows)


def compare_changed(base: pd.DataFrame, changed: pd.DataFrame, label: str, metrics=report.METRIC_NAMES, *,
                    gap_pairs=(("hybrid", "sa"),), confidence: float = 0.95, margin: float = 0.05,
                    n_bootstrap: int = 10_000, seed: int = 0) -> Sensitivity:
    """Each variant of `changed` (runs table of the second profile) against the same variant of `base`,
    per dataset (seed-paired t-test, per-user bootstrap and sign-flip test as gbla.report.compare; each
    variant its own Holm family of one) and averaged over the datasets; and each (variant, reference)
    of `gap_pairs` under both settings, from the seeds both settings finished for both variants."""
    result = Sensitivity(label, {}, changed)
    if changed.empty or not (changed["status"] == "ok").any():
        return result
    suffix = f" ({label})"
    stacked = pd.concat([base, changed.assign(variant=changed["variant"] + suffix)], ignore_index=True)
    variants = list(pd.unique(changed["variant"]))
    pairs = [(v + suffix, v) for v in variants]
    ranks = report.PerUserRanks()
    kw = dict(confidence=confidence, n_bootstrap=n_bootstrap, seed=seed, ranks=ranks)
    tables = [report.compare(stacked[stacked["variant"].isin(p)], (p[1],), metrics, **kw) for p in pairs]
    tables = [t for t in tables if not t.empty]
    if tables:
        result.comparisons = pd.concat(tables, ignore_index=True)
    result.pooled = report.pooled(stacked, (), metrics, pairs=pairs, confidence=confidence, margin=margin)
    gaps = []
    for variant, reference in gap_pairs:
        if not {variant, reference} <= set(variants):
            continue
        for setting, names in (("base", (variant, reference)), (label, (variant + suffix, reference + suffix))):
            t = report.compare(stacked[stacked["variant"].isin(names)], (names[1],), metrics, **kw)
            if t.empty:
                continue
            t = t.assign(variant=variant, reference=reference, setting=setting)
            gaps.append(t[GAP_COLUMNS])
    if gaps:
        result.gaps = pd.concat(gaps, ignore_index=True)
    result.retrace = retrace_table(base, changed)
    return result


def setting_sensitivity(base: pd.DataFrame, params_file, base_profile: str, other_profile: str,
                        metrics=report.METRIC_NAMES, **kw) -> Sensitivity:
    """compare_changed with the second profile's runs loaded from its own runs folder (its params say
    where) and its label read from the settings it changes (gbla.params.setting_changes)."""
    profiles = params.load_profiles(params_file)
    for name in (base_profile, other_profile):
        if name not in profiles:
            raise params.ParamsError(f"{params_file}: no profile {name!r}; defined: {', '.join(profiles)}")
    changes = params.setting_changes(profiles[base_profile], profiles[other_profile])
    changed = report.load_runs(profiles[other_profile].runs_root, params_file, other_profile)
    result = compare_changed(base, changed, setting_label(changes), metrics, **kw)
    result.changes = changes
    return result


def sensitivity_table(s: Sensitivity, metrics=("recall@10", "ndcg@10")) -> pd.DataFrame:
    """One row per dataset and variant: each metric's change (in % of the base setting's mean, 95% CI)
    and its seed-level p; then the average over the datasets."""
    rows = []
    comp = s.comparisons[s.comparisons["metric"].isin(metrics)].sort_values("dataset", kind="stable")
    for (dataset, variant), g in comp.groupby(["dataset", "reference"], sort=False):
        row = {"dataset": dataset, "variant": variant, "seeds": int(g["n_paired_seeds"].max())}
        for _, r in g.iterrows():
            name = report._label(r["metric"])
            row[f"{name} before"] = report._num(r["reference_mean"])
            row[f"{name} {s.label}"] = report._num(r["variant_mean"])
            row[f"{name} Δ% [95% CI]"] = report._pct_ci(r)
            row[f"{name} p"] = report._p(r["p_ttest"])
        rows.append(row)
    pooled = s.pooled[s.pooled["metric"].isin(metrics)]
    for variant, g in pooled.groupby("reference", sort=False):
        row = {"dataset": f"average of {int(g['n_datasets'].max())}", "variant": variant,
               "seeds": int(g["n_pairs"].max())}
        for _, r in g.iterrows():
            name = report._label(r["metric"])
            row[f"{name} Δ% [95% CI]"] = report._pct_ci(r)
            row[f"{name} p"] = report._p(r["p"])
        rows.append(row)
    table = pd.DataFrame(rows)
    return table.fillna("") if not table.empty else table


def gap_table(s: Sensitivity, metric: str = "recall@10") -> pd.DataFrame:
    """Per dataset and gap pair: the variant's change against its reference in % under the base setting
    and under the changed one, side by side."""
    g = s.gaps[s.gaps["metric"] == metric]
    rows = []
    for (dataset, variant, reference), part in g.groupby(["dataset", "variant", "reference"], sort=False):
        row = {"dataset": dataset, "comparison": f"{variant} vs {reference}"}
        for _, r in part.iterrows():
            name = "before" if r["setting"] == "base" else s.label
            row[f"{report._label(metric)} Δ% {name}"] = report._pct_ci(r)
            row[f"seeds {name}"] = int(r["n_paired_seeds"])
        rows.append(row)
    return pd.DataFrame(rows)


def write_sensitivity(s: Sensitivity, folder, profile: str) -> dict[str, Path]:
    """sensitivity-<profile>.csv (the comparisons, with the averages over datasets as rows of dataset
    "average"), sensitivity-<profile>-gaps.csv and sensitivity-<profile>-retrace.csv in `folder`;
    {name: path}."""
    folder = Path(folder)
    pooled = s.pooled.rename(columns={"n_pairs": "n_paired_seeds", "p": "p_ttest", "p_holm": "p_ttest_holm"})
    pooled = pooled.assign(dataset="average", setting=s.label)
    comparisons = pd.concat([s.comparisons.assign(setting=s.label), pooled], ignore_index=True)
    paths = {f"sensitivity_{profile}": folder / f"sensitivity-{profile}.csv",
             f"sensitivity_{profile}_gaps": folder / f"sensitivity-{profile}-gaps.csv",
             f"sensitivity_{profile}_retrace": folder / f"sensitivity-{profile}-retrace.csv"}
    report._atomic_csv(comparisons, paths[f"sensitivity_{profile}"])
    report._atomic_csv(s.gaps, paths[f"sensitivity_{profile}_gaps"])
    report._atomic_csv(s.retrace, paths[f"sensitivity_{profile}_retrace"])
    return paths


def sensitivity_finding(s: Sensitivity, metric: str = "recall@10", *, alpha: float = 0.05) -> str:
    """One sentence per variant averaged over the datasets (or per dataset where only one has paired
    seeds); a line saying what is not run yet where nothing has finished."""
    name = report._label(metric)
    if s.n_done == 0:
        return (f"{s.label}: not run yet ({len(s.runs)} runs expected).")
    parts = []
    pooled = s.pooled[s.pooled["metric"] == metric]
    comp = s.comparisons[s.comparisons["metric"] == metric]
    for variant in pd.unique(s.runs.loc[s.runs["status"] == "ok", "variant"]):
        p = pooled[pooled["reference"] == variant]
        if not p.empty:
            r = p.iloc[0]
            parts.append(f"`{variant}` {report._pct_ci(r)} averaged over {int(r['n_datasets'])} datasets "
                         f"(p {report._p(r['p'])}{', significant' if r['p'] <= alpha else ''})")
            continue
        for _, r in comp[comp["reference"] == variant].iterrows():
            parts.append(f"`{variant}` on {r['dataset']} {report._pct_ci(r)} ({int(r['n_paired_seeds'])} seeds, "
                         f"p {report._p(r['p_ttest'])})")
    done = f"{s.n_done} of {len(s.runs)} runs"
    if not parts:
        return f"{s.label}: {done} finished, none paired with a finished run of the main grid yet."
    t = s.retrace
    retraced = (f" Of {len(t)} paired runs, {int(t['retraced_to_first_stop'].sum())} repeat their twin exactly up to "
                f"the first stop of a seed in its group ({int(t['retraced_to_end'].sum())} up to the twin's own last "
                f"epoch), {int(t['same_test'].sum())} end with its test metrics unchanged and "
                f"{int((t['best_epoch'] > t['best_epoch_before']).sum())} with a later best epoch." if not t.empty else "")
    return f"{s.label} ({done}), {name} against the same seeds before: " + "; ".join(parts) + "." + retraced


__all__ = ["Sensitivity", "setting_changes", "profiles_comparing_with", "setting_label", "compare_changed",
           "setting_sensitivity", "sensitivity_table", "gap_table", "write_sensitivity", "sensitivity_finding",
           "epochs_retraced", "retrace_table", "retrace_summary"]
