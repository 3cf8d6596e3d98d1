"""What an algorithm is, as data: its hyperparameters with their defaults and checks, its
rule, its torch.optim namesake and its capabilities.

Each algorithm class declares a :class:`Spec` as ``spec``. Its constructor (with a real
signature) and the validation of its hyperparameters are built from it, and
:data:`ALGORITHMS` lists every class that declares one, in the order they were defined.
Everything that enumerates algorithms reads that table: ``fastopt.torch`` builds its
drop-in classes from it, ``fastopt bench`` and ``fastopt check`` take their settings
from it, and the tests take their lists from it, so that a new algorithm cannot be
missing from any of them.
"""

import dataclasses
import inspect
from dataclasses import dataclass, field
from typing import Callable, Mapping

from . import checks

# Every algorithm class with a spec, by name: filled as the classes are defined.
ALGORITHMS = {}

# How a moving average of ``Spec.averages`` is kept in 8 bits: by the dynamic map with
# negative values, or by the one for averages that are never negative (of squares).
SIGNED, UNSIGNED = "signed8", "unsigned8"

# The kinds of pass over the buffers that a step makes, for ``Spec.passes``.
MAP = "map"  # the rule, element-wise, in place
MAP_REDUCE = "map and reduce"  # the rule element-wise, and sums per segment or overall
REDUCE = "reduce"  # sums per segment (a tensor, a row, a column), reading only


@dataclass(frozen=True)
class Hyperparameter:
    """One argument of the constructor: ``check(value)`` raises TypeError or ValueError
    with torch's message. fastopt.torch adds those that its torch.optim namesake lacks
    (Adam's ``bias_correction``) after torch's, keyword-only."""

    name: str
    default: object
    check: Callable[[object], None]
    keyword_only: bool = False


@dataclass(frozen=True)
class Spec:
    """An algorithm, declared once.

    Attributes:
        rule: the name of its per-element function in ``kernels.rules``.
        hyperparameters: the constructor's arguments after ``params``, in order.
        constraints: checks of a whole group, for rules that tie hyperparameters
            together (SGD's Nesterov needs momentum); each raises like a ``check``.
        fixed: hyperparameters a variant sets for good (AdamW's decoupled decay): in
            every group, and not among the constructor's arguments.
        host: host-side state (plain numbers per group, like NAdam's ``mu_product``)
            with its initial values.
        torch: the name of the torch.optim class with the same arguments and numbers,
            or None.
        passes: the passes one step makes over the buffers (MAP, MAP_REDUCE, REDUCE).
        per_tensor: whether the step needs each tensor's extent (norms, factors): a
            flat buffer must come with shapes (``fastopt.adopt(flat, shapes)``).
        keeps_subnormals: whether the kernels must not flush subnormal numbers (the
            rule's result hangs on them).
        factored: whether its state is factored, not laid out like the parameters
            (Adafactor's): it stays float32 (the factors move on the host), and its
            passes draw random bits at the parameters' places (``Segments.draws``),
            not at the state's, which a matrix's rows share.
        averages: the state buffers that are moving averages, which 8-bit state
            (``state_dtype="int8"``) may keep, each ``SIGNED`` or ``UNSIGNED``.
        moves: bytes per parameter that one step reads and writes, with ``bench``.
        bench: the options ``fastopt bench`` times it with.
        check: the options ``fastopt check`` fits a least-squares problem with.
    """

    rule: str
    hyperparameters: tuple
    constraints: tuple = ()
    fixed: Mapping = field(default_factory=dict)
    host: Mapping = field(default_factory=dict)
    torch: str = None
    passes: tuple = (MAP,)
    per_tensor: bool = False
    keeps_subnormals: bool = False
    factored: bool = False
    averages: Mapping = field(default_factory=dict)
    moves: int = 0
    bench: Mapping = field(default_factory=dict)
    check: Mapping = field(default_factory=dict)

    @property
    def one_pass(self):
        """Whether a step is one element-wise pass of the rule, which needs no sum over
        a tensor (what 8-bit state is stepped in, a block at a time)."""
        return self.passes == (MAP,)

    @property
    def defaults(self):
        """Every hyperparameter's default, the fixed ones included."""
        return {**{h.name: h.default for h in self.hyperparameters}, **self.fixed}

    def validate(self, group):
        """Raise TypeError or ValueError, with torch's message, for an invalid
        hyperparameter in ``group``."""
        for hyperparameter in self.hyperparameters:
            hyperparameter.check(group[hyperparameter.name])
        for name, value in self.fixed.items():
            if group[name] != value:
                raise ValueError(f"{name} is always {value!r} here, got {group[name]!r}")
        for constraint in self.constraints:
            constraint(group)

    def variant(self, *, defaults=(), fixed=(), **changes):
        """This spec with other defaults, some hyperparameters fixed (and so no longer
        arguments), and other fields changed: AdamW from Adam."""
        defaults, fixed = dict(defaults), {**self.fixed, **dict(fixed)}
        hyperparameters = tuple(
            dataclasses.replace(h, default=defaults.pop(h.name, h.default))
            for h in self.hyperparameters if h.name not in fixed)
        if defaults:
            raise ValueError(f"no hyperparameters {sorted(defaults)} to give defaults to")
        return dataclasses.replace(self, hyperparameters=hyperparameters, fixed=fixed, **changes)


