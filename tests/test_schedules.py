"""fastopt.schedules: validation (no torch needed) and parity with torch.optim.lr_scheduler."""

import math
import warnings

import pytest

from fastopt.schedules import (CosineAnnealing, CosineWarmRestarts, Exponential, InverseTime,
                               LinearWarmup, MultiStep, OneCycle, Polynomial, StepDecay)

N = 400  # steps compared with torch: past T_max, total_steps, ... in every case below
RTOL, ATOL = 1e-9, 1e-15  # torch recurses, drifting ~t ulps (worst seen: 7e-14 relative)


@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch")


# Each case: (fastopt schedule, base lr of the torch optimizer, torch scheduler factory
# taking (lr_scheduler module, optimizer)). OneCycle sets its own lr, so its base is moot.
CASES = {
    "step": (StepDecay(0.1, 30), 0.1,
             lambda S, o: S.StepLR(o, 30)),
    "step-gamma1": (StepDecay(0.5, 7, gamma=1.0), 0.5,
                    lambda S, o: S.StepLR(o, 7, gamma=1.0)),
    "step-size1": (StepDecay(1.0, 1, gamma=0.97), 1.0,
                   lambda S, o: S.StepLR(o, 1, gamma=0.97)),
    "step-grow": (StepDecay(1e-3, 50, gamma=2.0), 1e-3,
                  lambda S, o: S.StepLR(o, 50, gamma=2.0)),
    "multistep": (MultiStep(0.1, [30, 80, 200]), 0.1,
                  lambda S, o: S.MultiStepLR(o, [30, 80, 200])),
    "multistep-repeats": (MultiStep(0.2, [10, 10, 50, 50, 50], gamma=0.5), 0.2,
                          lambda S, o: S.MultiStepLR(o, [10, 10, 50, 50, 50], gamma=0.5)),
    "multistep-gamma1": (MultiStep(0.1, [5, 6], gamma=1.0), 0.1,
                         lambda S, o: S.MultiStepLR(o, [5, 6], gamma=1.0)),
    "multistep-empty": (MultiStep(0.1, []), 0.1,
                        lambda S, o: S.MultiStepLR(o, [])),
    "exp": (Exponential(0.1, 0.99), 0.1,
            lambda S, o: S.ExponentialLR(o, 0.99)),
    "exp-gamma1": (Exponential(0.1, 1.0), 0.1,
                   lambda S, o: S.ExponentialLR(o, 1.0)),
    "exp-fast": (Exponential(1.0, 0.5), 1.0,
                 lambda S, o: S.ExponentialLR(o, 0.5)),
    "invtime": (InverseTime(0.1, 0.01), 0.1,
                lambda S, o: S.LambdaLR(o, lambda t: 1 / (1 + 0.01 * t))),
    "invtime-k0": (InverseTime(0.1, 0.0), 0.1,
                   lambda S, o: S.LambdaLR(o, lambda t: 1.0)),
    "poly": (Polynomial(0.1, 100), 0.1,
             lambda S, o: S.PolynomialLR(o, total_iters=100)),
    "poly-sqrt": (Polynomial(0.1, 250, power=0.5), 0.1,
                  lambda S, o: S.PolynomialLR(o, total_iters=250, power=0.5)),
    "poly-cubic": (Polynomial(0.3, 1, power=3.0), 0.3,
                   lambda S, o: S.PolynomialLR(o, total_iters=1, power=3.0)),
    "cos": (CosineAnnealing(0.1, 100), 0.1,
            lambda S, o: S.CosineAnnealingLR(o, 100)),
    "cos-eta": (CosineAnnealing(0.1, 37, eta_min=1e-3), 0.1,
                lambda S, o: S.CosineAnnealingLR(o, 37, eta_min=1e-3)),
    "cos-tmax1": (CosineAnnealing(0.1, 1), 0.1,
                  lambda S, o: S.CosineAnnealingLR(o, 1)),
    "cos-tmax2": (CosineAnnealing(0.1, 2, eta_min=0.05), 0.1,
                  lambda S, o: S.CosineAnnealingLR(o, 2, eta_min=0.05)),
    "sgdr": (CosineWarmRestarts(0.1, 50), 0.1,
             lambda S, o: S.CosineAnnealingWarmRestarts(o, 50)),
    "sgdr-mult2": (CosineWarmRestarts(0.1, 10, T_mult=2, eta_min=1e-4), 0.1,
                   lambda S, o: S.CosineAnnealingWarmRestarts(o, 10, T_mult=2, eta_min=1e-4)),
    "sgdr-mult3-T1": (CosineWarmRestarts(0.1, 1, T_mult=3), 0.1,
                      lambda S, o: S.CosineAnnealingWarmRestarts(o, 1, T_mult=3)),
    "sgdr-T1": (CosineWarmRestarts(0.1, 1), 0.1,
                lambda S, o: S.CosineAnnealingWarmRestarts(o, 1)),
    "onecycle": (OneCycle(1.0, 300), 0.1,
                 lambda S, o: S.OneCycleLR(o, 1.0, total_steps=300, cycle_momentum=False)),
    "onecycle-linear": (OneCycle(0.5, 97, pct_start=0.25, anneal_strategy="linear"), 0.1,
                        lambda S, o: S.OneCycleLR(o, 0.5, total_steps=97, pct_start=0.25,
                                                  anneal_strategy="linear",
                                                  cycle_momentum=False)),
    "onecycle-3phase": (OneCycle(2.0, 200, pct_start=0.4, div_factor=10.0,
                                 final_div_factor=100.0, three_phase=True), 0.1,
                        lambda S, o: S.OneCycleLR(o, 2.0, total_steps=200, pct_start=0.4,
                                                  div_factor=10.0, final_div_factor=100.0,
                                                  three_phase=True, cycle_momentum=False)),
    "onecycle-3phase-linear": (OneCycle(1.0, 50, anneal_strategy="linear", three_phase=True),
                               0.1,
                               lambda S, o: S.OneCycleLR(o, 1.0, total_steps=50,
                                                         anneal_strategy="linear",
                                                         three_phase=True,
                                                         cycle_momentum=False)),
    "onecycle-short": (OneCycle(1.0, 3), 0.1,  # pct_start * total_steps < 1: torch skips warmup
                       lambda S, o: S.OneCycleLR(o, 1.0, total_steps=3, cycle_momentum=False)),
    "onecycle-1": (OneCycle(1.0, 1, three_phase=True), 0.1,
                   lambda S, o: S.OneCycleLR(o, 1.0, total_steps=1, three_phase=True,
                                             cycle_momentum=False)),
}


