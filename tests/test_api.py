"""The NumPy-facing API: structures, views, copies, adoption, gradients and errors."""

import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

import fastopt
from conftest import assert_unchanged, snapshot

f32 = np.float32


def make_params(rng):
    return {"w": rng.standard_normal((4, 3)).astype(f32), "b": rng.standard_normal(3).astype(f32)}


def test_dict_params_are_copied_into_one_flat_buffer(rng):
    params = make_params(rng)
    originals = {k: v.copy() for k, v in params.items()}
    opt = fastopt.SGD(params, lr=0.1)
    assert opt.flat_params.dtype == f32 and opt.flat_params.shape == (15,)
    assert opt.flat_params.flags["C_CONTIGUOUS"] and opt.flat_grads.shape == (15,)
    for k in params:
        assert opt.params[k].shape == params[k].shape
        assert np.shares_memory(opt.params[k], opt.flat_params)
        assert np.shares_memory(opt.grads[k], opt.flat_grads)
        np.testing.assert_array_equal(opt.params[k], params[k])
    np.testing.assert_array_equal(opt.flat_params, np.concatenate([params["w"].ravel(), params["b"]]))
    opt.grads["w"][:] = 1.0
    opt.step()
    np.testing.assert_allclose(opt.params["w"], originals["w"] - 0.1, rtol=1e-6)
    np.testing.assert_array_equal(opt.params["b"], originals["b"])  # zero gradient
    for k in params:  # the caller's arrays are untouched: opt.params holds the live values
        np.testing.assert_array_equal(params[k], originals[k])


def test_list_and_tuple_params(rng):
    arrays = [rng.standard_normal(5).astype(f32), rng.standard_normal((2, 2)).astype(f32)]
    for structure in (list, tuple):
        opt = fastopt.Adam(structure(arrays))
        assert isinstance(opt.params, list) and len(opt.params) == 2
        assert opt.params[1].shape == (2, 2)


def test_a_lone_flat_float32_array_is_still_copied():
    a = np.ones(6, f32)
    opt = fastopt.SGD([a], lr=1.0)
    opt.step(np.ones(6, f32))
    np.testing.assert_array_equal(a, 1.0)
    np.testing.assert_array_equal(opt.params[0], 0.0)


def test_adopt_updates_the_callers_buffer_in_place():
    flat = np.ones(10, f32)
    grads = np.zeros(10, f32)
    opt = fastopt.SGD(fastopt.adopt(flat, {"w": (2, 3), "b": (4,)}, grads=grads), lr=0.5)
    assert opt.flat_params is flat and opt.flat_grads is grads
    assert opt.params["w"].base is flat and opt.params["w"].shape == (2, 3)
    grads[:] = 1.0
    opt.step()
    np.testing.assert_array_equal(flat, 0.5)
    plain = fastopt.SGD(fastopt.adopt(flat))
    assert plain.params[0].base is flat and plain.params[0].shape == (10,)
    listed = fastopt.SGD(fastopt.adopt(flat, [(5,), (5,)]))
    assert [v.shape for v in listed.params] == [(5,), (5,)]


@pytest.mark.parametrize("buffer, shapes, grads, error, match", [
    (np.ones(4), None, None, TypeError, "float32"),
    (np.ones((2, 2), f32), None, None, ValueError, "1-D"),
    (np.ones(8, f32)[::2], None, None, ValueError, "C-contiguous"),
    (np.ones(4, f32), {"a": (3,)}, None, ValueError, "add up to 3"),
    (np.ones(4, f32), 4, None, TypeError, "shapes"),
    (np.ones(4, f32), {"a": (2.0,), "b": (2,)}, None, TypeError, r"shapes\['a'\]"),
    (np.ones(4, f32), [(6,), (-2,)], None, ValueError, "negative"),
    (np.ones(4, f32), None, np.ones(5, f32), ValueError, "4 elements"),
    (np.ones(4, f32), None, np.ones(4, np.float64), TypeError, "float32"),
    ([1.0, 2.0], None, None, TypeError, "array"),
])
def test_adopt_refuses_bad_buffers(buffer, shapes, grads, error, match):
    with pytest.raises(error, match=match):
        fastopt.Adam(fastopt.adopt(buffer, shapes, grads=grads))


def test_adopt_refuses_read_only_and_aliased_buffers():
    ro = np.ones(4, f32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="writeable"):
        fastopt.Adam(fastopt.adopt(ro))
    flat = np.ones(8, f32)
    with pytest.raises(ValueError, match="share memory"):
        fastopt.Adam(fastopt.adopt(flat[:4], grads=flat[2:6]))


