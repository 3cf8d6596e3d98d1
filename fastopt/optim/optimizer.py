"""The base class every algorithm builds on: buffers, groups, state and the step."""

import bisect
import functools
import math
import numbers
import operator
import threading

import numpy as np

from .. import checkpoint
from .._backend import FLOAT32, _extent, is_c_contiguous, is_cuda_array
from ..flat import ViewList, flatten
from ..kernels import Pass, rules
from ..kernels._template import state_names
from ..precision import (ABSMAX, MIN_QUANTIZED_SIZE, NOTHING_TO_ROUND, SMALL, Storage,
                         block_rows, check_grad_dtype, quantize, refused_in_8_bits)
from . import engine
from .checks import check_flag, check_lr, positive_or_none
from .snapshot import restore as restore_snapshot
from .snapshot import state_buffers
from .snapshot import take as take_snapshot
from .spec import ALGORITHMS, constructor
from .steady import Group, Steady


def _own(name, doc):
    """A read-only attribute ``name`` of an optimizer (``_<name>`` underneath), whose
    assignment raises an AttributeError that says what to do: an array put in its place
    would be no step's."""
    def refuse(self, value):
        raise AttributeError(f"{name} is the optimizer's own buffer, which every step "
                             f"reads and writes: write into it ({name}[...] = values) "
                             "instead of putting another in its place")
    return property(lambda self: getattr(self, "_" + name), refuse, doc=doc)


