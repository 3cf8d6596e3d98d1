"""CPU kernels: a rule applied in one multithreaded, vectorised pass over flat buffers."""

import functools
import inspect
import textwrap

import numpy as np
from numba import carray, njit, prange, types
from numba.core.extending import intrinsic, overload

# The thread count as prange reads it, by the symbol that Numba's threading layer
# registers. numba.get_num_threads() compiles to a ctypes pointer, which keeps a kernel
# out of Numba's on-disk cache: it is the fallback, for a Numba without the intrinsic.
try:
    from numba.np.ufunc.parallel import _iget_num_threads as thread_count
except ImportError:
    from numba import get_num_threads as thread_count

from . import _fp_mode, _template, codecs, rules, x86

# Every element is independent, so the result does not depend on the thread count.
# error_model="numpy" drops the division-by-zero check that would stop SIMD.
_OPTIONS = dict(parallel=True, cache=True, nogil=True, error_model="numpy")

# Below this size the serial loop wins: waking the worker threads costs more than they
# save. bench/crossover.py measures it; on 2 cores the two loops tie for Adam between
# 16k and 32k elements.
PARALLEL_MIN_SIZE = 1 << 14

# The parallel loop hands out chunks of at most this many elements: each thread switches
# its denormal handling once per chunk, and each chunk's loop runs over slices, indexed
# from 0, which LLVM vectorises with contiguous loads.
CHUNK = 1 << 14

# Chunks are cut at multiples of this many elements, so that only a buffer's last chunk
# ends in a partial vector.
VECTOR = 64

# 0, 1, 2 ... as uint32, from which the loops of a stochastic pass, no longer than this,
# count their elements' indices for the random bits (see _template.build's body).
LANES = np.arange(max(CHUNK, _template.SEGMENT_CHUNK), dtype=np.uint32)

# Subnormal numbers (below 1.2e-38) make x86 arithmetic 10-100x slower. With this set,
# the kernels flush them to zero (the FTZ and DAZ bits of MXCSR, as
# torch.set_flush_denormal(True) does); each kernel restores the caller's setting.
FLUSH_DENORMALS = True

ZERO = _template.CONSTANTS["ZERO"]

_LOOPS = """\
{random_arguments}, parallel, flush_denormals):
    if parallel:
        chunk_size = even_chunk({first}.size, thread_count(), CHUNK, VECTOR)
        for c in prange(({first}.size + chunk_size - 1) // chunk_size):
            {named}
            saved = denormals_off(flush_denormals)
            start = c * chunk_size
            stop = min(start + chunk_size, {first}.size)
            {slices}
            {chunk}
            restore_fp_mode(saved)
    else:
        {named}
        saved = denormals_off(flush_denormals)
        for c in range(({first}.size + CHUNK - 1) // CHUNK):
            start = c * CHUNK
            stop = min(start + CHUNK, {first}.size)
            {slices}
            {chunk}
        restore_fp_mode(saved)
"""


# Over blocks of 8-bit state (_template._block_chunk): each thread takes at most this many
# blocks at a time, in even chunks as the flat loop's (even_chunk).
BLOCKS_PER_CHUNK = CHUNK // codecs.BLOCK

_BLOCK_LOOPS = """\
{random_arguments}, blocks, state_starts{block_arguments}, parallel, flush_denormals):
    if parallel:
        per_chunk = even_chunk(blocks.shape[0], thread_count(), BLOCKS_PER_CHUNK, 1)
        for c in prange((blocks.shape[0] + per_chunk - 1) // per_chunk):
            {named}
            saved = denormals_off(flush_denormals)
            {block_chunk}
            restore_fp_mode(saved)
    else:
        {named}
        saved = denormals_off(flush_denormals)
        per_chunk = BLOCKS_PER_CHUNK
        for c in range((blocks.shape[0] + per_chunk - 1) // per_chunk):
            {block_chunk}
        restore_fp_mode(saved)
"""


