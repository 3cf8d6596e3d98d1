"""Properties of the compiled kernels themselves."""

import ast
import inspect
import json
import os
import re
import subprocess
import sys

import numba
import numpy as np
import pytest

import fastopt
from fastopt.kernels import Pass, cpu, rules

# One optimizer per rule, with the options that bring in every state buffer.
EVERY_RULE = {"SGD": dict(momentum=0.9, nesterov=True), "Adagrad": {},
              "RMSprop": dict(momentum=0.9, centered=True), "Adadelta": {},
              "Adam": dict(amsgrad=True), "Adamax": {}, "NAdam": {}, "RAdam": {}, "Rprop": {},
              "ASGD": {}, "Lion": {}, "Adan": {}}
# Rules that the kernels outside the template (the reductions, EMA) call, and the
# helpers that rules call.
OTHER_RULES = {"prepare", "ema", "swats_adam", "lamb", "lars", "adafactor", "norms",
               "grad_squares", "lerp"}


def rule_functions():
    """The functions of kernels.rules but the three that run on the host: the decorator
    that declares their results, the maker of the scalars' types, and the one that
    gives a rule a backend's compiled helpers."""
    tree = ast.parse(inspect.getsource(rules))
    return [node for node in tree.body if isinstance(node, ast.FunctionDef)
            and node.name not in ("returns", "scalars", "calling")]
NO_DIVISION = {"SGD", "Rprop", "ASGD", "Lion"}

# The other parallel kernels: Adafactor's column sums (of float32 and of bfloat16
# gradients), 8-bit state's blocks, the bandwidth yardstick, and a flat loop of the
# NumPy API's; and a way to find them.
OTHER_KERNELS = r"""
import gc, ml_dtypes
from fastopt.kernels import stream
fastopt.Adam([np.ones(64, np.float32)]).step()
for dtype in (np.float32, ml_dtypes.bfloat16):
    fastopt.Adafactor({"w": np.ones((40, 20), dtype)}).step()
fastopt.Adam([np.ones(8192, np.float32)], state_dtype="int8").step()
stream.add_scaled(np.ones(4, np.float32), np.ones(4, np.float32), np.float32(1))

def parallel_kernels():
    return [kernel for kernel in gc.get_objects()
            if isinstance(kernel, numba.core.dispatcher.Dispatcher)
            and kernel.targetoptions.get("parallel") and "kernels" in kernel.py_func.__module__]
"""

ASM_PROBE = r"""
import json, sys
import numba
import numpy as np
import fastopt
from fastopt.kernels import cpu
from fastopt._backend import HostBackend
from fastopt.kernels import Pass
asm = {}
for name, kwargs in json.loads(sys.argv[1]).items():
    opt = getattr(fastopt, name)([np.ones(64, np.float32)], **kwargs)
    opt.step()
    group, host = opt.param_groups[0], dict(opt.spec.host)
    spec = tuple(opt.buffers(group, host))
    asm[name] = "\n".join(cpu.kernel(opt.rule, spec).inspect_asm().values())
    # The in-place form, over the same memory by its address.
    p, g = opt.flat_params, opt.flat_grads
    prep = (np.float32(1), np.float32(1), np.float32(np.inf), np.float32(0))
    backend = HostBackend()
    segments = backend.segments([p.size], [0])
    backend.run_segments(Pass(opt.rule, spec), backend.flat_tensors(p, g, [0]),
                         [opt.state[s] for s in spec], prep,
                         opt.scalars(group, 2, [], host), segments)
    kernel = cpu.segment_kernel(opt.rule, spec)
    asm[name + " in place"] = "\n".join(kernel.inspect_asm().values())
""" + OTHER_KERNELS + r"""
parfors = {kernel.py_func.__name__: [
    len(overload.metadata["parfor_diagnostics"].get_parfors())
    for overload in kernel.overloads.values()] for kernel in parallel_kernels()}
print(json.dumps({"asm": asm, "parfors": parfors}))
"""


# The kernels of OTHER_KERNELS again, in a process after ASM_PROBE's: [misses, hits]
# of Numba's cache by kernel.
CACHE_PROBE = r"""
import json
import numba
import numpy as np
import fastopt
""" + OTHER_KERNELS + r"""
print(json.dumps({kernel.py_func.__name__: [sum(kernel.stats.cache_misses.values()),
                                             sum(kernel.stats.cache_hits.values())]
                  for kernel in parallel_kernels()}))
"""