class Optimizer:
    """Owns the flat parameter and gradient buffers and the state of one algorithm.

    A subclass declares its algorithm as ``spec`` (a :class:`fastopt.optim.spec.Spec`:
    its rule in ``kernels.rules``, its hyperparameters with their defaults and checks,
    ...), from which its constructor and validation are built, and supplies its
    host-side math as static methods, which ``fastopt.torch`` calls too: ``buffers``
    lists the state buffers with their initial values, and ``scalars`` folds the
    hyperparameters and the step count into the rule's scalars, the named tuple
    that the rule's ``h`` annotation names (with ``host_after``, ``l2`` and
    ``state_shape`` where the defaults do not fit). An algorithm of several passes
    (LAMB, Adafactor ...) also defines ``update``, its step over the tensors of an
    :class:`engine.Work`, which either front end hands it. What a step does around the
    kernels is in :mod:`fastopt.optim.engine`; everything else lives here.

    **Parameter groups.** ``params`` is a dict or list of arrays, or a list of torch-style
    group dicts, each with its own ``"params"`` and any hyperparameters that differ from
    the defaults::

        fastopt.Adam([{"params": {"w": w}, "lr": 1e-2},
                      {"params": [b], "weight_decay": 0.0}], lr=1e-3)

    All groups share one flat buffer, in which each group is a contiguous segment; the
    kernel makes one pass over each segment with the group's hyperparameters.

    **Learning-rate schedules.** A group's ``lr`` may be any callable ``t -> lr``, such
    as the classes in :mod:`fastopt.schedules`. It is called on the host with the number
    of steps already taken (0 for the first step), like a torch.optim.lr_scheduler.

    **Gradient processing**, fused into the step's single pass over the buffers. In
    order: the gradients are divided by ``step(grad_scale=S)`` (loss scaling), scaled by
    the norm-clipping coefficient, clipped to ``[-clip_grad_value, clip_grad_value]``,
    and then the algorithm's L2 weight decay is added.

    Keyword-only options, which every optimizer takes and which can be changed between
    steps as attributes:

    - ``clip_grad_norm=max_norm`` scales all gradients by
      ``min(1, max_norm / (norm + 1e-6))``, where ``norm`` is the global L2 norm of the
      (unscaled) gradients, as torch.nn.utils.clip_grad_norm_ does. The norm takes one
      parallel, deterministic read pass over the gradients before the step.
    - ``clip_grad_value=v`` clips every gradient element to ``[-v, v]``, as
      torch.nn.utils.clip_grad_value_ does.
    - ``skip_nonfinite=True`` checks the gradients for NaN and Inf in that same read
      pass. A step that finds one changes nothing (parameters, state and step count
      stay bit-identical) and counts itself in ``skipped_steps``.

    **Storage formats** (see :mod:`fastopt.precision`), keyword-only and fixed at
    construction: the parameters may be float32, bfloat16 (ml_dtypes) or float16, all
    of one dtype.

    - ``master_weights="auto"`` keeps float32 master weights (``master_params``) for
      16-bit parameters: a step updates the master and writes the parameters as its
      rounding (to nearest even). A parameter written since the last step (it no longer
      holds its master rounded) starts from the written value. None updates 16-bit
      parameters directly; ``"float32"`` asks for the master explicitly.
      ``"remainder"`` (bfloat16 parameters) keeps only the low 16 bits of the float32
      master (2 bytes a parameter where ``"float32"`` keeps 4), which the parameter's
      bits complete: the master, the state and so every step are bit-identical to
      ``"float32"``'s, but the parameter is the master rounded to nearest with ties
      away from zero, which differs from ``"float32"``'s ties to even at exact ties
      (about one element in 65536 a step, by one bfloat16 step). A parameter written
      since the last step starts from the written value plus the remainder, within
      half a bfloat16 step of it.
    - ``state_dtype="float32"``, ``"bfloat16"``, ``"int8"`` (block-wise 8-bit moving
      averages: see the README) or a dict of them by state buffer.
    - ``grad_dtype=None`` (the parameters' dtype), or ``"float32"``, ``"bfloat16"`` or
      ``"float16"`` (float32 gradients for 16-bit parameters, say).
    - ``stochastic_rounding=False``, ``seed=0``: round the 16-bit values stored without
      master weights (the parameters with ``master_weights=None``, bfloat16 state)
      stochastically, unbiased, on a hash of (seed, step, element index): the same bits
      for any thread count.

    Every algorithm takes 16-bit parameters and gradients, on the CPU and on CUDA, and
    every one but Adafactor (whose factors move on the host in float32) 16-bit state.

    **Threads.** Each optimizer holds a lock, so :meth:`step`, :meth:`zero_grad`,
    :meth:`state_dict`, :meth:`load_state_dict`, :meth:`load` and :func:`fastopt.save`
    on one optimizer run one at a time, whatever the thread: steps taken in several
    threads are all applied, each to the state the previous one left, in some order. The
    lock covers fastopt's own calls only: a thread that writes into ``opt.grads`` while
    another steps, or changes ``param_groups`` during a step, races as it would with any
    shared array. Different optimizers never wait for each other.

    Attributes:
        params, grads: views into ``flat_params`` / ``flat_grads``, in the structure the
            parameters were given in (with groups, a list of one structure per group).
            The dicts and lists are read-only (the optimizer steps the flat buffer, so a
            rebound name would silently stop being optimized): write into a view
            instead, ``opt.params["w"][...] = array``.
        flat_params, flat_grads: the 1-D buffers the kernel updates (float32, or the
            16-bit dtype of the parameters and ``grad_dtype``).
        master_params: the 1-D float32 master weights of 16-bit parameters, their low
            halves as uint16 with ``master_weights="remainder"``
            (:func:`fastopt.precision.rebuild_master` gives the float32 values), or None.
        param_groups: a list of dicts (:class:`fastopt.optim.steady.Group`, which counts
            its changes), one per group, holding the group's ``params``
            (views, fixed at construction) and its hyperparameters; change them between
            steps (``opt.param_groups[0]["lr"] = 1e-4``) and the next step uses the new
            values, validated again. The groups themselves are fixed at construction: a
            step refuses a list that lost or gained one (an lr of 0 stops a group).
        state: ``step`` (the number of steps taken, an int) and the state buffers, flat
            over all groups, each created on the first step that needs it; one may be
            replaced between steps by an array of its own of the same dtype and size.
            Host-side values that differ per group (NAdam's ``mu_product``) are lists
            with one entry per group.
        last_grad_norm: the global gradient norm (after unscaling, before clipping)
            measured by the last step that measured it, or None.
        skipped_steps: how many steps ``skip_nonfinite`` has skipped.
    """

    spec = None
    rule = None  # spec.rule

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        spec = cls.__dict__.get("spec")
        if spec is not None:  # an algorithm: built from its spec, and listed
            cls.rule = spec.rule
            cls.__init__ = constructor(cls.__name__, spec, Optimizer.__init__)
            ALGORITHMS[cls.__name__] = cls

    # The buffers (and the views into them) are the optimizer's own: write into them.
    flat_params = _own("flat_params", "The parameters, flat (their storage dtype).")
    flat_grads = _own("flat_grads", "The gradients, flat, which the next step reads.")
    master_params = _own("master_params", "The float32 master weights of 16-bit "
                         "parameters (their low halves, uint16, for 'remainder'), or None.")
    params = _own("params", "Views of the parameters, in the structure given.")
    grads = _own("grads", "Views of the gradients, in the structure of the parameters.")

    def __init__(self, params, defaults, *, clip_grad_norm=None, clip_grad_value=None,
                 skip_nonfinite=False, master_weights="auto", state_dtype="float32",
                 grad_dtype=None, stochastic_rounding=False, seed=0):
        structures, groups, self._grouped = _split_groups(params, defaults)
        flat = flatten(structures, self._grouped, check_grad_dtype(grad_dtype))
        self._backend, self._layouts, self._flat_params, self._flat_grads = flat
        self._storage = Storage(type(self), self.state_names(), self.flat_params.dtype,
                                master_weights, state_dtype, grad_dtype, stochastic_rounding,
                                seed)
        if stochastic_rounding and not self._storage.stochastic:
            raise ValueError(NOTHING_TO_ROUND)
        for index, group in enumerate(groups):
            self._check_group(index, group)
        self.clip_grad_norm = clip_grad_norm
        self.clip_grad_value = clip_grad_value
        self.skip_nonfinite = skip_nonfinite
        self.defaults = dict(defaults)
        self._master_params = None
        if self._storage.remainder:  # the master weights equal the parameters
            self._master_params = self._backend.zeros(self.flat_params.size,
                                                     self._storage.master_dtype)
        elif self._storage.master:
            self._master_params = self._backend.float32_copy(self.flat_params)
        names = [layout.prefix for layout in self._layouts]  # "params" or "params[i]"
        param_views = [layout.views(self.flat_params, name)
                       for layout, name in zip(self._layouts, names)]
        grad_views = [layout.views(self.flat_grads, "grads" + name[len("params"):])
                      for layout, name in zip(self._layouts, names)]
        self._params = ViewList(param_views, "params") if self._grouped else param_views[0]
        self._grads = ViewList(grad_views, "grads") if self._grouped else grad_views[0]
        self._grad_slices = [layout.slices(self.flat_grads) for layout in self._layouts]
        self.param_groups = [Group(params=views, **group)
                             for views, group in zip(param_views, groups)]
        self._checked = [_checked(group) for group in self.param_groups]
        self._started = [set() for _ in groups]  # the state buffers each group has begun
        self.state = {"step": 0}
        for name, value in self.spec.host.items():
            self.state[name] = [value] * len(groups)
        self.last_grad_norm = None
        self.skipped_steps = 0
        # Re-entrant, so that a schedule or hook called during a step may take a state_dict.
        self._lock = threading.RLock()
        self._all_tensors = [(offset, shape) for layout in self._layouts
                             for offset, shape in zip(layout.offsets, layout.shapes)]
        self._state_layouts = {}
        self._works = {}  # (start, stop) -> (Work, tensor offsets, Tensors of own buffers)
        self._state_checked = {}  # name -> the state buffer last found as the kernels need it
        self._block_plan = None  # the Blocks of 8-bit state, once needed
        self._kept_arrays = {}  # state name -> _kept(name)
        self._steady = None  # what the last step set up for the next, see steady.py

    @property
    def device(self):
        """``"cpu"`` or ``"cuda"``: where the buffers live and which kernels run."""
        return self._backend.device

    def __repr__(self):
        groups = "; ".join(", ".join(f"{k}={v!r}" for k, v in group.items() if k != "params")
                           for group in self.param_groups)
        return f"{type(self).__name__}({self.flat_params.size} params on {self.device}, {groups})"

    # -- options, validated when set ------------------------------------------------

    @property
    def clip_grad_norm(self):
        return self._clip_grad_norm

    @clip_grad_norm.setter
    def clip_grad_norm(self, value):
        self._clip_grad_norm = positive_or_none("clip_grad_norm", value)
        self._steady = None

    @property
    def clip_grad_value(self):
        return self._clip_grad_value

    @clip_grad_value.setter
    def clip_grad_value(self, value):
        self._clip_grad_value = positive_or_none("clip_grad_value", value)
        self._steady = None

    @property
    def skip_nonfinite(self):
        return self._skip_nonfinite

    @skip_nonfinite.setter
    def skip_nonfinite(self, value):
        check_flag("skip_nonfinite", value)
        self._skip_nonfinite = bool(value)
        self._steady = None

    # -- checkpoints ----------------------------------------------------------------

    def snapshot(self):
        """Everything needed to continue exactly, as a :class:`fastopt.checkpoint.Snapshot`:
        copies of the parameters and state buffers and the counts, options and
        hyperparameters, taken under the lock (one step's state, whatever other threads
        do)."""
        return take_snapshot(self)

    def restore(self, snapshot):
        """Continue from a :meth:`snapshot` of an optimizer of the same algorithm and
        parameter layout. Everything is checked first, under the lock; on error
        (ValueError or TypeError) nothing changes."""
        restore_snapshot(self, snapshot)

    def state_dict(self):
        """:meth:`snapshot` as ``{"meta": ..., "arrays": ...}``, a record of JSON values with
        a checksum and the arrays; see :mod:`fastopt.checkpoint`."""
        return checkpoint.state_dict(self.snapshot())

    def load_state_dict(self, state_dict):
        """Continue from a :meth:`state_dict`, as :meth:`restore`."""
        self.restore(checkpoint.snapshot_of(state_dict))

    def load(self, path):
        """Continue from the checkpoint file ``path`` (written by :func:`fastopt.save`).
        As :meth:`restore`; a fault in the file raises ValueError naming it."""
        contents = checkpoint.read(path)
        with checkpoint.naming(path):
            self.restore(checkpoint.snapshot_of(contents))

    def __reduce_ex__(self, protocol):
        # A copy's params would no longer be views into its flat buffers, so its steps
        # would not reach them: refuse pickle and copy rather than copy that silently.
        raise TypeError(f"a fastopt.{type(self).__name__} cannot be pickled or copied: its "
                        f"params are views into its flat buffers. Take opt.state_dict() "
                        f"or fastopt.save(opt, path), and continue from it with "
                        f"load_state_dict, opt.load(path) or fastopt.load(path)")

    # -- the step -------------------------------------------------------------------

    def zero_grad(self):
        """Set every gradient to zero."""
        with self._lock:
            self._backend.fill(self.flat_grads, 0.0)

    def step(self, grads=None, *, grad_scale=None, skip_nonfinite=None):
        """Take one optimization step, updating ``flat_params`` and the state in place.

        ``grads`` may be None (use ``flat_grads``, where ``opt.grads`` views write),
        arrays in the same structure as the parameters (copied into ``flat_grads``), or
        one flat array of ``flat_grads``' dtype with as many elements as ``flat_params``
        (used in place). ``grad_scale=S`` divides the gradients by S in the kernel, for loss
        scaling. ``skip_nonfinite`` overrides the optimizer's option for this step.

        A step skipped because of a non-finite gradient counts in ``skipped_steps``.
        Invalid input raises before anything is modified, and so does a step whose
        folded float32 scalars would overflow (a huge ``lr``): the ValueError names the
        hyperparameters. Steps from several threads take turns (see the class docstring).

        A step without arguments that is set up as the step before it (same groups and
        hyperparameters, same state buffers: a training loop) reuses what that step
        derived, and computes only the scalars of its step count: the same result, in
        half the time at 1e3 parameters (see :mod:`fastopt.optim.steady`).
        """
        with self._lock:  # one step at a time, never during a save or a load
            plain = grads is None and grad_scale is None and skip_nonfinite is None
            if plain and self._steady is not None and self._steady.step(self):
                return  # set up as the step before, which did all the checks
            self._check_group_count()
            step = self._steps_taken() + 1
            plans = [self._plan(index, group, step)
                     for index, group in enumerate(self.param_groups)]
            self._check_state(plans)
            if self.spec.host:  # every group's, before the first group moves
                for index, (group, _, _, _, host) in enumerate(plans):
                    engine.check_host_after(self, group, step, host, index)
            inverse_scale = engine.inverse_loss_scale(grad_scale)
            if skip_nonfinite is None:
                skip_nonfinite = self._skip_nonfinite
            else:
                check_flag("skip_nonfinite", skip_nonfinite)
            g = self._gradients(grads)  # the last check, and the first write
            coefficient = engine.clip_or_skip(self, skip_nonfinite, inverse_scale,
                                              lambda: self._backend.sum_squares(g))
            if coefficient is None:
                return
            self._allocate_state(plans)
            for index, (group, spec, fresh, h, host) in enumerate(plans):
                prep = engine.prep(type(self), group, inverse_scale, coefficient,
                                   self._clip_grad_value)
                layout = self._layouts[index]
                host = self._update(group, step, spec, g, prep, h, layout.start, layout.stop, host)
                self._started[index].update(spec)
                for name, value in host.items():
                    self.state[name][index] = value
            self.state["step"] = step
            self._steady = Steady.of(self, plans) if plain else None

    def _check_group_count(self):
        """Refuse param_groups that no longer hold one group per group built, which the
        step would silently go on without (or fail on)."""
        groups, count = self.param_groups, len(self._layouts)
        if not isinstance(groups, list):
            raise TypeError(f"param_groups must be the list of the optimizer's {count} "
                            f"groups, got {type(groups).__name__}")
        if len(groups) != count:
            raise ValueError(f"the optimizer was built with {count} parameter groups, but "
                             f"param_groups holds {len(groups)}: they are fixed at "
                             "construction, as their params are views into flat_params; to "
                             "stop a group's training, set its lr to 0 instead of removing it")

    def _check_params_kept(self, index, group):
        """Refuse a group whose ``"params"`` was replaced: a step, or a save, would go on
        with the optimizer's own."""
        views = self._params[index] if self._grouped else self._params
        if group.get("params") is not views:
            raise TypeError(f"param_groups[{index}]['params'] was replaced: they are "
                            "views into opt.flat_params, fixed at construction; write "
                            "into them instead")

    def _steps_taken(self):
        """``state["step"]``, checked: the count that the next step goes on from."""
        if not isinstance(self.state, dict):
            raise TypeError(f"state must be the optimizer's dict of 'step' and the state "
                            f"buffers, got {type(self.state).__name__}")
        if "step" not in self.state:
            raise ValueError("state has no 'step', the number of steps taken, which the "
                             "next step goes on from (with the state buffers)")
        count = self.state["step"]
        if isinstance(count, bool) or not isinstance(count, numbers.Integral):
            raise TypeError(f"state['step'] must be an int, the number of steps taken, "
                            f"got {count!r}")
        if count < 0:
            raise ValueError(f"state['step'] must be >= 0, the number of steps taken, "
                             f"got {count}")
        return int(count)

    def _plan(self, index, group, step):
        """``(group, spec, fresh, h, host)`` for one group's part of step ``step``: the
        group with its scheduled lr, and its host state before the step. Validates, and
        modifies nothing."""
        keys, values, snapshot = self._checked[index] or ((), None, None)
        if not (values is not None and tuple(group) == keys
                and all(map(operator.is_, group.values(), values))):
            self._check_params_kept(index, group)
            checked = _checked(group)
            if checked[2] != snapshot:  # changed since the last step: validate again
                self._check_group(index, group)
            self._checked[index] = checked
        host = {name: self.state[name][index] for name in self.spec.host} if self.spec.host else {}
        return self._fold(index, group, step, host, self._started[index])

    def _fold(self, index, group, step, host, started):
        """:meth:`_plan` for given host state and started buffers (a load checks with it
        that a checkpoint can take its next step). Raises ValueError, naming the
        hyperparameters, where a folded float32 scalar overflows."""
        if callable(group.get("lr")):
            group = self._scheduled(index, group, step)
        spec = self.buffers(group, host)
        fresh = [name for name in spec if name not in started]
        h = engine.fold(self, group, step, fresh, host, index if self._grouped else None)
        return group, spec, fresh, h, host

    @staticmethod
    def _scheduled(index, group, step):
        """``group`` with the lr its schedule gives for step number ``step``."""
        return dict(group, lr=_scheduled_lr(index, group["lr"], step - 1))

    def _check_state(self, plans):
        """Refuse a state buffer that someone replaced (``opt.state["exp_avg"] = a``) with
        an array of another dtype, size or device than the optimizer keeps: the kernels
        would misread it. An array once checked is not checked again."""
        checked, state = self._state_checked, self.state
        for _, spec, _, _, _ in plans:
            for name in spec:
                if state.get(name) is checked.get(name, False) and \
                        name not in self._storage.quantized:
                    continue  # the usual case, at every step: nothing replaced
                self._check_replaced(name)

    def _check_replaced(self, name):
        """:meth:`_check_state` of the arrays that hold the state buffer ``name``."""
        for array, size, dtype in self._kept(name):
            buffer = self.state.get(array)
            if buffer is None and any(name in started for started in self._started):
                raise ValueError(f"state['{array}'] was removed, but a group has begun it "
                                 "and the next step goes on from it: put back an array of "
                                 f"{size} {dtype} elements (zeros start it over)")
            if buffer is None or buffer is self._state_checked.get(array):
                continue
            if (getattr(buffer, "dtype", None) != dtype
                    or getattr(buffer, "shape", None) != (size,)
                    or is_cuda_array(buffer) != (self.device == "cuda")
                    or not is_c_contiguous(buffer)):
                raise TypeError(f"state['{array}'] must be a C-contiguous {dtype} array of "
                                f"shape {(size,)} on {self.device}, as the optimizer keeps "
                                f"it; got {type(buffer).__name__} "
                                f"{getattr(buffer, 'dtype', '')} {getattr(buffer, 'shape', '')}")
            if not self._backend.is_writeable(buffer):
                raise ValueError(f"state['{array}'] must be writeable: every step updates "
                                 "it in place")
            if array != name and array.endswith(ABSMAX) and np.any(
                    self._backend.to_host(buffer) < 0):  # flipping its blocks' signs
                raise ValueError(f"state['{array}'] holds negative block scales; a block's "
                                 "absmax is >= 0 (or NaN)")
            others = [*self._buffers(), ("the gradients", self.flat_grads)]
            for other, value in others if size else ():
                if other != f"state['{array}']" and self._backend.overlaps(buffer, value):
                    raise ValueError(f"state['{array}'] must not share memory with {other}: "
                                     "the step would write one over the other")
            self._state_checked[array] = buffer

    def _allocate_state(self, plans):
        """Create the state buffers this step needs, and initialize the segments of
        the groups that begin using one."""
        for index, (group, spec, fresh, _, _) in enumerate(plans):
            layout = self._layouts[index]
            for name in fresh:
                if name not in self.state:
                    for array, size, dtype in self._kept(name):
                        self.state[array] = self._backend.zeros(size, dtype)
                    if spec[name] == 0 and name not in self._storage.quantized:
                        continue
                if name in self._storage.quantized:
                    self._fill_quantized(name, index, spec[name])
                else:
                    self._backend.fill(self.state[name][layout.start:layout.stop], spec[name])

    def _fill_quantized(self, name, index, value):
        """Set group ``index``'s part of the 8-bit state buffer ``name`` to ``value``."""
        blocks = self._blocks()
        table, first, last = blocks.groups[index]
        layout = self._layouts[index]
        fmt = self._storage.quantized[name]
        codes, absmax = quantize(np.full(1, value, FLOAT32), fmt)  # one block of one value
        self.state[name][layout.start:layout.stop] = codes[0]
        self.state[name + ABSMAX][first:last] = absmax[0]
        for _, start, size, small in table:
            if small >= 0:
                self.state[name + SMALL][small:small + size] = value

    def _update(self, group, step, spec, g, prep, h, start, stop, host):
        """Apply step number ``step`` to ``[start:stop]`` of the buffers, which share the
        host state ``host``; returns that host state after the step."""
        if engine.single_pass(self, h):
            after = self.host_after(group, step, host)  # first: if it raises, nothing moved
            self._launcher(self.rule, spec, start, stop, g, prep, group)(h, step)
            return after
        return self.update(self._work(start, stop, spec, g, prep, step, group), group, step, h,
                           host)

    def _work(self, start, stop, spec, g, prep, step, group):
        """The :class:`engine.Work` of the tensors in ``[start:stop]``, built once and
        brought up to date for this step of ``group``."""
        if (start, stop) not in self._works:
            first, last = self._tensor_range(start, stop)
            shapes = [shape for _, shape in self._all_tensors[first:last]]
            offsets = np.array([offset for offset, _ in self._all_tensors[first:last]], np.int64)
            segments = self._backend.segments([math.prod(shape) for shape in shapes], offsets)
            # The tensors, state, present names, prep and keep_subnormals: per step.
            work = engine.Work(self._backend, tensors=None, shapes=shapes, segments=segments,
                               state=None, present=None,
                               state_starts=lambda name: self._state_layout(name)[0][first:last],
                               prep=None, keep_subnormals=None, cache={},
                               formats=self._storage.formats,
                               master=self.master_params is not None)
            own = self._backend.flat_tensors(self.flat_params, self.flat_grads, offsets,
                                             self.master_params)
            self._works[start, stop] = (work, offsets, own)
        work, offsets, own = self._works[start, stop]
        # The addresses of flat_grads' tensors are kept; other gradients are not held.
        work.tensors = own if g is self.flat_grads else self._backend.flat_tensors(
            self.flat_params, g, offsets, self.master_params)
        work.state = dict(zip(spec, map(self.state.__getitem__, spec)))
        work.present, work.prep = tuple(spec), prep
        work.keep_subnormals = engine.keeps_subnormals(type(self), group)
        if self._storage.stochastic:
            work.stochastic, work.key = True, self._storage.key(step)
        return work

    def _blocks(self):
        """The :class:`Blocks` of the 8-bit state, made once."""
        if self._block_plan is None:
            self._block_plan = Blocks.of(self._layouts)
        return self._block_plan

    def _kept(self, name):
        """``(array, size, dtype)`` of each array in ``state`` that holds the state buffer
        ``name``: the buffer, and for 8-bit state its ``<name>_absmax`` per block and its
        ``<name>_small``, the float32 state of the tensors too small to quantize. Made
        once per name: every step checks them."""
        kept = self._kept_arrays.get(name)
        if kept is None:
            kept = [(name, self._state_size(name), self._storage.state(name))]
            if name in self._storage.quantized:
                blocks = self._blocks()
                kept += [(name + ABSMAX, blocks.count, FLOAT32),
                         (name + SMALL, blocks.small, FLOAT32)]
            self._kept_arrays[name] = kept
        return kept

    def _launcher(self, rule, spec, start, stop, g, prep, group):
        """A function ``launch(h, step)`` that runs ``rule`` over ``[start:stop]`` of the
        parameters, ``g``, the master weights (where they are kept) and the state of
        ``group``, as step number ``step``, everything else found once: a steady step
        (``fastopt.optim.steady``) keeps it."""
        storage, master = self._storage, self.master_params is not None
        keep_subnormals = engine.keeps_subnormals(type(self), group)
        formats = tuple((name, storage.formats[name]) for name in ("p", "g", "w", *spec)
                        if name in storage.formats)
        if any(name in storage.quantized for name in spec):
            # One segment, from start: the group's blocks.
            table, first, last = self._blocks().by_extent[start, stop]
            arrays = [array for name in spec if name in storage.quantized
                      for array in (self.state[name + ABSMAX][first:last],
                                    self.state[name + SMALL])]
            launch = self._backend.blocks_launcher(
                Pass(rule, tuple(spec), formats=formats, master=master,
                     stochastic=storage.stochastic),
                self._backend.flat_tensors(self.flat_params, g, [start], self.master_params),
                [self.state[name] for name in spec],
                (table, np.array([start], np.int64), stop - start, arrays), prep,
                keep_subnormals)
            rounds = storage.stochastic
        else:
            buffers = [self.flat_params, g, *map(self.state.__getitem__, spec)]
            if master:
                buffers.insert(2, self.master_params)
            if start or stop != self.flat_params.size:  # a group's part of the buffers
                buffers = [buffer[start:stop] for buffer in buffers]
            # A pass with no 16-bit buffer (SGD without momentum, its state bfloat16) has
            # nothing to round.
            rounds = storage.stochastic and bool(formats)
            launch = self._backend.launcher(rule, tuple(spec), buffers, prep, keep_subnormals,
                                            formats, master, start if rounds else None)
        if not rounds:
            return lambda h, step: launch(h)
        return lambda h, step: launch(h, storage.key(step))

    def _tensor_range(self, start, stop):
        """``(first, last)``: the tensors whose offsets lie in ``[start:stop]``."""
        offsets = [offset for offset, _ in self._all_tensors]
        return bisect.bisect_left(offsets, start), bisect.bisect_left(offsets, stop)

    def _check_group(self, index, group):
        names = self.spec.defaults
        _check_options(f"param_groups[{index}]", group, names)
        missing = [name for name in names if name not in group]
        if missing:
            raise ValueError(f"param_groups[{index}] lacks the hyperparameters {missing}: "
                             "a group holds every one (the optimizer's default where not "
                             "given); set it instead of deleting it")
        try:
            self._check(group)
            refused = refused_in_8_bits(group, self._storage.quantized)
            if refused:
                raise ValueError(refused)
        except (TypeError, ValueError) as error:
            if not self._grouped:
                raise
            raise type(error)(f"{error} (in param_groups[{index}])") from None

    # -- for subclasses -------------------------------------------------------------
    #
    # An algorithm's host-side math: stateless functions of a group's hyperparameters,
    # the step number and the host state, which fastopt.torch calls as well.

    def _check(self, group):
        """Raise ValueError/TypeError for an invalid hyperparameter in ``group``."""
        self.spec.validate(group)

    @staticmethod
    def buffers(group, host):
        """``{state name: initial value}`` for the buffers this step needs, in the
        order of the rule's arguments."""
        raise NotImplementedError

    # The buffers that a step begins afresh wherever a loaded state lacks them, as torch's
    # does (SGD's momentum, from the gradient). fastopt.torch refuses a loaded state of a
    # stepped parameter without any other buffer its next step needs (torch.optim fails
    # at that step), rather than begin that one at its initial value.
    begun_afresh = ()

    @staticmethod
    def scalars(group, step, fresh, host):
        """The rule's ``h`` for step number ``step`` (1-based): its named tuple of numbers
        (and flags), built by field name with its ``of`` (``rules.AdamScalars.of(...)``),
        which the kernels get rounded to float32.

        ``fresh`` names the state buffers that this step begins, ``host`` is the host
        state before the step. Must not modify anything: a step that fails leaves the
        optimizer as it was.
        """
        raise NotImplementedError

    @staticmethod
    def host_after(group, step, host):
        """The host state after step ``step``, from ``host``, the one before it."""
        return host

    @classmethod
    def update(cls, work, group, step, h, host):
        """A step that is more than one flat pass of the rule, over the tensors of
        ``work`` (an :class:`engine.Work`, from either front end); returns the host state
        after it. This one is the rule's, in two passes with ``caution``; the
        algorithms of several passes (LAMB, Adafactor ...) have their own."""
        after = cls.host_after(group, step, host)  # first: if it raises, nothing moved
        if getattr(h, "caution", False):
            engine.cautious_step(work, cls.rule, h)
        else:
            work.run(Pass(cls.rule, work.present), h)
        return after

    @classmethod
    def update_runs(cls, works, group, step, h, host):
        """:meth:`update` over several launches that step together with one host state
        (``fastopt.torch`` steps a group in runs: of parameters of one dtype, next to
        each other); returns the host state after them. Each launch gives the same,
        where it does not come from sums over the parameters (SWATS's switch)."""
        for work in works:
            after = cls.update(work, group, step, h, host)
        return after

    @classmethod
    @functools.cache
    def state_names(cls):
        """Every state buffer the algorithm's passes may hold: its rule's, then those of
        its other passes (SWATS's momentum, Adafactor's factors)."""
        names = list(state_names(getattr(rules, cls.spec.rule)))
        for value in map(functools.partial(getattr, cls), dir(cls)):
            if isinstance(value, Pass):
                names += [name for name in value.present if name not in names]
        return tuple(names)

    def _state_layout(self, name):
        """:func:`engine.state_layout` of the buffer ``name`` over every tensor."""
        if name not in self._state_layouts:
            shapes = [shape for _, shape in self._all_tensors]
            self._state_layouts[name] = engine.state_layout(self, name, shapes)
        return self._state_layouts[name]

    def _state_size(self, name):
        """The number of elements of the state buffer ``name``."""
        return self._state_layout(name)[1]

    @staticmethod
    def state_shape(name, shape):
        """The shape of the state buffer ``name`` of a tensor of ``shape`` (None: it has
        none): the tensor's own, but for Adafactor's factors."""
        return shape

    @staticmethod
    def l2(group):
        """torch's L2 weight decay, which prepare() adds to the gradient."""
        if group.get("decoupled_weight_decay"):
            return 0.0
        return group.get("weight_decay", 0.0)

    # -- gradients ------------------------------------------------------------------

    def _gradients(self, grads):
        """The flat gradient array to use for this step, after validating ``grads``."""
        if grads is None:
            return self.flat_grads
        backend, size = self._backend, self.flat_params.size
        if isinstance(grads, (dict, list, tuple)):
            return self._copy_structured(grads)
        g = backend.asarray(grads, "grads")
        if g.ndim != 1:
            raise ValueError(
                f"grads must be a flat 1-D array of {size} elements or arrays in "
                f"the structure of params, got an array of shape {g.shape}")
        if g.dtype != self.flat_grads.dtype:
            raise TypeError(f"grads must be {self.flat_grads.dtype}, got {g.dtype}")
        if g.size != size:
            raise ValueError(f"grads must have {size} elements, got {g.size}")
        if not is_c_contiguous(g):
            raise ValueError("grads must be C-contiguous")
        for name, buffer in self._buffers() if g.size else ():
            if backend.overlaps(g, buffer):
                raise ValueError(f"grads must not share memory with {name}")
        return g

    def _buffers(self):
        yield "the parameters", self.flat_params
        if self.master_params is not None:
            yield "the master weights", self.master_params
        for name, value in state_buffers(self.state):
            yield f"state['{name}']", value

    def _copy_structured(self, grads):
        if not self._grouped:
            pairs = [(self._layouts[0], grads)]
        elif not isinstance(grads, (list, tuple)) or len(grads) != len(self._layouts):
            raise TypeError(f"grads must be a list of {len(self._layouts)} structures, one "
                            "per parameter group like params, or one flat array")
        else:
            pairs = list(zip(self._layouts, grads))
        copies = []
        for (layout, group_grads), slices in zip(pairs, self._grad_slices):
            copies += zip(slices, self._group_gradients(layout, group_grads))
        backend = self._backend
        # A source that is a view of flat_grads (step({"a": g[3:6], "b": g[0:3]})) would
        # be read after an earlier copy overwrote it: such sources are copied out first,
        # all before the first write. A source that already is its destination (the
        # user's own opt.grads) needs no copy at all, and no allocation.
        staged = []
        for destination, source in copies:
            if source.size and backend.overlaps(source, self.flat_grads):
                if _same_memory(source, destination):
                    continue
                source = _copy_of(backend, source)
            staged.append((destination, source))
        for destination, source in staged:
            backend.copy(destination, source)
        return self.flat_grads

    def _group_gradients(self, layout, grads):
        """The validated gradient arrays of one group, in the layout's order."""
        backend = self._backend
        where = "grads" + layout.prefix[len("params"):]
        if layout.keys is None:
            if not isinstance(grads, (list, tuple)):
                raise TypeError(f"{where} must be a list like params, got {type(grads).__name__}")
            if len(grads) != len(layout.shapes):
                raise ValueError(f"{where} has {len(grads)} arrays, "
                                 f"params has {len(layout.shapes)}")
            items = list(grads)
        else:
            if not isinstance(grads, dict):
                raise TypeError(f"{where} must be a dict like params, got {type(grads).__name__}")
            if set(grads) != set(layout.keys):
                missing, extra = set(layout.keys) - set(grads), set(grads) - set(layout.keys)
                raise ValueError(f"{where} keys differ from params: missing "
                                 f"{sorted(map(str, missing))}, "
                                 f"unexpected {sorted(map(str, extra))}")
            items = [grads[k] for k in layout.keys]
        arrays = []
        for name, shape, x in zip(layout.names(), layout.shapes, items):
            name = "grads" + name[len("params"):]
            a = backend.asarray(x, name)
            if a.dtype != self.flat_grads.dtype:
                raise TypeError(f"{name} must be {self.flat_grads.dtype}, got {a.dtype}")
            if tuple(a.shape) != shape:
                raise ValueError(f"{name} must have shape {shape}, got {tuple(a.shape)}")
            if backend.device == "cuda" and not is_c_contiguous(a):
                raise ValueError(f"{name} must be C-contiguous on the GPU")
            arrays.append(a)
        return arrays


