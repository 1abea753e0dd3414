"""Several seeds in one process: each seed is exactly the model it would be alone.

Stacked training (K seeds in one TIGER) against separate models on the same per-seed data order
(fp32, dropout off): the same losses and the same updated weights; a seed's initial weights and data
order do not depend on its group; checkpoints resume to the uninterrupted result."""

import numpy as np
import pytest
import torch

from gbla.config import GBLAOptions, ModelConfig, RunConfig, TrainConfig
from gbla.data.synthetic import make_synthetic_dataset
from gbla.evaluate import SIDTrie, rank_targets
from gbla.model import TIGER
from gbla.train import (BUCKET_ORDER_SEED, TrainStep, epoch_batches, length_bucket_groups, to_device_split,
                        train_group)

LAYOUT = ("sa", "gbla", "sa_causal")


def tiny(seed, dropout=0.0, **train):
    model = ModelConfig(encoder_layout=LAYOUT, gbla=GBLAOptions(gate="recency"), d_model=16, num_heads=2,
                        head_dim=8, d_ff=32, num_decoder_layers=1, dropout=dropout, num_user_buckets=16)
    train = {"batch_size": 32, "max_epochs": 3, "patience": 2, "eval_every": 1, "beam_size": 10,
             "max_history": 8, "lr": 3e-3, **train}
    return RunConfig("synthetic", "tiny", seed, model=model, train=TrainConfig(**train))


@pytest.fixture(scope="module")
def data():
    return make_synthetic_dataset(num_users=120, num_items=30, seed=4)


def test_a_seeds_initial_weights_do_not_depend_on_its_group(data):
    cfg = tiny(0).model
    group = TIGER(cfg, data.codebook_sizes, backend="torch", num_seeds=3).init_seeds([7, 3, 5])
    alone = TIGER(cfg, data.codebook_sizes, backend="torch", num_seeds=1).init_seeds([3])
    other = TIGER(cfg, data.codebook_sizes, backend="torch", num_seeds=2).init_seeds([3, 9])
    for (name, p), q, r in zip(group.named_parameters(), alone.parameters(), other.parameters()):
        assert torch.equal(p[1], q[0]) and torch.equal(p[1], r[0]), name
    assert not torch.equal(group.head.weight[0], group.head.weight[1])   # other seeds, other weights


def _steps(model, data, seeds, n_steps):
    """n_steps eager fp32 steps of `model` on each seed's own batches; returns losses (n_steps, S)."""
    tc = tiny(0).train
    sids = torch.as_tensor(data.sids)
    train = to_device_split(data.train, model, sids, tc.max_history, "cpu")
    step = TrainStep(model, train, tc, "eager", use_autocast=False)
    groups = length_bucket_groups(train.enc_tokens, tc.length_buckets, tc.max_history, tc.batch_size)
    batches = epoch_batches(groups, tc.batch_size, [torch.Generator().manual_seed(s) for s in seeds],
                            torch.Generator().manual_seed(BUCKET_ORDER_SEED))
    return torch.stack([step(idx, enc_len) for enc_len, idx in batches[:n_steps]])


def test_stacked_training_equals_separate_models(data):
    cfg = tiny(0).model
    torch.manual_seed(0)
    stacked = TIGER(cfg, data.codebook_sizes, backend="torch", num_seeds=2).init_seeds([0, 1])
    losses = _steps(stacked, data, [0, 1], 4)
    for i, seed in enumerate([0, 1]):
        alone = TIGER(cfg, data.codebook_sizes, backend="torch").init_seeds([seed])
        losses_alone = _steps(alone, data, [seed], 4)
        torch.testing.assert_close(losses[:, i], losses_alone[:, 0], rtol=1e-5, atol=1e-6)
        for (name, p), q in zip(stacked.named_parameters(), alone.parameters()):
            torch.testing.assert_close(p.detach()[i], q.detach()[0], rtol=1e-4, atol=1e-6, msg=name)
    assert not torch.allclose(losses[:, 0], losses[:, 1])


