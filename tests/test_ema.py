"""fastopt.EMA against a float64 reference: the update, bias correction, copy_to/restore,
the structures it tracks, its errors, and the serial and parallel kernels."""

import copy
import pickle

import numpy as np
import pytest

import fastopt
from conftest import gradients, initial_params
from fastopt.kernels import cpu

f32 = np.float32
RTOL = 1e-6


def assert_close(actual, expected, err_msg=""):
    """Equal to float32 rounding: each update rounds, and an average that cancels to near
    zero keeps the absolute error of its larger terms."""
    np.testing.assert_allclose(actual, expected, rtol=RTOL, err_msg=err_msg,
                               atol=RTOL * np.nanmax(np.abs(expected)))


def reference(history, decay, bias_correction):
    """``(v_t, the average copy_to writes)`` in float64. ``history[0]`` holds the
    parameters when the EMA was made, ``history[t]`` those seen by update number t;
    ``decay`` is one number, or update t's at ``decay[t - 1]``."""
    decays = np.broadcast_to(np.asarray(decay, np.float64), (len(history) - 1,))
    v = np.zeros(history[0].shape) if bias_correction else history[0].astype(np.float64)
    for theta, beta in zip(history[1:], decays, strict=True):
        v = beta * v + (1.0 - beta) * theta.astype(np.float64)
    return v, (v / (1.0 - np.prod(decays)) if bias_correction else v)


def bits(arrays):
    """The bit patterns of arrays, so that -0.0 and NaN payloads count as well."""
    return [np.array(a, f32).view(np.uint32) for a in arrays]


