"""The CUDA kernels against the CPU kernels.

Runs on a GPU, or without one in Numba's simulator: ``NUMBA_ENABLE_CUDASIM=1 pytest
tests/test_cuda.py`` (the variable must be set before numba is imported, hence a
separate run). The simulator is slow, so the sizes are small; a tiny launch shape makes
the grid-stride loop wrap several times.
"""

import copy

import ml_dtypes
import numpy as np
import pytest

import fastopt
from cases import ALL, CASES, case_id
from conftest import gradients, initial_params

cuda = pytest.importorskip("numba.cuda")
if not cuda.is_available():
    pytest.skip("no GPU, and NUMBA_ENABLE_CUDASIM is not set", allow_module_level=True)

from fastopt.kernels import cpu as cpu_kernels  # noqa: E402
from fastopt.kernels import cuda as cuda_kernels  # noqa: E402
from fastopt.precision import to_device  # noqa: E402

SIZES = [0, 1, 7, 300]
STEPS = 30
# The simulator evaluates the rules in Python, partly in float64; a GPU differs from the
# CPU only by fused multiply-adds. Either way, rounding.
RTOL = ATOL = 1e-5


@pytest.fixture(autouse=True)
def small_launch(monkeypatch):
    monkeypatch.setattr(cuda_kernels, "threads_per_block", 8)
    monkeypatch.setattr(cuda_kernels, "max_blocks", 4)


@pytest.fixture(autouse=True)
def no_bfloat16_through_the_buffer_protocol(monkeypatch):
    """In the simulator, refuse what a GPU refuses: numba-cuda copies between host and
    device through the buffer protocol, which NumPy refuses for ml_dtypes' bfloat16, so
    a bfloat16 host array must travel as its bits (``fastopt.precision.to_device``)."""
    from numba import config

    if not config.ENABLE_CUDASIM:
        return
    from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray

    def refuse(host):
        if isinstance(host, np.ndarray) and host.dtype == ml_dtypes.bfloat16:
            raise ValueError("cannot include dtype 'E' in a buffer")

    def checked(method):
        def call(self, ary=None, *args, **kwargs):
            refuse(ary)
            return method(self, ary, *args, **kwargs)
        return call

    to_device = cuda.to_device
    monkeypatch.setattr(cuda, "to_device", lambda ary, *args, **kwargs: (
        refuse(ary), to_device(ary, *args, **kwargs))[1])
    for name in ("copy_to_device", "copy_to_host"):
        monkeypatch.setattr(FakeCUDAArray, name, checked(getattr(FakeCUDAArray, name)))


@pytest.fixture(autouse=True)
def device_arrays_reshape_as_numba_cuda_does(monkeypatch):
    """In the simulator, reshape device arrays as numba-cuda does: one in F order (a
    transposed one) as its memory, as if it lay in C order, not its elements in C order;
    one with gaps only where no copy is needed."""
    from numba import config

    if not config.ENABLE_CUDASIM:
        return
    from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray

    def reshape(self, *shape, order="C"):
        a = self._ary
        if order == "C" and a.flags.f_contiguous and not a.flags.c_contiguous:
            a = a.transpose()  # its memory, in C order
        reshaped = a.reshape(*shape, order=order)
        if a.size and not np.shares_memory(reshaped, a):
            raise NotImplementedError("reshape would require copy")
        return FakeCUDAArray(reshaped)

    monkeypatch.setattr(FakeCUDAArray, "reshape", reshape)


def host(a):
    return a.copy_to_host()


@pytest.mark.parametrize("layout", ["F order", "with gaps"])
def test_a_device_parameter_not_in_c_order_is_taken_element_by_element(layout):
    """A transposed device parameter (or one with gaps) is flattened by its elements,
    where a reshape of it on the device would read its memory (or refuse)."""
    values = np.arange(24, dtype=np.float32).reshape(4, 6)
    if layout == "F order":
        param = cuda.to_device(np.asfortranarray(values))
    else:
        param = cuda.to_device(np.zeros((4, 12), np.float32))
        param.copy_to_device(np.repeat(values, 2, axis=1))
        param = param[:, ::2]
    opt = fastopt.SGD({"w": param}, lr=0.5)
    np.testing.assert_array_equal(host(opt.flat_params), values.ravel())
    opt.grads["w"].copy_to_device(np.ones((4, 6), np.float32))
    opt.step()
    np.testing.assert_array_equal(host(opt.params["w"]), values - 0.5)


def test_a_cuda_tensor_that_requires_grad_gets_a_clear_error():
    class RequiresGrad:  # as a CUDA torch tensor that requires grad answers
        @property
        def __cuda_array_interface__(self):
            raise RuntimeError("Can't get __cuda_array_interface__ on Variable that "
                               "requires grad")

    with pytest.raises(TypeError, match=r"params\['w'\] is a CUDA tensor that requires grad"):
        fastopt.SGD({"w": RequiresGrad()}, lr=0.1)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("case", ALL, ids=case_id)
def test_cuda_matches_cpu(case, n):
    name, kwargs = case
    p0, grads = initial_params(n, n), gradients(n, n, STEPS)
    on_gpu = getattr(fastopt, name)([to_device(p0)], **kwargs)
    on_cpu = getattr(fastopt, name)([p0], **kwargs)
    assert on_gpu.device == "cuda" and on_cpu.device == "cpu"
    for g in grads:
        on_gpu.step(to_device(g))
        on_cpu.step(g)
    np.testing.assert_allclose(host(on_gpu.flat_params), on_cpu.flat_params,
                               rtol=RTOL, atol=ATOL)
    for key, value in on_cpu.state.items():
        if isinstance(value, np.ndarray):
            np.testing.assert_allclose(host(on_gpu.state[key]), value, rtol=1e-4,
                                       atol=1e-5 * max(1.0, np.abs(value).max(initial=0)),
                                       err_msg=key)
    if n:
        assert np.abs(on_cpu.flat_params - p0).max() > 4 * ATOL


