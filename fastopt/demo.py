"""``fastopt demo``: the classic optimizer pictures, drawn with fastopt's own optimizers.

Each experiment is a function that returns its numbers, and a ``draw_*`` function turns
them into a PNG; :func:`run` runs all five, writes the files and prints a summary.
The computing part needs only NumPy; the drawing needs matplotlib (``fastopt[plot]``).
"""

import sys
from pathlib import Path

import numpy as np

import fastopt

f32 = np.float32

# The optimizers of the path pictures: (label, fastopt class, options).
OPTIMIZERS = [
    ("SGD", "SGD", dict(lr=1e-3)),
    ("Momentum", "SGD", dict(lr=1e-3, momentum=0.9)),
    ("Nesterov", "SGD", dict(lr=1e-3, momentum=0.9, nesterov=True)),
    ("AdaGrad", "Adagrad", dict(lr=0.5)),
    ("RMSProp", "RMSprop", dict(lr=0.01)),
    ("AdaDelta", "Adadelta", dict(lr=10.0)),
    ("Adam", "Adam", dict(lr=0.05)),
    ("AMSGrad", "Adam", dict(lr=0.05, amsgrad=True)),
    ("AdaMax", "Adamax", dict(lr=0.05)),
    ("NAdam", "NAdam", dict(lr=0.05)),
]


def run_path(name, options, gradient, start, steps):
    """The points a fastopt optimizer visits from ``start`` on a 2-D function."""
    opt = getattr(fastopt, name)([np.asarray(start, f32)], **options)
    point = opt.params[0]
    path = [point.copy()]
    for _ in range(steps):
        opt.step([gradient(*point.astype(np.float64)).astype(f32)])
        path.append(point.copy())
    return np.array(path, np.float64)


# -- 1. paths on Beale's function ------------------------------------------------------

BEALE_MINIMUM = (3.0, 0.5)
BEALE_START = (1.0, 1.5)


def beale(x, y):
    return ((1.5 - x + x * y) ** 2 + (2.25 - x + x * y ** 2) ** 2
            + (2.625 - x + x * y ** 3) ** 2)


def beale_gradient(x, y):
    a, b, c = 1.5 - x + x * y, 2.25 - x + x * y ** 2, 2.625 - x + x * y ** 3
    return np.array([2 * a * (y - 1) + 2 * b * (y ** 2 - 1) + 2 * c * (y ** 3 - 1),
                     2 * a * x + 4 * b * x * y + 6 * c * x * y ** 2])


def beale_paths(steps=1000):
    return {label: run_path(name, options, beale_gradient, BEALE_START, steps)
            for label, name, options in OPTIMIZERS}


# -- 2. the saddle x^2 - y^2 -------------------------------------------------------------

SADDLE_START = (1.0, 1e-3)


def saddle_gradient(x, y):
    return np.array([2 * x, -2 * y])


def saddle_paths(steps=150):
    """Each optimizer from just off the saddle; the paths stop where |y| passes 2."""
    paths = {}
    for label, name, options in OPTIMIZERS:
        options = dict(options, lr=options["lr"] * (10 if name == "SGD" else 1))
        path = run_path(name, options, saddle_gradient, SADDLE_START, steps)
        escaped = np.nonzero(np.abs(path[:, 1]) > 2)[0]
        paths[label] = path[:escaped[0] + 1] if escaped.size else path
    return paths


# -- 3. the ill-conditioned quadratic -----------------------------------------------------

def quadratic_gradient(x1, x2):
    return np.array([0.2 * x1, 4.0 * x2])


def quadratic_paths(steps=20):
    """f(x) = 0.1 x1^2 + 2 x2^2 from (-5, -2), lr 0.4: plain gradient descent against
    momentum with gamma = 0.5."""
    start = (-5.0, -2.0)
    return {"gradient descent": run_path("SGD", dict(lr=0.4), quadratic_gradient, start, steps),
            "momentum 0.5": run_path("SGD", dict(lr=0.4, momentum=0.5), quadratic_gradient,
                                     start, steps)}


