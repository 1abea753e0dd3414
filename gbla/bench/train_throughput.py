"""Training throughput: one seed per process against all seeds of a variant in one process.

    python -m gbla.bench.train_throughput --variants sa hybrid --seeds 5 --out outputs/bench
    python -m gbla.bench.train_throughput ... --baseline-src DIR   # also time an older checkout's
                                                                   # single-run step, same run
    python -m gbla.bench.train_throughput --paths multi_seed --attention-backends torch auto
                                   # the softmax attention's reference vs its fused kernels, same run

For each variant of the params file (its `full` profile settings, Beauty by default) and each path,
"single" (a model of one seed, as one run per process trains) and "multi_seed" (K seeds in one
model, gbla.train.train_group's step): steady-state examples per second of the CUDA-graph training
step on real epoch batches (every length bucket warmed up and captured first, then `--steps` steps
timed with CUDA-synchronised wall clock), and the time of one validation pass (beam search over all
validation users, every seed at once). With --baseline-src, the same measurement of an older
checkout's step (its `gbla.bench.train_speed steps`, in a subprocess on its own source tree) is added
as path "single" with that commit, so the ratio is taken side by side on one GPU in one run.
--profile writes a kernel table of a few eager multi-seed steps (where the GPU time goes), and one of
a validation batch with its wall time (`..._eval.txt`).
--attention-backends times each path and mode once per backend of the softmax attention
(TIGER's attention_backend: SA layers, decoder self- and cross-attention); the other ops keep
--backend. Without it the attention uses --backend too. --dropout-backends does the same for the fused
dropouts (gbla.ops.dropout: the FFNs' ReLU + dropout, the residual dropout-adds), --kernel-settings for
the kernels' launch overrides ("" conv.bwd_rows=8: the defaults, then the conv backward's rows per
program; gbla.ops.overrides). --processes 1 2 also times the multi-seed step in that many worker
processes at once on the one GPU (each its own K-seed model, timed over one window after all have
warmed up; --mps shares the GPU through CUDA MPS): whether two groups per GPU (`python -m gbla.grid
--runs-per-gpu 2`) train more examples per second than one.

Output: <out>/train_throughput.json and .md (rows: path, seeds, batch_size_per_seed, dataset, variant,
attention_backend, kernels, examples_per_s, ms_per_step, valid_eval_s, device, commit, command, date).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from gbla.evaluate import SIDTrie, rank_targets
from gbla.model import TIGER, DecoderBlock, EncoderBlock, FeedForward
from gbla.common import REPO_ROOT, atomic_write_json, atomic_write_text, git_commit
from gbla.params import load_grid
from gbla.datasets import load_processed_dataset
from gbla.ops.overrides import format_overrides, kernel_overrides, parse_overrides
from gbla.train import BUCKET_ORDER_SEED, TrainStep, epoch_batches, length_bucket_groups, to_device_split


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def load_configs(params: str, profile: str, dataset: str, variant: str, seeds: list[int]):
    grid = load_grid(params, profile)
    return [grid.run_config(dataset, variant, s) for s in seeds]


def group_step(configs, data, dev, backend: str, mode: str, attention_backend: str | None = None,
               dropout_backend: str | None = None):
    """What train_group sets up for these seeds: (model, SIDs on the device, TrainStep, length-bucket
    groups, one epoch's batches). attention_backend: the softmax attention's (None: `backend`);
    dropout_backend: the fused dropouts' (gbla.ops.dropout: the FFNs' ReLU + dropout and the blocks'
    residual dropout-adds; None: as the model sets them)."""
    tc = configs[0].train
    model = TIGER(configs[0].model, data.codebook_sizes, backend=backend, num_seeds=len(configs),
                  attention_backend=attention_backend)
    for module in model.modules() if dropout_backend is not None else []:
        if isinstance(module, FeedForward):
            module.backend = dropout_backend
        if isinstance(module, (EncoderBlock, DecoderBlock)):
            module.residual_backend = dropout_backend
    model.init_seeds([c.seed for c in configs]).to(dev)
    sids = torch.as_tensor(data.sids, device=dev)
    train = to_device_split(data.train, model, sids, tc.max_history, dev)
    step = TrainStep(model, train, tc, mode, dev.type == "cuda")
    groups = length_bucket_groups(train.enc_tokens, tc.length_buckets, tc.max_history, tc.batch_size)
    gens = [torch.Generator().manual_seed(c.seed) for c in configs]
    batches = epoch_batches(groups, tc.batch_size, gens, torch.Generator().manual_seed(BUCKET_ORDER_SEED))
    return model, sids, step, groups, batches


def wait_at_barrier(folder: Path, index: int, parties: int, timeout_s: float = 900.0) -> None:
    """Mark worker `index` ready in `folder` and wait until all `parties` are (files, not sockets:
    the workers are separate processes started one by one)."""
    (folder / f"ready-{index}").touch()
    deadline = time.time() + timeout_s
    while sum((folder / f"ready-{i}").exists() for i in range(parties)) < parties:
        if time.time() > deadline:
            raise TimeoutError(f"{folder}: not all {parties} workers were ready within {timeout_s:.0f} s")
        time.sleep(0.05)


def measure(configs, data, dev, steps: int, backend: str, eval_pass: bool, mode: str = "cuda_graph",
            attention_backend: str | None = None, barrier: tuple[Path, int, int] | None = None,
            dropout_backend: str | None = None) -> dict:
    """Steady-state examples/s of the training step (`mode`, gbla.train.STEP_MODES) for a model of
    len(configs) seeds; warm-up (and compilation, for the compile modes) is timed apart. barrier
    (folder, index, parties): after its warm-up, wait for the other processes measured at once."""
    S, tc = len(configs), configs[0].train
    mode = mode if dev.type == "cuda" else "eager"
    model, sids, step, groups, batches = group_step(configs, data, dev, backend, mode, attention_backend, dropout_backend)
    t0 = time.perf_counter()
    seen: dict[int, int] = {}
    for enc_len, idx in batches:  # warm-up: every encoder length past its eager steps and capture
        if seen.get(enc_len, 0) <= TrainStep.WARMUP_STEPS:
            seen[enc_len] = seen.get(enc_len, 0) + 1
            step(idx, enc_len)
        if len(seen) == len(groups) and all(v > TrainStep.WARMUP_STEPS for v in seen.values()):
            break
    sync()
    row = {"mode": mode, "warmup_s": time.perf_counter() - t0, "steps_per_epoch": len(batches)}
    if barrier is not None:
        wait_at_barrier(*barrier)
    total = torch.zeros(S, device=dev)
    row["window_start"] = time.time()
    t0 = time.perf_counter()
    for i in range(steps):
        enc_len, idx = batches[i % len(batches)]
        total += step(idx, enc_len)
    sync()
    elapsed = time.perf_counter() - t0
    row["window_end"] = time.time()
    row.update(ms_per_step=1000 * elapsed / steps, examples_per_s=steps * S * tc.batch_size / elapsed,
               epoch_s=elapsed / steps * len(batches), mean_loss=(total / steps).tolist())
    if eval_pass:
        valid = to_device_split(data.valid, model, sids, tc.max_history, dev)
        trie = SIDTrie(data.sids, data.codebook_sizes, device=dev)
        for key, use_cache, override in EVAL_SETTINGS:
            with kernel_overrides(override):
                # the warm-up is the very pass timed next: each batch's shapes (its history length, a
                # last batch of other size) compile their own kernels, and a warm-up on a few users
                # left most of that compilation inside the timed pass (at 62dcac6: 5.97 s timed for a
                # pass whose batches profiled at ~0.15 s each)
                for timed in (False, True):
                    sync()
                    t0 = time.perf_counter()
                    rank_targets(model, valid.enc_tokens, valid.target, trie, beam_size=tc.beam_size,
                                 batch_size=4096 if dev.type == "cuda" else 256, autocast=dev.type == "cuda",
                                 use_cache=use_cache)
                    sync()
                    row[key if timed else key.removesuffix("_s") + "_warmup_s"] = time.perf_counter() - t0
    return row


# The validation pass, side by side: the decoder cache as training uses it (default), the full prefix
# decoded again at every level (the reference), and the cache with decoding steps on the general
# attention forward instead of its one-query kernel (when the attention runs on the kernels)
EVAL_SETTINGS = (("valid_eval_s", True, {}), ("valid_eval_full_prefix_s", False, {}),
                 ("valid_eval_general_kernel_s", True, {"attention": {"one_query_kernel": False}}))


def profile_eager(configs, data, dev, backend: str, path: Path, n: int = 6,
                  attention_backend: str | None = None) -> dict:
    """Kernel table (GPU time per kernel) of n eager multi-seed steps, and one of a validation batch
    (beam search over 4096 users, every seed; `<path stem>_eval.txt`) with its wall time: whether
    validation waits on the GPU or on the host."""
    from torch.profiler import ProfilerActivity, profile

    S, tc = len(configs), configs[0].train
    model, sids, step, _, batches = group_step(configs, data, dev, backend, "eager", attention_backend)
    for enc_len, idx in batches[:n]:
        step(idx, enc_len)
    sync()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for enc_len, idx in batches[n:2 * n]:
            step(idx, enc_len)
        sync()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy_us = sum(getattr(e, "device_time", 0) or 0 for e in kernels)
    table = prof.key_averages().table(sort_by="self_device_time_total", row_limit=40, max_name_column_width=70)
    encoder_lengths = [enc_len for enc_len, _ in batches[n:2 * n]]
    path.write_text(f"# {n} eager steps of {S} seeds x {tc.batch_size}, encoder lengths {encoder_lengths}\n"
                    f"# kernels per step {len(kernels) / n:.0f}, kernel busy time per step {busy_us / 1000 / n:.2f} ms\n\n"
                    + table + "\n")
    out = {"kernels_per_step": len(kernels) / n, "kernel_busy_ms_per_step": busy_us / 1000 / n,
           "profile_file": path.name}

    valid = to_device_split(data.valid, model, sids, tc.max_history, dev)
    trie = SIDTrie(data.sids, data.codebook_sizes, device=dev)
    users = min(4096, len(valid.target))
    autocast = dev.type == "cuda"
    rank_targets(model, valid.enc_tokens[:512], valid.target[:512], trie, beam_size=tc.beam_size,
                 autocast=autocast)  # warm-up
    sync()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        rank_targets(model, valid.enc_tokens[:users], valid.target[:users], trie, beam_size=tc.beam_size,
                     batch_size=users, autocast=autocast)
        sync()
        wall_ms = (time.perf_counter() - t0) * 1000
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy_ms = sum(getattr(e, "device_time", 0) or 0 for e in kernels) / 1000
    eval_path = path.with_name(path.stem + "_eval.txt")
    table = prof.key_averages().table(sort_by="self_device_time_total", row_limit=30, max_name_column_width=70)
    eval_path.write_text(f"# one validation batch: beam search (beam {tc.beam_size}) over {users} users x {S} seeds, "
                         f"with the decoder cache, under the profiler\n# wall {wall_ms:.1f} ms, {len(kernels)} kernels, "
                         f"kernel busy time {busy_ms:.1f} ms\n\n" + table + "\n")
    out.update(eval_users=users, eval_wall_ms=wall_ms, eval_kernels=len(kernels), eval_kernel_busy_ms=busy_ms,
               eval_profile_file=eval_path.name)
    return out


def baseline_rows(src: Path, variants: list[str], steps: int, dataset: str) -> list[dict]:
    """An older checkout's single-run step, timed by its own benchmark in a subprocess."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "gbla.bench.train_speed", "steps", "--dataset", dataset,
               "--variants", ",".join(variants), "--backends", "auto", "--modes", "cuda_graph",
               "--steps", str(steps), "--out", tmp]
        # $GBLA_COMMIT names this tree, not the baseline's: the baseline's commit comes from baseline_commit
        env = {**{k: v for k, v in os.environ.items() if k != "GBLA_COMMIT"}, "PYTHONPATH": str(src)}
        proc = subprocess.run(cmd, cwd=src, env=env, capture_output=True, text=True)
        path = Path(tmp) / "train_steps.json"
        if proc.returncode != 0 or not path.is_file():
            print(proc.stdout[-2000:], proc.stderr[-3000:], flush=True)
            return [{"path": "single", "error": f"baseline exited {proc.returncode}"}]
        result = json.loads(path.read_text())
    rows = []
    for r in result["rows"]:
        evals = [e for e in result.get("eval", []) if e["variant"] == r["variant"] and e["eval_batch_size"] == 4096]
        rows.append({"path": "single", "seeds": 1, "batch_size_per_seed": r["batch_size"], "variant": r["variant"],
                     "examples_per_s": r.get("examples_per_s"), "ms_per_step": r.get("ms_per_step"),
                     "valid_eval_s": evals[0]["valid_eval_s"] if evals else None,
                     "commit": baseline_commit(src), "code": "baseline", "error": r.get("error")})
    return rows


