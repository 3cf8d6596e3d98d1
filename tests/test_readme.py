"""The README's Python examples run as written (the GPU one where a GPU is present)."""

import re
from pathlib import Path

import pytest

README = Path(__file__).parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_the_readme_has_examples():
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: b.splitlines()[0])
def test_readme_example_runs(block):
    if "cupy" in block:
        pytest.importorskip("cupy")
    exec(compile(block, str(README), "exec"), {})
