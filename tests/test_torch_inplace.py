"""fastopt.torch steps the model's own tensors in place: whatever replaces a parameter's
storage, layout or state between steps, the step follows it as torch.optim's does, or
refuses it with an error that names the parameter."""

import copy
import io

import numpy as np
import pytest

from cases import ALL, case_id
from test_torch_adapter import assert_same_params, train, twins

torch = pytest.importorskip("torch")
import fastopt  # noqa: E402
import fastopt.torch as ft  # noqa: E402


def pair(name="Adam", model_name="cnn", seed=0, **kwargs):
    """Two identical models with fastopt's and torch's optimizer, and a batch of data."""
    ours, theirs, x, y = twins(model_name, seed)
    kwargs.setdefault("lr", 0.01)
    return (ours, getattr(ft, name)(ours.parameters(), **kwargs), theirs,
            getattr(torch.optim, name)(theirs.parameters(), foreach=False, **kwargs), x, y)


def both(ours, our_opt, theirs, their_opt, x, y, steps, change=None):
    """Train both for ``steps`` steps, with ``change(model)`` applied to each first."""
    for model, opt in ((ours, our_opt), (theirs, their_opt)):
        if change is not None:
            change(model)
        train(model, opt, x, y, steps)


def to_half_and_back(model):
    model.half()
    model.float()


def replace_data(model):
    for p in model.parameters():
        p.data = p.data.clone()


def through_a_vector(model):
    vector = torch.nn.utils.parameters_to_vector(model.parameters())
    torch.nn.utils.vector_to_parameters(vector, model.parameters())


def channels_last(model):
    model.to(memory_format=torch.channels_last)


@pytest.mark.parametrize("name", ["Adam", "SGD", "Adafactor"])  # in place; through scratch
@pytest.mark.parametrize("change", [replace_data, to_half_and_back, through_a_vector,
                                    channels_last])
def test_storage_replaced_after_a_step_keeps_training_like_torch(change, name):
    kwargs = dict(momentum=0.9) if name == "SGD" else {}
    ours, our_opt, theirs, their_opt, x, y = pair(name, **kwargs)
    both(ours, our_opt, theirs, their_opt, x, y, 3)
    moved = ours[2].weight.detach().clone()
    both(ours, our_opt, theirs, their_opt, x, y, 5, change)
    assert not torch.equal(ours[2].weight.detach(), moved)  # it trains on
    assert_same_params(ours, theirs)


@pytest.mark.parametrize("name", ["SGD", "Adam"])
def test_a_layout_changed_at_the_same_address_is_followed_like_torch(name):
    """``p.data = p.data.t()`` of a square matrix keeps its address and shape: the step
    paired its state with the elements by their old places in memory."""
    kwargs = dict(momentum=0.9) if name == "SGD" else {}
    params = [torch.nn.Parameter(torch.zeros(3, 3)) for _ in range(2)]
    opts = [getattr(ft, name)([params[0]], lr=0.1, **kwargs),
            getattr(torch.optim, name)([params[1]], lr=0.1, foreach=False, **kwargs)]
    grads = torch.arange(9.0).view(3, 3), torch.ones(3, 3)
    for p, opt in zip(params, opts):
        p.grad = grads[0].clone()
        opt.step()
        address = p.data_ptr()
        p.data = p.data.t()
        assert p.data_ptr() == address
        p.grad = grads[1].clone()
        opt.step()
    torch.testing.assert_close(params[0], params[1], rtol=1e-6, atol=0)


def test_a_dtype_changed_at_the_same_address_steps_as_one_changed_elsewhere():
    """``lin.float(); lin.half()`` can land a bfloat16 weight's float16 successor at its
    old address, which the step took for its bfloat16 bits (one AdamW step moved a weight
    by 0.9, with lr 1e-3)."""
    results = []
    for copied in (False, True):
        p = torch.nn.Parameter(torch.linspace(-1, 1, 64, dtype=torch.bfloat16))
        opt = ft.AdamW([p], lr=1e-3)
        p.grad = torch.ones_like(p)
        opt.step()
        half = p.data.view(torch.float16)  # the same bytes, read as float16
        p.data = half.clone() if copied else half
        assert (p.data_ptr() == half.data_ptr()) != copied
        p.grad = torch.ones_like(p)
        opt.step()
        results.append(p.detach().clone())
    assert torch.equal(results[0], results[1])


def test_channels_last_is_kept_and_so_is_its_state():
    ours, our_opt, theirs, their_opt, x, y = pair()
    channels_last(ours)
    channels_last(theirs)
    both(ours, our_opt, theirs, their_opt, x, y, 5)
    weight = ours[2].weight
    assert weight.is_contiguous(memory_format=torch.channels_last)
    assert not weight.is_contiguous()
    exp_avg = our_opt.state[weight]["exp_avg"]
    assert exp_avg.stride() == weight.stride()
    assert torch.allclose(exp_avg, their_opt.state[theirs[2].weight]["exp_avg"], atol=1e-7)
    assert_same_params(ours, theirs)


@pytest.mark.parametrize("name, kwargs, dtype", [
    ("SGD", dict(lr=0.5), torch.float32), ("Adam", dict(lr=0.1), torch.bfloat16),
    ("AdamW", dict(lr=0.1, state_dtype="int8"), torch.float32),
    ("AdamW", dict(lr=0.1, master_weights="remainder"), torch.bfloat16),
    ("LAMB", dict(lr=0.1), torch.float32)], ids=str)
