"""The package's fused ops, laid out one folder per op, each with its plain-PyTorch reference
(naive.py), its Triton kernels (triton.py) and its dispatch (__init__.py):

    gbla/   bidirectional gated linear attention (the GBLA core)
    conv/   causal depthwise Conv1D + SiLU (GBLA's short-range mixing)
    norm/   RMSNorm with a weight per seed (every block's pre-norms and the final norms)
    dropout/  dropout fused with its neighbour: ReLU + dropout (the FFNs), dropout + residual add
    attention/  softmax attention over short sequences (Lq, Lk <= 128; the SA layers and
            cross-attention): bias, key padding, causal, dropout, strided or packed q/k/v

backend.py chooses between reference and kernels ("auto": Triton on CUDA tensors); utils.py holds
the Triton helpers the kernels share.
"""
from gbla.ops.dropout import dropout_add, dropout_add_reference, relu_dropout, relu_dropout_reference
from gbla.ops.attention import (short_attention, short_attention_gathered_kv, short_attention_q_kv, short_attention_qkv,
                                short_attention_reference)
from gbla.ops.backend import BACKENDS
from gbla.ops.conv import causal_conv1d_silu
from gbla.ops.gbla import NORMALIZATIONS, feature_map, gbla_attention, gbla_attention_reference
from gbla.ops.norm import seed_rms_norm, seed_rms_norm_reference

__all__ = ["gbla_attention", "gbla_attention_reference", "causal_conv1d_silu", "feature_map", "NORMALIZATIONS",
           "short_attention", "short_attention_qkv", "short_attention_q_kv", "short_attention_gathered_kv",
           "short_attention_reference",
           "seed_rms_norm", "seed_rms_norm_reference", "relu_dropout", "relu_dropout_reference",
           "dropout_add", "dropout_add_reference", "BACKENDS"]
