"""fastopt.torch on FSDP2: the DTensor parameters of a ``fully_shard``ed model, each rank
stepping its shards in place, on gloo with 2-4 forked ranks (the harness of
test_torch_clients: every rank a child process with a deadline).

The references are code nobody here wrote for these runs: torch.optim in the same FSDP2
arrangement, torch.nn.utils.clip_grad_norm_, and fastopt in one process on the whole
model, which FSDP2 on two ranks that all see the same batch must equal bit for bit (its
gradients are then the one process's: the average of two equal floats is exact).
"""

import copy
import io
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import fastopt.torch as ft  # noqa: E402
from test_torch_clients import (FORK, FORKSERVER, _init_gloo, assert_close,  # noqa: E402
                                assert_moved, batch, needs_gloo, run_ranks, subfolder,
                                tiny_model, warm)

pytestmark = [needs_gloo, pytest.mark.serial]  # collectives with deadlines

STEPS = 8
# Every algorithm that steps element by element, with options that reach its state.
ELEMENTWISE = [
    ("SGD", dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01)),
    ("Adagrad", dict(lr=0.05, lr_decay=0.01)),
    ("RMSprop", dict(lr=0.01, momentum=0.5, centered=True)),
    ("Adadelta", dict(lr=0.5)),
    ("Adam", dict(lr=0.01, amsgrad=True)),
    ("AdamW", dict(lr=0.01, weight_decay=0.1)),
    ("Adamax", dict(lr=0.01)),
    ("NAdam", dict(lr=0.01)),
    ("RAdam", dict(lr=0.01)),
    ("Rprop", dict(lr=0.01)),
    ("ASGD", dict(lr=0.01, t0=3)),
    ("Lion", dict(lr=0.001)),
    ("Adan", dict(lr=0.01)),
]


def sharded_model(world, dtype=torch.float32, seed=0):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = tiny_model(seed).to(dtype)
    fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
    return model


def full(tensors):
    """The whole tensors of DTensors (a collective: every rank calls it)."""
    return [t.detach().full_tensor().float().numpy() for t in tensors]


def comparable(value):
    """A state tensor as float32 (values) or int32 (a remainder's bits, which gloo does
    not gather as int16)."""
    return value.to(torch.float32 if value.is_floating_point() else torch.int32)


def full_state(opt):
    """The whole state tensors of DTensor parameters (a collective), copied (a replicated
    one's full tensor is its local one)."""
    return [{name: comparable(value).full_tensor().numpy().copy()
             for name, value in opt.state[p].items()
             if hasattr(value, "full_tensor")} for p in opt.param_groups[0]["params"]]


def plain_state(opt):
    return [{name: comparable(value).numpy() for name, value in opt.state[p].items()
             if isinstance(value, torch.Tensor) and value.dim() > 0}
            for p in opt.param_groups[0]["params"]]


def train(model, opt, data, steps=STEPS, before_step=None):
    losses = []
    for t in range(steps):
        opt.zero_grad()
        x, y = data(t)
        loss = ((model(x).float() - y) ** 2).mean()
        loss.backward()
        if before_step:
            before_step(t)
        opt.step()
        losses.append(loss.item())
    return losses


def same_batch(dtype=torch.float32):
    """Every rank (and the one process) sees the whole batch of step t."""
    return lambda t: tuple(v.to(dtype) if i == 0 else v for i, v in enumerate(batch(t)))


def own_batch(rank, world):
    """Each rank sees its part of the batch of step t (uneven for three ranks)."""
    def data(t):
        x, y = batch(t, rows=16)
        return x.chunk(world)[rank], y.chunk(world)[rank]
    return data


# -- bitwise the one-process step ------------------------------------------------------

ROUNDED = dict(lr=0.01, master_weights=None, state_dtype="bfloat16", stochastic_rounding=True,
               seed=3)


CASES = [(name, kwargs, torch.float32) for name, kwargs in ELEMENTWISE] + [
    ("AdamW", dict(lr=0.01, weight_decay=0.1), torch.bfloat16),  # float32 master weights
    ("Adam", dict(lr=0.01, master_weights="remainder", state_dtype="bfloat16"),
     torch.bfloat16),
    # Each element draws its bits by its place in the whole tensors, on any rank.
    ("Adam", ROUNDED, torch.bfloat16),
    ("SGD", dict(lr=0.05, momentum=0.9, state_dtype="bfloat16", stochastic_rounding=True),
     torch.float32),
]


def one_process(name, kwargs, dtype):
    model = tiny_model().to(dtype)
    opt = getattr(ft, name)(model.parameters(), **kwargs)
    losses = train(model, opt, same_batch(dtype))
    return losses, [p.detach().float().numpy() for p in model.parameters()], plain_state(opt)


def fsdp2_same_batch_rank(rank, world, rendezvous, cases):
    _init_gloo(rank, world, rendezvous)
    results = []
    for name, kwargs, dtype in cases:
        model = sharded_model(world, dtype)
        opt = getattr(ft, name)(model.parameters(), **kwargs)
        losses = train(model, opt, same_batch(dtype))
        results.append((losses, full(model.parameters()), full_state(opt),
                        [type(v).__name__ for v in opt.state[next(model.parameters())].values()
                         if isinstance(v, torch.Tensor) and v.dim() > 0]))
    return results


