"""fastopt.DynamicLossScaler: torch.amp.GradScaler's policy, skipped steps that change
nothing, float32 rounding of the scale, several optimizers, errors and state_dict."""

import math

import numpy as np
import pytest

import fastopt
from conftest import assert_same, gradients, initial_params, snapshot

f32 = np.float32
FLOAT32_MAX = float(np.finfo(f32).max)

# One character per step: "." clean gradients, "i"/"-" an Inf/-Inf, "n" a NaN. Runs of
# bad steps back off several times in a row; the clean runs are long enough for a
# growth_interval of 3 to grow the scale several times.
PATTERN = "....i.......nn..........i-n.......n....."


def poisoned(g, flag):
    """The gradients ``g`` with the fault ``flag`` names."""
    g = g.copy()
    if flag != ".":
        g[len(g) // 2] = {"i": np.inf, "-": -np.inf, "n": np.nan}[flag]
    return g


def reference_scales(flags, init_scale, growth_factor, backoff_factor, growth_interval):
    """The scale before each step and after the last, and the final growth tracker, by
    torch's documented rule (GradScaler.update) in float64, the scale stored in float32."""
    scale, tracker, scales = float(f32(init_scale)), 0, []
    for flag in flags:
        scales.append(scale)
        if flag != ".":
            scale, tracker = float(f32(scale * backoff_factor)), 0
        elif tracker + 1 == growth_interval:
            with np.errstate(over="ignore"):
                grown = float(f32(scale * growth_factor))
            scale, tracker = (grown if math.isfinite(grown) else scale), 0
        else:
            tracker += 1
    return scales + [scale], tracker


def drive(scaler, flags, n=5, seed=0):
    """Train a small SGD with ``scaler`` through ``flags``: the scales it used, and after."""
    opt = fastopt.SGD([initial_params(seed, n)], lr=0.01)
    scales = []
    for g, flag in zip(gradients(seed, n, len(flags)), flags):
        scales.append(scaler.scale)
        assert scaler.step(opt, poisoned(g, flag) * f32(scaler.scale)) == (flag == ".")
        scaler.update()
    assert opt.skipped_steps == len(flags) - flags.count(".")
    return scales + [scaler.scale]


FACTORS = [  # init_scale, growth_factor, backoff_factor
    (2.0 ** 10, 2.0, 0.5),
    (1000.0, 1.7, 0.3),  # none of them a power of two: every change rounds
]


@pytest.mark.parametrize("init_scale, growth_factor, backoff_factor", FACTORS)
def test_the_scale_follows_the_reference_policy(init_scale, growth_factor, backoff_factor):
    kwargs = dict(init_scale=init_scale, growth_factor=growth_factor,
                  backoff_factor=backoff_factor, growth_interval=3)
    scaler = fastopt.DynamicLossScaler(**kwargs)
    expected, tracker = reference_scales(PATTERN, **kwargs)
    assert drive(scaler, PATTERN) == expected
    assert scaler.growth_tracker == tracker
    changes = np.sign(np.diff(expected))
    assert (changes > 0).sum() >= 5 and (changes < 0).sum() >= 5  # the data exercises both


def test_backoff_and_growth_round_like_float32():
    scaler = fastopt.DynamicLossScaler(init_scale=1.0, growth_factor=1.7, backoff_factor=0.3,
                                       growth_interval=1)
    flags = "iiiii....."
    scales = drive(scaler, flags)
    assert scales == reference_scales(flags, 1.0, 1.7, 0.3, 1)[0]
    assert all(s == float(f32(s)) for s in scales)  # every scale is a float32 value
    unrounded = [0.3 ** k for k in range(6)] + [0.3 ** 5 * 1.7 ** k for k in range(1, 6)]
    assert scales != unrounded  # so the comparison above checks the rounding
    np.testing.assert_allclose(scales, unrounded, rtol=1e-6)


@pytest.mark.parametrize("scale, growth_factor, expected", [
    (2.0 ** 127, 2.0, 2.0 ** 127),  # 2**128 overflows float32: keep the old scale
    (2.0 ** 126, 2.0, 2.0 ** 127),
    (2.0 ** 127, 1.9999999, FLOAT32_MAX),  # rounds down to the largest float32
    (2.0 ** 127, 1.99999997, 2.0 ** 127),  # past the halfway point: rounds to inf, kept
    (FLOAT32_MAX, 1.0000001, FLOAT32_MAX),
    (3e38, 1.5, float(f32(3e38))),
])
def test_growth_that_would_overflow_float32_keeps_the_scale(scale, growth_factor, expected):
    scaler = fastopt.DynamicLossScaler(init_scale=scale, growth_factor=growth_factor,
                                       growth_interval=1)
    opt = fastopt.SGD([np.ones(3, f32)])
    assert scaler.step(opt, np.zeros(3, f32))  # zero gradients stay finite at any scale
    scaler.update()
    assert scaler.scale == expected == reference_scales(".", scale, growth_factor, 0.5, 1)[0][1]
    assert scaler.growth_tracker == 0


@pytest.mark.parametrize("name, kwargs", [
    ("SGD", dict(lr=0.01, momentum=0.9)),
    ("Adam", dict(lr=0.01, amsgrad=True, weight_decay=0.1)),
    ("NAdam", dict(lr=0.01)),  # host-side state (mu_product) as well
    ("RMSprop", dict(lr=0.01, momentum=0.5, centered=True)),
])
@pytest.mark.parametrize("via", ["scaler", "skip_nonfinite"])
def test_skipped_steps_leave_parameters_and_state_bit_identical(name, kwargs, via):
    n, scale = 9, 2.0 ** 12
    grads = gradients(4, n, 5)
    flags = "n.i-."  # a skip before the state exists, and after
    opt = getattr(fastopt, name)([initial_params(4, n)], **kwargs)
    clean = getattr(fastopt, name)([initial_params(4, n)], **kwargs)
    scaler = fastopt.DynamicLossScaler(init_scale=scale)
    for g, flag in zip(grads, flags):
        before = snapshot(opt)
        scaled = poisoned(g, flag) * f32(scaler.scale)  # a power of two: exact
        if via == "scaler":
            scaler.step(opt, scaled)
            scaler.update()
        else:
            opt.step(scaled, grad_scale=scaler.scale, skip_nonfinite=True)
        if flag == ".":
            clean.step(g)
            assert opt.state["step"] == before["state"]["step"] + 1
            assert opt.last_grad_norm == pytest.approx(np.linalg.norm(g.astype(np.float64)),
                                                       rel=1e-6)
        else:
            assert_same(snapshot(opt), before, grads=False)
            assert not math.isfinite(opt.last_grad_norm)
        # as if the bad steps never happened
        assert_same(snapshot(opt), snapshot(clean), grads=False)
    assert opt.skipped_steps == 3 and opt.state["step"] == 2


@pytest.mark.parametrize("flags", ["..", "i.", ".n", "-i"])
def test_a_shared_scaler_backs_off_once_for_any_non_finite_gradient(flags):
    scaler = fastopt.DynamicLossScaler(init_scale=1024.0, growth_interval=1)
    opts = [fastopt.Adam([initial_params(k, 4 + k)], lr=0.1) for k in range(2)]
    for k, (opt, flag) in enumerate(zip(opts, flags)):
        before = opt.flat_params.copy()
        g = poisoned(gradients(k, opt.flat_params.size, 1)[0], flag)
        assert scaler.step(opt, g * f32(scaler.scale)) == (flag == ".")
        assert np.array_equal(opt.flat_params, before) == (flag != ".")
    scaler.update()
    assert scaler.scale == (2048.0 if flags == ".." else 512.0)
    assert scaler.growth_tracker == 0


def test_update_needs_a_step_first():
    scaler = fastopt.DynamicLossScaler(init_scale=8.0, growth_interval=1)
    with pytest.raises(RuntimeError, match="step"):
        scaler.update()
    opt = fastopt.SGD([np.ones(3, f32)])
    with pytest.raises(ValueError, match="3 elements"):
        scaler.step(opt, np.ones(4, f32))  # refused by the optimizer: not a step
    with pytest.raises(RuntimeError, match="step"):
        scaler.update()
    scaler.step(opt, np.ones(3, f32))
    scaler.update()
    with pytest.raises(RuntimeError, match="step"):
        scaler.update()  # one update per round of steps
    assert scaler.scale == 16.0 and scaler.growth_tracker == 0


def test_a_second_step_before_update_is_refused_and_steps_nothing():
    scaler = fastopt.DynamicLossScaler(init_scale=2.0)
    opt, other = fastopt.SGD([np.ones(3, f32)], lr=0.1), fastopt.SGD([np.ones(2, f32)], lr=0.1)
    assert scaler.step(opt, np.full(3, 2.0, f32))
    assert scaler.step(other, np.full(2, 2.0, f32))  # a shared scaler: one step each
    with pytest.raises(RuntimeError, match=r"already been called.*update\(\)"):
        scaler.step(opt, np.full(3, 2.0, f32))  # torch's GradScaler raises too
    np.testing.assert_array_equal(opt.params[0], f32(0.9))
    assert opt.state["step"] == 1
    scaler.update()
    assert scaler.step(opt, np.full(3, 2.0, f32))
    np.testing.assert_array_equal(opt.params[0], f32(0.9) - f32(0.1))


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(init_scale=0.0), ValueError, "init_scale"),
    (dict(init_scale=-1.0), ValueError, "init_scale"),
    (dict(init_scale=float("nan")), ValueError, "init_scale"),
    (dict(init_scale=float("inf")), ValueError, "init_scale"),
    (dict(init_scale=1e-46), ValueError, "init_scale"),  # 0 as the float32 it is kept in
    (dict(init_scale=1e-40), ValueError, "init_scale"),  # subnormal: 1/scale overflows
    (dict(init_scale=1e39), ValueError, "init_scale"),  # inf so
    (dict(init_scale="1024"), TypeError, "init_scale"),
    (dict(init_scale=None), TypeError, "init_scale"),
    (dict(growth_factor=1.0), ValueError, "growth_factor"),
    (dict(growth_factor=0.5), ValueError, "growth_factor"),
    (dict(growth_factor="2"), TypeError, "growth_factor"),
    (dict(backoff_factor=0.0), ValueError, "backoff_factor"),
    (dict(backoff_factor=1.0), ValueError, "backoff_factor"),
    (dict(backoff_factor=-0.5), ValueError, "backoff_factor"),
    (dict(backoff_factor=1.5), ValueError, "backoff_factor"),
    (dict(backoff_factor=None), TypeError, "backoff_factor"),
    (dict(growth_interval=0), ValueError, "growth_interval"),
    (dict(growth_interval=-3), ValueError, "growth_interval"),
    (dict(growth_interval=2.0), TypeError, "growth_interval"),
    (dict(growth_interval=True), TypeError, "growth_interval"),
    (dict(growth_interval="3"), TypeError, "growth_interval"),
])
def test_bad_arguments_are_refused(kwargs, error, match):
    with pytest.raises(error, match=match):
        fastopt.DynamicLossScaler(**kwargs)


