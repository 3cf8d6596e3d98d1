"""CPU kernels: a rule applied in one multithreaded, vectorised pass over flat buffers."""

import functools
import inspect
import textwrap

import numpy as np
from numba import carray, njit, prange, types
from numba.core.extending import intrinsic

from . import _fp_mode, _template, rules

# Every element is independent, so the result does not depend on the thread count.
# error_model="numpy" drops the division-by-zero check that would stop SIMD.
_OPTIONS = dict(parallel=True, cache=True, nogil=True, error_model="numpy")

# Below this size the serial loop wins: waking the worker threads costs more than they
# save. bench/crossover.py measures it; on 2 cores the two loops tie for Adam between
# 16k and 32k elements.
PARALLEL_MIN_SIZE = 1 << 14

# The parallel loop hands out chunks of this many elements: each thread switches its
# denormal handling once per chunk, and each chunk's loop runs over slices, indexed from
# 0, which LLVM vectorises with contiguous loads.
CHUNK = 1 << 14

# Subnormal numbers (below 1.2e-38) make x86 arithmetic 10-100x slower. With this set,
# the kernels flush them to zero (the FTZ and DAZ bits of MXCSR, as
# torch.set_flush_denormal(True) does); each kernel restores the caller's setting.
FLUSH_DENORMALS = True

ZERO = np.float32(0)  # a state a driver does not hold reads as this

_LOOPS = """\
, parallel, flush_denormals):
    if parallel:
        for c in prange((p.size + CHUNK - 1) // CHUNK):
            {named}
            saved = denormals_off(flush_denormals)
            start = c * CHUNK
            stop = min(start + CHUNK, p.size)
            {slices}
            for i in range(p_c.size):
                {chunk_body}
            restore_fp_mode(saved)
    else:
        {named}
        saved = denormals_off(flush_denormals)
        for i in range(p.size):
            {body}
        restore_fp_mode(saved)
"""


# One chunk of one segment: p_c and g_c are arrays over the tensors' own memory.
_SEGMENT_CHUNK = """\
{named}
saved = denormals_off(flush_denormals)
p_c, g_c = segment_chunk(p, chunks, c), segment_chunk(g, chunks, c)
start = state_starts[chunks[c, 0]] + chunks[c, 1]
stop = start + p_c.size
{state_slices}
for i in range(p_c.size):
    {chunk_body}
restore_fp_mode(saved)
"""
_SEGMENT_LOOPS = (", chunks, state_starts, parallel, flush_denormals):\n"
                  "    if parallel:\n        for c in prange(chunks.shape[0]):\n"
                  + textwrap.indent(_SEGMENT_CHUNK, " " * 12)
                  + "    else:\n        for c in range(chunks.shape[0]):\n"
                  + textwrap.indent(_SEGMENT_CHUNK, " " * 12))


def _inline(function):
    return njit(inline="always", error_model="numpy")(function)


_prepare = _inline(rules.prepare)


@intrinsic
def float32_at(typingctx, address):
    """The float32 pointer to memory ``address`` (an integer), which numba.carray turns
    into an array: tensors that fastopt does not own are stepped where they lie."""
    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(signature.return_type))
    return types.CPointer(types.float32)(types.intp), codegen


@njit(inline="always")
def _segment_chunk(addresses, chunks, c):
    """Chunk ``c`` (a row of :func:`segment_chunks`) of the tensors at ``addresses``."""
    segment, offset, size = chunks[c, 0], chunks[c, 1], chunks[c, 2]
    return carray(float32_at(addresses[segment] + 4 * offset), size)


def _driver(rule_name, present, loops):
    rule = getattr(rules, rule_name)
    namespace = {
        "__name__": __name__,  # Numba's cache re-imports this module when loading
        "rule": _inline(rule),
        "prepare": _prepare,
        "prange": prange,
        "segment_chunk": _segment_chunk,
        "ZERO": ZERO,
        "CHUNK": CHUNK,
        "denormals_off": _fp_mode.denormals_off,
        "restore_fp_mode": _fp_mode.restore,
    }
    fingerprint = repr((_OPTIONS, CHUNK)) + inspect.getsource(_fp_mode)
    driver = _template.build(rule, present, loops, namespace, __file__, fingerprint)
    return njit(**_OPTIONS)(driver)


@functools.cache
def kernel(rule_name, present):
    """The compiled ``kernel(p, g, *present_state, prep, h, parallel, flush_denormals)``
    for one rule.

    Pass ``parallel=p.size >= PARALLEL_MIN_SIZE`` and ``flush_denormals=FLUSH_DENORMALS``.

    ``present`` names the state buffers the caller holds, in the rule's order; the
    others are absent. Compilation happens on the first call, or loads from Numba's
    on-disk cache.
    """
    return _driver(rule_name, present, _LOOPS)


