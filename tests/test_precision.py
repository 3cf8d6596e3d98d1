"""16-bit parameters, gradients and state (``fastopt.precision``): the codecs against
NumPy's and ml_dtypes' own casts, the master weights against the float64 references
and torch.optim, and every 16-bit step against the float32 step it wraps, rounded by
ml_dtypes."""

import ml_dtypes
import numba
import numpy as np
import pytest
from numba import njit

import fastopt
import reference
from cases import ALL, LAYERWISE, case_id
from conftest import assert_unchanged, gradients, initial_params, snapshot
from fastopt.kernels import codecs, cpu

f32 = np.float32
bf16 = np.dtype(ml_dtypes.bfloat16)
f16 = np.dtype(np.float16)
HALVES = {"bfloat16": bf16, "float16": f16}
# Tests that compare the kernels' bits on one thread and on two.
TWO_THREADS = pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2,
                                 reason="compares 1 and 2 threads: NUMBA_NUM_THREADS < 2")

# Every algorithm takes 16-bit parameters; all but Adafactor (whose factors move on the
# host) 16-bit state.
CASES = ALL
STATE_CASES = [(name, kwargs) for name, kwargs in ALL if name != "Adafactor"]


def bits(a):
    return np.asarray(a).view(np.uint16)


def eps1_of(name, kwargs, dtype):
    """``kwargs`` for a float32 twin or reference of ``name`` on ``dtype`` parameters:
    Adafactor's eps1 None is the machine epsilon of the parameters' dtype, as in torch
    (bfloat16's 2**-7), which theirs must be given."""
    if name != "Adafactor" or kwargs.get("eps", (None,))[0] is not None:
        return kwargs
    return {**kwargs, "eps": (float(ml_dtypes.finfo(dtype).eps), kwargs.get("eps", (None, 1e-3))[1])}


def rounded(a, dtype):
    """``a`` rounded to nearest even in ``dtype`` by ml_dtypes / NumPy."""
    with np.errstate(over="ignore", invalid="ignore"):
        return np.asarray(a, f32).astype(dtype)


# -- the codecs ---------------------------------------------------------------------

def _compiled(function, out):
    inner = njit(inline="always", error_model="numpy")(function)

    @njit(error_model="numpy")
    def each(a):
        result = np.empty(a.size, out)
        for i in range(a.size):
            result[i] = inner(a[i])
        return result
    return each


@pytest.mark.parametrize("name", sorted(codecs.CODECS))
def test_every_16_bit_pattern_loads_as_numpy_casts_it(name):
    every = np.arange(1 << 16, dtype=np.uint16)
    got = _compiled(codecs.CODECS[name][0], f32)(every)
    expected = every.view(HALVES[name]).astype(f32)
    nan = np.isnan(expected)
    np.testing.assert_array_equal(np.isnan(got), nan)
    np.testing.assert_array_equal(got[~nan].view(np.uint32), expected[~nan].view(np.uint32))


@pytest.mark.parametrize("name", sorted(codecs.CODECS))
def test_stores_round_to_nearest_even_as_numpy_casts(name):
    dtype = HALVES[name]
    rng = np.random.default_rng(0)
    with np.errstate(invalid="ignore"):  # the NaN patterns
        every = np.arange(1 << 16, dtype=np.uint16).view(dtype).astype(np.float64)
    every = every[np.isfinite(every)]
    # Random bit patterns (every exponent, NaNs and infinities among them), the exact
    # values, the ties halfway between neighbours, and a hair either side of them.
    ties = (every[:-1] + every[1:]) / 2
    values = np.concatenate([
        rng.integers(0, 1 << 32, 1 << 20, dtype=np.uint64).astype(np.uint32).view(f32),
        every.astype(f32), ties.astype(f32), np.nextafter(ties.astype(f32), f32(np.inf)),
        np.nextafter(ties.astype(f32), f32(-np.inf)),
        f32([65504, 65519.996, 65520, 65536, 3.4e38, np.inf, -np.inf, -0.0, 2.0 ** -25,
             -(2.0 ** -25), 3 * 2.0 ** -26, 1e-40])])
    got = _compiled(codecs.CODECS[name][1], np.uint16)(values)
    expected = bits(rounded(values, dtype))
    nan = np.isnan(values)
    np.testing.assert_array_equal(got[~nan], expected[~nan])
    # A NaN stays a NaN of the same sign.
    assert np.isnan(got[nan].view(dtype).astype(f32)).all()
    np.testing.assert_array_equal(got[nan] >> 15, values[nan].view(np.uint32) >> 31)


# -- master weights -----------------------------------------------------------------

@pytest.mark.parametrize("half", sorted(HALVES))
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_master_weights_follow_the_float64_reference_and_round_into_the_parameters(case, half):
    name, kwargs = case
    dtype, n = HALVES[half], 1000
    p0 = initial_params(3, n).astype(dtype)
    grads = [g.astype(dtype) for g in gradients(3, n)]
    opt = getattr(fastopt, name)([p0], **kwargs)
    assert opt.flat_params.dtype == dtype and opt.master_params.dtype == f32
    ref = getattr(reference, name)([p0.shape] if name in LAYERWISE else n,
                                   **eps1_of(name, kwargs, dtype))
    p = p0.astype(np.float64)
    for g in grads:
        opt.step(g)
        p = ref.step(p, g.astype(np.float64))
        np.testing.assert_array_equal(bits(opt.flat_params), bits(rounded(opt.master_params, dtype)))
    np.testing.assert_allclose(opt.master_params, p, rtol=2e-5, atol=2e-5)
    assert np.abs(p - p0.astype(np.float64)).max() > 1e-3  # it moved


@pytest.mark.parametrize("name, kwargs", [
    ("Adam", dict(lr=1e-2, weight_decay=0.1)), ("AdamW", dict(lr=1e-2)),
    ("SGD", dict(lr=0.05, momentum=0.9, nesterov=True)), ("RMSprop", dict(lr=1e-2, centered=True)),
    ("NAdam", dict(lr=1e-2)), ("Adagrad", dict(lr=0.05))])
