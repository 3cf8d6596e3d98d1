"""fastopt.torch's own ZeRO sharding (``process_group=``): each rank keeps the state of
its partition of the flat parameters (cut through tensors), steps it, and all-gathers
the parameters; on gloo with 1-4 forked ranks (the harness of test_torch_clients).
Stage 2 (``zero_stage=2``) reduces the gradients during backward, in buckets.

The reference is fastopt in one process: given the same gradients (every rank the whole
batch, ``reduce_grads=False``), the sharded step must give bitwise the same parameters
and state for every algorithm, also where sums over whole tensors enter (the clipping
norm, LAMB, LARS, SWATS, caution): the cuts fall between the kernels' chunks of 16384
elements, whose sums every rank adds up as one process does.
"""

import datetime
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.distributed as dist  # noqa: E402

import fastopt  # noqa: E402
import fastopt.torch as ft  # noqa: E402
from fastopt.kernels._template import SEGMENT_CHUNK  # noqa: E402
from fastopt.optim.spec import ALGORITHMS  # noqa: E402
from fastopt.sharding import Partition  # noqa: E402
from test_torch_clients import FORKSERVER, needs_gloo, run_ranks, subfolder  # noqa: E402

pytestmark = [needs_gloo, pytest.mark.serial]  # collectives with deadlines

STEPS = 5
BUCKET_MB = 200 * 4 / 2 ** 20  # 200 floats: buckets cut through tensors and shares
OPTIONS = {"SGD": dict(lr=0.05, momentum=0.9), "Adagrad": dict(lr=0.05),
           "RMSprop": dict(lr=0.01, centered=True), "Adadelta": dict(lr=0.5),
           "Adam": dict(lr=0.01, amsgrad=True), "AdamW": dict(lr=0.01, weight_decay=0.1),
           "Rprop": dict(lr=0.01), "ASGD": dict(lr=0.01, t0=2)}
# Every algorithm but Adafactor (which has a test of its own, see there), with options
# that reach its state; then the options around the kernels, the formats, and the
# per-tensor sums.
CASES = [(name, OPTIONS.get(name, dict(lr=0.01)), torch.float32)
         for name in ALGORITHMS if name != "Adafactor"] + [
    ("AdamW", dict(lr=0.01, clip_grad_norm=0.05, skip_nonfinite=True), torch.float32),
    ("Adam", dict(lr=0.01, caution=True), torch.float32),
    ("AdamW", dict(lr=0.01), torch.bfloat16),
    ("Adam", dict(lr=0.01, master_weights="remainder", state_dtype="bfloat16"),
     torch.bfloat16),
    # Each element draws its random bits by its place in the whole flat buffer.
    ("Adam", dict(lr=0.01, master_weights=None, state_dtype="bfloat16",
                  stochastic_rounding=True, seed=3), torch.bfloat16),
    # An eps at which its switch test, on sums over whole tensors, passes within STEPS
    ("SWATS", dict(lr=0.01, eps=0.01), torch.float32),
]


