"""``fastopt.save`` of fastopt.torch optimizers in one process: a folder that ``opt.load``
reads back bit for bit, and the refusals that change nothing. (Ranks saving and
loading in other numbers: test_torch_zero.)"""

import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import fastopt  # noqa: E402
import fastopt.torch as ft  # noqa: E402
from fastopt.optim.spec import ALGORITHMS  # noqa: E402

OPTIONS = {"SGD": dict(lr=0.05, momentum=0.9), "Adam": dict(lr=0.01, amsgrad=True),
           "ASGD": dict(lr=0.01, t0=1), "RMSprop": dict(lr=0.01, centered=True),
           "Adadelta": dict(lr=0.5)}


def model(dtype=torch.float32):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(80, 64), torch.nn.Tanh(),
                               torch.nn.Linear(64, 3)).to(dtype)


def train(net, opt, steps, first=0):
    for t in range(first, first + steps):
        generator = torch.Generator().manual_seed(t)
        x, y = torch.randn(8, 80, generator=generator), torch.randn(8, 3, generator=generator)
        opt.zero_grad()
        ((net(x.to(next(net.parameters()).dtype)).float() - y) ** 2).mean().backward()
        opt.step()


def state_of(opt):
    return [{name: value.clone() if isinstance(value, torch.Tensor) else value
             for name, value in opt.state[p].items()} for p in opt._all_params()]


def assert_same_runs(ours, theirs):
    """Two (model, optimizer) pairs with the same parameters and state, bit for bit."""
    for mine, other in zip(ours[0].parameters(), theirs[0].parameters()):
        assert torch.equal(mine, other)
    for mine, other in zip(state_of(ours[1]), state_of(theirs[1])):
        assert mine.keys() == other.keys()
        for key, value in other.items():
            assert torch.equal(mine[key], value) if isinstance(value, torch.Tensor) \
                else mine[key] == value, key


CASES = [(name, OPTIONS.get(name, dict(lr=0.01)), torch.float32) for name in ALGORITHMS] + [
    ("AdamW", dict(lr=0.01, state_dtype="int8"), torch.float32),
    ("AdamW", dict(lr=0.01, master_weights="remainder", state_dtype="bfloat16"),
     torch.bfloat16)]


@pytest.mark.parametrize("name, kwargs, dtype", CASES,
                         ids=[f"{n}-{'-'.join(map(str, k.values()))}" for n, k, _ in CASES])
def test_a_saved_folder_resumes_bit_for_bit(tmp_path, name, kwargs, dtype):
    net = model(dtype)
    opt = getattr(ft, name)(net.parameters(), **kwargs)
    train(net, opt, 3)
    fastopt.save(opt, tmp_path / "checkpoint")
    assert sorted(os.listdir(tmp_path / "checkpoint")) == ["index.json", "rank0.pt"]
    saved = [p.detach().clone() for p in net.parameters()]
    train(net, opt, 3, first=3)
    again = model(dtype)
    with torch.no_grad():
        for p, value in zip(again.parameters(), saved):
            p.copy_(value)
    resumed = getattr(ft, name)(again.parameters(), **kwargs)
    resumed.load(tmp_path / "checkpoint")
    train(again, resumed, 3, first=3)
    assert_same_runs((again, resumed), (net, opt))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("relaid", [False, True], ids=["same layout", "transposed"])
