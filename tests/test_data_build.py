"""End-to-end build (tiny inputs, fake encoder), skip-if-identical, the CLI, and download via file://."""
import json

import numpy as np
import pytest

from gbla.data import build, download
from gbla.data.amazon import DataFormatError
from gbla.data.processed import load_processed
from test_data_amazon import write_gz_lines, write_mirror, write_raw
from test_data_text_sids import FakeEncoder


def _build(tmp_path, out, **kw):
    logs = []
    kw.setdefault("source_dir", tmp_path / "src")
    meta = build.build_dataset("beauty", out_dir=out, codebook_size=4, encoder=FakeEncoder(), encoder_id="fake",
                               cache_dir=tmp_path / "cache", progress=False, log=logs.append, **kw)
    return meta, logs


def test_build_from_raw_then_skip_then_rebuild(tmp_path):
    write_raw(tmp_path / "src")
    out = tmp_path / "processed" / "beauty"
    meta, logs = _build(tmp_path, out, raw=True)
    ds = load_processed(out)
    assert ds.num_users == 12 and ds.num_items == 10 and ds.sids.shape == (10, 4)
    assert len(np.unique(ds.sids, axis=0)) == 10
    assert ds.stats["interactions"] == 84 and ds.stats["users"] == 12 and ds.stats["median_seq_len"] == 7
    assert not ds.stats["matches_published"]
    assert len(ds.train) == 84 - 36 and ds.train.history.shape[1] == 20
    assert ds.item_texts[0] == "Title: Item 0; Categories: Beauty; Price: 1.50"
    prov = ds.provenance
    assert prov["params"]["source_format"] == "raw" and prov["params"]["k_core"] == 5
    assert set(prov["source_files"]) == {"reviews_Beauty_5.json.gz", "meta_Beauty.json.gz"}
    assert set(prov["timings"]) >= {"parse_s", "embed_s", "semantic_ids_s", "total_s"}
    assert len(prov["fingerprint"]) == 12 and prov["fingerprint"] == meta["provenance"]["fingerprint"]

    again, logs = _build(tmp_path, out, raw=True)                   # identical inputs and parameters
    assert any("skipping" in m for m in logs) and again["skipped"] and "skipped" not in meta
    _, logs = _build(tmp_path, out, raw=True, seed=1)                # a parameter changed -> rebuilt
    assert not any("skipping" in m for m in logs)
    assert load_processed(out).provenance["params"]["seed"] == 1
    _, logs = _build(tmp_path, out, raw=True, seed=1, force=True)
    assert not any("skipping" in m for m in logs)
    first = load_processed(out)
    _build(tmp_path, out, raw=True, seed=1, force=True)
    assert load_processed(out).provenance["fingerprint"] == first.provenance["fingerprint"]   # reproducible


def test_build_from_mirror_and_source_change(tmp_path):
    seqs = [f"u{u} " + " ".join(f"A{(u + j) % 9}" for j in range(5)) for u in range(9)]
    write_mirror(tmp_path / "src", sequences=seqs, items=[{"asin": f"A{i}", "title": f"t{i}"} for i in range(9)])
    out = tmp_path / "p"
    _build(tmp_path, out)
    ds = load_processed(out)
    assert ds.provenance["params"]["source_format"] == "mirror" and ds.user_ids[0] == "u0"
    assert ds.item_asins[:5] == ["A0", "A1", "A2", "A3", "A4"]
    seqs[0] = "u0 A0 A2 A1 A3 A4"                                  # source changed -> not skipped
    write_mirror(tmp_path / "src", sequences=seqs, items=[{"asin": f"A{i}", "title": f"t{i}"} for i in range(9)])
    _, logs = _build(tmp_path, out)
    assert not any("skipping" in m for m in logs)
    assert load_processed(out).test.target[0] == ds.item_asins.index("A4")


def test_failed_build_leaves_previous_result(tmp_path):
    write_raw(tmp_path / "src")
    out = tmp_path / "p"
    _build(tmp_path, out, raw=True)
    before = (out / "meta.json").read_text()
    write_gz_lines(tmp_path / "src" / "meta_Beauty.json.gz", ["{'asin': 'I1', 'title': 'x'", "{'asin': 'I2'}"])
    with pytest.raises(DataFormatError, match="meta_Beauty.json.gz, line 1: malformed dict literal"):
        _build(tmp_path, out, raw=True, force=True)
    assert (out / "meta.json").read_text() == before


