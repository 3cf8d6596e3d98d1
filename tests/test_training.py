"""Parameter groups, lr schedules, fused clipping, loss scaling and the non-finite skip.

fastopt against torch.optim (with torch.nn.utils' clipping and torch's schedulers), and
against itself where the expected result is exact (a power-of-two loss scale, a skipped
step that must be as if it never happened).
"""

import math

import numba
import numpy as np
import pytest

import fastopt
from fastopt import schedules
from fastopt._backend import GRAD_SQUARES, SEGMENT_CHUNK, HostBackend
from fastopt.kernels import cpu
from conftest import assert_same, assert_unchanged, snapshot

f32 = np.float32
RTOL = ATOL = 1e-5

# One option set per algorithm, with every state buffer it can have.
ALGORITHMS = {
    "SGD": dict(lr=0.01, momentum=0.9, dampening=0.1, weight_decay=0.01),
    "Adagrad": dict(lr=0.05, lr_decay=0.01, initial_accumulator_value=0.1),
    "RMSprop": dict(lr=0.01, momentum=0.5, centered=True, weight_decay=0.01),
    "Adadelta": dict(lr=0.5, weight_decay=0.01),
    "Adam": dict(lr=0.01, amsgrad=True, weight_decay=0.01),
    "AdamW": dict(lr=0.01),
    "Adamax": dict(lr=0.01, weight_decay=0.01),
    "NAdam": dict(lr=0.01, momentum_decay=0.01, decoupled_weight_decay=True, weight_decay=0.1),
    "RAdam": dict(lr=0.01, betas=(0.8, 0.9)),
    "ASGD": dict(lr=0.01, t0=3),
    "Adafactor": dict(lr=0.05, weight_decay=0.01),
}
# The rest, which torch.optim lacks (or, for Rprop, whose options differ from the groups').
OTHER_ALGORITHMS = {
    "Rprop": dict(lr=0.01),
    "SWATS": dict(lr=0.01, eps=1e-4),
    "Lion": dict(lr=0.01, weight_decay=0.1),
    "Adan": dict(lr=0.01, weight_decay=0.1, no_prox=True),
    "LAMB": dict(lr=0.01, weight_decay=0.01),
    "LARS": dict(weight_decay=0.01),
}
EVERY_ALGORITHM = {**ALGORITHMS, **OTHER_ALGORITHMS}
SHAPES = [(13, 7), (29,), (3, 4, 5)]


def make_params(seed, shapes=SHAPES):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(f32) for s in shapes]


def make_grads(seed, steps, shapes=SHAPES, scale=1.0):
    rng = np.random.default_rng(seed + 99)
    return [[(scale * rng.standard_normal(s)).astype(f32) for s in shapes] for _ in range(steps)]


def flat(arrays):
    return np.concatenate([a.ravel() for a in arrays])


# -- parameter groups ----------------------------------------------------------------

def test_each_group_is_a_contiguous_segment_of_one_buffer():
    w, b, c = make_params(0)
    opt = fastopt.SGD([{"params": {"w": w, "b": b}}, {"params": [c], "lr": 0.5}], lr=0.1)
    assert opt.flat_params.shape == (w.size + b.size + c.size,)
    np.testing.assert_array_equal(opt.flat_params, flat([w, b, c]))
    assert opt.params[0]["b"].base is opt.flat_params and opt.params[1][0].base is opt.flat_params
    assert opt.param_groups[0]["params"]["w"] is opt.params[0]["w"]
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.5]
    opt.step([{"w": np.ones_like(w), "b": np.ones_like(b)}, [np.ones_like(c)]])
    np.testing.assert_allclose(opt.flat_params, flat([w - 0.1, b - 0.1, c - 0.5]), rtol=1e-6)


