"""Train TIGER models to early stopping and evaluate them: the run contract.

    result = train_and_evaluate(RunConfig(dataset="beauty", variant="sa", seed=0), load_processed(path))
    group = train_group([RunConfig("beauty", "sa", seed) for seed in range(5)], data,
                        checkpoint_path="outputs/runs/beauty/sa/checkpoint-....pt")

A group is the seeds of one (dataset, variant) trained together in one process: one TIGER object
holds all of them (gbla/model.py) and every step runs each operation once for all seeds. Each seed is
still a model of its own: its own initial weights (drawn from its seed number alone), its own data
order within each length bucket (its own generator), its own dropout draws, its own early stopping on
its own validation Recall@10, and its own best weights restored for its test. Nothing couples them:
the objective is the sum of the per-seed losses (so each seed's gradient is that of its own loss),
AdamW is elementwise, and there is no gradient clipping. What seeds of a group share is the order in
which the length buckets take turns in an epoch (drawn from a fixed generator, the same in every
group), so a seed trains on exactly the same batches whichever seeds share its process.
train_and_evaluate is a group of one.

The hot loop touches only device tensors: every split is turned into token ids once and kept on the
device, batches are slices of per-epoch permutations, the losses are summed on the device and read
once per epoch. Shapes stay static per history-length bucket (train.length_buckets): a step's batches
all come from one bucket and the encoder input is cut to that bucket's length (right padding only, so
cutting trailing columns drops padding and nothing else); each bucket's incomplete last batch of an
epoch is dropped (different examples each epoch).

Checkpoints: with `checkpoint_path`, the whole group state (weights, AdamW state, RNG states, each
seed's early-stopping state, best weights and history) is written atomically every
`checkpoint_every_s` seconds, and a later call with the same group resumes from it; `stop_at` (a
time.time() deadline) makes the group return unfinished at the first epoch end that would run past it.
A pause loses nothing finished: the seeds that have stopped early by then are tested and returned
(GroupResult.results), and the checkpoint it writes holds only the seeds still training
(GroupResult.remaining), the exact state of a group of just those seeds, which a later call with
those configs resumes. Imports only torch, numpy (+ tqdm): it runs on any GPU machine.

This module is longer than 500 lines: the group's loop, its checkpoint and resume, the dropping of
stopped seeds and the graphed TrainStep are one path that every run takes, read best in one place.
"""
from __future__ import annotations

import os
import platform
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm import tqdm  # text bar: tqdm.auto warns "IProgress not found" in kernels without ipywidgets

from gbla.common import atomic_path
from gbla.config import RunConfig
from gbla.evaluate import SIDTrie, metrics_from_ranks, rank_targets
from gbla.model import PAD, TIGER

# The length buckets' order within an epoch comes from a generator with this fixed seed (advanced
# once per epoch), the same for every seed and group; the examples within a bucket are each seed's own.
BUCKET_ORDER_SEED = 20_231_123
CHECKPOINT_FORMAT = 1


@dataclass
class RunResult:
    config: RunConfig
    config_hash: str
    device: str
    wall_time_s: float   # the group's, over all its executions (a resumed group's too)
    epochs_trained: int
    best_epoch: int
    history: list[dict]
    valid_metrics: dict[str, float]
    test_metrics: dict[str, float]
    test_per_user: dict[str, np.ndarray]  # "user", "target", "rank" (1..10, 0 = miss)
    timings: dict[str, float] = field(default_factory=dict)
    placement: dict = field(default_factory=dict)   # where it trained: host, process, GPU (device_placement)


@dataclass
class GroupResult:
    """results: one RunResult per config, in the order given; finished: False when the group stopped
    at `stop_at`: then results holds the seeds that had stopped early by then (tested), and
    `remaining` the configs of the seeds still training, which the checkpoint left behind resumes
    (a group of just those configs). wall_time_s: this execution's seconds."""
    results: list[RunResult]
    finished: bool
    epochs_done: int
    wall_time_s: float
    remaining: list[RunConfig] = field(default_factory=list)


