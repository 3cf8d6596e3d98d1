"""An exponential moving average of parameters, updated in one fused pass."""

import contextlib
import numbers

import numpy as np

from ._backend import backend_of, is_c_contiguous
from .flat import check_dtype
from .kernels import rules
from .optim.checks import check_flag, real
from .optim.optimizer import Optimizer

f32 = np.float32


class EMA:
    r"""A shadow copy of the parameters that follows them as an exponential moving average.

    .. math::
        v_t \leftarrow \beta_t\,v_{t-1} + (1 - \beta_t)\,\theta_t, \qquad
        \hat\theta_t = \frac{v_t}{1 - \prod_{i \le t} \beta_i}

    With ``bias_correction=True`` the average starts at :math:`v_0 = 0` and is divided by
    :math:`1 - \prod_i \beta_i` (:math:`1 - \beta^t` for a constant decay), which removes
    the pull towards zero of the first updates (the bias of a zero-initialised average):
    the weight that the zero start still holds in :math:`v_t`. With
    ``bias_correction=False`` it starts at :math:`v_0 = \theta_0` and is used as it is,
    like most model-EMA code.

    Call :meth:`update` after every optimizer step. For evaluation, :meth:`copy_to`
    writes the (corrected) average into the live parameters after saving them, and
    :meth:`restore` puts them back; ``with ema.applied(): ...`` does both::

        opt = fastopt.Adam(params)
        ema = fastopt.EMA(opt, decay=0.999)
        for batch in data:
            ...; opt.step(); ema.update()
        with ema.applied():
            evaluate(opt.params)

    To resume, save :meth:`state_dict` beside the optimizer's checkpoint and give it to
    :meth:`load_state_dict` of an EMA of the resumed parameters. An EMA cannot be
    pickled or copied: it averages its arrays in place, which a copy would not reach.

    Args:
        params: an optimizer (its ``flat_params``, updated in one pass), or a dict or list
            of float32 arrays, NumPy or CUDA, each C-contiguous and writeable (one pass
            per array), or of one 16-bit dtype (bfloat16 or float16, on the CPU), whose
            average is float32 all the same. The arrays are tracked, not copied.
        decay: β, in [0, 1); may be changed between updates (``ema.decay = 0.9999``,
            or a warm-up such as ``min(0.999, (1 + t) / (10 + t))``): each update uses the
            decay of its time, and the correction their product.
        bias_correction: divide by :math:`1 - \prod_i \beta_i`; see above.

    Attributes:
        shadow: the flat float32 buffer holding :math:`v_t`.
        updates: t, the number of updates so far.
        start_weight: :math:`\prod_{i \le t} \beta_i`, the weight of the start
            :math:`v_0` in :math:`v_t` (1 before the first update).
    """

    def __init__(self, params, decay=0.999, bias_correction=True):
        self.decay = decay
        check_flag("bias_correction", bias_correction)
        self._backend, self._targets = _targets(params)
        self.bias_correction = bool(bias_correction)
        self.updates, self.start_weight = 0, 1.0
        sizes = [a.size for a in self._targets]
        offsets = np.cumsum([0] + sizes).tolist()
        self._ranges = list(zip(offsets, offsets[1:]))
        self.shadow = self._backend.zeros(offsets[-1])
        self._shadows = self._slices(self.shadow)
        if not self.bias_correction:
            for shadow, target in zip(self._shadows, self._targets):
                self._backend.copy(shadow, target)
        self._backup = None

    @property
    def decay(self):
        """β, in [0, 1), checked when set."""
        return self._decay

    @decay.setter
    def decay(self, value):
        self._decay = _decay(value)

    def update(self):
        """Move the average towards the current parameters: one pass per array."""
        if self._backup is not None:
            raise RuntimeError("update() inside applied() (or after copy_to()) would average "
                               "the average into itself: restore() first")
        weight, decay = _weight(self.decay)
        for shadow, target in zip(self._shadows, self._targets):
            self._backend.ema(shadow, target, rules.EMAScalars.of(one_minus_decay=weight))
        self.updates += 1
        self.start_weight *= decay

    def correction(self):
        """The factor ``1 / (1 - start_weight)`` that removes the zero-start bias (1
        without bias correction)."""
        if not self.bias_correction:
            return 1.0
        if self.updates == 0:
            raise RuntimeError("the average is empty: call update() at least once first")
        return 1.0 / (1.0 - self.start_weight)

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

    def state_dict(self):
        """``{"shadow": v_t (a NumPy copy), "updates": t, "decay": β, "bias_correction":
        ..., "start_weight": ∏ β_i}``, what :meth:`load_state_dict` continues from."""
        return {"shadow": self._backend.to_host(self.shadow), "updates": self.updates,
                "decay": self.decay, "bias_correction": self.bias_correction,
                "start_weight": self.start_weight}

    def load_state_dict(self, state):
        """Continue from a :meth:`state_dict` of an EMA of parameters of the same size.
        Everything is checked first; on error (ValueError or TypeError) nothing
        changes. A state without ``"start_weight"`` (saved before it was kept) takes
        the decay's to the power ``updates``, which holds where it never changed."""
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict, as EMA.state_dict() returns it, got "
                            f"{type(state).__name__}")
        if set(state) not in (set(STATE), set(STATE) - {"start_weight"}):
            raise ValueError(f"state must hold {list(STATE)}, got {sorted(map(str, state))}")
        shadow, updates = state["shadow"], state["updates"]
        if not isinstance(shadow, np.ndarray):
            raise TypeError(f"state['shadow'] must be a NumPy array, got {type(shadow).__name__}")
        if shadow.dtype != np.float32 or shadow.shape != (self.shadow.size,):
            raise ValueError(f"state['shadow'] must be float32 of shape {(self.shadow.size,)}, "
                             f"as this EMA's, got {shadow.dtype} {shadow.shape}")
        if isinstance(updates, bool) or not isinstance(updates, numbers.Integral):
            raise TypeError(f"state['updates'] must be an int, got {updates!r}")
        if updates < 0:
            raise ValueError(f"state['updates'] must be >= 0, got {updates}")
        decay = _decay(state["decay"])
        check_flag("bias_correction", state["bias_correction"])
        start_weight = state.get("start_weight", _weight(decay)[1] ** updates)
        if not 0.0 <= real("state['start_weight']", start_weight) <= 1.0:
            raise ValueError(f"state['start_weight'] must be in [0, 1], got {start_weight!r}")
        if start_weight == 1.0 and updates and state["bias_correction"]:
            raise ValueError("state['start_weight'] is 1 after updates: the average would "
                             "be divided by zero")
        self._backend.copy(self.shadow, shadow)  # everything is checked: only writes
        self.updates, self._decay, self.start_weight = int(updates), decay, float(start_weight)
        self.bias_correction = bool(state["bias_correction"])

    def __reduce_ex__(self, protocol):
        # A copy would average copies of the arrays, which no optimizer steps.
        raise TypeError("a fastopt.EMA cannot be pickled or copied: it averages its "
                        "parameter arrays in place, which a copy would not reach. Take "
                        "ema.state_dict(), and continue from it with load_state_dict on "
                        "an EMA of the resumed parameters")

    def _slices(self, flat):
        """The part of a flat buffer that belongs to each tracked array."""
        return [flat[start:stop] for start, stop in self._ranges]

    def __repr__(self):
        return (f"EMA({self.shadow.size} params, decay={self.decay}, "
                f"bias_correction={self.bias_correction}, updates={self.updates})")


# The keys of EMA.state_dict().
STATE = ("shadow", "updates", "decay", "bias_correction", "start_weight")


def _weight(decay):
    """``(weight, applied)``: the float32 weight ``1 - decay`` of an update, and the decay
    that update applies, exactly 1 less that weight, which the correction multiplies."""
    weight = f32(1.0 - decay)
    return weight, 1.0 - float(weight)


def _decay(value):
    if not 0.0 <= real("decay", value) < 1.0:
        raise ValueError(f"decay must be in [0, 1), got {value!r}")
    return float(value)


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

