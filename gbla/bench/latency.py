"""Reporting of the layer benchmark (gbla.bench.layer_speed): its results file read back, the speedup
over SDPA, the tables of layer_speed.md and the figures of notebooks/latency.ipynb.

    meta, rows = load_layer_speed("outputs/bench/layer_speed.json")
    speedups = speedups_vs_sdpa(rows)      # the one speedup function: layer_speed.md and the notebook
    render(path)                           # layer_speed.md, layer_speed.png, encoder_speed.png next to the JSON

Needs pandas and seaborn (the `workbook` extra), no GPU: results measured elsewhere render anywhere.
"""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from gbla.common import REPO_ROOT, atomic_write_text, frame_markdown, repo_path

LAYER_SPEED_FILE = REPO_ROOT / "outputs" / "bench" / "layer_speed.json"
_ROW_FIELDS = ("level", "impl", "L", "B", "pass", "median_ms")


def load_layer_speed(path=LAYER_SPEED_FILE) -> tuple[dict, pd.DataFrame]:
    """(meta, rows) of the benchmark JSON; FileNotFoundError when absent, ValueError naming bad rows."""
    path = repo_path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: run the benchmark first (`make bench` on a GPU machine)")
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(doc, dict) or "rows" not in doc:
        raise ValueError(f"{path}: expected an object with 'meta' and 'rows'")
    for i, row in enumerate(doc["rows"]):
        missing = [k for k in _ROW_FIELDS if k not in row]
        if missing:
            raise ValueError(f"{path}: rows[{i}] lacks fields {missing}")
    rows = pd.DataFrame(doc["rows"])
    for col in ("peak_mem_mib", "error"):
        if col not in rows.columns:
            rows[col] = None
    if not rows.empty:
        rows["median_ms"] = pd.to_numeric(rows["median_ms"], errors="coerce")
    return doc.get("meta", {}), rows


def timing_kind(impl: str) -> str:
    """How a benchmark row was timed: "eager", or the suffix after "+" (e.g. "graph" for CUDA-graph replays)."""
    return impl.split("+", 1)[1] if "+" in impl else "eager"


def speedups_vs_sdpa(rows: pd.DataFrame) -> pd.DataFrame:
    """Layer level: each implementation's time next to the fastest working SDPA implementation
    ("sa-*") at the same (pass, L, B) timed the same way (eager with eager, "+graph" CUDA-graph
    replays with "+graph"): a graph replay has no launch overhead, so eager GBLA over graphed SDPA
    would mix two effects. speedup = best SDPA ms / impl ms (> 1: faster than SDPA).
    layer_speed.md (render) and notebooks/latency.ipynb both take their speedups from here."""
    columns = ["pass", "L", "B", "impl", "timing", "median_ms", "best_sdpa", "best_sdpa_ms", "speedup"]
    ok = rows[(rows["level"] == "layer") & rows["error"].isna() & rows["median_ms"].notna()]
    ok = ok.assign(timing=[timing_kind(i) for i in ok["impl"]])
    sdpa = ok[ok["impl"].str.startswith("sa-")]
    if sdpa.empty:
        return pd.DataFrame(columns=columns)
    keys = ["pass", "L", "B", "timing"]
    best = (sdpa.sort_values("median_ms").groupby(keys, as_index=False).first()
            .rename(columns={"impl": "best_sdpa", "median_ms": "best_sdpa_ms"})[keys + ["best_sdpa", "best_sdpa_ms"]])
    out = ok.merge(best, on=keys, how="left")
    out["speedup"] = out["best_sdpa_ms"] / out["median_ms"]
    return out[columns].sort_values(["pass", "B", "impl", "L"]).reset_index(drop=True)


