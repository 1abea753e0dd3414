"""What each training group cost and gave: a table of the groups behind the finished runs.

    python -m gbla.bench.group_runs                      # outputs/runs -> outputs/bench/group_runs.{json,md}

A group is the seeds of one (dataset, variant) trained in one process (gbla.train.train_group) at
one commit; its seeds' metrics.json say so (group_seeds, commit) and carry the group's timings
(epochs, training and evaluation seconds, examples per second, the epoch it resumed from). The
variant folder's dispatch.jsonl adds every execution of the group: a group paused at a time budget
and resumed later has several, each with its wall seconds, and the groups of other variants whose
executions ran on the same GPU at the same time (`--runs-per-gpu 2`: then the wall seconds were not
that group's alone). Per group the file lists the seeds' test and validation metrics; per (dataset,
variant) the mean and 95% CI half-width over all finished seeds.

The file is rebuilt from the run folders each time, so it never drifts from them. Keys that the run
folders cannot give (a note, the command as it was typed, a comparison with a published row), written
by hand into an existing group_runs.json, are kept for the group (dataset, variant, seeds, commit) or
variant they were written for.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

from gbla.common import METRIC_NAMES as METRICS
from gbla.common import REPO_ROOT, atomic_write_json, atomic_write_text, git_commit, shown_path
from gbla.grid import read_dispatch_log
from gbla.runs import DEFAULT_RUNS_ROOT, load_run_metrics, seeds_label
from gbla.stats import mean_ci

# group-level timings, the same in every seed's metrics.json of the group
GROUP_TIMINGS = ("group_epochs", "setup_s", "train_s", "eval_s", "test_eval_s", "valid_eval_s", "epoch_time_s",
                 "examples_per_s", "steps_per_epoch", "resumed_from_epoch")


def _timestamp(iso: str) -> float:
    return dt.datetime.fromisoformat(iso).timestamp()


def group_executions(events: list[dict], seeds: list[int], finished_at: str, resumed: bool = True,
                     ran_seeds: list[int] | None = None) -> list[dict]:
    """The executions (dispatch "end" events) of the group of `seeds` whose results were written at
    `finished_at`: the first execution that ran them (`ran_seeds`, default all: a pause writes the seeds
    that had stopped and leaves the rest to a group of their own) at or after that time and, if the group was
    `resumed` from a checkpoint, the paused ones right before it (back to the previous execution that
    ran or failed). A group that started from scratch owns only its last execution: paused ones
    before it belonged to a group whose checkpoint was lost (its machine went away)."""
    ends = sorted((e for e in events if e.get("event") == "end" and e.get("group_seeds") == seeds),
                  key=lambda e: e["time"])
    written = _timestamp(finished_at)
    ran = [str(s) for s in (seeds if ran_seeds is None else ran_seeds)]
    last = next((i for i, e in enumerate(ends) if e["time"] >= written - 1
                 and all(e.get("outcomes", {}).get(s) == "ran" for s in ran)), None)
    if last is None:
        return []
    first = last
    while resumed and first > 0 and all(o == "paused" for o in ends[first - 1].get("outcomes", {}).values()):
        first -= 1
    return [{"at": e["at"], "wall_s": e.get("wall_s"), "host": e.get("host"), "worker": e.get("worker"),
             "cuda_visible_devices": e.get("cuda_visible_devices"), "end_time": e["time"],
             "outcome": "ran" if i == last else "paused"} for i, e in zip(range(first, last + 1), ends[first:last + 1])]


def split_from(events: list[dict], seeds: list[int], before: float) -> dict | None:
    """The execution that handed the group of `seeds` its checkpoint by a pause that wrote other seeds
    (they had stopped early): the last "end" event before time `before` of a group of more seeds, in
    which every one of `seeds` paused and some other seed ran. None if there is none."""
    mine = {str(s) for s in seeds}
    for e in sorted((e for e in events if e.get("event") == "end" and e.get("time", float("inf")) <= before),
                    key=lambda e: e["time"], reverse=True):
        outcomes = e.get("outcomes") or {}
        if mine < set(outcomes) and all(outcomes[s] == "paused" for s in mine) \
                and any(o == "ran" for s, o in outcomes.items() if s not in mine):
            return e
        if mine & set(outcomes):
            return None  # a later execution of these seeds came between: the split was not this group's start
    return None


def execution_intervals(runs_root: str | Path) -> list[dict]:
    """Every finished execution (dispatch "end" event with its wall seconds) under `runs_root`, of any
    group, also one that never finished a run: its dataset, variant, host, GPUs, start and end time."""
    out = []
    for path in sorted(Path(runs_root).glob("*/*/dispatch.jsonl")):
        for e in read_dispatch_log(path.parent):
            if e.get("event") == "end" and e.get("wall_s") is not None and e.get("time") is not None:
                outcomes = set((e.get("outcomes") or {}).values())
                out.append({"dataset": path.parent.parent.name, "variant": path.parent.name,
                            "seeds": e.get("group_seeds"), "at": e.get("at"), "wall_s": e["wall_s"],
                            "outcome": outcomes.pop() if len(outcomes) == 1 else ",".join(sorted(outcomes)),
                            "host": e.get("host"), "gpus": _gpus(e.get("cuda_visible_devices")),
                            "start": e["time"] - e["wall_s"], "end": e["time"]})
    return out


def unfinished_executions(intervals: list[dict], groups: list[dict]) -> list[dict]:
    """Of the executions (execution_intervals), those that belong to no finished group: paused ones
    whose group was not resumed yet (or whose checkpoint was lost with its machine) and failed ones.
    Their GPU seconds gave no result (yet), so a GPU-time account that left them out would undercount."""
    owned = {(g["dataset"], g["variant"], e["end_time"]) for g in groups for e in g.get("executions", [])}
    return [{k: i[k] for k in ("dataset", "variant", "seeds", "at", "wall_s", "outcome")} for i in intervals
            if (i["dataset"], i["variant"], i["end"]) not in owned and i["outcome"] != "ran"]


def _gpus(cuda_visible_devices) -> frozenset:
    return frozenset(str(cuda_visible_devices or "").replace(" ", "").split(",")) - {""}


# executions overlapping by less than this are back to back (one group ends as the next starts)
MIN_SHARED_S = 5.0


def shared_gpu_with(execution: dict, group: dict, intervals: list[dict]) -> list[str]:
    """The other groups' variants that ran on the same host and GPU while `execution` did (two groups
    at once on one GPU, as `--runs-per-gpu 2` does): the execution's wall seconds were not the GPU's alone."""
    if execution.get("wall_s") is None or execution.get("end_time") is None:
        return []
    start, end = execution["end_time"] - execution["wall_s"], execution["end_time"]
    gpus = _gpus(execution.get("cuda_visible_devices"))
    return sorted({i["variant"] if i["dataset"] == group["dataset"] else f"{i['dataset']}/{i['variant']}"
                   for i in intervals
                   if i["host"] == execution.get("host") and i["gpus"] & gpus
                   and (i["dataset"], i["variant"]) != (group["dataset"], group["variant"])
                   and min(end, i["end"]) - max(start, i["start"]) >= MIN_SHARED_S})


def collect_groups(runs_root: str | Path, intervals: list[dict] | None = None) -> tuple[list[dict], list[dict]]:
    """(groups, variant summaries) from every finished run under `runs_root`; `intervals`: its
    execution_intervals, when the caller has read them already."""
    runs_root = Path(runs_root)
    groups: dict[tuple, dict] = {}
    by_variant: dict[tuple, list[dict]] = {}
    for metrics_path in sorted(runs_root.glob("*/*/seed*/metrics.json")):
        m = load_run_metrics(metrics_path.parent)
        if not m or m.get("status") != "ok":
            continue
        dataset, variant = m["dataset"], m["variant"]
        seeds = list(m.get("group_seeds") or [m["seed"]])
        key = (dataset, variant, tuple(seeds), m.get("commit"))
        timings = m.get("timings") or {}
        run = {"seed": m["seed"], "config_hash": m["config_hash"], "best_epoch": m.get("best_epoch"),
               "epochs_trained": m.get("epochs_trained"),
               **{f"test_{k}": m["test"].get(k) for k in METRICS},
               **{f"valid_{k}": (m.get("valid") or {}).get(k) for k in METRICS}}
        g = groups.setdefault(key, {
            "dataset": dataset, "variant": variant, "seeds": seeds, "commit": m.get("commit"),
            "device": m.get("device"), "data_fingerprint": m.get("data_fingerprint"),
            "finished_at": m.get("created_at"),
            **{k: timings[k] for k in GROUP_TIMINGS if k in timings}, "runs": []})
        g["finished_at"] = max(g["finished_at"] or "", m.get("created_at") or "") or None
        g["runs"].append(run)
        by_variant.setdefault((dataset, variant), []).append({**run, "commit": m.get("commit")})
    intervals = execution_intervals(runs_root) if intervals is None else intervals
    out = []
    for (dataset, variant, _, _), g in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[1]["finished_at"] or "")):
        g["runs"].sort(key=lambda r: r["seed"])
        if g.get("finished_at"):
            events = read_dispatch_log(runs_root / dataset / variant)
            executions = group_executions(events, g["seeds"], g["finished_at"],
                                          resumed=bool(g.get("resumed_from_epoch")),
                                          ran_seeds=[r["seed"] for r in g["runs"]])
            if executions:
                g["executions"] = executions
                # a group split off a larger one (its pause wrote the seeds that had stopped) owns only the
                # executions after the split: the larger group owns that execution and those before it
                split = (split_from(events, g["seeds"], executions[0]["end_time"] - (executions[0]["wall_s"] or 0))
                         if g.get("resumed_from_epoch") else None)
                if split is not None:
                    g["split_from"] = {"seeds": split["group_seeds"], "at": split["at"]}
                # a resumed group whose paused executions left no record: the sum would undercount
                complete = len(executions) > 1 or not g.get("resumed_from_epoch") or split is not None
                g["gpu_wall_s"] = round(sum(e["wall_s"] or 0 for e in executions), 1) if complete else None
                g["gpu_shared_with"] = sorted({v for e in executions for v in shared_gpu_with(e, g, intervals)})
        # seconds in training, evaluation and setup over all executions (the checkpoint carries them)
        parts = [g.get(k) for k in ("setup_s", "train_s", "eval_s", "test_eval_s")]
        if all(p is not None for p in parts[1:3]):
            g["train_eval_s"] = round(sum(p or 0 for p in parts), 1)
        out.append(g)
    summaries = []
    for (dataset, variant), runs in sorted(by_variant.items()):
        runs.sort(key=lambda r: r["seed"])
        stats = {k: mean_ci([r[f"test_{k}"] for r in runs]) for k in METRICS}
        summaries.append({"dataset": dataset, "variant": variant, "seeds": [r["seed"] for r in runs],
                          "commits": sorted({r["commit"] for r in runs if r["commit"]}),
                          "test_mean_and_ci95_half_width": {
                              k: [s["mean"], (s["ci_high"] - s["ci_low"]) / 2 if s["n"] > 1 else None]
                              for k, s in stats.items()}})
    return out, summaries


def _keep_hand_written(new: list[dict], old: list[dict], key) -> None:
    """Copy into each new entry the keys of the old entry for the same group or variant that the run
    folders do not give."""
    old_by_key = {}
    for entry in old:
        try:
            old_by_key[key(entry)] = entry
        except (KeyError, TypeError):
            continue
    for entry in new:
        for k, v in old_by_key.get(key(entry), {}).items():
            entry.setdefault(k, v)


def _group_key(entry: dict):
    return (entry.get("dataset", "beauty"), entry["variant"], tuple(entry["seeds"]), (entry.get("commit") or "")[:7])


def build(runs_root: str | Path, previous: dict | None = None) -> dict:
    intervals = execution_intervals(runs_root)
    groups, summaries = collect_groups(runs_root, intervals)
    previous = previous or {}
    _keep_hand_written(groups, previous.get("groups", []), _group_key)
    old_summaries = previous.get("variant_summaries", [])
    if isinstance(old_summaries, dict):  # older layout: {variant: {...}}, Beauty only
        old_summaries = [{"dataset": "beauty", "variant": v, **s} for v, s in old_summaries.items()]
    _keep_hand_written(summaries, old_summaries, lambda e: (e["dataset"], e["variant"]))
    runs_root = Path(runs_root).resolve()
    meta = {"runs_root": shown_path(runs_root), "commit": git_commit(),
            "built_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "devices": sorted({g["device"] for g in groups if g.get("device")}),
            "data_fingerprints": {d: sorted({g["data_fingerprint"] for g in groups if g["dataset"] == d})
                                  for d in sorted({g["dataset"] for g in groups})}}
    for k, v in (previous.get("meta") or {}).items():
        if k in ("note",):
            meta.setdefault(k, v)
    return {"meta": meta, "groups": groups, "variant_summaries": summaries,
            "unfinished_executions": unfinished_executions(intervals, groups)}


def _fmt(x, spec):
    return "" if x is None else format(x, spec)


def markdown(result: dict) -> str:
    m = result["meta"]
    lines = ["# Training groups", "",
             f"Built {m['built_at']} at commit {m['commit'][:7]} from the finished runs under `{m['runs_root']}` "
             f"(`python -m gbla.bench.group_runs`). One row per group: the seeds of one variant trained in one "
             "process at one commit. GPU s: the wall seconds of the group's executions (a paused and resumed "
             "group has several; a group of the seeds that a pause left training, split off a larger group, owns "
             "only its executions after the split, marked +; blank where a paused execution left no record; "
             "a group that shared its GPU with "
             "other groups, named in the last column, had it for only part of those seconds); train+eval s: the group's own "
             "training, validation, test and setup seconds over all its executions; epoch s: one epoch with "
             "every seed still training; examples/s over the whole training.", "",
             "| dataset | variant | seeds | commit | device | executions | GPU s | train+eval s | epochs | epoch s "
             "| examples/s | test R@10 (mean) | test NDCG@10 (mean) | GPU shared with |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for g in result["groups"]:
        seed_text = seeds_label(g["seeds"], sep=",")
        r10 = sum(r["test_recall@10"] for r in g["runs"]) / len(g["runs"])
        n10 = sum(r["test_ndcg@10"] for r in g["runs"]) / len(g["runs"])
        gpu_s = g["gpu_wall_s"] if "gpu_wall_s" in g else g.get("wall_s")
        lines.append(f"| {g['dataset']} | {g['variant']} | {seed_text} | {(g['commit'] or '')[:7]} | "
                     f"{(g.get('device') or '').removeprefix('cuda:')} | {len(g.get('executions', [])) or ''}"
                     f"{' +' if g.get('split_from') else ''} | "
                     f"{_fmt(gpu_s, '.0f')} | {_fmt(g.get('train_eval_s'), '.0f')} | {_fmt(g.get('group_epochs'), 'd')} | {_fmt(g.get('epoch_time_s'), '.2f')} | "
                     f"{_fmt(g.get('examples_per_s'), ',.0f')} | {r10:.4f} | {n10:.4f} | "
                     f"{', '.join(g.get('gpu_shared_with') or [])} |")
    lines += ["", "Per variant, every finished seed (mean ± 95% CI half-width over seeds):", "",
              "| dataset | variant | seeds | Recall@5 | Recall@10 | NDCG@5 | NDCG@10 |", "|---|---|---|---|---|---|---|"]
    for s in result["variant_summaries"]:
        cells = []
        for k in METRICS:
            mean, half = s["test_mean_and_ci95_half_width"][k]
            cells.append(f"{mean:.4f}" + (f" ± {half:.4f}" if half is not None else ""))
        lines.append(f"| {s['dataset']} | {s['variant']} | {len(s['seeds'])} | " + " | ".join(cells) + " |")
    unfinished = result.get("unfinished_executions") or []
    if unfinished:
        total = sum(e["wall_s"] or 0 for e in unfinished)
        lines += ["", f"Executions that finished no run ({len(unfinished)}, {total:.0f} GPU s): paused ones not resumed "
                  "(yet, or their checkpoint was lost with the machine), failed ones, and pauses that wrote the seeds "
                  "that had stopped (paused,ran) when a later execution trained those seeds again:", "",
                  "| dataset | variant | seeds | ended | outcome | GPU s |", "|---|---|---|---|---|---|"]
        for e in unfinished:
            lines.append(f"| {e['dataset']} | {e['variant']} | {seeds_label(e['seeds'] or [], sep=',')} | {e['at'] or ''} | {e['outcome']} | "
                         f"{_fmt(e['wall_s'], '.0f')} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs-root", default=str(DEFAULT_RUNS_ROOT))
    ap.add_argument("--out", default=str(REPO_ROOT / "outputs" / "bench" / "group_runs.json"))
    args = ap.parse_args(argv)
    out = Path(args.out)
    previous = json.loads(out.read_text()) if out.is_file() else None
    result = build(args.runs_root, previous)
    atomic_write_json(out, result)
    atomic_write_text(out.with_suffix(".md"), markdown(result))
    print(f"{len(result['groups'])} groups, {len(result['variant_summaries'])} variants -> {out} (+ .md)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
