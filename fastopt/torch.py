"""Drop-in torch.optim optimizers backed by fastopt's fused kernels.

Switching is a one-line change::

    opt = torch.optim.Adam(model.parameters(), lr=1e-3)    # before
    opt = fastopt.torch.Adam(model.parameters(), lr=1e-3)  # after

Each class is a real :class:`torch.optim.Optimizer` that takes its torch.optim namesake's
arguments (plus fastopt's own options) and gives its numbers. At construction it copies
the parameters of each device into one contiguous float32 buffer and makes every
``p.data`` a view into it; the gradients get a flat buffer too, and every ``p.grad`` it
hands out is a view, so autograd accumulates in place and ``step()`` runs one fused
kernel per run of parameters that share a group and a step count. CPU tensors run the
CPU kernels on zero-copy NumPy views; CUDA tensors run the CUDA kernels through
``__cuda_array_interface__``.

As in torch, a parameter whose ``.grad`` is None is left untouched, and the step count,
bias corrections and NAdam's momentum product are kept per parameter. A ``.grad`` that
was replaced by another tensor (autograd after ``zero_grad(set_to_none=True)``, or a
library that assigns ``.grad``) is copied into the flat buffer and replaced by a view.
Hyperparameters are read from ``param_groups`` at every step, so every
torch.optim.lr_scheduler works, and so does torch.amp.GradScaler. ``state_dict()`` and
``load_state_dict()`` use torch's layout and key names, so checkpoints move both ways
between fastopt.torch and torch.optim.

Differences from torch.optim: ``zero_grad()`` zeroes the flat gradient buffer by
default (``set_to_none=False``), which keeps the views; ``foreach`` and ``fused`` are
accepted and ignored (every step is fused); ``capturable`` and ``differentiable`` must
stay False; ``lr`` must be a number (use a torch.optim.lr_scheduler). Parameters must be
float32: other dtypes raise a TypeError at construction.

Build the optimizer after the model is where it will train: like apex's flat-buffer
optimizers, it holds the parameters' storage, so anything that later replaces a
parameter's storage (``model.to(device or memory_format)``, ``share_memory()``)
detaches that parameter from the optimizer.
"""

import numpy as np
import torch

from . import optim as core
from .flat import adopt
from .optim.optimizer import (_loss_scale, _positive_or_none, _snapshot, check_flag,
                              clip_coefficient, f32)

__all__ = ["SGD", "Adagrad", "RMSprop", "Adadelta", "Adam", "AdamW", "Adamax", "NAdam",
           "RAdam", "Rprop", "ASGD", "Adafactor", "SWATS", "Lion", "LAMB", "LARS"]

_NOT_HYPERPARAMETERS = ("params", "param_names")
# Per-parameter numbers that torch keeps as tensors. mu_product is saved in float64, which
# fastopt computes it in (torch casts it to float32 when it loads it); ASGD's eta and mu
# are float32 in torch too.
_TORCH_SCALARS = {"step": torch.float32, "mu_product": torch.float64, "eta": torch.float32,
                  "mu": torch.float32}


