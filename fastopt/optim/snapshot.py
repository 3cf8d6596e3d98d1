"""An optimizer's whole state as one typed value, which :mod:`fastopt.checkpoint` writes
and reads.

:func:`take` copies it under the optimizer's lock, so it holds one step's state even
while other threads step. :func:`restore` checks everything in it against the optimizer
first (the algorithm, the parameter layout, the buffers' sizes, the hyperparameters with
the algorithm's own checks, the counts, the host state, and that the next step's scalars
can be computed), under the lock, and only then writes; on error (ValueError or
TypeError, naming the field as "the checkpoint's ...") nothing changes.
"""

import json
import math
import numbers
import re

import numpy as np

from .. import checkpoint
from ..checkpoint import Snapshot
from ..precision import ABSMAX
from .checks import check_flag, plain, positive_or_none
from .spec import ALGORITHMS

OPTIONS = ("clip_grad_norm", "clip_grad_value", "skip_nonfinite")


def take(opt):
    """The :class:`Snapshot` of ``opt``: copies, taken under its lock. The groups and the
    step count are checked as the next step checks them (they may have been edited
    since the last), so that no checkpoint is written that a load would refuse."""
    with opt._lock:
        opt._check_group_count()
        step = opt._steps_taken()
        for index, group in enumerate(opt.param_groups):
            opt._check_params_kept(index, group)
            opt._check_group(index, group)
        to_host = opt._backend.to_host
        record = dict(
            algorithm=type(opt).__name__,
            groups=[_hyperparameters(group) for group in opt.param_groups],
            options={name: getattr(opt, name) for name in OPTIONS},
            step=step, skipped_steps=opt.skipped_steps,
            last_grad_norm=opt.last_grad_norm,
            host={name: opt.state[name] for name in opt.spec.host},
            started=[sorted(started) for started in opt._started],
            layout=[layout_record(layout) for layout in opt._layouts],
            storage=opt._storage.record())
        # JSON values, copied before the lock opens
        record = json.loads(json.dumps(record, default=_json_number))
        master = None if opt.master_params is None else to_host(opt.master_params)
        return Snapshot(**record, params=to_host(opt.flat_params), master=master,
                        buffers={name: to_host(value)
                                 for name, value in state_buffers(opt.state)})


def state_buffers(state):
    """``(name, array)`` of each state buffer in an optimizer's ``state``: its arrays,
    not its numbers (a step count set as a NumPy integer has a shape too)."""
    return [(name, value) for name, value in state.items()
            if hasattr(value, "shape") and not isinstance(value, np.generic)]


def restore(opt, snapshot):
    """Make ``opt`` continue from ``snapshot``, or raise with ``opt`` untouched."""
    with opt._lock:
        _apply(opt, snapshot, *_validated(opt, snapshot))