def assert_same_bits(arrays, expected):
    for a, b in zip(bits(arrays), expected, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("decay", [0.9, 0.999])
@pytest.mark.parametrize("bias_correction", [True, False])
def test_update_and_copy_to_match_the_reference(decay, bias_correction):
    n = 37
    opt = fastopt.SGD([initial_params(3, n)], lr=0.1, momentum=0.5)
    ema = fastopt.EMA(opt, decay=decay, bias_correction=bias_correction)
    history = [opt.flat_params.copy()]
    for t, g in enumerate(gradients(3, n, 20), start=1):
        opt.step(g)
        ema.update()
        history.append(opt.flat_params.copy())
        v, averaged = reference(history, decay, bias_correction)
        assert ema.updates == t
        assert_close(ema.shadow, v, err_msg=f"update {t}")
        with ema.applied():
            assert_close(opt.flat_params, averaged, err_msg=f"update {t}")
            assert_close(opt.params[0], averaged)
        np.testing.assert_array_equal(opt.flat_params, history[-1])
    assert not np.allclose(averaged, history[-1], rtol=1e-3)  # the average lags the parameters


@pytest.mark.parametrize("decay", [0.9, 0.999])
def test_bias_correction_removes_the_pull_towards_zero(decay):
    c = 3.0 * initial_params(5, 64)
    constant = c.copy()
    corrected = fastopt.EMA([constant], decay=decay)
    plain = fastopt.EMA([c.copy()], decay=decay, bias_correction=False)
    for t in range(1, 11):
        corrected.update()
        plain.update()
        # The raw zero-started average holds (1 - decay**t) c: far below c.
        assert_close(corrected.shadow, (1.0 - decay ** t) * c)
        assert np.all(np.abs(corrected.shadow - c) > 0.3 * np.abs(c))
        assert_close(plain.shadow, c)  # v0 = c, never biased
        if t in (1, 2, 10):
            with corrected.applied():
                assert_close(constant, c, err_msg=f"update {t}")
    np.testing.assert_allclose(fastopt.EMA([c.copy()], decay=decay).shadow, 0.0)


@pytest.mark.parametrize("bias_correction", [True, False])
def test_a_long_average_errs_no_more_than_torchs_lerp(bias_correction):
    """20,000 updates at decay 0.9999 of slowly moving parameters: each update rounds,
    and ``decay * v + (1 - decay) * x`` rounded the same way update after update (5.6e-4
    off on averages of 3-4), where torch's ``v.lerp_(x, 1 - decay)`` (its
    ``get_ema_multi_avg_fn``, timm's ModelEmaV3) stays near 1e-5."""
    torch = pytest.importorskip("torch")
    n, decay, updates = 2048, 0.9999, 20_000
    rng = np.random.default_rng(1)
    opt = fastopt.SGD([rng.standard_normal(n).astype(f32)], lr=0.0)
    ema = fastopt.EMA(opt, decay=decay, bias_correction=bias_correction)
    theta = torch.from_numpy(opt.flat_params)  # shares memory: the live parameters
    lerped = torch.zeros(n) if bias_correction else theta.clone()
    exact = lerped.double()
    for _ in range(updates):
        opt.flat_params[:] += f32(1e-3) * rng.standard_normal(n).astype(f32)
        ema.update()
        lerped.lerp_(theta, 1.0 - decay)
        exact = decay * exact + (1.0 - decay) * theta.double()
    scale = 1.0 / (1.0 - decay ** updates) if bias_correction else 1.0
    torch_error = (lerped.double() - exact).abs().max().item() * scale
    error = np.abs(ema.shadow - exact.numpy()).max() * scale
    assert torch_error < 5e-5
    assert error <= 1.5 * torch_error
    with ema.applied():
        np.testing.assert_allclose(opt.flat_params, exact.numpy() * scale, atol=1.5 * torch_error)


def test_an_update_while_the_average_is_applied_is_refused():
    w = np.full(4, 3.0, f32)
    ema = fastopt.EMA([w], decay=0.5)
    ema.update()
    shadow = ema.shadow.copy()
    with ema.applied():
        with pytest.raises(RuntimeError, match="restore"):
            ema.update()
    np.testing.assert_array_equal(ema.shadow, shadow)
    assert ema.updates == 1
    np.testing.assert_array_equal(w, 3.0)


def params_with_special_values(rng):
    """Live parameters with values whose bits a float round trip might lose."""
    return {"w": rng.standard_normal((3, 4)).astype(f32), "b": rng.standard_normal(5).astype(f32)}


def poke_special_values(w):
    w[0, :3] = [-0.0, np.float32(1e-45), np.array([0x7FC00123], np.uint32).view(f32)[0]]


def test_copy_to_then_restore_is_bit_identical(rng):
    params = params_with_special_values(rng)
    ema = fastopt.EMA(params, decay=0.5)
    history = [np.concatenate([a.ravel() for a in params.values()])]
    for _ in range(3):
        for a in params.values():
            a += f32(0.25)  # in place: the EMA tracks these very arrays
        ema.update()
        history.append(np.concatenate([a.ravel() for a in params.values()]))
    poke_special_values(params["w"])
    live = bits(params.values())
    ema.copy_to()
    averaged = np.concatenate([a.ravel() for a in params.values()])
    assert_close(averaged, reference(history, 0.5, True)[1])
    ema.restore()
    assert_same_bits(params.values(), live)
    with pytest.raises(RuntimeError, match="copy_to"):
        ema.restore()  # nothing left to restore


def test_applied_restores_even_when_the_body_raises(rng):
    params = params_with_special_values(rng)
    b0 = params["b"].astype(np.float64)
    ema = fastopt.EMA(params, decay=0.9)
    ema.update()
    params["b"] *= f32(2.0)
    ema.update()
    poke_special_values(params["w"])
    live = bits(params.values())
    expected_b = (0.9 * 0.1 * b0 + 0.1 * 2.0 * b0) / (1.0 - 0.9 ** 2)
    with ema.applied() as applied:
        assert applied is ema
        assert_close(params["b"], expected_b)
    assert_same_bits(params.values(), live)
    with pytest.raises(ZeroDivisionError):
        with ema.applied():
            assert_close(params["b"], expected_b)
            1 / 0
    assert_same_bits(params.values(), live)
    with pytest.raises(RuntimeError, match="copy_to"):
        ema.restore()


@pytest.mark.parametrize("container", [dict, list])
@pytest.mark.parametrize("bias_correction", [True, False])
def test_dicts_and_lists_of_arrays_are_tracked_in_place(rng, container, bias_correction):
    arrays = [rng.standard_normal((3, 4)).astype(f32), rng.standard_normal(5).astype(f32),
              rng.standard_normal((2, 1, 3)).astype(f32)]
    params = dict(zip("wbk", arrays)) if container is dict else list(arrays)
    ema = fastopt.EMA(params, decay=0.8, bias_correction=bias_correction)

    def flat():
        return np.concatenate([a.ravel() for a in arrays])

    history = [flat()]
    for t in range(6):
        arrays[0] *= f32(0.5)  # modified in place by the user, not through fastopt
        arrays[1][:] = rng.standard_normal(5).astype(f32)
        arrays[2][0, 0, t % 3] += f32(10.0)
        ema.update()
        history.append(flat())
        assert_close(ema.shadow, reference(history, 0.8, bias_correction)[0])
    averaged = reference(history, 0.8, bias_correction)[1]
    ema.copy_to()  # writes into the caller's arrays, in their shapes
    assert_close(flat(), averaged)
    assert [a.shape for a in arrays] == [(3, 4), (5,), (2, 1, 3)]
    ema.restore()
    np.testing.assert_array_equal(flat(), history[-1])


def test_an_optimizer_with_parameter_groups(rng):
    a, b = rng.standard_normal(6).astype(f32), rng.standard_normal((2, 3)).astype(f32)
    w = rng.standard_normal((4, 4)).astype(f32)
    opt = fastopt.Adam([{"params": [a, b]}, {"params": {"w": w}, "lr": 0.05}], lr=0.01)
    ema = fastopt.EMA(opt, decay=0.9)
    views = [*opt.params[0], opt.params[1]["w"]]  # every group, as the user sees it

    def flat():
        return np.concatenate([v.ravel() for v in views])

    history = [flat()]
    for g in gradients(7, opt.flat_params.size, 12):
        opt.step(g)
        ema.update()
        history.append(flat())
    v, averaged = reference(history, 0.9, True)
    assert_close(ema.shadow, v)
    with ema.applied():
        assert_close(flat(), averaged)
    np.testing.assert_array_equal(flat(), history[-1])


def read_only(shape):
    a = np.ones(shape, f32)
    a.flags.writeable = False
    return a


@pytest.mark.parametrize("params, kwargs, error, match", [
    ("list", dict(decay=1.0), ValueError, "decay"),
    ("list", dict(decay=-0.01), ValueError, "decay"),
    ("list", dict(decay=float("nan")), ValueError, "decay"),
    ("list", dict(decay=float("inf")), ValueError, "decay"),
    ("list", dict(decay="0.9"), TypeError, "decay"),
    ("list", dict(decay=None), TypeError, "decay"),
    ("list", dict(decay=True), TypeError, "decay"),
    ("list", dict(bias_correction=1), TypeError, "bias_correction"),
    ("list", dict(bias_correction="yes"), TypeError, "bias_correction"),
    ("list", dict(bias_correction=None), TypeError, "bias_correction"),
    ([], {}, ValueError, "empty"),
    ({}, {}, ValueError, "empty"),
    (np.ones(3, f32), {}, TypeError, "dict or list"),
    ([np.ones(3)], {}, TypeError, r"params\[0\] has dtype float64"),
    ({"w": np.ones(3, f32), "h": np.ones(3, np.float16)}, {}, TypeError,
     r"params\['h'\] is float16 but params\['w'\] is float32"),
    ({"w": np.ones((4, 4), f32)[:, ::2]}, {}, ValueError, r"params\['w'\] must be C-contiguous"),
    ([np.ones(3, f32), np.ones((3, 4), f32).T], {}, ValueError, r"params\[1\] must be C-contiguous"),
    ([read_only(3)], {}, ValueError, r"params\[0\] .*writeable"),
    ([[1.0, 2.0]], {}, TypeError, "array"),
])
def test_bad_arguments_are_refused(params, kwargs, error, match):
    params = [np.ones(3, f32)] if isinstance(params, str) else params
    with pytest.raises(error, match=match):
        fastopt.EMA(params, **kwargs)


@pytest.mark.parametrize("value, error", [
    (2.0, ValueError), (1.0, ValueError), (-0.1, ValueError), (float("nan"), ValueError),
    ("0.5", TypeError), (None, TypeError), (True, TypeError),
])
def test_decay_set_later_is_checked_as_the_constructor_checks_it(value, error):
    w = np.ones(4, f32)
    ema = fastopt.EMA([w], decay=0.9, bias_correction=False)
    with pytest.raises(error, match="decay"):
        ema.decay = value
    assert ema.decay == 0.9
    ema.update()
    np.testing.assert_array_equal(ema.shadow, 1.0)  # 0.9 * 1 + 0.1 * 1, not a diverging one
    ema.decay = np.float32(0.5)  # any real number in [0, 1), kept as a float
    assert type(ema.decay) is float and ema.decay == 0.5


def trained_ema(decay=0.9, bias_correction=True, steps=4):
    opt = fastopt.SGD([initial_params(4, 9)], lr=0.1, momentum=0.5)
    ema = fastopt.EMA(opt, decay=decay, bias_correction=bias_correction)
    for g in gradients(4, 9, steps):
        opt.step(g)
        ema.update()
    return opt, ema


@pytest.mark.parametrize("bias_correction", [True, False])
def test_a_state_dict_resumes_the_average_exactly(bias_correction):
    """The shadow and its count (which the bias correction divides by) were lost at a
    resume: an EMA of the resumed parameters starts again from what state_dict holds."""
    opt, ema = trained_ema(bias_correction=bias_correction)
    state = pickle.loads(pickle.dumps(ema.state_dict()))  # plain: arrays and numbers
    assert set(state) == {"shadow", "updates", "decay", "bias_correction", "start_weight"}
    assert type(state["shadow"]) is np.ndarray and state["updates"] == 4
    ema.state_dict()["shadow"][:] = 0  # a copy
    assert ema.shadow.any()
    resumed_opt = fastopt.SGD([np.zeros(9, f32)], lr=0.1, momentum=0.5)
    resumed_opt.load_state_dict(opt.state_dict())
    resumed = fastopt.EMA(resumed_opt, decay=0.5, bias_correction=not bias_correction)
    resumed.load_state_dict(state)
    assert (resumed.decay, resumed.bias_correction) == (0.9, bias_correction)
    for either, o in ((ema, opt), (resumed, resumed_opt)):
        for g in gradients(5, 9, 3):
            o.step(g)
            either.update()
    assert resumed.updates == ema.updates == 7
    np.testing.assert_array_equal(resumed.shadow, ema.shadow)
    with ema.applied(), resumed.applied():
        np.testing.assert_array_equal(resumed_opt.flat_params, opt.flat_params)


@pytest.mark.parametrize("resume", [False, True])
def test_a_decay_changed_between_updates_is_corrected_by_the_product_of_the_decays(resume):
    """The correction once took the current decay to the power of the count: parameters
    held at 2 for ten updates at 0.9 and one at 0.999 averaged 119, not 2."""
    opt = fastopt.SGD([initial_params(6, 9)], lr=0.1, momentum=0.5)
    ema = fastopt.EMA(opt, decay=0.9)
    history, decays = [opt.flat_params.copy()], []
    for t, g in enumerate(gradients(6, 9, 12)):
        if resume and t == 6:
            state = ema.state_dict()
            ema = fastopt.EMA(opt, decay=0.5)
            ema.load_state_dict(state)
        ema.decay = min(0.999, (1 + t) / (10 + t)) if t < 10 else 0.999  # timm's warm-up
        opt.step(g)
        ema.update()
        history.append(opt.flat_params.copy())
        decays.append(ema.decay)
    v, averaged = reference(history, decays, True)
    assert_close(ema.shadow, v)
    with ema.applied():
        assert_close(opt.flat_params, averaged)
    held = np.full(3, 2.0, f32)
    constant = fastopt.EMA([held], decay=0.9)
    for t in range(11):
        constant.decay = 0.999 if t == 10 else 0.9
        constant.update()
    with constant.applied():
        np.testing.assert_allclose(held, 2.0, rtol=1e-6)


def test_a_state_dict_saved_before_start_weight_was_kept_resumes_a_constant_decay():
    opt, ema = trained_ema()
    state = ema.state_dict()
    del state["start_weight"]
    resumed = fastopt.EMA(opt, decay=0.5)
    resumed.load_state_dict(state)
    assert resumed.start_weight == ema.start_weight  # (1 - float32(1 - 0.9)) ** 4
    with ema.applied():
        expected = opt.flat_params.copy()
    with resumed.applied():
        np.testing.assert_array_equal(opt.flat_params, expected)


@pytest.mark.parametrize("change, error, match", [
    (None, TypeError, "state must be a dict"),
    ({"shadow": None}, TypeError, "shadow"),
    ({"shadow": np.zeros(8, f32)}, ValueError, r"shadow'\] must be float32 of shape \(9,\)"),
    ({"shadow": np.zeros((9, 1), f32)}, ValueError, "shadow"),
    ({"shadow": np.zeros(9)}, ValueError, "shadow"),
    ({"updates": -1}, ValueError, "updates"),
    ({"updates": 1.5}, TypeError, "updates"),
    ({"updates": True}, TypeError, "updates"),
    ({"decay": 1.0}, ValueError, "decay"),
    ({"bias_correction": "yes"}, TypeError, "bias_correction"),
    ({"extra": 1}, ValueError, "must hold"),
    ({"start_weight": 1.5}, ValueError, "start_weight"),
    ({"start_weight": float("nan")}, ValueError, "start_weight"),
    ({"start_weight": "0.5"}, TypeError, "start_weight"),
    ({"start_weight": 1.0}, ValueError, "start_weight.*divided by zero"),
], ids=["not a dict", "shadow None", "shadow short", "shadow 2-D", "shadow float64",
        "updates < 0", "updates a float", "updates a bool", "decay 1", "bias_correction str",
        "an extra key", "start_weight > 1", "start_weight NaN", "start_weight str",
        "start_weight 1 after updates"])
def test_a_bad_ema_state_dict_is_refused_and_changes_nothing(change, error, match):
    _, ema = trained_ema()
    state = None if change is None else {**ema.state_dict(), **change}
    before = ema.state_dict()
    with pytest.raises(error, match=match):
        ema.load_state_dict(state)
    with pytest.raises(ValueError, match="must hold"):
        ema.load_state_dict({"shadow": before["shadow"]})
    after = ema.state_dict()
    np.testing.assert_array_equal(after.pop("shadow").view(np.uint32),
                                  before.pop("shadow").view(np.uint32))
    assert after == before


@pytest.mark.parametrize("copy_it", [pickle.dumps, copy.copy, copy.deepcopy])
def test_pickle_and_copy_of_an_ema_are_refused_pointing_to_its_state_dict(copy_it):
    # A copy would average copies of the arrays, which no optimizer steps.
    _, ema = trained_ema()
    with pytest.raises(TypeError, match="EMA cannot be pickled or copied.*state_dict"):
        copy_it(ema)


@pytest.mark.parametrize("call", ["copy_to", "applied", "restore"])
def test_copy_to_before_any_update_and_restore_without_copy_to_change_nothing(rng, call):
    w = rng.standard_normal(7).astype(f32)
    live = w.copy()
    ema = fastopt.EMA([w])
    match = "restore" if call == "restore" else "update"
    with pytest.raises(RuntimeError, match=match):
        if call == "applied":
            with ema.applied():
                pytest.fail("the body must not run")
        else:
            getattr(ema, call)()
    np.testing.assert_array_equal(w, live)
    assert ema.updates == 0 and not ema.shadow.any()
    with pytest.raises(RuntimeError, match="copy_to"):
        ema.restore()  # the failed call saved nothing


def test_without_bias_correction_copy_to_before_any_update_writes_the_initial_values(rng):
    w = rng.standard_normal(7).astype(f32)
    initial = w.copy()
    ema = fastopt.EMA([w], bias_correction=False)
    w += f32(1.0)  # changed since the EMA was made
    with ema.applied():
        np.testing.assert_array_equal(w, initial)  # v0 = theta0, used as it is
    np.testing.assert_array_equal(w, initial + f32(1.0))


def test_a_large_buffer_matches_the_reference_and_the_serial_kernel_bitwise(rng):
    n = 100003
    assert n >= cpu.PARALLEL_MIN_SIZE > 10000  # one array takes the parallel path, pieces do not
    big = rng.standard_normal(n).astype(f32)
    twin = big.copy()
    pieces = np.split(twin, range(10000, n, 10000))  # writeable contiguous views of twin
    whole, split = fastopt.EMA([big], decay=0.95), fastopt.EMA(pieces, decay=0.95)
    history = [big.copy()]
    for _ in range(5):
        big[:] = rng.standard_normal(n).astype(f32)
        twin[:] = big
        whole.update()
        split.update()
        history.append(big.copy())
    v, averaged = reference(history, 0.95, True)
    assert_close(whole.shadow, v)
    np.testing.assert_array_equal(whole.shadow, split.shadow)
    with whole.applied():
        assert_close(big, averaged)
    np.testing.assert_array_equal(big, history[-1])

    value = rng.standard_normal(n).astype(f32)
    h = (f32(0.05),)  # rules.EMAScalars: 1 - decay
    serial, parallel = whole.shadow.copy(), whole.shadow.copy()
    kernel = cpu.kernel("ema", ("average", "value"))
    kernel(serial, value, (), h, False, True)
    kernel(parallel, value, (), h, True, True)
    np.testing.assert_array_equal(parallel, serial)
    assert_close(serial, 0.95 * whole.shadow.astype(np.float64) + 0.05 * value)


def test_a_second_copy_to_is_refused_and_keeps_the_saved_parameters():
    w = np.array([1.0, 2.0, 3.0], f32)
    ema = fastopt.EMA([w], decay=0.5)
    ema.update()
    w += 10
    ema.update()
    live = w.copy()
    with pytest.raises(RuntimeError, match="restore"):
        with ema.applied():
            with ema.applied():
                pass
    np.testing.assert_array_equal(w, live)


def test_the_same_array_twice_is_refused():
    a = np.ones(3, f32)
    with pytest.raises(ValueError, match=r"params\[1\] is the same array as params\[0\]"):
        fastopt.EMA([a, a])
