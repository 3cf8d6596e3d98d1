"""fastopt.torch in the client code that issue 14 found it broken in, each run side by side
with torch.optim in the same arrangement: Hogwild workers on a shared model,
``share_memory()`` after the optimizer is built, ``state_dict()`` put on a spawn-context
Queue, ZeroRedundancyOptimizer (with and without bucket views) under DDP, FSDP1 with
``use_orig_params=True``, and a Parameter in two optimizers (FSDP2 has test_torch_fsdp.py).

Everything that could crash the interpreter or hang in a collective runs in child
processes with a deadline, so a segfault or a hang fails one test instead of killing
pytest. Forked children, mostly, so that they inherit the kernels the parent compiled (a
fresh interpreter spends seconds importing torch and compiling them again); the models are
tiny, so the children's kernels run serially, which is what keeps fork safe with Numba's
OpenMP threading layer (see ``warm``).
"""

import functools
import multiprocessing
import multiprocessing.connection
import signal
import time
import traceback

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.distributed as dist  # noqa: E402

import fastopt.torch as ft  # noqa: E402
from test_torch_adapter import train  # noqa: E402

RTOL, ATOL = 1e-4, 1e-5
TIMEOUT = 120  # seconds for every child process of one call
STEPS = 20
FORK = multiprocessing.get_context("fork")
# A fresh interpreter that has imported this module, for the children that must not be
# forked from pytest's process (see the optimizer state test); started on first use.
FORKSERVER = multiprocessing.get_context("forkserver")
FORKSERVER.set_forkserver_preload([__name__])

ALGOS = [("SGD", dict(lr=0.05, momentum=0.9)), ("Adam", dict(lr=0.01))]
ALGO_IDS = [name for name, _ in ALGOS]

needs_gloo = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")
# Children with deadlines: alone, not beside tests running in parallel (see pyproject.toml).
pytestmark = pytest.mark.serial


# -- the model, the data, the optimizers ----------------------------------------------------

def tiny_model(seed=0):
    """83 parameters in 4 tensors (48, 8, 24, 3): with two ranks, FSDP1 leaves some ranks
    with zero-size shards of some of them."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def batch(seed, rows=16):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rows, 6, generator=generator), torch.randn(rows, 3, generator=generator)


def make_optimizer(impl, name, params, kwargs):
    if impl == "fastopt":
        return getattr(ft, name)(params, **kwargs)
    return getattr(torch.optim, name)(params, foreach=False, **kwargs)


def optimizer_class(impl, name):
    return getattr(ft if impl == "fastopt" else torch.optim, name)


@functools.cache
def _warm(name, items):
    model = tiny_model()
    train(model, getattr(ft, name)(model.parameters(), **dict(items)), *batch(0), steps=2)


def warm(name, kwargs):
    """Compile ``name``'s kernels in this process before it forks, so that the children
    inherit them instead of each compiling its own (seconds each, on a busy machine). Only
    for algorithms that step the parameters in place: on tiny tensors their kernels run
    serially, and a warm-up that ran Numba's parallel (GNU OpenMP) layer here would get
    every forked child that does the same terminated by Numba."""
    _warm(name, tuple(sorted(kwargs.items())))


def weights(model):
    return [p.detach().clone().numpy() for p in model.parameters()]


def assert_close(ours, theirs, rtol=RTOL, atol=ATOL, what="parameter"):
    assert len(ours) == len(theirs)
    for i, (a, b) in enumerate(zip(ours, theirs)):
        np.testing.assert_allclose(a, b, rtol=rtol, atol=atol, err_msg=f"{what} {i}")


def assert_moved(before, after):
    assert any(not np.array_equal(a, b) for a, b in zip(before, after)), \
        "the parameters did not change"


def assert_trains_as_torch(scenario, *args):
    """``scenario(impl, *args)`` returns ``(losses, weights)``: fastopt's run must move the
    weights, and end where torch.optim's does."""
    start = weights(tiny_model())
    our_losses, ours = scenario("fastopt", *args)
    their_losses, theirs = scenario("torch", *args)
    assert_moved(start, ours)
    np.testing.assert_allclose(our_losses, their_losses, rtol=RTOL, atol=ATOL)
    assert_close(ours, theirs)


