"""Fused Triton forward and backward of the GBLA attention core (same formulas as naive.py).

Per batch row b and head h (E = head dim, phi(t) = elu(t) + 1, a_j = exp(key_log_weight_j), m_j = mask):

    k'_j = phi(k_j) a_j m_j ,  v'_j = v_j m_j ,  S = sum_j k'_j v'_j^T  (E x E, fp32) ,  s = sum_j k'_j
    p_i = phi(q_i) ,  num_i = S^T p_i                               (row form: num_i = p_i S)
    "none":      o_i = num_i / d_i ,  d_i = p_i . s + eps
    "rmsnorm":   x_i = num_i / N ,  r_i = (mean_f x_if^2 + eps)^-1/2 ,  y_i = x_i r_i ,  o_i = y_i * w
    "gated":     o_i = y_i * w * silu(z_i)
    o_i = 0 where m_i = 0.

Forward = two passes over the sequence, both split into chunks of tokens so that one long row
still gives B*H*chunks programs (enough to fill the GPU at B=1, L=65536):
  1. `_state_kernel`: each program reduces its chunk to a partial (S, s) in fp32; the partials are
     summed over the chunk axis by `_sum_partials_kernel` in a fixed order (deterministic, unlike
     atomics; it is a few MB at most).
  2. `_output_kernel`: each program loads the reduced S once, then streams its chunk of queries.

Backward (g_i = dL/do_i, zero at padded i because those outputs are the constant 0):
  "rmsnorm(_gated)": gate_i = silu(z_i) (1 if not gated), w = norm_weight (1 if None)
      dL/dw      = sum_i g_i * y_i * gate_i
      dL/dz_i    = g_i * y_i * w * silu'(z_i) ,   silu'(z) = sig(z) (1 + z (1 - sig(z)))
      gy_i       = g_i * w * gate_i                      (gradient at y_i)
      dx_i       = r_i (gy_i - y_i mean_f(gy_i * y_i))   (RMS-norm backward: dr/dx = -r^3 x / E)
      dnum_i     = dx_i / N
  "none":
      dnum_i     = g_i / d_i ,  dd_i = -(g_i . o_i) / d_i       (gradient at the denominator d_i)
  then, with dp_i the gradient at p_i:
      dp_i  = S dnum_i (+ dd_i s for "none") ;  dq_i = dp_i * phi'(q_i), phi'(t) = 1 (t > 0) else e^t
      dS    = sum_i p_i dnum_i^T             (E x E, reduced over the sequence like S)
      ds    = sum_i dd_i p_i                 ("none" only)
      dk'_j = dS v'_j + ds ,  dv'_j = dS^T k'_j
      dv_j  = m_j dv'_j ,  dk_j = m_j a_j phi'(k_j) dk'_j ,  dL/dlog a_j = m_j (dk'_j . k'_j)
This gives two backward passes: `_bwd_query_kernel` (recomputes p, num from q and the saved S;
writes dq, dz; reduces dS, ds, dw in per-chunk partials) and `_bwd_key_kernel` (dk, dv, dlw).

Matrix products (`Operands`): for 16-bit inputs the operands are rounded to bf16 (fp32 accumulate;
the rounding of phi(q), k' and S is of the order of the bf16 output rounding; measured 2e-3 relative
error of the whole layer against the fp32 reference), or tf32 with CONFIG_OVERRIDE["lowp"] = False;
fp32 inputs use full fp32 ("ieee") products, so fp32 results match the reference tightly.
Written against the Triton 3.6 API (no newer features) and runnable under TRITON_INTERPRET=1.

This module is longer than 500 lines: the derivation above, the four kernels that implement it and
the autograd function that launches them are one unit, checked against each other when read.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from gbla.ops.gbla.naive import check_gbla_inputs
from gbla.ops.utils import interpreting, num_sms, sum_partials

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class Norm(enum.IntEnum):
    """The kernels' NORM: the normalization, as a number a kernel can branch on at compile time."""
    NONE = 0        # "none": the linear-attention denominator
    RMS = 1         # "rmsnorm"
    RMS_GATED = 2   # "rmsnorm_gated"


