"""Guava disease classification with a small CNN (Kaggle). 3-class images.

Sources: `bundled` = a seeded generator of guava photos in the Kaggle folder layout (no guava
images ship in any package), `path` = an ImageFolder with or without train/ val/ test/ above the
class folders, `kaggle` = the Kaggle dataset through kagglehub.

Preparation decodes every image once into uint8 (N, H, W, 3) arrays; training never decodes.
Normalisation and augmentation are part of the model, so they run on the training device on
whole batches and only while training.
"""
from __future__ import annotations

import math
import os
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..config import DataParams, TrainParams, WorkloadParams
from ..errors import DataError
from ..io import Prepared
from ..tasks import Task
from . import Baseline, Workload, kaggle_download

CLASSES = ("Anthracnose", "fruit_fly", "healthy_guava")  # the Kaggle folder names, in sorted order
SPLIT_DIRS = {"train": ("train",), "val": ("val", "valid", "validation"), "test": ("test",)}
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


@dataclass(frozen=True)
class Data(DataParams):
    kaggle_handle: str = "asadullahgalib/guava-disease-dataset"
    count: int = 600  # bundled: images drawn, spread evenly over the three classes
    size: int = 256  # bundled: side of each drawn PNG


@dataclass(frozen=True)
class Prepare:
    image_size: int = 64  # side of the stored square images; 224 on a GPU through -S
    test_size: float = 0.15  # used only when the folder has no test/ split
    val_size: float = 0.15  # used only when the folder has no val/ split
    min_side: int = 32  # a smaller source image would be upscaled into mush: listed and skipped
    max_bad_fraction: float = 0.05  # more unreadable files than this share fails the stage


@dataclass(frozen=True)
class Augment:
    flip: bool = True  # horizontal and vertical: a fruit photographed from above has no up
    rotation_deg: float = 15.0
    crop_min: float = 0.8  # a random crop keeps at least this share of the side, then is zoomed back
    jitter: float = 0.2  # brightness, contrast and saturation factors drawn from 1 +- jitter

    @property
    def warps(self) -> bool:
        """Whether a geometric part (flip, rotation, crop-and-zoom) is on."""
        return bool(self.flip or self.rotation_deg or self.crop_min < 1)


@dataclass(frozen=True)
class Model:
    channels: list[int] = field(default_factory=lambda: [8, 16, 32])  # one conv block per entry; the first has stride 2
    dropout: float = 0.2
    augment: Augment = field(default_factory=Augment)
    fused_augment: bool = True  # CUDA: augmentation and normalisation as one Triton kernel (the same function)
    space_to_depth_stem: bool = True  # CUDA in channels_last: the stem as a 2x2 conv over 2x2 pixel blocks (the same conv)


@dataclass(frozen=True)
class Params(WorkloadParams):
    data: Data = field(default_factory=Data)
    prepare: Prepare = field(default_factory=Prepare)
    model: Model = field(default_factory=Model)
    train: TrainParams = field(default_factory=lambda: TrainParams(epochs=6, batch_size=32, lr=3e-3, weight_decay=1e-4))


# ---------------------------------------------------------------- the bundled generator

_GREEN = np.array([0.36, 0.55, 0.20], np.float32)
_YELLOW = np.array([0.70, 0.72, 0.32], np.float32)
_LESION = np.array([0.28, 0.17, 0.08], np.float32)
_ROT = np.array([0.52, 0.38, 0.16], np.float32)
_HALO = np.array([0.85, 0.84, 0.62], np.float32)
_PUNCTURE = np.array([0.12, 0.09, 0.05], np.float32)
_CALYX = np.array([0.25, 0.18, 0.10], np.float32)


def generate_images(out_dir: Path, count: int, size: int, seed: int) -> dict[str, int]:
    """Write `count` synthetic guava PNGs as out_dir/<class>/<n>.png; the bytes depend only on the arguments."""
    children = np.random.SeedSequence(seed).spawn(count)  # one stream per image: order-independent
    labels = [CLASSES[i % len(CLASSES)] for i in range(count)]
    for label in CLASSES:
        (out_dir / label).mkdir(parents=True, exist_ok=True)

    def write(i: int) -> None:
        from PIL import Image

        pixels = draw_guava(np.random.default_rng(children[i]), labels[i], size)
        Image.fromarray(pixels).save(out_dir / labels[i] / f"{i:04d}.png", compress_level=3)

    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        list(pool.map(write, range(count)))
    return {c: labels.count(c) for c in CLASSES}


