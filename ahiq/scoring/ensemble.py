"""The crop-ensemble scoring core: ``score_group``, the one function that scores pairs (and gives their
quality maps), for the scorer and test.py (through evaluation.predict, which decodes the files), validation,
the metric and the maps.

A pair is scored on the crops of a CropPlan: its windows depend only on the image size, the plan and the
reference's name, so every distorted version of a reference is cut at the same windows and the reference
crops' features (offsets, reduced head features) are computed once for all of them, then each distorted
image is scored against them: at most ``chunk`` crops per forward pass, the mean over the crops and over the
models of an ensemble. Under autograd (the metric as a loss) the same code keeps the graph to the distorted
input.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from ahiq.data.crops import CropPlan
from ahiq.nn.model import AHIQ, ReferenceFeatures
from ahiq.runtime.device import Runtime
from ahiq.scoring.maps import QualityMaps, check_maps


@dataclass
class Scored:
    """What score_group gives, on the device: ``scores`` [P] (float32, or float64 for a float64 model), the
    crops' score and weight maps ``crop_maps`` [2, P, K, h, w] (float32, when asked) cut at ``windows`` of the
    ``image_size`` images, and the reference's ``features`` per model, to pass back for more distorted images
    of the same reference. ``maps`` reads the maps back: one QualityMaps per pair."""

    scores: torch.Tensor
    crop_maps: torch.Tensor | None
    features: list[ReferenceFeatures]
    windows: np.ndarray
    crop_size: int
    image_size: tuple[int, int]

    @property
    def maps(self) -> list[QualityMaps] | None:
        if self.crop_maps is None:
            return None
        crop_maps = self.crop_maps.cpu().numpy()
        return [QualityMaps(score, crop_maps[0, j], crop_maps[1, j], self.windows, self.crop_size, self.image_size)
                for j, score in enumerate(self.scores.tolist())]


def score_group(models: Sequence[AHIQ], plan: CropPlan, ref: torch.Tensor | None, dists: Sequence[torch.Tensor],
                ref_name: str, runtime: Runtime, device: torch.device, chunk: int, maps: bool = False,
                features: list[ReferenceFeatures] | None = None) -> Scored:
    """Score the distorted images ``dists`` ([3, H, W] each, RGB in [0, 1], on any device) against their
    one reference ``ref`` [3, H, W]: crops cut by ``plan`` (seeded by ``ref_name``), the reference's features
    computed once, or taken from ``features`` (an earlier call's for the same reference; ``ref`` may then be
    None). ``maps``: also the crops' quality maps, from the same forward passes (one model only). Everything
    stays on the device: nothing is read back until the caller reads the scores or ``maps``."""
    if maps:
        check_maps(models)
    height, width = dists[0].shape[-2:]
    windows = plan.windows(height, width, ref_name)
    if features is None:
        ref_crops = plan.cut(ref.to(device, non_blocking=True), windows)
        features = [_in_chunks(runtime.entry(m, "reference_features"), ref_crops, runtime, device, chunk)
                    for m in models]
    dist_crops = torch.stack([plan.cut(d.to(device, non_blocking=True), windows) for d in dists])
    scores, crop_maps = _score_crops(models, features, dist_crops, runtime, device, chunk, maps)
    return Scored(scores, crop_maps, features, windows, plan.size, (int(height), int(width)))


def _in_chunks(forward, crops: torch.Tensor, runtime: Runtime, device: torch.device, chunk: int) -> ReferenceFeatures:
    parts = []
    for a in range(0, crops.shape[0], chunk):
        with runtime.autocast(device):
            parts.append(forward(runtime.inputs(crops[a:a + chunk], device)))
    return ReferenceFeatures.joined(parts)


def _score_crops(models: Sequence[AHIQ], features: Sequence[ReferenceFeatures], dist_crops: torch.Tensor,
                 runtime: Runtime, device: torch.device, chunk: int,
                 maps: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scores [P] of distorted crops [P, K, 3, S, S]: the mean over the K crops and over the models; whole
    images together while their crops fit in ``chunk``, else windows of one image's crops. ``maps``: also
    the crops' score and weight maps [2, P, K, h, w] (float32, detached, on the device)."""
    p, k = dist_crops.shape[:2]
    per_model = []
    kept = []  # per window of crops: [2, P, window, h, w]
    for model, ref in zip(models, features):
        forward = runtime.entry(model, "predict_with_reference")
        totals = []  # per window of crops: [P] sums, concatenated so that autograd sees no in-place update
        for a in range(0, k, chunk):
            window = min(chunk, k - a)
            feats = ref.crops(a, a + window)
            per_pass = max(1, chunk // window)
            sums, window_maps = [], []
            for s in range(0, p, per_pass):
                crops = runtime.inputs(dist_crops[s:s + per_pass, a:a + window].flatten(0, 1), device)
                with runtime.autocast(device):
                    pooled = forward(crops, feats)  # its score: float32 under bf16 autocast; float64 stays
                sums.append(pooled.score.view(-1, window).sum(1))
                if maps:
                    window_maps.append(torch.stack((pooled.score_map, pooled.weight_map)).detach().float().view(
                        2, -1, window, *pooled.score_map.shape[-2:]))
            totals.append(torch.cat(sums))
            if maps:
                kept.append(torch.cat(window_maps, dim=1))
        per_model.append(torch.stack(totals).sum(0) / k)
    return torch.stack(per_model).mean(0), torch.cat(kept, dim=2) if maps else None


@contextlib.contextmanager
def out_of_memory_advice(device: torch.device, pairs: int, crops: int, chunk: int, batch_option: str):
    """Out of memory while scoring ``pairs`` pairs of ``crops`` crops: a message naming what to lower."""
    try:
        yield
    except torch.OutOfMemoryError as exc:
        raise MemoryError(f"out of memory on {device} scoring {pairs} pairs x {crops} crops, {min(chunk, pairs * crops)} "
                          f"crops per forward pass: lower runtime.crop_chunk (now {chunk}; --crop-chunk), or the pairs "
                          f"per batch ({batch_option}; now {pairs})") from exc
