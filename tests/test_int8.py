"""Block-wise 8-bit state (``state_dtype="int8"``): the encoding against a float64
argmin over the dynamic map, the first step's codes against an independent quantizer,
and the steps against float32 Adam and against bitsandbytes' Adam8bit, measured the same
way in the same test."""

import dataclasses

import numpy as np
import pytest
from numba import njit

import fastopt
from conftest import gradients, initial_params
from fastopt import precision
from fastopt.kernels import codecs, cpu

f32 = np.float32
BLOCK = codecs.BLOCK
MAPS = {"signed8": codecs.SIGNED_MAP, "unsigned8": codecs.UNSIGNED_MAP}


def element_encoder(name):
    """The kernels' element-wise encoding in map ``name`` (what the last block of a
    tensor and CUDA run): ``encode(values, inverse)``, the codes of ``values * inverse``
    (in an unsigned map a positive value's never scaled to 0: ``codecs.scaled_positive``)."""
    buckets = codecs.QUANTIZED[name][1]
    bucket, code, positive = (njit(inline="always", error_model="numpy")(f) for f in (
        codecs.dynamic_bucket, codecs.dynamic_code, codecs.scaled_positive))

    unsigned = name in codecs.UNSIGNED

    @njit(error_model="numpy")
    def encode(values, inverse):
        scaled = [positive(values[i] * inverse, values[i]) if unsigned else values[i] * inverse
                  for i in range(values.size)]
        return np.array([code(x, buckets[bucket(x)]) for x in scaled], np.uint8)
    return encode


def nearest_codes(x, values):
    """The index of the value nearest to each float32 ``x`` in float64, and where two are
    equally near; but a positive ``x`` nearest to an unsigned map's 0 takes its smallest
    positive value (a second moment stored as 0 would divide its first by eps)."""
    x, values = np.asarray(x, np.float64), values.astype(np.float64)
    distances = np.abs(x[:, None] - values[None, :])
    best = distances.argmin(axis=1)
    ties = (distances == distances.min(axis=1, keepdims=True)).sum(axis=1) > 1
    if values.min() >= 0:
        best = np.where((best == 0) & (x > 0), 1, best)
    return best, ties


def test_the_dynamic_maps_hold_256_values_in_seven_decades():
    for name, values in MAPS.items():
        assert values.dtype == f32 and values.size == 256 and np.unique(values).size == 256
        assert values.max() == 1 and (values.min() > -1 if name == "signed8" else values.min() == 0)
        positive = values[values > 0]
        # decade d holds 2**d values (signed) or 2**(d + 1), evenly spaced between 0.1 and 1 of it
        for decade in range(7):
            inside = positive[(positive >= 10.0 ** (decade - 7)) & (positive < 10.0 ** (decade - 6))]
            count = 2 ** decade if name == "signed8" else 2 ** (decade + 1)
            assert inside.size == count
            np.testing.assert_allclose(np.diff(inside.astype(np.float64)),
                                       0.9 * 10.0 ** (decade - 6) / count, rtol=1e-5)


def test_the_dynamic_maps_are_bitsandbytes_maps():
    functional = pytest.importorskip("bitsandbytes.functional")
    for signed, name in ((True, "signed8"), (False, "unsigned8")):
        theirs = functional.create_dynamic_map(signed=signed).numpy()
        np.testing.assert_allclose(MAPS[name], theirs, rtol=2e-7, atol=0)


@pytest.mark.parametrize("encode_block", [cpu.encode_block_by_lookups,
                                          cpu.encode_block_in_steps])
