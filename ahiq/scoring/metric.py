"""AHIQ as a metric and as a loss on tensors, the way IQA libraries (pyiqa) offer metrics:

    metric = ahiq.create_metric("ahiq")             # the released NTIRE 2022 model (ahiq.nn.zoo: "pipal")
    scores = metric(dist, ref)                      # [B, 3, H, W] in [0, 1] -> [B], higher is better
    loss = metric.loss(dist, ref)                   # -mean score: lower is better, differentiable w.r.t. dist
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from ahiq.data.crops import CropPlan
from ahiq.data.datasets import to_tensor
from ahiq.data.images import read_image
from ahiq.nn.backbones import Pretrained
from ahiq.registry.released import RELEASED
from ahiq.registry.variants import VITS
from ahiq.runtime.device import Runtime, select_device
from ahiq.scoring.ensemble import Ensemble, load_ensemble, out_of_memory_advice, resolve
from ahiq.scoring.maps import QualityMaps
from ahiq.scoring.scorer import EnsembleScorer

PathLike = str | os.PathLike
NAMES = {"ahiq": RELEASED.default.name}  # the metric's name in IQA libraries -> the released model it means
REDUCTIONS = ("mean", "sum", "none")


def list_models() -> list[str]:
    """The names create_metric takes (besides checkpoint files and weights folders)."""
    return [*NAMES, *RELEASED]


class AHIQMetric(nn.Module, EnsembleScorer):
    """A trained AHIQ (a released name, a checkpoint file or weights folder, or several: an ensemble) scoring
    pairs with the scorer's crop ensemble (``crops``, ``num_crops``, ``seed``; random crops seeded by the
    reference's name, ``ref_names``, as the scorer seeds them by file name). The scores are those of
    ahiq.scoring, the core every other path uses.

    Inputs: tensors [B, C, H, W] or [C, H, W] (C = 3, RGB, or 1, grey), lists of such tensors (images of
    different sizes), image files, PIL images, or lists of them; values in [0, 1] (checked unless
    ``check_input_range=False``). ``as_loss``: calling the metric keeps autograd on and returns
    ``loss_weight`` times the scores reduced by ``loss_reduction``, as pyiqa does: the score itself, higher for
    better images, so maximise it (or give a negative ``loss_weight``); ``loss`` is the negated mean, to
    minimise. The weights stay frozen; gradients reach the distorted input only. It is also a scorer of image files
    (ahiq.scoring.protocol.PairScorer: ``score_pairs``, ``score``) with the same models and crops."""

    lower_better = False
    metric_mode = "FR"
    score_range = "~0, ~1"  # a normalised MOS (PIPAL's training targets): an identical pair scores about 0.7

    batch_size, num_workers = 1, 0  # as a scorer of image files

    def __init__(self, checkpoint: PathLike | Sequence[PathLike] = "ahiq", crops: str = CropPlan.mode,
                 num_crops: int = CropPlan.count, seed: int = CropPlan.seed, device: str | torch.device = "auto",
                 patch_size: int = VITS.default.name, vit_pretrained: Pretrained = True,
                 cnn_pretrained: Pretrained = True, as_loss: bool = False, loss_weight: float = 1.0,
                 loss_reduction: str = "mean", check_input_range: bool = True, runtime: Runtime = Runtime(),
                 weights: PathLike | None = None, allow_random_backbones: bool = False):
        super().__init__()
        if loss_reduction not in REDUCTIONS:
            raise ValueError(f"loss_reduction must be one of {', '.join(REDUCTIONS)}, got {loss_reduction!r}")
        paths = [checkpoint] if isinstance(checkpoint, (str, os.PathLike)) else list(checkpoint)
        paths = [NAMES.get(p, p) if isinstance(p, str) else p for p in paths]
        device = device if isinstance(device, torch.device) else select_device(device, "device")
        loaded = load_ensemble(paths, device, runtime, crops, num_crops, seed, allow_random_backbones,
                               patch_size=patch_size, vit_pretrained=vit_pretrained, cnn_pretrained=cnn_pretrained,
                               weights=weights)
        self.models = nn.ModuleList(loaded.models)
        self.plan, self.runtime = loaded.plan, runtime
        self._resolved = {device: loaded.runtime}  # the runtime resolved for each device the metric was on
        self.as_loss, self.loss_weight, self.loss_reduction = as_loss, loss_weight, loss_reduction
        # as in pyiqa: no range check on a loss (an optimised image may step slightly outside [0, 1])
        self.check_input_range = check_input_range and not as_loss

    @property
    def device(self) -> torch.device:
        """Where the metric computes: where its weights are (it follows ``.to(...)``)."""
        return self.models[0].head.reduce.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype inputs are given in: the model's (AHIQ.dtype; it follows ``.double()``)."""
        return self.models[0].dtype

    @property
    def ensemble(self) -> Ensemble:
        """The models, crops and runtime, resolved for the device the metric is on now (once per device)."""
        if self.device not in self._resolved:
            self._resolved[self.device] = resolve(self.runtime, self.device, self.models)
        return Ensemble(self.models, self.plan, self._resolved[self.device])

    def forward(self, dist: Any, ref: Any, ref_names: Sequence[str] | None = None) -> torch.Tensor:
        """[B] scores of B pairs; as a loss (``as_loss``), the weighted, reduced scores."""
        with torch.set_grad_enabled(self.as_loss and torch.is_grad_enabled()):
            scores = self._scores(dist, ref, ref_names)
        if not self.as_loss:
            return scores
        reduced = {"mean": scores.mean, "sum": scores.sum, "none": lambda: scores}[self.loss_reduction]()
        return self.loss_weight * reduced

    def loss(self, dist: Any, ref: Any, ref_names: Sequence[str] | None = None) -> torch.Tensor:
        """The negated mean score: lower is better, differentiable with respect to ``dist``."""
        with torch.enable_grad():
            return -self._scores(dist, ref, ref_names).mean()

    @torch.no_grad()
    def maps(self, dist: Any, ref: Any, ref_name: str = "") -> QualityMaps:
        """One pair's score with its quality maps (ahiq.scoring.maps), from the same crops and forward passes as the
        score; one model (not an ensemble)."""
        self.check_maps()
        dists, refs, names = self._pairs(dist, ref, [ref_name] if ref_name else None)
        if len(dists) != 1:
            raise ValueError(f"maps takes one pair, got {len(dists)}")
        d, r = dists[0], refs[0]
        if d.shape != r.shape:
            raise ValueError(f"give dist and ref of one shape, got {tuple(d.shape)} and {tuple(r.shape)}")
        return self.ensemble.score_group(r, [d], names[0], maps=True).maps[0]

    def _scores(self, dist: Any, ref: Any, ref_names: Sequence[str] | None) -> torch.Tensor:
        dists, refs, names = self._pairs(dist, ref, ref_names)
        size = self.plan.size
        for i, (d, r) in enumerate(zip(dists, refs)):
            if d.shape != r.shape:
                raise ValueError(f"pair {i}: dist and ref differ in shape: {tuple(d.shape)} vs {tuple(r.shape)}")
            if min(d.shape[-2:]) < size:
                raise ValueError(f"pair {i}: the images are {d.shape[-2]}x{d.shape[-1]}, smaller than the model's "
                                 f"{size}x{size} crop")
        if not dists:
            return torch.zeros(0, device=self.device)
        ensemble = self.ensemble
        scores = [None] * len(dists)
        for group in _same_reference(refs, names):  # each reference's features once, as the scorer does
            with out_of_memory_advice(self.device, len(group), self.plan.count, ensemble.runtime.crops(),
                                      "pairs of one reference per call"):
                got = ensemble.score_group(refs[group[0]], [dists[i] for i in group], names[group[0]]).scores
            for i, score in zip(group, got):
                scores[i] = score
        return torch.stack(scores)

    def _pairs(self, dist: Any, ref: Any, ref_names: Sequence[str] | None):
        """Lists of [3, H, W] tensors (checked) and the reference names that seed the crops."""
        dists, _ = _images(dist, "dist", self.check_input_range, self.dtype)
        refs, file_names = _images(ref, "ref", self.check_input_range, self.dtype)
        if len(dists) != len(refs):
            raise ValueError(f"{len(dists)} distorted images for {len(refs)} references")
        names = list(ref_names) if ref_names is not None else file_names
        if len(names) != len(refs):
            raise ValueError(f"{len(names)} ref_names for {len(refs)} pairs")
        return dists, refs, names