# -- child processes ------------------------------------------------------------------------

def _child(connection, target, args):
    try:
        torch.set_num_threads(1)  # two cores shared by everyone
        result = target(*args)
        connection.send(("ok", result))
    except BaseException:
        connection.send(("error", traceback.format_exc()))
    finally:
        connection.close()


def run_processes(calls, timeout=TIMEOUT, context=FORK):
    """Run every ``(target, args)`` in its own process (forked, unless ``context`` says
    otherwise), all at once, and return their results in order. A process that raises,
    dies (a segfault) or outlives ``timeout`` fails the test with its traceback; the others
    are then killed, so that a rank left waiting in a collective does not hang the test."""
    processes, pending, messages = [], {}, [None] * len(calls)
    timed_out = False
    try:
        for index, (target, args) in enumerate(calls):
            receiver, sender = context.Pipe(duplex=False)
            process = context.Process(target=_child, args=(sender, target, args))
            process.start()
            sender.close()
            processes.append(process)
            pending[receiver] = index
        deadline = time.monotonic() + timeout
        while pending:
            left = deadline - time.monotonic()
            ready = multiprocessing.connection.wait(list(pending), timeout=max(left, 0))
            if not ready:
                timed_out = True
                break
            for receiver in ready:
                index = pending.pop(receiver)
                try:
                    messages[index] = receiver.recv()
                except EOFError:
                    processes[index].join(5)
                    messages[index] = ("died", "before sending a result")
            if any(m is not None and m[0] != "ok" for m in messages):
                break
        for process in processes:
            process.join(max(deadline - time.monotonic(), 1) if not pending else 1)
    finally:
        killed = set()
        for index, process in enumerate(processes):
            if process.is_alive():
                process.kill()
                process.join(5)
                killed.add(index)
    failures = []

    def ended(code):
        return f"{code} ({signal.Signals(-code).name})" if code and code < 0 else str(code)

    for index, (message, process) in enumerate(zip(messages, processes)):
        target = calls[index][0].__name__
        if message is None and index in killed and timed_out:
            failures.append(f"{target}[{index}]: no result within {timeout} s, killed")
        elif message is None and (index in killed or process.exitcode == 0):
            failures.append(f"{target}[{index}]: result not read (another process failed)")
        elif message is None:
            failures.append(f"{target}[{index}]: no result; ended with exit code "
                            f"{ended(process.exitcode)}")
        elif message[0] != "ok":
            failures.append(f"{target}[{index}] {message[0]} (exit code "
                            f"{ended(process.exitcode)}):\n{message[1]}")
        elif process.exitcode != 0:
            failures.append(f"{target}[{index}] sent its result, then ended with exit code "
                            f"{ended(process.exitcode)}")
    if failures:
        pytest.fail("\n".join(failures), pytrace=False)
    return [message[1] for message in messages]


def run_ranks(target, args, tmp_path, world=2, timeout=TIMEOUT, context=FORK):
    """``target(rank, world, rendezvous, *args)`` on ``world`` ranks (forked, unless
    ``context`` says otherwise)."""
    rendezvous = f"file://{tmp_path}/rendezvous"
    return run_processes([(target, (rank, world, rendezvous, *args)) for rank in range(world)],
                         timeout, context)


def subfolder(tmp_path, name):
    """A new folder ``name`` in ``tmp_path`` (one rendezvous or checkpoint each)."""
    (tmp_path / name).mkdir()
    return tmp_path / name


def _init_gloo(rank, world, rendezvous):
    dist.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=world)


# -- 1. Hogwild: an optimizer per worker on a shared model --------------------------------

def hogwild_worker(model, impl, name, kwargs, worker):
    opt = make_optimizer(impl, name, model.parameters(), kwargs)
    x, y = batch(worker)
    return train(model, opt, x, y, steps=STEPS)


def hogwild(impl, name, kwargs):
    warm(name, kwargs)
    model = tiny_model()
    model.share_memory()
    losses = []
    for worker in range(2):  # one after the other, so that the numbers are deterministic
        losses += run_processes([(hogwild_worker, (model, impl, name, kwargs, worker))])
    return losses, weights(model)


