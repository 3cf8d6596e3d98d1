"""Checkpoints: an optimizer's whole state in one file, written atomically, checked on load.

The file (format version 1) is an uncompressed NumPy ``.npz`` archive holding:

- ``meta``: a UTF-8 JSON document stored as a uint8 array, with ``format``
  (``"fastopt-checkpoint"``), ``version``, ``algorithm`` (the class name), ``groups`` (each
  group's hyperparameters; a schedule is recorded by its repr), ``options`` (the clipping
  and skip options), ``step``, ``skipped_steps``, ``last_grad_norm``, ``host`` (per-group
  host state such as NAdam's ``mu_product``), ``started`` (the state buffers each group
  has begun), ``layout`` (per group: the parameter names or None, their shapes and
  offsets in the flat buffer), ``buffers`` (the names of the arrays below) and
  ``sha256``, a checksum of those arrays;
- ``params``: the flat float32 parameters;
- ``state.<name>``: each flat float32 state buffer.

:func:`save` writes to a temporary file in the same folder, fsyncs it and renames it
over the target, so a process killed while saving leaves the previous file intact.
Loading checks everything (format, version, algorithm, layout, sizes, dtypes, checksum,
hyperparameters) before it changes anything.
"""

import hashlib
import json
import os
import tempfile
import zipfile

import numpy as np

from .optim.optimizer import _positive_or_none, check_flag

FORMAT = "fastopt-checkpoint"
VERSION = 1
_ARRAY_PREFIX = "state."


def state_dict(opt, copy=True):
    """``{"meta": dict, "arrays": {name: float32 host array}}`` of ``opt``; ``copy=False``
    lends the live CPU buffers instead of copying them."""
    to_host = opt._backend.to_host if copy or opt.device != "cpu" else (lambda a: a)
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
        "sha256": _checksum(arrays),
    }
    return {"meta": json.loads(json.dumps(meta)), "arrays": arrays}


def load_state_dict(opt, checkpoint):
    """Make ``opt`` continue from ``checkpoint``; raises ValueError/TypeError, with
    ``opt`` untouched, unless every part of it fits."""
    meta, arrays = checkpoint["meta"], checkpoint["arrays"]
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ValueError(f"not a {FORMAT} version {VERSION}: format {meta.get('format')!r}, "
                         f"version {meta.get('version')!r}")
    if meta["algorithm"] != type(opt).__name__:
        raise ValueError(f"the checkpoint is for {meta['algorithm']}, not "
                         f"{type(opt).__name__}")
    expected = [_layout(layout) for layout in opt._layouts]
    if meta["layout"] != json.loads(json.dumps(expected)):
        raise ValueError("the checkpoint's parameter layout (names, shapes, offsets) differs "
                         f"from the optimizer's: {meta['layout']} against {expected}")
    if sorted(arrays) != meta["buffers"] or "params" not in arrays:
        raise ValueError(f"the checkpoint holds arrays {sorted(arrays)}, its index lists "
                         f"{meta['buffers']}")
    for name, array in arrays.items():
        size = (opt.flat_params.size if name == "params"
                else opt._state_size(name[len(_ARRAY_PREFIX):]))
        if array.dtype != np.float32 or array.shape != (size,):
            raise ValueError(f"checkpoint array {name!r} is {array.dtype} {array.shape}, "
                             f"expected float32 {(size,)}")
    if _checksum(arrays) != meta["sha256"]:
        raise ValueError("the checkpoint's arrays do not match its checksum: the file is "
                         "corrupted")
    groups = [_restored_group(index, group, saved)
              for index, (group, saved) in enumerate(zip(opt.param_groups, meta["groups"]))]
    for index, group in enumerate(groups):
        opt._check_group(index, group)
    host = meta["host"]
    if set(host) != set(opt._initial_host()) or any(len(v) != len(groups) for v in host.values()):
        raise ValueError(f"the checkpoint's host state {host} does not fit {type(opt).__name__}")
    options = meta["options"]
    for name in ("clip_grad_norm", "clip_grad_value"):
        _positive_or_none(name, options[name])
    check_flag("skip_nonfinite", options["skip_nonfinite"])
    # Everything is checked: from here on, only writes.
    opt.clip_grad_norm = options["clip_grad_norm"]
    opt.clip_grad_value = options["clip_grad_value"]
    opt.skip_nonfinite = options["skip_nonfinite"]
    backend = opt._backend
    backend.copy(opt.flat_params, arrays["params"])
    for key in list(opt.state):
        if hasattr(opt.state[key], "shape"):
            del opt.state[key]
    for name, array in arrays.items():
        if name.startswith(_ARRAY_PREFIX):
            buffer = backend.zeros(array.size)
            backend.copy(buffer, array)
            opt.state[name[len(_ARRAY_PREFIX):]] = buffer
    for live, group in zip(opt.param_groups, groups):
        live.update(group)
    opt._checked = [None] * len(groups)
    opt._started = [set(started) for started in meta["started"]]
    opt.state.update({name: list(values) for name, values in host.items()},
                     step=int(meta["step"]))
    opt.skipped_steps = int(meta["skipped_steps"])
    opt.last_grad_norm = meta["last_grad_norm"]


