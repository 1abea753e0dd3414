"""Long-history speed benchmark: SA (each SDPA backend) vs GBLA (torch, torch.compile, Triton).

    python -m gbla.bench.layer_speed                 # everything (GPU): core roofline, layers, encoders
    python -m gbla.bench.layer_speed --plot-only     # re-render table + plots from the JSON

Layer level: bf16, D=512, H=8, E=64, B*L = 32768 tokens (B = 1 at L = 65536), same input for every
implementation; "fwd" is inference (torch.no_grad), "fwd+bwd" is forward + backward of a random
output gradient. Medians of CUDA-event timings after warm-up (triton.testing.do_bench, which also
flushes L2 between repetitions). Peak memory = torch.cuda.max_memory_allocated during one call
(inputs and weights included).
Core roofline: the Triton forward of the GBLA core alone (q, k, v, z read once, o written once) in
bytes/s against a device-to-device copy measured in the same run (bytes read + written).
Encoder level: pre-norm residual blocks (gbla.model.EncoderBlock: RMSNorm, mixing layer, ReLU FFN
d_ff = 4 D) stacked by layout, forward latency. SA layers here have no relative-position bias (it
would need an L x L bias, which SDPA's fast kernels cannot take), so SDPA picks its fastest kernel.
Results: outputs/bench/layer_speed.json (rows + meta), layer_speed.md, layer_speed.png,
encoder_speed.png. The JSON is rewritten (temp file + rename) after every measurement, so a run cut
short keeps what it measured.
"""
from __future__ import annotations

import argparse
import datetime as dt
import platform
import sys
import time
from pathlib import Path

import torch

from gbla.bench.latency import render
from gbla.common import atomic_write_json, git_commit

D_MODEL, HEADS, HEAD_DIM, TOKENS = 512, 8, 64, 32768
LENGTHS = (1024, 4096, 16384, 32768, 65536)
SDPA_IMPLS = {"sa-flash": "FLASH_ATTENTION", "sa-cudnn": "CUDNN_ATTENTION", "sa-efficient": "EFFICIENT_ATTENTION"}
GRAPH_IMPLS = ("sa-flash", "sa-cudnn", "gbla-triton")  # also timed as CUDA-graph replays (GPU time only)
ENCODER_LAYOUTS = {  # "enc4-fork" = sa, gbla, gbla, sa (the fork's hybrid)
    "enc4-sa": ["sa"] * 4,
    "enc4-1:1": ["sa", "gbla"] * 2,
    "enc4-fork": ["sa", "gbla", "gbla", "sa"],
    "enc4-gbla": ["gbla"] * 4,
    "enc6-sa": ["sa"] * 6,
    "enc6-1:1": ["sa", "gbla"] * 3,
    "enc6-1:2": ["sa", "gbla", "gbla"] * 2,
    "enc6-gbla": ["gbla"] * 6,
}


# ------------------------------------------------------------------------------------------------
# results file
# ------------------------------------------------------------------------------------------------
class Results:
    def __init__(self, path: Path, meta: dict):
        self.path, self.meta, self.rows = path, meta, []

    def add(self, **row):
        row.setdefault("peak_mem_mib", None)
        row.setdefault("error", None)
        self.rows.append(row)
        ms = f"{row['median_ms']:.4f} ms" if row.get("median_ms") is not None else row["error"]
        print(f"  {row['level']:7s} {row['impl']:28s} L={row['L']:6d} B={row['B']:3d} {row['pass']:8s} {ms}"
              + (f"  peak {row['peak_mem_mib']:.0f} MiB" if row["peak_mem_mib"] else ""), flush=True)
        self.save()

    def save(self):
        atomic_write_json(self.path, {"meta": self.meta, "rows": self.rows}, indent=1)


# ------------------------------------------------------------------------------------------------
# timing helpers
# ------------------------------------------------------------------------------------------------
def bench_ms(fn, rep_ms=200):
    import triton.testing
    return float(triton.testing.do_bench(fn, warmup=50, rep=rep_ms, return_mode="median"))