def test_a_step_between_a_forward_and_its_backward_fails_the_backward_as_torchs(
        name, kwargs, dtype):
    """A step writes the parameters in place, as torch.optim's does, so a graph that saved
    them before it cannot be differentiated after it: torch.optim's in-place update
    raises at that backward; fastopt's kernels, writing through views that autograd did
    not see, gave a gradient of the old activations and the new weights."""
    torch_options = {"lr": kwargs["lr"]}  # LAMB: no torch.optim namesake
    for optimizer, options in ((getattr(torch.optim, name, None), torch_options),
                               (getattr(ft, name), kwargs)):
        if optimizer is None:
            continue
        torch.manual_seed(0)
        layer = torch.nn.Linear(64, 80).to(dtype)  # 5120 weights: 8-bit state
        frozen = torch.nn.Parameter(torch.ones(80, dtype=dtype))
        opt = optimizer([*layer.parameters(), frozen], **options)
        x = torch.randn(3, 64, dtype=dtype, requires_grad=True)
        layer(x).float().square().sum().backward()
        out = (layer(x) * frozen).float().square().sum()
        frozen.grad = None
        versions = (layer.weight._version, frozen._version)
        opt.step()
        assert layer.weight._version > versions[0] and frozen._version == versions[1]
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            out.backward()


@pytest.mark.parametrize("kwargs, dtype", [
    ({}, torch.float32), (dict(state_dtype="int8"), torch.float32),
    (dict(master_weights="remainder"), torch.bfloat16)], ids=str)
def test_rebuilt_stores_free_their_old_buffers(kwargs, dtype):
    """A state tensor stays the same object when the stores are rebuilt for a group added
    (and, where kept under its own name and dtype, for a load), pointed at the new
    buffers: made as a view of the old buffer, it kept that alive as its view base, a
    whole state's worth of memory left behind per rebuild."""
    import gc
    import weakref

    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5000, dtype=dtype)) for _ in range(2)]
    opt = ft.AdamW([params[0]], lr=0.01, **kwargs)
    for rebuild, keeps in ((lambda: opt.add_param_group({"params": [params[1]]}), True),
                           (lambda: opt.load_state_dict(opt.state_dict()), not kwargs)):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
        kept = dict(opt.state[params[0]])
        old = [weakref.ref(buffer) for store in opt._stores for buffer in store._flat.values()]
        rebuild()
        opt.step()
        gc.collect()
        assert not keeps or all(opt.state[params[0]][name] is value for name, value in
                                kept.items() if isinstance(value, torch.Tensor))
        assert [ref() for ref in old if ref() is not None] == []


def test_transposed_parameters_and_gradients_in_another_layout():
    torch.manual_seed(0)
    base = torch.randn(6, 4)
    ours = torch.nn.Parameter(base.clone().t())  # dense, not contiguous
    theirs = torch.nn.Parameter(base.clone().t())
    our_opt, their_opt = ft.Adam([ours], lr=0.1), torch.optim.Adam([theirs], lr=0.1)
    for t in range(4):
        grad = torch.randn(4, 6)
        ours.grad = grad.clone() if t % 2 else grad.t().contiguous().t()  # either layout
        theirs.grad = grad.clone()
        our_opt.step()
        their_opt.step()
    assert ours.stride() == (1, 4)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)


def test_negated_views_are_read_as_their_values_or_refused():
    """A tensor with torch's lazy negation (is_neg(): ``z.conj().imag``) holds the
    opposite of its values in memory, which the kernels read: such a gradient steps as
    its values (a copy), and such a parameter, which the step would write the opposite
    of, is refused."""
    torch.manual_seed(0)
    base, grads = torch.randn(6), torch.randn(3, 6)
    ours, theirs = torch.nn.Parameter(base.clone()), torch.nn.Parameter(base.clone())
    our_opt, their_opt = ft.Adam([ours], lr=0.1), torch.optim.Adam([theirs], lr=0.1)
    for grad in grads:
        ours.grad, theirs.grad = torch._neg_view(-grad), grad.clone()
        assert ours.grad.is_neg() and torch.equal(ours.grad, grad)
        our_opt.step()
        their_opt.step()
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)
    scalar = torch.nn.Parameter(torch.tensor(1.0))
    opt = ft.SGD([scalar], lr=0.1)
    scalar.grad = torch.complex(torch.tensor(0.0), torch.tensor(0.5)).conj().imag  # -0.5
    opt.step()
    assert scalar.item() == pytest.approx(1.05)
    with pytest.raises(TypeError, match=r"negated view \(is_neg\(\)\)"):
        ft.SGD([torch.nn.Parameter(torch._neg_view(torch.ones(3)))], lr=0.1)


def test_a_gradient_strided_otherwise_only_in_dimensions_of_one_is_read_in_place(monkeypatch):
    """autograd gives a (1, n) weight's gradient through einsum strides (1, 1) where the
    weight has (n, 1): the same memory order, which the kernels read where it lies (a
    copy each step cost the parameter's size in memory and time), as torch steps it."""
    torch.manual_seed(0)
    ours, theirs = (torch.nn.Parameter(torch.randn(1, 300)) for _ in range(2))
    with torch.no_grad():
        theirs.copy_(ours)
    our_opt, their_opt = ft.Adam([ours], lr=0.1), torch.optim.Adam([theirs], lr=0.1)
    copies = []
    empty_like = torch.empty_like
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: copies.append(a) or empty_like(
        *a, **k))
    for _ in range(3):
        x = torch.randn(4, 300)
        for p in (ours, theirs):
            p.grad = None
            torch.einsum("on,bn->bo", p, x).square().sum().backward()
        assert ours.grad.stride() == (1, 1) and ours.stride() == (300, 1)
        our_opt.step()
        their_opt.step()
    assert copies == []
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)


def _stepped_sgd(dtype=torch.float32):
    """fastopt's SGD with momentum on a (64, 80) parameter and torch's on its twin,
    after one step (whose gradient fastopt has checked)."""
    torch.manual_seed(0)
    ours = torch.nn.Parameter(torch.randn(64, 80, dtype=dtype))
    theirs = torch.nn.Parameter(ours.detach().clone())
    our_opt = ft.SGD([ours], lr=0.5, momentum=0.9)
    their_opt = torch.optim.SGD([theirs], lr=0.5, momentum=0.9, foreach=False)
    grad = torch.randn(64, 80, dtype=dtype)
    for p, opt in ((ours, our_opt), (theirs, their_opt)):
        p.grad = grad.clone()
        opt.step()
    return ours, our_opt, theirs, their_opt


