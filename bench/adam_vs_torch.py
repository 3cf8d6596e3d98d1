"""fastopt.Adam against torch.optim.Adam(fused=True), side by side in one process.

    python bench/adam_vs_torch.py [--sizes 1e3,1e6,2e7]

Timings on shared machines are noisy, so the implementations are interleaved round by
round and the table reports the best round of each, plus the ratio. The in-place stream
``a += s * c`` runs in the same rounds and gives the bandwidth ceiling.
"""

import argparse
import numba
import numpy as np
import torch

import fastopt
from fastopt.cli import per_call
from fastopt.kernels import stream


def contenders(n):
    rng = np.random.default_rng(0)
    p0 = rng.standard_normal(n).astype(np.float32)
    g0 = rng.standard_normal(n).astype(np.float32)

    opt = fastopt.Adam(fastopt.adopt(p0.copy()), lr=1e-3)
    opt.flat_grads[:] = g0

    p = torch.nn.Parameter(torch.from_numpy(p0.copy()))
    p.grad = torch.from_numpy(g0.copy())
    fused = torch.optim.Adam([p], lr=1e-3, fused=True)

    a, c, s = p0.copy(), np.ones(n, np.float32), np.float32(1e-9)
    return {
        "fastopt": opt.step,
        "torch fused": fused.step,
        "stream": lambda: stream.add_scaled(a, c, s),
    }


def measure(n, rounds):
    fns = contenders(n)
    number = max(1, int(3e7 // n))
    for fn in fns.values():  # compile, allocate state, warm caches
        fn()
    best = {name: float("inf") for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            best[name] = min(best[name], per_call(fn, number))
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1e3,1e6,2e7")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    print(f"threads: numba {numba.get_num_threads()}, torch {torch.get_num_threads()}")
    print(f"{'params':>8s} {'fastopt':>11s} {'torch fused':>12s} {'speed-up':>9s} "
          f"{'Adam GB/s':>10s} {'stream GB/s':>12s} {'% stream':>9s}")
    for n in (int(float(x)) for x in args.sizes.split(",")):
        best = measure(n, args.rounds)
        adam_gbs = 28 * n / best["fastopt"] / 1e9
        stream_gbs = stream.BYTES_PER_ELEMENT * n / best["stream"] / 1e9
        print(f"{n:8.0e} {best['fastopt'] * 1e6:9.1f}us {best['torch fused'] * 1e6:10.1f}us "
              f"{best['torch fused'] / best['fastopt']:8.2f}x {adam_gbs:10.1f} "
              f"{stream_gbs:12.1f} {100 * adam_gbs / stream_gbs:8.0f}%")


if __name__ == "__main__":
    main()
