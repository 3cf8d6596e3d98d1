"""fastopt's Numba kernels: the rules (``rules``) and their CPU and CUDA drivers.

``kernels.cuda`` imports numba.cuda, so it is only imported when a GPU array shows up.
"""

from ._template import Pass  # noqa: F401  (what a kernel does, as a key)