def test_a_saved_state_put_in_place_resumes_as_a_loaded_one(dtype, relaid):
    """torch's ZeroRedundancyOptimizer loads a checkpoint by putting each parameter's
    saved state in place (``opt.state[p] = saved``): 8-bit codes as state_dict() saves
    them, which are taken as load_state_dict takes them (their strides were taken for a
    buffer of the wrong shape), decoded and encoded again into a parameter laid out
    otherwise (whose blocks run through other elements); float32 master weights beside
    them for a bfloat16 model."""
    import copy

    kwargs = dict(state_dtype="int8")
    net = model(dtype)
    opt = ft.AdamW(net.parameters(), lr=0.01, **kwargs)
    train(net, opt, 3)
    saved = copy.deepcopy(opt.state_dict())
    assert any(name.endswith("_codes") for name in saved["state"][0])
    twins = []
    for put_in_place in (False, True):
        twin = model(dtype)
        with torch.no_grad():
            for mine, theirs in zip(twin.parameters(), net.parameters()):
                mine.copy_(theirs)
                if relaid and mine.dim() == 2:
                    mine.data = mine.data.t().contiguous().t()
        resumed = ft.AdamW(twin.parameters(), lr=0.01, **kwargs)
        if put_in_place:
            for p, state in zip(twin.parameters(), copy.deepcopy(saved)["state"].values()):
                resumed.state[p] = state
        else:
            resumed.load_state_dict(copy.deepcopy(saved))
        train(twin, resumed, 3, first=3)
        twins.append((twin, resumed))
    assert_same_runs(*twins)


def test_float32_master_weights_put_in_place_into_remainders_are_refused_unchanged():
    """Remainders hold the low halves of master weights beside a parameter rounded ties
    away from zero: float32 ones put in place are refused (load_state_dict takes them),
    rather than split beside a parameter rounded otherwise."""
    import copy

    net = model(torch.bfloat16)
    opt = ft.AdamW(net.parameters(), lr=0.01, master_weights="remainder")
    train(net, opt, 2)
    saved = copy.deepcopy(opt.state_dict())
    p = next(net.parameters())
    before, weights = state_of(opt), p.detach().clone()
    opt.state[p] = saved["state"][0]
    with pytest.raises(TypeError, match="has dtype torch.float32; fastopt keeps it in torch.int16"):
        train(net, opt, 1, first=2)
    assert torch.equal(p.detach(), weights)
    assert all(torch.equal(a["master"], b["master"])
               for a, b in zip(state_of(opt)[1:], before[1:]))
    opt.load_state_dict(saved)
    train(net, opt, 1, first=2)


def test_fastopt_load_of_a_fastopt_torch_folder_says_what_loads_it(tmp_path):
    net = model()
    opt = ft.Adam(net.parameters(), lr=0.01)
    train(net, opt, 1)
    fastopt.save(opt, tmp_path / "checkpoint")
    with pytest.raises(ValueError, match=r"is a folder, not a checkpoint file: .*opt\.load"):
        fastopt.load(tmp_path / "checkpoint")


def test_a_checkpoint_that_does_not_fit_is_refused_and_changes_nothing(tmp_path):
    net = model()
    opt = ft.Adam(net.parameters(), lr=0.01)
    train(net, opt, 2)
    fastopt.save(opt, tmp_path / "adam")
    other = ft.AdamW(model().parameters(), lr=0.01)
    train(model(), other, 1)
    wider = ft.Adam(torch.nn.Linear(81, 64).parameters(), lr=0.01)
    for target, path, match in (
            (other, tmp_path / "adam", "holds the state of Adam, not of AdamW"),
            (wider, tmp_path / "adam", r"shapes \[\(64, 80\)"),
            (opt, tmp_path, "no fastopt.torch checkpoint folder")):
        before = state_of(target)
        with pytest.raises(ValueError, match=match):
            target.load(path)
        for mine, theirs in zip(state_of(target), before):
            assert all(torch.equal(mine[k], v) if isinstance(v, torch.Tensor) else mine[k] == v
                       for k, v in theirs.items())
    (tmp_path / "adam" / "rank0.pt").write_bytes(b"not a torch file")
    before = state_of(opt)
    with pytest.raises(ValueError, match="rank0.pt does not read"):
        opt.load(tmp_path / "adam")
    assert all(torch.equal(a["exp_avg"], b["exp_avg"]) for a, b in zip(state_of(opt), before))


