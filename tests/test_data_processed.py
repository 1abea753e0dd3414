"""Leave-one-out split, prefix expansion, and the on-disk processed format (save/load, atomicity)."""
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from gbla import common
from gbla.data import processed
from gbla.data.processed import (PAD_ITEM, ProcessedDataset, compute_fingerprint, default_processed_dir,
                                 leave_one_out_split, load_processed, save_processed)


def _history(split, i):
    return split.history[i, :split.history_len[i]].tolist()


def test_split_by_hand():
    seq = [10, 11, 12, 13, 14, 15]
    train, valid, test = leave_one_out_split([seq])
    assert test.target.tolist() == [15] and _history(test, 0) == [10, 11, 12, 13, 14]
    assert valid.target.tolist() == [14] and _history(valid, 0) == [10, 11, 12, 13]
    assert train.target.tolist() == [11, 12, 13]
    assert [_history(train, i) for i in range(3)] == [[10], [10, 11], [10, 11, 12]]
    assert (train.history[0, 1:] == PAD_ITEM).all()                     # right-padded with -1
    assert train.history.shape == (3, 20) and train.history.dtype == np.int64


def test_history_truncated_to_last_20():
    seq = list(range(30))
    train, valid, test = leave_one_out_split([seq])
    assert _history(test, 0) == list(range(9, 29))                  # s[:29][-20:]
    assert _history(valid, 0) == list(range(8, 28))
    last = len(train) - 1                                           # target s[27] = s[n-3]
    assert train.target[last] == 27 and _history(train, last) == list(range(7, 27))
    assert train.history_len.max() == 20 and train.history_len.min() == 1


def test_split_properties_random_users():
    rng = np.random.default_rng(1)
    seqs = [rng.permutation(1000)[: rng.integers(3, 45)].tolist() for _ in range(300)]   # distinct items per user
    train, valid, test = leave_one_out_split(seqs, max_history=20)
    assert len(train) == sum(len(s) - 3 for s in seqs)             # one example per prefix t = 1..n-3
    assert len(valid) == len(test) == len(seqs)
    assert test.user.tolist() == valid.user.tolist() == list(range(len(seqs)))
    for u, s in enumerate(seqs):
        assert test.target[u] == s[-1] and valid.target[u] == s[-2]
        assert _history(test, u) == s[:-1][-20:] and _history(valid, u) == s[:-2][-20:]
    for i in range(len(train)):
        s = seqs[train.user[i]]
        t = s.index(int(train.target[i]))
        assert 1 <= t <= len(s) - 3                                  # valid/test targets never trained on
        assert _history(train, i) == s[:t][-20:]                     # nothing at or after the target
        assert int(train.target[i]) not in _history(train, i)
    # within each user, training targets come in time order
    assert np.all(np.diff(train.user) >= 0)


def test_split_rejects_short_sequences():
    with pytest.raises(ValueError, match="user index 1 has 2"):
        leave_one_out_split([[1, 2, 3], [4, 5]])


def _tiny_dataset(name="tiny"):
    seqs = [[0, 1, 2, 3], [2, 3, 4], [4, 0, 1, 2, 3]]
    train, valid, test = leave_one_out_split(seqs)
    sids = np.array([[0, 1, 2, 0], [0, 1, 2, 1], [1, 0, 0, 0], [2, 2, 2, 0], [3, 1, 0, 0]], dtype=np.int64)
    ds = ProcessedDataset(name=name, num_users=3, num_items=5, sids=sids, codebook_sizes=(4, 4, 4, 2),
                          train=train, valid=valid, test=test, item_asins=list("ABCDE"), user_ids=["u0", "u1", "u2"],
                          stats={"users": 3}, provenance={"source": "test"}, item_texts=[f"t{i}" for i in range(5)])
    ds.provenance["fingerprint"] = compute_fingerprint(ds)
    return ds


def test_save_load_roundtrip(tmp_path):
    ds = _tiny_dataset()
    save_processed(ds, tmp_path / "tiny")
    back = load_processed(tmp_path / "tiny")
    assert back.name == "tiny" and back.num_users == 3 and back.num_items == 5
    assert back.codebook_sizes == (4, 4, 4, 2)
    np.testing.assert_array_equal(back.sids, ds.sids)
    for name in ("train", "valid", "test"):
        for field in ("user", "history", "history_len", "target"):
            np.testing.assert_array_equal(getattr(back.split(name), field), getattr(ds.split(name), field))
    assert back.item_asins == list("ABCDE") and back.user_ids == ["u0", "u1", "u2"]
    assert back.item_texts == ds.item_texts and back.stats == {"users": 3}
    assert compute_fingerprint(back) == ds.provenance["fingerprint"] == back.provenance["fingerprint"]
    assert pq.read_table(tmp_path / "tiny" / "items.parquet").column_names == ["item", "asin", "sid", "text"]


def test_fingerprint_changes_with_content():
    a, b = _tiny_dataset(), _tiny_dataset()
    b.sids = b.sids.copy()
    b.sids[0, 0] = 3
    assert compute_fingerprint(a) != compute_fingerprint(b)


def test_interrupted_save_keeps_previous_result(tmp_path, monkeypatch):
    target = tmp_path / "tiny"
    save_processed(_tiny_dataset("first"), target)
    calls = {"n": 0}
    real_write = pq.write_table

    def failing_write(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("simulated interruption")
        return real_write(*args, **kwargs)

    monkeypatch.setattr(processed.pq, "write_table", failing_write)
    with pytest.raises(KeyboardInterrupt):
        save_processed(_tiny_dataset("second"), target)
    assert load_processed(target).name == "first"                    # old result intact
    assert [p.name for p in tmp_path.iterdir()] == ["tiny"]           # no temporary folder left behind
    calls["n"] = 0
    with pytest.raises(KeyboardInterrupt):
        save_processed(_tiny_dataset("third"), tmp_path / "fresh")
    assert not (tmp_path / "fresh").exists()                          # nothing that looks complete


def test_load_missing_names_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="meta.json missing"):
        load_processed(tmp_path / "nothing")


def test_default_processed_dir(monkeypatch, tmp_path):
    monkeypatch.delenv("GBLA_PROCESSED_DIR", raising=False)
    assert default_processed_dir("beauty") == common.REPO_ROOT / "outputs" / "processed" / "beauty"
    monkeypatch.setenv("GBLA_PROCESSED_DIR", str(tmp_path))
    assert default_processed_dir("toys") == tmp_path / "toys"


def test_processed_imports_without_build_dependencies():
    # the GPU machine has numpy + pyarrow but no polars / sklearn / sentence-transformers
    code = ("import sys\n"
            "for m in ('polars', 'sklearn', 'sentence_transformers', 'datasets'): sys.modules[m] = None\n"
            "import gbla.data, gbla.data.processed\n"
            "from gbla.data import load_processed, save_processed, leave_one_out_split\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=common.REPO_ROOT)
