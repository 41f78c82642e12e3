"""Where the C++ and CUDA sources of the JIT-built backends are.

A wheel ships them inside the package as `fastvq/kernels/` (setup.py maps the top-level `kernels/`
folder there); a source checkout (editable install, PYTHONPATH) has them at `kernels/` beside the
`fastvq/` folder. The installed copy wins when both exist.
"""

from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parents[1]
"""The `fastvq/` folder this module was imported from."""


def kernel_sources_dir(package_dir: Path = PACKAGE_DIR) -> Path:
    """`package_dir/kernels` when installed from a wheel, else the checkout's `kernels/` beside `package_dir`."""
    installed = package_dir / "kernels"
    return installed if installed.is_dir() else package_dir.parent / "kernels"
