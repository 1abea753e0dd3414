"""The causal Conv1D + SiLU at the training step's shapes: the reference against the fused kernels
under each launch configuration, side by side in one run.

    python -m gbla.bench.conv_speed                      # GPU: every length, every configuration
    python -m gbla.bench.conv_speed --lengths 81         # one length
    python -m gbla.bench.conv_speed --configs default --kernels   # + each kernel's time (CUDA)
    python -m gbla.bench.conv_speed --smoke --out DIR    # tiny shapes, any device (writes the files)

The GBLA layer convolves its fused q/k/v projection: x (S, B, L, C) bf16 with S = 5 seeds x B = 256
rows, C = 3 x 6 heads x 64 = 1152 channels, one filter (C, 4) and bias per seed, right padding masked;
L = 13, 25, 41, 81 (the length buckets' cut and the longest history). The kernels' launch settings were
first tuned at L = 32768 (one long row, gbla.bench.layer_speed); here the rows are many and short, and
the row tiles are picked by length from this benchmark's sweep ("fwd-t32" and "bwd-t16" time the
L = 32768 tiles at every length). Each configuration sets the conv kernels' CONFIG_OVERRIDE
(fwd_block_t, fwd_block_c, fwd_num_warps; bwd_block_t, bwd_block_c, bwd_num_warps, fast_path, bwd_rows,
bwd_min_programs_per_sm) for its timing only; "default" is the kernels as they are. Passes: "fwd" and
"fwd+bwd" (gradients of x, weight and bias for a fixed output gradient; backward-only settings are
timed in it alone). Each timing is the median of --repeats
calls after --warmup: CUDA events around replays of a CUDA graph of the call (as the training step
runs), or eager calls on the CPU (--smoke: the Triton interpreter; the numbers say nothing about speed).

Every fwd+bwd row also says how far that configuration's gradients are from the reference's on the
same inputs (`rel_err_vs_torch`: the largest |difference| over dx, dw and dbias, each over the largest
|value| of the reference's): a configuration that is fast because it computes something else shows it.

Output: <out>/conv_speed.json (meta: device, commit, command, date, versions, shapes; rows rewritten
after every measurement) and conv_speed.md (per length and pass: each configuration's ms, its
speed-up over the default and over torch, and its gradients' error). With --kernels, also the device time per call of each
kernel in the fwd+bwd of each Triton configuration named at each length (torch profiler), which says
where a backward's time goes: its two kernels, the partial sums of the filter's gradient, or elsewhere.
"""
from __future__ import annotations

import argparse
import datetime as dt
import sys
from pathlib import Path

import torch

from gbla.bench.attention_speed import time_or_error
from gbla.ops.overrides import overridden
from gbla.common import REPO_ROOT, atomic_write_json, atomic_write_text, git_commit
from gbla.ops import causal_conv1d_silu

# name -> CONFIG_OVERRIDE of gbla.ops.conv.triton ("torch": the reference; "default": no override)
CONFIGS: dict[str, dict | None] = {
    "torch": None,
    "default": {},
    "fwd-t32": {"fwd_block_t": 32},
    "fwd-t16": {"fwd_block_t": 16},
    "fwd-t16-c256": {"fwd_block_t": 16, "fwd_block_c": 256},
    "fwd-t16-c64": {"fwd_block_t": 16, "fwd_block_c": 64},
    "fwd-t64-w8": {"fwd_block_t": 64, "fwd_num_warps": 8},
    "bwd-t8": {"bwd_block_t": 8},
    "bwd-t16": {"bwd_block_t": 16},
    "bwd-t32-w8": {"bwd_block_t": 32, "bwd_num_warps": 8},
    "bwd-c64": {"bwd_block_c": 64},
    "bwd-c256-w8": {"bwd_block_c": 256, "bwd_num_warps": 8},
    "bwd-general": {"fast_path": False},
    # several rows per program in the backward's first kernel (gbla.ops.conv.triton._rows_per_program:
    # the largest divisor of the rows per seed under the cap that leaves 8 programs per SM, or as set)
    "bwd-rows2": {"bwd_rows": 2},
    "bwd-rows4": {"bwd_rows": 4},
    "bwd-rows8": {"bwd_rows": 8},
    "bwd-rows16-min2": {"bwd_rows": 16, "bwd_min_programs_per_sm": 2},
    "bwd-rows8-t16": {"bwd_rows": 8, "bwd_block_t": 16},
}