NORM_OF = {"none": Norm.NONE, "rmsnorm": Norm.RMS, "rmsnorm_gated": Norm.RMS_GATED}


class Operands(enum.IntEnum):
    """The kernels' LOWP: how the operands of the matrix products are rounded (fp32 accumulate)."""
    FP32 = 0          # fp32 operands, multiplied at DOT_PREC ("ieee" for fp32 inputs, "tf32" else)
    BF16 = 1          # rounded to bf16 (16-bit inputs on a GPU)
    BF16_AS_FP32 = 2  # the same bf16 rounding, multiplied as fp32 (the Triton 3.9 interpreter's bf16 dot is wrong)


# the modes as compile-time constants the kernels can name (a kernel reads only constexpr globals)
_NORM_NONE: tl.constexpr = tl.constexpr(int(Norm.NONE))
_NORM_RMS_GATED: tl.constexpr = tl.constexpr(int(Norm.RMS_GATED))
_BF16: tl.constexpr = tl.constexpr(int(Operands.BF16))
_BF16_AS_FP32: tl.constexpr = tl.constexpr(int(Operands.BF16_AS_FP32))


# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _phi(t):
    """elu(t) + 1 (exp only of the non-positive part, so no overflow in the unused branch)."""
    return tl.where(t > 0, t + 1.0, tl.exp(tl.minimum(t, 0.0)))


@triton.jit
def _dphi(t):
    return tl.where(t > 0, 1.0, tl.exp(tl.minimum(t, 0.0)))


@triton.jit
def _mm(a, b, LOWP: tl.constexpr, DOT_PREC: tl.constexpr):
    """a @ b, fp32 accumulate, operands rounded as LOWP (an `Operands` mode) says."""
    if LOWP == _BF16:
        return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))
    elif LOWP == _BF16_AS_FP32:
        return tl.dot(a.to(tl.bfloat16).to(tl.float32), b.to(tl.bfloat16).to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=DOT_PREC)


@triton.jit
def _mm_acc(a, b, acc, LOWP: tl.constexpr, DOT_PREC: tl.constexpr):
    if LOWP == _BF16:
        return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16), acc)
    elif LOWP == _BF16_AS_FP32:
        return tl.dot(a.to(tl.bfloat16).to(tl.float32), b.to(tl.bfloat16).to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=DOT_PREC)


@triton.jit
def _operand(a, LOWP: tl.constexpr):
    """The rounding _mm applies to an operand, done once: loop-invariant operands (S, dS) are
    converted before the token loop instead of in every iteration (same values)."""
    if LOWP == _BF16:
        return a.to(tl.bfloat16)
    elif LOWP == _BF16_AS_FP32:
        return a.to(tl.bfloat16).to(tl.float32)
    else:
        return a


@triton.jit
def _program(H):
    """(row x head, chunk) of this program, and its batch row and head. Rows x heads are on grid
    axis 0 (up to 2^31 - 1 programs; axis 1 stops at 65535)."""
    pid_bh = tl.program_id(0)
    pid_c = tl.program_id(1)
    return pid_bh, pid_c, pid_bh // H, pid_bh % H


@triton.jit
def _tile(base, rows, stride_l, cols, L):
    """A (BLOCK_L, E) tile of one row and head's (L, E) slice in fp32, zero past the sequence end."""
    return tl.load(base + rows[:, None] * stride_l + cols[None, :], mask=(rows < L)[:, None], other=0.0).to(tl.float32)


@triton.jit
def _load_square(ptr, pid_bh, cols, E: tl.constexpr):
    """The (E, E) fp32 state (S or dS) of one row and head."""
    return tl.load(ptr + pid_bh * E * E + cols[:, None] * E + cols[None, :])


@triton.jit
def _inv_count(nreal_ptr, b, L, HAS_MASK: tl.constexpr):
    """1 / N, N = real tokens of row b (at least 1; all L without a mask)."""
    if HAS_MASK:
        inv_n = 1.0 / tl.load(nreal_ptr + b)
    else:
        inv_n = 1.0 / L
    return inv_n


