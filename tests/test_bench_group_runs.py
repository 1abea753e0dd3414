"""gbla.bench.group_runs: the groups table rebuilt from run folders and dispatch records."""
import json

import pytest

from gbla.bench import group_runs


def _write_run(root, dataset, variant, seed, group_seeds, commit, created_at, recall10, resumed_from=0):
    run_dir = root / dataset / variant / f"seed{seed}"
    run_dir.mkdir(parents=True)
    test = {"recall@5": recall10 / 2, "recall@10": recall10, "ndcg@5": recall10 / 4, "ndcg@10": recall10 / 3}
    (run_dir / "metrics.json").write_text(json.dumps({
        "status": "ok", "dataset": dataset, "variant": variant, "seed": seed, "config_hash": f"h{seed}",
        "commit": commit, "device": "cuda:GPU", "data_fingerprint": "fp", "created_at": created_at,
        "best_epoch": 5, "epochs_trained": 15, "test": test, "valid": test, "group_seeds": group_seeds,
        "timings": {"group_epochs": 15, "setup_s": 1.0, "train_s": 100.0, "eval_s": 10.0, "test_eval_s": 1.0,
                    "epoch_time_s": 7.0, "examples_per_s": 1000.0, "resumed_from_epoch": resumed_from}}))


def _end(root, dataset, variant, seeds, at, t, wall_s, outcome, host="h", gpus="0"):
    """A start and end event of one execution; `outcome`: every seed's, or a dict seed -> outcome."""
    path = root / dataset / variant / "dispatch.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    outcomes = {str(s): outcome[s] if isinstance(outcome, dict) else outcome for s in seeds}
    with open(path, "a") as f:
        f.write(json.dumps({"event": "start", "at": at, "time": t - wall_s, "group_seeds": seeds}) + "\n")
        f.write(json.dumps({"event": "end", "at": at, "time": t, "wall_s": wall_s, "group_seeds": seeds,
                            "outcomes": outcomes, "host": host, "worker": "0",
                            "cuda_visible_devices": gpus}) + "\n")


def _ts(iso):
    import datetime as dt
    return dt.datetime.fromisoformat(iso).timestamp()


def test_groups_executions_and_summaries(tmp_path):
    root = tmp_path / "runs"
    # group 1: seeds 0-1 at commit aaa, paused once then resumed; an older failed execution before it
    _end(root, "beauty", "hybrid", [0, 1], "2026-01-01T09:00:00+00:00", _ts("2026-01-01T09:00:00+00:00"), 50.0, "failed")
    _end(root, "beauty", "hybrid", [0, 1], "2026-01-01T10:00:00+00:00", _ts("2026-01-01T10:00:00+00:00"), 300.0, "paused")
    for s, r in ((0, 0.06), (1, 0.08)):
        _write_run(root, "beauty", "hybrid", s, [0, 1], "aaa" * 13 + "a", "2026-01-01T10:04:59+00:00", r, resumed_from=30)
    _end(root, "beauty", "hybrid", [0, 1], "2026-01-01T10:05:00+00:00", _ts("2026-01-01T10:05:00+00:00"), 200.0, "ran")
    # group 2: seed 2 at another commit, resumed but its paused execution left no record
    _write_run(root, "beauty", "hybrid", 2, [2], "b" * 40, "2026-01-02T10:00:00+00:00", 0.07, resumed_from=10)
    _end(root, "beauty", "hybrid", [2], "2026-01-02T10:00:01+00:00", _ts("2026-01-02T10:00:01+00:00"), 80.0, "ran")

    groups, summaries = group_runs.collect_groups(root)
    assert [(g["variant"], g["seeds"], g["commit"][:1]) for g in groups] == [("hybrid", [0, 1], "a"), ("hybrid", [2], "b")]
    first, second = groups
    assert [e["outcome"] for e in first["executions"]] == ["paused", "ran"]  # the failed one before is not this group's
    assert first["gpu_wall_s"] == 500.0
    assert first["train_eval_s"] == 112.0
    assert [r["seed"] for r in first["runs"]] == [0, 1]
    assert second["executions"] and second["gpu_wall_s"] is None  # resumed, paused part unknown: no undercount
    (summary,) = summaries
    assert summary["seeds"] == [0, 1, 2]
    mean, half = summary["test_mean_and_ci95_half_width"]["recall@10"]
    assert mean == pytest.approx(0.07)
    assert half == pytest.approx(4.302652729911275 * 0.01 / 3 ** 0.5)  # t(0.975, 2) * sd / sqrt(n)


