"""``fastopt bench``: fastopt against naive NumPy, torch.optim and the memory bandwidth.

Every comparison runs in one process, interleaved round by round, so that the machine's
noise hits all implementations alike. For each algorithm and size it times:

- ``fastopt``: one fused kernel per step;
- ``numpy``: the same update written naively in NumPy (one pass, and a temporary, per
  operation);
- ``torch loop`` / ``torch foreach`` / ``torch fused``: torch.optim's three paths, when
  torch is installed (fused only where torch has it);
- ``deepspeed cpu adam``: DeepSpeed's ``DeepSpeedCPUAdam`` (fp32) for Adam and AdamW,
  when deepspeed is installed and its CPU op builds (skipped silently otherwise);
- ``triad``: the in-place stream ``a += s * c``, this machine's bandwidth ceiling for an
  update in place (12 bytes per element); on the GPU also ``copy``, a device-to-device
  copy (8 bytes per element).

Effective GB/s counts the bytes the algorithm must move: it reads the parameters, the
gradients and each state buffer and writes the parameters and each state buffer.

On a busy machine one slow round must not become a headline. So every comparison is a
ratio taken per round, between contenders timed back to back in that round, and the
table shows the median of those per-round ratios, their range, and a noise column; a row
whose per-round ratios disagree by more than ``NOISY`` of their median is marked ``!``.
"""

import functools
import importlib
import inspect
import json
import math
import os
import statistics
import sys
from pathlib import Path
from time import perf_counter, sleep

import numpy as np

import fastopt
from ._backend import is_cuda_array
from .kernels import stream

f32 = np.float32

# Every algorithm of the registry, with the options its spec times it with.
ALGORITHMS = {name: dict(algorithm.spec.bench)
              for name, algorithm in fastopt.optim.ALGORITHMS.items()}
NUMPY_NAIVE = {"SGD", "Adagrad", "RMSprop", "Adadelta", "Adam", "AdamW", "Adamax", "NAdam"}
# Adafactor factors matrices: it is timed on one of this many columns.
COLUMNS = 1000
DEFAULT_SIZES = [1_000, 100_000, 1_000_000, 20_000_000]
QUICK = dict(algorithms=["Adam", "SGD"], sizes=[1_000, 100_000, 1_000_000, 10_000_000],
             rounds=5, model_tensors=50)
TRIAD_BYTES = stream.BYTES_PER_ELEMENT
# The yardsticks and the bytes one element costs them: the in-place triad reads a and c
# and writes a; the copy reads one buffer and writes another.
YARDSTICK_BYTES = {"triad": TRIAD_BYTES, "copy": 8}
# A row is marked noisy when (max - min) / median of its headline's per-round ratios
# exceeds this: the rounds disagree too much for the median to be trusted blindly.
NOISY = 0.25
# DeepSpeed's CPU Adam is a contender when it imports; tests switch it off, since its
# first use compiles a C++ extension for minutes.
DEEPSPEED = True


def bytes_per_param(name):
    """What one step reads and writes per parameter, all its passes together (the
    spec's ``moves``): a single pass reads p, g and each state buffer, and writes p and
    each state buffer, 4 bytes each."""
    return getattr(fastopt, name).spec.moves


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

@functools.cache
def _data(n):
    """Read-only starting parameters and gradients of ``n`` elements, made once per size
    (drawing 1e8 normals takes seconds; every algorithm at that size shares them, also
    where each algorithm runs every size in turn, as bench/gpu_check.py's do). Every
    size's stay for the process: 0.9 GB for 1e5 to 1e8."""
    rng = np.random.default_rng(0)
    p0 = rng.standard_normal(n, dtype=f32)
    g0 = rng.standard_normal(n, dtype=f32)
    p0.flags.writeable = g0.flags.writeable = False
    return p0, g0


