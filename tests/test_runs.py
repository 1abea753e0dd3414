"""The run-directory contract (gbla/runs.py): what a run writes, when it counts as done, how runs are read."""
import dataclasses
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest

from gbla import datasets, runs
from gbla.config import ModelConfig, RunConfig, TrainConfig
from gbla.train import RunResult

METRICS = {"recall@5": 0.1, "recall@10": 0.2, "ndcg@5": 0.05, "ndcg@10": 0.08}


def make_result(variant="sa", seed=0, max_epochs=3, ranks=(1, 0, 10, 3)) -> RunResult:
    config = RunConfig("synthetic", variant, seed, model=ModelConfig(d_model=16),
                       train=TrainConfig(max_epochs=max_epochs))
    n = len(ranks)
    history = [{"epoch": e, "train_loss": 2.0 / e, "epoch_time_s": 0.1,
                **{f"valid_{k}": v * e / 3 for k, v in METRICS.items()}} for e in range(1, 4)]
    return RunResult(config=config, config_hash=config.config_hash(), device="cpu", wall_time_s=1.5,
                     epochs_trained=3, best_epoch=2, history=history, valid_metrics=dict(METRICS),
                     test_metrics={k: v / 2 for k, v in METRICS.items()},
                     test_per_user={"user": np.arange(n), "target": np.arange(n) + 100,
                                    "rank": np.asarray(ranks)},
                     timings={"train_s": 1.0, "eval_s": 0.5})


def test_save_run_result_writes_the_contract(tmp_path):
    result = make_result()
    run_dir = runs.run_dir_for(tmp_path, "synthetic", "sa", 0)
    assert run_dir == tmp_path / "synthetic" / "sa" / "seed0"
    runs.save_run_result(result, run_dir, data_fingerprint="abc123", commit="deadbeef")

    metrics = json.loads((run_dir / "metrics.json").read_text())
    for key in ("status", "dataset", "variant", "seed", "config", "config_hash", "data_fingerprint", "commit",
                "device", "created_at", "wall_time_s", "epochs_trained", "best_epoch", "valid", "test",
                "timings", "history"):
        assert key in metrics, key
    assert metrics["status"] == "ok" and metrics["config_hash"] == result.config.config_hash()
    assert RunConfig.from_dict(metrics["config"]) == result.config  # the recorded config rebuilds the run
    assert metrics["test"] == pytest.approx({k: v / 2 for k, v in METRICS.items()})
    assert [h["epoch"] for h in metrics["history"]] == [1, 2, 3]

    per_user = runs.load_per_user(run_dir)
    assert list(per_user.columns) == ["user", "target", "rank"]
    assert [str(t) for t in per_user.dtypes] == ["int64", "int64", "int8"]
    assert per_user["rank"].tolist() == [1, 0, 10, 3]
    import pyarrow.parquet as pq

    encodings = pq.ParquetFile(run_dir / runs.PER_USER_FILE).metadata.row_group(0).column(0).encodings
    assert "DELTA_BINARY_PACKED" in encodings  # the compact encoding (write_per_user)
    assert runs.is_done(run_dir, result.config_hash)
    assert not runs.is_done(run_dir, "0" * 12)
    assert runs.load_history(run_dir)["train_loss"].tolist() == pytest.approx([2.0, 1.0, 2 / 3])
    assert not list(run_dir.glob(".*tmp*")), "temporary files left behind"


def _per_user_frame(n_users=5000, seed=0):
    import pandas as pd

    rng = np.random.default_rng(seed)
    return pd.DataFrame({"user": np.arange(n_users, dtype=np.int64),
                         "target": rng.integers(0, 12_000, n_users).astype(np.int64),
                         "rank": np.where(rng.random(n_users) < 0.06, rng.integers(1, 11, n_users), 0).astype(np.int8)})


def test_per_user_results_are_written_compactly_and_read_back_equal(tmp_path):
    import pandas as pd

    frame = _per_user_frame()
    compact = runs.write_per_user(frame, tmp_path / "compact.parquet")
    frame.to_parquet(tmp_path / "default.parquet", index=False)
    assert pd.read_parquet(compact).equals(frame)
    assert compact.stat().st_size < 0.5 * (tmp_path / "default.parquet").stat().st_size


def test_per_user_falls_back_to_the_default_writer(tmp_path, monkeypatch):
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    write_table = pq.write_table

    def without_column_encodings(*args, **kwargs):  # an older pyarrow; pandas' writer calls it too
        if "column_encoding" in kwargs:
            raise pa.ArrowNotImplementedError("no such encoding here")
        return write_table(*args, **kwargs)

    monkeypatch.setattr(pq, "write_table", without_column_encodings)
    frame = _per_user_frame(300)
    path = runs.write_per_user(frame, tmp_path / "per_user.parquet")
    monkeypatch.undo()
    assert pd.read_parquet(path).equals(frame)
    assert "DELTA_BINARY_PACKED" not in pq.ParquetFile(path).metadata.row_group(0).column(0).encodings


