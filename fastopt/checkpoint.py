"""Checkpoints: an optimizer's whole state in one file, written atomically, checked on load.

The file (format version 2) is an uncompressed NumPy ``.npz`` archive holding:

- ``meta``: a UTF-8 JSON document stored as a uint8 array, with ``format``
  (``"fastopt-checkpoint"``), ``version``, ``algorithm`` (the class name), ``groups`` (each
  group's hyperparameters; a schedule is recorded by its repr), ``options`` (the clipping
  and skip options), ``step``, ``skipped_steps``, ``last_grad_norm``, ``host`` (per-group
  host state such as NAdam's ``mu_product``), ``started`` (the state buffers each group
  has begun), ``layout`` (per group: the parameter names or None, their shapes and
  offsets in the flat buffer), ``buffers`` (the names of the arrays below) and
  ``sha256``, the checksum;
- ``params``: the flat float32 parameters;
- ``state.<name>``: each flat float32 state buffer.

**The checksum** covers every field. It is the SHA-256 of a sequence of parts: first
the part ``meta``, the record without ``sha256`` as canonical JSON
(``json.dumps(record, sort_keys=True, separators=(",", ":"))``, UTF-8), then one part
per array in sorted name order, its raw float32 bytes. Each part is fed as its name,
a zero byte, its length in bytes as 8 little-endian bytes, and its bytes. Version-1
files (whose checksum covers only the arrays: each name, then its bytes) still load,
with every field validated as below; but there an edit that stays valid (a step count
of 5 made 4) cannot be noticed. fastopt writes version 2 only.

:func:`save` copies the buffers under the optimizer's lock (a consistent snapshot,
even while other threads step), writes the copy to a temporary file in the same
folder, fsyncs it, reads it back and checks it, and renames it over the target; so a
process killed while saving leaves the previous file intact. It first deletes the
temporary files that killed saves left in that folder.

Loading checks everything before it changes anything: the checksum, then every field's
type and range (the step count, the per-group started buffers and host values, the
hyperparameters with the algorithm's own checks, a schedule's repr against the
optimizer's), and that the next step's scalars can be computed. A file whose contents
are wrong raises ValueError, naming the file; an in-memory checkpoint raises
ValueError or TypeError.
"""

import contextlib
import hashlib
import json
import math
import numbers
import os
import re
import socket
import tempfile

import numpy as np

from .optim.optimizer import _positive_or_none, check_flag

FORMAT = "fastopt-checkpoint"
VERSION = 2
READABLE = (1, 2)
_ARRAY_PREFIX = "state."
_FIELDS = {"format", "version", "algorithm", "groups", "options", "step", "skipped_steps",
           "last_grad_norm", "host", "started", "layout", "buffers", "sha256"}
_OPTIONS = {"clip_grad_norm", "clip_grad_value", "skip_nonfinite"}

# Temporary files are named after the saving process and machine, so that a later save
# can tell the orphans of killed processes from the files of saves still running.
_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
_TEMPORARY = re.compile(r"\.fastopt-(\d+)-([0-9a-f]{8})-[^/]*\.tmp\Z")


def state_dict(opt):
    """``{"meta": dict, "arrays": {name: float32 host array}}`` of ``opt``: copies, taken
    under the optimizer's lock, so a consistent snapshot even while other threads step."""
    with opt._lock:
        to_host = opt._backend.to_host
        arrays = {"params": to_host(opt.flat_params)}
        for name, value in opt.state.items():
            if hasattr(value, "shape"):
                arrays[_ARRAY_PREFIX + name] = to_host(value)
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "algorithm": type(opt).__name__,
            "groups": [_hyperparameters(group) for group in opt.param_groups],
            "options": {"clip_grad_norm": opt.clip_grad_norm,
                        "clip_grad_value": opt.clip_grad_value,
                        "skip_nonfinite": opt.skip_nonfinite},
            "step": opt.state["step"],
            "skipped_steps": opt.skipped_steps,
            "last_grad_norm": opt.last_grad_norm,
            "host": {name: opt.state[name] for name in opt._initial_host()},
            "started": [sorted(started) for started in opt._started],
            "layout": [_layout(layout) for layout in opt._layouts],
            "buffers": sorted(arrays),
        }
        meta = json.loads(json.dumps(meta))  # JSON values, copied before the lock opens
    meta["sha256"] = _checksum(meta, arrays)
    return {"meta": meta, "arrays": arrays}


def load_state_dict(opt, checkpoint, _verified=False):
    """Make ``opt`` continue from ``checkpoint``; raises ValueError/TypeError, with
    ``opt`` untouched, unless every part of it fits."""
    with opt._lock:
        _apply(opt, *_validated(opt, checkpoint, _verified))


