import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))

SIZES = [0, 1, 7, 1000, 100003]
STEPS = 30


def gradients(seed, n, steps=STEPS):
    """Fresh float32 gradients for every step, the same for every implementation."""
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(n).astype(np.float32) for _ in range(steps)]


def initial_params(seed, n):
    return np.random.default_rng(seed + 1000).standard_normal(n).astype(np.float32)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
