"""The grid on several GPUs, reproduced without GPUs: two Dask workers pinned to "GPUs" 0 and 1 (their
CUDA_VISIBLE_DEVICES) train on the CPU, through the same commands gbla.bench.multi_gpu runs on a
multi-GPU machine: both groups at once, each on its worker's device; a Ctrl-C and a killed worker
lose and duplicate nothing. Plus the record-reading checks on hand-made dispatch logs."""
import json

import pytest

from gbla.bench import multi_gpu
from gbla.common import REPO_ROOT
from gbla.grid import DISPATCH_LOG, append_dispatch_event, read_dispatch_log

TWO_GROUPS = """
  two-groups:
    datasets: [synthetic]
    seeds: [0, 1]
    synthetic: {num_users: 200}
    variants: [sa, hybrid]
    model: {d_model: 32, num_heads: 2, head_dim: 16, d_ff: 64, num_decoder_layers: 1, dropout: 0.1,
            num_user_buckets: 64}
    train: {batch_size: 128, max_epochs: 2, patience: 2, beam_size: 10}
    runtime: {device: cpu, runs_root: outputs/runs-two-groups}  # the smoke profile's synthetic runs differ
    dask: {runs_per_gpu: 1}
"""


def _event(variant_dir, kind, execution, t, outcomes=None, **extra):
    event = {"event": kind, "execution": execution, "label": f"d/{variant_dir.name}", "time": t, "worker": "0",
             "cuda_visible_devices": "0", "pid": 1, **extra}
    if outcomes is not None:
        event["outcomes"] = outcomes
    append_dispatch_event(variant_dir, event)


def _done(run_dir):
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.json").write_text(json.dumps({"status": "ok"}))


def test_records_flag_runs_finished_twice_or_never(tmp_path):
    a, b = tmp_path / "d" / "a", tmp_path / "d" / "b"
    a.mkdir(parents=True), b.mkdir(parents=True)
    _event(a, "start", "x1", 0.0)                                 # killed: no end
    _event(a, "start", "x2", 5.0)
    _event(a, "end", "x2", 15.0, {"0": "ran", "1": "ran"})
    _event(b, "start", "y1", 2.0, cuda_visible_devices="1")
    _event(b, "end", "y1", 12.0, {"0": "ran"})
    _event(b, "start", "y2", 20.0)
    _event(b, "end", "y2", 30.0, {"0": "ran", "1": "failed"})    # seed 0 trained to the end twice
    for d, s in [(a, 0), (a, 1), (b, 0)]:
        _done(d / f"seed{s}")
    exs = multi_gpu.executions(tmp_path)
    assert [e["execution"] for e in exs] == ["x1", "y1", "x2", "y2"]
    assert exs[0]["end"] is None and exs[0]["outcomes"] == {}
    assert multi_gpu.overlap_s(exs[1], exs[2]) == pytest.approx(7.0)
    assert multi_gpu.overlap_s(exs[0], exs[1]) == 0.0             # an unfinished execution has no interval
    problems = multi_gpu.check_runs_once(tmp_path, [("d", "a", 0), ("d", "a", 1), ("d", "b", 0), ("d", "b", 1)])
    assert problems == ["d/b/seed0 finished 2 times", "d/b/seed1 is not done", "d/b/seed1 finished 0 times"]


def test_dispatch_log_errors_name_file_and_line(tmp_path):
    (tmp_path / DISPATCH_LOG).write_text('{"event": "start"}\nnot json\n')
    with pytest.raises(ValueError, match=rf"{DISPATCH_LOG}:2: not a JSON line"):
        read_dispatch_log(tmp_path)
    assert read_dispatch_log(tmp_path / "none") == []


def test_two_pinned_workers_train_at_once_and_survive_ctrl_c_and_a_killed_worker(tmp_path, private_tempdir):
    params = tmp_path / "params.yaml"
    params.write_text((REPO_ROOT / "params" / "ablations.yaml").read_text() + TWO_GROUPS)
    out = tmp_path / "out"
    sockets = lambda: set(private_tempdir.glob("gbla-kernel-*"))  # noqa: E731
    sockets_before = sockets()
    code = multi_gpu.main(["--gpus", "0,1", "--params", str(params), "--profile", "two-groups",
                           "--cases", "all_gpus", "ctrl_c", "killed_worker", "--work", str(tmp_path / "work"),
                           "--out", str(out), "--settle-s", "2", "--case-timeout-s", "600"])
    report = json.loads((out / "multi_gpu.json").read_text())
    cases = {c["case"]: c for c in report["cases"]}
    assert code == 0, {k: c["problems"] for k, c in cases.items()}
    both = cases["all_gpus"]
    assert both["cuda_visible_devices"] == ["0", "1"] and both["max_overlap_s"] > 0
    assert {e["worker"] for e in both["executions"]} == {"0", "1"}
    # every run records where it trained
    for run in (tmp_path / "work" / "all_gpus" / "synthetic").glob("*/seed*"):
        placement = json.loads((run / "metrics.json").read_text())["placement"]
        assert placement["cuda_visible_devices"] in ("0", "1") and placement["pid"] > 0
    interrupted = cases["ctrl_c"]
    assert interrupted["returncode"] == 130 and interrupted["rerun_returncode"] == 0
    assert not interrupted["leftover_processes"]
    unfinished = [e for e in interrupted["executions"] if e["end"] is None]
    assert len(unfinished) == 2                                   # both were stopped mid-way, then rerun
    killed = cases["killed_worker"]
    pid = killed["killed"]["pid"]
    again = [e for e in killed["executions"] if e["label"] == killed["killed"]["label"] and e["end"] is not None]
    assert len(again) == 1 and again[0]["pid"] != pid             # rerun by a restarted worker
    # the restarted worker keeps its GPU
    assert again[0]["cuda_visible_devices"] == next(e["cuda_visible_devices"] for e in killed["executions"]
                                                    if e["pid"] == pid)
    assert "| killed_worker |" in (out / "multi_gpu.md").read_text()
    # stopped notebooks shut their kernels down too: no socket folder is left behind
    assert not sockets() - sockets_before
