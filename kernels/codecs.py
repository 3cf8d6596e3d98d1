"""How a buffer stored in fewer than 32 bits is read into, and written from, the float32
that every rule computes in: the rule never changes, the drivers wrap its loads and
stores in these (``_template.Pass.formats``).

A 16-bit value travels as its bits, a ``uint16``: Numba has no bfloat16 type, and no
float16 arithmetic on the CPU. Stores round to nearest, ties to even, as a cast in
NumPy, ml_dtypes and torch does; a NaN stays a (quiet) NaN of the same sign, and a
value beyond the format's range becomes an infinity.

Each function is compiled for the CPU and for CUDA like a rule, so it uses only
integer and float32 operations on scalars; Python int literals are int64 in Numba,
which these bit operations tolerate.
"""

import numpy as np

u32 = np.uint32
i32 = np.int32


def bfloat16_load(bits):
    """The float32 of the bfloat16 ``bits``: its upper half."""
    return u32(u32(bits) << u32(16)).view(np.float32)


# A float32 NaN with this bit set is quiet, as its upper half (a bfloat16) is then. The
# bfloat16 stores select between a NaN's bits and the rounded bits before the shift: so
# LLVM packs each vector of results to 16 bits once, where a NaN returned on its own was
# packed too, then blended (every bfloat16 format of Adam took 1.06-1.18x as long).
_QUIET = u32(0x400000)
# A float32's bits less its sign, and infinity's: a NaN's magnitude is above it. (Names, so
# that the CUDA simulator, which runs the codecs as Python, does not build them at every
# call.)
_MAGNITUDE = u32(0x7FFFFFFF)
_INFINITY = u32(0x7F800000)


def bfloat16_store(x):
    """The bfloat16 bits nearest to the float32 ``x`` (ties to even)."""
    bits = np.float32(x).view(u32)
    rounded = (bits | _QUIET if x != x  # quiet, sign kept
               else bits + u32(0x7FFF) + ((bits >> u32(16)) & u32(1)))
    return np.uint16(rounded >> u32(16))


# float16's exponent bias is 15, float32's 127.
_HALF_SUBNORMAL_SCALE = np.float32(2.0 ** -24)  # the value of float16's last mantissa bit
_REBIAS = u32((127 - 15) << 23)
# Adding this float32 (0.5) to a magnitude below float16's smallest normal rounds it, in
# float32 arithmetic and to nearest even, to a multiple of 2**-24: float16's subnormal
# step; the difference of the bits is then the subnormal's mantissa.
_HALF = np.float32(0.5)
_SUBNORMAL_MAGIC = _HALF.view(np.uint32)
# A NaN keeps its sign and the top of its payload, and becomes quiet, as x86's F16C
# conversions do, which the CPU drivers take where they compile (kernels.x86.F16C):
# every backend gives the same bits. (Written with a branch per class of value, these
# vectorise poorly on the CPU, which F16C's hosts do not run; computed in every case and
# selected, they took the CUDA simulator, which runs them as Python, 1.6-3x as long.)


def float16_load(bits):
    """The float32 of the float16 ``bits`` (exact: float32 holds every float16)."""
    bits = u32(bits)
    sign = u32((bits & u32(0x8000)) << u32(16))
    exponent = (bits >> u32(10)) & u32(0x1F)
    mantissa = u32(bits & u32(0x3FF))
    if exponent == 0:  # zero or subnormal: mantissa * 2**-24
        magnitude = np.float32(mantissa) * _HALF_SUBNORMAL_SCALE
        return -magnitude if sign else magnitude
    if exponent == 0x1F:  # infinity, or a NaN made quiet
        quiet = _QUIET if mantissa else u32(0)
        return u32(sign | _INFINITY | quiet | (mantissa << u32(13))).view(np.float32)
    return u32(sign | (((bits & u32(0x7FFF)) << u32(13)) + _REBIAS)).view(np.float32)


def float16_store(x):
    """The float16 bits nearest to the float32 ``x`` (ties to even)."""
    bits = np.float32(x).view(u32)
    sign = u32((bits >> u32(16)) & u32(0x8000))
    magnitude = u32(bits & _MAGNITUDE)
    if magnitude > _INFINITY:  # NaN
        return np.uint16(sign | u32(0x7E00) | ((magnitude >> u32(13)) & u32(0x1FF)))
    if magnitude >= u32(143 << 23):  # 65536 and beyond, infinity included
        return np.uint16(sign | u32(0x7C00))
    if magnitude < u32(113 << 23):  # below 2**-14: a subnormal or zero
        rounded = np.float32(magnitude.view(np.float32) + _HALF).view(u32)
        return np.uint16(sign | (rounded - _SUBNORMAL_MAGIC))
    odd = (magnitude >> u32(13)) & u32(1)
    rounded = magnitude - _REBIAS + u32(0xFFF) + odd  # to nearest, ties to even
    return np.uint16(sign | (rounded >> u32(13)))  # 65520 and up carry into infinity


