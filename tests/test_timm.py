"""fastopt against timm's optimizers, where timm has the algorithm (Adan, LAMB, LARS,
and the Cautious Optimizers' mask).

timm is a test-only dependency, installed without its dependencies: its package imports
torchvision, which cannot load next to the CPU build of torch, so each optimizer
module is loaded here on its own (with timm.optim's two small helper modules)."""

import importlib
import importlib.util
import sys
import types

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import fastopt.torch as ft  # noqa: E402

# Within this many float32 ulps of the largest value of each tensor: the same operations
# in another order round differently, by an ulp or two a step.
ULPS = 16
STEPS = 20


def timm_optimizer(module, name):
    """``timm.optim.<module>.<name>``, imported without running timm's ``__init__``."""
    spec = importlib.util.find_spec("timm")
    if spec is None:
        pytest.skip("timm is not installed")
    saved = {key: sys.modules.get(key) for key in ("timm", "timm.optim")}
    root = spec.submodule_search_locations[0]
    for key, folder in (("timm", root), ("timm.optim", root + "/optim")):
        package = types.ModuleType(key)
        package.__path__ = [folder]
        sys.modules[key] = package
    try:
        return getattr(importlib.import_module(f"timm.optim.{module}"), name)
    finally:
        for key, value in saved.items():
            if value is None:
                sys.modules.pop(key, None)
            else:
                sys.modules[key] = value


def tensors(seed, zero_bias=False):
    """Three tensors; with ``zero_bias``, the vector of them starts at zero (a bias)."""
    rng = np.random.default_rng(seed)
    shapes = [(7, 5), (13,), (3, 2, 4)]
    params = [torch.nn.Parameter(torch.from_numpy(rng.standard_normal(s).astype(np.float32)))
              for s in shapes]
    if zero_bias:
        params[1].data.zero_()
    return params


def train(make, seed, steps=STEPS, zero_bias=False):
    """Steps on a fixed quadratic, 0.5 * sum(c * p**2) plus a fixed tilt per step: the
    gradient depends on the parameters, smoothly (no chaos to amplify rounding)."""
    params = tensors(seed, zero_bias)
    opt = make(params)
    rng = np.random.default_rng(seed + 1)
    curvature = [torch.from_numpy(rng.uniform(0.5, 2.0, p.shape).astype(np.float32))
                 for p in params]
    for _ in range(steps):
        for p, c in zip(params, curvature):
            tilt = torch.from_numpy(rng.standard_normal(p.shape).astype(np.float32))
            p.grad = (c * p.detach() + tilt).contiguous()
        opt.step()
    return params, opt


def assert_close_in_ulps(ours, theirs, what):
    ours, theirs = ours.detach().numpy(), theirs.detach().numpy()
    ulp = np.spacing(np.float32(np.abs(theirs).max()))
    gap = np.abs(ours - theirs).max()
    assert gap <= ULPS * ulp, f"{what}: {gap / ulp:.1f} ulps apart"


ADAN_CASES = [dict(), dict(lr=0.01), dict(lr=0.01, weight_decay=0.1),
              dict(lr=0.01, weight_decay=0.1, no_prox=True),
              dict(lr=0.02, betas=(0.9, 0.8, 0.95), eps=1e-3, weight_decay=0.02)]


@pytest.mark.parametrize("kwargs", ADAN_CASES, ids=str)
def test_adan_matches_timm(kwargs):
    Adan = timm_optimizer("adan", "Adan")
    theirs, their_opt = train(lambda ps: Adan(ps, foreach=False, **kwargs), seed=3)
    ours, our_opt = train(lambda ps: ft.Adan(ps, **kwargs), seed=3)
    moved = max((a - b).abs().max().item() for a, b in zip(theirs, tensors(3)))
    assert moved > 100 * ULPS * np.spacing(np.float32(3))  # the parameters really moved
    for k, (a, b) in enumerate(zip(ours, theirs)):
        assert_close_in_ulps(a, b, f"params[{k}]")
        for name in ("exp_avg", "exp_avg_sq", "exp_avg_diff"):
            assert_close_in_ulps(our_opt.state[a][name], their_opt.state[b][name],
                                 f"state[{k}][{name}]")
        # timm keeps minus the last gradient; fastopt keeps the gradient
        assert_close_in_ulps(our_opt.state[a]["prev_grad"], -their_opt.state[b]["neg_pre_grad"],
                             f"state[{k}][prev_grad]")


