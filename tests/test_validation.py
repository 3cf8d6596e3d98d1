"""Every kind of bad input, in one table: each raises a ValueError or TypeError that
names the argument, and leaves the parameters, gradients and state bit-identical."""

import fractions

import numpy as np
import pytest

import fastopt
from conftest import assert_unchanged, snapshot

f32 = np.float32


def fresh(steady=False):
    """An Adam on dict parameters that has taken a step, so that its state exists; with
    ``steady``, a second one through ``opt.grads``, which sets up the fast path of the
    next (fastopt/optim/steady.py)."""
    rng = np.random.default_rng(0)
    opt = fastopt.Adam({"w": rng.standard_normal((3, 4)).astype(f32),
                        "b": rng.standard_normal(4).astype(f32)}, lr=0.01, amsgrad=True)
    opt.step(rng.standard_normal(16).astype(f32))
    if steady:
        opt.flat_grads[:] = rng.standard_normal(16).astype(f32)
        opt.step()
    opt.grads["w"][:] = 1.0
    return opt


def grads_like(opt, **replace):
    grads = {k: np.ones(v.shape, f32) for k, v in opt.params.items()}
    grads.update(replace)
    return grads


def set_group(key, value):
    def change(opt):
        opt.param_groups[0][key] = value
        opt.step()
    return change


# (bad input, error type, what the message must mention)
STEP_CASES = {
    "lr < 0": (set_group("lr", -1e-3), ValueError, "lr >= 0"),
    "lr is a string": (set_group("lr", "0.1"), TypeError, "lr must be a real number"),
    "lr overflows float32": (set_group("lr", 1e39), ValueError, "float32"),
    "lr / (1 - beta1) overflows float32": (set_group("lr", 1e38), ValueError,
                                           "lr=1e.38 overflows float32"),
    "grad_scale whose inverse overflows": (lambda o: o.step(grad_scale=1e-39), ValueError,
                                           "1/grad_scale overflows"),
    "eps < 0": (set_group("eps", -1e-8), ValueError, "eps >= 0"),
    "beta1 = 1": (set_group("betas", (1.0, 0.999)), ValueError, "index 0"),
    "beta2 < 0": (set_group("betas", (0.9, -0.1)), ValueError, "index 1"),
    "betas not a pair": (set_group("betas", (0.9,)), TypeError, "betas must be a pair"),
    "weight_decay < 0": (set_group("weight_decay", -0.1), ValueError, "weight_decay >= 0"),
    "amsgrad not a bool": (set_group("amsgrad", 1), TypeError, "amsgrad must be True or False"),
    "lr schedule returns < 0": (set_group("lr", lambda t: -1.0), ValueError, "lr schedule"),
    "a group key that is no hyperparameter": (set_group("weight_decy", 0.5), ValueError,
                                              r"param_groups\[0\] has unknown options "
                                              r"\['weight_decy'\]; a group may set"),
    "a hyperparameter deleted": (lambda o: (o.param_groups[0].pop("eps"), o.step()), ValueError,
                                 r"param_groups\[0\] lacks the hyperparameters \['eps'\]"),
    "flat grads float64": (lambda o: o.step(np.ones(16)), TypeError, "grads must be float32"),
    "flat grads too short": (lambda o: o.step(np.ones(15, f32)), ValueError, "16 elements"),
    "flat grads 2-D": (lambda o: o.step(np.ones((4, 4), f32)), ValueError, "1-D"),
    "flat grads strided": (lambda o: o.step(np.ones(32, f32)[::2]), ValueError, "C-contiguous"),
    "flat grads alias the parameters": (lambda o: o.step(o.flat_params), ValueError,
                                        "share memory with the parameters"),
    "flat grads alias the state": (lambda o: o.step(o.state["exp_avg"]), ValueError,
                                   "state\\['exp_avg'\\]"),
    "grads not an array": (lambda o: o.step("ones"), TypeError, "grads"),
    "grads a list for dict params": (lambda o: o.step([np.ones((3, 4), f32), np.ones(4, f32)]),
                                     TypeError, "dict like params"),
    "grads missing a key": (lambda o: o.step({"w": np.ones((3, 4), f32)}), ValueError,
                            "missing \\['b'\\]"),
    "grads with an extra key": (lambda o: o.step(grads_like(o, c=np.ones(2, f32))), ValueError,
                                "unexpected \\['c'\\]"),
    "grads with a wrong shape": (lambda o: o.step(grads_like(o, w=np.ones((4, 3), f32))),
                                 ValueError, "grads\\['w'\\] must have shape \\(3, 4\\)"),
    "grads float16": (lambda o: o.step(grads_like(o, b=np.ones(4, np.float16))), TypeError,
                      "grads\\['b'\\] must be float32"),
    "grads masked, the mask dropped": (
        lambda o: o.step(grads_like(o, b=np.ma.masked_array(np.ones(4, f32), [0, 1, 0, 0]))),
        TypeError, r"grads\['b'\] is a NumPy masked array"),
    "lr a Fraction, which no checkpoint saves": (set_group("lr", fractions.Fraction(1, 3)),
                                                 TypeError, "lr must be a real number"),
    "lr a long double, kept as one": (set_group("lr", np.longdouble(0.01)), TypeError,
                                      "lr must be a real number"),
    "grad_scale = 0": (lambda o: o.step(grad_scale=0.0), ValueError, "grad_scale"),
    "grad_scale not a number": (lambda o: o.step(grad_scale="8"), TypeError, "grad_scale"),
    "skip_nonfinite not a bool": (lambda o: o.step(skip_nonfinite="yes"), TypeError,
                                  "skip_nonfinite"),
    "clip_grad_norm < 0": (lambda o: setattr(o, "clip_grad_norm", -1.0), ValueError,
                           "clip_grad_norm"),
    "load a foreign state_dict": (lambda o: o.load_state_dict(fastopt.SGD([np.ones(16, f32)])
                                                               .state_dict()),
                                  ValueError, "for SGD, not Adam"),
}


