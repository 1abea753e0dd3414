"""Trie-constrained beam search over semantic IDs, and Recall/NDCG from per-user ranks.

The prefix trie is stored as dense tables, one per SID level, so the search runs batched on the GPU:
next_id[l][p, d] = id of the prefix (digits 0..l) reached from level-l prefix p by digit d, or -1 if
no item starts that way. Level 0 has the single empty prefix 0; after the last level the "prefix id"
is the item index. A beam can therefore only ever spell a valid SID, and distinct beams are distinct
items.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from gbla.common import hits_at, ndcg_at
from gbla.model import BOS, PAD

METRIC_KS = (5, 10)


class SIDTrie:
    def __init__(self, sids: np.ndarray, codebook_sizes, device="cpu"):
        sids = np.asarray(sids, dtype=np.int64)
        num_items, depth = sids.shape
        if depth != len(codebook_sizes):
            raise ValueError(f"sids have {depth} digits but {len(codebook_sizes)} codebook sizes were given")
        for level, size in enumerate(codebook_sizes):
            bad = np.flatnonzero((sids[:, level] < 0) | (sids[:, level] >= size))
            if bad.size:
                raise ValueError(f"sids: item {int(bad[0])} has digit {int(sids[bad[0], level])} at level {level}, "
                                 f"outside its codebook of size {size}")
        uniq, first, counts = np.unique(sids, axis=0, return_index=True, return_counts=True)
        if (counts > 1).any():
            dup = uniq[np.argmax(counts > 1)]
            items = np.flatnonzero((sids == dup).all(axis=1))[:5].tolist()
            raise ValueError(f"sids: items {items} share the SID {dup.tolist()}; SIDs must be unique (dedup digit)")
        self.codebook_sizes = tuple(int(c) for c in codebook_sizes)
        prefix_id = np.zeros(num_items, dtype=np.int64)       # every item starts at the empty prefix
        self.next_id = []
        for level in range(depth):
            if level == depth - 1:
                child_id = np.arange(num_items, dtype=np.int64)
            else:
                _, child_id = np.unique(sids[:, :level + 1], axis=0, return_inverse=True)
                child_id = child_id.reshape(-1).astype(np.int64)
            table = np.full((int(prefix_id.max()) + 1, self.codebook_sizes[level]), -1, dtype=np.int64)
            table[prefix_id, sids[:, level]] = child_id
            self.next_id.append(torch.as_tensor(table, device=device))
            prefix_id = child_id

    def to(self, device) -> "SIDTrie":
        self.next_id = [t.to(device) for t in self.next_id]
        return self

    def is_valid_prefix(self, digits) -> bool:
        p = 0
        for level, d in enumerate(digits):
            if not 0 <= d < self.codebook_sizes[level]:
                return False
            p = int(self.next_id[level][p, d])
            if p < 0:
                return False
        return True


@torch.no_grad()
def beam_search(model, enc_tokens: torch.Tensor, trie: SIDTrie, beam_size: int, top_k: int = 10, *,
                use_cache: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k items (S, B, top_k) of each of the model's S seeds, in descending order of SID
    log-probability, and their scores; -1 / -inf where fewer than top_k valid items exist.
    enc_tokens: (B, L), the same users for every seed, or (S, B, L). The caller puts the model in
    eval mode. The seeds' beams are independent rows: the search runs on S * B rows at once.
    use_cache: decode one token per beam and level with the decoder's self-attention cache
    (TIGER.decode_step; each level's keys and values are written once and the beams, re-ranked,
    point at their ancestors' rows: gbla.layers.DecodeCache), instead of the whole prefix again at
    every level (the reference the tests compare it with)."""
    if beam_size < top_k:
        raise ValueError(f"beam_size ({beam_size}) must be >= top_k ({top_k})")
    device = enc_tokens.device
    vocab = model.vocab
    memory, memory_mask = model.encode(enc_tokens)
    S, B = memory.shape[:2]
    R = S * B                                                                 # independent rows
    kvs = model.memory_kv(memory)
    dec_tokens = torch.full((S, B, 1), BOS, dtype=torch.long, device=device)  # (S, B * K, t)
    scores = torch.zeros(R, 1, device=device)                                 # (R, K) log-probs so far
    prefix = torch.zeros(R, 1, dtype=torch.long, device=device)               # (R, K) trie node, -1 = dead
    caches = model.decode_caches(positions=len(trie.codebook_sizes), rows=R * beam_size) if use_cache else None
    for level, size in enumerate(trie.codebook_sizes):
        K = scores.shape[1]
        start = vocab.level_starts[level]
        if use_cache:
            logits, caches = model.decode_step(dec_tokens[..., -1:], kvs, memory_mask, caches, level)
            logits = logits[:, :, start:start + size]
        else:
            logits = model.decode(dec_tokens, kvs, memory_mask)[:, :, -1, start:start + size]
        logp = F.log_softmax(logits.float(), dim=-1).view(R, K, size)
        child = trie.next_id[level][prefix.clamp(min=0)]                     # (R, K, size)
        alive = (child >= 0) & (prefix >= 0)[..., None]
        candidates = torch.where(alive, scores[..., None] + logp, float("-inf")).view(R, K * size)
        new_k = min(beam_size, K * size)
        scores, flat = candidates.topk(new_k, dim=1)                         # sorted, best first
        beam, digit = flat // size, flat % size
        prefix = torch.where(torch.isfinite(scores), child.view(R, K * size).gather(1, flat), -1)
        t = dec_tokens.shape[-1]
        previous = dec_tokens.reshape(R, K, t).gather(1, beam[..., None].expand(-1, -1, t))
        new_token = (digit + start + vocab.digit_offset)[..., None]
        dec_tokens = torch.cat([previous, new_token], dim=2).view(S, B * new_k, t + 1)
        if use_cache:  # cache row (row, beam) -> the rows of the beams that continue it
            source = (torch.arange(R, device=device)[:, None] * K + beam).reshape(-1)
            caches = [cache.follow(source) for cache in caches]
    items, scores = prefix[:, :top_k], scores[:, :top_k]
    if items.shape[1] < top_k:  # a tiny catalogue with fewer valid items than top_k
        pad = top_k - items.shape[1]
        items = F.pad(items, (0, pad), value=-1)
        scores = F.pad(scores, (0, pad), value=float("-inf"))
    return items.view(S, B, top_k), scores.view(S, B, top_k)