def test_the_three_ways_to_pass_gradients_agree(rng):
    params = make_params(rng)
    grads = [{k: rng.standard_normal(v.shape).astype(f32) for k, v in params.items()}
             for _ in range(5)]
    structured = fastopt.Adam(params, lr=0.1)
    flat = fastopt.Adam(params, lr=0.1)
    views = fastopt.Adam(params, lr=0.1)
    for g in grads:
        structured.step(g)
        flat.step(np.concatenate([g["w"].ravel(), g["b"]]))
        for k in g:
            views.grads[k][...] = g[k]
        views.step()
    np.testing.assert_array_equal(structured.flat_params, flat.flat_params)
    np.testing.assert_array_equal(views.flat_params, flat.flat_params)


def test_non_contiguous_structured_gradients_are_copied_correctly(rng):
    opt = fastopt.SGD([np.zeros((3, 4), f32)], lr=1.0)
    g = rng.standard_normal((4, 3)).astype(f32)
    opt.step([g.T])
    np.testing.assert_array_equal(opt.params[0], -g.T)


def test_zero_grad(rng):
    opt = fastopt.SGD(make_params(rng))
    opt.flat_grads[:] = 3.0
    opt.zero_grad()
    assert not opt.flat_grads.any()


@pytest.mark.parametrize("params, error, match", [
    (np.ones(3, f32), TypeError, r"\[array\]"),
    ([], ValueError, "empty"),
    ({}, ValueError, "empty"),
    ([np.ones(3)], TypeError, r"params\[0\] has dtype float64"),
    ({"w": np.ones(3, np.int16)}, TypeError, r"params\['w'\] has dtype int16"),
    ({"w": np.ones(3, f32), "b": np.ones(3, np.float16)}, TypeError,
     r"params\['b'\] is float16 but params\['w'\] is float32"),
    ([np.ones(3, f32), np.ones(3, np.int32)], TypeError, r"params\[1\]"),
    ([[1.0, 2.0]], TypeError, r"params\[0\] must be an array"),
    ("weights", TypeError, "dict of arrays"),
])
def test_bad_params_are_refused(params, error, match):
    with pytest.raises(error, match=match):
        fastopt.Adam(params)


def test_the_same_array_twice_is_refused():
    a = np.ones(3, f32)
    with pytest.raises(ValueError, match=r"params\[1\] is the same array as params\[0\]"):
        fastopt.SGD([a, a])


