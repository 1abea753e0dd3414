"""The two token-mixing layers of the encoder: softmax self-attention and GBLA.

Both are the attention *sublayer* only (projections, mixing, output projection); the encoder block in
gbla/model.py adds the pre-norm residual and the FFN around them. Both take x (B, L, D) and a mask
(B, L) bool (True = real token, None = all real) and return (B, L, D) with zeros at padded positions.
Padding may sit on either side: outputs at real positions do not depend on how much there is.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from gbla.config import GBLAOptions
from gbla.ops import gbla_attention
from gbla.ops.conv import causal_conv1d_silu


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


class SelfAttentionLayer(nn.Module):
    """Multi-head softmax self-attention through torch SDPA, bidirectional or causal, with a T5-style
    learned relative position bias (one scalar per head and distance bucket; every layer has its own,
    unlike T5 which shares layer 0's: a few hundred extra parameters, and each layer may learn its
    own distance profile). Scores use SDPA's 1/sqrt(head_dim) scale (T5 folds it into the init).

    With relative_bias=False and mask=None no attn_mask is built, so SDPA may pick flash/cuDNN kernels.
    """

    def __init__(self, d_model: int, num_heads: int, head_dim: int, *, causal: bool = False,
                 relative_bias: bool = True, dropout: float = 0.0, relative_attention_num_buckets: int = 32,
                 relative_attention_max_distance: int = 128):
        super().__init__()
        self.num_heads, self.head_dim, self.causal, self.dropout = num_heads, head_dim, causal, dropout
        self.qkv = nn.Linear(d_model, 3 * num_heads * head_dim, bias=False)
        self.out = nn.Linear(num_heads * head_dim, d_model, bias=False)
        self.num_buckets = relative_attention_num_buckets
        self.max_distance = relative_attention_max_distance
        self.relative_bias = nn.Embedding(self.num_buckets, num_heads) if relative_bias else None

    def position_bias(self, L: int, device) -> torch.Tensor:
        """(H, L, L) additive bias, from query position i to key position j."""
        pos = torch.arange(L, device=device)
        buckets = relative_position_bucket(pos[None, :] - pos[:, None], bidirectional=not self.causal,
                                           num_buckets=self.num_buckets, max_distance=self.max_distance)
        return self.relative_bias(buckets).permute(2, 0, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        B, L, _ = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        dropout_p = self.dropout if self.training else 0.0
        if self.relative_bias is None and mask is None:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=self.causal)
        else:
            allowed = torch.ones(B, 1, L, L, dtype=torch.bool, device=x.device)
            if mask is not None:
                allowed = allowed & mask[:, None, None, :]
            if self.causal:
                allowed = allowed & torch.ones(L, L, dtype=torch.bool, device=x.device).tril()
            # a query with no key to look at (a padded position before any real token) would give
            # softmax(all -inf) = NaN; let it see everything instead; its output is zeroed below
            allowed = allowed | ~allowed.any(dim=-1, keepdim=True)
            bias = torch.zeros((), dtype=q.dtype, device=x.device)
            if self.relative_bias is not None:
                bias = self.position_bias(L, x.device).to(q.dtype)[None]
            attn_mask = torch.where(allowed, bias, torch.full((), float("-inf"), dtype=q.dtype, device=x.device))
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)
        y = self.out(y.transpose(1, 2).reshape(B, L, self.num_heads * self.head_dim))
        if mask is not None:
            y = y * mask[..., None].to(y.dtype)
        return y


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
    it does not change the result beyond rounding.
    """

    def __init__(self, d_model: int, num_heads: int, head_dim: int, options: GBLAOptions = GBLAOptions(), *,
                 dropout: float = 0.0, backend: str = "auto"):
        super().__init__()
        self.num_heads, self.head_dim, self.options, self.backend = num_heads, head_dim, options, backend
        inner = num_heads * head_dim
        self.qkv = nn.Linear(d_model, 3 * inner, bias=False)
        self.out = nn.Linear(inner, d_model, bias=False)
        self.dropout = nn.Dropout(dropout)
        if options.use_conv1d:
            K = options.conv_kernel_size
            # depthwise conv over the sequence, one filter per channel of q, k and v (nn.Conv1d's init)
            self.conv_weight = nn.Parameter(torch.empty(3 * inner, K).uniform_(-1 / math.sqrt(K), 1 / math.sqrt(K)))
            self.conv_bias = nn.Parameter(torch.zeros(3 * inner))
        if options.gate != "none":
            self.gate = nn.Linear(d_model, num_heads)
            # recency: start with a forget gate near 1 (logsigmoid(4) ~ -0.018 per token, so a key
            # 80 tokens back still weighs ~0.23) instead of halving every key per step
            nn.init.constant_(self.gate.bias, 4.0 if options.gate == "recency" else 0.0)
        if options.normalization != "none":
            self.norm_weight = nn.Parameter(torch.ones(head_dim))
        if options.normalization == "rmsnorm_gated":
            self.z_proj = nn.Linear(d_model, inner, bias=False)

    def key_log_weight(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor | None:
        gate = self.options.gate
        if gate == "none":
            return None
        log_gate = F.logsigmoid(self.gate(x).float())  # (B, L, H), fp32: the recency sum accumulates
        if gate == "token":
            return log_gate
        # recency: for key j, the sum of log forget gates of the real tokens after it
        if mask is not None:
            log_gate = log_gate * mask[..., None].to(log_gate.dtype)
        suffix_inclusive = log_gate.flip(1).cumsum(1).flip(1)
        return suffix_inclusive - log_gate

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        B, L, _ = x.shape
        H, E = self.num_heads, self.head_dim
        qkv = self.qkv(x)
        if self.options.use_conv1d:
            qkv = causal_conv1d_silu(qkv, self.conv_weight, self.conv_bias, mask, backend=self.backend)
        q, k, v = qkv.view(B, L, 3, H, E).unbind(2)
        key_log_weight = self.key_log_weight(x, mask)
        z = self.z_proj(x).view(B, L, H, E) if self.options.normalization == "rmsnorm_gated" else None
        norm_weight = self.norm_weight if self.options.normalization != "none" else None
        o = gbla_attention(q, k, v, key_log_weight=key_log_weight, mask=mask, z=z, norm_weight=norm_weight,
                           normalization=self.options.normalization, backend=self.backend)
        # dropout on the mixed values, the analogue of SA's dropout on attention weights
        y = self.out(self.dropout(o.reshape(B, L, H * E)))
        if mask is not None:
            y = y * mask[..., None].to(y.dtype)
        return y
