"""Layers that more than one model shares."""
from __future__ import annotations

import torch
from torch import nn


class RateDropout(nn.Module):
    """Dropout whose rate is a buffer: stacked populations give each member its own rate."""

    def __init__(self, p: float):
        super().__init__()
        self.register_buffer("p", torch.tensor(float(p)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        keep = (torch.rand_like(x) >= self.p).to(x.dtype)
        return x * keep / (1.0 - self.p)
