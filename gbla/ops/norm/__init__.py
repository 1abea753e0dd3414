"""RMSNorm with a weight per seed: one public function, several backends (gbla.ops.backend).

    naive.py   the plain-PyTorch reference (torch's rms_norm, then the weight)
    triton.py  one Triton kernel forward, one backward (an autograd.Function)
"""
from __future__ import annotations

import torch

from gbla.ops.backend import BACKENDS, triton_impl
from gbla.ops.norm.naive import check_norm_inputs, seed_rms_norm_reference


def _load_triton():
    from gbla.ops.norm.triton import seed_rms_norm_triton
    return seed_rms_norm_triton


def seed_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float | None = None, *,
                  backend: str = "auto") -> torch.Tensor:
    """x (S, ..., D) normalized over D, seed s's rows scaled by weight[s] (weight (S, D)); eps defaults
    to torch.finfo(x.dtype).eps. Formula: gbla/ops/norm/naive.py."""
    impl = triton_impl("seed_rms_norm", backend, x, _load_triton) or seed_rms_norm_reference
    return impl(x, weight, eps)


__all__ = ["seed_rms_norm", "seed_rms_norm_reference", "check_norm_inputs", "BACKENDS"]