def _warmup_cases():
    """Every case above with a linear warmup in front, plus warmup into a constant.

    torch's LinearLR ramps towards the optimizer's initial lr, ours towards after(0). They
    are the same lr except for a OneCycle so short that pct_start * total_steps < 1, whose
    t = 0 is already past the peak; those two degenerate cycles are left out here.
    """
    cases = {}
    for (steps, factor) in [(10, 0.1), (1, 0.5), (25, 1.0)]:
        for name, (schedule, base, make) in CASES.items():
            if name in ("onecycle-short", "onecycle-1"):
                continue
            def make_seq(S, o, make=make, steps=steps, factor=factor):
                warm = S.LinearLR(o, start_factor=factor, end_factor=1.0, total_iters=steps)
                return S.SequentialLR(o, [warm, make(S, o)], milestones=[steps])
            cases[f"warmup{steps}x{factor}-{name}"] = (
                LinearWarmup(schedule, steps, start_factor=factor), base, make_seq)
        cases[f"warmup{steps}x{factor}-constant"] = (
            LinearWarmup(0.3, steps, start_factor=factor), 0.3,
            lambda S, o, steps=steps, factor=factor: S.SequentialLR(
                o, [S.LinearLR(o, factor, 1.0, total_iters=steps),
                    S.LambdaLR(o, lambda t: 1.0)], milestones=[steps]))
    return cases


