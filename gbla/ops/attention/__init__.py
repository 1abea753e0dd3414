"""Softmax attention over short sequences: one public function, several backends (gbla.ops.backend).

    naive.py   the plain-PyTorch reference: the formulas, and the contract the kernels are tested against
    triton.py  the fused Triton forward and backward (an autograd.Function), for Lq, Lk <= 128
"""
from __future__ import annotations

import torch

from gbla.ops.backend import BACKENDS, triton_impl
from gbla.ops.attention.naive import check_short_attention_inputs, short_attention_reference


def _load_triton():
    from gbla.ops.attention.triton import short_attention_triton, unsupported
    return short_attention_triton, unsupported


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
    impl = triton_impl("short_attention", backend, q, _load_triton)
    if impl is not None:
        kernel, unsupported = impl
        why = unsupported(q, k)
        if why is None:
            return kernel(q, k, v, key_mask=key_mask, causal=causal, bias=bias, num_seeds=num_seeds,
                          dropout_p=dropout_p)
        if backend == "triton":
            raise ValueError(f"short_attention(backend='triton'): {why}")
    return short_attention_reference(q, k, v, key_mask=key_mask, causal=causal, bias=bias, num_seeds=num_seeds,
                                     dropout_p=dropout_p)


__all__ = ["short_attention", "short_attention_reference", "check_short_attention_inputs", "BACKENDS"]
