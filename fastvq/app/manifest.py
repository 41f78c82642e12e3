"""encode's manifest.json (what decode needs beside indices.npy): its format, its fields and their
types, read as data, and the PNG names decode writes for its image names."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .settings import conforms, describe

MANIFEST_FORMAT = "fastvq-indices/1"


def output_names(images: list, manifest_path: Path) -> list[str]:
    """PNG file names for a manifest's image names: the stem of each (its base name when stems
    collide) + ".png". A name is data, never a path: no folder part survives, so every output stays
    inside the output folder; empty, '.', '..' or colliding names raise ValueError."""
    if not isinstance(images, list) or not all(isinstance(n, str) for n in images):
        raise ValueError(f"{manifest_path}: 'images' must be a list of names")
    base = [n.replace("\\", "/").rsplit("/", 1)[-1] for n in images]
    if any(b in ("", ".", "..") for b in base):
        raise ValueError(f"{manifest_path}: image names must end in a file name, got {images!r}")
    for candidates in ([Path(b).stem + ".png" for b in base], [b + ".png" for b in base]):
        if len(set(candidates)) == len(candidates):
            return candidates
    raise ValueError(f"{manifest_path}: image names collide once their folders are dropped")


MANIFEST_FIELDS = {
    "format": str,
    "checkpoint": str,
    "kind": str,
    "codebook_size": int,
    "shape": list[int],
    "images": list[str],
}
"""The fields of encode's manifest.json and their types."""


def read_manifest(folder: Path) -> dict[str, Any]:
    """encode's manifest.json in ``folder``, its fields checked (the file is data)."""
    path = folder / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"--indices {folder}: no manifest.json (run fastvq encode)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        raise ValueError(f"{path}: not a JSON manifest ({err})") from err
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ValueError(f"{path}: format {found!r}, expected {MANIFEST_FORMAT!r}")
    wrong = [
        f"{key} ({describe(kind)})"
        for key, kind in MANIFEST_FIELDS.items()
        if key not in manifest or not conforms(manifest[key], kind)
    ]
    if wrong:
        raise ValueError(f"{path}: missing or malformed {', '.join(wrong)}")
    return manifest
