"""Short softmax attention at the training step's shapes: the reference against the fused kernels
(each backward scheme, packed and unpacked inputs), side by side in one run.

    python -m gbla.bench.attention_speed                     # GPU: every case, eager and CUDA-graphed
    python -m gbla.bench.attention_speed --bwd-warps 1 2 4   # also the per_row backward at those warps
    python -m gbla.bench.attention_speed --cases encoder-L81 --q-blocks 16 32 64   # query blocks at L = 81
    python -m gbla.bench.attention_speed --smoke --out DIR   # tiny shapes, any device (writes the files)

Cases (bf16 inputs, N = 5 seeds x 256 rows, H = 6, E = 64, dropout 0.15 as the training step has on
every attention layer): encoder self-attention with relative bias and key padding at L = 13, 25, 41,
81; decoder causal self-attention with bias at L = 5; cross-attention of 5 queries over 81 keys with
key padding. A self-attention case's inputs are one (N, L, 3, H, E) tensor, as a layer's fused
projection gives them (cross-attention: q (N, Lq, H, E) and kv (N, Lk, 2, H, E)); "unpacked" passes
q, k, v as views of it (autograd then stacks their three gradients, as the layers did before the
packed entry points), "packed" passes the tensor itself (short_attention_qkv / short_attention_q_kv).
The bias is an (S, H, Lq, Lk) fp32 tensor that needs a gradient; each row pads a random number of
its first keys (at least one key stays).

Implementations: "torch" (the reference on bf16 inputs, as under autocast) and "triton-<scheme>-
<packing>" for each backward scheme (gbla.ops.attention.triton.BWD_SCHEMES) and packing, each row and
head as one whole tile (q_block forced to the tile: the kernels as they were before query blocks);
--bwd-warps adds "triton-per_row-packed-w<n>" rows (one tile, the backward's num_warps forced);
--q-blocks adds "triton-qtile<b>-packed" rows: the per_row scheme with blocks of b queries in the
forward's grid and the backward's loop, at every case (at L = 81 the default is b = 32; blocks at
least as tall as the tile are one tile). Passes: "fwd" (the forward
on inputs that need gradients, as in training) and "fwd+bwd" (forward, then the backward of a fixed
output gradient into the inputs and the bias). Each timing is the median of --repeats calls after
--warmup calls: CUDA events around each call, eager ("eager") and as replays of a CUDA graph of
the call ("graph", GPU only; the training step runs as a graph). On the CPU (--smoke: the Triton
interpreter, when TRITON_INTERPRET=1) the numbers say nothing about speed; the md names the device.

Output: <out>/attention_speed.json (meta: device, commit, command, date, versions, shapes; rows,
rewritten after every measurement) and attention_speed.md (per case, pass and mode: each
implementation's ms, its speed-up over "torch" and over "triton-rows-unpacked", the kernels and
layout before the per_row scheme and the packed entry points).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from gbla.bench.layer_speed import cuda_graph_replay
from gbla.common import REPO_ROOT, atomic_write_json, atomic_write_text, git_commit
from gbla.ops import short_attention, short_attention_q_kv, short_attention_qkv
from gbla.ops.overrides import overridden

BASELINE = "triton-rows-unpacked"
SCHEMES = ("per_row", "rows")
ONE_TILE = 128   # a q_block as tall as the largest tile: whole rows as one tile


@dataclass(frozen=True)
class Case:
    name: str
    Lq: int
    Lk: int
    cross: bool       # q and a packed kv (else one packed qkv, Lq == Lk)
    causal: bool
    bias: bool
    key_mask: bool
    dropout_p: float


def training_cases(p: float = 0.15) -> list[Case]:
    enc = [Case(f"encoder-L{L}", L, L, False, False, True, True, p) for L in (13, 25, 41, 81)]
    return enc + [Case("decoder-self-L5", 5, 5, False, True, True, False, p),
                  Case("cross-5x81", 5, 81, True, False, False, True, p)]


def smoke_cases(p: float = 0.15) -> list[Case]:
    return [Case("encoder-L13", 13, 13, False, False, True, True, p),
            Case("decoder-self-L5", 5, 5, False, True, True, False, p),
            Case("cross-5x13", 5, 13, True, False, False, True, p)]


@dataclass(frozen=True)
class Impl:
    name: str
    backend: str           # "torch" or "triton"
    scheme: str | None     # the backward scheme of the kernels
    packed: bool
    bwd_warps: int | None = None
    q_block: int | None = None   # queries per block (CONFIG_OVERRIDE["q_block"]); ONE_TILE: whole rows


def implementations(bwd_warps=(), q_blocks=()) -> list[Impl]:
    impls = [Impl("torch", "torch", None, False)]
    impls += [Impl(f"triton-{s}-{'packed' if p else 'unpacked'}", "triton", s, p, q_block=ONE_TILE)
              for s in SCHEMES for p in (False, True)]
    impls += [Impl(f"triton-per_row-packed-w{w}", "triton", "per_row", True, w, ONE_TILE) for w in bwd_warps]
    impls += [Impl(f"triton-qtile{b}-packed", "triton", "per_row", True, q_block=b) for b in q_blocks]
    return impls


def make_inputs(case: Case, S: int, B: int, H: int, E: int, dtype, device, seed: int = 0) -> dict:
    """Leaf tensors of one case (the packed projection(s), bias, key mask) and the output gradient."""
    g = torch.Generator().manual_seed(seed)
    N = S * B

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(device, dtype)

    t = {"packed": randn(N, case.Lk, 2 if case.cross else 3, H, E), "grad_out": randn(N, case.Lq, H, E)}
    if case.cross:
        t["q"] = randn(N, case.Lq, H, E)
    if case.bias:
        t["bias"] = torch.randn(S, H, case.Lq, case.Lk, generator=g).to(device)
    if case.key_mask:
        pad = torch.randint(0, case.Lk, (N,), generator=g)
        t["key_mask"] = (torch.arange(case.Lk)[None, :] >= pad[:, None]).to(device)
    return t


def attention_call(case: Case, impl: Impl, t: dict, S: int):
    """(fn, leaves): fn() runs the attention on leaves that need gradients and returns its output."""
    leaves = {k: t[k].detach().clone().requires_grad_() for k in ("packed", "q", "bias") if k in t}
    kw = dict(key_mask=t.get("key_mask"), causal=case.causal, bias=leaves.get("bias"), num_seeds=S,
              dropout_p=case.dropout_p, backend=impl.backend)
    packed = leaves["packed"]
    if impl.packed:
        if case.cross:
            return (lambda: short_attention_q_kv(leaves["q"], packed, **kw)), list(leaves.values())
        return (lambda: short_attention_qkv(packed, **kw)), list(leaves.values())
    if case.cross:
        return (lambda: short_attention(leaves["q"], *packed.unbind(2), **kw)), list(leaves.values())
    return (lambda: short_attention(*packed.unbind(2), **kw)), list(leaves.values())


def kernel_config(impl: Impl):
    """The kernels' CONFIG_OVERRIDE for `impl` (its backward scheme, warps, query block) while inside."""
    if impl.backend != "triton":
        return contextlib.nullcontext()
    from gbla.ops.attention import triton as kernels
    values = {"bwd_scheme": impl.scheme, "bwd_num_warps": impl.bwd_warps, "q_block": impl.q_block}
    return overridden(kernels.CONFIG_OVERRIDE, {k: v for k, v in values.items() if v is not None})


