"""Fused Triton dropouts vs the torch references (gbla/ops/dropout/naive.py): ReLU + dropout, and
dropout + residual add.

Interpreter on the CPU (TRITON_INTERPRET=1) as in CI, compiled on a GPU with GBLA_TEST_CUDA=1. The
kernels draw their own mask: the tests read it with keep_mask (same seed) and compare outputs and
gradients with the reference applied with that mask, fp32 and bf16 (and the fp32 residual plus a bf16
sublayer output, as under autocast), sizes that are not a multiple of four or of a block; then the
mask itself: its keep rate, its dependence on the seed only.
"""

from kernel_checks import DEVICE, assert_close_to_float64  # first: picks the interpreter without a GPU

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not importable on this machine")

from gbla.ops.dropout import dropout_add, dropout_add_reference, relu_dropout, relu_dropout_reference  # noqa: E402
from gbla.ops.dropout.triton import dropout_add_triton, keep_mask, relu_dropout_triton  # noqa: E402
from gbla.ops.utils import draw_seed  # noqa: E402

TOL = {torch.float32: (1e-6, 1e-7), torch.bfloat16: (1e-2, 1e-3)}

CASES = [  # shape, dtype, p
    ((2, 3, 7, 32), torch.float32, 0.15),
    ((2, 3, 7, 32), torch.bfloat16, 0.15),
    ((5, 4, 13, 96), torch.bfloat16, 0.15),   # several programs
    ((3, 5, 11), torch.float32, 0.5),         # 165 elements: neither a multiple of 4 nor of a block
    ((1, 1, 1, 3), torch.float32, 0.3),       # fewer elements than one group of four
]


@pytest.mark.parametrize("shape,dtype,p", CASES)
def test_matches_reference_with_the_kernels_mask(shape, dtype, p):
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(shape, generator=g).to(DEVICE, dtype)
    x.view(-1)[:2] = 0                     # exact zeros: relu'(0) = 0 in both
    dy = torch.randn(shape, generator=g).to(DEVICE, dtype)
    seed = draw_seed(torch.device(DEVICE))
    keep = keep_mask(seed, shape, p)

    xt = x.detach().requires_grad_()
    y = relu_dropout_triton(xt, p, seed)
    (dx,) = torch.autograd.grad(y, xt, dy)
    x64 = x.double().requires_grad_()
    ref = relu_dropout_reference(x64, p, keep=keep)
    (rdx,) = torch.autograd.grad(ref, x64, dy.double())

    assert y.dtype == dtype and dx.dtype == dtype and y.shape == x.shape
    assert_close_to_float64("y", y, ref, *TOL[dtype])
    assert_close_to_float64("dx", dx, rdx, *TOL[dtype])
    # exactly zero where dropped or x <= 0, and the gradient too
    assert torch.equal(y != 0, keep & (x > 0)) and torch.equal(dx != 0, (keep & (x > 0)) & (dy != 0))