def test_bfloat16_with_master_weights_matches_torch_in_float32(name, kwargs):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(5)
    w = rng.standard_normal((32, 40)).astype(bf16)
    b = rng.standard_normal(40).astype(bf16)
    opt = getattr(fastopt, name)({"w": w, "b": b}, **kwargs, clip_grad_norm=5.0)
    tw = torch.tensor(w.astype(f32), requires_grad=True)
    tb = torch.tensor(b.astype(f32), requires_grad=True)
    topt = getattr(torch.optim, name)([tw, tb], **kwargs)
    for _ in range(25):
        gw, gb = rng.standard_normal(w.shape).astype(bf16), rng.standard_normal(b.shape).astype(bf16)
        opt.step({"w": gw, "b": gb})
        tw.grad, tb.grad = torch.tensor(gw.astype(f32)), torch.tensor(gb.astype(f32))
        torch.nn.utils.clip_grad_norm_([tw, tb], 5.0)
        topt.step()
        master = np.concatenate([tw.detach().numpy().ravel(), tb.detach().numpy()])
        np.testing.assert_allclose(opt.master_params, master, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(bits(opt.params["w"]), bits(rounded(tw.detach().numpy(), bf16)))


def test_a_write_into_the_16_bit_parameters_is_taken_not_lost():
    p0 = np.linspace(-1, 1, 50).astype(bf16)
    opt = fastopt.SGD([p0], lr=0.1, momentum=0.9)
    twin = fastopt.SGD([p0.astype(f32)], lr=0.1, momentum=0.9)
    for step in range(4):
        g = np.full(50, 0.3, bf16)
        if step == 2:  # the user sets some parameters by hand between steps
            opt.params[0][10:20] = 5.0
            twin.params[0][10:20] = 5.0
        opt.step(g)
        twin.step(g.astype(f32))
    np.testing.assert_array_equal(opt.master_params[10:20], twin.flat_params[10:20])
    assert (opt.master_params[10:20] < 5.0).all() and (opt.master_params[10:20] > 4.0).all()
    np.testing.assert_array_equal(opt.master_params, twin.flat_params)


# -- 16-bit parameters without master weights, 16-bit state, float32 gradients --------

# -- master weights kept as remainders ------------------------------------------------

# Every finite bfloat16 magnitude in float64, ascending, and 2**128, where float32's
# rounding puts the infinity.
with np.errstate(invalid="ignore"):  # the NaN patterns
    _MAGNITUDES = np.unique(np.arange(1 << 15, dtype=np.uint16).view(bf16).astype(np.float64))
_MAGNITUDES = np.append(_MAGNITUDES[np.isfinite(_MAGNITUDES)], 2.0 ** 128)


def nearest_ties_away(x):
    """The bits of float32 ``x`` rounded to bfloat16, to nearest with ties away from
    zero, found among the bfloat16 values in float64."""
    x = np.asarray(x, np.float64)
    above = np.minimum(np.searchsorted(_MAGNITUDES, np.abs(x)), _MAGNITUDES.size - 1)
    below = np.maximum(above - 1, 0)
    low, high = _MAGNITUDES[below], _MAGNITUDES[above]
    magnitude = np.where(np.abs(x) - low < high - np.abs(x), low, high)
    magnitude = np.where(np.abs(x) == low, low, magnitude)
    with np.errstate(over="ignore"):
        return bits(np.copysign(np.where(magnitude == 2.0 ** 128, np.inf, magnitude), x)
                    .astype(bf16))


def test_the_remainder_codecs_round_ties_away_and_rebuild_every_float32_exactly():
    rng = np.random.default_rng(2)
    every = np.arange(1 << 16, dtype=np.uint32)
    values = np.concatenate([
        rng.integers(0, 1 << 32, 1 << 20, dtype=np.uint64).astype(np.uint32),
        every << 16, (every << 16) | 0x8000, (every << 16) | 0x7FFF, (every << 16) | 0x8001,
        (every << 16) | 0xFFFF]).view(f32)
    values = values[~np.isnan(values)]
    upper = _compiled(codecs.bfloat16_upper, np.uint16)(values)
    remainder = _compiled(codecs.bfloat16_remainder, np.uint16)(values)
    np.testing.assert_array_equal(upper, nearest_ties_away(values))
    np.testing.assert_array_equal(remainder, values.view(np.uint32) & 0xFFFF)

    @njit
    def rebuild(b, r):
        return np.array([codecs_rebuild(b[i], r[i]) for i in range(b.size)], np.float32)
    codecs_rebuild = njit(codecs.bfloat16_rebuild)
    # Every float32 but those that round up to an infinity (above 3.3961e38), which
    # rebuild as it, as an infinity written over a parameter does.
    beyond = np.abs(values.astype(np.float64)) >= 2.0 ** 128 - 2.0 ** 119  # bf16's max + 1/2 step
    assert beyond.sum() >= 4 and not np.isinf(values[beyond]).all()
    expected = np.where(beyond, np.copysign(np.inf, values), values).astype(f32)
    np.testing.assert_array_equal(rebuild(upper, remainder).view(np.uint32),
                                  expected.view(np.uint32))
    np.testing.assert_array_equal(
        fastopt.precision.rebuild_master(upper.view(bf16), remainder).view(np.uint32),
        expected.view(np.uint32))
    # A zero written over a parameter reads as a float32 that rounds to it (itself where
    # the remainder says rounded up, which nothing rounds up to); an infinity or a NaN as
    # itself, whatever the remainder left beside it.
    written = np.array([0x0000, 0x8000, 0x7F80, 0xFF80, 0x7FC0, 0xFFC0], np.uint16)
    for remainder in (0x0001, 0x7FFF, 0x8000, 0xFFFF):
        remainders = np.full(written.size, remainder, np.uint16)
        got = rebuild(written, remainders)
        np.testing.assert_array_equal(nearest_ties_away(got[:2]), written[:2])
        np.testing.assert_array_equal(got[2:4], [np.inf, -np.inf])
        assert np.isnan(got[4:]).all()
        np.testing.assert_array_equal(
            fastopt.precision.rebuild_master(written.view(bf16), remainders).view(np.uint32),
            got.view(np.uint32))


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_remainders_step_bit_identically_to_float32_master_weights(case):
    name, kwargs = case
    n, rng = 1000, np.random.default_rng(3)
    p0 = initial_params(15, n).astype(bf16)
    # Master weights a little off their bfloat16 parameters, one in ten at an exact tie,
    # where the two modes' parameters differ.
    remainders = rng.integers(0, 1 << 16, n).astype(np.uint16)
    remainders[::10] = 0x8000
    master = fastopt.precision.rebuild_master(p0, remainders)
    kept = getattr(fastopt, name)([p0.copy()], **kwargs, master_weights="float32")
    kept.flat_params[:], kept.master_params[:] = rounded(master, bf16), master
    halves = getattr(fastopt, name)([p0.copy()], **kwargs, master_weights="remainder")
    assert halves.master_params.dtype == np.uint16 and not halves.master_params.any()
    halves.flat_params[:], halves.master_params[:] = nearest_ties_away(master).view(bf16), remainders
    assert (bits(kept.flat_params) != bits(halves.flat_params)).sum() >= n // 40  # the even ties
    for g in gradients(15, n, steps=6):
        kept.step(g.astype(bf16))
        halves.step(g.astype(bf16))
        np.testing.assert_array_equal(
            fastopt.precision.rebuild_master(halves.flat_params, halves.master_params)
            .view(np.uint32), kept.master_params.view(np.uint32))
        np.testing.assert_array_equal(bits(halves.flat_params), nearest_ties_away(kept.master_params))
        np.testing.assert_array_equal(bits(kept.flat_params), bits(rounded(kept.master_params, bf16)))
        for key, value in kept.state.items():
            if isinstance(value, np.ndarray):
                np.testing.assert_array_equal(bits(halves.state[key]), bits(value), err_msg=key)
    assert not np.array_equal(kept.master_params, master)  # it moved


def test_a_write_into_parameters_with_remainders_is_taken_within_half_a_step():
    p0 = np.linspace(-1, 1, 50).astype(bf16)
    opt = fastopt.SGD([p0], lr=0.1, master_weights="remainder")
    opt.step(np.full(50, 0.001, bf16))  # a master between the parameter's steps
    assert opt.master_params.any()
    written = np.linspace(3, 4, 50).astype(bf16)
    opt.params[0][...] = written
    opt.step(np.zeros(50, bf16))
    master = fastopt.precision.rebuild_master(opt.flat_params, opt.master_params)
    np.testing.assert_array_equal(bits(opt.flat_params), bits(written))
    np.testing.assert_allclose(master, written.astype(f32), rtol=2.0 ** -8)
    opt.params[0][:5] = 0  # a zero the remainders cannot round to reads as zero
    opt.step(np.zeros(50, bf16))
    np.testing.assert_array_equal(opt.flat_params[:5].astype(f32), 0)
    # An infinity, beside remainders that say rounded up or not, stays an infinity (the
    # pair of a rounded-up one stood for a finite 3.39e38), as with float32 masters.
    opt.master_params[5:10], opt.master_params[10:15] = 0x8001, 0x7FFF
    opt.params[0][5:15] = np.inf
    opt.step(np.ones(50, bf16))
    np.testing.assert_array_equal(opt.flat_params[5:15].astype(f32), np.inf)
    np.testing.assert_array_equal(
        fastopt.precision.rebuild_master(opt.flat_params, opt.master_params)[5:15], np.inf)


@pytest.mark.parametrize("half", sorted(HALVES))
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_16_bit_parameters_without_master_round_every_step(case, half):
    name, kwargs = case
    dtype, n = HALVES[half], 300
    p0 = initial_params(4, n).astype(dtype)
    opt = getattr(fastopt, name)([p0], **kwargs, master_weights=None)
    assert opt.master_params is None
    # fastopt's float32 step, its parameters rounded by ml_dtypes after every step.
    twin = getattr(fastopt, name)([p0.astype(f32)], **eps1_of(name, kwargs, dtype))
    for g in gradients(4, n, steps=10):
        opt.step(g.astype(dtype))
        twin.step(g.astype(dtype).astype(f32))
        twin.flat_params[...] = rounded(twin.flat_params, dtype)
        np.testing.assert_array_equal(bits(opt.flat_params), bits(rounded(twin.flat_params, dtype)))


@pytest.mark.parametrize("case", STATE_CASES, ids=case_id)
def test_bfloat16_state_rounds_every_buffer_every_step(case):
    """Each step from the second on, against fastopt's float32 step from the same
    (decoded) state, rounded by ml_dtypes."""
    name, kwargs = case
    n = 300
    p0 = initial_params(6, n)
    opt = getattr(fastopt, name)([p0], **kwargs, state_dtype="bfloat16")
    twin = getattr(fastopt, name)([p0], **kwargs)
    for step, g in enumerate(gradients(6, n, steps=10)):
        if step:  # the twin starts where fastopt's 16-bit run stands
            twin.flat_params[...] = opt.flat_params
            for key, value in opt.state.items():
                if isinstance(value, np.ndarray):
                    twin.state[key][...] = value.astype(f32)
        opt.step(g)
        twin.step(g)
        if step:
            if name == "LAMB":  # its second pass steps by the moments the first one rounded
                np.testing.assert_allclose(opt.flat_params, twin.flat_params, rtol=0, atol=1e-4)
            else:
                np.testing.assert_array_equal(opt.flat_params, twin.flat_params)
            for key, value in opt.state.items():
                if isinstance(value, np.ndarray):
                    assert value.dtype == bf16, key
                    np.testing.assert_array_equal(bits(value),
                                                  bits(rounded(twin.state[key], bf16)), key)


def test_state_dtype_per_buffer_and_float32_gradients_for_bfloat16_parameters():
    p0 = initial_params(7, 500).astype(bf16)
    opt = fastopt.Adam([p0], lr=1e-2, grad_dtype="float32",
                       state_dtype={"exp_avg_sq": "bfloat16"})
    assert opt.flat_grads.dtype == f32
    twin = fastopt.Adam([p0.astype(f32)], lr=1e-2)
    for g in gradients(7, 500, steps=5):
        opt.step(g)
        twin.step(g)
        twin.state["exp_avg_sq"][...] = rounded(twin.state["exp_avg_sq"], bf16)
    assert opt.state["exp_avg"].dtype == f32 and opt.state["exp_avg_sq"].dtype == bf16
    np.testing.assert_array_equal(opt.master_params, twin.flat_params)
    np.testing.assert_array_equal(opt.state["exp_avg"], twin.state["exp_avg"])


@TWO_THREADS
def test_the_parallel_loop_gives_the_bits_of_the_serial_one():
    n = 3 * cpu.PARALLEL_MIN_SIZE + 17
    results = []
    for threads in (1, 2):
        numba.set_num_threads(threads)
        try:
            opt = fastopt.Adam([initial_params(8, n).astype(bf16)], lr=1e-2,
                               state_dtype="bfloat16")
            for g in gradients(8, n, steps=3):
                opt.step(g.astype(bf16))
        finally:
            numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
        results.append((bits(opt.flat_params), opt.master_params.copy(),
                        bits(opt.state["exp_avg"])))
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)