def test_stacked_evaluation_equals_separate_models(data):
    cfg = tiny(0).model
    stacked = TIGER(cfg, data.codebook_sizes, backend="torch", num_seeds=2).init_seeds([2, 6]).eval()
    with torch.no_grad():
        stacked.head.weight.mul_(30)   # sharper distributions than the init, so ranks differ
    sids = torch.as_tensor(data.sids)
    test = to_device_split(data.test, stacked, sids, 8, "cpu")
    trie = SIDTrie(data.sids, data.codebook_sizes)
    ranks = rank_targets(stacked, test.enc_tokens, test.target, trie, beam_size=12, batch_size=50)
    assert ranks.shape == (2, len(test))
    for i, seed in enumerate([2, 6]):
        alone = TIGER(cfg, data.codebook_sizes, backend="torch").init_seeds([seed]).eval()
        with torch.no_grad():
            alone.head.weight.mul_(30)
        assert torch.equal(ranks[i], rank_targets(alone, test.enc_tokens, test.target, trie, beam_size=12,
                                                  batch_size=50)[0])
    assert not torch.equal(ranks[0], ranks[1])


def test_group_results_equal_single_runs_without_dropout(data):
    kw = dict(device="cpu", backend="torch", progress=False, log=lambda *_: None)
    group = train_group([tiny(0), tiny(1)], data, **kw)
    assert group.finished and [r.config.seed for r in group.results] == [0, 1]
    for result in group.results:
        alone = train_group([result.config], data, **kw).results[0]
        assert [h["epoch"] for h in result.history] == [h["epoch"] for h in alone.history]
        # fp32 rounding differs between a batched and a single matmul and grows over ~100 steps
        np.testing.assert_allclose([h["train_loss"] for h in result.history],
                                   [h["train_loss"] for h in alone.history], rtol=1e-4)
        assert result.best_epoch == alone.best_epoch
        same = np.mean(result.test_per_user["rank"] == alone.test_per_user["rank"])
        assert same >= 0.95, same
        assert result.timings["group_seeds"] == 2 and alone.timings["group_seeds"] == 1


def test_group_refuses_mixed_configs(data):
    with pytest.raises(ValueError, match="more than its seed"):
        train_group([tiny(0), tiny(1, lr=1e-2)], data, device="cpu")
    with pytest.raises(ValueError, match="distinct"):
        train_group([tiny(0), tiny(0)], data, device="cpu")


def test_each_seed_stops_on_its_own(data):
    """Early stopping per seed: with lr 0 no seed ever improves after its first evaluation, so each
    stops after `patience` evaluations; a seed's history ends where it stopped."""
    group = train_group([tiny(s, lr=0.0, max_epochs=10, patience=2) for s in (0, 1)], data, device="cpu",
                        backend="torch", progress=False, log=lambda *_: None)
    for result in group.results:
        assert result.best_epoch == 1 and result.epochs_trained == 3 and len(result.history) == 3


def test_interrupted_and_resumed_equals_uninterrupted(data, tmp_path):
    """A group paused by stop_at resumes from its checkpoint to the same result, dropout included."""
    configs = [tiny(s, dropout=0.2, max_epochs=4, patience=10) for s in (0, 1)]
    kw = dict(device="cpu", backend="torch", progress=False, log=lambda *_: None)
    straight = train_group(configs, data, **kw)
    path = tmp_path / "checkpoint.pt"
    import time
    paused = train_group(configs, data, checkpoint_path=path, stop_at=time.time(), **kw)  # pauses after epoch 1
    assert not paused.finished and paused.epochs_done == 1 and path.is_file()
    first_setup_s = torch.load(path, weights_only=False)["setup_s"]
    resumed = train_group(configs, data, checkpoint_path=path, **kw)
    assert resumed.finished and resumed.results[0].timings["resumed_from_epoch"] == 1
    # a run's wall and setup seconds cover both executions; the group result's, only the resumed one
    timings = resumed.results[0].timings
    assert 0 < timings["resumed_wall_s"] <= paused.wall_time_s
    assert resumed.results[0].wall_time_s == pytest.approx(timings["resumed_wall_s"] + resumed.wall_time_s, abs=0.05)
    assert 0 < first_setup_s < timings["setup_s"] and straight.results[0].timings["resumed_wall_s"] == 0
    for a, b in zip(straight.results, resumed.results):
        assert [h["train_loss"] for h in a.history] == [h["train_loss"] for h in b.history]
        assert a.valid_metrics == b.valid_metrics and a.best_epoch == b.best_epoch
        assert np.array_equal(a.test_per_user["rank"], b.test_per_user["rank"])
    # a checkpoint of another group (other seeds) is not used
    other = train_group([configs[0]], data, checkpoint_path=path, **kw)
    assert other.results[0].timings["resumed_from_epoch"] == 0


