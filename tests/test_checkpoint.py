"""Checkpoints: exact resume in a fresh process, crash-safe writes, and loads that check
everything before they change anything."""

import ast
import copy
import dataclasses
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import fastopt
from fastopt import checkpoint, schedules
from conftest import assert_unchanged, snapshot
from sealing import rewrite, seal

f32 = np.float32

# Every algorithm, with options that bring in all of its state, clipping and the skip.
ALGORITHMS = {
    "SGD": dict(lr=0.01, momentum=0.9, dampening=0.1, weight_decay=0.01, clip_grad_norm=5.0),
    "Adagrad": dict(lr=0.05, lr_decay=0.01, initial_accumulator_value=0.1),
    "RMSprop": dict(lr=0.01, momentum=0.5, centered=True, skip_nonfinite=True),
    "Adadelta": dict(lr=0.5, weight_decay=0.01),
    "Adam": dict(lr=0.01, amsgrad=True, clip_grad_value=0.5),
    "AdamW": dict(lr=0.01),
    "Adamax": dict(lr=0.01, weight_decay=0.01),
    "NAdam": dict(lr=0.01, momentum_decay=0.01),
    "SWATS": dict(lr=0.01, betas=(0.9, 0.99), eps=5e-4),
    "RAdam": dict(lr=0.01, decoupled_weight_decay=True, weight_decay=0.1),
    "Rprop": dict(lr=0.01, skip_nonfinite=True),
    "ASGD": dict(lr=0.01, t0=20),
    "Lion": dict(lr=0.01, weight_decay=0.1),
    "Adan": dict(lr=0.01, weight_decay=0.1, clip_grad_value=0.5),
    "LAMB": dict(lr=0.01, weight_decay=0.01, clip_grad_norm=5.0),
    "LARS": dict(weight_decay=0.01),
    "Adafactor": dict(lr=0.01, weight_decay=0.01),
}
STEPS, SAVED_AT = 100, 40

# Run in a fresh interpreter: load each step-40 checkpoint and continue to step 100.
RESUME = """
import sys
import numpy as np
import fastopt
sys.path.insert(0, sys.argv[1])
from test_checkpoint import ALGORITHMS, STEPS, SAVED_AT, gradient
for name in ALGORITHMS:
    opt = fastopt.load(f"{sys.argv[2]}/{name}.npz")
    for t in range(SAVED_AT, STEPS):
        opt.step(gradient(t, opt.flat_params))
    np.save(f"{sys.argv[2]}/{name}-final.npy", opt.flat_params)
"""


def gradient(t, flat):
    """A gradient that depends on the step and on the parameters (so any difference in
    the resumed state would grow), NaN at step 55 to exercise the skip."""
    g = (f32(0.1) * flat + np.random.default_rng(t).standard_normal(flat.size).astype(f32))
    if t == 55:
        g[3] = np.nan
    return g.astype(f32)


def make(name):
    rng = np.random.default_rng(1)
    groups = [{"params": {"w": rng.standard_normal((6, 5)).astype(f32)}},
              {"params": [rng.standard_normal(7).astype(f32)], "lr": 0.02}]
    return getattr(fastopt, name)(groups, **ALGORITHMS[name])


def test_resume_in_a_fresh_process_is_bitwise_exact(tmp_path):
    finals = {}
    for name in ALGORITHMS:
        opt = make(name)
        for t in range(STEPS):
            if t == SAVED_AT:
                fastopt.save(opt, tmp_path / f"{name}.npz")
            opt.step(gradient(t, opt.flat_params))
        finals[name] = opt.flat_params.copy()
    run = subprocess.run([sys.executable, "-c", RESUME, os.path.dirname(__file__), str(tmp_path)],
                         capture_output=True, text=True, cwd="/")
    assert run.returncode == 0, run.stderr
    for name, expected in finals.items():
        resumed = np.load(tmp_path / f"{name}-final.npy")
        np.testing.assert_array_equal(resumed, expected, err_msg=name)


def test_swats_switches_on_both_sides_of_the_checkpoint_in_the_resume_test():
    opt = make("SWATS")
    for t in range(STEPS):
        if t == SAVED_AT:  # one group resumes in its SGD phase, the other in its Adam phase
            assert opt.state["switch_step"][0] is not None
            assert opt.state["switch_step"][1] is None
        opt.step(gradient(t, opt.flat_params))
    assert opt.state["switch_step"][1] is not None


def hyperparameters(opt):
    return [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]


