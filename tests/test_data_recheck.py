"""gbla.data.recheck: recomputing a build's semantic IDs from its stored item texts reproduces its
fingerprint with the same embeddings and not with other ones; the command line's exit status and --out."""
import numpy as np
import pytest

from gbla.data import build, recheck, text
from gbla.data.processed import load_processed
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
