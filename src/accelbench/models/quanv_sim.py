"""The quanvolution's device simulators, the same function as the PennyLane QNode in `quanv`, on any torch
device (quantum.model.quanv.simulator):

- `unitary`: the encoding is a product state and the layers are fixed (or, in trainable mode, rebuilt from
  their weights each step), so the whole circuit after encoding is one 2^n x 2^n unitary that PennyLane gives
  (`qml.matrix`): a batch of patches is one matmul on the device, never a QNode per patch.
- `lightcone`: each measured qubit's past light cone only (gates outside it cancel exactly), one smaller
  unitary per distinct cone.

Per cone of m wires, the encoded product state is real, so the output amplitudes are one real matmul with
[Re U^T | Im U^T] and <Z> a second one on the squared amplitudes: (B, 2^m) @ (2^m, 2^(m+1)), square,
@ (2^(m+1), outputs). Every patch of every image goes through it at once.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .quanv import Quanvolution, initial_weights, random_layers

if TYPE_CHECKING:
    from ..workloads.quantum import Quanv

DEVICE_SIMULATORS = ("unitary", "lightcone")
ROTATIONS = {"RX": "PauliX", "RY": "PauliY", "RZ": "PauliZ"}  # RandomLayers' rotations and their generators


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


class UnitaryQuanvolution(Quanvolution):
    """`Quanvolution` simulated as matmuls on the layer's device: the whole circuit, or its light cones."""

    def simulator(self, q: Quanv, trainable: bool, dtype: torch.dtype) -> None:
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


    def circuit_matrices(self) -> list[torch.Tensor]:
        return [self.split_unitary(i) for i in range(len(self.cones))]

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

    def expvals(self, half: torch.Tensor, matrices: list[torch.Tensor]) -> torch.Tensor:
        """(B, n) half encoding angles -> (B, n) <Z> per qubit."""
        if torch.compiler.is_compiling():  # compiled code fuses these passes by itself
            amps = torch.stack([torch.cos(half), torch.sin(half)], dim=-1)  # (B, n, 2): RY|0> on each wire
        else:  # written in place: no stack, one pass less over the set
            amps = half.new_empty((*half.shape, 2))
            torch.cos(half, out=amps[..., 0])
            torch.sin(half, out=amps[..., 1])
        z = []
        for i, split in enumerate(matrices):
            a = product_state(amps if len(matrices) == 1 else amps[:, getattr(self, f"wires{i}")]) @ split
            z.append((a * a) @ getattr(self, f"z_signs{i}"))  # |amplitude|^2 = re^2 + im^2, then <Z>
        return z[0] if len(z) == 1 else torch.cat(z, dim=1)[:, self.order]


def product_state(amps):
    """(B, m, 2) single-qubit amplitudes -> (B, 2^m) product state, wire 0 the most significant bit."""
    state = amps[:, 0]
    for w in range(1, amps.shape[1]):
        state = (state[:, :, None] * amps[:, w, None, :]).reshape(len(amps), -1)
    return state


def quanvolution_layer(q: Quanv, trainable: bool, dtype: str, chunk_amplitudes: int) -> Quanvolution:
    """The layer for `q.simulator`: a PennyLane QNode on the CPU, or a device simulator."""
    layer = UnitaryQuanvolution if q.simulator in DEVICE_SIMULATORS else Quanvolution
    return layer(q, trainable, getattr(torch, dtype), chunk_amplitudes)
