"""AHIQ as a metric and as a loss on tensors, the way IQA libraries offer metrics:

    metric = ahiq.create_metric()                  # the released NTIRE 2022 model (ahiq.zoo)
    scores = metric(dist, ref)                      # [B, 3, H, W] in [0, 1] -> [B], higher is better
    loss = metric.loss(dist, ref)                   # differentiable with respect to dist
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from .backbones import Pretrained
from .data.datasets import to_tensor
from .data.images import read_image
from .data.transforms import eval_crop_positions
from .maps import ONE_MODEL, QualityMaps
from .model import AHIQ
from .runtime import Runtime, select_device

PathLike = str | os.PathLike


class AHIQMetric(nn.Module):
    """A trained AHIQ (a zoo name or checkpoint file, or several: an ensemble) scoring tensor pairs with the
    scorer's crop ensemble (``crops``, ``num_crops``, ``seed``; random crops seeded by the reference's name,
    ``ref_names``, as the scorer seeds them by file name). ``as_loss``: calling the metric keeps autograd on
    (``loss`` always does). The weights stay frozen; gradients reach the distorted input only."""

    lower_better = False

    def __init__(self, checkpoint: PathLike | Sequence[PathLike] = "pipal", crops: str = "random",
                 num_crops: int = 20, seed: int = 0, device: str | torch.device = "auto", patch_size: int = 8,
                 vit_pretrained: Pretrained = True, cnn_pretrained: Pretrained = True, as_loss: bool = False,
                 runtime: Runtime = Runtime(), weights: PathLike | None = None):
        super().__init__()
        paths = [checkpoint] if isinstance(checkpoint, (str, os.PathLike)) else list(checkpoint)
        self.device = device if isinstance(device, torch.device) else select_device(device)
        self.runtime = runtime
        self.models = nn.ModuleList(runtime.prepare(AHIQ.from_pretrained(p, patch_size=patch_size, vit_pretrained=vit_pretrained,
                                                                         cnn_pretrained=cnn_pretrained, weights=weights),
                                                    self.device).eval() for p in paths)
        for p in self.models.parameters():
            p.requires_grad_(False)
        self.crop_size = self.models[0].config["img_size"]
        self.crops, self.num_crops, self.seed, self.as_loss = crops, num_crops, seed, as_loss

    def forward(self, dist: torch.Tensor | PathLike, ref: torch.Tensor | PathLike,
                ref_names: Sequence[str] | None = None) -> torch.Tensor:
        """[B] scores of tensor pairs, or [1] of two image files."""
        if isinstance(dist, (str, os.PathLike)):
            dist, ref, ref_names = to_tensor(read_image(dist))[None], to_tensor(read_image(ref))[None], [Path(ref).name]
        with torch.set_grad_enabled(self.as_loss and torch.is_grad_enabled()):
            return self._scores(dist, ref, ref_names)

    def loss(self, dist: torch.Tensor, ref: torch.Tensor, ref_names: Sequence[str] | None = None) -> torch.Tensor:
        """The negated mean score: lower is better, differentiable with respect to ``dist``."""
        with torch.enable_grad():
            return -self._scores(dist, ref, ref_names).mean()

    @torch.no_grad()
    def maps(self, dist: torch.Tensor, ref: torch.Tensor, ref_name: str = "") -> QualityMaps:
        """One pair's score with its quality maps (ahiq.maps): ``dist``, ``ref`` [3, H, W] in [0, 1]. One
        model (not an ensemble); the same crops and the same forward pass as the score."""
        if len(self.models) > 1:
            raise ValueError(ONE_MODEL)
        if dist.dim() != 3 or dist.shape != ref.shape:
            raise ValueError(f"give dist and ref as [3, H, W] tensors of one shape, got {tuple(dist.shape)} and "
                             f"{tuple(ref.shape)}")
        size, model, chunk = self.crop_size, self.models[0], self.runtime.crop_chunk
        windows = eval_crop_positions(dist.shape[1], dist.shape[2], size, self.crops, self.num_crops, self.seed,
                                      ref_name)
        found = []
        for a in range(0, len(windows), chunk):
            d, r = self._crops(dist, windows[a:a + chunk]), self._crops(ref, windows[a:a + chunk])
            with self.runtime.autocast(self.device):
                found.append(torch.stack(model.maps_with_reference(d, model.reference_features(r)))[:, :, 0].float())
        maps = torch.cat(found, dim=1).cpu().numpy().astype(np.float64)  # [2, K, h, w]
        result = QualityMaps(float("nan"), maps[0], maps[1], np.array(windows), size, tuple(dist.shape[1:]))
        result.score = float(result.crop_scores().mean())  # the model's pooling, then the crops' mean
        return result

    def _scores(self, dist: torch.Tensor, ref: torch.Tensor, ref_names: Sequence[str] | None) -> torch.Tensor:
        if dist.dim() != 4 or dist.shape[1] != 3 or dist.shape != ref.shape:
            raise ValueError(f"give dist and ref as [B, 3, H, W] tensors of one shape, got {tuple(dist.shape)} "
                             f"and {tuple(ref.shape)}")
        names = list(ref_names) if ref_names is not None else [""] * dist.shape[0]
        if len(names) != dist.shape[0]:
            raise ValueError(f"{len(names)} ref_names for a batch of {dist.shape[0]}")
        scores = []
        for d, r, name in zip(dist, ref, names):
            windows = eval_crop_positions(d.shape[1], d.shape[2], self.crop_size, self.crops, self.num_crops,
                                          self.seed, name)
            d_crops, r_crops = self._crops(d, windows), self._crops(r, windows)
            chunk, k = self.runtime.crop_chunk, len(windows)
            with self.runtime.autocast(self.device):
                per_model = [sum(m(d_crops[a:a + chunk], r_crops[a:a + chunk]).sum()
                                 for a in range(0, k, chunk)) / k for m in self.models]
            scores.append(torch.stack(per_model).mean())
        return torch.stack(scores)

    def _crops(self, image: torch.Tensor, windows) -> torch.Tensor:
        """The crops of ``image`` [3, H, W] at ``windows`` (top, left), on the device: [K, 3, S, S]."""
        size = self.crop_size
        return self.runtime.inputs(torch.stack([image[:, t:t + size, l:l + size] for t, l in windows]), self.device)


def create_metric(checkpoint: PathLike | Sequence[PathLike] = "pipal", **settings) -> AHIQMetric:
    """AHIQ as a metric module: ``create_metric("pipal")(dist, ref)`` -> [B] scores; see AHIQMetric."""
    return AHIQMetric(checkpoint, **settings)