def test_structured_params_and_grads_on_device():
    rng = np.random.default_rng(0)
    host_params = {"w": rng.standard_normal((5, 3)).astype(np.float32),
                   "b": rng.standard_normal(3).astype(np.float32)}
    opt = fastopt.SGD({k: to_device(v) for k, v in host_params.items()}, lr=0.5)
    np.testing.assert_array_equal(host(opt.params["w"]), host_params["w"])
    g = {"w": np.ones((5, 3), np.float32), "b": np.full(3, 2.0, np.float32)}
    opt.step({k: to_device(v) for k, v in g.items()})
    np.testing.assert_allclose(host(opt.params["w"]), host_params["w"] - 0.5)
    np.testing.assert_allclose(host(opt.params["b"]), host_params["b"] - 1.0)
    # Gradients written through the views, then zero_grad.
    opt.grads["b"].copy_to_device(np.full(3, 4.0, np.float32))
    opt.step()
    np.testing.assert_allclose(host(opt.params["b"]), host_params["b"] - 3.0)
    np.testing.assert_allclose(host(opt.params["w"]), host_params["w"] - 1.0)  # stale grads
    opt.zero_grad()
    assert not host(opt.flat_grads).any()


def test_adopted_device_buffer_is_updated_in_place():
    flat = to_device(np.ones(10, np.float32))
    opt = fastopt.SGD(fastopt.adopt(flat), lr=0.25)
    opt.step(to_device(np.ones(10, np.float32)))
    np.testing.assert_allclose(host(flat), 0.75)


def test_initial_accumulator_is_filled_on_device():
    opt = fastopt.Adagrad([to_device(np.zeros(9, np.float32))], lr=1.0,
                          initial_accumulator_value=3.0)
    opt.step(to_device(np.ones(9, np.float32)))
    np.testing.assert_allclose(host(opt.state["sum"]), 4.0)
    np.testing.assert_allclose(host(opt.flat_params), -0.5, rtol=1e-6)


def test_mixed_devices_are_refused():
    with pytest.raises(TypeError, match="different devices"):
        fastopt.Adam([to_device(np.zeros(3, np.float32)), np.zeros(3, np.float32)])
    opt = fastopt.Adam([to_device(np.zeros(3, np.float32))])
    with pytest.raises(TypeError, match="CUDA array"):
        opt.step(np.zeros(3, np.float32))
    assert opt.state["step"] == 0


# -- training-loop features on the device ------------------------------------------------

def group_params(seed):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(np.float32) for s in [(40,), (9, 7), (33,)]]


def on_both(name, kwargs, seed=0):
    """The same grouped optimizer on the device and on the CPU."""
    p = group_params(seed)

    def groups(put):
        return [{"params": [put(p[0]), put(p[1])]},
                {"params": {"c": put(p[2])}, "lr": 0.02, "weight_decay": 0.1}]

    return (getattr(fastopt, name)(groups(to_device), **kwargs),
            getattr(fastopt, name)(groups(np.copy), **kwargs))


@pytest.mark.parametrize("name", ["SGD", "Adam", "NAdam", "LAMB", "LARS", "Adafactor"])
def test_groups_clipping_scaling_and_skip_on_device(name):
    options = dict(clip_grad_norm=8.0, clip_grad_value=0.3, skip_nonfinite=True, lr=0.05)
    on_gpu, on_cpu = on_both(name, options)
    rng = np.random.default_rng(1)
    for t in range(8):
        g = (rng.standard_normal(on_cpu.flat_params.size) * (t + 1) * 128).astype(np.float32)
        if t == 3:
            g[5] = np.nan
        on_gpu.step(to_device(g), grad_scale=128.0)
        on_cpu.step(g, grad_scale=128.0)
        assert on_gpu.last_grad_norm == pytest.approx(on_cpu.last_grad_norm, rel=1e-12, nan_ok=True)
    assert on_gpu.skipped_steps == on_cpu.skipped_steps == 1
    np.testing.assert_allclose(host(on_gpu.flat_params), on_cpu.flat_params, rtol=RTOL, atol=ATOL)


PER_TENSOR = [("LAMB", {}), ("LARS", {}), ("Adafactor", {}), ("SWATS", {}),
              ("Adam", dict(caution=True)), ("Lion", dict(caution=True, lr=0.01)),
              ("Adan", dict(caution=True))]


@pytest.mark.parametrize("name, extra", PER_TENSOR, ids=[f"{n}{e}" for n, e in PER_TENSOR])
def test_per_tensor_algorithms_on_device(name, extra, monkeypatch):
    # Chunks of 16 elements: segments of several chunks, and rows split across chunks.
    monkeypatch.setattr(fastopt._backend, "SEGMENT_CHUNK", 16)
    rng = np.random.default_rng(6)
    shapes = [(), (0, 3), (2, 3, 20), (5,), (1, 40), (3, 1), (37,)]
    p0 = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    kwargs = dict(lr=0.05, weight_decay=0.1) if name != "LARS" else dict(weight_decay=0.01)
    kwargs.update(extra)
    on_gpu = getattr(fastopt, name)([to_device(p) for p in p0], **kwargs)
    on_cpu = getattr(fastopt, name)(p0, **kwargs)
    for _ in range(4):
        g = rng.standard_normal(on_cpu.flat_params.size).astype(np.float32)
        on_gpu.step(to_device(g))
        on_cpu.step(g)
    np.testing.assert_allclose(host(on_gpu.flat_params), on_cpu.flat_params, rtol=RTOL, atol=ATOL)
    for key, value in on_cpu.state.items():
        if isinstance(value, np.ndarray):
            np.testing.assert_allclose(host(on_gpu.state[key]), value, rtol=1e-4, atol=1e-6,
                                       err_msg=key)
    assert np.abs(on_cpu.flat_params - np.concatenate([p.ravel() for p in p0])).max() > 1e-3


def test_a_trust_ratio_beyond_float32_steps_on_device_as_on_the_cpu():
    """LARS's lr times its trust ratio for gradients of 1e-42 is 1e39, which the host
    hands either backend as a float32 and a power of two (``layerwise.in_float32_range``):
    each parameter steps by lr * trust_coefficient * |p| / 8, 1e-3."""
    p0, g = np.ones(64, np.float32), np.full(64, 1e-42, np.float32)
    on_gpu, on_cpu = fastopt.LARS([to_device(p0)]), fastopt.LARS([p0.copy()])
    on_gpu.step(to_device(g))
    on_cpu.step(g)
    np.testing.assert_allclose(host(on_gpu.flat_params), on_cpu.flat_params, rtol=1e-7)
    np.testing.assert_allclose(on_cpu.flat_params, 0.999, rtol=1e-7)


