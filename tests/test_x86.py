"""The AVX-512 decoding of a block of 8-bit state (``kernels.x86``) against NumPy's
``map[codes] * scale`` and against the table lookups that other CPUs run, bit for
bit."""

import numpy as np
import pytest
from numba import njit

from fastopt.kernels import codecs, cpu, x86

needs_avx512 = pytest.mark.skipif(not x86.AVAILABLE, reason="this CPU has no AVX-512")

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
    assert x86._available() is available


class _Features(dict):
    """llvmlite's feature map, as far as Numba reads it."""

    def flatten(self):
        return ",".join(("+" if on else "-") + name for name, on in self.items())
