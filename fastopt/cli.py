"""The ``fastopt`` command line (also ``python -m fastopt``)."""

import argparse
import os
import sys
import time

import numpy as np

import fastopt

# Every algorithm of the registry, with the options its spec fits least squares with.
ALGORITHMS = {name: dict(algorithm.spec.check)
              for name, algorithm in fastopt.optim.ALGORITHMS.items()}


def least_squares(seed=0, rows=200, cols=50):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((rows, cols)).astype(np.float32) / np.sqrt(cols)
    b = rng.standard_normal(rows).astype(np.float32)
    return a, b


def train(name, kwargs, steps):
    """Fit least squares with one optimizer; returns (initial loss, final loss)."""
    a, b = least_squares()
    opt = getattr(fastopt, name)({"x": np.zeros(a.shape[1], np.float32)}, **kwargs)
    x, grad = opt.params["x"], opt.grads["x"]
    first = None
    for _ in range(steps):
        residual = a @ x - b
        loss = 0.5 * float(residual @ residual) / len(b)
        first = loss if first is None else first
        grad[:] = a.T @ residual / len(b)
        opt.step()
    residual = a @ x - b
    return first, 0.5 * float(residual @ residual) / len(b)


def per_call(fn, number):
    """Seconds per call of ``fn``, averaged over ``number`` calls."""
    start = time.perf_counter()
    for _ in range(number):
        fn()
    return (time.perf_counter() - start) / number


def best_time(fn, repeats, number):
    return min(per_call(fn, number) for _ in range(repeats))


