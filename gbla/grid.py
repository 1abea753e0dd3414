"""The ablation grid: params/*.yaml -> RunConfigs -> papermill runs dispatched through Dask.

    python -m gbla.grid --profile smoke            # tiny CPU grid on the synthetic dataset
    python -m gbla.grid --profile full --dry-run   # what would run / is done, without running
    python -m gbla.grid --profile full --variants sa hybrid --seeds 0 1

For every (dataset, variant, seed) of the profile: if <runs_root>/<dataset>/<variant>/seed<k>/
metrics.json exists with the same config hash the run is skipped, otherwise notebooks/train.ipynb
is executed with papermill into that folder (log in run.log). A failed run gets error.json next to
its executed notebook and the other runs go on. Then the aggregation notebooks run into
outputs/reports/ (ipynb + HTML) and outputs/runs/summary.json says what ran, was skipped, failed.

Runs execute on a Dask cluster: locally one worker per GPU (pinned with CUDA_VISIBLE_DEVICES) with
`runs_per_gpu` threads, i.e. concurrent runs, each a papermill subprocess; without GPUs a small
LocalCluster; with `--cluster slurm` a dask_jobqueue.SLURMCluster (one job = one worker = one GPU)
fed through exactly the same submit code. On Slurm the repo, its .venv and the runs/reports folders
must be on a file system the compute nodes share (the workers run this venv's python).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import re
import signal
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import yaml

from gbla.config import LAYER_TYPES, GBLAOptions, ModelConfig, RunConfig, TrainConfig
from gbla.data.amazon import DATASETS as AMAZON_DATASETS
from gbla.runs import (ERROR_FILE, LOG_FILE, NOTEBOOK_FILE, REPO_ROOT, SYNTHETIC, _now, atomic_write_json,
                       atomic_write_text, collect_runs, dataset_available, dataset_path, expected_data_fingerprint,
                       git_commit, is_done, record_failure, run_dir_for)

DEFAULT_PARAMS = REPO_ROOT / "params" / "ablations.yaml"
TRAIN_NOTEBOOK = REPO_ROOT / "notebooks" / "train.ipynb"
KERNEL_NAME = "python3"

TOP_LEVEL_KEYS = {"datasets", "seeds", "model", "train", "variants", "synthetic", "runtime", "dask", "profiles"}
PROFILE_KEYS = {"description", "datasets", "seeds", "variants", "model", "train", "synthetic", "runtime", "dask"}
VARIANT_KEYS = {"name", "description", "encoder_layout", "gbla", "model"}
RUNTIME_DEFAULTS: dict[str, Any] = {
    "device": "auto", "backend": "auto", "processed_root": None, "runs_root": "outputs/runs",
    "reports_root": "outputs/reports", "cell_timeout_s": None, "reports": ["notebooks/aggregate.ipynb"]}
DASK_DEFAULTS: dict[str, Any] = {
    "cluster": "local", "gpus": "auto", "runs_per_gpu": 2, "cpu_workers": 1, "runs_per_cpu_worker": 2,
    "slurm": {}}
CLUSTERS = ("local", "slurm")
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # names become folder names
# what `make data` can build, plus the generated dataset: a typo must not send the user to `make data`
KNOWN_DATASETS = (*AMAZON_DATASETS, SYNTHETIC)


def check_dataset_names(names: Iterable[str]) -> None:
    unknown = [d for d in names if d not in KNOWN_DATASETS]
    if unknown:
        raise ValueError(f"unknown dataset{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
                         f"known datasets: {', '.join(KNOWN_DATASETS)}")


# ---------------------------------------------------------------------------------------------
# parsing params/*.yaml, with errors that name the file, the line and the key

class ParamsError(ValueError):
    """A bad entry in a params file; the message names the file, line and key."""


def _fmt_path(path: Sequence[Any]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "<top level>"


class _Source:
    """The parsed YAML plus the line of every key, to point errors at the right place."""

    def __init__(self, path: Path):
        self.path = path
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise ParamsError(f"{path}: params file not found") from None
        try:
            root = yaml.compose(text, Loader=yaml.SafeLoader)
            self.data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ParamsError(f"{path}: not valid YAML: {e}") from None
        self.lines: dict[tuple, int] = {}
        if root is not None:
            self._index(root, ())
        if not isinstance(self.data, dict):
            raise ParamsError(f"{path}: expected a mapping at the top level, got {type(self.data).__name__}")

    def _index(self, node, path: tuple) -> None:
        self.lines.setdefault(path, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            seen: dict[str, int] = {}
            for key, value in node.value:
                k = key.value
                if k in seen:  # PyYAML would silently keep the last one
                    raise ParamsError(f"{self.path}:{key.start_mark.line + 1}: {_fmt_path(path + (k,))}: "
                                      f"duplicate key (first at line {seen[k]})")
                seen[k] = key.start_mark.line + 1
                self.lines[path + (k,)] = key.start_mark.line + 1
                self._index(value, path + (k,))
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                self._index(item, path + (i,))

    def error(self, path: Sequence[Any], message: str) -> ParamsError:
        path = tuple(path)
        line = None
        for n in range(len(path), -1, -1):  # the deepest part of the path that exists in the file
            line = self.lines.get(path[:n])
            if line is not None:
                break
        where = f"{self.path}:{line}" if line else str(self.path)
        return ParamsError(f"{where}: {_fmt_path(path)}: {message}")


def _type_ok(value: Any, type_name: str) -> Any:
    """Check (and for numbers, lightly coerce) a value against a dataclass field's annotation."""
    optional = type_name.endswith("| None")
    base = type_name.replace("| None", "").strip()
    if value is None:
        if optional:
            return None
        raise TypeError(f"must be {base}, got null")
    if base == "bool":
        if isinstance(value, bool):
            return value
    elif base == "int":
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif base == "float":
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif base == "str":
        if isinstance(value, str):
            return value
    elif base.startswith("tuple"):
        if isinstance(value, list):
            return tuple(value)
    else:
        return value
    raise TypeError(f"must be {base}{' or null' if optional else ''}, got {type(value).__name__} {value!r}")


