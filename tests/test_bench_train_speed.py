"""The training-speed benchmark's file handling (the timings themselves need a GPU)."""
import pytest
import torch

from gbla.bench import train_speed


@pytest.mark.filterwarnings("ignore:CUDA is not available")  # CPU-only here: CPU events only
def test_profile_steps_creates_the_out_folder(tmp_path):
    """`steps --profile --out NEWDIR` wrote its profile table before anything had created NEWDIR."""
    calls = []

    def step(idx, enc_len):
        calls.append(enc_len)
        return (torch.ones(4) * idx.float().sum()).sum()

    batches = [(13, torch.arange(4))] * 3
    path = tmp_path / "new" / "dir" / "profile_sa_auto.txt"
    result = train_speed.profile_steps(step, batches, path)
    assert path.is_file() and calls == [13, 13, 13]
    assert set(result) == {"kernels_per_step", "kernel_busy_ms_per_step"}


def test_variants_come_from_the_params_file():
    """The benchmark trains the grid's configs: sa and hybrid of the `full` profile are the configs its
    former built-in table gave (default model and train settings, the layouts below), so its earlier
    measurements and the grid's runs describe the same models."""
    from gbla.config import ModelConfig, RunConfig, TrainConfig

    ns = train_speed.build_parser().parse_args(["run", "--variant", "hybrid"])
    for variant, layout in (("sa", ("sa",) * 4), ("hybrid", ("sa", "gbla", "gbla", "sa"))):
        expected = RunConfig("beauty", variant, 3, model=ModelConfig(encoder_layout=layout),
                             train=TrainConfig(max_epochs=2))
        assert train_speed.run_config(ns, variant, 3, max_epochs=2).config_hash() == expected.config_hash()
    with pytest.raises(KeyError, match="no variant 'sa_causal'"):
        train_speed.run_config(ns, "sa_causal", 0)


def test_steps_has_no_warmup_flag():
    """Warm-up is per encoder length, until each is past TrainStep.WARMUP_STEPS (and captured): no count to set."""
    with pytest.raises(SystemExit):
        train_speed.build_parser().parse_args(["steps", "--warmup", "5"])


def test_throughput_times_each_attention_backend(tmp_path, monkeypatch):
    """--attention-backends torch auto: each path and mode is measured once per attention backend, the
    rows say which, and the markdown table keeps one cell per column (error rows too)."""
    from types import SimpleNamespace

    from gbla.bench import train_throughput as tt

    calls = []

    def fake_measure(configs, data, dev, steps, backend, eval_pass, mode="cuda_graph", attention_backend=None,
                     dropout_backend=None):
        calls.append((len(configs), backend, attention_backend))
        if attention_backend == "torch" and len(configs) == 1:
            raise RuntimeError("boom")
        return {"mode": mode, "ms_per_step": 2.0, "examples_per_s": 1000.0, "valid_eval_s": 1.5}

    config = SimpleNamespace(train=SimpleNamespace(batch_size=256), config_hash=lambda: "h")
    monkeypatch.setattr(tt, "load_data", lambda args: SimpleNamespace(provenance={"fingerprint": "f"}))
    monkeypatch.setattr(tt, "load_configs", lambda params, profile, dataset, variant, seeds: [config] * len(seeds))
    monkeypatch.setattr(tt, "measure", fake_measure)
    tt.main(["--variants", "sa", "--seeds", "2", "--attention-backends", "torch", "auto", "--backend", "auto",
             "--out", str(tmp_path)])
    assert calls == [(1, "auto", "torch"), (1, "auto", "auto"), (2, "auto", "torch"), (2, "auto", "auto")]
    import json
    rows = json.loads((tmp_path / "train_throughput.json").read_text())["rows"]
    assert [(r["path"], r["attention_backend"]) for r in rows] == [
        ("single", "torch"), ("single", "auto"), ("multi_seed", "torch"), ("multi_seed", "auto")]
    assert "error" in rows[0] and "error" not in rows[1]
    table = [line for line in (tmp_path / "train_throughput.md").read_text().splitlines() if line.startswith("|")]
    assert len({line.count("|") for line in table}) == 1, table
    assert "| attention |" in table[0]


