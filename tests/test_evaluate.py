"""Metrics on hand-computed cases; the SID trie; beam search against exhaustive scoring."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gbla.config import ModelConfig
from gbla.data.synthetic import make_synthetic_dataset
from gbla.evaluate import SIDTrie, beam_search, metrics_from_ranks, rank_targets, ranks_from_topk
from gbla.model import TIGER


def test_metrics_hand_computed():
    ranks = [1, 3, 0, 10, 6]
    m = metrics_from_ranks(ranks)
    assert m["recall@5"] == pytest.approx(2 / 5)
    assert m["recall@10"] == pytest.approx(4 / 5)
    assert m["ndcg@5"] == pytest.approx((1 + 0.5) / 5)          # 1/log2(2) + 1/log2(4)
    assert m["ndcg@10"] == pytest.approx((1 + 0.5 + 1 / math.log2(11) + 1 / math.log2(7)) / 5)
    assert metrics_from_ranks([0, 0]) == {"recall@5": 0.0, "recall@10": 0.0, "ndcg@5": 0.0, "ndcg@10": 0.0}
    with pytest.raises(ValueError):
        metrics_from_ranks([])


def test_ranks_from_topk():
    items = torch.tensor([[4, 2, 9], [1, 3, 5], [7, -1, -1]])
    assert ranks_from_topk(items, torch.tensor([9, 8, 7])).tolist() == [3, 0, 1]


SIDS = np.array([[0, 1, 2, 0], [0, 1, 2, 1], [0, 2, 0, 0], [1, 0, 0, 0], [2, 2, 2, 0]])


def test_trie_allows_exactly_the_item_prefixes():
    trie = SIDTrie(SIDS, (3, 3, 3, 2))
    prefixes = {tuple(s[:n]) for s in SIDS.tolist() for n in range(1, 5)}
    for n in range(1, 5):
        for digits in np.ndindex(*(3, 3, 3, 2)[:n]):
            assert trie.is_valid_prefix(digits) == (digits in prefixes), digits
    # the leaves are the items
    for item, sid in enumerate(SIDS):
        p = 0
        for level, d in enumerate(sid):
            p = int(trie.next_id[level][p, d])
        assert p == item


def test_trie_rejects_bad_sids():
    with pytest.raises(ValueError, match="share the SID"):
        SIDTrie(np.array([[0, 1, 0, 0], [0, 1, 0, 0]]), (2, 2, 2, 2))
    with pytest.raises(ValueError, match="outside its codebook"):
        SIDTrie(np.array([[0, 3, 0, 0]]), (2, 2, 2, 2))


@pytest.fixture(scope="module")
def setup():
    data = make_synthetic_dataset(num_users=20, num_items=40, seed=2)
    torch.manual_seed(0)
    cfg = ModelConfig(encoder_layout=("sa", "gbla"), d_model=16, num_heads=2, head_dim=8, d_ff=32,
                      num_decoder_layers=2, dropout=0.0, num_user_buckets=5)
    model = TIGER(cfg, data.codebook_sizes, backend="torch").eval()
    with torch.no_grad():  # sharper, less uniform distributions than the 0.02 init
        model.head.weight.mul_(50)
    sids = torch.as_tensor(data.sids)
    enc = model.vocab.encoder_tokens(torch.as_tensor(data.test.user), torch.as_tensor(data.test.history), sids)
    return data, model, enc, SIDTrie(data.sids, data.codebook_sizes)


def exhaustive_scores(model, enc, sids):
    """log P(SID) of every item for every row, by teacher forcing (B, num_items)."""
    with torch.no_grad():
        out = []
        for row in enc:
            logits = model(row[None].expand(len(sids), -1), sids)[0]
            logp = torch.stack([F.log_softmax(logits[:, l, s:s + n], -1).gather(1, sids[:, l:l + 1])[:, 0]
                                for l, (s, n) in enumerate(zip(model.vocab.level_starts, model.vocab.codebook_sizes))])
            out.append(logp.sum(0))
        return torch.stack(out)


def test_beam_search_returns_valid_distinct_items_in_score_order(setup):
    data, model, enc, trie = setup
    items, scores = (t[0] for t in beam_search(model, enc, trie, beam_size=10))
    assert items.shape == (len(enc), 10)
    assert ((items >= 0) & (items < data.num_items)).all()
    for row in items.tolist():
        assert len(set(row)) == 10
    assert (scores[:, :-1] >= scores[:, 1:]).all()
    # the reported scores are the items' true SID log-probabilities
    exact = exhaustive_scores(model, enc, torch.as_tensor(data.sids))
    torch.testing.assert_close(scores, exact.gather(1, items), rtol=1e-4, atol=1e-4)


def test_wide_beam_equals_exhaustive_top10(setup):
    """With a beam as wide as the catalogue nothing is pruned: beam search = exact top-10."""
    data, model, enc, trie = setup
    items, scores = (t[0] for t in beam_search(model, enc, trie, beam_size=data.num_items))
    exact = exhaustive_scores(model, enc, torch.as_tensor(data.sids))
    top_scores, top_items = exact.topk(10, dim=1)
    torch.testing.assert_close(scores, top_scores, rtol=1e-4, atol=1e-4)
    assert torch.equal(items, top_items)


def test_rank_targets_batches_agree(setup):
    data, model, enc, trie = setup
    targets = torch.as_tensor(data.test.target)
    a = rank_targets(model, enc, targets, trie, beam_size=12, batch_size=7)
    b = rank_targets(model, enc, targets, trie, beam_size=12, batch_size=100)
    assert torch.equal(a, b) and ((a >= 0) & (a <= 10)).all()
    items, _ = beam_search(model, enc, trie, beam_size=12)
    assert torch.equal(a, ranks_from_topk(items, targets))


def test_rank_targets_cuts_trailing_padding(setup):
    """Extra trailing PAD columns are cut per batch: the ranks equal those of the unpadded input, and
    the model never sees a column past a batch's last real token."""
    data, model, enc, trie = setup
    targets = torch.as_tensor(data.test.target)
    padded = torch.cat([enc, torch.zeros(enc.shape[0], 2 * enc.shape[1], dtype=enc.dtype)], dim=1)
    widths = []
    original = model.encode
    model.encode = lambda tokens: (widths.append(tokens.shape[1]), original(tokens))[1]
    try:
        a = rank_targets(model, padded, targets, trie, beam_size=12, batch_size=6)
    finally:
        model.encode = original
    assert torch.equal(a, rank_targets(model, enc, targets, trie, beam_size=12, batch_size=100))
    used = [int(torch.nonzero(row).max()) + 1 for row in enc]
    assert max(widths) == max(used) and len(widths) == -(-len(enc) // 6)
    assert widths == sorted(widths) and min(widths) < max(widths)  # short rows batched together


def test_tiny_catalogue_pads_missing_items():
    data = make_synthetic_dataset(num_users=5, num_items=6, seed=0)
    model = TIGER(ModelConfig(encoder_layout=("sa",), d_model=16, num_heads=2, head_dim=8, d_ff=32,
                              num_decoder_layers=1, dropout=0.0, num_user_buckets=3),
                  data.codebook_sizes, backend="torch").eval()
    enc = model.vocab.encoder_tokens(torch.as_tensor(data.test.user), torch.as_tensor(data.test.history),
                                     torch.as_tensor(data.sids))
    items, scores = (t[0] for t in beam_search(model, enc, SIDTrie(data.sids, data.codebook_sizes), beam_size=10))
    assert (items[:, :6] >= 0).all() and (items[:, 6:] == -1).all() and torch.isneginf(scores[:, 6:]).all()
    assert all(sorted(r[:6]) == list(range(6)) for r in items.tolist())


@pytest.mark.parametrize("num_seeds", [1, 3])
def test_cached_beam_search_equals_the_full_prefix_search(num_seeds):
    """Decoding one token per level with the self-attention cache (beams re-ranked between levels)
    gives the items and scores of re-decoding the whole prefix at every level."""
    data = make_synthetic_dataset(num_users=25, num_items=40, seed=5)
    cfg = ModelConfig(encoder_layout=("sa", "gbla"), d_model=16, num_heads=2, head_dim=8, d_ff=32,
                      num_decoder_layers=2, dropout=0.1, num_user_buckets=5)
    model = TIGER(cfg, data.codebook_sizes, backend="torch", num_seeds=num_seeds)
    model.init_seeds(range(num_seeds)).double().eval()
    with torch.no_grad():
        model.head.weight.mul_(50)
        for block in model.decoder:   # position effects visible in the decoder's self-attention
            block.self_attn.relative_bias.normal_(0, 1.0)
    enc = model.vocab.encoder_tokens(torch.as_tensor(data.test.user), torch.as_tensor(data.test.history),
                                     torch.as_tensor(data.sids))
    trie = SIDTrie(data.sids, data.codebook_sizes)
    items, scores = beam_search(model, enc, trie, beam_size=12)
    ref_items, ref_scores = beam_search(model, enc, trie, beam_size=12, use_cache=False)
    assert torch.equal(items, ref_items)
    torch.testing.assert_close(scores, ref_scores, rtol=1e-10, atol=1e-10)


def test_decode_cache_is_written_once_and_followed_by_index():
    """Each position's keys and values are written into the cache's slots once; re-ranking the rows
    moves only their ancestor indices (the slots are the same tensor), and a step past the cache's
    positions or rows is refused with the sizes named."""
    from gbla.layers import DecodeCache, SelfAttentionLayer

    layer = SelfAttentionLayer(8, 2, 4, causal=True, num_seeds=1, backend="torch").eval()
    x = torch.randn(1, 3, 1, 8)
    out0, cache = layer.step(x, DecodeCache(positions=2, rows=6), 0)
    slots = cache.slots
    assert slots.shape == (2, 6, 2, 2, 4) and cache.key_rows.tolist() == [[0], [1], [2]]
    followed = cache.follow(torch.tensor([2, 2, 0, 1]))
    assert followed.slots is slots and followed.key_rows.tolist() == [[2], [2], [0], [1]]
    out1, cache1 = layer.step(torch.randn(1, 4, 1, 8), followed, 1)
    assert cache1.slots is slots and cache1.key_rows.tolist() == [[2, 0], [2, 1], [0, 2], [1, 3]]
    with pytest.raises(ValueError, match="does not fit a cache of 2 positions x 6 rows"):
        layer.step(torch.randn(1, 4, 1, 8), cache1, 2)
    with pytest.raises(ValueError, match="does not fit"):
        layer.step(torch.randn(1, 7, 1, 8), DecodeCache(positions=2, rows=6), 0)