def _check_fields(src: _Source, path: tuple, mapping: Any, cls, exclude: Iterable[str] = (),
                  what: str = "option") -> dict:
    if mapping is None:
        return {}
    if not isinstance(mapping, dict):
        raise src.error(path, f"expected a mapping, got {type(mapping).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in set(exclude)}
    out = {}
    for key, value in mapping.items():
        if key not in fields:
            hint = " (set it per variant)" if key in exclude else ""
            raise src.error(path + (key,), f"unknown {what} {key!r}{hint}; known: {', '.join(sorted(fields))}")
        try:
            out[key] = _type_ok(value, str(fields[key].type))
        except TypeError as e:
            raise src.error(path + (key,), str(e)) from None
    return out


def _name_list(src: _Source, path: tuple, value: Any, what: str) -> list[str]:
    if not isinstance(value, list) or not value:
        raise src.error(path, f"expected a non-empty list of {what} names")
    for i, name in enumerate(value):
        if not isinstance(name, str) or not SAFE_NAME.match(name):
            raise src.error(path + (i,), f"{what} name must be a string of letters, digits, '.', '_', '-', "
                                         f"got {name!r}")
    if len(set(value)) != len(value):
        raise src.error(path, f"duplicate {what} names in {value}")
    return list(value)


def _dataset_list(src: _Source, path: tuple, value: Any) -> list[str]:
    names = _name_list(src, path, value, "dataset")
    for i, name in enumerate(names):
        try:
            check_dataset_names([name])
        except ValueError as e:
            raise src.error(path + (i,), str(e)) from None
    return names


def _seed_list(src: _Source, path: tuple, value: Any) -> list[int]:
    if not isinstance(value, list) or not value:
        raise src.error(path, "expected a non-empty list of integer seeds")
    for i, s in enumerate(value):
        if not isinstance(s, int) or isinstance(s, bool) or s < 0:
            raise src.error(path + (i,), f"seed must be a non-negative integer, got {s!r}")
    if len(set(value)) != len(value):
        raise src.error(path, f"duplicate seeds in {value}")
    return list(value)


def _known_keys(src: _Source, path: tuple, mapping: Any, known: Iterable[str], what: str) -> dict:
    if mapping is None:
        return {}
    if not isinstance(mapping, dict):
        raise src.error(path, f"expected a mapping, got {type(mapping).__name__}")
    for key in mapping:
        if key not in known:
            raise src.error(path + (key,), f"unknown {what} {key!r}; known: {', '.join(sorted(known))}")
    return dict(mapping)


@dataclass(frozen=True)
class Variant:
    name: str
    encoder_layout: tuple[str, ...]
    gbla: dict = field(default_factory=dict)    # GBLAOptions fields
    model: dict = field(default_factory=dict)   # other ModelConfig overrides
    description: str = ""


def _parse_variant(src: _Source, i: int, entry: Any) -> Variant:
    path = ("variants", i)
    if not isinstance(entry, dict):
        raise src.error(path, "each variant is a mapping with name, encoder_layout and optional gbla / model")
    label = path + (entry["name"],) if isinstance(entry.get("name"), str) else path
    _known_keys(src, path, entry, VARIANT_KEYS, "variant field")
    for required in ("name", "encoder_layout"):
        if required not in entry:
            raise src.error(label, f"missing required field {required!r}")
    name = _name_list(src, path + ("name",), [entry["name"]], "variant")[0]
    layout = entry["encoder_layout"]
    if not isinstance(layout, list) or not layout:
        raise src.error(path + ("encoder_layout",), "expected a non-empty list of layer types")
    for j, layer in enumerate(layout):
        if layer not in LAYER_TYPES:
            raise src.error(path + ("encoder_layout", j),
                            f"unknown layer type {layer!r} in variant {name!r}; known: {', '.join(LAYER_TYPES)}")
    gbla = _check_fields(src, path + ("gbla",), entry.get("gbla"), GBLAOptions, what="GBLA option")
    if "gbla" in entry and "gbla" not in layout:
        raise src.error(path + ("gbla",), f"variant {name!r} sets GBLA options but its encoder_layout has no "
                                          f"gbla layer")
    try:
        GBLAOptions(**gbla)
    except (ValueError, TypeError) as e:
        raise src.error(path + ("gbla",), str(e)) from None
    model = _check_fields(src, path + ("model",), entry.get("model"), ModelConfig,
                          exclude=("encoder_layout", "gbla"), what="model field")
    return Variant(name=name, encoder_layout=tuple(layout), gbla=gbla, model=model,
                   description=str(entry.get("description") or ""))


@dataclass
class Grid:
    """One profile of a params file, resolved: everything needed to build its RunConfigs."""
    params_file: Path
    profile: str
    datasets: list[str]
    seeds: list[int]
    variant_names: list[str]          # the profile's variants, in file order
    variants: dict[str, Variant]      # every variant defined in the file
    model: dict
    train: dict
    synthetic: dict
    runtime: dict
    dask: dict

    def run_config(self, dataset: str, variant: str, seed: int, *, train_overrides: dict | None = None,
                   model_overrides: dict | None = None) -> RunConfig:
        if variant not in self.variants:
            raise KeyError(f"{self.params_file}: no variant {variant!r}; defined: {', '.join(self.variants)}")
        v = self.variants[variant]
        model = {**self.model, **v.model, **(model_overrides or {}),
                 "encoder_layout": v.encoder_layout, "gbla": GBLAOptions(**v.gbla)}
        train = {**self.train, **{k: val for k, val in (train_overrides or {}).items() if val is not None}}
        return RunConfig(dataset=dataset, variant=variant, seed=int(seed), model=ModelConfig(**model),
                         train=TrainConfig(**train))

    def expand(self, datasets: Sequence[str] | None = None, variants: Sequence[str] | None = None,
               seeds: Sequence[int] | None = None) -> list[RunConfig]:
        """Every run of the profile (optionally narrowed), dataset-major, then variant, then seed."""
        check_dataset_names(datasets or [])
        unknown = [v for v in (variants or []) if v not in self.variants]
        if unknown:
            raise ValueError(f"{self.params_file}: unknown variants {unknown}; defined: {', '.join(self.variants)}")
        return [self.run_config(d, v, s) for d in (datasets or self.datasets)
                for v in (variants or self.variant_names) for s in (seeds or self.seeds)]

    def path(self, key: str) -> Path | None:
        """A runtime path (runs_root, reports_root, processed_root); relative ones are under the repo root."""
        value = self.runtime.get(key)
        if value is None:
            return None
        p = Path(value).expanduser()
        return p if p.is_absolute() else REPO_ROOT / p

    @property
    def runs_root(self) -> Path:
        return self.path("runs_root")

    @property
    def reports_root(self) -> Path:
        return self.path("reports_root")

    @property
    def processed_root(self) -> Path | None:
        return self.path("processed_root")


def _merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def load_grid(params_file: str | os.PathLike = DEFAULT_PARAMS, profile: str = "full") -> Grid:
    """Parse and validate a params file (every profile) and resolve `profile`.

    Relative params paths are taken from the repo root when they do not exist from the cwd.
    """
    params_file = Path(params_file)
    if not params_file.is_absolute() and not params_file.exists() and (REPO_ROOT / params_file).exists():
        params_file = REPO_ROOT / params_file
    src = _Source(params_file)
    data = src.data
    _known_keys(src, (), data, TOP_LEVEL_KEYS, "top-level key")
    for required in ("datasets", "seeds", "variants", "profiles"):
        if required not in data:
            raise src.error((), f"missing required key {required!r}")
    datasets = _dataset_list(src, ("datasets",), data["datasets"])
    seeds = _seed_list(src, ("seeds",), data["seeds"])
    model = _check_fields(src, ("model",), data.get("model"), ModelConfig, exclude=("encoder_layout", "gbla"),
                          what="model field")
    train = _check_fields(src, ("train",), data.get("train"), TrainConfig, what="train field")
    if not isinstance(data["variants"], list) or not data["variants"]:
        raise src.error(("variants",), "expected a non-empty list of variants")
    variants: dict[str, Variant] = {}
    for i, entry in enumerate(data["variants"]):
        v = _parse_variant(src, i, entry)
        if v.name in variants:
            raise src.error(("variants", i, "name"), f"variant {v.name!r} is defined twice")
        variants[v.name] = v
    synthetic = _known_keys(src, ("synthetic",), data.get("synthetic"), _synthetic_keys(), "synthetic option")
    runtime = _merge(RUNTIME_DEFAULTS, _known_keys(src, ("runtime",), data.get("runtime"), RUNTIME_DEFAULTS,
                                                    "runtime option"))
    dask_cfg = _merge(DASK_DEFAULTS, _known_keys(src, ("dask",), data.get("dask"), DASK_DEFAULTS, "dask option"))

    profiles = data["profiles"]
    if not isinstance(profiles, dict) or not profiles:
        raise src.error(("profiles",), "expected a mapping of profile names to settings")
    resolved = {}
    for name, prof in profiles.items():
        path = ("profiles", name)
        prof = _known_keys(src, path, prof, PROFILE_KEYS, "profile key")
        p_variants = (_name_list(src, path + ("variants",), prof["variants"], "variant")
                      if "variants" in prof else list(variants))
        for j, v in enumerate(p_variants):
            if v not in variants:
                raise src.error(path + ("variants", j), f"unknown variant {v!r}; defined: {', '.join(variants)}")
        p_model = _check_fields(src, path + ("model",), prof.get("model"), ModelConfig,
                                exclude=("encoder_layout", "gbla"), what="model field")
        p_train = _check_fields(src, path + ("train",), prof.get("train"), TrainConfig, what="train field")
        p_runtime = _known_keys(src, path + ("runtime",), prof.get("runtime"), RUNTIME_DEFAULTS, "runtime option")
        p_dask = _known_keys(src, path + ("dask",), prof.get("dask"), DASK_DEFAULTS, "dask option")
        grid = Grid(
            params_file=params_file, profile=name,
            datasets=_dataset_list(src, path + ("datasets",), prof["datasets"])
            if "datasets" in prof else datasets,
            seeds=_seed_list(src, path + ("seeds",), prof["seeds"]) if "seeds" in prof else seeds,
            variant_names=p_variants, variants=variants,
            model={**model, **p_model}, train={**train, **p_train},
            synthetic={**synthetic, **_known_keys(src, path + ("synthetic",), prof.get("synthetic"),
                                                   _synthetic_keys(), "synthetic option")},
            runtime=_merge(runtime, p_runtime), dask=_merge(dask_cfg, p_dask))
        _check_runtime(src, path, grid)
        try:  # every variant must build a valid config under this profile's settings
            for v in grid.variant_names:
                grid.run_config(grid.datasets[0], v, grid.seeds[0])
        except (ValueError, TypeError) as e:
            raise src.error(path, f"variant {v!r} does not give a valid config: {e}") from None
        resolved[name] = grid
    if profile not in resolved:
        raise ParamsError(f"{params_file}: no profile {profile!r}; defined: {', '.join(resolved)}")
    return resolved[profile]


def _synthetic_keys() -> set[str]:
    """Keyword arguments of make_synthetic_dataset (any, if the module cannot be inspected)."""
    import inspect

    try:
        from gbla.data.synthetic import make_synthetic_dataset
    except ImportError:
        return {"num_users", "num_items", "seed"}
    params = inspect.signature(make_synthetic_dataset).parameters
    return {n for n, p in params.items() if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}


def _check_runtime(src: _Source, path: tuple, grid: Grid) -> None:
    d = grid.dask
    if d["cluster"] not in CLUSTERS:
        raise src.error(path + ("dask", "cluster"), f"must be one of {CLUSTERS}, got {d['cluster']!r}")
    for key in ("runs_per_gpu", "cpu_workers", "runs_per_cpu_worker"):
        if not isinstance(d[key], int) or isinstance(d[key], bool) or d[key] < 1:
            raise src.error(path + ("dask", key), f"must be a positive integer, got {d[key]!r}")
    if d["gpus"] != "auto" and not (isinstance(d["gpus"], list) and all(isinstance(g, (int, str)) for g in d["gpus"])):
        raise src.error(path + ("dask", "gpus"), f"must be 'auto' or a list of device ids, got {d['gpus']!r}")
    if not isinstance(d["slurm"], dict):
        raise src.error(path + ("dask", "slurm"), "expected a mapping of dask_jobqueue.SLURMCluster options")
    if not isinstance(grid.runtime["reports"], list):
        raise src.error(path + ("runtime", "reports"), "expected a list of notebook paths")


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
class RunTask:
    dataset: str
    variant: str
    seed: int
    config_hash: str
    run_dir: str
    notebook: str
    parameters: dict
    cpu_threads: int
    cell_timeout_s: int | None = None

    @property
    def label(self) -> str:
        return f"{self.dataset}/{self.variant}/seed{self.seed}"


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


def _tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def execute_run(task: RunTask) -> dict:
    """Execute notebooks/train.ipynb for one run with papermill (a subprocess) into its run dir.

    Never raises for a failed run: the failure is written to error.json and returned as an outcome.
    """
    run_dir = Path(task.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / ERROR_FILE).unlink(missing_ok=True)  # an earlier failure no longer describes this run
    threads = str(task.cpu_threads)
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-c", _EXEC_TIED_TO_PARENT, "-m", "papermill", task.notebook,
           str(run_dir / NOTEBOOK_FILE), "--kernel", KERNEL_NAME, "--cwd", str(run_dir), "--log-output",
           "--no-progress-bar", "--parameters_yaml", yaml.safe_dump(task.parameters, sort_keys=False)]
    if task.cell_timeout_s:
        cmd += ["--execution-timeout", str(int(task.cell_timeout_s))]
    outcome = {"dataset": task.dataset, "variant": task.variant, "seed": task.seed,
               "config_hash": task.config_hash, "run_dir": str(run_dir), "host": os.uname().nodename,
               "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}
    try:
        from distributed import get_worker

        outcome["worker"] = str(get_worker().name)
    except (ImportError, ValueError):
        outcome["worker"] = None
    start = time.time()
    with open(run_dir / LOG_FILE, "w") as log:
        log.write(f"# {_now()} {task.label} config {task.config_hash} on {outcome['host']} "
                  f"worker {outcome['worker']} CUDA_VISIBLE_DEVICES={outcome['cuda_visible_devices']}\n")
        log.flush()
        # a session of its own: a Ctrl-C in the terminal reaches the grid, which shuts the workers down
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=run_dir,
                              start_new_session=True)
    outcome["wall_s"] = round(time.time() - start, 2)
    if proc.returncode == 0 and is_done(run_dir, task.config_hash):
        return {**outcome, "outcome": "ran"}
    found = notebook_error(run_dir / NOTEBOOK_FILE)
    if found:
        error, tb = found
    elif proc.returncode == 0:
        error, tb = (f"the notebook finished but {run_dir}/metrics.json does not have config hash "
                     f"{task.config_hash}", "")
    else:
        error, tb = f"papermill exited with code {proc.returncode}", _tail(run_dir / LOG_FILE)
    record_failure(run_dir, task.config_hash, error, tb, log=str(run_dir / LOG_FILE))
    return {**outcome, "outcome": "failed", "error": error}


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

