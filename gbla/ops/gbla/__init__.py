"""GBLA attention: one public function, several backends (gbla.ops.backend).

    naive.py   the plain-PyTorch reference: the formulas, and the contract the kernels are tested against
    triton.py  the fused Triton forward and backward (an autograd.Function)
"""
from __future__ import annotations

import torch

from gbla.ops.backend import BACKENDS, triton_impl
from gbla.ops.gbla.naive import NORMALIZATIONS, check_gbla_inputs, feature_map, gbla_attention_reference


def _load_triton():
    from gbla.ops.gbla.triton import gbla_attention_triton
    return gbla_attention_triton


def gbla_attention(
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
    backend: str = "auto",
) -> torch.Tensor:
    """Bidirectional kernelized linear attention with key weights and (gated) RMS normalization.

    q, k, v: (B, L, H, E); mask: (B, L) bool, True = real token; key_log_weight: (B, L, H);
    z: (B, L, H, E) gate input for "rmsnorm_gated"; norm_weight: (E,). Returns q's shape and dtype,
    zeros at padded positions. See gbla/ops/gbla/naive.py for the formulas.
    """
    impl = triton_impl("gbla_attention", backend, q, _load_triton) or gbla_attention_reference
    return impl(q, k, v, key_log_weight=key_log_weight, mask=mask, z=z, norm_weight=norm_weight,
                normalization=normalization, eps=eps)


__all__ = ["gbla_attention", "gbla_attention_reference", "check_gbla_inputs", "feature_map", "NORMALIZATIONS",
           "BACKENDS"]