@dataclass
class DeviceSplit:
    """One split as device tensors: encoder token ids (n, 1 + 4 * max_history), target SIDs (n, 4)."""
    enc_tokens: torch.Tensor
    target_sids: torch.Tensor
    target: torch.Tensor
    user: torch.Tensor

    def __len__(self):
        return self.target.shape[0]


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def to_device_split(split, model: TIGER, sids: torch.Tensor, max_history: int, device) -> DeviceSplit:
    history = torch.as_tensor(split.history, device=device)
    if history.shape[1] < max_history:
        raise ValueError(f"the data's histories hold {history.shape[1]} items, the config asks for max_history="
                         f"{max_history}")
    # keep the most recent max_history items; histories are left-aligned and right-padded with -1
    if history.shape[1] > max_history:
        lengths = torch.as_tensor(split.history_len, device=device)
        cols = (lengths[:, None] - max_history).clamp(min=0) + torch.arange(max_history, device=device)
        history = history.gather(1, cols.clamp(max=history.shape[1] - 1))
        history = torch.where(torch.arange(max_history, device=device) < lengths[:, None], history, -1)
    user = torch.as_tensor(split.user, device=device)
    target = torch.as_tensor(split.target, device=device)
    return DeviceSplit(enc_tokens=model.vocab.encoder_tokens(user, history, sids),
                       target_sids=sids[target], target=target, user=user)


def length_bucket_groups(enc_tokens: torch.Tensor, bounds, max_history: int, batch_size: int
                         ) -> list[tuple[int, torch.Tensor]]:
    """Training example indices grouped by history length: [(encoder length, device indices)], one
    group per bucket of `bounds` (upper bounds in items; max_history closes the last bucket). A
    bucket with fewer than batch_size examples is merged into the next longer one (and the last into
    the one before), so every example can be drawn into some full batch."""
    n_items = ((enc_tokens != PAD).sum(dim=1) - 1).div(4, rounding_mode="floor").cpu()
    edges = [b for b in bounds if b < max_history] + [max_history]
    groups: list[tuple[int, torch.Tensor]] = []
    pending = torch.empty(0, dtype=torch.long)
    lower = -1
    for bound in edges:
        pending = torch.cat([pending, torch.nonzero((n_items > lower) & (n_items <= bound)).flatten()])
        lower = bound
        if len(pending) >= batch_size or bound == edges[-1]:
            groups.append((1 + 4 * bound, pending))
            pending = torch.empty(0, dtype=torch.long)
    if len(groups) > 1 and len(groups[-1][1]) < batch_size:
        last = groups.pop()
        groups[-1] = (last[0], torch.cat([groups[-1][1], last[1]]))
    return [(enc_len, idx.sort().values.to(enc_tokens.device)) for enc_len, idx in groups]


def epoch_batches(groups, batch_size: int, seed_generators: Sequence[torch.Generator],
                  order_generator: torch.Generator) -> list[tuple[int, torch.Tensor]]:
    """One epoch's steps: [(encoder length, indices (S, batch_size))]. Each seed shuffles each bucket
    with its own generator and cuts it into full batches; every seed has the same number of batches
    per bucket, and the buckets take turns in an order drawn from `order_generator`."""
    per_bucket = []
    for enc_len, idx in groups:
        n = len(idx) // batch_size
        perms = [idx[torch.randperm(len(idx), generator=g).to(idx.device)][:n * batch_size].view(n, batch_size)
                 for g in seed_generators]
        per_bucket.append((enc_len, torch.stack(perms, dim=1)))   # (n, S, batch_size)
    steps = [(enc_len, batches[i]) for enc_len, batches in per_bucket for i in range(len(batches))]
    return [steps[i] for i in torch.randperm(len(steps), generator=order_generator).tolist()]