def make_task(grid: Grid, config: RunConfig, cpu_threads: int, overrides: dict | None = None) -> RunTask:
    overrides = overrides or {}
    runs_root = grid.runs_root
    processed_root = overrides.get("processed_root") or grid.processed_root
    parameters = {
        "dataset": config.dataset, "variant": config.variant, "seed": config.seed,
        "params_file": str(grid.params_file.resolve()), "profile": grid.profile,
        "processed_root": str(processed_root) if processed_root else None,
        "runs_root": str(runs_root),
        "device": overrides.get("device") or grid.runtime["device"],
        "backend": overrides.get("backend") or grid.runtime["backend"],
        "expected_config_hash": config.config_hash(), "progress": False}
    return RunTask(dataset=config.dataset, variant=config.variant, seed=config.seed,
                   config_hash=config.config_hash(),
                   run_dir=str(run_dir_for(runs_root, config.dataset, config.variant, config.seed)),
                   notebook=str(TRAIN_NOTEBOOK), parameters=parameters, cpu_threads=cpu_threads,
                   cell_timeout_s=grid.runtime.get("cell_timeout_s"))


def _failed_outcome(task: RunTask, exc: BaseException) -> dict:
    """A task that died outside execute_run (e.g. its worker was killed): record it like any failure."""
    record_failure(task.run_dir, task.config_hash, exc)
    return {"dataset": task.dataset, "variant": task.variant, "seed": task.seed, "config_hash": task.config_hash,
            "run_dir": task.run_dir, "outcome": "failed", "error": f"{type(exc).__name__}: {exc}"}


