"""The quantum workload's model: a quanvolution layer (Henderson et al., 2019), as in the PennyLane
quanvolution demo, and the classical head that reads its feature maps (or the raw pixels).

Each patch of an image is angle-encoded (RY(pi * pixel) on qubit j mod n), passed through seeded PennyLane
`RandomLayers` and read out as the Pauli-Z expectation of every qubit: one output channel per qubit.
`Quanvolution` runs the circuit as a PennyLane QNode on the CPU (default.qubit, lightning.qubit), all of a
chunk's patches in one call through parameter broadcasting. `quanv_sim` holds the device simulators, the same
function as one matmul on the device. The workload has no Keras twin: it trains in torch only.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError
from .layers import RateDropout

if TYPE_CHECKING:
    from ..workloads.quantum import Model, Quanv


def initial_weights(q: Quanv) -> np.ndarray:
    """The demo's random layers: uniform angles in [0, 2 pi), one rotation per qubit per layer."""
    return np.random.default_rng(q.seed).uniform(0, 2 * np.pi, (q.layers, q.qubits))


def random_layers(q: Quanv, weights: Any):
    import pennylane as qml

    return qml.RandomLayers(weights, wires=range(q.qubits), seed=q.seed)


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


class Quanvolution(nn.Module):
    """(N, 1, H, W) pixels in [0, 1] -> (N, qubits, H', W') Pauli-Z expectations.

    Runs in `dtype` (fp32 for training, float64 for the equivalence test) whatever the autocast policy:
    amplitudes squared in bf16 would lose the signal. The QNode copies patches to the host and the results
    back. Patches go through in chunks of `chunk_amplitudes` amplitudes, to bound memory."""

    def __init__(self, q: Quanv, trainable: bool, dtype: torch.dtype, chunk_amplitudes: int) -> None:
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
        self.simulator(q, trainable, dtype)

    def simulator(self, q: Quanv, trainable: bool, dtype: torch.dtype) -> None:
        self._qnode = broadcast_qnode(q, q.simulator)

    def circuit_matrices(self) -> list[torch.Tensor]:
        """What each chunk's call reuses: nothing for a QNode."""
        return []

    def expvals(self, half: torch.Tensor, matrices: list[torch.Tensor]) -> torch.Tensor:
        """(B, n) half encoding angles -> (B, n) <Z> per qubit."""
        out = self._qnode((2 * half).detach().cpu().double(), self.weights.cpu().double())
        return torch.stack(out, dim=-1).to(device=half.device, dtype=half.dtype)

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
            matrices = self.circuit_matrices()
            step = max(1, self.chunk_amplitudes // self.amplitudes)
            if len(half) <= step:
                z = self.expvals(half, matrices)
            else:
                z = torch.cat([self.expvals(half[i : i + step], matrices) for i in range(0, len(half), step)])
            return z.reshape(n_img, side, side, -1).permute(0, 3, 1, 2)  # (N, n, H', W'), a view


def head(m: Model, channels: int, side: int) -> nn.Sequential:
    """The same classical head for both variants: only its input shape differs."""
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
