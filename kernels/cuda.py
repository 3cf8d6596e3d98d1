"""CUDA kernels: the same rules as the CPU, applied by a grid-stride loop.

Importing this module imports numba.cuda. Without a GPU it runs in Numba's simulator
when ``NUMBA_ENABLE_CUDASIM=1`` is set before numba is imported.
"""

import functools

import numpy as np
from numba import cuda, float64, uint32

from . import _template, codecs, rules

# Launch shape. A grid-stride loop is correct for any shape; these defaults keep every
# SM busy on large buffers, and tests shrink them to make the stride loop wrap.
threads_per_block = 256
max_blocks = 1024

ZERO = _template.CONSTANTS["ZERO"]

_LOOPS = """\
{random_arguments}):
    {named}
    i = cuda.grid(1)
    stride = cuda.gridsize(1)
    while i < {first}.size:
        {body}
        i += stride
"""

# One block per chunk (a row of ``chunks``: segment, offset, size, draw), which its threads
# stride through; sums are added over the block (``block_reduce``) into ``partials[c]``.
_SEGMENT_LOOPS = """\
{random_arguments}, chunks, starts, state_starts, partials, row_scalars):
    c = cuda.blockIdx.x
    {named}
    shared = cuda.shared.array(MAX_THREADS, float64)
    base = starts[chunks[c, 0]] + chunks[c, 1]
    state_base = state_starts[chunks[c, 0]] + chunks[c, 1]
    {begin_sums}
    i = cuda.threadIdx.x
    while i < chunks[c, 2]:
        {segment_body}
        i += cuda.blockDim.x
    {block_sums}
    if cuda.threadIdx.x == 0:
        {store_sums}
"""

# The 8-bit formats' maps and encoding tables (codecs.tables()), which the block kernels
# take as arguments in global memory: as globals they would be constant memory, a copy
# per use (over its 64 KB with three 8-bit buffers), read one address at a time.
TABLES = tuple(codecs.tables())

# One block per row of ``blocks`` (segment, offset, size, small): a block of 8-bit state
# (see _template._block_steps), of the tensors from ``starts[segment] + offset``.
_BLOCK_LOOPS = """\
{random_arguments}, starts, blocks, state_starts{block_arguments}, """ + ", ".join(TABLES) + """):
    b = cuda.blockIdx.x
    {named}
    shared_bits = cuda.shared.array(MAX_THREADS, uint32)
    segment, offset, size, small = blocks[b, 0], blocks[b, 1], blocks[b, 2], blocks[b, 3]
    base = starts[segment] + offset
    state_base = state_starts[segment] + offset
    {block_steps}
"""

# The most threads a block may have: the size of the shared arrays a block reduces in.
MAX_THREADS = 1024


_prepare = cuda.jit(device=True)(rules.prepare)
_HELPERS = {helper.__name__: cuda.jit(device=True)(helper) for helper in rules.HELPERS}
_CODECS = codecs.compiled(cuda.jit(device=True))


@cuda.jit(device=True)
def _block_reduce(shared, value, largest):
    """The sum of ``value`` over the block's threads, in a fixed order, or with
    ``largest`` their largest value. Blocks must have a power-of-two number of threads."""
    t = cuda.threadIdx.x
    shared[t] = value
    cuda.syncthreads()
    width = cuda.blockDim.x // 2
    while width > 0:
        if t < width:
            other = shared[t + width]
            shared[t] = max(shared[t], other) if largest else shared[t] + other
        cuda.syncthreads()
        width //= 2
    total = shared[0]
    cuda.syncthreads()  # everyone has read shared[0] before it is reused
    return total


@cuda.jit(device=True)
def _add_to_sum(total, term):
    """A running sum's add (on the CPU, one that LLVM may reassociate)."""
    return total + term


@functools.cache
def _driver(spec, loops):
    # Cached by the Pass, so that every spelling of the same pass gets one driver.
    namespace = {
        "__name__": __name__,
        "rule": cuda.jit(device=True)(rules.calling(getattr(rules, spec.rule), _HELPERS)),
        "prepare": _prepare,
        "block_reduce": _block_reduce,
        "add_to_sum": _add_to_sum,
        "np": np,
        "cuda": cuda,
        "float64": float64,
        "uint32": uint32,
        "MAX_THREADS": MAX_THREADS,
        **_template.CONSTANTS,
        "NO_BITS": np.uint32(0),
        "MAGNITUDE": np.uint32(0x7FFFFFFF),
        **_CODECS,
    }
    return cuda.jit(cache=True)(_template.build(spec, loops, namespace, __file__,
                                                repr(MAX_THREADS)))


@functools.cache
def kernel(*spec):
    """The compiled CUDA kernel ``kernel[grid, block](*arrays, prep, h, [key, first])`` of
    the ``_template.Pass`` with the fields ``spec`` (``rule_name, present`` for a plain
    step) over flat buffers (``key`` and ``first`` with ``Pass.stochastic``)."""
    return _driver(_template.Pass(*spec), _LOOPS)


