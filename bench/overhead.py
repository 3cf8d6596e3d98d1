"""What the Python wrapper adds to the raw kernel, side by side in one process.

    python bench/overhead.py [--sizes 1e3,1e6]

``opt.step()`` (validation, host-side scalars, dispatch) against calling the compiled
Adam kernel directly with the same arrays and scalars. Rounds are interleaved; the best
round of each is reported.
"""

import argparse

import numpy as np

import fastopt
from fastopt.cli import per_call
from fastopt.kernels import cpu
from fastopt.kernels._template import float32s


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1e3,1e6")
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    print(f"{'params':>8s} {'opt.step()':>11s} {'raw kernel':>11s} {'overhead':>9s}")
    for n in (int(float(x)) for x in args.sizes.split(",")):
        opt = fastopt.Adam(fastopt.adopt(np.ones(n, np.float32)), lr=1e-3)
        opt.flat_grads[:] = 1.0
        opt.step()
        kernel = cpu.kernel("adam", ("exp_avg", "exp_avg_sq"))
        group = opt.param_groups[0]
        prep = float32s((1.0, np.inf, 0.0))
        h = float32s(opt.scalars(group, 2, [], {}))  # as the backend passes them
        arrays = (opt.flat_params, opt.flat_grads, opt.state["exp_avg"], opt.state["exp_avg_sq"])
        parallel = n >= cpu.PARALLEL_MIN_SIZE

        def raw():
            kernel(*arrays, prep, h, parallel, cpu.FLUSH_DENORMALS)

        number = max(10, int(2e7 // n))
        best = {"step": float("inf"), "raw": float("inf")}
        for _ in range(args.rounds):
            best["step"] = min(best["step"], per_call(opt.step, number))
            best["raw"] = min(best["raw"], per_call(raw, number))
        print(f"{n:8.0e} {best['step'] * 1e6:9.2f}us {best['raw'] * 1e6:9.2f}us "
              f"{100 * (best['step'] / best['raw'] - 1):8.1f}%")


if __name__ == "__main__":
    main()
