"""The reference GBLA op against an independent, loop-based reading of the formulas (issue 3).

`slow_gbla` below walks batch rows, heads and tokens one at a time in float64, with Python sums
instead of einsums, so a shared mistake with gbla/ops/gbla/naive.py is unlikely.
"""

import pytest
import torch

from gbla.ops import gbla_attention, gbla_attention_reference

NORMALIZATIONS = ("none", "rmsnorm", "rmsnorm_gated")


def _phi(t):
    # elu(t) + 1 written out: t + 1 for t > 0, exp(t) otherwise
    return torch.where(t > 0, t + 1.0, torch.exp(t))


def slow_gbla(q, k, v, key_log_weight=None, mask=None, z=None, norm_weight=None,
              normalization="rmsnorm_gated", eps=1e-6):
    B, L, H, E = q.shape
    q, k, v = q.double(), k.double(), v.double()
    out = torch.zeros(B, L, H, E, dtype=torch.float64)
    for b in range(B):
        real = [True] * L if mask is None else [bool(m) for m in mask[b]]
        n_real = max(1, sum(real))
        for h in range(H):
            state = torch.zeros(E, E, dtype=torch.float64)
            key_sum = torch.zeros(E, dtype=torch.float64)
            for j in range(L):
                if not real[j]:
                    continue
                weight = 1.0 if key_log_weight is None else torch.exp(key_log_weight[b, j, h].double())
                kj = _phi(k[b, j, h]) * weight
                state += torch.outer(kj, v[b, j, h])
                key_sum += kj
            for i in range(L):
                if not real[i]:
                    continue  # stays zero
                qi = _phi(q[b, i, h])
                num = torch.stack([(qi * state[:, f]).sum() for f in range(E)])
                if normalization == "none":
                    o = num / ((qi * key_sum).sum() + eps)
                else:
                    x = num / n_real
                    o = x / torch.sqrt((x * x).sum() / E + eps)
                    if norm_weight is not None:
                        o = o * norm_weight.double()
                    if normalization == "rmsnorm_gated":
                        zi = z[b, i, h].double()
                        o = o * zi / (1.0 + torch.exp(-zi))
                out[b, i, h] = o
    return out


def _mask(kind, B, L):
    mask = torch.ones(B, L, dtype=torch.bool)
    if kind == "none":
        return None
    lengths = torch.tensor([L, max(1, L - 3), 1, 0][:B])
    for b, n in enumerate(lengths.tolist()):
        mask[b] = False
        if kind == "right":
            mask[b, :n] = True
        else:  # left padding: real tokens at the end
            mask[b, L - n:] = True
    return mask


def _inputs(B, L, H, E, dtype, with_weights, seed, requires_grad=False):
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0):
        t = (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)
        return t.requires_grad_(requires_grad)

    q, k, v, z = r(B, L, H, E), r(B, L, H, E), r(B, L, H, E), r(B, L, H, E)
    klw = r(B, L, H, scale=0.7) if with_weights else None
    norm_weight = (1.0 + 0.3 * torch.randn(E, generator=g, dtype=torch.float64)).to(dtype)
    norm_weight.requires_grad_(requires_grad)
    return q, k, v, klw, z, norm_weight


@pytest.mark.parametrize("normalization", NORMALIZATIONS)
@pytest.mark.parametrize("mask_kind", ["none", "right", "left"])
@pytest.mark.parametrize("with_weights", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_matches_loops(normalization, mask_kind, with_weights, dtype):
    B, L, H, E = 4, 7, 2, 5
    q, k, v, klw, z, nw = _inputs(B, L, H, E, dtype, with_weights, seed=NORMALIZATIONS.index(normalization) * 10 + len(mask_kind))
    mask = _mask(mask_kind, B, L)
    out = gbla_attention(q, k, v, key_log_weight=klw, mask=mask, z=z, norm_weight=nw,
                         normalization=normalization, backend="torch")
    assert out.dtype == dtype and out.shape == q.shape
    # the loop version sees exactly the values the op saw (already rounded to dtype)
    expected = slow_gbla(q, k, v, klw, mask, z, nw, normalization)
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # bf16: one final rounding of the output
    assert torch.isfinite(out.float()).all()
    torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol)
    if mask is not None:
        assert (out[~mask] == 0).all(), "padded positions must be exactly zero"


