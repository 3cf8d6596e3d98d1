"""Properties of the compiled kernels themselves."""

import ast
import inspect
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from fastopt.kernels import cpu, rules

VECTOR_PROBE = r"""
import numpy as np
from fastopt.kernels import cpu
f = np.float32
kernel = cpu.kernel("adam", ("exp_avg", "exp_avg_sq"))
a = [np.ones(64, f) for _ in range(4)]
kernel(*a, (f(1e-3), f(1), f(1e-8), f(1), f(0), f(1), f(.1), f(.999), f(.001), False), False)
print("\n".join(kernel.inspect_asm().values()))
"""


def test_the_adam_loop_is_vectorised(tmp_path):
    # Numba shows no assembly for code loaded from its cache, hence a fresh cache.
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path))
    asm = subprocess.run([sys.executable, "-c", VECTOR_PROBE], env=env, check=True,
                         capture_output=True, text=True).stdout
    # Packed single-precision square roots and divisions: SIMD, and no float64.
    assert re.search(r"\bv?sqrtps\b", asm), "Adam's sqrt is not vectorised"
    assert re.search(r"\bv?divps\b", asm), "Adam's division is not vectorised"
    assert not re.search(r"\bv?sqrtsd\b|\bv?sqrtpd\b", asm), "float64 crept into Adam"


def test_a_kernel_asked_for_an_unknown_state_refuses():
    with pytest.raises(ValueError, match="no state"):
        cpu.kernel("adam", ("exp_avg", "velocity"))


def test_absent_state_reads_as_zero_and_is_not_written():
    f = np.float32
    p, g = np.ones(3, f), np.full(3, 2.0, f)
    buf = np.full(3, 5.0, f)
    h = (f(0.5), f(1), f(0), f(0.9), f(1), False)  # lr, g_scale, wd, momentum, keep, nesterov
    cpu.kernel("sgd", ())(p, g, h, False)
    np.testing.assert_array_equal(p, 0.0)  # 1 - 0.5 * 2, the buffer taken as 0 then dropped
    cpu.kernel("sgd", ("momentum_buffer",))(p, g, buf, h, False)
    np.testing.assert_allclose(buf, 0.9 * 5.0 + 2.0)


@pytest.mark.parametrize("parallel", [False, True])
def test_serial_and_parallel_loops_agree_bitwise(parallel):
    n = 3 * cpu.PARALLEL_MIN_SIZE + 11
    rng = np.random.default_rng(0)
    f = np.float32
    h = (f(1e-2), f(1), f(1e-8), f(1), f(0), f(1), f(.1), f(.999), f(.001), True)
    arrays = [rng.standard_normal(n).astype(f), rng.standard_normal(n).astype(f),
              np.zeros(n, f), np.zeros(n, f), np.zeros(n, f)]
    serial = [a.copy() for a in arrays]
    kernel = cpu.kernel("adam", ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"))
    kernel(*serial, h, False)
    kernel(*arrays, h, parallel)
    for a, b in zip(arrays, serial):
        np.testing.assert_array_equal(a, b)


def test_rules_use_no_float_literals():
    # A float literal is float64 and would promote a float32 expression.
    tree = ast.parse(inspect.getsource(rules))
    functions = [node for node in tree.body if isinstance(node, ast.FunctionDef)]
    assert len(functions) >= 7
    for function in functions:
        literals = [node.value for node in ast.walk(function)
                    if isinstance(node, ast.Constant) and isinstance(node.value, float)]
        assert not literals, f"{function.name} has float literals {literals}"
