"""Guava's training augmentation as one Triton kernel, for CUDA (imports triton: load only on a GPU).

One program computes a block of output pixels of one image: each pixel's source point under the image's
affine map (reflected at the borders, as `F.grid_sample(padding_mode="reflection", align_corners=False)`),
the bilinear blend of its four uint8 RGB neighbours, the colour jitter and the normalisation, written once in
the dtype the stem computes in. The same function in torch ops (`augment.augment_reference`) materialises the
sampled image and reads it again in each pass that follows. For the block stem a second kernel writes the
stem's 2x2 pixel blocks directly, with the padding and the zero channels, so no pass lays them out after it.
Sizes travel as int arguments and are made float inside: float arguments made the compiled kernel slower.
tests/test_gpu.py pins both kernels to the torch ops.
"""

import torch
import triton
import triton.language as tl

from .augment import GRAY


BLOCKS_BLOCK = 64


@triton.jit
def _reflect(c, size):
    """grid_sample's reflection for align_corners=False: mirror over [-0.5, size - 0.5], then clip."""
    c = tl.abs(c + 0.5)
    flips = tl.floor(c / size)
    extra = c - flips * size
    odd = (flips - 2 * tl.floor(flips / 2)) > 0
    c = tl.where(odd, size - extra, extra) - 0.5
    return tl.minimum(tl.maximum(c, 0.0), size - 1.0)


@triton.jit
def _tap(base, y, x, w, stride_y):
    offset = y * stride_y + x * 3
    return (tl.load(base + offset).to(tl.float32) * w, tl.load(base + offset + 1).to(tl.float32) * w,
            tl.load(base + offset + 2).to(tl.float32) * w)  # fmt: skip


@triton.jit
def _pixel(base, oy, ox, n, theta, factors, src_mean, mean, std, H, W, gray_r, gray_g, gray_b):
    """The augmented, normalised (r, g, b) of output pixels (oy, ox) of image n, as float32."""
    wf, hf = W * 1.0, H * 1.0  # not W.to(): torch.compile's analysis of the kernel reads sizes as Python ints
    xn = (2 * ox + 1).to(tl.float32) / wf - 1  # affine_grid's base grid, align_corners=False
    yn = (2 * oy + 1).to(tl.float32) / hf - 1
    t = theta + n * 6
    gx = tl.load(t) * xn + tl.load(t + 1) * yn + tl.load(t + 2)
    gy = tl.load(t + 3) * xn + tl.load(t + 4) * yn + tl.load(t + 5)
    ix = _reflect(((gx + 1) * wf - 1) / 2, wf)
    iy = _reflect(((gy + 1) * hf - 1) / 2, hf)
    x0f, y0f = tl.floor(ix), tl.floor(iy)
    wx, wy = ix - x0f, iy - y0f
    x0, y0 = x0f.to(tl.int32), y0f.to(tl.int32)
    x1, y1 = tl.minimum(x0 + 1, W - 1), tl.minimum(y0 + 1, H - 1)  # a clipped tap has weight 0
    r00, g00, b00 = _tap(base, y0, x0, (1 - wy) * (1 - wx), W * 3)
    r01, g01, b01 = _tap(base, y0, x1, (1 - wy) * wx, W * 3)
    r10, g10, b10 = _tap(base, y1, x0, wy * (1 - wx), W * 3)
    r11, g11, b11 = _tap(base, y1, x1, wy * wx, W * 3)
    r, g, b = r00 + r01 + r10 + r11, g00 + g01 + g10 + g11, b00 + b01 + b10 + b11
    f = factors + n * 3
    brightness, contrast, saturation = tl.load(f), tl.load(f + 1), tl.load(f + 2)
    m = tl.load(src_mean + n) * brightness
    r, g, b = (r * brightness - m) * contrast + m, (g * brightness - m) * contrast + m, (b * brightness - m) * contrast + m
    luma = gray_r * r + gray_g * g + gray_b * b
    r = tl.minimum(tl.maximum((r - luma) * saturation + luma, 0.0), 255.0)
    g = tl.minimum(tl.maximum((g - luma) * saturation + luma, 0.0), 255.0)
    b = tl.minimum(tl.maximum((b - luma) * saturation + luma, 0.0), 255.0)
    return (r - tl.load(mean)) / tl.load(std), (g - tl.load(mean + 1)) / tl.load(std + 1), (b - tl.load(mean + 2)) / tl.load(std + 2)