def median_ms(fn, warmup: int, repeats: int, device: torch.device) -> float:
    for _ in range(warmup):
        fn()
    if device.type != "cuda":
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in events)


def time_or_error(make_fn, graph: bool, warmup: int, repeats: int, device: torch.device) -> dict:
    """{"median_ms": t} for the call make_fn() builds (run once first: compilation; timed as replays of
    a CUDA graph of it when `graph`), or {"median_ms": None, "error": ...} when building or running it
    fails: an error row is a result too, and the benchmark's other rows still run."""
    try:
        fn = make_fn()
        fn()
        if graph:
            fn = cuda_graph_replay(fn)
        return {"median_ms": median_ms(fn, warmup, repeats, device)}
    except Exception as err:  # noqa: BLE001
        return {"median_ms": None, "error": f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"}


def measure(case: Case, impl: Impl, pass_: str, mode: str, t: dict, S: int, args, device) -> dict:
    row = {"case": case.name, "Lq": case.Lq, "Lk": case.Lk, "impl": impl.name, "scheme": impl.scheme,
           "packed": impl.packed, "bwd_warps": impl.bwd_warps, "q_block": impl.q_block, "pass": pass_, "mode": mode}

    def make_fn():
        attn, leaves = attention_call(case, impl, t, S)
        if pass_ == "fwd":
            return attn
        return lambda: torch.autograd.grad(attn(), leaves, t["grad_out"])
    with kernel_config(impl):
        row.update(time_or_error(make_fn, mode == "graph", args.warmup, args.repeats, device))
    return row


def markdown(result: dict) -> str:
    meta = result["meta"]
    lines = [f"# Short attention at the training shapes ({meta['device']})", "",
             f"`{meta['command']}` at {meta['commit'][:12]}, {meta['date']}; torch {meta['torch']}, "
             f"triton {meta['triton']}. N = {meta['N']} rows ({meta['num_seeds']} seeds), H = {meta['H']}, "
             f"E = {meta['E']}, {meta['dtype']}; median of {meta['repeats']} after {meta['warmup']} warm-up calls. "
             f"Default backward scheme: {meta['default_bwd_scheme']}.", ""]
    if meta["device"] == "cpu":
        lines += ["CPU run: these numbers say nothing about GPU speed (the kernels run in the Triton "
                  "interpreter, if at all).", ""]
    lines += [f"x torch, x {BASELINE}: that implementation's time over this row's (> 1: this row is faster).", "",
              "| case | pass | mode | impl | ms | x torch | x " + BASELINE + " |",
              "| --- | --- | --- | --- | ---: | ---: | ---: |"]
    rows = result["rows"]
    ref = {(r["case"], r["pass"], r["mode"], r["impl"]): r.get("median_ms") for r in rows}
    for r in rows:
        ms = r.get("median_ms")
        if ms is None:
            lines.append(f"| {r['case']} | {r['pass']} | {r['mode']} | {r['impl']} | error: "
                         f"{r.get('error', '')[:80].replace('|', '/')} | | |")
            continue
        ratios = []
        for other in ("torch", BASELINE):
            base = ref.get((r["case"], r["pass"], r["mode"], other))
            ratios.append("" if not base else f"{base / ms:.2f}")
        lines.append(f"| {r['case']} | {r['pass']} | {r['mode']} | {r['impl']} | {ms:.4f} | {ratios[0]} | "
                     f"{ratios[1]} |")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(REPO_ROOT / "outputs" / "bench"))
    ap.add_argument("--smoke", action="store_true",
                    help="tiny shapes (2 seeds x 2 rows, 1 head, E = 16), eager only, 0 warm-up calls and 1 "
                         "repeat unless given")
    ap.add_argument("--seeds", type=int, default=5, help="S (rows N = S x --batch)")
    ap.add_argument("--batch", type=int, default=256, help="rows per seed")
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--warmup", type=int, help="calls before timing (default 10)")
    ap.add_argument("--repeats", type=int, help="timed calls, median taken (default 50)")
    ap.add_argument("--modes", nargs="+", default=["eager", "graph"], choices=["eager", "graph"])
    ap.add_argument("--cases", nargs="+", help="case names to run (default: all)")
    ap.add_argument("--bwd-warps", nargs="+", type=int, default=[],
                    help="also time the per_row backward (packed) with each of these num_warps")
    ap.add_argument("--q-blocks", nargs="+", type=int, default=[32],
                    help="also time the per_row scheme (packed) with query blocks of each of these sizes "
                         "(powers of two >= 16; default 32, the kernels' default beyond 64 keys)")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.smoke:
        args.seeds, args.batch, args.heads, args.head_dim, args.modes = 2, 2, 1, 16, ["eager"]
    args.warmup = args.warmup if args.warmup is not None else (0 if args.smoke else 10)
    args.repeats = args.repeats if args.repeats is not None else (1 if args.smoke else 50)
    modes = [m for m in args.modes if m == "eager" or device.type == "cuda"]
    cases = smoke_cases() if args.smoke else training_cases()
    if args.cases:
        cases = [c for c in cases if c.name in args.cases]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        import triton
        from gbla.ops.attention.triton import DEFAULT_BWD_SCHEME
        triton_version, default_scheme = triton.__version__, DEFAULT_BWD_SCHEME
    except ImportError:
        triton_version, default_scheme = None, None
    S, B, H, E = args.seeds, args.batch, args.heads, args.head_dim
    meta = {"command": "python -m gbla.bench.attention_speed " + " ".join(argv if argv is not None else sys.argv[1:]),
            "commit": git_commit(), "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
            "triton": triton_version, "default_bwd_scheme": default_scheme, "num_seeds": S, "N": S * B, "H": H,
            "E": E, "dtype": "bfloat16", "warmup": args.warmup, "repeats": args.repeats, "modes": modes,
            "cases": [asdict(c) for c in cases]}
    result = {"meta": meta, "rows": []}
    impls = implementations(args.bwd_warps, args.q_blocks)
    for case in cases:
        t = make_inputs(case, S, B, H, E, torch.bfloat16, device)
        for pass_ in ("fwd", "fwd+bwd"):
            for mode in modes:
                for impl in impls:
                    row = measure(case, impl, pass_, mode, t, S, args, device)
                    result["rows"].append(row)
                    ms = f"{row['median_ms']:.4f} ms" if row["median_ms"] is not None else row["error"]
                    print(f"{case.name:16s} {pass_:7s} {mode:5s} {impl.name:28s} {ms}", flush=True)
                    atomic_write_json(out / "attention_speed.json", result, indent=1)
        if device.type == "cuda":
            del t
            torch.cuda.empty_cache()
    atomic_write_text(out / "attention_speed.md", markdown(result))
    print(markdown(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
