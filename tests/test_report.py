"""gbla.report on run folders written in the run-directory contract (gbla/runs.py's docstring)."""
import json
import math

import matplotlib
import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

matplotlib.use("Agg")

from gbla import datasets, report, stats  # noqa: E402
from gbla import runs as runs_io  # noqa: E402
from gbla.common import METRIC_NAMES, REPO_ROOT  # noqa: E402
from gbla.config import RunConfig  # noqa: E402

METRICS = METRIC_NAMES


# --------------------------------------------------------------------------- fixture writer

def write_run(root, dataset, variant, seed, rank, *, targets=None, epochs=3, config=None,
              data_fingerprint="fixture", history=None, best_epoch=None):
    """A finished run exactly as the contract lays it out; test metrics are the per-user means."""
    run_dir = root / dataset / variant / f"seed{seed}"
    run_dir.mkdir(parents=True, exist_ok=True)
    n = len(rank)
    users = np.arange(n, dtype=np.int64)
    targets = np.arange(100, 100 + n, dtype=np.int64) if targets is None else targets
    pd.DataFrame({"user": users, "target": targets, "rank": np.asarray(rank, dtype=np.int8)}).to_parquet(
        run_dir / "per_user_test.parquet", index=False)
    test = {m: float(stats.per_user_metric(rank, m).mean()) for m in METRICS}
    config = config or RunConfig(dataset, variant, seed)
    history = [{"epoch": e, "train_loss": 3.0 / e, "epoch_time_s": 1.0,
                "valid_recall@5": 0.05 * e, "valid_recall@10": 0.08 * e, "valid_ndcg@5": 0.03 * e,
                "valid_ndcg@10": 0.04 * e} for e in range(1, epochs + 1)] if history is None else history
    (run_dir / "metrics.json").write_text(json.dumps({
        "status": "ok", "dataset": dataset, "variant": variant, "seed": seed, "config": config.to_dict(),
        "config_hash": config.config_hash(), "data_fingerprint": data_fingerprint, "commit": "fixture",
        "device": "cpu", "created_at": "2025-01-01T00:00:00+00:00", "wall_time_s": 1.0,
        "epochs_trained": epochs, "best_epoch": epochs if best_epoch is None else best_epoch,
        "valid": {m: v * 0.9 for m, v in test.items()}, "test": test, "timings": {}, "history": history}))
    return run_dir


def write_failed(root, dataset, variant, seed, *, config=None):
    run_dir = root / dataset / variant / f"seed{seed}"
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "error.json").write_text(json.dumps({
        "status": "failed", "config_hash": (config or RunConfig(dataset, variant, seed)).config_hash(),
        "error": "RuntimeError: CUDA out of memory", "traceback": "..."}))


def fixture_ranks(rng, n_users, hit_rate):
    hit = rng.random(n_users) < hit_rate
    return np.where(hit, rng.integers(1, 11, n_users), 0)


def write_fixture_grid(root, n_users=300, seed=0):
    """beauty: sa 0,1,2 ok | hybrid 0,2 ok, 1 failed | all-gbla 0,1 ok, 2 missing | ratio-1to1 0 ok only."""
    rng = np.random.default_rng(seed)
    plan = {"sa": ([0, 1, 2], 0.30), "hybrid": ([0, 2], 0.31), "all-gbla": ([0, 1], 0.12),
            "ratio-1to1": ([0], 0.28)}
    for variant, (seeds, rate) in plan.items():
        for s in seeds:
            write_run(root, "beauty", variant, s, fixture_ranks(rng, n_users, rate))
    write_failed(root, "beauty", "hybrid", 1)
    return root


@pytest.fixture
def grid(tmp_path):
    root = write_fixture_grid(tmp_path / "runs")
    return root, report.load_runs(root)


def metric_of(runs, variant, seed, metric="recall@10"):
    row = runs[(runs["variant"] == variant) & (runs["seed"] == seed)]
    return float(row[f"test_{metric}"].iloc[0])


# --------------------------------------------------------------------------- runs table

def test_load_runs_shows_failed_and_missing_runs(grid):
    _, runs = grid
    assert len(runs) == 4 * 3  # every variant x every seed found, nothing dropped
    status = {(r.variant, r.seed): r.status for r in runs.itertuples()}
    assert status[("hybrid", 1)] == "failed"
    assert status[("all-gbla", 2)] == "missing"
    assert status[("ratio-1to1", 1)] == status[("ratio-1to1", 2)] == "missing"
    assert sum(s == "ok" for s in status.values()) == 8
    table = report.status_table(runs).set_index("variant")
    assert table.loc["hybrid", ["ok", "failed", "missing"]].tolist() == [2, 1, 0]
    assert table.loc["all-gbla", "seeds_not_ok"] == "2 (missing)"
    problems = report.problem_runs(runs)
    assert len(problems) == 4
    assert "out of memory" in problems.loc[problems["variant"] == "hybrid", "error"].iloc[0]


def test_problem_runs_name_run_folders_from_the_repository_root(grid):
    root, runs = grid
    inside = runs.assign(run_dir=[str(runs_io.REPO_ROOT / "outputs" / "runs" / f"d/v/seed{i}") for i in range(len(runs))])
    problems = report.problem_runs(inside)
    assert len(problems) == 4 and all(d.startswith("outputs/runs/d/v/seed") for d in problems["run_dir"])
    outside = report.problem_runs(runs)   # a runs folder elsewhere keeps its absolute path
    assert all(d.startswith(str(root.resolve())) for d in outside["run_dir"])


def test_runs_trained_on_other_data_are_named_in_the_report_notes(grid):
    """Finished runs whose data is not the processed data there is now drop out of every statistic as
    stale; the report says so per dataset, with both fingerprints, instead of leaving a bare count."""
    root, _ = grid
    expected = [RunConfig("beauty", v, s) for v in ("sa", "hybrid") for s in (0, 1, 2)]
    same = report.load_runs(root, expected=expected)
    assert report.stale_data_notes(same) == []
    runs = runs_io.collect_runs(root, expected, data_fingerprints={"beauty": "rebuilt-elsewhere"})
    stale = runs[runs["status"] == "stale"]
    assert len(stale) == 5   # every finished run (hybrid seed 1 failed: it stays failed)
    [note] = report.stale_data_notes(runs)
    assert note.startswith("beauty: 5 finished runs were trained on data fixture,")
    assert "(rebuilt-elsewhere)" in note and "--semantic-ids" in note
    problems = report.problem_runs(runs)
    assert set(problems.loc[problems["status"] == "stale", "stale_expected_data_fingerprint"]) == {"rebuilt-elsewhere"}
    rep = report.build_report(runs, references=("sa",), metrics=("recall@10",), n_bootstrap=50, progress=False)
    assert note in rep.notes


def test_load_runs_with_an_expected_grid_lists_variants_that_never_ran(grid):
    root, _ = grid
    expected = [RunConfig("beauty", v, s) for v in ("sa", "hybrid", "hybrid-no-gate") for s in (0, 1, 2)]
    runs = report.load_runs(root, expected=expected)
    never = runs[runs["variant"] == "hybrid-no-gate"]
    assert len(never) == 3 and (never["status"] == "missing").all()
    summary = report.summarize(runs)
    row = summary[(summary["variant"] == "hybrid-no-gate") & (summary["metric"] == "recall@10")].iloc[0]
    assert row["n_ok"] == 0 and row["n_expected"] == 3 and math.isnan(row["mean"])
    assert "missing (0/3)" in report.summary_wide(summary).loc[("beauty", "hybrid-no-gate"), "recall@10"]


def test_load_runs_names_a_missing_params_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        report.load_runs(tmp_path, params_file=tmp_path / "nope.yaml")


# --------------------------------------------------------------------------- summary

