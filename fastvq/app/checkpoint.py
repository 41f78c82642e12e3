"""Checkpoints as safetensors files, written atomically and verified on load.

A checkpoint holds named tensors plus JSON metadata. Nested states (optimizer state dicts) are
split by ``pack`` into tensors and a JSON skeleton and rebuilt by ``unpack``. A SHA-256 of all
tensor bytes and of the metadata is stored beside them, so that a truncated or altered file is
reported as corrupt rather than loaded.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from .files import write_atomic

FORMAT = "fastvq-checkpoint/2"
"""/2: the checksum covers the tensors and the metadata. /1 (fastvq 0.1.0) covered the tensors
only; such files still load."""
LEGACY_FORMAT = "fastvq-checkpoint/1"


def _digest(tensors: dict[str, torch.Tensor], meta_json: str | None) -> str:
    """SHA-256 of every tensor (name, dtype, shape, bytes) and, unless None, of the metadata JSON."""
    sha = hashlib.sha256()
    if meta_json is not None:
        sha.update(meta_json.encode())
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        sha.update(name.encode())
        sha.update(str(t.dtype).encode() + str(tuple(t.shape)).encode())
        sha.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return sha.hexdigest()


def save(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Write ``tensors`` and JSON-able ``meta`` to ``path`` atomically: a temporary file in the
    same folder, fsync, then ``os.replace``, so ``path`` is always a complete checkpoint."""
    from safetensors.torch import save as to_bytes

    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    meta_json = json.dumps(meta)
    metadata = {"format": FORMAT, "sha256": _digest(tensors, meta_json), "meta": meta_json}
    data = to_bytes(tensors, metadata=metadata)
    write_atomic(path, lambda f: f.write(data))


def load(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a checkpoint written by ``save``: (tensors on CPU, meta). Raises FileNotFoundError
    for a missing file and ValueError for a corrupt file or one that is not a fastvq checkpoint."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as err:  # safetensors raises several types for unreadable files
        raise ValueError(f"checkpoint {path} is corrupt or not a safetensors file: {err}") from err
    if metadata.get("format") not in (FORMAT, LEGACY_FORMAT):
        raise ValueError(
            f"checkpoint {path} is not a fastvq checkpoint (format {metadata.get('format')!r}, "
            f"expected {FORMAT!r})"
        )
    covered = metadata.get("meta") if metadata["format"] == FORMAT else None
    if "meta" not in metadata or _digest(tensors, covered) != metadata.get("sha256"):
        raise ValueError(f"checkpoint {path} is corrupt: its tensors or metadata do not match their checksum")
    return tensors, json.loads(metadata["meta"])


def pack(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Move every tensor in nested dicts/lists ``obj`` into ``tensors`` under ``prefix.path`` and
    return a JSON-able skeleton for ``unpack``. Dict keys may be str or int."""
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj
        return {"tensor": prefix}
    if isinstance(obj, dict):
        return {"dict": [[k, pack(v, f"{prefix}.{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return {"list": [pack(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]}
    return {"value": obj}


def unpack(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of ``pack`` (tuples come back as lists)."""
    if "tensor" in skeleton:
        return tensors[skeleton["tensor"]]
    if "dict" in skeleton:
        return {k: unpack(v, tensors) for k, v in skeleton["dict"]}
    if "list" in skeleton:
        return [unpack(v, tensors) for v in skeleton["list"]]
    return skeleton["value"]