def _images(images: Any, what: str, check_range: bool, dtype: torch.dtype) -> tuple[list[torch.Tensor], list[str]]:
    """A batch, a list or one image (tensor, file, PIL image) -> [3, H, W] tensors of the weights' ``dtype``,
    and the file names ("" for tensors): what random crops are seeded by."""
    if isinstance(images, torch.Tensor) and images.dim() == 4:
        items = list(images)
    elif isinstance(images, (list, tuple)):
        items = list(images)
    else:
        items = [images]
    tensors, names = [], []
    for item in items:
        name = ""
        if isinstance(item, (str, os.PathLike)):
            name, item = Path(item).name, to_tensor(read_image(item))
        elif not isinstance(item, torch.Tensor) and hasattr(item, "convert"):  # a PIL image
            item = to_tensor(np.asarray(item.convert("RGB")))
        if not isinstance(item, torch.Tensor) or item.dim() != 3 or item.shape[0] not in (1, 3):
            shape = tuple(item.shape) if isinstance(item, torch.Tensor) else type(item).__name__
            raise ValueError(f"{what}: give [B, C, H, W] or [C, H, W] tensors with C = 3 (RGB) or 1 (grey), "
                             f"image files or PIL images; got {shape}")
        if not item.is_floating_point():
            raise ValueError(f"{what} is {item.dtype}: give floats in [0, 1] (divide 8-bit images by 255)")
        item = item.to(dtype)  # half input to fp32 weights (runtime.precision=bf16 is how to compute in bf16)
        if check_range:
            if not torch.isfinite(item).all():
                raise ValueError(f"{what} holds NaN or infinite values: AHIQ takes RGB in [0, 1]")
            low, high = item.min().item(), item.max().item()
            if low < 0 or high > 1:
                raise ValueError(f"{what} holds values in [{low:.4g}, {high:.4g}]: AHIQ takes RGB in [0, 1] (divide "
                                 f"8-bit images by 255), or pass check_input_range=False")
        tensors.append(item.expand(3, -1, -1) if item.shape[0] == 1 else item)
        names.append(name)
    return tensors, names


