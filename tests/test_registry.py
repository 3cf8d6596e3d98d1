"""The registry of algorithms (fastopt.optim.ALGORITHMS): every registered algorithm is
everywhere an algorithm belongs, and the classes built from its spec take the arguments
the spec declares (and, in fastopt.torch, those of the torch.optim namesake)."""

import inspect
from pathlib import Path

import pytest

import cases
import fastopt
import test_checkpoint
import test_determinism
import test_kernels
import test_training
from fastopt import bench, cli

ROOT = Path(__file__).resolve().parent.parent
REGISTERED = list(fastopt.optim.ALGORITHMS)


def test_every_algorithm_class_is_registered():
    exported = {name for name in fastopt.__all__
                if inspect.isclass(getattr(fastopt, name))
                and issubclass(getattr(fastopt, name), fastopt.Optimizer)}
    assert exported - {"Optimizer"} == set(REGISTERED)


@pytest.mark.parametrize("name", REGISTERED)
def test_every_algorithm_is_everywhere_an_algorithm_belongs(name):
    spec = getattr(fastopt, name).spec
    import fastopt.torch as ft

    missing = [where for where, names in [
        ("fastopt.__all__", fastopt.__all__),
        ("fastopt.torch", ft.__all__),
        ("fastopt bench", bench.ALGORITHMS),
        ("fastopt check", cli.ALGORITHMS),
        ("the option matrix (tests/cases.py)", cases.CASES),
        ("tests/test_checkpoint.py", test_checkpoint.ALGORITHMS),
        ("tests/test_determinism.py", test_determinism.ALGORITHMS),
        ("tests/test_training.py", test_training.EVERY_ALGORITHM),
    ] if name not in names]
    headings = [line[3:].strip().lower() for line in
                (ROOT / "docs" / "algorithms.md").read_text().splitlines()
                if line.startswith("## ")]
    if name.lower() not in headings:
        missing.append("a section of docs/algorithms.md")
    if name.lower() not in (ROOT / "README.md").read_text().lower():
        missing.append("README.md")
    single_pass_rules = {getattr(fastopt, n).rule for n in test_kernels.EVERY_RULE}
    if spec.passes == (fastopt.optim.spec.MAP,) and spec.rule not in single_pass_rules:
        missing.append("the kernel checks (tests/test_kernels.py)")
    assert not missing, f"{name} is registered but missing from {missing}"
    assert spec.bench.keys() <= set(spec.defaults) and spec.check.keys() <= set(spec.defaults)


@pytest.mark.parametrize("name", REGISTERED)
def test_the_numpy_class_takes_the_specs_hyperparameters(name):
    spec = getattr(fastopt, name).spec
    parameters = list(inspect.signature(getattr(fastopt, name)).parameters.values())
    assert [p.name for p in parameters] == (
        ["params"] + [h.name for h in spec.hyperparameters] + ["options"])
    for p, h in zip(parameters[1:], spec.hyperparameters):
        assert p.default == h.default
        assert (p.kind is p.KEYWORD_ONLY) == h.keyword_only
    assert parameters[-1].kind is inspect.Parameter.VAR_KEYWORD


@pytest.mark.parametrize("name", REGISTERED)
def test_the_torch_class_takes_its_namesakes_arguments_then_fastopts(name):
    torch = pytest.importorskip("torch")
    import fastopt.torch as ft

    spec = getattr(fastopt, name).spec
    ours = list(inspect.signature(getattr(ft, name)).parameters.values())
    if spec.torch is None:
        assert ours == list(inspect.signature(getattr(fastopt, name)).parameters.values())
        return
    theirs = list(inspect.signature(getattr(torch.optim, spec.torch)).parameters.values())
    described = [(p.name, p.kind, p.default) for p in ours]
    assert described[:len(theirs)] == [(p.name, p.kind, p.default) for p in theirs]
    extra = described[len(theirs):]
    assert extra[-1][:2] == ("options", inspect.Parameter.VAR_KEYWORD)
    additions = {h.name: h.default for h in spec.hyperparameters
                 if h.name not in {p.name for p in theirs}}
    assert extra[:-1] == [(n, inspect.Parameter.KEYWORD_ONLY, d) for n, d in additions.items()]
