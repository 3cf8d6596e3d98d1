"""``fastopt demo``: every picture is written, and each one shows its point."""

import subprocess
import sys

import numpy as np
import pytest

from fastopt import demo
from fastopt.cli import main


def test_demo_writes_every_picture_and_the_table(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    assert main(["demo", "--out", str(tmp_path)]) == 0
    for name in ["paths.png", "saddle.png", "quadratic.png", "training.png", "ewma.png"]:
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, name
    out = capsys.readouterr().out
    assert "Beale loss" in out and "saddle escape" in out
    for label, _, _ in demo.OPTIMIZERS:
        assert f"\n{label:10s} " in out
    assert "turns across the valley" in out and "training loss" in out


def test_without_matplotlib_the_demo_says_how_to_install_it(tmp_path):
    code = ("import sys; sys.modules['matplotlib'] = None\n"
            "from fastopt.cli import main\n"
            f"sys.exit(main(['demo', '--out', {str(tmp_path)!r}]))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert run.returncode == 1
    assert 'pip install "fastopt[plot]"' in run.stderr
    assert not list(tmp_path.iterdir())


def test_adaptive_methods_reach_beales_minimum_and_plain_sgd_lags():
    paths = demo.beale_paths()
    for label, path in paths.items():
        np.testing.assert_allclose(path[0], demo.BEALE_START)
    distance = {label: np.hypot(*(path[-1] - demo.BEALE_MINIMUM)) for label, path in paths.items()}
    assert distance["Adam"] < 0.01 and distance["RMSProp"] < 0.01
    assert distance["SGD"] > 10 * distance["Momentum"]
    assert demo.beale(*demo.BEALE_MINIMUM) == 0.0


def test_adaptive_methods_escape_the_saddle_first():
    paths = demo.saddle_paths()
    escape = {label: len(path) - 1 for label, path in paths.items() if abs(path[-1, 1]) > 2}
    assert "SGD" not in escape  # still creeping along y after 150 steps
    assert escape["Adam"] < escape["Momentum"]
    for label in ["Adam", "RMSProp", "AdaGrad", "NAdam"]:
        assert escape[label] < 60, label


def test_momentum_zig_zags_less_across_the_valley_and_gets_further():
    paths = demo.quadratic_paths()
    plain, momentum = paths["gradient descent"], paths["momentum 0.5"]
    assert demo.zigzag(plain) == len(plain) - 2  # turns back at every step
    assert demo.zigzag(momentum) < demo.zigzag(plain) / 1.5
    assert abs(momentum[-1, 0]) < abs(plain[-1, 0]) / 5


def test_adam_ends_below_sgd_in_training():
    curves = demo.training_curves()
    assert {len(c) for c in curves.values()} == {5 * (1000 // 32)}
    last_epoch = {label: losses[-31:].mean() for label, losses in curves.items()}
    assert last_epoch["Adam"] < last_epoch["SGD"]
    assert last_epoch["SGD"] < curves["SGD"][:5].mean()  # SGD learns too, just slower


def test_the_networks_gradients_match_finite_differences():
    x, y = demo.training_data(n=50)
    net = {k: v.astype(np.float64) for k, v in demo.initial_network().items()}
    _, grads = demo.loss_and_gradients(net, x.astype(np.float64), y.astype(np.float64))
    h = 1e-6
    for key in net:
        for index in [(0,) * net[key].ndim, tuple(s - 1 for s in net[key].shape)]:
            up = {k: v.copy() for k, v in net.items()}
            down = {k: v.copy() for k, v in net.items()}
            up[key][index] += h
            down[key][index] -= h
            numeric = (demo.loss_and_gradients(up, x, y)[0]
                       - demo.loss_and_gradients(down, x, y)[0]) / (2 * h)
            assert grads[key][index] == pytest.approx(numeric, rel=1e-4, abs=1e-8), key


def test_the_corrected_moving_average_starts_where_the_series_is():
    series, averages = demo.moving_averages()
    for beta, (raw, corrected) in averages.items():
        assert raw[0] == pytest.approx((1 - beta) * series[0])  # the zero start's bias
        assert corrected[0] == pytest.approx(series[0])
        early = slice(0, 10)
        assert np.abs(corrected[early] - series[:30].mean()).max() < 2
        assert (raw[early] < 0.7 * series[:30].mean()).all()


def test_the_precision_demo_trains_every_format_and_draws_the_curves(tmp_path, capsys):
    pytest.importorskip("torch")
    pytest.importorskip("matplotlib")
    from fastopt import precision_demo

    assert main(["demo", "--precision", "--steps", "40", "--out", str(tmp_path)]) == 0
    data = (tmp_path / "precision-training.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    out = capsys.readouterr().out
    rows = {line[:30].strip(): line[30:].split() for line in out.splitlines()
            if line[:30].strip() in precision_demo.RUNS}
    assert set(rows) >= set(precision_demo.RUNS) - {"bitsandbytes AdamW8bit"}
    assert rows["float32"][1] == "+0.00%"
    # Each run learns: from about log(vocabulary) = 4.5 to well below it in 40 steps.
    assert all(float(values[0]) < 3.5 for values in rows.values()), rows


def test_the_precision_demo_refuses_a_step_count_below_one(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--precision", "--steps", "0"])
    assert "--steps must be at least 1" in capsys.readouterr().err
