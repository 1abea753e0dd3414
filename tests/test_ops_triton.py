"""Triton GBLA kernels vs the torch reference: output and every gradient.

Runs the kernels through the Triton interpreter on the CPU (TRITON_INTERPRET=1), which is how CI
tests them; on a CUDA machine without the variable set, the same tests run the compiled kernels.
Both sides are compared to a float64 evaluation of the reference formulas on the same inputs, with a
norm-wise tolerance plus a small absolute floor (some gradients are mathematically ~0, e.g. dq at
L=1 with normalization "none", where any relative comparison only measures rounding noise).
"""
import os

if not os.environ.get("TRITON_INTERPRET") and not os.environ.get("GBLA_TEST_CUDA"):
    os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not importable on this machine")

from gbla.ops import gbla_attention  # noqa: E402
from gbla.ops.gbla.naive import gbla_attention_reference  # noqa: E402
from gbla.ops.gbla.triton import gbla_attention_triton  # noqa: E402

DEVICE = "cuda" if (os.environ.get("GBLA_TEST_CUDA") and torch.cuda.is_available()) else "cpu"
# (relative, absolute-per-element) tolerances against the float64 evaluation
TOL = {torch.float32: (2e-5, 2e-6), torch.bfloat16: (2e-2, 2e-3)}
if DEVICE == "cuda":  # compiled fp32 dots use full fp32 too, but fp32 exp/sqrt differ slightly
    TOL[torch.float32] = (1e-4, 1e-5)