def baseline_commit(src: Path) -> str:
    """The commit of the baseline tree: its COMMIT file (an exported tree, e.g. `git archive X | tar -x`,
    has no .git; write X there), else its own git checkout's HEAD when `src` is a checkout's top
    level, else "unknown". Never the enclosing repository's HEAD, which a tree exported inside this
    checkout would otherwise report."""
    src = Path(src).resolve()
    if (src / "COMMIT").is_file():
        return (src / "COMMIT").read_text().strip()
    try:
        top = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=src, capture_output=True, text=True,
                             check=True, timeout=10).stdout.strip()
        if Path(top).resolve() == src:
            return subprocess.run(["git", "rev-parse", "HEAD"], cwd=src, capture_output=True, text=True,
                                  check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


def mps_running() -> bool:
    """Whether an MPS control daemon answers at this environment's pipe folder (one started before this
    process: then every CUDA process here, this one included, is already its client)."""
    if "CUDA_MPS_PIPE_DIRECTORY" not in os.environ:
        return False
    try:
        return subprocess.run(["nvidia-cuda-mps-control"], input="get_server_list\n", capture_output=True,
                              text=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def start_mps(folder: Path) -> dict | None:
    """Start a CUDA MPS control daemon with its pipe and log folders under `folder`; the environment
    its clients need, or None when it could not start (no nvidia-cuda-mps-control, not permitted).
    A process that already holds a CUDA context is not a client of a daemon started after it: start
    the daemon before the benchmark where it must share the GPU with its parent (measure_processes
    then uses it as it is)."""
    env = {"CUDA_MPS_PIPE_DIRECTORY": str(folder / "mps-pipe"), "CUDA_MPS_LOG_DIRECTORY": str(folder / "mps-log")}
    for d in env.values():
        Path(d).mkdir(parents=True, exist_ok=True)
    try:
        proc = subprocess.run(["nvidia-cuda-mps-control", "-d"], env={**os.environ, **env}, capture_output=True,
                              text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as e:
        print(f"MPS did not start: {e}", flush=True)
        return None
    if proc.returncode != 0:
        print(f"MPS did not start: {proc.stderr.strip() or proc.stdout.strip()}", flush=True)
        return None
    return env


def stop_mps(env: dict) -> None:
    subprocess.run(["nvidia-cuda-mps-control"], input="quit\n", env={**os.environ, **env}, capture_output=True,
                   text=True, timeout=60)


def measure_processes(args, variant: str, processes: int, mode: str, attention_backend: str | None,
                      mps: bool) -> dict:
    """The multi-seed step of `variant` timed in `processes` processes at once on the one GPU (each
    its own K-seed model, started together after every one has warmed up), optionally sharing the GPU
    through MPS; examples/s of all of them over the window from the first start to the last end."""
    with tempfile.TemporaryDirectory(prefix="gbla-throughput-") as tmp:
        tmp = Path(tmp)
        running = mps and mps_running()
        mps_env = (start_mps(tmp) if mps and not running else None)
        try:
            env = {**os.environ, **(mps_env or {})}
            cmd = [sys.executable, "-m", "gbla.bench.train_throughput", "--params", args.params,
                   "--profile-name", args.profile_name, "--dataset", args.dataset, "--variants", variant,
                   "--seeds", str(args.seeds), "--steps", str(args.steps), "--backend", args.backend,
                   "--modes", mode, *(["--attention-backends", attention_backend] if attention_backend else [])]
            procs = [subprocess.Popen(cmd + ["--worker", str(tmp), str(i), str(processes)], env=env)
                     for i in range(processes)]
            codes = [p.wait(timeout=1200) for p in procs]
        finally:
            if mps_env is not None:
                stop_mps(mps_env)
        if any(codes):
            raise RuntimeError(f"worker exit codes {codes}")
        workers = [json.loads((tmp / f"worker-{i}.json").read_text()) for i in range(processes)]
    window = max(w["window_end"] for w in workers) - min(w["window_start"] for w in workers)
    examples = sum(args.steps * args.seeds * w["batch_size_per_seed"] for w in workers)
    return {"mode": mode, "processes": processes, "mps": running or mps_env is not None,
            "batch_size_per_seed": workers[0]["batch_size_per_seed"],
            "ms_per_step": sum(w["ms_per_step"] for w in workers) / processes,
            "examples_per_s": examples / window,
            "per_process_examples_per_s": [w["examples_per_s"] for w in workers],
            "window_s": window, "overlap_s": min(w["window_end"] for w in workers)
            - max(w["window_start"] for w in workers)}


def load_data(args):
    """The processed dataset (or the params profile's synthetic one, for tests on the CPU)."""
    return load_processed_dataset(args.dataset, synthetic=load_grid(args.params, args.profile_name).synthetic)


def run_worker(args, folder: Path, index: int, parties: int) -> int:
    """One process of measure_processes: measure and write worker-<index>.json to `folder`."""
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    data = load_data(args)
    configs = load_configs(args.params, args.profile_name, args.dataset, args.variants[0], list(range(args.seeds)))
    row = measure(configs, data, dev, args.steps, args.backend, eval_pass=False, mode=args.modes[0],
                  attention_backend=(args.attention_backends or [None])[0], barrier=(folder, index, parties))
    row["batch_size_per_seed"] = configs[0].train.batch_size
    atomic_write_json(folder / f"worker-{index}.json", row)
    return 0


def _processes_cell(row: dict) -> str:
    n = row.get("processes", 1)
    return f"{n}" + (" (MPS)" if row.get("mps") else "") if n > 1 or row.get("mps") else "1"


def markdown(result: dict) -> str:
    m = result["meta"]
    lines = [f"# Training throughput ({m['dataset']}, {m['device']})", "",
             f"Measured {m['date']} at commit {m['commit']} with `{m['command']}` (torch {m['torch']}, "
             f"triton {m['triton']}). Examples per second of the CUDA-graph training step in steady "
             f"state (all seeds' examples counted), {m['steps']} steps over real epoch batches; validation "
             f"pass = beam search over every validation user, all seeds of the model at once (with the "
             f"decoder cache; beside it the same search decoding the whole prefix again at every level, and "
             f"the cache with the decoding steps on the general attention forward instead of its one-query "
             f"kernel).", "",
             "| variant | path | code | step mode | attention | dropout | seeds | processes | batch/seed | ms/step | examples/s "
             "| x single (baseline) | valid pass s | full prefix s | general kernel s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    base = {r["variant"]: r["examples_per_s"] for r in result["rows"] if r.get("code") == "baseline"
            and r.get("examples_per_s")}
    for r in result["rows"]:
        if r.get("error"):
            lines.append(f"| {r.get('variant')} | {r['path']} | {r.get('code')} | {r.get('mode', '')} | "
                         f"{r.get('attention_backend', '')} | {r.get('dropout_backend', '')} | | | | error: {r['error'][:80]} | | | | | |")
            continue
        ratio = r["examples_per_s"] / base[r["variant"]] if r["variant"] in base else None
        kernels = f", {r['kernels']}" if r.get("kernels") not in (None, "default") else ""
        lines.append(f"| {r['variant']} | {r['path']} | {r.get('code')} ({r.get('commit', '')[:7]}{kernels}) | "
                     f"{r.get('mode', 'cuda_graph')} | {r.get('attention_backend', '')} | {r.get('dropout_backend', '')} | {r['seeds']} | "
                     f"{_processes_cell(r)} | {r['batch_size_per_seed']} | {r['ms_per_step']:.2f} | {r['examples_per_s']:,.0f} | "
                     f"{'' if ratio is None else format(ratio, '.2f') + 'x'} | "
                     + " | ".join("" if r.get(k) is None else format(r[k], ".2f")
                                  for k in ("valid_eval_s", "valid_eval_full_prefix_s", "valid_eval_general_kernel_s"))
                     + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", default=str(REPO_ROOT / "params" / "ablations.yaml"))
    ap.add_argument("--profile-name", default="full", help="params profile whose settings are used")
    ap.add_argument("--dataset", default="beauty")
    ap.add_argument("--variants", nargs="+", default=["sa", "hybrid"])
    ap.add_argument("--seeds", type=int, default=5, help="K of the multi-seed path")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--baseline-src", help="source tree of an older checkout to time its single-run step")
    ap.add_argument("--profile", action="store_true", help="kernel table of eager multi-seed steps")
    ap.add_argument("--paths", nargs="+", default=["single", "multi_seed"], choices=["single", "multi_seed"])
    ap.add_argument("--modes", nargs="+", default=["cuda_graph"],
                    help="step modes to time (gbla.train.STEP_MODES), e.g. cuda_graph compile_cuda_graph")
    ap.add_argument("--attention-backends", nargs="+", choices=["auto", "torch", "triton"],
                    help="time each path and mode once per softmax-attention backend, e.g. torch auto "
                         "(default: the attention uses --backend)")
    ap.add_argument("--dropout-backends", nargs="+", choices=["auto", "torch", "triton"],
                    help="time each path and mode once per backend of the fused dropouts (the FFNs' ReLU + "
                         "dropout, the residual dropout-adds), e.g. torch auto (default: --backend)")
    ap.add_argument("--processes", nargs="+", type=int, default=[],
                    help="also time the multi-seed step in this many processes at once on the one GPU, e.g. "
                         "1 2 (each a K-seed model; 1 = the same in one worker process, for the ratio)")
    ap.add_argument("--mps", action="store_true",
                    help="share the GPU between those processes through CUDA MPS: the daemon this environment "
                         "points at (CUDA_MPS_PIPE_DIRECTORY) if one answers, else one started for the "
                         "measurement and stopped after it")
    ap.add_argument("--worker", nargs=3, metavar=("FOLDER", "INDEX", "N"), help=argparse.SUPPRESS)
    ap.add_argument("--kernel-settings", nargs="+", default=[""], metavar="OVERRIDES",
                    help='kernel launch overrides, one measurement each: "" (the defaults) conv.bwd_rows=8 ...')
    ap.add_argument("--out", default=str(REPO_ROOT / "outputs" / "bench"))
    args = ap.parse_args(argv)
    try:   # a bad override fails before anything is measured
        kernel_settings = [parse_overrides(o) for o in args.kernel_settings]
    except ValueError as e:
        ap.error(str(e))
    if args.worker:
        return run_worker(args, Path(args.worker[0]), int(args.worker[1]), int(args.worker[2]))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    data = load_data(args)
    import triton
    meta = {"command": "python -m gbla.bench.train_throughput " + shlex.join(argv if argv is not None else sys.argv[1:]),
            "commit": git_commit(), "dataset": args.dataset,
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", "torch": torch.__version__,
            "triton": triton.__version__, "steps": args.steps,
            "data_fingerprint": data.provenance.get("fingerprint")}
    result = {"meta": meta, "rows": []}

    def save():
        atomic_write_json(out / "train_throughput.json", result)
        atomic_write_text(out / "train_throughput.md", markdown(result))

    if args.baseline_src:
        t0 = time.perf_counter()
        for r in baseline_rows(Path(args.baseline_src), args.variants, args.steps, args.dataset):
            r.update(dataset=args.dataset, device=meta["device"])
            result["rows"].append(r)
            print(r, flush=True)
        print(f"baseline: {time.perf_counter() - t0:.0f} s", flush=True)
        save()
    attention_backends = args.attention_backends or [None]  # None: the attention follows --backend
    dropout_backends = args.dropout_backends or [None]   # None: the fused dropouts follow --backend
    for variant in args.variants:
        for (path, k), mode, attn, drop, kernels in [
                (p, m, a, f, o) for p in (("single", 1), ("multi_seed", args.seeds)) if p[0] in args.paths
                for m in args.modes for a in attention_backends for f in dropout_backends for o in kernel_settings]:
            configs = load_configs(args.params, args.profile_name, args.dataset, variant, list(range(k)))
            row = {"path": path, "seeds": k, "batch_size_per_seed": configs[0].train.batch_size,
                   "dataset": args.dataset, "variant": variant, "code": "this", "commit": meta["commit"],
                   "device": meta["device"], "config_hashes": [c.config_hash() for c in configs], "mode": mode,
                   "attention_backend": attn or args.backend, "dropout_backend": drop or args.backend,
                   "kernels": format_overrides(kernels) or "default"}
            try:
                with kernel_overrides(kernels):
                    measured = measure(configs, data, dev, args.steps, args.backend, eval_pass=mode == args.modes[0],
                                       mode=mode, attention_backend=attn, dropout_backend=drop)
                row.update(measured)
            except Exception as err:  # noqa: BLE001 - a failing row is a result too; the others still run
                row["error"] = f"{type(err).__name__}: {err}"[:500]
            print(row, flush=True)
            result["rows"].append(row)
            save()
            torch.cuda.empty_cache() if dev.type == "cuda" else None
        for n in args.processes:
            attn = attention_backends[0]
            row = {"path": "multi_seed", "seeds": args.seeds, "batch_size_per_seed": None, "dataset": args.dataset,
                   "variant": variant, "code": "this", "commit": meta["commit"], "device": meta["device"],
                   "mode": args.modes[0], "attention_backend": attn or args.backend, "processes": n,
                   "kernels": "default"}   # the worker processes launch with the kernels' defaults
            try:
                row.update(measure_processes(args, variant, n, args.modes[0], attn, args.mps))
            except Exception as err:  # noqa: BLE001 - a failing row is a result too
                row["error"] = f"{type(err).__name__}: {err}"[:500]
            print(row, flush=True)
            result["rows"].append(row)
            save()
        for attn in attention_backends if args.profile else []:
            configs = load_configs(args.params, args.profile_name, args.dataset, variant, list(range(args.seeds)))
            name = variant if attn is None else f"{variant}_attn_{attn}"
            prof = profile_eager(configs, data, dev, args.backend, out / f"train_profile_{name}_k{args.seeds}.txt",
                                 attention_backend=attn)
            result.setdefault("profiles", {})[name] = prof
            print(prof, flush=True)
            save()
    print(markdown(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
