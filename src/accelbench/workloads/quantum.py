"""Quantum-enhanced CNN: a quanvolutional network (Henderson et al., 2019; the PennyLane quanvolution
demo) against the same classical head on the raw pixels. 10-class digit classification, torch only.

The model: `models/quanv.py` (the quanvolution in the PennyLane demo's form, a QNode on the CPU, and the
classical head); its device simulators, the same function as matmuls on any torch device, in
`models/quanv_sim.py`.

Sources: `bundled` = scikit-learn's 8x8 digits (pixels 0..16), `path` = an MNIST CSV (label + pixel
columns, with or without a header; pixels 0..255), `kaggle` = the digit-recognizer competition's
train.csv through kagglehub.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass, field, replace
from itertools import product
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from ..config import BenchmarkConfig, BenchTarget, DataParams, TrainParams, WorkloadParams, as_dict
from ..errors import ConfigError, DataError
from ..io import Prepared, read_json
from ..tasks import Task
from ..timing import Stopwatch, median, spread
from . import Workload, kaggle_file

RAW_FILE = "digits.csv"
CLASSES = tuple(str(d) for d in range(10))
CPU_SIMULATORS = ("default.qubit", "lightning.qubit")
SECTION = "params.yaml: quantum.model.quanv"
CHUNK_AMPLITUDES = 1 << 22  # patches x 2^n amplitudes per simulator call: bounds the memory of one chunk


@dataclass(frozen=True)
class Data(DataParams):
    kaggle_handle: str = "digit-recognizer"  # a Kaggle competition; its train.csv is read


@dataclass(frozen=True)
class Prepare:
    image_size: int | None = None  # None: as stored (8 for the digits, 28 for MNIST); else area-resized
    n_images: int | None = None  # None: all; else a stratified sample of this many
    test_size: float = 0.2
    val_size: float = 0.2


@dataclass(frozen=True)
class Quanv:
    mode: Literal["fixed", "trainable"] = "fixed"  # fixed: features computed once before training
    simulator: Literal["unitary", "lightcone", "default.qubit", "lightning.qubit"] = "unitary"
    qubits: int = 4
    layers: int = 1
    seed: int = 0  # the random layers' architecture and initial weights
    patch: int = 2
    stride: int = 2


@dataclass(frozen=True)
class Model:
    features: Literal["quanv", "raw"] = "quanv"  # set per variant: what the head sees
    head: Literal["dense", "conv"] = "dense"
    hidden: int = 32  # dense units or conv channels; 0 = a single linear layer (dense only)
    dropout: float = 0.0
    quanv: Quanv = field(default_factory=Quanv)


@dataclass(frozen=True)
class Circuits:
    """The benchmark stage's circuit throughput: a set of `images` (side x side) quanvolved on each device."""

    images: int = 16  # CPU-quick; 70000 for MNIST's size (13.7 M circuits with 2x2 stride-2 patches)
    cpu_images: int | None = None  # the CPU side's set when smaller (its rate steadies on fewer); null = images
    side: int = 28
    source: Literal["digits", "path"] = "digits"  # digits: the 8x8 digits upsampled | path: a Kaggle MNIST CSV
    path: str | None = None  # digit-recognizer train.csv or test.csv (no label); rows repeat up to `images`
    modes: list[Literal["fixed", "trainable", "patch3"]] = field(default_factory=lambda: ["fixed", "trainable", "patch3"])
    simulators: list[Literal["unitary", "lightcone"]] = field(default_factory=lambda: ["unitary", "lightcone"])
    chunk_amplitudes: int = 1 << 22  # circuits x amplitudes each (2^qubits, or the cones' sum) per call: bounds memory
    compile: list[bool] | None = None  # torch.compile settings timed side by side, e.g. [false, true]; null: the global one


@dataclass(frozen=True)
class Bench(BenchTarget):
    circuits: Circuits = field(default_factory=Circuits)


@dataclass(frozen=True)
class Params(WorkloadParams):
    framework: Literal["torch"] | None = "torch"
    data: Data = field(default_factory=Data)
    prepare: Prepare = field(default_factory=Prepare)
    model: Model = field(default_factory=Model)
    train: TrainParams = field(default_factory=lambda: TrainParams(epochs=10, batch_size=64, lr=1e-2))
    benchmark: Bench = field(default_factory=Bench)