@triton.jit
def _row_valid(mask_ptr, b, rows, L, smb, sml, HAS_MASK: tl.constexpr):
    valid = rows < L
    if HAS_MASK:
        m = tl.load(mask_ptr + b * smb + rows * sml, mask=valid, other=0)
        valid = valid & (m != 0)
    return valid


@triton.jit
def _state_kernel(
    k_ptr, v_ptr, lw_ptr, mask_ptr, spart_ptr, kspart_ptr,
    skb, skl, skh, svb, svl, svh, slb, sll, slh, smb, sml,
    L, H, TILES,
    E: tl.constexpr, BLOCK_L: tl.constexpr, HAS_LW: tl.constexpr, HAS_MASK: tl.constexpr,
    NEED_KSUM: tl.constexpr, DOT_PREC: tl.constexpr, LOWP: tl.constexpr,
):
    """Partial S = sum_j k'_j v'_j^T (and s = sum_j k'_j) over one chunk of TILES*BLOCK_L tokens."""
    pid_bh, pid_c, b, h = _program(H)
    cols = tl.arange(0, E)
    acc = tl.zeros((E, E), dtype=tl.float32)
    ksum = tl.zeros((E,), dtype=tl.float32)
    k_base = k_ptr + b * skb + h * skh
    v_base = v_ptr + b * svb + h * svh
    for t in range(0, TILES):
        rows = (pid_c * TILES + t) * BLOCK_L + tl.arange(0, BLOCK_L)
        valid = _row_valid(mask_ptr, b, rows, L, smb, sml, HAS_MASK)
        kk = _tile(k_base, rows, skl, cols, L)
        vv = _tile(v_base, rows, svl, cols, L)
        kp = _phi(kk)
        if HAS_LW:
            # padded key weights are replaced before exp(): a padded +inf must not give inf * 0 = nan
            lw = tl.load(lw_ptr + b * slb + rows * sll + h * slh, mask=valid, other=0.0).to(tl.float32)
            kp = kp * tl.exp(lw)[:, None]
        kp = tl.where(valid[:, None], kp, 0.0)
        vv = tl.where(valid[:, None], vv, 0.0)
        acc = _mm_acc(tl.trans(kp), vv, acc, LOWP, DOT_PREC)
        if NEED_KSUM:
            ksum += tl.sum(kp, axis=0)
    out = spart_ptr + (pid_c * tl.num_programs(0) + pid_bh) * E * E
    tl.store(out + cols[:, None] * E + cols[None, :], acc)
    if NEED_KSUM:
        tl.store(kspart_ptr + (pid_c * tl.num_programs(0) + pid_bh) * E + cols, ksum)


@triton.jit
def _output_kernel(
    q_ptr, z_ptr, mask_ptr, s_ptr, ks_ptr, nw_ptr, nreal_ptr, o_ptr,
    sqb, sql, sqh, szb, szl, szh, smb, sml, sob, sol, soh,
    L, H, TILES, eps,
    E: tl.constexpr, BLOCK_L: tl.constexpr, NORM: tl.constexpr, HAS_NW: tl.constexpr,
    HAS_MASK: tl.constexpr, DOT_PREC: tl.constexpr, LOWP: tl.constexpr,
):
    """o_i for one chunk of queries, from the reduced state S (and s for "none")."""
    pid_bh, pid_c, b, h = _program(H)
    cols = tl.arange(0, E)
    S = _operand(_load_square(s_ptr, pid_bh, cols, E), LOWP)
    if NORM == _NORM_NONE:
        ks = tl.load(ks_ptr + pid_bh * E + cols)
    else:
        inv_n = _inv_count(nreal_ptr, b, L, HAS_MASK)
        if HAS_NW:
            nw = tl.load(nw_ptr + cols).to(tl.float32)
    q_base = q_ptr + b * sqb + h * sqh
    z_base = z_ptr + b * szb + h * szh
    o_base = o_ptr + b * sob + h * soh
    for t in range(0, TILES):
        rows = (pid_c * TILES + t) * BLOCK_L + tl.arange(0, BLOCK_L)
        valid = _row_valid(mask_ptr, b, rows, L, smb, sml, HAS_MASK)
        in_seq = (rows < L)[:, None]
        qq = _tile(q_base, rows, sql, cols, L)
        p = _phi(qq)
        num = _mm(p, S, LOWP, DOT_PREC)
        if NORM == _NORM_NONE:
            den = tl.sum(p * ks[None, :], axis=1) + eps
            o = num / den[:, None]
        else:
            x = num * inv_n
            r = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / E + eps)
            o = x * r[:, None]
            if HAS_NW:
                o = o * nw[None, :]
            if NORM == _NORM_RMS_GATED:
                zz = _tile(z_base, rows, szl, cols, L)
                o = o * (zz * tl.sigmoid(zz))
        o = tl.where(valid[:, None], o, 0.0)
        tl.store(o_base + rows[:, None] * sol + cols[None, :], o.to(o_ptr.dtype.element_ty), mask=in_seq)


