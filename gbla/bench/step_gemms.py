"""The training step's matrix products, counted at their real shapes, against what they must cost.

Every GEMM of the multi-seed training step is a SeedLinear (attention projections, the GBLA layers'
key gate and output gate, the FFNs, the output head): a batched matmul over the seed axis, forward,
and backward the input's and the weight's gradient (three GEMMs of the same size per call). This
module runs the model's forward on batches of the encoder lengths a profile measured (on the CPU:
the shapes do not depend on the device), records each SeedLinear call's (S, rows, in, out) and adds
up, per step, the FLOPs and the bytes each GEMM must at least move (bf16 operands read once, the
output written once). With a GPU's peak matrix rate and its measured copy bandwidth that gives a floor
per GEMM (whichever of the two takes longer) and per step, to set beside a profile's measured
`aten::bmm` time: how far the seed-batched matmuls are from what they must cost.

    python -m gbla.bench.step_gemms --variant hybrid \
        --profile-file outputs/bench/train_profile_hybrid_k5_62dcac6.txt

The encoder lengths, the step count and the measured GEMM time come from the profile file (its header
and its aten::bmm / aten::baddbmm rows), or from --lengths and --measured-ms. Output:
<out>/step_gemms_<variant>.json and .md. The floors are arithmetic from the shapes and the two rates
given, not measurements; the defaults are the H100/H200 SXM datasheet's dense bf16 rate and the
device-to-device copy bandwidth measured on the H200 (outputs/bench/NOTES.md).
"""
from __future__ import annotations

import argparse
import datetime as dt
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from gbla.common import REPO_ROOT, atomic_write_json, atomic_write_text, git_commit
from gbla.datasets import load_processed_dataset
from gbla.layers import GEMM_ALIGN, SeedLinear
from gbla.model import TIGER
from gbla.params import load_grid
from gbla.train import length_bucket_groups, to_device_split

PEAK_BF16_FLOPS = 989e12        # H100 / H200 SXM datasheet, dense bf16 tensor-core rate
COPY_BYTES_PER_S = 4.20e12      # device-to-device copy measured on the H200 (outputs/bench/NOTES.md)
BF16_BYTES = 2
GEMMS_PER_CALL = 3              # forward, input gradient, weight gradient: each an (S, M, K, N) product


@dataclass(frozen=True)
class Gemm:
    """One SeedLinear call: S products of (rows x k) by (k x n) (n padded as the layer pads it)."""
    module: str
    seeds: int
    rows: int
    k: int
    n: int
    bias: bool = False   # a baddbmm forward (the backward's two products are bmm either way)

    @property
    def flops(self) -> float:
        return 2.0 * self.seeds * self.rows * self.k * self.n

    @property
    def bytes(self) -> float:
        """Each operand read once and the output written once, in bf16 (the same count for the forward
        and both gradients: each reads two of x, W, dY and writes the third's shape)."""
        return BF16_BYTES * self.seeds * (self.rows * self.k + self.k * self.n + self.rows * self.n)

    def floor_s(self, peak_flops: float, bytes_per_s: float) -> float:
        return max(self.flops / peak_flops, self.bytes / bytes_per_s)


def record_gemms(model: TIGER, enc_tokens: torch.Tensor, target_sids: torch.Tensor) -> list[Gemm]:
    """The SeedLinear calls of one forward of model.loss on this batch, in call order."""
    names = {m: name for name, m in model.named_modules() if isinstance(m, SeedLinear)}
    calls: list[Gemm] = []

    def hook(module, inputs, output):
        x = inputs[0]
        rows = x.numel() // (module.num_seeds * module.in_features)
        n = module.out_features + (-module.out_features % GEMM_ALIGN)
        calls.append(Gemm(names[module], module.num_seeds, rows, module.in_features, n, module.bias is not None))

    handles = [m.register_forward_hook(hook) for m in names]
    try:
        with torch.no_grad():
            model.loss(enc_tokens, target_sids)
    finally:
        for h in handles:
            h.remove()
    return calls