def draw_guava(rng: np.random.Generator, label: str, size: int) -> np.ndarray:
    """One photo as uint8 (size, size, 3): a lit, textured fruit on a table, with the class's marks.

    Fruit hue, size, lighting, background and camera balance are drawn independently of the class,
    and the marks cover a small share of the frame, so the image's mean colour says little about it.
    """
    yy, xx = np.mgrid[-1 : 1 : size * 1j, -1 : 1 : size * 1j].astype(np.float32)
    px = 2.0 / size  # one pixel in these coordinates
    img = _background(rng, yy, xx, size)
    cy, cx = (float(v) for v in rng.uniform(-0.3, 0.3, 2))  # Python floats keep the arrays float32
    radius = rng.uniform(0.55, 1.05)  # often overflowing the frame, as in the Kaggle photos
    aspect, angle = rng.uniform(0.85, 1.15), rng.uniform(0, np.pi)
    phi = np.arctan2(yy - cy, xx - cx)
    wobble = sum(rng.normal(0, 0.025) * np.cos(k * phi + rng.uniform(0, 2 * np.pi)) for k in (2, 3, 4))
    d = _ellipse(yy, xx, cy, cx, radius, aspect, angle) * (1 + wobble)
    inside = np.clip((1 - d) * radius / (1.5 * px), 0, 1)[..., None]
    shadow = _ellipse(yy, xx, cy + 0.08, cx + rng.uniform(-0.1, 0.1), radius * 1.05, aspect, angle)
    img *= 1 - 0.35 * np.clip(1.2 - shadow, 0, 1)[..., None]
    fruit = _skin(rng, yy, xx, cy, cx, radius, d, size)
    fruit = _natural_marks(rng, fruit, yy, xx, (cy, cx, radius), px)
    disease = _DISEASES.get(label)  # healthy fruit carries only the natural marks
    if disease:
        fruit = disease(rng, fruit, yy, xx, (cy, cx, radius), px)
    img = img * (1 - inside) + fruit * inside
    img = img * (rng.uniform(0.9, 1.1, 3) * rng.uniform(0.75, 1.2)).astype(np.float32)  # white balance, exposure
    img += 0.015 * rng.standard_normal(img.shape, dtype=np.float32)  # sensor noise
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