def test_device_sum_of_squares_is_exact_enough_and_repeatable():
    g = np.random.default_rng(2).standard_normal(1001).astype(np.float32)
    backend = fastopt.SGD([to_device(g)])._backend
    results = {backend.sum_squares(to_device(g)) for _ in range(3)}
    assert len(results) == 1
    assert results.pop() == pytest.approx(float(np.sum(g.astype(np.float64) ** 2)), rel=1e-13)


def test_swats_on_device_switches_like_the_cpu():
    rng = np.random.default_rng(3)
    base = rng.uniform(0.5, 1.5, 200) * rng.choice([-1.0, 1.0], 200)
    kwargs = dict(lr=0.01, betas=(0.9, 0.99), eps=1e-5)
    p0 = rng.standard_normal(200).astype(np.float32)
    on_gpu = fastopt.SWATS([to_device(p0)], **kwargs)
    on_cpu = fastopt.SWATS([p0], **kwargs)
    for _ in range(40):
        g = (base + 0.05 * rng.standard_normal(200)).astype(np.float32)
        on_gpu.step(to_device(g))
        on_cpu.step(g)
    assert on_cpu.state["switch_step"][0] is not None
    assert on_gpu.state["switch_step"] == on_cpu.state["switch_step"]
    np.testing.assert_allclose(host(on_gpu.flat_params), on_cpu.flat_params, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("bias_correction", [True, False])
def test_ema_on_device(bias_correction):
    on_gpu, on_cpu = on_both("SGD", dict(lr=0.1))
    averages = [fastopt.EMA(opt, decay=0.8, bias_correction=bias_correction)
                for opt in (on_gpu, on_cpu)]
    rng = np.random.default_rng(4)
    for _ in range(5):
        g = rng.standard_normal(on_cpu.flat_params.size).astype(np.float32)
        on_gpu.step(to_device(g))
        on_cpu.step(g)
        for average in averages:
            average.update()
    live = host(on_gpu.flat_params)
    with averages[0].applied(), averages[1].applied():
        np.testing.assert_allclose(host(on_gpu.flat_params), on_cpu.flat_params, rtol=1e-6)
        assert not np.allclose(host(on_gpu.flat_params), live)
    np.testing.assert_array_equal(host(on_gpu.flat_params), live)


def test_device_checkpoints_resume_exactly(tmp_path):
    on_gpu, _ = on_both("NAdam", dict(lr=0.05, clip_grad_norm=3.0))
    resumed, _ = on_both("NAdam", dict(lr=0.05))
    rng = np.random.default_rng(5)
    grads = [rng.standard_normal(on_gpu.flat_params.size).astype(np.float32) for _ in range(6)]
    for g in grads[:3]:
        on_gpu.step(to_device(g))
    fastopt.save(on_gpu, tmp_path / "device.npz")
    resumed.load(tmp_path / "device.npz")
    assert resumed.clip_grad_norm == 3.0 and resumed.state["step"] == 3
    for g in grads[3:]:
        on_gpu.step(to_device(g))
        resumed.step(to_device(g))
    np.testing.assert_array_equal(host(resumed.flat_params), host(on_gpu.flat_params))


def test_bench_runs_on_the_device(tmp_path):
    from fastopt import bench

    records = bench.run(["Adam"], [300], rounds=1, device="cuda", out=tmp_path)
    assert {r["implementation"] for r in records} >= {"fastopt", "triad"}
    assert (tmp_path / "results.json").exists()


def test_the_precision_bench_on_the_device_counts_the_device_buffers(tmp_path, monkeypatch):
    from fastopt import bench

    monkeypatch.setattr(fastopt.optim.optimizer, "MIN_QUANTIZED_SIZE", 256)
    records = {r["format"]: r for r in bench.run_precision(["Adam"], [300], rounds=1,
                                                           out=tmp_path, round_seconds=0,
                                                           device="cuda")}
    assert set(records) >= set(bench.PRECISION_FORMATS)
    assert records["float32"]["moves_bytes"] == 28  # p, g, m, v: the state counted too
    # p, g, 2 of 8-bit state and 2 scales of 4 bytes per block of 256; bf16 p and g and
    # a remainder of 2 each
    assert records["float32, int8 state"]["keeps_bytes"] == pytest.approx(10 + 8 / 256, 0.01)
    assert records["bf16 + remainder, int8 state"]["keeps_bytes"] == pytest.approx(
        8 + 8 / 256, 0.01)
    assert (tmp_path / "precision.json").exists()


# -- storage formats on the device ----------------------------------------------------------

# Per format: the parameters' and gradients' dtypes and the options; each algorithm's
# cases take it where the CPU does (int8 state where the algorithm keeps moving averages).
FORMATS = {
    "bf16-master": (ml_dtypes.bfloat16, ml_dtypes.bfloat16, dict(master_weights="float32")),
    "fp16-master": (np.float16, np.float16, dict(master_weights="float32")),
    "bf16-remainder": (ml_dtypes.bfloat16, ml_dtypes.bfloat16,
                       dict(master_weights="remainder")),
    "fp16-stochastic": (np.float16, np.float16,
                        dict(master_weights=None, stochastic_rounding=True, seed=3)),
    "bf16-state-stochastic": (np.float32, np.float32,
                              dict(state_dtype="bfloat16", stochastic_rounding=True)),
    "int8": (np.float32, np.float32, dict(state_dtype="int8")),
    "bf16-int8-fp32-grads": (ml_dtypes.bfloat16, np.float32,
                             dict(state_dtype="int8", grad_dtype="float32")),
}
FIRST_CASES = [(name, cases[0]) for name, cases in CASES.items()]


def _takes(name, fmt):
    """Whether ``name`` takes the format ``fmt`` (the CPU refuses some)."""
    dtype, _, options = FORMATS[fmt]
    try:
        getattr(fastopt, name)([np.zeros(8, dtype)], **options)
    except ValueError:
        return False
    return True


FORMAT_CASES = [(name, kwargs, fmt) for name, kwargs in FIRST_CASES for fmt in FORMATS
                if _takes(name, fmt)]
# One unit in the last place, relative, of each 16-bit format.
ULP = {np.dtype(ml_dtypes.bfloat16): 2.0 ** -7, np.dtype(np.float16): 2.0 ** -10}


def assert_close_in_format(ours, theirs, what):
    """float32 within rounding; 16-bit values and 8-bit codes bit for bit but for a few
    that round the other way (to the neighbouring value or code): the simulator
    evaluates the rules partly in float64, and a GPU fuses multiply-adds, so a value
    within rounding of a boundary may land on its other side. A missing stochastic
    rounding, or a wrong code, shows in far more elements."""
    assert ours.dtype == theirs.dtype, what
    if ours.dtype == np.float32:
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6, err_msg=what)
        return
    different = ours.view(np.uint8 if ours.dtype == np.uint8 else np.uint16) != theirs.view(
        np.uint8 if ours.dtype == np.uint8 else np.uint16)
    assert different.mean() <= 0.02, f"{what}: {different.sum()} of {different.size} differ"
    if ours.dtype == np.uint8:
        assert np.abs(ours.astype(int) - theirs).max(initial=0) <= 1, what
    elif ours.dtype in ULP:
        np.testing.assert_allclose(ours.astype(np.float64), theirs.astype(np.float64),
                                   rtol=ULP[ours.dtype], atol=1e-7, err_msg=what)