ALL_CASES = {**CASES, **_warmup_cases()}


def _torch_lrs(torch, base, make, steps):
    """get_last_lr()[0] after t = 0 .. steps - 1 calls of scheduler.step()."""
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=base)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. stepping in the wrong order
        scheduler = make(torch.optim.lr_scheduler, optimizer)
        lrs = []
        for t in range(steps):
            lrs.append(scheduler.get_last_lr()[0])
            if t + 1 < steps:
                optimizer.step()
                scheduler.step()
    return lrs


def _length(schedule):
    """How many t to compare: N, or up to the end of a OneCycle."""
    if isinstance(schedule, LinearWarmup):
        return schedule.warmup_steps + _length(schedule.after)
    if isinstance(schedule, OneCycle):
        return schedule.total_steps
    return N


@pytest.mark.parametrize("name", list(ALL_CASES))
def test_matches_torch(torch, name):
    schedule, base, make = ALL_CASES[name]
    steps = _length(schedule)
    expected = _torch_lrs(torch, base, make, steps)
    got = [schedule(t) for t in range(steps)]
    bad = [(t, g, e) for t, (g, e) in enumerate(zip(got, expected))
           if not math.isclose(g, e, rel_tol=RTOL, abs_tol=ATOL)]
    assert not bad, f"{schedule!r} differs from torch at (t, fastopt, torch): {bad[:5]}"


def test_onecycle_zero_length_warmup(torch):
    # pct_start * total_steps == 1: torch divides by zero at t = 0; we take the phase's end
    # (max_lr) there, and from t = 1 on it is an ordinary cosine decay to the minimum.
    with pytest.raises(ZeroDivisionError):
        _torch_lrs(torch, 0.1, lambda S, o: S.OneCycleLR(
            o, 1.0, total_steps=10, pct_start=0.1, cycle_momentum=False), 1)
    schedule = OneCycle(1.0, 10, pct_start=0.1)
    assert schedule(0) == 1.0
    final = 1.0 / 25 / 1e4
    for t in range(1, 10):
        expected = final + (1.0 - final) * (1 + math.cos(math.pi * t / 9)) / 2
        assert schedule(t) == pytest.approx(expected, rel=1e-12)


# --- without torch -----------------------------------------------------------------------

ANY = [StepDecay(0.1, 3), MultiStep(0.1, [2]), Exponential(0.1, 0.9), InverseTime(0.1, 1.0),
       Polynomial(0.1, 5), CosineAnnealing(0.1, 5), CosineWarmRestarts(0.1, 2, T_mult=2),
       LinearWarmup(CosineAnnealing(0.1, 5), 3), LinearWarmup(0.1, 3), OneCycle(0.1, 10)]


@pytest.mark.parametrize("schedule", ANY, ids=repr)
@pytest.mark.parametrize("t, error", [(-1, ValueError), (1.5, TypeError), (2.0, TypeError),
                                      ("3", TypeError), (True, TypeError), (None, TypeError)])
def test_bad_t(schedule, t, error):
    with pytest.raises(error, match=r"^t "):
        schedule(t)


@pytest.mark.parametrize("schedule", ANY, ids=repr)
def test_returns_float_for_int_like_t(schedule):
    value = schedule(3)
    assert type(value) is float and math.isfinite(value)
    numpy = pytest.importorskip("numpy")
    assert schedule(numpy.int64(3)) == value


@pytest.mark.parametrize("schedule", [s for s in ANY if not isinstance(s, OneCycle)], ids=repr)
def test_closed_form_any_t_any_order(schedule):
    ts = [10**15, 7, 0, 10**6, 3, 7]
    first = [schedule(t) for t in ts]
    assert first == [schedule(t) for t in reversed(ts)][::-1]
    assert all(math.isfinite(v) and v >= 0 for v in first)


