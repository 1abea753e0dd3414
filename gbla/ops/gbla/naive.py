"""Plain-PyTorch reference of the GBLA attention core.

This file is the readable statement of the formulas (the contract every fused kernel is tested
against). Everything is computed in float32 (float64 stays float64, so gradcheck works) whatever the
input dtype; the result is cast back to
q's dtype.

    phi(t)   = elu(t) + 1
    k'_j     = phi(k_j) * exp(key_log_weight_j) * mask_j
    v'_j     = v_j * mask_j
    S        = sum_j k'_j v'_j^T                        (E x E per batch row and head)
    "none":          o_i = phi(q_i)^T S / (phi(q_i)^T sum_j k'_j + eps)
    "rmsnorm":       x_i = phi(q_i)^T S / N   (N = real tokens in the row, at least 1)
                     o_i = x_i / sqrt(mean(x_i^2) + eps) * norm_weight
    "rmsnorm_gated": "rmsnorm", then o_i * silu(z_i)
    o_i = 0 at padded positions.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

NORMALIZATIONS = ("none", "rmsnorm", "rmsnorm_gated")


def feature_map(t: torch.Tensor) -> torch.Tensor:
    """phi(t) = elu(t) + 1: positive, so the kernelized attention weights stay non-negative."""
    return F.elu(t) + 1.0


def check_gbla_inputs(q, k, v, key_log_weight, mask, z, norm_weight, normalization) -> None:
    """Shape and argument checks shared by every backend (raise ValueError naming the argument)."""
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
    if q.dim() != 4:
        raise ValueError(f"q must be (B, L, H, E), got shape {tuple(q.shape)}")
    for name, t in (("k", k), ("v", v)):
        if t.shape != q.shape:
            raise ValueError(f"{name} must have q's shape {tuple(q.shape)}, got {tuple(t.shape)}")
    B, L, H, E = q.shape
    if key_log_weight is not None and key_log_weight.shape != (B, L, H):
        raise ValueError(f"key_log_weight must be (B, L, H) = {(B, L, H)}, got {tuple(key_log_weight.shape)}")
    if mask is not None:
        if mask.shape != (B, L):
            raise ValueError(f"mask must be (B, L) = {(B, L)}, got {tuple(mask.shape)}")
        if mask.dtype != torch.bool:
            raise ValueError(f"mask must be a bool tensor (True = real token), got {mask.dtype}")
    if normalization == "rmsnorm_gated":
        if z is None:
            raise ValueError("normalization='rmsnorm_gated' needs the gate input z (B, L, H, E)")
    if z is not None and z.shape != q.shape:
        raise ValueError(f"z must have q's shape {tuple(q.shape)}, got {tuple(z.shape)}")
    if norm_weight is not None and norm_weight.shape != (E,):
        raise ValueError(f"norm_weight must be (E,) = ({E},), got {tuple(norm_weight.shape)}")


def gbla_attention_reference(
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
    """Reference GBLA attention; autograd provides the backward. Shapes as in the module docstring."""
    check_gbla_inputs(q, k, v, key_log_weight, mask, z, norm_weight, normalization)
    B, L, H, E = q.shape
    if mask is None:
        real = torch.ones(B, L, dtype=torch.bool, device=q.device)
    else:
        real = mask
    real4 = real[:, :, None, None]

    acc = torch.promote_types(q.dtype, torch.float32)  # fp32 for bf16/fp16/fp32 inputs, fp64 for fp64
    phi_q = feature_map(q.to(acc))
    k_prime = feature_map(k.to(acc))
    if key_log_weight is not None:
        k_prime = k_prime * torch.exp(key_log_weight.to(acc))[..., None]
    # where(), not a multiply: a padded key weight of +inf must not turn into inf * 0 = nan
    k_prime = torch.where(real4, k_prime, torch.zeros((), device=q.device))
    v_prime = torch.where(real4, v.to(acc), torch.zeros((), device=q.device))

    state = torch.einsum("blhe,blhf->bhef", k_prime, v_prime)  # (B, H, E, E), fp32
    numerator = torch.einsum("blhe,bhef->blhf", phi_q, state)  # (B, L, H, E)

    if normalization == "none":
        key_sum = k_prime.sum(dim=1)  # (B, H, E)
        denominator = torch.einsum("blhe,bhe->blh", phi_q, key_sum) + eps
        out = numerator / denominator[..., None]
    else:
        n_real = real.sum(dim=1).clamp(min=1).to(acc)  # (B,)
        x = numerator / n_real[:, None, None, None]
        out = x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps)
        if norm_weight is not None:
            out = out * norm_weight.to(acc)
        if normalization == "rmsnorm_gated":
            out = out * F.silu(z.to(acc))

    out = torch.where(real4, out, torch.zeros((), device=q.device))
    return out.to(q.dtype)
