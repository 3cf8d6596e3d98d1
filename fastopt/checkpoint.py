"""Checkpoints: an optimizer's whole state in one file, written atomically, checked on load.

An optimizer exports its state as a :class:`Snapshot` (``opt.snapshot()``) and restores
it (``opt.restore(snapshot)``, which checks what it holds against the optimizer). This
module only serializes snapshots: to a record of JSON values with a checksum and its
arrays (:func:`state_dict`, :func:`snapshot_of`), and to and from files (:func:`save`,
:func:`read`). It imports nothing of fastopt's.

The file (format version 3) is an uncompressed NumPy ``.npz`` archive holding:

- ``meta``: a UTF-8 JSON document stored as a uint8 array, with ``format``
  (``"fastopt-checkpoint"``), ``version``, ``algorithm`` (the class name), ``groups`` (each
  group's hyperparameters; a schedule is recorded by its repr), ``options`` (the clipping
  and skip options), ``step``, ``skipped_steps``, ``last_grad_norm``, ``host`` (per-group
  host state such as NAdam's ``mu_product``), ``started`` (the state buffers each group
  has begun), ``layout`` (per group: the parameter names or None, their shapes and
  offsets in the flat buffer), ``buffers`` (the names of the arrays below),
  ``formats`` (the arrays not kept in float32, by name: ``"bfloat16"`` or ``"float16"``,
  which the file holds as their bits, uint16; ``"uint16"`` for the low halves of master
  weights and ``"uint8"`` for the codes of 8-bit state, held as they are), ``storage`` (the optimizer's storage options:
  ``master_weights``, ``state_dtype`` by buffer, ``grad_dtype``, ``stochastic_rounding``
  and ``seed``) and ``sha256``, the checksum;
- ``params``: the flat parameters (float32, or 16-bit);
- ``master``: the master weights of 16-bit parameters, where they are kept: float32, or
  their low halves (uint16) with ``master_weights="remainder"``;
- ``state.<name>``: each flat state buffer (float32 or bfloat16; for 8-bit state, its
  uint8 codes, with ``state.<name>_absmax`` and ``state.<name>_small``, see
  ``fastopt.optim.optimizer.Blocks``).

**The checksum** covers every field. It is the SHA-256 of a sequence of parts: first
the part ``meta``, the record without ``sha256`` as canonical JSON
(``json.dumps(record, sort_keys=True, separators=(",", ":"))``, UTF-8), then one part
per array in sorted name order, its raw bytes. Each part is fed as its name,
a zero byte, its length in bytes as 8 little-endian bytes, and its bytes. Version-2 files
(the same without ``formats`` and ``storage``: every buffer float32, no stochastic
rounding) load as they are. Version-1 files
(whose checksum covers only the arrays: each name, then its bytes) still load, with
every field validated as below; but there an edit that stays valid (a step count of 5
made 4) cannot be noticed. fastopt writes version 3 only.

:func:`save` copies the buffers under the optimizer's lock (a consistent snapshot,
even while other threads step), writes the copy to a temporary file in the same
folder, fsyncs it, reads it back and checks it, and renames it over the target; so a
process killed while saving leaves the previous file intact. It first deletes the
temporary files that killed saves left in that folder.

Loading checks everything before it changes anything: the checksum here, then, in
``restore``, every field's type and range (the step count, the per-group started
buffers and host values, the hyperparameters with the algorithm's own checks, a
schedule's repr against the optimizer's), and that the next step's scalars can be
computed. A file whose contents are wrong raises ValueError, naming the file; an
in-memory checkpoint raises ValueError or TypeError.
"""

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import socket
import tempfile
from dataclasses import dataclass

import ml_dtypes
import numpy as np


