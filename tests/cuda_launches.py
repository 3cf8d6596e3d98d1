"""Records every CUDA kernel a workload launches in Numba's simulator, with the types of
its arguments, so that ``test_cuda_compiles`` can compile each one for a real GPU.

Run as ``NUMBA_ENABLE_CUDASIM=1 python cuda_launches.py OUT.json [PART PARTS]``: it steps
every case of ``cases.ALL`` in every storage format it takes (and the passes around them:
clipping, the skip, EMA, sums) twice on the simulated device, in the NumPy API and in
fastopt.torch, and writes one record per distinct launch: the kernel
(a generated pass by its ``_template.Pass`` fields and loop form, or a module kernel by
name) and its argument types. With PART and PARTS it runs every PARTS-th of those
workloads from the PART-th on, so that PARTS processes share them (the simulator is one
Python thread).
"""

import functools
import json
import sys

import ml_dtypes
import numpy as np
from numba.cuda.simulator import kernel as simulated
from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray

import fastopt
from cases import ALL, CASES
from fastopt.kernels import cuda as kernels

FIRST_CASES = [(name, cases[0]) for name, cases in CASES.items()]
_DRIVERS = {}  # id(compiled) -> (Pass fields, loops name)


def _record_drivers():
    loops_names = {getattr(kernels, n): n for n in ("_LOOPS", "_SEGMENT_LOOPS", "_BLOCK_LOOPS")}
    driver = kernels._driver.__wrapped__

    def recorded(spec, loops):
        compiled = driver(spec, loops)
        _DRIVERS[id(compiled)] = (list(spec), loops_names[loops])
        return compiled

    kernels._driver = kernels.functools.cache(recorded)
    kernels.kernel.cache_clear()
    kernels.segment_kernel.cache_clear()


def _type(a):
    if isinstance(a, FakeCUDAArray):
        a = a._ary
    if isinstance(a, np.ndarray):
        return ["array", a.dtype.name, a.ndim]
    if isinstance(a, tuple):
        return ["tuple", [_type(x) for x in a]]
    if isinstance(a, (bool, np.bool_)):
        return ["scalar", "bool"]
    if isinstance(a, int):
        return ["scalar", "int64"]
    if isinstance(a, float):
        return ["scalar", "float64"]
    return ["scalar", np.asarray(a).dtype.name]


def record(workload):
    """The distinct launches ``workload()`` makes, as JSON-ready records."""
    names = {id(v): n for n, v in vars(kernels).items() if isinstance(v, simulated.FakeCUDAKernel)}
    launches = {}
    call = simulated.FakeCUDAKernel.__call__

    def recording(self, *args):
        if not self._device:
            key = _DRIVERS.get(id(self)) or names.get(id(self))
            if key is None:
                raise AssertionError(f"a launch of an unknown kernel {self.fn.__name__}")
            entry = {"kernel": key, "types": [_type(a) for a in args]}
            launches[json.dumps(entry)] = entry
        return call(self, *args)

    _record_drivers()
    # The simulator runs a Python thread per CUDA thread, and the argument types do not
    # depend on the launch shape: one thread (2.5x as fast as test_cuda's 8 by 4).
    kernels.threads_per_block, kernels.max_blocks = 1, 1
    simulated.FakeCUDAKernel.__call__ = recording
    try:
        workload()
    finally:
        simulated.FakeCUDAKernel.__call__ = call
    return list(launches.values())


# Storage formats on top of each case: (parameters' dtype, options).
FORMATS = [(np.float32, {}), (ml_dtypes.bfloat16, {}), (np.float16, {}),
           (ml_dtypes.bfloat16, dict(master_weights="remainder")),
           (np.float16, dict(master_weights=None, stochastic_rounding=True)),
           (np.float32, dict(state_dtype="bfloat16", stochastic_rounding=True)),
           (np.float32, dict(state_dtype="int8")),
           (ml_dtypes.bfloat16, dict(state_dtype="int8", grad_dtype="float32"))]