@pytest.mark.parametrize("name", sorted(MAPS))
def test_a_whole_block_encodes_as_its_elements_do(encode_block, name):
    # Both ways the CPU drivers encode a whole block (which one runs depends on the CPU)
    # against the element-wise encoding that the last block of a tensor and CUDA run.
    buckets, unsigned = codecs.QUANTIZED[name][1], name in codecs.UNSIGNED
    by_elements = element_encoder(name)

    @njit(error_model="numpy")
    def by_blocks(values, inverse):
        codes, entries = np.empty(values.size, np.uint8), np.empty(BLOCK, np.int32)
        for b in range(values.size // BLOCK):
            encode_block(values[b * BLOCK:(b + 1) * BLOCK], inverse, buckets,
                         codes[b * BLOCK:(b + 1) * BLOCK], entries, unsigned)
        return codes

    rng = np.random.default_rng(5)
    values = (rng.standard_normal(64 * BLOCK) * 10.0 ** rng.uniform(-12, 1, 64 * BLOCK))
    values = values.astype(f32)
    values[:8] = [np.nan, -np.nan, np.inf, -np.inf, 0.0, -0.0, 1e-40, -3.0]
    if name == "unsigned8":
        values = np.abs(values)
    assert len(np.unique(by_elements(values, f32(1)))) > 200  # most codes are met
    for inverse in (f32(1), f32(0.37), f32(0)):
        np.testing.assert_array_equal(by_blocks(values, inverse), by_elements(values, inverse))


@pytest.mark.parametrize("name", sorted(MAPS))
def test_the_encoding_is_the_nearest_value_but_at_exact_ties(name):
    values = MAPS[name]
    middles = ((values[:-1].astype(np.float64) + values[1:]) / 2).astype(f32)
    rng = np.random.default_rng(1)
    x = np.concatenate([
        values, middles, np.nextafter(middles, f32(2)), np.nextafter(middles, f32(-2)),
        rng.uniform(values.min(), 1, 200_000).astype(f32),
        (rng.standard_normal(100_000) * 10.0 ** rng.uniform(-9, 0, 100_000)).astype(f32),
        f32([0.0, -0.0, 1e-30, 1.0, -1e-30])])
    if name == "unsigned8":
        x = np.abs(x)
    x = np.clip(x, values.min(), 1).astype(f32)
    best, ties = nearest_codes(x, values)
    got = element_encoder(name)(x, f32(1))
    np.testing.assert_array_equal(got[~ties], best[~ties])
    assert ties.sum() < 600  # the exact midpoints, and zeros near a negative zero
    if name == "unsigned8":  # every positive value below the first midpoint
        assert ((best == 1) & (x < (values[1] / 2))).sum() > 1000
    # at a tie, one of the two nearest
    np.testing.assert_array_less(np.abs(values[got[ties]].astype(np.float64) - x[ties])
                                 - np.abs(values[best[ties]].astype(np.float64) - x[ties]), 1e-30)


def reference_codes(new, shapes, fmt):
    """Codes and absmax of float32 state ``new`` (flat over tensors of ``shapes``), in
    blocks of 256 from each tensor's start, by the float64 argmin of ``new * (1 /
    absmax)`` (float32) over the map; None for tensors under 4096 elements."""
    codes, absmax, ties, start = [], [], [], 0
    for shape in shapes:
        size = int(np.prod(shape))
        part = new[start:start + size]
        start += size
        if size < 4096:
            continue
        for at in range(0, size, 256):
            block = part[at:at + 256]
            top = np.abs(block).max()
            normalized = block * (f32(1) / top) if top > 0 else np.zeros_like(block)
            best, tie = nearest_codes(normalized, MAPS[fmt])
            codes.append(best)
            ties.append(tie)
            absmax.append(top)
    return np.concatenate(codes), np.array(absmax, f32), np.concatenate(ties)


def test_the_first_steps_codes_are_the_reference_quantizers():
    shapes = [(1024, 32), (100,), (70, 80)]
    n = sum(int(np.prod(s)) for s in shapes)
    p, g = initial_params(21, n), gradients(21, n, steps=1)[0]
    g[-224:] *= f32(0.01)  # a short last block, below the block before it in the scratch
    opt = fastopt.Adam([a.reshape(s) for a, s in zip(np.split(p, np.cumsum([32768, 100])), shapes)],
                       lr=1e-3, state_dtype="int8")
    opt.step(g)
    exp_avg = f32(0.1) * g  # the rule's first moving averages, in float32
    exp_avg_sq = (f32(0.001) * g) * g
    quantized = np.ones(n, bool)
    quantized[32768:32868] = False  # the 100-element tensor keeps float32 state
    for name, new, fmt in (("exp_avg", exp_avg, "signed8"), ("exp_avg_sq", exp_avg_sq, "unsigned8")):
        codes, absmax, ties = reference_codes(new, shapes, fmt)
        np.testing.assert_array_equal(opt.state[name + "_absmax"][np.r_[0:128, 129:151]], absmax)
        got = opt.state[name][quantized]
        assert ties.sum() < 5
        np.testing.assert_array_equal(got[~ties], codes[~ties])
        np.testing.assert_array_equal(opt.state[name + "_small"], new[32768:32868])


def _steps_against_float32(opt_8bit, opt_32, shapes, steps, seed):
    """The mean absolute error of each step of ``opt_8bit`` against ``opt_32`` started
    from the same parameters (resynchronised to the 8-bit ones after every step)."""
    rng = np.random.default_rng(seed)
    errors = []
    for _ in range(steps):
        grads = [(0.01 * rng.standard_normal(s)).astype(f32) for s in shapes]
        opt_8bit.step(grads), opt_32.step(grads)
        errors.append(np.abs(opt_8bit.flat_params - opt_32.flat_params).mean())
        opt_32.flat_params[:] = opt_8bit.flat_params
    return errors


@pytest.mark.parametrize("name", ["Adam", "AdamW"])
def test_8_bit_adam_errs_no_more_than_bitsandbytes_and_follows_it(name):
    torch = pytest.importorskip("torch")
    bnb = pytest.importorskip("bitsandbytes")
    shapes = [(1024, 32), (1024, 1024), (1024, 4097)]
    rng = np.random.default_rng(22)
    params = [(0.1 * rng.standard_normal(s)).astype(f32) for s in shapes]
    kwargs = dict(lr=1e-3, weight_decay=0.01 if name == "AdamW" else 0.0)
    ours = getattr(fastopt, name)([p.copy() for p in params], **kwargs, state_dtype="int8")
    twin = getattr(fastopt, name)([p.copy() for p in params], **kwargs)
    errors = _steps_against_float32(ours, twin, shapes, 50, seed=23)

    theirs = [torch.nn.Parameter(torch.tensor(p)) for p in params]
    reference = [torch.nn.Parameter(torch.tensor(p)) for p in params]
    bnb_opt = getattr(bnb.optim, f"{name}8bit")(theirs, **kwargs)
    torch_opt = getattr(torch.optim, name)(reference, **kwargs)
    rng, their_errors = np.random.default_rng(23), []
    for step in range(50):
        for p, q, s in zip(theirs, reference, shapes):
            g = torch.tensor((0.01 * rng.standard_normal(s)).astype(f32))
            p.grad, q.grad = g, g.clone()
        bnb_opt.step(), torch_opt.step()
        flat = torch.cat([p.detach().reshape(-1) for p in theirs])
        their_errors.append((flat - torch.cat([q.detach().reshape(-1) for q in reference]))
                            .abs().mean().item())
        with torch.no_grad():
            for p, q in zip(theirs, reference):
                q.copy_(p)
        if step == 1:  # after two steps from the same parameters, the two agree
            assert np.abs(flat.numpy() - _after_two_steps(name, params, kwargs, shapes)).mean() < 1e-6
    assert np.mean(errors) <= np.mean(their_errors) * 1.02
    assert np.mean(errors) > 1e-7  # 8 bits do cost something: the test can fail


def _after_two_steps(name, params, kwargs, shapes):
    opt = getattr(fastopt, name)([p.copy() for p in params], **kwargs, state_dtype="int8")
    rng = np.random.default_rng(23)
    for _ in range(2):
        opt.step([(0.01 * rng.standard_normal(s)).astype(f32) for s in shapes])
    return opt.flat_params


@pytest.mark.parametrize("name, kwargs", [
    ("SGD", dict(lr=0.05, momentum=0.9)), ("RMSprop", dict(lr=1e-3, momentum=0.5)),
    ("RMSprop", dict(lr=1e-3, centered=True, momentum=0.5,
                     state_dtype={"momentum_buffer": "int8"})),
    ("Adadelta", {}), ("NAdam", {}), ("RAdam", {}), ("Adamax", {}), ("Lion", dict(lr=1e-4)),
    ("Adam", dict(amsgrad=True)), ("Adan", dict(state_dtype={"exp_avg": "int8", "exp_avg_sq": "int8",
                                                             "exp_avg_diff": "int8"}))])
def test_every_moving_average_steps_in_8_bits_close_to_float32(name, kwargs):
    shapes = [(64, 96), (50,)]
    rng = np.random.default_rng(24)
    params = [(0.1 * rng.standard_normal(s)).astype(f32) for s in shapes]
    options = {"state_dtype": "int8", **kwargs}
    ours = getattr(fastopt, name)([p.copy() for p in params], **options)
    twin = getattr(fastopt, name)([p.copy() for p in params],
                                  **{k: v for k, v in options.items() if k != "state_dtype"})
    errors = _steps_against_float32(ours, twin, shapes, 20, seed=25)
    moved = np.abs(ours.flat_params - np.concatenate([p.ravel() for p in params])).mean()
    assert np.mean(errors) < 0.05 * moved / 20 and moved > 0
    assert any(v.dtype == np.uint8 for v in ours.state.values() if hasattr(v, "dtype"))


@pytest.mark.parametrize("name, kwargs", [
    ("Adam", {}), ("AdamW", {}), ("Adam", dict(amsgrad=True)), ("NAdam", {})])
def test_a_small_gradient_after_a_large_one_does_not_step_by_lr_over_eps(name, kwargs):
    # A gradient between about 3e-7 and 4e-4 of its block's largest has a first moment
    # that the signed map holds but a second moment below half the unsigned map's
    # smallest value: stored as 0 (the nearest), a zero gradient next moved the element
    # by lr * m / eps (213 with lr 5e-3, where float32 state moved it by 0.0034). A
    # positive value of an unsigned buffer is stored as its smallest value instead.
    rng = np.random.default_rng(27)
    w = rng.standard_normal(4096).astype(f32)
    g = rng.standard_normal(4096).astype(f32)
    g[::256] = 10.0  # each block's largest, and elements far below it
    g[1::256] = 1e-3
    options = {"state_dtype": "int8", **kwargs}
    moved = {}
    for state in ("int8", "float32"):
        opt = getattr(fastopt, name)([w.copy()], lr=5e-3, **{
            k: v for k, v in options.items() if state == "int8" or k != "state_dtype"})
        opt.step([g])
        before = opt.flat_params.copy()
        opt.step([np.zeros_like(g)])
        moved[state] = np.abs(opt.flat_params - before)
    assert moved["float32"][1::256].min() > 0  # the small gradients' elements move
    assert moved["int8"].max() <= 2 * moved["float32"].max()


@pytest.mark.parametrize("flush", [True, False])
def test_a_positive_second_moment_that_scales_to_0_is_not_stored_as_0(monkeypatch, flush):
    # Beside a gradient of 1e19 in its block, a second moment of 1e-13 is below 1e-48 of
    # the block's absmax: times 1 / absmax it underflowed (or was flushed) to 0 and was
    # stored as 0, so that where its first moment held up (in a block of other decades)
    # a zero gradient stepped by it over eps: 927 where float32 state stepped 9e-4.
    monkeypatch.setattr(cpu, "FLUSH_DENORMALS", flush)
    size = 16 * BLOCK + 100  # whole blocks and a short last one
    g = np.zeros(size, f32)
    g[::BLOCK] = 1e19
    opt = fastopt.Adam([np.zeros(size, f32)], lr=1e-3, eps=1e-8 if flush else 1e-12,
                       state_dtype="int8")
    opt.step([g])
    small = np.zeros(size, f32)
    small[1::BLOCK] = 1e-5
    opt.step([small])
    codes, absmax = opt.state["exp_avg_sq"], opt.state["exp_avg_sq_absmax"]
    beta2 = 0.999
    exact = beta2 * (1 - beta2) * g.astype(np.float64) ** 2 + (1 - beta2) * small.astype(
        np.float64) ** 2
    scale = np.repeat(absmax.astype(np.float64), BLOCK)[:size]
    assert (exact[1::BLOCK] / scale[1::BLOCK] < 1.4e-45).all()  # below float32's range
    expected, ties = nearest_codes(exact / scale, codecs.UNSIGNED_MAP)
    np.testing.assert_array_equal(codes[1::BLOCK], 1)
    np.testing.assert_array_equal(codes[~ties], expected[~ties])
    np.testing.assert_array_equal(precision.quantize(exact.astype(f32), "unsigned8")[0], codes)


def test_a_block_whose_absmax_is_beyond_2_to_the_126_keeps_its_values():
    # 1 / absmax is subnormal there, which the CPU kernels flush to zero: every code was
    # 0, so SGD's momentum after a gradient of 1e38 decoded as 0, and Adamax stepped a
    # parameter to -inf where float32 state moved it by 0.0015.
    rng = np.random.default_rng(28)
    g = (rng.uniform(-1, 1, 4096) * 10.0 ** rng.uniform(37.9, 38.5, 16).repeat(256)).astype(f32)
    tops = np.abs(g).reshape(16, 256).max(axis=1)
    assert (tops > 2.0 ** 126).all() and np.isfinite(g).all()
    opt = fastopt.SGD([np.zeros(4096, f32)], lr=1e-3, momentum=0.9, state_dtype="int8")
    opt.step([g])
    codes, absmax = opt.state["momentum_buffer"], opt.state["momentum_buffer_absmax"]
    np.testing.assert_array_equal(absmax, tops)
    host_codes, _ = precision.quantize(g, "signed8")
    np.testing.assert_array_equal(codes, host_codes)  # the host re-encodes as the kernels
    decoded = precision.dequantize(codes, absmax, "signed8").astype(np.float64)
    # within half the map's widest gap (0.9 / 64 near 1) of each block's absmax
    assert (np.abs(decoded - g).reshape(16, 256).max(axis=1) <= 0.008 * tops).all()
    moved = {}
    for state in ("int8", "float32"):
        adamax = fastopt.Adamax([np.zeros(4096, f32)], lr=1e-3, state_dtype=state)
        adamax.step([g])
        adamax.step([np.zeros_like(g)])
        moved[state] = np.abs(adamax.flat_params)
    assert np.isfinite(moved["int8"]).all() and moved["int8"].max() < 2 * moved["float32"].max()


def test_a_block_whose_absmax_is_subnormal_keeps_its_values(monkeypatch):
    # Where subnormals are kept (CUDA; on the CPU Lion, LAMB, LARS, Rprop, a small eps,
    # or the flush off), 1 / absmax overflowed
    # to inf: every value took the code of +-1 and a zero that of the NaN 0 * inf.
    monkeypatch.setattr(cpu, "FLUSH_DENORMALS", False)
    rng = np.random.default_rng(29)
    g = (rng.uniform(-1, 1, 4096) * 10.0 ** rng.uniform(-44, -38.5, 16).repeat(256)).astype(f32)
    g[::5] = 0.0
    tops = np.abs(g).reshape(16, 256).max(axis=1)
    assert (tops < 2.0 ** -126).all() and (tops > 0).all()
    opt = fastopt.SGD([np.zeros(4096, f32)], lr=1e-3, momentum=0.9, state_dtype="int8")
    opt.step([g])
    codes, absmax = opt.state["momentum_buffer"], opt.state["momentum_buffer_absmax"]
    np.testing.assert_array_equal(absmax, tops)
    expected, ties = nearest_codes(g.astype(np.float64) / tops.astype(np.float64).repeat(256),
                                   codecs.SIGNED_MAP)
    assert (codes != expected)[~ties].mean() < 0.01  # but within a float32 step of a midpoint
    np.testing.assert_array_equal(codes, precision.quantize(g, "signed8")[0])
    decoded = precision.dequantize(codes, absmax, "signed8").astype(np.float64)
    np.testing.assert_array_equal(decoded[::5], 0.0)
    assert (np.abs(decoded - g).reshape(16, 256).max(axis=1) <= 0.008 * tops).all()


def test_a_checkpoint_resumes_8_bit_state_bitwise(tmp_path):
    def make():
        return fastopt.AdamW({"w": initial_params(26, 8192).reshape(64, 128),
                              "b": initial_params(27, 64)}, lr=1e-2, state_dtype="int8")
    grads = [{"w": g[:8192].reshape(64, 128), "b": g[8192:]}
             for g in gradients(26, 8192 + 64, steps=6)]
    straight, first = make(), make()
    for g in grads:
        straight.step(g)
    for g in grads[:3]:
        first.step(g)
    fastopt.save(first, tmp_path / "ck.npz")
    for opt in (make(), None):
        if opt is None:
            opt = fastopt.load(tmp_path / "ck.npz")
        else:
            opt.load(tmp_path / "ck.npz")
        for g in grads[3:]:
            opt.step(g)
        np.testing.assert_array_equal(opt.flat_params, straight.flat_params)
        for key, value in straight.state.items():
            if hasattr(value, "dtype"):
                np.testing.assert_array_equal(opt.state[key], value, err_msg=key)
    with pytest.raises(ValueError, match="formats differ"):
        fastopt.AdamW({"w": np.zeros((64, 128), f32), "b": np.zeros(64, f32)}).load(
            tmp_path / "ck.npz")


def test_a_skipped_step_leaves_codes_and_absmax_bit_identical():
    opt = fastopt.Adam([initial_params(28, 5000)], state_dtype="int8", skip_nonfinite=True)
    opt.step(gradients(28, 5000, steps=1)[0])
    before = {k: v.copy() for k, v in opt.state.items() if hasattr(v, "dtype")}
    bad = gradients(29, 5000, steps=1)[0]
    bad[17] = np.nan
    opt.step(bad)
    assert opt.skipped_steps == 1
    for key, value in before.items():
        np.testing.assert_array_equal(opt.state[key], value)


@pytest.mark.parametrize("name, kwargs, match", [
    ("Adagrad", dict(state_dtype="int8"), "Adagrad's sum is not one: it keeps none"),
    ("Adan", dict(state_dtype="int8"), "Adan's prev_grad is not one: ask it of exp_avg"),
    ("LAMB", dict(state_dtype="int8"), "LAMB steps in passes that sum over whole tensors"),
    ("SWATS", dict(state_dtype="int8"), r"SWATS steps in passes .*\(map and reduce\)"),
    ("Adam", dict(state_dtype={"exp_avg": "int4"}), "state_dtype must be one of"),
])
def test_8_bit_state_is_refused_where_it_cannot_be_kept(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        getattr(fastopt, name)([np.zeros(5000, f32)], **kwargs)


def test_caution_is_refused_with_8_bit_state_before_any_write():
    with pytest.raises(ValueError, match="caution=True takes two passes"):
        fastopt.Adam([np.ones(5000, f32)], state_dtype="int8", caution=True)
    opt = fastopt.Adam([np.ones(5000, f32)], state_dtype="int8")
    opt.param_groups[0]["caution"] = True  # as a schedule may set it
    with pytest.raises(ValueError, match="caution=True takes two passes"):
        opt.step(np.ones(5000, f32))
    assert (opt.flat_params == 1).all() and opt.state["step"] == 0
    with pytest.raises(ValueError, match="caution=True takes two passes"):
        opt.snapshot()  # nor saved
    opt.param_groups[0]["caution"] = False
    taken = opt.snapshot()
    cautious = dataclasses.replace(taken, groups=[{**taken.groups[0], "caution": True}])
    with pytest.raises(ValueError, match="caution=True takes two passes"):
        opt.restore(cautious)
    assert opt.param_groups[0]["caution"] is False


def test_centered_rmsprop_is_refused_with_8_bit_averages_before_any_write():
    # Its variance, square_avg - grad_avg**2 of two buffers rounded apart, came out
    # negative where a gradient's mean outweighs its noise: 421 of 4096 parameters NaN
    # after 300 steps of mean 0.5-1 and noise 0.03 (bitsandbytes refuses it too).
    for state_dtype in ("int8", {"grad_avg": "int8"}, {"square_avg": "int8"}):
        with pytest.raises(ValueError, match="centered=True subtracts grad_avg squared"):
            fastopt.RMSprop([np.ones(5000, f32)], centered=True, state_dtype=state_dtype)
    opt = fastopt.RMSprop([np.ones(5000, f32)], state_dtype="int8")
    opt.param_groups[0]["centered"] = True
    with pytest.raises(ValueError, match="centered=True subtracts grad_avg squared"):
        opt.step(np.ones(5000, f32))
    assert (opt.flat_params == 1).all() and opt.state["step"] == 0
    kept = fastopt.RMSprop([np.ones(5000, f32)], centered=True, momentum=0.9,
                           state_dtype={"momentum_buffer": "int8"})
    kept.step(np.ones(5000, f32))
    assert kept.state["momentum_buffer"].dtype == np.uint8 and (kept.flat_params < 1).all()


def test_bfloat16_parameters_with_remainders_and_8_bit_state_step_as_with_float32_master():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    p0 = initial_params(30, 6000).astype(ml_dtypes.bfloat16)
    kept = fastopt.AdamW([p0.copy()], lr=1e-2, state_dtype="int8", master_weights="float32")
    halves = fastopt.AdamW([p0.copy()], lr=1e-2, state_dtype="int8", master_weights="remainder")
    for g in gradients(30, 6000, steps=5):
        kept.step(g.astype(ml_dtypes.bfloat16))
        halves.step(g.astype(ml_dtypes.bfloat16))
    master = fastopt.precision.rebuild_master(halves.flat_params, halves.master_params)
    np.testing.assert_array_equal(master.view(np.uint32), kept.master_params.view(np.uint32))
    for key, value in kept.state.items():
        if hasattr(value, "dtype"):
            np.testing.assert_array_equal(halves.state[key], value, err_msg=key)
    assert not np.array_equal(kept.master_params, p0.astype(f32))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_a_nan_or_infinity_makes_its_blocks_absmax_nan_and_stays_out_of_the_others(bad):
    """An infinity made its block's absmax infinite, which encoded the infinity itself
    as inf * (1 / inf), a NaN, in code 0: +inf read back as -inf, beside NaN."""
    opt = fastopt.Adam([np.ones(5000, f32)], state_dtype="int8")
    g = np.full(5000, 0.5, f32)
    g[300] = bad  # in block 1
    opt.step(g)
    for name in ("exp_avg", "exp_avg_sq"):
        absmax = opt.state[name + "_absmax"]
        assert np.isnan(absmax[1]) and np.isfinite(np.delete(absmax, 1)).all()
        decoded = fastopt.precision.dequantize(opt.state[name], absmax, "signed8" if
                                               name == "exp_avg" else "unsigned8")
        assert np.isnan(decoded[256:512]).all()
        _, host_absmax = fastopt.precision.quantize(np.where(np.arange(5000) == 300, bad,
                                                             0.5).astype(f32), "signed8")
        assert np.isnan(host_absmax[1])  # the host's encoding, as the kernels'
    opt.step(np.full(5000, 0.5, f32))  # the block's state decodes as NaN, and so steps
    assert np.isnan(opt.flat_params[256:512]).all()
    assert np.isfinite(np.delete(opt.flat_params, np.s_[256:512])).all()


def test_dequantize_decodes_the_state_within_half_a_step_of_the_map():
    g = gradients(31, 8192, steps=1)[0]
    opt = fastopt.Adam([np.zeros((64, 128), f32)], state_dtype="int8")
    opt.step([g.reshape(64, 128)])
    decoded = fastopt.precision.dequantize(opt.state["exp_avg"], opt.state["exp_avg_absmax"],
                                           "signed8")
    exact = (f32(0.1) * g).astype(np.float64)
    scale = np.repeat(opt.state["exp_avg_absmax"], 256).astype(np.float64)
    gaps = np.diff(MAPS["signed8"].astype(np.float64)).max()  # the widest, near 1
    assert np.all(np.abs(decoded - exact) <= scale * gaps / 2 * 1.0001)
    assert np.abs(decoded - exact).max() > 0
    codes, absmax = fastopt.precision.quantize(exact.astype(f32), "signed8")
    np.testing.assert_array_equal(absmax, opt.state["exp_avg_absmax"])
    agree = codes == opt.state["exp_avg"]
    assert agree.mean() > 0.9999  # but at exact ties


@pytest.mark.parametrize("name", sorted(MAPS))
def test_the_host_encodes_exact_ties_toward_zero_as_the_kernels_do(name):
    # The float32 values halfway between two of the map's values take the one nearer
    # zero, on the host (loads re-encode state with it) as in the kernels' encoding.
    values = MAPS[name].astype(np.float64)
    middles = (values[:-1] + values[1:]) / 2
    exact = middles.astype(f32) == middles
    ties = middles[exact].astype(f32)
    toward_zero = np.where(np.abs(values[:-1]) < np.abs(values[1:]), values[:-1],
                           values[1:])[exact]
    if name == "unsigned8":  # but a positive value is never stored as 0
        toward_zero[toward_zero == 0] = values[1]
    assert ties.size > 100 and (name == "unsigned8" or (ties < 0).sum() > 50)
    block = np.concatenate([[f32(1)], ties])  # absmax 1: each value is its own
    codes, absmax = precision.quantize(block, name)
    assert absmax[0] == 1
    np.testing.assert_array_equal(values[codes[1:]], toward_zero)
    np.testing.assert_array_equal(element_encoder(name)(ties, f32(1)), codes[1:])


def test_a_replaced_absmax_of_another_dtype_is_refused_before_any_write():
    opt = fastopt.Adam([np.ones(5000, f32)], state_dtype="int8")
    opt.step(np.ones(5000, f32))
    opt.state["exp_avg_absmax"] = opt.state["exp_avg_absmax"].astype(np.float64)
    before = opt.flat_params.copy()
    with pytest.raises(TypeError, match=r"state\['exp_avg_absmax'\] must be a C-contiguous float32"):
        opt.step(np.ones(5000, f32))
    np.testing.assert_array_equal(opt.flat_params, before)


def test_a_replaced_absmax_with_negative_scales_is_refused_before_any_write():
    """A negative scale would flip the signs of its block's values (as restore and
    fastopt.torch's load_state_dict refuse it)."""
    opt = fastopt.Adam([np.ones(5000, f32)], state_dtype="int8")
    opt.step(np.ones(5000, f32))
    flipped = opt.state["exp_avg_absmax"].copy()
    flipped[3] *= -1
    opt.state["exp_avg_absmax"] = flipped
    before = opt.flat_params.copy()
    with pytest.raises(ValueError, match=r"state\['exp_avg_absmax'\] holds negative block"):
        opt.step()
    np.testing.assert_array_equal(opt.flat_params, before)
    opt.state["exp_avg_absmax"] = np.abs(flipped)
    opt.step()


def test_quantizing_decoded_values_to_fit_gives_back_their_codes():
    """What a fastopt.torch checkpoint of DTensor 8-bit state holds (decoded values)
    loads back into its codes: with ``fit``, a block whose largest magnitude is negative
    gets the scale at which it is the map's most negative value (-0.993), not -1. The
    plain encoding, the kernels' and bitsandbytes', shrinks such a block's scale.
    """
    rng = np.random.default_rng(0)
    values = rng.standard_normal(256 * 64).astype(np.float32) * 1e-3
    codes, absmax = precision.quantize(values, "signed8")
    decoded = precision.dequantize(codes, absmax, "signed8")
    blocks = values.reshape(-1, 256)
    negative = blocks.min(axis=1) < -blocks.max(axis=1)  # the largest magnitude
    assert 0 < negative.sum() < negative.size
    again, scales = precision.quantize(decoded, "signed8", fit=True)
    np.testing.assert_array_equal(again, codes)
    np.testing.assert_allclose(scales, absmax, rtol=2 ** -23)
    _, shrunk = precision.quantize(decoded, "signed8")
    np.testing.assert_array_equal(shrunk[~negative], absmax[~negative])
    assert (shrunk[negative] < absmax[negative]).all()


def test_quantizing_to_fit_a_value_near_float32s_largest_keeps_a_finite_scale():
    # -3.4e38 / 0.993 overflows: the scale was NaN, and so every value of its block.
    values = np.linspace(-1, 1, 300).astype(f32)
    values[5] = -3.4e38
    codes, absmax = precision.quantize(values, "signed8", fit=True)
    assert absmax[0] == np.finfo(f32).max
    decoded = precision.dequantize(codes, absmax, "signed8").astype(np.float64)
    gap = np.diff(codecs.SIGNED_MAP.astype(np.float64)).max()
    assert codes[5] == 0  # the map's most negative value, the nearest to -0.9992
    np.testing.assert_array_less(np.abs(decoded[:BLOCK] - values[:BLOCK]), absmax[0] * gap)
    np.testing.assert_array_equal(absmax[1], 1.0)


@pytest.mark.parametrize("options", [dict(state_dtype="int8"),
                                     dict(state_dtype="bfloat16", stochastic_rounding=True)])
def test_a_group_whose_pass_keeps_no_state_steps_as_float32_does(options):
    """SGD without momentum keeps no state: a group of it beside one with momentum steps
    as float32 SGD, whatever the state's format (its pass once got the 8-bit or the
    stochastic arguments it does not take, a TypeError)."""
    rng = np.random.default_rng(3)
    p0 = [rng.standard_normal(5000).astype(f32) for _ in range(2)]
    grads = [[[rng.standard_normal(5000).astype(f32)] for _ in range(2)] for _ in range(3)]

    def run(**storage):
        opt = fastopt.SGD([{"params": [p0[0].copy()]},
                           {"params": [p0[1].copy()], "momentum": 0.9}], lr=0.1, **storage)
        for g in grads:
            opt.step(g)
        return opt

    ours, plain = run(**options), run()
    np.testing.assert_array_equal(ours.params[0][0], plain.params[0][0])
    assert not np.array_equal(ours.params[0][0], p0[0])
    assert ours.state["momentum_buffer"].dtype != f32  # the momentum group's is the format's


@pytest.mark.parametrize("empty", [[], [np.zeros((0, 4), f32)]])
@pytest.mark.parametrize("where", [0, 1])
def test_an_empty_group_beside_others_leaves_their_8_bit_steps_alone(empty, where):
    """An empty group starts where the group after it does: it once took that group's
    blocks and stepped them with its own lr, then the group stepped them again."""
    rng = np.random.default_rng(29)
    p0 = [rng.standard_normal(n).astype(f32) for n in (5000, 300)]
    g = [rng.standard_normal(n).astype(f32) for n in (5000, 300)]
    groups = [{"params": [p0[0].copy()], "lr": 1e-3}, {"params": [p0[1].copy()], "lr": 1e-2}]
    groups.insert(where, {"params": list(empty), "lr": 1.0})
    grads = [[x] for x in g]
    grads.insert(where, list(empty))
    opt = fastopt.SGD(groups, lr=1.0, momentum=0.9, state_dtype="int8")
    opt.step(grads)
    stepped = [opt.params[i][0] for i in range(3) if i != where]
    for p, p_0, g_0, lr in zip(stepped, p0, g, (1e-3, 1e-2)):
        # the first step of SGD with momentum is p - lr * g (the buffer starts at g)
        np.testing.assert_allclose(p, p_0.astype(np.float64) - lr * g_0.astype(np.float64),
                                   rtol=0, atol=1e-6)


def test_a_finite_gradient_whose_second_moment_overflows_is_stepped_and_makes_its_block_nan():
    """What the README says of it: skip_nonfinite sees a finite gradient, float32 state
    holds the infinity in one element (as torch), 8 bits spread it over the block."""
    g = np.full(5000, 1e-3, f32)
    g[300] = 1e21  # in block 1; (1 - beta2) * g**2 overflows float32
    stepped = {}
    for state in ("float32", "int8"):
        opt = fastopt.Adam([np.ones(5000, f32)], state_dtype=state, skip_nonfinite=True)
        opt.step(g)
        opt.step(g)
        assert opt.skipped_steps == 0
        stepped[state] = opt.flat_params
    assert np.isfinite(stepped["float32"]).all()
    assert np.isnan(stepped["int8"][256:512]).all()
    assert np.isfinite(np.delete(stepped["int8"], np.s_[256:512])).all()
