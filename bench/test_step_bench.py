"""pytest-benchmark timings of one step of every algorithm and option path.

    pytest bench/ --benchmark-only

Sizes 1e3, 1e5, 1e6 and 1e7 on the CPU, and on CUDA when a GPU is present (not in the
simulator). Kept out of the test run (the tests live in tests/). For ratios against
torch and the memory bandwidth, run ``fastopt bench``.
"""

import sys
from pathlib import Path

import numpy as np
import pytest

import fastopt
from fastopt import bench

sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
from cases import ALL, case_id  # noqa: E402

SIZES = [1_000, 100_000, 1_000_000, 10_000_000]


def gpu():
    try:
        from numba import config, cuda
    except ImportError:
        return None
    return cuda if cuda.is_available() and not config.ENABLE_CUDASIM else None


DEVICES = ["cpu"] + (["cuda"] if gpu() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("case", ALL, ids=case_id)
def test_step(benchmark, case, n, device):
    name, kwargs = case
    rng = np.random.default_rng(0)
    p, g = (rng.standard_normal(n).astype(np.float32) for _ in range(2))
    if device == "cuda":
        cuda = gpu()
        p, g = cuda.to_device(p), cuda.to_device(g)
    opt = getattr(fastopt, name)(fastopt.adopt(p, bench.shapes(name, n), grads=g), **kwargs)
    opt.step()
    buffers = sum(hasattr(v, "shape") for v in opt.state.values())
    # One pass reads p, g and every state buffer and writes p and the state; the
    # algorithms of several passes count them all (their spec's moves).
    several = len(opt.spec.passes) > 1
    moved = opt.spec.moves if several else 4 * (3 + 2 * buffers)
    benchmark.extra_info["bytes_per_step"] = moved * n
    if device == "cuda":
        benchmark(lambda: (opt.step(), gpu().synchronize()))
    else:
        benchmark(opt.step)
