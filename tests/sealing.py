"""Writing checkpoint files by hand, for tests that edit them: the version-2 checksum
computed from the format's description (fastopt/checkpoint.py), not with its code."""

import hashlib
import json

import numpy as np

from fastopt import checkpoint


def seal(meta, arrays, version=2):
    """``meta`` with the sha256 that the format prescribes for it and ``arrays``.
    ``version=1`` makes a version-1 record, whose checksum covers the arrays only (each
    name, then its bytes): its fields are then protected by validation alone."""
    record = {k: v for k, v in meta.items() if k != "sha256"}
    digest = hashlib.sha256()
    if version == 1:
        record.pop("formats", None)  # which version 3 added
        record.pop("storage", None)
        for name in sorted(arrays):
            digest.update(name.encode() + np.asarray(arrays[name]).tobytes())
        return {**record, "version": 1, "sha256": digest.hexdigest()}
    parts = [("meta", json.dumps(record, sort_keys=True, separators=(",", ":")).encode())]
    parts += [(name, np.asarray(arrays[name]).tobytes()) for name in sorted(arrays)]
    for name, data in parts:
        digest.update(name.encode() + b"\0" + len(data).to_bytes(8, "little") + data)
    return {**record, "sha256": digest.hexdigest()}


def write(path, meta, arrays):
    """An archive as fastopt writes it, holding exactly ``meta`` and ``arrays``."""
    np.savez(path, meta=np.frombuffer(json.dumps(meta).encode(), np.uint8), **arrays)


def rewrite(path, meta=None, arrays=None, sealed=True):
    """Write ``path`` again with parts of its contents replaced; ``sealed`` gives it the
    checksum of its new contents (so that the other checks are what refuses it)."""
    contents = checkpoint.read(path)
    meta = {**contents["meta"], **(meta or {})}
    arrays = {**contents["arrays"], **(arrays or {})}
    write(path, seal(meta, arrays) if sealed else meta, arrays)
