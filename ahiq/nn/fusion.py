"""ViT-guided deformable fusion: offsets predicted from the reference ViT features steer a deformable
convolution over the shallow CNN features of both images (which branches a model has and how they are fused:
ahiq.registry.variants.FUSIONS, the paper's Table 6)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from torchvision.ops import DeformConv2d, deform_conv2d

from ahiq.nn.head import is_channels_last
from ahiq.registry.settings import DEFORM_IMPLS


# The most bytes of fp32 columns sampled at once: the columns are nine times the features (29 MB per ViT-B/8
# crop), so a 64-crop pass sampled at once held 3.7 GB of them (and in bf16 their copy as well).
COLUMN_BYTES = 256 * 2**20


def deform_conv2d_bilinear(
    x: torch.Tensor, offset: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding: int
) -> torch.Tensor:
    """``torchvision.ops.deform_conv2d`` (stride 1, dilation 1, one offset group, no mask) as nine bilinear
    ``grid_sample`` taps and one matmul.

    Same numbers as torchvision's kernel (tests/test_fusion.py), faster on the CPU, and it runs in bf16 and
    under torch.compile, where torchvision's op has no bf16 kernel. ``offset`` may have fewer images than
    ``x`` when consecutive groups of images share offsets (the distorted and reference features of a pair
    share the reference's): ``x`` [G * B, C, H, W] with ``offset`` [B, 18, H, W] uses offset i for images
    i, B + i, 2B + i, ... The columns are sampled and multiplied a few offsets at a time (``COLUMN_BYTES``).
    """
    n, c, h, w = x.shape
    b = offset.shape[0]
    c_out, c_in, kh, kw = weight.shape
    if h < 2 or w < 2:
        raise ValueError(f"deformable convolution needs a feature map of at least 2x2, got {h}x{w}")
    taps = kh * kw
    # Offset channels (2k, 2k + 1) hold (dy, dx) of tap k = i * kw + j, as in torchvision.
    off = offset.view(b, taps, 2, h, w)
    ky = torch.arange(kh, device=x.device).repeat_interleave(kw) - padding
    kx = torch.arange(kw, device=x.device).repeat(kh) - padding
    py = torch.arange(h, device=x.device).view(1, 1, h, 1) + ky.view(1, taps, 1, 1) + off[:, :, 0]
    px = torch.arange(w, device=x.device).view(1, 1, 1, w) + kx.view(1, taps, 1, 1) + off[:, :, 1]
    # align_corners=True maps -1 and 1 to the first and last pixel centres; with zero padding, a tap outside
    # the map contributes nothing, which is torchvision's rule.
    # Sampling positions and the interpolation in fp32 at least: bf16 keeps 8 significant bits, so a
    # normalised position on a 56-pixel map could be off by 0.1 pixel. Only the matmul runs in bf16.
    exact = torch.promote_types(x.dtype, torch.float32)
    grid = torch.stack((px * (2.0 / (w - 1)) - 1.0, py * (2.0 / (h - 1)) - 1.0), dim=-1)
    grid = grid.to(exact).view(b, taps * h, w, 2)
    # The weight in the columns' dtype before it is broadcast: under autocast, bmm would otherwise cast the
    # expanded weight as a whole, one copy per image.
    w2d = weight.reshape(c_out, c_in * taps).to(x.dtype)  # column c * 9 + k
    bias = None if bias is None else bias.to(x.dtype).view(1, c_out, 1)  # an fp32 bias would promote bf16 output
    groups = n // b
    per_chunk = max(1, COLUMN_BYTES // (groups * c_in * taps * h * w * exact.itemsize))
    if per_chunk >= b:
        out = _sample_and_multiply(x, grid.repeat(groups, 1, 1, 1), w2d, bias, exact).view(n, c_out, h, w)
    else:
        images = x.view(groups, b, c, h, w)
        chunks = [_sample_and_multiply(images[:, a:a + per_chunk].reshape(-1, c, h, w),
                                       grid[a:a + per_chunk].repeat(groups, 1, 1, 1), w2d, bias, exact)
                  .view(groups, -1, c_out, h * w) for a in range(0, b, per_chunk)]
        out = torch.cat(chunks, dim=1).view(n, c_out, h, w)
    # The matmul gives NCHW; channels_last input gets channels_last output (one conversion), so that the
    # convolutions after it see the layout the runtime chose.
    return out.contiguous(memory_format=torch.channels_last) if is_channels_last(x) else out


def _sample_and_multiply(x: torch.Tensor, grid: torch.Tensor, w2d: torch.Tensor, bias: torch.Tensor | None,
                         exact: torch.dtype) -> torch.Tensor:
    """The columns of ``x`` [N, C, H, W] at ``grid`` [N, 9H, W, 2] times ``w2d`` -> [N, C_out, H * W]."""
    n, c, h, w = x.shape
    # The native kernel (bilinear, zeros, align_corners) called directly: F.grid_sample would send these
    # settings on CUDA to cuDNN's sampler, which the equality tests never covered and which takes
    # channels_last input badly. The CPU kernel parallelises over images only: fewer images than threads
    # are sampled as groups of channels (a view of the same memory), so that every thread works.
    split = _channel_groups(x, n, c)
    cols = torch.grid_sampler_2d(x.to(exact).reshape(n * split, c // split, h, w),
                                 grid.repeat_interleave(split, 0) if split > 1 else grid, 0, 0, True)
    cols = cols.view(n, c, -1, w)  # [N, C, 9H, W]
    cols = cols.to(x.dtype)  # bf16 features give bf16 columns: half the memory of the largest tensor here
    # bmm with the weight broadcast, not matmul: for a weight that requires grad (a parameter, even under
    # no_grad) matmul folds the batch and copies the columns, the largest tensor here (1.7x slower on the CPU).
    out = torch.bmm(w2d.expand(n, -1, -1), cols.view(n, w2d.shape[1], h * w))
    return out if bias is None else out + bias


def _channel_groups(x: torch.Tensor, n: int, c: int) -> int:
    """Into how many groups of channels to split each image for the CPU sampler: as many as threads per
    image, where the channels divide evenly and the layout makes the split a view (NCHW)."""
    if x.device.type != "cpu" or not x.is_contiguous():
        return 1
    split = max(1, torch.get_num_threads() // n)
    while c % split:
        split -= 1
    return split


class CNNFusion(nn.Module):
    """The CNN features brought to the ViT grid by two convolutions. With ``vit_channels`` (AHIQ's
    ``deform+concat``): first offsets from the reference ViT features and a deformable 3x3 convolution over
    the CNN features of both images (both with the reference's offsets). Without (``concat``, ``cnn``): the
    two convolutions alone; no offset or deformable weights are built."""

    def __init__(self, vit_channels: int | None, cnn_channels: int, hidden: int = 512, final_stride: int = 1,
                 deform_impl: str = "bilinear"):
        super().__init__()
        self.deform_impl = DEFORM_IMPLS.choice(deform_impl, "deform_impl").name
        self.deformable = vit_channels is not None
        if self.deformable:
            self.offset_conv = nn.Conv2d(vit_channels, 2 * 3 * 3, 3, 1, 1)
            self.deform = DeformConv2d(cnn_channels, cnn_channels, 3, 1, 1)
        self.project = nn.Sequential(
            nn.Conv2d(cnn_channels, hidden, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(hidden, cnn_channels, 3, stride=final_stride, padding=1),
        )

    def offsets(self, vit_ref: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        # In fp32 (at least) under autocast too: offsets are positions, and bf16 would round a 3-pixel
        # offset by up to 0.01 px.
        with torch.autocast(vit_ref.device.type, enabled=False):
            vit_ref = vit_ref.to(torch.promote_types(vit_ref.dtype, torch.float32))
            if _needs_grad(self.offset_conv.weight):
                # Training: the upsampled features (4x the ViT features, 46 MB per ViT-B/8 crop in fp32) are
                # recomputed in the backward pass instead of kept for the convolution's weight gradient.
                return checkpoint(self._offsets, vit_ref, size, use_reentrant=False)
            return self._offsets(vit_ref, size)

    def _offsets(self, vit_ref: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        # The official order: upsample the ViT features to the CNN grid, then convolve.
        return self.offset_conv(F.interpolate(vit_ref, size=size, mode="nearest"))

    def forward(self, cnn: torch.Tensor, offset: torch.Tensor | None) -> torch.Tensor:
        """CNN features [G * B, C, H, W] of G images per offset map [B, 18, H, W] (image i uses offset
        i mod B: the distorted and the reference features of a pair share the reference's offsets); no
        offsets without the deformable convolution."""
        if not self.deformable:
            return self.project(cnn)
        if self.deform_impl == "torchvision":
            deformed = deform_conv2d(cnn, _per_image(offset, cnn.shape[0]), self.deform.weight, self.deform.bias,
                                     padding=(1, 1))
            if is_channels_last(cnn):  # its kernel gives NCHW: back to the runtime's layout, as the bilinear one
                deformed = deformed.contiguous(memory_format=torch.channels_last)
        elif _needs_grad(self.deform.weight):
            deformed = self._deform_recomputed(cnn, offset)
        else:
            deformed = self._deform(cnn, offset)
        return self.project(deformed)

    def _deform(self, cnn: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        return deform_conv2d_bilinear(cnn, offset, self.deform.weight, self.deform.bias, padding=1)

    def _deform_recomputed(self, cnn: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        """The deformable convolution for training, a few images at a time, each group's sampled columns
        recomputed in the backward pass instead of kept: the columns are nine times the CNN features (87 MB
        per ViT-B/8 crop in fp32), and kept for a whole batch, with their gradient, they were the largest
        part of a training step's memory. Groups of as many images as CPU threads (the CPU sampling kernel
        parallelises over images), one image on a GPU."""
        offset = _per_image(offset, cnn.shape[0])  # 18 channels only: small next to the features
        group = 1 if cnn.is_cuda else torch.get_num_threads()
        return torch.cat([checkpoint(self._deform, cnn[a:a + group], offset[a:a + group], use_reentrant=False)
                          for a in range(0, cnn.shape[0], group)])


def _needs_grad(weight: torch.Tensor) -> bool:
    """Training this weight: what its backward pass keeps is worth recomputing instead."""
    return torch.is_grad_enabled() and weight.requires_grad


def _per_image(offset: torch.Tensor, n: int) -> torch.Tensor:
    """Offsets [B, 18, H, W] shared by groups of B images -> one offset map per image [n, 18, H, W]."""
    return offset.repeat(n // offset.shape[0], 1, 1, 1)
