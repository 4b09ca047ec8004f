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
from dataclasses import dataclass, field, replace
from functools import cache
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
ROTATIONS = {"RX": "PauliX", "RY": "PauliY", "RZ": "PauliZ"}  # RandomLayers' rotations and their generators


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


def circuit_ops(q: Quanv) -> list[tuple[Any, int]]:
    """PennyLane's decomposition of the random layers: each gate with the flat index of its weight
    (-1 for a fixed gate such as CNOT)."""
    weights = initial_weights(q)
    ops, k = [], 0
    for op in random_layers(q, weights).decomposition():
        if op.name in ROTATIONS:
            if not np.isclose(float(op.parameters[0]), weights.flat[k]):
                raise RuntimeError(f"RandomLayers decomposition: rotation {k} does not use weight {k}")
            ops.append((op, k))
            k += 1
        else:
            ops.append((op, -1))
    return ops


@dataclass(frozen=True)
class Cone:
    """Wires whose gates alone decide the <Z> of `outputs`: all wires for the full unitary, or the past
    light cone of one qubit (gates outside it commute with that qubit's Z, so they cancel exactly)."""

    wires: tuple[int, ...]
    outputs: tuple[int, ...]
    gates: np.ndarray  # (k, 2^m, 2^m) complex on `wires`: a fixed gate, or -i P of a rotation exp(-i w P / 2)
    index: tuple[int, ...]  # each gate's weight (flat index), -1 for a fixed gate

    def unitary(self, weights: np.ndarray) -> np.ndarray:
        """The cone's gates composed at `weights` (complex128), wire `wires[0]` the most significant bit."""
        u = np.eye(self.gates.shape[-1], dtype=complex)
        for gate, k in zip(self.gates, self.index):
            u = gate @ u if k < 0 else np.cos(weights.flat[k] / 2) * u + np.sin(weights.flat[k] / 2) * (gate @ u)
        return u


def circuit_cones(q: Quanv, light: bool) -> list[Cone]:
    """`light=False`: one cone, the whole circuit. `light=True`: one per distinct past light cone, found by
    walking the gates backwards from each measured qubit; outputs sharing a cone share its simulation."""
    ops = circuit_ops(q)
    everything = tuple(range(q.qubits))
    if not light:
        return [_cone(ops, everything, everything)]
    groups: dict[tuple, list[int]] = {}
    for w in everything:
        wires, picked = {w}, []
        for i in reversed(range(len(ops))):
            if wires & set(ops[i][0].wires):
                wires |= set(ops[i][0].wires)
                picked.append(i)
        groups.setdefault((tuple(sorted(wires)), tuple(sorted(picked))), []).append(w)
    return [_cone([ops[i] for i in picked], wires, tuple(outs)) for (wires, picked), outs in groups.items()]


