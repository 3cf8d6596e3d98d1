"""The fast path of a step set up as the step before it (fastopt/optim/steady.py): a
training loop takes it, its steps are bitwise those of the plain path, and anything
changed between steps is checked again as the plain path checks it. (The table of bad
inputs in test_validation.py runs against an optimizer on the fast path too.)"""

import numpy as np
import pytest

import fastopt
from cases import CASES
from conftest import assert_same, assert_unchanged, snapshot
from fastopt.optim.optimizer import Optimizer

f32 = np.float32
STEPS = 5


def two_groups(name, kwargs, schedule=False):
    """An optimizer of algorithm ``name`` over two groups of parameters, the second with
    its own lr (a schedule, if asked)."""
    rng = np.random.default_rng(3)
    lr = kwargs.get("lr", 0.01)
    second = {"params": [rng.standard_normal(700).astype(f32)],
              "lr": fastopt.schedules.Exponential(lr, 0.9) if schedule else lr * 0.5}
    return getattr(fastopt, name)([{"params": [rng.standard_normal((20, 30)).astype(f32)]},
                                   second], **kwargs)


def run(opt, grads, plain):
    """Step ``opt`` through ``grads``: as a training loop does, writing ``opt.grads``
    and calling ``step()``, or passing each flat gradient, which takes the plain path."""
    for g in grads:
        if plain:
            opt.step(g)
        else:
            opt.flat_grads[:] = g
            opt.step()


def gradients(n, steps=STEPS, seed=5):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(n).astype(f32) for _ in range(steps)]


def count_plans(monkeypatch):
    """A list that grows by one at each plain step's planning of a group."""
    calls = []
    plan = Optimizer._plan
    monkeypatch.setattr(Optimizer, "_plan",
                        lambda self, *args: calls.append(1) or plan(self, *args))
    return calls


@pytest.mark.parametrize("case", [(name, i) for name in CASES for i in range(len(CASES[name]))],
                         ids=lambda case: f"{case[0]}-{case[1]}")
@pytest.mark.parametrize("schedule", [False, True], ids=["", "scheduled"])
def test_steady_steps_are_bitwise_the_plain_ones(case, schedule):
    name, index = case
    kwargs = CASES[name][index]
    steady, plain = two_groups(name, kwargs, schedule), two_groups(name, kwargs, schedule)
    grads = gradients(plain.flat_params.size)
    run(steady, grads, plain=False)
    run(plain, grads, plain=True)
    assert_same(snapshot(steady), snapshot(plain), grads=False)


@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW", "NAdam", "ASGD", "RMSprop", "Lion"])
def test_a_training_loop_plans_only_its_first_step(monkeypatch, name):
    opt = two_groups(name, {"lr": 0.01}, schedule=True)
    plans = count_plans(monkeypatch)
    run(opt, gradients(opt.flat_params.size), plain=False)
    assert len(plans) == 2  # the two groups of the first step


@pytest.mark.parametrize("setup", [
    lambda opt: setattr(opt, "clip_grad_norm", 1.0),
    lambda opt: setattr(opt, "skip_nonfinite", True),
    lambda opt: opt.param_groups[0].update(caution=True),  # two passes a step
], ids=["clip_grad_norm", "skip_nonfinite", "caution"])
def test_what_the_fast_path_does_not_do_takes_the_plain_path(monkeypatch, setup):
    opt = two_groups("Adam", {"lr": 0.01})
    setup(opt)
    plans = count_plans(monkeypatch)
    run(opt, gradients(opt.flat_params.size, steps=3), plain=False)
    assert len(plans) == 6


@pytest.mark.parametrize("step", [
    lambda opt: opt.step(np.ones(opt.flat_params.size, f32)),
    lambda opt: opt.step(grad_scale=2.0),
    lambda opt: opt.step(skip_nonfinite=False),
], ids=["grads", "grad_scale", "skip_nonfinite"])
def test_a_step_given_arguments_takes_the_plain_path(monkeypatch, step):
    opt = fastopt.Adam([np.ones(8, f32)])
    opt.step()
    plans = count_plans(monkeypatch)
    step(opt)
    step(opt)
    assert len(plans) == 2


