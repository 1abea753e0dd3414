"""Fused Triton forward and backward of softmax attention over short sequences (same formulas as
naive.py), for Lq, Lk <= 128: all keys of one row and head fit in one tile, so a program holds a
(queries, Lk) score tile in registers and nothing of size Lq x Lk touches memory (except dS for the
bias gradient, see "per_row"). Queries come in blocks of BLOCK_Q (q_block): by default the whole row
(BLOCK_Q = the padded Lq); CONFIG_OVERRIDE["q_block"] sets smaller blocks (see Defaults).

Forward, one program per (row n, head h, block of BLOCK_Q queries): load its Q block (BLOCK_Q, E),
all of K, V (Lk, E) with their strides (slices of a fused projection need no copy), then in fp32

    S = Q K^T / sqrt(E) + bias[seed(n), h] ,  S = lowest where not visible ,  P = softmax(S)
    Pd = P * keep / (1 - p)                  (keep regenerated from Philox, see below)
    O = Pd V                                  (stored (N, Lq, H, E) contiguous, in q's dtype)

(a query's softmax runs over all keys of the tile, so blocks need nothing from each other).

Backward: per row, head and query block it recomputes S and P from Q and K (all keys in the tile, so
no saved statistics are needed) and

    dPd = dO V^T ,  delta_i = sum_j Pd_ij dPd_ij  (= dO_i . O_i) ,  dS = P * (dPd * keep / (1 - p) - delta)
    dS = 0 where not visible   (masked scores get no gradient, as masked_fill gives the reference)
    dV = Pd^T dO ,  dQ = dS K / sqrt(E) ,  dK = dS^T Q / sqrt(E)   (dV, dK: sums over the query blocks)
    d(bias)[seed, h] = sum over the seed's rows of dS

dQ, dK, dV are stored through strides, so a packed input (a self-attention layer's qkv (N, L, 3, H, E),
cross-attention's kv (N, Lk, 2, H, E); short_attention_qkv_triton, short_attention_q_kv_triton) gets
its gradient written into one buffer of its own shape and autograd stacks nothing. Each program
stores rows of E contiguous elements (128 bytes at E = 64 in bf16), as it loads them. Two schemes
(CONFIG_OVERRIDE["bwd_scheme"]), both deterministic (no atomics):

    "per_row"            one program per (row n, head h) (N * H programs): K and V stay
                         loaded while it loops over the query blocks (one step for a whole-row
                         block), storing each block's dQ and summing dK, dV in fp32 registers across
                         the loop (the flash-attention backward, with all keys in one tile). With a
                         bias gradient each block stores its dS rows into a buffer (N, H, Lq, Lk), and
                         torch sums it over each seed's rows in fp32 (.view(S, B, H, Lq, Lk).sum(1)).
                         The buffer has the inputs' dtype: fp32 for fp32 inputs (exact); for 16-bit
                         inputs 16-bit dS, which is the very operand the dQ and dK products take and
                         what the reference's 16-bit scores give, at half the bytes to write and read.
    "rows"               one program per (seed, chunk of ROWS rows of that seed, head), its rows one
                         after the other, each as one whole (Lq, Lk) tile, their dS summed in a fp32
                         register tile, one partial per chunk, the partials summed in a fixed order
                         by a Triton kernel (the forward still takes query blocks).

Defaults (DEFAULT_BWD_SCHEME, q_block): per_row, with the whole row as one query block up to 64 keys
and blocks of 32 queries beyond. With whole rows only, one-tile per_row was measured faster than rows
at L <= 41 and slower at L = 81, where the 128 x 128 tiles (2.5x the 81 x 81 scores, fp32 S, P and dS
tiles spilling registers) made the forward + backward 3.5 ms with rows, 4.6 ms with per_row (torch
3.6). Blocks of 32 queries (per_row looping over them, dK and dV in registers) take it to 1.96 ms and
the forward from 1.08 to 0.69 ms; blocks of 16 gave 2.32 ms, of 64 4.71 ms. At L = 41 blocks of 16
were 5% faster than whole rows (0.571 vs 0.599 ms), of 32 slower (0.664): left at whole rows. (H200,
b1ef030, graphed, bf16, 1280 rows, 6 heads, E = 64, bias + padding + dropout 0.15; python -m
gbla.bench.attention_speed, outputs/bench/attention_speed.md.)

Dropout: keep = u >= p, u = tl.rand(seed, ((n H + h) Lq + i) Lk + j) (one Philox call per score, int64
counter; see _keep), a function of (seed, n, h, i, j) and the shape only, the same whatever the query
blocks. A draw of one call per four scores (tl.rand4x, interleaved over the columns) was tried and
dropped: it passed every interpreter test, but compiled on an H200 (Triton 3.6) its kernels applied
other masks than each other and training with it collapsed (outputs/bench/NOTES.md). The seed is an
int64 device tensor drawn with torch.randint for every call (so a CUDA-graph replay draws new values)
and saved for the backward, which regenerates the same keep-mask. `dropout_keep_mask` materializes it
through the same code path, for the tests.

Matrix products: fp32 inputs use full fp32 ("ieee") products; 16-bit inputs multiply 16-bit
operands (P and dS rounded to the inputs' dtype, as flash attention does) with fp32 accumulation;
under the interpreter the same rounded operands are multiplied as fp32. Softmax, dropout scaling and
all accumulation are fp32. Written against the Triton 3.6 API and runnable under TRITON_INTERPRET=1.

This module is longer than 500 lines: the forward, both backward schemes, the dropout draw and their
launch configuration share the jitted helpers (_probs, _keep, _bwd_block) and the derivation above;
split, one computation and its formulas would be spread over several files.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from gbla.ops.attention.naive import check_gathered_kv_inputs, check_short_attention_inputs, unbind_packed
from gbla.ops.utils import draw_seed, interpreting, num_sms, sum_partials

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
def _keep(seed, n, h, rows, H, Lq, Lk, dropout_p, BLOCK_K: tl.constexpr):
    """The dropout keep-mask (len(rows), BLOCK_K) of row n, head h at query rows `rows`, keys
    0..BLOCK_K-1: one Philox call per score, counter ((n H + h) Lq + i) Lk + j, so the mask is a
    function of (seed, n, h, i, j) (and the shape), the same in every tiling of the queries."""
    cols = tl.arange(0, BLOCK_K)
    offs = ((n.to(tl.int64) * H + h) * Lq + rows[:, None]) * Lk + cols[None, :]
    return tl.rand(seed, offs) >= dropout_p


@triton.jit
def _probs(q, k, bias_ptr, km_ptr, n, s, h, rows, cols, Lq, Lk, smn, sml, sbs, sbh, sbq, sbk, scale,
           CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, MODE: tl.constexpr):
    """Softmax probabilities P (BLOCK_Q, BLOCK_K) fp32 of one row and head at query rows `rows` (a
    query block), and where they are visible. Keys past Lk get -inf (weight 0 always); masked keys the
    lowest finite value (all-masked rows average uniformly over the Lk keys)."""
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
    q_ptr, k_ptr, v_ptr, km_ptr, bias_ptr, seed_ptr, o_ptr, kr_ptr,
    sqn, sql, sqh, skn, skl, skh, svn, svl, svh, smn, sml, sbs, sbh, sbq, sbk, son, sol, soh, skrn, skrl,
    B, H, Lq, Lk, E, scale, dropout_p,
    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr, CAUSAL: tl.constexpr,
    HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr, MODE: tl.constexpr,
    KEY_ROWS: tl.constexpr,
):
    """O of one row n and head h at one block of BLOCK_Q queries (grid: N * H, query blocks). KEY_ROWS:
    key position j of row n is read from row kr[n, j] of k and v (beam search's decoder cache)."""
    pid = tl.program_id(0)
    n = pid // H
    h = pid % H
    n64 = n.to(tl.int64)
    rows = tl.program_id(1) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    cols = tl.arange(0, BLOCK_K)
    e = tl.arange(0, BLOCK_E)
    q = _tile(q_ptr + n64 * sqn + h * sqh, rows, sql, e, Lq, E)
    if KEY_ROWS:
        # int64 offsets: the cache's position stride is (rows x 2 H E), large at evaluation's batch sizes
        kr = tl.load(kr_ptr + n64 * skrn + cols * skrl, mask=cols < Lk, other=0).to(tl.int64)
        ok = (cols < Lk)[:, None] & (e < E)[None, :]
        k = tl.load(k_ptr + h * skh + (kr * skn + cols.to(tl.int64) * skl)[:, None] + e[None, :], mask=ok, other=0.0)
        v = tl.load(v_ptr + h * svh + (kr * svn + cols.to(tl.int64) * svl)[:, None] + e[None, :], mask=ok, other=0.0)
    else:
        k = _tile(k_ptr + n64 * skn + h * skh, cols, skl, e, Lk, E)
        v = _tile(v_ptr + n64 * svn + h * svh, cols, svl, e, Lk, E)
    p, vis = _probs(q, k, bias_ptr, km_ptr, n, n // B, h, rows, cols, Lq, Lk, smn, sml, sbs, sbh, sbq, sbk, scale,
                    CAUSAL, HAS_MASK, HAS_BIAS, MODE)
    if DROPOUT:
        keep = _keep(tl.load(seed_ptr), n, h, rows, H, Lq, Lk, dropout_p, BLOCK_K)
        p = tl.where(keep, p * (1.0 / (1.0 - dropout_p)), 0.0)
    o = _dot(p.to(v.dtype), v, MODE)
    tl.store(o_ptr + n64 * son + h * soh + rows[:, None] * sol + e[None, :], o.to(o_ptr.dtype.element_ty),
             mask=(rows < Lq)[:, None] & (e < E)[None, :])


@triton.jit
def _one_query_kernel(
    q_ptr, k_ptr, v_ptr, bias_ptr, kr_ptr, o_ptr,
    sqn, sqh, skn, skl, skh, svn, svl, svh, sbs, sbh, sbk, son, soh, skrn, skrl,
    B, H, Lk, E, scale,
    BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    """O of one row n, every head, for its single query over Lk keys read through kr (key j of row n
    from row kr[n, j] of k and v): a decoding step. Products and sums elementwise in fp32: tl.dot needs
    16-row tiles, and here a program has one query and a handful of keys per head, so the general
    kernel's (16, 16) tiles per (row, head) were mostly padding."""
    n = tl.program_id(0)
    n64 = n.to(tl.int64)
    h = tl.arange(0, BLOCK_H)
    j = tl.arange(0, BLOCK_K)
    e = tl.arange(0, BLOCK_E)
    he_ok = (h < H)[:, None] & (e < E)[None, :]
    q = tl.load(q_ptr + n64 * sqn + h[:, None] * sqh + e[None, :], mask=he_ok, other=0.0).to(tl.float32)  # (H, E)
    kr = tl.load(kr_ptr + n64 * skrn + j * skrl, mask=j < Lk, other=0).to(tl.int64)
    j_ok = j < Lk
    ok = j_ok[:, None, None] & he_ok[None, :, :]
    koff = kr * skn + j.to(tl.int64) * skl                                             # (K,), int64
    k = tl.load(k_ptr + koff[:, None, None] + h[None, :, None] * skh + e[None, None, :], mask=ok, other=0.0)
    sc = tl.sum(k.to(tl.float32) * q[None, :, :], axis=2) * scale                      # (K, H)
    if HAS_BIAS:
        b = tl.load(bias_ptr + (n // B) * sbs + h[None, :] * sbh + j[:, None] * sbk,
                    mask=j_ok[:, None] & (h < H)[None, :], other=0.0)
        sc = sc + b.to(tl.float32)
    sc = tl.where(j_ok[:, None], sc, float("-inf"))
    p = tl.exp(sc - tl.max(sc, axis=0)[None, :])
    p = p / tl.sum(p, axis=0)[None, :]
    voff = kr * svn + j.to(tl.int64) * svl
    v = tl.load(v_ptr + voff[:, None, None] + h[None, :, None] * svh + e[None, None, :], mask=ok, other=0.0)
    o = tl.sum(p[:, :, None] * v.to(tl.float32), axis=0)                                # (H, E)
    tl.store(o_ptr + n64 * son + h[:, None] * soh + e[None, :], o.to(o_ptr.dtype.element_ty), mask=he_ok)


@triton.jit
def _bwd_block(q, k, v, do, bias_ptr, km_ptr, n, s, h, seed, rows, cols, H, Lq, Lk, smn, sml, sbs, sbh, sbq, sbk,
               scale, dropout_p, BLOCK_K: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
               HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr, MODE: tl.constexpr):
    """The backward of one query block (q, do: (BLOCK_Q, BLOCK_E) at query rows `rows`) against all
    keys of row n and head h: (dS (BLOCK_Q, BLOCK_K) fp32, zero outside the visible scores; dQ;
    Pd^T dO and dS^T Q, this block's terms of dV and of dK / scale)."""
    p, vis = _probs(q, k, bias_ptr, km_ptr, n, s, h, rows, cols, Lq, Lk, smn, sml, sbs, sbh, sbq, sbk, scale,
                    CAUSAL, HAS_MASK, HAS_BIAS, MODE)
    dpd = _dot(do, tl.trans(v), MODE)                           # gradient at the dropped probabilities
    if DROPOUT:
        inv_keep = 1.0 / (1.0 - dropout_p)
        keep = _keep(seed, n, h, rows, H, Lq, Lk, dropout_p, BLOCK_K)
        pd = tl.where(keep, p * inv_keep, 0.0)
        dp = tl.where(keep, dpd * inv_keep, 0.0)
    else:
        pd = p
        dp = dpd
    delta = tl.sum(pd * dpd, axis=1)
    ds = tl.where(vis, p * (dp - delta[:, None]), 0.0)
    dv = _dot(tl.trans(pd.to(do.dtype)), do, MODE)
    dq = _dot(ds.to(k.dtype), k, MODE) * scale
    dk = _dot(tl.trans(ds.to(q.dtype)), q, MODE)
    return ds, dq, dk, dv


@triton.jit
def _bwd_one(q_ptr, k_ptr, v_ptr, km_ptr, bias_ptr, do_ptr, dq_ptr, dk_ptr, dv_ptr, n, s, h, seed,
             sqn, sql, sqh, skn, skl, skh, svn, svl, svh, smn, sml, sbs, sbh, sbq, sbk, sdon, sdol, sdoh,
             sgqn, sgql, sgqh, sgkn, sgkl, sgkh, sgvn, sgvl, sgvh, H, Lq, Lk, E, scale, dropout_p,
             BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr, CAUSAL: tl.constexpr,
             HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr, MODE: tl.constexpr):
    """Scheme "rows", one row: store dQ, dK, dV of row n and head h, the whole row as one tile (each
    through its own strides, so straight into a packed gradient); return dS (BLOCK_Q, BLOCK_K) fp32."""
    n64 = n.to(tl.int64)
    rows = tl.arange(0, BLOCK_Q)
    cols = tl.arange(0, BLOCK_K)
    e = tl.arange(0, BLOCK_E)
    q = _tile(q_ptr + n64 * sqn + h * sqh, rows, sql, e, Lq, E)
    k = _tile(k_ptr + n64 * skn + h * skh, cols, skl, e, Lk, E)
    v = _tile(v_ptr + n64 * svn + h * svh, cols, svl, e, Lk, E)
    do = _tile(do_ptr + n64 * sdon + h * sdoh, rows, sdol, e, Lq, E)
    ds, dq, dk, dv = _bwd_block(q, k, v, do, bias_ptr, km_ptr, n, s, h, seed, rows, cols, H, Lq, Lk, smn, sml,
                                sbs, sbh, sbq, sbk, scale, dropout_p, BLOCK_K, CAUSAL, HAS_MASK, HAS_BIAS, DROPOUT,
                                MODE)
    q_ok = (rows < Lq)[:, None] & (e < E)[None, :]
    k_ok = (cols < Lk)[:, None] & (e < E)[None, :]
    tl.store(dq_ptr + n64 * sgqn + h * sgqh + rows[:, None] * sgql + e[None, :], dq.to(dq_ptr.dtype.element_ty),
             mask=q_ok)
    tl.store(dk_ptr + n64 * sgkn + h * sgkh + cols[:, None] * sgkl + e[None, :],
             (dk * scale).to(dk_ptr.dtype.element_ty), mask=k_ok)
    tl.store(dv_ptr + n64 * sgvn + h * sgvh + cols[:, None] * sgvl + e[None, :], dv.to(dv_ptr.dtype.element_ty),
             mask=k_ok)
    return ds


@triton.jit
def _bwd_row_kernel(
    q_ptr, k_ptr, v_ptr, km_ptr, bias_ptr, seed_ptr, do_ptr, dq_ptr, dk_ptr, dv_ptr, ds_ptr,
    sqn, sql, sqh, skn, skl, skh, svn, svl, svh, smn, sml, sbs, sbh, sbq, sbk, sdon, sdol, sdoh,
    sgqn, sgql, sgqh, sgkn, sgkl, sgkh, sgvn, sgvl, sgvh, B, H, Lq, Lk, E, scale, dropout_p,
    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr, CAUSAL: tl.constexpr,
    HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DBIAS: tl.constexpr, DROPOUT: tl.constexpr,
    MODE: tl.constexpr,
):
    """Scheme "per_row": dQ, dK, dV of one row n and head h (grid axis 0 = N * H). K and V stay loaded
    while the program loops over blocks of BLOCK_Q queries (one block when BLOCK_Q covers Lq), storing
    each block's dQ and summing dK, dV in fp32 registers; with HAS_DBIAS each block's dS goes into
    ds (N, H, Lq, Lk) contiguous (distinct rows per block; summed over the rows by torch)."""
    pid = tl.program_id(0)
    n = pid // H
    h = pid % H
    s = n // B
    n64 = n.to(tl.int64)
    seed = 0
    if DROPOUT:
        seed = tl.load(seed_ptr)
    cols = tl.arange(0, BLOCK_K)
    e = tl.arange(0, BLOCK_E)
    k = _tile(k_ptr + n64 * skn + h * skh, cols, skl, e, Lk, E)
    v = _tile(v_ptr + n64 * svn + h * svh, cols, svl, e, Lk, E)
    dk = tl.zeros((BLOCK_K, BLOCK_E), dtype=tl.float32)
    dv = tl.zeros((BLOCK_K, BLOCK_E), dtype=tl.float32)
    for q0 in range(0, Lq, BLOCK_Q):
        rows = q0 + tl.arange(0, BLOCK_Q)
        q = _tile(q_ptr + n64 * sqn + h * sqh, rows, sql, e, Lq, E)
        do = _tile(do_ptr + n64 * sdon + h * sdoh, rows, sdol, e, Lq, E)
        ds, dq, dk_b, dv_b = _bwd_block(q, k, v, do, bias_ptr, km_ptr, n, s, h, seed, rows, cols, H, Lq, Lk, smn,
                                        sml, sbs, sbh, sbq, sbk, scale, dropout_p, BLOCK_K, CAUSAL, HAS_MASK,
                                        HAS_BIAS, DROPOUT, MODE)
        dk += dk_b
        dv += dv_b
        tl.store(dq_ptr + n64 * sgqn + h * sgqh + rows[:, None] * sgql + e[None, :],
                 dq.to(dq_ptr.dtype.element_ty), mask=(rows < Lq)[:, None] & (e < E)[None, :])
        if HAS_DBIAS:
            tl.store(ds_ptr + pid.to(tl.int64) * Lq * Lk + rows[:, None] * Lk + cols[None, :],
                     ds.to(ds_ptr.dtype.element_ty), mask=(rows < Lq)[:, None] & (cols < Lk)[None, :])
    k_ok = (cols < Lk)[:, None] & (e < E)[None, :]
    tl.store(dk_ptr + n64 * sgkn + h * sgkh + cols[:, None] * sgkl + e[None, :],
             (dk * scale).to(dk_ptr.dtype.element_ty), mask=k_ok)
    tl.store(dv_ptr + n64 * sgvn + h * sgvh + cols[:, None] * sgvl + e[None, :], dv.to(dv_ptr.dtype.element_ty),
             mask=k_ok)


@triton.jit
def _bwd_rows_kernel(
    q_ptr, k_ptr, v_ptr, km_ptr, bias_ptr, seed_ptr, do_ptr, dq_ptr, dk_ptr, dv_ptr, dbpart_ptr,
    sqn, sql, sqh, skn, skl, skh, svn, svl, svh, smn, sml, sbs, sbh, sbq, sbk, sdon, sdol, sdoh,
    sgqn, sgql, sgqh, sgkn, sgkl, sgkh, sgvn, sgvl, sgvh, S, B, H, Lq, Lk, E, scale, dropout_p, ROWS,
    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr, CAUSAL: tl.constexpr,
    HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DBIAS: tl.constexpr, DROPOUT: tl.constexpr,
    MODE: tl.constexpr,
):
    """Scheme "rows": dQ, dK, dV of ROWS rows of seed s and head h, one after the other (grid: chunk,
    head, seed); with HAS_DBIAS the chunk's partial d(bias)[s, h] = its rows' dS summed in registers."""
    c = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.program_id(2)
    rows = tl.arange(0, BLOCK_Q)
    cols = tl.arange(0, BLOCK_K)
    seed = 0
    if DROPOUT:
        seed = tl.load(seed_ptr)
    dbias = tl.zeros((BLOCK_Q, BLOCK_K), dtype=tl.float32)
    b0 = c * ROWS
    for b in range(b0, tl.minimum(b0 + ROWS, B)):
        ds = _bwd_one(q_ptr, k_ptr, v_ptr, km_ptr, bias_ptr, do_ptr, dq_ptr, dk_ptr, dv_ptr, s * B + b, s, h, seed,
                      sqn, sql, sqh, skn, skl, skh, svn, svl, svh, smn, sml, sbs, sbh, sbq, sbk, sdon, sdol, sdoh,
                      sgqn, sgql, sgqh, sgkn, sgkl, sgkh, sgvn, sgvl, sgvh, H, Lq, Lk, E, scale, dropout_p,
                      BLOCK_Q, BLOCK_K, BLOCK_E, CAUSAL, HAS_MASK, HAS_BIAS, DROPOUT, MODE)
        if HAS_DBIAS:
            dbias += ds
    if HAS_DBIAS:
        part = dbpart_ptr + ((c * S + s) * H + h).to(tl.int64) * Lq * Lk
        tl.store(part + rows[:, None] * Lk + cols[None, :], dbias,
                 mask=(rows < Lq)[:, None] & (cols < Lk)[None, :])


@triton.jit
def _keep_mask_kernel(seed_ptr, out_ptr, H, Lq, Lk, dropout_p, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr):
    """The keep-mask (N, H, Lq, Lk) uint8 that the attention kernels draw for this seed (grid: N * H,
    query blocks)."""
    pid = tl.program_id(0)
    n = pid // H
    h = pid % H
    rows = tl.program_id(1) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    cols = tl.arange(0, BLOCK_K)
    keep = _keep(tl.load(seed_ptr), n, h, rows, H, Lq, Lk, dropout_p, BLOCK_K)
    tl.store(out_ptr + pid.to(tl.int64) * Lq * Lk + rows[:, None] * Lk + cols[None, :], keep.to(tl.uint8),
             mask=(rows < Lq)[:, None] & (cols < Lk)[None, :])


# ----------------------------------------------------------------------------------------------
# launch configuration
# ----------------------------------------------------------------------------------------------
# Benchmarks may set keys here: "bwd_scheme" (one of BWD_SCHEMES), "q_block" (queries per block, see
# q_block), "fwd_num_warps", "bwd_num_warps", "rows" (rows per program of the "rows" scheme when there
# is a bias gradient). Results differ only in rounding (summation order; "per_row" rounds dS to a
# 16-bit input dtype before summing it); the dropout draw is the same in all.
BWD_SCHEMES = ("per_row", "rows")
# Defaults = the fastest measured (module docstring, "Defaults"; python -m gbla.bench.attention_speed,
# outputs/bench/attention_speed.md): backward "per_row" (graphed, it beat "rows" at L = 13, 25, 41:
# 0.097 vs 0.122, 0.193 vs 0.259, 0.573 vs 0.624 ms, ad437f8), whole rows as one query block up to
# 64 keys, LONG_ROW_Q_BLOCK queries per block beyond (at L = 81, b1ef030: 1.96 ms against 3.48 for
# one-tile "rows" and 3.57 for torch).
DEFAULT_BWD_SCHEME = "per_row; whole rows up to 64 keys, blocks of 32 queries beyond"
LONG_ROW_Q_BLOCK = 32
# Benchmarks' keys (besides q_block, fwd_num_warps, bwd_scheme, rows, ...): "one_query_kernel" (False:
# decoding steps take the general forward), "one_query_num_warps" (its launch; 2 unmeasured so far)
CONFIG_OVERRIDE: dict = {}


def _blocks(Lq: int, Lk: int, E: int) -> tuple[int, int, int]:
    """Tile sizes: powers of two, at least 16 (tl.dot's minimum)."""
    return tuple(max(16, triton.next_power_of_2(x)) for x in (Lq, Lk, E))


def q_block(block_q: int, block_k: int) -> int:
    """Queries per program block (forward) and per loop step (per_row backward) for a (block_q,
    block_k) tile: CONFIG_OVERRIDE["q_block"] (a power of two >= 16; at least block_q = one tile), else
    the whole tile up to 64 keys and LONG_ROW_Q_BLOCK beyond (DEFAULT_BWD_SCHEME); never more than
    block_q."""
    qb = CONFIG_OVERRIDE.get("q_block", block_q if block_k <= 64 else LONG_ROW_Q_BLOCK)
    if qb < 16 or qb & (qb - 1):
        raise ValueError(f"q_block must be a power of two >= 16, got {qb!r}")
    return min(qb, block_q)


def _num_warps(block_q: int, block_k: int, key: str, small: int = 4) -> int:
    """`small` warps up to (32, 32) tiles, 4 up to (64, 64), 8 beyond (or CONFIG_OVERRIDE[key])."""
    if key in CONFIG_OVERRIDE:
        return CONFIG_OVERRIDE[key]
    if block_q * block_k <= 32 * 32:
        return small
    return 4 if block_q * block_k <= 64 * 64 else 8


def bwd_scheme(block_q: int, block_k: int) -> str:
    """The backward's scheme for these tile sizes: CONFIG_OVERRIDE["bwd_scheme"], else "per_row"
    (DEFAULT_BWD_SCHEME; with query blocks of q_block beyond 64 keys)."""
    scheme = CONFIG_OVERRIDE.get("bwd_scheme", "per_row")
    if scheme not in BWD_SCHEMES:
        raise ValueError(f"bwd_scheme must be one of {BWD_SCHEMES}, got {scheme!r}")
    return scheme


# The "rows" scheme holds a whole (BLOCK_Q, BLOCK_K, BLOCK_E) tile per row. Compiled on an H200
# (Triton 3.6, 62dcac6) the 128 x 128 x 128 tile fit in bf16 but asked 327,680 B of shared memory in
# fp32 (the SM has 232,448): tiles up to the bf16 one's bytes are taken, larger ones refused.
ROWS_MAX_TILE_BYTES = 128 * 128 * 128 * 2


def rows_tile_fits(block_q: int, block_k: int, block_e: int, dtype: torch.dtype) -> bool:
    """Whether the "rows" scheme's one tile (its bytes: the three block sizes times the element size)
    is within ROWS_MAX_TILE_BYTES."""
    return block_q * block_k * block_e * torch.empty((), dtype=dtype).element_size() <= ROWS_MAX_TILE_BYTES


def _rows_per_program(S: int, B: int, H: int, device: torch.device, has_dbias: bool) -> int:
    """Rows of one program of the "rows" scheme. With a bias gradient, each program sums its rows'
    dS in registers and writes one partial: about 4 programs per SM over (seed, chunk, head), so the
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


# how q, k, v reach the op: "q,k,v" three (N, L, H, E) tensors; "qkv" one (N, L, 3, H, E) (a self-
# attention layer's fused projection); "q,kv" q and one (N, Lk, 2, H, E) (cross-attention's)
LAYOUTS = ("q,k,v", "qkv", "q,kv")


def _views(layout: str, a, b, c):
    """(q, k, v) as (N, L, H, E) views of the tensors passed in `layout`."""
    if layout == "qkv":
        return a.unbind(2)
    if layout == "q,kv":
        return (a, *b.unbind(2))
    return a, b, c


def _grad_buffers(layout: str, a, b, c):
    """Gradients of the tensors as passed (uninitialized, each contiguous; None for an absent one) and
    (dq, dk, dv) views into them: the kernels write a packed input's gradient in place, so autograd
    stacks nothing."""
    grads = tuple(None if t is None else torch.empty(t.shape, device=t.device, dtype=t.dtype) for t in (a, b, c))
    return grads, _views(layout, *grads)


def _forward(q, k, v, mask_u8, bias, seed, causal, num_seeds, dropout_p, key_rows=None) -> torch.Tensor:
    """The forward kernel's launch: O (N, Lq, H, E) for q's N rows. key_rows (N, Lk): the row of k and v
    each key position of each row is read from (None: row n's own)."""
    N, Lq, H, E = q.shape
    Lk = k.shape[1]
    bq, bk, be = _blocks(Lq, Lk, E)
    qb = q_block(bq, bk)
    out = torch.empty((N, Lq, H, E), device=q.device, dtype=q.dtype)
    kr, kr_strides = (key_rows, key_rows.stride()) if key_rows is not None else (q, (0, 0))
    _fwd_kernel[(N * H, triton.cdiv(Lq, qb))](
        q, k, v, *_mask_args(mask_u8, q)[:1], *_bias_args(bias, q)[:1], seed, out, kr,
        *_strides3(q), *_strides3(k), *_strides3(v), *_mask_args(mask_u8, q)[1:], *_bias_args(bias, q)[1:],
        *_strides3(out), *kr_strides, N // num_seeds, H, Lq, Lk, E, 1.0 / math.sqrt(E), dropout_p,
        BLOCK_Q=qb, BLOCK_K=bk, BLOCK_E=be, CAUSAL=causal, HAS_MASK=mask_u8 is not None,
        HAS_BIAS=bias is not None, DROPOUT=dropout_p > 0, MODE=_mode(q.dtype), KEY_ROWS=key_rows is not None,
        num_warps=_num_warps(qb, bk, "fwd_num_warps"))
    return out


class _ShortAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, layout, a, b, c, mask_u8, bias, seed, causal, num_seeds, dropout_p):
        q, k, v = _views(layout, a, b, c)
        out = _forward(q, k, v, mask_u8, bias, seed, causal, num_seeds, dropout_p)
        ctx.save_for_backward(a, b, c, mask_u8, bias, seed)
        ctx.layout, ctx.causal, ctx.num_seeds, ctx.dropout_p = layout, causal, num_seeds, dropout_p
        return out

    @staticmethod
    def backward(ctx, grad_out):
        a, b, c, mask_u8, bias, seed = ctx.saved_tensors
        q, k, v = _views(ctx.layout, a, b, c)
        N, Lq, H, E = q.shape
        Lk = k.shape[1]
        S = ctx.num_seeds
        B = N // S
        do = grad_out if grad_out.stride(-1) == 1 else grad_out.contiguous()
        has_dbias = bias is not None and ctx.needs_input_grad[5]
        grads, (dq, dk, dv) = _grad_buffers(ctx.layout, a, b, c)
        bq, bk, be = _blocks(Lq, Lk, E)
        scheme = bwd_scheme(bq, bk)
        ins = (q, k, v, *_mask_args(mask_u8, q)[:1], *_bias_args(bias, q)[:1], seed, do, dq, dk, dv)
        strides = (*_strides3(q), *_strides3(k), *_strides3(v), *_mask_args(mask_u8, q)[1:],
                   *_bias_args(bias, q)[1:], *_strides3(do), *_strides3(dq), *_strides3(dk), *_strides3(dv))
        meta = dict(BLOCK_K=bk, BLOCK_E=be, CAUSAL=ctx.causal, HAS_MASK=mask_u8 is not None,
                    HAS_BIAS=bias is not None, HAS_DBIAS=has_dbias, DROPOUT=ctx.dropout_p > 0, MODE=_mode(q.dtype),
                    num_stages=1)
        dbias = None
        if scheme == "per_row":
            # dS per (row, head) in the inputs' dtype: fp32 stays exact; a 16-bit dS is the operand the
            # dQ and dK products already take, and half the bytes of fp32 to write and read back
            ds = torch.empty((N, H, Lq, Lk), device=q.device, dtype=q.dtype) if has_dbias else dq
            # warps as for the whole tile: the loop's fp32 dK, dV accumulators (BLOCK_K, BLOCK_E) do not
            # shrink with the query block (8 warps at 128 x 128, as the one-tile kernel had)
            _bwd_row_kernel[(N * H,)](*ins, ds, *strides, B, H, Lq, Lk, E, 1.0 / math.sqrt(E), ctx.dropout_p,
                                      BLOCK_Q=q_block(bq, bk), num_warps=_num_warps(bq, bk, "bwd_num_warps", small=2),
                                      **meta)
            if has_dbias:
                dbias = ds.view(S, B, H, Lq, Lk).sum(1, dtype=torch.float32).to(bias.dtype)
        else:
            if not rows_tile_fits(bq, bk, be, q.dtype):
                raise ValueError(
                    f"bwd_scheme 'rows' holds one ({bq}, {bk}, {be}) tile per row: in {q.dtype} that is over "
                    f"ROWS_MAX_TILE_BYTES = {ROWS_MAX_TILE_BYTES} (more shared memory than an H200 SM has); "
                    f"use bwd_scheme 'per_row' (Lq={Lq}, Lk={Lk}, E={E})")
            rows = _rows_per_program(S, B, H, q.device, has_dbias)
            chunks = triton.cdiv(B, rows)
            part = (torch.empty((chunks, S, H, Lq, Lk), device=q.device, dtype=torch.float32) if has_dbias
                    else dq)
            _bwd_rows_kernel[(chunks, H, S)](*ins, part, *strides, S, B, H, Lq, Lk, E, 1.0 / math.sqrt(E),
                                             ctx.dropout_p, rows, BLOCK_Q=bq,
                                             num_warps=_num_warps(bq, bk, "bwd_num_warps"), **meta)
            if has_dbias:
                dbias = sum_partials(part).to(bias.dtype)
        return None, *grads, None, dbias, None, None, None, None


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


def _attention(layout, a, b, c, key_mask, causal, bias, num_seeds, dropout_p, dropout_seed, name):
    q, k, v = _views(layout, a, b, c)
    check_short_attention_inputs(q, k, v, key_mask, causal, bias, num_seeds, dropout_p)
    why = unsupported(q, k)
    if why is not None:
        raise ValueError(f"{name}: {why}; use backend='torch' or 'auto'")
    a, b, c = (t if t is None or t.stride(-1) == 1 else t.contiguous() for t in (a, b, c))
    N, Lq, H, E = q.shape
    if N == 0 or Lq == 0 or k.shape[1] == 0:
        return torch.zeros((N, Lq, H, E), device=q.device, dtype=q.dtype)
    # a copy, not .view(torch.uint8): torch.compile (Inductor) cannot lower a bool-to-uint8 view
    mask_u8 = key_mask.to(torch.uint8) if key_mask is not None else None
    dropout_p = float(dropout_p)
    if dropout_p > 0:
        seed = draw_seed(q.device) if dropout_seed is None else dropout_seed.to(q.device, torch.int64)
    else:
        seed = a  # never read without dropout
    return _ShortAttention.apply(layout, a, b, c, mask_u8, bias, seed, bool(causal), int(num_seeds), dropout_p)


def short_attention_triton(q, k, v, *, key_mask=None, causal=False, bias=None, num_seeds=1, dropout_p=0.0,
                           dropout_seed=None) -> torch.Tensor:
    """Fused short attention (same contract as short_attention_reference). dropout_seed: the int64
    (1,) seed tensor of the dropout draw (a fresh one from draw_seed when None), for tests that
    replay it with dropout_keep_mask."""
    return _attention("q,k,v", q, k, v, key_mask, causal, bias, num_seeds, dropout_p, dropout_seed,
                      "short_attention_triton")


def short_attention_qkv_triton(qkv, *, key_mask=None, causal=False, bias=None, num_seeds=1, dropout_p=0.0,
                               dropout_seed=None) -> torch.Tensor:
    """short_attention_triton on q, k, v = qkv.unbind(2), qkv (N, L, 3, H, E); the backward writes
    qkv's gradient as one (N, L, 3, H, E) tensor."""
    unbind_packed(qkv, 3, "qkv")
    return _attention("qkv", qkv, None, None, key_mask, causal, bias, num_seeds, dropout_p, dropout_seed,
                      "short_attention_qkv_triton")


def short_attention_q_kv_triton(q, kv, *, key_mask=None, causal=False, bias=None, num_seeds=1, dropout_p=0.0,
                                dropout_seed=None) -> torch.Tensor:
    """short_attention_triton on q and k, v = kv.unbind(2), kv (N, Lk, 2, H, E); the backward writes
    kv's gradient as one (N, Lk, 2, H, E) tensor."""
    unbind_packed(kv, 2, "kv")
    return _attention("q,kv", q, kv, None, key_mask, causal, bias, num_seeds, dropout_p, dropout_seed,
                      "short_attention_q_kv_triton")


def short_attention_gathered_kv_triton(q, kv, key_rows, *, bias=None, num_seeds=1) -> torch.Tensor:
    """Fused forward of short_attention_gathered_kv_reference (same contract): key position j of row n
    is read from kv[key_rows[n, j], j] in the kernel, nothing gathered in memory. Evaluation only: no
    autograd (ValueError if an input requires a gradient)."""
    check_gathered_kv_inputs(q, kv, key_rows, bias, num_seeds)
    k, v = kv.unbind(2)
    why = unsupported(q, k)
    if why is not None:
        raise ValueError(f"short_attention_gathered_kv_triton: {why}; use backend='torch' or 'auto'")
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, kv, bias)):
        raise ValueError("short_attention_gathered_kv_triton has no backward: call it under torch.no_grad()")
    if q.stride(-1) != 1:
        q = q.contiguous()
    if kv.stride(-1) != 1:
        kv = kv.contiguous()
        k, v = kv.unbind(2)
    N, Lq, H, E = q.shape
    Lk = k.shape[1]
    if N == 0 or Lq == 0 or Lk == 0:
        return torch.zeros((N, Lq, H, E), device=q.device, dtype=q.dtype)
    if Lq > 1 or not CONFIG_OVERRIDE.get("one_query_kernel", True):
        return _forward(q, k, v, None, bias, q, False, int(num_seeds), 0.0, key_rows=key_rows)
    out = torch.empty((N, 1, H, E), device=q.device, dtype=q.dtype)
    sb = (bias.stride(0), bias.stride(1), bias.stride(3)) if bias is not None else (0, 0, 0)
    _one_query_kernel[(N,)](
        q, k, v, bias if bias is not None else q, key_rows, out,
        q.stride(0), q.stride(2), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        *sb, out.stride(0), out.stride(2), *key_rows.stride(), N // int(num_seeds), H, Lk, E, 1.0 / math.sqrt(E),
        BLOCK_H=max(2, triton.next_power_of_2(H)), BLOCK_K=max(2, triton.next_power_of_2(Lk)),
        BLOCK_E=max(16, triton.next_power_of_2(E)), HAS_BIAS=bias is not None,
        num_warps=CONFIG_OVERRIDE.get("one_query_num_warps", 2))
    return out


def dropout_keep_mask(seed: torch.Tensor, N: int, H: int, Lq: int, Lk: int, dropout_p: float) -> torch.Tensor:
    """The keep-mask (N, H, Lq, Lk) bool that short_attention_triton draws with this seed (drawn in
    query blocks of q_block, as the kernels are; the mask does not depend on them)."""
    out = torch.empty((N, H, Lq, Lk), device=seed.device, dtype=torch.uint8)
    bq, bk, _ = _blocks(Lq, Lk, 16)
    qb = q_block(bq, bk)
    if out.numel():
        _keep_mask_kernel[(N * H, triton.cdiv(Lq, qb))](seed, out, H, Lq, Lk, float(dropout_p), BLOCK_Q=qb,
                                                        BLOCK_K=bk, num_warps=4)
    return out.bool()


__all__ = ["short_attention_triton", "short_attention_qkv_triton", "short_attention_q_kv_triton",
           "dropout_keep_mask", "draw_seed", "unsupported", "bwd_scheme", "CONFIG_OVERRIDE", "BWD_SCHEMES",
           "DEFAULT_BWD_SCHEME", "LONG_ROW_Q_BLOCK", "q_block", "LAYOUTS", "MAX_LEN", "SUPPORTED_DTYPES"]
