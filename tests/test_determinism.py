"""Bitwise determinism across thread counts and processes, and optimizers stepping in
several Python threads at once."""

import hashlib
import os
import subprocess
import sys
import threading

import numba
import numpy as np
import pytest

import fastopt
from fastopt._backend import GRAD_SQUARES
from fastopt.kernels import cpu

f32 = np.float32
N = 3 * cpu.PARALLEL_MIN_SIZE + 17  # the parallel loops, several reduction chunks
CLIPPED = dict(clip_grad_norm=50.0, skip_nonfinite=True)
ALGORITHMS = {
    "SGD": dict(lr=0.01, momentum=0.9, nesterov=True),
    "Adagrad": dict(lr=0.05),
    "RMSprop": dict(lr=0.01, momentum=0.5, centered=True),
    "Adadelta": dict(weight_decay=0.01),
    "Adam": dict(lr=0.01, amsgrad=True),
    "AdamW": dict(lr=0.01, caution=True),  # caution: a per-tensor reduction first
    "Adamax": dict(lr=0.01),
    "NAdam": dict(lr=0.01),
    "SWATS": dict(lr=0.01, eps=1e-4),
    "RAdam": dict(lr=0.01),
    "Rprop": dict(lr=0.01),
    "ASGD": dict(lr=0.01, t0=2),
    "Lion": dict(lr=0.01, caution=True),
    "Adan": dict(lr=0.01, weight_decay=0.01),
    "LAMB": dict(lr=0.01, weight_decay=0.01),
    "LARS": dict(weight_decay=0.01),
    "Adafactor": dict(lr=0.01),
}

# Train every algorithm and print a hash of its parameters, in a fresh process.
HASHES = """
import sys
sys.path.insert(0, sys.argv[1])
from test_determinism import ALGORITHMS, digest, train
print(" ".join(digest(train(name)) for name in ALGORITHMS))
"""


def train(name, steps=8):
    rng = np.random.default_rng(7)
    opt = getattr(fastopt, name)([rng.standard_normal(N).astype(f32)], **CLIPPED,
                                 **ALGORITHMS[name])
    for _ in range(steps):
        opt.step((rng.standard_normal(N) * 3).astype(f32))
    return opt.flat_params.copy(), opt.last_grad_norm


def digest(result):
    params, norm = result
    return hashlib.sha256(params.tobytes() + repr(norm).encode()).hexdigest()[:16]


@pytest.mark.parametrize("name", ALGORITHMS)
def test_one_and_two_threads_give_the_same_bits(name):
    default = numba.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
            results.append(train(name))
    finally:
        numba.set_num_threads(default)
    (one, one_norm), (two, two_norm) = results
    np.testing.assert_array_equal(one, two)
    assert one_norm == two_norm


def test_two_processes_give_the_same_bits():
    here = os.path.dirname(__file__)
    runs = [subprocess.run([sys.executable, "-c", HASHES, here], capture_output=True,
                           text=True, cwd="/", check=True).stdout.split()
            for _ in range(2)]
    assert runs[0] == runs[1] == [digest(train(name)) for name in ALGORITHMS]


def test_optimizers_in_two_python_threads_step_correctly_at_once():
    names = ["Adam", "NAdam", "RMSprop", "SGD"]
    expected = {name: train(name, steps=20)[0] for name in names}
    results, errors = {}, []
    start = threading.Barrier(len(names))

    def work(name):
        try:
            start.wait()
            results[name] = train(name, steps=20)[0]
        except Exception as error:  # reported below, with the thread's name
            errors.append((name, error))

    threads = [threading.Thread(target=work, args=(name,)) for name in names]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    for name in names:
        np.testing.assert_array_equal(results[name], expected[name], err_msg=name)


def test_the_kernels_release_the_gil():
    # nogil=True is what lets two optimizers run their kernels at the same time.
    opt = fastopt.Adam([np.ones(N, f32)])
    opt.step()
    kernel = cpu.kernel(opt.rule, ("exp_avg", "exp_avg_sq"))
    norm = cpu.segment_kernel(*GRAD_SQUARES)
    assert kernel.targetoptions["nogil"] and norm.targetoptions["nogil"]
