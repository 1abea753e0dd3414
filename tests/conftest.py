import os
import random

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