def test_cli_rejects_unknown_dataset_and_missing_source(tmp_path, capsys):
    with pytest.raises(ValueError, match="unknown dataset 'movies'"):
        build.main(["--dataset", "movies", "--no-report"])
    with pytest.raises(FileNotFoundError, match="source file missing for dataset 'toys'.*--source-dir"):
        build.main(["--dataset", "toys", "--source-dir", str(tmp_path), "--out-root", str(tmp_path / "o"),
                    "--no-report"])
    with pytest.raises(FileNotFoundError, match="gbla.data.download"):
        build.main(["--dataset", "toys", "--raw", "--source-dir", str(tmp_path), "--no-report"])


def test_report_tables(tmp_path):
    write_raw(tmp_path / "src")
    meta, _ = _build(tmp_path, tmp_path / "p", raw=True)
    report = tmp_path / "report.md"
    build.write_report({"beauty": meta}, report, "python -m gbla.data.build --dataset beauty", 1.0)
    md = report.read_text()
    assert "| beauty | 12 | 10 | 84 | 7.00 | 7 | 7..7 |" in md and "collision rate" in md
    assert meta["provenance"]["fingerprint"] in md


def test_cli_writes_report_only_when_something_was_built(tmp_path, monkeypatch):
    from gbla.data import text

    write_raw(tmp_path / "src")
    calls = []

    def fake_embed(texts, *args, **kwargs):                        # the CLI's model, replaced by the fake one
        calls.append(len(texts))
        emb = FakeEncoder()(list(texts)).astype(np.float32)
        return emb, {"model_id": "fake", "cache_key": "k", "cache_file": "k.npy", "cached": False}

    monkeypatch.setattr(text, "embed_texts", fake_embed)
    report = tmp_path / "report.md"
    args = ["--dataset", "beauty", "--raw", "--source-dir", str(tmp_path / "src"), "--out-root",
            str(tmp_path / "out"), "--codebook-size", "4", "--report", str(report), "--no-progress"]
    build.main(args)
    assert "| beauty | 12 | 10 | 84 |" in report.read_text() and calls == [10]
    assert load_processed(tmp_path / "out" / "beauty").num_items == 10
    report.write_text("notes added by hand")
    build.main(args)                                               # everything up to date: nothing rewritten
    assert report.read_text() == "notes added by hand" and calls == [10]


def test_download_via_file_url(tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    write_raw(served, dataset="toys")
    out = tmp_path / "raw"
    logs = []
    got = download.download_dataset("toys", out, base_url=served.as_uri(), progress=False, log=logs.append)
    names = ["reviews_Toys_and_Games_5.json.gz", "meta_Toys_and_Games.json.gz"]
    assert list(got) == names
    for name in names:
        assert (out / name).read_bytes() == (served / name).read_bytes()
    assert json.loads((out / "checksums.json").read_text()) == got
    assert not list(out.glob(".*part"))
    logs.clear()
    download.download_dataset("toys", out, base_url=served.as_uri(), progress=False, log=logs.append)
    assert sum("skipping" in m for m in logs) == 2                    # present with matching checksum
    (out / names[1]).write_bytes(b"truncated")                        # checksum mismatch -> fetched again
    download.download_dataset("toys", out, base_url=served.as_uri(), progress=False, log=logs.append)
    assert (out / names[1]).read_bytes() == (served / names[1]).read_bytes()


def test_download_missing_url_leaves_nothing(tmp_path):
    out = tmp_path / "raw"
    with pytest.raises(OSError, match="download of file://.*reviews_Beauty_5.json.gz failed"):
        download.download_dataset("beauty", out, base_url=(tmp_path / "nowhere").as_uri(), progress=False,
                                  log=lambda m: None)
    assert list(out.iterdir()) == []
    with pytest.raises(ValueError, match="unknown dataset"):
        download.main(["--dataset", "garden", "--out", str(out)])
