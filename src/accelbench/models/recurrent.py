"""The stock and rnn workloads' model: a stack of RNN, LSTM or GRU layers and a linear head on the last step.

`RecurrentRegressor`'s Keras twin is keras_twins.recurrent: the same layers, the same initialisers.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from ..engines.torch import _autocast

if TYPE_CHECKING:
    from ..workloads._timeseries import RecurrentModel

TORCH_CELLS = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}


class RecurrentRegressor(nn.Module):
    """One class for the three cells, like pytorch/examples' word_language_model."""

    def __init__(self, model: RecurrentModel, window: int, section: str) -> None:
        super().__init__()
        between = model.dropout if model.layers > 1 else 0.0  # torch warns on dropout with one layer
        self.lookback = model.steps(window, section)
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


class _OpsSeen(TorchDispatchMode):
    """Records the ATen ops that reach the kernels, below autograd and autocast."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def torch_uses_cudnn(model: RecurrentModel, runtime: Any) -> tuple[bool, str]:
    """Run one tiny forward pass of the configured cell on the run's GPU and precision and look at which kernel
    ran: the answer comes from the framework, not from a rule of thumb."""
    dev = runtime.device.torch
    with torch.random.fork_rng(devices=[runtime.device.index]):
        net = TORCH_CELLS[model.cell](1, model.units, model.layers, batch_first=True).to(dev)
        with _OpsSeen() as seen, _autocast(runtime), torch.no_grad():
            net(torch.zeros(2, 4, 1, device=dev))
    if "_cudnn_rnn" in seen.ops:
        return True, "fused cuDNN kernel (aten._cudnn_rnn) ran in a probe forward pass"
    return False, "torch chose its generic kernel: aten._cudnn_rnn did not run in a probe forward pass"
