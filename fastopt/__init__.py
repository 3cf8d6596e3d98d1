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

import sys

from . import _checkout  # noqa: F401  (first: a source checkout finds its kernels)
from . import checkpoint, schedules
from .ema import EMA
from .flat import adopt
from .optim import ALGORITHMS, Optimizer
from .optim.snapshot import load
from .scaler import DynamicLossScaler

__version__ = "0.1.0"


def save(opt, path):
    """Write ``opt``'s checkpoint to ``path``, atomically: a NumPy optimizer's to one file
    (:func:`fastopt.checkpoint.save`; ``fastopt.load(path)`` or ``opt.load(path)``
    reads it), a fastopt.torch optimizer's to a folder of one file per rank and an index
    (:meth:`fastopt.torch.Optimizer.save`; ``opt.load(path)`` reads it)."""
    torch_front = sys.modules.get("fastopt.torch")  # loaded if opt can be one of its
    if torch_front is not None and isinstance(opt, torch_front.Optimizer):
        return opt.save(path)
    if not isinstance(opt, Optimizer):
        raise TypeError(f"save takes a fastopt optimizer (fastopt.Adam(...), or a "
                        f"fastopt.torch one) and a path, got {type(opt).__name__}")
    return checkpoint.save(opt, path)


def set_num_threads(n):
    """Run the CPU kernels on ``n`` threads (at most ``NUMBA_NUM_THREADS``, which sets the
    size of Numba's thread pool at start-up), for the steps taken from the Python thread
    that calls it, as ``numba.set_num_threads``. No result depends on the count."""
    import numba

    numba.set_num_threads(n)


# Every algorithm of the registry (fastopt.optim.ALGORITHMS): fastopt.Adam, fastopt.SGD ...
globals().update(ALGORITHMS)

__all__ = [*ALGORITHMS, "EMA", "DynamicLossScaler", "Optimizer", "adopt", "load", "save",
           "schedules", "set_num_threads"]
