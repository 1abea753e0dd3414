"""The committed results are what the code says they are. Every run folder of a profile is done under
today's params and config code (its config hash is the one the grid expands to, so `make ablations`
skips it and no refactor silently renames and re-trains it), and each run's per-user test ranks give
exactly the test metrics of its metrics.json (the paired statistics read the former, the tables the
latter). Checked on whatever runs the checkout holds: a checkout without results skips."""
import json
import math

import pytest

from gbla import runs
from gbla.data import amazon
from gbla.evaluate import metrics_from_ranks
from gbla.params import load_profiles

PARAMS = runs.REPO_ROOT / "params" / "ablations.yaml"


def committed_run_dirs(datasets=amazon.DATASETS) -> list:
    """Run folders with a metrics.json under every runs folder of the repository (outputs/runs*), of the
    Amazon datasets (a checkout's synthetic smoke runs are not results)."""
    return sorted(p.parent for name in datasets
                  for p in runs.REPO_ROOT.glob(f"outputs/runs*/{name}/*/seed*/metrics.json"))


def test_every_committed_run_is_done_under_todays_configs():
    found = committed_run_dirs()
    if not found:
        pytest.skip("no committed runs in this checkout")
    expected = {}   # run folder -> the config hashes the params file's profiles give it today
    for grid in load_profiles(PARAMS).values():
        for c in grid.expand():
            if c.dataset in amazon.DATASETS:
                expected.setdefault(runs.run_dir_for(grid.runs_root, c.dataset, c.variant, c.seed), set()).add(
                    c.config_hash())
    orphans = [str(d.relative_to(runs.REPO_ROOT)) for d in found if d not in expected]
    assert not orphans, f"committed runs that no profile of {PARAMS.name} expands to: {orphans[:5]}"
    renamed = []
    for d in found:
        metrics = json.loads((d / "metrics.json").read_text())
        hashes = expected[d]
        if metrics["config_hash"] not in hashes or not runs.is_done(d, metrics["config_hash"]):
            renamed.append(f"{d.relative_to(runs.REPO_ROOT)}: {metrics['config_hash']} not in {sorted(hashes)}")
    assert not renamed, f"{len(renamed)} of {len(found)} committed runs would be trained again: {renamed[:5]}"


def test_each_committed_runs_per_user_ranks_give_its_test_metrics():
    found = committed_run_dirs()
    if not found:
        pytest.skip("no committed runs in this checkout")
    for d in found:
        metrics = json.loads((d / "metrics.json").read_text())
        per_user = runs.load_per_user(d)
        where = d.relative_to(runs.REPO_ROOT)
        assert per_user["user"].is_unique, where
        assert len(per_user) == metrics["num_test_users"], where
        assert per_user["rank"].between(0, 10).all(), where
        recomputed = metrics_from_ranks(per_user["rank"].to_numpy())
        for name, value in metrics["test"].items():
            assert math.isclose(recomputed[name], value, rel_tol=1e-12, abs_tol=1e-15), (where, name, recomputed[name], value)
