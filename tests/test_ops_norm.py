"""Fused Triton RMSNorm with a weight per seed vs the torch reference (gbla/ops/norm/naive.py).

Interpreter on the CPU (TRITON_INTERPRET=1) as in CI, compiled on a GPU with GBLA_TEST_CUDA=1;
compared to a float64 evaluation of the reference on the same inputs: output, dx and the weight's
gradient, fp32 and bf16, odd sizes, several seeds, rows that span many programs, all-zero rows.
"""

from kernel_checks import DEVICE, assert_close_to_float64  # first: picks the interpreter without a GPU

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not importable on this machine")

from gbla.ops.norm import seed_rms_norm, seed_rms_norm_reference  # noqa: E402
from gbla.ops.norm.triton import seed_rms_norm_triton  # noqa: E402

TOL = {torch.float32: (2e-6, 1e-7), torch.bfloat16: (1e-2, 1e-3)}


def assert_close(name, got, ref64, dtype):
    assert_close_to_float64(name, got, ref64, *TOL[dtype])


CASES = [  # shape (S, ..., D), dtype
    ((3, 5, 7, 24), torch.float32),
    ((5, 4, 81, 128), torch.float32),    # the model's: 5 seeds, rows of 128, many programs per seed
    ((5, 4, 81, 128), torch.bfloat16),
    ((2, 13, 33), torch.bfloat16),       # odd D: a padded tile
    ((1, 1, 5), torch.float32),          # one seed, one row
    ((4, 3, 1, 1, 128), torch.float32),  # the decoder's beam step: (S, R, 1, D)
]


@pytest.mark.parametrize("shape,dtype", CASES)
def test_norm_matches_reference(shape, dtype):
    g = torch.Generator().manual_seed(sum(shape))
    S, D = shape[0], shape[-1]
    x = (3 * torch.randn(shape, generator=g)).to(DEVICE, dtype)
    x[0, ..., 0, :] = 0                  # an all-zero row: y = 0, finite gradients
    w = (1 + 0.5 * torch.randn(S, D, generator=g)).to(DEVICE)
    dy = torch.randn(shape, generator=g).to(DEVICE, dtype)
    eps = torch.finfo(dtype).eps

    xr, wr = x.detach().requires_grad_(), w.detach().requires_grad_()
    y = seed_rms_norm_triton(xr, wr)
    gx, gw = torch.autograd.grad(y, (xr, wr), dy)
    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
    ref = seed_rms_norm_reference(x64, w64, eps=eps)
    rx, rw = torch.autograd.grad(ref, (x64, w64), dy.double())

    assert y.dtype == dtype and gx.dtype == dtype and gw.dtype == w.dtype
    assert_close("y", y, ref, dtype)
    assert_close("dx", gx, rx, dtype)
    assert_close("dweight", gw, rw, torch.float32 if dtype == torch.float32 else torch.bfloat16)
    assert (y[0, ..., 0, :] == 0).all()


def test_each_seed_uses_its_own_weight_and_gets_its_own_gradient():
    """Stacked = one call per seed: seed s's rows scaled by weight[s] only, and weight[s]'s gradient
    from seed s's rows only (a program never mixes seeds in its partial sums)."""
    g = torch.Generator().manual_seed(7)
    S, B, L, D = 3, 6, 50, 64
    x = torch.randn(S, B, L, D, generator=g).to(DEVICE).requires_grad_()
    w = torch.randn(S, D, generator=g).to(DEVICE).requires_grad_()
    dy = torch.randn(S, B, L, D, generator=g).to(DEVICE)
    y = seed_rms_norm_triton(x, w)
    gx, gw = torch.autograd.grad(y, (x, w), dy)
    for s in range(S):
        xs, ws = x[s:s + 1].detach().requires_grad_(), w[s:s + 1].detach().requires_grad_()
        ys = seed_rms_norm_triton(xs, ws)
        gxs, gws = torch.autograd.grad(ys, (xs, ws), dy[s:s + 1])
        torch.testing.assert_close(y[s], ys[0], rtol=0, atol=0)
        torch.testing.assert_close(gx[s], gxs[0], rtol=0, atol=0)
        torch.testing.assert_close(gw[s], gws[0], rtol=2e-5, atol=1e-5)   # other chunking, other sum order


def test_dispatch_strided_input_and_errors():
    g = torch.Generator().manual_seed(3)
    wide = torch.randn(2, 9, 2 * 40, generator=g).to(DEVICE)
    x = wide[..., 40:]                                  # last-dim stride 1, rows strided
    w = torch.randn(2, 40, generator=g).to(DEVICE)
    ref = seed_rms_norm_reference(x, w)
    torch.testing.assert_close(seed_rms_norm(x, w, backend="triton"), ref, rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(seed_rms_norm(x, w, backend="torch"), ref, rtol=0, atol=0)
    with pytest.raises(ValueError, match="weight must be"):
        seed_rms_norm(x, w[:1], backend="torch")
    with pytest.raises(ValueError, match="x must be"):
        seed_rms_norm(torch.randn(5), w, backend="torch")
    assert seed_rms_norm_triton(torch.empty(2, 0, 40, device=DEVICE), w).shape == (2, 0, 40)


def test_under_autocast_the_output_is_what_the_next_linear_would_cast_it_to():
    """Under autocast the norm writes the autocast dtype (bf16): the value the reference's fp32 output
    becomes at the next linear layer's cast, to within one bf16 rounding step; the gradient still
    arrives at x in x's dtype, with the reference's values."""
    g = torch.Generator().manual_seed(11)
    S, B, L, D = 2, 3, 9, 64
    x = (2 * torch.randn(S, B, L, D, generator=g)).to(DEVICE).requires_grad_()
    w = (1 + 0.5 * torch.randn(S, D, generator=g)).to(DEVICE).requires_grad_()
    dy = torch.randn(S, B, L, D, generator=g).to(DEVICE, torch.bfloat16)
    with torch.autocast(device_type=DEVICE, dtype=torch.bfloat16):
        y = seed_rms_norm_triton(x, w)
    assert y.dtype == torch.bfloat16
    gx, gw = torch.autograd.grad(y, (x, w), dy)
    assert gx.dtype == torch.float32 and gw.dtype == torch.float32
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = seed_rms_norm_reference(x64, w64, eps=torch.finfo(torch.float32).eps)
    rx, rw = torch.autograd.grad(ref, (x64, w64), dy.double())
    torch.testing.assert_close(y.double(), ref.to(torch.bfloat16).double(), rtol=2 ** -7, atol=1e-6)
    assert_close("dx", gx, rx, torch.float32)
    assert_close("dweight", gw, rw, torch.float32)
