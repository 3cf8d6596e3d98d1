"""CUDA kernels: the same rules as the CPU, applied by a grid-stride loop.

Importing this module imports numba.cuda. Without a GPU it runs in Numba's simulator
when ``NUMBA_ENABLE_CUDASIM=1`` is set before numba is imported.
"""

import functools

import numpy as np
from numba import cuda, float64

from . import _template, rules

# Launch shape. A grid-stride loop is correct for any shape; these defaults keep every
# SM busy on large buffers, and tests shrink them to make the stride loop wrap.
threads_per_block = 256
max_blocks = 1024

ZERO = np.float32(0)  # a state a driver does not hold reads as this

_LOOPS = """\
):
    {named}
    i = cuda.grid(1)
    stride = cuda.gridsize(1)
    while i < p.size:
        {body}
        i += stride
"""


_prepare = cuda.jit(device=True)(rules.prepare)


@functools.cache
def kernel(rule_name, present):
    """The compiled CUDA kernel ``kernel[grid, block](p, g, *present_state, prep, h)``."""
    rule = getattr(rules, rule_name)
    namespace = {
        "__name__": __name__,
        "rule": cuda.jit(device=True)(rule),
        "prepare": _prepare,
        "cuda": cuda,
        "ZERO": ZERO,
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


def blocks(n):
    """The number of blocks a launch over ``n`` elements uses."""
    return min(max_blocks, -(-n // threads_per_block))


def launch(compiled, n, *args):
    """Run ``compiled`` over ``n`` elements with a grid that covers them once."""
    if n == 0:
        return
    compiled[blocks(n), threads_per_block](*_template.plain_tuples(args))


# -- reductions ---------------------------------------------------------------------
#
# Each block sums a fixed set of elements in a fixed order and writes one float64
# partial; the host adds the partials in order. For a given launch shape the result
# is the same on every run. Blocks must have a power-of-two number of threads.

MAX_THREADS = 1024


@cuda.jit(device=True)
def _block_sum(shared, value):
    t = cuda.threadIdx.x
    shared[t] = value
    cuda.syncthreads()
    width = cuda.blockDim.x // 2
    while width > 0:
        if t < width:
            shared[t] += shared[t + width]
        cuda.syncthreads()
        width //= 2
    total = shared[0]
    cuda.syncthreads()  # everyone has read shared[0] before it is reused
    return total


@cuda.jit(cache=True)
def sum_squares(g, partials):
    """``partials[block]``: the float64 sum of ``g[i]**2`` over the block's elements."""
    shared = cuda.shared.array(MAX_THREADS, float64)
    total = float64(0)
    i = cuda.grid(1)
    while i < g.size:
        x = float64(g[i])
        total += x * x
        i += cuda.gridsize(1)
    total = _block_sum(shared, total)
    if cuda.threadIdx.x == 0:
        partials[cuda.blockIdx.x] = total


# -- kernels outside the optimizer template ----------------------------------------

_swats_adam = cuda.jit(device=True)(rules.swats_adam)
_ema = cuda.jit(device=True)(rules.ema)


@cuda.jit(cache=True)
def swats_adam(p, g, exp_avg, exp_avg_sq, prep, h, partials):
    """SWATS's Adam step; ``partials[block] = (d.d, d.g)`` over the block's elements."""
    h = rules.SWATSAdamScalars(*h)
    shared = cuda.shared.array(MAX_THREADS, float64)
    direction_sq = direction_g = float64(0)
    i = cuda.grid(1)
    while i < p.size:
        grad = _prepare(p[i], g[i], prep)
        p[i], exp_avg[i], exp_avg_sq[i], d = _swats_adam(p[i], grad, exp_avg[i],
                                                         exp_avg_sq[i], h)
        direction_sq += float64(d) * float64(d)
        direction_g += float64(d) * float64(grad)
        i += cuda.gridsize(1)
    direction_sq = _block_sum(shared, direction_sq)
    direction_g = _block_sum(shared, direction_g)
    if cuda.threadIdx.x == 0:
        partials[cuda.blockIdx.x, 0] = direction_sq
        partials[cuda.blockIdx.x, 1] = direction_g


@cuda.jit(cache=True)
def ema(average, value, h):
    h = rules.EMAScalars(*h)
    i = cuda.grid(1)
    while i < average.size:
        average[i] = _ema(average[i], value[i], h)
        i += cuda.gridsize(1)


@cuda.jit(cache=True)
def add_scaled(a, c, s):
    """The in-place stream ``a += s * c``: the bandwidth yardstick on the device."""
    i = cuda.grid(1)
    while i < a.size:
        a[i] += s * c[i]
        i += cuda.gridsize(1)


@cuda.jit(cache=True)
def scale_into(out, a, s):
    """``out = s * a``."""
    i = cuda.grid(1)
    while i < out.size:
        out[i] = s * a[i]
        i += cuda.gridsize(1)


# -- segmented reductions and layer-wise steps ---------------------------------------
#
# One block per piece (see fastopt.flat.pieces): launch with ``launch_pieces``. A
# block sums its piece in a fixed order into partials[k].

_lamb = cuda.jit(device=True)(rules.lamb)
_lars = cuda.jit(device=True)(rules.lars)


def launch_pieces(compiled, pieces, *args):
    """Run ``compiled`` with one block per piece (or per row block of the column sums)."""
    if pieces:
        compiled[pieces, threads_per_block](*_template.plain_tuples(args))


@cuda.jit(cache=True)
def segment_norms(p, g, prep, starts, stops, partials):
    """``partials[k] = (sum p**2, sum prepare(p, g)**2)`` over piece k, in float64."""
    shared = cuda.shared.array(MAX_THREADS, float64)
    k = cuda.blockIdx.x
    param_sq = grad_sq = float64(0)
    i = starts[k] + cuda.threadIdx.x
    while i < stops[k]:
        x, y = float64(p[i]), float64(_prepare(p[i], g[i], prep))
        param_sq += x * x
        grad_sq += y * y
        i += cuda.blockDim.x
    param_sq = _block_sum(shared, param_sq)
    grad_sq = _block_sum(shared, grad_sq)
    if cuda.threadIdx.x == 0:
        partials[k, 0] = param_sq
        partials[k, 1] = grad_sq


@cuda.jit(cache=True)
def lamb_moments(p, g, exp_avg, exp_avg_sq, prep, h, starts, stops, partials):
    """LAMB's first pass: the moments, and ``partials[k] = (sum p**2, sum u**2)``."""
    h = rules.LAMBScalars(*h)
    shared = cuda.shared.array(MAX_THREADS, float64)
    k = cuda.blockIdx.x
    param_sq = update_sq = float64(0)
    i = starts[k] + cuda.threadIdx.x
    while i < stops[k]:
        exp_avg[i], exp_avg_sq[i], u = _lamb(p[i], _prepare(p[i], g[i], prep), exp_avg[i],
                                             exp_avg_sq[i], h)
        param_sq += float64(p[i]) * float64(p[i])
        update_sq += float64(u) * float64(u)
        i += cuda.blockDim.x
    param_sq = _block_sum(shared, param_sq)
    update_sq = _block_sum(shared, update_sq)
    if cuda.threadIdx.x == 0:
        partials[k, 0] = param_sq
        partials[k, 1] = update_sq


@cuda.jit(cache=True)
def lamb_step(p, exp_avg, exp_avg_sq, h, starts, stops, trust_lr):
    """LAMB's second pass: ``p -= trust_lr[k] * u`` over piece k."""
    h = rules.LAMBScalars(*h)
    k = cuda.blockIdx.x
    i = starts[k] + cuda.threadIdx.x
    while i < stops[k]:
        p[i] -= trust_lr[k] * _lamb(p[i], ZERO, exp_avg[i], exp_avg_sq[i], h)[2]
        i += cuda.blockDim.x


@cuda.jit(cache=True)
def lars_step(p, g, momentum_buffer, prep, h, starts, stops, trust_lr):
    """LARS's step over piece k, with its tensor's ``trust_lr[k]`` for ``h.trust_lr``."""
    k = cuda.blockIdx.x
    h = rules.LARSScalars(*h)
    h = rules.LARSScalars(trust_lr=trust_lr[k], momentum=h.momentum, weight_decay=h.weight_decay)
    i = starts[k] + cuda.threadIdx.x
    while i < stops[k]:
        p[i], momentum_buffer[i] = _lars(p[i], _prepare(p[i], g[i], prep), momentum_buffer[i],
                                         h)
        i += cuda.blockDim.x


# -- Adafactor ---------------------------------------------------------------------------

_adafactor = cuda.jit(device=True)(rules.adafactor)


@cuda.jit(cache=True)
def column_sums(p, g, prep, blocks, out):
    """One block per row of ``blocks`` (see kernels.cpu.column_sums), one thread per
    column, each summing its column in row order."""
    k = cuda.blockIdx.x
    start, rows, columns, out_start = blocks[k, 0], blocks[k, 1], blocks[k, 2], blocks[k, 3]
    c = cuda.threadIdx.x
    while c < columns:
        total = float64(0)
        for r in range(rows):
            x = float64(_prepare(p[start + r * columns + c], g[start + r * columns + c], prep))
            total += x * x
        out[out_start + c] = total
        c += cuda.blockDim.x


@cuda.jit(cache=True)
def adafactor(p, g, prep, col_var, variance, h, starts, stops, second_starts, factored,
              row_scales, partials, decay, step_sizes, apply):
    """One block per piece; see kernels.cpu.adafactor."""
    shared = cuda.shared.array(MAX_THREADS, float64)
    k = cuda.blockIdx.x
    h = rules.AdafactorScalars(*h)
    fixed = rules.AdafactorScalars(beta=h.beta, eps1_sq=h.eps1_sq, moving=False)
    update_sq = float64(0)
    i = starts[k] + cuda.threadIdx.x
    while i < stops[k]:
        j = second_starts[k] + i - starts[k]
        grad = _prepare(p[i], g[i], prep)
        if factored[k]:
            _, u, u_sq = _adafactor(grad, row_scales[k] * col_var[j], fixed)
        else:
            variance[j], u, u_sq = _adafactor(grad, variance[j], h)
        if apply:
            p[i] = p[i] * decay - step_sizes[k] * u
        else:
            update_sq += float64(u_sq)
        i += cuda.blockDim.x
    update_sq = _block_sum(shared, update_sq)
    if cuda.threadIdx.x == 0:
        partials[k, 0] = update_sq
