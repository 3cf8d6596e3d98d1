"""The base class every algorithm builds on: buffers, state and the step sequence."""

import numbers

import numpy as np

from .._backend import FLOAT32, is_c_contiguous
from ..flat import flatten

f32 = np.float32


class Optimizer:
    """Owns the flat parameter and gradient buffers and the state of one algorithm.

    A subclass names its rule in ``kernels.rules`` and supplies three small methods:
    ``_check`` validates hyperparameters, ``_state_spec`` lists the state buffers with
    their initial values, and ``_scalars`` folds the hyperparameters and the step count
    into the float32 tuple the rule receives. Everything else lives here.

    Attributes:
        params, grads: views into ``flat_params`` / ``flat_grads``, in the structure the
            parameters were given in (a dict or a list).
        flat_params, flat_grads: the 1-D float32 buffers the kernel updates.
        state: ``step`` (the number of steps taken) and the state buffers, flat, each
            created on the first step that needs it.
        param_groups: a one-element list holding the hyperparameters; change them
            between steps (``opt.param_groups[0]["lr"] = 1e-4``) and the next step
            uses the new values.
    """

    rule = None

    def __init__(self, params, defaults):
        self._check(defaults)
        self.defaults = dict(defaults)
        self._backend, self._layout, self.flat_params, self.flat_grads = flatten(params)
        self.params = self._layout.views(self.flat_params)
        self.grads = self._layout.views(self.flat_grads)
        self._grad_slices = self._layout.slices(self.flat_grads)
        self.param_groups = [dict(defaults)]
        self.state = {"step": 0}
        self._checked = _snapshot(defaults)

    @property
    def device(self):
        """``"cpu"`` or ``"cuda"``: where the buffers live and which kernels run."""
        return self._backend.device

    def __repr__(self):
        group = ", ".join(f"{k}={v!r}" for k, v in self.param_groups[0].items())
        return f"{type(self).__name__}({self.flat_params.size} params on {self.device}, {group})"

    def zero_grad(self):
        """Set every gradient to zero."""
        self._backend.fill(self.flat_grads, 0.0)

    def step(self, grads=None):
        """Take one optimization step, updating ``flat_params`` and the state in place.

        ``grads`` may be None (use ``flat_grads``, where ``opt.grads`` views write),
        arrays in the same structure as the parameters (copied into ``flat_grads``), or
        one flat float32 array with as many elements as ``flat_params`` (used in
        place). Invalid input raises before anything is modified.
        """
        group = self.param_groups[0]
        snapshot = _snapshot(group)
        if snapshot != self._checked:  # changed since the last step: validate again
            self._check(group)
            self._checked = snapshot
        spec = self._state_spec(group)
        fresh = [name for name in spec if name not in self.state]
        step = self.state["step"] + 1
        h = self._scalars(group, step, fresh)
        host_state = self._host_state(group, step)
        g = self._gradients(grads)  # the last check, and the first write
        for name in fresh:
            self.state[name] = self._backend.zeros(self.flat_params.size)
            if spec[name] != 0:
                self._backend.fill(self.state[name], spec[name])
        states = [self.state[name] for name in spec]
        self._backend.run(self.rule, tuple(spec), self.flat_params, g, states, h)
        self.state.update(host_state, step=step)

    # -- for subclasses -------------------------------------------------------------

    def _check(self, group):
        """Raise ValueError/TypeError for an invalid hyperparameter in ``group``."""
        raise NotImplementedError

    def _state_spec(self, group):
        """``{state name: initial value}`` for the buffers this step needs, in the
        order of the rule's arguments."""
        raise NotImplementedError

    def _scalars(self, group, step, fresh):
        """The rule's ``h`` tuple of float32 for step number ``step`` (1-based).

        ``fresh`` names the state buffers that this step creates. Must not modify
        anything: a step that fails leaves the optimizer as it was.
        """
        raise NotImplementedError

    def _host_state(self, group, step):
        """Host-side state (plain numbers) as it will be after step ``step``."""
        return {}

    # -- gradients ------------------------------------------------------------------

    def _gradients(self, grads):
        """The flat gradient array to use for this step, after validating ``grads``."""
        if grads is None:
            return self.flat_grads
        backend, layout = self._backend, self._layout
        if isinstance(grads, (dict, list, tuple)):
            return self._copy_structured(grads)
        g = backend.asarray(grads, "grads")
        if g.ndim != 1:
            raise ValueError(
                f"grads must be a flat 1-D array of {layout.size} elements or arrays in "
                f"the structure of params, got an array of shape {g.shape}")
        if g.dtype != FLOAT32:
            raise TypeError(f"grads must be float32, got {g.dtype}")
        if g.size != layout.size:
            raise ValueError(f"grads must have {layout.size} elements, got {g.size}")
        if not is_c_contiguous(g):
            raise ValueError("grads must be C-contiguous")
        for name, buffer in self._buffers() if g.size else ():
            if backend.overlaps(g, buffer):
                raise ValueError(f"grads must not share memory with {name}")
        return g

    def _buffers(self):
        yield "the parameters", self.flat_params
        for name, value in self.state.items():
            if name != "step" and hasattr(value, "shape"):
                yield f"state['{name}']", value

    def _copy_structured(self, grads):
        layout, backend = self._layout, self._backend
        if layout.keys is None:
            if not isinstance(grads, (list, tuple)):
                raise TypeError("grads must be a list like params, got a dict")
            if len(grads) != len(layout.shapes):
                raise ValueError(f"grads has {len(grads)} arrays, params has {len(layout.shapes)}")
            items = list(grads)
        else:
            if not isinstance(grads, dict):
                raise TypeError(f"grads must be a dict like params, got {type(grads).__name__}")
            if set(grads) != set(layout.keys):
                missing, extra = set(layout.keys) - set(grads), set(grads) - set(layout.keys)
                raise ValueError(f"grads keys differ from params: missing {sorted(map(str, missing))}, "
                                 f"unexpected {sorted(map(str, extra))}")
            items = [grads[k] for k in layout.keys]
        arrays = []
        for name, shape, x in zip(layout.names(), layout.shapes, items):
            name = "grads" + name[len("params"):]
            a = backend.asarray(x, name)
            if a.dtype != FLOAT32:
                raise TypeError(f"{name} must be float32, got {a.dtype}")
            if tuple(a.shape) != shape:
                raise ValueError(f"{name} must have shape {shape}, got {tuple(a.shape)}")
            if backend.device == "cuda" and not is_c_contiguous(a):
                raise ValueError(f"{name} must be C-contiguous on the GPU")
            arrays.append(a)
        for destination, source in zip(self._grad_slices, arrays):
            backend.copy(destination, source)
        return self.flat_grads