@pytest.fixture(scope="module")
def numba_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("numba-cache")


def probe(code, cache, *args):
    """The JSON that ``code`` prints, run in a fresh interpreter on the Numba cache
    ``cache``, outside the source checkout (cwd="/": the installed package, as users
    import it)."""
    run = subprocess.run([sys.executable, "-c", code, *args], cwd="/", capture_output=True,
                         text=True, env=dict(os.environ, NUMBA_CACHE_DIR=str(cache)))
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


@pytest.fixture(scope="module")
def compiled(numba_cache):
    """What ASM_PROBE finds in the kernels it compiles afresh: Numba shows no assembly
    or parallel loops for code loaded from its cache, hence a fresh cache."""
    return probe(ASM_PROBE, numba_cache, json.dumps(EVERY_RULE))


def test_a_second_process_loads_the_parallel_kernels_from_numbas_cache(compiled, numba_cache):
    # A kernel that Numba cannot cache (one that calls numba.get_num_threads(), a ctypes
    # pointer) compiles again in every process, for seconds, with only a warning.
    loads = probe(CACHE_PROBE, numba_cache)  # [misses, hits] by kernel
    assert len(loads) >= 4
    assert {name: counts for name, counts in loads.items() if counts[0] or not counts[1]} == {}


@pytest.fixture(scope="module")
def assembly(compiled):
    return compiled["asm"]


def test_parallel_kernels_wake_the_threads_only_in_their_prange_loop(compiled):
    # Under parallel=True Numba turns array expressions (``a[:] = 0``) into parallel
    # loops too, also in a kernel's serial branch, where they woke the threads at every
    # call: Adafactor's column sums of a 40x20 matrix took 69 us, and milliseconds on a
    # busy machine, where the loop written out takes 1.7 us. Each kernel has one prange.
    parfors = compiled["parfors"]
    assert {"column_sums", "column_sums_bits", "_add_scaled"} <= set(parfors)
    assert len(parfors) >= 5  # and the generated drivers: flat, segments, blocks
    assert {name: counts for name, counts in parfors.items() if set(counts) != {1}} == {}


@pytest.mark.parametrize("form", ["", " in place"], ids=["flat", "in place"])
@pytest.mark.parametrize("name", EVERY_RULE)
def test_every_kernel_is_vectorised_float32(assembly, name, form):
    asm = assembly[name + form]
    # Packed single-precision arithmetic means SIMD; any double-precision arithmetic
    # means a float64 promotion crept into the rule.
    assert re.search(r"\bv?(mul|add|sub|fmadd\w*)ps\b", asm), f"{name} is not vectorised"
    doubles = re.findall(r"\bv?(?:mul|add|sub|div|sqrt)[ps]d\b", asm)
    assert not doubles, f"{name} computes in float64: {sorted(set(doubles))}"
    if name not in NO_DIVISION:  # where a rule divides, the divisions are packed too
        assert re.search(r"\bv?divps\b", asm), f"{name}'s division is not vectorised"


def test_rules_use_no_numeric_literals():
    # Numba types a float literal as float64 and an int literal as int64, and either
    # promotes a float32 expression to float64.
    functions = rule_functions()
    names = {function.name for function in functions}
    assert names == {getattr(fastopt, name).rule for name in EVERY_RULE} | OTHER_RULES
    for function in functions:
        literals = [node.value for node in ast.walk(function)
                    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float))]
        assert not literals, f"{function.name} has numeric literals {literals}"


def test_rules_read_their_scalars_by_name_only():
    # h is a named tuple, built by field name on the host; a rule that indexed or
    # unpacked it would depend on the order of the fields again.
    for function in rule_functions():
        if function.name == "prepare" or getattr(rules, function.name) in rules.HELPERS:
            continue  # which take their numbers as arguments
        scalars = getattr(rules, function.name).__annotations__["h"]
        assert issubclass(scalars, tuple) and hasattr(scalars, "_fields"), function.name
        reads = [node.attr for node in ast.walk(function) if isinstance(node, ast.Attribute)
                 and isinstance(node.value, ast.Name) and node.value.id == "h"]
        uses = [node for node in ast.walk(function) if isinstance(node, ast.Name)
                and node.id == "h"]
        assert len(uses) == len(reads), f"{function.name} uses h other than as h.field"
        assert set(reads) == set(scalars._fields), function.name


