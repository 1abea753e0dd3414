"""Finished runs as one archive, and that archive merged back into a runs folder.

A grid that trains on another machine (a GPU box whose files do not come back by themselves) hands
its results over as one file:

    python -m gbla.grid --profile full --datasets beauty --variants sa hybrid --archive runs.tgz
    python -m gbla.grid --profile full --merge runs.tgz          # on the machine that keeps the results

`pack_runs` writes the run folders of the given configs that are finished (metrics.json) or failed
(error.json), the group files (the executed train notebook, run.log, dispatch.jsonl) of each variant
folder with such a run or with a dispatch.jsonl, and a manifest ("runs"; "groups": each variant whose
group files are in, with the files' names and whether runs of it are in too), to a gzipped tar. So a
group that paused at the time budget (no run finished yet) still hands over its dispatch records and
the log of that execution: the remote folder may be gone before the group resumes, and the resumed
execution's log and dispatch file then hold only what came after. Checkpoints never go in: a paused
group's checkpoint (hundreds of MB) stays where its group resumes, and the archive stays small.

`merge_runs` checks every run of the archive before it writes anything: a metrics.json that parses,
says "ok", names a config hash the params profile expects for that (dataset, variant, seed), and sits
beside its per_user_test.parquet; a failed run must name an expected hash too; group files must
belong to a (dataset, variant) of the profile, also when the archive has no run of it. It then
installs each run folder as a unit (gbla.runs._replace_dir), and never replaces a finished run with
another one: a local run that is ok for the same config and data stays (reported as "kept";
--replace-finished overrides). A run the archive has as failed never replaces a local finished one.
Group files are merged for every variant the archive has them for, so that archives of the same group
merged one after another (paused, then finished) keep every execution's records:

    dispatch.jsonl  the archive's lines that are not here yet are appended
    run.log         installed when there is none here; replaced when the archive's log continues the
                    local one (starts with it); kept when the local one already holds the archive's;
                    otherwise each execution's section of it (from its "# <date> ..." header) that the
                    local one lacks is added (executions whose logs the remote no longer had, or a
                    remote copy of the local tree taken before the previous archive was merged) and
                    the sections are put in the order of their headers' dates, so that none is
                    repeated and an execution merged late still reads before those that followed it
    train.ipynb     replaced when runs of that variant are installed, installed when there is none here;
                    a local notebook of another group of seeds is kept as train-seeds<its seeds>.ipynb

Merging the same archive again changes nothing. A bad archive is refused as a whole, naming the
member and the reason; nothing is written.
"""
from __future__ import annotations

import io
import json
import os
import re
import shutil
import tarfile
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable

from gbla.common import atomic_path
from gbla.runs import (ERROR_FILE, LOG_FILE, METRICS_FILE, NOTEBOOK_FILE, PER_USER_FILE, _now, _replace_dir,
                       keep_earlier_group_notebook, load_failure, load_run_metrics, notebook_seeds, run_dir_for,
                       run_status, variant_dir_for)

MANIFEST = "archive_manifest.json"
DISPATCH_FILE = "dispatch.jsonl"
GROUP_FILES = (NOTEBOOK_FILE, LOG_FILE, DISPATCH_FILE)
RUN_FILES = (METRICS_FILE, PER_USER_FILE, LOG_FILE, ERROR_FILE, NOTEBOOK_FILE)


class ArchiveError(ValueError):
    """The archive cannot be merged (nothing was written)."""