# One chunk of one segment: p_c and g_c are arrays over the tensors' own memory.
_SEGMENT_CHUNK = """\
{named}
size = chunks[c, 2]
{tensor_chunks}
start = state_starts[chunks[c, 0]] + chunks[c, 1]
stop = start + size
{state_slices}
{chunk_in_segment}
{store_sums}
"""
# Each thread takes an even share of the chunks, one run of them as prange would hand it
# out, and switches its denormal handling once for all of them: switched per chunk
# (reading and writing MXCSR), chunks of one element (FSDP2's sums by rows of a vector)
# took 2.5x as long (bench/segment_chunks.py, AMD Zen 5).
_SEGMENT_LOOPS = ("{random_arguments}, chunks, state_starts, partials, row_scalars, parallel, "
                  "flush_denormals):\n"
                  "    if parallel:\n"
                  "        runs = min(chunks.shape[0], thread_count())\n"
                  "        for run in prange(runs):\n"
                  "            saved = denormals_off(flush_denormals)\n"
                  "            for c in range(chunks.shape[0] * run // runs, "
                  "chunks.shape[0] * (run + 1) // runs):\n"
                  + textwrap.indent(_SEGMENT_CHUNK, " " * 16)
                  + "            restore_fp_mode(saved)\n"
                  "    else:\n"
                  "        saved = denormals_off(flush_denormals)\n"
                  "        for c in range(chunks.shape[0]):\n"
                  + textwrap.indent(_SEGMENT_CHUNK, " " * 12)
                  + "        restore_fp_mode(saved)\n")


