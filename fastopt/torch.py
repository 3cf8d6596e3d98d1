"""Drop-in torch.optim optimizers backed by fastopt's fused kernels.

Switching is a one-line change::

    opt = torch.optim.Adam(model.parameters(), lr=1e-3)    # before
    opt = fastopt.torch.Adam(model.parameters(), lr=1e-3)  # after

Each class is a real :class:`torch.optim.Optimizer` that takes its torch.optim namesake's
arguments (plus fastopt's own options) and gives its numbers.

**The model's tensors stay the model's.** A step reads every parameter and gradient where
it lies and writes the parameter in place, as torch.optim does (counting the write in
its autograd version, as torch's in-place update does): fastopt holds no copy of them
and never replaces their storage. On the CPU every algorithm steps the tensors
where they lie: each pass (one for most algorithms; two to four for ``caution``,
LAMB, LARS and Adafactor, whose per-tensor norms and factors come from the same kernels
as in the NumPy API) is one kernel per run of parameters that share a group and a step
count, over a table of (address, length) segments. Adafactor where a parameter does not
lie in C order (it reads rows and columns), and every algorithm on CUDA for now, step a
scratch copy of the run's parameters and gradients and copy the parameters back (two
more passes over them).

The state (``exp_avg`` ...) is fastopt's: flat buffers per device, of which
``opt.state[p]`` holds views in ``p``'s shape and memory layout. A state tensor that
you replace (``opt.state[p]["exp_avg"] = torch.zeros_like(p)``) is taken in at the next
step, and ``state_dict()`` saves what the kernels use. Entries of your own under other
names (a wrapper's slow weights, a counter) stay yours, as in torch.optim.
``state_dict()`` and ``load_state_dict()`` use torch's layout and key names, so
checkpoints move both ways between fastopt.torch and torch.optim; a checkpoint that does
not fit the parameters (another number of groups or parameters, state of another size)
is refused with a ValueError before anything changes.

**Nothing is trusted from one step to the next.** A parameter whose storage or shape
changed since the last step (``p.data = t``, ``model.to(...)``, ``share_memory()``,
``vector_to_parameters``, FSDP and ZeroRedundancyOptimizer re-pointing parameters at
buckets), or that came into a group, is checked again and stepped where it now lies,
with its state, as torch would step it; one that fastopt cannot step (another dtype,
a layout with gaps) gets an error that names it, and nothing changes. The check reads
each parameter's address and shape at every step; a new dtype or layout comes with new
storage, except for views of the same memory (``p.data = p.data.t()`` on a square
matrix), which a step does not notice.

What a parameter must be: float32, bfloat16 or float16, on the CPU or a CUDA device,
and dense (contiguous, channels_last, transposed or any other layout without
gaps or overlaps; a gradient in another layout than its parameter is copied for the
step), each in memory of its own (not two Parameters made of one tensor). One
optimizer may mix dtypes (bfloat16 weights, float32 norms): each dtype has its stores.
A 16-bit parameter keeps float32 master weights in its state entry ``"master"``
(``master_weights="auto"``; None steps it directly), from which every
step writes it rounded to nearest even; a parameter written since the last step
(``model.load_state_dict``) no longer holds its master rounded, and steps from the
written value. Master weights put in place (``opt.state[p]["master"] = t``) are taken
in at the next step, and the parameter with them, rounded (a write into the master
tensor itself would be taken for a write into the parameter, which wins). With
``master_weights="remainder"`` (bfloat16), ``"master"`` holds only the low 16 bits of
the float32 master weights, as int16 bits, and the parameter is the master rounded
with ties away from zero (see :class:`fastopt.Optimizer`); ``state_dict()`` holds the
float32 master weights they stand for.
``state_dtype="bfloat16"`` (or a dict by state name) keeps the state in 16 bits, and
``state_dtype="int8"`` keeps moving averages in 8 bits as the NumPy API
does: ``opt.state[p]["exp_avg"]`` holds ``p``'s uint8 codes (in ``p``'s layout on the
CPU, in C order on CUDA, which steps a C-order copy of ``p``; blocks of 256 elements in
that layout's memory order) and ``"exp_avg_absmax"`` their scales, or, for a
parameter of fewer than 4096 elements, float32 values. ``state_dict()`` saves the codes
as ``"exp_avg_codes"``, which torch.optim does not read as numbers, and
:meth:`Optimizer.decoded_state_dict` gives torch.optim's state.
``state_dict()`` holds the state in the dtypes fastopt keeps it in, with the master
weights; torch.optim loads it (casting, and keeping ``"master"`` unused), and
``load_state_dict()`` takes torch.optim's, encoding its state (the master weights then
start from the parameters). As in torch, a parameter
whose ``.grad`` is None is left untouched, and the step count, bias corrections and
NAdam's momentum product are kept per parameter. Hyperparameters are read from
``param_groups`` at every step, so every torch.optim.lr_scheduler works, and so does
torch.amp.GradScaler. ``torch.compile`` leaves the step to run eagerly (a graph break).

Differences from torch.optim: ``foreach`` and ``fused`` are accepted and ignored (every
step is fused); ``capturable`` and ``differentiable`` must stay False; ``lr`` is a
number or a one-element tensor, as in torch, not a fastopt schedule (use a
torch.optim.lr_scheduler). NumPy scalars among the hyperparameters are taken as the
Python numbers they hold.

**DTensor parameters** (FSDP2's ``fully_shard``, tensor parallelism): each rank steps
its local shard of every parameter in place, and the state is DTensors sharded as the
parameters, whose local tensors are this rank's parts of the stores (so that
``torch.distributed.checkpoint`` saves and reshards it). Sums over whole tensors (the
gradient norm of ``clip_grad_norm`` and ``skip_nonfinite``, LAMB's and LARS's norms,
SWATS's projections, the Cautious mask's share) are summed over the ranks that hold
the shards, the same on every rank, which must step the same parameters: in float64,
by chunks that begin at every row of a tensor split along its first dimension over
one mesh dimension (as FSDP2 splits), whose sums every rank gathers and adds in the
order of the rows, so that they do not depend on the number of ranks, bit for bit.
Rows shorter than 128 elements of a tensor of more than 16384 (a long vector), and
tensors split otherwise, are summed from each shard's first element, and their sums
move with the cuts by a float64 rounding. 8-bit state quantizes each rank's
shard in blocks from its first element (one process's blocks where the cuts fall on
them); its codes are DTensors sharded as the parameters, and ``state_dict()`` holds
their decoded values instead (codes and scales of one rank's blocks would not
reshard), which a load encodes again. Adafactor adds the column sums of a matrix whose
rows the ranks share (FSDP2's Shard(0)) over them, carrying them (and its other sums
over tensors split along their first dimension) down the rows from rank to rank, so
that they do not depend on the cuts: its row factors are sharded as the rows, its
column factors replicated; other shardings of a tensor's last two dimensions are
refused for it. On the CPU each state DTensor's local tensor has a storage of its
own over the store's memory, so that ``torch.save(opt.state_dict())`` and
``copy.deepcopy`` take it; on CUDA they are views into one buffer, which torch does
not pickle: save with DCP there.

**ZeRO sharding** (``process_group=``, plain contiguous parameters): the parameters of
each store, one after the other, are cut into equal partitions (``sharding.Partition``),
and each rank steps its elements only, each parameter's a flat view of it, with their
state; the step reduce-scatters the gradients first (``reduce_grads``) and all-gathers
the parameters after. The cuts fall between the chunks by which the kernels sum a
tensor, whose sums every rank gathers, so that sums over whole tensors (clipping,
LAMB ...) are one process's, bit for bit; 8-bit state is quantized on the blocks one
process uses; Adafactor's partitions cut between tensors (its factors need whole
matrices). ``state_dict()`` is the rank's partition and
:meth:`Optimizer.consolidated_state_dict` the whole state; ``fastopt.save(opt, path)``
(:meth:`Optimizer.save`) writes every rank's partition, which :meth:`Optimizer.load`
takes on any number of ranks (:mod:`fastopt.torch_checkpoint`). ``zero_stage=2``
reduces the gradients during backward instead, bucket by bucket from
post-accumulate-grad hooks, into this rank's share, and drops each parameter's
``.grad`` once it is sent: ``p.grad`` is None after backward, and the step reads the
share. Micro-batches add up in the share
until a step; the first backward after a step starts afresh (``model.zero_grad()`` or
``opt.zero_grad()`` between steps, as usual).
"""

import collections
import contextlib
import functools
import inspect
import math
import numbers

import numba
import numpy as np
import torch
import torch.distributed as dist

from . import precision, sharding, torch_checkpoint
from ._backend import GRAD_SQUARES, CudaBackend, HostBackend, Tensors
from .kernels._template import SEGMENT_CHUNK
from .kernels.codecs import BLOCK
from .optim import engine
from .optim.checks import check_flag, plain
from .optim.optimizer import Optimizer as _Flat
from .optim.optimizer import _snapshot
from .optim.spec import ALGORITHMS, define_init
from .precision import ABSMAX, CODES, SMALL, STRIDES

__all__ = list(ALGORITHMS)  # one class per algorithm of the registry, built at the end

# Per-parameter numbers that torch keeps as tensors. mu_product is saved in float64, which
# fastopt computes it in (torch casts it to float32 when it loads it); ASGD's eta and mu
# are float32 in torch too.
_TORCH_SCALARS = {"step": torch.float32, "mu_product": torch.float64, "eta": torch.float32,
                  "mu": torch.float32}
# Arguments of torch.optim's classes that choose among its implementations, not the
# numbers: fastopt has one, and takes any value. capturable=True (CUDA graphs, which do
# not capture fastopt's step) is refused by the constructor, but taken in a group, where
# torch.compile sets it for CUDA parameters and so torch.optim's checkpoints carry it.
_IMPLEMENTATIONS = ("foreach", "fused")
_IMPLEMENTATIONS_IN_GROUPS = _IMPLEMENTATIONS + ("capturable",)
# fastopt's options of the whole optimizer, which a group of its own cannot change.
_WHOLE_OPTIMIZER = {"clip_grad_norm", "clip_grad_value", "skip_nonfinite", "master_weights",
                    "state_dtype", "stochastic_rounding", "seed", "process_group",
                    "reduce_grads", "zero_stage", "bucket_cap_mb"}
# What the optimizer builds for itself, and rebuilds after a copy or an unpickling.
_RUNTIME = ("_stores", "_slots", "_group_slots", "_checked", "_seen", "_remainders")
# The state entry that holds a 16-bit parameter's float32 master weights.
MASTER = "master"
_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
_TORCH_DTYPES = {name: dtype for dtype, name in _DTYPES.items()}


