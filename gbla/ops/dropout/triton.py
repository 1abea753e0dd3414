"""Dropout fused with its neighbour in Triton: one kernel forward, one backward each; references in
naive.py.

relu_dropout (the FFN's activation):
    forward   y  = x * scale  where x > 0 and kept, else 0        (scale = 1 / (1 - p))
    backward  dx = dy * scale where y > 0, else 0

torch runs the FFN's activation as four passes over the (S, B, L, d_ff) hidden tensor, the widest
activation of the model: relu (read x, write), dropout (read, write y and a byte mask), and backward
dropout (read dy and the mask, write) then relu (read the gradient and relu's output, write); in a
profile of the 5-seed training step they were ~1.2 ms of its ~13 ms. Here the forward reads x and
writes y, the backward reads dy and y and writes dx; nothing but y is saved, and y is what the down
projection saves anyway.

dropout_add (a sublayer's output h into the residual stream x):
    forward   out = x + h * scale where kept                      (fp32 arithmetic, out of x's and h's promoted dtype)
    backward  dx = dout (no kernel),  dh = dout * scale where kept (the mask drawn again from the seed)
torch runs it as dropout (read h, write it and a byte mask) and an add (read both, write), and
backward the dropout's product (read dout and the mask, write) after a cast of dout to h's dtype;
here the forward reads x and h and writes out, the backward reads dout and writes dh, and nothing
is saved but the seed.

The keep mask: Philox seeded by an int64 seed tensor (gbla.ops.utils.draw_seed, drawn from torch's
generator, so each CUDA-graph replay draws anew), one Philox call per four consecutive elements
(all four of its outputs used), element i keeping iff output i % 4 of call i // 4 is >= p: a function
of (seed, i, p), the same whatever the block size. `keep_mask` draws it alone, for the tests.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from gbla.ops.dropout.naive import check_dropout_p
from gbla.ops.utils import draw_seed, interpreting


@triton.jit
def _keep(seed, groups, lane, p):
    """Keep mask (len(groups), 4) of elements groups * 4 + lane: one Philox call per group."""
    r0, r1, r2, r3 = tl.rand4x(seed, groups)
    r = tl.where(lane[None, :] == 0, r0[:, None],
                 tl.where(lane[None, :] == 1, r1[:, None], tl.where(lane[None, :] == 2, r2[:, None], r3[:, None])))
    return r >= p


@triton.jit
def _tile(BLOCK_G: tl.constexpr):
    """This program's groups of four elements, the lanes 0..3, and the elements (groups, 4)."""
    groups = tl.program_id(0).to(tl.int64) * BLOCK_G + tl.arange(0, BLOCK_G)
    lane = tl.arange(0, 4)
    return groups, lane, groups[:, None] * 4 + lane[None, :]


@triton.jit
def _relu_dropout_fwd_kernel(x_ptr, y_ptr, seed_ptr, N, p, scale, BLOCK_G: tl.constexpr):
    groups, lane, offs = _tile(BLOCK_G)
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
    groups, lane, offs = _tile(BLOCK_G)
    keep = _keep(tl.load(seed_ptr), groups, lane, p)
    tl.store(out_ptr + offs, keep.to(tl.uint8), mask=offs < N)


@triton.jit
def _dropout_add_fwd_kernel(x_ptr, h_ptr, out_ptr, seed_ptr, N, p, scale, BLOCK_G: tl.constexpr):
    groups, lane, offs = _tile(BLOCK_G)
    ok = offs < N
    x = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    h = tl.load(h_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    keep = _keep(tl.load(seed_ptr), groups, lane, p)
    tl.store(out_ptr + offs, (x + tl.where(keep, h * scale, 0.0)).to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _dropout_add_bwd_kernel(dout_ptr, dh_ptr, seed_ptr, N, p, scale, BLOCK_G: tl.constexpr):
    groups, lane, offs = _tile(BLOCK_G)
    ok = offs < N
    dout = tl.load(dout_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    keep = _keep(tl.load(seed_ptr), groups, lane, p)
    tl.store(dh_ptr + offs, tl.where(keep, dout * scale, 0.0).to(dh_ptr.dtype.element_ty), mask=ok)


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


class _DropoutAdd(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, h, p, seed):
        x, h = x.contiguous(), h.contiguous()
        out = torch.empty(x.shape, device=x.device, dtype=torch.result_type(x, h))
        n, bg = x.numel(), _block_groups(x.device)
        scale = 1.0 / (1.0 - p)
        _dropout_add_fwd_kernel[(triton.cdiv(n, 4 * bg),)](x, h, out, seed, n, p, scale, BLOCK_G=bg, num_warps=4)
        ctx.save_for_backward(seed)
        ctx.p, ctx.scale, ctx.x_dtype, ctx.h_dtype = p, scale, x.dtype, h.dtype
        return out

    @staticmethod
    def backward(ctx, dout):
        (seed,) = ctx.saved_tensors
        dout = dout.contiguous()
        dh = torch.empty(dout.shape, device=dout.device, dtype=ctx.h_dtype)
        n, bg = dout.numel(), _block_groups(dout.device)
        _dropout_add_bwd_kernel[(triton.cdiv(n, 4 * bg),)](dout, dh, seed, n, ctx.p, ctx.scale, BLOCK_G=bg,
                                                           num_warps=4)
        return dout.to(ctx.x_dtype), dh, None, None


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


def dropout_add_triton(x: torch.Tensor, h: torch.Tensor, p: float, seed: torch.Tensor | None = None) -> torch.Tensor:
    """x + dropout(h, p) with the mask drawn by the kernel from `seed` (as relu_dropout_triton; the
    same mask for the same seed and h's shape). x and h of one shape."""
    check_dropout_p(p)
    if x.shape != h.shape:
        raise ValueError(f"dropout_add_triton: x {tuple(x.shape)} and h {tuple(h.shape)} must have one shape")
    if h.device.type != "cuda" and not interpreting():
        raise RuntimeError("dropout_add_triton needs CUDA tensors, or TRITON_INTERPRET=1 on the CPU")
    if h.numel() == 0:
        return x + h
    seed = draw_seed(h.device) if seed is None else seed.to(h.device, torch.int64)
    return _DropoutAdd.apply(x, h, float(p), seed)


def keep_mask(seed: torch.Tensor, shape, p: float) -> torch.Tensor:
    """The boolean keep mask relu_dropout_triton and dropout_add_triton draw for this seed, p and shape."""
    check_dropout_p(p)
    n = 1
    for d in shape:
        n *= int(d)
    out = torch.empty(n, device=seed.device, dtype=torch.uint8)
    if n:
        bg = _block_groups(seed.device)
        _keep_mask_kernel[(triton.cdiv(n, 4 * bg),)](seed.to(torch.int64), out, n, float(p), BLOCK_G=bg, num_warps=4)
    return out.view(*shape).bool()


__all__ = ["relu_dropout_triton", "dropout_add_triton", "keep_mask"]
