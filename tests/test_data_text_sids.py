"""Item text, the embedding cache, and semantic IDs (residual k-means + dedup digit)."""
import hashlib

import numpy as np
import pytest

from gbla.data import semantic_ids, text


class FakeEncoder:
    """Bag of words with a fixed pseudo-random 16-d vector per word: similar texts -> similar vectors."""

    def __init__(self, dim=16):
        self.dim, self.calls, self.texts_seen = dim, 0, 0

    def _word(self, w):
        seed = int.from_bytes(hashlib.sha256(w.encode()).digest()[:8], "little")
        return np.random.default_rng(seed).standard_normal(self.dim)

    def __call__(self, batch):
        self.calls += 1
        self.texts_seen += len(batch)
        return np.stack([sum((self._word(w) for w in t.lower().split()), np.zeros(self.dim)) + 1e-3
                         for t in batch])


def test_item_text_fields_and_unescape():
    meta = {"title": "Tom &amp; Jerry&#39;s &quot;Set&quot;", "brand": "Ac&amp;me",
            "categories": [["Toys & Games", "Puzzles"], ["Toys & Games", "Jigsaw"]], "price": 12.5}
    assert text.item_text("B1", meta) == ('Title: Tom & Jerry\'s "Set"; Brand: Ac&me; '
                                          "Categories: Toys & Games, Puzzles, Jigsaw; Price: 12.50")
    assert text.item_text("B2", {"title": "Only  a\ttitle", "brand": None, "categories": None, "price": None}) \
        == "Title: Only a title"
    assert text.item_text("B3", {"title": "x &amp;amp; y"}) == "Title: x & y"          # double-escaped source
    assert text.item_text("B4", {"title": None, "brand": None, "categories": None, "price": None}) == "Item: B4"
    assert text.item_text("B5", {"categories": [["Beauty"]]}) == "Categories: Beauty"


def test_embedding_cache_recomputes_only_on_change(tmp_path):
    enc = FakeEncoder()
    texts = ["red lipstick", "blue lipstick", "garden hose", "red rose"]
    e1, info1 = text.embed_texts(texts, cache_dir=tmp_path, encoder=enc, model_id="fake-v1", batch_size=3,
                                 progress=False)
    assert e1.shape == (4, 16) and not info1["cached"] and enc.calls == 2        # batched: 3 + 1
    np.testing.assert_allclose(np.linalg.norm(e1, axis=1), 1.0, rtol=1e-5)
    # rows come back in input order even though encoding sorts by length
    np.testing.assert_allclose(e1[2], enc([texts[2]])[0] / np.linalg.norm(enc([texts[2]])[0]), rtol=1e-5)
    enc.calls = 0
    e2, info2 = text.embed_texts(texts, cache_dir=tmp_path, encoder=enc, model_id="fake-v1", progress=False)
    assert info2["cached"] and enc.calls == 0 and np.array_equal(e1, e2)
    _, info3 = text.embed_texts(texts[:3] + ["red roses"], cache_dir=tmp_path, encoder=enc, model_id="fake-v1",
                                progress=False)
    assert not info3["cached"] and enc.calls > 0                                   # text changed
    _, info4 = text.embed_texts(texts, cache_dir=tmp_path, encoder=enc, model_id="fake-v2", progress=False)
    assert not info4["cached"] and info4["cache_key"] != info1["cache_key"]       # model changed
    assert not list(tmp_path.glob(".*tmp*"))                                      # no temporary files left


def test_custom_encoder_needs_model_id():
    with pytest.raises(ValueError, match="model_id"):
        text.embed_texts(["a"], encoder=FakeEncoder())


def test_default_model_resolves_to_packaged_folder():
    location, model_id = text.resolve_model(text.DEFAULT_MODEL)
    assert (text.Path(location) / "model.safetensors").is_file() and "all-MiniLM-L6-v2" in model_id
    assert text.resolve_model("sentence-transformers/sentence-t5-base") == ("sentence-transformers/sentence-t5-base",) * 2


