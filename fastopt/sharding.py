"""How ``fastopt.torch`` optimizers step parameters that several processes share, on
``torch.distributed``: the sums over tensors whose parts lie on other ranks, and the
partitions of fastopt's own ZeRO sharding (``process_group=``).

Sums (gradient norms, LAMB's and LARS's per-tensor norms, the Cautious share,
Adafactor's column sums) are gathered, not all-reduced: every rank gets every rank's
float64 parts and adds them in rank order, so every rank gets the same floats (an
all-reduce promises no such thing). Adafactor's sums down the rows of a matrix are
carried from rank to rank instead (``in_row_order``).
"""

import collections
import functools
import hashlib
import weakref

import numpy as np
import torch
import torch.distributed as dist

from torch.autograd import Variable

from ._backend import positions_in_runs
from .kernels._template import SEGMENT_CHUNK


def over_ranks(groups, parts):
    """The sums of the float64 numbers ``parts`` over the ranks of each process group
    of ``groups`` in turn (the mesh dimensions across which a DTensor is sharded, or a
    ZeRO group): gathered, and added in rank order in every rank (vectorised: Adafactor
    gathers a column sum per column of each matrix)."""
    parts = np.asarray(parts, np.float64)
    for group in groups:
        ranks = _all_gathered(torch.from_numpy(parts), group).numpy()
        parts = ranks[0].copy()
        for rank_parts in ranks[1:]:  # not sum(axis=0): pairwise for one number of 8 ranks
            parts += rank_parts
    return parts


