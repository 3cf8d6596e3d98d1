"""``caution=True`` (Cautious Optimizers, Liang et al. 2024) on Adam, AdamW, Lion and Adan:
each tensor steps only where its momentum agrees with its gradient, scaled by that
tensor's own share of agreement. Its parity with timm is in test_timm.py."""

import numpy as np
import pytest

import fastopt
import reference
from conftest import assert_unchanged, snapshot

f32 = np.float32
NAMES = ["Adam", "AdamW", "Lion", "Adan"]
KWARGS = dict(lr=0.01, weight_decay=0.1)


def gradients(rng, shapes, steps):
    """Random gradients, but for the third tensor, whose gradient is zero but for one
    element: its share of agreement (1 in 3000) is below timm's floor of 1e-3."""
    for _ in range(steps):
        grads = [rng.standard_normal(s).astype(f32) for s in shapes]
        grads[2][:] = 0
        grads[2][7] = 1.0
        yield grads


@pytest.mark.parametrize("device", ["numpy", "torch"])
@pytest.mark.parametrize("name", NAMES)
def test_each_tensor_takes_its_own_share(name, device):
    rng = np.random.default_rng(1)
    shapes = [(40, 50), (20_001,), (3000,), (1,)]  # one tensor spans several chunks
    params = [rng.standard_normal(s).astype(f32) for s in shapes]
    refs = [getattr(reference, name)(p.size, caution=True, **KWARGS) for p in params]
    expected = [p.ravel().astype(np.float64) for p in params]
    if device == "numpy":
        opt = getattr(fastopt, name)([p.copy() for p in params], caution=True, **KWARGS)
    else:
        torch = pytest.importorskip("torch")
        import fastopt.torch as ft

        tensors = [torch.nn.Parameter(torch.from_numpy(p.copy())) for p in params]
        opt = getattr(ft, name)(tensors, caution=True, **KWARGS)
    for grads in gradients(rng, shapes, 12):
        if device == "numpy":
            opt.step(grads)
        else:
            for t, g in zip(tensors, grads):
                t.grad = torch.from_numpy(g)
            opt.step()
        expected = [r.step(p, g.ravel().astype(np.float64))
                    for r, p, g in zip(refs, expected, grads)]
    got = opt.params if device == "numpy" else [t.detach().numpy() for t in tensors]
    for k, (mine, theirs, start) in enumerate(zip(got, expected, params)):
        np.testing.assert_allclose(mine.ravel(), theirs, rtol=2e-4, atol=2e-5, err_msg=k)
        assert np.abs(theirs - start.ravel()).max() > 1e-3
    # The third tensor's one agreeing element steps with a scale of 1000, where a mask
    # over the whole buffer would give about 2.
    assert abs(expected[2][7] - params[2][7]) > 0.05


@pytest.mark.parametrize("name", NAMES)
def test_caution_must_be_a_bool_and_a_bad_value_changes_nothing(name):
    with pytest.raises(TypeError, match="caution"):
        getattr(fastopt, name)([np.ones(3, f32)], caution=1)
    opt = getattr(fastopt, name)([np.ones(3, f32)], caution=True)
    opt.step([np.ones(3, f32)])
    before = snapshot(opt)
    opt.param_groups[0]["caution"] = "yes"
    with pytest.raises(TypeError, match="caution"):
        opt.step([np.ones(3, f32)])
    assert_unchanged(opt, before)


def test_a_cautious_step_keeps_subnormals_under_a_small_eps_as_the_plain_step():
    """The two passes of a cautious step flushed subnormals whatever the eps: with eps=0
    a second moment of gradients of 1e-20 read as 0, and m / (0 + 0) took p to -inf,
    where the plain step (and torch) moves it by lr."""
    p0, g = np.ones(64, np.float32), np.full(64, 1e-20, np.float32)
    plain = fastopt.Adam([p0.copy()], lr=1e-3, eps=0.0)
    cautious = fastopt.Adam([p0.copy()], lr=1e-3, eps=0.0, caution=True)
    for _ in range(3):  # every direction agrees with its gradient: the mask is all ones
        plain.step(g)
        cautious.step(g)
    np.testing.assert_allclose(plain.flat_params, 1.0 - 3e-3, atol=3e-5)  # subnormals: few bits
    np.testing.assert_array_equal(cautious.flat_params, plain.flat_params)


@pytest.mark.parametrize("name", NAMES)
def test_a_cautious_step_counts_tiny_gradients_that_agree(name):
    """m * g of a gradient of 1e-20 is subnormal: flushed, it read as disagreeing, was
    masked, and halved the tensor's share, so that the other half stepped twice as far
    as timm's and the float64 reference's."""
    p0, g = np.ones(100, np.float32), np.ones(100, np.float32)
    g[50:] = 1e-20
    kwargs = dict(lr=1e-3, weight_decay=0.0)
    opt = getattr(fastopt, name)([p0.copy()], caution=True, **kwargs)
    opt.step(g.copy())
    expected = getattr(reference, name)(100, caution=True, **kwargs).step(
        p0.astype(np.float64), g.astype(np.float64))
    np.testing.assert_allclose(opt.flat_params, expected, rtol=0, atol=1e-7)
