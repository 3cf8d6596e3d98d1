"""Where an Adam step's time goes: the wrapper, the kernel, and what bounds the kernel.

    python bench/adam_overhead.py [--sizes 1e3,1e5,1e6] [--rounds 7] [--asm]

1. ``opt.step()`` against the raw kernel call (the compiled kernel with the same arrays
   and scalars) and torch fused Adam, interleaved (``fastopt.bench.time_steps``:
   medians of per-round ratios).
2. The wrapper at 1e3 taken apart: each piece of ``step()`` called alone, and a
   cProfile of many steps.
3. The kernel's arithmetic: serial copies of the Adam loop with the square root, the
   division or both taken out, at sizes that stay in the caches.
4. With ``--asm``: the vector instructions of the compiled kernel.

Parts 2 and 3 count this thread's CPU time (``time.thread_time``), which leaves out the
time the OS gives other processes; that makes them usable on a busy machine. Part 1 is
wall time, as a user sees it.
"""

import argparse
import cProfile
import io
import math
import pstats
import re
import statistics
import time
from pathlib import Path

import numba
import numpy as np
from numba import njit

import fastopt
from fastopt import bench
from fastopt.kernels import cpu, stream
from fastopt.kernels._template import float32s
from fastopt.optim import engine
from fastopt.optim import optimizer as optimizer_module

f32 = np.float32
PRESENT = ("exp_avg", "exp_avg_sq")


def adam(n):
    """A stepped fastopt.Adam of n parameters and its raw kernel call (same arrays)."""
    rng = np.random.default_rng(0)
    opt = fastopt.Adam(fastopt.adopt(rng.standard_normal(n).astype(f32)), lr=1e-3)
    opt.flat_grads[:] = rng.standard_normal(n).astype(f32)
    opt.step()
    kernel = cpu.kernel("adam", PRESENT)
    prep = float32s((1.0, 1.0, np.inf, 0.0))
    h = float32s(opt.scalars(opt.param_groups[0], 2, [], {}))  # as the backend passes them
    arrays = (opt.flat_params, opt.flat_grads, opt.state["exp_avg"], opt.state["exp_avg_sq"])
    parallel = n >= cpu.PARALLEL_MIN_SIZE

    def raw():
        kernel(*arrays, prep, h, parallel, cpu.FLUSH_DENORMALS)

    return opt, raw, (kernel, arrays, prep, h)


def torch_fused(n):
    import torch

    rng = np.random.default_rng(0)
    p = torch.nn.Parameter(torch.from_numpy(rng.standard_normal(n).astype(f32)))
    p.grad = torch.from_numpy(rng.standard_normal(n).astype(f32))
    return torch.optim.Adam([p], lr=1e-3, fused=True).step


def side_by_side(sizes, rounds):
    print("1. opt.step() against the raw kernel (as step() calls it, and forced serial or "
          "parallel), torch fused\n   and the in-place triad, interleaved: median of "
          f"{rounds} rounds, each the median of its batches; ratios are medians of "
          "per-round ratios\n")
    labels = ["step", "raw", "raw serial", "raw parallel", "torch fused", "triad"]
    print(f"{'params':>8s}" + "".join(f"{label:>13s}" for label in labels)
          + f"{'step/raw':>10s}{'fused/step':>11s}{'fused/raw':>10s}")
    for n in sizes:
        opt, raw, (kernel, arrays, prep, h) = adam(n)
        a, c = arrays[0].copy(), np.ones(n, f32)
        steps = {"step": opt.step, "raw": raw,
                 "raw serial": lambda: kernel(*arrays, prep, h, False, cpu.FLUSH_DENORMALS),
                 "raw parallel": lambda: kernel(*arrays, prep, h, True, cpu.FLUSH_DENORMALS),
                 "torch fused": torch_fused(n),
                 "triad": lambda: stream.add_scaled(a, c, f32(1e-9))}
        batches = {}
        times = bench.time_steps(steps, rounds, batches=batches)

        def ratio(x, y):
            return statistics.median(bench.per_round(times[x], times[y]))

        noisy = (any(bench.spread(bench.per_round(times[x], times["step"])) > bench.NOISY
                     for x in ("raw", "torch fused"))
                 or any(bench.stalled(b) > 0.5 for b in batches.values()))
        print(f"{n:8.0e}" + "".join(f"{bench._duration(statistics.median(times[k])):>13s}"
                                    for k in labels)
              + f"{ratio('step', 'raw'):9.2f}x{ratio('torch fused', 'step'):10.2f}x"
              f"{ratio('torch fused', 'raw'):9.2f}x" + (" !" if noisy else ""))
    print("   triad: a += s*c, 12 bytes per element against Adam's 28; ! = noisy "
          "(see fastopt bench)")