def _validated(opt, snapshot):
    """What ``_apply`` writes besides the snapshot's own fields, after checking all of
    them (nothing is modified)."""
    if not isinstance(snapshot, Snapshot):
        raise TypeError(f"expected a Snapshot, got {type(snapshot).__name__}")
    if snapshot.algorithm != type(opt).__name__:
        raise ValueError(f"the checkpoint is for {snapshot.algorithm}, not {type(opt).__name__}")
    expected = json.loads(json.dumps([layout_record(layout) for layout in opt._layouts]))
    if snapshot.layout != expected:
        raise ValueError("the checkpoint's parameter layout (names, shapes, offsets) differs "
                         f"from the optimizer's: {snapshot.layout} against {expected}")
    size = opt.flat_params.size
    arrays = {"params": (snapshot.params, size, opt.flat_params.dtype)}
    if (snapshot.master is None) != (opt.master_params is None):
        raise ValueError("the checkpoint's formats differ from the optimizer's: "
                         + ("it holds master weights, which the optimizer does not keep"
                            if opt.master_params is None else
                            "the optimizer keeps master weights, which it does not hold"))
    if snapshot.master is not None:
        arrays["master"] = (snapshot.master, size, opt._storage.master_dtype)
    theirs, ours = _storage(opt, snapshot.storage), _uniform(opt._storage.record())
    differ = [key for key in ("master_weights", "state_dtype", "stochastic_rounding")
              if theirs[key] != ours[key]]
    if ours["stochastic_rounding"] and theirs["seed"] != ours["seed"]:
        differ.append("seed")
    if differ:  # the gradients are not in a checkpoint: their dtype may differ
        raise ValueError("the checkpoint's formats differ from the optimizer's: "
                         + ", ".join(f"{key} {theirs[key]!r} (the optimizer's {ours[key]!r})"
                                     for key in differ))
    kept = {array: (size, dtype) for base in opt.state_names()
            for array, size, dtype in opt._kept(base)}
    for name, array in snapshot.buffers.items():
        if name not in kept:
            raise ValueError(f"the checkpoint holds a state buffer {name!r}, which "
                             f"{type(opt).__name__} does not keep (it keeps "
                             f"{', '.join(kept)})")
        arrays[f"state.{name}"] = (array, *kept[name])
    for base in opt.state_names():  # an 8-bit buffer's codes come with their scales
        if base in snapshot.buffers:
            missing = [array for array, _, _ in opt._kept(base)
                       if array not in snapshot.buffers]
            if missing:
                raise ValueError(f"the checkpoint holds the state buffer {base!r} without "
                                 f"{', '.join(missing)}, which the optimizer keeps with it")
    for name, (array, size, dtype) in arrays.items():
        if not isinstance(array, np.ndarray):
            raise TypeError(f"checkpoint array {name!r} must be a NumPy array, got "
                            f"{type(array).__name__}")
        if array.dtype != dtype:
            raise ValueError(f"the checkpoint's formats differ from the optimizer's: its "
                             f"array {name!r} is {array.dtype}, the optimizer keeps {dtype}")
        if array.shape != (size,):
            raise ValueError(f"checkpoint array {name!r} is {array.dtype} {array.shape}, "
                             f"expected {dtype} {(size,)}")
    for base in opt._storage.quantized & snapshot.buffers.keys():
        # A negative scale would decode every value of its block with the wrong sign.
        if np.any(snapshot.buffers[base + ABSMAX] < 0):
            raise ValueError(f"the checkpoint's {base + ABSMAX} holds negative block scales; "
                             "a block's absmax is >= 0 (or NaN)")
    groups = _restored_groups(opt, snapshot.groups)
    _check_options(snapshot.options)
    step = _count("step", snapshot.step)
    _count("skipped_steps", snapshot.skipped_steps)
    norm = snapshot.last_grad_norm
    if norm is not None and (not _is_real(norm) or norm < 0):
        raise ValueError(f"the checkpoint's last_grad_norm must be None or a number >= 0, "
                         f"got {norm!r}")
    host = _restored_host(opt, snapshot.host, len(groups))
    started = _restored_started(snapshot.started, len(groups), snapshot.buffers)
    for index, group in enumerate(groups):  # the next step must be computable
        group_host = {name: values[index] for name, values in host.items()}
        try:
            group = opt._fold(index, group, step + 1, group_host, started[index])[0]
            opt.host_after(group, step + 1, group_host)
        except (ArithmeticError, TypeError, ValueError) as error:
            raise ValueError(f"the checkpoint cannot take its next step (step {step + 1}): "
                             f"{type(error).__name__}: {error}") from None
    return groups, host, started


def _apply(opt, snapshot, groups, host, started):
    backend = opt._backend
    buffers = {}  # allocated before the first write, so that running out of memory
    for name, array in snapshot.buffers.items():  # leaves the optimizer as it was
        buffers[name] = buffer = backend.zeros(array.size, array.dtype)
        backend.copy(buffer, array)
    # Everything is checked: from here on, only writes.
    for name in OPTIONS:
        setattr(opt, name, snapshot.options[name])
    backend.copy(opt.flat_params, snapshot.params)
    if snapshot.master is not None:
        backend.copy(opt.master_params, snapshot.master)
    for key, _ in state_buffers(opt.state):
        del opt.state[key]
    opt.state.update(buffers)
    for live, group in zip(opt.param_groups, groups):
        live.update(group)
    opt._checked = [None] * len(groups)
    opt._started = started
    opt._steady = None
    opt.state.update(host, step=snapshot.step)
    opt.skipped_steps = snapshot.skipped_steps
    opt.last_grad_norm = snapshot.last_grad_norm


def layout_record(layout):
    """A flattening layout as JSON values."""
    return {"keys": None if layout.keys is None else [_json_key(k) for k in layout.keys],
            "shapes": [list(shape) for shape in layout.shapes],
            "offsets": list(layout.offsets), "prefix": layout.prefix}


def _json_key(key):
    """A parameter name as JSON keeps it: NumPy scalars become Python numbers."""
    key = key.item() if isinstance(key, np.generic) else key
    if not isinstance(key, (str, int, float, bool, tuple)) and key is not None:
        raise TypeError(f"parameter name {key!r} cannot be saved: use str, int or tuple names")
    return key


def _hyperparameters(group):
    """A group's hyperparameters as JSON values; a schedule is recorded by its repr."""
    saved = {}
    for key, value in group.items():
        if key == "params":
            continue
        if callable(value):
            value = {"schedule": repr(value)}
        saved[key] = value
    try:
        json.dumps(saved, default=_json_number)
    except TypeError as error:
        raise TypeError(f"a hyperparameter cannot be saved: {error}") from None
    return saved