@pytest.mark.parametrize("shape", [(10, 80), (128, 80), (1, 80), (80,), (), (80, 64)])
def test_a_gradient_of_another_shape_is_refused_with_nothing_changed(shape):
    """``p.grad.data = t`` binds a gradient (the same object the last step checked) to a
    tensor of any shape. Read from its address for the parameter's number of elements,
    a smaller one was read past its end (heap garbage and NaN in the parameter), a
    larger one cut, and one in another layout broadcast in its copy."""
    ours, our_opt, _, _ = _stepped_sgd()
    before = ours.detach().clone()
    momentum = our_opt.state[ours]["momentum_buffer"].clone()
    ours.grad.data = torch.ones(shape)
    with pytest.raises(ValueError, match=rf"a gradient of shape \({', '.join(map(str, shape))}"
                                         rf",?\) for a parameter of shape \(64, 80\)"):
        our_opt.step()
    assert torch.equal(ours.detach(), before)
    assert torch.equal(our_opt.state[ours]["momentum_buffer"], momentum)


def test_a_gradient_of_another_shape_is_refused_for_the_scratch_copy_too():
    """Adafactor steps a parameter that is not C-contiguous through a scratch copy, into
    which a (1, 80) gradient was broadcast."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(80, 64).t())
    opt = ft.Adafactor([p], lr=0.01)
    p.grad = torch.randn(64, 80)
    opt.step()
    before = p.detach().clone()
    p.grad.data = torch.ones(1, 80)
    with pytest.raises(ValueError, match=r"a gradient of shape \(1, 80\) for a parameter"):
        opt.step()
    assert torch.equal(p.detach(), before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_gradient_rebound_after_a_step_is_checked_again(dtype):
    """The step checked a gradient object once and then trusted it: its .data bound to
    float64 was read as float32 bits, and to column-major memory in the wrong order."""
    ours, our_opt, theirs, their_opt = _stepped_sgd(dtype)
    before = ours.detach().clone()
    ours.grad.data = ours.grad.data.double()
    with pytest.raises(TypeError, match=f"a gradient of torch.float64 for a parameter of {dtype}"):
        our_opt.step()
    assert torch.equal(ours.detach(), before)
    values = torch.arange(64 * 80.).reshape(64, 80).to(dtype) / 1000
    for p, opt in ((ours, our_opt), (theirs, their_opt)):
        p.grad.data = values.t().contiguous().t()  # the same values, column-major
        opt.step()
    # Read in the wrong order, elements differed by up to 5. With bfloat16, fastopt's
    # float32 master weights and state round less than torch's bfloat16 ones: within a
    # bfloat16 step of the values (at most 6 here).
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0 if dtype == torch.float32 else 2**-5)


def test_parameters_with_gaps_or_overlaps_are_refused_by_name():
    fine = torch.nn.Parameter(torch.zeros(3))
    gaps = torch.nn.Parameter(torch.zeros(4, 4)[:, :2])
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[1\] has strides"):
        ft.Adam([fine, gaps])
    overlapping = torch.nn.Parameter(torch.zeros(1, 3).expand(4, 3))
    with pytest.raises(ValueError, match="gaps or overlaps"):
        ft.SGD([overlapping])


def test_a_dtype_that_cannot_be_stepped_is_refused_with_nothing_changed():
    ours, our_opt, _, _, x, y = pair()
    train(ours, our_opt, x, y, 2)
    ours.double()
    ((ours(x.double()) - y.double()) ** 2).mean().backward()
    before = [p.detach().clone() for p in ours.parameters()]
    state = copy.deepcopy(our_opt.state_dict())
    with pytest.raises(TypeError, match=r"param_groups\[0\]\['params'\]\[0\] has dtype "
                                        "torch.float64"):
        our_opt.step()
    assert all(torch.equal(a, b.detach()) for a, b in zip(before, ours.parameters()))
    after = our_opt.state_dict()["state"]
    assert all(torch.equal(after[i]["exp_avg"], s["exp_avg"]) for i, s in state["state"].items())
    ours.float()  # and back: training goes on from the same state
    train(ours, our_opt, x, y, 1)
    assert our_opt.state[ours[0].weight]["step"] == 3


@pytest.mark.parametrize("name", ["Adam", "Adafactor"])
def test_replaced_state_tensors_are_taken_in(name):
    ours, our_opt, theirs, their_opt, x, y = pair(name)
    both(ours, our_opt, theirs, their_opt, x, y, 4)
    key = "exp_avg" if name == "Adam" else "row_var"
    for model, opt in ((ours, our_opt), (theirs, their_opt)):
        p = model[0].weight  # reset one moment, as a user would
        opt.state[p][key] = torch.zeros_like(opt.state[p][key])
    assert torch.equal(our_opt.state_dict()["state"][0][key], torch.zeros_like(
        our_opt.state[ours[0].weight][key]))
    both(ours, our_opt, theirs, their_opt, x, y, 4)
    assert_same_params(ours, theirs)
    ours_state, theirs_state = our_opt.state_dict()["state"], their_opt.state_dict()["state"]
    torch.testing.assert_close(ours_state[0][key], theirs_state[0][key], rtol=1e-4, atol=1e-7)


def test_a_replaced_state_tensor_of_the_wrong_shape_or_on_the_meta_device_is_refused():
    ours, our_opt, _, _, x, y = pair()
    train(ours, our_opt, x, y, 1)
    our_opt.state[ours[0].weight]["exp_avg"] = torch.zeros(3)
    with pytest.raises(ValueError, match=r"'exp_avg' of shape \(3,\) for param_groups\[0\]"):
        our_opt.step()
    our_opt.state[ours[0].weight]["exp_avg"] = torch.zeros_like(ours[0].weight, device="meta")
    with pytest.raises(TypeError, match="'exp_avg' for param_groups.0.*on the meta device"):
        our_opt.step()


@pytest.mark.parametrize("value", [np.zeros(4, np.float32), 0.0, [0.0] * 4])
def test_a_state_buffer_replaced_by_what_is_not_a_tensor_is_refused(value):
    """It was left out of what the step takes in: the step went on with the old buffer,
    while ``opt.state`` and ``state_dict()`` showed (and saved) the replacement."""
    p = torch.nn.Parameter(torch.zeros(4))
    opt = ft.SGD([p], lr=1.0, momentum=0.9)
    p.grad = torch.ones(4)
    opt.step()
    before = p.detach().clone()
    opt.state[p]["momentum_buffer"] = value
    with pytest.raises(TypeError, match=rf"'momentum_buffer' for param_groups\[0\]\['params'\]"
                                        rf"\[0\] that is a {type(value).__name__}, not a tensor"):
        opt.step()
    assert torch.equal(p.detach(), before)
    opt.state[p]["momentum_buffer"] = None  # torch's way to begin it afresh
    opt.step()
    torch.testing.assert_close(p.detach(), before - 1)


@pytest.mark.parametrize("value", [0.0, np.zeros((30, 10), np.float32)])
def test_a_state_dict_whose_buffer_is_not_a_tensor_is_refused_and_nothing_changes(value):
    ours, our_opt, _, _, x, y = pair(model_name="mlp")
    train(ours, our_opt, x, y, 2)
    before = copy.deepcopy(our_opt.state_dict())
    bad = copy.deepcopy(before)
    bad["state"][1]["exp_avg"] = value
    with pytest.raises(TypeError, match=r"loaded state dict has 'exp_avg' for "
                                        r"param_groups\[0\]\['params'\]\[1\] that is a"):
        our_opt.load_state_dict(bad)
    assert_unchanged(our_opt, before)
    train(ours, our_opt, x, y, 1)


@pytest.mark.parametrize("dtype", [torch.complex64, torch.bool])
def test_a_state_dict_whose_buffer_a_cast_would_not_keep_is_refused(dtype):
    """torch.optim's load casts it to the parameter's dtype, dropping an imaginary part
    or every magnitude; fastopt took it so too."""
    ours, our_opt, _, _, x, y = pair(model_name="mlp")
    train(ours, our_opt, x, y, 2)
    before = copy.deepcopy(our_opt.state_dict())
    bad = copy.deepcopy(before)
    bad["state"][1]["exp_avg"] = (bad["state"][1]["exp_avg"] + 1).to(dtype)
    with pytest.raises(TypeError, match=rf"loaded state dict has 'exp_avg' of {dtype} for "
                                        r"param_groups\[0\]\['params'\]\[1\], whose state "
                                        "holds real numbers"):
        our_opt.load_state_dict(bad)
    assert_unchanged(our_opt, before)
    train(ours, our_opt, x, y, 1)


def test_a_reset_state_starts_afresh_like_torch():
    ours, our_opt, theirs, their_opt, x, y = pair()
    both(ours, our_opt, theirs, their_opt, x, y, 3)
    for model, opt in ((ours, our_opt), (theirs, their_opt)):
        opt.state[model[2].weight] = {}
    both(ours, our_opt, theirs, their_opt, x, y, 3)
    assert our_opt.state[ours[2].weight]["step"] == 3
    assert_same_params(ours, theirs)


def test_a_state_dict_of_another_model_is_refused_and_nothing_changes():
    ours, our_opt, _, _, x, y = pair(model_name="mlp")
    train(ours, our_opt, x, y, 2)
    other = torch.nn.Sequential(torch.nn.Linear(10, 30), torch.nn.Tanh(),
                                torch.nn.Linear(30, 16), torch.nn.ReLU(),
                                torch.nn.Linear(16, 3))  # as many tensors, other shapes
    other_opt = torch.optim.Adam(other.parameters())
    ((other(torch.randn(4, 10)) ** 2).mean()).backward()
    other_opt.step()
    before = copy.deepcopy(our_opt.state_dict())
    with pytest.raises(ValueError, match=r"'exp_avg' of shape \(30, 10\) for "
                                         r"param_groups\[0\]\['params'\]\[0\]"):
        our_opt.load_state_dict(other_opt.state_dict())
    fewer = torch.optim.Adam(list(other.parameters())[:4])
    with pytest.raises(ValueError, match="doesn't match the size of optimizer's group"):
        our_opt.load_state_dict(fewer.state_dict())
    after = our_opt.state_dict()
    assert after["param_groups"] == before["param_groups"]
    for index, state in before["state"].items():
        assert all(torch.equal(after["state"][index][k], v) for k, v in state.items())


def assert_unchanged(opt, before):
    """``opt.state_dict()`` is still ``before``, a deep copy of it."""
    after = opt.state_dict()
    assert after["param_groups"] == before["param_groups"]
    for index, state in before["state"].items():
        assert all(torch.equal(torch.as_tensor(after["state"][index][k]), torch.as_tensor(v))
                   for k, v in state.items())


@pytest.mark.parametrize("edit, error, match", [
    (lambda sd: sd["state"][0].update(step=torch.tensor(float("nan"))), ValueError,
     r"'step' of param_groups\[0\]\['params'\]\[0\] must be a whole number >= 0, got nan"),
    (lambda sd: sd["state"][1].update(step=torch.tensor(-3.0)), ValueError, "got -3.0"),
    (lambda sd: sd["state"][1].update(step=2.5), ValueError, "got 2.5"),
    (lambda sd: sd["state"][1].update(step="2"), TypeError, "one-element real tensor, got '2'"),
    (lambda sd: sd["state"][1].update(step=torch.ones(2)), TypeError, "one-element"),
    (lambda sd: sd["state"].update({7: {"step": torch.tensor(1.0)}}), ValueError,
     "state for 7, which none of its param_groups holds")])
def test_a_state_dict_with_numbers_no_step_leaves_is_refused_and_nothing_changes(edit, error,
                                                                                 match):
    ours, our_opt, _, _, x, y = pair(model_name="mlp")
    train(ours, our_opt, x, y, 2)
    before = copy.deepcopy(our_opt.state_dict())
    bad = copy.deepcopy(before)
    bad["param_groups"][0]["lr"] = 0.5
    edit(bad)
    with pytest.raises(error, match=match):
        our_opt.load_state_dict(bad)
    assert_unchanged(our_opt, before)
    train(ours, our_opt, x, y, 1)  # and it steps on


@pytest.mark.parametrize("name, kwargs, edit, missing", [
    ("Adam", {}, lambda sd: sd["state"][0].pop("exp_avg_sq"), "exp_avg_sq"),
    # as a torch.distributed.checkpoint load of amsgrad's groups into an optimizer
    # without it, whose state_dict() has no such buffer to load into
    ("Adam", {}, lambda sd: sd["param_groups"][0].update(amsgrad=True), "max_exp_avg_sq"),
    ("NAdam", {}, lambda sd: sd["state"][1].pop("mu_product"), "mu_product"),
    ("RMSprop", dict(momentum=0.5), lambda sd: sd["state"][2].pop("momentum_buffer"),
     "momentum_buffer"),
    ("ASGD", {}, lambda sd: sd["state"][0].pop("eta"), "eta")])
def test_a_stepped_state_without_what_its_next_step_reads_is_refused(name, kwargs, edit,
                                                                     missing):
    """torch.optim fails at the load or the next step (a KeyError); fastopt would begin
    the buffer or number afresh, a step unlike the run that saved it."""
    ours, our_opt, theirs, their_opt, x, y = pair(name, model_name="mlp", **kwargs)
    both(ours, our_opt, theirs, their_opt, x, y, 2)
    bad = copy.deepcopy(their_opt.state_dict())
    edit(bad)
    with pytest.raises(KeyError, match=missing):
        their_opt.load_state_dict(bad)
        train(theirs, their_opt, x, y, 1)
    before = copy.deepcopy(our_opt.state_dict())
    with pytest.raises(ValueError, match=rf"state for param_groups\[0\]\['params'\]\[\d\] "
                                         rf"at step 2 without \['{missing}'\]"):
        our_opt.load_state_dict(bad)
    assert_unchanged(our_opt, before)


def test_sgd_begins_a_momentum_missing_from_a_stepped_state_from_the_gradient():
    """As torch's SGD does, at any step: a bfloat16 model rounded stochastically (without
    master weights) counts its steps, and its loaded state without momentum loads."""
    model = torch.nn.Linear(6, 3).to(torch.bfloat16)
    opt = ft.SGD(model.parameters(), lr=0.1, momentum=0.9, master_weights=None,
                 stochastic_rounding=True)
    x = torch.randn(5, 6, dtype=torch.bfloat16)
    for _ in range(2):
        opt.zero_grad()
        model(x).float().square().mean().backward()
        opt.step()
    saved = opt.state_dict()
    for state in saved["state"].values():
        assert state["step"] == 2
        del state["momentum_buffer"]
    opt.load_state_dict(saved)
    opt.zero_grad()
    model(x).float().square().mean().backward()
    opt.step()
    for p in model.parameters():
        assert torch.equal(opt.state[p]["momentum_buffer"], p.grad.float())


def test_a_swats_checkpoint_past_its_switch_is_refused_by_a_fresh_swats_through_dcp(tmp_path):
    """DCP loads only the keys of the resuming optimizer's own state_dict(), and a SWATS
    before its switch has no momentum: refused, where it was dropped (and the run went on
    from a zero momentum). Through load_state_dict it resumes as not stopping."""
    dcp = pytest.importorskip("torch.distributed.checkpoint")
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    def make():
        torch.manual_seed(0)
        model = torch.nn.Linear(8, 1)
        return model, ft.SWATS(model.parameters(), lr=0.05, eps=1e-3)

    def train_swats(model, opt, steps):
        for t in range(steps):
            x = torch.randn(16, 8, generator=torch.Generator().manual_seed(t))
            opt.zero_grad()
            (model(x) - x.sum(1, keepdim=True)).square().mean().backward()
            opt.step()

    model, opt = make()
    train_swats(model, opt, 15)
    assert opt.state[model.weight]["sgd_lr"] is not None  # switched
    dcp.save(dict(zip(("model", "optim"), get_state_dict(model, opt))),
             checkpoint_id=str(tmp_path))
    fresh_model, fresh = make()
    state = dict(zip(("model", "optim"), get_state_dict(fresh_model, fresh)))
    dcp.load(state, checkpoint_id=str(tmp_path))
    with pytest.raises(ValueError, match=r"at step 15 without \['momentum_buffer'\].*SWATS"):
        set_state_dict(fresh_model, fresh, model_state_dict=state["model"],
                       optim_state_dict=state["optim"])
    resumed_model, resumed = make()
    resumed_model.load_state_dict(model.state_dict())
    resumed.load_state_dict(opt.state_dict())
    train_swats(model, opt, 3)
    train_swats(resumed_model, resumed, 3)
    assert torch.equal(resumed_model.weight, model.weight)


def test_a_step_count_set_by_hand_is_checked_before_the_step():
    ours, our_opt, _, _, x, y = pair(model_name="mlp")
    train(ours, our_opt, x, y, 1)
    before = [p.detach().clone() for p in ours.parameters()]
    our_opt.state[ours[0].weight]["step"] = -5
    with pytest.raises(ValueError, match="'step' of param_groups.*got -5"):
        train(ours, our_opt, x, y, 1)
    assert all(torch.equal(p, q) for p, q in zip(ours.parameters(), before))
    our_opt.state[ours[0].weight]["step"] = np.int64(1)  # any real number that counts
    train(ours, our_opt, x, y, 1)
    assert our_opt.state[ours[0].weight]["step"] == 2


@pytest.mark.parametrize("step", [torch.tensor(10.0), torch.tensor([10.0]), 10.0])
def test_a_step_count_put_in_as_torch_keeps_it_steps_as_torch(step):
    """A state moved over from torch.optim entry by entry holds a float32 tensor step:
    fastopt kept it so, and its bias corrections in float32 erred 40x torch's own
    rounding at beta2 = 0.99999 (a (1,)-shaped one crashed ASGD). torch reads it as a
    Python number; so does fastopt now."""
    torch.manual_seed(0)
    p, q = (torch.nn.Parameter(torch.randn(64)) for _ in range(2))
    q.data.copy_(p.data)
    kwargs = dict(lr=1e-3, betas=(0.9, 0.99999))
    theirs, ours = torch.optim.Adam([q], **kwargs), ft.Adam([p], **kwargs)
    grads = [torch.randn(64) for _ in range(16)]
    for g in grads[:10]:
        q.grad = g.clone()
        theirs.step()
    p.data.copy_(q.data)
    ours.state[p] = {**{k: v.clone() for k, v in theirs.state[q].items()},
                     "step": step.clone() if isinstance(step, torch.Tensor) else step}
    exact = {k: v.double() for k, v in theirs.state[q].items() if k != "step"}
    w = q.detach().double()
    for t, g in enumerate(grads[10:], start=11):
        p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        theirs.step()
        exact["exp_avg"] = 0.9 * exact["exp_avg"] + 0.1 * g.double()
        exact["exp_avg_sq"] = 0.99999 * exact["exp_avg_sq"] + 1e-5 * g.double() ** 2
        w = w - 1e-3 / (1 - 0.9 ** t) * exact["exp_avg"] / (
            (exact["exp_avg_sq"] / (1 - 0.99999 ** t)).sqrt() + 1e-8)
    assert type(ours.state[p]["step"]) is int and ours.state[p]["step"] == 16
    ours_error = (p.detach().double() - w).abs().max().item()
    torch_error = (q.detach().double() - w).abs().max().item()
    assert ours_error <= 2 * torch_error + 1e-9, (ours_error, torch_error)
    asgd = ft.ASGD([torch.nn.Parameter(torch.ones(3))], lr=0.1)
    param = asgd.param_groups[0]["params"][0]
    param.grad = torch.ones(3)
    asgd.step()
    asgd.state[param]["step"] = step.clone() if isinstance(step, torch.Tensor) else step
    asgd.step()
    assert asgd.state[param]["step"] == 11


def test_a_step_count_past_float32s_integers_is_saved_exactly():
    """torch's step tensors are float32, which holds every count only to 2**24: above it
    a saved count came back one step behind (and stochastic rounding drew a past
    step's bits)."""
    p = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    opt = ft.Adam([p], lr=1e-3, master_weights=None, stochastic_rounding=True)
    p.grad = torch.ones(4, dtype=torch.bfloat16)
    opt.step()
    opt.state[p]["step"] = 2 ** 24 + 1
    saved = opt.state_dict()["state"][0]["step"]
    assert saved.dtype == torch.float64 and saved.item() == 2 ** 24 + 1
    resumed = ft.Adam([torch.nn.Parameter(p.detach().clone())], lr=1e-3, master_weights=None,
                      stochastic_rounding=True)
    resumed.load_state_dict(copy.deepcopy(opt.state_dict()))
    twin = resumed.param_groups[0]["params"][0]
    assert resumed.state[twin]["step"] == 2 ** 24 + 1
    twin.grad = p.grad.clone()
    opt.step()
    resumed.step()
    assert torch.equal(twin, p)
    assert opt.state_dict()["state"][0]["step"].item() == 2 ** 24 + 2
    small = ft.Adam([torch.nn.Parameter(torch.ones(2))])
    small.param_groups[0]["params"][0].grad = torch.ones(2)
    small.step()
    assert small.state_dict()["state"][0]["step"].dtype == torch.float32  # torch's


def test_sparse_state_is_refused_and_nothing_changes():
    ours, our_opt, _, _, x, y = pair(model_name="mlp")
    train(ours, our_opt, x, y, 2)
    before = copy.deepcopy(our_opt.state_dict())
    bad = copy.deepcopy(before)
    bad["state"][1]["exp_avg"] = bad["state"][1]["exp_avg"].to_sparse()
    with pytest.raises(TypeError, match=r"'exp_avg' for param_groups\[0\]\['params'\]\[1\] "
                                        "of layout torch.sparse_coo"):
        our_opt.load_state_dict(bad)
    assert_unchanged(our_opt, before)
    weights = [p.detach().clone() for p in ours.parameters()]
    first = next(iter(ours.parameters()))
    our_opt.state[first]["exp_avg"] = torch.zeros_like(first).to_sparse()
    with pytest.raises(TypeError, match="of layout torch.sparse_coo"):
        our_opt.step()
    assert all(torch.equal(p, w) for p, w in zip(ours.parameters(), weights))


@pytest.mark.parametrize("refused", [
    lambda opt: opt.step(grad_scale=0.0),
    lambda opt: (opt.param_groups[1].update(lr=-1.0), opt.step()),
])
def test_a_refused_step_leaves_a_replaced_state_tensor_where_it_was(refused):
    # The step checks its grad_scale and every group before it takes state in: the
    # tensor set by the user stays the one in opt.state, with its values.
    ours, _, _, _, x, y = pair(model_name="mlp")
    our_opt = ft.Adam([{"params": [ours[0].weight]}, {"params": list(ours.parameters())[1:]}],
                      lr=0.01)
    train(ours, our_opt, x, y, 1)
    mine = torch.full_like(ours[0].weight, 0.5)
    our_opt.state[ours[0].weight]["exp_avg"] = mine
    before = [p.detach().clone() for p in ours.parameters()]
    with pytest.raises(ValueError, match="grad_scale|lr"):
        refused(our_opt)
    assert our_opt.state[ours[0].weight]["exp_avg"] is mine
    assert torch.equal(mine, torch.full_like(mine, 0.5))
    assert all(torch.equal(p, q) for p, q in zip(ours.parameters(), before))


def test_a_submodule_saves_only_its_own_tensors():
    model = torch.nn.Sequential(torch.nn.Linear(1000, 1000), torch.nn.Linear(1000, 5))
    opt = ft.Adam(model.parameters())
    model(torch.randn(2, 1000)).sum().backward()
    opt.step()
    buffer = io.BytesIO()
    torch.save(model[1].state_dict(), buffer)
    assert buffer.tell() < 40_000  # 5005 floats and the pickle, not the 4 MB of the first


def test_torch_compile_of_the_step_breaks_the_graph_and_runs_eagerly():
    ours, our_opt, theirs, their_opt, x, y = pair(model_name="mlp")
    compiled = torch.compile(our_opt.step)
    for _ in range(3):
        for model, opt, step in ((ours, our_opt, compiled), (theirs, their_opt, their_opt.step)):
            opt.zero_grad()
            ((model(x) - y) ** 2).mean().backward()
            step()
    assert_same_params(ours, theirs)


@pytest.mark.parametrize("name", ["Adam", "Adafactor", "LAMB"])
def test_empty_parameters_step_with_the_others(name):
    empty, full = torch.nn.Parameter(torch.zeros(0, 3)), torch.nn.Parameter(torch.ones(4, 3))
    opt = getattr(ft, name)([empty, full], lr=0.1)
    empty.grad, full.grad = torch.zeros(0, 3), torch.ones(4, 3)
    opt.step()
    assert empty.shape == (0, 3) and not torch.equal(full.detach(), torch.ones(4, 3))
    assert opt.state[empty]["step"] == 1


def test_a_new_parameter_object_in_the_group_is_taken_in():
    ours, our_opt, theirs, their_opt, x, y = pair(model_name="mlp")
    both(ours, our_opt, theirs, their_opt, x, y, 2)
    for model, opt in ((ours, our_opt), (theirs, their_opt)):
        fresh = torch.nn.Parameter(model[4].weight.detach().clone())
        model[4].weight = fresh
        opt.param_groups[0]["params"][4] = fresh
    both(ours, our_opt, theirs, their_opt, x, y, 3)
    assert_same_params(ours, theirs)


@pytest.mark.parametrize("case", ALL, ids=case_id)
def test_in_place_steps_equal_the_numpy_api_bit_for_bit(case):
    """The segment kernels over the model's tensors (one of them several chunks long, one
    empty, one transposed) give the NumPy API's bits, for every pass of every algorithm
    (Adafactor steps the transposed one through a scratch copy in C order)."""
    name, kwargs = case
    kwargs = {k: v for k, v in kwargs.items() if k != "bias_correction" or name == "Adam"}
    rng = np.random.default_rng(0)
    shapes = [(3, 5), (0,), (40_000,), (7,), (2, 3)]
    tensors = [torch.from_numpy(rng.standard_normal(s, np.float32)) for s in shapes]
    tensors[-1] = tensors[-1].t().contiguous().t()  # dense, not contiguous
    params = [torch.nn.Parameter(t.clone()) for t in tensors]
    flat = getattr(fastopt, name)([t.numpy().copy() for t in tensors], **kwargs)
    opt = getattr(ft, name)(params, **kwargs)
    for _ in range(4):
        grads = [rng.standard_normal(s, np.float32) for s in shapes]
        for p, g in zip(params, grads):
            p.grad = torch.from_numpy(g)
        opt.step()
        flat.step(grads)
    for p, expected in zip(params, flat.params):
        np.testing.assert_array_equal(p.detach().numpy(), expected)


@pytest.mark.parametrize("option, value", [("clip_grad_value", -1.0), ("clip_grad_norm", 0.0),
                                           ("skip_nonfinite", 1)])
def test_options_set_as_attributes_are_checked(option, value):
    opt = ft.Adam([torch.nn.Parameter(torch.zeros(3))])
    with pytest.raises((TypeError, ValueError), match=option):
        setattr(opt, option, value)
    assert getattr(opt, option) in (None, False)


def test_scalars_that_overflow_float32_are_refused_naming_the_hyperparameter():
    p, q = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
    opt = ft.Adam([{"params": [p]}, {"params": [q], "lr": 1e38}], lr=0.1)
    p.grad, q.grad = torch.ones(3), torch.ones(2)
    with pytest.raises(ValueError, match="lr"):
        opt.step()  # lr / (1 - beta1) is 1e39
    assert torch.equal(p.detach(), torch.ones(3)) and not opt.state[p]


@pytest.mark.parametrize("options", [{}, dict(state_dtype="int8")])
def test_entries_of_the_users_own_in_the_state_are_left_to_the_user_as_torch_leaves_them(
        options, tmp_path):
    """A wrapper may keep entries of its own in opt.state[p] (Lookahead's slow weights, a
    counter): fastopt once copied each tensor into a store of its own (a lost reference,
    and a buffer the size of the store) and refused any of another shape or dtype."""
    ours, our_opt, theirs, their_opt, x, y = pair("Adam", "mlp")
    our_opt = ft.Adam(ours.parameters(), lr=0.01, **options)
    kept = {}
    for model, opt in ((ours, our_opt), (theirs, their_opt)):
        train(model, opt, x, y, 1)
        for p in model.parameters():
            slow = p.detach().clone()
            opt.state[p].update(slow=slow, count=torch.zeros((), dtype=torch.int64),
                                mask=torch.ones_like(p, dtype=torch.bool), note="mine")
            # names fastopt gives its numbers and 8-bit state elsewhere, and no str
            opt.state[p].update({"eta": torch.ones(3), "foo": 1, "foo_absmax": torch.ones(2),
                                 "hash_codes": torch.arange(4), 3: "three"})
            kept[p] = slow

        def lookahead(t, model=model, opt=opt):
            with torch.no_grad():
                for p in model.parameters():
                    kept[p].lerp_(p, 0.5)  # through the reference, not opt.state
                    opt.state[p]["count"] += 1
        train(model, opt, x, y, 4, before_step=lookahead)
    assert_same_params(ours, theirs)
    for p, q in zip(ours.parameters(), theirs.parameters()):
        state = our_opt.state[p]
        assert state["slow"] is kept[p] and state["note"] == "mine"
        assert state["count"].dtype == torch.int64 and int(state["count"]) == 4
        assert state["mask"].dtype == torch.bool and bool(state["mask"].all())
        torch.testing.assert_close(kept[p], kept[q])
    saved = our_opt.state_dict()
    assert all(saved["state"][i]["slow"] is kept[p] for i, p in enumerate(ours.parameters()))
    theirs_saved = their_opt.state_dict()
    for i in saved["state"]:
        for key in ("eta", "foo", "foo_absmax", "hash_codes", 3):
            assert type(saved["state"][i][key]) is type(theirs_saved["state"][i][key]), key
    for source in (saved, their_opt.state_dict()):  # both ways, with the user's entries
        again = ft.Adam(ours.parameters(), lr=0.01, **options)
        again.load_state_dict(source)
        for p in ours.parameters():
            assert int(again.state[p]["count"]) == 4  # (torch's load makes "note" no str)
            assert again.state[p]["hash_codes"].shape == (4,) and again.state[p][3]
    our_opt.save(tmp_path / "ckpt")
    again = ft.Adam(ours.parameters(), lr=0.01, **options)
    again.load(tmp_path / "ckpt")
    for p in ours.parameters():
        torch.testing.assert_close(again.state[p]["slow"], kept[p], rtol=0, atol=0)


def test_parameters_that_share_memory_are_refused_naming_both_and_neighbours_step():
    """Two Parameters made of one tensor were stepped at once, in threads that raced:
    elements took one update or both (torch.optim applies both)."""
    w = torch.zeros(40)
    shared = r"\['params'\]\[0\] and .*\['params'\]\[1\] share memory"
    for a, b in ((w, w), (w[:20], w[10:30])):
        with pytest.raises(ValueError, match=shared):  # at construction
            ft.SGD([torch.nn.Parameter(a), torch.nn.Parameter(b)], lr=0.1)
    a, b = torch.nn.Parameter(w[:20]), torch.nn.Parameter(w[20:])
    opt = ft.SGD([a, b], lr=0.1)
    b.data = w[10:30]  # or since the last step
    a.grad, b.grad = torch.ones(20), torch.ones(20)
    with pytest.raises(ValueError, match=shared):
        opt.step()
    assert not w.any()
    ours, theirs = (torch.nn.Parameter(torch.zeros(40)) for _ in range(2))
    for whole, make in ((ours, ft.SGD), (theirs, torch.optim.SGD)):
        halves = [torch.nn.Parameter(whole.data[:20]), torch.nn.Parameter(whole.data[20:])]
        opt = make(halves, lr=0.1, momentum=0.9)
        for t in range(3):
            for i, p in enumerate(halves):
                p.grad = torch.full_like(p, float(i + t))
            opt.step()
    torch.testing.assert_close(ours, theirs)
    assert ours.any()


def test_a_state_dict_of_another_algorithm_is_refused_not_taken_for_the_users_own():
    ours, our_opt, theirs, their_opt, x, y = pair("SGD", "mlp", momentum=0.9)
    train(theirs, their_opt, x, y, 2)
    adam = ft.Adam(ours.parameters(), lr=0.01)
    with pytest.raises(ValueError, match="'momentum_buffer' for .*a buffer of another "
                                         "algorithm's, not of Adam's"):
        adam.load_state_dict(their_opt.state_dict())
    assert not adam.state


def _move_the_bias(opt, w, b):
    b.data = b.data.clone()


def _add_a_group(opt, w, b):
    opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(3))]})