def peak_mib(fn) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**20


def cuda_graph_replay(fn):
    """Capture fn (after warm-up on a side stream, as torch.cuda.graph requires) and return the replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def host_ms(fn, n=30) -> float:
    """CPU time to issue one call (no synchronization inside the loop): when this exceeds the GPU
    time, eager timings measure the launch path, not the kernels."""
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    elapsed = (time.perf_counter() - t) / n
    torch.cuda.synchronize()
    return elapsed * 1e3


def measure(results: Results, level, impl, L, B, pass_, fn, context=None, graph=False):
    """Time fn (inside `context()` if given); record an error row instead of raising."""
    import contextlib
    ctx = context or contextlib.nullcontext
    try:
        with ctx():
            fn()  # first call: compilation, autotuning, cuDNN plans
            torch.cuda.synchronize()
            if graph:
                fn = cuda_graph_replay(fn)
            mem = None if graph else peak_mib(fn)
            ms = bench_ms(fn)
            host = host_ms(fn)
        results.add(level=level, impl=impl + ("+graph" if graph else ""), L=L, B=B, **{"pass": pass_},
                    median_ms=ms, peak_mem_mib=mem, host_ms=host)
    except Exception as err:  # noqa: BLE001 - recorded, the benchmark goes on
        msg = f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"
        results.add(level=level, impl=impl + ("+graph" if graph else ""), L=L, B=B, **{"pass": pass_},
                    median_ms=None, error=msg)
    finally:
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------
# sections
# ------------------------------------------------------------------------------------------------
def copy_bandwidth() -> dict:
    n = 2**29  # 1 GiB of bf16 each way
    src = torch.randn(n // 2, device="cuda").to(torch.bfloat16).repeat(2)
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src), rep_ms=300)
    del src, dst
    torch.cuda.empty_cache()
    return {"bytes": 2 * n * 2, "median_ms": ms, "bytes_per_s": 2 * n * 2 / (ms * 1e-3)}


def core_inputs(B, L, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    shape = (B, L, HEADS, HEAD_DIM)
    q, k, v, z = (torch.randn(shape, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(4))
    lw = torch.nn.functional.logsigmoid(torch.randn(B, L, HEADS, device="cuda", generator=g))
    nw = torch.ones(HEAD_DIM, device="cuda") + 0.1 * torch.randn(HEAD_DIM, device="cuda", generator=g)
    return q, k, v, z, lw, nw


def core_section(meta: dict, lengths, sweep: bool):
    """Roofline of the fused core at the layer benchmark's sizes, a launch-parameter sweep at
    L = 32768, and a per-kernel time breakdown from the profiler."""
    from gbla.ops import gbla_attention
    from gbla.ops.gbla import triton as gbla_kernels  # its launch tables (CONFIG_OVERRIDE) for the sweep

    copy = copy_bandwidth()
    meta["copy_bandwidth"] = copy
    print(f"device-to-device copy: {copy['bytes_per_s'] / 1e12:.3f} TB/s (read + write)", flush=True)
    core = {}

    def op_fns(B, L):
        q, k, v, z, lw, nw = core_inputs(B, L)
        leaves = [t.requires_grad_() for t in (q, k, v, z, lw, nw)]
        dy = torch.randn_like(q)
        kw = dict(key_log_weight=lw, z=z, norm_weight=nw, normalization="rmsnorm_gated")

        def fwd():
            with torch.no_grad():
                return gbla_attention(q, k, v, backend="triton", **kw)

        def fwd_bwd():
            torch.autograd.backward(gbla_attention(q, k, v, backend="triton", **kw), dy)
            for t in leaves:
                t.grad = None

        n = q.numel()
        fwd_bytes = 5 * n * 2 + lw.numel() * 4                 # q, k, v, z, o (bf16) + key weights
        bwd_bytes = fwd_bytes + (5 * n * 2 + 2 * lw.numel() * 4)  # + q,k,v,z,dy read, dq..dz, dlw
        return fwd, fwd_bwd, fwd_bytes, bwd_bytes, (q, k, v, kw)

    # accuracy at scale: Triton core vs the fp32 torch reference on the same bf16 inputs
    fwd, fwd_bwd, _, _, (q, k, v, kw) = op_fns(1, 32768)
    ref = gbla_attention(q.detach(), k.detach(), v.detach(), backend="torch",
                         **{n: t.detach() if torch.is_tensor(t) else t for n, t in kw.items()})
    out = fwd()
    meta["core_rel_err_L32768"] = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    del ref, out

    if sweep:
        # per kernel: vary that kernel's launch parameters with the others at their defaults; the
        # forward kernels are judged by the graphed forward, the backward ones by the graphed
        # forward+backward, at L = 32768 (B = 1, the headline size)
        results = []
        base = dict(gbla_kernels.CONFIG_OVERRIDE)
        candidates = [dict(block_l=bl, num_warps=w, num_stages=st, programs_per_sm=p)
                      for bl, w, st, p in ((64, 4, 2, 4), (64, 4, 3, 4), (64, 4, 4, 4), (128, 4, 2, 4), (128, 8, 2, 4),
                                           (128, 8, 3, 4), (32, 4, 3, 4), (64, 8, 2, 4), (64, 4, 2, 2), (64, 4, 2, 8),
                                           (128, 4, 3, 2), (64, 4, 3, 8), (32, 4, 2, 8))]
        fwd, fwd_bwd, fb, bb, _ = op_fns(1, 32768)
        chosen = {}
        for kernel in gbla_kernels.KERNELS:
            best = (float("inf"), None)
            for cand in candidates:
                gbla_kernels.CONFIG_OVERRIDE.clear()
                gbla_kernels.CONFIG_OVERRIDE.update({**base, **{k: {**v} for k, v in chosen.items()}, kernel: cand})
                fn = fwd if kernel in ("state", "output") else fwd_bwd
                try:
                    fwd_bwd()
                    ms = bench_ms(cuda_graph_replay(fn), 100)
                    results.append(dict(kernel=kernel, **cand, graph_ms=ms, judged_by="fwd" if fn is fwd else "fwd+bwd"))
                    best = min(best, (ms, len(results) - 1))
                except Exception as err:  # noqa: BLE001
                    results.append(dict(kernel=kernel, **cand, error=f"{type(err).__name__}: {str(err)[:200]}"))
                print("  sweep", results[-1], flush=True)
            chosen[kernel] = {k: v for k, v in results[best[1]].items() if k in candidates[0]}
        meta["chosen_config"] = chosen
        print("  chosen per kernel (lowest graphed time at L = 32768):", chosen, flush=True)
        gbla_kernels.CONFIG_OVERRIDE.clear()
        gbla_kernels.CONFIG_OVERRIDE.update({**base, **chosen})
        meta["core_sweep"] = results

    meta["launch_config_L32768"] = gbla_kernels.launch_config(1, 32768, HEADS, HEAD_DIM, torch.device("cuda"))
    for L in lengths:
        B = max(1, TOKENS // L)
        fwd, fwd_bwd, fb, bb, _ = op_fns(B, L)
        fwd_bwd()
        tf, tf2, tb = bench_ms(fwd), bench_ms(fwd), bench_ms(fwd_bwd)
        gf, gb = bench_ms(cuda_graph_replay(fwd)), bench_ms(cuda_graph_replay(fwd_bwd))
        core[str(L)] = dict(B=B, fwd_ms=tf, fwd_ms_repeat=tf2, fwd_bwd_ms=tb, fwd_bytes=fb, fwd_bwd_bytes=bb,
                            graph_fwd_ms=gf, graph_fwd_bwd_ms=gb, host_fwd_ms=host_ms(fwd), host_fwd_bwd_ms=host_ms(fwd_bwd),
                            graph_fwd_frac_of_copy=fb / (gf * 1e-3) / copy["bytes_per_s"],
                            graph_fwd_bwd_frac_of_copy=bb / (gb * 1e-3) / copy["bytes_per_s"],
                            fwd_bytes_per_s=fb / (tf * 1e-3), fwd_frac_of_copy=fb / (tf * 1e-3) / copy["bytes_per_s"],
                            fwd_bwd_frac_of_copy=bb / (tb * 1e-3) / copy["bytes_per_s"])
        print(f"  core L={L}: fwd {tf * 1e3:.1f} us ({core[str(L)]['fwd_frac_of_copy']:.2%} of copy), "
              f"fwd+bwd {tb * 1e3:.1f} us ({core[str(L)]['fwd_bwd_frac_of_copy']:.2%}); graph: fwd {gf * 1e3:.1f} us "
              f"({core[str(L)]['graph_fwd_frac_of_copy']:.2%}), fwd+bwd {gb * 1e3:.1f} us; host issue "
              f"{core[str(L)]['host_fwd_ms'] * 1e3:.0f} / {core[str(L)]['host_fwd_bwd_ms'] * 1e3:.0f} us", flush=True)
        if L == 32768:
            core[str(L)]["kernels_us"] = kernel_breakdown(fwd_bwd)
    meta["core"] = core


def kernel_breakdown(fn, iters=20) -> dict:
    """Mean device time per call of each kernel, from the torch profiler."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    out = {}
    for evt in prof.key_averages():
        t = getattr(evt, "device_time_total", None) or getattr(evt, "cuda_time_total", 0)
        if t:
            out[evt.key[:80]] = t / iters
    return dict(sorted(out.items(), key=lambda kv: -kv[1])[:15])


