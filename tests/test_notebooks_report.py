"""The report notebooks execute through papermill on fixture data and write their files."""
import json
from pathlib import Path

import nbformat
import numpy as np
import pandas as pd
import papermill as pm
import pytest

from test_bench_latency import bench_rows
from test_report import fixture_ranks, write_failed, write_run

REPO = Path(__file__).resolve().parents[1]
AGGREGATE = REPO / "notebooks" / "aggregate.ipynb"
LATENCY = REPO / "notebooks" / "latency.ipynb"

pytestmark = pytest.mark.timeout(180)


def execute(notebook, out, cwd, **parameters):
    pm.execute_notebook(str(notebook), str(out), parameters=parameters, kernel_name="python3", cwd=str(cwd),
                        progress_bar=False)
    return nbformat.read(out, as_version=4)


def outputs_text(nb) -> str:
    parts = []
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            parts.append(output.get("text", ""))
            for value in output.get("data", {}).values():
                parts.append(value if isinstance(value, str) else json.dumps(value))
    return "\n".join(parts)


@pytest.mark.parametrize("path", [AGGREGATE, LATENCY])
def test_report_notebooks_are_committed_clean_with_a_parameters_cell(path):
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert "parameters" in code[0].metadata.get("tags", [])
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in code)


def test_aggregate_notebook_on_a_partial_smoke_grid(tmp_path):
    """Expected grid from params/ablations.yaml (smoke): one variant complete, one with a failed
    seed, the others never ran. The notebook shows them and writes its tables."""
    from gbla.grid import load_grid
    from gbla.datasets import expected_data_fingerprint

    params = REPO / "params" / "ablations.yaml"
    configs = load_grid(params, "smoke").expand()
    variants = list(dict.fromkeys(c.variant for c in configs))
    assert {"sa", "hybrid"} <= set(variants) and len(variants) >= 3
    runs_root = tmp_path / "runs"
    rng = np.random.default_rng(0)
    grid = load_grid(params, "smoke")
    # the runs were trained on the data the profile gives now (a run on other data would be stale)
    fingerprint = {d: expected_data_fingerprint(d, synthetic=grid.synthetic) for d in grid.datasets}
    for cfg in configs:
        if cfg.variant == "sa" or (cfg.variant == "hybrid" and cfg.seed == configs[0].seed):
            write_run(runs_root, cfg.dataset, cfg.variant, cfg.seed, fixture_ranks(rng, 120, 0.3), config=cfg,
                      data_fingerprint=fingerprint[cfg.dataset])
        elif cfg.variant == "hybrid":
            write_failed(runs_root, cfg.dataset, cfg.variant, cfg.seed, config=cfg)
    nb = execute(AGGREGATE, tmp_path / "aggregate.ipynb", tmp_path, runs_root=str(runs_root),
                 params_file=str(params), profile="smoke", output_dir=str(tmp_path / "reports"), n_bootstrap=200)
    out = tmp_path / "reports" / "aggregate-smoke"
    meta = json.loads((out / "report.json").read_text())
    n_seeds = len({c.seed for c in configs})
    assert meta["runs"]["expected"] == len(configs)
    assert meta["runs"]["ok"] == n_seeds + 1 and meta["runs"]["failed"] == n_seeds - 1
    assert meta["runs"]["missing"] == len(configs) - 2 * n_seeds
    summary = pd.read_csv(out / "summary.csv")
    never = summary[~summary["variant"].isin(["sa", "hybrid"])]
    assert len(never) and (never["n_ok"] == 0).all() and never["mean"].isna().all()
    comparisons = pd.read_csv(out / "comparisons.csv")
    assert comparisons["reason"].fillna("").str.contains("no paired seeds").any()
    hybrid = comparisons[(comparisons["variant"] == "hybrid") & (comparisons["reference"] == "sa")]
    assert (hybrid["n_paired_seeds"] == 1).all() and hybrid["p_perm"].notna().all()
    assert (out / "equivalence.csv").is_file() and (out / "published.csv").is_file()
    assert {p.name for p in (out / "figures").glob("*.png")} >= {"forest_vs_sa_seeds.png", "metric_bars.png",
                                                                 "by_history_length.png"}
    # the synthetic test users' histories come from the profile's settings: hybrid vs sa split by length
    by_length = pd.read_csv(out / "by_history_length.csv")
    assert set(by_length["variant"]) == {"hybrid"} and by_length["n_users"].sum() == 120
    # the top-5 diagnostics: each finished sa / hybrid run's history replayed, users split by prefix
    reselection = pd.read_csv(out / "reselection.csv")
    assert set(reselection["variant"]) == {"sa", "hybrid"} and reselection["reason"].isna().all()
    assert (reselection["n_ok"] == reselection["variant"].map({"sa": n_seeds, "hybrid": 1})).all()
    assert set(pd.read_csv(out / "prefix_sharing.csv")["variant"]) == {"sa", "hybrid"}
    text = outputs_text(nb)
    assert "runs not finished" in text and "failed" in text
    assert "no profile of the params file reruns this profile's runs" in text


