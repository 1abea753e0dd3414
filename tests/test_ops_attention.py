"""Fused Triton short softmax attention vs the torch reference (gbla/ops/attention/naive.py).

Interpreter on the CPU (TRITON_INTERPRET=1) as in CI; GBLA_TEST_CUDA=1 runs the same tests compiled on
a GPU. Both sides are compared to a float64 evaluation of the reference on the same inputs (output,
dq, dk, dv, dbias) with a norm-wise tolerance; dropout is compared through the kernel's own keep-mask
(dropout_keep_mask), which the reference takes explicitly. Each backward scheme (BWD_SCHEMES) is
tested; the packed entry points (qkv, q + kv) against the unpacked one.
"""
import math

from kernel_checks import DEVICE, assert_close_to_float64  # first: picks the interpreter without a GPU

import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton", reason="triton is not importable on this machine")

from gbla.ops import short_attention, short_attention_q_kv, short_attention_qkv  # noqa: E402
from gbla.ops.attention import triton as kernels  # noqa: E402
from gbla.ops.attention.naive import short_attention_reference  # noqa: E402
from gbla.ops.attention.triton import (BWD_SCHEMES, MAX_LEN, draw_seed, dropout_keep_mask,  # noqa: E402
                                       short_attention_q_kv_triton, short_attention_qkv_triton,
                                       short_attention_triton, unsupported)

TOL = {torch.float32: (2e-5, 2e-6), torch.bfloat16: (2e-2, 2e-3)}
if DEVICE == "cuda":  # compiled fp32 exp differs slightly
    TOL[torch.float32] = (1e-4, 1e-5)


def assert_close(name, got, ref64, dtype):
    assert_close_to_float64(name, got, ref64, *TOL[dtype])