def pack_runs(runs_root: str | os.PathLike, configs: Iterable, path: str | os.PathLike) -> dict:
    """Write the finished and failed runs among `configs` (RunConfigs) under `runs_root`, with the group
    files of their variants and of every variant of `configs` that has a dispatch log (a paused group's),
    to the gzipped tar `path` (written atomically); the manifest it holds is returned."""
    runs_root, path = Path(runs_root), Path(path)
    runs, variants = [], {}   # (dataset, variant) -> whether runs of it go in, in the order of `configs`
    for c in configs:
        key = (c.dataset, c.variant)
        variants.setdefault(key, False)
        run_dir = run_dir_for(runs_root, c.dataset, c.variant, c.seed)
        status = run_status(run_dir, c.config_hash())
        if status not in ("ok", "failed"):
            continue
        metrics = load_run_metrics(run_dir) if status == "ok" else None
        runs.append({"dataset": c.dataset, "variant": c.variant, "seed": c.seed, "config_hash": c.config_hash(),
                     "status": status, "data_fingerprint": (metrics or {}).get("data_fingerprint"),
                     "commit": (metrics or {}).get("commit")})
        variants[key] = True
    groups = []
    for (dataset, variant), with_runs in variants.items():
        vdir = variant_dir_for(runs_root, dataset, variant)
        # a variant without a finished or failed run goes in only with its dispatch log: a group that
        # executed here (paused, or stopped before it could record a failure)
        if not with_runs and not (vdir / DISPATCH_FILE).is_file():
            continue
        files = [name for name in GROUP_FILES if (vdir / name).is_file()]
        if files:
            groups.append({"dataset": dataset, "variant": variant, "files": files, "runs": with_runs})
    manifest = {"format": 1, "created_at": _now(), "runs": runs, "groups": groups}
    with atomic_path(path) as tmp, tarfile.open(tmp, "w:gz") as tar:
        for r in runs:
            run_dir = run_dir_for(runs_root, r["dataset"], r["variant"], r["seed"])
            for name in RUN_FILES:
                if (run_dir / name).is_file():
                    tar.add(run_dir / name, arcname=f"{r['dataset']}/{r['variant']}/seed{r['seed']}/{name}")
        for g in groups:
            vdir = variant_dir_for(runs_root, g["dataset"], g["variant"])
            for name in g["files"]:
                tar.add(vdir / name, arcname=f"{g['dataset']}/{g['variant']}/{name}")
        data = json.dumps(manifest, indent=1).encode()
        info = tarfile.TarInfo(MANIFEST)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return manifest


@dataclass
class MergeReport:
    installed: list[str] = field(default_factory=list)   # "dataset/variant/seedN"
    kept: list[str] = field(default_factory=list)        # a local finished run stayed
    group_files: list[str] = field(default_factory=list)  # "dataset/variant" whose group files changed here

    def summary(self) -> str:
        return (f"{len(self.installed)} runs installed, {len(self.kept)} kept as they were "
                f"(already finished here), group files of {len(self.group_files)} variants")


