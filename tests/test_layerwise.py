"""The per-tensor ("layer-wise") optimizers LAMB, LARS and Adafactor: many tensors of
any shape against the float64 references, Adafactor against torch.optim.Adafactor
(parameters and factored state), the deterministic segmented reduction they share,
parameter groups, adopted buffers, the non-finite skip, gradient clipping and
checkpoints."""

import math

import numba
import numpy as np
import pytest

import fastopt
import reference
from cases import CASES, case_id
from conftest import assert_unchanged, snapshot
from fastopt._backend import SEGMENT_CHUNK, HostBackend, segment_chunks
from fastopt.kernels import Pass, cpu, rules
from fastopt.optim import engine

f32 = np.float32
RTOL = ATOL = 2e-5  # float32 against float64 after 30 steps (see test_cpu_vs_reference)
STEPS = 30

# A vector, a 0-d, a matrix, a 3-d, an empty, a single row and a single column, a vector
# longer than a chunk and not a multiple of it, and a matrix larger than a chunk.
SHAPES = [(7,), (), (33, 17), (2, 5, 6), (0, 4), (1, 9), (9, 1), (20011,), (130, 140)]
assert 20011 > SEGMENT_CHUNK and 20011 % SEGMENT_CHUNK and 130 * 140 > SEGMENT_CHUNK
# torch.optim.Adafactor divides by a tensor's size: no empty tensors for it.
TORCH_SHAPES = [s for s in SHAPES if math.prod(s)]

LAYERWISE_CASES = [(name, kwargs) for name in ("LAMB", "LARS", "Adafactor")
                   for kwargs in CASES[name]]


def sizes(shapes):
    return [math.prod(s) for s in shapes]


def make_params(seed, shapes):
    """float32 tensors whose scales differ from tensor to tensor (0.1 to 10), so that
    per-tensor norms and ratios differ from whole-buffer ones."""
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal(s) * 10.0 ** rng.uniform(-1, 1)).astype(f32)
            for s in shapes]


def make_grads(seed, shapes, steps=STEPS):
    """Flat float32 gradients: every step has its own overall scale 10**k (k in -2..2)
    and every tensor a fixed scale of its own. A bias (+0.5) gives them a consistent
    direction, so that even a 0-d tensor, whose LARS step is ±1e-3 of its size, drifts
    instead of walking randomly around where it started."""
    rng = np.random.default_rng(seed)
    tensor_scale = np.repeat(10.0 ** rng.uniform(-1, 1, len(shapes)), sizes(shapes))
    n = sum(sizes(shapes))
    return [((rng.standard_normal(n) + 0.5) * tensor_scale * 10.0 ** rng.integers(-2, 3)).astype(f32)
            for _ in range(steps)]


def flat(arrays):
    return np.concatenate([np.ravel(a) for a in arrays]) if arrays else np.zeros(0, f32)


def run_reference(name, shapes, kwargs, p0, grads):
    ref = getattr(reference, name)(shapes, **kwargs)
    p = p0.astype(np.float64)
    for g in grads:
        p = ref.step(p, g.astype(np.float64))
    return p, ref


def train(opt, grads):
    for g in grads:
        opt.step(g)
    return opt


# -- 1. every option, many shapes, against the float64 references ----------------------


@pytest.mark.parametrize("case", LAYERWISE_CASES, ids=case_id)
def test_many_tensors_match_reference(case):
    name, kwargs = case
    params, grads = make_params(1, SHAPES), make_grads(2, SHAPES)
    p0 = flat(params)
    opt = train(getattr(fastopt, name)(params, **kwargs), grads)
    expected, _ = run_reference(name, SHAPES, kwargs, p0, grads)
    np.testing.assert_allclose(opt.flat_params, expected, rtol=RTOL, atol=ATOL)
    assert opt.state["step"] == STEPS
    # The test can fail: the parameters moved far beyond the tolerance.
    assert np.abs(expected - p0).max() > 4 * ATOL
    # Tensor by tensor, on each tensor's own scale (its RMS, 0.1 to 10 here): a small
    # tensor is held to a tighter tolerance than the whole buffer's, and moved beyond it.
    for (start, stop) in zip(np.cumsum([0] + sizes(SHAPES))[:-1], np.cumsum(sizes(SHAPES))):
        if stop > start:
            scale = np.sqrt(np.mean(p0[start:stop].astype(np.float64) ** 2))
            np.testing.assert_allclose(opt.flat_params[start:stop], expected[start:stop],
                                       rtol=RTOL, atol=RTOL * scale)
            assert np.abs(expected[start:stop] - p0[start:stop]).max() > 4 * RTOL * scale


