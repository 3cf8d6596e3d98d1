"""Train a small language model sharded with FSDP2, stepped by fastopt.torch.AdamW, and
the same model with torch.optim.AdamW side by side:

    torchrun --nproc-per-node=2 examples/fsdp2_train.py [--steps 100] [--checkpoint DIR]

The model is torch's ``nn.TransformerEncoder`` language model of ``fastopt demo
--precision`` (two layers, width 64, over the characters of Python's ``json`` sources).
Each encoder layer and the whole model are ``fully_shard``ed over all ranks (gloo on
the CPU, NCCL where every rank has a GPU); each rank trains on its share of every
batch, and clips the gradient norm to 1 (fastopt's fused ``clip_grad_norm``, and
``torch.nn.utils.clip_grad_norm_`` for torch). Rank 0 prints both losses every 10
steps and how far the two runs end apart. With ``--checkpoint DIR`` the fastopt run
is saved there with ``torch.distributed.checkpoint`` at the end, and, when DIR holds a
checkpoint already, resumed from it first (on any number of ranks).
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

import fastopt.torch as ft
from fastopt.precision_demo import LanguageModel, batches, corpus


def sharded_model(vocabulary, device):
    torch.manual_seed(0)  # every rank, and both runs, from the same weights
    model = LanguageModel(vocabulary).to(device)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for layer in model.encoder.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def train(which, steps, tokens, vocabulary, device, checkpoint=None):
    model = sharded_model(vocabulary, device)
    if which == "fastopt":
        opt = ft.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01, clip_grad_norm=1.0)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    first = 0
    if checkpoint and os.path.exists(os.path.join(checkpoint, ".metadata")):
        model_state, optim_state = get_state_dict(model, opt)
        state = {"model": model_state, "optim": optim_state, "step": torch.tensor(0)}
        dcp.load(state, checkpoint_id=checkpoint)
        set_state_dict(model, opt, model_state_dict=model_state, optim_state_dict=optim_state)
        first = int(state["step"])
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
        model_state, optim_state = get_state_dict(model, opt)
        dcp.save({"model": model_state, "optim": optim_state,
                  "step": torch.tensor(first + steps)}, checkpoint_id=checkpoint)
    weights = [p.detach().full_tensor().cpu() for p in model.parameters()]
    return first, losses, weights


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--checkpoint", help="a folder to resume from and save to (DCP)")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else \
        torch.device("cpu")
    try:
        tokens, vocabulary = corpus()
        tokens = tokens[:-tokens.size // 10]
        first, ours, our_weights = train("fastopt", args.steps, tokens, vocabulary, device,
                                         args.checkpoint)
        _, theirs, their_weights = train("torch", first + args.steps, tokens, vocabulary,
                                         device)
        theirs = theirs[first:]
        if dist.get_rank() == 0:
            print(f"{dist.get_world_size()} ranks, FSDP2, AdamW (lr 3e-3, clipped to norm 1)"
                  + (f", resumed at step {first}" if first else ""))
            print(f"{'step':>5s} {'fastopt.torch':>14s} {'torch.optim':>12s}")
            for step in range(0, len(ours), 10):
                print(f"{first + step:5d} {ours[step]:14.4f} {theirs[step]:12.4f}")
            gap = max(float((a - b).abs().max()) for a, b in zip(our_weights, their_weights))
            print(f"final loss {np.mean(ours[-10:]):.4f} vs {np.mean(theirs[-10:]):.4f}; "
                  f"largest weight difference {gap:.2e}")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
