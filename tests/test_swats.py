"""SWATS against a float64 transcription of the paper's Algorithm 1."""

import numpy as np
import pytest

import fastopt
import reference
from fastopt._backend import SEGMENT_CHUNK, HostBackend
from fastopt.kernels import cpu

f32 = np.float32
KWARGS = dict(lr=0.01, betas=(0.9, 0.99), eps=1e-6)  # an eps that lets 300 steps switch


def drifting_gradients(seed, n, steps):
    """A steady gradient plus noise: the SGD-rate estimate settles, and SWATS switches."""
    rng = np.random.default_rng(seed)
    base = rng.uniform(0.5, 1.5, n) * rng.choice([-1.0, 1.0], n)
    return [(base + 0.05 * rng.standard_normal(n)).astype(f32) for _ in range(steps)]


@pytest.mark.parametrize("extra", [{}, dict(weight_decay=0.01), dict(maximize=True)])
@pytest.mark.parametrize("n", [7, 1000, 2 * SEGMENT_CHUNK + 5])
def test_swats_switches_where_the_paper_does_and_matches_it(n, extra):
    kwargs = {**KWARGS, **extra}
    p0 = np.random.default_rng(n).standard_normal(n).astype(f32)
    grads = drifting_gradients(n, n, 300)
    opt = fastopt.SWATS([p0], **kwargs)
    ref = reference.SWATS(n, **kwargs)
    p = p0.astype(np.float64)
    for g in grads:
        opt.step(g)
        p = ref.step(p, g.astype(np.float64))
    assert ref.switch_step is not None and ref.switch_step < 280  # both phases ran
    assert opt.state["switch_step"] == [ref.switch_step]
    assert opt.state["sgd_lr"][0] == pytest.approx(ref.sgd_lr, rel=1e-5)
    assert "momentum_buffer" in opt.state
    np.testing.assert_allclose(opt.flat_params, p, rtol=1e-4, atol=1e-4)
    assert np.abs(p - p0).max() > 0.1


def test_each_group_switches_on_its_own():
    a, b = (np.zeros(50, f32) for _ in range(2))
    opt = fastopt.SWATS([{"params": [a]}, {"params": [b], "eps": 1e-12}], **KWARGS)
    refs = [reference.SWATS(50, **KWARGS), reference.SWATS(50, **{**KWARGS, "eps": 1e-12})]
    ps = [np.zeros(50), np.zeros(50)]
    for g in drifting_gradients(0, 100, 120):
        opt.step(g)
        ps = [ref.step(p, x.astype(np.float64)) for ref, p, x in zip(refs, ps, (g[:50], g[50:]))]
    assert opt.state["switch_step"][0] == refs[0].switch_step is not None
    assert opt.state["switch_step"][1] is None and refs[1].switch_step is None
    np.testing.assert_allclose(opt.flat_params, np.concatenate(ps), rtol=1e-4, atol=1e-4)


def test_swats_reduction_is_the_same_on_both_loop_paths():
    n = 3 * SEGMENT_CHUNK + 1
    rng = np.random.default_rng(0)
    buffers = [rng.standard_normal(n).astype(f32) for _ in range(2)]
    buffers += [np.zeros(n, f32), np.zeros(n, f32)]
    prep = (f32(1), f32(1), f32(np.inf), f32(0))
    h = (f32(0.01), f32(1e-8), f32(0.1), f32(0.99), f32(0.01))
    kernel = cpu.segment_kernel(*fastopt.SWATS.ADAM_PHASE)
    backend, sums, results = HostBackend(), [], []
    for parallel in (True, False):
        segments = backend.segments([n], [0])
        arrays = [a.copy() for a in buffers]
        tensors = backend.flat_tensors(arrays[0], arrays[1], [0])
        kernel(tensors.p, tensors.g, *arrays[2:], prep, h, segments.chunks, segments.state_starts, segments.partials,
               segments.row_scalars, parallel, True)
        sums.append(segments.partials.copy())
        results.append(arrays)
    np.testing.assert_array_equal(sums[0], sums[1])
    assert np.all(sums[0][:, 0] > 0)
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)