@pytest.mark.parametrize("contents", [[1, 2], {"state": {}}, {"param_groups": []},
                                      {"state": {0: [1.0]}, "param_groups": []}], ids=str)
def test_a_rank_file_that_holds_no_state_dict_is_refused_naming_it(tmp_path, contents):
    net = model()
    opt = ft.Adam(net.parameters(), lr=0.01)
    train(net, opt, 2)
    fastopt.save(opt, tmp_path / "adam")
    torch.save(contents, tmp_path / "adam" / "rank0.pt")
    before = state_of(opt)
    with pytest.raises(ValueError, match="rank0.pt holds no state_dict of an optimizer"):
        opt.load(tmp_path / "adam")
    assert all(torch.equal(a["exp_avg"], b["exp_avg"]) for a, b in zip(state_of(opt), before))


def test_a_save_that_cannot_be_made_writes_nothing(tmp_path):
    opt = ft.Adam(model().parameters(), lr=0.01)
    train(model(), opt, 1)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    with pytest.raises(ValueError, match="no fastopt.torch checkpoint folder"):
        fastopt.save(opt, tmp_path / "notes")
    assert os.listdir(tmp_path / "notes") == ["todo.txt"]
    with pytest.raises(FileNotFoundError, match="its folder does not exist"):
        fastopt.save(opt, tmp_path / "missing" / "checkpoint")
    # 8-bit blocks follow a parameter's memory, which is not C order here
    weight = torch.nn.Parameter(torch.randn(80, 64).t())
    quantized = ft.Adam([weight], lr=0.01, state_dtype="int8")
    weight.grad = torch.randn(80, 64).t()
    quantized.step()
    with pytest.raises(ValueError, match="not contiguous and keeps 8-bit state"):
        fastopt.save(quantized, tmp_path / "transposed")
    assert sorted(os.listdir(tmp_path)) == ["notes"]


def test_an_index_that_describes_no_checkpoint_is_refused(tmp_path):
    import json

    opt = ft.Adam(model().parameters(), lr=0.01)
    train(model(), opt, 1)
    fastopt.save(opt, tmp_path / "checkpoint")
    index = json.loads((tmp_path / "checkpoint" / "index.json").read_text())
    for broken in ({**index, "files": ["../rank0.pt"]}, {**index, "world": 2},
                   {**index, "params": [{**index["params"][0], "pieces": [[0, 10 ** 9]]},
                                        *index["params"][1:]]},
                   {k: v for k, v in index.items() if k != "algorithm"},
                   {**index, "seed": "5"}):
        (tmp_path / "checkpoint" / "index.json").write_text(json.dumps(broken))
        with pytest.raises(ValueError, match="does not describe a checkpoint"):
            opt.load(tmp_path / "checkpoint")


def test_a_checkpoint_rounded_from_another_seed_is_refused_and_changes_nothing(tmp_path):
    """Its bits would go on from another stream: refused where both round
    stochastically, taken where either does not draw (or the folder predates the seed)."""
    import json

    def optimizer(net, **options):
        return ft.AdamW(net.parameters(), lr=0.01, master_weights=None, **options)

    net = model(torch.bfloat16)
    opt = optimizer(net, stochastic_rounding=True, seed=np.int64(5))  # JSON writes an int
    train(net, opt, 2)
    fastopt.save(opt, tmp_path / "seed5")
    other = optimizer(model(torch.bfloat16), stochastic_rounding=True, seed=6)
    train(model(torch.bfloat16), other, 1)
    before = state_of(other)
    with pytest.raises(ValueError, match="drew from seed 5, this optimizer's draws from seed 6"):
        other.load(tmp_path / "seed5")
    for mine, theirs in zip(state_of(other), before):
        assert all(torch.equal(mine[k], v) if isinstance(v, torch.Tensor) else mine[k] == v
                   for k, v in theirs.items())
    same = optimizer(model(torch.bfloat16), stochastic_rounding=True, seed=5)
    same.load(tmp_path / "seed5")
    assert same.state[next(iter(same.state))]["step"] == 2
    optimizer(model(torch.bfloat16)).load(tmp_path / "seed5")  # rounds to nearest
    fastopt.save(optimizer(model(torch.bfloat16)), tmp_path / "nearest")
    index = json.loads((tmp_path / "nearest" / "index.json").read_text())
    assert index["seed"] is None
    other.load(tmp_path / "nearest")
    index = json.loads((tmp_path / "seed5" / "index.json").read_text())
    del index["seed"]
    (tmp_path / "seed5" / "index.json").write_text(json.dumps(index))
    other.load(tmp_path / "seed5")