def ranks_from_topk(items: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Rank 1..k of each target among its row's items (..., k), 0 = not among them; targets (B,)
    broadcast over any leading (seed) axes of items."""
    hit = items == targets[..., None]
    first = hit.float().argmax(dim=-1) + 1
    return torch.where(hit.any(dim=-1), first, 0)


def metrics_from_ranks(ranks, ks=METRIC_KS) -> dict[str, float]:
    """Recall@K = hit in the top K; NDCG@K = 1 / log2(rank + 1) for a hit at rank <= K (one relevant
    item, so the ideal DCG is 1); both averaged over all users."""
    ranks = np.asarray(ranks if not torch.is_tensor(ranks) else ranks.cpu().numpy(), dtype=np.int64)
    if ranks.size == 0:
        raise ValueError("no ranks to average")
    out = {f"recall@{k}": float(hits_at(ranks, k).mean()) for k in ks}
    out.update({f"ndcg@{k}": float(ndcg_at(ranks, k).mean()) for k in ks})
    return out


@torch.no_grad()
def rank_targets(model, enc_tokens: torch.Tensor, targets: torch.Tensor, trie: SIDTrie, *, beam_size: int,
                 batch_size: int = 1024, top_k: int = 10, autocast: bool = False,
                 use_cache: bool = True) -> torch.Tensor:
    """Per-example rank (S, n) of the target item under beam search for each of the model's S seeds,
    evaluated in batches (every seed ranks the same examples).

    Examples are batched in order of their last real encoder position, and each batch's encoder input
    is cut after its last real token: trailing all-PAD columns change no output (the layers are
    padding-invariant, tested), so this only skips work on padding."""
    was_training = model.training
    model.eval()
    n, L = enc_tokens.shape
    real = enc_tokens != PAD
    used = torch.where(real, torch.arange(1, L + 1, device=enc_tokens.device), 0).amax(dim=1)  # (n,)
    order = torch.argsort(used, stable=True)
    ranks = torch.empty(model.num_seeds, n, dtype=torch.long, device=enc_tokens.device)
    try:
        for i in range(0, n, batch_size):
            sel = order[i:i + batch_size]
            width = max(1, int(used[sel].max()))
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
                items, _ = beam_search(model, enc_tokens[sel, :width], trie, beam_size, top_k, use_cache=use_cache)
            ranks[:, sel] = ranks_from_topk(items, targets[sel])
    finally:
        model.train(was_training)
    return ranks
