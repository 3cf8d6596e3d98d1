"""Makes ``import fastopt.kernels`` work from a source checkout too.

The kernels live in ``kernels/`` beside the ``fastopt/`` package, which an install
(editable or not) maps to ``fastopt.kernels`` through pyproject.toml's ``package-dir``.
Python started at the repository root imports ``fastopt`` from the checkout instead,
where ``fastopt/kernels`` does not exist; importing this module loads the checkout's
``kernels/`` under that name, also where an editable install of another checkout would
map it elsewhere. An install, which has no ``pyproject.toml`` beside the package, is
left as it is.
"""

import importlib.util
import os
import sys

NAME = "fastopt.kernels"


def _load_from_checkout():
    if NAME in sys.modules:
        return
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    folder = os.path.join(root, "kernels")
    if not (os.path.isfile(os.path.join(root, "pyproject.toml"))
            and os.path.isfile(os.path.join(folder, "rules.py"))):
        return  # not a checkout: the import fails as it would anyway
    spec = importlib.util.spec_from_file_location(NAME, os.path.join(folder, "__init__.py"),
                                                  submodule_search_locations=[folder])
    module = importlib.util.module_from_spec(spec)
    sys.modules[NAME] = module
    spec.loader.exec_module(module)


_load_from_checkout()