class Optimizer(torch.optim.Optimizer):
    """The base of the drop-in classes: flat buffers per device, and a step that drives
    the fastopt algorithm ``algorithm`` over runs of parameters.

    fastopt's options: ``clip_grad_norm``, ``clip_grad_value`` and ``skip_nonfinite``
    (see :class:`fastopt.Optimizer`); the norm is taken over the parameters that have
    a gradient, as torch.nn.utils.clip_grad_norm_ takes it.
    """

    algorithm = None  # the fastopt class whose math this optimizer runs
    counts_steps = True  # torch keeps state["step"] (SGD does not)

    def __init__(self, params, defaults, torch_options, *, clip_grad_norm=None,
                 clip_grad_value=None, skip_nonfinite=False):
        for name, value in torch_options.items():
            if name in ("capturable", "differentiable") and value:
                raise ValueError(f"fastopt.torch.{type(self).__name__} does not support "
                                 f"{name}=True")
        self._math = self.algorithm(adopt(np.zeros(1, np.float32)))  # hooks only
        self._devices = None
        super().__init__(params, {**defaults, **torch_options})
        self.clip_grad_norm = _positive_or_none("clip_grad_norm", clip_grad_norm)
        self.clip_grad_value = _positive_or_none("clip_grad_value", clip_grad_value)
        check_flag("skip_nonfinite", skip_nonfinite)
        self.skip_nonfinite = bool(skip_nonfinite)
        self.last_grad_norm = None
        self.skipped_steps = 0
        self._flatten()

    def add_param_group(self, param_group):
        """Add a group, as torch does; the buffers are rebuilt to take it in."""
        super().add_param_group(param_group)
        index = len(self.param_groups) - 1
        try:
            self._validate(index, self.param_groups[index])
        except (TypeError, ValueError):
            self.param_groups.pop()
            raise
        if self._devices is not None:
            self._flatten()

    def __getstate__(self):
        return {**super().__getstate__(), "fastopt_options": self._options()}

    def __setstate__(self, state):
        options = state.pop("fastopt_options", None)
        super().__setstate__(state)
        for group in self.param_groups:  # a torch checkpoint lacks fastopt's own options
            for name, value in self.defaults.items():
                group.setdefault(name, value)
        if options is not None:  # unpickled or deep-copied: rebuild what is not pickled
            self._math = self.algorithm(adopt(np.zeros(1, np.float32)))
            self.__dict__.update(options)
            self._flatten()

    def _options(self):
        return {"clip_grad_norm": self.clip_grad_norm, "clip_grad_value": self.clip_grad_value,
                "skip_nonfinite": self.skip_nonfinite, "last_grad_norm": self.last_grad_norm,
                "skipped_steps": self.skipped_steps}

    def _validate(self, index, group):
        for j, p in enumerate(group["params"]):
            if p.dtype != torch.float32:
                raise TypeError(f"param_groups[{index}]['params'][{j}] has dtype {p.dtype}; "
                                "fastopt optimizes float32 parameters only")
            if p.layout != torch.strided:
                raise TypeError(f"param_groups[{index}]['params'][{j}] is not a dense tensor")
        if callable(group["lr"]):
            raise TypeError(f"param_groups[{index}]['lr'] must be a number: schedule it with "
                            "a torch.optim.lr_scheduler")
        try:
            self._math._check(_hyperparameters(group))
        except (TypeError, ValueError) as error:
            raise type(error)(f"{error} (in param_groups[{index}])") from None

    # -- the flat buffers -------------------------------------------------------------

    def _flatten(self):
        """Copy every parameter, gradient and state tensor into flat buffers per device,
        and make the parameters' data and the state views into them."""
        params = [p for group in self.param_groups for p in group["params"]]
        devices = {}
        for p in params:
            devices.setdefault(p.device, []).append(p)
        self._devices = [_Device(self.algorithm, members, self.state)
                         for members in devices.values()]
        where = {p: (device, device.slots[p]) for device in self._devices for p in device.slots}
        self._slots = [[(p, *where[p]) for p in group["params"]] for group in self.param_groups]
        self._checked = [None] * len(self.param_groups)

    # -- the step ---------------------------------------------------------------------

    def zero_grad(self, set_to_none=False):
        """Zero the gradients: the flat buffer, with every existing ``.grad`` made a view
        of it again; or with ``set_to_none=True`` set every ``.grad`` to None, as torch
        does."""
        if not set_to_none:
            for device in self._devices:
                device.flat_grads.zero_()
        for slots in self._slots:
            for p, _, slot in slots:
                if p.grad is not None:
                    p.grad = None if set_to_none else slot.grad

    @torch.no_grad()
    def step(self, closure=None, *, grad_scale=None, skip_nonfinite=None):
        """One step of every parameter that has a gradient. ``closure`` re-evaluates the
        loss as in torch; ``grad_scale`` divides the gradients by a loss scale;
        ``skip_nonfinite`` overrides the option for this step."""
        if skip_nonfinite is None:
            skip_nonfinite = self.skip_nonfinite
        check_flag("skip_nonfinite", skip_nonfinite)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        plans = [self._plan(index, group) for index, group in enumerate(self.param_groups)]
        inverse_scale = 1.0 if grad_scale is None else 1.0 / _loss_scale(grad_scale)
        runs = [run for _, _, group_runs in plans for run in group_runs]
        for run in runs:
            run.gather_grads()
        coefficient = 1.0
        if skip_nonfinite or self.clip_grad_norm is not None:
            total = sum(run.device.sum_squares(run) for run in runs)
            norm = float(np.sqrt(total)) * inverse_scale
            self.last_grad_norm = norm
            if skip_nonfinite and not np.isfinite(norm):
                self.skipped_steps += 1
                return loss
            if self.clip_grad_norm is not None:
                coefficient = clip_coefficient(self.clip_grad_norm, norm)
        clip = f32(np.inf if self.clip_grad_value is None else self.clip_grad_value)
        for group, hyper, group_runs in plans:
            sign = -1.0 if hyper.get("maximize") else 1.0
            prep = (f32(sign * inverse_scale * coefficient), clip, f32(self._math._l2(hyper)))
            for run in group_runs:
                self._apply(hyper, run, prep)
        return loss

    def _plan(self, index, group):
        """``(group, hyperparameters, runs)``: validated, nothing modified."""
        snapshot = _snapshot(_hyperparameters(group))
        if snapshot != self._checked[index]:
            self._validate(index, group)
            self._checked[index] = snapshot
        hyper = _hyperparameters(group)
        host = self._math._initial_host()  # the values of parameters not yet stepped
        runs, run = [], None
        for p, device, slot in self._slots[index]:
            grad = p.grad
            if grad is None:
                run = None
                continue
            if grad is not slot.grad and grad.is_sparse:
                raise TypeError("fastopt.torch does not support sparse gradients")
            state = self.state[p]
            key = (device, state.get("step", 0),
                   tuple(state.get(name, value) for name, value in host.items()),
                   tuple(name in state for name in device.buffer_names))
            if run is not None and run.key == key and run.stop == slot.start:
                run.add(p, slot)
            else:
                run = _Run(key, device, p, slot, dict(zip(host, key[2])))
                runs.append(run)
        return group, hyper, runs

    def _apply(self, hyper, run, prep):
        step = run.step + 1
        host = run.host
        spec = self._math._state_spec(hyper, host)
        fresh = [name for name in spec if name not in self.state[run.params[0]]]
        h = self._math._scalars(hyper, step, fresh, host)
        run.device.begin_state(run, spec, fresh, self.state)
        host = run.device.core._update(hyper, step, spec, run.device.core.flat_grads, prep, h,
                                       run.start, run.stop, host)
        for p in run.params:
            state = self.state[p]
            if self.counts_steps:
                state["step"] = step
            state.update(host)

    # -- checkpoints in torch's layout ------------------------------------------------

    def state_dict(self):
        """torch's layout: ``state`` by parameter index with torch's key names (``step``
        and NAdam's ``mu_product`` as tensors), and ``param_groups``."""
        packed = super().state_dict()
        # torch packs the live per-parameter dicts; convert copies of them.
        packed["state"] = {index: dict(state) for index, state in packed["state"].items()}
        for state in packed["state"].values():
            for name, dtype in _TORCH_SCALARS.items():
                if isinstance(state.get(name), (int, float)):
                    state[name] = torch.tensor(float(state[name]), dtype=dtype)
        return packed

    def load_state_dict(self, state_dict):
        """Load a state_dict of this class or of its torch.optim namesake."""
        # torch casts every loaded tensor to the parameter's dtype; read the per-parameter
        # numbers before it does, so that a float64 mu_product stays exact.
        scalars = {index: {name: state[name].item() for name in _TORCH_SCALARS
                           if isinstance(state.get(name), torch.Tensor)}
                   for index, state in state_dict["state"].items()}
        super().load_state_dict(state_dict)
        params = [p for group in self.param_groups for p in group["params"]]
        for index, values in scalars.items():
            for name, value in values.items():
                self.state[params[index]][name] = int(value) if name == "step" else value
        self._flatten()