# -- what the step does around the kernel ---------------------------------------------

def test_clipping_measures_the_16_bit_gradients_in_float64():
    rng = np.random.default_rng(9)
    g = (rng.standard_normal(4000) * 3).astype(bf16)
    opt = fastopt.SGD([np.zeros(4000, bf16)], lr=1.0, clip_grad_norm=1.0)
    opt.step(g)
    norm = np.sqrt(np.sum(g.astype(np.float64) ** 2))
    assert opt.last_grad_norm == pytest.approx(norm, rel=1e-12)
    coefficient = 1.0 / (norm + 1e-6)
    np.testing.assert_allclose(opt.master_params, -g.astype(np.float64) * coefficient, rtol=1e-6)


def test_a_skipped_step_leaves_16_bit_buffers_and_master_bit_identical():
    opt = fastopt.Adam([initial_params(10, 100).astype(f16)], lr=1e-2, skip_nonfinite=True,
                       state_dtype="bfloat16")
    opt.step(np.ones(100, f16))
    before, master = snapshot_bits(opt), opt.master_params.copy()
    g = np.ones(100, f16)
    g[7] = np.inf
    opt.step(g)
    assert opt.skipped_steps == 1
    assert snapshot_bits(opt) == before
    np.testing.assert_array_equal(opt.master_params, master)


