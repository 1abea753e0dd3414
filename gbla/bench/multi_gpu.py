"""The grid across several GPUs of one machine: timings, placement and interruptions, from run records.

    python -m gbla.bench.multi_gpu --gpus 0,1                    # on a machine with two GPUs
    python -m gbla.bench.multi_gpu --gpus 0,1 --cases all_gpus   # one case only

Runs a small real profile (`multi-gpu-check` of params/ablations.yaml: Beauty, sa and hybrid, seeds 0
and 1, three epochs) through `python -m gbla.grid` - papermill notebooks on a Dask LocalCluster, the
path a user takes - once per case, each in a fresh runs folder under --work:

    one_gpu        --gpus <first>: the wall time of the profile on one GPU
    all_gpus       --gpus <all>: the same on every GPU given; its groups must train at the same time,
                   each on its own GPU (told apart by UUID, not name)
    ctrl_c         SIGINT to the grid's process group (a terminal's Ctrl-C) once every group is
                   training, then the same command again: nothing half-done counts as done, no
                   notebook process outlives the grid, and the rerun finishes every run once
    killed_worker  SIGKILL to the Dask worker process of one training group: the other group goes
                   on, the killed one is run again, and every run finishes exactly once

The evidence comes from the records the grid keeps anyway: each variant folder's dispatch.jsonl
(a start and an end line per execution of a group: worker, CUDA_VISIBLE_DEVICES, process, times),
each run's metrics.json (`placement`: host, process, GPU UUID and PCI address) and the grid's
summary-<profile>.json. Output: <out>/multi_gpu.json and .md with device, commit, command and date.
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from gbla.common import REPO_ROOT, atomic_write_json, atomic_write_text, git_commit, markdown_table
from gbla.grid import DISPATCH_LOG, read_dispatch_log
from gbla.runs import load_run_metrics

CASES = ("one_gpu", "all_gpus", "ctrl_c", "killed_worker")
PROFILE = "multi-gpu-check"


# ---------------------------------------------------------------------------------------------
# reading the records


def executions(runs_root: str | os.PathLike) -> list[dict]:
    """Every execution of a group under runs_root, from the dispatch logs: label, worker,
    cuda_visible_devices, pid, start and end time (end None: it never returned - killed or
    interrupted), its per-seed outcomes, and the GPUs its finished runs recorded."""
    found = []
    for log in sorted(Path(runs_root).glob(f"*/*/{DISPATCH_LOG}")):
        variant_dir = log.parent
        by_id: dict[str, dict] = {}
        for event in read_dispatch_log(variant_dir):
            ex = by_id.setdefault(event["execution"], {
                "execution": event["execution"], "label": event["label"], "variant_dir": str(variant_dir),
                "worker": event.get("worker"), "cuda_visible_devices": event.get("cuda_visible_devices"),
                "pid": event.get("pid"), "start": None, "end": None, "outcomes": {}})
            if event["event"] == "start":
                ex["start"] = event["time"]
            elif event["event"] == "end":
                ex["end"] = event["time"]
                ex["outcomes"] = dict(event.get("outcomes", {}))
        for ex in by_id.values():
            gpus = set()
            for seed, outcome in ex["outcomes"].items():
                metrics = load_run_metrics(variant_dir / f"seed{seed}") if outcome == "ran" else None
                placement = (metrics or {}).get("placement") or {}
                if placement.get("gpu_uuid"):
                    gpus.add(placement["gpu_uuid"])
            ex["gpu_uuids"] = sorted(gpus)
            found.append(ex)
    return sorted(found, key=lambda e: e["start"] or 0.0)


def overlap_s(a: dict, b: dict) -> float:
    """Seconds during which two executions both ran (0 when either has no end)."""
    if None in (a["start"], a["end"], b["start"], b["end"]):
        return 0.0
    return max(0.0, min(a["end"], b["end"]) - max(a["start"], b["start"]))


def check_runs_once(runs_root: str | os.PathLike, expected: list[tuple[str, str, int]]) -> list[str]:
    """Problems with the runs under runs_root (empty list: none): a run not done, or finished by more
    than one execution (trained to the end twice), or by none."""
    finished: dict[tuple[str, str, int], int] = {}
    for ex in executions(runs_root):
        dataset, variant = Path(ex["variant_dir"]).parts[-2:]
        for seed, outcome in ex["outcomes"].items():
            if outcome == "ran":
                key = (dataset, variant, int(seed))
                finished[key] = finished.get(key, 0) + 1
    problems = []
    for key in expected:
        dataset, variant, seed = key
        metrics = load_run_metrics(Path(runs_root) / dataset / variant / f"seed{seed}")
        if not metrics or metrics.get("status") != "ok":
            problems.append(f"{dataset}/{variant}/seed{seed} is not done")
        if finished.get(key, 0) != 1:
            problems.append(f"{dataset}/{variant}/seed{seed} finished {finished.get(key, 0)} times")
    return problems


def processes_mentioning(text: str) -> list[int]:
    """Live processes (Linux /proc) whose command line contains `text`, this one excluded."""
    pids = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline and int(entry.name) != os.getpid():
            pids.append(int(entry.name))
    return pids


def wait_for_exit(text: str, grace_s: float) -> list[int]:
    """Processes mentioning `text` still alive after up to grace_s seconds of waiting for them."""
    deadline = time.time() + grace_s
    while True:
        alive = processes_mentioning(text)
        if not alive or time.time() >= deadline:
            return alive
        time.sleep(0.5)


# ---------------------------------------------------------------------------------------------
# running the grid


def grid_command(gpus: list[str], runs_root: Path, args) -> list[str]:
    cmd = [sys.executable, "-m", "gbla.grid", "--params", args.params, "--profile", args.profile,
           "--gpus", ",".join(gpus), "--runs-per-gpu", "1", "--runs-root", str(runs_root), "--no-aggregate"]
    if args.processed_root:
        cmd += ["--processed-root", args.processed_root]
    if args.device:
        cmd += ["--device", args.device]
    return cmd


def wait_until_training(runs_root: Path, groups: int, proc: subprocess.Popen, settle_s: float,
                        timeout_s: float) -> list[dict]:
    """Wait until `groups` executions have started and then `settle_s` more seconds (so that they
    are training, not starting); returns the running executions. Raises if the grid ends first."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        running = [e for e in executions(runs_root) if e["start"] is not None and e["end"] is None]
        if len(running) >= groups:
            time.sleep(settle_s)
            return [e for e in executions(runs_root) if e["start"] is not None and e["end"] is None]
        if proc.poll() is not None:
            raise RuntimeError(f"the grid ended (exit {proc.returncode}) before {groups} groups were training")
        time.sleep(0.5)
    raise TimeoutError(f"{groups} groups did not start within {timeout_s:.0f} s")


