"""What a step does besides running kernels, the same on both front ends
(:class:`fastopt.Optimizer` over its flat buffers, ``fastopt.torch`` over the model's
tensors): the algorithm's float32 scalars for a step, refused where they overflow; the
inverse loss scale; the global gradient norm, with the clipping coefficient and the
non-finite skip it decides; the factors of ``rules.prepare``; and the two passes of a
cautious step."""

import math
import numbers

import numpy as np

from ..kernels import Pass, rules
from ..kernels._template import arrays
from ..kernels.codecs import QUANTIZED
from .checks import FLOAT32_MAX, FLOAT32_TINY, real

f32 = np.float32

# torch.nn.utils.clip_grad_norm_ adds this to the norm before dividing by it.
CLIP_NORM_EPS = 1e-6


def fold(algorithm, group, step, fresh, host, index=None):
    """``algorithm.scalars(group, step, fresh, host)``; a ValueError naming the
    hyperparameters (and ``param_groups[index]``, unless None) where one overflows
    float32."""
    h = algorithm.scalars(group, step, fresh, host)
    if not _finite(h):
        where = "" if index is None else f" in param_groups[{index}]"
        raise overflow_error(algorithm, group, step, fresh, host, where)
    return h


def check_host_after(algorithm, group, step, host, index):
    """``algorithm.host_after(group, step, host)``, computed ahead of the step, so that
    one that overflows (ASGD's ``eta`` with a huge ``lambd``) raises a ValueError naming
    ``param_groups[index]`` before any group is stepped."""
    try:
        return algorithm.host_after(group, step, host)
    except ArithmeticError as error:
        raise ValueError(f"param_groups[{index}]'s hyperparameters overflow the host state "
                         f"of step {step} ({type(error).__name__}: {error}); make them "
                         "smaller") from None


def overflow_error(algorithm, group, step, fresh, host, where):
    """The error for scalars that overflow float32 (``lr / (1 - beta1)`` with a huge lr,
    say). torch raises for most of these too; fastopt refuses them all, since a step
    by an infinite factor only turns the parameters into infinities and NaNs. The
    culprits are the hyperparameters that, set to 0 alone, make the scalars fit."""
    def fits_without(key):
        try:
            with np.errstate(over="ignore"):  # numpy has warned once already
                return _finite(algorithm.scalars(dict(group, **{key: 0.0}), step, fresh, host))
        except (ArithmeticError, TypeError, ValueError):
            return False

    reals = [k for k, v in group.items()
             if isinstance(v, numbers.Real) and not isinstance(v, bool)]
    culprits = [k for k in reals if fits_without(k)] or reals
    values = ", ".join(f"{k}={group[k]!r}" for k in culprits)
    return ValueError(f"{values}{where} overflows float32 in the scalars of step {step} "
                      f"(float32 holds at most {FLOAT32_MAX:.4g}); make "
                      f"{' or '.join(culprits)} smaller")


def inverse_loss_scale(grad_scale):
    """``1 / grad_scale`` (1 for None), after checking it."""
    return 1.0 if grad_scale is None else 1.0 / _loss_scale(grad_scale)


# The largest gradient norm that float32 holds with room for the kernels' factor on the
# gradients (rounded to float32, up to 2**-24 larger; the room is twice that). A loss
# scale below 1 multiplies the gradients in the kernel, where one may overflow while the
# float64 norm is finite: past this norm such a step counts as non-finite.
FINITE_NORM = FLOAT32_MAX / (1.0 + 2.0 ** -23)


def clip_or_skip(opt, skip_nonfinite, inverse_scale, sum_squares):
    """The coefficient that ``opt.clip_grad_norm`` scales the gradients by, or None for a
    step to skip (``skip_nonfinite`` and a norm of the unscaled gradients that is NaN or
    Inf, or beyond ``FINITE_NORM`` where a loss scale below 1 scales them up, counted in
    ``opt.skipped_steps``). ``sum_squares()`` gives the gradients' sum of squares, taken
    only where clipping or the skip needs it; the norm goes to ``opt.last_grad_norm``."""
    if not (skip_nonfinite or opt.clip_grad_norm is not None):
        return 1.0
    norm = math.sqrt(sum_squares()) * inverse_scale
    opt.last_grad_norm = norm
    if skip_nonfinite and not (math.isfinite(norm)
                               and (inverse_scale <= 1.0 or norm <= FINITE_NORM)):
        opt.skipped_steps += 1
        return None
    return 1.0 if opt.clip_grad_norm is None else clip_coefficient(opt.clip_grad_norm, norm)