def _same_reference(refs: Sequence[torch.Tensor], names: Sequence[str]) -> list[list[int]]:
    """Indices of the pairs grouped by reference: the same name, shape and equal pixels, so a reference passed
    with many distorted images is computed once. Pixels are compared (read back from the device) only
    between references that agree on everything else, a cheap fingerprint first."""
    groups: list[list[int]] = []
    alike: dict[tuple, list[list[int]]] = {}
    prints: dict[int, float] = {}

    def fingerprint(j: int) -> float:  # the sum of 64 values spread over the image, once per image
        if j not in prints:
            prints[j] = float(refs[j].detach().flatten()[::max(1, refs[j].numel() // 64)].sum())
        return prints[j]

    for i, ref in enumerate(refs):
        candidates = alike.setdefault((names[i], tuple(ref.shape), ref.dtype, ref.device), [])
        for group in candidates:
            first = refs[group[0]]
            if first is ref or (fingerprint(group[0]) == fingerprint(i) and torch.equal(first, ref)):
                group.append(i)
                break
        else:
            candidates.append([i])
            groups.append(candidates[-1])
    return groups


def create_metric(name: PathLike | Sequence[PathLike] = "ahiq", **settings) -> AHIQMetric:
    """AHIQ as a metric module, as pyiqa's ``create_metric``: ``create_metric("ahiq")(dist, ref)`` -> [B]
    scores. ``name``: ``ahiq`` (the released model, as pyiqa calls it), a zoo name (list_models()), a
    checkpoint file or weights folder, or a list of them (an ensemble); ``settings``: see AHIQMetric."""
    return AHIQMetric(name, **settings)