def test_dropping_stopped_seeds_leaves_the_others_unchanged(data):
    """A group drops seeds that stopped early (keep_seed_slots + TrainStep.for_slots): the seeds kept
    go on exactly as they would alone (weights, AdamW state, data order)."""
    cfg, tc = tiny(0).model, tiny(0).train
    sids = torch.as_tensor(data.sids)
    seeds = [4, 5, 6]

    def batches_for(model, seed_list):
        train = to_device_split(data.train, model, sids, tc.max_history, "cpu")
        groups = length_bucket_groups(train.enc_tokens, tc.length_buckets, tc.max_history, tc.batch_size)
        gens = [torch.Generator().manual_seed(s) for s in seed_list]
        return train, groups, gens

    stacked = TIGER(cfg, data.codebook_sizes, backend="torch", num_seeds=3).init_seeds(seeds)
    train, groups, gens = batches_for(stacked, seeds)
    order = torch.Generator().manual_seed(BUCKET_ORDER_SEED)
    step = TrainStep(stacked, train, tc, "eager", use_autocast=False)
    first = epoch_batches(groups, tc.batch_size, gens, order)
    for enc_len, idx in first[:3]:
        step(idx, enc_len)
    stacked.keep_seed_slots([2, 0])                     # seed 5 stopped; the order of slots may change
    step = step.for_slots([2, 0])
    assert stacked.num_seeds == 2 and stacked.encoder[0].mix.qkv.num_seeds == 2
    second = epoch_batches(groups, tc.batch_size, [gens[2], gens[0]], order)
    losses = torch.stack([step(idx, enc_len) for enc_len, idx in second[:3]])

    for slot, seed in enumerate([6, 4]):
        alone = TIGER(cfg, data.codebook_sizes, backend="torch").init_seeds([seed])
        a_train, a_groups, a_gens = batches_for(alone, [seed])
        a_order = torch.Generator().manual_seed(BUCKET_ORDER_SEED)
        a_step = TrainStep(alone, a_train, tc, "eager", use_autocast=False)
        for enc_len, idx in epoch_batches(a_groups, tc.batch_size, a_gens, a_order)[:3]:
            a_step(idx, enc_len)
        a_losses = torch.stack([a_step(idx, enc_len) for enc_len, idx in
                                epoch_batches(a_groups, tc.batch_size, a_gens, a_order)[:3]])
        torch.testing.assert_close(losses[:, slot], a_losses[:, 0], rtol=1e-5, atol=1e-6)
        for (name, p), q in zip(stacked.named_parameters(), alone.parameters()):
            torch.testing.assert_close(p.detach()[slot], q.detach()[0], rtol=1e-4, atol=1e-6, msg=name)


def test_seeds_stopping_at_different_epochs_match_single_runs_and_resume(data, tmp_path):
    """Seeds 3 and 0 stop after epochs 2 and 3 (patience 1), seed 1 trains on: the group drops each
    as it stops, and every seed's result is that of its single run; a pause right after a seed
    stopped returns that seed tested, and its checkpoint resumes the others to the same results."""
    import time

    configs = [tiny(s, max_epochs=6, patience=1) for s in (3, 0, 1)]
    kw = dict(device="cpu", backend="torch", progress=False, log=lambda *_: None)
    group = train_group(configs, data, **kw)
    stops = [r.epochs_trained for r in group.results]
    assert len(set(stops)) == 3, stops   # the premise: three different stopping epochs
    # fp32 rounding differs between batched matmuls of different seed counts, and training amplifies
    # it chaotically after a few hundred steps (a single run and a group without any early stop drift
    # apart the same way): compare tightly over the first 3 epochs, loosely after
    for result in group.results:
        alone = train_group([result.config], data, **kw).results[0]
        ours, theirs = ([h["train_loss"] for h in r.history] for r in (result, alone))
        np.testing.assert_allclose(ours[:3], theirs[:3], rtol=1e-4)
        np.testing.assert_allclose(ours, theirs, rtol=2e-2)
        if result.epochs_trained <= 3:
            assert result.epochs_trained == alone.epochs_trained and result.best_epoch == alone.best_epoch
            assert np.mean(result.test_per_user["rank"] == alone.test_per_user["rank"]) >= 0.95

    # pause after every epoch until the first seed has stopped: that pause tests and returns it, and
    # leaves the checkpoint of a group of the two others, which resumes to their uninterrupted results
    path = tmp_path / "checkpoint.pt"
    paused = train_group(configs, data, checkpoint_path=path, stop_at=time.time(), **kw)
    while not paused.results:
        assert paused.remaining == configs and paused.epochs_done < min(stops)
        paused = train_group(configs, data, checkpoint_path=path, stop_at=time.time(), **kw)
    first = stops.index(min(stops))
    assert not paused.finished and paused.epochs_done == min(stops)
    assert [r.config for r in paused.results] == [configs[first]]
    assert paused.remaining == [c for i, c in enumerate(configs) if i != first]
    ckpt = torch.load(path, weights_only=False)
    assert ckpt["config_hashes"] == [c.config_hash() for c in paused.remaining] and ckpt["slots"] == [0, 1]
    assert train_group(configs, data, checkpoint_path=path, **kw).results[0].timings["resumed_from_epoch"] == 0
    resumed = train_group(paused.remaining, data, checkpoint_path=path, **kw)
    assert resumed.finished and resumed.results[0].timings["resumed_from_epoch"] == min(stops)
    straight = {r.config.seed: r for r in group.results}
    for r in paused.results + resumed.results:
        a = straight[r.config.seed]
        assert [h["train_loss"] for h in a.history] == [h["train_loss"] for h in r.history]
        assert a.valid_metrics == r.valid_metrics and (a.best_epoch, a.epochs_trained) == (r.best_epoch, r.epochs_trained)
        # the same best weights, tested in a model of fewer seeds (batched matmuls round differently)
        assert np.mean(a.test_per_user["rank"] == r.test_per_user["rank"]) >= 0.95