@pytest.mark.slow
def test_real_minilm_offline(tmp_path, monkeypatch):
    """The one test that loads the real packaged model (offline), on a handful of texts."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    texts = ["Title: Red matte lipstick; Categories: Beauty, Makeup, Lips",
             "Title: Crimson lip colour, long lasting; Categories: Beauty, Makeup, Lips",
             "Title: 50 ft garden hose with spray nozzle",
             "Title: Wooden jigsaw puzzle, 1000 pieces"]
    emb, info = text.embed_texts(texts, cache_dir=tmp_path, progress=False)
    assert emb.shape == (4, 384) and emb.dtype == np.float32 and not info["cached"]
    sim = emb @ emb.T
    assert sim[0, 1] > sim[0, 2] and sim[0, 1] > sim[0, 3]                          # lipsticks closest


def test_dedup_digit_by_hand():
    codes = np.array([[1, 2, 3], [0, 0, 0], [1, 2, 3], [1, 2, 4], [1, 2, 3], [0, 0, 0]])
    assert semantic_ids.dedup_digit(codes).tolist() == [0, 0, 1, 0, 2, 1]
    report = semantic_ids.sid_report(codes, semantic_ids.dedup_digit(codes), codebook_size=8)
    assert report["collision_rate"] == pytest.approx(5 / 6)                       # only [1,2,4] is alone
    assert report["distinct_code_tuples"] == 3 and report["max_dedup_digit"] == 2
    assert report["largest_collision_group"] == 3
    assert [lv["codes_used"] for lv in report["levels"]] == [2, 2, 3]
    assert report["levels"][0]["usage"] == pytest.approx(2 / 8) and report["levels"][0]["max_items_per_code"] == 4


def _embeddings(n=300, dim=16, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, dim)).astype(np.float32)
    x[10:20] = x[5]                                   # ten exact duplicates of item 5: must share 3 codes
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_semantic_ids_unique_and_deterministic():
    x = _embeddings()
    a = semantic_ids.build_semantic_ids(x, levels=3, codebook_size=16, seed=3, progress=False)
    b = semantic_ids.build_semantic_ids(x, levels=3, codebook_size=16, seed=3, progress=False)
    assert a.sids.shape == (300, 4) and a.sids.dtype == np.int64
    assert len(np.unique(a.sids, axis=0)) == 300                                   # all 4-digit SIDs distinct
    assert np.array_equal(a.sids, b.sids)                                          # same seed -> same SIDs
    dup = a.sids[[5] + list(range(10, 20))]
    assert (dup[:, :3] == dup[0, :3]).all() and dup[:, 3].tolist() == list(range(11))   # 0,1,2.. in item order
    assert a.codebook_sizes[:3] == (16, 16, 16) and a.codebook_sizes[3] == a.sids[:, 3].max() + 1
    assert (a.sids[:, :3] < 16).all() and (a.sids >= 0).all()
    assert a.report["collision_rate"] >= 11 / 300 and a.report["max_dedup_digit"] >= 10
    c = semantic_ids.build_semantic_ids(x, levels=3, codebook_size=16, seed=4, progress=False)
    assert not np.array_equal(a.sids, c.sids)


def test_residual_levels_reduce_error():
    x = _embeddings(seed=1)
    codes, centroids = semantic_ids.residual_kmeans(x, levels=3, codebook_size=16, seed=0, progress=False)
    recon, errors = np.zeros_like(x), []
    for level in range(3):
        recon = recon + centroids[level][codes[:, level]]
        errors.append(float(((x - recon) ** 2).sum()))
    assert errors[0] > errors[1] > errors[2]


def test_semantic_ids_bad_input():
    with pytest.raises(ValueError, match="cannot fill a codebook of 256"):
        semantic_ids.build_semantic_ids(np.ones((10, 4), np.float32), progress=False)
    x = _embeddings(n=40)
    x[3, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        semantic_ids.build_semantic_ids(x, codebook_size=8, progress=False)


def test_cpu_kernels_are_pinned_unless_the_environment_says_otherwise(tmp_path, monkeypatch):
    """The real encoder runs on the pinned MKL / oneDNN kernels (text.CPU_KERNEL_PINS): set when
    absent, an explicit setting kept, recorded in the embedding info and part of the cache key (an
    embedding computed on other kernels is not reused)."""
    class FakeModel:
        def encode(self, batch, **kw):
            return FakeEncoder()(batch)

    monkeypatch.setattr(text, "load_sentence_encoder", lambda model: FakeModel())
    for key in text.CPU_KERNEL_PINS:  # set, then removed: monkeypatch restores the original state after
        monkeypatch.setenv(key, "")
        monkeypatch.delenv(key)
    texts = ["red lipstick", "garden hose"]
    _, pinned = text.embed_texts(texts, cache_dir=tmp_path, progress=False)
    assert pinned["cpu_kernels"] == text.CPU_KERNEL_PINS == {"MKL_ENABLE_INSTRUCTIONS": "AVX2",
                                                             "ONEDNN_MAX_CPU_ISA": "AVX2"}
    assert text.embed_texts(texts, cache_dir=tmp_path, progress=False)[1]["cached"]
    monkeypatch.setenv("MKL_ENABLE_INSTRUCTIONS", "AVX512")
    _, other = text.embed_texts(texts, cache_dir=tmp_path, progress=False)
    assert other["cpu_kernels"]["MKL_ENABLE_INSTRUCTIONS"] == "AVX512" and not other["cached"]
    assert other["cache_key"] != pinned["cache_key"]
    # a custom encoder (tests) is not a CPU-kernel matter: no pins recorded
    _, custom = text.embed_texts(texts, cache_dir=tmp_path, progress=False, encoder=FakeEncoder(), model_id="fake")
    assert "cpu_kernels" not in custom