# ---------------------------------------------------------------- data


def read_digits_csv(path: Path, pixel_max: int = 255, labelled: bool = True) -> tuple[np.ndarray | None, np.ndarray]:
    """Read an MNIST-style CSV (label + a square number of pixel columns, header optional) into
    labels (N,) and images (N, side, side); fail with the file, the field and what was expected.
    `labelled=False` also takes pixels alone (the digit-recognizer test.csv) and returns labels None."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    with open(path) as f:
        first = f.readline().strip()
    if not first:
        raise DataError(f"{path}: file is empty (expected label + pixel columns, e.g. label,pixel0..pixel783)")
    has_header = not _is_number(first.split(",")[0])
    df = pd.read_csv(path, header=0 if has_header else None, keep_default_na=False)  # C parser: fast on 42k rows
    if has_header:
        names = [str(c).strip() for c in df.columns]
        lower = [c.lower() for c in names]
        if labelled and "label" not in lower:
            raise DataError(
                f"{path}: no 'label' column in the header (it starts {','.join(names[:3])},...); expected "
                "label followed by the pixel columns, as in the Kaggle digit-recognizer train.csv (test.csv has no labels)"
            )
        label_col = df.columns[lower.index("label")] if "label" in lower else None
        pixel_cols = [c for c in df.columns if c != label_col]
    elif not labelled and math.isqrt(df.shape[1]) ** 2 == df.shape[1]:
        label_col, pixel_cols = None, list(df.columns)  # a square number of columns: pixels alone
    else:
        label_col, pixel_cols = df.columns[0], list(df.columns[1:])
    side = math.isqrt(len(pixel_cols))
    if side * side != len(pixel_cols) or side < 2:
        square = math.isqrt(df.shape[1]) ** 2 == df.shape[1]
        hint = f" ({df.shape[1]} columns is itself a square: pixels without a label column?)" if square else ""
        besides = " besides the label" if label_col is not None else ""
        raise DataError(
            f"{path}: {len(pixel_cols)} pixel columns{besides}; expected a square number (784 for 28x28, "
            f"label,pixel0..pixel783 or test.csv's pixel0..pixel783){hint}"
        )
    if df.empty:
        raise DataError(f"{path}: has a header but no rows")
    labels = None if label_col is None else _integers(path, df[label_col], "label", has_header)
    bad = np.zeros(0, bool) if labels is None else (labels < 0) | (labels > 9)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise DataError(f"{path}: column 'label', row {_line(row, has_header)}: {labels[row]} is not a digit 0..9")
    block = df[pixel_cols]
    if all(pd.api.types.is_integer_dtype(t) for t in block.dtypes):
        pixels = block.to_numpy(np.int64)
    else:  # find the offending cell for the message
        pixels = np.stack([_integers(path, df[c], str(c), has_header) for c in pixel_cols], axis=1)
    out = (pixels < 0) | (pixels > pixel_max)
    if out.any():
        row, col = (int(i) for i in np.argwhere(out)[0])
        raise DataError(
            f"{path}: column '{pixel_cols[col]}', row {_line(row, has_header)}: pixel value {pixels[row, col]} "
            f"out of range; expected integers 0..{pixel_max}"
        )
    return labels, pixels.reshape(-1, side, side)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _line(row: int, has_header: bool) -> int:
    return row + 1 + has_header  # 1-based line number in the file


def _integers(path: Path, column: pd.Series, name: str, has_header: bool) -> np.ndarray:
    if pd.api.types.is_integer_dtype(column):
        return column.to_numpy(np.int64)
    text = column.astype(str).str.strip()
    values = pd.to_numeric(text, errors="coerce")
    bad = values.isna() | (values != values.round())
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise DataError(f"{path}: column '{name}', row {_line(row, has_header)}: {column.iloc[row]!r} is not an integer")
    return values.to_numpy().astype(np.int64)


def write_digits_csv(path: Path, labels: np.ndarray, images: np.ndarray) -> None:
    """The Kaggle digit-recognizer layout: label,pixel0..pixelN."""
    flat = images.reshape(len(images), -1)
    df = pd.DataFrame(flat, columns=[f"pixel{i}" for i in range(flat.shape[1])])
    df.insert(0, "label", labels)
    df.to_csv(path, index=False)


def resize(images: np.ndarray, size: int) -> np.ndarray:
    """(N, s, s) in [0, 1] -> (N, size, size): area averaging down, bilinear up."""
    if size == images.shape[1]:
        return images.astype(np.float32)
    import torch  # torch's pooling and interpolation: loaded only when a size change is asked for
    import torch.nn.functional as F

    x = torch.from_numpy(images[:, None].astype(np.float32))
    if size < images.shape[1]:
        x = F.adaptive_avg_pool2d(x, size)
    elif size > images.shape[1]:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)
    return x[:, 0].numpy()


# ---------------------------------------------------------------- the quantum layer


def output_side(q: Quanv, image_size: int) -> int:
    """Check that patches tile the image and the qubits fit a patch; return the feature map's side."""
    if q.patch < 1 or q.stride < 1 or q.qubits < 1 or q.layers < 1:
        raise ConfigError(f"{SECTION}: patch, stride, qubits and layers must be at least 1")
    if q.patch > image_size or (image_size - q.patch) % q.stride:
        raise ConfigError(
            f"{SECTION}.patch/stride: a {q.patch}x{q.patch} patch with stride {q.stride} does not tile the "
            f"{image_size}x{image_size} image; expected (image_size - patch) to be a multiple of stride"
        )
    if q.qubits > q.patch * q.patch:
        raise ConfigError(
            f"{SECTION}.qubits: {q.qubits} qubits but a {q.patch}x{q.patch} patch has {q.patch**2} pixels; "
            f"expected at most {q.patch**2} (one pixel per qubit at least)"
        )
    return (image_size - q.patch) // q.stride + 1


