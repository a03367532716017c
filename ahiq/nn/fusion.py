"""ViT-guided deformable fusion: offsets predicted from the reference ViT features steer a deformable
convolution over the shallow CNN features of both images (which branches a model has and how they are fused:
ahiq.registry.variants.FUSIONS, the paper's Table 6)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import DeformConv2d, deform_conv2d

from ahiq.nn.head import is_channels_last
from ahiq.registry.settings import DEFORM_IMPLS


# The most bytes of columns sampled at once: the columns are nine times the features (87 MB per ViT-B/8 crop in
# fp32), so a 64-crop pass sampled at once would hold 5.6 GB of them.
COLUMN_BYTES = 256 * 2**20
CORNERS = ((0, 0), (0, 1), (1, 0), (1, 1))  # a bilinear sample's four neighbours, (dy, dx) from the top left


def deform_conv2d_bilinear(
    x: torch.Tensor, offset: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding: int
) -> torch.Tensor:
    """``torchvision.ops.deform_conv2d`` (stride 1, dilation 1, one offset group, no mask): every tap's bilinear
    sample is a weighted sum of four rows of the features laid out NHWC, one ``embedding_bag`` for all of them,
    then one matmul with the weight.

    Same numbers as torchvision's kernel (tests/test_fusion.py), faster on the CPU, and it runs in bf16 and
    under torch.compile, where torchvision's op has no bf16 kernel. The sampling positions and the bilinear
    weights are computed in fp32 at least (bf16 keeps 8 significant bits: a position on a 56-pixel map could be
    off by 0.2 pixel); the features are read, and the columns made, in their own dtype. ``offset`` may have
    fewer images than ``x`` when consecutive groups of images share offsets (the distorted and reference
    features of a pair share the reference's): ``x`` [G * B, C, H, W] with ``offset`` [B, 18, H, W] uses offset
    i for images i, B + i, 2B + i, ... The columns are made a few images at a time (``COLUMN_BYTES``). The output
    has the layout of ``x`` (channels_last in, channels_last out: the matmul gives NHWC)."""
    n, c, h, w = x.shape
    b = offset.shape[0]
    c_out, c_in, kh, kw = weight.shape
    if h < 2 or w < 2:
        raise ValueError(f"deformable convolution needs a feature map of at least 2x2, got {h}x{w}")
    rows, weights = _bilinear_rows(offset, kh, kw, padding, torch.promote_types(x.dtype, torch.float32))
    taps = kh * kw
    features = x.permute(0, 2, 3, 1).reshape(n * h * w, c)  # NHWC rows: a view of channels_last features
    weights = weights.to(x.dtype)
    # The weight in the columns' order (tap, channel) and dtype; a bias that would promote bf16 output, too.
    w2d = weight.permute(0, 2, 3, 1).reshape(c_out, taps * c_in).to(x.dtype).t()
    bias = None if bias is None else bias.to(x.dtype)
    per_chunk = max(1, COLUMN_BYTES // (taps * h * w * c * x.element_size()))
    outs = []
    for a in range(0, n, per_chunk):
        images = torch.arange(a, min(n, a + per_chunk), device=x.device)
        # image i's rows start at i * h * w; its sampling positions are those of offset i mod b
        chosen = rows[images % b] + (images * (h * w)).view(-1, 1, 1)
        columns = F.embedding_bag(chosen.view(-1, 4), features, per_sample_weights=weights[images % b].view(-1, 4),
                                  mode="sum").view(-1, taps * c)
        outs.append(_ColumnsTimesWeight.apply(columns, w2d, bias))
    out = (outs[0] if len(outs) == 1 else torch.cat(outs)).view(n, h, w, c_out).permute(0, 3, 1, 2)
    return out if is_channels_last(x) else out.contiguous()


class _ColumnsTimesWeight(torch.autograd.Function):
    """``columns @ weight (+ bias)``, whose weight gradient multiplies the output's gradient transposed and made
    contiguous: ``grad.t() @ columns`` as autograd forms it ran at half the speed on the CPU (measured 32 against
    64 ms for a ViT-B/8 pair's columns in bf16). The columns are kept for it, as autograd keeps them."""

    @staticmethod
    def forward(ctx, columns: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(columns, weight)
        ctx.has_bias = bias is not None
        return columns @ weight if bias is None else torch.addmm(bias, columns, weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        columns, weight = ctx.saved_tensors
        grad_columns = grad @ weight.t() if ctx.needs_input_grad[0] else None
        grad_weight = (grad.t().contiguous() @ columns).t() if ctx.needs_input_grad[1] else None
        grad_bias = grad.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_columns, grad_weight, grad_bias


def _bilinear_rows(offset: torch.Tensor, kh: int, kw: int, padding: int,
                   exact: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """For each image of ``offset`` [B, 2 * kh * kw, H, W] and each output pixel and tap, in (y, x, tap) order: the
    four neighbouring rows of an H x W map laid out NHWC (row y * W + x) and their bilinear weights, in ``exact``:
    [B, H * W * taps, 4] each. A neighbour outside the map gets weight 0 (torchvision's zero padding) and a row
    inside it, so every row read exists."""
    b, _, h, w = offset.shape
    taps = kh * kw
    # Offset channels (2k, 2k + 1) hold (dy, dx) of tap k = i * kw + j, as in torchvision.
    off = offset.to(exact).view(b, taps, 2, h, w)
    ky = torch.arange(kh, device=offset.device).repeat_interleave(kw) - padding
    kx = torch.arange(kw, device=offset.device).repeat(kh) - padding
    py = torch.arange(h, device=offset.device).view(1, 1, h, 1) + ky.view(1, taps, 1, 1) + off[:, :, 0]
    px = torch.arange(w, device=offset.device).view(1, 1, 1, w) + kx.view(1, taps, 1, 1) + off[:, :, 1]
    py, px = py.permute(0, 2, 3, 1), px.permute(0, 2, 3, 1)  # [B, H, W, taps]
    top, left = py.floor(), px.floor()
    fy, fx = py - top, px - left  # the fractions, differentiable in the offsets (floor's gradient is zero)
    top, left = top.long(), left.long()
    rows, weights = [], []
    for dy, dx in CORNERS:
        y, x = top + dy, left + dx
        inside = (y >= 0) & (y < h) & (x >= 0) & (x < w)
        rows.append(y.clamp(0, h - 1) * w + x.clamp(0, w - 1))
        weight = (fy if dy else 1 - fy) * (fx if dx else 1 - fx)
        weights.append(torch.where(inside, weight, torch.zeros((), dtype=exact, device=offset.device)))
    return torch.stack(rows, -1).view(b, -1, 4), torch.stack(weights, -1).view(b, -1, 4)


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
            self.offset_conv.keeps_precision = True  # offsets are positions: computed in fp32 (at least), see offsets
            self.deform = DeformConv2d(cnn_channels, cnn_channels, 3, 1, 1)
        self.project = nn.Sequential(
            nn.Conv2d(cnn_channels, hidden, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(hidden, cnn_channels, 3, stride=final_stride, padding=1),
        )

    def offsets(self, vit_ref: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """The deformable offsets [B, 18, H, W] on the CNN grid ``size`` from the reference ViT features [B, C, h, w]:
        the official 3x3 convolution of the features upsampled (nearest) to that grid. Nearest upsampling copies
        pixels, so it commutes with the convolution's per-tap products: each tap's products are computed on the
        ViT grid (one 1x1 convolution to 9 x 18 channels, a quarter of the operations at patch 8), then
        upsampled and summed shifted. The same sums in another order; the upsampled features (46 MB per ViT-B/8
        crop in fp32) are never made. In fp32 (at least) under autocast too: offsets are positions, and bf16
        would round a 3-pixel offset by up to 0.01 px."""
        with torch.autocast(vit_ref.device.type, enabled=False):
            vit_ref = vit_ref.to(torch.promote_types(vit_ref.dtype, torch.float32))
            weight = self.offset_conv.weight.to(vit_ref.dtype)  # [18, C, 3, 3]
            out, c, kh, kw = weight.shape
            per_tap = F.conv2d(vit_ref, weight.permute(2, 3, 0, 1).reshape(kh * kw * out, c, 1, 1))
            up = F.pad(F.interpolate(per_tap, size=size, mode="nearest"), (kw // 2,) * 2 + (kh // 2,) * 2)
            up = up.view(vit_ref.shape[0], kh * kw, out, *up.shape[-2:])
            h, w = size
            taps = [up[:, i * kw + j, :, i:i + h, j:j + w] for i in range(kh) for j in range(kw)]
            return torch.stack(taps).sum(0) + self.offset_conv.bias.to(vit_ref.dtype).view(1, -1, 1, 1)

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
        else:
            deformed = deform_conv2d_bilinear(cnn, offset, self.deform.weight, self.deform.bias, padding=1)
        return self.project(deformed)


def _per_image(offset: torch.Tensor, n: int) -> torch.Tensor:
    """Offsets [B, 18, H, W] shared by groups of B images -> one offset map per image [n, 18, H, W]."""
    return offset.repeat(n // offset.shape[0], 1, 1, 1)