def _snapshot(group):
    """The group's values, with lists frozen so that an in-place edit shows as a change."""
    return tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in group.items())


# -- hyperparameter checks, with torch's messages --------------------------------------

FLOAT32_MAX = float(np.finfo(np.float32).max)


def real(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    if abs(value) > FLOAT32_MAX:
        raise ValueError(f"{name}={value} does not fit in float32")
    return float(value)


def check_nonnegative(name, value, label=None):
    if not 0.0 <= real(name, value):
        raise ValueError(f"Invalid {label or name + ' value'}: {value} (expected {name} >= 0)")


def check_lr(value):
    check_nonnegative("lr", value, "learning rate")


def check_eps(value):
    check_nonnegative("eps", value, "epsilon value")


def check_betas(betas):
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise TypeError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    for i, beta in enumerate(betas):
        if not 0.0 <= real(f"betas[{i}]", beta) < 1.0:
            raise ValueError(f"Invalid beta parameter at index {i}: {beta} "
                             f"(expected 0 <= betas[{i}] < 1)")


def check_flag(name, value):
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r}")


def grad_sign(group):
    """The gradient's factor: -1 to maximize the objective, +1 to minimize it."""
    return f32(-1.0 if group["maximize"] else 1.0)


def weight_decay_terms(group):
    """``(l2, decay)`` as float32: torch's L2 term added to the gradient, or the
    decoupled factor ``1 - lr * weight_decay`` that scales the parameters."""
    wd = group["weight_decay"]
    if group["decoupled_weight_decay"]:
        return f32(0.0), f32(1.0 - group["lr"] * wd)
    return f32(wd), f32(1.0)