def test_summary_mean_and_ci_over_the_seeds_present(grid):
    _, runs = grid
    summary = report.summarize(runs).set_index(["variant", "metric"])
    row = summary.loc[("all-gbla", "ndcg@10")]
    values = [metric_of(runs, "all-gbla", s, "ndcg@10") for s in (0, 1)]
    assert (row["n_ok"], row["n_expected"]) == (2, 3)
    assert row["mean"] == pytest.approx(np.mean(values))
    expected_ci = stats.mean_ci(values)
    assert row["ci_low"] == pytest.approx(expected_ci["ci_low"])
    assert row["seeds_not_ok"] == "2 (missing)"
    one = summary.loc[("ratio-1to1", "recall@10")]
    assert one["n_ok"] == 1 and math.isnan(one["ci_low"])
    wide = report.summary_wide(report.summarize(runs))
    assert wide.loc[("beauty", "all-gbla"), "recall@10"].endswith("(2/3)")


# --------------------------------------------------------------------------- comparisons

def test_compare_seed_level_user_level_and_holm(grid):
    root, runs = grid
    table = report.compare(runs, references=("sa",), n_bootstrap=2000)
    row = table[(table["variant"] == "hybrid") & (table["metric"] == "recall@10")].iloc[0]
    assert row["paired_seeds"] == "0,2" and row["n_paired_seeds"] == 2
    hy = [metric_of(runs, "hybrid", s) for s in (0, 2)]
    sa = [metric_of(runs, "sa", s) for s in (0, 2)]
    assert row["p_ttest"] == pytest.approx(sps.ttest_rel(hy, sa).pvalue)
    assert row["diff"] == pytest.approx(np.mean(hy) - np.mean(sa))
    assert row["pct"] == pytest.approx(100 * row["diff"] / np.mean(sa))
    assert math.isnan(row["mde"]) and math.isnan(row["mde_pct"])  # 2 seeds: no spread to plan with
    # per-user: every user is in every seed, so the pooled user mean equals the seed mean
    assert row["n_users"] == 300
    assert row["user_diff"] == pytest.approx(row["diff"])
    assert row["user_ci_low"] < row["user_diff"] < row["user_ci_high"]
    # the per-user differences, rebuilt by hand from the parquet files
    per_seed = []
    for s in (0, 2):
        rv = pd.read_parquet(root / "beauty" / "hybrid" / f"seed{s}" / "per_user_test.parquet")["rank"].to_numpy()
        rr = pd.read_parquet(root / "beauty" / "sa" / f"seed{s}" / "per_user_test.parquet")["rank"].to_numpy()
        per_seed.append(stats.per_user_metric(rv, "recall@10") - stats.per_user_metric(rr, "recall@10"))
    d_user = np.mean(per_seed, axis=0)
    assert row["p_perm"] == pytest.approx(stats.sign_flip_test(d_user, n_resamples=2000, seed=0)["p"])
    # all-gbla hits much less often: the user-level test sees it
    worse = table[(table["variant"] == "all-gbla") & (table["metric"] == "recall@10")].iloc[0]
    assert worse["user_diff"] < 0 and worse["p_perm"] < 0.01 and worse["user_pct_ci_high"] < 0
    # Holm within each (dataset, metric, reference) family
    for _, family in table.groupby(["dataset", "metric", "reference"]):
        np.testing.assert_allclose(family["p_perm_holm"], stats.holm(family["p_perm"].to_numpy(float)))
        np.testing.assert_allclose(family["p_ttest_holm"], stats.holm(family["p_ttest"].to_numpy(float)))


def test_compare_reports_too_few_seeds_with_a_reason(grid):
    _, runs = grid
    table = report.compare(runs, references=("sa", "hybrid"), n_bootstrap=200)
    one = table[(table["variant"] == "ratio-1to1") & (table["reference"] == "sa")].iloc[0]
    assert one["n_paired_seeds"] == 1 and math.isnan(one["p_ttest"]) and "at least 2" in one["reason"]
    assert not math.isnan(one["p_perm"])  # one seed still pairs 300 users
    vs_hybrid = table[(table["variant"] == "ratio-1to1") & (table["reference"] == "hybrid")].iloc[0]
    assert vs_hybrid["n_paired_seeds"] == 1  # ratio-1to1 has seed 0, hybrid has 0 and 2
    gbla_vs_hybrid = table[(table["variant"] == "all-gbla") & (table["reference"] == "hybrid")].iloc[0]
    assert gbla_vs_hybrid["paired_seeds"] == "0"


def test_compare_without_paired_seeds_is_nan_not_dropped(tmp_path):
    root = tmp_path / "runs"
    rng = np.random.default_rng(0)
    write_run(root, "beauty", "sa", 0, fixture_ranks(rng, 50, 0.3))
    write_run(root, "beauty", "hybrid", 1, fixture_ranks(rng, 50, 0.3))
    runs = report.load_runs(root)
    table = report.compare(runs, references=("sa",), n_bootstrap=100)
    assert len(table) == len(METRICS)
    assert table["n_paired_seeds"].eq(0).all() and table["p_ttest"].isna().all() and table["p_perm"].isna().all()
    assert table["reason"].str.contains("no paired seeds").all()


def test_compare_refuses_runs_with_different_test_targets(tmp_path):
    root = tmp_path / "runs"
    rng = np.random.default_rng(0)
    for s in (0, 1):
        write_run(root, "beauty", "sa", s, fixture_ranks(rng, 40, 0.3))
        write_run(root, "beauty", "hybrid", s, fixture_ranks(rng, 40, 0.3),
                  targets=np.arange(40) + (7 if s == 1 else 100))
    with pytest.raises(ValueError, match="different test targets"):
        report.compare(report.load_runs(root), references=("sa",), n_bootstrap=100)


# --------------------------------------------------------------------------- equivalence

def test_equivalence_tost_of_hybrid_vs_sa(grid):
    _, runs = grid
    table = report.equivalence(runs, margin=0.05)
    assert set(table["level"]) == {"seeds", "users"}
    seeds_row = table[(table["level"] == "seeds") & (table["metric"] == "recall@10")].iloc[0]
    hy = np.array([metric_of(runs, "hybrid", s) for s in (0, 2)])
    sa = np.array([metric_of(runs, "sa", s) for s in (0, 2)])
    assert seeds_row["margin"] == pytest.approx(0.05 * sa.mean())
    expected = stats.tost(hy - sa, 0.05 * sa.mean())
    assert seeds_row["n"] == 2 and seeds_row["p_tost"] == pytest.approx(expected["p"])
    users_row = table[(table["level"] == "users") & (table["metric"] == "recall@10")].iloc[0]
    assert users_row["n"] == 300 and 0 <= users_row["p_tost"] <= 1
    # a generous margin makes the per-user test conclude equivalence, a tiny one does not
    wide = report.equivalence(runs, margin=2.0, metrics=("recall@10",))
    assert bool(wide[wide["level"] == "users"]["equivalent"].iloc[0]) is True
    tight = report.equivalence(runs, margin=1e-4, metrics=("recall@10",))
    assert bool(tight[tight["level"] == "users"]["equivalent"].iloc[0]) is False


# --------------------------------------------------------------------------- published, whole report

def test_published_numbers_side_by_side(grid):
    _, runs = grid
    table = report.published_comparison(report.summarize(runs), report.load_published())
    tiger = table[(table["source"] == "tiger") & (table["dataset"] == "beauty") & (table["metric"] == "recall@10")].iloc[0]
    assert tiger["published"] == 0.0648
    assert tiger["ours_mean"] == pytest.approx(np.mean([metric_of(runs, "sa", s) for s in (0, 1, 2)]))
    assert tiger["ours_over_published"] == pytest.approx(tiger["ours_mean"] / 0.0648)
    # the GBLA paper's Amazon table: its Tiger beside our sa, its Tiger+GBLA beside our hybrid
    hybrid = table[(table["source"] == "gbla_hybrid") & (table["dataset"] == "beauty") & (table["metric"] == "recall@10")].iloc[0]
    assert hybrid["compare_with"] == "hybrid" and hybrid["published"] == 0.0611 and hybrid["paper"] == "GBLA"
    assert hybrid["ours_mean"] == pytest.approx(np.mean([metric_of(runs, "hybrid", s) for s in (0, 2)]))
    gbla_tiger = table[(table["source"] == "gbla_tiger") & (table["metric"] == "ndcg@10")].set_index("dataset")
    assert gbla_tiger["published"].to_dict() == {"beauty": 0.0355, "toys": 0.0333, "sports": 0.0188}
    assert (gbla_tiger["compare_with"] == "sa").all()
    assert len(table) == 3 * 3 * len(METRICS) and table["published"].notna().all()
    sports = table[(table["source"] == "tiger") & (table["dataset"] == "sports")]
    assert sports["ours_mean"].isna().all()                      # we have no sports runs here


