"""Checkpoints of fastopt.torch optimizers: a folder of one file per rank and an index,
written atomically, which any number of ranks (or one process) loads.

``fastopt.save(opt, path)`` (or ``opt.save(path)``) writes it, and ``opt.load(path)``
reads it back. The folder holds:

- ``index.json``: ``format`` (``"fastopt-torch-checkpoint"``), ``version`` (1),
  ``algorithm`` (the class name), ``world`` (how many ranks wrote it: 1 without a
  process_group), ``files`` (each rank's file name, by rank), and per parameter, in the
  order of the groups, its ``shape`` and each rank's ``pieces``: the elements
  ``[first, last)`` of it, in C order, whose state that rank's file holds; and
  ``seed``, the one stochastic rounding drew from (null where nothing was rounded
  stochastically, and absent from the folders of fastopt before it was recorded), which
  a load into an optimizer that rounds stochastically from another refuses: it would
  go on with other bits (a state_dict has no place for it);
- ``rank<r>.pt``: rank r's ``opt.state_dict()`` (``torch.save``; it loads with
  ``weights_only=True``), its partition with a process_group (see
  ``fastopt.torch.Optimizer.state_dict``), else the whole state.

**Loading** builds this rank's state_dict from the pieces of the files that overlap its
own: per parameter, the elements of each state tensor (8-bit codes by element, their
scales by block of 256, on which every piece begins), or, for Adafactor, whose pieces are
whole tensors, the factors of the rank that held it. ``load_state_dict`` then checks
everything before it changes anything. So a checkpoint that ranks wrote resumes on any
number of ranks, or in one process, and one process's on any number of ranks, as not
stopping, bit for bit. The files are memory-mapped: a rank reads only what it takes.

**Saving** is collective with a process_group (every rank calls it at once). Each rank
writes its file into a new folder beside ``path``, ``<path>.partial-<token>``; once all
have, rank 0 writes the index and puts the folder in the place of ``path`` (a previous
checkpoint there is renamed ``<path>.old-<token>``, then deleted). An error on any rank
(a full disk) is raised on every rank; a rank that dies makes the others fail at the
group's timeout; either way ``path`` is left as it was. The next save to ``path``
deletes what killed saves left (``<path>.partial-*``, ``<path>.old-*``), but for a
complete new folder where ``path`` is missing (a save killed between its two renames),
which it puts in place first. Every rank must see the same file system (as
torch.distributed.checkpoint's ``FileSystemWriter`` needs). A load is collective too:
an error on one rank (a missing file) is raised on every rank, before any changes.

DTensor parameters (FSDP2) are refused: ``torch.distributed.checkpoint`` saves and
reshards their state.
"""

import glob
import json
import math
import os
import shutil
import uuid

import torch
import torch.distributed as dist

from .checkpoint import fsync_folder
from .precision import ABSMAX, CODES, STRIDES, blocks_of

FORMAT, VERSION, INDEX = "fastopt-torch-checkpoint", 1, "index.json"
_ERRORS = {error.__name__: error for error in (ValueError, TypeError, OSError,
                                                FileNotFoundError)}


def save(opt, path, pieces):
    """Write ``opt``'s state to the folder ``path`` (see the module's docstring), where
    each rank's state_dict() holds the elements ``pieces[i][rank]`` of parameter ``i``."""
    group = opt._group
    rank, world = (dist.get_rank(group), dist.get_world_size(group)) if group else (0, 1)
    path = os.path.abspath(os.fspath(path))
    partial = _on_rank0(group, lambda: _prepare(path))
    _agreed(group, lambda: _write_rank_file(opt, os.path.join(partial, f"rank{rank}.pt")),
            f"cannot save {path}, which was left as it was",
            cleanup=lambda: rank == 0 and shutil.rmtree(partial, ignore_errors=True))

    def finish():
        _write_json(os.path.join(partial, INDEX), _index(opt, world, pieces))
        fsync_folder(partial)
        _replace(path, partial)

    _on_rank0(group, finish)


