"""Where the buffers live: NumPy arrays run the CPU kernels, CUDA arrays the CUDA ones.

A backend turns user arrays into its own array type without copying, allocates and
fills flat buffers, and launches a rule's kernel. Both offer the same small interface,
so the optimizers never branch on the device.
"""

import functools
import os
import sys
import threading
import weakref

import numpy as np

from . import precision
from .kernels._template import (ADDRESSED, FLOAT32, MAX_PER_SEGMENT, MAX_SUMS, SEGMENT_CHUNK,
                                Pass, float32s)

GRAD_SQUARES = Pass("grad_squares", sums=("grad_sq",))  # the global norm of the gradients
_FIRST = np.zeros(1, np.int64)  # one tensor, from the start of a buffer


def is_cuda_array(x):
    """True for anything that lives on a CUDA device (CuPy, torch, Numba arrays)."""
    try:
        if hasattr(x, "__cuda_array_interface__"):
            return True
    except RuntimeError:  # torch's, for a CUDA tensor that requires grad
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
_SERIAL = []  # [True] in a forked child (see _after_fork_in_child)


def _after_fork_in_child():
    """A forked child cannot use OpenMP threads once its parent started them (fastopt's
    kernels or torch's, each through a libgomp of its own, which no one can ask): GNU
    OpenMP kills it (SIGTERM) at its first parallel loop, so that a fork start method's
    multiprocessing Pool hung, and a DataLoader worker died. So a forked child runs
    every kernel's serial loop, which gives the same bits (no result hangs on the thread
    count). It also takes a lock of its own: the parent's may have been held, by a
    thread that was stepping, and would never be released in the child."""
    global _WORKQUEUE_LOCK
    _WORKQUEUE_LOCK = threading.Lock()
    _SERIAL.append(True)


os.register_at_fork(after_in_child=_after_fork_in_child)


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


class Segments:
    """Runs of elements (whole tensors, rows of them, ...) that the kernels' segment
    passes step and sum over, on one backend.

    Segment k is ``sizes[k]`` elements of tensor ``tensor[k]`` of a launch, from element
    ``offsets[k]`` of it on; its state starts at ``state_starts[k]`` of the flat state
    buffers (several segments may share state: the rows of a matrix share its column
    factor), and its elements' random bits, where stochastic rounding draws them, at
    ``draws[k]`` (default: ``state_starts``, right for state laid out like the
    parameters; segments that share state must be given draws of their own, or they
    round alike). A launch's tensors are reached through a
    :class:`Tensors`. The kernels walk each segment in chunks (rows of ``chunks``:
    segment, offset, size, and where the chunk's random bits start), each summed in a
    fixed order into a row of ``partials``, and the host adds a segment's chunk sums in
    order (``totals``; the tables of a ZeRO partition, and those by which DTensor shards
    sum, add every rank's: see ``sharding.WholeTotals``): its sums do not depend on the
    CPU's thread count, nor on CUDA's number of blocks (a chunk's order on CUDA does on
    its threads per block, ``kernels.cuda.threads_per_block``).
    """

    def __init__(self, sizes, state_starts, tensor, offsets, to_device, draws=None,
                 rows=None):
        self.count = len(sizes)
        self.sizes = np.asarray(sizes, np.int64).reshape(-1)
        self.size = int(self.sizes.sum())
        self.tensor = np.asarray(tensor, np.int64).reshape(-1)
        self.offsets = np.asarray(offsets, np.int64).reshape(-1)
        self.whole = bool(np.array_equal(self.tensor, np.arange(self.count))
                          and not self.offsets.any())  # one segment per tensor, in order
        self.draws = np.asarray(state_starts if draws is None else draws, np.int64).reshape(-1)
        chunks = segment_chunks(self.sizes, self.draws, rows)
        self.chunk_segment = chunks[:, 0].copy()  # on the host
        # Whether each segment is one chunk, in order: its sums are then the chunks'.
        self.chunk_each = np.array_equal(self.chunk_segment, np.arange(self.count))
        self.chunks = to_device(chunks)
        self.state_starts = to_device(np.asarray(state_starts, np.int64).reshape(-1))
        self.partials_host = np.zeros((len(chunks), MAX_SUMS), np.float64)
        self.partials = to_device(self.partials_host)
        self.row_scalars_host = np.zeros((len(chunks), MAX_PER_SEGMENT), FLOAT32)
        self.row_scalars = to_device(self.row_scalars_host)
        # CUDA: (the tensors' starts, the segments' on the device); see CudaBackend._starts
        self.device_starts = (None, None)
        self._reach = (None, {})  # CPU: see reach()

    def totals(self, partials, sums):
        """The first ``sums`` columns of the chunk sums added up per segment, in order."""
        if self.chunk_each:
            return tuple(partials[:, :sums].T.copy())
        return tuple(np.bincount(self.chunk_segment, partials[:, j], self.count)
                     for j in range(sums))

    def reach(self, tensors, names):
        """CPU: the address of each segment in each of the tensors ``tensors.<name>``
        for ``names``, a tuple (kept while the same :class:`Tensors` comes back)."""
        if self._reach[0] is not tensors:
            self._reach = (tensors, {})
        found = self._reach[1]
        if names not in found:
            found[names] = tuple(getattr(tensors, name) if self.whole
                                 else getattr(tensors, name)[self.tensor]
                                 + tensors.itemsize[name] * self.offsets
                                 for name in names)
        return found[names]

    def per_chunk(self, values):
        """Fill the chunks' scalars from ``values``, one sequence per segment each."""
        for j, column in enumerate(values):
            self.row_scalars_host[:, j] = (column if self.chunk_each
                                           else np.asarray(column)[self.chunk_segment])