def load_file(opt, path):
    """``opt.load(path)``: :func:`load_state_dict` from a file; any fault in the file's
    contents raises ValueError naming it."""
    checkpoint = read(path)
    with _naming(path):
        load_state_dict(opt, checkpoint)


def _validated(opt, checkpoint, verified):
    """Everything ``_apply`` writes, after checking all of it (nothing is modified)."""
    if not isinstance(checkpoint, dict) or set(checkpoint) != {"meta", "arrays"}:
        raise TypeError("a checkpoint is a dict {'meta': ..., 'arrays': ...}, as "
                        "state_dict() returns it")
    meta, arrays = checkpoint["meta"], checkpoint["arrays"]
    if not verified:
        _verify(meta, arrays)
    if set(meta) != _FIELDS:
        raise ValueError(f"the checkpoint's record has the fields {sorted(map(str, meta))}, "
                         f"expected {sorted(_FIELDS)}")
    if meta["algorithm"] != type(opt).__name__:
        raise ValueError(f"the checkpoint is for {meta['algorithm']}, not "
                         f"{type(opt).__name__}")
    expected = json.loads(json.dumps([_layout(layout) for layout in opt._layouts]))
    if meta["layout"] != expected:
        raise ValueError("the checkpoint's parameter layout (names, shapes, offsets) differs "
                         f"from the optimizer's: {meta['layout']} against {expected}")
    if meta["buffers"] != sorted(arrays) or "params" not in arrays:
        raise ValueError(f"the checkpoint holds arrays {sorted(arrays)}, its index lists "
                         f"{meta['buffers']}")
    buffers = []
    for name, array in arrays.items():
        if name != "params":
            buffer = name[len(_ARRAY_PREFIX):]
            if not (name.startswith(_ARRAY_PREFIX) and buffer.isidentifier()):
                raise ValueError(f"the checkpoint holds an array {name!r}; only 'params' "
                                 "and 'state.<name>' belong there")
            buffers.append(buffer)
        size = opt.flat_params.size if name == "params" else opt._state_size(buffer)
        if array.dtype != np.float32 or array.shape != (size,):
            raise ValueError(f"checkpoint array {name!r} is {array.dtype} {array.shape}, "
                             f"expected float32 {(size,)}")
    groups = _restored_groups(opt, meta["groups"])
    options = _restored_options(meta["options"])
    step = _count("step", meta["step"])
    skipped = _count("skipped_steps", meta["skipped_steps"])
    norm = meta["last_grad_norm"]
    if norm is not None and (not _is_real(norm) or norm < 0):
        raise ValueError(f"the checkpoint's last_grad_norm must be None or a number >= 0, "
                         f"got {norm!r}")
    host = _restored_host(opt, meta["host"], len(groups))
    started = _restored_started(meta["started"], len(groups), buffers)
    for index, group in enumerate(groups):  # the next step must be computable
        group_host = {name: values[index] for name, values in host.items()}
        try:
            group = opt._fold(index, group, step + 1, group_host, started[index])[0]
            opt._host_state(group, step + 1, group_host)
        except (ArithmeticError, TypeError, ValueError) as error:
            raise ValueError(f"the checkpoint cannot take its next step (step {step + 1}): "
                             f"{type(error).__name__}: {error}") from None
    return arrays, groups, options, step, skipped, norm, host, started


def _apply(opt, arrays, groups, options, step, skipped, norm, host, started):
    backend = opt._backend
    buffers = {}  # allocated before the first write, so that running out of memory
    for name, array in arrays.items():  # leaves the optimizer as it was
        if name != "params":
            buffers[name[len(_ARRAY_PREFIX):]] = buffer = backend.zeros(array.size)
            backend.copy(buffer, array)
    # Everything is checked: from here on, only writes.
    opt.clip_grad_norm = options["clip_grad_norm"]
    opt.clip_grad_value = options["clip_grad_value"]
    opt.skip_nonfinite = options["skip_nonfinite"]
    backend.copy(opt.flat_params, arrays["params"])
    for key in [key for key, value in opt.state.items() if hasattr(value, "shape")]:
        del opt.state[key]
    opt.state.update(buffers)
    for live, group in zip(opt.param_groups, groups):
        live.update(group)
    opt._checked = [None] * len(groups)
    opt._started = started
    opt.state.update(host, step=step)
    opt.skipped_steps = skipped
    opt.last_grad_norm = norm


def _verify(meta, arrays):
    """Check the format, the version and the checksum."""
    if not isinstance(meta, dict) or not isinstance(arrays, dict):
        raise TypeError("a checkpoint's meta and arrays must be dicts")
    version = meta.get("version")
    if meta.get("format") != FORMAT or type(version) is not int or version not in READABLE:
        raise ValueError(f"not a {FORMAT} of version 1 or 2: format {meta.get('format')!r}, "
                         f"version {version!r}")
    for name, array in arrays.items():
        if not isinstance(name, str) or not isinstance(array, np.ndarray):
            raise TypeError(f"a checkpoint's arrays must be NumPy arrays by name, got "
                            f"{name!r}: {type(array).__name__}")
    checksum = _checksum(meta, arrays) if version == 2 else _checksum_v1(arrays)
    if meta.get("sha256") != checksum:
        raise ValueError("the checkpoint does not match its checksum: it is corrupted, or "
                         "was edited after it was written")