@pytest.mark.parametrize("name, kwargs", ALGOS, ids=ALGO_IDS)
def test_hogwild_workers_train_the_shared_model_as_torch_does(name, kwargs):
    assert_trains_as_torch(hogwild, name, kwargs)


def parent_built_worker(model, opt, worker):
    x, y = batch(worker)
    return train(model, opt, x, y, steps=STEPS)


def parent_built_hogwild(impl, name, kwargs):
    """The A3C arrangement: the optimizer is built (and here, stepped once) in the parent,
    then the model is shared and each worker steps its inherited copy of the optimizer."""
    warm(name, kwargs)
    model = tiny_model()
    opt = make_optimizer(impl, name, model.parameters(), kwargs)
    train(model, opt, *batch(7), steps=1)
    model.share_memory()
    losses = []
    for worker in range(2):
        losses += run_processes([(parent_built_worker, (model, opt, worker))])
    return losses, weights(model)


@pytest.mark.parametrize("name, kwargs", ALGOS, ids=ALGO_IDS)
def test_hogwild_with_the_optimizer_built_in_the_parent_before_share_memory(name, kwargs):
    assert_trains_as_torch(parent_built_hogwild, name, kwargs)


# -- 2. share_memory() after the optimizer is built ----------------------------------------

def share_after_construction(impl, name, kwargs):
    model = tiny_model()
    opt = make_optimizer(impl, name, model.parameters(), kwargs)
    x, y = batch(0)
    losses = train(model, opt, x, y, steps=3)
    before = weights(model)
    model.share_memory()
    assert all(p.is_shared() for p in model.parameters())
    losses += train(model, opt, x, y, steps=STEPS)
    assert_moved(before, weights(model))
    return losses, weights(model)


@pytest.mark.parametrize("name, kwargs", ALGOS, ids=ALGO_IDS)
def test_share_memory_after_construction_keeps_training_as_torch_does(name, kwargs):
    warm(name, kwargs)
    (ours, theirs) = run_processes([(share_after_construction, ("fastopt", name, kwargs)),
                                    (share_after_construction, ("torch", name, kwargs))])
    np.testing.assert_allclose(ours[0], theirs[0], rtol=RTOL, atol=ATOL)
    assert_close(ours[1], theirs[1])


# -- 3. state_dict() on a spawn-context Queue ------------------------------------------------

def read_queue(queue, connection):
    received = queue.get(timeout=60)
    connection.send({key: value.clone().numpy() for key, value in received.items()})


def through_a_queue(impl, name, kwargs, reader):
    """Train, put ``model.state_dict()`` on a spawn-context Queue (which moves every
    parameter's storage to shared memory), read it back here or in another process, and
    keep training."""
    model = tiny_model()
    opt = make_optimizer(impl, name, model.parameters(), kwargs)
    x, y = batch(0)
    losses = train(model, opt, x, y, steps=3)
    queue = torch.multiprocessing.get_context("spawn").Queue()
    if reader == "same process":
        queue.put(model.state_dict())
        received = queue.get(timeout=60)
        model.load_state_dict(received)
        del received
    else:
        receiver, sender = FORK.Pipe(duplex=False)
        process = FORK.Process(target=read_queue, args=(queue, sender))
        process.start()
        queue.put(model.state_dict())
        assert receiver.poll(60), "the reader sent nothing back"
        received = receiver.recv()
        process.join(30)
        assert process.exitcode == 0
        for key, value in model.state_dict().items():
            np.testing.assert_array_equal(received[key], value.numpy())
    time.sleep(0.2)  # let the queue's feeder thread finish with the tensors
    assert all(p.is_shared() for p in model.parameters()), "the storage did not move"
    losses += train(model, opt, x, y, steps=STEPS)
    return losses, weights(model)


@pytest.mark.parametrize("reader", ["same process", "another process"])
@pytest.mark.parametrize("name, kwargs", ALGOS, ids=ALGO_IDS)
def test_model_state_dict_through_a_spawn_queue_keeps_training_as_torch_does(name, kwargs,
                                                                             reader):
    warm(name, kwargs)
    (ours, theirs) = run_processes([(through_a_queue, ("fastopt", name, kwargs, reader)),
                                    (through_a_queue, ("torch", name, kwargs, reader))])
    np.testing.assert_allclose(ours[0], theirs[0], rtol=RTOL, atol=ATOL)
    assert_close(ours[1], theirs[1])


