"""End to end on the synthetic dataset: learns the pattern (beats popularity), repeatable, contract fields."""
import numpy as np
import pytest
import torch

from gbla.config import ModelConfig, RunConfig, TrainConfig
from gbla.data.synthetic import make_synthetic_dataset
from gbla.evaluate import metrics_from_ranks
from gbla.train import RunResult, epoch_batches, length_bucket_groups, to_device_split, train_and_evaluate
from gbla.model import TIGER


def tiny_run(layout, seed=0, **train):
    model = ModelConfig(encoder_layout=layout, d_model=32, num_heads=2, head_dim=16, d_ff=64,
                        num_decoder_layers=1, dropout=0.0, num_user_buckets=16)
    train = {"batch_size": 64, "max_epochs": 6, "patience": 3, "eval_every": 2, "beam_size": 10,
             "max_history": 8, "lr": 3e-3, **train}
    return RunConfig("synthetic", "-".join(layout), seed, model=model, train=TrainConfig(**train))


def popularity_recall_at_10(data) -> float:
    """Recommend the 10 most frequent training targets to everyone."""
    counts = np.bincount(data.train.target, minlength=data.num_items)
    top10 = np.argsort(-counts, kind="stable")[:10]
    return float(np.isin(data.test.target, top10).mean())


@pytest.fixture(scope="module")
def data():
    return make_synthetic_dataset(num_users=400, num_items=60, seed=0)


@pytest.mark.slow
def test_hybrid_learns_the_pattern_and_beats_popularity(data):
    result = train_and_evaluate(tiny_run(("sa", "gbla")), data, device="cpu", backend="torch", progress=False,
                                log=lambda *_: None)
    popularity = popularity_recall_at_10(data)
    assert popularity < 0.3
    assert result.test_metrics["recall@10"] > popularity + 0.2, (result.test_metrics, popularity)
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]

    # contract fields
    assert isinstance(result, RunResult) and result.device == "cpu"
    assert result.config_hash == result.config.config_hash()
    evaluated = [h for h in result.history if "valid_recall@10" in h]
    assert [h["epoch"] for h in evaluated] == [2, 4, 6]
    best = max(evaluated, key=lambda h: h["valid_recall@10"])
    assert result.best_epoch == best["epoch"]
    assert result.valid_metrics == {k: best[f"valid_{k}"] for k in result.valid_metrics}
    per_user = result.test_per_user
    assert len(per_user["user"]) == data.num_users and np.array_equal(per_user["target"], data.test.target)
    assert per_user["rank"].min() >= 0 and per_user["rank"].max() <= 10
    assert metrics_from_ranks(per_user["rank"]) == result.test_metrics
    assert {"train_s", "eval_s", "test_eval_s", "examples_per_s"} <= set(result.timings)


def test_same_seed_same_result_different_seed_different(data):
    small = make_synthetic_dataset(num_users=120, num_items=30, seed=3)
    kw = dict(device="cpu", backend="torch", progress=False, log=lambda *_: None)
    cfg = tiny_run(("sa", "gbla"), max_epochs=2, eval_every=1, max_train_examples=300)
    a, b = train_and_evaluate(cfg, small, **kw), train_and_evaluate(cfg, small, **kw)
    assert a.history[-1]["train_loss"] == b.history[-1]["train_loss"]
    assert a.test_metrics == b.test_metrics and np.array_equal(a.test_per_user["rank"], b.test_per_user["rank"])
    c = train_and_evaluate(tiny_run(("sa", "gbla"), seed=1, max_epochs=2, eval_every=1, max_train_examples=300),
                           small, **kw)
    assert c.history[-1]["train_loss"] != a.history[-1]["train_loss"]


def test_early_stopping_stops_after_patience_evaluations():
    """lr = 0: nothing improves after the first evaluation, so training stops after 1 + patience evals."""
    small = make_synthetic_dataset(num_users=60, num_items=30, seed=4)
    result = train_and_evaluate(tiny_run(("sa",), lr=0.0, max_epochs=50, patience=2, eval_every=1), small,
                                device="cpu", backend="torch", progress=False, log=lambda *_: None)
    assert result.epochs_trained == 3 and result.best_epoch == 1


def test_time_limit_stops_after_the_first_evaluation():
    small = make_synthetic_dataset(num_users=60, num_items=30, seed=4)
    result = train_and_evaluate(tiny_run(("sa",), max_epochs=50, eval_every=1), small, device="cpu",
                                backend="torch", progress=False, log=lambda *_: None, time_limit_s=0.0)
    assert result.epochs_trained == 1 and result.timings["stopped_by_time_limit"] == 1.0


def test_truncating_history_keeps_the_most_recent_items(data):
    model = TIGER(tiny_run(("sa",)).model, data.codebook_sizes, backend="torch")
    sids = torch.as_tensor(data.sids)
    split = to_device_split(data.train, model, sids, 3, "cpu")
    for i in [0, 5, 50, len(data.train) - 1]:
        n = data.train.history_len[i]
        recent = data.train.history[i, max(0, n - 3):n]
        tokens = split.enc_tokens[i, 1:].view(3, 4)
        expected = model.vocab.digit_tokens(sids[torch.as_tensor(recent)])
        assert torch.equal(tokens[:len(recent)], expected)
        assert (tokens[len(recent):] == 0).all()