def check_unitary_fits(q: Quanv, device: str, trainable: bool) -> None:
    """The unitary simulator holds a 2^n x 2^n matrix (complex128 while PennyLane builds it): refuse
    sizes that would not fit rather than swap or crash, and name the simulators that scale instead."""
    if q.simulator in CPU_SIMULATORS:
        return  # lightcone: its largest cone may be all the wires, so it is held to the same bound
    import psutil

    need = 16 * 4**q.qubits * (4 if trainable else 1)
    free = psutil.virtual_memory().available
    where = "host memory"
    if device.startswith("cuda"):
        import torch

        gpu_free = torch.cuda.mem_get_info(torch.device(device))[0]
        free, where = min(free, gpu_free), f"{device} and host memory"
    if need > free // 2:
        raise ConfigError(
            f"{SECTION}.qubits: {q.qubits} qubits need a 2^{q.qubits} x 2^{q.qubits} unitary ({_size(need)}), "
            f"more than half the {_size(free)} free in {where}; use quanv.simulator default.qubit or "
            f"lightning.qubit, which hold one 2^{q.qubits}-amplitude state per patch ({_size(16 * 2**q.qubits)})"
        )


def _size(n: float) -> str:
    unit = 0
    while n >= 1024 and unit < 4:
        n, unit = n / 1024, unit + 1
    return f"{n:.1f} {('B', 'KiB', 'MiB', 'GiB', 'TiB')[unit]}"


def quanvolution(q: Quanv, trainable: bool = False, dtype: str = "float32", chunk_amplitudes: int = CHUNK_AMPLITUDES):
    """The quanvolution layer for `q.simulator` as a torch module."""
    from ..models.quanv_sim import quanvolution_layer  # imports torch: only stages that train or simulate load it

    return quanvolution_layer(q, trainable, dtype, chunk_amplitudes)


def quanvolve(layer, images: np.ndarray, device: str, chunk_images: int) -> tuple[np.ndarray, float, float]:
    """Quanvolve (N, 1, H, W) images on `device`; return features, compute seconds (device synced) and
    copy seconds (host to device and back, kept apart as the timing rules ask)."""
    import torch

    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    t0 = time.perf_counter()
    x = torch.from_numpy(np.ascontiguousarray(images)).to(device)
    sync()
    copy_s = time.perf_counter() - t0
    with torch.inference_mode():
        layer(x[: min(chunk_images, 256)])  # warm-up: kernels, allocator, PennyLane's first-call set-up
        sync()
        t0 = time.perf_counter()
        out = torch.cat([layer(x[i : i + chunk_images]) for i in range(0, len(x), chunk_images)])
        sync()
        compute_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    features = out.cpu().numpy()
    copy_s += time.perf_counter() - t0
    return features, compute_s, copy_s


