"""No module of fastvq.nn touches another class's or module's private members: an attribute
`obj._name` (not a dunder) is read only on `self`, `cls` or `super()`, and no `_name` is imported.
The layers talk to each other and to their token quantizers through public API only, which is what
the next quantizers build on. (import-linter checks modules, not attributes, so this is an ast walk.)"""

import ast
from pathlib import Path

import pytest

NN = Path(__file__).resolve().parents[2] / "fastvq" / "nn"
OWN = ("self", "cls")


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def is_own(node: ast.expr) -> bool:
    """self, cls or super()."""
    if isinstance(node, ast.Name):
        return node.id in OWN
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "super"


def private_accesses(source: str, filename: str = "<source>") -> list[str]:
    """'file:line: what' for every private attribute read on another object and every private import."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Attribute) and is_private(node.attr) and not is_own(node.value):
            found.append(f"{filename}:{node.lineno}: {ast.unparse(node)}")
        elif isinstance(node, ast.ImportFrom):
            names = [alias.name for alias in node.names] + (node.module or "").split(".")
            found += [f"{filename}:{node.lineno}: import of {name}" for name in names if is_private(name)]
        elif isinstance(node, ast.Import):
            found += [
                f"{filename}:{node.lineno}: import of {alias.name}"
                for alias in node.names
                if any(is_private(part) for part in alias.name.split("."))
            ]
    return found


def test_no_nn_module_touches_private_members_of_others():
    files = sorted(NN.rglob("*.py"))
    assert len(files) >= 10
    found = [hit for path in files for hit in private_accesses(path.read_text(), str(path.relative_to(NN.parent)))]
    assert not found, "private members touched across fastvq.nn:\n" + "\n".join(found)


@pytest.mark.parametrize(
    "code",
    [
        "layer._codebook.update_ema()",  # another object's private attribute
        "rvq.layers[0]._quantize_tokens(x)",
        "VectorQuantize._param_dtype(module, t)",  # a private static method through the class
        "self._codebook._init_pending = None",  # private attribute of one's own attribute
        "from .vector_quantize import VectorQuantize, _check_int",
        "from torch import _C",
        "from ._helpers import lookup",
        "import torch._dynamo",
    ],
)
def test_the_rule_catches_private_access(code):
    assert private_accesses(code), code


@pytest.mark.parametrize(
    "code",
    [
        "self._codebook.update_ema()",
        "cls._registry[name] = value",
        "super()._apply(fn, recurse)",
        "layer.__class__.__name__",
        "x.__dict__",
        "from .codebook import Codebook",
    ],
)
def test_the_rule_allows_own_and_public_members(code):
    assert not private_accesses(code), code
