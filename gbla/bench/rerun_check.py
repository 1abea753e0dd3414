"""Two trainings of the same runs, compared: is training reproducible here, and to what precision?

    python -m gbla.bench.rerun_check outputs/runs other_runs.tgz sports/hybrid/seed0 sports/hybrid/seed1 \\
        --out outputs/bench/rerun_check.json

LEFT and RIGHT are runs folders, or archives written by `python -m gbla.grid --archive`; each RUN
(dataset/variant/seedN) must be finished in both, trained from the same config (same config hash) on
the same data (same data fingerprint), else it is refused. Per run: the training loss and validation
metrics at every epoch both trained, the best epoch, the validation and test metrics, and every test
user's rank, each identical or the largest difference. The result says whether the two trainings
were the same computation, which the report's statistics do not assume (they compare seeds).

Output: <out> (JSON) and the same name .md, with both sides' commit, device and date, and the command.
Exit status 0 when every run is identical, 1 when one differs, 2 on bad input.
"""
from __future__ import annotations

import argparse
import datetime as dt
import sys
import tempfile
from pathlib import Path

import polars as pl

from gbla.common import REPO_ROOT, atomic_write_json, atomic_write_text, git_commit, shown_path
from gbla.run_archive import ArchiveError, unpack_archive
from gbla.runs import PER_USER_FILE, load_run_metrics

PROVENANCE = ("commit", "device", "created_at", "data_fingerprint", "group_seeds")


class RerunError(ValueError):
    pass


def compare_run(left: Path, right: Path) -> dict:
    """The comparison of one run's two folders (see the module docstring)."""
    a, b = load_run_metrics(left), load_run_metrics(right)
    for side, m, path in (("left", a, left), ("right", b, right)):
        if not m or m.get("status") != "ok":
            raise RerunError(f"{path}: no finished run (metrics.json missing or not ok)")
    for key in ("config_hash", "data_fingerprint"):
        if a.get(key) != b.get(key):
            raise RerunError(f"{left} and {right}: different {key} ({a.get(key)} vs {b.get(key)}): not the same run")
    history_diff: dict[str, float] = {}
    for ha, hb in zip(a.get("history") or [], b.get("history") or []):
        for key, va in ha.items():
            if key in ("epoch", "epoch_time_s") or key not in hb or va is None or hb[key] is None:
                continue
            history_diff[key] = max(history_diff.get(key, 0.0), abs(float(va) - float(hb[key])))
    ranks = [pl.read_parquet(p / PER_USER_FILE).sort("user") for p in (left, right)]
    if ranks[0]["user"].to_list() != ranks[1]["user"].to_list():
        raise RerunError(f"{left} and {right}: the per-user test files hold different users")
    rank_equal = float((ranks[0]["rank"] == ranks[1]["rank"]).mean())
    metrics_diff = {f"{part}_{k}": abs(float(a[part][k]) - float(b[part][k]))
                    for part in ("valid", "test") for k in a[part] if k in b.get(part, {})}
    epochs = min(len(a.get("history") or []), len(b.get("history") or []))
    identical = (all(v == 0.0 for v in history_diff.values()) and all(v == 0.0 for v in metrics_diff.values())
                 and rank_equal == 1.0 and a.get("best_epoch") == b.get("best_epoch")
                 and a.get("epochs_trained") == b.get("epochs_trained"))
    return {"run": f"{a['dataset']}/{a['variant']}/seed{a['seed']}", "config_hash": a["config_hash"],
            "identical": identical, "epochs_compared": epochs,
            "epochs_trained": [a.get("epochs_trained"), b.get("epochs_trained")],
            "best_epoch": [a.get("best_epoch"), b.get("best_epoch")],
            "history_max_abs_diff": history_diff, "metrics_abs_diff": metrics_diff,
            "test_recall@10": [a["test"].get("recall@10"), b["test"].get("recall@10")],
            "per_user_rank_equal_fraction": rank_equal,
            "left": {k: a.get(k) for k in PROVENANCE}, "right": {k: b.get(k) for k in PROVENANCE}}


def _runs_root(path: Path, scratch: Path) -> Path:
    """A runs folder as given, or an archive unpacked into `scratch`."""
    if path.is_dir():
        return path
    if not path.is_file():
        raise RerunError(f"{path}: neither a runs folder nor an archive")
    try:
        unpack_archive(path, scratch)
    except ArchiveError as e:
        raise RerunError(str(e)) from None
    return scratch


def markdown(result: dict) -> str:
    lines = ["# Re-run check", "",
             f"Built {result['built_at']} at commit {result['commit'][:7]} by `{result['command']}`. Two trainings "
             f"of the same config on the same data (left: `{result['left']}`, right: `{result['right']}`); "
             "\"identical\" means every epoch's training loss and validation metrics, the best epoch, the "
             "test metrics and every test user's rank are equal.", "",
             "| run | identical | epochs | best epoch | largest loss diff | largest metric diff | test R@10 | "
             "users with equal rank | left (commit, device, date) | right |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["runs"]:
        loss = r["history_max_abs_diff"].get("train_loss")
        metric = max([*r["metrics_abs_diff"].values(),
                      *(v for k, v in r["history_max_abs_diff"].items() if k != "train_loss")], default=0.0)

        def side(p):
            return f"{(p['commit'] or '')[:7]}, {(p['device'] or '').removeprefix('cuda:')}, {p['created_at']}"
        lines.append(f"| {r['run']} | {'yes' if r['identical'] else 'no'} | {r['epochs_compared']} | "
                     f"{r['best_epoch'][0]} / {r['best_epoch'][1]} | {'' if loss is None else f'{loss:.3g}'} | "
                     f"{metric:.3g} | {r['test_recall@10'][0]:.4f} / {r['test_recall@10'][1]:.4f} | "
                     f"{100 * r['per_user_rank_equal_fraction']:.2f}% | {side(r['left'])} | {side(r['right'])} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("left", help="runs folder or archive (.tgz)")
    ap.add_argument("right", help="runs folder or archive (.tgz)")
    ap.add_argument("runs", nargs="+", metavar="RUN", help="dataset/variant/seedN")
    ap.add_argument("--out", help="write the result here (.json, and .md beside it)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            left = _runs_root(Path(args.left), Path(tmp) / "left")
            right = _runs_root(Path(args.right), Path(tmp) / "right")
            runs = [compare_run(left / r, right / r) for r in args.runs]
        except RerunError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    result = {"built_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "commit": git_commit(REPO_ROOT) or "unknown",
              "command": "python -m gbla.bench.rerun_check " + " ".join(argv if argv is not None else sys.argv[1:]),
              "left": args.left, "right": args.right, "runs": runs}
    text = markdown(result)
    print(text)
    if args.out:
        out = Path(args.out)
        atomic_write_json(out, result)
        atomic_write_text(out.with_suffix(".md"), text)
        print(f"-> {shown_path(out)} (+ .md)")
    return 0 if all(r["identical"] for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
