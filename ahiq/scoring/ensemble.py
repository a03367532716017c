"""The crop-ensemble scoring core: an ``Ensemble`` (trained models, the crops that score a pair, the runtime they
run with) and its ``score_group``, the one function that scores pairs (and gives their quality maps), for every
way of scoring: the scorer and test.py (through ahiq.scoring.inference.predict, which decodes the files),
validation, the metric and the maps. ``load_ensemble`` is the one way to load checkpoints for scoring.

A pair is scored on the crops of a CropPlan: its windows depend only on the image size, the plan and the
reference's name, so every distorted version of a reference is cut at the same windows and the reference
crops' features (offsets, reduced head features) are computed once for all of them, then each distorted
image is scored against them: at most the runtime's crops per forward pass, the mean over the crops and over
the models of an ensemble. Under autograd (the metric as a loss) the same code keeps the graph to the distorted
input.
"""
from __future__ import annotations

import contextlib
import copy
import math
import os
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from ahiq.data.crops import CropPlan
from ahiq.nn.model import AHIQ, ReferenceFeatures
from ahiq.runtime.device import ResolvedRuntime, Runtime
from ahiq.runtime.memory import CropCost
from ahiq.scoring.cost import crop_cost
from ahiq.scoring.maps import QualityMaps, check_maps

PathLike = str | os.PathLike


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


