"""bench/gpu_check.sh, the script to run on a GPU machine, checked in Numba's simulator.

The script runs in a subprocess with FASTOPT_GPU_CHECK_SIM=1, which sets
NUMBA_ENABLE_CUDASIM=1 there, so this runs in the ordinary test run.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import fastopt
from fastopt import bench

ROOT = Path(__file__).parent.parent
SCRIPT = ROOT / "bench" / "gpu_check.sh"


def gpu_check_module():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_gpu_check_runs_in_the_simulator_and_reports(tmp_path):
    env = {**os.environ, "FASTOPT_GPU_CHECK_SIM": "1", "PYTHON": sys.executable,
           "FASTOPT_GPU_CHECK_PROCESSES": "2"}
    env.pop("NUMBA_ENABLE_CUDASIM", None)  # the script must set it itself
    result = subprocess.run(["bash", str(SCRIPT), str(tmp_path)], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    report = (tmp_path / "report.md").read_text()
    assert report.startswith("# fastopt GPU check: PASS\n")
    assert "in Numba's CUDA simulator" in report and "problem:" not in report
    assert "- tests/test_cuda.py: 3 passed" in report  # the simulated subset ran
    if importlib.util.find_spec("xdist") is None:  # else xdist's -n shares them out
        assert "(2 processes)" in report  # shared between two pytest processes
        assert sorted(p.name for p in tmp_path.glob("tests-*.log")) == ["tests-0.log",
                                                                       "tests-1.log"]
    # nothing is installed in the simulator's run: fastopt ran from a copy laid out as
    # installed, as it does on a GPU machine where pip cannot install it
    assert f"- fastopt {fastopt.__version__} from {tmp_path / 'src' / 'fastopt'}\n" in report
    size, = gpu_check_module().SIM_SIZES
    for name in bench.ALGORITHMS:  # every algorithm, with its share of the copy's GB/s
        assert f"| {name} | {size:.0e} | " in report
    result = json.loads((tmp_path / "bench" / "Adam" / "results.json").read_text())
    assert result["device"] == "cuda"
    assert {r["implementation"] for r in result["records"]} == {"fastopt", "triad", "copy"}
    assert "| phase | exit | seconds | limit |" in report and "| bench | 0 |" in report
    assert "| precision | 0 |" in report and "## Storage formats" in report
    for label in fastopt.bench.PRECISION_FORMATS:  # every format of Adam, on the device
        assert f"Adam      {size:7.0e} {label:30s}" in report


def test_the_report_names_what_failed(tmp_path, monkeypatch):
    gpu_check = gpu_check_module()
    monkeypatch.setenv("NUMBA_ENABLE_CUDASIM", "1")
    (tmp_path / "tests.phase").write_text("1 12 200\n")
    (tmp_path / "tests.log").write_text("FAILED tests/test_cuda.py::test_x - assert 1 == 2\n"
                                        "==== 1 failed, 2 passed in 3.0s ====\n")
    (tmp_path / "bench.phase").write_text("124 170 170\n")
    (tmp_path / "bench.log").write_text("Adam 1e+08 ...\n")
    results = tmp_path / "bench" / "SGD" / "results.json"
    results.parent.mkdir(parents=True)
    times = {"fastopt": [2e-3, 2e-3], "triad": [1e-3, 1e-3], "copy": [1e-3, 1.5e-3],
             "torch fused": [3e-3, 4e-3]}
    results.write_text(json.dumps({"records": bench.rows("SGD", 10**6, times)}))
    assert gpu_check.report(tmp_path) == 1
    report = (tmp_path / "report.md").read_text()
    assert report.startswith("# fastopt GPU check: FAIL\n")
    assert "- problem: CUDA tests failed" in report
    assert "- problem: no bench for " + ", ".join(n for n in bench.ALGORITHMS if n != "SGD") in report
    assert "- tests/test_cuda.py: 1 failed, 2 passed in 3.0s" in report
    assert "FAILED tests/test_cuda.py::test_x" in report  # the log's tail
    assert "The bench phase ended with status 124 (124: its 170 s limit)" in report
    assert "- problem: no precision bench" in report
    # SGD moves 20 bytes a parameter, the copy 8: per round 2.5 * 1/2 and 2.5 * 1.5/2
    assert "| SGD | 1e+06 | 2.00ms | 10 | 156% | 1.75x (1.50-2.00) | 29% ! |" in report


@pytest.mark.parametrize("status, problem", [(124, "CUDA tests did not finish"),
                                             (0, None)])
def test_a_test_phase_cut_short_is_not_a_pass(tmp_path, monkeypatch, status, problem):
    gpu_check = gpu_check_module()
    monkeypatch.setattr(bench, "ALGORITHMS", {})  # no bench expected
    (tmp_path / "tests.phase").write_text(f"{status} 200 200\n")
    formats = tmp_path / "precision" / "precision.json"
    formats.parent.mkdir()
    formats.write_text(json.dumps({"records": bench.format_rows(
        "Adam", 10**6, {"float32": [1e-3], "triad": [1e-3]}, {})}))
    # pip's install failed, and the script ran from a copy: a note, not a failure
    (tmp_path / "install.phase").write_text("1 3 45\n")
    (tmp_path / "install.log").write_text("error: no setuptools\n")
    assert gpu_check.report(tmp_path) == (1 if problem else 0)
    report = (tmp_path / "report.md").read_text()
    assert (f"- problem: {problem}" in report) == bool(problem)
    assert "- note: pip install failed (the check ran from a copy): error: no setuptools" in report


def test_without_xdist_the_tests_run_in_processes_of_their_own(tmp_path, monkeypatch, capsys):
    """The fallback shares the collected tests out among processes; a listing that
    names no test (one printed as a tree: -v) ran none and passed."""
    gpu_check = gpu_check_module()
    monkeypatch.setitem(sys.modules, "xdist", None)  # its import raises ImportError
    monkeypatch.setattr(gpu_check, "TEST_PROCESSES", 2)
    registry = str(ROOT / "tests" / "test_registry.py")
    assert gpu_check.run_tests(tmp_path, [registry, "-k", "numpy_class"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1].startswith(f"{len(fastopt.optim.ALGORITHMS)} passed in ")
    assert lines[-1].endswith("(2 processes)")
    assert gpu_check.run_tests(tmp_path, [registry, "-k", "no_such_test"]) == 5