def make_inputs(S: int, B: int, L: int, C: int, device, seed: int = 0) -> dict:
    g = torch.Generator(device="cpu").manual_seed(seed + L)
    x = torch.randn(S, B, L, C, generator=g).to(device, torch.bfloat16).requires_grad_()
    weight = (0.5 * torch.randn(S, C, 4, generator=g)).to(device).requires_grad_()
    bias = (0.1 * torch.randn(S, C, generator=g)).to(device).requires_grad_()
    lengths = torch.randint(1, L + 1, (S, B), generator=g)
    mask = (torch.arange(L)[None, None, :] < lengths[..., None]).to(device)
    grad_out = torch.randn(S, B, L, C, generator=g).to(device, torch.bfloat16)
    return {"x": x, "weight": weight, "bias": bias, "mask": mask, "grad_out": grad_out}


def fwd_bwd(t: dict, backend: str):
    """One forward and backward of the conv on make_inputs()' tensors: gradients of x, weight and bias."""
    y = causal_conv1d_silu(t["x"], t["weight"], t["bias"], t["mask"], backend=backend)
    return torch.autograd.grad(y, (t["x"], t["weight"], t["bias"]), t["grad_out"])


def relative_error(got, ref) -> float:
    """The largest |got - ref| of each pair of tensors over the largest |ref| of that pair (0 for a zero
    reference that is matched), the worst of the pairs."""
    worst = 0.0
    for g, r in zip(got, ref):
        diff, scale = (g.float() - r.float()).abs().max().item(), r.float().abs().max().item()
        worst = max(worst, diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf")))
    return worst


def measure(L: int, name: str, pass_: str, t: dict, args, device, reference=None) -> dict:
    """One configuration's timing; for fwd+bwd with `reference` (the torch gradients of the same
    inputs), also the relative error of its own gradients."""
    from gbla.ops.conv import triton as kernels

    override = CONFIGS[name]
    backend = "torch" if override is None else "triton"
    row = {"L": L, "config": name, "override": override, "pass": pass_,
           "mode": "graph" if device.type == "cuda" else "eager"}

    def fwd():
        with torch.no_grad():
            causal_conv1d_silu(t["x"], t["weight"], t["bias"], t["mask"], backend=backend)
    with overridden(kernels.CONFIG_OVERRIDE, override or {}):
        row.update(time_or_error(lambda: fwd if pass_ == "fwd" else (lambda: fwd_bwd(t, backend)),
                                 device.type == "cuda", args.warmup, args.repeats, device))
        if pass_ == "fwd+bwd" and reference is not None and row.get("median_ms") is not None:
            row["rel_err_vs_torch"] = relative_error(fwd_bwd(t, backend), reference)
    return row


def markdown(result: dict) -> str:
    meta = result["meta"]
    lines = [f"# Causal Conv1D + SiLU at the training shapes ({meta['device']})", "",
             f"`{meta['command']}` at {meta['commit'][:12]}, {meta['date']}; torch {meta['torch']}, "
             f"triton {meta['triton']}. x ({meta['S']}, {meta['B']}, L, {meta['C']}) bf16, filter 4, right "
             f"padding masked; median of {meta['repeats']} calls ({'CUDA-graph replays' if meta['device'] != 'cpu' else 'eager, interpreter'}). "
             "x default: the default configuration's time over this one's.", "",
             "rel. error: the gradients' largest difference from torch's, relative to their scale.", "",
             "| L | pass | config | override | ms | x default | x torch | rel. error |",
             "|---|---|---|---|---|---|---|---|"]
    by = {(r["L"], r["pass"], r["config"]): r.get("median_ms") for r in result["rows"]}
    for r in result["rows"]:
        ms = r.get("median_ms")
        base, ref = by.get((r["L"], r["pass"], "default")), by.get((r["L"], r["pass"], "torch"))
        err = r.get("rel_err_vs_torch")
        cells = [f"{ms:.4f}" if ms else f"error: {r.get('error', '')[:60]}",
                 f"{base / ms:.2f}x" if ms and base else "", f"{ref / ms:.2f}x" if ms and ref else "",
                 f"{err:.1e}" if err is not None else ""]
        override = "" if r["override"] is None else ", ".join(f"{k}={v}" for k, v in r["override"].items())
        lines.append(f"| {r['L']} | {r['pass']} | {r['config']} | {override} | " + " | ".join(cells) + " |")
    kernels = result.get("kernels")
    if kernels is not None:
        lines += ["", "## Kernels of each configuration's fwd+bwd (device time per call, torch profiler)", ""]
        if isinstance(kernels, str):
            lines.append(f"*{kernels}*")
        else:
            lines += ["| L | config | kernel | us per call |", "|---|---|---|---|"]
            lines += [f"| {L} | {config} | `{name}` | {us:.1f} |" for L, per_config in kernels.items()
                      for config, per in per_config.items() for name, us in per.items()]
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(REPO_ROOT / "outputs" / "bench"))
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (2 seeds x 2 rows, 24 channels), 1 repeat")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--batch", type=int, default=256, help="rows per seed")
    ap.add_argument("--channels", type=int, default=1152, help="C: 3 x heads x head_dim")
    ap.add_argument("--lengths", nargs="+", type=int, default=[13, 25, 41, 81])
    ap.add_argument("--configs", nargs="+", choices=list(CONFIGS), help="default: all")
    ap.add_argument("--warmup", type=int, help="calls before timing (default 10)")
    ap.add_argument("--repeats", type=int, help="timed calls, median taken (default 50)")
    ap.add_argument("--kernels", action="store_true",
                    help="also each kernel's device time in the fwd+bwd of each Triton configuration named, at "
                         "each length (CUDA only)")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.smoke:
        args.seeds, args.batch, args.channels = 2, 2, 24
        args.lengths = [L for L in args.lengths if L <= 13] or [5]
    args.warmup = args.warmup if args.warmup is not None else (0 if args.smoke else 10)
    args.repeats = args.repeats if args.repeats is not None else (1 if args.smoke else 50)
    names = args.configs or list(CONFIGS)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import triton
    meta = {"command": "python -m gbla.bench.conv_speed " + " ".join(argv if argv is not None else sys.argv[1:]),
            "commit": git_commit(), "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
            "triton": triton.__version__, "S": args.seeds, "B": args.batch, "C": args.channels,
            "lengths": args.lengths, "warmup": args.warmup, "repeats": args.repeats}
    result = {"meta": meta, "rows": []}
    if args.kernels:   # a string says why there is no breakdown
        result["kernels"] = {} if device.type == "cuda" else "the kernel breakdown needs CUDA (torch profiler)"
    for L in args.lengths:
        t = make_inputs(args.seeds, args.batch, L, args.channels, device)
        reference = fwd_bwd(t, "torch")
        for pass_ in ("fwd", "fwd+bwd"):
            for name in names:
                if pass_ == "fwd" and CONFIGS[name] and all(k.startswith(("bwd_", "fast_path")) for k in CONFIGS[name]):
                    continue   # a backward setting: the forward is the default's
                row = measure(L, name, pass_, t, args, device, reference)
                result["rows"].append(row)
                ms = f"{row['median_ms']:.4f} ms" if row["median_ms"] is not None else row["error"]
                print(f"L={L:3d} {pass_:7s} {name:14s} {ms}", flush=True)
                atomic_write_json(out / "conv_speed.json", result, indent=1)
        if isinstance(result.get("kernels"), dict):
            from gbla.bench.layer_speed import kernel_breakdown

            from gbla.ops.conv import triton as kernels

            for name in (n for n in names if CONFIGS[n] is not None):
                with overridden(kernels.CONFIG_OVERRIDE, CONFIGS[name]):
                    result["kernels"].setdefault(str(L), {})[name] = kernel_breakdown(lambda: fwd_bwd(t, "triton"))
            atomic_write_json(out / "conv_speed.json", result, indent=1)
        del t, reference
        if device.type == "cuda":
            torch.cuda.empty_cache()
    atomic_write_text(out / "conv_speed.md", markdown(result))
    print(markdown(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