def model(dtype=torch.float32, width=20):
    """30 * width + 123 parameters in 4 tensors. Width 20: 723, which every partition
    into 2-4 cuts between tensors (the next chunk of 16384 is beyond them), so that the
    forked ranks' kernels run serially (see test_torch_clients). Width 1024: 30843, which
    every partition into 2-4 cuts inside the first weight (30720), between its chunks."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(width, 30), torch.nn.Tanh(),
                               torch.nn.Linear(30, 3)).to(dtype)


def batch(t, rank=None, world=None, width=20):
    generator = torch.Generator().manual_seed(t)
    x, y = torch.randn(16, width, generator=generator), torch.randn(16, 3, generator=generator)
    if rank is not None:
        x, y = x.chunk(world)[rank], y.chunk(world)[rank]
    return x, y


def train(net, opt, steps=STEPS, first=0, rank=None, world=None, dtype=torch.float32,
          width=20):
    # One torch thread, as the ranks have (test_torch_clients._child): on some machines
    # (an Intel Xeon here) torch's thread count changes the gradients' last bits, which
    # the bitwise comparisons with one process must not see.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for t in range(first, first + steps):
            opt.zero_grad()
            x, y = batch(t, rank, world, width)
            ((net(x.to(dtype)).float() - y) ** 2).mean().backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)


def snapshot(net, state_dict):
    params = [p.detach().float().numpy().copy() for p in net.parameters()]
    state = {index: {name: _array(value) for name, value in values.items()}
             for index, values in state_dict["state"].items()}
    return params, state


def _array(value):
    if not isinstance(value, torch.Tensor):
        return np.asarray(value)  # host state: SWATS's phase ...
    return (value.float() if value.is_floating_point() else value).numpy().copy()


def one_process(name, kwargs, dtype, steps=STEPS, width=20):
    net = model(dtype, width)
    opt = getattr(ft, name)(net.parameters(), **kwargs)
    train(net, opt, steps, dtype=dtype, width=width)
    return snapshot(net, opt.state_dict())


def _init(rank, world, rendezvous, timeout=60):
    dist.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout))


def same_gradients_rank(rank, world, rendezvous, cases, zero_stage, width=20):
    _init(rank, world, rendezvous)
    results = []
    for name, kwargs, dtype in cases:
        net = model(dtype, width)
        opt = getattr(ft, name)(net.parameters(), process_group=dist.group.WORLD,
                                reduce_grads=False, zero_stage=zero_stage,
                                bucket_cap_mb=BUCKET_MB, **kwargs)
        train(net, opt, dtype=dtype, width=width)
        whole = opt.consolidated_state_dict(to=0)
        local = [tuple(v.shape) for v in opt.state[next(net.parameters())].values()
                 if isinstance(v, torch.Tensor) and v.dim()]
        results.append((snapshot(net, whole) if rank == 0 else snapshot(net, {"state": {}}),
                        local, _grads_after_backward(net, dtype)))
    return results


def _grads_after_backward(net, dtype):
    """Which parameters hold a ``.grad`` after one more backward."""
    x, y = batch(0, width=net[0].in_features)
    ((net(x.to(dtype)).float() - y) ** 2).mean().backward()
    return [p.grad is not None for p in net.parameters()]


def assert_same(ours, theirs, what):
    """Parameters and state, bit for bit."""
    for mine, expected in zip(ours[0], theirs[0]):
        np.testing.assert_array_equal(mine, expected, err_msg=what)
    if ours[1]:
        assert sorted(ours[1]) == sorted(theirs[1]), what
        for index, values in theirs[1].items():
            assert sorted(ours[1][index]) == sorted(values), what
            for key, value in values.items():
                np.testing.assert_array_equal(ours[1][index][key], value,
                                              err_msg=f"{what}: state {index} {key}")


@pytest.mark.parametrize("zero_stage", [1, 2])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_sharded_step_is_bitwise_the_one_process_step_for_every_algorithm(world, zero_stage,
                                                                         tmp_path):
    """Parameters on every rank, and the consolidated state, equal one process's, bit for
    bit; each rank keeps state for its own elements only, and at stage 2 no whole
    gradient once backward is over. The partitions cut between tensors."""
    expected = [one_process(*case) for case in CASES]  # compiles before the fork
    ranks = run_ranks(same_gradients_rank, (CASES, zero_stage), tmp_path, world=world,
                      timeout=300)
    assert_sharded_as_one_process(ranks, expected, world, zero_stage, 20)


@pytest.mark.parametrize("zero_stage", [1, 2])
@pytest.mark.parametrize("world", [2, 3, 4])
def test_cuts_inside_tensors_are_bitwise_the_one_process_step_too(world, zero_stage,
                                                                  tmp_path):
    """As above, with partitions that cut the first weight (between its chunks, where
    the sums over it add up as one process's). Its 30720 elements take the kernels'
    threads, which Numba forbids in a child forked from a process that ran them: the
    ranks are forkserver children."""
    expected = [one_process(*case, width=1024) for case in CASES]
    assert 1 < expected[-1][1][0]["switch_step"] < STEPS  # SWATS switched, and stepped SGD
    ranks = run_ranks(same_gradients_rank, (CASES, zero_stage, 1024), tmp_path, world=world,
                      timeout=300, context=FORKSERVER)
    assert Partition([30720, 30, 90, 3], 0, world).bounds[1] == 16384  # inside the weight
    assert_sharded_as_one_process(ranks, expected, world, zero_stage, 1024)


def assert_sharded_as_one_process(ranks, expected, world, zero_stage, width):
    sizes = [p.numel() for p in model(width=width).parameters()]
    for rank, results in enumerate(ranks):
        pieces = Partition(sizes, rank, world).pieces
        for (name, kwargs, dtype), (ours, local, grads), theirs in zip(CASES, results,
                                                                        expected):
            what = f"rank {rank} of {world}, {name} {kwargs} {dtype}"
            assert_same(ours, theirs if rank == 0 else (theirs[0], {}), what)
            first, last = pieces[0]
            assert local and set(local) == {(last - first,)}, (what, local)
            assert grads == [zero_stage == 1] * len(sizes), what


def test_partitions_are_equal_shares_cut_between_chunks_inside_tensors():
    sizes = [60000, 300, 40000, 3]
    for world in (1, 2, 3, 4, 7):
        partitions = [Partition(sizes, rank, world) for rank in range(world)]
        bounds = partitions[0].bounds
        assert bounds[0] == 0 and bounds[-1] == sum(sizes) and bounds == sorted(bounds)
        for cut in bounds[1:-1]:  # on a tensor's boundary or between its chunks
            starts = np.cumsum([0] + sizes)
            tensor = np.searchsorted(starts, cut, side="right") - 1
            assert cut in starts or (cut - starts[tensor]) % SEGMENT_CHUNK == 0, (world, bounds)
        for index, size in enumerate(sizes):  # every element stepped by one rank
            owned = np.zeros(size, int)
            for partition in partitions:
                first, last = partition.pieces[index]
                owned[first:last] += 1
            assert (owned == 1).all(), (world, index)
    assert Partition(sizes, 0, 2).bounds == [0, 60000, 100303]  # the next chunk: the end
    assert Partition(sizes, 0, 3).bounds == [0, 3 * 16384, 60300 + 16384, 100303]


# -- Adafactor: partitions of whole tensors -------------------------------------------

def adafactor_rank(rank, world, rendezvous, folder, resume):
    """Stage 1, then stage 2, every rank the whole batch; stage 1's whole state saved
    (on rank 0); or, where ``resume``, loaded and trained on."""
    _init(rank, world, rendezvous)
    results = []
    for zero_stage in (1,) if resume else (1, 2):
        net = model()
        opt = ft.Adafactor(net.parameters(), lr=0.01, process_group=dist.group.WORLD,
                           reduce_grads=False, zero_stage=zero_stage, bucket_cap_mb=BUCKET_MB)
        if resume:
            net.load_state_dict(torch.load(f"{folder}/model.pt"))
            opt.load_state_dict(torch.load(f"{folder}/whole.pt"))
        train(net, opt, first=STEPS if resume else 0)
        whole = opt.consolidated_state_dict(to=0)
        if rank == 0 and zero_stage == 1 and not resume:
            torch.save(whole, f"{folder}/whole.pt")
            torch.save(net.state_dict(), f"{folder}/model.pt")
        local = sorted(tuple(v.shape) for v in opt.state[next(net.parameters())].values()
                       if isinstance(v, torch.Tensor) and v.dim())
        results.append((snapshot(net, whole or {"state": {}}), local))
    return results


@pytest.mark.parametrize("world", [2, 3, 4])
def test_adafactor_partitions_whole_tensors_bitwise(tmp_path, world):
    """Its factors need whole matrices, so its partition cuts between tensors: each
    rank steps whole tensors, and everything is one process's, bit for bit, at both
    stages (on 3 and 4 ranks some hold nothing); the whole state of 3 resumes on 2 ranks
    as not stopping. In forkserver children: its kernels run in parallel even on tiny
    tensors, which Numba forbids in a child forked from a process that did so."""
    expected = one_process("Adafactor", dict(lr=0.01), torch.float32)
    net = model()
    opt = ft.Adafactor(net.parameters(), lr=0.01)
    train(net, opt, 2 * STEPS)
    final = [p.detach().numpy() for p in net.parameters()]
    sizes = [p.numel() for p in model().parameters()]
    folder = subfolder(tmp_path, "checkpoint")
    ranks = run_ranks(adafactor_rank, (str(folder), False), subfolder(tmp_path, "save"),
                      world=world, timeout=300, context=FORKSERVER)
    for rank, results in enumerate(ranks):
        first, last = Partition(sizes, rank, world, whole=True).pieces[0]
        for zero_stage, (ours, local) in zip((1, 2), results):
            what = f"rank {rank}, stage {zero_stage}"
            assert_same(ours, expected if rank == 0 else (expected[0], {}), what)
            assert local == sorted([(1, 20), (30 if last > first else 0, 1)]), (what, local)
    if world != 3:
        return
    for rank, [(ours, _)] in enumerate(run_ranks(adafactor_rank, (str(folder), True),
                                                 subfolder(tmp_path, "resume"), world=2,
                                                 timeout=300, context=FORKSERVER)):
        for mine, theirs in zip(ours[0], final):
            np.testing.assert_array_equal(mine, theirs, err_msg=f"resumed rank {rank}")


# -- averaged gradients, as a data-parallel run --------------------------------------

def reduced_rank(rank, world, rendezvous):
    _init(rank, world, rendezvous)
    net = model()
    opt = ft.AdamW(net.parameters(), lr=0.01, process_group=dist.group.WORLD,
                   clip_grad_norm=0.1)
    train(net, opt, rank=rank, world=world)
    return snapshot(net, {"state": {}})[0], opt.last_grad_norm


@pytest.mark.parametrize("world", [2, 4])
def test_averaged_gradients_train_as_one_process_on_the_whole_batch(world, tmp_path):
    """Each rank its part of the batch: the reduce-scatter averages the gradients, the
    global norm clips them, as one process does with the whole batch (to the rounding
    of the averages)."""
    net = model()
    opt = ft.AdamW(net.parameters(), lr=0.01, clip_grad_norm=0.1)
    train(net, opt)
    expected = [p.detach().numpy() for p in net.parameters()]
    for rank, (params, norm) in enumerate(run_ranks(reduced_rank, (), tmp_path, world=world)):
        for mine, theirs in zip(params, expected):
            np.testing.assert_allclose(mine, theirs, rtol=1e-5, atol=1e-7,
                                       err_msg=f"rank {rank}")
        np.testing.assert_allclose(norm, opt.last_grad_norm, rtol=1e-5)
        assert norm > 0.1  # it clipped


def inside_ddp_rank(rank, world, rendezvous):
    """A DDP-wrapped model, each rank its part of the batch, under an lr schedule:
    stepped by a process_group optimizer that takes DDP's averaged gradients
    (``reduce_grads=False``), and by a plain one on every rank."""
    _init(rank, world, rendezvous)
    results = []
    for group in (dist.group.WORLD, None):
        net = torch.nn.parallel.DistributedDataParallel(model(width=1024))
        opt = ft.AdamW(net.parameters(), lr=0.01, weight_decay=0.1, clip_grad_norm=0.5,
                       process_group=group, reduce_grads=False)
        schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=STEPS)
        for t in range(STEPS):
            opt.zero_grad()
            x, y = batch(t, rank, world, width=1024)
            ((net(x) - y) ** 2).mean().backward()
            opt.step()
            schedule.step()
        results.append([p.detach().numpy().copy() for p in net.parameters()])
    return results


def test_inside_ddp_with_an_lr_schedule_it_steps_as_an_optimizer_on_every_rank(tmp_path):
    """Given DDP's averaged gradients, the partitions (which cut the first weight) step
    as a whole optimizer on each rank, bit for bit, through torch's OneCycleLR and the
    clipping norm over the partitions. (Averaged again, three equal gradients would not
    always stay themselves.)"""
    for rank, (sharded, plain) in enumerate(run_ranks(inside_ddp_rank, (), tmp_path, world=3,
                                                      context=FORKSERVER)):
        for mine, theirs in zip(sharded, plain):
            np.testing.assert_array_equal(mine, theirs, err_msg=f"rank {rank}")
        assert not np.array_equal(sharded[0], model(width=1024)[0].weight.detach().numpy())


def bucket_rank(rank, world, rendezvous, zero_stage, bucket_mb=BUCKET_MB):
    _init(rank, world, rendezvous)
    net = model()
    opt = ft.AdamW(net.parameters(), lr=0.01, process_group=dist.group.WORLD,
                   zero_stage=zero_stage, bucket_cap_mb=bucket_mb)
    train(net, opt, rank=rank, world=world)
    store, = opt._stores
    buffers = {"padded": store._padded.numel(), "own": store._own.numel(),
               "share": store.partition.share}
    if zero_stage == 1:  # its window of the parameters lies in its share of the gradients
        buffers["reduced"] = store._reduced.numel()
        assert store._own.data_ptr() == store._reduced.data_ptr()
    return snapshot(net, {"state": {}})[0], buffers


def test_stage1_reduces_and_gathers_a_bucket_of_each_share_at_a_time(tmp_path):
    """Stage 1's collectives move a window of bucket_cap_mb of every share at a time,
    so a rank holds a bucket of each rank besides its share, not a buffer as large as
    the gradients; the windows cut through tensors and shares, and the average of two
    is the same float either way: bit for bit the run with one window."""
    runs = {mb: run_ranks(bucket_rank, (1, mb), subfolder(tmp_path, str(mb)), world=2)
            for mb in (BUCKET_MB, 25)}
    for rank in range(2):
        (windowed, buffers), (whole, whole_buffers) = runs[BUCKET_MB][rank], runs[25][rank]
        for mine, theirs in zip(windowed, whole):
            np.testing.assert_array_equal(mine, theirs, err_msg=f"rank {rank}")
        share = buffers["share"]
        assert share > 200
        assert buffers == {"padded": 2 * 200, "own": 200, "share": share, "reduced": share}
        assert whole_buffers == {"padded": 2 * share, "own": share, "share": share,
                                 "reduced": share}


@pytest.mark.parametrize("world", [2, 3])
def test_stage2_reduces_the_gradients_as_stage1(world, tmp_path):
    """Bucket by bucket during backward, averaged on the rank that owns them: at two
    ranks the average of two is the same float either way, bit for bit; at three the
    sums may run in another order."""
    stages = {stage: run_ranks(bucket_rank, (stage,), subfolder(tmp_path, str(stage)),
                               world=world) for stage in (1, 2)}
    for rank in range(world):
        for mine, theirs in zip(stages[2][rank][0], stages[1][rank][0]):
            if world == 2:
                np.testing.assert_array_equal(mine, theirs, err_msg=f"rank {rank}")
            else:
                np.testing.assert_allclose(mine, theirs, rtol=1e-6, atol=1e-8,
                                           err_msg=f"rank {rank}")


def accumulation_model():
    """``model()`` with a frozen bias and a layer that the loss does not reach."""
    net = torch.nn.Sequential(model(), torch.nn.Linear(3, 3))
    net[0][0].bias.requires_grad_(False)
    return net


def accumulating_rank(rank, world, rendezvous, moved):
    """Two micro-batches a step, each rank its part of each; ``model.zero_grad()``
    between steps (which the optimizer does not see)."""
    _init(rank, world, rendezvous)
    net = accumulation_model()
    opt = ft.AdamW(net.parameters(), lr=0.01, process_group=dist.group.WORLD, zero_stage=2,
                   bucket_cap_mb=BUCKET_MB)
    for t in range(STEPS):
        net.zero_grad()
        for micro in range(2):
            x, y = batch(2 * t + micro, rank, world)
            ((net[0](x) - y) ** 2).mean().div(2).backward()
        if moved and t == 1:  # elsewhere: the reduced gradients go with it
            weight = net[0][0].weight
            weight.data = weight.data.clone()
        if moved == "resized" and t == 1:  # the partition moves: they cannot
            net[1].weight.data = torch.zeros(4, 3)
            try:
                opt.step()
            except ValueError as error:
                return str(error)
        opt.step()
        if t == 2:  # a step with no backward since the last: nothing to step
            net.zero_grad()
            opt.step()
    return [p.detach().numpy().copy() for p in net.parameters()], [bool(opt.state[p]) for p
                                                                 in net.parameters()]


@pytest.mark.parametrize("world, moved", [(2, False), (4, False), (2, "moved")])
def test_stage2_accumulates_micro_batches_and_skips_what_has_no_gradient(world, moved,
                                                                         tmp_path):
    """Gradient accumulation: each backward's buckets add into the rank's share until
    the step, and the first bucket after it starts afresh. Parameters without a
    gradient (frozen, or not reached) are neither stepped nor given state, and a step
    with no backward since the last steps nothing (the reduced gradients are the last
    step's). As one process on the whole batches, to the rounding of the averages; also
    where a parameter moves to other storage between backward and the step."""
    net = accumulation_model()
    opt = ft.AdamW(net.parameters(), lr=0.01)
    for t in range(STEPS):
        opt.zero_grad()
        for micro in range(2):
            x, y = batch(2 * t + micro)
            ((net[0](x) - y) ** 2).mean().div(2).backward()
        opt.step()
        if t == 2:
            opt.zero_grad()
            opt.step()
    expected = [p.detach().numpy() for p in net.parameters()]
    stateful = [bool(opt.state[p]) for p in net.parameters()]
    assert stateful == [True, False, True, True, False, False]
    untouched = [p.detach().numpy() for p in accumulation_model().parameters()]
    for rank, (params, state) in enumerate(run_ranks(accumulating_rank, (moved,), tmp_path,
                                                     world=world)):
        assert state == stateful
        for index, (mine, theirs) in enumerate(zip(params, expected)):
            np.testing.assert_allclose(mine, theirs, rtol=1e-5, atol=1e-7,
                                       err_msg=f"rank {rank}, parameter {index}")
            if not stateful[index]:
                np.testing.assert_array_equal(mine, untouched[index])


def failed_step_rank(rank, world, rendezvous):
    """Stage 2: one backward, a step that fails halfway (no memory for the state,
    simulated once), then the step again."""
    _init(rank, world, rendezvous)
    net = model()
    opt = ft.Adam(net.parameters(), lr=0.01, process_group=dist.group.WORLD, zero_stage=2)
    x, y = batch(0)
    ((net(x) - y) ** 2).mean().backward()
    begin_state = ft._Store.begin_state

    def fails_once(*args):
        ft._Store.begin_state = begin_state
        raise torch.OutOfMemoryError("simulated")

    ft._Store.begin_state = fails_once
    with pytest.raises(torch.OutOfMemoryError):
        opt.step()
    opt.step()
    return [p.detach().numpy().copy() for p in net.parameters()]


def test_stage2_steps_again_on_the_gradients_of_a_step_that_failed(tmp_path):
    """The reduced gradients are used once a step is done, not when it begins: as
    torch.optim's step on p.grad, the step called again after a failure takes them."""
    expected, _ = one_process("Adam", dict(lr=0.01), torch.float32, steps=1)
    for rank, params in enumerate(run_ranks(failed_step_rank, (), tmp_path)):
        for mine, theirs in zip(params, expected):
            np.testing.assert_allclose(mine, theirs, rtol=1e-6, atol=1e-7,
                                       err_msg=f"rank {rank}")


def test_stage2_refuses_a_parameter_resized_after_backward(tmp_path):
    """The reduced gradients lie where the old partition put them."""
    for message in run_ranks(accumulating_rank, ("resized",), tmp_path):
        assert isinstance(message, str) and "changed size" in message, message


def resized_rank(rank, world, rendezvous):
    """``a`` (no gradient, no state) before ``b``: two steps, then ``a`` resized, which
    would move the cuts through ``b``; then ``a`` back to its size, in new storage."""
    _init(rank, world, rendezvous)
    a, b = (torch.nn.Parameter(torch.randn(n, generator=torch.Generator().manual_seed(n)))
            for n in (8192, 32768))
    opt = ft.Adam([a, b], lr=0.01, process_group=dist.group.WORLD, reduce_grads=False)
    for t in range(3):
        b.grad = torch.randn(32768, generator=torch.Generator().manual_seed(t))
        if t == 2:
            a.data = torch.zeros(16384)
            before = b.detach().clone(), opt.state[b]["exp_avg"].clone()
            try:
                opt.step()
            except ValueError as error:
                message = str(error)
            unchanged = (torch.equal(before[0], b.detach())
                         and torch.equal(before[1], opt.state[b]["exp_avg"]))
            a.data = torch.zeros(8192)
        opt.step()
    return message, unchanged, b.detach().numpy().copy()


def test_a_resize_that_would_move_the_cuts_through_a_stateful_parameter_is_refused(tmp_path):
    """Three ranks cut ``b`` into pieces whose state they hold; resizing ``a`` before it
    would cut it elsewhere (rank 1's piece from its second half to its first, of the
    same length), so that every rank refuses the step, naming ``b``, and changes
    nothing. Back to its size, in other storage, ``a`` cuts ``b`` as before: the steps
    go on as one process's, bit for bit. The ranks are forkserver children (see
    test_cuts_inside_tensors_are_bitwise...)."""
    ranks = run_ranks(resized_rank, (), tmp_path, world=3, context=FORKSERVER)
    a, b = (torch.nn.Parameter(torch.randn(n, generator=torch.Generator().manual_seed(n)))
            for n in (8192, 32768))
    opt = ft.Adam([a, b], lr=0.01)
    for t in range(3):
        b.grad = torch.randn(32768, generator=torch.Generator().manual_seed(t))
        opt.step()
    for rank, (message, unchanged, mine) in enumerate(ranks):
        assert "params'][1] would be cut otherwise" in message, message
        assert unchanged, rank
        np.testing.assert_array_equal(mine, b.detach().numpy(), err_msg=f"rank {rank}")


def test_zero_stage_and_bucket_size_are_checked():
    params = model().parameters()
    for kwargs, error, match in ((dict(zero_stage=3), ValueError, "zero_stage must be 1 or 2"),
                                 (dict(zero_stage=True), ValueError, "zero_stage"),
                                 (dict(zero_stage=2), ValueError, "pass one"),
                                 (dict(bucket_cap_mb=0), ValueError, "positive"),
                                 (dict(bucket_cap_mb="25"), TypeError, "bucket_cap_mb")):
        with pytest.raises(error, match=match):
            ft.Adam(params, **kwargs)


# -- 8-bit state ------------------------------------------------------------------------

def int8_rank(rank, world, rendezvous, folder, source):
    """Train (every rank the whole batch) and save every rank's state_dict and, on rank
    0, the whole state (``source`` None); or load this rank's own file (``"own"``) or the
    whole state (``"whole"``) and train on."""
    _init(rank, world, rendezvous)
    net = model(width=1024)
    opt = ft.Adam(net.parameters(), lr=0.01, state_dtype="int8", reduce_grads=False,
                  process_group=dist.group.WORLD)
    if source is not None:
        net.load_state_dict(torch.load(f"{folder}/model.pt"))
        opt.load_state_dict(torch.load(f"{folder}/rank{rank}.pt" if source == "own"
                                       else f"{folder}/whole.pt"))
    train(net, opt, first=0 if source is None else STEPS, width=1024)
    whole = opt.consolidated_state_dict(to=0)
    if source is None:
        torch.save(opt.state_dict(), f"{folder}/rank{rank}.pt")
        if rank == 0:
            torch.save(whole, f"{folder}/whole.pt")
            torch.save(net.state_dict(), f"{folder}/model.pt")
    return [p.detach().numpy().copy() for p in net.parameters()], whole and {
        index: {name: value.numpy().copy() for name, value in values.items()}
        for index, values in whole["state"].items()}  # tensors do not outlive the process


def test_int8_state_is_partitioned_on_its_blocks_bitwise(tmp_path):
    """Each rank quantizes its pieces of the first weight (30720 elements, which the
    three ranks cut at 16384, between blocks) on the blocks one process uses, and keeps the small tensors' state in float32 as it does: the parameters and
    the consolidated codes, scales and values are one process's, bit for bit, at 3
    ranks; resumed from them on 2 ranks, or in one process, and on 3 ranks from each
    rank's own state_dict (its codes and scales), as not stopping. The ranks
    are forkserver children (see test_cuts_inside_tensors_are_bitwise...)."""
    net = model(width=1024)
    opt = ft.Adam(net.parameters(), lr=0.01, state_dtype="int8")
    train(net, opt, width=1024)
    expected = {index: {name: value.clone() for name, value in values.items()}
                for index, values in opt.state_dict()["state"].items()}  # views: kept
    assert expected[0]["exp_avg_codes"].dtype == torch.uint8
    assert expected[1]["exp_avg"].dtype == torch.float32
    saved = [p.detach().numpy().copy() for p in net.parameters()]
    train(net, opt, first=STEPS, width=1024)
    final = [p.detach().numpy() for p in net.parameters()]
    folder = subfolder(tmp_path, "checkpoint")
    ranks = run_ranks(int8_rank, (str(folder), None), subfolder(tmp_path, "save"), world=3,
                      context=FORKSERVER)
    for rank, (params, whole) in enumerate(ranks):
        for mine, theirs in zip(params, saved):
            np.testing.assert_array_equal(mine, theirs, err_msg=f"rank {rank}")
        assert (whole is None) == (rank != 0)
    whole = ranks[0][1]
    for index, values in expected.items():
        assert sorted(whole[index]) == sorted(values), index
        for name, value in values.items():
            np.testing.assert_array_equal(whole[index][name], value.numpy(),
                                          err_msg=f"state {index} {name}")
    for world, source in ((2, "whole"), (3, "own")):
        for rank, (params, _) in enumerate(run_ranks(
                int8_rank, (str(folder), source), subfolder(tmp_path, f"{world}{source}"),
                world=world, context=FORKSERVER)):
            for mine, theirs in zip(params, final):
                np.testing.assert_array_equal(mine, theirs,
                                              err_msg=f"rank {rank} of {world}, {source}")
    net = model(width=1024)
    net.load_state_dict(torch.load(folder / "model.pt"))
    opt = ft.Adam(net.parameters(), lr=0.01, state_dtype="int8")
    opt.load_state_dict(torch.load(folder / "whole.pt"))
    train(net, opt, first=STEPS, width=1024)
    for mine, theirs in zip(net.parameters(), final):
        np.testing.assert_array_equal(mine.detach().numpy(), theirs)


def decoded_rank(rank, world, rendezvous, path):
    _init(rank, world, rendezvous)
    decoded = decoded_after_steps(process_group=dist.group.WORLD, reduce_grads=False)
    if decoded is not None:
        torch.save(decoded, path)
    return decoded is None


def decoded_after_steps(**options):
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(96, 64))
    opt = ft.AdamW([weight], lr=0.01, state_dtype="int8", **options)
    for t in range(2):
        weight.grad = torch.randn(96, 64, generator=torch.Generator().manual_seed(t))
        opt.step()
    return opt.decoded_state_dict()


def test_decoded_state_dict_gathers_and_decodes_the_whole_state_on_one_rank(tmp_path):
    """It once gave this rank's codes, under their ranked names, undecoded."""
    expected = decoded_after_steps()["state"][0]
    assert run_ranks(decoded_rank, (str(tmp_path / "decoded.pt"),),
                     subfolder(tmp_path, "ranks")) == [False, True]
    mine = torch.load(tmp_path / "decoded.pt")
    assert sorted(mine["state"][0]) == sorted(expected)
    for name, value in expected.items():
        assert value.dtype == torch.float32, name
        torch.testing.assert_close(mine["state"][0][name], value, rtol=0, atol=0)
    weight = torch.nn.Parameter(torch.zeros(96, 64))
    theirs = torch.optim.AdamW([weight], lr=0.01)
    theirs.load_state_dict(mine)
    weight.grad = torch.ones(96, 64)
    theirs.step()  # torch.optim steps from it
    assert int(theirs.state[weight]["step"]) == 3


# -- checkpoints ----------------------------------------------------------------------

def checkpoint_rank(rank, world, rendezvous, folder, source, steps, first):
    """Train ``steps`` steps from step ``first``: after saving (``source`` None) every
    rank's state_dict and, on rank 0, the consolidated one; or after loading this rank's
    own file (``"own"``) or the consolidated one (``"whole"``)."""
    _init(rank, world, rendezvous)
    net = model()
    opt = ft.Adam(net.parameters(), lr=0.01, process_group=dist.group.WORLD,
                  reduce_grads=False)
    if source is not None:
        net.load_state_dict(torch.load(f"{folder}/model.pt"))
        saved = f"{folder}/rank{rank}.pt" if source == "own" else f"{folder}/whole.pt"
        opt.load_state_dict(torch.load(saved))
    train(net, opt, steps, first=first)
    if source is None:
        torch.save(opt.state_dict(), f"{folder}/rank{rank}.pt")
        whole = opt.consolidated_state_dict(to=0)
        if rank == 0:
            torch.save(whole, f"{folder}/whole.pt")
            torch.save(net.state_dict(), f"{folder}/model.pt")
    return snapshot(net, {"state": {}})[0]


def test_checkpoints_resume_bitwise_on_the_same_or_any_number_of_ranks(tmp_path):
    """Three ranks save (each its partition, and the whole state on rank 0). Three ranks
    resume from their own files; two ranks, four ranks and one process from the whole
    state: each as not stopping, bit for bit. torch.optim loads the whole state too."""
    net = model()
    opt = ft.Adam(net.parameters(), lr=0.01)
    train(net, opt, 2 * STEPS)
    expected = [p.detach().numpy() for p in net.parameters()]
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    run_ranks(checkpoint_rank, (str(folder), None, STEPS, 0), subfolder(tmp_path, "save"), world=3)
    for world, source in ((3, "own"), (2, "whole"), (4, "whole")):
        for rank, params in enumerate(run_ranks(
                checkpoint_rank, (str(folder), source, STEPS, STEPS),
                subfolder(tmp_path, f"{world}{source}"), world=world)):
            for mine, theirs in zip(params, expected):
                np.testing.assert_array_equal(mine, theirs,
                                              err_msg=f"rank {rank} of {world}, {source}")
    net = model()
    net.load_state_dict(torch.load(folder / "model.pt"))
    opt = ft.Adam(net.parameters(), lr=0.01)
    opt.load_state_dict(torch.load(folder / "whole.pt"))
    train(net, opt, STEPS, first=STEPS)
    for mine, theirs in zip(net.parameters(), expected):
        np.testing.assert_array_equal(mine.detach().numpy(), theirs)
    reference = torch.optim.Adam(model().parameters(), lr=0.01)
    reference.load_state_dict(torch.load(folder / "whole.pt"))
    assert reference.state_dict()["state"][0]["exp_avg"].shape == (30, 20)


# fastopt.save's folders: a file per rank and an index, loaded by any number of ranks
SAVED_CASES = [("Adam", dict(lr=0.01, state_dtype="int8"), torch.float32),
               ("Adafactor", dict(lr=0.01), torch.float32),
               ("AdamW", dict(lr=0.01, weight_decay=0.1, master_weights="remainder"),
                torch.bfloat16)]


def saved_rank(rank, world, rendezvous, folder, case, load):
    """Train (every rank the whole batch) and save with ``fastopt.save``; or load the
    checkpoint and train on. On width 1024 every partition cuts the first weight."""
    name, kwargs, dtype = SAVED_CASES[case]
    _init(rank, world, rendezvous)
    net = model(dtype, width=1024)
    opt = getattr(ft, name)(net.parameters(), process_group=dist.group.WORLD,
                            reduce_grads=False, **kwargs)
    if load:
        net.load_state_dict(torch.load(f"{folder}/model.pt"))
        opt.load(f"{folder}/checkpoint")
    train(net, opt, first=STEPS if load else 0, dtype=dtype, width=1024)
    if not load:
        fastopt.save(opt, f"{folder}/checkpoint")
        if rank == 0:
            torch.save(net.state_dict(), f"{folder}/model.pt")
    return [p.detach().float().numpy().copy() for p in net.parameters()]


@pytest.mark.parametrize("case", range(len(SAVED_CASES)),
                         ids=[f"{name}-{str(dtype)[6:]}" for name, _, dtype in SAVED_CASES])
def test_fastopt_save_resumes_on_any_number_of_ranks_bitwise(tmp_path, case):
    """Three ranks save their partitions (8-bit codes and scales cut inside the first
    weight, Adafactor's whole tensors, bfloat16 master remainders) with
    ``fastopt.save``: a file each and an index. Two ranks and one process resume from
    them, and four ranks from one process's checkpoint, each as not stopping, bit for
    bit."""
    import fastopt

    name, kwargs, dtype = SAVED_CASES[case]
    net = model(dtype, width=1024)
    opt = getattr(ft, name)(net.parameters(), **kwargs)
    train(net, opt, dtype=dtype, width=1024)
    fastopt.save(opt, tmp_path / "alone")  # one process's, after STEPS
    alone = [p.detach().clone() for p in net.parameters()]
    train(net, opt, first=STEPS, dtype=dtype, width=1024)
    expected = [p.detach().float().numpy() for p in net.parameters()]
    folder = subfolder(tmp_path, "ranks")
    run_ranks(saved_rank, (str(folder), case, False), subfolder(tmp_path, "save"), world=3,
              context=FORKSERVER)
    assert sorted(p.name for p in (folder / "checkpoint").iterdir()) == [
        "index.json", "rank0.pt", "rank1.pt", "rank2.pt"]
    assert sorted(p.name for p in folder.iterdir()) == ["checkpoint", "model.pt"]
    for rank, params in enumerate(run_ranks(saved_rank, (str(folder), case, True),
                                            subfolder(tmp_path, "load"), world=2,
                                            context=FORKSERVER)):
        for mine, theirs in zip(params, expected):
            np.testing.assert_array_equal(mine, theirs, err_msg=f"rank {rank} of 2")
    net = model(dtype, width=1024)
    net.load_state_dict(torch.load(folder / "model.pt"))
    opt = getattr(ft, name)(net.parameters(), **kwargs)
    opt.load(folder / "checkpoint")
    train(net, opt, first=STEPS, dtype=dtype, width=1024)
    for mine, theirs in zip(net.parameters(), expected):
        np.testing.assert_array_equal(mine.detach().float().numpy(), theirs)
    if case:
        return
    (tmp_path / "alone" / "model").mkdir()
    torch.save(dict(zip([k for k, _ in model(dtype, 1024).named_parameters()], alone)),
               tmp_path / "alone.pt")
    alone_folder = subfolder(tmp_path, "from_one")
    (tmp_path / "alone").rename(alone_folder / "checkpoint")
    (tmp_path / "alone.pt").rename(alone_folder / "model.pt")
    for rank, params in enumerate(run_ranks(saved_rank, (str(alone_folder), case, True),
                                            subfolder(tmp_path, "load4"), world=4,
                                            context=FORKSERVER)):
        for mine, theirs in zip(params, expected):
            np.testing.assert_array_equal(mine, theirs, err_msg=f"rank {rank} of 4")


def odd_parameters():
    """A tensor of 5000 elements (not a whole number of 8-bit blocks: a rank whose share
    begins after it holds an empty piece inside its last block), one of 40000 (cut by
    the shares) and a 0-dim one."""
    generator = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(shape, generator=generator))
            for shape in [(50, 100), (200, 200), ()]]