def step_table(gemms: list[Gemm], peak_flops: float, bytes_per_s: float) -> dict:
    """Per-step sums over one forward's calls, each counted GEMMS_PER_CALL times (forward and backward)."""
    return {"gemm_calls": GEMMS_PER_CALL * len(gemms),
            "gflop": GEMMS_PER_CALL * sum(g.flops for g in gemms) / 1e9,
            "mbytes": GEMMS_PER_CALL * sum(g.bytes for g in gemms) / 1e6,
            "floor_ms": GEMMS_PER_CALL * sum(g.floor_s(peak_flops, bytes_per_s) for g in gemms) * 1e3,
            "compute_bound_calls": GEMMS_PER_CALL * sum(g.flops / peak_flops >= g.bytes / bytes_per_s for g in gemms),
            # what a profile under autocast shows: each forward aten::bmm recorded twice (the autocast
            # wrapper's call and the inner one), the backward's two products once each
            "profiled_bmm_events": 2 * sum(not g.bias for g in gemms) + 2 * len(gemms)}


def role(module: str) -> str:
    """A SeedLinear's path in the model without its layer index: encoder.1.ffn.up -> "encoder ffn.up"."""
    return re.sub(r"^(\w+)\.\d+\.", r"\1 ", module)


def role_table(gemms: list[Gemm], peak_flops: float, bytes_per_s: float) -> dict[str, dict]:
    """step_table per role (role()), in call order."""
    by: dict[str, list[Gemm]] = {}
    for g in gemms:
        by.setdefault(role(g.module), []).append(g)
    return {r: step_table(gs, peak_flops, bytes_per_s) for r, gs in by.items()}


_HEADER = re.compile(r"^# (\d+) eager steps of (\d+) seeds x (\d+), encoder lengths \[([\d, ]+)\]")
_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def read_profile(path: Path) -> dict:
    """From a train_throughput kernel table: steps, seeds, batch per seed, the encoder lengths, and the
    GEMMs' measured time per step (the Self CUDA column of the aten::bmm and aten::baddbmm rows)."""
    lines = path.read_text().splitlines()
    match = next((m for m in map(_HEADER.match, lines) if m), None)
    if match is None:
        raise ValueError(f"{path}: no '# N eager steps of S seeds x B, encoder lengths [...]' header line")
    steps, seeds, batch = (int(match.group(i)) for i in (1, 2, 3))
    lengths = [int(v) for v in match.group(4).split(",")]
    header = next((line for line in lines if "Self CUDA" in line and "Name" in line), None)
    if header is None:
        raise ValueError(f"{path}: no kernel table header (a line naming 'Self CUDA')")
    columns = [c.strip() for c in re.split(r"\s{2,}", header.strip())]
    col = columns.index("Self CUDA")
    total_ms, calls = 0.0, {}
    for line in lines:
        cells = [c.strip() for c in re.split(r"\s{2,}", line.strip())]
        if cells and cells[0] in ("aten::bmm", "aten::baddbmm") and len(cells) == len(columns):
            value = re.fullmatch(r"([\d.]+)(us|ms|s)", cells[col])
            if value is None:
                raise ValueError(f"{path}: cannot read the time {cells[col]!r} of {cells[0]}")
            total_ms += float(value.group(1)) * _UNITS[value.group(2)]
            calls[cells[0]] = int(cells[-1]) / steps
    if not calls:
        raise ValueError(f"{path}: no aten::bmm or aten::baddbmm row")
    return {"steps": steps, "seeds": seeds, "batch_size_per_seed": batch, "encoder_lengths": lengths,
            "measured_ms_per_step": total_ms / steps, "measured_calls_per_step": calls}


