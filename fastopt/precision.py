"""Storage formats: which dtype each buffer of an optimizer is kept in.

Every rule computes in float32; a buffer kept in 16 bits is read into float32 and
written back rounded (to nearest, ties to even; stochastically with
``stochastic_rounding``; with ties away from zero beside remainders) inside the step's
single pass (``kernels.codecs``). Parameters and gradients may be float32, bfloat16
(ml_dtypes) or float16; the state float32, bfloat16, or for moving averages int8:
block-wise codes of a dynamic map (see :func:`quantize`).
"""

import ml_dtypes
import numpy as np

from .kernels import codecs
from .kernels._template import REMAINDER

FLOAT32 = np.dtype(np.float32)
DTYPES = {"float32": FLOAT32, "bfloat16": np.dtype(ml_dtypes.bfloat16),
          "float16": np.dtype(np.float16)}
STATE_DTYPES = ("float32", "bfloat16", "int8")
# A tensor with fewer elements keeps float32 state where 8-bit state is asked for (as
# bitsandbytes' min_8bit_size): its blocks would cost more than they save.
MIN_QUANTIZED_SIZE = 4096
MASTER_WEIGHTS = ("auto", "float32", "remainder", None)
# The dtype of master weights kept as the low halves of their float32 bits.
REMAINDER_DTYPE = np.dtype(np.uint16)
REBUILT_AT_ONCE = 1 << 16  # elements: rebuild_master's temporaries
# The names of a buffer kept in 8 bits: "<name>_absmax" holds the scales of its blocks
# (in opt.state, fastopt.torch's opt.state[p] and state dicts) and "<name>_small" the
# float32 state of the tensors too small to quantize. fastopt.torch's state_dict() saves
# the codes as "<name>_codes", which torch.optim does not know (it would read codes as
# values); and, once per parameter, the strides of the layout in whose memory order
# their blocks run, so that a copy of them in another layout (.contiguous()) still pairs
# each code with its block's absmax.
ABSMAX, SMALL, CODES, STRIDES = "_absmax", "_small", "_codes", "codes_strides"


_HALVES = (DTYPES["bfloat16"], DTYPES["float16"])


def name_of(dtype):
    """``"float32"``, ``"bfloat16"`` or ``"float16"``: the format of ``dtype``, or None."""
    return next((name for name, known in DTYPES.items() if known == dtype), None)


def bits(a):
    """The array the kernels take for ``a``: its bits (``codecs.BITS``) in a 16-bit
    float format, ``a`` itself otherwise (float32, uint16 remainders, uint8 codes)."""
    return a.view(codecs.BITS) if a.dtype in _HALVES else a


def to_device(a):
    """A Numba device array holding a copy of the NumPy array ``a``, in ``a``'s dtype. A
    bfloat16 array travels as its bits: numba-cuda copies between host and device
    through the buffer protocol, which NumPy refuses for ml_dtypes' bfloat16 ("cannot
    include dtype 'E' in a buffer")."""
    from numba import cuda

    a = np.asarray(a, order="C")  # ascontiguousarray would make a 0-d array 1-d
    return cuda.to_device(bits(a)).view(a.dtype)


def formats(names, arrays):
    """The ``kernels._template.Pass.formats`` of buffers ``names`` held in ``arrays``."""
    return tuple((name, name_of(a.dtype)) for name, a in zip(names, arrays)
                 if a.dtype != FLOAT32)


# 8-bit state is stepped in one pass over its blocks.
TWO_PASSES = ("caution=True takes two passes, which 8-bit state (state_dtype='int8') does "
              "not step yet")

# Centered RMSprop's variance is square_avg - grad_avg**2: of two buffers rounded apart, it
# came out negative (a NaN parameter) where the gradient's mean outweighs its noise.
CENTERED = ("centered=True subtracts grad_avg squared from square_avg, which 8-bit state "
            "(state_dtype='int8') rounds apart: the variance can come out negative (a NaN "
            "step) or near 0 (a step far too large), as bitsandbytes refuses it too; keep "
            "them in float32 or bfloat16 (state_dtype={'momentum_buffer': 'int8'})")


def refused_in_8_bits(group, quantized):
    """Why the options of ``group`` cannot step with the 8-bit buffers ``quantized``
    (names), or None."""
    if not quantized:
        return None
    if group.get("caution"):
        return TWO_PASSES
    if group.get("centered") and {"square_avg", "grad_avg"} & set(quantized):
        return CENTERED
    return None


NOTHING_TO_ROUND = ("stochastic_rounding=True has nothing to round: it rounds 16-bit "
                    "parameters without master weights (master_weights=None) and bfloat16 "
                    "state")