def odd_steps(params, opt, first, steps):
    for t in range(first, first + steps):
        generator = torch.Generator().manual_seed(t)
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator)
        opt.step()


def odd_rank(rank, world, rendezvous, folder, source, target):
    """Load the checkpoint ``source`` (with the parameters saved beside it), step STEPS
    more and save to ``target``; the parameters."""
    _init(rank, world, rendezvous)
    params = odd_parameters()
    opt = ft.Adam(params, lr=0.01, state_dtype="int8", process_group=dist.group.WORLD,
                  reduce_grads=False)
    saved = torch.load(f"{folder}/{source}.pt")
    with torch.no_grad():
        for p, value in zip(params, saved["params"]):
            p.copy_(value)
    opt.load(f"{folder}/{source}")
    odd_steps(params, opt, saved["step"], STEPS)
    fastopt.save(opt, f"{folder}/{target}")
    if rank == 0:
        torch.save({"params": [p.detach() for p in params], "step": saved["step"] + STEPS},
                   f"{folder}/{target}.pt")
    return [p.detach().numpy().copy() for p in params]


def test_checkpoints_of_pieces_inside_blocks_and_of_0_dim_tensors_resume(tmp_path):
    """One process's 8-bit checkpoint resumed on two ranks, theirs on three, each as one
    process not stopping, bit for bit; the empty pieces inside a tensor's last block
    hold no scales, and the 0-dim tensor's state is cut as its one element."""
    folder = subfolder(tmp_path, "files")
    params = odd_parameters()
    opt = ft.Adam(params, lr=0.01, state_dtype="int8")
    odd_steps(params, opt, 0, STEPS)
    fastopt.save(opt, folder / "alone")
    torch.save({"params": [p.detach() for p in params], "step": STEPS}, folder / "alone.pt")
    expected = []
    for first in (STEPS, 2 * STEPS):
        odd_steps(params, opt, first, STEPS)
        expected.append([p.detach().numpy().copy() for p in params])
    for world, source, target, theirs in ((2, "alone", "two", expected[0]),
                                          (3, "two", "three", expected[1])):
        for rank, mine in enumerate(run_ranks(odd_rank, (str(folder), source, target),
                                              subfolder(tmp_path, target), world=world,
                                              context=FORKSERVER)):
            for a, b in zip(mine, theirs):
                np.testing.assert_array_equal(a, b, err_msg=f"rank {rank} of {world}")