@pytest.mark.parametrize("bad, error, match", [
    (lambda a, b: [{"params": [a, a]}], ValueError, r"params\[0\]\[1\] is the same array"),
    (lambda a, b: [{"params": [a]}, {"params": {"x": a}}], ValueError, "same array"),
    (lambda a, b: [{"params": [a]}, {"lr": 0.1}], TypeError, "'params' entry"),
    (lambda a, b: [{"params": [a]}, [b]], TypeError, "'params' entry"),
    (lambda a, b: [{"params": [a], "learning_rate": 0.1}], ValueError, "unknown options"),
    (lambda a, b: [{"params": [a], "lr": -1.0}], ValueError, r"learning rate.*param_groups\[0\]"),
    (lambda a, b: [{"params": [a]}, {"params": b}], TypeError, r"params\[1\] must be a dict"),
    (lambda a, b: [{"params": [a]}, {"params": [b.astype(np.float64)]}], TypeError, "float32"),
    (lambda a, b: [{"params": []}, {"params": {}}], ValueError, "empty"),
])
def test_bad_groups_are_refused(bad, error, match):
    a, b = make_params(0)[:2]
    with pytest.raises(error, match=match):
        fastopt.SGD(bad(a, b), lr=0.1)


def run_torch_groups(name, groups, grads, edits=(), clip=None, scheduler=None):
    """torch.optim with the same groups; ``edits[t]`` changes groups before step t."""
    torch = pytest.importorskip("torch")
    tensors = [[torch.nn.Parameter(torch.from_numpy(a.copy())) for a in g["params"]]
               for g in groups]
    opt = getattr(torch.optim, name)([{**g, "params": ts} for g, ts in zip(groups, tensors)],
                                     foreach=False, **ALGORITHMS[name])
    sched = scheduler(opt) if scheduler else None
    every = [t for ts in tensors for t in ts]
    norms = []
    for t, step_grads in enumerate(grads):
        for index, key, value in edits.get(t, ()) if edits else ():
            opt.param_groups[index][key] = value
        for p, g in zip(every, step_grads):
            p.grad = torch.from_numpy(g.copy())
        if clip:
            norms.append(float(clip(every)))
        opt.step()
        if sched:
            sched.step()
    return flat([p.detach().numpy() for p in every]), opt, norms


@pytest.mark.parametrize("name", ALGORITHMS)
def test_groups_with_their_own_hyperparameters_match_torch(name):
    params = make_params(1)
    groups = [{"params": params[:2]}, {"params": params[2:], "lr": 0.03, "weight_decay": 0.02}]
    grads = make_grads(1, 12)
    edits = {6: [(0, "lr", 0.002)], 9: [(1, "weight_decay", 0.0)]}
    opt = getattr(fastopt, name)(groups, **ALGORITHMS[name])
    for t, g in enumerate(grads):
        for index, key, value in edits.get(t, ()):
            opt.param_groups[index][key] = value
        opt.step([g[:2], g[2:]])
    expected, torch_opt, _ = run_torch_groups(name, groups, grads, edits)
    np.testing.assert_allclose(opt.flat_params, expected, rtol=RTOL, atol=ATOL)
    if name == "NAdam":  # the momentum products are per group
        torch_products = [float(torch_opt.state[g["params"][0]]["mu_product"])
                          for g in torch_opt.param_groups]
        np.testing.assert_allclose(opt.state["mu_product"], torch_products, rtol=1e-6)


def test_per_group_state_starts_with_each_groups_own_values():
    # Adagrad's accumulator starts at each group's initial value; SGD's momentum buffer
    # switched on in one group later starts from the raw gradient there only.
    a, b = np.zeros(3, f32), np.zeros(2, f32)
    opt = fastopt.Adagrad([{"params": [a]}, {"params": [b], "initial_accumulator_value": 2.0}])
    opt.step(np.ones(5, f32))
    np.testing.assert_allclose(opt.state["sum"], [1, 1, 1, 3, 3])
    sgd = fastopt.SGD([{"params": [a]}, {"params": [b]}], lr=0.1, momentum=0.9, dampening=0.5)
    sgd.param_groups[1]["momentum"] = 0.0
    sgd.step(np.ones(5, f32))
    np.testing.assert_allclose(sgd.state["momentum_buffer"], [1, 1, 1, 0, 0])
    sgd.param_groups[1]["momentum"] = 0.9
    sgd.step(np.full(5, 2.0, f32))
    np.testing.assert_allclose(sgd.state["momentum_buffer"], [1.9, 1.9, 1.9, 2, 2], rtol=1e-6)