def test_state_dict_round_trip_continues_the_same_scales():
    kwargs = dict(growth_factor=2.0, backoff_factor=0.5, growth_interval=3)
    first, rest = PATTERN[:18], PATTERN[18:]
    original = fastopt.DynamicLossScaler(init_scale=2.0 ** 10, **kwargs)
    drive(original, first)
    state = original.state_dict()
    assert state["_growth_tracker"] != 0  # mid-interval, so the tracker matters
    restored = fastopt.DynamicLossScaler(init_scale=1.0, **kwargs)
    restored.load_state_dict(state)
    expected = reference_scales(PATTERN, 2.0 ** 10, **kwargs)[0][len(first):]
    assert drive(restored, rest) == drive(original, rest) == expected
    assert restored.state_dict() == original.state_dict()


@pytest.mark.parametrize("name, kwargs", [("SGD", dict(lr=0.01, momentum=0.9)),
                                          ("Adam", dict(lr=0.01))])
@pytest.mark.parametrize("init_scale, growth_factor, backoff_factor", FACTORS)
def test_matches_torch_grad_scaler(name, kwargs, init_scale, growth_factor, backoff_factor):
    torch = pytest.importorskip("torch")
    n = 6
    options = dict(init_scale=init_scale, growth_factor=growth_factor,
                   backoff_factor=backoff_factor, growth_interval=3)
    p0 = initial_params(2, n)
    opt = getattr(fastopt, name)([p0], **kwargs)
    scaler = fastopt.DynamicLossScaler(**options)
    p = torch.nn.Parameter(torch.from_numpy(p0.copy()))
    torch_opt = getattr(torch.optim, name)([p], foreach=False, **kwargs)
    torch_scaler = torch.amp.GradScaler("cpu", **options)
    for t, (g, flag) in enumerate(zip(gradients(2, n, len(PATTERN)), PATTERN)):
        torch_scaler.scale(torch.ones(()))  # what scaling a loss does: creates the scale
        assert scaler.scale == torch_scaler.get_scale(), f"step {t}"
        scaled = poisoned(g, flag) * f32(scaler.scale)
        applied = scaler.step(opt, scaled)
        scaler.update()
        before = p.detach().clone()
        p.grad = torch.from_numpy(scaled.copy())
        torch_scaler.step(torch_opt)
        torch_scaler.update()
        torch_applied = not torch.equal(p.detach(), before)
        assert applied == torch_applied == (flag == "."), f"step {t}"
        assert scaler.scale == torch_scaler.get_scale(), f"step {t}"
        assert scaler.growth_tracker == torch_scaler.state_dict()["_growth_tracker"]
        np.testing.assert_allclose(opt.flat_params, p.detach().numpy(), rtol=1e-5,
                                   err_msg=f"step {t}")