def test_bad_config_is_refused(data):
    with pytest.raises(ValueError, match="beam_size"):
        train_and_evaluate(tiny_run(("sa",), beam_size=5), data, device="cpu", progress=False)


def _tokens_with_history_lengths(lengths, max_history):
    """Right-padded encoder tokens: a user token, then 4 digit tokens per history item."""
    tokens = torch.zeros(len(lengths), 1 + 4 * max_history, dtype=torch.long)
    for i, n in enumerate(lengths):
        tokens[i, :1 + 4 * n] = 7
    return tokens


def test_length_buckets_cover_every_example_and_cut_only_padding():
    lengths = [1] * 30 + [2] * 5 + [3] * 40 + [5] * 33 + [8] * 12
    tokens = _tokens_with_history_lengths(lengths, 8)
    groups = length_bucket_groups(tokens, (1, 2, 4, 6), 8, batch_size=10)
    # the 5 examples of length 2 are too few for a batch: merged into the <= 4 bucket
    assert [enc_len for enc_len, _ in groups] == [1 + 4 * 1, 1 + 4 * 4, 1 + 4 * 6, 1 + 4 * 8]
    assert [len(idx) for _, idx in groups] == [30, 45, 33, 12]
    all_idx = torch.cat([idx for _, idx in groups])
    assert sorted(all_idx.tolist()) == list(range(len(lengths)))
    for enc_len, idx in groups:  # cutting at enc_len drops no real token
        assert (tokens[idx, enc_len:] == 0).all()
    # too few long examples: the last bucket merges into the one before it
    groups = length_bucket_groups(_tokens_with_history_lengths([1] * 20 + [8] * 3, 8), (2,), 8, batch_size=10)
    assert [(e, len(i)) for e, i in groups] == [(33, 23)]
    # () = one bucket at the full length; bounds at or above max_history change nothing
    for bounds in ((), (8, 20)):
        groups = length_bucket_groups(tokens, bounds, 8, batch_size=10)
        assert [(e, len(i)) for e, i in groups] == [(33, len(lengths))]


def test_epoch_batches_are_full_single_bucket_and_reshuffled():
    tokens = _tokens_with_history_lengths([1] * 35 + [3] * 47, 4)
    groups = length_bucket_groups(tokens, (1, 2), 4, batch_size=8)
    gens = [torch.Generator().manual_seed(s) for s in (0, 1)]
    order = torch.Generator().manual_seed(9)
    first, second = epoch_batches(groups, 8, gens, order), epoch_batches(groups, 8, gens, order)
    assert len(first) == 35 // 8 + 47 // 8
    members = {enc_len: set(idx.tolist()) for enc_len, idx in groups}
    for enc_len, idx in first:
        assert idx.shape == (2, 8)   # one batch per seed, from the same bucket
        for row in idx.tolist():
            assert len(set(row)) == 8 and set(row) <= members[enc_len]
    assert not torch.equal(first[0][1][0], first[0][1][1])   # seeds draw their own examples
    assert [(e, i.tolist()) for e, i in first] != [(e, i.tolist()) for e, i in second]
    again = epoch_batches(groups, 8, [torch.Generator().manual_seed(s) for s in (0, 1)],
                          torch.Generator().manual_seed(9))
    assert [(e, i.tolist()) for e, i in again] == [(e, i.tolist()) for e, i in first]
    # a seed's batches do not depend on which other seeds are drawn beside it
    alone = epoch_batches(groups, 8, [torch.Generator().manual_seed(1)], torch.Generator().manual_seed(9))
    assert [(e, i[0].tolist()) for e, i in alone] == [(e, i[1].tolist()) for e, i in first]


@pytest.mark.slow
def test_bucketed_training_matches_one_bucket_in_quality(data):
    """Buckets change only which examples share a batch, not what the model learns."""
    kw = dict(device="cpu", backend="torch", progress=False, log=lambda *_: None)
    bucketed = train_and_evaluate(tiny_run(("sa", "gbla"), length_buckets=(2, 4)), data, **kw)
    single = train_and_evaluate(tiny_run(("sa", "gbla"), length_buckets=()), data, **kw)
    assert bucketed.timings["encoder_real_token_fraction"] > single.timings["encoder_real_token_fraction"]
    popularity = popularity_recall_at_10(data)
    for result in (bucketed, single):
        assert result.test_metrics["recall@10"] > popularity + 0.2, (result.test_metrics, popularity)


def test_bad_length_buckets_are_refused_and_round_trip():
    for bad in ((5, 3), (0, 4), (3, 3)):
        with pytest.raises(ValueError, match="length_buckets"):
            TrainConfig(length_buckets=bad)
    cfg = RunConfig("beauty", "sa", 0, train=TrainConfig(length_buckets=[2, 5]))
    assert cfg.train.length_buckets == (2, 5)
    assert RunConfig.from_dict(cfg.to_dict()).config_hash() == cfg.config_hash()