def key_mask(kind, N, Lk):
    """None, or: row 0 left-padded, row 1 right-padded, row 2 all padding, the rest real."""
    if kind == "none":
        return None
    mask = torch.ones(N, Lk, dtype=torch.bool)
    mask[0, : max(1, Lk // 3)] = False
    mask[1, Lk - max(1, Lk // 4):] = False
    mask[2] = False
    return mask.to(DEVICE)


def make_inputs(S, B, Lq, Lk, H, E, dtype, with_bias, seed=0):
    """q, k, v as strided views of one fused projection ((N, L, 3, H, E) when Lq == Lk, else q out of
    (N, Lq, 2, H, E) and k, v out of (N, Lk, 2, H, E), as cross-attention gets them); bias a permuted
    (non-contiguous) view like the layer's gather gives."""
    g = torch.Generator().manual_seed(1000 * Lq + 10 * Lk + E + seed)
    N = S * B
    if Lq == Lk:
        bufs = [torch.randn(N, Lq, 3, H, E, generator=g)]
        views = lambda bs: bs[0].unbind(2)  # noqa: E731
    else:
        bufs = [torch.randn(N, Lq, 2, H, E, generator=g), torch.randn(N, Lk, 2, H, E, generator=g)]
        views = lambda bs: (bs[0][:, :, 1], *bs[1].unbind(2))  # noqa: E731
    bufs = [b.to(DEVICE, dtype) for b in bufs]
    bias = torch.randn(S, Lq, Lk, H, generator=g).to(DEVICE).permute(0, 3, 1, 2) if with_bias else None
    grad_out = torch.randn(N, Lq, H, E, generator=g).to(DEVICE, dtype)
    return bufs, views, bias, grad_out


def run(fn, bufs, views, bias, grad_out, upcast=False, **kw):
    bufs = [(b.double() if upcast else b).detach().requires_grad_() for b in bufs]
    q, k, v = views(bufs)
    b = None
    if bias is not None:
        b = (bias.double() if upcast else bias).detach().requires_grad_()
    out = fn(q, k, v, bias=b, **kw)
    inputs = [q, k, v] + ([b] if b is not None else [])
    grads = torch.autograd.grad(out, inputs, grad_out.to(out.dtype))
    return out, dict(zip(["q", "k", "v", "bias"], grads))


@pytest.fixture(params=BWD_SCHEMES)
def scheme(request, monkeypatch):
    """Run the test under each backward scheme of the kernels."""
    monkeypatch.setitem(kernels.CONFIG_OVERRIDE, "bwd_scheme", request.param)
    return request.param


CASES = [  # (S, B, Lq, Lk, H, E, causal, bias, mask, dtype, dropout_p)
    (1, 3, 13, 13, 2, 64, False, True, "pad", torch.float32, 0.0),
    (2, 3, 13, 13, 2, 16, True, True, "pad", torch.float32, 0.0),      # left padding + causal: all-masked queries
    (2, 3, 41, 41, 1, 32, False, False, "pad", torch.float32, 0.0),
    (1, 3, 5, 13, 2, 64, False, False, "pad", torch.float32, 0.0),     # cross-attention shape
    (2, 3, 5, 5, 2, 8, True, True, "none", torch.float32, 0.0),        # decoder self-attention, E < 16
    (1, 3, 81, 81, 1, 16, True, True, "pad", torch.float32, 0.0),
    (2, 3, 13, 13, 2, 64, False, True, "pad", torch.bfloat16, 0.0),
    (1, 3, 41, 41, 2, 32, True, True, "pad", torch.bfloat16, 0.0),
    (2, 3, 4, 25, 2, 64, False, False, "pad", torch.bfloat16, 0.0),
    (2, 3, 13, 13, 2, 64, False, True, "pad", torch.float32, 0.15),    # dropout, replayed by its keep-mask
    (2, 3, 5, 13, 2, 32, False, False, "pad", torch.bfloat16, 0.3),
    (1, 3, 5, 5, 2, 16, True, True, "none", torch.bfloat16, 0.15),
]


@pytest.mark.parametrize("S,B,Lq,Lk,H,E,causal,with_bias,mask_kind,dtype,dropout_p", CASES,
                         ids=[f"S{c[0]}-L{c[2]}x{c[3]}-E{c[5]}-{'causal' if c[6] else 'bidir'}-bias{int(c[7])}-"
                              f"{c[8]}-{str(c[9])[6:]}-p{c[10]}" for c in CASES])
def test_triton_matches_reference(S, B, Lq, Lk, H, E, causal, with_bias, mask_kind, dtype, dropout_p, scheme):
    N = S * B
    bufs, views, bias, grad_out = make_inputs(S, B, Lq, Lk, H, E, dtype, with_bias)
    mask = key_mask(mask_kind, N, Lk)
    kw = dict(key_mask=mask, causal=causal, num_seeds=S, dropout_p=dropout_p)
    seed = draw_seed(torch.device(DEVICE))
    out_tri, g_tri = run(short_attention_triton, bufs, views, bias, grad_out, dropout_seed=seed, **kw)
    keep = dropout_keep_mask(seed, N, H, Lq, Lk, dropout_p) if dropout_p > 0 else None
    out_64, g_64 = run(short_attention_reference, bufs, views, bias, grad_out, upcast=True, dropout_mask=keep, **kw)
    assert out_tri.dtype == dtype and out_tri.is_contiguous() and out_tri.shape == (N, Lq, H, E)
    assert_close("out", out_tri, out_64, dtype)
    assert set(g_tri) == set(g_64)
    for name in g_64:
        assert g_tri[name].dtype == (torch.float32 if name == "bias" else dtype), name
        assert_close(f"d{name}", g_tri[name], g_64[name], dtype)
    if mask is not None:  # padded keys get no score gradient (their values do, from all-masked queries)
        assert (g_tri["k"][~mask] == 0).all()


def test_all_masked_queries_average_all_keys(scheme):
    """A query with no visible key: the plain average of all Lk values, no gradient to q, k or bias
    from it, and the same in kernel and reference (documented in naive.py)."""
    S, B, L, H, E = 1, 3, 7, 2, 16
    bufs, views, bias, grad_out = make_inputs(S, B, L, L, H, E, torch.float32, True)
    mask = key_mask("pad", S * B, L)   # row 0: keys 0, 1 padded, so causal queries 0, 1 see nothing; row 2: none
    kw = dict(key_mask=mask, causal=True, num_seeds=S)
    out_tri, g_tri = run(short_attention_triton, bufs, views, bias, grad_out, **kw)
    out_64, g_64 = run(short_attention_reference, bufs, views, bias, grad_out, upcast=True, **kw)
    v = views(bufs)[2]
    for n, i in ((0, 0), (0, 1), (2, 0), (2, 6)):
        torch.testing.assert_close(out_tri[n, i], v[n].mean(dim=0), rtol=1e-5, atol=1e-6)
        assert (g_tri["q"][n, i] == 0).all()
    assert_close("out", out_tri, out_64, torch.float32)
    for name in g_64:
        assert_close(f"d{name}", g_tri[name], g_64[name], torch.float32)


def small_attention(q, k, v, *, allowed, bias, num_seeds, dropout_p):
    """The function the op replaced (gbla/layers.py before it; q, k, v (S*B, H, L, E)), kept verbatim
    to pin the reference's semantics to it."""
    SB, H, Lq, E = q.shape
    Lk = k.shape[2]
    with torch.autocast(q.device.type, enabled=False):
        scores = torch.matmul(q, k.transpose(-1, -2)).mul_(1.0 / math.sqrt(E))
        scores = scores.view(num_seeds, SB // num_seeds, H, Lq, Lk)
        if bias is not None:
            scores = scores + bias.to(scores.dtype)[:, None]
        if allowed is not None:
            scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
        probs = torch.softmax(scores, dim=-1).view(SB, H, Lq, Lk)
        if dropout_p > 0:
            probs = F.dropout(probs, dropout_p, training=True)
        return torch.matmul(probs, v.to(probs.dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal,with_bias,mask_kind", [(False, True, "pad"), (True, True, "pad"),
                                                        (True, False, "none"), (False, False, "pad")])
def test_reference_is_the_former_small_attention(causal, with_bias, mask_kind, dtype):
    S, B, L, H, E = 2, 3, 9, 2, 8
    bufs, views, bias, grad_out = make_inputs(S, B, L, L, H, E, dtype, with_bias)
    mask = key_mask(mask_kind, S * B, L)
    allowed = None if mask is None else mask.view(S, B, 1, 1, L)
    if causal:
        tril = torch.ones(L, L, dtype=torch.bool, device=DEVICE).tril()
        allowed = tril if allowed is None else allowed & tril
    new, g_new = run(short_attention_reference, bufs, views, bias, grad_out, key_mask=mask, causal=causal,
                     num_seeds=S)

    def former(q, k, v, bias):
        out = small_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), allowed=allowed, bias=bias,
                              num_seeds=S, dropout_p=0.0)
        return out.transpose(1, 2)

    old, g_old = run(former, bufs, views, bias, grad_out)
    assert torch.equal(new, old)
    for name in g_old:
        assert torch.equal(g_new[name], g_old[name]), name


def test_dropout_keep_fraction_and_fresh_draws():
    N, H, L, p = 64, 4, 13, 0.15
    seed = draw_seed(torch.device(DEVICE))
    keep = dropout_keep_mask(seed, N, H, L, L, p)
    assert abs(keep.float().mean().item() - (1 - p)) < 0.01              # 43k draws: 6 standard deviations
    assert torch.equal(keep[:4], dropout_keep_mask(seed, 4, H, L, L, p))  # a seed replays its draw
    assert not torch.equal(keep[:4], dropout_keep_mask(draw_seed(torch.device(DEVICE)), 4, H, L, L, p))
    N, H, L = 2, 2, 8
    q = torch.randn(N, L, H, 16, device=DEVICE)
    a, b = (short_attention(q, q, q, dropout_p=p, backend="triton") for _ in range(2))
    assert not torch.equal(a, b)                                           # each call draws anew
    same = short_attention(q, q, q, dropout_p=0.0, backend="triton")
    # the mean over draws of the inverted-scaled dropout output is the undropped output: its distance
    # shrinks like 1/sqrt(draws) (~0.08 of one draw's at 160 draws; 0.25 leaves room for heavy tails)
    draws = torch.stack([short_attention(q, q, q, dropout_p=p, backend="triton") for _ in range(160)])
    assert (draws.mean(0) - same).abs().mean() < 0.25 * (draws - same).abs().mean()


def test_no_bias_gradient_when_not_needed_and_dispatch():
    S, B, L, H, E = 1, 3, 6, 2, 16
    bufs, views, bias, grad_out = make_inputs(S, B, L, L, H, E, torch.float32, True)
    q, k, v = (t.detach().requires_grad_() for t in views(bufs))
    out = short_attention(q, k, v, bias=bias, backend="triton")     # bias needs no gradient here
    ref = short_attention(q, k, v, bias=bias, backend="torch")
    assert_close("out", out.detach(), ref.detach().double(), torch.float32)
    dq, = torch.autograd.grad(out, [q], grad_out)
    assert torch.isfinite(dq).all() and dq.abs().sum() > 0
    if DEVICE == "cpu":  # "auto" on CPU tensors: the reference
        assert torch.equal(short_attention(q, k, v, bias=bias, backend="auto"), ref)


def test_limits_and_bad_inputs_raise():
    q = torch.randn(2, MAX_LEN + 1, 1, 16, device=DEVICE)
    assert unsupported(q, q) is not None and unsupported(q[:, :MAX_LEN], q[:, :MAX_LEN]) is None
    with pytest.raises(ValueError, match="at most 128"):
        short_attention(q, q, q, backend="triton")
    out = short_attention(q, q, q, backend="torch")
    assert out.shape == q.shape
    q = torch.randn(4, 5, 2, 16, device=DEVICE)
    k = torch.randn(4, 7, 2, 16, device=DEVICE)
    with pytest.raises(ValueError, match="causal"):
        short_attention_triton(q, k, k, causal=True)
    with pytest.raises(ValueError, match="bias"):
        short_attention_triton(q, k, k, bias=torch.zeros(1, 2, 5, 5, device=DEVICE))
    with pytest.raises(ValueError, match="key_mask"):
        short_attention_triton(q, k, k, key_mask=torch.ones(4, 7, device=DEVICE))
    with pytest.raises(ValueError, match="num_seeds"):
        short_attention_triton(q, k, k, num_seeds=3)
    with pytest.raises(ValueError, match="dtype"):
        short_attention_triton(q.double(), k.double(), k.double())


@pytest.mark.parametrize("rows", [1, 2, 5])
def test_bias_gradient_partials_any_rows_per_program(rows, monkeypatch):
    """Scheme "rows": d(bias) sums over a seed's rows in chunks of `rows` (one partial per chunk): the
    same sum."""
    monkeypatch.setitem(kernels.CONFIG_OVERRIDE, "bwd_scheme", "rows")
    monkeypatch.setitem(kernels.CONFIG_OVERRIDE, "rows", rows)
    S, B, L, H, E = 2, 5, 6, 2, 16
    bufs, views, bias, grad_out = make_inputs(S, B, L, L, H, E, torch.float32, True)
    mask = key_mask("pad", S * B, L)
    _, g_tri = run(short_attention_triton, bufs, views, bias, grad_out, key_mask=mask, num_seeds=S)
    _, g_64 = run(short_attention_reference, bufs, views, bias, grad_out, upcast=True, key_mask=mask, num_seeds=S)
    assert_close("dbias", g_tri["bias"], g_64["bias"], torch.float32)


def graph_names(out):
    """The autograd node names reachable from out."""
    names, todo, seen = set(), [out.grad_fn], set()
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.add(type(fn).__name__)
        todo.extend(f for f, _ in fn.next_functions)
    return names


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cross", [False, True], ids=["qkv", "q_kv"])
def test_packed_inputs_match_unpacked(cross, dtype, scheme):
    """short_attention_qkv(qkv) / short_attention_q_kv(q, kv) give exactly the values and gradients of
    short_attention on the unbound views (d(packed) == stack of dq, dk, dv), with no unbind (and so no
    stacking of gradients) in the autograd graph; two backward passes agree bit for bit."""
    S, B, H, E, p = 2, 3, 2, 16, 0.15
    Lq, Lk = (5, 11) if cross else (9, 9)
    N = S * B
    g = torch.Generator().manual_seed(7)
    q_data = torch.randn(N, Lq, H, E, generator=g).to(DEVICE, dtype)
    packed_data = torch.randn(N, Lk, 2 if cross else 3, H, E, generator=g).to(DEVICE, dtype)
    bias_data = torch.randn(S, H, Lq, Lk, generator=g).to(DEVICE)
    grad_out = torch.randn(N, Lq, H, E, generator=g).to(DEVICE, dtype)
    kw = dict(key_mask=key_mask("pad", N, Lk), causal=not cross, num_seeds=S, dropout_p=p,
              dropout_seed=draw_seed(torch.device(DEVICE)))

    def packed():
        packed_in = packed_data.clone().requires_grad_()
        bias = bias_data.clone().requires_grad_()
        if cross:
            q = q_data.clone().requires_grad_()
            out = short_attention_q_kv_triton(q, packed_in, bias=bias, **kw)
            inputs = [q, packed_in, bias]
        else:
            out = short_attention_qkv_triton(packed_in, bias=bias, **kw)
            inputs = [packed_in, bias]
        assert "UnbindBackward0" not in graph_names(out)
        return out, torch.autograd.grad(out, inputs, grad_out)

    out_p, grads_p = packed()
    _, grads_again = packed()
    for a, b in zip(grads_p, grads_again):
        assert torch.equal(a, b)
    # the same tensors as separate leaves: three gradients, stacked here
    parts = [t.clone().requires_grad_() for t in ((q_data, *packed_data.unbind(2)) if cross else
                                                  packed_data.unbind(2))]
    bias = bias_data.clone().requires_grad_()
    out_u = short_attention_triton(*parts, bias=bias, **kw)
    dq, dk, dv, dbias = torch.autograd.grad(out_u, parts + [bias], grad_out)
    assert torch.equal(out_p, out_u)
    assert torch.equal(grads_p[-1], dbias)
    if cross:
        assert torch.equal(grads_p[0], dq) and torch.equal(grads_p[1], torch.stack([dk, dv], dim=2))
    else:
        assert torch.equal(grads_p[0], torch.stack([dq, dk, dv], dim=2))


def test_rows_scheme_takes_tiles_up_to_the_largest_that_compiled():
    """The "rows" scheme's one tile: 128^3 in bf16 compiled on an H200, in fp32 it asked more shared
    memory than the SM has, so fp32 is refused there and taken at half of it."""
    assert kernels.rows_tile_fits(128, 128, 128, torch.bfloat16)
    assert not kernels.rows_tile_fits(128, 128, 128, torch.float32)
    assert kernels.rows_tile_fits(128, 128, 64, torch.float32) and kernels.rows_tile_fits(16, 16, 16, torch.float32)


def test_default_launch_config(monkeypatch):
    """The measured best by default: per_row, whole rows as one query block up to 64 keys and blocks of
    32 queries beyond; overrides win (a query block at most the tile), a bad q_block raises."""
    assert kernels.bwd_scheme(16, 16) == kernels.bwd_scheme(64, 64) == kernels.bwd_scheme(128, 128) == "per_row"
    assert [kernels.q_block(*t) for t in ((16, 16), (64, 64), (16, 128), (64, 128), (128, 128))] == [
        16, 64, 16, 32, 32]
    monkeypatch.setitem(kernels.CONFIG_OVERRIDE, "bwd_scheme", "rows")
    monkeypatch.setitem(kernels.CONFIG_OVERRIDE, "q_block", 16)
    assert kernels.bwd_scheme(128, 128) == "rows"
    assert kernels.q_block(64, 64) == kernels.q_block(128, 128) == 16
    monkeypatch.setitem(kernels.CONFIG_OVERRIDE, "q_block", 128)
    assert kernels.q_block(64, 128) == 64
    for bad in (8, 24):
        monkeypatch.setitem(kernels.CONFIG_OVERRIDE, "q_block", bad)
        with pytest.raises(ValueError, match="q_block"):
            kernels.q_block(128, 128)


QTILE_CASES = [  # (S, B, Lq, Lk, H, causal, bias, mask, dtype, dropout_p, q_block); E = 16
    (2, 3, 65, 65, 1, False, True, "pad", torch.float32, 0.0, 16),
    (1, 3, 81, 81, 2, True, True, "pad", torch.float32, 0.15, 32),     # left padding + causal: all-masked queries
    (2, 3, 100, 100, 1, True, True, "pad", torch.bfloat16, 0.15, 16),
    (1, 3, 128, 128, 1, False, True, "pad", torch.bfloat16, 0.0, 32),
    (2, 3, 81, 81, 1, False, False, "none", torch.float32, 0.0, 32),
    (2, 3, 40, 100, 1, False, True, "pad", torch.float32, 0.15, 16),   # cross-attention, packed q + kv
    (1, 3, 5, 81, 2, False, False, "pad", torch.bfloat16, 0.15, 32),   # 5 queries: one block
]


@pytest.mark.parametrize("S,B,Lq,Lk,H,causal,with_bias,mask_kind,dtype,dropout_p,qb", QTILE_CASES,
                         ids=[f"S{c[0]}-L{c[2]}x{c[3]}-{'causal' if c[5] else 'bidir'}-bias{int(c[6])}-{c[7]}-"
                              f"{str(c[8])[6:]}-p{c[9]}-q{c[10]}" for c in QTILE_CASES])
def test_query_blocks_match_reference(S, B, Lq, Lk, H, causal, with_bias, mask_kind, dtype, dropout_p, qb,
                                      monkeypatch):
    """Over 64 keys the forward runs one program per block of q_block queries and the per_row backward
    loops over them: the packed entry points (qkv, or q + kv) against the reference on the views."""
    monkeypatch.setitem(kernels.CONFIG_OVERRIDE, "bwd_scheme", "per_row")
    monkeypatch.setitem(kernels.CONFIG_OVERRIDE, "q_block", qb)
    N, E = S * B, 16
    bufs, views, bias, grad_out = make_inputs(S, B, Lq, Lk, H, E, dtype, with_bias)
    mask = key_mask(mask_kind, N, Lk)
    kw = dict(key_mask=mask, causal=causal, num_seeds=S, dropout_p=dropout_p)
    seed = draw_seed(torch.device(DEVICE))
    keep = dropout_keep_mask(seed, N, H, Lq, Lk, dropout_p) if dropout_p > 0 else None

    def packed(leaves, **kw):  # qkv (N, L, 3, H, E), or q (a view of one buffer) and kv (N, Lk, 2, H, E)
        if Lq == Lk:
            return short_attention_qkv_triton(leaves[0], **kw)
        return short_attention_q_kv_triton(views(leaves)[0], leaves[1], **kw)

    def reference(leaves, **kw):
        return short_attention_reference(*views(leaves), **kw)

    def grads(fn, upcast, **extra):  # output, and gradients of the packed buffers and the bias
        leaves = [(b.double() if upcast else b).detach().requires_grad_() for b in bufs]
        b = None if bias is None else (bias.double() if upcast else bias).detach().requires_grad_()
        out = fn(leaves, bias=b, **kw, **extra)
        return out, torch.autograd.grad(out, leaves + ([b] if b is not None else []), grad_out.to(out.dtype))

    out_tri, g_tri = grads(packed, False, dropout_seed=seed)
    out_64, g_64 = grads(reference, True, dropout_mask=keep)
    assert_close("out", out_tri, out_64, dtype)
    for i, (got, ref) in enumerate(zip(g_tri, g_64)):
        assert_close(f"grad {i}", got, ref, dtype)


def test_keep_mask_is_the_same_in_every_query_tiling(monkeypatch):
    """The dropout draw depends on (seed, n, h, i, j) only: one tile or query blocks of 16 or 32 give
    the same mask, and the kernels use it (the forward at q_block 16 equals the reference with it)."""
    seed = draw_seed(torch.device(DEVICE))
    for N, H, Lq, Lk in ((2, 2, 81, 81), (2, 1, 40, 100), (3, 1, 13, 13)):
        masks = []
        for qb in (128, 32, 16):
            monkeypatch.setitem(kernels.CONFIG_OVERRIDE, "q_block", qb)
            masks.append(dropout_keep_mask(seed, N, H, Lq, Lk, 0.3))
        assert all(torch.equal(masks[0], m) for m in masks[1:]), (Lq, Lk)
    q, k, v = (torch.randn(2, 81, 2, 16, device=DEVICE) for _ in range(3))
    out = short_attention_triton(q, k, v, dropout_p=0.3, dropout_seed=seed)
    monkeypatch.setitem(kernels.CONFIG_OVERRIDE, "q_block", 128)
    ref = short_attention_reference(q, k, v, dropout_p=0.3, dropout_mask=dropout_keep_mask(seed, 2, 2, 81, 81, 0.3))
    assert_close("out", out, ref.double(), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("N,H,Lq,Lk", [(6, 2, 5, 13), (3, 2, 13, 13), (3, 2, 5, 5), (2, 1, 81, 81)],
                         ids=["L5x13", "L13x13", "L5x5", "L81x81"])
def test_kernels_drop_exactly_the_keep_mask(N, H, Lq, Lk, dtype, scheme):
    """Read the mask each kernel applies off its result and compare it, element for element, with
    dropout_keep_mask: q = k = 0 makes every probability 1 / Lk, v one-hot per key makes the forward's
    output the dropped probabilities themselves (> 0 exactly where kept), and a one-hot dO per query
    makes the backward's dV their transpose. A draw that differs between the kernels (or from the
    materialized mask the tests compare through) fails here whatever the tolerance (as a draw of one
    Philox call per four scores did, compiled on an H200, while passing under the interpreter)."""
    p = 0.3
    E = max(Lq, Lk)
    q = torch.zeros(N, Lq, H, E, device=DEVICE, dtype=dtype, requires_grad=True)
    k = torch.zeros(N, Lk, H, E, device=DEVICE, dtype=dtype)
    v = torch.eye(Lk, E, device=DEVICE, dtype=dtype)[None, :, None, :].expand(N, Lk, H, E).contiguous()
    v.requires_grad_()
    seed = draw_seed(torch.device(DEVICE))
    out = short_attention_triton(q, k, v, dropout_p=p, dropout_seed=seed)
    grad_out = torch.eye(Lq, E, device=DEVICE, dtype=dtype)[None, :, None, :].expand(N, Lq, H, E)
    if scheme == "rows" and not kernels.rows_tile_fits(*kernels._blocks(Lq, Lk, E), dtype):
        # fp32 at 81 x 81 x 81: the one tile is over what an SM holds (refused, not launched)
        with pytest.raises(ValueError, match="bwd_scheme 'rows' holds one \\(128, 128, 128\\) tile"):
            torch.autograd.grad(out, [v], grad_out)
        return
    (dv,) = torch.autograd.grad(out, [v], grad_out)
    keep = dropout_keep_mask(seed, N, H, Lq, Lk, p).cpu()
    fwd_kept = (out[..., :Lk] > 0).permute(0, 2, 1, 3).cpu()      # (N, H, Lq, Lk)
    bwd_kept = (dv[..., :Lq] > 0).permute(0, 2, 3, 1).cpu()       # dV[n, j, h, i] = Pd[n, h, i, j]
    assert torch.equal(fwd_kept, keep), f"forward drops other scores than the keep-mask: {(fwd_kept != keep).sum()}"
    assert torch.equal(bwd_kept, keep), f"backward drops other scores than the keep-mask: {(bwd_kept != keep).sum()}"
    assert abs(keep.float().mean().item() - (1 - p)) < 0.1
    expected = keep.permute(0, 2, 1, 3).to(torch.float64) / (Lk * (1 - p))
    torch.testing.assert_close(out[..., :Lk].double().cpu(), expected, rtol=1e-2 if dtype != torch.float32 else 1e-5,
                               atol=0)


def test_packed_dispatch_and_bad_shapes():
    """The public packed entry points: the reference unbinds (the same result as on the views), the
    kernels give it within tolerance; a wrongly packed tensor raises ValueError naming it."""
    S, B, L, Lk, H, E = 1, 3, 6, 9, 2, 16
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(S * B, L, 3, H, E, generator=g).to(DEVICE)
    q = torch.randn(S * B, L, H, E, generator=g).to(DEVICE)
    kv = torch.randn(S * B, Lk, 2, H, E, generator=g).to(DEVICE)
    bias = torch.randn(S, H, L, L, generator=g).to(DEVICE)
    ref = short_attention(*qkv.unbind(2), bias=bias, causal=True, backend="torch")
    assert torch.equal(short_attention_qkv(qkv, bias=bias, causal=True, backend="torch"), ref)
    assert_close("qkv", short_attention_qkv(qkv, bias=bias, causal=True, backend="triton"), ref.double(),
                 torch.float32)
    ref = short_attention(q, *kv.unbind(2), backend="torch")
    assert torch.equal(short_attention_q_kv(q, kv, backend="torch"), ref)
    assert_close("q_kv", short_attention_q_kv(q, kv, backend="triton"), ref.double(), torch.float32)
    with pytest.raises(ValueError, match="qkv must be"):
        short_attention_qkv(kv, backend="triton")
    with pytest.raises(ValueError, match="kv must be"):
        short_attention_q_kv(q, qkv, backend="torch")
    with pytest.raises(ValueError, match="bwd_scheme"):
        kernels.CONFIG_OVERRIDE["bwd_scheme"] = "columns"
        try:
            x = qkv.clone().requires_grad_()
            short_attention_qkv(x, backend="triton").sum().backward()
        finally:
            del kernels.CONFIG_OVERRIDE["bwd_scheme"]


def test_tiger_with_fused_attention_matches_reference():
    """A 2-seed TIGER whose SA layers, decoder self- and cross-attention run the kernels
    (attention_backend="triton") gives the reference model's losses and gradients, and the same beam
    search (cached decoding through SelfAttentionLayer.step)."""
    from gbla.config import ModelConfig
    from gbla.data.synthetic import make_synthetic_dataset
    from gbla.evaluate import SIDTrie, beam_search
    from gbla.model import TIGER

    data = make_synthetic_dataset(num_users=20, num_items=40, seed=2, max_history=6)
    cfg = ModelConfig(encoder_layout=("sa", "sa_causal", "gbla"), d_model=16, num_heads=2, head_dim=8, d_ff=32,
                      num_decoder_layers=2, dropout=0.0, num_user_buckets=5)
    sids = torch.as_tensor(data.sids)
    models, losses, grads, found = {}, {}, {}, {}
    for backend in ("torch", "triton"):
        model = TIGER(cfg, data.codebook_sizes, backend="torch", num_seeds=2, attention_backend=backend)
        model = model.init_seeds([0, 1]).to(DEVICE)
        with torch.no_grad():  # random relative biases, so that their gradients are compared
            gen = torch.Generator().manual_seed(5)
            for block in model.encoder[:2]:
                bias = block.mix.relative_bias
                bias.copy_(torch.randn(bias.shape, generator=gen) * 0.5)
        enc = model.vocab.encoder_tokens(torch.as_tensor(data.train.user[:6]), torch.as_tensor(data.train.history[:6]),
                                         sids).to(DEVICE)
        loss = model.loss(enc, sids[torch.as_tensor(data.train.target[:6])].to(DEVICE))
        losses[backend] = loss.detach()
        grads[backend] = torch.autograd.grad(loss.sum(), list(model.parameters()))
        model.eval()
        with torch.no_grad():
            found[backend] = beam_search(model, enc, SIDTrie(data.sids, data.codebook_sizes, device=DEVICE),
                                         beam_size=5, top_k=3)
        models[backend] = model
    assert models["triton"].encoder[0].mix.backend == "triton" and models["triton"].encoder[2].mix.backend == "torch"
    torch.testing.assert_close(losses["triton"], losses["torch"], rtol=1e-5, atol=1e-6)
    for (name, _), a, b in zip(models["torch"].named_parameters(), grads["triton"], grads["torch"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)
    assert torch.equal(found["triton"][0], found["torch"][0])
    torch.testing.assert_close(found["triton"][1], found["torch"][1], rtol=1e-5, atol=1e-5)


GATHERED_CASES = [  # (S, B, M, Lq, Lk, H, E, with_bias, dtype)
    (1, 5, 7, 1, 1, 2, 16, False, torch.float32),
    (2, 6, 9, 1, 3, 2, 16, True, torch.float32),
    (2, 3, 12, 1, 4, 3, 24, True, torch.bfloat16),
    (1, 4, 4, 3, 5, 2, 16, True, torch.float32),     # several queries per row
    (3, 2, 6, 1, 2, 1, 64, False, torch.bfloat16),
]


@pytest.mark.parametrize("one_query_kernel", [True, False])
@pytest.mark.parametrize("S,B,M,Lq,Lk,H,E,with_bias,dtype", GATHERED_CASES)
def test_gathered_kv_reads_each_key_from_its_row(S, B, M, Lq, Lk, H, E, with_bias, dtype, one_query_kernel,
                                                 monkeypatch):
    """short_attention_gathered_kv: key position j of row n is kv[key_rows[n, j], j], kv a time-major
    buffer seen through a transpose (as the decoder cache passes it). Kernels (a single query: the
    one-query kernel, or the general forward) and reference against a float64 evaluation that builds
    each row's keys one by one; the reference equals it exactly in fp64."""
    monkeypatch.setitem(kernels.CONFIG_OVERRIDE, "one_query_kernel", one_query_kernel)
    if one_query_kernel and Lq == 1:   # the general forward must not be what runs

        def general_forward(*args, **kwargs):
            raise AssertionError("a single query took the general forward")
        monkeypatch.setattr(kernels, "_forward", general_forward)
    from gbla.ops import short_attention_gathered_kv
    from gbla.ops.attention.naive import short_attention_gathered_kv_reference
    from gbla.ops.attention.triton import short_attention_gathered_kv_triton

    N = S * B
    g = torch.Generator().manual_seed(N * 10 + Lk)
    q = torch.randn(N, Lq, H, E, generator=g)
    slots = torch.randn(Lk, M, 2, H, E, generator=g)           # (positions, rows, 2, H, E)
    key_rows = torch.randint(0, M, (N, Lk), generator=g)
    bias = torch.randn(S, H, Lq, Lk, generator=g) if with_bias else None
    # float64, written out per row: row n's key j is slots[j, key_rows[n, j]]
    k64 = torch.stack([torch.stack([slots[j, key_rows[n, j], 0] for j in range(Lk)]) for n in range(N)]).double()
    v64 = torch.stack([torch.stack([slots[j, key_rows[n, j], 1] for j in range(Lk)]) for n in range(N)]).double()
    b64 = None if bias is None else bias.double()
    ref64 = short_attention_reference(q.double(), k64, v64, bias=b64, num_seeds=S)
    kv64 = slots.double().transpose(0, 1)
    exact = short_attention_gathered_kv_reference(q.double(), kv64, key_rows, bias=b64, num_seeds=S)
    torch.testing.assert_close(exact, ref64, rtol=0, atol=0)

    dev = lambda t: None if t is None else t.to(DEVICE, dtype)   # noqa: E731
    kv = dev(slots).transpose(0, 1)
    assert Lk == 1 or not kv.is_contiguous()
    with torch.no_grad():
        got = short_attention_gathered_kv_triton(dev(q), kv, key_rows.to(DEVICE), bias=dev(bias), num_seeds=S)
        ref = short_attention_gathered_kv_reference(dev(q), kv, key_rows.to(DEVICE), bias=dev(bias), num_seeds=S)
        auto = short_attention_gathered_kv(dev(q), kv, key_rows.to(DEVICE, torch.int32), bias=dev(bias), num_seeds=S,
                                           backend="triton")
    assert got.dtype == dtype and got.shape == (N, Lq, H, E)
    assert_close("gathered kernels", got, ref64, dtype)
    assert_close("gathered reference", ref, ref64, dtype)
    torch.testing.assert_close(auto, got, rtol=0, atol=0)   # int32 rows: the same reads


def test_gathered_kv_bad_inputs_raise():
    from gbla.ops.attention.triton import short_attention_gathered_kv_triton

    q = torch.randn(4, 1, 2, 16, device=DEVICE)
    kv = torch.randn(6, 3, 2, 2, 16, device=DEVICE)
    rows = torch.zeros(4, 3, dtype=torch.long, device=DEVICE)
    with pytest.raises(ValueError, match="key_rows must be \\(N, Lk\\)"):
        short_attention_gathered_kv_triton(q, kv, rows[:, :2])
    with pytest.raises(ValueError, match="key_rows must be an int32 or int64"):
        short_attention_gathered_kv_triton(q, kv, rows.float())
    with pytest.raises(ValueError, match="kv must be \\(M, Lk, 2, H, E\\)"):
        short_attention_gathered_kv_triton(q, kv[:, :, :1], rows)
    with pytest.raises(ValueError, match="bias must be"):
        short_attention_gathered_kv_triton(q, kv, rows, bias=torch.zeros(1, 2, 1, 2, device=DEVICE))
    with pytest.raises(ValueError, match="no backward"):
        short_attention_gathered_kv_triton(q.requires_grad_(), kv, rows)