def contenders(name, n, device="cpu"):
    """``{implementation: step function}`` for one algorithm and size."""
    p0, g0 = _data(n)
    kwargs = ALGORITHMS[name]
    steps = {}
    if device == "cuda":
        from numba import cuda

        opt = getattr(fastopt, name)(fastopt.adopt(cuda.to_device(p0), shapes(name, n),
                                                   grads=cuda.to_device(g0)), **kwargs)
        steps["fastopt"] = _synchronised(opt.step, cuda.synchronize)
    else:
        opt = getattr(fastopt, name)(fastopt.adopt(p0.copy(), shapes(name, n)), **kwargs)
        opt.flat_grads[:] = g0
        steps["fastopt"] = opt.step
        if name in NUMPY_NAIVE:
            p, state, t = p0.copy(), {}, [0]

            def numpy_naive():
                t[0] += 1
                numpy_step(name, p, g0, state, t[0], kwargs["lr"])

            steps["numpy"] = numpy_naive
    steps["triad"] = _triad(p0, device)
    if device == "cuda":
        source, target = cuda.to_device(p0), cuda.device_array_like(p0)
        steps["copy"] = _synchronised(lambda: target.copy_to_device(source), cuda.synchronize)
    steps.update(_torch_contenders(name, p0, g0, device))
    if device == "cpu" and DEEPSPEED and name in ("Adam", "AdamW"):
        deepspeed = _deepspeed_adam(name, p0, g0)
        if deepspeed:
            steps["deepspeed cpu adam"] = deepspeed
    return steps


def _triad(p0, device):
    """The in-place triad ``a += s * c`` over ``p0``'s size on ``device``: the memory's
    bandwidth for a step's bytes."""
    n, ones = p0.size, np.ones(p0.size, f32)
    if device == "cpu":
        from .kernels import stream

        a = p0.copy()
        return lambda: stream.add_scaled(a, ones, f32(1e-9))
    from numba import cuda

    from .kernels import cuda as cuda_kernels

    a, c = cuda.to_device(p0), cuda.to_device(ones)
    return _synchronised(lambda: cuda_kernels.launch(cuda_kernels.add_scaled, n, a, c,
                                                     f32(1e-9)), cuda.synchronize)


def _deepspeed_adam(name, p0, g0):
    """The step of DeepSpeed's fp32 ``DeepSpeedCPUAdam`` set up as torch's Adam or AdamW,
    or None when deepspeed is missing or its CPU op does not build or run."""
    try:
        import torch
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        param = torch.nn.Parameter(torch.from_numpy(p0.copy()))
        param.grad = torch.from_numpy(g0.copy())
        # torch's defaults, which DeepSpeed's differ from: AdamW decays by 1e-2.
        opt = DeepSpeedCPUAdam([param], lr=ALGORITHMS[name]["lr"], betas=(0.9, 0.999),
                               eps=1e-8, weight_decay=1e-2 if name == "AdamW" else 0.0,
                               adamw_mode=name == "AdamW")
        opt.step()  # builds or loads the op; a failure here means no contender
    except Exception:
        return None
    return opt.step


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
    namesake = getattr(fastopt, name).spec.torch
    if device == "cuda" and not torch.cuda.is_available() or namesake is None:
        return {}
    torch_class = getattr(torch.optim, namesake)
    paths = {"torch loop": dict(foreach=False), "torch foreach": dict(foreach=True)}
    if "fused" in inspect.signature(torch_class).parameters:
        paths["torch fused"] = dict(fused=True)
    shape, *rest = shapes(name, p0.size)
    if rest and rest[0][0]:
        return {}  # a second tensor to split off; the default sizes have none
    steps = {}
    for label, options in paths.items():
        param = torch.nn.Parameter(torch.from_numpy(p0[:math.prod(shape)].reshape(shape).copy())
                                   .to(device))
        param.grad = torch.from_numpy(g0[:param.numel()].reshape(shape).copy()).to(device)
        opt = torch_class([param], **ALGORITHMS[name], **options)
        step = _torch_timed(opt.step, torch, device)
        try:
            step()  # a path this torch build lacks on this device fails here, not mid-run
        except RuntimeError as error:
            print(f"\nskipped {label} for {name} on {device}: {error}", file=sys.stderr)
            continue
        steps[label] = step
    return steps


def seconds_per_call(step, budget):
    """An estimate of one call of ``step``, from about ``budget`` seconds of calls: the
    fastest of a doubling series of at least three batches, so that one slow call (a
    context switch, a page fault) cannot make the step look slow. None for no budget."""
    if budget <= 0:
        return None
    best, number, spent = math.inf, 1, 0.0
    while (number < 8 or spent < budget) and number <= 1 << 20:
        start = perf_counter()
        for _ in range(number):
            step()
        elapsed = perf_counter() - start
        spent += elapsed
        best = min(best, elapsed / number)
        number *= 2
    return best


