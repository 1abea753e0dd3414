"""gbla.data.recheck: recomputing a build's semantic IDs from its stored item texts reproduces its
fingerprint with the same embeddings and not with other ones; the command line's exit status and --out."""
import json

import numpy as np
import pytest

from gbla.common import REPO_ROOT
from gbla.data import amazon, build, recheck, text
from gbla.data.processed import load_processed
from test_committed_results import committed_run_dirs
from test_data_amazon import write_raw
from test_data_text_sids import FakeEncoder


class OtherEncoder(FakeEncoder):
    """Other vectors per word: stands in for a CPU whose kernels give other embeddings."""

    def _word(self, w):
        return super()._word(w + "#other")


def _fake_embed(texts, *args, **kwargs):        # the real model, replaced by the fake one (normalized as the build's)
    emb = FakeEncoder()(list(texts)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    return emb, {"model_id": "fake", "cache_key": "k", "cache_file": "k.npy", "cached": False}


@pytest.fixture
def built(tmp_path):
    write_raw(tmp_path / "src")
    out = tmp_path / "processed" / "beauty"
    build.build_dataset("beauty", source_dir=tmp_path / "src", raw=True, out_dir=out, codebook_size=4,
                        encoder=FakeEncoder(), encoder_id="fake", cache_dir=tmp_path / "cache", progress=False,
                        log=lambda *_: None)
    return out


def test_same_embeddings_same_fingerprint_other_embeddings_other(built):
    recorded = load_processed(built).provenance["fingerprint"]
    ds, fingerprint, was = recheck.recompute_semantic_ids(built, encoder=FakeEncoder(), encoder_id="fake", log=lambda *_: None)
    assert was == recorded and fingerprint == recorded
    assert np.array_equal(ds.sids, load_processed(built).sids)
    assert ds.provenance["semantic_ids_recomputed"]["recorded_fingerprint"] == recorded
    other, other_fingerprint, _ = recheck.recompute_semantic_ids(built, encoder=OtherEncoder(), encoder_id="fake",
                                                                 log=lambda *_: None)
    assert other_fingerprint != recorded and not np.array_equal(other.sids, ds.sids)
    with pytest.raises(ValueError, match="embedding model 'fake'.*has 'another'"):
        recheck.recompute_semantic_ids(built, encoder=FakeEncoder(), encoder_id="another")


def test_command_line(built, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(text, "resolve_model", lambda model: (model, "fake"))
    monkeypatch.setattr(text, "embed_texts", _fake_embed)
    recorded = load_processed(built).provenance["fingerprint"]
    assert recheck.main([str(built), "--out", str(tmp_path / "again")]) == 0
    assert f"fingerprint {recorded}, expected {recorded}: the same" in capsys.readouterr().out
    assert load_processed(tmp_path / "again").provenance["fingerprint"] == recorded
    # another fingerprint wanted: exit 1, nothing written
    assert recheck.main([str(built), "--expect", "0123456789ab", "--out", str(tmp_path / "none")]) == 1
    assert "DIFFERENT" in capsys.readouterr().out and not (tmp_path / "none").exists()
    # no dataset there: one line naming the folder, exit 2
    assert recheck.main([str(tmp_path / "missing")]) == 2
    assert "missing" in capsys.readouterr().err


# ------------------------------------------------------------------------------ codes kept as files

def test_codes_exported_then_built_from_give_the_same_dataset(built, tmp_path, monkeypatch, capsys):
    """A build that takes its semantic IDs from a code file gets the exported dataset's fingerprint
    without embedding anything, whatever encoder it would have used; the file is part of its build key."""
    from gbla.data import semantic_ids

    original = load_processed(built)
    codes = tmp_path / "codes" / "beauty.npz"
    assert semantic_ids.main(["export", str(built), "--out", str(codes)]) == 0
    assert original.provenance["fingerprint"] in capsys.readouterr().out

    def no_embedding(*args, **kwargs):
        raise AssertionError("a build from a code file embeds nothing")

    monkeypatch.setattr(text, "embed_texts", no_embedding)
    out = tmp_path / "from_codes" / "beauty"
    meta = build.build_dataset("beauty", source_dir=tmp_path / "src", raw=True, out_dir=out, codebook_size=4,
                               encoder=OtherEncoder(), encoder_id="fake", progress=False, log=lambda *_: None,
                               semantic_ids_file=codes)
    again = load_processed(out)
    assert meta["provenance"]["fingerprint"] == original.provenance["fingerprint"]
    assert np.array_equal(again.sids, original.sids) and again.codebook_sizes == original.codebook_sizes
    assert again.stats["semantic_ids"]["collision_rate"] == original.stats["semantic_ids"]["collision_rate"]
    assert meta["provenance"]["params"]["semantic_ids_file"]["name"] == "beauty.npz"
    assert meta["provenance"]["build_key"] != original.provenance["build_key"]
    # the command line: a folder of code files
    monkeypatch.setattr(text, "resolve_model", lambda model: (model, "fake"))
    assert build.main(["--dataset", "beauty", "--raw", "--source-dir", str(tmp_path / "src"), "--out-root",
                       str(tmp_path / "cli"), "--codebook-size", "4", "--semantic-ids", str(codes.parent),
                       "--no-report", "--no-progress"]) == 0
    assert load_processed(tmp_path / "cli" / "beauty").provenance["fingerprint"] == original.provenance["fingerprint"]
    # a folder that already holds those data (built by embedding) is left as it is
    logs = []
    meta = build.build_dataset("beauty", source_dir=tmp_path / "src", raw=True, out_dir=built, codebook_size=4,
                               progress=False, log=logs.append, semantic_ids_file=codes)
    assert meta["skipped"] and any("already holds the data of" in line for line in logs)


def test_code_files_are_checked_against_the_items(built, tmp_path):
    from gbla.data import semantic_ids

    ds = load_processed(built)
    path = semantic_ids.save_codes(tmp_path / "c.npz", ds.sids, ds.item_asins, fingerprint="f", params={})
    loaded = semantic_ids.load_codes(path, ds.item_asins, 3, 4)
    assert np.array_equal(loaded.sids, ds.sids)
    with pytest.raises(ValueError, match=r"c\.npz: its codes are for another list of items"):
        semantic_ids.load_codes(path, list(reversed(ds.item_asins)), 3, 4)
    with pytest.raises(ValueError, match=r"c\.npz: codes of shape"):
        semantic_ids.load_codes(path, ds.item_asins, 2, 4)
    with pytest.raises(ValueError, match=r"c\.npz: codes outside 0\.\.1"):
        semantic_ids.load_codes(path, ds.item_asins, 3, 2)
    twins = ds.sids.copy()
    twins[1] = twins[0]
    semantic_ids.save_codes(tmp_path / "twins.npz", twins, ds.item_asins, fingerprint="f", params={})
    with pytest.raises(ValueError, match=r"twins\.npz: two items share a semantic ID"):
        semantic_ids.load_codes(tmp_path / "twins.npz", ds.item_asins, 3, 4)
    with pytest.raises(FileNotFoundError, match=r"none\.npz: no such code file"):
        semantic_ids.load_codes(tmp_path / "none.npz", ds.item_asins, 3, 4)
    with pytest.raises(ValueError, match="a single code file serves one --dataset"):
        build._codes_file(path, "beauty", 2)


def test_a_code_file_serves_only_the_settings_that_made_it(built, tmp_path):
    from gbla.data import semantic_ids

    ds = load_processed(built)
    codes = semantic_ids.save_codes(tmp_path / "beauty.npz", ds.sids, ds.item_asins,
                                    fingerprint=ds.provenance["fingerprint"], params=ds.provenance["params"])
    kw = dict(source_dir=tmp_path / "src", raw=True, codebook_size=4, encoder=FakeEncoder(), encoder_id="fake",
              progress=False, log=lambda *_: None, semantic_ids_file=codes)
    with pytest.raises(ValueError, match=r"beauty\.npz: its codes were made with other settings \(seed 0 there, 1 "):
        build.build_dataset("beauty", out_dir=tmp_path / "seed1", seed=1, **kw)
    with pytest.raises(ValueError, match=r"embedding_model 'fake' there, 'other' requested"):
        build.build_dataset("beauty", out_dir=tmp_path / "other", **{**kw, "encoder_id": "other"})
    assert not (tmp_path / "seed1").exists() and not (tmp_path / "other").exists()


# ------------------------------------------------------------------------------ the committed code files

COMMITTED_CODES = REPO_ROOT / "outputs" / "data" / "semantic_ids"


def _runs_fingerprints(dataset: str) -> set[str]:
    """The data fingerprints the committed runs of one dataset (every profile's runs folder) trained on."""
    return {json.loads((d / "metrics.json").read_text())["data_fingerprint"] for d in committed_run_dirs([dataset])}


def test_committed_code_files_are_the_committed_runs_data():
    """Every Amazon dataset with committed runs has a code file, and it names the data those runs trained
    on: `make data` on any CPU then gives the data of the results in outputs/runs. (The synthetic smoke
    runs a checkout may hold are built without semantic-ID files.)"""
    from gbla.data import semantic_ids

    datasets = [name for name in amazon.DATASETS if _runs_fingerprints(name)]
    if not datasets:
        pytest.skip("no committed runs in this checkout")
    for name in datasets:
        codes = COMMITTED_CODES / f"{name}.npz"
        assert codes.exists(), f"{name}: runs committed but no code file {codes}"
        assert _runs_fingerprints(name) == {semantic_ids.code_file_fingerprint(codes)}, name


@pytest.mark.skipif(not amazon.default_source_dir().is_dir(), reason="the Amazon mirror is not beside the repo")
@pytest.mark.parametrize("dataset", sorted(amazon.DATASETS))
def test_committed_code_file_builds_its_fingerprint_from_the_mirror(dataset, tmp_path):
    """From the offline mirror and the committed code file, the build gives the fingerprint the file
    records (seconds, no embedding model needed), on whatever CPU runs the tests."""
    from gbla.data import semantic_ids

    codes = COMMITTED_CODES / f"{dataset}.npz"
    meta = build.build_dataset(dataset, out_dir=tmp_path / dataset, progress=False, log=lambda *_: None,
                               semantic_ids_file=codes)
    assert meta["provenance"]["fingerprint"] == semantic_ids.code_file_fingerprint(codes)