def missing_file_rank(rank, world, rendezvous, folder):
    _init(rank, world, rendezvous, timeout=20)
    net = model(width=1024)
    opt = ft.Adam(net.parameters(), lr=0.01, process_group=dist.group.WORLD)
    train(net, opt, 1, width=1024)
    fastopt.save(opt, f"{folder}/checkpoint")
    weight = next(net.parameters())
    before = [v.clone() for v in opt.state[weight].values() if isinstance(v, torch.Tensor)]
    train(net, opt, 1, first=1, width=1024)
    dist.barrier()
    if rank == 0:
        os.remove(f"{folder}/checkpoint/rank1.pt")  # which only rank 1 reads
    dist.barrier()
    after = [v.clone() for v in opt.state[weight].values() if isinstance(v, torch.Tensor)]
    try:
        opt.load(f"{folder}/checkpoint")
    except ValueError as error:
        message = str(error)
    else:
        message = "loaded"
    now = [v for v in opt.state[weight].values() if isinstance(v, torch.Tensor)]
    return message, all(torch.equal(a, b) for a, b in zip(now, after)), \
        not all(torch.equal(a, b) for a, b in zip(before, after))


def test_a_load_that_fails_on_one_rank_fails_on_every_rank(tmp_path):
    """Rank 1's file is gone: rank 1 cannot take its piece, and rank 0, which could, does
    not load either (else it would go on alone and wait in the next collective)."""
    folder = subfolder(tmp_path, "files")
    for message, unchanged, moved in run_ranks(missing_file_rank, (str(folder),), tmp_path,
                                               timeout=120, context=FORKSERVER):
        assert "rank 1: ValueError" in message and "rank1.pt does not read" in message, \
            message
        assert unchanged and moved