# Parameter dtype and options of every kind of storage.
FORMATS = {
    "bf16 params, master weights": ("bfloat16", {}),
    "bf16 params, remainders": ("bfloat16", dict(master_weights="remainder")),
    "bf16 params, no master, stochastic": ("bfloat16", dict(master_weights=None,
                                                           stochastic_rounding=True, seed=3)),
    "float16 params, float32 grads": ("float16", dict(grad_dtype="float32")),
    "bf16 state, stochastic": ("float32", dict(state_dtype="bfloat16",
                                               stochastic_rounding=True)),
    "int8 state": ("float32", dict(state_dtype="int8")),
    "remainders, int8 and bf16 state, stochastic": (
        "bfloat16", dict(master_weights="remainder", stochastic_rounding=True,
                         state_dtype={"exp_avg": "int8", "exp_avg_sq": "bfloat16"})),
}


def stored(dtype, kwargs, schedule):
    """AdamW in a storage format over two groups, with tensors large enough for 8-bit
    state, one too small for it, and the second group's own lr (a schedule, if asked)."""
    dtype = fastopt.precision.DTYPES[dtype]
    rng = np.random.default_rng(3)
    lr = fastopt.schedules.Exponential(0.005, 0.9) if schedule else 0.005
    return fastopt.AdamW([
        {"params": [rng.standard_normal((64, 80)).astype(dtype),
                    rng.standard_normal(300).astype(dtype)]},
        {"params": [rng.standard_normal(5000).astype(dtype)], "lr": lr}], lr=0.01, **kwargs)


@pytest.mark.parametrize("schedule", [False, True], ids=["", "scheduled"])
@pytest.mark.parametrize("storage", sorted(FORMATS))
def test_every_storage_format_steps_steadily_and_bitwise_as_the_plain_path(
        monkeypatch, storage, schedule):
    dtype, kwargs = FORMATS[storage]
    steady, plain = stored(dtype, kwargs, schedule), stored(dtype, kwargs, schedule)
    grads = [g.astype(steady.flat_grads.dtype) for g in gradients(steady.flat_params.size)]
    plans = count_plans(monkeypatch)
    run(steady, grads, plain=False)
    assert len(plans) == 2  # the two groups of the first step
    run(plain, grads, plain=True)
    assert_same(snapshot(steady), snapshot(plain), grads=False)
    if plain.master_params is not None:
        np.testing.assert_array_equal(steady.master_params.view(np.uint8),
                                      plain.master_params.view(np.uint8))
    assert not np.array_equal(snapshot(steady)["params"], snapshot(stored(dtype, kwargs,
                                                                          schedule))["params"])


def test_options_set_between_steady_steps_take_effect():
    """Setting clip_grad_norm or clip_grad_value drops what the fast path kept: the
    next steps clip, as a plain run that set them at the same step."""
    grads = gradients(1300, steps=6, seed=8)
    runs = []
    for plain in (False, True):
        opt = two_groups("Adam", {"lr": 0.01})
        run(opt, grads[:3], plain)
        opt.clip_grad_norm, opt.clip_grad_value = 5.0, 0.5
        run(opt, grads[3:], plain)
        runs.append(snapshot(opt))
    assert_same(*runs, grads=False)


def test_a_restore_between_steady_steps_resumes_bitwise():
    grads = gradients(1300, steps=6, seed=9)
    opt = two_groups("NAdam", {"lr": 0.01}, schedule=True)
    run(opt, grads[:3], plain=False)
    saved = opt.snapshot()
    run(opt, grads[3:], plain=False)
    uninterrupted = snapshot(opt)
    opt.restore(saved)
    run(opt, grads[3:], plain=False)
    assert_same(snapshot(opt), uninterrupted, grads=False)


def assert_fourth_step_refused(opt, error, match):
    """Three steady steps go through; the fourth raises and changes nothing."""
    run(opt, gradients(opt.flat_params.size, steps=3), plain=False)
    before = snapshot(opt)
    with pytest.raises(error, match=match):
        opt.step()
    assert_unchanged(opt, before)


def test_a_schedule_that_fails_later_stops_the_steady_step_before_any_group_moves():
    opt = two_groups("Adam", {"lr": 0.01})
    opt.param_groups[1]["lr"] = lambda t: 0.01 if t < 3 else float("nan")
    assert_fourth_step_refused(opt, ValueError,
                               r"schedule of param_groups\[1\] returned nan for t=3")


def test_a_schedule_that_changes_the_optimizer_as_it_runs_is_checked_after_it():
    """A schedule is the user's code, called during the step: what it changes is found
    before the first launch, as the plain path finds it."""
    opt = two_groups("Adam", {"lr": 0.01})

    def schedule(t):
        if t == 3:
            opt.param_groups[1]["lr"] = -1.0
        return 0.01

    opt.param_groups[0]["lr"] = schedule
    assert_fourth_step_refused(opt, ValueError, r"learning rate.*param_groups\[1\]")