def _check_run(src: Path, label: str, expected_hash: str | None) -> str:
    """'ok' or 'failed' for the archived run folder `src`; ArchiveError naming it otherwise."""
    if expected_hash is None:
        raise ArchiveError(f"{label}: the params profile has no such run (dataset, variant and seed)")
    if (src / METRICS_FILE).is_file():
        try:
            metrics = json.loads((src / METRICS_FILE).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ArchiveError(f"{label}/{METRICS_FILE}: not readable JSON ({e})") from None
        if metrics.get("status") != "ok":
            raise ArchiveError(f"{label}/{METRICS_FILE}: status is {metrics.get('status')!r}, not 'ok'")
        if metrics.get("config_hash") != expected_hash:
            raise ArchiveError(f"{label}/{METRICS_FILE}: config_hash {metrics.get('config_hash')!r}, the params "
                               f"profile expects {expected_hash!r} (other params or code?)")
        if not (src / PER_USER_FILE).is_file():
            raise ArchiveError(f"{label}: metrics.json without {PER_USER_FILE}")
        return "ok"
    if (src / ERROR_FILE).is_file():
        failure = load_failure(src)
        if failure.get("config_hash") != expected_hash:
            raise ArchiveError(f"{label}/{ERROR_FILE}: config_hash {failure.get('config_hash')!r}, expected "
                               f"{expected_hash!r}")
        return "failed"
    raise ArchiveError(f"{label}: neither {METRICS_FILE} nor {ERROR_FILE}")


def _check_dispatch(path: Path, label: str) -> None:
    """A dispatch log is JSON lines (appended line by line to the local one, so each must stand alone)."""
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ArchiveError(f"{label}: not readable text ({e})") from None
    for n, line in enumerate(lines, 1):
        if line.strip():
            try:
                json.loads(line)
            except json.JSONDecodeError as e:
                raise ArchiveError(f"{label}:{n}: not a JSON line ({e.msg})") from None


def unpack_archive(archive: str | os.PathLike, dest: str | os.PathLike) -> None:
    """Unpack an archive of pack_runs into `dest`; ArchiveError (naming the archive) if it cannot be read."""
    try:
        with tarfile.open(archive, "r:gz") as tar:
            tar.extractall(dest, filter="data")  # refuses absolute paths, '..' and links out of dest
    except (OSError, tarfile.TarError) as e:
        raise ArchiveError(f"{archive}: not a readable run archive ({e})") from None


def merge_runs(archive: str | os.PathLike, runs_root: str | os.PathLike, configs: Iterable, *,
               replace_finished: bool = False) -> MergeReport:
    """Merge the archive's runs into `runs_root`; `configs` (RunConfigs) are the runs it may hold."""
    archive, runs_root = Path(archive), Path(runs_root)
    expected = {(c.dataset, c.variant, c.seed): c.config_hash() for c in configs}
    profile_variants = {(dataset, variant) for dataset, variant, _ in expected}
    report = MergeReport()
    with tempfile.TemporaryDirectory(prefix="gbla-merge-") as tmp:
        tmp = Path(tmp)
        unpack_archive(archive, tmp)
        if not (tmp / MANIFEST).is_file():
            raise ArchiveError(f"{archive}: no {MANIFEST} (not written by pack_runs)")
        # every check first, so a bad archive writes nothing
        plan = []
        for run_dir in sorted(tmp.glob("*/*/seed*")):
            dataset, variant, seed_name = run_dir.relative_to(tmp).parts
            label = f"{archive.name}: {dataset}/{variant}/{seed_name}"
            try:
                seed = int(seed_name.removeprefix("seed"))
            except ValueError:
                raise ArchiveError(f"{label}: not a seed folder") from None
            status = _check_run(run_dir, label, expected.get((dataset, variant, seed)))
            plan.append((dataset, variant, seed, run_dir, status))
        groups = []
        for vdir in sorted(p for p in tmp.glob("*/*") if p.is_dir()):
            dataset, variant = vdir.relative_to(tmp).parts
            files = [name for name in GROUP_FILES if (vdir / name).is_file()]
            if not files:
                continue
            if (dataset, variant) not in profile_variants:
                raise ArchiveError(f"{archive.name}: {dataset}/{variant}/{files[0]}: the params profile has no "
                                   f"such variant (dataset and variant)")
            if (vdir / DISPATCH_FILE).is_file():
                _check_dispatch(vdir / DISPATCH_FILE, f"{archive.name}: {dataset}/{variant}/{DISPATCH_FILE}")
            groups.append((dataset, variant, vdir))
        touched = set()
        for dataset, variant, seed, src, status in plan:
            dest = run_dir_for(runs_root, dataset, variant, seed)
            name = f"{dataset}/{variant}/seed{seed}"
            here = run_status(dest, expected[(dataset, variant, seed)])
            if here == "ok" and (status == "failed" or not replace_finished):
                report.kept.append(name)
                continue
            _replace_dir(dest, lambda t, src=src: [shutil.copy2(f, t / f.name) for f in src.iterdir() if f.is_file()])
            report.installed.append(name)
            touched.add((dataset, variant))
        for dataset, variant, src in groups:
            if _merge_group_files(src, variant_dir_for(runs_root, dataset, variant),
                                  runs_installed=(dataset, variant) in touched):
                report.group_files.append(f"{dataset}/{variant}")
    return report


def _merge_group_files(src: Path, vdir: Path, *, runs_installed: bool) -> bool:
    """Merge one variant's archived group files (folder `src`) into its variant folder `vdir` (see the
    module docstring); whether anything changed."""
    vdir.mkdir(parents=True, exist_ok=True)
    changed = False
    notebook = src / NOTEBOOK_FILE
    if notebook.is_file() and (runs_installed or not (vdir / NOTEBOOK_FILE).is_file()):
        seeds = notebook_seeds(notebook)
        if seeds is not None:   # the local notebook of another group of seeds is kept beside it
            keep_earlier_group_notebook(vdir, seeds)
        _install(notebook, vdir / NOTEBOOK_FILE)
        changed = True
    if (src / LOG_FILE).is_file():
        changed |= _merge_log(src / LOG_FILE, vdir / LOG_FILE)
    if (src / DISPATCH_FILE).is_file():
        changed |= _append_new_lines(src / DISPATCH_FILE, vdir / DISPATCH_FILE)
    return changed


def _install(src: Path, dest: Path) -> None:
    with atomic_path(dest) as tmp_copy:
        shutil.copy2(src, tmp_copy)


def _merge_log(src: Path, dest: Path) -> bool:
    """A group's run.log from an archive merged with the local one; whether the local one changed.
    Compared as bytes: a log cut off mid-character is still merged as it is."""
    theirs = src.read_bytes()
    if not dest.is_file():
        _install(src, dest)
        return True
    ours = dest.read_bytes()
    if theirs in ours:                     # the same log, or one this log already holds
        return False
    if theirs.startswith(ours):            # the same group went on executing after the local copy
        _install(src, dest)
        return True
    # other executions' logs: the remote lost the earlier ones, or its folder was copied again from a
    # local tree that had not merged them yet (so the archive's log repeats the local executions and
    # then has its own). Each execution's section goes in once; the sections are then put in the order
    # of their headers' dates, so that an execution whose archive is merged late (one that a later
    # command restarted from scratch) still reads before the executions that came after it.
    sections = _log_sections(ours)
    added = False
    for section in _log_sections(theirs):
        if section in ours or section in sections:
            continue
        sections.append(section)
        added = True
    if not added:
        return False
    merged = b""
    for section in _in_date_order(sections):
        merged += (b"" if not merged or merged.endswith(b"\n") else b"\n") + section
    with atomic_path(dest) as tmp_copy:
        Path(tmp_copy).write_bytes(merged)
    return True


# each execution of a group starts its part of run.log with a header line "# <ISO date> <group> ..."
_SECTION_START = re.compile(rb"(?m)^(?=# \d{4}-\d{2}-\d{2})")


def _log_sections(log: bytes) -> list[bytes]:
    """run.log cut into its executions' sections (anything before the first header is one too)."""
    return [part for part in _SECTION_START.split(log) if part]


def _in_date_order(sections: list[bytes]) -> list[bytes]:
    """Sections sorted by the date of their header line (stable: equal dates keep their order; text
    before the first header stays first). A header whose date does not parse leaves the order as it is."""
    def date_of(section: bytes):
        if not section.startswith(b"# "):
            return datetime.min.replace(tzinfo=timezone.utc)
        stamp = datetime.fromisoformat(section[2:].split(maxsplit=1)[0].decode())
        return stamp if stamp.tzinfo else stamp.replace(tzinfo=timezone.utc)
    try:
        return sorted(sections, key=date_of)
    except (ValueError, UnicodeDecodeError, IndexError):
        return sections


def _append_new_lines(src: Path, dest: Path) -> bool:
    """Append the lines of src that dest does not hold yet (a group's dispatch records); whether any were."""
    text = dest.read_text() if dest.is_file() else ""
    have = set(text.splitlines())
    new = []
    for line in src.read_text().splitlines():
        if line and line not in have:
            new.append(line)
            have.add(line)
    if new:
        with open(dest, "a") as f:
            f.write(("" if not text or text.endswith("\n") else "\n") + "".join(line + "\n" for line in new))
    return bool(new)


__all__ = ["pack_runs", "merge_runs", "MergeReport", "ArchiveError", "MANIFEST"]