def time_steps(steps, rounds, round_seconds=0.02, batch_seconds=1e-5, batches=None):
    """``{implementation: [seconds per step, one per round]}``; ``batches``, a dict, if
    given, receives ``{implementation: [seconds per step of every batch]}``.

    In each round every implementation runs once for about ``round_seconds``, back to
    back, so that round ``r`` of any two implementations saw the same machine; the order
    rotates from round to round, so that none always follows the same neighbour. A round
    is timed in batches of calls lasting about ``batch_seconds`` (long enough for the
    clock), and its time per step is the median batch's. On a busy machine a
    multithreaded step now and then waits milliseconds for a thread the OS has
    descheduled; the mean of a round would count those stalls, and a few per round can
    make a 20 us step look like 500 us.
    """
    batches = {} if batches is None else batches
    plans = {}
    for label, step in steps.items():
        step()  # compile, allocate state, warm the caches
        one = seconds_per_call(step, round_seconds / 4)
        if not one:  # no time to calibrate (or a step too fast to time): one call a round
            plans[label] = (1, 1)
            continue
        calls = max(1, math.ceil(batch_seconds / one))
        plans[label] = (calls, max(1, int(round_seconds / (calls * one))))
    labels = list(steps)
    times = {label: [] for label in labels}
    for label in labels:
        batches[label] = []
    for r in range(rounds):
        k = r % len(labels)
        for label in labels[k:] + labels[:k]:
            step, (calls, number) = steps[label], plans[label]
            samples = []
            for _ in range(number):
                start = perf_counter()
                for _ in range(calls):
                    step()
                samples.append((perf_counter() - start) / calls)
            times[label].append(statistics.median(samples))
            batches[label] += samples
    return times


# -- the "real model" case ---------------------------------------------------------------

def model_case(tensors, rounds, seed=0):
    """fastopt.torch.Adam against torch.optim.Adam on ``tensors`` tensors of log-uniform
    sizes between 1e2 and 2e5: ``(parameters, times, batches)`` as :func:`time_steps`
    gives them, or None without torch."""
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
    batches = {}
    return int(sizes.sum()), time_steps(steps, rounds, batches=batches), batches


# -- storage formats (--precision) ---------------------------------------------------------

# label -> (parameter dtype, optimizer options): what ``fastopt bench --precision`` times.
PRECISION_FORMATS = {
    "float32": ("float32", {}),
    "float32, bf16 state": ("float32", dict(state_dtype="bfloat16")),
    "bf16 + fp32 master": ("bfloat16", {}),
    "bf16 + master, fp32 grads": ("bfloat16", dict(grad_dtype="float32")),
    "bf16 + master, bf16 state": ("bfloat16", dict(state_dtype="bfloat16")),
    "bf16 + remainder": ("bfloat16", dict(master_weights="remainder")),
    "bf16 + remainder, bf16 state": ("bfloat16", dict(master_weights="remainder",
                                                      state_dtype="bfloat16")),
    "float32, int8 state": ("float32", dict(state_dtype="int8")),
    "bf16 + remainder, int8 state": ("bfloat16", dict(master_weights="remainder",
                                                      state_dtype="int8")),
    "bf16, no master": ("bfloat16", dict(master_weights=None)),
    "bf16, no master, bf16 state": ("bfloat16", dict(master_weights=None,
                                                     state_dtype="bfloat16")),
    "fp16 + fp32 master": ("float16", {}),
    "fp16, no master": ("float16", dict(master_weights=None)),
}
PRECISION_SIZES = [4_000_000, 20_000_000]


def moved_bytes(opt):
    """Bytes one step of ``opt`` reads and writes per parameter, from its own buffers:
    the parameters, the master weights and each state buffer are read and written, the
    gradients read. (The master weights' step reads the 16-bit parameters too: a
    parameter written since the last step is taken.)"""
    master = 0 if opt.master_params is None else opt.master_params.itemsize
    return (2 * opt.flat_params.itemsize + opt.flat_grads.itemsize + 2 * master
            + 2 * sum(a.nbytes for a in _state_buffers(opt)) / opt.flat_params.size)


def resident_bytes(opt):
    """Bytes ``opt`` keeps per parameter: its buffers, over the parameter count."""
    arrays = [opt.flat_params, opt.flat_grads, opt.master_params, *_state_buffers(opt)]
    return sum(a.nbytes for a in arrays if a is not None) / opt.flat_params.size


