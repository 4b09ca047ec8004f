"""The sentiment BiLSTM's torch fast paths, each the same function as the plain `BiLSTM`:

- `FusedDirections` (sentiment.model.fuse_directions): a layer's two directions as one LSTM of 2 x hidden
  units with block-diagonal weights. One recurrence over 2 x hidden units costs about what one over hidden
  units does, so this halves the recurrent calls.
- `NarrowLinear` (sentiment.model.narrow_head): the dense head as a broadcast multiply and a sum. For a few
  outputs compile fuses it with the dropout before it into one kernel, where a matmul goes to cuBLAS.
- `FastBiLSTM`, chosen when either param is on, also gathers the embedding rows with index_select: its
  backward is one index_add_ kernel, cheaper on CUDA than nn.Embedding's.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from .bilstm import BiLSTM, Directions

if TYPE_CHECKING:
    from ..workloads.sentiment import Model


def lookup(table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return table.index_select(0, ids.reshape(-1)).view(*ids.shape, -1)


# compiled for the CPU, the lookup (its backward a scatter-add) makes the whole step slower than eager; on CUDA
# the compiled one is faster
eager_lookup = torch.compiler.disable(lookup)


class FusedDirections(nn.Module):
    """The two directions as one nn.LSTM of 2 x hidden units whose weights are block-diagonal: the first half
    of the units reads the forward input, the second half the reversed one, and no weight joins them. The
    off-block entries start at zero and their gradients are masked to zero, so AdamW leaves them at zero (zero
    moments, and decay of zero is zero): the same function as two LSTMs, in half the recurrent calls."""

    def __init__(self, inputs: int, hidden: int) -> None:
        super().__init__()
        self.lstm = nn.LSTM(2 * inputs, 2 * hidden, batch_first=True)
        bound = hidden**-0.5  # nn.LSTM's own init range for `hidden` units
        with torch.no_grad():
            for name, w in self.lstm.named_parameters():
                w.uniform_(-bound, bound)
                if w.dim() == 2:
                    mask = self._block_diagonal(w.shape[1] // 2, hidden)
                    w.mul_(mask)
                    self.register_buffer(f"{name}_mask", mask, persistent=False)
                    w.register_hook(lambda grad, key=f"{name}_mask": grad * getattr(self, key))

    @staticmethod
    def _block_diagonal(inputs: int, hidden: int) -> torch.Tensor:
        """Rows: the gates i, f, g, o, each forward units then backward units; columns: forward inputs, then
        backward inputs."""
        direction = torch.arange(4 * 2 * hidden) // hidden % 2
        return (direction[:, None] == torch.arange(2 * inputs)[None] // inputs).float()

    def forward(self, pair: torch.Tensor) -> torch.Tensor:
        return self.lstm(pair.flatten(2))[0]


class NarrowLinear(nn.Linear):
    """nn.Linear (the same init and state) as a broadcast multiply and a sum over the inputs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.unsqueeze(-2) * self.weight).sum(-1) + self.bias


class FastBiLSTM(BiLSTM):
    def __init__(self, model: Model, vocab_size: int, n_classes: int, pad: int) -> None:
        self.fuse_directions, self.narrow_head = model.fuse_directions, model.narrow_head
        super().__init__(model, vocab_size, n_classes, pad)

    def directions(self, inputs: int, hidden: int) -> nn.Module:
        return (FusedDirections if self.fuse_directions else Directions)(inputs, hidden)

    def dense(self, inputs: int, outputs: int) -> nn.Linear:
        return (NarrowLinear if self.narrow_head else nn.Linear)(inputs, outputs)

    def embedded(self, ids: torch.Tensor) -> torch.Tensor:
        # Padding gets no gradient, as with nn.Embedding: nothing after a tweet's last token reaches a state
        # that is used.
        table = self.embed.weight
        return (lookup if table.is_cuda else eager_lookup)(table, ids)


def torch_model(model: Model, vocab_size: int, n_classes: int, pad: int) -> BiLSTM:
    """The plain BiLSTM, or the fast one when a fast path's param is on."""
    fast = model.fuse_directions or model.narrow_head
    return (FastBiLSTM if fast else BiLSTM)(model, vocab_size, n_classes, pad)
