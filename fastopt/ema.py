"""An exponential moving average of parameters, updated in one fused pass."""

import contextlib

import numpy as np

from ._backend import backend_of, is_c_contiguous
from .flat import check_dtype
from .kernels import rules
from .optim.checks import real
from .optim.optimizer import Optimizer

f32 = np.float32


class EMA:
    r"""A shadow copy of the parameters that follows them as an exponential moving average.

    .. math::
        v_t \leftarrow \beta\,v_{t-1} + (1 - \beta)\,\theta_t, \qquad
        \hat\theta_t = \frac{v_t}{1 - \beta^t}

    With ``bias_correction=True`` the average starts at :math:`v_0 = 0` and is divided by
    :math:`1 - \beta^t`, which removes the pull towards zero of the first updates (the
    bias of a zero-initialised average). With ``bias_correction=False`` it starts at
    :math:`v_0 = \theta_0` and is used as it is, like most model-EMA code.

    Call :meth:`update` after every optimizer step. For evaluation, :meth:`copy_to`
    writes the (corrected) average into the live parameters after saving them, and
    :meth:`restore` puts them back; ``with ema.applied(): ...`` does both::

        opt = fastopt.Adam(params)
        ema = fastopt.EMA(opt, decay=0.999)
        for batch in data:
            ...; opt.step(); ema.update()
        with ema.applied():
            evaluate(opt.params)

    Args:
        params: an optimizer (its ``flat_params``, updated in one pass), or a dict or list
            of float32 arrays, NumPy or CUDA, each C-contiguous and writeable (one pass
            per array), or of one 16-bit dtype (bfloat16 or float16, on the CPU), whose
            average is float32 all the same. The arrays are tracked, not copied.
        decay: β, in [0, 1).
        bias_correction: divide by :math:`1 - \beta^t`; see above.

    Attributes:
        shadow: the flat float32 buffer holding :math:`v_t`.
        updates: t, the number of updates so far.
    """

    def __init__(self, params, decay=0.999, bias_correction=True):
        if not 0.0 <= real("decay", decay) < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay!r}")
        if not isinstance(bias_correction, (bool, np.bool_)):
            raise TypeError(f"bias_correction must be True or False, got {bias_correction!r}")
        self._backend, self._targets = _targets(params)
        self.decay = float(decay)
        self.bias_correction = bool(bias_correction)
        self.updates = 0
        sizes = [a.size for a in self._targets]
        offsets = np.cumsum([0] + sizes).tolist()
        self._ranges = list(zip(offsets, offsets[1:]))
        self.shadow = self._backend.zeros(offsets[-1])
        self._shadows = self._slices(self.shadow)
        if not self.bias_correction:
            for shadow, target in zip(self._shadows, self._targets):
                self._backend.copy(shadow, target)
        self._backup = None

    def update(self):
        """Move the average towards the current parameters: one pass per array."""
        h = rules.EMAScalars.of(decay=f32(self.decay), one_minus_decay=f32(1.0 - self.decay))
        for shadow, target in zip(self._shadows, self._targets):
            self._backend.ema(shadow, target, h)
        self.updates += 1

    def correction(self):
        """The factor ``1 / (1 - decay**t)`` that removes the zero-start bias (1 without
        bias correction)."""
        if not self.bias_correction:
            return 1.0
        if self.updates == 0:
            raise RuntimeError("the average is empty: call update() at least once first")
        return 1.0 / (1.0 - self.decay ** self.updates)

    def copy_to(self):
        """Save the live parameters, then overwrite them with the average."""
        if self._backup is not None:
            raise RuntimeError("the average is already in place: restore() first, or the "
                               "saved parameters would be overwritten")
        scale = f32(self.correction())
        self._backup = self._backend.zeros(self.shadow.size, self._targets[0].dtype)
        for backup, shadow, target in zip(self._slices(self._backup), self._shadows,
                                          self._targets):
            self._backend.copy(backup, target)
            self._backend.scale_into(target, shadow, scale)

    def restore(self):
        """Put back the parameters that :meth:`copy_to` saved."""
        if self._backup is None:
            raise RuntimeError("nothing to restore: copy_to() has not been called")
        for backup, target in zip(self._slices(self._backup), self._targets):
            self._backend.copy(target, backup)
        self._backup = None

    @contextlib.contextmanager
    def applied(self):
        """Use the average as the parameters inside a ``with`` block."""
        self.copy_to()
        try:
            yield self
        finally:
            self.restore()

    def _slices(self, flat):
        """The part of a flat buffer that belongs to each tracked array."""
        return [flat[start:stop] for start, stop in self._ranges]

    def __repr__(self):
        return (f"EMA({self.shadow.size} params, decay={self.decay}, "
                f"bias_correction={self.bias_correction}, updates={self.updates})")


def _targets(params):
    """``(backend, [1-D views of the arrays to average])``."""
    if isinstance(params, Optimizer):
        return params._backend, [params.flat_params]
    if isinstance(params, dict):
        named = [(f"params[{k!r}]", a) for k, a in params.items()]
    elif isinstance(params, (list, tuple)):
        named = [(f"params[{i}]", a) for i, a in enumerate(params)]
    else:
        raise TypeError("params must be an optimizer, or a dict or list of arrays, got "
                        f"{type(params).__name__}")
    if not named:
        raise ValueError("params is empty: give EMA at least one array")
    backend = backend_of(named[0][1])
    views, seen = [], {}
    for name, x in named:
        if id(x) in seen:
            raise ValueError(f"{name} is the same array as {seen[id(x)]}; each may appear once")
        seen[id(x)] = name
        a = backend.asarray(x, name)
        check_dtype(a, name)
        if views and a.dtype != views[0].dtype:
            raise TypeError(f"{name} is {a.dtype} but {named[0][0]} is {views[0].dtype}: "
                            "the arrays of one EMA share a dtype")
        if not is_c_contiguous(a) or not backend.is_writeable(x):
            raise ValueError(f"{name} must be C-contiguous and writeable: EMA updates it in place")
        views.append(a.reshape(a.size))
    return backend, views