def conv_section(meta: dict, sweep: bool = False):
    """Triton fused conv+SiLU vs the torch reference on the layer's qkv tensor (B*L = 32768, C = 3 D);
    with sweep, first the backward's variants side by side (graphed fwd+bwd at L = 32768), keeping
    the fastest for the rest of the run."""
    from functools import partial

    from gbla.ops import causal_conv1d_silu
    from gbla.ops.conv import triton as conv_kernels  # its launch table (CONFIG_OVERRIDE) for the sweep
    causal_conv1d_silu_reference = partial(causal_conv1d_silu, backend="torch")
    causal_conv1d_silu_triton = partial(causal_conv1d_silu, backend="triton")
    out = {}
    if sweep:
        x = torch.randn(1, TOKENS, 3 * D_MODEL, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        w = torch.randn(3 * D_MODEL, 4, device="cuda", requires_grad=True)
        b = torch.randn(3 * D_MODEL, device="cuda", requires_grad=True)
        dy = torch.randn_like(x)

        def conv_fwd_bwd():
            torch.autograd.backward(causal_conv1d_silu_triton(x, w, b), dy)
            x.grad = w.grad = b.grad = None
        rows = []
        for fast, bt, nw in ((False, 32, 4), (False, 16, 8), (True, 16, 8), (True, 32, 8), (True, 16, 4), (True, 32, 4)):
            conv_kernels.CONFIG_OVERRIDE.clear()
            conv_kernels.CONFIG_OVERRIDE.update(fast_path=fast, bwd_block_t=bt, bwd_num_warps=nw)
            conv_fwd_bwd()
            rows.append(dict(fast_path=fast, bwd_block_t=bt, bwd_num_warps=nw,
                             graph_fwd_bwd_ms=bench_ms(cuda_graph_replay(conv_fwd_bwd))))
            print("  conv sweep", rows[-1], flush=True)
        best = min(rows, key=lambda r: r["graph_fwd_bwd_ms"])
        conv_kernels.CONFIG_OVERRIDE.clear()
        conv_kernels.CONFIG_OVERRIDE.update({k: best[k] for k in ("fast_path", "bwd_block_t", "bwd_num_warps")})
        meta["conv_sweep"], meta["conv_chosen"] = rows, dict(conv_kernels.CONFIG_OVERRIDE)
        del x, w, b, dy
    for L in (1024, 32768):
        B = TOKENS // L
        x = torch.randn(B, L, 3 * D_MODEL, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        w = torch.randn(3 * D_MODEL, 4, device="cuda", requires_grad=True)
        b = torch.randn(3 * D_MODEL, device="cuda", requires_grad=True)
        dy = torch.randn_like(x)
        with torch.no_grad():  # no autograd graph kept alive: it would break the graph capture below
            ref = causal_conv1d_silu_reference(x, w, b)
            got = causal_conv1d_silu_triton(x, w, b)
        row = {"rel_err": ((got.float() - ref.float()).norm() / ref.float().norm()).item()}
        del ref, got
        for name, f in (("torch", causal_conv1d_silu_reference), ("triton", causal_conv1d_silu_triton)):
            def fwd(f=f):
                with torch.no_grad():
                    f(x, w, b)

            def fwd_bwd(f=f):
                torch.autograd.backward(f(x, w, b), dy)
                x.grad = w.grad = b.grad = None
            fwd_bwd()
            row[f"{name}_fwd_ms"], row[f"{name}_fwd_bwd_ms"] = bench_ms(fwd), bench_ms(fwd_bwd)
        # graphed Triton conv: GPU time only (the eager numbers include the host's launch cost); the
        # reference is left eager
        row["triton_graph_fwd_ms"] = bench_ms(cuda_graph_replay(fwd))
        row["triton_graph_fwd_bwd_ms"] = bench_ms(cuda_graph_replay(fwd_bwd))
        row["fwd_bytes"] = 2 * x.numel() * 2
        row["triton_fwd_frac_of_copy"] = row["fwd_bytes"] / (row["triton_fwd_ms"] * 1e-3) / meta["copy_bandwidth"]["bytes_per_s"]
        out[str(L)] = row
        print(f"  conv L={L}: {row}", flush=True)
    meta["conv"] = out


def layer_section(results: Results, lengths, impls):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from gbla.config import GBLAOptions
    from gbla.layers import GBLALayer, SelfAttentionLayer

    checks = {}
    torch.manual_seed(1)
    sa = SelfAttentionLayer(D_MODEL, HEADS, HEAD_DIM, relative_bias=False).cuda().to(torch.bfloat16)
    torch.manual_seed(2)
    gbla = {b: GBLALayer(D_MODEL, HEADS, HEAD_DIM, GBLAOptions(), backend=b) for b in ("torch", "triton")}
    gbla["triton"].load_state_dict(gbla["torch"].state_dict())
    for m in gbla.values():
        m.cuda().to(torch.bfloat16)
    layers = {**{impl: sa for impl in SDPA_IMPLS}, "gbla-torch": gbla["torch"],
              "gbla-torch-compile": torch.compile(gbla["torch"]), "gbla-triton": gbla["triton"]}
    for L in lengths:
        B = max(1, TOKENS // L)
        torch.manual_seed(0)
        x = torch.randn(B, L, D_MODEL, device="cuda", dtype=torch.bfloat16)
        dy = torch.randn_like(x)
        xg = x.clone().requires_grad_()
        with torch.no_grad():
            ref, got = gbla["torch"](x).float(), gbla["triton"](x).float()
            checks[str(L)] = ((got - ref).norm() / ref.norm()).item()
        del ref, got
        for impl in impls:
            layer = layers[impl]
            context = (lambda b=SDPA_IMPLS[impl]: sdpa_kernel(getattr(SDPBackend, b))) if impl in SDPA_IMPLS else None

            def fwd(layer=layer):
                with torch.no_grad():
                    layer(x)

            def fwd_bwd(layer=layer):
                torch.autograd.backward(layer(xg), dy)
                xg.grad = None
                for p in layer.parameters():
                    p.grad = None
            measure(results, "layer", impl, L, B, "fwd", fwd, context)
            measure(results, "layer", impl, L, B, "fwd+bwd", fwd_bwd, context)
            if impl in GRAPH_IMPLS:
                measure(results, "layer", impl, L, B, "fwd", fwd, context, graph=True)
                measure(results, "layer", impl, L, B, "fwd+bwd", fwd_bwd, context, graph=True)
        torch.cuda.empty_cache()
    results.meta["layer_gbla_triton_vs_torch_rel_err"] = checks


def encoder_section(results: Results, lengths, layouts):
    from gbla.config import ModelConfig
    from gbla.layers import SelfAttentionLayer
    from gbla.model import EncoderBlock

    cfg = ModelConfig(d_model=D_MODEL, num_heads=HEADS, head_dim=HEAD_DIM, d_ff=4 * D_MODEL, dropout=0.0)
    for name in layouts:
        torch.manual_seed(0)
        blocks = []
        for t in ENCODER_LAYOUTS[name]:
            block = EncoderBlock(t, cfg, backend="auto")
            if t == "sa":
                block.mix = SelfAttentionLayer(D_MODEL, HEADS, HEAD_DIM, relative_bias=False)
            blocks.append(block)
        encoder = torch.nn.ModuleList(blocks).cuda().to(torch.bfloat16).eval()
        for L in lengths:
            B = max(1, TOKENS // L)
            x = torch.randn(B, L, D_MODEL, device="cuda", dtype=torch.bfloat16)

            def fwd():
                with torch.no_grad():
                    h = x
                    for blk in encoder:
                        h = blk(h, None)
                    return h
            measure(results, "encoder", name, L, B, "fwd", fwd)
        del encoder
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="outputs/bench/layer_speed.json")
    ap.add_argument("--lengths", default=",".join(map(str, LENGTHS)))
    ap.add_argument("--sections", default="core,conv,layer,encoder")
    ap.add_argument("--impls", default="sa-flash,sa-cudnn,sa-efficient,gbla-torch,gbla-torch-compile,gbla-triton")
    ap.add_argument("--layouts", default=",".join(ENCODER_LAYOUTS))
    ap.add_argument("--sweep", action="store_true", help="sweep the core kernel's launch parameters")
    ap.add_argument("--sweep-conv", action="store_true", help="compare the conv backward's variants first")
    ap.add_argument("--commit", default=None, help="commit hash (when the tree is a copy without .git)")
    ap.add_argument("--plot-only", action="store_true")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if args.plot_only:
        render(out)
        return
    if not torch.cuda.is_available():
        sys.exit("gbla.bench.layer_speed needs a CUDA GPU")
    import triton
    lengths = [int(s) for s in args.lengths.split(",")]
    sections = args.sections.split(",")
    try:  # torch.compile sees a new shape per L (fwd and fwd+bwd graphs): allow the recompiles
        torch._dynamo.config.cache_size_limit = 64
    except AttributeError:
        pass
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "cuda": torch.version.cuda, "commit": args.commit or git_commit(), "python": platform.python_version(),
            "command": "python -m gbla.bench.layer_speed " + " ".join(argv if argv is not None else sys.argv[1:]),
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "config": {"d_model": D_MODEL, "heads": HEADS, "head_dim": HEAD_DIM, "tokens": TOKENS,
                       "dtype": "bfloat16", "gbla_options": "GBLAOptions() defaults: conv1d k=4, token gate, rmsnorm_gated"}}
    results = Results(out, meta)
    t0 = time.time()
    steps = {"core": lambda: core_section(meta, lengths, args.sweep), "conv": lambda: conv_section(meta, args.sweep_conv),
             "layer": lambda: layer_section(results, lengths, args.impls.split(",")),
             "encoder": lambda: encoder_section(results, lengths, args.layouts.split(","))}
    for name in sections:
        print(f"== {name} ({time.time() - t0:.0f} s)", flush=True)
        try:
            steps[name]()
        except Exception as err:  # noqa: BLE001 - keep what the other sections measure
            import traceback
            traceback.print_exc()
            meta.setdefault("section_errors", {})[name] = f"{type(err).__name__}: {err}"[:500]
        results.save()
    meta["wall_s"] = time.time() - t0
    results.save()
    try:
        render(out)
    except Exception as err:  # noqa: BLE001 - the JSON is what matters; plots can be re-rendered
        print(f"render failed: {err}")
    print(Path(out.parent / "layer_speed.md").read_text() if (out.parent / "layer_speed.md").exists() else "")


if __name__ == "__main__":
    main()