@pytest.mark.parametrize("name, kwargs, fmt", FORMAT_CASES,
                         ids=[f"{case_id((n, k))}-{f}" for n, k, f in FORMAT_CASES])
def test_formats_on_device_match_the_cpu(name, kwargs, fmt, monkeypatch):
    # Two blocks of 8-bit state (one partial), and a tensor too small for 8 bits.
    monkeypatch.setattr(fastopt.optim.optimizer, "MIN_QUANTIZED_SIZE", 256)
    assert_steps_as_on_the_cpu(name, kwargs, fmt, {"w": (8, 40), "b": (9,)})


# The launch shape the kernels ship with, before small_launch shrinks it for each test.
SHIPPED_LAUNCH = (cuda_kernels.threads_per_block, cuda_kernels.max_blocks)


@pytest.mark.parametrize("name, kwargs, fmt", [
    ("Adam", {}, "int8"),  # 8-bit blocks: a thread per element, the absmax across warps
    ("LAMB", dict(clip_grad_norm=1.0), "bf16-master"),  # sums across warps and blocks
    ("Adafactor", {}, "bf16-remainder"),  # column sums
    ("AdamW", {}, "bf16-state-stochastic"),  # every element's random bits
])
def test_the_shipped_launch_shape_steps_as_the_cpu(name, kwargs, fmt, monkeypatch):
    """Blocks of the shipped number of threads (several warps, whose sums and 8-bit
    absmax meet in shared memory) and a full grid, which the other tests' small launch
    never runs; on a GPU at about a million elements, in the simulator at a few blocks."""
    from numba import config

    monkeypatch.setattr(cuda_kernels, "threads_per_block", SHIPPED_LAUNCH[0])
    monkeypatch.setattr(cuda_kernels, "max_blocks", SHIPPED_LAUNCH[1])
    if config.ENABLE_CUDASIM:  # a simulated thread is a Python thread
        monkeypatch.setattr(fastopt.optim.optimizer, "MIN_QUANTIZED_SIZE", 256)
        shapes = {"w": (3, 200), "b": (37,)}
    else:
        shapes = {"w": (1024, 1030), "b": (1037,)}
    assert_steps_as_on_the_cpu(name, kwargs, fmt, shapes)


def test_a_launch_shape_whose_blocks_cannot_reduce_is_refused(monkeypatch):
    """The block reductions halve the threads: 384 would drop a third of a sum."""
    monkeypatch.setattr(cuda_kernels, "threads_per_block", 384)
    opt = fastopt.LAMB([to_device(np.ones(300, np.float32))])
    with pytest.raises(ValueError, match="threads_per_block must be a power of two, at "
                       "most 1024, got 384"):
        opt.step([to_device(np.ones(300, np.float32))])


def assert_steps_as_on_the_cpu(name, kwargs, fmt, shapes):
    """Three steps of ``name`` with ``kwargs`` in the format ``fmt`` on parameters of
    ``shapes`` on the device and on the CPU: parameters, state and master weights
    alike (``assert_close_in_format``)."""
    dtype, grad_dtype, options = FORMATS[fmt]
    rng = np.random.default_rng(7)
    p0 = {k: (0.5 * rng.standard_normal(s)).astype(dtype) for k, s in shapes.items()}
    options = {**kwargs, **options}
    on_gpu = getattr(fastopt, name)({k: to_device(v) for k, v in p0.items()}, **options)
    on_cpu = getattr(fastopt, name)({k: v.copy() for k, v in p0.items()}, **options)
    for _ in range(3):
        g = {k: rng.standard_normal(s).astype(grad_dtype) for k, s in shapes.items()}
        on_gpu.step({k: to_device(v) for k, v in g.items()})
        on_cpu.step(g)
    assert_close_in_format(host(on_gpu.flat_params), on_cpu.flat_params, "params")
    for key, value in on_cpu.state.items():
        if isinstance(value, np.ndarray) and key != "master":
            assert_close_in_format(host(on_gpu.state[key]), value, key)
    if on_cpu.master_params is not None:  # float32, or rebuilt from the remainders
        masters = [m if m.dtype == np.float32 else fastopt.precision.rebuild_master(p, m)
                   for p, m in ((host(on_gpu.flat_params), host(on_gpu.master_params)),
                                (on_cpu.flat_params, on_cpu.master_params))]
        assert_close_in_format(*masters, "master")
    if on_cpu.master_params is not None and on_cpu.master_params.dtype == np.float32:
        np.testing.assert_array_equal(  # the parameters are the master weights rounded
            host(on_gpu.master_params).astype(dtype).view(np.uint16),
            host(on_gpu.flat_params).view(np.uint16))
    moved = on_cpu.flat_params.astype(np.float64) - np.concatenate(
        [v.ravel() for v in p0.values()]).astype(np.float64)
    assert np.abs(moved).max() > 0


