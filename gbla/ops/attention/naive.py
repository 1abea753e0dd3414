"""Plain-PyTorch reference of softmax attention over short sequences (the contract the fused kernel
is tested against).

Per row n (N = num_seeds * B rows, seed-major: row n belongs to seed n // B) and head h:

    s_ij  = q_i . k_j / sqrt(E) + bias[seed, h, i, j]
    vis_ij = key_mask[n, j] and (j <= i if causal)       (True where query i may attend key j)
    s_ij  = lowest value of the scores' dtype where not vis_ij
    p_i   = softmax_j(s_ij)
    p_i   = p_i * keep_i / (1 - dropout_p)                (dropout on the probabilities, inverted scaling)
    o_i   = sum_j p_ij v_j

Masked scores are set to the dtype's lowest value, not -inf: a query with no visible key (a padded
query before any real key, or any query of a row whose keys are all padding) then gets the uniform
average over all Lk keys instead of NaN, and its scores get no gradient (q, k and bias receive
nothing from it; v does, through the average). Callers zero such outputs anyway. For every other
query exp(lowest - max) is exactly 0, so masked keys get no weight at all.

Written out instead of SDPA: with a learned bias that needs a gradient SDPA takes its math path
anyway, and building its (B, H, L, L) float mask from bias and padding cost more than the attention
itself; here the bias is broadcast over the batch and the padding is one masked_fill. Autocast is
off inside: q, k, v arrive in the compute dtype (bf16 under autocast), the products and the softmax
run in that dtype (fp32 accumulation inside), so bf16 inputs give bf16 scores and probabilities;
fp64 inputs stay fp64 (gradcheck, the tests' float64 evaluation).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _check_seeds_and_bias(N, H, Lq, Lk, bias, num_seeds) -> None:
    if num_seeds < 1 or N % num_seeds != 0:
        raise ValueError(f"num_seeds ({num_seeds}) must divide the rows N = {N}")
    if bias is not None and bias.shape != (num_seeds, H, Lq, Lk):
        raise ValueError(f"bias must be (num_seeds, H, Lq, Lk) = {(num_seeds, H, Lq, Lk)}, got {tuple(bias.shape)}")


def check_short_attention_inputs(q, k, v, key_mask, causal, bias, num_seeds, dropout_p) -> None:
    """Shape and argument checks shared by every backend (raise ValueError naming the argument)."""
    if q.dim() != 4:
        raise ValueError(f"q must be (N, Lq, H, E), got shape {tuple(q.shape)}")
    N, Lq, H, E = q.shape
    if k.dim() != 4 or k.shape[0] != N or k.shape[2:] != (H, E):
        raise ValueError(f"k must be (N, Lk, H, E) = ({N}, Lk, {H}, {E}), got {tuple(k.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"v must have k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    Lk = k.shape[1]
    _check_seeds_and_bias(N, H, Lq, Lk, bias, num_seeds)
    if key_mask is not None:
        if key_mask.shape != (N, Lk):
            raise ValueError(f"key_mask must be (N, Lk) = {(N, Lk)}, got {tuple(key_mask.shape)}")
        if key_mask.dtype != torch.bool:
            raise ValueError(f"key_mask must be a bool tensor (True = real key), got {key_mask.dtype}")
    if causal and Lq != Lk:
        raise ValueError(f"causal attention needs Lq == Lk, got Lq={Lq}, Lk={Lk}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")


def unbind_packed(t: torch.Tensor, parts: int, name: str) -> tuple[torch.Tensor, ...]:
    """The `parts` (N, L, H, E) views of a packed projection t (N, L, parts, H, E) (qkv: 3, kv: 2);
    ValueError naming it if it is shaped otherwise."""
    if t.dim() != 5 or t.shape[2] != parts:
        raise ValueError(f"{name} must be (N, L, {parts}, H, E), got shape {tuple(t.shape)}")
    return t.unbind(2)


def visibility(key_mask: torch.Tensor | None, causal: bool, num_seeds: int, Lq: int, Lk: int,
               device) -> torch.Tensor | None:
    """Bool, broadcastable to (num_seeds, B, H, Lq, Lk): True where query i may attend key j; None = all."""
    allowed = None
    if key_mask is not None:
        allowed = key_mask.view(num_seeds, -1, 1, 1, Lk)
    if causal:
        tril = torch.ones(Lq, Lk, dtype=torch.bool, device=device).tril()
        allowed = tril if allowed is None else allowed & tril
    return allowed


def short_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    key_mask: torch.Tensor | None = None,
    causal: bool = False,
    bias: torch.Tensor | None = None,
    num_seeds: int = 1,
    dropout_p: float = 0.0,
    dropout_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference softmax attention; autograd provides the backward. q (N, Lq, H, E), k and v (N, Lk, H, E)
    (strided views are fine), key_mask (N, Lk) bool, bias (num_seeds, H, Lq, Lk). dropout_mask: an
    explicit keep-mask (N, H, Lq, Lk) bool used instead of drawing one (with dropout_p > 0), so a test
    can replay the kernel's draw. Returns (N, Lq, H, E) contiguous in q's dtype."""
    check_short_attention_inputs(q, k, v, key_mask, causal, bias, num_seeds, dropout_p)
    N, Lq, H, E = q.shape
    Lk = k.shape[1]
    if dropout_mask is not None and dropout_mask.shape != (N, H, Lq, Lk):
        raise ValueError(f"dropout_mask must be (N, H, Lq, Lk) = {(N, H, Lq, Lk)}, got {tuple(dropout_mask.shape)}")
    with torch.autocast(q.device.type, enabled=False):
        qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))                # (N, H, L, E) views
        scores = torch.matmul(qh, kh.transpose(-1, -2)).mul_(1.0 / math.sqrt(E))
        scores = scores.view(num_seeds, N // num_seeds, H, Lq, Lk)
        if bias is not None:
            scores = scores + bias.to(scores.dtype)[:, None]
        allowed = visibility(key_mask, causal, num_seeds, Lq, Lk, q.device)
        if allowed is not None:
            scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
        probs = torch.softmax(scores, dim=-1).view(N, H, Lq, Lk)
        if dropout_p > 0:
            if dropout_mask is None:
                probs = F.dropout(probs, dropout_p, training=True)
            else:
                probs = probs * dropout_mask.to(probs.dtype) * (1.0 / (1.0 - dropout_p))
        return torch.matmul(probs, vh).transpose(1, 2).contiguous()


def check_gathered_kv_inputs(q, kv, key_rows, bias, num_seeds) -> None:
    """Checks of short_attention_gathered_kv's arguments (ValueError naming the argument)."""
    if q.dim() != 4:
        raise ValueError(f"q must be (N, Lq, H, E), got shape {tuple(q.shape)}")
    N, Lq, H, E = q.shape
    if kv.dim() != 5 or kv.shape[2] != 2 or kv.shape[3:] != (H, E):
        raise ValueError(f"kv must be (M, Lk, 2, H, E) = (M, Lk, 2, {H}, {E}), got {tuple(kv.shape)}")
    Lk = kv.shape[1]
    if key_rows.shape != (N, Lk):
        raise ValueError(f"key_rows must be (N, Lk) = {(N, Lk)}, got {tuple(key_rows.shape)}")
    if key_rows.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"key_rows must be an int32 or int64 tensor of kv's rows, got {key_rows.dtype}")
    if q.dtype != kv.dtype:
        raise ValueError(f"q and kv must share one dtype, got {q.dtype}, {kv.dtype}")
    _check_seeds_and_bias(N, H, Lq, Lk, bias, num_seeds)


