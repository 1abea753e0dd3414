"""Runs packed on one machine and merged into another's runs folder (gbla.run_archive): checkpoints stay
behind, every run is checked against the params profile before anything is written, and a finished
run is never replaced by another."""
import io
import json
import shutil
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
    from gbla.datasets import expected_data_fingerprint

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
    assert "(2 runs, group files of 1 variants)" in capsys.readouterr().out
    with tarfile.open(tmp_path / "out" / "runs.tgz") as tar:
        manifest = json.load(tar.extractfile(MANIFEST))
        assert not any("checkpoint" in n for n in tar.getnames())
    assert [(r["seed"], r["status"], r["data_fingerprint"]) for r in manifest["runs"]] == [
        (0, "ok", fingerprint), (1, "ok", fingerprint)]
    assert manifest["groups"] == [{"dataset": "synthetic", "variant": "sa", "runs": True,
                                   "files": ["train.ipynb", "run.log", "dispatch.jsonl"]}]


# ------------------------------------------------------------------------------ a group paused on the remote

def fake_execution(root, c, n, *, outcome, log_lines, notebook=None):
    """Execution `n` of the group of `c`'s variant in a remote folder: its dispatch records appended and
    its log (run.log as the grid leaves it: a '# ...' header, then the notebook's output)."""
    vdir = variant_dir_for(root, c.dataset, c.variant)
    vdir.mkdir(parents=True, exist_ok=True)
    records = [{"event": "start", "execution": f"e{n}"}, {"event": "end", "execution": f"e{n}", "outcome": outcome}]
    with open(vdir / "dispatch.jsonl", "a") as f:
        f.write("".join(json.dumps(r) + "\n" for r in records))
    log = f"# 2025-01-0{n} {c.dataset}/{c.variant}/seeds 0,1 execution {n}\n" + "".join(f"{x}\n" for x in log_lines)
    with open(vdir / "run.log", "a") as f:
        f.write(log)
    (vdir / "train.ipynb").write_text(notebook or f'{{"execution": {n}}}')
    return [json.dumps(r) for r in records], log


def snapshot(root):
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))
            if p.is_file()}


def test_a_paused_group_hands_over_its_dispatch_records_and_log(tmp_path, configs):
    """The remote folder is wiped between the pause and the resume: both archives together still give
    every execution's dispatch records and both logs, in order."""
    paused, final, dest = tmp_path / "paused", tmp_path / "final", tmp_path / "dest"
    sa0, sa1 = configs[0], configs[1]
    records1, log1 = fake_execution(paused, sa0, 1, outcome="paused", log_lines=["epoch 1", "epoch 2", "paused"])
    (variant_dir_for(paused, "synthetic", "sa") / "checkpoint-0123456789ab.pt").write_bytes(b"x" * 1000)
    run_dir_for(paused, "synthetic", "sa", 0).mkdir()   # a seed folder with nothing finished in it
    manifest = pack_runs(paused, configs, tmp_path / "paused.tgz")
    assert manifest["runs"] == []
    assert manifest["groups"] == [{"dataset": "synthetic", "variant": "sa", "runs": False,
                                   "files": ["train.ipynb", "run.log", "dispatch.jsonl"]}]
    with tarfile.open(tmp_path / "paused.tgz") as tar:
        assert sorted(tar.getnames()) == sorted([MANIFEST, "synthetic/sa/train.ipynb", "synthetic/sa/run.log",
                                                 "synthetic/sa/dispatch.jsonl"])

    report = merge_runs(tmp_path / "paused.tgz", dest, configs)
    assert report.installed == [] and report.kept == [] and report.group_files == ["synthetic/sa"]
    assert "group files of 1 variants" in report.summary()
    vdir = variant_dir_for(dest, "synthetic", "sa")
    assert (vdir / "dispatch.jsonl").read_text().splitlines() == records1
    assert (vdir / "run.log").read_text() == log1
    assert (vdir / "train.ipynb").read_text() == '{"execution": 1}'   # none here: installed
    assert not list(vdir.glob("checkpoint*")) and not list(vdir.glob("seed*"))
    before = snapshot(dest)
    again = merge_runs(tmp_path / "paused.tgz", dest, configs)
    assert again.group_files == [] and snapshot(dest) == before   # nothing written the second time

    records2, log2 = fake_execution(final, sa0, 2, outcome="ran", log_lines=["resumed after epoch 2", "epoch 3"])
    fake_run(final, sa0)
    fake_run(final, sa1)
    assert pack_runs(final, configs, tmp_path / "final.tgz")["groups"] == [
        {"dataset": "synthetic", "variant": "sa", "runs": True, "files": ["train.ipynb", "run.log", "dispatch.jsonl"]}]
    report = merge_runs(tmp_path / "final.tgz", dest, configs)
    assert report.installed == ["synthetic/sa/seed0", "synthetic/sa/seed1"] and report.group_files == ["synthetic/sa"]
    assert (vdir / "dispatch.jsonl").read_text().splitlines() == records1 + records2
    assert (vdir / "run.log").read_text() == log1 + log2
    assert (vdir / "train.ipynb").read_text() == '{"execution": 2}'   # runs installed: their notebook
    before = snapshot(dest)
    again = merge_runs(tmp_path / "final.tgz", dest, configs)
    assert again.installed == [] and again.group_files == [] and snapshot(dest) == before
    assert merge_runs(tmp_path / "paused.tgz", dest, configs).group_files == []   # an older archive: nothing
    assert snapshot(dest) == before


