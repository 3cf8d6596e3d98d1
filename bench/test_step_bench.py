"""pytest-benchmark timings of one step of every algorithm and option path.

    pytest bench/ --benchmark-only

Kept out of the test run (the tests live in tests/). For ratios against torch and the
memory bandwidth, run bench/adam_vs_torch.py.
"""

import sys
from pathlib import Path

import numpy as np
import pytest

import fastopt

sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
from cases import ALL, case_id  # noqa: E402


@pytest.mark.parametrize("n", [1_000, 100_000, 1_000_000])
@pytest.mark.parametrize("case", ALL, ids=case_id)
def test_step(benchmark, case, n):
    name, kwargs = case
    rng = np.random.default_rng(0)
    opt = getattr(fastopt, name)(fastopt.adopt(rng.standard_normal(n).astype(np.float32)),
                                 **kwargs)
    opt.flat_grads[:] = rng.standard_normal(n).astype(np.float32)
    opt.step()
    buffers = sum(isinstance(v, np.ndarray) for v in opt.state.values())
    # p and every state buffer are read and written, g is read.
    benchmark.extra_info["bytes_per_step"] = 4 * n * (3 + 2 * buffers)
    benchmark(opt.step)