def _rounding(storage, stochastic_rounding, seed):
    """``(stochastic, seed)`` after checking them against what ``storage`` rounds."""
    if not isinstance(stochastic_rounding, (bool, np.bool_)):
        raise TypeError(f"stochastic_rounding must be True or False, got {stochastic_rounding!r}")
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, (bool, np.bool_)):
        raise TypeError(f"seed must be an int, got {seed!r}")
    if not 0 <= seed < 2 ** 64:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    if not stochastic_rounding:
        return False, int(seed)
    rounded = [name for name, fmt in storage.formats.items()
               if name not in ("g", "w") and name not in storage.quantized
               and not (name == "p" and storage.master)]
    return bool(rounded), int(seed)  # False where there is nothing to round


def rebuild_master(params, remainders):
    """The float32 master weights that bfloat16 ``params`` and their ``remainders``
    (uint16, as ``master_weights="remainder"`` keeps them) stand for, as the kernels
    rebuild them (``kernels.codecs.bfloat16_rebuild``): a parameter holds the master's
    high 16 bits rounded to nearest with ties away from zero, the remainder its low 16
    bits; an infinity, a NaN, and a zero that nothing rounds up to stand for themselves.
    NumPy arrays; a new array, worked out ``REBUILT_AT_ONCE`` elements at a time, so that
    a whole model's (a state_dict's) needs 4 bytes a parameter, not six times that."""
    bits = np.asarray(params).view(codecs.BITS).reshape(-1)
    remainders = np.asarray(remainders, REMAINDER_DTYPE).reshape(-1)
    master = np.empty(np.shape(params), np.uint32)
    out = master.reshape(-1)
    for start in range(0, out.size, REBUILT_AT_ONCE):
        part = slice(start, start + REBUILT_AT_ONCE)
        high, low = bits[part].astype(np.uint32), remainders[part].astype(np.uint32)
        carried = low >> 15  # where the high half was rounded up
        rebuilt = ((high - carried) << 16) | low  # wraps where high is a zero: refused next
        written = (carried > (high & 0x7FFF)) | ((high & 0x7FFF) >= 0x7F80)
        out[part] = np.where(written, high << 16, rebuilt)
    return master.view(np.float32)