@dataclass(frozen=True)
class Snapshot:
    """Everything an optimizer needs to continue exactly. All but the arrays are JSON
    values.

    Attributes:
        algorithm: the class name (``"Adam"``).
        groups: per group, its hyperparameters; a schedule is ``{"schedule": repr}``.
        options: ``clip_grad_norm``, ``clip_grad_value`` and ``skip_nonfinite``.
        step, skipped_steps, last_grad_norm: as the optimizer's.
        host: per host-state name (NAdam's ``mu_product`` ...), one value per group.
        started: per group, the names of the state buffers it has begun.
        layout: per group, the parameters' names (or None), shapes and offsets in the
            flat buffer, and the prefix of their names (``"params"``, ``"params[1]"``).
        params: the flat parameters, a NumPy copy (float32, bfloat16 or float16).
        buffers: each flat state buffer by name, NumPy copies (float32 or bfloat16; for
            8-bit state uint8 codes, beside ``<name>_absmax`` and ``<name>_small``).
        master: the master weights of 16-bit parameters as kept (float32, or uint16
            remainders), a NumPy copy, or None.
        storage: the optimizer's storage options (``precision.Storage.record``; None in
            files before version 3: every buffer float32).
    """

    algorithm: str
    groups: list
    options: dict
    step: int
    skipped_steps: int
    last_grad_norm: object
    host: dict
    started: list
    layout: list
    params: np.ndarray
    buffers: dict
    master: object = None
    storage: object = None


FORMAT = "fastopt-checkpoint"
VERSION = 3
READABLE = (1, 2, 3)
_ARRAY_PREFIX = "state."
# The record holds the snapshot's fields (all but its arrays) and these.
_SNAPSHOT_FIELDS = [field.name for field in dataclasses.fields(Snapshot)
                    if field.name not in ("params", "buffers", "master")]
_FIELDS = {"format", "version", "buffers", "sha256", "formats", *_SNAPSHOT_FIELDS}
_ADDED = {"formats": 3, "storage": 3}  # the fields a version added, with that version
# The 16-bit formats an array may be kept in, which a file holds as their bits.
FORMATS = {"bfloat16": np.dtype(ml_dtypes.bfloat16), "float16": np.dtype(np.float16)}
_BITS = np.dtype(np.uint16)
# The integer arrays a file holds as they are: master remainders and 8-bit codes.
INTEGERS = {"uint16": _BITS, "uint8": np.dtype(np.uint8)}

# Temporary files are named after the saving process and machine, so that a later save
# can tell the orphans of killed processes from the files of saves still running.
_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
_TEMPORARY = re.compile(r"\.fastopt-(\d+)-([0-9a-f]{8})-[^/]*\.tmp\Z")


def state_dict(snapshot):
    """``{"meta": dict, "arrays": {name: host array}}``: ``snapshot`` as a record
    of JSON values with its checksum, and its arrays (not copied)."""
    arrays = {"params": snapshot.params}
    if snapshot.master is not None:
        arrays["master"] = snapshot.master
    arrays.update((_ARRAY_PREFIX + name, array) for name, array in snapshot.buffers.items())
    formats = {name: kind for name, kind in
               ((name, _format_of(array)) for name, array in arrays.items())
               if kind != "float32"}
    meta = {"format": FORMAT, "version": VERSION, "buffers": sorted(arrays),
            "formats": formats, **{name: getattr(snapshot, name) for name in _SNAPSHOT_FIELDS}}
    meta["sha256"] = _checksum(meta, arrays)
    return {"meta": meta, "arrays": arrays}


def snapshot_of(checkpoint, verified=False):
    """The :class:`Snapshot` in a :func:`state_dict`, after checking its format, checksum
    (unless ``verified``) and fields; the optimizer that restores it checks what they
    hold."""
    if not isinstance(checkpoint, dict) or set(checkpoint) != {"meta", "arrays"}:
        raise TypeError("a checkpoint is a dict {'meta': ..., 'arrays': ...}, as "
                        "state_dict() returns it")
    meta, arrays = checkpoint["meta"], checkpoint["arrays"]
    if not verified:
        verify(meta, arrays)
    fields = {field for field in _FIELDS if _ADDED.get(field, 1) <= meta["version"]}
    if set(meta) != fields:
        raise ValueError(f"the checkpoint's record has the fields {sorted(map(str, meta))}, "
                         f"expected {sorted(fields)}")
    if meta["buffers"] != sorted(arrays) or "params" not in arrays:
        raise ValueError(f"the checkpoint holds arrays {sorted(arrays)}, its index lists "
                         f"{meta['buffers']}")
    formats = meta.get("formats", {})
    if not isinstance(formats, dict):
        raise ValueError(f"the checkpoint's formats must be a dict, got {formats!r}")
    for name, array in arrays.items():
        if _format_of(array) != formats.get(name, "float32"):
            raise ValueError(f"the checkpoint's array {name!r} is {array.dtype}, its "
                             f"record says {formats.get(name, 'float32')!r}")
    buffers = {}
    for name, array in arrays.items():
        if name not in ("params", "master"):
            if not name.startswith(_ARRAY_PREFIX):
                raise ValueError(f"the checkpoint holds an array {name!r}; only 'params', "
                                 "'master' and 'state.<name>' belong there")
            buffers[name[len(_ARRAY_PREFIX):]] = array
    return Snapshot(**{name: meta.get(name) for name in _SNAPSHOT_FIELDS},
                    params=arrays["params"], buffers=buffers, master=arrays.get("master"))


