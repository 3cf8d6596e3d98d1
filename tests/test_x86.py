"""``kernels.x86`` bit for bit against the portable code that other CPUs run: the
AVX-512 decoding of a block of 8-bit state (and NumPy's ``map[codes] * scale``), and
the F16C float16 conversions (and NumPy's casts)."""

import re

import numpy as np
import pytest
from numba import njit, prange

from fastopt.kernels import _fp_mode, codecs, cpu, x86

needs_avx512 = pytest.mark.skipif(not x86.AVAILABLE, reason="this CPU has no AVX-512")
needs_f16c = pytest.mark.skipif(not x86.F16C, reason="this CPU has no F16C")

f32 = np.float32
BLOCK = codecs.BLOCK


def _blockwise(decode):
    @njit(error_model="numpy")
    def decode_blocks(codes, table, scale):
        out = np.empty(codes.size, np.float32)
        for b in range(codes.size // BLOCK):
            decode(codes[b * BLOCK:(b + 1) * BLOCK], table, scale,
                   out[b * BLOCK:(b + 1) * BLOCK])
        return out
    return decode_blocks


_by_lookups = _blockwise(cpu.decode_block_by_lookups)
_by_permutes = _blockwise(x86.decode_block) if x86.AVAILABLE else None


@needs_avx512
@pytest.mark.parametrize("name", sorted(codecs.QUANTIZED))
@pytest.mark.parametrize("scale", [f32(0.37), f32(3e-39), f32(0), f32(-0.0), f32(np.inf),
                                   f32(np.nan)])
def test_a_block_decodes_to_the_maps_values_times_the_scale_bitwise(name, scale):
    values = codecs.QUANTIZED[name][0]
    codes = np.random.default_rng(3).integers(0, 256, 4 * BLOCK).astype(np.uint8)
    codes[:256] = np.arange(256)  # every code, in the first block
    codes[256:512] = np.arange(256)[::-1]
    with np.errstate(invalid="ignore", over="ignore"):
        expected = values[codes] * scale
    got = _by_permutes(codes, values, scale)
    np.testing.assert_array_equal(got.view(np.uint32), expected.view(np.uint32))
    np.testing.assert_array_equal(got.view(np.uint32),
                                  _by_lookups(codes, values, scale).view(np.uint32))


@needs_avx512
def test_each_code_finds_its_own_entry_of_any_table():
    table = np.arange(256, dtype=f32) * f32(1.5) - f32(100)  # no map: every entry distinct
    codes = np.random.default_rng(4).permutation(np.tile(np.arange(256, dtype=np.uint8), 2))
    np.testing.assert_array_equal(_by_permutes(codes, table, f32(1)), table[codes])


@pytest.mark.parametrize("cpu_name, cpu_features, enable_avx, host, available", [
    (None, None, True, "+avx2,+avx512f,+fma", True),
    (None, None, False, "+avx2,+avx512f,+fma", False),  # NUMBA_ENABLE_AVX=0: none of it
    (None, None, True, "+avx2,-avx512f,+fma", False),  # an AVX2 host
    (None, "+avx2,+avx512f", True, "+avx2,-avx512f", True),  # NUMBA_CPU_FEATURES decides
    (None, "+avx2,-avx512f", True, "+avx2,+avx512f", False),
    ("generic", None, True, "+avx2,+avx512f", False),  # a named CPU: not guessed
])
def test_the_permutes_compile_only_where_numba_compiles_for_avx512(
        monkeypatch, cpu_name, cpu_features, enable_avx, host, available):
    """Numba drops the host's AVX features where NUMBA_ENABLE_AVX is off; the intrinsic
    would then abort the process in LLVM ("Do not know how to split ...")."""
    from numba.core import config

    monkeypatch.setattr(config, "CPU_NAME", cpu_name)
    monkeypatch.setattr(config, "CPU_FEATURES", cpu_features)
    monkeypatch.setattr(config, "ENABLE_AVX", enable_avx)
    features = _Features((item[1:], item[0] == "+") for item in host.split(","))
    monkeypatch.setattr("llvmlite.binding.get_host_cpu_features", lambda: features)
    assert x86._available("avx512f") is available


def _chunk_assembly(**options):
    """The assembly of the chunk function (where the loops run) of the pass of Adam's
    step with ``options`` over 8192 float32 parameters, compiled again (Numba's cache
    keeps no assembly) for the signature the step took."""
    import fastopt

    _forget_kernels()  # so that the step asks _driver for its kernel
    made = []
    original = cpu._driver
    cpu._driver = lambda *a: made.append(original(*a)) or made[-1]
    try:
        opt = fastopt.Adam({"w": np.ones(8192, np.float32)}, lr=1e-3, **options)
        opt.step()
    finally:
        cpu._driver = original
    (kernel,) = made
    chunk = kernel.py_func.__globals__[kernel.py_func.__name__ + "_chunk"]
    if not chunk.signatures:  # the kernel came from Numba's cache: compile its calls
        njit(parallel=True, error_model="numpy")(kernel.py_func).compile(kernel.signatures[0])
    again = njit(error_model="numpy")(chunk.py_func)
    again.compile(chunk.signatures[0])
    return again.inspect_asm(chunk.signatures[0])


def _forget_kernels():
    cpu._driver.cache_clear()
    cpu.kernel.cache_clear()
    cpu.segment_kernel.cache_clear()


@needs_avx512
def test_the_passes_loops_run_in_512_bit_registers(monkeypatch):
    """LLVM prefers 256-bit vectors for Intel's AVX-512 CPUs, which left 8-bit Adam 1.25x
    slower there in the caches (see docs/design-notes.md); the chunk functions ask for
    512. The control: with ``WIDE_VECTORS`` off (the README's way to keep LLVM's
    choice), what LLVM takes unasked."""
    assert cpu.WIDE_VECTORS
    wide = _chunk_assembly(state_dtype="int8")
    # Adam's arithmetic in zmm, not only x86.decode_block's permutes.
    assert _writes(wide, "vsqrtps", "%zmm") and _writes(wide, "vdivps", "%zmm")
    monkeypatch.setattr(cpu, "WIDE_VECTORS", False)
    _forget_kernels()
    try:
        narrow = _chunk_assembly(state_dtype="int8")
    finally:
        monkeypatch.undo()
        _forget_kernels()
    expected = "%zmm" if _llvm_prefers_512_bits() else "%ymm"
    assert _writes(narrow, "vsqrtps", expected)


def _llvm_prefers_512_bits():
    """Whether LLVM vectorises 512 bits wide for this CPU unasked (AMD's Zen 4 and 5)."""
    @njit
    def roots(x):
        for i in range(x.size):
            x[i] = np.sqrt(x[i])
    roots.compile("void(float32[::1])")
    return _writes(roots.inspect_asm(roots.signatures[0]), "vsqrtps", "%zmm")


def _writes(assembly, instruction, registers):
    """Whether ``assembly`` holds ``instruction`` into ``registers`` (``"%zmm"``), from
    registers or from memory (``vsqrtps (%rax), %zmm0``: LLVM folds the load for Zen 5)."""
    return re.search(rf"\t{instruction}\t[^\n]*{registers}\d", assembly) is not None


@pytest.mark.parametrize("gate, enable_avx, host, available", [
    ("_f16c_available", True, "+avx,+avx2,+f16c", True),
    # NUMBA_ENABLE_AVX=0: F16C's are AVX instructions
    ("_f16c_available", False, "+avx,+avx2,+f16c", False),
    ("_f16c_available", True, "+avx,+avx2,-f16c", False),
    ("_bf16_available", True, "+avx512f,+avx512vl,+avx512bf16", True),
    ("_bf16_available", False, "+avx512f,+avx512vl,+avx512bf16", False),
    ("_bf16_available", True, "+avx512f,+avx512vl,-avx512bf16", False),
    # without AVX-512VL, LLVM would call __truncsfbf2
    ("_bf16_available", True, "+avx512f,-avx512vl,+avx512bf16", False),
])
def test_the_conversions_compile_only_where_their_instructions_do(monkeypatch, gate,
                                                                  enable_avx, host, available):
    from numba.core import config

    monkeypatch.setattr(config, "CPU_NAME", None)
    monkeypatch.setattr(config, "CPU_FEATURES", None)
    monkeypatch.setattr(config, "ENABLE_AVX", enable_avx)
    features = _Features((item[1:], item[0] == "+") for item in host.split(","))
    monkeypatch.setattr("llvmlite.binding.get_host_cpu_features", lambda: features)
    assert getattr(x86, gate)() is available


class _Features(dict):
    """llvmlite's feature map, as far as Numba reads it."""

    def flatten(self):
        return ",".join(("+" if on else "-") + name for name, on in self.items())


_portable_load, _portable_store = (njit(inline="always")(f) for f in (
    codecs.float16_load, codecs.float16_store))
_F16C_LOAD, _F16C_STORE = x86.float16_load, x86.float16_store


@njit(parallel=True)
def _stores_that_differ(flush_denormals):
    """How many of the 2**32 float32 bit patterns F16C stores other than the portable
    codec, NaNs and subnormals included, with the kernels' denormal mode."""
    differ = 0
    for high in prange(1 << 16):
        saved = _fp_mode.denormals_off(flush_denormals)
        for low in range(1 << 16):
            x = np.uint32((high << 16) | low).view(np.float32)
            differ += _F16C_STORE(x) != _portable_store(x)
        _fp_mode.restore(saved)
    return differ


@njit
def _loads(flush_denormals):
    saved = _fp_mode.denormals_off(flush_denormals)
    f16c, portable = np.empty(1 << 16, np.float32), np.empty(1 << 16, np.float32)
    for bits in range(1 << 16):
        f16c[bits] = _F16C_LOAD(np.uint16(bits))
        portable[bits] = _portable_load(np.uint16(bits))
    _fp_mode.restore(saved)
    return f16c, portable


@needs_f16c
@pytest.mark.parametrize("flush_denormals", [True, False])
def test_f16c_conversions_give_the_portable_codecs_bits_for_every_input(flush_denormals):
    f16c, portable = _loads(flush_denormals)
    np.testing.assert_array_equal(f16c.view(np.uint32), portable.view(np.uint32))
    assert _stores_that_differ(flush_denormals) == 0


def test_the_portable_float16_codecs_round_as_numpy_and_keep_nans_quiet():
    """What the F16C test compares against is right: NumPy's casts everywhere but NaNs,
    which keep their sign and the top of their payload, made quiet (as F16C does)."""
    every = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    loaded = np.array([_portable_load(b) for b in every], np.float32)
    halves = every.view(np.float16)
    nan = np.isnan(halves)
    np.testing.assert_array_equal(loaded[~nan].view(np.uint32),
                                  halves[~nan].astype(np.float32).view(np.uint32))
    assert np.isnan(loaded[nan]).all()
    quiet = np.uint32(0x400000)
    np.testing.assert_array_equal(loaded[nan].view(np.uint32),
                                  (every[nan].astype(np.uint32) & 0x8000) << 16
                                  | 0x7F800000 | quiet
                                  | (every[nan].astype(np.uint32) & 0x3FF) << 13)
    rng = np.random.default_rng(5)
    x = rng.integers(0, 1 << 32, 1 << 16, dtype=np.uint64).astype(np.uint32).view(np.float32)
    x[:6] = [65504, 65519.996, 65520, 2 ** -25, 3 * 2 ** -26, np.inf]
    stored = np.array([_portable_store(v) for v in x], np.uint16)
    finite = ~np.isnan(x)
    with np.errstate(over="ignore"):
        np.testing.assert_array_equal(stored[finite], x[finite].astype(np.float16).view(np.uint16))
    bits = x[~finite].view(np.uint32)
    np.testing.assert_array_equal(stored[~finite], (bits >> 16 & 0x8000) | 0x7E00
                                  | (bits >> 13 & 0x1FF))


needs_bf16 = pytest.mark.skipif(not x86.BF16, reason="this CPU has no AVX-512 BF16")
_portable_bfloat16_store = njit(inline="always")(codecs.bfloat16_store)
_BF16_STORE = x86.bfloat16_store


@njit(parallel=True)
def _bfloat16_stores_that_differ(flush_denormals):
    """How many of the 2**32 float32 bit patterns AVX-512 BF16 stores other than the
    portable codec: subnormal ones, and the others, with the kernels' denormal mode; and
    how many subnormal ones it stores as anything but the zero of their sign."""
    subnormal = other = not_zero = 0
    for high in prange(1 << 16):
        saved = _fp_mode.denormals_off(flush_denormals)
        for low in range(1 << 16):
            bits = np.uint32((high << 16) | low)
            x = bits.view(np.float32)
            stored = _BF16_STORE(x)
            if bits & np.uint32(0x7F800000) == 0 and bits & np.uint32(0x7FFFFF) != 0:
                subnormal += stored != _portable_bfloat16_store(x)
                not_zero += stored != np.uint16(bits >> np.uint32(16) & np.uint32(0x8000))
            else:
                other += stored != _portable_bfloat16_store(x)
        _fp_mode.restore(saved)
    return subnormal, other, not_zero


@needs_bf16
@pytest.mark.parametrize("flush_denormals", [True, False])
def test_bf16_rounding_gives_the_portable_bits_but_flushes_subnormals(flush_denormals):
    """NaNs (quiet, sign and payload kept), infinities, ties to even and the carries into
    infinity as the portable codec; subnormal inputs become zeros whatever the mode.
    (The portable codec rounds most of them to a subnormal: the control.)"""
    subnormal, other, not_zero = _bfloat16_stores_that_differ(flush_denormals)
    assert other == 0 and not_zero == 0
    assert subnormal == 2 * (0x7FFFFF - 0x8000)  # all but those the portable rounds to 0


def _adam_bfloat16_state(eps):
    import fastopt

    g = np.full(4096, 1e-18, f32)  # exp_avg_sq = (1 - beta2) g**2 = 1e-39, subnormal
    opt = fastopt.Adam([np.ones(4096, f32)], lr=1e-3, eps=eps, state_dtype="bfloat16")
    opt.flat_grads[:] = g
    opt.step()
    return opt.state["exp_avg_sq"].view(np.uint16)


def test_only_passes_that_flush_subnormals_round_bfloat16_by_an_instruction_that_does():
    """A pass that keeps subnormals (eps below 1e-10: see fastopt.optim.engine) stores
    them as the portable codec does, on every CPU; one that flushes them has none to store."""
    import ml_dtypes

    expected = np.float32(0.001 * 1e-36).astype(ml_dtypes.bfloat16).view(np.uint16)
    assert expected != 0
    np.testing.assert_array_equal(_adam_bfloat16_state(1e-12), expected)
    np.testing.assert_array_equal(_adam_bfloat16_state(1e-8), 0)


@needs_bf16
def test_the_flushing_passes_round_bfloat16_by_avx512_bf16():
    """Those that keep subnormals do not: the control."""
    try:
        assert "vcvtneps2bf16" in _chunk_assembly(state_dtype="bfloat16")
        assert "vcvtneps2bf16" not in _chunk_assembly(state_dtype="bfloat16", eps=1e-12)
    finally:
        _forget_kernels()