def zigzag(path):
    """How often the path turns back across the valley: sign changes of its x2 moves."""
    moves = np.sign(np.diff(path[:, 1]))
    return int((moves[1:] != moves[:-1]).sum())


# -- 4. training curves of a small network --------------------------------------------

TRAINING = [("SGD", "SGD", dict(lr=0.01)),
            ("Momentum", "SGD", dict(lr=0.01, momentum=0.9)),
            ("RMSprop", "RMSprop", dict(lr=0.01, alpha=0.9)),
            ("Adam", "Adam", dict(lr=0.01, betas=(0.9, 0.99)))]


def training_data(seed=0, n=1000):
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, (n, 1)).astype(f32)
    return x, (x ** 2 + 0.1 * rng.standard_normal((n, 1))).astype(f32)


def initial_network(seed=0, hidden=20):
    rng = np.random.default_rng(seed)
    return {"w1": (rng.standard_normal((1, hidden)) * np.sqrt(2.0)).astype(f32),
            "b1": np.zeros(hidden, f32),
            "w2": (rng.standard_normal((hidden, 1)) / np.sqrt(hidden)).astype(f32),
            "b2": np.zeros(1, f32)}


def loss_and_gradients(net, x, y):
    """Mean squared error of the 1-20-1 ReLU network, and its gradients (backprop)."""
    pre = x @ net["w1"] + net["b1"]
    hidden = np.maximum(pre, 0)
    error = hidden @ net["w2"] + net["b2"] - y
    loss = float(np.mean(error ** 2))
    d_out = 2 * error / len(x)
    d_hidden = (d_out @ net["w2"].T) * (pre > 0)
    return loss, {"w1": x.T @ d_hidden, "b1": d_hidden.sum(0),
                  "w2": hidden.T @ d_out, "b2": d_out.sum(0)}


