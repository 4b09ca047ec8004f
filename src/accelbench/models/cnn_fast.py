"""The guava CNN's CUDA fast paths, each the same function as the plain `GuavaCNN` in a faster shape, each
switched on by its own param (guava.model.space_to_depth_stem, guava.model.fused_augment):

- `BlockStem`: the first conv in 8-channel multiples, which cuDNN's NHWC tensor-core kernels take; for 3 input
  channels cuDNN pads the input itself in every call and picks a slower kernel. With space_to_depth_stem it
  runs over 2x2 pixel blocks (12 channels, padded to 16; half the bytes of RGB padded to 8), else on RGB
  zero-padded to 8 channels. The zero channels add nothing to any output or gradient.
- `FastGuavaCNN`: the augmentation and normalisation as one Triton kernel (`augment_cuda`), which with the
  block stem also writes the stem's input blocks, so no pass lays them out between the two.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn import functional as F

from .augment import draw_augmentation
from .cnn import GuavaCNN

if TYPE_CHECKING:
    from ..workloads.guava import Model


def pad_channels(x: torch.Tensor, weight: torch.Tensor, multiple: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A conv's NCHW input and OIHW weight with their input channels zero-padded to `multiple`, both in
    channels_last: the same conv, in the channel count that NHWC tensor-core kernels take."""
    return channels_padded(x, multiple), channels_padded(weight, multiple)


def channels_padded(t: torch.Tensor, multiple: int) -> torch.Tensor:
    """An NCHW input or OIHW weight with dim 1 zero-padded to a multiple of `multiple`, laid out channels-last."""
    return F.pad(t, (0, 0, 0, 0, 0, -t.shape[1] % multiple)).contiguous(memory_format=torch.channels_last)


def space_to_depth(x: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A stride-2, padding-1 3x3 conv's input and weight as a stride-1 2x2 conv's over 2x2 pixel blocks (4x the
    channels, half the side): the same conv. The kernel's fourth row and column are zeros."""
    blocks = F.pixel_unshuffle(F.pad(x, (1, 1 + x.shape[3] % 2, 1, 1 + x.shape[2] % 2)), 2)  # channel c*4 + dy*2 + dx
    return blocks, block_weight(weight)


def block_weight(weight: torch.Tensor) -> torch.Tensor:
    """`space_to_depth`'s weight: weight[o, c, 2*by + dy, 2*bx + dx] -> [o, c*4 + dy*2 + dx, by, bx]."""
    o, c = weight.shape[:2]
    return F.pad(weight, (0, 1, 0, 1)).view(o, c, 2, 2, 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(o, 4 * c, 2, 2)


class BlockStem(nn.Conv2d):
    """The 3x3 stride-2 stem; on CUDA in channels_last, in 8-channel multiples (over blocks or on padded RGB).
    The parameters keep their 3x3x3 shape."""

    def __init__(self, *args, space_to_depth: bool, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.space_to_depth = space_to_depth

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (x.is_cuda and x.is_contiguous(memory_format=torch.channels_last)):
            return super().forward(x)
        if not self.space_to_depth:
            return self._conv_forward(*pad_channels(x, self.weight, 8), self.bias)
        return F.conv2d(*pad_channels(*space_to_depth(x, self.weight), 8), self.bias)

    def over_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        """The conv over blocks already laid out as `space_to_depth` and `pad_channels` lay them out."""
        return F.conv2d(blocks, channels_padded(block_weight(self.weight), 8), self.bias)


class FastGuavaCNN(GuavaCNN):
    """`GuavaCNN` with the block stem and, on CUDA while training, the fused augmentation kernel."""

    def __init__(self, model: Model, mean: list[float], std: list[float], n_classes: int) -> None:
        super().__init__(model, mean, std, n_classes)
        self.fused_augment = model.fused_augment

    def stem(self, model: Model, inputs: int, outputs: int) -> nn.Conv2d:
        return BlockStem(inputs, outputs, 3, 2, padding=1, bias=False, space_to_depth=model.space_to_depth_stem)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.writes_blocks(x):  # the kernel lays the stem's input out itself: no pass between them
            stem, rest = self.features[0], self.features[1:]
            return self.head(rest(stem.over_blocks(self.augmented(x, blocks=True))))
        return super().forward(x)

    def fuses_augmentation(self, x: torch.Tensor) -> bool:
        return self.training and self.augments and self.fused_augment and x.is_cuda

    def writes_blocks(self, x: torch.Tensor) -> bool:
        stem = self.features[0]
        return self.fuses_augmentation(x) and stem.space_to_depth and self.memory_format() == torch.channels_last

    def augmented(self, x: torch.Tensor, blocks: bool = False) -> torch.Tensor:
        from . import augment_cuda  # imports triton: only a CUDA training step loads it

        theta, factors = draw_augmentation(len(x), self.aug, x.device)
        # written in the dtype the stem computes in: the cast that autocast would make after it
        dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else torch.float32
        return augment_cuda.augment_normalize(x, theta, factors, self.mean.view(3), self.std.view(3), dtype, blocks)

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        return self.augmented(x) if self.fuses_augmentation(x) else super().inputs(x)


def torch_model(model: Model, mean: list[float], std: list[float], n_classes: int) -> GuavaCNN:
    """The plain CNN, or the fast one when a fast path's param is on."""
    fast = model.fused_augment or model.space_to_depth_stem
    return (FastGuavaCNN if fast else GuavaCNN)(model, mean, std, n_classes)