def speed(n):
    """Adam at n parameters against naive NumPy and the in-place stream, in one run."""
    from fastopt.kernels import stream

    from . import bench

    rng = np.random.default_rng(0)
    opt = fastopt.Adam(fastopt.adopt(rng.standard_normal(n).astype(np.float32)))
    opt.flat_grads[:] = rng.standard_normal(n).astype(np.float32)
    p, g, state = opt.flat_params.copy(), opt.flat_grads, {}
    c, scale = np.ones(n, np.float32), np.float32(1e-9)
    opt.step()
    stream.add_scaled(p, c, scale)
    number = max(1, int(2e7 // n))
    t_stream = best_time(lambda: stream.add_scaled(p, c, scale), 5, number)
    t_fast = best_time(opt.step, 5, number)
    t_numpy = best_time(lambda: bench.numpy_step("Adam", p, g, state, 10, 1e-3), 3,
                        max(1, number // 10))
    stream_gbs = stream.BYTES_PER_ELEMENT * n / t_stream / 1e9
    adam_gbs = fastopt.Adam.spec.moves * n / t_fast / 1e9
    return t_fast, t_numpy, adam_gbs, stream_gbs


def check(args):
    print(f"fastopt {fastopt.__version__}: every algorithm fits a least-squares problem "
          f"({args.steps} steps)\n")
    print(f"{'algorithm':10s} {'loss before':>12s} {'loss after':>12s}")
    failed = []
    for name, kwargs in ALGORITHMS.items():
        before, after = train(name, kwargs, args.steps)
        print(f"{name:10s} {before:12.5f} {after:12.5f}")
        if not after < 0.9 * before:
            failed.append(name)
    print("\nAdam step time, measured side by side with an in-place stream (a += s*c)")
    print(f"{'params':>10s} {'fastopt':>10s} {'NumPy':>10s} {'speed-up':>9s} "
          f"{'Adam GB/s':>10s} {'stream GB/s':>12s} {'% stream':>9s}")
    for n in args.sizes:
        t_fast, t_numpy, adam_gbs, stream_gbs = speed(n)
        print(f"{n:10.0e} {t_fast * 1e6:8.1f}us {t_numpy * 1e6:8.1f}us {t_numpy / t_fast:8.1f}x "
              f"{adam_gbs:10.1f} {stream_gbs:12.1f} {100 * adam_gbs / stream_gbs:8.0f}%")
    if failed:
        print(f"\nFAILED: the loss did not fall for {', '.join(failed)}")
        return 1
    return 0


def bench(args):
    from . import bench

    if args.precision:
        bench.run_precision(args.algorithms, args.sizes, args.rounds, args.out,
                            device=args.device)
    else:
        bench.run(args.algorithms, args.sizes, args.rounds, args.threads, args.device,
                  args.out, args.quick)
    return 0


def demo(args):
    if not args.precision:
        from . import demo

        return demo.run(args.out)
    try:
        from . import precision_demo
    except ImportError as error:
        print(f"fastopt demo --precision trains with PyTorch, which did not import ({error}): "
              "pip install torch", file=sys.stderr)
        return 1
    return precision_demo.run(args.out, args.steps)


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line (and exit status 2), without the usage block."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _counts(what):
    """An argparse type: comma-separated whole numbers >= 1 (``1e6`` reads as 1000000)."""
    def parse(text):
        try:
            values = [float(item) for item in text.split(",")]
        except ValueError:
            values = []
        if not values or not all(v.is_integer() and v >= 1 for v in values):
            raise argparse.ArgumentTypeError(f"{what} must be whole numbers >= 1, got {text!r}")
        return [int(v) for v in values]
    return parse


def _positive(text):
    """An argparse type: an int >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}")
    return value


def _names(text):
    names = text.split(",")
    if not all(names):
        raise argparse.ArgumentTypeError(f"must be comma-separated names, got {text!r}")
    return names


def _check_bench(parser, args):
    """What argparse cannot check alone; every fault is a usage error."""
    from . import bench

    unknown = [name for name in args.algorithms or () if name not in bench.ALGORITHMS]
    if unknown:
        parser.error(f"argument --algorithms: unknown {', '.join(unknown)}; choose from "
                     f"{', '.join(bench.ALGORITHMS)}")
    if args.precision and (args.quick or args.threads):
        parser.error("argument --precision: runs without --quick or --threads")
    if args.precision and "Adafactor" in (args.algorithms or ()):
        parser.error("argument --precision: Adafactor keeps its state in float32 only, and "
                     "its bytes are not those of one pass over its buffers")
    if args.threads is not None:
        import numba

        most = numba.config.NUMBA_NUM_THREADS  # the size of Numba's pool, fixed at start-up
        if args.threads > most:
            parser.error(f"argument --threads: at most {most} here (NUMBA_NUM_THREADS), got "
                         f"{args.threads}")
    if args.device == "cuda":
        from numba import cuda

        if not cuda.is_available():
            parser.error("argument --device: no CUDA GPU is available here")


def _check_out(parser, args):
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        parser.error(f"argument --out: {args.out} exists and is not a folder")


def main(argv=None):
    parser = _Parser(prog="fastopt", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    check_parser = commands.add_parser(
        "check", help="train a small problem with every algorithm and time Adam")
    check_parser.add_argument("--steps", type=_positive, default=300)
    check_parser.add_argument("--sizes", type=_counts("sizes"),
                              default=[1000, 1000000, 10000000],
                              help="comma-separated parameter counts to time Adam at")
    check_parser.set_defaults(run=check)
    bench_parser = commands.add_parser(
        "bench", help="time every algorithm against NumPy, torch.optim and the bandwidth")
    bench_parser.add_argument("--quick", action="store_true",
                              help="Adam and SGD at four sizes, fewer rounds (< 2 minutes)")
    bench_parser.add_argument("--algorithms", type=_names,
                              help="comma-separated, e.g. Adam,SGD (default: all)")
    bench_parser.add_argument("--sizes", type=_counts("sizes"),
                              help="comma-separated parameter counts, e.g. 1e3,1e6")
    bench_parser.add_argument("--rounds", type=_positive,
                              help="interleaved rounds (default 7; 5 with --quick)")
    bench_parser.add_argument("--threads", type=_positive,
                              help="CPU threads for the kernels (at most NUMBA_NUM_THREADS)")
    bench_parser.add_argument("--precision", action="store_true",
                              help="time each storage format (float32, bfloat16 and float16 "
                                   "parameters with float32 master weights, remainders or "
                                   "none, bfloat16 and int8 state) of --algorithms (default "
                                   "Adam, not Adafactor) at --sizes (default 4e6,2e7), "
                                   "without --quick or --threads")
    bench_parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    bench_parser.add_argument("--out", default="fastopt-bench",
                              help="folder for results.json and throughput.png "
                                   "(precision.json with --precision)")
    bench_parser.set_defaults(run=bench)
    demo_parser = commands.add_parser(
        "demo", help="draw the classic optimizer pictures (needs matplotlib: fastopt[plot])")
    demo_parser.add_argument("--out", default="fastopt-demo", help="folder for the PNG files")
    demo_parser.add_argument("--precision", action="store_true",
                             help="instead, train a small TransformerEncoder language model "
                                  "with AdamW in each storage format and draw the loss curves "
                                  "(needs torch)")
    demo_parser.add_argument("--steps", type=int, default=300,
                             help="training steps of each --precision run (default 300)")
    demo_parser.set_defaults(run=demo)
    args = parser.parse_args(argv)
    if args.command == "bench":
        _check_bench(bench_parser, args)
    if args.command == "demo" and args.steps < 1:
        demo_parser.error(f"--steps must be at least 1, got {args.steps}")
    if args.command in ("bench", "demo"):
        _check_out(bench_parser if args.command == "bench" else demo_parser, args)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