def optimizer_state_through_a_queue(name, kwargs, queued):
    """Train, optionally put ``opt.state_dict()`` on a spawn-context Queue (which moves
    the storage of every state tensor, so of fastopt's flat state buffers, to shared
    memory), and keep training."""
    model = tiny_model()
    opt = getattr(ft, name)(model.parameters(), **kwargs)
    x, y = batch(0)
    losses = train(model, opt, x, y, steps=3)
    if queued:
        queue = torch.multiprocessing.get_context("spawn").Queue()
        queue.put(opt.state_dict())
        received = queue.get(timeout=60)
        time.sleep(0.2)
        del received
        shared = [value.is_shared() for state in opt.state.values()
                  for value in state.values() if isinstance(value, torch.Tensor)]
        assert shared and all(shared), "the state's storage did not move"
    losses += train(model, opt, x, y, steps=STEPS)
    return losses, weights(model), {index: {key: (value.clone().numpy()
                                                  if isinstance(value, torch.Tensor) else value)
                                            for key, value in state.items()}
                                    for index, state in opt.state_dict()["state"].items()}


def optimizer_state_plain_then_queued(name, kwargs):
    return (optimizer_state_through_a_queue(name, kwargs, False),
            optimizer_state_through_a_queue(name, kwargs, True))


# Adam steps the parameters in place; Adafactor and LAMB go through a scratch buffer that
# a fastopt core optimizer adopts, with its state buffers as NumPy views. Those two run in
# a child of the fork server: their scratch path runs parallel Numba kernels even on tiny
# tensors, and Numba terminates a forked child that does so when its parent has used GNU
# OpenMP (as pytest's process has, in a run of the whole suite).
@pytest.mark.parametrize("name, kwargs, context", [("Adam", dict(lr=0.01), FORK),
                                                   ("Adafactor", dict(lr=0.01), FORKSERVER),
                                                   ("LAMB", dict(lr=0.01), FORKSERVER)],
                         ids=["Adam", "Adafactor", "LAMB"])
def test_optimizer_state_dict_through_a_spawn_queue_changes_nothing(name, kwargs, context):
    if context is FORK:
        warm(name, kwargs)
    [(plain, queued)] = run_processes([(optimizer_state_plain_then_queued, (name, kwargs))],
                                      context=context)
    np.testing.assert_allclose(queued[0], plain[0], rtol=RTOL, atol=ATOL)
    assert_close(queued[1], plain[1])
    assert queued[2].keys() == plain[2].keys()
    for index, state in plain[2].items():
        for key, value in state.items():
            np.testing.assert_allclose(queued[2][index][key], value, rtol=RTOL, atol=ATOL,
                                       err_msg=f"state[{index}][{key!r}]")


# -- 4. ZeroRedundancyOptimizer under DDP -------------------------------------------------

def zero_rank(rank, world, rendezvous, bucket_view):
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel

    _init_gloo(rank, world, rendezvous)
    try:
        x, y = batch(0, rows=32)
        x, y = x.chunk(world)[rank], y.chunk(world)[rank]  # each rank its half of the batch
        results = {}
        for impl in ("fastopt", "torch"):  # torch.optim.Adam in ZeRO checks the harness
            model = DistributedDataParallel(tiny_model())
            opt = ZeroRedundancyOptimizer(model.parameters(),
                                          optimizer_class=optimizer_class(impl, "Adam"),
                                          parameters_as_bucket_view=bucket_view, lr=0.01)
            losses = train(model, opt, x, y, steps=STEPS)
            results[impl] = (losses, weights(model.module))
        return results
    finally:
        dist.destroy_process_group()


def single_process_adam():
    """torch.optim.Adam in one process on the whole batch: what the sharded runs equal."""
    model = tiny_model()
    x, y = batch(0, rows=32)
    train(model, torch.optim.Adam(model.parameters(), lr=0.01, foreach=False), x, y,
          steps=STEPS)
    return weights(model)