def failed_save_rank(rank, world, rendezvous, folder, how):
    """Save, step, save again while rank 1 fails to write (``how="raises"``) or has
    left (``"leaves"``). Rank 1 returns its error; rank 0 its error, whether the step
    moved its state, whether the checkpoint still holds the first save's (loaded into an
    optimizer of no process_group), and the folder's entries before and after one
    process saves there again."""
    import fastopt.torch_checkpoint as checkpoints

    _init(rank, world, rendezvous, timeout=20)
    net = model(width=1024)
    weight = next(net.parameters())
    opt = ft.Adam(net.parameters(), lr=0.01, process_group=dist.group.WORLD,
                  reduce_grads=False)
    train(net, opt, 1, width=1024)
    fastopt.save(opt, f"{folder}/checkpoint")
    first = {k: v.clone() for k, v in opt.state[weight].items() if isinstance(v, torch.Tensor)}
    train(net, opt, 1, first=1, width=1024)
    if rank == 1:
        if how == "leaves":
            return "gone"  # its process ends, and with it its connections

        def fails(opt, name):
            raise OSError("No space left on device")
        checkpoints._write_rank_file = fails
    try:
        fastopt.save(opt, f"{folder}/checkpoint")
    except (OSError, RuntimeError) as error:
        message = f"{type(error).__name__}: {error}"
    else:
        message = "saved"
    if rank == 1:
        return message
    moved = not all(torch.equal(opt.state[weight][k], v) for k, v in first.items())
    alone = ft.Adam(model(width=1024).parameters(), lr=0.01)
    alone.load(f"{folder}/checkpoint")
    kept = next(iter(alone.state.values()))
    unchanged = all(torch.equal(kept[k].reshape(-1)[:v.numel()], v) for k, v in first.items())
    before = sorted(entry.name for entry in os.scandir(folder))
    fastopt.save(alone, f"{folder}/checkpoint")
    return message, moved, unchanged, before, sorted(entry.name for entry in os.scandir(folder))


