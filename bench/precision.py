"""What each storage format costs and saves: an Adam-family step in every format,
against fastopt's float32 step, torch's fused Adam and the in-place triad, interleaved.

    python bench/precision.py [--algorithm Adam] [--sizes 4e6,2e7] [--rounds 7]

For each format it prints the bytes one step moves per parameter (read and written,
counted from the optimizer's own buffers: p, the gradient, the master weights and each
state buffer), the bytes it keeps per parameter (resident), the step's time, its
effective bandwidth as a share of the triad's (``a += s*c``, 12 bytes per element, in
the same rounds), and its speed against fastopt's float32 step and torch fused. Ratios
are medians of per-round ratios (``fastopt.bench.time_steps``).
"""

import argparse
import statistics

import ml_dtypes
import numpy as np

import fastopt
from fastopt import bench
from fastopt.kernels import stream

f32, bf16 = np.float32, ml_dtypes.bfloat16

# label -> (parameter dtype, optimizer options)
FORMATS = {
    "float32": (f32, {}),
    "float32, bf16 state": (f32, dict(state_dtype="bfloat16")),
    "bf16 + fp32 master": (bf16, {}),
    "bf16 + master, fp32 grads": (bf16, dict(grad_dtype="float32")),
    "bf16 + master, bf16 state": (bf16, dict(state_dtype="bfloat16")),
    "bf16, no master": (bf16, dict(master_weights=None)),
    "bf16, no master, bf16 state": (bf16, dict(master_weights=None, state_dtype="bfloat16")),
}


def optimizer(algorithm, n, dtype, options):
    rng = np.random.default_rng(0)
    opt = getattr(fastopt, algorithm)([rng.standard_normal(n).astype(dtype)], lr=1e-3,
                                      **options)
    opt.flat_grads[...] = (1e-2 * rng.standard_normal(n)).astype(opt.flat_grads.dtype)
    opt.step()  # allocates the state
    return opt


def moved_bytes(opt):
    """Bytes one step reads and writes per parameter: p, the master weights and each
    state buffer are read and written, the gradient read."""
    state = [value for value in opt.state.values() if isinstance(value, np.ndarray)]
    master = 0 if opt.master_params is None else opt.master_params.itemsize
    return (2 * opt.flat_params.itemsize + opt.flat_grads.itemsize + 2 * master
            + 2 * sum(a.itemsize for a in state))


def resident_bytes(opt):
    """Bytes the optimizer keeps per parameter: its buffers over the parameter count."""
    arrays = [opt.flat_params, opt.flat_grads, opt.master_params,
              *(value for value in opt.state.values() if isinstance(value, np.ndarray))]
    return sum(a.nbytes for a in arrays if a is not None) / opt.flat_params.size


def torch_fused(torch, algorithm, n, dtype):
    p = torch.nn.Parameter(torch.randn(n, dtype=dtype))
    p.grad = torch.randn(n, dtype=dtype) * 1e-2
    return getattr(torch.optim, algorithm)([p], lr=1e-3, fused=True).step


def run(algorithm, n, rounds):
    opts = {label: optimizer(algorithm, n, dtype, options)
            for label, (dtype, options) in FORMATS.items()}
    steps = {label: opt.step for label, opt in opts.items()}
    a, c = np.zeros(n, f32), np.ones(n, f32)
    steps["triad"] = lambda: stream.add_scaled(a, c, f32(1e-9))
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None:
        steps["torch fused fp32"] = torch_fused(torch, algorithm, n, torch.float32)
        steps["torch fused bf16"] = torch_fused(torch, algorithm, n, torch.bfloat16)
    times = bench.time_steps(steps, rounds)
    print(f"\n{algorithm}, {n:.0e} parameters, {rounds} rounds")
    print(f"{'format':30s} {'moves B':>8s} {'keeps B':>8s} {'step':>10s} {'% triad':>8s} "
          f"{'vs fp32':>8s} {'vs fused fp32':>14s}")
    fp32, fused = times["float32"], times.get("torch fused fp32")
    for label, seconds in times.items():
        if label == "triad":
            continue
        opt = opts.get(label)
        moved = moved_bytes(opt) if opt else None
        triad = (statistics.median(bench.per_round(
            [t * moved / bench.TRIAD_BYTES for t in times["triad"]], seconds)) * 100
            if moved else None)
        versus = statistics.median(bench.per_round(fp32, seconds))
        fused_ratio = statistics.median(bench.per_round(fused, seconds)) if fused else None
        print(f"{label:30s} {moved or '-':>8} "
              f"{(f'{resident_bytes(opt):.1f}' if opt else '-'):>8s} "
              f"{statistics.median(seconds) * 1e3:8.2f}ms "
              f"{(f'{triad:.0f}%' if triad else '-'):>8s} {versus:7.2f}x "
              f"{(f'{fused_ratio:.2f}x' if fused_ratio else '-'):>14s}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--algorithm", default="Adam")
    parser.add_argument("--sizes", default="4e6,2e7")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    for size in args.sizes.split(","):
        run(args.algorithm, int(float(size)), args.rounds)


if __name__ == "__main__":
    main()