def test_state_dicts_move_between_torch_and_fastopt():
    torch = pytest.importorskip("torch")
    options = dict(growth_factor=1.5, backoff_factor=0.25, growth_interval=7)
    torch_scaler = torch.amp.GradScaler("cpu", init_scale=96.0, **options)
    torch_scaler.scale(torch.ones(()))
    ours = fastopt.DynamicLossScaler()
    ours.load_state_dict(torch_scaler.state_dict())
    assert (ours.scale, ours.growth_factor, ours.backoff_factor, ours.growth_interval) == \
        (96.0, 1.5, 0.25, 7)
    back = torch.amp.GradScaler("cpu")
    back.load_state_dict(ours.state_dict())
    assert back.get_scale() == 96.0 and back.get_growth_interval() == 7


@pytest.mark.parametrize("change, error", [
    (dict(scale=-4.0), ValueError), (dict(_growth_tracker=-7), ValueError),
    (dict(growth_factor=0.5), ValueError), (dict(_growth_tracker=1.5), TypeError),
    # a tracker at the interval would never grow the scale again
    (dict(_growth_tracker=2000), ValueError),
])
def test_a_bad_state_dict_is_refused_and_changes_nothing(change, error):
    scaler = fastopt.DynamicLossScaler(init_scale=8.0)
    before = scaler.state_dict()
    with pytest.raises(error):
        scaler.load_state_dict({**before, **change})
    with pytest.raises(ValueError, match="missing"):
        scaler.load_state_dict({"scale": 1.0})
    assert scaler.state_dict() == before


