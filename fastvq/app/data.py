"""Image data for training and evaluating tokenizers: a folder of images, a .npy/.npz array, or
``builtin`` (photographs shipped inside scikit-image, no download).

Images are held as uint8 arrays of shape (H, W, 3); models see float32 (B, 3, H, W) in [-1, 1].
Training batches are random crops that depend only on (seed, step), so a resumed run sees the same
batches as an uninterrupted one.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .errors import SettingError, SettingFileNotFoundError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")

# scikit-image sample photographs that ship inside its wheel (no pooch download).
BUILTIN_TRAIN = (
    "astronaut", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field", "retina",
    "camera", "brick", "grass", "gravel", "moon",
)
BUILTIN_EVAL = ("coffee", "motorcycle")


def to_rgb_uint8(image: np.ndarray, name: str) -> np.ndarray:
    """(H, W), (H, W, 1), (H, W, 3) or (H, W, 4) uint8/bool/float-in-[0, 1] -> (H, W, 3) uint8."""
    if image.dtype == bool:
        image = image.astype(np.uint8) * 255
    elif np.issubdtype(image.dtype, np.floating):
        if not np.isfinite(image).all():
            raise ValueError(f"{name}: float pixels must be finite, found NaN or inf")
        if image.size and (image.min() < 0.0 or image.max() > 1.0):
            raise ValueError(
                f"{name}: float images must lie in [0, 1], got values in "
                f"[{image.min():.3g}, {image.max():.3g}]; store uint8 (0-255) instead"
            )
        image = np.round(image * 255.0).astype(np.uint8)
    elif image.dtype != np.uint8:
        raise ValueError(f"{name}: expected uint8 or float pixels, got dtype {image.dtype}")
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in (1, 3, 4) or 0 in image.shape[:2]:
        raise ValueError(f"{name}: expected an image of shape (H, W[, 1|3|4]) with H, W >= 1, got {image.shape}")
    if image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    return np.ascontiguousarray(image[:, :, :3])


def builtin_images(split: str) -> tuple[list[str], list[np.ndarray]]:
    """The scikit-image photographs of ``split`` ('train' or 'eval'), as names and (H, W, 3) uint8."""
    from skimage import data as skdata

    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    names = BUILTIN_TRAIN if split == "train" else BUILTIN_EVAL
    images = []
    for name in names:
        image = skdata.stereo_motorcycle()[0] if name == "motorcycle" else getattr(skdata, name)()
        images.append(to_rgb_uint8(image, f"builtin:{name}"))
    return list(names), images


def _fit(image: np.ndarray, name: str, resize: int | None, crop: int | None) -> np.ndarray:
    """Resize the shorter side to ``resize`` then center-crop it square, or center-crop ``crop``."""
    from PIL import Image

    if resize is not None:
        h, w = image.shape[:2]
        scale = resize / min(h, w)
        size = (max(resize, round(w * scale)), max(resize, round(h * scale)))
        image = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BICUBIC))
        crop = resize
    if crop is not None:
        h, w = image.shape[:2]
        if h < crop or w < crop:
            raise SettingError("{name}: image of size {h}x{w} is smaller than {crop} {size}; use {resize} {size}",
                               name=name, h=h, w=w, size=crop)
        top, left = (h - crop) // 2, (w - crop) // 2
        image = image[top : top + crop, left : left + crop]
    return np.ascontiguousarray(image)


def _read_folder(folder: Path) -> tuple[list[str], list[np.ndarray]]:
    from PIL import Image, UnidentifiedImageError

    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise SettingError("{data} {folder}: no images found (looked for {extensions})", folder=folder,
                           extensions=", ".join(IMAGE_EXTENSIONS))
    images = []
    for path in files:
        try:
            with Image.open(path) as im:
                images.append(_rgb_pixels(im, path.name))
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as err:
            raise SettingError("{data} {folder}: cannot read image {file}: {err}", folder=folder, file=path.name,
                               err=err) from err
    return [p.name for p in files], images


def _rgb_pixels(im, name: str) -> np.ndarray:
    """An opened PIL image as (H, W, 3) uint8. 16-bit greyscale (modes I;16*, and I holding 16-bit
    values) is scaled from 0-65535; PIL's own convert("RGB") would clip it to 255."""
    if im.mode.startswith("I;16") or im.mode == "I":
        pixels = np.asarray(im).astype(np.float64)
        if pixels.size and (pixels.min() < 0 or pixels.max() > 65535):
            raise ValueError(f"{name}: 32-bit integer pixels outside 0-65535; store 8- or 16-bit images")
        return to_rgb_uint8(pixels / 65535.0, name)
    return np.asarray(im.convert("RGB"))


def _read_array(path: Path) -> tuple[list[str], list[np.ndarray]]:
    try:
        loaded = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise SettingError("{data} {path}: cannot read the array file: {err}", path=path, err=err) from err
    if isinstance(loaded, np.lib.npyio.NpzFile):
        with loaded:
            keys = list(loaded.keys())
            if "images" in keys:
                array = loaded["images"]
            elif len(keys) == 1:
                array = loaded[keys[0]]
            else:
                raise SettingError("{data} {path}: the .npz holds arrays {keys}; name the images array 'images'",
                                   path=path, keys=keys)
    else:
        array = loaded
    if array.ndim == 4 and array.shape[1] in (1, 3) and array.shape[-1] not in (1, 3, 4):
        array = array.transpose(0, 2, 3, 1)  # (N, C, H, W) -> (N, H, W, C)
    if array.ndim not in (3, 4) or len(array) == 0:
        raise SettingError("{data} {path}: expected images of shape (N, H, W), (N, H, W, C) or (N, C, H, W), "
                           "got {shape}", path=path, shape=array.shape)
    names = [f"{path.stem}_{i:05d}" for i in range(len(array))]
    return names, [to_rgb_uint8(a, f"{path}[{i}]") for i, a in enumerate(array)]


