"""Where the buffers live: NumPy arrays run the CPU kernels, CUDA arrays the CUDA ones.

A backend turns user arrays into its own array type without copying, allocates and
fills flat buffers, and launches a rule's kernel. Both offer the same small interface,
so the optimizers never branch on the device.
"""

import math
import sys
import threading

import numpy as np

FLOAT32 = np.dtype(np.float32)


def is_cuda_array(x):
    """True for anything that lives on a CUDA device (CuPy, torch, Numba arrays)."""
    if hasattr(x, "__cuda_array_interface__"):
        return True
    # The CUDA simulator's arrays carry no interface, so recognise them by type.
    devicearray = getattr(sys.modules.get("numba.cuda"), "devicearray", None)
    fake = getattr(devicearray, "FakeCUDAArray", None)
    return fake is not None and isinstance(x, fake)


def is_c_contiguous(a):
    flags = getattr(a, "flags", None)  # NumPy, and the CUDA simulator's arrays
    if flags is not None:
        return bool(flags["C_CONTIGUOUS"])
    return a.is_c_contiguous()


_WORKQUEUE_LOCK = threading.Lock()
_THREAD_SAFE = []  # [True or False] once Numba's threading layer has started


def _thread_safe_layer():
    """Whether parallel kernels may run from several Python threads at once: yes with the
    tbb and omp layers, not with workqueue (or before a layer has started)."""
    if not _THREAD_SAFE:
        import numba

        try:
            _THREAD_SAFE.append(numba.threading_layer() != "workqueue")
        except ValueError:  # no parallel kernel has run yet
            return False
    return _THREAD_SAFE[0]


class Pieces:
    """The pieces of a segmented reduction (see :func:`fastopt.flat.pieces`) on one
    backend: their bounds where the kernels read them, and the buffers they fill."""

    def __init__(self, starts, stops, segment, segments, to_device):
        self.count = starts.size
        self.segment = segment  # on the host
        self.segments = segments
        self.starts, self.stops = to_device(starts), to_device(stops)
        self.partials_host = np.zeros((self.count, 2), np.float64)
        self.partials = to_device(self.partials_host)
        self.scales_host = np.zeros((2, self.count), FLOAT32)  # two values per piece
        self.scales = to_device(self.scales_host)

    def totals(self, partials):
        """The two columns of per-piece sums added up per segment, in piece order."""
        return tuple(np.bincount(self.segment, partials[:, j], self.segments) for j in (0, 1))


class SegmentTable:
    """Tensors of ``sizes`` elements as segments for the CPU kernels: their chunks (see
    ``kernels.cpu.segment_chunks``), and where each one's state starts in flat state
    buffers, from ``state_start``."""

    def __init__(self, sizes, state_start):
        from .kernels import cpu

        self.size = sum(sizes)
        self.chunks = cpu.segment_chunks(sizes)
        self.state_starts = np.cumsum([state_start] + list(sizes[:-1]), dtype=np.int64)
        self.partials = np.zeros(len(self.chunks), np.float64)


