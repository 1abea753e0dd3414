"""gbla.bench.latency: the layer benchmark's results read back, the speedup over SDPA, layer_speed.md."""
import json

import matplotlib
import pytest

matplotlib.use("Agg")

from gbla.bench import latency  # noqa: E402


def bench_rows():
    rows = []
    for L in (64, 256, 1024):
        for impl, ms in (("sa-flash", 0.001 * L), ("sa-efficient", 0.0012 * L), ("gbla-triton", 0.05 + 0.0002 * L)):
            rows.append({"level": "layer", "impl": impl, "L": L, "B": 8, "pass": "fwd", "median_ms": ms,
                         "peak_mem_mib": 10.0, "error": None})
    rows.append({"level": "layer", "impl": "sa-cudnn", "L": 1024, "B": 8, "pass": "fwd", "median_ms": None,
                 "peak_mem_mib": None, "error": "not supported"})
    return rows


def test_speedups_vs_best_sdpa(tmp_path):
    path = tmp_path / "layer_speed.json"
    path.write_text(json.dumps({"meta": {"device": "fixture"}, "rows": bench_rows()}))
    meta, rows = latency.load_layer_speed(path)
    assert meta["device"] == "fixture" and len(rows) == 10
    sp = latency.speedups_vs_sdpa(rows)
    g = sp[(sp["impl"] == "gbla-triton") & (sp["L"] == 1024)].iloc[0]
    assert g["best_sdpa"] == "sa-flash" and g["speedup"] == pytest.approx(1.024 / (0.05 + 0.2048))
    assert "sa-cudnn" not in set(sp["impl"])   # errored rows are not timings
    assert latency.plot_latency(rows) is not None and latency.plot_speedup(sp) is not None
    import matplotlib.pyplot as plt
    plt.close("all")


def test_speedups_compare_eager_with_eager_and_graph_with_graph(tmp_path):
    """Eager GBLA over graphed SDPA would mix launch overhead into the speedup: like is compared with
    like, and layer_speed.md shows the same numbers as the notebook (one function)."""
    rows = []
    for impl, ms in (("sa-flash", 2.0), ("sa-flash+graph", 1.0), ("gbla-triton", 1.0), ("gbla-triton+graph", 0.25)):
        rows.append({"level": "layer", "impl": impl, "L": 4096, "B": 8, "pass": "fwd", "median_ms": ms,
                     "peak_mem_mib": 1.0, "error": None})
    path = tmp_path / "layer_speed.json"
    path.write_text(json.dumps({"meta": {"device": "fixture"}, "rows": rows}))
    sp = latency.speedups_vs_sdpa(latency.load_layer_speed(path)[1]).set_index("impl")
    assert sp.loc["gbla-triton", "best_sdpa"] == "sa-flash" and sp.loc["gbla-triton", "speedup"] == pytest.approx(2.0)
    assert sp.loc["gbla-triton+graph", "best_sdpa"] == "sa-flash+graph"
    assert sp.loc["gbla-triton+graph", "speedup"] == pytest.approx(4.0)

    latency.render(path)
    md = (tmp_path / "layer_speed.md").read_text()
    assert "| gbla-triton | fwd | best of sa-flash | 2.0 |" in md
    assert "| gbla-triton+graph | fwd | best of sa-flash+graph | 4.0 |" in md
    import matplotlib.pyplot as plt
    plt.close("all")


def test_load_layer_speed_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="layer_speed.json"):
        latency.load_layer_speed(tmp_path / "layer_speed.json")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"meta": {}, "rows": [{"level": "layer", "impl": "x"}]}))
    with pytest.raises(ValueError, match=r"bad.json: rows\[0\] lacks fields"):
        latency.load_layer_speed(bad)