def test_scalars_that_overflow_at_a_later_step_stop_the_steady_step():
    """A schedule that climbs to an lr whose Adam step size overflows float32."""
    opt = fastopt.Adam([np.ones(10, f32)], lr=lambda t: 1e-3 if t < 3 else 3e38)
    assert_fourth_step_refused(opt, ValueError, "overflows float32 in the scalars of step 4")


@pytest.mark.parametrize("change", ["replace", "resize", "regroup"])
def test_a_state_buffer_or_group_replaced_between_steady_steps_is_checked(change):
    opt = two_groups("Adam", {"lr": 0.01})
    run(opt, gradients(1300, steps=2), plain=False)
    if change == "replace":
        opt.state["exp_avg"] = np.zeros(1300, np.float64)
        error, match = TypeError, r"state\['exp_avg'\] must be a C-contiguous float32"
    elif change == "resize":
        opt.state["exp_avg_sq"] = np.zeros(1299, f32)
        error, match = TypeError, r"state\['exp_avg_sq'\] must be .* of shape \(1300,\)"
    else:
        opt.param_groups[1] = dict(opt.param_groups[1], betas=(0.9, 1.5))
        error, match = ValueError, "betas"
    before = snapshot(opt)
    with pytest.raises(error, match=match):
        opt.step()
    assert_unchanged(opt, before)


@pytest.mark.parametrize("name", ["exp_avg_absmax", "exp_avg_small", "exp_avg_sq"])
def test_an_8_bit_state_array_replaced_between_steady_steps_is_checked(name):
    opt = stored("float32", dict(state_dtype="int8"), schedule=False)
    run(opt, gradients(opt.flat_params.size, steps=2), plain=False)
    opt.state[name] = opt.state[name].astype(np.float64)
    before = snapshot(opt)
    with pytest.raises(TypeError, match=rf"state\['{name}'\] must be"):
        opt.step()
    assert_unchanged(opt, before)


def _bypassing(group, key, value):
    dict.__setitem__(group, key, value)  # a change the group does not count


@pytest.mark.parametrize("change", [
    lambda g: g.__setitem__("lr", 0.02),
    lambda g: g.update(lr=0.02),
    lambda g: g.__ior__({"lr": 0.02}),
    lambda g: g.setdefault("name", "x"),
    lambda g: (_bypassing(g, "note", 1), g.pop("note")),
    lambda g: (_bypassing(g, "note", 1), g.__delitem__("note")),
    lambda g: (_bypassing(g, "note", 1), g.popitem()),
    lambda g: (lambda saved: (g.clear(), dict.update(g, saved)))(dict(g)),
    lambda g: g.__init__(lr=0.02),
], ids=["setitem", "update", "|=", "setdefault", "pop", "del", "popitem", "clear", "__init__"])
def test_every_change_to_a_group_sends_the_next_step_down_the_plain_path(monkeypatch, change):
    """A group counts its changes, and the fast path trusts an unchanged count."""
    opt = two_groups("Adam", {"lr": 0.01})
    run(opt, gradients(1300, steps=2), plain=False)
    plans = count_plans(monkeypatch)
    change(opt.param_groups[1])
    opt.step()
    assert len(plans) == 2  # planned again, both groups
    opt.step()
    assert len(plans) == 2  # and then steady again


def test_a_group_pickles_and_copies_as_the_dict_it_is():
    import copy
    import pickle

    opt = two_groups("Adam", {"lr": 0.01})
    opt.param_groups[0]["lr"] = 0.5
    hyperparameters = {k: v for k, v in opt.param_groups[0].items() if k != "params"}
    for copied in (pickle.loads(pickle.dumps(opt.param_groups[0])),
                   copy.deepcopy(opt.param_groups[0]), copy.copy(opt.param_groups[0])):
        assert isinstance(copied, dict) and copied.keys() == opt.param_groups[0].keys()
        assert {k: v for k, v in copied.items() if k != "params"} == hyperparameters


def test_a_steady_step_of_the_parallel_kernel_is_bitwise_the_plain_one(monkeypatch):
    """Above kernels.cpu.PARALLEL_MIN_SIZE elements the launcher runs the parallel loop."""
    n = 20000
    grads = gradients(n, steps=4)
    steady, plain = (fastopt.AdamW([np.linspace(-1, 1, n, dtype=f32)], lr=0.01)
                     for _ in range(2))
    plans = count_plans(monkeypatch)
    run(steady, grads, plain=False)
    assert len(plans) == 1
    run(plain, grads, plain=True)
    assert_same(snapshot(steady), snapshot(plain), grads=False)
