"""The ablation grid: params parsing (with errors that point at file, line and key), expansion, Dask
dispatch, and the smoke grid end to end through papermill (run, skip, redo, failure, reports)."""
import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import nbformat
import pandas as pd
import pytest
import yaml

from gbla import grid as G
from gbla import datasets, runs
from gbla.config import GBLAOptions

PARAMS = runs.REPO_ROOT / "params" / "ablations.yaml"
ISSUE_VARIANTS = ["sa", "sa-causal", "hybrid", "hybrid-no-conv", "hybrid-no-gate", "hybrid-rmsnorm",
                  "hybrid-denominator", "hybrid-plain-la", "hybrid-recency-gate", "ratio-1to1", "ratio-1to3",
                  "all-gbla", "sa-6L", "hybrid-1to2-6L"]


# ------------------------------------------------------------------------------ the real params file

def test_full_profile_is_the_paper_grid():
    g = G.load_grid(PARAMS, "full")
    configs = g.expand()
    assert len(configs) == 210
    assert g.datasets == ["beauty", "sports", "toys"] and g.seeds == [0, 1, 2, 3, 4]
    assert g.variant_names == ISSUE_VARIANTS
    assert len({c.config_hash() for c in configs}) == 210
    # file order is run order: per dataset the 12 four-layer variants first, then the six-layer pair
    beauty = [c.variant for c in configs if c.dataset == "beauty" and c.seed == 0]
    assert beauty == ISSUE_VARIANTS and beauty[-2:] == ["sa-6L", "hybrid-1to2-6L"]
    by_variant = {c.variant: c.model for c in configs if c.dataset == "beauty" and c.seed == 0}
    assert by_variant["sa"].encoder_layout == ("sa",) * 4
    assert by_variant["sa-causal"].encoder_layout == ("sa_causal",) * 4
    assert by_variant["hybrid"].encoder_layout == ("sa", "gbla", "gbla", "sa")
    assert by_variant["hybrid"].gbla == GBLAOptions()  # conv, token gate, gated RMSNorm
    assert by_variant["hybrid-plain-la"].gbla == GBLAOptions(use_conv1d=False, gate="none", normalization="none")
    assert by_variant["hybrid-no-gate"].gbla == GBLAOptions(gate="none")
    assert by_variant["hybrid-recency-gate"].gbla == GBLAOptions(gate="recency")
    assert by_variant["ratio-1to3"].encoder_layout == ("sa", "gbla", "gbla", "gbla")
    assert by_variant["all-gbla"].encoder_layout == ("gbla",) * 4
    assert by_variant["sa-6L"].encoder_layout == ("sa",) * 6
    assert by_variant["hybrid-1to2-6L"].encoder_layout == ("sa", "gbla", "gbla") * 2
    assert by_variant["hybrid-1to2-6L"].gbla == GBLAOptions()
    m = by_variant["sa"]  # GRID's TIGER size
    assert (m.d_model, m.num_heads, m.head_dim, m.d_ff, m.num_decoder_layers, m.dropout) == (128, 6, 64, 1024, 4, 0.15)


def test_smoke_profile_is_tiny_and_synthetic():
    g = G.load_grid(PARAMS, "smoke")
    configs = g.expand()
    assert {c.dataset for c in configs} == {"synthetic"} and 2 <= len(configs) <= 8
    assert all(c.model.d_model <= 64 and c.train.max_epochs <= 5 for c in configs)
    assert g.dask["gpus"] == [] and g.runtime["device"] == "cpu"
    assert G.plan_cluster(g, "local").kind == "local-cpu"


