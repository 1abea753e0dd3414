"""The building blocks of the model, each holding the weights of `num_seeds` independent models.

Training several seeds of one variant in one process is much cheaper than one process per seed: a
batch of 256 examples leaves most of a GPU idle, while S seeds x 256 examples run every operation
once, S times as large. So every parameter carries a leading seed axis (S, ...), activations are
(S, B, ..., D), and nothing mixes the seeds: each seed is a model of its own, with its own weights,
gradients and AdamW state (AdamW is elementwise). S = 1 is one ordinary model.

The token-mixing layers (softmax self-attention and GBLA) are the attention *sublayer* only
(projections, mixing, output projection); the encoder block in gbla/model.py adds the pre-norm
residual and the FFN around them. They take x (S, B, L, D) and a mask (S, B, L) bool (True = real
token, None = all real) and return (S, B, L, D) with zeros at padded positions; with S = 1 they also
take x (B, L, D) and a mask (B, L). Padding may sit on either side: outputs at real positions do not
depend on how much there is.

Initialisation: each parameter records its rule (`init_rule`: normal, uniform or constant), and
`init_seed_slice` redraws one seed's slice from a generator of its own, so a seed's initial weights
depend only on its seed number, not on which other seeds share the process (gbla/model.py).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from gbla.config import GBLAOptions
from gbla.ops import gbla_attention, short_attention_gathered_kv, short_attention_qkv
from gbla.ops.conv import causal_conv1d_silu
from gbla.ops.norm import seed_rms_norm


# ---------------------------------------------------------------------------------------------
# stacked parameters
# ---------------------------------------------------------------------------------------------

def seed_parameter(shape, rule: tuple[str, float]) -> nn.Parameter:
    """A parameter of `shape` (seed axis first) filled by `rule`, which it keeps for re-drawing:
    ("normal", std), ("uniform", bound) or ("constant", value)."""
    p = nn.Parameter(torch.empty(shape))
    p.init_rule = rule
    with torch.no_grad():
        apply_init_rule(p, rule)
    return p


def apply_init_rule(t: torch.Tensor, rule: tuple[str, float], generator: torch.Generator | None = None) -> None:
    kind, value = rule
    if kind == "normal":
        t.normal_(0.0, value, generator=generator)
    elif kind == "uniform":
        t.uniform_(-value, value, generator=generator)
    elif kind == "constant":
        t.fill_(value)
    else:
        raise ValueError(f"unknown init rule {rule!r}")


@torch.no_grad()
def init_seed_slice(module: nn.Module, index: int, seed: int) -> None:
    """Redraw slice `index` of every parameter of `module` from a generator seeded with `seed` alone,
    parameters in registration order (drawn on the CPU, so the values do not depend on the device)."""
    generator = torch.Generator().manual_seed(int(seed))
    for name, p in module.named_parameters():
        rule = getattr(p, "init_rule", None)
        if rule is None:
            raise ValueError(f"parameter {name} has no init_rule")
        fresh = torch.empty(p.shape[1:], dtype=torch.float32)
        apply_init_rule(fresh, rule, generator)
        p[index].copy_(fresh)


def as_stacked(x: torch.Tensor, mask: torch.Tensor | None, num_seeds: int):
    """(x, mask, unstacked): x (B, L, D) of a one-seed module becomes (1, B, L, D)."""
    if x.dim() == 3:
        if num_seeds != 1:
            raise ValueError(f"x must be (S, B, L, D) with S={num_seeds} seeds, got shape {tuple(x.shape)}")
        return x[None], None if mask is None else mask[None], True
    if x.dim() != 4 or x.shape[0] != num_seeds:
        raise ValueError(f"x must be (S, B, L, D) with S={num_seeds} seeds, got shape {tuple(x.shape)}")
    return x, mask, False


# GEMM operand dims that are multiples of this (16 bytes of bf16) let cuBLAS use Hopper's kernels. The
# hybrid step's profile at aeca198 has one sm80 WMMA GEMM, twice per step, 0.23 ms of 12.6; sa's has
# none, and of the GEMMs only hybrid's GBLA layers add, the key gate's (6 outputs, one per head) is
# the one with a dimension that is not a multiple of 8 (outputs/bench/NOTES.md).
GEMM_ALIGN = 8


class SeedLinear(nn.Module):
    """S independent linear maps, x (S, ..., in) -> (S, ..., out), as one batched matmul.

    The weight is stored (S, in, out), the layout the batched matmul reads directly. With S = 1 an
    unstacked x (..., in) is accepted too. Init: normal(0, 0.02) weights (TIGER / T5), bias constant.
    An output count that is not a multiple of GEMM_ALIGN is padded with zero columns for the matmul
    and sliced off after it (the same values: the extra columns only ever multiply zeros)."""

    def __init__(self, num_seeds: int, in_features: int, out_features: int, *, bias: bool = False,
                 bias_init: float = 0.0):
        super().__init__()
        self.num_seeds, self.in_features, self.out_features = num_seeds, in_features, out_features
        self.weight = seed_parameter((num_seeds, in_features, out_features), ("normal", 0.02))
        self.bias = seed_parameter((num_seeds, out_features), ("constant", bias_init)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        S = self.num_seeds
        if S == 1 and (x.dim() < 3 or x.shape[0] != 1):
            return self(x[None])[0]
        lead = x.shape[:-1]
        flat = x.reshape(S, -1, self.in_features)
        weight, bias, pad = self.weight, self.bias, -self.out_features % GEMM_ALIGN
        if pad:
            weight = F.pad(weight, (0, pad))
            bias = None if bias is None else F.pad(bias, (0, pad))
        if bias is None:
            y = torch.bmm(flat, weight)
        else:
            y = torch.baddbmm(bias[:, None, :], flat, weight)
        if pad:   # contiguous, as the unpadded map gives it (a copy of the few real columns)
            y = y[..., :self.out_features].contiguous()
        return y.reshape(*lead, self.out_features)


class SeedRMSNorm(nn.Module):
    """RMSNorm with a per-seed weight; x (S, ..., D). eps as nn.RMSNorm's default (dtype's eps).
    `backend`: gbla.ops.seed_rms_norm's (the reference, or one fused kernel each way)."""

    def __init__(self, num_seeds: int, dim: int, backend: str = "auto"):
        super().__init__()
        self.dim, self.backend = dim, backend
        self.weight = seed_parameter((num_seeds, dim), ("constant", 1.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.shape[0] == 1 and x.shape[0] != 1:   # one seed, x without the seed axis
            return self(x[None])[0]
        return seed_rms_norm(x, self.weight, backend=self.backend)


class SeedEmbedding(nn.Module):
    """Per-seed token embeddings: tokens (S, ...) -> (S, ..., D), one lookup in the stacked table."""

    def __init__(self, num_seeds: int, num_tokens: int, dim: int):
        super().__init__()
        self.num_tokens = num_tokens
        self.weight = seed_parameter((num_seeds, num_tokens, dim), ("normal", 0.02))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        S = self.weight.shape[0]
        offsets = torch.arange(S, device=tokens.device).view(S, *([1] * (tokens.dim() - 1))) * self.num_tokens
        return F.embedding(tokens + offsets, self.weight.view(S * self.num_tokens, -1))


# ---------------------------------------------------------------------------------------------
# relative position bias (T5)
# ---------------------------------------------------------------------------------------------

def relative_position_bucket(relative_position: torch.Tensor, *, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> torch.Tensor:
    """T5's bucketing of (key position - query position): exact buckets for small distances, then
    logarithmically wider ones up to max_distance; a bidirectional bias gives each direction half."""
    bucket = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        bucket = bucket + (relative_position > 0).long() * num_buckets
        distance = relative_position.abs()
    else:
        distance = (-relative_position).clamp(min=0)  # only keys in the past have a distinct bucket
    max_exact = num_buckets // 2
    # log-spaced buckets for distances in [max_exact, max_distance); clamp(min=1) keeps log() finite
    # for the small distances, whose value where() discards anyway
    log_ratio = torch.log(distance.clamp(min=1).float() / max_exact) / math.log(max_distance / max_exact)
    far = (max_exact + (log_ratio * (num_buckets - max_exact)).long()).clamp(max=num_buckets - 1)
    return bucket + torch.where(distance < max_exact, distance, far)


_BUCKETS: dict[tuple, torch.Tensor] = {}


def position_buckets(L: int, bidirectional: bool, num_buckets: int, max_distance: int,
                     device: torch.device) -> torch.Tensor:
    """The (L, L) bucket of (key - query position), computed once per length and setting and kept: it
    depends on nothing learned, and computing it is ~15 tiny kernels, which every SA layer of every
    training step (and every beam-search step) would otherwise launch again. Never written in place."""
    key = (int(L), bool(bidirectional), int(num_buckets), int(max_distance), device.type, device.index)
    buckets = _BUCKETS.get(key)
    if buckets is None:
        pos = torch.arange(L, device=device)
        buckets = relative_position_bucket(pos[None, :] - pos[:, None], bidirectional=bidirectional,
                                           num_buckets=num_buckets, max_distance=max_distance)
        _BUCKETS[key] = buckets
    return buckets


class DecodeCache:
    """A causal self-attention layer's keys and values of the positions decoded so far (beam search).

    slots (positions, rows, 2, H, E): the (k, v) of position p for the rows decoded at p sit in
    slots[p, :rows_p], written once; key_rows (N, p) int64: for each current row, the row of every
    earlier position its prefix went through. Re-ranking the beams (follow) gathers only key_rows, and
    the attention reads each key where it was written (short_attention_gathered_kv): the cache itself
    is never copied. `positions` and `rows` bound what it holds; slots are allocated at the first step,
    in the projection's dtype."""

    def __init__(self, positions: int, rows: int, slots: torch.Tensor | None = None,
                 key_rows: torch.Tensor | None = None):
        self.positions, self.rows, self.slots, self.key_rows = int(positions), int(rows), slots, key_rows

    def follow(self, source: torch.Tensor) -> "DecodeCache":
        """The cache of the re-ranked rows: new row i continues old row source[i]."""
        return DecodeCache(self.positions, self.rows, self.slots, self.key_rows.index_select(0, source))


class SelfAttentionLayer(nn.Module):
    """Multi-head softmax self-attention, bidirectional or causal, with a T5-style learned relative
    position bias (one scalar per head and distance bucket; every layer has its own, unlike T5 which
    shares layer 0's: a few hundred extra parameters, and each layer may learn its own distance
    profile). Scores use the 1/sqrt(head_dim) scale (T5 folds it into the init).

    With relative_bias=False and mask=None it calls torch SDPA, which may pick flash/cuDNN kernels
    (the long-sequence latency benchmark); otherwise gbla.ops.short_attention_qkv on the fused
    projection itself, (S*B, L, 3, H, E) (no copies; the kernels' backward writes its gradient in one
    buffer), its (S*B, L, H, E) output going straight into the output projection. `backend` picks its kernels ("torch", "triton", "auto"); it
    does not change the result beyond rounding (and the dropout draws).
    """

    def __init__(self, d_model: int, num_heads: int, head_dim: int, *, causal: bool = False,
                 relative_bias: bool = True, dropout: float = 0.0, relative_attention_num_buckets: int = 32,
                 relative_attention_max_distance: int = 128, num_seeds: int = 1, backend: str = "auto"):
        super().__init__()
        self.num_seeds, self.num_heads, self.head_dim = num_seeds, num_heads, head_dim
        self.causal, self.dropout, self.backend = causal, dropout, backend
        self.qkv = SeedLinear(num_seeds, d_model, 3 * num_heads * head_dim)
        self.out = SeedLinear(num_seeds, num_heads * head_dim, d_model)
        self.num_buckets = relative_attention_num_buckets
        self.max_distance = relative_attention_max_distance
        self.relative_bias = (seed_parameter((num_seeds, self.num_buckets, num_heads), ("normal", 0.02))
                              if relative_bias else None)

    def position_bias(self, L: int, device) -> torch.Tensor:
        """(S, H, L, L) additive bias, from query position i to key position j."""
        buckets = position_buckets(L, not self.causal, self.num_buckets, self.max_distance, torch.device(device))
        return self.relative_bias[:, buckets].permute(0, 3, 1, 2)

    @torch.no_grad()
    def step(self, x: torch.Tensor, cache: DecodeCache | None, position: int) -> tuple[torch.Tensor, DecodeCache]:
        """Causal decoding one position at a time: x (S, R, 1, D) is the token at `position` of each
        row, cache the keys and values of positions 0..position-1 (a DecodeCache; None at position 0
        holds this one position). Returns its output (S, R, 1, D), as forward() gives at that position
        of the whole prefix, and the cache with this position's keys and values written into its
        slots. Evaluation only (no dropout, no gradient)."""
        if not self.causal:
            raise ValueError("step() decodes causally; this layer is bidirectional")
        S, R = x.shape[:2]
        N, H, E = S * R, self.num_heads, self.head_dim
        qkv = self.qkv(x).view(N, 3, H, E)
        cache = DecodeCache(position + 1, N) if cache is None else cache
        if cache.slots is None:
            cache.slots = torch.empty((cache.positions, cache.rows, 2, H, E), device=qkv.device, dtype=qkv.dtype)
        if position >= cache.positions or N > cache.rows:
            raise ValueError(f"position {position} with {N} rows does not fit a cache of {cache.positions} "
                             f"positions x {cache.rows} rows")
        earlier = cache.key_rows if position > 0 else torch.empty((N, 0), dtype=torch.long, device=qkv.device)
        if earlier is None or earlier.shape != (N, position):
            raise ValueError(f"the cache's rows at position {position} must be ({N}, {position}), got "
                             f"{None if earlier is None else tuple(earlier.shape)}")
        cache.slots[position, :N] = qkv[:, 1:]
        key_rows = torch.cat([earlier, torch.arange(N, device=qkv.device)[:, None]], dim=1)
        bias = None
        if self.relative_bias is not None:
            bias = self.position_bias(position + 1, x.device)[:, :, position:position + 1, :]
        # the one query is the last position: every cached key is visible, no causal mask needed
        y = short_attention_gathered_kv(qkv[:, None, 0], cache.slots[:position + 1].transpose(0, 1), key_rows,
                                        bias=bias, num_seeds=S, backend=self.backend)
        return self.out(y.view(S, R, 1, H * E)), DecodeCache(cache.positions, cache.rows, cache.slots, key_rows)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x, mask, unstacked = as_stacked(x, mask, self.num_seeds)
        S, B, L, _ = x.shape
        H, E = self.num_heads, self.head_dim
        qkv = self.qkv(x).view(S * B, L, 3, H, E)
        dropout_p = self.dropout if self.training else 0.0
        if self.relative_bias is None and mask is None:
            q, k, v = qkv.permute(2, 0, 3, 1, 4)                                   # (S*B, H, L, E) each
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=self.causal)
            y = y.transpose(1, 2)                                                  # (S*B, L, H, E)
        else:
            bias = self.position_bias(L, x.device) if self.relative_bias is not None else None
            y = short_attention_qkv(qkv, key_mask=None if mask is None else mask.reshape(S * B, L),
                                    causal=self.causal, bias=bias, num_seeds=S, dropout_p=dropout_p,
                                    backend=self.backend)
        y = self.out(y.reshape(S, B, L, H * E))
        if mask is not None:
            y = y * mask[..., None].to(y.dtype)
        return y[0] if unstacked else y


class GBLALayer(nn.Module):
    """Gated Bidirectional Linear Attention: our reading of the paper (not the authors' code).

        q, k, v = x W_q, x W_k, x W_v                         (H heads of E)
        if use_conv1d: q, k, v = SiLU(causal depthwise Conv1D(q, k, v))   (kernel conv_kernel_size;
                       padded positions are zeroed first, so padding never leaks)
        key_log_weight = gate "none":    absent
                         gate "token":   logsigmoid(x W_g + b_g), one scalar per token and head
                         gate "recency": sum_{t > j, t real} logsigmoid(x_t W_a + b_a)  (our extension:
                                         a cumulative forget gate anchored at the sequence end, so
                                         keys far from the most recent item weigh less)
        o = gbla_attention(q, k, v, key_log_weight, mask, z = x W_z, normalization)
        y = o W_out

    Plain kernelized linear attention = conv off, gate "none", normalization "none". Only the
    parameters a switch needs exist (conv weights, gate projection, z projection, norm weight).
    `backend` picks the kernels of gbla_attention / causal_conv1d_silu ("torch", "triton", "auto");
    it does not change the result beyond rounding. The seeds go through the attention op folded into
    its batch axis; the per-seed norm weight is applied to its output (the op's normalization is
    linear in it), and the conv takes the seeds stacked, each with its own filter (one launch).
    """

    def __init__(self, d_model: int, num_heads: int, head_dim: int, options: GBLAOptions = GBLAOptions(), *,
                 dropout: float = 0.0, backend: str = "auto", num_seeds: int = 1):
        super().__init__()
        self.num_seeds, self.num_heads, self.head_dim = num_seeds, num_heads, head_dim
        self.options, self.backend = options, backend
        inner = num_heads * head_dim
        self.qkv = SeedLinear(num_seeds, d_model, 3 * inner)
        self.out = SeedLinear(num_seeds, inner, d_model)
        self.dropout = nn.Dropout(dropout)
        if options.use_conv1d:
            K = options.conv_kernel_size
            # depthwise conv over the sequence, one filter per channel of q, k and v (nn.Conv1d's init)
            self.conv_weight = seed_parameter((num_seeds, 3 * inner, K), ("uniform", 1 / math.sqrt(K)))
            self.conv_bias = seed_parameter((num_seeds, 3 * inner), ("constant", 0.0))
        if options.gate != "none":
            # recency: start with a forget gate near 1 (logsigmoid(4) ~ -0.018 per token, so a key
            # 80 tokens back still weighs ~0.23) instead of halving every key per step
            self.gate = SeedLinear(num_seeds, d_model, num_heads, bias=True,
                                   bias_init=4.0 if options.gate == "recency" else 0.0)
        if options.normalization != "none":
            self.norm_weight = seed_parameter((num_seeds, head_dim), ("constant", 1.0))
        if options.normalization == "rmsnorm_gated":
            self.z_proj = SeedLinear(num_seeds, d_model, inner)

    def key_log_weight(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor | None:
        """(S, B, L, H) fp32 log key weights (or (B, L, H) for an unstacked x), None without a gate."""
        gate = self.options.gate
        if gate == "none":
            return None
        x, mask, unstacked = as_stacked(x, mask, self.num_seeds)
        log_gate = F.logsigmoid(self.gate(x).float())  # fp32: the recency sum accumulates
        if gate == "recency":
            # for key j, the sum of log forget gates of the real tokens after it
            if mask is not None:
                log_gate = log_gate * mask[..., None].to(log_gate.dtype)
            suffix_inclusive = log_gate.flip(2).cumsum(2).flip(2)
            log_gate = suffix_inclusive - log_gate
        return log_gate[0] if unstacked else log_gate

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x, mask, unstacked = as_stacked(x, mask, self.num_seeds)
        S, B, L, _ = x.shape
        H, E = self.num_heads, self.head_dim
        qkv = self.qkv(x)                                                        # (S, B, L, 3*H*E)
        if self.options.use_conv1d:  # every seed at once, each with its own filter
            qkv = causal_conv1d_silu(qkv, self.conv_weight, self.conv_bias, mask, backend=self.backend)
        q, k, v = qkv.view(S * B, L, 3, H, E).unbind(2)
        key_log_weight = self.key_log_weight(x, mask)
        if key_log_weight is not None:
            key_log_weight = key_log_weight.reshape(S * B, L, H)
        norm = self.options.normalization
        z = self.z_proj(x).view(S * B, L, H, E) if norm == "rmsnorm_gated" else None
        o = gbla_attention(q, k, v, key_log_weight=key_log_weight,
                           mask=None if mask is None else mask.reshape(S * B, L), z=z, norm_weight=None,
                           normalization=norm, backend=self.backend).view(S, B, L, H, E)
        if norm != "none":
            o = o * self.norm_weight.view(S, 1, 1, 1, E).to(o.dtype)
        # dropout on the mixed values, the analogue of SA's dropout on attention weights
        y = self.out(self.dropout(o.reshape(S, B, L, H * E)))
        if mask is not None:
            y = y * mask[..., None].to(y.dtype)
        return y[0] if unstacked else y