@triton.jit
def _augment_kernel(src, out, theta, factors, src_mean, mean, std, H, W, gray_r, gray_g, gray_b,
                    BLOCK: tl.constexpr):  # fmt: skip
    """Output NHWC RGB: a program per BLOCK pixels of one image."""
    n = tl.program_id(1).to(tl.int64)
    p = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = p < H * W
    p = tl.where(inside, p, 0)
    r, g, b = _pixel(src + n * H * W * 3, p // W, p % W, n, theta, factors, src_mean, mean, std, H, W, gray_r, gray_g, gray_b)
    o = out + n * H * W * 3 + p * 3
    ty = out.dtype.element_ty
    tl.store(o, r.to(ty), mask=inside)
    tl.store(o + 1, g.to(ty), mask=inside)
    tl.store(o + 2, b.to(ty), mask=inside)


@triton.jit
def _augment_blocks_kernel(src, out, theta, factors, src_mean, mean, std, H, W, gray_r, gray_g, gray_b,
                           BLOCK: tl.constexpr):  # fmt: skip
    """Output the stem's 2x2 pixel blocks of the image zero-padded as `cnn_fast.space_to_depth` pads it (channel
    c * 4 + dy * 2 + dx, 12 of 16 channels; the rest zeros), NHWC: a program per BLOCK blocks of one image."""
    n = tl.program_id(1).to(tl.int64)
    HB, WB = (H + 3) // 2, (W + 3) // 2
    q = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = q < HB * WB
    q = tl.where(inside, q, 0)
    sub = tl.arange(0, 4)
    oy = 2 * (q // WB)[:, None] + (sub // 2)[None, :] - 1
    ox = 2 * (q % WB)[:, None] + (sub % 2)[None, :] - 1
    pixel = (oy >= 0) & (oy < H) & (ox >= 0) & (ox < W)
    r, g, b = _pixel(src + n * H * W * 3, oy, ox, n, theta, factors, src_mean, mean, std, H, W, gray_r, gray_g, gray_b)
    o = out + n * HB * WB * 16 + q[:, None] * 16 + sub[None, :]
    ty = out.dtype.element_ty
    keep = inside[:, None]
    tl.store(o, tl.where(pixel, r, 0.0).to(ty), mask=keep)
    tl.store(o + 4, tl.where(pixel, g, 0.0).to(ty), mask=keep)
    tl.store(o + 8, tl.where(pixel, b, 0.0).to(ty), mask=keep)
    tl.store(o + 12, tl.zeros_like(r).to(ty), mask=keep)


def augment_normalize(
    x: torch.Tensor, theta: torch.Tensor | None, factors: torch.Tensor | None, mean: torch.Tensor, std: torch.Tensor,
    dtype: torch.dtype, blocks: bool = False,
) -> torch.Tensor:
    """uint8 NHWC images on CUDA -> the augmented, normalised NCHW batch in `dtype`, laid out channels-last:
    `augment.augment_reference` then the normalisation, in one pass. `theta`: N x 2 x 3 affine maps as
    `F.affine_grid` takes them; `factors`: N x 3 (brightness, contrast, saturation); None is the identity.
    `mean`, `std`: the 3 channels' normalisation. `blocks`: written as `cnn_fast.space_to_depth` lays the stem's
    input out (N x 16 x (H + 3) // 2 x (W + 3) // 2, channels 12-15 zeros)."""
    n, h, w, _ = x.shape
    if theta is None:
        theta = torch.eye(2, 3, device=x.device).expand(n, 2, 3)  # made on the device: no copy to capture
    if factors is None:  # no jitter: the kernel's colour step is the identity and needs no mean
        factors, src_mean = torch.ones(n, 3, device=x.device), torch.zeros(n, device=x.device)
    else:
        src_mean = x.mean(dim=(1, 2, 3), dtype=torch.float32)
    args = (theta.float().contiguous(), factors.float().contiguous(), src_mean, mean.float().contiguous(),
            std.float().contiguous(), h, w, *GRAY)  # fmt: skip
    if blocks:
        hb, wb = (h + 3) // 2, (w + 3) // 2
        out = torch.empty(n, hb, wb, 16, device=x.device, dtype=dtype)
        _augment_blocks_kernel[(triton.cdiv(hb * wb, BLOCKS_BLOCK), n)](x.contiguous(), out, *args, BLOCK=BLOCKS_BLOCK)
    else:
        out = torch.empty_like(x, dtype=dtype)
        _augment_kernel[(triton.cdiv(h * w, 256), n)](x.contiguous(), out, *args, BLOCK=256)
    return out.permute(0, 3, 1, 2)