@triton.jit
def _bwd_query_kernel(
    q_ptr, z_ptr, g_ptr, mask_ptr, s_ptr, ks_ptr, nw_ptr, nreal_ptr,
    dq_ptr, dz_ptr, dspart_ptr, dkspart_ptr, dnwpart_ptr,
    sqb, sql, sqh, szb, szl, szh, sgb, sgl, sgh, smb, sml, sob, sol, soh,
    L, H, TILES, eps,
    E: tl.constexpr, BLOCK_L: tl.constexpr, NORM: tl.constexpr, HAS_NW: tl.constexpr,
    HAS_MASK: tl.constexpr, DOT_PREC: tl.constexpr, LOWP: tl.constexpr,
):
    """dq, dz per query; partial dS = sum_i p_i dnum_i^T, ds = sum_i dd_i p_i, dw over one chunk."""
    pid_bh, pid_c, b, h = _program(H)
    cols = tl.arange(0, E)
    S = _operand(_load_square(s_ptr, pid_bh, cols, E), LOWP)
    S_t = tl.trans(S)
    dS = tl.zeros((E, E), dtype=tl.float32)
    if NORM == _NORM_NONE:
        ks = tl.load(ks_ptr + pid_bh * E + cols)
        dks = tl.zeros((E,), dtype=tl.float32)
    else:
        inv_n = _inv_count(nreal_ptr, b, L, HAS_MASK)
        if HAS_NW:
            nw = tl.load(nw_ptr + cols).to(tl.float32)
            dnw = tl.zeros((E,), dtype=tl.float32)
    q_base = q_ptr + b * sqb + h * sqh
    z_base = z_ptr + b * szb + h * szh
    g_base = g_ptr + b * sgb + h * sgh
    for t in range(0, TILES):
        rows = (pid_c * TILES + t) * BLOCK_L + tl.arange(0, BLOCK_L)
        valid = _row_valid(mask_ptr, b, rows, L, smb, sml, HAS_MASK)
        in_seq = (rows < L)[:, None]
        offs = rows[:, None] * sol + cols[None, :]
        qq = _tile(q_base, rows, sql, cols, L)
        g = _tile(g_base, rows, sgl, cols, L)
        g = tl.where(valid[:, None], g, 0.0)
        p = _phi(qq)
        num = _mm(p, S, LOWP, DOT_PREC)
        if NORM == _NORM_NONE:
            den = tl.sum(p * ks[None, :], axis=1) + eps
            o = num / den[:, None]
            dnum = g / den[:, None]
            dd = -tl.sum(g * o, axis=1) / den
            dp = _mm(dnum, S_t, LOWP, DOT_PREC) + dd[:, None] * ks[None, :]
            dks += tl.sum(dd[:, None] * p, axis=0)
        else:
            x = num * inv_n
            r = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / E + eps)
            y = x * r[:, None]
            gy = g
            if NORM == _NORM_RMS_GATED:
                zz = _tile(z_base, rows, szl, cols, L)
                sig = tl.sigmoid(zz)
                gate = zz * sig
                dgate = g * y
                if HAS_NW:
                    dgate = dgate * nw[None, :]
                dz = dgate * sig * (1.0 + zz * (1.0 - sig))
                tl.store(dz_ptr + b * sob + h * soh + offs, dz.to(dz_ptr.dtype.element_ty), mask=in_seq)
                gy = gy * gate
            if HAS_NW:
                dnw += tl.sum(gy * y, axis=0)
                gy = gy * nw[None, :]
            dx = r[:, None] * (gy - y * (tl.sum(gy * y, axis=1) / E)[:, None])
            dnum = dx * inv_n
            dp = _mm(dnum, S_t, LOWP, DOT_PREC)
        dq = dp * _dphi(qq)
        tl.store(dq_ptr + b * sob + h * soh + offs, dq.to(dq_ptr.dtype.element_ty), mask=in_seq)
        dS = _mm_acc(tl.trans(p), dnum, dS, LOWP, DOT_PREC)
    part = pid_c * tl.num_programs(0) + pid_bh
    tl.store(dspart_ptr + part * E * E + cols[:, None] * E + cols[None, :], dS)
    if NORM == _NORM_NONE:
        tl.store(dkspart_ptr + part * E + cols, dks)
    elif HAS_NW:
        tl.store(dnwpart_ptr + part * E + cols, dnw)