def partly_sharded_rank(rank, world, rendezvous):
    """FSDP2 on the last layer alone: its parameters DTensors, the first layer's plain."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    _init_gloo(rank, world, rendezvous)
    model = tiny_model().to(torch.bfloat16)
    fully_shard(model[2], mesh=init_device_mesh("cpu", (world,)))
    opt = ft.Adam(model.parameters(), **ROUNDED)
    train(model, opt, same_batch(torch.bfloat16))
    return [(p.full_tensor() if hasattr(p, "full_tensor") else p).detach().float().numpy()
            for p in model.parameters()]


def test_fsdp2_of_some_layers_rounds_stochastically_as_one_process(tmp_path):
    """Sharded and plain parameters of one dtype draw their random bits from one stream,
    each element by its place among the whole tensors, as in one process."""
    _, expected, _ = one_process("Adam", ROUNDED, torch.bfloat16)
    for rank, params in enumerate(run_ranks(partly_sharded_rank, (), tmp_path)):
        assert_moved([p.detach().float().numpy() for p in tiny_model().parameters()], params)
        for mine, theirs in zip(params, expected):
            np.testing.assert_array_equal(mine, theirs, err_msg=f"rank {rank}")


@pytest.mark.parametrize("part", [0, 1], ids=["first half", "second half"])
def test_fsdp2_steps_every_elementwise_algorithm_bitwise_as_one_process(part, tmp_path):
    cases = CASES[part::2]
    for name, kwargs, dtype in cases:
        warm(name, kwargs)
    expected = [one_process(*case) for case in cases]
    for rank, results in enumerate(run_ranks(fsdp2_same_batch_rank, (cases,), tmp_path)):
        for (name, kwargs, dtype), (losses, params, state, kinds), (their_losses, their_params,
                                                                   their_state) in zip(
                cases, results, expected):
            what = f"rank {rank}, {name} {kwargs} {dtype}"
            assert kinds and set(kinds) == {"DTensor"}, what  # state sharded as the params
            assert losses == their_losses, what
            assert_moved([p.detach().float().numpy() for p in tiny_model().parameters()],
                         params)
            for mine, theirs in zip(params, their_params):
                np.testing.assert_array_equal(mine, theirs, err_msg=what)
            assert [sorted(s) for s in state] == [sorted(s) for s in their_state], what
            for mine, theirs in zip(state, their_state):
                for key in theirs:
                    np.testing.assert_array_equal(mine[key], theirs[key], err_msg=f"{what} {key}")


# -- whole-tensor norms and counts, over the ranks -------------------------------------

# SWATS's eps of 0.01 passes its switch test (over whole tensors) at step 2 here and in
# CUT_CASES, so that the steps after it run SGD.
PER_TENSOR = [("LAMB", dict(lr=0.01, weight_decay=0.01)), ("LARS", dict(lr=0.1, momentum=0.9)),
              ("SWATS", dict(lr=0.01, eps=0.01)), ("Adam", dict(lr=0.01, caution=True)),
              ("Lion", dict(lr=0.001, caution=True))]


def fsdp2_per_tensor_rank(rank, world, rendezvous, cases):
    _init_gloo(rank, world, rendezvous)
    results = []
    for name, kwargs in cases:
        model = sharded_model(world)
        opt = getattr(ft, name)(model.parameters(), **kwargs)
        losses = train(model, opt, same_batch())
        results.append((losses, full(model.parameters()), full_state(opt)))
    return results


@pytest.mark.parametrize("world", [2, 3])
def test_fsdp2_per_tensor_norms_and_counts_are_the_whole_tensors(world, tmp_path):
    """LAMB's and LARS's trust ratios, SWATS's projections and the Cautious mask's share
    come from sums over each whole tensor, gathered over the ranks: as one process's, to
    a float64 rounding (one process chunks a tensor from its first element, FSDP2's
    ranks by rows). A rank's shard alone gives other norms and shares, and steps
    differently."""
    for name, kwargs in PER_TENSOR:
        warm(name, kwargs)
    expected = [one_process(name, kwargs, torch.float32) for name, kwargs in PER_TENSOR]
    for rank, results in enumerate(run_ranks(fsdp2_per_tensor_rank, (PER_TENSOR,), tmp_path,
                                             world=world)):
        for (name, kwargs), (losses, params, state), (their_losses, their_params,
                                                      their_state) in zip(
                PER_TENSOR, results, expected):
            what = f"rank {rank} of {world}, {name} {kwargs}"
            np.testing.assert_allclose(losses, their_losses, rtol=1e-6, err_msg=what)
            assert_close(params, their_params, rtol=1e-6, atol=1e-8, what=what)
            for mine, theirs in zip(state, their_state):
                for key in theirs:
                    np.testing.assert_allclose(mine[key], theirs[key], rtol=1e-5, atol=1e-9,
                                               err_msg=f"{what} {key}")


# -- sums that do not depend on where FSDP2 cuts ----------------------------------------

class CutModel(torch.nn.Module):
    """Tensors large enough that their float64 sums round, cut by FSDP2 at other
    elements on each number of ranks: a (120, 500) matrix, a vector of 6000 and a
    (3, 40000) matrix whose rows are longer than a chunk (on four ranks, one holds none).
    No forward: the gradients are set."""

    def __init__(self):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.weights = torch.nn.ParameterList(
            torch.nn.Parameter(torch.randn(shape, generator=generator))
            for shape in [(120, 500), (6000,), (3, 40000)])


CUT_CASES = [("AdamW", dict(lr=0.01, clip_grad_norm=50.0)),
             ("LAMB", dict(lr=0.01, weight_decay=0.01, clip_grad_norm=50.0)),
             ("LARS", dict(lr=0.1, momentum=0.9)), ("SWATS", dict(lr=0.01, eps=0.01)),
             ("Adam", dict(lr=0.01, caution=True))]


def fsdp2_cut_rank(rank, world, rendezvous):
    """Three steps of each case on the same whole gradients, cut as the parameters;
    the gradient norms of clipping, the per-tensor sums of every pass, and the whole
    parameters after them."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import distribute_tensor

    from fastopt.optim import engine

    _init_gloo(rank, world, rendezvous)
    sums, run = [], engine.Work.run

    def recorded(work, spec, *args, **kwargs):  # (in this child process only)
        found = run(work, spec, *args, **kwargs)
        sums.extend(np.asarray(column).tolist() for column in found)
        return found

    engine.Work.run = recorded
    results = []
    for name, kwargs in CUT_CASES:
        sums = []
        model = CutModel()
        fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
        opt = getattr(ft, name)(model.parameters(), **kwargs)
        norms = []
        for t in range(3):
            generator = torch.Generator().manual_seed(t)
            for p in model.parameters():
                whole = torch.randn(p.shape, generator=generator) * 10.0 ** (t - 1)
                p.grad = distribute_tensor(whole, p.device_mesh, p.placements)
            opt.step()
            norms.append(opt.last_grad_norm)
        results.append((norms, sums, full(model.parameters())))
    return results


def test_fsdp2_sums_over_whole_tensors_do_not_depend_on_the_cuts(tmp_path):
    """The gradient norm of clipping and LAMB's, LARS's, SWATS's and the Cautious
    share's per-tensor sums (float64) are bitwise the same on 1, 2, 3 and 4 ranks given
    the same gradients, and so are the parameters: their chunks begin at every row,
    where FSDP2 may cut, and every rank's chunk sums are added in the order of the rows.
    (Chunks of 16384 elements from each shard's start gave other float64 norms on each
    number of ranks.) Forkserver children: the kernels run in parallel on these sizes."""
    runs = {world: run_ranks(fsdp2_cut_rank, (), subfolder(tmp_path, str(world)), world=world,
                             context=FORKSERVER) for world in (1, 2, 3, 4)}
    (expected,) = runs.pop(1)
    for (name, kwargs), (norms, sums, params) in zip(CUT_CASES, expected):
        assert (norms[0] is not None) == ("clip_grad_norm" in kwargs), name
        assert (sums or name == "AdamW") and all(len(column) == 3 for column in sums), name
        assert_moved([p.detach().numpy() for p in CutModel().parameters()], params)
    for world, ranks in runs.items():
        for rank, results in enumerate(ranks):
            for (name, kwargs), (norms, sums, params), (their_norms, their_sums,
                                                        their_params) in zip(
                    CUT_CASES, results, expected):
                what = f"rank {rank} of {world}, {name} {kwargs}"
                assert norms == their_norms, what
                assert sums == their_sums, what
                for mine, theirs in zip(params, their_params):
                    np.testing.assert_array_equal(mine, theirs, err_msg=what)