@pytest.mark.parametrize("name", ["LAMB", "LARS", "Adafactor"])
def test_per_tensor_differs_from_one_tensor(name):
    """The shapes matter: the reference over the real tensors and the one treating the
    buffer as a single tensor disagree by far more than the tolerance, so the
    comparisons above would catch norms taken over the wrong span."""
    kwargs = CASES[name][1]
    params, grads = make_params(1, SHAPES), make_grads(2, SHAPES, steps=5)
    p0 = flat(params)
    per_tensor, _ = run_reference(name, SHAPES, kwargs, p0, grads)
    whole, _ = run_reference(name, [(p0.size,)], kwargs, p0, grads)
    assert np.abs(per_tensor - whole).max() > 100 * ATOL
    opt = train(getattr(fastopt, name)(params, **kwargs), grads)
    np.testing.assert_allclose(opt.flat_params, per_tensor, rtol=RTOL, atol=ATOL)


# -- 2. Adafactor against torch.optim.Adafactor, parameters and state ------------------


def state_part(opt, name, index, shapes):
    """Tensor ``index``'s part of the state buffer ``name`` in its own shape (torch's),
    or None where it has none."""
    shape = opt.state_shape(name, shapes[index])
    if shape is None:
        return None
    start = engine.state_layout(opt, name, shapes)[0][index]
    return opt.state[name][start:start + math.prod(shape)].reshape(shape)



@pytest.mark.parametrize("kwargs", CASES["Adafactor"], ids=lambda k: case_id(("Adafactor", k)))
def test_adafactor_matches_torch(kwargs):
    torch = pytest.importorskip("torch")
    params, grads = make_params(3, TORCH_SHAPES), make_grads(4, TORCH_SHAPES)
    opt = fastopt.Adafactor(params, **kwargs)
    tensors = [torch.tensor(p, requires_grad=True) for p in params]
    torch_opt = torch.optim.Adafactor(tensors, foreach=False, **kwargs)
    offsets = np.cumsum([0] + [math.prod(s) for s in TORCH_SHAPES])
    layout = list(zip(offsets, TORCH_SHAPES))
    for g in grads:
        opt.step(g)
        for t, (offset, shape) in zip(tensors, layout):
            t.grad = torch.from_numpy(g[offset:offset + math.prod(shape)].reshape(shape).copy())
        torch_opt.step()
    torch_flat = flat([t.detach().numpy() for t in tensors])
    np.testing.assert_allclose(opt.flat_params, torch_flat, rtol=1e-5, atol=1e-5)
    assert np.abs(torch_flat - flat(params)).max() > 4e-5

    compared = set()
    for index, (t, shape) in enumerate(zip(tensors, TORCH_SHAPES)):
        torch_state = torch_opt.state[t]
        for name in ("row_var", "col_var", "variance"):
            ours = state_part(opt, name, index, TORCH_SHAPES)
            if name not in torch_state:
                assert ours is None, (name, shape)
                continue
            expected = torch_state[name].numpy()
            assert ours.shape == expected.shape, (name, shape)
            np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=0,
                                       err_msg=f"{name} of {shape}")
            assert np.all(expected > 0)  # a real comparison, not of zeros
            compared.add(name)
    assert compared == {"row_var", "col_var", "variance"}


# -- 3. Adafactor's state is factored ---------------------------------------------------


def test_adafactor_state_is_factored():
    params = make_params(5, [(300, 200), (50,)])
    opt = fastopt.Adafactor(params)
    opt.step(make_grads(6, [(300, 200), (50,)], steps=1)[0])
    assert opt.state["row_var"].size == 300
    assert opt.state["col_var"].size == 200
    assert opt.state["variance"].size == 50
    # No other state buffer of the parameters' size was kept either.
    assert all(value.size <= 300 for value in opt.state.values() if hasattr(value, "size"))
    shapes = [(300, 200), (50,)]
    for name, index, shape in [("row_var", 0, (300, 1)), ("col_var", 0, (1, 200)),
                               ("variance", 1, (50,))]:
        assert state_part(opt, name, index, shapes).shape == shape
        assert state_part(opt, name, 1 - index, shapes) is None


# -- 4. parameter groups ------------------------------------------------------------------