def test_load_published_names_bad_fields(tmp_path):
    bad = tmp_path / "published.yaml"
    bad.write_text("sources:\n  x:\n    citation: c\n    compare_with: sa\n    metrics:\n      beauty: {recall@10: high}\n")
    with pytest.raises(ValueError, match=r"sources.x.metrics.beauty.recall@10"):
        report.load_published(bad)


def test_build_and_write_report(grid, tmp_path):
    root, runs = grid
    rep = report.build_report(runs, n_bootstrap=200, progress=False)
    paths = report.write_report(rep, tmp_path / "reports", runs_root=root)
    for name in ("status", "summary", "comparisons", "equivalence", "published", "runs", "model_size", "stopping"):
        assert paths[name].is_file()
    assert set(pd.read_csv(paths["model_size"])["variant"]) == {"sa", "hybrid", "all-gbla", "ratio-1to1"}
    assert len(pd.read_csv(paths["comparisons"])) == len(rep.comparisons) == 2 * 3 * len(METRICS) + 0 * 1
    meta = json.loads(paths["report"].read_text())
    assert meta["runs"] == {"expected": 12, "ok": 8, "missing": 3, "failed": 1}
    assert {(r["variant"], r["seed"], r["status"]) for r in meta["not_ok"]} >= {("hybrid", 1, "failed"),
                                                                                ("all-gbla", 2, "missing")}
    assert meta["parameters"]["n_bootstrap"] == 200
    assert not rep.histories.empty and set(rep.histories["variant"]) == {"sa", "hybrid", "all-gbla", "ratio-1to1"}


def test_empty_runs_folder_gives_empty_tables(tmp_path):
    runs = report.load_runs(tmp_path / "nothing-here")
    rep = report.build_report(runs, n_bootstrap=100, progress=False)
    assert rep.summary.empty and rep.comparisons.empty and rep.equivalence.empty
    assert rep.published["ours_mean"].isna().all()
    paths = report.write_report(rep, tmp_path / "reports")
    assert json.loads(paths["report"].read_text())["runs"] == {"expected": 0}
    assert report.plot_forest(rep.comparisons) is None and report.plot_learning_curves(rep.histories) is None
    assert report.plot_metric_bars(rep.runs, rep.summary) is None


def test_figures_draw_on_the_fixture(grid):
    _, runs = grid
    rep = report.build_report(runs, n_bootstrap=200, progress=False)
    forest = report.plot_forest(rep.comparisons, "sa")
    assert forest is not None and len(forest.axes.flat) == len(METRICS)
    assert report.plot_forest(rep.comparisons, "sa", user_level=True) is not None
    # a dataset of the grid with nothing compared yet gets no row of empty panels, only a word in the title
    pending = rep.comparisons[rep.comparisons["dataset"] == "beauty"].assign(
        dataset="toys", pct=float("nan"), pct_ci_low=float("nan"), pct_ci_high=float("nan"))
    both = report.plot_forest(pd.concat([rep.comparisons, pending]), "sa")
    assert list(both.row_names) == ["beauty"] and len(both.axes.flat) == len(METRICS)
    assert "not compared yet: toys" in both.figure._suptitle.get_text()
    bars = report.plot_metric_bars(rep.runs, rep.summary)
    assert bars is not None and len(bars.axes.flat) == 2
    # counts are written on each panel for its own dataset (the fixture's hybrid has 2 of 3 seeds ok)
    n = rep.summary.set_index(["variant", "metric"]).loc[("hybrid", "recall@10")]
    assert n["n_ok"] < n["n_expected"]
    texts = [t.get_text() for t in bars.axes.flat[0].texts]
    assert f"{n['n_ok']}/{n['n_expected']}" in texts
    assert [t.get_text() for t in bars.axes.flat[0].get_xticklabels()] == list(pd.unique(rep.summary["variant"]))
    # a dataset with no finished run: named in the title, no panels
    toys = rep.summary[rep.summary["dataset"] == "beauty"].assign(dataset="toys", n_ok=0, mean=float("nan"),
                                                                  ci_low=float("nan"), ci_high=float("nan"))
    both = report.plot_metric_bars(rep.runs, pd.concat([rep.summary, toys]))
    assert list(both.row_names) == ["beauty"] and "not run yet: toys" in both.figure._suptitle.get_text()
    assert report.plot_learning_curves(rep.histories) is not None
    import matplotlib.pyplot as plt
    plt.close("all")


# --------------------------------------------------------------------------- findings and paper-style tables

def write_ablation_grid(root, n_users=1500, seeds=4):
    """beauty: users share a base of ranks (so paired differences are small); a variant redraws 15% of
    them at its hit rate and misses more where its rate is lower. Missing: hybrid-no-conv seed 3."""
    rng = np.random.default_rng(0)
    plan = {"sa": 0.30, "sa-causal": 0.20, "hybrid": 0.30, "hybrid-no-gate": 0.15, "hybrid-no-conv": 0.30,
            "ratio-1to3": 0.20, "all-gbla": 0.12, "sa-6L": 0.30, "hybrid-1to2-6L": 0.30}
    base = fixture_ranks(rng, n_users, 0.3)
    for variant, rate in plan.items():
        for s in range(seeds):
            if variant == "hybrid-no-conv" and s == seeds - 1:
                continue
            r = base.copy()
            redraw = rng.random(n_users) < 0.15
            r[redraw] = fixture_ranks(rng, int(redraw.sum()), rate)
            r[rng.random(n_users) < 0.3 - rate] = 0
            write_run(root, "beauty", variant, s, r)
    return root


@pytest.fixture(scope="module")
def ablation_report(tmp_path_factory):
    root = write_ablation_grid(tmp_path_factory.mktemp("ablation") / "runs")
    return report.build_report(report.load_runs(root), n_bootstrap=300, progress=False)


def _finding(table, topic):
    return table.loc[table["topic"] == topic, "text"].iloc[0]


