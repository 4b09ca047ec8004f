"""The sentiment workload's model: token embeddings -> bidirectional LSTM layers -> each tweet's last forward
and backward states -> dropout -> dense logits.

`BiLSTM`'s Keras twin is keras_twins.bilstm. `bilstm_fast` holds the torch fast paths (both
directions as one LSTM, the head as a multiply and sum, the embedding rows gathered by index): the same
function, switched on by params.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from ..workloads.sentiment import Model


def within_length(x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """x's time steps (dim 1) taken in each row's `order`."""
    return x.gather(1, order.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


class Directions(nn.Module):
    """A layer's two directions as two nn.LSTMs, one after the other. Reads a pair per time step: [forward
    input, backward input]; writes [forward state, backward state]."""

    def __init__(self, inputs: int, hidden: int) -> None:
        super().__init__()
        self.fwd, self.bwd = (nn.LSTM(inputs, hidden, batch_first=True) for _ in range(2))

    def forward(self, pair: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.fwd(pair[:, :, 0])[0], self.bwd(pair[:, :, 1])[0]], dim=2)


class BiLSTM(nn.Module):
    """The backward direction reads each tweet reversed within its length, so no padding enters a state that is
    used: the same function as a packed bidirectional nn.LSTM (tested), in fixed shapes with no lengths on the
    host, which CUDA graphs can capture and which on the CPU also runs faster than packing."""

    def __init__(self, model: Model, vocab_size: int, n_classes: int, pad: int) -> None:
        super().__init__()
        self.hidden = model.hidden
        self.embed = nn.Embedding(vocab_size, model.embed_dim, padding_idx=pad)
        inputs = [model.embed_dim] + [2 * model.hidden] * (model.layers - 1)
        self.layers = nn.ModuleList(self.directions(n, model.hidden) for n in inputs)
        self.between = nn.Dropout(model.dropout if model.layers > 1 else 0.0)
        self.drop = nn.Dropout(model.dropout)
        self.head = self.dense(2 * model.hidden, n_classes)

    def directions(self, inputs: int, hidden: int) -> nn.Module:
        return Directions(inputs, hidden)

    def dense(self, inputs: int, outputs: int) -> nn.Linear:
        return nn.Linear(inputs, outputs)

    def embedded(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embed(ids)

    def features(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Each tweet's forward state after its last token beside its backward state after its first. Under
        torch.compile, dynamo does not trace into nn.LSTM and cannot resume a frame inside a loop after such a
        break, so the loop only calls the layers: the work between them sits in methods without a loop, each
        compiled whole."""
        pair, reverse, last = self.first_pair(tokens, lengths)
        out = self.layers[0](pair)
        for layer in self.layers[1:]:
            out = layer(self.next_pair(out, reverse))
        return self.last_states(out, last)

    def first_pair(self, tokens: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The first layer's input pairs, each tweet's order reversed within its length, its last index."""
        steps = torch.arange(tokens.shape[1], device=tokens.device)
        last = lengths.long() - 1
        reverse = torch.where(steps <= last[:, None], last[:, None] - steps, steps)  # its own inverse
        # reversing the token ids, not their vectors, leaves one lookup
        ids = torch.stack([tokens, tokens.gather(1, reverse)], dim=2)
        return self.embedded(ids), reverse, last

    def next_pair(self, out: torch.Tensor, reverse: torch.Tensor) -> torch.Tensor:
        """Both directions at each time step; one dropout mask for both, as nn.LSTM's between layers."""
        h = self.hidden
        y = self.between(torch.cat([out[..., :h], within_length(out[..., h:], reverse)], dim=2))
        return torch.stack([y, within_length(y, reverse)], dim=2)

    @staticmethod
    def last_states(out: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        # a gather, whose backward is a scatter; out[rows, last]'s backward sorts its indices first on CUDA
        return within_length(out, last[:, None]).squeeze(1)

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(self.features(tokens, lengths))).float()
