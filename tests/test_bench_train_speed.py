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
