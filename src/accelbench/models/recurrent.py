"""The stock and rnn workloads' model: a stack of RNN, LSTM or GRU layers and a linear head on the last step.

`RecurrentRegressor` (torch) and `keras_model` (TensorFlow) are twins: the same layers, the same initialisers.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from ..engines.torch import _autocast
from ..errors import ConfigError

if TYPE_CHECKING:
    from ..workloads._timeseries import RecurrentModel

TORCH_CELLS = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}


class RecurrentRegressor(nn.Module):
    """One class for the three cells, like pytorch/examples' word_language_model."""

    def __init__(self, model: RecurrentModel, window: int, section: str) -> None:
        super().__init__()
        between = model.dropout if model.layers > 1 else 0.0  # torch warns on dropout with one layer
        self.lookback = lookback(model, window, section)
        self.rnn = TORCH_CELLS[model.cell](1, model.units, model.layers, batch_first=True, dropout=between)
        self.dropout = nn.Dropout(model.dropout)  # after the last layer too, like the Keras stack
        self.head = nn.Linear(model.units, 1)
        _keras_init(self, model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x[:, -self.lookback :])
        return self.head(self.dropout(out[:, -1]))


def _keras_init(net, model: RecurrentModel) -> None:
    """Keras' initialisers (glorot kernel, orthogonal recurrent kernel, zero bias, forget bias 1),
    so both frameworks start alike."""
    for name, p in net.rnn.named_parameters():
        if name.startswith("weight_ih"):
            nn.init.xavier_uniform_(p)
        elif name.startswith("weight_hh"):
            nn.init.orthogonal_(p)
        else:
            nn.init.zeros_(p)
    if model.cell == "lstm":  # gate order i, f, g, o
        for i in range(model.layers):
            nn.init.ones_(getattr(net.rnn, f"bias_ih_l{i}")[model.units : 2 * model.units])
    nn.init.xavier_uniform_(net.head.weight)
    nn.init.zeros_(net.head.bias)


def keras_layer(cell: str, units: int, return_sequences: bool, **kwargs: Any):
    """Keras' cuDNN path needs exactly these settings (tanh, sigmoid gates, no recurrent dropout, not
    unrolled, bias, GRU reset_after); they are the defaults, spelled out so that none drifts away."""
    import keras

    common = dict(activation="tanh", use_bias=True, recurrent_dropout=0.0, unroll=False,
                  return_sequences=return_sequences, **kwargs)  # fmt: skip
    if cell == "lstm":
        return keras.layers.LSTM(units, recurrent_activation="sigmoid", **common)
    if cell == "gru":
        return keras.layers.GRU(units, recurrent_activation="sigmoid", reset_after=True, **common)
    return keras.layers.SimpleRNN(units, **common)  # Keras has no cuDNN kernel for it


def keras_model(model: RecurrentModel, window: int, section: str):
    import keras

    inputs = keras.Input((window, 1))
    h = inputs
    steps = lookback(model, window, section)
    if steps < window:
        h = keras.layers.Cropping1D((window - steps, 0))(h)
    for i in range(model.layers):
        h = keras_layer(model.cell, model.units, return_sequences=i < model.layers - 1)(h)
        h = keras.layers.Dropout(model.dropout)(h)
    out = keras.layers.Dense(1, dtype="float32")(h)  # fp32 output under mixed precision
    return keras.Model(inputs, out)


def lookback(model: RecurrentModel, window: int, section: str) -> int:
    if model.lookback is None:
        return window
    if not 1 <= model.lookback <= window:
        raise ConfigError(
            f"params.yaml: {section}.model.lookback: {model.lookback} must be between 1 and the prepared "
            f"window ({section}.prepare.window: {window})"
        )
    return model.lookback


class _OpsSeen(TorchDispatchMode):
    """Records the ATen ops that reach the kernels, below autograd and autocast."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def cudnn_probe(model: RecurrentModel, runtime: Any) -> tuple[bool, str]:
    """Run one tiny forward pass of the configured cell on the run's device and precision and look at
    which kernel ran: the answer comes from the framework, not from a rule of thumb. On the CPU there is no
    cuDNN to ask about, and no probe runs: it would cost a stage more start-up than a small model's training."""
    if runtime.device.type == "cpu":
        simple = runtime.framework != "torch" and model.cell == "rnn"
        return False, ("Keras SimpleRNN has no cuDNN kernel; " if simple else "") + "no cuDNN on CPU"
    if runtime.framework == "torch":
        dev = runtime.device.torch
        with torch.random.fork_rng(devices=[runtime.device.index] if runtime.device.type == "cuda" else []):
            net = TORCH_CELLS[model.cell](1, model.units, model.layers, batch_first=True).to(dev)
            with _OpsSeen() as seen, _autocast(runtime), torch.no_grad():
                net(torch.zeros(2, 4, 1, device=dev))
        if "_cudnn_rnn" in seen.ops:
            return True, "fused cuDNN kernel (aten._cudnn_rnn) ran in a probe forward pass"
        why = "no cuDNN on CPU" if runtime.device.type == "cpu" else "torch chose its generic kernel"
        return False, f"{why}: aten._cudnn_rnn did not run in a probe forward pass"
    import tensorflow as tf

    layer = keras_layer(model.cell, model.units, False, kernel_initializer="zeros", recurrent_initializer="zeros")
    layer.build((2, 4, 1))  # weights made eagerly: a tf.function may not create them under a MirroredStrategy
    graph = tf.function(lambda x: layer(x, training=True)).get_concrete_function(tf.TensorSpec((2, 4, 1))).graph
    if any(op.type.startswith("CudnnRNN") for op in graph.get_operations()):
        return True, "fused cuDNN kernel (CudnnRNNV3) in the traced graph of a probe layer"
    if model.cell == "rnn":
        why = "Keras SimpleRNN has no cuDNN kernel"
    else:
        why = "no cuDNN on CPU" if runtime.device.type == "cpu" else "Keras fell back to its generic loop"
    return False, f"{why}: no CudnnRNN op in the traced graph of a probe layer"