@functools.cache
def segment_kernel(*spec):
    """The compiled CUDA kernel ``kernel[chunks, block](*arrays, prep, h, [key, first,]
    chunks, starts, state_starts, partials, row_scalars)`` of a ``_template.Pass`` over
    segments (``key, first`` where it rounds stochastically): see
    ``fastopt._backend.Segments``; ``p`` and ``g`` are flat, indexed from ``starts``.
    Launch it with :func:`launch_segments`.

    A pass that keeps state in 8 bits (``codecs.QUANTIZED`` formats) walks blocks of
    state instead, one CUDA block each: ``kernel[blocks, block](*arrays, prep, h, [key,
    first,] starts, blocks, state_starts, *absmax_and_small, *tables)``, with rows
    ``(segment, offset, size, small)`` of ``blocks`` (see ``_template._block_chunk``),
    the tensors' segment k starting at ``starts[k]``, each 8-bit buffer's absmax and
    small arrays, and device copies of the tables named ``TABLES``."""
    spec = _template.Pass(*spec)
    blocks = any(f in codecs.QUANTIZED for _, f in spec.formats)
    return _driver(spec, _BLOCK_LOOPS if blocks else _SEGMENT_LOOPS)


def _reducing_threads():
    """``threads_per_block`` for a kernel whose blocks reduce (``_block_reduce``), which
    a number of threads other than a power of two up to MAX_THREADS would get wrong
    (checked for every launch of a block per row of a table: Adafactor's column sums,
    which do not reduce, too)."""
    if not (0 < threads_per_block <= MAX_THREADS
            and threads_per_block & (threads_per_block - 1) == 0):
        raise ValueError("kernels.cuda.threads_per_block must be a power of two, at most "
                         f"{MAX_THREADS}, got {threads_per_block!r}")
    return threads_per_block


def launch_segments(compiled, segments, starts, *args):
    """Run a :func:`segment_kernel` over ``segments`` (``fastopt._backend.Segments``),
    which start at ``starts`` of the flat buffers: a block per chunk."""
    blocks = segments.partials_host.shape[0]
    if blocks:
        compiled[blocks, _reducing_threads()](
            *_by_value(args), segments.chunks, starts, segments.state_starts,
            segments.partials, segments.row_scalars)


def launch_blocks(compiled, count, *args):
    """Run ``compiled`` (a pass over blocks of 8-bit state, or ``column_sums``) with
    ``count`` CUDA blocks."""
    if count:
        compiled[count, _reducing_threads()](*_by_value(args))


@cuda.jit(cache=True)
def fill(a, value):
    """Set every element of ``a`` to ``value``."""
    i = cuda.grid(1)
    stride = cuda.gridsize(1)
    while i < a.size:
        a[i] = value
        i += stride


def _by_value(args):
    """``args`` with the scalar tuples (``h``, ``prep``) as tuples of float32 (see
    ``_template.float32s``), which a launch passes by value."""
    return [tuple(_template.float32s(a)) if isinstance(a, tuple) else a for a in args]


def blocks(n):
    """The number of blocks a launch over ``n`` elements uses."""
    return min(max_blocks, -(-n // threads_per_block))


def launch(compiled, n, *args):
    """Run ``compiled`` over ``n`` elements with a grid that covers them once."""
    if n == 0:
        return
    compiled[blocks(n), threads_per_block](*_by_value(args))


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


# -- Adafactor's column sums (see kernels.cpu) ----------------------------------------


# The gradients' formats column_sums reads, by their index there: float32, or the bits
# of a 16-bit format.
GRADIENT_FORMATS = (None, "bfloat16", "float16")
_bfloat16_load, _float16_load = _CODECS["bfloat16_load"], _CODECS["float16_load"]


@cuda.jit(device=True)
def _gradient(value, fmt):
    """The float32 of a gradient element in the format ``GRADIENT_FORMATS[fmt]``."""
    if fmt == 1:
        return _bfloat16_load(value)
    if fmt == 2:
        return _float16_load(value)
    return np.float32(value)


@cuda.jit(cache=True)
def column_sums(g, starts, prep, table, out, fmt):
    """One block per block of rows, starting at ``starts[k]`` of the flat gradients (in
    the format ``GRADIENT_FORMATS[fmt]``), with ``(rows, columns, out_start, continued) =
    table[k]``: the sums of ``prepare(0, g)**2`` down its columns (see
    kernels.cpu.column_sums); one thread per column, each summing its column in row
    order."""
    k = cuda.blockIdx.x
    start, rows, columns, out_start = starts[k], table[k, 0], table[k, 1], table[k, 2]
    c = cuda.threadIdx.x
    while c < columns:
        total = out[out_start + c] if table[k, 3] else float64(0)
        for r in range(rows):
            x = float64(_prepare(ZERO, _gradient(g[start + r * columns + c], fmt), prep))
            total += x * x
        out[out_start + c] = total
        c += cuda.blockDim.x
