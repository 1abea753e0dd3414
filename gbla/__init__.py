"""gbla-workbench: ablations of Gated Bidirectional Linear Attention in TIGER-style generative retrieval."""
from gbla.config import GBLAOptions, ModelConfig, RunConfig, TrainConfig
from gbla.ops import gbla_attention

__all__ = ["gbla_attention", "GBLAOptions", "ModelConfig", "TrainConfig", "RunConfig"]
__version__ = "0.1.0"