def snapshot_bits(opt):
    arrays = {"params": opt.flat_params, **{k: v for k, v in opt.state.items()
                                             if isinstance(v, np.ndarray)}}
    return {k: bits(v).tobytes() for k, v in arrays.items()}


def test_ema_of_bfloat16_parameters_averages_in_float32():
    opt = fastopt.SGD([initial_params(11, 64).astype(bf16)], lr=0.1)
    ema = fastopt.EMA(opt, decay=0.9)
    expected = np.zeros(64)
    for g in gradients(11, 64, steps=5):
        opt.step(g.astype(bf16))
        ema.update()
        expected = 0.9 * expected + 0.1 * opt.flat_params.astype(np.float64)
    assert ema.shadow.dtype == f32
    np.testing.assert_allclose(ema.shadow, expected, rtol=1e-6, atol=1e-7)
    live = bits(opt.flat_params).copy()
    with ema.applied():
        np.testing.assert_array_equal(
            bits(opt.flat_params), bits(rounded(ema.shadow * f32(ema.correction()), bf16)))
    np.testing.assert_array_equal(bits(opt.flat_params), live)


# -- checkpoints ----------------------------------------------------------------------

def test_a_checkpoint_resumes_16_bit_parameters_master_and_state_bitwise(tmp_path):
    def make():
        return fastopt.AdamW({"w": initial_params(12, 600).astype(bf16)}, lr=1e-2,
                             state_dtype={"exp_avg": "bfloat16"})
    grads = [g.astype(bf16) for g in gradients(12, 600, steps=6)]
    straight = make()
    for g in grads:
        straight.step(g)
    first = make()
    for g in grads[:3]:
        first.step(g)
    fastopt.save(first, tmp_path / "ck.npz")
    resumed = make()
    resumed.load(tmp_path / "ck.npz")
    in_memory = make()
    in_memory.load_state_dict(first.state_dict())
    rebuilt = fastopt.load(tmp_path / "ck.npz")  # with the formats of the file
    assert rebuilt.flat_params.dtype == bf16 and rebuilt.state["exp_avg"].dtype == bf16
    for opt in (resumed, in_memory, rebuilt):
        for g in grads[3:]:
            opt.step(g)
        assert snapshot_bits(opt) == snapshot_bits(straight)
        np.testing.assert_array_equal(opt.master_params, straight.master_params)


def test_a_checkpoint_resumes_remainders_bitwise_and_refuses_float32_master_weights(tmp_path):
    def make(master_weights="remainder"):
        return fastopt.Lion({"w": initial_params(16, 600).astype(bf16)}, lr=1e-3,
                            master_weights=master_weights)
    grads = [g.astype(bf16) for g in gradients(16, 600, steps=6)]
    straight, first = make(), make()
    for g in grads:
        straight.step(g)
    for g in grads[:3]:
        first.step(g)
    fastopt.save(first, tmp_path / "ck.npz")
    resumed, rebuilt = make(), fastopt.load(tmp_path / "ck.npz")
    resumed.load(tmp_path / "ck.npz")
    assert rebuilt.master_params.dtype == np.uint16
    for opt in (resumed, rebuilt):
        for g in grads[3:]:
            opt.step(g)
        assert snapshot_bits(opt) == snapshot_bits(straight)
        np.testing.assert_array_equal(opt.master_params, straight.master_params)
    other = make("float32")
    before = snapshot_bits(other)
    with pytest.raises(ValueError, match="formats differ.*master_weights 'remainder'"):
        other.load(tmp_path / "ck.npz")
    assert snapshot_bits(other) == before


