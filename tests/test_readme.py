"""Every Python snippet in README.md and in the docs site's pages runs as written, each in a fresh
namespace, and computes finite tensors; the site builds with `mkdocs build --strict`."""

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", REPO / "CONTRIBUTING.md", *sorted((REPO / "docs").rglob("*.md"))]
SNIPPETS = [
    (page, code) for page in PAGES for code in re.findall(r"^```python\n(.*?)^```", page.read_text(), flags=re.S | re.M)
]


def test_readme_has_python_snippets():
    assert sum(page.name == "README.md" for page, _ in SNIPPETS) >= 3


def test_readme_is_a_front_page():
    assert len((REPO / "README.md").read_text().splitlines()) <= 250


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize(
    ("page", "code"), SNIPPETS, ids=[f"{page.relative_to(REPO)}-{i}" for i, (page, _) in enumerate(SNIPPETS)]
)
def test_snippet_runs(page, code, monkeypatch):
    monkeypatch.chdir(REPO)  # paths in the pages are relative to the repository
    namespace = {"__name__": "readme"}
    exec(compile(code, str(page), "exec"), namespace)
    results = {name: value for name, value in namespace.items() if isinstance(value, torch.Tensor)}
    assert results, "the snippet computes no tensor"
    for name, value in results.items():
        if value.is_floating_point():
            assert torch.isfinite(value.detach()).all(), f"{name} has non-finite values"


@pytest.mark.skipif(
    importlib.util.find_spec("mkdocs") is None,
    reason="mkdocs is not installed (pip install -e '.[docs]'; CI installs it with '.[all]')",
)
def test_docs_site_builds_strictly(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert (tmp_path / "api" / "ops" / "index.html").exists()