def _noise(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """Smooth value noise in [-1, 1]: a coarse random grid upsampled bicubically."""
    from PIL import Image

    grid = rng.random((max(cells, 2), max(cells, 2)), dtype=np.float32)
    return np.asarray(Image.fromarray(grid, mode="F").resize((w, h), Image.BICUBIC)) * 2 - 1


def _ellipse(yy, xx, cy, cx, radius, aspect, angle) -> np.ndarray:
    """Normalised distance from (cy, cx) in a rotated ellipse: 1 on its boundary."""
    cy, cx, radius, aspect = float(cy), float(cx), float(radius), float(aspect)
    c, s = math.cos(angle), math.sin(angle)
    dy, dx = yy - cy, xx - cx
    u = (dx * c + dy * s) / (radius * aspect)
    v = (dy * c - dx * s) * aspect / radius
    return np.sqrt(u * u + v * v)


def _blend(img: np.ndarray, colour: Any, alpha: np.ndarray) -> np.ndarray:
    a = np.clip(alpha, 0, 1)[..., None]
    return img * (1 - a) + colour * a


def _window(yy: np.ndarray, cy: float, cx: float, extent: float) -> tuple[slice, slice]:
    """Pixel slices covering a square of half-side `extent` around (cy, cx): marks are drawn locally."""
    n = yy.shape[0]
    to_px = lambda v: int(np.clip((v + 1) / 2 * (n - 1), 0, n))  # noqa: E731
    return slice(to_px(cy - extent), to_px(cy + extent) + 1), slice(to_px(cx - extent), to_px(cx + extent) + 1)


def _paint(fruit, yy, xx, cy, cx, extent, draw) -> np.ndarray:
    """Apply `draw(patch, yy, xx)` to the window around (cy, cx) only."""
    rows, cols = _window(yy, cy, cx, extent)
    if rows.start < rows.stop and cols.start < cols.stop:
        fruit[rows, cols] = draw(fruit[rows, cols], yy[rows, cols], xx[rows, cols])
    return fruit


def _on_fruit(rng: np.random.Generator, fruit_at: tuple[float, float, float], within: float) -> tuple[float, float]:
    """A random point inside the visible part of the fruit (inner `within` of its radius)."""
    cy, cx, radius = fruit_at
    for _ in range(100):
        py, px_ = rng.uniform(-1, 1, 2)
        if (py - cy) ** 2 + (px_ - cx) ** 2 < (within * radius * 0.85) ** 2:
            return float(py), float(px_)
    return float(np.clip(cy, -0.9, 0.9)), float(np.clip(cx, -0.9, 0.9))


def _background(rng, yy, xx, size) -> np.ndarray:
    if rng.random() < 0.75:  # the light table of most Kaggle photos
        colour = rng.uniform(0.7, 0.95) + rng.normal(0, 0.015, 3)
    else:  # cloth, wood or leaves
        colour = rng.uniform(0.15, 0.6, 3)
    a = rng.uniform(0, 2 * np.pi)
    img = np.broadcast_to(colour.astype(np.float32), (size, size, 3)) * (1 + 0.12 * (math.cos(a) * xx + math.sin(a) * yy))[..., None]
    img = img * (1 + 0.06 * _noise(rng, size, size, 4))[..., None]
    if rng.random() < 0.5:  # the edge-replicated streaks that the dataset's own augmentation left
        streak = _noise(rng, size, size, size // 3)
        streak = np.repeat(streak[:1], size, 0) if rng.random() < 0.5 else np.repeat(streak[:, :1], size, 1)
        img = img * (1 + 0.12 * streak)[..., None]
    return img.astype(np.float32)


def _skin(rng, yy, xx, cy, cx, radius, d, size) -> np.ndarray:
    """Green-to-yellow skin with patches and pits, lit as a sphere with a soft highlight."""
    base = (_GREEN + (_YELLOW - _GREEN) * rng.beta(2, 3)) * rng.uniform(0.8, 1.15)
    skin = base + (_YELLOW - _GREEN) * 0.25 * _noise(rng, size, size, int(rng.integers(3, 7)))[..., None]
    skin *= (1 + 0.07 * _noise(rng, size, size, size // 6) + 0.05 * _noise(rng, size, size, size // 2))[..., None]
    light = rng.normal(0, 1, 3)
    light[2] = abs(light[2]) + 1.0
    light = [float(v) for v in light / np.linalg.norm(light)]
    nz = np.sqrt(np.clip(1 - d * d, 0, 1))
    lambert = np.clip((xx - cx) / radius * light[0] + (yy - cy) / radius * light[1] + nz * light[2], 0, 1)
    hx, hy = cx + light[0] * radius * 0.5, cy + light[1] * radius * 0.5
    spec = rng.uniform(0, 0.25) * np.exp(-((xx - hx) ** 2 + (yy - hy) ** 2) / (0.08 * radius) ** 2)
    return skin * (0.45 + 0.6 * lambert)[..., None] + spec[..., None]


def _natural_marks(rng, fruit, yy, xx, fruit_at, px) -> np.ndarray:
    """Every class: a few healed specks, and often the dark calyx at the blossom end."""
    for _ in range(int(rng.integers(0, 8))):
        py, qx = _on_fruit(rng, fruit_at, 0.85)
        r, strength = rng.uniform(0.004, 0.015), rng.uniform(0.3, 0.8)
        speck = lambda p, y, x: _blend(p, p * np.array([0.8, 0.7, 0.6], np.float32),  # noqa: E731
                                       strength * np.exp(-((y - py) ** 2 + (x - qx) ** 2) / r**2))  # fmt: skip
        fruit = _paint(fruit, yy, xx, py, qx, 3 * r + px, speck)
    if rng.random() < 0.5:
        py, qx = _on_fruit(rng, fruit_at, 0.9)
        r, turn = rng.uniform(0.04, 0.09), rng.uniform(0, 2 * np.pi)

        def calyx(p, y, x):
            star = _ellipse(y, x, py, qx, r, 1, 0) * (1 + 0.3 * np.cos(5 * np.arctan2(y - py, x - qx) + turn))
            p = _blend(p, p * 0.85, np.clip((1.6 - star) * 2, 0, 1) * 0.5)  # the dimple around it
            return _blend(p, _CALYX, np.clip((1 - star) * 4, 0, 1) * 0.9)

        fruit = _paint(fruit, yy, xx, py, qx, 2 * r, calyx)
    return fruit


def _anthracnose(rng, fruit, yy, xx, fruit_at, px) -> np.ndarray:
    """Dark, sunken, irregular brown lesions: many specks and a few large patches."""
    for _ in range(int(rng.integers(3, 30))):
        py, qx = _on_fruit(rng, fruit_at, 0.85)
        r = rng.uniform(0.012, 0.035) if rng.random() < 0.8 else rng.uniform(0.035, 0.12)
        aspect, angle = rng.uniform(0.7, 1.4), rng.uniform(0, np.pi)
        colour, opacity = _LESION * rng.uniform(0.6, 1.2), rng.uniform(0.75, 1.0)
        cells, seed = int(np.clip(0.3 / r, 3, 24)), rng.integers(2**32)

        def lesion(p, y, x):
            warp = 0.5 * _noise(np.random.default_rng(seed), *y.shape, cells)
            dd = _ellipse(y, x, py, qx, r, aspect, angle) * (1 + warp)
            p = _blend(p, p * 0.7, np.clip(1 - np.abs(dd - 1.15) / 0.2, 0, 1) * 0.25)  # the sunken edge
            core = np.clip((1 - dd) * r / (1.5 * px), 0, 1) * opacity
            return _blend(p, colour * (0.6 + 0.4 * np.clip(dd, 0, 1))[..., None], core)

        fruit = _paint(fruit, yy, xx, py, qx, 1.6 * r * max(aspect, 1 / aspect) + 2 * px, lesion)
    return fruit


def _fruit_fly(rng, fruit, yy, xx, fruit_at, px) -> np.ndarray:
    """Small punctures with pale halos, clustered around an egg-laying site, often with soft brown rot."""
    py, qx = _on_fruit(rng, fruit_at, 0.7)
    if rng.random() < 0.7:
        r, aspect, angle = rng.uniform(0.08, 0.25), rng.uniform(0.7, 1.4), rng.uniform(0, np.pi)
        colour, opacity, seed = _ROT * rng.uniform(0.6, 1.1), rng.uniform(0.5, 0.9), rng.integers(2**32)

        def rot(p, y, x):
            local = np.random.default_rng(seed)
            dd = _ellipse(y, x, py, qx, r, aspect, angle) * (1 + 0.3 * _noise(local, *y.shape, 8))
            veins = np.abs(_noise(local, *y.shape, max(y.shape[0] // 10, 2))) < 0.06
            p = _blend(p, colour, np.clip((1 - dd) * 2, 0, 1) * opacity)
            return _blend(p, p * 0.5, veins * np.clip((1.2 - dd) * 3, 0, 1) * 0.8)

        fruit = _paint(fruit, yy, xx, py, qx, 1.3 * r * max(aspect, 1 / aspect), rot)
    for _ in range(int(rng.integers(4, 18))):
        qy, qx2 = py + rng.normal(0, 0.15), qx + rng.normal(0, 0.15)
        r, halo = rng.uniform(0.01, 0.02), rng.uniform(0.4, 0.8)

        def puncture(p, y, x):
            dist2 = ((y - qy) ** 2 + (x - qx2) ** 2) / r**2
            return _blend(_blend(p, _HALO, np.exp(-dist2 / 9) * halo), _PUNCTURE, np.exp(-dist2))

        fruit = _paint(fruit, yy, xx, qy, qx2, 7 * r, puncture)
    return fruit


_DISEASES = {"Anthracnose": _anthracnose, "fruit_fly": _fruit_fly}


# ---------------------------------------------------------------- reading an ImageFolder


@dataclass(frozen=True)
class Folder:
    """An ImageFolder: files per split (only the splits the folder has) and class, sorted."""

    root: Path
    dirs: dict[str, Path]  # split ("whole" when the folder has none) -> the folder holding its classes
    files: dict[str, dict[str, list[Path]]]

    @property
    def classes(self) -> list[str]:
        return sorted({c for by_class in self.files.values() for c in by_class})

    def count(self) -> int:
        return sum(len(f) for by_class in self.files.values() for f in by_class.values())


def scan_folder(root: Path) -> Folder:
    """Find the class folders, under train/ val/ test/ or directly; fail on an unusable layout."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: folder not found (expected an ImageFolder: <class>/<image>)")
    subdirs = _subdirs(root)
    split_dirs = {s: d for s, names in SPLIT_DIRS.items() for d in subdirs if d.name.lower() in names}
    if split_dirs and "train" not in split_dirs:
        raise DataError(f"{root}: has {sorted(d.name for d in split_dirs.values())} but no train/ folder")
    folders = dict(split_dirs) if split_dirs else {"whole": root}
    files = {split: {c.name: _files(c) for c in _subdirs(d)} for split, d in folders.items()}
    expected = f"expected {root}/<class>/<image> or {root}/train/<class>/<image>"
    if not any(files.values()):
        raise DataError(f"{root}: no class folders ({expected})")
    reference = sorted(files.get("train", files.get("whole", {})))
    for split, by_class in files.items():
        if sorted(by_class) != reference:
            raise DataError(
                f"{folders[split]}: class folders {sorted(by_class)} differ from {folders['train'].name}/'s {reference}; "
                "expected the same class folders in every split"
            )
    with_files = [c for c in reference if any(files[s][c] for s in files)]
    if len(with_files) < 2:
        found = f"only class {with_files}" if with_files else "no files in the class folders"
        raise DataError(f"{root}: found {found}; expected at least 2 class folders with images ({expected})")
    return Folder(root, folders, files)


def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _files(folder: Path) -> list[Path]:
    """Every file under a class folder (hidden ones like .DS_Store aside): non-images are reported, not ignored."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def copy_folder(folder: Folder, out_dir: Path) -> None:
    """The raw copy keeps the original layout and bytes, bad files included: preparation reports them."""
    for split, by_class in folder.files.items():
        for cls, files in by_class.items():
            (out_dir / folder.dirs[split].relative_to(folder.root) / cls).mkdir(parents=True, exist_ok=True)
            for f in files:
                target = out_dir / f.relative_to(folder.root)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(f, target)


def load_image(path: Path, size: int, min_side: int) -> np.ndarray | str:
    """Decode, orient, flatten alpha onto white, convert any mode to RGB, resize the short side to
    `size` and centre-crop: uint8 (size, size, 3). On failure return the reason instead."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    if path.suffix.lower() not in IMAGE_SUFFIXES:
        return f"not an image file (expected one of {sorted(IMAGE_SUFFIXES)})"
    try:
        with Image.open(path) as im:
            width, height = im.size
            if min(width, height) < min_side:
                return f"image {width}x{height} is smaller than the crop (prepare.min_side={min_side})"
            im.draft("RGB", (size, size))  # JPEG: decode at a reduced scale, much faster on large photos
            im = ImageOps.exif_transpose(im)
            im = _to_rgb(im)
            return np.asarray(ImageOps.fit(im, (size, size), Image.Resampling.BICUBIC), dtype=np.uint8)
    except UnidentifiedImageError:
        return "not a readable image (unknown format)"
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        return f"unreadable or truncated ({exc})"


def _to_rgb(im):
    from PIL import Image

    if im.mode in ("I", "I;16", "I;16B", "I;16L", "F"):  # 16-bit and float grayscale: scale to 8 bits
        a = np.asarray(im, dtype=np.float64)
        im = Image.fromarray((255 * a / max(a.max(), 1)).astype(np.uint8))
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


def _decode_all(paths: list[Path], size: int, min_side: int) -> list[np.ndarray | str]:
    """PIL releases the GIL while decoding, so threads use every core without pickling arrays."""
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        return list(pool.map(lambda p: load_image(p, size, min_side), paths))


# Kaggle's guava files are augmented copies named <photo id>_<steps>_<n>.png inside a class folder
SOURCE_ID = re.compile(r"^(\d+)_")
GROUPING_RULE = (
    "files in one class folder whose names start with the same number and an underscore "
    "(Kaggle's 107_unsharp_clahe_augmented_3.png and _6.png: photo 107) are one source photo; "
    "any other name is its own group"
)


def source_groups(paths: list[Path], labels: list[int]) -> np.ndarray:
    """One group id per file: the source photo it was derived from (see GROUPING_RULE)."""
    keys = []
    for path, label in zip(paths, labels):
        match = SOURCE_ID.match(path.name)
        keys.append(f"{label}/{match.group(1)}" if match else f"{label}/file:{path.parent.name}/{path.name}")
    return np.unique(np.asarray(keys), return_inverse=True)[1]


def _carve_groups(pool: np.ndarray, y: np.ndarray, groups: np.ndarray, frac: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Whole groups of each class (drawn in a seeded order) held out until the class's share reaches
    `frac` (at least one group per class); every class keeps at least one group in the rest."""
    held = []
    for c in np.unique(y[pool]):
        members = pool[y[pool] == c]
        ids = rng.permutation(np.unique(groups[members]))
        if len(ids) < 2:
            raise ValueError(f"class {int(c)} has {len(ids)} source group(s); 2 or more are needed to split it")
        want, taken = max(1, math.ceil(frac * len(members))), 0
        for g in ids[:-1]:
            if taken >= want:
                break
            chosen = members[groups[members] == g]
            held.append(chosen)
            taken += len(chosen)
    held_idx = np.sort(np.concatenate(held))
    return np.setdiff1d(pool, held_idx), held_idx


def _grouped_splits(y: np.ndarray, groups: np.ndarray, given: dict[str, np.ndarray], p: Prepare, seed: int, where: Path) -> dict[str, np.ndarray]:
    """Keep the folder's own splits; carve the missing val/test out of train (or the whole set), whole
    source groups at a time and stratified by class, so that no photo's copies sit on both sides."""
    splits = dict(given)
    pool = splits.pop("whole", None)
    if pool is not None:
        splits["train"] = pool
    rng = np.random.default_rng(seed)
    carved = 0.0  # share of the pool already carved off, so the shares are of the whole
    for name, share in (("test", p.test_size), ("val", p.val_size)):
        if name in splits:
            continue
        frac, carved = share / (1 - carved), carved + share
        try:
            splits["train"], splits[name] = _carve_groups(splits["train"], y, groups, frac, rng)
        except ValueError as exc:
            raise DataError(f"{where}: cannot carve a {name} split of {share} by source photo ({exc}); expected more photos per class") from None
    return splits


def groups_across(splits: dict[str, np.ndarray], groups: np.ndarray) -> int:
    """Source groups with files in more than one split (possible only in a folder's own train/val/test)."""
    seen = [set(groups[idx].tolist()) for idx in splits.values()]
    return len({g for i, a in enumerate(seen) for b in seen[i + 1 :] for g in a & b})


def _say_what_was_read(raw_dir: Path, grouping: dict[str, Any], bad: list[dict[str, str]], sizes: dict[str, int]) -> None:
    print(f"guava: read {grouping['files'] + len(bad)} files from {raw_dir}, {grouping['files']} decoded, "
          f"{len(bad)} skipped", flush=True)  # fmt: skip
    for b in bad:
        print(f"guava: skipped {b['file']}: {b['reason']}", flush=True)
    print(f"guava: {grouping['groups']} source photos by rule: {grouping['rule']}", flush=True)
    print(f"guava: split by source photo: {sizes}; groups in more than one split: {grouping['groups_across_splits']}"
          + (" (the folder's own train/val/test share source photos: its test scores overstate)" if grouping["groups_across_splits"] else ""),
          flush=True)  # fmt: skip


def _channel_stats(x: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std on the 0-255 scale, in chunks: a float64 copy of 224px images would not fit."""
    total, square, n = np.zeros(3), np.zeros(3), 0
    for i in range(0, len(x), 256):
        chunk = x[i : i + 256].reshape(-1, 3).astype(np.float64)
        total += chunk.sum(0)
        square += (chunk**2).sum(0)
        n += len(chunk)
    mean = total / n
    std = np.sqrt(np.maximum(square / n - mean**2, 1e-6))
    return mean.tolist(), std.tolist()


def _metric_safe(name: str) -> str:
    return re.sub(r"[^\w.\- ]", "_", name)


def eval_batch_size(image_size: int) -> int:
    """About 256 images of 224px per forward pass; more for small images, within 32..1024."""
    return int(np.clip(256 * (224 / image_size) ** 2, 32, 1024))


class Guava(Workload):
    name = "guava"
    Params = Params

    def variants(self, params: Params) -> dict[str, dict[str, Any]]:
        return {"cnn": {}}

    def task(self, meta: dict[str, Any]) -> Task:
        classes = tuple(meta["classes"])
        return Task("multiclass", len(classes), objective="val/macro_f1", direction="maximize", class_names=classes)

    def ingest(self, params: Params, out_dir: Path) -> dict[str, Any]:
        src = params.data
        if src.source == "bundled":
            counts = generate_images(out_dir, src.count, src.size, seed=0)
            return {"source": "bundled", "origin": f"generator ({src.count} images of {src.size}px, seed 0)",
                    "rows": src.count, "classes": counts, "splits": ["whole"]}  # fmt: skip
        if src.source == "path":
            if not src.path:
                raise DataError("params.yaml: guava.data.path: required when source is 'path'")
            root, origin = Path(src.path), str(src.path)
        else:
            root, origin = _kaggle_folder(src.kaggle_handle), f"kaggle:{src.kaggle_handle}"
        folder = scan_folder(root)
        copy_folder(folder, out_dir)
        counts = {c: sum(len(by_class.get(c, [])) for by_class in folder.files.values()) for c in folder.classes}
        return {"source": src.source, "origin": origin, "rows": folder.count(), "classes": counts,
                "splits": sorted(folder.files)}  # fmt: skip

    def eda(self, params: Params, raw_dir: Path, out_dir: Path) -> dict[str, Any]:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from PIL import Image

        folder = scan_folder(raw_dir)
        counts = {s: {c: len(f) for c, f in by_class.items()} for s, by_class in folder.files.items()}
        fig, ax = plt.subplots(figsize=(5, 3))
        bottom = np.zeros(len(folder.classes))
        for split, by_class in counts.items():
            heights = [by_class.get(c, 0) for c in folder.classes]
            ax.bar(folder.classes, heights, bottom=bottom, label=split)
            bottom += heights
        ax.set(title="Images per class", ylabel="files")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out_dir / "class_balance.png", dpi=100)
        sizes, modes = [], {}
        per_class = 4
        fig, axes = plt.subplots(len(folder.classes), per_class, figsize=(2 * per_class, 2 * len(folder.classes)), squeeze=False)
        for row, cls in zip(axes, folder.classes):
            files = [f for by_class in folder.files.values() for f in by_class.get(cls, [])]
            shown = 0
            for f in files[:50]:  # headers only, except for the few shown
                try:
                    with Image.open(f) as im:
                        sizes.append(im.size)
                        modes[im.mode] = modes.get(im.mode, 0) + 1
                        if shown < per_class:
                            row[shown].imshow(np.asarray(_to_rgb(im).resize((128, 128))))
                            shown += 1
                except (OSError, SyntaxError, ValueError):
                    continue
            for ax in row:
                ax.axis("off")
            row[0].set_title(cls, loc="left")
        fig.tight_layout()
        fig.savefig(out_dir / "samples.png", dpi=100)
        plt.close("all")
        widths, heights = (np.array([s[i] for s in sizes]) for i in (0, 1))
        return {
            "files": folder.count(),
            "classes": folder.classes,
            "counts": counts,
            "sampled_sizes": {"n": len(sizes), "min": [int(widths.min()), int(heights.min())] if sizes else None,
                              "max": [int(widths.max()), int(heights.max())] if sizes else None},  # fmt: skip
            "sampled_modes": modes,
        }

    def prepare(self, params: Params, raw_dir: Path, seed: int) -> Prepared:
        p = params.prepare
        folder = scan_folder(raw_dir)
        classes = folder.classes
        paths, labels, origin = [], [], []
        for split, by_class in folder.files.items():
            for cls, files in by_class.items():
                paths += files
                labels += [classes.index(cls)] * len(files)
                origin += [split] * len(files)
        decoded = _decode_all(paths, p.image_size, p.min_side)
        bad = [{"file": str(f.relative_to(raw_dir)), "reason": r} for f, r in zip(paths, decoded) if isinstance(r, str)]
        if len(bad) > p.max_bad_fraction * len(paths):
            listed = "; ".join(f"{b['file']}: {b['reason']}" for b in bad[:20]) + ("; ..." if len(bad) > 20 else "")
            raise DataError(
                f"{raw_dir}: {len(bad)} of {len(paths)} files cannot be used, more than "
                f"prepare.max_bad_fraction={p.max_bad_fraction}: {listed}"
            )
        good = [i for i, r in enumerate(decoded) if not isinstance(r, str)]
        x = np.stack([decoded[i] for i in good]) if good else np.zeros((0, p.image_size, p.image_size, 3), np.uint8)
        y = np.asarray([labels[i] for i in good], dtype=np.int64)
        origin_of = np.asarray([origin[i] for i in good])
        groups = source_groups([paths[i] for i in good], y.tolist())
        given = {s: np.flatnonzero(origin_of == s) for s in folder.files}
        index = _grouped_splits(y, groups, given, p, seed, raw_dir)
        grouping = {"rule": GROUPING_RULE, "files": len(good), "groups": int(len(np.unique(groups))),
                    "groups_across_splits": groups_across(index, groups)}  # fmt: skip
        _say_what_was_read(raw_dir, grouping, bad, {s: len(i) for s, i in index.items()})
        for c, cls in enumerate(classes):
            if not (y[index["train"]] == c).any():
                raise DataError(f"{raw_dir}: class '{cls}' has no usable image in the training split; expected at least one")
        mean, std = _channel_stats(x[index["train"]])
        splits = {s: {"x": x[index[s]], "y": y[index[s]]} for s in ("train", "val", "test")}
        meta = {
            "inputs": ["x"],
            "classes": classes,
            "image_size": p.image_size,
            "layout": "NHWC uint8",
            "channel_mean": mean,
            "channel_std": std,
            "eval_batch_size": eval_batch_size(p.image_size),
            "source_splits": sorted(folder.files),
            "class_counts": {s: {cls: int((splits[s]["y"] == c).sum()) for c, cls in enumerate(classes)} for s in splits},
            "skipped_files": bad,
            "grouping": grouping,
        }
        return Prepared(splits, meta)

    def evaluate_extra(
        self, params: Params, prepared: Prepared, split: str, logits: Any, out_dir: Path, prefix: str
    ) -> dict[str, float]:
        from sklearn.metrics import recall_score

        classes = prepared.meta["classes"]
        y = prepared.splits[split]["y"].astype(np.int64)
        pred = np.asarray(logits).argmax(axis=1)
        recall = recall_score(y, pred, labels=list(range(len(classes))), average=None, zero_division=0)
        if split == "test":
            _misclassified_png(prepared.splits[split]["x"], y, pred, classes, out_dir / f"{prefix}_misclassified.png")
        return {f"{split}/recall_{_metric_safe(c)}": float(r) for c, r in zip(classes, recall)}

    def run_tags(self, params: Params, runtime: Any) -> dict[str, str]:
        if runtime.framework != "torch":
            return {"augment": "Keras random layers", "stem": "3x3 stride-2 conv"}
        m, cuda = params.model, runtime.device.type == "cuda"
        stem = "3x3 stride-2 conv"
        if cuda and runtime.channels_last and (m.space_to_depth_stem or m.fused_augment):  # models.cnn_fast
            stem = "2x2 conv over 2x2 pixel blocks, 16 channels" if m.space_to_depth_stem else "3x3 stride-2 conv, RGB padded to 8 channels"
        fused = cuda and m.fused_augment
        return {"augment": "one Triton kernel with the normalisation" if fused else "torch ops", "stem": stem}

    def baselines(self, params: Params, prepared: Prepared, out_dir: Path) -> dict[str, Baseline]:
        """Logistic regression on each image's mean R, G, B: what colour alone explains."""
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        task = self.task(prepared.meta)
        feats = {s: channel_means(a["x"]) for s, a in prepared.splits.items()}
        model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
        model.fit(feats["train"], prepared.splits["train"]["y"])
        metrics: dict[str, float] = {}
        for split in ("val", "test"):
            logits = model.predict_log_proba(feats[split])  # softmax of log-probabilities gives them back
            metrics.update(task.metrics(prepared.splits[split]["y"], logits, split))
        return {"channel_means_logreg": Baseline(metrics, logits)}

    def build_torch(self, params: Params, meta: dict[str, Any]):
        from ..models.cnn_fast import torch_model  # imports torch: only stages that train load it

        return torch_model(params.model, meta["channel_mean"], meta["channel_std"], len(meta["classes"]))

    def build_tensorflow(self, params: Params, meta: dict[str, Any]):
        from ..models.keras_twins import guava_cnn

        return guava_cnn(params.model, meta["channel_mean"], meta["channel_std"], len(meta["classes"]), meta["image_size"])


def channel_means(x: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) uint8 -> (N, 3) mean R, G, B per image."""
    return x.reshape(len(x), -1, 3).mean(axis=1)


def _misclassified_png(x: np.ndarray, y: np.ndarray, pred: np.ndarray, classes: list[str], path: Path, limit: int = 16) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    wrong = np.flatnonzero(y != pred)[:limit]
    cols = 4
    rows = max(1, math.ceil(len(wrong) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.4 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, wrong):
        ax.imshow(x[i])
        ax.set_title(f"true {classes[y[i]]}\npred {classes[pred[i]]}", fontsize=8)
    fig.suptitle(f"Misclassified test images ({len(np.flatnonzero(y != pred))} of {len(y)}, first {len(wrong)} shown)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _kaggle_folder(handle: str) -> Path:
    """The downloaded dataset's ImageFolder root: the folder that holds train/ or the class folders."""
    folder = kaggle_download(handle)
    for candidate in [folder, *sorted(p for p in folder.rglob("*") if p.is_dir())]:
        names = {d.name.lower() for d in _subdirs(candidate)}
        if "train" in names or len(names & {c.lower() for c in CLASSES}) >= 2:
            return candidate
    raise DataError(f"kaggle dataset '{handle}': no train/ or class folders ({', '.join(CLASSES)}) in {folder}")


WORKLOAD = Guava()
