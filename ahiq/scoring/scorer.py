"""Scoring image pairs with trained AHIQ models: ``EnsembleScorer`` (the scorer protocol, ahiq.scoring.protocol, on
an Ensemble), and ``ahiq.Scorer``, which loads one: what ``python -m ahiq score`` and test.py run."""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import torch

from ahiq.data import CropPlan, Pairs
from ahiq.data.pairs import check_images, pair_files
from ahiq.nn.backbones import Pretrained
from ahiq.nn.downloads import sha256_of
from ahiq.registry.released import RELEASED
from ahiq.registry.variants import VITS
from ahiq.runtime.device import Runtime, select_device
from ahiq.scoring.ensemble import Ensemble, load_ensemble
from ahiq.scoring.inference import maps_of, predict
from ahiq.scoring.maps import QualityMaps
from ahiq.scoring.protocol import OnReference

PathLike = str | os.PathLike


class EnsembleScorer:
    """The scorer protocol (ahiq.scoring.protocol.PairScorer) on an Ensemble: image files decoded by
    ``num_workers`` loader processes, ``batch_size`` distorted images of one reference per batch."""

    def __init__(self, ensemble: Ensemble, batch_size: int = 1, num_workers: int = 0):
        self.ensemble, self.batch_size, self.num_workers = ensemble, batch_size, num_workers

    def check(self, pairs: Pairs) -> None:
        plan = self.ensemble.plan
        check_images(pairs, plan.size, whole=plan.mode == "whole")

    def score_pairs(self, pairs: Pairs, progress: bool | str = False, on_reference: OnReference | None = None,
                    on_maps=None) -> np.ndarray:
        """Scores of ``pairs`` in their order (every pair's images checked first); ``on_reference(indices,
        scores)`` as each reference is done; ``on_maps`` as ahiq.scoring.inference.predict's."""
        self.check(pairs)
        return predict(self.ensemble, pairs, self.batch_size, self.num_workers, progress, on_reference, on_maps)

    def settings(self) -> dict:
        """What decides the scores, for resuming a journaled run only with the same: each checkpoint file's
        SHA-256, the backbone weights, the crops, the precision on this device."""
        plan, models = self.ensemble.plan, self.ensemble.models
        return {"checkpoints": [f"{m.source.name} sha256 {sha256_of(m.source)}" for m in models],
                "backbones": sorted({str(m.backbone_sources) for m in models}),
                "crops": plan.settings(),
                "precision": "bf16" if self.ensemble.runtime.bf16 else "fp32"}

    def describe(self) -> str:
        return self.ensemble.runtime.describe()

    def check_maps(self) -> None:
        """Quality maps can be drawn (one model, a pooling that has them), else a one-line error."""
        self.ensemble.check_maps()

    def score(self, dist: PathLike, ref: PathLike) -> float:
        """Two image files' score."""
        return float(self.score_pairs(pair_files(dist, ref))[0])

    def maps(self, dist: PathLike, ref: PathLike) -> QualityMaps:
        """Two files' score with the maps it is pooled from (ahiq.scoring.maps): per crop on the ViT grid, and at
        image resolution. One model (not an ensemble); the same forward pass as the score."""
        self.check_maps()
        pairs = pair_files(dist, ref)
        self.check(pairs)
        return maps_of(self.ensemble, pairs, [0])[0]


class Scorer(EnsembleScorer):
    """A trained AHIQ (one checkpoint or an ensemble; a released model's name such as ``pipal``, the default,
    or a file) that scores image pairs of any size at least the crop, averaging a crop ensemble (default: the
    official 20 random crops, seeded by the reference image's name).

        scorer = Scorer()                                 # the released NTIRE 2022 model
        scorer = Scorer("checkpoints/my_run/best.pth")
        scorer.score("dist.png", "ref.png")               # one float, higher is better
        scorer.score_pairs(pair_files("dist/", "ref/"))   # numpy array
    """

    def __init__(self, checkpoint: PathLike | Sequence[PathLike] = RELEASED.default.name,
                 patch_size: int = VITS.default.name, vit_pretrained: Pretrained = True,
                 cnn_pretrained: Pretrained = True, crops: str = CropPlan.mode, num_crops: int = CropPlan.count,
                 seed: int = CropPlan.seed, device: str | torch.device = "auto", batch_size: int = 1,
                 runtime: Runtime = Runtime(), allow_random_backbones: bool = False, weights: PathLike | None = None,
                 num_workers: int = 0):
        device = device if isinstance(device, torch.device) else select_device(device, "device")
        super().__init__(load_ensemble(checkpoint, device, runtime, crops, num_crops, seed, allow_random_backbones,
                                       patch_size=patch_size, vit_pretrained=vit_pretrained,
                                       cnn_pretrained=cnn_pretrained, weights=weights), batch_size, num_workers)
