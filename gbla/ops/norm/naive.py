"""RMSNorm with one weight per seed (a model of S seeds normalizes every seed's rows with that seed's
weight): the reference in plain PyTorch, torch's fused rms_norm followed by the weight.

    y[s, ..., :] = x[s, ..., :] / sqrt(mean(x[s, ..., :]^2) + eps) * weight[s, :]

eps defaults to torch.finfo(x.dtype).eps, as torch.nn.functional.rms_norm's does.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def check_norm_inputs(x: torch.Tensor, weight: torch.Tensor) -> None:
    """ValueError naming the argument whose shape is off: x (S, ..., D), weight (S, D)."""
    if x.dim() < 2:
        raise ValueError(f"x must be (S, ..., D) with the seeds first, got shape {tuple(x.shape)}")
    if weight.dim() != 2 or tuple(weight.shape) != (x.shape[0], x.shape[-1]):
        raise ValueError(f"weight must be (S, D) = {(x.shape[0], x.shape[-1])} for x of shape {tuple(x.shape)}, "
                         f"got {tuple(weight.shape)}")


def seed_rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float | None = None) -> torch.Tensor:
    """x (S, ..., D), weight (S, D): each seed's rows normalized, then scaled by its weight."""
    check_norm_inputs(x, weight)
    y = F.rms_norm(x, (x.shape[-1],), eps=eps)
    return y * weight.view(weight.shape[0], *([1] * (x.dim() - 2)), x.shape[-1]).to(y.dtype)