@pytest.mark.parametrize("how", ["raises", "leaves"])
def test_a_failed_save_leaves_the_checkpoint_as_it_was_on_every_rank(tmp_path, how):
    """A rank that cannot write its file makes every rank raise its error; one that has
    left makes the others fail (gloo's error), not hang. Either way the folder holds the
    previous checkpoint, whole, and the next save deletes what the failed one left."""
    folder = subfolder(tmp_path, "files")
    ranks = run_ranks(failed_save_rank, (str(folder), how), tmp_path, timeout=120,
                      context=FORKSERVER)
    (message, moved, unchanged, before, after), theirs = ranks
    if how == "raises":
        assert theirs == message, (theirs, message)
        assert message.startswith("OSError") and "rank 1: OSError: No space left" in message
        assert before == ["checkpoint"], before
    else:
        assert theirs == "gone"
        assert message.startswith("RuntimeError"), message
        assert before[0] == "checkpoint" and before[1].startswith("checkpoint.partial-"), before
    assert moved and unchanged
    assert after == ["checkpoint"], after


def partition_mismatch_rank(rank, world, rendezvous, folder):
    _init(rank, world, rendezvous)
    net = model()
    opt = ft.Adam(net.parameters(), lr=0.01, process_group=dist.group.WORLD)
    train(net, opt, 1)
    torch.save(opt.state_dict(), f"{folder}/rank{rank}.pt")
    dist.barrier()
    before = [v.clone() for v in opt.state[next(net.parameters())].values()
              if isinstance(v, torch.Tensor)]
    try:
        opt.load_state_dict(torch.load(f"{folder}/rank{(rank + 1) % world}.pt"))
    except ValueError as error:
        message = str(error)
    else:
        message = None
    after = [v for v in opt.state[next(net.parameters())].values() if isinstance(v, torch.Tensor)]
    refusals = []
    for to in (world, -1, "0", 0.0):  # no rank of the group: refused on every rank alike
        try:
            opt.consolidated_state_dict(to=to)
        except (TypeError, ValueError) as error:
            refusals.append((type(error).__name__, str(error)))
    plain = ft.Adam(model().parameters(), lr=0.01)  # no process_group
    try:
        plain.load_state_dict(torch.load(f"{folder}/rank{rank}.pt"))
    except ValueError as error:
        refusals.append(("plain", str(error), len(plain.state)))
    return message, all(torch.equal(a, b) for a, b in zip(before, after)), refusals