def _restored_groups(opt, saved_groups):
    if not isinstance(saved_groups, list) or len(saved_groups) != len(opt.param_groups):
        raise ValueError(f"the checkpoint must list {len(opt.param_groups)} param_groups, "
                         f"got {saved_groups!r}")
    groups = [_restored_group(index, group, saved)
              for index, (group, saved) in enumerate(zip(opt.param_groups, saved_groups))]
    for index, group in enumerate(groups):
        opt._check_group(index, group)
    return groups


def _restored_group(index, group, saved):
    """``group``'s hyperparameters as the checkpoint has them (tuples stay tuples; a
    saved schedule needs the optimizer to have the same schedule already)."""
    where = f"the checkpoint's param_groups[{index}]"
    if not isinstance(saved, dict):
        raise ValueError(f"{where} must be a dict, got {saved!r}")
    names = set(group) - {"params", "name"}
    if set(saved) - {"name"} != names or ("name" in saved and "name" not in group):
        raise ValueError(f"{where} has the options {sorted(map(str, saved))}, the "
                         f"optimizer's {sorted(set(group) - {'params'})}")
    restored = {}
    for key, value in saved.items():
        current = group[key]
        if isinstance(value, dict) and set(value) == {"schedule"}:
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


def _restored_options(options):
    if not isinstance(options, dict) or set(options) != _OPTIONS:
        raise ValueError(f"the checkpoint's options must be {sorted(_OPTIONS)}, got {options!r}")
    for name in ("clip_grad_norm", "clip_grad_value"):
        _positive_or_none(name, options[name])
    check_flag("skip_nonfinite", options["skip_nonfinite"])
    return options


def _restored_host(opt, host, count):
    """Per-group host values: each a finite number, or None where it starts as None."""
    initial = opt._initial_host()
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


@contextlib.contextmanager
def _naming(path):
    """Turn the errors of a file's contents into ValueErrors that name the file."""
    try:
        yield
    except (TypeError, ValueError) as error:
        raise ValueError(f"cannot load {os.fspath(path)}: {error}") from None


def save(opt, path):
    """Write ``opt``'s checkpoint to ``path`` atomically.

    The buffers are copied under the optimizer's lock (so the file holds one step's
    state even while other threads step, at the cost of that much memory while saving);
    the copy is written to a temporary file in the same folder, fsynced, read back and
    checked against its checksum, and renamed over ``path``. A failed check raises
    OSError and leaves ``path`` as it was. Temporary files that killed saves on this
    machine left in the folder are deleted first (see :func:`_remove_orphans`).
    """
    path = os.path.abspath(os.fspath(path))
    folder = os.path.dirname(path)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"cannot save {path}: its folder does not exist")
    _remove_orphans(folder)
    snapshot = state_dict(opt)
    handle, temporary = tempfile.mkstemp(prefix=f".fastopt-{os.getpid()}-{_HOST}-",
                                         suffix=".tmp", dir=folder)
    try:
        with os.fdopen(handle, "wb") as file:
            _write(file, snapshot)
            file.flush()
            os.fsync(file.fileno())
        del snapshot  # the copy goes before the file is read back: one copy at a time
        try:
            written = read(temporary)
            _verify(written["meta"], written["arrays"])
        except ValueError as error:
            raise OSError(f"the file written for {path} does not read back as written, so "
                          f"{path} was left as it was: {error}") from None
        del written
        os.chmod(temporary, 0o666 & ~_umask())  # mkstemp makes it 0600
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise
    folder = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(folder)  # the rename itself survives a crash
    finally:
        os.close(folder)


def _write(file, checkpoint):
    meta = np.frombuffer(json.dumps(checkpoint["meta"]).encode(), np.uint8)
    np.savez(file, meta=meta, **checkpoint["arrays"])


def _remove_orphans(folder):
    """Delete the temporary files of killed saves from ``folder``.

    Only files named as fastopt names its own (``.fastopt-<pid>-<host>-*.tmp``) are
    candidates, and only those made on this machine by a process that no longer runs
    (a live process's save in progress is never touched; a pid that was reused, or a
    file from another machine, is left alone). Best effort: a file that cannot be
    deleted stays.
    """
    if os.name != "posix":  # os.kill(pid, 0) tests a pid only there
        return
    for name in os.listdir(folder):
        match = _TEMPORARY.match(name)
        if match and match[2] == _HOST and not _running(int(match[1])):
            with contextlib.suppress(OSError):  # gone already, or not ours to delete
                os.unlink(os.path.join(folder, name))


