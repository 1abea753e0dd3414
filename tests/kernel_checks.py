"""What the kernel tests share: where the kernels run, and the norm-wise comparison with a float64
evaluation of the reference. Import it before triton: without GBLA_TEST_CUDA=1 the kernels run in
Triton's CPU interpreter (TRITON_INTERPRET=1, read when the kernels are defined), as in CI."""
import os

if not os.environ.get("TRITON_INTERPRET") and not os.environ.get("GBLA_TEST_CUDA"):
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

DEVICE = "cuda" if (os.environ.get("GBLA_TEST_CUDA") and torch.cuda.is_available()) else "cpu"


def assert_close_to_float64(name: str, got: torch.Tensor, ref64: torch.Tensor, rtol: float, atol: float) -> None:
    """|got - ref64| <= rtol |ref64| + atol sqrt(n) in the Frobenius norm, got finite and of ref64's shape."""
    got, ref64 = got.double().cpu(), ref64.cpu()
    assert got.shape == ref64.shape, name
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    err = (got - ref64).norm().item()
    bound = rtol * ref64.norm().item() + atol * ref64.numel() ** 0.5
    assert err <= bound, f"{name}: |got - ref64| = {err:.3e} > {bound:.3e} (|ref64| = {ref64.norm().item():.3e})"
