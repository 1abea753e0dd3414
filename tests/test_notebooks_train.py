"""notebooks/train.ipynb: a papermill parameters cell, committed clean, and it runs with its defaults."""
import json
import subprocess

import nbformat
import papermill as pm
import pytest

from gbla import runs
from gbla.grid import load_grid

NOTEBOOK = runs.REPO_ROOT / "notebooks" / "train.ipynb"


def test_first_code_cell_is_the_parameters_cell():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    first_code = next(c for c in nb.cells if c.cell_type == "code")
    assert "parameters" in first_code.metadata.get("tags", [])
    declared = pm.inspect_notebook(str(NOTEBOOK))
    for name in ("dataset", "variant", "seeds", "params_file", "profile", "processed_root", "runs_root", "device",
                 "backend", "max_epochs", "patience", "expected_config_hashes", "stop_at"):
        assert name in declared, name
    assert nb.metadata["kernelspec"]["name"] == "python3"


def test_committed_clean():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, "commit the notebook without outputs"


@pytest.mark.timeout(300)
def test_runs_with_its_defaults_and_refuses_an_unexpected_config(tmp_path, monkeypatch):
    """As a user would run it (defaults: synthetic data, smoke profile, two seeds), only cut to one epoch."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the kernel is a subprocess: one thread each, the cores not oversubscribed
    out = tmp_path / "train.ipynb"
    pm.execute_notebook(str(NOTEBOOK), str(out), parameters={"runs_root": str(tmp_path / "runs"), "max_epochs": 1,
                                                             "progress": False},
                        kernel_name="python3", cwd=str(tmp_path), progress_bar=False)
    defaults = pm.inspect_notebook(str(NOTEBOOK))
    dataset, variant = (defaults[k]["default"].strip('"') for k in ("dataset", "variant"))
    profile = defaults["profile"]["default"].strip('"')
    seeds = json.loads(defaults["seeds"]["default"])
    assert len(seeds) == 2
    for seed in seeds:
        expected = load_grid(runs.REPO_ROOT / "params" / "ablations.yaml", profile).run_config(
            dataset, variant, seed, train_overrides={"max_epochs": 1})
        run_dir = runs.run_dir_for(tmp_path / "runs", dataset, variant, seed)
        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert metrics["config_hash"] == expected.config_hash() and metrics["epochs_trained"] == 1
        assert metrics["profile"] == profile and metrics["group_seeds"] == seeds
    assert not list((tmp_path / "runs").rglob("checkpoint-*.pt"))  # removed once the results are saved
    executed = nbformat.read(out, as_version=4)
    outputs = [o for c in executed.cells if c.cell_type == "code" for o in c.outputs]
    assert any("image/png" in o.get("data", {}) for o in outputs), "learning curves not drawn"
    assert any("recall@10" in o.get("data", {}).get("text/html", "") for o in outputs), "metric table not shown"

    with pytest.raises(pm.PapermillExecutionError, match="the grid expected 000000000000"):
        pm.execute_notebook(str(NOTEBOOK), str(tmp_path / "refused.ipynb"),
                            parameters={"runs_root": str(tmp_path / "runs2"),
                                        "expected_config_hashes": {s: "0" * 12 for s in seeds}},
                            kernel_name="python3", cwd=str(tmp_path), progress_bar=False)
    assert not (tmp_path / "runs2").exists()


def test_a_hand_run_writes_to_the_scratch_folder_by_default():
    defaults = pm.inspect_notebook(str(NOTEBOOK))
    assert defaults["runs_root"]["default"] == "None"
    assert runs.SCRATCH_RUNS_ROOT.startswith("outputs/scratch")
    ignored = subprocess.run(["git", "check-ignore", "-q", f"{runs.SCRATCH_RUNS_ROOT}/x/y/seed0/metrics.json"],
                             cwd=runs.REPO_ROOT)
    assert ignored.returncode == 0, "the scratch folder must be git-ignored"
