"""Run directories: how training runs are written to disk, and how runs are read back.

    outputs/runs/<dataset>/<variant>/
        train.ipynb            the executed papermill notebook of the last group of seeds trained
                               together (kept also when it fails); shows every seed's curves
        train-seeds<a-b>.ipynb the notebook of an earlier group of other seeds (e.g. seeds 0-1 trained
                               first, 2-4 later), kept when the next group's notebook takes its place
        run.log                papermill's log of that group (cell outputs as they came)
        checkpoint-<key>.pt    a paused or interrupted group's state (git-ignored; removed when done)
        seed<k>/
            metrics.json           config, its hash, provenance, valid/test metrics, history (written LAST)
            per_user_test.parquet  user, target, rank (int8; 1..10, 0 = miss)
            run.log                a copy of the log of the group that trained it
            error.json             only for failed runs: status, config_hash, error, traceback

A run is done iff metrics.json exists with status "ok", the config hash the grid expects and (when
the grid knows it) the fingerprint of the processed data it would train on now: a result trained on
other data (e.g. semantic IDs from another embedding model) is "stale", never mixed into the report.
A run folder is written as a unit: its files go to a fresh temporary folder, which then replaces the
old one (metrics.json is written last inside it), so an interrupted run never looks complete, a
folder is never half old, half new, and a failed rerun never damages a finished result.
"""
from __future__ import annotations

import json
import math
import os
import traceback as traceback_module
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

# REPO_ROOT, git_commit and METRIC_NAMES are also read as runs.* by notebooks/train.ipynb
from gbla.common import METRIC_NAMES, REPO_ROOT, atomic_write_json, git_commit, read_json, repo_path  # noqa: F401
from gbla.datasets import expected_data_fingerprint

DEFAULT_RUNS_ROOT = REPO_ROOT / "outputs" / "runs"

METRICS_FILE = "metrics.json"
PER_USER_FILE = "per_user_test.parquet"
ERROR_FILE = "error.json"
NOTEBOOK_FILE = "train.ipynb"
LOG_FILE = "run.log"

# where a hand run of notebooks/train.ipynb writes unless told otherwise (git-ignored), so that it
# never overwrites the grid's results in outputs/runs
SCRATCH_RUNS_ROOT = "outputs/scratch/runs"


# ---------------------------------------------------------------------------------------------
# paths

def run_dir_for(root: str | os.PathLike, dataset: str, variant: str, seed: int) -> Path:
    return variant_dir_for(root, dataset, variant) / f"seed{int(seed)}"


def variant_dir_for(root: str | os.PathLike, dataset: str, variant: str) -> Path:
    return Path(root) / dataset / variant


def checkpoint_path(variant_dir: str | os.PathLike, configs) -> Path:
    """The checkpoint of a group: named by its configs' hashes, so another group never resumes it.
    `configs`: RunConfigs, or their hashes (str), in seed order."""
    import hashlib

    hashes = [c if isinstance(c, str) else c.config_hash() for c in configs]
    key = hashlib.sha256(" ".join(hashes).encode()).hexdigest()[:12]
    return Path(variant_dir) / f"checkpoint-{key}.pt"


def notebook_seeds(path: str | os.PathLike) -> list[int] | None:
    """The seeds an executed train notebook trained (papermill's record of its parameters), or None
    where the file does not say (missing, unreadable, not a papermill notebook)."""
    try:
        seeds = json.loads(Path(path).read_text())["metadata"]["papermill"]["parameters"]["seeds"]
        return sorted(int(s) for s in seeds)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def seeds_label(seeds, sep: str = "_") -> str:
    """0-4 for a run of consecutive seeds, the seeds joined by `sep` otherwise (0_2_4: a file-name part)."""
    seeds = sorted(int(s) for s in seeds)
    if len(seeds) > 1 and seeds == list(range(seeds[0], seeds[-1] + 1)):
        return f"{seeds[0]}-{seeds[-1]}"
    return sep.join(map(str, seeds))