def test_another_ranks_partition_is_refused_and_changes_nothing(tmp_path):
    (tmp_path / "files").mkdir()
    for message, unchanged, refusals in run_ranks(
            partition_mismatch_rank, (str(tmp_path / "files"),), tmp_path):
        assert message and "consolidated_state_dict" in message, message
        assert unchanged
        kind, plain, kept = refusals.pop()
        assert kind == "plain" and "one rank's partition" in plain and kept == 0, plain
        assert [kind for kind, _ in refusals] == ["ValueError", "ValueError", "TypeError",
                                                  "TypeError"], refusals
        assert all(text.startswith("to must be a rank") for _, text in refusals), refusals


# -- what goes wrong across ranks gives a clear error, not a hang ----------------------

def mismatch_rank(rank, world, rendezvous, what):
    _init(rank, world, rendezvous)
    net = model() if rank == 0 or what != "parameters" else torch.nn.Linear(20, 30)
    options = {"zero_stage": dict(zero_stage=2), "state_dtype": dict(state_dtype="int8"),
               # the clipping and the skip gather sums: gloo aborted at the first step
               "clip_grad_norm": dict(clip_grad_norm=1.0),
               "skip_nonfinite": dict(skip_nonfinite=True),
               "lr": dict(lr=0.02), "parameters": {}}[what] if rank == 1 else {}
    try:
        ft.Adam(net.parameters(), **{"lr": 0.01, **options}, process_group=dist.group.WORLD)
    except ValueError as error:
        return str(error)


@pytest.mark.parametrize("what, match", [("parameters", "same parameters"),
                                         ("zero_stage", "build the same"),
                                         ("state_dtype", "build the same"),
                                         ("clip_grad_norm", "build the same"),
                                         ("skip_nonfinite", "build the same"),
                                         ("lr", "build the same")])
def test_ranks_with_other_parameters_or_options_fail_on_every_rank(tmp_path, what, match):
    for message in run_ranks(mismatch_rank, (what,), tmp_path, timeout=60):
        assert message and match in message, message


def dead_rank(rank, world, rendezvous):
    _init(rank, world, rendezvous, timeout=10)
    net = model()
    opt = ft.Adam(net.parameters(), lr=0.01, process_group=dist.group.WORLD)
    train(net, opt, 1)
    if rank == 1:
        return "gone"  # its process ends, and with it its connections
    try:
        train(net, opt, 1)
    except RuntimeError as error:
        return f"{type(error).__name__}: {error}"
    return "stepped"


def test_a_rank_that_leaves_makes_the_others_fail_not_hang(tmp_path):
    results = run_ranks(dead_rank, (), tmp_path, timeout=60)
    assert results[1] == "gone"
    assert results[0].startswith("RuntimeError"), results[0]


def refusals_rank(rank, world, rendezvous):
    _init(rank, world, rendezvous)
    try:
        ft.Adam([torch.nn.Parameter(torch.zeros(3, 4).t())], process_group=dist.group.WORLD)
    except ValueError as error:
        return str(error)


def empty_rank(rank, world, rendezvous):
    _init(rank, world, rendezvous)
    # bfloat16: a store of its own, whose every share is empty
    empty = torch.nn.Parameter(torch.zeros(0, dtype=torch.bfloat16))
    weight = torch.nn.Parameter(torch.ones(3))
    opt = ft.AdamW([empty], lr=0.1, process_group=dist.group.WORLD)
    opt.add_param_group({"params": [weight], "weight_decay": 0.0})
    empty.grad = torch.zeros(0, dtype=torch.bfloat16)
    weight.grad = torch.full((3,), float(rank + 1))
    opt.step()
    return weight.detach().numpy().copy()


def test_a_group_of_empty_parameters_steps_beside_the_others(tmp_path):
    """The empty tensor's store has nothing to reduce or gather on any rank (a window
    of no elements); the other is averaged (the gradient 1.5 on both ranks) and
    stepped by lr 0.1, as Adam's first step does."""
    for weight in run_ranks(empty_rank, (), tmp_path):
        np.testing.assert_allclose(weight, 1 - 0.1, rtol=1e-6)


def float16_average_rank(rank, world, rendezvous, zero_stage):
    _init(rank, world, rendezvous)
    weight = torch.nn.Parameter(torch.zeros(4, dtype=torch.float16))
    opt = ft.SGD([weight], lr=1.0, process_group=dist.group.WORLD, zero_stage=zero_stage,
                 skip_nonfinite=True)
    # each rank's gradient, and their average, fit in float16 (at most 65504); their sum
    # does not
    (weight * torch.tensor([40000.0, -40000.0, 20000.0 * (rank + 1), 1e-3],
                           dtype=torch.float16)).sum().backward()
    opt.step(grad_scale=1e4)
    return weight.detach().float().numpy().copy(), opt.skipped_steps