def dispatch(grid: Grid, tasks: list[RunTask], kind: str, *, total: int, done_before: int,
             gpus: list[str] | None = None, log=print) -> tuple[list[dict], bool]:
    """Run the tasks on a Dask cluster, with a progress bar over the whole grid.

    Returns (outcomes in finish order, interrupted). On Ctrl-C / SIGTERM the cluster is shut down,
    which ends the running notebooks (their runs stay not done); finished runs are already on disk.
    """
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
            fut = client.submit(execute_run, task, key=f"run-{task.label}-{task.config_hash}", pure=False,
                                retries=0)
            futures[fut] = task
        failed = 0
        with tqdm(total=total, initial=done_before, desc=f"grid {grid.profile}", unit="run",
                  dynamic_ncols=True) as bar:
            for fut in as_completed(futures):
                task = futures[fut]
                try:
                    outcome = fut.result()
                except Exception as exc:  # noqa: BLE001 - any error of one run must not stop the grid
                    outcome = _failed_outcome(task, exc)
                outcomes.append(outcome)
                if outcome["outcome"] == "failed":
                    failed += 1
                    bar.write(f"FAILED {task.label}: {outcome.get('error')}  (log: {task.run_dir}/{LOG_FILE})")
                bar.set_postfix(failed=failed, refresh=False)
                bar.update(1)
    except KeyboardInterrupt:
        interrupted = True
        log("\ninterrupted: finished runs are kept; run the same command again to do the rest")
    finally:
        client.close()
        cluster.close()
    return outcomes, interrupted


