"""TrainConfig.warmup_steps and label_smoothing on the eager training step (TrainStep).

What is tested: the eager path (CPU). Not tested here: the CUDA-graph step modes ("cuda_graph",
"compile_cuda_graph"), where the warm-up learning rate is a device tensor that the captured AdamW
step reads and label smoothing is baked into the captured loss; they need a GPU, and the grid's
params use neither option (both 0).
"""
import pytest
import torch

from gbla.config import ModelConfig, TrainConfig
from gbla.data.synthetic import make_synthetic_dataset
from gbla.model import TIGER
from gbla.train import TrainStep, to_device_split


@pytest.fixture(scope="module")
def data():
    return make_synthetic_dataset(num_users=60, num_items=20, seed=0)


def make_step(data, **train):
    cfg = ModelConfig(encoder_layout=("sa", "gbla"), d_model=32, num_heads=2, head_dim=16, d_ff=64,
                      num_decoder_layers=1, dropout=0.0, num_user_buckets=16)
    tc = TrainConfig(batch_size=8, max_history=8, lr=1e-2, **train)
    torch.manual_seed(0)
    model = TIGER(cfg, data.codebook_sizes, backend="torch")
    split = to_device_split(data.train, model, torch.as_tensor(data.sids), tc.max_history, "cpu")
    return model, split, TrainStep(model, split, tc, "eager", use_autocast=False)


def test_warmup_ramps_the_learning_rate_linearly_then_holds(data):
    _, _, step = make_step(data, warmup_steps=4)
    idx = torch.arange(8)[None]
    seen = []
    for _ in range(6):
        step(idx)
        seen.append(step.optimizer.param_groups[0]["lr"])
    assert seen == pytest.approx([1e-2 * k / 4 for k in (1, 2, 3, 4)] + [1e-2, 1e-2])


def test_no_warmup_keeps_the_configured_learning_rate(data):
    _, _, step = make_step(data)
    step(torch.arange(8)[None])
    assert step.optimizer.param_groups[0]["lr"] == 1e-2


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_label_smoothing_reaches_the_loss(data, smoothing):
    """The step's returned loss is the model's loss with the configured smoothing, at the weights
    before the update (dropout 0, so the forward is deterministic)."""
    model, split, step = make_step(data, label_smoothing=smoothing)
    idx = torch.arange(8)[None]
    with torch.no_grad():
        expected = model.loss(split.enc_tokens[idx], split.target_sids[idx], smoothing)
        unsmoothed = model.loss(split.enc_tokens[idx], split.target_sids[idx], 0.0)
    got = step(idx)
    torch.testing.assert_close(got, expected)
    assert (smoothing == 0.0) == bool(torch.allclose(got, unsmoothed))