def run_case(case: str, gpus: list[str], args, expected: list[tuple[str, str, int]], groups: int) -> dict:
    runs_root = Path(args.work) / case
    shutil.rmtree(runs_root, ignore_errors=True)
    runs_root.mkdir(parents=True)
    use = gpus[:1] if case == "one_gpu" else gpus
    cmd = grid_command(use, runs_root, args)
    log_path = runs_root.parent / f"{case}.log"
    result: dict = {"case": case, "gpus": use, "command": " ".join(cmd[1:])}
    t0 = time.time()
    with open(log_path, "w") as log:
        # a session of its own: the case's Ctrl-C goes to the grid's process group, as a terminal's would
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT, start_new_session=True)
        at_once = min(groups, len(use))  # one group per GPU at a time (--runs-per-gpu 1)
        if case == "ctrl_c":
            running = wait_until_training(runs_root, at_once, proc, args.settle_s, args.start_timeout_s)
            result["interrupted_executions"] = [e["label"] for e in running]
            os.killpg(proc.pid, signal.SIGINT)
        elif case == "killed_worker":
            running = wait_until_training(runs_root, at_once, proc, args.settle_s, args.start_timeout_s)
            victim = running[0]
            result["killed"] = {"label": victim["label"], "worker": victim["worker"], "pid": victim["pid"]}
            os.kill(victim["pid"], signal.SIGKILL)
        result["returncode"] = proc.wait(timeout=args.case_timeout_s)
    result["wall_s"] = round(time.time() - t0, 1)
    # processes that got a signal from the shutdown may still be shutting their kernels down (papermill
    # asks a kernel politely first, then kills it): give them --exit-grace-s before calling them leftovers
    result["leftover_processes"] = wait_for_exit(str(runs_root), args.exit_grace_s)
    if case == "ctrl_c":
        result["done_after_interrupt"] = [f"{d}/{v}/seed{s}" for d, v, s in expected
                                          if load_run_metrics(runs_root / d / v / f"seed{s}")]
        t1 = time.time()
        with open(log_path, "a") as log:
            result["rerun_returncode"] = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT,
                                                        timeout=args.case_timeout_s).returncode
        result["rerun_wall_s"] = round(time.time() - t1, 1)
    result["executions"] = executions(runs_root)
    result["problems"] = check_runs_once(runs_root, expected)
    if case == "all_gpus":
        exs = result["executions"]
        pairs = [(a, b) for i, a in enumerate(exs) for b in exs[i + 1:]
                 if a["cuda_visible_devices"] != b["cuda_visible_devices"]]
        result["max_overlap_s"] = round(max((overlap_s(a, b) for a, b in pairs), default=0.0), 1)
        result["cuda_visible_devices"] = sorted({str(e["cuda_visible_devices"]) for e in exs})
        result["gpu_uuids"] = sorted({u for e in exs for u in e["gpu_uuids"]})
        if len(result["cuda_visible_devices"]) < min(len(use), groups):
            result["problems"].append(f"groups ran on {result['cuda_visible_devices']} only, not on each of {use}")
        if result["max_overlap_s"] <= 0:
            result["problems"].append("no two groups on different GPUs trained at the same time")
        if result["gpu_uuids"] and len(result["gpu_uuids"]) < min(len(use), groups):
            result["problems"].append(f"runs recorded GPUs {result['gpu_uuids']}: not one GPU per worker")
    if case == "ctrl_c":
        if result["returncode"] != 130:
            result["problems"].append(f"the interrupted grid exited {result['returncode']}, not 130")
        if result["leftover_processes"]:
            result["problems"].append(f"processes outlived the interrupted grid: {result['leftover_processes']}")
    if case == "killed_worker":
        killed = [e for e in result["executions"] if e["pid"] == result["killed"]["pid"] and e["end"] is None]
        if not killed:
            result["problems"].append("the killed worker's execution is not in the dispatch log as unfinished")
    result["ok"] = not result["problems"]
    return result


