"""The quality head: a score per crop from the reduced features of a distorted crop and its reference. The
pooling (ahiq.registry.variants.POOLINGS, the paper's Table 8) decides how the head's feature map becomes one
score: AHIQ's patch-wise prediction (a score map and an attention-weight map whose weighted mean is the score),
spatial pooling, or both."""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from ahiq.registry.variants import POOLINGS


def weighted_mean(score_map: torch.Tensor, weight_map: torch.Tensor) -> torch.Tensor:
    """sum(score * weight) / sum(weight) over each image's map, in fp32 at least (bf16 maps are widened,
    float64 ones kept): [B, 1, H, W] x2 -> [B]."""
    exact = torch.promote_types(score_map.dtype, torch.float32)
    score_map, weight_map = score_map.to(exact), weight_map.to(exact)
    return (score_map * weight_map).sum(dim=(1, 2, 3)) / weight_map.sum(dim=(1, 2, 3))


def is_channels_last(x: torch.Tensor) -> bool:
    """Whether ``x`` [N, C, H, W] is laid out NHWC (and not also NCHW, as a map with one channel or pixel is)."""
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


class Pooled(NamedTuple):
    score: torch.Tensor                 # [N], fp32 at least
    score_map: torch.Tensor | None      # [N, 1, h, w], where the score is the maps' weighted mean
    weight_map: torch.Tensor | None


class QualityHead(nn.Module):
    """A shared 1x1 reduction of each image's features, then cat(d - r, d, r) -> three convolutions -> the
    ``pooling`` (ahiq.registry.variants.POOLINGS)."""

    def __init__(self, in_channels: int, dim: int = 256, hidden: int = 1024, pooling: str = "patch"):
        super().__init__()
        self.pooling = POOLINGS.choice(pooling, "pooling")
        self.reduce = nn.Conv2d(in_channels, dim, 1)
        self.smooth = nn.Sequential(
            nn.Conv2d(3 * dim, hidden, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(hidden, 2 * dim, 3, padding=1),
        )
        self.hidden = nn.Sequential(nn.Conv2d(2 * dim, dim, 3, padding=1), nn.ReLU())
        if self.pooling.patch:
            self.score = nn.Conv2d(dim, 1, 1)
            self.attention = nn.Conv2d(dim, 1, 1)
        if self.pooling.spatial:
            self.regress = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, 1))

    def predict(self, d: torch.Tensor, r: torch.Tensor) -> Pooled:
        """The scores of distorted images from the reduced features (``self.reduce``) of the distorted
        images ``d`` [G * B, C, h, w] and of the reference images ``r`` [B, C, h, w]: distorted image i against
        reference i mod B.

        cat(d - r, d, r) is written into one tensor in ``d``'s memory layout, the reference broadcast over
        the groups (no repeated copy of it, and channels_last input stays channels_last into the convolutions)."""
        n, c, h, w = d.shape
        b = r.shape[0]
        if torch.compiler.is_exporting():  # an exported graph pairs crop i with reference i: a Concat, no scatter
            return self._pool(torch.cat((d - r, d, r), 1))
        layout = torch.channels_last if is_channels_last(d) else torch.contiguous_format
        x = torch.empty((n, 3 * c, h, w), dtype=torch.promote_types(d.dtype, r.dtype), device=d.device,
                        memory_format=layout)
        parts, d5, r5 = x.view(n // b, b, 3, c, h, w), d.view(n // b, b, c, h, w), r.unsqueeze(0)
        parts[:, :, 0] = d5 - r5
        parts[:, :, 1] = d5
        parts[:, :, 2] = r5
        return self._pool(x)

    def _pool(self, x: torch.Tensor) -> Pooled:
        """cat(d - r, d, r) [N, 3 * dim, h, w] -> the pooling's scores (and maps)."""
        x = self.hidden(self.smooth(x))
        scores, score_map, weight_map = [], None, None
        if self.pooling.patch:
            score_map, weight_map = self.score(x), torch.sigmoid(self.attention(x))
            scores.append(weighted_mean(score_map, weight_map))
        if self.pooling.spatial:
            regressed = self.regress(x.mean(dim=(2, 3)))[:, 0]
            scores.append(regressed.to(torch.promote_types(regressed.dtype, torch.float32)))
        score = scores[0] if len(scores) == 1 else (scores[0] + scores[1]) / 2
        if self.pooling.no_maps:
            return Pooled(score, None, None)
        return Pooled(score, score_map, weight_map)

    def forward(self, feats_dist: torch.Tensor, feats_ref: torch.Tensor) -> torch.Tensor:
        return self.predict(self.reduce(feats_dist), self.reduce(feats_ref)).score