def test_a_continuation_log_replaces_the_local_one(tmp_path, configs):
    """The remote kept its folder: the resumed execution's log continues the paused one's."""
    remote, dest = tmp_path / "remote", tmp_path / "dest"
    sa0 = configs[0]
    records1, log1 = fake_execution(remote, sa0, 1, outcome="paused", log_lines=["epoch 1"])
    pack_runs(remote, configs, tmp_path / "paused.tgz")
    merge_runs(tmp_path / "paused.tgz", dest, configs)
    vdir = variant_dir_for(dest, "synthetic", "sa")
    (vdir / "train.ipynb").write_text("local notebook")
    records2, log2 = fake_execution(remote, sa0, 2, outcome="paused", log_lines=["epoch 2"])
    pack_runs(remote, configs, tmp_path / "later.tgz")
    assert merge_runs(tmp_path / "later.tgz", dest, configs).group_files == ["synthetic/sa"]
    assert (vdir / "run.log").read_text() == log1 + log2      # replaced, not appended: no execution twice
    assert (vdir / "dispatch.jsonl").read_text().splitlines() == records1 + records2
    assert (vdir / "train.ipynb").read_text() == "local notebook"   # no run installed: the local one stays
    assert merge_runs(tmp_path / "paused.tgz", dest, configs).group_files == []   # a log held already
    assert (vdir / "run.log").read_text() == log1 + log2


def test_a_remote_copy_taken_before_the_last_merge_repeats_no_execution(tmp_path, configs):
    """The remote folder is a fresh copy of the local tree before each command. Command 1 starts a new
    group of a variant whose earlier group's log is here (the group writes a log of its own) and pauses;
    command 2 is copied from the local tree before command 1's archive was merged, so its resumed
    execution appends to the earlier group's log. Merged in order, each execution's section is there once."""
    dest, first, second = tmp_path / "dest", tmp_path / "first", tmp_path / "second"
    sa0 = configs[0]
    records0, log0 = fake_execution(dest, sa0, 1, outcome="ran", log_lines=["seeds 0,1 trained"])
    records1, log1 = fake_execution(first, sa0, 2, outcome="paused", log_lines=["epoch 1", "paused"])
    shutil.copytree(variant_dir_for(dest, "synthetic", "sa"), variant_dir_for(second, "synthetic", "sa"))
    records2, log2 = fake_execution(second, sa0, 3, outcome="ran", log_lines=["resumed", "epoch 2"])
    fake_run(second, sa0)
    pack_runs(first, configs, tmp_path / "first.tgz")
    pack_runs(second, configs, tmp_path / "second.tgz")
    assert (variant_dir_for(second, "synthetic", "sa") / "run.log").read_text() == log0 + log2

    merge_runs(tmp_path / "first.tgz", dest, configs)
    report = merge_runs(tmp_path / "second.tgz", dest, configs)
    assert report.installed == ["synthetic/sa/seed0"] and report.group_files == ["synthetic/sa"]
    vdir = variant_dir_for(dest, "synthetic", "sa")
    assert (vdir / "run.log").read_text() == log0 + log1 + log2
    assert (vdir / "dispatch.jsonl").read_text().splitlines() == records0 + records1 + records2
    before = snapshot(dest)
    for archive in ("first.tgz", "second.tgz"):
        assert merge_runs(tmp_path / archive, dest, configs).group_files == []
    assert snapshot(dest) == before


