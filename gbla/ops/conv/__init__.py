"""Causal depthwise Conv1D + SiLU: one public function, several backends (gbla.ops.backend).

    naive.py   the plain-PyTorch reference
    triton.py  the fused Triton forward and backward (an autograd.Function)
"""
from __future__ import annotations

import torch

from gbla.ops.backend import BACKENDS, triton_impl
from gbla.ops.conv.naive import causal_conv1d_silu_reference, check_conv_inputs


def _load_triton():
    from gbla.ops.conv.triton import causal_conv1d_silu_triton
    return causal_conv1d_silu_triton


def causal_conv1d_silu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                       mask: torch.Tensor | None = None, *, backend: str = "auto") -> torch.Tensor:
    """silu(causal depthwise conv(x)) over the sequence axis; x (B, L, C), weight (C, K), bias (C,),
    mask (B, L) bool; or seeds stacked: x (S, B, L, C), weight (S, C, K), bias (S, C), mask (S, B, L)
    (seed s's rows with seed s's filter; the kernels take all seeds in one launch). Formulas and
    padding rules: gbla/ops/conv/naive.py."""
    impl = triton_impl("causal_conv1d_silu", backend, x, _load_triton) or causal_conv1d_silu_reference
    return impl(x, weight, bias, mask)


__all__ = ["causal_conv1d_silu", "causal_conv1d_silu_reference", "check_conv_inputs", "BACKENDS"]