@triton.jit
def _bwd_key_kernel(
    k_ptr, v_ptr, lw_ptr, mask_ptr, ds_ptr, dks_ptr, dk_ptr, dv_ptr, dlw_ptr,
    skb, skl, skh, svb, svl, svh, slb, sll, slh, smb, sml, sob, sol, soh, sdlb, sdll, sdlh,
    L, H, TILES,
    E: tl.constexpr, BLOCK_L: tl.constexpr, NORM: tl.constexpr, HAS_LW: tl.constexpr,
    HAS_MASK: tl.constexpr, DOT_PREC: tl.constexpr, LOWP: tl.constexpr,
):
    """dk'_j = dS v'_j + ds, dv'_j = dS^T k'_j, then through the mask, key weight and phi."""
    pid_bh, pid_c, b, h = _program(H)
    cols = tl.arange(0, E)
    dS = _operand(_load_square(ds_ptr, pid_bh, cols, E), LOWP)
    dS_t = tl.trans(dS)
    if NORM == _NORM_NONE:
        dks = tl.load(dks_ptr + pid_bh * E + cols)
    k_base = k_ptr + b * skb + h * skh
    v_base = v_ptr + b * svb + h * svh
    for t in range(0, TILES):
        rows = (pid_c * TILES + t) * BLOCK_L + tl.arange(0, BLOCK_L)
        valid = _row_valid(mask_ptr, b, rows, L, smb, sml, HAS_MASK)
        in_seq = (rows < L)[:, None]
        offs = rows[:, None] * sol + cols[None, :]
        kk = _tile(k_base, rows, skl, cols, L)
        vv = _tile(v_base, rows, svl, cols, L)
        vv = tl.where(valid[:, None], vv, 0.0)
        kp = _phi(kk)
        if HAS_LW:
            lw = tl.load(lw_ptr + b * slb + rows * sll + h * slh, mask=valid, other=0.0).to(tl.float32)
            a = tl.exp(lw)
            kp = kp * a[:, None]
        kp = tl.where(valid[:, None], kp, 0.0)
        dkp = _mm(vv, dS_t, LOWP, DOT_PREC)
        if NORM == _NORM_NONE:
            dkp = dkp + dks[None, :]
        dv = _mm(kp, dS, LOWP, DOT_PREC)
        dk = dkp * _dphi(kk)
        if HAS_LW:
            dk = dk * a[:, None]
            dlw = tl.where(valid, tl.sum(dkp * kp, axis=1), 0.0)
            tl.store(dlw_ptr + b * sdlb + rows * sdll + h * sdlh, dlw.to(dlw_ptr.dtype.element_ty), mask=rows < L)
        dk = tl.where(valid[:, None], dk, 0.0)
        tl.store(dk_ptr + b * sob + h * soh + offs, dk.to(dk_ptr.dtype.element_ty), mask=in_seq)
        tl.store(dv_ptr + b * sob + h * soh + offs, dv.to(dv_ptr.dtype.element_ty), mask=in_seq)