def test_8_bit_blocks_beyond_2_to_the_126_encode_on_device_as_on_the_cpu():
    # Their values are scaled down before 1 / absmax, which would be subnormal (the CPU
    # flushes it to zero): the device does the same, and so gives the CPU's codes.
    rng = np.random.default_rng(29)
    g = (rng.uniform(-1, 1, 600) * np.float32(3e38)).astype(np.float32)  # two blocks and a part
    options = dict(lr=1e-3, momentum=0.9, state_dtype="int8")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fastopt.optim.optimizer, "MIN_QUANTIZED_SIZE", 256)
        on_gpu = fastopt.SGD([to_device(np.zeros(600, np.float32))], **options)
        on_cpu = fastopt.SGD([np.zeros(600, np.float32)], **options)
        on_gpu.step([to_device(g)])
        on_cpu.step([g])
    np.testing.assert_array_equal(host(on_gpu.state["momentum_buffer"]),
                                  on_cpu.state["momentum_buffer"])
    decoded = fastopt.precision.dequantize(on_cpu.state["momentum_buffer"],
                                           on_cpu.state["momentum_buffer_absmax"], "signed8")
    assert np.abs(decoded.astype(np.float64) - g).max() <= 0.008 * 3e38


def test_8_bit_blocks_of_subnormal_absmax_encode_on_device_as_on_a_cpu_that_keeps_them():
    # 1 / absmax overflowed to inf: every value took the code of +-1 and a zero that of
    # the NaN 0 * inf. The device keeps subnormals, as the CPU does with the flush off.
    rng = np.random.default_rng(30)
    g = (rng.uniform(-1, 1, 600) * np.float32(1e-39)).astype(np.float32)
    g[::7] = 0.0
    options = dict(lr=1e-3, momentum=0.9, state_dtype="int8")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fastopt.optim.optimizer, "MIN_QUANTIZED_SIZE", 256)
        patch.setattr(cpu_kernels, "FLUSH_DENORMALS", False)
        on_gpu = fastopt.SGD([to_device(np.zeros(600, np.float32))], **options)
        on_cpu = fastopt.SGD([np.zeros(600, np.float32)], **options)
        on_gpu.step([to_device(g)])
        on_cpu.step([g])
    codes = host(on_gpu.state["momentum_buffer"])
    np.testing.assert_array_equal(codes, on_cpu.state["momentum_buffer"])
    decoded = fastopt.precision.dequantize(codes, host(on_gpu.state["momentum_buffer_absmax"]),
                                           "signed8")
    np.testing.assert_array_equal(decoded[::7], 0.0)
    assert np.abs(decoded.astype(np.float64) - g).max() <= 0.008 * 1e-39


def test_a_positive_second_moment_that_scales_to_0_is_not_stored_as_0_on_device():
    # Below 1.4e-45 of its block's absmax it underflowed to 0 and took the code of 0,
    # whose next step divided its first moment by eps (see test_int8).
    g = np.zeros(600, np.float32)  # two blocks and a part
    g[::256] = 1e19
    small = np.zeros(600, np.float32)
    small[1::256] = 1e-5
    options = dict(lr=1e-3, eps=1e-12, state_dtype="int8")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fastopt.optim.optimizer, "MIN_QUANTIZED_SIZE", 256)
        patch.setattr(cpu_kernels, "FLUSH_DENORMALS", False)
        on_gpu = fastopt.Adam([to_device(np.zeros(600, np.float32))], **options)
        on_cpu = fastopt.Adam([np.zeros(600, np.float32)], **options)
        for grad in (g, small):
            on_gpu.step([to_device(grad)])
            on_cpu.step([grad])
    codes = host(on_gpu.state["exp_avg_sq"])
    np.testing.assert_array_equal(codes[1::256], 1)  # the unsigned map's smallest positive
    np.testing.assert_array_equal(codes, on_cpu.state["exp_avg_sq"])


# -- fastopt.torch on the device ----------------------------------------------------------

def torch_on_device(torch, monkeypatch):
    """The device on which fastopt.torch's CUDA path steps torch tensors: a GPU where
    torch has one; in the simulator, the CPU, whose tensors fastopt.torch then steps as
    a GPU's (``cuda_launches.step_cpu_tensors_as_cuda_tensors``)."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    from numba import config

    if not config.ENABLE_CUDASIM:
        pytest.skip("torch has no CUDA device here")
    from cuda_launches import step_cpu_tensors_as_cuda_tensors

    step_cpu_tensors_as_cuda_tensors(monkeypatch.setattr)
    return torch.device("cpu")


def numpy_of(t):
    """A torch tensor's values as NumPy holds them (bfloat16 as ml_dtypes')."""
    import torch

    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def assert_steps_close_in_format(ours, on_device, theirs, on_cpu):
    """fastopt.torch's parameters ``ours`` and their state in ``on_device`` against
    ``theirs`` and ``on_cpu``'s (remainders by the master weights they rebuild)."""
    import torch

    def rebuilt(param, remainder):
        return fastopt.precision.rebuild_master(numpy_of(param).view(np.uint16).ravel(),
                                                numpy_of(remainder).view(np.uint16).ravel())

    for p, q in zip(ours, theirs):
        assert_close_in_format(numpy_of(p), numpy_of(q), "params")
        for key, value in on_cpu.state[q].items():
            if not isinstance(value, torch.Tensor):
                continue
            if value.dtype == torch.int16:
                assert_close_in_format(rebuilt(p, on_device.state[p][key]), rebuilt(q, value),
                                       key)
            else:
                assert_close_in_format(numpy_of(on_device.state[p][key]), numpy_of(value), key)


# torch's gradients have their parameter's dtype: no float32 gradients of 16-bit ones.
TORCH_CASES = [(name, kwargs, "fp32") for name, kwargs in FIRST_CASES] + [
    case for case in FORMAT_CASES if FORMATS[case[2]][0] == FORMATS[case[2]][1]]


@pytest.mark.parametrize("name, kwargs, fmt", TORCH_CASES,
                         ids=[f"{case_id((n, k))}-{f}" for n, k, f in TORCH_CASES])