# ---------------------------------------------------------------------------------------------
# report


def markdown(report: dict) -> str:
    meta = report["meta"]
    lines = [f"# The grid on {len(meta['gpus'])} GPUs of one machine", "",
             f"{meta['device']} x {meta['gpu_count']}, commit {meta['commit']}, {meta['date']}",
             f"`{meta['command']}` (profile `{meta['profile']}`: {meta['runs']} runs in {meta['groups']} groups)", ""]
    rows = []
    for c in report["cases"]:
        rows.append([c["case"], ",".join(c["gpus"]), c.get("returncode"), c.get("wall_s"),
                     c.get("rerun_wall_s", ""), c.get("max_overlap_s", ""), "yes" if c["ok"] else "NO",
                     "; ".join(c["problems"]) or "-"])
    lines.append(markdown_table(["case", "gpus", "exit", "wall s", "rerun wall s", "overlap s", "ok", "problems"],
                                rows))
    walls = {c["case"]: c.get("wall_s") for c in report["cases"]}
    if walls.get("one_gpu") and walls.get("all_gpus"):
        lines += ["", f"Wall on {len(meta['gpus'])} GPUs vs one: {walls['one_gpu'] / walls['all_gpus']:.2f}x faster."]
    lines += ["", "Executions (dispatch logs):", ""]
    rows = []
    for c in report["cases"]:
        t0 = min((e["start"] for e in c["executions"] if e["start"]), default=0.0)
        for e in c["executions"]:
            rows.append([c["case"], e["label"], e["worker"], e["cuda_visible_devices"],
                         ",".join(u[-12:] for u in e["gpu_uuids"]) or "-", e["pid"],
                         f"{e['start'] - t0:.1f}", "-" if e["end"] is None else f"{e['end'] - t0:.1f}",
                         " ".join(f"{s}:{o}" for s, o in sorted(e["outcomes"].items())) or "(no end)"])
    lines.append(markdown_table(["case", "group", "worker", "CUDA_VISIBLE_DEVICES", "GPU uuid (tail)", "pid",
                                 "start s", "end s", "outcomes"], rows))
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gpus", required=True, help="comma-separated GPU ids, at least two")
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    ap.add_argument("--params", default=str(REPO_ROOT / "params" / "ablations.yaml"))
    ap.add_argument("--profile", default=PROFILE, help=f"params profile to run (default {PROFILE})")
    ap.add_argument("--processed-root", help="folder holding the processed datasets")
    ap.add_argument("--device", help="override runtime.device (cpu: exercise the dispatch without GPUs)")
    ap.add_argument("--work", default=str(REPO_ROOT / "outputs" / "scratch" / "multi_gpu"),
                    help="runs folders of the cases (replaced)")
    ap.add_argument("--settle-s", type=float, default=15.0,
                    help="seconds to let every group train before interrupting or killing")
    ap.add_argument("--start-timeout-s", type=float, default=300.0)
    ap.add_argument("--case-timeout-s", type=float, default=900.0)
    ap.add_argument("--exit-grace-s", type=float, default=30.0,
                    help="seconds a stopped grid's processes may take to exit before they count as left over")
    ap.add_argument("--out", default=str(REPO_ROOT / "outputs" / "bench"))
    args = ap.parse_args(argv)
    gpus = [g.strip() for g in args.gpus.split(",") if g.strip()]
    if len(gpus) < 2:
        ap.error("--gpus needs at least two GPU ids")

    from gbla.params import load_grid

    grid = load_grid(args.params, args.profile)
    configs = grid.expand()
    expected = [(c.dataset, c.variant, c.seed) for c in configs]
    groups = len({(c.dataset, c.variant) for c in configs})
    device, count = "cpu", 0
    try:
        import torch

        if torch.cuda.is_available() and args.device != "cpu":
            device, count = torch.cuda.get_device_name(), torch.cuda.device_count()
    except ImportError:
        pass
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"meta": {"command": "python -m gbla.bench.multi_gpu " + " ".join(argv if argv is not None else sys.argv[1:]),
                       "commit": git_commit(), "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                       "device": device, "gpu_count": count, "gpus": gpus, "profile": args.profile,
                       "runs": len(configs), "groups": groups},
              "cases": []}
    for case in args.cases:
        print(f"case {case} ...", flush=True)
        report["cases"].append(run_case(case, gpus, args, expected, groups))
        print({k: v for k, v in report["cases"][-1].items() if k != "executions"}, flush=True)
        atomic_write_json(out / "multi_gpu.json", report)
        atomic_write_text(out / "multi_gpu.md", markdown(report))
    print(markdown(report), flush=True)
    return 0 if all(c["ok"] for c in report["cases"]) else 1


if __name__ == "__main__":
    sys.exit(main())