def gather_key_rows(kv: torch.Tensor, key_rows: torch.Tensor) -> torch.Tensor:
    """(N, Lk, 2, H, E): key position j of row n taken from kv[key_rows[n, j], j]."""
    positions = torch.arange(kv.shape[1], device=kv.device)
    return kv[key_rows.long(), positions[None, :]]


def short_attention_gathered_kv_reference(q: torch.Tensor, kv: torch.Tensor, key_rows: torch.Tensor, *,
                                          bias: torch.Tensor | None = None, num_seeds: int = 1) -> torch.Tensor:
    """short_attention_reference(q, k, v) where key position j of row n is kv[key_rows[n, j], j]
    (k, v = its two parts): no mask, no dropout, evaluation only. q (N, Lq, H, E), kv (M, Lk, 2, H, E)
    with any strides, key_rows (N, Lk) int."""
    check_gathered_kv_inputs(q, kv, key_rows, bias, num_seeds)
    k, v = gather_key_rows(kv, key_rows).unbind(2)
    return short_attention_reference(q, k, v, bias=bias, num_seeds=num_seeds)


__all__ = ["short_attention_reference", "short_attention_gathered_kv_reference", "check_short_attention_inputs",
           "check_gathered_kv_inputs", "gather_key_rows", "unbind_packed", "visibility"]
