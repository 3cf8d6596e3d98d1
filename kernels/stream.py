"""The memory-bandwidth yardstick: an in-place STREAM-like ``a += s * c``.

An optimizer step updates its buffers in place, so this form (12 bytes per element, no
write-allocate) is its true ceiling; see DESIGN.md. Like the optimizer kernels, it runs
serially below ``cpu.PARALLEL_MIN_SIZE`` elements, where waking threads costs more than
it saves, so that it is the ceiling at every size.
"""

from numba import njit, prange

from .cpu import PARALLEL_MIN_SIZE


@njit(parallel=True, cache=True, nogil=True, error_model="numpy")
def _add_scaled(a, c, s, parallel):
    if parallel:
        for i in prange(a.size):
            a[i] += s * c[i]
    else:
        for i in range(a.size):
            a[i] += s * c[i]


def add_scaled(a, c, s):
    _add_scaled(a, c, s, a.size >= PARALLEL_MIN_SIZE)


BYTES_PER_ELEMENT = 12