def test_an_execution_merged_late_reads_before_the_ones_after_it(tmp_path, configs):
    """Execution 1's archive is merged only after executions 2 and 3 (its command was lost and a later
    command started the group again): its log section goes before theirs, by the headers' dates, and
    merging any archive again changes nothing. Real headers carry a time and a UTC offset."""
    dest, lost, later = tmp_path / "dest", tmp_path / "lost", tmp_path / "later"
    sa0 = configs[0]
    _, log1 = fake_execution(lost, sa0, 1, outcome="paused", log_lines=["epoch 1", "paused"])
    _, log2 = fake_execution(later, sa0, 2, outcome="paused", log_lines=["epoch 1 again"])
    _, log3 = fake_execution(later, sa0, 3, outcome="ran", log_lines=["resumed", "done"])
    pack_runs(lost, configs, tmp_path / "lost.tgz")
    pack_runs(later, configs, tmp_path / "later.tgz")
    merge_runs(tmp_path / "later.tgz", dest, configs)
    vdir = variant_dir_for(dest, "synthetic", "sa")
    assert (vdir / "run.log").read_text() == log2 + log3
    assert merge_runs(tmp_path / "lost.tgz", dest, configs).group_files == ["synthetic/sa"]
    assert (vdir / "run.log").read_text() == log1 + log2 + log3
    before = snapshot(dest)
    for archive in ("lost.tgz", "later.tgz"):
        assert merge_runs(tmp_path / archive, dest, configs).group_files == []
    assert snapshot(dest) == before
    # full timestamps with offsets compare as instants; a header without a date keeps the order as it is
    from gbla.run_archive import _in_date_order
    a = b"# 2026-12-02T02:29:51+00:00 x\nline\n"
    b = b"# 2026-12-02T03:20:16+01:00 y\n"      # 02:20:16 UTC: before a
    assert _in_date_order([b"preamble\n", a, b]) == [b"preamble\n", b, a]
    assert _in_date_order([a, b"# not-a-date z\n", b]) == [a, b"# not-a-date z\n", b]


def test_group_files_outside_the_profile_are_refused(tmp_path, configs):
    src, dest = tmp_path / "src", tmp_path / "dest"
    fake_run(src, configs[0])
    fake_execution(src, configs[2], 1, outcome="paused", log_lines=["epoch 1"])   # hybrid, paused
    manifest = pack_runs(src, configs, tmp_path / "runs.tgz")
    assert [(g["variant"], g["runs"]) for g in manifest["groups"]] == [("hybrid", False)]  # sa has no group files
    sa_only = [c for c in configs if c.variant == "sa"]
    with pytest.raises(ArchiveError, match=r"runs.tgz: synthetic/hybrid/\S+: the params profile has no such variant"):
        merge_runs(tmp_path / "runs.tgz", dest, sa_only)
    assert not dest.exists()   # nothing written, not even sa/seed0
    # a dispatch log that is not JSON lines is refused too
    with tarfile.open(tmp_path / "runs.tgz", "r:gz") as tar:
        members = [(m, tar.extractfile(m).read() if m.isfile() else None) for m in tar.getmembers()]
    with tarfile.open(tmp_path / "bad.tgz", "w:gz") as tar:
        for m, data in members:
            if m.name == "synthetic/hybrid/dispatch.jsonl":
                data = data + b"{half a rec\n"
                m.size = len(data)
            tar.addfile(m, io.BytesIO(data) if data is not None else None)
    with pytest.raises(ArchiveError, match=r"bad.tgz: synthetic/hybrid/dispatch.jsonl:3: not a JSON line"):
        merge_runs(tmp_path / "bad.tgz", dest, configs)
    assert not dest.exists()
    report = merge_runs(tmp_path / "runs.tgz", dest, configs)
    assert report.installed == ["synthetic/sa/seed0"] and report.group_files == ["synthetic/hybrid"]


