"""The step's GEMM count: the arithmetic of one GEMM, the calls recorded from the model, and the
reading of a committed train_throughput profile (the floors themselves are arithmetic, no GPU)."""
import json

import pytest
import torch

from gbla.bench import step_gemms as SG
from gbla.common import REPO_ROOT
from gbla.datasets import load_processed_dataset
from gbla.layers import SeedLinear
from gbla.model import TIGER
from gbla.params import load_grid

PARAMS = REPO_ROOT / "params" / "ablations.yaml"


def test_a_gemms_flops_bytes_and_floor():
    g = SG.Gemm("encoder.0.ffn.up", seeds=2, rows=10, k=4, n=8)
    assert g.flops == 2 * 2 * 10 * 4 * 8
    assert g.bytes == 2 * 2 * (10 * 4 + 4 * 8 + 10 * 8)
    assert g.floor_s(peak_flops=g.flops, bytes_per_s=g.bytes / 2) == 2.0      # bandwidth-bound: 2 s vs 1 s
    assert g.floor_s(peak_flops=g.flops / 3, bytes_per_s=g.bytes) == 3.0      # compute-bound
    table = SG.step_table([g, g], peak_flops=g.flops, bytes_per_s=g.bytes / 2)
    assert table["gemm_calls"] == 6 and table["floor_ms"] == pytest.approx(3 * 2 * 2.0 * 1e3)
    assert table["compute_bound_calls"] == 0
    # as a profile under autocast counts aten::bmm: forward twice (wrapper and inner call), backward 2 each
    assert table["profiled_bmm_events"] == 2 * 2 + 2 * 2
    with_bias = SG.Gemm("encoder.1.mix.gate", seeds=2, rows=10, k=4, n=8, bias=True)   # a baddbmm forward
    assert SG.step_table([g, with_bias], 1.0, 1.0)["profiled_bmm_events"] == 2 * 1 + 2 * 2


def test_a_forward_bmm_under_autocast_is_profiled_twice():
    """What profiled_bmm_events assumes, on the CPU's autocast (the GPU's wraps ops the same way)."""
    from torch.profiler import ProfilerActivity, profile

    x, w = torch.randn(2, 8, 16, requires_grad=True), torch.randn(2, 16, 8, requires_grad=True)
    counts = []
    for autocast in (False, True):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                y = torch.bmm(x, w)
            y.float().sum().backward()
        counts.append(sum(e.name == "aten::bmm" for e in prof.events()))
    assert counts == [1 + 2, 2 + 2]


def test_roles_drop_the_layer_index():
    assert SG.role("encoder.1.ffn.up") == "encoder ffn.up"
    assert SG.role("decoder.3.cross_attn.kv") == "decoder cross_attn.kv"
    assert SG.role("head") == "head"


def test_every_seed_linear_is_recorded_once_per_forward_at_its_shape():
    grid = load_grid(PARAMS, "smoke")
    config = grid.run_config("synthetic", "hybrid", 0)
    data = load_processed_dataset("synthetic", synthetic=grid.synthetic)
    model = TIGER(config.model, data.codebook_sizes, backend="torch", num_seeds=2)
    S, B, L = 2, 3, 13
    enc = torch.full((S, B, L), 1, dtype=torch.long)
    enc[..., 0] = 0
    targets = torch.zeros((S, B, 4), dtype=torch.long)
    gemms = SG.record_gemms(model, enc, targets)
    linears = [name for name, m in model.named_modules() if isinstance(m, SeedLinear)]
    assert sorted(g.module for g in gemms) == sorted(linears)   # each once per forward
    by_name = {g.module: g for g in gemms}
    up = by_name["encoder.0.ffn.up"]
    assert (up.seeds, up.rows, up.k, up.n) == (S, B * L, config.model.d_model, config.model.d_ff)
    gate = by_name["encoder.1.mix.gate"]
    assert config.model.num_heads % 8 and gate.n == 8   # padded to the GEMM alignment, as the layer does
    assert by_name["head"].rows == B * 4   # one row per decoder position (four digits)


def test_the_committed_profile_is_read():
    measured = SG.read_profile(REPO_ROOT / "outputs" / "bench" / "train_profile_hybrid_k5_62dcac6.txt")
    assert measured["steps"] == 6 and measured["seeds"] == 5 and measured["batch_size_per_seed"] == 256
    assert measured["encoder_lengths"] == [13, 41, 13, 41, 41, 81]
    assert measured["measured_ms_per_step"] == pytest.approx(14.098 / 6)
    assert measured["measured_calls_per_step"] == {"aten::bmm": 1152 / 6}   # the baddbmm row is not in its table


def test_a_profile_without_its_header_is_refused(tmp_path):
    path = tmp_path / "profile.txt"
    path.write_text("Name  Self CUDA\n")
    with pytest.raises(ValueError, match="eager steps"):
        SG.read_profile(path)


def test_main_writes_json_and_table_for_the_lengths_given(tmp_path):
    SG.main(["--params", str(PARAMS), "--profile-name", "smoke", "--dataset", "synthetic", "--variant", "hybrid",
             "--seeds", "2", "--lengths", "13", "25", "13", "--measured-ms", "1.0", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "step_gemms_hybrid.json").read_text())
    per = {int(k): v["table"] for k, v in result["per_length"].items()}
    assert set(per) == {13, 25} and per[25]["gflop"] > per[13]["gflop"]
    assert result["per_step_mean"]["gflop"] == pytest.approx((2 * per[13]["gflop"] + per[25]["gflop"]) / 3)
    assert sum(r["floor_ms"] for r in result["per_role_mean"].values()) == pytest.approx(
        result["per_step_mean"]["floor_ms"])
    text = (tmp_path / "step_gemms_hybrid.md").read_text()
    assert "x the floor" in text and "encoder ffn.up" in text
