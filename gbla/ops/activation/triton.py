"""ReLU + dropout in Triton: one kernel forward, one backward; reference in naive.py.

    forward   y  = x * scale  where x > 0 and kept, else 0        (scale = 1 / (1 - p))
    backward  dx = dy * scale where y > 0, else 0

torch runs the FFN's activation as four passes over the (S, B, L, d_ff) hidden tensor, the widest
activation of the model: relu (read x, write), dropout (read, write y and a byte mask), and backward
dropout (read dy and the mask, write) then relu (read the gradient and relu's output, write); in a
profile of the 5-seed training step they were ~1.2 ms of its ~13 ms. Here the forward reads x and
writes y, the backward reads dy and y and writes dx; nothing but y is saved, and y is what the down
projection saves anyway.

The keep mask: Philox seeded by an int64 seed tensor (gbla.ops.utils.draw_seed, drawn from torch's
generator, so each CUDA-graph replay draws anew), one Philox call per four consecutive elements
(all four of its outputs used), element i keeping iff output i % 4 of call i // 4 is >= p: a function
of (seed, i, p), the same whatever the block size. `keep_mask` draws it alone, for the tests.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from gbla.ops.activation.naive import check_dropout_p
from gbla.ops.utils import draw_seed, interpreting


@triton.jit
def _keep(seed, groups, lane, p):
    """Keep mask (len(groups), 4) of elements groups * 4 + lane: one Philox call per group."""
    r0, r1, r2, r3 = tl.rand4x(seed, groups)
    r = tl.where(lane[None, :] == 0, r0[:, None],
                 tl.where(lane[None, :] == 1, r1[:, None], tl.where(lane[None, :] == 2, r2[:, None], r3[:, None])))
    return r >= p


@triton.jit
def _relu_dropout_fwd_kernel(x_ptr, y_ptr, seed_ptr, N, p, scale, BLOCK_G: tl.constexpr):
    groups = tl.program_id(0).to(tl.int64) * BLOCK_G + tl.arange(0, BLOCK_G)
    lane = tl.arange(0, 4)
    offs = groups[:, None] * 4 + lane[None, :]
    ok = offs < N
    x = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    keep = _keep(tl.load(seed_ptr), groups, lane, p)
    y = tl.where(keep & (x > 0), x * scale, 0.0)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _relu_dropout_bwd_kernel(dy_ptr, y_ptr, dx_ptr, N, scale, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    y = tl.load(y_ptr + offs, mask=ok, other=0.0)
    dy = tl.load(dy_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    dx = tl.where(y > 0, dy * scale, 0.0)
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _keep_mask_kernel(seed_ptr, out_ptr, N, p, BLOCK_G: tl.constexpr):
    groups = tl.program_id(0).to(tl.int64) * BLOCK_G + tl.arange(0, BLOCK_G)
    lane = tl.arange(0, 4)
    offs = groups[:, None] * 4 + lane[None, :]
    keep = _keep(tl.load(seed_ptr), groups, lane, p)
    tl.store(out_ptr + offs, keep.to(tl.uint8), mask=offs < N)


def _block_groups(device: torch.device) -> int:
    """Groups of four elements per program: 1024 elements on a GPU, small tiles for the interpreter."""
    return 16 if interpreting() or device.type != "cuda" else 256


class _ReluDropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, p, seed):
        x = x.contiguous()
        y = torch.empty_like(x)
        n, bg = x.numel(), _block_groups(x.device)
        scale = 1.0 / (1.0 - p)
        _relu_dropout_fwd_kernel[(triton.cdiv(n, 4 * bg),)](x, y, seed, n, p, scale, BLOCK_G=bg, num_warps=4)
        ctx.save_for_backward(y)
        ctx.scale = scale
        return y

    @staticmethod
    def backward(ctx, dy):
        (y,) = ctx.saved_tensors
        dy = dy.contiguous()
        dx = torch.empty_like(y)
        n, block = y.numel(), 4 * _block_groups(y.device)
        _relu_dropout_bwd_kernel[(triton.cdiv(n, block),)](dy, y, dx, n, ctx.scale, BLOCK=block, num_warps=4)
        return dx, None, None


def relu_dropout_triton(x: torch.Tensor, p: float, seed: torch.Tensor | None = None) -> torch.Tensor:
    """dropout(relu(x), p) with the mask drawn by the kernel from `seed` (an int64 (1,) tensor on x's
    device; a fresh draw_seed when None). Same contract as relu_dropout_reference in training."""
    check_dropout_p(p)
    if x.device.type != "cuda" and not interpreting():
        raise RuntimeError("relu_dropout_triton needs CUDA tensors, or TRITON_INTERPRET=1 on the CPU")
    if x.numel() == 0:
        return torch.relu(x)
    seed = draw_seed(x.device) if seed is None else seed.to(x.device, torch.int64)
    return _ReluDropout.apply(x, float(p), seed)


def keep_mask(seed: torch.Tensor, shape, p: float) -> torch.Tensor:
    """The boolean keep mask relu_dropout_triton draws for this seed, p and shape (of x)."""
    check_dropout_p(p)
    n = 1
    for d in shape:
        n *= int(d)
    out = torch.empty(n, device=seed.device, dtype=torch.uint8)
    if n:
        bg = _block_groups(seed.device)
        _keep_mask_kernel[(triton.cdiv(n, 4 * bg),)](seed.to(torch.int64), out, n, float(p), BLOCK_G=bg, num_warps=4)
    return out.view(*shape).bool()


__all__ = ["relu_dropout_triton", "keep_mask"]
