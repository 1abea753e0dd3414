"""Train one TIGER model to early stopping and evaluate it: the run contract (COMMON.md item 9).

    result = train_and_evaluate(RunConfig(dataset="beauty", variant="sa", seed=0), load_processed(path))

The hot loop touches only device tensors: every split is turned into token ids once and kept on the
device, batches are slices of a per-epoch permutation, the loss is summed on the device and read once
per epoch. Shapes stay static per history-length bucket (train.length_buckets): a batch holds
examples of one bucket and its encoder input is cut to that bucket's length (right padding only, so
cutting trailing columns drops padding and nothing else); each bucket's incomplete last batch of an
epoch is dropped (different examples each epoch). Imports only torch, numpy (+ tqdm): it runs on the
GPU machine.
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm  # text bar: tqdm.auto warns "IProgress not found" in kernels without ipywidgets

from gbla.config import RunConfig
from gbla.evaluate import SIDTrie, metrics_from_ranks, rank_targets
from gbla.model import PAD, TIGER


@dataclass
class RunResult:
    config: RunConfig
    config_hash: str
    device: str
    wall_time_s: float
    epochs_trained: int
    best_epoch: int
    history: list[dict]
    valid_metrics: dict[str, float]
    test_metrics: dict[str, float]
    test_per_user: dict[str, np.ndarray]  # "user", "target", "rank" (1..10, 0 = miss)
    timings: dict[str, float] = field(default_factory=dict)


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


def epoch_batches(groups, batch_size: int, generator: torch.Generator) -> list[tuple[int, torch.Tensor]]:
    """One epoch's batches: each group shuffled and cut into full batches, then all batches shuffled."""
    batches = []
    for enc_len, idx in groups:
        perm = idx[torch.randperm(len(idx), generator=generator).to(idx.device)]
        batches += [(enc_len, perm[i * batch_size:(i + 1) * batch_size]) for i in range(len(idx) // batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


def configure_sdpa(math_bf16: bool = True) -> None:
    """SA layers with a learned relative-position bias (a float attn_mask that needs a gradient) can
    land on PyTorch's math SDPA path, which by default upcasts bf16 inputs to fp32 (slow fp32 GEMMs,
    seen in the H100 profile, outputs/pilot/README.md). With math_bf16 it stays in bf16 like every
    other matmul under autocast (softmax still accumulates in fp32). Process-wide setting."""
    if hasattr(torch.backends.cuda, "allow_fp16_bf16_reduction_math_sdp"):
        torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp(math_bf16)


def train_and_evaluate(config: RunConfig, data, *, device: str = "auto", backend: str = "auto",
                       progress: bool = True, log=print, step_mode: str = "auto",
                       eval_batch_size: int | None = None, time_limit_s: float | None = None,
                       sdpa_math_bf16: bool = True) -> RunResult:
    """Train to early stopping on validation Recall@10, restore the best weights, evaluate on test.

    step_mode: "eager"; "compile" (torch.compile of the loss); "cuda_graph" (the whole training step,
    forward + backward + AdamW, captured once per encoder length and replayed: one launch per step
    instead of hundreds); "compile_cuda_graph" (both);
    "auto" = "cuda_graph" on CUDA, "eager" elsewhere (gbla/bench/train_speed.py measured the choice).
    `device`, `backend`, `step_mode`, `eval_batch_size` and `sdpa_math_bf16` (configure_sdpa) are
    runtime choices, not part of the config hash. time_limit_s (optional) stops training once that many seconds have passed since
    the start, as if early stopping had fired (timings["stopped_by_time_limit"] = 1); the best
    weights so far are then tested as usual."""
    t_start = time.perf_counter()
    tc = config.train
    if tc.beam_size < 10:
        raise ValueError(f"train.beam_size must be >= 10 (top-10 items are kept), got {tc.beam_size}")
    if tc.patience < 1 or tc.eval_every < 1 or tc.max_epochs < 1 or tc.batch_size < 1:
        raise ValueError("train.patience, train.eval_every, train.max_epochs and train.batch_size must be >= 1")
    dev = resolve_device(device)
    if step_mode == "auto":
        step_mode = "cuda_graph" if dev.type == "cuda" else "eager"
    if step_mode not in STEP_MODES or ("cuda_graph" in step_mode and dev.type != "cuda"):
        raise ValueError(f"step_mode must be one of {STEP_MODES} (CUDA graphs need CUDA), got {step_mode!r}")
    use_autocast = dev.type == "cuda"
    if use_autocast:
        configure_sdpa(sdpa_math_bf16)
    eval_batch_size = eval_batch_size or (4096 if dev.type == "cuda" else 256)  # 4096: measured faster

    seed_everything(config.seed)
    model = TIGER(config.model, data.codebook_sizes, backend=backend).to(dev)
    trie = SIDTrie(data.sids, data.codebook_sizes, device=dev)
    sids = torch.as_tensor(data.sids, dtype=torch.long, device=dev)
    train = to_device_split(data.train, model, sids, tc.max_history, dev)
    valid = to_device_split(data.valid, model, sids, tc.max_history, dev)
    test = to_device_split(data.test, model, sids, tc.max_history, dev)
    if tc.max_train_examples is not None and tc.max_train_examples < len(train):
        keep = np.sort(np.random.default_rng(config.seed).choice(len(train), tc.max_train_examples, replace=False))
        keep = torch.as_tensor(keep, device=dev)
        train = DeviceSplit(*(t[keep] for t in (train.enc_tokens, train.target_sids, train.target, train.user)))

    n_train = len(train)
    batch_size = min(tc.batch_size, n_train)
    groups = length_bucket_groups(train.enc_tokens, tc.length_buckets, tc.max_history, batch_size)
    steps_per_epoch = sum(len(idx) // batch_size for _, idx in groups)
    real_tokens = int((train.enc_tokens != PAD).sum())
    token_slots = sum(enc_len * (len(idx) // batch_size) * batch_size for enc_len, idx in groups)
    train_step = TrainStep(model, train, tc, step_mode, use_autocast)
    shuffle = torch.Generator().manual_seed(config.seed)

    def evaluate(split: DeviceSplit) -> torch.Tensor:
        return rank_targets(model, split.enc_tokens, split.target, trie, beam_size=tc.beam_size,
                            batch_size=eval_batch_size, autocast=use_autocast)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    sync()
    setup_s = time.perf_counter() - t_start
    log(f"[{config.dataset}/{config.variant}/seed{config.seed}] {n_train} training examples, {steps_per_epoch} "
        f"steps/epoch of {batch_size}, device {dev}, backend {backend}, step {step_mode}, "
        f"config {config.config_hash()}; encoder lengths {[enc_len for enc_len, _ in groups]} "
        f"({[len(idx) for _, idx in groups]} examples)")

    history: list[dict] = []
    stopped_by_time = False
    best_recall, best_epoch, best_state, best_valid, evals_without_gain = -1.0, 0, None, None, 0
    train_s = eval_s = 0.0
    bar = tqdm(range(1, tc.max_epochs + 1), desc=f"{config.dataset}/{config.variant}/seed{config.seed}",
               disable=not progress, leave=False)
    for epoch in bar:
        t0 = time.perf_counter()
        model.train()
        loss_sum = torch.zeros((), device=dev)
        for enc_len, idx in epoch_batches(groups, batch_size, shuffle):
            loss_sum += train_step(idx, enc_len)
        record = {"epoch": epoch, "train_loss": loss_sum.item() / steps_per_epoch}
        epoch_time = time.perf_counter() - t0
        train_s += epoch_time
        record["epoch_time_s"] = epoch_time
        if not np.isfinite(record["train_loss"]):
            raise FloatingPointError(f"training loss is {record['train_loss']} at epoch {epoch}")

        if epoch % tc.eval_every == 0 or epoch == tc.max_epochs:
            t0 = time.perf_counter()
            metrics = metrics_from_ranks(evaluate(valid))
            eval_s += time.perf_counter() - t0
            record.update({f"valid_{k}": v for k, v in metrics.items()})
            if metrics["recall@10"] > best_recall:
                best_recall, best_epoch, best_valid, evals_without_gain = metrics["recall@10"], epoch, metrics, 0
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            else:
                evals_without_gain += 1
            bar.set_postfix(loss=f"{record['train_loss']:.3f}", r10=f"{metrics['recall@10']:.4f}",
                            best=f"{best_recall:.4f}@{best_epoch}")
            if not progress:  # no bar: one line per evaluation instead
                log(f"  epoch {epoch}: loss {record['train_loss']:.4f}, valid R@10 {metrics['recall@10']:.4f} "
                    f"(best {best_recall:.4f} @ {best_epoch}), epoch {epoch_time:.2f} s")
        history.append(record)
        if evals_without_gain >= tc.patience:
            break
        if time_limit_s is not None and time.perf_counter() - t_start > time_limit_s and best_state is not None:
            stopped_by_time = True
            log(f"  stopped by the time limit ({time_limit_s:.0f} s) after epoch {epoch}")
            break
    bar.close()

    model.load_state_dict(best_state)
    t0 = time.perf_counter()
    test_ranks = evaluate(test)
    sync()
    test_eval_s = time.perf_counter() - t0
    test_metrics = metrics_from_ranks(test_ranks)
    wall = time.perf_counter() - t_start
    epochs = len(history)
    timings = {"setup_s": setup_s, "train_s": train_s, "eval_s": eval_s, "test_eval_s": test_eval_s,
               "epoch_time_s": train_s / epochs, "examples_per_s": epochs * steps_per_epoch * batch_size / train_s,
               "valid_eval_s": eval_s / max(1, sum("valid_recall@10" in h for h in history)),
               "stopped_by_time_limit": float(stopped_by_time), "steps_per_epoch": steps_per_epoch,
               # real encoder tokens over encoder token slots computed per epoch (the rest is padding)
               "encoder_real_token_fraction": real_tokens * (steps_per_epoch * batch_size / n_train) / token_slots}
    log(f"[{config.dataset}/{config.variant}/seed{config.seed}] best epoch {best_epoch}/{epochs}: valid "
        f"R@10 {best_valid['recall@10']:.4f}, test R@10 {test_metrics['recall@10']:.4f} "
        f"NDCG@10 {test_metrics['ndcg@10']:.4f}; {wall:.1f} s")
    return RunResult(
        config=config, config_hash=config.config_hash(), device=describe_device(dev), wall_time_s=wall,
        epochs_trained=epochs, best_epoch=best_epoch, history=history, valid_metrics=best_valid,
        test_metrics=test_metrics,
        test_per_user={"user": test.user.cpu().numpy(), "target": test.target.cpu().numpy(),
                       "rank": test_ranks.cpu().numpy().astype(np.int64)},
        timings=timings)


STEP_MODES = ("eager", "compile", "cuda_graph", "compile_cuda_graph")


class TrainStep:
    """One optimisation step on the training examples at `idx` (a device tensor of indices, the same
    length at every call) with the encoder input cut to `enc_len` tokens; returns the loss as a
    device scalar (no host sync).

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
        self.model, self.train, self.mode, self.use_autocast = model, train, mode, use_autocast
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
            loss = self.loss_fn(self.train.enc_tokens[idx, :enc_len], self.train.target_sids[idx],
                                self.label_smoothing)
        loss.backward()
        self.optimizer.step()
        return loss.detach()

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


def describe_device(dev: torch.device) -> str:
    if dev.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(dev)}"
    return "cpu"