@functools.cache
def segment_kernel(rule_name, present):
    """The compiled ``kernel(p, g, *present_state, prep, h, chunks, state_starts, parallel,
    flush_denormals)`` that steps tensors in place, wherever they lie in memory.

    ``p`` and ``g`` are int64 arrays of addresses, one per tensor (segment), each the
    start of that many dense float32 elements, walked in memory order (a gradient lies
    as its parameter does); the state buffers are flat, segment k starting at
    ``state_starts[k]``. Each row ``(segment, offset, size)`` of ``chunks`` is a piece
    of at most CHUNK elements of one segment (:func:`segment_chunks`), which one thread
    steps. The caller keeps every tensor alive through the call.
    """
    return _driver(rule_name, present, _SEGMENT_LOOPS)


def segment_chunks(sizes):
    """``chunks`` for segments of ``sizes`` elements: ``(segment, offset, size)`` rows of
    at most CHUNK elements each, in order."""
    rows = [(k, offset, min(CHUNK, n - offset))
            for k, n in enumerate(sizes) for offset in range(0, n, CHUNK)]
    return np.array(rows, np.int64).reshape(-1, 3)


# -- reductions ---------------------------------------------------------------------
#
# A sum is taken per fixed chunk of REDUCTION_CHUNK elements and the chunk sums are
# added in order, so the result does not depend on the thread count or scheduling.
# Sums are float64: a float32 square cannot overflow them, so the sum of squares is
# finite exactly when every element is.

REDUCTION_CHUNK = 1 << 14