def _state_buffers(opt):
    return [value for value in opt.state.values()
            if isinstance(value, np.ndarray) or is_cuda_array(value)]


def format_contenders(name, n, device="cpu"):
    """``(steps, optimizers)``: a step of ``name`` in every format of
    ``PRECISION_FORMATS`` over ``n`` parameters on ``device`` (int8 state where every
    state buffer of it is a moving average), the in-place triad, torch's fused step in
    float32 and bfloat16 where torch has one, and for Adam and AdamW the 8-bit
    optimizers of bitsandbytes and torchao where they are installed (and run on that
    device)."""
    p0, g0 = _data(n)
    optimizers = {}
    algorithm = getattr(fastopt, name)
    averages_only = set(algorithm.state_names()) <= set(algorithm.spec.averages)
    precision = fastopt.precision
    if device == "cuda":
        from numba import cuda
    for label, (dtype, options) in PRECISION_FORMATS.items():
        if options.get("state_dtype") == "int8" and not averages_only:
            continue
        p = p0.astype(precision.DTYPES[dtype])
        opt = getattr(fastopt, name)([precision.to_device(p) if device == "cuda" else p],
                                     **ALGORITHMS[name], **options)
        g = g0.astype(opt.flat_grads.dtype)
        if device == "cuda":  # as bits: see precision.to_device
            precision.bits(opt.flat_grads).copy_to_device(precision.bits(g))
        else:
            opt.flat_grads[...] = g
        optimizers[label] = opt
    # A step on CUDA is timed until the device has finished it.
    steps = {label: _synchronised(opt.step, cuda.synchronize) if device == "cuda" else opt.step
             for label, opt in optimizers.items()}
    steps["triad"] = _triad(p0, device)
    try:
        import torch
    except ImportError:
        return steps, optimizers
    if device == "cuda" and not torch.cuda.is_available():
        return steps, optimizers
    namesake = getattr(fastopt, name).spec.torch
    torch_class = getattr(torch.optim, namesake) if namesake else None
    if torch_class and "fused" in inspect.signature(torch_class).parameters:
        for label, dtype in (("torch fused", torch.float32), ("torch fused bf16", torch.bfloat16)):
            param = torch.nn.Parameter(torch.from_numpy(p0.copy()).to(dtype).to(device))
            param.grad = torch.from_numpy(g0.copy()).to(dtype).to(device)
            steps[label] = _torch_timed(
                torch_class([param], **ALGORITHMS[name], fused=True).step, torch, device)
    if name in ("Adam", "AdamW"):
        steps.update(_eight_bit_peers(torch, name, p0, g0, device))
    return steps, optimizers


def _torch_timed(step, torch, device):
    """``step``, followed on a GPU by waiting for its kernels, so that timing it times
    them."""
    return _synchronised(step, torch.cuda.synchronize) if device == "cuda" else step


def _eight_bit_peers(torch, name, p0, g0, device="cpu"):
    """The steps of bitsandbytes' and torchao's 8-bit Adam (AdamW) on ``device``, by
    label, for those installed and able to step there."""
    peers = {}
    for label, module in (("bitsandbytes 8-bit", "bitsandbytes.optim"),
                          ("torchao 8-bit", "torchao.optim")):
        try:
            cls = getattr(importlib.import_module(module), f"{name}8bit")
            param = torch.nn.Parameter(torch.from_numpy(p0.copy()).to(device))
            param.grad = torch.from_numpy(g0.copy()).to(device)
            step = _torch_timed(cls([param], **ALGORITHMS[name]).step, torch, device)
            step()  # a peer that cannot step here fails now, not mid-run
        except Exception:  # not installed, or it fails to load next to this torch
            continue
        peers[label] = step
    return peers