def _format_of(array):
    """``"float32"``, a name of ``FORMATS``, or the dtype's own name for any other."""
    if array.dtype == np.float32:
        return "float32"
    return next((name for name, dtype in FORMATS.items() if array.dtype == dtype),
                str(array.dtype))


def verify(meta, arrays):
    """Check the format, the version and the checksum."""
    if not isinstance(meta, dict) or not isinstance(arrays, dict):
        raise TypeError("a checkpoint's meta and arrays must be dicts")
    version = meta.get("version")
    if meta.get("format") != FORMAT or type(version) is not int or version not in READABLE:
        raise ValueError(f"not a {FORMAT} of version 1, 2 or 3: format "
                         f"{meta.get('format')!r}, version {version!r}")
    for name, array in arrays.items():
        if not isinstance(name, str) or not isinstance(array, np.ndarray):
            raise TypeError(f"a checkpoint's arrays must be NumPy arrays by name, got "
                            f"{name!r}: {type(array).__name__}")
    checksum = _checksum(meta, arrays) if version >= 2 else _checksum_v1(arrays)
    if meta.get("sha256") != checksum:
        raise ValueError("the checkpoint does not match its checksum: it is corrupted, or "
                         "was edited after it was written")


@contextlib.contextmanager
def naming(path):
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
    snapshot = state_dict(opt.snapshot())
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
            verify(written["meta"], written["arrays"])
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
    fsync_folder(folder)  # the rename itself survives a crash


def fsync_folder(folder):
    """Flush ``folder``'s entries (a rename into it) to disk."""
    handle = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def _write(file, checkpoint):
    meta = np.frombuffer(json.dumps(checkpoint["meta"]).encode(), np.uint8)
    formats = checkpoint["meta"]["formats"]  # .npy knows no bfloat16: their bits go
    np.savez(file, meta=meta, **{name: array.view(_BITS) if formats.get(name) in FORMATS
                                 else array for name, array in checkpoint["arrays"].items()})


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
    be opened raises its OSError; a folder (a fastopt.torch checkpoint), or a file whose
    contents are not an archive of arrays and a JSON record, raises ValueError naming it.
    The checksum is checked on load."""
    name = os.fspath(path)
    if os.path.isdir(name):  # what fastopt.save writes for a fastopt.torch optimizer
        raise ValueError(f"{name} is a folder, not a checkpoint file: fastopt.save writes "
                         "one for a fastopt.torch optimizer, which loads it "
                         "(opt.load(path), on an optimizer built over the model)")
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
    formats = meta.get("formats", {})
    for key, value in formats.items() if isinstance(formats, dict) else ():
        array = contents.get(key)
        if isinstance(value, str) and value in INTEGERS and array is not None and \
                array.dtype == INTEGERS[value]:
            continue
        if not isinstance(value, str) or value not in FORMATS or array is None or \
                array.dtype != _BITS:
            raise ValueError(f"{name} holds an array {key!r} in the format {value!r}, which "
                             f"is not the bits of one of {sorted(FORMATS)} nor one of "
                             f"{sorted(INTEGERS)}")
        contents[key] = array.view(FORMATS[value])
    return {"meta": meta, "arrays": contents}


def _umask():
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _checksum(meta, arrays):
    """Versions 2 and 3: the record (without its checksum) and the arrays; see the module
    doc."""
    record = {key: value for key, value in meta.items() if key != "sha256"}
    parts = [("meta", json.dumps(record, sort_keys=True, separators=(",", ":")).encode())]
    parts += [(name, _bytes(arrays[name])) for name in sorted(arrays)]
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
        digest.update(_bytes(arrays[name]))
    return digest.hexdigest()


def _bytes(array):
    """The raw bytes of ``array`` (a buffer does not take bfloat16 as it is)."""
    return np.ascontiguousarray(array).reshape(-1).view(np.uint8).data