def load(opt, path, pieces, shapes, whole):
    """Load the checkpoint in the folder ``path`` into ``opt``, whose state_dict() holds
    the elements ``pieces[i]`` of parameter ``i`` in the shape ``shapes[i]``, and whole
    the state entries named so by ``whole(name)`` (the step count ..., the user's; see
    the module's docstring); a ValueError, and nothing changes, where it does not fit. With a
    process_group, an error on one rank is raised on every rank."""
    path = os.path.abspath(os.fspath(path))
    loaded = _agreed(opt._group, lambda: _assembled(opt, path, pieces, shapes, whole),
                     f"cannot load {path}, and nothing changed")
    _agreed(opt._group, lambda: opt.load_state_dict(loaded),
            f"cannot load {path} on every rank (the ranks not named here loaded it)")


def _assembled(opt, path, pieces, shapes, whole):
    """The state_dict that loads this rank's part of the checkpoint in ``path``."""
    index = _read_index(path)
    params = opt._all_params()
    if index["algorithm"] != type(opt).__name__:
        raise ValueError(f"cannot load {path}: it holds the state of {index['algorithm']}, "
                         f"not of {type(opt).__name__}")
    if [entry["shape"] for entry in index["params"]] != [list(p.shape) for p in params]:
        raise ValueError(f"cannot load {path}: its parameters have the shapes "
                         f"{[tuple(e['shape']) for e in index['params']]}, this optimizer's "
                         f"{[tuple(p.shape) for p in params]}")
    seed, ours = index.get("seed"), opt.rounding_seed
    if seed is not None and ours is not None and seed != ours:
        raise ValueError(f"cannot load {path}: its stochastic rounding drew from seed {seed}, "
                         f"this optimizer's draws from seed {ours}: build it with "
                         f"seed={seed} to go on with the same bits")
    files = _Files(path, index)
    suffix = opt._rank_suffix() if opt._group is not None else ""
    state = {}
    for i, (entry, piece, shape) in enumerate(zip(index["params"], pieces, shapes)):
        taken = _taken(files, i, entry["pieces"], piece, shape, opt.algorithm.spec.factored,
                       whole)
        if taken is not None:  # named as state_dict() names them
            state[i] = {name + suffix if isinstance(value, torch.Tensor) and value.dim()
                        and not whole(name) else name: value for name, value in taken.items()}
    return {**files.state_dict(0), "state": state}


def _taken(files, i, pieces, piece, shape, factored, whole):
    """This rank's state of parameter ``i``, of whose elements it holds ``piece`` (in
    ``shape``), from the files of the ranks that held ``pieces`` of it; None where no
    file holds its state. ``whole(name)`` says which entries are taken whole."""
    held = [r for r, (a, b) in enumerate(pieces) if b > a]
    saved = files.state(held[0] if held else 0, i)
    if saved is None:
        return None
    first, last = piece
    taken = {}
    for name, value in saved.items():
        if not isinstance(value, torch.Tensor) or whole(name):
            # the step count ..., the same on every rank; copied out of the mapped file
            taken[name] = value.clone() if isinstance(value, torch.Tensor) else value
        elif name == STRIDES or first == last and factored:
            continue  # codes come in C order; an empty piece of Adafactor's has no factors
        elif factored:  # a whole tensor's factors, from the rank that held it whole
            holders = [r for r in held if tuple(pieces[r]) == (first, last)]
            if not holders:
                raise ValueError(f"cannot load {files.path}: no file holds all of the "
                                 f"parameter {i} ({name!r}) for Adafactor")
            taken[name] = files.state(holders[0], i)[name].clone()
        elif name.endswith(ABSMAX):  # by block: every piece begins on one
            taken[name] = files.joined(i, name, value.dtype,
                                       [blocks_of(a, b) for a, b in pieces],
                                       *blocks_of(first, last))
        else:
            taken[name] = files.joined(i, name, value.dtype, pieces, first, last).view(shape)
            if name.endswith(CODES):
                taken[STRIDES] = torch.tensor(torch.empty(shape, device="meta").stride())
    return taken