class Blocks:
    """The blocks of ``codecs.BLOCK`` elements that 8-bit state is kept in: each
    tensor's, from its first element on, the last one shorter. A tensor of fewer than
    ``precision.MIN_QUANTIZED_SIZE`` elements keeps float32 state instead, in the
    buffer's ``_small`` array, one tensor after the other.

    Attributes:
        count: the number of blocks (of absmax values).
        small: the number of elements of the small tensors.
        groups: per parameter group, ``(table, first, last)``: its blocks' rows ``(0,
            start in the group, size, start in _small or -1)`` (int64; the group is
            one segment of ``kernels.cpu.segment_kernel``), which are blocks ``first``
            to ``last`` of the buffer.
        by_extent: the same, by the group's ``(start, stop)`` in the flat buffer (an
            empty group starts where the next one does).
    """

    def __init__(self, count, small, groups, by_extent):
        self.count, self.small, self.groups, self.by_extent = count, small, groups, by_extent

    @classmethod
    def of(cls, layouts):
        count, small, groups = 0, 0, []
        for layout in layouts:
            tables = [np.empty((0, 4), np.int64)]
            for offset, shape in zip(layout.offsets, layout.shapes):
                size = math.prod(shape)
                kept = size < MIN_QUANTIZED_SIZE
                tables.append(block_rows(0, offset - layout.start, size, small if kept else -1))
                small += size if kept else 0
            table = np.concatenate(tables)
            groups.append((table, count, count + len(table)))
            count += len(table)
        by_extent = {(layout.start, layout.stop): group
                     for layout, group in zip(layouts, groups)}
        return cls(count, small, groups, by_extent)