def test_findings_state_each_result_with_its_numbers(ablation_report):
    rep = ablation_report
    table = report.findings(rep)
    assert list(table["topic"]) == ["equivalence", "components", "ratio", "depth", "bidirectional", "published",
                                    "top5", "not_run"]
    c = rep.comparisons.set_index(["variant", "reference", "metric"])
    eq = rep.equivalence[(rep.equivalence["level"] == "seeds") & (rep.equivalence["variant"] == "hybrid")]
    eq = eq.set_index("metric")
    # hybrid vs sa: the verdict and the numbers are those of the TOST table
    text = _finding(table, "equivalence")
    verdict = "equivalent within ±5%" if eq.loc["recall@10", "equivalent"] else "equivalence not shown within ±5%"
    assert f"Recall@10 {rep.summary.set_index(['variant', 'metric']).loc[('hybrid', 'recall@10'), 'mean']:.4f}" in text
    assert verdict in text.split(";")[0] and f"TOST p = {report._p(eq.loc['recall@10', 'p_tost'])}" in text
    # components: no gate is a large, Holm-significant loss; no conv is not
    text = _finding(table, "components")
    sig, _, rest = text.partition("Not significant")
    no_gate = c.loc[("hybrid-no-gate", "hybrid", "recall@10")]
    assert no_gate["p_ttest_holm"] <= 0.05 and no_gate["pct"] < -10
    assert f"hybrid-no-gate Recall@10 {report._pct_ci(no_gate)} (p_Holm = {report._p(no_gate['p_ttest_holm'])})" in sig
    assert "hybrid-no-conv Recall@10" in rest and "hybrid-no-conv" not in sig
    # a non-significant component carries what the test could have detected, from its own comparison
    no_conv = c.loc[("hybrid-no-conv", "hybrid", "recall@10")]
    assert np.isfinite(no_conv["mde_pct"]) and no_conv["mde_pct"] > 0
    assert f"(p_Holm = {report._p(no_conv['p_ttest_holm'])}; detectable: ±{no_conv['mde_pct']:.1f}%)" in rest
    # the ratio series: all five named layouts that ran, with SA:GBLA, and a negative rank correlation
    text = _finding(table, "ratio")
    assert "sa (4:0)" in text and "all-gbla (0:4)" in text and "ratio-1to3 (1:3)" in text
    assert "ratio-1to1" not in text   # not in this grid
    rho = float(text.split("Recall@10: ")[1].split(" ")[0].replace("−", "-"))
    assert rho < -0.5
    assert "hybrid-1to2-6L" in _finding(table, "depth") and "p_Holm = " in _finding(table, "depth")
    causal = c.loc[("sa-causal", "sa", "recall@10")]
    assert f"Recall@10 {report._pct_ci(causal)}" in _finding(table, "bidirectional")
    assert "(significant)" in _finding(table, "bidirectional").split(";")[0]
    # the paper's gap beside ours: Tiger+GBLA 0.0611 vs Tiger 0.0641 on Beauty is -4.7%
    assert "Recall@10 −4.7% (0.0611 vs 0.0641), ours " in _finding(table, "published")
    # sa's top-5 diagnostics: the replay of its histories (the fixture's rise every epoch: censored)
    r = rep.reselection.set_index(["dataset", "variant"]).loc[("beauty", "sa")]
    assert _finding(table, "top5") == (
        f"Top five, sa (the report's top-5 diagnostics): early stopping on validation Recall@5 instead of "
        f"Recall@10 would change its validation Recall@5 by {report._pct(r['reselected_pct'])} (the best recorded "
        f"epoch: {report._pct(r['best_recorded_pct'])}; {r['n_ok']} of {r['n_ok']} records end before that replay "
        f"would stop).")
    missing = _finding(table, "not_run")
    assert "hybrid-no-conv (3/4 seeds)" in missing and "hybrid-plain-la" in missing and "ratio-1to1" in missing
    md = report.findings_markdown(table)
    assert md.startswith("**beauty**") and md.count("\n- ") == len(table)


def test_components_untested_are_not_called_insignificant(tmp_path):
    """Component variants in the grid with no finished run: the sentence claims no verdict."""
    runs = report.load_runs(write_ablation_grid(tmp_path / "runs"))
    components = runs["variant"].isin(report.COMPONENT_VARIANTS)
    runs.loc[components, "status"] = "missing"
    text = _finding(report.findings(report.build_report(runs, n_bootstrap=50, progress=False)), "components")
    present = [v for v in report.COMPONENT_VARIANTS if v in set(runs["variant"])]
    assert text == f"Components, each variant vs hybrid: not yet compared (no finished run of {', '.join(present)})."


def test_components_not_run_and_too_few_seeds_are_told_apart(tmp_path):
    """A component with a single seed gets no verdict ('too few paired seeds', with its metrics) while the
    others are tested; one without a finished run is 'not yet run', not a list of n/a metrics."""
    runs = report.load_runs(write_ablation_grid(tmp_path / "runs"))
    no_conv = runs["variant"] == "hybrid-no-conv"
    runs.loc[no_conv & (runs["seed"] != runs.loc[no_conv & (runs["status"] == "ok"), "seed"].min()), "status"] = "missing"

    def components(r):
        return _finding(report.findings(report.build_report(r, n_bootstrap=50, progress=False)), "components")

    text = components(runs)
    assert text.endswith(". Not tested (too few paired seeds): hybrid-no-conv (Recall@10, NDCG@10).")
    assert "hybrid-no-gate Recall@10" in text and "p_Holm = " in text and "Not yet run" not in text
    runs.loc[runs["variant"] == "hybrid-no-gate", "status"] = "missing"
    text = components(runs)
    assert text == ("Components, each variant vs hybrid (paired t over seeds, Holm): none testable yet. Not yet run: "
                    "hybrid-no-gate. Not tested (too few paired seeds): hybrid-no-conv (Recall@10, NDCG@10).")


def test_topics_whose_variants_have_not_run_say_so_in_one_sentence(tmp_path):
    """hybrid and sa-causal without a finished run (sa has all its seeds): the topics that need them
    name what has not run instead of listing n/a numbers."""
    runs = report.load_runs(write_ablation_grid(tmp_path / "runs"))
    runs.loc[runs["variant"].isin(["hybrid", "sa-causal", "sa-6L"]), "status"] = "missing"
    table = report.findings(report.build_report(runs, n_bootstrap=50, progress=False))
    assert _finding(table, "equivalence") == "Hybrid vs all-SA: not yet compared (no finished run of hybrid)."
    assert _finding(table, "components") == "Components, each variant vs hybrid: not yet compared (no finished run of hybrid)."
    assert _finding(table, "bidirectional") == ("Causal vs bidirectional self-attention (sa-causal vs sa): "
                                                 "not yet compared (no finished run of sa-causal).")
    assert _finding(table, "depth").endswith(": not yet compared (no finished run of sa-6L).")
    ratio = _finding(table, "ratio")   # the series still shows what did run
    assert "hybrid (2:2) not yet run;" in ratio and "all-gbla (0:4) 0." in ratio
    assert "no finished run: hybrid, sa-6L, sa-causal;" in _finding(table, "not_run")


def test_a_dataset_with_nothing_run_gets_one_sentence_and_the_papers_gap(tmp_path):
    """Toys in the grid, none of its runs finished: no per-topic n/a sentences, just what is missing
    and the published gap (ours not yet measured); Beauty's findings are unchanged by it."""
    runs = report.load_runs(write_ablation_grid(tmp_path / "runs"))
    beauty_only = report.findings(report.build_report(runs, n_bootstrap=50, progress=False))
    toys = runs.assign(dataset="toys", status="missing")
    table = report.findings(report.build_report(pd.concat([runs, toys], ignore_index=True), n_bootstrap=50,
                                                progress=False))
    t = table[table["dataset"] == "toys"]
    assert list(t["topic"]) == ["published", "not_run"]
    n_variants = runs["variant"].nunique()
    assert t["text"].iloc[1] == f"Not yet run — no finished run of any of its {n_variants} variants."
    assert "ours not yet measured" in t["text"].iloc[0]
    b = table[table["dataset"] == "beauty"].reset_index(drop=True)
    assert b.equals(beauty_only)


def test_findings_of_a_grid_without_the_ablations_say_so(grid):
    _, runs = grid
    table = report.findings(report.build_report(runs, n_bootstrap=100, progress=False))
    assert "not in this grid" in _finding(table, "components") and "not in this grid" in _finding(table, "depth")
    assert "not in this grid" in _finding(table, "bidirectional")
    assert "hybrid (2/3 seeds)" in _finding(table, "not_run")
    empty = report.build_report(runs.iloc[:0], n_bootstrap=10, progress=False)
    assert report.findings_markdown(report.findings(empty)).startswith("*No finished runs")


