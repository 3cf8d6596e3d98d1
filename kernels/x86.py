"""x86 instructions that the portable code does not compile to: float16 conversions
(F16C), bfloat16 rounding (AVX-512 BF16), a whole block of 8-bit state decoded with
AVX-512 permutes, and AVX-512's 512-bit vectors where LLVM would not choose them.

F16C converts eight float16 to float32 and back in one instruction each, where the
portable codecs (``codecs.float16_load``, ``float16_store``) take a dozen integer
operations; LLVM emits them for its ``half`` type, which Numba does not have, hence
intrinsics. They give the portable codecs' bits, NaNs included (checked over every
input in tests/test_x86.py), and the CPU drivers take them where F16C compiles.

AVX-512 BF16 rounds sixteen float32 to bfloat16 in one instruction
(``vcvtneps2bf16``), where the portable ``codecs.bfloat16_store`` takes some eight
integer operations per vector, which left the formats with bfloat16 state compute-bound
(see docs/design-notes.md). It gives the portable codec's bits, NaNs included, for every
float32 but the subnormal ones, which it flushes to a zero of their sign whatever the
denormal mode (checked over every input in tests/test_x86.py): so only the drivers of
passes that flush subnormals take it (``_template.Pass.flushes``).

The 8-bit decoding: the portable loop's table lookup (``map[code]``) compiles to a
gather, which on AMD's Zen cores costs more than the rest of the decoding.

AVX-512's two-table permute (``vpermi2ps``) finds 16 lanes' values in a 32-entry table
held in two registers. So the map's 256 values are 16 registers, and a decode is eight
permutes and a tree of selects on the codes' top three bits: the portable loop's
result, bit for bit. What it saves, and why the encoding keeps its gathers: see
docs/design-notes.md.

Numba has no vector types, so this is an intrinsic that emits the LLVM IR of the whole
block. It compiles only where LLVM may use AVX-512 (``AVAILABLE``); elsewhere the CPU
drivers keep the portable loop.
"""

from llvmlite import ir
from numba import types
from numba.core import cgutils, codegen, config
from numba.core.extending import intrinsic

from . import codecs

LANES = 16
_I32, _I64 = ir.IntType(32), ir.IntType(64)
_FLOATS, _INTS = ir.VectorType(ir.FloatType(), LANES), ir.VectorType(_I32, LANES)


def _available(feature):
    """Whether the code Numba compiles may use ``feature``: the features it compiles for
    (NUMBA_CPU_FEATURES, or the host's less AVX where NUMBA_ENABLE_AVX is off) have it,
    for the host's CPU (a CPU named by NUMBA_CPU_NAME has features we would guess)."""
    if config.CPU_NAME and config.CPU_NAME != "host" and not config.CPU_FEATURES:
        return False
    features = config.CPU_FEATURES or codegen.get_host_cpu_features()
    return f"+{feature}" in features.split(",")


def _f16c_available():
    """Whether float16_load and float16_store compile to F16C. Its instructions are AVX
    ones: where Numba drops AVX (NUMBA_ENABLE_AVX=0), LLVM would call a conversion it
    cannot link."""
    return _available("f16c") and _available("avx")


def _bf16_available():
    """Whether bfloat16_store compiles to AVX-512 BF16's conversion. LLVM emits it only
    with AVX-512VL too (which every CPU with AVX-512 BF16 has); without, it calls
    __truncsfbf2, which nothing links here (the process crashed on the first call)."""
    return _available("avx512bf16") and _available("avx512vl")


AVAILABLE = _available("avx512f")  # decode_block compiles
F16C = _f16c_available()
BF16 = _bf16_available()


@intrinsic
def prefer_512_bit_vectors(typingctx):
    """Let LLVM vectorise the function that calls this 512 bits wide, where AVX-512
    compiles. For Intel's AVX-512 cores LLVM prefers 256-bit vectors (the older ones
    lower their clock for 512-bit work), which left the passes that convert formats
    compute-bound: see docs/design-notes.md."""
    def codegen(context, builder, signature, arguments):
        # LLVM reads the width from this function attribute. llvmlite's attribute set
        # accepts only keyword attributes, by a check in its add(), and writes each item
        # as it is, where LLVM's IR takes "key"="value" pairs too.
        set.add(builder.function.attributes, '"prefer-vector-width"="512"')
        return context.get_dummy_value()
    return types.void(), codegen