def plot_latency(rows: pd.DataFrame):
    """log-log median time vs sequence length L, one line per implementation; panels: level x pass."""
    import seaborn as sns

    from matplotlib.ticker import NullFormatter

    ok = rows[rows["error"].isna() & rows["median_ms"].notna()]
    if ok.empty:
        return None
    sns.set_theme(style="whitegrid", context="notebook")
    # one panel per (level, batch size): lines never average over different B
    ok = ok.assign(panel=[f"{lv}, B={b}" for lv, b in zip(ok["level"], ok["B"])])
    grid = sns.relplot(data=ok, x="L", y="median_ms", hue="impl", style="impl", markers=True, dashes=False,
                       row="panel", col="pass", kind="line", errorbar=None,
                       facet_kws={"sharey": False, "margin_titles": True}, height=3.2, aspect=1.3)
    grid.set(xscale="log", yscale="log")
    for ax in grid.axes.flat:
        ax.yaxis.set_minor_formatter(NullFormatter())
    grid.set_titles(row_template="{row_name}", col_template="{col_name}")
    grid.set_axis_labels("sequence length L", "median time (ms)")
    return grid


def plot_speedup(speedups: pd.DataFrame):
    """Speedup over the best SDPA per L (log x); the line at 1 is parity."""
    import seaborn as sns

    data = speedups[~speedups["impl"].str.startswith("sa-")] if not speedups.empty else speedups
    if data.empty:
        return None
    sns.set_theme(style="whitegrid", context="notebook")
    grid = sns.relplot(data=data, x="L", y="speedup", hue="impl", style="impl", markers=True, dashes=False,
                       row="B", col="pass", kind="line", errorbar=None, height=3.2, aspect=1.3,
                       facet_kws={"margin_titles": True})
    grid.set(xscale="log")
    grid.set_titles(row_template="B={row_name}", col_template="{col_name}")
    for ax in grid.axes.flat:
        ax.axhline(1.0, color="black", lw=1)
    grid.set_axis_labels("sequence length L", "speedup vs best SDPA (x)")
    return grid


