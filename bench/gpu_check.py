"""The GPU bench and the report of ``bench/gpu_check.sh``.

    python bench/gpu_check.py bench OUT [--sim]      every algorithm at 1e5-1e8 on the GPU
    python bench/gpu_check.py precision OUT [--sim]  Adam in every storage format at 1e8
    python bench/gpu_check.py tests OUT PYTEST_ARGS...  the tests, in parallel processes
    python bench/gpu_check.py report OUT             OUT/report.md from what the phases left

The bench runs ``fastopt.bench`` with ``device="cuda"`` one algorithm at a time, each into
``OUT/bench/<algorithm>/results.json``, so that a phase cut short by its time limit still
reports the algorithms it finished. Against fastopt run torch's paths on CUDA (fused for
SGD, Adagrad, Adam and AdamW), the in-place triad and a device-to-device copy, the
bandwidth yardstick. The precision bench (``fastopt bench --precision --device cuda``)
times Adam in every storage format against the in-place triad for its own bytes, torch's
fused Adam in float32 and bfloat16, and the 8-bit Adam of bitsandbytes and torchao where
installed, into ``OUT/precision/precision.json``. ``--sim`` is for Numba's simulator:
tiny sizes, one call a round.

The tests run in ``TEST_PROCESSES`` pytest processes at once (with pytest-xdist's
``-n`` where it is installed, else each on its share of the collected tests, its output
in ``OUT/tests-<k>.log``): on a fresh machine most of their time is compiling kernels,
CPU and CUDA, which one process does one at a time.
"""

import collections
import datetime
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

