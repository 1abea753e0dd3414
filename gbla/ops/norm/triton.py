"""RMSNorm with a weight per seed in Triton: one kernel forward, one backward; reference in naive.py.

    r[row]  = 1 / sqrt(mean_d x[row, d]^2 + eps)
    y[row]  = x[row] * r[row] * w[s]                       (s: the row's seed)

Backward, with xhat = x * r and g = dy * w[s]:
    dx[row] = r[row] * (g - xhat * mean_d(g * xhat))
    dw[s]   = sum over seed s's rows of dy * xhat

The reference is torch's fused rms_norm and then the weight: three more passes over the tensor
forward (the product, and the weight's cast) and, backward, the product's two gradients and the sum
over rows for the weight - in a profile of the 5-seed training step, the norms' products and sums were
most of its ~100 elementwise products per step. Here one pass reads x and writes y (and r, one float
per row, for the backward); the backward reads x, r and dy once, writes dx, and sums dw per seed in
registers: programs own a chunk of one seed's rows, write their partial (chunk, seed, D), and one
fixed-order sum gives every seed's gradient (deterministic, no atomics). All arithmetic in fp32;
dx in x's dtype, y too except under autocast (see seed_rms_norm_triton).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from gbla.ops.norm.naive import check_norm_inputs
from gbla.ops.utils import interpreting, num_sms, sum_partials


@triton.jit
def _rms_fwd_kernel(x_ptr, w_ptr, y_ptr, rstd_ptr, sx, sy, R, D, ROWS_PER_CHUNK, eps,
                    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    c = tl.program_id(0)
    s = tl.program_id(1)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < D
    w = tl.load(w_ptr + s * D + cols, mask=col_ok, other=0.0).to(tl.float32)
    start = c * ROWS_PER_CHUNK
    end = tl.minimum(start + ROWS_PER_CHUNK, R)
    for r0 in range(start, end, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        row_ok = rows < end
        g = (s * R + rows).to(tl.int64)          # row of the (S * R, D) view
        ok = row_ok[:, None] & col_ok[None, :]
        x = tl.load(x_ptr + g[:, None] * sx + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        r = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / D + eps)
        y = x * r[:, None] * w[None, :]
        tl.store(y_ptr + g[:, None] * sy + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=ok)
        tl.store(rstd_ptr + g, r, mask=row_ok)


@triton.jit
def _rms_bwd_kernel(x_ptr, w_ptr, rstd_ptr, dy_ptr, dx_ptr, dw_part_ptr, sx, sdy, sdx, R, D, S, ROWS_PER_CHUNK,
                    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    c = tl.program_id(0)
    s = tl.program_id(1)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < D
    w = tl.load(w_ptr + s * D + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_D,), dtype=tl.float32)
    start = c * ROWS_PER_CHUNK
    end = tl.minimum(start + ROWS_PER_CHUNK, R)
    for r0 in range(start, end, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        row_ok = rows < end
        g = (s * R + rows).to(tl.int64)
        ok = row_ok[:, None] & col_ok[None, :]
        x = tl.load(x_ptr + g[:, None] * sx + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + g[:, None] * sdy + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        r = tl.load(rstd_ptr + g, mask=row_ok, other=0.0)
        xhat = x * r[:, None]
        gw = dy * w[None, :]
        dot = tl.sum(gw * xhat, axis=1) / D
        dx = r[:, None] * (gw - xhat * dot[:, None])
        tl.store(dx_ptr + g[:, None] * sdx + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=ok)
        dw += tl.sum(dy * xhat, axis=0)
    tl.store(dw_part_ptr + (c * S + s) * D + cols, dw, mask=col_ok)


def _norm_config(device: torch.device, D: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_D, num_warps): whole rows of D in one tile, ~4096 elements per tile."""
    block_d = triton.next_power_of_2(D)
    if interpreting() or device.type != "cuda":
        return max(1, min(8, 1024 // block_d)), block_d, 4
    return max(1, min(64, 4096 // block_d)), block_d, 4


def _chunks(R: int, S: int, block_r: int, device: torch.device) -> tuple[int, int]:
    """(rows per chunk, chunks per seed): ~4 programs per SM over all seeds, whole tiles per chunk."""
    wanted = max(1, min(triton.cdiv(R, block_r), triton.cdiv(4 * num_sms(device, default=2), S)))
    rows = triton.cdiv(triton.cdiv(R, wanted), block_r) * block_r
    return rows, triton.cdiv(R, rows)


class _SeedRMSNorm(torch.autograd.Function):
    """x (S * R, D) with row stride sx and column stride 1, rows [s * R, (s + 1) * R) of seed s;
    weight (S, D) contiguous; y in `out_dtype`."""
    @staticmethod
    def forward(ctx, x, weight, eps: float, R: int, out_dtype: torch.dtype):
        S, D = weight.shape
        block_r, block_d, nw = _norm_config(x.device, D)
        rows, n_chunks = _chunks(R, S, block_r, x.device)
        y = torch.empty((S * R, D), device=x.device, dtype=out_dtype)
        rstd = torch.empty((S * R,), device=x.device, dtype=torch.float32)
        _rms_fwd_kernel[(n_chunks, S)](x, weight, y, rstd, x.stride(0), y.stride(0), R, D, rows, eps,
                                       BLOCK_R=block_r, BLOCK_D=block_d, num_warps=nw)
        ctx.save_for_backward(x, weight, rstd)
        ctx.R = R
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        R = ctx.R
        S, D = weight.shape
        if dy.stride(-1) != 1:
            dy = dy.contiguous()
        block_r, block_d, nw = _norm_config(x.device, D)
        rows, n_chunks = _chunks(R, S, block_r, x.device)
        dx = torch.empty((S * R, D), device=x.device, dtype=x.dtype)
        dw_part = torch.empty((n_chunks, S, D), device=x.device, dtype=torch.float32)
        _rms_bwd_kernel[(n_chunks, S)](x, weight, rstd, dy, dx, dw_part, x.stride(0), dy.stride(0), dx.stride(0),
                                       R, D, S, rows, BLOCK_R=block_r, BLOCK_D=block_d, num_warps=nw)
        return dx, sum_partials(dw_part).to(weight.dtype), None, None, None


def seed_rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float | None = None) -> torch.Tensor:
    """Same contract as gbla.ops.norm.naive.seed_rms_norm_reference: x (S, ..., D), weight (S, D).
    The output has x's dtype, or under autocast (for x's device type) the autocast dtype: the norm
    feeds linear layers, which would cast it to that dtype with the same rounding, after a round trip
    of the whole activation through memory in fp32 (the model's residual stream is fp32 under
    autocast). dx has x's dtype, whatever dtype the incoming gradient has."""
    check_norm_inputs(x, weight)
    if x.device.type != "cuda" and not interpreting():
        raise RuntimeError("seed_rms_norm_triton needs CUDA tensors, or TRITON_INTERPRET=1 on the CPU")
    S, D = weight.shape
    if x.numel() == 0:
        return torch.empty_like(x)
    eps = torch.finfo(x.dtype).eps if eps is None else float(eps)
    x2 = x.reshape(-1, D)          # a view for the contiguous tensors the model passes
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    device_type = x.device.type
    out_dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
    y = _SeedRMSNorm.apply(x2, weight.contiguous(), eps, x2.shape[0] // S, out_dtype)
    return y.view(x.shape)


__all__ = ["seed_rms_norm_triton"]
