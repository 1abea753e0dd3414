"""ReLU + dropout (the FFN's activation): one public function, several backends (gbla.ops.backend).

    naive.py   the plain-PyTorch reference (F.relu, then F.dropout)
    triton.py  one Triton kernel forward (draws the mask), one backward (reads it off the output)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from gbla.ops.activation.naive import check_dropout_p, relu_dropout_reference
from gbla.ops.backend import BACKENDS, triton_impl


def _load_triton():
    from gbla.ops.activation.triton import relu_dropout_triton
    return relu_dropout_triton


def relu_dropout(x: torch.Tensor, p: float, training: bool = True, *, backend: str = "auto") -> torch.Tensor:
    """dropout(relu(x), p) when `training`, relu(x) otherwise. The kernels draw their own masks
    (Philox, seeded from torch's generator), so the two backends agree in distribution, not draw
    for draw; with p = 0 or in evaluation both are exactly relu(x)."""
    check_dropout_p(p)
    if not training or p == 0.0:
        return F.relu(x)
    impl = triton_impl("relu_dropout", backend, x, _load_triton)
    return impl(x, p) if impl is not None else relu_dropout_reference(x, p, training)


__all__ = ["relu_dropout", "relu_dropout_reference", "BACKENDS"]
