import math
from dataclasses import dataclass

import ml_dtypes
import numpy as np

from .._backend import SEGMENT_CHUNK
from ..kernels import Pass, rules
from ..precision import DTYPES
from . import spec as hp
from .checks import check_nonnegative, real
from .optimizer import Optimizer


# The column sums of a matrix are taken over at most this many blocks of rows, in
# parallel, and the blocks' sums are then added in order.
ROW_BLOCKS = 64


def _check_beta2_decay(beta2_decay):
    if not real("beta2_decay", beta2_decay) <= 0.0:
        raise ValueError(f"beta2_decay should be <= 0 but is: {beta2_decay}")


def _check_eps_pair(eps):
    if not isinstance(eps, (tuple, list)) or len(eps) != 2:
        raise TypeError(f"eps must be a pair (eps1 or None, eps2), got {eps!r}")
    if eps[0] is not None:
        check_nonnegative("eps[0]", eps[0])
    check_nonnegative("eps[1]", eps[1])


def _check_d(d):
    if not real("d", d) >= 1.0:
        raise ValueError(f"Clipping threshold d should be >= 1 but is: {d}")


class Adafactor(Optimizer):
    r"""Adafactor, with factored second moments; torch.optim.Adafactor.

    For each parameter tensor :math:`\theta` of :math:`n` elements, at step :math:`t`:

    .. math::
        \hat\beta_{2t} &= t^{c}, \qquad \rho_t = \min(\gamma, 1/\sqrt t), \qquad
        \alpha_t = \max(\epsilon_2, \operatorname{RMS}(\theta_{t-1}))\,\rho_t \\
        \theta_{t-1} &\leftarrow (1 - \gamma\lambda)\,\theta_{t-1} \\
        R_t &\leftarrow R_{t-1} + \hat\beta_{2t}\,(\operatorname{mean}_{-1}(g_t^2) - R_{t-1}),
        \qquad C_t \leftarrow C_{t-1} + \hat\beta_{2t}\,(\operatorname{mean}_{-2}(g_t^2)
            - C_{t-1}) \\
        \hat V_t &= R_t C_t / \max(\operatorname{mean}(R_t), \epsilon_1)
            \quad\text{(for a vector: } V_t \leftarrow V_{t-1} + \hat\beta_{2t}\,(g_t^2 -
            V_{t-1})\text{)} \\
        U_t &= g_t / \sqrt{\max(\hat V_t, \epsilon_1^2)}, \qquad
        \theta_t \leftarrow \theta_{t-1}
            - \frac{\alpha_t}{\max(1, \operatorname{RMS}(U_t) / d)}\,U_t

    A tensor of 2 or more dimensions is factored over its last two: it keeps a row
    mean :math:`R` and a column mean :math:`C` of :math:`g^2` per leading index, so an
    (r × c) matrix costs r + c floats of state instead of r·c. Vectors and scalars keep
    the full :math:`V`. Empty tensors are left alone (torch divides by their size), with
    their state of torch's shapes.

    A step makes three passes over the parameters, whose tensor shapes come from the
    flattening layout: one reads θ and g for the per-tensor RMS(θ) and the row sums
    of :math:`g^2` (a segmented reduction over the rows), with the column sums in a
    kernel of its own; one sums :math:`U^2` per tensor (moving :math:`V`); one steps.
    Every sum is float64 and does not depend on the thread count. The factors R and C,
    r + c numbers per matrix, are updated on the host.

    Args:
        params: a dict or list of float32, bfloat16 or float16 arrays (copied),
            :func:`fastopt.adopt` with ``shapes`` (the factoring needs each tensor's
            shape), or a list of parameter-group dicts.
        lr (γ), beta2_decay (c), eps (ε₁, ε₂; ε₁ None means, as in torch, the machine
        epsilon of the parameters' dtype: float32's 2**-23, bfloat16's 2**-7,
        float16's 2**-10, whatever the master weights), d, weight_decay (λ, decoupled),
        maximize: as in torch.optim.Adafactor, with the same defaults.
        clip_grad_norm ... seed: the options of every algorithm (clipping, the
            non-finite skip, storage formats); see :class:`fastopt.Optimizer`. The
            state stays float32: the factors move on the host.

    State: ``row_var`` and ``col_var``, the factors of all factored tensors one after
    the other, and ``variance`` for the vectors. A step moves 28 bytes per parameter
    of a matrix: 8 (read θ, g), 4 (g again, for the column sums), 4 (g) and 12 (θ, g
    and θ written).

    References:
        Shazeer & Stern, 2018, "Adafactor: Adaptive Learning Rates with Sublinear
        Memory Cost", arXiv:1804.04235.
    """

    spec = hp.Spec(
        rule="adafactor", torch="Adafactor", moves=28, per_tensor=True, factored=True,
        passes=(hp.REDUCE, hp.REDUCE, hp.MAP_REDUCE, hp.MAP),
        # eps1**2 may be subnormal (torch's default eps1 is float32's epsilon, but a user's
        # 1e-20 gives 1e-40), and it floors the estimate the rule divides by.
        keeps_subnormals=True,
        hyperparameters=(hp.lr(1e-2), hp.Hyperparameter("beta2_decay", -0.8, _check_beta2_decay),
                         hp.Hyperparameter("eps", (None, 1e-3), _check_eps_pair),
                         hp.Hyperparameter("d", 1.0, _check_d), hp.weight_decay(),
                         hp.maximize()),
        bench=dict(lr=1e-2), check=dict(lr=0.05))

    @staticmethod
    def buffers(group, host):
        return {"row_var": 0.0, "col_var": 0.0, "variance": 0.0}

    @classmethod
    def state_names(cls):  # its passes' "second" is one of these, as each pass is given
        return ("row_var", "col_var", "variance")

    @staticmethod
    def state_shape(name, shape):
        # An empty tensor has its (empty, or never moved) state, as in torch.
        if (len(shape) >= 2) == (name == "variance"):
            return None
        if name == "row_var":  # torch's shapes: (..., rows, 1) and (..., 1, columns)
            return shape[:-1] + (1,)
        if name == "col_var":
            return shape[:-2] + (1,) + shape[-1:]
        return shape

    @staticmethod
    def l2(group):
        return 0.0  # the decay is decoupled

    # The passes of the rule over the rows of factored tensors (whose ``second`` is
    # their column factor) and over the vectors (whose ``second`` is their variance):
    # RMS(U) per tensor, moving the vectors' variance; then the step.
    ROW_NORMS = Pass("adafactor", ("second",), writes=(), sums=("update_sq",),
                     per_segment=("row_scale",))
    VECTOR_NORMS = Pass("adafactor", ("second",), writes=("second",), sums=("update_sq",))
    ROW_STEP = Pass("adafactor", ("second",), writes=("p",), per_segment=("row_scale",
                                                                         "step_size"))
    VECTOR_STEP = Pass("adafactor", ("second",), writes=("p",), per_segment=("step_size",))

    @staticmethod
    def scalars(group, step, fresh, host):
        eps1 = _eps1(group, "float32")  # the parameters' dtype's: update() sets it
        # row_scale and step_size differ per row or tensor: the passes take their own.
        return rules.AdafactorScalars.of(beta=step ** group["beta2_decay"],
                                      eps1_sq=eps1 * eps1, moving=False,
                                      row_scale=1.0,
                                      decay=1.0 - group["lr"] * group["weight_decay"],
                                      step_size=0.0)

    @classmethod
    def update(cls, work, group, step, h, host):
        if "plan" not in work.cache:
            work.cache["plan"] = _Plan.of(work)
        plan, backend, state = work.cache["plan"], work.backend, work.state
        beta, eps1 = float(h.beta), _eps1(group, work.formats.get("p", "float32"))
        h = h._replace(eps1_sq=eps1 * eps1)
        lr = group["lr"]

        # Pass 1: RMS(p) per tensor; g*g summed along the rows and down the columns.
        segment_sq, row_sq = work.run(NORMS, rules.NoScalars.of(), plan.segments)
        param_sq = _added(plan.segment_tensor, segment_sq, plan.tensors)
        block_sq = backend.column_sums(work.tensors, work.prep, plan.blocks, plan.block_table,
                                       plan.block_sums, work.formats.get("g"))
        column_sq = _added(plan.block_columns, block_sq, plan.column_slots.size)

        # The factors, r + c numbers per matrix, move on the host: the rows' first, then,
        # with the other processes' parts where the tensors are shards, the columns'.
        row_var = _move(backend, state["row_var"], plan.row_slots,
                        row_sq[plan.row_segments] / plan.row_lengths, beta)
        rows = row_var[plan.row_slots].astype(np.float64)
        batch_sums = _added(plan.row_batch, rows, plan.batches)
        if work.in_row_order is not None:
            param_sq, column_sq, batch_sums = plan.carry_sums(work, segment_sq, param_sq, rows,
                                                              block_sq, column_sq, batch_sums)
        elif work.reduce is not None:
            param_sq, column_sq, batch_sums = plan.whole_sums(work.reduce, param_sq,
                                                              column_sq, batch_sums)
        _move(backend, state["col_var"], plan.column_slots, column_sq / plan.column_lengths, beta)
        row_mean = batch_sums / plan.batch_rows
        row_scales = rows / np.maximum(row_mean, eps1)[plan.row_batch]
        # fmax: torch takes Python's max, which returns its first argument over a NaN.
        alpha = np.fmax(group["eps"][1], np.sqrt(param_sq / plan.sizes))
        alpha *= min(lr, 1.0 / math.sqrt(step))

        # Pass 2: RMS(U) per tensor, moving the vectors' variance. Pass 3: the step. Each
        # goes over the rows and the vectors apart, skipping a kind the launch lacks.
        has_rows, has_vectors = plan.rows.count, plan.vectors.count
        col_var, variance = [state["col_var"]], [state["variance"]]
        update_sq = np.zeros(plan.tensors)
        row_sq = vector_sq = np.zeros(0)
        if has_rows:
            row_sq, = work.run(cls.ROW_NORMS, h, plan.rows, [row_scales], col_var)
            update_sq += _added(plan.row_tensor, row_sq, plan.tensors)
        if has_vectors:
            vector_sq, = work.run(cls.VECTOR_NORMS, h._replace(moving=True), plan.vectors, (),
                                  variance)
            update_sq += _added(plan.vector_tensor, vector_sq, plan.tensors)
        if work.in_row_order is not None:
            update_sq = plan.carry_update(work, row_sq, vector_sq, update_sq)
        elif work.reduce is not None:
            update_sq, = work.reduce((update_sq,))
        step_size = alpha / np.fmax(1.0, np.sqrt(update_sq / plan.sizes) / group["d"])
        if has_rows:
            work.run(cls.ROW_STEP, h, plan.rows, [row_scales, step_size[plan.row_tensor]],
                     col_var)
        if has_vectors:
            work.run(cls.VECTOR_STEP, h, plan.whole_vectors,
                     [step_size[plan.whole_vectors.tensor]], variance)
        return host