class HostBackend:
    device = "cpu"

    def __init__(self):
        from .kernels import cpu

        self._kernels = cpu
        self._reduction_buffers = {}

    def asarray(self, x, what):
        """A zero-copy NumPy view of ``x``, or a TypeError naming ``what``."""
        if isinstance(x, np.ndarray):
            return x
        if hasattr(x, "__array_interface__") or hasattr(x, "__array__"):
            try:
                return np.asarray(x)
            except Exception as error:
                raise TypeError(f"{what} cannot be viewed as a NumPy array: {error}") from None
        raise TypeError(f"{what} must be an array, got {type(x).__name__}")

    def zeros(self, n):
        return np.zeros(n, FLOAT32)

    def zeros64(self, n):
        return np.zeros(n, np.float64)

    def fill(self, a, value):
        a.fill(value)

    def copy(self, destination, source):
        """Copy ``source`` (any layout) into ``destination``, a slice of a flat buffer."""
        np.copyto(destination.reshape(source.shape), source)

    def to_host(self, a):
        """A NumPy copy of ``a``."""
        return np.array(a, copy=True)

    def is_writeable(self, x):
        return self.asarray(x, "array").flags.writeable

    def overlaps(self, a, b):
        return np.may_share_memory(a, b)

    def run(self, rule, present, p, g, states, prep, h, keep_subnormals=False):
        """One pass of ``rule`` over the buffers; ``keep_subnormals`` where the rule's
        result hangs on subnormal numbers, which the kernels otherwise flush."""
        kernels = self._kernels
        self._call(kernels.kernel(rule, present), p.size, p, g, *states, prep,
                   tuple(h), flush=kernels.FLUSH_DENORMALS and not keep_subnormals)

    def run_segments(self, rule, present, p, g, states, prep, h, table, keep_subnormals=False):
        """``run`` over tensors that lie anywhere in memory: ``p`` and ``g`` are their
        addresses, ``table`` their :class:`SegmentTable`."""
        kernels = self._kernels
        self._call(kernels.segment_kernel(rule, present), table.size, p, g, *states,
                   prep, tuple(h), table.chunks, table.state_starts,
                   flush=kernels.FLUSH_DENORMALS and not keep_subnormals)

    def segment_sum_squares(self, g, table):
        """The float64 sum of squares of the tensors at the addresses ``g``."""
        return self._call(self._kernels.segment_sum_squares, table.size, g, table.chunks,
                          table.partials)

    def sum_squares(self, g):
        """The float64 sum of squares of ``g``, deterministic (see kernels.cpu)."""
        return self._call(self._kernels.sum_squares, g.size, g, self._partials(g.size, ()))

    def swats_adam(self, p, g, exp_avg, exp_avg_sq, prep, h):
        """SWATS's Adam step over the buffers; returns the sums ``(d.d, d.g)``."""
        return self._call(self._kernels.swats_adam, p.size, p, g, exp_avg, exp_avg_sq,
                          prep, tuple(h), self._partials(p.size, (2,)))

    def ema(self, average, value, h):
        self._call(self._kernels.ema, average.size, average, value, tuple(h))

    def scale_into(self, out, a, s):
        np.multiply(a, s, out=out)

    # -- segmented reductions and layer-wise steps (see kernels.cpu) ------------------

    def pieces(self, starts, stops, segment, segments):
        return Pieces(starts, stops, segment, segments, lambda a: a)

    def segment_norms(self, p, g, prep, pieces):
        """Per segment: ``(sum p**2, sum prepare(p, g)**2)``, float64 arrays."""
        self._call(self._kernels.segment_norms, p.size, p, g, prep, pieces.starts,
                   pieces.stops, pieces.partials)
        return pieces.totals(pieces.partials)

    def lamb_moments(self, p, g, exp_avg, exp_avg_sq, prep, h, pieces):
        self._call(self._kernels.lamb_moments, p.size, p, g, exp_avg, exp_avg_sq, prep,
                   tuple(h), pieces.starts, pieces.stops, pieces.partials)
        return pieces.totals(pieces.partials)

    def lamb_step(self, p, exp_avg, exp_avg_sq, h, pieces, trust_lr):
        self._call(self._kernels.lamb_step, p.size, p, exp_avg, exp_avg_sq, tuple(h),
                   pieces.starts, pieces.stops, self._per_piece(pieces, trust_lr))

    def lars_step(self, p, g, momentum_buffer, prep, h, pieces, trust_lr):
        self._call(self._kernels.lars_step, p.size, p, g, momentum_buffer, prep,
                   tuple(h), pieces.starts, pieces.stops, self._per_piece(pieces, trust_lr))

    def column_sums(self, p, g, prep, blocks, out):
        """Sums of ``prepare(p, g)**2`` down matrix columns into ``out`` (see
        kernels.cpu.column_sums); returns them on the host."""
        self._call(self._kernels.column_sums, p.size, p, g, prep, blocks, out)
        return out

    def adafactor(self, p, g, prep, col_var, variance, h, pieces, second_starts, factored,
                  row_scales, decay, step_sizes, apply):
        """One Adafactor pass (see kernels.cpu.adafactor); per segment, sum u**2."""
        self._call(self._kernels.adafactor, p.size, p, g, prep, col_var, variance,
                   tuple(h), pieces.starts, pieces.stops, second_starts, factored,
                   self._per_piece(pieces, row_scales), pieces.partials, decay,
                   self._per_piece(pieces, step_sizes, 1), apply)
        return pieces.totals(pieces.partials)[0]

    def constant(self, a):
        """A NumPy array the kernels read, where they can read it."""
        return a

    def _per_piece(self, pieces, values, row=0):
        """``values`` (one per segment) as float32, one per piece, in row ``row`` of the
        pieces' scales (which hold what they held when ``values`` is None)."""
        if values is not None:
            pieces.scales_host[row] = values[pieces.segment]
        return pieces.scales[row]

    def _call(self, kernel, size, *args, flush=None):
        """``kernel(*args, parallel[, flush])``, its parallel loop serialised across Python
        threads where Numba's threading layer needs that (workqueue is not thread-safe).
        The callers pass ``h`` as a plain tuple (see ``kernels.rules``)."""
        extra = () if flush is None else (flush,)
        if size < self._kernels.PARALLEL_MIN_SIZE:
            return kernel(*args, False, *extra)
        if _thread_safe_layer():
            return kernel(*args, True, *extra)
        with _WORKQUEUE_LOCK:
            return kernel(*args, True, *extra)

    def _partials(self, n, width):
        """Chunk sums for a reduction over ``n`` elements, kept to be reused."""
        key = (n, width)
        if key not in self._reduction_buffers:
            chunks = self._kernels.reduction_chunks(n)
            self._reduction_buffers[key] = np.zeros((chunks, *width), np.float64)
        return self._reduction_buffers[key]


