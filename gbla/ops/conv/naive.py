"""Causal depthwise Conv1D + SiLU over the sequence axis (GBLA's short-range mixing): the reference in
plain PyTorch. Padded positions are zeroed *before* the convolution so padding never
leaks into real tokens, whichever side it is on; outputs at padded positions are zeroed too.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_conv1d_silu_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """x: (B, L, C); weight: (C, K) (tap K-1 multiplies the current token); bias: (C,);
    mask: (B, L) bool, True = real. Returns silu(conv(x))[b, t, c] = silu(bias_c + sum_k w[c, k] x[b, t-K+1+k, c])."""
    if x.dim() != 3:
        raise ValueError(f"x must be (B, L, C), got shape {tuple(x.shape)}")
    B, L, C = x.shape
    if weight.dim() != 2 or weight.shape[0] != C:
        raise ValueError(f"weight must be (C, K) with C={C}, got {tuple(weight.shape)}")
    K = weight.shape[1]
    if mask is not None:
        if mask.shape != (B, L):
            raise ValueError(f"mask must be (B, L) = {(B, L)}, got {tuple(mask.shape)}")
        x = x * mask[..., None].to(x.dtype)
    y = F.conv1d(F.pad(x.transpose(1, 2), (K - 1, 0)), weight[:, None, :].to(x.dtype),
                 None if bias is None else bias.to(x.dtype), groups=C)
    y = F.silu(y).transpose(1, 2)
    if mask is not None:
        y = y * mask[..., None].to(y.dtype)
    return y