def test_lamb_groups_match_independent_references():
    shapes_a, shapes_b = [(20011,), (3, 4), ()], [(130, 140), (5,)]
    kwargs_a, kwargs_b = dict(lr=0.01, weight_decay=0.1), dict(lr=0.003, weight_decay=0.0)
    params_a, params_b = make_params(7, shapes_a), make_params(8, shapes_b)
    grads = make_grads(9, shapes_a + shapes_b)
    opt = fastopt.LAMB([dict(params=params_a, **kwargs_a), dict(params=params_b, **kwargs_b)])
    train(opt, grads)
    n = sum(sizes(shapes_a))
    expected_a, _ = run_reference("LAMB", shapes_a, kwargs_a, flat(params_a), [g[:n] for g in grads])
    expected_b, _ = run_reference("LAMB", shapes_b, kwargs_b, flat(params_b), [g[n:] for g in grads])
    np.testing.assert_allclose(opt.flat_params[:n], expected_a, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(opt.flat_params[n:], expected_b, rtol=RTOL, atol=ATOL)
    # The groups' settings differ enough to tell them apart.
    swapped, _ = run_reference("LAMB", shapes_b, kwargs_a, flat(params_b), [g[n:] for g in grads])
    assert np.abs(swapped - expected_b).max() > 4 * ATOL


# -- 5. the segmented reduction -------------------------------------------------------------


def segment_bounds(seed):
    """Segments of a buffer, in order, with empty ones, ones longer than a chunk (one an
    exact multiple of it) and gaps between some (elements in no segment)."""
    rng = np.random.default_rng(seed)
    C = SEGMENT_CHUNK
    lengths = [0, 5, C + 1, 0, 1, 3 * C, 2 * C + 777, 0, 100, C - 1, C]
    lengths += list(rng.integers(0, 3000, 12)) + [0]
    rng.shuffle(lengths)
    bounds, at = [], 0
    for length in lengths:
        at += int(rng.integers(0, 3)) * int(rng.integers(0, 50))  # a gap, sometimes
        bounds.append((at, at + int(length)))
        at += int(length)
    return bounds, at + 13


def test_chunks_cover_the_segments():
    bounds, _ = segment_bounds(10)
    draws = np.arange(len(bounds)) * 1000
    chunks = segment_chunks([b - a for a, b in bounds], draws)
    assert chunks.dtype == np.int64
    segment, offset, size, draw = chunks.T
    np.testing.assert_array_equal(draw, draws[segment] + offset)
    assert np.all(size > 0) and np.all(size <= SEGMENT_CHUNK)
    assert np.all(np.diff(segment) >= 0)  # in segment order
    for index, (start, stop) in enumerate(bounds):
        mine = segment == index
        assert mine.sum() == -(-(stop - start) // SEGMENT_CHUNK)
        if mine.any():  # contiguous, in order, exactly the segment
            assert offset[mine][0] == 0 and offset[mine][-1] + size[mine][-1] == stop - start
            np.testing.assert_array_equal(offset[mine][1:], (offset + size)[mine][:-1])


@pytest.mark.parametrize("row", [1, 7, 500, SEGMENT_CHUNK, SEGMENT_CHUNK + 3, 3 * SEGMENT_CHUNK])
def test_chunks_begin_at_every_row_where_rows_are_given(row):
    """The chunks of sums over tensors that other ranks may cut between rows (FSDP2):
    each lies in one row, they cover the segment in order, and a segment that begins at
    a row of a longer one gets that one's chunks from there on, as another rank does."""
    rows_of = [3, 5, 0, 2]
    sizes = [count * row for count in rows_of]
    chunks = segment_chunks(sizes, np.zeros(len(sizes), np.int64), [row] * len(sizes))
    segment, offset, size, _ = chunks.T
    assert np.all(size > 0) and np.all(size <= SEGMENT_CHUNK)
    assert np.all(offset // row == (offset + size - 1) // row)  # within a row
    for index, n in enumerate(sizes):
        mine = segment == index
        assert mine.sum() == rows_of[index] * -(-row // SEGMENT_CHUNK)
        expected = np.arange(n)  # each element once, in order
        np.testing.assert_array_equal(
            np.concatenate([np.arange(a, a + b) for a, b in zip(offset[mine], size[mine])]
                           or [np.zeros(0, np.int64)]), expected)
    whole = segment_chunks([8 * row], [0], [row])
    tail = segment_chunks([5 * row], [0], [row])  # rows 3 to 7, on another rank
    np.testing.assert_array_equal(tail[:, 2], whole[len(whole) - len(tail):, 2])
    np.testing.assert_array_equal(tail[:, 1] + 3 * row, whole[len(whole) - len(tail):, 1])


NORMS = Pass("norms", sums=("param_sq", "grad_sq"))


def norms_pass(backend, p, g, bounds):
    starts = [a for a, _ in bounds]
    segments = backend.segments([b - a for a, b in bounds], starts)
    return segments, backend.flat_tensors(p, g, starts)


def run_segment_norms(backend, p, g, prep, bounds):
    segments, tensors = norms_pass(backend, p, g, bounds)
    return backend.run_segments(NORMS, tensors, [], prep, rules.NoScalars(), segments)


@pytest.mark.parametrize("name, scale", [("LAMB", 1e-38), ("LARS", 1e-39), ("LARS", 1e-30),
                                         ("LARS", 1e-42)])
def test_tiny_gradients_take_the_references_full_step(name, scale):
    """The trust ratio scales a tensor's step to its parameters' norm, whatever the
    gradients' size: flushed to 0, moments or gradients near 1e-38 stood still on the
    CPU, where the float64 reference (and CUDA, which keeps subnormals) takes a full
    step. (torch's float32 norm of such an update underflows to 0: timm's LAMB stands
    still too, by a trust ratio of 1 for a zero norm, not by the reference's math.)"""
    shapes = [(64,), (8, 4)]
    rng = np.random.default_rng(11)
    p0 = rng.standard_normal(96).astype(f32)
    g = (rng.standard_normal(96) * scale).astype(f32)
    lr = 0.01 if name == "LAMB" else 1.0  # LARS's step is trust_coefficient (1e-3) lr |w|
    ours = getattr(fastopt, name)(np.split(p0.copy(), [64]), lr=lr)
    theirs = getattr(reference, name)(shapes, lr=lr)
    expected = p0.astype(np.float64)
    for _ in range(3):
        ours.step(g)
        expected = theirs.step(expected, g.astype(np.float64))
    np.testing.assert_allclose(ours.flat_params, expected, rtol=RTOL, atol=ATOL)
    assert np.abs(expected - p0).max() > 100 * ATOL  # a step the size of lr


def test_lamb_steps_a_tensor_whose_moments_faded_by_its_parameters_norm():
    """After long zero gradients a tensor's first moment fades into the subnormals while
    its second stays, so its update's norm falls so far below its parameters' that lr
    times the trust ratio lies beyond float32 (here 5e39; LARS's with gradients of 1e-42
    above): multiplied in as a float32, it made the parameters -inf, then NaN. LAMB
    moves a tensor by lr times its norm, whatever its update's size."""
    rng = np.random.default_rng(5)
    opt = fastopt.LAMB([rng.standard_normal(64).astype(f32)], lr=1e-3)
    opt.step(rng.standard_normal(64).astype(f32))
    opt.state["exp_avg"][:] = (rng.standard_normal(64) * 1e-42).astype(f32)
    opt.state["exp_avg_sq"][:] = 1.0
    before = opt.flat_params.astype(np.float64)
    opt.step(np.zeros(64, f32))
    moved = np.linalg.norm(opt.flat_params - before)
    np.testing.assert_allclose(moved, 1e-3 * np.linalg.norm(before), rtol=1e-4)


def test_segment_norms_match_float64_sums():
    bounds, n = segment_bounds(11)
    assert n >= cpu.PARALLEL_MIN_SIZE  # the parallel loop
    rng = np.random.default_rng(12)
    p = (rng.standard_normal(n) * 3).astype(f32)
    g = (rng.standard_normal(n) * 0.5).astype(f32)
    backend = HostBackend()
    prep = (f32(1), f32(1), f32(np.inf), f32(0))
    param_sq, grad_sq = run_segment_norms(backend, p, g, prep, bounds)
    assert param_sq.dtype == grad_sq.dtype == np.float64
    assert param_sq.shape == grad_sq.shape == (len(bounds),)
    p64, g64 = p.astype(np.float64), g.astype(np.float64)
    expected_p = np.array([np.sum(p64[a:b] ** 2) for a, b in bounds])
    expected_g = np.array([np.sum(g64[a:b] ** 2) for a, b in bounds])
    np.testing.assert_allclose(param_sq, expected_p, rtol=1e-12, atol=0)
    np.testing.assert_allclose(grad_sq, expected_g, rtol=1e-12, atol=0)
    assert np.all((expected_p == 0) == [a == b for a, b in bounds])

    # The gradient as the kernels prepare it: scaled, clipped to [-clip, clip], plus decay.
    prep = (f32(-2.0), f32(1), f32(1.5), f32(0.25))
    _, grad_sq = run_segment_norms(backend, p, g, prep, bounds)
    prepared = (np.clip(g * f32(-2.0), f32(-1.5), f32(1.5)) + f32(0.25) * p).astype(np.float64)
    expected = np.array([np.sum(prepared[a:b] ** 2) for a, b in bounds])
    np.testing.assert_allclose(grad_sq, expected, rtol=1e-6, atol=0)


def with_threads(threads, function):
    default = numba.get_num_threads()
    try:
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
        return function()
    finally:
        numba.set_num_threads(default)


def test_segment_norms_do_not_depend_on_the_thread_count():
    bounds, n = segment_bounds(13)
    rng = np.random.default_rng(14)
    p, g = rng.standard_normal((2, n)).astype(f32) * f32(7)
    prep = (f32(1), f32(1), f32(np.inf), f32(0))
    one, two = (with_threads(t, lambda: run_segment_norms(HostBackend(), p, g, prep, bounds))
                for t in (1, 2))
    for a, b in zip(one, two):
        np.testing.assert_array_equal(a.view(np.uint64), b.view(np.uint64))
    # The serial loop (small buffers) adds the same chunks in the same order.
    kernel, sums = cpu.segment_kernel(*NORMS), []
    for parallel in (True, False):
        segments, tensors = norms_pass(HostBackend(), p, g, bounds)
        kernel(tensors.p, tensors.g, prep, (), segments.chunks, segments.state_starts,
               segments.partials, segments.row_scalars, parallel, True)
        sums.append(segments.partials)
    np.testing.assert_array_equal(sums[0].view(np.uint64), sums[1].view(np.uint64))


@pytest.mark.parametrize("name", ["LAMB", "LARS", "Adafactor"])
def test_training_does_not_depend_on_the_thread_count(name):
    params, grads = make_params(15, SHAPES), make_grads(16, SHAPES, steps=5)
    kwargs = CASES[name][1]
    one, two = (with_threads(t, lambda: train(getattr(fastopt, name)(params, **kwargs),
                                              grads).flat_params.copy())
                for t in (1, 2))
    np.testing.assert_array_equal(one.view(np.uint32), two.view(np.uint32))
    assert not np.array_equal(one, flat(params))


# -- 6. the non-finite skip and gradient clipping ----------------------------------------


@pytest.mark.parametrize("name", ["LAMB", "LARS", "Adafactor"])
def test_nonfinite_gradient_is_skipped(name):
    kwargs = CASES[name][1]
    params, grads = make_params(17, SHAPES), make_grads(18, SHAPES, steps=6)
    opt = getattr(fastopt, name)(params, skip_nonfinite=True, **kwargs)
    bad = [g.copy() for g in grads[:2]]
    bad[0][3] = np.inf  # before any state exists
    bad[1][20000] = np.nan  # in the large tensor, once the state exists
    for index, g in enumerate(grads):
        if index in (0, 3):
            opt.flat_grads[:] = bad[index // 3]
            before = snapshot(opt)
            opt.step()
            assert_unchanged(opt, before)
            assert opt.skipped_steps == 1 + index // 3
        opt.step(g)
    assert opt.skipped_steps == 2 and opt.state["step"] == len(grads)
    # The skipped steps left no trace: the run equals one that never saw them.
    expected, _ = run_reference(name, SHAPES, kwargs, flat(params), grads)
    np.testing.assert_allclose(opt.flat_params, expected, rtol=RTOL, atol=ATOL)


CLIP_CASES = {"LAMB": dict(lr=0.01, betas=(0.8, 0.9), eps=1e-3),
              "LARS": dict(lr=1.0, momentum=0.5, weight_decay=0.05),  # decay: not scale-free
              "Adafactor": dict(lr=0.05, weight_decay=0.1)}


@pytest.mark.parametrize("name", list(CLIP_CASES))
def test_clip_grad_norm_matches_reference_with_clipped_gradients(name):
    kwargs, max_norm = CLIP_CASES[name], 30.0
    params, grads = make_params(19, SHAPES), make_grads(20, SHAPES)
    opt = getattr(fastopt, name)(params, clip_grad_norm=max_norm, **kwargs)
    clipped, coefficients = [], []
    for g in grads:
        opt.step(g)
        norm = math.sqrt(np.sum(g.astype(np.float64) ** 2))
        assert opt.last_grad_norm == pytest.approx(norm, rel=1e-12)
        coefficients.append(min(1.0, max_norm / (norm + 1e-6)))
        clipped.append(g.astype(np.float64) * coefficients[-1])
    assert min(coefficients) < 0.01 and max(coefficients) == 1.0  # some clipped, some not
    expected, _ = run_reference(name, SHAPES, kwargs, flat(params), clipped)
    np.testing.assert_allclose(opt.flat_params, expected, rtol=RTOL, atol=ATOL)
    unclipped, _ = run_reference(name, SHAPES, kwargs, flat(params), grads)
    assert np.abs(unclipped - expected).max() > 4 * ATOL  # clipping made a difference


# -- 7. adopted buffers ----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["LAMB", "LARS", "Adafactor"])
def test_adopt_with_shapes_equals_list_of_arrays(name):
    kwargs = CASES[name][-1]
    params, grads = make_params(21, SHAPES), make_grads(22, SHAPES, steps=10)
    buffer = flat(params)
    adopted = train(getattr(fastopt, name)(fastopt.adopt(buffer, SHAPES), **kwargs), grads)
    copied = train(getattr(fastopt, name)(params, **kwargs), grads)
    assert np.shares_memory(adopted.flat_params, buffer)
    np.testing.assert_array_equal(buffer.view(np.uint32), copied.flat_params.view(np.uint32))
    assert not np.array_equal(buffer, flat(params))
    for key, value in copied.state.items():
        if isinstance(value, np.ndarray):
            np.testing.assert_array_equal(adopted.state[key], value, err_msg=key)


@pytest.mark.parametrize("name", ["LAMB", "LARS", "Adafactor"])
def test_adopt_without_shapes_is_one_tensor(name):
    kwargs = CASES[name][1]
    params, grads = make_params(23, SHAPES), make_grads(24, SHAPES)
    p0 = flat(params)
    buffer = p0.copy()
    train(getattr(fastopt, name)(fastopt.adopt(buffer), **kwargs), grads)
    expected, _ = run_reference(name, [(p0.size,)], kwargs, p0, grads)
    np.testing.assert_allclose(buffer, expected, rtol=RTOL, atol=ATOL)
    per_tensor, _ = run_reference(name, SHAPES, kwargs, p0, grads)
    assert np.abs(per_tensor - expected).max() > 4 * ATOL  # the two readings differ


# -- 8. checkpoints ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["LAMB", "LARS", "Adafactor"])
def test_checkpoint_round_trip(name, tmp_path):
    kwargs = dict(CASES[name][1], skip_nonfinite=True, clip_grad_norm=100.0)
    params, grads = make_params(25, SHAPES), make_grads(26, SHAPES, steps=10)
    opt = train(getattr(fastopt, name)(params, **kwargs), grads[:5])
    path = tmp_path / "opt.ckpt"
    fastopt.save(opt, path)
    fresh = getattr(fastopt, name)([np.zeros(s, f32) for s in SHAPES], **kwargs)
    fresh.load(path)
    rebuilt = fastopt.load(path)
    for other in (fresh, rebuilt):
        assert type(other) is type(opt)
        np.testing.assert_array_equal(other.flat_params.view(np.uint32),
                                      opt.flat_params.view(np.uint32))
    for other in (opt, fresh, rebuilt):
        train(other, grads[5:])
    assert opt.state["step"] == fresh.state["step"] == rebuilt.state["step"] == 10
    for other in (fresh, rebuilt):
        np.testing.assert_array_equal(other.flat_params.view(np.uint32),
                                      opt.flat_params.view(np.uint32))
        assert other.state.keys() == opt.state.keys()
        for key, value in opt.state.items():
            if isinstance(value, np.ndarray):
                np.testing.assert_array_equal(other.state[key].view(np.uint32),
                                              value.view(np.uint32), err_msg=key)
    # The continued run is the reference's ten steps (so the load restored everything).
    clipped = []
    for g in grads:
        norm = math.sqrt(np.sum(g.astype(np.float64) ** 2))
        clipped.append(g.astype(np.float64) * min(1.0, 100.0 / (norm + 1e-6)))
    reference_kwargs = {k: v for k, v in kwargs.items()
                        if k not in ("skip_nonfinite", "clip_grad_norm")}
    expected, _ = run_reference(name, SHAPES, reference_kwargs, flat(params), clipped)
    np.testing.assert_allclose(opt.flat_params, expected, rtol=RTOL, atol=ATOL)
