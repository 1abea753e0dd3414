"""ReLU followed by dropout, as a transformer FFN applies them between its two projections: the
reference in plain PyTorch.

    y = relu(x) * keep / (1 - p)          keep ~ Bernoulli(1 - p), elementwise

Backward: dx = dy * keep / (1 - p) * [x > 0]. Because 1 / (1 - p) >= 1, y > 0 exactly where x > 0
and the element was kept, so the backward needs only y (the kernels save nothing else).
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