def _address(a):
    if isinstance(a, np.ndarray):
        return a.__array_interface__["data"][0]
    return _extent(a)[0]


def _same_memory(source, destination):
    """Whether ``source`` is ``destination`` (a 1-D slice) seen through another shape."""
    return (source.size == destination.size and is_c_contiguous(source)
            and _address(source) == _address(destination))


def _copy_of(backend, source):
    copy = backend.zeros(source.size, source.dtype)
    backend.copy(copy, source)
    return copy


def _split_groups(params, defaults):
    """``(structures, groups, grouped)``: each group's parameters and hyperparameters,
    and whether params came as a list of group dicts."""
    if not (isinstance(params, (list, tuple)) and params and isinstance(params[0], dict)):
        return [params], [dict(defaults)], False
    structures, groups = [], []
    for index, group in enumerate(params):
        if not isinstance(group, dict) or "params" not in group:
            raise TypeError(f"params[{index}] must be a dict with a 'params' entry, like "
                            "the other parameter groups")
        _check_options(f"params[{index}]", group, defaults)
        structures.append(group["params"])
        groups.append({**defaults, **{k: v for k, v in group.items() if k != "params"}})
    return structures, groups, True


def _check_options(where, group, names):
    """Refuse a key of ``group`` that is none of the hyperparameters ``names``, "params"
    and "name": a typo that no step would read."""
    unknown = set(group) - set(names) - {"params", "name"}
    if unknown:
        raise ValueError(f"{where} has unknown options {sorted(map(str, unknown))}; "
                         f"a group may set {sorted({*names, 'name'})}")


