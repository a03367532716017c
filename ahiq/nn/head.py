"""Patch-wise prediction head: a score map and an attention-weight map whose weighted mean is the score."""
from __future__ import annotations

import torch
from torch import nn


def weighted_mean(score_map: torch.Tensor, weight_map: torch.Tensor) -> torch.Tensor:
    """sum(score * weight) / sum(weight) over each image's map, in fp32 at least (bf16 maps are widened,
    float64 ones kept): [B, 1, H, W] x2 -> [B]."""
    exact = torch.promote_types(score_map.dtype, torch.float32)
    score_map, weight_map = score_map.to(exact), weight_map.to(exact)
    return (score_map * weight_map).sum(dim=(1, 2, 3)) / weight_map.sum(dim=(1, 2, 3))


def is_channels_last(x: torch.Tensor) -> bool:
    """Whether ``x`` [N, C, H, W] is laid out NHWC (and not also NCHW, as a map with one channel or pixel is)."""
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


class PatchHead(nn.Module):
    """A shared 1x1 reduction of each image's features, then cat(d - r, d, r) -> score and weight maps."""

    def __init__(self, in_channels: int, dim: int = 256, hidden: int = 1024):
        super().__init__()
        self.reduce = nn.Conv2d(in_channels, dim, 1)
        self.smooth = nn.Sequential(
            nn.Conv2d(3 * dim, hidden, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(hidden, 2 * dim, 3, padding=1),
        )
        self.hidden = nn.Sequential(nn.Conv2d(2 * dim, dim, 3, padding=1), nn.ReLU())
        self.score = nn.Conv2d(dim, 1, 1)
        self.attention = nn.Conv2d(dim, 1, 1)

    def maps(self, d: torch.Tensor, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Score and weight maps from the reduced features (``self.reduce``) of distorted images ``d``
        [G * B, C, h, w] and reference images ``r`` [B, C, h, w]: distorted image i against reference i mod B.

        cat(d - r, d, r) is written into one tensor in ``d``'s memory layout, the reference broadcast over
        the groups (no repeated copy of it, and channels_last input stays channels_last into the convolutions)."""
        n, c, h, w = d.shape
        b = r.shape[0]
        layout = torch.channels_last if is_channels_last(d) else torch.contiguous_format
        x = torch.empty((n, 3 * c, h, w), dtype=torch.promote_types(d.dtype, r.dtype), device=d.device,
                        memory_format=layout)
        parts, d5, r5 = x.view(n // b, b, 3, c, h, w), d.view(n // b, b, c, h, w), r.unsqueeze(0)
        parts[:, :, 0] = d5 - r5
        parts[:, :, 1] = d5
        parts[:, :, 2] = r5
        x = self.hidden(self.smooth(x))
        return self.score(x), torch.sigmoid(self.attention(x))

    def forward(self, feats_dist: torch.Tensor, feats_ref: torch.Tensor) -> torch.Tensor:
        return weighted_mean(*self.maps(self.reduce(feats_dist), self.reduce(feats_ref)))