def check_group(configs: Sequence[RunConfig]) -> None:
    """A group is seeds of one (dataset, variant, model, train settings)."""
    if not configs:
        raise ValueError("a group needs at least one config")
    first = configs[0]
    for c in configs[1:]:
        if (c.dataset, c.variant, c.model, c.train) != (first.dataset, first.variant, first.model, first.train):
            raise ValueError(f"a group trains seeds of one config; {c.dataset}/{c.variant}/seed{c.seed} differs "
                             f"from {first.dataset}/{first.variant}/seed{first.seed} in more than its seed")
    seeds = [c.seed for c in configs]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"a group's seeds must be distinct, got {seeds}")
    tc = first.train
    if tc.beam_size < 10:
        raise ValueError(f"train.beam_size must be >= 10 (top-10 items are kept), got {tc.beam_size}")
    if tc.patience < 1 or tc.eval_every < 1 or tc.max_epochs < 1 or tc.batch_size < 1:
        raise ValueError("train.patience, train.eval_every, train.max_epochs and train.batch_size must be >= 1")


@dataclass
class SeedState:
    """Early stopping of one seed: best validation Recall@10 so far, its epoch and weights."""
    best_recall: float = -1.0
    best_epoch: int = 0
    best_valid: dict | None = None
    best_weights: dict | None = None      # parameter name -> this seed's slice
    evals_without_gain: int = 0
    stopped_at: int | None = None         # the epoch after which the seed stopped
    history: list = field(default_factory=list)


def seed_slice(model: torch.nn.Module, index: int) -> dict[str, torch.Tensor]:
    return {name: p.detach()[index].clone() for name, p in model.named_parameters()}


@torch.no_grad()
def load_seed_slice(model: torch.nn.Module, index: int, weights: dict[str, torch.Tensor]) -> None:
    for name, p in model.named_parameters():
        p[index].copy_(weights[name])


def train_and_evaluate(config: RunConfig, data, **kwargs) -> RunResult:
    """Train one model to early stopping on validation Recall@10, restore its best weights, test it
    (a group of one; keyword arguments as train_group)."""
    group = train_group([config], data, **kwargs)
    if not group.finished:
        raise RuntimeError("training stopped at stop_at before it finished; call again to resume")
    return group.results[0]