def test_fastopt_torch_on_device_matches_the_cpu(name, kwargs, fmt, monkeypatch):
    """fastopt.torch's path for CUDA tensors (scratch buffers, state on the device, the
    formats' bits through torch's int16 views) against its in-place CPU path."""
    torch = pytest.importorskip("torch")
    import fastopt.torch as ft

    monkeypatch.setattr(fastopt.precision, "MIN_QUANTIZED_SIZE", 256)
    dtype, _, options = FORMATS.get(fmt, (np.float32, np.float32, {}))
    torch_dtype = getattr(torch, np.dtype(dtype).name)
    rng = np.random.default_rng(8)
    shapes = [(8, 40), (9,)]

    def tensor(scale, shape):
        return torch.tensor(scale * rng.standard_normal(shape), dtype=torch.float32).to(torch_dtype)

    p0 = [tensor(0.5, s) for s in shapes]
    grads = [[tensor(1.0, s) for s in shapes] for _ in range(3)]

    def run(device):
        params = [torch.nn.Parameter(p.clone().to(device)) for p in p0]
        opt = getattr(ft, name)(params, **kwargs, **options)
        for g in grads:
            for p, gi in zip(params, g):
                p.grad = gi.to(device)
            opt.step()
        return params, opt

    theirs, on_cpu = run("cpu")
    ours, on_device = run(torch_on_device(torch, monkeypatch))
    assert_steps_close_in_format(ours, on_device, theirs, on_cpu)
    assert any((numpy_of(q).astype(np.float64) != numpy_of(p).astype(np.float64)).any()
               for p, q in zip(p0, theirs))


@pytest.mark.parametrize("name, dtype, options", [
    ("AdamW", "bfloat16", dict(state_dtype="int8")),
    ("Adam", "float16", dict(master_weights=None, stochastic_rounding=True, seed=3)),
    ("LAMB", "bfloat16", dict(master_weights="remainder"))])
def test_fastopt_torch_training_loop_features_on_device(name, dtype, options, monkeypatch):
    """Groups, a torch lr scheduler, clipping by norm (16-bit gradients' norm, read in
    their format, over two stores: the 16-bit weights' and a float32 vector's) and by
    value, and a skipped non-finite step, against the CPU."""
    torch = pytest.importorskip("torch")
    import fastopt.torch as ft

    monkeypatch.setattr(fastopt.precision, "MIN_QUANTIZED_SIZE", 256)
    rng = np.random.default_rng(11)
    shapes = [(8, 40), (9,), (5,)]
    dtypes = [getattr(torch, dtype)] * 2 + [torch.float32]

    def tensors(scale):
        return [torch.tensor(scale * rng.standard_normal(s), dtype=torch.float32).to(d)
                for s, d in zip(shapes, dtypes)]

    p0 = tensors(0.5)
    grads = [tensors(1.0) for _ in range(4)]
    grads[2][1][3] = float("inf")  # the third step is skipped

    def run(device):
        params = [torch.nn.Parameter(p.clone().to(device)) for p in p0]
        opt = getattr(ft, name)([{"params": params[:1]}, {"params": params[1:], "lr": 0.005}],
                                lr=0.01, clip_grad_norm=1.0, clip_grad_value=0.5,
                                skip_nonfinite=True, **options)
        schedule = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        for g in grads:
            for p, gi in zip(params, g):
                p.grad = gi.to(device)
            opt.step()
            schedule.step()
        return params, opt

    theirs, on_cpu = run("cpu")
    ours, on_device = run(torch_on_device(torch, monkeypatch))
    assert on_device.skipped_steps == on_cpu.skipped_steps == 1
    assert_steps_close_in_format(ours, on_device, theirs, on_cpu)


def test_fastopt_torch_on_device_resumes_from_its_state_dict_exactly(monkeypatch):
    """bfloat16 parameters with remainders and 8-bit state: a state_dict taken on the
    device loads into a new optimizer that steps on as the first one does, and decodes
    into torch.optim's float32 state."""
    torch = pytest.importorskip("torch")
    import fastopt.torch as ft

    monkeypatch.setattr(fastopt.precision, "MIN_QUANTIZED_SIZE", 256)
    device = torch_on_device(torch, monkeypatch)
    rng = np.random.default_rng(10)
    p0 = torch.tensor(0.5 * rng.standard_normal((8, 40)), dtype=torch.bfloat16)
    grads = [torch.tensor(rng.standard_normal((8, 40)), dtype=torch.bfloat16)
             for _ in range(4)]
    options = dict(lr=0.01, master_weights="remainder", state_dtype="int8")

    def make():
        p = torch.nn.Parameter(p0.clone().to(device))
        return p, ft.AdamW([p], **options)

    (p, opt), (q, resumed) = make(), make()
    for g in grads[:2]:
        p.grad = g.to(device)
        opt.step()
    q.data.copy_(p.data)
    resumed.load_state_dict(opt.state_dict())
    for g in grads[2:]:
        for param, optimizer in ((p, opt), (q, resumed)):
            param.grad = g.to(device)
            optimizer.step()
    np.testing.assert_array_equal(numpy_of(q).view(np.uint16), numpy_of(p).view(np.uint16))
    for key in ("exp_avg", "exp_avg_sq"):
        np.testing.assert_array_equal(numpy_of(resumed.state[q][key]),
                                      numpy_of(opt.state[p][key]))
    decoded = opt.decoded_state_dict()["state"][0]["exp_avg"]
    assert decoded.dtype == torch.float32 and decoded.shape == p.shape
    assert torch.isfinite(decoded).all() and decoded.abs().max() > 0