@pytest.mark.filterwarnings("ignore:overflow encountered")
@pytest.mark.parametrize("case", STEP_CASES, ids=str)
@pytest.mark.parametrize("steady", [False, True], ids=["", "steady"])
def test_bad_input_to_a_live_optimizer_changes_nothing(case, steady):
    bad, error, match = STEP_CASES[case]
    opt = fresh(steady)
    before = snapshot(opt)
    with pytest.raises(error, match=match):
        bad(opt)
    assert_unchanged(opt, before)


# Edits of opt.state between steps: (edit, error type, what the message must mention).
STATE_CASES = {
    "state emptied": (lambda o: setattr(o, "state", {}), ValueError, "state has no 'step'"),
    "state not a dict": (lambda o: setattr(o, "state", [0]), TypeError, "state must be"),
    "step < 0": (lambda o: o.state.update(step=-1), ValueError, r"state\['step'\] must be >= 0"),
    "step a string": (lambda o: o.state.update(step="3"), TypeError, "must be an int"),
    "step a float": (lambda o: o.state.update(step=1.5), TypeError, "must be an int"),
    "step a bool": (lambda o: o.state.update(step=True), TypeError, "must be an int"),
    "a begun buffer removed": (lambda o: o.state.pop("exp_avg"), ValueError,
                               r"state\['exp_avg'\] was removed.*16 float32 elements"),
}


@pytest.mark.parametrize("case", STATE_CASES, ids=str)
@pytest.mark.parametrize("steady", [False, True], ids=["", "steady"])
def test_a_bad_step_count_or_a_removed_state_buffer_is_refused_and_changes_nothing(case,
                                                                                     steady):
    """These failed with a KeyError, ZeroDivisionError or a TypeError about str, or (a
    float count) went on and saved a checkpoint that does not load."""
    edit, error, match = STATE_CASES[case]
    opt = fresh(steady)
    edit(opt)
    before = snapshot(opt) if isinstance(opt.state, dict) else None
    with pytest.raises(error, match=match):
        opt.step()
    if before is not None:
        assert_unchanged(opt, before)