class Optimizer(torch.optim.Optimizer):
    """The base of the drop-in classes: the fastopt algorithm ``algorithm`` stepping the
    parameters in place, with its state in flat buffers per device.

    fastopt's options: ``clip_grad_norm``, ``clip_grad_value`` and ``skip_nonfinite``
    (see :class:`fastopt.Optimizer`), validated whenever they are set; the norm is
    taken over the parameters that have a gradient, as
    torch.nn.utils.clip_grad_norm_ takes it. ``master_weights``, ``state_dtype``,
    ``stochastic_rounding`` and ``seed`` choose the storage formats, as in
    :class:`fastopt.Optimizer`: the master weights of a 16-bit parameter are its state
    entry ``"master"`` (float32, or the int16 low halves of them with
    ``master_weights="remainder"``), which ``state_dict()`` saves as float32. Stochastic
    rounding indexes each element by its place in memory among the parameters of its
    device and dtype (a stream each; so a parameter laid out anew, ``p.data =
    p.data.t().contiguous().t()``, draws other bits from then on), and each step by its
    count: ``SGD``, whose state has no ``"step"`` in torch, keeps one when it
    rounds stochastically.

    ``process_group`` (a ``torch.distributed`` group, every rank passing the same
    parameters) shards the state over its ranks, ZeRO stage 1 (see the module's doc),
    whose collectives move ``bucket_cap_mb`` megabytes of each rank's share at a time;
    ``reduce_grads=False`` takes the gradients as already averaged over the group.
    ``zero_stage=2`` reduces the gradients during backward instead, in buckets of
    ``bucket_cap_mb`` megabytes, and drops each parameter's ``.grad`` once it is sent,
    so that a rank holds only its share of the gradients
    (``sharding.BucketReducer``).
    """

    algorithm = None  # the fastopt class whose math this optimizer runs
    _torch_counts_steps = True  # torch keeps state["step"] (SGD does not)
    _torch_defaults = {}  # the arguments that are torch's alone, with torch's defaults
    _torch_signature = {}  # every argument of torch's namesake, with torch's defaults

    def __init__(self, params, defaults, torch_options, *, clip_grad_norm=None,
                 clip_grad_value=None, skip_nonfinite=False, master_weights="auto",
                 state_dtype="float32", stochastic_rounding=False, seed=0,
                 process_group=None, reduce_grads=True, zero_stage=1, bucket_cap_mb=25):
        for name, value in torch_options.items():
            # An argument that is torch's alone must keep torch's default, but for
            # those that choose among torch's implementations.
            if name not in _IMPLEMENTATIONS and value != self._torch_defaults[name]:
                raise ValueError(f"fastopt.torch.{type(self).__name__} does not support "
                                 f"{name}={value!r}")
        self._stores = None
        self._remainders = {}  # loaded for float32 master weights, by parameter
        self._formats = (master_weights, state_dtype, stochastic_rounding, seed)
        for dtype in (torch.float32, torch.bfloat16):  # the options, checked (float16's later)
            self._storage_of(dtype)
        check_flag("reduce_grads", reduce_grads)
        if process_group is not None and not (torch.distributed.is_available()
                                              and torch.distributed.is_initialized()):
            raise ValueError("process_group needs torch.distributed initialized "
                             "(torch.distributed.init_process_group)")
        self._group, self.reduce_grads = process_group, reduce_grads
        self._bucket_size = _check_zero_stage(zero_stage, bucket_cap_mb, process_group)
        self._zero_stage = zero_stage
        super().__init__(params, {**defaults, **torch_options})
        self.state = _State(self.state)
        self.clip_grad_norm = clip_grad_norm
        self.clip_grad_value = clip_grad_value
        self.skip_nonfinite = skip_nonfinite
        self.last_grad_norm = None
        self.skipped_steps = 0
        if process_group is not None:
            sharding.check_same_parameters(process_group, self._all_params(),
                                           self._collective_options())
        self._relayout()
        if stochastic_rounding and self.rounding_seed is None:
            raise ValueError(precision.NOTHING_TO_ROUND)

    @property
    def rounding_seed(self):
        """The seed that stochastic rounding draws from; None where nothing is rounded
        stochastically."""
        _, _, _, seed = self._formats  # (an np.integer too, which JSON does not write)
        return int(seed) if any(store.storage.stochastic for store in self._stores) else None

    @property
    def counts_steps(self):
        """Whether ``state[p]["step"]`` counts the steps: as torch's does, and also in SGD
        where stochastic rounding draws each step's bits by its count."""
        _, _, stochastic_rounding, _ = self._formats
        return self._torch_counts_steps or stochastic_rounding

    # The options are checked whenever they are set, as in fastopt.Optimizer.
    clip_grad_norm = _Flat.clip_grad_norm
    clip_grad_value = _Flat.clip_grad_value
    skip_nonfinite = _Flat.skip_nonfinite

    def add_param_group(self, param_group):
        """Add a group, as torch does. With ``process_group``, every rank adds the same
        group, before the first step (the partition moves)."""
        super().add_param_group(param_group)
        index = len(self.param_groups) - 1
        try:
            self._validate(index, self.param_groups[index])
            if self._stores is not None:
                if self._group is not None:
                    if any(map(self._has_state, self.state)):
                        raise ValueError("add_param_group with process_group: add every "
                                         "group before the first step")
                    sharding.check_same_parameters(self._group, self._all_params(),
                                                   self._collective_options())
                self._relayout()  # checks everything before it changes anything
        except (TypeError, ValueError):
            self.param_groups.pop()
            raise

    def __getstate__(self):
        if self._group is not None:
            raise TypeError("an optimizer with a process_group is bound to its processes: "
                            "save it with fastopt.save (or its state_dict()) instead")
        state = {k: v for k, v in super().__getstate__().items() if k not in _RUNTIME}
        return {**state, "fastopt_options": self._options()}

    def __setstate__(self, state):
        options = state.pop("fastopt_options", None)
        super().__setstate__(state)
        self.state = _State(self.state)  # torch's load_state_dict comes through here
        for group in self.param_groups:  # a torch checkpoint lacks fastopt's own options
            group.update(self._completed(group))
        if options is not None:  # unpickled or deep-copied: rebuild what is not pickled
            self._formats = ("auto", "float32", False, 0)  # unless pickled with them
            # A sharded one is not pickled.
            self._group, self.reduce_grads, self._zero_stage = None, True, 1
            self._stores, self._remainders = None, {}
            self.__dict__.update(options)
            self._relayout()

    def _numbers(self):
        """The names of the per-parameter numbers in this optimizer's state (the step
        count, NAdam's ``mu_product``, ASGD's ``eta`` and ``mu``), which torch keeps as
        tensors; others of those names are the user's."""
        return (({"step"} if self.counts_steps else set())
                | (_TORCH_SCALARS.keys() & self.algorithm.spec.host.keys()))

    def _has_state(self, p):
        """Whether ``p``'s state holds this optimizer's buffers or numbers (the user's
        own entries are whole tensors, on every rank)."""
        numbers = self._numbers()
        return any(_is_buffer(self.algorithm, name) or name in numbers
                   for name in self.state.get(p, ()))

    def _completed(self, group):
        """A loaded group with what it lacks: fastopt's own options as this optimizer
        has them; torch's (a checkpoint of an older torch's, without ``nesterov``)
        torch's defaults, as torch.optim's ``__setstate__`` fills them in."""
        return {**self.defaults, **self._torch_signature, **group}

    def _collective_options(self):
        """What every rank of a process_group must choose alike: what decides the
        collectives (the clipping and the skip sum the gradients over the ranks), and
        the numbers of every rank's share."""
        formats = tuple(sorted(f.items()) if isinstance(f, dict) else f for f in self._formats)
        return (type(self).__name__, self._zero_stage, self._bucket_size, self.reduce_grads,
                formats,  # a dict of state dtypes in any order
                self.clip_grad_norm, self.clip_grad_value, self.skip_nonfinite,
                [sorted(_hyperparameters(group, self.algorithm).items())
                 for group in self.param_groups])

    def _options(self):
        return {"_clip_grad_norm": self.clip_grad_norm,
                "_clip_grad_value": self.clip_grad_value,
                "_skip_nonfinite": self.skip_nonfinite, "last_grad_norm": self.last_grad_norm,
                "skipped_steps": self.skipped_steps, "_formats": self._formats}

    def _storage_of(self, dtype):
        """The :class:`fastopt.precision.Storage` of this optimizer's parameters of the
        torch ``dtype`` (``master_weights="float32"`` or ``"remainder"`` asks it of the
        16-bit ones)."""
        master_weights, state_dtype, stochastic_rounding, seed = self._formats
        if master_weights in ("float32", "remainder") and dtype == torch.float32:
            master_weights = None
        storage = precision.Storage(self.algorithm, self.algorithm.state_names(),
                                    precision.DTYPES[_DTYPES[dtype]], master_weights,
                                    state_dtype, None, stochastic_rounding, seed)
        return storage

    def _validate(self, index, group):
        seen = {}
        for p, label in _labels(index, group):
            _check_parameter(p, label)
            if id(p) in seen:  # torch warns, and steps it twice
                raise ValueError(f"{label} is {seen[id(p)]} again: a parameter is stepped "
                                 "once a step (torch.optim deprecates duplicates)")
            seen[id(p)] = label
        for name, default in self._torch_defaults.items():
            if name not in _IMPLEMENTATIONS_IN_GROUPS and group.get(name, default) != default:
                raise ValueError(f"fastopt.torch.{type(self).__name__} does not support "
                                 f"{name}={group[name]!r} (in param_groups[{index}])")
        whole = sorted(_WHOLE_OPTIMIZER & group.keys())
        if whole:
            raise ValueError(f"{', '.join(whole)} in param_groups[{index}]: options of the "
                             "whole optimizer, given to its constructor, not per group (a "
                             "wrapper that puts its keyword arguments in every group, as "
                             "torch's ZeroRedundancyOptimizer does, takes them bound: "
                             f"functools.partial(fastopt.torch.{type(self).__name__}, "
                             f"{whole[0]}=...))")
        for dtype in {p.dtype for p in group["params"]}:  # the options, for each dtype
            refused = precision.refused_in_8_bits(group, self._storage_of(dtype).quantized)
            if refused:
                raise ValueError(f"{refused} (in param_groups[{index}])")
        if callable(group["lr"]):
            raise TypeError(f"param_groups[{index}]['lr'] must be a number: schedule it with "
                            "a torch.optim.lr_scheduler")
        try:
            self.algorithm.spec.validate(_hyperparameters(group, self.algorithm))
        except (TypeError, ValueError) as error:
            raise type(error)(f"{error} (in param_groups[{index}])") from None

    def _check_sharded(self, members, names, reduction):
        """Refuse what fastopt.torch cannot step on this rank's shards of DTensors (summed
        over the process groups ``reduction``): factored state (Adafactor's) of a tensor
        sharded along its last two dimensions, but for a matrix's rows (FSDP2's
        Shard(0)), whose column sums it adds over the ranks (``process_group``'s
        partitions cut between tensors for it); and stochastic rounding of shards that
        cannot draw their bits where one process would (``_Store.draws``): but by rows
        over one mesh dimension, and with 8-bit state, whose blocks draw by their
        state's place, which on each rank begins at 0."""
        if self._group is not None:
            return
        storage = self._storage_of(members[0].dtype)
        for p in members if storage.stochastic else ():
            dims = _shard_dims(p)
            if dims and (storage.quantized or dims != {0} or len(reduction) != 1):
                raise ValueError(f"{names[p]} is a DTensor split along dimensions "
                                 f"{sorted(dims)} over {len(reduction)} mesh dimensions: "
                                 "stochastic rounding steps shards split by rows over one "
                                 "(FSDP2's Shard(0)), without 8-bit state "
                                 "(state_dtype='int8'); round to nearest "
                                 "(stochastic_rounding=False) or keep float32 master weights")
        if not self.algorithm.spec.factored:
            return
        for p in members:
            dims = [placement.dim % p.dim() for placement in p.placements
                    if placement.is_shard()]
            if p.dim() >= 2 and not _split_rows(p) and any(d >= p.dim() - 2 for d in dims):
                raise TypeError(f"{names[p]} is a DTensor sharded along dimension "
                                f"{max(dims)} of {p.dim()}, and {type(self).__name__} factors "
                                "the last two; fastopt.torch adds its factors over the ranks "
                                "only for a matrix sharded by rows (FSDP2's Shard(0)) or a "
                                "tensor sharded along a leading dimension")

    def _check_cuts_kept(self, stores, names):
        """With process_group: refuse new stores that would cut a parameter with state
        otherwise across the ranks than the old ones did (a parameter before it in its
        store changed size, or came or went): each rank holds the state of its old piece.
        Every rank sees every rank's cuts, so that all refuse together."""
        old = _cuts(self._stores)
        for p, cuts in _cuts(stores).items():
            if self._has_state(p) and p in old and cuts != old[p]:
                raise ValueError(
                    f"{names[p]} would be cut otherwise across the process_group's ranks, "
                    "whose state holds its old pieces: a parameter changed size, or came "
                    "or went, after the first step. Change parameters before the first "
                    "step, or load consolidated_state_dict() into an optimizer of the new "
                    "ones")

    def _partition(self, members):
        """The ``sharding.Partition`` of a store of ``members`` under ``process_group``,
        else None."""
        if self._group is None:
            return None
        return sharding.Partition([p.numel() for p in members],
                                  torch.distributed.get_rank(self._group),
                                  torch.distributed.get_world_size(self._group),
                                  whole=self.algorithm.spec.factored)

    def _all_params(self):
        return [p for group in self.param_groups for p in group["params"]]

    def _name(self, p):
        return next(label for index, group in enumerate(self.param_groups)
                    for q, label in _labels(index, group) if q is p)

    # -- the state stores ---------------------------------------------------------------

    def _relayout(self):
        """Build the state stores for the parameters as they are now, one per device and
        dtype, and move every existing state tensor into them. Checks everything before it
        changes anything."""
        names = {p: label for index, group in enumerate(self.param_groups)
                 for p, label in _labels(index, group)}
        for p, name in names.items():
            _check_parameter(p, name)
            if self._group is not None and (_is_dtensor(p) or not p.is_contiguous()):
                raise ValueError(f"{name} is {'a DTensor' if _is_dtensor(p) else 'not contiguous'}"
                                 ": process_group partitions plain contiguous tensors (FSDP2's "
                                 "DTensors are sharded already: leave process_group=None)")
        _check_apart(names)
        kinds = {}
        for p in names:
            reduction = _reduction(p) if self._group is None else (self._group,)
            kinds.setdefault((p.device, p.dtype, reduction), []).append(p)
        for (device, dtype, reduction), members in kinds.items():
            if reduction is not None:
                self._check_sharded(members, names, reduction)
        kept = {_signature(members) for members in kinds.values()}
        if any(store.reducer and store.reducer.pending() and store.signature not in kept
               for store in self._stores or ()):
            raise ValueError("zero_stage=2: a parameter changed size, dtype or device, or came "
                             "or went, after backward reduced the gradients into the "
                             "partition it cut; change parameters before backward")
        # Stochastic rounding's random bits: a stream per device and dtype, each element
        # drawing by its place among the whole tensors of its kind, so that one process
        # and FSDP2 draw alike where it shards some of them (the others plain).
        streams, places, counted = {}, {}, collections.Counter()
        for p in names:
            places[p] = counted[p.device, p.dtype]
            counted[p.device, p.dtype] += p.numel()
        stores = [_Store(self.algorithm, members, _on_host(device) and (
                      not _shaped(self.algorithm) or all(p.is_contiguous() for p in members)),
                         self._storage_of(dtype), streams.setdefault((device, dtype), len(streams)),
                         reduction, self._partition(members), places)
                  for (device, dtype, reduction), members in kinds.items()]
        if self._group is not None and self._stores is not None:
            self._check_cuts_kept(stores, names)
        # The master weights of a parameter no longer 16-bit (model.float()) are dropped,
        # after it takes their values (_resumed_from_masters).
        resumed = self._resumed_from_masters(stores)
        dropped = [(store, p) for store in stores for p in store.slots
                   if MASTER in self.state.get(p, {}) and not store.master]
        moves = [(store, p, name, value) for store in stores for p in store.slots
                 for name, value in _in_order(_relaid(store, store.slots[p].local,
                                                       self.state.get(p, {})))
                 if isinstance(value, torch.Tensor) and _is_buffer(self.algorithm, name)
                 and (name != MASTER or store.master)]
        views = [store.view(name, p) for store, p, name, _ in moves]
        for (store, p, name, value), view in zip(moves, views):
            _check_state(names[p], name, value, view, _castable(store, name, p), like=p)
        for _, p in dropped:
            del self.state[p][MASTER]
        ours = {id(view) for store in self._stores or () for slot in store.slots.values()
                for view in slot.views.values()}
        for store, p, name, value in moves:
            self.state[p].update(_kept_objects(self.state[p], store.put(name, p, value),
                                               store.slots[p], ours))
        with torch.no_grad():
            for p, local, master, values in resumed:
                self._remainders.pop(p, None)  # rebuilt, from the bits p had
                kept = self.state[p].get(MASTER)
                if kept is not None and kept.dtype == torch.float32:  # float16 now
                    _local(kept).copy_(master)
                local.copy_(values)
        for store in stores:
            if store.partition is not None:
                store.window = max(1, self._bucket_size // store.itemsize)
        if self._zero_stage == 2:  # the hooks follow the stores
            before = {store.signature: store.reducer for store in self._stores or ()}
            for store in stores:
                store.reducer = sharding.BucketReducer(
                    list(store.slots), store.partition, self._group, self.reduce_grads,
                    store.window, _check_gradient)
                if store.signature in before:  # the same partition: its gradients
                    store.reducer.take_over(before[store.signature])
            for reducer in before.values():
                reducer.close()
        self._stores = stores
        self._slots = {p: (store, slot) for store in stores for p, slot in store.slots.items()}
        self._group_slots = [[(p, *self._slots[p]) for p in group["params"]]
                             for group in self.param_groups]
        self._checked = {}  # group index -> the hyperparameters last validated
        self._seen = None  # which state mapping, and which version of it, slots refer to

    def _resumed_from_masters(self, stores):
        """``(p, local, master, values)`` for each parameter whose dtype changed
        (``model.float()``, ``model.half()``) since its master weights were kept: their
        float32 values ``master``, and the ``values`` that p's tensor ``local`` takes to go
        on from them as a step would: them rounded to its new dtype (in float32, exactly)
        where it holds what they were rounded to, and what was written into it since
        elsewhere. (Master weights of another shape than p's are left to the checks.)"""
        before = {p: store for store in self._stores or () for p in store.slots}
        resumed = []
        for store in stores:
            for p, slot in store.slots.items():
                master, local = self.state.get(p, {}).get(MASTER), slot.local
                was = p in before and _TORCH_DTYPES.get(before[p].storage.formats.get("p"))
                if (master is None or was in (None, False, local.dtype)
                        or tuple(_local(master).shape) != tuple(local.shape)):
                    continue
                # Remainders, kept or loaded (and not yet rebuilt: _remainders), stand for
                # the master weights with the bits p had: its values in its old dtype
                # (p.data = p.data.float() keeps them exactly).
                remainders = self._remainders.get(p, master if master.dtype == torch.int16
                                                  else None)
                if remainders is not None:
                    master = _rebuilt_master(local.to(was), remainders).view(
                        local.shape).to(local.device)
                    written = local.to(was).to(local.dtype) != local
                else:
                    master = _local(master)
                    written = master.to(was).to(local.dtype) != local
                resumed.append((p, local, master,
                                torch.where(written, local, master.to(local.dtype))))
        return resumed

    # -- the step -------------------------------------------------------------------------

    @torch._disable_dynamo
    @torch.no_grad()
    def step(self, closure=None, *, grad_scale=None, skip_nonfinite=None):
        """One step of every parameter that has a gradient. ``closure`` re-evaluates the
        loss as in torch; ``grad_scale`` divides the gradients by a loss scale;
        ``skip_nonfinite`` overrides the option for this step."""
        if skip_nonfinite is None:
            skip_nonfinite = self.skip_nonfinite
        check_flag("skip_nonfinite", skip_nonfinite)
        _start_kernel_threads()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # What the call and the groups ask is checked before anything changes.
        inverse_scale = engine.inverse_loss_scale(grad_scale)
        hypers = [self._checked_hyperparameters(index, group)
                  for index, group in enumerate(self.param_groups)]
        if self._moved():
            self._relayout()
        self._states()
        if self._group is not None:  # each rank its partition of the averaged gradients
            for store in self._stores:
                with store.active():
                    store.take_partition_gradients(self._group, self.reduce_grads)
        for store in self._stores:
            store.forget_stale_runs()
        plans = [self._plan(index, hyper) for index, hyper in enumerate(hypers)]
        runs = [run for _, group_runs in plans for run in group_runs]
        for run in runs:
            with run.store.active():
                run.take_gradients()
        summing = skip_nonfinite or self.clip_grad_norm is not None
        for run in runs:  # the tables of sums over DTensors: checked before any step
            store = run.store
            if store.reduction is not None and store.partition is None and (
                    summing or store.sums_tensors(self.algorithm, run.h)):
                store.table(run, summing=True)
            if store.carries_rows(self.algorithm):
                store.first_rows(run)
        coefficient = engine.clip_or_skip(self, skip_nonfinite, inverse_scale,
                                          lambda: self._sum_squares(runs))
        if coefficient is None:
            self._gradients_used()
            return loss
        for hyper, group_runs in plans:
            prep = engine.prep(self.algorithm, hyper, inverse_scale, coefficient,
                               self.clip_grad_value)
            for joint in _together(group_runs):
                self._apply(hyper, joint, prep)
        self._gradients_used()
        # The kernels wrote through views that autograd does not see: a graph that saved
        # a parameter before this step must fail at its backward, as torch.optim's does.
        torch.autograd.graph.increment_version([p for run in runs for p in run.params])
        if self._group is not None:  # every rank its parameters from the others' steps
            for store in self._stores:
                with store.active():
                    store.gather_parameters(self._group)
        return loss

    def _gradients_used(self):
        """With ``zero_stage=2``: a step has used (or skipped) the reduced gradients,
        which a step that failed before it would take again."""
        for store in self._stores if self._zero_stage == 2 else ():
            store.reducer.used()

    def zero_grad(self, set_to_none=True):
        """As torch's; with ``zero_stage=2``, also the reduced gradients."""
        super().zero_grad(set_to_none)
        for store in self._stores or ():
            if store.reducer is not None:
                store.reducer.clear()

    def _sum_squares(self, runs):
        """The gradients' sum of squares, over every rank's shards of DTensor parameters
        or process_group partitions (a plain tensor of no partition counts as a whole on
        each rank), the same number on every rank, which so takes the same decision to
        skip. The stores' tables give the whole tensors' sums (``_Store.table``): a
        partition's as one process's, FSDP2's the same on any number of ranks. Only
        where ZeRO partitions whole tensors does each rank add its own, and the parts
        are gathered and added in rank order."""
        parts = collections.defaultdict(list)
        for run in runs:
            with run.store.active():
                parts[run.store.gathers].append(run.sum_squares())
        total = math.fsum(parts.pop(None, ()))
        # Every rank joins the same collectives in the same order: its runs' tables of
        # sums (it steps the same parameters), then over each store's groups.
        for reduction in dict.fromkeys(store.gathers for store in self._stores):
            if reduction is not None:
                part = math.fsum(parts.get(reduction, ()))
                total += sharding.over_ranks(reduction, [part])[0]
        return total

    def _moved(self):
        """Whether a parameter came or went, or its storage, shape, dtype or layout
        changed, since the stores were built. (A new dtype or layout often comes with
        other storage, but the allocator may hand back the same address: ``lin.float();
        lin.half()``.)"""
        if len(self.param_groups) != len(self._group_slots):
            return True
        for group, slots in zip(self.param_groups, self._group_slots):
            params = group["params"]
            if len(params) != len(slots):
                return True
            for p, (q, _, slot) in zip(params, slots):
                if p is not q:
                    return True
                local = p.to_local() if slot.sharded else p
                if (local.data_ptr(), local.shape, local.dtype, local.stride()) != slot.origin:
                    return True
        return False

    def _states(self):
        """Point every slot at its parameter's dict in ``self.state``, again whenever a
        dict there was replaced (``opt.state[p] = {}``, a load)."""
        state = self.state
        if not isinstance(state, _State):
            state = self.state = _State(state)
        if self._seen != (id(state), state.version):
            for store in self._stores:
                for p, slot in store.slots.items():
                    mine = state.get(p)
                    if mine is None:  # not stepped, or still stateless, or removed
                        if slot.attached:
                            slot.state, slot.attached = None, False
                        continue
                    if type(mine) is not _ParamState:  # a load's
                        mine = state[p] = _ParamState(mine)
                    slot.state, slot.attached = mine, True
            self._seen = (id(state), state.version)

    def _checked_hyperparameters(self, index, group):
        """The group's hyperparameters, validated where they or the options that
        :meth:`_validate` refuses in a group (torch's ``differentiable`` ..., fastopt's
        options of the whole optimizer) changed since last checked."""
        hyper = _hyperparameters(group, self.algorithm)
        refusable = {name: group[name] for name in group.keys() & _refusable(type(self))}
        snapshot = _snapshot({**hyper, **refusable})
        if snapshot != self._checked.get(index):
            self._validate(index, group)
            self._checked[index] = snapshot
        return hyper

    def _plan(self, index, hyper):
        """``(hyper, runs)``: the runs of group ``index``, with replaced state tensors
        taken in."""
        runs, run = [], None
        for p, store, slot in self._group_slots[index]:
            # Under process_group, this rank's elements of it, reduced.
            grad = p.grad if slot.piece is None else store.partition_gradients[slot.index]
            if grad is None:
                run = None
                continue
            if slot.sharded:
                grad = self._local_gradient(p, grad)
            state = slot.state
            if state is None:  # joins opt.state once it holds something, as in torch
                state = slot.state = _ParamState()
            if state.changes or slot.key is None:  # changed from outside, or a new store
                self._take_in_state(p, store, slot, state)
            key = slot.key
            if run is not None and (run.key is key or run.key == key) and \
                    run.stop == slot.start:
                run.add(p, slot, grad)
            else:
                run = _Run(key, store, p, slot, grad)
                runs.append(run)
        for run in runs:
            self._fold(index, hyper, run)
        return hyper, runs

    def _local_gradient(self, p, grad):
        """This rank's shard of the gradient of the DTensor ``p``, which must be sharded
        as ``p`` is."""
        if not _is_dtensor(grad) or grad.placements != p.placements or \
                grad.device_mesh != p.device_mesh:
            raise TypeError(f"the gradient of {self._name(p)} is "
                            f"{getattr(grad, 'placements', 'not a DTensor')}, where the "
                            f"parameter is a DTensor of {p.placements}: fastopt.torch steps "
                            "each rank's shard with the same shard of the gradient")
        return grad.to_local()

    def _fold(self, index, hyper, run):
        """The run's step number, host state, buffers and float32 scalars, refused where
        a scalar overflows float32 (naming the hyperparameters), before anything is
        written."""
        _, step, host_values, _ = run.key
        algorithm = self.algorithm
        run.step, run.host = step + 1, dict(zip(algorithm.spec.host, host_values))
        run.spec = algorithm.buffers(hyper, run.host)
        run.fresh = [name for name in run.spec if name not in run.slots[0].state]
        run.h = engine.fold(algorithm, hyper, run.step, run.fresh, run.host, index)
        if algorithm.spec.host:
            engine.check_host_after(algorithm, hyper, run.step, run.host, index)

    def _take_in_state(self, p, store, slot, state):
        """Copy state tensors that replaced the store's views (or came before them) into
        the store, and put the views in their place, so that the kernels and
        ``state_dict()`` see the same numbers; and read the step count and host state
        again. A buffer set to None (torch's SGD's momentum_buffer before its first step)
        begins afresh, as in torch."""
        for name in self._numbers() & state.keys():
            number = _check_number(name, state[name], lambda: self._name(p))
            # As a Python number, as torch reads one: a float32 tensor's arithmetic would
            # round the bias corrections (a tensor step of Adam's at beta2 0.99999 erred
            # 40x torch's error), and a step above 2**24 would stand still.
            dict.__setitem__(state, name, int(number) if name == "step" else float(number))
        for name in [name for name in self.algorithm.state_names()
                     if name in state and state[name] is None]:
            dict.__delitem__(state, name)
        if any(_is_buffer(self.algorithm, name) and (name == STRIDES or name.endswith(CODES))
               for name in state):
            # A state of state_dict() put in place (torch's ZeroRedundancyOptimizer loads
            # so): its codes taken as load_state_dict takes them (decoded where they lie
            # otherwise than the store keeps them).
            unpacked = _relaid(store, slot.local, self._unpacked(self._name(p), state))
            for name in state.keys() - unpacked.keys():
                dict.__delitem__(state, name)
            dict.update(state, unpacked)
        remainder = self._remainders.pop(p, None)
        if remainder is not None:  # loaded: its master rebuilt from p's bits as they are now
            dict.update(state, store.put(MASTER, p, remainder))
        replaced = [(name, value, store.view(name, p)) for name, value in _in_order(state)
                    if value is not slot.views.get(name) and _is_buffer(self.algorithm, name)]
        for name, value, view in replaced:  # all checked before the first is copied
            _check_state(self._name(p), name, value, view, _castable(store, name, p), like=p)
        for name, value, _ in replaced:
            dict.update(state, store.put(name, p, value))
            if name == MASTER and value.is_floating_point():
                # The parameter becomes the new master weights rounded, as every step
                # leaves it: else the step would take it for one written since.
                with torch.no_grad():
                    slot.local.copy_(_local(state[MASTER]).view(slot.local.shape))
        host = self.algorithm.spec.host  # the values of parameters not yet stepped
        slot.key = (store, state.get("step", 0),
                    tuple(state.get(name, value) for name, value in host.items()),
                    tuple(name in state for name in store.names))
        state.changes = 0

    def _apply(self, hyper, runs, prep):
        """Step ``runs``, which step together (see :func:`_together`), and write the step
        count and host state after them into their parameters' state, where ``_plan``
        reads them as the slots' keys."""
        first = runs[0]
        with first.store.active():
            for run in runs:
                run.store.begin_state(run, run.spec, run.fresh)
            works = [run.store.work(self.algorithm, hyper, prep, run) for run in runs]
            host = self.algorithm.update_runs(works, hyper, first.step, first.h, first.host)
            for run in runs:
                run.store.copy_back(run)
        counted = {"step": first.step} if self.counts_steps else {}
        for run in runs:
            store = run.store
            head = (store, counted.get("step", run.key[1]),
                    tuple(host[name] for name in run.host))
            keys = {}  # one per set of begun buffers: Adafactor's matrices and vectors differ
            for p, slot in zip(run.params, run.slots):
                dict.update(slot.state, counted, **host)
                if not slot.attached and slot.state:
                    self.state[p] = slot.state
                    slot.attached = True
                if store.shaped or not keys:
                    begun = tuple(name in slot.state for name in store.names)
                slot.key = keys.setdefault(begun, head + (begun,))

    # -- checkpoints in torch's layout ------------------------------------------------

    def state_dict(self):
        """torch's layout: ``state`` by parameter index with torch's key names (``step``
        and NAdam's ``mu_product`` as tensors), and ``param_groups``.

        8-bit state is saved as it is kept: ``"<name>_codes"`` (uint8, in the
        parameter's shape, laid out as ``opt.state[p]`` holds them: as the parameter on
        the CPU, in C order on CUDA), ``"<name>_absmax"`` (float32, one per block of 256
        codes in memory order) and ``"codes_strides"`` (the codes' strides, which define
        that order; a load into a parameter whose codes lie otherwise decodes them and
        encodes the values again). torch.optim does not know these
        names: its Adam and the like fail at their step (KeyError) rather than read
        codes as numbers, and its SGD starts its momentum afresh.
        :meth:`decoded_state_dict` gives torch.optim's state. For a DTensor parameter,
        8-bit state is saved decoded (float32 values sharded as the parameter), which
        ``torch.distributed.checkpoint`` reshards and a load encodes again: each block's
        scale the smallest that holds its values in the map's range, which gives back
        the codes (and, but for a float32 step, the scales) of the same blocks.

        ``"master"`` holds float32 master weights, also where the optimizer keeps
        remainders (``master_weights="remainder"``): the weights they stand for, rebuilt
        from the parameters' bits now. A load takes them into either kind exactly (but,
        into remainders, at the ties, where float32's parameters were rounded to even),
        and takes remainders (int16) too. Remainders are no numbers: a
        ``torch.distributed.checkpoint`` load into float32 master weights would cast
        them as numbers, and NCCL and gloo do not gather int16 (a full state dict).

        With ``process_group``, this rank's partition: each state tensor holds this
        rank's elements of its parameter (flat), named ``"<name>@rank<r>of<n>"``, so that
        only the same rank of as many loads it (torch.distributed.checkpoint, which
        would take same-named tensors of all ranks for copies, then saves every rank's
        and reloads them on as many ranks); :meth:`consolidated_state_dict` gives the
        whole state.

        torch's layout has no place for the seed of stochastic rounding: an optimizer
        that loads it rounds from the seed it was built with (:meth:`save` records the
        seed, and :meth:`load` refuses another).

        Its post-hooks (``register_state_dict_post_hook``) see, and may replace, this
        state_dict, as torch.optim's see theirs."""
        packed = self._packed()
        if self._group is not None:
            suffix = self._rank_suffix()
            packed["state"] = {index: {(name + suffix if _is_buffer(self.algorithm, name)
                                        and isinstance(value, torch.Tensor) and value.dim()
                                        else name): value
                                       for name, value in state.items()}
                               for index, state in packed["state"].items()}
        for hook in self._optimizer_state_dict_post_hooks.values():
            packed = _or(hook(self, packed), packed)
        return packed

    def _rank_suffix(self):
        return (f"@rank{torch.distributed.get_rank(self._group)}"
                f"of{torch.distributed.get_world_size(self._group)}")

    def _packed(self):
        """torch's state_dict() in fastopt's names (see :meth:`state_dict`), without its
        post-hooks, which :meth:`state_dict` calls on its own."""
        with _hooks_held(self, "_optimizer_state_dict_post_hooks"):
            packed = super().state_dict()
        # torch packs the live per-parameter dicts; convert copies of them.
        packed["state"] = {index: dict(state) for index, state in packed["state"].items()}
        params, numbers = self._all_params(), self._numbers()
        averages = self.algorithm.spec.averages  # what 8-bit state may keep
        for index, state in packed["state"].items():
            p = params[index]
            for name in numbers:
                if isinstance(state.get(name), (int, float)):
                    # float32, as torch's step, while that holds it exactly (to 2**24)
                    dtype = _TORCH_SCALARS[name] if state[name] <= 2 ** 24 else torch.float64
                    state[name] = torch.tensor(float(state[name]), dtype=dtype)
            if MASTER in state:
                state[MASTER] = _master_weights(p, self._stepped(p), state[MASTER])
            for name in [n for n in averages if n in state and n + ABSMAX in state]:
                if state[name].is_floating_point():  # values put in, which a step encodes
                    del state[name + ABSMAX]  # (and so does a load)
                    continue
                if _is_dtensor(p):  # blocks of this rank's shard: values, sharded as p
                    state[name] = _decoded(state[name], state.pop(name + ABSMAX),
                                           averages[name])
                    continue
                state[STRIDES] = torch.tensor(state[name].stride(), dtype=torch.int64)
                state[name + CODES] = state.pop(name)
        return packed

    def consolidated_state_dict(self, to=0):
        """With ``process_group``: the whole state in torch.optim's format (each state
        tensor in its parameter's shape), gathered from every rank's partition, on rank
        ``to`` of the group; None on the others. Every rank calls it at once, and sends
        its elements to rank ``to`` alone (but the 8-bit scales, 1/256 of the codes, which
        every rank gathers). torch.optim loads it, and so does fastopt.torch with a
        process_group of any size (each rank takes its elements) or none. To save
        without the whole state on one rank, see :meth:`save`."""
        if self._group is None:
            raise ValueError("consolidated_state_dict() is for an optimizer with a "
                             "process_group; state_dict() holds the whole state")
        world = torch.distributed.get_world_size(self._group)
        if not isinstance(to, numbers.Integral) or isinstance(to, bool):
            raise TypeError(f"to must be a rank (an int), got {to!r}")
        if not 0 <= to < world:
            raise ValueError(f"to must be a rank of the process_group, 0 to {world - 1}, "
                             f"got {to}")
        packed = self._packed()
        index = {p: i for i, p in enumerate(self._all_params())}
        mine = torch.distributed.get_rank(self._group) == to
        for store in self._stores:
            if store.partition.whole:  # each tensor's state lies whole on one rank
                self._gather_held(store, packed["state"], index, to)
                continue
            for name in store.names:
                wholes = store.gather_elements(store.flat(name), self._group, to)
                if name in store.quantized:  # codes, their blocks' scales, small ones' values
                    scales = store.gather_scales(name, self._group)
                    small = store.gather_elements(store.small_values(name), self._group, to)
                if not mine:
                    continue
                for i, p in enumerate(store.slots):
                    state = packed["state"].get(index[p], {})
                    if name + CODES in state:
                        state[name + CODES] = wholes[i].view(p.shape)
                        state[name + ABSMAX] = scales[i]
                        state[STRIDES] = torch.tensor(p.stride(), dtype=torch.int64)
                    elif name in state:
                        state[name] = (small if name in store.quantized else wholes)[i].view(
                            p.shape)
        if not mine:
            return None
        for p, i in index.items():  # the remainders gathered: the weights they stand for
            state = packed["state"].get(i, {})
            if MASTER in state:
                state[MASTER] = _master_weights(p, p, state[MASTER])
        return packed

    def save(self, path):
        """Write this optimizer's state to the folder ``path``, atomically: one file per
        rank and an index, which any number of ranks, or one process, loads
        (:meth:`load`) and continues bit for bit (``fastopt.save(opt, path)`` does the
        same; see :mod:`fastopt.torch_checkpoint`). With ``process_group``, every rank
        calls it at once, and an error on one is raised on all. Not for DTensor
        parameters (FSDP2): save those with torch.distributed.checkpoint."""
        torch_checkpoint.save(self, path, self._checkpoint_pieces("save")[0])

    def load(self, path):
        """Load the state that :meth:`save` wrote to the folder ``path``, by ranks of any
        number or one process: this rank's elements of it, from the files that hold
        them. A checkpoint of another algorithm or of other parameters raises a
        ValueError, and nothing changes."""
        torch_checkpoint.load(self, path, *self._checkpoint_pieces("load")[1:],
                              lambda name: not _is_buffer(self.algorithm, name))

    def _checkpoint_pieces(self, verb):
        """For :mod:`fastopt.torch_checkpoint`, per parameter: the elements ``(first,
        last)`` of it, in C order, of which each rank's state_dict() holds the state;
        this rank's, and the shape in which its state_dict() holds them."""
        if any(_is_dtensor(p) for p in self._all_params()):
            raise ValueError(f"fastopt.save and opt.load cannot {verb} the state of DTensor "
                             "parameters (FSDP2): use torch.distributed.checkpoint (DCP), "
                             "which reshards it")
        params = self._all_params()
        if self._group is None:
            return ([[(0, p.numel())] for p in params], [(0, p.numel()) for p in params],
                    [p.shape for p in params])
        cuts = _cuts(self._stores)
        slots = [self._slots[p][1] for p in params]
        return ([list(cuts[p]) for p in params], [slot.piece for slot in slots],
                [slot.shape for slot in slots])

    def _gather_held(self, store, state, index, to):
        """Into ``state`` (on rank ``to``): the state tensors of the parameters of
        ``store`` from the ranks that hold them whole."""
        held = {index[p]: {name: value.detach().cpu() for name, value in self.state[p].items()
                           if isinstance(value, torch.Tensor)
                           and _is_buffer(self.algorithm, name)}
                for p, slot in store.slots.items() if slot.piece == (0, p.numel()) and p.numel()}
        dist, group = torch.distributed, self._group
        mine = dist.get_rank(group) == to
        gathered = [None] * dist.get_world_size(group) if mine else None
        dist.gather_object(held, gathered, dst=dist.get_global_rank(group, to), group=group)
        for part in gathered or ():
            for i, values in part.items():
                state.setdefault(i, {}).update(values)

    def decoded_state_dict(self, to=0):
        """:meth:`state_dict` with the 8-bit state decoded into float32 values (each
        code's map value times its block's absmax, the numbers the kernels step from),
        in torch.optim's format: torch.optim loads it, and so does fastopt.torch with
        any ``state_dtype`` (encoding it again). With ``process_group``, the whole
        state, as :meth:`consolidated_state_dict` gathers it: every rank calls it, and
        rank ``to`` receives it (None on the others). The post-hooks of
        :meth:`state_dict` run on the state_dict it decodes without ``process_group``;
        with one, as on :meth:`consolidated_state_dict`'s, they do not (they are for
        each rank's partition)."""
        packed = self.state_dict() if self._group is None else self.consolidated_state_dict(to)
        if packed is None:
            return None
        params = self._all_params()
        for index, state in packed["state"].items():
            quantized = self._storage_of(params[index].dtype).quantized
            state.pop(STRIDES, None)  # the live codes have them
            for name, fmt in quantized.items():
                if name + CODES in state:
                    state[name] = _decoded(state.pop(name + CODES), state.pop(name + ABSMAX),
                                           fmt)
        return packed

    def load_state_dict(self, state_dict):
        """Load a state_dict of this class or of its torch.optim namesake. One that does
        not fit (another number of groups or of parameters in a group, a state tensor of
        another shape than the parameter's, state for no parameter of the groups, a step
        count that no step leaves, or hyperparameters that the constructor refuses) raises
        a ValueError (a TypeError for what is no number), and nothing changes.

        Its pre-hooks (``register_load_state_dict_pre_hook``) may replace the state_dict
        before anything is read of it, and its post-hooks run once the state is in
        place, as in torch.optim.

        8-bit state comes as codes (``"<name>_codes"``, ``"<name>_absmax"``) or as values
        (``"<name>"``, encoded on load). Where a parameter's state holds both, the
        checkpoint's are taken: fastopt never writes both, and
        ``torch.distributed.checkpoint``'s ``set_optimizer_state_dict(...,
        full_state_dict=True)`` puts a checkpoint's values beside the optimizer's own
        codes, or, for FSDP2's parameters (whose state_dict holds values), a plain
        model's codes beside the optimizer's own values: those are DTensors, the codes
        not."""
        state_dict = dict(state_dict)  # which the pre-hooks may change, as in torch
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            state_dict = _or(hook(self, state_dict), state_dict)
        with _hooks_held(self, "_optimizer_load_state_dict_pre_hooks",
                         "_optimizer_load_state_dict_post_hooks"):
            self._load_state_dict(state_dict)
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    def _load_state_dict(self, state_dict):
        if self._group is None and any("@rank" in str(name) for state in
                                       state_dict["state"].values() for name in state):
            raise ValueError("loaded state dict is one rank's partition of an optimizer with "
                             "a process_group (its state names '<name>@rank<r>of<n>'): load "
                             "that optimizer's consolidated_state_dict(), or the folder its "
                             "save() wrote (opt.load), into one without")
        own = self._group is not None and self._own_partition(state_dict)
        if own:  # its names without this rank's suffix, before the codes' are read
            state_dict = own
        state_dict = {**state_dict, "state": {index: self._unpacked(index, state)
                                              for index, state in state_dict["state"].items()}}
        if self._group is not None and not own:
            state_dict = self._partitioned(state_dict)
        self._check_loadable(state_dict)
        # torch casts every loaded tensor to the parameter's dtype; read the per-parameter
        # numbers before it does, so that a float64 mu_product stays exact.
        scalars = {index: {name: state[name].item() for name in self._numbers()
                           if isinstance(state.get(name), torch.Tensor)}
                   for index, state in state_dict["state"].items()}
        # It casts the state of a 16-bit parameter to 16 bits too: keep the originals,
        # which go to the dtypes the stores keep (float32 master weights ...).
        tensors = {index: {name: value for name, value in state.items()
                           if isinstance(value, torch.Tensor)
                           and _is_buffer(self.algorithm, name)}
                   for index, state in state_dict["state"].items()}
        params = self._loaded_params(state_dict)
        for index, values in tensors.items():  # converted before anything changes
            if MASTER in values:
                values[MASTER] = self._loaded_master(params[index], values[MASTER])
        super().load_state_dict(state_dict)
        self._remainders = {}
        for index, values in scalars.items():
            for name, value in values.items():
                self.state[params[index]][name] = int(value) if name == "step" else value
        for index, values in tensors.items():
            p = params[index]
            for name, value in values.items():
                dtype = self._state_dtype_of(name, p)
                if dtype == torch.uint8 and value.is_floating_point():
                    dtype = torch.float32  # values, which the step encodes
                if name == MASTER and value.dtype == torch.int16:
                    dtype = torch.int16  # remainders, rebuilt now and at the next step
                    if not self._storage_of(p.dtype).remainder:
                        self._remainders[p] = value.to(device=p.device)
                self.state[p][name] = value.to(device=p.device, dtype=dtype)
        self._relayout()

    def _loaded_params(self, state_dict):
        """Which parameter each saved one is, as torch pairs them: by their places in
        the groups (the ids are indices in a state_dict(), names in DCP's)."""
        return dict(zip((saved for group in state_dict["param_groups"]
                         for saved in group["params"]), self._all_params()))

    def _own_partition(self, state_dict):
        """A loaded state_dict of this rank's partition (:meth:`state_dict` of the same
        rank of as many) with its names as without a process_group; None for a whole
        one. Another rank's, or another number's, raises a ValueError."""
        suffix = self._rank_suffix()
        ranked = {name[name.index("@rank"):] for state in state_dict["state"].values()
                  for name in state if "@rank" in str(name)}
        if not ranked:
            return None
        if ranked != {suffix}:
            raise ValueError(f"loaded state dict holds the partitions {sorted(ranked)} "
                             f"(state names '<name>@rank<r>of<n>'), not this rank's "
                             f"{suffix!r}: load the whole state "
                             "(consolidated_state_dict()), or a folder that fastopt.save "
                             "wrote (opt.load), into another partition")
        return {**state_dict, "state": {
            index: {torch_checkpoint.unranked(name, suffix): value
                    for name, value in state.items()}
            for index, state in state_dict["state"].items()}}

    def _partitioned(self, state_dict):
        """A whole loaded state_dict (:meth:`consolidated_state_dict`, torch.optim's, one
        saved without a process_group) cut to this rank's elements."""
        params = self._loaded_params(state_dict)
        state = {}
        for key, values in state_dict["state"].items():
            p = params.get(key)
            if p is None:  # no parameter's: _check_loadable says so
                state[key] = values
                continue
            store, slot = self._slots[p]
            first, last = slot.piece
            state[key] = cut = {}
            for name, value in _relaid(store, p, values).items():  # codes in p's order
                if not isinstance(value, torch.Tensor) or not _is_buffer(self.algorithm, name):
                    cut[name] = value
                elif store.partition.whole and first == last:
                    continue  # a tensor that another rank holds whole
                elif value.shape == p.shape:
                    cut[name] = value.reshape(-1)[first:last].view(slot.shape)
                elif name.endswith(ABSMAX) and name[:-len(ABSMAX)] in values:
                    cut[name] = value[slice(*precision.blocks_of(first, last))]
                else:
                    cut[name] = value  # Adafactor's factors, of a tensor this rank holds
        return {**state_dict, "state": state}

    def _unpacked(self, index, state):
        """A loaded parameter's state (``state_dict["state"][index]``) with its 8-bit
        codes (``"<name>_codes"``) under the name of their buffer where this optimizer
        keeps it in 8 bits, decoded into float32 values where it does not."""
        quantized = self._storage_of(torch.float32).quantized
        averages = self.algorithm.spec.averages
        state = dict(state)
        strides = state.pop(STRIDES, None)
        for key in [key for key in state if _is_buffer(self.algorithm, key)
                    and key.endswith(CODES)]:
            name = key[:-len(CODES)]
            codes, absmax = state.pop(key), state.get(name + ABSMAX)
            # Values beside the codes: see load_state_dict. Sharded values beside a plain
            # model's (whole) codes are the template's that DCP loads a full state into.
            beside = state.get(name)
            into_shards = _is_dtensor(beside) and not _is_dtensor(codes)
            if beside is not None and not into_shards:
                state.pop(name + ABSMAX, None)
                continue
            for label, value in ((key, codes), (name + ABSMAX, absmax)):
                if value is not None and not isinstance(value, torch.Tensor):
                    raise TypeError(f"loaded state dict has {label!r} for parameter "
                                    f"{index!r} of {_kind(value)}, not a tensor")
            if absmax is not None and not absmax.is_floating_point():
                raise TypeError(f"loaded state dict has {name + ABSMAX!r} of {absmax.dtype} "
                                f"for parameter {index!r}: the 8-bit codes' block scales "
                                "are real floats (float32)")
            if getattr(codes, "dtype", None) != torch.uint8 or absmax is None or (
                    absmax.shape != (-(-codes.numel() // BLOCK),)):
                raise ValueError(
                    f"loaded state dict has {key!r} of {getattr(codes, 'dtype', codes)} "
                    f"{tuple(getattr(codes, 'shape', ()))} with "
                    f"{name + ABSMAX!r} of {getattr(absmax, 'shape', None)}: 8-bit codes are "
                    "uint8 with a float32 absmax per 256 of them (a torch.optim load casts "
                    f"them to floats), of a moving average of {self.algorithm.__name__} "
                    f"({', '.join(averages) or 'it has none'})")
            if bool((absmax < 0).any()):  # which would flip the signs of a block's values
                raise ValueError(f"loaded state dict has negative block scales in "
                                 f"{name + ABSMAX!r}; a block's absmax is >= 0 (or NaN)")
            if strides is not None:  # laid out as they were kept: see STRIDES
                if not (isinstance(strides, torch.Tensor) and _is_integer(strides.dtype)):
                    raise TypeError(f"loaded state dict has {STRIDES!r} for parameter "
                                    f"{index!r} of {_kind(strides)}: the strides of its "
                                    "8-bit codes, as an integer tensor")
                if strides.shape != (codes.dim(),) or not _is_dense(torch.empty_strided(
                        codes.shape, tuple(strides.tolist()), device="meta")):
                    raise ValueError(f"loaded state dict has {STRIDES!r} "
                                     f"{strides.tolist()}, which are no dense layout of "
                                     f"{key!r}, of shape {tuple(codes.shape)}")
                codes = torch.empty_strided(codes.shape, tuple(strides.tolist()),
                                            dtype=torch.uint8).copy_(codes)
            if into_shards:  # this rank's shard of their values, which a step encodes
                from torch.distributed.tensor import Replicate

                decoded = _decoded(codes, state.pop(name + ABSMAX), averages[name])
                mesh = beside.device_mesh  # every rank holds them whole: cut, not sent
                state[name] = type(beside).from_local(
                    decoded.to(beside.device), mesh, [Replicate()] * mesh.ndim,
                    run_check=False).redistribute(mesh, beside.placements)
            elif name in quantized:
                state[name] = codes
            else:
                state[name] = _decoded(codes, state.pop(name + ABSMAX), averages[name])
        return state

    def _check_loadable(self, state_dict):
        """torch's checks of the groups, and the state tensors' shapes, which torch leaves
        to fail at the next step."""
        groups = state_dict["param_groups"]
        if len(groups) != len(self.param_groups):
            raise ValueError("loaded state dict has a different number of parameter groups")
        where = {}
        for index, (ours, theirs) in enumerate(zip(self.param_groups, groups)):
            if len(ours["params"]) != len(theirs["params"]):
                raise ValueError("loaded state dict contains a parameter group that doesn't "
                                 "match the size of optimizer's group")
            # as __setstate__ completes a torch checkpoint's groups with fastopt's options
            group = {**self._completed(theirs), "params": ours["params"]}
            self._validate(index, group)
            for (p, label), saved in zip(_labels(index, ours), theirs["params"]):
                where[saved] = (p, label, group)
        numbers = self._numbers()
        for saved, state in state_dict["state"].items():
            if saved not in where:
                raise ValueError(f"loaded state dict has state for {saved!r}, which none of "
                                 f"its param_groups holds")
            p, name, group = where[saved]
            for key, value in state.items():
                if key in numbers:
                    _check_number(key, value, lambda: name)
                elif key in _other_buffers(self.algorithm):
                    raise ValueError(f"loaded state dict has {key!r} for {name}, a buffer "
                                     f"of another algorithm's, not of "
                                     f"{self.algorithm.__name__}'s (a checkpoint of "
                                     "another optimizer?)")
                elif value is not None and _is_buffer(self.algorithm, key):
                    _check_state(name, key, value, self._state_shape(key, p), loading=True,
                                 like=p)
                    if key == MASTER and value.dtype == torch.int16 and \
                            p.dtype != torch.bfloat16:
                        raise ValueError(f"loaded state dict has {MASTER!r} of int16 for "
                                         f"{name}: remainders are the low halves of the "
                                         f"master weights of bfloat16 parameters, not of "
                                         f"{p.dtype}")
                    if key == MASTER and value.dtype not in (torch.float32, torch.int16):
                        raise ValueError(f"loaded state dict has {MASTER!r} of {value.dtype} "
                                         f"for {name}: master weights are float32 (or int16 "
                                         "remainders), and are not cast: they are the exact "
                                         "weights")
                    if value.dtype == torch.uint8 and not (
                            self._state_dtype_of(key, p) == torch.uint8 and key + ABSMAX in state):
                        raise ValueError(f"loaded state dict has {key!r} of uint8 for {name}: "
                                         "8-bit codes come as '<name>_codes' with "
                                         "'<name>_absmax'")
            self._check_complete(state, p, name, _hyperparameters(group, self.algorithm))

    def _check_complete(self, state, p, name, hyper):
        """Refuse the loaded ``state`` of a stepped parameter ``p`` without the numbers
        and buffers its next step reads, which torch.optim fails at that step without
        (a KeyError), and fastopt would begin afresh."""
        step = _number(state.get("step", 0))
        if not (isinstance(step, numbers.Number) and step > 0 and self._stepped(p).numel()):
            return
        algorithm = self.algorithm
        missing = [key for key in algorithm.spec.host if key not in state]
        if not missing:
            host = {key: state[key] for key in algorithm.spec.host}
            missing = [key for key in algorithm.buffers(hyper, host)
                       if key not in algorithm.begun_afresh and key not in state
                       and key + CODES not in state
                       and self._state_shape(key, p) is not None]
        if missing:
            raise ValueError(
                f"loaded state dict has state for {name} at step {step:g} without "
                f"{missing}, which its next step reads. (torch.distributed.checkpoint "
                "loads only the keys that the resuming optimizer's own state_dict() "
                "holds: one whose options need fewer, or that has not reached that "
                "phase, such as a SWATS before its switch.)")

    def _loaded_master(self, p, value):
        """Loaded master weights of ``p`` in the kind its store keeps: float32 ones turn
        into remainders (their low halves, as int16 bits); remainders stay as they are,
        and the store rebuilds float32 ones from ``p``'s bits (``_Store.put``): now, and
        again at the next step, from the bits it has then (``_remainders``), since the
        model's weights may be loaded after the optimizer's."""
        storage = self._storage_of(p.dtype)
        remainder = storage.remainder
        if remainder == (value.dtype == torch.int16) or p.dtype != torch.bfloat16:
            return value
        shape = self._state_shape(MASTER, p)
        if value.dtype not in (torch.float32, torch.int16) or value.shape != shape:
            raise ValueError(f"loaded state dict has {MASTER!r} of {value.dtype} "
                             f"{tuple(value.shape)} for {self._name(p)}, whose master weights "
                             f"are {_kept_dtype(storage, MASTER)} {tuple(shape)}")
        value = _local(value).detach().cpu()  # sharded as p: checked
        return _like(p, _low_halves(value) if remainder else value)  # remainders: see above

    def _state_dtype_of(self, name, p):
        """The torch dtype in which the state tensor ``name`` of ``p`` is kept."""
        storage = self._storage_of(p.dtype)
        if name.endswith(ABSMAX) and name[:-len(ABSMAX)] in storage.quantized:
            return torch.float32
        if name in storage.quantized and p.numel() < precision.MIN_QUANTIZED_SIZE:
            return torch.float32
        return _kept_dtype(storage, name)

    def _stepped(self, p):
        """The elements of ``p`` that this rank steps, and its state goes with: its part
        in the process_group's partition, or its local tensor (a DTensor's shard)."""
        return _local(p) if self._group is None else self._slots[p][1].local

    def _state_shape(self, name, p):
        """The shape of the state tensor ``name`` of ``p``, or None if it has none (of
        this rank's elements of ``p`` where a process_group partitions it)."""
        storage = self._storage_of(p.dtype)
        stepped = p.shape if self._group is None else self._slots[p][1].shape
        if name == MASTER:
            return stepped if storage.master else None
        if name.endswith(ABSMAX) and name[:-len(ABSMAX)] in storage.quantized:
            blocks = -(-math.prod(stepped) // BLOCK)
            return None if p.numel() < precision.MIN_QUANTIZED_SIZE else torch.Size([blocks])
        shape = self.algorithm.state_shape(name, tuple(stepped))
        return None if shape is None else torch.Size(shape)


def _cuts(stores):
    """Per parameter of ``stores``: the elements of it that each rank of its store's
    partition steps (each rank's pieces found once, for all the parameters)."""
    cuts = {}
    for store in stores:
        partition = store.partition
        by_rank = [partition.pieces_of(rank) for rank in range(partition.world)]
        cuts.update(zip(store.slots, zip(*by_rank)))
    return cuts


def _signature(params):
    """What a store's partition depends on: its parameters, their sizes and order."""
    return tuple((id(p), p.numel()) for p in params)


def _check_zero_stage(zero_stage, bucket_cap_mb, process_group):
    """The bytes of a bucket: zero_stage=2's, and the window of stage 1's collectives."""
    if zero_stage not in (1, 2) or isinstance(zero_stage, bool):
        raise ValueError(f"zero_stage must be 1 or 2, got {zero_stage!r}")
    if isinstance(bucket_cap_mb, bool) or not isinstance(bucket_cap_mb, (int, float)):
        raise TypeError(f"bucket_cap_mb must be a number, got {type(bucket_cap_mb).__name__}")
    if not bucket_cap_mb > 0 or not math.isfinite(bucket_cap_mb):
        raise ValueError(f"bucket_cap_mb must be a positive number, got {bucket_cap_mb!r}")
    if zero_stage == 2 and process_group is None:
        raise ValueError("zero_stage=2 shards the gradients over a process_group: pass one")
    return int(bucket_cap_mb * 2 ** 20)


def _kept_dtype(storage, name):
    """The torch dtype in which a store of ``storage`` keeps its state buffer ``name``."""
    if name == MASTER:  # a remainder's uint16 bits, as torch's int16
        return torch.int16 if storage.remainder else torch.float32
    if name in storage.quantized:
        return torch.uint8
    return _TORCH_DTYPES[precision.name_of(storage.state(name))]


def _hyperparameters(group, algorithm):
    """The group's hyperparameters of ``algorithm``, with the numbers that torch lets be
    tensors (a tensor lr, tensor betas), and NumPy scalars, as Python numbers, as the
    host math and the checks take them (an ``np.float32`` eps of 0 was no number that
    keeps subnormals: its step divided by a flushed second moment). The group's other
    entries (torch's ``foreach`` ..., a scheduler's ``initial_lr``, the user's own) are
    not read, as torch.optim does not read them."""
    names = _hyperparameter_names(algorithm)
    return {k: tuple(map(_number, v)) if isinstance(v, tuple) else _number(v)
            for k, v in group.items() if k in names}


@functools.cache
def _hyperparameter_names(algorithm):
    return frozenset(algorithm.spec.defaults)  # (a dict built at each call)


@functools.cache
def _refusable(cls):
    """The options that a group of ``cls`` is refused (see ``Optimizer._validate``)."""
    return frozenset(cls._torch_defaults) | _WHOLE_OPTIMIZER


def _number(x):
    return x.item() if isinstance(x, torch.Tensor) else plain(x)


def _labels(index, group):
    """``(p, how errors name p)`` for the parameters of ``param_groups[index]``."""
    names = group.get("param_names")
    for j, p in enumerate(group["params"]):
        label = f"param_groups[{index}]['params'][{j}]"
        yield p, label if names is None else f"{label} ({names[j]!r})"


def _counted(cls, counter):
    """``cls`` with every mutating method adding 1 to the attribute ``counter``."""
    def counting(method):
        def counted(self, *args, **kwargs):
            setattr(self, counter, getattr(self, counter) + 1)
            return method(self, *args, **kwargs)
        return counted

    for name in ("__setitem__", "__delitem__", "update", "pop", "popitem", "clear",
                 "setdefault", "__ior__"):
        setattr(cls, name, counting(getattr(cls.__mro__[1], name)))
    return cls


def _alias(view):
    """``view``'s memory in a tensor of its own, no view of the buffer: a state tensor,
    which :func:`_kept_objects` points at a new buffer when the stores are rebuilt, kept
    the old one alive as its view base (each add_param_group or load_state_dict left
    a whole state's worth of memory behind)."""
    return view.new_empty(0).set_(view.untyped_storage(), view.storage_offset(),
                                  view.shape, view.stride())


def _kept_objects(state, pairs, slot, ours):
    """The ``(name, view)`` pairs of a new store (:meth:`_Store.put`) for a parameter's
    dict ``state`` of ``opt.state``, each view in the tensor object that ``state`` held
    under its name where that was a view of the old stores (whose ids are ``ours``),
    pointed at the new view's memory (``Tensor.set_``): torch.optim's state tensors
    live for the whole run, so a reference to one that the user keeps (a monitor, a
    reset, a ``state_dict()`` kept without a copy) must stay the state when another
    parameter moves or a group comes."""
    kept = []
    for name, view in pairs:
        old = state.get(name)
        if (id(old) in ours and type(old) is torch.Tensor and type(view) is torch.Tensor
                and old.dtype == view.dtype and old.device == view.device
                and not old.is_inference()):  # which only inference mode may change
            old.set_(view)
            view = slot.views[name] = old
        kept.append((name, view))
    return kept


@functools.partial(_counted, counter="changes")
class _ParamState(dict):
    """One parameter's dict in ``opt.state``, counting the changes made to it from
    outside (the step writes through ``dict``'s own methods), so that a step sees a
    replaced state tensor or step count without looking."""

    changes = 1

    def __reduce__(self):  # copies and pickles as a plain dict, changed
        return type(self), (dict(self),)


@functools.partial(_counted, counter="version")
class _State(collections.defaultdict):
    """torch's ``state`` mapping (parameter -> dict), counting the dicts put in it, so
    that a step can keep its parameters' dicts and know when one was replaced."""

    version = 0

    def __init__(self, items=()):
        super().__init__(_ParamState, items)

    def __reduce__(self):  # copies and pickles as a plain mapping, counted afresh
        return type(self), (dict(self),)


def _check_parameter(p, name):
    """Refuse a parameter that fastopt.torch cannot step (of a DTensor, the local shard
    that this rank steps)."""
    if _is_dtensor(p):
        if any(placement.is_partial() for placement in p.placements):
            raise TypeError(f"{name} is a DTensor of {p.placements}, which holds partial "
                            "sums; fastopt.torch steps sharded and replicated DTensors")
        p = p.to_local()
    if p.dtype not in _DTYPES:
        raise TypeError(f"{name} has dtype {p.dtype}; fastopt steps float32, bfloat16 and "
                        "float16 parameters")
    if p.layout != torch.strided:
        raise TypeError(f"{name} is not a dense tensor")
    if p.is_neg():
        raise TypeError(f"{name} is a negated view (is_neg()), whose memory holds the "
                        "opposite of its values, which the kernels would step: give the "
                        "optimizer a tensor of its own values (p.resolve_neg())")
    if p.device.type not in ("cpu", "cuda"):
        raise TypeError(f"{name} is on {p.device}; fastopt steps CPU and CUDA tensors")
    if not _is_dense(p):
        raise ValueError(f"{name} has strides {p.stride()} for shape {tuple(p.shape)}, with "
                         "gaps or overlaps in memory; fastopt steps dense parameters only "
                         "(contiguous, channels_last, transposed ...)")


def _check_apart(names):
    """Refuse parameters that share memory (two Parameters made of one tensor): a step
    writes every parameter at once, in threads that raced over the shared elements, where
    torch.optim's steps them one after the other. ``names``: each parameter's label."""
    extents = sorted((str(t.device), t.data_ptr(), t.data_ptr() + t.numel() * t.element_size(),
                      name) for p, name in names.items() for t in [_local(p)] if t.numel())
    for (device, _, end, name), (other_device, start, _, other) in zip(extents, extents[1:]):
        if device == other_device and start < end:
            raise ValueError(f"{name} and {other} share memory; fastopt.torch steps "
                             "parameters of memory of their own: tie weights as one "
                             "Parameter (module.b.weight = module.a.weight), not two made "
                             "of one tensor")


def _is_dtensor(p):
    return any(cls.__name__ == "DTensor" for cls in type(p).__mro__)


def _local(t):
    """The tensor that this rank steps: a DTensor's local shard, or ``t``."""
    return t.to_local() if _is_dtensor(t) else t


def _rebuilt_master(params, remainders):
    """The float32 master weights, on the host, that ``params`` (this rank's tensor) and
    their int16 ``remainders`` stand for (``precision.rebuild_master``). Remainders
    complete bfloat16 bits: a parameter made float32 or float16 since gives them as its
    values in bfloat16, as the next step takes them (exactly, from float32)."""
    bits = params.detach().cpu().to(torch.bfloat16).contiguous().view(torch.int16).numpy()
    low = _local(remainders).detach().cpu().contiguous().numpy()
    return torch.from_numpy(precision.rebuild_master(bits.view(precision.codecs.BITS),
                                                     low.view(precision.REMAINDER_DTYPE)))


def _master_weights(p, bits, master):
    """``master`` as float32 master weights, sharded as ``p`` is: remainders (int16)
    rebuilt with the bfloat16 ``bits`` (the elements of ``p`` they go with, in the same
    shape), as a state_dict holds them (see :meth:`Optimizer.state_dict`)."""
    if master.dtype != torch.int16:
        return master
    local = _local(master)
    return _like(p, _rebuilt_master(bits, local).view(local.shape).to(local.device))


def _like(p, local, shape=None):
    """``local`` as this rank's part of a DTensor sharded as ``p`` is (a view of the same
    memory), where ``p`` is a DTensor; else ``local``. ``shape``: the whole tensor's,
    where it is not ``p``'s (Adafactor's factors: see :func:`_placements`)."""
    if not _is_dtensor(p):
        return local
    local = _own_storage(local)
    if shape is None or tuple(shape) == tuple(p.shape):
        return type(p).from_local(local, p.device_mesh, p.placements, run_check=False,
                                  shape=p.shape, stride=p.stride())
    strides = tuple(math.prod(shape[d + 1:]) for d in range(len(shape)))
    return type(p).from_local(local, p.device_mesh, _placements(p, shape), run_check=False,
                              shape=torch.Size(shape), stride=strides)


def _own_storage(t):
    """The CPU tensor ``t`` (a view into a store's buffer) as a tensor of the same memory
    with a storage of its own: torch cannot pickle or deep-copy DTensors whose local
    tensors share a storage (``torch.save(opt.state_dict())``, ``copy.deepcopy``).
    A device tensor stays as it is."""
    if t.device.type != "cpu":
        return t
    if t.dtype == torch.bfloat16:  # which NumPy lacks: its bits
        return torch.from_numpy(t.view(torch.int16).numpy()).view(torch.bfloat16)
    return torch.from_numpy(t.numpy())


def _placements(p, shape):
    """How state of the whole ``shape`` is sharded, for the DTensor ``p``: as ``p`` is,
    but replicated along a dimension that ``p`` is sharded in and the state has one
    element of (a matrix's column factor, whose rows the ranks share)."""
    from torch.distributed.tensor import Replicate

    return tuple(Replicate() if placement.is_shard() and shape[placement.dim] != p.shape[
        placement.dim] else placement for placement in p.placements)


def _shard_dims(p):
    """The dimensions along which the ranks split the DTensor ``p``."""
    return {placement.dim % p.dim() for placement in p.placements if placement.is_shard()}


def _split_rows(p):
    """Whether ``p`` is a matrix (a DTensor) whose rows are split across ranks, and only
    they."""
    return _is_dtensor(p) and p.dim() == 2 and _shard_dims(p) == {0}


def _row_length(p, local, in_place):
    """The length of the rows by which a pass sums the DTensor ``p`` (this rank's
    shard ``local``, stepped ``in_place`` or in a scratch copy in C order), sharded over
    one mesh dimension, where the ranks split ``p`` along its first dimension alone (as
    FSDP2 does): every rank's shard then begins at a row, and chunks that begin at every
    row lie on one rank each, whatever the number of ranks. 0 for other shardings, and
    for rows shorter than ``ROWS_SUMMED`` of a tensor of more elements than
    ``ROWS_SUMMED`` (a long vector): there the chunks run from each shard's first
    element."""
    if not (p.dim() and _shard_dims(p) == {0} and (local.is_contiguous() or not in_place)):
        return 0
    row = math.prod(p.shape[1:])
    return row if row >= ROWS_SUMMED[0] or p.numel() <= ROWS_SUMMED[1] else 0


# (the shortest row, the most elements of a tensor with shorter rows: one chunk's) that
# a table of sums over DTensor shards chunks by rows. A chunk costs time and memory (64
# bytes): a vector of 4e6 elements, a chunk each, took 257 ms a LAMB step against 6 ms.
ROWS_SUMMED = (128, SEGMENT_CHUNK)


def _reduction(p):
    """The process groups over which a sum over the DTensor ``p`` is gathered (see
    ``sharding.over_ranks``): those of the mesh dimensions across which it is sharded
    (none where it is replicated); None for a plain tensor."""
    if not _is_dtensor(p):
        return None
    return tuple(p.device_mesh.get_group(d) for d, placement in enumerate(p.placements)
                 if placement.is_shard())


@contextlib.contextmanager
def _hooks_held(opt, *names):
    """torch.optim's code run without ``opt``'s hooks ``names``, which fastopt calls
    itself on the state_dicts that users give and get, where torch calls them on the
    intermediate ones that fastopt converts."""
    held = {name: getattr(opt, name) for name in names}
    try:
        for name in names:
            setattr(opt, name, collections.OrderedDict())
        yield
    finally:
        for name, hooks in held.items():
            setattr(opt, name, hooks)


def _or(result, state_dict):
    """What a state_dict hook leaves: the state_dict it returned, or the one it was given."""
    return state_dict if result is None else result


def _is_integer(dtype):
    return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)


def _kind(value):
    """What an error says it got: a tensor's dtype, or the type of anything else."""
    return f"dtype {value.dtype}" if isinstance(value, torch.Tensor) else \
        f"type {type(value).__name__}"


def _is_dense(t):
    """Whether ``t``'s elements fill ``t.numel()`` consecutive places in memory, in some
    order: then a kernel can step it as a flat array from ``t.data_ptr()``."""
    if t.numel() == 0:
        return True
    expected = 1
    for stride, size in sorted((st, s) for s, st in zip(t.shape, t.stride()) if s != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _low_halves(master):
    """The remainders (int16 bits) of the float32 master weights ``master``: their low
    halves."""
    low = master.contiguous().view(torch.int32) & 0xFFFF
    return (low - (low >= 0x8000) * 0x10000).to(torch.int16)


def _castable(store, name, p):
    """The dtypes besides its own that ``p``'s state tensor ``name`` may be replaced with,
    cast (``torch.zeros_like(p)``): ``p``'s, but for remainders, which are no values;
    float32 values for 8-bit codes, which are encoded; and remainders for float32 master
    weights."""
    if name == MASTER:  # bfloat16's remainders stand for float32 ones (see _Store.put)
        if store.storage.remainder:
            return ()
        return (p.dtype, torch.int16) if p.dtype == torch.bfloat16 else (p.dtype,)
    return (p.dtype, torch.float32) if name in store.quantized else (p.dtype,)


def _is_buffer(algorithm, name):
    """Whether the state entry ``name`` is one that fastopt keeps in its stores (a buffer
    of the algorithm's passes, the master weights, an 8-bit buffer's scales), or, in a
    state_dict, saves of them (8-bit codes and their strides). Any other entry of
    ``opt.state[p]`` (a number or tensor that a wrapper keeps there, as Lookahead does)
    is the user's: fastopt leaves it as it is, as torch.optim does, and ``state_dict()``
    carries it."""
    if not isinstance(name, str):  # torch.optim takes any key
        return False
    average = name.removesuffix(ABSMAX).removesuffix(CODES)
    return (name in algorithm.state_names() or name in (MASTER, STRIDES)
            or average != name and average in algorithm.spec.averages)


@functools.cache
def _other_buffers(algorithm):
    """The state buffers of the other algorithms, not of ``algorithm``: in a loaded
    state, a checkpoint of another optimizer, not an entry of the user's own."""
    return {name for other in ALGORITHMS.values() for name in other.state_names()} - set(
        algorithm.state_names())


def _in_order(state):
    """The items of a parameter's state, 8-bit scales first: codes go in after them, and
    values, encoded, set them."""
    return sorted(state.items(),
                  key=lambda item: not (isinstance(item[0], str) and item[0].endswith(ABSMAX)))


def _relaid(store, local, state):
    """The state of the tensor ``local`` that ``store`` steps (a parameter, a DTensor's
    local shard, a process_group's piece of one) as ``store`` can take it: 8-bit state
    decoded (to be encoded again) where its codes (of a DTensor, its local ones) lie
    otherwise than ``store`` keeps those of ``local`` (:meth:`_Store.codes_layout`), so
    that its blocks run through other elements."""
    layout = store.codes_layout(local)
    moved = [name for name in store.quantized
             if getattr(state.get(name), "dtype", None) == torch.uint8
             and name + ABSMAX in state and not _same_layout(_local(state[name]), layout)]
    if not moved:
        return state
    state = dict(state)
    for name in moved:
        state[name] = _decoded(state[name], state.pop(name + ABSMAX), store.quantized[name])
    return state


def _same_layout(a, b):
    """Whether the dense tensors ``a`` and ``b``, of one shape, lie alike in memory: their
    strides agree but where a dimension has one element (autograd gives a (1, n)
    weight's gradient through einsum strides (1, 1), which a step copied every time)."""
    return all(x == y for size, x, y in zip(a.shape, a.stride(), b.stride()) if size != 1)


def _memory_order(t):
    """The dense tensor ``t``'s elements in memory order, a flat view."""
    return t.as_strided((t.numel(),), (1,))


def _decoded(codes, absmax, fmt):
    """The float32 values of the 8-bit ``codes`` (blocks in their memory order) with
    the blocks' ``absmax``, in the codes' shape and layout; of a DTensor's (this rank's
    blocks), a DTensor sharded as they are."""
    local = _local(codes)
    values = precision.dequantize(_memory_order(local).cpu().numpy(),
                                  absmax.cpu().numpy(), fmt)
    return _like(codes, torch.from_numpy(values).as_strided(local.shape, local.stride()))


@functools.cache
def _start_kernel_threads():
    """Start the kernels' threads (Numba's pool), and give torch back its thread count:
    under Numba's OpenMP layer, starting the pool sets OpenMP's thread count for the
    whole process, which torch reads as its own (torchrun's OMP_NUM_THREADS=1 became
    every core, and torch's gradients changed in their last bits with the count). Once a
    process, at its first step, not at import: a process that forks after starting
    OpenMP's threads cannot use them in its children."""
    threads = torch.get_num_threads()
    numba.get_num_threads()
    torch.set_num_threads(threads)


def _check_number(name, value, param):
    """A per-parameter number (``_TORCH_SCALARS``, a real number or a one-element
    tensor) as a Python number; refused where no step leaves it: a step count must be a
    whole number >= 0, the others finite. ``param()`` names the parameter, only for the
    error."""
    number = value.item() if isinstance(value, torch.Tensor) and value.numel() == 1 else value
    if isinstance(number, bool) or not isinstance(number, numbers.Real):
        raise TypeError(f"state {name!r} of {param()} must be a number or a one-element real "
                        f"tensor, got {value!r}")
    if name == "step" and not (math.isfinite(number) and number >= 0 and number % 1 == 0):
        raise ValueError(f"state 'step' of {param()} must be a whole number >= 0, got "
                         f"{number!r}")
    if not math.isfinite(number):
        raise ValueError(f"state {name!r} of {param()} must be finite, got {number!r}")
    return number


def _check_state(param, name, value, expected, castable=(), loading=False, like=None):
    """Refuse a state tensor that does not fit: ``expected`` is the shape the store keeps
    (or a view of that shape and dtype), None where the parameter has no such state. A
    state tensor of a ``castable`` dtype (``torch.zeros_like(p)``) is taken, cast. The
    state of a DTensor parameter ``like`` is a DTensor sharded as it is, and only it,
    but for its 8-bit scales, which are this rank's blocks' (a plain tensor)."""
    shape = getattr(expected, "shape", expected)
    what = "loaded state dict has" if loading else "state has"
    if shape is None:
        keeps = ""
        if name == MASTER:
            keeps = (": this optimizer keeps no master weights for it (a float32 parameter, "
                     "or master_weights=None)")
            if loading:
                keeps += ("; to go on without them, delete 'master' from the state dict "
                          "(after setting a 16-bit parameter from them, which are more exact)")
        raise ValueError(f"{what} {name!r} for {param}, which has no such state{keeps}")
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{what} {name!r} for {param} that is a {type(value).__name__}, not "
                        "a tensor (a torch.Tensor of its values, or None to begin it afresh)")
    if value.is_meta:
        raise TypeError(f"{what} {name!r} for {param} on the meta device, which holds no "
                        "numbers")
    if value.layout != torch.strided:
        raise TypeError(f"{what} {name!r} for {param} of layout {value.layout}; its state is "
                        "dense (to_dense() it)")
    if value.is_complex() or value.dtype == torch.bool:  # which a cast would not keep
        raise TypeError(f"{what} {name!r} of {value.dtype} for {param}, whose state holds "
                        "real numbers")
    if value.shape != shape:
        raise ValueError(f"{what} {name!r} of shape {tuple(value.shape)} for {param}, which "
                         f"needs shape {tuple(shape)}")
    if name.endswith(ABSMAX):  # this rank's blocks': a plain tensor, a DTensor's too
        like = None
    if _is_dtensor(value) or _is_dtensor(like):
        sharding = [tuple(value.placements) if _is_dtensor(value) else "not a DTensor",
                    _placements(like, shape) if _is_dtensor(like) else "not a DTensor"]
        if sharding[0] != sharding[1] or getattr(value, "device_mesh", None) != getattr(
                like, "device_mesh", None):
            raise TypeError(f"{what} {name!r} of {sharding[0]} for {param}, which is "
                            f"{sharding[1]}: the state of a DTensor is a DTensor on its mesh, "
                            "sharded as it is (torch.zeros_like(p)), and its 8-bit scales "
                            "(<name>_absmax) a plain tensor of this rank's blocks'")
    dtype = getattr(expected, "dtype", None)
    if not loading and dtype is not None and value.dtype not in (dtype, *castable):
        raise TypeError(f"state {name!r} of {param} has dtype {value.dtype}; fastopt keeps "
                        f"it in {dtype} "
                        f"({'master_weights' if name == MASTER else 'state_dtype'})")
    if name.endswith(ABSMAX) and bool((value < 0).any()):  # flipping its blocks' signs
        raise ValueError(f"{what} {name!r} for {param} with negative block scales; a block's "
                         "absmax is >= 0 (or NaN)")


class _Slot:
    """Where one parameter's state lives in its store, the views of it that
    ``opt.state[p]`` holds, and the parameter's signature when the store was built."""

    def __init__(self, p, index, start, piece=None, shaped=False):
        self.sharded = _is_dtensor(p)
        whole = _local(p)  # this rank's shard of a DTensor
        self.origin = (whole.data_ptr(), whole.shape, whole.dtype, whole.stride())
        # What the kernels step: where a process_group partitions p, this rank's
        # elements of it, (first, last) in memory order (``piece``), a flat view; or,
        # where ``shaped`` (a partition of whole tensors, Adafactor's), p if it is all.
        self.piece = piece
        if piece is None or shaped and piece == (0, whole.numel()):
            self.local = whole
        elif shaped and piece[0] == piece[1] and whole.dim():
            self.local = whole[:0]  # none of it: its state is empty, of its shapes
        else:
            self.local = whole.view(-1)[piece[0]:piece[1]]
        self.index = index  # in the store
        self.start, self.stop = start, start + self.local.numel()
        self.address, self.shape = self.local.data_ptr(), self.local.shape
        self.views = {}
        self.state = None  # the parameter's dict, in opt.state once it is not empty
        self.attached = False  # whether it is in opt.state
        self.key = None  # what a run of parameters must share: see Optimizer._plan


class _Blocks:
    """The blocks of ``codecs.BLOCK`` elements of a store's 8-bit state: each
    parameter's, from its first element on in memory order, as rows ``(parameter,
    offset, size, small)``; a parameter of fewer than ``precision.MIN_QUANTIZED_SIZE``
    elements keeps float32 state instead, from ``small`` on in the ``_small`` buffer.
    ``of[index]`` is ``(first, last, small)`` for the parameter ``index``: its rows, which
    are its places in ``_absmax`` too, and its start in ``_small`` (-1 where it is
    quantized). ``params`` are the tensors stepped, whose whole parameters have
    ``sizes`` (a process_group's piece begins on a block of its parameter)."""

    def __init__(self, params, sizes):
        rows, self.of, self.small, self.count = [np.empty((0, 4), np.int64)], [], 0, 0
        for index, (p, whole) in enumerate(zip(params, sizes)):
            size = p.numel()
            small = self.small if whole < precision.MIN_QUANTIZED_SIZE else -1
            rows.append(precision.block_rows(index, 0, size, small))
            self.of.append((self.count, self.count + len(rows[-1]), small))
            self.count += len(rows[-1])
            self.small += size if small >= 0 else 0
        self.rows = np.concatenate(rows)

    def launch(self, run, arrays, cache):
        """``work.blocks`` (see ``engine.Work``) for ``run``, whose 8-bit buffers have
        the absmax and small ``arrays``, by name; its rows kept in the run's ``cache``."""
        if "blocks" not in cache:
            first, last = run.span
            low, high = self.of[first][0], self.of[last - 1][1]
            rows = self.rows[low:high]  # a view where the run begins with the store
            if first:  # the run's segments are its parameters
                rows = rows.copy()
                rows[:, 0] -= first
            starts = np.array([slot.start for slot in run.slots], np.int64)
            cache["blocks"] = (rows, starts, run.stop - run.start, low, high)
        rows, starts, size, low, high = cache["blocks"]
        return rows, starts, size, {name: (absmax[low:high], small)
                                    for name, (absmax, small) in arrays.items()}


# A store forgets what a run kept for its next steps (tables, block rows, plans) where
# none of this many steps took it (_Store.forget_stale_runs).
CACHED_STEPS = 8


class _Store:
    """The state of the parameters on one device, in flat buffers, and the kernels' way to
    the parameters: in place through their addresses (``in_place``, on the CPU), or
    through scratch buffers that hold a copy of them during the step (CUDA, and
    Adafactor's tensors that do not lie in C order, whose rows it needs).

    Each state buffer holds every parameter's part, one after the other (see
    ``engine.state_layout``); in place, a part of the parameter's shape lies as the
    parameter does, so that the kernels walk both in memory order."""

    def __init__(self, algorithm, params, in_place, storage, ordinal, reduction, partition,
                 places):
        self.algorithm = algorithm
        self.ordinal = ordinal  # its stream of random bits (see _relayout)
        # Where each parameter's elements draw their random bits from (see draws): its
        # place among the whole tensors of the stream, p -> the first element's.
        self.places = places
        # The process groups over which its sums are gathered, where its parameters are
        # shards (DTensors, or a process_group's partition: see _reduction).
        self.reduction = reduction
        self.partition = partition  # a sharding.Partition under process_group=
        self.reducer = None  # zero_stage=2's sharding.BucketReducer
        self.signature = _signature(params)
        self.device = params[0].device
        # The formats of its buffers (its parameters share a dtype), and whether it keeps
        # master weights (in the state buffer MASTER).
        self.storage, self.master = storage, storage.master
        self.slots, start = {}, 0
        for index, p in enumerate(params):
            self.slots[p] = slot = _Slot(p, index, start, partition and partition.pieces[index],
                                         partition is not None and partition.whole)
            start = slot.stop
        self.size = start
        locals_ = [slot.local for slot in self.slots.values()]
        self.itemsize = locals_[0].element_size()
        self.shapes = [tuple(t.shape) for t in locals_]
        self.names = []  # the state buffers made so far, in order
        self.in_place = in_place
        self.shaped = _shaped(algorithm)
        # The groups over which its gradients' sum of squares is still to be added: none
        # where its tables' sums are the whole tensors' already (see table()).
        self.gathers = reduction if partition is not None and partition.whole else None
        # The 8-bit buffers, by name, with their map (codecs.QUANTIZED), and the
        # companions that hold their scales: "<name>_absmax" -> name.
        self.quantized = storage.quantized
        self.scales = {name + ABSMAX: name for name in self.quantized}
        self._blocks = _Blocks(locals_, [p.numel() for p in params]) if self.quantized \
            else None
        self._flat, self._layouts = {}, {}
        # What the steps of each run (by its span) keep for the next ones: its tables,
        # block rows and Adafactor's plan; and the step (of self.steps) that last took
        # it. A run no step took for CACHED_STEPS is forgotten (forget_stale_runs).
        self._caches, self._taken, self.steps = {}, {}, 0
        # The partition's collectives' buffers, and the window (in elements) of each
        # share that they move at a time: a bucket's length.
        self._padded = self._own = self._reduced = None
        self.window = None
        if in_place:
            self.backend = HostBackend()
        else:
            self.backend = HostBackend() if _on_host(self.device) else CudaBackend()
            self.scratch_params = torch.zeros(start, dtype=locals_[0].dtype, device=self.device)
            self.scratch_grads = torch.zeros(start, dtype=locals_[0].dtype, device=self.device)

    def active(self):
        """A context in which the store's kernels and copies run: see
        :func:`_stepping_on`."""
        return _stepping_on(self.device) if self.device.type == "cuda" else _ANYWHERE

    def layout(self, name):
        """``engine.state_layout`` of the state buffer ``name`` over the store (the
        master weights are laid out like the parameters, whatever the state's shapes)."""
        if name not in self._layouts:
            self._layouts[name] = (
                (np.array([slot.start for slot in self.slots.values()], np.int64), self.size)
                if name == MASTER else engine.state_layout(self.algorithm, name, self.shapes))
        return self._layouts[name]

    def flat(self, name):
        """The flat state buffer ``name``, made when first needed, in its storage dtype
        (with, for an 8-bit one, its ``<name>_absmax`` and ``<name>_small``)."""
        if name not in self._flat:
            size = self.layout(name)[1]
            self._flat[name] = torch.zeros(size, dtype=_kept_dtype(self.storage, name),
                                           device=self.device)
            if name in self.quantized:  # absmax per row of _Blocks, as the kernels index it
                for extra, size in ((ABSMAX, self._blocks.count), (SMALL, self._blocks.small)):
                    self._flat[name + extra] = torch.zeros(size, dtype=torch.float32,
                                                           device=self.device)
            self.names.append(name)
        return self._flat[name]

    def view(self, name, p):
        """``p``'s part of the state buffer ``name``, in ``p``'s layout where the kernels
        step ``p`` in place, in logical order otherwise; None where ``p`` has no such
        state (Adafactor's factors of a vector). An 8-bit buffer's is ``p``'s codes,
        or, where ``p`` is too small to quantize, its float32 state; ``<name>_absmax``
        the scales of ``p``'s blocks (None where it is small). A DTensor's is a DTensor
        sharded as it is, whose local tensor is this rank's part."""
        slot = self.slots[p]
        if name == MASTER and not self.master:
            return None
        if name in self.quantized or name in self.scales:
            if name not in slot.views:
                slot.views[name] = self._quantized_view(name, p)
            return slot.views[name]
        if name not in slot.views:
            flat, start = self.flat(name), int(self.layout(name)[0][slot.index])
            local = slot.local
            shape = tuple(local.shape) if name == MASTER else self.algorithm.state_shape(
                name, tuple(local.shape))
            if shape is None:
                view = None
            elif self.in_place and shape == tuple(local.shape):
                view = _alias(flat.as_strided(local.shape, local.stride(), start))
            else:
                view = _alias(flat[start:start + math.prod(shape)].view(shape))
            whole = p.shape if name == MASTER else self.algorithm.state_shape(name,
                                                                              tuple(p.shape))
            slot.views[name] = view if view is None else _like(p, view, whole)
        return slot.views[name]

    def codes_layout(self, local):
        """A tensor of the local tensor ``local``'s shape, laid out as its 8-bit state
        lies (its blocks of 256 elements run in this layout's memory order): as
        ``local`` where the kernels step it in place, in C order where they step it in a
        scratch buffer."""
        return local if self.in_place else torch.empty(local.shape, device="meta")

    def _quantized_view(self, name, p):
        """:meth:`view` of an 8-bit buffer or of its scales."""
        codes = self.scales.get(name, name)
        slot, flat = self.slots[p], self.flat(codes)
        first, last, small = self._blocks.of[slot.index]
        if name in self.scales:
            return None if small >= 0 else _alias(self._flat[name][first:last])
        layout = self.codes_layout(slot.local)
        if small >= 0:
            return _like(p, _alias(self._flat[name + SMALL].as_strided(
                layout.shape, layout.stride(), small)))
        return _like(p, _alias(flat.as_strided(layout.shape, layout.stride(), slot.start)))

    def put(self, name, p, value):
        """Write ``value`` into ``p``'s part of the state buffer ``name``; returns the
        ``(name, view)`` pairs that ``opt.state[p]`` holds for it. Values (not codes)
        for an 8-bit buffer are encoded, block by block in the memory order of
        :meth:`codes_layout`, as the kernels encode them (``precision.quantize``), which
        sets their scales too. Remainders (int16) for float32 master weights are their
        low halves, whose high halves are ``p``'s bits now."""
        view = self.view(name, p)
        if name == MASTER and value.dtype == torch.int16 and view.dtype == torch.float32:
            value = _rebuilt_master(self.slots[p].local, value)
            _local(view).copy_(value.view(_local(view).shape))
            return [(name, view)]
        if name not in self.quantized or view.dtype != torch.uint8:
            _local(view).copy_(_local(value))  # a DTensor's sharded as p's: see _check_state
            return [(name, view)]
        scales = self.view(name + ABSMAX, p)
        if value.is_floating_point():
            layout = self.codes_layout(self.slots[p].local)
            values = torch.empty_strided(layout.shape, layout.stride(), dtype=torch.float32)
            values.copy_(_local(value))
            codes, absmax = precision.quantize(_memory_order(values).numpy(),
                                               self.quantized[name], fit=True)
            _memory_order(_local(view)).copy_(torch.from_numpy(codes))
            scales.copy_(torch.from_numpy(absmax))
        else:
            _local(view).copy_(_local(value))
        return [(name, view), (name + ABSMAX, scales)]

    def take_partition_gradients(self, group, reduce):
        """Set ``partition_gradients``: this rank's elements of each parameter's
        gradient, first averaged over ``group`` where ``reduce`` (and there are other
        ranks), in the local tensors' shapes. Averaged here, a parameter that has a
        gradient on some rank has one on every rank, the average with zeros for the
        others, as DDP's with find_unused_parameters (else its owners would step their
        elements or not, each as its own backward went); None where no rank has one."""
        slots = list(self.slots.values())
        if self.reducer is not None:  # during backward, every rank reaching the same
            has, share = self.reducer.take(), self.reducer.gradients
            grads = [share[s.start:s.stop] if s.index in has else None for s in slots]
        else:
            for p in self.slots:
                if p.grad is not None:
                    _check_gradient(p.grad, p)
            flats = [None if p.grad is None else p.grad.reshape(-1) for p in self.slots]
            if not reduce or self.partition.world == 1:
                grads = [flat if flat is None else flat[s.piece[0]:s.piece[1]]
                         for flat, s in zip(flats, slots)]
            else:  # a window of every share at a time, into this rank's share
                reached = sharding.on_any_rank([flat is not None for flat in flats], group)
                padded, own = self._partition_buffers()
                partition = self.partition
                for start, length in partition.windows(own.numel()):
                    partition.pack(flats, padded, window=(start, length))  # None: zeros
                    sharding.reduce_scatter(self._reduced[start:start + length],
                                            padded[:partition.world * length], group)
                grads = [self._reduced[s.start:s.stop] if r else None
                         for r, s in zip(reached, slots)]
        self.partition_gradients = [grad if grad is None else grad.view(s.shape)
                                    for grad, s in zip(grads, slots)]

    def gather_parameters(self, group):
        """Give every parameter the elements that the other ranks of ``group`` stepped
        (all-gathers in the parameters' dtype, a bucket's length of each share at a
        time; none where there are no others)."""
        partition = self.partition
        if partition.world == 1 or not partition.share:
            return
        padded, own = self._partition_buffers()
        flats = [p.detach().view(-1) for p in self.slots]
        for start, length in partition.windows(own.numel()):
            for slot in self.slots.values():  # this rank's elements start:start + length
                lo, hi = max(slot.start, start), min(slot.stop, start + length)
                if lo < hi:
                    own[lo - start:hi - start].copy_(
                        slot.local.reshape(-1)[lo - slot.start:hi - slot.start])
            sharding.all_gather(padded[:partition.world * length], own[:length], group)
            partition.unpack(padded, flats, window=(start, length))

    def gather_elements(self, flat, group, to):
        """On rank ``to`` of ``group``, every parameter's whole flat tensor, from every
        rank's ``flat`` (laid out as the parameters' elements in its partition); None on
        the others."""
        partition = self.partition
        own = torch.zeros(partition.share, dtype=flat.dtype, device=flat.device)
        own[:flat.numel()].copy_(flat)
        mine = dist.get_rank(group) == to
        padded = own.new_zeros(partition.world * partition.share) if mine else None
        sharding.gather(padded, own, group, to)
        if not mine:
            return None
        wholes = [own.new_empty(p.numel()) for p in self.slots]
        partition.unpack(padded, wholes, skip_own=False)
        return wholes

    def gather_scales(self, name, group):
        """Every parameter's whole ``<name>_absmax`` (one per block), from every
        rank's: each rank's pieces begin on blocks of their parameters."""
        return sharding.gathered_by_tensor(self._flat[name + ABSMAX],
                                           self.partition.counts(BLOCK), group)

    def small_values(self, name):
        """The float32 state ``name`` of the parameters too small to quantize, laid
        out as their elements (zeros for the others')."""
        values = torch.zeros(self.size, dtype=torch.float32, device=self.device)
        small = self._flat[name + SMALL]
        for slot in self.slots.values():
            at = self._blocks.of[slot.index][2]
            if at >= 0:
                values[slot.start:slot.stop].copy_(small[at:at + slot.stop - slot.start])
        return values

    def _partition_buffers(self):
        """The buffers of the collectives: a window (a bucket's length) of every rank's
        share, padded to the longest, and this rank's window of its parameters. So at
        stage 1 a rank holds, besides the gradients, its share of them (``_reduced``)
        and a bucket of each rank, where a buffer of every share took as much memory as
        the gradients."""
        if self._padded is None:
            partition, dtype = self.partition, next(iter(self.slots)).dtype
            length = min(partition.share, self.window)
            self._padded = torch.zeros(partition.world * length, dtype=dtype,
                                       device=self.device)
            if self.reducer is None:
                # Stage 1: its share of the averaged gradients, whose first window
                # carries its parameters to the all-gathers after the step.
                self._reduced = torch.zeros(partition.share, dtype=dtype, device=self.device)
                self._own = self._reduced[:length]
            else:
                self._own = torch.zeros(length, dtype=dtype, device=self.device)
        return self._padded, self._own

    def begin_state(self, run, spec, fresh):
        """Create and initialize the state buffers that ``run`` begins using, and the
        master weights of parameters that have none yet (copies of them)."""
        for name in fresh:
            for p, slot in zip(run.params, run.slots):
                view = self.view(name, p)
                if view is None:
                    continue
                if view.dtype == torch.uint8:  # codes: those of one block of the value
                    codes, absmax = precision.quantize([spec[name]], self.quantized[name])
                    scales = self.view(name + ABSMAX, p)
                    _local(view).fill_(int(codes[0]))
                    scales.fill_(float(absmax[0]))
                    dict.update(slot.state, {name: view, name + ABSMAX: scales})
                else:
                    _local(view).fill_(spec[name])
                    dict.__setitem__(slot.state, name, view)
        for p, slot in zip(run.params, run.slots) if self.master else ():
            if MASTER not in slot.state:
                view = self.view(MASTER, p)
                if self.storage.remainder:  # p is its master exactly
                    _local(view).zero_()
                else:
                    _local(view).copy_(slot.local)
                dict.__setitem__(slot.state, MASTER, view)

    def cache(self, run):
        """What the steps of ``run`` keep for the next ones (a dict)."""
        self._taken[run.span] = self.steps
        return self._caches.setdefault(run.span, {})

    def forget_stale_runs(self):
        """Count a step, and forget the caches of the runs that none of the last
        ``CACHED_STEPS`` took: where gradients come and go (experts that no token
        reached), the runs differ from step to step, and their caches piled up (a
        contrived pattern's to nine times the 8-bit state of its model)."""
        self.steps += 1
        for span in [span for span, step in self._taken.items()
                     if step < self.steps - CACHED_STEPS]:
            del self._taken[span], self._caches[span]

    def table(self, run, summing=False):
        """One segment per parameter of ``run``, the state laid out like the parameters,
        kept for the next steps (see :meth:`cache`); with the parameters' addresses
        where they are stepped in place. Where the parameters are
        pieces of a ZeRO partition, its sums are the whole tensors' (``WholeTotals``),
        and so are those of DTensor shards (the gradient norm, and passes that sum:
        ``summing``). Over one mesh dimension (FSDP2's) these take a table of their
        own, whose chunks begin at every row of a tensor that the ranks split between
        rows (``_row_length``), and which adds every rank's chunk sums in order, so
        that its sums do not depend on where the tensors are cut. Every rank counts
        every rank's chunks from the tensors' shapes, as torch.chunk cuts them."""
        groups = self.reduction if self.partition is None else None
        shards = summing and groups is not None
        cache = self.cache(run)
        if ("table", shards) not in cache:
            sizes = [slot.stop - slot.start for slot in run.slots]
            rows = [_row_length(p, slot.local, self.in_place) for p, slot in
                    zip(run.params, run.slots)] if shards and len(groups) == 1 \
                else [0] * len(sizes)
            draws = self.draws(run) if self.storage.stochastic and self.partition is None \
                else None
            table = self.backend.segments(sizes, [slot.start for slot in run.slots],
                                          draws=draws,
                                          rows=[row or size for row, size in zip(rows, sizes)])
            table.params = np.array([slot.address for slot in run.slots], np.int64)
            table.starts = np.array([slot.start for slot in run.slots], np.int64)
            partition = self.partition
            if partition is not None and partition.world > 1 and not partition.whole:
                table.totals = sharding.WholeTotals(
                    partition.counts(SEGMENT_CHUNK, range(*run.span)), self.reduction[0])
            elif shards and len(groups) == 1:
                table.totals = sharding.WholeTotals(self._shard_counts(run, rows, table),
                                                    groups[0])
            elif shards and groups:  # several mesh dimensions (a replicated DTensor: none)
                table.totals = sharding.ranks_totals(table.totals, groups)
            cache["table", shards] = table
        return cache["table", shards]

    def draws(self, run):
        """Where each tensor of ``run`` draws its random bits, a DTensor shard at its first
        element's place among the whole tensors (``places``), where one process holding
        them whole draws it, so that stochastic rounding gives the same bits on any
        number of ranks (a replicated tensor draws alike on all). A tensor split otherwise
        is refused at construction (``Optimizer._check_sharded``)."""
        starts = self.places
        first_rows = (self.first_rows(run) if self.reduction is not None
                      and len(self.reduction) == 1 else None)
        return np.array([starts[p] if first_rows is None or first_rows[index] < 0
                         else starts[p] + int(first_rows[index]) * (p.numel() // p.shape[0])
                         for index, p in enumerate(run.params)], np.int64)

    def sums_tensors(self, algorithm, h):
        """Whether a step of ``algorithm`` with the scalars ``h`` has passes that sum
        over the tensors, by the table of sums (Adafactor's sum over segments of its
        own)."""
        return not (self.shaped or engine.single_pass(algorithm, h))

    def _shard_counts(self, run, rows, table):
        """Every rank's chunks of each DTensor of ``run`` in ``table`` (chunked by
        ``rows``), as ``WholeTotals`` takes them; a ValueError where this rank's are
        not what torch.chunk's cuts give (a DTensor made of uneven shards)."""
        group = self.reduction[0]
        counts = np.stack([sharding.shard_chunks(p.shape, *_shard_dims(p), row,
                                                 dist.get_world_size(group))
                           for p, row in zip(run.params, rows)], axis=1)
        mine = np.bincount(table.chunk_segment, minlength=table.count)
        uneven = np.flatnonzero(counts[dist.get_rank(group)] != mine)
        if uneven.size:
            p = run.params[uneven[0]]
            raise ValueError(f"a DTensor parameter of shape {tuple(p.shape)} and placements "
                             f"{p.placements} has a local shard of {tuple(_local(p).shape)} "
                             f"on rank {dist.get_rank()}, which is not the piece that "
                             "torch.chunk cuts for it: fastopt.torch sums over shards cut "
                             "as DTensor's Shard and FSDP2 cut them")
        return counts

    def carries_rows(self, algorithm):
        """Whether ``algorithm`` (Adafactor) carries its sums over tensors that the
        ranks split along their first dimension from rank to rank
        (``sharding.in_row_order``): where the DTensors are split over one mesh
        dimension, whose ranks hold the pieces in their order."""
        return (algorithm.spec.factored and self.partition is None
                and self.reduction is not None and len(self.reduction) == 1)

    def first_rows(self, run):
        """Where this rank's piece begins along the first dimension of each tensor of
        ``run`` that the ranks split along it alone (a matrix's rows, a vector's
        elements), as torch.chunk cuts them; -1 for the others. A ValueError where
        this rank's piece is not torch.chunk's. Kept for the next steps, as the
        tables are."""
        cache = self.cache(run)
        if "first_rows" in cache:
            return cache["first_rows"]
        group = self.reduction[0]
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        first = np.full(len(run.params), -1, np.int64)
        for index, p in enumerate(run.params):
            if _shard_dims(p) != {0}:
                continue
            starts, held = sharding.chunk_pieces(p.shape[0], world)
            first[index] = starts[rank]
            if _local(p).shape[0] != held[rank]:
                raise ValueError(f"a DTensor parameter of shape {tuple(p.shape)} has "
                                 f"{_local(p).shape[0]} rows on rank {dist.get_rank()}, not "
                                 "the piece that torch.chunk cuts for it: fastopt.torch "
                                 "adds Adafactor's sums over rows cut as DTensor's Shard "
                                 "and FSDP2 cut them")
        cache["first_rows"] = first
        return first

    def tensors(self, run, master=None):
        """How the kernels reach ``run``'s parameters and gradients, and the ``master``
        weights (laid out like the parameters)."""
        table = self.table(run)
        if self.in_place:
            masters = None if master is None else (
                master.__array_interface__["data"][0] + master.itemsize * table.starts)
            return Tensors(table.params, run.gradients, w=masters, itemsize={
                "p": self.itemsize, "g": self.itemsize,
                "w": 4 if master is None else master.itemsize})
        return self.backend.flat_tensors(_array(self.scratch_params), _array(self.scratch_grads),
                                         table.starts, master)

    def work(self, algorithm, hyper, prep, run):
        """The ``engine.Work`` that steps ``run``'s parameters (copied into the scratch
        buffer first where they are not stepped in place: see :meth:`copy_back`)."""
        spec, h = run.spec, run.h
        if not self.in_place:
            for slot in run.slots:
                self.scratch_params[slot.start:slot.stop].view(slot.shape).copy_(slot.local)
        # share_memory_() of a state view moves the whole buffer: look it up each step.
        state = {name: _array(self._flat[name]) for name in spec}
        master = _array(self._flat[MASTER]) if self.master else None
        first, last = run.span
        cache = self.cache(run)
        work = engine.Work(self.backend, tensors=self.tensors(run, master),
                           shapes=self.shapes[first:last], segments=self.table(run),
                           state=state, present=tuple(spec),
                           state_starts=lambda name: self.layout(name)[0][first:last],
                           prep=prep, keep_subnormals=engine.keeps_subnormals(algorithm, hyper),
                           cache=cache,
                           formats=self.storage.formats, master=self.master)
        if self.quantized:
            work.blocks = self._blocks.launch(run, {name: (
                _array(self._flat[name + ABSMAX]), _array(self._flat[name + SMALL]))
                for name in self.quantized if name in spec}, cache)
        if self.storage.stochastic:
            work.stochastic, work.key = True, self.storage.key(run.step, self.ordinal)
            if self.partition is not None:
                work.first = self.partition.bounds[self.partition.rank]
        if self.reduction is not None:  # shards: counts and sums of the whole tensors
            work.sizes = np.array([p.numel() for p in run.params], np.int64)
            if self.sums_tensors(algorithm, h):
                work.sum_segments = self.table(run, summing=True)
        if self.reduction is not None and self.partition is None:  # DTensors: Adafactor's
            work.reduce = functools.partial(sharding.sums_over_ranks, self.reduction)
            work.split_rows = np.array([p.shape[0] if _split_rows(p) else 0
                                        for p in run.params], np.int64)
            if self.carries_rows(algorithm):
                work.first_rows = self.first_rows(run)
                work.in_row_order = functools.partial(sharding.in_row_order,
                                                      self.reduction[0])
        return work

    def copy_back(self, run):
        """Write ``run``'s stepped parameters back from the scratch buffer, where they
        are not stepped in place."""
        if not self.in_place:
            for slot in run.slots:
                slot.local.copy_(self.scratch_params[slot.start:slot.stop].view(slot.shape))


_ANYWHERE = contextlib.nullcontext()


@contextlib.contextmanager
def _stepping_on(device):
    """Where a store on the CUDA ``device`` steps: that device made current, as Numba's
    calls go to the current one (torch's to the tensors'); and torch's work (the
    scratch copies) on the device's default stream, where Numba launches, after the
    work queued on the current stream and before what comes after it there."""
    with torch.cuda.device(device):
        current, default = torch.cuda.current_stream(), torch.cuda.default_stream()
        if current == default:
            yield
            return
        default.wait_stream(current)
        try:
            with torch.cuda.stream(default):
                yield
        finally:
            current.wait_stream(default)


def _on_host(device):
    """Whether the CPU's kernels step the tensors on ``device`` (else CUDA's)."""
    return device.type == "cpu"


# The NumPy dtypes of the 2-byte tensors that fastopt keeps, by which the backends know
# their formats (int16: the low bits of master weights, "remainder", which are bits).
_TWO_BYTE_DTYPES = {torch.bfloat16: precision.DTYPES["bfloat16"],
                    torch.float16: precision.DTYPES["float16"],
                    torch.int16: precision.codecs.BITS}


def _array(tensor):
    """A zero-copy view of ``tensor``: NumPy's of a CPU tensor, Numba's of a CUDA one.
    A 2-byte tensor's is taken through int16 (neither NumPy nor torch's CUDA array
    interface has bfloat16), then viewed in its NumPy dtype."""
    if tensor.element_size() != 2:
        return tensor.numpy() if _on_host(tensor.device) else _device_array(tensor)
    bits = tensor.view(torch.int16)
    bits = bits.numpy() if _on_host(tensor.device) else _device_array(bits)
    return bits.view(_TWO_BYTE_DTYPES[tensor.dtype])


def _device_array(tensor):
    from numba import cuda

    return cuda.as_cuda_array(tensor)


class _Run:
    """Parameters of one group, consecutive in their store, that step together with the
    same step count and host state: one kernel launch."""

    def __init__(self, key, store, p, slot, grad):
        self.key, self.store = key, store
        self.params, self.slots, self.grads = [p], [slot], [grad]
        self.start, self.stop = slot.start, slot.stop

    def add(self, p, slot, grad):
        self.params.append(p)
        self.slots.append(slot)
        self.grads.append(grad)
        self.stop = slot.stop

    @property
    def span(self):
        """The store's parameters it steps: ``(first, last + 1)``, by their index."""
        return self.slots[0].index, self.slots[-1].index + 1

    def take_gradients(self):
        """Make the gradients readable by the kernels: their addresses (each in its
        parameter's layout, copied where it is not), or a copy in the scratch buffer."""
        store = self.store
        if not store.in_place:
            for slot, grad in zip(self.slots, self.grads):
                _check_gradient(grad, slot.local)
                store.scratch_grads[slot.start:slot.stop].view(slot.shape).copy_(grad)
            return
        grads = self.grads
        for i, (slot, grad) in enumerate(zip(self.slots, grads)):
            # At every step, even for the same gradient object: assigning its .data
            # gives it another dtype, shape and layout.
            _check_gradient(grad, slot.local)
            # A copy in the parameter's layout, for this step; also of a negated view
            # (is_neg()), whose memory holds the opposite of its values.
            if not _same_layout(grad, slot.local) or grad.is_neg():
                grads[i] = torch.empty_like(slot.local).copy_(grad)
        self.gradients = np.array([g.data_ptr() for g in grads], np.int64)

    def sum_squares(self):
        """The gradients' float64 sum of squares, tensor by tensor through the store's
        table of sums (``_Store.table``), in place or in the scratch copy alike, so that
        a ZeRO partition's on CUDA is one process's too: over the whole tensors where
        the table gives their sums (then the store's ``gathers`` is None), else this
        rank's."""
        store = self.store
        formats = (("g", store.storage.formats["g"]),) if "g" in store.storage.formats else ()
        tensors = Tensors(None, self.gradients, itemsize={"p": 4, "g": store.itemsize}) \
            if store.in_place else store.tensors(self)
        total, = store.backend.run_segments(
            GRAD_SQUARES._replace(formats=formats), tensors, [], (), (),
            store.table(self, summing=True), keep_subnormals=True)
        return math.fsum(total)


def _together(runs):
    """The runs of one group that step together: those of one device with the same step
    count, host state and scalars (in stores of several dtypes, or apart in one, where a
    parameter without a gradient lies between them), whose host state after the step is
    one, decided on all their sums where it comes from sums (SWATS's switch)."""
    together = {}
    for run in runs:
        together.setdefault((run.key[1:3], run.h, run.store.device), []).append(run)
    return together.values()


def _shaped(algorithm):
    """Whether ``algorithm`` keeps state of other shapes than the parameters' (Adafactor's
    factors): then its step reads each tensor's rows, which must lie in C order to be
    stepped in place."""
    return algorithm.state_shape is not _Flat.state_shape


def _check_gradient(grad, local):
    """Refuse a gradient that the kernels cannot read as one of ``local``, the tensor
    they step. torch lets a gradient's dtype differ from its parameter's
    (``p.grad_dtype``), which the kernels would read as the parameter's, and its shape
    too (``p.grad.data = t``), where the kernels would read past its end."""
    if grad.layout is not torch.strided:
        raise TypeError(f"fastopt.torch does not support sparse gradients (a gradient of "
                        f"{grad.layout} for a parameter of shape {tuple(local.shape)})")
    if grad.dtype != local.dtype:
        raise TypeError(f"a gradient of {grad.dtype} for a parameter of {local.dtype} (shape "
                        f"{tuple(local.shape)}): fastopt.torch steps gradients of their "
                        "parameters' dtype; cast it (p.grad = p.grad.to(p.dtype))")
    if grad.shape != local.shape:
        raise ValueError(f"a gradient of shape {tuple(grad.shape)} for a parameter of shape "
                         f"{tuple(local.shape)}: fastopt.torch steps gradients of their "
                         "parameters' shape")


# -- the drop-in classes: torch.optim's signatures, fastopt's algorithms ------------------

def _drop_in_class(algorithm):
    """The ``fastopt.torch`` class of one algorithm of the registry: the arguments of its
    torch.optim namesake (those that are fastopt's too, those that choose torch's
    implementation, then fastopt's own additions), or fastopt's where there is none."""
    spec, name = algorithm.spec, algorithm.__name__
    ours = {h.name: h for h in spec.hyperparameters}
    if spec.torch is None:
        positional = [(h.name, h.default) for h in spec.hyperparameters if not h.keyword_only]
        keyword = [(h.name, h.default) for h in spec.hyperparameters if h.keyword_only]
        doc = (f"fastopt's {name} (no torch.optim namesake) as a torch.optim.Optimizer; see "
               f":class:`fastopt.{name}`.")
    else:
        theirs = list(inspect.signature(getattr(torch.optim, spec.torch)).parameters.values())
        positional = [(p.name, p.default) for p in theirs[1:]
                      if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
        keyword = [(p.name, p.default) for p in theirs if p.kind is inspect.Parameter.KEYWORD_ONLY]
        named = {p.name for p in theirs}  # fastopt's additions, and any this torch lacks:
        keyword += [(h.name, h.default) for h in spec.hyperparameters if h.name not in named]
        doc = (f"Drop-in torch.optim.{spec.torch} on fastopt's fused kernels; see "
               f":class:`fastopt.{name}` for the math and :mod:`fastopt.torch` for how "
               "parameters and gradients are kept.")
    if spec.per_tensor:
        doc += " Each parameter tensor is one tensor for its per-tensor norms and factors."
    if spec.host:
        doc += (f" A group's parameters that step together (with a gradient, of the same "
                f"step count, on one device) share its host state "
                f"({', '.join(spec.host)}).")
    torch_options = {n: default for n, default in positional + keyword if n not in ours}
    signature = {} if spec.torch is None else {  # fixed ones stay fixed (AdamW's decay)
        n: default for n, default in positional + keyword
        if n in named and n not in spec.fixed and default is not inspect.Parameter.empty}
    hyperparameters = ", ".join(f"{n}={n}" for n in ours)
    options = ", ".join(f"{n}={n}" for n in torch_options)
    init = define_init(f"{name}.__init__", positional, keyword,
                       f"Optimizer.__init__(self, params, dict({hyperparameters}, **fixed), "
                       f"dict({options}), **options)",
                       {"Optimizer": Optimizer, "fixed": dict(spec.fixed)}, Optimizer.__init__)
    return type(name, (Optimizer,), {"__init__": init, "__doc__": doc, "algorithm": algorithm,
                                     "__module__": __name__, "__qualname__": name,
                                     "_torch_defaults": torch_options,
                                     "_torch_signature": signature,
                                     "_torch_counts_steps": spec.torch != "SGD"})


for _name, _algorithm in ALGORITHMS.items():
    globals()[_name] = _drop_in_class(_algorithm)
