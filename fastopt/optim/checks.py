"""Checks of hyperparameter values, with torch's messages: each raises TypeError or
ValueError naming the argument and what was expected."""

import math

import numpy as np

FLOAT32_MAX = float(np.finfo(np.float32).max)
FLOAT32_TINY = 2.0 ** -126  # the smallest normal float32


def real(name, value):
    # Other reals (Fraction, np.longdouble) would be kept in the group as they are,
    # neither float64 in the host's math nor saved by a checkpoint.
    if isinstance(value, (bool, np.longdouble)) or not isinstance(
            value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a real number (an int or a float), got {value!r}")
    if abs(value) > FLOAT32_MAX:
        raise ValueError(f"{name}={value} does not fit in float32")
    return float(value)


def check_number(name, value):
    """A real number of any sign, as torch takes it (ASGD's ``alpha`` and ``t0``), but
    not NaN, which no step can use."""
    if math.isnan(real(name, value)):
        raise ValueError(f"Invalid {name} value: {value} (expected a number, not NaN)")


def check_nonnegative(name, value, label=None):
    if not 0.0 <= real(name, value):
        raise ValueError(f"Invalid {label or name + ' value'}: {value} (expected {name} >= 0)")


def check_lr(value):
    if not callable(value):  # a schedule's values are checked at every step
        check_nonnegative("lr", value, "learning rate")


def check_eps(value):
    check_nonnegative("eps", value, "epsilon value")


def check_betas(betas, count=2):
    if not isinstance(betas, (tuple, list)) or len(betas) != count:
        names = ", ".join(f"beta{i + 1}" for i in range(count))
        raise TypeError(f"betas must be a {'pair' if count == 2 else 'triple'} ({names}), "
                        f"got {betas!r}")
    for i, beta in enumerate(betas):
        if not 0.0 <= real(f"betas[{i}]", beta) < 1.0:
            raise ValueError(f"Invalid beta parameter at index {i}: {beta} "
                             f"(expected 0 <= betas[{i}] < 1)")


def check_flag(name, value):
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r}")


def plain(value):
    """``value`` with NumPy scalars (also in a tuple or list) as the Python numbers they
    equal: ``np.float32(0.1)`` becomes the float it holds exactly, so that the host math
    is float64's (NumPy would keep it in float32) and the value saves to JSON."""
    if isinstance(value, (np.bool_, np.integer, np.floating)) and \
            not isinstance(value, np.longdouble):  # which .item() keeps: see real
        return value.item()
    if isinstance(value, (tuple, list)) and any(isinstance(item, np.generic)
                                                for item in value):
        return (list if isinstance(value, list) else tuple)(map(plain, value))
    return value


def positive_or_none(name, value):
    if value is None:
        return None
    if not real(name, value) > 0.0:
        raise ValueError(f"{name} must be None or a number > 0, got {value!r}")
    return float(value)