def _running(pid):
    if pid == os.getpid():
        return True  # another thread of this process may be saving
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError, ValueError):  # another user's process, or no pid
        return True
    return True


def read(path):
    """The checkpoint in ``path``, as :func:`load_state_dict` takes it. A file that cannot
    be opened raises its OSError; one whose contents are not an archive of arrays and a
    JSON record raises ValueError naming it. The checksum is checked on load."""
    name = os.fspath(path)
    with open(name, "rb") as file:
        try:
            with np.load(file, allow_pickle=False) as archive:
                contents = {key: archive[key] for key in archive.files}
            meta = json.loads(contents.pop("meta").tobytes().decode())
        except MemoryError:
            raise
        except Exception as error:  # zipfile, zlib, numpy and json raise a dozen kinds
            raise ValueError(f"{name} is not a readable fastopt checkpoint (truncated or "
                             f"corrupted?): {type(error).__name__}: {error}") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{name} is not a fastopt checkpoint")
    return {"meta": meta, "arrays": contents}


def load(path):
    """A new CPU optimizer, of the checkpoint's algorithm, continuing from ``path``.

    Its parameters are NumPy arrays in the saved structure. An optimizer whose lr is a
    schedule cannot be rebuilt from the file alone: build it with its schedule and
    call ``opt.load(path)``.
    """
    checkpoint = read(path)
    with _naming(path):
        _verify(checkpoint["meta"], checkpoint["arrays"])  # before building anything on it
        opt = _build(checkpoint)
        load_state_dict(opt, checkpoint, _verified=True)
    return opt


def _build(checkpoint):
    """The optimizer that ``checkpoint``'s algorithm and layout describe, from copies of
    its saved parameters."""
    from . import optim

    meta, params = checkpoint["meta"], checkpoint["arrays"].get("params")
    algorithm = getattr(optim, str(meta.get("algorithm")), None)
    if not (isinstance(algorithm, type) and issubclass(algorithm, optim.Optimizer)):
        raise ValueError(f"the checkpoint names no fastopt algorithm: {meta.get('algorithm')!r}")
    try:
        structures = [_structure(layout, params) for layout in meta["layout"]]
        grouped = len(structures) > 1 or meta["layout"][0]["prefix"] != "params"
        names = [{"name": g["name"]} if "name" in g else {} for g in meta["groups"]]
        return algorithm([{"params": s, **n} for s, n in zip(structures, names)] if grouped
                         else structures[0])
    except (AttributeError, IndexError, KeyError, TypeError, ValueError) as error:
        raise ValueError(f"the checkpoint's layout describes no parameters: "
                         f"{type(error).__name__}: {error}") from None


def _layout(layout):
    return {"keys": None if layout.keys is None else [_json_key(k) for k in layout.keys],
            "shapes": [list(shape) for shape in layout.shapes],
            "offsets": list(layout.offsets), "prefix": layout.prefix}


def _json_key(key):
    """A parameter name as JSON keeps it: NumPy scalars become Python numbers."""
    key = key.item() if isinstance(key, np.generic) else key
    if not isinstance(key, (str, int, float, bool, tuple)) and key is not None:
        raise TypeError(f"parameter name {key!r} cannot be saved: use str, int or tuple names")
    return key


def _key(saved):
    """A parameter name read back from JSON (which turned tuples into lists)."""
    return tuple(_key(k) for k in saved) if isinstance(saved, list) else saved


def _structure(layout, params):
    """Parameter arrays (copies) in the structure that ``layout`` records."""
    arrays = [params[offset:offset + int(np.prod(shape, dtype=np.int64))].reshape(shape).copy()
              for offset, shape in zip(layout["offsets"], layout["shapes"])]
    return arrays if layout["keys"] is None else dict(zip(map(_key, layout["keys"]), arrays))


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
        json.dumps(saved)
    except TypeError as error:
        raise TypeError(f"a hyperparameter cannot be saved: {error}") from None
    return saved


def _umask():
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _checksum(meta, arrays):
    """Version 2: the record (without its checksum) and the arrays; see the module doc."""
    record = {key: value for key, value in meta.items() if key != "sha256"}
    parts = [("meta", json.dumps(record, sort_keys=True, separators=(",", ":")).encode())]
    parts += [(name, np.ascontiguousarray(arrays[name]).data) for name in sorted(arrays)]
    digest = hashlib.sha256()
    for name, data in parts:
        digest.update(name.encode() + b"\0" + memoryview(data).nbytes.to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


def _checksum_v1(arrays):
    """Version 1: the arrays only."""
    digest = hashlib.sha256()
    for name in sorted(arrays):
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(arrays[name]).data)
    return digest.hexdigest()
