"""The fast path of :meth:`fastopt.Optimizer.step`: a step set up as the one before it.

At small sizes a step's time goes to deriving again what the step before derived: at
1e3 parameters Adam's kernel takes about 1 µs of the 8 µs of a plain step, the rest
goes to checking the hyperparameters and the state buffers, looking up the kernel and
rounding ``prep`` to float32. In a training loop nothing of that changes from one step
to the next but the step count.

:class:`Steady` keeps what a plain step on the CPU derived. The next
step takes it after finding every group unchanged (a :class:`Group` counts the changes
made to it), and the state dict, its buffers and the flat buffers to be the objects
that step used. It computes only what the step count changes, with the functions the
plain step calls (the scalars with their overflow check, the host state, a scheduled
lr), so a steady step is bitwise the plain one and fails as it would, before anything
is written. A schedule may change the optimizer as it runs: the checks run again after
it.

Everything else takes the plain path: a step given gradients, a loss scale or
``skip_nonfinite``, clipping by norm or the non-finite skip, a step of several passes
(LAMB, caution ...), a list among the hyperparameters (it could change in place), CUDA,
and the step after anything changed, which sets up the next Steady. The option setters
and a restore drop it. Every storage format takes it (16-bit parameters, master weights,
16-bit and 8-bit state, stochastic rounding): the launch, which the plain step builds
(``Optimizer._launcher``), is kept, and each step passes it the step count, from which
stochastic rounding draws.
"""

import operator

from . import engine
from .checks import plain


class Group(dict):
    """A parameter group of :class:`fastopt.Optimizer`: a dict that counts the changes
    made to it in ``changes``, so that a step tells in one comparison that a group holds
    what the step before validated (comparing its keys and values takes a fifth of a
    step at 1e3 parameters). A value changed in place (an element of a list) is not a
    change of the group: groups that hold lists take the plain path, which checks
    them. Neither are changes made through dict's own methods
    (``dict.update(group, ...)``), which go around the group's.

    A NumPy scalar put in a group is kept as the Python number it equals
    (``checks.plain``): a step's host math is then float64's whatever type the value
    came in, as it is after a checkpoint, which saves it as that number."""

    changes = 0  # a class default: unpickling sets the items before the attributes

    def __init__(self, *args, **kwargs):  # also when called again, on a live group
        super().__init__(_plain(*args, **kwargs))
        self.changes += 1

    def __setitem__(self, key, value):
        super().__setitem__(key, plain(value))
        self.changes += 1

    def __delitem__(self, key):
        super().__delitem__(key)
        self.changes += 1

    def __ior__(self, other):
        self.update(other)
        return self

    def update(self, *args, **kwargs):
        super().update(_plain(*args, **kwargs))
        self.changes += 1

    def setdefault(self, key, default=None):
        self.changes += 1
        return super().setdefault(key, plain(default))

    def pop(self, *args):
        self.changes += 1
        return super().pop(*args)

    def popitem(self):
        self.changes += 1
        return super().popitem()

    def clear(self):
        super().clear()
        self.changes += 1


def _plain(*args, **kwargs):
    """The items of ``dict(*args, **kwargs)``, their NumPy scalars as Python numbers."""
    return {key: plain(value) for key, value in dict(*args, **kwargs).items()}


