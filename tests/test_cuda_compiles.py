"""Every CUDA kernel, compiled for a real GPU without one.

The simulator runs the kernels as Python, so it misses what only the CUDA compiler
refuses (a type it cannot lower, a NumPy call it lacks). Here the simulator records every
launch of a workload (``cuda_launches.py``) and NVVM compiles each kernel to PTX for
sm_90 with the recorded argument types, as a launch on a GPU would. It needs NVIDIA's
NVVM and NVRTC libraries (the ``nvidia-nvvm`` and ``nvidia-cuda-nvrtc`` wheels of the
test extra, on Linux), not a GPU nor its driver.
"""

import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

cuda = pytest.importorskip("numba.cuda")
if cuda.is_available():
    pytest.skip("a GPU (or the simulator) is here: test_cuda.py runs the kernels themselves",
                allow_module_level=True)

from numba import types  # noqa: E402
from numba.cuda import dispatcher  # noqa: E402

from fastopt.kernels import _template  # noqa: E402
from fastopt.kernels import cuda as kernels  # noqa: E402

HERE = Path(__file__).parent
TARGET = (9, 0)  # the H100/H200's compute capability


def _nvvm_missing():
    try:
        cuda.compile_ptx(lambda a: None, (types.float32[::1],), cc=TARGET)
    except Exception as error:  # NVVM or NVRTC not found: the extra is not installed
        return f"{type(error).__name__}: {error}"
    return None


@pytest.fixture(scope="module")
def launches(tmp_path_factory):
    missing = _nvvm_missing()
    if missing and platform.system() != "Linux":  # the test extra's wheels are Linux's
        pytest.skip(f"cannot compile CUDA here ({missing.splitlines()[0]})")
    assert not missing, f"NVVM or NVRTC missing: install the test extra ({missing})"
    folder = tmp_path_factory.mktemp("launches")
    parts = min(4, os.cpu_count() or 1)  # the simulator is one Python thread: one per core
    outs = [folder / f"launches{part}.json" for part in range(parts)]
    running = [subprocess.Popen([sys.executable, "cuda_launches.py", str(out), str(part),
                                 str(parts)], cwd=HERE,
                                env={**os.environ, "NUMBA_ENABLE_CUDASIM": "1"})
               for part, out in enumerate(outs)]
    try:
        codes = [process.wait(timeout=900) for process in running]
    finally:
        for process in running:
            process.kill()
    assert codes == [0] * parts, f"cuda_launches.py exited with {codes}"
    distinct = {json.dumps(entry): entry for out in outs for entry in json.loads(out.read_text())}
    return list(distinct.values())


def _numba_type(recorded):
    kind, *rest = recorded
    if kind == "array":
        dtype, ndim = rest
        return types.Array(getattr(types, dtype), ndim, "C")
    if kind == "tuple":
        return types.BaseTuple.from_types([_numba_type(t) for t in rest[0]])
    return getattr(types, rest[0])


def _tuples(x):
    return tuple(map(_tuples, x)) if isinstance(x, list) else x


def _kernel(recorded):
    if isinstance(recorded, str):
        return getattr(kernels, recorded)
    fields, loops = recorded
    return kernels._driver(_template.Pass(*_tuples(fields)), getattr(kernels, loops))


CONSTANT_MEMORY = 64 * 1024  # a kernel's constant data, at most


def constant_bytes(ptx):
    """The bytes of constant data that the PTX ``ptx`` declares: a NumPy array that a
    kernel reads as a global is one such array per place that reads it."""
    sizes = {"8": 1, "16": 2, "32": 4, "64": 8}
    return sum(int(count) * sizes[bits] for bits, count in re.findall(
        r"^\s*\.const\s+(?:\.align\s+\d+\s+)?\.[a-z](8|16|32|64)\s+\S+?\[(\d+)\]", ptx,
        re.MULTILINE))


def test_constant_bytes_counts_each_global_array_read():
    table = np.arange(6400, dtype=np.int32)

    def reads_twice(a, out):
        i = cuda.grid(1)
        if i < a.size:
            out[i] = table[a[i]] + table[a[i] + 1]

    ptx, _ = cuda.compile_ptx(reads_twice, (types.int32[::1], types.int32[::1]), cc=TARGET)
    assert constant_bytes(ptx) >= table.nbytes  # a copy per read, in numba-cuda 0.30
    assert constant_bytes(".const .align 4 .b8 a[10] = {0};\n.const .b32 b[3];\n"
                          "\tld.const.u32 %r4, [a+4];") == 22


def test_the_workload_launches_every_kind_of_kernel(launches):
    generated = [e["kernel"] for e in launches if not isinstance(e["kernel"], str)]
    assert {loops for _, loops in generated} == {"_LOOPS", "_SEGMENT_LOOPS", "_BLOCK_LOOPS"}
    assert {"fill", "column_sums"} <= {e["kernel"] for e in launches
                                       if isinstance(e["kernel"], str)}
    rules = {fields[0] for fields, _ in generated}
    assert {"adam", "sgd", "lamb", "norms", "adafactor", "ema", "grad_squares"} <= rules, rules


def test_every_launched_kernel_compiles_for_a_gpu(launches, monkeypatch):
    # Device functions take the compute capability of the current device.
    monkeypatch.setattr(dispatcher, "get_current_device",
                        lambda: SimpleNamespace(compute_capability=TARGET))
    failed = []
    for entry in launches:
        signature = tuple(_numba_type(t) for t in entry["types"])
        try:
            ptx, _ = cuda.compile_ptx(_kernel(entry["kernel"]).py_func, signature, cc=TARGET)
            assert ".entry" in ptx
            constant = constant_bytes(ptx)
            # ptxas refuses more ("File uses too much global constant data"), which
            # loading the kernel on a GPU would raise.
            assert constant <= CONSTANT_MEMORY, f"{constant} bytes of constant memory"
        except Exception as error:
            failed.append(f"{entry['kernel']}: {type(error).__name__}: "
                          f"{str(error).splitlines()[0] if str(error) else ''}")
    assert not failed, "\n".join(failed)