def other_shardings_wholes(seed=0):
    """The whole tensors of other_shardings_rank (its gradients for seeds above 0)."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator) for shape in [(8, 6), (8, 6), (6,), (5,)]]


def other_shardings_rank(rank, world, rendezvous, kwargs):
    """LAMB with clipping on DTensors of a 2x2 mesh sharded otherwise than by rows alone:
    along rows and columns (two mesh dimensions), along columns, a vector sharded on one
    dimension and replicated on the other, and one replicated on both. Three steps of the same whole
    gradients; the gradient norms and the whole parameters."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    _init_gloo(rank, world, rendezvous)
    mesh = init_device_mesh("cpu", (2, 2))
    placements = [[Shard(0), Shard(1)], [Shard(1), Replicate()], [Replicate(), Shard(0)],
                  [Replicate(), Replicate()]]
    params = [torch.nn.Parameter(distribute_tensor(whole, mesh, where))
              for whole, where in zip(other_shardings_wholes(), placements)]
    opt = ft.LAMB(params, **kwargs)
    norms = []
    for t in range(3):
        for p, grad in zip(params, other_shardings_wholes(t + 1)):
            p.grad = distribute_tensor(grad, mesh, p.placements)
        opt.step()
        norms.append(opt.last_grad_norm)
    return norms, full(params)


def test_per_tensor_sums_over_other_shardings_are_the_whole_tensors(tmp_path):
    """Tensors sharded along columns or along two mesh dimensions add each rank's sums
    in rank order: the norms of clipping and LAMB's trust ratios are the whole
    tensors', as one process's to a float64 rounding (a rank's shard alone gives other
    ones: the clipped norm would be a shard's)."""
    kwargs = dict(lr=0.01, weight_decay=0.01, clip_grad_norm=1.0)
    warm("LAMB", kwargs)
    params = [torch.nn.Parameter(whole) for whole in other_shardings_wholes()]
    opt = ft.LAMB(params, **kwargs)
    norms = []
    for t in range(3):
        for p, grad in zip(params, other_shardings_wholes(t + 1)):
            p.grad = grad
        norms.append(math.sqrt(sum((grad.double() ** 2).sum().item()
                                   for grad in other_shardings_wholes(t + 1))))
        opt.step()
    expected = [p.detach().numpy() for p in params]
    for rank, (their_norms, their_params) in enumerate(
            run_ranks(other_shardings_rank, (kwargs,), tmp_path, world=4)):
        np.testing.assert_allclose(their_norms, norms, rtol=1e-12, err_msg=f"rank {rank}")
        assert_close(their_params, expected, rtol=1e-6, atol=1e-8, what=f"rank {rank}")


@pytest.mark.parametrize("shape, dim", [((7, 5), 0), ((3, 40000), 0), ((10,), 0), ((2, 9), 1),
                                        ((0, 4), 0), ((5, 3, 4), 0), ((4, 3, 50000), 2)])
@pytest.mark.parametrize("by_rows", [True, False])
def test_every_rank_counts_every_ranks_chunks_as_torch_chunk_cuts(shape, dim, by_rows):
    """The chunk counts that every rank works out from a DTensor's shape (no collective)
    are those of the pieces torch.chunk cuts, chunked as the tables chunk them."""
    from fastopt._backend import segment_chunks
    from fastopt.sharding import shard_chunks

    whole = torch.empty(shape)
    row = math.prod(shape[1:]) if by_rows and dim == 0 else 0
    for world in range(1, 6):
        pieces = list(whole.chunk(world, dim)) if shape[dim] else []
        pieces += [whole.narrow(dim, 0, 0)] * (world - len(pieces))
        expected = [len(segment_chunks([piece.numel()], [0], [row or piece.numel()]))
                    for piece in pieces]
        np.testing.assert_array_equal(shard_chunks(shape, dim, row, world), expected,
                                      err_msg=f"{shape} along {dim} on {world} ranks")


