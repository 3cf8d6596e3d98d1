"""``fastopt bench``: the table, the JSON, the plot, and honest contenders."""

import json

import numpy as np
import pytest

import fastopt
from fastopt import bench
from fastopt.cli import main


def test_bench_writes_the_table_json_and_plot(tmp_path, capsys):
    assert main(["bench", "--algorithms", "Adam,RMSprop", "--sizes", "1e3,2e4", "--rounds", "2",
                 "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for column in ["median", "min", "params/s", "GB/s", "% triad", "vs fused"]:
        assert column in out
    result = json.loads((tmp_path / "results.json").read_text())
    records = result["records"]
    assert {(r["algorithm"], r["size"]) for r in records} == {
        (a, n) for a in ["Adam", "RMSprop"] for n in [1000, 20000]}
    implementations = {r["implementation"] for r in records}
    assert {"fastopt", "numpy", "triad"} <= implementations
    for r in records:
        assert r["min_s"] <= r["median_s"] and r["params_per_s"] == pytest.approx(r["size"] / r["min_s"])
        moved = 12 if r["implementation"] == "triad" else bench.bytes_per_param(r["algorithm"])
        assert r["gb_per_s"] == pytest.approx(moved * r["size"] / r["min_s"] / 1e9)
    triads = [r for r in records if r["implementation"] == "triad"]
    assert all(r["triad_percent"] == pytest.approx(100) for r in triads)
    if "torch fused" in implementations:
        assert {r["algorithm"] for r in records if r["implementation"] == "torch fused"} == {"Adam"}
        assert result["model"]["tensors"] == 200 and "fastopt" in result["model"]["min_s"]
    pytest.importorskip("matplotlib")
    assert (tmp_path / "throughput.png").read_bytes()[:4] == b"\x89PNG"


def test_unknown_algorithms_are_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown algorithms \\['Adamm'\\]"):
        bench.run(["Adamm"], [10], 1, out=tmp_path)


def test_bytes_per_parameter_follow_the_state():
    assert bench.bytes_per_param("Adam") == 28 and bench.bytes_per_param("SGD") == 20
    assert bench.bytes_per_param("Adagrad") == 20 and bench.bytes_per_param("Adadelta") == 28
    assert bench.bytes_per_param("Lion") == 20 and bench.bytes_per_param("Rprop") == 28
    # Every pass counts: LAMB reads p, g, m, v and writes m, v, then reads p, m, v and
    # writes p.
    assert bench.bytes_per_param("LAMB") == 4 * (6 + 4)


def test_every_algorithm_is_benchmarked_against_the_triad_and_torch_where_torch_has_it(tmp_path):
    names = ["RAdam", "Adafactor", "LAMB"]
    records = bench.run(names, [2000], rounds=1, out=tmp_path, model_tensors=2)
    found = {(r["algorithm"], r["implementation"]) for r in records}
    assert {(name, label) for name in names for label in ("fastopt", "triad")} <= found
    if any(label.startswith("torch") for _, label in found):
        assert ("Adafactor", "torch loop") in found and ("LAMB", "torch loop") not in found
    assert bench.shapes("Adafactor", 2000) == [(2, 1000), (0,)]  # factored, as timed


@pytest.mark.parametrize("name", sorted(bench.NUMPY_NAIVE))
def test_the_naive_numpy_contender_computes_the_same_update(name):
    # The comparison is only fair if the NumPy version does the same work correctly.
    rng = np.random.default_rng(0)
    p0 = rng.standard_normal(1000).astype(np.float32)
    grads = [rng.standard_normal(1000).astype(np.float32) for _ in range(5)]
    opt = getattr(fastopt, name)([p0], **bench.ALGORITHMS[name])
    p, state = p0.copy(), {}
    for t, g in enumerate(grads, 1):
        opt.step(g)
        bench.numpy_step(name, p, g, state, t, bench.ALGORITHMS[name]["lr"])
    np.testing.assert_allclose(p, opt.flat_params, rtol=1e-5, atol=1e-6)
    assert np.abs(p - p0).max() > 1e-4


@pytest.mark.parametrize("kwargs", [dict(sizes=[0]), dict(rounds=0)])
def test_sizes_and_rounds_below_one_are_refused(tmp_path, kwargs):
    with pytest.raises(ValueError, match=">= 1"):
        bench.run(["SGD"], out=tmp_path, **{"sizes": [10], **kwargs})


def test_quick_keeps_an_explicit_rounds(tmp_path, capsys):
    bench.run(["SGD"], [10], rounds=1, out=tmp_path, quick=True, model_tensors=2)
    assert "of 1 interleaved rounds" in capsys.readouterr().out