# timm's options beside: no clipping of its own, and the trust ratio without weight decay
# too (where timm's default, as NVIDIA's apex, leaves it out). (timm's Lamb decays 0.01 by
# default, fastopt's 0.)
LAYERWISE = [("lamb", "Lamb", "LAMB", dict(lr=0.01, weight_decay=0.0),
              dict(max_grad_norm=None, always_adapt=True)),
             ("lamb", "Lamb", "LAMB", dict(lr=0.01, weight_decay=0.1), dict(max_grad_norm=None)),
             ("lars", "Lars", "LARS", dict(lr=0.1, momentum=0.9), dict(eps=0.0, always_adapt=True)),
             ("lars", "Lars", "LARS", dict(lr=0.1, momentum=0.9, weight_decay=0.01),
              dict(eps=0.0))]


@pytest.mark.parametrize("module, name, ours, kwargs, theirs_only", LAYERWISE,
                         ids=[f"{c[2]}{c[3]}" for c in LAYERWISE])
def test_layerwise_steps_match_timm_and_move_a_tensor_that_starts_at_zero(
        module, name, ours, kwargs, theirs_only):
    """LAMB's and LARS's per-tensor trust ratios, 1 where a tensor's norm is 0: a bias
    that starts at zero moves from the first step."""
    Theirs = timm_optimizer(module, name)
    theirs, _ = train(lambda ps: Theirs(ps, **kwargs, **theirs_only), seed=7, zero_bias=True)
    mine, _ = train(lambda ps: getattr(ft, ours)(ps, **kwargs), seed=7, zero_bias=True)
    assert mine[1].abs().min().item() > 100 * ULPS * np.spacing(np.float32(1))
    for k, (a, b) in enumerate(zip(mine, theirs)):
        assert_close_in_ulps(a, b, f"params[{k}]")


CAUTIOUS = [("adamw", "AdamWLegacy", "AdamW", dict(lr=0.01, weight_decay=0.1)),
            ("adamw", "AdamWLegacy", "AdamW", dict(lr=0.01, amsgrad=True, maximize=True)),
            ("lion", "Lion", "Lion", dict(lr=0.01, weight_decay=0.1)),
            ("adan", "Adan", "Adan", dict(lr=0.01, weight_decay=0.1)),
            ("adan", "Adan", "Adan", dict(lr=0.01, weight_decay=0.1, no_prox=True))]


@pytest.mark.parametrize("module, name, ours, kwargs", CAUTIOUS,
                         ids=[f"{c[2]}{c[3]}" for c in CAUTIOUS])
def test_caution_matches_timm(module, name, ours, kwargs):
    """The Cautious Optimizers mask, with its mean over each tensor, as timm computes it."""
    Theirs = timm_optimizer(module, name)
    theirs, _ = train(lambda ps: Theirs(ps, foreach=False, caution=True, **kwargs), seed=5)
    mine, _ = train(lambda ps: getattr(ft, ours)(ps, caution=True, **kwargs), seed=5)
    plain, _ = train(lambda ps: getattr(ft, ours)(ps, **kwargs), seed=5)
    for k, (a, b, c) in enumerate(zip(mine, theirs, plain)):
        assert_close_in_ulps(a, b, f"params[{k}]")
        # the mask changed the result, by far more than the tolerance
        assert (a - c).abs().max().item() > 100 * ULPS * np.spacing(np.float32(3))


def step_tiny(make, scale, steps):
    """A (64,) parameter stepped on gradients of ``scale`` times a fixed direction, then
    on zeros: the parameter after each step."""
    rng = np.random.default_rng(9)
    p = torch.nn.Parameter(torch.from_numpy(rng.standard_normal(64).astype(np.float32)))
    opt = make([p])
    direction = torch.from_numpy(rng.standard_normal(64).astype(np.float32))
    history = []
    for t in range(steps):
        p.grad = direction * scale if t == 0 else torch.zeros(64)
        opt.step()
        history.append(p.detach().clone())
    return history


@pytest.mark.parametrize("scale", [1e-40, 1e-34])
def test_lion_steps_on_subnormal_moments_as_timms(scale):
    """Lion steps by lr times a sign: a subnormal update flushed to 0 left elements
    standing, and a first moment decaying through the subnormals stopped some 1600
    steps early (beta2 = 0.99) where torch's arithmetic keeps stepping."""
    Lion = timm_optimizer("lion", "Lion")
    theirs = step_tiny(lambda ps: Lion(ps, lr=0.01, foreach=False), scale, 3000)
    ours = step_tiny(lambda ps: ft.Lion(ps, lr=0.01), scale, 3000)
    for t, (a, b) in enumerate(zip(ours, theirs)):
        assert torch.equal(a, b), f"step {t}"
    assert (theirs[-1] - theirs[0]).abs().min() > 1.0  # every element kept stepping

