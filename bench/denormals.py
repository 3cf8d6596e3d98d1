"""What subnormal numbers cost, with and without fastopt's flush to zero, in one process.

    python bench/denormals.py [--size 1e6]

Adam steps on state that holds normal numbers and on state that long runs of tiny
gradients (1e-21, whose squares are subnormal) fill with subnormals, each with
``fastopt.kernels.cpu.FLUSH_DENORMALS`` off and on. Rounds are interleaved; the best
round of each is reported, with its ratio to the normal-state step.
"""

import argparse

import numpy as np

import fastopt
from fastopt.cli import per_call
from fastopt.kernels import cpu


def optimizer(n, scale):
    opt = fastopt.Adam(fastopt.adopt(np.ones(n, np.float32)), lr=1e-3)
    opt.flat_grads[:] = (np.random.default_rng(0).standard_normal(n) * scale).astype(np.float32)
    return opt


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=float, default=1e6)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    n = int(args.size)
    cases = {(flush, label): optimizer(n, scale) for flush in (False, True)
             for label, scale in (("normal", 1.0), ("subnormal", 1e-21))}
    for (flush, _), opt in cases.items():
        cpu.FLUSH_DENORMALS = flush
        for _ in range(20):  # fill the state
            opt.step()
    best = dict.fromkeys(cases, float("inf"))
    for _ in range(args.rounds):
        for (flush, label), opt in cases.items():
            cpu.FLUSH_DENORMALS = flush
            best[flush, label] = min(best[flush, label], per_call(opt.step, 10))
    cpu.FLUSH_DENORMALS = True
    print(f"Adam, {n:.0e} parameters")
    for (flush, label), seconds in best.items():
        v = cases[flush, label].state["exp_avg_sq"]
        share = np.mean((v != 0) & (np.abs(v) < np.finfo(np.float32).tiny))
        print(f"flush {'on ' if flush else 'off'}  {label:9s} state ({share:4.0%} subnormal) "
              f"{seconds * 1e6:9.1f} us  {seconds / best[flush, 'normal']:5.2f}x")


if __name__ == "__main__":
    main()
