"""CUDA kernels: the same rules as the CPU, applied by a grid-stride loop.

Importing this module imports numba.cuda. Without a GPU it runs in Numba's simulator
when ``NUMBA_ENABLE_CUDASIM=1`` is set before numba is imported.
"""

import functools

import numpy as np
from numba import cuda

from . import _template, rules

# Launch shape. A grid-stride loop is correct for any shape; these defaults keep every
# SM busy on large buffers, and tests shrink them to make the stride loop wrap.
threads_per_block = 256
max_blocks = 1024

_LOOPS = """\
):
    i = cuda.grid(1)
    stride = cuda.gridsize(1)
    while i < p.size:
        {body}
        i += stride
"""


@functools.cache
def kernel(rule_name, present):
    """The compiled CUDA kernel ``kernel[grid, block](p, g, *present_state, h)``."""
    rule = getattr(rules, rule_name)
    namespace = {
        "__name__": __name__,
        "rule": cuda.jit(device=True)(rule),
        "cuda": cuda,
        "ZERO": np.float32(0),
    }
    return cuda.jit(cache=True)(_template.build(rule, present, _LOOPS, namespace, __file__, ""))


@cuda.jit(cache=True)
def fill(a, value):
    """Set every element of ``a`` to ``value``."""
    i = cuda.grid(1)
    stride = cuda.gridsize(1)
    while i < a.size:
        a[i] = value
        i += stride


def launch(compiled, n, *args):
    """Run ``compiled`` over ``n`` elements with a grid that covers them once."""
    if n == 0:
        return
    blocks = min(max_blocks, (n + threads_per_block - 1) // threads_per_block)
    compiled[blocks, threads_per_block](*args)