@pytest.mark.parametrize("zero_stage", [1, 2])
def test_16_bit_gradients_are_averaged_where_their_sum_would_overflow(tmp_path, zero_stage):
    """As DDP: each rank's float16 gradients are divided by the number of ranks before
    they are summed. Averaged as sums, they overflowed: the step was skipped, or, without
    skip_nonfinite, went to -inf."""
    for weight, skipped in run_ranks(float16_average_rank, (zero_stage,), tmp_path):
        assert skipped == 0
        expected = -np.array([40000.0, -40000.0, 30000.0, 1e-3]) / 1e4
        np.testing.assert_allclose(weight, expected, rtol=1e-3, atol=1e-7)  # float16


def float32_gradient_rank(rank, world, rendezvous, zero_stage):
    _init(rank, world, rendezvous)
    weight = torch.nn.Parameter(torch.ones(64, dtype=torch.bfloat16))
    opt = ft.SGD([weight], lr=1.0, process_group=dist.group.WORLD, zero_stage=zero_stage)
    weight.grad_dtype = None  # torch then takes a gradient of another dtype
    weight.grad = torch.full((64,), 1.0 + 2 ** -10)  # no bfloat16 value
    try:
        opt.step()
    except TypeError as error:
        return str(error), weight.detach().float().numpy().copy()


@pytest.mark.parametrize("zero_stage", [1, 2])
def test_a_gradient_of_another_dtype_is_refused_as_in_one_process(tmp_path, zero_stage):
    """It was copied into the partition's bfloat16 buffer, rounded (to 1.0 here), and
    stepped."""
    for message, weight in run_ranks(float32_gradient_rank, (zero_stage,), tmp_path):
        assert "a gradient of torch.float32 for a parameter of torch.bfloat16" in message
        np.testing.assert_array_equal(weight, 1.0)


def user_entries_rank(rank, world, rendezvous):
    _init(rank, world, rendezvous)
    first, second = torch.nn.Parameter(torch.ones(8)), torch.nn.Parameter(torch.ones(8))
    opt = ft.SGD([first], lr=0.5, process_group=dist.group.WORLD)
    opt.state[first]["slow"] = torch.zeros(8)  # the user's own: no state that moves
    opt.add_param_group({"params": [second]})
    first.grad, second.grad = torch.ones(8), torch.ones(8)
    opt.step()
    state = opt.state_dict()["state"][0]
    return first.detach().numpy().copy(), sorted(state), float(opt.state[first]["slow"].sum())


def test_the_users_own_entries_are_no_state_that_a_new_group_would_move(tmp_path):
    for weight, names, slow in run_ranks(user_entries_rank, (), tmp_path):
        np.testing.assert_array_equal(weight, 0.5)
        assert names == ["slow"] and slow == 0  # whole, under its own name


def test_a_parameter_that_is_not_contiguous_is_refused_clearly(tmp_path):
    for message in run_ranks(refusals_rank, (), tmp_path):
        assert message and "not contiguous" in message, message


def test_process_group_needs_torch_distributed_initialized():
    with pytest.raises(ValueError, match="init_process_group"):
        ft.Adam(model().parameters(), process_group=object())


# -- torch.distributed.checkpoint -------------------------------------------------------

def dcp_rank(rank, world, rendezvous, folder, save):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    _init(rank, world, rendezvous)
    net = model()
    opt = ft.Adam(net.parameters(), lr=0.01, process_group=dist.group.WORLD)
    train(net, opt, 2, rank=rank, world=world)
    if save:
        dcp.save({"optim": get_state_dict(net, opt)[1]}, checkpoint_id=folder)
        return [v.numpy().copy() for p in net.parameters() for v in opt.state[p].values()
                if isinstance(v, torch.Tensor)]
    fresh = model()
    again = ft.Adam(fresh.parameters(), lr=0.01, process_group=dist.group.WORLD)
    model_state, optim_state = get_state_dict(fresh, again)
    try:
        dcp.load({"optim": optim_state}, checkpoint_id=folder)
        set_state_dict(fresh, again, model_state_dict=model_state, optim_state_dict=optim_state)
    except dcp.api.CheckpointException as error:  # DCP's, for a missing key
        return f"{type(error).__name__}: {error}"
    return [v.numpy().copy() for p in fresh.parameters() for v in again.state[p].values()
            if isinstance(v, torch.Tensor)]


def test_dcp_restores_each_ranks_partition_and_refuses_another_partition(tmp_path):
    """Same-named tensors of several ranks are copies to torch.distributed.checkpoint,
    which saves one of them: the partitions' names carry their rank, so that each is
    saved and comes back to its rank, and another number of ranks finds none of its."""
    folder = str(tmp_path / "dcp")
    for sub in ("save", "load", "other"):
        (tmp_path / sub).mkdir()
    saved = run_ranks(dcp_rank, (folder, True), tmp_path / "save")
    assert not all(np.array_equal(a, b) for a, b in zip(saved[0], saved[1]))
    for rank, loaded in enumerate(run_ranks(dcp_rank, (folder, False), tmp_path / "load")):
        assert len(loaded) == len(saved[rank])
        for mine, theirs in zip(loaded, saved[rank]):
            np.testing.assert_array_equal(mine, theirs, err_msg=f"rank {rank}")
    for message in run_ranks(dcp_rank, (folder, False), tmp_path / "other", world=3):
        assert isinstance(message, str) and "@rank" in message, message


def partly_reached_loss(a, b, ranks, reached, world, t):
    """The loss of ``ranks``' batches at step ``t``, over ``world``: each through ``a``,
    and through ``b`` too on the ranks in ``reached``."""
    loss = 0.0
    for rank in ranks:
        h = a(torch.randn(4, 4, generator=torch.Generator().manual_seed(10 * t + rank)))
        loss = loss + ((b(h) if rank in reached else h) ** 2).mean()
    return loss / (world if len(ranks) > 1 else 1)


def partly_reached_model():
    torch.manual_seed(0)  # 9450 parameters: every cut of 2 or 3 falls in b's weight
    return torch.nn.Linear(4, 30), torch.nn.Linear(30, 300)


def partly_reached_rank(rank, world, rendezvous, reached):
    _init(rank, world, rendezvous)
    a, b = partly_reached_model()
    params = [*a.parameters(), *b.parameters()]
    opt = ft.Adam(params, lr=0.01, process_group=dist.group.WORLD)
    for t in range(3):
        opt.zero_grad()
        partly_reached_loss(a, b, [rank], reached, world, t).backward()
        opt.step()
    return [p.detach().numpy().copy() for p in params]


@pytest.mark.parametrize("world, reached", [(2, (0,)), (2, (1,)), (3, (1,))])
def test_a_parameter_only_some_ranks_reach_steps_by_the_average_on_every_rank(
        world, reached, tmp_path):
    """Where some ranks' backward does not reach a parameter, its gradient averages in
    their zeros, as DDP's with find_unused_parameters: every rank that holds a piece of
    it steps it (before, a rank stepped its piece only if its own backward had reached
    the parameter, so the tensor came out half stepped), as one process does with the
    averaged loss. (Stage 2, which reduces during backward, needs every rank to reach
    the same parameters, as DDP without find_unused_parameters.)"""
    a, b = partly_reached_model()
    params = [*a.parameters(), *b.parameters()]
    opt = ft.Adam(params, lr=0.01)
    for t in range(3):
        opt.zero_grad()
        partly_reached_loss(a, b, range(world), reached, world, t).backward()
        opt.step()
    for rank, mine in enumerate(run_ranks(partly_reached_rank, (reached,), tmp_path,
                                          world=world)):
        for index, (ours, theirs) in enumerate(zip(mine, params)):
            np.testing.assert_allclose(ours, theirs.detach().numpy(), rtol=1e-5, atol=1e-6,
                                       err_msg=f"rank {rank}, parameter {index}")