@pytest.mark.parametrize("cls, kwargs, match", [
    (fastopt.SGD, dict(lr=-1.0), "learning rate"),
    (fastopt.SGD, dict(momentum=-0.1), "momentum"),
    (fastopt.SGD, dict(weight_decay=-1e-4), "weight_decay"),
    (fastopt.SGD, dict(nesterov=True), "Nesterov"),
    (fastopt.SGD, dict(nesterov=True, momentum=0.9, dampening=0.1), "Nesterov"),
    (fastopt.Adam, dict(betas=(1.0, 0.999)), "index 0"),
    (fastopt.Adam, dict(betas=(0.9, -0.1)), "index 1"),
    (fastopt.Adam, dict(eps=-1e-8), "epsilon"),
    (fastopt.Adam, dict(lr=float("nan")), "learning rate"),
    (fastopt.AdamW, dict(weight_decay=-0.01), "weight_decay"),
    (fastopt.Adagrad, dict(lr_decay=-0.1), "lr_decay"),
    (fastopt.Adagrad, dict(initial_accumulator_value=-1.0), "initial_accumulator_value"),
    (fastopt.RMSprop, dict(alpha=-0.5), "alpha"),
    (fastopt.Adadelta, dict(rho=1.5), "rho"),
    (fastopt.NAdam, dict(momentum_decay=-1.0), "momentum_decay"),
    (fastopt.Adamax, dict(betas=(0.9, 1.0)), "index 1"),
    (fastopt.Adam, dict(lr=1e39), "float32"),
    (fastopt.RAdam, dict(betas=(0.9, 1.0)), "index 1"),
    (fastopt.Rprop, dict(etas=(1.2, 0.5)), "eta"),
    (fastopt.Rprop, dict(step_sizes=(1.0, 0.1)), "step_sizes"),
    (fastopt.ASGD, dict(lambd=-1.0), "lambd"),
    (fastopt.ASGD, dict(alpha=float("nan")), "alpha"),
    (fastopt.ASGD, dict(t0=float("nan")), "t0"),
    (fastopt.SGD, dict(momentum=0.9, dampening=float("nan")), "dampening"),
    (fastopt.Lion, dict(betas=(-0.1, 0.99)), "index 0"),
    (fastopt.LAMB, dict(eps=-1.0), "epsilon"),
    (fastopt.LARS, dict(trust_coefficient=-1.0), "trust_coefficient"),
    (fastopt.Adafactor, dict(beta2_decay=0.5), "beta2_decay"),
    (fastopt.Adafactor, dict(d=0.5), "Clipping threshold"),
    (fastopt.Adafactor, dict(eps=(-1.0, 1e-3)), "eps"),
    (fastopt.SGD, dict(lr=float("inf")), "float32"),
])
def test_bad_hyperparameters_raise_value_error(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls([np.ones(3, f32)], **kwargs)


def test_asgd_takes_negative_alpha_and_t0_as_torch_does():
    """torch checks neither (only NaN, which no step can use, is refused)."""
    opt = fastopt.ASGD([np.ones(3, f32)], lr=0.1, alpha=-0.5, t0=-2.0)
    for _ in range(3):
        opt.step(np.ones(3, f32))
    assert np.isfinite(opt.flat_params).all() and np.isfinite(opt.state["ax"]).all()
    assert opt.state["mu"] == [f32(1 / 5)]  # 1 / max(1, t - t0) after step 3


@pytest.mark.parametrize("kwargs, match", [
    (dict(lr="0.1"), "lr must be a real number"),
    (dict(betas=0.9), "betas must be a pair"),
    (dict(amsgrad="yes"), "amsgrad must be True or False"),
])
def test_hyperparameters_of_the_wrong_type_raise_type_error(kwargs, match):
    with pytest.raises(TypeError, match=match):
        fastopt.Adam([np.ones(3, f32)], **kwargs)


def stepped_adam(rng):
    opt = fastopt.Adam(make_params(rng), lr=0.1, amsgrad=True)
    opt.step(rng.standard_normal(15).astype(f32))
    opt.flat_grads[:] = rng.standard_normal(15).astype(f32)
    return opt


@pytest.mark.parametrize("grads, error, match", [
    (np.ones(14, f32), ValueError, "15 elements"),
    (np.ones(15), TypeError, "float32"),
    (np.ones((3, 5), f32), ValueError, "shape"),
    (np.ones(30, f32)[::2], ValueError, "C-contiguous"),
    ({"w": np.ones((4, 3), f32)}, ValueError, "missing"),
    ({"w": np.ones((4, 3), f32), "b": np.ones(3, f32), "c": np.ones(1, f32)}, ValueError, "unexpected"),
    ({"w": np.ones((4, 3), f32), "b": np.ones(4, f32)}, ValueError, r"grads\['b'\] must have shape"),
    ({"w": np.ones((4, 3), f32), "b": np.ones(3, np.float64)}, TypeError, r"grads\['b'\] must be float32"),
    ([np.ones((4, 3), f32), np.ones(3, f32)], TypeError, "dict like params"),
    ("grads", TypeError, "array"),
])
def test_bad_gradients_change_nothing(rng, grads, error, match):
    opt = stepped_adam(rng)
    before = snapshot(opt)
    with pytest.raises(error, match=match):
        opt.step(grads)
    assert_unchanged(opt, before)
    assert opt.state["step"] == 1


@pytest.mark.parametrize("buffer", ["params", "exp_avg", "max_exp_avg_sq"])
def test_gradients_aliasing_parameters_or_state_are_refused(rng, buffer):
    opt = stepped_adam(rng)
    before = snapshot(opt)
    aliased = opt.flat_params if buffer == "params" else opt.state[buffer]
    with pytest.raises(ValueError, match="share memory"):
        opt.step(aliased)
    assert_unchanged(opt, before)


@pytest.mark.parametrize("source", ["exp_avg_sq", "a view of max_exp_avg_sq", "params",
                                    "grads", "master weights", "read-only"])
def test_a_state_buffer_replaced_by_one_sharing_memory_or_read_only_is_refused(rng, source):
    """The kernels would write one buffer over the other (or fail on a read-only one):
    a replacement must be an array of its own, as grads must be."""
    if source == "master weights":
        opt = fastopt.Adam([np.ones(16, ml_dtypes.bfloat16)], lr=0.1, amsgrad=True)
        opt.step(np.ones(16, ml_dtypes.bfloat16))
    else:
        opt = stepped_adam(rng)
    kept = opt.state["exp_avg"]
    replacement = {"exp_avg_sq": lambda: opt.state["exp_avg_sq"],
                   "a view of max_exp_avg_sq": lambda: opt.state["max_exp_avg_sq"][:],
                   "params": lambda: opt.flat_params, "grads": lambda: opt.flat_grads,
                   "master weights": lambda: opt.master_params,
                   "read-only": kept.copy}[source]()
    if source == "read-only":
        replacement.flags.writeable = False
    opt.state["exp_avg"] = replacement
    before, master = snapshot(opt), np.copy(opt.master_params)
    with pytest.raises(ValueError, match=r"state\['exp_avg'\] must (not share memory|be "
                                         r"writeable)"):
        opt.step()
    assert_unchanged(opt, before)
    np.testing.assert_array_equal(np.copy(opt.master_params), master)
    opt.state["exp_avg"] = kept.copy()  # an array of its own: taken
    opt.step()
    assert opt.state["step"] == 2


def test_list_params_want_list_gradients():
    opt = fastopt.SGD([np.ones(2, f32), np.ones(3, f32)])
    with pytest.raises(TypeError, match="list like params"):
        opt.step({"a": np.ones(2, f32)})
    with pytest.raises(ValueError, match="grads has 1 arrays, params has 2"):
        opt.step([np.ones(2, f32)])


def test_hyperparameters_changed_between_steps_take_effect(rng):
    opt = fastopt.SGD([np.zeros(4, f32)], lr=1.0)
    opt.step(np.ones(4, f32))
    opt.param_groups[0]["lr"] = 0.25
    opt.step(np.ones(4, f32))
    np.testing.assert_allclose(opt.params[0], -1.25)


@pytest.mark.parametrize("name", ["SGD", "Adagrad", "RMSprop", "Adadelta", "Adam", "AdamW",
                                  "Adamax", "NAdam", "RAdam", "Rprop", "ASGD", "Lion", "LAMB",
                                  "LARS", "Adafactor"])
def test_an_invalid_hyperparameter_change_is_refused_at_step(rng, name):
    opt = getattr(fastopt, name)(make_params(rng))
    opt.step(rng.standard_normal(15).astype(f32))
    before = snapshot(opt)  # includes the step count and NAdam's mu_product
    opt.param_groups[0]["lr"] = -1.0
    with pytest.raises(ValueError, match="learning rate"):
        opt.step(rng.standard_normal(15).astype(f32))
    assert_unchanged(opt, before)


def test_a_list_hyperparameter_edited_in_place_is_checked_again(rng):
    betas = [0.9, 0.999]
    opt = fastopt.Adam(make_params(rng), betas=betas)
    opt.step()
    before = snapshot(opt)
    betas[1] = 1.0  # the group holds this very list
    with pytest.raises(ValueError, match="index 1"):
        opt.step()
    assert_unchanged(opt, before)


def test_sgd_momentum_switched_on_later_starts_from_the_raw_gradient():
    g1, g2, g3 = (np.full(2, v, f32) for v in (1.0, 2.0, 4.0))
    opt = fastopt.SGD([np.zeros(2, f32)], lr=0.1)
    opt.step(g1)
    assert "momentum_buffer" not in opt.state
    opt.param_groups[0].update(momentum=0.9, dampening=0.5)
    opt.step(g2)  # a new buffer takes g2 as it is, as torch's does
    np.testing.assert_allclose(opt.state["momentum_buffer"], 2.0)
    opt.step(g3)
    np.testing.assert_allclose(opt.state["momentum_buffer"], 0.9 * 2.0 + 0.5 * 4.0, rtol=1e-6)
    np.testing.assert_allclose(opt.params[0], -0.1 * (1.0 + 2.0 + 3.8), rtol=1e-6)


@pytest.mark.parametrize("how", ["flat", "structured", "views"])
def test_step_allocates_nothing_proportional_to_the_parameters(how):
    n = 1 << 21  # 8 MB of float32
    opt = fastopt.Adam({"w": np.zeros((1024, n // 1024 - 1), f32), "b": np.zeros(1024, f32)})
    flat = np.ones(n, f32)
    structured = {"w": np.ones(opt.params["w"].shape, f32).T.copy().T, "b": np.ones(1024, f32)}
    args = {"flat": (flat,), "structured": (structured,), "views": ()}[how]
    opt.step(*args)  # compile and create the state outside the measurement
    tracemalloc.start()
    for _ in range(3):
        opt.step(*args)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 64 * 1024, f"step() allocated {peak} bytes"


def run_python(code):
    """Run ``code`` in a fresh interpreter away from the source tree."""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd="/", check=True)
    return out.stdout.strip()


def test_import_is_lazy():
    out = run_python(
        "import sys, fastopt\n"
        "from fastopt.kernels import cpu\n"
        "print('numba.cuda' in sys.modules, cpu.kernel.cache_info().currsize)")
    assert out == "False 0"  # no CUDA import and no kernel built before the first step


def test_a_source_checkout_imports_its_own_kernels():
    # Started at the repository root, Python imports fastopt from the checkout (not the
    # install), and fastopt.kernels must come from the checkout's kernels/ beside it.
    root = Path(__file__).resolve().parent.parent
    code = ("import fastopt, fastopt.kernels.cpu as cpu, numpy as np\n"
            "opt = fastopt.SGD({'w': np.ones(3, np.float32)}, lr=0.5)\n"
            "opt.step({'w': np.ones(3, np.float32)})\n"
            "print(fastopt.__file__, cpu.__file__, opt.params['w'][0], sep='\\n')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=root, env={k: v for k, v in os.environ.items()
                                        if k != "PYTHONPATH"})
    assert out.returncode == 0, out.stderr
    package, kernels, moved = out.stdout.split("\n")[:3]
    assert Path(package).resolve() == root / "fastopt" / "__init__.py"
    assert Path(kernels).resolve() == root / "kernels" / "cpu.py"
    assert float(moved) == 0.5


def test_kernels_install_as_a_subpackage_only():
    out = run_python(
        "import importlib.util, fastopt.kernels, fastopt.kernels.rules\n"
        "print(importlib.util.find_spec('kernels') is None)")
    assert out == "True"


def test_the_buffers_cannot_be_put_aside_by_assignment():
    """An array put in the place of a buffer would not be stepped (the next step would
    write the old one): assigning one is refused, and writing into it works."""
    opt = fastopt.SGD({"w": np.ones(4, np.float32)}, lr=0.5)
    for name in ("flat_params", "flat_grads", "master_params", "params", "grads"):
        with pytest.raises(AttributeError, match=f"{name} is the optimizer's own buffer"):
            setattr(opt, name, np.zeros(4, np.float32))
    opt.grads["w"][:] = 1.0
    opt.step()
    np.testing.assert_array_equal(opt.params["w"], 0.5)


@pytest.mark.parametrize("edit, error", [
    (lambda opt: opt.param_groups.pop(), ValueError),
    (lambda opt: opt.param_groups.__delitem__(0), ValueError),
    (lambda opt: setattr(opt, "param_groups", []), ValueError),
    (lambda opt: opt.param_groups.append(dict(opt.param_groups[0])), ValueError),
    (lambda opt: setattr(opt, "param_groups", tuple(opt.param_groups)), TypeError),
], ids=["pop", "del", "emptied", "append", "tuple"])
@pytest.mark.parametrize("steady", [False, True], ids=["", "steady"])
def test_a_group_removed_or_added_between_steps_is_refused(edit, error, steady):
    """Each group's params are views into its segment of flat_params: a step went on
    without a removed group (its parameters silently no longer stepped), and failed with
    an IndexError on a group added."""
    opt = fastopt.SGD([{"params": [np.ones(3, f32)]}, {"params": [np.ones(2, f32)]}], lr=0.1)
    opt.grads[0][0][:] = opt.grads[1][0][:] = 1.0
    opt.step()
    if steady:  # the fast path is set up for the next step
        opt.step()
    edit(opt)
    before = snapshot(opt)
    with pytest.raises(error, match="2 (parameter )?groups"):
        opt.step()
    assert_unchanged(opt, before)


@pytest.mark.parametrize("grouped", [False, True])
def test_a_groups_params_replaced_are_refused_at_the_step_and_the_save(grouped):
    """A group's "params" are views of the buffer: new arrays in their place would not be
    stepped (the step went on with the old ones, and the new ones showed unstepped)."""
    w = {"w": np.zeros(3, np.float32)}
    opt = fastopt.SGD([{"params": w}] if grouped else w, lr=0.5)
    views = opt.param_groups[0]["params"]
    opt.param_groups[0]["params"] = {"w": np.full(3, 5.0, np.float32)}
    grads = {"w": np.ones(3, np.float32)}
    with pytest.raises(TypeError, match=r"param_groups\[0\]\['params'\] was replaced"):
        opt.step([grads] if grouped else grads)
    assert opt.state["step"] == 0 and not opt.flat_params.any()
    # nor saved: the checkpoint would hold the optimizer's parameters, not the new ones
    with pytest.raises(TypeError, match=r"param_groups\[0\]\['params'\] was replaced"):
        opt.state_dict()
    opt.param_groups[0]["params"] = views
    opt.step([grads] if grouped else grads)
    np.testing.assert_array_equal(views["w"], -0.5)