def save(opt, path):
    """Write ``opt``'s checkpoint to ``path`` atomically: a temporary file in the same
    folder, fsynced, then renamed over ``path``."""
    path = os.path.abspath(os.fspath(path))
    if not os.path.isdir(os.path.dirname(path)):
        raise FileNotFoundError(f"cannot save {path}: its folder does not exist")
    checkpoint = state_dict(opt, copy=False)
    meta = np.frombuffer(json.dumps(checkpoint["meta"]).encode(), np.uint8)
    handle, temporary = tempfile.mkstemp(prefix=".fastopt-", suffix=".tmp",
                                         dir=os.path.dirname(path))
    try:
        with os.fdopen(handle, "wb") as file:
            np.savez(file, meta=meta, **checkpoint["arrays"])
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temporary, 0o666 & ~_umask())  # mkstemp makes it 0600
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise
    folder = os.open(os.path.dirname(path), os.O_RDONLY)
    try:
        os.fsync(folder)  # the rename itself survives a crash
    finally:
        os.close(folder)


def read(path):
    """The checkpoint in ``path``, as :func:`load_state_dict` takes it."""
    try:
        with np.load(os.fspath(path), allow_pickle=False) as archive:
            contents = {name: archive[name] for name in archive.files}
        meta = json.loads(contents.pop("meta").tobytes().decode())
    except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile) as error:
        if isinstance(error, FileNotFoundError):
            raise
        raise ValueError(f"{os.fspath(path)} is not a readable fastopt checkpoint (truncated "
                         f"or corrupted?): {error}") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{os.fspath(path)} is not a fastopt checkpoint")
    return {"meta": meta, "arrays": contents}


def load(path):
    """A new CPU optimizer, of the checkpoint's algorithm, continuing from ``path``.

    Its parameters are NumPy arrays in the saved structure. An optimizer whose lr is a
    schedule cannot be rebuilt from the file alone: build it with its schedule and
    call ``opt.load(path)``.
    """
    from . import optim

    checkpoint = read(path)
    meta = checkpoint["meta"]
    algorithm = getattr(optim, str(meta.get("algorithm")), None)
    if not (isinstance(algorithm, type) and issubclass(algorithm, optim.Optimizer)):
        raise ValueError(f"{os.fspath(path)} names no fastopt algorithm: "
                         f"{meta.get('algorithm')!r}")
    params = checkpoint["arrays"].get("params")
    if params is None or not isinstance(meta.get("layout"), list):
        raise ValueError(f"{os.fspath(path)} is not a complete fastopt checkpoint")
    structures = [_structure(layout, params) for layout in meta["layout"]]
    grouped = len(structures) > 1 or meta["layout"][0]["prefix"] != "params"
    names = [{"name": g["name"]} if "name" in g else {} for g in meta.get("groups", [])]
    opt = algorithm([{"params": s, **n} for s, n in zip(structures, names)] if grouped
                    else structures[0])
    opt.load_state_dict(checkpoint)
    return opt


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


def _restored_group(index, group, saved):
    """``group``'s hyperparameters as the checkpoint has them (tuples stay tuples; a
    saved schedule needs the optimizer to have a schedule already)."""
    unknown = set(saved) - set(group)
    if unknown:
        raise ValueError(f"the checkpoint's param_groups[{index}] has unknown options "
                         f"{sorted(unknown)}")
    restored = {}
    for key, value in saved.items():
        current = group[key]
        if isinstance(value, dict) and "schedule" in value:
            if not callable(current):
                raise ValueError(f"the checkpoint's param_groups[{index}][{key!r}] is the "
                                 f"schedule {value['schedule']}; give the optimizer its "
                                 "schedule before loading")
            value = current
        elif isinstance(current, tuple) and isinstance(value, list):
            value = tuple(value)
        restored[key] = value
    return restored


def _umask():
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _checksum(arrays):
    digest = hashlib.sha256()
    for name in sorted(arrays):
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(arrays[name]).data)
    return digest.hexdigest()
