"""The diabetes workload's model: a small multilayer perceptron, ReLU and dropout after each hidden layer, one
logit out.

`MLP`'s Keras twin is keras_twins.mlp: the same layers, the same initialisers.
"""
from __future__ import annotations

from torch import nn

from .layers import RateDropout


class MLP(nn.Sequential):
    """Linear -> ReLU -> dropout per hidden width, then a linear layer to one logit."""

    def __init__(self, inputs: int, hidden: list[int], dropout: float) -> None:
        layers: list[nn.Module] = []
        width = inputs
        for h in hidden:
            # a buffer rate: population tuning varies it per member
            layers += [nn.Linear(width, h), nn.ReLU(), RateDropout(dropout)]
            width = h
        layers.append(nn.Linear(width, 1))
        super().__init__(*layers)
        for m in self:
            if isinstance(m, nn.Linear):  # Keras' defaults, so both frameworks start alike
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
