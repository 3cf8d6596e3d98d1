"""The memory-bandwidth yardstick: an in-place STREAM-like ``a += s * c``.

An optimizer step updates its buffers in place, so this form (12 bytes per element, no
write-allocate) is its true ceiling; see DESIGN.md.
"""

from numba import njit, prange


@njit(parallel=True, cache=True, nogil=True, error_model="numpy")
def add_scaled(a, c, s):
    for i in prange(a.size):
        a[i] += s * c[i]


BYTES_PER_ELEMENT = 12
