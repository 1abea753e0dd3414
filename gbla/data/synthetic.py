"""A tiny synthetic dataset with a learnable pattern, in the processed format (no data build needed).

Items lie on one hidden cycle (a random permutation); each user starts somewhere and walks along the
cycle, with a small chance of jumping to a random item at each step. So the next item is (mostly) a
function of the last one: a sequence model that learns the cycle beats popularity by far, while
popularity is near chance because walk starts are uniform. Semantic IDs are built directly: three
random digits per item from small codebooks, so some items collide, plus a dedup digit that makes
every SID unique (the same layout as the real data's 3 k-means levels + dedup digit).

Deterministic: the same arguments give the same dataset (and fingerprint).
"""
from __future__ import annotations

import numpy as np

from gbla.data.processed import (MAX_HISTORY, ProcessedDataset, compute_fingerprint, leave_one_out_split)


def synthetic_sids(num_items: int, codebook_size: int, rng: np.random.Generator) -> tuple[np.ndarray, tuple]:
    """(num_items, 4) SIDs: 3 random digits in [0, codebook_size) + a dedup digit 0, 1, ... among items
    that share the first three. Returns the SIDs and the codebook sizes."""
    codes = rng.integers(0, codebook_size, size=(num_items, 3), dtype=np.int64)
    dedup = np.zeros(num_items, dtype=np.int64)
    seen: dict[tuple, int] = {}
    for i, code in enumerate(map(tuple, codes)):
        dedup[i] = seen.get(code, 0)
        seen[code] = dedup[i] + 1
    sids = np.concatenate([codes, dedup[:, None]], axis=1)
    return sids, (codebook_size, codebook_size, codebook_size, int(dedup.max()) + 1)


def make_synthetic_dataset(num_users: int = 400, num_items: int = 60, seed: int = 0, *,
                           min_len: int = 5, max_len: int = 12, jump_prob: float = 0.1,
                           codebook_size: int = 5, max_history: int = MAX_HISTORY,
                           name: str = "synthetic") -> ProcessedDataset:
    """Users walk a hidden cycle over the items (see the module docstring)."""
    if num_items < 2 or num_users < 1:
        raise ValueError(f"need num_items >= 2 and num_users >= 1, got {num_items}, {num_users}")
    if not 3 <= min_len <= max_len:
        raise ValueError(f"need 3 <= min_len <= max_len (leave-one-out needs 3 items), got {min_len}, {max_len}")
    rng = np.random.default_rng(seed)
    order = rng.permutation(num_items)
    successor = np.empty(num_items, dtype=np.int64)
    successor[order] = np.roll(order, -1)  # one cycle through all items: no fixed points

    sequences = []
    for _ in range(num_users):
        length = int(rng.integers(min_len, max_len + 1))
        seq = [int(rng.integers(num_items))]
        for _ in range(length - 1):
            nxt = int(rng.integers(num_items)) if rng.random() < jump_prob else int(successor[seq[-1]])
            seq.append(nxt)
        sequences.append(seq)

    sids, codebook_sizes = synthetic_sids(num_items, codebook_size, rng)
    train, valid, test = leave_one_out_split(sequences, max_history=max_history)
    ds = ProcessedDataset(
        name=name, num_users=num_users, num_items=num_items, sids=sids, codebook_sizes=codebook_sizes,
        train=train, valid=valid, test=test,
        item_asins=[f"item{i:05d}" for i in range(num_items)],
        user_ids=[f"user{u:05d}" for u in range(num_users)],
        stats={"num_users": num_users, "num_items": num_items,
               "num_interactions": int(sum(len(s) for s in sequences)),
               "num_train_examples": len(train)},
        provenance={"source": "gbla.data.synthetic.make_synthetic_dataset",
                    "params": {"num_users": num_users, "num_items": num_items, "seed": seed,
                               "min_len": min_len, "max_len": max_len, "jump_prob": jump_prob,
                               "codebook_size": codebook_size, "max_history": max_history}},
    )
    ds.provenance["fingerprint"] = compute_fingerprint(ds)
    return ds
