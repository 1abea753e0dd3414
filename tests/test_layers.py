"""SA and GBLA layers: padding invariance, (bi)directionality, every GBLA switch, relative buckets."""
import itertools

import pytest
import torch

from gbla.config import GBLAOptions
from gbla.layers import GBLALayer, SelfAttentionLayer, position_buckets, relative_position_bucket
from gbla.ops.conv import causal_conv1d_silu

D, H, E = 16, 2, 8

GBLA_SETTINGS = {
    "default": GBLAOptions(),
    "plain_la": GBLAOptions(use_conv1d=False, gate="none", normalization="none"),
    "recency_rmsnorm": GBLAOptions(gate="recency", normalization="rmsnorm", conv_kernel_size=3),
    "noconv_token_gated": GBLAOptions(use_conv1d=False, gate="token", normalization="rmsnorm_gated"),
    "conv_none_none": GBLAOptions(use_conv1d=True, gate="none", normalization="none", conv_kernel_size=2),
}


def make_layer(kind, options=None):
    torch.manual_seed(1)
    if kind == "sa":
        layer = SelfAttentionLayer(D, H, E)
    elif kind == "sa_causal":
        layer = SelfAttentionLayer(D, H, E, causal=True)
    else:
        layer = GBLALayer(D, H, E, options or GBLAOptions(), backend="torch")
    # random (not default-zero) relative biases and gate/conv biases, and a gate that varies from token
    # to token (a gate constant per head cancels in RMS normalization), so their effects are visible
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if "relative_bias" in name or name.endswith("bias") or name == "gate.weight":
                p.normal_(0, 0.5)
    return layer.eval().double()


LAYERS = [("sa", None), ("sa_causal", None)] + [("gbla", o) for o in GBLA_SETTINGS.values()]
LAYER_IDS = ["sa", "sa_causal"] + [f"gbla-{k}" for k in GBLA_SETTINGS]


@pytest.mark.parametrize("kind,options", LAYERS, ids=LAYER_IDS)
@pytest.mark.parametrize("left,right", [(0, 3), (4, 0), (2, 5)])
def test_padding_invariance(kind, options, left, right):
    layer = make_layer(kind, options)
    L = 7
    x = torch.randn(2, L, D, dtype=torch.float64)
    base = layer(x, torch.ones(2, L, dtype=torch.bool))
    assert torch.allclose(base, layer(x, None), atol=1e-12)  # mask=None means all real

    garbage = lambda n: 100 * torch.randn(2, n, D, dtype=torch.float64)  # noqa: E731  (must not leak)
    xp = torch.cat([garbage(left), x, garbage(right)], dim=1)
    mask = torch.zeros(2, left + L + right, dtype=torch.bool)
    mask[:, left:left + L] = True
    out = layer(xp, mask)
    torch.testing.assert_close(out[:, left:left + L], base, rtol=1e-9, atol=1e-9)
    assert (out[~mask] == 0).all()