def batch_of_length(groups, enc_len: int, seeds: int, batch: int) -> torch.Tensor:
    """Indices (seeds, batch) of training examples of one length bucket (the shapes are what matter)."""
    for length, idx in groups:
        if length == enc_len and idx.numel() >= seeds * batch:
            return idx[:seeds * batch].view(seeds, batch)
    raise ValueError(f"no length bucket of {enc_len} tokens with {seeds} x {batch} examples "
                     f"(buckets: {sorted({length for length, _ in groups})})")


def count(variant: str, lengths: list[int], seeds: int, *, params: str, profile: str, dataset: str,
          peak_flops: float, bytes_per_s: float) -> dict:
    grid = load_grid(params, profile)
    config = grid.run_config(dataset, variant, 0)   # the seeds share every setting; the shapes are what count
    tc = config.train
    data = load_processed_dataset(dataset, synthetic=grid.synthetic)
    model = TIGER(config.model, data.codebook_sizes, backend="torch", num_seeds=seeds)
    sids = torch.as_tensor(data.sids)
    train = to_device_split(data.train, model, sids, tc.max_history, torch.device("cpu"))
    groups = length_bucket_groups(train.enc_tokens, tc.length_buckets, tc.max_history, tc.batch_size)
    per_length = {}
    for enc_len in lengths:
        if enc_len not in per_length:
            idx = batch_of_length(groups, enc_len, seeds, tc.batch_size)
            gemms = record_gemms(model, train.enc_tokens[idx, :enc_len], train.target_sids[idx])
            per_length[enc_len] = {"table": step_table(gemms, peak_flops, bytes_per_s),
                                   "roles": role_table(gemms, peak_flops, bytes_per_s),
                                   "gemms": [g.__dict__ for g in gemms]}
    # means over the steps: a length that occurs twice among them counts twice
    mean = _mean([per_length[n]["table"] for n in lengths])
    roles = {r: _mean([per_length[n]["roles"][r] for n in lengths]) for r in per_length[lengths[0]]["roles"]}
    roles = dict(sorted(roles.items(), key=lambda kv: -kv[1]["floor_ms"]))
    return {"variant": variant, "dataset": dataset, "seeds": seeds, "batch_size_per_seed": tc.batch_size,
            "encoder_lengths": lengths, "per_step_mean": mean, "per_role_mean": roles, "per_length": per_length}


def _mean(rows: list[dict]) -> dict:
    return {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}