def test_grouped_gradients_must_follow_the_groups():
    a, b = make_params(0)[:2]
    opt = fastopt.SGD([{"params": [a]}, {"params": {"b": b}}], lr=0.1)
    before = opt.flat_params.copy()
    for bad, error in [([np.ones_like(a)], TypeError), ({"b": b}, TypeError),
                       ([[np.ones_like(a)], [np.ones_like(b)]], TypeError),
                       ([[np.ones_like(a)], {"c": np.ones_like(b)}], ValueError)]:
        with pytest.raises(error, match=r"grads"):
            opt.step(bad)
    np.testing.assert_array_equal(opt.flat_params, before)


# -- learning-rate schedules -----------------------------------------------------------

def test_a_schedule_sets_each_steps_lr_on_the_host():
    lrs = [0.1 * 0.5 ** t for t in range(6)]
    scheduled = fastopt.SGD([np.zeros(4, f32)], lr=lambda t: lrs[t])
    by_hand = fastopt.SGD([np.zeros(4, f32)], lr=0.0)
    for t, g in enumerate(make_grads(3, 6, [(4,)])):
        by_hand.param_groups[0]["lr"] = lrs[t]
        scheduled.step(g)
        by_hand.step(g)
        np.testing.assert_array_equal(scheduled.flat_params, by_hand.flat_params)


@pytest.mark.parametrize("name", ["SGD", "Adam", "NAdam"])
def test_schedules_per_group_match_torch_schedulers(name):
    torch = pytest.importorskip("torch")
    from torch.optim import lr_scheduler
    params, grads = make_params(4), make_grads(4, 25)
    cosine = schedules.CosineAnnealing(0.05, T_max=10, eta_min=0.001)
    step = schedules.StepDecay(0.02, step_size=7, gamma=0.3)
    opt = getattr(fastopt, name)([{"params": params[:2], "lr": cosine},
                                  {"params": params[2:], "lr": step}], **ALGORITHMS[name])
    for g in grads:
        opt.step([g[:2], g[2:]])
    groups = [{"params": params[:2], "lr": 0.05}, {"params": params[2:], "lr": 0.02}]

    def scheduler(torch_opt):
        return lr_scheduler.LambdaLR(torch_opt, [lambda t: cosine(t) / 0.05,
                                                 lambda t: step(t) / 0.02])

    expected, _, _ = run_torch_groups(name, groups, grads, scheduler=scheduler)
    np.testing.assert_allclose(opt.flat_params, expected, rtol=RTOL, atol=ATOL)
    assert torch is not None


@pytest.mark.parametrize("bad, error", [(-0.1, ValueError), (float("nan"), ValueError),
                                        ("0.1", TypeError), (1e39, ValueError)])
def test_a_schedule_returning_a_bad_lr_changes_nothing(bad, error):
    opt = fastopt.Adam([np.ones(5, f32)], lr=lambda t: 0.1 if t < 2 else bad)
    for g in make_grads(5, 2, [(5,)]):
        opt.step(g)
    before = snapshot(opt)
    with pytest.raises(error, match=r"lr schedule .* returned .* t=2"):
        opt.step(np.ones(5, f32))
    assert_unchanged(opt, before)


# -- clipping and loss scaling ---------------------------------------------------------

