"""Checkpoints as safetensors files, written atomically and verified on load.

A checkpoint holds named tensors plus JSON metadata. Nested states (optimizer state dicts) are
split by ``pack`` into tensors and a JSON skeleton and rebuilt by ``unpack``. A SHA-256 of all
tensor bytes and of the metadata is stored beside them, so that a truncated or altered file is
reported as corrupt rather than loaded. The checksum is no signature: whoever can write a file can
recompute it, so what a file says is data, checked before use (`read_header` gives the tensors'
shapes and the metadata without reading any tensor; `fastvq.app.state` checks both against the
model they describe before anything is allocated). Every problem raises `CheckpointError`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError
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


DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
"""Torch dtypes of safetensors' dtype names."""
MAX_DEPTH = 64
"""The deepest nesting of a checkpoint's JSON metadata (an optimizer state's skeleton is about 12)."""


def read_header(path: str | Path) -> tuple[dict[str, tuple[torch.dtype | None, tuple[int, ...]]], dict[str, Any]]:
    """The header of a checkpoint written by ``save``, no tensor read: (name -> (dtype, shape) of
    every tensor, dtype None when torch has none of that name; meta). FileNotFoundError for a
    missing file, CheckpointError for one that is not a readable fastvq checkpoint."""
    from safetensors import safe_open

    path = _existing(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            layout = {}
            for name in f.keys():
                view = f.get_slice(name)
                layout[name] = (DTYPES.get(view.get_dtype()), tuple(view.get_shape()))
    except Exception as err:  # safetensors raises several types for unreadable files
        raise CheckpointError(path, f"is corrupt or not a safetensors file: {err}") from err
    return layout, _meta(path, metadata)


def load(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a checkpoint written by ``save``: (tensors on CPU, meta). Raises FileNotFoundError
    for a missing file and CheckpointError for a corrupt file or one that is not a fastvq
    checkpoint. Tensors take what the file holds: their sizes are bounded by its length."""
    from safetensors import safe_open

    path = _existing(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as err:  # safetensors raises several types for unreadable files
        raise CheckpointError(path, f"is corrupt or not a safetensors file: {err}") from err
    meta = _meta(path, metadata)
    covered = metadata["meta"] if metadata["format"] == FORMAT else None
    if _digest(tensors, covered) != metadata.get("sha256"):
        raise CheckpointError(path, "is corrupt: its tensors or metadata do not match their checksum")
    return tensors, meta


def _existing(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path}: no such file")
    return path


def _meta(path: Path, metadata: dict[str, str]) -> Any:
    """The JSON metadata of a fastvq checkpoint's header, nested at most MAX_DEPTH deep."""
    if metadata.get("format") not in (FORMAT, LEGACY_FORMAT):
        raise CheckpointError(
            path, f"is not a fastvq checkpoint (format {metadata.get('format')!r}, expected {FORMAT!r})"
        )
    if "meta" not in metadata:
        raise CheckpointError(path, "is corrupt: it has no metadata")
    try:
        meta = json.loads(metadata["meta"])
    except (ValueError, RecursionError) as err:
        raise CheckpointError(path, f"is corrupt: its metadata is not JSON ({str(err)[:200]})") from None
    if _depth(meta) > MAX_DEPTH:
        raise CheckpointError(path, f"is corrupt: its metadata is nested deeper than {MAX_DEPTH} levels")
    return meta


def _depth(value: Any) -> int:
    """How deep lists and dicts nest in a JSON value (a scalar: 0), counted without recursion."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        if isinstance(item, (list, dict)) and depth <= MAX_DEPTH:
            stack.extend((v, depth + 1) for v in (item.values() if isinstance(item, dict) else item))
    return deepest


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


def unpack(skeleton: Any, tensors: dict[str, torch.Tensor], depth: int = 0) -> Any:
    """Inverse of ``pack`` (tuples come back as lists). A skeleton that ``pack`` could not have
    written (another shape, a missing tensor, JSON nested deeper than MAX_DEPTH) raises ValueError
    saying what is wrong."""
    if depth > MAX_DEPTH:
        raise ValueError(f"nested deeper than {MAX_DEPTH} levels")
    if not isinstance(skeleton, dict) or len(skeleton) != 1:
        raise ValueError(f"expected one of {{tensor|dict|list|value: ...}}, got {_short(skeleton)}")
    ((kind, content),) = skeleton.items()
    if kind == "tensor" and isinstance(content, str) and content in tensors:
        return tensors[content]
    if (
        kind == "dict"
        and isinstance(content, list)
        and all(
            isinstance(p, list) and len(p) == 2 and isinstance(p[0], (str, int)) and not isinstance(p[0], bool)
            for p in content
        )
    ):
        return {k: unpack(v, tensors, depth + 1) for k, v in content}
    if kind == "list" and isinstance(content, list):
        return [unpack(v, tensors, depth + 1) for v in content]
    if kind == "value" and (content is None or isinstance(content, (bool, int, float, str))):
        return content
    raise ValueError(f"a malformed or dangling entry {_short(skeleton)}")


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."