def keep_earlier_group_notebook(variant_dir: str | os.PathLike, seeds) -> Path | None:
    """Before a group of `seeds` writes the variant's train.ipynb: if the notebook there trained other
    seeds (an earlier group), move it to train-seeds<its seeds>.ipynb so that each group's executed
    notebook stays. The same seeds (a rerun or a resumed group) are replaced as before; a notebook
    that does not say its seeds too. Returns where the earlier notebook went, or None."""
    current = Path(variant_dir) / NOTEBOOK_FILE
    earlier = notebook_seeds(current)
    if earlier is None or earlier == sorted(int(s) for s in seeds):
        return None
    kept = current.with_name(f"train-seeds{seeds_label(earlier)}.ipynb")
    os.replace(current, kept)
    return kept


def check_expected_hashes(configs, expected: dict | None) -> None:
    """The grid passes {seed: config hash}; refuse to train a config it did not expect."""
    if expected is None:
        return
    expected = {int(k): v for k, v in expected.items()}
    for c in configs:
        if expected.get(c.seed) != c.config_hash():
            raise ValueError(f"seed {c.seed}: this notebook builds config {c.config_hash()}, the grid expected "
                             f"{expected.get(c.seed)}: the params file changed while the grid was running?")


# ---------------------------------------------------------------------------------------------
# provenance

def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------------------------
# writing a run

def _metric_dict(metrics: dict, where: str) -> dict[str, float]:
    missing = [m for m in METRIC_NAMES if m not in metrics]
    if missing:
        raise ValueError(f"{where} lacks metrics {missing}; got {sorted(metrics)}")
    return {m: float(metrics[m]) for m in METRIC_NAMES}


def save_run_result(result, run_dir: str | os.PathLike, *, data_fingerprint: str, commit: str,
                    extra: dict | None = None) -> Path:
    """Write the run folder as a unit (per_user_test.parquet, then metrics.json); a stale error.json or
    an older result in that folder goes with the old folder.

    `result` is a gbla.train.RunResult. `extra` adds keys to metrics.json (e.g. the notebook's
    parameters); it cannot overwrite the contract's keys. Returns the path of metrics.json.
    """
    import pandas as pd

    run_dir = Path(run_dir)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    config = result.config
    if result.config_hash != config.config_hash():
        raise ValueError(f"result.config_hash {result.config_hash} does not match its config "
                         f"({config.config_hash()})")

    per_user = result.test_per_user
    for col in ("user", "target", "rank"):
        if col not in per_user:
            raise ValueError(f"result.test_per_user lacks {col!r}; got {sorted(per_user)}")
    rank = np.asarray(per_user["rank"])
    if rank.size and (rank.min() < 0 or rank.max() > 10):
        raise ValueError(f"test ranks must be in 0..10 (0 = miss), got {rank.min()}..{rank.max()}")
    frame = pd.DataFrame({"user": np.asarray(per_user["user"], dtype=np.int64),
                          "target": np.asarray(per_user["target"], dtype=np.int64),
                          "rank": rank.astype(np.int8)})

    metrics = {
        "status": "ok",
        "dataset": config.dataset,
        "variant": config.variant,
        "seed": int(config.seed),
        "config": config.to_dict(),
        "config_hash": result.config_hash,
        "data_fingerprint": data_fingerprint,
        "commit": commit,
        "device": result.device,
        "created_at": _now(),
        "wall_time_s": float(result.wall_time_s),
        "epochs_trained": int(result.epochs_trained),
        "best_epoch": int(result.best_epoch),
        "valid": _metric_dict(result.valid_metrics, "result.valid_metrics"),
        "test": _metric_dict(result.test_metrics, "result.test_metrics"),
        "timings": dict(result.timings),
        "history": list(result.history),
        "num_test_users": int(len(frame)),
    }
    if getattr(result, "placement", None):
        metrics["placement"] = dict(result.placement)
    for key, value in (extra or {}).items():
        if key in metrics:
            raise ValueError(f"extra key {key!r} would overwrite a metrics.json field")
        metrics[key] = value
    return _replace_dir(run_dir, lambda tmp: (write_per_user(frame, tmp / PER_USER_FILE),
                                              atomic_write_json(tmp / METRICS_FILE, metrics)))