def test_fastopt_torch_on_device_keeps_8_bit_state_of_parameters_not_in_c_order_in_c_order():
    """A transposed weight and a channels_last one with 8-bit state on the device: their
    step goes through C-order copies, so their codes lie and their blocks run in C
    order, as the CPU steps ``.contiguous()`` copies of them. Their
    state_dict resumes on the device exactly, and loads into the CPU, whose blocks run
    in the parameters' memory order, by decoding and encoding again."""
    torch = pytest.importorskip("torch")
    import fastopt.torch as ft

    rng = np.random.default_rng(13)
    weight = torch.tensor(0.5 * rng.standard_normal((40, 30)), dtype=torch.float32).t()
    conv = torch.tensor(0.5 * rng.standard_normal((8, 8, 3, 3)), dtype=torch.float32).to(
        memory_format=torch.channels_last)
    # Rows (channels) of scales 1e-3 to 1: a code paired with another block's absmax
    # decodes far off.
    grads = [[torch.tensor(10.0 ** np.linspace(-3, 0, 30)[:, None] * rng.standard_normal((30, 40)),
                           dtype=torch.float32),
              torch.tensor(10.0 ** rng.uniform(-3, 0, (8, 1, 1, 1)) * rng.standard_normal(
                  (8, 8, 3, 3)), dtype=torch.float32)] for _ in range(4)]
    options = dict(lr=0.01, state_dtype="int8")

    def stepped(params, device, steps):
        opt = ft.AdamW(params, **options)
        for gs in grads[:steps]:
            for p, g in zip(params, gs):
                p.grad = g.to(device)
            opt.step()
        return opt

    def laid_out(t, device):  # a parameter of t's values and layout on device
        return torch.nn.Parameter(t.detach().clone().to(device))

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fastopt.precision, "MIN_QUANTIZED_SIZE", 256)
        contiguous = [laid_out(t.contiguous(), "cpu") for t in (weight, conv)]
        on_cpu = stepped(contiguous, "cpu", 3)  # before the CPU's tensors pass for a GPU's
        device = torch_on_device(torch, patch)
        params = [laid_out(t, device) for t in (weight, conv)]
        on_device = stepped(params, device, 3)
        for p, q in zip(params, contiguous):
            assert not p.is_contiguous()
            assert_close_in_format(numpy_of(p), numpy_of(q), "params")
            for key in ("exp_avg", "exp_avg_sq", "exp_avg_absmax", "exp_avg_sq_absmax"):
                assert on_device.state[p][key].is_contiguous(), key
                assert_close_in_format(numpy_of(on_device.state[p][key]),
                                       numpy_of(on_cpu.state[q][key]), key)
        saved = copy.deepcopy(on_device.state_dict())  # its tensors are the live state's

        again = [laid_out(p, device) for p in params]
        resumed = ft.AdamW(again, **options)
        resumed.load_state_dict(saved)
        for optimizer, ps in ((on_device, params), (resumed, again)):
            for p, g in zip(ps, grads[3]):
                p.grad = g.to(device)
            optimizer.step()
        for p, q in zip(params, again):
            np.testing.assert_array_equal(numpy_of(q), numpy_of(p))
            for key in ("exp_avg", "exp_avg_sq", "exp_avg_absmax", "exp_avg_sq_absmax"):
                np.testing.assert_array_equal(numpy_of(resumed.state[q][key]),
                                              numpy_of(on_device.state[p][key]), key)

        on_host = [laid_out(p, "cpu") for p in params]
        saved, decoded = copy.deepcopy(on_device.state_dict()), on_device.decoded_state_dict()

        def assert_encoded_again(opt, ps, decoded, layout):
            """``opt``'s 8-bit state of ``ps``, loaded from a state_dict of another
            layout, lies as ``layout`` says and decodes to each of the ``decoded``
            values within half the map's widest gap of its new block's absmax."""
            values = opt.decoded_state_dict()["state"]
            for index, p in enumerate(ps):
                for key, half_gap in (("exp_avg", 0.9 / 64 / 2), ("exp_avg_sq", 0.9 / 128 / 2)):
                    codes = opt.state[p][key]
                    assert codes.dtype == torch.uint8 and layout(codes, p), key
                    # in the codes' memory order, the order of their blocks
                    ours = values[index][key].as_strided((p.numel(),), (1,))
                    theirs = torch.empty_strided(p.shape, codes.stride()).copy_(
                        decoded[index][key]).as_strided((p.numel(),), (1,))
                    scales = opt.state[p][key + "_absmax"].cpu()
                    bound = half_gap * scales.repeat_interleave(256)[:p.numel()]
                    assert ((ours - theirs).abs() <= bound * (1 + 1e-6)).all(), key

        patch.undo()  # the CPU's tensors are the CPU's again: blocks in p's memory order
        patch.setattr(fastopt.precision, "MIN_QUANTIZED_SIZE", 256)
        loaded = ft.AdamW(on_host, **options)
        loaded.load_state_dict(saved)
        assert_encoded_again(loaded, on_host, decoded["state"],
                             lambda codes, p: codes.stride() == p.stride())

        # and back to the device, in C order again
        saved, decoded = copy.deepcopy(loaded.state_dict()), loaded.decoded_state_dict()
        device = torch_on_device(torch, patch)
        back = [laid_out(p, device) for p in on_host]
        on_device = ft.AdamW(back, **options)
        on_device.load_state_dict(saved)
        assert_encoded_again(on_device, back, decoded["state"],
                             lambda codes, p: codes.is_contiguous())


