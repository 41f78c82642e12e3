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


def save_grid(inputs: np.ndarray, reconstructions: np.ndarray, path: Path, columns: int = 8,
              title: str | None = None) -> np.ndarray:
    """Save ``grid_image(inputs, reconstructions, columns, title)`` as a PNG; returns it."""
    from PIL import Image

    grid = grid_image(inputs, reconstructions, columns, title)
    write_atomic(path, lambda f: Image.fromarray(grid).save(f, format="PNG"))
    return grid


def grid_image(inputs: np.ndarray, reconstructions: np.ndarray, columns: int = 8,
               title: str | None = None) -> np.ndarray:
    """(N, H, W, 3) uint8 ``inputs`` (odd rows, labelled 'input') above their ``reconstructions``
    (even rows, labelled 'reconstruction'), ``columns`` per row, upscaled (nearest) so tiles are at
    least 96 px, with an optional ``title`` line on top, as one (H', W', 3) uint8 image."""
    from PIL import Image, ImageDraw, ImageFont

    n, h, w, _ = inputs.shape
    columns = min(columns, n)
    rows = math.ceil(n / columns)
    pad = 2
    canvas = np.full((2 * rows * (h + pad) + pad, columns * (w + pad) + pad, 3), 255, np.uint8)
    for i in range(n):
        r, c = divmod(i, columns)
        x = pad + c * (w + pad)
        for j, image in enumerate((inputs[i], reconstructions[i])):
            y = pad + (2 * r + j) * (h + pad)
            canvas[y : y + h, x : x + w] = image
    scale = max(1, math.ceil(96 / h))
    tiles = Image.fromarray(canvas).resize(
        (canvas.shape[1] * scale, canvas.shape[0] * scale), Image.Resampling.NEAREST
    )
    try:
        font = ImageFont.load_default(size=14)
    except TypeError:  # Pillow < 10.1: the small bitmap font
        font = ImageFont.load_default()
    margin, top = 120, 24 if title else 0
    image = Image.new("RGB", (tiles.width + margin, tiles.height + top), "white")
    image.paste(tiles, (margin, top))
    draw = ImageDraw.Draw(image)
    if title:
        draw.text((4, 4), title, fill="black", font=font)
    for row in range(2 * rows):
        y = top + (pad + row * (h + pad) + h // 2) * scale
        draw.text((4, y - 7), "reconstruction" if row % 2 else "input", fill="black", font=font)
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


def plot_curves(history: dict[str, list[float]], out_dir: Path) -> list[Path]:
    """Write loss.png (losses per step, log scale) and codebook_usage.png (fraction of codes used
    per training batch) from ``history`` (equal-length lists keyed 'step', 'loss', ...)."""
    steps = np.asarray(history["step"], dtype=float)
    width = max(1, len(steps) // 50)
    paths = []
    for name, keys, ylabel, log in (
        ("loss.png", ("loss", "rec_loss", "vq_loss", "g_loss", "d_loss"), "loss", True),
        ("codebook_usage.png", ("usage",), "fraction of codes used per batch", False),
    ):
        fig, ax = _figure()
        for key in keys:
            values = np.asarray(history.get(key, []), dtype=float)
            keep = np.isfinite(values)
            if keep.sum() == 0:
                continue
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
