"""gbla.sensitivity: a second profile's runs (one setting changed) against their twins in the main grid."""
import numpy as np
import pandas as pd
import pytest
import yaml
from scipy import stats as sps

from gbla import report, sensitivity
from gbla.datasets import expected_data_fingerprint
from gbla.params import load_grid
from gbla.runs import REPO_ROOT
from tests.test_report import fixture_ranks, write_run

PARAMS = REPO_ROOT / "params" / "ablations.yaml"
METRICS = ["recall@10", "ndcg@10"]


def test_the_shipped_patience_profile_changes_patience_only():
    changes = sensitivity.setting_changes(PARAMS, "full", "patience-20")
    assert changes == {"train.patience": (10, 20)}
    assert sensitivity.setting_label(changes) == "patience 20"


def _params(tmp_path, *, extra_profile=None):
    """The shipped params file with both runs folders under tmp_path and two seeds of two datasets."""
    data = yaml.safe_load(PARAMS.read_text())
    data["runtime"]["runs_root"] = str(tmp_path / "runs")
    data["datasets"] = ["beauty", "toys"]
    data["seeds"] = [0, 1, 2, 3]
    data["profiles"]["patience-20"]["runtime"]["runs_root"] = str(tmp_path / "runs-patience-20")
    if extra_profile:
        data["profiles"].update(extra_profile)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_a_profile_with_runs_the_main_grid_lacks_is_refused(tmp_path):
    path = _params(tmp_path, extra_profile={"more-seeds": {"seeds": [7], "variants": ["sa"],
                                                           "runtime": {"runs_root": str(tmp_path / "r7")}}})
    with pytest.raises(ValueError, match=r"'more-seeds' has beauty/sa/seed7, which profile 'full' does not"):
        sensitivity.setting_changes(path, "full", "more-seeds")


def _write_grid(path, profile, rates, rng, n_users=400):
    """Finished runs of `profile` (configs from the params file and the data this checkout would train
    on, so they count as ok): rates[(dataset, variant)] = per-seed hit rates."""
    grid = load_grid(path, profile)
    for (dataset, variant), per_seed in rates.items():
        for seed, rate in enumerate(per_seed):
            write_run(grid.runs_root, dataset, variant, seed, fixture_ranks(rng, n_users, rate),
                      config=grid.run_config(dataset, variant, seed),
                      data_fingerprint=expected_data_fingerprint(dataset, grid.processed_root) or "fixture")


