"""The processed-dataset format: what the CPU build writes and the GPU training reads.

Importable with only numpy + pyarrow + the standard library (the GPU machine has no polars).

On disk, one folder per dataset (default outputs/processed/<dataset>/):
    items.parquet   item (int64), asin (str), text (str), sid (fixed_size_list<int64>[4])
    users.parquet   user (int64), user_id (str)
    train.parquet, valid.parquet, test.parquet
                    user (int64), history (fixed_size_list<int64>[max_history], -1 padded),
                    history_len (int64), target (int64)
    meta.json       name, counts, codebook sizes, statistics, provenance (written last)
The folder is written under a temporary name and renamed into place, so a folder that exists under
its final name is always complete.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from gbla.common import REPO_ROOT, to_json

FORMAT_VERSION = 1
MAX_HISTORY = 20
PAD_ITEM = -1  # the item index of an empty history slot (the model's padding token is gbla.model.PAD)
SPLIT_NAMES = ("train", "valid", "test")


@dataclass
class SplitArrays:
    user: np.ndarray         # (n,) int64 user index 0..num_users-1
    history: np.ndarray      # (n, max_history) int64 item indices, oldest first, left-aligned, PAD_ITEM (-1) right-padded
    history_len: np.ndarray  # (n,) int64 in 1..max_history
    target: np.ndarray       # (n,) int64 item index

    def __len__(self) -> int:
        return int(self.target.shape[0])


@dataclass
class ProcessedDataset:
    name: str
    num_users: int
    num_items: int
    sids: np.ndarray                  # (num_items, 4) int64 semantic-ID digits (3 k-means levels + dedup digit)
    codebook_sizes: tuple[int, ...]   # vocabulary size of each digit, e.g. (256, 256, 256, 5)
    train: SplitArrays
    valid: SplitArrays
    test: SplitArrays
    item_asins: list[str]
    user_ids: list[str]
    stats: dict
    provenance: dict                  # provenance["fingerprint"]: short hash identifying the content
    item_texts: list[str] | None = None  # the text that was embedded for each item (optional)

    def split(self, name: str) -> SplitArrays:
        if name not in SPLIT_NAMES:
            raise ValueError(f"unknown split {name!r}; known: {SPLIT_NAMES}")
        return getattr(self, name)


# ---------------------------------------------------------------------------------------------
# leave-one-out split (TIGER)
# ---------------------------------------------------------------------------------------------

def _examples_at(flat: np.ndarray, starts: np.ndarray, positions: np.ndarray, users: np.ndarray,
                 max_history: int) -> SplitArrays:
    """Examples whose target is flat[positions], history = the (at most max_history) items before it
    within the same user's sequence (starts[i] = flat index where that user's sequence begins)."""
    hist_len = np.minimum(positions - starts, max_history).astype(np.int64)
    cols = np.arange(max_history, dtype=np.int64)
    src = positions[:, None] - hist_len[:, None] + cols[None, :]
    inside = cols[None, :] < hist_len[:, None]
    history = np.where(inside, flat[np.clip(src, 0, len(flat) - 1)], PAD_ITEM).astype(np.int64)
    return SplitArrays(user=users.astype(np.int64), history=history, history_len=hist_len,
                       target=flat[positions].astype(np.int64))


def leave_one_out_split(sequences: list[list[int]], max_history: int = MAX_HISTORY
                        ) -> tuple[SplitArrays, SplitArrays, SplitArrays]:
    """Leave-one-out split of chronological per-user item sequences (user index = list position).

    For s[0..n-1]: test target s[n-1] (history s[:n-1][-max_history:]), valid target s[n-2]
    (history s[:n-2][-max_history:]), training: one example per prefix, target s[t] for t in 1..n-3
    (history s[:t][-max_history:]). Training examples are ordered by user, then t.
    """
    lengths = np.fromiter((len(s) for s in sequences), dtype=np.int64, count=len(sequences))
    short = np.flatnonzero(lengths < 3)
    if short.size:
        raise ValueError(f"leave-one-out needs at least 3 items per user; user index {int(short[0])} has "
                         f"{int(lengths[short[0]])} ({short.size} such users)")
    if max_history < 1:
        raise ValueError(f"max_history must be >= 1, got {max_history}")
    flat = np.fromiter((i for s in sequences for i in s), dtype=np.int64, count=int(lengths.sum()))
    ends = np.cumsum(lengths)
    starts = ends - lengths
    users = np.arange(len(sequences), dtype=np.int64)

    test = _examples_at(flat, starts, ends - 1, users, max_history)
    valid = _examples_at(flat, starts, ends - 2, users, max_history)
    n_train = lengths - 3                                    # targets t = 1..n-3
    train_users = np.repeat(users, n_train)
    # position of each training target: start of its user + t, t running 1..n-3 within each user
    within = np.arange(int(n_train.sum()), dtype=np.int64) - np.repeat(np.cumsum(n_train) - n_train, n_train)
    train_pos = np.repeat(starts, n_train) + 1 + within
    train = _examples_at(flat, np.repeat(starts, n_train), train_pos, train_users, max_history)
    return train, valid, test


# ---------------------------------------------------------------------------------------------
# fingerprint, save, load
# ---------------------------------------------------------------------------------------------

def compute_fingerprint(ds: ProcessedDataset) -> str:
    """12 hex digits of sha256 over everything a model sees: SIDs, splits, item/user ids."""
    h = hashlib.sha256()
    h.update(f"{ds.name}|{ds.num_users}|{ds.num_items}|{tuple(ds.codebook_sizes)}".encode())
    h.update(np.ascontiguousarray(ds.sids, dtype=np.int64).tobytes())
    for name in SPLIT_NAMES:
        s = ds.split(name)
        for arr in (s.user, s.history, s.history_len, s.target):
            h.update(np.ascontiguousarray(arr, dtype=np.int64).tobytes())
    h.update("\n".join(ds.item_asins).encode())
    h.update("\n".join(ds.user_ids).encode())
    return h.hexdigest()[:12]


def default_processed_dir(dataset: str) -> Path:
    """outputs/processed/<dataset> under the repo root; env GBLA_PROCESSED_DIR replaces the root."""
    root = os.environ.get("GBLA_PROCESSED_DIR")
    return (Path(root) if root else REPO_ROOT / "outputs" / "processed") / dataset


def _fixed_list(matrix: np.ndarray) -> pa.FixedSizeListArray:
    matrix = np.ascontiguousarray(matrix, dtype=np.int64)
    return pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1)), matrix.shape[1])


def _from_fixed_list(column: pa.ChunkedArray, width: int) -> np.ndarray:
    arr = column.combine_chunks()
    return arr.flatten().to_numpy(zero_copy_only=False).astype(np.int64).reshape(len(arr), width)


def _check(ds: ProcessedDataset) -> None:
    if ds.sids.shape != (ds.num_items, len(ds.codebook_sizes)):
        raise ValueError(f"sids has shape {ds.sids.shape}, expected ({ds.num_items}, {len(ds.codebook_sizes)})")
    if len(ds.item_asins) != ds.num_items or len(ds.user_ids) != ds.num_users:
        raise ValueError("item_asins / user_ids lengths do not match num_items / num_users")
    if ds.item_texts is not None and len(ds.item_texts) != ds.num_items:
        raise ValueError("item_texts length does not match num_items")
    for name in SPLIT_NAMES:
        s = ds.split(name)
        n = len(s.target)
        if not (s.user.shape == (n,) and s.history_len.shape == (n,) and s.history.ndim == 2
                and s.history.shape[0] == n):
            raise ValueError(f"split {name}: inconsistent array shapes")


def save_processed(ds: ProcessedDataset, path: str | os.PathLike) -> Path:
    """Write ds to the folder `path` atomically: build it under a temporary sibling name, then rename.
    An existing folder at `path` is replaced only after the new one is complete."""
    _check(ds)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        items = {"item": pa.array(np.arange(ds.num_items, dtype=np.int64)),
                 "asin": pa.array(list(ds.item_asins), pa.string()),
                 "sid": _fixed_list(ds.sids)}
        if ds.item_texts is not None:
            items["text"] = pa.array(list(ds.item_texts), pa.string())
        pq.write_table(pa.table(items), tmp / "items.parquet")
        pq.write_table(pa.table({"user": pa.array(np.arange(ds.num_users, dtype=np.int64)),
                                 "user_id": pa.array(list(ds.user_ids), pa.string())}), tmp / "users.parquet")
        for name in SPLIT_NAMES:
            s = ds.split(name)
            pq.write_table(pa.table({"user": pa.array(np.asarray(s.user, dtype=np.int64)),
                                     "history": _fixed_list(s.history),
                                     "history_len": pa.array(np.asarray(s.history_len, dtype=np.int64)),
                                     "target": pa.array(np.asarray(s.target, dtype=np.int64))}),
                           tmp / f"{name}.parquet")
        meta = {"format_version": FORMAT_VERSION, "name": ds.name, "num_users": int(ds.num_users),
                "num_items": int(ds.num_items), "codebook_sizes": [int(c) for c in ds.codebook_sizes],
                "max_history": int(ds.train.history.shape[1]), "stats": ds.stats, "provenance": ds.provenance}
        (tmp / "meta.json").write_text(to_json(meta, sort_keys=True))
        if path.exists():
            old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def read_meta(path: str | os.PathLike) -> dict | None:
    """meta.json of a processed folder, or None when the folder is absent or incomplete."""
    meta_path = Path(path) / "meta.json"
    if not meta_path.is_file():
        return None
    return json.loads(meta_path.read_text())


def load_processed(path: str | os.PathLike) -> ProcessedDataset:
    """Read a folder written by save_processed."""
    path = Path(path)
    meta = read_meta(path)
    if meta is None:
        raise FileNotFoundError(f"{path}: no processed dataset here (meta.json missing); "
                                f"build it with `python -m gbla.data.build --dataset {path.name}`")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path / 'meta.json'}: format_version {meta.get('format_version')!r}, "
                         f"this code reads {FORMAT_VERSION}; rebuild with --force")
    width = len(meta["codebook_sizes"])
    items = pq.read_table(path / "items.parquet")
    users = pq.read_table(path / "users.parquet")
    splits = {}
    for name in SPLIT_NAMES:
        t = pq.read_table(path / f"{name}.parquet")
        splits[name] = SplitArrays(user=t["user"].to_numpy().astype(np.int64),
                                   history=_from_fixed_list(t["history"], meta["max_history"]),
                                   history_len=t["history_len"].to_numpy().astype(np.int64),
                                   target=t["target"].to_numpy().astype(np.int64))
    return ProcessedDataset(
        name=meta["name"], num_users=meta["num_users"], num_items=meta["num_items"],
        sids=_from_fixed_list(items["sid"], width), codebook_sizes=tuple(meta["codebook_sizes"]),
        train=splits["train"], valid=splits["valid"], test=splits["test"],
        item_asins=items["asin"].to_pylist(), user_ids=users["user_id"].to_pylist(),
        stats=meta["stats"], provenance=meta["provenance"],
        item_texts=items["text"].to_pylist() if "text" in items.column_names else None)