@pytest.mark.parametrize("state", [None, "x", [("scale", 1.0)]], ids=str)
def test_a_state_dict_that_is_no_dict_is_a_type_error_and_changes_nothing(state):
    scaler = fastopt.DynamicLossScaler(init_scale=8.0)
    before = scaler.state_dict()
    with pytest.raises(TypeError, match=f"state must be a dict.* got {type(state).__name__}"):
        scaler.load_state_dict(state)
    assert scaler.state_dict() == before


@pytest.mark.parametrize("via", ["scaler", "skip_nonfinite", "torch"])
def test_finite_gradients_that_overflow_once_unscaled_are_skipped(via):
    """A scale below 1 multiplies the gradients: 3e38 / 0.5 overflows float32 in the
    kernel, though every gradient and the float64 norm are finite. torch's GradScaler
    takes such a step (its check reads the scaled gradients); the skip must not."""
    g = np.array([3e38, 1.0, -2.0, 0.5], f32)
    if via == "torch":
        torch = pytest.importorskip("torch")
        drop_in = pytest.importorskip("fastopt.torch")
        p = torch.nn.Parameter(torch.zeros(4))
        opt = drop_in.Adam([p], lr=1e-3, skip_nonfinite=True)
        p.grad = torch.from_numpy(g)
        opt.step(grad_scale=0.5)
        assert opt.skipped_steps == 1 and not p.detach().any() and not opt.state[p]
        return
    opt = fastopt.Adam([np.zeros(4, f32)], lr=1e-3)
    before = snapshot(opt)
    if via == "scaler":
        assert not fastopt.DynamicLossScaler(init_scale=0.5).step(opt, g)
    else:
        opt.step(g, grad_scale=0.5, skip_nonfinite=True)
    assert opt.skipped_steps == 1 and opt.last_grad_norm > FLOAT32_MAX
    assert_same(snapshot(opt), before, grads=False)
    opt.step(g, skip_nonfinite=True)  # unscaled, the same gradients are finite: a step
    assert opt.skipped_steps == 1 and opt.state["step"] == 1
    assert np.isfinite(opt.flat_params).all()