def test_all_padded_row_is_zero_and_finite():
    B, L, H, E = 2, 5, 2, 4
    q, k, v, klw, z, nw = _inputs(B, L, H, E, torch.float32, True, seed=3)
    mask = torch.zeros(B, L, dtype=torch.bool)
    mask[0, :3] = True
    for normalization in NORMALIZATIONS:
        out = gbla_attention(q, k, v, key_log_weight=klw, mask=mask, z=z, norm_weight=nw,
                             normalization=normalization, backend="torch")
        assert torch.isfinite(out).all()
        assert (out[1] == 0).all()
        torch.testing.assert_close(out.double(), slow_gbla(q, k, v, klw, mask, z, nw, normalization),
                                   rtol=1e-5, atol=1e-5)


def test_padded_key_weight_inf_does_not_leak():
    """A huge (even infinite) key weight at a padded position must not reach real outputs."""
    B, L, H, E = 1, 6, 1, 4
    q, k, v, klw, z, nw = _inputs(B, L, H, E, torch.float32, True, seed=5)
    mask = torch.tensor([[True, True, True, True, False, False]])
    klw_inf = klw.clone()
    klw_inf[0, 4:] = float("inf")
    for normalization in NORMALIZATIONS:
        a = gbla_attention_reference(q, k, v, key_log_weight=klw, mask=mask, z=z, norm_weight=nw,
                                     normalization=normalization)
        b = gbla_attention_reference(q, k, v, key_log_weight=klw_inf, mask=mask, z=z, norm_weight=nw,
                                     normalization=normalization)
        assert torch.equal(a, b)


def test_no_norm_weight_means_unit_weight():
    q, k, v, klw, z, nw = _inputs(2, 5, 2, 4, torch.float32, True, seed=9)
    a = gbla_attention_reference(q, k, v, key_log_weight=klw, z=z, normalization="rmsnorm_gated")
    b = gbla_attention_reference(q, k, v, key_log_weight=klw, z=z, norm_weight=torch.ones(4),
                                 normalization="rmsnorm_gated")
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("normalization", NORMALIZATIONS)
def test_gradcheck_float64(normalization):
    B, L, H, E = 2, 4, 2, 3
    q, k, v, klw, z, nw = _inputs(B, L, H, E, torch.float64, True, seed=11, requires_grad=True)
    mask = torch.tensor([[True, True, True, False], [False, True, True, True]])

    def f(q, k, v, klw, z, nw):
        return gbla_attention_reference(q, k, v, key_log_weight=klw, mask=mask, z=z, norm_weight=nw,
                                        normalization=normalization)

    assert torch.autograd.gradcheck(f, (q, k, v, klw, z, nw), eps=1e-6, atol=1e-5, rtol=1e-4)


def test_gradients_reach_every_input_and_match_loops():
    """Backward of the reference equals the backward of the loop version (float64)."""
    B, L, H, E = 2, 5, 2, 3
    mask = _mask("left", B, L)
    ins = _inputs(B, L, H, E, torch.float64, True, seed=13, requires_grad=True)
    ins2 = [t.detach().clone().requires_grad_(True) for t in ins]
    w = torch.randn(B, L, H, E, dtype=torch.float64)
    q, k, v, klw, z, nw = ins
    (gbla_attention_reference(q, k, v, key_log_weight=klw, mask=mask, z=z, norm_weight=nw) * w).sum().backward()
    q2, k2, v2, klw2, z2, nw2 = ins2
    (slow_gbla(q2, k2, v2, klw2, mask, z2, nw2) * w).sum().backward()
    for name, a, b in zip(["q", "k", "v", "key_log_weight", "z", "norm_weight"], ins, ins2):
        assert a.grad is not None and a.grad.abs().sum() > 0, name
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-9, msg=name)


def test_bad_arguments_name_the_field():
    q = torch.randn(1, 3, 2, 4)
    with pytest.raises(ValueError, match="normalization"):
        gbla_attention(q, q, q, normalization="layernorm", backend="torch")
    with pytest.raises(ValueError, match="z"):
        gbla_attention(q, q, q, normalization="rmsnorm_gated", backend="torch")
    with pytest.raises(ValueError, match="mask"):
        gbla_attention(q, q, q, mask=torch.ones(1, 3), normalization="none", backend="torch")
    with pytest.raises(ValueError, match="key_log_weight"):
        gbla_attention(q, q, q, key_log_weight=torch.zeros(1, 3), normalization="none", backend="torch")
    with pytest.raises(ValueError, match="backend"):
        gbla_attention(q, q, q, normalization="none", backend="cuda")