def _papermill_notebook(seeds, tag):
    return json.dumps({"cells": [], "metadata": {"papermill": {"parameters": {"seeds": seeds}}, "tag": tag}})


def test_merging_a_later_group_keeps_the_earlier_groups_notebook(tmp_path, configs):
    """Seeds 0-1 of a variant merged first, then a group of other seeds: the variant's train.ipynb is
    the later group's, the earlier one stays as train-seeds0-1.ipynb; the same group merged again
    (or resumed) replaces its own notebook and keeps no copy."""
    src1, src2, dest = tmp_path / "src1", tmp_path / "src2", tmp_path / "dest"
    sa0, sa1 = configs[0], configs[1]
    fake_run(src1, sa0)
    fake_group_files(src1, sa0, ['{"event": "end", "n": 1}'])
    (variant_dir_for(src1, "synthetic", "sa") / "train.ipynb").write_text(_papermill_notebook([0], "first"))
    pack_runs(src1, configs, tmp_path / "first.tgz")
    merge_runs(tmp_path / "first.tgz", dest, configs)
    fake_run(src2, sa1)
    fake_group_files(src2, sa1, ['{"event": "end", "n": 2}'])
    (variant_dir_for(src2, "synthetic", "sa") / "train.ipynb").write_text(_papermill_notebook([1], "second"))
    pack_runs(src2, [sa1], tmp_path / "second.tgz")
    merge_runs(tmp_path / "second.tgz", dest, configs)
    vdir = variant_dir_for(dest, "synthetic", "sa")
    assert json.loads((vdir / "train.ipynb").read_text())["metadata"]["tag"] == "second"
    assert json.loads((vdir / "train-seeds0.ipynb").read_text())["metadata"]["tag"] == "first"
    # the second group again, with a newer notebook of the same seeds: replaced, nothing else kept
    (variant_dir_for(src2, "synthetic", "sa") / "train.ipynb").write_text(_papermill_notebook([1], "second again"))
    pack_runs(src2, [sa1], tmp_path / "again.tgz")
    merge_runs(tmp_path / "again.tgz", dest, configs, replace_finished=True)
    assert json.loads((vdir / "train.ipynb").read_text())["metadata"]["tag"] == "second again"
    assert sorted(p.name for p in vdir.glob("train*.ipynb")) == ["train-seeds0.ipynb", "train.ipynb"]


def test_keep_earlier_group_notebook_names_and_edge_cases(tmp_path):
    from gbla.runs import keep_earlier_group_notebook, notebook_seeds, seeds_label

    assert seeds_label([4, 2, 3]) == "2-4" and seeds_label([0, 2, 4]) == "0_2_4" and seeds_label([3]) == "3"
    vdir = tmp_path / "v"
    vdir.mkdir()
    assert keep_earlier_group_notebook(vdir, [0, 1]) is None            # no notebook yet
    (vdir / "train.ipynb").write_text("not json")
    assert notebook_seeds(vdir / "train.ipynb") is None
    assert keep_earlier_group_notebook(vdir, [0, 1]) is None            # does not say its seeds: left alone
    (vdir / "train.ipynb").write_text(_papermill_notebook([1, 0], "x"))
    assert keep_earlier_group_notebook(vdir, [0, 1]) is None            # the same group
    assert (vdir / "train.ipynb").is_file()
    kept = keep_earlier_group_notebook(vdir, [2, 3, 4])
    assert kept == vdir / "train-seeds0-1.ipynb" and kept.is_file() and not (vdir / "train.ipynb").exists()
