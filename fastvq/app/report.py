"""Run outputs: metrics JSON, input-vs-reconstruction grids and training curves (PNG), each
written atomically."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from .files import write_atomic


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON (NaN written as null)."""

    def clean(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    text = (json.dumps(clean(obj), indent=2) + "\n").encode()
    write_atomic(path, lambda f: f.write(text))


def save_grid(
    inputs: np.ndarray, reconstructions: np.ndarray, path: Path, columns: int = 8, title: str | None = None
) -> np.ndarray:
    """Save ``grid_image(inputs, reconstructions, columns, title)`` as a PNG; returns it."""
    grid = grid_image(inputs, reconstructions, columns, title)
    _save_png(grid, path)
    return grid


def grid_image(
    inputs: np.ndarray, reconstructions: np.ndarray, columns: int = 8, title: str | None = None
) -> np.ndarray:
    """(N, H, W, 3) uint8 ``inputs`` (odd rows, labelled 'input') above their ``reconstructions``
    (even rows, labelled 'reconstruction'), ``columns`` per row, as one image (see ``rows_image``)."""
    columns = min(columns, len(inputs))
    rows, labels = [], []
    for start in range(0, len(inputs), columns):
        rows += [inputs[start : start + columns], reconstructions[start : start + columns]]
        labels += ["input", "reconstruction"]
    return rows_image(rows, labels, title)


def save_samples(
    images: np.ndarray, path: Path, columns: int = 8, column_labels: list[str] | None = None, title: str | None = None
) -> None:
    """Save a PNG of (N, H, W, 3) uint8 ``images``, ``columns`` per row (see ``rows_image``)."""
    columns = min(columns, len(images))
    rows = [images[i : i + columns] for i in range(0, len(images), columns)]
    _save_png(rows_image(rows, None, title, column_labels), path)


def _save_png(image: np.ndarray, path: Path) -> None:
    from PIL import Image

    write_atomic(path, lambda f: Image.fromarray(image).save(f, format="PNG"))


def rows_image(
    rows: list[np.ndarray], labels: list[str] | None, title: str | None = None, column_labels: list[str] | None = None
) -> np.ndarray:
    """Image rows (each (n, H, W, 3) uint8, n >= 1, same H and W) as one (H', W', 3) uint8 image,
    upscaled (nearest) so tiles are at least 96 px, each row labelled on the left by ``labels`` and
    each column on top by ``column_labels`` (None: no labels), with an optional ``title`` line on top."""
    from PIL import Image, ImageDraw, ImageFont

    _, h, w, _ = rows[0].shape
    columns = max(len(row) for row in rows)
    pad = 2
    canvas = np.full((len(rows) * (h + pad) + pad, columns * (w + pad) + pad, 3), 255, np.uint8)
    for r, row in enumerate(rows):
        y = pad + r * (h + pad)
        for c, image in enumerate(row):
            x = pad + c * (w + pad)
            canvas[y : y + h, x : x + w] = image
    scale = max(1, math.ceil(96 / h))
    tiles = Image.fromarray(canvas).resize((canvas.shape[1] * scale, canvas.shape[0] * scale), Image.Resampling.NEAREST)
    try:
        font = ImageFont.load_default(size=14)
    except TypeError:  # Pillow < 10.1: the small bitmap font
        font = ImageFont.load_default()
    margin, top = 120 if labels else 0, (24 if title else 0) + (20 if column_labels else 0)
    image = Image.new("RGB", (tiles.width + margin, tiles.height + top), "white")
    image.paste(tiles, (margin, top))
    draw = ImageDraw.Draw(image)
    if title:
        draw.text((4, 4), title, fill="black", font=font)
    for column, label in enumerate(column_labels or []):
        draw.text(
            (margin + (pad + column * (w + pad) + w // 2) * scale - 4 * len(label), top - 18),
            label,
            fill="black",
            font=font,
        )
    for row, label in enumerate(labels or []):
        y = top + (pad + row * (h + pad) + h // 2) * scale
        draw.text((4, y - 7), label, fill="black", font=font)
    return np.asarray(image)


def _figure():
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.5), dpi=100)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _save_figure(fig, path: Path) -> None:
    write_atomic(path, lambda f: fig.savefig(f, format="png"))


def _smooth(values: np.ndarray, width: int) -> np.ndarray:
    width = max(1, min(width, len(values)))
    kernel = np.ones(width) / width
    return np.convolve(values, kernel, mode="valid")


TOKENIZER_PANELS = (
    ("loss.png", ("loss", "rec_loss", "vq_loss", "g_loss", "d_loss"), "loss", True),
    ("codebook_usage.png", ("usage",), "fraction of codes used per batch", False),
)
"""(file name, history keys, y label, log scale) of each figure of a tokenizer run."""


def plot_curves(history: dict[str, list[float]], out_dir: Path, panels=TOKENIZER_PANELS) -> list[Path]:
    """Write one PNG per ``panels`` entry (file name, history keys, y label, log scale): the keys'
    values per step, smoothed, skipping NaN; ``history`` holds equal-length lists keyed 'step', ....
    By default loss.png (log scale) and codebook_usage.png (fraction of codes used per batch)."""
    steps = np.asarray(history["step"], dtype=float)
    paths = []
    for name, keys, ylabel, log in panels:
        fig, ax = _figure()
        for key in keys:
            values = np.asarray(history.get(key, []), dtype=float)
            keep = np.isfinite(values)
            if keep.sum() == 0:
                continue
            width = max(1, int(keep.sum()) // 50)
            smoothed = _smooth(values[keep], width)
            ax.plot(steps[keep][width - 1 :], smoothed, label=key)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        if log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        _save_figure(fig, out_dir / name)
        paths.append(out_dir / name)
    return paths


def plot_code_histogram(counts: np.ndarray, path: Path) -> None:
    """Write a PNG of code frequencies ((K,) counts per code) sorted from most to least used."""
    counts = np.sort(counts)[::-1]
    fig, ax = _figure()
    ax.bar(np.arange(len(counts)), counts / max(counts.sum(), 1), width=1.0)
    ax.set_xlabel("code rank")
    ax.set_ylabel("frequency on held-out images")
    fig.tight_layout()
    _save_figure(fig, path)
