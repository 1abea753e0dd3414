"""notebooks/train.ipynb: a papermill parameters cell, committed clean, and it runs with its defaults."""
import json
import subprocess

import nbformat
import papermill as pm
import pytest

from gbla import datasets, runs
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


@pytest.mark.timeout(600)
def test_a_pause_after_a_seed_stopped_writes_it_and_the_other_seed_resumes_alone(tmp_path, monkeypatch):
    """Seeds 1 and 2 (patience 4): seed 1 stops after epoch 5, seed 2 trains on. The group is paused
    after each of epochs 1-4 (in this process), then the notebook resumes it with a deadline that
    pauses it again after epoch 5: seed 1's folder is written and the checkpoint is named by seed 2
    alone; the notebook for seed 2 (what the grid asks for next) resumes it and finishes."""
    import time

    from gbla.train import train_group

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    seeds, overrides = [1, 2], {"max_epochs": 8, "patience": 4}
    grid = load_grid(runs.REPO_ROOT / "params" / "ablations.yaml", "smoke")
    configs = [grid.run_config("synthetic", "hybrid", s, train_overrides=overrides) for s in seeds]
    data = datasets.load_processed_dataset("synthetic", None, synthetic=grid.synthetic)
    vdir = runs.variant_dir_for(tmp_path / "runs", "synthetic", "hybrid")
    checkpoint = runs.checkpoint_path(vdir, configs)
    vdir.mkdir(parents=True)
    for _ in range(4):
        paused = train_group(configs, data, device="cpu", progress=False, log=lambda *_: None,
                             checkpoint_path=checkpoint, stop_at=time.time())
        assert not paused.finished and not paused.results
    assert paused.epochs_done == 4

    def execute(group_seeds, stop_at):
        pm.execute_notebook(str(NOTEBOOK), str(tmp_path / f"seeds{group_seeds}.ipynb"), kernel_name="python3",
                            cwd=str(tmp_path), progress_bar=False,
                            parameters={"runs_root": str(tmp_path / "runs"), "seeds": group_seeds, "progress": False,
                                        "variant": "hybrid", "stop_at": stop_at, **overrides})

    execute(seeds, time.time())
    seed1, seed2 = (runs.load_run_metrics(runs.run_dir_for(tmp_path / "runs", "synthetic", "hybrid", s)) for s in seeds)
    assert seed1 is not None and seed2 is None, "premise: seed 1 stops after epoch 5, seed 2 does not"
    assert (seed1["epochs_trained"], seed1["config_hash"]) == (5, configs[0].config_hash())
    assert seed1["timings"]["resumed_from_epoch"] == 4 and seed1["group_seeds"] == seeds
    rest = runs.checkpoint_path(vdir, configs[1:])
    assert rest.is_file() and not checkpoint.exists()
    execute([2], None)
    seed2 = runs.load_run_metrics(runs.run_dir_for(tmp_path / "runs", "synthetic", "hybrid", 2))
    assert seed2["epochs_trained"] > 5 and seed2["timings"]["resumed_from_epoch"] == 5
    assert seed2["config_hash"] == configs[1].config_hash() and len(seed2["history"]) == seed2["epochs_trained"]
    assert not list(vdir.glob("checkpoint-*.pt"))