def test_compact_per_user_files_rewrites_only_the_parquet_files_with_equal_values(tmp_path):
    import pandas as pd

    frames = {}
    for i, (variant, seed) in enumerate([("sa", 0), ("sa", 1), ("hybrid", 0)]):
        run_dir = runs.run_dir_for(tmp_path, "toys", variant, seed)
        run_dir.mkdir(parents=True)
        frames[run_dir] = _per_user_frame(2000, seed=i)
        frames[run_dir].to_parquet(run_dir / runs.PER_USER_FILE, index=False)  # as older runs wrote it
        (run_dir / runs.METRICS_FILE).write_text('{"status": "ok"}')
    n, before, after = runs.compact_per_user_files(tmp_path)
    assert n == 3 and after < 0.5 * before
    for run_dir, frame in frames.items():
        assert runs.load_per_user(run_dir).equals(frame)
        assert (run_dir / runs.METRICS_FILE).read_text() == '{"status": "ok"}'
        assert sorted(p.name for p in run_dir.iterdir()) == [runs.METRICS_FILE, runs.PER_USER_FILE]
    assert runs.compact_per_user_files(tmp_path)[1:] == (after, after)  # compact already: the same bytes again


def test_save_rejects_bad_ranks_and_wrong_hash(tmp_path):
    with pytest.raises(ValueError, match="0..10"):
        runs.save_run_result(make_result(ranks=(1, 11)), tmp_path / "r", data_fingerprint="x", commit="y")
    result = make_result()
    result.config_hash = "ffffffffffff"
    with pytest.raises(ValueError, match="does not match"):
        runs.save_run_result(result, tmp_path / "r", data_fingerprint="x", commit="y")
    assert not (tmp_path / "r" / "metrics.json").exists()


def test_interrupted_save_never_looks_done_and_keeps_the_old_result(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    old = make_result(max_epochs=3)
    runs.save_run_result(old, run_dir, data_fingerprint="x", commit="y")
    new = make_result(max_epochs=5)  # a changed config is rerun into the same folder

    real_replace = os.replace

    def crash_on_metrics(src, dst):
        if str(dst).endswith("metrics.json"):
            raise KeyboardInterrupt  # interrupted between writing the temp file and renaming it
        real_replace(src, dst)

    monkeypatch.setattr(runs.os, "replace", crash_on_metrics)
    with pytest.raises(KeyboardInterrupt):
        runs.save_run_result(new, run_dir, data_fingerprint="x", commit="y")
    monkeypatch.undo()
    assert not runs.is_done(run_dir, new.config_hash)       # the new run is not done ...
    assert runs.load_run_metrics(run_dir)["config_hash"] == old.config_hash  # ... the old file is intact
    assert runs.run_status(run_dir, new.config_hash) == "stale"
    assert not list(run_dir.glob(".*tmp*"))


def test_a_run_folder_is_replaced_as_a_unit(tmp_path, monkeypatch):
    """A rerun into a folder leaves nothing of the old run beside the new one (never half old, half
    new), and a save interrupted after the new folder was filled leaves the old folder whole."""
    run_dir = tmp_path / "run"
    old = make_result(max_epochs=3)
    runs.save_run_result(old, run_dir, data_fingerprint="x", commit="y")
    (run_dir / "run.log").write_text("log of the old run")
    runs.record_failure(run_dir, "ffffffffffff", "an older failure")
    old_ranks = runs.load_per_user(run_dir)["rank"].tolist()

    new = make_result(max_epochs=5, ranks=(2, 2, 2, 2))
    real_replace = os.replace

    crashed = []

    def crash_on_swap(src, dst):
        if Path(dst) == run_dir and not crashed:
            crashed.append(src)
            raise KeyboardInterrupt  # interrupted with the new folder complete, before the swap
        real_replace(src, dst)

    monkeypatch.setattr(runs.os, "replace", crash_on_swap)
    with pytest.raises(KeyboardInterrupt):
        runs.save_run_result(new, run_dir, data_fingerprint="x", commit="y")
    monkeypatch.undo()
    assert runs.load_run_metrics(run_dir)["config_hash"] == old.config_hash
    assert runs.load_per_user(run_dir)["rank"].tolist() == old_ranks and (run_dir / "run.log").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]   # no leftovers

    runs.save_run_result(new, run_dir, data_fingerprint="x", commit="y")
    assert sorted(p.name for p in run_dir.iterdir()) == ["metrics.json", "per_user_test.parquet"]
    assert runs.load_per_user(run_dir)["rank"].tolist() == [2, 2, 2, 2] and runs.is_done(run_dir, new.config_hash)


