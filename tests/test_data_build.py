"""End-to-end build (tiny inputs, fake encoder), skip-if-identical, the CLI, and download via file://."""
import json
import os

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
    env = prov["environment"]    # what a build on another machine must be compared against
    import numpy, sklearn
    assert env["packages"]["numpy"] == numpy.__version__ and env["packages"]["scikit-learn"] == sklearn.__version__
    assert env["cpu"] and env["python"] and {"torch", "sentence-transformers"} <= set(env["packages"])
    assert "environment" not in json.dumps(prov["params"])   # versions are recorded, not part of the key

    again, logs = _build(tmp_path, out, raw=True)                   # identical inputs and parameters
    assert any("skipping" in m for m in logs) and again["skipped"] and "skipped" not in meta
    before = (out / "meta.json").read_text()
    with pytest.raises(build.BuildConflict, match=r"other settings \(seed 0 there, 1 requested\).*--force"):
        _build(tmp_path, out, raw=True, seed=1)                      # a parameter changed: never replaced silently
    assert (out / "meta.json").read_text() == before
    _, logs = _build(tmp_path, out, raw=True, seed=1, force=True)   # ... unless asked
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
    with pytest.raises(build.BuildConflict, match=r"source sequences.txt changed"):
        _build(tmp_path, out)
    _, logs = _build(tmp_path, out, force=True)
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


def test_cli_errors_are_one_line_without_a_traceback(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("GBLA_DEBUG", raising=False)
    cases = [(["--dataset", "movies"], "unknown dataset 'movies'; known datasets: beauty, sports, toys"),
             (["--dataset", "toys", "--source-dir", str(tmp_path), "--out-root", str(tmp_path / "o")],
              "source file missing for dataset 'toys'"),
             (["--dataset", "toys", "--raw", "--source-dir", str(tmp_path)], "gbla.data.download")]
    for args, message in cases:
        assert build.main(args + ["--no-report"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1, err
    with pytest.raises(ValueError, match="unknown dataset 'movies'"):   # --debug: the exception itself
        build.main(["--dataset", "movies", "--no-report", "--debug"])


def test_cli_bad_input_line_as_a_user_sees_it(tmp_path):
    """`python -m gbla.data.build` on a malformed source: file, line and field in one line, exit code 2."""
    import subprocess
    import sys

    write_mirror(tmp_path / "src", items=['{"asin": "A", "title": "ok"}', '{"asin": "B", "title": '])
    cmd = [sys.executable, "-m", "gbla.data.build", "--dataset", "beauty", "--source-dir", str(tmp_path / "src"),
           "--out-root", str(tmp_path / "out"), "--no-report", "--no-progress"]
    env = {k: v for k, v in os.environ.items() if k != "GBLA_DEBUG"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines() == [f"error: {tmp_path / 'src' / 'beauty' / 'items.jsonl'}, line 2: "
                                                + proc.stderr.split(", line 2: ", 1)[1].strip()]
    debug = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**env, "GBLA_DEBUG": "1"})
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_report_tables(tmp_path):
    write_raw(tmp_path / "src")
    meta, _ = _build(tmp_path, tmp_path / "p", raw=True)
    report = tmp_path / "report.md"
    build.write_report({"beauty": meta}, report, "python -m gbla.data.build --dataset beauty", 1.0)
    md = report.read_text()
    assert "| beauty | 12 | 10 | 84 | 7.00 | 7 | 7..7 |" in md and "collision rate" in md
    assert meta["provenance"]["fingerprint"] in md
    assert "## Environment of each build" in md and f"numpy {np.__version__}" in md


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


def test_cli_all_writes_its_report_beside_the_data_not_into_tracked_files(tmp_path, monkeypatch):
    """`make data` must leave a fresh clone clean: its report goes next to the (git-ignored) data."""
    import subprocess

    from gbla.data import text
    from gbla.data.processed import REPO_ROOT, default_processed_dir

    monkeypatch.setattr(text, "embed_texts", lambda texts, *a, **k: (
        FakeEncoder()(list(texts)).astype(np.float32),
        {"model_id": "fake", "cache_key": "k", "cache_file": "k.npy", "cached": False}))
    seqs = [f"u{u} " + " ".join(f"A{(u + j) % 9}" for j in range(5)) for u in range(9)]
    for name in ("beauty", "sports", "toys"):
        write_mirror(tmp_path / "src", name, sequences=seqs, items=[{"asin": f"A{i}", "title": f"t{i}"} for i in range(9)])
    out = tmp_path / "out"
    assert build.main(["--all", "--source-dir", str(tmp_path / "src"), "--out-root", str(out), "--codebook-size", "4",
                       "--no-progress"]) == 0
    assert "| toys | 9 | 9 | 45 |" in (out / build.REPORT_NAME).read_text()

    monkeypatch.delenv("GBLA_PROCESSED_DIR", raising=False)
    default_report = default_processed_dir("beauty").parent / build.REPORT_NAME
    relative = default_report.relative_to(REPO_ROOT)
    if not (REPO_ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    tracked = subprocess.run(["git", "ls-files", "--error-unmatch", str(relative)], cwd=REPO_ROOT,
                             capture_output=True).returncode == 0
    ignored = subprocess.run(["git", "check-ignore", "-q", str(relative)], cwd=REPO_ROOT).returncode == 0
    assert ignored and not tracked, f"{relative} would be modified by every build"


def test_if_missing_builds_only_absent_datasets(tmp_path, capsys):
    write_raw(tmp_path / "src")
    out = tmp_path / "out" / "beauty"
    _build(tmp_path, out, raw=True, seed=1)           # a build with other settings than the CLI's defaults
    before = (out / "meta.json").read_text()
    args = ["--dataset", "beauty", "--raw", "--source-dir", str(tmp_path / "src"), "--out-root",
            str(tmp_path / "out"), "--codebook-size", "4", "--no-report", "--no-progress"]
    assert build.main(args + ["--if-missing"]) == 0      # present: left alone, whatever its settings
    assert "left as it is (--if-missing)" in capsys.readouterr().out
    assert (out / "meta.json").read_text() == before
    assert build.main(args) == 2                         # without it: the conflict, and how to proceed
    err = capsys.readouterr().err
    assert "seed 1 there, 0 requested" in err and "--force" in err
    assert (out / "meta.json").read_text() == before
