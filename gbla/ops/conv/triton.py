"""Fused causal depthwise Conv1D + SiLU (forward and backward) in Triton; reference in naive.py.

    xm[t]  = x[t] * m[t]                                   (padding zeroed before the conv)
    pre[t] = bias + sum_{i<K} w[:, i] * xm[t - K + 1 + i]  (zero outside 0..L-1)
    y[t]   = silu(pre[t]) * m[t]

Backward, with dpre[t] = dy[t] * m[t] * silu'(pre[t]),  silu'(a) = sig(a) (1 + a (1 - sig(a))):
    dx[t]   = m[t] * sum_i w[:, i] * dpre[t + K - 1 - i]
    dw[:,i] = sum_t dpre[t] * xm[t - K + 1 + i] ,   dbias = sum_t dpre[t]
The backward is two kernels. The first recomputes pre from K shifted loads of x (served by the
cache), writes dpre (B, L, C) and reduces per-chunk partials of dw and dbias; the second gathers dx
from K shifted loads of dpre. An earlier single kernel recomputed pre at rows t..t+K-1 for every
output row (K*K shifted loads per tile) to avoid the dpre round trip; on an H100 it took 0.8 ms for
the layer benchmark's 32768 x 1536 tensor, ~8x its bytes' worth (outputs/bench/NOTES.md).
The torch reference does mask-multiply, transpose, pad, conv, silu, transpose, mask as separate
passes over the tensor.

Stacked seeds: x (S, B, L, C) with weight (S, C, K), bias (S, C), mask (S, B, L) runs as one launch per
kernel over all S * B rows, row b taking seed b // B's filter (a model of S seeds used to call the op
once per seed and stack the outputs: S times the launches and a copy of the whole tensor). The dw and
dbias partials of each chunk of rows are laid out (row chunk, seed, C, K), so one fixed-order sum over
the chunk axis gives every seed's gradient.

Rows per program (the backward's first kernel): at the training shapes (5 x 256 rows of 13-81 tokens)
one program per (row, channel block) means ~11,500 programs that each stream a few tiles, then reduce
their dw / dbias accumulators across the tile's rows and store a partial: per-program costs that do not
shrink with L (the backward measured ~0.3 ms above its bytes' worth at every training length,
outputs/bench/NOTES.md). A program may instead take ROWS consecutive rows of one seed, accumulating
over all of them before its one reduction and store, which also divides the partials (and their sum)
by ROWS. `_rows_per_program` picks ROWS.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from gbla.ops.conv.naive import check_conv_inputs
from gbla.ops.utils import interpreting, num_sms, sum_partials


@triton.jit
def _masked_x(x_ptr, mask_ptr, b, src, cols, L, C, sxb, sxl, smb, sml, HAS_MASK: tl.constexpr):
    ok = (src >= 0) & (src < L)
    if HAS_MASK:
        m = tl.load(mask_ptr + b * smb + src * sml, mask=ok, other=0)
        ok = ok & (m != 0)
    ptrs = x_ptr + b * sxb + src[:, None] * sxl + cols[None, :]
    return tl.load(ptrs, mask=ok[:, None] & (cols < C)[None, :], other=0.0).to(tl.float32)


@triton.jit
def _conv_fwd_kernel(
    x_ptr, w_ptr, b_ptr, mask_ptr, y_ptr,
    sxb, sxl, smb, sml, syb, syl, L, C, ROWS_PER_SEED,
    K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_c = tl.program_id(1)
    b = tl.program_id(2)
    s = b // ROWS_PER_SEED        # this row's seed: its filter (weight (S, C, K), bias (S, C) contiguous)
    w_ptr += s * C * K
    b_ptr += s * C
    rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    acc = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    for i in tl.static_range(K):
        wi = tl.load(w_ptr + cols * K + i, mask=col_ok, other=0.0).to(tl.float32)
        acc += wi[None, :] * _masked_x(x_ptr, mask_ptr, b, rows - (K - 1) + i, cols, L, C, sxb, sxl, smb, sml, HAS_MASK)
    y = acc * tl.sigmoid(acc)
    row_ok = rows < L
    if HAS_MASK:
        m = tl.load(mask_ptr + b * smb + rows * sml, mask=row_ok, other=0)
        y = tl.where((m != 0)[:, None], y, 0.0)
    tl.store(y_ptr + b * syb + rows[:, None] * syl + cols[None, :], y.to(y_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _store_dpre(pre, dy_ptr, dpre_ptr, mask_ptr, b, rows, cols, L, C, sdyb, sdyl, smb, sml,
                HAS_MASK: tl.constexpr):
    """dpre = dy * m * silu'(pre) for one tile (0 at padded and out-of-range rows), stored into the
    contiguous (B, L, C) dpre buffer and returned."""
    row_ok = rows < L
    col_ok = cols < C
    r_ok = row_ok
    if HAS_MASK:
        m = tl.load(mask_ptr + b * smb + rows * sml, mask=row_ok, other=0)
        r_ok = r_ok & (m != 0)
    dy = tl.load(dy_ptr + b * sdyb + rows[:, None] * sdyl + cols[None, :],
                 mask=r_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
    sig = tl.sigmoid(pre)
    dpre = dy * sig * (1.0 + pre * (1.0 - sig))
    tl.store(dpre_ptr + (b * L + rows[:, None]) * C + cols[None, :], dpre.to(dpre_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])
    return dpre


@triton.jit
def _conv_bwd_dpre_kernel(
    x_ptr, w_ptr, b_ptr, mask_ptr, dy_ptr, dpre_ptr, dwpart_ptr, dbpart_ptr,
    sxb, sxl, smb, sml, sdyb, sdyl, L, C, TILES, ROWS_PER_SEED, SEEDS, ROWS,
    K: tl.constexpr, K_PAD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, FAST: tl.constexpr,
):
    """dpre[t] = dy[t] m[t] silu'(pre[t]) for one chunk of tiles of ROWS consecutive rows of one seed
    (pre recomputed from K shifted loads of x), written to a contiguous (B, L, C) buffer; the partial dw
    and dbias of those rows' chunk, stored at partial index (row group within its seed, chunk) x SEEDS +
    seed."""
    pid_t = tl.program_id(0)
    pid_c = tl.program_id(1)
    b0 = tl.program_id(2) * ROWS   # ROWS divides ROWS_PER_SEED: every row of the group has seed s
    s = b0 // ROWS_PER_SEED
    w_ptr += s * C * K
    b_ptr += s * C
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    bias = tl.zeros((BLOCK_C,), dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    db = tl.zeros((BLOCK_C,), dtype=tl.float32)
    # dw as K separate vectors would need a list; a (BLOCK_C, K_PAD) tile written through a
    # one-hot column keeps it in registers instead.
    taps = tl.arange(0, K_PAD)
    dw = tl.zeros((BLOCK_C, K_PAD), dtype=tl.float32)
    if FAST:
        # fast path (K <= 4): the K shifted tiles stay in registers between computing pre and dw, and dw / db
        # accumulate elementwise (BLOCK_T, BLOCK_C) so the row reduction happens once per chunk, not
        # once per tile and tap (a cross-warp reduction each)
        w0 = tl.load(w_ptr + cols * K, mask=col_ok, other=0.0).to(tl.float32)
        a0 = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
        if K >= 2:
            w1 = tl.load(w_ptr + cols * K + 1, mask=col_ok, other=0.0).to(tl.float32)
            a1 = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
        if K >= 3:
            w2 = tl.load(w_ptr + cols * K + 2, mask=col_ok, other=0.0).to(tl.float32)
            a2 = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
        if K >= 4:
            w3 = tl.load(w_ptr + cols * K + 3, mask=col_ok, other=0.0).to(tl.float32)
            a3 = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
        dacc = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
        for bt in range(0, ROWS * TILES):
            b = b0 + bt // TILES
            rows = (pid_t * TILES + bt % TILES) * BLOCK_T + tl.arange(0, BLOCK_T)
            x0 = _masked_x(x_ptr, mask_ptr, b, rows - (K - 1), cols, L, C, sxb, sxl, smb, sml, HAS_MASK)
            pre = bias[None, :] + w0[None, :] * x0
            if K >= 2:
                x1 = _masked_x(x_ptr, mask_ptr, b, rows - (K - 1) + 1, cols, L, C, sxb, sxl, smb, sml, HAS_MASK)
                pre += w1[None, :] * x1
            if K >= 3:
                x2 = _masked_x(x_ptr, mask_ptr, b, rows - (K - 1) + 2, cols, L, C, sxb, sxl, smb, sml, HAS_MASK)
                pre += w2[None, :] * x2
            if K >= 4:
                x3 = _masked_x(x_ptr, mask_ptr, b, rows - (K - 1) + 3, cols, L, C, sxb, sxl, smb, sml, HAS_MASK)
                pre += w3[None, :] * x3
            dpre = _store_dpre(pre, dy_ptr, dpre_ptr, mask_ptr, b, rows, cols, L, C, sdyb, sdyl, smb, sml, HAS_MASK)
            dacc += dpre
            a0 += dpre * x0
            if K >= 2:
                a1 += dpre * x1
            if K >= 3:
                a2 += dpre * x2
            if K >= 4:
                a3 += dpre * x3
        db = tl.sum(dacc, axis=0)
        dw = tl.where(taps[None, :] == 0, tl.sum(a0, axis=0)[:, None], 0.0)
        if K >= 2:
            dw += tl.where(taps[None, :] == 1, tl.sum(a1, axis=0)[:, None], 0.0)
        if K >= 3:
            dw += tl.where(taps[None, :] == 2, tl.sum(a2, axis=0)[:, None], 0.0)
        if K >= 4:
            dw += tl.where(taps[None, :] == 3, tl.sum(a3, axis=0)[:, None], 0.0)
    else:
        for bt in range(0, ROWS * TILES):
            b = b0 + bt // TILES
            rows = (pid_t * TILES + bt % TILES) * BLOCK_T + tl.arange(0, BLOCK_T)
            pre = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32) + bias[None, :]
            for i in tl.static_range(K):
                wi = tl.load(w_ptr + cols * K + i, mask=col_ok, other=0.0).to(tl.float32)
                pre += wi[None, :] * _masked_x(x_ptr, mask_ptr, b, rows - (K - 1) + i, cols, L, C, sxb, sxl, smb, sml, HAS_MASK)
            dpre = _store_dpre(pre, dy_ptr, dpre_ptr, mask_ptr, b, rows, cols, L, C, sdyb, sdyl, smb, sml, HAS_MASK)
            db += tl.sum(dpre, axis=0)
            for i in tl.static_range(K):  # the same K tiles again: served by the cache
                xs = _masked_x(x_ptr, mask_ptr, b, rows - (K - 1) + i, cols, L, C, sxb, sxl, smb, sml, HAS_MASK)
                dw += tl.where(taps[None, :] == i, tl.sum(dpre * xs, axis=0)[:, None], 0.0)
    part = ((b0 - s * ROWS_PER_SEED) // ROWS * tl.num_programs(0) + pid_t) * SEEDS + s
    tl.store(dwpart_ptr + part * C * K + cols[:, None] * K + taps[None, :], dw,
             mask=col_ok[:, None] & (taps < K)[None, :])
    tl.store(dbpart_ptr + part * C + cols, db, mask=col_ok)


@triton.jit
def _conv_bwd_dx_kernel(
    dpre_ptr, w_ptr, mask_ptr, dx_ptr, smb, sml, sdxb, sdxl, L, C, ROWS_PER_SEED,
    K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, HAS_MASK: tl.constexpr,
):
    """dx[t] = m[t] sum_j w[:, K-1-j] dpre[t+j]: K shifted loads of dpre (served by the cache)."""
    pid_t = tl.program_id(0)
    pid_c = tl.program_id(1)
    b = tl.program_id(2)
    w_ptr += (b // ROWS_PER_SEED) * C * K
    rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    row_ok = rows < L
    dx = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
    for j in tl.static_range(K):
        r = rows + j
        d = tl.load(dpre_ptr + (b * L + r[:, None]) * C + cols[None, :],
                    mask=(r < L)[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        w_tap = tl.load(w_ptr + cols * K + (K - 1 - j), mask=col_ok, other=0.0).to(tl.float32)
        dx += w_tap[None, :] * d
    if HAS_MASK:
        m = tl.load(mask_ptr + b * smb + rows * sml, mask=row_ok, other=0)
        dx = tl.where((m != 0)[:, None], dx, 0.0)
    tl.store(dx_ptr + b * sdxb + rows[:, None] * sdxl + cols[None, :], dx.to(dx_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


# Benchmarks may set keys here: "fast_path" (bool, the K <= 4 register path of the backward),
# "fwd_block_t", "fwd_block_c", "fwd_num_warps", "bwd_block_t", "bwd_block_c", "bwd_num_warps",
# "bwd_rows", "bwd_min_programs_per_sm" (rows per program of the backward's first kernel; see
# _rows_per_program)
# (gbla.bench.conv_speed sweeps them). Results never depend on them beyond rounding order.
CONFIG_OVERRIDE: dict = {}

# The backward's first kernel takes up to this many rows per program by default (1: one program per
# row, the layout every grid run so far trained with).
BWD_MAX_ROWS = 1
# ... while leaving at least this many programs per SM (enough to fill it and hide memory latency)
BWD_MIN_PROGRAMS_PER_SM = 8


def _row_tile(L: int, choices: tuple[int, ...]) -> int:
    """The row tile of `choices` that pads L to the fewest rows (the first of equals)."""
    return min(choices, key=lambda t: -(-L // t) * t - L)


def _rows_per_program(rows_per_seed: int, programs_per_row: int, n_rows: int, n_sms: int) -> int:
    """Rows per program of the backward's first kernel: the largest divisor of rows_per_seed (a
    program's rows share a seed) that is at most the cap (CONFIG_OVERRIDE["bwd_rows"], else
    BWD_MAX_ROWS) and leaves at least BWD_MIN_PROGRAMS_PER_SM programs per SM (the override's
    "bwd_min_programs_per_sm" wins); 1 if none does."""
    cap = int(CONFIG_OVERRIDE.get("bwd_rows", BWD_MAX_ROWS))
    if cap < 1:
        raise ValueError(f"CONFIG_OVERRIDE['bwd_rows'] must be >= 1, got {cap}")
    min_programs = CONFIG_OVERRIDE.get("bwd_min_programs_per_sm", BWD_MIN_PROGRAMS_PER_SM) * n_sms
    best = 1
    for rows in range(2, min(cap, rows_per_seed) + 1):
        if rows_per_seed % rows == 0 and n_rows // rows * programs_per_row >= min_programs:
            best = rows
    return best


def _conv_config(device: torch.device, L: int, backward: bool = False):
    """(BLOCK_T, BLOCK_C, num_warps) for rows of length L. The backward's fast dpre kernel holds K + 1
    accumulator tiles and the K shifted input tiles in registers."""
    if interpreting() or device.type != "cuda":
        return 16, 32, 4
    o = CONFIG_OVERRIDE
    if not backward:
        # H200, training shapes (outputs/bench/conv_speed_16fc88c.md): 16-row tiles 1.57x / 0.93x /
        # 1.17x / 0.92x of 32-row ones at L = 13 / 25 / 41 / 81, as the rows each pads to a whole tile
        # predict (13 -> 16 or 32, 41 -> 48 or 64; equal at 25 and 81, where 32 wins); at L = 32768 32.
        # These defaults measured again at 62dcac6 (conv_speed.md): the fastest at each length.
        return o.get("fwd_block_t", _row_tile(L, (32, 16))), o.get("fwd_block_c", 128), o.get("fwd_num_warps", 4)
    # H200, graphed fwd+bwd at L = 32768, C = 1536 (outputs/bench/NOTES.md, v3): fast path with 16 rows
    # and 4 warps 0.313 ms; 32 rows / 4 warps 0.412; 16 / 8 0.697; the general path 0.590. At the
    # training shapes (conv_speed_16fc88c.md) 8 rows: 0.98x / 1.11x / 1.09x / 1.09x at L = 13 / 25 / 41 / 81.
    block_t = 8 if 16 < L <= 128 else 16
    return o.get("bwd_block_t", block_t), o.get("bwd_block_c", 128), o.get("bwd_num_warps", 4)


class _CausalConv1dSiLU(torch.autograd.Function):
    """x (S * B, L, C) with channel stride 1; weight (S, C, K), bias (S, C) contiguous; rows b of seed
    b // B; mask_u8 (S * B, L) or None."""
    @staticmethod
    def forward(ctx, x, weight, bias, mask_u8):
        B, L, C = x.shape
        S, _, K = weight.shape
        bt, bc, nw = _conv_config(x.device, L)
        y = torch.empty((B, L, C), device=x.device, dtype=x.dtype)
        m = mask_u8 if mask_u8 is not None else x
        ms = mask_u8.stride() if mask_u8 is not None else (0, 0)
        grid = (triton.cdiv(L, bt), triton.cdiv(C, bc), B)
        _conv_fwd_kernel[grid](x, weight, bias if bias is not None else weight, m, y,
                               x.stride(0), x.stride(1), *ms, y.stride(0), y.stride(1), L, C, B // S,
                               K=K, BLOCK_T=bt, BLOCK_C=bc, HAS_BIAS=bias is not None,
                               HAS_MASK=mask_u8 is not None, num_warps=nw)
        ctx.save_for_backward(x, weight, bias, mask_u8)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, mask_u8 = ctx.saved_tensors
        B, L, C = x.shape
        S, _, K = weight.shape
        if dy.stride(-1) != 1:
            dy = dy.contiguous()
        bt, bc, nw = _conv_config(x.device, L, backward=True)
        n_tiles = triton.cdiv(L, bt)
        n_sms = num_sms(x.device, default=2)
        chunks_wanted = max(1, (4 * n_sms) // (B * triton.cdiv(C, bc)))
        tiles = triton.cdiv(n_tiles, chunks_wanted)
        n_chunks = triton.cdiv(n_tiles, tiles)
        rows = _rows_per_program(B // S, n_chunks * triton.cdiv(C, bc), B, n_sms)
        dx = torch.empty((B, L, C), device=x.device, dtype=x.dtype)
        # dpre in the input's dtype (fp32 for fp32 inputs): its rounding is of the order of dx's own
        dpre = torch.empty((B, L, C), device=x.device, dtype=x.dtype)
        # (row group of its seed, chunk) x seed: the sum over the first axis is every seed's gradient at once
        dw_part = torch.empty((B // S // rows * n_chunks, S, C, K), device=x.device, dtype=torch.float32)
        db_part = torch.empty((B // S // rows * n_chunks, S, C), device=x.device, dtype=torch.float32)
        m = mask_u8 if mask_u8 is not None else x
        ms = mask_u8.stride() if mask_u8 is not None else (0, 0)
        grid = (n_chunks, triton.cdiv(C, bc), B // rows)
        _conv_bwd_dpre_kernel[grid](x, weight, bias if bias is not None else weight, m, dy, dpre, dw_part, db_part,
                                    x.stride(0), x.stride(1), *ms, dy.stride(0), dy.stride(1), L, C, tiles,
                                    B // S, S, rows, K=K, K_PAD=triton.next_power_of_2(K), BLOCK_T=bt, BLOCK_C=bc,
                                    HAS_BIAS=bias is not None, HAS_MASK=mask_u8 is not None,
                                    FAST=K <= 4 and CONFIG_OVERRIDE.get("fast_path", True), num_warps=nw)
        _conv_bwd_dx_kernel[(n_tiles, triton.cdiv(C, bc), B)](
            dpre, weight, m, dx, *ms, dx.stride(0), dx.stride(1), L, C, B // S,
            K=K, BLOCK_T=bt, BLOCK_C=bc, HAS_MASK=mask_u8 is not None, num_warps=nw)
        dw = sum_partials(dw_part).to(weight.dtype)
        db = sum_partials(db_part).to(bias.dtype) if bias is not None else None
        return dx, dw, db, None


def causal_conv1d_silu_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                              mask: torch.Tensor | None = None) -> torch.Tensor:
    """Same contract as gbla.ops.conv.naive.causal_conv1d_silu_reference: x (B, L, C), weight (C, K),
    bias (C,), mask (B, L); or seeds stacked, x (S, B, L, C), weight (S, C, K), bias (S, C), mask
    (S, B, L), one launch per kernel for all seeds. x may be a strided view (channel stride 1), e.g.
    one of q/k/v sliced out of a fused projection."""
    stacked = check_conv_inputs(x, weight, bias, mask)
    if x.device.type != "cuda" and not interpreting():
        raise RuntimeError("causal_conv1d_silu_triton needs CUDA tensors, or TRITON_INTERPRET=1 on the CPU")
    if x.numel() == 0:
        return torch.zeros_like(x)
    if not stacked:
        x, weight = x[None], weight[None]
        bias = None if bias is None else bias[None]
        mask = None if mask is None else mask[None]
    S, B, L, C = x.shape
    # (S * B, L, C): a view of a contiguous projection; a copy only when the seed and row axes do not merge
    x3 = x.reshape(S * B, L, C)
    if x3.stride(-1) != 1:
        x3 = x3.contiguous()
    weight = weight.contiguous()
    bias = None if bias is None else bias.contiguous()
    # a copy, not .view(torch.uint8): torch.compile (Inductor) cannot lower a bool-to-uint8 view
    mask_u8 = mask.reshape(S * B, L).to(torch.uint8) if mask is not None else None
    y = _CausalConv1dSiLU.apply(x3, weight, bias, mask_u8).view(S, B, L, C)
    return y if stacked else y[0]


__all__ = ["causal_conv1d_silu_triton"]