def _json_number(value):
    """A NumPy scalar (a hyperparameter or a step count the user set) as the Python
    number it equals exactly, which JSON writes and a restore reads back as it was."""
    number = plain(value)
    if number is value or isinstance(number, np.generic):
        raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")
    return number


def _restored_groups(opt, saved_groups):
    if not isinstance(saved_groups, list) or len(saved_groups) != len(opt.param_groups):
        raise ValueError(f"the checkpoint must list {len(opt.param_groups)} param_groups, "
                         f"got {saved_groups!r}")
    defaults = type(opt).spec.defaults
    groups = [_restored_group(index, group, saved, defaults)
              for index, (group, saved) in enumerate(zip(opt.param_groups, saved_groups))]
    for index, group in enumerate(groups):
        opt._check_group(index, group)
    return groups


# Hyperparameters that checkpoints of earlier versions lack: they load with the default,
# which is what those versions did.
ADDED_LATER = {"caution"}


def _restored_group(index, group, saved, defaults):
    """``group``'s hyperparameters as the checkpoint has them (tuples stay tuples; a
    saved schedule needs the optimizer to have the same schedule already). A
    hyperparameter added after the checkpoint was written (``caution``) takes its
    default, which is the behaviour the checkpoint had."""
    where = f"the checkpoint's param_groups[{index}]"
    if not isinstance(saved, dict):
        raise ValueError(f"{where} must be a dict, got {saved!r}")
    names = set(group) - {"params", "name"}
    missing = names - set(saved)
    if (set(saved) - {"name"} - names or missing - ADDED_LATER
            or ("name" in saved and "name" not in group)):
        raise ValueError(f"{where} has the options {sorted(map(str, saved))}, the "
                         f"optimizer's {sorted(set(group) - {'params'})}")
    restored = {name: defaults[name] for name in missing}
    for key, value in saved.items():
        current = group[key]
        if _is_schedule(value):
            if not callable(current):
                raise ValueError(f"{where}[{key!r}] is the schedule {value['schedule']}; "
                                 "give the optimizer its schedule before loading")
            if _schedule_id(value["schedule"]) != _schedule_id(repr(current)):
                raise ValueError(f"{where}[{key!r}] is the schedule {value['schedule']}, "
                                 f"but the optimizer's is {current!r}")
            value = current
        elif isinstance(current, tuple) and isinstance(value, list):
            value = tuple(value)
        restored[key] = value
    return restored


def _schedule_id(text):
    """A schedule's repr without memory addresses (``<function f at 0x7f...>``), which
    differ from process to process: such schedules are compared by name only."""
    return re.sub(r" at 0x[0-9a-fA-F]+", "", str(text))


def _check_options(options):
    if not isinstance(options, dict) or set(options) != set(OPTIONS):
        raise ValueError(f"the checkpoint's options must be {sorted(OPTIONS)}, got {options!r}")
    for name in ("clip_grad_norm", "clip_grad_value"):
        positive_or_none(name, options[name])
    check_flag("skip_nonfinite", options["skip_nonfinite"])


def _restored_host(opt, host, count):
    """Per-group host values: each a finite number, or None where it starts as None."""
    initial = opt.spec.host
    if not isinstance(host, dict) or set(host) != set(initial):
        raise ValueError(f"the checkpoint's host state must hold {sorted(initial)}, got {host!r}")
    for name, values in host.items():
        if not isinstance(values, list) or len(values) != count:
            raise ValueError(f"the checkpoint's host state {name!r} must list {count} values, "
                             f"one per group, got {values!r}")
        for value in values:
            if not (value is None and initial[name] is None
                    or _is_real(value) and math.isfinite(value)):
                raise ValueError(f"the checkpoint's host state {name!r} must hold finite "
                                 f"numbers, got {value!r}")
    return {name: list(values) for name, values in host.items()}


def _restored_started(started, count, buffers):
    """Per group, the set of state buffers it has begun: names of the saved buffers."""
    if not isinstance(started, list) or len(started) != count:
        raise ValueError(f"the checkpoint's started must list {count} groups, got {started!r}")
    sets = []
    for names in started:
        if (not isinstance(names, list) or not all(name in buffers for name in names)
                or len(set(names)) != len(names)):
            raise ValueError(f"the checkpoint's started must list saved state buffers "
                             f"{sorted(buffers)} once each, got {names!r}")
        sets.append(set(names))
    return sets


def _count(name, value):
    if type(value) is not int or value < 0:
        raise ValueError(f"the checkpoint's {name} must be an int >= 0, got {value!r}")
    return value