def test_a_save_killed_between_its_renames_is_put_in_place_by_the_next(tmp_path,
                                                                      monkeypatch):
    """The previous checkpoint renamed aside, the new one complete beside the place: a
    load says so, and the next save puts the new one in place first (here a save that
    then fails to write), deleting the previous."""
    import fastopt.torch_checkpoint as checkpoints

    net = model()
    opt = ft.Adam(net.parameters(), lr=0.01)
    train(net, opt, 1)
    fastopt.save(opt, tmp_path / "previous")
    train(net, opt, 1, first=1)
    fastopt.save(opt, tmp_path / "new")
    (tmp_path / "previous").rename(tmp_path / "checkpoint.old-1")
    (tmp_path / "new").rename(tmp_path / "checkpoint.partial-1")
    with pytest.raises(ValueError, match="checkpoint.partial-1, which the next save"):
        opt.load(tmp_path / "checkpoint")

    def fails(opt, name):
        raise OSError("No space left on device")
    monkeypatch.setattr(checkpoints, "_write_rank_file", fails)
    with pytest.raises(OSError, match="No space left"):
        fastopt.save(opt, tmp_path / "checkpoint")
    assert sorted(os.listdir(tmp_path)) == ["checkpoint"]
    resumed = ft.Adam(model().parameters(), lr=0.01)
    resumed.load(tmp_path / "checkpoint")
    for mine, theirs in zip(state_of(resumed), state_of(opt)):
        assert mine["step"] == theirs["step"] == 2
        assert torch.equal(mine["exp_avg"], theirs["exp_avg"])


@pytest.mark.parametrize("kwargs", [{}, dict(state_dtype="int8")], ids=["", "int8"])
def test_a_dcp_load_into_an_optimizer_that_has_stepped_resumes_bit_for_bit(tmp_path, kwargs):
    """torch.distributed.checkpoint's usual resume: a step makes the state, whose
    state_dict DCP loads into in place, and set_optimizer_state_dict loads that. The
    buffers it holds are the live ones (DCP wrote the checkpoint into them); the step
    counts are its copies, which hold the checkpoint's: the load must take those."""
    dcp = pytest.importorskip("torch.distributed.checkpoint")
    from torch.distributed.checkpoint.state_dict import (get_optimizer_state_dict,
                                                         set_optimizer_state_dict)
    net = model()
    opt = ft.AdamW(net.parameters(), lr=0.01, **kwargs)
    train(net, opt, 5)
    dcp.save({"optim": get_optimizer_state_dict(net, opt)}, checkpoint_id=tmp_path)
    weights = {name: value.clone() for name, value in net.state_dict().items()}
    train(net, opt, 3, first=5)
    resumed = model()
    resumed_opt = ft.AdamW(resumed.parameters(), lr=0.01, **kwargs)
    train(resumed, resumed_opt, 1, first=100)
    saved = get_optimizer_state_dict(resumed, resumed_opt)
    dcp.load({"optim": saved}, checkpoint_id=tmp_path)
    set_optimizer_state_dict(resumed, resumed_opt, optim_state_dict=saved)
    resumed.load_state_dict(weights)
    train(resumed, resumed_opt, 3, first=5)
    for p, q in zip(net.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