class _Files:
    """The rank files of a checkpoint, memory-mapped as they are first needed."""

    def __init__(self, path, index):
        self.path, self.index, self._loaded = path, index, {}

    def state_dict(self, rank):
        if rank not in self._loaded:
            name = os.path.join(self.path, self.index["files"][rank])
            try:
                contents = torch.load(name, map_location="cpu", mmap=True, weights_only=True)
            except (OSError, RuntimeError, EOFError) as error:
                raise ValueError(f"cannot load {self.path}: its file {name} does not read: "
                                 f"{error}") from None
            if not (isinstance(contents, dict) and isinstance(contents.get("state"), dict)
                    and isinstance(contents.get("param_groups"), list)
                    and all(isinstance(state, dict) for state in contents["state"].values())):
                raise ValueError(f"cannot load {self.path}: its file {name} holds no "
                                 "state_dict of an optimizer (a dict of 'state', a dict of "
                                 "each parameter's dict, and 'param_groups', a list)")
            self._loaded[rank] = contents
        return self._loaded[rank]

    def state(self, rank, i):
        """Parameter ``i``'s state in rank ``rank``'s file, its names without the rank's
        suffix (``"@rank<r>of<n>"``)."""
        state = self.state_dict(rank)["state"].get(i)
        return None if state is None else {unranked(name): value
                                           for name, value in state.items()}

    def joined(self, i, name, dtype, pieces, first, last):
        """Elements ``[first, last)`` of parameter ``i``'s state tensor ``name``, whose
        rank ``r`` holds ``pieces[r]``, flat, as one tensor."""
        parts = []
        for r, (a, b) in enumerate(pieces):
            lo, hi = max(a, first), min(b, last)
            if lo >= hi:
                continue
            values = self.state(r, i).get(name)
            if values is None or values.numel() != b - a:
                raise ValueError(f"cannot load {self.path}: rank {r}'s file holds "
                                 f"{None if values is None else values.numel()} values of "
                                 f"{name!r} of parameter {i}, its index {b - a}")
            parts.append(values.reshape(-1)[lo - a:hi - a])
        if sum(part.numel() for part in parts) != last - first:
            raise ValueError(f"cannot load {self.path}: its files do not hold all of "
                             f"{name!r} of parameter {i}")
        return torch.cat(parts) if parts else torch.empty(0, dtype=dtype)


def _read_index(path):
    name = os.path.join(path, INDEX)
    try:
        with open(name) as file:
            index = json.load(file)
    except (OSError, ValueError) as error:
        killed = [p for p in glob.glob(glob.escape(path) + ".partial-*")
                  if os.path.exists(os.path.join(p, INDEX))] if not os.path.exists(path) else []
        raise ValueError(f"cannot load {path}: it is no fastopt.torch checkpoint folder "
                         f"({name}: {error})" + (
                             f"; a save killed while it renamed its folder left {killed[0]},"
                             " which the next save to it puts in its place" if killed else "")
                         ) from None
    if not isinstance(index, dict) or index.get("format") != FORMAT or \
            index.get("version") != VERSION:
        raise ValueError(f"cannot load {path}: {name} is no {FORMAT} of version {VERSION}")
    try:
        world = index["world"]
        well_formed = (isinstance(index["algorithm"], str) and len(index["files"]) == world
                       and all(isinstance(f, str) and os.path.basename(f) == f
                               for f in index["files"])
                       and all(len(entry["pieces"]) == world and all(
                           0 <= a <= b <= math.prod(entry["shape"]) for a, b in entry["pieces"])
                               for entry in index["params"])
                       and (index.get("seed") is None or type(index["seed"]) is int))
    except (KeyError, TypeError, ValueError):
        well_formed = False
    if not well_formed:
        raise ValueError(f"cannot load {path}: {name} does not describe a checkpoint: an "
                         "algorithm, as many files as ranks, per parameter a shape "
                         "and each rank's piece of it, and a seed (an int or null)")
    return index


def _index(opt, world, pieces):
    """The index of ``opt``'s checkpoint, written by ``world`` ranks."""
    return {"format": FORMAT, "version": VERSION, "algorithm": type(opt).__name__,
            "world": world, "files": [f"rank{r}.pt" for r in range(world)],
            "seed": opt.rounding_seed,
            "params": [{"shape": list(p.shape), "pieces": [list(c) for c in cuts]}
                       for p, cuts in zip(opt._all_params(), pieces)]}