def _hyperparameters(group):
    return {k: (v.item() if isinstance(v, torch.Tensor) else v)
            for k, v in group.items() if k not in _NOT_HYPERPARAMETERS}


class _Slot:
    """Where one parameter lives in its device's flat buffers, and its gradient view."""

    def __init__(self, start, stop, grad):
        self.start, self.stop, self.grad = start, stop, grad


class _Device:
    """The flat buffers of the parameters on one device, and a fastopt optimizer that
    adopts them (its backend runs the kernels)."""

    def __init__(self, algorithm, params, state):
        device = params[0].device
        size = sum(p.numel() for p in params)
        self.flat_params = torch.zeros(size, dtype=torch.float32, device=device)
        self.flat_grads = torch.zeros(size, dtype=torch.float32, device=device)
        self.slots, start = {}, 0
        for p in params:
            stop = start + p.numel()
            grad = self.flat_grads[start:stop].view_as(p)
            self.slots[p] = _Slot(start, stop, grad)
            self.flat_params[start:stop].copy_(p.detach().reshape(-1))
            p.data = self.flat_params[start:stop].view_as(p)
            if p.grad is not None:
                grad.copy_(p.grad)
                p.grad = grad
            start = stop
        shapes = [tuple(p.shape) for p in params]  # per-tensor algorithms need them
        self.core = algorithm(adopt(_array(self.flat_params), shapes,
                                    grads=_array(self.flat_grads)))
        self.buffer_names = []
        self._flat_state = {}
        for p in params:  # existing state (added groups, loaded checkpoints) moves in
            for name, value in list(state.get(p, {}).items()):
                if isinstance(value, torch.Tensor) and name not in _TORCH_SCALARS:
                    view = self._view(name, p)
                    if view is not None and value.numel() == view.numel():
                        view.copy_(value.reshape(view.shape))
                        state[p][name] = view

    def _view(self, name, p):
        """``p``'s part of the flat state buffer ``name``, created when first needed, or
        None where ``p`` has no such state (Adafactor's factors of a vector)."""
        if name not in self._flat_state:
            size = self.core._state_size(name)
            self._flat_state[name] = torch.zeros(size, dtype=torch.float32,
                                                 device=self.flat_params.device)
            self.core.state[name] = _array(self._flat_state[name])
            self.buffer_names.append(name)
        slot = self.slots[p]
        where = self.core._state_slice(name, slot.start, tuple(p.shape))
        if where is None:
            return None
        start, stop, shape = where
        return self._flat_state[name][start:stop].view(shape)

    def sum_squares(self, run):
        return self.core._backend.sum_squares(self.core.flat_grads[run.start:run.stop])

    def begin_state(self, run, spec, fresh, state):
        """Create and initialize the state buffers that ``run`` begins using."""
        for name in fresh:
            for p in run.params:
                view = self._view(name, p)
                if view is not None:
                    view.fill_(spec[name])
                    state[p][name] = view


