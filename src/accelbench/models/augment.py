"""Guava's training augmentation in torch ops: each image's random flip, rotation and crop-and-zoom as one
affine warp, then its colour jitter. `augment_cuda` is the same function as one Triton kernel."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch.nn import functional as F

if TYPE_CHECKING:
    from ..workloads.guava import Augment

GRAY = (0.299, 0.587, 0.114)  # luma weights of R, G, B (ITU-R BT.601)


def augment_reference(x: torch.Tensor, theta: torch.Tensor | None, factors: torch.Tensor | None) -> torch.Tensor:
    """The augmentation in torch ops, on float NCHW 0-255 images: each image warped by its affine map `theta`
    (N x 2 x 3, as `F.affine_grid` takes it; sampled bilinearly, reflected at the borders), then its colour
    jittered by its (brightness, contrast, saturation) `factors` (N x 3) around the mean of the image as it came
    (before the warp: what lets the CUDA kernel do it all in one pass), then clamped to 0-255. None skips a part."""
    mean = x.mean(dim=(1, 2, 3), keepdim=True) if factors is not None else None
    if theta is not None:
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
        # Under torch.compile the warp ends its own graph: fused with the jitter, Inductor's CPU code is slower
        torch._dynamo.graph_break()  # a no-op when not compiling
    if factors is not None:
        brightness, contrast, saturation = (f[:, None, None, None] for f in factors.unbind(1))
        x, mean = x * brightness, mean * brightness
        x = (x - mean) * contrast + mean
        # weights as Python floats: a CPU tensor moved here would be a host-to-device copy in every step
        luma = GRAY[0] * x[:, 0:1] + GRAY[1] * x[:, 1:2] + GRAY[2] * x[:, 2:3]
        x = ((x - luma) * saturation + luma).clamp(0, 255)
    return x


def draw_augmentation(n: int, aug: Augment, device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Each image's affine map (flip, rotation, crop-and-zoom; N x 2 x 3) and colour factors (N x 3), drawn on
    `device`; None for a part that `aug` switches off."""
    uniform = lambda *shape: torch.rand(*shape, device=device) * 2 - 1  # noqa: E731
    theta = factors = None
    if aug.warps:
        angle = uniform(n) * math.radians(aug.rotation_deg)
        scale = 1 - (1 - aug.crop_min) * torch.rand(n, device=device)  # share of the side kept
        shift = uniform(n, 2) * (1 - scale)[:, None]  # the crop stays inside the image
        flip = torch.where(torch.rand(n, 2, device=device) < 0.5, -1.0, 1.0) if aug.flip else torch.ones(n, 2, device=device)
        cos, sin = angle.cos() * scale, angle.sin() * scale
        theta = torch.stack(
            [torch.stack([cos * flip[:, 0], -sin * flip[:, 1], shift[:, 0]], 1),
             torch.stack([sin * flip[:, 0], cos * flip[:, 1], shift[:, 1]], 1)], 1
        )  # fmt: skip
    if aug.jitter:
        factors = 1 + uniform(n, 3) * aug.jitter
    return theta, factors