def unranked(name, suffix="@rank"):
    """A state name without its rank's ``suffix`` (any rank's by default); the user's
    entries may have names of any kind."""
    return name.split(suffix)[0] if isinstance(name, str) else name


def _write_rank_file(opt, name):
    """``opt``'s state_dict, on the CPU, to the file ``name``."""
    contents = opt.state_dict()
    for i, state in contents["state"].items():
        for key, value in state.items():
            base = str(unranked(key))
            codes = base.endswith(CODES) and base[:-len(CODES)] in opt.algorithm.spec.averages
            if codes and not value.is_contiguous():
                raise ValueError(f"parameter {i} is not contiguous and keeps 8-bit state, "
                                 "whose blocks follow its memory: save opt.state_dict() "
                                 "with torch.save instead")
            if isinstance(value, torch.Tensor):
                state[key] = value.detach().cpu()
    with open(name, "wb") as file:
        torch.save(contents, file)
        file.flush()
        os.fsync(file.fileno())


def _prepare(path):
    """The new folder into which every rank writes its file, after checking ``path``."""
    folder = os.path.dirname(path)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"cannot save {path}: its folder does not exist")
    for leftover in glob.glob(glob.escape(path) + ".partial-*"):  # killed saves'
        if not os.path.exists(path) and os.path.exists(os.path.join(leftover, INDEX)):
            os.rename(leftover, path)  # killed between its renames (see _replace)
        else:
            shutil.rmtree(leftover, ignore_errors=True)
    if os.path.exists(path):
        for old in glob.glob(glob.escape(path) + ".old-*"):
            shutil.rmtree(old, ignore_errors=True)
        try:
            _read_index(path)
        except ValueError:
            if not os.path.isdir(path) or os.listdir(path):
                raise ValueError(f"cannot save {path}: it exists and is no fastopt.torch "
                                 f"checkpoint folder, which a save replaces") from None
    partial = f"{path}.partial-{uuid.uuid4().hex}"
    os.mkdir(partial)
    return partial


def _replace(path, partial):
    """Put the folder ``partial`` in the place of ``path``."""
    old = None
    if os.path.exists(path):
        old = path + ".old-" + partial.rsplit(".partial-", 1)[1]
        os.rename(path, old)
    os.rename(partial, path)
    fsync_folder(os.path.dirname(path))
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)  # else the next save's (see _prepare)


def _write_json(name, record):
    with open(name, "w") as file:
        json.dump(record, file)
        file.flush()
        os.fsync(file.fileno())


def _agreed(group, action, what, cleanup=lambda: None):
    """``action()``'s result, run on every rank of ``group``; where it fails on some rank,
    ``cleanup()`` and an error on every rank that names each failure (``what`` first),
    or, without a group, ``action``'s own."""
    if group is None:
        try:
            return action()
        except Exception:
            cleanup()
            raise
    result, failure = None, None
    try:
        result = action()
    except Exception as error:  # every rank must learn of it, whatever it is
        failure = type(error).__name__, str(error)
    failures = [None] * dist.get_world_size(group)
    dist.all_gather_object(failures, failure, group=group)
    failed = [(r, f) for r, f in enumerate(failures) if f is not None]
    if failed:
        cleanup()
        raise _ERRORS.get(failed[0][1][0], RuntimeError)(f"{what}: " + "; ".join(
            f"rank {r}: {kind}: {message}" for r, (kind, message) in failed))
    return result


def _on_rank0(group, action):
    """``action()``'s result, run on rank 0 of ``group`` and sent to every rank; its error
    raised on every rank."""
    if group is None:
        return action()
    outcome = [None]
    if dist.get_rank(group) == 0:
        try:
            outcome = [(action(), None)]
        except Exception as error:  # every rank must learn of it, whatever it is
            outcome = [(None, (type(error).__name__, str(error)))]
    dist.broadcast_object_list(outcome, src=dist.get_global_rank(group, 0), group=group)
    result, error = outcome[0]
    if error is not None:
        raise _ERRORS.get(error[0], RuntimeError)(error[1])
    return result
