"""Quantum-enhanced CNN: a quanvolutional network (Henderson et al., 2019; the PennyLane quanvolution
demo) against the same classical head on the raw pixels. 10-class digit classification, torch only.

Each patch of an image is angle-encoded (RY(pi * pixel) on qubit j mod n), passed through seeded
PennyLane `RandomLayers` and read out as the Pauli-Z expectation of every qubit: one output channel
per qubit. The encoding is a product state and the layers are fixed (or, in `trainable` mode, rebuilt
from their weights each step), so the whole circuit after encoding is one 2^n x 2^n unitary that
PennyLane gives (`qml.matrix`): a batch of patches is one matmul on the device, never a QNode per
patch. `default.qubit` and `lightning.qubit` are CPU references through parameter broadcasting.

Sources: `bundled` = scikit-learn's 8x8 digits (pixels 0..16), `path` = an MNIST CSV (label + pixel
columns, with or without a header; pixels 0..255), `kaggle` = the digit-recognizer competition's
train.csv through kagglehub.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from ..config import DataParams, TrainParams, WorkloadParams, as_dict
from ..errors import ConfigError, DataError
from ..io import Prepared, read_json
from ..tasks import Task
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
    simulator: Literal["unitary", "default.qubit", "lightning.qubit"] = "unitary"
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
class Params(WorkloadParams):
    framework: Literal["torch"] | None = "torch"
    data: Data = field(default_factory=Data)
    prepare: Prepare = field(default_factory=Prepare)
    model: Model = field(default_factory=Model)
    train: TrainParams = field(default_factory=lambda: TrainParams(epochs=10, batch_size=64, lr=1e-2))


# ---------------------------------------------------------------- data


def read_digits_csv(path: Path, pixel_max: int = 255) -> tuple[np.ndarray, np.ndarray]:
    """Read an MNIST-style CSV (label + a square number of pixel columns, header optional) into
    labels (N,) and images (N, side, side); fail with the file, the field and what was expected."""
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
        if "label" not in lower:
            raise DataError(
                f"{path}: no 'label' column in the header (it starts {','.join(names[:3])},...); expected "
                "label followed by the pixel columns, as in the Kaggle digit-recognizer train.csv (test.csv has no labels)"
            )
        label_col = df.columns[lower.index("label")]
        pixel_cols = [c for c in df.columns if c != label_col]
    else:
        label_col, pixel_cols = df.columns[0], list(df.columns[1:])
    side = math.isqrt(len(pixel_cols))
    if side * side != len(pixel_cols) or side < 2:
        square = math.isqrt(df.shape[1]) ** 2 == df.shape[1]
        hint = f" ({df.shape[1]} columns is itself a square: pixels without a label column?)" if square else ""
        raise DataError(
            f"{path}: {len(pixel_cols)} pixel columns besides the label; expected a square number "
            f"(784 for 28x28){hint}"
        )
    if df.empty:
        raise DataError(f"{path}: has a header but no rows")
    labels = _integers(path, df[label_col], "label", has_header)
    bad = (labels < 0) | (labels > 9)
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
    import torch
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
    if q.simulator != "unitary":
        return
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


def initial_weights(q: Quanv) -> np.ndarray:
    """The demo's random layers: uniform angles in [0, 2 pi), one rotation per qubit per layer."""
    return np.random.default_rng(q.seed).uniform(0, 2 * np.pi, (q.layers, q.qubits))


def random_layers(q: Quanv, weights: Any):
    import pennylane as qml

    return qml.RandomLayers(weights, wires=range(q.qubits), seed=q.seed)


def circuit_unitary(q: Quanv, weights: np.ndarray) -> np.ndarray:
    """PennyLane's own matrix of the random layers, wire 0 the most significant bit."""
    import pennylane as qml

    return qml.matrix(random_layers(q, weights), wire_order=range(q.qubits))


def gate_matrices(q: Quanv) -> tuple[np.ndarray, list[int]]:
    """The random layers as a list of full 2^n x 2^n matrices, from PennyLane's decomposition:
    a rotation exp(-i w P / 2) = cos(w/2) I + sin(w/2) (-i P) is stored as -i P with the index of
    its weight; a fixed gate (CNOT) as itself with index -1."""
    import pennylane as qml

    weights = initial_weights(q)
    mats, index = [], []
    generators = {"RX": qml.PauliX, "RY": qml.PauliY, "RZ": qml.PauliZ}
    k = 0
    for op in random_layers(q, weights).decomposition():
        if op.name in generators:
            if not np.isclose(float(op.parameters[0]), weights.flat[k]):
                raise RuntimeError(f"RandomLayers decomposition: rotation {k} does not use weight {k}")
            mats.append(-1j * qml.matrix(generators[op.name](op.wires[0]), wire_order=range(q.qubits)))
            index.append(k)
            k += 1
        else:
            mats.append(qml.matrix(op, wire_order=range(q.qubits)))
            index.append(-1)
    return np.stack(mats), index