def training_curves(epochs=5, batch=32, seed=0):
    """The loss of each mini-batch step, per optimizer, on the same data and order."""
    x, y = training_data(seed)
    curves = {}
    for label, name, options in TRAINING:
        opt = getattr(fastopt, name)(initial_network(seed), **options)
        order = np.random.default_rng(seed + 1)
        losses = []
        for _ in range(epochs):
            for batch_rows in np.array_split(order.permutation(len(x)), len(x) // batch):
                loss, grads = loss_and_gradients(opt.params, x[batch_rows], y[batch_rows])
                opt.step({k: g.astype(f32) for k, g in grads.items()})
                losses.append(loss)
        curves[label] = np.array(losses)
    return curves


# -- 5. the bias of a zero-initialised moving average ----------------------------------

def moving_averages(n=100, seed=0, betas=(0.9, 0.98)):
    """A noisy series and its exponential moving averages, with and without the bias
    correction ``v_t / (1 - beta**t)``."""
    rng = np.random.default_rng(seed)
    t = np.arange(1, n + 1)
    series = 10 + np.sin(t / 10) + rng.standard_normal(n)
    averages = {}
    for beta in betas:
        v, raw = 0.0, []
        for value in series:
            v = beta * v + (1 - beta) * value
            raw.append(v)
        raw = np.array(raw)
        averages[beta] = (raw, raw / (1 - beta ** t))
    return series, averages


# -- drawing ---------------------------------------------------------------------------

def draw_paths(plt, paths, function, minimum, extent, title, path):
    fig, ax = plt.subplots(figsize=(7, 5))
    xs = np.linspace(*extent[:2], 300)
    ys = np.linspace(*extent[2:], 300)
    gx, gy = np.meshgrid(xs, ys)
    values = function(gx, gy)
    if values.min() > 0:
        ax.contour(gx, gy, values, levels=np.logspace(-1, 4, 25), cmap="Greys", linewidths=0.6)
    else:
        ax.contour(gx, gy, values, levels=25, cmap="Greys", linewidths=0.6)
    for label, points in paths.items():
        ax.plot(points[:, 0], points[:, 1], lw=1.3, label=label)
    if minimum is not None:
        ax.plot(*minimum, "r*", ms=14, label="minimum")
    ax.set(xlim=extent[:2], ylim=extent[2:], title=title, xlabel="x", ylabel="y")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def draw_training(plt, curves, path):
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, losses in curves.items():
        ax.plot(losses, lw=1, label=label)
    ax.set(yscale="log", xlabel="step (batch of 32)", ylabel="training loss (MSE)",
           title="1-20-1 ReLU network fitting y = x^2 + noise, lr 0.01")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def draw_moving_averages(plt, series, averages, path):
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(series, ".", color="0.6", ms=3, label="series")
    for beta, (raw, corrected) in averages.items():
        line, = ax.plot(raw, "--", lw=1, label=f"beta {beta}, no correction")
        ax.plot(corrected, color=line.get_color(), lw=1.5, label=f"beta {beta}, corrected")
    ax.set(xlabel="t", title="Zero-initialised moving averages start too low: "
                             "v_t / (1 - beta^t) fixes it")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- the command -----------------------------------------------------------------------

def summary_rows(paths, saddle):
    """``(label, Beale loss, distance to the minimum, saddle escape step or None)``."""
    rows = []
    for label, path in paths.items():
        end = path[-1]
        escaped = len(saddle[label]) - 1 if abs(saddle[label][-1, 1]) > 2 else None
        rows.append((label, float(beale(*end)), float(np.hypot(*(end - BEALE_MINIMUM))),
                     escaped))
    return rows


def run(out="fastopt-demo"):
    """Write the five pictures into ``out`` and print the summary; returns the exit
    status (1 without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print('fastopt demo draws with matplotlib, which is not installed: '
              'pip install "fastopt[plot]"', file=sys.stderr)
        return 1
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths, saddle, quadratic = beale_paths(), saddle_paths(), quadratic_paths()
    curves = training_curves()
    series, averages = moving_averages()
    files = {
        "paths.png": lambda p: draw_paths(plt, paths, beale, BEALE_MINIMUM, (-0.5, 4, -1, 2),
                                          "Beale's function from (1, 1.5), 1000 steps", p),
        "saddle.png": lambda p: draw_paths(plt, saddle, lambda x, y: x ** 2 - y ** 2, None,
                                           (-1.2, 1.2, -2.2, 2.2),
                                           "Escaping the saddle of x^2 - y^2 from (1, 0.001)", p),
        "quadratic.png": lambda p: draw_paths(
            plt, quadratic, lambda x1, x2: 0.1 * x1 ** 2 + 2 * x2 ** 2, (0.0, 0.0),
            (-5.5, 1, -2.5, 2.5),
            "0.1 x1^2 + 2 x2^2, lr 0.4, 20 steps: momentum zig-zags less and gets further", p),
        "training.png": lambda p: draw_training(plt, curves, p),
        "ewma.png": lambda p: draw_moving_averages(plt, series, averages, p),
    }
    for name, draw in files.items():
        draw(out / name)
        print(f"wrote {out / name}")
    print(f"\n{'optimizer':10s} {'Beale loss':>11s} {'to minimum':>11s} {'saddle escape':>14s}")
    for label, loss, distance, escaped in summary_rows(paths, saddle):
        escape = f"step {escaped}" if escaped is not None else "not in 150 steps"
        print(f"{label:10s} {loss:11.3g} {distance:11.3g} {escape:>14s}")
    for label, path in quadratic.items():
        print(f"quadratic, {label}: {zigzag(path)} turns across the valley in 20 steps, "
              f"x1 = {path[-1, 0]:.2f} (the minimum is at 0)")
    finals = ", ".join(f"{label} {losses[-32:].mean():.4f}" for label, losses in curves.items())
    print(f"training loss, mean of the last epoch: {finals}")
    return 0
