"""Training-speed benchmark of one TIGER run, and the runner of the GPU quality pilot.

    python -m gbla.bench.train_speed steps --out DIR        # ms/step per step mode and layout, eval time,
                                                            # padding waste
    python -m gbla.bench.train_speed run --variant sa --seed 0 --out DIR
                                                            # one full run (train to early stop + test)
    python -m gbla.bench.train_speed concurrency --procs 1,2,4,8 --epochs 2 --out DIR
                                                            # N processes on one GPU, fixed-epoch runs

Variants and settings are those of the params file (--params, profile --profile-name, default the
`full` profile of params/ablations.yaml): sa, hybrid, ... exactly as the grid trains them; flags such
as --batch-size or --max-epochs override the profile's train settings. Data:
default_processed_dir(dataset) (env GBLA_PROCESSED_DIR moves it).
Every result is a JSON file under --out, written to a temporary name and renamed. The commit is
gbla.common.git_commit's (env GBLA_COMMIT names it in a copy of the tree without .git).
Timings: CUDA-synchronised wall clock around whole steps / epochs / evaluations (what a run costs).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from gbla.common import atomic_write_json, git_commit
from gbla.config import RunConfig
from gbla.data.processed import default_processed_dir, load_processed
from gbla.evaluate import metrics_from_ranks, rank_targets, SIDTrie
from gbla.model import PAD, TIGER
from gbla.params import DEFAULT_PARAMS, load_grid
from gbla.train import (BUCKET_ORDER_SEED, TrainStep, epoch_batches, length_bucket_groups, to_device_split,
                        train_and_evaluate)


def parse_buckets(text: str | None):
    """'none' -> () (one bucket, the full encoder length), '3,6,10' -> (3, 6, 10), None -> default."""
    if text is None:
        return None
    return () if text == "none" else tuple(int(x) for x in text.split(","))


def sdpa_diagnostics(dev) -> dict:
    """Which SDPA backends accept the SA layer's call (bf16, float attn_mask that needs a gradient)."""
    out = {}
    if dev.type != "cuda":
        return out
    import warnings
    from torch.nn.attention import SDPBackend, sdpa_kernel
    q = torch.randn(256, 6, 81, 64, device=dev, dtype=torch.bfloat16, requires_grad=True)
    bias = torch.randn(256, 6, 81, 81, device=dev, dtype=torch.bfloat16, requires_grad=True)
    for name in ("EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "FLASH_ATTENTION"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                with sdpa_kernel(getattr(SDPBackend, name)):
                    y = torch.nn.functional.scaled_dot_product_attention(q, q, q, attn_mask=bias, dropout_p=0.1)
                    y.sum().backward()
                out[name] = "ok"
            except Exception as err:  # not eligible: record why
                out[name] = f"{type(err).__name__}: {err}"[:300] + " | " + " | ".join(str(w.message)[:200] for w in caught)
    return out


def run_config(args, variant: str, seed: int, **train) -> RunConfig:
    """The params file's config of (args.dataset, variant, seed), `train` overriding its train settings."""
    grid = load_grid(args.params, args.profile_name)
    return grid.run_config(args.dataset, variant, seed, train_overrides=train)


def meta(command: str) -> dict:
    info = {"commit": git_commit(), "command": command,
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "torch": torch.__version__}
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    info["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return info


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------------------------
# steps: per-step cost of each step mode, evaluation cost, padding waste
# ------------------------------------------------------------------------------------------------
def bench_steps(args) -> None:
    out = Path(args.out) / "train_steps.json"
    data = load_processed(default_processed_dir(args.dataset))
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    result = {"meta": meta(" ".join(sys.argv)), "rows": [], "eval": [], "padding": {},
              "sdpa_backends_for_sa_bias": sdpa_diagnostics(dev)}
    print(result["sdpa_backends_for_sa_bias"], flush=True)
    cases = [(v, b, m) for v in args.variants.split(",") for b in args.backends.split(",")
             for m in args.modes.split(",") if not (v == "sa" and b != args.backends.split(",")[0])]
    for variant, backend, mode in cases:
        cfg = run_config(args, variant, 0)
        torch.manual_seed(0)
        model = TIGER(cfg.model, data.codebook_sizes, backend=backend).to(dev)
        sids = torch.as_tensor(data.sids, device=dev)
        train = to_device_split(data.train, model, sids, cfg.train.max_history, dev)
        if not result["padding"]:
            real = (train.enc_tokens != PAD).float().mean().item()
            result["padding"] = {"encoder_len": train.enc_tokens.shape[1], "real_token_fraction": real,
                                 "padding_fraction": 1 - real,
                                 "mean_history_items": float(data.train.history_len.mean())}
        bs = args.batch_size or cfg.train.batch_size
        buckets = parse_buckets(args.length_buckets)
        buckets = cfg.train.length_buckets if buckets is None else buckets
        row = {"variant": variant, "backend": backend, "mode": mode, "batch_size": bs,
               "length_buckets": list(buckets)}
        try:
            step = TrainStep(model, train, cfg.train, mode, dev.type == "cuda")
            groups = length_bucket_groups(train.enc_tokens, buckets, cfg.train.max_history, bs)
            batches = epoch_batches(groups, bs, [torch.Generator().manual_seed(0)],
                                    torch.Generator().manual_seed(BUCKET_ORDER_SEED))
            row["steps_per_epoch"] = len(batches)
            row["encoder_lengths"] = {enc_len: len(idx) // bs for enc_len, idx in groups}
            # warm-up: every encoder length past its eager warm-up and capture (or compilation)
            seen: dict[int, int] = {}
            t0 = time.perf_counter()
            losses = []
            for enc_len, idx in batches:
                if seen.get(enc_len, 0) > TrainStep.WARMUP_STEPS:
                    continue
                seen[enc_len] = seen.get(enc_len, 0) + 1
                losses.append(step(idx, enc_len))
                if len(seen) == len(groups) and all(v > TrainStep.WARMUP_STEPS for v in seen.values()):
                    break
            sync()
            row["first_steps_s"] = time.perf_counter() - t0  # warm-up, capture or compilation
            row["first_losses"] = [float(l) for l in losses[:3]]
            t0 = time.perf_counter()
            total = torch.zeros((), device=dev)
            for i in range(args.steps):
                enc_len, idx = batches[i % len(batches)]
                total += step(idx, enc_len)
            sync()
            elapsed = time.perf_counter() - t0
            row.update(ms_per_step=1000 * elapsed / args.steps, examples_per_s=args.steps * bs / elapsed,
                       epoch_s_estimate=elapsed / args.steps * len(batches), loss=float(total) / args.steps)
            if args.profile and mode == "eager":
                row.update(profile_steps(step, batches, Path(args.out) / f"profile_{variant}_{backend}.txt"))
        except Exception as err:  # a failing mode is a result too (recorded, the others still run)
            row["error"] = f"{type(err).__name__}: {err}"[:500]
        print(row, flush=True)
        result["rows"].append(row)
        atomic_write_json(out, result)
        if mode == args.modes.split(",")[0] and backend == args.backends.split(",")[0]:
            # evaluation cost: one full validation pass (all users, beam search) per eval batch size
            valid = to_device_split(data.valid, model, sids, cfg.train.max_history, dev)
            trie = SIDTrie(data.sids, data.codebook_sizes, device=dev)
            for ebs in (1024, 4096):
                sync()
                t0 = time.perf_counter()
                ranks = rank_targets(model, valid.enc_tokens, valid.target, trie, beam_size=cfg.train.beam_size,
                                     batch_size=ebs, autocast=dev.type == "cuda")
                sync()
                erow = {"variant": variant, "eval_batch_size": ebs, "users": len(valid),
                        "beam_size": cfg.train.beam_size, "valid_eval_s": time.perf_counter() - t0,
                        "recall@10_after_warmup": metrics_from_ranks(ranks)["recall@10"]}
                print(erow, flush=True)
                result["eval"].append(erow)
                atomic_write_json(out, result)
        del model, step
        torch.cuda.empty_cache() if torch.cuda.is_available() else None


def profile_steps(step, batches, path: Path, n: int = 3) -> dict:
    """GPU kernels per eager training step, their summed device time, and a top-kernel table."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for i in range(n):
            step(batches[i][1], batches[i][0])
        sync()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy_us = sum(getattr(e, "device_time", None) or getattr(e, "cuda_time", 0) or 0 for e in kernels)
    table = ""
    for key in ("self_device_time_total", "self_cuda_time_total"):
        try:
            table = prof.key_averages().table(sort_by=key, row_limit=25)
            break
        except Exception:
            continue
    path.parent.mkdir(parents=True, exist_ok=True)   # --out may name a folder that does not exist yet
    path.write_text(table)
    print(table[:6000], flush=True)
    return {"kernels_per_step": len(kernels) / n, "kernel_busy_ms_per_step": busy_us / 1000 / n}


# ------------------------------------------------------------------------------------------------
# run: one full run (also the quality pilot)
# ------------------------------------------------------------------------------------------------
def full_run(args) -> dict:
    data = load_processed(default_processed_dir(args.dataset))
    train_kw = {}
    for key in ("max_epochs", "patience", "eval_every", "batch_size", "lr"):
        if getattr(args, key) is not None:
            train_kw[key] = getattr(args, key)
    if args.length_buckets is not None:
        train_kw["length_buckets"] = parse_buckets(args.length_buckets)
    cfg = run_config(args, args.variant, args.seed, **train_kw)
    t0 = time.perf_counter()
    res = train_and_evaluate(cfg, data, backend=args.backend, step_mode=args.step_mode,
                             progress=not args.no_progress, eval_batch_size=args.eval_batch_size,
                             time_limit_s=args.time_limit)
    wall = time.perf_counter() - t0
    record = {"meta": meta(" ".join(sys.argv)), "dataset": args.dataset, "variant": args.variant,
              "seed": args.seed, "backend": args.backend, "step_mode": args.step_mode,
              "config": cfg.to_dict(), "config_hash": res.config_hash, "data_fingerprint": data.provenance.get("fingerprint"),
              "device": res.device, "wall_time_s": res.wall_time_s, "process_wall_s": wall,
              "epochs_trained": res.epochs_trained, "best_epoch": res.best_epoch,
              "valid": res.valid_metrics, "test": res.test_metrics, "timings": res.timings,
              "history": res.history, "test_rank_counts": np.bincount(res.test_per_user["rank"], minlength=11).tolist()}
    name = args.name or f"run_{args.dataset}_{args.variant}_seed{args.seed}.json"
    atomic_write_json(Path(args.out) / name, record)
    print(json.dumps({k: record[k] for k in ("variant", "seed", "wall_time_s", "epochs_trained", "best_epoch",
                                             "valid", "test")}), flush=True)
    return record


# ------------------------------------------------------------------------------------------------
# concurrency: N processes sharing the GPU
# ------------------------------------------------------------------------------------------------
def concurrency(args) -> None:
    out = Path(args.out) / "concurrency.json"
    result = {"meta": meta(" ".join(sys.argv)), "epochs_per_run": args.epochs, "rows": []}
    for n in [int(x) for x in args.procs.split(",")]:
        tmp = Path(args.out) / f"conc{n}"
        t0 = time.perf_counter()
        procs = [subprocess.Popen([sys.executable, "-m", "gbla.bench.train_speed", "run", "--dataset", args.dataset,
                                   "--variant", args.variant, "--seed", str(i), "--max-epochs", str(args.epochs),
                                   "--eval-every", str(args.epochs), "--patience", "1000", "--no-progress",
                                   "--params", args.params, "--profile-name", args.profile_name,
                                   "--out", str(tmp), "--name", f"p{i}.json"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for i in range(n)]
        errors = [p.communicate()[1][-800:] for p in procs]
        wall = time.perf_counter() - t0
        runs = [json.loads((tmp / f"p{i}.json").read_text()) for i in range(n) if (tmp / f"p{i}.json").exists()]
        row = {"procs": n, "ok": len(runs), "wall_s": wall,
               "per_run_epoch_s": float(np.mean([r["timings"]["epoch_time_s"] for r in runs])) if runs else None,
               "per_run_wall_s": float(np.mean([r["wall_time_s"] for r in runs])) if runs else None,
               "aggregate_examples_per_s": float(sum(r["timings"]["examples_per_s"] for r in runs)) if runs else None,
               "errors": [e for e, p in zip(errors, procs) if p.returncode != 0]}
        print({k: v for k, v in row.items() if k != "errors"}, row["errors"][:1], flush=True)
        result["rows"].append(row)
        atomic_write_json(out, result)
        for f in tmp.glob("*.json"):
            f.unlink()
        tmp.rmdir()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    for name in ("steps", "run", "concurrency"):
        p = sub.add_parser(name)
        p.add_argument("--dataset", default="beauty")
        p.add_argument("--out", default="outputs/bench")
        p.add_argument("--params", default=str(DEFAULT_PARAMS), help="params file whose variants and settings are used")
        p.add_argument("--profile-name", default="full", help="profile of the params file")
    steps = sub.choices["steps"]
    steps.add_argument("--variants", default="sa,hybrid")
    steps.add_argument("--backends", default="auto,torch")
    steps.add_argument("--modes", default="eager,cuda_graph,compile")
    steps.add_argument("--steps", type=int, default=100)
    steps.add_argument("--batch-size", type=int, default=None)
    steps.add_argument("--profile", action="store_true", help="kernel count and top kernels of eager steps")
    for p in (steps, sub.choices["run"]):
        p.add_argument("--length-buckets", default=None, help="'none' or e.g. '3,6,10' (default: the config's)")
    run = sub.choices["run"]
    run.add_argument("--variant", default="sa", help="a variant of the params file")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--backend", default="auto")
    run.add_argument("--step-mode", default="auto")
    run.add_argument("--eval-batch-size", type=int, default=None)
    run.add_argument("--name", default=None)
    run.add_argument("--no-progress", action="store_true")
    run.add_argument("--time-limit", type=float, default=None, help="stop training after this many seconds")
    for key, typ in (("max-epochs", int), ("patience", int), ("eval-every", int), ("batch-size", int), ("lr", float)):
        run.add_argument(f"--{key}", type=typ, default=None)
    conc = sub.choices["concurrency"]
    conc.add_argument("--procs", default="1,2,4,8")
    conc.add_argument("--epochs", type=int, default=2)
    conc.add_argument("--variant", default="hybrid", help="a variant of the params file")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    {"steps": bench_steps, "run": full_run, "concurrency": concurrency}[args.cmd](args)


if __name__ == "__main__":
    main()