SIZES = [100_000, 1_000_000, 10_000_000, 100_000_000]
# FASTOPT_GPU_CHECK_PROCESSES sets it (the simulated check runs two).
TEST_PROCESSES = int(os.environ.get("FASTOPT_GPU_CHECK_PROCESSES",
                                    max(1, min(8, (os.cpu_count() or 2) // 2))))
ROUNDS = 5
SIM_SIZES = [50]
PRECISION_SIZES = [100_000_000]
COPY_BYTES = 8


def _device(sim):
    from numba import cuda

    from fastopt.kernels import cuda as cuda_kernels

    if sim:
        # As the tests do: each simulated CUDA thread is a Python thread.
        cuda_kernels.threads_per_block, cuda_kernels.max_blocks = 8, 4
    if not cuda.is_available():
        sys.exit("no CUDA device (and NUMBA_ENABLE_CUDASIM is not set)")


def run_bench(out, sim):
    from fastopt import bench

    _device(sim)
    for name in bench.ALGORITHMS:
        bench.run([name], SIM_SIZES if sim else SIZES, rounds=1 if sim else ROUNDS,
                  device="cuda", out=Path(out) / "bench" / name,
                  round_seconds=0 if sim else 0.02)


def run_precision(out, sim):
    from fastopt import bench

    _device(sim)
    bench.run_precision(["Adam"], SIM_SIZES if sim else PRECISION_SIZES,
                        rounds=1 if sim else ROUNDS, out=Path(out) / "precision",
                        round_seconds=0 if sim else 0.02, device="cuda")


def run_tests(out, args):
    """pytest ``args`` in up to ``TEST_PROCESSES`` processes; prints each one's output,
    then every process's failures and, last, their counts added up, as pytest's last
    line gives them. Returns pytest's exit status: the collection's if it failed (5:
    nothing collected), else that of a process that failed, else 0."""
    pytest = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider"]
    # -v: a line per test as it ends, so that a run its limit cuts short still says
    # which tests passed, failed, and were running (the script sets PYTHONUNBUFFERED).
    run = pytest + ["-v"]
    try:
        import xdist  # noqa: F401
    except ImportError:
        pass
    else:
        return subprocess.call(run + ["-n", str(TEST_PROCESSES)] + args)
    start = time.monotonic()
    listed = subprocess.run(pytest + ["-q", "--collect-only"] + args, capture_output=True,
                            text=True)
    root = Path(__file__).resolve().parent.parent  # pytest's rootdir: node ids are under it
    ids = [str(root / line) for line in listed.stdout.splitlines()
           if re.match(r"\S+\.py::", line)]
    if listed.returncode or not ids:  # an error collecting, or nothing collected (5)
        print(listed.stdout + listed.stderr)
        return listed.returncode or 5
    count = min(TEST_PROCESSES, len(ids))
    shares = [ids[k * len(ids) // count:(k + 1) * len(ids) // count] for k in range(count)]
    logs = [Path(out) / f"tests-{k}.log" for k in range(count)]
    processes = []
    for share, log in zip(shares, logs):
        with open(log, "w") as file:
            processes.append(subprocess.Popen(run + share, stdout=file,
                                              stderr=subprocess.STDOUT))
    statuses = [process.wait() for process in processes]
    counts, failures = collections.Counter(), []
    for log in logs:
        lines = log.read_text().splitlines()
        print("\n".join(lines))
        failures += [line for line in lines if line.startswith(("FAILED", "ERROR"))]
        last = [line for line in lines if line.strip()][-1:]
        for number, outcome in re.findall(r"(\d+) (\w+)", "".join(last)):
            counts[outcome.removesuffix("s")] += int(number)  # "1 error", "2 errors"
    # every process's failures again, next to the summary, which the report shows
    print("\n".join(failures + [", ".join(f"{n} {outcome}" for outcome, n in counts.items())
                                + f" in {time.monotonic() - start:.1f}s ({count} processes)"]))
    failed = [status for status in statuses if status not in (0, 5)]
    return failed[0] if failed else 0


# -- the report ----------------------------------------------------------------------

def phase(out, name):
    """``(exit status, seconds, limit)`` of a phase, or None if it did not run."""
    path = Path(out) / f"{name}.phase"
    if not path.exists():
        return None
    status, seconds, limit = map(int, path.read_text().split())
    return status, seconds, limit


def log_tail(out, name, lines=30):
    path = Path(out) / f"{name}.log"
    return path.read_text(errors="replace").splitlines()[-lines:] if path.exists() else []


def pytest_summary(out, name):
    """pytest's last line ("12 passed in 3.1s"), or the log's last line."""
    tail = [line for line in log_tail(out, name) if line.strip()]
    return tail[-1].strip("= ") if tail else "(no output)"


def machine(out):
    """Lines naming the device and the software, whatever of it can be found."""
    lines = [f"- Python {sys.version.split()[0]}"]
    try:
        import fastopt

        lines.append(f"- fastopt {fastopt.__version__} from {Path(fastopt.__file__).parent}")
        import numba
        from numba import cuda

        lines.append(f"- numba {numba.__version__}")
        try:
            import numba_cuda

            lines.append(f"- numba-cuda {numba_cuda.__version__}")
        except ImportError:
            pass
        if cuda.is_available():
            device = cuda.get_current_device()
            name = getattr(device, "name", "the simulator's")  # bytes in older numba
            name = name.decode() if isinstance(name, bytes) else name
            lines.append(f"- GPU: {name}, compute capability "
                         f"{'.'.join(map(str, device.compute_capability))}")
            if not numba.config.ENABLE_CUDASIM:  # the simulator has no runtime
                lines.append(f"- CUDA runtime (Numba's view): "
                             f"{'.'.join(map(str, cuda.runtime.get_version()))}")
    except Exception as error:  # a broken install is what this report must show
        lines.append(f"- numba.cuda: {type(error).__name__}: {error}")
    smi = [line for line in log_tail(out, "nvidia-smi") if line.strip()]
    lines += [f"- nvidia-smi: {line}" for line in smi]
    for module in ("torch", "cupy"):
        try:
            package = __import__(module)
            extra = ""
            if module == "torch":
                extra = (f", CUDA {package.version.cuda}, device "
                         f"{package.cuda.get_device_name() if package.cuda.is_available() else 'none'}")
            lines.append(f"- {module} {package.__version__}{extra}")
        except Exception:
            lines.append(f"- {module}: not importable")
    return lines


def bench_records(out):
    """``{algorithm: records}`` of every algorithm whose bench finished."""
    from fastopt import bench

    found = {}
    for name in bench.ALGORITHMS:
        path = Path(out) / "bench" / name / "results.json"
        if path.exists():
            found[name] = json.loads(path.read_text())["records"]
    return found


def bench_table(records):
    """fastopt's rows against the copy (per-round ratios) and torch fused."""
    from fastopt import bench

    rows = ["| algorithm | size | fastopt | GB/s | % of copy | vs torch fused (range) | noise |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    yardsticks = {}
    for name, recs in records.items():
        by_size = {}
        for r in recs:
            by_size.setdefault(r["size"], {})[r["implementation"]] = r
        for size, found in sorted(by_size.items()):
            fast, copy = found.get("fastopt"), found.get("copy")
            if not fast:
                continue
            of_copy = "-"
            if copy:  # fastopt's GB/s over the copy's, in each round
                bytes_ratio = bench.bytes_per_param(name) / COPY_BYTES
                rounds = bench.per_round(copy["times_s"], fast["times_s"])
                of_copy = f"{100 * bytes_ratio * statistics.median(rounds):.0f}%"
                yardsticks.setdefault(size, (copy["gb_per_s"], found["triad"]["gb_per_s"]))
            fused = fast["speedup_vs_torch_fused"]
            vs = (f"{fused:.2f}x ({fast['speedup_range'][0]:.2f}-{fast['speedup_range'][1]:.2f})"
                  if fused else "-")
            rows.append(f"| {name} | {size:.0e} | {bench._duration(fast['min_s'])} | "
                        f"{fast['gb_per_s']:.0f} | {of_copy} | {vs} | "
                        f"{100 * fast['noise']:.0f}%{' !' if fast['noisy'] else ''} |")
    rows += ["", "| size | copy GB/s | triad GB/s |", "| ---: | ---: | ---: |"]
    rows += [f"| {size:.0e} | {copy:.0f} | {triad:.0f} |"
             for size, (copy, triad) in sorted(yardsticks.items())]
    return rows


def report(out):
    """Write ``OUT/report.md``; returns 0 when the check passed, 1 otherwise."""
    from fastopt import bench

    sim = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
    problems = []
    lines = []
    tests, install = phase(out, "tests"), phase(out, "install")
    if not tests or tests[0]:
        problems.append("CUDA tests failed" if tests and tests[0] != 124 else
                        "CUDA tests did not finish")
    records = bench_records(out)
    missing = [name for name in bench.ALGORITHMS if name not in records]
    if missing:
        problems.append(f"no bench for {', '.join(missing)}")
    formats_path = Path(out) / "precision" / "precision.json"
    formats = json.loads(formats_path.read_text())["records"] if formats_path.exists() else []
    if not formats:
        problems.append("no precision bench")
    lines.append(f"# fastopt GPU check: {'FAIL' if problems else 'PASS'}")
    lines.append("")
    lines.append(f"{datetime.datetime.now().isoformat(timespec='seconds')}, "
                 + ("in Numba's CUDA simulator (timings mean nothing; this checks the script)"
                    if sim else "on the GPU"))
    lines += [f"- problem: {p}" for p in problems]
    if install and install[0]:  # the script then ran from a copy on PYTHONPATH
        lines.append("- note: pip install failed (the check ran from a copy): "
                     + " / ".join(log_tail(out, "install", 3)))
    lines += ["", "## Machine", ""] + machine(out)
    lines += ["", "## Tests", ""]
    lines.append(f"- tests/test_cuda.py: {pytest_summary(out, 'tests')}")
    if tests and tests[0]:
        lines += ["", "```"] + log_tail(out, "tests") + ["```", ""]
    lines += ["", "## Bench", ""]
    if records:
        lines.append(f"Best of {ROUNDS if not sim else 1} interleaved rounds for time and GB/s; "
                     "the ratios are medians of per-round ratios. The copy is a "
                     "device-to-device copy (8 bytes per element); GB/s counts the bytes the "
                     "algorithm must move. `!` marks a noisy row.")
        lines += [""] + bench_table(records)
    for name in ("bench", "precision"):
        result = phase(out, name)
        if result and result[0]:
            lines += ["", f"The {name} phase ended with status {result[0]} "
                      f"(124: its {result[2]} s limit):", "```"]
            lines += log_tail(out, name, 15) + ["```"]
    lines += ["", "## Storage formats", ""]
    if formats:
        lines += ["Adam in each format: bytes moved and kept per parameter (counted from "
                  "the buffers), the median step, its bandwidth as a share of the in-place "
                  "triad's for its own bytes, and medians of per-round ratios against "
                  "fastopt's float32 step and torch's fused float32 Adam.", "", "```",
                  bench.format_precision_table(formats), "```"]
    lines += ["", "## Phases", "", "| phase | exit | seconds | limit |", "| --- | ---: | ---: | ---: |"]
    for name in ("install", "tests", "bench", "precision"):
        result = phase(out, name)
        if result:
            lines.append(f"| {name} | {result[0]} | {result[1]} | {result[2]} |")
    (Path(out) / "report.md").write_text("\n".join(lines) + "\n")
    return 1 if problems else 0


def main(argv):
    command, out, *rest = argv
    if command == "tests":
        return run_tests(out, rest)
    if command in ("bench", "precision"):
        (run_bench if command == "bench" else run_precision)(out, sim="--sim" in rest)
        return 0
    return report(out)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