@pytest.mark.parametrize("name", ["exp_avg", "exp_avg_absmax", "exp_avg_small"])
def test_an_8_bit_state_array_removed_is_refused_and_changes_nothing(name):
    opt = fastopt.Adam({"w": np.ones(5000, f32), "b": np.ones(3, f32)}, state_dtype="int8")
    opt.step(np.ones(5003, f32))
    del opt.state[name]
    before = snapshot(opt)
    with pytest.raises(ValueError, match=rf"state\['{name}'\] was removed"):
        opt.step(np.ones(5003, f32))
    assert_unchanged(opt, before)


@pytest.mark.parametrize("steady", [False, True], ids=["", "steady"])
def test_a_numpy_integer_step_count_is_taken_as_the_int_it_equals(steady, tmp_path):
    opt, twin = fresh(steady), fresh(steady)
    opt.state["step"] = np.int64(opt.state["step"])
    opt.step()
    twin.step()
    assert type(opt.state["step"]) is int and opt.state["step"] == twin.state["step"]
    np.testing.assert_array_equal(opt.flat_params, twin.flat_params)
    opt.state["step"] = np.int64(opt.state["step"])
    fastopt.save(opt, tmp_path / "c.npz")  # saved as the int it equals
    assert fastopt.load(tmp_path / "c.npz").state["step"] == twin.state["step"]


def test_a_group_whose_host_state_overflows_stops_the_step_before_any_group_moves():
    """ASGD's eta of the second group overflows a float ((1 + lambd*lr*step)**alpha,
    where torch raises OverflowError too): a ValueError naming that group, with the
    first group's parameters, state and eta as they were."""
    opt = fastopt.ASGD([{"params": [np.ones(5, f32)]},
                        {"params": [np.ones(3, f32)], "lambd": 1e10, "alpha": 40.0}], lr=0.01)
    before = snapshot(opt)
    with pytest.raises(ValueError, match=r"param_groups\[1\]'s hyperparameters overflow"):
        opt.step(np.ones(8, f32))
    assert_unchanged(opt, before)
    opt.param_groups[1]["lambd"] = 1e-4
    opt.step(np.ones(8, f32))
    assert opt.state["step"] == 1 and not np.array_equal(opt.flat_params, np.ones(8, f32))


def readonly(shape):
    a = np.zeros(shape, f32)
    a.flags.writeable = False
    return a