def _dump(tmp_path, data, name="params.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_adding_a_variant_is_one_entry_and_changes_nothing_else(tmp_path):
    data = yaml.safe_load(PARAMS.read_text())
    before = {(c.dataset, c.variant, c.seed): c.config_hash() for c in G.load_grid(PARAMS, "full").expand()}
    data["variants"].append({"name": "hybrid-k2", "encoder_layout": ["sa", "gbla", "gbla", "sa"],
                             "gbla": {"conv_kernel_size": 2}})
    after = G.load_grid(_dump(tmp_path, data), "full").expand()
    assert len(after) == 225
    assert {(c.dataset, c.variant, c.seed): c.config_hash() for c in after if c.variant != "hybrid-k2"} == before
    assert {c.model.gbla.conv_kernel_size for c in after if c.variant == "hybrid-k2"} == {2}


def test_changing_one_variant_changes_only_its_hashes(tmp_path):
    data = yaml.safe_load(PARAMS.read_text())
    before = {(c.variant, c.seed): c.config_hash() for c in G.load_grid(PARAMS, "smoke").expand()}
    next(v for v in data["variants"] if v["name"] == "hybrid")["gbla"] = {"gate": "recency"}
    after = {(c.variant, c.seed): c.config_hash() for c in G.load_grid(_dump(tmp_path, data), "smoke").expand()}
    changed = {k for k in before if before[k] != after[k]}
    assert changed == {("hybrid", 0), ("hybrid", 1)}


# ------------------------------------------------------------------------------ errors name file, line, key

BASE = textwrap.dedent("""\
    datasets: [synthetic]
    seeds: [0, 1]
    variants:
      - name: sa
        encoder_layout: [sa, sa]
      - name: hyb
        encoder_layout: [sa, gbla]
        gbla: {gate: token}
    train:
      lr: 0.001
    profiles:
      smoke:
        variants: [sa, hyb]
    """)


@pytest.mark.parametrize("old,new,line,key,message", [
    ("[sa, gbla]", "[sa, gbal]", 7, "variants[1].encoder_layout[1]", "unknown layer type 'gbal'"),
    ("{gate: token}", "{gat: token}", 8, "variants[1].gbla.gat", "unknown GBLA option 'gat'"),
    ("{gate: token}", "{gate: sometimes}", 8, "variants[1].gbla", "gate must be one of"),
    ("{gate: token}", "{use_conv1d: maybe}", 8, "variants[1].gbla.use_conv1d", "must be bool"),
    ("    encoder_layout: [sa, sa]\n", "", 4, "variants[0].sa", "missing required field 'encoder_layout'"),
    ("  - name: sa\n", "  - nam: sa\n", 4, "variants[0].nam", "unknown variant field 'nam'"),
    ("[sa, hyb]", "[sa, hybrid]", 13, "profiles.smoke.variants[1]", "unknown variant 'hybrid'"),
    ("lr: 0.001", "lr: fast", 10, "train.lr", "must be float"),
    ("[synthetic]", "[synthetc]", 1, "datasets[0]", "unknown dataset 'synthetc'; known datasets: beauty, sports, "
                                                    "toys, synthetic"),
    ("lr: 0.001", "learning_rate: 0.001", 10, "train.learning_rate", "unknown train field"),
    ("seeds: [0, 1]", "seeds: [0, one]", 2, "seeds[1]", "non-negative integer"),
    ("seeds: [0, 1]", "seeds: [0, 0]", 2, "seeds", "duplicate seeds"),
    ("    variants: [sa, hyb]\n", "    variants: [sa, hyb]\n    model: {d_modle: 8}\n", 14,
     "profiles.smoke.model.d_modle", "unknown model field"),
    ("    variants: [sa, hyb]\n", "    variants: [sa, hyb]\n    model: {encoder_layout: [sa]}\n", 14,
     "profiles.smoke.model.encoder_layout", "set it per variant"),
    ("train:\n", "seeds: [3]\ntrain:\n", 9, "seeds", "duplicate key (first at line 2)"),
    ("  - name: sa\n    encoder_layout: [sa, sa]\n", "  - name: sa\n    encoder_layout: [sa]\n    gbla: {}\n", 6,
     "variants[0].gbla", "has no gbla layer"),
])
def test_params_errors_name_file_line_and_key(tmp_path, old, new, line, key, message):
    assert old in BASE
    path = tmp_path / "bad.yaml"
    path.write_text(BASE.replace(old, new, 1))
    with pytest.raises(G.ParamsError) as err:
        G.load_grid(path, "smoke")
    text = str(err.value)
    assert text.startswith(f"{path}:{line}: {key}:"), text
    assert message in text, text


def test_base_params_parse_and_other_errors(tmp_path):
    path = tmp_path / "ok.yaml"
    path.write_text(BASE)
    g = G.load_grid(path, "smoke")
    assert [c.variant for c in g.expand()] == ["sa", "sa", "hyb", "hyb"]
    with pytest.raises(G.ParamsError, match=r"no profile 'full'; defined: smoke"):
        G.load_grid(path, "full")
    with pytest.raises(G.ParamsError, match="params file not found"):
        G.load_grid(tmp_path / "absent.yaml", "smoke")
    path.write_text("datasets: [a\n")
    with pytest.raises(G.ParamsError, match=f"{path}: not valid YAML"):
        G.load_grid(path, "smoke")


def test_profiles_sharing_a_runs_folder_must_agree_on_shared_runs(tmp_path):
    # a second profile training `hyb` with other settings into the same runs folder would replace the first
    # profile's finished runs (a run folder is named by dataset/variant/seed, not by config)
    clash = BASE + "  longer:\n    variants: [hyb]\n    seeds: [1]\n    train: {patience: 20}\n"
    path = tmp_path / "clash.yaml"
    path.write_text(clash)
    with pytest.raises(G.ParamsError) as err:
        G.load_grid(path, "smoke")  # whichever profile is asked for: the file itself is inconsistent
    text = str(err.value)
    assert text.startswith(f"{path}:14: profiles.longer:"), text
    assert "synthetic/hyb/seed1" in text and "outputs/runs/synthetic/hyb/seed1" in text
    smoke = G.load_grid(_write(tmp_path, "ok.yaml", BASE), "smoke")
    assert smoke.run_config("synthetic", "hyb", 1).config_hash() in text
    assert "runs_root: outputs/runs-longer" in text
    # the same profile with a runs folder of its own loads, and keeps its own settings there
    own = clash + "    runtime: {runs_root: outputs/runs-longer}\n"
    longer = G.load_grid(_write(tmp_path, "own.yaml", own), "longer")
    assert longer.runs_root.name == "runs-longer" and longer.expand()[0].train.patience == 20
    # profiles that share runs with identical configs (one narrows the other) may share the folder
    narrow = BASE + "  only-hyb:\n    variants: [hyb]\n    seeds: [1]\n"
    assert G.load_grid(_write(tmp_path, "narrow.yaml", narrow), "only-hyb").runs_root == smoke.runs_root


def test_shipped_profiles_keep_their_runs_apart():
    full = G.load_grid(PARAMS, "full")
    check = G.load_grid(PARAMS, "multi-gpu-check")  # Beauty sa/hybrid with 3 epochs: not the full grid's runs
    assert check.runs_root != full.runs_root
    assert check.run_config("beauty", "sa", 0).config_hash() != full.run_config("beauty", "sa", 0).config_hash()
    # the stopping-rule sensitivity: the full grid's sa and hybrid runs with a patience of 20, nothing else
    longer = G.load_grid(PARAMS, "patience-20")
    assert longer.runs_root not in (full.runs_root, check.runs_root)
    assert {(c.dataset, c.variant, c.seed) for c in longer.expand()} == {
        (c.dataset, c.variant, c.seed) for c in full.expand(variants=["sa", "hybrid"])}
    for c in longer.expand():
        ours, theirs = c.to_dict(), full.run_config(c.dataset, c.variant, c.seed).to_dict()
        assert (ours["train"].pop("patience"), theirs["train"].pop("patience")) == (20, 10)
        assert ours == theirs


def _write(folder, name, text):
    path = folder / name
    path.write_text(text)
    return path


def test_cli_reports_params_errors_without_a_traceback(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(BASE.replace("[sa, gbla]", "[sa, linear]"))
    assert G.main(["--params", str(path), "--profile", "smoke", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}:7: variants[1].encoder_layout[1]: unknown layer type 'linear'")


def test_dry_run_lists_what_would_run(tmp_path, capsys):
    data = yaml.safe_load(PARAMS.read_text())
    data["runtime"]["runs_root"] = str(tmp_path / "runs")
    path = _dump(tmp_path, data)
    assert G.main(["--params", str(path), "--profile", "full", "--variants", "sa", "all-gbla", "--seeds", "0",
                   "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "6 runs = 3 datasets x 2 variants x 1 seeds; 0 done, 6 to run" in out
    assert "would run toys/all-gbla/seed0" in out
    assert not (tmp_path / "runs").exists()
    # groups run in the order the options name them: all-gbla before sa, toys before beauty
    assert G.main(["--params", str(path), "--profile", "full", "--datasets", "toys", "beauty", "--variants",
                   "all-gbla", "sa", "--seeds", "0", "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    order = [line.split("would run ")[1].split()[0] for line in lines if "would run" in line]
    assert order == ["toys/all-gbla/seed0", "toys/sa/seed0", "beauty/all-gbla/seed0", "beauty/sa/seed0"]


def test_a_result_trained_on_other_data_is_not_done(tmp_path):
    """Same config, other processed data (e.g. rebuilt with another embedding model): stale, run again."""
    from gbla.train import RunResult

    g = G.load_grid(PARAMS, "smoke")
    cfg = g.expand()[0]
    current = datasets.expected_data_fingerprint(cfg.dataset, synthetic=g.synthetic)
    result = RunResult(config=cfg, config_hash=cfg.config_hash(), device="cpu", wall_time_s=1.0, epochs_trained=1,
                       best_epoch=1, history=[], valid_metrics=dict.fromkeys(runs.METRIC_NAMES, 0.1),
                       test_metrics=dict.fromkeys(runs.METRIC_NAMES, 0.1),
                       test_per_user={"user": [0], "target": [1], "rank": [1]}, timings={})
    run_dir = runs.run_dir_for(tmp_path, cfg.dataset, cfg.variant, cfg.seed)
    logged = []
    for fingerprint, done in ((current, 1), ("other-data", 0)):
        runs.save_run_result(result, run_dir, data_fingerprint=fingerprint, commit="c")
        logged.clear()
        plan = G.run_grid(G.load_grid(PARAMS, "smoke"), datasets=[cfg.dataset], variants=[cfg.variant],
                          seeds=[cfg.seed], dry_run=True, overrides={"runs_root": str(tmp_path)}, log=logged.append)
        assert plan["done"] == done and plan["to_run"] == 1 - done
    assert any("trained on other data" in line for line in logged)
    assert not any("another config" in line for line in logged)
    # a finished run of another config (the settings changed): to be replaced, and said so beforehand
    longer = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, patience=cfg.train.patience + 5))
    runs.save_run_result(dataclasses.replace(result, config=longer, config_hash=longer.config_hash()), run_dir,
                         data_fingerprint=current, commit="c")
    logged.clear()
    plan = G.run_grid(G.load_grid(PARAMS, "smoke"), datasets=[cfg.dataset], variants=[cfg.variant],
                      seeds=[cfg.seed], dry_run=True, overrides={"runs_root": str(tmp_path)}, log=logged.append)
    assert plan["to_run"] == 1
    [line] = [line for line in logged if "another config" in line]
    assert line.startswith("1 runs hold") and f"{longer.config_hash()} -> {cfg.config_hash()}" in line


def test_new_runs_on_other_data_than_a_datasets_finished_runs_are_refused(tmp_path, capsys):
    """Finished runs of one variant on other processed data (a rebuild on another CPU, say): training
    another variant of that dataset would mix semantic IDs in the report, so the grid stops before
    dispatching anything, names both fingerprints and the runs, and goes on only with --accept-new-data."""
    from gbla.train import RunResult

    g = G.load_grid(PARAMS, "smoke")
    finished, other = g.expand()[0], next(c for c in g.expand() if c.variant != g.expand()[0].variant)
    current = datasets.expected_data_fingerprint(finished.dataset, synthetic=g.synthetic)
    result = RunResult(config=finished, config_hash=finished.config_hash(), device="cpu", wall_time_s=1.0,
                       epochs_trained=1, best_epoch=1, history=[], valid_metrics=dict.fromkeys(runs.METRIC_NAMES, 0.1),
                       test_metrics=dict.fromkeys(runs.METRIC_NAMES, 0.1),
                       test_per_user={"user": [0], "target": [1], "rank": [1]}, timings={})
    runs.save_run_result(result, runs.run_dir_for(tmp_path, finished.dataset, finished.variant, finished.seed),
                         data_fingerprint="0123456789ab", commit="c")
    select = dict(datasets=[other.dataset], variants=[other.variant], seeds=[other.seed],
                  overrides={"runs_root": str(tmp_path)}, aggregate=False)
    with pytest.raises(G.DataMismatchError) as refused:
        G.run_grid(G.load_grid(PARAMS, "smoke"), log=lambda _: None, **select)
    message = str(refused.value)
    assert f"fingerprint {current}" in message and "0123456789ab: 1 runs" in message
    assert f"{finished.variant}/seed{finished.seed}" in message and "--accept-new-data" in message
    assert "--semantic-ids" not in message    # no committed code file for this dataset: no such rebuild offered
    assert "--semantic-ids outputs/data/semantic_ids --force" in G.describe_data_mismatch(
        "sports", "x", {"y": ["sa/seed0"]}, Path("p"))   # sports has one
    assert not runs.run_dir_for(tmp_path, other.dataset, other.variant, other.seed).exists()
    # a dry run says the same as a warning
    logged = []
    G.run_grid(G.load_grid(PARAMS, "smoke"), dry_run=True, log=logged.append, **select)
    assert any(line.startswith("warning: ") and "0123456789ab" in line for line in logged)
    # the command line: exit 2, the message on stderr
    args = ["--params", str(PARAMS), "--profile", "smoke", "--datasets", other.dataset, "--variants", other.variant,
            "--seeds", str(other.seed), "--runs-root", str(tmp_path), "--no-aggregate"]
    assert G.main(args) == 2
    assert "--accept-new-data" in capsys.readouterr().err
    # accepted: dispatched (a zero time budget starts no group, so nothing trains here)
    summary = G.run_grid(G.load_grid(PARAMS, "smoke"), accept_new_data=True, time_budget_s=0, log=lambda _: None,
                         **select)
    assert summary["counts"]["not_run"] == 1


def test_unknown_dataset_on_the_command_line_lists_the_known_ones(capsys):
    assert G.main(["--params", str(PARAMS), "--profile", "full", "--datasets", "beuty", "--dry-run"]) == 2
    captured = capsys.readouterr()
    assert captured.err.strip() == "error: unknown dataset 'beuty'; known datasets: beauty, sports, toys, synthetic"
    assert "make data" not in captured.out + captured.err


# ------------------------------------------------------------------------------ clusters

def test_cluster_plans():
    g = G.load_grid(PARAMS, "full")
    plan = G.plan_cluster(g, "local", gpus=["0", "1", "2"])
    assert plan.kind == "local-gpu" and plan.slots == 3 * g.dask["runs_per_gpu"]
    assert "CUDA_VISIBLE_DEVICES 0,1,2" in plan.description
    assert G.plan_cluster(g, "local", gpus=[]).slots == g.dask["cpu_workers"] * g.dask["runs_per_cpu_worker"]


def test_slurm_path_builds_a_gpu_job_script():
    """The Slurm path cannot run here; check the job each worker would be submitted as."""
    from dask_jobqueue import SLURMCluster

    g = G.load_grid(PARAMS, "full")
    kwargs, jobs = G.slurm_cluster_kwargs(g.dask)
    assert jobs == g.dask["slurm"]["jobs"]
    cluster = SLURMCluster(**kwargs)
    try:
        script = cluster.job_script()
    finally:
        cluster.close()
    assert "#SBATCH --gres=gpu:1" in script
    assert f"#SBATCH --cpus-per-task={g.dask['slurm']['job_cpu']}" in script
    assert f"--nthreads {g.dask['runs_per_gpu']}" in script  # concurrent runs per GPU job
    assert sys.executable in script


@pytest.mark.timeout(120)
def test_local_gpu_cluster_pins_one_device_per_worker():
    """One worker per GPU, each seeing only its device (CPU-only here: the pinning is what is checked)."""
    g = G.load_grid(PARAMS, "full")
    g.dask["runs_per_gpu"] = 2
    cluster, client = G.start_cluster(g, "local", gpus=["3", "5"])
    try:
        seen = client.run(lambda: os.environ.get("CUDA_VISIBLE_DEVICES"))
        threads = client.nthreads()
    finally:
        client.close()
        cluster.close()
    assert sorted(seen.values()) == ["3", "5"]
    assert sorted(threads.values()) == [2, 2]


@pytest.mark.timeout(120)
def test_local_cluster_does_not_warn_when_port_8787_is_taken():
    """Without bokeh the dashboard was "off" but the scheduler still served HTTP on 8787, so a second
    grid (or anything else on 8787) printed "Port 8787 is already in use" into every log."""
    import socket
    import warnings

    holder = socket.socket()
    try:
        holder.bind(("127.0.0.1", 8787))
        holder.listen()
    except OSError:
        pass  # already taken by something else: just as good for this test
    try:
        g = G.load_grid(PARAMS, "smoke")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            cluster, client = G.start_cluster(g, "local", gpus=[])
            client.close()
            cluster.close()
    finally:
        holder.close()
    assert not [w for w in caught if "already in use" in str(w.message)]


def probe_notebook(path, parameters: str, body: str):
    """A two-cell notebook at `path`: a `parameters` cell and one code cell."""
    params = nbformat.v4.new_code_cell(parameters)
    params.metadata["tags"] = ["parameters"]
    nbformat.write(nbformat.v4.new_notebook(cells=[params, nbformat.v4.new_code_cell(body)], metadata={"kernelspec": {
        "name": "python3", "display_name": "Python 3", "language": "python"}}), path)
    return path


def printed(path) -> str:
    """What an executed notebook's cells printed, in order."""
    nb = nbformat.read(str(path), as_version=4)
    return "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))


def kernel_files(folder: Path, pattern: str) -> set:
    """The report kernels' private socket folders ("gbla-kernel-*") or sockets ("gbla-kernel-*/k-*")."""
    return set(folder.glob(pattern))


def render_probe_report(tmp_path, source: str) -> dict:
    """run_reports() of the smoke grid over a one-cell probe notebook; its result, checked ok."""
    nb_path = probe_notebook(tmp_path / "probe.ipynb", "runs_root = None", source)
    g = G.load_grid(PARAMS, "smoke")
    g.runtime["reports_root"] = str(tmp_path / "reports")
    [result] = G.run_reports(g, [str(nb_path)], log=lambda *a: None)
    assert result["status"] == "ok", result
    return result


@pytest.mark.timeout(180)
def test_executed_notebooks_carry_no_plumbing_warnings(tmp_path, capfd, private_tempdir):
    """A rendered report shows results: no "IProgress not found" (tqdm.auto without ipywidgets) in
    its outputs, no "Kernel is running over TCP without encryption" from its kernel."""
    result = render_probe_report(
        tmp_path, "import warnings\nwarnings.simplefilter('always')\nimport gbla.train\nprint('ok')")
    shown = printed(result["ipynb"])
    assert "ok" in shown and "IProgress" not in shown and "Warning" not in shown, shown
    err = capfd.readouterr().err
    assert "without encryption" not in err and "already in use" not in err, err
    assert not kernel_files(private_tempdir, "gbla-kernel-*/k-*")  # its kernel's sockets are cleaned up


@pytest.mark.timeout(180)
def test_reports_remove_their_kernels_socket_folder_when_its_own_cleanup_is_skipped(
        tmp_path, monkeypatch, private_tempdir):
    """A kernel stopped by a shutdown timeout skips the manager's clean-up; the folder goes anyway."""
    from jupyter_client.manager import AsyncKernelManager

    real = G.ipc_kernel_manager_class

    made = []

    def leaky_manager_class():
        class Leaky(real()):
            async def _async_cleanup_resources(self, restart: bool = False) -> None:
                await AsyncKernelManager._async_cleanup_resources(self, restart=restart)   # leaves the folder

            cleanup_resources = _async_cleanup_resources
        made.append(Leaky)
        return Leaky

    monkeypatch.setattr(G, "ipc_kernel_manager_class", leaky_manager_class)
    render_probe_report(tmp_path, "print('ok')")
    [manager] = made
    assert manager.socket_folders and all(Path(f).parent == private_tempdir for f in manager.socket_folders)
    assert not kernel_files(private_tempdir, "gbla-kernel-*")


@pytest.mark.timeout(240)
def test_reports_are_executed_again_only_when_what_they_read_changed(tmp_path, private_tempdir):
    """A report whose notebook, params, package and runs are those it was rendered from is left as it
    is; a changed run, a missing HTML file, `force` or an earlier failure execute it again. A paused
    group's checkpoint is no input."""
    executions = tmp_path / "executions"
    nb_path = probe_notebook(tmp_path / "probe.ipynb", "runs_root = None",
                             f"open({str(executions)!r}, 'a').write('x')\nprint('ok')")
    runs = tmp_path / "runs"
    (runs / "synthetic" / "sa" / "seed0").mkdir(parents=True)
    metrics = runs / "synthetic" / "sa" / "seed0" / "metrics.json"
    metrics.write_text('{"test": {"recall@10": 0.1}}')
    g = G.load_grid(PARAMS, "smoke")
    g.runtime["reports_root"] = str(tmp_path / "reports")
    g.runtime["runs_root"] = str(runs)

    def render(**kwargs):
        [result] = G.run_reports(g, [str(nb_path)], log=lambda *a: None, **kwargs)
        return result["status"], len(executions.read_text())

    assert render() == ("ok", 1)
    out = tmp_path / "reports" / "probe-smoke.ipynb"
    rendered = out.read_bytes()
    assert G.recorded_report_inputs(out) == G.report_inputs_key(g, nb_path, {"runs_root": str(runs)})
    assert printed(out) == "ok\n"
    assert render() == ("up-to-date", 1)
    assert out.read_bytes() == rendered
    (runs / "synthetic" / "sa" / "checkpoint-0123456789ab.pt").write_bytes(b"paused group")
    (runs / f"summary-{g.profile}.json").write_text("{}")   # the grid's own record of its last command
    assert render() == ("up-to-date", 1)
    metrics.write_text('{"test": {"recall@10": 0.2}}')
    assert render() == ("ok", 2)
    (tmp_path / "reports" / "probe-smoke.html").unlink()
    assert render() == ("ok", 3)
    assert render(force=True) == ("ok", 4)
    assert render() == ("up-to-date", 4)

    failing = probe_notebook(tmp_path / "failing.ipynb", "runs_root = None",
                             f"open({str(executions)!r}, 'a').write('x')\nraise RuntimeError('no')")
    for expected in (5, 6):   # a failed report records no inputs: the next command tries it again
        [result] = G.run_reports(g, [str(failing)], log=lambda *a: None)
        assert (result["status"], len(executions.read_text())) == ("failed", expected)


@pytest.mark.timeout(180)
def test_a_report_killed_with_sigterm_removes_its_kernels_socket_folder(tmp_path, private_tempdir):
    """run_reports called from Python (not through `python -m gbla.grid`) and stopped by SIGTERM while
    its notebook runs: the kernel's socket folder is removed on the way out."""
    started = tmp_path / "started"
    nb_path = probe_notebook(tmp_path / "probe.ipynb", "runs_root = None",
                             f"import time\nopen({str(started)!r}, 'w').write('x')\ntime.sleep(120)")
    script = ("from gbla import grid as G\n"
              f"g = G.load_grid({str(PARAMS)!r}, 'smoke')\n"
              f"g.runtime['reports_root'] = {str(tmp_path / 'reports')!r}\n"
              f"G.run_reports(g, [{str(nb_path)!r}])\n")
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=G.REPO_ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while not started.exists():
            assert proc.poll() is None and time.time() < deadline, proc.stdout.read() if proc.poll() is not None else "no start"
            time.sleep(0.2)
        assert kernel_files(private_tempdir, "gbla-kernel-*")   # the kernel is running
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0 and "KeyboardInterrupt" in output, output
    assert not kernel_files(private_tempdir, "gbla-kernel-*")


@pytest.mark.timeout(180)
def test_reports_get_the_grids_processed_root(tmp_path):
    """A grid with a processed_root hands it to a report notebook that declares it (where the report
    reads the test users' histories); one without leaves the notebook's default."""
    nb_path = probe_notebook(tmp_path / "probe.ipynb", "processed_root = None",
                             "print('processed_root:', processed_root)")
    shown = []
    for root in (str(tmp_path / "processed"), None):
        g = G.load_grid(PARAMS, "smoke")
        g.runtime["reports_root"] = str(tmp_path / "reports")
        g.runtime["processed_root"] = root
        [result] = G.run_reports(g, [str(nb_path)], log=lambda *a: None)
        assert result["status"] == "ok", result
        shown.append(printed(result["ipynb"]).strip())
    assert shown == [f"processed_root: {tmp_path / 'processed'}", "processed_root: None"]


@pytest.mark.timeout(180)
def test_reports_get_paths_inside_the_repository_relative(tmp_path):
    """The grid's runs folder and params file inside the repository reach a report as paths from its
    root (what the rendered report shows is the same on every checkout); the notebook runs in the
    reports folder, and the package resolves them from the root."""
    nb_path = probe_notebook(tmp_path / "probe.ipynb", "runs_root = None\nparams_file = None",
                             "from gbla.common import repo_path\nprint(runs_root, params_file, repo_path(runs_root).is_dir())")
    g = G.load_grid(PARAMS, "full")
    g.runtime["reports_root"] = str(tmp_path / "reports")
    [result] = G.run_reports(g, [str(nb_path)], log=lambda *a: None)
    assert result["status"] == "ok", result
    shown = printed(result["ipynb"]).strip()
    assert shown == "outputs/runs params/ablations.yaml True"


# ------------------------------------------------------------------------------ end to end

REPORT_NB = """\
import pandas as pd
from pathlib import Path
from gbla import runs
frame = runs.collect_runs(runs_root, params_file=params_file, profile=profile)
frame.to_csv(Path(output) / "fake_report_runs.csv", index=False)
frame[["variant", "seed", "status"]]
"""


def _fake_report(path: Path) -> Path:
    params = nbformat.v4.new_code_cell('runs_root = None\nparams_file = None\nprofile = None\noutput = None')
    params.metadata["tags"] = ["parameters"]
    nb = nbformat.v4.new_notebook(cells=[params, nbformat.v4.new_code_cell(REPORT_NB)],
                                  metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                           "language": "python"}})
    nbformat.write(nb, path)
    return path


def _grid_cli(params: Path, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gbla.grid", "--params", str(params), "--profile", "smoke", *args],
                          capture_output=True, text=True, timeout=400, cwd=runs.REPO_ROOT)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """The smoke profile cut to 1 epoch on a small synthetic set, plus a variant that fails on purpose."""
    tmp = tmp_path_factory.mktemp("grid")
    data = yaml.safe_load(PARAMS.read_text())
    data["variants"].append({"name": "broken", "description": "fails on purpose: negative width",
                             "encoder_layout": ["sa"], "model": {"d_model": -1}})
    smoke_profile = data["profiles"]["smoke"]
    smoke_profile["variants"] = ["sa", "hybrid", "broken"]
    smoke_profile["seeds"] = [0, 1]
    smoke_profile["synthetic"] = {"num_users": 120, "num_items": 40, "seed": 0}
    smoke_profile["train"].update(max_epochs=1, max_train_examples=256)
    data["runtime"].update(runs_root=str(tmp / "runs"), reports_root=str(tmp / "reports"),
                           reports=[str(_fake_report(tmp / "fake_report.ipynb")), str(tmp / "absent.ipynb")])
    params = _dump(tmp, data)
    first = _grid_cli(params, "--seeds", "0")  # seed 1 stays missing on purpose
    return {"tmp": tmp, "params": params, "data": data, "first": first, "runs": tmp / "runs"}


@pytest.mark.timeout(400)
def test_smoke_grid_runs_records_the_failure_and_goes_on(smoke):
    first, root = smoke["first"], smoke["runs"]
    assert first.returncode == 1, first.stdout + first.stderr  # 1: a run failed
    assert "3 runs: 0 skipped (done before), 2 ran, 1 failed" in first.stdout, first.stdout
    assert "FAILED synthetic/broken/seed0: RuntimeError" in first.stdout

    g = G.load_grid(smoke["params"], "smoke")
    for variant in ("sa", "hybrid"):
        run_dir = runs.run_dir_for(root, "synthetic", variant, 0)
        cfg = g.run_config("synthetic", variant, 0)
        assert runs.is_done(run_dir, cfg.config_hash())
        metrics = runs.load_run_metrics(run_dir)
        assert set(metrics["test"]) == set(runs.METRIC_NAMES) and metrics["epochs_trained"] == 1
        assert metrics["device"] == "cpu" and metrics["data_fingerprint"] != "unknown"
        assert len(runs.load_per_user(run_dir)) == 120
        # the group's executed notebook (parameters injected) sits in the variant folder
        nb = nbformat.read(run_dir.parent / "train.ipynb", as_version=4)
        assert any("injected-parameters" in c.metadata.get("tags", []) for c in nb.cells)
        assert any(o.get("output_type") == "display_data" and "image/png" in o.get("data", {})
                   for c in nb.cells if c.cell_type == "code" for o in c.outputs), "no learning-curve figure"
        log = (run_dir / "run.log").read_text()
        assert "Executing Cell" in log
        assert "without encryption" not in log   # the kernel talks over private Unix sockets, not TCP

    broken = runs.run_dir_for(root, "synthetic", "broken", 0)
    failure = json.loads((broken / "error.json").read_text())
    assert failure["status"] == "failed" and failure["config_hash"] == g.run_config("synthetic", "broken", 0).config_hash()
    assert "negative dimension" in failure["error"] and "train_group" in failure["traceback"]
    assert (broken.parent / "train.ipynb").is_file() and not (broken / "metrics.json").exists()

    assert not (root / "summary.json").exists()   # one summary per profile, beside the full grid's
    summary = json.loads((root / f"summary-{g.profile}.json").read_text())
    assert summary["counts"] == {"total": 3, "skipped": 0, "ran": 2, "failed": 1, "paused": 0, "not_run": 0}
    assert summary["groups"] == 3
    assert {r["outcome"] for r in summary["runs"]} == {"ran", "failed"}
    assert all(r["worker"] is not None for r in summary["runs"])  # they ran on Dask workers

    # reports: the aggregation notebook gets runs_root/params_file/profile/output, HTML is rendered,
    # a report notebook that does not exist is skipped with a warning
    reports = {Path(r["notebook"]).name: r for r in summary["reports"]}
    assert reports["fake_report.ipynb"]["status"] == "ok" and Path(reports["fake_report.ipynb"]["html"]).is_file()
    assert reports["absent.ipynb"]["status"] == "skipped"
    table = pd.read_csv(smoke["tmp"] / "reports" / "fake_report_runs.csv")
    status = {(r.variant, r.seed): r.status for r in table.itertuples()}
    assert status == {("sa", 0): "ok", ("hybrid", 0): "ok", ("broken", 0): "failed",
                      ("sa", 1): "missing", ("hybrid", 1): "missing", ("broken", 1): "missing"}


@pytest.mark.timeout(400)
def test_rerun_skips_done_and_redoes_deleted_and_changed_runs(smoke):
    root, params = smoke["runs"], smoke["params"]
    sa_dir = runs.run_dir_for(root, "synthetic", "sa", 0)
    hybrid_dir = runs.run_dir_for(root, "synthetic", "hybrid", 0)
    stamp = {d: (d / "metrics.json").stat().st_mtime_ns for d in (sa_dir, hybrid_dir)}

    again = _grid_cli(params, "--seeds", "0", "--variants", "sa", "hybrid", "--no-aggregate")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "2 runs: 2 skipped (done before), 0 ran, 0 failed" in again.stdout
    assert {d: (d / "metrics.json").stat().st_mtime_ns for d in stamp} == stamp  # nothing rewritten

    # delete one run, change the other's config: exactly those two are redone
    for f in sa_dir.iterdir():
        f.unlink()
    sa_dir.rmdir()
    data = smoke["data"]
    next(v for v in data["variants"] if v["name"] == "hybrid")["gbla"] = {"gate": "recency"}
    params.write_text(yaml.safe_dump(data, sort_keys=False))
    new_hash = G.load_grid(params, "smoke").run_config("synthetic", "hybrid", 0).config_hash()
    assert new_hash != runs.load_run_metrics(hybrid_dir)["config_hash"]
    assert G.main(["--params", str(params), "--profile", "smoke", "--seeds", "0", "--variants", "sa", "hybrid",
                   "--dry-run"]) == 0

    redo = _grid_cli(params, "--seeds", "0", "--variants", "sa", "hybrid", "--no-aggregate")
    assert redo.returncode == 0, redo.stdout + redo.stderr
    assert "2 runs: 0 skipped (done before), 2 ran, 0 failed" in redo.stdout, redo.stdout
    assert runs.load_run_metrics(hybrid_dir)["config_hash"] == new_hash
    assert runs.load_run_metrics(hybrid_dir)["config"]["model"]["gbla"]["gate"] == "recency"
    assert runs.is_done(sa_dir, G.load_grid(params, "smoke").run_config("synthetic", "sa", 0).config_hash())


@pytest.mark.timeout(400)
def test_a_partly_done_group_trains_only_its_missing_seeds(smoke):
    """sa/seed0 is done: a grid over seeds 0 and 1 trains sa/seed1 alone (a group of one) and leaves
    seed 0's folder untouched; hybrid trains seeds 0 and 1 ... only what is missing."""
    root, params = smoke["runs"], smoke["params"]
    sa0 = runs.run_dir_for(root, "synthetic", "sa", 0)
    if not (sa0 / "metrics.json").is_file():
        pytest.skip("needs the smoke grid's sa/seed0")
    stamp = (sa0 / "metrics.json").stat().st_mtime_ns
    out = _grid_cli(params, "--seeds", "0", "1", "--variants", "sa", "--no-aggregate")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "2 runs: 1 skipped (done before), 1 ran, 0 failed" in out.stdout, out.stdout
    assert (sa0 / "metrics.json").stat().st_mtime_ns == stamp
    metrics = runs.load_run_metrics(runs.run_dir_for(root, "synthetic", "sa", 1))
    assert metrics["group_seeds"] == [1]
    assert "Executing Cell" in (runs.run_dir_for(root, "synthetic", "sa", 1) / "run.log").read_text()


FAKE_TRAIN_NB = """\
import json
from pathlib import Path
checkpoint = Path(checkpoint)
if mode == "pause":
    print("epoch 1 done")
    checkpoint.write_bytes(b"group state")
elif mode == "pause-after-first-seed":   # as gbla.runs.save_group_results leaves a pause where one seed stopped
    from gbla.runs import checkpoint_path
    print("epoch 1 done")
    seed, config_hash = next(iter(config_hashes.items()))
    (checkpoint.parent / f"seed{seed}").mkdir(exist_ok=True)
    (checkpoint.parent / f"seed{seed}" / "metrics.json").write_text(
        json.dumps({"status": "ok", "config_hash": config_hash}))
    checkpoint_path(checkpoint.parent, list(config_hashes.values())[1:]).write_bytes(b"state of the rest")
else:
    print("epoch 2 done" if checkpoint.is_file() else "epoch 1 and 2 done")
    for seed, config_hash in config_hashes.items():
        (checkpoint.parent / f"seed{seed}").mkdir(exist_ok=True)
        (checkpoint.parent / f"seed{seed}" / "metrics.json").write_text(
            json.dumps({"status": "ok", "config_hash": config_hash}))
    checkpoint.unlink(missing_ok=True)
"""


def _fake_train_notebook(folder):
    """notebooks/train.ipynb's stand-in (FAKE_TRAIN_NB), with a parameters cell papermill fills."""
    params = nbformat.v4.new_code_cell("mode = None\ncheckpoint = None\nconfig_hashes = None\nstop_at = None\n"
                                       "seeds = None")
    params.metadata["tags"] = ["parameters"]
    notebook = folder / "fake_train.ipynb"
    nbformat.write(nbformat.v4.new_notebook(cells=[params, nbformat.v4.new_code_cell(FAKE_TRAIN_NB)], metadata={
        "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}}), notebook)
    return notebook


@pytest.mark.timeout(300)
def test_a_resumed_group_appends_to_the_log_of_its_paused_execution(tmp_path):
    """A stand-in for notebooks/train.ipynb pauses the group (leaving the checkpoint the real notebook
    would name), then finishes it: run.log holds both executions, each under its own header line."""
    notebook = _fake_train_notebook(tmp_path)
    configs = G.load_grid(PARAMS, "smoke").expand(variants=["sa"], seeds=[0, 1])
    vdir = runs.variant_dir_for(tmp_path / "runs", "synthetic", "sa")
    checkpoint = runs.checkpoint_path(vdir, configs)   # as the notebook names it
    vdir.mkdir(parents=True)
    (vdir / "run.log").write_text("log of an earlier group\n")
    (vdir / "checkpoint-0123456789ab.pt").write_bytes(b"another group's")   # not this group's: no resume

    def execute(mode):
        task = G.GroupTask(dataset="synthetic", variant="sa", seeds=(0, 1),
                           config_hashes=tuple(c.config_hash() for c in configs), variant_dir=str(vdir),
                           notebook=str(notebook), cpu_threads=1, stop_at=time.time() + 3600,
                           parameters={"mode": mode, "checkpoint": str(checkpoint),
                                       "config_hashes": {c.seed: c.config_hash() for c in configs}},
                           command=f"python -m gbla.grid --profile smoke  # {mode}")
        return [o["outcome"] for o in G.execute_group(task)]

    assert execute("pause") == ["paused", "paused"]
    assert checkpoint.is_file()
    first = (vdir / "run.log").read_text()
    assert first.startswith("# ") and "log of an earlier group" not in first and "epoch 1 done" in first
    assert execute("finish") == ["ran", "ran"]
    log = (vdir / "run.log").read_text()
    headers = [line for line in log.splitlines() if line.startswith("# ")]
    assert len(headers) == 2 and log.startswith(first)
    assert "synthetic/sa/seeds 0,1" in headers[1] and headers[1].endswith(f"resuming {checkpoint.name}")
    assert log.index("epoch 1 done") < log.index(headers[1]) < log.index("epoch 2 done")
    assert (vdir / "seed1" / "run.log").read_text() == log   # each seed's copy: the whole group's log
    events = [(e["event"], e.get("outcomes")) for e in G.read_dispatch_log(vdir)]
    assert events == [("start", None), ("end", {"0": "paused", "1": "paused"}),
                      ("start", None), ("end", {"0": "ran", "1": "ran"})]
    # each execution's start record names the command that dispatched it
    assert [e.get("command") for e in G.read_dispatch_log(vdir)] == [
        "python -m gbla.grid --profile smoke  # pause", None, "python -m gbla.grid --profile smoke  # finish", None]
    # a group that starts afresh (no checkpoint of its own) writes a new log
    assert not checkpoint.exists()
    assert execute("finish") == ["ran", "ran"]
    log = (vdir / "run.log").read_text()
    assert len([line for line in log.splitlines() if line.startswith("# ")]) == 1 and "epoch 1 and 2 done" in log


@pytest.mark.timeout(300)
def test_a_pause_after_a_seed_stopped_records_it_as_ran_and_the_rest_resume_as_their_own_group(tmp_path):
    """The notebook pauses with seed 0 finished and tested and the checkpoint of seed 1 named by it:
    seed 0 ran, seed 1 paused; the next group (seed 1 alone, what the grid asks for once seed 0 is
    done) finds that checkpoint, resumes and appends to the log."""
    notebook = _fake_train_notebook(tmp_path)
    configs = G.load_grid(PARAMS, "smoke").expand(variants=["sa"], seeds=[0, 1])
    vdir = runs.variant_dir_for(tmp_path / "runs", "synthetic", "sa")

    def execute(mode, group):
        task = G.GroupTask(dataset="synthetic", variant="sa", seeds=tuple(c.seed for c in group),
                           config_hashes=tuple(c.config_hash() for c in group), variant_dir=str(vdir),
                           notebook=str(notebook), cpu_threads=1, stop_at=time.time() + 3600,
                           parameters={"mode": mode, "checkpoint": str(runs.checkpoint_path(vdir, group)),
                                       "config_hashes": {c.seed: c.config_hash() for c in group},
                                       "seeds": [c.seed for c in group]})
        return [o["outcome"] for o in G.execute_group(task)]

    assert execute("pause-after-first-seed", configs) == ["ran", "paused"]
    assert runs.is_done(vdir / "seed0", configs[0].config_hash())
    rest = runs.checkpoint_path(vdir, configs[1:])
    assert rest.is_file() and not runs.checkpoint_path(vdir, configs).exists()
    assert execute("finish", configs[1:]) == ["ran"]
    headers = [line for line in (vdir / "run.log").read_text().splitlines() if line.startswith("# ")]
    assert len(headers) == 2 and headers[1].endswith(f"resuming {rest.name}")
    assert [e.get("outcomes") for e in G.read_dispatch_log(vdir) if e["event"] == "end"] == [
        {"0": "ran", "1": "paused"}, {"1": "ran"}]


@pytest.mark.timeout(300)
def test_a_new_group_keeps_the_notebook_of_an_earlier_group_of_other_seeds(tmp_path):
    """Seeds 5 trained earlier: a group of seeds 0, 1 writes train.ipynb and the earlier notebook
    moves to train-seeds5.ipynb; the same group executed again replaces only its own notebook."""
    notebook = _fake_train_notebook(tmp_path)
    configs = G.load_grid(PARAMS, "smoke").expand(variants=["sa"], seeds=[0, 1])
    vdir = runs.variant_dir_for(tmp_path / "runs", "synthetic", "sa")
    vdir.mkdir(parents=True)
    earlier = {"cells": [], "metadata": {"papermill": {"parameters": {"seeds": [5]}}}, "nbformat": 4,
               "nbformat_minor": 5}
    (vdir / "train.ipynb").write_text(json.dumps(earlier))

    def execute():
        task = G.GroupTask(dataset="synthetic", variant="sa", seeds=(0, 1),
                           config_hashes=tuple(c.config_hash() for c in configs), variant_dir=str(vdir),
                           notebook=str(notebook), cpu_threads=1, stop_at=None,
                           parameters={"mode": "finish", "checkpoint": str(runs.checkpoint_path(vdir, configs)),
                                       "config_hashes": {c.seed: c.config_hash() for c in configs},
                                       "seeds": [0, 1]})
        return [o["outcome"] for o in G.execute_group(task)]

    assert execute() == ["ran", "ran"]
    assert json.loads((vdir / "train-seeds5.ipynb").read_text()) == earlier
    assert runs.notebook_seeds(vdir / "train.ipynb") == [0, 1]
    assert execute() == ["ran", "ran"]
    assert sorted(p.name for p in vdir.glob("train*.ipynb")) == ["train-seeds5.ipynb", "train.ipynb"]


def test_min_start_holds_back_new_groups_but_not_resumed_ones(tmp_path):
    """With 10 minutes of budget left and --min-start 900, a group without a checkpoint is not started
    (it would be paused with work nobody resumes); the same group with its checkpoint resumes."""
    configs = G.load_grid(PARAMS, "smoke").expand(variants=["sa"], seeds=[0, 1])
    vdir = runs.variant_dir_for(tmp_path / "runs", "synthetic", "sa")
    vdir.mkdir(parents=True)

    def task(min_start_s):
        return G.GroupTask(dataset="synthetic", variant="sa", seeds=(0, 1),
                           config_hashes=tuple(c.config_hash() for c in configs), variant_dir=str(vdir),
                           notebook=str(tmp_path / "no-such-notebook.ipynb"), cpu_threads=1,
                           stop_at=time.time() + 600, parameters={}, min_start_s=min_start_s)

    assert [o["outcome"] for o in G.execute_group(task(900))] == ["not-run", "not-run"]
    assert not (vdir / "dispatch.jsonl").exists()   # nothing started, nothing recorded
    checkpoint = task(900).checkpoint()
    checkpoint.write_bytes(b"group state")
    # resumed: it starts (and fails here, the notebook being absent) instead of waiting for a later command
    assert [o["outcome"] for o in G.execute_group(task(900))] == ["failed", "failed"]
    checkpoint.unlink()
    assert [o["outcome"] for o in G.execute_group(task(300))] == ["failed", "failed"]   # enough time left


def test_min_start_reaches_the_tasks_from_the_command_line(tmp_path, monkeypatch):
    seen = {}

    def fake_run_grid(grid, **kwargs):
        seen.update(kwargs)
        return {"counts": {}}
    monkeypatch.setattr(G, "run_grid", fake_run_grid)
    monkeypatch.setattr(G, "check_cpu_cost", lambda *a, **k: None)
    G.main(["--profile", "smoke", "--time-budget", "500", "--min-start", "450", "--no-aggregate"])
    assert seen["time_budget_s"] == 500 and seen["min_start_s"] == 450
    assert seen["command"] == "python -m gbla.grid --profile smoke --time-budget 500 --min-start 450 --no-aggregate"
    G.main(["--profile", "smoke", "--no-aggregate", "--datasets", "synthetic"])
    assert seen["min_start_s"] == G.MIN_GROUP_START_S
    assert seen["command"] == "python -m gbla.grid --profile smoke --no-aggregate --datasets synthetic"
    grid = G.load_grid(PARAMS, "smoke")
    task = G.make_group_task(grid, grid.expand(variants=["sa"], seeds=[0]), 1, command=seen["command"])
    assert task.command == seen["command"]


def test_group_configs_keeps_one_task_per_variant():
    g = G.load_grid(PARAMS, "smoke")
    configs = g.expand(seeds=[0, 1])
    groups = G.group_configs(configs)
    assert [(grp[0].variant, [c.seed for c in grp]) for grp in groups] == [
        (v, [0, 1]) for v in g.variant_names]


# ------------------------------------------------------------------------------ CPU cost guard

def test_real_data_grid_without_a_gpu_needs_allow_cpu(tmp_path, capsys):
    """`--profile full` on a machine without GPUs used to plan 180 CPU runs without a word."""
    processed = tmp_path / "processed"
    (processed / "beauty").mkdir(parents=True)
    (processed / "beauty" / "meta.json").write_text(json.dumps({"stats": {"train_examples": 1000},
                                                                "provenance": {"fingerprint": "fp"}}))
    data = yaml.safe_load(PARAMS.read_text())
    data["runtime"].update(runs_root=str(tmp_path / "runs"), processed_root=str(processed))
    data["train"].update(batch_size=100, max_epochs=7)
    path = _dump(tmp_path, data)
    args = ["--params", str(path), "--profile", "full", "--datasets", "beauty", "--variants", "sa", "hybrid",
            "--seeds", "0", "--gpus", "none"]
    assert G.main(args) == 2
    err = capsys.readouterr().err
    # 2 runs x 7 epochs x ceil(1000 / 100) batches
    assert "2 runs on CPU" in err and "up to 140 training steps" in err and "--allow-cpu" in err, err
    assert not (tmp_path / "runs").exists()                    # nothing started
    assert G.main(args + ["--dry-run"]) == 0                   # a dry run only shows the estimate
    assert "up to 140 training steps" in capsys.readouterr().err
    g = G.load_grid(path, "full")
    configs = g.expand(["beauty"], ["sa"], [0])
    kw = dict(processed_root=processed, device=None, gpus=[], cluster=None, dry_run=False)
    assert G.check_cpu_cost(g, configs, allow_cpu=True, **kw) is None
    assert G.check_cpu_cost(g, configs, allow_cpu=False, **kw)
    assert G.check_cpu_cost(g, configs, allow_cpu=False, **{**kw, "gpus": ["0"]}) is None    # a GPU is there
    assert G.check_cpu_cost(G.load_grid(PARAMS, "smoke"), G.load_grid(PARAMS, "smoke").expand(),
                            allow_cpu=False, **kw) is None                                   # synthetic: cheap


def test_the_written_summary_names_paths_inside_the_repository_relative_to_it(tmp_path):
    """The committed summary of the full grid must read the same on every checkout: its run folders and
    report files inside the repository are relative to its root; paths elsewhere stay absolute."""
    inside = G.REPO_ROOT / "outputs" / "runs" / "beauty" / "sa" / "seed0"
    summary = {"profile": "full", "runs": [{"seed": 0, "run_dir": str(inside), "outcome": "skipped"},
                                           {"seed": 1, "run_dir": str(tmp_path / "seed1"), "outcome": "ran"}],
               "reports": [{"notebook": str(G.REPO_ROOT / "notebooks" / "aggregate.ipynb"),
                            "html": str(G.REPO_ROOT / "outputs" / "reports" / "aggregate-full.html"),
                            "status": "ok"}, {"notebook": "absent.ipynb", "status": "skipped", "html": None}]}
    written = G.summary_as_written(summary)
    assert [r["run_dir"] for r in written["runs"]] == ["outputs/runs/beauty/sa/seed0", str(tmp_path / "seed1")]
    assert written["reports"][0] == {"notebook": "notebooks/aggregate.ipynb",
                                     "html": "outputs/reports/aggregate-full.html", "status": "ok"}
    assert written["reports"][1]["html"] is None and written["runs"][0]["outcome"] == "skipped"
    assert summary["runs"][0]["run_dir"] == str(inside)   # the summary the grid returns is left as it was