@needs_gloo
@pytest.mark.parametrize("bucket_view", [True, False], ids=["bucket_view", "no_bucket_view"])
def test_zero_redundancy_optimizer_trains_as_unsharded_torch_adam(bucket_view, tmp_path):
    warm("Adam", dict(lr=0.01))
    ranks = run_ranks(zero_rank, (bucket_view,), tmp_path)
    reference = single_process_adam()
    start = weights(tiny_model())
    for rank, results in enumerate(ranks):
        assert_close(results["torch"][1], reference, what=f"rank {rank}, torch in ZeRO:")
    for rank, results in enumerate(ranks):
        assert_moved(start, results["fastopt"][1])
        assert_close(results["fastopt"][1], reference, what=f"rank {rank}, fastopt in ZeRO:")


# -- 5. FSDP1 with use_orig_params=True ----------------------------------------------------

def fsdp1_rank(rank, world, rendezvous):
    from torch.distributed.fsdp import FullyShardedDataParallel

    _init_gloo(rank, world, rendezvous)
    try:
        x, y = batch(0, rows=32)
        x, y = x.chunk(world)[rank], y.chunk(world)[rank]
        results = {}
        for impl in ("fastopt", "torch"):
            model = FullyShardedDataParallel(tiny_model(), use_orig_params=True,
                                             device_id=torch.device("cpu"))
            shards = [p.numel() for p in model.parameters()]
            opt = make_optimizer(impl, "Adam", model.parameters(), dict(lr=0.01))
            losses = train(model, opt, x, y, steps=STEPS)
            with FullyShardedDataParallel.summon_full_params(model):
                full = weights(model)
            results[impl] = (losses, full, shards)
        return results
    finally:
        dist.destroy_process_group()


@needs_gloo
def test_fsdp1_use_orig_params_trains_as_torch_adam(tmp_path):
    warm("Adam", dict(lr=0.01))
    ranks = run_ranks(fsdp1_rank, (), tmp_path)
    # The case that matters: some rank holds a zero-size shard of some parameter.
    assert any(0 in results["fastopt"][2] for results in ranks), [r["fastopt"][2] for r in ranks]
    reference = single_process_adam()
    start = weights(tiny_model())
    for rank, results in enumerate(ranks):
        assert_close(results["torch"][1], reference, what=f"rank {rank}, torch in FSDP:")
    for rank, results in enumerate(ranks):
        assert_moved(start, results["fastopt"][1])
        np.testing.assert_allclose(results["fastopt"][0], results["torch"][0], rtol=RTOL,
                                   atol=ATOL)
        assert_close(results["fastopt"][1], results["torch"][1],
                     what=f"rank {rank}, fastopt vs torch in FSDP:")


# -- 6. One Parameter in two optimizers ------------------------------------------------------

def shared_trunk(impl, name, kwargs, together):
    """A trunk with two heads and an optimizer per head, both over the trunk. Alternately
    (each optimizer steps after its own head's loss) or together (one backward of both
    losses, then both optimizers step: the trunk is stepped twice)."""
    torch.manual_seed(3)
    trunk = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh())
    heads = [torch.nn.Linear(8, 3), torch.nn.Linear(8, 3)]
    opts = [make_optimizer(impl, name, [*trunk.parameters(), *head.parameters()], kwargs)
            for head in heads]
    x, y = batch(0)
    losses = []
    for t in range(STEPS):
        for opt in opts:
            opt.zero_grad()
        if together:
            loss = sum(((head(trunk(x)) - y) ** 2).mean() for head in heads)
            loss.backward()
            for opt in opts:
                opt.step()
        else:
            loss = ((heads[t % 2](trunk(x)) - y) ** 2).mean()
            loss.backward()
            opts[t % 2].step()
        losses.append(loss.item())
    return losses, [p.detach().clone().numpy()
                    for module in (trunk, *heads) for p in module.parameters()]


@pytest.mark.parametrize("together", [False, True], ids=["alternately", "together"])
@pytest.mark.parametrize("name, kwargs", ALGOS, ids=ALGO_IDS)
def test_a_parameter_in_two_optimizers_steps_as_in_torch(name, kwargs, together):
    our_losses, ours = shared_trunk("fastopt", name, kwargs, together)
    their_losses, theirs = shared_trunk("torch", name, kwargs, together)
    np.testing.assert_allclose(our_losses, their_losses, rtol=RTOL, atol=ATOL)
    assert_close(ours, theirs)