def bfloat16_store_stochastic(x, random):
    """The bfloat16 bits of the float32 ``x`` rounded stochastically: up (in magnitude)
    with the probability of its dropped low 16 bits over 2**16, which ``random`` (any
    uint32, of which the low 16 bits count) decides; so the rounding is unbiased."""
    bits = np.float32(x).view(u32)
    rounded = bits | _QUIET if x != x else u32(bits + (u32(random) & u32(0xFFFF)))
    return np.uint16(rounded >> u32(16))


# float16's subnormal step, 2**-24, as a factor that scales it to 1.
_HALF_SUBNORMAL_STEPS = np.float32(2.0 ** 24)


def float16_store_stochastic(x, random):
    """The float16 bits of the float32 ``x`` rounded stochastically: up (in magnitude)
    with the probability of its dropped bits over their range, which ``random`` (any
    uint32, of which the low 13 bits count, and 16 below float16's normal numbers)
    decides; so the rounding is unbiased. Beyond float16's largest number it rounds
    up into the infinity with that probability too."""
    bits = np.float32(x).view(u32)
    sign = u32((bits >> u32(16)) & u32(0x8000))
    magnitude = u32(bits & _MAGNITUDE)
    if magnitude > _INFINITY:  # NaN
        return np.uint16(sign | u32(0x7E00) | ((magnitude >> u32(13)) & u32(0x1FF)))
    if magnitude >= u32(143 << 23):  # 65536 and beyond, infinity included
        return np.uint16(sign | u32(0x7C00))
    if magnitude < u32(113 << 23):  # below 2**-14: a multiple of 2**-24, the rest by chance
        steps = magnitude.view(np.float32) * _HALF_SUBNORMAL_STEPS  # exact
        whole = u32(steps)  # truncated: the floor of a magnitude (np.floor is CPU-only)
        up = ((steps - np.float32(whole)) * np.float32(65536)
              > np.float32(u32(random) & u32(0xFFFF)))
        return np.uint16(sign | u32(whole + u32(up)))
    return np.uint16(sign | ((magnitude - _REBIAS + (u32(random) & u32(0x1FFF))) >> u32(13)))


# The half step that bfloat16_upper adds to round and bfloat16_rebuild takes back.
_ROUNDED_UP = u32(0x8000)


def bfloat16_upper(x):
    """The bfloat16 bits of the float32 ``x`` rounded to nearest, ties away from zero:
    its upper half, plus one where its lower half (``bfloat16_remainder``) is 0x8000
    or more. That rounding alone lets the two halves rebuild ``x``
    (``bfloat16_rebuild``): a tie rounded to even could have come from either
    neighbour."""
    bits = np.float32(x).view(u32)
    rounded = bits | _QUIET if x != x else u32(bits + _ROUNDED_UP)
    return np.uint16(rounded >> u32(16))


def bfloat16_remainder(x):
    """The lower 16 bits of the float32 ``x``, which ``bfloat16_upper`` drops."""
    return np.uint16(np.float32(x).view(u32) & u32(0xFFFF))


# Where the upper half was rounded up (bit 15 of the remainder set), the rebuilt upper
# half is one less: flipping bit 15 and subtracting it borrows exactly there. A zero's
# carry (nothing rounds up to a zero) borrows into the exponent and reads as a NaN, which
# the one comparison for an infinity or a NaN in ``bits`` catches. Computed from the
# pair's 32 bits, in 32-bit lanes on the CPU (branches on the halves compared in 64-bit
# lanes: remainders took 1.4x as long).
_SIXTEEN = u32(16)
_UPPER = u32(0xFFFF0000)
# The largest float32 magnitude that bfloat16_upper keeps finite: above it, the pair
# of an infinity, whether rounded up to or written.
_BELOW_INFINITY = u32(0x7F7F7FFF)


