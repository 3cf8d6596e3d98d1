"""Learning-rate schedules: callables ``schedule(t) -> lr``.

``t`` is the number of optimizer steps already taken (0, 1, 2, ...). The optimizer calls
``schedule(t)`` on the host, in float64, just before its step number ``t + 1`` and uses the
result as that step's learning rate, so ``schedule(0)`` is the lr of the very first step.
This is torch's convention too: ``schedule(t)`` equals ``scheduler.get_last_lr()[0]`` after
``t`` calls of ``scheduler.step()`` (each made after ``optimizer.step()``), for the torch
scheduler named in each class's docstring, built on an optimizer whose lr is the base lr.

Every schedule is a closed form: ``schedule(t)`` costs the same for any ``t`` and does not
depend on which ``t`` were asked for before. (torch computes most of its schedules
recursively, so the two agree to rounding, about ``t`` ulps, not bit for bit.)

These classes are conveniences, not a protocol: any callable ``t -> lr`` (a function, a
lambda, a ``functools.partial``) works wherever a schedule is accepted, including as the
``after`` schedule of :class:`LinearWarmup`.

>>> s = LinearWarmup(CosineAnnealing(0.1, T_max=100), warmup_steps=10)
>>> s(0), s(5), s(10)
(0.0, 0.05, 0.1)
"""

import bisect
import math
import numbers

__all__ = ["StepDecay", "MultiStep", "Exponential", "InverseTime", "Polynomial",
           "CosineAnnealing", "CosineWarmRestarts", "LinearWarmup", "OneCycle"]


# --- argument checks ---------------------------------------------------------------------

def _int(name, value, low):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return int(value)


def _real(name, value, low=None, high=None, low_open=False, high_open=False):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if low is not None and (value <= low if low_open else value < low):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value!r}")
    if high is not None and (value >= high if high_open else value > high):
        raise ValueError(f"{name} must be {'<' if high_open else '<='} {high}, got {value!r}")
    return value


def _step(t):
    if isinstance(t, bool) or not isinstance(t, numbers.Integral):
        raise TypeError(f"t (steps taken) must be an int, got {t!r}")
    if t < 0:
        raise ValueError(f"t (steps taken) must be >= 0, got {t!r}")
    return int(t)


# --- shared math -------------------------------------------------------------------------

def _linear(start, end, frac):
    """``start`` at frac 0, ``end`` at frac 1, on a straight line."""
    return start + (end - start) * frac


def _cosine(start, end, frac):
    """``start`` at frac 0, ``end`` at frac 1, along half a cosine wave (periodic beyond)."""
    return end + (start - end) * (1.0 + math.cos(math.pi * frac)) / 2.0


def _power(gamma, n):
    """``gamma ** n`` that saturates to inf (as torch's repeated multiplication does)."""
    try:
        return gamma ** n
    except OverflowError:
        return math.inf


class _Schedule:
    _fields = ()

    def __call__(self, t):
        return self._lr(_step(t))

    def __repr__(self):
        args = ", ".join(f"{name}={getattr(self, name)!r}" for name in self._fields)
        return f"{type(self).__name__}({args})"


# --- schedules ---------------------------------------------------------------------------