@njit(inline="always")
def even_chunk(size, threads, most, multiple):
    """The size of the parallel loop's chunks of ``size`` elements (or blocks) on
    ``threads`` threads: a multiple of ``multiple``, at most ``most``, and cut so that
    the chunks come to a multiple of ``threads`` (or, after rounding, a few less).
    prange gives each thread an equal run of iterations, so 7 chunks of CHUNK on 2
    threads left one thread 4: Adam at 1e5 ran 1.32x faster on two threads than on one,
    and 1.75x in 8 even chunks (AMD Zen 5)."""
    chunks = max((size + most - 1) // most, 1)
    chunks = (chunks + threads - 1) // threads * threads
    even = (size + chunks - 1) // chunks
    return max((even + multiple - 1) // multiple * multiple, multiple)


def _inline(function):
    return njit(inline="always", error_model="numpy")(function)


_prepare = _inline(rules.prepare)
_HELPERS = {helper.__name__: _inline(helper) for helper in rules.HELPERS}
_CODECS = codecs.compiled(_inline)
if x86.F16C:
    _CODECS.update(float16_load=x86.float16_load, float16_store=x86.float16_store,
                   float16_rounded=x86.float16_store)


@njit(inline="always", error_model="numpy")
def decode_block_by_lookups(codes, table, scale, out):
    """``x86.decode_block``'s values by table lookups (gathers), for CPUs without
    AVX-512."""
    for i in range(codecs.BLOCK):
        out[i] = table[codes[i]] * scale


_dynamic_bucket, _dynamic_code, _scaled_positive = (
    _CODECS["dynamic_bucket"], _CODECS["dynamic_code"], _CODECS["scaled_positive"])


@njit(inline="always", error_model="numpy")
def _scaled(value, inverse, unsigned):
    """``value * inverse`` as the map encodes it: in an unsigned map, never 0 for a
    positive ``value`` (``codecs.scaled_positive``)."""
    x = value * inverse
    return _scaled_positive(x, value) if unsigned else x


@njit(inline="always", error_model="numpy")
def encode_block_by_lookups(values, inverse, table, codes, entries, unsigned):
    """``codes[i]``: the code of ``values[i] * inverse`` for the BLOCK float32 ``values``,
    through ``table``, the map's buckets (``codecs.QUANTIZED``), in one loop whose table
    look-up compiles to a gather where LLVM finds gathers fast (AVX-512). ``entries``
    (BLOCK int32) is the scratch that :func:`encode_block_in_steps` takes. ``unsigned``
    (a constant where the drivers inline it): the map is unsigned, which never stores a
    positive value as 0 (``codecs.scaled_positive``)."""
    for i in range(codecs.BLOCK):
        x = _scaled(values[i], inverse, unsigned)
        codes[i] = _dynamic_code(x, table[_dynamic_bucket(x)])


@njit(inline="always", error_model="numpy")
def encode_block_in_steps(values, inverse, table, codes, entries, unsigned):
    """:func:`encode_block_by_lookups`' codes, with the look-ups in a loop of their own
    (into ``entries``): where LLVM finds gathers slow (AVX2 on AMD Zen 3) it does not
    vectorise a loop that holds one, and the two loops around this one vectorise (the
    encoding took a third as long there, 0.74 ns an element against 1.9). The drivers
    take it wherever they do not take AVX-512's permutes, on CPUs where it is not
    measured too (Intel's without AVX-512, ARM): its codes are the same either way."""
    for i in range(codecs.BLOCK):
        entries[i] = _dynamic_bucket(_scaled(values[i], inverse, unsigned))
    for i in range(codecs.BLOCK):
        entries[i] = table[entries[i]]
    for i in range(codecs.BLOCK):
        codes[i] = _dynamic_code(_scaled(values[i], inverse, unsigned), entries[i])


# How a whole block of 8-bit state is decoded and encoded (_template._block_chunk): on
# AVX-512 with permutes and one loop with gathers, elsewhere by look-ups in loops of
# their own.
_DECODE_BLOCK = x86.decode_block if x86.AVAILABLE else decode_block_by_lookups
_ENCODE_BLOCK = encode_block_by_lookups if x86.AVAILABLE else encode_block_in_steps

# Whether the chunk functions, where the passes' loops run, ask LLVM for 512-bit vectors
# (x86.prefer_512_bit_vectors) where AVX-512 compiles.
WIDE_VECTORS = x86.AVAILABLE


@njit(inline="always")
def _keep_vector_width():
    pass


def _pointer_at(element):
    @intrinsic
    def at(typingctx, address):
        def codegen(context, builder, signature, args):
            return builder.inttoptr(args[0], context.get_value_type(signature.return_type))
        return types.CPointer(element)(types.intp), codegen
    return at


# The pointers to memory ``address`` (an integer) of float32 elements, or of 16-bit
# ones (their bits), which numba.carray turns into arrays: tensors that fastopt does
# not own are stepped where they lie.
float32_at = _pointer_at(types.float32)
bits_at = _pointer_at(types.uint16)


@intrinsic
def add_to_sum(typingctx, total, term):
    """``total + term`` (float64) for a running sum, whose adds LLVM may reassociate:
    split over several accumulators and vectorise (in an order fixed at compile time;
    in order, their latency bounds the loop, 5.6x as long). Only the sums' adds:
    fastmath={"reassoc"} on a whole pass re-associated its rule too, whose
    (1 - beta2) * g * g became (1 - beta2) * (g * g), infinite above |g| = 1.8e19
    where torch's is finite (LAMB's and SWATS's second moments)."""
    if not (total == types.float64 and term == types.float64):
        return None

    def codegen(context, builder, signature, arguments):
        return builder.fadd(*arguments, flags=("reassoc",))
    return types.float64(total, term), codegen


@njit(inline="always")
def _tensor_part(address, offset, size):
    """``size`` float32 elements from element ``offset`` of the tensor at ``address``."""
    return carray(float32_at(address + 4 * offset), size)


@njit(inline="always")
def _tensor_part_bits(address, offset, size):
    """The same of a 16-bit tensor, as its bits."""
    return carray(bits_at(address + 2 * offset), size)


@njit(inline="always")
def _segment_chunk(addresses, chunks, c):
    """Chunk ``c`` (a row of ``chunks``) of the float32 tensors at ``addresses``."""
    return _tensor_part(addresses[chunks[c, 0]], chunks[c, 1], chunks[c, 2])


@njit(inline="always")
def _segment_chunk_bits(addresses, chunks, c):
    """Chunk ``c`` of the 16-bit tensors at ``addresses``, as their bits."""
    return _tensor_part_bits(addresses[chunks[c, 0]], chunks[c, 1], chunks[c, 2])


def _settled(spec):
    """The ``_template.Pass`` ``spec``, whose ``flushes`` holds only where it changes the
    driver: where the pass stores bfloat16 and AVX-512 BF16 compiles, whose conversion
    then rounds (``x86.bfloat16_store``): Adam's bfloat16 formats took 0.81-0.91x their
    time in the caches, 0.80-0.98x at 2e7 parameters (see docs/design-notes.md)."""
    stored = {name for name, fmt in spec.formats if fmt == "bfloat16" and name != "g"}
    if spec.writes is not None:
        stored &= set(spec.writes)
    return spec._replace(flushes=bool(spec.flushes and x86.BF16 and stored))


@functools.cache
def _driver(spec, loops):
    # Cached by the Pass, so that every spelling of the same pass gets one driver.
    namespace = {
        "__name__": __name__,  # Numba's cache re-imports this module when loading
        "rule": _inline(rules.calling(getattr(rules, spec.rule), _HELPERS)),
        "prepare": _prepare,
        "prange": prange,
        "even_chunk": even_chunk,
        "thread_count": thread_count,
        "segment_chunk": _segment_chunk,
        "segment_chunk_bits": _segment_chunk_bits,
        "tensor_part": _tensor_part,
        "tensor_part_bits": _tensor_part_bits,
        **_template.CONSTANTS,
        "NO_BITS": np.int32(0),
        "MAGNITUDE": np.int32(0x7FFFFFFF),
        "np": np,
        "CHUNK": CHUNK,
        "VECTOR": VECTOR,
        "LANES": LANES,
        "BLOCKS_PER_CHUNK": BLOCKS_PER_CHUNK,
        **codecs.tables(),
        "denormals_off": _fp_mode.denormals_off,
        "restore_fp_mode": _fp_mode.restore,
        **_CODECS,
        **({"bfloat16_store": x86.bfloat16_store} if spec.flushes else {}),
        "decode_block": _DECODE_BLOCK,
        "encode_block": _ENCODE_BLOCK,
        "begin_chunk": x86.prefer_512_bit_vectors if WIDE_VECTORS else _keep_vector_width,
        "add_to_sum": add_to_sum,
    }
    chunk_options = dict(_OPTIONS, parallel=False, inline="never")
    fingerprint = (repr((_OPTIONS, chunk_options, CHUNK, VECTOR, BLOCKS_PER_CHUNK))
                   + inspect.getsource(_fp_mode) + inspect.getsource(x86)
                   + repr((x86.AVAILABLE, x86.F16C, WIDE_VECTORS, spec.flushes)))
    driver = _template.build(spec, loops, namespace, __file__, fingerprint,
                             njit(**chunk_options))
    return njit(**_OPTIONS)(driver)


@functools.cache
def kernel(*spec):
    """The compiled ``kernel(*arrays, prep, h, [key, first,] parallel, flush_denormals)``
    of one pass of a rule over flat buffers: ``arrays`` are the rule's ``p`` and ``g``,
    the master weights ``w`` with ``Pass.master``, and the state buffers named in
    ``present``, in the rule's order (``_template.arrays``; 16-bit ones as their bits);
    ``spec`` are the fields of a ``_template.Pass`` (without sums): ``rule_name,
    present`` for a plain step. ``key`` and ``first`` come with ``Pass.stochastic``.

    Pass ``parallel=p.size >= PARALLEL_MIN_SIZE`` and ``flush_denormals=FLUSH_DENORMALS``
    (true wherever ``Pass.flushes`` is). Compilation happens on the first call, or loads
    from Numba's on-disk cache.
    """
    return _driver(_settled(_template.Pass(*spec)), _LOOPS)


@functools.cache
def segment_kernel(*spec):
    """The compiled ``kernel(*arrays, prep, h, [key, first,] chunks, state_starts,
    partials, row_scalars, parallel, flush_denormals)`` of the ``_template.Pass`` with the
    fields ``spec`` over segments (tensors, rows, or a whole buffer), stepping the tensors
    wherever they lie in memory (``key`` and ``first`` with ``Pass.stochastic``).

    ``p`` and ``g`` are int64 arrays of addresses, one per segment, each the start of
    that many dense float32 elements (16-bit ones, as their bits, where ``Pass.formats``
    says so), walked in memory order (a gradient lies as its
    parameter does); the state buffers are flat, segment k starting at
    ``state_starts[k]``. Each row ``(segment, offset, size, draw)`` of ``chunks`` is a
    piece of one segment (``fastopt._backend.segment_chunks``), which one thread
    steps, summing the pass's ``sums`` over it into ``partials[row]`` (float64) in a
    fixed order, so that the sums do not depend on the thread count. The pass's
    ``per_segment`` scalars come from ``row_scalars[row]``. The caller keeps every
    tensor alive through the call.

    A pass that keeps state in 8 bits (``codecs.QUANTIZED`` formats) walks blocks
    instead, and takes ``blocks`` (rows ``(segment, offset, size, small)``) and
    ``state_starts``, then each such buffer's ``absmax`` and ``small`` (see
    ``_template._block_chunk``), in place of ``chunks`` ... ``row_scalars``.
    """
    spec = _settled(_template.Pass(*spec))
    blocks = any(f in codecs.QUANTIZED for _, f in spec.formats)
    return _driver(spec, _BLOCK_LOOPS if blocks else _SEGMENT_LOOPS)


# -- Adafactor's column sums ---------------------------------------------------------
#
# The one reduction the generated passes cannot express: its sums run down the columns,
# across segments (rows), where a segment pass sums along them. Adafactor's decay is
# decoupled (no L2 term in rules.prepare), so p is not read. Numba checks only this
# file's time stamp for its cache, so after editing ``rules.prepare`` or the codecs,
# clear the cache (NUMBA_CACHE_DIR, or the __pycache__ folder beside this file).

def _loaded(value, bfloat16):
    """A gradient element as float32: itself, or its 16-bit bits loaded as bfloat16 (or
    float16)."""


@overload(_loaded)
def _loaded_by_type(value, bfloat16):
    if isinstance(value, types.Float):
        return lambda value, bfloat16: value
    load_bf16, load_f16 = _CODECS["bfloat16_load"], _CODECS["float16_load"]
    return lambda value, bfloat16: load_bf16(value) if bfloat16 else load_f16(value)


@njit(inline="always", error_model="numpy")
def _column_sums(g, prep, table, out, k, bfloat16):
    rows, columns, out_start, continued = table[k, 0], table[k, 1], table[k, 2], table[k, 3]
    sums = out[out_start:out_start + columns]
    # Read once, not from memory that out may alias; float32 whatever the caller passed.
    prepared = (np.float32(prep[0]), np.float32(prep[1]), np.float32(prep[2]),
                np.float32(prep[3]))
    if not continued:
        for c in range(columns):  # not sums[:] = 0: under parallel=True, a parfor of its own
            sums[c] = 0.0
    for r in range(rows):
        g_row = g[r * columns:(r + 1) * columns]
        for c in range(columns):
            x = np.float64(_prepare(ZERO, _loaded(g_row[c], bfloat16), prepared))
            sums[c] = add_to_sum(sums[c], x * x)


@njit(parallel=True, cache=True, nogil=True, error_model="numpy")
def column_sums(g, prep, table, out, parallel):
    """Sums of ``prepare(0, g)**2`` down the columns of blocks of rows, in float64.

    Block k is ``(rows, columns, out_start, continued) = table[k]``: the row-major block
    of float32 gradients at the address ``g[k]`` is summed in row order into
    ``out[out_start:out_start + columns]``, from 0, or, where ``continued``, from the
    sums there (those of the rows above it, which another process summed)."""
    if parallel:
        for k in prange(table.shape[0]):
            _column_sums(carray(float32_at(g[k]), table[k, 0] * table[k, 1]), prep, table,
                         out, k, False)
    else:
        for k in range(table.shape[0]):
            _column_sums(carray(float32_at(g[k]), table[k, 0] * table[k, 1]), prep, table,
                         out, k, False)


@njit(parallel=True, cache=True, nogil=True, error_model="numpy")
def column_sums_bits(g, prep, table, out, bfloat16, parallel):
    """:func:`column_sums` of 16-bit gradients: bfloat16 ones, or float16."""
    if parallel:
        for k in prange(table.shape[0]):
            _column_sums(carray(bits_at(g[k]), table[k, 0] * table[k, 1]), prep, table, out,
                         k, bfloat16)
    else:
        for k in range(table.shape[0]):
            _column_sums(carray(bits_at(g[k]), table[k, 0] * table[k, 1]), prep, table, out,
                         k, bfloat16)