ONE = np.ones(3, f32)
CONSTRUCTION_CASES = {
    "params not a container": (lambda: fastopt.SGD(np.ones(3, f32)), TypeError, "dict of arrays"),
    "params empty": (lambda: fastopt.SGD([]), ValueError, "empty"),
    "params float64": (lambda: fastopt.SGD([np.ones(3)]), TypeError, "params\\[0\\] has dtype"),
    "params int": (lambda: fastopt.SGD({"a": np.ones(3, int)}), TypeError, "params\\['a'\\]"),
    "params masked": (lambda: fastopt.SGD({"a": np.ma.masked_array(ONE, [0, 1, 0])}),
                      TypeError, r"params\['a'\] is a NumPy masked array"),
    "the same array twice": (lambda: fastopt.SGD([ONE, ONE]), ValueError, "same array"),
    "the same array in two groups": (lambda: fastopt.SGD([{"params": [ONE]}, {"params": [ONE]}]),
                                     ValueError, "same array"),
    "a group without params": (lambda: fastopt.SGD([{"params": [ONE]}, {"lr": 1.0}]), TypeError,
                               "'params' entry"),
    "a group with an unknown option": (lambda: fastopt.SGD([{"params": [ONE], "lrr": 1.0}]),
                                       ValueError, "unknown options"),
    "nesterov without momentum": (lambda: fastopt.SGD([ONE], nesterov=True), ValueError,
                                  "Nesterov momentum requires"),
    "nesterov with dampening": (lambda: fastopt.SGD([ONE], momentum=0.9, dampening=0.1,
                                                    nesterov=True), ValueError, "zero dampening"),
    "negative momentum": (lambda: fastopt.SGD([ONE], momentum=-0.5), ValueError, "momentum"),
    "RMSprop alpha < 0": (lambda: fastopt.RMSprop([ONE], alpha=-0.1), ValueError, "alpha"),
    "Adadelta rho > 1": (lambda: fastopt.Adadelta([ONE], rho=1.5), ValueError, "rho"),
    "Adagrad lr_decay < 0": (lambda: fastopt.Adagrad([ONE], lr_decay=-1.0), ValueError,
                             "lr_decay"),
    "NAdam momentum_decay < 0": (lambda: fastopt.NAdam([ONE], momentum_decay=-1.0), ValueError,
                                 "momentum_decay"),
    "unknown keyword": (lambda: fastopt.Adam([ONE], learning_rate=0.1), TypeError,
                        "learning_rate"),
    "adopted read-only buffer": (lambda: fastopt.Adam(fastopt.adopt(readonly(4))), ValueError,
                                 "writeable"),
    "adopted 2-D buffer": (lambda: fastopt.Adam(fastopt.adopt(np.zeros((2, 2), f32))),
                           ValueError, "1-D"),
    "adopted shapes too big": (lambda: fastopt.Adam(fastopt.adopt(np.zeros(4, f32), [(5,)])),
                               ValueError, "add up to 5"),
    "adopted grads aliasing": (lambda: fastopt.Adam(fastopt.adopt(ONE, grads=ONE)), ValueError,
                               "share memory"),
    "adopted shapes as a list of ints": (lambda: fastopt.Adam(fastopt.adopt(np.zeros(4, f32),
                                                                            [2, 2])),
                                         TypeError, "ambiguous"),
    "clip_grad_value = 0": (lambda: fastopt.Adam([ONE], clip_grad_value=0.0), ValueError,
                            "clip_grad_value"),
}


@pytest.mark.parametrize("case", CONSTRUCTION_CASES, ids=str)
def test_bad_construction_is_refused_and_the_inputs_are_untouched(case):
    build, error, match = CONSTRUCTION_CASES[case]
    before = ONE.copy()
    with pytest.raises(error, match=match):
        build()
    np.testing.assert_array_equal(ONE, before)


def test_the_table_has_at_least_thirty_distinct_bad_inputs():
    assert len(STEP_CASES) + len(CONSTRUCTION_CASES) >= 30


def test_hyperparameters_edited_in_place_or_replaced_by_an_equal_value_are_checked_again():
    """A step re-checks a group whose values changed, also where the change keeps the
    same object (a list edited in place) or an equal value (0 for False, a 0-d array in
    a tuple for a float)."""
    opt = fresh()
    opt.param_groups[0]["betas"] = [0.9, 0.999]
    opt.step()
    opt.param_groups[0]["betas"][0] = 1.0  # in place: the same list
    before = snapshot(opt)
    with pytest.raises(ValueError, match="index 0"):
        opt.step()
    assert_unchanged(opt, before)
    opt.param_groups[0]["betas"] = (0.9, 0.999)
    opt.step()
    opt.param_groups[0]["betas"] = (np.array(0.9), 0.999)  # == (0.9, 0.999), no number
    before = snapshot(opt)
    with pytest.raises(TypeError, match=r"betas\[0\] must be a real number"):
        opt.step()
    assert_unchanged(opt, before)
    opt.param_groups[0]["betas"] = (0.9, 0.999)
    opt.param_groups[0]["amsgrad"] = 1  # == True, but not a bool
    before = snapshot(opt)
    with pytest.raises(TypeError, match="amsgrad must be True or False"):
        opt.step()
    assert_unchanged(opt, before)
    del opt.param_groups[0]["eps"]
    with pytest.raises(ValueError, match=r"param_groups\[0\] lacks the hyperparameters \['eps'\]"):
        opt.step()
    assert_unchanged(opt, before)
