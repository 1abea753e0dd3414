"""Fused Triton causal depthwise Conv1D + SiLU vs the torch reference (gbla/ops/conv/naive.py).

Interpreter on the CPU (TRITON_INTERPRET=1) as in CI; compared to a float64 evaluation of the
reference on the same inputs, output and the gradients of x, weight and bias.
"""

from kernel_checks import DEVICE, assert_close_to_float64  # first: picks the interpreter without a GPU

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not importable on this machine")

from gbla.ops.conv import causal_conv1d_silu, causal_conv1d_silu_reference  # noqa: E402
from gbla.ops.conv.triton import causal_conv1d_silu_triton  # noqa: E402

TOL = {torch.float32: (2e-5, 2e-6), torch.bfloat16: (2e-2, 2e-3)}


def assert_close(name, got, ref64, dtype):
    assert_close_to_float64(name, got, ref64, *TOL[dtype])


def padded_mask(B, L):
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[0, : L // 3] = False      # left padding
    mask[1, L - L // 4:] = False   # right padding
    mask[2] = False                # all padded
    return mask.to(DEVICE)


CASES = [  # (B, L, C, K, bias, masked, dtype)
    (3, 17, 48, 4, True, True, torch.float32),
    (2, 5, 20, 3, False, False, torch.float32),
    (3, 40, 64, 4, True, True, torch.bfloat16),
    (1, 1, 16, 1, True, False, torch.float32),
    (3, 70, 33, 2, True, True, torch.float32),
    (3, 37, 40, 6, True, True, torch.float32),     # K > 4: the general backward path
    (3, 37, 40, 6, False, True, torch.bfloat16),
]


@pytest.mark.parametrize("B,L,C,K,bias,masked,dtype", CASES)
def test_conv_matches_reference(B, L, C, K, bias, masked, dtype):
    g = torch.Generator().manual_seed(L * 100 + C)
    # x as a strided slice of a wider tensor, as when q/k/v come out of one fused projection
    wide = torch.randn(B, L, 2 * C, generator=g).to(DEVICE, dtype)
    x = wide[..., C:]
    w = torch.randn(C, K, generator=g).to(DEVICE)
    b = torch.randn(C, generator=g).to(DEVICE) if bias else None
    mask = padded_mask(B, L) if masked else None
    dy = torch.randn(B, L, C, generator=g).to(DEVICE, dtype)

    def run(fn, upcast):
        leaves = [t.detach().double() if upcast else t.detach() for t in (x, w, b) if t is not None]
        leaves = [t.requires_grad_() for t in leaves]
        xx, ww = leaves[0], leaves[1]
        bb = leaves[2] if bias else None
        y = fn(xx, ww, bb, mask)
        return y, torch.autograd.grad(y, leaves, dy.to(y.dtype))

    y_tri, g_tri = run(causal_conv1d_silu_triton, False)
    y_64, g_64 = run(causal_conv1d_silu_reference, True)
    assert y_tri.dtype == dtype
    assert_close("y", y_tri, y_64, dtype)
    if mask is not None:
        assert (y_tri[~mask] == 0).all() and (g_tri[0][~mask] == 0).all()
    for name, a, r in zip(("dx", "dw", "db"), g_tri, g_64):
        assert_close(name, a, r, dtype if name == "dx" else torch.float32 if dtype == torch.float32 else dtype)


def test_padding_never_leaks_and_dispatch():
    """Changing x at padded positions changes nothing; backend='triton' goes through the kernel."""
    B, L, C, K = 3, 12, 16, 4
    x = torch.randn(B, L, C, device=DEVICE)
    w, b = torch.randn(C, K, device=DEVICE), torch.randn(C, device=DEVICE)
    mask = padded_mask(B, L)
    y1 = causal_conv1d_silu(x, w, b, mask, backend="triton")
    y2 = causal_conv1d_silu(x + 100.0 * (~mask)[..., None], w, b, mask, backend="triton")
    assert torch.equal(y1, y2)


def test_bad_shapes_raise():
    x = torch.randn(2, 5, 8, device=DEVICE)
    with pytest.raises(ValueError, match="weight"):
        causal_conv1d_silu_triton(x, torch.randn(7, 4, device=DEVICE))
    with pytest.raises(ValueError, match="mask"):
        causal_conv1d_silu_triton(x, torch.randn(8, 4, device=DEVICE), mask=torch.ones(2, 5, device=DEVICE))


def stacked_fwd_bwd(fn, upcast, x, w, b, mask, dy):
    """y = fn(x, w, b, mask) on fresh leaves (float64 copies with upcast) and the gradients of x, w and
    b (when given) for the output gradient dy."""
    leaves = [(t.detach().double() if upcast else t.detach()).requires_grad_() for t in (x, w, b) if t is not None]
    y = fn(leaves[0], leaves[1], leaves[2] if b is not None else None, mask)
    return y, torch.autograd.grad(y, leaves, dy.to(y.dtype))


STACKED_CASES = [  # (S, B, L, C, K, bias, masked, dtype)
    (3, 3, 17, 48, 4, True, True, torch.float32),
    (2, 3, 40, 64, 4, True, True, torch.bfloat16),
    (2, 3, 37, 40, 6, False, True, torch.float32),   # K > 4: the general backward path
    (1, 4, 9, 24, 4, True, False, torch.float32),
]


@pytest.mark.parametrize("S,B,L,C,K,bias,masked,dtype", STACKED_CASES)
def test_stacked_seeds_match_the_reference_and_one_call_per_seed(S, B, L, C, K, bias, masked, dtype):
    """Seeds stacked (x (S, B, L, C), weight (S, C, K)): one launch per kernel for all seeds against the
    float64 reference, and against the kernels called once per seed (the layer's former loop): the
    same output to the bit and the same gradients up to summation order."""
    g = torch.Generator().manual_seed(S * 1000 + L)
    x = torch.randn(S, B, L, 3 * C, generator=g).to(DEVICE, dtype)[..., C:2 * C]   # a slice of a projection
    w = torch.randn(S, C, K, generator=g).to(DEVICE)
    b = torch.randn(S, C, generator=g).to(DEVICE) if bias else None
    mask = torch.stack([padded_mask(B, L).roll(s, dims=0) for s in range(S)]) if masked else None
    dy = torch.randn(S, B, L, C, generator=g).to(DEVICE, dtype)

    def run(fn, upcast):
        return stacked_fwd_bwd(fn, upcast, x, w, b, mask, dy)

    def per_seed(xx, ww, bb, m):
        return torch.stack([causal_conv1d_silu_triton(xx[s], ww[s], None if bb is None else bb[s],
                                                      None if m is None else m[s]) for s in range(S)])

    y_tri, g_tri = run(causal_conv1d_silu_triton, False)
    y_64, g_64 = run(causal_conv1d_silu_reference, True)
    y_one, g_one = run(per_seed, False)
    assert y_tri.shape == (S, B, L, C) and y_tri.dtype == dtype
    assert_close("y", y_tri, y_64, dtype)
    assert torch.equal(y_tri, y_one)
    for name, a, r, one in zip(("dx", "dw", "db"), g_tri, g_64, g_one):
        assert a.shape == r.shape, name
        assert_close(name, a, r, dtype if name == "dx" else torch.float32 if dtype == torch.float32 else dtype)
        if name == "dx":
            assert torch.equal(a, one)
        else:
            torch.testing.assert_close(a, one, rtol=1e-5, atol=1e-5)
    if mask is not None:
        assert (y_tri[~mask] == 0).all() and (g_tri[0][~mask] == 0).all()


def test_stacked_bad_shapes_raise():
    x = torch.randn(2, 3, 5, 8, device=DEVICE)
    for fn in (causal_conv1d_silu_triton, causal_conv1d_silu_reference):
        with pytest.raises(ValueError, match=r"weight must be \(S, C, K\) with S=2, C=8"):
            fn(x, torch.randn(8, 4, device=DEVICE))
        with pytest.raises(ValueError, match="bias must be"):
            fn(x, torch.randn(2, 8, 4, device=DEVICE), torch.randn(8, device=DEVICE))
        with pytest.raises(ValueError, match=r"mask must be \(2, 3, 5\)"):
            fn(x, torch.randn(2, 8, 4, device=DEVICE), mask=torch.ones(3, 5, dtype=torch.bool, device=DEVICE))
        with pytest.raises(ValueError, match="x must be"):
            fn(x[None], torch.randn(2, 8, 4, device=DEVICE))


def test_gpu_row_tiles_follow_the_length(monkeypatch):
    """The GPU launch's row tiles by length (measured in gbla.bench.conv_speed at the training shapes):
    the forward takes the tile that pads L the least (32 on ties), the backward 8 rows for the training
    lengths above 16, and a benchmark's override wins. Only the choice is checked here: no kernel runs."""
    from gbla.ops.conv import triton as conv_triton
    monkeypatch.setattr(conv_triton, "interpreting", lambda: False)
    cuda = torch.device("cuda")
    fwd = {L: conv_triton._conv_config(cuda, L)[0] for L in (1, 13, 16, 25, 41, 48, 81, 32768)}
    assert fwd == {1: 16, 13: 16, 16: 16, 25: 32, 41: 16, 48: 16, 81: 32, 32768: 32}
    bwd = {L: conv_triton._conv_config(cuda, L, backward=True)[0] for L in (13, 16, 17, 25, 81, 128, 129, 32768)}
    assert bwd == {13: 16, 16: 16, 17: 8, 25: 8, 81: 8, 128: 8, 129: 16, 32768: 16}
    monkeypatch.setattr(conv_triton, "CONFIG_OVERRIDE", {"fwd_block_t": 64, "bwd_block_t": 32})
    assert conv_triton._conv_config(cuda, 13)[0] == 64
    assert conv_triton._conv_config(cuda, 41, backward=True)[0] == 32
    assert conv_triton._conv_config(torch.device("cpu"), 41) == (16, 32, 4)


def test_rows_per_program_choice(monkeypatch):
    """The backward's rows per program: the largest divisor of the rows per seed under the cap that
    leaves BWD_MIN_PROGRAMS_PER_SM programs per SM; the default cap keeps one row per program."""
    from gbla.ops.conv import triton as conv_triton
    pick = conv_triton._rows_per_program
    # the training step's backward: 5 seeds x 256 rows, 9 channel blocks of 1152, one chunk, 132 SMs
    assert pick(256, 9, 1280, 132) == conv_triton.BWD_MAX_ROWS == 1
    monkeypatch.setattr(conv_triton, "CONFIG_OVERRIDE", {"bwd_rows": 16})
    assert pick(256, 9, 1280, 132) == 8          # 16 rows would leave 720 programs, under 8 x 132
    assert pick(256, 9, 1280, 4) == 16
    assert pick(12, 1, 24, 1) == 3               # 4 and 6 divide 12 but leave fewer than 8 programs
    assert pick(7, 100, 7, 1) == 7 and pick(7, 1, 7, 1) == 1
    monkeypatch.setattr(conv_triton, "CONFIG_OVERRIDE", {"bwd_rows": 16, "bwd_min_programs_per_sm": 2})
    assert pick(256, 9, 1280, 132) == 16
    monkeypatch.setattr(conv_triton, "CONFIG_OVERRIDE", {"bwd_rows": 0})
    with pytest.raises(ValueError, match="bwd_rows"):
        pick(256, 9, 1280, 132)


@pytest.mark.parametrize("rows_cap", [2, 4])
@pytest.mark.parametrize("S,B,L,C,K,bias,masked,dtype", [STACKED_CASES[0], STACKED_CASES[1], STACKED_CASES[2]])
def test_backward_with_rows_per_program(monkeypatch, rows_cap, S, B, L, C, K, bias, masked, dtype):
    """Several rows per program in the backward's first kernel (each program accumulating dw / dbias over
    its rows before one reduction): dx to the bit and dw / dbias up to summation order against one row
    per program, and all three against the float64 reference."""
    from gbla.ops.conv import triton as conv_triton
    B = 2 * B   # 6 rows per seed: caps 2 and 4 take 2 and 3 rows per program
    g = torch.Generator().manual_seed(S * 100 + L)
    x = torch.randn(S, B, L, C, generator=g).to(DEVICE, dtype)
    w = torch.randn(S, C, K, generator=g).to(DEVICE)
    b = torch.randn(S, C, generator=g).to(DEVICE) if bias else None
    mask = torch.stack([torch.cat([padded_mask(3, L)] * 2).roll(s, dims=0) for s in range(S)]) if masked else None
    dy = torch.randn(S, B, L, C, generator=g).to(DEVICE, dtype)

    def grads(fn, upcast):
        return stacked_fwd_bwd(fn, upcast, x, w, b, mask, dy)[1]

    one_row = grads(causal_conv1d_silu_triton, False)
    chosen = []
    monkeypatch.setattr(conv_triton, "CONFIG_OVERRIDE", {"bwd_rows": rows_cap})
    monkeypatch.setattr(conv_triton, "BWD_MIN_PROGRAMS_PER_SM", 1)
    # the SM count the choice sees: 2 on every device, so that these small shapes (18 rows) take several
    # rows per program on a GPU too (with its real count, 132 on an H100/H200, they would take one)
    monkeypatch.setattr(conv_triton, "num_sms", lambda device, default=4: 2)
    real_pick = conv_triton._rows_per_program
    monkeypatch.setattr(conv_triton, "_rows_per_program", lambda *a: chosen.append(real_pick(*a)) or chosen[-1])
    grouped = grads(causal_conv1d_silu_triton, False)
    ref64 = grads(causal_conv1d_silu_reference, True)
    assert chosen == [{2: 2, 4: 3}[rows_cap]]
    for name, got, one, r in zip(("dx", "dw", "db"), grouped, one_row, ref64):
        assert_close(name, got, r, dtype if name == "dx" else torch.float32 if dtype == torch.float32 else dtype)
        if name == "dx":
            assert torch.equal(got, one)
        else:
            torch.testing.assert_close(got, one, rtol=1e-5, atol=1e-5)
