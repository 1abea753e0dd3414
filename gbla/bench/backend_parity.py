"""Training on the fused kernels against training on the reference ops, side by side: does a kernel
change what the model learns?

    python -m gbla.bench.backend_parity --variant sa-causal --seeds 0 1 --epochs 5 \\
        --settings torch auto auto:bwd_scheme=rows auto:conv.bwd_rows=8 --out outputs/bench

A setting is a kernel backend of TIGER (gbla.ops.backend: "torch" = the plain-PyTorch references,
"auto" / "triton" = the Triton kernels), optionally followed by ":key=value,..." overrides of the
kernels' launch configuration (gbla.ops.overrides: "conv.bwd_rows=8" for the conv's, a key without a
namespace for the short attention's, e.g. bwd_scheme=rows or q_block=32). Each setting trains the same seeds of one (dataset, variant)
as one group (gbla.train.train_group: the params profile's settings, max_epochs = --epochs, no early
stop), and the table gives, per epoch, the mean over seeds of the training loss and of the validation
Recall@10 next to the first setting's.

Dropout draws differ between backends (their own random streams), so the curves agree in
distribution, not to the bit. The check: every setting's validation Recall@10 at the last epoch is
within --tolerance (relative) of the first setting's, and its training loss within --loss-tolerance.
A kernel whose gradient is wrong trains a visibly worse model in a few epochs (the early epochs of a
Beauty run move Recall@10 by half its final value), which a per-op test with a tolerance can miss.

Output: <out>/backend_parity.json and .md (device, commit, command, date, data fingerprint).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import sys
from pathlib import Path

import numpy as np
import torch

from gbla.common import REPO_ROOT, atomic_write_json, atomic_write_text, git_commit
from gbla.params import load_grid
from gbla.datasets import load_processed_dataset
from gbla.ops.overrides import kernel_overrides, parse_overrides
from gbla.train import train_group


def parse_setting(text: str) -> tuple[str, dict]:
    """"auto:bwd_scheme=rows,conv.bwd_rows=8" -> ("auto", {"attention": {"bwd_scheme": "rows"},
    "conv": {"bwd_rows": 8}})."""
    backend, _, rest = text.partition(":")
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"setting {text!r}: backend must be auto, torch or triton, got {backend!r}")
    try:
        return backend, parse_overrides(rest)
    except ValueError as e:
        raise ValueError(f"setting {text!r}: {e}") from None


def train_setting(configs, data, setting: str, device: str) -> dict:
    """Train the group under one setting; per seed, its per-epoch history."""
    backend, override = parse_setting(setting)
    with kernel_overrides(override):
        group = train_group(configs, data, device=device, backend=backend, progress=False, log=lambda *_: None)
    return {"setting": setting, "backend": backend, "override": override, "wall_s": group.wall_time_s,
            "seeds": {str(r.config.seed): {"history": list(r.history), "test": r.test_metrics}
                      for r in group.results}}


def curves(row: dict) -> dict[str, np.ndarray]:
    """Per-epoch means over the seeds: train_loss and valid_recall@10 (epochs x 1)."""
    hist = [s["history"] for s in row["seeds"].values()]
    n = min(len(h) for h in hist)
    return {key: np.array([[h[e][key] for h in hist] for e in range(n)]).mean(axis=1)
            for key in ("train_loss", "valid_recall@10")}


def check(rows: list[dict], tolerance: float, loss_tolerance: float) -> list[dict]:
    """One verdict per setting after the first, at the last epoch they all reached."""
    ref = curves(rows[0])
    out = []
    for row in rows[1:]:
        c = curves(row)
        e = min(len(c["train_loss"]), len(ref["train_loss"])) - 1
        rel_recall = c["valid_recall@10"][e] / ref["valid_recall@10"][e] - 1
        rel_loss = c["train_loss"][e] / ref["train_loss"][e] - 1
        out.append({"setting": row["setting"], "against": rows[0]["setting"], "epoch": e + 1,
                    "valid_recall@10_rel": float(rel_recall), "train_loss_rel": float(rel_loss),
                    "ok": bool(abs(rel_recall) <= tolerance and abs(rel_loss) <= loss_tolerance)})
    return out


def short_commit(commit: str) -> str:
    return commit[:12] + ("-dirty" if commit.endswith("-dirty") else "")


def markdown(result: dict) -> str:
    meta, rows = result["meta"], result["rows"]
    lines = [f"# Training on each kernel setting, side by side ({meta['device']})", "",
             f"`{meta['command']}` at {short_commit(meta['commit'])}, {meta['date']}; {meta['dataset']} / {meta['variant']}, "
             f"seeds {', '.join(map(str, meta['seeds']))}, {meta['epochs']} epochs, data {meta['data_fingerprint']}.",
             "Per epoch: mean over seeds of the training loss and of the validation Recall@10.", ""]
    cs = [curves(r) for r in rows]
    head = "| epoch | " + " | ".join(f"{r['setting']} loss | {r['setting']} R@10" for r in rows) + " |"
    lines += [head, "|" + "---|" * (1 + 2 * len(rows))]
    for e in range(min(len(c["train_loss"]) for c in cs)):
        cells = [f"{c['train_loss'][e]:.4f} | {c['valid_recall@10'][e]:.4f}" for c in cs]
        lines.append(f"| {e + 1} | " + " | ".join(cells) + " |")
    lines += ["", f"Check (last epoch; |R@10 change| <= {meta['tolerance']:.0%}, "
                  f"|loss change| <= {meta['loss_tolerance']:.0%} of the first setting's):", ""]
    for v in result["checks"]:
        lines.append(f"- {v['setting']} vs {v['against']}, epoch {v['epoch']}: R@10 {v['valid_recall@10_rel']:+.1%}, "
                     f"loss {v['train_loss_rel']:+.1%}: {'ok' if v['ok'] else 'DIFFERS'}")
    wall = ", ".join(f"{r['setting']} {r['wall_s']:.0f} s" for r in rows)
    lines += ["", f"Wall time per setting (compilation and graph capture included): {wall}.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", default=str(REPO_ROOT / "params" / "ablations.yaml"))
    ap.add_argument("--profile-name", default="full", help="params profile whose settings are used")
    ap.add_argument("--dataset", default="beauty")
    ap.add_argument("--variant", default="sa-causal")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--settings", nargs="+", default=["torch", "auto"],
                    help="backend[:key=value,...] per setting; the first is the reference")
    ap.add_argument("--tolerance", type=float, default=0.10, help="relative, on the last epoch's valid Recall@10")
    ap.add_argument("--loss-tolerance", type=float, default=0.02, help="relative, on the last epoch's training loss")
    ap.add_argument("--processed-root", default=None)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default=str(REPO_ROOT / "outputs" / "bench"))
    args = ap.parse_args(argv)
    if len(args.settings) < 2:
        ap.error("--settings needs at least two settings to compare")
    for s in args.settings:
        parse_setting(s)  # a bad setting fails before any training
    grid = load_grid(args.params, args.profile_name)
    configs = [grid.run_config(args.dataset, args.variant, s) for s in args.seeds]
    # the settings' own epochs: no early stop, so every seed has every epoch's numbers
    configs = [dataclasses.replace(c, train=dataclasses.replace(c.train, max_epochs=args.epochs,
                                                                patience=args.epochs + 1)) for c in configs]
    data = load_processed_dataset(args.dataset, args.processed_root, synthetic=grid.synthetic)
    import triton
    dev_name = torch.cuda.get_device_name() if torch.cuda.is_available() and args.device != "cpu" else "cpu"
    meta = {"command": "python -m gbla.bench.backend_parity " + " ".join(argv if argv is not None else sys.argv[1:]),
            "commit": git_commit(), "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "device": dev_name, "torch": torch.__version__, "triton": triton.__version__, "dataset": args.dataset,
            "variant": args.variant, "seeds": args.seeds, "epochs": args.epochs, "tolerance": args.tolerance,
            "loss_tolerance": args.loss_tolerance, "data_fingerprint": data.provenance.get("fingerprint"),
            "config_hashes": [c.config_hash() for c in configs]}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"meta": meta, "rows": [], "checks": []}
    for setting in args.settings:
        row = train_setting(configs, data, setting, args.device)
        result["rows"].append(row)
        print(f"{setting}: {row['wall_s']:.0f} s, last valid R@10 "
              f"{curves(row)['valid_recall@10'][-1]:.4f}", flush=True)
    result["checks"] = check(result["rows"], args.tolerance, args.loss_tolerance)
    atomic_write_json(out / "backend_parity.json", result)
    atomic_write_text(out / "backend_parity.md", markdown(result))
    print(markdown(result), flush=True)
    return 0 if all(v["ok"] for v in result["checks"]) else 1


if __name__ == "__main__":
    sys.exit(main())