def render(json_path: Path) -> None:
    """layer_speed.md (tables) and layer_speed.png / encoder_speed.png (figures) next to the JSON."""
    import matplotlib
    matplotlib.use("Agg")  # files only: no display needed where the benchmark ran
    import seaborn as sns

    data = json.loads(json_path.read_text())
    meta, df = data["meta"], pd.DataFrame(data["rows"])
    out_dir = json_path.parent
    lines = [f"# Layer and encoder speed ({meta.get('device')})", "",
             f"torch {meta.get('torch')}, triton {meta.get('triton')}, commit `{meta.get('commit')}`, "
             f"{meta.get('date')}; command: `{meta.get('command')}`", "",
             "bf16, D=512, H=8, E=64, B*L = 32768 tokens (B = 1 at L = 65536); median ms (CUDA events, "
             "triton.testing.do_bench); fwd = inference (no_grad).", ""]
    ok = df[df["median_ms"].notna()]
    for level in ("layer", "encoder"):
        sub = ok[ok["level"] == level]
        if sub.empty:
            continue
        table = sub.pivot_table(index=["impl", "pass"], columns="L", values="median_ms")
        lines += [f"## {level} level: median ms", "", frame_markdown(table), ""]
        if level == "layer":
            mem = sub.pivot_table(index=["impl", "pass"], columns="L", values="peak_mem_mib")
            lines += ["## layer level: peak memory (MiB, inputs and weights included)", "",
                      frame_markdown(mem, ".0f"), ""]
            # the same numbers as the latency notebook: one shared function, like compared with like
            sp = speedups_vs_sdpa(df.assign(error=df["error"] if "error" in df else None))
            sp = sp[sp["impl"].str.replace(r"\+.*", "", regex=True).isin(["gbla-triton", "gbla-torch-compile"])]
            if not sp.empty:
                sdpa_impls = sorted(i for i in sub["impl"].unique() if i.startswith("sa-"))
                sp = sp.assign(vs=["best of " + "/".join(i for i in sdpa_impls if timing_kind(i) == t)
                                   for t in sp["timing"]])
                table_sp = sp.pivot_table(index=["impl", "pass", "vs"], columns="L", values="speedup", sort=False)
                lines += ["## speedup of the GBLA layer over the best SDPA backend at each L "
                          "(eager vs eager, CUDA graph vs CUDA graph)", "", frame_markdown(table_sp, ".1f"), ""]
            if "host_ms" in sub:
                host = sub.pivot_table(index=["impl", "pass"], columns="L", values="host_ms")
                lines += ["## layer level: host (CPU) time to issue one call, ms (eager rows: when it exceeds the "
                          "GPU time above, the eager timing is launch-bound)", "", frame_markdown(host), ""]
    err = df[df["error"].notna()]
    if not err.empty:
        lines += ["## failed measurements", "", frame_markdown(err[["level", "impl", "L", "pass", "error"]].set_index("level")), ""]
    if "core" in meta:
        cb = meta["copy_bandwidth"]["bytes_per_s"]
        lines += [f"## core kernel roofline (copy bandwidth measured in the same run: {cb / 1e12:.2f} TB/s)", "",
                  "bytes = q, k, v, z read + o written (bf16) + key weights (fp32); fwd+bwd adds dy read and "
                  "dq, dk, dv, dz, dlw written. Graph = CUDA-graph replay (GPU time only).", "",
                  "| L | B | fwd us | fwd / copy | fwd us (graph) | fwd / copy (graph) | fwd+bwd us | "
                  "fwd+bwd us (graph) | fwd+bwd / copy (graph) |", "|---|---|---|---|---|---|---|---|---|"]
        for L, c in meta["core"].items():
            lines.append(f"| {L} | {c['B']} | {c['fwd_ms'] * 1e3:.1f} | {c['fwd_frac_of_copy']:.1%} | "
                         f"{c.get('graph_fwd_ms', float('nan')) * 1e3:.1f} | {c.get('graph_fwd_frac_of_copy', float('nan')):.1%} | "
                         f"{c['fwd_bwd_ms'] * 1e3:.1f} | {c.get('graph_fwd_bwd_ms', float('nan')) * 1e3:.1f} | "
                         f"{c.get('graph_fwd_bwd_frac_of_copy', float('nan')):.1%} |")
        if "chosen_config" in meta:
            lines += ["", f"Launch configuration chosen by the sweep in this run: `{meta['chosen_config']}`"]
        if "launch_config_L32768" in meta:
            lines += ["", f"Core launch configuration in effect (L = 32768): `{meta['launch_config_L32768']}`"]
        if "conv" in meta:
            conv = pd.DataFrame(meta["conv"]).T
            lines += ["", "## causal Conv1D + SiLU (B*L = 32768, C = 1536, bf16), ms", "",
                      frame_markdown(conv[[c for c in conv.columns if c.endswith("_ms")]]), ""]
        if "conv_sweep" in meta:
            lines += ["Conv backward variants, graphed fwd+bwd at L = 32768 (side by side in this run):", "",
                      frame_markdown(pd.DataFrame(meta["conv_sweep"]).set_index("fast_path")), "",
                      f"kept: `{meta['conv_chosen']}`"]
        lines.append("")
    atomic_write_text(out_dir / "layer_speed.md", "\n".join(lines) + "\n")

    sns.set_theme(style="whitegrid")
    for level, fname in (("layer", "layer_speed.png"), ("encoder", "encoder_speed.png")):
        sub = ok[ok["level"] == level]
        if sub.empty:
            continue
        g = sns.relplot(data=sub, x="L", y="median_ms", hue="impl", col="pass", kind="line", marker="o",
                        height=4, aspect=1.2, facet_kws={"sharey": False})
        g.set(xscale="log", yscale="log", xlabel="history length L (B*L = 32768 tokens)", ylabel="median ms")
        g.figure.suptitle(f"{level} speed, {meta.get('device')}", y=1.03)
        g.savefig(out_dir / fname, dpi=120, bbox_inches="tight")