def test_status_transitions(tmp_path):
    result = make_result()
    h = result.config_hash
    run_dir = tmp_path / "run"
    assert runs.run_status(run_dir, h) == "missing"
    runs.record_failure(run_dir, h, RuntimeError("boom"))
    failure = runs.load_failure(run_dir)
    assert failure["status"] == "failed" and failure["error"] == "RuntimeError: boom"
    assert failure["config_hash"] == h and "RuntimeError" in failure["traceback"]
    assert runs.run_status(run_dir, h) == "failed" and not runs.is_done(run_dir, h)
    assert runs.run_status(run_dir, "other") == "missing"  # a failure of another config says nothing
    runs.save_run_result(result, run_dir, data_fingerprint="x", commit="y")
    assert not (run_dir / "error.json").exists()  # a success clears the earlier failure
    assert runs.run_status(run_dir, h) == "ok"
    assert runs.run_status(run_dir, "other") == "stale"


def test_collect_runs_keeps_missing_failed_and_stale_rows(tmp_path):
    expected = [make_result(variant=v, seed=s).config for v in ("sa", "hybrid") for s in (0, 1)]
    runs.save_run_result(make_result("sa", 0), runs.run_dir_for(tmp_path, "synthetic", "sa", 0),
                         data_fingerprint="fp", commit="c")
    runs.record_failure(runs.run_dir_for(tmp_path, "synthetic", "sa", 1), expected[1].config_hash(), "boom")
    runs.save_run_result(make_result("hybrid", 0, max_epochs=9),  # an older config of hybrid/seed0
                         runs.run_dir_for(tmp_path, "synthetic", "hybrid", 0), data_fingerprint="fp", commit="c")

    frame = runs.collect_runs(tmp_path, expected)
    assert len(frame) == 4
    status = {(r.variant, r.seed): r.status for r in frame.itertuples()}
    assert status == {("sa", 0): "ok", ("sa", 1): "failed", ("hybrid", 0): "stale", ("hybrid", 1): "missing"}
    ok = frame[frame.status == "ok"].iloc[0]
    assert ok["test_recall@10"] == pytest.approx(0.1) and ok["data_fingerprint"] == "fp"
    assert frame[frame.status != "ok"]["test_recall@10"].isna().all()
    assert frame.set_index(["variant", "seed"]).loc[("sa", 1), "error"] == "boom"
    assert list(frame.columns[:5]) == ["dataset", "variant", "seed", "status", "config_hash"]

    found = runs.collect_runs(tmp_path)  # without the expected grid: what is on disk
    assert sorted(zip(found.variant, found.seed, found.status)) == [
        ("hybrid", 0, "ok"), ("sa", 0, "ok"), ("sa", 1, "failed")]
    histories = runs.load_histories(frame)
    assert set(histories.columns) >= {"dataset", "variant", "seed", "epoch", "train_loss"}
    assert len(histories) == 3
    assert runs.collect_runs(tmp_path / "nothing").empty


def test_a_run_on_other_data_is_stale_not_done(tmp_path):
    result = make_result()
    h = result.config_hash
    run_dir = runs.run_dir_for(tmp_path, "synthetic", "sa", 0)
    runs.save_run_result(result, run_dir, data_fingerprint="minilm-build", commit="c")
    # the old call signatures still ignore the data
    assert runs.is_done(run_dir, h) and runs.run_status(run_dir, h) == "ok"
    assert runs.is_done(run_dir, h, "minilm-build") and runs.run_status(run_dir, h, "minilm-build") == "ok"
    assert not runs.is_done(run_dir, h, "t5-build")
    assert runs.run_status(run_dir, h, "t5-build") == "stale"
    assert runs.run_status(run_dir, None, "t5-build") == "stale"

    frame = runs.collect_runs(tmp_path, [result.config], data_fingerprints={"synthetic": "t5-build"})
    row = frame.iloc[0]
    assert row["status"] == "stale" and row["stale_reason"] == "data"
    assert row["stale_data_fingerprint"] == "minilm-build" and math.isnan(row["test_recall@10"])
    assert row["stale_expected_data_fingerprint"] == "t5-build"   # the data there is now
    other = make_result(max_epochs=9).config   # another config on other data: both reasons named
    row = runs.collect_runs(tmp_path, [other], data_fingerprints={"synthetic": "t5-build"}).iloc[0]
    assert row["status"] == "stale" and row["stale_reason"] == "config+data"
    # stale for its config alone: no data fingerprint to name
    row = runs.collect_runs(tmp_path, [other], data_fingerprints={"synthetic": "minilm-build"}).iloc[0]
    assert row["stale_reason"] == "config" and "stale_expected_data_fingerprint" not in row.index
    # a dataset whose current data is unknown (not built here) is not checked
    assert runs.collect_runs(tmp_path, [result.config], data_fingerprints={}).iloc[0]["status"] == "ok"