def ipc_kernel_manager_class():
    """A jupyter_client kernel manager that talks to the kernel over Unix sockets in a private
    temporary folder instead of TCP on localhost: nothing else on the machine can connect, and the
    kernel does not log "Kernel is running over TCP without encryption" into every report.
    Pass it to papermill: pm.execute_notebook(..., kernel_manager_class=ipc_kernel_manager_class())."""
    import shutil
    import tempfile

    from jupyter_client.manager import AsyncKernelManager

    class IPCKernelManager(AsyncKernelManager):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self._ipc_dir = tempfile.mkdtemp(prefix="gbla-kernel-")
            self.transport, self.ip = "ipc", os.path.join(self._ipc_dir, "k")

        async def _async_cleanup_resources(self, restart: bool = False) -> None:
            await super()._async_cleanup_resources(restart=restart)
            if not restart:
                shutil.rmtree(self._ipc_dir, ignore_errors=True)

        cleanup_resources = _async_cleanup_resources

    return IPCKernelManager


def run_reports(grid: Grid, notebooks: Iterable[str], log=print) -> list[dict]:
    """Execute the aggregation notebooks into reports_root (<stem>-<profile>.ipynb) and render HTML."""
    import papermill as pm
    from nbconvert import HTMLExporter

    results = []
    reports_root = grid.reports_root
    reports_root.mkdir(parents=True, exist_ok=True)
    for nb in notebooks:
        src = Path(nb) if Path(nb).is_absolute() else REPO_ROOT / nb
        if not src.is_file():
            warnings.warn(f"report notebook {src} does not exist; skipped", stacklevel=2)
            log(f"WARNING: report notebook {src} does not exist; skipped")
            results.append({"notebook": str(src), "status": "skipped", "error": "notebook not found"})
            continue
        out = reports_root / f"{src.stem}-{grid.profile}.ipynb"
        html = out.with_suffix(".html")
        wanted = {"runs_root": str(grid.runs_root), "params_file": str(grid.params_file.resolve()),
                  "profile": grid.profile, "output": str(reports_root), "output_dir": str(reports_root)}
        declared = pm.inspect_notebook(str(src))
        params = {k: v for k, v in wanted.items() if k in declared} if declared else wanted
        entry = {"notebook": str(src), "ipynb": str(out), "html": str(html), "status": "ok"}
        log(f"report: {src.relative_to(REPO_ROOT) if src.is_relative_to(REPO_ROOT) else src} -> {out}")
        try:
            pm.execute_notebook(str(src), str(out), parameters=params, kernel_name=KERNEL_NAME,
                                cwd=str(reports_root), progress_bar=False,
                                kernel_manager_class=ipc_kernel_manager_class())
        except Exception as exc:  # noqa: BLE001 - keep the executed notebook (it shows the error) and go on
            entry.update(status="failed", error=f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1:]}")
            log(f"report FAILED: {entry['error']}")
        if out.is_file():
            body, _ = HTMLExporter().from_filename(str(out))
            atomic_write_text(html, body)
        results.append(entry)
    return results


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