@pytest.mark.parametrize("kind,options", LAYERS, ids=LAYER_IDS)
def test_ragged_batch_and_all_padded_row(kind, options):
    """Rows of different lengths in one batch, and a row with no real token (finite zeros)."""
    layer = make_layer(kind, options)
    x = torch.randn(3, 6, D, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    out = layer(x, mask)
    assert torch.isfinite(out).all()
    assert (out[2] == 0).all()
    torch.testing.assert_close(out[1, :3], layer(x[1:2, :3], None)[0], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("kind,options", LAYERS, ids=LAYER_IDS)
def test_direction(kind, options):
    """Changing the last token changes the first token's output for "sa" and "gbla", never for
    "sa_causal"; changing the first token changes the last token's output for all."""
    layer = make_layer(kind, options)
    x = torch.randn(1, 6, D, dtype=torch.float64)
    x_late, x_early = x.clone(), x.clone()
    x_late[0, -1] += 1.0
    x_early[0, 0] += 1.0
    out, out_late, out_early = layer(x), layer(x_late), layer(x_early)
    first_changed = (out[0, 0] - out_late[0, 0]).abs().max().item()
    if kind == "sa_causal":
        assert first_changed == 0.0
    else:
        assert first_changed > 1e-6
    assert (out[0, -1] - out_early[0, -1]).abs().max().item() > 1e-6


def test_conv_alone_is_causal():
    torch.manual_seed(0)
    x = torch.randn(2, 9, 5)
    w, b = torch.randn(5, 4), torch.randn(5)
    y = causal_conv1d_silu(x, w, b, backend="torch")
    x2 = x.clone()
    x2[:, 6] += 1.0
    y2 = causal_conv1d_silu(x2, w, b, backend="torch")
    assert torch.equal(y[:, :6], y2[:, :6])
    assert not torch.allclose(y[:, 6:], y2[:, 6:])


def _expected_params(options):
    names = {"qkv.weight", "out.weight"}
    if options.use_conv1d:
        names |= {"conv_weight", "conv_bias"}
    if options.gate != "none":
        names |= {"gate.weight", "gate.bias"}
    if options.normalization != "none":
        names.add("norm_weight")
    if options.normalization == "rmsnorm_gated":
        names.add("z_proj.weight")
    return names


@pytest.mark.parametrize("use_conv1d,gate,normalization",
                         list(itertools.product([False, True], ["none", "token", "recency"],
                                                ["none", "rmsnorm", "rmsnorm_gated"])))
def test_only_needed_parameters_exist(use_conv1d, gate, normalization):
    options = GBLAOptions(use_conv1d=use_conv1d, gate=gate, normalization=normalization)
    layer = GBLALayer(D, H, E, options, backend="torch")
    assert {n for n, _ in layer.named_parameters()} == _expected_params(options)


@pytest.mark.parametrize("field,value", [("use_conv1d", False), ("conv_kernel_size", 2), ("gate", "none"),
                                         ("gate", "recency"), ("normalization", "none"),
                                         ("normalization", "rmsnorm")])
def test_each_switch_changes_the_output(field, value):
    """Flip one switch of the default layer, keep every shared parameter: the output must change."""
    base = make_layer("gbla", GBLAOptions())
    options = GBLAOptions(**{**GBLAOptions().__dict__, field: value})
    other = GBLALayer(D, H, E, options, backend="torch").double().eval()
    state = {k: v for k, v in base.state_dict().items() if k in other.state_dict()}
    if field == "conv_kernel_size":  # keep the taps both kernels have (the most recent ones)
        state["conv_weight"] = base.conv_weight.detach()[..., -value:]
    other.load_state_dict(state, strict=False)
    x = torch.randn(2, 6, D, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    diff = (base(x, mask) - other(x, mask)).abs().max().item()
    assert diff > 1e-4, f"switching {field} to {value!r} did not change the output"


def test_recency_gate_is_suffix_sum_over_real_tokens():
    layer = make_layer("gbla", GBLAOptions(gate="recency"))
    x = torch.randn(1, 5, D, dtype=torch.float64)
    mask = torch.tensor([[True, True, True, True, False]])
    klw = layer.key_log_weight(x, mask)
    log_gate = torch.nn.functional.logsigmoid(layer.gate(x).float())
    for j in range(4):
        expected = sum(log_gate[0, t] for t in range(j + 1, 4))
        expected = expected if j < 3 else torch.zeros(H)
        torch.testing.assert_close(klw[0, j], expected.float(), rtol=1e-6, atol=1e-6)
    assert torch.equal(klw[0, 3], torch.zeros(H))  # the most recent real key is not down-weighted


def test_sa_without_bias_and_mask_matches_masked_path():
    """The flash-eligible path (no bias, no mask) computes the same function as the masked one."""
    for causal in (False, True):
        torch.manual_seed(2)
        layer = SelfAttentionLayer(D, H, E, causal=causal, relative_bias=False).double().eval()
        x = torch.randn(2, 5, D, dtype=torch.float64)
        torch.testing.assert_close(layer(x, None), layer(x, torch.ones(2, 5, dtype=torch.bool)))


def test_relative_position_buckets():
    rel = torch.tensor([0, -1, 1, -7, 7, -8, -20, -127, -500, 500])
    bi = relative_position_bucket(rel, bidirectional=True, num_buckets=32, max_distance=128)
    # 16 buckets per direction: 8 exact (0..7), then log-spaced up to distance 128; keys after the
    # query use buckets 16..31
    assert bi.tolist()[:6] == [0, 1, 17, 7, 23, 8]
    assert bi[6].item() == 8 + int(torch.log(torch.tensor(20 / 8)) / torch.log(torch.tensor(16.0)) * 8)
    assert bi[7].item() == 15 and bi[8].item() == 15 and bi[9].item() == 31
    uni = relative_position_bucket(rel, bidirectional=False, num_buckets=32, max_distance=128)
    assert uni.tolist()[:5] == [0, 1, 0, 7, 0]  # future keys all share bucket 0 (masked anyway)
    assert uni[8].item() == 31


def test_position_buckets_are_computed_once_per_setting():
    """The layer's (L, L) buckets: those of relative_position_bucket, one tensor per (length, direction,
    buckets, distance, device), reused by every call and layer with that setting."""
    cpu = torch.device("cpu")
    pos = torch.arange(13)
    for bidirectional in (True, False):
        got = position_buckets(13, bidirectional, 32, 128, cpu)
        want = relative_position_bucket(pos[None, :] - pos[:, None], bidirectional=bidirectional,
                                        num_buckets=32, max_distance=128)
        assert torch.equal(got, want)
        assert position_buckets(13, bidirectional, 32, 128, cpu) is got
    assert position_buckets(13, True, 32, 128, cpu) is not position_buckets(13, False, 32, 128, cpu)
    assert position_buckets(14, True, 32, 128, cpu).shape == (14, 14)
    assert position_buckets(13, True, 16, 128, cpu) is not position_buckets(13, True, 32, 128, cpu)


@pytest.mark.parametrize("out_features,bias", [(6, True), (6, False), (13, True), (16, True)])
def test_seed_linear_with_padded_outputs_is_the_plain_map(out_features, bias):
    """Outputs not a multiple of GEMM_ALIGN go through a zero-padded matmul: the same values and
    gradients as the unpadded map (float64), the parameters' shapes unchanged."""
    from gbla.layers import SeedLinear

    torch.manual_seed(3)
    lin = SeedLinear(3, 16, out_features, bias=bias, bias_init=0.5).double()
    with torch.no_grad():
        lin.weight.normal_()
    assert tuple(lin.weight.shape) == (3, 16, out_features)
    x = torch.randn(3, 4, 5, 16, dtype=torch.float64, requires_grad=True)
    y = lin(x)
    want = torch.einsum("sbli,sio->sblo", x, lin.weight) + (lin.bias[:, None, None, :] if bias else 0)
    assert y.shape == (3, 4, 5, out_features) and y.is_contiguous()
    torch.testing.assert_close(y, want)
    dy = torch.randn_like(y)
    leaves = [x, lin.weight] + ([lin.bias] if bias else [])
    got = torch.autograd.grad(y, leaves, dy)
    ref = torch.autograd.grad(want, leaves, dy)
    for g, r in zip(got, ref):
        assert g.shape == r.shape
        torch.testing.assert_close(g, r)
