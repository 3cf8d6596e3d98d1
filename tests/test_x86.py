"""The AVX-512 decoding of a block of 8-bit state (``kernels.x86``) against NumPy's
``map[codes] * scale`` and against the table lookups that other CPUs run, bit for
bit."""

import numpy as np
import pytest
from numba import njit

from fastopt.kernels import codecs, cpu, x86

pytestmark = pytest.mark.skipif(not x86.AVAILABLE, reason="this CPU has no AVX-512")

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


_by_permutes = _blockwise(x86.decode_block)
_by_lookups = _blockwise(cpu.decode_block_by_lookups)


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


def test_each_code_finds_its_own_entry_of_any_table():
    table = np.arange(256, dtype=f32) * f32(1.5) - f32(100)  # no map: every entry distinct
    codes = np.random.default_rng(4).permutation(np.tile(np.arange(256, dtype=np.uint8), 2))
    np.testing.assert_array_equal(_by_permutes(codes, table, f32(1)), table[codes])
