"""The ablation grid: params/*.yaml -> RunConfigs -> papermill runs dispatched through Dask.

    python -m gbla.grid --profile smoke            # tiny CPU grid on the synthetic dataset
    python -m gbla.grid --profile full --dry-run   # what would run / is done, without running
    python -m gbla.grid --profile full --variants sa hybrid --seeds 0 1

For every (dataset, variant, seed) of the profile: if <runs_root>/<dataset>/<variant>/seed<k>/
metrics.json exists with the same config hash the run is skipped, otherwise notebooks/train.ipynb
is executed with papermill into that folder (log in run.log). A failed run gets error.json next to
its executed notebook and the other runs go on. Then the aggregation notebooks run into
outputs/reports/ (ipynb + HTML) and outputs/runs/summary-<profile>.json says what ran, was skipped, failed.

Runs execute on a Dask cluster: locally one worker per GPU (pinned with CUDA_VISIBLE_DEVICES) with
`runs_per_gpu` threads, i.e. concurrent runs, each a papermill subprocess; without GPUs a small
LocalCluster; with `--cluster slurm` a dask_jobqueue.SLURMCluster (one job = one worker = one GPU)
fed through exactly the same submit code. On Slurm the repo, its .venv and the runs/reports folders
must be on a file system the compute nodes share (the workers run this venv's python).

This module is longer than 500 lines: the command line, the schedule, the clusters (local and Slurm)
and the papermill execution are the one path every run takes (params parsing is gbla.params), tested
end to end in tests/test_grid.py.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import yaml

from gbla.config import RunConfig
from gbla.params import CLUSTERS, DEFAULT_PARAMS, Grid, ParamsError, load_grid  # noqa: F401  (re-exported)
from gbla.params import KNOWN_DATASETS, SYNTHETIC, check_dataset_names  # noqa: F401  (re-exported)
from gbla.common import REPO_ROOT, atomic_write_json, atomic_write_text, git_commit, shown_path
from gbla.run_archive import merge_runs, pack_runs
from gbla.data.semantic_ids import CODES_DIR
from gbla.datasets import dataset_available, dataset_path, expected_data_fingerprint
from gbla.runs import (ERROR_FILE, LOG_FILE, NOTEBOOK_FILE, _now, checkpoint_path, collect_runs, is_done,
                       keep_earlier_group_notebook, load_run_metrics, record_failure, run_dir_for, variant_dir_for)

TRAIN_NOTEBOOK = REPO_ROOT / "notebooks" / "train.ipynb"
# with a deadline (--time-budget), a group is not started with less than this many seconds left (a
# group that starts afresh: --min-start, when its partial work would be lost with the machine)
MIN_GROUP_START_S = 60
KERNEL_NAME = "python3"
# every execution of a group appends a "start" and an "end" line here, in its variant folder: where and
# when each run trained (worker, GPU, process, times), across dispatches, interruptions and restarts
DISPATCH_LOG = "dispatch.jsonl"



# ---------------------------------------------------------------------------------------------
# one run, executed inside a Dask worker

# Run a command so that it gets SIGTERM when the thread that started it dies (Linux prctl
# PR_SET_PDEATHSIG survives exec): a Dask worker that is shut down or killed never leaves a
# training run behind. The notebook kernel follows papermill (ipykernel polls its parent).
_EXEC_TIED_TO_PARENT = (
    "import ctypes, os, signal, sys\n"
    "try:\n"
    "    ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))\n"
    "except (AttributeError, OSError):\n"
    "    pass\n"
    "os.execv(sys.executable, [sys.executable] + sys.argv[1:])\n")


@dataclass(frozen=True)
class GroupTask:
    """The pending seeds of one (dataset, variant), trained together by one notebook execution."""
    dataset: str
    variant: str
    seeds: tuple[int, ...]
    config_hashes: tuple[str, ...]
    variant_dir: str
    notebook: str
    parameters: dict
    cpu_threads: int
    cell_timeout_s: int | None = None
    stop_at: float | None = None
    data_fingerprint: str | None = None   # the processed data's; a result on other data is not done
    min_start_s: float = MIN_GROUP_START_S  # a group without a checkpoint needs this much time left to start
    command: str = ""   # the grid command that dispatched it, recorded with each execution (provenance)

    @property
    def label(self) -> str:
        return f"{self.dataset}/{self.variant}/seeds {','.join(map(str, self.seeds))}"

    def run_dirs(self) -> list[Path]:
        return [Path(self.variant_dir) / f"seed{s}" for s in self.seeds]

    def checkpoint(self) -> Path:
        """Where the notebook keeps this group's checkpoint: gbla.runs.checkpoint_path of its configs, in
        seed order as the notebook builds them (named by their hashes, so another group's never matches)."""
        return checkpoint_path(self.variant_dir, self.config_hashes)


def _ansi_free(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", text)


def notebook_error(path: Path) -> tuple[str, str] | None:
    """(error, traceback) of the first failed cell of an executed notebook, or None."""
    import nbformat

    try:
        nb = nbformat.read(path, as_version=4)
    except Exception:  # noqa: BLE001 - a half-written or missing notebook simply has no error to show
        return None
    for cell in nb.cells:
        for out in cell.get("outputs", []) if cell.cell_type == "code" else []:
            if out.get("output_type") == "error":
                return (f"{out.get('ename')}: {out.get('evalue')}",
                        _ansi_free("\n".join(out.get("traceback", []))))
    return None


def _ends_with_newline(path: Path) -> bool:
    """Whether the file ends a line (True for a missing or empty file: nothing to end)."""
    try:
        with open(path, "rb") as f:
            if f.seek(0, os.SEEK_END) == 0:
                return True
            f.seek(-1, os.SEEK_END)
            return f.read(1) == b"\n"
    except FileNotFoundError:
        return True


def _tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def summary_as_written(summary: dict) -> dict:
    """The grid's summary with its paths (run folders, report notebooks and HTML) relative to the repository
    root where they lie inside it: the committed summary then reads the same on every checkout."""
    report_paths = ("notebook", "ipynb", "html")
    return {**summary,
            "runs": [{**r, "run_dir": shown_path(r["run_dir"])} for r in summary["runs"]],
            "reports": [{k: shown_path(v) if k in report_paths and v else v for k, v in r.items()}
                        for r in summary["reports"]]}


def _seed_outcomes(task: GroupTask, base: dict, outcome: str, **extra) -> list[dict]:
    return [{**base, "seed": seed, "config_hash": h, "run_dir": str(d), "outcome": outcome, **extra}
            for seed, h, d in zip(task.seeds, task.config_hashes, task.run_dirs())]


def append_dispatch_event(variant_dir: Path, event: dict) -> None:
    """One JSON line in the variant folder's dispatch log. Lines are short and written with one
    append, so concurrent writers on one file system do not interleave them."""
    line = json.dumps(event, sort_keys=True) + "\n"
    fd = os.open(Path(variant_dir) / DISPATCH_LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def read_dispatch_log(variant_dir: str | os.PathLike) -> list[dict]:
    """The events of a variant folder's dispatch log, oldest first ([] without one)."""
    path = Path(variant_dir) / DISPATCH_LOG
    if not path.is_file():
        return []
    events = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not a JSON line ({e.msg})") from None
    return events


def execute_group(task: GroupTask) -> list[dict]:
    """Execute notebooks/train.ipynb for one group with papermill (a subprocess): the executed notebook
    and the group's log go to the variant folder, each finished seed's results to its own folder.

    Returns one outcome per seed: ran, failed (error.json in its folder), paused (stopped at the
    deadline; its checkpoint resumes it next time) or not-run (no time left to start). Never raises
    for a failed run."""
    variant_dir = Path(task.variant_dir)
    variant_dir.mkdir(parents=True, exist_ok=True)
    base = {"dataset": task.dataset, "variant": task.variant, "host": os.uname().nodename,
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"), "group_seeds": list(task.seeds)}
    try:
        from distributed import get_worker

        base["worker"] = str(get_worker().name)
    except (ImportError, ValueError):
        base["worker"] = None
    if task.stop_at is not None:
        needed = MIN_GROUP_START_S if task.checkpoint().is_file() else max(MIN_GROUP_START_S, task.min_start_s)
        if task.stop_at - time.time() < needed:
            return _seed_outcomes(task, base, "not-run")
    execution = {"execution": uuid.uuid4().hex[:12], "label": task.label, "pid": os.getpid(),
                 **{k: base[k] for k in ("host", "worker", "cuda_visible_devices", "group_seeds")}}
    append_dispatch_event(variant_dir, {"event": "start", "at": _now(), "time": round(time.time(), 3),
                                        **execution, **({"command": task.command} if task.command else {})})
    for run_dir in task.run_dirs():  # an earlier failure no longer describes this run
        (run_dir / ERROR_FILE).unlink(missing_ok=True)
    threads = str(task.cpu_threads)
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "PYTHONUNBUFFERED": "1"}
    notebook_out = variant_dir / NOTEBOOK_FILE
    log_path = variant_dir / LOG_FILE
    cmd = [sys.executable, "-c", _EXEC_TIED_TO_PARENT, "-c", "from gbla.grid import execute_notebook_main; "
           "execute_notebook_main()", task.notebook, str(notebook_out), str(variant_dir),
           yaml.safe_dump({**task.parameters, "stop_at": task.stop_at}, sort_keys=False),
           str(int(task.cell_timeout_s)) if task.cell_timeout_s else ""]
    # this execution resumes the group's checkpoint (left by a pause or an interruption): its log goes
    # after the earlier executions' log, which would otherwise be lost (their epochs are not repeated)
    checkpoint = task.checkpoint()
    resumes = checkpoint.is_file()
    keep_earlier_group_notebook(variant_dir, task.seeds)   # another group's notebook is not overwritten
    cut_off = resumes and not _ends_with_newline(log_path)  # the earlier execution stopped mid-line
    start = time.time()
    base["started_at"] = _now()
    with open(log_path, "a" if resumes else "w") as log:
        if cut_off:
            log.write("\n")
        log.write(f"# {_now()} {task.label} configs {' '.join(task.config_hashes)} on {base['host']} "
                  f"worker {base['worker']} CUDA_VISIBLE_DEVICES={base['cuda_visible_devices']}"
                  + (f" resuming {checkpoint.name}" if resumes else "") + "\n")
        log.flush()
        # a session of its own: a Ctrl-C in the terminal reaches the grid, which shuts the workers down
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=variant_dir,
                              start_new_session=True)
    base["wall_s"] = round(time.time() - start, 2)
    base["finished_at"] = _now()
    found = notebook_error(notebook_out)
    done = [proc.returncode == 0 and is_done(run_dir, config_hash, task.data_fingerprint)
            for run_dir, config_hash in zip(task.run_dirs(), task.config_hashes)]
    # a pause tests and writes the seeds that had stopped early and leaves the checkpoint of the others,
    # named by them (gbla.runs.save_group_results): the next command resumes those seeds alone
    pending = checkpoint_path(variant_dir, [h for h, d in zip(task.config_hashes, done) if not d])
    outcomes = []
    for seed, config_hash, run_dir, is_finished in zip(task.seeds, task.config_hashes, task.run_dirs(), done):
        entry = {**base, "seed": seed, "config_hash": config_hash, "run_dir": str(run_dir)}
        if is_finished:
            shutil.copyfile(log_path, run_dir / LOG_FILE)  # the group's log, beside each seed's results
            outcomes.append({**entry, "outcome": "ran"})
            continue
        if proc.returncode == 0 and not found and task.stop_at is not None and pending.is_file():
            outcomes.append({**entry, "outcome": "paused"})
            continue
        if found:
            error, tb = found
        elif proc.returncode == 0:
            error, tb = (f"the notebook finished but {run_dir}/metrics.json does not have config hash "
                         f"{config_hash}", "")
        else:
            error, tb = f"papermill exited with code {proc.returncode}", _tail(log_path)
        record_failure(run_dir, config_hash, error, tb, log=str(log_path), notebook=str(notebook_out))
        outcomes.append({**entry, "outcome": "failed", "error": error})
    append_dispatch_event(variant_dir, {"event": "end", "at": _now(), "time": round(time.time(), 3),
                                        "wall_s": base["wall_s"], "returncode": proc.returncode,
                                        "outcomes": {str(o["seed"]): o["outcome"] for o in outcomes}, **execution})
    return outcomes


# ---------------------------------------------------------------------------------------------
# clusters

def _visible_gpus(setting) -> list[str]:
    if setting != "auto":
        return [str(g) for g in setting]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [g for g in visible.split(",") if g.strip()]
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except ImportError:
        return []


try:
    from distributed import WorkerPlugin
except ImportError:  # the grid needs distributed; only load_grid (used by the notebook) works without it
    WorkerPlugin = object


class PinGPU(WorkerPlugin):
    """Dask worker plugin: worker i of a LocalCluster sees only GPU gpus[i] (and its runs inherit that)."""
    name = "gbla-pin-gpu"

    def __init__(self, gpus: list[str]):
        self.gpus = list(gpus)

    def setup(self, worker):
        os.environ["CUDA_VISIBLE_DEVICES"] = self.gpus[int(worker.name) % len(self.gpus)]


def slurm_cluster_kwargs(dask_cfg: dict) -> tuple[dict, int]:
    """SLURMCluster keyword arguments and the number of jobs, from the `dask:` settings.

    One job = one Dask worker process = one GPU (via the gres directive); its threads are the
    concurrent runs on that GPU. SLURM sets CUDA_VISIBLE_DEVICES inside the job itself.
    """
    slurm = {k: v for k, v in dask_cfg.get("slurm", {}).items() if v is not None}
    jobs = int(slurm.pop("jobs", 1))
    slurm.setdefault("memory", "64GB")
    kwargs = {"cores": dask_cfg["runs_per_gpu"], "processes": 1, "python": sys.executable, **slurm}
    return kwargs, jobs


@dataclass
class ClusterPlan:
    kind: str
    description: str
    slots: int           # runs that execute at the same time
    cpu_threads: int     # torch/OpenMP threads per run


def plan_cluster(grid: Grid, kind: str, gpus: list[str] | None = None) -> ClusterPlan:
    d = grid.dask
    if kind == "slurm":
        kwargs, jobs = slurm_cluster_kwargs(d)
        return ClusterPlan("slurm", f"SLURMCluster: {jobs} jobs x {d['runs_per_gpu']} runs per GPU",
                           jobs * d["runs_per_gpu"], max(1, int(kwargs.get("job_cpu") or 1) // d["runs_per_gpu"]))
    gpus = _visible_gpus(d["gpus"]) if gpus is None else gpus
    cpus = os.cpu_count() or 1
    if gpus:
        slots = len(gpus) * d["runs_per_gpu"]
        return ClusterPlan("local-gpu", f"LocalCluster: {len(gpus)} GPU workers (CUDA_VISIBLE_DEVICES "
                                        f"{','.join(gpus)}) x {d['runs_per_gpu']} runs each",
                           slots, max(1, cpus // slots))
    slots = d["cpu_workers"] * d["runs_per_cpu_worker"]
    return ClusterPlan("local-cpu", f"LocalCluster: {d['cpu_workers']} CPU workers x "
                                    f"{d['runs_per_cpu_worker']} runs each", slots, max(1, cpus // slots))


def _has_bokeh() -> bool:
    """The Dask dashboard needs bokeh; without it distributed only warns, so ask for no dashboard."""
    try:
        import bokeh  # noqa: F401
    except ImportError:
        return False
    return True


def start_cluster(grid: Grid, kind: str, gpus: list[str] | None = None):
    """(cluster, client) for `kind` ("local" or "slurm"); the caller closes both."""
    from distributed import Client, LocalCluster

    d = grid.dask
    if kind == "slurm":
        from dask_jobqueue import SLURMCluster

        kwargs, jobs = slurm_cluster_kwargs(d)
        cluster = SLURMCluster(**kwargs)
        cluster.scale(jobs=jobs)
        return cluster, Client(cluster)
    gpus = _visible_gpus(d["gpus"]) if gpus is None else gpus
    # ":0" (a free port) even without bokeh: the scheduler always serves HTTP, and None means port 8787,
    # which warns "Port 8787 is already in use" whenever another cluster or grid holds it
    common = dict(processes=True, dashboard_address=":0",
                  silence_logs=logging.ERROR, memory_limit=0,
                  host="127.0.0.1")
    if gpus:
        # runs are subprocesses, so the worker's threads only wait; one worker per GPU
        cluster = LocalCluster(n_workers=len(gpus), threads_per_worker=d["runs_per_gpu"], **common)
        client = Client(cluster)
        client.register_plugin(PinGPU(gpus))
    else:
        cluster = LocalCluster(n_workers=d["cpu_workers"], threads_per_worker=d["runs_per_cpu_worker"], **common)
        client = Client(cluster)
    return cluster, client


# ---------------------------------------------------------------------------------------------
# the grid

def make_group_task(grid: Grid, configs: list[RunConfig], cpu_threads: int, overrides: dict | None = None,
                    stop_at: float | None = None, data_fingerprint: str | None = None,
                    min_start_s: float = MIN_GROUP_START_S, command: str = "") -> GroupTask:
    overrides = overrides or {}
    runs_root = grid.runs_root
    processed_root = overrides.get("processed_root") or grid.processed_root
    first = configs[0]
    parameters = {
        "dataset": first.dataset, "variant": first.variant, "seeds": [c.seed for c in configs],
        "params_file": str(grid.params_file.resolve()), "profile": grid.profile,
        "processed_root": str(processed_root) if processed_root else None,
        "runs_root": str(runs_root),
        "device": overrides.get("device") or grid.runtime["device"],
        "backend": overrides.get("backend") or grid.runtime["backend"],
        "step_mode": overrides.get("step_mode") or grid.runtime["step_mode"],
        "expected_config_hashes": {c.seed: c.config_hash() for c in configs}, "progress": False}
    return GroupTask(dataset=first.dataset, variant=first.variant, seeds=tuple(c.seed for c in configs),
                     config_hashes=tuple(c.config_hash() for c in configs),
                     variant_dir=str(variant_dir_for(runs_root, first.dataset, first.variant)),
                     notebook=str(TRAIN_NOTEBOOK), parameters=parameters, cpu_threads=cpu_threads,
                     cell_timeout_s=grid.runtime.get("cell_timeout_s"), stop_at=stop_at,
                     data_fingerprint=data_fingerprint, min_start_s=min_start_s, command=command)


def group_configs(configs: list[RunConfig]) -> list[list[RunConfig]]:
    """Configs grouped by (dataset, variant), in first-appearance order: one group = one task."""
    groups: dict[tuple[str, str], list[RunConfig]] = {}
    for c in configs:
        groups.setdefault((c.dataset, c.variant), []).append(c)
    return list(groups.values())


def _failed_outcomes(task: GroupTask, exc: BaseException) -> list[dict]:
    """A task that died outside execute_group (e.g. its worker was killed): record it like any failure."""
    outcomes = []
    for seed, config_hash, run_dir in zip(task.seeds, task.config_hashes, task.run_dirs()):
        record_failure(run_dir, config_hash, exc)
        outcomes.append({"dataset": task.dataset, "variant": task.variant, "seed": seed, "config_hash": config_hash,
                         "run_dir": str(run_dir), "outcome": "failed", "error": f"{type(exc).__name__}: {exc}"})
    return outcomes


def dispatch(grid: Grid, tasks: list[GroupTask], kind: str, *, total: int, done_before: int,
             gpus: list[str] | None = None, log=print) -> tuple[list[dict], bool]:
    """Run the group tasks on a Dask cluster, with a progress bar over the grid's runs.

    Returns (per-seed outcomes in finish order, interrupted). On Ctrl-C / SIGTERM the cluster is shut
    down, which ends the running notebooks (their runs stay not done, their checkpoints stay);
    finished runs are already on disk."""
    from distributed import as_completed
    from tqdm.auto import tqdm

    outcomes: list[dict] = []
    interrupted = False
    cluster, client = start_cluster(grid, kind, gpus)
    try:
        if kind == "slurm" or getattr(cluster, "dashboard_link", None) and _has_bokeh():
            log(f"Dask dashboard: {client.dashboard_link}")
        futures = {}
        for task in tasks:
            fut = client.submit(execute_group, task, key=f"group-{task.label}-{task.config_hashes[0]}",
                                pure=False, retries=0)
            futures[fut] = task
        failed = 0
        with tqdm(total=total, initial=done_before, desc=f"grid {grid.profile}", unit="run",
                  dynamic_ncols=True) as bar:
            for fut in as_completed(futures):
                task = futures[fut]
                try:
                    group_outcomes = fut.result()
                except Exception as exc:  # noqa: BLE001 - any error of one group must not stop the grid
                    group_outcomes = _failed_outcomes(task, exc)
                outcomes += group_outcomes
                for o in group_outcomes:
                    if o["outcome"] == "failed":
                        failed += 1
                        bar.write(f"FAILED {task.dataset}/{task.variant}/seed{o['seed']}: {o.get('error')}  "
                                  f"(log: {task.variant_dir}/{LOG_FILE})")
                paused = [o["seed"] for o in group_outcomes if o["outcome"] == "paused"]
                if paused:
                    bar.write(f"paused {task.label} at the time budget; the same command resumes it")
                bar.set_postfix(failed=failed, refresh=False)
                bar.update(sum(o["outcome"] in ("ran", "failed") for o in group_outcomes))
    except KeyboardInterrupt:
        interrupted = True
        log("\ninterrupted: finished runs are kept; run the same command again to do the rest")
    finally:
        client.close()
        cluster.close()
    return outcomes, interrupted


def execute_notebook_main() -> None:
    """The papermill subprocess of a group: argv = notebook, output, cwd, parameters (YAML), cell
    timeout in seconds (or ""). Like the papermill command line (cell outputs logged to stdout as they
    come), but with the kernel on private Unix sockets (ipc_kernel_manager_class). Exit code 1 on a
    failed cell; the executed notebook is written either way."""
    import papermill as pm

    notebook, output, cwd, parameters, timeout = sys.argv[1:6]
    # SIGTERM (the grid shutting its workers down, or a worker that died: see _EXEC_TIED_TO_PARENT)
    # unwinds like Ctrl-C, so papermill shuts the kernel down and its socket folder is removed
    signal.signal(signal.SIGTERM, _raise_interrupt)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    manager = ipc_kernel_manager_class()
    try:
        pm.execute_notebook(notebook, output, parameters=yaml.safe_load(parameters), kernel_name=KERNEL_NAME,
                            cwd=cwd, log_output=True, progress_bar=False,
                            execution_timeout=int(timeout) if timeout else None, kernel_manager_class=manager)
    finally:  # an interrupted execution may skip the manager's own clean-up
        for folder in manager.socket_folders:
            shutil.rmtree(folder, ignore_errors=True)


def ipc_kernel_manager_class():
    """A jupyter_client kernel manager that talks to the kernel over Unix sockets in a private
    temporary folder instead of TCP on localhost: nothing else on the machine can connect, and the
    kernel does not log "Kernel is running over TCP without encryption" into every report.
    Pass it to papermill: pm.execute_notebook(..., kernel_manager_class=ipc_kernel_manager_class())."""
    import tempfile

    from jupyter_client.manager import AsyncKernelManager

    class IPCKernelManager(AsyncKernelManager):
        socket_folders: list[str] = []   # every folder this class made, for a clean-up after an interrupt

        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self._ipc_dir = tempfile.mkdtemp(prefix="gbla-kernel-")
            IPCKernelManager.socket_folders.append(self._ipc_dir)
            self.transport, self.ip = "ipc", os.path.join(self._ipc_dir, "k")

        async def _async_cleanup_resources(self, restart: bool = False) -> None:
            await super()._async_cleanup_resources(restart=restart)
            if not restart:
                shutil.rmtree(self._ipc_dir, ignore_errors=True)

        cleanup_resources = _async_cleanup_resources

    return IPCKernelManager


# where an executed report keeps the key of what it was computed from (notebook metadata)
REPORT_INPUTS_FIELD = "gbla_report_inputs"


def _runs_roots(grid: Grid) -> list[Path]:
    """The runs folders a report of `grid` reads: its own and those of the profiles of its params file
    that compare with it (reruns with one setting changed, paired with its runs in its report)."""
    from gbla.params import load_profiles

    roots = {grid.runs_root}
    try:
        roots |= {g.runs_root for g in load_profiles(grid.params_file).values() if g.compares_with == grid.profile}
    except (ParamsError, OSError):   # the report itself says what is wrong with the params file
        pass
    return sorted(roots)


def report_inputs_key(grid: Grid, src: Path, params: dict) -> str:
    """One sha256 over what an aggregation notebook's result is computed from: the notebook, the files
    under params/ (the grid, the published numbers), the parameters it gets, the package's source,
    every file under the runs folders it reads (finished runs, group notebooks and logs; not the
    checkpoints of paused groups, nor the grid's own summary-*.json) and the fingerprints of the
    processed datasets. Contents only (no times, no absolute paths), so a fresh clone gets the key its
    committed report was rendered with. The same key: the report would show the same again."""
    import hashlib

    digest = hashlib.sha256()

    def add(label: str, data: bytes) -> None:
        digest.update(label.encode() + b"\0" + hashlib.sha256(data).digest())

    add("notebook", src.read_bytes())
    add("parameters", json.dumps({k: shown_path(v) if isinstance(v, (str, Path)) and k != "profile" else v
                                  for k, v in sorted(params.items())}, sort_keys=True).encode())
    for folder in (REPO_ROOT / "params", REPO_ROOT / "gbla"):
        for f in sorted(folder.rglob("*")):
            if f.is_file() and (folder.name == "params" or f.suffix == ".py"):
                add(str(f.relative_to(REPO_ROOT)), f.read_bytes())
    if grid.params_file.is_file() and not grid.params_file.is_relative_to(REPO_ROOT / "params"):
        add("params_file", grid.params_file.read_bytes())
    for root in _runs_roots(grid):
        if not root.is_dir():
            continue
        for f in sorted(root.rglob("*")):
            rel = f.relative_to(root)
            if (f.is_file() and not f.name.startswith("checkpoint-") and ".tmp" not in f.name
                    and not (len(rel.parts) == 1 and f.name.startswith("summary-"))):
                add(f"{shown_path(root)}/{rel.as_posix()}", f.read_bytes())
    for dataset in sorted(set(grid.datasets) - {SYNTHETIC}):
        add(f"data/{dataset}", str(expected_data_fingerprint(dataset, grid.processed_root)).encode())
    return digest.hexdigest()


def recorded_report_inputs(path: Path) -> str | None:
    """The inputs key an executed report was rendered with (None: none recorded, or not readable)."""
    try:
        meta = json.loads(path.read_text()).get("metadata", {})
    except (OSError, ValueError):
        return None
    return meta.get(REPORT_INPUTS_FIELD)


def _record_report_inputs(path: Path, key: str) -> None:
    import nbformat

    nb = nbformat.read(str(path), as_version=4)
    nb.metadata[REPORT_INPUTS_FIELD] = key
    text = nbformat.writes(nb)
    atomic_write_text(path, text if text.endswith("\n") else text + "\n")   # as nbformat.write ends a file


def run_reports(grid: Grid, notebooks: Iterable[str], log=print, *, force: bool = False) -> list[dict]:
    """Execute the aggregation notebooks into reports_root (<stem>-<profile>.ipynb) and render HTML.
    A report whose inputs (report_inputs_key) are those it was last rendered from is left as it is
    (status "up-to-date"), unless `force`."""
    reports_root = grid.reports_root
    reports_root.mkdir(parents=True, exist_ok=True)
    with _sigterm_raises_interrupt():
        return [_run_report(grid, nb, reports_root, log, force) for nb in notebooks]


@contextlib.contextmanager
def _sigterm_raises_interrupt():
    """Inside the block SIGTERM raises KeyboardInterrupt, where this is the main thread and SIGTERM has
    its default action: a report killed with `kill` still removes its kernel's socket folder on the way
    out (`python -m gbla.grid` installs the same handler for the whole command)."""
    import threading

    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run_report(grid: Grid, nb: str, reports_root: Path, log, force: bool) -> dict:
    import papermill as pm
    from gbla.report import render_html

    src = Path(nb) if Path(nb).is_absolute() else REPO_ROOT / nb
    if not src.is_file():
        warnings.warn(f"report notebook {src} does not exist; skipped", stacklevel=2)
        log(f"WARNING: report notebook {src} does not exist; skipped")
        return {"notebook": str(src), "status": "skipped", "error": "notebook not found"}
    out = reports_root / f"{src.stem}-{grid.profile}.ipynb"
    html = out.with_suffix(".html")
    # paths inside the repository go in relative (the notebook resolves them from the root), so the
    # rendered report names them the same on every checkout
    wanted = {"runs_root": shown_path(grid.runs_root), "params_file": shown_path(grid.params_file),
              "profile": grid.profile, "output": str(reports_root), "output_dir": str(reports_root)}
    if grid.processed_root is not None:   # where the report finds the test users' histories
        wanted["processed_root"] = str(grid.processed_root)
    declared = pm.inspect_notebook(str(src))
    params = {k: v for k, v in wanted.items() if k in declared} if declared else wanted
    entry = {"notebook": str(src), "ipynb": str(out), "html": str(html), "status": "ok"}
    inputs = report_inputs_key(grid, src, params)
    if not force and html.is_file() and recorded_report_inputs(out) == inputs:
        log(f"report up to date (its notebook, params, package and runs are those it was rendered from): {out}")
        return {**entry, "status": "up-to-date"}
    log(f"report: {shown_path(src)} -> {out}")
    manager = ipc_kernel_manager_class()
    try:
        pm.execute_notebook(str(src), str(out), parameters=params, kernel_name=KERNEL_NAME,
                            cwd=str(reports_root), progress_bar=False, kernel_manager_class=manager)
    except Exception as exc:  # noqa: BLE001 - keep the executed notebook (it shows the error) and go on
        entry.update(status="failed", error=f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1:]}")
        log(f"report FAILED: {entry['error']}")
    finally:  # a kernel stopped by its shutdown timeout skips the manager's own clean-up
        for folder in manager.socket_folders:
            shutil.rmtree(folder, ignore_errors=True)
    if out.is_file():
        if entry["status"] == "ok":   # a failed report is rendered again by the next command
            _record_report_inputs(out, inputs)
        body = render_html(out)
        atomic_write_text(html, body)
    return entry


def check_datasets(datasets: Iterable[str], processed_root: Path | None) -> None:
    missing = [d for d in datasets if not dataset_available(d, processed_root)]
    if missing:
        where = ", ".join(str(dataset_path(d, processed_root)) for d in missing)
        raise SystemExit(f"processed data missing for {missing} (looked in {where}). Build it with `make data` "
                         f"(or `python -m gbla.data.build --all`), or try the CPU grid: "
                         f"`make ablations PROFILE=smoke`.")


def results_table(frame) -> str:
    """Text table per dataset and variant: runs finished / expected, mean test Recall@10 and NDCG@10."""
    if frame.empty:
        return "(no runs)"
    g = frame.groupby(["dataset", "variant"], sort=False)
    table = g.agg(ok=("status", lambda s: int((s == "ok").sum())), runs=("status", "size"),
                  **{"test_recall@10": ("test_recall@10", "mean"), "test_ndcg@10": ("test_ndcg@10", "mean")})
    table["ok"] = table["ok"].astype(str) + "/" + table["runs"].astype(str)
    return table.drop(columns="runs").to_string(float_format=lambda x: f"{x:.4f}")


class DataMismatchError(ValueError):
    """The processed data differ from those a dataset's finished runs were trained on."""


def runs_on_other_data(grid: Grid, dataset: str, fingerprint: str | None) -> dict[str, list[str]]:
    """The finished runs of `dataset` (every variant and seed of the profile) trained on other data
    than `fingerprint`: {their data fingerprint: ["variant/seedK", ...]}."""
    clash: dict[str, list[str]] = {}
    if fingerprint is None:
        return clash
    for c in grid.expand([dataset], None, None):
        metrics = load_run_metrics(run_dir_for(grid.runs_root, c.dataset, c.variant, c.seed))
        if metrics and metrics.get("status") == "ok" and metrics.get("data_fingerprint") != fingerprint:
            clash.setdefault(str(metrics.get("data_fingerprint")), []).append(f"{c.variant}/seed{c.seed}")
    return clash


def describe_data_mismatch(dataset: str, fingerprint: str, clash: dict[str, list[str]], path: Path) -> str:
    n = sum(len(v) for v in clash.values())
    were = "; ".join(f"{fp}: {len(runs)} runs ({', '.join(runs[:4])}{', ...' if len(runs) > 4 else ''})"
                     for fp, runs in sorted(clash.items()))
    return (f"{dataset}: the processed data in {path} (fingerprint {fingerprint}) are not the data {n} finished "
            f"runs of {dataset} were trained on ({were}). New runs would be compared with them in the report "
            f"although their semantic IDs differ. A rebuild on another CPU or with other library versions "
            f"gives other codes (README, 'What is bit-reproducible'): compare the environment in "
            f"{path / 'meta.json'} with the build record (outputs/data/build_report.md); "
            + (f"rebuild the data from the committed codes (`python -m gbla.data.build --dataset {dataset} "
               f"--semantic-ids {shown_path(CODES_DIR)} --force`) or " if (CODES_DIR / f"{dataset}.npz").is_file()
               else "")
            + f"point --processed-root at the data of those runs. To train on these data anyway (every finished run "
            f"of {dataset} then needs training again), pass --accept-new-data.")


def run_grid(grid: Grid, *, datasets=None, variants=None, seeds=None, cluster: str | None = None,
             runs_per_gpu: int | None = None, gpus: list[str] | None = None, dry_run: bool = False,
             aggregate: bool = True, overrides: dict | None = None, time_budget_s: float | None = None,
             min_start_s: float = MIN_GROUP_START_S, command: str = "", accept_new_data: bool = False,
             force_reports: bool = False, log=print) -> dict:
    """Expand, skip what is done, dispatch the rest (one task per (dataset, variant): its pending
    seeds), write summary-<profile>.json, run the reports. time_budget_s: groups still training when it runs
    out write a checkpoint and stop (outcome "paused"); the same call later resumes them. min_start_s: a
    group without a checkpoint is not started with less of the budget left (outcome "not-run"). command:
    the command line that asked for this, recorded in each group execution's dispatch "start" record.
    Raises DataMismatchError when a dataset to train has finished runs (of any variant of the profile)
    trained on other processed data than there is now, unless accept_new_data."""
    started, t0 = _now(), time.time()
    kind = cluster or grid.dask["cluster"]
    if runs_per_gpu is not None:
        grid.dask["runs_per_gpu"] = grid.dask["runs_per_cpu_worker"] = runs_per_gpu
    if overrides and overrides.get("runs_root"):
        grid.runtime["runs_root"] = str(overrides["runs_root"])
    configs = grid.expand(datasets, variants, seeds)
    runs_root = grid.runs_root
    plan = plan_cluster(grid, kind, gpus)
    processed_root = (overrides or {}).get("processed_root") or grid.processed_root
    # a result counts as done only if it was trained on the data a new run would get now
    fingerprints = {d: expected_data_fingerprint(d, processed_root, synthetic=grid.synthetic)
                    for d in {c.dataset for c in configs}}
    done = [c for c in configs if is_done(run_dir_for(runs_root, c.dataset, c.variant, c.seed), c.config_hash(),
                                          fingerprints[c.dataset])]
    done_keys = {(c.dataset, c.variant, c.seed) for c in done}
    todo = [c for c in configs if (c.dataset, c.variant, c.seed) not in done_keys]
    # dataset-major, then variant by variant (one group each), in the order --datasets / --variants name
    # them, else the profile's (sa, hybrid first)
    order = {v: i for i, v in enumerate(variants or grid.variant_names)}
    datasets_order = {d: i for i, d in enumerate(datasets or grid.datasets)}
    todo.sort(key=lambda c: (datasets_order.get(c.dataset, 0), order.get(c.variant, 0), c.seed))
    log(f"grid {grid.profile} ({grid.params_file}): {len(configs)} runs = {len(set(c.dataset for c in configs))} "
        f"datasets x {len(set(c.variant for c in configs))} variants x {len(set(c.seed for c in configs))} seeds; "
        f"{len(done)} done, {len(todo)} to run on {plan.description}")
    log(f"runs: {runs_root}")
    other_data = [c for c in todo if is_done(run_dir_for(runs_root, c.dataset, c.variant, c.seed), c.config_hash())]
    if other_data:
        log(f"{len(other_data)} runs have results trained on other data than the processed data there now "
            f"(fingerprints {fingerprints}): stale, to be run again")
    # finished runs of another config in the folders of runs to train: replaced, which is what a changed
    # setting asks for; said before anything is replaced, so that a wrong --runs-root is noticed
    replaced = [(c, m["config_hash"]) for c in todo
                if (m := load_run_metrics(run_dir_for(runs_root, c.dataset, c.variant, c.seed)))
                and m.get("status") == "ok" and m.get("config_hash") not in (None, c.config_hash())]
    if replaced:
        c, old = replaced[0]
        log(f"{len(replaced)} runs hold finished results of another config (settings changed since, or another "
            f"profile's runs): trained again and replaced, e.g. {c.dataset}/{c.variant}/seed{c.seed} config "
            f"{old} -> {c.config_hash()}")
    # new runs on other semantic IDs than a dataset's finished runs would be compared with them in the
    # report as if trained on the same data: refuse (a dry run warns), naming what differs
    for dataset in sorted({c.dataset for c in todo}) if not accept_new_data else []:
        clash = runs_on_other_data(grid, dataset, fingerprints[dataset])
        if clash:
            message = describe_data_mismatch(dataset, fingerprints[dataset], clash,
                                             dataset_path(dataset, processed_root))
            if not dry_run:
                raise DataMismatchError(message)
            log(f"warning: {message}")
    if dry_run:
        for c in todo:
            log(f"  would run {c.dataset}/{c.variant}/seed{c.seed} (config {c.config_hash()})")
        absent = sorted({c.dataset for c in todo if not dataset_available(c.dataset, processed_root)})
        if absent:
            log(f"  processed data missing for {absent}: `make data` builds it")
        return {"profile": grid.profile, "total": len(configs), "done": len(done), "to_run": len(todo)}

    check_datasets(sorted({c.dataset for c in todo}), processed_root)
    stop_at = t0 + time_budget_s if time_budget_s is not None else None
    tasks = [make_group_task(grid, group, plan.cpu_threads, overrides, stop_at, fingerprints[group[0].dataset],
                             min_start_s=min_start_s, command=command)
             for group in group_configs(todo)]
    outcomes, interrupted = [], False
    if tasks:
        outcomes, interrupted = dispatch(grid, tasks, kind, total=len(configs), done_before=len(done),
                                         gpus=gpus, log=log)
    ran = [o for o in outcomes if o["outcome"] == "ran"]
    failed = [o for o in outcomes if o["outcome"] == "failed"]
    paused = [o for o in outcomes if o["outcome"] == "paused"]
    finished = {(o["dataset"], o["variant"], o["seed"]) for o in outcomes}
    runs = [{"dataset": c.dataset, "variant": c.variant, "seed": c.seed, "config_hash": c.config_hash(),
             "outcome": "skipped", "run_dir": str(run_dir_for(runs_root, c.dataset, c.variant, c.seed))}
            for c in done]
    runs += outcomes
    runs += [{"dataset": t.dataset, "variant": t.variant, "seed": seed, "config_hash": h,
              "outcome": "not-run", "run_dir": str(d)}
             for t in tasks for seed, h, d in zip(t.seeds, t.config_hashes, t.run_dirs())
             if (t.dataset, t.variant, seed) not in finished]
    summary = {"profile": grid.profile, "params_file": str(grid.params_file), "commit": git_commit(),
               "cluster": plan.description, "started_at": started, "finished_at": _now(),
               "wall_s": round(time.time() - t0, 1), "interrupted": interrupted,
               "counts": {"total": len(configs), "skipped": len(done), "ran": len(ran), "failed": len(failed),
                          "paused": len(paused),
                          "not_run": len(runs) - len(done) - len(ran) - len(failed) - len(paused)},
               "groups": len(tasks), "time_budget_s": time_budget_s,
               "runs": runs, "reports": []}
    # one file per profile: the smoke profile's runs share runs_root with the full grid's, and the full
    # grid's last summary (every run skipped as done, none failed) is committed with its results
    summary_path = runs_root / f"summary-{grid.profile}.json"
    atomic_write_json(summary_path, summary_as_written(summary))
    if aggregate and not interrupted and not paused:
        summary["reports"] = run_reports(grid, grid.runtime["reports"], log=log, force=force_reports)
        summary["wall_s"] = round(time.time() - t0, 1)
        atomic_write_json(summary_path, summary_as_written(summary))

    frame = collect_runs(runs_root, configs, data_fingerprints=fingerprints)
    log("")
    log(results_table(frame))
    log("")
    c = summary["counts"]
    log(f"summary: {c['total']} runs: {c['skipped']} skipped (done before), {c['ran']} ran, {c['failed']} failed"
        + (f", {c['paused']} paused at the time budget (checkpointed)" if c["paused"] else "")
        + (f", {c['not_run']} not run" if c["not_run"] else "") + f"  [{summary['wall_s']} s]")
    for o in failed:
        log(f"  FAILED {o['dataset']}/{o['variant']}/seed{o['seed']}: {o.get('error')}")
        log(f"         see {o['run_dir']}/{ERROR_FILE}, {NOTEBOOK_FILE}, {LOG_FILE}")
    for r in summary["reports"]:
        log(f"  report {r['status']}: {r.get('html') or r['notebook']}" + (f" ({r['error']})" if r.get("error") else ""))
    log(f"summary written to {summary_path}")
    return summary


# CPU seconds per training step of the paper-size model (batch 256): measured 13 s (encoder input 25
# tokens) to 24 s (41 tokens) per eager `sa` step with 2 torch threads on a 2-core x86-64 machine that
# other processes loaded; 10 s is a round, optimistic yardstick for the warning below, not a benchmark. On an H100 one
# Beauty run to early stopping took ~7 min (outputs/pilot).
CPU_SECONDS_PER_STEP = 10.0


def train_examples(dataset: str, processed_root: Path | None, synthetic: dict) -> int:
    """Training examples of a dataset: from its meta.json when built, else from the published counts
    (leave-one-out on 5-core data: interactions - 3 x users)."""
    from gbla.data.amazon import PUBLISHED_COUNTS
    from gbla.datasets import load_processed_dataset

    if dataset == SYNTHETIC:
        return len(load_processed_dataset(dataset, synthetic=synthetic).train)
    meta = dataset_path(dataset, processed_root) / "meta.json"
    if meta.is_file():
        stats = json.loads(meta.read_text()).get("stats", {})
        if "train_examples" in stats:
            return int(stats["train_examples"])
    users, _, interactions = PUBLISHED_COUNTS[dataset]
    return interactions - 3 * users


def check_cpu_cost(grid: Grid, configs: list[RunConfig], *, processed_root: Path | None, device: str | None,
                   gpus: list[str] | None, cluster: str | None, allow_cpu: bool, dry_run: bool,
                   runs_root: str | None = None) -> str | None:
    """None when the runs may start; else why not. Runs on real data without a GPU take CPU-days each,
    so they start only with --allow-cpu; the message says what they would cost (from the profile)."""
    if all(c.dataset == SYNTHETIC for c in configs) or (cluster or grid.dask["cluster"]) == "slurm":
        return None
    device = device or grid.runtime["device"]
    on_cpu = device == "cpu" or (device == "auto" and plan_cluster(grid, "local", gpus).kind == "local-cpu")
    if not on_cpu:
        return None
    runs_root = Path(runs_root) if runs_root else grid.runs_root
    fingerprints = {d: expected_data_fingerprint(d, processed_root, synthetic=grid.synthetic)
                    for d in {c.dataset for c in configs}}
    configs = [c for c in configs if not is_done(run_dir_for(runs_root, c.dataset, c.variant, c.seed),
                                                 c.config_hash(), fingerprints[c.dataset])]
    if not configs:
        return None
    n_train = {d: train_examples(d, processed_root, grid.synthetic) for d in {c.dataset for c in configs}}
    steps = 0
    for c in configs:
        n = min(n_train[c.dataset], c.train.max_train_examples or n_train[c.dataset])
        steps += math.ceil(n / c.train.batch_size) * c.train.max_epochs
    hours = steps * CPU_SECONDS_PER_STEP / 3600
    estimate = (f"{len(configs)} runs on CPU (no GPU visible, or device cpu): up to {steps:,} training steps "
                f"(max_epochs of each run x its batches per epoch; early stopping usually ends a run sooner), "
                f"~{hours:,.0f} CPU-hours at ~{CPU_SECONDS_PER_STEP:g} s per step")
    if allow_cpu or dry_run:
        print(f"note: {estimate}", file=sys.stderr)
        return None
    return (f"{estimate}. Run them on a GPU machine (or --cluster slurm), narrow them (--datasets/--variants/"
            f"--seeds), try `--profile smoke`, or pass --allow-cpu to start them anyway.")


def merge_archive(grid, args) -> int:
    """--merge: the archive's runs into the runs folder (gbla.run_archive.merge_runs)."""
    runs_root = Path(args.runs_root).resolve() if args.runs_root else grid.runs_root
    try:
        configs = grid.expand(args.datasets, args.variants, args.seeds)
        report = merge_runs(args.merge, runs_root, configs, replace_finished=args.replace_finished)
    except ValueError as e:  # ArchiveError names the archive member and the reason; nothing was written
        print(f"error: {e}", file=sys.stderr)
        return 2
    for name in report.installed:
        print(f"installed {name}")
    for name in report.kept:
        print(f"kept {name} (finished here already)")
    print(f"merge: {report.summary()}")
    return 0


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m gbla.grid", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="full", help="profile of the params file (default: full)")
    ap.add_argument("--params", default=str(DEFAULT_PARAMS.relative_to(REPO_ROOT)), help="params YAML file")
    ap.add_argument("--datasets", nargs="+", help="only these datasets")
    ap.add_argument("--variants", nargs="+", help="only these variants")
    ap.add_argument("--seeds", nargs="+", type=int, help="only these seeds")
    ap.add_argument("--cluster", choices=CLUSTERS, help="local (default) or slurm (dask-jobqueue)")
    ap.add_argument("--runs-per-gpu", dest="runs_per_gpu", type=int,
                    help="concurrent runs per GPU worker (per CPU worker without GPUs)")
    ap.add_argument("--gpus", help="comma-separated GPU ids to use, or 'none' for CPU only (default: all visible)")
    ap.add_argument("--device", help="override runtime.device (auto | cuda | cpu)")
    ap.add_argument("--backend", help="override runtime.backend (auto | torch | triton)")
    ap.add_argument("--step-mode", help="override runtime.step_mode (auto | eager | cuda_graph | compile_cuda_graph)")
    ap.add_argument("--processed-root", help="folder holding the processed datasets")
    ap.add_argument("--runs-root", help="where run folders go (default outputs/runs)")
    ap.add_argument("--dry-run", action="store_true", help="list what would run; run nothing")
    ap.add_argument("--no-aggregate", action="store_true", help="skip the aggregation notebooks")
    ap.add_argument("--force-reports", action="store_true",
                    help="execute the aggregation notebooks even where a report's inputs (notebook, params, "
                         "package source, runs, data) are those it was rendered from")
    ap.add_argument("--time-budget", type=float, metavar="SECONDS",
                    help="stop after about this long: running groups pause (their seeds that stopped early are "
                         "tested and written, the others checkpointed), groups not started stay to do; the same "
                         "command resumes them")
    ap.add_argument("--min-start", type=float, metavar="SECONDS", default=MIN_GROUP_START_S,
                    help="with --time-budget: start a group that has no checkpoint only with at least this long "
                         "left (a group resuming its checkpoint still starts with %(default)g s left); for a last "
                         "command on a machine that goes away after it, about one group's length, so that no "
                         "group is paused with seeds still training in a checkpoint nobody will resume")
    ap.add_argument("--allow-cpu", action="store_true",
                    help="run a grid on real data even without a GPU (CPU-days per run; see the estimate)")
    ap.add_argument("--archive", metavar="PATH.tgz",
                    help="afterwards (also when paused or failed), pack the selected runs that finished or failed "
                         "into this archive, without checkpoints (gbla.run_archive)")
    ap.add_argument("--merge", metavar="PATH.tgz",
                    help="train nothing: merge an archive written by --archive into the runs folder, checking "
                         "each run against this profile (never replaces a finished run)")
    ap.add_argument("--accept-new-data", action="store_true",
                    help="train although a dataset's finished runs were trained on other processed data than "
                         "there is now (those runs become stale and are trained again when selected)")
    ap.add_argument("--replace-finished", action="store_true",
                    help="with --merge: let the archive's finished runs replace finished local ones")
    args = ap.parse_args(argv)
    try:
        grid = load_grid(args.params, args.profile)
    except ParamsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.merge:
        return merge_archive(grid, args)
    gpus = None
    if args.gpus is not None:
        gpus = [] if args.gpus.strip().lower() in ("none", "") else [g.strip() for g in args.gpus.split(",")]
    overrides = {"device": args.device, "backend": args.backend, "step_mode": args.step_mode,
                 "processed_root": str(Path(args.processed_root).resolve()) if args.processed_root else None,
                 "runs_root": str(Path(args.runs_root).resolve()) if args.runs_root else None}
    try:
        refused = check_cpu_cost(grid, grid.expand(args.datasets, args.variants, args.seeds),
                                 processed_root=Path(overrides["processed_root"]) if overrides["processed_root"]
                                 else grid.processed_root, device=args.device, gpus=gpus, cluster=args.cluster,
                                 allow_cpu=args.allow_cpu, dry_run=args.dry_run, runs_root=overrides["runs_root"])
        if refused:
            print(f"error: {refused}", file=sys.stderr)
            return 2
        summary = run_grid(grid, datasets=args.datasets, variants=args.variants, seeds=args.seeds,
                           cluster=args.cluster, runs_per_gpu=args.runs_per_gpu, gpus=gpus, dry_run=args.dry_run,
                           aggregate=not args.no_aggregate, overrides=overrides, time_budget_s=args.time_budget,
                           min_start_s=args.min_start, accept_new_data=args.accept_new_data,
                           force_reports=args.force_reports,
                           command=shlex.join(["python", "-m", "gbla.grid", *(sys.argv[1:] if argv is None else argv)]))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if args.archive and not args.dry_run:
            manifest = pack_runs(grid.runs_root, grid.expand(args.datasets, args.variants, args.seeds), args.archive)
            print(f"archive: {args.archive} ({len(manifest['runs'])} runs, group files of "
                  f"{len(manifest['groups'])} variants)", flush=True)
    if summary.get("interrupted"):
        return 130
    if summary.get("counts", {}).get("paused") or summary.get("counts", {}).get("not_run"):
        return 3  # not an error: the time budget ran out; the same command goes on
    return 1 if summary.get("counts", {}).get("failed") else 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _raise_interrupt)  # a `kill` stops the grid as cleanly as Ctrl-C
    sys.exit(main())