def test_mask_depends_on_the_seed_only_and_keeps_one_minus_p():
    n, p = 40_000, 0.15
    dev = torch.device(DEVICE)
    seed = draw_seed(dev)
    keep = keep_mask(seed, (n,), p)
    assert torch.equal(keep, keep_mask(seed.clone(), (n,), p))              # same seed, same draw
    assert torch.equal(keep_mask(seed, (8, n // 8), p).flatten(), keep)     # a function of the element index
    assert not torch.equal(keep, keep_mask(draw_seed(dev), (n,), p))
    rate, sd = keep.double().mean().item(), (p * (1 - p) / n) ** 0.5
    assert abs(rate - (1 - p)) < 5 * sd, rate
    # each of a Philox call's four lanes keeps 1 - p, and independently of its neighbour lane and of
    # the same lane of the next call (a draw shared or misrouted between lanes shows up here)
    lanes = keep.view(-1, 4).double()
    m = lanes.shape[0]
    for j in range(4):
        assert abs(lanes[:, j].mean().item() - (1 - p)) < 5 * (p * (1 - p) / m) ** 0.5, j
        both = (lanes[:, j] * lanes[:, (j + 1) % 4]).mean().item()
        assert abs(both - (1 - p) ** 2) < 5 * ((1 - p) ** 2 * (1 - (1 - p) ** 2) / m) ** 0.5, j
        nxt = (lanes[:-1, j] * lanes[1:, j]).mean().item()
        assert abs(nxt - (1 - p) ** 2) < 5 * ((1 - p) ** 2 * (1 - (1 - p) ** 2) / (m - 1)) ** 0.5, j


def test_forward_draws_what_keep_mask_says():
    """The forward's zeros are the mask's (x > 0 everywhere), also when the input is a strided view."""
    p, dev = 0.4, torch.device(DEVICE)
    x = (torch.rand(6, 50, device=dev) + 0.5).t()        # (50, 6), not contiguous
    seed = draw_seed(dev)
    y = relu_dropout_triton(x, p, seed)
    assert torch.equal(y != 0, keep_mask(seed, x.shape, p))
    torch.testing.assert_close(y[y != 0], (x / (1 - p))[y != 0])


def test_dispatch_eval_p0_and_empty():
    dev = torch.device(DEVICE)
    x = torch.randn(3, 9, device=dev)
    for backend in ("torch", "triton"):
        assert torch.equal(relu_dropout(x, 0.3, training=False, backend=backend), torch.relu(x))
        assert torch.equal(relu_dropout(x, 0.0, backend=backend), torch.relu(x))
    empty = torch.zeros(0, 4, device=dev)
    assert relu_dropout_triton(empty, 0.2).shape == (0, 4)
    with pytest.raises(ValueError, match="dropout p"):
        relu_dropout(x, 1.0, backend="triton")
    with pytest.raises(ValueError, match="keep must have"):
        relu_dropout_reference(x, 0.1, keep=torch.ones(3, 8, dtype=torch.bool))


def test_model_ffn_draws_its_mask_from_torchs_generator():
    """TIGER's FeedForward on the kernels in training: down(relu_dropout(up(x))) with the mask of the
    seed that torch's generator gives at that point, so a run is reproducible from its seed."""
    from gbla.model import FeedForward

    dev = torch.device(DEVICE)
    ffn = FeedForward(8, 24, dropout=0.25, num_seeds=2, backend="triton").to(dev).train()
    x = torch.randn(2, 3, 5, 8, device=dev)
    torch.manual_seed(11)
    seed = draw_seed(dev)
    torch.manual_seed(11)
    y = ffn(x)
    hidden = ffn.up(x)
    ref = ffn.down(relu_dropout_reference(hidden, 0.25, keep=keep_mask(seed, hidden.shape, 0.25)))
    torch.testing.assert_close(y, ref)
    assert torch.equal(ffn.eval()(x), ffn.down(torch.relu(hidden)))


ADD_CASES = [  # shape, x dtype, h dtype, p
    ((2, 3, 7, 32), torch.float32, torch.float32, 0.15),
    ((2, 3, 7, 32), torch.float32, torch.bfloat16, 0.15),   # the fp32 residual + a bf16 sublayer (autocast)
    ((5, 4, 13, 24), torch.bfloat16, torch.bfloat16, 0.15),
    ((3, 5, 11), torch.float32, torch.float32, 0.5),         # 165 elements
]


@pytest.mark.parametrize("shape,x_dtype,h_dtype,p", ADD_CASES)
def test_dropout_add_matches_reference_with_the_kernels_mask(shape, x_dtype, h_dtype, p):
    g = torch.Generator().manual_seed(sum(shape) + 1)
    x = torch.randn(shape, generator=g).to(DEVICE, x_dtype)
    h = torch.randn(shape, generator=g).to(DEVICE, h_dtype)
    out_dtype = torch.result_type(x, h)
    dout = torch.randn(shape, generator=g).to(DEVICE, out_dtype)
    seed = draw_seed(torch.device(DEVICE))
    keep = keep_mask(seed, shape, p)

    xt, ht = x.detach().requires_grad_(), h.detach().requires_grad_()
    out = dropout_add_triton(xt, ht, p, seed)
    dx, dh = torch.autograd.grad(out, (xt, ht), dout)
    x64, h64 = x.double().requires_grad_(), h.double().requires_grad_()
    ref = dropout_add_reference(x64, h64, p, keep=keep)
    rdx, rdh = torch.autograd.grad(ref, (x64, h64), dout.double())

    assert out.dtype == out_dtype and dx.dtype == x_dtype and dh.dtype == h_dtype
    assert_close_to_float64("out", out, ref, *TOL[out_dtype])
    assert_close_to_float64("dx", dx, rdx, *TOL[x_dtype])
    assert_close_to_float64("dh", dh, rdh, *TOL[h_dtype])
    assert torch.equal(dh != 0, keep & (dout != 0))          # the backward draws the forward's mask again


def test_dropout_add_draws_the_same_mask_as_relu_dropout_and_dispatches():
    dev = torch.device(DEVICE)
    x, h = torch.zeros(4, 33, device=dev), torch.rand(4, 33, device=dev) + 0.5
    seed = draw_seed(dev)
    assert torch.equal(dropout_add_triton(x, h, 0.3, seed) != 0, relu_dropout_triton(h, 0.3, seed) != 0)
    for backend in ("torch", "triton"):
        assert torch.equal(dropout_add(x, h, 0.3, training=False, backend=backend), x + h)
        assert torch.equal(dropout_add(x, h, 0.0, backend=backend), x + h)
    # shapes that only broadcast take the reference (the kernels need one shape)
    assert dropout_add(torch.zeros(4, 33, device=dev), torch.ones(33, device=dev), 0.3, backend="triton").shape == (4, 33)
    with pytest.raises(ValueError, match="one shape"):
        dropout_add_triton(x, h[:, :5], 0.3)
    with pytest.raises(ValueError, match="keep must have"):
        dropout_add_reference(x, h, 0.1, keep=torch.ones(4, 8, dtype=torch.bool, device=dev))


def test_model_blocks_add_their_sublayers_through_the_kernels(monkeypatch):
    """TIGER's encoder and decoder blocks in training on the kernels: each residual add is a
    dropout_add on the backend the block was given (the calls are counted), and in evaluation x + h."""
    from gbla import model as model_module
    from gbla.config import GBLAOptions, ModelConfig

    calls = []
    real = model_module.dropout_add

    def counting(x, h, p, training=True, *, backend="auto"):
        calls.append((backend, training, p))
        return real(x, h, p, training, backend=backend)

    monkeypatch.setattr(model_module, "dropout_add", counting)
    cfg = ModelConfig(encoder_layout=("sa", "gbla"), gbla=GBLAOptions(), d_model=16, num_heads=2, head_dim=16,
                      d_ff=32, num_decoder_layers=2, dropout=0.2, num_user_buckets=7)
    tiger = model_module.TIGER(cfg, (4, 4, 4, 4), backend="triton", num_seeds=2).init_seeds([0, 1]).to(DEVICE)
    enc = torch.randint(2, 10, (2, 3, 9), device=DEVICE)
    target = torch.randint(0, 4, (2, 3, 4), device=DEVICE)
    losses = tiger.train().loss(enc, target)
    losses.sum().backward()
    assert torch.isfinite(losses).all()
    assert calls == [("triton", True, 0.2)] * (2 * 2 + 2 * 3)   # 2 per encoder block, 3 per decoder block