class CudaBackend:
    device = "cuda"

    def __init__(self):
        from numba import cuda

        from .kernels import cuda as kernels

        self._cuda = cuda
        self._kernels = kernels
        self._reduction_buffers = {}

    def asarray(self, x, what):
        if hasattr(x, "__cuda_array_interface__"):
            return self._cuda.as_cuda_array(x)
        if is_cuda_array(x):
            return x
        raise TypeError(f"{what} must be a CUDA array like the other parameters, "
                        f"got {type(x).__name__}")

    def zeros(self, n):
        a = self._cuda.device_array(n, FLOAT32)
        self.fill(a, 0.0)
        return a

    def zeros64(self, n):
        return self._cuda.to_device(np.zeros(n, np.float64))

    def fill(self, a, value):
        self._kernels.launch(self._kernels.fill, a.size, a, FLOAT32.type(value))

    def copy(self, destination, source):
        destination.copy_to_device(source.reshape(destination.size))

    def to_host(self, a):
        return a.copy_to_host()

    def is_writeable(self, x):
        interface = getattr(x, "__cuda_array_interface__", None)
        return interface is None or not interface["data"][1]  # (pointer, read-only)

    def overlaps(self, a, b):
        (a_start, a_end), (b_start, b_end) = _extent(a), _extent(b)
        return a_start < b_end and b_start < a_end

    def run(self, rule, present, p, g, states, prep, h, keep_subnormals=False):
        kernels = self._kernels
        # keep_subnormals: CUDA keeps them (the kernels set no flush-to-zero mode).
        kernels.launch(kernels.kernel(rule, present), p.size, p, g, *states, prep, h)

    def sum_squares(self, g):
        """The float64 sum of squares of ``g``: one partial per block, added exactly."""
        partials = self._partials(g.size, ())
        self._kernels.launch(self._kernels.sum_squares, g.size, g, partials[0])
        return math.fsum(partials[0].copy_to_host(partials[1]))

    def swats_adam(self, p, g, exp_avg, exp_avg_sq, prep, h):
        partials = self._partials(p.size, (2,))
        self._kernels.launch(self._kernels.swats_adam, p.size, p, g, exp_avg, exp_avg_sq,
                             prep, h, partials[0])
        host = partials[0].copy_to_host(partials[1])
        return math.fsum(host[:, 0]), math.fsum(host[:, 1])

    def ema(self, average, value, h):
        self._kernels.launch(self._kernels.ema, average.size, average, value, h)

    def scale_into(self, out, a, s):
        self._kernels.launch(self._kernels.scale_into, out.size, out, a, s)

    # -- segmented reductions and layer-wise steps (see kernels.cuda) -----------------

    def pieces(self, starts, stops, segment, segments):
        return Pieces(starts, stops, segment, segments, self._cuda.to_device)

    def segment_norms(self, p, g, prep, pieces):
        self._kernels.launch_pieces(self._kernels.segment_norms, pieces.count, p, g, prep,
                                    pieces.starts, pieces.stops, pieces.partials)
        return pieces.totals(pieces.partials.copy_to_host(pieces.partials_host))

    def lamb_moments(self, p, g, exp_avg, exp_avg_sq, prep, h, pieces):
        self._kernels.launch_pieces(self._kernels.lamb_moments, pieces.count, p, g, exp_avg,
                                    exp_avg_sq, prep, h, pieces.starts, pieces.stops,
                                    pieces.partials)
        return pieces.totals(pieces.partials.copy_to_host(pieces.partials_host))

    def lamb_step(self, p, exp_avg, exp_avg_sq, h, pieces, trust_lr):
        self._kernels.launch_pieces(self._kernels.lamb_step, pieces.count, p, exp_avg,
                                    exp_avg_sq, h, pieces.starts, pieces.stops,
                                    self._per_piece(pieces, trust_lr))

    def lars_step(self, p, g, momentum_buffer, prep, h, pieces, trust_lr):
        self._kernels.launch_pieces(self._kernels.lars_step, pieces.count, p, g,
                                    momentum_buffer, prep, h, pieces.starts, pieces.stops,
                                    self._per_piece(pieces, trust_lr))

    def column_sums(self, p, g, prep, blocks, out):
        self._kernels.launch_pieces(self._kernels.column_sums, blocks.shape[0], p, g, prep,
                                    blocks, out)
        return out.copy_to_host()

    def adafactor(self, p, g, prep, col_var, variance, h, pieces, second_starts, factored,
                  row_scales, decay, step_sizes, apply):
        self._kernels.launch_pieces(self._kernels.adafactor, pieces.count, p, g, prep, col_var,
                                    variance, h, pieces.starts, pieces.stops, second_starts,
                                    factored, self._per_piece(pieces, row_scales),
                                    pieces.partials, decay,
                                    self._per_piece(pieces, step_sizes, 1), apply)
        return pieces.totals(pieces.partials.copy_to_host(pieces.partials_host))[0]

    def constant(self, a):
        return self._cuda.to_device(a)

    def _per_piece(self, pieces, values, row=0):
        if values is not None:
            pieces.scales_host[row] = values[pieces.segment]
            pieces.scales[row].copy_to_device(pieces.scales_host[row])
        return pieces.scales[row]

    def _partials(self, n, width):
        """(device, host) arrays of one partial sum per block, kept to be reused."""
        key = (n, width, self._kernels.threads_per_block, self._kernels.max_blocks)
        if key not in self._reduction_buffers:
            host = np.zeros((max(1, self._kernels.blocks(n)), *width), np.float64)
            self._reduction_buffers[key] = (self._cuda.to_device(host), host)
        return self._reduction_buffers[key]


def _extent(a):
    """The byte range of a contiguous device array."""
    if hasattr(a, "__cuda_array_interface__"):
        start = a.__cuda_array_interface__["data"][0]
    else:  # the simulator keeps a NumPy array inside
        start = a._ary.ctypes.data
    return start, start + a.size * a.dtype.itemsize


def backend_of(x):
    return CudaBackend() if is_cuda_array(x) else HostBackend()