def format_rows(name, n, times, optimizers):
    """One record per contender: the bytes it moves and keeps per parameter (fastopt's
    formats), its median step, its bandwidth as a share of the triad's (for its own
    bytes) and its speed against fastopt's float32 step and torch fused, medians of
    per-round ratios."""
    records = []
    for label, seconds in times.items():
        if label == "triad":
            continue
        opt = optimizers.get(label)
        moved = moved_bytes(opt) if opt else None
        triad = (statistics.median(per_round([t * moved / TRIAD_BYTES for t in times["triad"]],
                                             seconds)) * 100 if moved else None)
        fused = times.get("torch fused")
        records.append({
            "algorithm": name, "size": n, "format": label, "moves_bytes": moved,
            "keeps_bytes": resident_bytes(opt) if opt else None, "times_s": seconds,
            "median_s": statistics.median(seconds), "triad_percent": triad,
            "vs_float32": statistics.median(per_round(times["float32"], seconds)),
            "vs_torch_fused": statistics.median(per_round(fused, seconds)) if fused else None})
    return records


def format_precision_table(records):
    header = (f"{'algorithm':9s} {'size':>7s} {'format':30s} {'moves B':>8s} {'keeps B':>8s} "
              f"{'median':>10s} {'% triad':>8s} {'vs fp32':>8s} {'vs fused':>9s}")
    lines = [header, "-" * len(header)]
    for r in records:
        moves, keeps = r["moves_bytes"], r["keeps_bytes"]
        triad, fused = r["triad_percent"], r["vs_torch_fused"]
        lines.append(
            f"{r['algorithm']:9s} {r['size']:7.0e} {r['format']:30s} "
            f"{(f'{moves:.1f}' if moves else '-'):>8s} {(f'{keeps:.1f}' if keeps else '-'):>8s} "
            f"{_duration(r['median_s']):>10s} {(f'{triad:.0f}%' if triad else '-'):>8s} "
            f"{r['vs_float32']:7.2f}x {(f'{fused:.2f}x' if fused else '-'):>9s}")
    return "\n".join(lines)


def run_precision(algorithms=None, sizes=None, rounds=None, out="fastopt-bench",
                  round_seconds=0.02, device="cpu"):
    """``fastopt bench --precision``: every storage format of each algorithm (default
    Adam) at each size (default 4e6 and 2e7) on ``device``, interleaved; prints the
    table and writes ``precision.json`` into ``out``. Returns the records."""
    algorithms, sizes = algorithms or ["Adam"], sizes or PRECISION_SIZES
    rounds = 7 if rounds is None else rounds
    records = []
    print(f"fastopt bench --precision: {device}, {rounds} interleaved rounds; bytes per "
          "parameter; ratios are medians of per-round ratios")
    for name in algorithms:
        for n in sizes:
            steps, optimizers = format_contenders(name, n, device)
            records += format_rows(name, n, time_steps(steps, rounds, round_seconds),
                                   optimizers)
            del steps, optimizers
    print(format_precision_table(records))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "precision.json").write_text(json.dumps({"records": records}, indent=1))
    print(f"\nwrote {out / 'precision.json'}")
    return records


# -- report ---------------------------------------------------------------------------

def per_round(numerator, denominator):
    """The ratios ``numerator[r] / denominator[r]`` of two contenders' times in the same
    rounds."""
    return [a / b for a, b in zip(numerator, denominator)]


def spread(ratios):
    """How much per-round ratios disagree: ``(max - min) / median``."""
    return (max(ratios) - min(ratios)) / statistics.median(ratios)


def stalled(samples):
    """The share of batches that took at least twice as long as the fastest: waits for
    the OS, not the step's work. Above one half, even the median is a stall."""
    return sum(t >= 2 * min(samples) for t in samples) / len(samples)