class StepDecay(_Schedule):
    """``lr * gamma ** (t // step_size)``: decay by ``gamma`` every ``step_size`` steps.

    torch counterpart: ``StepLR(optimizer, step_size, gamma)``.
    """

    _fields = ("lr", "step_size", "gamma")

    def __init__(self, lr, step_size, gamma=0.1):
        self.lr = _real("lr", lr, low=0.0)
        self.step_size = _int("step_size", step_size, low=1)
        self.gamma = _real("gamma", gamma, low=0.0, low_open=True)

    def _lr(self, t):
        return self.lr * _power(self.gamma, t // self.step_size)


class MultiStep(_Schedule):
    """``lr * gamma ** (number of milestones <= t)``.

    A milestone given k times decays by ``gamma ** k`` there, as in torch. Milestones must
    be positive (a milestone at 0 would only rescale ``lr``) and non-decreasing.

    torch counterpart: ``MultiStepLR(optimizer, milestones, gamma)``.
    """

    _fields = ("lr", "milestones", "gamma")

    def __init__(self, lr, milestones, gamma=0.1):
        self.lr = _real("lr", lr, low=0.0)
        try:
            milestones = tuple(milestones)
        except TypeError:
            raise TypeError(f"milestones must be a sequence of ints, got {milestones!r}") from None
        for m in milestones:
            if isinstance(m, bool) or not isinstance(m, numbers.Integral):
                raise TypeError(f"milestones must be ints, got {milestones!r}")
            if m < 1:
                raise ValueError(f"milestones must be positive, got {milestones!r}")
        if any(a > b for a, b in zip(milestones, milestones[1:])):
            raise ValueError(f"milestones must be non-decreasing, got {milestones!r}")
        self.milestones = tuple(int(m) for m in milestones)
        self.gamma = _real("gamma", gamma, low=0.0, low_open=True)

    def _lr(self, t):
        return self.lr * _power(self.gamma, bisect.bisect_right(self.milestones, t))


class Exponential(_Schedule):
    """``lr * gamma ** t``.

    torch counterpart: ``ExponentialLR(optimizer, gamma)``.
    """

    _fields = ("lr", "gamma")

    def __init__(self, lr, gamma):
        self.lr = _real("lr", lr, low=0.0)
        self.gamma = _real("gamma", gamma, low=0.0, low_open=True)

    def _lr(self, t):
        return self.lr * _power(self.gamma, t)


class InverseTime(_Schedule):
    """``lr / (1 + k * t)``.

    torch counterpart: ``LambdaLR(optimizer, lambda t: 1 / (1 + k * t))``.
    """

    _fields = ("lr", "k")

    def __init__(self, lr, k):
        self.lr = _real("lr", lr, low=0.0)
        self.k = _real("k", k, low=0.0)

    def _lr(self, t):
        return self.lr / (1.0 + self.k * t)


class Polynomial(_Schedule):
    """``lr * (1 - min(t, total_steps) / total_steps) ** power``: reaches 0 at
    ``total_steps`` and stays there.

    torch counterpart: ``PolynomialLR(optimizer, total_iters=total_steps, power)``.
    """

    _fields = ("lr", "total_steps", "power")

    def __init__(self, lr, total_steps, power=1.0):
        self.lr = _real("lr", lr, low=0.0)
        self.total_steps = _int("total_steps", total_steps, low=1)
        self.power = _real("power", power, low=0.0, low_open=True)

    def _lr(self, t):
        return self.lr * (1.0 - min(t, self.total_steps) / self.total_steps) ** self.power


class CosineAnnealing(_Schedule):
    """``eta_min + (lr - eta_min) * (1 + cos(pi * t / T_max)) / 2``.

    Past ``T_max`` the cosine simply continues: the lr climbs back to ``lr`` at
    ``2 * T_max``, falls again, and so on with period ``2 * T_max``. torch's recursive
    update does exactly this (it has a special case to step off the minimum), so this is
    what torch gives too; use :class:`CosineWarmRestarts` for restarts, or make ``T_max``
    the total number of steps.

    torch counterpart: ``CosineAnnealingLR(optimizer, T_max, eta_min)``.
    """

    _fields = ("lr", "T_max", "eta_min")

    def __init__(self, lr, T_max, eta_min=0.0):
        self.lr = _real("lr", lr, low=0.0)
        self.T_max = _int("T_max", T_max, low=1)
        self.eta_min = _real("eta_min", eta_min, low=0.0)

    def _lr(self, t):
        return _cosine(self.lr, self.eta_min, t / self.T_max)


class CosineWarmRestarts(_Schedule):
    """SGDR: ``eta_min + (lr - eta_min) * (1 + cos(pi * T_cur / T_i)) / 2``.

    Cycle i has ``T_i = T_0 * T_mult ** i`` steps and ``T_cur`` counts steps since the
    cycle began, so the lr jumps back to ``lr`` at t = T_0, T_0 + T_0*T_mult, ...

    torch counterpart: ``CosineAnnealingWarmRestarts(optimizer, T_0, T_mult, eta_min)``,
    stepped with ``scheduler.step()`` (no epoch argument).
    """

    _fields = ("lr", "T_0", "T_mult", "eta_min")

    def __init__(self, lr, T_0, T_mult=1, eta_min=0.0):
        self.lr = _real("lr", lr, low=0.0)
        self.T_0 = _int("T_0", T_0, low=1)
        self.T_mult = _int("T_mult", T_mult, low=1)
        self.eta_min = _real("eta_min", eta_min, low=0.0)

    def _lr(self, t):
        if self.T_mult == 1:
            t_cur, t_i = t % self.T_0, self.T_0
        else:  # cycle lengths grow geometrically: O(log t) exact integer steps
            t_cur, t_i = t, self.T_0
            while t_cur >= t_i:
                t_cur, t_i = t_cur - t_i, t_i * self.T_mult
        return _cosine(self.lr, self.eta_min, t_cur / t_i)


class LinearWarmup(_Schedule):
    """Linear warmup into another schedule.

    ``after(0) * (start_factor + (1 - start_factor) * t / warmup_steps)`` for
    ``t < warmup_steps``, then ``after(t - warmup_steps)``. ``after`` is any callable
    ``t -> lr`` or a number (a constant lr). The ramp ends one step short of ``after(0)``
    (at ``t = warmup_steps - 1`` the factor is still below 1), exactly as torch's
    ``SequentialLR`` hands over: the milestone step restarts the second scheduler at its
    epoch 0. The ramp aims at ``after(0)``; torch's aims at the optimizer's initial lr,
    which is the same lr for every schedule here except a degenerate OneCycle with
    ``pct_start * total_steps < 1`` (its t = 0 is already past the peak).

    ``start_factor=0`` is allowed (lr 0 on the very first step); torch's LinearLR requires
    ``start_factor > 0``. ``warmup_steps=0`` means no warmup.

    torch counterpart: ``SequentialLR(optimizer, [LinearLR(optimizer, start_factor, 1.0,
    total_iters=warmup_steps), <after's scheduler>], milestones=[warmup_steps])``.
    """

    _fields = ("after", "warmup_steps", "start_factor")

    def __init__(self, after, warmup_steps, start_factor=0.0):
        if isinstance(after, numbers.Real) and not isinstance(after, bool):
            after = _real("after", after, low=0.0)
        elif not callable(after):
            raise TypeError(f"after must be a callable t -> lr or a number, got {after!r}")
        self.after = after
        self.warmup_steps = _int("warmup_steps", warmup_steps, low=0)
        self.start_factor = _real("start_factor", start_factor, low=0.0, high=1.0)

    def _after(self, t):
        return self.after(t) if callable(self.after) else self.after

    def _lr(self, t):
        if t < self.warmup_steps:
            return self._after(0) * _linear(self.start_factor, 1.0, t / self.warmup_steps)
        return self._after(t - self.warmup_steps)


class OneCycle(_Schedule):
    """The 1cycle policy: up from ``max_lr / div_factor`` to ``max_lr``, then down to
    ``max_lr / div_factor / final_div_factor``, over ``total_steps`` steps.

    Phases end at steps ``pct_start * total_steps - 1`` (the peak) and
    ``total_steps - 1``; with ``three_phase=True`` the lr first returns to the initial lr at
    ``2 * pct_start * total_steps - 2`` and only then anneals to the minimum. Within a phase
    the lr moves from its start to its end value by ``anneal_strategy``: half a cosine
    (``"cos"``) or a straight line (``"linear"``).

    torch counterpart: ``OneCycleLR(optimizer, max_lr, total_steps, pct_start,
    anneal_strategy, cycle_momentum=False, div_factor=div_factor,
    final_div_factor=final_div_factor, three_phase=three_phase)``. Only the lr is
    cycled; fastopt schedules never touch momentum or betas.

    Differences from torch: ``schedule(t)`` raises ValueError for ``t >= total_steps``
    (those steps lie outside the cycle; torch still returns an extrapolated value after
    the ``total_steps``-th ``scheduler.step()`` and raises after the next one), and a
    zero-length warmup phase (``pct_start * total_steps == 1``, where torch divides by
    zero) gives ``max_lr`` at t = 0.
    """

    _fields = ("max_lr", "total_steps", "pct_start", "anneal_strategy", "div_factor",
               "final_div_factor", "three_phase")

    def __init__(self, max_lr, total_steps, pct_start=0.3, anneal_strategy="cos",
                 div_factor=25.0, final_div_factor=1e4, three_phase=False):
        self.max_lr = _real("max_lr", max_lr, low=0.0)
        self.total_steps = _int("total_steps", total_steps, low=1)
        self.pct_start = _real("pct_start", pct_start, low=0.0, high=1.0,
                               low_open=True, high_open=True)
        if anneal_strategy not in ("cos", "linear"):
            raise ValueError(f"anneal_strategy must be 'cos' or 'linear', got {anneal_strategy!r}")
        self.anneal_strategy = anneal_strategy
        self.div_factor = _real("div_factor", div_factor, low=0.0, low_open=True)
        self.final_div_factor = _real("final_div_factor", final_div_factor, low=0.0,
                                      low_open=True)
        if not isinstance(three_phase, bool):
            raise TypeError(f"three_phase must be a bool, got {three_phase!r}")
        self.three_phase = three_phase

        initial = self.max_lr / self.div_factor
        final = initial / self.final_div_factor
        peak = self.pct_start * self.total_steps - 1.0
        last = float(self.total_steps - 1)
        if three_phase:  # (end step, lr at phase start, lr at phase end)
            self._phases = ((peak, initial, self.max_lr),
                            (2.0 * self.pct_start * self.total_steps - 2.0, self.max_lr, initial),
                            (last, initial, final))
        else:
            self._phases = ((peak, initial, self.max_lr), (last, self.max_lr, final))
        self._anneal = _cosine if anneal_strategy == "cos" else _linear

    def _lr(self, t):
        if t >= self.total_steps:
            raise ValueError(f"t={t} is past the cycle: OneCycle(total_steps="
                             f"{self.total_steps}) defines t = 0 .. {self.total_steps - 1}")
        start = 0.0
        for end, lr_start, lr_end in self._phases[:-1]:
            if t <= end:
                break
            start = end
        else:
            end, lr_start, lr_end = self._phases[-1]
        frac = (t - start) / (end - start) if end != start else 1.0
        return self._anneal(lr_start, lr_end, frac)
