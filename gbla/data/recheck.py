"""Does this machine give a processed dataset's semantic IDs? Recompute them and compare fingerprints.

    python -m gbla.data.recheck outputs/processed/sports --expect 2ee97ee4cef8 [--out DIR]

The semantic IDs are the one part of a build that depends on the CPU (README, "What is
bit-reproducible"): the item embeddings' last bits follow the CPU's kernels and residual k-means
turns them into other codes. This re-embeds the dataset's stored item texts (items.parquet) with its
recorded embedding model and k-means settings, on this machine's CPU with the build's kernel pins,
puts the new codes into the dataset and computes its fingerprint; everything else (splits, ids) is
taken as stored, so a match means this machine reproduces the build. --expect: the fingerprint wanted
(default: the one the folder records); --out: on a match, write the dataset there (its provenance
says where the codes were recomputed). Exit status 0 on a match, 1 on a mismatch.

MKL's sums can depend on its thread count: on a machine with more cores than the build's, set
OMP_NUM_THREADS and MKL_NUM_THREADS to the build's (meta.json: provenance.environment.threadpools; the
committed builds were made with 2).

Only the semantic-ID step runs (no raw sources or polars needed): a GPU machine whose CPU reproduces
a build can take a processed folder made elsewhere and recompute its codes in a minute or two.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

from gbla.data.processed import compute_fingerprint, load_processed, save_processed


def recompute_semantic_ids(path: str | Path, *, encoder=None, encoder_id: str | None = None, progress: bool = False,
                           log=print):
    """(dataset with recomputed codes, its fingerprint, the fingerprint the folder records)."""
    from gbla.data import semantic_ids, text
    from gbla.data.build import environment

    ds = load_processed(path)
    if not ds.item_texts:
        raise ValueError(f"{Path(path) / 'items.parquet'}: no item texts stored (column 'text'); rebuild the "
                         f"dataset with `python -m gbla.data.build` to get them")
    params = ds.provenance.get("params", {})
    missing = [k for k in semantic_ids.CODE_PARAMS if k not in params]
    if missing:
        raise ValueError(f"{Path(path) / 'meta.json'}: provenance.params lacks {', '.join(missing)}")
    model_id = encoder_id if encoder is not None else text.resolve_model(text.DEFAULT_MODEL)[1]
    if model_id != params["embedding_model"]:
        raise ValueError(f"{Path(path) / 'meta.json'}: built with embedding model {params['embedding_model']!r}, "
                         f"this installation has {model_id!r}")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as cache:   # never an embedding cached elsewhere: recompute here
        emb, info = text.embed_texts(ds.item_texts, text.DEFAULT_MODEL, cache_dir=cache, progress=progress,
                                     encoder=encoder, model_id=encoder_id if encoder is not None else None, log=log)
    log(f"embedded {emb.shape[0]} item texts in {time.perf_counter() - t0:.0f} s (CPU kernels {info.get('cpu_kernels')})")
    t0 = time.perf_counter()
    sid = semantic_ids.build_semantic_ids(emb, params["levels"], params["codebook_size"], params["seed"],
                                          params["n_init"], params["max_iter"], progress)
    log(f"semantic IDs in {time.perf_counter() - t0:.0f} s: codebook sizes {sid.codebook_sizes}")
    recorded = ds.provenance.get("fingerprint")
    provenance = {**ds.provenance, "semantic_ids_recomputed": {"from": str(path), "recorded_fingerprint": recorded,
                                                               "environment": environment()}}
    stats = {**ds.stats, "semantic_ids": sid.report, "max_dedup_digit": sid.report["max_dedup_digit"]}
    new = dataclasses.replace(ds, sids=sid.sids, codebook_sizes=sid.codebook_sizes, stats=stats, provenance=provenance)
    fingerprint = compute_fingerprint(new)
    new.provenance["fingerprint"] = fingerprint
    return new, fingerprint, recorded


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("path", type=Path, help="a processed dataset folder (meta.json, items.parquet, ...)")
    ap.add_argument("--expect", help="the fingerprint wanted (default: the one the folder records)")
    ap.add_argument("--out", type=Path, help="on a match, write the dataset with the recomputed codes here")
    args = ap.parse_args(argv)
    from gbla.data.text import pin_cpu_kernels

    pin_cpu_kernels()   # before any MKL / oneDNN call, as the build does
    try:
        ds, fingerprint, recorded = recompute_semantic_ids(args.path)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    expected = args.expect or recorded
    same = fingerprint == expected
    print(f"fingerprint {fingerprint}, expected {expected}: {'the same' if same else 'DIFFERENT'}"
          f" (codebook sizes {ds.codebook_sizes})")
    if same and args.out:
        save_processed(ds, args.out)
        print(f"written to {args.out}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