@pytest.mark.parametrize("other", [dict(state_dtype="float32"), dict(master_weights=None)])
def test_a_checkpoint_of_other_formats_is_refused_and_changes_nothing(tmp_path, other):
    saved = fastopt.Adam([initial_params(13, 50).astype(bf16)], state_dtype="bfloat16")
    saved.step(np.ones(50, bf16))
    fastopt.save(saved, tmp_path / "ck.npz")
    opt = fastopt.Adam([initial_params(13, 50).astype(bf16)], **{"state_dtype": "bfloat16",
                                                                 **other})
    opt.step(np.ones(50, bf16))
    before = snapshot_bits(opt)
    with pytest.raises(ValueError, match="formats differ"):
        opt.load(tmp_path / "ck.npz")
    assert snapshot_bits(opt) == before


def test_a_float32_checkpoint_does_not_load_into_bfloat16_parameters(tmp_path):
    saved = fastopt.Adam([initial_params(14, 50)])
    saved.step(np.ones(50, f32))
    fastopt.save(saved, tmp_path / "ck.npz")
    opt = fastopt.Adam([initial_params(14, 50).astype(bf16)], master_weights=None)
    with pytest.raises(ValueError, match="formats differ.*'params' is float32"):
        opt.load(tmp_path / "ck.npz")


# -- bad input ------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, error, match", [
    (dict(master_weights="fp32"), ValueError, "master_weights must be one of"),
    (dict(master_weights=True), ValueError, "master_weights must be one of"),
    (dict(state_dtype="int4"), ValueError, "state_dtype must be one of"),
    (dict(state_dtype="float16"), ValueError, "state_dtype must be one of"),
    # NumPy dtypes compare equal to their names: not names, all the same
    (dict(state_dtype=np.dtype(bf16)), ValueError, "state_dtype must be one of"),
    (dict(state_dtype={"exp_avg": np.dtype(f32)}), ValueError, "state_dtype must be one of"),
    (dict(master_weights=np.dtype(f32)), ValueError, "master_weights must be one of"),
    (dict(grad_dtype=np.dtype(f32)), ValueError, "grad_dtype must be None or one of"),
    (dict(state_dtype={"exp_avg": "bfloat16", "momentum": "bfloat16"}), ValueError,
     r"names \['momentum'\], which Adam does not keep"),
    (dict(grad_dtype="float64"), ValueError, "grad_dtype must be None or one of"),
    (dict(grad_dtype=np.float32), ValueError, "grad_dtype must be None or one of"),
])
def test_unknown_formats_are_refused(kwargs, error, match):
    with pytest.raises(error, match=match):
        fastopt.Adam([np.zeros(3, bf16)], **kwargs)


def test_adafactors_state_is_named_by_its_buffers_not_its_rules_arguments():
    params = {"w": np.ones((8, 4), f32), "b": np.ones(4, f32)}
    opt = fastopt.Adafactor(params, state_dtype={"row_var": "float32"})
    opt.step({"w": np.ones((8, 4), f32), "b": np.ones(4, f32)})
    assert {"row_var", "col_var", "variance"} <= opt.state.keys()
    assert opt.snapshot().storage["state_dtype"].keys() == {"row_var", "col_var", "variance"}
    with pytest.raises(ValueError, match=r"names \['second'\], which Adafactor does not "
                                         r"keep; its state is \['row_var', 'col_var'"):
        fastopt.Adafactor(params, state_dtype={"second": "float32"})


def test_master_weights_for_float32_parameters_are_refused():
    with pytest.raises(ValueError, match="float32 already"):
        fastopt.Adam([np.zeros(3, f32)], master_weights="float32")
    with pytest.raises(ValueError, match="float32 already"):
        fastopt.Adam([np.zeros(3, f32)], master_weights="remainder")
    with pytest.raises(ValueError, match="float16 parameters need 'float32'"):
        fastopt.Adam([np.zeros(3, f16)], master_weights="remainder")
    assert fastopt.Adam([np.zeros(3, f32)], master_weights="auto").master_params is None


def test_adafactor_refuses_16_bit_state():
    for state_dtype in ("bfloat16", "int8"):
        with pytest.raises(ValueError, match="Adafactor keeps its state in float32 only"):
            fastopt.Adafactor([np.zeros((4, 3), bf16)], state_dtype=state_dtype)


