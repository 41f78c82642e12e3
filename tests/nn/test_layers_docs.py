"""docs/layers.md: its Python examples run as written (each in a fresh namespace) and compute finite
tensors, the SimVQ-style example trains its map, and its argument table is the code's table."""

import re
from pathlib import Path

import pytest
import torch

from fastvq.nn.arguments import ARGUMENTS

PAGE = Path(__file__).resolve().parents[2] / "docs" / "layers.md"
SNIPPETS = re.findall(r"^```python\n(.*?)^```", PAGE.read_text(), flags=re.S | re.M)


def test_the_page_has_examples():
    assert len(SNIPPETS) >= 2


@pytest.mark.parametrize("code", SNIPPETS, ids=[f"example{i}" for i in range(len(SNIPPETS))])
def test_example_runs(code):
    namespace = {"__name__": "layers_docs"}
    exec(compile(code, str(PAGE), "exec"), namespace)
    tensors = {name: value for name, value in namespace.items() if isinstance(value, torch.Tensor)}
    assert tensors, "the example computes no tensor"
    for name, value in tensors.items():
        if value.is_floating_point():
            assert torch.isfinite(value.detach()).all(), f"{name} has non-finite values"
    if "map_grad" in namespace:
        assert namespace["map_grad"].abs().sum() > 0
        assert 0 < float(namespace["usage"]) <= 1


def test_the_argument_table_is_the_code_table():
    rows = re.findall(r"^\| `(\w+)` \| (.*?) \| (.*?) \|$", PAGE.read_text(), flags=re.M)
    documented = {name: (accepts, meaning) for name, accepts, meaning in rows if name in ARGUMENTS}
    assert documented == {name: (spec.expected(), spec.meaning) for name, spec in ARGUMENTS.items()}
