"""What the Python wrapper adds to the raw kernel, side by side in one process.

    python bench/overhead.py [--sizes 1e3,1e6]
    python bench/overhead.py --formats [--sizes 4096]

``opt.step()`` (validation, host-side scalars, dispatch) against calling the compiled
Adam kernel directly with the same arrays and scalars. With ``--formats``, Adam's step in
each storage format of ``fastopt bench --precision``, on the fast path of a training
loop (``opt.step()``) and on the plain path (``opt.step(skip_nonfinite=False)``, which
takes it). Rounds are interleaved; the best round of each is reported.
"""

import argparse

import numpy as np

import fastopt
from fastopt.bench import PRECISION_FORMATS
from fastopt.cli import per_call
from fastopt.kernels import cpu
from fastopt.kernels._template import float32s


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1e3,1e6")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--formats", action="store_true")
    args = parser.parse_args()
    if args.formats:
        return formats([int(float(x)) for x in args.sizes.split(",")], args.rounds)
    print(f"{'params':>8s} {'opt.step()':>11s} {'raw kernel':>11s} {'overhead':>9s}")
    for n in (int(float(x)) for x in args.sizes.split(",")):
        opt = fastopt.Adam(fastopt.adopt(np.ones(n, np.float32)), lr=1e-3)
        opt.flat_grads[:] = 1.0
        opt.step()
        kernel = cpu.kernel("adam", ("exp_avg", "exp_avg_sq"))
        group = opt.param_groups[0]
        prep = float32s((1.0, 1.0, np.inf, 0.0))
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


def formats(sizes, rounds):
    print(f"{'params':>8s} {'format':32s} {'fast path':>10s} {'plain path':>11s}")
    for n in sizes:
        steps = {}
        for label, (dtype, options) in PRECISION_FORMATS.items():
            opt = fastopt.Adam([np.ones(n, fastopt.precision.DTYPES[dtype])], lr=1e-3,
                               **options)
            opt.flat_grads[:] = 1.0
            opt.step()
            steps[label] = (opt.step, lambda opt=opt: opt.step(skip_nonfinite=False))
        number = max(10, int(2e6 // n))
        best = {(label, path): float("inf") for label in steps for path in (0, 1)}
        for _ in range(rounds):
            for label, pair in steps.items():
                for path, step in enumerate(pair):
                    best[label, path] = min(best[label, path], per_call(step, number))
        for label in steps:
            print(f"{n:8.0e} {label:32s} {best[label, 0] * 1e6:8.2f}us "
                  f"{best[label, 1] * 1e6:9.2f}us")


if __name__ == "__main__":
    main()