@pytest.mark.parametrize("name", sorted(EVERY_RULE))
def test_every_optimizer_folds_its_rules_scalars_by_type(name):
    opt = getattr(fastopt, name)([np.ones(8, np.float32)], **EVERY_RULE[name])
    group, host = opt.param_groups[0], dict(opt.spec.host)
    h = opt.scalars(group, 1, list(opt.buffers(group, host)), host)
    assert type(h) is getattr(rules, opt.rule).__annotations__["h"]


def test_a_kernel_asked_for_an_unknown_state_refuses():
    with pytest.raises(ValueError, match="no state"):
        cpu.kernel("adam", ("exp_avg", "velocity"))


def test_absent_state_reads_as_zero_and_is_not_written():
    f = np.float32
    p, g = np.ones(3, f), np.full(3, 2.0, f)
    buf = np.full(3, 5.0, f)
    prep = (f(1), f(1), f(np.inf), f(0))  # g_scale, g_downscale, clip, weight_decay: g
    h = (f(0.5), f(0.9), f(1), False)  # lr, momentum, grad_weight, nesterov
    cpu.kernel("sgd", ())(p, g, prep, h, False, True)
    np.testing.assert_array_equal(p, 0.0)  # 1 - 0.5 * 2: the buffer read as 0, then dropped
    cpu.kernel("sgd", ("momentum_buffer",))(p, g, buf, prep, h, False, True)
    np.testing.assert_allclose(buf, 0.9 * 5.0 + 2.0)


@pytest.mark.parametrize("name, options", [("Adam", {}), ("Adam", dict(caution=True)),
                                           ("LAMB", {}), ("SWATS", {})])
def test_a_pass_that_sums_keeps_its_rules_order_of_operations(name, options):
    """(1 - beta2) * g * g multiplies from the left, as torch's addcmul: finite for these
    gradients, whose squares alone overflow float32. (LAMB's and SWATS's passes, which
    sum, were compiled with fastmath reassoc, which made their second moments infinite
    and their parameters stand still.)"""
    g = np.array([1e19, -2e19, 1e20, 5e20], np.float32)
    opt = getattr(fastopt, name)([np.ones(4, np.float32)], lr=0.01, **options)
    opt.step([g])
    exact = 0.001 * g.astype(np.float64) ** 2  # betas (0.9, 0.999), from zero
    np.testing.assert_allclose(opt.state["exp_avg_sq"], exact, rtol=3e-7)
    np.testing.assert_array_equal(np.sign(1 - opt.flat_params), np.sign(g))  # all moved


@pytest.mark.parametrize("threads", sorted({1, numba.config.NUMBA_NUM_THREADS}))
@pytest.mark.parametrize("n", [3 * cpu.PARALLEL_MIN_SIZE + 11, 100_000, 7 * cpu.CHUNK])
def test_serial_and_parallel_loops_agree_bitwise(n, threads):
    default = numba.get_num_threads()
    numba.set_num_threads(threads)
    try:
        check_serial_and_parallel_loops_agree(n)
    finally:
        numba.set_num_threads(default)


