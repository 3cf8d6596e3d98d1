"""The cost of sums over whole tensors on FSDP2: the step time of fastopt.torch's LAMB,
AdamW with ``clip_grad_norm``, Adafactor and plain AdamW on the DTensor parameters of
a ``fully_shard``ed module, on ``--world`` processes (gloo, one thread each):

    python bench/fsdp_sums.py [--world 2] [--rounds 7] [--steps 10]

The module holds 8 matrices of (1024, 512) and 16 vectors of 1024, a transformer's
mix of rows and vectors; the gradients are set, the same on every rank. LAMB and the
clipped AdamW sum over whole tensors, in chunks that begin at every row (each element
of a vector), whose sums every rank gathers; Adafactor carries its sums over the
matrices down the rows from rank to rank; plain AdamW sums nothing, the baseline.
Prints rank 0's best of ``--rounds`` rounds of the mean over ``--steps`` steps, between
barriers.
"""

import argparse
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

CASES = [("LAMB", dict(lr=1e-3)), ("AdamW", dict(lr=1e-3, clip_grad_norm=1.0)),
         ("Adafactor", dict(lr=1e-2)), ("AdamW", dict(lr=1e-3))]
SHAPES = [(1024, 512)] * 8 + [(1024,)] * 16


def rank_main(rank, world, rendezvous, rounds, steps):
    import numba
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import distribute_tensor

    import fastopt.torch as ft

    torch.set_num_threads(1)
    numba.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank,
                            world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    for name, kwargs in CASES:
        generator = torch.Generator().manual_seed(0)
        module = torch.nn.Module()
        module.weights = torch.nn.ParameterList(
            torch.nn.Parameter(torch.randn(shape, generator=generator)) for shape in SHAPES)
        fully_shard(module, mesh=mesh)
        opt = getattr(ft, name)(module.parameters(), **kwargs)
        for p in module.parameters():
            p.grad = distribute_tensor(torch.randn(p.shape, generator=generator), mesh,
                                       p.placements)
        for _ in range(3):
            opt.step()
        best = float("inf")
        for _ in range(rounds):
            dist.barrier()
            start = time.perf_counter()
            for _ in range(steps):
                opt.step()
            dist.barrier()
            best = min(best, (time.perf_counter() - start) / steps)
        if rank == 0:
            print(f"{name:6s} {str(kwargs):40s} {best * 1e3:7.3f} ms", flush=True)
    dist.destroy_process_group()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(rank_main, (args.world, f"{folder}/rendezvous", args.rounds, args.steps),
                 nprocs=args.world)


if __name__ == "__main__":
    main()
