"""Causal depthwise Conv1D + SiLU over the sequence axis (GBLA's short-range mixing).

Reference in plain PyTorch. Padded positions are zeroed *before* the convolution so padding never
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


def causal_conv1d_silu(x, weight, bias=None, mask=None, *, backend: str = "auto"):
    """Dispatch: "torch" reference, "triton" fused kernel (gbla/ops/triton_conv.py), "auto" = Triton on CUDA."""
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'triton', got {backend!r}")
    if backend in ("auto", "triton"):
        try:
            from gbla.ops.triton_conv import causal_conv1d_silu_triton
        except ImportError as err:
            if backend == "triton":
                raise NotImplementedError("backend='triton' needs gbla/ops/triton_conv.py and triton") from err
            causal_conv1d_silu_triton = None
        if causal_conv1d_silu_triton is not None and (backend == "triton" or x.is_cuda):
            return causal_conv1d_silu_triton(x, weight, bias, mask)
    return causal_conv1d_silu_reference(x, weight, bias, mask)
