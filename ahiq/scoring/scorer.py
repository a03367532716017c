"""Scoring any image pairs with a trained AHIQ: ``ahiq.Scorer``, which ``python -m ahiq score`` runs through
ahiq.scoring.output."""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import torch

from ahiq.data import CropPlan, Pairs, Part
from ahiq.data.pairs import check_images, pair_files
from ahiq.nn.backbones import Pretrained
from ahiq.nn.downloads import sha256_of
from ahiq.nn.model import AHIQ
from ahiq.runtime.device import Runtime, select_device
from ahiq.scoring.inference import maps_of, predict
from ahiq.scoring.maps import QualityMaps, check_maps

PathLike = str | os.PathLike


class Scorer:
    """A trained AHIQ (one checkpoint or an ensemble; a released model's name such as ``pipal``, the default,
    or a file) that scores image pairs of any size at least the crop, averaging a crop ensemble (default: the
    official 20 random crops, seeded by the reference image's name).

        scorer = Scorer()                                 # the released NTIRE 2022 model
        scorer = Scorer("checkpoints/my_run/best.pth")
        scorer.score("dist.png", "ref.png")               # one float, higher is better
        scorer.score_pairs(pair_files("dist/", "ref/"))   # numpy array
    """

    def __init__(self, checkpoint: PathLike | Sequence[PathLike] = "pipal", patch_size: int = 8,
                 vit_pretrained: Pretrained = True, cnn_pretrained: Pretrained = True, crops: str = "random",
                 num_crops: int = 20, seed: int = 0, device: str | torch.device = "auto", batch_size: int = 1,
                 runtime: Runtime = Runtime(), allow_random_backbones: bool = False, weights: PathLike | None = None):
        paths = [checkpoint] if isinstance(checkpoint, (str, os.PathLike)) else list(checkpoint)
        self.device = device if isinstance(device, torch.device) else select_device(device, "device")
        self.runtime = runtime
        self.models = [runtime.prepare(AHIQ.from_pretrained(p, patch_size=patch_size, vit_pretrained=vit_pretrained,
                                                            cnn_pretrained=cnn_pretrained, weights=weights,
                                                            allow_random_backbones=allow_random_backbones),
                                       self.device).eval() for p in paths]
        self.plan = CropPlan(self.models[0].config["img_size"], crops, num_crops, seed)
        self.batch_size = batch_size

    def score_pairs(self, pairs: Pairs, progress: bool = False, on_reference=None, on_maps=None) -> np.ndarray:
        """Scores of ``pairs`` in their order; ``on_reference(indices, scores)`` as each reference is done;
        ``on_maps`` as evaluation.predict's."""
        check_images(pairs, self.plan.size, whole=self.plan.mode == "whole")  # every pair before the first score
        return predict(self.models, Part(pairs, None), self.plan, self.batch_size, 0, self.device, progress=progress,
                       runtime=self.runtime, on_reference=on_reference, on_maps=on_maps)

    def settings(self) -> dict:
        """What decides the scores, for resuming a journaled run only with the same: each checkpoint file's
        SHA-256, the backbone weights, the crops, the precision on this device."""
        return {"checkpoints": [f"{m.source.name} sha256 {sha256_of(m.source)}" for m in self.models],
                "backbones": sorted({str(m.backbone_sources) for m in self.models}),
                "crops": [self.plan.size, self.plan.mode, self.plan.count if self.plan.mode == "random" else None,
                          self.plan.seed if self.plan.mode == "random" else None],
                "precision": "bf16" if self.runtime.bf16(self.device) else "fp32"}

    def score(self, dist: PathLike, ref: PathLike) -> float:
        return float(self.score_pairs(pair_files(dist, ref))[0])

    def check_maps(self) -> None:
        """Quality maps can be drawn (one model, a pooling that has them), else a one-line error."""
        check_maps(self.models)

    def maps(self, dist: PathLike, ref: PathLike) -> QualityMaps:
        """Two files' score with the maps it is pooled from (ahiq.scoring.maps): per crop on the ViT grid, and at
        image resolution. One model (not an ensemble); the same forward pass as the score."""
        self.check_maps()
        pairs = pair_files(dist, ref)
        check_images(pairs, self.plan.size, whole=self.plan.mode == "whole")
        return maps_of(self.models[0], pairs, [0], self.plan, self.device, self.runtime)[0]