@pytest.mark.parametrize("master_weights", ["float32", "remainder"])
@pytest.mark.parametrize("grads", ["bfloat16", "float32"])
def test_adafactor_on_bfloat16_matrices_keeps_torchs_float32_master_weights(master_weights, grads):
    """The factored path (row and column sums, the latter a kernel of its own that reads
    16-bit gradients) and the vectors' path, against torch.optim.Adafactor in float32
    on the same upcast gradients."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(9)
    shapes = [(48, 40), (3, 20, 16), (30,)]
    p0 = [(0.1 * rng.standard_normal(s)).astype(bf16) for s in shapes]
    opt = fastopt.Adafactor([p.copy() for p in p0], lr=1e-2, weight_decay=0.1,
                            master_weights=master_weights, grad_dtype=grads, clip_grad_norm=0.5)
    theirs = [torch.tensor(p.astype(f32), requires_grad=True) for p in p0]
    topt = torch.optim.Adafactor(theirs, lr=1e-2, weight_decay=0.1, eps=(2.0 ** -7, 1e-3))
    for _ in range(8):
        gs = [(0.01 * rng.standard_normal(s)).astype(bf16) for s in shapes]
        opt.step([g.astype(HALVES.get(grads, f32)) for g in gs])
        for t, g in zip(theirs, gs):
            t.grad = torch.tensor(g.astype(f32))
        torch.nn.utils.clip_grad_norm_(theirs, 0.5)
        topt.step()
        master = (opt.master_params if master_weights == "float32" else
                  fastopt.precision.rebuild_master(opt.flat_params, opt.master_params))
        expected = np.concatenate([t.detach().numpy().ravel() for t in theirs])
        np.testing.assert_allclose(master, expected, rtol=1e-5, atol=1e-6)
    assert np.abs(expected - np.concatenate([p.astype(f32).ravel() for p in p0])).max() > 1e-2


def test_gradients_of_another_dtype_are_refused_and_change_nothing():
    opt = fastopt.Adam({"w": np.ones(4, bf16)})
    opt.step({"w": np.ones(4, bf16)})
    before = snapshot(opt)
    with pytest.raises(TypeError, match=r"grads\['w'\] must be bfloat16, got float32"):
        opt.step({"w": np.ones(4, f32)})
    with pytest.raises(TypeError, match="grads must be bfloat16, got float16"):
        opt.step(np.ones(4, f16))
    assert_unchanged(opt, before)


# -- stochastic rounding ----------------------------------------------------------------

def sgd_to(value, n, **options):
    """bfloat16 parameters at 1.0 stepped once by SGD to ``value`` (in float32), stored
    without master weights."""
    opt = fastopt.SGD([np.ones(n, bf16)], lr=1.0, master_weights=None, **options)
    opt.step(np.full(n, 1.0 - value, bf16).astype(bf16))
    return opt


def test_stochastic_rounding_is_unbiased_where_rounding_to_nearest_is_not():
    n = 100_000
    exact = 1.0 + 2.0 ** -9  # a quarter of the way from bf16's 1.0 to its next number
    assert float(np.float64(np.float32(1.0 - exact).astype(bf16))) == 1.0 - exact
    stochastic = sgd_to(exact, n, stochastic_rounding=True, seed=3).flat_params
    assert abs(stochastic.astype(np.float64).mean() - exact) < 3e-5
    assert set(np.unique(stochastic.astype(f32))) == {f32(1.0), f32(1.0078125)}
    nearest = sgd_to(exact, n).flat_params  # the control: every element rounds down
    assert abs(nearest.astype(np.float64).mean() - exact) > 1e-3


def test_stochastic_rounding_draws_new_bits_at_every_step():
    # A quarter of a bfloat16 step up at each of 40 steps: each element rounds up at
    # Binomial(40, 1/4) of them, from 1.0 (2**-7 a step) to at most 1.3125. With the
    # same bits at every step, each element went up at none or at all of them.
    n, steps = 2000, 40
    opt = fastopt.SGD([np.ones(n, bf16)], lr=1.0, master_weights=None,
                      stochastic_rounding=True, seed=3)
    for _ in range(steps):
        opt.step([np.full(n, -2.0 ** -9, bf16)])
    ups = (opt.flat_params.astype(np.float64) - 1.0) / 2.0 ** -7
    assert abs(ups.mean() - steps / 4) < 0.3  # 5 standard deviations of the mean
    assert 6.0 < ups.var() < 9.0  # 40 * 1/4 * 3/4 = 7.5


def test_stochastic_rounding_draws_other_bits_for_each_buffer():
    # The momentum 1 + 2**-9 rounds up with probability 1/4, the parameter 3 - (1 +
    # 2**-9) with 3/4: both up with 3/16 where their bits are independent, and with 1/4
    # where one element's buffers shared its bits.
    n = 20000
    opt = fastopt.SGD([np.full(n, 3.0, bf16)], lr=1.0, momentum=0.9, master_weights=None,
                      state_dtype="bfloat16", grad_dtype="float32",
                      stochastic_rounding=True, seed=5)
    opt.step([np.full(n, 1 + 2.0 ** -9, f32)])
    p_up = opt.flat_params.astype(np.float64) == 2.0
    momentum_up = opt.state["momentum_buffer"].astype(np.float64) == 1.0078125
    assert abs(p_up.mean() - 0.75) < 0.015 and abs(momentum_up.mean() - 0.25) < 0.015
    assert abs((p_up & momentum_up).mean() - 3 / 16) < 0.015  # 5 standard deviations


# Every finite float16 magnitude in float64, ascending, and 65536 for the infinity.
with np.errstate(invalid="ignore"):  # the NaN patterns
    _HALF_MAGNITUDES = np.unique(np.arange(1 << 15, dtype=np.uint16).view(f16).astype(np.float64))
_HALF_MAGNITUDES = np.append(_HALF_MAGNITUDES[np.isfinite(_HALF_MAGNITUDES)], 65536.0)


def test_float16_stochastic_rounding_is_unbiased_over_every_random_draw():
    rng = np.random.default_rng(8)
    normal = rng.uniform(2.0 ** -14, 65504, 300).astype(f32)
    subnormal = rng.uniform(0, 2.0 ** -14, 300).astype(f32)
    values = np.concatenate([normal, -normal, subnormal, -subnormal,
                             f32([65504, 65510, 65535.9, 2.0 ** -24, 3 * 2.0 ** -26, 0.0, 1.0])])
    store = njit(inline="always", error_model="numpy")(codecs.float16_store_stochastic)

    @njit(error_model="numpy")
    def every_rounding(x):  # over every value of the 16 random bits that count
        return np.array([store(x, np.uint32(r)) for r in range(1 << 16)], np.uint16)

    for x in values:
        got = every_rounding(x).view(f16).astype(np.float64)
        assert (np.sign(got[got != 0]) == np.sign(x)).all()
        magnitudes = np.where(np.isinf(got), 65536.0, np.abs(got))
        m = abs(np.float64(x))
        low = _HALF_MAGNITUDES[np.searchsorted(_HALF_MAGNITUDES, m, "right") - 1]
        high = low if low == m else _HALF_MAGNITUDES[np.searchsorted(_HALF_MAGNITUDES, m)]
        assert set(np.unique(magnitudes)) <= {low, high}, x
        # The mean over every draw is x itself: exactly where float16 drops 13 bits (each
        # 13-bit draw comes 8 times), to 2**-16 of a step below its normal numbers.
        tolerance = 0.0 if m >= 2.0 ** -14 else (high - low) * 2.0 ** -16
        assert abs(magnitudes.mean() - m) <= tolerance, x


def test_adafactor_rounds_each_element_of_a_matrix_on_its_own_random_bits():
    """The rows of a matrix share Adafactor's column factor, not their random bits: on
    shared bits every row would round alike, and the mean over 500 draws would miss. A
    vector longer than a chunk (SEGMENT_CHUNK) draws on past its first chunk."""
    shapes, exact = [(200, 500), (40_000,)], 1.0 + 2.0 ** -9  # a quarter of bf16's step

    def stepped(**options):  # one step of exactly -lr * sign(g) = +2**-9 everywhere
        opt = fastopt.Adafactor([np.ones(s, bf16) for s in shapes], lr=2.0 ** -9,
                                master_weights=None, **options)
        opt.step([np.full(s, -0.5, bf16) for s in shapes])
        return [p.astype(np.float64) for p in opt.params]

    matrix, vector = stepped(stochastic_rounding=True, seed=4)
    assert abs(matrix.mean() - exact) < 3e-5 and abs(vector.mean() - exact) < 6e-5
    assert set(np.unique(matrix)) == set(np.unique(vector)) == {1.0, 1.0078125}
    assert (matrix == matrix[0]).all(axis=1).sum() == 1  # no row rounds as row 0
    chunk = fastopt._backend.SEGMENT_CHUNK
    assert not np.array_equal(vector[:chunk], vector[chunk:2 * chunk])
    assert abs(stepped()[0].mean() - exact) > 1e-3  # the control: every element rounds down


def bfloat16_bounds(v):
    """The bfloat16 numbers just below and just above each float32 of ``v``, give or take
    1e-6 of it and 1e-8 (so that a value within rounding of another, or of 0, may round
    from either)."""
    v = np.asarray(v, f32)
    slack = f32(1e-6) * np.abs(v) + f32(1e-8)
    lows, highs = [], []
    for x in (v - slack, v + slack):
        toward_zero = (x.view(np.uint32) & np.uint32(0xFFFF0000)).view(f32)
        away = np.where(toward_zero == x, toward_zero,
                        (toward_zero.view(np.uint32) + np.uint32(0x10000)).view(f32))
        lows.append(np.minimum(toward_zero, away))
        highs.append(np.maximum(toward_zero, away))
    return np.minimum(*lows), np.maximum(*highs)


def test_adafactor_without_master_weights_rounds_torchs_step_stochastically():
    """Each step from the bfloat16 parameters, against torch.optim.Adafactor's float32
    step from the same values (its factors follow the gradients alone): every element
    lands on a bfloat16 neighbour of torch's, and about a quarter on the farther one,
    which rounding to nearest never picks."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(21)
    shapes = [(64, 300), (3, 20, 16), (50,)]
    ours = [(0.1 * rng.standard_normal(s)).astype(bf16) for s in shapes]
    opt = fastopt.Adafactor(ours, lr=1e-2, weight_decay=0.1, master_weights=None,
                            stochastic_rounding=True, seed=2)
    theirs = [torch.zeros(s, requires_grad=True) for s in shapes]
    topt = torch.optim.Adafactor(theirs, lr=1e-2, weight_decay=0.1, eps=(2.0 ** -7, 1e-3))
    farther = []
    for _ in range(5):
        gs = [(0.01 * rng.standard_normal(s)).astype(bf16) for s in shapes]
        for t, p, g in zip(theirs, opt.params, gs):
            t.data = torch.tensor(p.astype(f32))
            t.grad = torch.tensor(g.astype(f32))
        topt.step()
        opt.step(gs)
        for t, p in zip(theirs, opt.params):
            expected = t.detach().numpy()
            low, high = bfloat16_bounds(expected)
            got = p.astype(f32)
            assert ((low <= got) & (got <= high)).all()
            inexact = expected.astype(bf16).astype(f32) != expected
            farther.append((got != expected.astype(bf16).astype(f32))[inexact])
    share = np.concatenate(farther).mean()
    assert 0.15 < share < 0.35, share