def prep(algorithm, group, inverse_scale, coefficient, clip_grad_value):
    """The factors of ``rules.prepare`` for one group: the sign for ``maximize`` with the
    loss and clipping scales, the value clipping, and the algorithm's L2 decay.

    A plain tuple of numbers in the order of ``rules.Prep``'s fields, which the backends
    round to float32 as they do ``h``, and built here only: a named one would cost a
    microsecond a step at small sizes."""
    sign = -1.0 if group.get("maximize") else 1.0
    clip = math.inf if clip_grad_value is None else clip_grad_value
    g_scale = sign * inverse_scale * coefficient
    if 0.0 < abs(g_scale) < FLOAT32_TINY:  # a subnormal float32, flushed: two normal ones
        return g_scale / FLOAT32_TINY, FLOAT32_TINY, clip, algorithm.l2(group)
    return g_scale, 1.0, clip, algorithm.l2(group)


# Below this eps, the flush would show: a second moment under float32's normal numbers
# (of gradients under about 1e-19) read as 0 leaves eps alone in the denominator, where
# torch's sqrt of it is up to 1e-19 (3e-18 after Adam's bias correction), or 0/0 with
# eps = 0. At 1e-10 that is 3e-8 of the denominator at most.
SMALL_EPS = 1e-10


def keeps_subnormals(algorithm, group):
    """Whether the kernels must keep subnormal numbers for ``group``'s step (see
    ``fastopt.kernels.cpu.FLUSH_DENORMALS``): where the algorithm needs them
    (``Spec.keeps_subnormals``), the group's ``eps`` is below ``SMALL_EPS``, or it steps
    with ``caution``, whose mask tests ``m * g > 0``: subnormal for gradients below
    about 3e-19, and flushed, it masked them, which also lowered the tensor's share, so
    that its other elements stepped up to twice as far as timm's."""
    eps = group.get("eps")
    return (algorithm.spec.keeps_subnormals or bool(group.get("caution"))
            or (isinstance(eps, (int, float)) and eps < SMALL_EPS))


def clip_coefficient(max_norm, norm):
    """torch's ``min(1, max_norm / (norm + 1e-6))``; a NaN norm gives NaN, as in torch."""
    coefficient = max_norm / (norm + CLIP_NORM_EPS)
    return coefficient if coefficient < 1.0 or math.isnan(coefficient) else 1.0


def _loss_scale(value):
    scale = real("grad_scale", value)
    if not (0.0 < scale < math.inf):
        raise ValueError(f"grad_scale must be a finite number > 0, got {value!r}")
    if 1.0 / scale > FLOAT32_MAX:
        raise ValueError(f"grad_scale={value!r} is so small that 1/grad_scale overflows float32")
    return scale


# The smallest magnitude that float32 rounds to infinity: halfway between its largest
# number (2**128 - 2**104) and 2**128, which ties to even, to 2**128.
FLOAT32_OVERFLOW = 2.0 ** 128 - 2.0 ** 103


def _finite(h):
    """Whether every number in the scalars ``h`` stays finite in float32, as the kernels
    get them (``kernels._template.float32s``). Their norm bounds every magnitude and
    carries an inf or a NaN, so one C call clears the usual case; the rest are checked
    one by one: one sum finds an inf or a NaN (among finite numbers the sum is finite),
    the extremes a finite number too large."""
    if math.hypot(*h) < FLOAT32_OVERFLOW:
        return True
    try:
        return (math.isfinite(math.fsum(h))
                and -FLOAT32_OVERFLOW < min(h) and max(h) < FLOAT32_OVERFLOW)
    except (ValueError, OverflowError):  # inf and -inf; a sum beyond float64
        return False