def test_throughput_times_each_kernel_setting(tmp_path, monkeypatch):
    """--kernel-settings "" conv.bwd_rows=8: one row per setting, each measured with its overrides in the
    conv kernels' CONFIG_OVERRIDE (and nothing left there after); the command records the empty one."""
    import json
    from types import SimpleNamespace

    from gbla.bench import train_throughput as tt
    from gbla.ops.conv import triton as conv_kernels

    seen = []

    def fake_measure(configs, data, dev, steps, backend, eval_pass, mode="cuda_graph", attention_backend=None,
                     dropout_backend=None):
        seen.append(dict(conv_kernels.CONFIG_OVERRIDE))
        return {"mode": mode, "ms_per_step": 2.0, "examples_per_s": 1000.0, "valid_eval_s": None}

    config = SimpleNamespace(train=SimpleNamespace(batch_size=256), config_hash=lambda: "h")
    monkeypatch.setattr(tt, "load_data", lambda args: SimpleNamespace(provenance={"fingerprint": "f"}))
    monkeypatch.setattr(tt, "load_configs", lambda params, profile, dataset, variant, seeds: [config] * len(seeds))
    monkeypatch.setattr(tt, "measure", fake_measure)
    argv = ["--variants", "hybrid", "--seeds", "2", "--paths", "multi_seed", "--kernel-settings", "",
            "conv.bwd_rows=8", "--out", str(tmp_path)]
    tt.main(argv)
    assert seen == [{}, {"bwd_rows": 8}] and conv_kernels.CONFIG_OVERRIDE == {}
    result = json.loads((tmp_path / "train_throughput.json").read_text())
    assert [r["kernels"] for r in result["rows"]] == ["default", "conv.bwd_rows=8"]
    assert "--kernel-settings '' conv.bwd_rows=8" in result["meta"]["command"]
    table = [line for line in (tmp_path / "train_throughput.md").read_text().splitlines() if line.startswith("|")]
    assert len({line.count("|") for line in table}) == 1 and ", conv.bwd_rows=8) |" in table[-1], table
    with pytest.raises(SystemExit):   # a bad setting stops before anything is measured
        tt.main(["--kernel-settings", "conv.bwd_rows"])
    assert len(seen) == 2


def test_throughput_times_each_dropout_backend(tmp_path, monkeypatch):
    """--dropout-backends torch auto: one row per FFN backend, which reaches the model: the FFN modules
    of the measured model run on the backend named (the other ops keep --backend)."""
    import json
    from types import SimpleNamespace

    from gbla.bench import train_throughput as tt
    from gbla.model import DecoderBlock, EncoderBlock, FeedForward

    seen = []

    def fake_measure(configs, data, dev, steps, backend, eval_pass, mode="cuda_graph", attention_backend=None,
                     dropout_backend=None):
        seen.append((backend, dropout_backend))
        return {"mode": mode, "ms_per_step": 2.0, "examples_per_s": 1000.0, "valid_eval_s": None}

    config = SimpleNamespace(train=SimpleNamespace(batch_size=256), config_hash=lambda: "h")
    monkeypatch.setattr(tt, "load_data", lambda args: SimpleNamespace(provenance={"fingerprint": "f"}))
    monkeypatch.setattr(tt, "load_configs", lambda params, profile, dataset, variant, seeds: [config] * len(seeds))
    monkeypatch.setattr(tt, "measure", fake_measure)
    tt.main(["--variants", "hybrid", "--seeds", "2", "--paths", "multi_seed", "--dropout-backends", "torch", "auto",
             "--backend", "auto", "--out", str(tmp_path)])
    assert seen == [("auto", "torch"), ("auto", "auto")]
    rows = json.loads((tmp_path / "train_throughput.json").read_text())["rows"]
    assert [r["dropout_backend"] for r in rows] == ["torch", "auto"]
    table = [line for line in (tmp_path / "train_throughput.md").read_text().splitlines() if line.startswith("|")]
    assert len({line.count("|") for line in table}) == 1 and "| dropout |" in table[0], table

    # group_step hands the backend to every FeedForward and block of the model it builds
    from gbla.data.synthetic import make_synthetic_dataset
    from gbla.params import load_grid

    grid = load_grid(str(tt.REPO_ROOT / "params" / "ablations.yaml"), "smoke")
    configs = [grid.run_config("synthetic", "hybrid", s) for s in (0, 1)]
    data = make_synthetic_dataset(num_users=30, num_items=25, seed=1)
    model = tt.group_step(configs, data, tt.torch.device("cpu"), "auto", "eager", dropout_backend="triton")[0]
    ffns = [m for m in model.modules() if isinstance(m, FeedForward)]
    blocks = [m for m in model.modules() if isinstance(m, (EncoderBlock, DecoderBlock))]
    assert ffns and all(m.backend == "triton" for m in ffns)
    assert len(blocks) == len(model.encoder) + len(model.decoder) and all(m.residual_backend == "triton" for m in blocks)
    assert all(m.self_attn.backend == "auto" for m in model.decoder)


