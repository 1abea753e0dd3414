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
    # each fwd+bwd row checks its gradients against torch's on the same inputs (bf16 x: rounding only)
    errors = {r["config"]: r["rel_err_vs_torch"] for r in result["rows"] if r["pass"] == "fwd+bwd"}
    assert errors["torch"] == 0 and all(0 <= e < 3e-2 for e in errors.values()), errors   # a few bf16 ulps
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


def test_relative_error_is_the_worst_tensor_over_its_scale():
    import torch

    from gbla.bench.conv_speed import relative_error

    ref = (torch.tensor([1.0, -4.0]), torch.tensor([0.5]), torch.zeros(2))
    assert relative_error(ref, ref) == 0
    off = (torch.tensor([1.0, -3.0]), torch.tensor([0.5]), torch.zeros(2))   # 1 over a scale of 4
    assert relative_error(off, ref) == pytest.approx(0.25)
    assert relative_error((ref[0], ref[1], torch.ones(2)), ref) == float("inf")   # zero reference, not matched