@pytest.fixture
def trained(tmp_path):
    opt = make("Adam")
    for t in range(5):
        opt.step(gradient(t, opt.flat_params))
    path = tmp_path / "adam.npz"
    fastopt.save(opt, path)
    return opt, path


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, match", [
    (truncate, "not a readable fastopt checkpoint"),
    (flip_a_byte, "not a readable fastopt checkpoint|checksum"),
    (lambda p: p.write_bytes(b"not a zip file at all"), "not a readable"),
    (lambda p: rewrite(p, arrays={"params": np.zeros(37, f32)}, sealed=False), "checksum"),
    (lambda p: rewrite(p, meta={"step": 4}, sealed=False), "checksum"),
    (lambda p: rewrite(p, meta={"version": 99}), "version 1, 2 or 3"),
    (lambda p: rewrite(p, meta={"format": "something else"}), "fastopt-checkpoint"),
    (lambda p: rewrite(p, meta={"algorithm": "SGD"}), "for SGD, not Adam"),
    (lambda p: rewrite(p, arrays={"params": np.zeros(36, f32)}), "float32 \\(37,\\)"),
    (lambda p: rewrite(p, arrays={"params": np.zeros(37, np.float64)}), "float32"),
    (lambda p: rewrite(p, arrays={"state.extra": np.zeros(37, f32)}), "index lists"),
    (lambda p: rewrite(p, meta={"layout": []}), "layout"),
])
def test_a_damaged_or_foreign_file_is_refused_and_changes_nothing(trained, damage, match):
    opt, path = trained
    fresh = make("Adam")
    before, groups = snapshot(fresh), hyperparameters(fresh)
    damage(path)
    with pytest.raises(ValueError, match=match):
        fresh.load(path)
    assert_unchanged(fresh, before)
    assert hyperparameters(fresh) == groups


def test_a_checkpoint_for_another_layout_or_algorithm_is_refused(trained):
    _, path = trained
    for other in [fastopt.Adam([np.zeros(37, f32)]), fastopt.SGD([{"params": p} for p in make("Adam").params]),
                  fastopt.Adam([{"params": {"w": np.zeros((5, 6), f32)}},
                                {"params": [np.zeros(7, f32)]}])]:
        before, groups = snapshot(other), hyperparameters(other)
        with pytest.raises(ValueError, match="layout|for Adam"):
            other.load(path)
        assert_unchanged(other, before)
        assert hyperparameters(other) == groups


@pytest.mark.parametrize("bad, error", [({"lr": -1.0}, ValueError), ({"betas": [0.9, 2.0]}, ValueError),
                                        ({"amsgrad": "yes"}, TypeError),
                                        ({"nonsense": 1}, ValueError)])
def test_bad_hyperparameters_in_a_checkpoint_change_nothing(trained, bad, error):
    opt, _ = trained
    state = opt.state_dict()
    state["meta"]["groups"][1].update(bad)
    state["meta"] = seal(state["meta"], state["arrays"])
    fresh = make("Adam")
    before, groups = snapshot(fresh), hyperparameters(fresh)
    with pytest.raises(error):
        fresh.load_state_dict(state)
    assert_unchanged(fresh, before)
    assert hyperparameters(fresh) == groups


def test_state_dict_is_a_copy_and_round_trips_in_memory(trained):
    opt, _ = trained
    state = opt.state_dict()
    state["arrays"]["params"][:] = 0  # a copy: the optimizer does not see this
    assert opt.flat_params.any()
    other = make("Adam")
    other.load_state_dict(opt.state_dict())
    g = gradient(9, opt.flat_params)
    opt.step(g)
    other.step(g)
    np.testing.assert_array_equal(other.flat_params, opt.flat_params)
    assert other.state["step"] == opt.state["step"] == 6


@pytest.mark.parametrize("copy_it", [pickle.dumps, copy.copy, copy.deepcopy])
def test_pickle_and_copy_are_refused_and_the_state_dict_pickles_instead(trained, copy_it):
    # A copy made field by field would hold params that are no longer views into its
    # flat buffers: its steps would silently not reach them.
    opt, _ = trained
    with pytest.raises(TypeError, match="cannot be pickled or copied.*state_dict"):
        copy_it(opt)
    other = make("Adam")
    other.load_state_dict(pickle.loads(pickle.dumps(opt.state_dict())))
    g = gradient(9, opt.flat_params)
    opt.step(g)
    other.step(g)
    np.testing.assert_array_equal(other.flat_params, opt.flat_params)


