"""Every algorithm and option, on the CPU kernels, against the float64 references."""

import numpy as np
import pytest

import fastopt
import reference
from cases import ALL, LAYERWISE, case_id
from conftest import SIZES, gradients, initial_params

# float32 against float64 after 30 steps: parameters of magnitude ~1 carry a few ulps
# (1e-7) of rounding per step; a wrong term in a formula is off by the size of an
# update (>= 1e-4 here).
RTOL = ATOL = 2e-5


def run_reference(name, kwargs, p0, grads):
    # One tensor of shape (n,): test_layerwise.py covers many tensors of any shape.
    size = [p0.shape] if name in LAYERWISE else p0.size
    ref = getattr(reference, name)(size, **kwargs)
    p = p0.astype(np.float64)
    for g in grads:
        p = ref.step(p, g.astype(np.float64))
    return p


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("case", ALL, ids=case_id)
def test_matches_reference(case, n):
    name, kwargs = case
    p0, grads = initial_params(n, n), gradients(n, n)
    opt = getattr(fastopt, name)([p0], **kwargs)
    for g in grads:
        opt.step(g)
    expected = run_reference(name, kwargs, p0, grads)
    np.testing.assert_allclose(opt.flat_params, expected, rtol=RTOL, atol=ATOL)
    assert opt.state["step"] == len(grads)
    if n:  # the test must be able to fail: the parameters really moved
        assert np.abs(expected - p0).max() > 4 * ATOL