def test_growth_saturates_instead_of_overflowing():
    assert Exponential(1.0, 2.0)(10**6) == math.inf
    assert StepDecay(1.0, 1, gamma=1.5)(10**6) == math.inf


def test_onecycle_past_the_cycle():
    schedule = OneCycle(1.0, 100)
    schedule(99)
    with pytest.raises(ValueError, match="total_steps"):
        schedule(100)


def test_warmup():
    schedule = LinearWarmup(StepDecay(0.2, 10, gamma=0.5), 4)  # start_factor 0: lr 0 first
    assert [schedule(t) for t in range(6)] == [0.0, 0.05, 0.1, 0.15000000000000002, 0.2, 0.2]
    assert schedule(14) == 0.1
    assert LinearWarmup(lambda t: 1.0 / (t + 1), 2, start_factor=0.5)(1) == 0.75
    nested = LinearWarmup(LinearWarmup(1.0, 2, start_factor=0.5), 2)  # ramps to inner(0)
    assert [nested(t) for t in range(5)] == [0.0, 0.25, 0.5, 0.75, 1.0]
    no_warmup = LinearWarmup(Exponential(1.0, 0.5), 0)
    assert [no_warmup(t) for t in range(3)] == [1.0, 0.5, 0.25]


def test_repr():
    assert repr(StepDecay(0.1, 30)) == "StepDecay(lr=0.1, step_size=30, gamma=0.1)"
    assert repr(MultiStep(1, [3, 5])) == "MultiStep(lr=1.0, milestones=(3, 5), gamma=0.1)"
    assert (repr(LinearWarmup(CosineAnnealing(0.1, 100), 5))
            == "LinearWarmup(after=CosineAnnealing(lr=0.1, T_max=100, eta_min=0.0), "
               "warmup_steps=5, start_factor=0.0)")
    assert repr(OneCycle(0.1, 10)) == (
        "OneCycle(max_lr=0.1, total_steps=10, pct_start=0.3, anneal_strategy='cos', "
        "div_factor=25.0, final_div_factor=10000.0, three_phase=False)")
    for schedule in ANY:
        assert repr(schedule).startswith(type(schedule).__name__ + "(")