@pytest.mark.parametrize("name", ALGORITHMS)
def test_a_snapshot_is_a_typed_copy_that_restores_exactly(name):
    opt = make(name)
    for t in range(3):
        opt.step(gradient(t, opt.flat_params))
    taken = opt.snapshot()
    assert isinstance(taken, fastopt.checkpoint.Snapshot)
    assert taken.algorithm == name and taken.step == 3
    assert set(taken.buffers) == {k for k, v in opt.state.items() if hasattr(v, "shape")}
    np.testing.assert_array_equal(taken.params, opt.flat_params)
    g = gradient(3, opt.flat_params)
    opt.step(g)  # the snapshot is a copy: this step does not reach it
    other = make(name)
    other.restore(taken)
    assert other.state["step"] == 3
    other.step(g)
    np.testing.assert_array_equal(other.flat_params, opt.flat_params)
    for key, value in opt.state.items():
        if hasattr(value, "shape"):
            np.testing.assert_array_equal(other.state[key], value)
        else:
            assert other.state[key] == value


def test_a_snapshot_that_does_not_fit_is_refused_and_changes_nothing(trained):
    opt, _ = trained
    taken = opt.snapshot()
    fresh = make("Adam")
    before, groups = snapshot(fresh), hyperparameters(fresh)
    bad = [dataclasses.replace(taken, algorithm="SGD"),
           dataclasses.replace(taken, step=-1),
           dataclasses.replace(taken, params=taken.params[:-1]),
           dataclasses.replace(taken, buffers={**taken.buffers, "exp_avg": taken.params.astype(float)}),
           dataclasses.replace(taken, options={**taken.options, "clip_grad_value": -1.0})]
    for other in bad:
        with pytest.raises(ValueError):
            fresh.restore(other)
    made_up = dataclasses.replace(taken, buffers={**taken.buffers, "momentum": taken.params})
    with pytest.raises(ValueError, match="'momentum', which Adam does not keep"):
        fresh.restore(made_up)
    with pytest.raises(TypeError, match="Snapshot"):
        fresh.restore(opt.state_dict())
    assert_unchanged(fresh, before)
    assert hyperparameters(fresh) == groups


def test_a_snapshot_of_8_bit_state_without_its_scales_or_with_negative_ones_is_refused():
    """An 8-bit buffer in a snapshot must come with its scales and its small tensors'
    values: restored without them, every later step failed (KeyError) instead of the
    restore. A negative scale would flip the sign of its block's every value."""
    rng = np.random.default_rng(0)

    def trained_int8():
        opt = fastopt.AdamW({"w": rng.standard_normal(5000).astype(f32),
                             "b": rng.standard_normal(10).astype(f32)}, state_dtype="int8")
        opt.step(rng.standard_normal(5010).astype(f32))
        return opt

    taken, fresh = trained_int8().snapshot(), trained_int8()
    before, groups = snapshot(fresh), hyperparameters(fresh)
    for dropped in ("exp_avg_absmax", "exp_avg_sq_small"):
        buffers = {k: v for k, v in taken.buffers.items() if k != dropped}
        with pytest.raises(ValueError, match=f"without {dropped}"):
            fresh.restore(dataclasses.replace(taken, buffers=buffers))
    negative = taken.buffers["exp_avg_absmax"].copy()
    negative[3] = -negative[3]
    with pytest.raises(ValueError, match="exp_avg_absmax holds negative"):
        fresh.restore(dataclasses.replace(taken, buffers={**taken.buffers,
                                                          "exp_avg_absmax": negative}))
    assert_unchanged(fresh, before)
    assert hyperparameters(fresh) == groups
    fresh.restore(taken)  # whole, it is taken
    fresh.step(rng.standard_normal(5010).astype(f32))


def test_a_checkpoint_from_before_caution_loads_and_one_missing_lr_does_not(trained):
    opt, _ = trained  # Adam
    taken = opt.snapshot()
    older = [{k: v for k, v in group.items() if k != "caution"} for group in taken.groups]
    resumed = make("Adam")
    resumed.restore(dataclasses.replace(taken, groups=older))
    assert resumed.param_groups[0]["caution"] is False
    g = gradient(3, opt.flat_params)
    opt.step(g)
    resumed.step(g)
    np.testing.assert_array_equal(resumed.flat_params, opt.flat_params)
    broken = [{k: v for k, v in group.items() if k != "lr"} for group in taken.groups]
    fresh = make("Adam")
    before = snapshot(fresh)
    with pytest.raises(ValueError, match="options"):
        fresh.restore(dataclasses.replace(taken, groups=broken))
    assert_unchanged(fresh, before)


