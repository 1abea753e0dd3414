"""GBLA attention op: one public function, several backends.

`backend="torch"` is the plain reference (gbla/ops/reference.py), "triton" the fused kernels,
"auto" picks Triton on CUDA tensors and the reference elsewhere.
"""
from __future__ import annotations

import torch

from gbla.ops.reference import NORMALIZATIONS, feature_map, gbla_attention_reference

BACKENDS = ("auto", "torch", "triton")


def _triton_available() -> bool:
    try:
        from gbla.ops import triton_gbla  # noqa: F401
    except ImportError:
        return False
    return True


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
    zeros at padded positions. See gbla/ops/reference.py for the formulas.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = "triton" if (q.is_cuda and _triton_available()) else "torch"
    kwargs = dict(key_log_weight=key_log_weight, mask=mask, z=z, norm_weight=norm_weight,
                  normalization=normalization, eps=eps)
    if backend == "torch":
        return gbla_attention_reference(q, k, v, **kwargs)
    try:
        from gbla.ops.triton_gbla import gbla_attention_triton
    except ImportError as err:
        raise NotImplementedError(
            "backend='triton' needs gbla/ops/triton_gbla.py and an importable triton") from err
    return gbla_attention_triton(q, k, v, **kwargs)


__all__ = ["gbla_attention", "gbla_attention_reference", "feature_map", "NORMALIZATIONS", "BACKENDS"]