def patch_qnode(q: Quanv, device: str = "default.qubit"):
    """The reference: one QNode call per patch, exactly the demo's circuit (pixel j on wire j mod n)."""
    import pennylane as qml

    @qml.qnode(qml.device(device, wires=q.qubits))
    def circuit(pixels, weights):
        for j, value in enumerate(pixels):
            qml.RY(np.pi * value, wires=j % q.qubits)
        random_layers(q, weights)
        return [qml.expval(qml.PauliZ(w)) for w in range(q.qubits)]

    return circuit


def broadcast_qnode(q: Quanv, device: str):
    """A CPU QNode taking a batch of encoding angles (B, n) at once (parameter broadcasting)."""
    import pennylane as qml

    diff = "backprop" if device == "default.qubit" else "adjoint"

    @qml.qnode(qml.device(device, wires=q.qubits), interface="torch", diff_method=diff)
    def circuit(angles, weights):
        for w in range(q.qubits):
            qml.RY(angles[:, w], wires=w)
        random_layers(q, weights)
        return [qml.expval(qml.PauliZ(w)) for w in range(q.qubits)]

    return circuit


@cache
def _torch_module():
    import torch
    from torch import nn

    class Quanvolution(nn.Module):
        """(N, 1, H, W) pixels in [0, 1] -> (N, qubits, H', W') Pauli-Z expectations.

        Runs in `dtype` (fp32 for training, float64 for the equivalence test) whatever the autocast
        policy: amplitudes squared in bf16 would lose the signal. CPU simulators copy patches to the
        host and the results back.
        """

        def __init__(self, q: Quanv, trainable: bool, dtype: torch.dtype):
            super().__init__()
            self.q, self.trainable = q, trainable
            n = q.qubits
            encode = np.zeros((q.patch * q.patch, n))
            encode[np.arange(q.patch * q.patch), np.arange(q.patch * q.patch) % n] = np.pi  # RY angles add up
            bits = (np.arange(2**n)[:, None] >> (n - 1 - np.arange(n))) & 1
            self.register_buffer("encode", torch.tensor(encode, dtype=dtype), persistent=False)
            self.register_buffer("z_signs", torch.tensor(1.0 - 2.0 * bits, dtype=dtype), persistent=False)
            weights = torch.tensor(initial_weights(q), dtype=dtype)
            if trainable:
                self.weights = nn.Parameter(weights)
            else:
                self.register_buffer("weights", weights, persistent=False)
            if q.simulator in CPU_SIMULATORS:
                self._qnode = broadcast_qnode(q, q.simulator)
            elif trainable:
                mats, self._weight_index = gate_matrices(q)
                self.register_buffer("gate_re", torch.tensor(mats.real, dtype=dtype), persistent=False)
                self.register_buffer("gate_im", torch.tensor(mats.imag, dtype=dtype), persistent=False)
            else:
                u = circuit_unitary(q, initial_weights(q))
                self.register_buffer("u_re", torch.tensor(u.real, dtype=dtype), persistent=False)
                self.register_buffer("u_im", torch.tensor(u.imag, dtype=dtype), persistent=False)

        def unitary(self) -> tuple[torch.Tensor, torch.Tensor]:
            """Real and imaginary parts of the circuit's unitary; differentiable in `weights` when trainable."""
            if not self.trainable:
                return self.u_re, self.u_im
            dim = self.gate_re.shape[-1]
            re = torch.eye(dim, dtype=self.gate_re.dtype, device=self.gate_re.device)
            im = torch.zeros_like(re)
            flat = self.weights.reshape(-1)
            for g, k in enumerate(self._weight_index):
                kr, ki = self.gate_re[g], self.gate_im[g]
                if k < 0:
                    re, im = kr @ re - ki @ im, kr @ im + ki @ re
                else:
                    c, s = torch.cos(flat[k] / 2), torch.sin(flat[k] / 2)
                    re, im = c * re + s * (kr @ re - ki @ im), c * im + s * (kr @ im + ki @ re)
            return re, im

        def expvals(self, angles: torch.Tensor) -> torch.Tensor:
            """(B, n) encoding angles -> (B, n) <Z> per qubit."""
            if self.q.simulator in CPU_SIMULATORS:
                out = self._qnode(angles.detach().cpu().double(), self.weights.cpu().double())
                return torch.stack(out, dim=-1).to(device=angles.device, dtype=angles.dtype)
            half = angles / 2
            amps = torch.stack([torch.cos(half), torch.sin(half)], dim=-1)  # (B, n, 2): RY|0>
            state = amps[:, 0]
            for w in range(1, angles.shape[1]):  # the product state, wire 0 most significant
                state = (state[:, :, None] * amps[:, w, None, :]).reshape(len(angles), -1)
            re, im = self.unitary()
            probs = (state @ re.T) ** 2 + (state @ im.T) ** 2
            return probs @ self.z_signs

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            with torch.autocast(x.device.type, enabled=False):
                x = x.to(self.encode.dtype)
                patches = torch.nn.functional.unfold(x, self.q.patch, stride=self.q.stride)  # (N, p*p, L)
                n_img, _, n_patch = patches.shape
                angles = patches.transpose(1, 2).reshape(-1, patches.shape[1]) @ self.encode
                step = max(1, CHUNK_AMPLITUDES // 2**self.q.qubits)
                z = torch.cat([self.expvals(angles[i : i + step]) for i in range(0, len(angles), step)])
                side = math.isqrt(n_patch)
                return z.reshape(n_img, n_patch, -1).transpose(1, 2).reshape(n_img, -1, side, side)

    return Quanvolution


def quanvolution(q: Quanv, trainable: bool = False, dtype: str = "float32"):
    """The quanvolution layer as a torch module (the class is built lazily: torch imports on use)."""
    import torch

    return _torch_module()(q, trainable, getattr(torch, dtype))


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

    def __init__(self) -> None:
        self._features: dict[tuple, tuple[Prepared, Prepared, dict[str, float]]] = {}

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

        m = params.model
        side, channels = meta["image_size"], 1
        if m.features == "quanv":
            side, channels = output_side(m.quanv, side), m.quanv.qubits
        head = _head(m, channels, side)
        if m.features == "raw" or m.quanv.mode == "fixed":
            return head  # fixed features come from precompute
        import torch

        device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
        check_unitary_fits(m.quanv, device, trainable=True)
        return nn.Sequential(quanvolution(m.quanv, trainable=True), head)


def _head(m: Model, channels: int, side: int):
    """The same classical head for both variants: only its input shape differs."""
    from torch import nn

    from ..population import RateDropout  # a buffer rate: population tuning varies it per member

    if m.hidden < 0 or not 0 <= m.dropout < 1:
        raise ConfigError("params.yaml: quantum.model: expected hidden >= 0 and 0 <= dropout < 1")
    if m.head == "conv":
        if m.hidden == 0:
            raise ConfigError("params.yaml: quantum.model.hidden: the conv head needs at least 1 channel")
        return nn.Sequential(
            nn.Conv2d(channels, m.hidden, 3, padding=1), nn.ReLU(), nn.Flatten(), RateDropout(m.dropout),
            nn.Linear(m.hidden * side * side, 10),
        )  # fmt: skip
    width = channels * side * side
    layers: list[nn.Module] = [nn.Flatten()]
    if m.hidden:
        layers += [nn.Linear(width, m.hidden), nn.ReLU(), RateDropout(m.dropout)]
        width = m.hidden
    return nn.Sequential(*layers, nn.Linear(width, 10))


# ---------------------------------------------------------------- circuits/s, for the closing note


def benchmark_simulators(
    device: str = "cpu", n_images: int = 1797, qnode_patches: int = 200, repeats: int = 5
) -> dict[str, Any]:
    """Circuits/s of the per-patch QNode (on `qnode_patches` patches, its full-set time extrapolated)
    and of each simulator quanvolving `n_images` of the 8x8 digits on `device`, with the default circuit:
    median and interquartile range of `repeats` passes (one pass for lightning.qubit, which is slow)."""
    import torch
    from sklearn.datasets import load_digits

    from ..timing import median, spread

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
    for sim in ("unitary", *CPU_SIMULATORS):
        sq = Quanv(simulator=sim)
        layer = quanvolution(sq).to(device)
        passes = [quanvolve(layer, images.astype(np.float32), device, _chunk_images(sq, 8))
                  for _ in range(1 if sim == "lightning.qubit" else repeats)]  # fmt: skip
        seconds = [p[1] for p in passes]
        out[sim] = {"circuits_per_s": circuits / median(seconds), "full_set_s": median(seconds),
                    "full_set_iqr_s": spread(seconds), "passes": len(passes), "copy_s": median([p[2] for p in passes]),
                    "sim_device": "cpu" if sim in CPU_SIMULATORS else device}  # fmt: skip
    return out


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