def test_main_table_cells_and_markers(ablation_report):
    rep = ablation_report
    table = report.main_table(rep)
    assert list(table.index[:2]) and table.columns.nlevels == 2
    assert set(table.columns.get_level_values("metric")) == {"Recall@5", "Recall@10", "NDCG@5", "NDCG@10"}
    s = rep.summary.set_index(["variant", "metric"]).loc[("all-gbla", "recall@10")]
    cell = table.loc["all-gbla", ("beauty", "Recall@10")]
    assert cell.startswith(f"{s['mean']:.4f} ± {(s['ci_high'] - s['ci_low']) / 2:.4f}") and "▼" in cell
    assert "▲" not in table.loc["sa"].str.cat() and "▼" not in table.loc["sa"].str.cat()
    eq = rep.equivalence.set_index(["variant", "level", "metric"])
    assert ("≈" in table.loc["hybrid", ("beauty", "Recall@10")]) == bool(eq.loc[("hybrid", "seeds", "recall@10"), "equivalent"])
    assert table.loc["hybrid-no-conv", ("beauty", "NDCG@10")].endswith("(3/4)")
    assert report.style_main_table(table).to_html()


def test_detail_table_fits_a_page(ablation_report):
    detail = report.detail_table(ablation_report.comparisons, "hybrid", "beauty")
    assert "dataset" not in detail.columns and len(detail.columns) == 12
    row = detail[(detail["variant"] == "hybrid-no-gate") & (detail["metric"] == "Recall@10")].iloc[0]
    c = ablation_report.comparisons
    ref = c[(c["variant"] == "hybrid-no-gate") & (c["reference"] == "hybrid") & (c["metric"] == "recall@10")].iloc[0]
    assert row["Δ% [95% CI] (seeds)"] == f"{ref['pct']:+.1f} [{ref['pct_ci_low']:+.1f}, {ref['pct_ci_high']:+.1f}]"
    assert row["p (t)"] == f"{ref['p_ttest']:.3g}" or row["p (t)"] == f"{ref['p_ttest']:.2e}"
    assert row["MDE %"] == f"{ref['mde_pct']:.1f}"
    assert report._p(0.012345) == "0.0123" and report._p(0.5) == "0.5" and report._p(math.nan) == "n/a"
    assert report.style_detail_table(detail).to_html()
    assert not report.equivalence_table(ablation_report.equivalence).empty


def test_depth_pair_is_compared_and_tested_for_equivalence(ablation_report):
    c = ablation_report.comparisons
    six = c[c["reference"] == "sa-6L"]
    assert set(six["variant"]) == {"hybrid-1to2-6L"} and len(six) == len(METRICS)
    assert (six["n_paired_seeds"] == 4).all()
    eq = ablation_report.equivalence
    assert {("hybrid", "sa"), ("hybrid-1to2-6L", "sa-6L")} == set(zip(eq["variant"], eq["reference"]))


def test_render_html_hides_code_and_progress_bars(tmp_path):
    import nbformat
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell("# Heading kept"),
                nbformat.v4.new_code_cell("SECRET_CODE_LINE = 1", outputs=[
                    nbformat.v4.new_output("stream", name="stderr", text="comparisons:  40%|####      | 4/10 [00:01<00:02]\r"
                                                                          "comparisons: 100%|##########| 10/10 [00:02<00:00]\n"),
                    nbformat.v4.new_output("stream", name="stderr", text="UserWarning: kept warning\n"),
                    nbformat.v4.new_output("stream", name="stdout", text="printed result\n")])]
    path = tmp_path / "nb.ipynb"
    nbformat.write(nb, path)
    html = report.render_html(path)
    assert "Heading kept" in html and "printed result" in html and "kept warning" in html
    assert "SECRET_CODE_LINE" not in html and "10/10" not in html
    assert "SECRET_CODE_LINE" in report.render_html(path, hide_code=False)


def test_provenance_names_device_commit_command_and_date(grid):
    _, runs = grid
    line = report.provenance(runs, command="make ablations PROFILE=smoke")
    assert "8 finished" in line and "device cpu (8)" in line and "commit fixture (8)" in line
    assert "trained 2025-01-01" in line and "`make ablations PROFILE=smoke`" in line and "UTC" in line


def test_pooled_across_datasets_uses_each_datasets_paired_seeds(tmp_path):
    """Across datasets: a comparison gets a row once two datasets have 2+ paired seeds (here beauty and
    toys; sports, with one paired seed, is left out); the
    estimate is the mean of the datasets' seed-level % changes, the same numbers compare() reports
    per dataset; the CSV is written beside the others."""
    root = tmp_path / "runs"
    rng = np.random.default_rng(1)
    for dataset, seeds in (("beauty", range(3)), ("toys", range(4)), ("sports", range(1))):
        for s in seeds:
            for variant, rate in (("sa", 0.30), ("hybrid", 0.27)):
                write_run(root, dataset, variant, s, fixture_ranks(rng, 400, rate))
    write_run(root, "sports", "sa", 1, fixture_ranks(rng, 400, 0.3))
    runs = report.load_runs(root)
    rep = report.build_report(runs, n_bootstrap=100, progress=False)
    pooled = rep.pooled
    row = pooled[(pooled["metric"] == "recall@10") & (pooled["reference"] == "sa") & (pooled["variant"] == "hybrid")]
    assert len(row) == 1
    row = row.iloc[0]
    assert row["datasets"] == "beauty,toys" and row["n_datasets"] == 2 and row["n_pairs"] == 7 and row["df"] == 5
    per = rep.comparisons[(rep.comparisons["metric"] == "recall@10") & (rep.comparisons["reference"] == "sa")
                          & (rep.comparisons["variant"] == "hybrid")].set_index("dataset")["pct"]
    assert row["pct"] == pytest.approx((per["beauty"] + per["toys"]) / 2)
    assert row["per_dataset_pct"] == f"beauty {report._pct(per['beauty'])}; toys {report._pct(per['toys'])}"
    assert row["pct_ci_low"] < row["pct"] < row["pct_ci_high"] and 0 <= row["p"] <= row["p_holm"] <= 1
    assert row["margin_pct"] == 5.0 and isinstance(row["equivalent"], (bool, np.bool_))
    assert set(pooled["reference"]) == {"sa", "hybrid"} and len(pooled) == 2 * len(METRICS)
    paths = report.write_report(rep, tmp_path / "reports", runs_root=root)
    assert len(pd.read_csv(paths["pooled"])) == len(pooled)
    # the finding under "across datasets" and the table the notebook shows carry the same numbers
    found = report.findings(rep)
    text = found.loc[(found["dataset"] == "across datasets") & (found["topic"] == "pooled"), "text"].iloc[0]
    assert text.startswith("Hybrid vs all-SA, averaged over beauty, toys (seed-level t on 5 df): Recall@10 "
                           + report._pct_ci(row))
    assert "sa vs hybrid" not in text   # the mirror of hybrid vs sa is not repeated
    shown = report.pooled_table(pooled)
    assert len(shown) == 2 * 2 and shown["Δ% [95% CI]"].iloc[0] in text
    # the figure: one panel per metric, each dataset's own change beside the average
    fig = report.plot_pooled(pooled, rep.comparisons, "sa")
    ax = fig.axes[0]
    assert [a.get_title() for a in fig.axes] == ["Recall@10", "NDCG@10"]
    assert sorted(line.get_label() for line in ax.lines if not line.get_label().startswith("_")) == ["beauty", "toys"]
    assert sorted(round(line.get_xdata()[0], 9) for line in ax.lines if line.get_label() in ("beauty", "toys")) == \
        sorted(round(per[d], 9) for d in ("beauty", "toys"))
    assert report.plot_pooled(pooled.iloc[:0], rep.comparisons) is None   # nothing pooled: no figure
    import matplotlib.pyplot as plt
    plt.close("all")
    # one dataset only: no pooled rows, an empty table with its columns
    single = report.build_report(runs[runs["dataset"] == "beauty"], n_bootstrap=100, progress=False)
    assert single.pooled.empty and list(single.pooled.columns) == report.POOLED_COLUMNS


