"""AdamW sharded over processes on this machine: optimizer state bytes per rank, the time
of a step with its gradient communication, and the bytes each rank sends per parameter,
for fastopt's ZeRO (``process_group=``) against torch's ZeroRedundancyOptimizer and DDP
with fused AdamW, at each world size, in the same run:

    python bench/sharded.py [--worlds 1,2,4] [--size 4e6] [--rounds 5] [--steps 5]
        [--bucket-mb 1]

Each world size is a set of processes on gloo (127.0.0.1, a file rendezvous), one
thread each. Every contender starts where each rank holds its own gradients (after its
backward) and ends where every rank holds the stepped parameters:

- ``fastopt ZeRO``: ``fastopt.torch.AdamW(process_group=)``'s ``step()``: the
  averaged gradients of its partition (on gloo an all-reduce, which is faster there
  than gloo's reduce-scatter; NCCL's reduce-scatter), the fused step of its partition,
  an all-gather of the parameters; the collectives move a bucket (``--bucket-mb``) of
  each rank's share at a time;
- ``fastopt ZeRO-2``: the same with ``zero_stage=2``: the gradients go out in buckets
  (``--bucket-mb``, 1 MB: a 16 MB model's buckets are then to it what DDP's 25 MB are to
  a 400 MB one), each reduced to the rank whose share it is; here all at the step, as
  gradients set by hand do (in training, during backward);
- ``torch ZeRO``: an all-reduce of the gradients (what DDP does in backward), then
  ``ZeroRedundancyOptimizer(optimizer_class=torch.optim.AdamW)``'s step of its share
  and broadcast of the parameters;
- ``DDP + fused AdamW``: the all-reduce, then ``torch.optim.AdamW(fused=True)`` on every
  rank, each holding the whole state.

The step time is rank 0's wall time between barriers, the median over rounds of each
round's mean (rounds interleave the contenders). State bytes are counted from the
optimizers' state tensors on rank 0. Gradient bytes are what a rank holds of the
gradients in training, with the buffers of fastopt's collectives: every gradient
(after backward) for stage 1, DDP and ZeroRedundancyOptimizer (whose own buffers are
not counted), and for stage 2 its share, one bucket, and its all-gather's windows;
fastopt's stage 1 adds its share of the averaged gradients and a bucket of every
share, through which its collectives move them. The
bytes sent per parameter are computed, not measured: a ring reduce-scatter or all-gather sends (N-1)/N of the buffer from each
rank, an all-reduce twice that, a broadcast of each rank's share (N-1)/N of the whole,
and a chain reduce of every bucket from each rank but its owner (N-1)/N of the whole.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

CONTENDERS = ("fastopt ZeRO", "fastopt ZeRO-2", "torch ZeRO", "DDP + fused AdamW")
TENSORS = 8  # the parameters: this many tensors of equal size


def parameters(size):
    generator = torch.Generator().manual_seed(0)
    shape = (TENSORS, size // TENSORS // 64, 64)
    return [torch.nn.Parameter(torch.randn(shape[1:], generator=generator) * 0.02)
            for _ in range(shape[0])]


def contender(name, params, bucket_mb):
    """``(step, state_bytes, gradient_bytes)``: one step of ``name`` from each rank's own
    gradients, and what it holds (functions, called after a step)."""
    import fastopt.torch as ft
    from torch.distributed.optim import ZeroRedundancyOptimizer

    if name.startswith("fastopt"):
        opt = ft.AdamW(params, lr=1e-3, process_group=dist.group.WORLD,
                       zero_stage=2 if name.endswith("2") else 1, bucket_cap_mb=bucket_mb)
        grads = [p.grad for p in params]

        def step():
            for p, grad in zip(params, grads):  # stage 2 drops them
                p.grad = grad
            opt.step()

        def held():
            buffers = [store._padded for store in opt._stores]
            if name.endswith("2"):
                buffers += [b for store in opt._stores
                            for b in (store._own, store.reducer.gradients, store.reducer.buffer)]
            else:  # stage 1's _own is a window of _reduced, its share of the gradients
                buffers += [store._reduced for store in opt._stores] + grads
            return _bytes(buffers)

        return step, lambda: _bytes(b for store in opt._stores for b in store._flat.values()), \
            held
    flat = torch.zeros(sum(p.numel() for p in params))
    for p, view in zip(params, flat.split([p.numel() for p in params])):
        view.copy_(p.grad.reshape(-1))
        p.grad = view.view_as(p)  # DDP's gradient_as_bucket_view

    def all_reduce():
        dist.all_reduce(flat, op=dist.ReduceOp.AVG)

    if name == "torch ZeRO":
        opt = ZeroRedundancyOptimizer(params, optimizer_class=torch.optim.AdamW, lr=1e-3)
        state = opt.optim.state
    else:
        opt = torch.optim.AdamW(params, lr=1e-3, fused=True)
        state = opt.state

    def step():
        all_reduce()
        opt.step()

    return step, lambda: _bytes(v for s in state.values() for v in s.values()
                                if isinstance(v, torch.Tensor) and v.dim()), \
        lambda: _bytes([flat])


def _bytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def sent_per_parameter(name, world, backend="gloo"):
    """Bytes each rank sends per parameter (float32), for ring collectives."""
    share = (world - 1) / world * 4
    zero = 3 * share if backend == "gloo" else 2 * share  # all-reduce or reduce-scatter
    return {"fastopt ZeRO": zero, "fastopt ZeRO-2": 2 * share, "torch ZeRO": 3 * share,
            "DDP + fused AdamW": 2 * share}[name]


def rank_main(rank, world, rendezvous, size, rounds, steps, bucket_mb, out):
    os.environ["NUMBA_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=world)
    runs = {}
    for name in CONTENDERS:
        params = parameters(size)
        generator = torch.Generator().manual_seed(1 + rank)  # each rank its own gradients
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator) * 1e-3
        runs[name] = contender(name, params, bucket_mb)
        runs[name][0]()  # compiles, and makes the state
    times = {name: [] for name in CONTENDERS}
    for r in range(rounds):
        turn = r % len(CONTENDERS)
        for name in CONTENDERS[turn:] + CONTENDERS[:turn]:
            dist.barrier()
            start = time.perf_counter()
            for _ in range(steps):
                runs[name][0]()
            dist.barrier()
            times[name].append((time.perf_counter() - start) / steps)
    if rank == 0:
        with open(out, "w") as file:
            for name in CONTENDERS:
                file.write(f"{name}\t{statistics.median(times[name])}\t"
                           f"{min(times[name])}\t{max(times[name])}\t{runs[name][1]()}\t"
                           f"{runs[name][2]()}\n")
    dist.barrier()
    dist.destroy_process_group()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worlds", default="1,2,4")
    parser.add_argument("--size", type=float, default=4e6)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--bucket-mb", type=float, default=1.0)
    args = parser.parse_args(argv)
    size = int(args.size) // (TENSORS * 64) * TENSORS * 64
    print(f"AdamW, {size:.3g} float32 parameters in {TENSORS} tensors, gloo, one thread a "
          f"rank, {os.cpu_count()} CPUs; medians of {args.rounds} rounds of {args.steps} "
          "steps")
    print("| ranks | contender | step | range | state MB per rank | gradient MB per rank "
          "| sent B/param (computed) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for world in (int(w) for w in args.worlds.split(",")):
        with tempfile.TemporaryDirectory() as folder:
            out = os.path.join(folder, "result")
            mp.spawn(rank_main, args=(world, f"file://{folder}/rendezvous", size, args.rounds,
                                      args.steps, args.bucket_mb, out), nprocs=world)
            for line in open(out):
                name, median, low, high, state, held = line.rstrip("\n").split("\t")
                print(f"| {world} | {name} | {float(median) * 1e3:.2f} ms | "
                      f"{float(low) * 1e3:.2f}-{float(high) * 1e3:.2f} | "
                      f"{int(state) / 1e6:.1f} | {int(held) / 1e6:.1f} | "
                      f"{sent_per_parameter(name, world):.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
