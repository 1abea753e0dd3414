"""Backend choice shared by every op: "torch" (the plain reference), "triton" (the fused kernels),
"auto" (Triton on CUDA tensors, the reference elsewhere).

Imports no Triton: an op's package asks for its Triton module only when that backend is chosen, so
the reference runs on machines where triton is not installed.
"""
from __future__ import annotations

from typing import Callable

import torch

BACKENDS = ("auto", "torch", "triton")


def triton_impl(op: str, backend: str, x: torch.Tensor, load: Callable[[], Callable]) -> Callable | None:
    """The Triton implementation of `op` to call for `backend` on input `x`, or None for the reference.

    `load` imports it (raises ImportError without triton): "triton" then fails with NotImplementedError,
    "auto" falls back to the reference."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch" or (backend == "auto" and not x.is_cuda):
        return None
    try:
        return load()
    except ImportError as err:
        if backend == "triton":
            raise NotImplementedError(f"backend='triton' for {op} needs an importable triton") from err
        return None