NORMS = Pass("norms", sums=("param_sq", "grad_sq"))


def _eps1(group, dtype):
    """The group's eps1; where None, the machine epsilon of ``dtype``, the parameters'
    (a name of ``precision.DTYPES``), as torch takes it (float32's for every dtype
    stepped a bfloat16 model's small gradients 7x as far as torch's 2**-7 did)."""
    eps1 = group["eps"][0]
    return float(ml_dtypes.finfo(DTYPES[dtype]).eps) if eps1 is None else eps1


def _move(backend, factor, slots, target, weight):
    """``factor[slots]`` moved toward ``target`` by ``weight`` in float32, as torch's
    lerp_ does (``rules.lerp``, here on the host's arrays); returns the factor's values
    there."""
    values = backend.on_host(factor)
    values[slots] = rules.lerp(values[slots], target.astype(np.float32), np.float32(weight))
    if values is not factor:
        backend.copy(factor, values)
    return values


@dataclass
class _Plan:
    """How Adafactor walks the tensors of one launch; built once.

    Its segments (``fastopt._backend.Segments``) are the rows of the factored tensors
    and the vectors, in the tensors' order; ``rows`` and ``vectors`` are the same two
    kinds apart, with their second moments as state (a row's is its matrix's column
    factor, which all its rows share).

    Where a tensor is split across processes along its first dimension, this process's
    rows of a matrix (``Work.split_rows``) are a matrix of their own whose column sums
    and row factors' sum are parts of the whole's, and whose rows count as the
    whole's. Where the processes hold the pieces in their order
    (``Work.in_row_order``), the sums follow the rows from process to process
    (``folded``, ``carried``, see :meth:`carry_sums`), so that they do not depend on
    the cuts (they are one process's, but for a vector's, which is summed element by
    element: its segments are its elements, ``whole_vectors`` one per vector), and the
    other tensors' sums ride along, each process's added in turn; else each process's
    parts are added in the order of the processes (``split``, see :meth:`whole_sums`).
    """

    segments: object
    rows: object
    vectors: object
    whole_vectors: object  # the vectors, one segment each (``vectors`` may be elements)
    tensors: int
    sizes: np.ndarray  # elements per tensor (1 for empty ones, which have no segment)
    segment_tensor: np.ndarray  # the tensor of each segment
    row_tensor: np.ndarray  # ... of each row
    vector_tensor: np.ndarray  # ... of each vector
    row_segments: np.ndarray  # which segments are rows, and per row:
    row_slots: np.ndarray  # its place in row_var,
    row_lengths: np.ndarray  # its number of columns,
    row_batch: np.ndarray  # and its matrix (a tensor's leading index), numbered from 0
    batches: int
    batch_rows: np.ndarray  # the number of rows of each matrix
    column_slots: np.ndarray  # the columns' places in col_var,
    column_lengths: np.ndarray  # and their number of rows
    blocks: object  # blocks of rows for the column sums (Segments of the tensors),
    block_table: object  # their (rows, columns, out_start, 0), see kernels.cpu.column_sums,
    block_sums: object  # the sums they write,
    block_columns: np.ndarray  # each of which belongs to this column (of column_slots)
    split: list  # (columns, first column slot, batch or -1 where no row is here)
    # The tensors whose sums follow their rows (a vector's elements) over the
    # processes, and the places of those rows among the segments, and among the rows
    # or the vectors' segments:
    folded: np.ndarray
    folded_segments: np.ndarray
    folded_rows: np.ndarray
    folded_vectors: np.ndarray
    # Per matrix whose column sums follow its rows: (columns, first column slot, batch,
    # its rows (start, stop), and its pieces of blocks of rows, each (continued,
    # out_start in the heads' sums or in block_sums, whether its block ends here));
    # the continued pieces (heads), which begin inside a block:
    carried: list
    heads: object  # (Segments of the tensors),
    head_table: object  # their (rows, columns, out_start, 1),
    head_size: int  # and the length of their sums

    def whole_sums(self, reduce, param_sq, column_sq, batch_sums):
        """The per-tensor ``param_sq``, the ``column_sq`` and the matrices'
        ``batch_sums`` of their row factors, with the other processes' parts added
        (``reduce``, ``Work.reduce``) where the tensors are shards: every sum per
        tensor, and those of the matrices whose rows are split."""
        parts = [param_sq]
        for columns, first, batch in self.split:
            parts.append(column_sq[first:first + columns])
            parts.append([batch_sums[batch] if batch >= 0 else 0.0])
        total, = reduce((np.concatenate(parts),))
        param_sq, column_sq, batch_sums = total[:self.tensors], column_sq.copy(), \
            batch_sums.copy()
        at = self.tensors
        for columns, first, batch in self.split:
            column_sq[first:first + columns] = total[at:at + columns]
            if batch >= 0:
                batch_sums[batch] = total[at + columns]
            at += columns + 1
        return param_sq, column_sq, batch_sums

    def carry_sums(self, work, segment_sq, param_sq, rows, block_sq, column_sq, batch_sums):
        """The whole tensors' ``param_sq``, ``column_sq`` and ``batch_sums``, as
        :meth:`whole_sums` gives them, but carried from process to process
        (``Work.in_row_order``): the ``folded`` tensors' ``param_sq`` added segment by
        segment (row by row) from this process's ``segment_sq``, the others' each
        process's in turn; the ``carried`` matrices' column sums and row factors' sums
        from this process's row factors (``rows``) and ``block_sq`` (per block of rows),
        and the heads' column sums, which go on from the sums that the process before
        carries."""
        widths = [1 + 2 * columns for columns, *_ in self.carried]
        offsets = np.concatenate([[0], np.cumsum(widths, dtype=np.int64)]) + self.tensors

        def fold(before):
            carry = before.copy()
            carry[:self.tensors] += param_sq
            carry[self.folded] = _continued(before[:self.tensors], self.folded,
                                            segment_sq[self.folded_segments],
                                            self.segment_tensor[self.folded_segments])
            head_sq = np.zeros(self.head_size)
            for (columns, *_, pieces), at in zip(self.carried, offsets):
                for continued, out_start, _ in pieces:
                    if continued:  # the sums of the block so far, carried
                        head_sq[out_start:out_start + columns] = \
                            carry[at + 1 + columns:at + 1 + 2 * columns]
            if self.heads.count:
                head_sq = work.backend.column_sums(
                    work.tensors, work.prep, self.heads, self.head_table,
                    work.backend.constant(head_sq), work.formats.get("g"))
            for (columns, _, _, row_range, pieces), at in zip(self.carried, offsets):
                carry[at] = _carried(carry[at], rows[slice(*row_range)])
                total = carry[at + 1:at + 1 + columns]
                partial = carry[at + 1 + columns:at + 1 + 2 * columns]
                for continued, out_start, ends in pieces:
                    sums = (head_sq if continued else block_sq)[out_start:out_start + columns]
                    if ends:  # added as one process adds its blocks (_added)
                        total += sums
                        partial[:] = 0.0
                    else:
                        partial[:] = sums
            return carry

        carry = work.in_row_order(np.zeros(offsets[-1]), fold)
        column_sq, batch_sums = column_sq.copy(), batch_sums.copy()
        for (columns, first, batch, *_), at in zip(self.carried, offsets):
            if batch >= 0:
                batch_sums[batch] = carry[at]
            column_sq[first:first + columns] = carry[at + 1:at + 1 + columns]
        return carry[:self.tensors], column_sq, batch_sums

    def carry_update(self, work, row_sq, vector_sq, update_sq):
        """The whole tensors' ``update_sq`` (sums of U²), carried as
        :meth:`carry_sums` carries ``param_sq``: the ``folded`` tensors' added row by
        row from this process's ``row_sq`` (or element by element from ``vector_sq``)."""
        def fold(before):
            carry = before + update_sq
            carry[self.folded] = _continued(
                before, self.folded,
                np.concatenate([row_sq[self.folded_rows], vector_sq[self.folded_vectors]]),
                np.concatenate([self.row_tensor[self.folded_rows],
                                self.vector_tensor[self.folded_vectors]]))
            return carry

        return work.in_row_order(np.zeros(self.tensors), fold)

    @classmethod
    def of(cls, work):
        row_base, col_base, var_base = (work.state_starts(name)
                                        for name in ("row_var", "col_var", "variance"))
        segments, row_slots, row_lengths, row_batch, batch_rows = [], [], [], [], []
        column_slots, column_lengths, blocks, block_table, block_columns = [], [], [], [], []
        split, carried, heads, head_table = [], [], [], []
        folded, folded_segments, folded_rows, folded_vectors = [], [], [], []
        whole_vectors = []
        split_rows = np.zeros(len(work.shapes), np.int64) if work.split_rows is None \
            else work.split_rows
        for index, shape in enumerate(work.shapes):
            size = math.prod(shape)
            whole_rows = int(split_rows[index]) or (shape[-2] if len(shape) >= 2 else 0)
            # Whether its sums follow its rows (a vector's elements) from process to
            # process; for a matrix whose rows are split, its column sums too, from
            # its first row here (else it holds whole matrices).
            folds = work.in_row_order is not None and work.first_rows[index] >= 0
            carries = folds and bool(split_rows[index])
            held_from = int(work.first_rows[index]) if carries else 0
            # A vector of at most a chunk is summed element by element, wherever it is
            # cut (a longer one from each piece's first element, as the other passes).
            by_element = folds and len(shape) == 1 and work.sizes[index] <= SEGMENT_CHUNK
            if folds and (len(shape) >= 2 or by_element):
                folded.append(index)
                if len(shape) >= 2:
                    count = size // shape[-1] if size else 0
                    folded_rows += range(len(row_slots), len(row_slots) + count)
                else:
                    count, vectors = size, len(segments) - len(row_slots)
                    folded_vectors += range(vectors, vectors + count)
                folded_segments += range(len(segments), len(segments) + count)
            if split_rows[index]:
                batch = len(batch_rows) if size else -1
                if carries:
                    pieces = []
                    rows_here = shape[0] if size else 0
                    carried.append((shape[-1], len(column_slots), batch,
                                    (len(row_slots), len(row_slots) + rows_here), pieces))
                else:
                    split.append((shape[-1], len(column_slots), batch))
                if not size:  # no rows here, but the column factor that every rank moves
                    column_slots += range(col_base[index], col_base[index] + shape[-1])
                    column_lengths += [whole_rows] * shape[-1]
            if size and len(shape) >= 2:
                rows, columns = shape[-2], shape[-1]
                for batch in range(size // (rows * columns)):
                    first_row = batch * rows
                    row_slots += range(row_base[index] + first_row,
                                       row_base[index] + first_row + rows)
                    row_lengths += [columns] * rows
                    row_batch += [len(batch_rows)] * rows
                    batch_rows.append(whole_rows)
                    matrix = first_row * columns  # in the tensor
                    columns_at = col_base[index] + batch * columns
                    # (tensor, offset, size, state start, factored)
                    segments += [(index, matrix + r * columns, columns, columns_at, True)
                                 for r in range(rows)]
                    # Blocks of the rows (where they are carried, of the whole matrix's,
                    # of which this process holds rows held_from ...: a block may begin
                    # on the process before).
                    block_rows = max(-(-SEGMENT_CHUNK // columns),
                                     -(-(whole_rows if carries else rows) // ROW_BLOCKS))
                    row, end = held_from, held_from + rows
                    while row < end:
                        stop = min((row // block_rows + 1) * block_rows, end)
                        count, continued = stop - row, row % block_rows != 0
                        place = (index, matrix + (row - held_from) * columns, count * columns)
                        if continued:
                            head_start = sum(table[1] for table in head_table)
                            pieces.append((True, head_start, None))
                            heads.append(place)
                            head_table.append((count, columns, head_start, 1))
                        else:
                            if carries:
                                pieces.append((False, len(block_columns), None))
                            blocks.append(place)
                            block_table.append((count, columns, len(block_columns), 0))
                            block_columns += range(len(column_slots),
                                                   len(column_slots) + columns)
                        if carries:  # whether its block ends here, or goes on
                            pieces[-1] = pieces[-1][:2] + (
                                stop % block_rows == 0 or stop == whole_rows,)
                        row = stop
                    column_slots += range(columns_at, columns_at + columns)
                    column_lengths += [whole_rows] * columns
            elif size:
                whole_vectors.append((index, 0, size, var_base[index], False))
                segments += ([(index, e, 1, var_base[index] + e, False) for e in range(size)]
                             if by_element else whole_vectors[-1:])
        backend, ints = work.backend, dict(dtype=np.int64)
        tensor, offsets, sizes, second, factored = np.array(segments, np.int64).reshape(-1, 5).T
        factored = factored.astype(bool)

        # The rows of a matrix share its column factor, but not their random bits: each
        # element draws at its place among the parameters, as in every other pass.
        draws = work.segments.draws[tensor] + offsets

        def kind(pick):
            return backend.segments(sizes[pick], second[pick], tensor[pick], offsets[pick],
                                    draws[pick])

        vector, _, vector_sizes, vector_second, _ = np.array(  # rows the device can take
            whole_vectors, np.int64).reshape(-1, 5).T.copy()

        block_tensor, block_offsets, block_sizes = np.array(blocks, np.int64).reshape(-1, 3).T
        head_tensor, head_offsets, head_sizes = np.array(heads, np.int64).reshape(-1, 3).T
        return cls(
            segments=backend.segments(sizes, np.zeros_like(sizes), tensor, offsets),
            rows=kind(factored),
            vectors=kind(~factored),
            whole_vectors=backend.segments(vector_sizes, vector_second, vector,
                                           np.zeros_like(vector), work.segments.draws[vector]),
            tensors=len(work.shapes),
            sizes=np.maximum(np.asarray(work.sizes, np.float64), 1),  # of whole tensors
            segment_tensor=tensor,
            row_tensor=tensor[factored],
            vector_tensor=tensor[~factored],
            row_segments=np.flatnonzero(factored),
            row_slots=np.array(row_slots, **ints),
            row_lengths=np.array(row_lengths, np.float64),
            row_batch=np.array(row_batch, **ints),
            batches=len(batch_rows),
            batch_rows=np.array(batch_rows, np.float64),
            column_slots=np.array(column_slots, **ints),
            column_lengths=np.array(column_lengths, np.float64),
            blocks=backend.segments(block_sizes, np.zeros_like(block_sizes), block_tensor,
                                    block_offsets),
            block_table=backend.constant(np.array(block_table, np.int64).reshape(-1, 4)),
            block_sums=backend.zeros64(len(block_columns)),
            block_columns=np.array(block_columns, **ints),
            split=split,
            folded=np.array(folded, **ints),
            folded_segments=np.array(folded_segments, **ints),
            folded_rows=np.array(folded_rows, **ints),
            folded_vectors=np.array(folded_vectors, **ints),
            carried=carried,
            heads=backend.segments(head_sizes, np.zeros_like(head_sizes), head_tensor,
                                   head_offsets),
            head_table=backend.constant(np.array(head_table, np.int64).reshape(-1, 4)),
            head_size=sum(columns for _, columns, _, _ in head_table),
        )


def _added(index, values, length):
    """The sums of ``values`` by ``index`` (np.bincount's, in float64 also where
    ``index`` is empty)."""
    return np.bincount(index, values, length).astype(np.float64, copy=False)


def _continued(start, tensors, values, of):
    """``start[tensors]`` plus each of ``values`` (of the tensors ``of``) in turn, in
    float64, as :func:`_added` adds them."""
    return _added(np.concatenate([tensors, of]), np.concatenate([start[tensors], values]),
                  len(start))[tensors]


def _carried(start, values):
    """``start`` plus each of ``values`` in turn, in float64, as :func:`_added` adds."""
    return np.add.accumulate(np.concatenate([[start], values]))[-1]
