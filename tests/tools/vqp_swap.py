"""pytest plugin: run vector-quantize-pytorch's own test suite with its classes replaced by fastvq's.

    PYTHONPATH=tests/tools python -m pytest -p vqp_swap -p no:cacheprovider PATH/TO/vector-quantize-pytorch/tests

Every class that `vector_quantize_pytorch` exports and `fastvq` (or `fastvq.nn`) also defines is
swapped in the package's namespace and in the submodule that defines it before the test modules
import it (`from vector_quantize_pytorch import X` and `from vector_quantize_pytorch.<module> import
X` then get fastvq's X; what vector-quantize-pytorch's own modules imported before stays theirs);
the classes fastvq lacks stay vector-quantize-pytorch's, and the header of the run lists both. The
upstream tests are not part of this repository: fetch them from the package's source repository
(the README of docs/testing.md says which snapshot was used).
"""

from __future__ import annotations

import importlib
import sys


def swapped_classes() -> tuple[list[str], list[str]]:
    """(names swapped for fastvq's, names left to vector-quantize-pytorch), after swapping."""
    upstream = importlib.import_module("vector_quantize_pytorch")
    ours = [importlib.import_module("fastvq"), importlib.import_module("fastvq.nn")]
    swapped, kept = [], []
    for name in sorted(n for n in dir(upstream) if n[:1].isupper()):
        replacement = next((getattr(module, name) for module in ours if hasattr(module, name)), None)
        if replacement is None:
            kept.append(name)
            continue
        original = getattr(upstream, name)
        defining = sys.modules.get(getattr(original, "__module__", ""))
        if defining is not None and getattr(defining, name, None) is original:
            setattr(defining, name, replacement)
        setattr(upstream, name, replacement)
        swapped.append(name)
    return swapped, kept


def pytest_configure(config):
    config._vqp_swap = swapped_classes()


def pytest_report_header(config):
    swapped, kept = config._vqp_swap
    return [
        f"vqp_swap: fastvq's classes in place of vector-quantize-pytorch's: {', '.join(swapped)}",
        f"vqp_swap: still vector-quantize-pytorch's: {', '.join(kept) or 'none'}",
    ]
