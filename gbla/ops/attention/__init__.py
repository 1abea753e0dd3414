"""Softmax attention over short sequences: public functions, several backends (gbla.ops.backend).

    naive.py   the plain-PyTorch reference: the formulas, and the contract the kernels are tested against
    triton.py  the fused Triton forward and backward (an autograd.Function), for Lq, Lk <= 128

Three entry points, one computation: short_attention(q, k, v) takes three (N, L, H, E) tensors;
short_attention_qkv(qkv) a self-attention layer's fused projection (N, L, 3, H, E), and
short_attention_q_kv(q, kv) cross-attention's q and fused key/value projection (N, Lk, 2, H, E). The
packed forms give the same values and gradients; with the Triton backend their backward writes the
packed tensor's gradient in one buffer, where q, k, v passed as views of it would have autograd
stack three gradients (a cat per call). The reference unbinds them. A fourth, for decoding only:
short_attention_gathered_kv(q, kv, key_rows), whose keys of each row are gathered from other rows of kv
(beam search's cache, which the beams point into instead of copying it).
"""
from __future__ import annotations

import torch

from gbla.ops.backend import BACKENDS, triton_impl
from gbla.ops.attention.naive import (check_short_attention_inputs, short_attention_gathered_kv_reference,
                                      short_attention_reference, unbind_packed)


def _load_triton():
    from gbla.ops.attention import triton as kernels
    return kernels


def _dispatch(backend: str, q, k, call_triton, call_reference, name: str = "short_attention") -> torch.Tensor:
    """call_triton(kernels) when the backend picks the kernels and they take q and k, else call_reference()."""
    kernels = triton_impl("short_attention", backend, q, _load_triton)
    if kernels is not None:
        why = kernels.unsupported(q, k)
        if why is None:
            return call_triton(kernels)
        if backend == "triton":
            raise ValueError(f"{name}(backend='triton'): {why}")
    return call_reference()


def short_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    key_mask: torch.Tensor | None = None,
    causal: bool = False,
    bias: torch.Tensor | None = None,
    num_seeds: int = 1,
    dropout_p: float = 0.0,
    backend: str = "auto",
) -> torch.Tensor:
    """softmax(q k^T / sqrt(E) + bias, masked) v per row and head, with dropout on the probabilities.

    q (N, Lq, H, E), k and v (N, Lk, H, E), N = num_seeds * B rows, seed-major; strided views (last
    dim contiguous) need no copy. key_mask (N, Lk) bool, True = real key; causal: query i sees keys
    j <= i (Lq == Lk); bias (num_seeds, H, Lq, Lk), per seed, broadcast over its rows. dropout_p > 0
    drops probabilities (inverted scaling); pass 0 at evaluation. Returns (N, Lq, H, E) contiguous in
    q's dtype. A query with no visible key gets the average of all Lk values (finite, not NaN).
    Formulas: gbla/ops/attention/naive.py. The Triton kernels take Lq, Lk <= 128; "auto" uses the
    reference beyond that (and for dtypes they do not take), "triton" raises ValueError.
    """
    kw = dict(key_mask=key_mask, causal=causal, bias=bias, num_seeds=num_seeds, dropout_p=dropout_p)
    return _dispatch(backend, q, k, lambda m: m.short_attention_triton(q, k, v, **kw),
                     lambda: short_attention_reference(q, k, v, **kw))


def short_attention_qkv(qkv: torch.Tensor, *, key_mask: torch.Tensor | None = None, causal: bool = False,
                        bias: torch.Tensor | None = None, num_seeds: int = 1, dropout_p: float = 0.0,
                        backend: str = "auto") -> torch.Tensor:
    """short_attention(*qkv.unbind(2), ...) for a fused projection qkv (N, L, 3, H, E) (q, k, v in
    that order along axis 2); its gradient comes back as one (N, L, 3, H, E) tensor."""
    q, k, v = unbind_packed(qkv, 3, "qkv")
    kw = dict(key_mask=key_mask, causal=causal, bias=bias, num_seeds=num_seeds, dropout_p=dropout_p)
    return _dispatch(backend, q, k, lambda m: m.short_attention_qkv_triton(qkv, **kw),
                     lambda: short_attention_reference(q, k, v, **kw))


def short_attention_q_kv(q: torch.Tensor, kv: torch.Tensor, *, key_mask: torch.Tensor | None = None,
                         causal: bool = False, bias: torch.Tensor | None = None, num_seeds: int = 1,
                         dropout_p: float = 0.0, backend: str = "auto") -> torch.Tensor:
    """short_attention(q, *kv.unbind(2), ...) for q (N, Lq, H, E) and a fused key/value projection
    kv (N, Lk, 2, H, E) (k, v in that order along axis 2); kv's gradient comes back as one tensor."""
    k, v = unbind_packed(kv, 2, "kv")
    kw = dict(key_mask=key_mask, causal=causal, bias=bias, num_seeds=num_seeds, dropout_p=dropout_p)
    return _dispatch(backend, q, k, lambda m: m.short_attention_q_kv_triton(q, kv, **kw),
                     lambda: short_attention_reference(q, k, v, **kw))


def short_attention_gathered_kv(q: torch.Tensor, kv: torch.Tensor, key_rows: torch.Tensor, *,
                                bias: torch.Tensor | None = None, num_seeds: int = 1,
                                backend: str = "auto") -> torch.Tensor:
    """Evaluation-only short_attention (no mask, no dropout, no backward) whose key position j of row n
    is kv[key_rows[n, j], j]: q (N, Lq, H, E), kv (M, Lk, 2, H, E) with any strides (last dim
    contiguous), key_rows (N, Lk) int rows of kv (not checked against M on the kernels). Beam search
    keeps each decoded position's keys and values once, for the rows of that position, and each beam
    names its ancestors' rows, so re-ranking the beams moves only these indices, never the cache."""
    kw = dict(bias=bias, num_seeds=num_seeds)
    return _dispatch(backend, q, kv[:, :, 0], lambda m: m.short_attention_gathered_kv_triton(q, kv, key_rows, **kw),
                     lambda: short_attention_gathered_kv_reference(q, kv, key_rows, **kw),
                     "short_attention_gathered_kv")


__all__ = ["short_attention", "short_attention_qkv", "short_attention_q_kv", "short_attention_gathered_kv",
           "short_attention_reference", "short_attention_gathered_kv_reference", "check_short_attention_inputs",
           "BACKENDS"]
