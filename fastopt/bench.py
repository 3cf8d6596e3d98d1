"""``fastopt bench``: fastopt against naive NumPy, torch.optim and the memory bandwidth.

Every comparison runs in one process, interleaved round by round, so that the machine's
noise hits all implementations alike. For each algorithm and size it times:

- ``fastopt``: one fused kernel per step;
- ``numpy``: the same update written naively in NumPy (one pass, and a temporary, per
  operation);
- ``torch loop`` / ``torch foreach`` / ``torch fused``: torch.optim's three paths, when
  torch is installed (fused only where torch has it);
- ``triad``: the in-place stream ``a += s * c``, this machine's bandwidth ceiling for an
  update in place (12 bytes per element).

Effective GB/s counts the bytes the algorithm must move: it reads the parameters, the
gradients and each state buffer and writes the parameters and each state buffer.
"""

import json
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np

import fastopt

f32 = np.float32

# Each algorithm with the options that bring in its usual state; the same for all.
ALGORITHMS = {
    "SGD": dict(lr=1e-3, momentum=0.9),
    "Adagrad": dict(lr=1e-2),
    "RMSprop": dict(lr=1e-3),
    "Adadelta": dict(lr=1.0),
    "Adam": dict(lr=1e-3),
    "AdamW": dict(lr=1e-3),
    "Adamax": dict(lr=1e-3),
    "NAdam": dict(lr=1e-3),
    "RAdam": dict(lr=1e-3),
    "Rprop": dict(lr=1e-2),
    "ASGD": dict(lr=1e-2),
    "Adafactor": dict(lr=1e-2),
    "Lion": dict(lr=1e-4),
    "LAMB": dict(lr=1e-3),
    "LARS": dict(lr=1.0),
}
STATE_BUFFERS = {"SGD": 1, "Adagrad": 1, "RMSprop": 1, "Adadelta": 2, "Adam": 2, "AdamW": 2,
                 "Adamax": 2, "NAdam": 2, "RAdam": 2, "Rprop": 2, "ASGD": 1, "Lion": 1}
# Algorithms of several passes: what all their passes move, per parameter. LAMB: moments
# and norms (p, g, m, v read; m, v written), then the step (p, m, v read; p written).
# LARS: the norms (p, g), then the step (p, g, v read; p, v written). Adafactor on a
# matrix: the norms and row sums (p, g), the column sums (g), the sum of u^2 (g), the
# step (p, g read; p written); the factors are too small to count.
PASSES_BYTES = {"LAMB": 40, "LARS": 28, "Adafactor": 28}
TORCH_FUSED = {"SGD", "Adagrad", "Adam", "AdamW"}
NOT_IN_TORCH = {"Lion", "LAMB", "LARS"}
NUMPY_NAIVE = {"SGD", "Adagrad", "RMSprop", "Adadelta", "Adam", "AdamW", "Adamax", "NAdam"}
# Adafactor factors matrices: it is timed on one of this many columns.
COLUMNS = 1000
DEFAULT_SIZES = [1_000, 100_000, 1_000_000, 20_000_000]
QUICK = dict(algorithms=["Adam", "SGD"], sizes=[1_000, 100_000, 1_000_000, 10_000_000],
             rounds=5, model_tensors=50)
TRIAD_BYTES = 12


def bytes_per_param(name):
    """One pass reads p, g and each state buffer, and writes p and each state buffer: 4
    bytes each. Algorithms of several passes count them all."""
    if name in PASSES_BYTES:
        return PASSES_BYTES[name]
    return 4 * (3 + 2 * STATE_BUFFERS[name])


