"""Train a small language model over several processes, stepped by fastopt.torch.AdamW,
and the same model with torch.optim.AdamW side by side:

    torchrun --standalone --nproc-per-node=2 examples/sharded_train.py \
        [--sharding fsdp2|zero|zero2] [--steps 100] [--checkpoint DIR]

The model is torch's ``nn.TransformerEncoder`` language model of ``fastopt demo
--precision`` (two layers, width 64, over the characters of Python's ``json`` sources),
on gloo on the CPU, NCCL where every rank has a GPU. Each rank trains on its share of
every batch, and clips the gradient norm to 1 (fastopt's fused ``clip_grad_norm``, and
``torch.nn.utils.clip_grad_norm_`` for torch).

- ``--sharding fsdp2`` (the default): each encoder layer and the whole model are
  ``fully_shard``ed over all ranks, for both optimizers.
- ``--sharding zero``: fastopt shards its own state (``process_group=``, ZeRO stage 1)
  over a plain model, against torch's DistributedDataParallel with torch.optim.AdamW.
- ``--sharding zero2``: the same with ``zero_stage=2``: the gradients are reduced during
  backward, bucket by bucket, and each rank keeps only its share of them.

Rank 0 prints both losses every 10 steps and how far the two runs end apart. With
``--checkpoint DIR`` the fastopt run is saved there at the end (FSDP2: with
``torch.distributed.checkpoint``; zero: the optimizer with ``fastopt.save``, a file per
rank and an index, and the model on rank 0), and, when DIR holds a checkpoint already,
resumed from it first, on any number of ranks.
"""

import argparse
import os

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import fastopt
import fastopt.torch as ft
from fastopt.precision_demo import LanguageModel, batches, corpus


def build(which, sharding, vocabulary, device):
    """The model (sharded as ``sharding`` asks, for optimizer ``which``) and its
    optimizer."""
    torch.manual_seed(0)  # every rank, and both runs, from the same weights
    model = LanguageModel(vocabulary).to(device)
    options = dict(lr=3e-3, weight_decay=0.01)
    if sharding == "fsdp2":
        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        for layer in model.encoder.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    elif which == "fastopt":  # zero: fastopt's own partitions of a plain model
        return model, ft.AdamW(model.parameters(), clip_grad_norm=1.0,
                               process_group=dist.group.WORLD,
                               zero_stage=2 if sharding == "zero2" else 1, **options)
    else:
        model = torch.nn.parallel.DistributedDataParallel(model)
    if which == "fastopt":
        return model, ft.AdamW(model.parameters(), clip_grad_norm=1.0, **options)
    return model, torch.optim.AdamW(model.parameters(), **options)


def resume(sharding, model, opt, checkpoint):
    """The step at which the checkpoint in the folder ``checkpoint`` left off (0 where
    there is none), its state loaded into ``model`` and ``opt``."""
    if sharding == "fsdp2" and os.path.exists(os.path.join(checkpoint, ".metadata")):
        model_state, optim_state = get_state_dict(model, opt)
        state = {"model": model_state, "optim": optim_state, "step": torch.tensor(0)}
        dcp.load(state, checkpoint_id=checkpoint)
        set_state_dict(model, opt, model_state_dict=model_state, optim_state_dict=optim_state)
        return int(state["step"])
    if sharding != "fsdp2" and os.path.exists(os.path.join(checkpoint, "model.pt")):
        state = torch.load(os.path.join(checkpoint, "model.pt"))
        model.load_state_dict(state["model"])
        opt.load(os.path.join(checkpoint, "optimizer"))  # each rank its piece, any number
        saved = {int(s["step"]) for s in opt.state.values() if "step" in s}
        if saved != {state["step"]}:  # a save stopped between the two
            raise ValueError(f"{checkpoint}: the optimizer was saved at step {saved}, the "
                             f"model at {state['step']}")
        return state["step"]
    return 0


def save(sharding, model, opt, checkpoint, step):
    if sharding == "fsdp2":
        model_state, optim_state = get_state_dict(model, opt)
        dcp.save({"model": model_state, "optim": optim_state, "step": torch.tensor(step)},
                 checkpoint_id=checkpoint)
        return
    os.makedirs(checkpoint, exist_ok=True)
    fastopt.save(opt, os.path.join(checkpoint, "optimizer"))  # every rank, atomically
    if dist.get_rank() == 0:
        temporary = os.path.join(checkpoint, "model.pt.partial")
        torch.save({"model": model.state_dict(), "step": step}, temporary)
        os.replace(temporary, os.path.join(checkpoint, "model.pt"))


def train(which, sharding, steps, tokens, vocabulary, device, checkpoint=None):
    model, opt = build(which, sharding, vocabulary, device)
    first = resume(sharding, model, opt, checkpoint) if checkpoint else 0
    rank, world = dist.get_rank(), dist.get_world_size()
    losses = []
    for step, (x, y) in enumerate(batches(tokens, first + steps)):
        if step < first:
            continue  # the batches that the checkpoint has seen
        x, y = x.chunk(world)[rank].to(device), y.chunk(world)[rank].to(device)
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x).reshape(-1, vocabulary),
                                                 y.reshape(-1))
        loss.backward()
        if which == "torch":
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        average = loss.detach().clone()
        dist.all_reduce(average)  # the loss over the whole batch, on every rank
        losses.append(average.item() / world)
    if checkpoint and which == "fastopt":
        save(sharding, model, opt, checkpoint, first + steps)
    weights = [(p.full_tensor() if sharding == "fsdp2" else p).detach().cpu()
               for p in model.parameters()]
    return first, losses, weights


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sharding", choices=("fsdp2", "zero", "zero2"), default="fsdp2")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--checkpoint", help="a folder to resume from and save to")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else \
        torch.device("cpu")
    try:
        tokens, vocabulary = corpus()
        tokens = tokens[:-tokens.size // 10]
        first, ours, our_weights = train("fastopt", args.sharding, args.steps, tokens,
                                         vocabulary, device, args.checkpoint)
        _, theirs, their_weights = train("torch", args.sharding, first + args.steps, tokens,
                                         vocabulary, device)
        theirs = theirs[first:]
        if dist.get_rank() == 0:
            how = {"fsdp2": "FSDP2", "zero": "fastopt ZeRO vs torch DDP",
                   "zero2": "fastopt ZeRO-2 vs torch DDP"}[args.sharding]
            print(f"{dist.get_world_size()} ranks, {how}, AdamW (lr 3e-3, clipped to norm 1)"
                  + (f", resumed at step {first}" if first else ""))
            print(f"{'step':>5s} {'fastopt.torch':>14s} {'torch.optim':>12s}")
            for step in range(0, len(ours), 10):
                print(f"{first + step:5d} {ours[step]:14.4f} {theirs[step]:12.4f}")
            gap = max(float((a - b).abs().max()) for a, b in zip(our_weights, their_weights))
            print(f"final loss {np.mean(ours[-10:]):.4f} vs {np.mean(theirs[-10:]):.4f}; "
                  f"largest weight difference {gap:.2e}", flush=True)
        dist.barrier()  # every rank done before any tears down (see the test of this)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