def quantize(values, fmt, fit=False):
    """``(codes, absmax)``: float32 ``values`` in blocks of ``codecs.BLOCK`` (the last one
    shorter), each by the largest magnitude in it and the nearest value of the dynamic
    map ``fmt`` (``codecs.QUANTIZED``, ties toward zero; in the unsigned map, a positive
    value nearest to 0, or scaled to 0, takes the smallest positive one), as the kernels
    keep 8-bit state: the value times ``1 / absmax`` in float32, as the kernels take it,
    then the nearest in float64.

    ``fit``: each block's absmax the smallest that the map's range holds its values in
    instead: the signed map's most negative value is not -1 (-0.993), so a block whose
    largest magnitude is negative, as one decoded is where it was so, keeps that value
    (and the block's codes, and its absmax to within a float32 step, come back)."""
    values = np.asarray(values, FLOAT32)
    blocks = -(-values.size // codecs.BLOCK)
    padded = np.zeros(blocks * codecs.BLOCK, FLOAT32)
    padded[:values.size] = values
    padded = padded.reshape(blocks, codecs.BLOCK)
    absmax = np.abs(padded).max(axis=1)
    lowest = codecs.QUANTIZED[fmt][0][0]
    if fit and lowest < 0:  # (within float32 where the values are: -3.4e38 / 0.993 is not)
        fitted = np.maximum(np.maximum(padded.max(axis=1), 0),
                            np.maximum(-padded.min(axis=1), 0) / -lowest).astype(FLOAT32)
        absmax = np.where(absmax < np.inf, np.minimum(fitted, np.finfo(FLOAT32).max), fitted)
    absmax = np.where(absmax < np.inf, absmax, np.nan).astype(FLOAT32)  # as the kernels'
    prescale = np.select([absmax > codecs.LARGEST_PLAIN_ABSMAX,
                          (absmax > 0) & (absmax < codecs.SMALLEST_PLAIN_ABSMAX)],
                         [codecs.PRESCALE, codecs.SUBNORMAL_PRESCALE],
                         FLOAT32.type(1)).astype(FLOAT32)
    inverse = np.where(absmax > 0,
                       FLOAT32.type(1) / np.where(absmax > 0, absmax * prescale, 1), 0)
    normalized = ((padded * prescale[:, None]) * inverse[:, None].astype(FLOAT32)
                  ).astype(np.float64).ravel()
    values_of = codecs.QUANTIZED[fmt][0].astype(np.float64)
    above = np.clip(np.searchsorted(values_of, normalized), 1, values_of.size - 1)
    below, beyond = normalized - values_of[above - 1], values_of[above] - normalized
    nearer_below = (below < beyond) | ((below == beyond) & (normalized > 0))
    codes = np.where(nearer_below, above - 1, above)
    if values_of[0] == 0:  # unsigned: a positive value is never stored as 0, even one
        codes = np.where((codes == 0) & (padded.ravel() > 0), 1, codes)  # scaled to 0
    codes = codes.astype(codecs.CODES)
    return codes[:values.size], absmax.astype(FLOAT32)


def dequantize(codes, absmax, fmt):
    """The float32 values of 8-bit ``codes`` in blocks with ``absmax`` (see
    :func:`quantize`): ``dequantize(opt.state["exp_avg"][a:b], opt.state["exp_avg_absmax"]
    [first:last], "signed8")`` for a tensor whose elements ``a:b`` are blocks ``first`` to
    ``last`` (``fastopt.optim.optimizer.Blocks``)."""
    scale = np.repeat(np.asarray(absmax, FLOAT32), codecs.BLOCK)[:codes.size]
    return codecs.QUANTIZED[fmt][0][codes] * scale


def block_rows(segment, start, size, small):
    """The rows ``(segment, offset, size, small)`` (int64) of the 8-bit blocks of a
    tensor of ``size`` elements from ``start`` of segment ``segment``, as the kernels
    take them: each block's offset in the segment, its size (the last one shorter), and
    where its float32 state begins in the ``_small`` buffer (``small + ...``) or -1 for
    a quantized tensor's (``small`` < 0)."""
    at = np.arange(0, size, codecs.BLOCK, dtype=np.int64)
    rows = np.empty((at.size, 4), np.int64)
    rows[:, 0], rows[:, 1] = segment, start + at
    rows[:, 2] = np.minimum(codecs.BLOCK, size - at)
    rows[:, 3] = small + at if small >= 0 else -1
    return rows


def blocks_of(first, last):
    """The 8-bit blocks (of ``codecs.BLOCK`` elements, from a tensor's first element) that
    hold its elements ``[first, last)``, as ``(first block, last block)``: a piece of a
    tensor begins on a block, and an empty piece holds none (even where its place is
    inside the tensor's last block)."""
    if last <= first:
        return 0, 0
    return first // codecs.BLOCK, -(-last // codecs.BLOCK)


def _one_of(value, names):
    """Whether ``value`` is one of ``names`` (strings, or None) itself: a NumPy dtype
    compares equal to its name, and would pass ``in``."""
    return (value is None or isinstance(value, str)) and value in names


def check_grad_dtype(grad_dtype):
    """``grad_dtype``, after checking that it is None or a name of ``DTYPES``."""
    if grad_dtype is not None and not _one_of(grad_dtype, DTYPES):
        raise ValueError(f"grad_dtype must be None or one of {sorted(DTYPES)}, "
                         f"got {grad_dtype!r}")
    return grad_dtype


def grads_dtype(params_dtype, grad_dtype):
    """The gradients' dtype: ``grad_dtype`` (a name of ``DTYPES``), or None for the
    parameters' ``params_dtype``."""
    return params_dtype if grad_dtype is None else DTYPES[grad_dtype]


class Storage:
    """An optimizer's choice of formats, checked: ``master`` (master weights for 16-bit
    parameters; ``remainder``: as the low halves of their bits), ``grads`` (the
    gradients' dtype), ``states`` (dtype by state buffer name; uint8 codes for int8),
    ``quantized`` (the int8 buffers, with their map: ``codecs.QUANTIZED``) and
    ``formats`` (every buffer not float32, by the rules' names, with its format).

    ``master_weights``: ``"auto"`` (float32 master weights where the parameters are
    16-bit), ``"float32"``, ``"remainder"`` (bfloat16 parameters: only the low 16 bits of
    float32 master weights, see :func:`rebuild_master`) or None. ``state_dtype``: a
    name of ``STATE_DTYPES``, or a dict of them by state buffer. ``grad_dtype``: None
    (the parameters' dtype) or a name of ``DTYPES``. ``stochastic_rounding``: round the
    16-bit values stored without master weights (parameters with
    ``master_weights=None``, bfloat16 state) stochastically, on random bits of ``(seed,
    step, element)`` (``codecs.random_bits``), so that small updates survive in
    expectation. ``state_names`` are the state buffers
    of ``algorithm`` (a class, named in messages)."""

    def __init__(self, algorithm, state_names, params_dtype, master_weights, state_dtype,
                 grad_dtype, stochastic_rounding=False, seed=0):
        if not _one_of(master_weights, MASTER_WEIGHTS):
            raise ValueError(f"master_weights must be one of {MASTER_WEIGHTS}, "
                             f"got {master_weights!r}")
        float32_params = params_dtype == FLOAT32
        if master_weights in ("float32", REMAINDER) and float32_params:
            raise ValueError(f"master_weights={master_weights!r} keeps float32 master "
                             "weights of 16-bit parameters; these are float32 already "
                             "(use 'auto' or None)")
        if master_weights == REMAINDER and name_of(params_dtype) != "bfloat16":
            raise ValueError("master_weights='remainder' keeps the low 16 bits of float32 "
                             "master weights whose high 16 bits are bfloat16 parameters; "
                             f"{name_of(params_dtype)} parameters need 'float32'")
        self.master = master_weights is not None and not float32_params
        self.remainder = master_weights == REMAINDER
        self.grads = grads_dtype(params_dtype, check_grad_dtype(grad_dtype))
        if isinstance(state_dtype, dict):
            unknown = set(state_dtype) - set(state_names)
            if unknown:
                raise ValueError(f"state_dtype names {sorted(map(str, unknown))}, which "
                                 f"{algorithm.__name__} does not keep; its state is "
                                 f"{list(state_names)}")
            chosen = {name: state_dtype.get(name, "float32") for name in state_names}
        else:
            chosen = dict.fromkeys(state_names, state_dtype)
        for name, value in chosen.items():
            if not _one_of(value, STATE_DTYPES):
                raise ValueError(f"state_dtype must be one of {STATE_DTYPES} or a dict of "
                                 f"them by state buffer, got {value!r} for {name!r}")
        if algorithm.spec.factored and set(chosen.values()) != {"float32"}:
            raise ValueError(f"{algorithm.__name__} keeps its state in float32 only (its "
                             f"factors move on the host), not state_dtype={state_dtype!r}")
        averages = algorithm.spec.averages
        others = [name for name, value in chosen.items()
                  if value == "int8" and name not in averages]
        if others and not averages and not algorithm.spec.one_pass:
            raise ValueError(
                f"state_dtype='int8' keeps the moving averages of single-pass steps in 8 "
                f"bits, a block at a time; {algorithm.__name__} steps in passes that sum "
                f"over whole tensors ({' then '.join(algorithm.spec.passes)}), which 8-bit "
                f"state does not step yet: keep its state in float32 or bfloat16")
        if others:
            raise ValueError(
                f"state_dtype='int8' keeps moving averages in 8 bits; {algorithm.__name__}'s "
                f"{', '.join(others)} {'is not one' if len(others) == 1 else 'are not'}: "
                + (f"ask it of {', '.join(averages)} by a dict" if averages else
                   "it keeps none that 8 bits can hold (the single-pass algorithms' "
                   "averages: Adam, AdamW, NAdam, RAdam, Adamax, SGD's momentum, RMSprop, "
                   "Adadelta, Lion, Adan)"))
        self.state_dtype_names = chosen  # as a checkpoint records them
        # The 8-bit buffers with their map's format (codecs.QUANTIZED): codes, uint8.
        self.quantized = {name: averages[name] for name, value in chosen.items()
                          if value == "int8"}
        self.states = {name: codecs.CODES if value == "int8" else DTYPES[value]
                       for name, value in chosen.items()}
        # The buffers kept in 16 bits, by the names the rules give them, with their format.
        self.formats = {name: self.quantized.get(name) or name_of(dtype) for name, dtype in
                        (("p", params_dtype), ("g", self.grads), *self.states.items())
                        if dtype != FLOAT32}
        if self.remainder:
            self.formats["w"] = REMAINDER
        self.stochastic, self.seed = _rounding(self, stochastic_rounding, seed)

    def record(self):
        """The choices as JSON values, which a checkpoint keeps (``master_weights`` as
        resolved: ``"float32"``, ``"remainder"`` or None)."""
        return {"master_weights": self.master_weights,
                "state_dtype": dict(self.state_dtype_names),
                "grad_dtype": name_of(self.grads), "stochastic_rounding": self.stochastic,
                "seed": self.seed}

    @property
    def master_weights(self):
        """``"float32"``, ``"remainder"`` or None: the master weights kept."""
        return REMAINDER if self.remainder else "float32" if self.master else None

    @property
    def master_dtype(self):
        """The dtype of the kept master weights (their low halves as uint16, for
        ``"remainder"``), or None."""
        return REMAINDER_DTYPE if self.remainder else FLOAT32 if self.master else None

    def key(self, step, stream=0):
        """The rounding key of step ``step`` (``codecs.rounding_key``); ``stream`` tells
        apart buffers that index their elements from 0 each (fastopt.torch's stores)."""
        return codecs.rounding_key(self.seed, step, stream)

    def state(self, name):
        """The dtype of the state buffer ``name``: float32 for buffers the rule does not
        name (Adafactor's factors), which only float32 optimizers keep."""
        return self.states.get(name, FLOAT32)