@TWO_THREADS
def test_adafactor_rounds_stochastically_alike_for_any_threads_groups_and_front():
    shapes = [(300, 257), (4, 5, 6), (70,)]
    rng = np.random.default_rng(22)
    p0 = [(0.1 * rng.standard_normal(s)).astype(bf16) for s in shapes]
    grads = [[(0.01 * rng.standard_normal(s)).astype(bf16) for s in shapes] for _ in range(3)]
    options = dict(lr=1e-2, master_weights=None, stochastic_rounding=True, seed=7)
    runs = []
    for threads, split in ((1, False), (2, False), (2, True)):
        numba.set_num_threads(threads)
        try:
            params = [{"params": p0[:1]}, {"params": p0[1:]}] if split else p0
            opt = fastopt.Adafactor(params, **options)
            for g in grads:
                opt.step([g[:1], g[1:]] if split else g)
        finally:
            numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
        runs.append(bits(opt.flat_params))
    torch = pytest.importorskip("torch")
    import fastopt.torch as ft

    def tensor(a):
        return torch.from_numpy(bits(a).astype(np.int16)).view(torch.bfloat16)

    params = [torch.nn.Parameter(tensor(p)) for p in p0]
    opt = ft.Adafactor(params, **options)
    for g in grads:
        for p, gi in zip(params, g):
            p.grad = tensor(gi)
        opt.step()
    runs.append(np.concatenate([bits(p.detach().view(torch.int16).numpy()).ravel()
                                for p in params]))
    for run in runs[1:]:
        np.testing.assert_array_equal(runs[0], run)
    assert not np.array_equal(runs[0], np.concatenate([bits(p).ravel() for p in p0]))


def test_float16_parameters_without_master_weights_round_stochastically_unbiased():
    n, exact = 100_000, 1.0 + 2.0 ** -12  # a quarter of the way from float16's 1.0 up
    opt = fastopt.SGD([np.ones(n, f16)], lr=1.0, master_weights=None, stochastic_rounding=True)
    opt.step(np.full(n, 1.0 - exact, f16))
    assert abs(opt.flat_params.astype(np.float64).mean() - exact) < 6e-6  # 4.5 sigma; nearest: 2.4e-4
    assert set(np.unique(opt.flat_params)) == {np.float16(1.0), np.float16(1.0009765625)}


