"""Every Python snippet in README.md runs as written, each in a fresh namespace, and computes
finite tensors."""

import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"
SNIPPETS = re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def test_readme_has_python_snippets():
    assert len(SNIPPETS) >= 3


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("code", SNIPPETS, ids=[f"snippet{i}" for i in range(len(SNIPPETS))])
def test_snippet_runs(code, monkeypatch):
    monkeypatch.chdir(README.parent)  # paths in the README are relative to the repository
    namespace = {"__name__": "readme"}
    exec(compile(code, str(README), "exec"), namespace)
    results = {name: value for name, value in namespace.items() if isinstance(value, torch.Tensor)}
    assert results, "the snippet computes no tensor"
    for name, value in results.items():
        if value.is_floating_point():
            assert torch.isfinite(value.detach()).all(), f"{name} has non-finite values"