def save_group_results(group, runs_root: str | os.PathLike, checkpoint: str | os.PathLike | None, *,
                       data_fingerprint: str, commit: str, extra: dict | None = None) -> list[Path]:
    """Write what a gbla.train.train_group call gave: each tested seed's run folder (save_run_result),
    then the group's checkpoint. A finished group's checkpoint is removed. A paused group's holds only
    its seeds still training (group.remaining): it is renamed to their checkpoint_path, which is where
    the next call for the seeds not yet done (the grid's) looks for it. Results go first: if the
    process dies in between, those seeds are done and the rest start afresh; nothing finished is lost.
    Returns the metrics.json paths written."""
    written = []
    for result in group.results:
        config = result.config
        written.append(save_run_result(result, run_dir_for(runs_root, config.dataset, config.variant, config.seed),
                                       data_fingerprint=data_fingerprint, commit=commit, extra=extra))
    if checkpoint is not None:
        checkpoint = Path(checkpoint)
        if group.finished:
            checkpoint.unlink(missing_ok=True)
        elif group.remaining and checkpoint.is_file():
            target = checkpoint_path(checkpoint.parent, group.remaining)
            if target != checkpoint:
                os.replace(checkpoint, target)
    return written


# the user ids of a test split are consecutive and the targets small integers: delta-encoded and zstd
# they take ~4x less than pandas' default (41 KB instead of 181 KB for Toys' 19,412 users), which
# matters for a repository that keeps every run of the grid
PER_USER_PARQUET = dict(compression="zstd", use_dictionary=False,
                        column_encoding={"user": "DELTA_BINARY_PACKED", "target": "DELTA_BINARY_PACKED",
                                         "rank": "PLAIN"})


