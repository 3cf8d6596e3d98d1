"""8-bit state in fastopt.torch (``state_dtype="int8"``): the same codes, scales and
parameters as the NumPy API's (itself tested against a float64 quantizer and against
bitsandbytes in test_int8.py), blocks in each parameter's memory order, and state_dicts
that torch.optim cannot misread: codes under their own names, a decoded export that it
loads, and its own state taken in encoded."""

import copy
import tracemalloc

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import fastopt  # noqa: E402
import fastopt.torch as ft  # noqa: E402
from fastopt.kernels import codecs  # noqa: E402

f32 = np.float32
# A tensor too small to quantize (float32 state), one of whole blocks, one with a short
# last block.
SHAPES = [(64, 100), (10,), (33, 257)]


def _params(shapes=SHAPES, seed=0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter((0.1 * torch.randn(s, generator=generator)).to(dtype))
            for s in shapes]


def _grads(shapes, steps, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return [[0.01 * torch.randn(s, generator=generator) for s in shapes] for _ in range(steps)]


def _decode64(codes, absmax, fmt):
    """map[code] * absmax in float64, per block of 256 elements in order."""
    values = {"signed8": codecs.SIGNED_MAP, "unsigned8": codecs.UNSIGNED_MAP}[fmt]
    codes = np.asarray(codes).ravel()
    scale = np.repeat(np.asarray(absmax, np.float64), 256)[:codes.size]
    return values.astype(np.float64)[codes] * scale


@pytest.mark.parametrize("name, kwargs", [
    ("AdamW", dict(lr=1e-3, weight_decay=0.01)), ("Adam", dict(lr=1e-3, amsgrad=True)),
    ("SGD", dict(lr=0.05, momentum=0.9, nesterov=True)), ("RMSprop", dict(lr=1e-3, momentum=0.5)),
    ("NAdam", {}), ("RAdam", {}), ("Adamax", {}), ("Adadelta", {}), ("Lion", dict(lr=1e-4))])
def test_the_torch_front_steps_8_bit_state_bitwise_as_the_numpy_api(name, kwargs):
    params = _params()
    opt = getattr(ft, name)(params, **kwargs, state_dtype="int8")
    twin = getattr(fastopt, name)(
        {f"p{i}": p.detach().numpy().copy() for i, p in enumerate(params)}, **kwargs,
        state_dtype="int8")
    for grads in _grads(SHAPES, 4):
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        twin.step({f"p{i}": g.numpy() for i, g in enumerate(grads)})
    for i, p in enumerate(params):
        np.testing.assert_array_equal(p.detach().numpy(), twin.params[f"p{i}"])
    kept = [k for k, v in opt.state[params[0]].items() if getattr(v, "dtype", None) == torch.uint8]
    assert kept and all(opt.state[params[0]][k + "_absmax"].shape == (25,) for k in kept)
    assert all(opt.state[params[1]][k].dtype == torch.float32 for k in kept)  # too small
    start = 6400 + 10  # the third tensor in the NumPy API's flat buffers
    for k in kept:
        np.testing.assert_array_equal(opt.state[params[2]][k].numpy().ravel(),
                                      twin.state[k][start:start + 33 * 257])


def test_blocks_run_through_each_parameters_memory_order():
    base = _params([(96, 64)])[0]
    transposed = torch.nn.Parameter(base.detach().clone().t())  # memory order: base's
    assert not transposed.is_contiguous()
    opt = ft.Adam([transposed], lr=1e-2, state_dtype="int8")
    twin = fastopt.Adam([base.detach().numpy().copy()], lr=1e-2, state_dtype="int8")
    for grads in _grads([(96, 64)], 3):
        transposed.grad = grads[0].clone().t()
        opt.step()
        twin.step([grads[0].numpy()])
    np.testing.assert_array_equal(transposed.detach().t().numpy(), twin.params[0])
    np.testing.assert_array_equal(opt.state[transposed]["exp_avg"].t().numpy(),
                                  twin.state["exp_avg"].reshape(96, 64))
    np.testing.assert_array_equal(opt.state[transposed]["exp_avg_absmax"].numpy(),
                                  twin.state["exp_avg_absmax"])


def test_bfloat16_parameters_with_8_bit_state_and_remainders_step_as_the_numpy_api():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    params = _params(dtype=torch.bfloat16)
    opt = ft.AdamW(params, lr=1e-2, state_dtype="int8", master_weights="remainder")
    twin = fastopt.AdamW([p.detach().float().numpy().astype(ml_dtypes.bfloat16) for p in params],
                         lr=1e-2, state_dtype="int8", master_weights="remainder")
    for grads in _grads(SHAPES, 3):
        for p, g in zip(params, grads):
            p.grad = g.to(torch.bfloat16)
        opt.step()
        twin.step([g.to(torch.bfloat16).float().numpy().astype(ml_dtypes.bfloat16) for g in grads])
    for p, q in zip(params, twin.params):
        np.testing.assert_array_equal(p.detach().view(torch.int16).numpy(),
                                      q.view(np.int16))


def test_the_torch_front_follows_bitsandbytes_adam8bit():
    bnb = pytest.importorskip("bitsandbytes")
    shapes = [(1024, 32), (1024, 257)]
    ours, theirs = _params(shapes, seed=2), _params(shapes, seed=2)
    start = torch.cat([p.detach().reshape(-1) for p in ours])
    opt = ft.Adam(ours, lr=1e-3, state_dtype="int8")
    their_opt = bnb.optim.Adam8bit(theirs, lr=1e-3)
    for grads in _grads(shapes, 2, seed=3):
        for p, q, g in zip(ours, theirs, grads):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step(), their_opt.step()
    a = torch.cat([p.detach().reshape(-1) for p in ours])
    b = torch.cat([p.detach().reshape(-1) for p in theirs])
    assert (a - b).abs().mean().item() < 1e-6
    assert (a - start).abs().mean().item() > 1e-4  # both moved by far more


def _step_side_by_side(first, second, ours, theirs, shapes, seed):
    """Two steps of ``first`` over ``ours`` and of ``second`` over ``theirs`` with the
    same gradients, after which the parameters must be equal."""
    for grads in _grads(shapes, 2, seed=seed):
        for p, q, g in zip(ours, theirs, grads):
            p.grad, q.grad = g.clone(), g.clone()
        first.step(), second.step()
    for p, q in zip(ours, theirs):
        assert torch.equal(p, q)


def _trained(steps=3, **options):
    params = _params()
    opt = ft.AdamW(params, lr=1e-2, state_dtype="int8", **options)
    for grads in _grads(SHAPES, steps):
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
    return params, opt


def test_the_state_dict_keeps_codes_under_names_torch_optim_refuses():
    params, opt = _trained()
    saved = opt.state_dict()["state"]
    assert set(saved[0]) == {"step", "exp_avg_codes", "exp_avg_absmax", "exp_avg_sq_codes",
                             "exp_avg_sq_absmax", "codes_strides"}
    assert saved[0]["codes_strides"].tolist() == [100, 1]
    assert saved[0]["exp_avg_codes"].dtype == torch.uint8
    assert set(saved[1]) == {"step", "exp_avg", "exp_avg_sq"}  # small: float32 values
    theirs = torch.optim.AdamW(params, lr=1e-2)
    theirs.load_state_dict(opt.state_dict())
    for p, g in zip(params, _grads(SHAPES, 1)[0]):
        p.grad = g
    with pytest.raises(KeyError, match="exp_avg"):
        theirs.step()


def test_the_decoded_state_dict_is_torch_optims_and_resumes_there():
    params, opt = _trained()
    decoded = opt.decoded_state_dict()
    for index, p in enumerate(params):
        state = decoded["state"][index]
        assert set(state) == {"step", "exp_avg", "exp_avg_sq"}
        for name, fmt in (("exp_avg", "signed8"), ("exp_avg_sq", "unsigned8")):
            if p.numel() < 4096:
                np.testing.assert_array_equal(state[name].numpy(), opt.state[p][name].numpy())
                continue
            expected = _decode64(opt.state[p][name].numpy(), opt.state[p][name + "_absmax"], fmt)
            np.testing.assert_allclose(state[name].numpy().ravel(), expected, rtol=1e-6, atol=0)
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    theirs = torch.optim.AdamW(copies, lr=1e-2)
    theirs.load_state_dict(copy.deepcopy(decoded))  # as from a file: live views, as in torch
    grads = _grads(SHAPES, 1, seed=9)[0]
    for p, q, g in zip(params, copies, grads):
        p.grad, q.grad = g.clone(), g.clone()
    opt.step(), theirs.step()
    for p, q in zip(params, copies):  # within the 8-bit encoding's error of one step
        torch.testing.assert_close(p, q, atol=1e-4, rtol=0)


def test_the_decoded_state_of_a_transposed_parameter_is_torch_optims_in_its_shape():
    # Its codes lie in the parameter's memory order (columns here), which the export
    # decodes in; read in logical order, they came out up to 1.85 of a column's largest
    # away from torch's.
    generator = torch.Generator().manual_seed(0)
    w = torch.nn.Parameter(torch.randn(40, 600, generator=generator).t())  # strides (1, 600)
    ref = torch.nn.Parameter(w.detach().clone())
    opt = ft.Adam([w], lr=1e-3, state_dtype="int8")
    theirs = torch.optim.Adam([ref], lr=1e-3)
    for _ in range(3):  # columns of scales from 1e-3 to 10
        g = torch.randn(600, 40, generator=generator) * torch.logspace(-3, 1, 40)
        w.grad, ref.grad = g.clone(), g.clone()
        opt.step(), theirs.step()
    decoded = opt.decoded_state_dict()["state"][0]
    for name in ("exp_avg", "exp_avg_sq"):
        exact = theirs.state[ref][name]
        assert decoded[name].shape == exact.shape
        assert ((decoded[name] - exact).abs() / exact.abs().amax(0)).max() < 0.05


def test_torch_optims_state_dict_loads_encoded():
    params = _params()
    theirs = torch.optim.AdamW(params, lr=1e-2)
    for grads in _grads(SHAPES, 2):
        for p, g in zip(params, grads):
            p.grad = g.clone()
        theirs.step()
    opt = ft.AdamW(params, lr=1e-2, state_dtype="int8")
    opt.load_state_dict(theirs.state_dict())
    big = params[0]
    exact = theirs.state[big]["exp_avg"].numpy().ravel().astype(np.float64)
    decoded = _decode64(opt.state[big]["exp_avg"].numpy(), opt.state[big]["exp_avg_absmax"],
                        "signed8")
    # Each block's scale is the smallest that the map's range [-0.993, 1] holds it in.
    blocks = exact.reshape(-1, 256)
    absmax = np.maximum(blocks.max(axis=1).clip(0),
                        -blocks.min(axis=1).clip(max=0) / -float(codecs.SIGNED_MAP[0]))
    assert (absmax > np.abs(blocks).max(axis=1)).any()  # where the extreme is negative
    np.testing.assert_allclose(opt.state[big]["exp_avg_absmax"].numpy(), absmax, rtol=1e-7)
    gap = np.diff(codecs.SIGNED_MAP.astype(np.float64)).max()  # the widest, near 1
    assert np.all(np.abs(decoded - exact) <= np.repeat(absmax, 256) * gap / 2 * 1.0001)
    assert opt.state[params[1]]["exp_avg"].dtype == torch.float32
    np.testing.assert_array_equal(opt.state[params[1]]["exp_avg"].numpy(),
                                  theirs.state[params[1]]["exp_avg"].numpy())
    assert opt.state[big]["step"] == 2


def test_torch_optims_momentum_near_float32s_largest_loads_with_a_finite_scale():
    # Fitted to the signed map's -0.993, a block's scale overflowed to NaN: after the
    # load, every parameter of the block stepped to NaN, where torch.optim's stayed finite.
    params = _params([(33, 257)])
    theirs = torch.optim.SGD(params, lr=1e-2, momentum=0.9)
    params[0].grad = 0.01 * torch.ones(33, 257)
    theirs.step()
    saved = theirs.state_dict()
    saved["state"][0]["momentum_buffer"].view(-1)[300] = -3.4e38
    opt = ft.SGD(params, lr=1e-2, momentum=0.9, state_dtype="int8")
    opt.load_state_dict(saved)
    theirs.load_state_dict(saved)
    before = params[0].detach().clone()
    opt.step()
    ours = params[0].detach().clone()
    params[0].data.copy_(before)
    theirs.step()
    assert torch.isfinite(ours).all() and torch.isfinite(params[0]).all()
    # within 8 bits of torch's momentum: -0.993 of float32's largest, and beside it the
    # others' 0 (at most 0.9 * lr * g from torch's)
    expected = params[0].detach().view(-1)
    torch.testing.assert_close(ours.view(-1)[300], expected[300], atol=0, rtol=0.01)
    torch.testing.assert_close(ours.view(-1)[256:300], expected[256:300], atol=1e-4, rtol=0)


def test_a_full_torch_optim_checkpoint_loads_through_set_optimizer_state_dict():
    """torch.distributed.checkpoint's full_state_dict load puts the checkpoint's values
    beside the optimizer's own codes (it merges them into the optimizer's state_dict):
    the values are what it loads, as load_state_dict encodes them."""
    dcp = pytest.importorskip("torch.distributed.checkpoint.state_dict")
    full = dcp.StateDictOptions(full_state_dict=True)
    models = []
    for _ in range(3):
        torch.manual_seed(0)
        models.append(torch.nn.Linear(128, 64))  # weight: 8192 elements, in 8 bits
    theirs = torch.optim.Adam(models[0].parameters(), lr=0.01)
    for t in range(3):
        theirs.zero_grad()
        models[0](torch.randn(16, 128, generator=torch.Generator().manual_seed(t))
                  ).square().mean().backward()
        theirs.step()
    saved = dcp.get_optimizer_state_dict(models[0], theirs, options=full)
    through, direct = (ft.Adam(m.parameters(), lr=0.01, state_dtype="int8")
                       for m in models[1:])
    for m, opt in ((models[1], through), (models[2], direct)):  # state to merge into
        m(torch.randn(2, 128)).sum().backward()
        opt.step()
    dcp.set_optimizer_state_dict(models[1], through, saved, options=full)
    direct.load_state_dict(theirs.state_dict())
    for p, q in zip(models[1].parameters(), models[2].parameters()):
        for name in ("exp_avg", "exp_avg_sq", "exp_avg_absmax", "exp_avg_sq_absmax"):
            if name in direct.state[q]:
                assert torch.equal(through.state[p][name], direct.state[q][name]), name
        assert through.state[p]["step"] == 3
    assert through.state[models[1].weight]["exp_avg_absmax"].abs().max() > 0


def test_a_fastopt_state_dict_resumes_bitwise_in_int8_and_decoded_in_float32():
    params, opt = _trained()
    saved = opt.state_dict()
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    resumed = ft.AdamW(copies, lr=1e-2, state_dtype="int8")
    resumed.load_state_dict(saved)
    plain = ft.AdamW([torch.nn.Parameter(p.detach().clone()) for p in params], lr=1e-2)
    plain.load_state_dict(saved)  # a float32 optimizer decodes the codes
    big = plain.param_groups[0]["params"][0]
    np.testing.assert_array_equal(plain.state[big]["exp_avg"].numpy(),
                                  opt.decoded_state_dict()["state"][0]["exp_avg"].numpy())
    _step_side_by_side(opt, resumed, params, copies, SHAPES, seed=5)
    for p, q in zip(params, copies):
        for name in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(opt.state[p][name], resumed.state[q][name])


def test_replaced_state_values_are_encoded_and_bad_codes_refused():
    params, opt = _trained(steps=1)
    big = params[0]
    opt.state[big]["exp_avg"] = torch.zeros_like(big)
    for p, g in zip(params, _grads(SHAPES, 1, seed=7)[0]):
        p.grad = g
    opt.step()  # from exp_avg 0: the first moment is (1 - beta1) g, encoded
    exact = (0.1 * big.grad.double()).numpy().ravel()
    decoded = _decode64(opt.state[big]["exp_avg"].numpy(), opt.state[big]["exp_avg_absmax"],
                        "signed8")
    np.testing.assert_allclose(opt.state[big]["exp_avg_absmax"].numpy(),
                               np.abs(exact.reshape(-1, 256)).max(axis=1), rtol=1e-6)
    assert np.abs(decoded - exact).max() <= 0.05 * np.abs(exact).max()

    before = [p.detach().clone() for p in params]
    saved = opt.state_dict()
    del saved["state"][0]["exp_avg_absmax"]
    for target in (ft.AdamW(params, lr=1e-2, state_dtype="int8"),
                   ft.AdamW(params, lr=1e-2)):  # which would decode them
        with pytest.raises(ValueError, match="'exp_avg_codes' of torch.uint8 .* with "
                                             "'exp_avg_absmax' of None"):
            target.load_state_dict(saved)
    # Codes that went through torch.optim's load come back as floats: refused.
    theirs = torch.optim.AdamW(params, lr=1e-2)
    theirs.load_state_dict(opt.state_dict())
    cast = theirs.state_dict()
    assert cast["state"][0]["exp_avg_codes"].dtype == torch.float32
    for target in (ft.AdamW(params, lr=1e-2, state_dtype="int8"), ft.AdamW(params, lr=1e-2)):
        with pytest.raises(ValueError, match="codes are uint8 .*a torch.optim load casts"):
            target.load_state_dict(cast)
    saved = opt.state_dict()
    flipped = saved["state"][0]["exp_avg_absmax"].clone()  # not the live scales
    flipped[2] *= -1  # which would flip the signs of a block's values
    saved["state"][0]["exp_avg_absmax"] = flipped
    for target in (ft.AdamW(params, lr=1e-2, state_dtype="int8"), ft.AdamW(params, lr=1e-2)):
        with pytest.raises(ValueError, match="negative block scales in 'exp_avg_absmax'"):
            target.load_state_dict(saved)
    saved = opt.state_dict()
    saved["state"][0]["codes_strides"] = torch.tensor([1, 1])
    with pytest.raises(ValueError, match="no dense layout"):
        ft.AdamW(params, lr=1e-2, state_dtype="int8").load_state_dict(saved)
    # Pieces of another kind, which torch's own errors did not name (or a cast took):
    # each refused, naming the key and the parameter's index.
    for key, value, message in [
            ("codes_strides", torch.tensor([100.0, 1.0]), "'codes_strides' for parameter 0 "
                                                          "of dtype torch.float32"),
            ("exp_avg_absmax", lambda v: v.to(torch.complex64), "block scales are real"),
            ("exp_avg_absmax", lambda v: v.numpy(), "'exp_avg_absmax' for parameter 0 of "
                                                   "type ndarray, not a tensor"),
            ("exp_avg_codes", lambda v: v.numpy(), "'exp_avg_codes' for parameter 0 of "
                                                  "type ndarray, not a tensor")]:
        saved = opt.state_dict()
        saved["state"][0][key] = value(saved["state"][0][key]) if callable(value) else value
        for target in (ft.AdamW(params, lr=1e-2, state_dtype="int8"),
                       ft.AdamW(params, lr=1e-2)):
            with pytest.raises(TypeError, match=message):
                target.load_state_dict(saved)
    codes = opt.state[big]["exp_avg"]
    opt.state[big]["exp_avg"] = torch.zeros(5, 5)
    with pytest.raises(ValueError, match="needs shape"):
        opt.step()
    opt.state[big]["exp_avg"] = torch.zeros(big.shape, dtype=torch.int32)
    with pytest.raises(TypeError, match="torch.uint8"):
        opt.step()
    flipped = opt.state[big]["exp_avg_absmax"].clone()
    flipped[1] *= -1  # which would flip the signs of a block's values, as a load would
    opt.state[big]["exp_avg"], opt.state[big]["exp_avg_absmax"] = codes, flipped
    with pytest.raises(ValueError, match="'exp_avg_absmax' .* negative block scales"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(params, before))


def test_values_put_in_before_a_step_are_saved_as_values_and_load_as_the_step_would():
    # A float tensor put in the place of 8-bit state is encoded by the next step; a
    # state_dict taken before it saved the floats as codes, beside the old scales,
    # which no load took and decoded_state_dict() failed on.
    params, opt = _trained(steps=2)
    big = params[0]
    opt.state[big]["exp_avg"] = torch.full_like(big, 0.25)
    saved, decoded = opt.state_dict(), opt.decoded_state_dict()
    assert "exp_avg_codes" not in saved["state"][0] and "exp_avg_absmax" not in saved["state"][0]
    assert torch.equal(decoded["state"][0]["exp_avg"], torch.full_like(big, 0.25))
    loaded = ft.AdamW([p.detach().clone().requires_grad_() for p in params], lr=1e-2,
                      state_dtype="int8")
    loaded.load_state_dict(saved)
    grads = _grads(SHAPES, 1, seed=5)[0]
    for ps, o in ((params, opt), (list(loaded.param_groups[0]["params"]), loaded)):
        for p, g in zip(ps, grads):
            p.grad = g.clone()
        o.step()
    theirs = loaded.param_groups[0]["params"]
    assert all(torch.equal(p, q) for p, q in zip(params, theirs))
    assert torch.equal(opt.state[big]["exp_avg"], loaded.state[theirs[0]]["exp_avg"])


def test_a_skipped_step_leaves_codes_and_scales_bit_identical():
    params, opt = _trained(skip_nonfinite=True)
    kept = {k: v.clone() for k, v in opt.state[params[0]].items() if isinstance(v, torch.Tensor)}
    for p, g in zip(params, _grads(SHAPES, 1, seed=8)[0]):
        p.grad = g
    params[2].grad[0, 0] = float("inf")
    opt.step()
    assert opt.skipped_steps == 1
    for k, v in kept.items():
        assert torch.equal(opt.state[params[0]][k], v)


def test_a_parameter_that_changes_layout_keeps_its_8_bit_state_decoded_the_same():
    params, opt = _trained(skip_nonfinite=True)
    big = params[0]
    before = opt.decoded_state_dict()["state"][0]["exp_avg"].clone()
    big.data = big.data.t().contiguous().t()  # the same values, column-major
    for p, g in zip(params, _grads(SHAPES, 1, seed=4)[0]):
        p.grad = g
    params[1].grad[0] = float("nan")  # a skipped step: the state moves, and nothing else
    opt.step()
    assert opt.skipped_steps == 1
    assert opt.state[big]["exp_avg"].stride() == big.stride() == (1, 64)
    after = opt.decoded_state_dict()["state"][0]["exp_avg"]
    # Encoded again in the new blocks (columns of 256): within a step of the map.
    assert (after - before).abs().max().item() <= 0.03 * before.abs().max().item()
    assert (after - before).abs().max().item() > 0  # the blocks did change


def test_groups_and_parameters_without_gradients_step_their_own_blocks():
    """Runs of parameters (a group's, split where one has no gradient) step exactly the
    blocks of their parameters: as optimizers of one parameter each do."""
    shapes = [(64, 100), (20, 300), (10,), (33, 257)]
    params, alone = _params(shapes), _params(shapes)
    opt = ft.Adam([{"params": params[:3], "lr": 1e-2}, {"params": params[3:], "lr": 1e-3}],
                  state_dtype="int8")
    singles = [ft.Adam([p], lr=1e-2 if i < 3 else 1e-3, state_dtype="int8")
               for i, p in enumerate(alone)]
    for step, grads in enumerate(_grads(shapes, 4)):
        for i, (p, q, g) in enumerate(zip(params, alone, grads)):
            skipped = i == 1 and step % 2 == 1  # a hole in the first group's run
            p.grad = None if skipped else g.clone()
            q.grad = None if skipped else g.clone()
        opt.step()
        for single, q in zip(singles, alone):
            if q.grad is not None:
                single.step()
    for p, q, single in zip(params, alone, singles):
        assert torch.equal(p, q)
        for name in ("exp_avg", "exp_avg_sq", "exp_avg_absmax", "exp_avg_sq_absmax"):
            if name in single.state[q]:
                assert torch.equal(opt.state[p][name], single.state[q][name]), name


def test_what_runs_keep_for_their_next_steps_is_forgotten_where_gradients_come_and_go():
    # Each run of parameters with gradients keeps its tables and block rows. With a
    # different parameter lacking its gradient at every step (experts no token reached),
    # they piled up: 2.0 times the model's 8-bit state in 120 steps of this pattern.
    params = [torch.nn.Parameter(torch.randn(2 ** 16)) for _ in range(60)]
    grads = [torch.ones_like(p) for p in params]
    opt = ft.Adam(params, lr=1e-3, state_dtype="int8")

    def step(missing):
        for i, (p, g) in enumerate(zip(params, grads)):
            p.grad = None if i == missing % len(params) else g
        opt.step()
    step(0)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for missing in range(1, 2 * len(params)):
            step(missing)
        grew = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    state_bytes = 2 * sum(p.numel() for p in params)
    assert grew < 0.25 * state_bytes, grew / state_bytes


def test_a_deep_copy_steps_on_with_its_own_8_bit_state():
    params, opt = _trained()
    twin = copy.deepcopy(opt)
    twin_params = twin.param_groups[0]["params"]
    for p, q, g in zip(params, twin_params, _grads(SHAPES, 1, seed=6)[0]):
        p.grad, q.grad = g.clone(), g.clone()
    opt.step(), twin.step()
    for p, q in zip(params, twin_params):
        assert torch.equal(p, q) and p.data_ptr() != q.data_ptr()
        assert torch.equal(opt.state[p]["exp_avg"], twin.state[q]["exp_avg"])
    assert twin.state[twin_params[0]]["exp_avg"].data_ptr() != \
        opt.state[params[0]]["exp_avg"].data_ptr()


def test_codes_copied_into_another_layout_still_meet_their_scales():
    """A transposed parameter's codes run through its memory order; saved contiguous (as
    safetensors saves them), they load as they were kept, by the saved strides."""
    shapes = [(64, 96), *SHAPES[1:]]
    params = [torch.nn.Parameter(0.1 * torch.randn(96, 64).t())] + _params()[1:]
    opt = ft.Adam(params, lr=1e-2, state_dtype="int8")
    for grads in _grads(shapes, 2):
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
    decoded = opt.decoded_state_dict()["state"][0]["exp_avg"].clone()
    saved = opt.state_dict()
    for state in saved["state"].values():
        for key, value in state.items():
            state[key] = value.contiguous()
    assert saved["state"][0]["exp_avg_codes"].is_contiguous()
    plain = ft.Adam([torch.nn.Parameter(p.detach().clone()) for p in params], lr=1e-2)
    plain.load_state_dict(copy.deepcopy(saved))  # decoded by the saved strides
    assert torch.equal(plain.state[plain.param_groups[0]["params"][0]]["exp_avg"], decoded)
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    assert copies[0].stride() == params[0].stride() == (1, 64)
    resumed = ft.Adam(copies, lr=1e-2, state_dtype="int8")
    resumed.load_state_dict(saved)
    _step_side_by_side(opt, resumed, params, copies, shapes, seed=3)


@pytest.mark.parametrize("name, option, match", [
    ("AdamW", "caution", "caution=True takes two passes"),
    ("RMSprop", "centered", "centered=True subtracts grad_avg squared")])
def test_options_8_bit_state_cannot_step_are_refused_before_any_write(name, option, match):
    params = _params()
    with pytest.raises(ValueError, match=match):
        getattr(ft, name)(params, lr=1e-3, state_dtype="int8", **{option: True})
    opt = getattr(ft, name)(params, lr=1e-3, state_dtype="int8")
    with pytest.raises(ValueError, match=match):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(5000))], option: True})
    assert len(opt.param_groups) == 1
    opt.param_groups[0][option] = True  # as a schedule may set it
    for p, g in zip(params, _grads(SHAPES, 1)[0]):
        p.grad = g
    before = [p.detach().clone() for p in params]
    with pytest.raises(ValueError, match=match):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(params, before)) and not opt.state


def test_scales_are_float32_whatever_torchs_default_dtype():
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        params = [torch.nn.Parameter(p.detach().float()) for p in _params()]
        opt = ft.Adam(params, lr=1e-2, state_dtype="int8")
        for p, g in zip(params, _grads(SHAPES, 1)[0]):
            p.grad = g.float()
        opt.step()
    finally:
        torch.set_default_dtype(default)
    assert opt.state[params[0]]["exp_avg_absmax"].dtype == torch.float32
    assert opt.state[params[1]]["exp_avg"].dtype == torch.float32