def _array(tensor):
    """A zero-copy NumPy view of a CPU tensor, or a Numba view of a CUDA tensor."""
    if tensor.device.type == "cpu":
        return tensor.numpy()
    from numba import cuda

    return cuda.as_cuda_array(tensor)


class _Run:
    """Consecutive parameters of one group that step together with the same step
    count and host state: one kernel launch."""

    def __init__(self, key, device, p, slot, host):
        self.key, self.device, self.host = key, device, host
        self.params, self.slots = [p], [slot]
        self.start, self.stop = slot.start, slot.stop
        self.step = key[1]

    def add(self, p, slot):
        self.params.append(p)
        self.slots.append(slot)
        self.stop = slot.stop

    def gather_grads(self):
        """Copy gradients that are not the flat buffer's views into it, and put the
        views in their place, so that the next backward pass accumulates in place."""
        for p, slot in zip(self.params, self.slots):
            if p.grad is not slot.grad:
                slot.grad.copy_(p.grad)
                p.grad = slot.grad


# -- the drop-in classes: torch.optim's signatures, fastopt's algorithms ------------------

def _drop_in(algorithm):
    return (f"Drop-in torch.optim.{algorithm.__name__} on fastopt's fused kernels; see "
            f":class:`fastopt.{algorithm.__name__}` for the math and :mod:`fastopt.torch` for "
            "how parameters and gradients are kept.")


