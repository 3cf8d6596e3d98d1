"""fastopt: optimizer steps as fused single-pass Numba kernels over flat buffers (float32,
or 16-bit with float32 arithmetic).

>>> import numpy as np, fastopt
>>> params = {"w": np.ones((3, 2), np.float32), "b": np.zeros(2, np.float32)}
>>> opt = fastopt.Adam(params, lr=0.1)
>>> opt.grads["w"][:] = 1.0
>>> opt.step()
>>> round(float(opt.params["w"][0, 0]), 6)  # Adam's first step moves by lr
0.9
"""

from . import _checkout  # noqa: F401  (first: a source checkout finds its kernels)
from . import schedules
from .checkpoint import save
from .ema import EMA
from .flat import adopt
from .optim import ALGORITHMS, Optimizer
from .optim.snapshot import load
from .scaler import DynamicLossScaler

__version__ = "0.1.0"


def set_num_threads(n):
    """Run the CPU kernels on ``n`` threads (at most ``NUMBA_NUM_THREADS``, which sets the
    size of Numba's thread pool at start-up)."""
    import numba

    numba.set_num_threads(n)


# Every algorithm of the registry (fastopt.optim.ALGORITHMS): fastopt.Adam, fastopt.SGD ...
globals().update(ALGORITHMS)

__all__ = [*ALGORITHMS, "EMA", "DynamicLossScaler", "Optimizer", "adopt", "load", "save",
           "schedules", "set_num_threads"]
