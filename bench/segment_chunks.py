"""The cost of a chunk in the CPU segment passes: the float64 sum of squares of 2**20
float32 gradients through ``HostBackend.run_segments``, as one segment (chunks of
16384) and as rows of 4096 ... 1 elements, each row a segment of its own (FSDP2's
sums by rows, Adafactor's vectors summed element by element):

    python bench/segment_chunks.py [--threads 2]

Prints the best of 7 rounds of 5 passes, per pass and per element.
"""

import argparse
import time

import numba
import numpy as np

from fastopt._backend import GRAD_SQUARES, HostBackend


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    numba.set_num_threads(args.threads)
    backend, n = HostBackend(), 1 << 20
    g = np.random.default_rng(0).standard_normal(n).astype(np.float32)
    tensors = backend.flat_tensors(g, g, np.array([0]))
    cases = {"one segment": backend.segments([n], [0])}
    for row in (4096, 768, 64, 8, 1):
        rows = n // row
        cases[f"rows of {row}"] = backend.segments([row] * rows, np.arange(rows) * row,
                                                   np.zeros(rows, np.int64),
                                                   np.arange(rows) * row)
    for name, segments in cases.items():
        backend.run_segments(GRAD_SQUARES, tensors, [], (), (), segments, keep_subnormals=True)
        best = float("inf")
        for _ in range(7):
            start = time.perf_counter()
            for _ in range(5):
                backend.run_segments(GRAD_SQUARES, tensors, [], (), (), segments,
                                     keep_subnormals=True)
            best = min(best, (time.perf_counter() - start) / 5)
        print(f"{name:14s} {best * 1e6:8.0f} us  {best * 1e9 / n:5.2f} ns an element  "
              f"({len(segments.chunk_segment)} chunks)")


if __name__ == "__main__":
    main()