class SGD(Optimizer):
    __doc__ = _drop_in(core.SGD)
    algorithm = core.SGD
    counts_steps = False

    def __init__(self, params, lr=1e-3, momentum=0, dampening=0, weight_decay=0,
                 nesterov=False, *, maximize=False, foreach=None, differentiable=False,
                 fused=None, **options):
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening,
                                      weight_decay=weight_decay, nesterov=nesterov,
                                      maximize=maximize),
                         dict(foreach=foreach, differentiable=differentiable, fused=fused),
                         **options)


class Adagrad(Optimizer):
    __doc__ = _drop_in(core.Adagrad)
    algorithm = core.Adagrad

    def __init__(self, params, lr=1e-2, lr_decay=0, weight_decay=0, initial_accumulator_value=0,
                 eps=1e-10, foreach=None, *, maximize=False, differentiable=False, fused=None,
                 **options):
        super().__init__(params, dict(lr=lr, lr_decay=lr_decay, weight_decay=weight_decay,
                                      initial_accumulator_value=initial_accumulator_value,
                                      eps=eps, maximize=maximize),
                         dict(foreach=foreach, differentiable=differentiable, fused=fused),
                         **options)


class RMSprop(Optimizer):
    __doc__ = _drop_in(core.RMSprop)
    algorithm = core.RMSprop

    def __init__(self, params, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0, momentum=0,
                 centered=False, capturable=False, foreach=None, maximize=False,
                 differentiable=False, **options):
        super().__init__(params, dict(lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay,
                                      momentum=momentum, centered=centered, maximize=maximize),
                         dict(capturable=capturable, foreach=foreach,
                              differentiable=differentiable), **options)


class Adadelta(Optimizer):
    __doc__ = _drop_in(core.Adadelta)
    algorithm = core.Adadelta

    def __init__(self, params, lr=1.0, rho=0.9, eps=1e-6, weight_decay=0, foreach=None, *,
                 capturable=False, maximize=False, differentiable=False, **options):
        super().__init__(params, dict(lr=lr, rho=rho, eps=eps, weight_decay=weight_decay,
                                      maximize=maximize),
                         dict(foreach=foreach, capturable=capturable,
                              differentiable=differentiable), **options)


class Adam(Optimizer):
    __doc__ = _drop_in(core.Adam)
    algorithm = core.Adam

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0,
                 amsgrad=False, *, foreach=None, maximize=False, capturable=False,
                 differentiable=False, fused=None, decoupled_weight_decay=False,
                 bias_correction=True, **options):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      amsgrad=amsgrad, maximize=maximize,
                                      decoupled_weight_decay=decoupled_weight_decay,
                                      bias_correction=bias_correction),
                         dict(foreach=foreach, capturable=capturable,
                              differentiable=differentiable, fused=fused), **options)


class AdamW(Adam):
    __doc__ = _drop_in(core.AdamW)
    algorithm = core.AdamW

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 amsgrad=False, *, maximize=False, foreach=None, capturable=False,
                 differentiable=False, fused=None, bias_correction=True, **options):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach,
                         maximize=maximize, capturable=capturable,
                         differentiable=differentiable, fused=fused,
                         decoupled_weight_decay=True, bias_correction=bias_correction,
                         **options)


class Adamax(Optimizer):
    __doc__ = _drop_in(core.Adamax)
    algorithm = core.Adamax

    def __init__(self, params, lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0,
                 foreach=None, *, maximize=False, differentiable=False, capturable=False,
                 **options):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      maximize=maximize),
                         dict(foreach=foreach, differentiable=differentiable,
                              capturable=capturable), **options)