def test_fastopt_torch_steps_in_order_with_the_callers_stream():
    """On a GPU, under a side stream of the caller's (torch's are non-blocking, where
    Numba launches on the default stream): gradients written on it just before the
    step are the ones stepped, and the parameters read on it just after are the
    stepped ones, as on the default stream."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU: the simulator has no streams to order")
    import fastopt.torch as ft

    rng = np.random.default_rng(14)
    p0 = torch.tensor(rng.standard_normal((1024, 1024)), dtype=torch.float32)
    grads = [torch.tensor(rng.standard_normal((1024, 1024)), dtype=torch.float32)
             for _ in range(3)]

    def trained(stream):
        p = torch.nn.Parameter(p0.cuda())
        on_device = [g.cuda() for g in grads]
        opt = ft.AdamW([p], lr=0.01, state_dtype="int8")
        torch.cuda.synchronize()
        with torch.cuda.stream(stream):
            seen = []
            for g in on_device:
                p.grad = torch.empty_like(p)
                torch.cuda._sleep(50_000_000)  # the gradient lands late (tens of ms) on this stream
                p.grad.copy_(g)  # device to device: queued, the host goes on
                opt.step()
                seen.append(p.detach().clone())  # read on this stream, after the step
        torch.cuda.synchronize()
        return [t.cpu() for t in seen]

    for ours, theirs in zip(trained(torch.cuda.Stream()),
                            trained(torch.cuda.default_stream())):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_fastopt_torch_on_device_loads_torch_optims_state_dict_encoded(monkeypatch):
    """A float32 torch.optim.AdamW state_dict loads into 8-bit state on the device as
    on the CPU, and steps on alike."""
    torch = pytest.importorskip("torch")
    import fastopt.torch as ft

    monkeypatch.setattr(fastopt.precision, "MIN_QUANTIZED_SIZE", 256)
    rng = np.random.default_rng(12)
    p0 = torch.tensor(0.5 * rng.standard_normal((8, 40)), dtype=torch.float32)
    grads = [torch.tensor(rng.standard_normal((8, 40)), dtype=torch.float32) for _ in range(3)]
    plain = torch.nn.Parameter(p0.clone())
    theirs = torch.optim.AdamW([plain], lr=0.01)
    for g in grads[:2]:
        plain.grad = g
        theirs.step()

    def loaded(device):
        p = torch.nn.Parameter(plain.detach().clone().to(device))
        opt = ft.AdamW([p], lr=0.01, state_dtype="int8")
        opt.load_state_dict(theirs.state_dict())
        p.grad = grads[2].to(device)
        opt.step()
        return p, opt

    q, on_cpu = loaded("cpu")
    p, on_device = loaded(torch_on_device(torch, monkeypatch))
    assert on_device.state[p]["exp_avg"].dtype == torch.uint8
    assert_steps_close_in_format([p], on_device, [q], on_cpu)


def test_formats_on_device_resume_exactly(tmp_path):
    rng = np.random.default_rng(9)
    p0 = (0.5 * rng.standard_normal(5000)).astype(ml_dtypes.bfloat16)
    options = dict(lr=0.01, master_weights="remainder", state_dtype="int8")
    on_gpu = fastopt.AdamW([to_device(p0)], **options)
    resumed = fastopt.AdamW([to_device(p0)], **options)
    grads = [rng.standard_normal(5000).astype(ml_dtypes.bfloat16) for _ in range(4)]
    for g in grads[:2]:
        on_gpu.step(to_device(g))
    fastopt.save(on_gpu, tmp_path / "formats.npz")
    resumed.load(tmp_path / "formats.npz")
    for g in grads[2:]:
        on_gpu.step(to_device(g))
        resumed.step(to_device(g))
    np.testing.assert_array_equal(host(resumed.flat_params).view(np.uint16),
                                  host(on_gpu.flat_params).view(np.uint16))
    for key in ("exp_avg", "exp_avg_absmax", "exp_avg_sq", "exp_avg_sq_absmax"):
        np.testing.assert_array_equal(host(resumed.state[key]), host(on_gpu.state[key]),
                                      err_msg=key)


def test_a_0_d_bfloat16_parameter_on_device_keeps_its_shape_and_loads_a_cpu_checkpoint(
        tmp_path):
    params = {"scale": np.array(1.5, ml_dtypes.bfloat16), "w": np.ones(3, ml_dtypes.bfloat16)}
    on_cpu = fastopt.Adam(params, lr=0.1)
    on_cpu.step({name: np.ones_like(p) for name, p in params.items()})
    fastopt.save(on_cpu, tmp_path / "cpu.npz")
    on_gpu = fastopt.Adam({name: to_device(p) for name, p in params.items()}, lr=0.1)
    assert on_gpu.params["scale"].shape == ()  # to_device made it (1,), whose load failed
    on_gpu.load(tmp_path / "cpu.npz")
    np.testing.assert_array_equal(host(on_gpu.flat_params).view(np.uint16),
                                  on_cpu.flat_params.view(np.uint16))


@pytest.mark.parametrize("dtype, options", [
    (ml_dtypes.bfloat16, dict(state_dtype="int8")),
    (np.float16, dict(master_weights=None, stochastic_rounding=True))],
    ids=["bf16-master-int8", "fp16-stochastic"])
def test_training_loop_features_with_formats_on_device(dtype, options, monkeypatch):
    """Groups, clipping, loss scaling, the non-finite skip and an EMA of 16-bit
    parameters, on the device as on the CPU."""
    monkeypatch.setattr(fastopt.optim.optimizer, "MIN_QUANTIZED_SIZE", 256)
    rng = np.random.default_rng(11)
    p0 = [(0.5 * rng.standard_normal(s)).astype(dtype) for s in [(300,), (9, 7), (40,)]]

    def build(put):
        opt = fastopt.Adam([{"params": [put(p0[0]), put(p0[1])]},
                            {"params": [put(p0[2])], "lr": 0.02, "weight_decay": 0.1}],
                           lr=0.05, clip_grad_norm=4.0, clip_grad_value=0.3,
                           skip_nonfinite=True, **options)
        return opt, fastopt.EMA(opt, decay=0.8)

    (on_gpu, gpu_average), (on_cpu, cpu_average) = build(to_device), build(np.copy)
    for t in range(5):
        g = (rng.standard_normal(on_cpu.flat_params.size) * 64).astype(dtype)
        if t == 2:
            g[5] = np.inf
        before = host(on_gpu.flat_params)
        on_gpu.step(to_device(g), grad_scale=64.0)
        on_cpu.step(g, grad_scale=64.0)
        gpu_average.update()
        cpu_average.update()
        if t == 2:  # skipped on both, the device's parameters untouched
            np.testing.assert_array_equal(host(on_gpu.flat_params).view(np.uint16),
                                          before.view(np.uint16))
        assert on_gpu.last_grad_norm == pytest.approx(on_cpu.last_grad_norm, rel=1e-12,
                                                      nan_ok=True)
    assert on_gpu.skipped_steps == on_cpu.skipped_steps == 1
    assert_close_in_format(host(on_gpu.flat_params), on_cpu.flat_params, "params")
    for key, value in on_cpu.state.items():
        if isinstance(value, np.ndarray):
            assert_close_in_format(host(on_gpu.state[key]), value, key)
    with gpu_average.applied(), cpu_average.applied():
        assert_close_in_format(host(on_gpu.flat_params), on_cpu.flat_params, "average")


def test_an_ema_of_bfloat16_parameters_on_device_copies_in_and_out_as_the_cpu():
    # bias_correction=False starts the average from the parameters (a bfloat16 to float32
    # copy), and copy_to writes the average rounded into them.
    rng = np.random.default_rng(12)
    p0 = rng.standard_normal(300).astype(ml_dtypes.bfloat16)
    opts = [fastopt.SGD([put(p0)], lr=0.1) for put in (to_device, np.copy)]
    averages = [fastopt.EMA(opt, decay=0.7, bias_correction=False) for opt in opts]
    for _ in range(3):
        g = rng.standard_normal(300).astype(ml_dtypes.bfloat16)
        opts[0].step(to_device(g))
        opts[1].step(g)
        for average in averages:
            average.update()
    live = host(opts[0].flat_params)
    for average in averages:
        average.copy_to()
    assert_close_in_format(host(opts[0].flat_params), opts[1].flat_params, "average")
    assert (host(opts[0].flat_params) != live).any()
    averages[0].restore()
    np.testing.assert_array_equal(host(opts[0].flat_params).view(np.uint16), live.view(np.uint16))
