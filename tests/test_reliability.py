"""Reliability: one optimizer shared by threads, saves racing steps, checkpoints whose
record is checksummed and validated field by field, loads that change nothing unless
they succeed, damaged files, aliased gradients, overflowing hyperparameters, orphaned
temporary files, read-only views and the command line's usage errors."""

import copy
import hashlib
import io
import struct
import subprocess
import sys
import threading
import time
import tracemalloc
import zipfile

import numba
import numpy as np
import pytest

import fastopt
from conftest import assert_same, snapshot
from fastopt import checkpoint, schedules
from fastopt.cli import main
from sealing import seal, write

f32 = np.float32


def everything(opt):
    """All that a load may change: the buffers and state (as conftest snapshots them),
    hyperparameters, options, counters and which buffers each group has begun."""
    return {**snapshot(opt),
            "groups": repr([{k: v for k, v in g.items() if k != "params"}
                            for g in opt.param_groups]),
            "options": (opt.clip_grad_norm, opt.clip_grad_value, opt.skip_nonfinite),
            "counters": (opt.skipped_steps, repr(opt.last_grad_norm)),
            "started": [sorted(s) for s in opt._started]}


def assert_all_unchanged(opt, before):
    after = everything(opt)
    assert_same(after, before)
    for key in ("groups", "options", "counters", "started"):
        assert after[key] == before[key], key


def fingerprint(opt):
    """A hash of the parameters and the whole state, to compare against a reference run."""
    digest = hashlib.sha256(opt.flat_params.tobytes())
    for name in sorted(opt.state):
        value = opt.state[name]
        digest.update(name.encode())
        digest.update(value.tobytes() if isinstance(value, np.ndarray) else repr(value).encode())
    return digest.hexdigest()


def join(threads, timeout=60):
    for thread in threads:
        thread.join(timeout)
    assert not any(thread.is_alive() for thread in threads), "a thread hung"


# -- threads ------------------------------------------------------------------------

def test_four_threads_stepping_one_optimizer_take_every_step():
    n = 40_000  # the parallel kernels, which release the GIL for longest
    g = np.random.default_rng(3).standard_normal(n).astype(f32)

    def build():
        return fastopt.Adam({"w": np.linspace(-1, 1, n, dtype=f32)}, lr=1e-3, amsgrad=True,
                            clip_grad_norm=50.0)

    opt, reference = build(), build()
    for _ in range(200):
        reference.step(g)
    errors = []

    def worker(i):
        try:
            for _ in range(50):  # flat and structured gradients, interleaved
                opt.step(g if i % 2 else {"w": g})
        except BaseException as error:  # noqa: BLE001 (reported below)
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    join(threads)
    assert not errors
    assert opt.state["step"] == 200
    assert fingerprint(opt) == fingerprint(reference)  # every update, none lost or doubled
    assert opt.last_grad_norm == reference.last_grad_norm


RACE_SIZE, RACE_STEPS = 30_000, 300


def race(save_and_load):
    """Step an optimizer RACE_STEPS times in a thread while ``save_and_load(opt)``, called
    over and over in this one, returns loaded optimizers; each must equal the reference
    run at its own step count. Returns the step counts seen."""
    grads = [np.random.default_rng(t).standard_normal(RACE_SIZE).astype(f32) for t in range(4)]

    def build():
        return fastopt.NAdam(fastopt.adopt(np.linspace(-1, 1, RACE_SIZE, dtype=f32)), lr=1e-2)

    reference = build()
    expected = [fingerprint(reference)]
    for t in range(RACE_STEPS):
        reference.step(grads[t % 4])
        expected.append(fingerprint(reference))
    opt, done = build(), threading.Event()

    def stepper():
        try:
            for t in range(RACE_STEPS):
                opt.step(grads[t % 4])
                time.sleep(0.0001)  # let the saver in between steps too
        finally:
            done.set()

    thread = threading.Thread(target=stepper)
    thread.start()
    seen = []
    try:
        while not done.is_set() or len(seen) < 2:
            loaded = save_and_load(opt)
            step = loaded.state["step"]
            assert fingerprint(loaded) == expected[step], f"a mixture of states at step {step}"
            seen.append(step)
    finally:
        join([thread])
    assert seen == sorted(seen)
    assert fingerprint(save_and_load(opt)) == expected[RACE_STEPS]
    return seen


def test_a_save_racing_steps_in_another_thread_writes_one_steps_state(tmp_path):
    path = tmp_path / "race.npz"

    def save_and_load(opt):
        fastopt.save(opt, path)
        return fastopt.load(path)  # refuses a file that fails its checksum

    seen = race(save_and_load)
    assert len(set(seen)) >= 2  # saves did land between steps