def test_a_scale_backed_off_beyond_float32_is_a_clear_error_that_steps_nothing():
    opt = fastopt.SGD([initial_params(0, 5)], lr=0.1)
    scaler = fastopt.DynamicLossScaler(init_scale=4e-38)
    bad = poisoned(gradients(0, 5, 1)[0], "n")
    assert not scaler.step(opt, bad)
    scaler.update()  # 2e-38: 1/scale still fits float32
    for _ in range(3):
        assert not scaler.step(opt, bad)
        scaler.update()
    assert 1.0 / scaler.scale > FLOAT32_MAX  # 2.5e-39
    before = snapshot(opt)
    with pytest.raises(RuntimeError, match="backed off to 2.5e-39.*every scale"):
        scaler.step(opt, gradients(0, 5, 1)[0])
    assert_same(snapshot(opt), before)


@pytest.mark.parametrize("scale, clip", [(2.0 ** 127, None), (2.0 ** 126, None),
                                         (2.0 ** 110, 1.0), (2.0 ** 110, 1e-4)])
def test_a_gradient_factor_below_float32s_normal_numbers_still_unscales(scale, clip):
    """1/grad_scale times the clipping coefficient, one float32 factor, was subnormal
    here, and the CPU kernels (flushing subnormals) read it as 0: every step stood still,
    uncounted, with the right last_grad_norm. DynamicLossScaler grows to 2**127."""
    g = np.array([0.5, -0.25, 1.0, 0.125, 3e-3], f32) * (1e5 if clip else 1.0)
    opt = fastopt.SGD([np.ones(5, f32)], lr=1.0, clip_grad_norm=clip, skip_nonfinite=True)
    opt.step(g * f32(scale), grad_scale=scale)
    g64 = g.astype(np.float64)
    norm = np.linalg.norm(g64)
    factor = 1.0 if clip is None else min(1.0, clip / (norm + 1e-6))
    np.testing.assert_allclose(opt.flat_params, 1.0 - g64 * factor, rtol=1e-6, atol=1e-30)
    assert opt.skipped_steps == 0 and opt.last_grad_norm == pytest.approx(norm)


def test_a_scaler_at_its_largest_scale_steps_the_parameters():
    p = np.ones(4, f32)
    opt = fastopt.SGD([p], lr=0.5)
    scaler = fastopt.DynamicLossScaler(init_scale=2.0 ** 127)
    g = np.array([1.0, -1.5, 0.5, 0.0], f32)
    assert scaler.step(opt, g * f32(scaler.scale))
    np.testing.assert_array_equal(opt.flat_params, 1.0 - 0.5 * g)