def rows(name, n, times, batches=None):
    """One table row per implementation. Throughput is the best round's; every comparison
    is the median of per-round ratios, with their range. A row's noise is the spread of
    its headline ratio: vs torch fused, or % triad where there is no torch fused (and for
    torch fused itself). With ``batches`` (from :func:`time_steps`), each row also gets
    the share of its batches that stalled. A row is noisy when its noise exceeds
    ``NOISY`` or when most batches of it, or of what its headline compares it with,
    stalled."""
    triad, fused = times.get("triad"), times.get("torch fused")
    stalls = {label: stalled(batches[label]) if batches else 0.0 for label in times}
    out = []
    for label, seconds in times.items():
        best = min(seconds)
        moved = YARDSTICK_BYTES.get(label) or bytes_per_param(name)
        record = {"algorithm": name, "size": n, "implementation": label,
                  "times_s": seconds, "median_s": statistics.median(seconds), "min_s": best,
                  "params_per_s": n / best, "gb_per_s": moved * n / best / 1e9,
                  "triad_percent": None, "triad_percent_rounds": None,
                  "speedup_vs_torch_fused": None, "speedup_rounds": None,
                  "speedup_range": None}
        headline, reference = seconds, label
        if triad:  # this row's GB/s over the triad's, in each round
            headline = [100 * moved / TRIAD_BYTES * r for r in per_round(triad, seconds)]
            record.update(triad_percent=statistics.median(headline),
                          triad_percent_rounds=headline)
            reference = "triad"
        if fused:
            ratios = per_round(fused, seconds)
            record.update(speedup_vs_torch_fused=statistics.median(ratios),
                          speedup_rounds=ratios, speedup_range=[min(ratios), max(ratios)])
            if label != "torch fused":
                headline, reference = ratios, "torch fused"
        record["noise"] = spread(headline)
        record["stalled"] = stalls[label]
        record["noisy"] = (record["noise"] > NOISY
                           or max(stalls[label], stalls[reference]) > 0.5)
        out.append(record)
    return out


def format_table(records):
    header = (f"{'algorithm':9s} {'size':>7s} {'implementation':18s} {'median':>10s} "
              f"{'min':>10s} {'params/s':>9s} {'GB/s':>7s} {'% triad':>8s} {'vs fused':>9s} "
              f"{'range':>12s} {'noise':>6s} {'stalls':>6s}")
    lines = [header, "-" * len(header)]
    for r in records:
        fused = r["speedup_vs_torch_fused"]
        low, high = r["speedup_range"] or (None, None)
        lines.append(
            f"{r['algorithm']:9s} {r['size']:7.0e} {r['implementation']:18s} "
            f"{_duration(r['median_s']):>10s} {_duration(r['min_s']):>10s} "
            f"{r['params_per_s']:9.2e} {r['gb_per_s']:7.1f} {r['triad_percent']:7.0f}% "
            f"{(f'{fused:.2f}x' if fused else '-'):>9s} "
            f"{(f'{low:.2f}-{high:.2f}' if fused else '-'):>12s} "
            f"{100 * r['noise']:5.0f}% {100 * r['stalled']:5.0f}%"
            + (" !" if r["noisy"] else ""))
    if any(r["noisy"] for r in records):
        lines.append(
            f"! noisy: the per-round ratios (vs fused, else % triad) spread by more than "
            f"{100 * NOISY:.0f}% of their median, or most\n  batches of the row or of its "
            "reference stalled (took twice the fastest): the machine was busy. Rerun on a\n"
            "  quieter machine, with more --rounds, or with --threads 1.")
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


def cpu_times(stat="/proc/stat"):
    """``(busy, total)``: the CPU time of all cores so far, in clock ticks, from Linux's
    ``/proc/stat``. Steal time (what the hypervisor gave other machines) counts as busy."""
    with open(stat) as f:
        user, nice, system, idle, iowait, irq, softirq, steal = map(int, f.readline().split()[1:9])
    total = user + nice + system + idle + iowait + irq + softirq + steal
    return total - idle - iowait, total


def cores_in_use(cores, seconds=0.5, times=cpu_times):
    """How many of ``cores`` other processes keep busy: the busy share of all CPU time
    over ``seconds``, during which this process sleeps. None where ``times`` cannot be
    read (no /proc/stat)."""
    try:
        busy_before, total_before = times()
        sleep(seconds)
        busy_after, total_after = times()
    except (OSError, ValueError):
        return None
    return cores * (busy_after - busy_before) / max(total_after - total_before, 1)


def busy(in_use=None, cores=None):
    """A warning when other processes keep half of this machine's cores or more busy,
    else None. ``in_use`` is how many they keep busy: measured now (:func:`cores_in_use`),
    or, without /proc/stat, the load average. The load average alone would lag by a
    minute: right after ``pip install`` (the README's first command) it reads as busy on
    an idle machine."""
    if cores is None:
        cores = (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                 else os.cpu_count())
    if in_use is None:
        in_use = cores_in_use(cores)
    if in_use is None:
        if not hasattr(os, "getloadavg"):
            return None
        in_use = os.getloadavg()[0]
    if in_use < cores / 2:
        return None
    return (f"warning: this machine is busy (other processes keep {in_use:.1f} of its {cores} "
            "cores busy). Steps that use several threads will now\n  and then wait for one the "
            "OS has descheduled; the table counts the median batch of each round, but\n  "
            "expect noise, and compare with --threads 1.")