BAD_ARGS = [
    # (constructor, args, kwargs, error, argument named in the message)
    (StepDecay, (-0.1, 3), {}, ValueError, "lr"),
    (StepDecay, (math.nan, 3), {}, ValueError, "lr"),
    (StepDecay, (math.inf, 3), {}, ValueError, "lr"),
    (StepDecay, ("0.1", 3), {}, TypeError, "lr"),
    (StepDecay, (0.1, 0), {}, ValueError, "step_size"),
    (StepDecay, (0.1, 2.0), {}, TypeError, "step_size"),
    (StepDecay, (0.1, True), {}, TypeError, "step_size"),
    (StepDecay, (0.1, 3), {"gamma": 0.0}, ValueError, "gamma"),
    (StepDecay, (0.1, 3), {"gamma": -0.5}, ValueError, "gamma"),
    (StepDecay, (0.1, 3), {"gamma": None}, TypeError, "gamma"),
    (MultiStep, (0.1, [5, 3]), {}, ValueError, "milestones"),
    (MultiStep, (0.1, [0, 3]), {}, ValueError, "milestones"),
    (MultiStep, (0.1, [-2]), {}, ValueError, "milestones"),
    (MultiStep, (0.1, [1.5]), {}, TypeError, "milestones"),
    (MultiStep, (0.1, 5), {}, TypeError, "milestones"),
    (MultiStep, (0.1, [5]), {"gamma": 0}, ValueError, "gamma"),
    (Exponential, (0.1, 0.0), {}, ValueError, "gamma"),
    (Exponential, (0.1, "0.9"), {}, TypeError, "gamma"),
    (Exponential, (-1, 0.9), {}, ValueError, "lr"),
    (InverseTime, (0.1, -0.1), {}, ValueError, "k"),
    (InverseTime, (0.1, math.inf), {}, ValueError, "k"),
    (InverseTime, (0.1, None), {}, TypeError, "k"),
    (Polynomial, (0.1, 0), {}, ValueError, "total_steps"),
    (Polynomial, (0.1, 10.0), {}, TypeError, "total_steps"),
    (Polynomial, (0.1, 10), {"power": 0.0}, ValueError, "power"),
    (Polynomial, (0.1, 10), {"power": -1.0}, ValueError, "power"),
    (CosineAnnealing, (0.1, 0), {}, ValueError, "T_max"),
    (CosineAnnealing, (0.1, 10.5), {}, TypeError, "T_max"),
    (CosineAnnealing, (0.1, 10), {"eta_min": -1e-3}, ValueError, "eta_min"),
    (CosineAnnealing, (0.1, 10), {"eta_min": "0"}, TypeError, "eta_min"),
    (CosineWarmRestarts, (0.1, 0), {}, ValueError, "T_0"),
    (CosineWarmRestarts, (0.1, 1.0), {}, TypeError, "T_0"),
    (CosineWarmRestarts, (0.1, 10), {"T_mult": 0}, ValueError, "T_mult"),
    (CosineWarmRestarts, (0.1, 10), {"T_mult": 1.5}, TypeError, "T_mult"),
    (CosineWarmRestarts, (0.1, 10), {"eta_min": -1.0}, ValueError, "eta_min"),
    (LinearWarmup, ("fast", 10), {}, TypeError, "after"),
    (LinearWarmup, (None, 10), {}, TypeError, "after"),
    (LinearWarmup, (-0.1, 10), {}, ValueError, "after"),
    (LinearWarmup, (0.1, -1), {}, ValueError, "warmup_steps"),
    (LinearWarmup, (0.1, 2.5), {}, TypeError, "warmup_steps"),
    (LinearWarmup, (0.1, 10), {"start_factor": -0.1}, ValueError, "start_factor"),
    (LinearWarmup, (0.1, 10), {"start_factor": 1.5}, ValueError, "start_factor"),
    (LinearWarmup, (0.1, 10), {"start_factor": None}, TypeError, "start_factor"),
    (OneCycle, (-1.0, 10), {}, ValueError, "max_lr"),
    (OneCycle, (1.0, 0), {}, ValueError, "total_steps"),
    (OneCycle, (1.0, 10.0), {}, TypeError, "total_steps"),
    (OneCycle, (1.0, 10), {"pct_start": 0.0}, ValueError, "pct_start"),
    (OneCycle, (1.0, 10), {"pct_start": 1.0}, ValueError, "pct_start"),
    (OneCycle, (1.0, 10), {"pct_start": "0.3"}, TypeError, "pct_start"),
    (OneCycle, (1.0, 10), {"anneal_strategy": "cosine"}, ValueError, "anneal_strategy"),
    (OneCycle, (1.0, 10), {"anneal_strategy": None}, ValueError, "anneal_strategy"),
    (OneCycle, (1.0, 10), {"div_factor": 0.0}, ValueError, "div_factor"),
    (OneCycle, (1.0, 10), {"final_div_factor": -1.0}, ValueError, "final_div_factor"),
    (OneCycle, (1.0, 10), {"three_phase": 1}, TypeError, "three_phase"),
]


@pytest.mark.parametrize("cls, args, kwargs, error, name", BAD_ARGS,
                         ids=[f"{c.__name__}-{n}-{i}" for i, (c, _, _, _, n)
                              in enumerate(BAD_ARGS)])
def test_bad_arguments(cls, args, kwargs, error, name):
    with pytest.raises(error) as info:
        cls(*args, **kwargs)
    assert str(info.value).startswith(name + " "), str(info.value)