@TWO_THREADS
def test_stochastic_rounding_gives_the_same_bits_for_any_threads_groups_and_front():
    n = 3 * cpu.PARALLEL_MIN_SIZE + 17
    p0 = initial_params(15, n).astype(bf16)
    grads = [g.astype(bf16) for g in gradients(15, n, steps=4)]
    options = dict(lr=1e-3, master_weights=None, state_dtype="bfloat16",
                   stochastic_rounding=True, seed=11)
    runs = []
    for threads, split in ((1, False), (2, False), (2, True)):
        numba.set_num_threads(threads)
        try:
            params = ([{"params": [p0[:1000]]}, {"params": [p0[1000:]]}] if split else [p0])
            opt = fastopt.Adam(params, **options)
            for g in grads:
                opt.step(g)
        finally:
            numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
        runs.append((bits(opt.flat_params), bits(opt.state["exp_avg"])))
    torch = pytest.importorskip("torch")
    import fastopt.torch as ft
    p = torch.nn.Parameter(torch.from_numpy(bits(p0).astype(np.int16)).view(torch.bfloat16))
    opt = ft.Adam([p], **options)
    for g in grads:
        p.grad = torch.from_numpy(bits(g).astype(np.int16)).view(torch.bfloat16)
        opt.step()
    runs.append((p.detach().view(torch.int16).numpy().view(np.uint16),
                 opt.state[p]["exp_avg"].view(torch.int16).numpy().view(np.uint16)))
    for run in runs[1:]:
        for a, b in zip(runs[0], run):
            np.testing.assert_array_equal(a, b)
    other_seed = fastopt.Adam([p0], **dict(options, seed=12))
    other_seed.step(grads[0])
    first = fastopt.Adam([p0], **options)
    first.step(grads[0])
    assert not np.array_equal(bits(other_seed.flat_params), bits(first.flat_params))


def test_a_checkpoint_resumes_stochastic_rounding_bitwise_and_refuses_another(tmp_path):
    def make(**options):
        return fastopt.Lion([initial_params(16, 300).astype(bf16)], lr=1e-3,
                            master_weights=None, **{"stochastic_rounding": True, "seed": 5,
                                                    **options})
    grads = [g.astype(bf16) for g in gradients(16, 300, steps=6)]
    straight, first = make(), make()
    for g in grads:
        straight.step(g)
    for g in grads[:3]:
        first.step(g)
    fastopt.save(first, tmp_path / "ck.npz")
    resumed = fastopt.load(tmp_path / "ck.npz")
    for g in grads[3:]:
        resumed.step(g)
    assert snapshot_bits(resumed) == snapshot_bits(straight)
    for other in (dict(seed=6), dict(stochastic_rounding=False)):
        with pytest.raises(ValueError, match="formats differ.*(stochastic_rounding|seed)"):
            make(**other).load(tmp_path / "ck.npz")


@pytest.mark.parametrize("params, kwargs, error, match", [
    (np.ones(4, bf16), {}, ValueError, "nothing to round"),
    (np.ones(4, f32), {}, ValueError, "nothing to round"),
    (np.ones(4, bf16), dict(master_weights=None, seed=-1), ValueError, "seed must be in"),
    (np.ones(4, bf16), dict(master_weights=None, seed=1.0), TypeError, "seed must be an int"),
])
def test_stochastic_rounding_refuses_what_it_cannot_round(params, kwargs, error, match):
    with pytest.raises(error, match=match):
        fastopt.Adam([params], stochastic_rounding=True, **kwargs)


def test_stochastic_rounding_must_be_a_flag():
    with pytest.raises(TypeError, match="stochastic_rounding must be True or False"):
        fastopt.Adam([np.ones(4, bf16)], master_weights=None, stochastic_rounding=1)


def test_the_dynamic_loss_scaler_steps_float16_gradients_and_backs_off_on_overflow():
    rng = np.random.default_rng(17)
    p0 = rng.standard_normal(64).astype(f16)
    opt = fastopt.Adam([p0], lr=1e-2)
    twin = fastopt.Adam([p0.astype(f32)], lr=1e-2)
    scaler = fastopt.DynamicLossScaler(init_scale=2.0 ** 10)
    g = rng.standard_normal(64).astype(f16)
    scaled = (g.astype(f32) * scaler.scale).astype(f16)  # exact: a power of two
    assert scaler.step(opt, scaled)
    twin.step(g.astype(f32))
    np.testing.assert_array_equal(opt.master_params, twin.flat_params)
    scaler.update()
    master = opt.master_params.copy()
    overflowed = rounded(g.astype(f32) * 2.0 ** 20, f16)  # beyond float16: infinities
    assert np.isinf(overflowed).any()
    assert not scaler.step(opt, overflowed)
    scaler.update()
    assert scaler.scale == 2.0 ** 9 and opt.skipped_steps == 1
    np.testing.assert_array_equal(opt.master_params, master)


def test_fastopt_load_rebuilds_the_storage_options_before_any_state_exists(tmp_path):
    opt = fastopt.Adam([np.ones(8, bf16)], master_weights=None, state_dtype="bfloat16",
                       grad_dtype="float32", stochastic_rounding=True, seed=9)
    fastopt.save(opt, tmp_path / "fresh.npz")  # no step yet: no state buffer in the file
    rebuilt = fastopt.load(tmp_path / "fresh.npz")
    assert rebuilt._storage.record() == opt._storage.record()
    assert rebuilt.flat_grads.dtype == f32 and rebuilt.master_params is None
    g = np.full(8, 0.25, f32)
    opt.step(g)
    rebuilt.step(g)
    assert snapshot_bits(rebuilt) == snapshot_bits(opt)


def test_a_replaced_state_buffer_of_another_dtype_or_size_is_refused_before_any_write():
    opt = fastopt.Adam([np.ones(8, f32)], state_dtype="bfloat16")
    opt.step(np.ones(8, f32))
    for wrong in (opt.state["exp_avg"].astype(f32), np.zeros(7, bf16)):
        opt.state["exp_avg"] = wrong
        before = opt.flat_params.copy(), bits(opt.state["exp_avg_sq"]).copy(), wrong.copy()
        with pytest.raises(TypeError, match=r"state\['exp_avg'\] must be a C-contiguous "
                                            "bfloat16 array of shape \\(8,\\)"):
            opt.step(np.ones(8, f32))
        after = opt.flat_params, bits(opt.state["exp_avg_sq"]), wrong
        for a, b in zip(before, after):
            np.testing.assert_array_equal(a, b)
    opt.state["exp_avg"] = np.zeros(8, bf16)  # the right kind is taken
    opt.step(np.ones(8, f32))
    assert opt.state["exp_avg"].astype(f32).any()
