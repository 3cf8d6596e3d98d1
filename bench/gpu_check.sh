#!/usr/bin/env bash
# The GPU check: on a machine with an NVIDIA GPU (and numba, numba-cuda, torch, pytest
# installed), install fastopt, run the CUDA tests and the GPU bench, and write
# OUT/report.md. Every phase has a time limit: 445 s together, 485 with their
# kill-afters (give the command that runs it 540 s or more).
#
#     bash bench/gpu_check.sh [OUT]                        (OUT defaults to gpu-check)
#
# FASTOPT_GPU_CHECK_SIM=1 runs it in Numba's CUDA simulator instead: no install, a few
# tests, tiny sizes. That is how the test suite checks this script
# (tests/test_gpu_check.py). PYTHON names the interpreter (default: python3).
# The exit status is 0 when the tests passed and every algorithm was benchmarked.
set -uo pipefail
out=${1:-gpu-check}
mkdir -p "$out" && out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.." && repo=$(pwd)
python=${PYTHON:-python3}
# Each line as it is printed: a phase that its limit kills still leaves what it ran.
export PYTHONUNBUFFERED=1
sim=${FASTOPT_GPU_CHECK_SIM:-0}
rm -rf "$out"/*.log "$out"/*.phase "$out/bench" "$out/precision" "$out/src" "$out/report.md"

# phase NAME SECONDS COMMAND...: runs COMMAND under a time limit, its output in
# OUT/NAME.log, and "exit-status seconds limit" in OUT/NAME.phase for the report.
phase() {
    local name=$1 limit=$2 start=$SECONDS status
    shift 2
    echo "== $name (at most ${limit}s): $*"
    timeout --kill-after=10 "$limit" "$@" >"$out/$name.log" 2>&1
    status=$?
    echo "$status $((SECONDS - start)) $limit" >"$out/$name.phase"
    echo "   exit $status after $((SECONDS - start))s"
}

# Run from a copy laid out as installed (fastopt/kernels beside fastopt's modules), on
# PYTHONPATH, from a folder where the repository's own fastopt/ does not shadow it.
run_from_copy() {
    mkdir -p "$out/src" && cp -r "$repo/fastopt" "$out/src/" \
        && ln -s "$repo/kernels" "$out/src/fastopt/kernels"
    export PYTHONPATH="$out/src${PYTHONPATH:+:$PYTHONPATH}"
    cd "$out/src"
}

if [ "$sim" = 1 ]; then
    export NUMBA_ENABLE_CUDASIM=1
    run_from_copy  # nothing is installed in the simulator's run
    # The simulator runs every CUDA thread as a Python thread: a few tests make the point
    # (the full simulated suite is the test command's second step).
    tests=("$repo/tests/test_cuda.py" -k "structured_params or adopted_device or bench_runs")
    bench=(--sim)
else
    # --no-deps: the image's numba, numba-cuda and torch stay as they are, and nothing is
    # downloaded. No build isolation, so the image's setuptools builds it offline.
    phase install 45 "$python" -m pip install --no-deps --no-build-isolation -e "$repo"
    if ! (cd / && "$python" -c "import fastopt.kernels") >>"$out/install.log" 2>&1; then
        echo "fastopt does not import as installed: running from a copy in $out/src" \
            >>"$out/install.log"
        run_from_copy
    fi
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.memory \
        --format=csv >"$out/nvidia-smi.log" 2>&1
    tests=("$repo/tests/test_cuda.py")
    bench=()
fi
# In parallel processes: the kernels (CPU and CUDA) compile in each at once.
phase tests 240 "$python" "$repo/bench/gpu_check.py" tests "$out" "${tests[@]}"
phase bench 100 "$python" "$repo/bench/gpu_check.py" bench "$out" "${bench[@]}"
phase precision 40 "$python" "$repo/bench/gpu_check.py" precision "$out" "${bench[@]}"
timeout 20 "$python" "$repo/bench/gpu_check.py" report "$out"
status=$?
echo "wrote $out/report.md"
exit $status
