"""Fused Triton forward and backward of softmax attention over short sequences (same formulas as
naive.py), for Lq, Lk <= 128: every query and key of one row and head fits in one tile, so a program
holds the whole (Lq, Lk) score tile in registers and nothing of size Lq x Lk touches memory.

Forward, one program per (row n, head h): load Q (Lq, E), K, V (Lk, E) with their strides (slices
of a fused projection need no copy), then in fp32

    S = Q K^T / sqrt(E) + bias[seed(n), h] ,  S = lowest where not visible ,  P = softmax(S)
    Pd = P * keep / (1 - p)                  (keep regenerated from Philox, see below)
    O = Pd V                                  (stored (N, Lq, H, E) contiguous, in q's dtype)

Backward, one program per (seed, chunk of ROWS rows of that seed, head): per row it recomputes S and
P from Q and K (the whole row is one tile, so no saved statistics are needed) and

    dPd = dO V^T ,  delta_i = sum_j Pd_ij dPd_ij  (= dO_i . O_i) ,  dS = P * (dPd * keep / (1 - p) - delta)
    dS = 0 where not visible   (masked scores get no gradient, as masked_fill gives the reference)
    dV = Pd^T dO ,  dQ = dS K / sqrt(E) ,  dK = dS^T Q / sqrt(E)
    d(bias)[seed, h] = sum over the seed's rows of dS: accumulated over the chunk's rows in
    registers, one fp32 partial per chunk, partials summed in a fixed order (deterministic, no atomics).

Dropout: keep_nhij = tl.rand(seed, ((n H + h) Lq + i) Lk + j) >= p (int64 Philox counter), seed an
int64 device tensor drawn with torch.randint for every call (so a CUDA-graph replay draws new values)
and saved for the backward, which regenerates the same keep-mask. `dropout_keep_mask` materializes it
through the same code path, for the tests.

Matrix products: fp32 inputs use full fp32 ("ieee") products; 16-bit inputs multiply 16-bit
operands (P and dS rounded to the inputs' dtype, as flash attention does) with fp32 accumulation;
under the interpreter the same rounded operands are multiplied as fp32. Softmax, dropout scaling and
all accumulation are fp32. Written against the Triton 3.6 API and runnable under TRITON_INTERPRET=1.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from gbla.ops.attention.naive import check_short_attention_inputs
from gbla.ops.utils import interpreting, num_sms, sum_partials

MAX_LEN = 128        # Lq and Lk limit of the one-tile kernels
MAX_HEAD_DIM = 256
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# fp32's lowest value: the masked score, as the reference's finfo.min
_LOWEST: tl.constexpr = tl.constexpr(-3.4028234663852886e38)

# MODE of the products: 0 fp32 operands, ieee products; 1 16-bit operands on the tensor cores;
# 2 the same 16-bit operands multiplied as fp32 (the interpreter's 16-bit dot is not trusted)
_FP32, _NATIVE, _EMULATED = 0, 1, 2
_NATIVE_C: tl.constexpr = tl.constexpr(_NATIVE)


@triton.jit
def _dot(a, b, MODE: tl.constexpr):
    """a @ b, fp32 accumulation; a and b already in the operand dtype (fp32 or the inputs' 16-bit one)."""
    if MODE == _NATIVE_C:
        return tl.dot(a, b)
    else:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")


@triton.jit
def _tile(base, rows, stride_l, e, L, E):
    """A (BLOCK_L, BLOCK_E) tile of one row and head's (L, E) slice, in its own dtype, zero outside."""
    return tl.load(base + rows[:, None] * stride_l + e[None, :], mask=(rows < L)[:, None] & (e < E)[None, :],
                   other=0.0)


@triton.jit
def _keep(seed, n, h, rows, cols, H, Lq, Lk, dropout_p):
    """The dropout keep-mask tile of row n, head h: one Philox draw per (n, h, i, j)."""
    offs = ((n.to(tl.int64) * H + h) * Lq + rows[:, None]) * Lk + cols[None, :]
    return tl.rand(seed, offs) >= dropout_p


@triton.jit
def _probs(q, k, bias_ptr, km_ptr, n, s, h, rows, cols, Lq, Lk, smn, sml, sbs, sbh, sbq, sbk, scale,
           CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, MODE: tl.constexpr):
    """Softmax probabilities P (BLOCK_Q, BLOCK_K) fp32 of one row and head, and where they are visible.
    Keys past Lk get -inf (weight 0 always); masked keys the lowest finite value (all-masked rows
    average uniformly over the Lk keys)."""
    sc = _dot(q, tl.trans(k), MODE) * scale
    in_k = cols < Lk
    vis = in_k[None, :] & (rows >= 0)[:, None]
    if HAS_BIAS:
        b = tl.load(bias_ptr + s * sbs + h * sbh + rows[:, None] * sbq + cols[None, :] * sbk,
                    mask=(rows < Lq)[:, None] & in_k[None, :], other=0.0)
        sc = sc + b.to(tl.float32)
    if HAS_MASK:
        km = tl.load(km_ptr + n.to(tl.int64) * smn + cols * sml, mask=in_k, other=0)
        vis = vis & (km != 0)[None, :]
    if CAUSAL:
        vis = vis & (cols[None, :] <= rows[:, None])
    sc = tl.where(vis, sc, _LOWEST)
    sc = tl.where(in_k[None, :], sc, float("-inf"))
    m = tl.max(sc, axis=1)
    p = tl.exp(sc - m[:, None])
    p = p / tl.sum(p, axis=1)[:, None]
    return p, vis


@triton.jit
def _fwd_kernel(
    q_ptr, k_ptr, v_ptr, km_ptr, bias_ptr, seed_ptr, o_ptr,
    sqn, sql, sqh, skn, skl, skh, svn, svl, svh, smn, sml, sbs, sbh, sbq, sbk, son, sol, soh,
    B, H, Lq, Lk, E, scale, dropout_p,
    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr, CAUSAL: tl.constexpr,
    HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr, MODE: tl.constexpr,
):
    """O of one row n and head h (grid axis 0 = N * H)."""
    pid = tl.program_id(0)
    n = pid // H
    h = pid % H
    n64 = n.to(tl.int64)
    rows = tl.arange(0, BLOCK_Q)
    cols = tl.arange(0, BLOCK_K)
    e = tl.arange(0, BLOCK_E)
    q = _tile(q_ptr + n64 * sqn + h * sqh, rows, sql, e, Lq, E)
    k = _tile(k_ptr + n64 * skn + h * skh, cols, skl, e, Lk, E)
    v = _tile(v_ptr + n64 * svn + h * svh, cols, svl, e, Lk, E)
    p, vis = _probs(q, k, bias_ptr, km_ptr, n, n // B, h, rows, cols, Lq, Lk, smn, sml, sbs, sbh, sbq, sbk, scale,
                    CAUSAL, HAS_MASK, HAS_BIAS, MODE)
    if DROPOUT:
        keep = _keep(tl.load(seed_ptr), n, h, rows, cols, H, Lq, Lk, dropout_p)
        p = tl.where(keep, p * (1.0 / (1.0 - dropout_p)), 0.0)
    o = _dot(p.to(v.dtype), v, MODE)
    tl.store(o_ptr + n64 * son + h * soh + rows[:, None] * sol + e[None, :], o.to(o_ptr.dtype.element_ty),
             mask=(rows < Lq)[:, None] & (e < E)[None, :])


@triton.jit
def _bwd_kernel(
    q_ptr, k_ptr, v_ptr, km_ptr, bias_ptr, seed_ptr, do_ptr, dq_ptr, dk_ptr, dv_ptr, dbpart_ptr,
    sqn, sql, sqh, skn, skl, skh, svn, svl, svh, smn, sml, sbs, sbh, sbq, sbk, sdon, sdol, sdoh,
    S, B, H, Lq, Lk, E, scale, dropout_p, ROWS,
    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr, CAUSAL: tl.constexpr,
    HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DBIAS: tl.constexpr, DROPOUT: tl.constexpr,
    MODE: tl.constexpr,
):
    """dQ, dK, dV of ROWS rows of seed s and head h (grid: chunk, head, seed); the chunk's partial
    d(bias)[s, h]. dq is (N, Lq, H, E) contiguous, dk and dv (N, Lk, H, E) contiguous."""
    c = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.program_id(2)
    rows = tl.arange(0, BLOCK_Q)
    cols = tl.arange(0, BLOCK_K)
    e = tl.arange(0, BLOCK_E)
    q_ok = (rows < Lq)[:, None] & (e < E)[None, :]
    k_ok = (cols < Lk)[:, None] & (e < E)[None, :]
    inv_keep = 1.0 / (1.0 - dropout_p)
    seed = 0
    if DROPOUT:
        seed = tl.load(seed_ptr)
    dbias = tl.zeros((BLOCK_Q, BLOCK_K), dtype=tl.float32)
    b0 = c * ROWS
    for b in range(b0, tl.minimum(b0 + ROWS, B)):
        n = s * B + b
        n64 = n.to(tl.int64)
        q = _tile(q_ptr + n64 * sqn + h * sqh, rows, sql, e, Lq, E)
        k = _tile(k_ptr + n64 * skn + h * skh, cols, skl, e, Lk, E)
        v = _tile(v_ptr + n64 * svn + h * svh, cols, svl, e, Lk, E)
        do = _tile(do_ptr + n64 * sdon + h * sdoh, rows, sdol, e, Lq, E)
        p, vis = _probs(q, k, bias_ptr, km_ptr, n, s, h, rows, cols, Lq, Lk, smn, sml, sbs, sbh, sbq, sbk, scale,
                        CAUSAL, HAS_MASK, HAS_BIAS, MODE)
        dpd = _dot(do, tl.trans(v), MODE)                       # gradient at the dropped probabilities
        if DROPOUT:
            keep = _keep(seed, n, h, rows, cols, H, Lq, Lk, dropout_p)
            pd = tl.where(keep, p * inv_keep, 0.0)
            dp = tl.where(keep, dpd * inv_keep, 0.0)
        else:
            pd = p
            dp = dpd
        delta = tl.sum(pd * dpd, axis=1)
        ds = tl.where(vis, p * (dp - delta[:, None]), 0.0)
        dv = _dot(tl.trans(pd.to(do.dtype)), do, MODE)
        dq = _dot(ds.to(k.dtype), k, MODE) * scale
        dk = _dot(tl.trans(ds.to(q.dtype)), q, MODE) * scale
        hq = (n64 * Lq * H + h) * E
        hk = (n64 * Lk * H + h) * E
        tl.store(dq_ptr + hq + rows[:, None] * (H * E) + e[None, :], dq.to(dq_ptr.dtype.element_ty), mask=q_ok)
        tl.store(dk_ptr + hk + cols[:, None] * (H * E) + e[None, :], dk.to(dk_ptr.dtype.element_ty), mask=k_ok)
        tl.store(dv_ptr + hk + cols[:, None] * (H * E) + e[None, :], dv.to(dv_ptr.dtype.element_ty), mask=k_ok)
        if HAS_DBIAS:
            dbias += ds
    if HAS_DBIAS:
        part = dbpart_ptr + ((c * S + s) * H + h).to(tl.int64) * Lq * Lk
        tl.store(part + rows[:, None] * Lk + cols[None, :], dbias,
                 mask=(rows < Lq)[:, None] & (cols < Lk)[None, :])


@triton.jit
def _keep_mask_kernel(seed_ptr, out_ptr, H, Lq, Lk, dropout_p, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr):
    """The keep-mask (N, H, Lq, Lk) uint8 that the attention kernels draw for this seed."""
    pid = tl.program_id(0)
    n = pid // H
    h = pid % H
    rows = tl.arange(0, BLOCK_Q)
    cols = tl.arange(0, BLOCK_K)
    keep = _keep(tl.load(seed_ptr), n, h, rows, cols, H, Lq, Lk, dropout_p)
    tl.store(out_ptr + pid.to(tl.int64) * Lq * Lk + rows[:, None] * Lk + cols[None, :], keep.to(tl.uint8),
             mask=(rows < Lq)[:, None] & (cols < Lk)[None, :])


# ----------------------------------------------------------------------------------------------
# launch configuration
# ----------------------------------------------------------------------------------------------
# Benchmarks may set keys here: "fwd_num_warps", "bwd_num_warps", "rows" (rows per backward
# program when there is a bias gradient). Results never depend on them beyond rounding order.
CONFIG_OVERRIDE: dict = {}


def _blocks(Lq: int, Lk: int, E: int) -> tuple[int, int, int]:
    """Tile sizes: powers of two, at least 16 (tl.dot's minimum)."""
    return tuple(max(16, triton.next_power_of_2(x)) for x in (Lq, Lk, E))


def _num_warps(block_q: int, block_k: int, key: str) -> int:
    if key in CONFIG_OVERRIDE:
        return CONFIG_OVERRIDE[key]
    return 4 if block_q * block_k <= 64 * 64 else 8


def _rows_per_program(S: int, B: int, H: int, device: torch.device, has_dbias: bool) -> int:
    """Rows of one backward program. With a bias gradient, each program sums its rows' dS in
    registers and writes one partial: about 4 programs per SM over (seed, chunk, head), so the
    partials stay a few per SM's worth (at S=5, H=6, B=256 on 132 SMs: 16 rows, 16 partials per
    seed and head). Without one, a row per program."""
    if not has_dbias:
        return 1
    if "rows" in CONFIG_OVERRIDE:
        return max(1, min(B, CONFIG_OVERRIDE["rows"]))
    chunks_wanted = max(1, 4 * num_sms(device, default=2) // (S * H))
    return max(1, triton.cdiv(B, chunks_wanted))


def _mode(dtype: torch.dtype) -> int:
    if dtype == torch.float32:
        return _FP32
    return _EMULATED if interpreting() else _NATIVE


def _mask_args(mask_u8, placeholder):
    return (mask_u8, *mask_u8.stride()) if mask_u8 is not None else (placeholder, 0, 0)


def _bias_args(bias, placeholder):
    return (bias, *bias.stride()) if bias is not None else (placeholder, 0, 0, 0, 0)


def _strides3(t):
    return t.stride(0), t.stride(1), t.stride(2)


class _ShortAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask_u8, bias, seed, causal, num_seeds, dropout_p):
        N, Lq, H, E = q.shape
        Lk = k.shape[1]
        bq, bk, be = _blocks(Lq, Lk, E)
        out = torch.empty((N, Lq, H, E), device=q.device, dtype=q.dtype)
        _fwd_kernel[(N * H,)](
            q, k, v, *_mask_args(mask_u8, q)[:1], *_bias_args(bias, q)[:1], seed, out,
            *_strides3(q), *_strides3(k), *_strides3(v), *_mask_args(mask_u8, q)[1:], *_bias_args(bias, q)[1:],
            *_strides3(out), N // num_seeds, H, Lq, Lk, E, 1.0 / math.sqrt(E), dropout_p,
            BLOCK_Q=bq, BLOCK_K=bk, BLOCK_E=be, CAUSAL=causal, HAS_MASK=mask_u8 is not None,
            HAS_BIAS=bias is not None, DROPOUT=dropout_p > 0, MODE=_mode(q.dtype),
            num_warps=_num_warps(bq, bk, "fwd_num_warps"))
        ctx.save_for_backward(q, k, v, mask_u8, bias, seed)
        ctx.causal, ctx.num_seeds, ctx.dropout_p = causal, num_seeds, dropout_p
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, mask_u8, bias, seed = ctx.saved_tensors
        N, Lq, H, E = q.shape
        Lk = k.shape[1]
        S = ctx.num_seeds
        B = N // S
        do = grad_out if grad_out.stride(-1) == 1 else grad_out.contiguous()
        has_dbias = bias is not None and ctx.needs_input_grad[4]
        rows = _rows_per_program(S, B, H, q.device, has_dbias)
        chunks = triton.cdiv(B, rows)
        bq, bk, be = _blocks(Lq, Lk, E)
        dq = torch.empty((N, Lq, H, E), device=q.device, dtype=q.dtype)
        dk = torch.empty((N, Lk, H, E), device=q.device, dtype=k.dtype)
        dv = torch.empty((N, Lk, H, E), device=q.device, dtype=v.dtype)
        dbias_part = (torch.empty((chunks, S, H, Lq, Lk), device=q.device, dtype=torch.float32) if has_dbias
                      else dq)
        _bwd_kernel[(chunks, H, S)](
            q, k, v, *_mask_args(mask_u8, q)[:1], *_bias_args(bias, q)[:1], seed, do, dq, dk, dv, dbias_part,
            *_strides3(q), *_strides3(k), *_strides3(v), *_mask_args(mask_u8, q)[1:], *_bias_args(bias, q)[1:],
            *_strides3(do), S, B, H, Lq, Lk, E, 1.0 / math.sqrt(E), ctx.dropout_p, rows,
            BLOCK_Q=bq, BLOCK_K=bk, BLOCK_E=be, CAUSAL=ctx.causal, HAS_MASK=mask_u8 is not None,
            HAS_BIAS=bias is not None, HAS_DBIAS=has_dbias, DROPOUT=ctx.dropout_p > 0, MODE=_mode(q.dtype),
            num_warps=_num_warps(bq, bk, "bwd_num_warps"), num_stages=1)
        dbias = sum_partials(dbias_part).to(bias.dtype) if has_dbias else None
        return dq, dk, dv, None, dbias, None, None, None, None


def unsupported(q: torch.Tensor, k: torch.Tensor) -> str | None:
    """Why the kernels cannot take these inputs (then "auto" uses the reference), or None."""
    if q.shape[1] > MAX_LEN or k.shape[1] > MAX_LEN:
        return f"Lq={q.shape[1]}, Lk={k.shape[1]}: the one-tile kernels take at most {MAX_LEN} queries and keys"
    if q.shape[-1] > MAX_HEAD_DIM:
        return f"head dim E={q.shape[-1]} is over {MAX_HEAD_DIM}"
    if q.dtype not in SUPPORTED_DTYPES:
        return f"dtype {q.dtype} is not supported; supported: {SUPPORTED_DTYPES}"
    if q.device.type != "cuda" and not interpreting():
        return "needs CUDA tensors, or TRITON_INTERPRET=1 for the CPU interpreter"
    return None


def draw_seed(device: torch.device) -> torch.Tensor:
    """A fresh dropout seed, an int64 tensor on `device` drawn from torch's generator (so it changes
    on every CUDA-graph replay, like torch's own dropout)."""
    return torch.randint(0, 2 ** 62, (1,), device=device, dtype=torch.int64)


def short_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    key_mask: torch.Tensor | None = None,
    causal: bool = False,
    bias: torch.Tensor | None = None,
    num_seeds: int = 1,
    dropout_p: float = 0.0,
    dropout_seed: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fused short attention (same contract as short_attention_reference). dropout_seed: the int64
    (1,) seed tensor of the dropout draw (a fresh one from draw_seed when None), for tests that
    replay it with dropout_keep_mask."""
    check_short_attention_inputs(q, k, v, key_mask, causal, bias, num_seeds, dropout_p)
    why = unsupported(q, k)
    if why is not None:
        raise ValueError(f"short_attention_triton: {why}; use backend='torch' or 'auto'")
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    N, Lq, H, E = q.shape
    if N == 0 or Lq == 0 or k.shape[1] == 0:
        return torch.zeros((N, Lq, H, E), device=q.device, dtype=q.dtype)
    # a copy, not .view(torch.uint8): torch.compile (Inductor) cannot lower a bool-to-uint8 view
    mask_u8 = key_mask.to(torch.uint8) if key_mask is not None else None
    dropout_p = float(dropout_p)
    if dropout_p > 0:
        seed = draw_seed(q.device) if dropout_seed is None else dropout_seed.to(q.device, torch.int64)
    else:
        seed = q  # never read without dropout
    return _ShortAttention.apply(q, k, v, mask_u8, bias, seed, bool(causal), int(num_seeds), dropout_p)


def dropout_keep_mask(seed: torch.Tensor, N: int, H: int, Lq: int, Lk: int, dropout_p: float) -> torch.Tensor:
    """The keep-mask (N, H, Lq, Lk) bool that short_attention_triton draws with this seed."""
    out = torch.empty((N, H, Lq, Lk), device=seed.device, dtype=torch.uint8)
    bq, bk, _ = _blocks(Lq, Lk, 16)
    if out.numel():
        _keep_mask_kernel[(N * H,)](seed, out, H, Lq, Lk, float(dropout_p), BLOCK_Q=bq, BLOCK_K=bk, num_warps=4)
    return out.bool()


__all__ = ["short_attention_triton", "dropout_keep_mask", "draw_seed", "unsupported", "CONFIG_OVERRIDE",
           "MAX_LEN", "SUPPORTED_DTYPES"]