def test_each_variant_is_paired_seed_by_seed_with_its_twin(tmp_path):
    path = _params(tmp_path)
    rng = np.random.default_rng(3)
    before = {("beauty", "sa"): [0.30, 0.32, 0.29, 0.31], ("beauty", "hybrid"): [0.28, 0.30, 0.27, 0.29],
              ("toys", "sa"): [0.20, 0.22, 0.21, 0.19], ("toys", "hybrid"): [0.19, 0.21, 0.18, 0.19],
              ("beauty", "all-gbla"): [0.1, 0.1, 0.1, 0.1]}
    after = {("beauty", "sa"): [0.31, 0.33, 0.31, 0.32], ("beauty", "hybrid"): [0.30, 0.31, 0.29, 0.30],
             ("toys", "sa"): [0.21, 0.22, 0.22, 0.20]}   # toys hybrid not run yet
    _write_grid(path, "full", before, rng)
    _write_grid(path, "patience-20", after, rng)
    base = report.load_runs(tmp_path / "runs", path, "full")
    s = sensitivity.setting_sensitivity(base, path, "full", "patience-20", METRICS, n_bootstrap=500)
    assert s.label == "patience 20" and s.n_done == 12 and len(s.runs) == 16

    # one row per dataset x variant that ran under both settings, against that variant only
    comp = s.comparisons[s.comparisons["metric"] == "recall@10"]
    assert sorted(zip(comp["dataset"], comp["reference"], comp["variant"])) == [
        ("beauty", "hybrid", "hybrid (patience 20)"), ("beauty", "sa", "sa (patience 20)"),
        ("toys", "hybrid", "hybrid (patience 20)"), ("toys", "sa", "sa (patience 20)")]
    # the seed-level test is the paired t-test of the same seeds' test metrics
    changed = report.load_runs(tmp_path / "runs-patience-20", path, "patience-20")
    mine = lambda runs, d, v: runs[(runs.dataset == d) & (runs.variant == v)].sort_values("seed")[
        "test_recall@10"].to_numpy()
    x, y = mine(changed, "beauty", "sa"), mine(base, "beauty", "sa")
    row = comp[(comp.dataset == "beauty") & (comp.reference == "sa")].iloc[0]
    assert row["n_paired_seeds"] == 4
    assert row["pct"] == pytest.approx(100 * (x - y).mean() / y.mean())
    assert row["p_ttest"] == pytest.approx(sps.ttest_rel(x, y).pvalue)
    assert row["n_users"] == 400 and np.isfinite(row["p_perm"])   # per-user pairing across the two folders
    untested = comp[(comp.dataset == "toys") & (comp.reference == "hybrid")].iloc[0]
    assert untested["n_paired_seeds"] == 0 and "no paired seeds" in untested["reason"]

    # averaged over datasets only where two have paired seeds: sa (beauty, toys), not hybrid (beauty)
    pooled = s.pooled[s.pooled["metric"] == "recall@10"]
    assert list(pooled["reference"]) == ["sa"] and int(pooled["n_datasets"].iloc[0]) == 2

    # the hybrid-vs-sa gap under each setting, each from its own setting's runs
    gaps = s.gaps[(s.gaps["metric"] == "recall@10") & (s.gaps["dataset"] == "beauty")].set_index("setting")
    h, a = mine(changed, "beauty", "hybrid"), mine(changed, "beauty", "sa")
    assert gaps.loc["patience 20", "pct"] == pytest.approx(100 * (h - a).mean() / a.mean())
    h0, a0 = mine(base, "beauty", "hybrid"), mine(base, "beauty", "sa")
    assert gaps.loc["base", "pct"] == pytest.approx(100 * (h0 - a0).mean() / a0.mean())

    table = sensitivity.sensitivity_table(s, METRICS)
    assert list(table["dataset"]) == ["beauty", "beauty", "toys", "toys", "average of 2"]
    assert table.iloc[0]["Recall@10 Δ% [95% CI]"].startswith(report._pct(comp.iloc[0]["pct"]))
    gap = sensitivity.gap_table(s)
    assert set(gap.columns) >= {"Recall@10 Δ% before", "Recall@10 Δ% patience 20"}
    finding = sensitivity.sensitivity_finding(s)
    assert finding.startswith("patience 20 (12 of 16 runs)")
    assert "`sa` " + report._pct_ci(pooled.iloc[0]) + " averaged over 2 datasets" in finding
    assert "`hybrid` on beauty" in finding


def test_nothing_run_yet_says_so(tmp_path):
    path = _params(tmp_path)
    _write_grid(path, "full", {("beauty", "sa"): [0.3, 0.3]}, np.random.default_rng(0))
    base = report.load_runs(tmp_path / "runs", path, "full")
    s = sensitivity.setting_sensitivity(base, path, "full", "patience-20", METRICS)
    assert s.n_done == 0 and s.comparisons.empty and s.gaps.empty
    assert sensitivity.sensitivity_finding(s) == "patience 20: not run yet (16 runs expected)."
    assert sensitivity.sensitivity_table(s).empty


def test_compares_with_is_checked_when_the_params_file_loads(tmp_path):
    assert sensitivity.profiles_comparing_with(PARAMS, "full") == ["patience-20"]
    assert sensitivity.profiles_comparing_with(PARAMS, "smoke") == []
    assert load_grid(PARAMS, "patience-20").compares_with == "full"
    # a profile that names no profile, or one whose runs have no twins, is refused at file:line
    text = PARAMS.read_text()
    line = next(n for n, t in enumerate(text.splitlines(), 1) if "compares_with: full" in t)
    for target, message in (("fulll", "no other profile 'fulll'"),
                            ("smoke", "profile 'patience-20' has beauty/sa/seed0, which profile 'smoke' does not")):
        path = tmp_path / f"{target}.yaml"
        path.write_text(text.replace("compares_with: full", f"compares_with: {target}"))
        with pytest.raises(ValueError, match=rf"{path}:{line}: profiles\.patience-20\.compares_with: {message}"):
            load_grid(path, "full")
    # nothing changed: nothing to compare
    path = tmp_path / "same.yaml"
    path.write_text(text.replace("      patience: 20\n", "      patience: 10\n"))
    with pytest.raises(ValueError, match="same configs as profile 'full'"):
        load_grid(path, "full")