def test_stacked_gbla_layer_with_the_triton_kernels_equals_separate_layers():
    """The seeds go through the Triton GBLA and conv kernels folded into the batch, with the per-seed
    norm weight applied after the op: forward and gradients equal per-seed layers (reference backend)."""
    from gbla.layers import GBLALayer, init_seed_slice

    D, H, E, S, B, L = 16, 2, 16, 2, 3, 7
    torch.manual_seed(0)
    stacked = GBLALayer(D, H, E, GBLAOptions(), backend="triton", num_seeds=S)
    for i in range(S):
        init_seed_slice(stacked, i, 10 + i)
    with torch.no_grad():
        stacked.norm_weight.normal_(1.0, 0.3)   # per-seed norm weights that differ
        stacked.gate.weight.normal_(0, 0.5)
    x = torch.randn(S, B, L, D, requires_grad=True)
    mask = torch.ones(S, B, L, dtype=torch.bool)
    mask[0, 1, 5:] = False
    mask[1, 2, :2] = False
    y = stacked(x, mask)
    upstream = torch.randn_like(y)
    (y * upstream).sum().backward()
    for i in range(S):
        single = GBLALayer(D, H, E, GBLAOptions(), backend="torch", num_seeds=1)
        with torch.no_grad():
            for p, q in zip(single.parameters(), stacked.parameters()):
                p.copy_(q[i:i + 1])
        xi = x.detach()[i:i + 1].clone().requires_grad_(True)
        yi = single(xi, mask[i:i + 1])
        (yi * upstream[i:i + 1]).sum().backward()
        torch.testing.assert_close(y[i:i + 1].detach(), yi.detach(), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(x.grad[i:i + 1], xi.grad, rtol=1e-4, atol=1e-5)
        for (name, p), q in zip(single.named_parameters(), stacked.parameters()):
            torch.testing.assert_close(q.grad[i:i + 1], p.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_stopped_seeds_kept_in_the_model_stay_stopped(data, monkeypatch):
    """Where stopped seeds are not dropped (the compile step modes), they still train along but their
    results stay those of their stopping epoch: the same as when they are dropped."""
    import gbla.train as T

    configs = [tiny(s, max_epochs=6, patience=1) for s in (3, 0, 1)]
    kw = dict(device="cpu", backend="torch", progress=False, log=lambda *_: None)
    dropped = train_group(configs, data, **kw)
    monkeypatch.setattr(T.TIGER, "keep_seed_slots", lambda self, slots: pytest.fail("dropped a seed"))
    monkeypatch.setattr(T, "STEP_MODES", T.STEP_MODES + ("eager_compile_stand_in",))
    real_init = T.TrainStep.__init__

    def eager_init(self, model, train, tc, mode, use_autocast):   # a compile mode name, eager steps
        real_init(self, model, train, tc, "eager", use_autocast)
        self.mode = mode

    monkeypatch.setattr(T.TrainStep, "__init__", eager_init)
    kept = train_group(configs, data, step_mode="eager_compile_stand_in", **kw)
    for a, b in zip(dropped.results, kept.results):
        assert a.epochs_trained == b.epochs_trained and a.best_epoch == b.best_epoch
        assert len(b.history) == b.epochs_trained
        if a.epochs_trained <= 3:   # before fp32 drift between seed counts grows (see above)
            assert a.valid_metrics == b.valid_metrics