def test_aggregate_notebook_on_an_empty_runs_folder(tmp_path):
    nb = execute(AGGREGATE, tmp_path / "aggregate.ipynb", tmp_path, runs_root=str(tmp_path / "no-runs"),
                 params_file="", output_dir=str(tmp_path / "reports"), n_bootstrap=100)
    meta = json.loads((tmp_path / "reports" / "aggregate-folder" / "report.json").read_text())
    assert meta["runs"] == {"expected": 0}
    assert "No runs found" in outputs_text(nb)


def test_latency_notebook_on_a_fixture_json(tmp_path):
    bench = tmp_path / "layer_speed.json"
    bench.write_text(json.dumps({"meta": {"device": "fixture GPU", "commit": "abc"}, "rows": bench_rows()}))
    nb = execute(LATENCY, tmp_path / "latency.ipynb", tmp_path, bench_file=str(bench), output_dir=str(tmp_path / "out"))
    speedups = pd.read_csv(tmp_path / "out" / "latency_speedups.csv")
    assert set(speedups["impl"]) == {"sa-flash", "sa-efficient", "gbla-triton"}
    text = outputs_text(nb)
    assert "fixture GPU" in text and "not supported" in text


def test_latency_notebook_says_when_the_benchmark_is_missing(tmp_path):
    nb = execute(LATENCY, tmp_path / "latency.ipynb", tmp_path, bench_file=str(tmp_path / "absent.json"),
                 output_dir=str(tmp_path / "out"))
    assert "No benchmark results yet" in outputs_text(nb)
    assert not (tmp_path / "out").exists()


def test_aggregate_notebook_pairs_a_profile_that_changes_one_setting(tmp_path):
    """A profile whose compares_with names the report's profile: its runs are paired with their twins,
    shown in the findings and in their own section, and written as CSV beside the report's tables."""
    import copy

    import yaml

    from gbla.datasets import expected_data_fingerprint
    from gbla.grid import load_grid

    data = yaml.safe_load((REPO / "params" / "ablations.yaml").read_text())
    longer = copy.deepcopy(data["profiles"]["smoke"])
    longer.update(compares_with="smoke", variants=["sa", "hybrid"])
    longer["train"]["patience"] = data["profiles"]["smoke"]["train"]["patience"] + 3
    longer["runtime"]["runs_root"] = str(tmp_path / "runs-longer")
    data["profiles"] = {"smoke": data["profiles"]["smoke"], "smoke-longer": longer}
    data["profiles"]["smoke"]["runtime"]["runs_root"] = str(tmp_path / "runs")
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(data, sort_keys=False))
    rng = np.random.default_rng(1)
    for profile, variants in (("smoke", ("sa", "hybrid")), ("smoke-longer", ("sa",))):
        grid = load_grid(params, profile)
        for cfg in grid.expand(variants=list(variants)):
            write_run(grid.runs_root, cfg.dataset, cfg.variant, cfg.seed, fixture_ranks(rng, 120, 0.3), config=cfg,
                      data_fingerprint=expected_data_fingerprint(cfg.dataset, synthetic=grid.synthetic))
    nb = execute(AGGREGATE, tmp_path / "aggregate.ipynb", tmp_path, runs_root=str(tmp_path / "runs"),
                 params_file=str(params), profile="smoke", output_dir=str(tmp_path / "reports"), n_bootstrap=200)
    out = tmp_path / "reports" / "aggregate-smoke"
    changed = pd.read_csv(out / "sensitivity-smoke-longer.csv")
    label = f"patience {longer['train']['patience']}"
    per_dataset = changed[changed["dataset"] == "synthetic"]
    assert set(zip(per_dataset["variant"], per_dataset["reference"])) == {
        (f"sa ({label})", "sa"), (f"hybrid ({label})", "hybrid")}
    sa = per_dataset[per_dataset["reference"] == "sa"]
    assert (sa["n_paired_seeds"] == 2).all() and sa["pct"].notna().all() and sa["p_perm"].notna().all()
    assert (per_dataset.loc[per_dataset["reference"] == "hybrid", "n_paired_seeds"] == 0).all()
    assert (out / "sensitivity-smoke-longer-gaps.csv").is_file()
    # the fixture runs share their histories (3 epochs each): every rerun repeats its twin to its end
    retrace = pd.read_csv(out / "sensitivity-smoke-longer-retrace.csv")
    assert len(retrace) == 2 and retrace["retraced_to_end"].all() and retrace["retraced_to_first_stop"].all()
    assert not retrace["same_test"].any()
    text = outputs_text(nb)
    assert "One setting changed" in text and f"{label} (2 of 4 runs)" in text
    assert "`train.patience` 2 → 5" in text
    assert "Of 2 paired runs, 2 repeat their twin exactly up to the first stop of a seed in its group" in text
    assert "repeat the twin to the first stop" in text       # the summary table of the section
