"""The guava workload's model: a small CNN on uint8 photos, augmented on the device while it trains.

Each conv block is conv 3x3 -> batch norm -> ReLU -> max pool 2x2; the first conv has stride 2. Global average
pooling, dropout and a dense layer give the logits. `GuavaCNN`'s Keras twin is
keras_twins.guava_cnn. `cnn_fast` holds the CUDA fast paths: the same functions in faster shapes, switched on by params.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from .augment import augment_reference, draw_augmentation

if TYPE_CHECKING:
    from ..workloads.guava import Model


class GuavaCNN(nn.Module):
    """uint8 NHWC in, logits out: conv blocks with batch norm, global pooling, a dense head."""

    def __init__(self, model: Model, mean: list[float], std: list[float], n_classes: int) -> None:
        super().__init__()
        blocks, width = [], 3
        for i, c in enumerate(model.channels):
            # a strided stem: the full-resolution block costs a quarter
            conv = self.stem(model, width, c) if i == 0 else nn.Conv2d(width, c, 3, 1, padding=1, bias=False)
            blocks += [conv, nn.BatchNorm2d(c), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            width = c
        self.features = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(model.dropout), nn.Linear(width, n_classes))
        self.aug = model.augment
        self.augments = model.augment.warps or bool(model.augment.jitter)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def stem(self, model: Model, inputs: int, outputs: int) -> nn.Conv2d:
        """The first conv; `cnn_fast` puts a faster one in its place."""
        return nn.Conv2d(inputs, outputs, 3, 2, padding=1, bias=False)

    def memory_format(self) -> torch.memory_format:
        """The engine converts the weights when channels_last is on; the input follows them."""
        w = self.features[0].weight
        return torch.channels_last if w.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(self.inputs(x).contiguous(memory_format=self.memory_format())))

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 NHWC -> the normalised NCHW batch (laid out channels-last), augmented while training."""
        x = x.permute(0, 3, 1, 2).float()  # NHWC uint8 -> NCHW float (still laid out channels-last)
        if self.training and self.augments:
            x = augment_reference(x, *draw_augmentation(len(x), self.aug, x.device))
        return (x - self.mean) / self.std
