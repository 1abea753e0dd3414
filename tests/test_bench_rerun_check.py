"""gbla.bench.rerun_check: two trainings of one run compared, from folders and from an archive."""
import copy
import json
import tarfile

import polars as pl
import pytest

from gbla.bench import rerun_check


def _run(root, run="sports/hybrid/seed0", history=None, ranks=(1, 0, 3, 10), test_r10=0.05, **extra):
    run_dir = root / run
    run_dir.mkdir(parents=True)
    dataset, variant, seed = run.split("/")
    history = history if history is not None else [
        {"epoch": e, "train_loss": 3.0 - 0.1 * e, "epoch_time_s": 7.0 + 0.01 * e, "valid_recall@10": 0.01 * e}
        for e in range(1, 6)]
    metrics = {"status": "ok", "dataset": dataset, "variant": variant, "seed": int(seed[4:]),
               "config_hash": "cfg", "data_fingerprint": "fp", "commit": "c" * 40, "device": "cuda:GPU",
               "created_at": "2026-01-01T00:00:00+00:00", "group_seeds": [0, 1], "best_epoch": 4,
               "epochs_trained": len(history), "history": history,
               "valid": {"recall@10": 0.04}, "test": {"recall@10": test_r10}, **extra}
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    pl.DataFrame({"user": [4, 1, 2, 3], "target": [9, 8, 7, 6], "rank": list(ranks)}).write_parquet(
        run_dir / "per_user_test.parquet")
    return run_dir


def test_identical_trainings_and_the_first_difference_each_part_finds(tmp_path):
    left, right = _run(tmp_path / "a"), _run(tmp_path / "b")
    result = rerun_check.compare_run(left, right)
    assert result["identical"] and result["per_user_rank_equal_fraction"] == 1.0
    assert result["epochs_compared"] == 5 and result["history_max_abs_diff"]["train_loss"] == 0.0
    # epoch seconds differ between any two executions: not part of the check
    history = json.loads((left / "metrics.json").read_text())["history"]
    slower = [{**h, "epoch_time_s": h["epoch_time_s"] * 2} for h in history]
    assert rerun_check.compare_run(left, _run(tmp_path / "c", history=slower))["identical"]

    drift = copy.deepcopy(history)
    drift[3]["train_loss"] += 1e-6
    r = rerun_check.compare_run(left, _run(tmp_path / "d", history=drift))
    assert not r["identical"] and r["history_max_abs_diff"]["train_loss"] == pytest.approx(1e-6)
    r = rerun_check.compare_run(left, _run(tmp_path / "e", ranks=(1, 0, 3, 9)))
    assert not r["identical"] and r["per_user_rank_equal_fraction"] == 0.75
    r = rerun_check.compare_run(left, _run(tmp_path / "f", test_r10=0.051))
    assert not r["identical"] and r["metrics_abs_diff"]["test_recall@10"] == pytest.approx(0.001)


def test_main_reads_an_archive_and_refuses_different_runs(tmp_path, capsys):
    _run(tmp_path / "a")
    _run(tmp_path / "b")
    archive = tmp_path / "b.tgz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "b" / "sports", arcname="sports")
    out = tmp_path / "check.json"
    assert rerun_check.main([str(tmp_path / "a"), str(archive), "sports/hybrid/seed0", "--out", str(out)]) == 0
    saved = json.loads(out.read_text())
    assert saved["runs"][0]["identical"] and saved["runs"][0]["right"]["commit"] == "c" * 40
    assert "| sports/hybrid/seed0 | yes | 5 | 4 / 4 |" in out.with_suffix(".md").read_text()

    _run(tmp_path / "other", config_hash="another")
    assert rerun_check.main([str(tmp_path / "a"), str(tmp_path / "other"), "sports/hybrid/seed0"]) == 2
    assert "different config_hash" in capsys.readouterr().err
    assert rerun_check.main([str(tmp_path / "a"), str(tmp_path / "b"), "sports/hybrid/seed1"]) == 2
    assert "no finished run" in capsys.readouterr().err
    (tmp_path / "broken.tgz").write_bytes(b"not gzip")
    assert rerun_check.main([str(tmp_path / "a"), str(tmp_path / "broken.tgz"), "sports/hybrid/seed0"]) == 2
    assert "broken.tgz: not a readable run archive" in capsys.readouterr().err
    _run(tmp_path / "g", ranks=(2, 0, 3, 10))
    assert rerun_check.main([str(tmp_path / "a"), str(tmp_path / "g"), "sports/hybrid/seed0"]) == 1