def test_the_package_imports_without_cycles():
    # fastopt.checkpoint serializes snapshots and imports nothing of fastopt's; the
    # optimizers use it, not the other way round. A cycle is an edge back to a module on
    # the path (package __init__ files, which import everything, are left out).
    root = Path(fastopt.__file__).parent
    modules = {".".join(path.relative_to(root.parent).with_suffix("").parts): path
               for path in root.rglob("*.py") if path.name != "__init__.py"}
    graph = {}
    for name, path in modules.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = name.split(".")[:-node.level] if node.level else []
                target = ".".join(base + ([node.module] if node.module else []))
                for alias in node.names:
                    full = f"{target}.{alias.name}"
                    edges.add(full if full in modules else target)
        graph[name] = edges & set(modules)
    assert graph["fastopt.checkpoint"] == set()

    def visit(name, path):
        for target in graph[name]:
            assert target not in path, f"import cycle: {' -> '.join(path + [target])}"
            visit(target, path + [target])

    for name in graph:
        visit(name, [name])


def test_a_schedule_is_resumed_by_an_optimizer_built_with_it(tmp_path):
    schedule = schedules.StepDecay(0.1, step_size=3)
    opt = fastopt.SGD([np.ones(4, f32)], lr=schedule)
    for t in range(4):
        opt.step(gradient(t, opt.flat_params))
    fastopt.save(opt, tmp_path / "s.npz")
    with pytest.raises(ValueError, match=r"lr'\] is a schedule, which fastopt.load cannot "
                       r"rebuild .*build the optimizer with its schedule and call opt.load"):
        fastopt.load(tmp_path / "s.npz")
    with pytest.raises(ValueError, match="give the optimizer its schedule"):
        fastopt.SGD([np.ones(4, f32)], lr=0.1).load(tmp_path / "s.npz")
    resumed = fastopt.SGD([np.ones(4, f32)], lr=schedule)
    resumed.load(tmp_path / "s.npz")
    for t in range(4, 8):
        g = gradient(t, opt.flat_params)
        opt.step(g)
        resumed.step(g)
    np.testing.assert_array_equal(resumed.flat_params, opt.flat_params)


KILLED_SAVE = """
import sys
import numpy as np
import fastopt
opt = fastopt.SGD(fastopt.adopt(np.ones(25_000_000, np.float32)))
print("saving", flush=True)
fastopt.save(opt, sys.argv[1])
print("saved", flush=True)
"""


@pytest.mark.serial  # a race: the kill must come before the save ends
def test_a_process_killed_while_saving_leaves_the_previous_checkpoint(trained):
    opt, path = trained
    previous = path.read_bytes()
    writer = subprocess.Popen([sys.executable, "-c", KILLED_SAVE, str(path)],
                              stdout=subprocess.PIPE, text=True, cwd="/")
    assert writer.stdout.readline().strip() == "saving"
    deadline = time.monotonic() + 60
    temporary = []
    while time.monotonic() < deadline:
        temporary = [p for p in path.parent.iterdir() if p.name.startswith(".fastopt-")]
        if temporary and temporary[0].stat().st_size > 20_000_000:
            break
        time.sleep(0.005)
    writer.kill()
    writer.wait()
    assert temporary, "the writer never started its temporary file"
    assert temporary[0].exists(), "the save finished before the kill; nothing was tested"
    assert path.read_bytes() == previous
    fresh = make("Adam")
    fresh.load(path)
    np.testing.assert_array_equal(fresh.flat_params, opt.flat_params)
    fastopt.save(fresh, path)  # the next save to the folder removes the orphan
    assert not temporary[0].exists()
    assert sorted(p.name for p in path.parent.iterdir()) == ["adam.npz"]


def test_an_adafactor_checkpoint_that_names_its_state_second_still_loads(tmp_path):
    # Adafactor's checkpoints once recorded its float32 state under its rule's argument,
    # "second", where its buffers are row_var, col_var and variance.
    opt = make("Adafactor")
    for t in range(3):
        opt.step(gradient(t, opt.flat_params))
    path = tmp_path / "adafactor.npz"
    fastopt.save(opt, path)
    storage = checkpoint.read(path)["meta"]["storage"]
    assert storage["state_dtype"] == dict.fromkeys(("row_var", "col_var", "variance"),
                                                   "float32")
    rewrite(path, meta={"storage": {**storage, "state_dtype": {"second": "float32"}}})
    resumed, into = fastopt.load(path), make("Adafactor")
    into.load(path)
    g = gradient(3, opt.flat_params)
    for other in (opt, resumed, into):
        other.step(g)
    np.testing.assert_array_equal(resumed.flat_params, opt.flat_params)
    np.testing.assert_array_equal(into.flat_params, opt.flat_params)
    bfloat16 = {**storage, "state_dtype": {"second": "bfloat16"}}  # which it never kept
    rewrite(path, meta={"storage": bfloat16})
    with pytest.raises(ValueError, match="formats differ"):
        into.load(path)