def cpu_time(fn, calls, repeats=7):
    """Median over ``repeats`` batches of this thread's CPU seconds per call."""
    samples = []
    for _ in range(repeats):
        start = time.thread_time_ns()
        for _ in range(calls):
            fn()
        samples.append((time.thread_time_ns() - start) / calls / 1e9)
    return statistics.median(samples)


def wrapper_parts(n=1000, calls=20000):
    print(f"\n2. opt.step() at {n:.0e} taken apart (this thread's CPU time per call)\n")
    opt, raw, (kernel, arrays, prep, h) = adam(n)
    opt.step()  # a second step through flat_grads: the next one takes the steady path
    group = opt.param_groups[0]
    step = opt.state["step"] + 1
    plan = opt._plan(0, group, step)
    other = np.ones(n, f32)
    tiny_kernel = adam(1)[1]
    signature = kernel.signatures[-1]
    entry = kernel.overloads[signature].entry_point  # the compiled code, without dispatch
    launch = opt._steady.groups[0].launch
    scalars = opt.scalars(group, step, (), {})
    parts = {
        "opt.step() (steady: set up as the step before)": opt.step,
        "  Steady.step (all but the lock)": lambda: opt._steady.step(opt),
        "  engine.fold (scalars, overflow check)": lambda: engine.fold(opt, group, step, (), {}),
        "    scalars(group, ...)": lambda: opt.scalars(group, step, (), {}),
        "  h as a float32 array": lambda: float32s(scalars),
        "  the launcher: kernel call": lambda: launch(h),
        "    raw kernel call": raw,
        "      raw kernel call at n=1 (dispatch)": tiny_kernel,
        "      compiled entry point (no dispatch)": lambda: entry(
            *arrays, prep, h, n >= cpu.PARALLEL_MIN_SIZE, cpu.FLUSH_DENORMALS),
        "opt.step(grad_scale=1.0) (the plain path)": lambda: opt.step(grad_scale=1.0),
        "  _plan (validate if changed, scalars)": lambda: opt._plan(0, group, step),
        "    _snapshot(group)": lambda: optimizer_module._snapshot(group),
        "  _gradients(flat array) (step(g))": lambda: opt._gradients(other),
        "  _allocate_state": lambda: opt._allocate_state([plan]),
        "  backend.run (kernel lookup + call)": lambda: opt._backend.run(
            "adam", PRESENT, list(arrays), prep, h),
    }
    for label, fn in parts.items():
        fn()
        print(f"{label:50s} {cpu_time(fn, calls) * 1e6:7.2f} us")
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(calls):
        opt.step()
    profile.disable()
    text = io.StringIO()
    pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(12)
    print(f"\ncProfile of {calls} steps (tottime, inflated by the profiler):")
    print("\n".join(line for line in text.getvalue().splitlines()[6:] if line.strip()))


# -- 3. the kernel's arithmetic -----------------------------------------------------

def _variant(sqrt, divide):
    """A serial Adam loop in the rule's arithmetic, with the square root and the
    division optional (replaced by a multiply), compiled as fastopt compiles."""
    @njit(error_model="numpy", nogil=True)
    def loop(p, g, m, v, step_size, inv_bc2_sqrt, eps, one_minus_beta1, beta2,
             one_minus_beta2):
        for i in range(p.size):
            gi = g[i]
            mi = m[i] + one_minus_beta1 * (gi - m[i])
            vi = beta2 * v[i] + one_minus_beta2 * gi * gi
            root = math.sqrt(vi) if sqrt else vi
            denom = root * inv_bc2_sqrt + eps
            p[i] = p[i] - step_size * (mi / denom if divide else mi * denom)
            m[i] = mi
            v[i] = vi
    return loop