class Work:
    """One launch of a step that is more than one flat pass of the rule (per-tensor norms,
    factors, caution), as either front end hands it to ``algorithm.update``: the
    launch's tensors, their state and the front's way to reach them.

    Attributes:
        backend: the ``fastopt._backend`` backend that runs the kernels.
        tensors: the parameters and gradients, and the master weights where kept, a
            ``fastopt._backend.Tensors``.
        shapes: the tensors' shapes, in order.
        segments: one ``Segments`` per tensor, the state laid out like the parameters.
        state: the flat state buffers of ``present``, by name.
        present: the state buffers this step uses, in the rule's order.
        state_starts: a function of a buffer's name to an int64 array: where each
            tensor's part of the buffer ``name`` begins (-1 where it has none; see
            :func:`state_layout`).
        prep: the factors of ``rules.prepare``.
        keep_subnormals: whether the kernels keep subnormals for this step
            (:func:`keeps_subnormals`).
        cache: a dict the front keeps for this launch between steps (plans).
        formats: the 16-bit buffers (``p``, ``g``, states) by name, with their format
            (``precision.DTYPES``' names); empty where every buffer is float32.
        master: whether 16-bit parameters keep master weights (``tensors.w``).
        stochastic: whether the 16-bit stores round stochastically (default False).
        key: the step's rounding key (``codecs.rounding_key``) where ``stochastic``.
        first: the index in the random draw of the state buffers' first element (the
            start of a ZeRO partition, whose elements then draw the bits that they
            draw in one process).
        blocks: where state is kept in 8 bits, ``(rows, state_starts, size, arrays)``:
            the blocks of the segments (``HostBackend.run_blocks``), and each 8-bit
            buffer's absmax and small arrays by name.
        sum_segments: the segments of a pass that sums over the tensors (default:
            ``segments``); where the tensors are this process's shards of larger ones,
            their sums are the whole tensors' (see ``fastopt.torch._Store.table``).
        reduce: where the tensors are this process's shards of larger ones (DTensors),
            ``reduce(sums)`` gives the whole tensors' sums from per-tensor sums that an
            algorithm adds up over segments of its own (adding the other processes'
            parts); None otherwise.
        sizes: the number of elements of each whole tensor.
        split_rows: per tensor, where the rows of a matrix (2-D) are split across the
            processes, its whole number of rows, else 0 (Adafactor adds its column sums
            over the processes); None for none.
        first_rows: per tensor that the processes split along its first dimension
            alone, the place of this process's piece along it (its first row, or a
            vector's first element); -1 for the others.
        in_row_order: where the processes hold those pieces in their order (one
            process dimension), ``in_row_order(carry, fold)`` runs ``carry =
            fold(carry)`` on each process in turn, from zeros on the first, handing the
            carry (float64) on, and returns the last one's on every process: sums that
            it carries down the rows do not depend on where the tensors are cut. None
            otherwise.
    """

    def __init__(self, backend, tensors, shapes, segments, state, present, state_starts,
                 prep, keep_subnormals, cache, formats=None, master=False):
        self.backend, self.tensors, self.shapes, self.segments = backend, tensors, shapes, segments
        self.state, self.present, self.state_starts = state, present, state_starts
        self.prep, self.keep_subnormals, self.cache = prep, keep_subnormals, cache
        self.formats, self.master = formats or {}, master
        self.stochastic, self.key, self.first, self.blocks = False, 0, 0, None
        self.sum_segments, self.reduce, self.sizes, self.split_rows = (
            segments, None, segments.sizes, None)
        self.first_rows, self.in_row_order = None, None

    def run(self, spec, h, segments=None, values=(), states=None):
        """The pass ``spec`` (a ``kernels.Pass``) with scalars ``h`` over ``segments``
        (default: the tensors) and ``states`` (default: those ``spec.present`` names),
        through the formats and master weights of the launch; returns its sums per
        segment (over the whole tensors where they are shards: see ``sum_segments``)."""
        if states is None:
            states = [*map(self.state.__getitem__, spec.present)]
        if self.formats or self.master:
            master = self.master
            names = arrays(getattr(rules, spec.rule), spec.present, master)
            spec = spec._replace(master=master, stochastic=self.stochastic, formats=tuple(
                (name, self.formats[name]) for name in names if name in self.formats))
            quantized = [name for name, fmt in spec.formats if fmt in QUANTIZED]
            if quantized:  # a single pass, block by block
                rows, starts, size, scales = self.blocks
                return self.backend.run_blocks(
                    spec, self.tensors, states,
                    (rows, starts, size, [a for name in quantized for a in scales[name]]),
                    self.prep, h, self.keep_subnormals, self.key, self.first)
        if segments is None:
            segments = self.sum_segments if spec.sums else self.segments
        return self.backend.run_segments(spec, self.tensors, states, self.prep, h, segments,
                                         values, self.keep_subnormals, self.key, self.first)


def state_layout(algorithm, name, shapes):
    """``(starts, size)``: the state buffer ``name`` of tensors of ``shapes``, each
    tensor's part (of ``algorithm.state_shape``) after the previous one's: where each
    begins (-1 where it has none), and the size of the buffer."""
    starts, size = [], 0
    for shape in shapes:
        state_shape = algorithm.state_shape(name, tuple(shape))
        starts.append(-1 if state_shape is None else size)
        size += 0 if state_shape is None else math.prod(state_shape)
    return np.array(starts, np.int64), size


def single_pass(algorithm, h):
    """Whether this step is one pass of the rule (no ``update`` of several passes)."""
    return algorithm.spec.one_pass and not getattr(h, "caution", False)


# timm clamps the share of a tensor that agrees with its gradient to at least this.
CAUTION_MIN_SHARE = f32(1e-3)


def cautious_step(work, rule, h):
    """A step of ``rule`` with ``h.caution`` over the tensors of ``work``: the first pass
    counts, per tensor, where the momentum agrees with the gradient (the rule's
    ``agreement``) and writes nothing; the second steps with
    ``caution_scale = 1 / max(share, 1e-3)``, the share a float64 quotient rounded to
    float32 (timm's mask.mean(), a float32 mean, can be 1 ulp off above 2**24
    elements; this, rounded twice, above about 5e8)."""
    agree, = work.run(Pass(rule, work.present, writes=(), sums=("agreement",)), h)
    share = (agree / np.maximum(work.sizes, 1)).astype(f32)
    scale = f32(1) / np.maximum(share, CAUTION_MIN_SHARE)
    work.run(Pass(rule, work.present, per_segment=("caution_scale",)), h, values=[scale])