def test_collect_runs_from_params_checks_the_current_data(tmp_path):
    from gbla.grid import load_grid

    params = runs.REPO_ROOT / "params" / "ablations.yaml"
    grid = load_grid(params, "smoke")
    cfg = grid.expand()[0]
    current = datasets.expected_data_fingerprint(cfg.dataset, synthetic=grid.synthetic)
    assert current == datasets.load_processed_dataset(cfg.dataset, synthetic=grid.synthetic).provenance["fingerprint"]
    result = make_result()
    result = dataclasses.replace(result, config=cfg, config_hash=cfg.config_hash())
    for fingerprint, status in ((current, "ok"), ("built-from-other-data", "stale")):
        runs.save_run_result(result, runs.run_dir_for(tmp_path, cfg.dataset, cfg.variant, cfg.seed),
                             data_fingerprint=fingerprint, commit="c")
        frame = runs.collect_runs(tmp_path, params_file=params, profile="smoke").set_index(
            ["dataset", "variant", "seed"])
        assert frame.loc[(cfg.dataset, cfg.variant, cfg.seed), "status"] == status


def test_expected_data_fingerprint_reads_meta_json(tmp_path):
    assert datasets.expected_data_fingerprint("beauty", tmp_path) is None   # not built: cannot be checked
    (tmp_path / "beauty").mkdir()
    (tmp_path / "beauty" / "meta.json").write_text(json.dumps({"provenance": {"fingerprint": "abc"}}))
    assert datasets.expected_data_fingerprint("beauty", tmp_path) == "abc"


def test_collect_runs_from_a_params_profile(tmp_path):
    frame = runs.collect_runs(tmp_path, params_file=runs.REPO_ROOT / "params" / "ablations.yaml", profile="full")
    assert len(frame) == 210 and set(frame.status) == {"missing"}
    assert math.isnan(frame["valid_ndcg@10"].iloc[0])


def test_load_processed_dataset(tmp_path):
    ds = datasets.load_processed_dataset("synthetic", synthetic={"num_users": 30, "num_items": 12, "seed": 1})
    assert ds.num_users == 30 and ds.num_items == 12
    again = datasets.load_processed_dataset("synthetic", synthetic={"num_users": 30, "num_items": 12, "seed": 1})
    assert again.provenance["fingerprint"] == ds.provenance["fingerprint"]
    with pytest.raises(FileNotFoundError, match=r"make data") as err:
        datasets.load_processed_dataset("beauty", tmp_path)
    assert str(tmp_path / "beauty") in str(err.value)
    assert datasets.dataset_available("synthetic", tmp_path) and not datasets.dataset_available("beauty", tmp_path)


def test_save_group_results_writes_tested_seeds_and_names_a_paused_checkpoint_by_the_rest(tmp_path):
    """A paused group: its tested seeds get their folders and its checkpoint (of the seeds still
    training) is renamed to their checkpoint_path, where the grid looks for the seeds not done; a
    finished group's checkpoint is removed."""
    from gbla.train import GroupResult

    results = [make_result(seed=s) for s in (0, 1, 2)]
    configs = [r.config for r in results]
    vdir = runs.variant_dir_for(tmp_path, "synthetic", "sa")
    vdir.mkdir(parents=True)
    checkpoint = runs.checkpoint_path(vdir, configs)
    checkpoint.write_bytes(b"seeds 1 and 2")
    paused = GroupResult([results[0]], False, 5, 10.0, remaining=configs[1:])
    written = runs.save_group_results(paused, tmp_path, checkpoint, data_fingerprint="abc", commit="c0ffee")
    assert written == [runs.run_dir_for(tmp_path, "synthetic", "sa", 0) / "metrics.json"]
    assert runs.is_done(written[0].parent, configs[0].config_hash(), "abc")
    assert not any(runs.is_done(runs.run_dir_for(tmp_path, "synthetic", "sa", s), configs[s].config_hash())
                   for s in (1, 2))
    rest = runs.checkpoint_path(vdir, configs[1:])
    assert not checkpoint.exists() and rest.read_bytes() == b"seeds 1 and 2"
    # a pause before any seed stopped keeps the name; the finished group removes its checkpoint
    assert runs.save_group_results(GroupResult([], False, 6, 1.0, remaining=configs[1:]), tmp_path, rest,
                                   data_fingerprint="abc", commit="c0ffee") == []
    assert rest.is_file()
    finished = GroupResult(results[1:], True, 9, 20.0)
    assert len(runs.save_group_results(finished, tmp_path, rest, data_fingerprint="abc", commit="c0ffee")) == 2
    assert not rest.exists() and list(vdir.glob("checkpoint-*")) == []