VARIANTS = {"as fastopt (sqrt + div)": (True, True), "no sqrt": (False, True),
            "no div": (True, False), "neither": (False, False)}


def arithmetic(sizes, ghz):
    print("\n3. What bounds the kernel: serial loops, this thread's CPU time per element "
          f"(cycles at {ghz:.2f} GHz)\n")
    loops = {label: _variant(*flags) for label, flags in VARIANTS.items()}
    scalars = tuple(f32(x) for x in (1e-3, 1.0, 1e-8, 0.1, 0.999, 0.001))
    header = f"{'':28s}" + "".join(f"{n:>18.0e}" for n in sizes)
    print(header)
    rows = {}
    for n in sizes:
        opt, raw, (kernel, arrays, prep, h) = adam(n)
        p, g, m, v = (a.copy() for a in arrays)
        calls = max(3, int(2e6 // n))
        rows.setdefault("fastopt kernel, serial", []).append(
            _per_element(lambda: kernel(*arrays, prep, h, False, cpu.FLUSH_DENORMALS), n, calls))
        for label, loop in loops.items():
            loop(p, g, m, v, *scalars)
            rows.setdefault(label, []).append(
                _per_element(lambda: loop(p, g, m, v, *scalars), n, calls))
    for label, values in rows.items():
        print(f"{label:28s}" + "".join(f"{ns:9.3f}ns {ns * ghz:5.2f}c" for ns in values))


def _per_element(fn, n, calls):
    fn()
    return cpu_time(fn, calls) / n * 1e9


def assembly():
    print("\n4. Vector instructions in the compiled Adam kernel (whole function)\n")
    # Compiled afresh, without the on-disk cache, which keeps no assembly to inspect.
    kernel = njit(**{**cpu._OPTIONS, "cache": False})(cpu.kernel("adam", PRESENT).py_func)
    opt, raw, (_, arrays, prep, h) = adam(1)
    kernel(*arrays, prep, h, False, cpu.FLUSH_DENORMALS)
    asm = "\n".join(kernel.inspect_asm().values())
    Path("adam_kernel.s").write_text(asm)
    print("(the whole listing: adam_kernel.s)")
    for pattern in ["vsqrtps\\s.*ymm", "vsqrtps\\s.*xmm", "vsqrtss", "vdivps\\s.*ymm",
                    "vdivps\\s.*xmm", "vdivss", "vrsqrtps", "vrcpps", "vfmadd\\w*ps\\s.*ymm",
                    "vfmadd\\w*ss", "ldmxcsr", "cvtss2sd|cvtsd2ss"]:
        count = len(re.findall(pattern, asm))
        print(f"{pattern:26s} {count:5d}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1e3,1e5,1e6")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--ghz", type=float, default=2.45, help="clock for the cycle counts")
    parser.add_argument("--threads", type=int, help="threads for fastopt and torch")
    parser.add_argument("--asm", action="store_true")
    parser.add_argument("--parts", default="1,2,3", help="which of parts 1-3 to run")
    args = parser.parse_args()
    sizes = [int(float(x)) for x in args.sizes.split(",")]
    if args.threads:
        import torch

        fastopt.set_num_threads(args.threads)
        torch.set_num_threads(args.threads)
    print(f"fastopt {fastopt.__version__} from {fastopt.__file__}; numba {numba.__version__}, "
          f"{numba.get_num_threads()} threads")
    warning = bench.busy()
    if warning:
        print(warning)
    if "1" in args.parts:
        side_by_side(sizes, args.rounds)
    if "2" in args.parts:
        wrapper_parts()
    if "3" in args.parts:
        arithmetic([10_000] + [n for n in sizes if n >= 100_000], args.ghz)
    if args.asm:
        assembly()


if __name__ == "__main__":
    main()