def test_by_history_length_splits_the_user_level_difference_into_buckets(grid):
    """Each bucket's difference is the users' (means over paired seeds) difference within it, by hand
    from the per-user files; n_users counts the bucket; every user falls in one bucket (shorter ones in
    the first); runs of other data or users missing from the lengths give a reason, not numbers."""
    root, runs = grid
    users = np.arange(300)
    hist = pd.Series(np.random.default_rng(3).integers(2, 21, users.size), index=users)
    assert report.history_bucket_labels() == ["<=4", "5", "6-8", "9+"]
    table = report.by_history_length(runs, {"beauty": (hist, "fixture")}, [("hybrid", "sa")],
                                     ("recall@10",), n_bootstrap=300)
    assert list(table["history"]) == ["<=4", "5", "6-8", "9+"] and (table["reason"] == "").all()
    assert table["n_users"].sum() == users.size
    bucket = np.clip(np.searchsorted(report.HISTORY_EDGES, hist.to_numpy(), side="right") - 1, 0, 3)
    ranks = {s: {v: pd.read_parquet(root / "beauty" / v / f"seed{s}" / "per_user_test.parquet").set_index("user")["rank"]
                 for v in ("hybrid", "sa")} for s in (0, 2)}   # hybrid seed 1 failed: seeds 0 and 2 pair
    hit = {v: np.mean([(ranks[s][v].loc[users].to_numpy() > 0) for s in (0, 2)], axis=0) for v in ("hybrid", "sa")}
    diff = hit["hybrid"] - hit["sa"]
    between = sps.f_oneway(*(diff[bucket == k] for k in range(4))).pvalue
    assert table["p_between_buckets"].to_numpy() == pytest.approx(np.full(4, between))
    for k, row in table.iterrows():
        sel = bucket == k
        assert row["n_users"] == sel.sum()
        assert row["pct"] == pytest.approx(100 * (hit["hybrid"][sel].mean() - hit["sa"][sel].mean()) / hit["sa"][sel].mean())
        assert row["pct_ci_low"] <= row["pct"] <= row["pct_ci_high"] and row["p_perm"] <= row["p_perm_holm"]
    other = report.by_history_length(runs, {"beauty": (hist, "another")}, [("hybrid", "sa")], n_bootstrap=100)
    assert other["reason"].iloc[0] == "runs trained on data fixture; the history lengths come from another"
    short = report.by_history_length(runs, {"beauty": (hist.iloc[:-5], "fixture")}, [("hybrid", "sa")], n_bootstrap=100)
    assert short["reason"].iloc[0] == "5 tested users are not in the processed test split"
    # a pair without paired seeds on the dataset has no rows; the figure draws what has numbers
    assert report.by_history_length(runs, {"beauty": (hist, "fixture")}, [("sa-6L", "sa")]).empty
    # by default: hybrid and all-gbla vs sa, and the recency gate vs hybrid (once it has run)
    rng = np.random.default_rng(5)
    for s in (0, 2):
        write_run(root, "beauty", "hybrid-recency-gate", s, fixture_ranks(rng, 300, 0.35))
    pairs = report.by_history_length(report.load_runs(root), {"beauty": (hist, "fixture")}, n_bootstrap=100)
    assert list(pd.unique(pairs["variant"] + "/" + pairs["reference"])) == [
        "hybrid/sa", "all-gbla/sa", "hybrid-recency-gate/hybrid"]
    # the findings carry it, per dataset, before what has not run
    rep = report.build_report(runs, n_bootstrap=100, progress=False)
    rep.by_history_length = table
    found = report.findings(rep)
    beauty = list(found.loc[found["dataset"] == "beauty", "topic"])
    assert beauty[-2:] == ["history", "not_run"]
    text = found.loc[found["topic"] == "history", "text"].iloc[0]
    assert f"hybrid vs sa, Recall@10: <=4 {report._pct(table['pct'].iloc[0])}" in text
    assert f"(ANOVA p = {report._p(between)})" in text
    shown = report.history_length_table(pd.concat([table, other]))
    assert list(shown["history (items)"].iloc[:4]) == ["<=4", "5", "6-8", "9+"]
    assert shown["Δ% [95% CI]"].iloc[-1].startswith("n/a (runs trained on data fixture")
    fig = report.plot_by_history_length(table)
    assert fig is not None and [ax.get_title() for ax in fig.axes.flat] == ["beauty"]
    assert report.plot_by_history_length(other) is None
    import matplotlib.pyplot as plt
    plt.close("all")


def test_history_lengths_come_from_the_processed_test_split(tmp_path):
    """The synthetic dataset's test users and history lengths, its fingerprint beside them; a dataset
    that is not built gives a note naming it instead."""
    from gbla.params import load_grid

    synthetic = load_grid(REPO_ROOT / "params" / "ablations.yaml", "smoke").synthetic
    lengths, notes = report.history_lengths_of_test_users(["synthetic", "beauty"], processed_root=tmp_path,
                                                          synthetic=synthetic)
    data = datasets.load_processed_dataset("synthetic", synthetic=synthetic)
    hist, fingerprint = lengths["synthetic"]
    assert list(lengths) == ["synthetic"] and fingerprint == data.provenance["fingerprint"]
    assert (hist.index.to_numpy() == data.test.user).all() and (hist.to_numpy() == data.test.history_len).all()
    assert len(notes) == 1 and notes[0].startswith("beauty: no history lengths") and str(tmp_path) in notes[0]


# --------------------------------------------------------------------------- model size and convergence

def test_encoder_parameters_count_the_built_encoder_and_the_gbla_layers_extras():
    import torch  # noqa: F401  (the real modules below are built on the CPU)

    from gbla.config import GBLAOptions, ModelConfig
    from gbla.model import EncoderBlock

    sa = ModelConfig(encoder_layout=("sa",) * 4)
    hybrid = ModelConfig(encoder_layout=("sa", "gbla", "gbla", "sa"))
    for cfg in (sa, hybrid, ModelConfig(encoder_layout=("gbla",) * 3, gbla=GBLAOptions(use_conv1d=False))):
        blocks = [EncoderBlock(t, cfg, "torch", 1) for t in cfg.encoder_layout]
        assert report.encoder_parameters(cfg) == (sum(p.numel() for b in blocks for p in b.parameters()),
                                                  sum(p.numel() for b in blocks for p in b.mix.parameters()))
    # by hand: a GBLA layer has, beyond the SA layer's q/k/v and output projections, a depthwise conv
    # (K taps + a bias per q/k/v channel), a key gate (D -> H), the gated norm's z projection (D -> H E)
    # and its weight (E), and lacks the SA layer's relative-position bias table (buckets x H)
    D, H, E, K, buckets = sa.d_model, sa.num_heads, sa.head_dim, 4, sa.relative_attention_num_buckets
    extra = 3 * H * E * (K + 1) + (D * H + H) + D * H * E + E - buckets * H
    (n_sa, mix_sa), (n_hybrid, mix_hybrid) = report.encoder_parameters(sa), report.encoder_parameters(hybrid)
    assert n_hybrid - n_sa == mix_hybrid - mix_sa == 2 * extra