def test_baseline_commit_never_names_the_enclosing_checkout(tmp_path, monkeypatch):
    """A baseline tree exported inside a checkout (no .git of its own) is labelled neither with that
    checkout's HEAD nor with $GBLA_COMMIT: its COMMIT file names it, else it is "unknown"; a checkout
    of its own reports its HEAD."""
    import subprocess

    from gbla.bench.train_throughput import baseline_commit

    monkeypatch.setenv("GBLA_COMMIT", "f" * 40)
    repo = tmp_path / "checkout"
    exported = repo / ".carry" / "baseline"
    exported.mkdir(parents=True)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(repo)]
    subprocess.run(git + ["init", "-q"], check=True)
    (repo / "x").write_text("x")
    subprocess.run(git + ["add", "x"], check=True)
    subprocess.run(git + ["commit", "-qm", "x"], check=True)
    head = subprocess.run(git + ["rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()

    assert baseline_commit(exported) == "unknown"
    (exported / "COMMIT").write_text("a6cdca1\n")
    assert baseline_commit(exported) == "a6cdca1"
    assert baseline_commit(repo) == head


def test_processes_are_timed_together_over_one_window(tmp_path):
    """--processes: worker processes (here 2, on the CPU, the smoke profile's synthetic data) each
    warm up, wait for the other, then time the same number of multi-seed steps; the row's examples/s
    is all their examples over the window from the first start to the last end, and the windows
    overlap (the barrier held)."""
    import json

    from gbla.bench import train_throughput as tt

    out = tmp_path / "bench"
    assert tt.main(["--profile-name", "smoke", "--dataset", "synthetic", "--variants", "hybrid", "--seeds", "2",
                    "--steps", "3", "--paths", "single", "--processes", "2", "--out", str(out)]) == 0
    rows = json.loads((out / "train_throughput.json").read_text())["rows"]
    single, together = rows
    assert single["path"] == "single" and "error" not in single
    # the validation pass three ways, side by side: cache, full prefix, cache on the general forward
    assert all(single[key] > 0 for key, _, _ in tt.EVAL_SETTINGS), single
    # each timed after the same full pass untimed (its compilation), recorded apart
    assert all(single[key.removesuffix("_s") + "_warmup_s"] > 0 for key, _, _ in tt.EVAL_SETTINGS), single
    assert together["processes"] == 2 and together["mps"] is False and "error" not in together, together
    assert len(together["per_process_examples_per_s"]) == 2
    assert together["overlap_s"] > 0
    examples = 2 * 3 * 2 * together["batch_size_per_seed"]   # processes x steps x seeds x batch
    assert together["examples_per_s"] == pytest.approx(examples / together["window_s"])
    assert together["examples_per_s"] <= sum(together["per_process_examples_per_s"]) * (1 + 1e-9)
    table = [line for line in (out / "train_throughput.md").read_text().splitlines() if line.startswith("|")]
    assert len({line.count("|") for line in table}) == 1, table


def test_profile_writes_the_step_and_a_validation_batch(tmp_path):
    """--profile: the kernel table of eager multi-seed steps and, beside it, one of a validation batch
    with its wall time (on the CPU there are no kernels: the tables hold the CPU ops)."""
    import json

    from gbla.bench import train_throughput as tt

    out = tmp_path / "bench"
    assert tt.main(["--profile-name", "smoke", "--dataset", "synthetic", "--variants", "hybrid", "--seeds", "2",
                    "--steps", "2", "--paths", "multi_seed", "--profile", "--out", str(out)]) == 0
    prof = json.loads((out / "train_throughput.json").read_text())["profiles"]["hybrid"]
    assert prof["profile_file"] == "train_profile_hybrid_k2.txt" and prof["eval_profile_file"] == "train_profile_hybrid_k2_eval.txt"
    assert prof["eval_users"] > 0 and prof["eval_wall_ms"] > 0
    text = (out / prof["eval_profile_file"]).read_text()
    assert text.startswith("# one validation batch: beam search") and "aten::" in text