def make_mask(kind: str, B: int, L: int):
    """None, or left padding (row 0), right padding (row 1) and an all-padded row (row 2)."""
    if kind == "none":
        return None
    assert B >= 3
    mask = torch.ones(B, L, dtype=torch.bool)
    n_pad = max(1, L // 4) if L > 1 else 0  # L=1: rows 0 and 1 stay real
    mask[0, :n_pad] = False  # left padding
    mask[1, L - n_pad:] = False  # right padding
    mask[2] = False  # all padded
    return mask.to(DEVICE)


def make_inputs(B, L, H, E, dtype, key_weights, normalization, mask_kind, norm_weight=True):
    g = torch.Generator().manual_seed(1000 * L + E + (7 if key_weights else 0))

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(DEVICE)

    q, k, v, z = (rnd(B, L, H, E).to(dtype) for _ in range(4))
    lw = rnd(B, L, H, scale=0.7).to(dtype) - 0.3 if key_weights else None
    mask = make_mask(mask_kind, B, L)
    if lw is not None and mask is not None:
        # huge padded key weights must not leak (finite here: the reference's backward turns
        # +inf into 0 * inf = nan; test_padded_inf_key_weight covers +inf for the kernels)
        lw[~mask] = 30.0
    nw = (1.0 + 0.2 * rnd(E)) if norm_weight else None
    grad_out = rnd(B, L, H, E).to(dtype)
    tensors = dict(q=q, k=k, v=v, key_log_weight=lw, z=z if normalization == "rmsnorm_gated" else None,
                   norm_weight=nw if normalization != "none" else None)
    return tensors, mask, grad_out


def run(fn, tensors, mask, grad_out, normalization, upcast=False):
    leaves = {n: (t.double() if upcast else t).detach().requires_grad_() for n, t in tensors.items() if t is not None}
    kw = {n: leaves.get(n) for n in ("key_log_weight", "z", "norm_weight")}
    out = fn(leaves["q"], leaves["k"], leaves["v"], mask=mask, normalization=normalization, **kw)
    grads = torch.autograd.grad(out, list(leaves.values()), grad_out.to(out.dtype))
    return out, dict(zip(leaves.keys(), grads))


def assert_close(name, got, ref64, dtype, terms=1):
    """terms: how many O(1) products sum into one element; scales the absolute floor, for gradients
    that cancel to ~0 exactly (dkey_log_weight at L=1 under RMS normalization) while each of the
    summed products carries the bf16 rounding of the dot operands."""
    rtol, atol = TOL[dtype]
    atol = atol * terms
    assert got.shape == ref64.shape, name
    got = got.double().cpu()
    ref64 = ref64.cpu()
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    err = (got - ref64).norm().item()
    bound = rtol * ref64.norm().item() + atol * ref64.numel() ** 0.5
    assert err <= bound, f"{name}: |got - ref64| = {err:.3e} > {bound:.3e} (|ref64| = {ref64.norm().item():.3e})"


# Every value of each axis appears, plus the risky combinations: L=1 and the all-padded row,
# "none" (denominator) with +inf padded key weights, odd lengths that leave partial tiles and
# several chunks (L=257), bf16 with every normalization.
CASES = [
    # (L, E, normalization, key_weights, mask, dtype)
    (1, 16, "none", True, "none", torch.float32),
    (1, 32, "rmsnorm_gated", False, "pad", torch.float32),
    (1, 16, "rmsnorm", True, "pad", torch.bfloat16),
    (3, 16, "rmsnorm", True, "pad", torch.float32),
    (3, 64, "rmsnorm_gated", True, "pad", torch.bfloat16),
    (3, 32, "none", False, "pad", torch.float32),
    (17, 32, "none", True, "pad", torch.float32),
    (17, 16, "rmsnorm_gated", True, "pad", torch.bfloat16),
    (17, 64, "rmsnorm", False, "none", torch.float32),
    (64, 64, "rmsnorm_gated", True, "pad", torch.float32),
    (64, 16, "none", False, "pad", torch.bfloat16),
    (64, 32, "rmsnorm_gated", False, "none", torch.bfloat16),
    (257, 32, "rmsnorm_gated", True, "pad", torch.float32),
    (257, 64, "none", True, "pad", torch.bfloat16),
    (257, 16, "rmsnorm", True, "none", torch.bfloat16),
]


@pytest.mark.parametrize("L,E,normalization,key_weights,mask_kind,dtype", CASES,
                         ids=[f"L{c[0]}-E{c[1]}-{c[2]}-lw{int(c[3])}-mask_{c[4]}-{str(c[5])[6:]}" for c in CASES])
def test_triton_matches_reference(L, E, normalization, key_weights, mask_kind, dtype):
    B, H = 3, 2
    tensors, mask, grad_out = make_inputs(B, L, H, E, dtype, key_weights, normalization, mask_kind)
    out_tri, grads_tri = run(gbla_attention_triton, tensors, mask, grad_out, normalization)
    out_64, grads_64 = run(gbla_attention_reference, tensors, mask, grad_out, normalization, upcast=True)
    assert out_tri.dtype == dtype
    assert_close("out", out_tri, out_64, dtype)
    if mask is not None:
        assert (out_tri[~mask] == 0).all(), "outputs at padded positions must be exactly 0"
        assert (grads_tri["k"][~mask] == 0).all() and (grads_tri["v"][~mask] == 0).all()
    assert set(grads_tri) == set(grads_64)
    for name in grads_64:
        assert grads_tri[name].dtype == tensors[name].dtype, name
        assert_close(f"d{name}", grads_tri[name], grads_64[name], dtype, terms=E if name == "key_log_weight" else 1)


def test_no_norm_weight_and_strided_views():
    """norm_weight None, and q/k/v/z as strided slices of one fused projection (no copies needed)."""
    B, L, H, E = 2, 40, 2, 32
    fused = torch.randn(B, L, 4 * H * E, device=DEVICE)
    q, k, v, z = (t.view(B, L, H, E) for t in fused.split(H * E, dim=-1))
    assert q.stride(1) == 4 * H * E
    lw = torch.randn(B, L, H, device=DEVICE) * 0.5
    tensors = dict(q=q, k=k, v=v, key_log_weight=lw, z=z, norm_weight=None)
    grad_out = torch.randn(B, L, H, E, device=DEVICE)
    out_tri, g_tri = run(gbla_attention_triton, tensors, None, grad_out, "rmsnorm_gated")
    out_64, g_64 = run(gbla_attention_reference, tensors, None, grad_out, "rmsnorm_gated", upcast=True)
    assert_close("out", out_tri, out_64, torch.float32)
    for name in g_64:
        assert_close(f"d{name}", g_tri[name], g_64[name], torch.float32)


def test_head_dim_128():
    tensors, mask, grad_out = make_inputs(3, 20, 1, 128, torch.float32, True, "rmsnorm_gated", "pad")
    out_tri, g_tri = run(gbla_attention_triton, tensors, mask, grad_out, "rmsnorm_gated")
    out_64, g_64 = run(gbla_attention_reference, tensors, mask, grad_out, "rmsnorm_gated", upcast=True)
    assert_close("out", out_tri, out_64, torch.float32)
    for name in g_64:
        assert_close(f"d{name}", g_tri[name], g_64[name], torch.float32)


def test_dispatch_backend_triton_and_unused_inputs_get_no_grad():
    tensors, mask, grad_out = make_inputs(3, 9, 2, 16, torch.float32, True, "rmsnorm", "pad")
    z = torch.randn(3, 9, 2, 16, device=DEVICE, requires_grad=True)
    q = tensors["q"].clone().requires_grad_()
    out = gbla_attention(q, tensors["k"], tensors["v"], key_log_weight=tensors["key_log_weight"], mask=mask,
                         z=z, norm_weight=tensors["norm_weight"], normalization="rmsnorm", backend="triton")
    ref = gbla_attention_reference(q, tensors["k"], tensors["v"], key_log_weight=tensors["key_log_weight"],
                                   mask=mask, z=z, norm_weight=tensors["norm_weight"], normalization="rmsnorm")
    assert_close("out", out.detach(), ref.detach().double(), torch.float32)
    dq, dz = torch.autograd.grad(out, [q, z], grad_out, allow_unused=True)
    assert dz is None  # z is not used by "rmsnorm"
    assert dq is not None and dq.abs().sum() > 0


def test_bad_inputs_raise_clear_errors():
    q = torch.randn(1, 4, 1, 48, device=DEVICE)
    with pytest.raises(ValueError, match="head dim E=48"):
        gbla_attention_triton(q, q, q, normalization="rmsnorm")
    q = torch.randn(1, 4, 1, 16, device=DEVICE).to(torch.float64)
    with pytest.raises(ValueError, match="dtype"):
        gbla_attention_triton(q, q, q, normalization="rmsnorm")
    q = torch.randn(1, 4, 1, 16, device=DEVICE)
    with pytest.raises(ValueError, match="mask"):
        gbla_attention_triton(q, q, q, mask=torch.ones(1, 5, dtype=torch.bool), normalization="rmsnorm")


def test_padded_inf_key_weight():
    """+inf key weights at padded positions: no nan anywhere, same output as finite padding."""
    tensors, mask, grad_out = make_inputs(3, 17, 2, 16, torch.float32, True, "none", "pad")
    out_fin, g_fin = run(gbla_attention_triton, tensors, mask, grad_out, "none")
    tensors["key_log_weight"] = tensors["key_log_weight"].masked_fill(~mask[..., None], float("inf"))
    out_inf, g_inf = run(gbla_attention_triton, tensors, mask, grad_out, "none")
    assert torch.equal(out_inf, out_fin)
    for name in g_fin:
        assert torch.isfinite(g_inf[name]).all(), name
        assert torch.equal(g_inf[name], g_fin[name]), name


@pytest.mark.parametrize("lowp", [True, False])
def test_bf16_operand_and_tf32_paths(lowp, monkeypatch):
    """Both dot-operand choices for 16-bit inputs (bf16 operands vs fp32/tf32 operands) match."""
    from gbla.ops.gbla import triton as triton_gbla
    monkeypatch.setitem(triton_gbla.CONFIG_OVERRIDE, "lowp", lowp)
    for L, E, norm in ((257, 64, "none"), (17, 32, "rmsnorm_gated")):
        tensors, mask, grad_out = make_inputs(3, L, 2, E, torch.bfloat16, True, norm, "pad")
        out_tri, g_tri = run(gbla_attention_triton, tensors, mask, grad_out, norm)
        out_64, g_64 = run(gbla_attention_reference, tensors, mask, grad_out, norm, upcast=True)
        assert_close("out", out_tri, out_64, torch.bfloat16)
        for name in g_64:
            assert_close(f"d{name}", g_tri[name], g_64[name], torch.bfloat16)


def test_sum_partials_over_many_chunks():
    """The partial-state reduction sums every chunk (more chunks than one block of the loop)."""
    from gbla.ops.utils import sum_partials
    part = torch.randn(70, 3, 5, 7, dtype=torch.float64).float().to(DEVICE)
    torch.testing.assert_close(sum_partials(part), part.sum(0), rtol=1e-5, atol=1e-5)
    assert torch.equal(sum_partials(part[:1]), part[0])


def test_each_kernel_chunks_independently(monkeypatch):
    """Per-kernel launch overrides (different tiles and chunk counts for each pass) give the same
    result as the shared defaults, output and gradients."""
    from gbla.ops.gbla import triton as triton_gbla
    tensors, mask, grad_out = make_inputs(3, 257, 2, 16, torch.float32, True, "rmsnorm_gated", "pad")
    out_a, g_a = run(gbla_attention_triton, tensors, mask, grad_out, "rmsnorm_gated")
    cfg = triton_gbla.launch_config(3, 257, 2, 16, torch.device(DEVICE))
    monkeypatch.setitem(triton_gbla.CONFIG_OVERRIDE, "state", {"block_l": 32, "programs_per_sm": 1})
    monkeypatch.setitem(triton_gbla.CONFIG_OVERRIDE, "bwd_key", {"block_l": 64, "programs_per_sm": 8})
    changed = triton_gbla.launch_config(3, 257, 2, 16, torch.device(DEVICE))
    assert changed["state"]["n_chunks"] != cfg["state"]["n_chunks"] and changed["output"] == cfg["output"]
    assert changed["bwd_key"]["BLOCK_L"] == 64
    out_b, g_b = run(gbla_attention_triton, tensors, mask, grad_out, "rmsnorm_gated")
    torch.testing.assert_close(out_b, out_a, rtol=1e-5, atol=1e-6)
    for name in g_a:
        torch.testing.assert_close(g_b[name], g_a[name], rtol=1e-5, atol=1e-6)