def shapes(name, n):
    """The tensors an algorithm is timed on: one vector, or a matrix for Adafactor (plus
    a vector for what does not fill a row)."""
    if name != "Adafactor" or n < COLUMNS:
        return [(n,)]
    return [(n // COLUMNS, COLUMNS), (n % COLUMNS,)]


# -- naive NumPy, one operation (and temporary) at a time -------------------------------

def numpy_step(name, p, g, state, t, lr):
    """One step written as a NumPy user would, float32 throughout."""
    if name == "SGD":
        buf = state.setdefault("buf", g.copy())
        if t > 1:
            buf *= 0.9
            buf += g
        p -= lr * buf
    elif name == "Adagrad":
        s = state.setdefault("sum", np.zeros_like(p))
        s += g * g
        p -= lr * g / (np.sqrt(s) + 1e-10)
    elif name == "RMSprop":
        v = state.setdefault("v", np.zeros_like(p))
        v[:] = 0.99 * v + 0.01 * g * g
        p -= lr * g / (np.sqrt(v) + 1e-8)
    elif name == "Adadelta":
        v = state.setdefault("v", np.zeros_like(p))
        u = state.setdefault("u", np.zeros_like(p))
        v[:] = 0.9 * v + 0.1 * g * g
        delta = np.sqrt(u + 1e-6) / np.sqrt(v + 1e-6) * g
        u[:] = 0.9 * u + 0.1 * delta * delta
        p -= lr * delta
    else:  # the Adam family
        m = state.setdefault("m", np.zeros_like(p))
        v = state.setdefault("v", np.zeros_like(p))
        if name == "AdamW":
            p *= 1 - lr * 1e-2
        m[:] = 0.9 * m + 0.1 * g
        if name == "Adamax":
            np.maximum(0.999 * v, np.abs(g) + 1e-8, out=v)
            p -= lr / (1 - 0.9 ** t) * m / v
            return
        v[:] = 0.999 * v + 0.001 * g * g
        denom = np.sqrt(v / (1 - 0.999 ** t)) + 1e-8
        if name == "NAdam":
            mu, mu_next = (0.9 * (1 - 0.5 * 0.96 ** (k * 4e-3)) for k in (t, t + 1))
            product = state["mu_product"] = state.get("mu_product", 1.0) * mu
            p -= lr * (1 - mu) / (1 - product) * g / denom
            p -= lr * mu_next / (1 - product * mu_next) * m / denom
            return
        p -= lr / (1 - 0.9 ** t) * m / denom


# -- the contenders ----------------------------------------------------------------------

def contenders(name, n, device="cpu"):
    """``{implementation: step function}`` for one algorithm and size."""
    rng = np.random.default_rng(0)
    p0 = rng.standard_normal(n).astype(f32)
    g0 = rng.standard_normal(n).astype(f32)
    kwargs = ALGORITHMS[name]
    steps = {}
    if device == "cuda":
        from numba import cuda

        from .kernels import cuda as cuda_kernels

        opt = getattr(fastopt, name)(fastopt.adopt(cuda.to_device(p0), shapes(name, n),
                                                   grads=cuda.to_device(g0)), **kwargs)
        steps["fastopt"] = _synchronised(opt.step, cuda.synchronize)
        a, c = cuda.to_device(p0), cuda.to_device(np.ones(n, f32))
        steps["triad"] = _synchronised(
            lambda: cuda_kernels.launch(cuda_kernels.add_scaled, n, a, c, f32(1e-9)),
            cuda.synchronize)
    else:
        from .kernels import stream

        opt = getattr(fastopt, name)(fastopt.adopt(p0.copy(), shapes(name, n)), **kwargs)
        opt.flat_grads[:] = g0
        steps["fastopt"] = opt.step
        if name in NUMPY_NAIVE:
            p, state, t = p0.copy(), {}, [0]

            def numpy_naive():
                t[0] += 1
                numpy_step(name, p, g0, state, t[0], kwargs["lr"])

            steps["numpy"] = numpy_naive
        a, c = p0.copy(), np.ones(n, f32)
        steps["triad"] = lambda: stream.add_scaled(a, c, f32(1e-9))
    steps.update(_torch_contenders(name, p0, g0, device))
    return steps


def _synchronised(step, synchronize):
    def run():
        step()
        synchronize()
    return run


def _torch_contenders(name, p0, g0, device):
    try:
        import torch
    except ImportError:
        return {}
    if device == "cuda" and not torch.cuda.is_available() or name in NOT_IN_TORCH:
        return {}
    paths = {"torch loop": dict(foreach=False), "torch foreach": dict(foreach=True)}
    if name in TORCH_FUSED:
        paths["torch fused"] = dict(fused=True)
    shape, *rest = shapes(name, p0.size)
    if rest and rest[0][0]:
        return {}  # a second tensor to split off; the default sizes have none
    steps = {}
    for label, options in paths.items():
        param = torch.nn.Parameter(torch.from_numpy(p0[:math.prod(shape)].reshape(shape).copy())
                                   .to(device))
        param.grad = torch.from_numpy(g0[:param.numel()].reshape(shape).copy()).to(device)
        opt = getattr(torch.optim, name)([param], **ALGORITHMS[name], **options)
        steps[label] = (_synchronised(opt.step, torch.cuda.synchronize) if device == "cuda"
                        else opt.step)
    return steps


def time_steps(steps, rounds, round_seconds=0.02):
    """``{implementation: [seconds per step, one per round]}``, interleaved; each round
    of each implementation runs for about ``round_seconds``."""
    numbers = {}
    for label, step in steps.items():
        step()  # compile, allocate state, warm the caches
        start = time.perf_counter()
        step()
        numbers[label] = max(1, int(round_seconds / (time.perf_counter() - start)))
    times = {label: [] for label in steps}
    for _ in range(rounds):
        for label, step in steps.items():
            start = time.perf_counter()
            for _ in range(numbers[label]):
                step()
            times[label].append((time.perf_counter() - start) / numbers[label])
    return times


# -- the "real model" case ---------------------------------------------------------------

def model_case(tensors, rounds, seed=0):
    """fastopt.torch.Adam against torch.optim.Adam on ``tensors`` tensors of log-uniform
    sizes between 1e2 and 2e5, or None without torch."""
    try:
        import torch

        import fastopt.torch as fastopt_torch
    except ImportError:
        return None
    rng = np.random.default_rng(seed)
    sizes = np.exp(rng.uniform(np.log(1e2), np.log(2e5), tensors)).astype(int)

    def parameters():
        params = [torch.nn.Parameter(torch.randn(int(n))) for n in sizes]
        for p in params:
            p.grad = torch.randn_like(p)
        return params

    steps = {"fastopt": fastopt_torch.Adam(parameters(), lr=1e-3).step}
    for label, options in (("torch loop", dict(foreach=False)),
                           ("torch foreach", dict(foreach=True)),
                           ("torch fused", dict(fused=True))):
        steps[label] = torch.optim.Adam(parameters(), lr=1e-3, **options).step
    return int(sizes.sum()), time_steps(steps, rounds)


# -- report ------------------------------------------------------------------------------

def rows(name, n, times):
    """One table row per implementation."""
    triad = min(times["triad"])
    triad_gbs = TRIAD_BYTES * n / triad / 1e9
    fused = min(times["torch fused"]) if "torch fused" in times else None
    out = []
    for label, seconds in times.items():
        best = min(seconds)
        moved = TRIAD_BYTES if label == "triad" else bytes_per_param(name)
        gbs = moved * n / best / 1e9
        out.append({"algorithm": name, "size": n, "implementation": label,
                    "median_s": statistics.median(seconds), "min_s": best,
                    "params_per_s": n / best, "gb_per_s": gbs,
                    "triad_percent": 100 * gbs / triad_gbs,
                    "speedup_vs_torch_fused": fused / best if fused else None})
    return out


def format_table(records):
    header = (f"{'algorithm':9s} {'size':>7s} {'implementation':15s} {'median':>10s} "
              f"{'min':>10s} {'params/s':>9s} {'GB/s':>7s} {'% triad':>8s} {'vs fused':>9s}")
    lines = [header, "-" * len(header)]
    for r in records:
        fused = r["speedup_vs_torch_fused"]
        lines.append(
            f"{r['algorithm']:9s} {r['size']:7.0e} {r['implementation']:15s} "
            f"{_duration(r['median_s']):>10s} {_duration(r['min_s']):>10s} "
            f"{r['params_per_s']:9.2e} {r['gb_per_s']:7.1f} {r['triad_percent']:7.0f}% "
            f"{(f'{fused:.2f}x' if fused else '-'):>9s}")
    return "\n".join(lines)


def _duration(seconds):
    return f"{seconds * 1e6:.1f}us" if seconds < 1e-3 else f"{seconds * 1e3:.2f}ms"


def plot(records, path):
    """Throughput against size, one line per implementation, one panel per algorithm,
    with the triad's ceiling for the algorithm's bytes per parameter; False without
    matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    names = list(dict.fromkeys(r["algorithm"] for r in records))
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 4), squeeze=False)
    for ax, name in zip(axes[0], names):
        mine = [r for r in records if r["algorithm"] == name]
        for label in dict.fromkeys(r["implementation"] for r in mine):
            if label == "triad":
                points = [(r["size"], r["gb_per_s"] * 1e9 / bytes_per_param(name))
                          for r in mine if r["implementation"] == label]
                style = dict(color="black", ls="--", label="bandwidth ceiling (triad)")
            else:
                points = [(r["size"], r["params_per_s"]) for r in mine
                          if r["implementation"] == label]
                style = dict(marker="o", label=label)
            ax.plot(*zip(*points), **style)
        ax.set(xscale="log", yscale="log", xlabel="parameters", ylabel="parameters per second",
               title=name)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


class Progress:
    """A one-line progress bar on stderr."""

    def __init__(self, total):
        self.total, self.done = total, 0

    def advance(self, what):
        self.done += 1
        filled = int(30 * self.done / self.total)
        sys.stderr.write(f"\r[{'#' * filled}{'.' * (30 - filled)}] {self.done}/{self.total} "
                         f"{what:30s}")
        sys.stderr.flush()
        if self.done == self.total:
            sys.stderr.write("\n")


def run(algorithms=None, sizes=None, rounds=None, threads=None, device="cpu",
        out="fastopt-bench", quick=False, model_tensors=200):
    """Run the benchmark, print the table, write ``results.json`` (and ``throughput.png``
    with matplotlib) into ``out``; returns the records."""
    if quick:
        algorithms = algorithms or QUICK["algorithms"]
        sizes = sizes or QUICK["sizes"]
        rounds, model_tensors = rounds or QUICK["rounds"], QUICK["model_tensors"]
    rounds = 7 if rounds is None else rounds
    if rounds < 1 or any(n < 1 for n in sizes or ()):
        raise ValueError(f"rounds and sizes must be >= 1, got rounds={rounds}, sizes={sizes}")
    algorithms = algorithms or list(ALGORITHMS)
    unknown = set(algorithms) - set(ALGORITHMS)
    if unknown:
        raise ValueError(f"unknown algorithms {sorted(unknown)}; choose from {list(ALGORITHMS)}")
    sizes = sizes or DEFAULT_SIZES
    if threads:
        fastopt.set_num_threads(threads)
        try:
            import torch

            torch.set_num_threads(threads)
        except ImportError:
            pass
    import numba

    print(f"fastopt bench: {device}, {numba.get_num_threads()} threads, best and median of "
          f"{rounds} interleaved rounds")
    progress = Progress(len(algorithms) * len(sizes) + (device == "cpu"))
    records = []
    for name in algorithms:
        for n in sizes:
            progress.advance(f"{name} {n:.0e}")
            records += rows(name, n, time_steps(contenders(name, n, device), rounds))
    model = model_case(model_tensors, rounds) if device == "cpu" else None
    if device == "cpu":
        progress.advance("real model")
    print(format_table(records))
    if model:
        total, times = model
        fused = min(times["torch fused"])
        print(f"\nreal model: Adam on {model_tensors} tensors (log-uniform 1e2..2e5, "
              f"{total / 1e6:.2f}M parameters) through fastopt.torch")
        for label, seconds in times.items():
            print(f"  {label:14s} {_duration(min(seconds)):>10s}  "
                  f"{fused / min(seconds):5.2f}x vs torch fused")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"records": records, "device": device, "threads": numba.get_num_threads(),
              "model": None if not model else
              {"tensors": model_tensors, "params": model[0],
               "min_s": {k: min(v) for k, v in model[1].items()}}}
    (out / "results.json").write_text(json.dumps(result, indent=1))
    drawn = plot(records, out / "throughput.png")
    print(f"\nwrote {out / 'results.json'}"
          + (f" and {out / 'throughput.png'}" if drawn else " (no plot: matplotlib missing)"))
    return records