def test_hand_written_keys_are_kept_and_outputs_written(tmp_path):
    root = tmp_path / "runs"
    _write_run(root, "beauty", "sa", 0, [0], "c" * 40, "2026-01-03T10:00:00+00:00", 0.06)
    out = tmp_path / "bench" / "group_runs.json"
    out.parent.mkdir()
    out.write_text(json.dumps({
        "meta": {"note": "by hand"},
        "groups": [{"variant": "sa", "seeds": [0], "commit": "ccccccc", "note": "kept", "runs": []},
                   {"variant": "sa", "seeds": [0], "commit": "ddddddd", "note": "other commit: dropped"}],
        "variant_summaries": {"sa": {"note": "variant note"}}}))
    assert group_runs.main(["--runs-root", str(root), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    (g,) = result["groups"]
    assert g["note"] == "kept" and len(g["runs"]) == 1  # generated keys win over old ones
    assert result["variant_summaries"][0]["note"] == "variant note"
    assert result["meta"]["note"] == "by hand"
    table = [line for line in out.with_suffix(".md").read_text().splitlines() if line.startswith("|")]
    assert len({line.count("|") for line in table[:3]}) == 1, table
    assert "| beauty | sa | 0 | ccccccc |" in table[2]


def test_bad_dispatch_line_names_the_file_and_line(tmp_path):
    root = tmp_path / "runs"
    _write_run(root, "beauty", "sa", 0, [0], "c" * 40, "2026-01-03T10:00:00+00:00", 0.06)
    (root / "beauty" / "sa" / "dispatch.jsonl").write_text('{"event": "end"}\nnot json\n')
    with pytest.raises(ValueError, match=r"dispatch.jsonl:2"):
        group_runs.collect_groups(root)


def test_groups_that_shared_a_gpu_name_each_other(tmp_path):
    """Two groups at once on GPU 0 (runs-per-gpu 2), one of them paused and resumed; a group on another
    GPU and one on another host at the same time, and one that starts as the first ends, share nothing.
    A group that never finished a run (paused only) still counts as sharing."""
    root = tmp_path / "runs"
    t0 = _ts("2026-01-01T10:00:00+00:00")
    at = "2026-01-01T10:00:00+00:00"
    _end(root, "beauty", "a", [0], at, t0 + 300, 300.0, "paused")           # 0-300
    _end(root, "beauty", "a", [0], at, t0 + 700, 350.0, "ran")              # 350-700
    _write_run(root, "beauty", "a", 0, [0], "a" * 40, "2026-01-01T10:11:39+00:00", 0.06, resumed_from=20)
    _end(root, "beauty", "b", [0], at, t0 + 500, 250.0, "ran")              # 250-500: with a, both executions
    _write_run(root, "beauty", "b", 0, [0], "a" * 40, "2026-01-01T10:08:19+00:00", 0.06)
    _end(root, "beauty", "c", [0], at, t0 + 1000, 302.0, "ran")             # 698-1000: 2 s after a's end only
    _write_run(root, "beauty", "c", 0, [0], "a" * 40, "2026-01-01T10:16:39+00:00", 0.06)
    _end(root, "beauty", "d", [0], at, t0 + 900, 800.0, "ran", gpus="1")    # another GPU
    _write_run(root, "beauty", "d", 0, [0], "a" * 40, "2026-01-01T10:14:59+00:00", 0.06)
    _end(root, "toys", "e", [0], at, t0 + 900, 800.0, "ran", host="other")  # another machine
    _write_run(root, "toys", "e", 0, [0], "a" * 40, "2026-01-01T10:14:59+00:00", 0.06)
    _end(root, "beauty", "f", [0, 1], at, t0 + 1000, 100.0, "paused")       # 900-1000, no run finished
    groups = {g["variant"]: g for g in group_runs.collect_groups(root)[0]}
    assert groups["a"]["gpu_shared_with"] == ["b"]
    assert groups["b"]["gpu_shared_with"] == ["a"]
    assert groups["c"]["gpu_shared_with"] == ["f"]
    assert groups["d"]["gpu_shared_with"] == [] and groups["e"]["gpu_shared_with"] == []
    rows = [line for line in group_runs.markdown(group_runs.build(root)).splitlines() if line.startswith("| beauty | b |")]
    assert rows and rows[0].endswith("| a |")


def test_group_started_from_scratch_does_not_own_a_lost_groups_executions(tmp_path):
    """A group paused twice and then lost with its machine (checkpoint gone), then trained again from
    scratch: the finished group owns only its last execution; the lost ones are listed as unfinished,
    with their GPU seconds, beside a failed execution of another variant."""
    root = tmp_path / "runs"
    t0 = _ts("2026-01-01T10:00:00+00:00")
    _end(root, "beauty", "plain", [0, 1], "2026-01-01T10:02:24+00:00", t0 + 144, 144.0, "paused")
    _end(root, "beauty", "plain", [0, 1], "2026-01-01T10:11:00+00:00", t0 + 660, 516.0, "paused")
    _end(root, "beauty", "plain", [0, 1], "2026-01-02T10:08:10+00:00", t0 + 86400 + 490, 490.0, "ran")
    for s in (0, 1):
        _write_run(root, "beauty", "plain", s, [0, 1], "a" * 40, "2026-01-02T10:08:09+00:00", 0.06, resumed_from=0)
    _end(root, "beauty", "other", [0], "2026-01-03T10:00:00+00:00", t0 + 2 * 86400, 30.0, "failed")

    (group,) = group_runs.collect_groups(root)[0]
    assert [e["outcome"] for e in group["executions"]] == ["ran"]
    assert group["gpu_wall_s"] == 490.0
    result = group_runs.build(root)
    unfinished = result["unfinished_executions"]
    assert [(e["variant"], e["outcome"], e["wall_s"]) for e in unfinished] == [
        ("other", "failed", 30.0), ("plain", "paused", 144.0), ("plain", "paused", 516.0)]
    text = group_runs.markdown(result)
    assert "Executions that finished no run (3, 690 GPU s)" in text
    assert "| beauty | plain | 0-1 | 2026-01-01T10:11:00+00:00 | paused | 516 |" in text


def test_a_pause_that_wrote_the_stopped_seeds_belongs_to_their_group(tmp_path):
    """Seeds 0-2 paused once, then paused again with seeds 0 and 1 finished (tested at the pause);
    seed 2 resumed as a group of its own. The group of 0-2 (runs 0, 1) owns both executions, the
    group of seed 2 only its own; no execution is left unfinished."""
    root = tmp_path / "runs"
    t0 = _ts("2026-01-01T10:00:00+00:00")
    _end(root, "sports", "hybrid", [0, 1, 2], "2026-01-01T10:02:00+00:00", t0 + 120, 120.0, "paused")
    for s in (0, 1):
        _write_run(root, "sports", "hybrid", s, [0, 1, 2], "a" * 40, "2026-01-01T10:11:59+00:00", 0.05,
                   resumed_from=15)
    _end(root, "sports", "hybrid", [0, 1, 2], "2026-01-01T10:12:00+00:00", t0 + 720, 580.0,
         {0: "ran", 1: "ran", 2: "paused"})
    _write_run(root, "sports", "hybrid", 2, [2], "a" * 40, "2026-01-01T10:13:00+00:00", 0.05, resumed_from=81)
    _end(root, "sports", "hybrid", [2], "2026-01-01T10:13:01+00:00", t0 + 781, 40.0, "ran")

    first, second = group_runs.collect_groups(root)[0]
    assert (first["seeds"], [e["wall_s"] for e in first["executions"]]) == ([0, 1, 2], [120.0, 580.0])
    assert first["gpu_wall_s"] == 700.0
    assert (second["seeds"], [e["wall_s"] for e in second["executions"]]) == ([2], [40.0])
    # the split group's GPU seconds are its own execution's: with the larger group's, the sum is the total
    assert second["gpu_wall_s"] == 40.0 and "split_from" not in first
    assert second["split_from"] == {"seeds": [0, 1, 2], "at": "2026-01-01T10:12:00+00:00"}
    result = group_runs.build(root)
    assert result["unfinished_executions"] == []
    assert "| sports | hybrid | 2 | aaaaaaa | GPU | 1 + | 40 |" in group_runs.markdown(result)


def test_split_from_needs_the_seeds_paused_and_another_ran(tmp_path):
    """A group resumed from its own paused execution, or one whose seeds ran after the larger group's
    pause, was not split off it; a resumed group with no record of either keeps a blank GPU s."""
    t0 = _ts("2026-01-01T10:00:00+00:00")
    events = [{"event": "end", "time": t0 + 100, "at": "a", "group_seeds": [0, 1, 2],
               "outcomes": {"0": "ran", "1": "paused", "2": "paused"}}]
    assert group_runs.split_from(events, [1, 2], t0 + 200)["at"] == "a"
    assert group_runs.split_from(events, [1, 2], t0 + 50) is None  # the split came after
    assert group_runs.split_from(events, [0, 1], t0 + 200) is None  # seed 0 ran there
    assert group_runs.split_from(events, [1, 2, 3], t0 + 200) is None  # seed 3 was not in it
    all_paused = [{**events[0], "outcomes": {"0": "paused", "1": "paused", "2": "paused"}}]
    assert group_runs.split_from(all_paused, [1, 2], t0 + 200) is None
    later = events + [{"event": "end", "time": t0 + 150, "at": "b", "group_seeds": [1, 2],
                       "outcomes": {"1": "failed", "2": "failed"}}]
    assert group_runs.split_from(later, [1, 2], t0 + 200) is None

    root = tmp_path / "runs"
    _write_run(root, "sports", "hybrid", 2, [2], "a" * 40, "2026-01-01T10:13:00+00:00", 0.05, resumed_from=81)
    _end(root, "sports", "hybrid", [2], "2026-01-01T10:13:01+00:00", t0 + 781, 40.0, "ran")
    (group,) = group_runs.collect_groups(root)[0]
    assert group["gpu_wall_s"] is None and "split_from" not in group
