"""What a user waits for: ``import fastopt``, and the first step with a cold and a warm
Numba cache (per algorithm, default options, 1000 parameters).

    python bench/startup.py

Each measurement runs in a fresh interpreter. NUMBA_CACHE_DIR points at a new empty
folder for the cold run and is reused for the warm one.
"""

import json
import os
import subprocess
import sys
import tempfile

PROBE = r"""
import json, sys, time
start = time.perf_counter()
import numba
after_numba = time.perf_counter()
import fastopt
after_fastopt = time.perf_counter()
import numpy as np
first_steps = {}
for name in sys.argv[1:]:
    opt = getattr(fastopt, name)([np.ones(1000, np.float32)])
    start_step = time.perf_counter()
    opt.step()
    first_steps[name] = time.perf_counter() - start_step
print(json.dumps({"numba": after_numba - start, "fastopt": after_fastopt - after_numba,
                  "first_steps": first_steps}))
"""

ALGORITHMS = ["Adam", "SGD", "Adagrad", "RMSprop", "Adadelta", "AdamW", "Adamax", "NAdam"]


def probe(cache_dir):
    env = dict(os.environ, NUMBA_CACHE_DIR=cache_dir)
    out = subprocess.run([sys.executable, "-c", PROBE, *ALGORITHMS], env=env, check=True,
                         capture_output=True, text=True, cwd=tempfile.gettempdir())
    return json.loads(out.stdout)


def main():
    with tempfile.TemporaryDirectory() as cache_dir:
        cold = probe(cache_dir)
        warm = probe(cache_dir)
    print(f"import numba: {warm['numba']:.3f} s; import fastopt after numba: "
          f"{warm['fastopt']:.3f} s")
    print(f"{'first step':10s} {'cold cache':>11s} {'warm cache':>11s}")
    for name in ALGORITHMS:
        print(f"{name:10s} {cold['first_steps'][name]:10.3f}s "
              f"{warm['first_steps'][name]:10.3f}s")


if __name__ == "__main__":
    main()