def uneven_rank(rank, world, rendezvous, name):
    """A DTensor whose shards are not torch.chunk's (rank 0 holds 3 of its 4 rows), in a
    parameter group after an even one: LAMB's and Adafactor's step raises on every rank,
    before it steps either."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    _init_gloo(rank, world, rendezvous)
    mesh = init_device_mesh("cpu", (world,))
    even = torch.nn.Parameter(distribute_tensor(torch.ones(4, 8), mesh, [Shard(0)]))
    local = torch.ones(3 if rank == 0 else 1, 8)
    uneven = torch.nn.Parameter(DTensor.from_local(local, mesh, [Shard(0)], run_check=False,
                                                   shape=(4, 8), stride=(8, 1)))
    opt = getattr(ft, name)([{"params": [even]}, {"params": [uneven]}], lr=0.1)
    for p in (even, uneven):
        p.grad = DTensor.from_local(torch.ones_like(p.to_local()), mesh, [Shard(0)],
                                    run_check=False, shape=p.shape, stride=p.stride())
    try:
        opt.step()
    except ValueError as error:
        return str(error), even.to_local().tolist(), uneven.to_local().tolist(), len(opt.state)
    return None


@pytest.mark.parametrize("name", ["LAMB", "Adafactor"])
def test_a_dtensor_of_uneven_shards_is_refused_before_a_step_that_sums(name, tmp_path):
    for rank, result in enumerate(run_ranks(uneven_rank, (name,), tmp_path,
                                            context=FORKSERVER)):
        assert result is not None, f"rank {rank} stepped"
        message, even, uneven, states = result
        assert "not the piece that torch.chunk cuts" in message and "(4, 8)" in message
        assert even == [[1.0] * 8] * 2 and uneven == [[1.0] * 8] * (3 if rank == 0 else 1)
        assert states == 0, rank


# -- torch.optim in the same FSDP2 run, with uneven and empty shards -------------------

def fsdp2_vs_torch_rank(rank, world, rendezvous, name, kwargs, clip):
    _init_gloo(rank, world, rendezvous)
    results = {}
    for impl in ("fastopt", "torch"):
        model = sharded_model(world)
        shards = [p.to_local().shape[0] for p in model.parameters()]
        norms = []
        if impl == "fastopt":
            opt = getattr(ft, name)(model.parameters(), clip_grad_norm=clip, **kwargs)
            before = None
        else:
            opt = getattr(torch.optim, name)(model.parameters(), foreach=False, **kwargs)

            def before(t):
                if clip is not None:
                    norms.append(float(torch.nn.utils.clip_grad_norm_(
                        model.parameters(), clip).full_tensor()))
        losses = []
        for t in range(STEPS):
            losses += train(model, opt, lambda _: own_batch(rank, world)(t), steps=1,
                            before_step=before)
            if impl == "fastopt" and clip is not None:
                norms.append(opt.last_grad_norm)
        results[impl] = (losses, full(model.parameters()), norms, shards)
    return results


@pytest.mark.parametrize("world", [3, 4])
@pytest.mark.parametrize("name, kwargs, clip", [("Adam", dict(lr=0.01), None),
                                                ("SGD", dict(lr=0.05, momentum=0.9), 0.05)],
                         ids=["Adam", "SGD-clipped"])
def test_fsdp2_trains_as_torch_optim_with_uneven_and_empty_shards(name, kwargs, clip, world,
                                                                  tmp_path):
    """Each rank its own part of the batch. Clipping is fastopt's fused global norm against
    torch's clip_grad_norm_ over the DTensor gradients: a norm of one rank's shards alone
    would clip differently on every rank."""
    warm(name, kwargs)
    ranks = run_ranks(fsdp2_vs_torch_rank, (name, kwargs, clip), tmp_path, world=world)
    if world == 4:  # the last rank holds no row of the (3, 8) weight and the bias of 3
        assert ranks[-1]["fastopt"][3][2:] == [0, 0], ranks[-1]["fastopt"][3]
    for rank, results in enumerate(ranks):
        ours, theirs = results["fastopt"], results["torch"]
        np.testing.assert_allclose(ours[0], theirs[0], rtol=1e-5, atol=1e-6)
        assert_close(ours[1], theirs[1], rtol=1e-5, atol=1e-6, what=f"rank {rank}")
        if clip is not None:
            assert min(theirs[2]) > clip  # every step clipped
            np.testing.assert_allclose(ours[2], theirs[2], rtol=1e-6)


# -- a non-finite gradient on one rank skips the step on every rank --------------------

def fsdp2_skip_rank(rank, world, rendezvous):
    _init_gloo(rank, world, rendezvous)
    model = sharded_model(world)
    opt = ft.Adam(model.parameters(), lr=0.01, skip_nonfinite=True)
    seen = []

    def poison(t):
        if t == 3 and rank == 1:
            next(model.parameters()).grad.to_local()[0, 0] = math.inf
        seen.append((full(model.parameters()), full_state(opt)))

    train(model, opt, own_batch(rank, world), steps=5, before_step=poison)
    return seen, (full(model.parameters()), full_state(opt)), opt.skipped_steps, \
        opt.last_grad_norm


def test_fsdp2_non_finite_gradient_on_one_rank_skips_the_step_on_every_rank(tmp_path):
    warm("Adam", dict(lr=0.01, skip_nonfinite=True))
    for rank, (seen, end, skipped, norm) in enumerate(
            run_ranks(fsdp2_skip_rank, (), tmp_path)):
        assert skipped == 1, rank
        before, after = seen[3], seen[4]  # the skipped step changed nothing
        assert_close(after[0], before[0], rtol=0, atol=0, what=f"rank {rank}")
        for mine, theirs in zip(after[1], before[1]):
            for key in theirs:
                np.testing.assert_array_equal(mine[key], theirs[key])
        assert_moved(seen[4][0], end[0])  # and the next one stepped
        assert math.isfinite(norm)


# -- torch.distributed.checkpoint: save on two ranks, resume on three ------------------

def fsdp2_checkpoint_rank(rank, world, rendezvous, directory, steps, load, name="AdamW",
                          kwargs=(("lr", 0.01), ("weight_decay", 0.1))):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_state_dict,
                                                         set_state_dict)

    _init_gloo(rank, world, rendezvous)
    model = sharded_model(world)
    opt = getattr(ft, name)(model.parameters(), **dict(kwargs))
    first = 0
    if load:
        model_state, optim_state = get_state_dict(model, opt)
        dcp.load({"model": model_state, "optim": optim_state}, checkpoint_id=directory)
        set_state_dict(model, opt, model_state_dict=model_state,
                       optim_state_dict=optim_state)
        first = STEPS
    loaded = full_state(opt), [opt.state[p].get("step") for p in opt.param_groups[0]["params"]]
    data = same_batch()
    train(model, opt, lambda t: data(first + t), steps=steps)
    if not load:
        model_state, optim_state = get_state_dict(model, opt)
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=directory)
    return full(model.parameters()), full_state(opt), loaded


@pytest.mark.parametrize("name, kwargs", [("AdamW", (("lr", 0.01), ("weight_decay", 0.1))),
                                          ("Adafactor", (("lr", 0.01),))],
                         ids=["AdamW", "Adafactor"])
def test_fsdp2_checkpoint_through_dcp_resumes_on_another_number_of_ranks(name, kwargs,
                                                                         tmp_path):
    """Two ranks train 8 steps and save with torch.distributed.checkpoint; three ranks
    load it (the shards cut elsewhere) and train 4 more: as one process's 12 steps, and
    the state as it was saved (Adafactor's row factors sharded as the rows, its column
    factors replicated)."""
    context = FORKSERVER if name == "Adafactor" else FORK  # see test_fsdp2_adafactor...
    if context is FORK:
        warm(name, dict(kwargs))
    directory = str(tmp_path / "checkpoint")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    saved = run_ranks(fsdp2_checkpoint_rank, (directory, STEPS, False, name, kwargs),
                      tmp_path / "a", context=context)[0]
    resumed = run_ranks(fsdp2_checkpoint_rank, (directory, 4, True, name, kwargs),
                        tmp_path / "b", world=3, context=context)
    model = tiny_model()
    opt = getattr(ft, name)(model.parameters(), **dict(kwargs))
    train(model, opt, same_batch(), steps=STEPS + 4)
    for rank, (params, state, (loaded, steps)) in enumerate(resumed):
        assert steps == [STEPS] * 4, rank
        assert all(loaded) and [sorted(s) for s in loaded] == [sorted(s) for s in saved[1]]
        for mine, theirs in zip(loaded, saved[1]):
            for key in theirs:
                np.testing.assert_array_equal(mine[key], theirs[key])
        # Three ranks average three equal gradients, not always exactly the gradient.
        assert_close(params, [p.detach().numpy() for p in model.parameters()], rtol=1e-6,
                     atol=1e-7, what=f"rank {rank}")


# -- Adafactor: the column factors of matrices split by rows, added over the ranks -----

def test_fsdp2_adafactor_adds_its_factors_over_the_ranks(tmp_path):
    """Two ranks on the same batches: bit for bit one process, factors too. Three and
    four ranks (one of which holds no row of the (3, 8) weight), each its equal part of
    the batches: as one process on the whole, to the rounding of the averages. Every
    rank runs in a forkserver child: Adafactor's kernels run in parallel even on tiny
    tensors, which Numba forbids in a child forked from a process that did so.
    (torch.optim.Adafactor fails on DTensors in torch 2.13: an in-place pow_ on a
    partial norm.)"""
    cases = [("Adafactor", dict(lr=0.01))]
    expected = one_process("Adafactor", dict(lr=0.01), torch.float32)
    for rank, [(losses, params, state)] in enumerate(run_ranks(
            fsdp2_per_tensor_rank, (cases,), subfolder(tmp_path, "same"), context=FORKSERVER)):
        assert losses == expected[0]
        for mine, theirs in zip(params, expected[1]):
            np.testing.assert_array_equal(mine, theirs, err_msg=f"rank {rank}")
        assert [sorted(s) for s in state] == [sorted(s) for s in expected[2]]
        for mine, theirs in zip(state, expected[2]):
            for key in theirs:
                np.testing.assert_array_equal(mine[key], theirs[key], err_msg=key)
    model = tiny_model()
    opt = ft.Adafactor(model.parameters(), lr=0.01)
    train(model, opt, lambda t: batch(t, rows=12))
    whole = [p.detach().numpy() for p in model.parameters()]
    for world in (3, 4):
        ranks = run_ranks(fsdp2_own_batch_rank, ("Adafactor", dict(lr=0.01), 12),
                          subfolder(tmp_path, str(world)), world=world, context=FORKSERVER)
        if world == 4:
            assert ranks[-1][1][2:] == [0, 0], ranks[-1][1]
        for rank, (params, _) in enumerate(ranks):
            assert_close(params, whole, rtol=1e-6, atol=1e-7, what=f"rank {rank} of {world}")


class RowBlocksModel(torch.nn.Module):
    """Matrices whose blocks of rows for Adafactor's column sums (of 256, 1 and 2048
    rows) FSDP2 cuts inside on 2, 3 and 4 ranks, where a block may run over three ranks
    (the (2000, 8) on four) and a rank may hold no row (the (3, 40000) on four); a
    tensor of 6 matrices that the ranks split between its matrices, and a vector. No
    forward: the gradients are set."""

    SHAPES = [(300, 64), (3, 40000), (2000, 8), (6, 30, 40), (6000,)]
    MATRIX_COLUMNS = 64 + 40000 + 8  # the first column factors, one per split matrix

    def __init__(self):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.weights = torch.nn.ParameterList(
            torch.nn.Parameter(torch.randn(shape, generator=generator))
            for shape in self.SHAPES)


def row_blocks_gradients(model, t):
    """Whole gradients of step ``t``, of magnitudes spread so that their float64 sums
    of squares round."""
    generator = torch.Generator().manual_seed(t)
    return [torch.randn(p.shape, generator=generator)
            * torch.exp(2 * torch.randn(p.shape, generator=generator)) for p in model.parameters()]


def adafactor_steps(model, opt, set_gradients, rows):
    """Three Adafactor steps; what each step computed from float64 sums: the targets
    of the split matrices' column factors, and, per tensor of ``rows[i]`` rows (a
    vector's: elements) here, the scales of its rows (none for a vector) and its step
    size (None where it has nothing here)."""
    from fastopt.optim import adafactor, engine

    columns, steps, move, run = [], [], adafactor._move, engine.Work.run
    vector = [len(shape) == 1 for shape in RowBlocksModel.SHAPES]

    def moving(backend, factor, slots, target, weight):
        if target.size >= RowBlocksModel.MATRIX_COLUMNS:  # the column factors, not rows'
            columns.append(np.array(target[:RowBlocksModel.MATRIX_COLUMNS]))
        return move(backend, factor, slots, target, weight)

    def running(work, spec, h, segments=None, values=(), states=None):
        if spec in (adafactor.Adafactor.ROW_STEP, adafactor.Adafactor.VECTOR_STEP):
            kind = [v == (spec == adafactor.Adafactor.VECTOR_STEP) for v in vector]
            counts = np.array(rows)[kind]
            parts = np.split(np.array(values), np.cumsum(counts)[:-1], axis=1)
            steps.append([(part[0] if spec == adafactor.Adafactor.ROW_STEP else None,
                           part[-1][0] if part.shape[1] else None) for part in parts])
        return run(work, spec, h, segments, values, states)

    adafactor._move, engine.Work.run = moving, running
    try:
        for t in range(3):
            set_gradients(row_blocks_gradients(model, t))
            opt.step()
    finally:
        adafactor._move, engine.Work.run = move, run
    return columns, steps


def rows_here(model):
    return [(p.to_local() if hasattr(p, "to_local") else p).numel() // p.shape[-1]
            for p in model.parameters()]


def fsdp2_adafactor_cut_rank(rank, world, rendezvous):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import distribute_tensor

    _init_gloo(rank, world, rendezvous)
    model = RowBlocksModel()
    fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
    opt = ft.Adafactor(model.parameters(), lr=0.01)

    def set_gradients(gradients):
        for p, whole in zip(model.parameters(), gradients):
            p.grad = distribute_tensor(whole, p.device_mesh, p.placements)

    sums = adafactor_steps(model, opt, set_gradients, rows_here(model))
    return sums, full(model.parameters()), full_state(opt)


def test_fsdp2_adafactor_sums_do_not_depend_on_the_cuts(tmp_path):
    """Adafactor's sums over tensors that FSDP2 splits by rows (a matrix's column sums,
    its row factors' sum, every tensor's RMS(θ) and RMS(U)) follow the rows from rank to
    rank (a vector's elements), so that given the same gradients they are bitwise the
    same on 1, 2, 3 and 4 ranks (float64), and so are the factors and parameters; and,
    but for the vector's, which one process sums by chunks, not by elements, one
    process's. (Each rank's sums added in rank order moved with the cuts.) Forkserver
    children: the kernels run in parallel on these sizes."""
    model = RowBlocksModel()
    opt = ft.Adafactor(model.parameters(), lr=0.01)

    def set_gradients(gradients):
        for p, whole in zip(model.parameters(), gradients):
            p.grad = whole

    columns, steps = adafactor_steps(model, opt, set_gradients, rows_here(model))
    params, state = [p.detach().numpy() for p in model.parameters()], plain_state(opt)
    assert_moved([p.detach().numpy() for p in RowBlocksModel().parameters()], params)
    assert len(columns) == 3 and len(steps) == 6  # steps: the rows' and the vector's
    runs = {world: run_ranks(fsdp2_adafactor_cut_rank, (), subfolder(tmp_path, str(world)),
                             world=world, context=FORKSERVER) for world in (1, 2, 3, 4)}
    ((first_sums, first_params, first_state),) = runs[1]
    for mine, theirs in zip(columns, first_sums[0]):  # one rank: one process's
        np.testing.assert_array_equal(theirs, mine, err_msg="column sums")
    for mine, theirs in zip(steps, first_sums[1]):
        for (scales, step), (their_scales, their_step) in zip(mine, theirs):
            assert their_step == step or (step is not None and scales is None), "a step size"
            np.testing.assert_array_equal(their_scales, scales)
    for i, (mine, theirs) in enumerate(zip(params, first_params)):
        if i < 4:
            np.testing.assert_array_equal(theirs, mine, err_msg=f"tensor {i}")
        else:  # the vector
            np.testing.assert_allclose(theirs, mine, rtol=1e-6)
    for mine, theirs in zip(state, first_state):
        assert sorted(theirs) == sorted(mine), sorted(theirs)
        for key in mine:
            np.testing.assert_array_equal(theirs[key], mine[key], err_msg=key)
    for world, ranks in runs.items():  # every number of ranks: one rank's
        for rank, ((their_columns, their_steps), their_params, their_state) in \
                enumerate(ranks):
            what = f"rank {rank} of {world}"
            for mine, theirs in zip(first_sums[0], their_columns):
                np.testing.assert_array_equal(theirs, mine, err_msg=f"{what}: column sums")
            for mine, theirs in zip(first_sums[1], their_steps):
                for (_, step), (_, their_step) in zip(mine, theirs):
                    assert their_step in (None, step), f"{what}: a step size"
            for mine, theirs in zip(first_state, their_state):
                for key in mine:
                    np.testing.assert_array_equal(theirs[key], mine[key], err_msg=f"{what} {key}")
            for mine, theirs in zip(first_params, their_params):
                np.testing.assert_array_equal(theirs, mine, err_msg=what)
        for t, mine in enumerate(first_sums[1]):  # every rank's row scales, in rank order
            for i, (scales, _) in enumerate(mine):
                if scales is not None:
                    np.testing.assert_array_equal(
                        np.concatenate([sums[1][t][i][0] for sums, *_ in ranks]), scales,
                        err_msg=f"{world} ranks, step {t}: row scales of tensor {i}")


# -- torch.save and copy.deepcopy of the state ------------------------------------------

def saved_rank(rank, world, rendezvous, kwargs, dtype):
    """Half the steps, ``torch.save`` of the model's and the optimizer's state_dict()
    (and a deep copy of the latter), the other half; then a new model and optimizer
    loaded from the files, the other half again."""
    _init_gloo(rank, world, rendezvous)

    def build():
        model = sharded_model(world, dtype)
        return model, ft.Adam(model.parameters(), **kwargs)

    data = same_batch(dtype)
    model, opt = build()
    train(model, opt, data, steps=STEPS // 2)
    files = io.BytesIO(), io.BytesIO()
    torch.save(model.state_dict(), files[0])
    torch.save(opt.state_dict(), files[1])
    copied = copy.deepcopy(opt.state_dict())
    train(model, opt, lambda t: data(STEPS // 2 + t), steps=STEPS // 2)
    uninterrupted = full(model.parameters())
    model, opt = build()
    for file, target in zip(files, (model, opt)):
        file.seek(0)
        target.load_state_dict(torch.load(file, weights_only=False))
    loaded = opt.state_dict()
    same = [torch.equal(comparable(copied["state"][i][name]).to_local(),
                        comparable(value).to_local())
            for i, state in loaded["state"].items() for name, value in state.items()
            if isinstance(value, torch.Tensor) and value.dim()]
    train(model, opt, lambda t: data(STEPS // 2 + t), steps=STEPS // 2)
    return full(model.parameters()), uninterrupted, same


@pytest.mark.parametrize("kwargs, dtype", [
    (dict(lr=0.01), torch.float32),
    (dict(lr=0.01, master_weights="remainder", state_dtype="bfloat16"), torch.bfloat16)],
    ids=["float32", "bfloat16 state and remainders"])
def test_fsdp2_state_dict_saves_with_torch_and_resumes_bitwise(kwargs, dtype, tmp_path):
    """``torch.save(opt.state_dict())`` on each rank, as users save FSDP2 checkpoints
    without DCP, and ``copy.deepcopy`` of it: the state tensors are DTensors over views
    of one buffer per store, which torch pickles and copies only with a storage each.
    Resumed from the files, every rank steps as the run that did not stop, bit for bit,
    and the deep copy holds what the files do."""
    for rank, (resumed, uninterrupted, same) in enumerate(
            run_ranks(saved_rank, (kwargs, dtype), tmp_path)):
        assert same and all(same), rank
        assert_close(resumed, uninterrupted, rtol=0, atol=0, what=f"rank {rank}")


REMAINDERS = dict(lr=0.01, master_weights="remainder")


def full_optimizer_state(model, opt):
    """torch's full state dict of ``opt`` (gathered from the ranks where ``model`` is
    sharded), as arrays by parameter name."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                         get_optimizer_state_dict)

    saved = get_optimizer_state_dict(model, opt,
                                     options=StateDictOptions(full_state_dict=True))
    return {name: {key: value.numpy() for key, value in state.items() if value.dim()}
            for name, state in saved["state"].items()}