class Tensors:
    """The parameters and gradients of one launch, and their master weights ``w`` where
    kept, as the segment kernels reach them, per tensor: on the CPU, int64 arrays of each
    tensor's address (dense float32, or 16-bit where ``itemsize`` says so, walked in
    memory order; the caller keeps the tensors alive); on CUDA, flat buffers in which
    tensor k starts at ``starts[k]``."""

    __slots__ = ("p", "g", "w", "starts", "itemsize")

    def __init__(self, p, g, starts=None, itemsize=None, w=None):
        self.p, self.g, self.w, self.starts = p, g, w, starts
        self.itemsize = itemsize or {"p": 4, "g": 4, "w": 4}  # bytes per element, by name


def segment_chunks(sizes, draws, rows=None):
    """``(segment, offset, size, draw)`` rows of at most SEGMENT_CHUNK elements each, in
    order, for segments of ``sizes`` elements; ``draw`` is ``draws[segment] + offset``,
    where the chunk's random bits start. Where ``rows`` gives a segment's row length, its
    chunks also begin at every row: a chunk then lies in one row, and so, where other
    processes hold the other rows (see ``fastopt.torch._row_length``), on one rank."""
    sizes = np.asarray(sizes, np.int64).reshape(-1)
    rows = sizes if rows is None else np.asarray(rows, np.int64).reshape(-1)
    row_counts = np.where(sizes > 0, sizes // np.maximum(rows, 1), 0)
    row_segment = np.repeat(np.arange(len(sizes)), row_counts)
    row_start = positions_in_runs(row_counts) * rows[row_segment]
    per_row = -(-rows[row_segment] // SEGMENT_CHUNK)
    chunk_row = np.repeat(np.arange(len(row_segment)), per_row)
    within = positions_in_runs(per_row) * SEGMENT_CHUNK  # the chunk's start in its row
    segment = row_segment[chunk_row]
    offset = row_start[chunk_row] + within
    size = np.minimum(SEGMENT_CHUNK, rows[segment] - within)
    return np.stack([segment, offset, size, np.asarray(draws, np.int64)[segment] + offset],
                    axis=1).reshape(-1, 4)


def positions_in_runs(counts):
    """Each element's place in its run, for runs of ``counts`` elements one after the
    other: 0, 1, ... counts[0] - 1, then 0, 1, ... counts[1] - 1, and so on."""
    return np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)


class HostBackend:
    device = "cpu"

    def __init__(self):
        from .kernels import cpu

        self._kernels = cpu
        self._whole_buffers = {}
        self._passes = {}

    def asarray(self, x, what):
        """A zero-copy NumPy view of ``x``, or a TypeError naming ``what``."""
        if isinstance(x, np.ma.MaskedArray):
            raise TypeError(f"{what} is a NumPy masked array, whose mask the optimizer "
                            "would drop (stepping, or reading, the masked elements): pass "
                            "x.filled(value) for the values it should hold there")
        if isinstance(x, np.ndarray):
            return x
        if hasattr(x, "__array_interface__") or hasattr(x, "__array__"):
            try:
                return np.asarray(x)
            except Exception as error:
                raise TypeError(f"{what} cannot be viewed as a NumPy array: {error}") from None
        raise TypeError(f"{what} must be an array, got {type(x).__name__}")

    def zeros(self, n, dtype=FLOAT32):
        return np.zeros(n, dtype)

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

    def float32_copy(self, a):
        """A float32 copy of ``a`` beside it."""
        return a.astype(FLOAT32)

    def on_host(self, a):
        """``a`` as a NumPy array: ``a`` itself here, a copy from a device."""
        return a

    def is_writeable(self, x):
        return self.asarray(x, "array").flags.writeable

    def overlaps(self, a, b):
        return np.may_share_memory(a, b)

    def run(self, rule, present, buffers, prep, h, keep_subnormals=False, formats=(),
            master=False, rounding=None):
        """One pass of ``rule`` over ``buffers`` (``_template.arrays(rule, present,
        master)``), stored in ``formats`` (``_template.Pass.formats``), rounding its
        16-bit stores stochastically with ``rounding = (key, first)`` (see
        ``_template.Pass.stochastic``); ``keep_subnormals`` where the rule's result hangs
        on subnormal numbers, which the kernels otherwise flush."""
        key, first = rounding or (None, None)
        self.launcher(rule, present, buffers, prep, keep_subnormals, formats, master,
                      first)(h, key)

    def launcher(self, rule, present, buffers, prep, keep_subnormals=False, formats=(),
                 master=False, first=None):
        """:meth:`run` as a function ``launch(h, key)`` of the scalars and the rounding
        key (where ``first`` is given: the pass rounds stochastically), for steps that
        repeat with new ones (see ``fastopt.optim.steady``): the kernel and its other
        arguments are found once."""
        kernels = self._kernels
        flush = kernels.FLUSH_DENORMALS and not keep_subnormals
        if formats:
            kernel = kernels.kernel(*Pass(rule, present, formats=formats, master=master,
                                          stochastic=first is not None, flushes=flush))
            buffers = [*map(precision.bits, buffers)]
        else:
            kernel = kernels.kernel(rule, present)
        arguments = (*buffers, float32s(prep))
        size = buffers[0].size
        if first is not None:
            return lambda h, key: self._call(kernel, size, *arguments, float32s(h), key,
                                             first, flush=flush)
        if size < kernels.PARALLEL_MIN_SIZE:
            return lambda h, key=None: kernel(*arguments, float32s(h), False, flush)
        return lambda h, key=None: self._call(kernel, size, *arguments, float32s(h),
                                              flush=flush)

    def segments(self, sizes, state_starts, tensor=None, offsets=None, draws=None,
                 rows=None):
        """:class:`Segments` of ``sizes`` elements, each a whole tensor of the launch
        unless ``tensor`` and ``offsets`` say which part of which tensor; chunked by
        ``rows`` where given (see :func:`segment_chunks`)."""
        return _segments(sizes, state_starts, tensor, offsets, lambda a: a, draws, rows)

    def flat_tensors(self, p, g, starts, w=None):
        """:class:`Tensors` of the tensors at ``starts`` of the flat buffers ``p``, ``g``
        (and of the master weights ``w``, laid out like ``p``)."""
        starts = np.asarray(starts, np.int64)
        masters = None if w is None else _address(w) + w.itemsize * starts
        return Tensors(_address(p) + p.itemsize * starts, _address(g) + g.itemsize * starts,
                       itemsize={"p": p.itemsize, "g": g.itemsize,
                                 "w": 4 if w is None else w.itemsize}, w=masters)

    def run_segments(self, spec, tensors, states, prep, h, segments, values=(),
                     keep_subnormals=False, key=0, first=0):
        """One pass ``spec`` (a ``kernels.Pass``) over ``segments`` of ``tensors`` (see
        :class:`Tensors`) and the flat state buffers ``states`` (those of
        ``spec.present``, in order); returns its sums per segment, a float64 array
        each. ``values`` gives the per-segment scalars, a sequence per field of
        ``spec.per_segment``; ``keep_subnormals`` where the rule's result hangs on
        subnormal numbers, which the kernels otherwise flush; ``key`` the step's
        rounding key where ``spec.stochastic`` (elements are indexed by the segments'
        ``draws``, after ``first``).
        """
        if not segments.size:  # nothing to step (Adafactor's vectors, where it has none)
            return segments.totals(segments.partials, len(spec.sums)) if spec.sums else ()
        flush = self._kernels.FLUSH_DENORMALS and not keep_subnormals
        kernel, names = self._compiled(spec, flush)
        if values:
            segments.per_chunk(values)
        if spec.formats:
            states = [*map(precision.bits, states)]
        self._call(kernel, segments.size, *segments.reach(tensors, names), *states,
                   float32s(prep), float32s(h), *((key, first) if spec.stochastic else ()),
                   segments.chunks, segments.state_starts,
                   segments.partials, segments.row_scalars, flush=flush)
        return segments.totals(segments.partials, len(spec.sums)) if spec.sums else ()

    def run_blocks(self, spec, tensors, states, blocks, prep, h, keep_subnormals=False, key=0,
                   first=0):
        """One pass ``spec`` that keeps state in 8 bits (``codecs.QUANTIZED`` formats)
        over the segments of ``tensors`` and ``states`` (as :meth:`run_segments`), block
        by block. ``blocks`` is ``(rows, state_starts, size, arrays)``: the blocks' rows
        ``(segment, offset, size, small)``, where each segment's state starts, the
        number of elements, and each 8-bit buffer's ``absmax`` and ``small`` arrays, in
        the order of ``spec.formats`` (see ``kernels.cpu.segment_kernel``)."""
        self.blocks_launcher(spec, tensors, states, blocks, prep, keep_subnormals,
                             first)(h, key)

    def blocks_launcher(self, spec, tensors, states, blocks, prep, keep_subnormals=False,
                        first=0):
        """:meth:`run_blocks` as a function ``launch(h, key)``, as :meth:`launcher`."""
        rows, state_starts, size, arrays = blocks
        flush = self._kernels.FLUSH_DENORMALS and not keep_subnormals
        kernel, names = self._compiled(spec, flush)
        head = (*(getattr(tensors, name) for name in names), *map(precision.bits, states),
                float32s(prep))
        tail = (rows, state_starts, *arrays)
        if spec.stochastic:
            return lambda h, key: self._call(kernel, size, *head, float32s(h), key, first,
                                             *tail, flush=flush)
        return lambda h, key=None: self._call(kernel, size, *head, float32s(h), *tail,
                                              flush=flush)

    def _compiled(self, spec, flush=False):
        """The segment kernel of the pass ``spec`` run with subnormals flushed or not
        (``flush``; CUDA's never are), and which of p and g it takes (kept: a step looks
        them up for each of its passes)."""
        found = self._passes.get((spec, flush))
        if found is None:
            found = self._passes[spec, flush] = (
                self._kernels.segment_kernel(*spec._replace(flushes=flush)),
                tensor_arguments(spec))
        return found

    def sum_squares(self, g):
        """The float64 sum of squares of the flat ``g`` (float32 or 16-bit),
        deterministic (see :class:`Segments`)."""
        segments = self._whole(g.size)
        tensors = self.flat_tensors(g, g, _FIRST)
        spec = GRAD_SQUARES._replace(formats=precision.formats(("g",), [g]))
        return self.run_segments(spec, tensors, [], (), (), segments,
                                 keep_subnormals=True)[0][0]

    def ema(self, average, value, h):
        """``average = rules.ema(average, value, h)`` element-wise; ``value`` may be
        16-bit."""
        kernels = self._kernels
        formats = precision.formats(("value",), [value])
        self._call(kernels.kernel(*Pass("ema", ("average", "value"), formats=formats)),
                   average.size, average, precision.bits(value), float32s(()), float32s(h),
                   flush=kernels.FLUSH_DENORMALS)

    def scale_into(self, out, a, s):
        np.multiply(a, s, out=out)

    # -- Adafactor's passes (see kernels.cpu) ------------------------------------------

    def column_sums(self, tensors, prep, blocks, table, out, fmt=None):
        """Sums of ``prepare(0, g)**2`` down matrix columns into ``out`` (see
        kernels.cpu.column_sums): ``blocks`` are :class:`Segments` of ``tensors``, blocks
        of rows, whose ``(rows, columns, out_start, continued)`` are the rows of ``table``; ``fmt``
        names the gradients' 16-bit format, if they have one. Returns the sums on the
        host."""
        if blocks.count:
            g, = blocks.reach(tensors, ("g",))
            if fmt is None:
                self._call(self._kernels.column_sums, blocks.size, g, float32s(prep), table, out)
            else:
                self._call(self._kernels.column_sums_bits, blocks.size, g, float32s(prep), table,
                           out, fmt == "bfloat16")
        return out

    def constant(self, a):
        """A NumPy array the kernels read, where they can read it."""
        return a

    def _call(self, kernel, size, *args, flush=None):
        """``kernel(*args, parallel[, flush])``, its parallel loop serialised across Python
        threads where Numba's threading layer needs that (workqueue is not thread-safe).
        The callers pass ``prep`` and ``h`` as ``float32s``."""
        extra = () if flush is None else (flush,)
        if size < self._kernels.PARALLEL_MIN_SIZE or _SERIAL:
            return kernel(*args, False, *extra)
        if _thread_safe_layer():
            return kernel(*args, True, *extra)
        with _WORKQUEUE_LOCK:
            return kernel(*args, True, *extra)

    def _whole(self, n):
        """One segment of ``n`` elements: a whole buffer, kept to be reused."""
        if n not in self._whole_buffers:
            self._whole_buffers[n] = self.segments([n], [0])
        return self._whole_buffers[n]


class CudaBackend:
    device = "cuda"

    def __init__(self):
        from numba import cuda

        from .kernels import cuda as kernels

        self._cuda = cuda
        self._kernels = kernels
        self._whole_buffers = {}
        self._passes = {}
        self._copies = {}
        self._device_tables = None
        # Numba's device arrays (the simulator's, which carry no interface, or a GPU's).
        self._device_arrays = getattr(cuda.devicearray, "DeviceNDArrayBase",
                                      getattr(cuda.devicearray, "FakeCUDAArray", ()))

    def asarray(self, x, what):
        # A Numba device array as it is: through its interface a bfloat16 one would come
        # back untyped (its typestr is '<V2').
        if isinstance(x, self._device_arrays):
            return x
        try:
            interface = hasattr(x, "__cuda_array_interface__")
        except RuntimeError as error:  # torch's, for a CUDA tensor that requires grad
            raise TypeError(f"{what} is a CUDA tensor that requires grad ({error}): pass "
                            "p.detach(), or step nn.Parameters with fastopt.torch's "
                            "optimizers") from error
        if interface:
            return self._cuda.as_cuda_array(x)
        raise TypeError(f"{what} must be a CUDA array like the other parameters, "
                        f"got {type(x).__name__}")

    def zeros(self, n, dtype=FLOAT32):
        a = self._cuda.device_array(n, dtype)
        self.fill(a, 0)
        return a

    def zeros64(self, n):
        return self._cuda.to_device(np.zeros(n, np.float64))

    def fill(self, a, value):
        if a.dtype == FLOAT32:
            self._kernels.launch(self._kernels.fill, a.size, a, FLOAT32.type(value))
        else:  # the bits of value in a's format (16-bit floats, uint8 codes, remainders)
            bits = precision.bits(np.array([value], a.dtype))[0]
            self._kernels.launch(self._kernels.fill, a.size, precision.bits(a), bits)

    def copy(self, destination, source):
        if is_cuda_array(source) and not is_c_contiguous(source):
            # numba-cuda reshapes a device array in F order (a transposed one) as its
            # memory, not its elements in C order, and refuses one with gaps: the
            # elements go through the host in C order (at construction, or a load: a
            # step's gradients must be in C order on the GPU, see Optimizer._gradients).
            source = np.ascontiguousarray(self.on_host(source))
        if source.dtype != destination.dtype:  # converted on the host, as NumPy casts
            source = np.asarray(self.on_host(source) if is_cuda_array(source) else source,
                                destination.dtype)
        # As bits: a reshape of a 16-bit device array can lose its dtype (the simulator's).
        precision.bits(destination).copy_to_device(
            precision.bits(source).reshape(destination.size))

    def to_host(self, a):
        return a.copy_to_host()

    def float32_copy(self, a):  # through the host: it happens once, at construction
        return self._cuda.to_device(a.copy_to_host().astype(FLOAT32))

    on_host = to_host

    def is_writeable(self, x):
        interface = getattr(x, "__cuda_array_interface__", None)
        return interface is None or not interface["data"][1]  # (pointer, read-only)

    def overlaps(self, a, b):
        (a_start, a_end), (b_start, b_end) = _extent(a), _extent(b)
        return a_start < b_end and b_start < a_end

    def run(self, rule, present, buffers, prep, h, keep_subnormals=False, formats=(),
            master=False, rounding=None):
        kernels = self._kernels
        # keep_subnormals: CUDA keeps them (the kernels set no flush-to-zero mode).
        kernel = kernels.kernel(*Pass(rule, present, formats=formats, master=master,
                                      stochastic=rounding is not None))
        kernels.launch(kernel, buffers[0].size, *map(precision.bits, buffers), prep, h,
                       *(rounding or ()))

    def launcher(self, rule, present, buffers, prep, keep_subnormals=False, formats=(),
                 master=False, first=None):
        """:meth:`run` as a function ``launch(h, key)`` (see ``HostBackend.launcher``)."""
        return lambda h, key=None: self.run(rule, present, buffers, prep, h, keep_subnormals,
                                            formats, master,
                                            None if first is None else (key, first))

    def blocks_launcher(self, spec, tensors, states, blocks, prep, keep_subnormals=False,
                        first=0):
        """:meth:`run_blocks` as a function ``launch(h, key)``."""
        return lambda h, key=None: self.run_blocks(spec, tensors, states, blocks, prep, h,
                                                   keep_subnormals, key, first)

    def segments(self, sizes, state_starts, tensor=None, offsets=None, draws=None,
                 rows=None):
        return _segments(sizes, state_starts, tensor, offsets, self._cuda.to_device, draws,
                         rows)

    def flat_tensors(self, p, g, starts, w=None):
        return Tensors(precision.bits(p), precision.bits(g), np.asarray(starts, np.int64),
                       w=w)

    def run_segments(self, spec, tensors, states, prep, h, segments, values=(),
                     keep_subnormals=False, key=0, first=0):
        if not segments.size:  # (its totals may gather other ranks' sums: see Segments)
            return segments.totals(segments.partials_host, len(spec.sums)) if spec.sums else ()
        if values:
            segments.per_chunk(values)
            segments.row_scalars.copy_to_device(segments.row_scalars_host)
        kernel, names = self._compiled(spec)
        arrays = [getattr(tensors, name) for name in names]
        self._kernels.launch_segments(kernel, segments, self._starts(tensors, segments),
                                      *arrays, *map(precision.bits, states), prep, h,
                                      *((key, first) if spec.stochastic else ()))
        if not spec.sums:
            return ()
        return segments.totals(segments.partials.copy_to_host(segments.partials_host),
                               len(spec.sums))

    def run_blocks(self, spec, tensors, states, blocks, prep, h, keep_subnormals=False, key=0,
                   first=0):
        """One pass ``spec`` that keeps state in 8 bits, block by block (see
        ``HostBackend.run_blocks``): a CUDA block per block of state."""
        rows, state_starts, size, arrays = blocks
        kernel, names = self._compiled(spec)
        starts = self._device_copy(tensors.starts)
        self._kernels.launch_blocks(
            kernel, rows.shape[0], *(getattr(tensors, name) for name in names),
            *map(precision.bits, states), prep, h, *((key, first) if spec.stochastic else ()),
            starts, self._device_copy(rows), self._device_copy(state_starts), *arrays,
            *self._tables())

    def _tables(self):
        """Device copies of the 8-bit formats' tables, as the block kernels take them."""
        if self._device_tables is None:
            from .kernels import codecs

            tables = codecs.tables()
            self._device_tables = [self._cuda.to_device(tables[name])
                                   for name in self._kernels.TABLES]
        return self._device_tables

    def _device_copy(self, a):
        """A device copy of the host int64 array ``a``, kept for the last few arrays: by
        value for a few elements (the starts, made anew each step), else while ``a``
        lives (the optimizer keeps its block tables)."""
        key = a.tobytes() if a.size <= 16 else id(a)
        found = self._copies.get(key)
        if found is None or (a.size > 16 and found[0]() is not a):
            if len(self._copies) >= 64:
                self._copies.clear()
            found = self._copies[key] = (weakref.ref(a), self._cuda.to_device(a))
        return found[1]

    def _starts(self, tensors, segments):
        """Where each segment starts in the flat buffers, on the device (kept)."""
        if segments.device_starts[0] is not tensors.starts:
            starts = tensors.starts[segments.tensor] + segments.offsets
            segments.device_starts = (tensors.starts, self._cuda.to_device(starts))
        return segments.device_starts[1]

    def sum_squares(self, g):
        """The float64 sum of squares of ``g`` (see :class:`Segments`)."""
        segments = self._whole(g.size)
        spec = GRAD_SQUARES._replace(formats=precision.formats(("g",), [g]))
        return self.run_segments(spec, self.flat_tensors(g, g, _FIRST), [], (), (),
                                 segments)[0][0]

    def ema(self, average, value, h):
        kernels = self._kernels
        formats = precision.formats(("value",), [value])
        kernels.launch(kernels.kernel(*Pass("ema", ("average", "value"), formats=formats)),
                       average.size, average, precision.bits(value), (), h)

    def scale_into(self, out, a, s):
        if out.dtype == FLOAT32:
            # In float32, as NumPy multiplies by a Python float on the host (a float64
            # argument would make the kernel multiply in float64).
            self._kernels.launch(self._kernels.scale_into, out.size, out, a, FLOAT32.type(s))
        else:  # 16-bit: rounded on the host, as NumPy casts (an EMA's copy_to, not a step)
            self.copy(out, self.on_host(a) * s)

    # -- Adafactor's passes (see kernels.cuda) -------------------------------------------

    def column_sums(self, tensors, prep, blocks, table, out, fmt=None):
        self._kernels.launch_blocks(self._kernels.column_sums, blocks.count, tensors.g,
                                    self._starts(tensors, blocks), prep, table, out,
                                    self._kernels.GRADIENT_FORMATS.index(fmt))
        return out.copy_to_host()

    def constant(self, a):
        return self._cuda.to_device(a)

    _whole = HostBackend._whole
    _compiled = HostBackend._compiled


def _extent(a):
    """The byte range of a contiguous device array."""
    if hasattr(a, "__cuda_array_interface__"):
        start = a.__cuda_array_interface__["data"][0]
    else:  # the simulator keeps a NumPy array inside
        start = a._ary.ctypes.data
    return start, start + a.size * a.dtype.itemsize


def _segments(sizes, state_starts, tensor, offsets, to_device, draws, rows):
    count = len(sizes)
    tensor = np.arange(count) if tensor is None else tensor
    offsets = np.zeros(count, np.int64) if offsets is None else offsets
    return Segments(sizes, state_starts, tensor, offsets, to_device, draws, rows)


def _address(a):
    return a.__array_interface__["data"][0]


@functools.cache
def tensor_arguments(spec):
    """Which of ``p``, ``g`` and ``w`` the kernel of the pass ``spec`` takes."""
    from .kernels import _template, rules

    rule = getattr(rules, spec.rule)
    return tuple(n for n in _template.arrays(rule, (), spec.master) if n in ADDRESSED)


def backend_of(x):
    return CudaBackend() if is_cuda_array(x) else HostBackend()
