import copy
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


def snapshot(opt):
    """Copies of everything a refused call must leave alone: the parameters, the
    gradients and every state value (arrays as their bit patterns, and per-group lists
    copied, since the optimizer updates those in place)."""
    def frozen(value):
        if isinstance(value, np.ndarray):  # its bytes: 8-bit codes too
            return value.view(np.uint8).copy()
        return copy.deepcopy(value)

    return {"params": opt.flat_params.view(np.uint32).copy(),
            "grads": opt.flat_grads.view(np.uint32).copy(),
            "state": {k: frozen(v) for k, v in opt.state.items()}}


def assert_same(a, b, grads=True):
    """Two snapshots agree bit for bit; ``grads=False`` leaves the gradients out (a step
    that copies structured gradients into ``flat_grads`` changes them by design)."""
    np.testing.assert_array_equal(a["params"], b["params"])
    if grads:
        np.testing.assert_array_equal(a["grads"], b["grads"])
    assert a["state"].keys() == b["state"].keys()
    for key, value in a["state"].items():
        if isinstance(value, np.ndarray):
            np.testing.assert_array_equal(value, b["state"][key], err_msg=key)
        else:
            assert value == b["state"][key], key


def assert_unchanged(opt, before, grads=True):
    assert_same(snapshot(opt), before, grads)