def full_remainders_rank(rank, world, rendezvous):
    _init_gloo(rank, world, rendezvous)
    model = sharded_model(world, torch.bfloat16)
    opt = ft.Adam(model.parameters(), **REMAINDERS)
    train(model, opt, same_batch(torch.bfloat16), steps=3)
    return full_optimizer_state(model, opt)


def test_fsdp2_full_state_dict_of_remainders_gathers_their_master_weights(tmp_path):
    """A full state dict (``get_optimizer_state_dict(..., full_state_dict=True)``, an
    all-gather) of bfloat16 parameters with remainders holds their float32 master
    weights, which gloo gathers (it has no int16, and neither has NCCL): one process's,
    bit for bit, of which each parameter is the rounding that remainders rebuild from
    (ties away from zero)."""
    model = tiny_model().to(torch.bfloat16)
    opt = ft.Adam(model.parameters(), **REMAINDERS)
    train(model, opt, same_batch(torch.bfloat16), steps=3)
    expected = full_optimizer_state(model, opt)
    params = {name: p.detach().view(torch.int16).numpy().view(np.uint16)
              for name, p in model.named_parameters()}
    for name, state in expected.items():
        master = state["master"].view(np.uint32)
        assert state["master"].dtype == np.float32 and master.shape == params[name].shape
        rounded = (master >> 16) + ((master & 0xFFFF) >= 0x8000)  # +1: away from zero
        np.testing.assert_array_equal(rounded.astype(np.uint16), params[name])
        assert (master & 0xFFFF).any(), name  # more than the parameters' bits
    for rank, gathered in enumerate(run_ranks(full_remainders_rank, (), tmp_path)):
        assert sorted(gathered) == sorted(expected), rank
        for name, state in expected.items():
            for key, value in state.items():
                np.testing.assert_array_equal(gathered[name][key], value,
                                              err_msg=f"rank {rank}: {name} {key}")


