"""The registry of algorithms (fastopt.optim.ALGORITHMS): every registered algorithm is
everywhere an algorithm belongs, and the classes built from its spec take the arguments
the spec declares (and, in fastopt.torch, those of the torch.optim namesake)."""

import inspect
from pathlib import Path

import numpy as np
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


def _keyword_only(init):
    return [(p.name, p.kind, p.default) for p in inspect.signature(init).parameters.values()
            if p.kind is p.KEYWORD_ONLY]


@pytest.mark.parametrize("name", REGISTERED)
def test_the_numpy_class_takes_the_specs_hyperparameters_then_every_option(name):
    cls = getattr(fastopt, name)
    parameters = list(inspect.signature(cls).parameters.values())
    hyperparameters = cls.spec.hyperparameters
    assert [p.name for p in parameters[:len(hyperparameters) + 1]] == (
        ["params"] + [h.name for h in hyperparameters])
    for p, h in zip(parameters[1:], hyperparameters):
        assert p.default == h.default
        assert (p.kind is p.KEYWORD_ONLY) == h.keyword_only
    # the base class's options, named in the signature (help() shows them), not **options
    assert ([(p.name, p.kind, p.default) for p in parameters[len(hyperparameters) + 1:]]
            == _keyword_only(fastopt.optim.Optimizer.__init__))
    with pytest.raises(TypeError, match=rf"^{name}\.__init__\(\) got an unexpected keyword "
                       "argument 'clip_norm'"):
        cls([np.zeros(3, np.float32)], clip_norm=1.0)


@pytest.mark.parametrize("name", REGISTERED)
def test_the_torch_class_takes_its_namesakes_arguments_then_fastopts(name):
    torch = pytest.importorskip("torch")
    import fastopt.torch as ft

    spec = getattr(fastopt, name).spec
    ours = [(p.name, p.kind, p.default)
            for p in inspect.signature(getattr(ft, name)).parameters.values()]
    options = _keyword_only(ft.Optimizer.__init__)
    assert ours[-len(options):] == options
    with pytest.raises(TypeError, match=rf"^{name}\.__init__\(\) got an unexpected keyword "
                       "argument 'clip_norm'"):
        getattr(ft, name)([torch.nn.Parameter(torch.zeros(3))], clip_norm=1.0)
    described = ours[:-len(options)]
    if spec.torch is None:
        numpy_options = len(_keyword_only(fastopt.optim.Optimizer.__init__))
        assert described == [(p.name, p.kind, p.default) for p in list(
            inspect.signature(getattr(fastopt, name)).parameters.values())[:-numpy_options]]
        return
    theirs = list(inspect.signature(getattr(torch.optim, spec.torch)).parameters.values())
    assert described[:len(theirs)] == [(p.name, p.kind, p.default) for p in theirs]
    additions = {h.name: h.default for h in spec.hyperparameters
                 if h.name not in {p.name for p in theirs}}
    assert described[len(theirs):] == [(n, inspect.Parameter.KEYWORD_ONLY, d)
                                       for n, d in additions.items()]