def quiet_threads(warning, environ=os.environ):
    """On a busy machine, make idle OpenMP threads sleep (``OMP_WAIT_POLICY=PASSIVE``)
    unless the user chose a policy; returns a line saying what was done, or None.

    By default an OpenMP runtime's threads spin for a while after each parallel region.
    Numba's, torch's and DeepSpeed's runtimes each keep such a pool; on a busy 2-core
    machine their spinning threads starve each other, and a step then waits for a
    descheduled thread for a whole time slice (5-12 ms, measured on every call, not once).
    Sleeping threads cost a wake-up (tens of us) at each parallel region instead, for every
    contender alike. A runtime reads the variable when it loads, so this must run before
    torch is imported and before Numba's first parallel kernel.
    """
    if not warning or "OMP_WAIT_POLICY" in environ:
        return None
    from numba.np.ufunc import parallel

    if "torch" in sys.modules or parallel._is_initialized:
        return ("  (OpenMP thread pools already started: set OMP_WAIT_POLICY=PASSIVE before "
                "starting Python to keep them from starving each other)")
    environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return ("  Idle OpenMP threads sleep in this run (OMP_WAIT_POLICY=PASSIVE), so that the "
            "pools of numba and torch do\n  not starve each other; each parallel step pays a "
            "wake-up instead. Set OMP_WAIT_POLICY to choose.")


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
        out="fastopt-bench", quick=False, model_tensors=200, round_seconds=0.02):
    """Run the benchmark, print the table, write ``results.json`` (and ``throughput.png``
    with matplotlib) into ``out``; returns the records. Each round of each contender
    lasts about ``round_seconds``."""
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
    warning = busy()
    threads_note = quiet_threads(warning)
    if threads:
        fastopt.set_num_threads(threads)
        try:
            import torch

            torch.set_num_threads(threads)
        except ImportError:
            pass
    import numba

    print(f"fastopt bench: {device}, {numba.get_num_threads()} threads, {rounds} interleaved "
          "rounds; ratios are medians of per-round ratios")
    if warning:
        print(warning + ("\n" + threads_note if threads_note else ""))
    progress = Progress(len(algorithms) * len(sizes) + (device == "cpu"))
    records = []
    for name in algorithms:
        for n in sizes:
            progress.advance(f"{name} {n:.0e}")
            steps, batches = contenders(name, n, device), {}
            times = time_steps(steps, rounds, round_seconds, batches=batches)
            records += rows(name, n, times, batches)
            del steps  # free this size's buffers before the next are made
    model = model_case(model_tensors, rounds) if device == "cpu" else None
    if device == "cpu":
        progress.advance("real model")
    print(format_table(records))
    model_rows = None
    if model:
        total, times, batches = model
        model_rows = rows("Adam", total, times, batches)
        print(f"\nreal model: Adam on {model_tensors} tensors (log-uniform 1e2..2e5, "
              f"{total / 1e6:.2f}M parameters) through fastopt.torch")
        for r in model_rows:
            low, high = r["speedup_range"]
            print(f"  {r['implementation']:14s} {_duration(r['min_s']):>10s}  "
                  f"{r['speedup_vs_torch_fused']:5.2f}x vs torch fused ({low:.2f}-{high:.2f})"
                  + (" !" if r["noisy"] else ""))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"records": records, "device": device, "threads": numba.get_num_threads(),
              "rounds": rounds, "noisy_above": NOISY, "busy": warning,
              "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
              "model": None if not model else
              {"tensors": model_tensors, "params": model[0],
               "min_s": {r["implementation"]: r["min_s"] for r in model_rows},
               "times_s": {r["implementation"]: r["times_s"] for r in model_rows},
               "speedup_vs_torch_fused": {r["implementation"]: r["speedup_vs_torch_fused"]
                                          for r in model_rows},
               "speedup_range": {r["implementation"]: r["speedup_range"] for r in model_rows}}}
    (out / "results.json").write_text(json.dumps(result, indent=1))
    drawn = plot(records, out / "throughput.png")
    print(f"\nwrote {out / 'results.json'}"
          + (f" and {out / 'throughput.png'}" if drawn else " (no plot: matplotlib missing)"))
    return records