# ----------------------------------------------------------------------------------------------
# launch configuration
# ----------------------------------------------------------------------------------------------
# Benchmarks may set keys here to sweep launch parameters (block_l, num_warps, num_stages,
# programs_per_sm, lowp); a key holding a dict under a kernel's name ("state", "output", "bwd_query",
# "bwd_key") overrides that kernel only. Results never depend on them beyond rounding order.
CONFIG_OVERRIDE: dict = {}
KERNELS = ("state", "output", "bwd_query", "bwd_key")
# per-kernel choices of the H200 sweep at E = 64, L = 32768 (outputs/bench/NOTES.md, v3); each beat
# the shared default by 2-7 us, about the run-to-run spread, so they are small, measured preferences
TUNED = {64: {"state": dict(block_l=32, num_stages=3), "bwd_query": dict(programs_per_sm=2),
              "bwd_key": dict(num_warps=8)}}


def launch_config(B: int, L: int, H: int, E: int, device: torch.device) -> dict:
    """Tile and chunk sizes per kernel. Chunks: about `programs_per_sm` programs per SM over all
    (row, head, chunk) triples, so B=1, L=65536 is spread across the GPU; each program loops over
    several tiles, so the E x E state is loaded/stored once per chunk, not once per tile. Each kernel
    chunks independently (partials are summed between the passes)."""
    if interpreting() or device.type != "cuda":
        default = dict(block_l=16, num_warps=4, num_stages=1, programs_per_sm=4)
    else:
        # H100 sweep (outputs/bench/NOTES.md): block 64, 4 warps, 2 stages at E = 64
        default = dict(block_l={16: 128, 32: 128, 64: 64, 128: 32}[E], num_warps=4 if E <= 64 else 8,
                       num_stages=2, programs_per_sm=4)
    shared = {k: v for k, v in CONFIG_OVERRIDE.items() if k not in KERNELS}
    # bf16 dot operands for 16-bit inputs: H100 sweep, core fwd+bwd 0.29 ms vs 0.35 ms with tf32
    cfg = {"lowp": shared.pop("lowp", True)}
    n_sms = num_sms(device)
    for kernel in KERNELS:
        tuned = {} if interpreting() or device.type != "cuda" else TUNED.get(E, {}).get(kernel, {})
        kc = {**default, **tuned, **shared, **CONFIG_OVERRIDE.get(kernel, {})}
        n_tiles = triton.cdiv(L, kc["block_l"])
        chunks_wanted = max(1, kc["programs_per_sm"] * n_sms // (B * H))
        tiles_per_chunk = max(1, triton.cdiv(n_tiles, chunks_wanted))
        cfg[kernel] = dict(BLOCK_L=kc["block_l"], TILES=tiles_per_chunk, n_chunks=triton.cdiv(n_tiles, tiles_per_chunk),
                           num_warps=kc["num_warps"], num_stages=kc["num_stages"])
    return cfg


def _operands(cfg: dict, dtype: torch.dtype) -> Operands:
    if not cfg["lowp"] or dtype == torch.float32:
        return Operands.FP32
    return Operands.BF16_AS_FP32 if interpreting() else Operands.BF16


def _strides4(t):
    return t.stride(0), t.stride(1), t.stride(2)


def _last_dim_contiguous(t):
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


@dataclass
class _Launch:
    """What the four kernel launches of one call share: the optional inputs (q as a placeholder
    pointer where one is absent; never read, the kernels' HAS_* constexprs guard it), their strides,
    and the compile-time modes."""
    cfg: dict
    norm: Norm
    dot_prec: str
    operands: Operands
    has_lw: bool
    has_mask: bool
    has_nw: bool
    lw: torch.Tensor
    m: torch.Tensor
    zz: torch.Tensor
    nw: torch.Tensor
    lw_strides: tuple
    m_strides: tuple
    z_strides: tuple

    @classmethod
    def of(cls, q, key_log_weight, mask_u8, z, norm_weight, norm: Norm, cfg: dict) -> "_Launch":
        has_lw, has_mask = key_log_weight is not None, mask_u8 is not None
        has_nw = norm_weight is not None and norm != Norm.NONE
        gated = norm == Norm.RMS_GATED
        return cls(cfg=cfg, norm=norm, dot_prec="ieee" if q.dtype == torch.float32 else "tf32",
                   operands=_operands(cfg, q.dtype), has_lw=has_lw, has_mask=has_mask, has_nw=has_nw,
                   lw=key_log_weight if has_lw else q, m=mask_u8 if has_mask else q, zz=z if gated else q,
                   nw=norm_weight if has_nw else q,
                   lw_strides=key_log_weight.stride() if has_lw else (0, 0, 0),
                   m_strides=mask_u8.stride() if has_mask else (0, 0),
                   z_strides=_strides4(z) if gated else (0, 0, 0))

    def grid(self, kernel: str, BH: int) -> tuple[int, int]:
        """(rows x heads, chunks): rows x heads on axis 0 (up to 2^31 - 1 programs; axis 1 stops at 65535)."""
        return BH, self.cfg[kernel]["n_chunks"]

    def meta(self, kernel: str, E: int) -> dict:
        """The compile-time arguments and launch options every kernel takes."""
        kc = self.cfg[kernel]
        return dict(E=E, BLOCK_L=kc["BLOCK_L"], HAS_MASK=self.has_mask, DOT_PREC=self.dot_prec,
                    LOWP=int(self.operands), num_warps=kc["num_warps"], num_stages=kc["num_stages"])


# ----------------------------------------------------------------------------------------------
# autograd
# ----------------------------------------------------------------------------------------------
class _GBLAAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, key_log_weight, mask_u8, z, norm_weight, n_real, norm, eps):
        B, L, H, E = q.shape
        run = _Launch.of(q, key_log_weight, mask_u8, z, norm_weight, norm, launch_config(B, L, H, E, q.device))
        need_ksum = norm == Norm.NONE
        nc = run.cfg["state"]["n_chunks"]
        f32 = dict(device=q.device, dtype=torch.float32)
        s_part = torch.empty(nc, B * H, E, E, **f32)
        ks_part = torch.empty(nc, B * H, E, **f32) if need_ksum else s_part
        _state_kernel[run.grid("state", B * H)](
            k, v, run.lw, run.m, s_part, ks_part, *_strides4(k), *_strides4(v), *run.lw_strides, *run.m_strides,
            L, H, run.cfg["state"]["TILES"], HAS_LW=run.has_lw, NEED_KSUM=need_ksum, **run.meta("state", E))
        state = sum_partials(s_part)
        ksum = sum_partials(ks_part) if need_ksum else state
        out = torch.empty((B, L, H, E), device=q.device, dtype=q.dtype)
        _output_kernel[run.grid("output", B * H)](
            q, run.zz, run.m, state, ksum, run.nw, n_real, out, *_strides4(q), *run.z_strides, *run.m_strides,
            *_strides4(out), L, H, run.cfg["output"]["TILES"], eps, NORM=int(norm), HAS_NW=run.has_nw,
            **run.meta("output", E))
        ctx.save_for_backward(q, k, v, key_log_weight, mask_u8, z, norm_weight, n_real, state,
                              ksum if need_ksum else None)
        ctx.cfg, ctx.norm, ctx.eps = run.cfg, norm, eps
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, key_log_weight, mask_u8, z, norm_weight, n_real, state, ksum = ctx.saved_tensors
        norm, eps = ctx.norm, ctx.eps
        B, L, H, E = q.shape
        g = _last_dim_contiguous(grad_out)
        run = _Launch.of(q, key_log_weight, mask_u8, z, norm_weight, norm, ctx.cfg)
        need_ksum = norm == Norm.NONE
        nc = run.cfg["bwd_query"]["n_chunks"]
        f32 = dict(device=q.device, dtype=torch.float32)
        dq = torch.empty((B, L, H, E), device=q.device, dtype=q.dtype)
        dk = torch.empty((B, L, H, E), device=q.device, dtype=k.dtype)
        dv = torch.empty((B, L, H, E), device=q.device, dtype=v.dtype)
        dz = torch.empty((B, L, H, E), device=q.device, dtype=z.dtype) if norm == Norm.RMS_GATED else dq
        dlw = torch.empty((B, L, H), device=q.device, dtype=key_log_weight.dtype) if run.has_lw else dq
        ds_part = torch.empty(nc, B * H, E, E, **f32)
        dks_part = torch.empty(nc, B * H, E, **f32) if need_ksum else ds_part
        dnw_part = torch.empty(nc, B * H, E, **f32) if run.has_nw else ds_part
        # dq/dk/dv/dz are allocated contiguous, so they share one set of strides
        _bwd_query_kernel[run.grid("bwd_query", B * H)](
            q, run.zz, g, run.m, state, ksum if need_ksum else state, run.nw, n_real,
            dq, dz, ds_part, dks_part, dnw_part,
            *_strides4(q), *run.z_strides, *_strides4(g), *run.m_strides, *_strides4(dq),
            L, H, run.cfg["bwd_query"]["TILES"], eps, NORM=int(norm), HAS_NW=run.has_nw, **run.meta("bwd_query", E))
        dstate = sum_partials(ds_part)
        dksum = sum_partials(dks_part) if need_ksum else dstate
        _bwd_key_kernel[run.grid("bwd_key", B * H)](
            k, v, run.lw, run.m, dstate, dksum, dk, dv, dlw,
            *_strides4(k), *_strides4(v), *run.lw_strides, *run.m_strides, *_strides4(dk),
            *(dlw.stride() if run.has_lw else (0, 0, 0)),
            L, H, run.cfg["bwd_key"]["TILES"], NORM=int(norm), HAS_LW=run.has_lw, **run.meta("bwd_key", E))
        d_nw = None
        if run.has_nw and ctx.needs_input_grad[6]:
            d_nw = sum_partials(dnw_part.view(-1, E)).to(norm_weight.dtype)  # torch: 8 us on an H200
        return (dq, dk, dv, dlw if run.has_lw else None, None, dz if norm == Norm.RMS_GATED else None, d_nw,
                None, None, None)


