"""One config object describes a run; its hash names the result and decides whether it is done.

A variant is a name plus an encoder layout plus GBLA switches (params/ablations.yaml); nothing in
code lists variants. Runtime choices that must not change results (device, kernel backend, paths,
progress bars) are deliberately *not* part of the config and so not of its hash.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

LAYER_TYPES = ("sa", "sa_causal", "gbla")
GATES = ("none", "token", "recency")
NORMALIZATIONS = ("none", "rmsnorm", "rmsnorm_gated")


@dataclass(frozen=True)
class GBLAOptions:
    """Switches of the GBLA layer (each one changes the computation; see gbla/layers.py)."""
    use_conv1d: bool = True
    conv_kernel_size: int = 4
    gate: str = "token"
    normalization: str = "rmsnorm_gated"

    def __post_init__(self):
        if self.gate not in GATES:
            raise ValueError(f"gbla.gate must be one of {GATES}, got {self.gate!r}")
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(f"gbla.normalization must be one of {NORMALIZATIONS}, got {self.normalization!r}")
        if self.conv_kernel_size < 1:
            raise ValueError(f"gbla.conv_kernel_size must be >= 1, got {self.conv_kernel_size}")


@dataclass(frozen=True)
class ModelConfig:
    """TIGER encoder-decoder, sized like GRID's TIGER by default."""
    encoder_layout: tuple[str, ...] = ("sa", "sa", "sa", "sa")
    gbla: GBLAOptions = field(default_factory=GBLAOptions)
    d_model: int = 128
    num_heads: int = 6
    head_dim: int = 64
    d_ff: int = 1024
    num_decoder_layers: int = 4
    dropout: float = 0.15
    num_user_buckets: int = 2000
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128

    def __post_init__(self):
        object.__setattr__(self, "encoder_layout", tuple(self.encoder_layout))
        if not self.encoder_layout:
            raise ValueError("encoder_layout must name at least one layer")
        bad = [t for t in self.encoder_layout if t not in LAYER_TYPES]
        if bad:
            raise ValueError(f"encoder_layout has unknown layer types {bad}; known: {LAYER_TYPES}")
        if isinstance(self.gbla, dict):
            object.__setattr__(self, "gbla", GBLAOptions(**self.gbla))


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and evaluation settings (GRID's TIGER recipe by default)."""
    lr: float = 1e-3
    weight_decay: float = 1e-4
    batch_size: int = 256
    max_epochs: int = 200
    patience: int = 10            # evaluations without a better validation Recall@10
    eval_every: int = 1           # epochs between validation evaluations
    beam_size: int = 20           # >= 10; top-10 distinct items are kept
    max_history: int = 20         # TIGER truncates histories to the last 20 items
    warmup_steps: int = 0
    label_smoothing: float = 0.0
    max_train_examples: int | None = None  # subsample for smoke runs; None = all
    # Training batches are drawn from one history-length bucket at a time (upper bounds in items;
    # max_history closes the last one), so each batch's encoder input is only as long as its
    # bucket (1 + 4 * bound tokens) instead of always 1 + 4 * max_history: on Beauty two thirds of
    # the fixed-length encoder input was padding (outputs/pilot/README.md). Examples are shuffled
    # within buckets and the batches shuffled across them every epoch. () = one bucket (off);
    # bounds at or above max_history have no effect.
    length_buckets: tuple[int, ...] = (3, 6, 10)

    def __post_init__(self):
        object.__setattr__(self, "length_buckets", tuple(int(b) for b in self.length_buckets))
        b = self.length_buckets
        if any(x < 1 for x in b) or list(b) != sorted(set(b)):
            raise ValueError(f"train.length_buckets must be increasing positive item counts, got {list(b)}")


@dataclass(frozen=True)
class RunConfig:
    dataset: str
    variant: str
    seed: int
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self):
        if isinstance(self.model, dict):
            object.__setattr__(self, "model", ModelConfig(**self.model))
        if isinstance(self.train, dict):
            object.__setattr__(self, "train", TrainConfig(**self.train))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["model"]["encoder_layout"] = list(self.model.encoder_layout)
        d["train"]["length_buckets"] = list(self.train.length_buckets)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown run-config fields {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)

    def config_hash(self) -> str:
        """12 hex digits of sha256 over the canonical JSON of the config."""
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:12]
