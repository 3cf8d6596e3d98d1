"""fastopt against torch.optim: same arguments, same gradients, same numbers."""

import numpy as np
import pytest

import fastopt
from cases import TORCH_CASES, case_id
from conftest import SIZES, gradients, initial_params

torch = pytest.importorskip("torch")
import fastopt.torch as ft  # noqa: E402

# Both sides compute in float32 but round differently (torch fuses some multiply-adds
# and divides where fastopt multiplies by a reciprocal), so a few ulps per step.
RTOL = ATOL = 1e-5



def run_torch(name, kwargs, p0, grads):
    p = torch.nn.Parameter(torch.from_numpy(p0.copy()))
    opt = getattr(torch.optim, name)([p], foreach=False, **kwargs)
    for g in grads:
        p.grad = torch.from_numpy(g)
        opt.step()
    return p.detach().numpy(), opt.state[p]


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("case", TORCH_CASES, ids=case_id)
def test_matches_torch(case, n):
    name, kwargs = case
    if name == "Adafactor" and n == 0:
        pytest.skip("torch.optim.Adafactor divides by the size of an empty tensor")
    p0, grads = initial_params(n, n), gradients(n, n)
    opt = getattr(fastopt, name)([p0], **kwargs)
    for g in grads:
        opt.step(g)
    expected, torch_state = run_torch(name, kwargs, p0, grads)
    np.testing.assert_allclose(opt.flat_params, expected, rtol=RTOL, atol=ATOL)
    for key, value in torch_state.items():  # the state buffers agree too, by name
        if isinstance(value, torch.Tensor) and value.numel() == n and n > 1:
            value = value.numpy()
            np.testing.assert_allclose(opt.state[key], value, rtol=1e-4,
                                       atol=1e-5 * np.abs(value).max(), err_msg=key)
    for key in ("mu_product", "eta", "mu"):  # host values, per group
        if key in torch_state:
            assert opt.state[key][0] == pytest.approx(float(torch_state[key]), rel=1e-5), key


@pytest.mark.parametrize("case", TORCH_CASES, ids=case_id)
def test_non_finite_gradients_propagate_as_in_torch(case):
    name, kwargs = case
    n = 8
    p0 = initial_params(0, n)
    grads = gradients(0, n, 4)
    grads[1][2], grads[1][5], grads[2][6] = np.nan, np.inf, -np.inf
    opt = getattr(fastopt, name)([p0], **kwargs)
    for g in grads:
        opt.step(g)
    expected, torch_state = run_torch(name, kwargs, p0, grads)
    np.testing.assert_array_equal(np.isnan(opt.flat_params), np.isnan(expected))
    np.testing.assert_array_equal(np.isinf(opt.flat_params), np.isinf(expected))
    finite = np.isfinite(expected)
    np.testing.assert_allclose(opt.flat_params[finite], expected[finite], rtol=RTOL, atol=ATOL)
    for key, value in torch_state.items():
        if isinstance(value, torch.Tensor) and value.numel() == n:
            np.testing.assert_array_equal(np.isnan(opt.state[key]), np.isnan(value.numpy()),
                                          err_msg=key)


@pytest.mark.parametrize("name, kwargs, key", [
    ("Adam", dict(betas=(0.0, 0.999)), "exp_avg"), ("AdamW", dict(betas=(0.0, 0.0)), "exp_avg"),
    ("Adamax", dict(betas=(0.0, 0.999)), "exp_avg"), ("NAdam", dict(betas=(0.0, 0.999)), "exp_avg"),
    ("RAdam", dict(betas=(0.0, 0.999)), "exp_avg"),
    ("RMSprop", dict(alpha=0.0, centered=True), "grad_avg"),
    ("Adafactor", dict(beta2_decay=0.0), "variance"),
    ("Adafactor", dict(beta2_decay=0.0), "row_var")])  # a matrix's factors, on the host
def test_an_average_moved_with_weight_one_is_the_new_value_as_in_torchs_lerp(name, kwargs, key):
    """torch's lerp_ goes from its end for weights of 0.5 and more, which gives the end
    exactly at 1 (beta1 = 0, alpha = 0): m + 1 * (g - m) lost a small gradient beside a
    large average (2**-20 after 2**20 read as 0)."""
    shape = (2, 3) if key == "row_var" else (6,)
    p0 = np.zeros(shape, np.float32)
    grads = [np.full(shape, 2.0 ** 20, np.float32), np.full(shape, 2.0 ** -20, np.float32)]
    expected, torch_state = run_torch(name, dict(lr=1e-3, **kwargs), p0, grads)
    assert torch_state[key].flatten()[0].item() == 2.0 ** (-40 if name == "Adafactor" else -20)
    ours = getattr(fastopt, name)([p0.copy()], lr=1e-3, **kwargs)
    for g in grads:
        ours.step(g.ravel())
    np.testing.assert_array_equal(ours.state[key], torch_state[key].numpy().ravel())
    np.testing.assert_allclose(ours.flat_params, expected.ravel(), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("name, kwargs", [
    ("Adam", dict(eps=0.0)), ("Adam", dict(eps=1e-30)), ("Adam", dict(eps=1e-40)),
    ("AdamW", dict(eps=0.0)), ("NAdam", dict(eps=0.0)), ("RMSprop", dict(eps=0.0)),
    ("Adagrad", dict(eps=0.0)), ("Adadelta", dict(eps=0.0)),
    ("Adam", dict(eps=0.0, state_dtype="int8"))])
def test_under_a_small_eps_the_kernels_keep_subnormals_as_torch_does(name, kwargs):
    """Flushed, (1 - beta2) * g * g of a gradient of 1e-20 was 0, and m / (0 + eps)
    took p to -inf (eps = 0) or 1e7 away (eps = 1e-30), where torch steps by lr; a
    subnormal eps read as 0. Below eps 1e-10 the kernels keep subnormals."""
    torch_kwargs = {k: v for k, v in kwargs.items() if k != "state_dtype"}
    p0 = np.ones(5000, np.float32)
    grads = [np.full(5000, 1e-20, np.float32)] * 3
    expected, _ = run_torch(name, dict(lr=1e-3, **torch_kwargs), p0, grads)
    ours = getattr(fastopt, name)([p0.copy()], lr=1e-3, **kwargs)
    for g in grads:  # through opt.flat_grads: the second step on takes the steady path
        ours.flat_grads[...] = g
        ours.step()
    p = torch.nn.Parameter(torch.from_numpy(p0.copy()))
    theirs = getattr(ft, name)([p], lr=1e-3, **kwargs)
    for g in grads:
        p.grad = torch.from_numpy(g)
        theirs.step()
    for result in (ours.flat_params, p.detach().numpy()):
        np.testing.assert_allclose(result, expected, rtol=RTOL, atol=ATOL)
