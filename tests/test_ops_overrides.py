"""Kernel launch overrides (gbla.ops.overrides): the text form benchmarks take, and the context that
sets the kernels' CONFIG_OVERRIDE dicts and gives back what they held."""
import pytest

from gbla.ops import overrides
from gbla.ops.attention import triton as attention_kernels
from gbla.ops.conv import triton as conv_kernels


def test_parse_and_format():
    parsed = overrides.parse_overrides("conv.bwd_rows=8, q_block=32,attention.bwd_scheme=rows,conv.fast_path=false")
    assert parsed == {"conv": {"bwd_rows": 8, "fast_path": False},
                      "attention": {"q_block": 32, "bwd_scheme": "rows"}}
    assert overrides.format_overrides(parsed) == \
        "attention.q_block=32,attention.bwd_scheme=rows,conv.bwd_rows=8,conv.fast_path=false"
    assert overrides.parse_overrides(overrides.format_overrides(parsed)) == parsed
    assert overrides.parse_overrides("") == {} and overrides.format_overrides({}) == ""
    with pytest.raises(ValueError, match="expected"):
        overrides.parse_overrides("conv.bwd_rows")
    with pytest.raises(ValueError, match="unknown namespace 'gbla'"):
        overrides.parse_overrides("gbla.block=64")


def test_kernel_overrides_set_and_restore(monkeypatch):
    monkeypatch.setattr(attention_kernels, "CONFIG_OVERRIDE", {"q_block": 16})
    monkeypatch.setattr(conv_kernels, "CONFIG_OVERRIDE", {})
    with overrides.kernel_overrides({"conv": {"bwd_rows": 8}, "attention": {"q_block": 32}}):
        assert conv_kernels.CONFIG_OVERRIDE == {"bwd_rows": 8}
        assert attention_kernels.CONFIG_OVERRIDE == {"q_block": 32}
        # the conv's launch follows it: rows per program of the backward's first kernel
        assert conv_kernels._rows_per_program(rows_per_seed=8, programs_per_row=1, n_rows=4096, n_sms=1) == 8
    assert conv_kernels.CONFIG_OVERRIDE == {} and attention_kernels.CONFIG_OVERRIDE == {"q_block": 16}
    assert conv_kernels._rows_per_program(rows_per_seed=8, programs_per_row=1, n_rows=4096, n_sms=1) == \
        min(8, conv_kernels.BWD_MAX_ROWS)
    with pytest.raises(RuntimeError):
        with overrides.kernel_overrides({"conv": {"bwd_rows": 4}}):
            raise RuntimeError("the block fails")
    assert conv_kernels.CONFIG_OVERRIDE == {}
    with pytest.raises(ValueError, match="unknown kernel override namespace"):
        with overrides.kernel_overrides({"norm": {"x": 1}}):
            pass