def test_model_size_reads_each_variants_config_and_its_best_epochs(tmp_path):
    from gbla.config import ModelConfig

    root = tmp_path / "runs"
    rng = np.random.default_rng(0)
    layouts = {"sa": ("sa",) * 4, "hybrid": ("sa", "gbla", "gbla", "sa")}
    best = {"sa": [10, 14, 12], "hybrid": [8, 8]}
    for variant, epochs in best.items():
        for seed, e in enumerate(epochs):
            config = RunConfig("beauty", variant, seed, model=ModelConfig(encoder_layout=layouts[variant]))
            write_run(root, "beauty", variant, seed, fixture_ranks(rng, 50, 0.3), epochs=e, config=config)
    write_run(root, "toys", "hybrid", 0, fixture_ranks(rng, 50, 0.3), epochs=5,
              config=RunConfig("toys", "hybrid", 0, model=ModelConfig(encoder_layout=layouts["hybrid"])))
    table = report.model_size(report.load_runs(root)).set_index(["dataset", "variant"])
    n_sa = report.encoder_parameters(ModelConfig(encoder_layout=layouts["sa"]))[0]
    n_hybrid = report.encoder_parameters(ModelConfig(encoder_layout=layouts["hybrid"]))[0]
    assert table.loc[("beauty", "sa"), "encoder_params"] == n_sa
    assert table.loc[("beauty", "hybrid"), "encoder_params"] == n_hybrid
    assert table.loc[("beauty", "hybrid"), "encoder_params_vs_sa_pct"] == pytest.approx(100 * (n_hybrid / n_sa - 1))
    assert math.isnan(table.loc[("toys", "hybrid"), "encoder_params_vs_sa_pct"])  # no sa on toys
    assert table.loc[("beauty", "sa"), "best_epoch_mean"] == 12 and table.loc[("beauty", "sa"), "best_epoch_sd"] == 2
    assert table.loc[("beauty", "hybrid"), "n_ok"] == 2 and table.loc[("beauty", "hybrid"), "best_epoch_sd"] == 0
    assert math.isnan(table.loc[("toys", "hybrid"), "best_epoch_sd"])  # one seed: no SD
    shown = report.model_size_table(table.reset_index()).set_index("variant")
    assert shown.loc["sa", "beauty: best epoch (seeds)"] == "12 ± 2 (3)"
    assert shown.loc["hybrid", "toys: best epoch (seeds)"] == "5 (1)" and shown.loc["sa", "toys: best epoch (seeds)"] == ""
    assert shown.loc["hybrid", "vs sa"] == f"{100 * (n_hybrid / n_sa - 1):+.1f}%"
    assert report.model_size_table(report.model_size(report.load_runs(tmp_path / "none"))).empty


def test_stopping_dependence_fits_within_each_variant_and_says_what_the_hybrid_epochs_are_worth(tmp_path):
    """A grid built so that within each variant a later best epoch goes with more hits: the table's
    slope (in % of the variant's mean per 10 epochs) is the within-variant least-squares slope, per
    dataset and over both; a variant with one seed adds nothing; the finding turns the hybrid's best
    epoch minus sa's into a % at the pooled slope."""
    root = tmp_path / "runs"
    n_users = 200
    # (best epochs, hits among n_users at rank 1): later epochs, more hits, at different rates
    plan = {("beauty", "sa"): ([40, 50, 60], [60, 62, 65]), ("beauty", "hybrid"): ([30, 34, 46], [58, 57, 61]),
            ("toys", "sa"): ([20, 44], [40, 43]), ("toys", "hybrid"): ([25, 31, 36], [41, 40, 44]),
            ("toys", "all-gbla"): ([70], [90])}
    for (dataset, variant), (epochs, hits) in plan.items():
        for seed, (e, h) in enumerate(zip(epochs, hits)):
            write_run(root, dataset, variant, seed, np.r_[np.ones(h, int), np.zeros(n_users - h, int)],
                      epochs=e + 10, best_epoch=e)
    runs = report.load_runs(root)
    table = report.stopping_dependence(runs, ["recall@10"]).set_index("dataset")
    assert list(table.index) == ["beauty", "toys", report.ALL_DATASETS]

    def expected(keys):
        x, y, g = [], [], []
        for key in keys:
            epochs, hits = plan[key]
            if len(epochs) < 2:
                continue
            values = np.array(hits) / n_users
            x += epochs
            y += list(100 * (values / values.mean() - 1))
            g += ["/".join(key)] * len(epochs)
        return stats.within_group_slope(np.array(x, float), np.array(y), np.array(g))

    for scope, keys in (("beauty", [k for k in plan if k[0] == "beauty"]), ("toys", [k for k in plan if k[0] == "toys"]),
                        (report.ALL_DATASETS, list(plan))):
        fit = expected(keys)
        row = table.loc[scope]
        assert row["pct_per_10_epochs"] == pytest.approx(10 * fit["slope"]) and row["p"] == pytest.approx(fit["p"])
        assert (row["ci_low"], row["ci_high"]) == pytest.approx((10 * fit["ci_low"], 10 * fit["ci_high"]))
        assert row["n_runs"] == fit["n"] and row["n_groups"] == fit["n_groups"]
    assert table.loc["toys", "n_runs"] == 5 and table.loc[report.ALL_DATASETS, "n_groups"] == 4  # all-gbla: one seed
    assert table.loc[report.ALL_DATASETS, "pct_per_10_epochs"] > 0

    rep = report.build_report(runs, metrics=["recall@10"], n_bootstrap=100, progress=False)
    text = report.findings(rep, ["recall@10"]).set_index("topic").loc["stopping", "text"]
    slope = table.loc[report.ALL_DATASETS, "pct_per_10_epochs"]
    gap_beauty = np.mean([30, 34, 46]) - np.mean([40, 50, 60])
    assert f"beauty −13 epochs, {report._pct(gap_beauty / 10 * slope)}" in text
    assert f"scores {report._pct(slope)}" in text and "11 runs of 4 variants" in text
    shown = report.stopping_table(rep.stopping)
    assert list(shown["runs (variants)"]) == ["6 (2)", "5 (2)", "11 (4)"]
    one_dataset = report.stopping_dependence(runs[runs["dataset"] == "beauty"], ["recall@10"])
    assert list(one_dataset["dataset"]) == ["beauty"]  # no "all datasets" row from a single dataset


def test_model_size_refuses_seeds_of_one_variant_with_different_models(tmp_path):
    from gbla.config import ModelConfig

    root = tmp_path / "runs"
    rng = np.random.default_rng(0)
    for seed, layout in enumerate([("sa",) * 4, ("sa",) * 6]):
        write_run(root, "beauty", "sa", seed, fixture_ranks(rng, 50, 0.3),
                  config=RunConfig("beauty", "sa", seed, model=ModelConfig(encoder_layout=layout)))
    with pytest.raises(ValueError, match="beauty/sa: its finished runs recorded 2 different model configs"):
        report.model_size(report.load_runs(root))


# --------------------------------------------------------------------------- top-5 diagnostics

def _history(r5, r10):
    return [{"epoch": e, "train_loss": 1.0, "epoch_time_s": 1.0, "valid_recall@5": a, "valid_recall@10": b,
             "valid_ndcg@5": a / 2, "valid_ndcg@10": b / 2} for e, (a, b) in enumerate(zip(r5, r10), start=1)]


def test_replay_early_stopping_follows_the_training_loops_rule():
    """Strictly better resets the count (a tie does not), `patience` evaluations without a gain stop;
    epochs without an evaluation are skipped; a record that ends first is censored."""
    history = pd.DataFrame(_history([0.1, 0.3, 0.3, 0.2, 0.4, 0.1, 0.1], [0.2, 0.5, 0.4, 0.5, 0.3, 0.2, 0.1]))
    assert report.replay_early_stopping(history, "valid_recall@10", 3) == (2, False)   # 0.5 tied at 4: no gain
    assert report.replay_early_stopping(history, "valid_recall@10", 6) == (2, True)
    assert report.replay_early_stopping(history, "valid_recall@5", 2) == (2, False)   # 0.3 tied at 3, 0.2
    assert report.replay_early_stopping(history, "valid_recall@5", 3) == (5, True)    # 0.4 at 5, 2 more
    sparse = history.copy()
    sparse.loc[sparse["epoch"] % 2 == 0, "valid_recall@5"] = np.nan   # evaluated at odd epochs only
    assert report.replay_early_stopping(history, "valid_recall@5", 1) == (2, False)
    assert report.replay_early_stopping(sparse, "valid_recall@5", 1) == (5, False)    # 0.1, 0.3, 0.4, 0.1
    with pytest.raises(ValueError, match="no column 'valid_mrr'"):
        report.replay_early_stopping(history, "valid_mrr", 3)