def _is_real(value):
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_schedule(saved):
    """Whether a saved group value stands for a schedule (which the file names only)."""
    return isinstance(saved, dict) and set(saved) == {"schedule"}


def load(path):
    """A new CPU optimizer, of the checkpoint's algorithm, continuing from ``path``.

    Its parameters are NumPy arrays in the saved structure. An optimizer whose lr is a
    schedule cannot be rebuilt from the file alone: build it with its schedule and
    call ``opt.load(path)``.
    """
    contents = checkpoint.read(path)
    with checkpoint.naming(path):
        snapshot = checkpoint.snapshot_of(contents)  # checked before anything is built on it
        scheduled = [f"param_groups[{index}][{key!r}]"
                     for index, group in enumerate(snapshot.groups) if isinstance(group, dict)
                     for key, value in group.items() if _is_schedule(value)]
        if scheduled:
            raise ValueError(f"the checkpoint's {', '.join(scheduled)} is a schedule, which "
                             "fastopt.load cannot rebuild from the file: build the "
                             "optimizer with its schedule and call opt.load(path)")
        opt = _build(snapshot)
        opt.restore(snapshot)
    return opt


def _build(snapshot):
    """The optimizer that ``snapshot``'s algorithm and layout describe, from copies of
    its saved parameters."""
    algorithm = ALGORITHMS.get(str(snapshot.algorithm))
    if algorithm is None:
        raise ValueError(f"the checkpoint names no fastopt algorithm: {snapshot.algorithm!r}")
    formats = _formats(snapshot)
    try:
        structures = [_structure(layout, snapshot.params) for layout in snapshot.layout]
        grouped = len(structures) > 1 or snapshot.layout[0]["prefix"] != "params"
        names = [{"name": g["name"]} if "name" in g else {} for g in snapshot.groups]
        params = ([{"params": s, **n} for s, n in zip(structures, names)] if grouped
                  else structures[0])
    except (AttributeError, IndexError, KeyError, TypeError, ValueError) as error:
        raise ValueError(f"the checkpoint's layout describes no parameters: "
                         f"{type(error).__name__}: {error}") from None
    try:
        return algorithm(params, **formats)
    except (TypeError, ValueError) as error:
        raise ValueError(f"the checkpoint's parameters and storage make no "
                         f"{snapshot.algorithm}: {type(error).__name__}: {error}") from None


def _storage(opt, record):
    """The checkpoint's storage options, checked (None, before version 3: every buffer
    float32)."""
    if record is None:
        return {"master_weights": None, "grad_dtype": "float32", "stochastic_rounding": False,
                "seed": 0, "state_dtype": "float32"}
    return _uniform(_checked_storage(record))


def _uniform(record):
    """``record`` with a state_dtype that is one dtype for every buffer written as that
    dtype, which is what a comparison and a new optimizer need of it. (Adafactor's
    checkpoints before this named its float32 state "second", after its rule's
    argument, where its buffers are row_var, col_var and variance.)"""
    dtypes = set(record["state_dtype"].values())
    return {**record, "state_dtype": dtypes.pop()} if len(dtypes) == 1 else record


def _checked_storage(record):
    fields = {"master_weights", "state_dtype", "grad_dtype", "stochastic_rounding", "seed"}
    if not (isinstance(record, dict) and set(record) == fields
            and record["master_weights"] in ("float32", "remainder", None)
            and isinstance(record["state_dtype"], dict)
            and all(isinstance(value, str) for value in record["state_dtype"].values())
            and isinstance(record["grad_dtype"], str)
            and isinstance(record["stochastic_rounding"], bool)
            and type(record["seed"]) is int and 0 <= record["seed"] < 2 ** 64):
        raise ValueError(f"the checkpoint's storage must be {{'master_weights': 'float32', "
                         f"'remainder' or None, 'state_dtype': {{name: str}}, 'grad_dtype': str, "
                         f"'stochastic_rounding': bool, 'seed': int >= 0}}, got {record!r}")
    return record


def _formats(snapshot):
    """The storage options of the optimizer that saved ``snapshot``, to build one like
    it (fastopt's defaults for a file before version 3)."""
    return {} if snapshot.storage is None else _uniform(_checked_storage(snapshot.storage))


def _key(saved):
    """A parameter name read back from JSON (which turned tuples into lists)."""
    return tuple(_key(k) for k in saved) if isinstance(saved, list) else saved


def _structure(layout, params):
    """Parameter arrays (copies) in the structure that ``layout`` records."""
    arrays = [params[offset:offset + int(np.prod(shape, dtype=np.int64))].reshape(shape).copy()
              for offset, shape in zip(layout["offsets"], layout["shapes"])]
    return arrays if layout["keys"] is None else dict(zip(map(_key, layout["keys"]), arrays))
