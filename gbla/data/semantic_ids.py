"""Semantic IDs by residual k-means (RQ-KMeans, GRID's default): 3 levels x 256 codewords, plus a 4th
digit that tells apart items whose 3 codes coincide (0, 1, 2, ... in item order).

Level l clusters the residuals left after subtracting the centroids chosen at levels < l, so each
level refines the previous one. scikit-learn's KMeans with a fixed random_state makes it deterministic
for a seed (on a given machine and thread count). It runs single-threaded by default: on a 2-core
x86-64 machine that other processes loaded, threaded BLAS/OpenMP in k-means++ was ~15x slower than one
thread (38 s vs 2.2 s per level).

The codes depend on the CPU below what its kernels can be pinned to (README, "What is
bit-reproducible"), so the codes the committed runs were trained on are kept as files
(outputs/data/semantic_ids/<dataset>.npz: the digits, a hash of the item order they belong to, the
fingerprint they give) that a build can take instead of embedding and clustering:

    python -m gbla.data.semantic_ids export outputs/processed/sports    # -> outputs/data/semantic_ids/sports.npz
    python -m gbla.data.build --dataset sports --semantic-ids outputs/data/semantic_ids
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gbla.common import REPO_ROOT, atomic_path

CODES_DIR = REPO_ROOT / "outputs" / "data" / "semantic_ids"


@dataclass
class SemanticIDs:
    sids: np.ndarray                  # (num_items, levels + 1) int64
    codebook_sizes: tuple[int, ...]   # (codebook_size,) * levels + (max dedup digit + 1,)
    centroids: list[np.ndarray]       # per level (codebook_size, dim) float32
    report: dict = field(default_factory=dict)


def residual_kmeans(embeddings: np.ndarray, levels: int = 3, codebook_size: int = 256, seed: int = 0,
                    n_init: int = 1, max_iter: int = 100, progress: bool = True, threads: int | None = 1
                    ) -> tuple[np.ndarray, list]:
    """(codes (n, levels) int64, centroids per level). threads=None: library default thread count."""
    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_limits
    from tqdm.auto import tqdm

    x = np.asarray(embeddings, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"embeddings must be a non-empty (items, dim) matrix, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("embeddings contain NaN or inf")
    if x.shape[0] < codebook_size:
        raise ValueError(f"{x.shape[0]} items cannot fill a codebook of {codebook_size} codewords; "
                         f"use a smaller codebook_size")
    residual = x.copy()
    codes, centroids = [], []
    for level in tqdm(range(levels), desc="residual k-means", unit="level", disable=not progress):
        km = KMeans(n_clusters=codebook_size, n_init=n_init, max_iter=max_iter, random_state=seed + level,
                    algorithm="lloyd")
        with threadpool_limits(limits=threads):
            labels = km.fit_predict(residual).astype(np.int64)
        center = km.cluster_centers_.astype(np.float32)
        residual = residual - center[labels]
        codes.append(labels)
        centroids.append(center)
    return np.stack(codes, axis=1), centroids


def dedup_digit(codes: np.ndarray) -> np.ndarray:
    """For each item, how many earlier items (in item order) share its full code tuple: 0, 1, 2, ..."""
    codes = np.asarray(codes, dtype=np.int64)
    _, group = np.unique(codes, axis=0, return_inverse=True)
    group = group.reshape(-1)
    order = np.argsort(group, kind="stable")         # items grouped by code, item order kept inside
    sorted_group = group[order]
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_group)) + 1]
    run_start = np.repeat(starts, np.diff(np.r_[starts, len(order)]))
    digit = np.empty(len(order), dtype=np.int64)
    digit[order] = np.arange(len(order)) - run_start
    return digit


def sid_report(codes: np.ndarray, digit: np.ndarray, codebook_size: int) -> dict:
    """Collision rate (share of items whose k-means code tuple is shared with another item) and
    codebook usage per level (distinct codes used / codebook_size, most items on one code)."""
    n, levels = codes.shape
    _, inverse, counts = np.unique(codes, axis=0, return_inverse=True, return_counts=True)
    shared = counts[inverse.reshape(-1)] > 1
    per_level = []
    for level in range(levels):
        used = np.bincount(codes[:, level], minlength=codebook_size)
        per_level.append({"level": level, "codes_used": int((used > 0).sum()),
                          "usage": float((used > 0).sum() / codebook_size), "max_items_per_code": int(used.max())})
    return {"num_items": int(n), "distinct_code_tuples": int(len(counts)),
            "collision_rate": float(shared.mean()), "items_with_dedup_digit_gt0": int((digit > 0).sum()),
            "max_dedup_digit": int(digit.max()), "largest_collision_group": int(counts.max()),
            "levels": per_level}


def build_semantic_ids(embeddings: np.ndarray, levels: int = 3, codebook_size: int = 256, seed: int = 0,
                       n_init: int = 1, max_iter: int = 100, progress: bool = True, threads: int | None = 1
                       ) -> SemanticIDs:
    t0 = time.perf_counter()
    codes, centroids = residual_kmeans(embeddings, levels, codebook_size, seed, n_init, max_iter, progress, threads)
    digit = dedup_digit(codes)
    sids = np.concatenate([codes, digit[:, None]], axis=1)
    if len(np.unique(sids, axis=0)) != len(sids):   # cannot happen by construction; guard the contract
        raise AssertionError("semantic IDs are not unique after the de-duplication digit")
    report = sid_report(codes, digit, codebook_size)
    report["kmeans_seconds"] = round(time.perf_counter() - t0, 2)
    return SemanticIDs(sids=sids, codebook_sizes=(codebook_size,) * levels + (int(digit.max()) + 1,),
                       centroids=centroids, report=report)


# ---------------------------------------------------------------------------------------------
# codes kept as files

def item_order_hash(item_asins) -> str:
    """sha256 of the item ids in item-index order: which items, in which order, a code file is for."""
    return hashlib.sha256("\n".join(item_asins).encode()).hexdigest()


def save_codes(path: str | Path, sids: np.ndarray, item_asins, *, fingerprint: str, params: dict) -> Path:
    """Write a dataset's semantic IDs (int16 digits) with the hash of its item order, the fingerprint of
    the dataset they belong to and the build parameters that made them (atomic)."""
    path = Path(path)
    with atomic_path(path, suffix=".npz") as tmp:   # (makes the folder)
        np.savez_compressed(tmp, sids=np.asarray(sids, dtype=np.int16), item_order_sha256=item_order_hash(item_asins),
                            fingerprint=fingerprint, params=json.dumps(params, sort_keys=True))
    return path


def code_file_fingerprint(path: str | Path) -> str:
    """The fingerprint of the dataset a code file was exported from."""
    with np.load(path) as f:
        return str(f["fingerprint"])


# the build parameters that make the codes: a code file serves only a build that asks for the same
CODE_PARAMS = ("embedding_model", "levels", "codebook_size", "seed", "n_init", "max_iter")


def check_code_params(path: str | Path, params: dict) -> None:
    """ValueError naming the file when the codes were made with other CODE_PARAMS than `params`."""
    with np.load(path) as f:
        made = json.loads(str(f["params"]))
    differ = [f"{k} {made.get(k)!r} there, {params.get(k)!r} requested" for k in CODE_PARAMS
              if k in made and made.get(k) != params.get(k)]
    if differ:
        raise ValueError(f"{path}: its codes were made with other settings ({'; '.join(differ)}); build without "
                         f"--semantic-ids to make codes for these settings")


def load_codes(path: str | Path, item_asins, levels: int, codebook_size: int) -> SemanticIDs:
    """The semantic IDs of a code file, checked against the items they are for: the item order's hash,
    the shape (items x levels + 1), the codebook range, uniqueness. Errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such code file (`python -m gbla.data.semantic_ids export` writes one)")
    with np.load(path) as f:
        sids, order = f["sids"].astype(np.int64), str(f["item_order_sha256"])
    if order != item_order_hash(item_asins):
        raise ValueError(f"{path}: its codes are for another list of items (item order sha256 {order[:12]}, "
                         f"these items {item_order_hash(item_asins)[:12]}): other sources or another parse")
    if sids.shape != (len(item_asins), levels + 1):
        raise ValueError(f"{path}: codes of shape {sids.shape}, expected ({len(item_asins)}, {levels + 1})")
    codes, digit = sids[:, :levels], sids[:, levels]
    if codes.min() < 0 or codes.max() >= codebook_size or digit.min() < 0:
        raise ValueError(f"{path}: codes outside 0..{codebook_size - 1} (or a negative de-duplicating digit)")
    if len(np.unique(sids, axis=0)) != len(sids):
        raise ValueError(f"{path}: two items share a semantic ID")
    return SemanticIDs(sids=sids, codebook_sizes=(codebook_size,) * levels + (int(digit.max()) + 1,),
                       centroids=[], report=sid_report(codes, digit, codebook_size))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m gbla.data.semantic_ids",
                                 description="export a processed dataset's semantic IDs as a code file")
    ap.add_argument("command", choices=["export"])
    ap.add_argument("processed", type=Path, help="a processed dataset folder")
    ap.add_argument("--out", type=Path, help="the code file (default outputs/data/semantic_ids/<dataset>.npz)")
    args = ap.parse_args(argv)
    from gbla.data.processed import load_processed

    try:
        ds = load_processed(args.processed)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = save_codes(args.out or CODES_DIR / f"{ds.name}.npz", ds.sids, ds.item_asins,
                     fingerprint=ds.provenance.get("fingerprint", ""), params=ds.provenance.get("params", {}))
    print(f"{ds.name}: {ds.num_items} items' codes (fingerprint {ds.provenance.get('fingerprint')}) -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
