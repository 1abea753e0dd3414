"""TIGER: an encoder-decoder over semantic-ID tokens (Rajput et al., 2023), sized like GRID's TIGER.

Encoder input:  [user bucket] [SID digits of history item 1 (4 tokens)] ... [item n], right-padded
                (a mask marks the real tokens; training batches are cut to their length bucket,
                evaluation batches after their last real token).
Decoder input:  [BOS] d0 d1 d2  ->  predicts d0 d1 d2 d3 of the next item, each digit from its own
                codebook's slice of the output vocabulary.
Encoder blocks follow ModelConfig.encoder_layout: "sa" (bidirectional softmax attention), "sa_causal"
(causal softmax attention) or "gbla" (gbla/layers.py). The decoder uses causal self-attention and
cross-attention. Pre-norm residual blocks with RMSNorm, ReLU FFN, no absolute positions (T5): SA
layers carry relative position biases, GBLA layers see order only through their causal conv.

One TIGER object holds `num_seeds` independent models (gbla/layers.py says why): every weight has a
leading seed axis and every activation is (S, B, ...). Token inputs are (S, B, L), one batch per
seed, or (B, L), the same batch for every seed (evaluation). `init_seeds(seeds)` draws each seed's
weights from its seed number alone. num_seeds = 1 is one ordinary model.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from gbla.config import ModelConfig
from gbla.layers import (DecodeCache, GBLALayer, SeedEmbedding, SeedLinear, SeedRMSNorm, SelfAttentionLayer,
                         init_seed_slice)
from gbla.ops import dropout_add, relu_dropout, short_attention_q_kv

PAD, BOS = 0, 1


class SIDVocab:
    """One token vocabulary for both sides: PAD, BOS, user buckets, then each SID level's digits."""

    def __init__(self, codebook_sizes, num_user_buckets: int):
        self.codebook_sizes = tuple(int(c) for c in codebook_sizes)
        self.num_user_buckets = num_user_buckets
        self.user_offset = 2
        self.digit_offset = 2 + num_user_buckets  # first digit token
        starts = [0]
        for c in self.codebook_sizes[:-1]:
            starts.append(starts[-1] + c)
        self.level_starts = tuple(starts)          # start of each level inside the digit vocabulary
        self.num_digit_tokens = sum(self.codebook_sizes)
        self.size = self.digit_offset + self.num_digit_tokens

    def user_bucket(self, user: torch.Tensor) -> torch.Tensor:
        """Hash user indices into buckets (Knuth's multiplicative hash; TIGER's hashing trick)."""
        return (user.long() * 2654435761) % (2 ** 32) % self.num_user_buckets

    def digit_tokens(self, sids: torch.Tensor) -> torch.Tensor:
        """(..., 4) digits -> (..., 4) token ids."""
        # python-int offsets, no tensor built from a list: no host-to-device copy (CUDA-graph safe)
        return torch.stack([sids[..., level] + (start + self.digit_offset)
                            for level, start in enumerate(self.level_starts)], dim=-1)

    def encoder_tokens(self, user: torch.Tensor, history: torch.Tensor, item_sids: torch.Tensor) -> torch.Tensor:
        """user (n,), history (n, Hmax) item indices (-1 = pad), item_sids (num_items, 4) ->
        (n, 1 + 4 * Hmax) token ids, PAD where there is no item."""
        n, hmax = history.shape
        real = history >= 0
        tokens = self.digit_tokens(item_sids[history.clamp(min=0)])          # (n, Hmax, 4)
        tokens = torch.where(real[..., None], tokens, torch.full_like(tokens, PAD)).reshape(n, hmax * 4)
        return torch.cat([self.user_bucket(user)[:, None] + self.user_offset, tokens], dim=1)

    def level_mask(self, device) -> torch.Tensor:
        """(4, num_digit_tokens) additive mask: 0 inside each level's slice, -inf elsewhere."""
        mask = torch.full((len(self.codebook_sizes), self.num_digit_tokens), float("-inf"), device=device)
        for level, (start, size) in enumerate(zip(self.level_starts, self.codebook_sizes)):
            mask[level, start:start + size] = 0.0
        return mask