def _accepts(name, dtype, options):
    """Whether ``name`` takes ``options`` for ``dtype`` parameters (some formats are
    refused by some algorithms)."""
    if options.get("caution") and options.get("state_dtype") == "int8":
        return False  # refused at the first step
    try:
        getattr(fastopt, name)([np.zeros(8, dtype)], **options)
    except (ValueError, TypeError):
        return False
    return True


def step_cpu_tensors_as_cuda_tensors(setattr=setattr):
    """Make fastopt.torch step CPU tensors by its CUDA path (``_on_host``): through
    CUDA's kernels, on the simulator's device arrays over the tensors' memory
    (``_device_array``), as ``cuda.as_cuda_array`` wraps a CUDA tensor's on a GPU (the
    simulator has none). ``setattr``: a pytest monkeypatch's, to undo it."""
    import fastopt.torch as ft

    setattr(ft, "_on_host", lambda device: False)
    setattr(ft, "_device_array", lambda tensor: FakeCUDAArray(tensor.numpy()))


def _torch_jobs(rng, shapes):
    """fastopt.torch's launches (segment passes) for the first case of every algorithm
    in every format whose gradients have the parameters' dtype, as torch's must."""
    try:
        import torch
    except ImportError:  # the test extra does not install it
        return []
    import fastopt.torch as ft

    step_cpu_tensors_as_cuda_tensors()

    def steps(name, dtype, options):
        params = [torch.nn.Parameter(torch.from_numpy(rng.standard_normal(s).astype(
            np.float32)).to(getattr(torch, np.dtype(dtype).name))) for s in shapes.values()]
        opt = getattr(ft, name)(params, **options)
        for _ in range(2):
            for p in params:
                p.grad = torch.randn_like(p)
            opt.step()

    jobs = []
    for name, kwargs in FIRST_CASES:  # (the simulator is slow)
        for dtype, options in FORMATS:
            options = {**kwargs, **options}
            if "grad_dtype" not in options and _accepts(name, dtype, options):
                jobs.append(functools.partial(steps, name, dtype, options))
    return jobs


def every_case(part=0, parts=1):
    from numba import cuda

    rng = np.random.default_rng(0)
    # A matrix for Adafactor; 8-bit blocks (of the matrix alone) for int8.
    fastopt.optim.optimizer.MIN_QUANTIZED_SIZE = 256
    fastopt.precision.MIN_QUANTIZED_SIZE = 256
    shapes = {"w": (8, 40), "b": (9,)}

    def arrays(dtype):
        return {k: cuda.to_device(rng.standard_normal(s).astype(dtype))
                for k, s in shapes.items()}

    def steps(name, dtype, grad_dtype, options):
        opt = getattr(fastopt, name)(arrays(dtype), **options)
        for _ in range(2):
            opt.step(arrays(grad_dtype))

    def around(name, dtype):
        opt = getattr(fastopt, name)(arrays(dtype), lr=0.01, clip_grad_norm=1.0,
                                     clip_grad_value=0.5, skip_nonfinite=True)
        average = fastopt.EMA(opt, decay=0.9)
        opt.step(arrays(dtype), grad_scale=2.0)
        average.update()

    jobs = []
    for name, kwargs in ALL:
        for dtype, options in FORMATS:
            grad_dtype = options.get("grad_dtype", dtype)
            options = {**kwargs, **options}
            if dtype != np.float32 and "master_weights" not in options:
                options["master_weights"] = "float32"
            if _accepts(name, dtype, options):
                jobs.append(functools.partial(steps, name, dtype, grad_dtype, options))
    jobs += [functools.partial(around, name, dtype) for name in ("SGD", "Adam", "LAMB", "Adafactor")
             for dtype in (np.float32, ml_dtypes.bfloat16)]
    jobs += _torch_jobs(rng, shapes)
    for job in jobs[part::parts]:
        job()


if __name__ == "__main__":
    part, parts = map(int, sys.argv[2:4]) if len(sys.argv) > 2 else (0, 1)
    with open(sys.argv[1], "w") as out:
        json.dump(record(functools.partial(every_case, part, parts)), out)