def write_per_user(frame: "pd.DataFrame", path: str | os.PathLike) -> Path:
    """Write a run's per-user results (columns user, target, rank) to `path` in the compact encoding,
    read it back, and keep it only if it equals `frame`; otherwise (a pyarrow that cannot write that
    encoding, or a file that reads back different) pandas' default writer writes it: the same values
    either way, and load_per_user reads both."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    frame = frame.reset_index(drop=True)
    try:
        pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), path, **PER_USER_PARQUET)
        if pd.read_parquet(path).equals(frame):
            return path
    except (pa.ArrowException, TypeError, ValueError):
        pass
    frame.to_parquet(path, index=False)
    return path


def compact_per_user_files(runs_root: str | os.PathLike) -> tuple[int, int, int]:
    """Rewrite every <dataset>/<variant>/seed<k>/per_user_test.parquet under runs_root in the compact
    encoding (write_per_user), each through a temporary file that replaces it only once it reads back
    equal to the original. Returns (files, bytes before, bytes after); nothing else is touched."""
    import pandas as pd

    files = sorted(Path(runs_root).glob(f"*/*/seed*/{PER_USER_FILE}"))
    before = after = 0
    for path in files:
        original = pd.read_parquet(path)
        before += path.stat().st_size
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            write_per_user(original, tmp)
            if not pd.read_parquet(tmp).equals(original.reset_index(drop=True)):
                raise ValueError(f"{path}: the rewritten file reads back different; left as it was")
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        after += path.stat().st_size
    return len(files), before, after


def _replace_dir(run_dir: Path, write) -> Path:
    """Write a run folder as a unit: `write(tmp)` fills a fresh hidden folder beside it, which then
    takes the folder's place (the old folder is renamed away first, put back if the swap fails, and
    deleted once the new one is in place). An interruption leaves the old folder or the new one, never
    a mix; only a hard kill between the two renames leaves the old one under its hidden name."""
    import shutil

    tmp = run_dir.with_name(f".{run_dir.name}.tmp-{uuid.uuid4().hex[:8]}")
    old = run_dir.with_name(f".{run_dir.name}.old-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    moved_away = False
    try:
        write(tmp)
        if run_dir.exists():
            os.replace(run_dir, old)
            moved_away = True
        os.replace(tmp, run_dir)
    except BaseException:
        if moved_away and not run_dir.exists():
            os.replace(old, run_dir)  # the new folder did not arrive: the old one goes back
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return run_dir / METRICS_FILE


def record_failure(run_dir: str | os.PathLike, config_hash: str, error: str | BaseException,
                   traceback: str | None = None, **extra) -> Path:
    """Write error.json for a failed run (the run's notebook and log stay next to it)."""
    if isinstance(error, BaseException):
        if traceback is None:
            traceback = "".join(traceback_module.format_exception(error))
        error = f"{type(error).__name__}: {error}"
    payload = {"status": "failed", "config_hash": config_hash, "error": str(error),
               "traceback": traceback or "", "created_at": _now(), **extra}
    return atomic_write_json(Path(run_dir) / ERROR_FILE, payload)


# ---------------------------------------------------------------------------------------------
# reading runs

def load_run_metrics(run_dir: str | os.PathLike) -> dict | None:
    """metrics.json of a run, or None when the run has not finished."""
    path = Path(run_dir) / METRICS_FILE
    return read_json(path) if path.is_file() else None


def load_failure(run_dir: str | os.PathLike) -> dict | None:
    path = Path(run_dir) / ERROR_FILE
    return read_json(path) if path.is_file() else None


def _data_matches(metrics: dict, data_fingerprint: str | None) -> bool:
    return data_fingerprint is None or metrics.get("data_fingerprint") == data_fingerprint


def is_done(run_dir: str | os.PathLike, config_hash: str, data_fingerprint: str | None = None) -> bool:
    """metrics.json says ok for `config_hash` and, when `data_fingerprint` is given, for that data."""
    metrics = load_run_metrics(run_dir)
    return (bool(metrics) and metrics.get("status") == "ok" and metrics.get("config_hash") == config_hash
            and _data_matches(metrics, data_fingerprint))


def run_status(run_dir: str | os.PathLike, config_hash: str | None = None,
               data_fingerprint: str | None = None) -> str:
    """ok | failed | stale | missing for the run expected to have `config_hash` (None: any config),
    trained on the processed data with `data_fingerprint` (None: any data)."""
    metrics = load_run_metrics(run_dir)
    if (metrics and metrics.get("status") == "ok" and config_hash in (None, metrics.get("config_hash"))
            and _data_matches(metrics, data_fingerprint)):
        return "ok"
    failure = load_failure(run_dir)
    if failure and config_hash in (None, failure.get("config_hash")):
        return "failed"
    if metrics:
        return "stale"
    return "missing"


def load_per_user(run_dir: str | os.PathLike) -> "pd.DataFrame":
    """The per-user test results of a run: columns user, target, rank (1..10, 0 = miss)."""
    import pandas as pd

    path = Path(run_dir) / PER_USER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no per-user results (the run is missing or failed)")
    return pd.read_parquet(path)


def load_history(run_dir: str | os.PathLike) -> "pd.DataFrame":
    """Per-epoch training history of a finished run (one row per epoch)."""
    import pandas as pd

    metrics = load_run_metrics(run_dir)
    if metrics is None:
        raise FileNotFoundError(f"{Path(run_dir) / METRICS_FILE}: the run has not finished")
    return pd.DataFrame(metrics.get("history", []))


def _row(dataset: str, variant: str, seed: int, run_dir: Path, expected_hash: str | None,
         expected_fingerprint: str | None = None) -> dict:
    row: dict[str, Any] = {"dataset": dataset, "variant": variant, "seed": int(seed),
                           "status": run_status(run_dir, expected_hash, expected_fingerprint),
                           "config_hash": expected_hash, "run_dir": str(run_dir)}
    metrics = load_run_metrics(run_dir)
    if row["status"] == "ok":
        row["config_hash"] = metrics["config_hash"]
        for split in ("valid", "test"):
            for name in METRIC_NAMES:
                row[f"{split}_{name}"] = metrics[split][name]
        for key in ("wall_time_s", "epochs_trained", "best_epoch", "device", "commit",
                    "data_fingerprint", "created_at"):
            row[key] = metrics.get(key)
    else:
        for split in ("valid", "test"):
            for name in METRIC_NAMES:
                row[f"{split}_{name}"] = math.nan
        if row["status"] == "failed":
            row["error"] = load_failure(run_dir).get("error")
        if row["status"] == "stale":
            row["stale_config_hash"] = metrics.get("config_hash")
            row["stale_data_fingerprint"] = metrics.get("data_fingerprint")
            reasons = [what for what, differs in (
                ("config", expected_hash is not None and metrics.get("config_hash") != expected_hash),
                ("data", not _data_matches(metrics, expected_fingerprint))) if differs]
            row["stale_reason"] = "+".join(reasons) or f"status {metrics.get('status')!r}"
            if "data" in reasons:   # the data there is now, which the run was not trained on
                row["stale_expected_data_fingerprint"] = expected_fingerprint
    return row


def collect_runs(runs_root: str | os.PathLike = DEFAULT_RUNS_ROOT, expected: Iterable | None = None, *,
                 params_file: str | os.PathLike | None = None, profile: str | None = None,
                 data_fingerprints: Mapping[str, str | None] | None = None) -> "pd.DataFrame":
    """One row per run: dataset, variant, seed, status, config_hash, valid_*/test_* metrics, ...

    With `expected` (RunConfigs) or `params_file` + `profile` (the grid they expand to), there is one
    row per expected run, and runs that did not finish show up with status "missing" (or "failed",
    "stale") and NaN metrics: nothing is silently dropped. Without them, every run directory found
    under runs_root is listed (status ok or failed).

    `data_fingerprints` maps dataset -> fingerprint of its current processed data (see
    expected_data_fingerprint); a run trained on other data is then "stale" (stale_reason "data").
    With `params_file` and no `data_fingerprints`, they are read from the profile's processed_root
    (datasets not built there are not checked).
    """
    import pandas as pd

    runs_root = repo_path(runs_root)   # relative: from the repository root, as notebooks' parameters are
    if expected is None and params_file is not None:
        from gbla.params import load_grid

        grid = load_grid(params_file, profile or "full")
        expected = grid.expand()
        if data_fingerprints is None:
            data_fingerprints = {d: expected_data_fingerprint(d, grid.processed_root, synthetic=grid.synthetic)
                                 for d in grid.datasets}
    data_fingerprints = data_fingerprints or {}
    rows = []
    if expected is not None:
        for cfg in expected:
            run_dir = run_dir_for(runs_root, cfg.dataset, cfg.variant, cfg.seed)
            rows.append(_row(cfg.dataset, cfg.variant, cfg.seed, run_dir, cfg.config_hash(),
                             data_fingerprints.get(cfg.dataset)))
    else:
        found = sorted({p.parent for name in (METRICS_FILE, ERROR_FILE)
                        for p in runs_root.glob(f"*/*/seed*/{name}")})
        for run_dir in found:
            seed_text = run_dir.name.removeprefix("seed")
            if not seed_text.isdigit():
                continue
            rows.append(_row(run_dir.parent.parent.name, run_dir.parent.name, int(seed_text), run_dir, None))
    columns = ["dataset", "variant", "seed", "status", "config_hash"]
    columns += [f"{s}_{m}" for s in ("valid", "test") for m in METRIC_NAMES]
    frame = pd.DataFrame(rows)
    if frame.empty:
        return pd.DataFrame(columns=columns + ["run_dir"])
    return frame[columns + [c for c in frame.columns if c not in columns]]


def load_histories(runs: "pd.DataFrame") -> "pd.DataFrame":
    """Long table of per-epoch histories for the ok rows of collect_runs(): dataset, variant, seed, epoch, ..."""
    import pandas as pd

    parts = []
    for row in runs[runs["status"] == "ok"].itertuples():
        history = load_history(row.run_dir)
        if not history.empty:
            parts.append(history.assign(dataset=row.dataset, variant=row.variant, seed=row.seed))
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(
        columns=["dataset", "variant", "seed", "epoch"])
