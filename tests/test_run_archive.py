"""Runs packed on one machine and merged into another's runs folder (gbla.run_archive): checkpoints stay
behind, every run is checked against the params profile before anything is written, and a finished
run is never replaced by another."""
import io
import json
import tarfile

import pytest

from gbla import grid as grid_cli
from gbla.params import load_grid
from gbla.run_archive import MANIFEST, ArchiveError, merge_runs, pack_runs
from gbla.runs import run_dir_for, run_status, variant_dir_for


METRICS = {"recall@5": 0.3, "recall@10": 0.5, "ndcg@5": 0.2, "ndcg@10": 0.25}


@pytest.fixture()
def configs():
    return load_grid("params/ablations.yaml", "smoke").expand(variants=["sa", "hybrid"])


def fake_run(root, c, *, recall=0.5, status="ok", config_hash=None):
    run_dir = run_dir_for(root, c.dataset, c.variant, c.seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    if status == "ok":
        (run_dir / "metrics.json").write_text(json.dumps({
            "status": "ok", "config_hash": config_hash or c.config_hash(), "data_fingerprint": "d1",
            "commit": "abc", "valid": METRICS, "test": {**METRICS, "recall@10": recall}}))
        (run_dir / "per_user_test.parquet").write_bytes(b"parquet " + str(recall).encode())
    else:
        (run_dir / "error.json").write_text(json.dumps({"status": "failed", "config_hash": c.config_hash(),
                                                        "error": "boom"}))
    (run_dir / "run.log").write_text(f"log of {c.variant} {c.seed}\n")
    return run_dir


def fake_group_files(root, c, dispatch_lines):
    vdir = variant_dir_for(root, c.dataset, c.variant)
    (vdir / "train.ipynb").write_text("{}")
    (vdir / "run.log").write_text("group log\n")
    (vdir / "dispatch.jsonl").write_text("".join(line + "\n" for line in dispatch_lines))
    (vdir / "checkpoint-0123456789ab.pt").write_bytes(b"x" * 1000)


def test_pack_leaves_checkpoints_and_unfinished_runs_out(tmp_path, configs):
    src = tmp_path / "src"
    sa0, sa1, hybrid0 = configs[0], configs[1], configs[2]
    fake_run(src, sa0)
    fake_run(src, sa1, status="failed")
    fake_group_files(src, sa0, ['{"event": "start"}'])
    run_dir_for(src, hybrid0.dataset, hybrid0.variant, hybrid0.seed).mkdir(parents=True)  # unfinished: empty
    manifest = pack_runs(src, configs, tmp_path / "runs.tgz")
    assert [(r["variant"], r["seed"], r["status"]) for r in manifest["runs"]] == [("sa", 0, "ok"), ("sa", 1, "failed")]
    with tarfile.open(tmp_path / "runs.tgz") as tar:
        names = set(tar.getnames())
    assert MANIFEST in names and "synthetic/sa/seed0/metrics.json" in names and "synthetic/sa/seed1/error.json" in names
    assert "synthetic/sa/dispatch.jsonl" in names and "synthetic/sa/train.ipynb" in names
    assert not any("checkpoint" in n for n in names) and not any("hybrid" in n for n in names)


def test_merge_installs_then_keeps_finished_runs(tmp_path, configs):
    src, dest = tmp_path / "src", tmp_path / "dest"
    sa0, sa1 = configs[0], configs[1]
    fake_run(src, sa0, recall=0.61)
    fake_run(src, sa1, recall=0.62)
    fake_group_files(src, sa0, ['{"event": "start", "n": 2}', '{"event": "end", "n": 2}'])
    pack_runs(src, configs, tmp_path / "runs.tgz")
    # here: seed 1 finished already (another result), and one dispatch line is known
    fake_run(dest, sa1, recall=0.99)
    (variant_dir_for(dest, "synthetic", "sa") / "dispatch.jsonl").write_text('{"event": "start", "n": 2}\n')
    report = merge_runs(tmp_path / "runs.tgz", dest, configs)
    assert report.installed == ["synthetic/sa/seed0"] and report.kept == ["synthetic/sa/seed1"]
    assert run_status(run_dir_for(dest, "synthetic", "sa", 0), sa0.config_hash()) == "ok"
    assert json.loads((run_dir_for(dest, "synthetic", "sa", 0) / "metrics.json").read_text())["test"]["recall@10"] == 0.61
    assert json.loads((run_dir_for(dest, "synthetic", "sa", 1) / "metrics.json").read_text())["test"]["recall@10"] == 0.99
    lines = (variant_dir_for(dest, "synthetic", "sa") / "dispatch.jsonl").read_text().splitlines()
    assert lines == ['{"event": "start", "n": 2}', '{"event": "end", "n": 2}']
    assert not list(variant_dir_for(dest, "synthetic", "sa").glob("checkpoint*"))
    again = merge_runs(tmp_path / "runs.tgz", dest, configs)
    assert again.installed == [] and again.kept == ["synthetic/sa/seed0", "synthetic/sa/seed1"]
    forced = merge_runs(tmp_path / "runs.tgz", dest, configs, replace_finished=True)
    assert forced.installed == ["synthetic/sa/seed0", "synthetic/sa/seed1"]
    assert json.loads((run_dir_for(dest, "synthetic", "sa", 1) / "metrics.json").read_text())["test"]["recall@10"] == 0.62


def test_an_archived_failure_never_replaces_a_finished_run(tmp_path, configs):
    src, dest = tmp_path / "src", tmp_path / "dest"
    fake_run(src, configs[0], status="failed")
    pack_runs(src, configs, tmp_path / "runs.tgz")
    fake_run(dest, configs[0], recall=0.7)
    report = merge_runs(tmp_path / "runs.tgz", dest, configs, replace_finished=True)
    assert report.kept == ["synthetic/sa/seed0"]
    assert run_status(run_dir_for(dest, "synthetic", "sa", 0), configs[0].config_hash()) == "ok"


def test_a_bad_archive_is_refused_whole(tmp_path, configs):
    src, dest = tmp_path / "src", tmp_path / "dest"
    fake_run(src, configs[0])
    fake_run(src, configs[1], config_hash="0" * 12)   # trained with other params
    pack_runs(src, configs[:1], tmp_path / "runs.tgz")  # pack sees only seed 0 as expected ...
    with tarfile.open(tmp_path / "runs.tgz", "r:gz") as tar:  # ... add seed 1 by hand
        members = [(m, tar.extractfile(m).read() if m.isfile() else None) for m in tar.getmembers()]
    with tarfile.open(tmp_path / "bad.tgz", "w:gz") as tar:
        for m, data in members:
            tar.addfile(m, io.BytesIO(data) if data is not None else None)
        tar.add(run_dir_for(src, "synthetic", "sa", 1) / "metrics.json", arcname="synthetic/sa/seed1/metrics.json")
    with pytest.raises(ArchiveError, match=r"bad.tgz: synthetic/sa/seed1/metrics.json: config_hash '000000000000'"):
        merge_runs(tmp_path / "bad.tgz", dest, configs)
    assert not dest.exists()  # nothing written, not even seed 0
    with tarfile.open(tmp_path / "evil.tgz", "w:gz") as tar:
        tar.add(run_dir_for(src, "synthetic", "sa", 0) / "run.log", arcname="../escaped.log")
    with pytest.raises(ArchiveError, match="not a readable run archive"):
        merge_runs(tmp_path / "evil.tgz", dest, configs)
    assert not (tmp_path / "escaped.log").exists()
    (tmp_path / "plain.tgz").write_bytes(b"not a tar")
    with pytest.raises(ArchiveError, match="plain.tgz"):
        merge_runs(tmp_path / "plain.tgz", dest, configs)


def test_grid_cli_merge(tmp_path, configs, capsys):
    src, dest = tmp_path / "src", tmp_path / "dest"
    fake_run(src, configs[0])
    pack_runs(src, configs, tmp_path / "runs.tgz")
    argv = ["--profile", "smoke", "--merge", str(tmp_path / "runs.tgz"), "--runs-root", str(dest)]
    assert grid_cli.main(argv) == 0
    assert "installed synthetic/sa/seed0" in capsys.readouterr().out
    assert grid_cli.main(argv + ["--variants", "hybrid"]) == 2   # seed folders of a variant not selected
    assert "the params profile has no such run" in capsys.readouterr().err


def test_grid_cli_archive_after_a_grid_with_nothing_left_to_do(tmp_path, configs, capsys):
    from gbla.runs import expected_data_fingerprint

    grid = load_grid("params/ablations.yaml", "smoke")
    fingerprint = expected_data_fingerprint("synthetic", synthetic=grid.synthetic)
    runs = tmp_path / "runs"
    for c in configs[:2]:  # sa seeds 0, 1: finished on this data
        run_dir = fake_run(runs, c)
        metrics = json.loads((run_dir / "metrics.json").read_text())
        (run_dir / "metrics.json").write_text(json.dumps({**metrics, "data_fingerprint": fingerprint}))
    fake_group_files(runs, configs[0], ['{"event": "end"}'])
    argv = ["--profile", "smoke", "--variants", "sa", "--runs-root", str(runs), "--no-aggregate",
            "--archive", str(tmp_path / "out" / "runs.tgz")]
    assert grid_cli.main(argv) == 0
    assert "archive: " in capsys.readouterr().out
    with tarfile.open(tmp_path / "out" / "runs.tgz") as tar:
        manifest = json.load(tar.extractfile(MANIFEST))
        assert not any("checkpoint" in n for n in tar.getnames())
    assert [(r["seed"], r["status"], r["data_fingerprint"]) for r in manifest["runs"]] == [
        (0, "ok", fingerprint), (1, "ok", fingerprint)]