def in_row_order(group, carry, fold):
    """``carry = fold(carry)`` on each rank of ``group`` in rank order, from ``carry``
    (float64, of one size on every rank) on the first, each handing its carry to the
    next; the last rank's carry, on every rank. Sums carried this way over the ranks'
    consecutive pieces of tensors add them in the order of their elements, as one
    process does, wherever the pieces are cut."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    device, global_rank = _device(group), functools.partial(dist.get_global_rank, group)
    if rank:
        received = torch.empty(len(carry), dtype=torch.float64, device=device)
        dist.recv(received, global_rank(rank - 1), group=group)
        carry = received.cpu().numpy()
    carry = torch.from_numpy(np.ascontiguousarray(fold(carry), np.float64)).to(device)
    if rank < world - 1:
        dist.send(carry, global_rank(rank + 1), group=group)
    dist.broadcast(carry, global_rank(world - 1), group=group)
    return carry.cpu().numpy()


def _device(group):
    """Where the tensors of ``group``'s collectives lie: NCCL's on the GPU."""
    return "cuda" if dist.get_backend(group) == "nccl" else "cpu"


def _all_gathered(mine, group):
    """Every rank's ``mine`` (of one shape on every rank), stacked in rank order, on
    the CPU."""
    mine = mine.to(_device(group))
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, mine, group=group)
    return torch.stack(gathered).cpu()


def gathered_by_tensor(rows, counts, group):
    """Every rank's ``rows``, by tensor: ``counts[r][i]`` rows of tensor ``i`` on rank
    ``r``, one tensor's after the other's; for each tensor, every rank's rows in rank
    order (its elements in order, where ranks hold consecutive pieces)."""
    counts = np.asarray(counts, np.int64)
    mine = rows.new_zeros((int(counts.sum(axis=1).max()), *rows.shape[1:]))
    mine[:len(rows)] = rows
    gathered = _all_gathered(mine, group)
    starts = np.concatenate([np.zeros((len(counts), 1), np.int64), counts.cumsum(axis=1)], 1)
    return [torch.cat([gathered[r, starts[r, i]:starts[r, i + 1]] for r in range(len(counts))])
            for i in range(counts.shape[1])]


def sums_over_ranks(groups, sums):
    """The per-tensor ``sums`` of a pass (a tuple of float64 arrays, one value per
    tensor of the launch, which every rank launches alike) over ``groups``, in one
    gather each."""
    total = over_ranks(groups, np.concatenate(sums))
    return tuple(np.split(total, len(sums)))


def on_any_rank(flags, group):
    """Which of ``flags`` (a list of bools, as long on every rank) hold on some rank of
    ``group``."""
    if not flags:
        return []
    mask = torch.tensor(flags, dtype=torch.int32, device=_device(group))
    dist.all_reduce(mask, op=dist.ReduceOp.MAX, group=group)
    return mask.bool().tolist()


def averaging(gradients, group):
    """The reduction op that averages ``gradients`` over ``group``, once they are
    prepared for it. 16-bit gradients are divided by the number of ranks first and then
    summed, as DDP does: an average summed first overflowed float16 where the
    gradients and their average do not (two ranks' 40000 each), and the step went to
    -inf. float32 ones are averaged by the backend (their sum does not overflow)."""
    if gradients.element_size() == 2:
        gradients.div_(dist.get_world_size(group))
        return dist.ReduceOp.SUM
    return dist.ReduceOp.AVG


def reduce_scatter(output, padded, group):
    """``output`` = this rank's share of ``padded`` averaged over ``group``. gloo's
    reduce-scatter took longer than its all-reduce of the whole buffer here (1M floats,
    two ranks: 4.2-5.3 ms against 3.1; level at four), so on gloo it is that."""
    op = averaging(padded, group)
    if dist.get_backend(group) == "gloo":
        dist.all_reduce(padded, op=op, group=group)
        rank = dist.get_rank(group)
        output.copy_(padded[rank * output.numel():(rank + 1) * output.numel()])
    else:
        _REDUCE_SCATTER(output, padded, op=op, group=group)


def all_gather(padded, own, group):
    """``padded`` = every rank's ``own``, in rank order."""
    if own.dtype in (torch.int16, torch.uint8):  # which gloo does not move: as int32
        wide = torch.empty(padded.shape, dtype=torch.int32, device=padded.device)
        _ALL_GATHER(wide, own.to(torch.int32), group=group)
        padded.copy_(wide)
    else:
        _ALL_GATHER(padded, own, group=group)


def gather(padded, own, group, to):
    """On rank ``to`` of ``group``, ``padded`` = every rank's ``own``, in rank order; the
    other ranks pass None and only send theirs."""
    wide = own.dtype in (torch.int16, torch.uint8)  # which gloo does not move: as int32
    if wide:
        own = own.to(torch.int32)
    parts = None
    if padded is not None:
        target = torch.empty(padded.shape, dtype=torch.int32, device=padded.device) \
            if wide else padded
        parts = list(target.view(dist.get_world_size(group), -1).unbind())
    dist.gather(own, parts, dst=dist.get_global_rank(group, to), group=group)
    if padded is not None and wide:
        padded.copy_(target)


# torch 2.13 renamed reduce_scatter_tensor and all_gather_into_tensor (now deprecated).
_REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def check_same_parameters(group, params, options):
    """Raise a ValueError on every rank of ``group`` unless every rank passed
    parameters of the same shapes and dtypes, in the same order, and the same
    ``options`` (a repr-able value: what the collectives depend on), in one small
    gather."""
    described = repr([(tuple(p.shape), str(p.dtype)) for p in params]).encode()
    digests = [int.from_bytes(hashlib.sha256(text).digest()[:7], "little")
               for text in (described, repr(options).encode())]
    mine = torch.tensor([len(params), *digests], dtype=torch.int64)
    seen = [tuple(t) for t in _all_gathered(mine, group).tolist()]
    if len({(count, shapes) for count, shapes, _ in seen}) > 1:
        counts = [count for count, _, _ in seen]
        raise ValueError("process_group: the ranks passed different parameters (counts "
                         f"{counts}, or other shapes, dtypes or order); every rank must "
                         "pass the same parameters in the same order")
    if len(set(seen)) > 1:
        raise ValueError("process_group: the ranks built different optimizers (its class, "
                         "zero_stage, bucket_cap_mb, reduce_grads, master_weights, "
                         "state_dtype, stochastic_rounding, seed, clip_grad_norm, "
                         "clip_grad_value, skip_nonfinite or the groups' hyperparameters "
                         "differ); every rank must build the same")


class Partition:
    """The part of a flat buffer (parameters of one device and dtype, one after the
    other) that each rank of a ZeRO group steps: equal contiguous shares, each cut
    moved forward to the next chunk of SEGMENT_CHUNK elements of the tensor it falls
    in, so that a share may begin or end inside a tensor, where the kernels' sums over
    the tensor (one per chunk: see :class:`WholeTotals`) and 8-bit state's blocks of
    256 are cut too; or, where ``whole`` (Adafactor, whose factors need whole
    matrices), to the tensor's end.

    ``bounds[r]:bounds[r + 1]`` is rank ``r``'s share of the flat buffer; ``share`` the
    longest, to which the collectives pad every share; ``pieces[i]`` is ``(first,
    last)``, the elements of tensor ``i`` (in its memory order) that this rank steps;
    ``rows`` are ``(tensor, first, last, at)``: each part of a tensor on some rank, and
    where it lies in the padded buffer of all shares (rank ``r``'s from ``r * share``).
    """

    def __init__(self, sizes, rank, world, whole=False):
        starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
        total = int(starts[-1])
        even = -(-total // world)
        bounds = [0]
        for r in range(1, world):
            target = max(min(r * even, total), bounds[-1])
            tensor = int(np.searchsorted(starts, target, side="right")) - 1
            if tensor < len(sizes):
                offset = -(-(target - int(starts[tensor])) // SEGMENT_CHUNK) * SEGMENT_CHUNK
                if whole and offset:
                    offset = sizes[tensor]
                target = min(int(starts[tensor]) + offset, int(starts[tensor + 1]))
            bounds.append(target)
        bounds.append(total)
        self.bounds, self.rank, self.world, self.whole = bounds, rank, world, whole
        self.starts, self.sizes = [int(s) for s in starts[:-1]], [int(n) for n in sizes]
        self.share = max(b - a for a, b in zip(bounds, bounds[1:])) if total else 0
        self.pieces = self.pieces_of(rank)
        self.rows = []
        for r in range(world):
            for i, (s, n) in enumerate(zip(starts[:-1], sizes)):
                first, last = max(bounds[r] - s, 0), min(bounds[r + 1] - s, n)
                if first < last:
                    self.rows.append((i, int(first), int(last),
                                      int(r * self.share + s + first - bounds[r])))

    def pieces_of(self, rank):
        """``pieces`` of rank ``rank``."""
        lo, hi = self.bounds[rank], self.bounds[rank + 1]
        return [(min(max(lo - s, 0), n), min(max(hi - s, 0), n))
                for s, n in zip(self.starts, self.sizes)]

    def counts(self, unit, tensors=None):
        """Per rank, per tensor (of ``tensors``, default all): how many runs of ``unit``
        elements (the last one shorter) its piece holds."""
        tensors = range(len(self.sizes)) if tensors is None else tensors
        return [[-(-(last - first) // unit) for first, last in np.array(
            self.pieces_of(r)).reshape(-1, 2)[list(tensors)]] for r in range(self.world)]

    def buckets(self, capacity):
        """``zero_stage=2``'s buckets: each rank's share cut into pieces of at most
        ``capacity`` elements, last first (backward's order, roughly), as ``(owner, lo,
        hi, parts)``: the flat buffer's ``lo:hi`` lies in rank ``owner``'s share, and each
        part ``(tensor, first, last, at)`` puts the tensor's elements ``first:last`` at
        ``at`` in the bucket."""
        buckets = []
        for owner in range(self.world):
            for lo in range(self.bounds[owner], self.bounds[owner + 1], capacity):
                hi = min(lo + capacity, self.bounds[owner + 1])
                parts = [(i, max(lo - s, 0), min(hi - s, n), max(s - lo, 0))
                         for i, (s, n) in enumerate(zip(self.starts, self.sizes))
                         if s < hi and lo < s + n]
                buckets.append((owner, lo, hi, parts))
        return buckets[::-1]

    def windows(self, width):
        """``(start, length)``: the windows of at most ``width`` elements of a share, in
        order (none for empty shares)."""
        return [(start, min(width, self.share - start))
                for start in range(0, self.share, max(width, 1))]

    def _parts(self, window):
        """``(tensor, rank, elements, at)``: the slices of each tensor's part on each rank
        that fall in ``window`` ``(start, length)`` of the shares (None: all of them),
        and where they lie in a buffer of every share's window, one after the other."""
        start, length = window or (0, self.share)
        for i, first, last, at in self.rows:
            rank, offset = divmod(at, self.share)
            lo, hi = max(offset, start), min(offset + last - first, start + length)
            if lo < hi:
                yield (i, rank, slice(first + lo - offset, first + hi - offset),
                       slice(rank * length + lo - start, rank * length + hi - start))

    def pack(self, flats, out, window=None):
        """Copy the flat tensors ``flats`` (one per tensor, None for zeros) into ``out``,
        the padded buffer of all shares; or, with ``window`` ``(start, length)``, every
        share's elements ``start:start + length`` into ``out``, one after the other (as
        :meth:`unpack` takes them)."""
        for i, _, elements, at in self._parts(window):
            if flats[i] is None:
                out[at].zero_()
            else:
                out[at].copy_(flats[i][elements])

    def unpack(self, full, flats, skip_own=True, window=None):
        """Copy every share of the padded buffer ``full`` into the flat tensors
        ``flats`` (this rank's own parts too unless ``skip_own``); or, with ``window``
        ``(start, length)``, every share's elements ``start:start + length``, which
        ``full`` holds one after the other."""
        for i, rank, elements, at in self._parts(window):
            if not (skip_own and rank == self.rank):
                flats[i][elements].copy_(full[at])


class BucketReducer:
    """``zero_stage=2``: a store's gradients reduced during backward, bucket by bucket,
    into each rank's share (``gradients``), so that a rank holds its share and one
    bucket instead of every gradient.

    A post-accumulate-grad hook marks each parameter ready. The buckets
    (``Partition.buckets``) go out strictly in their order, each once it and those
    before it are ready: copied into one buffer and sent as one ``reduce`` (averaged
    where ``reduce``) to the rank whose share it is, which adds it into ``gradients``
    when the next bucket goes out or backward ends (with nothing to send, one rank or
    ``reduce`` False, the owner copies it straight in). A parameter's ``.grad`` is dropped
    once its last bucket is out. At the end of backward the buckets that wait on
    parameters that got no gradient go out, in order, with zeros for those. So every
    rank sends the same buckets in the same order, as long as every rank's backward
    reaches the same parameters (as DDP requires).

    Over several backward passes (micro-batches) ``gradients`` adds up; a step takes
    it, and the first bucket after a step (or ``clear``, from ``zero_grad``) starts
    afresh, so ``model.zero_grad()`` is enough between steps. ``take`` first sends what
    backward did not (gradients set by hand). ``check(grad, param)`` refuses a gradient
    that the step could not take, before it is sent."""

    def __init__(self, params, partition, group, reduce, capacity, check):
        self.params, self.partition, self.group = params, partition, group
        self.check = check
        self.capacity = capacity
        self.collective = reduce and partition.world > 1
        self.buckets = partition.buckets(capacity)
        self.members = [[i for i, *_ in parts] for *_, parts in self.buckets]
        buckets_of = collections.defaultdict(list)
        for b, members in enumerate(self.members):
            for i in members:
                buckets_of[i].append(b)
        self.buckets_of = dict(buckets_of)
        # By bucket: the parameters whose gradient is dropped once it is out.
        self.drops = [[i for i in members if self.buckets_of[i][-1] == b]
                      for b, members in enumerate(self.members)]
        rank = partition.rank
        self.base = partition.bounds[rank]  # where this rank's share begins
        like = dict(dtype=params[0].dtype, device=params[0].device)
        self.gradients = torch.zeros(partition.bounds[rank + 1] - self.base, **like)
        longest = max([hi - lo for _, lo, hi, _ in self.buckets], default=0)
        self.buffer = torch.zeros(longest if self.collective else 0, **like)  # what is sent
        self.has = set()  # the parameters with a gradient in ``gradients``
        self.fresh = [True] * len(self.buckets)  # whose part of it holds nothing yet
        self.taken = False
        self._sent = None  # (the reduce in flight, its bucket)
        self._new_round()
        me = weakref.ref(self)
        handles = [p.register_post_accumulate_grad_hook(functools.partial(_ready, me, i))
                   for i, p in enumerate(params) if p.requires_grad]
        # Removes the hooks: when the optimizer builds new stores, or is gone.
        self.close = weakref.finalize(self, _remove, handles)

    def _new_round(self):
        self.next, self.queued = 0, False
        self.waiting = [{i for i in members if self.params[i].requires_grad}
                        for members in self.members]

    def ready(self, index):
        """Parameter ``index`` has its gradient of this backward."""
        if not self.queued:
            Variable._execution_engine.queue_callback(self._end_of_backward)
            self.queued = True
        for b in self.buckets_of.get(index, ()):
            self.waiting[b].discard(index)
        while self.next < len(self.buckets) and not self.waiting[self.next]:
            self._send(self.next)
            self.next += 1

    def _end_of_backward(self):
        for b in range(self.next, len(self.buckets)):
            self._send(b)
        self._receive()
        self._new_round()

    def take(self):
        """The parameters (indices) whose elements of ``gradients`` hold a gradient that
        no step has used (see ``used``), for the step: none where no backward, and no
        gradient set by hand, came since the last step (``p.grad`` is None then, as
        after ``zero_grad`` in torch, which ``model.zero_grad()`` would not tell us)."""
        for b in range(len(self.buckets)):
            self._send(b)
        self._receive()
        self._new_round()  # should backward have stopped halfway, on an error
        return set() if self.taken else self.has

    def used(self):
        """A step has used the gradients (or skipped them): the next bucket starts
        afresh. Called once the step is done, so that a step that failed after
        ``take`` (a refused argument, memory for the state) can be called again on
        them, as on torch's ``p.grad``."""
        self.taken = True

    def pending(self):
        """Whether it holds gradients that no step has taken yet."""
        return bool(self.has) and not self.taken

    def take_over(self, other):
        """Hold ``other``'s gradients, of the same partition (its parameters moved to
        other storage)."""
        other._receive()
        self.gradients.copy_(other.gradients)
        self.has, self.fresh, self.taken = set(other.has), list(other.fresh), other.taken

    def clear(self):
        """Forget the gradients (``zero_grad``)."""
        self._receive()
        self.has.clear()
        self.fresh = [True] * len(self.buckets)
        self.taken = False

    def _send(self, b):
        owner, lo, hi, parts = self.buckets[b]
        grads = [self.params[i].grad for i in self.members[b]]
        if all(grad is None for grad in grads):
            return  # on every rank: the same parameters have gradients
        for i, grad in zip(self.members[b], grads):
            if grad is not None:
                self.check(grad, self.params[i])
        if self.taken:
            self.clear()
        self._receive()
        if self.collective:
            self._copy(parts, grads, self.buffer[:hi - lo], add=False)
            op = averaging(self.buffer[:hi - lo], self.group)
            self._sent = (dist.reduce(self.buffer[:hi - lo], dist.get_global_rank(
                self.group, owner), op=op, group=self.group, async_op=True), b)
        elif owner == self.partition.rank:  # nothing to send: straight into the share
            self._copy(parts, grads, self.gradients[lo - self.base:hi - self.base],
                       add=not self.fresh[b])
            self.fresh[b] = False
        self.has.update(i for i, grad in zip(self.members[b], grads) if grad is not None)
        for i in self.drops[b]:
            self.params[i].grad = None

    @staticmethod
    def _copy(parts, grads, into, add):
        for (i, first, last, at), grad in zip(parts, grads):
            piece = into[at:at + last - first]
            if grad is not None:
                (piece.add_ if add else piece.copy_)(grad.reshape(-1)[first:last])
            elif not add:
                piece.zero_()

    def _receive(self):
        if self._sent is None:
            return
        (work, b), self._sent = self._sent, None
        work.wait()
        owner, lo, hi, _ = self.buckets[b]
        if owner == self.partition.rank:
            mine = self.gradients[lo - self.base:hi - self.base]
            if self.fresh[b]:
                mine.copy_(self.buffer[:hi - lo])
                self.fresh[b] = False
            else:
                mine.add_(self.buffer[:hi - lo])


def chunk_order(counts):
    """Where :class:`WholeTotals` finds each tensor's chunk sums among every rank's,
    where rank ``r`` holds ``counts[r][i]`` chunks of tensor ``i``, each rank's sums
    gathered after the previous one's, padded to the longest: ``(index, tensor,
    tensors, longest)``, the chunks' places there in the order of the tensors and, in
    each, of the ranks, the tensor of each, and the number of tensors."""
    counts = np.asarray(counts, np.int64)
    world, tensors = counts.shape
    longest = int(counts.sum(axis=1).max())
    starts = np.arange(world)[:, None] * longest + np.cumsum(counts, axis=1) - counts
    runs = counts.T.reshape(-1)  # of each tensor on each rank, by tensor, then rank
    index = np.repeat(starts.T.reshape(-1), runs) + positions_in_runs(runs)
    return index, np.repeat(np.arange(tensors).repeat(world), runs), tensors, longest


class WholeTotals:
    """``Segments.totals`` over cut tensors: the sums over the whole tensors from every
    rank's chunk sums (``partials``), gathered over ``group``, where rank ``r`` holds
    ``counts[r][i]`` chunks of tensor ``i``; added in the order of the ranks, in which
    they hold consecutive pieces of each tensor, and in each piece in chunk order. Where
    no chunk crosses a cut, these are one process's sums of the same chunks, bit for
    bit: ZeRO's cuts fall between chunks (``Partition.counts``), and FSDP2's between
    rows, at which the chunks of its tables of sums begin (``fastopt.torch._Store.table``).
    The gather's buffers are kept for the next steps."""

    def __init__(self, counts, group):
        self.index, self.tensor, self.tensors, self.longest = chunk_order(counts)
        self.group, self.world = group, len(counts)
        self._buffers = {}  # by the number of sums

    def __call__(self, partials, sums):
        if sums not in self._buffers:
            device = _device(self.group)
            self._buffers[sums] = (
                torch.zeros((self.longest, sums), dtype=torch.float64, device=device),
                torch.empty((self.world * self.longest, sums), dtype=torch.float64,
                            device=device))
        mine, gathered = self._buffers[sums]
        mine[:len(partials)] = torch.from_numpy(partials[:, :sums])  # the rest stays 0
        _ALL_GATHER(gathered, mine, group=self.group)
        chunks = gathered.cpu().numpy()[self.index]
        return tuple(np.bincount(self.tensor, chunks[:, k], self.tensors) for k in range(sums))


def chunk_pieces(size, world):
    """Where each of ``world`` ranks' pieces of ``size`` rows begins, and how many rows
    it holds, as torch.chunk cuts them (DTensor's ``Shard``, FSDP2's)."""
    piece = -(-size // world)
    starts = np.minimum(piece * np.arange(world), size)
    return starts, np.minimum(size - starts, piece)


def shard_chunks(shape, dim, row, world):
    """How many chunks of a table of sums (``fastopt._backend.segment_chunks``) each of
    ``world`` ranks holds of a tensor of ``shape`` split along ``dim`` as torch.chunk
    splits it (DTensor's ``Shard``, FSDP2's): where ``row`` is given, every row of it
    begins a chunk (``dim`` 0), else the chunks run from each shard's first element."""
    size = shape[dim]
    if not size:
        return np.zeros(world, np.int64)
    _, held = chunk_pieces(size, world)  # along dim
    if row:
        return held * -(-row // SEGMENT_CHUNK)
    return -(-held * (int(np.prod(shape)) // size) // SEGMENT_CHUNK)


def ranks_totals(local, groups):
    """``Segments.totals`` that add every rank's per-tensor sums (``local``'s), in
    rank order over each of ``groups`` in turn (``sums_over_ranks``): the whole tensors'
    sums of DTensors sharded along several mesh dimensions, to a float64 rounding that
    moves with the cuts."""
    return lambda partials, sums: sums_over_ranks(groups, local(partials, sums))


def _remove(handles):
    for handle in handles:
        handle.remove()


def _ready(reducer, index, _param):
    reducer = reducer()
    if reducer is not None:  # not an optimizer's that is gone
        reducer.ready(index)