class Steady:
    """What a plain step derived that the next step may reuse (see the module)."""

    __slots__ = ("state", "params", "grads", "param_groups", "buffers", "groups", "host",
                 "scheduled")

    def __init__(self, opt, buffers, groups):
        self.state, self.params, self.grads = opt.state, opt.flat_params, opt.flat_grads
        self.param_groups, self.buffers, self.groups = opt.param_groups, buffers, groups
        self.host = opt.spec.host
        self.scheduled = any(group.scheduled for group in groups)

    @classmethod
    def of(cls, opt, plans):
        """The Steady of the plain step of ``opt`` that just took ``plans`` (those of
        ``Optimizer._plan``) over ``flat_grads``, without loss scale or a skip option
        passed to it; None where the next step must take the plain path."""
        if opt.device != "cpu" or opt.clip_grad_norm is not None or opt.skip_nonfinite:
            return None
        if not all(engine.single_pass(opt, plan[3]) for plan in plans):
            return None  # first: the algorithms of several passes ask at every step
        buffers, groups = {}, []
        for index, (group, spec, _, h, _) in enumerate(plans):
            live, checked = opt.param_groups[index], opt._checked[index]
            if checked is None:  # restored during the step (by a schedule)
                return None
            keys, values, _ = checked
            if (not isinstance(live, Group) or values is None  # holds a list
                    or tuple(live) != keys or not all(map(operator.is_, live.values(), values))
                    or not opt._started[index].issuperset(spec)):
                return None
            # Every array of each buffer: 8-bit state's absmax and small ones too.
            buffers.update((array, opt.state[array]) for name in spec
                           for array, _, _ in opt._kept(name))
            layout = opt._layouts[index]
            # prep holds maximize, clip_grad_value and the L2 decay: never a scheduled lr.
            prep = engine.prep(type(opt), group, 1.0, 1.0, opt.clip_grad_value)
            launch = opt._launcher(opt.rule, spec, layout.start, layout.stop, opt.flat_grads,
                                   prep, group)
            groups.append(GroupStep(opt, index, spec, launch))
        return cls(opt, tuple(buffers.items()), tuple(groups))

    def step(self, opt):
        """Take ``opt``'s next step, as ``opt.step()`` would, where it is set up as the
        step that made this Steady; False, having changed nothing, where it is not."""
        if not self._unchanged(opt):
            return False
        state, groups = self.state, self.groups
        count = state.get("step")
        if type(count) is not int or count < 0:
            return False  # the plain step refuses it, saying why
        step = count + 1
        if self.host:
            return self._step_with_host(opt, step)
        # Every group's scalars before the first launch: one may raise.
        scalars = [engine.fold(opt, group.at(opt, step), step, (), NO_HOST, group.where)
                   for group in groups]
        if self.scheduled and not self._unchanged(opt):
            return False  # a schedule changed the optimizer
        for group, h in zip(groups, scalars):
            group.launch(h, step)
        state["step"] = step
        return True

    def _unchanged(self, opt):
        """Whether ``opt`` is set up as the step that made this Steady."""
        state, groups = self.state, self.groups
        if (opt._steady is not self or opt.state is not state
                or opt.flat_grads is not self.grads or opt.flat_params is not self.params
                or opt.param_groups is not self.param_groups
                or len(opt.param_groups) != len(groups)):
            return False
        for name, buffer in self.buffers:
            if state.get(name) is not buffer:
                return False
        for live, group in zip(opt.param_groups, groups):
            if live is not group.group or live.changes != group.changes:
                return False
        return True

    def _step_with_host(self, opt, step):
        """:meth:`step` of an algorithm with host state (NAdam's ``mu_product``)."""
        state, names, steps = self.state, self.host, []
        for group in self.groups:
            hyperparameters = group.at(opt, step)
            host = {name: state[name][group.index] for name in names}
            if opt.buffers(hyperparameters, host) != group.spec:
                return False
            h = engine.fold(opt, hyperparameters, step, (), host, group.where)
            steps.append((group, hyperparameters, host, h))
        afters = [engine.check_host_after(opt, hyperparameters, step, host, group.index)
                  for group, hyperparameters, host, _ in steps]  # all before the first launch
        if self.scheduled and not self._unchanged(opt):
            return False
        for (group, _, _, h), after in zip(steps, afters):
            group.launch(h, step)
            for name, value in after.items():
                state[name][group.index] = value
        state["step"] = step
        return True


class GroupStep:
    """One group's part of a :class:`Steady`: the group and its count of changes when
    the plain step validated it, its state buffers (``spec``) and its kernel's
    launcher."""

    __slots__ = ("group", "changes", "index", "where", "scheduled", "spec", "launch")

    def __init__(self, opt, index, spec, launch):
        self.group = opt.param_groups[index]
        self.changes = self.group.changes
        self.index, self.where = index, index if opt._grouped else None
        self.scheduled = callable(self.group.get("lr"))
        self.spec, self.launch = spec, launch

    def at(self, opt, step):
        """The group's hyperparameters at step number ``step`` (its lr scheduled)."""
        return opt._scheduled(self.index, self.group, step) if self.scheduled else self.group


NO_HOST = {}
