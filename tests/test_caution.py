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