def markdown(result: dict) -> str:
    m, meta = result["per_step_mean"], result["meta"]
    lines = [f"# The training step's GEMMs against their floor ({result['dataset']}, {result['variant']})", "",
             f"Counted {meta['date']} at commit {meta['commit'][:7]} with `{meta['command']}`: every SeedLinear "
             f"call of the step at its real shape ({result['seeds']} seeds x {result['batch_size_per_seed']}), "
             f"forward and both gradients. Floor of a GEMM: the longer of its FLOPs at "
             f"{meta['peak_flops'] / 1e12:.0f} TFLOP/s and its bytes at {meta['bytes_per_s'] / 1e12:.2f} TB/s "
             "(arithmetic, not a measurement).", "",
             "| encoder length | GEMMs | GFLOP | MB moved | floor ms | compute-bound GEMMs |", "|---|---|---|---|---|---|"]
    for enc_len, row in sorted(result["per_length"].items()):
        t = row["table"]
        lines.append(f"| {enc_len} | {t['gemm_calls']} | {t['gflop']:.1f} | {t['mbytes']:.0f} | {t['floor_ms']:.3f} | "
                     f"{t['compute_bound_calls']} |")
    lines.append(f"| mean over {result['encoder_lengths']} | {m['gemm_calls']:.0f} | {m['gflop']:.1f} | "
                 f"{m['mbytes']:.0f} | {m['floor_ms']:.3f} | {m['compute_bound_calls']:.0f} |")
    lines += ["", "Per role (mean over the steps; a role's GEMMs across all its layers):", "",
              "| role | GEMMs | GFLOP | MB moved | floor ms | share of the floor |", "|---|---|---|---|---|---|"]
    for name, t in result["per_role_mean"].items():
        lines.append(f"| {name} | {t['gemm_calls']:.0f} | {t['gflop']:.1f} | {t['mbytes']:.0f} | {t['floor_ms']:.3f} | "
                     f"{100 * t['floor_ms'] / m['floor_ms']:.0f}% |")
    measured = result.get("measured")
    if measured:
        rows = " and ".join(f"`{name}`" for name in measured["measured_calls_per_step"]) or "the GEMMs"
        lines += ["", f"Measured in `{measured['source']}`: {measured['measured_ms_per_step']:.3f} ms of {rows} per step: "
                  f"**{measured['measured_ms_per_step'] / m['floor_ms']:.2f}x the floor** "
                  f"({m['gflop'] * 1e9 / (measured['measured_ms_per_step'] * 1e-3) / 1e12:.0f} TFLOP/s, "
                  f"{m['mbytes'] * 1e6 / (measured['measured_ms_per_step'] * 1e-3) / 1e12:.2f} TB/s achieved)."]
        bmm = measured["measured_calls_per_step"].get("aten::bmm")
        if bmm is not None:
            lines.append(f"Its `aten::bmm` events per step: {bmm:.0f}; these GEMMs under autocast give "
                         f"{m['profiled_bmm_events']:.0f} (a forward bmm is recorded twice, by the autocast "
                         "wrapper and the inner call; a baddbmm's, here the key gate's, is a row of its own).")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m gbla.bench.step_gemms", description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", default=str(REPO_ROOT / "params" / "ablations.yaml"))
    ap.add_argument("--profile-name", default="full", help="params profile whose settings are used")
    ap.add_argument("--dataset", default="beauty")
    ap.add_argument("--variant", default="hybrid")
    ap.add_argument("--seeds", type=int, help="seeds of the step (default: the profile file's, else 5)")
    ap.add_argument("--profile-file", help="a train_throughput kernel table: lengths, steps and measured GEMM time")
    ap.add_argument("--lengths", nargs="+", type=int, help="encoder lengths of the steps (without --profile-file)")
    ap.add_argument("--measured-ms", type=float, help="measured GEMM time per step (without --profile-file)")
    ap.add_argument("--peak-tflops", type=float, default=PEAK_BF16_FLOPS / 1e12)
    ap.add_argument("--bandwidth-tbps", type=float, default=COPY_BYTES_PER_S / 1e12)
    ap.add_argument("--out", default=str(REPO_ROOT / "outputs" / "bench"))
    args = ap.parse_args(argv)
    measured = None
    if args.profile_file:
        measured = read_profile(Path(args.profile_file))
        measured["source"] = args.profile_file
        lengths, seeds = measured["encoder_lengths"], args.seeds or measured["seeds"]
    elif args.lengths:
        lengths, seeds = args.lengths, args.seeds or 5
        if args.measured_ms is not None:
            measured = {"source": "--measured-ms", "measured_ms_per_step": args.measured_ms,
                        "measured_calls_per_step": {}}
    else:
        ap.error("give --profile-file or --lengths")
    peak, bandwidth = args.peak_tflops * 1e12, args.bandwidth_tbps * 1e12
    result = count(args.variant, lengths, seeds, params=args.params, profile=args.profile_name,
                   dataset=args.dataset, peak_flops=peak, bytes_per_s=bandwidth)
    result["measured"] = measured
    result["meta"] = {"commit": git_commit(), "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                      "command": shlex.join(["python", "-m", "gbla.bench.step_gemms",
                                             *(sys.argv[1:] if argv is None else argv)]),
                      "peak_flops": peak, "bytes_per_s": bandwidth}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"step_gemms_{args.variant}"
    atomic_write_json(out / f"{stem}.json", result)
    text = markdown(result)
    atomic_write_text(out / f"{stem}.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