@pytest.mark.parametrize("name", ALGORITHMS)
def test_norm_clipping_matches_torch_clip_grad_norm(name):
    torch = pytest.importorskip("torch")
    params = make_params(6)
    # Norms about 25 +- 15: some steps are clipped to 20, others are not.
    grads = [[g * f32(1 + t % 3) for g in step] for t, step in enumerate(make_grads(6, 15))]
    opt = getattr(fastopt, name)(params, clip_grad_norm=20.0, **ALGORITHMS[name])
    norms = []
    for g in grads:
        opt.step(g)
        norms.append(opt.last_grad_norm)
    clip = lambda ps: torch.nn.utils.clip_grad_norm_(ps, 20.0)  # noqa: E731
    expected, _, torch_norms = run_torch_groups(name, [{"params": params}], grads, clip=clip)
    np.testing.assert_allclose(norms, torch_norms, rtol=1e-6)
    assert min(norms) < 20.0 < max(norms)
    np.testing.assert_allclose(opt.flat_params, expected, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("name", ["SGD", "Adam", "RMSprop"])
def test_value_clipping_matches_torch_clip_grad_value(name):
    torch = pytest.importorskip("torch")
    params, grads = make_params(7), make_grads(7, 10)
    opt = getattr(fastopt, name)(params, clip_grad_value=0.5, **ALGORITHMS[name])
    for g in grads:
        opt.step(g)
    clip = lambda ps: torch.nn.utils.clip_grad_value_(ps, 0.5) or 0.0  # noqa: E731
    expected, _, _ = run_torch_groups(name, [{"params": params}], grads, clip=clip)
    np.testing.assert_allclose(opt.flat_params, expected, rtol=RTOL, atol=ATOL)


def test_norm_and_value_clipping_and_loss_scale_compose_in_order():
    # Reference in float64: unscale, clip by norm (norm of the unscaled gradients),
    # clip by value, then SGD with L2 decay (added after clipping, as in torch).
    p0 = make_params(8)
    g = [x * f32(64) for x in make_grads(8, 1)[0]]
    opt = fastopt.SGD(p0, lr=0.1, weight_decay=0.5, clip_grad_norm=3.0, clip_grad_value=0.05)
    opt.step(g, grad_scale=64.0)
    g64 = flat(g).astype(np.float64) / 64.0
    norm = np.linalg.norm(g64)
    clipped = np.clip(g64 * min(1.0, 3.0 / (norm + 1e-6)), -0.05, 0.05)
    p64 = flat(p0).astype(np.float64)
    np.testing.assert_allclose(opt.flat_params, p64 - 0.1 * (clipped + 0.5 * p64), rtol=1e-6)
    assert opt.last_grad_norm == pytest.approx(norm, rel=1e-12)


@pytest.mark.parametrize("name", EVERY_ALGORITHM)
def test_a_power_of_two_loss_scale_is_exact(name):
    plain = getattr(fastopt, name)(make_params(9), **EVERY_ALGORITHM[name])
    scaled = getattr(fastopt, name)(make_params(9), **EVERY_ALGORITHM[name])
    for g in make_grads(9, 8):
        plain.step(g)
        scaled.step([x * f32(1024) for x in g], grad_scale=1024)
    np.testing.assert_array_equal(scaled.flat_params, plain.flat_params)


@pytest.mark.parametrize("bad, error", [(0.0, ValueError), (-2.0, ValueError),
                                        (float("inf"), ValueError), (float("nan"), ValueError),
                                        ("2", TypeError), (True, TypeError)])
def test_a_bad_grad_scale_changes_nothing(bad, error):
    opt = fastopt.Adam(make_params(10))
    opt.step(make_grads(10, 1)[0])
    before = snapshot(opt)
    with pytest.raises(error, match="grad_scale"):
        opt.step(make_grads(11, 1)[0], grad_scale=bad)
    assert_unchanged(opt, before)


@pytest.mark.parametrize("option, bad, error", [
    ("clip_grad_norm", 0.0, ValueError), ("clip_grad_norm", -1.0, ValueError),
    ("clip_grad_norm", "1", TypeError), ("clip_grad_value", 0.0, ValueError),
    ("clip_grad_value", float("nan"), ValueError), ("skip_nonfinite", 1, TypeError),
])
def test_bad_options_are_refused_when_set(option, bad, error):
    with pytest.raises(error, match=option):
        fastopt.SGD(make_params(0), **{option: bad})
    opt = fastopt.SGD(make_params(0))
    with pytest.raises(error, match=option):
        setattr(opt, option, bad)
    assert getattr(opt, option) in (None, False)


def test_a_nan_norm_without_the_skip_poisons_every_parameter_as_in_torch():
    torch = pytest.importorskip("torch")
    params, grads = make_params(12), make_grads(12, 2)
    grads[1][1][3] = np.nan
    opt = fastopt.SGD(params, lr=0.1, clip_grad_norm=1.0)
    for g in grads:
        opt.step(g)
    clip = lambda ps: torch.nn.utils.clip_grad_norm_(ps, 1.0)  # noqa: E731
    groups = [{"params": params}]
    expected, _, _ = run_torch_groups("SGD", groups, grads, clip=clip)
    assert np.isnan(expected).all() and np.isnan(opt.flat_params).all()


# -- the non-finite skip ---------------------------------------------------------------

@pytest.mark.parametrize("clip", [None, 5.0])
@pytest.mark.parametrize("name", EVERY_ALGORITHM)
def test_a_skipped_step_is_as_if_it_never_happened(name, clip):
    grads = make_grads(13, 6)
    poisoned = dict(enumerate(grads))
    poisoned[1] = [g.copy() for g in grads[1]]
    poisoned[1][0][2, 3] = np.nan
    poisoned[4] = [g.copy() for g in grads[4]]
    poisoned[4][2][1, 1, 1] = -np.inf
    skipping = getattr(fastopt, name)(make_params(13), skip_nonfinite=True, clip_grad_norm=clip,
                                      **EVERY_ALGORITHM[name])
    clean = getattr(fastopt, name)(make_params(13), clip_grad_norm=clip, **EVERY_ALGORITHM[name])
    for t in range(6):
        before = snapshot(skipping)
        skipping.step(poisoned[t])
        if t in (1, 4):
            assert_unchanged(skipping, before, grads=False)
            assert not math.isfinite(skipping.last_grad_norm)
        else:
            clean.step(grads[t])
    assert skipping.skipped_steps == 2 and skipping.state["step"] == 4
    np.testing.assert_array_equal(skipping.flat_params, clean.flat_params)
    assert_same(snapshot(skipping), snapshot(clean), grads=False)


def test_skip_nonfinite_can_be_asked_for_one_step():
    opt = fastopt.SGD([np.ones(3, f32)], lr=0.1)
    opt.step(np.array([1, np.inf, 1], f32), skip_nonfinite=True)
    np.testing.assert_array_equal(opt.flat_params, 1.0)
    assert opt.skipped_steps == 1
    opt.step(np.array([1, np.inf, 1], f32))  # the optimizer's own setting: no skip
    assert np.isinf(opt.flat_params[1]) and opt.skipped_steps == 1


def test_huge_finite_gradients_are_not_mistaken_for_non_finite():
    g = np.full(1000, 3e38, f32)  # their squares overflow float32, not the float64 sum
    opt = fastopt.SGD([np.zeros(1000, f32)], lr=1e-40, skip_nonfinite=True)
    opt.step(g)
    assert opt.skipped_steps == 0
    assert opt.last_grad_norm == pytest.approx(3e38 * math.sqrt(1000), rel=1e-6)


# -- the norm's reduction ----------------------------------------------------------------

def sum_squares(g, parallel):
    """The global norm's pass over ``g``, on the serial or the parallel loop."""
    backend = HostBackend()
    segments = backend.segments([g.size], [0])
    cpu.segment_kernel(*GRAD_SQUARES)(backend.flat_tensors(g, g, [0]).g, (), (), segments.chunks,
                                      segments.state_starts, segments.partials,
                                      segments.row_scalars, parallel, False)
    return segments.totals(segments.partials, 1)[0][0]


@pytest.mark.parametrize("n", [0, 1, 1000, SEGMENT_CHUNK + 1, 5 * SEGMENT_CHUNK - 3])
def test_sum_of_squares_is_deterministic_across_paths_and_threads(n):
    g = np.random.default_rng(n).standard_normal(n).astype(f32) * f32(1e3)
    serial = sum_squares(g, False)
    results = set()
    default = numba.get_num_threads()
    try:
        for threads in {1, default}:
            numba.set_num_threads(threads)
            results.add(sum_squares(g, True))
    finally:
        numba.set_num_threads(default)
    assert results == {serial}
    assert serial == pytest.approx(float(np.sum(g.astype(np.float64) ** 2)), rel=1e-13, abs=0)