def reduction_chunks(n):
    """How many chunk sums a reduction over ``n`` elements needs."""
    return -(-n // REDUCTION_CHUNK)


# reassoc lets LLVM vectorise the sum inside a chunk; the order it picks is fixed at
# compile time, so the result is still the same on every run.
@njit(inline="always", error_model="numpy", fastmath={"reassoc"})
def _sum_squares(chunk):
    total = 0.0
    for i in range(chunk.size):
        x = np.float64(chunk[i])
        total += x * x
    return total


# Each chunk is a slice (clamped at the end), so its loop indexes from 0: contiguous
# loads, where ``range(start, stop)`` made LLVM gather.
@njit(parallel=True, cache=True, nogil=True, error_model="numpy", fastmath={"reassoc"})
def sum_squares(g, partials, parallel):
    """The float64 sum of ``g[i]**2``; ``partials`` holds ``reduction_chunks(g.size)``."""
    chunks = partials.size
    if parallel:
        for c in prange(chunks):
            partials[c] = _sum_squares(g[c * REDUCTION_CHUNK:(c + 1) * REDUCTION_CHUNK])
    else:
        for c in range(chunks):
            partials[c] = _sum_squares(g[c * REDUCTION_CHUNK:(c + 1) * REDUCTION_CHUNK])
    total = 0.0
    for c in range(chunks):
        total += partials[c]
    return total


@njit(parallel=True, cache=True, nogil=True, error_model="numpy", fastmath={"reassoc"})
def segment_sum_squares(g, chunks, partials, parallel):
    """The float64 sum of squares over the tensors at the addresses ``g``, by the chunks
    of :func:`segment_chunks` (one partial each, added in order)."""
    if parallel:
        for c in prange(chunks.shape[0]):
            partials[c] = _sum_squares(_segment_chunk(g, chunks, c))
    else:
        for c in range(chunks.shape[0]):
            partials[c] = _sum_squares(_segment_chunk(g, chunks, c))
    total = 0.0
    for c in range(chunks.shape[0]):
        total += partials[c]
    return total


# -- kernels outside the optimizer template ----------------------------------------
#
# Numba checks only this file's time stamp for its cache, so after editing the rules
# these use, clear the cache (NUMBA_CACHE_DIR, or the __pycache__ folder beside this file).

_swats_adam = _inline(rules.swats_adam)
_ema = _inline(rules.ema)


@njit(inline="always", error_model="numpy")
def _swats_chunk(p, g, exp_avg, exp_avg_sq, prep, h, partials, c):
    h = rules.SWATSAdamScalars(*h)
    chunk = slice(c * REDUCTION_CHUNK, (c + 1) * REDUCTION_CHUNK)
    p, g, exp_avg, exp_avg_sq = p[chunk], g[chunk], exp_avg[chunk], exp_avg_sq[chunk]
    direction_sq = direction_g = 0.0
    for i in range(p.size):
        grad = _prepare(p[i], g[i], prep)
        p[i], exp_avg[i], exp_avg_sq[i], d = _swats_adam(p[i], grad, exp_avg[i],
                                                         exp_avg_sq[i], h)
        direction_sq += np.float64(d) * np.float64(d)
        direction_g += np.float64(d) * np.float64(grad)
    partials[c, 0] = direction_sq
    partials[c, 1] = direction_g


@njit(**_OPTIONS)
def swats_adam(p, g, exp_avg, exp_avg_sq, prep, h, partials, parallel):
    """SWATS's Adam step; returns ``(d.d, d.g)``, summed per chunk into ``partials``."""
    if parallel:
        for c in prange(partials.shape[0]):
            _swats_chunk(p, g, exp_avg, exp_avg_sq, prep, h, partials, c)
    else:
        for c in range(partials.shape[0]):
            _swats_chunk(p, g, exp_avg, exp_avg_sq, prep, h, partials, c)
    direction_sq = direction_g = 0.0
    for c in range(partials.shape[0]):
        direction_sq += partials[c, 0]
        direction_g += partials[c, 1]
    return direction_sq, direction_g


@njit(**_OPTIONS)
def ema(average, value, h, parallel):
    """``average = rules.ema(average, value, h)`` element-wise."""
    if parallel:
        for i in prange(average.size):
            average[i] = _ema(average[i], value[i], rules.EMAScalars(*h))
    else:
        for i in range(average.size):
            average[i] = _ema(average[i], value[i], rules.EMAScalars(*h))


# -- segmented reductions and layer-wise steps ---------------------------------------
#
# Piece k is [starts[k], stops[k]) of the flat buffers and lies inside one segment (a
# parameter tensor, a row ...); see fastopt.flat.pieces. One thread sums a piece, in
# order, into partials[k], so the sums do not depend on the thread count. Like the
# kernels above, these are cached by this file's time stamp alone.

_lamb = _inline(rules.lamb)
_lars = _inline(rules.lars)


@njit(inline="always", error_model="numpy", fastmath={"reassoc"})
def _norms(p, g, prep):
    param_sq = grad_sq = 0.0
    for i in range(p.size):
        x, y = np.float64(p[i]), np.float64(_prepare(p[i], g[i], prep))
        param_sq += x * x
        grad_sq += y * y
    return param_sq, grad_sq


@njit(parallel=True, cache=True, nogil=True, error_model="numpy", fastmath={"reassoc"})
def segment_norms(p, g, prep, starts, stops, partials, parallel):
    """``partials[k] = (sum p**2, sum prepare(p, g)**2)`` over piece k, in float64."""
    if parallel:
        for k in prange(starts.size):
            piece = slice(starts[k], stops[k])
            partials[k, 0], partials[k, 1] = _norms(p[piece], g[piece], prep)
    else:
        for k in range(starts.size):
            piece = slice(starts[k], stops[k])
            partials[k, 0], partials[k, 1] = _norms(p[piece], g[piece], prep)


# reassoc lets LLVM split the float64 sums over several accumulators; without it their
# add latency bounds the loop. The order it picks is fixed at compile time.
@njit(inline="always", error_model="numpy", fastmath={"reassoc"})
def _lamb_moments(p, g, exp_avg, exp_avg_sq, prep, h, partials, k):
    h = rules.LAMBScalars(*h)
    param_sq = update_sq = 0.0
    for i in range(p.size):
        exp_avg[i], exp_avg_sq[i], u = _lamb(p[i], _prepare(p[i], g[i], prep), exp_avg[i],
                                             exp_avg_sq[i], h)
        param_sq += np.float64(p[i]) * np.float64(p[i])
        update_sq += np.float64(u) * np.float64(u)
    partials[k, 0] = param_sq
    partials[k, 1] = update_sq


@njit(**dict(_OPTIONS, fastmath={"reassoc"}))
def lamb_moments(p, g, exp_avg, exp_avg_sq, prep, h, starts, stops, partials, parallel):
    """LAMB's first pass: the moments, and ``partials[k] = (sum p**2, sum u**2)``."""
    if parallel:
        for k in prange(starts.size):
            piece = slice(starts[k], stops[k])
            _lamb_moments(p[piece], g[piece], exp_avg[piece], exp_avg_sq[piece], prep, h,
                          partials, k)
    else:
        for k in range(starts.size):
            piece = slice(starts[k], stops[k])
            _lamb_moments(p[piece], g[piece], exp_avg[piece], exp_avg_sq[piece], prep, h,
                          partials, k)


@njit(inline="always", error_model="numpy")
def _lamb_step(p, exp_avg, exp_avg_sq, h, trust_lr):
    h = rules.LAMBScalars(*h)
    for i in range(p.size):
        p[i] -= trust_lr * _lamb(p[i], ZERO, exp_avg[i], exp_avg_sq[i], h)[2]


@njit(**_OPTIONS)
def lamb_step(p, exp_avg, exp_avg_sq, h, starts, stops, trust_lr, parallel):
    """LAMB's second pass: ``p -= trust_lr[k] * u`` over piece k."""
    if parallel:
        for k in prange(starts.size):
            piece = slice(starts[k], stops[k])
            _lamb_step(p[piece], exp_avg[piece], exp_avg_sq[piece], h, trust_lr[k])
    else:
        for k in range(starts.size):
            piece = slice(starts[k], stops[k])
            _lamb_step(p[piece], exp_avg[piece], exp_avg_sq[piece], h, trust_lr[k])


@njit(inline="always", error_model="numpy")
def _lars_step(p, g, momentum_buffer, prep, h, trust_lr):
    h = rules.LARSScalars(*h)
    h = rules.LARSScalars(trust_lr=trust_lr, momentum=h.momentum, weight_decay=h.weight_decay)
    for i in range(p.size):
        p[i], momentum_buffer[i] = _lars(p[i], _prepare(p[i], g[i], prep), momentum_buffer[i],
                                         h)


@njit(**_OPTIONS)
def lars_step(p, g, momentum_buffer, prep, h, starts, stops, trust_lr, parallel):
    """LARS's step over piece k, with its tensor's ``trust_lr[k]`` for ``h.trust_lr``."""
    if parallel:
        for k in prange(starts.size):
            piece = slice(starts[k], stops[k])
            _lars_step(p[piece], g[piece], momentum_buffer[piece], prep, h, trust_lr[k])
    else:
        for k in range(starts.size):
            piece = slice(starts[k], stops[k])
            _lars_step(p[piece], g[piece], momentum_buffer[piece], prep, h, trust_lr[k])


# -- Adafactor ---------------------------------------------------------------------------

_adafactor = _inline(rules.adafactor)


@njit(inline="always", error_model="numpy", fastmath={"reassoc"})
def _column_sums(p, g, prep, rows, columns, out):
    out[:] = 0.0
    for r in range(rows):
        p_row, g_row = p[r * columns:(r + 1) * columns], g[r * columns:(r + 1) * columns]
        for c in range(out.size):
            x = np.float64(_prepare(p_row[c], g_row[c], prep))
            out[c] += x * x


@njit(parallel=True, cache=True, nogil=True, error_model="numpy", fastmath={"reassoc"})
def column_sums(p, g, prep, blocks, out, parallel):
    """Sums of ``prepare(p, g)**2`` down the columns of blocks of rows, in float64.

    Each row of ``blocks`` is ``(start, rows, columns, out_start)``: the row-major block
    at ``start`` is summed in row order into ``out[out_start:out_start + columns]``."""
    if parallel:
        for k in prange(blocks.shape[0]):
            start, rows, columns, out_start = blocks[k]
            _column_sums(p[start:], g[start:], prep, rows, columns,
                         out[out_start:out_start + columns])
    else:
        for k in range(blocks.shape[0]):
            start, rows, columns, out_start = blocks[k]
            _column_sums(p[start:], g[start:], prep, rows, columns,
                         out[out_start:out_start + columns])


@njit(inline="always", error_model="numpy", fastmath={"reassoc"})
def _adafactor_piece(p, g, prep, second, factored, row_scale, h, decay, step_size, apply):
    h = rules.AdafactorScalars(*h)
    fixed = rules.AdafactorScalars(beta=h.beta, eps1_sq=h.eps1_sq, moving=False)
    update_sq = 0.0
    for i in range(p.size):
        grad = _prepare(p[i], g[i], prep)
        if factored:
            _, u, u_sq = _adafactor(grad, row_scale * second[i], fixed)
        else:
            second[i], u, u_sq = _adafactor(grad, second[i], h)
        if apply:
            p[i] = p[i] * decay - step_size * u
        else:
            update_sq += np.float64(u_sq)
    return update_sq


@njit(**dict(_OPTIONS, fastmath={"reassoc"}))
def adafactor(p, g, prep, col_var, variance, h, starts, stops, second_starts, factored,
              row_scales, partials, decay, step_sizes, apply, parallel):
    """One of Adafactor's two passes over the pieces of rows (factored tensors) and
    vectors. Piece k's second moments start at ``second_starts[k]`` of ``col_var`` (a
    row) or ``variance`` (a vector). Without ``apply``: ``partials[k, 0] = sum u**2``
    (and the vectors' variance moves, if ``h`` says so); with it:
    ``p = p * decay - step_sizes[k] * u``."""
    if parallel:
        for k in prange(starts.size):
            piece = slice(starts[k], stops[k])
            second = (col_var if factored[k] else variance)[second_starts[k]:]
            partials[k, 0] = _adafactor_piece(p[piece], g[piece], prep, second, factored[k],
                                              row_scales[k], h, decay, step_sizes[k], apply)
    else:
        for k in range(starts.size):
            piece = slice(starts[k], stops[k])
            second = (col_var if factored[k] else variance)[second_starts[k]:]
            partials[k, 0] = _adafactor_piece(p[piece], g[piece], prep, second, factored[k],
                                              row_scales[k], h, decay, step_sizes[k], apply)
