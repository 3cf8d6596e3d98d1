"""Where the parallel loop starts to beat the serial one (kernels.cpu.PARALLEL_MIN_SIZE).

    python bench/crossover.py

Times the raw Adam kernel with each loop, interleaved, at sizes around the threshold.
"""

import numba
import numpy as np

import fastopt
from fastopt.cli import per_call
from fastopt.kernels import cpu
from fastopt.kernels._template import float32s


def main():
    kernel = cpu.kernel("adam", ("exp_avg", "exp_avg_sq"))
    opt = fastopt.Adam([np.zeros(1, np.float32)])
    h = float32s(opt.scalars(opt.param_groups[0], 10, [], {}))  # as the backend passes them
    prep = float32s((1.0, 1.0, np.inf, 0.0))
    print(f"threads: {numba.get_num_threads()}, PARALLEL_MIN_SIZE = {cpu.PARALLEL_MIN_SIZE}")
    print(f"{'size':>8s} {'serial':>10s} {'parallel':>10s}")
    for n in [1 << k for k in range(10, 19)]:
        arrays = [np.full(n, 0.5, np.float32) for _ in range(4)]
        number = max(10, int(2e7 // n))
        best = {False: float("inf"), True: float("inf")}
        for _ in range(7):
            for parallel in best:
                best[parallel] = min(best[parallel],
                                     per_call(lambda: kernel(*arrays, prep, h, parallel, True), number))
        print(f"{n:8d} {best[False] * 1e6:8.2f}us {best[True] * 1e6:8.2f}us")


if __name__ == "__main__":
    main()