def bfloat16_rebuild(bits, remainder):
    """The float32 whose ``bfloat16_upper`` is ``bits`` and whose ``bfloat16_remainder``
    is ``remainder``: exactly the value they were taken from, but where ``bits`` is an
    infinity or a NaN, or a zero that no float32 rounds up to (``bits`` written since),
    which reads as ``bits``. So a float32 within half a bfloat16 step of float32's
    largest (above 3.3961e38), which rounds up to an infinity, reads as that infinity, as
    a written one does (which its remainder could not tell apart)."""
    pair = u32(u32(u32(bits) << _SIXTEEN) | u32(remainder))
    x = u32(u32(pair ^ _ROUNDED_UP) - _ROUNDED_UP)
    unpaired = u32(x & _MAGNITUDE) > _BELOW_INFINITY  # an infinity, a NaN, a zero's carry
    return u32(u32(pair & _UPPER) if unpaired else x).view(np.float32)


def random_bits(key, low, high, buffer):
    """32 random bits for the element whose index (an int64) has the low and high 32
    bits ``low`` and ``high``, of buffer number ``buffer``, in the step whose ``key`` is
    ``rounding_key(seed, step)``: a counter-based hash (murmur3's finalizer), so the bits
    do not depend on which thread or block takes the element. The index comes in halves
    so that the CPU drivers can count its low half in 32-bit lanes: hashed from an int64
    index, LLVM kept every step in 64-bit lanes (see ``_template.build``)."""
    x = u32(u32(key) ^ u32(u32(low) * u32(0x9E3779B1))
            ^ u32(u32(high) * u32(0x85EBCA77)) ^ u32(u32(buffer) * u32(0xC2B2AE3D)))
    x = u32(u32(x ^ (x >> u32(16))) * u32(0x85EBCA6B))
    x = u32(u32(x ^ (x >> u32(13))) * u32(0xC2B2AE35))
    return u32(x ^ (x >> u32(16)))