def _cone(ops: list[tuple[Any, int]], wires: tuple[int, ...], outputs: tuple[int, ...]) -> Cone:
    import pennylane as qml

    def matrix(op: Any, k: int) -> np.ndarray:  # -i P for a rotation exp(-i w P / 2), the gate itself otherwise
        if k < 0:
            return qml.matrix(op, wire_order=wires)
        return -1j * qml.matrix(getattr(qml, ROTATIONS[op.name])(op.wires[0]), wire_order=wires)

    mats = [matrix(op, k) for op, k in ops]
    gates = np.stack(mats) if mats else np.zeros((0, 2 ** len(wires), 2 ** len(wires)), dtype=complex)
    return Cone(wires, outputs, gates, tuple(k for _, k in ops))


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

        The device path, per cone of wires (the whole circuit for `unitary`, each light cone for
        `lightcone`): the encoded product state is real, so the output amplitudes are one real matmul
        with [Re U^T | Im U^T] and <Z> a second one on the squared amplitudes: (B, 2^m) @ (2^m, 2^(m+1)),
        square, @ (2^(m+1), outputs). Every patch of every image goes through it at once, in chunks of
        `chunk_amplitudes` to bound memory.
        """

        def __init__(self, q: Quanv, trainable: bool, dtype: torch.dtype, chunk_amplitudes: int = CHUNK_AMPLITUDES):
            super().__init__()
            self.q, self.trainable, self.chunk_amplitudes = q, trainable, chunk_amplitudes
            n, pixels = q.qubits, q.patch * q.patch
            # pixel j turns wire j mod n by RY(pi * value); the state needs half of each angle
            self.one_pixel_per_wire = pixels == n
            encode = np.zeros((pixels, n))
            encode[np.arange(pixels), np.arange(pixels) % n] = np.pi / 2
            self.register_buffer("half_encode", torch.tensor(encode, dtype=dtype), persistent=False)
            weights = torch.tensor(initial_weights(q), dtype=dtype)
            if trainable:
                self.weights = nn.Parameter(weights)
            else:
                self.register_buffer("weights", weights, persistent=False)
            self.amplitudes = 2**n  # per circuit, in one simulator call: what chunk_amplitudes counts
            if q.simulator in CPU_SIMULATORS:
                self._qnode = broadcast_qnode(q, q.simulator)
                return
            self.cones = circuit_cones(q, light=q.simulator == "lightcone")
            self.amplitudes = sum(2 ** len(cone.wires) for cone in self.cones)
            outputs = [w for cone in self.cones for w in cone.outputs]
            self.register_buffer("order", torch.tensor(np.argsort(outputs)), persistent=False)
            for i, cone in enumerate(self.cones):
                m = len(cone.wires)
                bits = (np.arange(2**m)[:, None] >> (m - 1 - np.arange(m))) & 1
                signs = 1.0 - 2.0 * bits[:, [cone.wires.index(w) for w in cone.outputs]]
                self.register_buffer(f"z_signs{i}", torch.tensor(np.vstack([signs, signs]), dtype=dtype), persistent=False)
                self.register_buffer(f"wires{i}", torch.tensor(cone.wires), persistent=False)
                if trainable:
                    self.register_buffer(f"gate_re{i}", torch.tensor(cone.gates.real, dtype=dtype), persistent=False)
                    self.register_buffer(f"gate_im{i}", torch.tensor(cone.gates.imag, dtype=dtype), persistent=False)
                else:
                    u = circuit_unitary(q, initial_weights(q)) if len(self.cones) == 1 else cone.unitary(initial_weights(q))
                    self.register_buffer(f"split{i}", torch.tensor(np.hstack([u.real.T, u.imag.T]), dtype=dtype),
                                         persistent=False)  # fmt: skip

        def split_unitary(self, i: int = 0) -> torch.Tensor:
            """Cone i's unitary as the real (2^m, 2^(m+1)) matrix [Re U^T | Im U^T]; differentiable in
            `weights` when trainable (composed from the gates on each call, as each training step needs)."""
            if not self.trainable:
                return getattr(self, f"split{i}")
            gate_re, gate_im = getattr(self, f"gate_re{i}"), getattr(self, f"gate_im{i}")
            re = torch.eye(gate_re.shape[-1], dtype=gate_re.dtype, device=gate_re.device)
            im = torch.zeros_like(re)
            flat = self.weights.reshape(-1)
            for g, k in enumerate(self.cones[i].index):
                kr, ki = gate_re[g], gate_im[g]
                if k < 0:
                    re, im = kr @ re - ki @ im, kr @ im + ki @ re
                else:
                    c, s = torch.cos(flat[k] / 2), torch.sin(flat[k] / 2)
                    re, im = c * re + s * (kr @ re - ki @ im), c * im + s * (kr @ im + ki @ re)
            return torch.cat([re.T, im.T], dim=1)

        def expvals(self, half: torch.Tensor, splits: list[torch.Tensor]) -> torch.Tensor:
            """(B, n) half encoding angles -> (B, n) <Z> per qubit."""
            if self.q.simulator in CPU_SIMULATORS:
                out = self._qnode((2 * half).detach().cpu().double(), self.weights.cpu().double())
                return torch.stack(out, dim=-1).to(device=half.device, dtype=half.dtype)
            if torch.compiler.is_compiling():  # compiled code fuses these passes by itself
                amps = torch.stack([torch.cos(half), torch.sin(half)], dim=-1)  # (B, n, 2): RY|0> on each wire
            else:  # written in place: no stack, one pass less over the set
                amps = half.new_empty((*half.shape, 2))
                torch.cos(half, out=amps[..., 0])
                torch.sin(half, out=amps[..., 1])
            z = []
            for i, split in enumerate(splits):
                a = product_state(amps if len(splits) == 1 else amps[:, getattr(self, f"wires{i}")]) @ split
                z.append((a * a) @ getattr(self, f"z_signs{i}"))  # |amplitude|^2 = re^2 + im^2, then <Z>
            return z[0] if len(z) == 1 else torch.cat(z, dim=1)[:, self.order]

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            with torch.autocast(x.device.type, enabled=False):
                x = x.to(self.half_encode.dtype)
                p, stride = self.q.patch, self.q.stride
                windows = x[:, 0].unfold(1, p, stride).unfold(2, p, stride)  # a view: (N, H', W', p, p)
                n_img, side, pixels = len(x), windows.shape[1], p * p
                # patches in (image, row, column) order
                if not self.one_pixel_per_wire:
                    half = windows.reshape(-1, pixels) @ self.half_encode
                elif torch.compiler.is_compiling():  # compiled code fuses the copy and the scaling by itself
                    half = windows.reshape(-1, pixels) * (math.pi / 2)
                else:  # eager: scaled while copied out of the view, one pass over the set
                    half = torch.mul(windows, math.pi / 2, out=windows.new_empty(windows.shape)).reshape(-1, pixels)
                device_path = self.q.simulator not in CPU_SIMULATORS
                splits = [self.split_unitary(i) for i in range(len(self.cones))] if device_path else []
                step = max(1, self.chunk_amplitudes // self.amplitudes)
                if len(half) <= step:
                    z = self.expvals(half, splits)
                else:
                    z = torch.cat([self.expvals(half[i : i + step], splits) for i in range(0, len(half), step)])
                return z.reshape(n_img, side, side, -1).permute(0, 3, 1, 2)  # (N, n, H', W'), a view

    return Quanvolution


def product_state(amps):
    """(B, m, 2) single-qubit amplitudes -> (B, 2^m) product state, wire 0 the most significant bit."""
    state = amps[:, 0]
    for w in range(1, amps.shape[1]):
        state = (state[:, :, None] * amps[:, w, None, :]).reshape(len(amps), -1)
    return state


def quanvolution(q: Quanv, trainable: bool = False, dtype: str = "float32", chunk_amplitudes: int = CHUNK_AMPLITUDES):
    """The quanvolution layer as a torch module (the class is built lazily: torch imports on use)."""
    import torch

    return _torch_module()(q, trainable, getattr(torch, dtype), chunk_amplitudes)


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

# Issue 9's goals on an H100, set beside each figure in the report (a set time only for the fixed layer)
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
            "repeats": {"bench/repeat_circuits_per_s": rates},
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