def gbla_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    key_log_weight: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    norm_weight: torch.Tensor | None = None,
    normalization: str = "rmsnorm_gated",
    eps: float = 1e-6,
) -> torch.Tensor:
    """Fused GBLA attention (same signature and formulas as gbla_attention_reference)."""
    check_gbla_inputs(q, k, v, key_log_weight, mask, z, norm_weight, normalization)
    B, L, H, E = q.shape
    if E not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"gbla_attention_triton: head dim E={E} is not supported; "
                         f"use one of {SUPPORTED_HEAD_DIMS} or backend='torch'")
    for name, t in (("q", q), ("k", k), ("v", v), ("z", z)):
        if t is not None and t.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"gbla_attention_triton: {name} has dtype {t.dtype}; supported: {SUPPORTED_DTYPES}")
    if q.device.type != "cuda" and not interpreting():
        raise RuntimeError("gbla_attention_triton needs CUDA tensors, or TRITON_INTERPRET=1 for the CPU "
                           "interpreter; use backend='torch' on the CPU")
    norm = NORM_OF[normalization]
    q, k, v, z = (_last_dim_contiguous(t) for t in (q, k, v, z))
    if norm != Norm.RMS_GATED:
        z = None  # not used by this normalization: no gradient either
    nw = norm_weight if norm != Norm.NONE else None
    if L == 0 or B == 0:
        return torch.zeros_like(q)
    if mask is not None:
        mask_u8 = mask.to(torch.uint8)  # a copy, not a view: torch.compile cannot lower a bool-to-uint8 view
        n_real = mask.sum(dim=1).clamp(min=1).to(torch.float32)
    else:
        mask_u8 = None
        n_real = q  # unused: without a mask the kernels divide by L
    return _GBLAAttention.apply(q, k, v, key_log_weight, mask_u8, z, nw, n_real, norm, float(eps))


__all__ = ["gbla_attention_triton", "launch_config", "CONFIG_OVERRIDE", "KERNELS", "Norm", "Operands",
           "SUPPORTED_HEAD_DIMS"]
