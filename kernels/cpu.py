"""CPU kernels: a rule applied in one multithreaded, vectorised pass over flat buffers."""

import functools

import numpy as np
from numba import njit, prange

from . import _template, rules

# Every element is independent, so the result does not depend on the thread count.
# error_model="numpy" drops the division-by-zero check that would stop SIMD.
_OPTIONS = dict(parallel=True, cache=True, nogil=True, error_model="numpy")

# Below this size the serial loop wins: waking the worker threads costs more than they
# save. bench/crossover.py measures it; on 2 cores the two loops tie for Adam between
# 16k and 32k elements.
PARALLEL_MIN_SIZE = 1 << 14

_LOOPS = """\
, parallel):
    if parallel:
        for i in prange(p.size):
            {body}
    else:
        for i in range(p.size):
            {body}
"""


@functools.cache
def kernel(rule_name, present):
    """The compiled ``kernel(p, g, *present_state, h, parallel)`` for one rule.

    Pass ``parallel=p.size >= PARALLEL_MIN_SIZE``.

    ``present`` names the state buffers the caller holds, in the rule's order; the
    others are absent. Compilation happens on the first call, or loads from Numba's
    on-disk cache.
    """
    rule = getattr(rules, rule_name)
    namespace = {
        "__name__": __name__,  # Numba's cache re-imports this module when loading
        "rule": njit(inline="always", error_model="numpy")(rule),
        "prange": prange,
        "ZERO": np.float32(0),
    }
    driver = _template.build(rule, present, _LOOPS, namespace, __file__, repr(_OPTIONS))
    return njit(**_OPTIONS)(driver)
