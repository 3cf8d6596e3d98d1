"""How ``fastopt.torch`` optimizers step parameters that several processes share, on
``torch.distributed``: the sums over tensors whose parts lie on other ranks, and the
partitions of fastopt's own ZeRO sharding (``process_group=``).

Sums (gradient norms, LAMB's and LARS's per-tensor norms, the Cautious share) are
gathered, not all-reduced: every rank gets every rank's float64 parts and adds them
exactly (``math.fsum``), so every rank gets the same floats, whatever the order in
which they arrive.
"""

import hashlib
import math

import numpy as np
import torch
import torch.distributed as dist

from .kernels.codecs import BLOCK


def over_ranks(groups, parts):
    """The sums of the float64 numbers ``parts`` over the ranks of each process group
    of ``groups`` in turn (the mesh dimensions across which a DTensor is sharded, or a
    ZeRO group): gathered, and each added exactly in every rank."""
    parts = np.asarray(parts, np.float64)
    for group in groups:
        mine = torch.from_numpy(parts).to(_device(group))
        gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
        dist.all_gather(gathered, mine, group=group)
        parts = np.array([math.fsum(column)
                          for column in torch.stack(gathered).cpu().T.tolist()], np.float64)
    return parts


def _device(group):
    """Where the tensors of ``group``'s collectives lie: NCCL's on the GPU."""
    return "cuda" if dist.get_backend(group) == "nccl" else "cpu"


def sums_over_ranks(groups, sums):
    """The per-tensor ``sums`` of a pass (a tuple of float64 arrays, one value per
    tensor of the launch, which every rank launches alike) over ``groups``, in one
    gather each."""
    total = over_ranks(groups, np.concatenate(sums))
    return tuple(np.split(total, len(sums)))


def reduce_scatter(output, padded, group):
    """``output`` = this rank's share of ``padded`` averaged over ``group``. gloo's
    reduce-scatter took longer than its all-reduce of the whole buffer here (1M floats,
    two ranks: 4.2-5.3 ms against 3.1; level at four), so on gloo it is that."""
    if dist.get_backend(group) == "gloo":
        dist.all_reduce(padded, op=dist.ReduceOp.AVG, group=group)
        rank = dist.get_rank(group)
        output.copy_(padded[rank * output.numel():(rank + 1) * output.numel()])
    else:
        _REDUCE_SCATTER(output, padded, op=dist.ReduceOp.AVG, group=group)


def all_gather(padded, own, group):
    """``padded`` = every rank's ``own``, in rank order."""
    if own.dtype in (torch.int16, torch.uint8):  # which gloo does not move: as int32
        wide = torch.empty(padded.shape, dtype=torch.int32, device=padded.device)
        _ALL_GATHER(wide, own.to(torch.int32), group=group)
        padded.copy_(wide)
    else:
        _ALL_GATHER(padded, own, group=group)


# torch 2.13 renamed reduce_scatter_tensor and all_gather_into_tensor (now deprecated).
_REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def check_same_parameters(group, params):
    """Raise a ValueError on every rank of ``group`` unless every rank passed
    parameters of the same shapes and dtypes, in the same order (one small gather)."""
    described = repr([(tuple(p.shape), str(p.dtype)) for p in params]).encode()
    digest = int.from_bytes(hashlib.sha256(described).digest()[:7], "little")
    mine = torch.tensor([len(params), digest], dtype=torch.int64, device=_device(group))
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, mine, group=group)
    seen = [tuple(t.tolist()) for t in gathered]
    if len(set(seen)) > 1:
        counts = [count for count, _ in seen]
        raise ValueError("process_group: the ranks passed different parameters (counts "
                         f"{counts}, or other shapes, dtypes or order); every rank must "
                         "pass the same parameters in the same order")


class Partition:
    """The part of a flat buffer (parameters of one device and dtype, one after the
    other) that each rank of a ZeRO group steps: equal contiguous shares, each cut
    moved forward to the next 256-element block of the tensor it falls in (as 8-bit
    state's blocks run), so that a share may begin or end inside a tensor.

    ``bounds[r]:bounds[r + 1]`` is rank ``r``'s share of the flat buffer; ``share`` the
    longest, to which the collectives pad every share; ``pieces[i]`` is ``(first,
    last)``, the elements of tensor ``i`` (in its memory order) that this rank steps;
    ``rows`` are ``(tensor, first, last, at)``: each part of a tensor on some rank, and
    where it lies in the padded buffer of all shares (rank ``r``'s from ``r * share``).
    """

    def __init__(self, sizes, rank, world):
        starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
        total = int(starts[-1])
        even = -(-total // world)
        bounds = [0]
        for r in range(1, world):
            target = max(min(r * even, total), bounds[-1])
            tensor = int(np.searchsorted(starts, target, side="right")) - 1
            if tensor < len(sizes):
                offset = -(-(target - int(starts[tensor])) // BLOCK) * BLOCK
                target = min(int(starts[tensor]) + offset, int(starts[tensor + 1]))
            bounds.append(target)
        bounds.append(total)
        self.bounds, self.rank, self.world = bounds, rank, world
        self.share = max(b - a for a, b in zip(bounds, bounds[1:])) if total else 0
        lo, hi = bounds[rank], bounds[rank + 1]
        self.pieces = [(int(min(max(lo - s, 0), n)), int(min(max(hi - s, 0), n)))
                       for s, n in zip(starts[:-1], sizes)]
        self.rows = []
        for r in range(world):
            for i, (s, n) in enumerate(zip(starts[:-1], sizes)):
                first, last = max(bounds[r] - s, 0), min(bounds[r + 1] - s, n)
                if first < last:
                    self.rows.append((i, int(first), int(last),
                                      int(r * self.share + s + first - bounds[r])))

    def pack(self, flats, out):
        """Copy the flat tensors ``flats`` (one per tensor, None for zeros) into ``out``,
        the padded buffer of all shares."""
        for i, first, last, at in self.rows:
            if flats[i] is None:
                out[at:at + last - first].zero_()
            else:
                out[at:at + last - first].copy_(flats[i][first:last])

    def unpack(self, full, flats, skip_own=True):
        """Copy every share of the padded buffer ``full`` into the flat tensors
        ``flats`` (this rank's own parts too unless ``skip_own``)."""
        lo, hi = self.rank * self.share, (self.rank + 1) * self.share
        for i, first, last, at in self.rows:
            if not (skip_own and lo <= at < hi):
                flats[i][first:last].copy_(full[at:at + last - first])