def load_images(
    spec: str, resize: int | None = None, crop: int | None = None
) -> tuple[list[str], list[np.ndarray]]:
    """Names and (H, W, 3) uint8 images from a folder or a .npy/.npz file; ``builtin`` gives the
    held-out builtin photographs. ``resize``/``crop`` make every image ``resize``x``resize`` /
    ``crop``x``crop`` (shorter-side resize + center crop / center crop only)."""
    for name, value in (("resize", resize), ("crop", crop)):
        if value is not None and value < 1:
            raise SettingError("{%s} must be a positive image side, got {value}" % name, value=value)
    if resize is not None and crop is not None:
        raise SettingError("give at most one of {resize} and {crop}")
    if spec == "builtin":
        names, images = builtin_images("eval")
    else:
        path = Path(spec)
        if not path.exists():
            raise SettingFileNotFoundError("{data} {spec}: no such file or folder", spec=spec)
        if path.is_dir():
            names, images = _read_folder(path)
        elif path.suffix.lower() in (".npy", ".npz"):
            names, images = _read_array(path)
        else:
            raise SettingError("{data} {spec}: expected 'builtin', a folder of images or a .npy/.npz file",
                               spec=spec)
    return names, [_fit(im, f"{spec}: {n}", resize, crop) for n, im in zip(names, images)]


def stack_images(names: list[str], images: list[np.ndarray]) -> np.ndarray:
    """Stack same-sized images into (N, H, W, 3) uint8; mixed sizes raise naming two files."""
    first = images[0].shape
    for name, image in zip(names, images):
        if image.shape != first:
            raise SettingError("images have mixed sizes: {first_name} is {first} but {name} is {size}; pass "
                               "{resize} S or {crop} S", first_name=names[0], first=f"{first[0]}x{first[1]}",
                               name=name, size=f"{image.shape[0]}x{image.shape[1]}")
    return np.stack(images)


def split_images(
    spec: str, holdout: float, seed: int, resize: int | None = None, crop: int | None = None
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(train, held-out) images. ``builtin`` has a fixed split; other data hold out a ``holdout``
    fraction (at least one image when there are two or more), chosen by ``seed``."""
    if spec == "builtin":
        train, held = builtin_images("train")[1], builtin_images("eval")[1]
        return [_fit(im, "builtin", resize, crop) for im in train], [
            _fit(im, "builtin", resize, crop) for im in held
        ]
    if not 0.0 <= holdout < 1.0:
        raise SettingError("{holdout} must lie in [0, 1), got {value}", value=holdout)
    _, images = load_images(spec, resize, crop)
    if len(images) < 2:
        raise SettingError("{data} {spec}: need at least 2 images (train + held out), found 1", spec=spec)
    count = min(len(images) - 1, max(1, round(holdout * len(images))))
    order = np.random.default_rng(seed).permutation(len(images))
    held = set(order[:count].tolist())
    train = [im for i, im in enumerate(images) if i not in held]
    return train, [images[i] for i in sorted(held)]


def check_size(images: list[np.ndarray], size: int, what: str) -> None:
    """Raise if any image is smaller than ``size`` in height or width."""
    for i, image in enumerate(images):
        if min(image.shape[:2]) < size:
            raise SettingError("{what} image {i} is {h}x{w}, smaller than the {size}x{size} crops requested; "
                               "lower {image_size} or pass {resize} {size}", what=what, i=i, h=image.shape[0],
                               w=image.shape[1], size=size)


def fixed_crops(images: list[np.ndarray], size: int, count: int, seed: int = 0) -> np.ndarray:
    """``count`` crops of ``size``x``size`` cycling over ``images``, positions drawn from ``seed``:
    (count, size, size, 3) uint8. Used as the held-out evaluation set."""
    check_size(images, size, "held-out")
    rng = np.random.default_rng(seed)
    crops = []
    for i in range(count):
        image = images[i % len(images)]
        top = rng.integers(0, image.shape[0] - size + 1)
        left = rng.integers(0, image.shape[1] - size + 1)
        crops.append(image[top : top + size, left : left + size])
    return np.stack(crops)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float32 in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) float in [-1, 1] -> (N, H, W, 3) uint8 (clamped, rounded)."""
    images = images.detach().float().clamp(-1.0, 1.0).add(1.0).mul(127.5).round()
    return images.to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


class CropSampler:
    """Random training crops whose content depends only on (seed, step).

    ``batch(step)`` returns (batch_size, 3, size, size) float32 in [-1, 1]: for each item an
    image chosen uniformly, a uniform crop position and a horizontal flip with probability 1/2.
    """

    def __init__(self, images: list[np.ndarray], size: int, batch_size: int, seed: int):
        if not images:
            raise ValueError("CropSampler needs at least one image")
        check_size(images, size, "training")
        self.images, self.size, self.batch_size, self.seed = images, size, batch_size, seed

    def batch(self, step: int) -> torch.Tensor:
        rng = np.random.default_rng([self.seed, step])
        crops = []
        for _ in range(self.batch_size):
            image = self.images[rng.integers(len(self.images))]
            top = rng.integers(0, image.shape[0] - self.size + 1)
            left = rng.integers(0, image.shape[1] - self.size + 1)
            crop = image[top : top + self.size, left : left + self.size]
            crops.append(crop[:, ::-1] if rng.integers(2) else crop)
        return to_tensor(np.stack(crops))