class FeedForward(nn.Module):
    """up, ReLU, dropout, down. `backend` picks relu_dropout's kernels (gbla.ops.dropout: on the
    kernels the widest activation of the model takes one pass each way instead of four)."""

    def __init__(self, d_model: int, d_ff: int, dropout: float, num_seeds: int, backend: str = "auto"):
        super().__init__()
        self.up, self.down = SeedLinear(num_seeds, d_model, d_ff), SeedLinear(num_seeds, d_ff, d_model)
        self.dropout_p, self.backend = dropout, backend

    def forward(self, x):
        return self.down(relu_dropout(self.up(x), self.dropout_p, self.training, backend=self.backend))


def _self_attention(cfg: ModelConfig, num_seeds: int, causal: bool, backend: str) -> SelfAttentionLayer:
    return SelfAttentionLayer(cfg.d_model, cfg.num_heads, cfg.head_dim, causal=causal, dropout=cfg.dropout,
                              relative_attention_num_buckets=cfg.relative_attention_num_buckets,
                              relative_attention_max_distance=cfg.relative_attention_max_distance,
                              num_seeds=num_seeds, backend=backend)


class EncoderBlock(nn.Module):
    """Pre-norm residual block around one mixing layer (SA or GBLA) and an FFN. `backend` picks the
    GBLA layer's kernels, `attention_backend` the SA layer's (None: `backend`)."""

    def __init__(self, layer_type: str, cfg: ModelConfig, backend: str, num_seeds: int = 1,
                 attention_backend: str | None = None):
        super().__init__()
        if layer_type == "gbla":
            self.mix = GBLALayer(cfg.d_model, cfg.num_heads, cfg.head_dim, cfg.gbla, dropout=cfg.dropout,
                                 backend=backend, num_seeds=num_seeds)
        else:
            self.mix = _self_attention(cfg, num_seeds, causal=layer_type == "sa_causal",
                                       backend=backend if attention_backend is None else attention_backend)
        self.norm1, self.norm2 = (SeedRMSNorm(num_seeds, cfg.d_model, backend) for _ in range(2))
        self.ffn = FeedForward(cfg.d_model, cfg.d_ff, cfg.dropout, num_seeds, backend)
        self.dropout_p, self.residual_backend = cfg.dropout, backend

    def _add(self, x, h):
        # x + dropout(sublayer): one pass each way on the kernels (gbla.ops.dropout_add)
        return dropout_add(x, h, self.dropout_p, self.training, backend=self.residual_backend)

    def forward(self, x, mask):
        x = self._add(x, self.mix(self.norm1(x), mask))
        return self._add(x, self.ffn(self.norm2(x)))


