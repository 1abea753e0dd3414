"""gbla.bench.conv_speed: the conv at training shapes under each launch configuration (smoke run on the
interpreter: the files, the rows and the table; not the speed)."""
import json

import pytest

pytest.importorskip("triton")


def test_smoke_run_writes_rows_and_a_table(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from gbla.bench import conv_speed

    assert conv_speed.main(["--smoke", "--configs", "torch", "default", "fwd-t16", "bwd-t8", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "conv_speed.json").read_text())
    rows = [(r["L"], r["pass"], r["config"]) for r in result["rows"]]
    # the backward-only setting is timed with the backward only
    assert rows == [(13, "fwd", "torch"), (13, "fwd", "default"), (13, "fwd", "fwd-t16"),
                    (13, "fwd+bwd", "torch"), (13, "fwd+bwd", "default"), (13, "fwd+bwd", "fwd-t16"),
                    (13, "fwd+bwd", "bwd-t8")]
    assert all(r["median_ms"] and r["median_ms"] > 0 for r in result["rows"]), result["rows"]
    assert result["meta"]["C"] == 24 and result["meta"]["commit"]
    table = [line for line in (tmp_path / "conv_speed.md").read_text().splitlines() if line.startswith("|")]
    assert len({line.count("|") for line in table}) == 1 and len(table) == 2 + len(rows)
    # the override was only for the measurement
    from gbla.ops.conv import triton as kernels
    assert kernels.CONFIG_OVERRIDE == {}


def test_kernel_breakdown_is_tabulated_per_length_and_refused_without_cuda(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from gbla.bench import conv_speed

    assert conv_speed.main(["--smoke", "--configs", "default", "--kernels", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "conv_speed.json").read_text())
    assert result["kernels"] == "the kernel breakdown needs CUDA (torch profiler)"
    assert "*the kernel breakdown needs CUDA (torch profiler)*" in (tmp_path / "conv_speed.md").read_text()
    # on a GPU: a table row per length, configuration and kernel, in the order measured
    result["kernels"] = {"13": {"default": {"_conv_bwd_dpre_kernel": 120.04, "_conv_fwd_kernel": 50.0},
                                "bwd-rows8": {"_conv_bwd_dpre_kernel": 40.0}},
                         "81": {"default": {"_sum": 3.25}}}
    table = conv_speed.markdown(result).split("## Kernels")[1].splitlines()
    assert [line for line in table if line.startswith("| ")] == [
        "| L | config | kernel | us per call |", "| 13 | default | `_conv_bwd_dpre_kernel` | 120.0 |",
        "| 13 | default | `_conv_fwd_kernel` | 50.0 |", "| 13 | bwd-rows8 | `_conv_bwd_dpre_kernel` | 40.0 |",
        "| 81 | default | `_sum` | 3.2 |"]