@pytest.mark.parametrize("change", [_move_the_bias, _add_a_group])
@pytest.mark.parametrize("kwargs", [{}, dict(state_dtype="int8")], ids=["", "int8"])
def test_a_state_tensor_held_by_the_user_stays_the_state_when_the_stores_are_rebuilt(
        change, kwargs):
    """torch.optim's state tensors live for the whole run. fastopt's were replaced by
    views of the new stores when another parameter moved or a group came, so a held
    one went stale: its reads old, its writes (a reset) lost."""
    results = []
    for opt_class, options in ((torch.optim.Adam, {}), (ft.Adam, kwargs)):
        torch.manual_seed(0)
        w = torch.nn.Parameter(torch.randn(64, 80))
        b = torch.nn.Parameter(torch.randn(80))
        opt = opt_class([w, b], lr=1e-2, **options)
        w.grad, b.grad = torch.ones_like(w), torch.ones_like(b)
        opt.step()
        held = {name: opt.state[w][name] for name in opt.state[w]
                if isinstance(opt.state[w][name], torch.Tensor) and name != "step"}
        change(opt, w, b)
        w.grad, b.grad = torch.full_like(w, 2.0), torch.full_like(b, 2.0)
        opt.step()
        for name, tensor in held.items():
            assert tensor is opt.state[w][name], name
        held["exp_avg"].zero_()  # a reset through the held tensor (of 8-bit codes, too)
        opt.step()
        results.append(w.detach().clone())
    if not kwargs:
        torch.testing.assert_close(results[0], results[1], rtol=1e-6, atol=1e-6)


def test_stores_built_in_inference_mode_are_rebuilt_outside_it():
    """Inference tensors can change only in inference mode: the state tensors of a step
    taken in it are replaced, not kept, when another parameter moves after it."""
    w, b = torch.nn.Parameter(torch.zeros(4, 4)), torch.nn.Parameter(torch.zeros(4))
    opt = ft.SGD([w, b], lr=1.0, momentum=0.5)
    w.grad, b.grad = torch.ones(4, 4), torch.ones(4)
    with torch.inference_mode():
        opt.step()
    b.data = b.data.clone()
    opt.step()
    torch.testing.assert_close(w.detach(), torch.full((4, 4), -2.5))