# -- 8-bit state: blocks of each rank's shard, checkpoints as values ------------------

def int8_sharded_model(world=None):
    """Its first weight (64 x 128) is quantized; two or three ranks cut it on blocks
    of 256 (two rows), so that the shards' blocks are one process's. The rest is too
    small to quantize."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(128, 64), torch.nn.Tanh(),
                                torch.nn.Linear(64, 3))
    if world is not None:
        fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
    return model


def int8_batch(t):
    generator = torch.Generator().manual_seed(t)
    return torch.randn(16, 128, generator=generator), torch.randn(16, 3, generator=generator)


def decoded(opt, params):
    """The whole state of ``opt``'s state_dict(), as arrays (a collective)."""
    return [{name: (value.full_tensor() if hasattr(value, "full_tensor") else value).numpy()
             for name, value in opt.state_dict()["state"][i].items()
             if isinstance(value, torch.Tensor) and value.dim()} for i in range(len(params))]


def fsdp2_int8_rank(rank, world, rendezvous, directory, load):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    _init_gloo(rank, world, rendezvous)
    model = int8_sharded_model(world)
    params = list(model.parameters())
    opt = ft.Adam(params, lr=0.01, state_dtype="int8")
    first, loaded = 0, None
    if load:
        model_state, optim_state = get_state_dict(model, opt)
        dcp.load({"model": model_state, "optim": optim_state}, checkpoint_id=directory)
        set_state_dict(model, opt, model_state_dict=model_state, optim_state_dict=optim_state)
        first, loaded = STEPS // 2, decoded(opt, params)
    train(model, opt, lambda t: int8_batch(first + t), steps=STEPS // 2)
    kinds = {name: type(value).__name__ for name, value in opt.state[params[0]].items()}
    saved = None
    if not load:
        saved = decoded(opt, params)
        model_state, optim_state = get_state_dict(model, opt)
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=directory)
        train(model, opt, lambda t: int8_batch(STEPS // 2 + t), steps=STEPS // 2)
    return full(params), saved, loaded, kinds, opt.state[params[0]]["exp_avg"].dtype


def test_fsdp2_int8_state_quantizes_each_shard_and_checkpoints_its_values(tmp_path):
    """Two ranks on the same batches quantize their shards' blocks, here one process's:
    bit for bit its parameters and (decoded) state. The codes are DTensors sharded as
    the parameters; state_dict() holds their values, so that DCP reshards them, and a
    load encodes them again in the blocks of the shards it meets (each block's absmax
    the smallest that holds its values in the map's range, which gives back the codes
    and, here, the absmax): resumed on two ranks, bit for bit as not stopping; on three,
    whose average of three equal gradients is not always exact, close to it."""
    model = int8_sharded_model()
    opt = ft.Adam(model.parameters(), lr=0.01, state_dtype="int8")
    train(model, opt, int8_batch, steps=STEPS // 2)
    expected_state = [{name: value.numpy().copy() for name, value in state.items()
                       if value.dim()} for state in opt.decoded_state_dict()["state"].values()]
    train(model, opt, lambda t: int8_batch(STEPS // 2 + t), steps=STEPS // 2)
    expected = [p.detach().numpy() for p in model.parameters()]
    directory = str(tmp_path / "checkpoint")
    for sub in ("save", "two", "three"):
        (tmp_path / sub).mkdir()
    saved = run_ranks(fsdp2_int8_rank, (directory, False), tmp_path / "save")
    for rank, (params, state, _, kinds, dtype) in enumerate(saved):
        assert dtype == torch.uint8 and kinds["exp_avg"] == "DTensor", (rank, kinds)
        assert kinds["exp_avg_absmax"] == "Tensor"  # this rank's blocks'
        for mine, theirs in zip(params, expected):
            np.testing.assert_array_equal(mine, theirs, err_msg=f"rank {rank}")
        for mine, theirs in zip(state, expected_state):
            assert sorted(mine) == sorted(theirs)
            for key in theirs:
                np.testing.assert_array_equal(mine[key], theirs[key], err_msg=key)
    for world in (2, 3):
        for rank, (params, _, loaded, _, _) in enumerate(run_ranks(
                fsdp2_int8_rank, (directory, True), tmp_path / ("two", "three")[world - 2],
                world=world)):
            what = f"resumed rank {rank} of {world}"
            for mine, theirs in zip(loaded, saved[0][1]):
                for key in theirs:
                    np.testing.assert_array_equal(mine[key], theirs[key],
                                                  err_msg=f"{what} {key}")
            tolerance = 0 if world == 2 else 1e-6
            assert_close(params, expected, rtol=tolerance, atol=tolerance / 10, what=what)


def plain_int8_into_fsdp2_rank(rank, world, rendezvous, path):
    """The checkpoint at ``path`` (a plain model's full state dict of 8-bit state, with
    the model's) loaded under FSDP2 with ``set_state_dict(..., full_state_dict=True)``:
    the decoded state as loaded, and the parameters after stepping on."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    _init_gloo(rank, world, rendezvous)
    model = int8_sharded_model(world)
    params = list(model.parameters())
    opt = ft.Adam(params, lr=0.01, state_dtype="int8")
    saved = torch.load(path, weights_only=False)
    set_state_dict(model, opt, model_state_dict=saved["model"], optim_state_dict=saved["optim"],
                   options=StateDictOptions(full_state_dict=True))
    loaded = decoded(opt, params)
    train(model, opt, lambda t: int8_batch(STEPS // 2 + t), steps=STEPS // 2)
    return loaded, full(params)


def test_fsdp2_loads_a_plain_models_full_state_dict_of_8_bit_codes(tmp_path):
    """A plain model's state_dict holds 8-bit codes, which set_state_dict(...,
    full_state_dict=True) puts beside the FSDP2 optimizer's own values (DTensors, of its
    fresh state): the codes are taken, and each rank encodes its blocks of the values
    they stand for (here one process's blocks), so the state is the plain one's to a
    float32 step of the scales, and training goes on as the plain run does."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    model = int8_sharded_model()
    opt = ft.Adam(model.parameters(), lr=0.01, state_dtype="int8")
    train(model, opt, int8_batch, steps=STEPS // 2)
    expected_state = [{name: value.numpy().copy() for name, value in state.items()
                       if value.dim()} for state in opt.decoded_state_dict()["state"].values()]
    model_state, optim_state = get_state_dict(model, opt,
                                              options=StateDictOptions(full_state_dict=True))
    assert "exp_avg_codes" in optim_state["state"]["0.weight"]
    torch.save({"model": model_state, "optim": optim_state}, tmp_path / "full.pt")
    train(model, opt, lambda t: int8_batch(STEPS // 2 + t), steps=STEPS // 2)
    expected = [p.detach().numpy() for p in model.parameters()]
    for rank, (loaded, params) in enumerate(run_ranks(
            plain_int8_into_fsdp2_rank, (str(tmp_path / "full.pt"),),
            subfolder(tmp_path, "ranks"))):
        for mine, theirs in zip(loaded, expected_state):
            assert sorted(mine) == sorted(theirs)
            for key in theirs:
                np.testing.assert_allclose(mine[key], theirs[key], rtol=2.5e-7, atol=0,
                                           err_msg=f"rank {rank} {key}")
        assert_close(params, expected, rtol=1e-6, atol=1e-7, what=f"rank {rank}")


def int8_relayout_rank(rank, world, rendezvous):
    """Per sharding of a matrix: this rank's parameters, codes and scales of two
    optimizers with 8-bit state that step it alike, the first given a new parameter
    group (a new store, to which the codes are copied) after two steps."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    _init_gloo(rank, world, rendezvous)
    mesh = init_device_mesh("cpu", (world,))
    results = {}
    for dim, transposed in ((0, False), (1, False), (0, True), (1, True)):
        torch.manual_seed(0)
        whole = torch.randn(64, 128)
        whole = whole.t() if transposed else whole
        pair = [torch.nn.Parameter(distribute_tensor(whole, mesh, [Shard(dim)]))
                for _ in range(2)]
        opts = [ft.Adam([p], lr=0.01, state_dtype="int8") for p in pair]
        for t in range(4):
            if t == 2:
                extra = distribute_tensor(torch.zeros(8), mesh, [Shard(0)])
                opts[0].add_param_group({"params": [torch.nn.Parameter(extra)]})
            grad = torch.randn(whole.shape, generator=torch.Generator().manual_seed(t))
            for p, opt in zip(pair, opts):
                p.grad = distribute_tensor(grad, mesh, [Shard(dim)])
                opt.step()
        results[dim, transposed] = [
            {"param": p.detach().to_local().numpy().copy(),
             **{name: (value.to_local() if hasattr(value, "to_local") else value).numpy().copy()
                for name, value in opt.state[p].items() if isinstance(value, torch.Tensor)
                and value.dim()},
             "kinds": {name: (type(value).__name__, value.dtype)
                       for name, value in opt.state[p].items() if name != "step"}}
            for p, opt in zip(pair, opts)]
    return results


def test_fsdp2_int8_state_of_any_sharding_survives_a_new_parameter_group(tmp_path):
    """A new parameter group builds new stores, into which the 8-bit state is copied:
    codes as they are where they lie as the new store keeps them (this rank's shard's
    layout, which a DTensor's strides, those of the whole tensor, do not tell), scales
    as this rank's plain tensors. The steps after it are bit for bit those of an
    optimizer that kept its stores, for rows and columns of a matrix and of its
    transpose shared by the ranks."""
    warm("Adam", dict(lr=0.01))
    for rank, results in enumerate(run_ranks(int8_relayout_rank, (), tmp_path)):
        for (dim, transposed), (regrouped, kept) in results.items():
            what = f"rank {rank}, Shard({dim}){' of the transpose' if transposed else ''}"
            assert regrouped["kinds"] == kept["kinds"], what
            assert kept["kinds"]["exp_avg"] == ("DTensor", torch.uint8), what
            assert kept["kinds"]["exp_avg_absmax"] == ("Tensor", torch.float32), what
            assert sorted(regrouped) == sorted(kept), what
            for key in kept:
                if key != "kinds":
                    np.testing.assert_array_equal(regrouped[key], kept[key],
                                                  err_msg=f"{what}: {key}")


# -- what fastopt.torch does not step on shards yet: clear errors ---------------------

def column_sharded(world):
    """A matrix whose columns the ranks share (tensor parallelism's Shard(1))."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    torch.manual_seed(0)
    mesh = init_device_mesh("cpu", (world,))
    return torch.nn.Parameter(distribute_tensor(torch.randn(4, 6), mesh, [Shard(1)]))


def fsdp2_refusals_rank(rank, world, rendezvous):
    _init_gloo(rank, world, rendezvous)
    model = sharded_model(world)
    errors = {}
    columns = column_sharded(world)
    attempts = {
        "Adafactor": lambda: ft.Adafactor([("columns", columns)], lr=0.01),
        "columns, stochastic": lambda: ft.Adam([("columns", columns)], lr=0.01,
                                               state_dtype="bfloat16",
                                               stochastic_rounding=True),
        "int8, stochastic": lambda: ft.Adam(
            sharded_model(world, torch.bfloat16).parameters(), lr=0.01, master_weights=None,
            state_dtype="int8", stochastic_rounding=True),
    }
    for what, attempt in attempts.items():
        try:
            attempt()
        except (TypeError, ValueError) as error:
            errors[what] = (type(error).__name__, str(error))
    # A plain tensor put in place of a DTensor's state is refused before anything changes.
    opt = ft.Adam(model.parameters(), lr=0.01)
    train(model, opt, own_batch(rank, world), steps=2)
    p = next(model.parameters())
    before = full(model.parameters()), full_state(opt)
    opt.state[p]["exp_avg"] = torch.zeros(p.shape)
    try:
        train(model, opt, own_batch(rank, world), steps=1)
    except TypeError as error:
        errors["plain state"] = ("TypeError", str(error))
    refused = full(model.parameters()), full_state(opt)
    opt.state[p]["exp_avg"] = torch.zeros_like(p)  # a DTensor sharded as p: taken
    train(model, opt, own_batch(rank, world), steps=1)
    return errors, before, refused, full(model.parameters())


def test_fsdp2_what_is_not_stepped_on_shards_yet_is_refused_clearly(tmp_path):
    warm("Adam", dict(lr=0.01))
    for rank, (errors, before, refused, after) in enumerate(
            run_ranks(fsdp2_refusals_rank, (), tmp_path)):
        assert errors["Adafactor"][0] == "TypeError" and "columns" in errors["Adafactor"][1]
        assert "sharded by rows" in errors["Adafactor"][1]
        for what in ("columns, stochastic", "int8, stochastic"):
            assert errors[what][0] == "ValueError", errors
            assert "stochastic rounding steps shards split by rows" in errors[what][1]
        assert "not a DTensor" in errors["plain state"][1], errors["plain state"]
        assert_close(refused[0], before[0], rtol=0, atol=0)  # the refused step wrote nothing
        assert sorted(refused[1][0]) == ["exp_avg_sq"]  # the plain exp_avg, as put there
        for mine, theirs in zip(refused[1], before[1]):
            for key in mine:
                np.testing.assert_array_equal(mine[key], theirs[key])
        assert_moved(before[0], after)


# -- the example, as a user launches it ----------------------------------------------

@pytest.mark.parametrize("sharding", ["fsdp2", "zero", "zero2"])
def test_the_example_trains_with_torchrun_as_torch_optim_does(sharding, tmp_path):
    """``torchrun --standalone --nproc-per-node=2 examples/sharded_train.py``: fastopt's
    losses follow torch.optim's (FSDP2 against FSDP2, or fastopt's ZeRO, stage 1 or 2,
    against DDP; both clipped), the checkpoint is written, and a second launch on three
    ranks resumes
    from it."""
    import pathlib
    import subprocess
    import sys

    script = pathlib.Path(__file__).parents[1] / "examples" / "sharded_train.py"
    checkpoint = tmp_path / "checkpoint"

    def launch(ranks, steps):
        done = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone",
             f"--nproc-per-node={ranks}", str(script), "--sharding", sharding,
             "--steps", str(steps),
             "--checkpoint", str(checkpoint)],
            capture_output=True, text=True, timeout=300, cwd=tmp_path)
        # torch 2.13's gloo sometimes aborts a process at its exit, after everything
        # ("terminate called without an active exception"; one run in ten with DDP
        # alone here): the run is judged by what it printed.
        exit_abort = "terminate called without an active exception" in done.stderr
        assert done.returncode == 0 or exit_abort and "final loss" in done.stdout, \
            done.stdout + done.stderr[-3000:]
        rows = [line.split() for line in done.stdout.splitlines()
                if len(line.split()) == 3 and line.split()[0].isdigit()]
        return done.stdout, np.array(rows, float)

    out, rows = launch(2, 20)
    assert "2 ranks, " in out and [int(step) for step in rows[:, 0]] == [0, 10]
    np.testing.assert_allclose(rows[:, 1], rows[:, 2], rtol=1e-3)
    assert (checkpoint / (".metadata" if sharding == "fsdp2" else "optimizer/index.json")).exists()
    out, rows = launch(3, 10)
    assert "resumed at step 20" in out and [int(step) for step in rows[:, 0]] == [20]


def fsdp2_own_batch_rank(rank, world, rendezvous, name, kwargs, rows):
    """Each rank its equal part of batches of ``rows``; the parameters at the end."""
    _init_gloo(rank, world, rendezvous)
    model = sharded_model(world)
    opt = getattr(ft, name)(model.parameters(), **kwargs)

    def data(t):
        x, y = batch(t, rows=rows)
        return x.chunk(world)[rank], y.chunk(world)[rank]

    train(model, opt, data)
    return full(model.parameters()), [p.to_local().shape[0] for p in model.parameters()]