@pytest.mark.parametrize("edit, error", [
    (lambda opt: opt.param_groups[0].__setitem__("weight_decy", 0.5), ValueError),
    (lambda opt: opt.param_groups[1].__setitem__("lr", -1.0), ValueError),
    (lambda opt: opt.param_groups.pop(), ValueError),
    (lambda opt: opt.state.__setitem__("step", 1.5), TypeError),
], ids=["typo", "bad lr", "group removed", "fractional step"])
def test_what_a_load_would_refuse_is_refused_by_the_save(trained, tmp_path, edit, error):
    # Edited between steps, the groups and the step count were checked by the next
    # step only: a save before it wrote a file that no load took.
    opt, _ = trained
    edit(opt)
    path = tmp_path / "edited.npz"
    with pytest.raises(error):
        fastopt.save(opt, path)
    with pytest.raises(error):
        opt.state_dict()
    assert not path.exists()


def test_group_names_and_tuple_or_numpy_keys_survive_a_round_trip(tmp_path):
    opt = fastopt.SGD([{"params": {("block", 1): np.ones(2, f32), np.int64(3): np.ones(1, f32)},
                        "name": "body"}], lr=0.1)
    opt.step(np.ones(3, f32))
    fastopt.save(opt, tmp_path / "k.npz")
    loaded = fastopt.load(tmp_path / "k.npz")
    assert loaded.param_groups[0]["name"] == "body"
    assert set(loaded.params[0]) == {("block", 1), 3}
    np.testing.assert_array_equal(loaded.flat_params, opt.flat_params)


@pytest.mark.parametrize("name, kwargs", [
    ("Adam", dict(lr=np.float32(1e-3))), ("Adam", dict(lr=np.int64(1))),
    ("Adam", dict(amsgrad=np.True_)), ("Adam", dict(betas=(np.float32(0.9), 0.999))),
    ("Adam", dict(betas=[np.float32(0.9), np.float32(0.999)])),  # in a list, too
    ("Adan", dict(betas=[np.float32(0.98), np.float32(0.92), np.float32(0.99)])),
    ("ASGD", dict(lr=np.float32(0.01), alpha=np.float32(0.7), t0=np.int64(3))),
], ids=str)
def test_numpy_scalar_hyperparameters_save_and_resume_bitwise(tmp_path, name, kwargs):
    """NumPy scalars passed every check and stepped, but then the checkpoint did not
    save (not JSON). They are kept as the Python numbers they equal, which the file
    holds exactly, so the resumed run computes as the uninterrupted one (the host math
    in float64 on both sides, where NumPy keeps a float32's in float32)."""
    rng = np.random.default_rng(1)
    opt = getattr(fastopt, name)([{"params": [rng.standard_normal(30).astype(f32)]},
                                  {"params": [rng.standard_normal(7).astype(f32)]}], **kwargs)
    for t in range(8):
        if t == 2:
            opt.param_groups[1]["lr"] = np.float32(0.02)  # between steps too
        if t == 4:
            fastopt.save(opt, tmp_path / "c.npz")
            resumed = fastopt.load(tmp_path / "c.npz")
        opt.step(gradient(t, opt.flat_params))
        if t >= 4:
            resumed.step(gradient(t, resumed.flat_params))
    np.testing.assert_array_equal(resumed.flat_params, opt.flat_params)
    for key, value in opt.state.items():
        np.testing.assert_array_equal(resumed.state[key], value, err_msg=key)


@pytest.mark.parametrize("thing", [{"w": np.ones(3, f32)}, None, "opt.npz"])
def test_saving_what_is_no_optimizer_is_a_type_error_naming_what_save_takes(tmp_path, thing):
    with pytest.raises(TypeError, match="save takes a fastopt optimizer .* got "
                                        f"{type(thing).__name__}"):
        fastopt.save(thing, tmp_path / "c.npz")
    with pytest.raises(TypeError, match="got EMA"):
        fastopt.save(fastopt.EMA([np.ones(3, f32)]), tmp_path / "c.npz")
    assert not list(tmp_path.iterdir())


def test_saved_files_follow_the_umask_and_a_missing_folder_is_named(tmp_path):
    opt = fastopt.SGD([np.ones(2, f32)])
    old = os.umask(0o022)
    try:
        fastopt.save(opt, tmp_path / "m.npz")
    finally:
        os.umask(old)
    assert (tmp_path / "m.npz").stat().st_mode & 0o777 == 0o644
    with pytest.raises(FileNotFoundError, match="folder does not exist"):
        fastopt.save(opt, tmp_path / "missing" / "m.npz")