class NAdam(Optimizer):
    __doc__ = _drop_in(core.NAdam)
    algorithm = core.NAdam

    def __init__(self, params, lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0,
                 momentum_decay=4e-3, decoupled_weight_decay=False, *, foreach=None,
                 maximize=False, capturable=False, differentiable=False, **options):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      momentum_decay=momentum_decay,
                                      decoupled_weight_decay=decoupled_weight_decay,
                                      maximize=maximize),
                         dict(foreach=foreach, capturable=capturable,
                              differentiable=differentiable), **options)


class RAdam(Optimizer):
    __doc__ = _drop_in(core.RAdam)
    algorithm = core.RAdam

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0,
                 decoupled_weight_decay=False, *, foreach=None, maximize=False,
                 capturable=False, differentiable=False, **options):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      decoupled_weight_decay=decoupled_weight_decay,
                                      maximize=maximize),
                         dict(foreach=foreach, capturable=capturable,
                              differentiable=differentiable), **options)


class Rprop(Optimizer):
    __doc__ = _drop_in(core.Rprop)
    algorithm = core.Rprop

    def __init__(self, params, lr=1e-2, etas=(0.5, 1.2), step_sizes=(1e-6, 50), *,
                 capturable=False, foreach=None, maximize=False, differentiable=False,
                 **options):
        super().__init__(params, dict(lr=lr, etas=etas, step_sizes=step_sizes,
                                      maximize=maximize),
                         dict(capturable=capturable, foreach=foreach,
                              differentiable=differentiable), **options)


class ASGD(Optimizer):
    __doc__ = _drop_in(core.ASGD)
    algorithm = core.ASGD

    def __init__(self, params, lr=1e-2, lambd=1e-4, alpha=0.75, t0=1e6, weight_decay=0,
                 foreach=None, maximize=False, differentiable=False, capturable=False,
                 **options):
        super().__init__(params, dict(lr=lr, lambd=lambd, alpha=alpha, t0=t0,
                                      weight_decay=weight_decay, maximize=maximize),
                         dict(foreach=foreach, differentiable=differentiable,
                              capturable=capturable), **options)


class Adafactor(Optimizer):
    __doc__ = _drop_in(core.Adafactor) + (
        " The factors are kept per parameter in torch's shapes (``row_var``, ``col_var``"
        " or ``variance``).")
    algorithm = core.Adafactor

    def __init__(self, params, lr=1e-2, beta2_decay=-0.8, eps=(None, 1e-3), d=1.0,
                 weight_decay=0.0, *, foreach=None, maximize=False, **options):
        super().__init__(params, dict(lr=lr, beta2_decay=beta2_decay, eps=eps, d=d,
                                      weight_decay=weight_decay, maximize=maximize),
                         dict(foreach=foreach), **options)


def _from_fastopt(algorithm, note=""):
    return (f"fastopt's {algorithm.__name__} (no torch.optim namesake) as a "
            f"torch.optim.Optimizer; see :class:`fastopt.{algorithm.__name__}`.{note}")


class Lion(Optimizer):
    __doc__ = _from_fastopt(core.Lion)
    algorithm = core.Lion

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0, *, maximize=False,
                 **options):
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay,
                                      maximize=maximize), {}, **options)


class LAMB(Optimizer):
    __doc__ = _from_fastopt(core.LAMB, " Each parameter tensor gets its own trust ratio.")
    algorithm = core.LAMB

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0, *,
                 maximize=False, **options):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      maximize=maximize), {}, **options)


class LARS(Optimizer):
    __doc__ = _from_fastopt(core.LARS, " Each parameter tensor gets its own local lr.")
    algorithm = core.LARS

    def __init__(self, params, lr=1.0, momentum=0.9, weight_decay=0, trust_coefficient=1e-3, *,
                 maximize=False, **options):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      trust_coefficient=trust_coefficient, maximize=maximize),
                         {}, **options)


class SWATS(Optimizer):
    """fastopt's SWATS (no torch.optim namesake) as a torch.optim.Optimizer; see
    :class:`fastopt.SWATS`. Parameters that step together (normally a whole group)
    share one switch."""

    algorithm = core.SWATS

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-9, weight_decay=0, *,
                 maximize=False, **options):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      maximize=maximize), {}, **options)
