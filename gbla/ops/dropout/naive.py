"""Dropout fused with its neighbour, the two places a transformer block applies it: the references in
plain PyTorch.

    relu_dropout(x)   = relu(x) * keep / (1 - p)          the FFN's activation, between its projections
    dropout_add(x, h) = x + h * keep / (1 - p)            a sublayer's output added to the residual stream

keep ~ Bernoulli(1 - p), elementwise. Backward of relu_dropout: dx = dy * keep / (1 - p) * [x > 0];
because 1 / (1 - p) >= 1, y > 0 exactly where x > 0 and the element was kept, so it needs only y.
Backward of dropout_add: dx = dout, dh = dout * keep / (1 - p).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def check_dropout_p(p: float) -> None:
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout p must be in [0, 1), got {p}")


def relu_dropout_reference(x: torch.Tensor, p: float, training: bool = True,
                           keep: torch.Tensor | None = None) -> torch.Tensor:
    """relu(x), then dropout with probability p when `training` (torch's own draws), or with the
    given boolean `keep` mask of x's shape (how the kernels' draws are checked)."""
    check_dropout_p(p)
    y = F.relu(x)
    if keep is None:
        return F.dropout(y, p, training=training)
    if keep.shape != x.shape:
        raise ValueError(f"keep must have x's shape {tuple(x.shape)}, got {tuple(keep.shape)}")
    if not training or p == 0.0:
        return y
    return y * keep.to(y.dtype) * (1.0 / (1.0 - p))


def dropout_add_reference(x: torch.Tensor, h: torch.Tensor, p: float, training: bool = True,
                          keep: torch.Tensor | None = None) -> torch.Tensor:
    """x + dropout(h, p) when `training` (torch's own draws, or the given boolean `keep` mask of h's
    shape), x + h otherwise."""
    check_dropout_p(p)
    if keep is None:
        return x + F.dropout(h, p, training=training)
    if keep.shape != h.shape:
        raise ValueError(f"keep must have h's shape {tuple(h.shape)}, got {tuple(keep.shape)}")
    if not training or p == 0.0:
        return x + h
    return x + h * keep.to(h.dtype) * (1.0 / (1.0 - p))