class CrossAttention(nn.Module):
    """Decoder-to-encoder attention. The memory's keys/values are computed once per encoder row; the
    queries of all `beam` decoder rows that share an encoder row attend to it together (queries are
    independent in cross-attention), so beam search never copies the memory. A handful of queries
    over <= 81 keys: gbla.ops.short_attention (the fused SDPA kernels cost far more at this size,
    18% of a training step in a profile), as short_attention_q_kv on q (S*B, Lq, H, E) and the packed
    key/value projection (S*B, L, 2, H, E), whose gradient the kernels write in one buffer."""

    def __init__(self, cfg: ModelConfig, num_seeds: int, backend: str = "auto"):
        super().__init__()
        self.H, self.E, self.dropout, self.backend = cfg.num_heads, cfg.head_dim, cfg.dropout, backend
        self.q = SeedLinear(num_seeds, cfg.d_model, self.H * self.E)
        self.kv = SeedLinear(num_seeds, cfg.d_model, 2 * self.H * self.E)
        self.out = SeedLinear(num_seeds, self.H * self.E, cfg.d_model)

    def memory_kv(self, memory):
        """The memory's keys and values, packed as the projection gives them: (S*B, L, 2, H, E)."""
        S, B, L, _ = memory.shape
        return self.kv(memory).view(S * B, L, 2, self.H, self.E)

    def forward(self, x, kv, memory_mask):
        S, B, L = memory_mask.shape
        _, Bb, t, _ = x.shape                                # Bb = B * beam
        q = self.q(x).view(S * B, (Bb // B) * t, self.H, self.E)
        y = short_attention_q_kv(q, kv, key_mask=memory_mask.reshape(S * B, L), num_seeds=S,
                                 dropout_p=self.dropout if self.training else 0.0, backend=self.backend)
        return self.out(y.view(S, Bb, t, self.H * self.E))


class DecoderBlock(nn.Module):
    """`backend` picks the attention's kernels, `norm_backend` those of the norms, the FFN and the
    residual dropout-adds (None: `backend`)."""

    def __init__(self, cfg: ModelConfig, num_seeds: int = 1, backend: str = "auto",
                 norm_backend: str | None = None):
        super().__init__()
        norm_backend = backend if norm_backend is None else norm_backend
        self.self_attn = _self_attention(cfg, num_seeds, causal=True, backend=backend)
        self.cross_attn = CrossAttention(cfg, num_seeds, backend)
        self.ffn = FeedForward(cfg.d_model, cfg.d_ff, cfg.dropout, num_seeds, norm_backend)
        self.norm1, self.norm2, self.norm3 = (SeedRMSNorm(num_seeds, cfg.d_model, norm_backend) for _ in range(3))
        self.dropout_p, self.residual_backend = cfg.dropout, norm_backend

    def _add(self, x, h):
        return dropout_add(x, h, self.dropout_p, self.training, backend=self.residual_backend)

    def forward(self, x, kv, memory_mask):
        x = self._add(x, self.self_attn(self.norm1(x)))
        x = self._add(x, self.cross_attn(self.norm2(x), kv, memory_mask))
        return self._add(x, self.ffn(self.norm3(x)))

    def step(self, x, kv, memory_mask, cache, position: int):
        """One decoding position (x (S, R, 1, D)) with the self-attention cache of the earlier ones."""
        h, cache = self.self_attn.step(self.norm1(x), cache, position)
        x = self._add(x, h)
        x = self._add(x, self.cross_attn(self.norm2(x), kv, memory_mask))
        return self._add(x, self.ffn(self.norm3(x))), cache


class TIGER(nn.Module):
    """`backend` picks the kernels of every op ("auto", "torch", "triton"; gbla.ops.backend);
    `attention_backend` those of the softmax attention alone (SA layers, decoder self- and
    cross-attention; None: `backend`), so a benchmark can time both attention paths side by side."""

    def __init__(self, cfg: ModelConfig, codebook_sizes, *, backend: str = "auto", num_seeds: int = 1,
                 attention_backend: str | None = None):
        super().__init__()
        if num_seeds < 1:
            raise ValueError(f"num_seeds must be >= 1, got {num_seeds}")
        self.cfg, self.num_seeds = cfg, num_seeds
        attention_backend = backend if attention_backend is None else attention_backend
        self.vocab = SIDVocab(codebook_sizes, cfg.num_user_buckets)
        self.embed = SeedEmbedding(num_seeds, self.vocab.size, cfg.d_model)
        self.encoder = nn.ModuleList(EncoderBlock(t, cfg, backend, num_seeds, attention_backend)
                                     for t in cfg.encoder_layout)
        self.encoder_norm = SeedRMSNorm(num_seeds, cfg.d_model, backend)
        self.decoder = nn.ModuleList(DecoderBlock(cfg, num_seeds, attention_backend, norm_backend=backend)
                                     for _ in range(cfg.num_decoder_layers))
        self.decoder_norm = SeedRMSNorm(num_seeds, cfg.d_model, backend)
        self.head = SeedLinear(num_seeds, cfg.d_model, self.vocab.num_digit_tokens)
        self.dropout = nn.Dropout(cfg.dropout)
        self.register_buffer("level_mask", self.vocab.level_mask("cpu"), persistent=False)

    def init_seeds(self, seeds) -> "TIGER":
        """Draw seed slot i's weights from seeds[i] alone (independent of the other slots)."""
        seeds = list(seeds)
        if len(seeds) != self.num_seeds:
            raise ValueError(f"{len(seeds)} seeds given for a model of {self.num_seeds}")
        for i, seed in enumerate(seeds):
            init_seed_slice(self, i, seed)
        return self

    @torch.no_grad()
    def keep_seed_slots(self, slots) -> "TIGER":
        """Keep only the seed slots `slots` (in that order): every weight is sliced along its seed
        axis, so later steps compute nothing for the seeds dropped (a group drops seeds that have
        stopped early). The kept seeds' weights are unchanged."""
        slots = list(slots)
        index = torch.as_tensor(slots, dtype=torch.long, device=self.level_mask.device)
        for p in self.parameters():
            p.data = p.data.index_select(0, index.to(p.device)).clone()
            p.grad = None  # of the old shape; the next step makes new ones
        for module in self.modules():
            if hasattr(module, "num_seeds"):
                module.num_seeds = len(slots)
        return self

    def _per_seed(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, ...) tokens shared by every seed -> (S, B, ...); (S, B, ...) stays."""
        return tokens.expand(self.num_seeds, *tokens.shape) if tokens.dim() == 2 else tokens

    def encode(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens (S, B, L) or (B, L) -> memory (S, B, L, D) and its mask (S, B, L)."""
        tokens = self._per_seed(tokens)
        mask = tokens != PAD
        x = self.dropout(self.embed(tokens))
        for block in self.encoder:
            x = block(x, mask)
        memory = self.encoder_norm(x)  # bf16 under autocast on the kernels: the keys/values' linear casts it anyway
        return memory * mask[..., None].to(memory.dtype), mask

    def memory_kv(self, memory):
        return [block.cross_attn.memory_kv(memory) for block in self.decoder]

    def decode(self, dec_tokens: torch.Tensor, kvs, memory_mask) -> torch.Tensor:
        """dec_tokens (S, B * beam, t) -> logits over the digit vocabulary (S, B * beam, t, V), each
        position restricted to its SID level's slice (-inf elsewhere)."""
        x = self.dropout(self.embed(dec_tokens))
        for block, kv in zip(self.decoder, kvs):
            x = block(x, kv, memory_mask)
        logits = self.head(self.decoder_norm(x)).float()
        return logits + self.level_mask[: dec_tokens.shape[-1]]

    def decode_caches(self, positions: int, rows: int) -> list:
        """Empty self-attention caches for decode_step, one per decoder block, for up to `positions`
        positions of up to `rows` rows (S * users * beams)."""
        return [DecodeCache(positions, rows) for _ in self.decoder]

    def decode_step(self, tokens: torch.Tensor, kvs, memory_mask, caches, position: int):
        """Incremental decode(): tokens (S, R, 1) are each row's token at `position`, caches the
        decoder blocks' self-attention caches of the earlier positions (decode_caches() at 0, or
        [None] * blocks for a single step; DecodeCache.follow when the rows are re-ranked).
        Returns the logits for the next digit (S, R, V), as decode() gives at that position of the
        whole prefix, and the extended caches. Beam search decodes this way: each level computes one
        token per beam instead of the whole prefix again."""
        x = self.dropout(self.embed(tokens))
        new_caches = []
        for block, kv, cache in zip(self.decoder, kvs, caches):
            x, cache = block.step(x, kv, memory_mask, cache, position)
            new_caches.append(cache)
        logits = self.head(self.decoder_norm(x)).float()[:, :, 0]
        return logits + self.level_mask[position], new_caches

    def forward(self, enc_tokens: torch.Tensor, target_sids: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits (S, B, 4, V) for the target SIDs (S, B, 4) (or (B, 4) shared)."""
        memory, mask = self.encode(enc_tokens)
        target_tokens = self.vocab.digit_tokens(self._per_seed_targets(target_sids))
        bos = torch.full_like(target_tokens[..., :1], BOS)
        return self.decode(torch.cat([bos, target_tokens[..., :-1]], dim=-1), self.memory_kv(memory), mask)

    def _per_seed_targets(self, target_sids: torch.Tensor) -> torch.Tensor:
        return target_sids.expand(self.num_seeds, *target_sids.shape) if target_sids.dim() == 2 else target_sids

    def loss(self, enc_tokens, target_sids, label_smoothing: float = 0.0) -> torch.Tensor:
        """Per-seed mean cross-entropy over the 4 target digits, each over its own level's codebook:
        (S,). Their sum is the training objective: each seed's gradient is its own loss's."""
        logits = self(enc_tokens, target_sids)
        target_sids = self._per_seed_targets(target_sids)
        S, B = target_sids.shape[:2]
        losses = [F.cross_entropy(logits[:, :, level, start:start + size].reshape(S * B, size),
                                  target_sids[:, :, level].reshape(S * B), label_smoothing=label_smoothing,
                                  reduction="none").view(S, B).mean(dim=1)
                  for level, (start, size) in enumerate(zip(self.vocab.level_starts, self.vocab.codebook_sizes))]
        return torch.stack(losses, dim=1).mean(dim=1)