def define_init(qualname, positional, keyword, body, namespace, base):
    """``__init__(self, params, <positional>, *, <keyword>, <base's keyword-only
    arguments>)``, named ``qualname``, running the statement ``body`` with ``options``
    bound to a dict of those last arguments, which it passes on to ``base``. Defined
    from source so that its signature is real (as dataclasses define theirs), whole
    (``help`` shows every option), and its errors name the class: an unknown argument
    is refused by this function, not by ``base``. ``positional`` and ``keyword`` are
    ``(name, default)`` pairs; ``body`` sees the arguments and ``namespace``."""
    passed = [(p.name, p.default) for p in inspect.signature(base).parameters.values()
              if p.kind is inspect.Parameter.KEYWORD_ONLY]
    defaults = dict(positional + keyword + passed)
    arguments = ["self", "params"] + [f"{name}=_defaults[{name!r}]" for name, _ in positional]
    if keyword or passed:
        arguments += ["*"] + [f"{name}=_defaults[{name!r}]" for name, _ in keyword + passed]
    options = ", ".join(f"{name}={name}" for name, _ in passed)
    source = (f"def __init__({', '.join(arguments)}):\n"
              f"    options = dict({options})\n    {body}\n")
    scope = dict(namespace, _defaults=defaults)
    exec(source, scope)
    init = scope["__init__"]
    init.__qualname__ = qualname
    return init


def constructor(name, spec, base_init):
    """The ``__init__`` of the algorithm class ``name``: its hyperparameters as
    arguments, passed on as ``base_init(self, params, defaults, **options)`` with the
    fixed ones added, then ``base_init``'s own keyword-only arguments."""
    hyperparameters = spec.hyperparameters
    group = ", ".join(f"{h.name}={h.name}" for h in hyperparameters)
    return define_init(f"{name}.__init__",
                       [(h.name, h.default) for h in hyperparameters if not h.keyword_only],
                       [(h.name, h.default) for h in hyperparameters if h.keyword_only],
                       f"base_init(self, params, dict({group}, **fixed), **options)",
                       {"base_init": base_init, "fixed": dict(spec.fixed)}, base_init)


# -- hyperparameters of the usual kinds, with torch's checks ----------------------------

def lr(default):
    return Hyperparameter("lr", default, checks.check_lr)


def betas(default):
    return Hyperparameter("betas", default, checks.check_betas)


def eps(default):
    return Hyperparameter("eps", default, checks.check_eps)


def nonnegative(name, default, label=None, **kinds):
    return Hyperparameter(name, default,
                          lambda value: checks.check_nonnegative(name, value, label), **kinds)


def weight_decay(default=0.0):
    return nonnegative("weight_decay", default)


def number(name, default, **kinds):
    return Hyperparameter(name, default, lambda value: checks.check_number(name, value), **kinds)


def flag(name, default=False, **kinds):
    return Hyperparameter(name, default, lambda value: checks.check_flag(name, value), **kinds)


def maximize():
    return flag("maximize", keyword_only=True)
