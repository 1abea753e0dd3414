import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

# one thread: where the cores are few and busy, OpenMP threads spin-wait for each other and small-model
# training steps ran ~100x slower (measured on a loaded 2-core x86-64 machine: 4.5 s vs 0.03 s per step)
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed_everything():
    """Every test starts from the same RNG state, so failures reproduce."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture
def private_tempdir(monkeypatch):
    """The temporary folder for this test alone, in this process (tempfile) and in the processes it
    starts (TMPDIR): the notebook kernels' socket folders ("gbla-kernel-*") are made there, so that
    another process rendering a notebook at the same time (a second test run, a report) cannot add or
    remove folders that a test counts. Short, because a Unix socket path must be."""
    folder = tempfile.mkdtemp(prefix="gk-")
    monkeypatch.setattr(tempfile, "tempdir", folder)
    monkeypatch.setenv("TMPDIR", folder)
    yield Path(folder)
    shutil.rmtree(folder, ignore_errors=True)