def run_grid(grid: Grid, *, datasets=None, variants=None, seeds=None, cluster: str | None = None,
             runs_per_gpu: int | None = None, gpus: list[str] | None = None, dry_run: bool = False,
             aggregate: bool = True, overrides: dict | None = None, log=print) -> dict:
    """Expand, skip what is done, dispatch the rest, write summary.json, run the reports."""
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
    # seed-major: an interrupted grid still has every variant of the first seeds
    order = {v: i for i, v in enumerate(grid.variant_names)}
    todo.sort(key=lambda c: (c.seed, c.dataset, order.get(c.variant, 0)))
    log(f"grid {grid.profile} ({grid.params_file}): {len(configs)} runs = {len(set(c.dataset for c in configs))} "
        f"datasets x {len(set(c.variant for c in configs))} variants x {len(set(c.seed for c in configs))} seeds; "
        f"{len(done)} done, {len(todo)} to run on {plan.description}")
    log(f"runs: {runs_root}")
    other_data = [c for c in todo if is_done(run_dir_for(runs_root, c.dataset, c.variant, c.seed), c.config_hash())]
    if other_data:
        log(f"{len(other_data)} runs have results trained on other data than the processed data there now "
            f"(fingerprints {fingerprints}): stale, to be run again")
    if dry_run:
        for c in todo:
            log(f"  would run {c.dataset}/{c.variant}/seed{c.seed} (config {c.config_hash()})")
        absent = sorted({c.dataset for c in todo if not dataset_available(c.dataset, processed_root)})
        if absent:
            log(f"  processed data missing for {absent}: `make data` builds it")
        return {"profile": grid.profile, "total": len(configs), "done": len(done), "to_run": len(todo)}

    check_datasets(sorted({c.dataset for c in todo}), processed_root)
    tasks = [make_task(grid, c, plan.cpu_threads, overrides) for c in todo]
    outcomes, interrupted = [], False
    if tasks:
        outcomes, interrupted = dispatch(grid, tasks, kind, total=len(configs), done_before=len(done),
                                         gpus=gpus, log=log)
    ran = [o for o in outcomes if o["outcome"] == "ran"]
    failed = [o for o in outcomes if o["outcome"] == "failed"]
    finished = {(o["dataset"], o["variant"], o["seed"]) for o in outcomes}
    runs = [{"dataset": c.dataset, "variant": c.variant, "seed": c.seed, "config_hash": c.config_hash(),
             "outcome": "skipped", "run_dir": str(run_dir_for(runs_root, c.dataset, c.variant, c.seed))}
            for c in done]
    runs += outcomes
    runs += [{"dataset": t.dataset, "variant": t.variant, "seed": t.seed, "config_hash": t.config_hash,
              "outcome": "not-run", "run_dir": t.run_dir}
             for t in tasks if (t.dataset, t.variant, t.seed) not in finished]
    summary = {"profile": grid.profile, "params_file": str(grid.params_file), "commit": git_commit(),
               "cluster": plan.description, "started_at": started, "finished_at": _now(),
               "wall_s": round(time.time() - t0, 1), "interrupted": interrupted,
               "counts": {"total": len(configs), "skipped": len(done), "ran": len(ran), "failed": len(failed),
                          "not_run": len(runs) - len(done) - len(ran) - len(failed)},
               "runs": runs, "reports": []}
    summary_path = runs_root / "summary.json"
    atomic_write_json(summary_path, summary)
    if aggregate and not interrupted:
        summary["reports"] = run_reports(grid, grid.runtime["reports"], log=log)
        summary["wall_s"] = round(time.time() - t0, 1)
        atomic_write_json(summary_path, summary)

    frame = collect_runs(runs_root, configs, data_fingerprints=fingerprints)
    log("")
    log(results_table(frame))
    log("")
    c = summary["counts"]
    log(f"summary: {c['total']} runs: {c['skipped']} skipped (done before), {c['ran']} ran, {c['failed']} failed"
        + (f", {c['not_run']} not run (interrupted)" if c["not_run"] else "") + f"  [{summary['wall_s']} s]")
    for o in failed:
        log(f"  FAILED {o['dataset']}/{o['variant']}/seed{o['seed']}: {o.get('error')}")
        log(f"         see {o['run_dir']}/{ERROR_FILE}, {NOTEBOOK_FILE}, {LOG_FILE}")
    for r in summary["reports"]:
        log(f"  report {r['status']}: {r.get('html') or r['notebook']}" + (f" ({r['error']})" if r.get("error") else ""))
    log(f"summary written to {summary_path}")
    return summary


