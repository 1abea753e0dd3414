"""Dropout fused with its neighbour: relu_dropout (the FFN's activation) and dropout_add (a sublayer's
output into the residual stream); each one public function, several backends (gbla.ops.backend).

    naive.py   the plain-PyTorch references (F.relu / +, and F.dropout)
    triton.py  one Triton kernel forward (draws the mask), one backward each
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from gbla.ops.dropout.naive import check_dropout_p, dropout_add_reference, relu_dropout_reference
from gbla.ops.backend import BACKENDS, triton_impl


def _load_triton():
    from gbla.ops.dropout.triton import relu_dropout_triton
    return relu_dropout_triton


def _load_triton_add():
    from gbla.ops.dropout.triton import dropout_add_triton
    return dropout_add_triton


def relu_dropout(x: torch.Tensor, p: float, training: bool = True, *, backend: str = "auto") -> torch.Tensor:
    """dropout(relu(x), p) when `training`, relu(x) otherwise. The kernels draw their own masks
    (Philox, seeded from torch's generator), so the two backends agree in distribution, not draw
    for draw; with p = 0 or in evaluation both are exactly relu(x)."""
    check_dropout_p(p)
    if not training or p == 0.0:
        return F.relu(x)
    impl = triton_impl("relu_dropout", backend, x, _load_triton)
    return impl(x, p) if impl is not None else relu_dropout_reference(x, p, training)


def dropout_add(x: torch.Tensor, h: torch.Tensor, p: float, training: bool = True, *,
                backend: str = "auto") -> torch.Tensor:
    """x + dropout(h, p) when `training`, x + h otherwise; x and h of one shape, the result of their
    promoted dtype (the fp32 residual stream plus a bf16 sublayer output under autocast gives fp32).
    As for relu_dropout, the kernels draw their own masks."""
    check_dropout_p(p)
    if not training or p == 0.0:
        return x + h
    impl = triton_impl("dropout_add", backend, h, _load_triton_add)
    if impl is None or x.shape != h.shape:
        return dropout_add_reference(x, h, p, training)
    return impl(x, h, p)


__all__ = ["relu_dropout", "relu_dropout_reference", "dropout_add", "dropout_add_reference", "BACKENDS"]