def _scheduled_lr(index, schedule, t):
    lr = schedule(t)
    try:
        check_lr(lr)
    except (TypeError, ValueError) as error:
        raise type(error)(f"the lr schedule of param_groups[{index}] returned {lr!r} "
                          f"for t={t}: {error}") from None
    return float(lr)


def _checked(group):
    """``(keys, values, snapshot)`` of a group, as ``_plan`` compares it at every step:
    first, cheaply, the same keys holding the same objects (which holds unless the
    user assigned something; None where a value is a list, which could change in
    place), and where that fails, the snapshot."""
    values = tuple(group.values())
    mutable = any(isinstance(value, list) for key, value in group.items() if key != "params")
    return tuple(group), None if mutable else values, _snapshot(group)


def _snapshot(group):
    """The group's hyperparameters, with lists frozen so that an in-place edit shows as
    a change, and types kept, inside tuples and lists too, so that ``True`` replaced by
    ``1`` does too, and ``(0.9, 0.999)`` by ``(np.array(0.9), 0.999)``, which compares
    equal."""
    return tuple((k, _typed(v)) for k, v in group.items() if k != "params")


def _typed(value):
    if isinstance(value, (list, tuple)):
        return type(value), tuple(map(_typed, value))
    return type(value), value


def decoupled_decay(group):
    """The factor ``1 - lr * weight_decay`` that scales the parameters with decoupled
    weight decay; 1 otherwise (the L2 form goes through ``l2``)."""
    if group["decoupled_weight_decay"]:
        return 1.0 - group["lr"] * group["weight_decay"]
    return 1.0
