"""fastopt.torch.Adam against torch.optim.Adam on a model of many tensors, in one process.

    python bench/torch_model.py [--tensors 200] [--rounds 7] [--size N] [--bfloat16]

The "model" is a list of parameters with sizes drawn log-uniformly between 1e2 and
2e5 (fixed seed), or all of ``--size`` elements, with gradients set once; each
contender steps its own copy of the same parameters. Rounds are interleaved and the
best round of each is reported, with the in-place triad ``a += s * c`` over as many
elements timed beside them: an Adam step moves 28 bytes per parameter, so 28 bytes at
the triad's bandwidth is what the machine allows, and ``bound`` is that time.

With ``--bfloat16`` the parameters and gradients are bfloat16, and fastopt.torch steps
them with float32 master weights, with none, and with none and bfloat16 state (torch's
fused and foreach Adam keep bfloat16 state, without master weights); the bound and the
rates, which count float32's 28 bytes, are not printed.
"""

import argparse

import numpy as np
import torch

import fastopt.torch
from fastopt.cli import per_call
from fastopt.kernels import stream

ADAM_BYTES = 28


def parameters(count, size=None, seed=0, dtype=torch.float32):
    rng = np.random.default_rng(seed)
    sizes = np.exp(rng.uniform(np.log(1e2), np.log(2e5), count)).astype(int)
    if size is not None:
        sizes[:] = size
    params = [torch.nn.Parameter(torch.randn(int(n), dtype=dtype)) for n in sizes]
    for p in params:
        p.grad = torch.randn_like(p)
    return params


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tensors", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--size", type=int, default=None,
                        help="elements per tensor (default: log-uniform 1e2-2e5)")
    parser.add_argument("--bfloat16", action="store_true",
                        help="bfloat16 parameters and gradients")
    args = parser.parse_args()
    contenders = {
        "fastopt.torch.Adam": lambda ps: fastopt.torch.Adam(ps, lr=1e-3),
        "torch Adam fused": lambda ps: torch.optim.Adam(ps, lr=1e-3, fused=True),
        "torch Adam foreach": lambda ps: torch.optim.Adam(ps, lr=1e-3, foreach=True),
        "torch Adam for-loop": lambda ps: torch.optim.Adam(ps, lr=1e-3, foreach=False),
    }
    if args.bfloat16:
        contenders |= {
            "fastopt, no master": lambda ps: fastopt.torch.Adam(ps, lr=1e-3,
                                                                master_weights=None),
            "fastopt, bf16 state": lambda ps: fastopt.torch.Adam(
                ps, lr=1e-3, master_weights=None, state_dtype="bfloat16")}
    dtype = torch.bfloat16 if args.bfloat16 else torch.float32
    steps = {}
    for name, make in contenders.items():
        params = parameters(args.tensors, args.size, dtype=dtype)
        steps[name] = make(params).step
    total = sum(p.numel() for p in params)
    if not args.bfloat16:
        a, c = np.zeros(total, np.float32), np.ones(total, np.float32)
        steps["triad"] = lambda: stream.add_scaled(a, c, np.float32(1e-9))
    print(f"{args.tensors} tensors, {total / 1e6:.3f}M {dtype} parameters; torch threads "
          f"{torch.get_num_threads()}")
    for step in steps.values():
        step()
    number = max(1, min(1000, int(2e7 // total)))
    best = dict.fromkeys(steps, float("inf"))
    for _ in range(args.rounds):
        for name, step in steps.items():
            best[name] = min(best[name], per_call(step, number))
    if not args.bfloat16:
        bandwidth = stream.BYTES_PER_ELEMENT * total / best.pop("triad")
        best["bound (28 B at triad)"] = ADAM_BYTES * total / bandwidth
    reference = best["torch Adam fused"]
    for name, seconds in best.items():
        rate = "" if args.bfloat16 else f"  {ADAM_BYTES * total / seconds / 1e9:6.1f} GB/s"
        print(f"{name:22s} {seconds * 1e3:8.3f} ms  {reference / seconds:5.2f}x vs torch fused "
              f"{rate}")


if __name__ == "__main__":
    main()