def train_group(configs: Sequence[RunConfig], data, *, device: str = "auto", backend: str = "auto",
                progress: bool = True, log=print, step_mode: str = "auto", eval_batch_size: int | None = None,
                time_limit_s: float | None = None, checkpoint_path: str | os.PathLike | None = None,
                checkpoint_every_s: float = 300.0, stop_at: float | None = None) -> GroupResult:
    """Train the seeds of `configs` (one dataset, variant and settings; distinct seeds) together, each
    to its own early stop; restore each seed's best weights and test it.

    step_mode: "eager"; "compile" (torch.compile of the loss); "cuda_graph" (the whole training step,
    forward + backward + AdamW, captured once per encoder length and replayed: one launch per step
    instead of hundreds); "compile_cuda_graph" (both); "auto" = "cuda_graph" on CUDA, "eager"
    elsewhere. `device`, `backend`, `step_mode`, `eval_batch_size` and the checkpoint settings are
    runtime choices, not part of the config hash. time_limit_s (optional) ends training once that
    many seconds have passed, as if every seed had stopped early (timings["stopped_by_time_limit"]);
    the best weights so far are tested as usual. stop_at: see the module docstring."""
    t_start = time.perf_counter()
    check_group(configs)
    configs = list(configs)
    first, seeds = configs[0], [c.seed for c in configs]
    tc, S = first.train, len(configs)
    label = f"{first.dataset}/{first.variant}/seeds {','.join(map(str, seeds))}"
    dev = resolve_device(device)
    if step_mode == "auto":
        step_mode = "cuda_graph" if dev.type == "cuda" else "eager"
    if step_mode not in STEP_MODES or ("cuda_graph" in step_mode and dev.type != "cuda"):
        raise ValueError(f"step_mode must be one of {STEP_MODES} (CUDA graphs need CUDA), got {step_mode!r}")
    use_autocast = dev.type == "cuda"
    eval_batch_size = eval_batch_size or (4096 if dev.type == "cuda" else 256)  # 4096: measured faster

    seed_everything(seeds[0])  # dropout draws: the group's own stream
    model = TIGER(first.model, data.codebook_sizes, backend=backend, num_seeds=S).init_seeds(seeds).to(dev)
    trie = SIDTrie(data.sids, data.codebook_sizes, device=dev)
    sids = torch.as_tensor(data.sids, dtype=torch.long, device=dev)
    train = to_device_split(data.train, model, sids, tc.max_history, dev)
    valid = to_device_split(data.valid, model, sids, tc.max_history, dev)
    test = to_device_split(data.test, model, sids, tc.max_history, dev)
    if tc.max_train_examples is not None and tc.max_train_examples < len(train):
        # one subset for every seed (a fixed generator): seeds differ in init, order and dropout only
        keep = np.sort(np.random.default_rng(0).choice(len(train), tc.max_train_examples, replace=False))
        keep = torch.as_tensor(keep, device=dev)
        train = DeviceSplit(*(t[keep] for t in (train.enc_tokens, train.target_sids, train.target, train.user)))

    n_train = len(train)
    batch_size = min(tc.batch_size, n_train)
    groups = length_bucket_groups(train.enc_tokens, tc.length_buckets, tc.max_history, batch_size)
    steps_per_epoch = sum(len(idx) // batch_size for _, idx in groups)
    real_tokens = int((train.enc_tokens != PAD).sum())
    token_slots = sum(enc_len * (len(idx) // batch_size) * batch_size for enc_len, idx in groups)
    seed_generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    order_generator = torch.Generator().manual_seed(BUCKET_ORDER_SEED)
    states = [SeedState() for _ in seeds]
    config_hashes = [c.config_hash() for c in configs]
    start_epoch, train_s, eval_s, n_evals = 1, 0.0, 0.0, 0
    checkpoint_path = Path(checkpoint_path) if checkpoint_path is not None else None
    # the model's seed slots: slots[j] = index (into configs) of the seed in slot j; seeds that have
    # stopped early are dropped from the model (TIGER.keep_seed_slots), so they cost nothing after
    slots = list(range(S))
    examples_trained, resumed_train_s = 0, 0.0
    # wall and setup seconds of the executions before a resume (the checkpoint carries them): a run's
    # wall_time_s and setup_s cover all of its executions, as train_s and eval_s do
    wall_before, setup_before = 0.0, 0.0

    def save_checkpoint(epoch: int, members: list[int] | None = None) -> None:
        """The group's state after `epoch`, as the state of a group of the configs `members` (indices
        into configs, in order; default all): every slot of the model must be one of them."""
        members = list(range(S)) if members is None else members
        position = {i: k for k, i in enumerate(members)}
        payload = {"format": CHECKPOINT_FORMAT, "config_hashes": [config_hashes[i] for i in members],
                   "epoch": epoch, "model": model.state_dict(), "optimizer": train_step.optimizer.state_dict(),
                   "steps_done": train_step.steps_done, "states": [vars(states[i]) for i in members],
                   "slots": [position[i] for i in slots],
                   "cpu_rng": torch.get_rng_state(), "cuda_rng": torch.cuda.get_rng_state(dev) if dev.type == "cuda"
                   else None, "seed_generators": [seed_generators[i].get_state() for i in members],
                   "order_generator": order_generator.get_state(), "train_s": train_s, "eval_s": eval_s,
                   "n_evals": n_evals, "wall_s": wall_before + time.perf_counter() - t_start, "setup_s": setup_s}
        with atomic_path(checkpoint_path) as tmp:
            torch.save(payload, tmp)

    ckpt = None
    if checkpoint_path is not None and checkpoint_path.is_file():
        ckpt = torch.load(checkpoint_path, map_location=dev, weights_only=False)
        if ckpt.get("format") != CHECKPOINT_FORMAT or ckpt.get("config_hashes") != config_hashes:
            log(f"[{label}] {checkpoint_path} belongs to another group (seeds or config differ); starting afresh")
            ckpt = None
    if ckpt is not None:
        slots = list(ckpt["slots"])
        if slots != list(range(S)):
            model.keep_seed_slots(slots)
    train_step = TrainStep(model, train, tc, step_mode, use_autocast)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        train_step.optimizer.load_state_dict(ckpt["optimizer"])
        train_step.steps_done = ckpt["steps_done"]
        states = [SeedState(**st) for st in ckpt["states"]]
        torch.set_rng_state(ckpt["cpu_rng"].cpu())  # map_location moved every tensor to `dev`
        if dev.type == "cuda" and ckpt["cuda_rng"] is not None:
            torch.cuda.set_rng_state(ckpt["cuda_rng"].cpu(), dev)
        for g, state in zip(seed_generators, ckpt["seed_generators"]):
            g.set_state(state.cpu())
        order_generator.set_state(ckpt["order_generator"].cpu())
        start_epoch = ckpt["epoch"] + 1
        train_s, eval_s, n_evals = ckpt["train_s"], ckpt["eval_s"], ckpt["n_evals"]
        resumed_train_s = train_s
        wall_before, setup_before = ckpt.get("wall_s", 0.0), ckpt.get("setup_s", 0.0)
        log(f"[{label}] resumed from {checkpoint_path} after epoch {ckpt['epoch']}")
        del ckpt

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    sync()
    setup_s = setup_before + time.perf_counter() - t_start
    log(f"[{label}] {n_train} training examples, {steps_per_epoch} steps/epoch of {S} x {batch_size}, device "
        f"{dev}, backend {backend}, step {step_mode}, configs {' '.join(config_hashes)}; encoder lengths "
        f"{[enc_len for enc_len, _ in groups]} ({[len(idx) for _, idx in groups]} examples)")

    stopped_by_time = finished = False

    def test_seeds(indices: list[int], epochs_done: int) -> list[RunResult]:
        """Test the seeds `indices` (of configs; each stopped, with best weights) in one model of
        those seeds, on their best weights; their RunResults, with the group's timings so far."""
        test_model = TIGER(first.model, data.codebook_sizes, backend=backend, num_seeds=len(indices)).to(dev)
        for j, i in enumerate(indices):
            load_seed_slice(test_model, j, states[i].best_weights)
        t0 = time.perf_counter()
        test_ranks = rank_targets(test_model, test.enc_tokens, test.target, trie, beam_size=tc.beam_size,
                                  batch_size=eval_batch_size, autocast=use_autocast).cpu()
        sync()
        test_eval_s = time.perf_counter() - t0
        wall = wall_before + time.perf_counter() - t_start
        group_timings = {
            "group_seeds": S, "group_wall_s": wall, "resumed_wall_s": wall_before, "setup_s": setup_s,
            "train_s": train_s, "eval_s": eval_s,
            "test_eval_s": test_eval_s, "group_epochs": epochs_done, "epoch_time_s": train_s / max(1, epochs_done),
            # examples of all seeds per second of training in this process (the group's throughput)
            "examples_per_s": examples_trained / max(train_s - resumed_train_s, 1e-9),
            "valid_eval_s": eval_s / max(1, n_evals), "stopped_by_time_limit": float(stopped_by_time),
            "steps_per_epoch": steps_per_epoch, "resumed_from_epoch": start_epoch - 1,
            # real encoder tokens over encoder token slots computed per epoch (the rest is padding)
            "encoder_real_token_fraction": real_tokens * (steps_per_epoch * batch_size / n_train) / token_slots}
        placement = device_placement(dev)
        results = []
        for j, i in enumerate(indices):
            config, st = configs[i], states[i]
            test_metrics = metrics_from_ranks(test_ranks[j])
            log(f"[{config.dataset}/{config.variant}/seed{config.seed}] best epoch {st.best_epoch}/{st.stopped_at}: "
                f"valid R@10 {st.best_valid['recall@10']:.4f}, test R@10 {test_metrics['recall@10']:.4f} "
                f"NDCG@10 {test_metrics['ndcg@10']:.4f}")
            results.append(RunResult(
                config=config, config_hash=config_hashes[i], device=describe_device(dev), wall_time_s=wall,
                epochs_trained=st.stopped_at, best_epoch=st.best_epoch, history=st.history,
                valid_metrics=st.best_valid, test_metrics=test_metrics,
                test_per_user={"user": test.user.cpu().numpy(), "target": test.target.cpu().numpy(),
                               "rank": test_ranks[j].numpy().astype(np.int64)},
                timings=dict(group_timings), placement=placement))
        return results

    last_checkpoint = time.perf_counter()
    epoch = start_epoch - 1
    bar = tqdm(range(start_epoch, tc.max_epochs + 1), desc=label, disable=not progress, leave=False,
               initial=start_epoch - 1, total=tc.max_epochs)
    for epoch in bar:
        active = [i for i in slots if states[i].stopped_at is None]  # slots can hold stopped seeds (compile)
        t0 = epoch_start = time.perf_counter()
        model.train()
        loss_sum = torch.zeros(len(slots), device=dev)
        for enc_len, idx in epoch_batches(groups, batch_size, [seed_generators[i] for i in slots], order_generator):
            loss_sum += train_step(idx, enc_len)
        losses = dict(zip(slots, (loss_sum / steps_per_epoch).tolist()))
        examples_trained += len(slots) * steps_per_epoch * batch_size
        epoch_time = time.perf_counter() - t0
        train_s += epoch_time
        bad = [seeds[i] for i in active if not np.isfinite(losses[i])]
        if bad:
            raise FloatingPointError(f"training loss is not finite at epoch {epoch} for seeds {bad}")
        records = {i: {"epoch": epoch, "train_loss": losses[i], "epoch_time_s": epoch_time} for i in active}

        if epoch % tc.eval_every == 0 or epoch == tc.max_epochs:
            t0 = time.perf_counter()
            ranks = rank_targets(model, valid.enc_tokens, valid.target, trie, beam_size=tc.beam_size,
                                 batch_size=eval_batch_size, autocast=use_autocast).cpu()
            eval_s += time.perf_counter() - t0
            n_evals += 1
            for j, i in enumerate(slots):
                if i not in active:
                    continue
                metrics, st = metrics_from_ranks(ranks[j]), states[i]
                records[i].update({f"valid_{k}": v for k, v in metrics.items()})
                if metrics["recall@10"] > st.best_recall:
                    st.best_recall, st.best_epoch, st.best_valid, st.evals_without_gain = (
                        metrics["recall@10"], epoch, metrics, 0)
                    st.best_weights = seed_slice(model, j)
                else:
                    st.evals_without_gain += 1
            bar.set_postfix(best=" ".join(f"{states[i].best_recall:.4f}@{states[i].best_epoch}" for i in active))
            if not progress:  # no bar: one line per evaluation instead
                log(f"  epoch {epoch} ({epoch_time:.2f} s): " + "; ".join(
                    f"seed {seeds[i]} loss {losses[i]:.4f} R@10 {records[i]['valid_recall@10']:.4f} (best "
                    f"{states[i].best_recall:.4f} @ {states[i].best_epoch})" for i in active))
        for i in active:
            states[i].history.append(records[i])
            if states[i].evals_without_gain >= tc.patience or epoch == tc.max_epochs:
                states[i].stopped_at = epoch
                if epoch < tc.max_epochs:
                    log(f"  seed {seeds[i]} stopped early after epoch {epoch} (best {states[i].best_epoch})")
        if all(st.stopped_at is not None for st in states):
            finished = True
            break
        keep = [j for j, i in enumerate(slots) if states[i].stopped_at is None]
        # drop the seeds that stopped: the rest train on without them. Not under torch.compile, where
        # every new seed count would compile the step again (minutes, more than the dropping saves)
        if len(keep) < len(slots) and "compile" not in step_mode:
            model.keep_seed_slots(keep)
            train_step = train_step.for_slots(keep)
            slots = [slots[j] for j in keep]
        if time_limit_s is not None and time.perf_counter() - t_start > time_limit_s and \
                all(st.best_weights is not None for st in states):
            stopped_by_time = finished = True
            for st in states:
                st.stopped_at = st.stopped_at or epoch
            log(f"  stopped by the time limit ({time_limit_s:.0f} s) after epoch {epoch}")
            break
        now = time.perf_counter()
        if stop_at is not None and time.time() + 1.5 * (now - epoch_start) > stop_at:
            bar.close()
            # the seeds still training go on in a later call as a group of their own; the ones that have
            # stopped are done: test them now, so that a pause (whose checkpoint may never be resumed:
            # another machine, no time left) loses none of them
            done = [i for i in range(S) if states[i].stopped_at is not None]
            remaining = [i for i in range(S) if states[i].stopped_at is None]
            keep = [j for j, i in enumerate(slots) if i in remaining]
            if len(keep) < len(slots):   # under torch.compile stopped seeds keep their slots until now
                model.keep_seed_slots(keep)
                train_step = train_step.for_slots(keep)
                slots = [slots[j] for j in keep]
            if checkpoint_path is not None:
                save_checkpoint(epoch, remaining)
                log(f"[{label}] paused after epoch {epoch}: checkpoint {checkpoint_path} of seeds "
                    f"{', '.join(str(seeds[i]) for i in remaining)}")
            else:
                log(f"[{label}] stopped after epoch {epoch} at stop_at, without a checkpoint to resume from")
            train_step = None
            results = test_seeds(done, epoch) if done else []
            return GroupResult(results, False, epoch, time.perf_counter() - t_start,
                               remaining=[configs[i] for i in remaining])
        if checkpoint_path is not None and now - last_checkpoint > checkpoint_every_s:
            save_checkpoint(epoch)
            last_checkpoint = time.perf_counter()
    bar.close()
    if not finished:  # max_epochs reached (every seed stops there)
        for st in states:
            st.stopped_at = st.stopped_at or epoch

    # every seed's best weights in one model of all S seeds, tested together
    train_step = None  # frees its graphs and optimizer state before the test pass
    results = test_seeds(list(range(S)), max(st.stopped_at for st in states))
    wall = time.perf_counter() - t_start
    log(f"[{label}] {wall:.1f} s")
    return GroupResult(results, True, max(st.stopped_at for st in states), wall)


STEP_MODES = ("eager", "compile", "cuda_graph", "compile_cuda_graph")


class TrainStep:
    """One optimisation step of every seed of the model on its training examples at `idx` (a device
    tensor of indices (S, batch), the same shape at every call) with the encoder input cut to
    `enc_len` tokens; returns the per-seed losses (S,) as a device tensor (no host sync).

    cuda_graph: per encoder length, the first WARMUP_STEPS steps run eagerly on a side stream (real
    steps, they count; they also let Triton autotune and cuBLAS pick kernels), then forward +
    backward + AdamW are captured into one CUDA graph whose replays read the batch indices from a
    static buffer. Each length has its own graph, memory pool and gradient buffers (set to None
    before each capture, so a graph's backward writes gradients only its own optimizer step reads);
    the optimizer state is shared. Dropout stays random per replay (PyTorch advances the graph's
    Philox offset). compile_cuda_graph: the same with torch.compile'd forward and backward inside."""

    WARMUP_STEPS = 3

    def __init__(self, model, train: DeviceSplit, tc, mode: str, use_autocast: bool):
        if mode not in STEP_MODES:
            raise ValueError(f"step_mode must be one of {STEP_MODES}, got {mode!r}")
        self.model, self.train, self.tc, self.mode, self.use_autocast = model, train, tc, mode, use_autocast
        self.label_smoothing = tc.label_smoothing
        self.warmup_steps, self.base_lr, self.steps_done = tc.warmup_steps, tc.lr, 0
        self.graphed = mode in ("cuda_graph", "compile_cuda_graph")
        # a tensor lr lets a captured optimizer see warm-up changes; a float is baked into the graph
        lr = torch.tensor(tc.lr, device=train.target.device) if self.graphed and tc.warmup_steps > 0 else tc.lr
        on_cuda = train.target.device.type == "cuda"
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=tc.weight_decay,
                                           fused=on_cuda, capturable=self.graphed)
        self.loss_fn = torch.compile(model.loss) if mode in ("compile", "compile_cuda_graph") else model.loss
        self.graphs: dict[int, tuple] = {}       # enc_len -> (graph, static_idx, static_loss)
        self.calls: dict[int, int] = {}          # enc_len -> steps taken at that length

    def for_slots(self, slots) -> "TrainStep":
        """This step for a model that has just kept only seed slots `slots` (TIGER.keep_seed_slots):
        the AdamW state of those slots carried over (sliced along the seed axis), graphs recaptured."""
        step = TrainStep(self.model, self.train, self.tc, self.mode, self.use_autocast)
        step.steps_done = self.steps_done
        for p in self.model.parameters():
            old = self.optimizer.state.get(p)
            if old:
                step.optimizer.state[p] = {k: (v[slots].clone() if torch.is_tensor(v) and v.dim() > 0 else
                                               v.clone() if torch.is_tensor(v) else v) for k, v in old.items()}
        return step

    def _set_lr(self):
        if self.warmup_steps <= 0:
            return
        lr = self.base_lr * min(1.0, (self.steps_done + 1) / self.warmup_steps)
        for group in self.optimizer.param_groups:
            if torch.is_tensor(group["lr"]):
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr

    def _step(self, idx, enc_len):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.use_autocast, cache_enabled=False):
            losses = self.loss_fn(self.train.enc_tokens[idx, :enc_len], self.train.target_sids[idx],
                                  self.label_smoothing)
        losses.sum().backward()  # each seed's gradient is its own loss's
        self.optimizer.step()
        return losses.detach()

    def __call__(self, idx: torch.Tensor, enc_len: int | None = None) -> torch.Tensor:
        enc_len = self.train.enc_tokens.shape[1] if enc_len is None else int(enc_len)
        self._set_lr()
        self.steps_done += 1
        self.calls[enc_len] = self.calls.get(enc_len, 0) + 1
        if not self.graphed:
            self.optimizer.zero_grad(set_to_none=True)
            return self._step(idx, enc_len)
        if enc_len not in self.graphs and self.calls[enc_len] <= self.WARMUP_STEPS:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self.optimizer.zero_grad(set_to_none=True)
                loss = self._step(idx, enc_len)
            torch.cuda.current_stream().wait_stream(side)
            return loss
        if enc_len not in self.graphs:
            torch.cuda.synchronize()
            static_idx = idx.clone()
            self.optimizer.zero_grad(set_to_none=True)  # backward inside the graph then writes fresh grads
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_loss = self._step(static_idx, enc_len)
            # capture recorded the step without running it: run it now
            graph.replay()
            self.graphs[enc_len] = (graph, static_idx, static_loss)
            return static_loss.clone()
        graph, static_idx, static_loss = self.graphs[enc_len]
        static_idx.copy_(idx)
        graph.replay()
        return static_loss.clone()


def device_placement(dev: torch.device) -> dict:
    """Where this process trains: host, process id, CUDA_VISIBLE_DEVICES and, on a GPU, its UUID and
    PCI address - what tells two GPUs of one machine apart (their names are the same)."""
    placement = {"host": platform.node(), "pid": os.getpid(),
                 "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        placement["gpu_uuid"] = str(getattr(props, "uuid", "")) or None
        bus = [getattr(props, f"pci_{k}_id", None) for k in ("domain", "bus", "device")]
        placement["gpu_pci"] = "{:04x}:{:02x}:{:02x}".format(*bus) if None not in bus else None
    return placement


def describe_device(dev: torch.device) -> str:
    if dev.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(dev)}"
    return "cpu"