def _chunk_images(q: Quanv, image_size: int) -> int:
    patches = output_side(q, image_size) ** 2
    return max(1, CHUNK_AMPLITUDES // (patches * 2**q.qubits))


# ---------------------------------------------------------------- the workload


class Quantum(Workload):
    name = "quantum"
    Params = Params
    frameworks = ("torch",)
    data_parallel = False
    single_device_reason = (
        "the quanvolution features are computed once, before training, as one batched circuit unitary on one "
        "device, and the head that trains on them is too small for a gradient all-reduce to pay"
    )

    def __init__(self) -> None:
        self._features: dict[tuple, tuple[Prepared, Prepared, dict[str, float]]] = {}

    reference_variants = ("raw",)  # the same head on raw pixels: what the quantum features must beat

    def variants(self, params: Params) -> dict[str, dict[str, Any]]:
        return {"quanv": {"model.features": "quanv"}, "raw": {"model.features": "raw"}}

    def task(self, meta: dict[str, Any]) -> Task:
        return Task("multiclass", 10, objective="val/accuracy", direction="maximize", class_names=CLASSES)

    def ingest(self, params: Params, out_dir: Path) -> dict[str, Any]:
        src = params.data
        if src.source == "bundled":
            from sklearn.datasets import load_digits

            digits = load_digits()
            labels, images = digits.target.astype(np.int64), digits.images.astype(np.int64)
            origin, pixel_max = "sklearn.datasets.load_digits (UCI 8x8 digits)", 16
        elif src.source == "path":
            if not src.path:
                raise DataError("params.yaml: quantum.data.path: required when source is 'path'")
            labels, images = read_digits_csv(Path(src.path))
            origin, pixel_max = str(src.path), 255
        else:
            labels, images = read_digits_csv(kaggle_file(src.kaggle_handle, "train.csv", competition=True))
            origin, pixel_max = f"kaggle:{src.kaggle_handle}", 255
        write_digits_csv(out_dir / RAW_FILE, labels, images)
        return {"source": src.source, "origin": origin, "rows": len(labels), "image_size": images.shape[1],
                "pixel_max": pixel_max}  # fmt: skip

    def _read_raw(self, raw_dir: Path) -> tuple[np.ndarray, np.ndarray, int]:
        pixel_max = read_json(raw_dir / "source.json")["pixel_max"]
        labels, images = read_digits_csv(raw_dir / RAW_FILE, pixel_max)
        return labels, images, pixel_max

    def eda(self, params: Params, raw_dir: Path, out_dir: Path) -> dict[str, Any]:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        labels, images, pixel_max = self._read_raw(raw_dir)
        counts = np.bincount(labels, minlength=10)
        fig, ax = plt.subplots(figsize=(5, 3))
        ax.bar(CLASSES, counts)
        ax.set(title="Images per digit", xlabel="label", ylabel="images")
        fig.tight_layout()
        fig.savefig(out_dir / "class_balance.png", dpi=100)
        fig, axes = plt.subplots(2, 10, figsize=(12, 3))
        for d in range(10):
            members = images[labels == d]
            for row, (img, title) in enumerate(
                ((members[0] if len(members) else np.zeros(images.shape[1:]), f"{d}"),
                 (members.mean(0) if len(members) else np.zeros(images.shape[1:]), f"mean {d}"))
            ):  # fmt: skip
                axes[row, d].imshow(img, cmap="gray", vmin=0, vmax=pixel_max)
                axes[row, d].set_title(title, fontsize=8)
                axes[row, d].axis("off")
        fig.suptitle("A sample and the mean image of each digit")
        fig.tight_layout()
        fig.savefig(out_dir / "digits.png", dpi=100)
        plt.close("all")
        return {
            "rows": len(labels),
            "image_size": int(images.shape[1]),
            "pixel_max": pixel_max,
            "class_counts": {str(d): int(c) for d, c in enumerate(counts)},
            "mean_pixel": float(images.mean() / pixel_max),
            "blank_pixel_fraction": float((images == 0).mean()),
        }

    def prepare(self, params: Params, raw_dir: Path, seed: int) -> Prepared:
        from sklearn.model_selection import train_test_split

        file = raw_dir / RAW_FILE
        labels, images, pixel_max = self._read_raw(raw_dir)
        p = params.prepare
        idx = np.arange(len(labels))
        if p.n_images is not None:
            if not 30 <= p.n_images <= len(labels):
                raise ConfigError(
                    f"params.yaml: quantum.prepare.n_images: {p.n_images}; expected 30..{len(labels)} ({file} has {len(labels)})"
                )
            if p.n_images < len(labels):
                idx, _ = train_test_split(idx, train_size=p.n_images, stratify=labels, random_state=seed)
        y = labels[idx]
        for d, n in enumerate(np.bincount(y, minlength=10)):
            if 0 < n < 3:
                raise DataError(
                    f"{file}: column 'label': digit {d} has {n} image(s), so a split would lack it; expected at least 3"
                )
        size = p.image_size or images.shape[1]
        if not 2 <= size <= 64:
            raise ConfigError(f"params.yaml: quantum.prepare.image_size: {size}; expected 2..64 pixels")
        x = resize(images[idx] / pixel_max, size)[:, None].astype(np.float32)  # (N, 1, size, size) in [0, 1]
        try:
            rest, test = train_test_split(np.arange(len(y)), test_size=p.test_size, stratify=y, random_state=seed)
            train, val = train_test_split(rest, test_size=p.val_size / (1 - p.test_size), stratify=y[rest],
                                          random_state=seed)  # fmt: skip
        except ValueError as exc:  # a split smaller than the number of digits cannot be stratified
            raise DataError(f"{file}: {len(y)} images are too few for stratified train/val/test splits ({exc})") from exc
        splits = {name: {"x": x[rows], "y": y[rows]} for name, rows in (("train", train), ("val", val), ("test", test))}
        meta = {
            "inputs": ["x"],
            "image_size": size,
            "stored_image_size": int(images.shape[1]),
            "pixel_max": pixel_max,
            "n_images": len(y),
            "class_counts": {s: {str(d): int((a["y"] == d).sum()) for d in range(10)} for s, a in splits.items()},
        }
        return Prepared(splits, meta)

    def precompute(self, params: Params, prepared: Prepared, runtime: Any) -> tuple[Prepared, dict[str, float]]:
        """Mode `fixed`: quanvolve every split once on the device; the head then trains on the features."""
        m = params.model
        if m.features != "quanv" or m.quanv.mode != "fixed":
            return prepared, {}
        device = runtime.device.torch
        key = (id(prepared), json.dumps(as_dict(m.quanv), sort_keys=True), device)
        if key not in self._features:  # tuning asks once per trial: the same circuit gives the same features
            # the input is kept beside its features so that its id cannot be reused by another object
            self._features[key] = (prepared, *self._quanvolve_splits(m.quanv, prepared, device))
        return self._features[key][1:]

    def _quanvolve_splits(self, q: Quanv, prepared: Prepared, device: str) -> tuple[Prepared, dict[str, float]]:
        size = prepared.meta["image_size"]
        output_side(q, size)
        check_unitary_fits(q, device, trainable=False)
        t0 = time.perf_counter()
        layer = quanvolution(q).to(device)
        setup_s = time.perf_counter() - t0
        splits, compute_s, copy_s, circuits = {}, 0.0, 0.0, 0
        for name, arrays in prepared.splits.items():
            features, c, t = quanvolve(layer, arrays["x"], device, _chunk_images(q, size))
            splits[name] = {**arrays, "x": features.astype(np.float32)}
            compute_s, copy_s = compute_s + c, copy_s + t
            circuits += features.shape[0] * features.shape[2] * features.shape[3]
        metrics = {
            "time/quantum_s": compute_s,
            "time/quantum_setup_s": setup_s,
            "time/quantum_copy_s": copy_s,
            "quantum/circuits": circuits,
            "throughput/circuits_per_s": circuits / compute_s if compute_s > 0 else float("nan"),
        }
        return Prepared(splits, prepared.meta), metrics

    def run_tags(self, params: Params, runtime: Any) -> dict[str, str]:
        m = params.model
        if m.features != "quanv":
            return {"features": "raw"}
        on = "cpu" if m.quanv.simulator in CPU_SIMULATORS else runtime.device.torch
        return {"features": "quanv", "quanv.mode": m.quanv.mode, "quanv.simulator": m.quanv.simulator,
                "quanv.sim_device": on}  # fmt: skip

    def evaluate_extra(
        self, params: Params, prepared: Prepared, split: str, logits: Any, out_dir: Path, prefix: str
    ) -> dict[str, float]:
        if split != "test" or params.model.features != "quanv":
            return {}
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        q = params.model.quanv
        images = prepared.splits["test"]["x"][:4]
        features, _, _ = quanvolve(quanvolution(q), images, "cpu", len(images))
        n = min(q.qubits, 8)
        fig, axes = plt.subplots(len(images), n + 1, figsize=(1.6 * (n + 1), 1.7 * len(images)), squeeze=False)
        for i, img in enumerate(images):
            axes[i, 0].imshow(img[0], cmap="gray", vmin=0, vmax=1)
            axes[i, 0].set_title(f"label {int(prepared.splits['test']['y'][i])}", fontsize=8)
            for c in range(n):
                axes[i, c + 1].imshow(features[i, c], cmap="coolwarm", vmin=-1, vmax=1)
                axes[i, c + 1].set_title(f"<Z{c}>", fontsize=8)
        for ax in axes.flat:
            ax.axis("off")
        weights = "its seeded initial weights (trained ones differ)" if q.mode == "trainable" else "fixed weights"
        fig.suptitle(f"Test images and their quantum channels: {q.qubits} qubits, {q.layers} layer(s), seed {q.seed}, "
                     f"{weights}", fontsize=9)  # fmt: skip
        fig.tight_layout()
        fig.savefig(out_dir / f"{prefix}_quantum_channels.png", dpi=100)
        plt.close(fig)
        return {}

    def extra_benchmarks(self, params: Params, runtime: Any, bench: BenchmarkConfig) -> list[dict[str, Any]]:
        return benchmark_circuits(params, runtime, bench)

    def stacks(self, params: Params) -> bool:
        return params.model.features != "quanv" or params.model.quanv.mode == "fixed"

    def population_model(self, params: Params, prepared: Prepared, runtime: Any):
        """The head trains; the quanvolution in mode fixed is computed once for the whole population."""
        m = params.model
        if m.features == "quanv" and m.quanv.mode != "fixed":
            raise ConfigError(f"{SECTION}.mode: population tuning stacks the classical head over fixed features; "
                              "expected mode fixed (or tune.strategy sequential)")  # fmt: skip
        inputs, _ = self.precompute(params, prepared, runtime)
        return (lambda p: self.build_torch(p, prepared.meta)), inputs

    def build_torch(self, params: Params, meta: dict[str, Any]):
        from torch import nn

        from ..models.quanv import head as quanv_head  # imports torch: only stages that train load it

        m = params.model
        side, channels = meta["image_size"], 1
        if m.features == "quanv":
            side, channels = output_side(m.quanv, side), m.quanv.qubits
        head = quanv_head(m, channels, side)
        if m.features == "raw" or m.quanv.mode == "fixed":
            return head  # fixed features come from precompute
        import torch

        device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
        check_unitary_fits(m.quanv, device, trainable=True)
        return nn.Sequential(quanvolution(m.quanv, trainable=True), head)


# ---------------------------------------------------------------- circuits/s, for the closing note


def benchmark_simulators(
    device: str = "cpu", n_images: int = 1797, qnode_patches: int = 200, repeats: int = 5
) -> dict[str, Any]:
    """Circuits/s of the per-patch QNode (on `qnode_patches` patches, its full-set time extrapolated)
    and of each simulator quanvolving `n_images` of the 8x8 digits on `device`, with the default circuit:
    median and interquartile range of `repeats` passes (one pass for lightning.qubit, which is slow)."""
    import torch
    from sklearn.datasets import load_digits

    from ..models.quanv import initial_weights, patch_qnode  # imports torch: only the benchmark stage loads it

    q = Quanv()
    images = (load_digits().images[:n_images] / 16.0)[:, None]
    circuits = len(images) * output_side(q, 8) ** 2
    out: dict[str, Any] = {"device": device, "torch_threads": torch.get_num_threads(), "images": len(images),
                           "circuits": circuits}  # fmt: skip
    qnode, weights = patch_qnode(q), initial_weights(q)
    patches = images[:, 0].reshape(len(images), 4, 2, 4, 2).transpose(0, 1, 3, 2, 4).reshape(-1, 4)[:qnode_patches]
    qnode(patches[0], weights)  # warm-up
    t0 = time.perf_counter()
    for p in patches:
        qnode(p, weights)
    rate = len(patches) / (time.perf_counter() - t0)
    out["qnode_per_patch"] = {"circuits_per_s": rate, "full_set_s_extrapolated": circuits / rate, "sim_device": "cpu"}
    for sim in ("unitary", "lightcone", *CPU_SIMULATORS):
        sq = Quanv(simulator=sim)
        layer = quanvolution(sq).to(device)
        passes = [quanvolve(layer, images.astype(np.float32), device, _chunk_images(sq, 8))
                  for _ in range(1 if sim == "lightning.qubit" else repeats)]  # fmt: skip
        seconds = [p[1] for p in passes]
        out[sim] = {"circuits_per_s": circuits / median(seconds), "full_set_s": median(seconds),
                    "full_set_iqr_s": spread(seconds), "passes": len(passes), "copy_s": median([p[2] for p in passes]),
                    "sim_device": "cpu" if sim in CPU_SIMULATORS else device}  # fmt: skip
    return out


# ---------------------------------------------------------------- circuits/s, in the benchmark stage

# The goals for a data-centre GPU (an H100 class card), set beside each figure in the report (a set time only for the fixed layer)
GOALS = {"fixed": 2e9, "trainable": 1e8, "patch3": 5e7}
SET_GOAL_MS = 20.0  # for MNIST's size:
MNIST_SET = (70_000, 28)  # images, side
MODE_TEXT = {
    "fixed": "fixed layer",
    "trainable": "trainable layer, forward + backward",
    "patch3": "fixed layer, 3x3 patches",
}


def circuit_images(c: Circuits) -> tuple[np.ndarray, str, int]:
    """(images, 1, side, side) float32 in [0, 1]: the CSV's images or the 8x8 digits resized to `side`, repeated
    in order up to `images`; also where they came from and how many are distinct."""
    where = "params.yaml: quantum.benchmark.circuits"
    if c.images < 1 or c.side < 2:
        raise ConfigError(f"{where}: images {c.images}, side {c.side}; expected images >= 1 and side >= 2")
    if c.source == "path":
        if not c.path:
            raise DataError(f"{where}.path: required when source is 'path' (a Kaggle digit-recognizer train.csv or test.csv)")
        _, pixels = read_digits_csv(Path(c.path), labelled=False)
        base, origin = pixels / 255.0, str(c.path)
    else:
        from sklearn.datasets import load_digits

        base, origin = load_digits().images / 16.0, "sklearn digits 8x8"
    if base.shape[1] != c.side:
        origin += f" resized to {c.side}x{c.side}"
    base = resize(base, c.side)
    return base[np.arange(c.images) % len(base), None].astype(np.float32), origin, len(base)


def mode_circuit(q: Quanv, mode: str, simulator: str) -> Quanv:
    """The model's circuit (qubits, layers, seed, patch, stride) for fixed and trainable; 9 qubits on 3x3 patches,
    stride 1, for patch3."""
    q = replace(q, simulator=simulator, mode="trainable" if mode == "trainable" else "fixed")
    return replace(q, qubits=9, patch=3, stride=1) if mode == "patch3" else q


def benchmark_circuits(params: Params, runtime: Any, bench: BenchmarkConfig) -> list[dict[str, Any]]:
    """Circuits/s of each mode and simulator on the runtime's device: one warm-up pass over the whole set
    (compilation included), then `bench.repeats` timed passes, each closed by a device sync; the images
    are copied to the device once, before the clock (that copy is its own figure)."""
    import torch

    c = params.benchmark.circuits
    if not c.modes or not c.simulators:
        return []
    device = runtime.device.torch
    cuda = device.startswith("cuda")
    images, origin, distinct = circuit_images(c if cuda or not c.cpu_images else replace(c, images=c.cpu_images))
    watch = Stopwatch((lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None))
    t0 = watch.start()
    x = torch.from_numpy(images).to(device)
    copy_s = watch.stop("copy", t0)
    records = []
    compiles = [runtime.compile] if c.compile is None else c.compile
    for mode, simulator, compiled in product(c.modes, c.simulators, compiles):
        q = mode_circuit(params.model.quanv, mode, simulator)
        side = output_side(q, c.side)
        check_unitary_fits(q, device, trainable=mode == "trainable")
        layer = quanvolution(q, trainable=mode == "trainable", chunk_amplitudes=c.chunk_amplitudes).to(device)
        per_call = max(1, c.chunk_amplitudes // (side * side * layer.amplitudes))  # images per layer call
        one_pass = _gradient_pass if mode == "trainable" else _forward_pass
        if compiled:  # a fresh cache per layer: six layers share one forward, past dynamo's recompile limit
            torch._dynamo.reset()
        run = torch.compile(layer) if compiled else layer
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        start_ms = int(time.time() * 1000)  # its run spans the passes, though logged after them
        t0 = watch.start()
        one_pass(run, x, per_call)
        warmup_s = watch.stop("warmup", t0)
        seconds = []
        for _ in range(max(1, bench.repeats)):
            t0 = watch.start()
            one_pass(run, x, per_call)
            seconds.append(watch.stop(mode, t0))
        circuits = len(x) * side * side
        rates = [circuits / s for s in seconds]
        records.append({
            "kind": "circuits", "variant": f"{mode}-{simulator}" + ("-compiled" if compiled else ""), "mode": mode,
            "simulator": simulator, "compile": str(compiled).lower(),
            "batch_size": per_call, "qubits": q.qubits, "layers": q.layers,
            "patches": f"{q.patch}x{q.patch} stride {q.stride}", "images": len(x), "side": c.side,
            "distinct_images": distinct, "source": origin, "circuits": circuits, "dtype": "float32",
            "goal_circuits_per_s": GOALS[mode], "goal_set_ms": SET_GOAL_MS if (mode, len(x), c.side) == ("fixed", *MNIST_SET) else None,
            "timed": f"{len(seconds)} passes over {len(x)} images of {c.side}x{c.side} ({circuits} circuits, "
                     f"{MODE_TEXT[mode]}, {q.qubits} qubits, {per_call} images per call) after 1 warm-up pass; "
                     "images already on the device",
            "bench/circuits_per_s": median(rates), "bench/circuits_per_s_iqr": spread(rates),
            "bench/set_ms": 1000 * median(seconds), "bench/warmup_s": warmup_s, "bench/to_device_s": copy_s,
            "bench/peak_gpu_mb": torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None,
            "repeats": {"bench/repeat_circuits_per_s": rates}, "start_ms": start_ms,
        })  # fmt: skip
        del layer, run
        if cuda:
            torch.cuda.empty_cache()
    return records


def _forward_pass(layer, x, per_call: int) -> list:
    """The fixed layer over every image; the features stay on the device, one tensor per call."""
    import torch

    with torch.inference_mode():
        return [layer(x[i : i + per_call]) for i in range(0, len(x), per_call)]


def _gradient_pass(layer, x, per_call: int) -> None:
    """Forward and backward to the circuit weights over every image, one step per call: the unitary is
    composed from the weights in each step, as in training."""
    for i in range(0, len(x), per_call):
        layer(x[i : i + per_call]).sum().backward()


WORKLOAD = Quantum()

if __name__ == "__main__":
    cli = argparse.ArgumentParser(description="circuits/s of each quanvolution simulator on the 8x8 digits")
    cli.add_argument("--device", default="cpu")
    cli.add_argument("--images", type=int, default=1797)
    cli.add_argument("--qnode-patches", type=int, default=200)
    cli.add_argument("--repeats", type=int, default=5)
    cli.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    args = cli.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    print(json.dumps(benchmark_simulators(args.device, args.images, args.qnode_patches, args.repeats), indent=2))