def _history(epochs, *, seed, diverge_at=None, offset=0.0):
    """A training history whose values depend on the seed; from epoch diverge_at on, the training loss
    differs in its last bits (another device's rounding)."""
    return [{"epoch": e, "train_loss": 3.0 / e + seed / 100 + (1e-12 if diverge_at and e >= diverge_at else 0.0),
             "epoch_time_s": 1.0 + offset, "valid_recall@5": 0.01 * e + seed / 1000,
             "valid_recall@10": 0.02 * e + seed / 1000} for e in range(1, epochs + 1)]


def test_epochs_retraced_counts_the_exactly_equal_leading_epochs():
    h = _history(5, seed=1)
    assert sensitivity.epochs_retraced(h, _history(8, seed=1, offset=0.5)) == 5   # seconds are not compared
    assert sensitivity.epochs_retraced(h, _history(8, seed=1, diverge_at=3)) == 2
    assert sensitivity.epochs_retraced(h, _history(5, seed=2)) == 0
    assert sensitivity.epochs_retraced(h, [{k: v for k, v in e.items() if k != "valid_recall@5"} for e in h]) == 0
    assert sensitivity.epochs_retraced([], h) == 0


def test_retrace_says_which_reruns_repeat_their_twin(tmp_path):
    """The main grid's seeds stopped after 4, 5 and 6 epochs. A rerun that repeats its twin to the twin's
    last epoch and keeps its best epoch has its test metrics; one that repeats it only up to the group's
    first stop (epoch 4: the shared dropout stream changes there) and then found a later best epoch has
    others; one that diverged before the first stop is told apart."""
    path = _params(tmp_path)
    rng = np.random.default_rng(5)
    full, longer = load_grid(path, "full"), load_grid(path, "patience-20")
    fp = lambda grid: expected_data_fingerprint("beauty", grid.processed_root) or "fixture"
    ranks = [fixture_ranks(rng, 200, 0.3) for _ in range(3)]
    for seed in range(3):
        write_run(full.runs_root, "beauty", "sa", seed, ranks[seed], epochs=4 + seed, best_epoch=3,
                  history=_history(4 + seed, seed=seed), config=full.run_config("beauty", "sa", seed),
                  data_fingerprint=fp(full))
    plan = {0: (7, 3, None, ranks[0]),                          # repeats all 4, then nothing better: same test
            1: (9, 6, 5, fixture_ranks(rng, 200, 0.35)),        # repeats 4 of 5, then a later best epoch
            2: (6, 3, 3, fixture_ranks(rng, 200, 0.3))}         # diverges at epoch 3, before the first stop
    for seed, (epochs, best, diverge_at, rank) in plan.items():
        write_run(longer.runs_root, "beauty", "sa", seed, rank, epochs=epochs, best_epoch=best,
                  history=_history(epochs, seed=seed, diverge_at=diverge_at, offset=0.2),
                  config=longer.run_config("beauty", "sa", seed), data_fingerprint=fp(longer))
    base = report.load_runs(tmp_path / "runs", path, "full")
    s = sensitivity.setting_sensitivity(base, path, "full", "patience-20", METRICS, n_bootstrap=200)
    t = s.retrace.set_index("seed")
    assert list(t["epochs_retraced"]) == [4, 4, 2] and set(t["first_stop_before"]) == {4}
    assert list(t["retraced_to_first_stop"]) == [True, True, False]
    assert list(t["retraced_to_end"]) == [True, False, False]
    assert list(t["same_test"]) == [True, False, False]
    assert list(t["epochs"] - t["epochs_before"]) == [3, 4, 0]
    summary = sensitivity.retrace_summary(s).iloc[0]
    assert (summary["paired runs"], summary["repeat the twin to the first stop"],
            summary["repeat the twin to its last epoch"], summary["same test metrics"],
            summary["best epoch later"], summary["epochs more (median)"]) == (3, 2, 1, 1, 1, 3.0)
    assert sensitivity.sensitivity_finding(s).endswith(
        "Of 3 paired runs, 2 repeat their twin exactly up to the first stop of a seed in its group (1 up to "
        "the twin's own last epoch), 1 end with its test metrics unchanged and 1 with a later best epoch.")
    paths = sensitivity.write_sensitivity(s, tmp_path / "out", "patience-20")
    assert pd.read_csv(paths["sensitivity_patience-20_retrace"])["epochs_retraced"].tolist() == [4, 4, 2]