def test_reselect_epochs_replays_each_run_and_checks_its_own_stop_first(tmp_path):
    from gbla.config import TrainConfig

    root = tmp_path / "runs"
    rng = np.random.default_rng(0)
    train = TrainConfig(patience=2)
    r5s = [[0.10, 0.20, 0.15, 0.30, 0.25], [0.10, 0.12, 0.20, 0.18, 0.19]]
    r10s = [[0.20, 0.40, 0.30, 0.35, 0.30], [0.20, 0.30, 0.28, 0.35, 0.33]]
    for seed, (r5, r10) in enumerate(zip(r5s, r10s)):
        best = int(np.argmax(r10)) + 1
        write_run(root, "beauty", "sa", seed, fixture_ranks(rng, 50, 0.3), epochs=5, best_epoch=best,
                  history=_history(r5, r10), config=RunConfig("beauty", "sa", seed, train=train))
    # a run whose recorded best epoch is not what its own early stopping gives is not counted
    write_run(root, "beauty", "sa", 2, fixture_ranks(rng, 50, 0.3), epochs=5, best_epoch=5,
              history=_history(r5s[0], r10s[0]), config=RunConfig("beauty", "sa", 2, train=train))
    # a history that never recorded the monitored metric is named, not counted
    write_run(root, "beauty", "sa", 3, fixture_ranks(rng, 50, 0.3), epochs=2, best_epoch=2,
              history=[{"epoch": e, "train_loss": 1.0, "valid_recall@10": 0.1 * e} for e in (1, 2)],
              config=RunConfig("beauty", "sa", 3, train=train))
    table = report.reselect_epochs(report.load_runs(root), "recall@5", variants=("sa",))
    assert len(table) == 1
    row = table.iloc[0]
    # seed 0: kept epoch 2 (R@10 0.40, then two without a gain); on R@5 epoch 2, then 3 no gain, 4 gain
    # (0.30), 5 no gain, and the record ends: censored. seed 1: kept 4 (0.35); on R@5 epoch 3 (0.20),
    # then 4 and 5 without a gain: stops at 5.
    assert row["n_ok"] == 2 and row["n_censored"] == 1
    assert row["kept_epoch_mean"] == (2 + 4) / 2 and row["reselected_epoch_mean"] == (4 + 3) / 2
    assert row["kept_mean"] == pytest.approx((0.20 + 0.18) / 2)
    assert row["reselected_mean"] == pytest.approx((0.30 + 0.20) / 2)
    assert row["reselected_pct"] == pytest.approx(100 * (0.25 / 0.19 - 1))
    assert row["best_recorded_mean"] == pytest.approx((0.30 + 0.20) / 2)
    assert row["reason"].startswith("seed 2: replaying its own early stopping gives epoch 2, not its recorded 5; "
                                    "seed 3: the history has no column 'valid_recall@5'")
    shown = report.reselection_table(table).iloc[0]
    assert shown["kept epoch (R@10)"] == "3.0" and shown["epoch on recall@5"] == "3.5"
    assert shown["re-selected"] == f"0.2500 (+{100 * (0.25 / 0.19 - 1):.1f}%)" and shown["censored"] == 1
    assert report.reselect_epochs(report.load_runs(tmp_path / "none")).empty
    assert report.reselection_table(report.reselect_epochs(report.load_runs(tmp_path / "none"))).empty


def test_hits_by_prefix_sharing_splits_users_by_their_targets_prefix(grid):
    """Recall@5 / @10 per seed within each group, by hand from the per-user files, averaged over the
    finished seeds; runs of other data give a reason."""
    root, runs = grid
    sizes = np.ones(400, dtype=np.int64)
    sizes[100:400:3] = 2                      # every third target (items 100, 103, ...) shares its prefix
    table = report.hits_by_prefix_sharing(runs, {"beauty": (sizes, "fixture")}, variants=("sa", "hybrid"))
    assert set(table["variant"]) == {"sa", "hybrid"} and (table["reason"] == "").all()
    sa = table[table["variant"] == "sa"].set_index("target")
    shared = (np.arange(300) % 3) == 0
    frames = [pd.read_parquet(root / "beauty" / "sa" / f"seed{s}" / "per_user_test.parquet") for s in (0, 1, 2)]
    for name, sel in (("shared prefix", shared), ("own prefix", ~shared)):
        r5 = np.mean([((f["rank"].to_numpy()[sel] >= 1) & (f["rank"].to_numpy()[sel] <= 5)).mean() for f in frames])
        r10 = np.mean([(f["rank"].to_numpy()[sel] >= 1).mean() for f in frames])
        assert sa.loc[name, "n_users"] == sel.sum() and sa.loc[name, "n_seeds"] == 3
        assert sa.loc[name, "recall@5"] == pytest.approx(r5) and sa.loc[name, "recall@10"] == pytest.approx(r10)
        assert sa.loc[name, "recall@5_over_recall@10"] == pytest.approx(r5 / r10)
    assert sa.loc["all", "share_of_users"] == 1 and sa.loc["shared prefix", "share_of_users"] == pytest.approx(1 / 3)
    assert sa.loc["all", "recall@10"] == pytest.approx(metric_of(runs, "sa", 0) / 3 + metric_of(runs, "sa", 1) / 3
                                                       + metric_of(runs, "sa", 2) / 3)
    other = report.hits_by_prefix_sharing(runs, {"beauty": (sizes, "another")}, variants=("sa",))
    assert other["reason"].iloc[0] == "runs trained on data fixture; the semantic IDs come from another"
    shown = report.prefix_sharing_table(pd.concat([table, other], ignore_index=True))
    first = shown[(shown["variant"] == "sa") & (shown["target's prefix"] == "shared prefix")].iloc[0]
    assert first["users"] == "100 (33.3%)" and first["seeds"] == 3
    assert first["R@5 / R@10"] == f"{sa.loc['shared prefix', 'recall@5_over_recall@10']:.3f}"
    assert shown["note"].iloc[-1].startswith("runs trained on data fixture") and shown["users"].iloc[-1] == ""
    # the findings say it for sa, beside the replay of its histories
    rep = report.build_report(runs, n_bootstrap=100, progress=False)
    rep.prefix_sharing = table
    text = _finding(report.findings(rep), "top5")
    ratio = sa["recall@5_over_recall@10"]
    assert text.endswith(f"; users whose target shares its semantic-ID prefix (33.3%) have Recall@5 / Recall@10 "
                         f"{ratio['shared prefix']:.3f} against {ratio['own prefix']:.3f} for targets with a prefix "
                         f"of their own.")
    small = report.hits_by_prefix_sharing(runs, {"beauty": (sizes[:350], "fixture")}, variants=("sa",))
    assert small["reason"].iloc[0].endswith("per_user_test.parquet: test targets outside the 350 items of the "
                                            "processed data")


def test_sid_prefix_sharing_counts_items_with_the_same_digits_but_the_last():
    from collections import Counter

    from gbla.params import load_grid

    synthetic = load_grid(REPO_ROOT / "params" / "ablations.yaml", "smoke").synthetic
    sharing, notes = report.sid_prefix_sharing(["synthetic"], synthetic=synthetic)
    data = datasets.load_processed_dataset("synthetic", synthetic=synthetic)
    sizes, fingerprint = sharing["synthetic"]
    prefixes = [tuple(row[:-1]) for row in np.asarray(data.sids)]
    count = Counter(prefixes)
    assert not notes and fingerprint == data.provenance["fingerprint"]
    assert sizes.tolist() == [count[p] for p in prefixes] and (sizes > 1).any()


def test_a_missing_processed_dataset_is_named_from_the_repository_root(tmp_path):
    """The report's notes quote this error: a folder inside the repository is named from its root."""
    with pytest.raises(FileNotFoundError, match=r"'toys' not found at outputs/no-such-processed/toys \(no meta.json\)"):
        datasets.load_processed_dataset("toys", REPO_ROOT / "outputs" / "no-such-processed")
    with pytest.raises(FileNotFoundError, match=f"not found at {tmp_path.resolve() / 'toys'} "):
        datasets.load_processed_dataset("toys", tmp_path)