# CPU seconds per training step of the paper-size model (batch 256): measured 13 s (encoder input 25
# tokens) to 24 s (41 tokens) per eager `sa` step with 2 torch threads on a shared, loaded 2-core x86
# machine; 10 s is a round, optimistic yardstick for the warning below, not a benchmark. On an H100 one
# Beauty run to early stopping took ~7 min (outputs/pilot).
CPU_SECONDS_PER_STEP = 10.0


def train_examples(dataset: str, processed_root: Path | None, synthetic: dict) -> int:
    """Training examples of a dataset: from its meta.json when built, else from the published counts
    (leave-one-out on 5-core data: interactions - 3 x users)."""
    from gbla.data.amazon import PUBLISHED_COUNTS
    from gbla.runs import load_dataset

    if dataset == SYNTHETIC:
        return len(load_dataset(dataset, synthetic=synthetic).train)
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
    ap.add_argument("--runs-per-gpu", "--workers-per-gpu", dest="runs_per_gpu", type=int,
                    help="concurrent runs per GPU worker (per CPU worker without GPUs)")
    ap.add_argument("--gpus", help="comma-separated GPU ids to use, or 'none' for CPU only (default: all visible)")
    ap.add_argument("--device", help="override runtime.device (auto | cuda | cpu)")
    ap.add_argument("--backend", help="override runtime.backend (auto | torch | triton)")
    ap.add_argument("--processed-root", help="folder holding the processed datasets")
    ap.add_argument("--runs-root", help="where run folders go (default outputs/runs)")
    ap.add_argument("--dry-run", action="store_true", help="list what would run; run nothing")
    ap.add_argument("--no-aggregate", action="store_true", help="skip the aggregation notebooks")
    ap.add_argument("--allow-cpu", action="store_true",
                    help="run a grid on real data even without a GPU (CPU-days per run; see the estimate)")
    args = ap.parse_args(argv)
    try:
        grid = load_grid(args.params, args.profile)
    except ParamsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    gpus = None
    if args.gpus is not None:
        gpus = [] if args.gpus.strip().lower() in ("none", "") else [g.strip() for g in args.gpus.split(",")]
    overrides = {"device": args.device, "backend": args.backend,
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
                           aggregate=not args.no_aggregate, overrides=overrides)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if summary.get("interrupted"):
        return 130
    return 1 if summary.get("counts", {}).get("failed") else 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _raise_interrupt)  # a `kill` stops the grid as cleanly as Ctrl-C
    sys.exit(main())