def check_serial_and_parallel_loops_agree(n):
    rng = np.random.default_rng(0)
    opt = fastopt.Adam([np.zeros(1, np.float32)], lr=1e-2, amsgrad=True)
    h = opt.scalars(opt.param_groups[0], 1, [], {})
    prep = (np.float32(0.5), np.float32(1), np.float32(1.5), np.float32(0.1))  # scales, clip, L2
    arrays = [rng.standard_normal(n).astype(np.float32) for _ in range(2)]
    arrays += [np.abs(rng.standard_normal(n)).astype(np.float32) for _ in range(3)]
    serial = [a.copy() for a in arrays]
    kernel = cpu.kernel("adam", ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"))
    kernel(*serial, prep, h, False, True)
    kernel(*arrays, prep, h, True, True)
    for a, b in zip(arrays, serial):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("n", [100_000, 7 * cpu.CHUNK + 300])
def test_8_bit_passes_step_the_same_blocks_on_any_thread_count(n):
    # Each thread count cuts the blocks into other chunks (391 blocks: 7 chunks of 56 on
    # one thread, 8 of 49 on two); a block stepped twice or left out would differ.
    rng = np.random.default_rng(3)
    params = (0.1 * rng.standard_normal(n)).astype(np.float32)
    grads = [(0.01 * rng.standard_normal(n)).astype(np.float32) for _ in range(3)]
    default, runs = numba.get_num_threads(), []
    for threads in sorted({1, 2, numba.config.NUMBA_NUM_THREADS}):
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
        try:
            opt = fastopt.Adam([params.copy()], lr=1e-2, state_dtype="int8")
            for g in grads:
                opt.step(g)
        finally:
            numba.set_num_threads(default)
        runs.append([opt.flat_params] + [opt.state[k] for k in sorted(opt.state)])
    assert not np.array_equal(runs[0][0], params)
    for run in runs[1:]:
        for a, b in zip(run, runs[0]):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("threads", [1, 2, 3, 4, 16])
def test_the_parallel_chunks_cover_a_buffer_and_share_it_evenly(threads):
    for size in [*range(cpu.PARALLEL_MIN_SIZE, 300_000, 997), 10**6, 2 * 10**7]:
        check_even_chunks(size, threads, cpu.CHUNK, cpu.VECTOR, 1.05 * size / threads)
    # the 8-bit passes' chunks of blocks: from a parallel pass's 64 blocks up, within
    # a block of an even share
    for blocks in [*range(cpu.PARALLEL_MIN_SIZE // 256, 1200, 7), 10**6 // 256]:
        check_even_chunks(blocks, threads, cpu.BLOCKS_PER_CHUNK, 1,
                          1.05 * blocks / threads + 1)


def check_even_chunks(size, threads, most, multiple, bound):
    chunk = cpu.even_chunk(size, threads, most, multiple)
    count = -(-size // chunk)
    assert chunk % multiple == 0 and chunk <= most
    assert (count - 1) * chunk < size <= count * chunk
    # prange hands each thread an equal run of the chunks: the busiest gets
    # ceil(count / threads) of them.
    busiest = min(-(-count // threads) * chunk, size)
    assert busiest <= bound, (size, chunk, count)


def test_denormals_are_flushed_inside_the_kernels_and_nowhere_else():
    tiny = np.float32(1e-39)  # subnormal
    for n in (10, 3 * cpu.PARALLEL_MIN_SIZE):  # the serial and the parallel loop
        opt = fastopt.SGD([np.zeros(n, np.float32)], lr=1.0)
        opt.step(np.full(n, -tiny, np.float32))
        assert not opt.flat_params.any()  # DAZ: the subnormal gradient read as zero
        cpu.FLUSH_DENORMALS = False
        try:
            opt.step(np.full(n, -tiny, np.float32))
        finally:
            cpu.FLUSH_DENORMALS = True
        np.testing.assert_array_equal(opt.flat_params, tiny)
    # The calling thread's own arithmetic keeps its subnormals afterwards.
    assert np.float32(1e-38) / np.float32(10) != 0


@pytest.mark.parametrize("options", [dict(sums=("velocity",)), dict(writes=("max_exp_avg_sq",)),
                                     dict(per_segment=("trust",)),
                                     dict(sums=("param_sq", "update_sq", "p"))],
                         ids=["unknown sum", "absent state", "unknown field", "three sums"])
def test_a_pass_asked_for_what_its_rule_lacks_refuses(options):
    spec = Pass("lamb", ("exp_avg", "exp_avg_sq"), **options)
    with pytest.raises(ValueError, match="lamb"):
        cpu.segment_kernel(*spec)


@pytest.mark.parametrize("name", sorted(EVERY_RULE))
def test_scalars_given_as_plain_floats_are_read_as_float32(name):
    # The backends pass float32 arrays; a caller passing the host's floats as they are
    # must get the same float32 arithmetic, not a rule compiled in float64.
    opt = getattr(fastopt, name)([np.ones(8, np.float32)], **EVERY_RULE[name])
    group, host = opt.param_groups[0], dict(opt.spec.host)
    present = tuple(opt.buffers(group, host))
    h = opt.scalars(group, 3, [], host)
    prep = (0.7, 1.0, 2.5, 0.01)  # g_scale, g_downscale, clip, weight_decay
    rng = np.random.default_rng(1)
    arrays = [rng.standard_normal(1000).astype(np.float32) for _ in range(2)]
    arrays += [np.abs(rng.standard_normal(1000)).astype(np.float32) + 0.1 for _ in present]
    packed = [a.copy() for a in arrays]
    kernel = cpu.kernel(opt.rule, present)
    kernel(*arrays, prep, tuple(h), False, True)
    kernel(*packed, np.array(prep, np.float32), np.array(h, np.float32), False, True)
    for a, b in zip(arrays, packed):
        np.testing.assert_array_equal(a, b)
