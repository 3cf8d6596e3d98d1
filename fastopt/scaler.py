"""Dynamic loss scaling for mixed-precision training, with torch.amp.GradScaler's policy."""

import math
import numbers

import numpy as np

from .optim.checks import FLOAT32_MAX, real
from .optim.optimizer import Optimizer

f32 = np.float32


class DynamicLossScaler:
    """Scales the loss up so that small fp16 gradients survive, and adapts the scale.

    The policy is torch.amp.GradScaler's: a step whose gradients hold an Inf or NaN is
    skipped and the scale is multiplied by ``backoff_factor``; after ``growth_interval``
    skipless steps in a row it is multiplied by ``growth_factor`` (unless that would
    overflow float32). The scale is kept in float32, as torch keeps it.

    The optimizer divides the gradients by the scale inside its step kernel
    (``step(grad_scale=...)``), and the non-finite check rides in the read pass over the
    gradients, so unscaling costs no pass of its own::

        scaler = fastopt.DynamicLossScaler()
        loss = scaler.scale_loss(loss)   # then backpropagate the scaled loss
        scaler.step(opt)                 # unscale, check, and step (or skip)
        scaler.update()                  # adapt the scale

    Several optimizers may share one scaler: call ``step`` for each, then ``update``
    once; a non-finite gradient in any of them backs the scale off.

    Attributes:
        scale: the current loss scale.
        growth_tracker: steps without Inf/NaN since the scale last changed.
    """

    def __init__(self, init_scale=2.0 ** 16, growth_factor=2.0, backoff_factor=0.5,
                 growth_interval=2000):
        scale = _float32(real("init_scale", init_scale))
        if not (scale < math.inf and scale * FLOAT32_MAX >= 1.0):
            raise ValueError(f"init_scale must be a float32 (in which the scale is kept) "
                             f"whose inverse is finite, about 2.9e-39 to 3.4e38, got "
                             f"{init_scale!r}")
        if not real("growth_factor", growth_factor) > 1.0:
            raise ValueError(f"growth_factor must be > 1, got {growth_factor!r}")
        if not 0.0 < real("backoff_factor", backoff_factor) < 1.0:
            raise ValueError(f"backoff_factor must be in (0, 1), got {backoff_factor!r}")
        self.scale = scale
        self.growth_factor = float(growth_factor)
        self.backoff_factor = float(backoff_factor)
        self.growth_interval = _count("growth_interval", growth_interval, 1)
        self.growth_tracker = 0
        self._found_inf = False  # in a step since the last update
        self._stepped = set()  # the ids of the optimizers stepped since the last update

    def scale_loss(self, loss):
        """``loss * scale``: backpropagate this, not the loss itself."""
        return loss * self.scale

    def step(self, optimizer, grads=None):
        """Step ``optimizer`` with the gradients divided by the scale, skipping the step
        if any gradient is Inf or NaN. Returns True if the step was taken. ``grads``, as
        a NumPy-API optimizer's ``step`` takes them (a ``fastopt.torch`` optimizer reads
        ``p.grad``, and refuses them). Raises RuntimeError, and steps nothing, once the
        scale has backed off so far that 1/scale overflows float32 (about 150 skipped
        steps in a row from 2**16), or for a second step of ``optimizer`` before
        :meth:`update`, as torch's GradScaler does: a loop without ``update`` would
        never adapt the scale."""
        if grads is not None and not isinstance(optimizer, Optimizer):
            raise TypeError(f"grads: {type(optimizer).__name__}.step takes no gradients "
                            "(a fastopt.torch optimizer reads each parameter's .grad): "
                            "call scaler.step(optimizer)")
        if not self.scale * FLOAT32_MAX >= 1.0:  # torch's goes on to 0 and skips forever
            raise RuntimeError(
                f"the loss scale has backed off to {self.scale:.3g}, where 1/scale "
                "overflows float32: the gradients held an Inf or NaN at every scale tried; "
                "look for one in the loss or the parameters")
        if id(optimizer) in self._stepped:
            raise RuntimeError("step() has already been called for this optimizer since the "
                               "last update(): call scaler.update() after each step")
        skipped = optimizer.skipped_steps
        optimizer.step(grads, grad_scale=self.scale, skip_nonfinite=True)
        self._stepped.add(id(optimizer))
        applied = optimizer.skipped_steps == skipped
        self._found_inf = self._found_inf or not applied
        return applied

    def update(self):
        """Adapt the scale to the steps taken since the last update."""
        if not self._stepped:
            raise RuntimeError("update() needs a step() first")
        if self._found_inf:
            self.scale = _float32(self.scale * self.backoff_factor)
            self.growth_tracker = 0
        elif self.growth_tracker + 1 == self.growth_interval:
            grown = _float32(self.scale * self.growth_factor)
            if math.isfinite(grown):
                self.scale = grown
            self.growth_tracker = 0
        else:
            self.growth_tracker += 1
        self._found_inf, self._stepped = False, set()

    def state_dict(self):
        """The scale, the policy and the tracker, under torch.amp.GradScaler's keys, so
        that either loads the other's."""
        return {"scale": self.scale, "growth_factor": self.growth_factor,
                "backoff_factor": self.backoff_factor, "growth_interval": self.growth_interval,
                "_growth_tracker": self.growth_tracker}

    def load_state_dict(self, state):
        """Load a :meth:`state_dict` (or torch.amp.GradScaler's); validated first."""
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict, as state_dict() returns it, got "
                            f"{type(state).__name__}")
        missing = {"scale", "growth_factor", "backoff_factor", "growth_interval",
                   "_growth_tracker"} - set(state)
        if missing:
            raise ValueError(f"state is missing {sorted(missing)}")
        loaded = DynamicLossScaler(state["scale"], state["growth_factor"],
                                   state["backoff_factor"], state["growth_interval"])
        loaded.growth_tracker = _count("_growth_tracker", state["_growth_tracker"], 0)
        if loaded.growth_tracker >= loaded.growth_interval:  # it would never grow again
            raise ValueError(f"_growth_tracker must be below growth_interval "
                             f"({loaded.growth_interval}), got {loaded.growth_tracker}")
        vars(self).update(vars(loaded))

    def __repr__(self):
        return f"DynamicLossScaler(scale={self.scale}, growth_tracker={self.growth_tracker})"


def _count(name, value, low):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value!r}")
    return int(value)


def _float32(x):
    """``x`` rounded to float32, as torch stores its scale; inf past float32's range."""
    with np.errstate(over="ignore"):
        return float(f32(x))
