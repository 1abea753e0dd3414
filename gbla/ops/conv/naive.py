"""Causal depthwise Conv1D + SiLU over the sequence axis (GBLA's short-range mixing): the reference in
plain PyTorch. Padded positions are zeroed *before* the convolution so padding never
leaks into real tokens, whichever side it is on; outputs at padded positions are zeroed too.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def check_conv_inputs(x, weight, bias, mask) -> bool:
    """ValueError naming the argument whose shape or dtype is off; True when the seeds are stacked
    (x (S, B, L, C), weight (S, C, K), bias (S, C), mask (S, B, L)), False for one model (x (B, L, C),
    weight (C, K), bias (C,), mask (B, L))."""
    if x.dim() not in (3, 4):
        raise ValueError(f"x must be (B, L, C), or (S, B, L, C) with seeds stacked, got shape {tuple(x.shape)}")
    stacked = x.dim() == 4
    lead = tuple(x.shape[:1]) if stacked else ()
    C = x.shape[-1]
    if weight.dim() != len(lead) + 2 or tuple(weight.shape[:-1]) != (*lead, C):
        raise ValueError(f"weight must be {'(S, C, K)' if stacked else '(C, K)'} with "
                         f"{'S=%d, ' % lead[0] if stacked else ''}C={C}, got {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (*lead, C):
        raise ValueError(f"bias must be {(*lead, C)}, got {tuple(bias.shape)}")
    if mask is not None:
        if tuple(mask.shape) != tuple(x.shape[:-1]):
            raise ValueError(f"mask must be {tuple(x.shape[:-1])} (x without its channel axis), got "
                             f"{tuple(mask.shape)}")
        if mask.dtype != torch.bool:
            raise ValueError(f"mask must be a bool tensor (True = real token), got {mask.dtype}")
    return stacked


def causal_conv1d_silu_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """x: (B, L, C); weight: (C, K) (tap K-1 multiplies the current token); bias: (C,);
    mask: (B, L) bool, True = real. Returns silu(conv(x))[b, t, c] = silu(bias_c + sum_k w[c, k] x[b, t-K+1+k, c]).
    Seeds stacked: x (S, B, L, C), weight (S, C, K), bias (S, C), mask (S, B, L) - seed s's rows with
    seed s's filter (one call per seed, stacked)."""
    if check_conv_inputs(x, weight, bias, mask):
        return torch.stack([causal_conv1d_silu_reference(x[s], weight[s], None if bias is None else bias[s],
                                                         None if mask is None else mask[s])
                            for s in range(x.shape[0])])
    B, L, C = x.shape
    K = weight.shape[1]
    if mask is not None:
        x = x * mask[..., None].to(x.dtype)
    y = F.conv1d(F.pad(x.transpose(1, 2), (K - 1, 0)), weight[:, None, :].to(x.dtype),
                 None if bias is None else bias.to(x.dtype), groups=C)
    y = F.silu(y).transpose(1, 2)
    if mask is not None:
        y = y * mask[..., None].to(y.dtype)
    return y