@dataclass
class Ensemble:
    """Trained models scored together (the mean of their scores; one model is an ensemble of one), the crops
    that score a pair, and the runtime they run with, resolved for their device."""

    models: Sequence[AHIQ]
    plan: CropPlan
    runtime: ResolvedRuntime

    @classmethod
    def prepared(cls, models: Sequence[AHIQ], plan: CropPlan, runtime: Runtime, device: torch.device) -> "Ensemble":
        """Trained models to score with, and nothing else: ``runtime`` resolved for them on ``device`` (resolve),
        each prepared there with no weight that trains (in bf16, each weight cast once) and in eval mode."""
        resolved = resolve(runtime, device, models)
        return cls([resolved.prepare(model.requires_grad_(False)).eval() for model in models], plan, resolved)

    def check_maps(self, option: str = "") -> None:
        """Quality maps can be drawn (one model, a pooling that has them), else a one-line error."""
        check_maps(self.models, option)

    def score_group(self, ref: torch.Tensor | None, dists: Sequence[torch.Tensor], ref_name: str, maps: bool = False,
                    features: list[ReferenceFeatures] | None = None) -> Scored:
        """Score the distorted images ``dists`` ([3, H, W] each, RGB in [0, 1], on any device) against their
        one reference ``ref`` [3, H, W]: crops cut by the plan (seeded by ``ref_name``), the reference's
        features computed once, or taken from ``features`` (an earlier call's for the same reference; ``ref``
        may then be None). ``maps``: also the crops' quality maps, from the same forward passes (one model
        only). Everything stays on the device: nothing is read back until the caller reads the scores or
        ``maps``."""
        if maps:
            self.check_maps()
        device, chunk = self.runtime.device, self.runtime.crops()
        height, width = dists[0].shape[-2:]
        windows = self.plan.windows(height, width, ref_name)
        if features is None:
            ref_crops = self.plan.cut(ref.to(device, non_blocking=True), windows)
            features = [self._in_chunks(self.runtime.entry(m, "reference_features"), ref_crops, chunk)
                        for m in self.models]
        dist_crops = torch.stack([self.plan.cut(d.to(device, non_blocking=True), windows) for d in dists])
        scores, crop_maps = self._score_crops(features, dist_crops, chunk, maps)
        return Scored(scores, crop_maps, features, windows, self.plan.size, (int(height), int(width)))

    def _in_chunks(self, forward, crops: torch.Tensor, chunk: int) -> ReferenceFeatures:
        parts = []
        for a in range(0, crops.shape[0], chunk):
            with self.runtime.autocast():
                parts.append(forward(self.runtime.inputs(crops[a:a + chunk])))
        return ReferenceFeatures.joined(parts)

    def _score_crops(self, features: Sequence[ReferenceFeatures], dist_crops: torch.Tensor, chunk: int,
                     maps: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Scores [P] of distorted crops [P, K, 3, S, S]: the mean over the K crops and over the models; whole
        images together while their crops fit in ``chunk``, else windows of one image's crops. ``maps``: also
        the crops' score and weight maps [2, P, K, h, w] (float32, detached, on the device)."""
        p, k = dist_crops.shape[:2]
        per_model = []
        kept = []  # per window of crops: [2, P, window, h, w]
        for model, ref in zip(self.models, features):
            forward = self.runtime.entry(model, "predict_with_reference")
            totals = []  # per window of crops: [P] sums, concatenated so that autograd sees no in-place update
            for a in range(0, k, chunk):
                window = min(chunk, k - a)
                feats = ref.crops(a, a + window)
                per_pass = max(1, chunk // window)
                sums, window_maps = [], []
                for s in range(0, p, per_pass):
                    crops = self.runtime.inputs(dist_crops[s:s + per_pass, a:a + window].flatten(0, 1))
                    with self.runtime.autocast():
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


def resolve(runtime: Runtime, device: torch.device, models: Sequence[AHIQ]) -> ResolvedRuntime:
    """``runtime`` decided for ``device`` and ``models``, once, at the start of a run: crops per pass from the
    costliest model's crop, ``precision: auto`` measured on a full-size crop pair where it must be."""
    costs = [crop_cost(model.config) for model in models]
    return runtime.resolve(device, CropCost(*(max(c[i] for c in costs) for i in range(2))), crop_pair_seconds)


def crop_pair_seconds(rounds: int = 3) -> dict:
    """Seconds a full-size ViT-B/8 crop pair takes to score (reference features, then the distorted crop) in
    fp32 and in bf16 on this CPU as scoring runs it (NHWC, and in bf16 the weights cast once), random weights:
    the two in turn, ``rounds`` times after an untimed pass each, the fastest of each (one sample of each moved
    with the machine's drift enough to choose the slower). What ``precision: auto`` decides by."""
    seconds = {"fp32": math.inf, "bf16": math.inf}
    with torch.no_grad(), torch.random.fork_rng(devices=[]):  # a run's own random numbers stay as they were
        dist, ref = (crop.contiguous(memory_format=torch.channels_last) for crop in torch.rand(2, 1, 3, 224, 224))
        plain = AHIQ(8, False, False).eval().requires_grad_(False)
        models = {precision: ResolvedRuntime(torch.device("cpu"), precision == "bf16", precision, channels_last=True)
                  .prepare(copy.deepcopy(plain) if precision == "bf16" else plain) for precision in seconds}
        for round_ in range(rounds + 1):  # round 0: oneDNN makes its kernels
            for precision, model in models.items():
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                    start = time.perf_counter()
                    model.score_with_reference(dist, model.reference_features(ref))
                    if round_:
                        seconds[precision] = min(seconds[precision], time.perf_counter() - start)
    return seconds


# What it times, part of its cache key: a changed measurement is made again
crop_pair_seconds.path = "scoring NHWC, the weights that do not train in bf16; fp32 and bf16 in turn, the fastest of 3"


def load_ensemble(checkpoints: PathLike | Sequence[PathLike], device: torch.device, runtime: Runtime = Runtime(),
                  crops: str = CropPlan.mode, num_crops: int = CropPlan.count, seed: int = CropPlan.seed,
                  allow_random_backbones: bool = False, **model_options) -> Ensemble:
    """The models of ``checkpoints`` (a released model's name, a checkpoint file or a weights folder, or a list:
    an ensemble; AHIQ.from_pretrained with ``model_options``), ``runtime`` resolved for them on ``device`` and
    each prepared there for evaluation, scoring ``crops`` (CropPlan) at the models' crop size."""
    paths = [checkpoints] if isinstance(checkpoints, (str, os.PathLike)) else list(checkpoints)
    models = [AHIQ.from_pretrained(p, allow_random_backbones=allow_random_backbones, **model_options) for p in paths]
    return Ensemble.prepared(models, CropPlan(models[0].config["img_size"], crops, num_crops, seed), runtime, device)


@contextlib.contextmanager
def out_of_memory_advice(device: torch.device, pairs: int, crops: int, chunk: int, batch_option: str):
    """Out of memory while scoring ``pairs`` pairs of ``crops`` crops: a message naming what to lower."""
    try:
        yield
    except torch.OutOfMemoryError as exc:
        raise MemoryError(f"out of memory on {device} scoring {pairs} pairs x {crops} crops, {min(chunk, pairs * crops)} "
                          f"crops per forward pass: lower runtime.crop_chunk (now {chunk}; --crop-chunk), or the pairs "
                          f"per batch ({batch_option}; now {pairs})") from exc