def rounding_key(seed, step, stream=0):
    """The 32-bit key of step ``step`` of a run seeded with ``seed``, for the buffers of
    ``stream`` (ints), on the host: a uint32, which the drivers take as one (an int64 key
    kept random_bits' every step in 64-bit lanes on the CPU, 2.3x its time)."""
    x = (seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9
         + stream * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF  # splitmix64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return np.uint32((x ^ (x >> 31)) & 0xFFFFFFFF)


# -- block-wise 8-bit state ------------------------------------------------------------
#
# A state buffer in 8 bits holds, per block of BLOCK elements, one float32 absmax (the
# largest magnitude in the block) and per element the code of the nearest value of a
# dynamic map to the element over the absmax, as bitsandbytes' block-wise 8-bit
# optimizers keep it (Dettmers et al. 2022, "8-bit Optimizers via Block-wise
# Quantization"). The dynamic map spends its 256 values on seven decades: decade d
# (1e-6 ... 1) holds 2**d values (signed: each with its negative; unsigned, for buffers
# that are never negative: 2**(d + 1)), evenly spaced means between 0.1 and 1 of it;
# and 0 and 1 besides. An unsigned buffer is a second moment, which a step divides by,
# so a positive value that is nearest to 0 takes the smallest positive value instead:
# stored as 0 beside a first moment that the signed map holds (a gradient about 3e-7 to
# 4e-4 of its block's largest), the next step was the first moment over eps. A positive
# value that scales to 0 (below 1.2e-38 of its absmax where the CPU kernels flush
# subnormal numbers, below 1.4e-45 elsewhere) is encoded as the smallest positive
# float32 instead (scaled_positive), for the same reason: its first moment, in a block
# of other decades (after a gradient of 1e19 beside ordinary ones), held it up and
# stepped by it over eps, a million times lr.

BLOCK = 256

# Above this absmax, 1 / absmax is subnormal, which the CPU kernels flush to zero (every
# code of the block was 0): such a block's values are scaled by PRESCALE first, and
# encoded by 1 / (absmax * PRESCALE), a normal number, on every backend and the host.
LARGEST_PLAIN_ABSMAX = np.float32(2.0 ** 126)
PRESCALE = np.float32(2.0 ** -64)
# Below this absmax (a subnormal one, which CUDA and the CPU kernels that keep
# subnormals reach), 1 / absmax overflows to inf: every value was stored as the code of
# +-1 and a zero as that of the NaN 0 * inf. Such a block's values are scaled up alike.
SMALLEST_PLAIN_ABSMAX = np.float32(2.0 ** -126)
SUBNORMAL_PRESCALE = np.float32(2.0 ** 64)


def dynamic_map(signed):
    """The 256 values of the dynamic map, ascending, as float32."""
    values = [0.0, 1.0]
    for decade in range(7):
        count = 2 ** decade if signed else 2 ** (decade + 1)
        means = 0.1 + 0.9 * (2 * np.arange(count) + 1) / (2 * count)
        values += list(10.0 ** (decade - 6) * means)
        if signed:
            values += list(-(10.0 ** (decade - 6)) * means)
    return np.sort(np.array(values, np.float32))


# The encoding finds the nearest value through buckets of float32 magnitudes: the top
# mantissa bits (_MANTISSA_BITS) of each binade from 2**-24 (_LOW_EXPONENT) to 1, a
# bucket per sign. The buckets are narrower than the gaps between the map's values, so a
# bucket holds at most one midpoint between neighbours: its code, and that of the
# neighbour beyond the midpoint where the magnitude exceeds it, is the nearest. One int32
# per bucket holds both, so that the encoding loads one table entry (a gather, where a
# loop over the values vectorises): the code in the low 8 bits, above them the midpoint's place among
# the bucket's 2**_BELOW float32 magnitudes (which compare as their bits do), or
# _NO_MIDPOINT.
_LOW_EXPONENT = 127 - 24
_MANTISSA_BITS = 7
_BUCKETS = i32(25 << _MANTISSA_BITS)  # per sign
_BELOW = i32(23 - _MANTISSA_BITS)  # the bits of a magnitude below its bucket's
_FIRST_BUCKET = i32(_LOW_EXPONENT << _MANTISSA_BITS)  # 2**-24's magnitude bits >> _BELOW
_LOWEST_BITS = i32(_FIRST_BUCKET << _BELOW)  # 2**-24's magnitude bits
_PLACES = i32((1 << _BELOW) - 1)  # the bits of a magnitude's place in its bucket
_NO_MIDPOINT = 1 << int(_BELOW)  # beyond every place in a bucket
# The place of magnitude 0 (dynamic_code), before a tiny one's (-1), and the unsigned
# map's first bucket's midpoint: every magnitude but 0's is beyond it. Every other
# bucket's midpoint is a place (>= 0), which neither passes.
_ZERO_ONLY = -2
_ONE_BITS = u32(0x3F800000)  # 1.0's


def _buckets(values):
    """The int32 table of the buckets (negative ones after the positive): per bucket,
    the code nearest to its lowest magnitude, plus 256 times the place in the bucket of
    the largest float32 magnitude not beyond the midpoint past which the code one further
    from zero is nearer (_NO_MIDPOINT where there is none). In an unsigned map, every
    positive magnitude whose nearest value is 0 takes the next (see above): the first
    bucket's midpoint is _ZERO_ONLY, and the others hold that next code."""
    values = values.astype(np.float64)
    middles = (values[:-1] + values[1:]) / 2  # exact in float64
    bucket = np.arange(_BUCKETS)
    low_bits = (bucket + _FIRST_BUCKET) << _BELOW
    low = low_bits.astype(np.uint32).view(np.float32).astype(np.float64)
    high = ((bucket + _FIRST_BUCKET + 1) << _BELOW).astype(np.uint32).view(np.float32)
    low[0] = 0.0  # the first bucket takes every smaller magnitude too
    table = []
    for sign in (1.0, -1.0):
        # The code nearest to each bucket's lowest magnitude (ties toward zero), and the
        # midpoint in the bucket, if any, beyond which the next code is nearer.
        nearest = np.searchsorted(middles, sign * low, "left" if sign > 0 else "right")
        magnitudes = np.sort(np.abs(middles[np.sign(middles) == sign]))
        first, last = (np.searchsorted(magnitudes, edge, "left") for edge in (low, high))
        if (last - first).max() > 1:
            raise AssertionError("a bucket holds two midpoints: more mantissa bits")
        inside = np.append(magnitudes, np.inf)[first]  # the first at or above low
        threshold = inside.astype(np.float32)
        # the float32 at or below the midpoint: x > it exactly where x > the midpoint
        threshold = np.where(threshold > inside, np.nextafter(threshold, np.float32(0)),
                             threshold)
        place = threshold.view(np.uint32).astype(np.int64) - low_bits
        if (place[last > first] < 0).any():
            raise AssertionError("a midpoint below the first bucket's lowest magnitude")
        place = np.where(last > first, place, _NO_MIDPOINT)
        if sign > 0 and values[0] == 0:  # unsigned: no positive magnitude is stored as 0
            place = np.where(nearest == 0, _NO_MIDPOINT, place)
            nearest = np.where(nearest == 0, 1, nearest)
            nearest[0], place[0] = 0, _ZERO_ONLY
        table.append(nearest + 256 * place)
    return np.concatenate(table).astype(np.int32)


SIGNED_MAP, UNSIGNED_MAP = dynamic_map(True), dynamic_map(False)


def dynamic_bucket(x):
    """The row of a dynamic map's table of buckets (``QUANTIZED``) that encodes the float32
    ``x``: the ``entry`` that :func:`dynamic_code` takes. In int32 throughout (Numba
    widens integer arithmetic to 64 bits, which takes half as many elements per vector
    instruction: 8-bit Adam took 1.1x as long)."""
    bits = np.float32(x).view(u32)
    magnitude = i32(min(bits & _MAGNITUDE, _ONE_BITS))
    bucket = i32(max(i32(i32(magnitude >> _BELOW) - _FIRST_BUCKET), i32(0)))  # below 2**-24: 0
    return i32(bucket + _BUCKETS) if bits >> u32(31) else bucket


def scaled_positive(scaled, value):
    """``scaled``, the float32 ``value`` times its block's scale, which an unsigned
    dynamic map encodes; but the smallest positive float32 where that is 0 and ``value``
    positive, which the map stores as its smallest positive value (see above)."""
    # In int32 bits, as the encoding's (a positive value's are positive, the others'
    # negative or 0): compared as floats, 8-bit Adam took 1.05x as long.
    bits = max(np.float32(scaled).view(i32), min(np.float32(value).view(i32), i32(1)))
    return i32(bits).view(np.float32)


def dynamic_code(x, entry):
    """The code of the map value nearest to the float32 ``x`` (at most 1 in magnitude;
    larger magnitudes, and NaN, get the code nearest to 1 of their sign, which the NaN
    absmax of their block makes a NaN anyway), ties toward zero, but never an unsigned
    map's 0 for a positive ``x`` (see ``QUANTIZED``), from ``entry``, the
    row :func:`dynamic_bucket` of the map's table (``buckets[dynamic_bucket(x)]``). The
    look-up is the caller's, so that the CPU drivers can do it in a loop of its own (see
    ``kernels.cpu.encode_block_in_steps``)."""
    bits = np.float32(x).view(u32)
    magnitude = i32(min(bits & _MAGNITUDE, _ONE_BITS))
    # Its place in its bucket; below 2**-24 (in the first bucket), before every place,
    # and 0 before that (see _ZERO_ONLY).
    place = (i32(magnitude & _PLACES) if magnitude >= _LOWEST_BITS
             else i32(-1) if magnitude > i32(0) else i32(_ZERO_ONLY))
    code = i32(entry & i32(255))
    if place > i32(entry >> i32(8)):
        code = i32(code + (i32(-1) if bits >> u32(31) else i32(1)))
    return np.uint8(code)


# The 8-bit formats, by name: the map (decoding is ``map[code] * absmax``) and the
# table of its encoding, which the drivers read as ``<name>_map`` and ``<name>_buckets``
# (constants on the CPU, device arrays passed to the CUDA kernels). The codes a buffer
# keeps are uint8 either way.
QUANTIZED = {"signed8": (SIGNED_MAP, _buckets(SIGNED_MAP)),
             "unsigned8": (UNSIGNED_MAP, _buckets(UNSIGNED_MAP))}
# The maps whose encoding takes values through scaled_positive: a signed map stores a
# positive value that scales to 0 as 0 anyway.
UNSIGNED = ("unsigned8",)
CODES = np.dtype(np.uint8)


def tables():
    """The constants of the 8-bit formats, by the names the drivers give them."""
    return {f"{name}_{kind}": table for name, arrays in QUANTIZED.items()
            for kind, table in zip(("map", "buckets"), arrays)}


# format name -> (load, store), and the NumPy dtype of its bits.
CODECS = {"bfloat16": (bfloat16_load, bfloat16_store),
          "float16": (float16_load, float16_store)}
BITS = np.dtype(np.uint16)


def compiled(compile):
    """The codecs as the drivers call them (``bfloat16_load`` ...), each compiled with
    ``compile``. ``<format>_rounded`` is the store again, under the name by which the
    drivers check that a 16-bit parameter still holds its master weight rounded: a CPU
    driver may store by another instruction (``kernels.x86.bfloat16_store``)."""
    named = {}
    for name, (load, store) in CODECS.items():
        named[f"{name}_load"] = compile(load)
        named[f"{name}_store"] = named[f"{name}_rounded"] = compile(store)
    return {**named,
            **{function.__name__: compile(function) for function in (
                bfloat16_store_stochastic, float16_store_stochastic, bfloat16_upper,
                bfloat16_remainder, bfloat16_rebuild, dynamic_bucket, dynamic_code,
                scaled_positive)},
            "random_bits": compile(random_bits)}
