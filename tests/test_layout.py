"""The package's layout holds: ruff's lint and format are clean, imports point one way (import-linter
contracts in pyproject.toml), the torch backend and the oracle load without triton, and the entry
points and checkpoints of before the move work."""

import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from fastvq.app.cli import main
from fastvq.app.evaluation import reconstruct
from fastvq.app.state import load_model
from fastvq.ops.kernel_sources import kernel_sources_dir

REPO = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parent / "data"
LINT = (
    "import sys; from importlinter.cli import lint_imports; "
    "sys.exit(lint_imports(config_filename='pyproject.toml', no_cache=True, no_logo=True))"
)


def _python(code: str, *, cwd: Path = REPO, pythonpath: Path | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


PYTHON_SOURCES = ("fastvq", "tests", "benchmarks", "setup.py")


def test_ruff_check_and_format_are_clean():
    """The lint rules and the formatting the pre-commit hooks apply (ruff's settings in pyproject.toml)."""
    for command in (["check"], ["format", "--check"]):
        result = subprocess.run(
            [sys.executable, "-m", "ruff", *command, *PYTHON_SOURCES],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, f"ruff {' '.join(command)}:\n" + result.stdout[-3000:] + result.stderr[-1000:]


def test_import_contracts_are_kept():
    result = _python(LINT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


def test_a_reversed_arrow_breaks_the_contracts(tmp_path):
    """The same contracts on a copy of the package in which the ops import the application fail."""
    shutil.copytree(REPO / "fastvq", tmp_path / "fastvq", ignore=shutil.ignore_patterns("__pycache__"))
    common = tmp_path / "fastvq" / "ops" / "common.py"
    common.write_text(common.read_text() + "\nfrom fastvq.app import cli  # noqa: E402, F401\n")
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    result = _python(LINT, cwd=tmp_path, pythonpath=tmp_path)
    assert result.returncode != 0, result.stdout[-3000:]
    assert "layers: ops < nn < models < app BROKEN" in " ".join(result.stdout.split())
    assert "fastvq.ops.common -> fastvq.app.cli" in result.stdout


def test_torch_backend_and_oracle_import_no_triton():
    result = _python("import sys, fastvq.ops.chunked, fastvq.ops.naive; print('triton' in sys.modules)")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_kernel_sources_are_looked_up_in_the_package_then_the_checkout(tmp_path):
    checkout = tmp_path / "checkout"
    (checkout / "fastvq").mkdir(parents=True)
    (checkout / "kernels").mkdir()
    assert kernel_sources_dir(checkout / "fastvq") == checkout / "kernels"
    (checkout / "fastvq" / "kernels").mkdir()
    assert kernel_sources_dir(checkout / "fastvq") == checkout / "fastvq" / "kernels"
    assert kernel_sources_dir() == REPO / "kernels"  # this checkout keeps them in kernels/ only


def test_an_installed_package_ships_the_kernel_sources_and_builds_from_them(tmp_path):
    """What `pip install .` puts in site-packages (setup.py's build_py output, the wheel's content) holds
    the C++ and CUDA sources and every header they include, under fastvq/kernels/; imported from there,
    both JIT builds take their sources from that copy."""
    build = subprocess.run(
        [sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    shipped = tmp_path / "fastvq" / "kernels"
    expected = sorted(REPO.joinpath("kernels").glob("*.cu")) + [
        REPO / "kernels" / "torch_glue.cpp",
        REPO / "kernels" / "cpu" / "search.cpp",
    ]
    for source in expected:
        copy = shipped / source.relative_to(REPO / "kernels")
        assert copy.read_bytes() == source.read_bytes(), copy
        for header in re.findall(r'#include "([^"]+)"', source.read_text()):
            assert (copy.parent / header).is_file(), f"{header} (included by {source.name}) is not shipped"
    result = _python(
        "from fastvq.ops.cpu import _extension; from fastvq.ops.cuda import _build; "
        "print(_extension.SOURCES); print(*_build.sources(), sep='\\n')",
        cwd=tmp_path,
        pythonpath=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    cpu_sources, *cuda_sources = result.stdout.split()
    assert Path(cpu_sources) == shipped / "cpu"
    assert [Path(p) for p in cuda_sources] == sorted(shipped.glob("*.cu")) + [shipped / "torch_glue.cpp"]
    assert len(cuda_sources) >= 3


def test_command_entry_points():
    (script,) = [e for e in importlib.metadata.entry_points(group="console_scripts") if e.name == "fastvq"]
    assert script.load() is main
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-m", "fastvq", "train", "--help"], capture_output=True, text=True, env=env, timeout=120
    )
    assert result.returncode == 0 and "--preset" in result.stdout, result.stderr


def test_checkpoint_written_before_the_move_loads_and_reconstructs(capsys, tmp_path):
    """tests/data holds a VQ-VAE checkpoint written by fastvq 0.1.0 before the move to ops/nn/models/app,
    with the images it was trained on and their reconstructions and codes at the time."""
    expected = np.load(DATA / "vqvae-v0.1.0-expected.npz")
    model, meta = load_model(DATA / "vqvae-v0.1.0.safetensors", torch.device("cpu"))
    assert meta["kind"] == "vqvae" and meta["step"] == 2
    reconstructions, indices = reconstruct(model, expected["images"], 4, torch.device("cpu"))
    np.testing.assert_array_equal(indices, expected["indices"])
    assert np.abs(reconstructions.astype(int) - expected["reconstructions"]).max() <= 1  # float rounding only
    np.save(tmp_path / "images.npy", expected["images"])
    code = main(
        [
            "eval",
            "--ckpt",
            str(DATA / "vqvae-v0.1.0.safetensors"),
            "--data",
            str(tmp_path / "images.npy"),
            "--out",
            str(tmp_path / "eval"),
            "--device",
            "cpu",
        ]
    )
    assert code == 0, capsys.readouterr().err
    assert (tmp_path / "eval" / "metrics.json").stat().st_size > 0