def test_state_dicts_taken_while_another_thread_steps_load_exactly():
    def save_and_load(opt):
        loaded = fastopt.NAdam(fastopt.adopt(np.zeros(RACE_SIZE, f32)), lr=1e-2)
        loaded.load_state_dict(opt.state_dict())
        return loaded

    race(save_and_load)


def test_a_save_whose_file_does_not_read_back_fails_and_keeps_the_previous_file(tmp_path,
                                                                               monkeypatch):
    opt = fastopt.SGD([np.ones(100, f32)], lr=0.1)
    path = tmp_path / "c.npz"
    fastopt.save(opt, path)
    previous = path.read_bytes()
    write_file = checkpoint._write

    def damaged_write(file, contents):  # a disk that garbles some bytes on the way
        write_file(file, contents)
        file.seek(file.tell() // 2)
        file.write(b"\xa5" * 8)  # which the zip's CRC-32 notices on reading

    monkeypatch.setattr(checkpoint, "_write", damaged_write)
    opt.step(np.ones(100, f32))
    with pytest.raises(OSError, match="does not read back"):
        fastopt.save(opt, path)
    assert path.read_bytes() == previous
    assert [p.name for p in tmp_path.iterdir()] == ["c.npz"]  # no temporary file left


def test_a_schedule_may_take_a_state_dict_during_the_step_that_calls_it():
    taken = []
    opt = fastopt.SGD([np.ones(3, f32)], lr=lambda t: taken.append(opt.state_dict()) or 0.1)
    opt.step(np.ones(3, f32))  # the lock is re-entrant: this does not deadlock
    assert len(taken) == 1 and taken[0]["meta"]["step"] == 0


# -- the checkpoint's record: checksummed, validated, loaded atomically -------------

def trained(name="NAdam", **kwargs):
    """A two-group optimizer (the second group with a schedule-free lr of its own) after
    five steps, with host state where the algorithm has some."""
    rng = np.random.default_rng(5)
    groups = [{"params": {"w": rng.standard_normal((3, 4)).astype(f32)}},
              {"params": [rng.standard_normal(5).astype(f32)], "lr": 0.02}]
    opt = getattr(fastopt, name)(groups, clip_grad_norm=10.0, **kwargs)
    for t in range(5):
        opt.step(np.random.default_rng(t).standard_normal(17).astype(f32))
    return opt


def blank(name="NAdam", **kwargs):
    """An optimizer like ``trained`` that has not stepped."""
    rng = np.random.default_rng(6)
    groups = [{"params": {"w": rng.standard_normal((3, 4)).astype(f32)}},
              {"params": [rng.standard_normal(5).astype(f32)], "lr": 0.02}]
    return getattr(fastopt, name)(groups, clip_grad_norm=10.0, **kwargs)


RECORD_EDITS = {
    "step 5 -> 1": lambda m: m.update(step=1),
    "step -1": lambda m: m.update(step=-1),
    "started []": lambda m: m.update(started=[]),
    "started [[], []]": lambda m: m.update(started=[[], []]),
    "lr": lambda m: m["groups"][0].update(lr=0.5),
    "betas": lambda m: m["groups"][1].update(betas=[0.5, 0.6]),
    "skipped_steps": lambda m: m.update(skipped_steps=3),
    "last_grad_norm": lambda m: m.update(last_grad_norm=1.0),
    "clip_grad_norm": lambda m: m["options"].update(clip_grad_norm=1.0),
    "mu_product": lambda m: m["host"]["mu_product"].__setitem__(0, 0.5),
}


@pytest.mark.parametrize("edit", RECORD_EDITS, ids=str)
def test_every_field_of_the_record_is_covered_by_the_checksum(tmp_path, edit):
    path = tmp_path / "c.npz"
    fastopt.save(trained(), path)
    contents = checkpoint.read(path)
    RECORD_EDITS[edit](contents["meta"])
    write(path, contents["meta"], contents["arrays"])  # the old checksum kept
    opt = blank()
    before = everything(opt)
    with pytest.raises(ValueError, match="checksum"):
        opt.load(path)
    with pytest.raises(ValueError, match="checksum"):
        fastopt.load(path)
    assert_all_unchanged(opt, before)


def bad_groups(m):
    m["groups"][0]["lr"] = -1.0


# (edit of a sealed record, what the message must say); each is refused, none changes
# anything
INVALID_RECORDS = {
    "step null": (lambda m: m.update(step=None), "step must be an int >= 0"),
    "step -1": (lambda m: m.update(step=-1), "step must be an int >= 0"),
    "step 1.5": (lambda m: m.update(step=1.5), "step"),
    "step true": (lambda m: m.update(step=True), "step"),
    "step a string": (lambda m: m.update(step="5"), "step"),
    "skipped_steps null": (lambda m: m.update(skipped_steps=None), "skipped_steps"),
    "skipped_steps -1": (lambda m: m.update(skipped_steps=-1), "skipped_steps"),
    "last_grad_norm a string": (lambda m: m.update(last_grad_norm="big"), "last_grad_norm"),
    "last_grad_norm < 0": (lambda m: m.update(last_grad_norm=-1.0), "last_grad_norm"),
    "started 7": (lambda m: m.update(started=7), "started"),
    "started []": (lambda m: m.update(started=[]), "started"),
    "started an unknown buffer": (lambda m: m.update(started=[["nope"], []]), "started"),
    "started a buffer twice": (lambda m: m.update(started=[["exp_avg", "exp_avg"], []]),
                               "started"),
    "host missing": (lambda m: m.update(host={}), "host state"),
    "host null": (lambda m: m["host"]["mu_product"].__setitem__(1, None), "mu_product"),
    "host a string": (lambda m: m["host"]["mu_product"].__setitem__(0, "x"), "mu_product"),
    "host infinite": (lambda m: m["host"]["mu_product"].__setitem__(0, float("inf")),
                      "mu_product"),
    "host one value": (lambda m: m["host"].update(mu_product=[0.5]), "mu_product"),
    "lr < 0": (bad_groups, "lr >= 0"),
    "betas a single": (lambda m: m["groups"][1].update(betas=[0.9]), "betas"),
    "a flag as 1": (lambda m: m["groups"][0].update(maximize=1), "maximize"),
    "a hyperparameter missing": (lambda m: m["groups"][0].pop("eps"), "options"),
    "a hyperparameter too many": (lambda m: m["groups"][0].update(nonsense=1), "options"),
    "params in a group": (lambda m: m["groups"][0].update(params=[1.0]), "options"),
    "groups one": (lambda m: m.update(groups=m["groups"][:1]), "2 param_groups"),
    "a group not a dict": (lambda m: m["groups"].__setitem__(0, 7), "must be a dict"),
    "a schedule for a number": (lambda m: m["groups"][0].update(lr={"schedule": "f"}),
                                "give the optimizer its schedule"),
    "options missing": (lambda m: m["options"].pop("skip_nonfinite"), "options"),
    "options clip < 0": (lambda m: m["options"].update(clip_grad_norm=-1.0), "clip_grad_norm"),
    "options skip a string": (lambda m: m["options"].update(skip_nonfinite="yes"),
                              "skip_nonfinite"),
    "algorithm": (lambda m: m.update(algorithm="Adam"), "for Adam, not NAdam"),
    "layout": (lambda m: m["layout"][0].update(shapes=[[4, 3]]), "layout"),
    "buffers": (lambda m: m.update(buffers=["params"]), "index lists"),
    "version 4": (lambda m: m.update(version=4), "version 1, 2 or 3"),
    "version true": (lambda m: m.update(version=True), "version 1, 2 or 3"),
    "format": (lambda m: m.update(format="npz"), "fastopt-checkpoint"),
    "a field too many": (lambda m: m.update(extra=1), "fields"),
    "a field missing": (lambda m: m.pop("skipped_steps"), "fields"),
}


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("case", INVALID_RECORDS, ids=str)
def test_an_invalid_field_is_refused_and_changes_nothing(tmp_path, case, version):
    """Sealed as version 2 (the checksum covers the record) or version 1 (it does not),
    the field is refused for what it is."""
    edit, match = INVALID_RECORDS[case]
    state = trained().state_dict()
    edit(state["meta"])
    if "version" not in case:  # valid checksum, invalid field
        state["meta"] = seal(state["meta"], state["arrays"], version)
    opt = blank()
    before = everything(opt)
    with pytest.raises((ValueError, TypeError), match=match):
        opt.load_state_dict(state)
    assert_all_unchanged(opt, before)
    path = tmp_path / "c.npz"
    write(path, state["meta"], state["arrays"])
    with pytest.raises(ValueError, match=match):  # from a file: always a ValueError
        opt.load(path)
    assert_all_unchanged(opt, before)


@pytest.mark.filterwarnings("ignore:overflow encountered")
def test_a_checkpoint_that_cannot_take_its_next_step_is_refused():
    state = trained("ASGD").state_dict()
    state["meta"]["host"]["eta"][1] = 1e300  # finite, but not as a float32
    state["meta"] = seal(state["meta"], state["arrays"])
    opt = blank("ASGD")
    before = everything(opt)
    with pytest.raises(ValueError, match="cannot take its next step.*overflows float32"):
        opt.load_state_dict(state)
    assert_all_unchanged(opt, before)


def leaves(value, path=()):
    """Every place in a JSON value: dict entries and list items, all the way down."""
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return
    for key, item in items:
        yield path + (key,)
        yield from leaves(item, path + (key,))


def replaced(meta, path, value):
    meta = copy.deepcopy(meta)
    place = meta
    for key in path[:-1]:
        place = place[key]
    place[path[-1]] = value
    return meta


@pytest.mark.filterwarnings("ignore:overflow encountered")
@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("name, kwargs", [("NAdam", {}), ("Adam", {"amsgrad": True}),
                                          ("SWATS", {}), ("ASGD", {"t0": 2})])
def test_a_load_failing_at_any_field_changes_nothing(name, kwargs, version):
    """Each place in the record in turn, set to each of a few wrong values (and sealed,
    so that the checksum is not what refuses it): the load either succeeds, and the
    optimizer can step, or raises ValueError/TypeError with nothing changed."""
    state = trained(name, **kwargs).state_dict()
    opt = blank(name, **kwargs)
    before = everything(opt)
    wrong = [None, -1, 2 ** 70, 1e300, "x", [], {}, True, [0.5, 0.5]]
    refused = loaded = 0
    for path in leaves(state["meta"]):
        if path[0] in ("sha256", "version"):
            continue
        for value in wrong:
            edited = seal(replaced(state["meta"], path, value), state["arrays"], version)
            try:
                opt.load_state_dict({"meta": edited, "arrays": state["arrays"]})
            except (TypeError, ValueError):
                refused += 1
                assert_all_unchanged(opt, before)
                continue
            loaded += 1
            opt.step(np.ones(17, f32))  # a load that succeeds leaves a working optimizer
            opt = blank(name, **kwargs)
    assert refused > 100 and loaded > 5  # both kinds occur: the sealing is right


def test_a_version_2_file_still_loads(tmp_path):
    """Version 2 had no formats: every array float32."""
    opt = trained()
    state = opt.state_dict()
    meta = dict(state["meta"], version=2)
    del meta["formats"], meta["storage"]
    write(tmp_path / "v2.npz", seal(meta, state["arrays"], 2), state["arrays"])
    assert fingerprint(fastopt.load(tmp_path / "v2.npz")) == fingerprint(opt)


def test_a_version_1_file_still_loads_and_its_fields_are_validated(tmp_path):
    opt = trained()
    state = opt.state_dict()
    meta = dict(state["meta"], version=1)
    del meta["formats"], meta["storage"]  # which version 3 added
    digest = hashlib.sha256()  # version 1: the arrays only, each name then its bytes
    for name in sorted(state["arrays"]):
        digest.update(name.encode() + state["arrays"][name].tobytes())
    meta["sha256"] = digest.hexdigest()
    path = tmp_path / "v1.npz"
    write(path, meta, state["arrays"])
    loaded = fastopt.load(path)
    assert fingerprint(loaded) == fingerprint(opt)
    write(path, dict(meta, step=-1), state["arrays"])
    fresh = blank()
    before = everything(fresh)
    with pytest.raises(ValueError, match="step must be an int >= 0"):
        fresh.load(path)
    assert_all_unchanged(fresh, before)


# -- damaged files: always a ValueError ----------------------------------------------

def header_offsets(data):
    """The offsets of every byte of the zip's structure (local headers, central
    directory, end records), and of the start of each member's .npy header (magic,
    version, length and the first bytes of the description)."""
    offsets = set()
    end = data.rfind(b"PK\x05\x06")
    start = struct.unpack_from("<I", data, end + 16)[0]
    offsets.update(range(start, len(data)))  # central directory and end records
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        for info in archive.infolist():
            local = info.header_offset
            name_length, extra_length = struct.unpack_from("<HH", data, local + 26)
            member = local + 30 + name_length + extra_length
            offsets.update(range(local, member + 24))
    return sorted(offsets)


def test_every_bit_flip_in_the_headers_raises_a_value_error_or_changes_nothing(tmp_path):
    opt = fastopt.SGD([np.linspace(0, 1, 3, dtype=f32)], lr=0.1)
    opt.step(np.ones(3, f32))
    path = tmp_path / "c.npz"
    fastopt.save(opt, path)
    data = path.read_bytes()
    offsets = header_offsets(data)
    assert len(offsets) > 250
    target = fastopt.SGD([np.zeros(3, f32)], lr=0.1)
    before = everything(target)
    refused = 0
    for offset in offsets:
        for bit in range(8):
            flipped = bytearray(data)
            flipped[offset] ^= 1 << bit
            path.write_bytes(flipped)
            try:
                target.load(path)
            except ValueError:
                refused += 1
                assert target.state["step"] == 0 and not target.flat_params.any()
                continue
            assert fingerprint(target) == fingerprint(opt), (offset, bit)
            target = fastopt.SGD([np.zeros(3, f32)], lr=0.1)
    assert_all_unchanged(target, before)
    assert refused > len(offsets)  # most flips are noticed


def test_damaged_files_name_the_file_and_a_missing_one_raises_its_os_error(tmp_path):
    path = tmp_path / "c.npz"
    path.write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(ValueError, match="c.npz"):
        fastopt.load(path)
    np.save(tmp_path / "plain.npy", np.ones(3))
    with pytest.raises(ValueError, match="plain.npy"):
        fastopt.load(tmp_path / "plain.npy")
    with pytest.raises(FileNotFoundError):
        fastopt.load(tmp_path / "missing.npz")


# -- structured gradients that alias flat_grads --------------------------------------

def test_structured_gradients_that_are_views_of_flat_grads_in_another_order():
    p0 = np.arange(1, 7, dtype=f32)
    opt = fastopt.SGD({"a": p0[:3].copy(), "b": p0[3:].copy()}, lr=1.0)
    g = np.array([10, 20, 30, 40, 50, 60], f32)
    opt.flat_grads[:] = g
    flat = opt.flat_grads
    opt.step({"a": flat[3:6], "b": flat[0:3]})  # swapped
    np.testing.assert_array_equal(opt.params["a"], p0[:3] - g[3:])
    np.testing.assert_array_equal(opt.params["b"], p0[3:] - g[:3])
    np.testing.assert_array_equal(opt.flat_grads, np.concatenate([g[3:], g[:3]]))


def test_overlapping_and_in_place_gradient_views_give_the_right_step():
    p0 = np.zeros(8, f32)
    opt = fastopt.SGD([{"params": [p0[:4].copy()]}, {"params": {"m": p0[4:].reshape(2, 2)}}],
                      lr=1.0)
    g = np.arange(1, 9, dtype=f32)
    opt.flat_grads[:] = g
    flat = opt.flat_grads
    # group 0 reads elements 1..4 (shifted by one), group 1 its own view in place
    opt.step([[flat[1:5]], {"m": opt.grads[1]["m"]}])
    expected = -np.concatenate([g[1:5], g[4:]])
    np.testing.assert_array_equal(opt.flat_params, expected)
    opt.flat_grads[:] = g
    opt.step([[flat[4:8]], {"m": flat[0:4].reshape(2, 2)}])  # a swap across groups
    np.testing.assert_array_equal(opt.flat_params, expected - np.concatenate([g[4:], g[:4]]))


def test_gradients_passed_as_the_optimizers_own_views_need_no_copy():
    opt = fastopt.SGD({"w": np.ones((20, 50), f32)}, lr=0.5)
    opt.grads["w"][...] = 2.0
    opt.step(opt.grads)  # warm up
    tracemalloc.start()
    opt.step(opt.grads)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 4 * 1000  # no gradient-sized temporary
    np.testing.assert_array_equal(opt.params["w"], -1.0)


# -- folded scalars that overflow float32, against torch ------------------------------

# (algorithm, hyperparameters, the hyperparameters the error must name, or None where
# the step's scalars fit in float32 and fastopt must agree with torch)
HUGE = [
    ("Adam", dict(lr=1e38), ["lr"]),  # torch raises: lr / (1 - beta1) overflows
    ("Adamax", dict(lr=1e38), ["lr"]),  # torch raises too
    ("RAdam", dict(lr=1e38), ["lr"]),  # torch stays finite: it divides m first
    ("AdamW", dict(lr=1e37, weight_decay=100.0), ["lr", "weight_decay"]),  # torch: inf
    ("SGD", dict(lr=3e38), None),
    ("Adam", dict(lr=3e37), None),
    ("NAdam", dict(lr=1e38), None),
    ("Adadelta", dict(lr=3e38), None),
]


@pytest.mark.filterwarnings("ignore:overflow encountered")
@pytest.mark.parametrize("name, kwargs, culprits", HUGE, ids=lambda x: str(x))
def test_a_huge_hyperparameter_is_refused_where_its_float32_scalars_overflow(name, kwargs,
                                                                              culprits):
    torch = pytest.importorskip("torch")
    p0 = np.array([1.0, -2.0, 0.5], f32)
    g = np.array([1.0, 0.5, -0.25], f32)
    param = torch.nn.Parameter(torch.from_numpy(p0.copy()))
    reference = getattr(torch.optim, name)([param], foreach=False, **kwargs)
    try:
        for _ in range(2):
            param.grad = torch.from_numpy(g.copy())
            reference.step()
        expected = param.detach().numpy()
    except RuntimeError as error:
        assert "overflow" in str(error)
        expected = None
    opt = getattr(fastopt, name)([p0.copy()], **kwargs)
    if culprits is None:
        for _ in range(2):
            opt.step(g)
        np.testing.assert_allclose(opt.flat_params, expected, rtol=1e-6)
        return
    before = everything(opt)
    with pytest.raises(ValueError, match="overflows float32") as error:
        opt.step(g)
    named = {word.split("=")[0] for word in str(error.value).split() if "=" in word}
    assert named >= set(culprits), str(error.value)
    assert_all_unchanged(opt, before)


@pytest.mark.filterwarnings("ignore:overflow encountered")
def test_a_schedule_that_grows_huge_is_refused_at_that_step():
    opt = fastopt.Adam([np.ones(3, f32)], lr=lambda t: 1e-3 if t < 2 else 1e38)
    opt.step(np.ones(3, f32))
    opt.step(np.ones(3, f32))
    before = everything(opt)
    with pytest.raises(ValueError, match="lr=1e.38 overflows float32"):
        opt.step(np.ones(3, f32))
    assert_all_unchanged(opt, before)


def test_a_loss_scale_whose_inverse_overflows_is_refused():
    opt = fastopt.SGD([np.ones(3, f32)], lr=0.1)
    with pytest.raises(ValueError, match="grad_scale"):
        opt.step(np.ones(3, f32), grad_scale=1e-39)
    assert opt.state["step"] == 0


# -- schedules: the optimizer's must be the saved one ----------------------------------

def test_a_checkpoint_with_another_schedule_is_refused(tmp_path):
    path = tmp_path / "s.npz"
    opt = fastopt.SGD([np.ones(4, f32)], lr=schedules.StepDecay(0.1, step_size=3))
    opt.step(np.ones(4, f32))
    fastopt.save(opt, path)
    other = fastopt.SGD([np.ones(4, f32)], lr=schedules.StepDecay(0.1, step_size=4))
    before = everything(other)
    with pytest.raises(ValueError, match="StepDecay.*step_size=3.*step_size=4"):
        other.load(path)
    assert_all_unchanged(other, before)
    same = fastopt.SGD([np.ones(4, f32)], lr=schedules.StepDecay(0.1, step_size=3))
    same.load(path)
    assert same.state["step"] == 1


def warmup(t):
    return 0.01 * min(1.0, (t + 1) / 10)


def constant(t):
    return 0.01


def test_a_plain_function_schedule_is_matched_by_name_not_by_address(tmp_path):
    opt = fastopt.SGD([np.ones(2, f32)], lr=warmup)
    opt.step(np.ones(2, f32))
    state = opt.state_dict()
    saved = state["meta"]["groups"][0]["lr"]["schedule"]
    assert " at 0x" in saved
    # In another process the same function has another address.
    state["meta"]["groups"][0]["lr"]["schedule"] = saved.split(" at 0x")[0] + " at 0x1234>"
    state["meta"] = seal(state["meta"], state["arrays"])
    resumed = fastopt.SGD([np.ones(2, f32)], lr=warmup)
    resumed.load_state_dict(state)
    assert resumed.state["step"] == 1
    other = fastopt.SGD([np.ones(2, f32)], lr=constant)
    with pytest.raises(ValueError, match="function warmup.*function constant"):
        other.load_state_dict(state)


# -- orphaned temporary files --------------------------------------------------------

SLOW_SAVE = """
import sys, time
import numpy as np
import fastopt
from fastopt import checkpoint

def stalled(file, contents):  # a save that stops half-way, as a killed one does
    file.write(b"partial")
    file.flush()
    print("writing", flush=True)
    time.sleep(120)

checkpoint._write = stalled
fastopt.save(fastopt.SGD([np.ones(3, np.float32)]), sys.argv[1])
"""


def temporaries(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_the_next_save_deletes_a_killed_saves_file_but_never_a_live_ones(tmp_path):
    other = tmp_path / "other.npz"
    writer = subprocess.Popen([sys.executable, "-c", SLOW_SAVE, str(other)],
                              stdout=subprocess.PIPE, text=True, cwd="/")
    try:
        assert writer.stdout.readline().strip() == "writing"
        [live] = temporaries(tmp_path)
        assert live.startswith(f".fastopt-{writer.pid}-")
        unrelated = ["notes.tmp", ".fastopt-x.tmp", ".fastopt-12-zzzzzzzz-abc.tmp"]
        for name in unrelated:
            (tmp_path / name).write_bytes(b"keep")
        opt = fastopt.SGD([np.ones(3, f32)])
        fastopt.save(opt, tmp_path / "mine.npz")
        assert live in temporaries(tmp_path)  # its writer still runs
    finally:
        writer.kill()
        writer.wait()
    assert live in temporaries(tmp_path)  # killed: an orphan now
    fastopt.save(opt, tmp_path / "mine.npz")
    assert temporaries(tmp_path) == sorted(n for n in unrelated if n.endswith(".tmp"))
    assert not other.exists()
    fastopt.load(tmp_path / "mine.npz")


# -- adopt's shapes -------------------------------------------------------------------

def test_adopt_reads_a_tuple_of_ints_as_one_shape():
    flat = np.arange(4, dtype=f32)
    matrix = fastopt.SGD(fastopt.adopt(flat, (2, 2)))
    assert [v.shape for v in matrix.params] == [(2, 2)]
    np.testing.assert_array_equal(matrix.params[0], [[0, 1], [2, 3]])
    scalar = fastopt.SGD(fastopt.adopt(flat[:1], ()))
    assert [v.shape for v in scalar.params] == [()]
    vectors = fastopt.SGD(fastopt.adopt(flat, [(2,), 2]))
    assert [v.shape for v in vectors.params] == [(2,), (2,)]
    assert [v.shape for v in fastopt.SGD(fastopt.adopt(flat, [4])).params] == [(4,)]
    with pytest.raises(TypeError, match=r"ambiguous: write \(2, 2\) .* or \[\(2,\), \(2,\)\]"):
        fastopt.SGD(fastopt.adopt(flat, [2, 2]))
    with pytest.raises(ValueError, match="add up to 6"):
        fastopt.SGD(fastopt.adopt(flat, (2, 3)))


# -- read-only views ------------------------------------------------------------------

def test_rebinding_a_parameter_or_gradient_is_refused_with_what_to_do_instead():
    w = np.ones((2, 3), f32)
    opt = fastopt.SGD({"w": w, "b": np.ones(3, f32)}, lr=1.0)
    grouped = fastopt.SGD([{"params": [np.ones(2, f32)]}, {"params": {"c": np.ones(1, f32)}}])
    before = everything(opt)
    refusals = [
        lambda: opt.params.__setitem__("w", np.zeros((2, 3), f32)),
        lambda: opt.grads.__setitem__("b", np.zeros(3, f32)),
        lambda: opt.params.update(w=np.zeros((2, 3), f32)),
        lambda: opt.params.pop("w"),
        lambda: opt.params.__delitem__("b"),
        lambda: opt.param_groups[0]["params"].__setitem__("w", np.zeros((2, 3), f32)),
        lambda: grouped.params[0].__setitem__(0, np.zeros(2, f32)),
        lambda: grouped.params[0].append(np.zeros(2, f32)),
        lambda: grouped.params.__setitem__(1, {}),
        lambda: grouped.grads[1].setdefault("d", np.zeros(1, f32)),
    ]
    for refusal in refusals:
        with pytest.raises(TypeError, match=r"read-only.*\[\.\.\.\] = array"):
            refusal()
    assert set(opt.params) == {"w", "b"} and len(grouped.params[0]) == 1
    assert_all_unchanged(opt, before)
    opt.params["w"][...] = 5.0  # what the message says to do
    opt.grads["w"][...] = 1.0
    opt.step()
    np.testing.assert_array_equal(opt.params["w"], 4.0)
    assert isinstance(opt.params, dict) and isinstance(grouped.params, list)
    assert copy.deepcopy(opt.params)["w"].shape == (2, 3)
    plain = dict(opt.params)
    plain["w"] = np.zeros(1)  # a copy of the mapping is the caller's own


# -- the command line -----------------------------------------------------------------

def usage_error(argv, capsys):
    with pytest.raises(SystemExit) as exit:
        main(argv)
    err = capsys.readouterr().err
    assert exit.value.code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("argv, match", [
    (["bench", "--algorithms", "Nope"], "--algorithms: unknown Nope"),
    (["bench", "--algorithms", "Adam,,SGD"], "--algorithms"),
    (["bench", "--sizes", "-5"], "--sizes"),
    (["bench", "--sizes", "1e3,abc"], "--sizes"),
    (["bench", "--sizes", "1.5"], "--sizes"),
    (["bench", "--threads", "0"], "--threads"),
    (["bench", "--threads", str(numba.config.NUMBA_NUM_THREADS + 1)], "--threads"),
    (["bench", "--threads", "two"], "--threads"),
    (["bench", "--rounds", "0"], "--rounds"),
    (["check", "--sizes", "-5"], "--sizes"),
    (["check", "--steps", "0"], "--steps"),
    (["nope"], "invalid choice"),
    ([], "command"),
])
def test_bad_arguments_are_one_line_usage_errors(argv, match, capsys):
    assert match in usage_error(argv, capsys)


def test_cuda_without_a_gpu_and_an_out_that_is_a_file_are_usage_errors(tmp_path, capsys):
    from numba import cuda

    if not cuda.is_available():
        assert "no CUDA GPU" in usage_error(["bench", "--device", "cuda"], capsys)
    (tmp_path / "file").write_text("x")
    for command in ("bench", "demo"):
        assert "--out" in usage_error([command, "--out", str(tmp_path / "file")], capsys)


def test_the_installed_command_prints_no_traceback():
    run = subprocess.run([sys.executable, "-m", "fastopt", "bench", "--sizes", "-5"],
                         capture_output=True, text=True, cwd="/")
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [
        "fastopt bench: error: argument --sizes: sizes must be whole numbers >= 1, got '-5' "
        "(see fastopt bench --help)"]


def test_a_step_whose_host_state_cannot_be_computed_changes_nothing():
    # ASGD's eta = lr / (1 + lambd * lr * t) ** alpha overflows float64 for this alpha,
    # which its checks let through: the error comes before the kernel runs.
    opt = fastopt.ASGD([np.ones(3, f32)], lr=0.01)
    opt.step(np.ones(3, f32))
    opt.param_groups[0]["alpha"] = 2.0 ** 70
    before = everything(opt)
    with pytest.raises((ArithmeticError, ValueError)):
        opt.step(np.ones(3, f32))
    assert_all_unchanged(opt, before)


@pytest.mark.filterwarnings("ignore:overflow encountered")
def test_scalars_are_refused_exactly_where_float32_rounds_them_to_infinity():
    # The host folds scalars in float64; the kernels get them rounded to float32.
    from fastopt.kernels import rules
    from fastopt.optim.engine import FLOAT32_OVERFLOW, _finite

    largest = np.nextafter(FLOAT32_OVERFLOW, 0.0)  # rounds down to float32's largest
    assert np.isfinite(np.float32(largest)) and np.isinf(np.float32(FLOAT32_OVERFLOW))
    for value in (largest, -largest, 0.0, 1e-60):
        assert _finite(rules.SGDScalars(lr=value, momentum=0.9, grad_weight=1.0,
                                        nesterov=True)), value
    for value in (FLOAT32_OVERFLOW, -FLOAT32_OVERFLOW, np.inf, np.nan):
        assert not _finite(rules.SGDScalars(lr=value, momentum=0.9, grad_weight=1.0,
                                            nesterov=True)), value
    # Every number fits though their norm does not; numbers whose float64 sum overflows.
    assert _finite(rules.SGDScalars(lr=largest, momentum=-largest, grad_weight=largest,
                                    nesterov=True))
    assert not _finite(rules.SGDScalars(lr=1e308, momentum=1e308, grad_weight=1.0,
                                        nesterov=True))


def _three_steps(size):
    opt = fastopt.Adam([np.ones(size, np.float32)], lr=1e-2)
    for i in range(3):
        opt.step([np.full(size, 0.5 + i, np.float32)])
    return opt.flat_params.copy()


@pytest.mark.skipif(sys.platform != "linux", reason="the fork start method of Linux")
def test_a_process_forked_after_parallel_steps_steps_on_with_the_same_bits():
    """GNU OpenMP (Numba's default threading layer here) kills a forked child at its
    first parallel loop once the parent's threads have started: a fork-context Pool's
    task never came back, a DataLoader worker died. The child runs the serial loops."""
    import multiprocessing

    from fastopt.kernels import cpu

    size = 4 * cpu.PARALLEL_MIN_SIZE
    expected = _three_steps(size)  # the parallel loop, here: the threads have started
    with multiprocessing.get_context("fork").Pool(1) as pool:
        got = pool.apply_async(_three_steps, (size,)).get(timeout=120)
    np.testing.assert_array_equal(got, expected)
