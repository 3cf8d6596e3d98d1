"""What clipping, the non-finite check and loss scaling cost, side by side in one process.

    python bench/clipping.py [--sizes 1e3,1e6,2e7]

Adam steps at each size: plain; with ``clip_grad_norm`` (one read pass for the norm,
the coefficient folded into the step); with ``skip_nonfinite`` alone (the same read
pass); with ``grad_scale`` alone (no extra pass); and torch's
``clip_grad_norm_`` followed by ``torch.optim.Adam(fused=True)``. Rounds are
interleaved and the best round of each is reported.
"""

import argparse

import numba
import numpy as np
import torch

import fastopt
from fastopt.cli import per_call


def contenders(n):
    rng = np.random.default_rng(0)
    p0 = rng.standard_normal(n).astype(np.float32)
    g0 = rng.standard_normal(n).astype(np.float32)

    def fastopt_step(**options):
        opt = fastopt.Adam(fastopt.adopt(p0.copy()), lr=1e-3, **options)
        opt.flat_grads[:] = g0
        return opt.step

    scaled = fastopt_step()
    p = torch.nn.Parameter(torch.from_numpy(p0.copy()))
    p.grad = torch.from_numpy(g0.copy())
    fused = torch.optim.Adam([p], lr=1e-3, fused=True)

    def torch_clipped():
        torch.nn.utils.clip_grad_norm_([p], 1.0)
        fused.step()

    return {
        "plain": fastopt_step(),
        "clip_grad_norm": fastopt_step(clip_grad_norm=1.0),
        "skip_nonfinite": fastopt_step(skip_nonfinite=True),
        "grad_scale": lambda: scaled(grad_scale=1.0),
        "torch clip+fused": torch_clipped,
        "torch fused": fused.step,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1e3,1e6,2e7")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    print(f"threads: numba {numba.get_num_threads()}, torch {torch.get_num_threads()}")
    names = None
    for n in (int(float(x)) for x in args.sizes.split(",")):
        fns = contenders(n)
        if names is None:
            names = list(fns)
            print(f"{'params':>8s} " + " ".join(f"{name:>17s}" for name in names))
        number = max(1, int(3e7 // n))
        for fn in fns.values():
            fn()
        best = dict.fromkeys(fns, float("inf"))
        for _ in range(args.rounds):
            for name, fn in fns.items():
                best[name] = min(best[name], per_call(fn, number))
        plain = best["plain"]
        print(f"{n:8.0e} " + " ".join(
            f"{best[name] * 1e6:9.1f}us {best[name] / plain:5.2f}x" for name in names))
    print("(each cell: time per step, and its ratio to the plain fastopt step)")


if __name__ == "__main__":
    main()