@intrinsic
def float16_load(typingctx, bits):
    """The float32 of the float16 ``bits`` (an integer, of which the low 16 bits)."""
    if not isinstance(bits, types.Integer):
        return None

    def codegen(context, builder, signature, arguments):
        half = context.cast(builder, arguments[0], signature.args[0], types.uint16)
        return builder.fpext(builder.bitcast(half, ir.HalfType()), ir.FloatType())
    return types.float32(bits), codegen


@intrinsic
def float16_store(typingctx, x):
    """The float16 bits (a uint16) nearest to the float ``x`` as a float32 (ties to
    even)."""
    if not isinstance(x, types.Float):
        return None

    def codegen(context, builder, signature, arguments):
        single = context.cast(builder, arguments[0], signature.args[0], types.float32)
        return builder.bitcast(builder.fptrunc(single, ir.HalfType()), ir.IntType(16))
    return types.uint16(x), codegen


class _BFloat(ir.Type):
    """LLVM's ``bfloat``, which llvmlite does not name."""

    def _to_string(self):
        return "bfloat"

    def __eq__(self, other):
        return isinstance(other, _BFloat)

    def __hash__(self):
        return hash(_BFloat)


@intrinsic
def bfloat16_store(typingctx, x):
    """The bfloat16 bits (a uint16) nearest to the float ``x`` as a float32 (ties to
    even), but a zero of its sign where that float32 is subnormal."""
    if not isinstance(x, types.Float):
        return None

    def codegen(context, builder, signature, arguments):
        single = context.cast(builder, arguments[0], signature.args[0], types.float32)
        return builder.bitcast(builder.fptrunc(single, _BFloat()), ir.IntType(16))
    return types.uint16(x), codegen


def _function(builder, name, returns, arguments):
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(returns, arguments),
                                          name)


def _vector_at(builder, pointer, element):
    """The pointer to the vector at ``pointer[element:]``, of ``pointer``'s element type."""
    vector = ir.VectorType(pointer.type.pointee, LANES)
    return builder.bitcast(builder.gep(pointer, [element]), vector.as_pointer())


def _ints(value):
    return ir.Constant(_INTS, [int(value)] * LANES)


def _broadcast(builder, value):
    undefined = ir.Constant(_FLOATS, ir.Undefined)
    first = builder.insert_element(undefined, value, ir.Constant(_I32, 0))
    return builder.shuffle_vector(first, undefined, _ints(0))


def _contiguous(array, dtype):
    return (isinstance(array, types.Array) and array.ndim == 1 and array.layout == "C"
            and array.dtype == dtype)


@intrinsic
def decode_block(typingctx, codes, table, scale, out):
    """``out[i] = table[codes[i]] * scale`` for the BLOCK uint8 ``codes``, with ``table``
    the 256 float32 values of a map and ``out`` float32 (contiguous arrays)."""
    if not (_contiguous(codes, types.uint8) and _contiguous(table, types.float32)
            and _contiguous(out, types.float32) and scale == types.float32):
        return None  # no match: a typing error at compile time

    def codegen(context, builder, signature, arguments):
        codes, table, scale, out = (
            context.make_array(t)(context, builder, a).data if isinstance(t, types.Array)
            else a for t, a in zip(signature.args, arguments))
        permute = _function(builder, "llvm.x86.avx512.vpermi2var.ps.512", _FLOATS,
                            [_FLOATS, _INTS, _FLOATS])
        registers = [builder.load(_vector_at(builder, table, ir.Constant(_I64, k * LANES)),
                                  align=4) for k in range(256 // LANES)]
        scale = _broadcast(builder, scale)
        with cgutils.for_range(builder, ir.Constant(_I64, codecs.BLOCK // LANES)) as loop:
            first = builder.mul(loop.index, ir.Constant(_I64, LANES))
            code = builder.zext(builder.load(_vector_at(builder, codes, first), align=1),
                                _INTS)
            # Index bits 0-4 pick in each pair of registers; bits 5, 6, 7 among the pairs.
            found = [builder.call(permute, [low, code, high])
                     for low, high in zip(registers[::2], registers[1::2])]
            for bit in (5, 6, 7):
                upper = builder.icmp_unsigned("!=", builder.and_(code, _ints(1 << bit)),
                                              _ints(0))
                found = [builder.select(upper, high, low)
                         for low, high in zip(found[::2], found[1::2])]
            builder.store(builder.fmul(found[0], scale), _vector_at(builder, out, first),
                          align=4)
        return context.get_dummy_value()
    return types.void(codes, table, scale, out), codegen
